//! How the protocol maps onto QUIC: ALPN, streams, priorities, error codes.
//!
//! This crate does no I/O; host/ and client/ open the streams (quinn) and feed the bytes to
//! the decoders. What they must agree on lives here as constants:
//!
//! | channel | QUIC | opened by | priority (sender) |
//! | --- | --- | --- | --- |
//! | control | the first bidirectional stream | client, before anything else | [`priority::CONTROL`] |
//! | input | unidirectional, prelude [`Channel::Input`] | client, after `Welcome` | [`priority::INPUT`] |
//! | display | unidirectional, prelude [`Channel::Display`]; one per scanout | server, after `Welcome` | [`priority::DISPLAY`] |
//! | cursor shape | unidirectional, prelude [`Channel::Cursor`] | server, after `Welcome` | [`priority::CURSOR`] |
//! | cursor position | datagrams, first byte [`Channel::Cursor`] | server | (datagrams) |
//!
//! Every unidirectional stream starts with one byte, the channel id ([`stream_prelude`],
//! [`Channel::from_uni_prelude`]), then framed messages. The control stream has no prelude:
//! being the first bidirectional stream identifies it. Streams of a reserved or unknown
//! channel are stopped with [`error_code::UNSUPPORTED_CHANNEL`], the session continues.
//!
//! Priorities are for quinn's `SendStream::set_priority` (higher is sent first): input beats
//! everything (a key press must not wait behind a frame), control beats media so pings
//! measure the path rather than the display queue, and the cursor shape beats frames.

use crate::wire::{Channel, ChannelError};

/// The TLS ALPN protocol id of version 1.
pub const ALPN: &[u8] = b"pleiades/1";
/// The session server's default UDP port.
pub const DEFAULT_PORT: u16 = 4433;
/// Idle timeout both sides configure on the QUIC connection (µs); pings keep a live session
/// well inside it.
pub const IDLE_TIMEOUT_US: u64 = 30_000_000;
/// How often each side sends a `Ping` (µs): keeps the RTT estimate fresh.
pub const PING_INTERVAL_US: u64 = 1_000_000;

/// Send priorities for `quinn::SendStream::set_priority`.
pub mod priority {
    pub const INPUT: i32 = 100;
    pub const CONTROL: i32 = 50;
    pub const CURSOR: i32 = 25;
    pub const DISPLAY: i32 = 0;
}

/// QUIC application error codes (`CONNECTION_CLOSE`, `RESET_STREAM`, `STOP_SENDING`).
pub mod error_code {
    /// Clean close (after `Goodbye`).
    pub const NO_ERROR: u32 = 0;
    /// The peer broke the protocol (wrong handshake message, bad `Welcome`…).
    pub const PROTOCOL_VIOLATION: u32 = 1;
    /// A frame header announced a body over the channel's limit.
    pub const MESSAGE_TOO_LARGE: u32 = 2;
    /// A message of known type did not parse or validate.
    pub const MALFORMED_MESSAGE: u32 = 3;
    /// A known message type arrived on another channel's stream.
    pub const WRONG_CHANNEL: u32 = 4;
    /// A stream ended inside a message.
    pub const TRUNCATED: u32 = 5;
    /// A stream or datagram named a reserved or unknown channel.
    pub const UNSUPPORTED_CHANNEL: u32 = 6;
    /// The server refused the session (after sending `Refused`).
    pub const REFUSED: u32 = 7;
    /// No `Hello` (server) or no answer (client) within the handshake timeout.
    pub const HANDSHAKE_TIMEOUT: u32 = 8;
}

/// The first byte of a unidirectional stream of `channel`.
pub fn stream_prelude(channel: Channel) -> [u8; 1] {
    [channel.id()]
}

impl Channel {
    /// The channel a unidirectional stream carries, from its first byte. Control never travels
    /// on a unidirectional stream.
    pub fn from_uni_prelude(byte: u8) -> Result<Channel, ChannelError> {
        match Channel::from_id(byte)? {
            Channel::Control => Err(ChannelError::ControlOnUniStream),
            Channel::Audio => Err(ChannelError::DatagramsOnly(Channel::Audio)),
            channel => Ok(channel),
        }
    }
}

/// Most display streams a client accepts (one per scanout); further ones are stopped with
/// [`error_code::PROTOCOL_VIOLATION`].
pub const MAX_DISPLAY_STREAMS: usize = crate::wire::MAX_MONITORS;
