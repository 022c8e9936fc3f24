//! Fuzzes the host end of a guest's vsock connections (`pleiades_virtio::vsock::muxer`).
//!
//! The input is a sequence of steps, each `[what: u8][header: 44 bytes][n: u8]`: a packet from
//! the guest (the header as the guest wrote it, mostly re-addressed to this VM so that the
//! connections' logic is reached, with `n * 8` payload bytes), or a host action (send, read,
//! close, connect) or time passing, then the guest's rx queue drained with `n * 4` bytes of room.
//! The muxer must never panic or hang, and must keep its bounds: connections, buffers both
//! ways, the guest's credit, packet lengths.

#![no_main]

use libfuzzer_sys::fuzz_target;
use pleiades_virtio::vsock::muxer::{ConnKey, Limits, Muxer};
use pleiades_virtio::vsock::packet::{HEADER_LEN, HOST_CID, Header, TYPE_STREAM};

const GUEST: u64 = 3;
const PORT: u32 = 1024;
const STEP: usize = 1 + HEADER_LEN + 1;

fuzz_target!(|data: &[u8]| {
    let limits = Limits { max_connections: 8, buffer: 4096, max_payload: 1024, close_timeout_ms: 2_000 };
    let mut m = Muxer::new(GUEST, limits);
    m.listen(PORT);
    let mut now = 0u64;
    for step in data.chunks_exact(STEP) {
        let what = step[0];
        let mut h = Header::parse(step[1..1 + HEADER_LEN].try_into().expect("header bytes"));
        let n = usize::from(step[STEP - 1]);
        if what & 0x80 == 0 {
            h.src_cid = GUEST;
            h.dst_cid = HOST_CID;
            h.dst_port = PORT + u32::from(what & 1);
            h.src_port = 5000 + u32::from(what >> 1 & 7);
            h.socket_type = TYPE_STREAM;
        }
        let key = ConnKey { host_port: h.dst_port, guest_port: h.src_port };
        match what >> 4 & 7 {
            0..=3 => {
                let payload = vec![0x5a; n * 8];
                h.len = payload.len() as u32;
                m.from_guest(&h, &payload);
            }
            4 => {
                let _ = m.send(key, &vec![1u8; n * 16]);
            }
            5 => {
                let _ = m.recv(key, &mut vec![0u8; n * 16]);
            }
            6 => {
                if what & 8 == 0 {
                    m.close(key);
                } else {
                    let _ = m.connect(h.dst_port);
                }
            }
            _ => {
                now += u64::from(h.len % 4096);
                m.tick(now);
            }
        }
        assert!(m.connections() <= limits.max_connections);
        let room = n * 4;
        let mut packets = 0;
        while let Some((out, payload)) = m.to_guest(room) {
            packets += 1;
            assert!(packets <= 10_000, "the muxer kept producing packets");
            assert_eq!((out.src_cid, out.dst_cid), (HOST_CID, GUEST));
            assert_eq!(out.len as usize, payload.len());
            assert!(payload.len() <= room.min(limits.max_payload as usize));
            assert!(out.buf_alloc <= limits.buffer);
        }
        while m.poll_event().is_some() {}
    }
});
