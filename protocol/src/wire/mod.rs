//! The session protocol's messages and their binary encoding.
//!
//! A session is one QUIC connection carrying several *channels* (control, input, display,
//! cursor), each on its own stream so that a large frame never delays a key press
//! ([`crate::transport`] says which stream is which). Every channel has its own message enum
//! ([`ControlMessage`], [`InputMessage`], [`DisplayMessage`], [`CursorMessage`]), all encoded
//! the same way:
//!
//! ```text
//! stream framing:   type:u16le | body_len:u32le | body
//! datagram framing: channel:u8 | type:u16le | body          (the datagram's end ends the body)
//! ```
//!
//! The encoding is hand-written little-endian with fixed-width integers and `len:u16 | UTF-8`
//! strings: trivially portable to a second implementation, no schema compiler, and every field
//! is read through a bounds-checked reader (`codec.rs`). The full byte layouts are in
//! `docs/protocol.md`.
//!
//! Message type numbers are unique across channels: the high byte is the channel id
//! (`0x00xx` control, `0x01xx` input, see [`types`]). That lets a decoder tell a *future*
//! message (unknown type: skipped, counted, the body length says how far) from a message sent
//! on the *wrong* channel (an error).
//!
//! Invariants:
//! - Decoding never panics and never allocates more than the channel's body limit
//!   ([`Channel::max_body`]) per stream, checked on the header before any body byte is buffered.
//! - Every decoded message passed the same `validate` that [`encode`] runs, so what the peer
//!   can send is exactly what this crate can encode; each value has one encoding
//!   (`decode(encode(m)) == m` and no trailing bytes are tolerated).
//! - A decoder that returned an error stays failed: the channel is over (see [`DecodeError`]).

mod agent;
mod audio;
mod clipboard;
mod codec;
mod control;
mod cursor;
mod datagram;
mod decoder;
mod display;
mod files;
mod input;
pub mod palette;
pub mod scale;
mod usb;

use std::fmt;

pub use agent::{
    AgentHello, AgentMessage, GuestInfo, MAX_ADDRESS_LEN, MAX_ADDRESSES, MAX_AGENT_TEXT, PowerAction,
    SessionActivity, SessionState,
};
pub use audio::{
    AUDIO_CHANNELS, AUDIO_FRAME_SAMPLES, AUDIO_SAMPLE_RATE, AudioFeedback, AudioPacket, MAX_OPUS_BYTES,
};
pub use clipboard::{
    ClipboardData, ClipboardFormat, ClipboardGrab, ClipboardMessage, ClipboardRefused, ClipboardRequest,
    MAX_CLIPBOARD_BYTES, MAX_CLIPBOARD_CHUNK, MAX_CLIPBOARD_FORMATS, MAX_CLIPBOARD_QUEUE, RefuseReason,
};
pub use control::{
    ClientStats, ControlMessage, FrameAck, Goodbye, GoodbyeReason, Hello, Monitor, MonitorSize, Ping, Pong,
    RefuseCode, Refused, ResumeToken, Welcome,
};
pub use cursor::{CursorMessage, CursorPosition, CursorShape};
pub use datagram::{Datagram, DatagramError, MAX_DATAGRAM_SIZE, decode_datagram, encode_datagram};
pub use decoder::StreamDecoder;
pub use display::{
    Copy as CopyRect, DisplayMessage, FrameBegin, FrameEnd, FrameSequence, Rect, SequenceError, Tile,
    TileData, Video,
};
pub use files::{
    CancelReason, FILE_WINDOW, FileData, FileMessage, FileOffer, FileRefuseReason, MAX_FILE_BYTES,
    MAX_FILE_CHUNK, MAX_FILE_NAME, MAX_FILE_TRANSFERS, file_name_ok,
};
pub use input::{InputMessage, Key, PointerAbs, PointerRel, Wheel, buttons};
pub use usb::{
    MAX_USB_CHUNK, MAX_USB_DEVICES, MAX_USB_INTERFACES, MAX_USB_NAME, MAX_USB_QUEUE, UsbDetachReason,
    UsbDeviceInfo, UsbMessage, UsbRefuseReason, UsbSpeed,
};

