//! The virtio-pci modern transport (virtio 1.2, 4.1): one PCI function per [`VirtioDevice`].
//!
//! BAR0 (64-bit memory, 32 KiB) holds everything:
//!
//! | offset   | what |
//! | -------- | ---- |
//! | `0x0000` | common configuration ([`common_cfg`]) |
//! | `0x1000` | ISR status |
//! | `0x2000` | device-specific configuration (forwarded to the device) |
//! | `0x3000` | queue notifications, 4 bytes per queue (an ioeventfd each) |
//! | `0x4000` | MSI-X table |
//! | `0x5000` | MSI-X pending-bit array |
//!
//! On `DRIVER_OK` the queues are built from the registers, validated, and handed with the
//! device to a [`worker`] thread; on reset (status 0) the worker is stopped, the device comes
//! back and is reset. While the worker owns the device, config reads and writes go through it
//! ([`WorkerHandle::read_config`]), so e.g. the GPU's `events_clear` reaches the device.
//! Anything the guest writes is checked here: bad queue sizes or addresses leave the queue
//! disabled, features the device did not offer fail FEATURES_OK, and a broken activation sets
//! DEVICE_NEEDS_RESET with a config interrupt. Nothing the guest writes can panic the VMM.

pub mod common_cfg;
pub mod interrupt;

use std::sync::Arc;
use std::sync::atomic::Ordering;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::bus::{BusDevice, fill_le, le_value};
use crate::interrupts::VmResources;
use crate::pci::PciDevice;
use crate::pci::config::{CAP_ID_MSIX, CAP_ID_VENDOR, PciConfiguration, PciIdentity};
use crate::pci::msix::{Msix, TableWrite};
use crate::vhost_user::VhostUserFrontend;
use common_cfg::*;
use interrupt::{InterruptLines, WorkerInterrupt};
use pleiades_virtio::worker::{self, ActiveQueue, WorkerHandle};
use pleiades_virtio::{DeviceType, GuestMemory, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VirtioDevice};

/// BAR0 layout.
pub const BAR_SIZE: u64 = 0x8000;
pub const COMMON_OFFSET: u64 = 0x0000;
pub const ISR_OFFSET: u64 = 0x1000;
pub const DEVICE_CFG_OFFSET: u64 = 0x2000;
pub const DEVICE_CFG_SIZE: u64 = 0x1000;
pub const NOTIFY_OFFSET: u64 = 0x3000;
pub const NOTIFY_OFF_MULTIPLIER: u32 = 4;
pub const MSIX_TABLE_OFFSET: u64 = 0x4000;
pub const MSIX_PBA_OFFSET: u64 = 0x5000;

/// `cfg_type` of the virtio vendor capabilities.
const VIRTIO_PCI_CAP_COMMON_CFG: u8 = 1;
const VIRTIO_PCI_CAP_NOTIFY_CFG: u8 = 2;
const VIRTIO_PCI_CAP_ISR_CFG: u8 = 3;
const VIRTIO_PCI_CAP_DEVICE_CFG: u8 = 4;

const VIRTIO_VENDOR_ID: u16 = 0x1af4;
const VIRTIO_SUBSYSTEM_ID: u16 = 0x1100;

/// Errors creating the transport.
#[derive(Debug, thiserror::Error)]
pub enum VirtioPciError {
    #[error("virtio-{0} offers no queues or more than the transport supports (1..=1024)")]
    Queues(&'static str),
    #[error("virtio-{device}: cannot set up MSI-X vectors: {source}")]
    Vectors { device: &'static str, source: std::io::Error },
    #[error("virtio-{device}: cannot create a queue notification eventfd: {source}")]
    EventFd { device: &'static str, source: std::io::Error },
}

/// Counters for `status()`.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct TransportMetrics {
    pub activations: u64,
    pub resets: u64,
    pub refused_activations: u64,
}

/// Who serves a device's queues.
pub enum QueueServer {
    /// A worker thread of this process ([`worker`]).
    InProcess(Box<dyn VirtioDevice>),
    /// An external vhost-user backend.
    VhostUser(VhostUserFrontend),
}

impl QueueServer {
    pub fn device_type(&self) -> DeviceType {
        match self {
            Self::InProcess(d) => d.device_type(),
            Self::VhostUser(f) => f.device_type(),
        }
    }
}

impl std::fmt::Debug for QueueServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::InProcess(d) => write!(f, "InProcess({})", d.device_type().name()),
            Self::VhostUser(v) => write!(f, "{v:?}"),
        }
    }
}

