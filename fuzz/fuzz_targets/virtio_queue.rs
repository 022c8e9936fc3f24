//! Fuzzes what a guest controls in a virtqueue: the whole guest memory (descriptor table,
//! available ring, buffers), the queue size and the ring addresses. Each device must process
//! the queue without panicking or hanging, whatever the bytes say.

#![no_main]

use libfuzzer_sys::fuzz_target;
use pleiades_virtio::VirtioDevice;
use pleiades_virtio::console::Console;
use pleiades_virtio::rng::Rng;

#[path = "guest.rs"]
mod guest;

fuzz_target!(|data: &[u8]| {
    if data.len() < guest::HEADER {
        return;
    }
    let (header, body) = data.split_at(guest::HEADER);
    let header: &[u8; guest::HEADER] = header.try_into().unwrap_or(&[0; guest::HEADER]);
    let Some(mem) = guest::memory(body) else { return };
    let Some(mut queue) = guest::queue(header, 256, &mem) else { return };
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
