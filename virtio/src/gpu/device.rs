//! The GPU device state and its [`VirtioDevice`] implementation.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use vhost::vhost_user::GpuBackend;
use vhost::vhost_user::gpu_message::{
    VhostUserGpuCursorPos, VhostUserGpuCursorUpdate, VhostUserGpuScanout, VhostUserGpuUpdate,
};
use virtio_queue::{DescriptorChain, Queue};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::edid;
use super::protocol::{
    self, Command, CursorPos, DisplayOne, EVENT_DISPLAY, GpuError, HEADER_SIZE, Header, MAX_REQUEST_BYTES,
    MAX_SCANOUTS, Rect, VIRTIO_GPU_F_EDID, resp,
};
use super::resources::{GpuLimits, Resources};
use super::sink::{CURSOR_SIZE, DisplaySink};
use crate::{
    DeviceError, DeviceType, GuestMemory, VIRTIO_F_VERSION_1, VIRTIO_RING_F_INDIRECT_DESC, VirtioDevice,
    read_config_bytes, serve_available,
};

const CONTROLQ: usize = 0;
const CURSORQ: usize = 1;
const QUEUE_SIZES: &[u16] = DeviceType::Gpu.queue_max_sizes();
/// `virtio_gpu_config`: events_read, events_clear, num_scanouts, num_capsets.
const CONFIG_SIZE: usize = 16;
/// Problems logged individually before the device goes quiet about them.
const LOGGED_PROBLEMS: u64 = 16;
/// The smallest and largest monitor the host may ask for (the EDID's preferred mode must fit).
pub const MIN_DISPLAY: (u32, u32) = (edid::MIN_WIDTH, edid::MIN_HEIGHT);
pub const MAX_DISPLAY: (u32, u32) = (edid::MAX_WIDTH, edid::MAX_HEIGHT);

/// How a GPU is set up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuConfig {
    /// Scanouts (monitors), 1 to 16.
    pub scanouts: u32,
    /// The size each enabled monitor starts with.
    pub width: u32,
    pub height: u32,
    pub limits: GpuLimits,
}

impl Default for GpuConfig {
    fn default() -> Self {
        Self { scanouts: 1, width: 1280, height: 800, limits: GpuLimits::default() }
    }
}

/// What a GPU has done, for `ctl status`, tests and the benchmark.
#[derive(Debug, Default)]
pub struct GpuMetrics {
    /// Control and cursor requests handled.
    pub commands: AtomicU64,
    /// Requests answered with an error response.
    pub errors: AtomicU64,
    /// Bytes copied from guest backing into resources.
    pub bytes_transferred: AtomicU64,
    /// Host bytes the guest's resources take now.
    pub resource_bytes: AtomicU64,
    /// Display layout changes the host asked for.
    pub layout_changes: AtomicU64,
}

/// The host's side of a GPU: its display sink and the layout it asks the guest to use.
#[derive(Debug, Clone)]
pub struct GpuHandle {
    sink: DisplaySink,
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    scanouts: u32,
    /// A layout the host asked for, not yet applied by the device.
    pending_layout: Mutex<Option<Vec<(u32, u32)>>>,
    wake: EventFd,
    metrics: GpuMetrics,
}

/// Why the host's layout request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    #[error("a layout needs 1 to {max} monitor sizes (this GPU has {max} scanouts), not {given}")]
    Count { given: usize, max: u32 },
    #[error(
        "monitor {index} is {width}x{height}; each monitor must be {}x{} to {}x{}",
        MIN_DISPLAY.0, MIN_DISPLAY.1, MAX_DISPLAY.0, MAX_DISPLAY.1
    )]
    Size { index: usize, width: u32, height: u32 },
}

impl GpuHandle {
    /// Where flushed frames and the cursor go.
    pub fn sink(&self) -> &DisplaySink {
        &self.sink
    }

    pub fn metrics(&self) -> &GpuMetrics {
        &self.shared.metrics
    }

    /// The number of scanouts.
    pub fn scanouts(&self) -> u32 {
        self.shared.scanouts
    }

    /// What `ctl status` shows of the GPU.
    pub fn status(&self) -> serde_json::Value {
        let m = &self.shared.metrics;
        let sink = self.sink.metrics();
        let cursor = self.sink.cursor();
        serde_json::json!({
            "scanouts": self.sink.sizes().iter().map(|s| s.map(|(w, h)| format!("{w}x{h}"))).collect::<Vec<_>>(),
            "commands": m.commands.load(Ordering::Relaxed),
            "errors": m.errors.load(Ordering::Relaxed),
            "resource_bytes": m.resource_bytes.load(Ordering::Relaxed),
            "bytes_transferred": m.bytes_transferred.load(Ordering::Relaxed),
            "flushes": sink.flushes.load(Ordering::Relaxed),
            "flushed_bytes": sink.bytes_in.load(Ordering::Relaxed),
            "layout_changes": m.layout_changes.load(Ordering::Relaxed),
            "cursor": { "visible": cursor.visible, "scanout": cursor.scanout, "x": cursor.x, "y": cursor.y },
        })
    }

