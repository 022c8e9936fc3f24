//! Display channel messages, server → client.
//!
//! A frame is `FrameBegin`, any number of `Copy`, `Tile` and `Video` updates for regions of
//! one scanout, applied in order, then `FrameEnd`; the client presents the frame at `FrameEnd` and acknowledges it
//! with a control [`super::FrameAck`]. Regions are in the scanout's pixels; pixels are BGRX
//! (4 bytes, X ignored), rows top to bottom, no padding between rows.
//!
//! This crate carries the bytes; it does not compress or decode them. A client decompresses a
//! `Zstd` tile into at most `width × height × 4` bytes (a `Palette` tile's zstd indices into
//! at most [`super::palette::packed_len`]) and treats anything else as a broken frame (the zstd
//! frame header states its content size, which makes the bound cheap).

use super::codec::{Put, Reader};
use super::{Channel, ChannelMessage, MAX_DIMENSION, check_region, types};

/// A rectangle in scanout pixels: non-empty, within [`MAX_DIMENSION`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Rect {
    pub x: u32,
    pub y: u32,
    pub width: u32,
    pub height: u32,
}

impl Rect {
    /// Bytes of this rectangle as BGRX pixels.
    pub fn bgrx_len(&self) -> u64 {
        u64::from(self.width) * u64::from(self.height) * 4
    }

    fn put(&self, out: &mut Vec<u8>) {
        out.put_u32(self.x);
        out.put_u32(self.y);
        out.put_u32(self.width);
        out.put_u32(self.height);
    }

    fn read(r: &mut Reader<'_>) -> Result<Self, &'static str> {
        Ok(Rect { x: r.u32()?, y: r.u32()?, width: r.u32()?, height: r.u32()? })
    }

    fn check(&self) -> Result<(), &'static str> {
        check_region(self.x, self.y, self.width, self.height)
    }
}

/// Starts a frame of one scanout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameBegin {
    /// Increases by one per frame, across scanouts, for the whole session.
    pub frame_id: u64,
    pub scanout: u32,
    /// The scanout's size; the frame's regions lie within it.
    pub width: u32,
    pub height: u32,
    /// Server clock (µs) when the guest's update was captured; for latency accounting.
    pub capture_us: u64,
}

/// One region's new pixels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tile {
    pub rect: Rect,
    pub data: TileData,
}

/// How a tile's pixels are encoded; the `encoding` byte on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TileData {
    /// 0: BGRX pixels, exactly `width × height × 4` bytes.
    Raw(Vec<u8>),
    /// 1: one zstd frame of the BGRX pixels (needs capability `ZSTD_TILES`).
    Zstd(Vec<u8>),
    /// 2: every pixel has this BGRX value (little-endian `u32`: B in the low byte).
    Solid(u32),
    /// 3: 2 to 16 colours and an index per pixel ([`super::palette`]), the indices as they are
    /// or as one zstd frame (needs capability `PALETTE_TILES`).
    Palette { colours: Vec<u32>, zstd: bool, indices: Vec<u8> },
}

impl TileData {
    pub fn encoding(&self) -> u8 {
        match self {
            TileData::Raw(_) => 0,
            TileData::Zstd(_) => 1,
            TileData::Solid(_) => 2,
            TileData::Palette { .. } => 3,
        }
    }
}

/// One H.264 access unit (Annex-B byte stream) covering a region (needs capability `H264`).
/// A region's first video update, and the first after a `FrameBegin` with a new size, is a
/// keyframe (IDR).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Video {
    pub rect: Rect,
    pub keyframe: bool,
    pub data: Vec<u8>,
}

/// "Move these pixels": the client copies `src` of its own picture of the scanout (as it is
/// when this message arrives) to `(dst_x, dst_y)`, the two may overlap (needs capability
/// `COPY_RECT`). A scroll is one `Copy` and the newly exposed strip as tiles: the text stays
/// lossless and costs a few bytes (SPICE's COPY_BITS, RDP's ScrBlt, VNC's CopyRect).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Copy {
    pub src: Rect,
    pub dst_x: u32,
    pub dst_y: u32,
}

impl Copy {
    /// Where the pixels land.
    pub fn dst(&self) -> Rect {
        Rect { x: self.dst_x, y: self.dst_y, width: self.src.width, height: self.src.height }
    }
}

/// Ends a frame: the client presents it and acks it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameEnd {
    pub frame_id: u64,
}

/// Everything the display channel carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DisplayMessage {
    FrameBegin(FrameBegin),
    Copy(Copy),
    Tile(Tile),
    Video(Video),
    FrameEnd(FrameEnd),
}

