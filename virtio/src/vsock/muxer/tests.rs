use proptest::prelude::*;

use super::*;
use crate::vsock::packet::{HEADER_LEN, SHUTDOWN_RCV, SHUTDOWN_SEND};

const GUEST: u64 = 3;
const AGENT_PORT: u32 = 1024;

fn limits() -> Limits {
    Limits { max_connections: 4, buffer: 1024, max_payload: 512, close_timeout_ms: 2_000 }
}

/// A packet from guest port `guest_port` to host port `host_port`.
fn from(guest_port: u32, host_port: u32, op: Op) -> Header {
    Header {
        src_cid: GUEST,
        dst_cid: HOST_CID,
        src_port: guest_port,
        dst_port: host_port,
        len: 0,
        socket_type: TYPE_STREAM,
        op: op as u16,
        flags: 0,
        buf_alloc: 4096,
        fwd_cnt: 0,
    }
}

fn events(m: &mut Muxer) -> Vec<Event> {
    std::iter::from_fn(|| m.poll_event()).collect()
}

/// Every packet the muxer has for the guest now (rx buffers of `room` bytes of payload).
fn drain(m: &mut Muxer, room: usize) -> Vec<(Header, Vec<u8>)> {
    std::iter::from_fn(|| m.to_guest(room)).take(10_000).collect()
}

fn ops(packets: &[(Header, Vec<u8>)]) -> Vec<Option<Op>> {
    packets.iter().map(|(h, _)| h.op()).collect()
}

/// A muxer with one connection from guest port 5000 to the agent port, established.
fn connected() -> (Muxer, ConnKey) {
    let mut m = Muxer::new(GUEST, limits());
    m.listen(AGENT_PORT);
    m.from_guest(&from(5000, AGENT_PORT, Op::Request), &[]);
    let key = ConnKey { host_port: AGENT_PORT, guest_port: 5000 };
    assert_eq!(events(&mut m), [Event::Accepted(key)]);
    let reply = drain(&mut m, 4096);
    assert_eq!(ops(&reply), [Some(Op::Response)]);
    let (h, _) = &reply[0];
    assert_eq!(
        (h.src_cid, h.dst_cid, h.src_port, h.dst_port, h.buf_alloc),
        (HOST_CID, GUEST, AGENT_PORT, 5000, 1024)
    );
    (m, key)
}

#[test]
fn a_guest_connects_to_a_listening_port_and_bytes_flow_both_ways() {
    let (mut m, key) = connected();
    let mut data = from(5000, AGENT_PORT, Op::Rw);
    data.len = 5;
    m.from_guest(&data, b"hello");
    assert_eq!(events(&mut m), [Event::Readable(key)]);
    let mut buf = [0u8; 16];
    assert_eq!(m.recv(key, &mut buf).unwrap(), 5);
    assert_eq!(&buf[..5], b"hello");
    assert_eq!(m.send(key, b"welcome").unwrap(), 7);
    let out = drain(&mut m, 4096);
    assert_eq!(ops(&out), [Some(Op::Rw)]);
    assert_eq!((out[0].0.len, out[0].0.fwd_cnt, out[0].1.as_slice()), (7, 5, &b"welcome"[..]));
}

#[test]
fn ports_nobody_listens_on_and_packets_for_no_connection_get_a_reset_but_a_reset_gets_nothing() {
    let mut m = Muxer::new(GUEST, limits());
    m.from_guest(&from(5000, 22, Op::Request), &[]);
    m.from_guest(&from(5001, AGENT_PORT, Op::Rw), b"x");
    m.from_guest(&from(5002, AGENT_PORT, Op::Rst), &[]);
    let out = drain(&mut m, 4096);
    assert_eq!(ops(&out), [Some(Op::Rst), Some(Op::Rst)]);
    assert_eq!((out[0].0.dst_port, out[1].0.dst_port), (5000, 5001));
    assert!(events(&mut m).is_empty());
    assert_eq!(m.connections(), 0);
}

