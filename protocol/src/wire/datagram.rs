//! QUIC datagrams: unreliable, unordered, latest-wins messages.
//!
//! ```text
//! channel:u8 | type:u16le | body          (the body runs to the end of the datagram)
//! ```
//!
//! Cursor positions and audio (Opus frames, loss feedback) travel as datagrams. A datagram stands alone: a bad one is
//! dropped and counted, it never ends a channel (there is no stream to end, and a lost
//! datagram is normal). Datagrams of an unknown type on a known channel are skipped, as on
//! streams.

use super::audio::{AudioFeedback, AudioPacket, put_feedback, put_packet, read_feedback, read_packet};
use super::codec::Reader;
use super::cursor::{put_position, read_position};
use super::{Channel, ChannelError, CursorPosition, types};

/// Largest datagram a sender emits: fits the smallest QUIC path MTU (1200-byte packets) with
/// room for QUIC's own headers.
pub const MAX_DATAGRAM_SIZE: usize = 1100;

/// A decoded datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Datagram {
    CursorPosition(CursorPosition),
    /// Server → client: an Opus frame the guest played.
    AudioPlayback(AudioPacket),
    /// Client → server: an Opus frame of the microphone.
    AudioRecord(AudioPacket),
    /// Client → server: how the playback stream arrives.
    AudioFeedback(AudioFeedback),
}

impl Datagram {
    /// Who may send it.
    pub fn may_be_sent_by(&self, side: super::Side) -> bool {
        match self {
            Datagram::CursorPosition(_) | Datagram::AudioPlayback(_) => side == super::Side::Server,
            Datagram::AudioRecord(_) | Datagram::AudioFeedback(_) => side == super::Side::Client,
        }
    }
}

/// Why a datagram was dropped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DatagramError {
    #[error("datagram of {0} bytes is shorter than its 3-byte header")]
    TooShort(usize),
    #[error("datagram of {0} bytes is over the {MAX_DATAGRAM_SIZE}-byte limit")]
    TooLarge(usize),
    #[error("datagram names a channel this version does not take datagrams on: {0}")]
    Channel(#[from] ChannelError),
    #[error("{channel} channel takes no datagrams of known type {ty:#06x}")]
    NotADatagram { channel: Channel, ty: u16 },
    #[error("datagram {ty:#06x} is malformed: {reason}")]
    Malformed { ty: u16, reason: &'static str },
}

/// The datagram for `message`.
pub fn encode_datagram(message: &Datagram) -> Vec<u8> {
    let mut out = Vec::with_capacity(32);
    let mut head = |channel: Channel, ty: u16| {
        out.push(channel.id());
        out.extend_from_slice(&ty.to_le_bytes());
    };
    match message {
        Datagram::CursorPosition(position) => {
            head(Channel::Cursor, types::CURSOR_POSITION);
            put_position(position, &mut out);
        }
        Datagram::AudioPlayback(packet) => {
            head(Channel::Audio, types::AUDIO_PLAYBACK);
            put_packet(packet, &mut out);
        }
        Datagram::AudioRecord(packet) => {
            head(Channel::Audio, types::AUDIO_RECORD);
            put_packet(packet, &mut out);
        }
        Datagram::AudioFeedback(feedback) => {
            head(Channel::Audio, types::AUDIO_FEEDBACK);
            put_feedback(feedback, &mut out);
        }
    }
    out
}

/// Decodes one datagram: `Ok(None)` for an unknown type on a known channel (skip it).
pub fn decode_datagram(datagram: &[u8]) -> Result<Option<Datagram>, DatagramError> {
    if datagram.len() > MAX_DATAGRAM_SIZE {
        return Err(DatagramError::TooLarge(datagram.len()));
    }
    let [channel, ty0, ty1, body @ ..] = datagram else {
        return Err(DatagramError::TooShort(datagram.len()));
    };
    let channel = Channel::from_id(*channel)?;
    let ty = u16::from_le_bytes([*ty0, *ty1]);
    let mut r = Reader::new(body);
    let malformed = |reason| DatagramError::Malformed { ty, reason };
    let datagram = match (channel, ty) {
        (Channel::Cursor, types::CURSOR_POSITION) => {
            Datagram::CursorPosition(read_position(&mut r).map_err(malformed)?)
        }
        (Channel::Audio, types::AUDIO_PLAYBACK) => {
            Datagram::AudioPlayback(read_packet(&mut r).map_err(malformed)?)
        }
        (Channel::Audio, types::AUDIO_RECORD) => {
            Datagram::AudioRecord(read_packet(&mut r).map_err(malformed)?)
        }
        (Channel::Audio, types::AUDIO_FEEDBACK) => {
            Datagram::AudioFeedback(read_feedback(&mut r).map_err(malformed)?)
        }
        _ if super::channel_of_type(ty).is_none() => return Ok(None),
        _ => return Err(DatagramError::NotADatagram { channel, ty }),
    };
    if !r.is_empty() {
        return Err(malformed("trailing bytes after the last field"));
    }
    Ok(Some(datagram))
}
