//! The one virtio device model.
//!
//! A device implements [`VirtioDevice`]: its identity (type, features, queue sizes, config space)
//! and what it does with the buffers of a queue ([`VirtioDevice::process_queue`]). It never sees
//! a transport: the same device runs
//! - in-process, where the VMM's virtio-pci transport hands the queues to a [`worker`] thread
//!   that owns them and wakes on ioeventfds, and
//! - out of process, where [`crate::vhost_user`] serves it as a vhost-user backend to
//!   Pleiades' VMM or to QEMU (`-device vhost-user-*-pci`).
//!
//! Every descriptor from the guest is untrusted. Devices parse a chain into a typed request
//! first (`request.rs` in each device folder) and only then execute it; a malformed chain is
//! completed with an error status (or zero length where the device has no status), and a
//! corrupt ring makes the queue report [`DeviceError::QueueBroken`], on which the transport
//! sets `DEVICE_NEEDS_RESET` and the device waits for the driver to reset it.
//!
//! To add a device, copy the smallest one, [`rng`], and adapt it.

pub mod console;
pub mod gpu;
pub mod input;
pub mod rng;
pub mod snd;
pub mod vhost_user;
pub mod vsock;
pub mod worker;

use std::os::fd::RawFd;

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;

/// Guest memory as every device sees it.
pub type GuestMemory = GuestMemoryMmap<()>;

/// `VIRTIO_F_VERSION_1`: every Pleiades device is a virtio 1.x device.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// `VIRTIO_RING_F_INDIRECT_DESC` (virtio-queue follows indirect tables for every device).
pub const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;
/// `VIRTIO_RING_F_EVENT_IDX`.
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;
/// `VIRTIO_F_ACCESS_PLATFORM` is deliberately not offered: devices see guest-physical addresses.
/// Device status bit set when the device needs a reset (virtio 1.2, 2.1).
pub const DEVICE_NEEDS_RESET: u8 = 0x40;

/// Device types (virtio 1.2, 5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum DeviceType {
    /// virtio-blk: served by QEMU's block layer (qemu-storage-daemon over vhost-user), never
    /// in-process.
    Block = 2,
    Console = 3,
    Rng = 4,
    Gpu = 16,
    Input = 18,
    Vsock = 19,
    Sound = 25,
}

impl DeviceType {
    /// The virtio device id.
    pub fn id(self) -> u32 {
        self as u32
    }

    /// The modern virtio-pci device id (0x1040 + type).
    pub fn pci_device_id(self) -> u16 {
        0x1040 + self as u16
    }

    /// The name used on command lines (`pleiades-host device rng`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Block => "block",
            Self::Console => "console",
            Self::Rng => "rng",
            Self::Gpu => "gpu",
            Self::Input => "input",
            Self::Vsock => "vsock",
            Self::Sound => "sound",
        }
    }

    /// The largest size of each of the device's queues, in queue order: what Pleiades' devices
    /// offer and accept, and what a vhost-user frontend offers the driver for a backend of this
    /// type (the protocol cannot ask a backend, and one refuses a larger ring outright). The
    /// sizes QEMU gives the same devices.
    pub const fn queue_max_sizes(self) -> &'static [u16] {
        match self {
            // one request queue per vCPU (the backend says how many)
            Self::Block => &[256],
            Self::Console => &[256, 256],
            Self::Rng => &[256],
            // controlq, cursorq
            Self::Gpu => &[256, 64],
            // eventq, statusq
            Self::Input => &[64, 64],
            // rx, tx, event
            Self::Vsock => &[128, 128, 128],
            // controlq, eventq, txq, rxq
            Self::Sound => &[256, 256, 256, 256],
        }
    }
}

/// The devices Pleiades offers a VM, by the names users give them (`--device rng`, `pleiades-host
/// device keyboard`). Finer than [`DeviceType`]: keyboard, tablet and mouse are all virtio-input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeviceKind {
    Rng,
    Console,
    Keyboard,
    Tablet,
    Mouse,
    Gpu,
    Sound,
    /// virtio-vsock: the guest agent's link to its VM process.
    Vsock,
}

