//! The display sink: where flushed scanouts and the cursor leave the GPU.
//!
//! On RESOURCE_FLUSH the device copies the flushed rectangle of each scanout showing the
//! resource into that scanout's frame here (converted to B, G, R, X byte order) and adds it to
//! the scanout's damage; then it wakes consumers and goes on with its queue. It never waits for
//! a consumer: a consumer that is busy simply finds more damage when it next looks
//! (latest-wins: the frame holds the newest pixels, the damage is the union of everything
//! since its last look). A consumer (the remote-desktop server's encoder, a screenshot) calls
//! [`DisplaySink::take_damage`], which copies just the damaged rectangles into its own
//! [`Framebuffer`] and clears the damage. The lock is held only for those copies.
//!
//! The cursor (shape, hot spot, position, visibility) is kept apart, with its own generation,
//! because the client draws it itself.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::protocol::Rect;
use super::resources::{BYTES_PER_PIXEL, Resource};

/// Damage rectangles kept per scanout before they are merged into their bounding box.
const MAX_DAMAGE_RECTS: usize = 32;
/// The cursor image side (virtio-gpu cursors are 64x64).
pub const CURSOR_SIZE: u32 = 64;

/// An image in B, G, R, X byte order (little-endian XRGB8888), rows `width * 4` bytes apart.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Framebuffer {
    pub width: u32,
    pub height: u32,
    pub pixels: Vec<u8>,
}

impl Framebuffer {
    pub fn new(width: u32, height: u32) -> Self {
        Self { width, height, pixels: vec![0; width as usize * height as usize * BYTES_PER_PIXEL as usize] }
    }

    pub fn stride(&self) -> usize {
        self.width as usize * BYTES_PER_PIXEL as usize
    }

    /// Copies `rect` (inside both images) from `src`.
    fn copy_rect(&mut self, src: &Framebuffer, rect: Rect) {
        let stride = self.stride();
        let x = rect.x as usize * 4;
        let len = rect.width as usize * 4;
        for row in rect.y as usize..(rect.y + rect.height) as usize {
            let at = row * stride + x;
            self.pixels[at..at + len].copy_from_slice(&src.pixels[at..at + len]);
        }
    }

    /// The pixel at (x, y) as (r, g, b).
    pub fn rgb(&self, x: u32, y: u32) -> (u8, u8, u8) {
        let at = y as usize * self.stride() + x as usize * 4;
        (self.pixels[at + 2], self.pixels[at + 1], self.pixels[at])
    }

    /// The image as RGBA bytes (opaque), e.g. for PNG.
    pub fn to_rgba(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.pixels.len());
        for p in self.pixels.chunks_exact(4) {
            out.extend_from_slice(&[p[2], p[1], p[0], 0xff]);
        }
        out
    }
}

/// The guest's cursor.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cursor {
    /// Bumped on every change.
    pub generation: u64,
    pub scanout: u32,
    pub x: u32,
    pub y: u32,
    pub visible: bool,
    pub hot_x: u32,
    pub hot_y: u32,
    /// 64x64 B, G, R, A pixels; `None` until the guest defines a shape.
    pub image: Option<Arc<Vec<u8>>>,
}

/// CLOCK_MONOTONIC in microseconds: the clock every Pleiades process on a host shares, so a
/// client on the same machine can compare it with its own (latency measurements).
pub fn monotonic_us() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1000)
        .unwrap_or(0)
}

/// What a consumer takes from a scanout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    /// The rectangles copied (empty: nothing changed).
    pub rects: Vec<Rect>,
    /// When the oldest of them was flushed ([`monotonic_us`]); 0 when `rects` is empty.
    pub since_us: u64,
}

#[derive(Debug, Default)]
struct Scanout {
    frame: Option<Framebuffer>,
    damage: Vec<Rect>,
    /// When the damage went from none to some.
    damage_since_us: u64,
}

