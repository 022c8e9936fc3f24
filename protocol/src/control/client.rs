//! The client's side of the control channel: pings and the RTT, frame acks and statistics,
//! layouts both ways, the resume token, goodbye.

use std::collections::VecDeque;

use super::{CloseReason, ControlConfig, Core, Inbound, IntentError, RttSample, checked};
use crate::handshake::{Capabilities, Session};
use crate::pacing::RttEstimator;
use crate::wire::{
    ClientStats, ControlMessage, FrameAck, GoodbyeReason, Monitor, MonitorSize, ResumeToken, Side,
};

/// What the client's application acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientEvent {
    /// The server's monitors (after `Welcome` and on every change).
    Layout(Vec<Monitor>),
    /// A fresh resume token; it replaces the previous one ([`ClientControl::resume_token`]).
    ResumeToken(ResumeToken),
    /// The server answered a ping.
    Rtt(RttSample),
    /// The channel is over: close the connection with [`CloseReason::error_code`]. Always the
    /// last event.
    Closed(CloseReason),
}

/// What `ClientStats` reports, since the last one.
#[derive(Debug, Default)]
struct Interval {
    since_us: u64,
    frames: u64,
    decode_us: u64,
    bytes: u64,
}

/// The client's control channel of one session; see the module docs of [`crate::control`].
#[derive(Debug)]
pub struct ClientControl {
    core: Core,
    capabilities: Capabilities,
    layout: Vec<Monitor>,
    resume_token: Option<ResumeToken>,
    interval: Interval,
    events: VecDeque<ClientEvent>,
}

impl ClientControl {
    /// The channel of `session`, open from `now_us` (right after `Welcome` arrived). Bytes that
    /// followed `Welcome` in the same read go to [`Self::handle_stream_data`].
    pub fn new(session: &Session, config: ControlConfig, now_us: u64) -> Self {
        let mut core = Core::new(Side::Client, config, now_us);
        core.ping_if_due(now_us);
        Self {
            core,
            capabilities: session.capabilities,
            layout: Vec::new(),
            resume_token: None,
            interval: Interval { since_us: now_us, ..Interval::default() },
            events: VecDeque::new(),
        }
    }

    // ---- the peer ----

    /// Bytes of the server's control stream, in order, in chunks of any size.
    pub fn handle_stream_data(&mut self, mut bytes: &[u8], now_us: u64) {
        while let Some(message) = self.core.next_message(&mut bytes) {
            self.handle_message(message, now_us);
        }
    }

    /// The server finished its control stream: fine after its `Goodbye`, an error before.
    pub fn handle_stream_end(&mut self, _now_us: u64) {
        self.core.handle_stream_end();
    }

    /// One decoded message from the server.
    pub fn handle_message(&mut self, message: ControlMessage, now_us: u64) {
        let message = match self.core.accept(message, now_us) {
            Inbound::Done => return,
            Inbound::Rtt(sample) => {
                self.events.push_back(ClientEvent::Rtt(sample));
                return;
            }
            Inbound::Side(message) => message,
        };
        match message {
            ControlMessage::DisplayLayout(monitors) => {
                self.layout.clone_from(&monitors);
                self.events.push_back(ClientEvent::Layout(monitors));
            }
            ControlMessage::ResumeToken(token) => {
                if self.capabilities.contains(Capabilities::RESUME) {
                    self.resume_token = Some(token.clone());
                    self.events.push_back(ClientEvent::ResumeToken(token));
                } else {
                    self.core.ignored += 1;
                }
            }
            // The common rules let only the server's messages through; the rest are handled there.
            _ => {}
        }
    }

    // ---- time ----

    /// When [`Self::handle_timeout`] is due next; `None` once the channel is closed.
    pub fn poll_timeout(&self) -> Option<u64> {
        self.core.poll_timeout()
    }

    /// Runs every timer that is due at `now_us`: the ping (with the statistics of the interval
    /// since the last one), the end of the goodbye's linger.
    pub fn handle_timeout(&mut self, now_us: u64) {
        self.core.linger_if_due(now_us);
        if self.core.ping_if_due(now_us) {
            let stats = self.take_stats(now_us);
            self.core.outbox.push_back(ControlMessage::ClientStats(stats));
        }
    }

    // ---- out ----