    /// Checks a layout: one size per monitor, the rest disabled.
    pub fn check_layout(scanouts: u32, sizes: &[(u32, u32)]) -> Result<(), LayoutError> {
        if sizes.is_empty() || sizes.len() > scanouts as usize {
            return Err(LayoutError::Count { given: sizes.len(), max: scanouts });
        }
        for (index, &(width, height)) in sizes.iter().enumerate() {
            let fits = (MIN_DISPLAY.0..=MAX_DISPLAY.0).contains(&width)
                && (MIN_DISPLAY.1..=MAX_DISPLAY.1).contains(&height);
            if !fits {
                return Err(LayoutError::Size { index, width, height });
            }
        }
        Ok(())
    }

    /// Asks the guest to use these monitor sizes (left to right): the device updates its
    /// display info and raises the display-change event; the guest's driver re-reads it.
    pub fn set_layout(&self, sizes: &[(u32, u32)]) -> Result<(), LayoutError> {
        Self::check_layout(self.shared.scanouts, sizes)?;
        *lock(&self.shared.pending_layout) = Some(sizes.to_vec());
        if let Err(e) = self.shared.wake.write(1) {
            tracing::warn!("virtio-gpu: cannot wake the device for a layout change: {e}");
        }
        Ok(())
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What one scanout shows.
#[derive(Debug, Clone, Copy, Default)]
struct Scanout {
    /// 0: disabled.
    resource_id: u32,
    /// The part of the resource shown.
    rect: Rect,
}

/// A virtio-gpu 2D device.
#[derive(Debug)]
pub struct Gpu {
    acked_features: u64,
    events_read: u32,
    config_changed: bool,
    /// The display info the driver reads: the host's (or QEMU's) wish per scanout.
    displays: Vec<DisplayOne>,
    scanouts: Vec<Scanout>,
    resources: Resources,
    handle: GpuHandle,
    /// QEMU's display, when served over vhost-user with the GPU socket (`vhost-user-gpu-pci`).
    frontend: Option<Frontend>,
    buffer: Vec<u8>,
}

/// One message for QEMU's display.
type MirrorJob = Box<dyn FnOnce(&GpuBackend) -> std::io::Result<()> + Send>;
/// Messages waiting for QEMU's display before updates are dropped (and a whole-scanout update
/// is sent once there is room again).
const MIRROR_QUEUE: usize = 16;

/// The vhost-user GPU socket to QEMU (`VHOST_USER_GPU_SET_SOCKET`), written by a thread of its
/// own: QEMU reads it on its main loop, which can wait for this device (a config access while
/// the vCPU holds QEMU's big lock), so the device must never block on it.
struct Frontend {
    jobs: std::sync::mpsc::SyncSender<MirrorJob>,
    /// Updates were dropped: the next flush of each scanout sends all of it.
    resync: bool,
}

impl std::fmt::Debug for Frontend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Frontend").field("resync", &self.resync).finish()
    }
}

impl Frontend {
    fn start(socket: GpuBackend) -> std::io::Result<Self> {
        let (jobs, queue) = std::sync::mpsc::sync_channel::<MirrorJob>(MIRROR_QUEUE);
        std::thread::Builder::new().name("gpu-mirror".into()).spawn(move || {
            for job in queue {
                if let Err(e) = job(&socket) {
                    tracing::warn!(
                        "virtio-gpu: QEMU's display socket failed ({e}); no longer mirroring to it"
                    );
                    return;
                }
            }
        })?;
        Ok(Self { jobs, resync: false })
    }
}

impl Gpu {
    pub fn new(config: &GpuConfig) -> std::io::Result<Self> {
        let scanouts = config.scanouts.clamp(1, MAX_SCANOUTS as u32);
        let shared = Arc::new(Shared {
            scanouts,
            pending_layout: Mutex::new(None),
            wake: EventFd::new(EFD_NONBLOCK)?,
            metrics: GpuMetrics::default(),
        });
        let handle = GpuHandle { sink: DisplaySink::new(scanouts as usize), shared };
        let mut gpu = Self {
            acked_features: 0,
            events_read: 0,
            config_changed: false,
            displays: vec![DisplayOne::default(); scanouts as usize],
            scanouts: vec![Scanout::default(); scanouts as usize],
            resources: Resources::new(config.limits),
            handle,
            frontend: None,
            buffer: Vec::with_capacity(4096),
        };
        // One monitor to start with; the client's layout enables more.
        gpu.apply_layout(&[(config.width, config.height)]);
        Ok(gpu)
    }

    /// The host's handle (sink, layout).
    pub fn handle(&self) -> GpuHandle {
        self.handle.clone()
    }

    fn metrics(&self) -> &GpuMetrics {
        &self.handle.shared.metrics
    }

    /// Takes the layout the host asked for, if any, and raises the display-change event.
    fn apply_pending_layout(&mut self) {
        let layout = lock(&self.handle.shared.pending_layout).take();
        if let Some(sizes) = layout {
            self.apply_layout(&sizes);
            self.events_read |= EVENT_DISPLAY;
            self.config_changed = true;
            self.metrics().layout_changes.fetch_add(1, Ordering::Relaxed);
            tracing::info!("virtio-gpu: display layout {sizes:?} requested");
        }
    }

    fn apply_layout(&mut self, sizes: &[(u32, u32)]) {
        let mut x = 0;
        for (i, d) in self.displays.iter_mut().enumerate() {
            *d = match sizes.get(i) {
                Some(&(w, h)) => {
                    let rect = Rect::new(x, 0, w, h);
                    x += w;
                    DisplayOne { rect, enabled: true }
                }
                None => DisplayOne::default(),
            };
        }
    }

