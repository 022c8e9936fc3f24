//! The display channel's receiving end: framebuffers per scanout, tiles and H.264 applied into
//! them, one [`FrameStats`] per finished frame.
//!
//! Sans-IO like the protocol crate: [`DisplayStream::on_message`] takes decoded messages and the
//! client clock as values, so the tests feed it encoded frames directly and the session only
//! moves bytes. Every message goes through the protocol's [`FrameSequence`] before it touches a
//! surface, so a hostile server cannot write outside one.
//!
//! Each scanout has two framebuffers: `working`, which updates land in as they arrive, and
//! `presented`, which changes only at `FrameEnd` (the frame's damaged rectangles are copied
//! over). Snapshots read `presented`, so a PNG never shows half a frame, and the copy costs
//! only what changed. H.264 regions have one OpenH264 decoder per scanout; a picture that fails
//! to decode is logged and counted (the next keyframe repairs it), not fatal.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use openh264::decoder::Decoder;
use openh264::formats::YUVSource;
use pleiades_protocol::transport::error_code;
use pleiades_protocol::wire::scale;
use pleiades_protocol::wire::{
    CopyRect, DisplayMessage, FrameBegin, FrameSequence, MAX_MONITORS, Rect, SequenceError, TileData, Video,
    palette,
};
use serde::Serialize;

/// The largest surface the client allocates, in pixels (8192 × 8192, 256 MiB of BGRX; two
/// buffers per scanout). The protocol allows 16 384 a side; a client may refuse more than it
/// can hold, and says so.
pub const MAX_SURFACE_PIXELS: u64 = 8192 * 8192;
/// The most pixels of all scanouts together (two 8192 × 8192 or sixteen 2896 × 2896 monitors):
/// with two buffers each, at most 1 GiB, whatever a server announces.
pub const MAX_TOTAL_PIXELS: u64 = 2 * MAX_SURFACE_PIXELS;
/// Damaged rectangles remembered per frame before the whole surface counts as damaged.
const MAX_DAMAGE_RECTS: usize = 256;
/// YUV pictures a scanout keeps for the GPU before the oldest is converted on the CPU.
const MAX_GPU_PICTURES: usize = 4;

/// BGRX pixels, rows top to bottom, `width × 4` bytes a row.
#[derive(Clone, PartialEq, Eq)]
pub struct Framebuffer {
    pub width: u32,
    pub height: u32,
    pub pixels: Vec<u8>,
}

impl std::fmt::Debug for Framebuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Framebuffer({}×{})", self.width, self.height)
    }
}

impl Framebuffer {
    /// A black framebuffer. The caller checked the size against [`MAX_SURFACE_PIXELS`].
    pub fn new(width: u32, height: u32) -> Self {
        let len = width as usize * height as usize * 4;
        Self { width, height, pixels: vec![0; len] }
    }

    /// The BGRX value at (x, y), if inside.
    pub fn pixel(&self, x: u32, y: u32) -> Option<[u8; 4]> {
        if x >= self.width || y >= self.height {
            return None;
        }
        let at = (y as usize * self.width as usize + x as usize) * 4;
        self.pixels.get(at..at + 4).and_then(|p| p.try_into().ok())
    }

    /// Byte range of row `row` of `rect`, if the rect lies inside.
    fn row_range(&self, rect: &Rect, row: u32) -> Option<std::ops::Range<usize>> {
        if u64::from(rect.x) + u64::from(rect.width) > u64::from(self.width)
            || u64::from(rect.y) + u64::from(row) >= u64::from(self.height)
            || row >= rect.height
        {
            return None;
        }
        let start = ((rect.y + row) as usize * self.width as usize + rect.x as usize) * 4;
        Some(start..start + rect.width as usize * 4)
    }

    fn fill(&mut self, rect: &Rect, bgrx: u32) {
        let pixel = bgrx.to_le_bytes();
        for row in 0..rect.height {
            if let Some(range) = self.row_range(rect, row)
                && let Some(dst) = self.pixels.get_mut(range)
            {
                for p in dst.chunks_exact_mut(4) {
                    p.copy_from_slice(&pixel);
                }
            }
        }
    }