#[test]
fn packets_from_another_address_are_dropped() {
    let mut m = Muxer::new(GUEST, limits());
    m.listen(AGENT_PORT);
    let mut spoofed = from(5000, AGENT_PORT, Op::Request);
    spoofed.src_cid = 4;
    m.from_guest(&spoofed, &[]);
    let mut elsewhere = from(5000, AGENT_PORT, Op::Request);
    elsewhere.dst_cid = 5;
    m.from_guest(&elsewhere, &[]);
    assert!(drain(&mut m, 4096).is_empty());
    assert_eq!((m.connections(), m.refused_packets), (0, 2));
}

#[test]
fn the_host_sends_no_more_than_the_guests_credit_and_resumes_when_the_guest_reads() {
    let (mut m, key) = connected();
    // The guest has 100 bytes of room.
    let mut update = from(5000, AGENT_PORT, Op::CreditUpdate);
    update.buf_alloc = 100;
    m.from_guest(&update, &[]);
    assert_eq!(m.send(key, &[7u8; 300]).unwrap(), 300);
    let out = drain(&mut m, 4096);
    assert_eq!(out.iter().map(|(_, d)| d.len()).sum::<usize>(), 100);
    // The guest read 60: 60 more may go.
    update.fwd_cnt = 60;
    m.from_guest(&update, &[]);
    assert_eq!(drain(&mut m, 4096).iter().map(|(_, d)| d.len()).sum::<usize>(), 60);
    // Room for all: the rest in packets no larger than the rx buffers.
    update.buf_alloc = 1 << 20;
    m.from_guest(&update, &[]);
    let out = drain(&mut m, 64);
    assert_eq!(out.iter().map(|(_, d)| d.len()).sum::<usize>(), 140);
    assert!(out.iter().all(|(h, d)| d.len() <= 64 && h.len as usize == d.len()));
}

#[test]
fn the_hosts_buffer_is_bounded_and_it_hears_when_there_is_room_again() {
    let (mut m, key) = connected();
    assert_eq!(m.send(key, &[1u8; 5000]).unwrap(), 1024, "a connection holds at most its buffer");
    assert_eq!(m.send(key, b"more").unwrap(), 0);
    assert!(events(&mut m).is_empty());
    drain(&mut m, 4096);
    assert_eq!(events(&mut m), [Event::Writable(key)]);
}

#[test]
fn a_guest_past_its_credit_loses_that_connection_only() {
    let (mut m, key) = connected();
    m.from_guest(&from(5001, AGENT_PORT, Op::Request), &[]);
    let other = ConnKey { host_port: AGENT_PORT, guest_port: 5001 };
    drain(&mut m, 4096);
    events(&mut m);
    let mut flood = from(5000, AGENT_PORT, Op::Rw);
    flood.len = 1000;
    m.from_guest(&flood, &[0u8; 1000]);
    flood.len = 100;
    m.from_guest(&flood, &[0u8; 100]);
    assert_eq!(events(&mut m), [Event::Readable(key), Event::Closed(key)]);
    assert_eq!(ops(&drain(&mut m, 4096)), [Some(Op::Rst)]);
    assert_eq!(m.recv(key, &mut [0u8; 8]), Err(MuxError::NoConnection(key)));
    // The other connection goes on.
    assert_eq!(m.send(other, b"still here").unwrap(), 10);
    assert_eq!(drain(&mut m, 4096)[0].1, b"still here");
}

#[test]
fn reading_gives_the_guest_credit_back() {
    let (mut m, key) = connected();
    let mut data = from(5000, AGENT_PORT, Op::Rw);
    data.len = 600;
    m.from_guest(&data, &[9u8; 600]);
    assert!(drain(&mut m, 4096).is_empty(), "nothing read yet, nothing owed");
    let mut buf = [0u8; 300];
    m.recv(key, &mut buf).unwrap();
    let out = drain(&mut m, 4096);
    assert_eq!(ops(&out), [Some(Op::CreditUpdate)]);
    assert_eq!((out[0].0.buf_alloc, out[0].0.fwd_cnt), (1024, 300));
    // A guest that asks is answered.
    m.from_guest(&from(5000, AGENT_PORT, Op::CreditRequest), &[]);
    assert_eq!(ops(&drain(&mut m, 4096)), [Some(Op::CreditUpdate)]);
}

