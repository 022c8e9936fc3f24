//! Motion detection: which part of the screen is video-like and worth H.264.
//!
//! Each tile keeps a history of the last [`HISTORY`] frames (changed or not). A tile that
//! changed in at least [`HOT`] of them is *hot*. When enough hot tiles exist, their bounding
//! box (aligned to 16-pixel macroblocks) is the motion region, sent as H.264. The region has
//! hysteresis: it grows at once, but is dropped only after [`COOL_FRAMES`] frames without any
//! change inside it, at which point the encoder sends the region again losslessly (the
//! lossless refresh). Typing and scrolling text change few tiles and few times in a row, so
//! they stay lossless.

use super::tiles::Grid;
use crate::devices::virtio::gpu::protocol::Rect;

/// Frames of history per tile.
pub const HISTORY: u32 = 8;
/// Changes within the history that make a tile hot.
pub const HOT: u32 = 5;
/// Hot tiles needed before a region is worth a video stream (a 256x192 area of 64x64 tiles).
pub const MIN_HOT_TILES: usize = 12;
/// Frames without change inside the region before it is dropped (and refreshed losslessly).
pub const COOL_FRAMES: u32 = 6;
const _: () = assert!(COOL_FRAMES > HISTORY - HOT, "a dropped region must not be hot any more");
/// The region's alignment (H.264 macroblocks; also keeps the encoder's 4:2:0 even).
pub const ALIGN: u32 = 16;

/// Motion state of one screen.
#[derive(Debug, Clone)]
pub struct MotionDetector {
    grid: Grid,
    /// Bit `i`: the tile changed `i` frames ago.
    history: Vec<u8>,
    region: Option<Rect>,
    quiet: u32,
}

impl MotionDetector {
    pub fn new(grid: Grid) -> Self {
        Self { grid, history: vec![0; grid.len()], region: None, quiet: 0 }
    }

    /// The current motion region.
    pub fn region(&self) -> Option<Rect> {
        self.region
    }

    /// Records one frame's changed tiles. Returns the region that was dropped this frame (to
    /// be refreshed losslessly), if any.
    pub fn update(&mut self, changed: &[usize]) -> Option<Rect> {
        for h in &mut self.history {
            *h <<= 1;
        }
        for &i in changed {
            if let Some(h) = self.history.get_mut(i) {
                *h |= 1;
            }
        }
        let hot: Vec<usize> =
            (0..self.history.len()).filter(|&i| self.history[i].count_ones() >= HOT).collect();
        let hot_box = (hot.len() >= MIN_HOT_TILES)
            .then(|| hot.iter().map(|&i| self.grid.rect(i)).fold(Rect::default(), |a, r| a.union(&r)))
            .map(|r| self.align(r));
        let changed_inside = self
            .region
            .is_some_and(|region| changed.iter().any(|&i| !self.grid.rect(i).intersect(&region).is_empty()));
        match self.region {
            Some(region) => {
                self.quiet = if changed_inside { 0 } else { self.quiet + 1 };
                if self.quiet >= COOL_FRAMES {
                    // COOL_FRAMES quiet frames also age every tile out of hotness, so the
                    // region does not come straight back from stale history.
                    self.region = None;
                    self.quiet = 0;
                    return Some(region);
                }
                if let Some(hot) = hot_box {
                    self.region = Some(region.union(&hot));
                }
                None
            }
            None => {
                self.region = hot_box;
                self.quiet = 0;
                None
            }
        }
    }

    /// Grows `r` to macroblock boundaries inside the screen (the screen's own size rounded
    /// down to even, so the region stays encodable).
    fn align(&self, r: Rect) -> Rect {
        let x0 = r.x / ALIGN * ALIGN;
        let y0 = r.y / ALIGN * ALIGN;
        let max_w = self.grid.width & !1;
        let max_h = self.grid.height & !1;
        let x1 = (r.x + r.width).div_ceil(ALIGN) * ALIGN;
        let y1 = (r.y + r.height).div_ceil(ALIGN) * ALIGN;
        Rect::new(x0, y0, x1.min(max_w) - x0, y1.min(max_h) - y0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_moving_area_becomes_a_region_and_is_dropped_when_it_stops() {
        let grid = Grid { width: 1280, height: 720 };
        let mut m = MotionDetector::new(grid);
        // A 640x360 area at (128, 128) changes every frame.
        let video: Vec<usize> = grid.covering(&Rect::new(128, 128, 640, 360)).collect();
        for frame in 0..HOT {
            assert_eq!(m.update(&video), None);
            assert_eq!(m.region().is_some(), frame + 1 >= HOT, "frame {frame}");
        }
        let region = m.region().unwrap();
        assert!(Rect::new(128, 128, 640, 360).intersect(&region) == Rect::new(128, 128, 640, 360));
        assert_eq!(region.x % ALIGN + region.y % ALIGN + region.width % ALIGN, 0);
        // It stops: the region stays a few frames, then is dropped for a lossless refresh.
        for _ in 1..COOL_FRAMES {
            assert_eq!(m.update(&[]), None);
        }
        assert_eq!(m.update(&[]), Some(region));
        assert_eq!(m.region(), None);
    }

    #[test]
    fn typing_and_scrolling_stay_lossless() {
        let grid = Grid { width: 1920, height: 1080 };
        let mut m = MotionDetector::new(grid);
        // A cursor moving along a line: each tile changes a few frames in a row.
        for frame in 0..200u32 {
            let x = (frame * 8) % 1920;
            let changed: Vec<usize> = grid.covering(&Rect::new(x, 500, 8, 16)).collect();
            m.update(&changed);
            assert_eq!(m.region(), None, "frame {frame}");
        }
        // A whole-screen scroll now and then (every 10th frame).
        for frame in 0..100u32 {
            let changed: Vec<usize> = if frame % 10 == 0 { (0..grid.len()).collect() } else { Vec::new() };
            m.update(&changed);
            assert_eq!(m.region(), None, "frame {frame}");
        }
    }
}
