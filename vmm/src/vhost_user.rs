//! The vhost-user frontend: a virtio-pci device whose queues an external backend process
//! serves (`pleiades-host device rng --socket …`, or any vhost-user backend).
//!
//! The protocol cannot ask a backend how large its rings may be, and a backend refuses a larger
//! one by hanging up; the driver is offered the sizes of the device type
//! ([`DeviceType::queue_max_sizes`], what Pleiades' devices and QEMU use).
//!
//! The VMM keeps the PCI function, the common configuration and MSI-X; at DRIVER_OK it hands
//! the backend guest memory (the memfd, `SET_MEM_TABLE`), each enabled queue's size, ring
//! addresses (as VMM virtual addresses, as the protocol wants), base 0, its kick (the queue's
//! ioeventfd) and its call (the irqfd of the queue's MSI-X vector), then enables it. The
//! backend's interrupts therefore go straight to KVM: MSI-X masking is not applied to them.
//! A reset stops every ring (`GET_VRING_BASE`). The connection lives as long as the VM, across
//! reboots.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use vhost::vhost_user::message::VhostUserConfigFlags;
use vhost::vhost_user::{
    Frontend, VhostUserFrontend as _, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::virtio_pci::common_cfg::QueueRegs;
use pleiades_virtio::{DeviceType, GuestMemory};

/// Queues assumed when the backend does not implement the MQ protocol feature.
const DEFAULT_QUEUES: u64 = 1;
const MAX_QUEUES: u64 = 64;
/// The largest device configuration the protocol carries (`VHOST_USER_MAX_CONFIG_SIZE`).
const MAX_CONFIG_SIZE: u64 = 256;

/// Errors connecting to a backend.
#[derive(Debug, thiserror::Error)]
pub enum VhostUserError {
    #[error(
        "cannot connect to the vhost-user {kind} backend at {socket}: {reason}; start it first (pleiades-host device {kind} --socket {socket})"
    )]
    Connect { kind: &'static str, socket: PathBuf, reason: String },
    #[error("the vhost-user {kind} backend at {socket} failed during setup: {reason}")]
    Handshake { kind: &'static str, socket: PathBuf, reason: String },
}

/// A connected vhost-user backend.
pub struct VhostUserFrontend {
    kind: DeviceType,
    socket: PathBuf,
    frontend: Frontend,
    /// What the driver is offered (without vhost-user's own PROTOCOL_FEATURES bit).
    features: u64,
    protocol_features: bool,
    has_config: bool,
    queue_max_sizes: Vec<u16>,
    active: Vec<usize>,
}

impl std::fmt::Debug for VhostUserFrontend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostUserFrontend")
            .field("kind", &self.kind.name())
            .field("socket", &self.socket)
            .finish_non_exhaustive()
    }
}

impl VhostUserFrontend {
    /// Connects and runs the handshake (owner, features, protocol features, queue count).
    pub fn connect(kind: DeviceType, socket: &Path) -> Result<Self, VhostUserError> {
        let name = kind.name();
        let mut frontend = Frontend::connect(socket, MAX_QUEUES).map_err(|e| VhostUserError::Connect {
            kind: name,
            socket: socket.into(),
            reason: e.to_string(),
        })?;
        let fail = |e: vhost::Error| VhostUserError::Handshake {
            kind: name,
            socket: socket.into(),
            reason: e.to_string(),
        };
        frontend.set_owner().map_err(fail)?;
        let backend_features = frontend.get_features().map_err(fail)?;
        let protocol_bit = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        let protocol_features = backend_features & protocol_bit != 0;
        let mut has_config = false;
        let mut queues = DEFAULT_QUEUES;
        if protocol_features {
            // Protocol features are only readable once PROTOCOL_FEATURES is acked (the vhost
            // crate's rule). VERSION_1 goes with it: libvhost-user backends (QEMU's
            // qemu-storage-daemon) refuse a feature set without it as a legacy device, and every
            // driver of ours is modern; the driver's own features replace these at activation.
            let version_1 = backend_features & pleiades_virtio::VIRTIO_F_VERSION_1;
            frontend.set_features(protocol_bit | version_1).map_err(fail)?;
            let offered = frontend.get_protocol_features().map_err(fail)?;
            let wanted = offered & (VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::MQ);
            frontend.set_protocol_features(wanted).map_err(fail)?;
            has_config = wanted.contains(VhostUserProtocolFeatures::CONFIG);
            if wanted.contains(VhostUserProtocolFeatures::MQ) {
                queues = frontend.get_queue_num().map_err(fail)?.clamp(1, MAX_QUEUES);
            }
        }
        Ok(Self {
            kind,
            socket: socket.into(),
            frontend,
            features: backend_features & !protocol_bit,
            protocol_features,
            has_config,
            queue_max_sizes: offered_queue_sizes(kind, queues as usize),
            active: Vec::new(),
        })
    }

    pub fn device_type(&self) -> DeviceType {
        self.kind
    }

    pub fn features(&self) -> u64 {
        self.features
    }