    /// Copies `src` (exactly `rect`'s BGRX pixels, rows packed) into `rect`.
    fn blit(&mut self, rect: &Rect, src: &[u8]) {
        let row_len = rect.width as usize * 4;
        for (row, line) in (0..rect.height).zip(src.chunks_exact(row_len)) {
            if let Some(range) = self.row_range(rect, row)
                && let Some(dst) = self.pixels.get_mut(range)
            {
                dst.copy_from_slice(line);
            }
        }
    }

    /// Moves `src`'s pixels to `dst` (`src`'s size) within this framebuffer; the two may
    /// overlap (rows are taken in the order that reads each before it is overwritten). Both lie
    /// inside (the sequence check); rows outside are skipped.
    fn copy_within(&mut self, src: &Rect, dst: &Rect) {
        let rows: Box<dyn Iterator<Item = u32>> =
            if dst.y > src.y { Box::new((0..src.height).rev()) } else { Box::new(0..src.height) };
        for row in rows {
            if let (Some(from), Some(to)) = (self.row_range(src, row), self.row_range(dst, row)) {
                self.pixels.copy_within(from, to.start);
            }
        }
    }

    /// Copies `rect` from `other` (same size).
    fn copy_rect_from(&mut self, other: &Framebuffer, rect: &Rect) {
        for row in 0..rect.height {
            if let Some(range) = self.row_range(rect, row)
                && let (Some(dst), Some(src)) = (self.pixels.get_mut(range.clone()), other.pixels.get(range))
            {
                dst.copy_from_slice(src);
            }
        }
    }

    /// The framebuffer as an RGB PNG.
    pub fn write_png(&self, path: &Path) -> std::io::Result<()> {
        let file = std::fs::File::create(path)?;
        let mut writer = std::io::BufWriter::new(file);
        self.encode_png(&mut writer)?;
        writer.flush()
    }

    pub fn encode_png(&self, out: impl Write) -> std::io::Result<()> {
        let mut encoder = png::Encoder::new(out, self.width, self.height);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        encoder.set_compression(png::Compression::Fast);
        let mut writer = encoder.write_header().map_err(std::io::Error::other)?;
        let rgb: Vec<u8> = self.pixels.chunks_exact(4).flat_map(|p| [p[2], p[1], p[0]]).collect();
        writer.write_image_data(&rgb).map_err(std::io::Error::other)?;
        writer.finish().map_err(std::io::Error::other)
    }
}

/// How a frame's pixels travelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Codec {
    /// No tiles or video (a frame that only carries a new size, a keep-alive, or only copies).
    Empty,
    Tiles,
    H264,
    Mixed,
}

/// What the client saw of one frame: one line of `frames.jsonl`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FrameStats {
    pub frame_id: u64,
    pub scanout: u32,
    pub width: u32,
    pub height: u32,
    /// Bytes of the frame on its stream: every message from `FrameBegin` to `FrameEnd`, headers
    /// included.
    pub bytes: u64,
    pub codec: Codec,
    pub tiles: u32,
    pub videos: u32,
    /// `Copy` updates (scrolls and moves) in this frame.
    pub copies: u32,
    /// Video updates that failed to decode in this frame.
    pub decode_errors: u32,
    /// The server's `FrameBegin.capture_us` (its `CLOCK_MONOTONIC`).
    pub capture_us: u64,
    /// Client `CLOCK_MONOTONIC` when the frame's last byte arrived.
    pub received_us: u64,
    /// Client `CLOCK_MONOTONIC` when the frame was presented.
    pub decoded_us: u64,
    /// `decoded_us − capture_us`: capture-to-present latency when client and server share a
    /// kernel (signed: meaningless, possibly negative, across machines).
    pub update_latency_us: i64,
}