    /// The next message to write on the control stream.
    pub fn poll_transmit(&mut self) -> Option<ControlMessage> {
        self.core.outbox.pop_front()
    }

    /// The next event for the application.
    pub fn poll_event(&mut self) -> Option<ClientEvent> {
        self.events.pop_front().or_else(|| self.core.take_closed().map(ClientEvent::Closed))
    }

    // ---- intents ----

    /// A frame was presented (or its `FrameEnd` arrived): ack it, count it for `ClientStats`.
    pub fn ack_frame(&mut self, ack: FrameAck) -> Result<(), IntentError> {
        let message = checked(ControlMessage::FrameAck(ack))?;
        self.core.send(message)?;
        self.interval.frames = self.interval.frames.saturating_add(1);
        self.interval.decode_us =
            self.interval.decode_us.saturating_add(ack.decoded_us.saturating_sub(ack.received_us));
        Ok(())
    }

    /// Display bytes received, for `ClientStats`.
    pub fn add_received_bytes(&mut self, bytes: u64) {
        self.interval.bytes = self.interval.bytes.saturating_add(bytes);
    }

    /// Asks the server to resize the guest's monitors (with `DYNAMIC_LAYOUT`). A request not
    /// written yet is replaced: the latest wins.
    pub fn request_layout(&mut self, sizes: &[(u32, u32)]) -> Result<(), IntentError> {
        if !self.capabilities.contains(Capabilities::DYNAMIC_LAYOUT) {
            return Err(IntentError::NotNegotiated {
                what: "a layout request",
                capability: "DYNAMIC_LAYOUT",
            });
        }
        let sizes = sizes.iter().map(|&(width, height)| MonitorSize { width, height }).collect();
        let message = checked(ControlMessage::RequestLayout(sizes))?;
        if !self.core.is_open() {
            return Err(IntentError::Closed);
        }
        match self.core.outbox.iter_mut().find(|m| matches!(m, ControlMessage::RequestLayout(_))) {
            Some(queued) => *queued = message,
            None => self.core.outbox.push_back(message),
        }
        Ok(())
    }

    /// Says goodbye (the last message), then waits for the server to close, at most
    /// [`ControlConfig::goodbye_linger_us`].
    pub fn close(&mut self, reason: GoodbyeReason, message: &str, now_us: u64) {
        self.core.close(reason, message, now_us);
    }

    // ---- state ----

    pub fn capabilities(&self) -> Capabilities {
        self.capabilities
    }

    /// The RTT of this side's pings.
    pub fn rtt(&self) -> &RttEstimator {
        &self.core.rtt
    }

    /// The server's last `DisplayLayout` (empty before the first).
    pub fn layout(&self) -> &[Monitor] {
        &self.layout
    }

    /// The server's latest resume token (with `RESUME`); a secret, kept in memory only.
    pub fn resume_token(&self) -> Option<&ResumeToken> {
        self.resume_token.as_ref()
    }

    pub fn is_open(&self) -> bool {
        self.core.is_open()
    }

    pub fn is_closed(&self) -> bool {
        self.core.is_closed()
    }

    pub fn close_reason(&self) -> Option<&CloseReason> {
        self.core.close_reason()
    }

    /// Messages of types this version does not know, skipped.
    pub fn unknown_skipped(&self) -> u64 {
        self.core.decoder.skipped()
    }

    /// Messages ignored: a capability not negotiated, a `Pong` to no ping of ours.
    pub fn ignored(&self) -> u64 {
        self.core.ignored
    }

