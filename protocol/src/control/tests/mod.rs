//! Both sides together through the in-memory [`pair::Pair`] on simulated time, and property
//! tests: any sequence of inbound messages, bytes, intents and times keeps the invariants of
//! the module docs and never panics.

pub mod pair;

use proptest::prelude::*;

use self::pair::{Link, Pair};
use super::*;
use crate::handshake::{Capabilities, ClientHandshake, ServerHandshake, ServerOutcome};
use crate::resume::ResumeTokens;
use crate::ticket::TicketClaims;
use crate::wire::{self, FrameAck, Monitor, MonitorSize, RefuseCode, ResumeToken};

const SECOND: u64 = 1_000_000;

fn rtt_samples(events: impl IntoIterator<Item = Option<RttSample>>) -> Vec<u64> {
    events.into_iter().flatten().map(|s| s.latest_us).collect()
}

fn client_rtts(p: &Pair) -> Vec<u64> {
    rtt_samples(p.client_events().into_iter().map(|e| match e {
        ClientEvent::Rtt(s) => Some(s),
        _ => None,
    }))
}

fn server_rtts(p: &Pair) -> Vec<u64> {
    rtt_samples(p.server_events().into_iter().map(|e| match e {
        ServerEvent::Rtt(s) => Some(s),
        _ => None,
    }))
}

#[test]
fn the_rtt_converges_to_the_path_delay() {
    // 20 ms there, 30 ms back.
    let mut p =
        Pair::with(Capabilities::SUPPORTED, ControlConfig::default(), Link::new(20_000), Link::new(30_000));
    p.run_for(10 * SECOND);
    assert_eq!(client_rtts(&p), [50_000; 10], "one ping a second from the start");
    assert_eq!(server_rtts(&p), [50_000; 10]);
    assert_eq!(p.client.rtt().smoothed(), Some(50_000));
    assert_eq!(p.server.rtt().smoothed(), Some(50_000));
    assert_eq!(p.server.pacer().path_rtt().smoothed(), Some(50_000), "the pacer has the samples too");
}

#[test]
fn with_loss_the_rtt_stays_between_the_path_and_one_retransmission_each_way() {
    let lossy = |seed| Link::new(25_000).lossy(150, 200_000, seed);
    let mut p = Pair::with(Capabilities::SUPPORTED, ControlConfig::default(), lossy(3), lossy(11));
    p.run_for(120 * SECOND);
    assert!(p.to_server.lost > 0 && p.to_client.lost > 0, "the links did lose messages");
    for samples in [client_rtts(&p), server_rtts(&p)] {
        assert!(samples.len() >= 110, "{} samples", samples.len());
        assert_eq!(samples.iter().min(), Some(&50_000), "the bare path shows through");
        assert!(samples.iter().all(|&s| (50_000..=450_000).contains(&s)), "{samples:?}");
        assert!(samples.iter().any(|&s| s > 50_000), "and the retransmissions too");
    }
    let srtt = p.client.rtt().smoothed().unwrap();
    assert!((50_000..=450_000).contains(&srtt), "{srtt}");
}

#[test]
fn acks_pace_frames_at_one_per_round_trip_and_stats_reach_the_server() {
    // One frame in flight (the pipelined window has its own tests in `pacing`).
    let config = ControlConfig {
        pacer: crate::pacing::PacerConfig { max_in_flight: 1, ..Default::default() },
        ..ControlConfig::default()
    };
    let mut p = Pair::with(Capabilities::SUPPORTED, config, Link::new(20_000), Link::new(20_000));
    let mut frame_id = 0;
    while p.now < 2 * SECOND {
        if !p.server.may_send_frame(p.now) {
            p.run_for(1_000);
            continue;
        }
        assert_eq!(p.server.pacer().in_flight(), 0, "one frame in flight at most");
        frame_id += 1;
        p.server.on_frame_sent(frame_id, 30_000, p.now);
        // The frame takes the same path on its display stream; decoding it takes 3 ms.
        let received_us = p.now + 20_000;
        p.drive_until(received_us + 3_000);
        p.client.add_received_bytes(30_000);
        p.client
            .ack_frame(FrameAck { frame_id, scanout: 0, received_us, decoded_us: received_us + 3_000 })
            .unwrap();
    }
    p.drive_until(3 * SECOND + SECOND / 2);
    let pacer = p.server.pacer();
    assert_eq!((pacer.acked_frames(), pacer.lost_frames()), (frame_id, 0));
    assert_eq!(pacer.frame_rtt().smoothed(), Some(40_000), "send → ack, less the client's 3 ms");
    assert_eq!(pacer.target_fps(), 25, "one frame per 40 ms round trip");
    assert!((45..=47).contains(&frame_id), "a frame per 43 ms: {frame_id}");

    let stats: Vec<_> = p
        .server_events()
        .into_iter()
        .filter_map(|e| match e {
            ServerEvent::ClientStats(s) => Some(s),
            _ => None,
        })
        .collect();
    assert_eq!(stats.len(), 3, "one with each ping after the first");
    assert_eq!(stats.iter().map(|s| u64::from(s.frames_presented)).sum::<u64>(), frame_id);
    assert!(
        stats.iter().all(|s| s.decode_us_mean == 3_000 && s.rtt_us == 40_000 && s.interval_us == 1_000_000)
    );
    assert_eq!(stats.iter().map(|s| s.bytes_received).sum::<u64>(), frame_id * 30_000);
}

