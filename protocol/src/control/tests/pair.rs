//! An in-memory pair: a [`ServerControl`] and a [`ClientControl`] connected by two one-way
//! links with delay and loss, on simulated time (after quinn-proto's `tests/util.rs` `Pair`).
//!
//! The control channel is one ordered, reliable QUIC stream, so a lost packet is not a lost
//! message: QUIC sends it again, and it arrives late together with everything queued behind
//! it (head-of-line blocking). The links model exactly that: each message is delayed by the
//! link's one-way delay, a "lost" one by a retransmission time more, and nothing overtakes.
//! Bytes go through the real encoder and decoder.
//!
//! The pair also plays the pumps' parts that the state machines leave to their callers: it
//! answers `ResumeTokenWanted` from a real [`ResumeTokens`] store when given one, and a side
//! that reports `Closed` closes the "connection": nothing in flight arrives any more.

use std::collections::VecDeque;

use crate::control::{ClientControl, ClientEvent, ControlConfig, ServerControl, ServerEvent};
use crate::handshake::{Capabilities, Session};
use crate::resume::{RESUME_LIFETIME_S, ResumeTokens};
use crate::wire::{self, ControlMessage};

/// One direction of the control stream.
#[derive(Debug)]
pub struct Link {
    pub delay_us: u64,
    /// Messages lost (and sent again after `retransmit_us`) per thousand.
    pub loss_permille: u32,
    pub retransmit_us: u64,
    rng: u64,
    queue: VecDeque<(u64, Vec<u8>)>,
    last_arrival_us: u64,
    /// Messages that were "lost" once.
    pub lost: u64,
}

impl Link {
    pub fn new(delay_us: u64) -> Self {
        Self {
            delay_us,
            loss_permille: 0,
            retransmit_us: 0,
            rng: 0x9e37_79b9_7f4a_7c15,
            queue: VecDeque::new(),
            last_arrival_us: 0,
            lost: 0,
        }
    }

    /// Loses `permille` of the messages once; they arrive `retransmit_us` late.
    pub fn lossy(mut self, permille: u32, retransmit_us: u64, seed: u64) -> Self {
        self.loss_permille = permille;
        self.retransmit_us = retransmit_us;
        self.rng = seed | 1;
        self
    }

    fn random_permille(&mut self) -> u32 {
        // xorshift64: deterministic for a seed, no dependency.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        (self.rng % 1000) as u32
    }

    fn send(&mut self, now_us: u64, bytes: Vec<u8>) {
        let mut arrival = now_us + self.delay_us;
        if self.loss_permille > 0 && self.random_permille() < self.loss_permille {
            arrival += self.retransmit_us;
            self.lost += 1;
        }
        // One stream: a message never overtakes the one before it.
        arrival = arrival.max(self.last_arrival_us);
        self.last_arrival_us = arrival;
        self.queue.push_back((arrival, bytes));
    }

    fn next_arrival(&self) -> Option<u64> {
        self.queue.front().map(|&(at, _)| at)
    }

    /// Everything that has arrived by `now_us`, as one chunk.
    fn take_arrived(&mut self, now_us: u64) -> Vec<u8> {
        let mut chunk = Vec::new();
        while self.queue.front().is_some_and(|&(at, _)| at <= now_us) {
            if let Some((_, bytes)) = self.queue.pop_front() {
                chunk.extend_from_slice(&bytes);
            }
        }
        chunk
    }

    /// Writes raw bytes onto the link, as a broken or hostile peer would.
    pub fn inject(&mut self, now_us: u64, bytes: Vec<u8>) {
        self.send(now_us, bytes);
    }
}

/// A session whose sides agreed on `capabilities`.
pub fn session(capabilities: Capabilities) -> Session {
    Session { version: 1, capabilities, session_id: 7, peer_name: "pair".into() }
}

/// The two sides, their links and what came out of them.
#[derive(Debug)]
pub struct Pair {
    pub server: ServerControl,
    pub client: ClientControl,
    pub now: u64,
    pub to_server: Link,
    pub to_client: Link,
    /// Every event with the time it came out.
    pub server_events: Vec<(u64, ServerEvent)>,
    pub client_events: Vec<(u64, ClientEvent)>,
    /// Every message each side wrote, with the time.
    pub server_sent: Vec<(u64, ControlMessage)>,
    pub client_sent: Vec<(u64, ControlMessage)>,
    /// When set, the pair answers `ResumeTokenWanted` as the host does.
    pub tokens: Option<ResumeTokens>,
    /// The connection is closed (a side reported `Closed`): the links carry nothing more.
    pub connection_closed: bool,
}