#[test]
fn half_closes_each_way() {
    let (mut m, key) = connected();
    // The guest sends no more: the host reads the rest, then the end.
    let mut data = from(5000, AGENT_PORT, Op::Rw);
    data.len = 3;
    m.from_guest(&data, b"bye");
    let mut shut = from(5000, AGENT_PORT, Op::Shutdown);
    shut.flags = SHUTDOWN_SEND;
    m.from_guest(&shut, &[]);
    assert!(!m.at_end(key));
    let mut buf = [0u8; 8];
    assert_eq!(m.recv(key, &mut buf).unwrap(), 3);
    assert!(m.at_end(key));
    // Data after its own shutdown resets the connection.
    // (The host can still send meanwhile.)
    assert_eq!(m.send(key, b"ok").unwrap(), 2);
    assert_eq!(drain(&mut m, 4096).last().unwrap().1, b"ok");
    // The host sends no more: SHUTDOWN(SEND) after its queued bytes.
    m.send(key, b"last").unwrap();
    m.shutdown_send(key).unwrap();
    let out = drain(&mut m, 4096);
    assert_eq!(ops(&out), [Some(Op::Rw), Some(Op::Shutdown)]);
    assert_eq!(out[1].0.flags, SHUTDOWN_SEND);
    assert_eq!(m.send(key, b"x"), Err(MuxError::NotEstablished(key)));
    m.from_guest(&data, b"bad");
    assert!(events(&mut m).contains(&Event::Closed(key)));
    assert_eq!(ops(&drain(&mut m, 4096)), [Some(Op::Rst)]);
}

#[test]
fn a_host_close_drains_then_shuts_down_and_ends_on_the_guests_reset_or_the_timeout() {
    let (mut m, key) = connected();
    m.send(key, b"goodbye").unwrap();
    m.close(key);
    let out = drain(&mut m, 4096);
    assert_eq!(ops(&out), [Some(Op::Rw), Some(Op::Shutdown)]);
    assert_eq!(out[1].0.flags, SHUTDOWN_RCV | SHUTDOWN_SEND);
    m.from_guest(&from(5000, AGENT_PORT, Op::Rst), &[]);
    assert_eq!(events(&mut m), [Event::Closed(key)]);
    assert!(drain(&mut m, 4096).is_empty(), "no reset answers a reset");

    // A guest that never acknowledges: reset after the timeout.
    m.from_guest(&from(5001, AGENT_PORT, Op::Request), &[]);
    let key = ConnKey { host_port: AGENT_PORT, guest_port: 5001 };
    m.tick(10_000);
    drain(&mut m, 4096);
    events(&mut m);
    m.close(key);
    drain(&mut m, 4096);
    m.tick(11_000);
    assert_eq!(m.connections(), 1);
    m.tick(12_000);
    assert_eq!((m.connections(), events(&mut m)), (0, vec![Event::Closed(key)]));
    assert_eq!(ops(&drain(&mut m, 4096)), [Some(Op::Rst)]);
}

#[test]
fn the_host_connects_to_the_guest_and_hears_whether_it_was_accepted() {
    let mut m = Muxer::new(GUEST, limits());
    let key = m.connect(7000).unwrap();
    assert_eq!(key.host_port, EPHEMERAL_PORTS);
    let out = drain(&mut m, 4096);
    assert_eq!(ops(&out), [Some(Op::Request)]);
    assert_eq!((out[0].0.src_port, out[0].0.dst_port), (EPHEMERAL_PORTS, 7000));
    assert_eq!(m.send(key, b"early"), Err(MuxError::NotEstablished(key)));
    m.from_guest(&from(7000, key.host_port, Op::Response), &[]);
    assert_eq!(events(&mut m), [Event::Connected(key)]);
    assert_eq!(m.send(key, b"now").unwrap(), 3);
    // Refused by a reset, or by silence.
    let refused = m.connect(7001).unwrap();
    m.from_guest(&from(7001, refused.host_port, Op::Rst), &[]);
    let silent = m.connect(7002).unwrap();
    m.tick(5_000);
    assert_eq!(events(&mut m), [Event::Refused(refused), Event::Refused(silent)]);
}