impl Scanout {
    fn add_damage(&mut self, rect: Rect) {
        if rect.is_empty() {
            return;
        }
        if self.damage.is_empty() {
            self.damage_since_us = monotonic_us();
        }
        if self.damage.iter().any(|d| d.intersect(&rect) == rect) {
            return;
        }
        self.damage.push(rect);
        if self.damage.len() > MAX_DAMAGE_RECTS {
            let bounds = self.damage.iter().fold(Rect::default(), |acc, r| acc.union(r));
            self.damage = vec![bounds];
        }
    }
}

#[derive(Debug, Default)]
struct State {
    scanouts: Vec<Scanout>,
    cursor: Cursor,
    /// Bumped on every change of any scanout or the cursor.
    generation: u64,
}

/// What the sink has seen, for `ctl status` and the benchmark.
#[derive(Debug, Default)]
pub struct SinkMetrics {
    /// Flushes that reached a scanout.
    pub flushes: AtomicU64,
    /// Bytes the device copied into scanout frames.
    pub bytes_in: AtomicU64,
    /// Bytes consumers copied out.
    pub bytes_out: AtomicU64,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    changed: Condvar,
    metrics: SinkMetrics,
}

/// The shared display sink of one GPU. Cheap to clone.
#[derive(Debug, Clone)]
pub struct DisplaySink {
    shared: Arc<Shared>,
}

