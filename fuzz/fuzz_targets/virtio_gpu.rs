//! Fuzzes what a guest controls of a virtio-gpu device.
//!
//! The input is a stream of requests, each `[queue: u8][length: u16 le][bytes]`, run in order
//! against one device whose guest memory is the input itself (so backing entries and transfers
//! read fuzzer-chosen bytes), with a small memory cap so the caps are hit too. Between requests
//! the host reads the sink as a consumer would. Then the rest of the input is used as whole
//! guest memory for the control queue (ring addresses and descriptors chosen by the input, as
//! in `virtio_queue`). The device must never panic or hang, and must keep its memory within
//! the cap.

#![no_main]

use libfuzzer_sys::fuzz_target;
use pleiades_virtio::VirtioDevice;
use pleiades_virtio::gpu::{Framebuffer, Gpu, GpuConfig, GpuLimits};

#[path = "guest.rs"]
mod guest;

const CAP: u64 = 1 << 20;

fuzz_target!(|data: &[u8]| {
    let Some(mem) = guest::memory(data) else { return };
    let config = GpuConfig {
        scanouts: 2,
        limits: GpuLimits { memory_bytes: CAP, resources: 64, max_dimension: 4096 },
        ..GpuConfig::default()
    };
    let Ok(mut gpu) = Gpu::new(&config) else { return };
    let handle = gpu.handle();
    let mut frame = Framebuffer::default();
    let mut rest = data;
    for _ in 0..64 {
        let [queue, lo, hi, tail @ ..] = rest else { break };
        let len = usize::from(u16::from_le_bytes([*lo, *hi])).min(tail.len());
        let (request, next) = tail.split_at(len);
        if queue & 1 == 0 {
            let response = gpu.control_request(request, &mem);
            assert!(response.len() >= 24, "every control request gets at least a header");
        } else {
            gpu.cursor_request(request);
        }
        assert!(handle.metrics().resource_bytes.load(std::sync::atomic::Ordering::Relaxed) <= CAP);
        let _ = handle.sink().take_damage(usize::from(queue >> 1 & 1), &mut frame);
        rest = next;
    }
    // The same device driven through a queue the input lays out.
    if rest.len() > guest::HEADER {
        let header: &[u8; guest::HEADER] = rest[..guest::HEADER].try_into().unwrap_or(&[0; guest::HEADER]);
        if let Some(mem) = guest::memory(&rest[guest::HEADER..])
            && let Some(mut queue) = guest::queue(header, 256, &mem)
        {
            let _ = gpu.process_queue(usize::from(header[7] & 1), &mut queue, &mem);
        }
    }
});
