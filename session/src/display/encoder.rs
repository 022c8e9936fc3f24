//! The per-connection display encoder: damage in, tiles and H.264 out.
//!
//! Each call gets the consumer's up-to-date copy of a scanout and the damage since the last
//! call (from the [`DisplaySink`](pleiades_virtio::gpu::DisplaySink)). Damaged tiles
//! whose pixels differ from what the client holds losslessly are candidates; the
//! [`MotionDetector`] decides which part of the screen is video-like. Inside the motion region
//! the encoder sends H.264 and marks those tiles lossy; outside it, lossless tiles. When the
//! region goes quiet, its tiles are sent again losslessly (the lossless refresh), so a still
//! screen always converges to pixel-exact.
//!
//! Before any of that, a damaged area whose new picture is what the client holds moved up or
//! down ([`scroll`](super::scroll)) becomes a copy: the client moves the rows itself and only
//! the newly exposed strip goes as tiles, so scrolling text stays lossless and small (with
//! capability `COPY_RECT`; never over pixels the client holds as H.264).
//!
//! **A CPU budget** ([`EncoderSettings::cpu_budget_percent`], per desktop, set on the host):
//! the encoder measures the CPU time of each H.264 frame (its thread's CPU clock, so time spent
//! waiting for a busy CPU does not count) and spaces the region's frames so that they use at most
//! the budget's share of one core. It adapts in this order:
//! 1. **frame rate**: the region's frames come at most every `cost / budget` (a 6 ms frame on a
//!    25 % budget: one per 24 ms, about 40 fps), down to [`MIN_VIDEO_FPS`]; damage in the region
//!    waits (the newest picture is encoded when its turn comes, nothing queues);
//! 2. **region scale**: past that floor, the region is encoded at half its width and height
//!    and the client scales it up (capability `SCALED_VIDEO`; [`scale::SCALE_STEPS`]): a
//!    quarter of the pixels, about a third of the CPU (resampling included). A step is a new
//!    H.264 stream (a keyframe), so the scale moves at most once per [`SCALE_HOLD`] frames, and
//!    back up only when the larger picture's expected cost (by pixel count) fits the floor with
//!    room to spare;
//! 3. **quality**: at the smallest scale (or for a client without `SCALED_VIDEO`), the bitrate
//!    steps down (to a quarter at most), which makes each frame cheaper to encode. On the way
//!    back, quality comes up first, then the scale.
//!
//! Everything outside the region — typing, menus, text — is never held back: lossless tiles go
//! out in the frame they were damaged in, and when tiles and a region frame are both due, the
//! tiles go first in a frame of their own and the H.264 frame follows in the next, so a key
//! press never waits for a video frame to be encoded.

use super::motion::MotionDetector;
use super::scroll::{self, Move};
use super::tiles::{self, Grid, Tile};
use super::video::{RegionEncoder, VideoFrame};
use pleiades_protocol::wire::scale;
use pleiades_virtio::gpu::Framebuffer;
use pleiades_virtio::gpu::protocol::Rect;

/// What the connection's controller allows now.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EncoderSettings {
    /// H.264 bitrate for the motion region, bits per second.
    pub video_bitrate: u32,
    /// The frame rate the controller paces to (a hint for the H.264 rate control).
    pub fps: f32,
    /// Whether the client decodes H.264 (else everything is lossless).
    pub video: bool,
    /// Whether the client applies `Copy` updates (scrolls sent as moves).
    pub copy: bool,
    /// The share of one CPU core (percent) H.264 encoding may use; 0: no limit.
    pub cpu_budget_percent: u32,
    /// Whether the client takes palette tiles (`PALETTE_TILES`).
    pub palette: bool,
    /// Whether the client scales a smaller video picture up to its region (`SCALED_VIDEO`).
    pub scale: bool,
}

impl Default for EncoderSettings {
    fn default() -> Self {
        Self {
            video_bitrate: 4_000_000,
            fps: 30.0,
            video: true,
            copy: true,
            cpu_budget_percent: 0,
            palette: true,
            scale: true,
        }
    }
}

/// The lowest frame rate the CPU budget slows the motion region to before it lowers quality.
pub const MIN_VIDEO_FPS: u64 = 5;
/// The lowest share of the wanted bitrate the CPU budget cuts quality to, in percent.
const MIN_QUALITY_PERCENT: u64 = 25;
/// Region frames between two scale steps (each step restarts the stream with a keyframe, and
/// the smoothed cost needs a few frames to show the new size).
pub const SCALE_HOLD: u32 = 8;