/// Why a display stream ended.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DisplayError {
    #[error("display sequence broken: {0}")]
    Sequence(#[from] SequenceError),
    #[error("zstd tile {rect:?} does not decompress to exactly {expected} bytes: {error}")]
    Zstd { rect: Rect, expected: u64, error: String },
    #[error("palette tile {rect:?} is broken: {error}")]
    Palette { rect: Rect, error: String },
    #[error(
        "scanout {scanout} of {width}×{height} is larger than this client's limit of {MAX_SURFACE_PIXELS} pixels"
    )]
    TooLarge { scanout: u32, width: u32, height: u32 },
    #[error(
        "scanout {scanout} of {width}×{height} would take the scanouts over this client's limit of {MAX_TOTAL_PIXELS} pixels in all"
    )]
    TooLargeInAll { scanout: u32, width: u32, height: u32 },
    #[error("frame for scanout {scanout}, but {MAX_MONITORS} scanouts are in use already")]
    TooManyScanouts { scanout: u32 },
}

impl DisplayError {
    /// The QUIC application error code to stop the stream (and close the connection) with.
    pub fn error_code(&self) -> u32 {
        match self {
            DisplayError::Sequence(e) => e.error_code(),
            DisplayError::Zstd { .. } | DisplayError::Palette { .. } => error_code::MALFORMED_MESSAGE,
            DisplayError::TooLarge { .. }
            | DisplayError::TooLargeInAll { .. }
            | DisplayError::TooManyScanouts { .. } => error_code::PROTOCOL_VIOLATION,
        }
    }
}

/// One scanout's pixels and decoder.
struct Surface {
    working: Framebuffer,
    presented: Framebuffer,
    decoder: Option<Decoder>,
    /// Rectangles changed in `working` since the last present; `None` = everything.
    damage: Option<Vec<Rect>>,
    /// For a GPU consumer ([`Displays::drain_for_gpu`]): what it has not uploaded yet.
    gpu: GpuPending,
}

/// What a GPU consumer still has to upload of one scanout. With [`Displays::set_gpu_video`] on,
/// video pictures stay YUV (the GPU converts them) and the BGRX framebuffers are stale under
/// them; `video` keeps the latest picture of each region so the frame can always be rebuilt.
#[derive(Debug, Default)]
struct GpuPending {
    /// Presented BGRX rectangles not uploaded yet; `None`: the whole surface.
    damage: Option<Vec<Rect>>,
    /// Pictures decoded in the open frame (not presented yet).
    video_working: Vec<YuvPicture>,
    /// The latest presented picture per region; `fresh` ones are not uploaded yet.
    video: Vec<(YuvPicture, bool)>,
}

/// A decoded H.264 picture kept in its planes: I420, rows packed (`width`, then `width/2`
/// rounded up for chroma), for the GPU to convert.
#[derive(Clone, PartialEq, Eq)]
pub struct YuvPicture {
    /// Where it goes on the scanout; the picture fills `rect` (clipped to the decoded size).
    pub rect: Rect,
    pub y: Vec<u8>,
    pub u: Vec<u8>,
    pub v: Vec<u8>,
}

impl std::fmt::Debug for YuvPicture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "YuvPicture({:?})", self.rect)
    }
}

impl YuvPicture {
    /// Chroma plane size for the picture's rect.
    pub fn chroma_size(&self) -> (u32, u32) {
        (self.rect.width.div_ceil(2), self.rect.height.div_ceil(2))
    }

    /// Copies a decoded picture's planes, clipped to `rect`; `None` if they are short.
    fn from_source(picture: &impl YUVSource, rect: &Rect) -> Option<Self> {
        let (pic_w, pic_h) = picture.dimensions();
        let (y_stride, u_stride, v_stride) = picture.strides();
        let width = (rect.width as usize).min(pic_w);
        let height = (rect.height as usize).min(pic_h);
        let (cw, ch) = (width.div_ceil(2), height.div_ceil(2));
        let copy = |plane: &[u8], stride: usize, w: usize, h: usize| -> Option<Vec<u8>> {
            let mut out = Vec::with_capacity(w * h);
            for row in 0..h {
                out.extend_from_slice(plane.get(row * stride..row * stride + w)?);
            }
            Some(out)
        };
        Some(Self {
            rect: Rect { x: rect.x, y: rect.y, width: width as u32, height: height as u32 },
            y: copy(picture.y(), y_stride, width, height)?,
            u: copy(picture.u(), u_stride, cw, ch)?,
            v: copy(picture.v(), v_stride, cw, ch)?,
        })
    }