impl ChannelMessage for DisplayMessage {
    const CHANNEL: Channel = Channel::Display;

    fn message_type(&self) -> u16 {
        match self {
            DisplayMessage::FrameBegin(_) => types::FRAME_BEGIN,
            DisplayMessage::Copy(_) => types::COPY,
            DisplayMessage::Tile(_) => types::TILE,
            DisplayMessage::Video(_) => types::VIDEO,
            DisplayMessage::FrameEnd(_) => types::FRAME_END,
        }
    }

    fn validate(&self) -> Result<(), &'static str> {
        match self {
            DisplayMessage::FrameBegin(f) => {
                if f.width == 0 || f.height == 0 || f.width > MAX_DIMENSION || f.height > MAX_DIMENSION {
                    return Err("frame size is not within 1..=16384");
                }
            }
            DisplayMessage::Copy(c) => {
                c.src.check()?;
                c.dst().check()?;
            }
            DisplayMessage::Tile(t) => {
                t.rect.check()?;
                match &t.data {
                    TileData::Raw(pixels) if pixels.len() as u64 != t.rect.bgrx_len() => {
                        return Err("raw tile data is not width × height × 4 bytes");
                    }
                    TileData::Zstd(data) if data.is_empty() => return Err("empty zstd tile data"),
                    TileData::Palette { colours, .. }
                        if !(2..=super::palette::MAX_COLOURS).contains(&colours.len()) =>
                    {
                        return Err("a palette tile has 2 to 16 colours");
                    }
                    TileData::Palette { colours, zstd: false, indices }
                        if indices.len() as u64
                            != super::palette::packed_len(t.rect.width, t.rect.height, colours.len()) =>
                    {
                        return Err("palette tile indices are not the tile's size");
                    }
                    TileData::Palette { zstd: true, indices, .. } if indices.is_empty() => {
                        return Err("empty zstd palette indices");
                    }
                    _ => {}
                }
            }
            DisplayMessage::Video(v) => {
                v.rect.check()?;
                if v.data.is_empty() {
                    return Err("empty video access unit");
                }
            }
            DisplayMessage::FrameEnd(_) => {}
        }
        Ok(())
    }

    fn encode_fields(&self, out: &mut Vec<u8>) {
        match self {
            DisplayMessage::FrameBegin(f) => {
                out.put_u64(f.frame_id);
                out.put_u32(f.scanout);
                out.put_u32(f.width);
                out.put_u32(f.height);
                out.put_u64(f.capture_us);
            }
            DisplayMessage::Copy(c) => {
                c.src.put(out);
                out.put_u32(c.dst_x);
                out.put_u32(c.dst_y);
            }
            DisplayMessage::Tile(t) => {
                t.rect.put(out);
                out.put_u8(t.data.encoding());
                match &t.data {
                    TileData::Solid(bgrx) => out.put_u32(*bgrx),
                    TileData::Palette { colours, zstd, .. } => {
                        out.put_u8(colours.len() as u8);
                        out.put_bool(*zstd);
                        colours.iter().for_each(|&c| out.put_u32(c));
                    }
                    TileData::Raw(_) | TileData::Zstd(_) => {}
                }
            }
            DisplayMessage::Video(v) => {
                v.rect.put(out);
                out.put_bool(v.keyframe);
            }
            DisplayMessage::FrameEnd(f) => out.put_u64(f.frame_id),
        }
    }

    fn payload(&self) -> &[u8] {
        match self {
            DisplayMessage::Tile(Tile {
                data: TileData::Raw(data) | TileData::Zstd(data) | TileData::Palette { indices: data, .. },
                ..
            })
            | DisplayMessage::Video(Video { data, .. }) => data,
            _ => &[],
        }
    }

    fn decode_body(ty: u16, r: &mut Reader<'_>) -> Result<Option<Self>, &'static str> {
        let message = match ty {
            types::FRAME_BEGIN => DisplayMessage::FrameBegin(FrameBegin {
                frame_id: r.u64()?,
                scanout: r.u32()?,
                width: r.u32()?,
                height: r.u32()?,
                capture_us: r.u64()?,
            }),
            types::COPY => {
                DisplayMessage::Copy(Copy { src: Rect::read(r)?, dst_x: r.u32()?, dst_y: r.u32()? })
            }
            types::TILE => {
                let rect = Rect::read(r)?;
                let data = match r.u8()? {
                    0 => TileData::Raw(r.rest()),
                    1 => TileData::Zstd(r.rest()),
                    2 => TileData::Solid(r.u32()?),
                    3 => {
                        let count = r.u8()?;
                        if !(2..=super::palette::MAX_COLOURS).contains(&usize::from(count)) {
                            return Err("a palette tile has 2 to 16 colours");
                        }
                        let zstd = r.bool()?;
                        let colours = (0..count).map(|_| r.u32()).collect::<Result<Vec<_>, _>>()?;
                        TileData::Palette { colours, zstd, indices: r.rest() }
                    }
                    _ => return Err("unknown tile encoding"),
                };
                DisplayMessage::Tile(Tile { rect, data })
            }
            types::VIDEO => {
                DisplayMessage::Video(Video { rect: Rect::read(r)?, keyframe: r.bool()?, data: r.rest() })
            }
            types::FRAME_END => DisplayMessage::FrameEnd(FrameEnd { frame_id: r.u64()? }),
            _ => return Ok(None),
        };
        Ok(Some(message))
    }
}

