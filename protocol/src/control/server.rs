//! The server's side of the control channel: pings, the pacer's inputs, layouts both ways,
//! resume tokens, goodbye.

use std::collections::VecDeque;

use super::{CloseReason, ControlConfig, Core, Inbound, IntentError, RttSample, checked, earliest};
use crate::handshake::{Capabilities, Session};
use crate::pacing::{FramePacer, RttEstimator};
use crate::wire::{ClientStats, ControlMessage, GoodbyeReason, Monitor, MonitorSize, ResumeToken, Side};

/// What the server's application acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerEvent {
    /// Resize the guest's monitors to these sizes, left to right: the client's latest request,
    /// at most one per [`ControlConfig::layout_interval_us`].
    LayoutWanted(Vec<MonitorSize>),
    /// Issue a resume token for this session and hand it to
    /// [`ServerControl::send_resume_token`] (with `RESUME`: when the channel opens, then every
    /// [`ControlConfig::resume_renew_us`]).
    ResumeTokenWanted,
    /// The client answered a ping (the pacer has the sample too).
    Rtt(RttSample),
    /// The client's statistics of the last interval.
    ClientStats(ClientStats),
    /// The channel is over: close the connection with [`CloseReason::error_code`]. Always the
    /// last event.
    Closed(CloseReason),
}

/// The server's control channel of one session; see the module docs of [`crate::control`].
#[derive(Debug)]
pub struct ServerControl {
    core: Core,
    capabilities: Capabilities,
    pacer: FramePacer,
    /// The client's latest layout request, not applied yet.
    layout_pending: Option<Vec<MonitorSize>>,
    layout_applied_us: Option<u64>,
    /// The layout the client was told last.
    announced: Option<Vec<Monitor>>,
    /// When the next resume token is due (with `RESUME`).
    resume_due_us: Option<u64>,
    acks_received: u64,
    events: VecDeque<ServerEvent>,
}

impl ServerControl {
    /// The channel of `session`, open from `now_us` (right after `Welcome` was sent).
    pub fn new(session: &Session, config: ControlConfig, now_us: u64) -> Self {
        let resume = session.capabilities.contains(Capabilities::RESUME);
        let mut events = VecDeque::new();
        if resume {
            events.push_back(ServerEvent::ResumeTokenWanted);
        }
        let resume_due_us = resume.then(|| now_us.saturating_add(config.resume_renew_us.max(1)));
        let pacer = FramePacer::new(config.pacer.clone());
        let mut core = Core::new(Side::Server, config, now_us);
        core.ping_if_due(now_us);
        Self {
            core,
            capabilities: session.capabilities,
            pacer,
            layout_pending: None,
            layout_applied_us: None,
            announced: None,
            resume_due_us,
            acks_received: 0,
            events,
        }
    }

    // ---- the peer ----

    /// Bytes of the client's control stream, in order, in chunks of any size.
    pub fn handle_stream_data(&mut self, mut bytes: &[u8], now_us: u64) {
        while let Some(message) = self.core.next_message(&mut bytes) {
            self.handle_message(message, now_us);
        }
    }

    /// The client finished its control stream: fine after its `Goodbye`, an error before.
    pub fn handle_stream_end(&mut self, _now_us: u64) {
        self.core.handle_stream_end();
    }

    /// One decoded message from the client.
    pub fn handle_message(&mut self, message: ControlMessage, now_us: u64) {
        let message = match self.core.accept(message, now_us) {
            Inbound::Done => return,
            Inbound::Rtt(sample) => {
                self.pacer.on_pong(sample.sent_us, now_us);
                self.events.push_back(ServerEvent::Rtt(sample));
                return;
            }
            Inbound::Side(message) => message,
        };
        match message {
            ControlMessage::FrameAck(ack) => {
                self.acks_received += 1;
                // An ack of a frame not in flight (late, duplicated, made up) teaches the pacer
                // nothing.
                self.pacer.on_ack(&ack, now_us);
            }
            ControlMessage::RequestLayout(sizes) => {
                if self.capabilities.contains(Capabilities::DYNAMIC_LAYOUT) {
                    self.layout_pending = Some(sizes);
                    self.apply_layout_if_due(now_us);
                } else {
                    self.core.ignored += 1;
                }
            }
            ControlMessage::ClientStats(stats) => self.events.push_back(ServerEvent::ClientStats(stats)),
            // The common rules let only the client's messages through; the rest are handled there.
            _ => {}
        }
    }