/// This thread's CPU time (µs): what an H.264 frame cost, without the time spent waiting for a
/// CPU on a busy host.
fn thread_cpu_us() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID).map_or(0, |t| {
        (t.tv_sec() as u64).saturating_mul(1_000_000).saturating_add(t.tv_nsec() as u64 / 1_000)
    })
}

/// One frame's updates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedFrame {
    pub width: u32,
    pub height: u32,
    /// Moves the client makes first, in order.
    pub copies: Vec<Move>,
    pub tiles: Vec<Tile>,
    pub video: Option<VideoFrame>,
}

impl EncodedFrame {
    /// Payload bytes (tiles and video).
    pub fn bytes(&self) -> usize {
        self.tiles.iter().map(|t| t.data.len()).sum::<usize>()
            + self.video.as_ref().map_or(0, |v| v.data.len())
    }
}

/// Distinct colours (of 256 samples) above which a tile looks like a picture, not text or UI.
const COLOURFUL: usize = 48;

/// Whether `rect` of `frame` looks like a picture: many distinct colours in a sample of its
/// pixels. Text and UI (even antialiased) use a few dozen at most.
fn colourful(frame: &Framebuffer, rect: Rect) -> bool {
    let mut seen = std::collections::HashSet::with_capacity(64);
    let stride = frame.stride();
    for sy in 0..16 {
        for sx in 0..16 {
            let (x, y) = (rect.x + sx * rect.width / 16, rect.y + sy * rect.height / 16);
            let at = y as usize * stride + x as usize * 4;
            seen.insert([frame.pixels[at], frame.pixels[at + 1], frame.pixels[at + 2]]);
            if seen.len() > COLOURFUL {
                return true;
            }
        }
    }
    false
}

/// Re-create the H.264 stream when the wanted bitrate moved by more than this factor.
const BITRATE_SLACK: f64 = 1.5;

/// The display encoder of one scanout for one client.
#[derive(Debug)]
pub struct DisplayEncoder {
    grid: Grid,
    /// What the client holds losslessly.
    sent: Framebuffer,
    /// Tiles the client holds as H.264 (lossy) pixels.
    lossy: Vec<bool>,
    motion: MotionDetector,
    video: Option<RegionEncoder>,
    /// Everything must be sent (new client, new size).
    full: bool,
    /// The CPU budget's state for the motion region.
    budget: VideoBudget,
    /// Where H.264 frames' CPU time is read (the thread's CPU clock; a fake one in tests).
    cpu_clock: fn() -> u64,
}

/// The motion region under the CPU budget: what it costs, when its last frame went, whether
/// it has damage waiting for its turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct VideoBudget {
    /// CPU time of one H.264 frame (µs), smoothed (1/4 of each new sample).
    cost_us: Option<u64>,
    last_us: Option<u64>,
    /// The region changed since its last frame (deferred by the budget or by tiles going first).
    pending: bool,
    /// The bitrate share the budget allows, percent.
    quality_percent: u64,
    /// Each side of the region as encoded, percent (one of [`scale::SCALE_STEPS`]).
    scale_percent: u32,
    /// Region frames since the scale last moved.
    since_scale: u32,
}

impl Default for VideoBudget {
    fn default() -> Self {
        Self {
            cost_us: None,
            last_us: None,
            pending: false,
            quality_percent: 100,
            scale_percent: 100,
            since_scale: SCALE_HOLD,
        }
    }
}

impl VideoBudget {
    /// The least time between two H.264 frames the budget allows (µs), without the floor.
    fn interval_us(&self, budget_percent: u32) -> u64 {
        match (self.cost_us, budget_percent) {
            (Some(cost), percent) if percent > 0 => cost.saturating_mul(100) / u64::from(percent),
            _ => 0,
        }
    }

    /// Whether a region frame may be encoded at `now_us`.
    fn due(&self, budget_percent: u32, now_us: u64) -> bool {
        let interval = self.interval_us(budget_percent).min(1_000_000 / MIN_VIDEO_FPS);
        self.last_us.is_none_or(|last| now_us.saturating_sub(last) >= interval)
    }