enum Serving {
    /// The device is here between activations and in the worker while it runs.
    Local {
        device: Option<Box<dyn VirtioDevice>>,
        worker: Option<WorkerHandle>,
    },
    Remote(VhostUserFrontend),
}

/// A virtio device on PCI.
pub struct VirtioPciDevice {
    name: &'static str,
    device_type: DeviceType,
    config: PciConfiguration,
    msix_cap_offset: usize,
    common: CommonConfig,
    device_features: u64,
    queue_max_sizes: Vec<u16>,
    serving: Serving,
    lines: Arc<InterruptLines>,
    notify: Vec<EventFd>,
    bar_addr: Option<u64>,
    resources: Arc<dyn VmResources>,
    mem: GuestMemory,
    metrics: TransportMetrics,
    /// The device was lost (its worker died, its backend went away): it stays in NEEDS_RESET.
    lost: bool,
}

impl std::fmt::Debug for VirtioPciDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioPciDevice")
            .field("device", &self.name)
            .field("status", &self.common.status)
            .field("bar", &self.bar_addr)
            .finish_non_exhaustive()
    }
}

fn virtio_cap(cfg_type: u8, offset: u64, length: u64, extra: Option<u32>) -> Vec<u8> {
    let cap_len = if extra.is_some() { 20 } else { 16 };
    let mut body = vec![cap_len, cfg_type, 0 /* BAR0 */, 0, 0, 0];
    body.extend_from_slice(&(offset as u32).to_le_bytes());
    body.extend_from_slice(&(length as u32).to_le_bytes());
    if let Some(extra) = extra {
        body.extend_from_slice(&extra.to_le_bytes());
    }
    body
}

