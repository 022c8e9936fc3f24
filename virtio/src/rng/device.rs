//! The rng device state and its [`VirtioDevice`] implementation.

use std::fs::File;
use std::io::Read;
use std::sync::Arc;

use virtio_queue::Queue;
use vm_memory::Bytes;

use super::metrics::RngMetrics;
use super::request::{MAX_REQUEST_BYTES, RngRequest};
use crate::{DeviceError, DeviceType, GuestMemory, VIRTIO_F_VERSION_1, VirtioDevice, serve_available};

const QUEUE_SIZES: &[u16] = DeviceType::Rng.queue_max_sizes();
/// Bad requests logged individually before the device goes quiet about them.
const LOGGED_BAD_REQUESTS: u64 = 16;

/// A virtio entropy device backed by the host's `/dev/urandom`.
#[derive(Debug)]
pub struct Rng {
    source: File,
    acked_features: u64,
    buffer: Vec<u8>,
    metrics: Arc<RngMetrics>,
}

impl Rng {
    /// A device reading from `/dev/urandom`.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self::with_source(File::open("/dev/urandom")?))
    }

    /// A device reading from `source` (tests use a file of known bytes).
    pub fn with_source(source: File) -> Self {
        Self {
            source,
            acked_features: 0,
            buffer: vec![0; MAX_REQUEST_BYTES as usize],
            metrics: Arc::default(),
        }
    }

    /// The device's counters.
    pub fn metrics(&self) -> Arc<RngMetrics> {
        self.metrics.clone()
    }

    fn serve(&mut self, request: &RngRequest, mem: &GuestMemory) -> Result<u32, DeviceError> {
        let len = request.len() as usize;
        let bytes = &mut self.buffer[..len];
        self.source.read_exact(bytes).map_err(|e| DeviceError::Host(format!("entropy source: {e}")))?;
        let mut offset = 0;
        for (addr, buf_len) in &request.buffers {
            let end = offset + *buf_len as usize;
            // Validated against guest memory in `RngRequest::parse`.
            mem.write_slice(&bytes[offset..end], *addr)
                .map_err(|e| DeviceError::Host(format!("guest write at {addr:?}: {e}")))?;
            offset = end;
        }
        Ok(len as u32)
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> DeviceType {
        DeviceType::Rng
    }

    fn queue_max_sizes(&self) -> &[u16] {
        QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features & self.features();
    }

    fn config_size(&self) -> usize {
        0
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        // virtio-rng has no configuration space.
        data.fill(0);
    }

    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &GuestMemory,
    ) -> Result<bool, DeviceError> {
        let completed = serve_available(index, queue, mem, |chain| {
            let head = chain.head_index();
            Ok(match RngRequest::parse(chain, mem) {
                Ok(request) => self.serve(&request, mem)?,
                Err(e) => {
                    if self.metrics.refused() < LOGGED_BAD_REQUESTS {
                        tracing::warn!(queue = index, head, "virtio-rng: bad request: {e}");
                    }
                    0
                }
            })
        })?;
        for &(_, len) in completed.iter().filter(|(_, len)| *len > 0) {
            self.metrics.served(len);
        }
        Ok(!completed.is_empty())
    }

    fn reset(&mut self) {
        self.acked_features = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_utils::*;
    use proptest::prelude::{any, proptest};
    use std::io::Write;
    use std::sync::atomic::Ordering;

    fn device_with_pattern() -> Rng {
        let mut file = tempfile::tempfile().unwrap();
        let pattern: Vec<u8> = (0..=255u8).cycle().take(4 * MAX_REQUEST_BYTES as usize).collect();
        file.write_all(&pattern).unwrap();
        use std::io::Seek;
        file.rewind().unwrap();
        Rng::with_source(file)
    }

    #[test]
    fn fills_a_two_buffer_chain() {
        let mem = memory();
        let mut queue = queue_with(
            &mem,
            16,
            &[
                desc(0x2_0000, 3, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 1),
                desc(0x3_0000, 5, VRING_DESC_F_WRITE, 0),
            ],
        );
        let rings = QueueRings::of(&queue);
        let mut rng = device_with_pattern();
        assert!(rng.process_queue(0, &mut queue, &mem).unwrap());
        let mut first = [0u8; 3];
        let mut second = [0u8; 5];
        mem.read_slice(&mut first, vm_memory::GuestAddress(0x2_0000)).unwrap();
        mem.read_slice(&mut second, vm_memory::GuestAddress(0x3_0000)).unwrap();
        assert_eq!(first, [0, 1, 2]);
        assert_eq!(second, [3, 4, 5, 6, 7]);
        assert_eq!(used_entries(&mem, &rings), [(0, 8)]);
        assert_eq!(rng.metrics().bytes.load(Ordering::Relaxed), 8);
    }

    #[test]
    fn hostile_chains_complete_with_zero_length() {
        let mem = memory();
        let mut rng = device_with_pattern();
        // Read-only buffer, buffer outside RAM, absurd length, self-loop: each one chain.
        let mut queue = queue_with(
            &mem,
            16,
            &[
                desc(0x2_0000, 16, 0, 0),
                desc(0xffff_ffff_f000, 16, VRING_DESC_F_WRITE, 0),
                desc(0x2_0000, u32::MAX, VRING_DESC_F_WRITE, 0),
                desc(0x2_0000, 8, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 3),
            ],
        );
        let rings = QueueRings::of(&queue);
        assert!(rng.process_queue(0, &mut queue, &mem).unwrap());
        let used = used_entries(&mem, &rings);
        assert_eq!(used.len(), 4, "{used:?}");
        assert!(used.iter().all(|(_, len)| *len == 0), "{used:?}");
        assert_eq!(rng.metrics().bad_requests.load(Ordering::Relaxed), 4);
    }

    #[test]
    fn a_corrupt_avail_index_breaks_the_queue_without_panicking() {
        let mem = memory();
        let mut queue = queue_with(&mem, 16, &[desc(0x2_0000, 8, VRING_DESC_F_WRITE, 0)]);
        // avail.idx jumps far past the queue size.
        QueueRings::of(&queue).corrupt_avail_idx(&mem, 1000);
        let err = device_with_pattern().process_queue(0, &mut queue, &mem).unwrap_err();
        assert!(matches!(err, DeviceError::QueueBroken { .. }), "{err}");
    }

    proptest! {
        /// Whatever the descriptors say, the device neither panics nor writes outside the
        /// buffers it was given nor hangs.
        #[test]
        fn arbitrary_descriptors_are_contained(
            descs in proptest::collection::vec((any::<u64>(), any::<u32>(), 0u32..8, 0u16..20), 1..16)
        ) {
            let mem = memory();
            let raw: Vec<_> = descs.iter().map(|(a, l, f, n)| desc(*a % 0x20_0000, *l % 0x2_0000, *f, *n)).collect();
            let mut queue = queue_with(&mem, 16, &raw);
            let mut rng = device_with_pattern();
            let _ = rng.process_queue(0, &mut queue, &mem);
        }
    }
}
