//! Synthetic desktops: `pleiades-host run --synthetic WORKLOAD`.
//!
//! A thread plays a guest's display driver against a real [`Gpu`]: it draws into a resource's
//! backing in (host-side) guest memory and sends the same TRANSFER_TO_HOST_2D and
//! RESOURCE_FLUSH requests the Linux driver sends. Everything after that — the display sink,
//! the encoder, the session server — is the real path, so the protocol's figures do not depend
//! on how fast a guest runs on the machine (here, Linux runs under TCG).
//!
//! Workloads (1920x1080 unless `--synthetic-size`):
//! - `idle`: a desktop that does not change;
//! - `typing`: a terminal where a character (8x16) appears 15 times a second;
//! - `scroll`: a full screen of text scrolling by one line 10 times a second;
//! - `video`: a 640x360 natural-looking moving picture at 30 fps on a still desktop;
//! - `motion`: the whole screen changes 30 times a second.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};

use crate::control::{Controller, InputDevice};
use crate::devices::virtio::GuestMemory;
use crate::devices::virtio::gpu::protocol::{Rect, encode};
use crate::devices::virtio::gpu::{Gpu, GpuConfig, GpuHandle};
use crate::devices::virtio::input::InputEvent;

/// A synthetic workload.
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

const BACKING: u64 = 0x10_0000;
const GLYPH: (u32, u32) = (8, 16);

/// A synthetic VM: a GPU fed by a drawing thread.
#[derive(Debug)]
pub struct SyntheticVm {
    handle: GpuHandle,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    workload: Workload,
    started: Instant,
    input_events: Arc<std::sync::atomic::AtomicU64>,
}

impl SyntheticVm {
    pub fn start(workload: Workload, width: u32, height: u32) -> anyhow::Result<Self> {
        let mut gpu = Gpu::new(&GpuConfig { width, height, ..GpuConfig::default() })?;
        let handle = gpu.handle();
        let bytes = u64::from(width) * u64::from(height) * 4;
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), (BACKING + bytes) as usize)])?;
        let full = Rect::new(0, 0, width, height);
        // Backing in 4 KiB pages, as the Linux driver attaches a shmem object.
        let pages: Vec<(u64, u32)> = (0..bytes.div_ceil(4096))
            .map(|p| (BACKING + p * 4096, (bytes - p * 4096).min(4096) as u32))
            .collect();
        for request in [
            encode::create_2d(1, 2, width, height),
            encode::attach(1, &pages),
            encode::set_scanout(0, 1, full),
        ] {
            let response = gpu.control_request(&request, &mem);
            anyhow::ensure!(response[0..4] == 0x1100u32.to_le_bytes(), "the GPU refused the synthetic setup");
        }
        let stop = Arc::new(AtomicBool::new(false));
        let thread_stop = stop.clone();
        let thread = std::thread::Builder::new().name("synthetic".into()).spawn(move || {
            let mut painter = Painter { gpu, mem, width, height, frame: 0 };
            painter.run(workload, &thread_stop);
        })?;
        Ok(Self {
            handle,
            stop,
            thread: Some(thread),
            workload,
            started: Instant::now(),
            input_events: Arc::default(),
        })
    }

    /// Waits until stopped (`ctl shutdown`, a signal).
    pub fn wait(mut self) {
        while !self.stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(50));
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    pub fn controller(&self) -> Arc<dyn Controller> {
        Arc::new(SyntheticController {
            handle: self.handle.clone(),
            stop: self.stop.clone(),
            workload: self.workload,
            started: self.started,
            input_events: self.input_events.clone(),
        })
    }
}

struct SyntheticController {
    handle: GpuHandle,
    stop: Arc<AtomicBool>,
    workload: Workload,
    started: Instant,
    input_events: Arc<std::sync::atomic::AtomicU64>,
}

impl Controller for SyntheticController {
    fn status(&self) -> serde_json::Value {
        serde_json::json!({
            "vmm": "synthetic",
            "workload": format!("{:?}", self.workload).to_lowercase(),
            "uptime_s": self.started.elapsed().as_secs_f64(),
            "input_events": self.input_events.load(Ordering::Relaxed),
            "gpu": self.handle.status(),
        })
    }
    fn shutdown(&self) -> Result<(), String> {
        self.stop.store(true, Ordering::Relaxed);
        Ok(())
    }
    fn reboot(&self) -> Result<(), String> {
        Err("a synthetic desktop does not reboot".into())
    }
    fn send_input(&self, _device: InputDevice, events: &[InputEvent]) -> Result<(), String> {
        // Counted (the benchmark checks input arrives); a synthetic desktop has no input devices.
        self.input_events.fetch_add(events.len() as u64, Ordering::Relaxed);
        Ok(())
    }
    fn display(&self) -> Option<GpuHandle> {
        Some(self.handle.clone())
    }
}

/// The synthetic display driver.
struct Painter {
    gpu: Gpu,
    mem: GuestMemory,
    width: u32,
    height: u32,
    frame: u64,
}

impl Painter {
    fn run(&mut self, workload: Workload, stop: &AtomicBool) {
        self.fill(Rect::new(0, 0, self.width, self.height), desktop);
        self.flush(Rect::new(0, 0, self.width, self.height));
        let period = Duration::from_secs_f64(1.0 / f64::from(workload.fps()));
        let mut next = Instant::now();
        while !stop.load(Ordering::Relaxed) {
            next += period;
            self.frame += 1;
            match workload {
                Workload::Idle => {}
                Workload::Typing => self.type_char(),
                Workload::Scroll => self.scroll(),
                Workload::Video => self.video(),
                Workload::Motion => self.motion(),
            }
            let now = Instant::now();
            if next > now {
                std::thread::sleep(next - now);
            } else {
                next = now;
            }
        }
    }

