//! Fuzzes what a guest controls of a virtio-snd device.
//!
//! The input starts with control requests, each `[length: u8][bytes]` (the first byte's low
//! nibble says how many), run in order: parameters, state changes, info queries, good or bad.
//! The rest lays out guest memory and a queue (as in `virtio_queue`) for one of the four
//! queues; then the period clock runs far ahead so every pending message completes. The device
//! must never panic or hang, every control request gets a status, and the host side stays
//! within its bounds.

#![no_main]

use libfuzzer_sys::fuzz_target;
use pleiades_virtio::VirtioDevice;
use pleiades_virtio::snd::{SAMPLE_RATE, Sound};
use virtio_queue::Queue;

#[path = "guest.rs"]
mod guest;

fuzz_target!(|data: &[u8]| {
    let Ok(mut snd) = Sound::new() else { return };
    let handle = snd.handle();
    let Some((&count, mut rest)) = data.split_first() else { return };
    for _ in 0..count & 0x0f {
        let Some((&len, tail)) = rest.split_first() else { break };
        let (request, next) = tail.split_at(usize::from(len).min(tail.len()));
        let response = snd.control_request(request);
        assert!(response.len() >= 4, "every control request gets a status");
        rest = next;
    }
    if rest.len() > guest::HEADER {
        let header: &[u8; guest::HEADER] = rest[..guest::HEADER].try_into().unwrap_or(&[0; guest::HEADER]);
        if let Some(mem) = guest::memory(&rest[guest::HEADER..])
            && let Some(queue) = guest::queue(header, 256, &mem)
        {
            let index = usize::from(header[7] & 3);
            let mut queues: Vec<Queue> = (0..4).map(|_| Queue::default()).collect();
            queues[index] = queue;
            let _ = snd.process_queue(index, &mut queues[index], &mem);
            let _ = snd.advance(u64::MAX / 4, &mut queues, &mem);
            let _ = snd.handle_host_event(0, &mut queues, &mem);
        }
    }
    let played: usize = handle.take_playback(std::time::Duration::ZERO).iter().map(|c| c.samples.len()).sum();
    assert!(played <= 2 * SAMPLE_RATE as usize * 2, "the playback sink is bounded");
    handle.push_capture(&[1; 64]);
});
