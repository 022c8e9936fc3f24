//! Desktop workloads for tests and benchmarks: `pleiades-agent workload NAME`.
//!
//! They draw through the kernel's fbdev device (`/dev/fb0`, the DRM fbdev emulation of the
//! virtio-gpu driver) with plain positioned writes: the emulation tracks the damage and flushes
//! it to the GPU, so the host sees what a desktop's compositor would produce:
//! - `idle`: nothing changes;
//! - `typing`: an 8x16 character appears 15 times a second, left to right, line by line;
//! - `scroll`: a screen of text scrolls by one line 10 times a second;
//! - `video`: a 640x360 natural-looking moving picture at 30 frames a second;
//! - `motion`: the whole screen changes 30 times a second.
//!
//! The pictures ([`desktop`], [`glyph`], [`natural`]) are shared with the host's synthetic
//! desktops (`pleiades-host run --synthetic`), so both produce the same content.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

/// A workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Workload {
    Idle,
    Typing,
    Scroll,
    Video,
    Motion,
}

impl Workload {
    /// Frames per second the workload draws.
    pub fn fps(self) -> u32 {
        match self {
            Self::Idle => 1,
            Self::Typing => 15,
            Self::Scroll => 10,
            Self::Video | Self::Motion => 30,
        }
    }
}

/// A character cell.
pub const GLYPH: (u32, u32) = (8, 16);
/// The video region.
pub const VIDEO: (u32, u32) = (640, 360);

/// Something a workload draws into: B, G, R, X pixels.
pub trait Canvas {
    fn size(&self) -> (u32, u32);
    /// Writes `pixels` (`w * 4` bytes a row) at (`x`, `y`) and makes it visible.
    fn put(&mut self, x: u32, y: u32, w: u32, h: u32, pixels: &[u8]) -> io::Result<()>;
}

/// Draws `workload` for `frames` frames (or until `until` passes).
pub fn run(
    workload: Workload,
    canvas: &mut dyn Canvas,
    until: Instant,
    stop: &dyn Fn() -> bool,
) -> io::Result<u64> {
    let (w, h) = canvas.size();
    draw(canvas, 0, 0, w, h, desktop)?;
    let period = Duration::from_secs_f64(1.0 / f64::from(workload.fps()));
    let mut next = Instant::now();
    let mut frame = 0u64;
    while Instant::now() < until && !stop() {
        next += period;
        frame += 1;
        step(workload, canvas, frame)?;
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        } else {
            next = now;
        }
    }
    Ok(frame)
}

/// Draws frame `frame` of `workload`.
pub fn step(workload: Workload, canvas: &mut dyn Canvas, frame: u64) -> io::Result<()> {
    let (w, h) = canvas.size();
    let n = frame as u32;
    match workload {
        Workload::Idle => Ok(()),
        Workload::Typing => {
            let columns = (w / GLYPH.0).max(1);
            let rows = (h / GLYPH.1).max(1);
            let (col, row) = (n % columns, (n / columns) % rows);
            let (x0, y0) = (col * GLYPH.0, row * GLYPH.1);
            let seed = n.wrapping_mul(2_654_435_761);
            draw(canvas, x0, y0, GLYPH.0, GLYPH.1, |x, y| glyph(seed, x - x0, y - y0))
        }
        Workload::Scroll => draw(canvas, 0, 0, w, h, |x, y| {
            let line = y / GLYPH.1 + n;
            let col = x / GLYPH.0;
            if col < 20 + (line.wrapping_mul(7919) % 180) {
                glyph(line.wrapping_mul(31).wrapping_add(col), x % GLYPH.0, y % GLYPH.1)
            } else {
                [24, 24, 24, 0]
            }
        }),
        Workload::Video => {
            let (vw, vh) = (VIDEO.0.min(w), VIDEO.1.min(h));
            let (x0, y0) = ((w - vw) / 2, (h - vh) / 2);
            let t = frame as f32 / 30.0;
            draw(canvas, x0, y0, vw, vh, |x, y| natural(x - x0, y - y0, t))
        }
        Workload::Motion => {
            let t = frame as f32 / 30.0;
            draw(canvas, 0, 0, w, h, |x, y| natural(x / 3, y / 3, t))
        }
    }
}

fn draw(
    canvas: &mut dyn Canvas,
    x0: u32,
    y0: u32,
    w: u32,
    h: u32,
    f: impl Fn(u32, u32) -> [u8; 4],
) -> io::Result<()> {
    let mut pixels = Vec::with_capacity((w * h * 4) as usize);
    for y in y0..y0 + h {
        for x in x0..x0 + w {
            pixels.extend_from_slice(&f(x, y));
        }
    }
    canvas.put(x0, y0, w, h, &pixels)
}