impl DeviceKind {
    /// Every kind, in the order help texts list them.
    pub const ALL: [Self; 8] = [
        Self::Rng,
        Self::Console,
        Self::Keyboard,
        Self::Tablet,
        Self::Mouse,
        Self::Gpu,
        Self::Sound,
        Self::Vsock,
    ];

    /// The name on command lines and in status reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::Rng => "rng",
            Self::Console => "console",
            Self::Keyboard => "keyboard",
            Self::Tablet => "tablet",
            Self::Mouse => "mouse",
            Self::Gpu => "gpu",
            Self::Sound => "sound",
            Self::Vsock => "vsock",
        }
    }

    /// The virtio device type that carries it.
    pub fn device_type(self) -> DeviceType {
        match self {
            Self::Rng => DeviceType::Rng,
            Self::Console => DeviceType::Console,
            Self::Keyboard | Self::Tablet | Self::Mouse => DeviceType::Input,
            Self::Gpu => DeviceType::Gpu,
            Self::Sound => DeviceType::Sound,
            Self::Vsock => DeviceType::Vsock,
        }
    }

    /// A virtio-input device (it takes host events).
    pub fn is_input(self) -> bool {
        self.device_type() == DeviceType::Input
    }
}

impl std::fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for DeviceKind {
    type Err = String;
    /// A kind by its name; `snd` is also the sound device.
    fn from_str(s: &str) -> Result<Self, String> {
        let name = if s == "snd" { "sound" } else { s };
        Self::ALL.into_iter().find(|k| k.name() == name).ok_or_else(|| {
            let known: Vec<_> = Self::ALL.iter().map(|k| k.name()).collect();
            format!("unknown device {s:?}; known: {}", known.join(", "))
        })
    }
}

/// What can go wrong while a device processes a queue.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The ring itself is corrupt (e.g. the available index jumped past the queue size): the
    /// queue cannot be trusted until the driver resets the device.
    #[error("queue {queue} is broken: {reason}")]
    QueueBroken { queue: usize, reason: String },
    /// Writing the used ring failed (its address is outside guest memory).
    #[error("queue {queue}: cannot complete a request: {reason}")]
    UsedRing { queue: usize, reason: String },
    /// A host-side resource failed (e.g. the entropy source).
    #[error("{0}")]
    Host(String),
}

/// A virtio device, independent of the transport that carries it.
pub trait VirtioDevice: Send {
    /// The device type.
    fn device_type(&self) -> DeviceType;

    /// The maximum size of each queue; its length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];

    /// Feature bits the device offers (must include [`VIRTIO_F_VERSION_1`]).
    fn features(&self) -> u64;

    /// The features the driver accepted (a subset of [`Self::features`]).
    fn ack_features(&mut self, features: u64);

    /// The size of the device-specific configuration space in bytes (0: none).
    fn config_size(&self) -> usize;

    /// Reads the device-specific configuration space. Out-of-range bytes read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);

    /// Writes the device-specific configuration space. Read-only fields ignore writes.
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    /// Handles the available buffers of queue `index`. Returns whether used buffers were added,
    /// i.e. whether the driver may need an interrupt.
    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &GuestMemory,
    ) -> Result<bool, DeviceError>;

    /// Host-side event sources besides the queues (e.g. console input), polled by the worker.
    fn host_events(&self) -> Vec<RawFd> {
        Vec::new()
    }

    /// One of [`Self::host_events`] is readable. Returns the queues that got used buffers.
    /// The sources are polled level-triggered, so the device must consume the readiness even
    /// when `queues` is empty (it is then broken and waiting for a reset: it queues nothing).
    fn handle_host_event(
        &mut self,
        _event: usize,
        _queues: &mut [Queue],
        _mem: &GuestMemory,
    ) -> Result<Vec<usize>, DeviceError> {
        Ok(Vec::new())
    }

    /// Whether the configuration space changed (e.g. a host-requested display change) since the
    /// last call; the transport then sends the configuration-change interrupt.
    fn take_config_changed(&mut self) -> bool {
        false
    }

    /// vhost-user only: the frontend's side channel of a GPU (`VHOST_USER_GPU_SET_SOCKET`,
    /// QEMU's `vhost-user-gpu-pci`). Devices other than the GPU refuse it.
    fn set_gpu_socket(&mut self, _socket: vhost::vhost_user::GpuBackend) -> std::io::Result<()> {
        Err(std::io::Error::other(format!("the {} device has no GPU socket", self.device_type().name())))
    }

    /// The driver reset the device: drop all per-activation state.
    fn reset(&mut self) {}
}