/// Length of a stream frame header: `type:u16 | body_len:u32`.
pub const FRAME_HEADER_LEN: usize = 6;

/// Longest client or server name, in bytes.
pub const MAX_NAME_LEN: usize = 255;
/// Longest human-readable message in `Refused` and `Goodbye`, in bytes.
pub const MAX_TEXT_LEN: usize = 1024;
/// Longest ticket text (the ticket format's own limit).
pub const MAX_TICKET_LEN: usize = crate::ticket::MAX_TICKET_LEN;
/// Most monitors in a layout.
pub const MAX_MONITORS: usize = 16;
/// Largest width or height of a monitor, frame, tile or video region, in pixels; also bounds
/// `x + width` and `y + height` of a region.
pub const MAX_DIMENSION: u32 = 16384;
/// Largest cursor width or height, in pixels.
pub const MAX_CURSOR_SIDE: u16 = 256;

/// A channel: what a stream or datagram carries. The id is the first byte of every
/// unidirectional stream and of every datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Channel {
    /// Handshake, keep-alive, layout, acks, stats: the first bidirectional stream.
    Control = 0,
    /// Keyboard and pointer, client to server.
    Input = 1,
    /// Frames, server to client.
    Display = 2,
    /// Cursor shapes (stream) and positions (datagrams), server to client.
    Cursor = 3,
    /// Audio playback and record: datagrams only (Opus frames), with `AUDIO`.
    Audio = 4,
    /// USB devices redirected into the desktop ([`UsbMessage`]): unidirectional streams each
    /// way (lane 0 for announcements, one per device for its data), once both sides offered
    /// `USB`.
    Usb = 5,
    /// Clipboard grabs, requests and data, both ways ([`ClipboardMessage`]): one
    /// unidirectional stream each way, once both sides offered `CLIPBOARD`.
    Clipboard = 6,
    /// The VM process ↔ guest agent link over vsock ([`crate::agent`]): framed like the
    /// others, never part of a session (a session peer naming it is refused).
    Agent = 7,
    /// Files sent into the desktop ([`FileMessage`]): one unidirectional stream each way,
    /// once both sides offered `FILES`.
    Files = 8,
}

/// One end of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Side {
    Client,
    Server,
}

impl Side {
    /// The other end.
    pub fn other(self) -> Side {
        match self {
            Side::Client => Side::Server,
            Side::Server => Side::Client,
        }
    }
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Side::Client => "client",
            Side::Server => "server",
        })
    }
}

/// Why a channel id was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ChannelError {
    #[error("unknown channel id {0}")]
    Unknown(u8),
    #[error("the control channel is the first bidirectional stream, never a unidirectional one")]
    ControlOnUniStream,
    #[error("the {0} channel travels in datagrams only, never on a stream")]
    DatagramsOnly(Channel),
    #[error("the {0} channel links a VM process and its guest agent, never a session")]
    NotOnSession(Channel),
}

impl Channel {
    /// Every session channel, in id order (not [`Channel::Agent`]).
    pub const ALL: [Channel; 8] = [
        Channel::Control,
        Channel::Input,
        Channel::Display,
        Channel::Cursor,
        Channel::Audio,
        Channel::Usb,
        Channel::Clipboard,
        Channel::Files,
    ];

    /// The session channel with this id, or why there is none.
    pub fn from_id(id: u8) -> Result<Channel, ChannelError> {
        match id {
            0 => Ok(Channel::Control),
            1 => Ok(Channel::Input),
            2 => Ok(Channel::Display),
            3 => Ok(Channel::Cursor),
            4 => Ok(Channel::Audio),
            5 => Ok(Channel::Usb),
            6 => Ok(Channel::Clipboard),
            7 => Err(ChannelError::NotOnSession(Channel::Agent)),
            8 => Ok(Channel::Files),
            other => Err(ChannelError::Unknown(other)),
        }
    }

    pub fn id(self) -> u8 {
        self as u8
    }

