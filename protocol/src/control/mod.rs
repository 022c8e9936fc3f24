//! The control channel after the handshake, sans-IO: [`ServerControl`] and [`ClientControl`].
//!
//! Both are state machines in the style of quinn-proto's `Connection`. The caller owns the
//! control stream and the clock; it feeds in what the peer sent (`handle_stream_data` with the
//! stream's bytes, `handle_stream_end` at its end, or decoded messages with `handle_message`),
//! its own intents (a frame ack, a layout, a goodbye) and the time, then drains
//! `poll_transmit` (messages to write, in order), `poll_event` (what the application acts on)
//! and `poll_timeout` (when to call `handle_timeout` next). The host's session server and the
//! client are pumps around them; the tests drive both through an in-memory pair.
//!
//! What the channel does (docs/protocol.md, §4 Control and §5):
//! - both sides `Ping` when the channel opens and every [`ControlConfig::ping_interval_us`],
//!   answer every `Ping` with a `Pong`, and estimate the RTT from the `Pong`s to their own pings
//!   (RFC 6298 smoothing);
//! - the server feeds `Pong`s and `FrameAck`s into its [`FramePacer`](crate::pacing::FramePacer),
//!   asks the application for a resume token after opening and before the last one ages out
//!   (with `RESUME`), announces the guest's monitors when they change, and turns the client's
//!   `RequestLayout`s into at most one layout change per
//!   [`ControlConfig::layout_interval_us`], the latest winning;
//! - the client acks frames, sends `ClientStats` with every ping after the first, asks for
//!   layouts, keeps the server's layout and latest resume token;
//! - either side ends with `Goodbye` (its reason reaches the other side) and closes after the
//!   peer closed or [`ControlConfig::goodbye_linger_us`] passed.
//!
//! Invariants:
//! - No I/O, no threads, no clock: time is `now_us` (the caller's monotonic µs); time that goes
//!   backwards counts as no time passing.
//! - Nothing the peer sends panics a side: malformed bytes, a message only this side may send
//!   (a `DisplayLayout` from a client), a second handshake or a stream that ends without
//!   `Goodbye` end the channel with a [`ControlError`] that names it and its QUIC error code.
//! - Message types this version does not know are skipped and counted (the decoder's rule); a
//!   message whose capability was not negotiated is ignored and counted.
//! - Everything `poll_transmit` returns encodes: intents are validated when queued.
//! - `Goodbye` is the last message a side sends; after an error or the peer's `Goodbye`, a side
//!   sends nothing more.
//! - The channel ends once: exactly one `Closed` event, after every other event; then
//!   `poll_timeout` is `None` and every input is ignored.
//! - `handle_timeout(t)` with `t ≥ poll_timeout()` always moves `poll_timeout` past `t`: a pump
//!   never spins.
//! - Memory is bounded: at most [`MAX_OUTSTANDING_PINGS`] pings are remembered, and the outgoing
//!   queue grows only with what the caller feeds between two drains.

mod client;
mod server;
#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::fmt;

pub use client::{ClientControl, ClientEvent};
pub use server::{ServerControl, ServerEvent};

use crate::pacing::{PacerConfig, RttEstimator};
use crate::transport::{PING_INTERVAL_US, error_code};
use crate::wire::{
    ChannelMessage, ControlMessage, DecodeError, Goodbye, GoodbyeReason, MAX_TEXT_LEN, Ping, Pong, Side,
    StreamDecoder,
};

/// Pings remembered until their `Pong`; an older one is forgotten (its answer teaches nothing).
pub const MAX_OUTSTANDING_PINGS: usize = 8;
/// How long a side that said `Goodbye` waits for the peer to close before it closes itself.
pub const GOODBYE_LINGER_US: u64 = 2_000_000;
/// The least time between two layout changes a client can cause: each one makes the guest
/// re-probe its monitors, so a window being dragged must not become hundreds of them.
pub const LAYOUT_INTERVAL_US: u64 = 250_000;
/// How often a live session gets a fresh resume token: well inside a token's longest life
/// ([`crate::resume::MAX_TOKEN_AGE_S`]), so a long session can always resume.
pub const RESUME_RENEW_US: u64 = crate::resume::MAX_TOKEN_AGE_S * 1_000_000 / 2;

