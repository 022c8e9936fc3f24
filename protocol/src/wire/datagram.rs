//! QUIC datagrams: unreliable, unordered, latest-wins messages.
//!
//! ```text
//! channel:u8 | type:u16le | body          (the body runs to the end of the datagram)
//! ```
//!
//! Only cursor positions travel as datagrams today. A datagram stands alone: a bad one is
//! dropped and counted, it never ends a channel (there is no stream to end, and a lost
//! datagram is normal). Datagrams of an unknown type on a known channel are skipped, as on
//! streams.

use super::codec::Reader;
use super::cursor::{put_position, read_position};
use super::{Channel, ChannelError, CursorPosition, types};

/// Largest datagram a sender emits: fits the smallest QUIC path MTU (1200-byte packets) with
/// room for QUIC's own headers.
pub const MAX_DATAGRAM_SIZE: usize = 1100;

/// A decoded datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Datagram {
    CursorPosition(CursorPosition),
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
    match message {
        Datagram::CursorPosition(position) => {
            out.push(Channel::Cursor.id());
            out.extend_from_slice(&types::CURSOR_POSITION.to_le_bytes());
            put_position(position, &mut out);
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
    match (channel, ty) {
        (Channel::Cursor, types::CURSOR_POSITION) => {
            let mut r = Reader::new(body);
            let position = read_position(&mut r).map_err(|reason| DatagramError::Malformed { ty, reason })?;
            if !r.is_empty() {
                return Err(DatagramError::Malformed { ty, reason: "trailing bytes after the last field" });
            }
            Ok(Some(Datagram::CursorPosition(position)))
        }
        _ if super::channel_of_type(ty).is_none() => Ok(None),
        _ => Err(DatagramError::NotADatagram { channel, ty }),
    }
}