#[test]
fn connections_are_bounded_and_a_device_reset_closes_them_all() {
    let mut m = Muxer::new(GUEST, limits());
    m.listen(AGENT_PORT);
    for port in 0..10 {
        m.from_guest(&from(6000 + port, AGENT_PORT, Op::Request), &[]);
    }
    assert_eq!(m.connections(), 4);
    let out = drain(&mut m, 4096);
    assert_eq!(out.iter().filter(|(h, _)| h.op() == Some(Op::Rst)).count(), 6);
    assert_eq!(m.connect(1), Err(MuxError::TooMany(4)));
    events(&mut m);
    m.reset();
    assert_eq!(events(&mut m).len(), 4);
    assert_eq!(m.connections(), 0);
    assert!(drain(&mut m, 4096).is_empty());
}

#[test]
fn odd_operations_and_socket_types_reset_the_connection() {
    let (mut m, key) = connected();
    let mut odd = from(5000, AGENT_PORT, Op::Rw);
    odd.op = 99;
    m.from_guest(&odd, &[]);
    assert_eq!(events(&mut m), [Event::Closed(key)]);
    let (mut m, key) = connected();
    let mut seqpacket = from(5000, AGENT_PORT, Op::Rw);
    seqpacket.socket_type = 2;
    m.from_guest(&seqpacket, b"x");
    assert_eq!(events(&mut m), [Event::Closed(key)]);
    // A RESPONSE nobody asked for, a second REQUEST.
    let (mut m, key) = connected();
    m.from_guest(&from(5000, AGENT_PORT, Op::Response), &[]);
    assert_eq!(events(&mut m), [Event::Closed(key)]);
    let (mut m, key) = connected();
    m.from_guest(&from(5000, AGENT_PORT, Op::Request), &[]);
    assert_eq!(events(&mut m), [Event::Closed(key)]);
}

proptest! {
    /// Whatever the guest sends and the host does, the muxer keeps its bounds: no more
    /// connections than allowed, no connection buffering more than its buffer either way,
    /// every packet to the guest addressed to it with a payload of the length its header says
    /// and within the rx room, and no more bytes sent on a connection than the guest's credit.
    #[test]
    fn any_guest_and_host_keep_the_bounds(
        steps in proptest::collection::vec((any::<u8>(), any::<[u8; HEADER_LEN]>(), 0usize..1200), 1..200),
    ) {
        let limits = limits();
        let mut m = Muxer::new(GUEST, limits);
        m.listen(AGENT_PORT);
        let mut now = 0;
        for (what, raw, n) in steps {
            let mut h = Header::parse(&raw);
            // Mostly well addressed, so that the connections' own logic is reached.
            if what & 0x80 == 0 {
                h.src_cid = GUEST;
                h.dst_cid = HOST_CID;
                h.dst_port = AGENT_PORT + u32::from(what & 1);
                h.src_port = 5000 + u32::from(what >> 1 & 3);
                h.socket_type = TYPE_STREAM;
                h.op = u16::from(what >> 3 & 7);
            }
            let key = ConnKey { host_port: h.dst_port, guest_port: h.src_port };
            match what % 7 {
                0..=2 => m.from_guest(&h, &vec![0u8; n]),
                3 => { let _ = m.send(key, &vec![1u8; n]); }
                4 => { let _ = m.recv(key, &mut vec![0u8; n]); }
                5 => { if what & 8 == 0 { m.close(key) } else { let _ = m.connect(h.src_port); } }
                _ => { now += u64::from(what) * 10; m.tick(now) }
            }
            prop_assert!(m.connections() <= limits.max_connections);
            for c in m.conns.values() {
                prop_assert!(c.rx.len() <= limits.buffer as usize);
                prop_assert!(c.tx.len() <= limits.buffer as usize);
            }
            let room = n % 700;
            while let Some((out, data)) = m.to_guest(room) {
                prop_assert_eq!((out.src_cid, out.dst_cid), (HOST_CID, GUEST));
                prop_assert_eq!(out.len as usize, data.len());
                prop_assert!(data.len() <= room.min(limits.max_payload as usize));
                let key = ConnKey { host_port: out.src_port, guest_port: out.dst_port };
                if let (Some(Op::Rw), Some(c)) = (out.op(), m.conns.get(&key)) {
                    prop_assert!(c.tx_cnt.wrapping_sub(c.peer_fwd_cnt) <= c.peer_buf_alloc, "past the guest's credit");
                }
            }
            while m.poll_event().is_some() {}
        }
    }
}