/// Serves every available chain of `queue` with `serve` (which returns the bytes it wrote into
/// the chain), then puts them all on the used ring. Returns the completed (head, length) pairs:
/// the driver may need an interrupt when there are any. A queue the driver left disabled has
/// nothing to serve: a kick for it is ignored, not an error that would break the device.
pub fn serve_available(
    index: usize,
    queue: &mut Queue,
    mem: &GuestMemory,
    mut serve: impl FnMut(DescriptorChain<&GuestMemory>) -> Result<u32, DeviceError>,
) -> Result<Vec<(u16, u32)>, DeviceError> {
    let mut completed = Vec::new();
    if !queue.ready() {
        return Ok(completed);
    }
    {
        let chains =
            queue.iter(mem).map_err(|e| DeviceError::QueueBroken { queue: index, reason: e.to_string() })?;
        for chain in chains {
            let head = chain.head_index();
            completed.push((head, serve(chain)?));
        }
    }
    for (head, len) in &completed {
        queue
            .add_used(mem, *head, *len)
            .map_err(|e| DeviceError::UsedRing { queue: index, reason: e.to_string() })?;
    }
    Ok(completed)
}

/// Reads `data.len()` bytes at `offset` of a config-space byte image; out of range reads zero.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else { return };
    if start >= config.len() {
        return;
    }
    let end = config.len().min(start.saturating_add(data.len()));
    data[..end - start].copy_from_slice(&config[start..end]);
}

/// Helpers for device tests, here and in the VMM's (feature `test-utils`).
#[cfg(any(test, feature = "test-utils"))]
pub mod test_utils;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_reads_are_bounded() {
        let config = [1u8, 2, 3, 4];
        let mut out = [0xffu8; 3];
        read_config_bytes(&config, 2, &mut out);
        assert_eq!(out, [3, 4, 0]);
        read_config_bytes(&config, u64::MAX, &mut out);
        assert_eq!(out, [0, 0, 0]);
        assert_eq!(DeviceType::Rng.pci_device_id(), 0x1044);
    }

    #[test]
    fn device_kinds_have_one_name_each() {
        for kind in DeviceKind::ALL {
            assert_eq!(kind.name().parse::<DeviceKind>(), Ok(kind));
        }
        assert_eq!("snd".parse::<DeviceKind>(), Ok(DeviceKind::Sound));
        assert!("speaker".parse::<DeviceKind>().unwrap_err().contains("known: rng, console"));
        assert!(DeviceKind::Mouse.is_input() && !DeviceKind::Gpu.is_input());
    }

    #[test]
    fn a_kick_for_a_disabled_queue_serves_nothing_and_breaks_nothing() {
        use crate::test_utils::*;
        use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
        let mem = memory();
        let mut queue = queue_with(&mem, 16, &[desc(0x2_0000, 32, VRING_DESC_F_WRITE, 0)]);
        queue.set_ready(false);
        let served = serve_available(0, &mut queue, &mem, |_| panic!("nothing to serve")).unwrap();
        assert!(served.is_empty());
        queue.set_ready(true);
        assert_eq!(serve_available(0, &mut queue, &mem, |_| Ok(32)).unwrap(), [(0, 32)]);
    }
}