    /// Handles one control-queue request (its readable bytes) and returns the response, as
    /// the queue path does without the ring: for the fuzz target and the benchmark.
    pub fn control_request(&mut self, request: &[u8], mem: &GuestMemory) -> Vec<u8> {
        self.execute(&request[..request.len().min(MAX_REQUEST_BYTES)], mem)
    }

    /// Handles one cursor-queue request (no response), as [`Self::control_request`] does.
    pub fn cursor_request(&mut self, request: &[u8]) {
        self.cursor(&request[..request.len().min(MAX_REQUEST_BYTES)]);
    }

    /// Handles one request; returns the response bytes.
    fn execute(&mut self, bytes: &[u8], mem: &GuestMemory) -> Vec<u8> {
        self.metrics().commands.fetch_add(1, Ordering::Relaxed);
        let Some(request) = protocol::parse(bytes) else {
            return self.refuse(
                &Header::default(),
                &GpuError::Unspec(format!("a {}-byte request has no header", bytes.len())),
            );
        };
        let header = request.header;
        let result = request.command.and_then(|command| self.run(command, &header, mem));
        match result {
            Ok(response) => response,
            Err(e) => self.refuse(&header, &e),
        }
    }

    fn refuse(&self, header: &Header, e: &GpuError) -> Vec<u8> {
        if self.metrics().errors.fetch_add(1, Ordering::Relaxed) < LOGGED_PROBLEMS {
            tracing::warn!("virtio-gpu: request {:#06x} refused: {e}", header.kind);
        } else {
            tracing::debug!("virtio-gpu: request {:#06x} refused: {e}", header.kind);
        }
        header.response(e.response_type()).to_vec()
    }

    fn run(&mut self, command: Command, header: &Header, mem: &GuestMemory) -> Result<Vec<u8>, GpuError> {
        let ok = || Ok(header.response(resp::OK_NODATA).to_vec());
        match command {
            Command::GetDisplayInfo => {
                // A layout the host just asked for counts even if its wake-up is still queued.
                self.apply_pending_layout();
                Ok(protocol::display_info_response(header, &self.displays))
            }
            Command::GetEdid { scanout_id } => {
                // The driver asks for EDIDs just before the display info: the same layout for both.
                self.apply_pending_layout();
                let d = self.displays.get(scanout_id as usize).ok_or(GpuError::InvalidScanout(scanout_id))?;
                let (w, h) = if d.enabled { (d.rect.width, d.rect.height) } else { (1024, 768) };
                let blob =
                    edid_blob(w.clamp(MIN_DISPLAY.0, MAX_DISPLAY.0), h.clamp(MIN_DISPLAY.1, MAX_DISPLAY.1))?;
                Ok(protocol::edid_response(header, &blob))
            }
            Command::ResourceCreate2d { resource_id, format, width, height } => {
                self.resources.create(resource_id, format, width, height)?;
                self.account();
                ok()
            }
            Command::ResourceUnref { resource_id } => {
                self.resources.remove(resource_id)?;
                for i in 0..self.scanouts.len() {
                    if self.scanouts[i].resource_id == resource_id {
                        self.disable_scanout(i);
                    }
                }
                self.account();
                ok()
            }
            Command::AttachBacking { resource_id, entries } => {
                self.resources.attach(resource_id, &entries, mem)?;
                ok()
            }
            Command::DetachBacking { resource_id } => {
                self.resources.detach(resource_id)?;
                ok()
            }
            Command::TransferToHost2d { rect, offset, resource_id } => {
                let bytes = self.resources.get_mut(resource_id)?.transfer_to_host(mem, rect, offset)?;
                self.metrics().bytes_transferred.fetch_add(bytes, Ordering::Relaxed);
                ok()
            }
            Command::SetScanout { rect, scanout_id, resource_id } => {
                self.set_scanout(scanout_id, resource_id, rect)?;
                ok()
            }
            Command::ResourceFlush { rect, resource_id } => {
                self.flush(resource_id, rect)?;
                ok()
            }
            Command::UpdateCursor { .. } | Command::MoveCursor { .. } => {
                Err(GpuError::Unspec("cursor commands belong on the cursor queue".into()))
            }
        }
    }

    fn account(&self) {
        self.metrics().resource_bytes.store(self.resources.used_bytes(), Ordering::Relaxed);
    }

    fn set_scanout(&mut self, scanout_id: u32, resource_id: u32, rect: Rect) -> Result<(), GpuError> {
        let index = scanout_id as usize;
        if index >= self.scanouts.len() {
            return Err(GpuError::InvalidScanout(scanout_id));
        }
        if resource_id == 0 || rect.is_empty() {
            self.disable_scanout(index);
            return Ok(());
        }
        let res = self.resources.get(resource_id)?;
        if !rect.within(res.width, res.height) {
            return Err(GpuError::InvalidParameter(format!(
                "scanout rectangle {rect} is outside the {}x{} resource {resource_id}",
                res.width, res.height
            )));
        }
        self.scanouts[index] = Scanout { resource_id, rect };
        self.handle.sink.configure(index, Some((rect.width, rect.height)));
        self.mirror(move |f| {
            f.set_scanout(&VhostUserGpuScanout { scanout_id, width: rect.width, height: rect.height })
        });
        Ok(())
    }