impl DisplaySink {
    /// A sink for `scanouts` scanouts, all disabled.
    pub fn new(scanouts: usize) -> Self {
        let state =
            State { scanouts: (0..scanouts).map(|_| Scanout::default()).collect(), ..State::default() };
        Self {
            shared: Arc::new(Shared {
                state: Mutex::new(state),
                changed: Condvar::new(),
                metrics: SinkMetrics::default(),
            }),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.shared.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn changed(&self, mut state: MutexGuard<'_, State>) {
        state.generation += 1;
        drop(state);
        self.shared.changed.notify_all();
    }

    pub fn metrics(&self) -> &SinkMetrics {
        &self.shared.metrics
    }

    // --- The device's side ---

    /// Shows a `width` x `height` image on `scanout`, or nothing (`None`). A new size starts a
    /// black frame, all damaged.
    pub(super) fn configure(&self, scanout: usize, size: Option<(u32, u32)>) {
        let mut state = self.state();
        let Some(s) = state.scanouts.get_mut(scanout) else { return };
        let current = s.frame.as_ref().map(|f| (f.width, f.height));
        if current == size {
            return;
        }
        s.frame = size.map(|(w, h)| Framebuffer::new(w, h));
        s.damage.clear();
        if let Some((w, h)) = size {
            s.add_damage(Rect::new(0, 0, w, h));
        }
        self.changed(state);
    }

    /// Copies `rect` of `scanout` (in scanout coordinates, inside it) from `resource`, whose
    /// pixel (`origin`) is the scanout's top-left corner. Returns the bytes copied.
    pub(super) fn flush(&self, scanout: usize, rect: Rect, resource: &Resource, origin: (u32, u32)) -> u64 {
        let mut state = self.state();
        let Some(s) = state.scanouts.get_mut(scanout) else { return 0 };
        let Some(frame) = s.frame.as_mut() else { return 0 };
        let rect = rect.intersect(&Rect::new(0, 0, frame.width, frame.height));
        if rect.is_empty() {
            return 0;
        }
        let stride = frame.stride();
        let src_stride = resource.stride();
        let len = rect.width as usize * 4;
        for row in 0..rect.height as usize {
            let dst = (rect.y as usize + row) * stride + rect.x as usize * 4;
            let src =
                (origin.1 as usize + rect.y as usize + row) * src_stride + (origin.0 + rect.x) as usize * 4;
            resource.format.to_bgrx(&resource.pixels[src..src + len], &mut frame.pixels[dst..dst + len]);
        }
        s.add_damage(rect);
        let bytes = (len * rect.height as usize) as u64;
        self.shared.metrics.flushes.fetch_add(1, Ordering::Relaxed);
        self.shared.metrics.bytes_in.fetch_add(bytes, Ordering::Relaxed);
        self.changed(state);
        bytes
    }

    /// A new cursor shape (64x64 B, G, R, A) and position.
    pub(super) fn set_cursor(&self, image: Option<Arc<Vec<u8>>>, hot: (u32, u32), pos: (u32, u32, u32)) {
        let mut state = self.state();
        let c = &mut state.cursor;
        c.image = image;
        (c.hot_x, c.hot_y) = hot;
        (c.scanout, c.x, c.y) = pos;
        c.visible = c.image.is_some();
        c.generation += 1;
        self.changed(state);
    }

    /// The cursor moved (or was hidden: `visible` false).
    pub(super) fn move_cursor(&self, pos: (u32, u32, u32), visible: bool) {
        let mut state = self.state();
        let c = &mut state.cursor;
        (c.scanout, c.x, c.y) = pos;
        c.visible = visible && c.image.is_some();
        c.generation += 1;
        self.changed(state);
    }

    // --- Consumers' side ---

    /// The change counter: bumped by every flush, mode change and cursor change.
    pub fn generation(&self) -> u64 {
        self.state().generation
    }

    /// Waits until the generation differs from `seen` or `timeout` passes; returns the
    /// current generation.
    pub fn wait_change(&self, seen: u64, timeout: Duration) -> u64 {
        let deadline = Instant::now() + timeout;
        let mut state = self.state();
        while state.generation == seen {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            state = self.shared.changed.wait_timeout(state, left).unwrap_or_else(|p| p.into_inner()).0;
        }
        state.generation
    }

    /// The size of each scanout (`None`: disabled).
    pub fn sizes(&self) -> Vec<Option<(u32, u32)>> {
        self.state().scanouts.iter().map(|s| s.frame.as_ref().map(|f| (f.width, f.height))).collect()
    }

    /// Brings `into` up to date with `scanout`: copies the damaged rectangles (everything, if
    /// the size changed) and clears the damage. Returns the rectangles copied (empty: nothing
    /// changed), or `None` when the scanout is disabled or does not exist.
    pub fn take_damage(&self, scanout: usize, into: &mut Framebuffer) -> Option<Vec<Rect>> {
        self.take_damage_since(scanout, into).map(|d| d.rects)
    }

    /// [`Self::take_damage`], with when the oldest damage was flushed.
    pub fn take_damage_since(&self, scanout: usize, into: &mut Framebuffer) -> Option<Damage> {
        let mut state = self.state();
        let s = state.scanouts.get_mut(scanout)?;
        let frame = s.frame.as_ref()?;
        let since_us = if s.damage.is_empty() { 0 } else { s.damage_since_us };
        let rects = if (into.width, into.height) != (frame.width, frame.height) {
            into.clone_from(frame);
            s.damage.clear();
            vec![Rect::new(0, 0, frame.width, frame.height)]
        } else {
            let damage = std::mem::take(&mut s.damage);
            damage.iter().for_each(|r| into.copy_rect(frame, *r));
            damage
        };
        let bytes: u64 = rects.iter().map(|r| r.area() * 4).sum();
        self.shared.metrics.bytes_out.fetch_add(bytes, Ordering::Relaxed);
        let since_us = if since_us == 0 && !rects.is_empty() { monotonic_us() } else { since_us };
        Some(Damage { rects, since_us })
    }

    /// A copy of what `scanout` shows now (`None`: disabled). Leaves the damage alone.
    pub fn screenshot(&self, scanout: usize) -> Option<Framebuffer> {
        self.state().scanouts.get(scanout)?.frame.clone()
    }

    /// The cursor as it is now.
    pub fn cursor(&self) -> Cursor {
        self.state().cursor.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::resources::Format;

    fn resource(width: u32, height: u32, fill: impl Fn(u32, u32) -> [u8; 4]) -> Resource {
        let mut pixels = Vec::new();
        for y in 0..height {
            for x in 0..width {
                pixels.extend_from_slice(&fill(x, y));
            }
        }
        Resource { format: Format::Bgrx, width, height, pixels, backing: None }
    }

    #[test]
    fn damage_accumulates_while_the_consumer_is_away_and_the_newest_pixels_win() {
        let sink = DisplaySink::new(1);
        sink.configure(0, Some((8, 4)));
        let mut fb = Framebuffer::default();
        assert_eq!(sink.take_damage(0, &mut fb), Some(vec![Rect::new(0, 0, 8, 4)]));
        assert_eq!(sink.take_damage(0, &mut fb), Some(vec![]), "nothing new");

        let old = resource(8, 4, |_, _| [1, 1, 1, 0]);
        let new = resource(8, 4, |x, y| [x as u8, y as u8, 9, 0]);
        sink.flush(0, Rect::new(0, 0, 2, 2), &old, (0, 0));
        sink.flush(0, Rect::new(0, 0, 2, 2), &new, (0, 0));
        sink.flush(0, Rect::new(4, 2, 4, 2), &new, (0, 0));
        let damage = sink.take_damage(0, &mut fb).unwrap();
        assert_eq!(damage, vec![Rect::new(0, 0, 2, 2), Rect::new(4, 2, 4, 2)]);
        assert_eq!(fb.rgb(1, 1), (9, 1, 1));
        assert_eq!(fb.rgb(7, 3), (9, 3, 7));
        assert_eq!(fb.rgb(3, 0), (0, 0, 0), "not flushed");
        assert_eq!(sink.metrics().bytes_in.load(Ordering::Relaxed), 2 * 16 + 32);
    }

    #[test]
    fn many_small_updates_merge_into_their_bounds() {
        let sink = DisplaySink::new(1);
        sink.configure(0, Some((100, 100)));
        let mut fb = Framebuffer::default();
        sink.take_damage(0, &mut fb);
        let res = resource(100, 100, |_, _| [5, 5, 5, 0]);
        for i in 0..40 {
            sink.flush(0, Rect::new(i * 2, i, 1, 1), &res, (0, 0));
        }
        let damage = sink.take_damage(0, &mut fb).unwrap();
        assert!(damage.len() <= MAX_DAMAGE_RECTS, "{}", damage.len());
        assert!(damage.iter().any(|r| r.within(100, 100) && r.area() > 1));
        assert_eq!(fb.rgb(78, 39), (5, 5, 5));
    }

    #[test]
    fn a_scanout_origin_offsets_into_the_resource_and_a_resize_resends_everything() {
        let sink = DisplaySink::new(2);
        let res = resource(16, 8, |x, y| [x as u8, y as u8, 0, 0]);
        sink.configure(1, Some((8, 8)));
        sink.flush(1, Rect::new(0, 0, 8, 8), &res, (8, 0));
        let shot = sink.screenshot(1).unwrap();
        assert_eq!(shot.rgb(0, 3), (0, 3, 8));
        assert_eq!(sink.screenshot(0), None);
        assert_eq!(sink.sizes(), vec![None, Some((8, 8))]);
        let mut fb = Framebuffer::new(8, 8);
        sink.take_damage(1, &mut fb);
        sink.configure(1, Some((4, 4)));
        assert_eq!(sink.take_damage(1, &mut fb), Some(vec![Rect::new(0, 0, 4, 4)]));
        assert_eq!((fb.width, fb.height), (4, 4));
        // Out of range scanouts and rectangles are ignored.
        assert_eq!(sink.flush(5, Rect::new(0, 0, 1, 1), &res, (0, 0)), 0);
        assert_eq!(sink.flush(1, Rect::new(4, 4, 9, 9), &res, (0, 0)), 0);
    }

    #[test]
    fn a_waiting_consumer_wakes_on_a_flush() {
        let sink = DisplaySink::new(1);
        sink.configure(0, Some((4, 4)));
        let seen = sink.generation();
        let device = sink.clone();
        let t = std::thread::spawn(move || {
            let res = resource(4, 4, |_, _| [1, 2, 3, 0]);
            device.flush(0, Rect::new(0, 0, 4, 4), &res, (0, 0));
        });
        let now = sink.wait_change(seen, Duration::from_secs(20));
        t.join().unwrap();
        assert_ne!(now, seen);
        let cursor = sink.cursor();
        assert!(!cursor.visible);
        sink.set_cursor(Some(Arc::new(vec![0; 64 * 64 * 4])), (1, 2), (0, 10, 20));
        sink.move_cursor((0, 11, 21), true);
        let c = sink.cursor();
        assert!(c.visible && c.x == 11 && c.hot_y == 2 && c.generation == 2);
    }
}