    /// Largest message body accepted on this channel, in bytes. Checked on the frame header,
    /// before anything is buffered: the decoder's memory per stream is bounded by it.
    ///
    /// - control 64 KiB: names, tickets, layouts of at most 16 monitors;
    /// - input 4 KiB: every input message is a few bytes;
    /// - cursor 320 KiB: a 256×256 BGRA shape (256 KiB) and its header;
    /// - display 32 MiB: a tile or an H.264 access unit (a raw tile must fit: encoders tile);
    /// - clipboard, files, USB and agent 64 KiB: grabs, requests, data in chunks of at most
    ///   48 KiB ([`MAX_CLIPBOARD_CHUNK`], [`MAX_FILE_CHUNK`]) or 60 KiB ([`MAX_USB_CHUNK`]);
    ///   guest facts and session state, a few hundred bytes each.
    pub const fn max_body(self) -> u32 {
        match self {
            Channel::Control => 64 * 1024,
            Channel::Input => 4 * 1024,
            Channel::Cursor => 320 * 1024,
            Channel::Display => 32 * 1024 * 1024,
            Channel::Clipboard | Channel::Files | Channel::Usb | Channel::Agent => 64 * 1024,
            // Datagrams only: no stream of it is ever decoded.
            Channel::Audio => 0,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Channel::Control => "control",
            Channel::Input => "input",
            Channel::Display => "display",
            Channel::Cursor => "cursor",
            Channel::Audio => "audio",
            Channel::Usb => "usb",
            Channel::Clipboard => "clipboard",
            Channel::Agent => "agent",
            Channel::Files => "files",
        }
    }
}

impl fmt::Display for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Message type numbers: high byte = the channel id, low byte = the message within the
/// channel, from 1. New messages take the next free number of their channel.
pub mod types {
    // control (0x00xx)
    pub const HELLO: u16 = 0x0001;
    pub const WELCOME: u16 = 0x0002;
    pub const REFUSED: u16 = 0x0003;
    pub const PING: u16 = 0x0004;
    pub const PONG: u16 = 0x0005;
    pub const DISPLAY_LAYOUT: u16 = 0x0006;
    pub const REQUEST_LAYOUT: u16 = 0x0007;
    pub const CLIENT_STATS: u16 = 0x0008;
    pub const GOODBYE: u16 = 0x0009;
    pub const FRAME_ACK: u16 = 0x000A;
    pub const RESUME_TOKEN: u16 = 0x000B;
    // input (0x01xx)
    pub const KEY: u16 = 0x0101;
    pub const POINTER_ABS: u16 = 0x0102;
    pub const BUTTONS: u16 = 0x0103;
    pub const WHEEL: u16 = 0x0104;
    pub const RELEASE_ALL: u16 = 0x0105;
    pub const POINTER_REL: u16 = 0x0106;
    // display (0x02xx)
    pub const FRAME_BEGIN: u16 = 0x0201;
    pub const TILE: u16 = 0x0202;
    pub const VIDEO: u16 = 0x0203;
    pub const FRAME_END: u16 = 0x0204;
    pub const COPY: u16 = 0x0205;
    // cursor (0x03xx)
    pub const CURSOR_SHAPE: u16 = 0x0301;
    pub const CURSOR_POSITION: u16 = 0x0302;
    // audio (0x04xx), datagrams only
    pub const AUDIO_PLAYBACK: u16 = 0x0401;
    pub const AUDIO_RECORD: u16 = 0x0402;
    pub const AUDIO_FEEDBACK: u16 = 0x0403;
    // USB (0x05xx): attach, detach, data both ways
    pub const USB_ATTACH: u16 = 0x0501;
    pub const USB_ATTACHED: u16 = 0x0502;
    pub const USB_REFUSED: u16 = 0x0503;
    pub const USB_DATA: u16 = 0x0504;
    pub const USB_DETACH: u16 = 0x0505;
    pub const USB_DETACHED: u16 = 0x0506;
    // clipboard (0x06xx), both ways
    pub const CLIPBOARD_GRAB: u16 = 0x0601;
    pub const CLIPBOARD_REQUEST: u16 = 0x0602;
    pub const CLIPBOARD_DATA: u16 = 0x0603;
    pub const CLIPBOARD_REFUSED: u16 = 0x0604;
    // agent (0x07xx), over vsock only
    pub const AGENT_HELLO: u16 = 0x0701;
    pub const AGENT_WELCOME: u16 = 0x0702;
    pub const GUEST_INFO: u16 = 0x0703;
    pub const SESSION_STATE: u16 = 0x0704;
    pub const LOCK_SCREEN: u16 = 0x0705;
    pub const POWER: u16 = 0x0706;
    pub const UNLOCK_SCREEN: u16 = 0x0707;
    /// The four clipboard messages on the agent link, in the clipboard channel's order.
    pub const AGENT_CLIPBOARD_GRAB: u16 = 0x0708;
    pub const AGENT_CLIPBOARD_REQUEST: u16 = 0x0709;
    pub const AGENT_CLIPBOARD_DATA: u16 = 0x070A;
    pub const AGENT_CLIPBOARD_REFUSED: u16 = 0x070B;
    pub const AGENT_FILE_OFFER: u16 = 0x070C;
    pub const AGENT_FILE_ACCEPT: u16 = 0x070D;
    pub const AGENT_FILE_DATA: u16 = 0x070E;
    pub const AGENT_FILE_PROGRESS: u16 = 0x070F;
    pub const AGENT_FILE_DONE: u16 = 0x0710;
    pub const AGENT_FILE_REFUSED: u16 = 0x0711;
    pub const AGENT_FILE_CANCEL: u16 = 0x0712;
    /// USB on the agent link: the host asks the agent to attach a device, the agent answers.
    pub const AGENT_USB_ATTACH: u16 = 0x0713;
    pub const AGENT_USB_ATTACHED: u16 = 0x0714;
    pub const AGENT_USB_FAILED: u16 = 0x0715;
    // files (0x08xx)
    pub const FILE_OFFER: u16 = 0x0801;
    pub const FILE_ACCEPT: u16 = 0x0802;
    pub const FILE_DATA: u16 = 0x0803;
    pub const FILE_PROGRESS: u16 = 0x0804;
    pub const FILE_DONE: u16 = 0x0805;
    pub const FILE_REFUSED: u16 = 0x0806;
    pub const FILE_CANCEL: u16 = 0x0807;
}