    /// Records a frame that cost `cost_us` at `now_us`. When even the lowest frame rate would
    /// exceed the budget: the scale steps down (where `may_scale`), then quality; when the budget
    /// has room again: quality steps up, then the scale.
    fn on_frame(&mut self, cost_us: u64, budget_percent: u32, may_scale: bool, now_us: u64) {
        self.cost_us = Some(self.cost_us.map_or(cost_us, |c| (3 * c + cost_us) / 4));
        self.last_us = Some(now_us);
        self.pending = false;
        self.since_scale = self.since_scale.saturating_add(1);
        if budget_percent == 0 {
            self.quality_percent = 100;
            self.rescale(100);
            return;
        }
        let floor_interval = 1_000_000 / MIN_VIDEO_FPS;
        let interval = self.interval_us(budget_percent);
        let steps = scale::SCALE_STEPS;
        let at = steps.iter().position(|&s| s == self.scale_percent).unwrap_or(0);
        let settled = self.since_scale >= SCALE_HOLD;
        if !may_scale && self.scale_percent != 100 {
            self.rescale(100);
        } else if interval > floor_interval {
            match steps.get(at + 1) {
                Some(&smaller) if may_scale => {
                    if settled {
                        self.rescale(smaller);
                    }
                }
                _ => self.quality_percent = (self.quality_percent * 4 / 5).max(MIN_QUALITY_PERCENT),
            }
        } else if interval < floor_interval / 2 {
            if self.quality_percent < 100 {
                self.quality_percent = (self.quality_percent * 11 / 10 + 1).min(100);
            } else if let Some(&larger) = at.checked_sub(1).and_then(|i| steps.get(i))
                && settled
            {
                // Back up only when the larger picture's expected cost fits with room to spare
                // (no step down and up again every few frames).
                let ratio = |s: u32| u64::from(s) * u64::from(s);
                let expected = interval * ratio(larger) / ratio(self.scale_percent);
                if expected < floor_interval * 3 / 4 {
                    self.rescale(larger);
                }
            }
        }
    }

    /// Moves the scale to `percent`; the smoothed cost follows the pixel count.
    fn rescale(&mut self, percent: u32) {
        if percent == self.scale_percent {
            return;
        }
        let area = |s: u32| u64::from(s) * u64::from(s);
        self.cost_us = self.cost_us.map(|c| c * area(percent) / area(self.scale_percent).max(1));
        self.scale_percent = percent;
        self.since_scale = 0;
    }
}

impl DisplayEncoder {
    pub fn new(width: u32, height: u32) -> Self {
        let grid = Grid { width, height };
        Self {
            grid,
            sent: Framebuffer::new(width, height),
            lossy: vec![false; grid.len()],
            motion: MotionDetector::new(grid),
            video: None,
            full: true,
            budget: VideoBudget::default(),
            cpu_clock: thread_cpu_us,
        }
    }

    /// When the motion region's waiting change should be encoded (µs, the caller's clock):
    /// call [`Self::encode`] then, damage or not. `None`: nothing waits.
    /// `cpu_budget_percent` is [`EncoderSettings::cpu_budget_percent`].
    pub fn next_due_us(&self, cpu_budget_percent: u32) -> Option<u64> {
        if !self.budget.pending {
            return None;
        }
        let interval = self.budget.interval_us(cpu_budget_percent).min(1_000_000 / MIN_VIDEO_FPS);
        Some(self.budget.last_us.map_or(0, |last| last.saturating_add(interval)))
    }

    /// The motion region's measured CPU cost per H.264 frame (µs), the bitrate share the
    /// budget allows now (percent) and the scale of each side (percent).
    pub fn video_cost(&self) -> (Option<u64>, u64, u32) {
        (self.budget.cost_us, self.budget.quality_percent, self.budget.scale_percent)
    }

    /// The client needs the whole screen again (it connected or reconnected).
    pub fn refresh_all(&mut self) {
        self.full = true;
        if let Some(v) = &mut self.video {
            v.force_keyframe();
        }
    }

    /// The current motion region, if any.
    pub fn motion_region(&self) -> Option<Rect> {
        self.motion.region()
    }

