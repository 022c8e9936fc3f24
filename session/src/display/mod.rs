//! Display encoding: from the GPU's display sink to what goes on the wire.
//!
//! - [`tiles`]: the screen in 64x64 tiles, diffed against what the client holds, each sent as
//!   one colour, zstd or raw B, G, R, X bytes (lossless: text and static content).
//! - [`motion`]: which region is video-like (tiles changing frame after frame).
//! - [`video`]: H.264 (OpenH264) for that region.
//! - [`scroll`]: moves of what the client holds (a scroll), sent as copies.
//! - [`encoder`]: one scanout's encoder for one client, tying the three together, with the
//!   lossless refresh when motion stops.
//!
//! How much to send and how often is the connection controller's decision (bandwidth and RTT
//! estimates in `pleiades-protocol`); this module only encodes what it is told to.

pub mod encoder;
pub mod motion;
pub mod scroll;
pub mod tiles;
pub mod video;

pub use encoder::{DisplayEncoder, EncodedFrame, EncoderSettings};

use pleiades_protocol::wire::{self, DisplayMessage, FrameBegin, FrameEnd};

/// One encoded frame as the display channel carries it (docs/protocol.md): `FrameBegin`, the
/// copies, the tiles, the video update, `FrameEnd`.
pub fn wire_messages(
    frame_id: u64,
    scanout: u32,
    capture_us: u64,
    frame: EncodedFrame,
) -> Vec<DisplayMessage> {
    let rect = |r: pleiades_virtio::gpu::protocol::Rect| wire::Rect {
        x: r.x,
        y: r.y,
        width: r.width,
        height: r.height,
    };
    let mut messages = Vec::with_capacity(frame.copies.len() + frame.tiles.len() + 3);
    messages.push(DisplayMessage::FrameBegin(FrameBegin {
        frame_id,
        scanout,
        width: frame.width,
        height: frame.height,
        capture_us,
    }));
    messages.extend(
        frame.copies.iter().map(|m| {
            DisplayMessage::Copy(wire::CopyRect { src: rect(m.src), dst_x: m.dst_x, dst_y: m.dst_y })
        }),
    );
    messages.extend(frame.tiles.into_iter().map(|t| {
        let data = match t.data {
            tiles::TileData::Solid(p) => wire::TileData::Solid(u32::from_le_bytes(p)),
            tiles::TileData::Zstd(z) => wire::TileData::Zstd(z),
            tiles::TileData::Raw(r) => wire::TileData::Raw(r),
            tiles::TileData::Palette { colours, zstd, indices } => {
                wire::TileData::Palette { colours, zstd, indices }
            }
        };
        DisplayMessage::Tile(wire::Tile { rect: rect(t.rect), data })
    }));
    if let Some(v) = frame.video {
        messages.push(DisplayMessage::Video(wire::Video {
            rect: rect(v.rect),
            keyframe: v.keyframe,
            data: v.data,
        }));
    }
    messages.push(DisplayMessage::FrameEnd(FrameEnd { frame_id }));
    messages
}
