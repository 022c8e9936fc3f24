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

/// A ready queue of at most `max_size` entries programmed from `header`, if it is valid for
/// `mem`: a power of two up to `max_size` (the low nibble of `header[0]`), and ring addresses
/// that land inside guest memory with room for their rings, so that nearly every input reaches
/// the device. One input in 16 (high nibble 0xF) draws the addresses anywhere in the first
/// 1 MiB instead, the rings a driver may get wrong.
pub fn queue(header: &[u8; HEADER], max_size: u16, mem: &GuestMemory) -> Option<Queue> {
    let word = |i: usize| u64::from(u16::from_le_bytes([header[i], header[i + 1]]));
    let mut queue = Queue::new(max_size).ok()?;
    let log2_max = 15 - max_size.leading_zeros() as u8;
    let size = 1u16 << ((header[0] & 0x0f) % (log2_max + 1));
    queue.set_size(size);
    let n = u64::from(size);
    let (desc, avail, used) = if header[0] >> 4 == 0x0f {
        (word(1) * 16, word(3) * 2, word(5) * 4)
    } else {
        // Aligned as the spec requires, and ending inside memory.
        let place =
            |w: u64, align: u64, len: u64| (w % ((MEM_SIZE as u64).saturating_sub(len) / align + 1)) * align;
        (place(word(1), 16, 16 * n), place(word(3), 2, 6 + 2 * n), place(word(5), 4, 6 + 8 * n))
    };
    queue.set_desc_table_address(Some(desc as u32), Some(0));
    queue.set_avail_ring_address(Some(avail as u32), Some(0));
    queue.set_used_ring_address(Some(used as u32), Some(0));
    queue.set_ready(true);
    queue.is_valid(mem).then_some(queue)
}