    /// Encodes what changed in `frame` within `damage`. `None`: nothing to send.
    /// `now_us` is the time of the frame (motion detection is partly time-based).
    pub fn encode(
        &mut self,
        frame: &Framebuffer,
        damage: &[Rect],
        settings: &EncoderSettings,
        now_us: u64,
    ) -> Result<Option<EncodedFrame>, String> {
        if (frame.width, frame.height) != (self.grid.width, self.grid.height) {
            *self = Self::new(frame.width, frame.height);
        }
        let grid = self.grid;
        let copies = if settings.copy && !self.full { self.find_moves(frame, damage) } else { Vec::new() };
        let mut candidates = vec![false; grid.len()];
        if self.full {
            candidates.fill(true);
        } else {
            for r in damage {
                grid.covering(r).for_each(|i| candidates[i] = true);
            }
        }
        let changed: Vec<usize> = (0..grid.len())
            .filter(|&i| candidates[i] && (self.full || !tiles::same(frame, &self.sent, grid.rect(i))))
            .collect();
        let refresh = if self.full {
            None
        } else {
            // The strip a scroll exposed changes every frame while it scrolls: text coming in,
            // not video.
            let exposed: Vec<Rect> = copies.iter().filter_map(Move::exposed).collect();
            let with_content: Vec<(usize, bool)> = changed
                .iter()
                .filter(|&&i| {
                    !exposed.iter().any(|e| {
                        let common = e.intersect(&grid.rect(i));
                        common.width > 0 && common.height > 0
                    })
                })
                .map(|&i| (i, colourful(frame, grid.rect(i))))
                .collect();
            self.motion.update(&with_content, now_us)
        };

        let region = if settings.video && !self.full { self.motion.region() } else { None };
        let in_region = |i: usize| region.is_some_and(|r| r.intersect(&grid.rect(i)) == grid.rect(i));

        let mut send: Vec<usize> = changed.iter().copied().filter(|&i| !in_region(i)).collect();
        if let Some(dropped) = refresh {
            send.extend(grid.covering(&dropped).filter(|&i| self.lossy[i]));
        }
        // A tile left lossy by a region that moved on is refreshed too.
        send.extend((0..grid.len()).filter(|&i| self.lossy[i] && !in_region(i)));
        send.sort_unstable();
        send.dedup();

        let mut video = None;
        match region {
            Some(rect) if self.budget.pending || changed.iter().any(|&i| in_region(i)) => {
                // Tiles first, in a frame of their own: a key press never waits for H.264. Once
                // only: a region already waiting goes with the next tiles (never starved).
                let tiles_first = !self.budget.pending && (!send.is_empty() || !copies.is_empty());
                if tiles_first || !self.budget.due(settings.cpu_budget_percent, now_us) {
                    self.budget.pending = true;
                } else {
                    let started = (self.cpu_clock)();
                    video = Some(self.encode_video(frame, rect, settings)?);
                    let cost = (self.cpu_clock)().saturating_sub(started);
                    self.budget.on_frame(cost, settings.cpu_budget_percent, settings.scale, now_us);
                    for i in (0..grid.len()).filter(|&i| in_region(i)) {
                        self.lossy[i] = true;
                    }
                }
            }
            Some(_) => {}
            // The region is gone: its tiles go losslessly (above), nothing waits.
            None => self.budget.pending = false,
        }
        let full = self.full;
        let tiles: Vec<Tile> = send
            .into_iter()
            .filter_map(|i| {
                let rect = grid.rect(i);
                // A lossless tile's changed part only; a lossy one is refreshed whole.
                let rect = if full || self.lossy[i] {
                    Some(rect)
                } else {
                    tiles::changed_bounds(frame, &self.sent, rect)
                };
                self.lossy[i] = false;
                rect.map(|r| tiles::encode(frame, r, settings.palette))
            })
            .collect();
        for tile in &tiles {
            tiles::apply(&mut self.sent, tile)?;
        }
        self.full = false;
        if tiles.is_empty() && video.is_none() && copies.is_empty() {
            return Ok(None);
        }
        Ok(Some(EncodedFrame { width: grid.width, height: grid.height, copies, tiles, video }))
    }

    /// The moves in `damage` (each damaged area on its own), already made in what the client
    /// holds: the tile diff that follows sends only what they do not explain. Areas touching
    /// tiles the client holds as H.264 are left to the tiles (a copy would spread lossy pixels).
    fn find_moves(&mut self, frame: &Framebuffer, damage: &[Rect]) -> Vec<Move> {
        let mut moves = Vec::new();
        for area in damage {
            if area.height < scroll::MIN_ROWS {
                continue;
            }
            if self.grid.covering(area).any(|i| self.lossy[i]) {
                continue;
            }
            if let Some(m) = scroll::detect(&self.sent, frame, *area)
                && let Some(m) = m.within(area)
            {
                scroll::apply(&mut self.sent, &m);
                moves.push(m);
            }
        }
        moves
    }