/// A still desktop background with a window-like panel.
pub fn desktop(x: u32, y: u32) -> [u8; 4] {
    if (100..900).contains(&x) && (80..600).contains(&y) {
        if y < 110 { [180, 120, 60, 0] } else { [245, 245, 245, 0] }
    } else {
        let v = 90 + ((x / 4 + y / 3) % 40) as u8;
        [v, v / 2 + 40, 30, 0]
    }
}

/// A glyph-like pattern: light strokes on a dark terminal background, a different one for
/// each seed (a 6×10 cell of a 64-bit hash of it; an earlier version used four bits of the seed,
/// so a scrolling page alternated between two pictures).
pub fn glyph(seed: u32, gx: u32, gy: u32) -> [u8; 4] {
    if !(3..13).contains(&gy) || !(1..7).contains(&gx) {
        return [24, 24, 24, 0];
    }
    let mut bits = u64::from(seed).wrapping_add(0x9e37_79b9_7f4a_7c15).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    bits ^= bits >> 31;
    // Rows 3–12 take bits in pairs of rows (strokes two pixels tall), columns 1–6 one each.
    let bit = (gy - 3) / 2 * 6 + (gx - 1);
    if (bits >> bit) & 1 == 1 { [220, 220, 220, 0] } else { [24, 24, 24, 0] }
}

/// The side of the precomputed picture the video pans over (a power of two).
const TEXTURE: u32 = 512;

/// Smooth gradients with a little grain, computed once: the still part of the video.
fn texture() -> &'static [[u8; 4]] {
    static PICTURE: std::sync::OnceLock<Vec<[u8; 4]>> = std::sync::OnceLock::new();
    PICTURE.get_or_init(|| {
        (0..TEXTURE * TEXTURE)
            .map(|i| {
                let (x, y) = ((i % TEXTURE) as f32, (i / TEXTURE) as f32);
                let sky = 120.0 + 80.0 * ((x / 90.0).sin() * (y / 70.0).cos());
                let grain = (i.wrapping_mul(2_654_435_761) >> 30) as f32;
                [
                    (sky + grain).min(255.0) as u8,
                    (sky * 0.8 + grain).min(255.0) as u8,
                    (sky * 0.6 + grain).min(255.0) as u8,
                    0,
                ]
            })
            .collect()
    })
}

/// Video-like content at time `t` (seconds): the picture pans and a ball moves over it. Integer
/// work per pixel, so it plays at a useful rate even in a guest under TCG.
pub fn natural(x: u32, y: u32, t: f32) -> [u8; 4] {
    let (pan_x, pan_y) = ((t * 40.0) as u32, (t * 25.0) as u32);
    let mut p = texture()[(((y + pan_y) % TEXTURE) * TEXTURE + (x + pan_x) % TEXTURE) as usize];
    let cx = (320.0 + 200.0 * (t * 0.9).sin()) as i64;
    let cy = (180.0 + 100.0 * (t * 1.3).cos()) as i64;
    let d2 = (i64::from(x) - cx).pow(2) + (i64::from(y) - cy).pow(2);
    if d2 < 3600 {
        let shade = (255 - d2 / 15) as u8;
        p = [p[0] / 2, p[1] / 2 + shade / 2, shade, 0];
    }
    p
}

/// The kernel's framebuffer device, written with `pwrite`.
#[derive(Debug)]
pub struct FbDev {
    file: File,
    width: u32,
    height: u32,
    stride: u64,
}

impl FbDev {
    /// Opens `/dev/fbN` and reads its geometry from `/sys/class/graphics/fbN` under `root`.
    pub fn open(root: &Path, index: u32) -> io::Result<Self> {
        let sys = root.join(format!("sys/class/graphics/fb{index}"));
        let read = |name: &str| {
            std::fs::read_to_string(sys.join(name))
                .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", sys.join(name).display())))
        };
        let bpp: u32 = read("bits_per_pixel")?.trim().parse().map_err(io::Error::other)?;
        if bpp != 32 {
            return Err(io::Error::other(format!(
                "fb{index} has {bpp} bits per pixel; the workloads draw 32"
            )));
        }
        let size = read("virtual_size")?;
        let (w, h) =
            size.trim().split_once(',').ok_or_else(|| io::Error::other(format!("virtual_size {size:?}")))?;
        let stride: u64 = read("stride")?.trim().parse().map_err(io::Error::other)?;
        let file = std::fs::OpenOptions::new().write(true).open(root.join(format!("dev/fb{index}")))?;
        Ok(Self {
            file,
            width: w.parse().map_err(io::Error::other)?,
            height: h.parse().map_err(io::Error::other)?,
            stride,
        })
    }
}