/// Why a display stream's messages are out of order or out of bounds.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SequenceError {
    #[error("frame {frame_id} begins while frame {open} is still open")]
    NestedFrame { open: u64, frame_id: u64 },
    #[error("frame id {frame_id} does not increase (the previous frame on this stream was {previous})")]
    FrameIdNotIncreasing { previous: u64, frame_id: u64 },
    #[error("a tile or video update arrived outside a frame")]
    UpdateOutsideFrame,
    #[error("region {rect:?} lies outside the {width}×{height} scanout of frame {frame_id}")]
    OutsideScanout { frame_id: u64, rect: Rect, width: u32, height: u32 },
    #[error("FrameEnd for frame {frame_id}, but the open frame is {open:?}")]
    FrameEndMismatch { open: Option<u64>, frame_id: u64 },
}

impl SequenceError {
    /// The QUIC application error code to end the display channel with.
    pub fn error_code(&self) -> u32 {
        crate::error_code::PROTOCOL_VIOLATION
    }
}

/// Checks what one message alone cannot: that a display stream is a sequence of
/// `FrameBegin`, updates, `FrameEnd` with increasing frame ids, and that every update lies
/// within its frame's scanout. A client runs every decoded display message through it before
/// touching its surfaces, so a hostile server can never make it write outside one. An error
/// ends the display channel, like a decode error.
#[derive(Debug, Clone, Default)]
pub struct FrameSequence {
    open: Option<FrameBegin>,
    previous: Option<u64>,
}

impl FrameSequence {
    pub fn new() -> Self {
        Self::default()
    }

    /// The frame between its `FrameBegin` and `FrameEnd`, if any.
    pub fn open_frame(&self) -> Option<&FrameBegin> {
        self.open.as_ref()
    }

    /// `rect` lies within the open frame's scanout.
    fn inside(&self, rect: &Rect) -> Result<(), SequenceError> {
        let frame = self.open.as_ref().ok_or(SequenceError::UpdateOutsideFrame)?;
        let inside = u64::from(rect.x) + u64::from(rect.width) <= u64::from(frame.width)
            && u64::from(rect.y) + u64::from(rect.height) <= u64::from(frame.height);
        if !inside {
            return Err(SequenceError::OutsideScanout {
                frame_id: frame.frame_id,
                rect: *rect,
                width: frame.width,
                height: frame.height,
            });
        }
        Ok(())
    }

    /// Checks the next message of the stream and advances.
    pub fn check(&mut self, message: &DisplayMessage) -> Result<(), SequenceError> {
        match message {
            DisplayMessage::FrameBegin(begin) => {
                if let Some(open) = &self.open {
                    return Err(SequenceError::NestedFrame { open: open.frame_id, frame_id: begin.frame_id });
                }
                if let Some(previous) = self.previous.filter(|&p| begin.frame_id <= p) {
                    return Err(SequenceError::FrameIdNotIncreasing { previous, frame_id: begin.frame_id });
                }
                self.open = Some(*begin);
            }
            DisplayMessage::Tile(Tile { rect, .. }) | DisplayMessage::Video(Video { rect, .. }) => {
                self.inside(rect)?;
            }
            DisplayMessage::Copy(copy) => {
                self.inside(&copy.src)?;
                self.inside(&copy.dst())?;
            }
            DisplayMessage::FrameEnd(end) => match self.open.take() {
                Some(open) if open.frame_id == end.frame_id => self.previous = Some(end.frame_id),
                other => {
                    self.open = other;
                    return Err(SequenceError::FrameEndMismatch {
                        open: other.map(|f| f.frame_id),
                        frame_id: end.frame_id,
                    });
                }
            },
        }
        Ok(())
    }
}
