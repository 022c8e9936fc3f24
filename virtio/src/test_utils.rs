//! Guest memory and split queues for device unit tests.

use virtio_queue::Queue;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};

use super::GuestMemory;

pub use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};

/// 1 MiB of guest memory at address 0. Queue structures live below 64 KiB, buffers above.
pub fn memory() -> GuestMemory {
    GuestMemory::from_ranges(&[(GuestAddress(0), 0x10_0000)]).expect("test memory")
}

/// A descriptor.
pub fn desc(addr: u64, len: u32, flags: u32, next: u16) -> RawDescriptor {
    RawDescriptor::from(Descriptor::new(addr, len, flags as u16, next))
}

/// A queue of `size` entries whose descriptor table holds `descs`, with one chain per head
/// (chains follow the NEXT flags in `descs`), all made available.
pub fn queue_with(mem: &GuestMemory, size: u16, descs: &[RawDescriptor]) -> Queue {
    queue_at(mem, 0, size, descs)
}

/// [`queue_with`] with its rings at `base` (below 64 KiB), for devices that use several
/// queues at once.
pub fn queue_at(mem: &GuestMemory, base: u64, size: u16, descs: &[RawDescriptor]) -> Queue {
    let mock = MockSplitQueue::create(mem, GuestAddress(base), size);
    mock.add_desc_chains(descs, 0).expect("descriptors fit");
    mock.create_queue::<Queue>().expect("valid queue")
}

/// The used ring entries (id, len) of a queue (its ring addresses are read, not guessed).
pub fn used_entries(mem: &GuestMemory, queue: &QueueRings) -> Vec<(u32, u32)> {
    let used = queue.used;
    let idx: u16 = mem.read_obj(GuestAddress(used + 2)).unwrap();
    (0..idx)
        .map(|i| {
            let entry = used + 4 + u64::from(i % queue.size) * 8;
            (mem.read_obj(GuestAddress(entry)).unwrap(), mem.read_obj(GuestAddress(entry + 4)).unwrap())
        })
        .collect()
}

/// Where a queue's rings are, kept before the queue moves into a worker.
#[derive(Debug, Clone, Copy)]
pub struct QueueRings {
    pub avail: u64,
    pub used: u64,
    pub size: u16,
}

impl QueueRings {
    pub fn of(queue: &Queue) -> Self {
        use virtio_queue::QueueT;
        Self { avail: queue.avail_ring(), used: queue.used_ring(), size: queue.size() }
    }

    /// Makes the driver's available index jump to `idx` (a corrupt ring).
    pub fn corrupt_avail_idx(&self, mem: &GuestMemory, idx: u16) {
        mem.write_obj(idx, GuestAddress(self.avail + 2)).unwrap();
    }
}

/// A writer whose bytes the test reads back (a device's host-side output).
#[derive(Debug, Clone, Default)]
pub struct SharedWriter(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl SharedWriter {
    /// Everything written so far.
    pub fn bytes(&self) -> Vec<u8> {
        self.0.lock().unwrap().clone()
    }
}

impl std::io::Write for SharedWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Serves `device` over vhost-user at `socket` on a thread, as `pleiades-host device` serves it
/// in a process; returns once the socket listens (panics after 10 s without).
pub fn serve_over_vhost_user(
    device: Box<dyn crate::VirtioDevice>,
    socket: &std::path::Path,
) -> std::thread::JoinHandle<anyhow::Result<()>> {
    let backend = {
        let socket = socket.to_owned();
        std::thread::spawn(move || crate::vhost_user::serve(device, &socket))
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !socket.exists() {
        assert!(std::time::Instant::now() < deadline, "the vhost-user backend never listened");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    backend
}

/// Where [`vsock_rx_queue`]'s buffers are: the `i`th at this address + `i` × 0x1000.
pub const VSOCK_RX_BUFFERS: u64 = 0xA_0000;

/// A vsock rx queue (rings at `rings`) of `n` writable buffers of `size` bytes (at most
/// 0x1000) at [`VSOCK_RX_BUFFERS`].
pub fn vsock_rx_queue(mem: &GuestMemory, rings: u64, n: usize, size: u32) -> Queue {
    let descs: Vec<_> =
        (0..n).map(|i| desc(VSOCK_RX_BUFFERS + i as u64 * 0x1000, size, VRING_DESC_F_WRITE, 0)).collect();
    queue_at(mem, rings, 64, &descs)
}

/// The packets a vsock device wrote into [`vsock_rx_queue`]'s buffers, per the used ring.
pub fn vsock_received(mem: &GuestMemory, rings: &QueueRings) -> Vec<(crate::vsock::packet::Header, Vec<u8>)> {
    use crate::vsock::packet::{HEADER_LEN, Header};
    used_entries(mem, rings)
        .into_iter()
        .filter(|(_, len)| *len as usize >= HEADER_LEN)
        .map(|(id, len)| {
            let addr = VSOCK_RX_BUFFERS + u64::from(id) * 0x1000;
            let mut raw = [0u8; HEADER_LEN];
            mem.read_slice(&mut raw, GuestAddress(addr)).unwrap();
            let mut payload = vec![0u8; len as usize - HEADER_LEN];
            mem.read_slice(&mut payload, GuestAddress(addr + HEADER_LEN as u64)).unwrap();
            (Header::parse(&raw), payload)
        })
        .collect()
}