/// The channel a message type of this version belongs to; `None` for a type this version does
/// not know (which a receiver skips).
pub fn channel_of_type(ty: u16) -> Option<Channel> {
    use types::*;
    match ty {
        HELLO | WELCOME | REFUSED | PING | PONG | DISPLAY_LAYOUT | REQUEST_LAYOUT | CLIENT_STATS
        | GOODBYE | FRAME_ACK | RESUME_TOKEN => Some(Channel::Control),
        KEY | POINTER_ABS | BUTTONS | WHEEL | RELEASE_ALL | POINTER_REL => Some(Channel::Input),
        FRAME_BEGIN | TILE | VIDEO | FRAME_END | COPY => Some(Channel::Display),
        CURSOR_SHAPE | CURSOR_POSITION => Some(Channel::Cursor),
        AUDIO_PLAYBACK | AUDIO_RECORD | AUDIO_FEEDBACK => Some(Channel::Audio),
        CLIPBOARD_GRAB | CLIPBOARD_REQUEST | CLIPBOARD_DATA | CLIPBOARD_REFUSED => Some(Channel::Clipboard),
        AGENT_HELLO
        | AGENT_WELCOME
        | GUEST_INFO
        | SESSION_STATE
        | LOCK_SCREEN
        | POWER
        | UNLOCK_SCREEN
        | AGENT_CLIPBOARD_GRAB
        | AGENT_CLIPBOARD_REQUEST
        | AGENT_CLIPBOARD_DATA
        | AGENT_CLIPBOARD_REFUSED
        | AGENT_FILE_OFFER..=AGENT_FILE_CANCEL
        | AGENT_USB_ATTACH..=AGENT_USB_FAILED => Some(Channel::Agent),
        USB_ATTACH..=USB_DETACHED => Some(Channel::Usb),
        FILE_OFFER..=FILE_CANCEL => Some(Channel::Files),
        _ => None,
    }
}

