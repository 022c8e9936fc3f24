//! Fuzzes what a guest controls of a virtio-input device: its two queues (the whole guest
//! memory, the queue size and ring addresses, as in `virtio_queue`) and its config space
//! (select/subsel writes and reads at any offset), with host events pending. The device must
//! neither panic nor hang, and never deliver more events than the host sent.

#![no_main]

use libfuzzer_sys::fuzz_target;
use pleiades_host::devices::virtio::input::{Input, InputEvent};
use pleiades_host::devices::virtio::{GuestMemory, VirtioDevice};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

const MEM_SIZE: usize = 64 * 1024;

fn queue_from(header: &[u8]) -> Option<Queue> {
    let word = |i: usize| u64::from(u16::from_le_bytes([header[i], header[i + 1]]));
    let mut queue = Queue::new(64).ok()?;
    queue.set_size(1 << (header[0] % 7));
    queue.set_desc_table_address(Some((word(1) * 16) as u32), Some(0));
    queue.set_avail_ring_address(Some((word(3) * 2) as u32), Some(0));
    queue.set_used_ring_address(Some((word(5) * 4) as u32), Some(0));
    queue.set_ready(true);
    Some(queue)
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 12 {
        return;
    }
    let (header, rest) = data.split_at(8);
    let (config, body) = rest.split_at(4);
    let Ok(mem) = GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE)]) else { return };
    let body = &body[..body.len().min(MEM_SIZE)];
    let _ = mem.write_slice(body, GuestAddress(0));
    let Some(mut queue) = queue_from(header) else { return };
    if !queue.is_valid(&mem) {
        return;
    }
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