#[test]
fn a_burst_of_layout_requests_becomes_two_changes_and_the_new_layout_comes_back() {
    let mut p = Pair::new(20_000);
    // A window dragged for 100 ms: a request every millisecond.
    for i in 0..100 {
        p.client.request_layout(&[(800 + i, 600)]).unwrap();
        p.run_for(1_000);
    }
    p.run_for(SECOND);
    let wanted: Vec<_> = p
        .server_events
        .iter()
        .filter_map(|(at, e)| match e {
            ServerEvent::LayoutWanted(sizes) => Some((*at, sizes.clone())),
            _ => None,
        })
        .collect();
    let size = |width| vec![MonitorSize { width, height: 600 }];
    // The first at once; the last one of the burst when the interval is over, by the timer.
    assert_eq!(wanted, [(20_000, size(800)), (20_000 + LAYOUT_INTERVAL_US, size(899))]);

    // The guest follows: the server tells the client, once.
    let monitors = vec![Monitor { id: 0, x: 0, y: 0, width: 899, height: 600 }];
    assert_eq!(p.server.announce_layout(monitors.clone()), Ok(true));
    assert_eq!(p.server.announce_layout(monitors.clone()), Ok(false));
    p.run_for(SECOND);
    let layouts: Vec<_> =
        p.client_events().into_iter().filter(|e| matches!(e, ClientEvent::Layout(_))).collect();
    assert_eq!(layouts, [ClientEvent::Layout(monitors.clone())]);
    assert_eq!(p.client.layout(), &monitors[..]);
}

fn server_end(p: &Pair) -> Option<(u64, CloseReason)> {
    p.server_events.iter().find_map(|(at, e)| match e {
        ServerEvent::Closed(reason) => Some((*at, reason.clone())),
        _ => None,
    })
}

fn client_end(p: &Pair) -> Option<(u64, CloseReason)> {
    p.client_events.iter().find_map(|(at, e)| match e {
        ClientEvent::Closed(reason) => Some((*at, reason.clone())),
        _ => None,
    })
}

#[test]
fn a_goodbye_reaches_the_other_side_with_its_reason() {
    let cases = [
        (wire::Side::Client, GoodbyeReason::Disconnect, "the user closed the window"),
        (wire::Side::Server, GoodbyeReason::Replaced, "replaced by a new connection to this desktop"),
        (wire::Side::Server, GoodbyeReason::Admin, ""),
    ];
    for (closer, reason, text) in cases {
        let mut p = Pair::new(30_000);
        p.run_for(SECOND / 2);
        let at = p.now;
        let goodbye = Goodbye { reason, message: text.into() };
        let (peer_end, closer_end, closer_last) = match closer {
            wire::Side::Client => {
                p.client.close(reason, text, at);
                p.run_for(5 * SECOND);
                (server_end(&p), client_end(&p), p.client_sent.last().cloned())
            }
            wire::Side::Server => {
                p.server.close(reason, text, at);
                p.run_for(5 * SECOND);
                (client_end(&p), server_end(&p), p.server_sent.last().cloned())
            }
        };
        assert_eq!(peer_end, Some((at + 30_000, CloseReason::Peer(goodbye.clone()))), "{closer}");
        assert_eq!(closer_last, Some((at, ControlMessage::Goodbye(goodbye.clone()))), "the last word");
        // The peer closed the connection on reading it; a pump would end there, the state
        // machine ends when the linger is over.
        assert_eq!(closer_end, Some((at + GOODBYE_LINGER_US, CloseReason::Local(goodbye.clone()))));
        assert_eq!(CloseReason::Peer(goodbye).error_code(), crate::transport::error_code::NO_ERROR);
    }
}

