//! Fuzzes what a guest controls of a virtio-input device: its two queues (the whole guest
//! memory, the queue size and ring addresses, as in `virtio_queue`) and its config space
//! (select/subsel writes and reads at any offset), with host events pending. The device must
//! neither panic nor hang, and never deliver more events than the host sent.

#![no_main]

use libfuzzer_sys::fuzz_target;
use pleiades_virtio::VirtioDevice;
use pleiades_virtio::input::{Input, InputEvent};

#[path = "guest.rs"]
mod guest;

fuzz_target!(|data: &[u8]| {
    if data.len() < 12 {
        return;
    }
    let (header, rest) = data.split_at(guest::HEADER);
    let header: &[u8; guest::HEADER] = header.try_into().unwrap_or(&[0; guest::HEADER]);
    let (config, body) = rest.split_at(4);
    let Some(mem) = guest::memory(body) else { return };
    let Some(mut queue) = guest::queue(header, 64, &mem) else { return };
    let Ok(mut device) = (if header[7] & 2 == 0 { Input::keyboard() } else { Input::tablet() }) else {
        return;
    };

    // The guest's config-space accesses.
    device.write_config(u64::from(config[0] % 4), &config[1..3]);
    let mut read = [0u8; 16];
    device.read_config(u64::from(config[3]), &mut read);

    // Host events: up to 32 records taken from the body, whatever they say.
    let mut sender = device.sender();
    for record in body.chunks_exact(8).take(usize::from(config[3] % 32)) {
        sender.send(InputEvent::from_bytes(record.try_into().unwrap_or_default()));
    }
    sender.send(InputEvent::syn());
    let before = device.pending_events();

    let index = usize::from(header[7] & 1);
    let _ = device.process_queue(index, &mut queue, &mem);
    let delivered = device.metrics().events_delivered.get() as usize;
    assert_eq!(device.pending_events() + delivered, before);
});