    /// A decoded picture smaller than `rect` (capability `SCALED_VIDEO`), its planes scaled up
    /// to fill it ([`scale::bilinear`], as the protocol says); `None` if they are short.
    fn scaled_from(picture: &impl YUVSource, rect: &Rect) -> Option<Self> {
        let (pic_w, pic_h) = picture.dimensions();
        let (pic_w, pic_h) = (u32::try_from(pic_w).ok()?, u32::try_from(pic_h).ok()?);
        let (y_stride, u_stride, v_stride) = picture.strides();
        let luma = (rect.width, rect.height);
        let chroma = (rect.width.div_ceil(2), rect.height.div_ceil(2));
        let pic_chroma = (pic_w.div_ceil(2), pic_h.div_ceil(2));
        Some(Self {
            rect: *rect,
            y: scale::bilinear(picture.y(), (pic_w, pic_h), y_stride, 1, luma)?,
            u: scale::bilinear(picture.u(), pic_chroma, u_stride, 1, chroma)?,
            v: scale::bilinear(picture.v(), pic_chroma, v_stride, 1, chroma)?,
        })
    }

    /// Converts on the CPU into `fb` (the same matrix as the GPU shader).
    pub fn convert_into(&self, fb: &mut Framebuffer) {
        let width = self.rect.width as usize;
        let (cw, _) = self.chroma_size();
        let cw = cw as usize;
        for row in 0..self.rect.height as usize {
            let y_row = &self.y[row * width..(row + 1) * width];
            let c = (row / 2) * cw;
            let (u_row, v_row) = (&self.u[c..c + cw], &self.v[c..c + cw]);
            if let Some(range) = fb.row_range(&self.rect, row as u32)
                && let Some(dst) = fb.pixels.get_mut(range)
            {
                convert_row(y_row, u_row, v_row, dst);
            }
        }
    }
}

/// What [`Displays::drain_for_gpu`] hands a GPU consumer for one scanout.
#[derive(Debug)]
pub struct GpuUpdate<'a> {
    /// The presented BGRX frame (stale under `videos`).
    pub frame: &'a Framebuffer,
    /// Rectangles of `frame` to upload; `None`: all of it (a new or resized surface).
    pub rects: Option<Vec<Rect>>,
    /// Pictures to convert on top, in order.
    pub videos: Vec<YuvPicture>,
}

fn overlaps(a: &Rect, b: &Rect) -> bool {
    a.x < b.x + b.width && b.x < a.x + a.width && a.y < b.y + b.height && b.y < a.y + a.height
}

impl std::fmt::Debug for Surface {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Surface").field("working", &self.working).finish_non_exhaustive()
    }
}

impl Surface {
    fn new(width: u32, height: u32) -> Self {
        Self {
            working: Framebuffer::new(width, height),
            presented: Framebuffer::new(width, height),
            decoder: None,
            damage: None,
            gpu: GpuPending::default(),
        }
    }

    fn damage(&mut self, rect: Rect) {
        if let Some(list) = &mut self.damage {
            if list.len() >= MAX_DAMAGE_RECTS {
                self.damage = None;
            } else {
                list.push(rect);
            }
        }
    }

    fn present(&mut self) {
        match self.damage.take() {
            None => {
                self.presented = self.working.clone();
                self.gpu.damage = None;
            }
            Some(rects) => {
                for rect in &rects {
                    self.presented.copy_rect_from(&self.working, rect);
                }
                if let Some(pending) = &mut self.gpu.damage {
                    pending.extend(rects);
                    if pending.len() > MAX_DAMAGE_RECTS {
                        self.gpu.damage = None;
                    }
                }
            }
        }
        self.damage = Some(Vec::new());
        for picture in std::mem::take(&mut self.gpu.video_working) {
            self.gpu.video.retain(|(old, _)| old.rect != picture.rect);
            self.gpu.video.push((picture, true));
        }
        // Regions come and go with the motion: the oldest pictures settle into the framebuffers.
        while self.gpu.video.len() > MAX_GPU_PICTURES {
            let (picture, _) = self.gpu.video.remove(0);
            picture.convert_into(&mut self.working);
            picture.convert_into(&mut self.presented);
            if let Some(pending) = &mut self.gpu.damage {
                pending.push(picture.rect);
            }
        }
    }