/// The channel's knobs; the defaults are the protocol's.
#[derive(Debug, Clone)]
pub struct ControlConfig {
    pub ping_interval_us: u64,
    pub goodbye_linger_us: u64,
    /// Server: the least time between two layout changes.
    pub layout_interval_us: u64,
    /// Server: how often a fresh resume token is wanted (with `RESUME`).
    pub resume_renew_us: u64,
    /// Server: the frame pacer's knobs.
    pub pacer: PacerConfig,
}

impl Default for ControlConfig {
    fn default() -> Self {
        Self {
            ping_interval_us: PING_INTERVAL_US,
            goodbye_linger_us: GOODBYE_LINGER_US,
            layout_interval_us: LAYOUT_INTERVAL_US,
            resume_renew_us: RESUME_RENEW_US,
            pacer: PacerConfig::default(),
        }
    }
}

/// Why the channel ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    /// This side said goodbye.
    Local(Goodbye),
    /// The peer said goodbye.
    Peer(Goodbye),
    /// The peer broke the protocol.
    Error(ControlError),
}

impl CloseReason {
    /// The QUIC application error code to close the connection with.
    pub fn error_code(&self) -> u32 {
        match self {
            CloseReason::Local(_) | CloseReason::Peer(_) => error_code::NO_ERROR,
            CloseReason::Error(error) => error.error_code(),
        }
    }
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CloseReason::Local(g) => write!(f, "said goodbye ({:?}): {}", g.reason, g.message),
            CloseReason::Peer(g) => write!(f, "the peer said goodbye ({:?}): {}", g.reason, g.message),
            CloseReason::Error(error) => error.fmt(f),
        }
    }
}

/// How the peer broke the control channel's rules; each ends the channel.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error("the {sender} sent {name} ({ty:#06x}), which only a {other} may send", other = sender.other())]
    WrongDirection { name: &'static str, ty: u16, sender: Side },
    #[error("the {sender} sent {name} ({ty:#06x}) after the handshake was over")]
    HandshakeAgain { name: &'static str, ty: u16, sender: Side },
    #[error("the {sender} ended the control stream without Goodbye")]
    StreamEnded { sender: Side },
}

impl ControlError {
    /// The QUIC application error code to close the connection with.
    pub fn error_code(&self) -> u32 {
        match self {
            ControlError::Decode(error) => error.error_code(),
            _ => error_code::PROTOCOL_VIOLATION,
        }
    }
}

/// Why a local intent was not queued; the channel goes on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IntentError {
    #[error("{what} needs the {capability} capability, which this session did not negotiate")]
    NotNegotiated { what: &'static str, capability: &'static str },
    #[error("invalid {name}: {reason}")]
    Invalid { name: &'static str, reason: &'static str },
    #[error("the control channel is closed")]
    Closed,
}

/// One round-trip measurement from a `Pong` to this side's own `Ping`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RttSample {
    /// When the ping left (this side's clock, µs).
    pub sent_us: u64,
    /// This sample (µs, at least 1).
    pub latest_us: u64,
    /// The smoothed RTT after it (µs).
    pub smoothed_us: u64,
}

/// The name of a control message, for errors and logs.
pub fn message_name(message: &ControlMessage) -> &'static str {
    match message {
        ControlMessage::Hello(_) => "Hello",
        ControlMessage::Welcome(_) => "Welcome",
        ControlMessage::Refused(_) => "Refused",
        ControlMessage::Ping(_) => "Ping",
        ControlMessage::Pong(_) => "Pong",
        ControlMessage::DisplayLayout(_) => "DisplayLayout",
        ControlMessage::RequestLayout(_) => "RequestLayout",
        ControlMessage::ClientStats(_) => "ClientStats",
        ControlMessage::Goodbye(_) => "Goodbye",
        ControlMessage::FrameAck(_) => "FrameAck",
        ControlMessage::ResumeToken(_) => "ResumeToken",
    }
}