    fn disable_scanout(&mut self, index: usize) {
        self.scanouts[index] = Scanout::default();
        self.handle.sink.configure(index, None);
        self.mirror(move |f| {
            f.set_scanout(&VhostUserGpuScanout { scanout_id: index as u32, width: 0, height: 0 })
        });
    }

    fn flush(&mut self, resource_id: u32, rect: Rect) -> Result<(), GpuError> {
        let res = self.resources.get(resource_id)?;
        if !rect.within(res.width, res.height) {
            return Err(GpuError::InvalidParameter(format!(
                "flush {rect} is outside the {}x{} resource {resource_id}",
                res.width, res.height
            )));
        }
        let mut updates = Vec::new();
        for (i, s) in self.scanouts.iter().enumerate() {
            if s.resource_id != resource_id {
                continue;
            }
            let hit = rect.intersect(&s.rect);
            if hit.is_empty() {
                continue;
            }
            let local = Rect::new(hit.x - s.rect.x, hit.y - s.rect.y, hit.width, hit.height);
            self.handle.sink.flush(i, local, res, (s.rect.x, s.rect.y));
            match &self.frontend {
                Some(f) if f.resync => {
                    updates.push((i as u32, Rect::new(0, 0, s.rect.width, s.rect.height), s.rect))
                }
                Some(_) => updates.push((i as u32, local, hit)),
                None => {}
            }
        }
        if let Some(f) = &mut self.frontend {
            f.resync = false;
        }
        for (scanout_id, local, hit) in updates {
            let res = self.resources.get(resource_id)?;
            let mut data = vec![0u8; hit.area() as usize * 4];
            let (len, stride) = (hit.width as usize * 4, res.stride());
            for (row, out) in data.chunks_exact_mut(len).enumerate() {
                let at = (hit.y as usize + row) * stride + hit.x as usize * 4;
                res.format.to_bgrx(&res.pixels[at..at + len], out);
            }
            let update = VhostUserGpuUpdate {
                scanout_id,
                x: local.x,
                y: local.y,
                width: local.width,
                height: local.height,
            };
            self.mirror(move |f| f.update_scanout(&update, &data));
        }
        Ok(())
    }

    /// A cursor queue request (no response is written: the driver posts none).
    fn cursor(&mut self, bytes: &[u8]) {
        self.metrics().commands.fetch_add(1, Ordering::Relaxed);
        let result = match protocol::parse(bytes).map(|r| r.command) {
            Some(Ok(Command::UpdateCursor { pos, resource_id, hot_x, hot_y })) => {
                self.update_cursor(pos, resource_id, (hot_x, hot_y))
            }
            Some(Ok(Command::MoveCursor { pos })) => self.move_cursor(pos),
            Some(Ok(other)) => Err(GpuError::Unspec(format!("{other:?} is not a cursor command"))),
            Some(Err(e)) => Err(e),
            None => Err(GpuError::Unspec("a cursor request without a header".into())),
        };
        if let Err(e) = result {
            self.refuse(&Header::default(), &e);
        }
    }

    fn check_cursor_scanout(&self, pos: &CursorPos) -> Result<(), GpuError> {
        if pos.scanout_id as usize >= self.scanouts.len() {
            return Err(GpuError::InvalidScanout(pos.scanout_id));
        }
        Ok(())
    }

    fn update_cursor(&mut self, pos: CursorPos, resource_id: u32, hot: (u32, u32)) -> Result<(), GpuError> {
        self.check_cursor_scanout(&pos)?;
        let at = (pos.scanout_id, pos.x, pos.y);
        if resource_id == 0 {
            self.handle.sink.set_cursor(None, (0, 0), at);
            let p = VhostUserGpuCursorPos { scanout_id: pos.scanout_id, x: pos.x, y: pos.y };
            self.mirror(move |f| f.cursor_pos_hide(&p));
            return Ok(());
        }
        let res = self.resources.get(resource_id)?;
        if (res.width, res.height) != (CURSOR_SIZE, CURSOR_SIZE) {
            return Err(GpuError::InvalidParameter(format!(
                "a cursor must be {CURSOR_SIZE}x{CURSOR_SIZE}, resource {resource_id} is {}x{}",
                res.width, res.height
            )));
        }
        if hot.0 >= CURSOR_SIZE || hot.1 >= CURSOR_SIZE {
            return Err(GpuError::InvalidParameter(format!("cursor hot spot {hot:?} is outside the cursor")));
        }
        let mut image = vec![0u8; res.pixels.len()];
        res.format.to_bgrx(&res.pixels, &mut image);
        let image = Arc::new(image);
        let shape = image.clone();
        self.mirror(move |f| {
            let update = VhostUserGpuCursorUpdate {
                pos: VhostUserGpuCursorPos { scanout_id: pos.scanout_id, x: pos.x, y: pos.y },
                hot_x: hot.0,
                hot_y: hot.1,
            };
            let data: &[u8; 4 * 64 * 64] = shape.as_slice().try_into().map_err(std::io::Error::other)?;
            f.cursor_update(&update, data)
        });
        self.handle.sink.set_cursor(Some(image), hot, at);
        Ok(())
    }