    pub fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_max_sizes
    }

    /// Hands the queues to the backend. `calls[i]` is the eventfd queue `i` interrupts with.
    pub fn activate(
        &mut self,
        mem: &GuestMemory,
        driver_features: u64,
        queues: &[QueueRegs],
        kicks: &[EventFd],
        calls: &[&EventFd],
    ) -> Result<(), String> {
        let protocol_bit =
            if self.protocol_features { VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() } else { 0 };
        let e = |what: &str, err: vhost::Error| format!("{what}: {err}");
        self.frontend.set_features(driver_features | protocol_bit).map_err(|x| e("SET_FEATURES", x))?;
        let mut regions = Vec::new();
        for region in mem.iter() {
            let file = region.file_offset().ok_or("guest memory is not file-backed")?;
            regions.push(VhostUserMemoryRegionInfo {
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
                mmap_offset: file.start(),
                mmap_handle: file.file().as_raw_fd(),
            });
        }
        self.frontend.set_mem_table(&regions).map_err(|x| e("SET_MEM_TABLE", x))?;
        let host = |gpa: u64| -> Result<u64, String> {
            mem.get_host_address(GuestAddress(gpa))
                .map(|p| p as u64)
                .map_err(|err| format!("ring address {gpa:#x}: {err}"))
        };
        for (i, q) in queues.iter().enumerate().filter(|(_, q)| q.enabled) {
            self.frontend.set_vring_num(i, q.size).map_err(|x| e("SET_VRING_NUM", x))?;
            let addrs = VringConfigData {
                queue_max_size: q.max_size,
                queue_size: q.size,
                flags: 0,
                desc_table_addr: host(q.desc)?,
                used_ring_addr: host(q.device)?,
                avail_ring_addr: host(q.driver)?,
                log_addr: None,
            };
            self.frontend.set_vring_addr(i, &addrs).map_err(|x| e("SET_VRING_ADDR", x))?;
            self.frontend.set_vring_base(i, 0).map_err(|x| e("SET_VRING_BASE", x))?;
            self.frontend.set_vring_call(i, calls[i]).map_err(|x| e("SET_VRING_CALL", x))?;
            self.frontend.set_vring_kick(i, &kicks[i]).map_err(|x| e("SET_VRING_KICK", x))?;
            if self.protocol_features {
                self.frontend.set_vring_enable(i, true).map_err(|x| e("SET_VRING_ENABLE", x))?;
            }
            self.active.push(i);
        }
        Ok(())
    }

    /// Stops every ring the backend was given; says which one it could not stop (a backend
    /// that went away, for one).
    pub fn reset(&mut self) -> Result<(), String> {
        let mut result = Ok(());
        for i in self.active.drain(..) {
            if self.protocol_features {
                let _ = self.frontend.set_vring_enable(i, false);
            }
            if let Err(e) = self.frontend.get_vring_base(i)
                && result.is_ok()
            {
                result = Err(format!("cannot stop queue {i}: {e}"));
            }
        }
        result
    }

    /// Reads the device configuration from the backend (zeros without the CONFIG feature).
    ///
    /// The backend is asked for the configuration from its start up to the end of the read,
    /// as QEMU asks (it reads the whole space): libvhost-user backends (qemu-storage-daemon's
    /// vhost-user-blk) ignore the message's offset and answer from byte 0, so a read of
    /// virtio-blk's `num_queues` at offset 34 came back as the capacity's low bytes.
    pub fn read_config(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Some(end) = offset.checked_add(data.len() as u64).filter(|&e| e <= MAX_CONFIG_SIZE) else {
            return;
        };
        if !self.has_config {
            return;
        }
        let zeros = vec![0u8; end as usize];
        match self.frontend.get_config(0, end as u32, VhostUserConfigFlags::empty(), &zeros) {
            Ok((_, payload)) if payload.len() == zeros.len() => {
                data.copy_from_slice(&payload[offset as usize..]);
            }
            Ok(_) => {}
            Err(e) => tracing::debug!("vhost-user {}: GET_CONFIG failed: {e}", self.kind.name()),
        }
    }

    /// Writes the device configuration.
    pub fn write_config(&mut self, offset: u64, data: &[u8]) {
        let Ok(offset) = u32::try_from(offset) else { return };
        if self.has_config
            && let Err(e) = self.frontend.set_config(offset, VhostUserConfigFlags::empty(), data)
        {
            tracing::debug!("vhost-user {}: SET_CONFIG failed: {e}", self.kind.name());
        }
    }
}

/// The size offered for each of a backend's `queues`: its type's, and for queues beyond those
/// the type's smallest (any ring that size is one every backend of the type accepts).
fn offered_queue_sizes(kind: DeviceType, queues: usize) -> Vec<u16> {
    let sizes = kind.queue_max_sizes();
    let smallest = sizes.iter().copied().min().unwrap_or(64);
    (0..queues).map(|i| sizes.get(i).copied().unwrap_or(smallest)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_backend_is_offered_its_types_queue_sizes() {
        assert_eq!(offered_queue_sizes(DeviceType::Input, 2), [64, 64]);
        assert_eq!(offered_queue_sizes(DeviceType::Gpu, 2), [256, 64]);
        // More queues than the type has: the smallest; fewer: the first ones.
        assert_eq!(offered_queue_sizes(DeviceType::Gpu, 3), [256, 64, 64]);
        assert_eq!(offered_queue_sizes(DeviceType::Sound, 1), [256]);
    }
}
