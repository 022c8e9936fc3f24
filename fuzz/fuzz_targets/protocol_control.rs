//! Fuzzes both sides of the control channel after the handshake: the input is a script of the
//! peer's bytes in any chunks, the clock moving (also backwards), timers run, the stream ending
//! and local goodbyes. No input may panic a side; everything a side writes encodes; nothing
//! follows its `Goodbye`; the channel ends once, after which it has no timer; a due timer, once
//! run, is no longer due.

#![no_main]

use libfuzzer_sys::fuzz_target;
use pleiades_protocol::control::{ClientControl, ClientEvent, ControlConfig, ServerControl, ServerEvent};
use pleiades_protocol::handshake::{Capabilities, Session};
use pleiades_protocol::wire::{ControlMessage, GoodbyeReason, encode_to_vec};

/// What the script watches on either side.
#[derive(Default)]
struct Seen {
    goodbye: bool,
    closed: bool,
}

impl Seen {
    fn sent(&mut self, message: ControlMessage) {
        assert!(!self.goodbye && !self.closed, "{message:?} after Goodbye or the end");
        encode_to_vec(&message).expect("what a side writes encodes");
        self.goodbye |= matches!(message, ControlMessage::Goodbye(_));
    }

    fn event(&mut self, closed: bool) {
        assert!(!self.closed, "an event after Closed");
        self.closed = closed;
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, mut script)) = data.split_first() else { return };
    let mut capabilities = Capabilities::H264;
    if flags & 1 != 0 {
        capabilities = capabilities | Capabilities::DYNAMIC_LAYOUT;
    }
    if flags & 2 != 0 {
        capabilities = capabilities | Capabilities::RESUME;
    }
    let session = Session { version: 1, capabilities, session_id: 1, peer_name: "fuzz".into() };
    let mut server = ServerControl::new(&session, ControlConfig::default(), 0);
    let mut client = ClientControl::new(&session, ControlConfig::default(), 0);
    let (mut server_seen, mut client_seen) = (Seen::default(), Seen::default());
    let mut now = 0u64;
    while let Some((&op, rest)) = script.split_first() {
        script = rest;
        let arg = u64::from(op >> 3);
        match op & 7 {
            0..=2 => {
                let n = (arg as usize).min(script.len());
                let (chunk, rest) = script.split_at(n);
                script = rest;
                server.handle_stream_data(chunk, now);
                client.handle_stream_data(chunk, now);
            }
            3 => now = now.saturating_add(arg * 50_000),
            4 => now = now.saturating_sub(arg * 10_000),
            5 => {
                for due in [server.poll_timeout(), client.poll_timeout()].into_iter().flatten() {
                    now = now.max(due);
                }
                server.handle_timeout(now);
                client.handle_timeout(now);
                assert!(server.poll_timeout().is_none_or(|t| t > now), "the server's timer stays due");
                assert!(client.poll_timeout().is_none_or(|t| t > now), "the client's timer stays due");
            }
            6 => {
                server.handle_stream_end(now);
                client.handle_stream_end(now);
            }
            _ => {
                let reason = GoodbyeReason::from_u16(arg as u16);
                if op & 8 == 0 {
                    server.close(reason, "fuzz", now);
                } else {
                    client.close(reason, "fuzz", now);
                }
            }
        }
        while let Some(message) = server.poll_transmit() {
            server_seen.sent(message);
        }
        while let Some(message) = client.poll_transmit() {
            client_seen.sent(message);
        }
        while let Some(event) = server.poll_event() {
            server_seen.event(matches!(event, ServerEvent::Closed(_)));
        }
        while let Some(event) = client.poll_event() {
            client_seen.event(matches!(event, ClientEvent::Closed(_)));
        }
        assert_eq!(server.is_closed(), server_seen.closed);
        assert_eq!(client.is_closed(), client_seen.closed);
        if server.is_closed() {
            assert!(server.poll_timeout().is_none());
        }
        if client.is_closed() {
            assert!(client.poll_timeout().is_none());
        }
    }
});
