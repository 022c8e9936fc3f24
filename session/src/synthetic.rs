//! Synthetic desktops: `pleiades-host run --synthetic WORKLOAD`.
//!
//! A thread plays a guest's display driver against a real [`Gpu`]: it draws into a resource's
//! backing in (host-side) guest memory and sends the same TRANSFER_TO_HOST_2D and
//! RESOURCE_FLUSH requests the Linux driver sends. Everything after that — the display sink,
//! the encoder, the session server — is the real path, so the protocol's figures do not depend
//! on how fast a guest runs on the machine (here, Linux runs under TCG).
//!
//! The workloads are the guest agent's (`pleiades-agent workload`, see
//! [`pleiades_agent::workload`]): the same pictures, drawn here without a guest, 1920x1080
//! unless `--synthetic-size`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};

use pleiades_agent::workload::Canvas;
use pleiades_control::{CommandError, Controller, InputDevice};
use pleiades_virtio::GuestMemory;
use pleiades_virtio::gpu::protocol::{Rect, encode};
use pleiades_virtio::gpu::{Gpu, GpuConfig, GpuHandle};
use pleiades_virtio::input::InputEvent;

pub use pleiades_agent::workload::{self, Workload};

const BACKING: u64 = 0x10_0000;

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
            let mut painter = Painter { gpu, mem, width, height };
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
    fn shutdown(&self) -> Result<(), CommandError> {
        self.stop.store(true, Ordering::Relaxed);
        Ok(())
    }
    fn reboot(&self) -> Result<(), CommandError> {
        Err(CommandError::Failed("a synthetic desktop does not reboot".into()))
    }
    fn send_input(&self, _device: InputDevice, events: &[InputEvent]) -> Result<(), CommandError> {
        // Counted (the benchmark checks input arrives); a synthetic desktop has no input devices.
        self.input_events.fetch_add(events.len() as u64, Ordering::Relaxed);
        Ok(())
    }
    fn display(&self) -> Option<GpuHandle> {
        Some(self.handle.clone())
    }
}

/// The synthetic display driver: the agent's workloads draw into its guest memory, and every
/// drawn rectangle is transferred and flushed as the Linux driver would.
struct Painter {
    gpu: Gpu,
    mem: GuestMemory,
    width: u32,
    height: u32,
}

impl Painter {
    fn run(&mut self, workload: Workload, stop: &AtomicBool) {
        let forever = Instant::now() + Duration::from_secs(365 * 24 * 3600);
        if let Err(e) =
            pleiades_agent::workload::run(workload, self, forever, &|| stop.load(Ordering::Relaxed))
        {
            tracing::error!("the synthetic desktop stopped drawing: {e}");
        }
    }
}

impl Canvas for Painter {
    fn size(&self) -> (u32, u32) {
        (self.width, self.height)
    }

    fn put(&mut self, x: u32, y: u32, w: u32, h: u32, pixels: &[u8]) -> std::io::Result<()> {
        let row = w as usize * 4;
        for (i, line) in pixels.chunks_exact(row).take(h as usize).enumerate() {
            let at = BACKING + ((u64::from(y) + i as u64) * u64::from(self.width) + u64::from(x)) * 4;
            self.mem.write_slice(line, GuestAddress(at)).map_err(std::io::Error::other)?;
        }
        let r = Rect::new(x, y, w, h);
        let offset = (u64::from(y) * u64::from(self.width) + u64::from(x)) * 4;
        self.gpu.control_request(&encode::transfer(1, r, offset), &self.mem);
        self.gpu.control_request(&encode::flush(1, r), &self.mem);
        Ok(())
    }
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
