//! Motion detection: which part of the screen is video-like and worth H.264.
//!
//! Each tile keeps a history of the last [`HISTORY`] frames (changed or not) and the times of
//! its last changes. A tile is *hot* when it changed in at least [`HOT`] of those frames (fast
//! motion), or when its content looks like a picture (many colours, see `colorful` in
//! the encoder) and it changed [`HOT_CHANGES`] times within [`HOT_WINDOW_US`] (a video that
//! plays slower than the session's frame rate, e.g. a slow guest). When enough hot tiles exist,
//! their bounding box (aligned to 16-pixel macroblocks) is the motion region, sent as H.264.
//! The region has hysteresis: it grows at once, but is dropped only after [`COOL_FRAMES`]
//! frames and [`COOL_US`] without any change inside it, at which point the encoder sends the
//! region again losslessly (the lossless refresh). Typing and scrolling text change few tiles,
//! or few times in a row, and are not colourful, so they stay lossless.

use super::tiles::Grid;
use pleiades_virtio::gpu::protocol::Rect;

/// Frames of history per tile.
pub const HISTORY: u32 = 8;
/// Changes within the history that make a tile hot.
pub const HOT: u32 = 5;
/// Hot tiles needed before a region is worth a video stream (a 256x192 area of 64x64 tiles).
pub const MIN_HOT_TILES: usize = 12;
/// Changes of a colourful tile within [`HOT_WINDOW_US`] that make it hot.
pub const HOT_CHANGES: usize = 3;
pub const HOT_WINDOW_US: u64 = 1_500_000;
/// Frames without change inside the region before it is dropped (and refreshed losslessly)…
pub const COOL_FRAMES: u32 = 6;
/// …and as long a time.
pub const COOL_US: u64 = 1_000_000;
/// The region's alignment (H.264 macroblocks; also keeps the encoder's 4:2:0 even).
pub const ALIGN: u32 = 16;

/// Motion state of one screen.
#[derive(Debug, Clone)]
pub struct MotionDetector {
    grid: Grid,
    /// Bit `i`: the tile changed `i` frames ago.
    history: Vec<u8>,
    /// When each tile last changed while colourful, newest first (0: never).
    colourful_changes: Vec<[u64; HOT_CHANGES]>,
    region: Option<Rect>,
    quiet: u32,
    last_change_inside_us: u64,
}

impl MotionDetector {
    pub fn new(grid: Grid) -> Self {
        Self {
            grid,
            history: vec![0; grid.len()],
            colourful_changes: vec![[0; HOT_CHANGES]; grid.len()],
            region: None,
            quiet: 0,
            last_change_inside_us: 0,
        }
    }

    fn hot(&self, i: usize, now_us: u64) -> bool {
        let oldest = self.colourful_changes[i][HOT_CHANGES - 1];
        self.history[i].count_ones() >= HOT || (oldest != 0 && now_us.saturating_sub(oldest) <= HOT_WINDOW_US)
    }

    /// The current motion region.
    pub fn region(&self) -> Option<Rect> {
        self.region
    }

