//! Fuzzes what a guest controls in a virtqueue: the whole guest memory (descriptor table,
//! available ring, buffers), the queue size and the ring addresses. Each device must process
//! the queue without panicking or hanging, whatever the bytes say.

#![no_main]

use libfuzzer_sys::fuzz_target;
use pleiades_host::devices::virtio::console::Console;
use pleiades_host::devices::virtio::rng::Rng;
use pleiades_host::devices::virtio::{GuestMemory, VirtioDevice};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

const MEM_SIZE: usize = 64 * 1024;

fn queue_from(header: &[u8]) -> Option<Queue> {
    let word = |i: usize| u64::from(u16::from_le_bytes([header[i], header[i + 1]]));
    let mut queue = Queue::new(256).ok()?;
    // Sizes and addresses as a guest might program them, legal or not.
    queue.set_size(1 << (header[0] % 9));
    queue.set_desc_table_address(Some((word(1) * 16) as u32), Some(0));
    queue.set_avail_ring_address(Some((word(3) * 2) as u32), Some(0));
    queue.set_used_ring_address(Some((word(5) * 4) as u32), Some(0));
    queue.set_ready(true);
    Some(queue)
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 8 {
        return;
    }
    let (header, body) = data.split_at(8);
    let Ok(mem) = GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE)]) else { return };
    let body = &body[..body.len().min(MEM_SIZE)];
    let _ = mem.write_slice(body, GuestAddress(0));
    let Some(mut queue) = queue_from(header) else { return };
    if !queue.is_valid(&mem) {
        return;
    }
    let mut device: Box<dyn VirtioDevice> = if header[7] & 1 == 0 {
        match Rng::new() {
            Ok(rng) => Box::new(rng),
            Err(_) => return,
        }
    } else {
        Box::new(Console::new(Box::new(std::io::sink()), None))
    };
    let index = usize::from(header[7] >> 1) % device.queue_max_sizes().len();
    let _ = device.process_queue(index, &mut queue, &mem);
});
