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
//! | clipboard | unidirectional, prelude [`Channel::Clipboard`]; one each way | both, after `Welcome`, with `CLIPBOARD` | [`priority::CLIPBOARD`] |
//! | files | unidirectional, prelude [`Channel::Files`]; one each way | both, after `Welcome`, with `FILES` | [`priority::FILES`] |
//! | USB | unidirectional, prelude [`Channel::Usb`]; per direction one for announcements and one per redirected device | both, after `Welcome`, with `USB` | [`priority::USB`] |
//!
//! Every unidirectional stream starts with one byte, the channel id ([`stream_prelude`],
//! [`Channel::from_uni_prelude`]), then framed messages. The control stream has no prelude:
//! being the first bidirectional stream identifies it. Streams of a reserved or unknown
//! channel are stopped with [`error_code::UNSUPPORTED_CHANNEL`], the session continues.
//!
//! Priorities are for quinn's `SendStream::set_priority` (higher is sent first): input beats
//! everything (a key press must not wait behind a frame), control beats media so pings
//! measure the path rather than the display queue, the cursor shape beats frames, and a paste
//! (a user waits for it, and it comes in 48 KiB chunks) goes between the cursor and frames.

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
    pub const CLIPBOARD: i32 = 10;
    pub const DISPLAY: i32 = 0;
    /// USB devices' transfers: below the picture (a stick's bulk copy must not slow it), above
    /// files (a headset or a keyboard on the client is interactive).
    pub const USB: i32 = -5;
    /// Files go last: a bulk copy never delays anything the user looks at or types.
    pub const FILES: i32 = -10;

    /// The priority of `channel`'s streams.
    pub fn of(channel: crate::wire::Channel) -> i32 {
        use crate::wire::Channel;
        match channel {
            Channel::Input => INPUT,
            Channel::Control | Channel::Agent => CONTROL,
            Channel::Cursor => CURSOR,
            Channel::Clipboard => CLIPBOARD,
            Channel::Display | Channel::Audio => DISPLAY,
            Channel::Usb => USB,
            Channel::Files => FILES,
        }
    }
}

pub use crate::error_code;

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