/// Checks an intent's message as the encoder will, so that `poll_transmit` never yields one
/// that does not encode.
fn checked(message: ControlMessage) -> Result<ControlMessage, IntentError> {
    match message.validate() {
        Ok(()) => Ok(message),
        Err(reason) => Err(IntentError::Invalid { name: message_name(&message), reason }),
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    Open,
    /// This side said goodbye; the peer closes, or the channel ends at `deadline_us`.
    Closing {
        goodbye: Goodbye,
        deadline_us: u64,
    },
    Closed(CloseReason),
}

/// What a message from the peer means once the common rules ran.
#[derive(Debug)]
enum Inbound {
    /// Handled here (a ping, a goodbye, a violation) or ignored.
    Done,
    /// A `Pong` to one of our pings.
    Rtt(RttSample),
    /// For the side to handle.
    Side(ControlMessage),
}

/// What both sides do alike: decoding, direction checks, ping/pong and the RTT, goodbye, the
/// outgoing queue and the channel's state.
#[derive(Debug)]
struct Core {
    /// This side.
    side: Side,
    config: ControlConfig,
    decoder: StreamDecoder<ControlMessage>,
    outbox: VecDeque<ControlMessage>,
    state: State,
    closed_reported: bool,
    next_ping_us: u64,
    next_nonce: u64,
    /// `(nonce, sent_us)` of the pings not answered yet, oldest first.
    pings: VecDeque<(u64, u64)>,
    rtt: RttEstimator,
    /// Messages ignored for want of a negotiated capability, or answers to unknown pings.
    ignored: u64,
}

impl Core {
    fn new(side: Side, config: ControlConfig, now_us: u64) -> Self {
        Self {
            side,
            config,
            decoder: StreamDecoder::new(),
            outbox: VecDeque::new(),
            state: State::Open,
            closed_reported: false,
            // The first ping goes out at once: an RTT is known one round trip after opening.
            next_ping_us: now_us,
            next_nonce: 1,
            pings: VecDeque::new(),
            rtt: RttEstimator::new(),
            ignored: 0,
        }
    }

    fn peer(&self) -> Side {
        self.side.other()
    }

    fn is_open(&self) -> bool {
        self.state == State::Open
    }

    fn is_closed(&self) -> bool {
        matches!(self.state, State::Closed(_))
    }

    fn close_reason(&self) -> Option<&CloseReason> {
        match &self.state {
            State::Closed(reason) => Some(reason),
            _ => None,
        }
    }

    /// Ends the channel; the outgoing queue is dropped (nothing follows an error or the peer's
    /// goodbye, and our own goodbye was drained before its linger ran out).
    fn end(&mut self, reason: CloseReason) {
        if !self.is_closed() {
            self.state = State::Closed(reason);
            self.outbox.clear();
            self.pings.clear();
        }
    }

    fn fail(&mut self, error: ControlError) {
        self.end(CloseReason::Error(error));
    }

    /// The `Closed` event, once, when the side has no other event left.
    fn take_closed(&mut self) -> Option<CloseReason> {
        if self.closed_reported {
            return None;
        }
        let reason = self.close_reason()?.clone();
        self.closed_reported = true;
        Some(reason)
    }

    /// Queues a message if the channel is open.
    fn send(&mut self, message: ControlMessage) -> Result<(), IntentError> {
        if !self.is_open() {
            return Err(IntentError::Closed);
        }
        self.outbox.push_back(message);
        Ok(())
    }

    /// The next whole message of `input` (consumed up to its end), while the channel still
    /// listens. A decode error ends the channel.
    fn next_message(&mut self, input: &mut &[u8]) -> Option<ControlMessage> {
        if self.is_closed() || input.is_empty() {
            return None;
        }
        match self.decoder.decode(input) {
            Ok(message) => message,
            Err(error) => {
                self.fail(error.into());
                None
            }
        }
    }

    fn handle_stream_end(&mut self) {
        if !self.is_open() {
            return;
        }
        match self.decoder.finish() {
            Err(error) => self.fail(error.into()),
            Ok(()) => self.fail(ControlError::StreamEnded { sender: self.peer() }),
        }
    }

    /// The rules every message from the peer goes through.
    fn accept(&mut self, message: ControlMessage, now_us: u64) -> Inbound {
        if let State::Closing { goodbye, .. } = &self.state {
            // The peer's goodbye crossing ours ends the wait; nothing else matters any more.
            if matches!(message, ControlMessage::Goodbye(_)) {
                let goodbye = goodbye.clone();
                self.end(CloseReason::Local(goodbye));
            }
            return Inbound::Done;
        }
        if self.is_closed() {
            return Inbound::Done;
        }
        let sender = self.peer();
        let (name, ty) = (message_name(&message), message.message_type());
        if !message.may_be_sent_by(sender) {
            self.fail(ControlError::WrongDirection { name, ty, sender });
            return Inbound::Done;
        }
        if message.is_handshake() {
            self.fail(ControlError::HandshakeAgain { name, ty, sender });
            return Inbound::Done;
        }
        match message {
            ControlMessage::Ping(Ping { nonce, sent_us }) => {
                self.outbox.push_back(ControlMessage::Pong(Pong { nonce, sent_us }));
                Inbound::Done
            }
            ControlMessage::Pong(pong) => match self.on_pong(pong, now_us) {
                Some(sample) => Inbound::Rtt(sample),
                None => {
                    self.ignored += 1;
                    Inbound::Done
                }
            },
            ControlMessage::Goodbye(goodbye) => {
                self.end(CloseReason::Peer(goodbye));
                Inbound::Done
            }
            other => Inbound::Side(other),
        }
    }

    /// A `Pong` counts only for a ping of ours still outstanding, and only with the time that
    /// ping carried: a peer cannot make up RTT samples.
    fn on_pong(&mut self, pong: Pong, now_us: u64) -> Option<RttSample> {
        let index = self.pings.iter().position(|&(nonce, _)| nonce == pong.nonce)?;
        let (_, sent_us) = self.pings[index];
        if sent_us != pong.sent_us {
            return None;
        }
        // Pongs come in order on the stream: older pings will not be answered any more.
        self.pings.drain(..=index);
        let latest_us = now_us.saturating_sub(sent_us).max(1);
        self.rtt.on_sample(latest_us);
        Some(RttSample { sent_us, latest_us, smoothed_us: self.rtt.smoothed().unwrap_or(latest_us) })
    }

    /// Sends a ping if one is due; returns whether it did.
    fn ping_if_due(&mut self, now_us: u64) -> bool {
        if !self.is_open() || now_us < self.next_ping_us {
            return false;
        }
        let nonce = self.next_nonce;
        self.next_nonce = self.next_nonce.wrapping_add(1);
        self.outbox.push_back(ControlMessage::Ping(Ping { nonce, sent_us: now_us }));
        self.pings.push_back((nonce, now_us));
        while self.pings.len() > MAX_OUTSTANDING_PINGS {
            self.pings.pop_front();
        }
        // From now, not from when it was due: a pump that slept long sends one ping, not a burst.
        self.next_ping_us = now_us.saturating_add(self.config.ping_interval_us.max(1));
        true
    }

    /// Ends the linger of our goodbye once its time is up.
    fn linger_if_due(&mut self, now_us: u64) {
        if let State::Closing { goodbye, deadline_us } = &self.state
            && now_us >= *deadline_us
        {
            let goodbye = goodbye.clone();
            self.end(CloseReason::Local(goodbye));
        }
    }

    /// The common timers: the next ping while open, the linger's end while closing.
    fn poll_timeout(&self) -> Option<u64> {
        match &self.state {
            State::Open => Some(self.next_ping_us),
            State::Closing { deadline_us, .. } => Some(*deadline_us),
            State::Closed(_) => None,
        }
    }

    /// Queues `Goodbye` as the last message and starts the linger.
    fn close(&mut self, reason: GoodbyeReason, message: &str, now_us: u64) {
        if !self.is_open() {
            return;
        }
        let goodbye = Goodbye { reason: GoodbyeReason::from_u16(reason.to_u16()), message: clip(message) };
        self.outbox.push_back(ControlMessage::Goodbye(goodbye.clone()));
        self.pings.clear();
        self.state =
            State::Closing { goodbye, deadline_us: now_us.saturating_add(self.config.goodbye_linger_us) };
    }
}

/// `text` cut to the protocol's limit at a character boundary.
fn clip(text: &str) -> String {
    let mut end = text.len().min(MAX_TEXT_LEN);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

/// The earliest of some deadlines.
fn earliest(deadlines: impl IntoIterator<Item = Option<u64>>) -> Option<u64> {
    deadlines.into_iter().flatten().min()
}