/// Messages that wait in a sender's queue before their stream takes them (the clipboard's,
/// the files' and USB's channels, fed by another thread): what one takes there, the most a
/// queue may hold before the sender ends the channel instead of growing, and the stream (lane)
/// of the channel a message goes on.
pub trait Queued {
    const MAX_QUEUE: usize;
    fn queued_size(&self) -> usize;
    /// Messages of one lane keep their order on one stream; different lanes travel on
    /// different streams, so that one never waits behind another's flow control. Lane 0 is
    /// the channel's first stream.
    fn lane(&self) -> u64 {
        0
    }
    /// A lane that carries nothing more once this message is sent (its stream is finished).
    fn ends_lane(&self) -> Option<u64> {
        None
    }
}

impl Queued for ClipboardMessage {
    const MAX_QUEUE: usize = MAX_CLIPBOARD_QUEUE;
    fn queued_size(&self) -> usize {
        ClipboardMessage::queued_size(self)
    }
}

impl Queued for UsbMessage {
    const MAX_QUEUE: usize = MAX_USB_QUEUE;
    fn queued_size(&self) -> usize {
        UsbMessage::queued_size(self)
    }
    fn lane(&self) -> u64 {
        UsbMessage::lane(self)
    }
    fn ends_lane(&self) -> Option<u64> {
        UsbMessage::ends_lane(self)
    }
}

impl Queued for FileMessage {
    /// Every transfer's window, and room for the answers.
    const MAX_QUEUE: usize = MAX_FILE_TRANSFERS * FILE_WINDOW as usize + (1 << 20);
    fn queued_size(&self) -> usize {
        FileMessage::queued_size(self)
    }
}

/// The messages of one channel. Implemented by the four channel enums; [`StreamDecoder`] and
/// [`encode`] are generic over it.
pub trait ChannelMessage: Sized + fmt::Debug {
    /// The channel these messages travel on.
    const CHANNEL: Channel;
    /// This message's type number ([`types`]).
    fn message_type(&self) -> u16;
    /// Checks the semantic rules that the layout alone cannot express (lengths, ranges,
    /// non-empty rectangles). Run by both [`encode`] and the decoder.
    fn validate(&self) -> Result<(), &'static str>;
    #[doc(hidden)]
    /// Every field but the trailing payload.
    fn encode_fields(&self, out: &mut Vec<u8>);
    /// The trailing `bytes*` field (pixels, an access unit), empty for most messages.
    fn payload(&self) -> &[u8] {
        &[]
    }
    #[doc(hidden)]
    /// `Ok(None)` when `ty` is not a type of this channel.
    fn decode_body(ty: u16, body: &mut codec::Reader<'_>) -> Result<Option<Self>, &'static str>;
}

/// Why a message could not be encoded. Encoding checks what decoding checks, so that a
/// sender finds its own bug instead of the peer closing the channel.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("{channel} message {ty:#06x} is invalid: {reason}")]
    Invalid { channel: Channel, ty: u16, reason: &'static str },
    #[error("{channel} message {ty:#06x} has a {len}-byte body, over the channel's limit of {max} bytes")]
    TooLarge { channel: Channel, ty: u16, len: usize, max: u32 },
}

/// Why a stream's decoder stopped. Every variant ends the channel: the decoder keeps returning
/// the error, and the receiver stops the stream with [`DecodeError::error_code`] (on the
/// control channel it closes the connection, see `docs/protocol.md`, "Errors").
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error(
        "{channel} message {ty:#06x} announces a {len}-byte body, over the channel's limit of {max} bytes"
    )]
    TooLarge { channel: Channel, ty: u16, len: u32, max: u32 },
    #[error("{channel} message {ty:#06x} is malformed: {reason}")]
    Malformed { channel: Channel, ty: u16, reason: &'static str },
    #[error("message {ty:#06x} belongs to the {belongs_to} channel but arrived on the {channel} channel")]
    WrongChannel { channel: Channel, ty: u16, belongs_to: Channel },
    #[error("{channel} stream ended inside a message ({have} of {need} bytes of the frame received)")]
    Truncated { channel: Channel, have: usize, need: usize },
}