    /// A tile lands on `rect`: pictures under it that only the GPU has are converted into the
    /// framebuffers first (so the tile draws over the right pixels, and the frame stays whole).
    fn settle_video_under(&mut self, rect: &Rect) {
        let (mut kept, mut under) = (Vec::new(), Vec::new());
        for (picture, fresh) in std::mem::take(&mut self.gpu.video) {
            if overlaps(&picture.rect, rect) { under.push(picture) } else { kept.push((picture, fresh)) }
        }
        self.gpu.video = kept;
        for picture in &under {
            picture.convert_into(&mut self.working);
            picture.convert_into(&mut self.presented);
            if let Some(pending) = &mut self.gpu.damage {
                pending.push(picture.rect);
            }
        }
        let working: Vec<YuvPicture> = std::mem::take(&mut self.gpu.video_working);
        for picture in working {
            if overlaps(&picture.rect, rect) {
                picture.convert_into(&mut self.working);
                self.damage(picture.rect);
            } else {
                self.gpu.video_working.push(picture);
            }
        }
    }
}

/// Every scanout's surfaces, shared by the session's display streams and the recorder.
#[derive(Default)]
pub struct Displays {
    surfaces: BTreeMap<u32, Surface>,
    zstd: Option<zstd::bulk::Decompressor<'static>>,
    scratch: Vec<u8>,
    /// Video updates that failed to decode, over the session.
    pub decode_errors: u64,
    /// Keep video pictures as YUV for the GPU instead of converting them.
    gpu_video: bool,
}

impl std::fmt::Debug for Displays {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Displays").field("surfaces", &self.surfaces).finish_non_exhaustive()
    }
}

impl Displays {
    pub fn new() -> Self {
        Self::default()
    }

    /// The scanouts that have received a frame.
    pub fn scanouts(&self) -> Vec<u32> {
        self.surfaces.keys().copied().collect()
    }

    /// A copy of the last presented frame of `scanout`.
    pub fn snapshot(&self, scanout: u32) -> Option<Framebuffer> {
        self.surfaces.get(&scanout).map(|s| {
            let mut frame = s.presented.clone();
            for (picture, _) in &s.gpu.video {
                picture.convert_into(&mut frame);
            }
            frame
        })
    }

    /// Keeps H.264 pictures in YUV for a GPU consumer (the window) instead of converting them
    /// to BGRX on the CPU; [`Self::drain_for_gpu`] hands them out.
    pub fn set_gpu_video(&mut self, on: bool) {
        self.gpu_video = on;
    }