#[test]
fn direction_violations_and_unknown_messages_through_the_pair() {
    let mut p = Pair::new(10_000);
    p.run_for(SECOND / 2);
    // A newer server's message: skipped; then a message only a client may send: the end.
    let now = p.now;
    p.to_client.inject(now, vec![0xfe, 0x00, 2, 0, 0, 0, 7, 7]);
    p.run_for(SECOND);
    assert!(p.client.is_open() && p.client.unknown_skipped() == 1);
    let now = p.now;
    let stats = wire::encode_to_vec(&ControlMessage::ClientStats(wire::ClientStats::default())).unwrap();
    p.to_client.inject(now, stats);
    p.run_for(SECOND);
    let Some((at, ClientEvent::Closed(CloseReason::Error(error)))) = p.client_events.last().cloned() else {
        panic!("{:?}", p.client_events.last())
    };
    assert_eq!(at, now + 10_000);
    assert_eq!(error.to_string(), "the server sent ClientStats (0x0008), which only a client may send");
    assert!(p.connection_closed);

    let mut p = Pair::new(10_000);
    let layout = ControlMessage::DisplayLayout(vec![Monitor { id: 0, x: 0, y: 0, width: 9, height: 9 }]);
    p.to_server.inject(0, wire::encode_to_vec(&layout).unwrap());
    p.run_for(SECOND);
    assert_eq!(
        p.server.close_reason(),
        Some(&CloseReason::Error(ControlError::WrongDirection {
            name: "DisplayLayout",
            ty: wire::types::DISPLAY_LAYOUT,
            sender: wire::Side::Client
        }))
    );
}

fn claims(user: &str) -> TicketClaims {
    TicketClaims {
        id: [0; 16],
        user: user.into(),
        desktop: "desk".into(),
        host: String::new(),
        issued_at: 0,
        expires_at: 0,
        generation: None,
    }
}

#[test]
fn a_resume_token_brings_the_session_back_once_and_a_long_session_gets_fresh_ones() {
    let config = ControlConfig { resume_renew_us: 60 * SECOND, ..ControlConfig::default() };
    let mut p = Pair::with(Capabilities::SUPPORTED, config, Link::new(10_000), Link::new(10_000));
    p.tokens = Some(ResumeTokens::new());
    p.run_for(SECOND);
    let first = p.client.resume_token().cloned().expect("a token right after opening");
    assert_eq!(first.lifetime_s as u64, crate::resume::RESUME_LIFETIME_S);
    p.run_for(60 * SECOND);
    let tokens: Vec<ResumeToken> = p
        .client_events()
        .into_iter()
        .filter_map(|e| match e {
            ClientEvent::ResumeToken(t) => Some(t),
            _ => None,
        })
        .collect();
    assert_eq!(tokens.len(), 2, "renewed once in 61 s");
    let latest = p.client.resume_token().cloned().unwrap();
    assert_eq!(latest, tokens[1]);
    assert_ne!(latest.token, first.token);

    // The connection is lost; a new one says Hello with the latest token, twice.
    let mut store = p.tokens.take().unwrap();
    store.session_ended(7, 61);
    let server = ServerHandshake::new("host", Capabilities::SUPPORTED);
    let mut hello_with = |token: &str| {
        let mut client = ClientHandshake::new(token, "client", Capabilities::SUPPORTED);
        let outcome = server.on_first_message(&client.hello(), 8, |t: &str| {
            store.redeem(t, "desk", 62).map(|resumed| claims(&resumed.user))
        });
        match outcome {
            ServerOutcome::Accept { reply, claims, .. } => {
                let session = client.on_message(&reply).unwrap();
                Ok((session, claims.user))
            }
            ServerOutcome::Refuse { code, .. } => Err(code),
        }
    };
    assert_eq!(hello_with(&first.token).unwrap_err(), RefuseCode::ExpiredTicket, "replaced by the renewal");
    let (session, user) = hello_with(&latest.token).expect("the latest token resumes");
    assert_eq!((session.session_id, user.as_str()), (8, "ann"));
    assert_eq!(hello_with(&latest.token).unwrap_err(), RefuseCode::ExpiredTicket, "once");

    // The resumed session's channel asks for its own token at once.
    let mut resumed = ServerControl::new(&session, ControlConfig::default(), 0);
    assert!(std::iter::from_fn(|| resumed.poll_event()).any(|e| e == ServerEvent::ResumeTokenWanted));
}