    fn encode_video(
        &mut self,
        frame: &Framebuffer,
        rect: Rect,
        s: &EncoderSettings,
    ) -> Result<VideoFrame, String> {
        // The controller's bitrate, cut by the CPU budget when even its lowest frame rate is
        // too expensive.
        let bitrate = u64::from(s.video_bitrate) * self.budget.quality_percent / 100;
        let bitrate = u32::try_from(bitrate).unwrap_or(s.video_bitrate);
        let scale = if s.scale { self.budget.scale_percent } else { 100 };
        let stale = self.video.as_ref().is_none_or(|v| {
            let ratio = f64::from(v.bitrate()) / f64::from(bitrate.max(1));
            v.rect() != rect
                || v.scale_percent() != scale
                || !(1.0 / BITRATE_SLACK..=BITRATE_SLACK).contains(&ratio)
        });
        if stale {
            self.video = Some(RegionEncoder::new(rect, bitrate, s.fps, scale)?);
        }
        let encoder = self.video.as_mut().ok_or("no H.264 encoder")?;
        encoder.encode(frame)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::display::motion::HOT;

    fn paint(frame: &mut Framebuffer, r: Rect, seed: u32) {
        for y in r.y..r.y + r.height {
            for x in r.x..r.x + r.width {
                let at = (y * frame.width + x) as usize * 4;
                let v = (x.wrapping_mul(31) ^ y.wrapping_mul(17)).wrapping_add(seed * 7);
                frame.pixels[at..at + 4].copy_from_slice(&[v as u8, (v >> 3) as u8, (v >> 5) as u8, 0]);
            }
        }
    }

    /// What a client that applies every tile (and ignores video) would hold.
    fn client_after(frames: &[EncodedFrame], width: u32, height: u32) -> Framebuffer {
        let mut fb = Framebuffer::new(width, height);
        for f in frames {
            for m in &f.copies {
                scroll::apply(&mut fb, m);
            }
            for t in &f.tiles {
                tiles::apply(&mut fb, t).unwrap();
            }
        }
        fb
    }

    #[test]
    fn the_first_frame_is_complete_and_unchanged_damage_sends_nothing() {
        let mut frame = Framebuffer::new(200, 100);
        paint(&mut frame, Rect::new(0, 0, 200, 100), 1);
        let mut enc = DisplayEncoder::new(200, 100);
        let s = EncoderSettings::default();
        let first = enc.encode(&frame, &[], &s, 1).unwrap().unwrap();
        assert_eq!(first.tiles.len(), 4 * 2);
        assert_eq!(client_after(std::slice::from_ref(&first), 200, 100), frame);
        assert_eq!(
            enc.encode(&frame, &[Rect::new(0, 0, 200, 100)], &s, 2).unwrap(),
            None,
            "damage without change"
        );
        paint(&mut frame, Rect::new(70, 10, 8, 16), 2);
        let typed = enc.encode(&frame, &[Rect::new(70, 10, 8, 16)], &s, 3).unwrap().unwrap();
        assert_eq!(typed.tiles.len(), 1);
        assert!(typed.video.is_none());
    }

    #[test]
    fn motion_goes_to_video_and_a_still_screen_converges_losslessly() {
        let (w, h) = (640, 480);
        let video_rect = Rect::new(64, 64, 384, 256);
        let mut frame = Framebuffer::new(w, h);
        let mut enc = DisplayEncoder::new(w, h);
        let s = EncoderSettings { video_bitrate: 1_000_000, ..EncoderSettings::default() };
        let mut sent = vec![enc.encode(&frame, &[], &s, 1).unwrap().unwrap()];
        let mut video_frames = 0;
        for n in 0..(HOT + 10) {
            paint(&mut frame, video_rect, n + 10);
            let out = enc.encode(&frame, &[video_rect], &s, u64::from(n) * 33_333 + 1).unwrap().unwrap();
            video_frames += usize::from(out.video.is_some());
            sent.push(out);
        }
        assert!(video_frames >= 10, "the moving area went to H.264 ({video_frames} frames)");
        let region = enc.motion_region().unwrap();
        assert!(region.intersect(&video_rect) == video_rect);
        // Motion stops: within COOL_FRAMES the region is refreshed losslessly.
        for n in 0..100u64 {
            if let Some(out) = enc.encode(&frame, &[], &s, 2_000_000 + n * 33_333).unwrap() {
                sent.push(out);
            }
        }
        assert_eq!(enc.motion_region(), None);
        assert_eq!(client_after(&sent, w, h), frame, "pixel-exact after the refresh");
    }

    #[test]
    fn a_horizontal_scroll_goes_as_copies_and_stays_pixel_exact() {
        let (w, h) = (640, 240);
        let wide = scroll::text_page(w + 400, h, 0);
        let view = |offset: u32| {
            let mut frame = Framebuffer::new(w, h);
            let (stride, wide_stride) = (frame.stride(), wide.stride());
            for y in 0..h as usize {
                let from = y * wide_stride + offset as usize * 4;
                frame.pixels[y * stride..(y + 1) * stride].copy_from_slice(&wide.pixels[from..from + stride]);
            }
            frame
        };
        let whole = [Rect::new(0, 0, w, h)];
        let s = EncoderSettings::default();
        let mut enc = DisplayEncoder::new(w, h);
        let mut sent = vec![enc.encode(&view(0), &[], &s, 1).unwrap().unwrap()];
        for n in 1..=40u32 {
            let frame = view(n * 8);
            let out = enc.encode(&frame, &whole, &s, u64::from(n) * 16_667).unwrap().unwrap();
            assert!(
                out.copies.len() == 1 && out.copies[0].dst_x == 0 && out.copies[0].src.x == 8,
                "frame {n}: {:?}",
                out.copies
            );
            assert!(out.video.is_none());
            sent.push(out);
            assert_eq!(client_after(&sent, w, h), frame, "frame {n} is not pixel-exact");
        }
    }

    thread_local! {
        /// A fake CPU clock: each reading advances it by the step, so an H.264 frame (two
        /// readings) "costs" one step.
        static CPU: std::cell::Cell<(u64, u64)> = const { std::cell::Cell::new((0, 0)) };
    }

    fn fake_cpu_clock() -> u64 {
        CPU.with(|c| {
            let (now, step) = c.get();
            c.set((now + step / 2, step));
            now
        })
    }

    /// An encoder whose motion region covers `video_rect` (a moving picture for `HOT + 10`
    /// frames at 30 fps), its H.264 frames costing `cost_us` of CPU each; the time after.
    fn with_video(
        frame: &mut Framebuffer,
        video_rect: Rect,
        cost_us: u64,
        s: &EncoderSettings,
    ) -> (DisplayEncoder, u64) {
        CPU.with(|c| c.set((0, cost_us * 2)));
        let mut enc = DisplayEncoder::new(frame.width, frame.height);
        enc.cpu_clock = fake_cpu_clock;
        enc.encode(frame, &[], s, 1).unwrap();
        let mut now = 1;
        for n in 0..(HOT + 10) {
            now = u64::from(n) * 33_333 + 1;
            paint(frame, video_rect, n + 10);
            enc.encode(frame, &[video_rect], s, now).unwrap();
        }
        assert!(enc.motion_region().is_some_and(|r| r.intersect(&video_rect) == video_rect));
        (enc, now)
    }

    #[test]
    fn typing_goes_first_and_the_video_frame_follows() {
        let (w, h) = (640, 480);
        let video_rect = Rect::new(64, 64, 384, 256);
        let mut frame = Framebuffer::new(w, h);
        let s = EncoderSettings { video_bitrate: 1_000_000, ..EncoderSettings::default() };
        let (mut enc, mut now) = with_video(&mut frame, video_rect, 3_000, &s);
        for n in 0..10u32 {
            now += 33_333;
            // A key press and a video frame in the same damage.
            // A glyph: a few colours, never video-like.
            let key = Rect::new(8 * n, 456, 8, 16);
            for y in key.y..key.y + key.height {
                for x in key.x..key.x + key.width {
                    let at = (y * w + x) as usize * 4;
                    let ink = if (x + y) % 3 == 0 { 255 } else { 30 };
                    frame.pixels[at..at + 4].copy_from_slice(&[ink, ink, ink, 0]);
                }
            }
            paint(&mut frame, video_rect, n + 500);
            let first = enc.encode(&frame, &[key, video_rect], &s, now).unwrap().unwrap();
            assert!(
                first.video.is_none(),
                "frame {n}: the key press waited for H.264 ({:?} tiles, region {:?})",
                first.tiles.iter().map(|t| t.rect).collect::<Vec<_>>(),
                enc.motion_region()
            );
            assert_eq!(first.tiles.len(), 1);
            assert!(enc.next_due_us(0).is_some_and(|due| due <= now), "the video frame is due at once");
            let second = enc.encode(&frame, &[], &s, now).unwrap().unwrap();
            assert!(second.video.is_some() && second.tiles.is_empty());
            assert_eq!(enc.next_due_us(0), None);
        }
    }

    #[test]
    fn the_cpu_budget_lowers_the_frame_rate_then_the_scale_then_the_quality() {
        let (w, h) = (640, 480);
        let video_rect = Rect::new(64, 64, 384, 256);
        // The region changes every 5 ms for 5 s; count the H.264 frames of the last second (the
        // steps down take a few seconds at 5 fps).
        // The fake frames cost the same at any scale or quality: every step is taken.
        let run = |cost_us: u64, budget: u32, scale: bool| {
            let mut frame = Framebuffer::new(w, h);
            let s = EncoderSettings {
                video_bitrate: 1_000_000,
                cpu_budget_percent: budget,
                scale,
                ..EncoderSettings::default()
            };
            let (mut enc, start) = with_video(&mut frame, video_rect, cost_us, &s);
            let mut frames = 0;
            for n in 0..1_000u32 {
                let now = start + u64::from(n) * 5_000;
                paint(&mut frame, video_rect, n + 100);
                let out = enc.encode(&frame, &[video_rect], &s, now).unwrap();
                if n >= 800 && out.is_some_and(|o| o.video.is_some()) {
                    frames += 1;
                }
                assert!(enc.motion_region().is_some());
            }
            let encoded = enc.video.as_ref().map(RegionEncoder::encoded_size);
            (frames, enc.video_cost(), encoded)
        };
        // No budget: every change (200 a second).
        assert_eq!(run(4_000, 0, true).0, 200);
        // 4 ms a frame on a 20 % budget: one per 20 ms, 50 a second, full size and quality.
        let (frames, (cost, quality, scale), encoded) = run(4_000, 20, true);
        assert!((49..=51).contains(&frames), "{frames} frames");
        assert_eq!((cost, quality, scale, encoded), (Some(4_000), 100, 100, Some((384, 256))));
        // 100 ms a frame on 20 %: 2 fps would fit, the floor is 5 fps; the region goes to half
        // size, then quality goes down.
        let (frames, (_, quality, scale), encoded) = run(100_000, 20, true);
        assert!((5..=6).contains(&frames), "{frames} frames");
        assert_eq!((quality, scale, encoded), (MIN_QUALITY_PERCENT, 50, Some((192, 128))));
        // A client that cannot scale: quality right after the frame rate.
        let (frames, (_, quality, scale), encoded) = run(100_000, 20, false);
        assert!((5..=6).contains(&frames), "{frames} frames");
        assert_eq!((quality, scale, encoded), (MIN_QUALITY_PERCENT, 100, Some((384, 256))));
    }

    /// The budget alone, fed frames whose cost follows their pixel count (`full_us` at full
    /// size): the scale steps before quality, quality comes back before the scale, and the
    /// scale never steps down and up again while the load stays the same.
    #[test]
    fn the_scale_goes_down_before_quality_and_comes_back_after_it_without_flapping() {
        let mut budget = VideoBudget::default();
        let mut now = 0;
        let mut phase = |budget: &mut VideoBudget, full_us: u64, frames: u32| {
            let mut seen = vec![(budget.scale_percent, budget.quality_percent)];
            for _ in 0..frames {
                let s = u64::from(budget.scale_percent);
                budget.on_frame(full_us * s * s / 10_000, 20, true, now);
                now += budget.interval_us(20).clamp(1, 1_000_000 / MIN_VIDEO_FPS);
                seen.push((budget.scale_percent, budget.quality_percent));
            }
            seen
        };
        let scales = |seen: &[(u32, u64)]| {
            let mut steps: Vec<u32> = seen.iter().map(|s| s.0).collect();
            steps.dedup();
            steps
        };
        // 100 ms at full size on 20 %: 500 ms a frame. ½ costs 25 ms (125 ms, within the 5 fps
        // floor): half size, full quality.
        let heavy = phase(&mut budget, 100_000, 60);
        assert_eq!(scales(&heavy), [100, 50]);
        assert!(heavy.iter().all(|&(_, q)| q == 100), "quality held while the scale could step");
        // 45 ms at full size: ½ costs 11 ms (56 ms a frame, room to spare), but full size would
        // take 225 ms a frame, past the floor: it stays at ½ (no stepping up and down again).
        let medium = phase(&mut budget, 45_000, 60);
        assert_eq!(scales(&medium), [50]);
        assert_eq!(medium.last(), Some(&(50, 100)));
        // 200 ms at full size: ½ costs 50 ms, 250 ms a frame; quality goes down at ½.
        let worst = phase(&mut budget, 200_000, 60);
        assert_eq!(scales(&worst), [50]);
        assert_eq!(worst.last(), Some(&(50, MIN_QUALITY_PERCENT)));
        // 10 ms at full size: quality back to full first, then the scale.
        let light = phase(&mut budget, 10_000, 80);
        assert_eq!(scales(&light), [50, 100]);
        let first_up = light.iter().position(|&(s, _)| s > 50).unwrap();
        assert!(light[..first_up].last().is_some_and(|&(_, q)| q == 100), "quality first: {light:?}");
        assert_eq!(light.last(), Some(&(100, 100)));
    }

    #[test]
    fn without_video_everything_is_lossless() {
        let mut frame = Framebuffer::new(320, 240);
        let mut enc = DisplayEncoder::new(320, 240);
        let s = EncoderSettings { video: false, ..EncoderSettings::default() };
        let mut sent = vec![enc.encode(&frame, &[], &s, 1).unwrap().unwrap()];
        for n in 0..20 {
            paint(&mut frame, Rect::new(0, 0, 320, 240), n);
            let out = enc
                .encode(&frame, &[Rect::new(0, 0, 320, 240)], &s, u64::from(n) * 33_333 + 1)
                .unwrap()
                .unwrap();
            assert!(out.video.is_none());
            sent.push(out);
            assert_eq!(client_after(&sent, 320, 240), frame);
        }
    }

    #[test]
    fn scrolling_text_goes_as_copies_and_stays_pixel_exact_at_every_frame() {
        let (w, h) = (640, 480);
        let whole = [Rect::new(0, 0, w, h)];
        let mut frame = scroll::text_page(w, h, 0);
        let mut enc = DisplayEncoder::new(w, h);
        let s = EncoderSettings::default();
        let mut sent = vec![enc.encode(&frame, &[], &s, 1).unwrap().unwrap()];
        let mut with_copies = 0usize;
        let mut bytes = 0usize;
        // One line (16 rows) a frame, 120 frames: as fast as a terminal scrolls, long past the
        // point where a region changing every frame would count as video.
        for n in 1..=120u32 {
            frame = scroll::text_page(w, h, n);
            let out = enc.encode(&frame, &whole, &s, u64::from(n) * 16_667).unwrap().unwrap();
            with_copies += usize::from(!out.copies.is_empty());
            assert!(out.video.is_none(), "frame {n}: scrolling text went to H.264");
            bytes += out.bytes();
            sent.push(out);
            assert_eq!(client_after(&sent, w, h), frame, "frame {n} is not pixel-exact");
        }
        assert_eq!(with_copies, 120, "every frame was a copy");
        assert_eq!(enc.motion_region(), None, "the lines scrolling in are not video");
        // Without copies the same scroll resends the page's changed tiles every frame.
        let mut plain = DisplayEncoder::new(w, h);
        let lossless = EncoderSettings { copy: false, video: false, ..s };
        frame = scroll::text_page(w, h, 0);
        plain.encode(&frame, &[], &lossless, 1).unwrap();
        let mut plain_bytes = 0usize;
        for n in 1..=120u32 {
            frame = scroll::text_page(w, h, n);
            plain_bytes +=
                plain.encode(&frame, &whole, &lossless, u64::from(n) * 16_667).unwrap().unwrap().bytes();
        }
        assert!(bytes * 10 < plain_bytes, "copies: {bytes} bytes, tiles: {plain_bytes} bytes");
    }
}