impl VirtioPciDevice {
    /// Wraps `backend`; its BAR is placed at `bar_addr` with memory decoding on.
    pub fn new(
        backend: QueueServer,
        mem: GuestMemory,
        resources: Arc<dyn VmResources>,
        bar_addr: u64,
    ) -> Result<Self, VirtioPciError> {
        let device_type = backend.device_type();
        let name = device_type.name();
        let (queue_max_sizes, features) = match &backend {
            QueueServer::InProcess(d) => (d.queue_max_sizes().to_vec(), d.features()),
            QueueServer::VhostUser(f) => (f.queue_max_sizes().to_vec(), f.features()),
        };
        if queue_max_sizes.is_empty() || queue_max_sizes.len() > 1024 {
            return Err(VirtioPciError::Queues(name));
        }
        let num_queues = queue_max_sizes.len() as u64;
        let (class, subclass) = match device_type {
            DeviceType::Block => (0x01, 0x00), // SCSI storage, as QEMU gives virtio-blk
            DeviceType::Console => (0x07, 0x80),
            DeviceType::Gpu => (0x03, 0x80),
            DeviceType::Input => (0x09, 0x80),
            DeviceType::Sound => (0x04, 0x01),
            _ => (0xff, 0x00),
        };
        let mut config = PciConfiguration::new(PciIdentity {
            vendor: VIRTIO_VENDOR_ID,
            device: device_type.pci_device_id(),
            class,
            subclass,
            prog_if: 0,
            revision: 1,
            subsystem_vendor: VIRTIO_VENDOR_ID,
            subsystem: VIRTIO_SUBSYSTEM_ID,
        });
        config.add_bar64(BAR_SIZE);
        config.set_bar_address(bar_addr);
        config.set_command(crate::pci::config::COMMAND_MEMORY);
        let caps = [
            virtio_cap(VIRTIO_PCI_CAP_COMMON_CFG, COMMON_OFFSET, COMMON_CFG_SIZE, None),
            virtio_cap(
                VIRTIO_PCI_CAP_NOTIFY_CFG,
                NOTIFY_OFFSET,
                num_queues * u64::from(NOTIFY_OFF_MULTIPLIER),
                Some(NOTIFY_OFF_MULTIPLIER),
            ),
            virtio_cap(VIRTIO_PCI_CAP_ISR_CFG, ISR_OFFSET, 1, None),
            virtio_cap(VIRTIO_PCI_CAP_DEVICE_CFG, DEVICE_CFG_OFFSET, DEVICE_CFG_SIZE, None),
        ];
        for cap in &caps {
            config.add_capability(CAP_ID_VENDOR, cap, &[]).expect("four virtio caps fit in config space");
        }
        let vectors = num_queues as u16 + 1;
        let msix = Msix::new(vectors);
        let mut msix_body = Vec::new();
        msix_body.extend_from_slice(&(vectors - 1).to_le_bytes());
        msix_body.extend_from_slice(&(MSIX_TABLE_OFFSET as u32).to_le_bytes());
        msix_body.extend_from_slice(&(MSIX_PBA_OFFSET as u32).to_le_bytes());
        let msix_cap_offset = config
            .add_capability(CAP_ID_MSIX, &msix_body, &[0xc000_0000])
            .expect("the MSI-X cap fits in config space");
        let vectors = (0..vectors)
            .map(|_| resources.allocate_msi())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| VirtioPciError::Vectors { device: name, source })?;
        let notify = (0..num_queues)
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| VirtioPciError::EventFd { device: name, source })?;
        Ok(Self {
            name,
            device_type,
            config,
            msix_cap_offset,
            common: CommonConfig::new(&queue_max_sizes),
            device_features: features | VIRTIO_F_VERSION_1,
            queue_max_sizes,
            serving: match backend {
                QueueServer::InProcess(device) => Serving::Local { device: Some(device), worker: None },
                QueueServer::VhostUser(frontend) => Serving::Remote(frontend),
            },
            lines: Arc::new(InterruptLines::new(msix, vectors)),
            notify,
            bar_addr: None,
            resources,
            mem,
            metrics: TransportMetrics::default(),
            lost: false,
        })
    }

    pub fn device_type(&self) -> DeviceType {
        self.device_type
    }

    /// The device status as the driver reads it.
    pub fn status(&self) -> u8 {
        let needs_reset = self.lost || self.lines.needs_reset.load(Ordering::SeqCst);
        self.common.status | if needs_reset { STATUS_NEEDS_RESET } else { 0 }
    }

    /// Tells the driver its device's configuration changed (the config vector). For devices
    /// a vhost-user backend serves: the backend owns the config space but has no channel to
    /// interrupt the guest, so the VMM does it for the host-side change it made.
    pub fn signal_config_change(&self) {
        if let Err(e) = self.lines.signal_config() {
            tracing::warn!("virtio-{}: cannot signal a configuration change: {e}", self.name);
        }
    }

    /// State and counters for `VmHandle::status`.
    pub fn status_json(&self) -> serde_json::Value {
        let m = &self.lines.metrics;
        serde_json::json!({
            "type": self.name,
            "transport": "virtio-pci",
            "backend": match self.serving {
                Serving::Local { .. } => "in-process",
                Serving::Remote(_) => "vhost-user",
            },
            "bar": self.bar_addr.map(|a| format!("{a:#x}")),
            "status": self.status(),
            "driver_ok": self.common.status & STATUS_DRIVER_OK != 0,
            "needs_reset": self.status() & STATUS_NEEDS_RESET != 0,
            "metrics": {
                "activations": self.metrics.activations,
                "resets": self.metrics.resets,
                "refused_activations": self.metrics.refused_activations,
                "queue_interrupts": m.queue_interrupts.load(Ordering::Relaxed),
                "config_interrupts": m.config_interrupts.load(Ordering::Relaxed),
                "masked_interrupts": m.masked_interrupts.load(Ordering::Relaxed),
            },
        })
    }

    /// Stops the device and gives it back, reset: for a reboot. The transport is dead after.
    pub fn take_backend(&mut self) -> Option<QueueServer> {
        self.stop_serving();
        self.unregister_notify();
        match std::mem::replace(&mut self.serving, Serving::Local { device: None, worker: None }) {
            Serving::Local { device, .. } => {
                let mut device = device?;
                device.reset();
                Some(QueueServer::InProcess(device))
            }
            Serving::Remote(frontend) => Some(QueueServer::VhostUser(frontend)),
        }
    }

    /// Stops the worker (taking the device back) or the backend's rings.
    fn stop_serving(&mut self) {
        match &mut self.serving {
            Serving::Local { device, worker } => {
                if let Some(handle) = worker.take() {
                    match handle.stop() {
                        Some(d) => *device = Some(d),
                        None => {
                            tracing::error!("virtio-{}: the worker died; the device is lost", self.name);
                            self.lost = true;
                        }
                    }
                }
            }
            Serving::Remote(frontend) => {
                // A backend that cannot stop its rings has gone away or broke the protocol.
                if let Err(e) = frontend.reset() {
                    tracing::error!("virtio-{} (vhost-user): {e}; the device is lost", self.name);
                    self.lost = true;
                }
            }
        }
    }

    fn register_notify(&self, bar: u64) {
        for (i, event) in self.notify.iter().enumerate() {
            let addr = bar + NOTIFY_OFFSET + i as u64 * u64::from(NOTIFY_OFF_MULTIPLIER);
            if let Err(e) = self.resources.register_ioevent(event, addr) {
                // The MMIO write path below still delivers the notification, just slower.
                tracing::warn!("virtio-{}: no ioeventfd for queue {i} at {addr:#x}: {e}", self.name);
            }
        }
    }

    fn unregister_notify(&mut self) {
        if let Some(bar) = self.bar_addr.take() {
            for (i, event) in self.notify.iter().enumerate() {
                let addr = bar + NOTIFY_OFFSET + i as u64 * u64::from(NOTIFY_OFF_MULTIPLIER);
                let _ = self.resources.unregister_ioevent(event, addr);
            }
        }
    }

    fn reset(&mut self) {
        self.stop_serving();
        if let Serving::Local { device: Some(device), .. } = &mut self.serving {
            device.reset();
        }
        for event in &self.notify {
            let _ = event.read();
        }
        self.common.reset();
        self.lines.isr.store(0, Ordering::SeqCst);
        self.lines.needs_reset.store(false, Ordering::SeqCst);
        self.lines.config_vector.store(NO_VECTOR, Ordering::SeqCst);
        self.metrics.resets += 1;
    }

    fn write_status(&mut self, value: u8) {
        if value == 0 {
            self.reset();
            return;
        }
        let old = self.common.status;
        // The driver only ever adds bits (clearing takes a reset); NEEDS_RESET is the device's.
        let mut new = old | (value & !STATUS_NEEDS_RESET);
        if new & STATUS_FEATURES_OK != 0 && old & STATUS_FEATURES_OK == 0 && !self.accept_features() {
            new &= !STATUS_FEATURES_OK;
        }
        let driver_ok = new & STATUS_DRIVER_OK != 0 && old & STATUS_DRIVER_OK == 0;
        if driver_ok && new & STATUS_FEATURES_OK == 0 {
            tracing::warn!("virtio-{}: DRIVER_OK without FEATURES_OK; refusing to activate", self.name);
            new &= !STATUS_DRIVER_OK;
            self.refuse_activation();
        }
        self.common.status = new;
        if driver_ok && new & STATUS_DRIVER_OK != 0 {
            self.activate();
        }
    }

    /// FEATURES_OK: the driver's features must be offered ones and include VERSION_1.
    fn accept_features(&mut self) -> bool {
        let features = self.common.driver_features;
        if features & !self.device_features != 0 || features & VIRTIO_F_VERSION_1 == 0 {
            tracing::warn!(
                "virtio-{}: driver features {features:#x} are not a subset of {:#x} with VERSION_1",
                self.name,
                self.device_features
            );
            return false;
        }
        match &mut self.serving {
            Serving::Local { device: Some(device), .. } => {
                device.ack_features(features);
                true
            }
            Serving::Local { device: None, .. } => false,
            // The backend gets the features with the rest at DRIVER_OK.
            Serving::Remote(_) => true,
        }
    }

    fn refuse_activation(&mut self) {
        self.metrics.refused_activations += 1;
        self.lines.needs_reset.store(true, Ordering::SeqCst);
        if let Err(e) = self.lines.signal_config() {
            tracing::warn!("virtio-{}: cannot signal the config change: {e}", self.name);
        }
    }

    fn build_queue(&self, index: usize, regs: &QueueRegs) -> Result<Queue, String> {
        let mut queue = Queue::new(regs.max_size).map_err(|e| format!("queue {index}: {e:?}"))?;
        if !regs.enabled {
            return Ok(queue);
        }
        queue.try_set_size(regs.size).map_err(|e| format!("queue {index}: size {}: {e:?}", regs.size))?;
        queue
            .try_set_desc_table_address(GuestAddress(regs.desc))
            .map_err(|e| format!("queue {index}: {e:?}"))?;
        queue
            .try_set_avail_ring_address(GuestAddress(regs.driver))
            .map_err(|e| format!("queue {index}: {e:?}"))?;
        queue
            .try_set_used_ring_address(GuestAddress(regs.device))
            .map_err(|e| format!("queue {index}: {e:?}"))?;
        queue.set_event_idx(self.common.driver_features & VIRTIO_RING_F_EVENT_IDX != 0);
        queue.set_ready(true);
        if !queue.is_valid(&self.mem) {
            return Err(format!("queue {index}: its rings are not inside guest memory"));
        }
        Ok(queue)
    }

    fn activate(&mut self) {
        let mut queues = Vec::new();
        for (i, regs) in self.common.queues.iter().enumerate() {
            let kick = match self.notify[i].try_clone() {
                Ok(kick) => kick,
                Err(e) => {
                    tracing::error!("virtio-{}: cannot clone a notification eventfd: {e}", self.name);
                    return self.refuse_activation();
                }
            };
            match self.build_queue(i, regs) {
                Ok(queue) => queues.push(ActiveQueue { queue, kick }),
                Err(e) => {
                    tracing::warn!("virtio-{}: {e}; the device needs a reset", self.name);
                    return self.refuse_activation();
                }
            }
        }
        let device = match &mut self.serving {
            Serving::Local { device, .. } => device.take(),
            Serving::Remote(_) => return self.activate_remote(),
        };
        let Some(device) = device else { return self.refuse_activation() };
        let interrupt = Arc::new(WorkerInterrupt {
            lines: self.lines.clone(),
            queue_vectors: self.common.queues.iter().map(|q| q.msix_vector).collect(),
        });
        match worker::spawn(self.name, device, self.mem.clone(), queues, interrupt) {
            Ok(handle) => {
                if let Serving::Local { worker, .. } = &mut self.serving {
                    *worker = Some(handle);
                }
                self.metrics.activations += 1;
                // Buffers the driver made available before DRIVER_OK are looked at now.
                for event in &self.notify {
                    let _ = event.write(1);
                }
            }
            Err(e) => {
                tracing::error!("virtio-{}: cannot start the worker: {e}", self.name);
                self.lost = true;
                self.refuse_activation();
            }
        }
    }

    /// DRIVER_OK for a vhost-user backend: the queues were validated at enable time.
    fn activate_remote(&mut self) {
        let Serving::Remote(frontend) = &mut self.serving else { return };
        let spare = match EventFd::new(EFD_NONBLOCK) {
            Ok(e) => e,
            Err(e) => {
                tracing::error!("virtio-{}: {e}", self.name);
                return self.refuse_activation();
            }
        };
        let calls: Vec<&EventFd> = self
            .common
            .queues
            .iter()
            .map(|q| self.lines.vectors.get(usize::from(q.msix_vector)).map_or(&spare, |v| &v.irqfd))
            .collect();
        let result = frontend.activate(
            &self.mem,
            self.common.driver_features,
            &self.common.queues,
            &self.notify,
            &calls,
        );
        match result {
            Ok(()) => self.metrics.activations += 1,
            Err(e) => {
                tracing::warn!("virtio-{} (vhost-user): {e}; the device needs a reset", self.name);
                self.refuse_activation();
            }
        }
    }

    fn read_common(&self, offset: u64, data: &mut [u8]) {
        let c = &self.common;
        let q = c.selected();
        let value: u64 = match (offset, data.len()) {
            (DEVICE_FEATURE_SELECT, 4) => c.device_feature_select.into(),
            (DEVICE_FEATURE, 4) => match c.device_feature_select {
                0 => self.device_features & 0xffff_ffff,
                1 => self.device_features >> 32,
                _ => 0,
            },
            (DRIVER_FEATURE_SELECT, 4) => c.driver_feature_select.into(),
            (DRIVER_FEATURE, 4) => match c.driver_feature_select {
                0 => c.driver_features & 0xffff_ffff,
                1 => c.driver_features >> 32,
                _ => 0,
            },
            (MSIX_CONFIG, 2) => self.lines.config_vector.load(Ordering::SeqCst).into(),
            (NUM_QUEUES, 2) => self.queue_max_sizes.len() as u64,
            (DEVICE_STATUS, 1) => self.status().into(),
            (CONFIG_GENERATION, 1) => c.config_generation.into(),
            (QUEUE_SELECT, 2) => c.queue_select.into(),
            (QUEUE_SIZE, 2) => q.map_or(0, |q| q.size.into()),
            (QUEUE_MSIX_VECTOR, 2) => q.map_or(NO_VECTOR.into(), |q| q.msix_vector.into()),
            (QUEUE_ENABLE, 2) => q.map_or(0, |q| q.enabled.into()),
            (QUEUE_NOTIFY_OFF, 2) => q.map_or(0, |_| c.queue_select.into()),
            (QUEUE_DESC_LO, 4) => q.map_or(0, |q| q.desc & 0xffff_ffff),
            (QUEUE_DESC_HI, 4) => q.map_or(0, |q| q.desc >> 32),
            (QUEUE_DRIVER_LO, 4) => q.map_or(0, |q| q.driver & 0xffff_ffff),
            (QUEUE_DRIVER_HI, 4) => q.map_or(0, |q| q.driver >> 32),
            (QUEUE_DEVICE_LO, 4) => q.map_or(0, |q| q.device & 0xffff_ffff),
            (QUEUE_DEVICE_HI, 4) => q.map_or(0, |q| q.device >> 32),
            _ => 0,
        };
        fill_le(data, value);
    }

    fn write_common(&mut self, offset: u64, data: &[u8]) {
        let value = le_value(data);
        let live = self.common.status & STATUS_DRIVER_OK != 0;
        let features_locked = self.common.status & STATUS_FEATURES_OK != 0;
        let vectors = self.lines.vectors.len() as u64;
        // A vector number the function does not have reads back as NO_VECTOR: "no room".
        let vector = |v: u64| if v < vectors { v as u16 } else { NO_VECTOR };
        match (offset, data.len()) {
            (DEVICE_FEATURE_SELECT, 4) => self.common.device_feature_select = value as u32,
            (DRIVER_FEATURE_SELECT, 4) => self.common.driver_feature_select = value as u32,
            (DRIVER_FEATURE, 4) if !features_locked => match self.common.driver_feature_select {
                0 => set_half(&mut self.common.driver_features, false, value as u32),
                1 => set_half(&mut self.common.driver_features, true, value as u32),
                _ => {}
            },
            (MSIX_CONFIG, 2) => self.lines.config_vector.store(vector(value), Ordering::SeqCst),
            (DEVICE_STATUS, 1) => self.write_status(value as u8),
            (QUEUE_SELECT, 2) => self.common.queue_select = value as u16,
            (QUEUE_SIZE, 2) if !live => {
                if let Some(q) = self.common.selected_mut() {
                    q.size = value as u16;
                }
            }
            (QUEUE_MSIX_VECTOR, 2) if !live => {
                if let Some(q) = self.common.selected_mut() {
                    q.msix_vector = vector(value);
                }
            }
            (QUEUE_ENABLE, 2) if !live && value == 1 => self.enable_selected_queue(),
            (QUEUE_DESC_LO..=QUEUE_DEVICE_HI, 4) if !live && offset.is_multiple_of(4) => {
                if let Some(q) = self.common.selected_mut() {
                    let high = offset % 8 == 4;
                    let reg = match offset & !4 {
                        QUEUE_DESC_LO => &mut q.desc,
                        QUEUE_DRIVER_LO => &mut q.driver,
                        _ => &mut q.device,
                    };
                    set_half(reg, high, value as u32);
                }
            }
            _ => tracing::trace!("virtio-{}: ignored common cfg write {offset:#x}/{}", self.name, data.len()),
        }
    }

    /// `queue_enable = 1`: the queue is checked now and stays disabled if it is unusable.
    fn enable_selected_queue(&mut self) {
        let index = usize::from(self.common.queue_select);
        let Some(regs) = self.common.queues.get(index).copied() else { return };
        let candidate = QueueRegs { enabled: true, ..regs };
        match self.build_queue(index, &candidate) {
            Ok(_) => self.common.queues[index].enabled = true,
            Err(e) => tracing::warn!("virtio-{}: not enabling {e}", self.name),
        }
    }

    fn write_msix_control(&mut self) {
        let dword = self.config.read(self.msix_cap_offset / 4);
        let control = (dword >> 16) as u16;
        let fire = self.lines.msix.lock().unwrap_or_else(|e| e.into_inner()).set_control(control);
        for vector in fire {
            let _ = self.lines.fire(vector);
        }
    }
}