impl Canvas for FbDev {
    fn size(&self) -> (u32, u32) {
        (self.width, self.height)
    }

    /// Whole rows go as one write: the kernel's fbdev emulation (`drm_fb_helper_memory_range_to_clip`,
    /// Linux 6.12) turns a write of exactly one whole line into a damage rectangle of width 0
    /// (the end's offset in its line is 0), so full-width pictures written line by line were
    /// never flushed to the GPU (with the console's cursor blinking, its damage widened theirs
    /// by luck). A write over two lines or more is damaged at full width.
    fn put(&mut self, x: u32, y: u32, w: u32, h: u32, pixels: &[u8]) -> io::Result<()> {
        let row = w as usize * 4;
        if x == 0 && row as u64 == self.stride && h > 1 {
            let rows = &pixels[..(row * h as usize).min(pixels.len())];
            return self.file.write_all_at(rows, u64::from(y) * self.stride);
        }
        for (i, line) in pixels.chunks_exact(row).take(h as usize).enumerate() {
            let at = (u64::from(y) + i as u64) * self.stride + u64::from(x) * 4;
            self.file.write_all_at(line, at)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A canvas in memory that counts what it was given.
    struct Memory {
        w: u32,
        h: u32,
        pixels: Vec<u8>,
        puts: u32,
    }

    impl Canvas for Memory {
        fn size(&self) -> (u32, u32) {
            (self.w, self.h)
        }
        fn put(&mut self, x: u32, y: u32, w: u32, h: u32, pixels: &[u8]) -> io::Result<()> {
            for row in 0..h {
                let at = (((y + row) * self.w + x) * 4) as usize;
                let src = (row * w * 4) as usize;
                self.pixels[at..at + (w * 4) as usize].copy_from_slice(&pixels[src..src + (w * 4) as usize]);
            }
            self.puts += 1;
            Ok(())
        }
    }

    #[test]
    fn workloads_draw_where_they_should() {
        let mut c = Memory { w: 800, h: 600, pixels: vec![0; 800 * 600 * 4], puts: 0 };
        step(Workload::Typing, &mut c, 1).unwrap();
        let changed: Vec<usize> =
            (0..800 * 600).filter(|&i| c.pixels[i * 4..i * 4 + 4] != [0, 0, 0, 0]).collect();
        assert!(changed.iter().all(|&i| (8..16).contains(&(i % 800)) && i / 800 < 16), "one glyph cell");
        let before = c.pixels.clone();
        step(Workload::Video, &mut c, 2).unwrap();
        let region = (0..800 * 600).filter(|&i| c.pixels[i * 4..i * 4 + 4] != before[i * 4..i * 4 + 4]);
        assert!(region.clone().all(|i| (80..720).contains(&(i % 800)) && (120..480).contains(&(i / 800))));
        assert!(region.count() > 100_000, "the video region changed");
        step(Workload::Idle, &mut c, 3).unwrap();
        assert_eq!(c.puts, 2);
    }

    #[test]
    fn glyphs_differ_by_seed_and_a_scrolling_page_never_repeats() {
        let cell =
            |seed| (0..16).flat_map(|gy| (0..8).map(move |gx| glyph(seed, gx, gy))).collect::<Vec<_>>();
        let distinct: std::collections::HashSet<_> = (0..200).map(cell).collect();
        assert!(distinct.len() > 190, "{} distinct glyphs of 200", distinct.len());
        let page = |n| {
            let mut c = Memory { w: 320, h: 200, pixels: vec![0; 320 * 200 * 4], puts: 0 };
            step(Workload::Scroll, &mut c, n).unwrap();
            c.pixels
        };
        let pages: Vec<Vec<u8>> = (1..=8).map(page).collect();
        for (i, a) in pages.iter().enumerate() {
            assert!(pages[i + 1..].iter().all(|b| a != b), "page {} repeats", i + 1);
        }
    }

    #[test]
    fn a_missing_framebuffer_is_a_clear_error() {
        let root = tempfile::tempdir().unwrap();
        let e = FbDev::open(root.path(), 0).unwrap_err();
        assert!(e.to_string().contains("graphics/fb0"), "{e}");
    }
}