    /// Records one frame's changed tiles (with whether each looks like a picture) at `now_us`.
    /// Returns the region that was dropped this frame (to be refreshed losslessly), if any.
    pub fn update(&mut self, changed: &[(usize, bool)], now_us: u64) -> Option<Rect> {
        for h in &mut self.history {
            *h <<= 1;
        }
        for &(i, colourful) in changed {
            if let Some(h) = self.history.get_mut(i) {
                *h |= 1;
                if colourful {
                    let times = &mut self.colourful_changes[i];
                    times.rotate_right(1);
                    times[0] = now_us.max(1);
                }
            }
        }
        let hot: Vec<usize> = (0..self.history.len()).filter(|&i| self.hot(i, now_us)).collect();
        let hot_box = (hot.len() >= MIN_HOT_TILES)
            .then(|| hot.iter().map(|&i| self.grid.rect(i)).fold(Rect::default(), |a, r| a.union(&r)))
            .map(|r| self.align(r));
        let changed_inside = self.region.is_some_and(|region| {
            changed.iter().any(|&(i, _)| !self.grid.rect(i).intersect(&region).is_empty())
        });
        match self.region {
            Some(region) => {
                if changed_inside {
                    self.quiet = 0;
                    self.last_change_inside_us = now_us;
                } else {
                    self.quiet += 1;
                }
                if self.quiet >= COOL_FRAMES && now_us.saturating_sub(self.last_change_inside_us) >= COOL_US {
                    // Forget the region's past so it does not come straight back.
                    for i in self.grid.covering(&region).collect::<Vec<_>>() {
                        self.history[i] = 0;
                        self.colourful_changes[i] = [0; HOT_CHANGES];
                    }
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
                self.last_change_inside_us = now_us;
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
        let video: Vec<(usize, bool)> =
            grid.covering(&Rect::new(128, 128, 640, 360)).map(|i| (i, false)).collect();
        let at = |frame: u32| u64::from(frame) * 33_333 + 1;
        for frame in 0..HOT {
            assert_eq!(m.update(&video, at(frame)), None);
            assert_eq!(m.region().is_some(), frame + 1 >= HOT, "frame {frame}");
        }
        let region = m.region().unwrap();
        assert!(Rect::new(128, 128, 640, 360).intersect(&region) == Rect::new(128, 128, 640, 360));
        assert_eq!(region.x % ALIGN + region.y % ALIGN + region.width % ALIGN, 0);
        // It stops: the region stays a while, then is dropped for a lossless refresh.
        let stop = at(HOT);
        let mut dropped = None;
        for n in 1..200u32 {
            if let Some(r) = m.update(&[], stop + u64::from(n) * 33_333) {
                dropped = Some((n, r));
                break;
            }
        }
        let (n, r) = dropped.expect("dropped");
        assert_eq!(r, region);
        assert!(u64::from(n + 1) * 33_333 >= COOL_US && n >= COOL_FRAMES);
        assert_eq!(m.region(), None);
        assert_eq!(m.update(&[], stop + 300 * 33_333), None, "it does not come back by itself");
        assert_eq!(m.region(), None);
    }

    #[test]
    fn typing_and_scrolling_stay_lossless() {
        let grid = Grid { width: 1920, height: 1080 };
        let mut m = MotionDetector::new(grid);
        // A cursor moving along a line: each tile changes a few frames in a row.
        for frame in 0..200u32 {
            let x = (frame * 8) % 1920;
            let changed: Vec<(usize, bool)> =
                grid.covering(&Rect::new(x, 500, 8, 16)).map(|i| (i, false)).collect();
            m.update(&changed, u64::from(frame) * 33_333 + 1);
            assert_eq!(m.region(), None, "frame {frame}");
        }
        // A whole-screen scroll of text three times a second.
        for frame in 200..400u32 {
            let changed: Vec<(usize, bool)> =
                if frame % 10 == 0 { (0..grid.len()).map(|i| (i, false)).collect() } else { Vec::new() };
            m.update(&changed, u64::from(frame) * 33_333 + 1);
            assert_eq!(m.region(), None, "frame {frame}");
        }
    }

    #[test]
    fn a_slow_colourful_video_is_still_video() {
        // A 2-frames-per-second video (a slow guest) against 20 session frames a second.
        let grid = Grid { width: 1280, height: 720 };
        let mut m = MotionDetector::new(grid);
        let video: Vec<(usize, bool)> =
            grid.covering(&Rect::new(320, 180, 640, 360)).map(|i| (i, true)).collect();
        for frame in 0..60u32 {
            let changed = if frame % 10 == 0 { video.clone() } else { Vec::new() };
            m.update(&changed, u64::from(frame) * 50_000 + 1);
        }
        assert!(m.region().is_some(), "colourful tiles changing twice a second are video");
    }
}