    fn take_stats(&mut self, now_us: u64) -> ClientStats {
        let interval =
            std::mem::replace(&mut self.interval, Interval { since_us: now_us, ..Interval::default() });
        let clamp = |v: u64| u32::try_from(v).unwrap_or(u32::MAX);
        ClientStats {
            interval_us: clamp(now_us.saturating_sub(interval.since_us)),
            frames_presented: clamp(interval.frames),
            frames_dropped: 0,
            bytes_received: interval.bytes,
            decode_us_mean: clamp(interval.decode_us.checked_div(interval.frames).unwrap_or(0)),
            rtt_us: clamp(self.core.rtt.smoothed().unwrap_or(0)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::tests::pair::session;
    use crate::control::{ControlError, GOODBYE_LINGER_US};
    use crate::transport::error_code;
    use crate::wire::{self, Goodbye, MAX_TEXT_LEN, Ping, Pong, Welcome};

    fn client(capabilities: Capabilities) -> ClientControl {
        ClientControl::new(&session(capabilities), ControlConfig::default(), 0)
    }

    fn drain(c: &mut ClientControl) -> Vec<ControlMessage> {
        std::iter::from_fn(|| c.poll_transmit()).collect()
    }

    fn events(c: &mut ClientControl) -> Vec<ClientEvent> {
        std::iter::from_fn(|| c.poll_event()).collect()
    }

    fn ack(frame_id: u64, received_us: u64, decode_us: u64) -> FrameAck {
        FrameAck { frame_id, scanout: 0, received_us, decoded_us: received_us + decode_us }
    }

    #[test]
    fn pings_carry_the_statistics_of_the_interval_before() {
        let mut c = client(Capabilities::SUPPORTED);
        assert_eq!(drain(&mut c), [ControlMessage::Ping(Ping { nonce: 1, sent_us: 0 })], "no stats yet");
        c.handle_message(ControlMessage::Pong(Pong { nonce: 1, sent_us: 0 }), 30_000);
        c.ack_frame(ack(1, 100_000, 2_000)).unwrap();
        c.ack_frame(ack(2, 200_000, 4_000)).unwrap();
        c.add_received_bytes(5_000);
        assert_eq!(c.poll_timeout(), Some(1_000_000));
        c.handle_timeout(1_000_000);
        let sent = drain(&mut c);
        assert_eq!(
            sent[..2],
            [
                ControlMessage::FrameAck(ack(1, 100_000, 2_000)),
                ControlMessage::FrameAck(ack(2, 200_000, 4_000))
            ]
        );
        assert_eq!(sent[2], ControlMessage::Ping(Ping { nonce: 2, sent_us: 1_000_000 }));
        let stats = ClientStats {
            interval_us: 1_000_000,
            frames_presented: 2,
            frames_dropped: 0,
            bytes_received: 5_000,
            decode_us_mean: 3_000,
            rtt_us: 30_000,
        };
        assert_eq!(sent[3..], [ControlMessage::ClientStats(stats)]);
        c.handle_timeout(2_500_000);
        let ControlMessage::ClientStats(next) = drain(&mut c)[1] else { panic!() };
        assert_eq!(
            (next.interval_us, next.frames_presented, next.bytes_received),
            (1_500_000, 0, 0),
            "a fresh interval"
        );
        assert!(matches!(
            c.ack_frame(FrameAck { frame_id: 3, scanout: 0, received_us: 9, decoded_us: 8 }),
            Err(IntentError::Invalid { name: "FrameAck", .. })
        ));
    }

    #[test]
    fn the_server_s_layout_token_and_pings() {
        let mut c = client(Capabilities::SUPPORTED);
        drain(&mut c);
        let layout = vec![Monitor { id: 0, x: 0, y: 0, width: 640, height: 480 }];
        let token = ResumeToken { token: "pr1.abc".into(), lifetime_s: 120 };
        c.handle_message(ControlMessage::DisplayLayout(layout.clone()), 1);
        c.handle_message(ControlMessage::ResumeToken(token.clone()), 2);
        c.handle_message(ControlMessage::Ping(Ping { nonce: 9, sent_us: 77 }), 3);
        assert_eq!(
            events(&mut c),
            [ClientEvent::Layout(layout.clone()), ClientEvent::ResumeToken(token.clone())]
        );
        assert_eq!((c.layout(), c.resume_token()), (&layout[..], Some(&token)));
        assert_eq!(drain(&mut c), [ControlMessage::Pong(Pong { nonce: 9, sent_us: 77 })]);

        let mut c = client(Capabilities::H264);
        c.handle_message(ControlMessage::ResumeToken(token), 2);
        assert_eq!((c.resume_token(), c.ignored()), (None, 1), "not asked for without RESUME");
    }

    #[test]
    fn layout_requests_are_checked_and_the_latest_unsent_one_wins() {
        let mut c = client(Capabilities::SUPPORTED);
        drain(&mut c);
        c.request_layout(&[(800, 600)]).unwrap();
        c.request_layout(&[(1024, 768), (640, 480)]).unwrap();
        let latest = ControlMessage::RequestLayout(vec![
            MonitorSize { width: 1024, height: 768 },
            MonitorSize { width: 640, height: 480 },
        ]);
        assert_eq!(drain(&mut c), [latest]);
        assert!(matches!(c.request_layout(&[]), Err(IntentError::Invalid { name: "RequestLayout", .. })));
        assert!(matches!(c.request_layout(&[(0, 600)]), Err(IntentError::Invalid { .. })));
        let mut c = client(Capabilities::H264);
        assert!(matches!(
            c.request_layout(&[(800, 600)]),
            Err(IntentError::NotNegotiated { capability: "DYNAMIC_LAYOUT", .. })
        ));
    }

    #[test]
    fn messages_only_a_client_sends_end_the_channel_with_a_clear_reason() {
        let welcome = ControlMessage::Welcome(Welcome {
            version: 1,
            capabilities: Capabilities::SUPPORTED,
            session_id: 2,
            server_name: "again".into(),
        });
        for (message, text) in [
            (
                ControlMessage::RequestLayout(vec![MonitorSize { width: 1, height: 1 }]),
                "the server sent RequestLayout (0x0007), which only a client may send",
            ),
            (
                ControlMessage::FrameAck(ack(1, 1, 1)),
                "the server sent FrameAck (0x000a), which only a client may send",
            ),
            (
                ControlMessage::ClientStats(ClientStats::default()),
                "the server sent ClientStats (0x0008), which only a client may send",
            ),
            (welcome, "the server sent Welcome (0x0002) after the handshake was over"),
        ] {
            let mut c = client(Capabilities::SUPPORTED);
            c.handle_stream_data(&wire::encode_to_vec(&message).unwrap(), 5);
            let got = events(&mut c);
            let [ClientEvent::Closed(CloseReason::Error(error))] = &got[..] else { panic!("{got:?}") };
            assert_eq!(error.to_string(), text);
            assert_eq!(error.error_code(), error_code::PROTOCOL_VIOLATION);
            assert!(c.is_closed() && c.poll_timeout().is_none());
            assert_eq!(c.ack_frame(ack(1, 1, 1)), Err(IntentError::Closed));
        }
    }

    #[test]
    fn the_server_must_say_goodbye_before_ending_its_stream() {
        let mut c = client(Capabilities::SUPPORTED);
        c.handle_stream_end(1);
        assert_eq!(
            c.close_reason(),
            Some(&CloseReason::Error(ControlError::StreamEnded { sender: Side::Server }))
        );
        assert_eq!(
            c.close_reason().unwrap().to_string(),
            "the server ended the control stream without Goodbye"
        );

        let mut c = client(Capabilities::SUPPORTED);
        let bye = Goodbye { reason: GoodbyeReason::Shutdown, message: "the desktop is shutting down".into() };
        let mut bytes = wire::encode_to_vec(&ControlMessage::Goodbye(bye.clone())).unwrap();
        // Whatever follows a goodbye is not read.
        bytes.extend(wire::encode_to_vec(&ControlMessage::FrameAck(ack(1, 1, 1))).unwrap());
        c.handle_stream_data(&bytes, 1);
        c.handle_stream_end(2);
        assert_eq!(events(&mut c), [ClientEvent::Closed(CloseReason::Peer(bye))]);
    }

    #[test]
    fn a_long_goodbye_is_cut_at_a_character_and_ends_after_the_linger() {
        let mut c = client(Capabilities::SUPPORTED);
        drain(&mut c);
        let long = "é".repeat(MAX_TEXT_LEN);
        c.close(GoodbyeReason::Disconnect, &long, 10);
        let [ControlMessage::Goodbye(goodbye)] = &drain(&mut c)[..] else { panic!() };
        assert_eq!(goodbye.message.len(), MAX_TEXT_LEN);
        assert!(wire::encode_to_vec(&ControlMessage::Goodbye(goodbye.clone())).is_ok());
        c.handle_timeout(10 + GOODBYE_LINGER_US - 1);
        assert_eq!(events(&mut c), []);
        c.handle_timeout(10 + GOODBYE_LINGER_US);
        assert_eq!(events(&mut c), [ClientEvent::Closed(CloseReason::Local(goodbye.clone()))]);
    }
}