    fn move_cursor(&mut self, pos: CursorPos) -> Result<(), GpuError> {
        self.check_cursor_scanout(&pos)?;
        self.handle.sink.move_cursor((pos.scanout_id, pos.x, pos.y), true);
        let p = VhostUserGpuCursorPos { scanout_id: pos.scanout_id, x: pos.x, y: pos.y };
        self.mirror(move |f| f.cursor_pos(&p));
        Ok(())
    }

    /// Queues a message for QEMU's display, if attached. A full queue drops it (the next flush
    /// resends whole scanouts); a mirror thread that gave up detaches the frontend.
    fn mirror(&mut self, send: impl FnOnce(&GpuBackend) -> std::io::Result<()> + Send + 'static) {
        use std::sync::mpsc::TrySendError;
        let Some(frontend) = &mut self.frontend else { return };
        match frontend.jobs.try_send(Box::new(send)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => frontend.resync = true,
            Err(TrySendError::Disconnected(_)) => self.frontend = None,
        }
    }

    /// Reads a request from a chain, handles it, writes the response; returns the bytes written.
    fn serve_chain(&mut self, index: usize, chain: DescriptorChain<&GuestMemory>, mem: &GuestMemory) -> u32 {
        let mut reader = match chain.clone().reader(mem) {
            Ok(r) => r,
            Err(e) => {
                self.refuse(&Header::default(), &GpuError::Unspec(format!("unreadable request: {e}")));
                return 0;
            }
        };
        let len = reader.available_bytes().min(MAX_REQUEST_BYTES);
        let mut bytes = std::mem::take(&mut self.buffer);
        bytes.resize(len, 0);
        if let Err(e) = reader.read_exact(&mut bytes) {
            self.refuse(&Header::default(), &GpuError::Unspec(format!("cannot read the request: {e}")));
            self.buffer = bytes;
            return 0;
        }
        let written = if index == CURSORQ {
            self.cursor(&bytes);
            0
        } else {
            let response = self.execute(&bytes, mem);
            write_response(chain, mem, &response)
        };
        self.buffer = bytes;
        written
    }
}

/// The EDID of a monitor whose preferred mode is `width` x `height`.
fn edid_blob(width: u32, height: u32) -> Result<Vec<u8>, GpuError> {
    edid::Monitor::new(width, height)
        .edid()
        .map(|block| block.to_vec())
        .map_err(|e| GpuError::Unspec(format!("no EDID for {width}x{height}: {e}")))
}

/// Writes a response into the chain's writable part; a driver that gave too little room gets
/// what fits (the header first).
fn write_response(chain: DescriptorChain<&GuestMemory>, mem: &GuestMemory, response: &[u8]) -> u32 {
    let Ok(mut writer) = chain.writer(mem) else { return 0 };
    let n = writer.available_bytes().min(response.len());
    if n < HEADER_SIZE.min(response.len()) {
        tracing::debug!("virtio-gpu: response buffer of {n} bytes cannot hold a header");
    }
    match writer.write_all(&response[..n]) {
        Ok(()) => n as u32,
        Err(_) => 0,
    }
}

impl VirtioDevice for Gpu {
    fn device_type(&self) -> DeviceType {
        DeviceType::Gpu
    }

    fn queue_max_sizes(&self) -> &[u16] {
        QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        // QEMU's vhost-user-gpu-pci passes the guest's ring features through unfiltered, so
        // the GPU offers indirect descriptors (which virtio-queue follows); `event_idx=off` is
        // set on QEMU's side (see `crate::qemu`).
        VIRTIO_F_VERSION_1 | VIRTIO_RING_F_INDIRECT_DESC | VIRTIO_GPU_F_EDID
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features & self.features();
    }

    fn config_size(&self) -> usize {
        CONFIG_SIZE
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut config = [0u8; CONFIG_SIZE];
        // A layout the host set and the device has not applied yet is already a display event:
        // a frontend that signals the change itself (a vhost-user one) may be faster than the
        // wake-up that applies it.
        let pending = lock(&self.handle.shared.pending_layout).is_some();
        let events = self.events_read | if pending { EVENT_DISPLAY } else { 0 };
        config[0..4].copy_from_slice(&events.to_le_bytes());
        config[8..12].copy_from_slice(&(self.scanouts.len() as u32).to_le_bytes());
        read_config_bytes(&config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only events_clear (bytes 4..8) is writable: it clears bits of events_read.
        if offset == 4 && data.len() == 4 {
            let clear = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
            self.events_read &= !clear;
        }
    }

    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &GuestMemory,
    ) -> Result<bool, DeviceError> {
        match index {
            CONTROLQ | CURSORQ => {
                let completed =
                    serve_available(index, queue, mem, |chain| Ok(self.serve_chain(index, chain, mem)))?;
                Ok(!completed.is_empty())
            }
            _ => Ok(false),
        }
    }

    fn host_events(&self) -> Vec<RawFd> {
        vec![self.handle.shared.wake.as_raw_fd()]
    }

    fn handle_host_event(
        &mut self,
        _event: usize,
        _queues: &mut [Queue],
        _mem: &GuestMemory,
    ) -> Result<Vec<usize>, DeviceError> {
        let _ = self.handle.shared.wake.read();
        self.apply_pending_layout();
        Ok(Vec::new())
    }