    // ---- time ----

    /// When [`Self::handle_timeout`] is due next; `None` once the channel is closed.
    pub fn poll_timeout(&self) -> Option<u64> {
        let open = self.core.is_open();
        let layout = match (&self.layout_pending, self.layout_applied_us) {
            (Some(_), Some(last)) if open => Some(last.saturating_add(self.core.config.layout_interval_us)),
            (Some(_), None) if open => Some(0),
            _ => None,
        };
        let resume = self.resume_due_us.filter(|_| open);
        earliest([self.core.poll_timeout(), layout, resume])
    }

    /// Runs every timer that is due at `now_us`.
    pub fn handle_timeout(&mut self, now_us: u64) {
        self.core.linger_if_due(now_us);
        self.core.ping_if_due(now_us);
        self.apply_layout_if_due(now_us);
        if self.core.is_open()
            && let Some(due) = self.resume_due_us
            && now_us >= due
        {
            self.want_resume_token(now_us);
        }
    }

    // ---- out ----

    /// The next message to write on the control stream.
    pub fn poll_transmit(&mut self) -> Option<ControlMessage> {
        self.core.outbox.pop_front()
    }

    /// The next event for the application.
    pub fn poll_event(&mut self) -> Option<ServerEvent> {
        self.events.pop_front().or_else(|| self.core.take_closed().map(ServerEvent::Closed))
    }

    // ---- intents ----

    /// Tells the client the guest's monitors, if they changed since it was last told. An empty
    /// layout (the guest between modes) is not announced. Returns whether a message was queued.
    pub fn announce_layout(&mut self, monitors: Vec<Monitor>) -> Result<bool, IntentError> {
        if !self.core.is_open() {
            return Err(IntentError::Closed);
        }
        if monitors.is_empty() || self.announced.as_ref() == Some(&monitors) {
            return Ok(false);
        }
        let message = checked(ControlMessage::DisplayLayout(monitors.clone()))?;
        self.core.send(message)?;
        self.announced = Some(monitors);
        Ok(true)
    }

    /// Sends a resume token the application issued (after [`ServerEvent::ResumeTokenWanted`]).
    pub fn send_resume_token(
        &mut self,
        token: String,
        lifetime_s: u32,
        now_us: u64,
    ) -> Result<(), IntentError> {
        if !self.capabilities.contains(Capabilities::RESUME) {
            return Err(IntentError::NotNegotiated { what: "a resume token", capability: "RESUME" });
        }
        let message = checked(ControlMessage::ResumeToken(ResumeToken { token, lifetime_s }))?;
        self.core.send(message)?;
        self.resume_due_us = Some(now_us.saturating_add(self.core.config.resume_renew_us.max(1)));
        Ok(())
    }

    /// Says goodbye (the last message), then waits for the client to close, at most
    /// [`ControlConfig::goodbye_linger_us`]. Frames stop at once.
    pub fn close(&mut self, reason: GoodbyeReason, message: &str, now_us: u64) {
        self.core.close(reason, message, now_us);
        self.layout_pending = None;
    }

    // ---- frames ----

    /// Whether a frame may go out now (the pacer allows it and the channel is open).
    pub fn may_send_frame(&mut self, now_us: u64) -> bool {
        self.core.is_open() && self.pacer.may_send(now_us)
    }

    /// A frame of `bytes` just went out.
    pub fn on_frame_sent(&mut self, frame_id: u64, bytes: u64, now_us: u64) {
        self.pacer.on_sent(frame_id, bytes, now_us);
    }

    /// The pacer: bitrate and frame-rate targets, the next write-off deadline, counters.
    pub fn pacer(&self) -> &FramePacer {
        &self.pacer
    }

    // ---- state ----

    pub fn capabilities(&self) -> Capabilities {
        self.capabilities
    }