    /// Hands what changed on `scanout` since the last call to `upload` (under the lock: the
    /// consumer copies what it needs, e.g. into GPU staging memory). `false` if nothing changed
    /// or the scanout is unknown.
    pub fn drain_for_gpu(&mut self, scanout: u32, upload: impl FnOnce(GpuUpdate<'_>)) -> bool {
        let Some(surface) = self.surfaces.get_mut(&scanout) else { return false };
        let rects = surface.gpu.damage.replace(Vec::new());
        let full = rects.is_none();
        let videos: Vec<YuvPicture> = surface
            .gpu
            .video
            .iter_mut()
            .filter(|(_, fresh)| full || *fresh)
            .map(|(picture, fresh)| {
                *fresh = false;
                picture.clone()
            })
            .collect();
        if rects.as_ref().is_some_and(Vec::is_empty) && videos.is_empty() {
            return false;
        }
        upload(GpuUpdate { frame: &surface.presented, rects, videos });
        true
    }

    /// The size of `scanout`'s surface.
    pub fn size(&self, scanout: u32) -> Option<(u32, u32)> {
        self.surfaces.get(&scanout).map(|s| (s.working.width, s.working.height))
    }

    fn begin(&mut self, begin: &FrameBegin) -> Result<&mut Surface, DisplayError> {
        let FrameBegin { scanout, width, height, .. } = *begin;
        if u64::from(width) * u64::from(height) > MAX_SURFACE_PIXELS {
            return Err(DisplayError::TooLarge { scanout, width, height });
        }
        if !self.surfaces.contains_key(&scanout) && self.surfaces.len() >= MAX_MONITORS {
            return Err(DisplayError::TooManyScanouts { scanout });
        }
        let others: u64 = self
            .surfaces
            .iter()
            .filter(|(id, _)| **id != scanout)
            .map(|(_, s)| u64::from(s.working.width) * u64::from(s.working.height))
            .sum();
        if others + u64::from(width) * u64::from(height) > MAX_TOTAL_PIXELS {
            return Err(DisplayError::TooLargeInAll { scanout, width, height });
        }
        let surface = self.surfaces.entry(scanout).or_insert_with(|| Surface::new(width, height));
        if surface.working.width != width || surface.working.height != height {
            // A new size starts over: black, and a new H.264 stream (the server sends a keyframe).
            *surface = Surface::new(width, height);
        }
        Ok(surface)
    }

    fn apply_tile(&mut self, scanout: u32, rect: Rect, data: &TileData) -> Result<(), DisplayError> {
        let Some(surface) = self.surfaces.get_mut(&scanout) else { return Ok(()) };
        if self.gpu_video {
            surface.settle_video_under(&rect);
        }
        match data {
            TileData::Raw(pixels) => surface.working.blit(&rect, pixels),
            TileData::Solid(bgrx) => surface.working.fill(&rect, *bgrx),
            TileData::Zstd(compressed) => {
                let expected = rect.bgrx_len();
                let zstd_error = |error: String| DisplayError::Zstd { rect, expected, error };
                // Bounded by the sequence check: the rect lies within a surface we hold.
                let len = usize::try_from(expected).map_err(|_| zstd_error("too large".into()))?;
                if self.scratch.len() < len {
                    self.scratch.resize(len, 0);
                }
                if self.zstd.is_none() {
                    self.zstd = Some(zstd::bulk::Decompressor::new().map_err(|e| zstd_error(e.to_string()))?);
                }
                let decompressor = self.zstd.as_mut().ok_or_else(|| zstd_error("no decompressor".into()))?;
                let out = &mut self.scratch[..len];
                let got = decompressor
                    .decompress_to_buffer(compressed, out)
                    .map_err(|e| zstd_error(e.to_string()))?;
                if got != len {
                    return Err(zstd_error(format!("got {got} bytes")));
                }
                surface.working.blit(&rect, &self.scratch[..len]);
            }
            TileData::Palette { colours, zstd, indices } => {
                let palette_error = |error: String| DisplayError::Palette { rect, error };
                let expected = palette::packed_len(rect.width, rect.height, colours.len());
                let bgrx = usize::try_from(rect.bgrx_len()).map_err(|_| palette_error("too large".into()))?;
                let packed_len = usize::try_from(expected).map_err(|_| palette_error("too large".into()))?;
                let unpacked;
                let packed: &[u8] = if *zstd {
                    if self.zstd.is_none() {
                        self.zstd =
                            Some(zstd::bulk::Decompressor::new().map_err(|e| palette_error(e.to_string()))?);
                    }
                    let decompressor =
                        self.zstd.as_mut().ok_or_else(|| palette_error("no decompressor".into()))?;
                    // At most the indices' size: a zstd frame claiming more is refused.
                    unpacked = decompressor
                        .decompress(indices, packed_len)
                        .map_err(|e| palette_error(e.to_string()))?;
                    &unpacked
                } else {
                    indices
                };
                if self.scratch.len() < bgrx {
                    self.scratch.resize(bgrx, 0);
                }
                palette::unpack(colours, packed, rect.width, rect.height, &mut self.scratch[..bgrx])
                    .map_err(|e| palette_error(e.to_owned()))?;
                surface.working.blit(&rect, &self.scratch[..bgrx]);
            }
        }
        surface.damage(rect);
        Ok(())
    }

    /// Moves pixels within a surface (a scroll).
    fn apply_copy(&mut self, scanout: u32, copy: &CopyRect) {
        let Some(surface) = self.surfaces.get_mut(&scanout) else { return };
        let dst = copy.dst();
        if self.gpu_video {
            surface.settle_video_under(&copy.src);
            surface.settle_video_under(&dst);
        }
        surface.working.copy_within(&copy.src, &dst);
        surface.damage(dst);
    }

    /// Decodes one access unit into its region; `false` if it produced no picture.
    fn apply_video(&mut self, scanout: u32, video: &Video) -> bool {
        let Some(surface) = self.surfaces.get_mut(&scanout) else { return false };
        if surface.decoder.is_none() {
            match Decoder::new() {
                Ok(decoder) => surface.decoder = Some(decoder),
                Err(error) => {
                    tracing::warn!(%error, "cannot start an H.264 decoder");
                    return false;
                }
            }
        }
        let Some(decoder) = surface.decoder.as_mut() else { return false };
        let picture = match decoder.decode(&video.data) {
            Ok(Some(picture)) => picture,
            Ok(None) => {
                tracing::debug!(scanout, rect = ?video.rect, "H.264 access unit gave no picture");
                return false;
            }
            Err(error) => {
                tracing::warn!(scanout, rect = ?video.rect, %error, "H.264 decode failed");
                return false;
            }
        };
        let (pic_w, pic_h) = picture.dimensions();
        // A scaled region (`SCALED_VIDEO`): the picture fills it, scaled up.
        let scaled = pic_w < video.rect.width as usize || pic_h < video.rect.height as usize;
        if scaled || self.gpu_video {
            let planes = if scaled {
                YuvPicture::scaled_from(&picture, &video.rect)
            } else {
                YuvPicture::from_source(&picture, &video.rect)
            };
            let Some(planes) = planes else { return false };
            if self.gpu_video {
                surface.gpu.video_working.retain(|old| old.rect != planes.rect);
                surface.gpu.video_working.push(planes);
            } else {
                planes.convert_into(&mut surface.working);
                surface.damage(video.rect);
            }
            return true;
        }
        let ok = yuv420_to_bgrx(&picture, &mut surface.working, &video.rect);
        surface.damage(video.rect);
        ok
    }
}

/// Converts a decoded I420 picture into `rect` of `fb` (BT.601 limited range, the matrix
/// OpenH264's RGB→YUV on the host uses). A picture larger than the rect fills the rect with
/// its top-left part (a smaller one is scaled first: [`YuvPicture::scaled_from`]). `false` if
/// the planes are shorter than their strides promise.
fn yuv420_to_bgrx(picture: &impl YUVSource, fb: &mut Framebuffer, rect: &Rect) -> bool {
    let (pic_w, pic_h) = picture.dimensions();
    let (y_stride, u_stride, v_stride) = picture.strides();
    let (y_plane, u_plane, v_plane) = (picture.y(), picture.u(), picture.v());
    let width = (rect.width as usize).min(pic_w);
    let height = (rect.height as usize).min(pic_h);
    if (pic_w, pic_h) != (rect.width as usize, rect.height as usize) {
        tracing::debug!(?rect, pic_w, pic_h, "H.264 picture size differs from its region");
    }
    let region = Rect { x: rect.x, y: rect.y, width: width as u32, height: height as u32 };
    for row in 0..height {
        let y_row = y_plane.get(row * y_stride..row * y_stride + width);
        let chroma = (row / 2, width.div_ceil(2));
        let u_row = u_plane.get(chroma.0 * u_stride..chroma.0 * u_stride + chroma.1);
        let v_row = v_plane.get(chroma.0 * v_stride..chroma.0 * v_stride + chroma.1);
        let (Some(y_row), Some(u_row), Some(v_row)) = (y_row, u_row, v_row) else { return false };
        let Some(range) = fb.row_range(&region, row as u32) else { return false };
        let Some(dst) = fb.pixels.get_mut(range) else { return false };
        convert_row(y_row, u_row, v_row, dst);
    }
    true
}

/// One row: two luma samples share each chroma pair, so the chroma terms are computed once per
/// two pixels (fixed point, 10 fractional bits). Written as plain slice iteration so the
/// compiler can drop the bounds checks and vectorize.
fn convert_row(y_row: &[u8], u_row: &[u8], v_row: &[u8], dst: &mut [u8]) {
    #[inline(always)]
    fn pixel(out: &mut [u8], luma: u8, r_term: i32, g_term: i32, b_term: i32) {
        let c = 1192 * (i32::from(luma) - 16) + 512;
        out[0] = ((c + b_term) >> 10).clamp(0, 255) as u8;
        out[1] = ((c + g_term) >> 10).clamp(0, 255) as u8;
        out[2] = ((c + r_term) >> 10).clamp(0, 255) as u8;
        out[3] = 0;
    }
    let pairs = dst.chunks_mut(8).zip(y_row.chunks(2)).zip(u_row.iter().zip(v_row));
    for ((out, luma), (&u, &v)) in pairs {
        let (u, v) = (i32::from(u) - 128, i32::from(v) - 128);
        let (r_term, g_term, b_term) = (1634 * v, -401 * u - 833 * v, 2066 * u);
        for (out, &luma) in out.chunks_exact_mut(4).zip(luma) {
            pixel(out, luma, r_term, g_term, b_term);
        }
    }
}

/// The frame being received on a stream.
#[derive(Debug)]
struct OpenFrame {
    begin: FrameBegin,
    bytes: u64,
    tiles: u32,
    videos: u32,
    copies: u32,
    decode_errors: u32,
}

/// One display stream's state: its sequence check and the frame in progress.
#[derive(Debug, Default)]
pub struct DisplayStream {
    sequence: FrameSequence,
    open: Option<OpenFrame>,
}

impl DisplayStream {
    pub fn new() -> Self {
        Self::default()
    }