impl BusDevice for VirtioPciDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match offset {
            o if o < COMMON_OFFSET + COMMON_CFG_SIZE => self.read_common(o, data),
            ISR_OFFSET => {
                // Reading the ISR acknowledges it.
                let isr = self.lines.isr.swap(0, Ordering::SeqCst);
                fill_le(data, isr.into());
            }
            o if (DEVICE_CFG_OFFSET..DEVICE_CFG_OFFSET + DEVICE_CFG_SIZE).contains(&o) => {
                let o = o - DEVICE_CFG_OFFSET;
                match &mut self.serving {
                    Serving::Local { device: Some(device), .. } => device.read_config(o, data),
                    Serving::Local { device: None, worker: Some(worker) } => worker.read_config(o, data),
                    Serving::Local { device: None, worker: None } => data.fill(0),
                    Serving::Remote(frontend) => frontend.read_config(o, data),
                }
            }
            o if (MSIX_TABLE_OFFSET..MSIX_PBA_OFFSET).contains(&o) => self
                .lines
                .msix
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .read_table(o - MSIX_TABLE_OFFSET, data),
            o if (MSIX_PBA_OFFSET..BAR_SIZE).contains(&o) => {
                self.lines.msix.lock().unwrap_or_else(|e| e.into_inner()).read_pba(o - MSIX_PBA_OFFSET, data)
            }
            _ => data.fill(0),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match offset {
            o if o < COMMON_OFFSET + COMMON_CFG_SIZE => self.write_common(o, data),
            o if (DEVICE_CFG_OFFSET..DEVICE_CFG_OFFSET + DEVICE_CFG_SIZE).contains(&o) => {
                match &mut self.serving {
                    Serving::Local { device: Some(device), .. } => {
                        device.write_config(o - DEVICE_CFG_OFFSET, data)
                    }
                    Serving::Local { device: None, worker: Some(worker) } => {
                        worker.write_config(o - DEVICE_CFG_OFFSET, data)
                    }
                    Serving::Local { device: None, worker: None } => {}
                    Serving::Remote(frontend) => frontend.write_config(o - DEVICE_CFG_OFFSET, data),
                }
            }
            o if (NOTIFY_OFFSET..NOTIFY_OFFSET + self.notify.len() as u64 * 4).contains(&o) => {
                // Only reached when no ioeventfd caught the write.
                let queue = ((o - NOTIFY_OFFSET) / u64::from(NOTIFY_OFF_MULTIPLIER)) as usize;
                let _ = self.notify[queue].write(1);
            }
            o if (MSIX_TABLE_OFFSET..MSIX_PBA_OFFSET).contains(&o) => {
                let result = self
                    .lines
                    .msix
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .write_table(o - MSIX_TABLE_OFFSET, data);
                match result {
                    TableWrite::Message(v) => {
                        let message = self.lines.msix.lock().unwrap_or_else(|e| e.into_inner()).message(v);
                        if let Some(gsi) = self.lines.vectors.get(usize::from(v)).map(|m| m.gsi)
                            && let Err(e) = self.resources.route_msi(gsi, message)
                        {
                            tracing::warn!("virtio-{}: cannot route MSI-X vector {v}: {e}", self.name);
                        }
                    }
                    TableWrite::UnmaskedPending(v) => {
                        let _ = self.lines.fire(v);
                    }
                    TableWrite::Nothing => {}
                }
            }
            _ => {}
        }
    }
}

impl PciDevice for VirtioPciDevice {
    fn read_config(&mut self, reg: usize) -> u32 {
        self.config.read(reg)
    }

    fn write_config(&mut self, reg: usize, offset: usize, data: &[u8]) {
        self.config.write(reg, offset, data);
        if reg == self.msix_cap_offset / 4 {
            self.write_msix_control();
        }
    }

    fn bar_mapping(&self) -> Option<(u64, u64)> {
        self.config.active_bar()
    }

    fn bar_moved(&mut self, addr: Option<u64>) {
        self.unregister_notify();
        if let Some(addr) = addr {
            self.register_notify(addr);
            self.bar_addr = Some(addr);
        }
    }
}

#[cfg(test)]
mod tests;