    /// The RTT of this side's pings.
    pub fn rtt(&self) -> &RttEstimator {
        &self.core.rtt
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

    /// `FrameAck`s the client sent, in time for the pacer or not.
    pub fn acks_received(&self) -> u64 {
        self.acks_received
    }

    fn apply_layout_if_due(&mut self, now_us: u64) {
        if !self.core.is_open() || self.layout_pending.is_none() {
            return;
        }
        let interval = self.core.config.layout_interval_us;
        let due = self.layout_applied_us.is_none_or(|last| now_us.saturating_sub(last) >= interval);
        if due && let Some(sizes) = self.layout_pending.take() {
            self.layout_applied_us = Some(now_us);
            self.events.push_back(ServerEvent::LayoutWanted(sizes));
        }
    }

    fn want_resume_token(&mut self, now_us: u64) {
        self.events.push_back(ServerEvent::ResumeTokenWanted);
        // Asked again after the interval even if this request goes unanswered.
        self.resume_due_us = Some(now_us.saturating_add(self.core.config.resume_renew_us.max(1)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::tests::pair::session;
    use crate::control::{ControlError, GOODBYE_LINGER_US, LAYOUT_INTERVAL_US};
    use crate::transport::error_code;
    use crate::wire::{self, FrameAck, Goodbye, Hello, Ping, Pong};

    fn server(capabilities: Capabilities) -> ServerControl {
        ServerControl::new(&session(capabilities), ControlConfig::default(), 0)
    }

    fn drain(s: &mut ServerControl) -> Vec<ControlMessage> {
        std::iter::from_fn(|| s.poll_transmit()).collect()
    }

    fn events(s: &mut ServerControl) -> Vec<ServerEvent> {
        std::iter::from_fn(|| s.poll_event()).collect()
    }

    fn sizes(width: u32) -> Vec<MonitorSize> {
        vec![MonitorSize { width, height: 600 }]
    }

    #[test]
    fn opens_with_a_ping_and_asks_for_a_resume_token() {
        let mut s = server(Capabilities::SUPPORTED);
        assert_eq!(drain(&mut s), [ControlMessage::Ping(Ping { nonce: 1, sent_us: 0 })]);
        assert_eq!(events(&mut s), [ServerEvent::ResumeTokenWanted]);
        s.send_resume_token("pr1.token".into(), 120, 5).unwrap();
        assert_eq!(
            drain(&mut s),
            [ControlMessage::ResumeToken(ResumeToken { token: "pr1.token".into(), lifetime_s: 120 })]
        );
        // Renewed well before a token's longest life.
        assert_eq!(s.poll_timeout(), Some(1_000_000), "the next ping first");
        s.handle_timeout(crate::control::RESUME_RENEW_US + 5);
        assert!(events(&mut s).contains(&ServerEvent::ResumeTokenWanted));

        let mut s = server(Capabilities::H264);
        assert_eq!(events(&mut s), [], "no token without RESUME");
        assert!(matches!(
            s.send_resume_token("pr1.token".into(), 120, 0),
            Err(IntentError::NotNegotiated { capability: "RESUME", .. })
        ));
    }

    #[test]
    fn pongs_measure_the_rtt_and_feed_the_pacer_and_acks_free_the_frame() {
        let mut s = server(Capabilities::SUPPORTED);
        drain(&mut s);
        events(&mut s);
        s.handle_message(ControlMessage::Pong(Pong { nonce: 1, sent_us: 0 }), 40_000);
        let sample = RttSample { sent_us: 0, latest_us: 40_000, smoothed_us: 40_000 };
        assert_eq!(events(&mut s), [ServerEvent::Rtt(sample)]);
        assert_eq!(s.pacer().path_rtt().smoothed(), Some(40_000));
        // Made-up answers teach nothing: an unknown nonce, a time the ping did not carry.
        s.handle_message(ControlMessage::Pong(Pong { nonce: 1, sent_us: 0 }), 90_000);
        s.handle_message(ControlMessage::Pong(Pong { nonce: 9, sent_us: 0 }), 90_000);
        s.handle_timeout(1_000_000);
        s.handle_message(ControlMessage::Pong(Pong { nonce: 2, sent_us: 999 }), 1_010_000);
        assert_eq!(events(&mut s), []);
        assert_eq!((s.rtt().samples(), s.ignored()), (1, 3));

        assert!(s.may_send_frame(1_000_000));
        s.on_frame_sent(1, 10_000, 1_000_000);
        assert!(!s.may_send_frame(1_010_000), "one frame in flight");
        let ack = FrameAck { frame_id: 1, scanout: 0, received_us: 500, decoded_us: 2_500 };
        s.handle_message(ControlMessage::FrameAck(ack), 1_042_000);
        s.handle_message(ControlMessage::FrameAck(ack), 1_043_000);
        assert_eq!(
            (s.pacer().acked_frames(), s.acks_received()),
            (1, 2),
            "a second ack counts only as received"
        );
        assert_eq!(s.pacer().frame_rtt().smoothed(), Some(40_000), "send → ack minus the decode time");
        assert!(s.may_send_frame(1_042_000));
    }

    #[test]
    fn layout_requests_are_limited_and_the_latest_wins() {
        let mut s = server(Capabilities::SUPPORTED);
        events(&mut s);
        s.handle_message(ControlMessage::RequestLayout(sizes(800)), 10_000);
        assert_eq!(events(&mut s), [ServerEvent::LayoutWanted(sizes(800))], "the first at once");
        // A dragged window: many requests within the interval; none applied yet.
        for (i, width) in (801..900).enumerate() {
            s.handle_message(ControlMessage::RequestLayout(sizes(width)), 10_000 + i as u64 * 1000);
        }
        assert_eq!(events(&mut s), []);
        assert_eq!(
            s.poll_timeout(),
            Some(10_000 + LAYOUT_INTERVAL_US),
            "the pending one's time, before the ping's"
        );
        s.handle_timeout(10_000 + LAYOUT_INTERVAL_US);
        assert_eq!(events(&mut s), [ServerEvent::LayoutWanted(sizes(899))], "the latest, on the timer");
        s.handle_timeout(3_000_000);
        assert!(!events(&mut s).iter().any(|e| matches!(e, ServerEvent::LayoutWanted(_))), "nothing pending");

        let mut s = server(Capabilities::H264);
        s.handle_message(ControlMessage::RequestLayout(sizes(800)), 0);
        assert_eq!((events(&mut s), s.ignored()), (vec![], 1), "ignored without DYNAMIC_LAYOUT");
        assert!(s.is_open());
    }

    #[test]
    fn layouts_are_announced_once_per_change() {
        let mut s = server(Capabilities::SUPPORTED);
        drain(&mut s);
        let one = vec![Monitor { id: 0, x: 0, y: 0, width: 1024, height: 768 }];
        assert_eq!(s.announce_layout(one.clone()), Ok(true));
        assert_eq!(s.announce_layout(one.clone()), Ok(false), "unchanged");
        assert_eq!(s.announce_layout(vec![]), Ok(false), "between modes");
        let twins = vec![one[0], one[0]];
        assert!(matches!(s.announce_layout(twins), Err(IntentError::Invalid { name: "DisplayLayout", .. })));
        assert_eq!(drain(&mut s), [ControlMessage::DisplayLayout(one)]);
    }

    #[test]
    fn messages_only_a_server_sends_end_the_channel_with_a_clear_reason() {
        let welcome = ControlMessage::Welcome(wire::Welcome {
            version: 1,
            capabilities: Capabilities::SUPPORTED,
            session_id: 1,
            server_name: "evil".into(),
        });
        let layout = ControlMessage::DisplayLayout(vec![Monitor { id: 0, x: 0, y: 0, width: 1, height: 1 }]);
        let hello = ControlMessage::Hello(Hello {
            version_min: 1,
            version_max: 1,
            capabilities: Capabilities::SUPPORTED,
            ticket: "pt1.x".into(),
            client_name: "again".into(),
        });
        for (message, text) in [
            (layout, "the client sent DisplayLayout (0x0006), which only a server may send"),
            (welcome, "the client sent Welcome (0x0002), which only a server may send"),
            (hello, "the client sent Hello (0x0001) after the handshake was over"),
        ] {
            let mut s = server(Capabilities::SUPPORTED);
            events(&mut s);
            s.handle_message(ControlMessage::ClientStats(ClientStats::default()), 10);
            s.handle_stream_data(&wire::encode_to_vec(&message).unwrap(), 10);
            let got = events(&mut s);
            assert_eq!(got.len(), 2, "{got:?}");
            assert_eq!(
                got[0],
                ServerEvent::ClientStats(ClientStats::default()),
                "what came before still counts"
            );
            let ServerEvent::Closed(CloseReason::Error(error)) = &got[1] else { panic!("{got:?}") };
            assert_eq!(error.to_string(), text);
            assert_eq!(error.error_code(), error_code::PROTOCOL_VIOLATION);
            assert_eq!((s.poll_timeout(), s.poll_event()), (None, None), "closed once, no timers");
            assert_eq!(drain(&mut s), [], "nothing follows an error");
            assert!(!s.may_send_frame(20));
            s.handle_message(ControlMessage::Ping(Ping { nonce: 1, sent_us: 1 }), 30);
            assert_eq!(drain(&mut s), [], "a closed channel answers nothing");
        }
    }

    #[test]
    fn bad_bytes_and_an_early_end_are_errors_and_unknown_types_are_skipped() {
        let mut s = server(Capabilities::SUPPORTED);
        drain(&mut s);
        // Type 0x00ff (a future control message), 3 bytes of body; then a ping.
        let mut bytes = vec![0xff, 0x00, 3, 0, 0, 0, 1, 2, 3];
        bytes.extend(wire::encode_to_vec(&ControlMessage::Ping(Ping { nonce: 5, sent_us: 6 })).unwrap());
        s.handle_stream_data(&bytes, 1);
        assert_eq!(
            (s.unknown_skipped(), drain(&mut s)),
            (1, vec![ControlMessage::Pong(Pong { nonce: 5, sent_us: 6 })])
        );
        // A goodbye with a non-UTF-8 message.
        s.handle_stream_data(&[0x09, 0x00, 6, 0, 0, 0, 0, 0, 2, 0, 0xff, 0xfe], 2);
        let Some(CloseReason::Error(error)) = s.close_reason() else { panic!("{:?}", s.close_reason()) };
        assert_eq!(error.error_code(), error_code::MALFORMED_MESSAGE);

        let mut s = server(Capabilities::SUPPORTED);
        s.handle_stream_data(&[0x04, 0x00, 16, 0], 1);
        s.handle_stream_end(2);
        let Some(CloseReason::Error(ControlError::Decode(error))) = s.close_reason() else { panic!() };
        assert_eq!(error.error_code(), error_code::TRUNCATED);

        let mut s = server(Capabilities::SUPPORTED);
        s.handle_stream_end(2);
        assert_eq!(
            s.close_reason(),
            Some(&CloseReason::Error(ControlError::StreamEnded { sender: Side::Client }))
        );
    }

    #[test]
    fn goodbye_either_way() {
        let mut s = server(Capabilities::SUPPORTED);
        events(&mut s);
        let bye = Goodbye { reason: GoodbyeReason::Disconnect, message: "window closed".into() };
        s.handle_message(ControlMessage::Goodbye(bye.clone()), 5);
        s.handle_stream_end(6);
        assert_eq!(
            events(&mut s),
            [ServerEvent::Closed(CloseReason::Peer(bye))],
            "an end after goodbye is fine"
        );
        assert_eq!(s.close_reason().map(CloseReason::error_code), Some(error_code::NO_ERROR));

        let mut s = server(Capabilities::SUPPORTED);
        drain(&mut s);
        events(&mut s);
        s.on_frame_sent(1, 100, 0);
        s.close(GoodbyeReason::Replaced, "replaced by a new connection to this desktop", 100);
        let replaced = Goodbye {
            reason: GoodbyeReason::Replaced,
            message: "replaced by a new connection to this desktop".into(),
        };
        assert_eq!(drain(&mut s), [ControlMessage::Goodbye(replaced.clone())]);
        assert!(!s.may_send_frame(10_000_000), "frames stop at once");
        assert_eq!(
            s.announce_layout(vec![Monitor { id: 0, x: 0, y: 0, width: 8, height: 8 }]),
            Err(IntentError::Closed)
        );
        s.close(GoodbyeReason::Admin, "twice", 200);
        s.handle_message(ControlMessage::Ping(Ping { nonce: 1, sent_us: 1 }), 300);
        s.handle_message(ControlMessage::RequestLayout(sizes(640)), 300);
        assert_eq!((drain(&mut s), events(&mut s)), (vec![], vec![]), "Goodbye was the last word");
        assert_eq!(s.poll_timeout(), Some(100 + GOODBYE_LINGER_US));
        s.handle_timeout(100 + GOODBYE_LINGER_US);
        assert_eq!(events(&mut s), [ServerEvent::Closed(CloseReason::Local(replaced))]);
        assert_eq!(s.poll_timeout(), None);
    }
}