    fn take_config_changed(&mut self) -> bool {
        std::mem::take(&mut self.config_changed)
    }

    fn set_gpu_socket(&mut self, socket: GpuBackend) -> std::io::Result<()> {
        tracing::info!("virtio-gpu: mirroring the display to the vhost-user frontend (QEMU)");
        self.frontend = Some(Frontend::start(socket)?);
        // Show QEMU what is on screen already (e.g. after the guest re-negotiated).
        for (i, s) in self.scanouts.clone().iter().enumerate() {
            if s.resource_id != 0 {
                let scanout =
                    VhostUserGpuScanout { scanout_id: i as u32, width: s.rect.width, height: s.rect.height };
                self.mirror(move |f| f.set_scanout(&scanout));
            }
        }
        Ok(())
    }

    fn reset(&mut self) {
        self.acked_features = 0;
        self.events_read = 0;
        self.resources.clear();
        self.account();
        for i in 0..self.scanouts.len() {
            self.disable_scanout(i);
        }
        self.handle.sink.set_cursor(None, (0, 0), (0, 0, 0));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::protocol::{cmd, encode, parse_display_info};
    use crate::gpu::sink::Framebuffer;
    use crate::test_utils::*;
    use vm_memory::{Bytes, GuestAddress};

    const REQUEST: u64 = 0x2_0000;
    const RESPONSE: u64 = 0x3_0000;

    /// Sends one request on `queue` and returns the response bytes written.
    fn send(gpu: &mut Gpu, mem: &GuestMemory, queue: usize, request: &[u8]) -> Vec<u8> {
        mem.write_slice(request, GuestAddress(REQUEST)).unwrap();
        let mut q = queue_with(
            mem,
            16,
            &[
                desc(REQUEST, request.len() as u32, VRING_DESC_F_NEXT, 1),
                desc(RESPONSE, 2048, VRING_DESC_F_WRITE, 0),
            ],
        );
        let rings = QueueRings::of(&q);
        assert!(gpu.process_queue(queue, &mut q, mem).unwrap());
        let used = used_entries(mem, &rings);
        assert_eq!(used.len(), 1);
        let mut out = vec![0u8; used[0].1 as usize];
        mem.read_slice(&mut out, GuestAddress(RESPONSE)).unwrap();
        out
    }

    fn kind(response: &[u8]) -> u32 {
        u32::from_le_bytes(response[0..4].try_into().unwrap())
    }

    fn ok(gpu: &mut Gpu, mem: &GuestMemory, request: &[u8]) {
        assert_eq!(kind(&send(gpu, mem, CONTROLQ, request)), resp::OK_NODATA);
    }

    /// A `w` x `h` B8G8R8X8 resource `id` backed at 0x8_0000 (two entries), filled with `fill`.
    fn framebuffer(gpu: &mut Gpu, mem: &GuestMemory, id: u32, (w, h): (u32, u32), fill: [u8; 4]) {
        let bytes = w * h * 4;
        let image: Vec<u8> = fill.iter().copied().cycle().take(bytes as usize).collect();
        mem.write_slice(&image, GuestAddress(0x8_0000)).unwrap();
        ok(gpu, mem, &encode::create_2d(id, 2, w, h));
        let half = bytes / 2;
        ok(gpu, mem, &encode::attach(id, &[(0x8_0000, half), (0x8_0000 + u64::from(half), bytes - half)]));
        ok(gpu, mem, &encode::transfer(id, Rect::new(0, 0, w, h), 0));
    }

    #[test]
    fn a_flushed_scanout_reaches_the_sink() {
        let mem = memory();
        let mut gpu = Gpu::new(&GpuConfig::default()).unwrap();
        let sink = gpu.handle().sink().clone();
        let info = send(&mut gpu, &mem, CONTROLQ, &encode::header(cmd::GET_DISPLAY_INFO, 0, 0));
        assert_eq!(kind(&info), resp::OK_DISPLAY_INFO);
        let displays = parse_display_info(&info[HEADER_SIZE..]);
        assert_eq!(displays[0], DisplayOne { rect: Rect::new(0, 0, 1280, 800), enabled: true });

        framebuffer(&mut gpu, &mem, 1, (64, 32), [10, 20, 30, 0]);
        ok(&mut gpu, &mem, &encode::set_scanout(0, 1, Rect::new(0, 0, 64, 32)));
        let mut fb = Framebuffer::default();
        sink.take_damage(0, &mut fb);
        assert_eq!(fb.rgb(5, 5), (0, 0, 0), "not flushed yet");
        let mut fenced = encode::flush(1, Rect::new(0, 0, 16, 8));
        fenced[4..8].copy_from_slice(&protocol::FLAG_FENCE.to_le_bytes());
        fenced[8..16].copy_from_slice(&77u64.to_le_bytes());
        let response = send(&mut gpu, &mem, CONTROLQ, &fenced);
        assert_eq!(kind(&response), resp::OK_NODATA);
        assert_eq!(u64::from_le_bytes(response[8..16].try_into().unwrap()), 77, "fence echoed");
        assert_eq!(sink.take_damage(0, &mut fb), Some(vec![Rect::new(0, 0, 16, 8)]));
        assert_eq!(fb.rgb(5, 5), (30, 20, 10));
        assert_eq!(fb.rgb(20, 5), (0, 0, 0), "outside the flushed rectangle");
        assert_eq!(gpu.handle().metrics().bytes_transferred.load(Ordering::Relaxed), 64 * 32 * 4);
    }

    #[test]
    fn bad_requests_get_error_responses_and_the_device_goes_on() {
        let mem = memory();
        let mut gpu = Gpu::new(&GpuConfig::default()).unwrap();
        framebuffer(&mut gpu, &mem, 1, (16, 16), [1, 2, 3, 0]);
        let cases: Vec<(&str, Vec<u8>, u32)> = vec![
            ("unknown command", encode::header(0x0777, 0, 0), resp::ERR_UNSPEC),
            ("3D command", encode::header(0x0200, 0, 0), resp::ERR_UNSPEC),
            ("truncated", encode::header(cmd::RESOURCE_CREATE_2D, 0, 0), resp::ERR_UNSPEC),
            ("resource id 0", encode::create_2d(0, 2, 8, 8), resp::ERR_INVALID_RESOURCE_ID),
            ("id in use", encode::create_2d(1, 2, 8, 8), resp::ERR_INVALID_RESOURCE_ID),
            ("bad format", encode::create_2d(2, 1234, 8, 8), resp::ERR_INVALID_PARAMETER),
            ("zero size", encode::create_2d(2, 2, 0, 8), resp::ERR_INVALID_PARAMETER),
            ("huge", encode::create_2d(2, 2, 1 << 31, 1 << 31), resp::ERR_INVALID_PARAMETER),
            ("over the cap", encode::create_2d(2, 2, 16384, 16384), resp::ERR_OUT_OF_MEMORY),
            ("unref unknown", encode::with_u32s(cmd::RESOURCE_UNREF, &[9, 0]), resp::ERR_INVALID_RESOURCE_ID),
            ("scanout 99", encode::set_scanout(99, 1, Rect::new(0, 0, 8, 8)), resp::ERR_INVALID_SCANOUT_ID),
            (
                "scanout off resource",
                encode::set_scanout(0, 1, Rect::new(8, 8, 9, 9)),
                resp::ERR_INVALID_PARAMETER,
            ),
            (
                "scanout unknown",
                encode::set_scanout(0, 5, Rect::new(0, 0, 8, 8)),
                resp::ERR_INVALID_RESOURCE_ID,
            ),
            ("flush overflow", encode::flush(1, Rect::new(u32::MAX, 0, 2, 2)), resp::ERR_INVALID_PARAMETER),
            ("flush unknown", encode::flush(3, Rect::new(0, 0, 1, 1)), resp::ERR_INVALID_RESOURCE_ID),
            (
                "transfer outside",
                encode::transfer(1, Rect::new(0, 10, 16, 7), 0),
                resp::ERR_INVALID_PARAMETER,
            ),
            (
                "transfer past backing",
                encode::transfer(1, Rect::new(0, 0, 16, 16), 64),
                resp::ERR_INVALID_PARAMETER,
            ),
            ("attach outside RAM", encode::attach(1, &[(1 << 50, 4096)]), resp::ERR_UNSPEC),
            ("edid scanout 7", encode::with_u32s(cmd::GET_EDID, &[7, 0]), resp::ERR_INVALID_SCANOUT_ID),
        ];
        for (what, request, expected) in cases {
            let response = send(&mut gpu, &mem, CONTROLQ, &request);
            assert_eq!(kind(&response), expected, "{what}");
        }
        let fresh = Gpu::new(&GpuConfig::default()).unwrap();
        drop(fresh);
        // Backing outside RAM on a resource without backing is a parameter error.
        ok(&mut gpu, &mem, &encode::create_2d(4, 2, 4, 4));
        let response = send(&mut gpu, &mem, CONTROLQ, &encode::attach(4, &[(1 << 50, 64)]));
        assert_eq!(kind(&response), resp::ERR_INVALID_PARAMETER);
        // A header cut short gets ERR_UNSPEC with a zero header.
        let response = send(&mut gpu, &mem, CONTROLQ, &[0u8; 8]);
        assert_eq!(kind(&response), resp::ERR_UNSPEC);
        // Still working.
        ok(&mut gpu, &mem, &encode::set_scanout(0, 1, Rect::new(0, 0, 16, 16)));
        ok(&mut gpu, &mem, &encode::flush(1, Rect::new(0, 0, 16, 16)));
        assert_eq!(gpu.handle().sink().screenshot(0).unwrap().rgb(1, 1), (3, 2, 1));
    }

    #[test]
    fn edid_describes_the_monitor_the_host_asked_for() {
        let mem = memory();
        let mut gpu = Gpu::new(&GpuConfig { width: 1920, height: 1080, ..GpuConfig::default() }).unwrap();
        assert_ne!(gpu.features() & VIRTIO_GPU_F_EDID, 0);
        let response = send(&mut gpu, &mem, CONTROLQ, &encode::with_u32s(cmd::GET_EDID, &[0, 0]));
        assert_eq!(kind(&response), resp::OK_EDID);
        let size = u32::from_le_bytes(response[24..28].try_into().unwrap()) as usize;
        let edid = &response[32..32 + size];
        assert_eq!(size, 128);
        assert_eq!(edid[..8], [0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0]);
        assert_eq!(edid.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0, "checksum");
        // Detailed timing 1 (bytes 54..72): the preferred mode.
        let dtd = &edid[54..72];
        let width = u32::from(dtd[2]) | (u32::from(dtd[4]) >> 4) << 8;
        let height = u32::from(dtd[5]) | (u32::from(dtd[7]) >> 4) << 8;
        assert_eq!((width, height), (1920, 1080));
    }

    #[test]
    fn unref_of_a_shown_resource_disables_its_scanout_and_frees_its_memory() {
        let mem = memory();
        let mut gpu = Gpu::new(&GpuConfig::default()).unwrap();
        framebuffer(&mut gpu, &mem, 1, (16, 16), [1, 2, 3, 0]);
        ok(&mut gpu, &mem, &encode::set_scanout(0, 1, Rect::new(0, 0, 16, 16)));
        assert_eq!(gpu.handle().sink().sizes(), vec![Some((16, 16))]);
        ok(&mut gpu, &mem, &encode::with_u32s(cmd::RESOURCE_UNREF, &[1, 0]));
        assert_eq!(gpu.handle().sink().sizes(), vec![None]);
        assert_eq!(gpu.handle().metrics().resource_bytes.load(Ordering::Relaxed), 0);
        // Thousands of create/unref cycles do not leak against the cap.
        for id in 1..3000 {
            ok(&mut gpu, &mem, &encode::create_2d(id, 2, 256, 256));
            ok(&mut gpu, &mem, &encode::with_u32s(cmd::RESOURCE_UNREF, &[id, 0]));
        }
    }

    #[test]
    fn the_cursor_queue_updates_the_sinks_cursor() {
        let mem = memory();
        let mut gpu = Gpu::new(&GpuConfig::default()).unwrap();
        framebuffer(&mut gpu, &mem, 9, (64, 64), [0, 0, 255, 255]);
        let request = encode::cursor(cmd::UPDATE_CURSOR, 0, 100, 50, 9, (3, 4));
        assert!(send(&mut gpu, &mem, CURSORQ, &request).is_empty(), "no response on the cursor queue");
        let c = gpu.handle().sink().cursor();
        assert!(c.visible);
        assert_eq!((c.x, c.y, c.hot_x, c.hot_y), (100, 50, 3, 4));
        assert_eq!(&c.image.unwrap()[..4], &[0, 0, 255, 255]);
        send(&mut gpu, &mem, CURSORQ, &encode::cursor(cmd::MOVE_CURSOR, 0, 7, 8, 0, (0, 0)));
        assert_eq!((gpu.handle().sink().cursor().x, gpu.handle().sink().cursor().y), (7, 8));
        // A cursor that is not 64x64, or on a scanout that does not exist, is ignored.
        framebuffer(&mut gpu, &mem, 10, (32, 32), [1, 1, 1, 1]);
        send(&mut gpu, &mem, CURSORQ, &encode::cursor(cmd::UPDATE_CURSOR, 0, 1, 1, 10, (0, 0)));
        send(&mut gpu, &mem, CURSORQ, &encode::cursor(cmd::MOVE_CURSOR, 5, 1, 1, 0, (0, 0)));
        assert_eq!(gpu.handle().sink().cursor().x, 7);
        send(&mut gpu, &mem, CURSORQ, &encode::cursor(cmd::UPDATE_CURSOR, 0, 1, 1, 0, (0, 0)));
        assert!(!gpu.handle().sink().cursor().visible, "resource 0 hides the cursor");
    }

    #[test]
    fn a_host_layout_raises_the_display_event_and_changes_display_info() {
        let mem = memory();
        let mut gpu = Gpu::new(&GpuConfig { scanouts: 2, ..GpuConfig::default() }).unwrap();
        let handle = gpu.handle();
        assert_eq!(
            handle.set_layout(&[(1280, 720), (1024, 768), (800, 600)]),
            Err(LayoutError::Count { given: 3, max: 2 })
        );
        assert!(matches!(handle.set_layout(&[(100, 100)]), Err(LayoutError::Size { .. })));
        handle.set_layout(&[(1024, 768), (800, 600)]).unwrap();
        assert!(!gpu.take_config_changed());
        gpu.handle_host_event(0, &mut [], &mem).unwrap();
        assert!(gpu.take_config_changed());
        let mut events = [0u8; 4];
        gpu.read_config(0, &mut events);
        assert_eq!(u32::from_le_bytes(events), EVENT_DISPLAY);
        let info = send(&mut gpu, &mem, CONTROLQ, &encode::header(cmd::GET_DISPLAY_INFO, 0, 0));
        let displays = parse_display_info(&info[HEADER_SIZE..]);
        assert_eq!(displays[0].rect, Rect::new(0, 0, 1024, 768));
        assert_eq!(displays[1], DisplayOne { rect: Rect::new(1024, 0, 800, 600), enabled: true });
        gpu.write_config(4, &EVENT_DISPLAY.to_le_bytes());
        gpu.read_config(0, &mut events);
        assert_eq!(events, [0; 4], "events_clear acknowledges");
        let mut n = [0u8; 4];
        gpu.read_config(8, &mut n);
        assert_eq!(u32::from_le_bytes(n), 2);
    }
}
