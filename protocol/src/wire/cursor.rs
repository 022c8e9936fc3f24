//! Cursor channel messages, server → client.
//!
//! The cursor is drawn by the client, locally, so that it moves at the client's frame rate
//! whatever the display stream is doing. Shapes are rare and must arrive: they go on the
//! reliable cursor stream. Positions are frequent and only the newest matters: they go as
//! datagrams ([`super::encode_datagram`]), and the client keeps the one with the highest `seq`
//! and drops older ones that arrive late. A position may also be sent on the cursor stream
//! (e.g. where datagrams are unavailable); the same `seq` rule applies.

use super::codec::{Put, Reader};
use super::{Channel, ChannelMessage, MAX_CURSOR_SIDE, types};

/// A new cursor image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CursorShape {
    /// Increases with each new shape; positions do not refer to it.
    pub serial: u32,
    pub width: u16,
    pub height: u16,
    /// The hot spot (the pixel that points), within the image.
    pub hot_x: u16,
    pub hot_y: u16,
    /// BGRA pixels, premultiplied alpha, `width × height × 4` bytes.
    pub bgra: Vec<u8>,
}

/// Where the cursor is, and whether it is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CursorPosition {
    /// Increases with each position sent; the receiver ignores a position whose `seq` is not
    /// above the last one applied (datagrams may arrive out of order).
    pub seq: u64,
    pub scanout: u32,
    /// The hot spot's position in scanout pixels (may lie outside the scanout while moving).
    pub x: i32,
    pub y: i32,
    pub visible: bool,
}

/// Everything the cursor channel carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CursorMessage {
    Shape(CursorShape),
    Position(CursorPosition),
}

impl ChannelMessage for CursorMessage {
    const CHANNEL: Channel = Channel::Cursor;

    fn message_type(&self) -> u16 {
        match self {
            CursorMessage::Shape(_) => types::CURSOR_SHAPE,
            CursorMessage::Position(_) => types::CURSOR_POSITION,
        }
    }

    fn validate(&self) -> Result<(), &'static str> {
        if let CursorMessage::Shape(s) = self {
            if s.width == 0 || s.height == 0 || s.width > MAX_CURSOR_SIDE || s.height > MAX_CURSOR_SIDE {
                return Err("cursor size is not within 1..=256");
            }
            if s.hot_x >= s.width || s.hot_y >= s.height {
                return Err("cursor hot spot outside the image");
            }
            if s.bgra.len() != usize::from(s.width) * usize::from(s.height) * 4 {
                return Err("cursor data is not width × height × 4 bytes");
            }
        }
        Ok(())
    }

    fn encode_fields(&self, out: &mut Vec<u8>) {
        match self {
            CursorMessage::Shape(s) => {
                out.put_u32(s.serial);
                out.put_u16(s.width);
                out.put_u16(s.height);
                out.put_u16(s.hot_x);
                out.put_u16(s.hot_y);
            }
            CursorMessage::Position(p) => put_position(p, out),
        }
    }

    fn payload(&self) -> &[u8] {
        match self {
            CursorMessage::Shape(s) => &s.bgra,
            CursorMessage::Position(_) => &[],
        }
    }

    fn decode_body(ty: u16, r: &mut Reader<'_>) -> Result<Option<Self>, &'static str> {
        let message = match ty {
            types::CURSOR_SHAPE => CursorMessage::Shape(CursorShape {
                serial: r.u32()?,
                width: r.u16()?,
                height: r.u16()?,
                hot_x: r.u16()?,
                hot_y: r.u16()?,
                bgra: r.rest(),
            }),
            types::CURSOR_POSITION => CursorMessage::Position(read_position(r)?),
            _ => return Ok(None),
        };
        Ok(Some(message))
    }
}

pub(crate) fn put_position(p: &CursorPosition, out: &mut Vec<u8>) {
    out.put_u64(p.seq);
    out.put_u32(p.scanout);
    out.put_i32(p.x);
    out.put_i32(p.y);
    out.put_bool(p.visible);
}

pub(crate) fn read_position(r: &mut Reader<'_>) -> Result<CursorPosition, &'static str> {
    Ok(CursorPosition { seq: r.u64()?, scanout: r.u32()?, x: r.i32()?, y: r.i32()?, visible: r.bool()? })
}