    /// Applies one message. `bytes` is its size on the stream (header included), `received_us`
    /// when the chunk holding its end arrived, `now` the clock read after presenting. Returns the
    /// finished frame's stats at `FrameEnd`; the caller acks it.
    pub fn on_message(
        &mut self,
        displays: &mut Displays,
        message: &DisplayMessage,
        bytes: u64,
        received_us: u64,
        now: impl Fn() -> u64,
    ) -> Result<Option<FrameStats>, DisplayError> {
        self.sequence.check(message)?;
        match message {
            DisplayMessage::FrameBegin(begin) => {
                displays.begin(begin)?;
                self.open = Some(OpenFrame {
                    begin: *begin,
                    bytes,
                    tiles: 0,
                    videos: 0,
                    copies: 0,
                    decode_errors: 0,
                });
            }
            DisplayMessage::Copy(copy) => {
                let Some(open) = self.open.as_mut() else { return Ok(None) };
                open.bytes += bytes;
                open.copies += 1;
                displays.apply_copy(open.begin.scanout, copy);
            }
            DisplayMessage::Tile(tile) => {
                let Some(open) = self.open.as_mut() else { return Ok(None) };
                open.bytes += bytes;
                open.tiles += 1;
                displays.apply_tile(open.begin.scanout, tile.rect, &tile.data)?;
            }
            DisplayMessage::Video(video) => {
                let Some(open) = self.open.as_mut() else { return Ok(None) };
                open.bytes += bytes;
                open.videos += 1;
                if !displays.apply_video(open.begin.scanout, video) {
                    open.decode_errors += 1;
                    displays.decode_errors += 1;
                }
            }
            DisplayMessage::FrameEnd(_) => {
                let Some(open) = self.open.take() else { return Ok(None) };
                if let Some(surface) = displays.surfaces.get_mut(&open.begin.scanout) {
                    surface.present();
                }
                let decoded_us = now().max(received_us);
                let codec = match (open.tiles, open.videos) {
                    (0, 0) => Codec::Empty,
                    (_, 0) => Codec::Tiles,
                    (0, _) => Codec::H264,
                    _ => Codec::Mixed,
                };
                let begin = open.begin;
                return Ok(Some(FrameStats {
                    frame_id: begin.frame_id,
                    scanout: begin.scanout,
                    width: begin.width,
                    height: begin.height,
                    bytes: open.bytes + bytes,
                    codec,
                    tiles: open.tiles,
                    videos: open.videos,
                    copies: open.copies,
                    decode_errors: open.decode_errors,
                    capture_us: begin.capture_us,
                    received_us,
                    decoded_us,
                    update_latency_us: i64::try_from(decoded_us).unwrap_or(i64::MAX)
                        - i64::try_from(begin.capture_us).unwrap_or(i64::MAX),
                }));
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests;