    /// Writes `f(x, y)` (B, G, R, X) into the backing for `r`.
    fn fill(&mut self, r: Rect, f: impl Fn(u32, u32) -> [u8; 4]) {
        let mut row = vec![0u8; r.width as usize * 4];
        for y in r.y..r.y + r.height {
            for (i, px) in row.chunks_exact_mut(4).enumerate() {
                px.copy_from_slice(&f(r.x + i as u32, y));
            }
            let at = BACKING + (u64::from(y) * u64::from(self.width) + u64::from(r.x)) * 4;
            let _ = self.mem.write_slice(&row, GuestAddress(at));
        }
    }

    fn flush(&mut self, r: Rect) {
        let offset = (u64::from(r.y) * u64::from(self.width) + u64::from(r.x)) * 4;
        self.gpu.control_request(&encode::transfer(1, r, offset), &self.mem);
        self.gpu.control_request(&encode::flush(1, r), &self.mem);
    }

    fn type_char(&mut self) {
        let columns = (self.width / GLYPH.0).max(1);
        let rows = (self.height / GLYPH.1).max(1);
        let n = self.frame as u32;
        let (col, row) = (n % columns, (n / columns) % rows);
        let r = Rect::new(col * GLYPH.0, row * GLYPH.1, GLYPH.0, GLYPH.1);
        let seed = n.wrapping_mul(2_654_435_761);
        self.fill(r, |x, y| glyph(seed, x - r.x, y - r.y));
        self.flush(r);
    }

    fn scroll(&mut self) {
        let n = self.frame as u32;
        let (w, h) = (self.width, self.height);
        self.fill(Rect::new(0, 0, w, h), |x, y| {
            let line = y / GLYPH.1 + n;
            let col = x / GLYPH.0;
            // Lines of varying length, like a log.
            if col < 20 + (line.wrapping_mul(7919) % 180) {
                glyph(line.wrapping_mul(31).wrapping_add(col), x % GLYPH.0, y % GLYPH.1)
            } else {
                [24, 24, 24, 0]
            }
        });
        self.flush(Rect::new(0, 0, w, h));
    }

    fn video(&mut self) {
        let (vw, vh) = (640.min(self.width), 360.min(self.height));
        let r = Rect::new((self.width - vw) / 2, (self.height - vh) / 2, vw, vh);
        let t = self.frame as f32 / 30.0;
        self.fill(r, |x, y| natural(x - r.x, y - r.y, t));
        self.flush(r);
    }

    fn motion(&mut self) {
        let t = self.frame as f32 / 30.0;
        self.fill(Rect::new(0, 0, self.width, self.height), |x, y| natural(x / 3, y / 3, t));
        self.flush(Rect::new(0, 0, self.width, self.height));
    }
}

/// A still desktop background with a few window-like panels.
fn desktop(x: u32, y: u32) -> [u8; 4] {
    if (100..900).contains(&x) && (80..600).contains(&y) {
        if y < 110 { [180, 120, 60, 0] } else { [245, 245, 245, 0] }
    } else {
        let v = 90 + ((x / 4 + y / 3) % 40) as u8;
        [v, v / 2 + 40, 30, 0]
    }
}

/// A glyph-like pattern: light strokes on a dark terminal background.
fn glyph(seed: u32, gx: u32, gy: u32) -> [u8; 4] {
    let bits = seed.rotate_left(gy % 16 + gx % 8);
    let on = gy > 2 && gy < 13 && gx > 0 && gx < 7 && (bits >> (gx + gy % 4)) & 1 == 1;
    if on { [220, 220, 220, 0] } else { [24, 24, 24, 0] }
}

/// Smooth gradients, moving shapes and a little grain: video-like content.
fn natural(x: u32, y: u32, t: f32) -> [u8; 4] {
    let (fx, fy) = (x as f32, y as f32);
    let cx = 320.0 + 200.0 * (t * 0.9).sin();
    let cy = 180.0 + 100.0 * (t * 1.3).cos();
    let d = ((fx - cx).powi(2) + (fy - cy).powi(2)).sqrt();
    let ball = if d < 60.0 { 255.0 - d * 2.0 } else { 0.0 };
    let sky = 120.0 + 80.0 * ((fx / 90.0 + t).sin() * (fy / 70.0 - t * 0.7).cos());
    let grain = ((x.wrapping_mul(73_856_093) ^ y.wrapping_mul(19_349_663) ^ (t * 1000.0) as u32) % 9) as f32;
    let r = (sky * 0.6 + ball + grain).min(255.0) as u8;
    let g = (sky * 0.8 + ball * 0.5 + grain).min(255.0) as u8;
    let b = (sky + grain).min(255.0) as u8;
    [b, g, r, 0]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_synthetic_desktop_reaches_the_sink_and_stops() {
        let vm = SyntheticVm::start(Workload::Typing, 320, 200).unwrap();
        let controller = vm.controller();
        let sink = controller.display().unwrap().sink().clone();
        let mut seen = sink.generation();
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut changes = 0;
        while changes < 3 && Instant::now() < deadline {
            let now = sink.wait_change(seen, Duration::from_millis(500));
            changes += usize::from(now != seen);
            seen = now;
        }
        assert!(changes >= 3, "the typing workload keeps flushing");
        let shot = sink.screenshot(0).unwrap();
        assert_eq!((shot.width, shot.height), (320, 200));
        controller.shutdown().unwrap();
        vm.wait();
    }
}