impl DecodeError {
    /// The QUIC application error code to stop the stream or close the connection with.
    pub fn error_code(&self) -> u32 {
        use crate::error_code;
        match self {
            DecodeError::TooLarge { .. } => error_code::MESSAGE_TOO_LARGE,
            DecodeError::Malformed { .. } => error_code::MALFORMED_MESSAGE,
            DecodeError::WrongChannel { .. } => error_code::WRONG_CHANNEL,
            DecodeError::Truncated { .. } => error_code::TRUNCATED,
        }
    }
}

/// Appends one framed message (`type | body_len | body`) to `out`.
///
/// On error `out` is left as it was.
pub fn encode<M: ChannelMessage>(message: &M, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    let payload = encode_head(message, out)?;
    out.extend_from_slice(payload);
    Ok(())
}

/// Appends the frame header and every field but the trailing payload to `head`, and returns the
/// payload (tile pixels, an access unit, cursor pixels; empty for other messages). Writing
/// `head` then the payload sends the same bytes as [`encode`] without copying the payload
/// (e.g. quinn's `write_chunks`).
///
/// On error `head` is left as it was.
pub fn encode_head<'m, M: ChannelMessage>(
    message: &'m M,
    head: &mut Vec<u8>,
) -> Result<&'m [u8], EncodeError> {
    let channel = M::CHANNEL;
    let ty = message.message_type();
    message.validate().map_err(|reason| EncodeError::Invalid { channel, ty, reason })?;
    let start = head.len();
    head.extend_from_slice(&ty.to_le_bytes());
    head.extend_from_slice(&[0; 4]);
    message.encode_fields(head);
    let payload = message.payload();
    let len = head.len() - start - FRAME_HEADER_LEN + payload.len();
    match u32::try_from(len) {
        Ok(len32) if len32 <= channel.max_body() => {
            head[start + 2..start + FRAME_HEADER_LEN].copy_from_slice(&len32.to_le_bytes());
            Ok(payload)
        }
        _ => {
            head.truncate(start);
            Err(EncodeError::TooLarge { channel, ty, len, max: channel.max_body() })
        }
    }
}

/// One framed message as a new buffer; see [`encode`].
pub fn encode_to_vec<M: ChannelMessage>(message: &M) -> Result<Vec<u8>, EncodeError> {
    let mut out = Vec::new();
    encode(message, &mut out)?;
    Ok(out)
}

/// Decodes one body of type `ty` for channel `M`: `Ok(None)` for a type of no channel known to
/// this version, errors for a known type of another channel or a bad body.
pub(crate) fn decode_body<M: ChannelMessage>(ty: u16, body: &[u8]) -> Result<Option<M>, DecodeError> {
    let channel = M::CHANNEL;
    match channel_of_type(ty) {
        None => return Ok(None),
        Some(belongs_to) if belongs_to != channel => {
            return Err(DecodeError::WrongChannel { channel, ty, belongs_to });
        }
        Some(_) => {}
    }
    let malformed = |reason| DecodeError::Malformed { channel, ty, reason };
    let mut reader = codec::Reader::new(body);
    let message = M::decode_body(ty, &mut reader)
        .map_err(malformed)?
        .ok_or(malformed("type not decoded by its channel"))?;
    if !reader.is_empty() {
        return Err(malformed("trailing bytes after the last field"));
    }
    message.validate().map_err(malformed)?;
    Ok(Some(message))
}

/// Checks that a region lies within `MAX_DIMENSION` and is not empty.
pub(crate) fn check_region(x: u32, y: u32, width: u32, height: u32) -> Result<(), &'static str> {
    if width == 0 || height == 0 {
        return Err("empty region");
    }
    if u64::from(x) + u64::from(width) > u64::from(MAX_DIMENSION)
        || u64::from(y) + u64::from(height) > u64::from(MAX_DIMENSION)
    {
        return Err("region extends beyond the largest supported dimension");
    }
    Ok(())
}

#[cfg(test)]
mod tests;
