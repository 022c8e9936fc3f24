//! What every queue fuzz target builds from its input: guest memory filled with the input's
//! bytes, and a queue whose size and ring addresses the input chooses, legal or not.

use pleiades_virtio::GuestMemory;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

/// Guest memory the targets use.
pub const MEM_SIZE: usize = 64 * 1024;

/// The bytes of the header that choose the queue.
pub const HEADER: usize = 8;

/// Guest memory holding `body` at address 0.
pub fn memory(body: &[u8]) -> Option<GuestMemory> {
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).ok()?;
    let _ = mem.write_slice(&body[..body.len().min(MEM_SIZE)], GuestAddress(0));
    Some(mem)
}

/// A ready queue of at most `max_size` entries programmed from `header` (a power of two up to
/// `max_size`, ring addresses anywhere in the first 1 MiB), if it is valid for `mem`.
pub fn queue(header: &[u8; HEADER], max_size: u16, mem: &GuestMemory) -> Option<Queue> {
    let word = |i: usize| u64::from(u16::from_le_bytes([header[i], header[i + 1]]));
    let mut queue = Queue::new(max_size).ok()?;
    let log2_max = 15 - max_size.leading_zeros() as u8;
    queue.set_size(1 << (header[0] % (log2_max + 1)));
    queue.set_desc_table_address(Some((word(1) * 16) as u32), Some(0));
    queue.set_avail_ring_address(Some((word(3) * 2) as u32), Some(0));
    queue.set_used_ring_address(Some((word(5) * 4) as u32), Some(0));
    queue.set_ready(true);
    queue.is_valid(mem).then_some(queue)
}
