use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::test_utils::*;
use crate::vsock::packet::{HOST_CID, Op, TYPE_STREAM};

const GUEST: u64 = 3;
const PORT: u32 = 1024;
/// Where each queue's rings are (apart: both are used at once).
const RX_RINGS: u64 = 0;
const TX_RINGS: u64 = 0x8000;

fn device() -> (Vsock, VsockHandle) {
    Vsock::new(GUEST, Limits::default()).unwrap()
}

fn header(op: Op, len: u32) -> Header {
    Header {
        src_cid: GUEST,
        dst_cid: HOST_CID,
        src_port: 5000,
        dst_port: PORT,
        len,
        socket_type: TYPE_STREAM,
        op: op as u16,
        flags: 0,
        buf_alloc: 65536,
        fwd_cnt: 0,
    }
}

/// A tx queue with one packet per chain: each packet's header in one descriptor and its
/// payload in a second (as Linux lays them out), at 0x2_0000 + i * 0x1_0000.
fn tx_queue(mem: &GuestMemory, packets: &[(Header, &[u8])]) -> Queue {
    let mut descs = Vec::new();
    for (i, (h, payload)) in packets.iter().enumerate() {
        let base = 0x2_0000 + i as u64 * 0x1_0000;
        mem.write_slice(&h.to_bytes(), GuestAddress(base)).unwrap();
        mem.write_slice(payload, GuestAddress(base + 0x1000)).unwrap();
        let next = (descs.len() + 1) as u16;
        descs.push(desc(base, HEADER_LEN as u32, VRING_DESC_F_NEXT, next));
        descs.push(desc(base + 0x1000, payload.len() as u32, 0, 0));
    }
    queue_at(mem, TX_RINGS, 64, &descs)
}

fn rx_queue(mem: &GuestMemory, n: usize, size: u32) -> Queue {
    vsock_rx_queue(mem, RX_RINGS, n, size)
}

fn received(mem: &GuestMemory, rings: &QueueRings) -> Vec<(Header, Vec<u8>)> {
    vsock_received(mem, rings)
}

#[test]
fn a_guest_connects_and_sends_and_the_vm_process_answers_through_the_queues() {
    let mem = memory();
    let (mut dev, handle) = device();
    handle.listen(PORT);
    let mut queues = vec![
        rx_queue(&mem, 8, 4096),
        tx_queue(&mem, &[(header(Op::Request, 0), b""), (header(Op::Rw, 5), b"hello")]),
        Queue::new(128).unwrap(),
    ];
    let rx = QueueRings::of(&queues[0]);
    assert!(dev.process_queue(TXQ, &mut queues[TXQ], &mem).unwrap());
    // The guest's packets reached the handle, and its events fd says so.
    let events = handle.events().unwrap();
    assert!(events.read().is_ok(), "the events eventfd is readable");
    let key = ConnKey { host_port: PORT, guest_port: 5000 };
    assert_eq!(handle.poll_event(), Some(Event::Accepted(key)));
    assert_eq!(handle.poll_event(), Some(Event::Readable(key)));
    assert_eq!(handle.poll_event(), None);
    assert!(events.read().is_err(), "and no more once they are taken");
    let mut buf = [0u8; 16];
    assert_eq!(handle.recv(key, &mut buf).unwrap(), 5);
    assert_eq!(&buf[..5], b"hello");
    handle.send(key, b"hi guest").unwrap();
    // The kick brings the device back with every queue: the RESPONSE, then the data.
    assert_eq!(dev.handle_host_event(0, &mut queues, &mem).unwrap(), [RXQ]);
    let got = received(&mem, &rx);
    assert_eq!(got.iter().map(|(h, _)| h.op()).collect::<Vec<_>>(), [Some(Op::Response), Some(Op::Rw)]);
    assert_eq!(got[1].1, b"hi guest");
    assert_eq!(
        (got[1].0.src_port, got[1].0.dst_port, got[1].0.dst_cid, got[1].0.fwd_cnt),
        (PORT, 5000, GUEST, 5)
    );
}

#[test]
fn malformed_packets_are_dropped_and_the_queue_goes_on() {
    let mem = memory();
    let (mut dev, handle) = device();
    handle.listen(PORT);
    // A payload over the limit, and one shorter than its header says.
    let (too_long, lying) = (header(Op::Rw, 1 << 20), header(Op::Rw, 100));
    let mut txq = tx_queue(&mem, &[(too_long, b"x"), (lying, b"only ten b"), (header(Op::Request, 0), b"")]);
    let tx = QueueRings::of(&txq);
    assert!(dev.process_queue(TXQ, &mut txq, &mem).unwrap());
    assert_eq!(used_entries(&mem, &tx).len(), 3, "every chain is completed");
    assert_eq!(dev.dropped_packets, 2);
    assert_eq!(handle.poll_event(), Some(Event::Accepted(ConnKey { host_port: PORT, guest_port: 5000 })));
}

#[test]
fn packets_wait_for_rx_buffers_and_small_buffers_go_back_empty() {
    let mem = memory();
    let (mut dev, handle) = device();
    handle.listen(PORT);
    let mut queues = vec![
        rx_queue(&mem, 0, 0),
        tx_queue(&mem, &[(header(Op::Request, 0), b"")]),
        Queue::new(128).unwrap(),
    ];
    dev.process_queue(TXQ, &mut queues[TXQ], &mem).unwrap();
    assert!(dev.handle_host_event(0, &mut queues, &mem).unwrap().is_empty(), "no rx buffer yet");
    // The guest posts a buffer too small for a header, then a good one.
    queues[RXQ] = queue_at(
        &mem,
        RX_RINGS,
        64,
        &[desc(0xA_0000, 16, VRING_DESC_F_WRITE, 0), desc(0xA_1000, 4096, VRING_DESC_F_WRITE, 0)],
    );
    let rx = QueueRings::of(&queues[RXQ]);
    assert!(dev.process_queue(RXQ, &mut queues[RXQ], &mem).unwrap());
    assert_eq!(used_entries(&mem, &rx), [(0, 0), (1, HEADER_LEN as u32)]);
    assert_eq!(received(&mem, &rx)[0].0.op(), Some(Op::Response));
}

#[test]
fn the_config_space_holds_the_guest_cid_and_a_reset_closes_everything() {
    let (mut dev, handle) = device();
    let mut cid = [0u8; 8];
    dev.read_config(0, &mut cid);
    assert_eq!(u64::from_le_bytes(cid), GUEST);
    assert!(Vsock::new(2, Limits::default()).is_err(), "2 is the host");
    let mem = memory();
    handle.listen(PORT);
    let mut tx = tx_queue(&mem, &[(header(Op::Request, 0), b"")]);
    dev.process_queue(TXQ, &mut tx, &mem).unwrap();
    let key = ConnKey { host_port: PORT, guest_port: 5000 };
    assert_eq!(handle.poll_event(), Some(Event::Accepted(key)));
    dev.reset();
    assert_eq!(handle.poll_event(), Some(Event::Closed(key)));
    assert_eq!(handle.send(key, b"x"), Err(MuxError::NoConnection(key)));
}