#[test]
fn timers_fire_on_simulated_time() {
    let mut p = Pair::new(5_000);
    p.run_for(10 * SECOND);
    for sent in [&p.client_sent, &p.server_sent] {
        let pings: Vec<u64> =
            sent.iter().filter(|(_, m)| matches!(m, ControlMessage::Ping(_))).map(|(t, _)| *t).collect();
        assert_eq!(pings, (0..=10).map(|s| s * SECOND).collect::<Vec<_>>());
    }
    let stats: Vec<u64> = p
        .client_sent
        .iter()
        .filter(|(_, m)| matches!(m, ControlMessage::ClientStats(_)))
        .map(|(t, _)| *t)
        .collect();
    assert_eq!(stats, (1..=10).map(|s| s * SECOND).collect::<Vec<_>>());
    // Nothing but pings and pongs, and the server's first token request, on an idle channel.
    assert_eq!(
        p.server_events()
            .iter()
            .filter(|e| !matches!(e, ServerEvent::Rtt(_) | ServerEvent::ClientStats(_)))
            .count(),
        1
    );
}

#[test]
fn the_defaults_are_the_protocol_s() {
    let config = ControlConfig::default();
    assert_eq!(config.ping_interval_us, crate::transport::PING_INTERVAL_US);
    assert_eq!((config.layout_interval_us, config.goodbye_linger_us), (250_000, 2_000_000));
    assert_eq!(config.resume_renew_us, 12 * 3600 * SECOND, "half a token's longest life");
}

// ---- property tests ----

/// What a test drives on either side.
trait Side {
    fn message(&mut self, message: ControlMessage, now: u64);
    fn bytes(&mut self, bytes: &[u8], now: u64);
    fn end(&mut self, now: u64);
    fn timeout(&mut self, now: u64);
    fn poll_timeout(&self) -> Option<u64>;
    fn transmit(&mut self) -> Option<ControlMessage>;
    /// The next event, and whether it is `Closed`.
    fn event(&mut self) -> Option<bool>;
    fn closed(&self) -> bool;
    /// Some local intent, picked by `kind`.
    fn intent(&mut self, kind: u8, value: u64, now: u64);
}

impl Side for ServerControl {
    fn message(&mut self, message: ControlMessage, now: u64) {
        self.handle_message(message, now)
    }
    fn bytes(&mut self, bytes: &[u8], now: u64) {
        self.handle_stream_data(bytes, now)
    }
    fn end(&mut self, now: u64) {
        self.handle_stream_end(now)
    }
    fn timeout(&mut self, now: u64) {
        self.handle_timeout(now)
    }
    fn poll_timeout(&self) -> Option<u64> {
        ServerControl::poll_timeout(self)
    }
    fn transmit(&mut self) -> Option<ControlMessage> {
        self.poll_transmit()
    }
    fn event(&mut self) -> Option<bool> {
        self.poll_event().map(|e| matches!(e, ServerEvent::Closed(_)))
    }
    fn closed(&self) -> bool {
        self.is_closed()
    }
    fn intent(&mut self, kind: u8, value: u64, now: u64) {
        let small = (value % 20_000) as u32;
        match kind % 5 {
            0 => {
                let _ = self.announce_layout(vec![Monitor { id: 0, x: 0, y: 0, width: small, height: 600 }]);
            }
            1 => {
                let _ = self.send_resume_token(format!("pr1.{value}"), small, now);
            }
            2 => {
                if self.may_send_frame(now) {
                    self.on_frame_sent(value % 4, value, now);
                }
            }
            3 => self.close(GoodbyeReason::from_u16(small as u16), &"x".repeat(small as usize % 2000), now),
            _ => {
                let _ = (self.pacer().target_bitrate(), self.pacer().next_deadline());
            }
        }
    }
}