/// How many rounds one instant may take before the pair calls it a spinning pump.
const MAX_ROUNDS_PER_INSTANT: usize = 1000;

impl Pair {
    /// Both sides with every capability, `one_way_us` each way, no loss, default knobs.
    pub fn new(one_way_us: u64) -> Self {
        Self::with(
            Capabilities::SUPPORTED,
            ControlConfig::default(),
            Link::new(one_way_us),
            Link::new(one_way_us),
        )
    }

    pub fn with(capabilities: Capabilities, config: ControlConfig, to_server: Link, to_client: Link) -> Self {
        let session = session(capabilities);
        let now = 0;
        Self {
            server: ServerControl::new(&session, config.clone(), now),
            client: ClientControl::new(&session, config, now),
            now,
            to_server,
            to_client,
            server_events: Vec::new(),
            client_events: Vec::new(),
            server_sent: Vec::new(),
            client_sent: Vec::new(),
            tokens: None,
            connection_closed: false,
        }
    }

    /// Everything that happens at `now`, until nothing more does.
    pub fn settle(&mut self) {
        for _ in 0..MAX_ROUNDS_PER_INSTANT {
            if !self.round() {
                return;
            }
        }
        panic!("the pair is still busy at {} µs after {MAX_ROUNDS_PER_INSTANT} rounds", self.now);
    }

    /// One round at `now`; whether anything happened.
    fn round(&mut self) -> bool {
        let now = self.now;
        let mut busy = false;
        while let Some(message) = self.server.poll_transmit() {
            busy = true;
            let bytes = wire::encode_to_vec(&message).expect("the server sends only messages that encode");
            self.server_sent.push((now, message));
            if !self.connection_closed {
                self.to_client.send(now, bytes);
            }
        }
        while let Some(message) = self.client.poll_transmit() {
            busy = true;
            let bytes = wire::encode_to_vec(&message).expect("the client sends only messages that encode");
            self.client_sent.push((now, message));
            if !self.connection_closed {
                self.to_server.send(now, bytes);
            }
        }
        if !self.connection_closed {
            let chunk = self.to_server.take_arrived(now);
            if !chunk.is_empty() {
                busy = true;
                self.server.handle_stream_data(&chunk, now);
            }
            let chunk = self.to_client.take_arrived(now);
            if !chunk.is_empty() {
                busy = true;
                self.client.handle_stream_data(&chunk, now);
            }
        }
        if self.server.poll_timeout().is_some_and(|t| t <= now) {
            busy = true;
            self.server.handle_timeout(now);
        }
        if self.client.poll_timeout().is_some_and(|t| t <= now) {
            busy = true;
            self.client.handle_timeout(now);
        }
        while let Some(event) = self.server.poll_event() {
            busy = true;
            match &event {
                ServerEvent::ResumeTokenWanted => {
                    if let Some(tokens) = &mut self.tokens {
                        let token = tokens.issue(7, "desk", "ann", now / 1_000_000).expect("randomness");
                        let _ = self.server.send_resume_token(token, RESUME_LIFETIME_S as u32, now);
                    }
                }
                ServerEvent::Closed(_) => self.connection_closed = true,
                _ => {}
            }
            self.server_events.push((now, event));
        }
        while let Some(event) = self.client.poll_event() {
            busy = true;
            if let ClientEvent::Closed(_) = event {
                self.connection_closed = true;
            }
            self.client_events.push((now, event));
        }
        busy
    }

    /// When the next thing happens: an arrival or a timer.
    fn next_instant(&self) -> Option<u64> {
        let arrivals = if self.connection_closed {
            [None, None]
        } else {
            [self.to_server.next_arrival(), self.to_client.next_arrival()]
        };
        arrivals.into_iter().chain([self.server.poll_timeout(), self.client.poll_timeout()]).flatten().min()
    }

    /// Runs simulated time up to `until` (µs since the pair opened), instant by instant.
    pub fn drive_until(&mut self, until: u64) {
        self.settle();
        while let Some(next) = self.next_instant() {
            if next > until {
                break;
            }
            // `settle` ran everything due at `now` (or panicked on a timer that stays due), so
            // `next` is later: time only moves forward.
            self.now = next.max(self.now);
            self.settle();
        }
        self.now = self.now.max(until);
        self.settle();
    }

    pub fn run_for(&mut self, us: u64) {
        self.drive_until(self.now + us);
    }

    /// The server's events so far (without times).
    pub fn server_events(&self) -> Vec<ServerEvent> {
        self.server_events.iter().map(|(_, e)| e.clone()).collect()
    }

    pub fn client_events(&self) -> Vec<ClientEvent> {
        self.client_events.iter().map(|(_, e)| e.clone()).collect()
    }
}