impl Side for ClientControl {
    fn message(&mut self, message: ControlMessage, now: u64) {
        self.handle_message(message, now)
    }
    fn bytes(&mut self, bytes: &[u8], now: u64) {
        self.handle_stream_data(bytes, now)
    }
    fn end(&mut self, now: u64) {
        self.handle_stream_end(now)
    }
    fn timeout(&mut self, now: u64) {
        self.handle_timeout(now)
    }
    fn poll_timeout(&self) -> Option<u64> {
        ClientControl::poll_timeout(self)
    }
    fn transmit(&mut self) -> Option<ControlMessage> {
        self.poll_transmit()
    }
    fn event(&mut self) -> Option<bool> {
        self.poll_event().map(|e| matches!(e, ClientEvent::Closed(_)))
    }
    fn closed(&self) -> bool {
        self.is_closed()
    }
    fn intent(&mut self, kind: u8, value: u64, now: u64) {
        let small = (value % 20_000) as u32;
        match kind % 4 {
            0 => {
                let _ = self.ack_frame(FrameAck {
                    frame_id: value % 4,
                    scanout: 0,
                    received_us: now,
                    decoded_us: now + value % 9,
                });
            }
            1 => {
                let _ = self.request_layout(&[(small, 600), (800, small)][..1 + (value % 2) as usize]);
            }
            2 => self.add_received_bytes(value),
            _ => self.close(GoodbyeReason::from_u16(small as u16), &"é".repeat(small as usize % 700), now),
        }
    }
}

#[derive(Debug, Clone)]
enum Op {
    Message(ControlMessage),
    Bytes(Vec<u8>),
    /// Answers the side's latest ping (as a live peer would).
    Echo,
    Wait(u64),
    /// Time jumps back (a caller's clock is not to be trusted either).
    Back(u64),
    Timeout,
    End,
    Intent(u8, u64),
}

fn message() -> impl Strategy<Value = ControlMessage> {
    let text = proptest::collection::vec(any::<char>(), 0..8).prop_map(|c| c.into_iter().collect::<String>());
    let monitor = (0u32..3, 1u32..5000, 1u32..5000).prop_map(|(id, width, height)| Monitor {
        id,
        x: 0,
        y: 0,
        width,
        height,
    });
    prop_oneof![
        (0u64..4, 0u64..3).prop_map(|(nonce, sent_us)| ControlMessage::Ping(wire::Ping { nonce, sent_us })),
        (0u64..4, any::<u64>())
            .prop_map(|(nonce, sent_us)| ControlMessage::Pong(wire::Pong { nonce, sent_us })),
        proptest::collection::vec(monitor, 1..4).prop_map(|mut m| {
            m.iter_mut().enumerate().for_each(|(i, m)| m.id = i as u32);
            ControlMessage::DisplayLayout(m)
        }),
        (1u32..5000, 1u32..5000)
            .prop_map(|(width, height)| ControlMessage::RequestLayout(vec![MonitorSize { width, height }])),
        any::<u32>().prop_map(|v| ControlMessage::ClientStats(wire::ClientStats {
            frames_presented: v,
            ..Default::default()
        })),
        (any::<u16>(), text.clone()).prop_map(|(r, message)| ControlMessage::Goodbye(Goodbye {
            reason: GoodbyeReason::from_u16(r),
            message
        })),
        (0u64..4, any::<u32>(), 0u64..50_000).prop_map(
            |(frame_id, d, received_us)| ControlMessage::FrameAck(FrameAck {
                frame_id,
                scanout: 0,
                received_us,
                decoded_us: received_us + u64::from(d),
            })
        ),
        text.clone().prop_map(|t| ControlMessage::ResumeToken(ResumeToken {
            token: format!("pr1.{t}"),
            lifetime_s: 120
        })),
        text.prop_map(|ticket| ControlMessage::Hello(wire::Hello {
            version_min: 1,
            version_max: 1,
            capabilities: Capabilities::SUPPORTED,
            ticket,
            client_name: String::new(),
        })),
        Just(ControlMessage::Welcome(wire::Welcome {
            version: 1,
            capabilities: Capabilities::SUPPORTED,
            session_id: 1,
            server_name: String::new()
        })),
        Just(ControlMessage::Refused(wire::Refused { code: RefuseCode::Busy, message: String::new() })),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => message().prop_map(Op::Message),
        1 => proptest::collection::vec(any::<u8>(), 0..64).prop_map(Op::Bytes),
        1 => message().prop_map(|m| Op::Bytes(wire::encode_to_vec(&m).unwrap_or_default())),
        2 => Just(Op::Echo),
        2 => (0u64..3_000_000).prop_map(Op::Wait),
        1 => (0u64..1_000_000).prop_map(Op::Back),
        3 => Just(Op::Timeout),
        1 => Just(Op::End),
        3 => (any::<u8>(), any::<u64>()).prop_map(|(k, v)| Op::Intent(k, v)),
    ]
}

/// Runs `ops` against `side`, checking the module's invariants after each.
fn check<S: Side>(mut side: S, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let mut now = 0u64;
    let mut last_ping = None;
    let mut said_goodbye = false;
    let mut closed_events = 0;
    for op in ops {
        match op {
            Op::Message(m) => side.message(m, now),
            Op::Bytes(b) => side.bytes(&b, now),
            Op::Echo => {
                if let Some(wire::Ping { nonce, sent_us }) = last_ping {
                    side.message(ControlMessage::Pong(wire::Pong { nonce, sent_us }), now);
                }
            }
            Op::Wait(us) => now += us,
            Op::Back(us) => now = now.saturating_sub(us),
            Op::Timeout => {
                if let Some(due) = side.poll_timeout() {
                    now = now.max(due);
                    side.timeout(now);
                    let next = side.poll_timeout();
                    prop_assert!(
                        next.is_none_or(|n| n > now),
                        "the timer at {due} stays due: {next:?} at {now}"
                    );
                }
            }
            Op::End => side.end(now),
            Op::Intent(kind, value) => side.intent(kind, value, now),
        }
        while let Some(message) = side.transmit() {
            prop_assert!(!said_goodbye, "{message:?} after Goodbye");
            prop_assert!(closed_events == 0, "{message:?} after the channel closed");
            prop_assert!(wire::encode_to_vec(&message).is_ok(), "{message:?} does not encode");
            match message {
                ControlMessage::Ping(ping) => last_ping = Some(ping),
                ControlMessage::Goodbye(_) => said_goodbye = true,
                _ => {}
            }
        }
        while let Some(closed) = side.event() {
            prop_assert!(closed_events == 0, "an event after Closed");
            closed_events += usize::from(closed);
        }
        prop_assert_eq!(side.closed(), closed_events == 1);
        if side.closed() {
            prop_assert_eq!(side.poll_timeout(), None);
        }
    }
    Ok(())
}

proptest! {
    #[test]
    fn any_inbound_sequence_keeps_the_server_s_invariants(ops in proptest::collection::vec(op(), 0..80), caps in any::<u64>()) {
        let session = pair::session(Capabilities::from_bits(caps).intersection(Capabilities::SUPPORTED));
        check(ServerControl::new(&session, ControlConfig::default(), 0), ops)?;
    }

    #[test]
    fn any_inbound_sequence_keeps_the_client_s_invariants(ops in proptest::collection::vec(op(), 0..80), caps in any::<u64>()) {
        let session = pair::session(Capabilities::from_bits(caps).intersection(Capabilities::SUPPORTED));
        check(ClientControl::new(&session, ControlConfig::default(), 0), ops)?;
    }

    /// Whatever the link, an RTT sample is never below the path's delay nor above it plus a
    /// retransmission each way, and both sides stay open.
    #[test]
    fn the_pair_measures_the_path(there in 0u64..200_000, back in 0u64..200_000, loss in 0u32..300, seed in any::<u64>()) {
        let retransmit = 100_000;
        let mut p = Pair::with(
            Capabilities::SUPPORTED,
            ControlConfig::default(),
            Link::new(there).lossy(loss, retransmit, seed),
            Link::new(back).lossy(loss, retransmit, seed.rotate_left(7)),
        );
        p.run_for(20 * SECOND);
        let path = (there + back).max(1);
        for sample in client_rtts(&p).into_iter().chain(server_rtts(&p)) {
            prop_assert!((path..=path + 2 * retransmit).contains(&sample), "{sample} on a {path} µs path");
        }
        prop_assert!(p.client.is_open() && p.server.is_open());
        if loss == 0 {
            prop_assert!(client_rtts(&p).iter().all(|&s| s == path));
            // RFC 6298's eighths, in integers, round down by less than 8 µs.
            let srtt = p.client.rtt().smoothed().unwrap_or(0);
            prop_assert!((path.saturating_sub(7)..=path).contains(&srtt), "{srtt} on a {path} µs path");
        }
    }
}
