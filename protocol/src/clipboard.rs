//! The VM process's clipboard relay, sans I/O: between the session's client (clipboard
//! channel) and the guest session (agent link), with the pool's policy enforced here, on the
//! host, whatever either end does.
//!
//! ```text
//! client ──Grab──▶ relay ──Grab──▶ agent          (to-guest allowed)
//! client ◀─Data── relay ◀─Request─ agent          (the guest's user pastes)
//! client ──Data──▶ relay ──Data──▶ agent          (chunk by chunk, checked)
//! client ──Grab──▶ relay ──Refused{NotShared}──▶ client   + RelayEvent::Denied (audited)
//! ```
//!
//! What the relay keeps: each end's latest grab (replayed to the other end when it connects,
//! withdrawn with an empty grab when its owner goes away) and at most one transfer per
//! direction (a request for other content or another format replaces the older transfer, whose
//! asker is told `Refused{Gone}`; the same request again is passed on only while nothing of it
//! has crossed; a chunk that does not continue the current transfer is dropped, one that breaks
//! it cancels it with `Refused{Failed}` to the asker).
//! Nothing is buffered: chunks are passed on as they come, so the relay's memory does not grow
//! with the content; the content's size is bounded by [`MAX_CLIPBOARD_BYTES`] and the chunk
//! checks.

use crate::wire::{
    ClipboardData, ClipboardFormat, ClipboardGrab, ClipboardMessage, ClipboardRefused, ClipboardRequest,
    MAX_CLIPBOARD_BYTES, RefuseReason,
};

/// One end of the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum End {
    /// The session's client (the user's own machine).
    Client,
    /// The guest session (through the agent).
    Guest,
}

impl End {
    pub fn other(self) -> End {
        match self {
            End::Client => End::Guest,
            End::Guest => End::Client,
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Which way clipboard content travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Copied on the client, pasted in the desktop.
    ToGuest,
    /// Copied in the desktop, pasted on the client.
    FromGuest,
}

impl Direction {
    /// The direction of content owned by `owner`.
    pub fn from_owner(owner: End) -> Direction {
        match owner {
            End::Client => Direction::ToGuest,
            End::Guest => Direction::FromGuest,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Direction::ToGuest => "to-guest",
            Direction::FromGuest => "from-guest",
        }
    }
}

/// Which directions the desktop's pool allows (the data loss prevention switches).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ClipboardPolicy {
    pub to_guest: bool,
    pub from_guest: bool,
}

impl ClipboardPolicy {
    pub const BOTH: Self = Self { to_guest: true, from_guest: true };
    pub const NONE: Self = Self { to_guest: false, from_guest: false };

    /// The value of `pleiades-host run --clipboard` for this policy.
    pub fn as_arg(self) -> &'static str {
        match (self.to_guest, self.from_guest) {
            (true, true) => "both",
            (true, false) => "to-guest",
            (false, true) => "from-guest",
            (false, false) => "none",
        }
    }

    pub fn allows(self, direction: Direction) -> bool {
        match direction {
            Direction::ToGuest => self.to_guest,
            Direction::FromGuest => self.from_guest,
        }
    }
}

impl Default for ClipboardPolicy {
    fn default() -> Self {
        Self::BOTH
    }
}

/// What happened, for the VM process's counters and the broker's audit log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RelayEvent {
    /// An end copied something the policy keeps from the other end.
    Denied { direction: Direction, formats: Vec<ClipboardFormat> },
    /// Content was pasted across, whole.
    Transferred { direction: Direction, format: ClipboardFormat, bytes: u32 },
}

/// A request passed to the owner, waiting for its data.
#[derive(Debug, Clone, Copy)]
struct Transfer {
    serial: u32,
    format: ClipboardFormat,
    /// Bytes passed on so far, and the total the first chunk announced.
    passed: u32,
    total: Option<u32>,
}

/// The relay. Feed it what each end sends ([`Self::from_end`]) and when ends come and go;
/// take what to send ([`Self::poll_transmit`]) and what happened ([`Self::poll_event`]).
#[derive(Debug, Default)]
pub struct ClipboardRelay {
    policy: ClipboardPolicy,
    connected: [bool; 2],
    /// Each end's latest grab with formats (indexed by the owner).
    grabs: [Option<ClipboardGrab>; 2],
    /// The transfer each end owes (indexed by the owner, who sends the data).
    transfers: [Option<Transfer>; 2],
    out: std::collections::VecDeque<(End, ClipboardMessage)>,
    events: std::collections::VecDeque<RelayEvent>,
}

impl ClipboardRelay {
    pub fn new(policy: ClipboardPolicy) -> Self {
        Self { policy, ..Self::default() }
    }

    pub fn policy(&self) -> ClipboardPolicy {
        self.policy
    }

    /// Changes the policy; content already offered in a direction now denied is withdrawn, and
    /// its pending paste refused.
    pub fn set_policy(&mut self, policy: ClipboardPolicy) {
        self.policy = policy;
        for owner in [End::Client, End::Guest] {
            if !policy.allows(Direction::from_owner(owner)) {
                self.cancel(owner, RefuseReason::Policy);
                if self.grabs[owner.index()].take().is_some() {
                    self.withdraw_from(owner.other());
                }
            }
        }
    }

    /// `end` is there now (a client arrived, the agent connected): it learns what the other
    /// end offers.
    pub fn connected(&mut self, end: End) {
        self.connected[end.index()] = true;
        let owner = end.other();
        if let Some(grab) = &self.grabs[owner.index()]
            && self.policy.allows(Direction::from_owner(owner))
        {
            self.out.push_back((end, ClipboardMessage::Grab(grab.clone())));
        }
    }

    /// `end` went away: what it offered is withdrawn from the other end, and what the other end
    /// waits for from it is refused.
    pub fn disconnected(&mut self, end: End) {
        self.connected[end.index()] = false;
        self.cancel(end, RefuseReason::Gone);
        // Whatever it asked for is no longer wanted.
        self.transfers[end.other().index()] = None;
        if self.grabs[end.index()].take().is_some() {
            self.withdraw_from(end.other());
        }
    }

    /// What `from` sent.
    pub fn from_end(&mut self, from: End, message: ClipboardMessage) {
        match message {
            ClipboardMessage::Grab(grab) => self.on_grab(from, grab),
            ClipboardMessage::Request(request) => self.on_request(from, request),
            ClipboardMessage::Data(data) => self.on_data(from, data),
            ClipboardMessage::Refused(refused) => self.on_refused(from, refused),
        }
    }

    /// The next message to send, and to which end.
    pub fn poll_transmit(&mut self) -> Option<(End, ClipboardMessage)> {
        self.out.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<RelayEvent> {
        self.events.pop_front()
    }

    fn on_grab(&mut self, owner: End, grab: ClipboardGrab) {
        let direction = Direction::from_owner(owner);
        // A new grab ends the transfer of the old content.
        self.cancel(owner, RefuseReason::Gone);
        if grab.formats.is_empty() {
            if self.grabs[owner.index()].take().is_some() {
                self.withdraw_from(owner.other());
            }
            return;
        }
        if !self.policy.allows(direction) {
            self.events.push_back(RelayEvent::Denied { direction, formats: grab.formats.clone() });
            let refused = ClipboardRefused {
                serial: grab.serial,
                format: grab.formats[0],
                reason: RefuseReason::NotShared,
            };
            self.out.push_back((owner, ClipboardMessage::Refused(refused)));
            return;
        }
        if self.connected[owner.other().index()] {
            self.out.push_back((owner.other(), ClipboardMessage::Grab(grab.clone())));
        }
        self.grabs[owner.index()] = Some(grab);
    }

    fn on_request(&mut self, asker: End, request: ClipboardRequest) {
        let owner = asker.other();
        let refuse = |reason| ClipboardRefused { serial: request.serial, format: request.format, reason };
        let reason = match &self.grabs[owner.index()] {
            _ if !self.policy.allows(Direction::from_owner(owner)) => Some(RefuseReason::Policy),
            None => Some(RefuseReason::Gone),
            Some(grab) if grab.serial != request.serial => Some(RefuseReason::Gone),
            Some(grab) if !grab.formats.contains(&request.format) => Some(RefuseReason::NoFormat),
            Some(_) if !self.connected[owner.index()] => Some(RefuseReason::Gone),
            Some(_) => None,
        };
        if let Some(reason) = reason {
            self.out.push_back((asker, ClipboardMessage::Refused(refuse(reason))));
            return;
        }
        match self.transfers[owner.index()] {
            // The same paste again (the asker's user pasted once more while it was on its
            // way): asked of the owner again only while nothing of it crossed (the owner
            // answers one of them; the relay passes one answer on).
            Some(t) if (t.serial, t.format) == (request.serial, request.format) => {
                if t.passed == 0 && t.total.is_none() {
                    self.out.push_back((owner, ClipboardMessage::Request(request)));
                }
                return;
            }
            // A paste of other content or another format replaces the older one, whose asker
            // is told; the owner's late chunks of it are dropped below.
            Some(_) => self.cancel(owner, RefuseReason::Gone),
            None => {}
        }
        self.transfers[owner.index()] =
            Some(Transfer { serial: request.serial, format: request.format, passed: 0, total: None });
        self.out.push_back((owner, ClipboardMessage::Request(request)));
    }

    fn on_data(&mut self, owner: End, data: ClipboardData) {
        let Some(transfer) = &mut self.transfers[owner.index()] else { return };
        if (transfer.serial, transfer.format) != (data.serial, data.format) {
            // An answer to a request that was replaced: not wanted any more.
            return;
        }
        let continues = data.offset == transfer.passed
            && transfer.total.is_none_or(|total| total == data.total)
            && data.total <= MAX_CLIPBOARD_BYTES;
        if !continues {
            self.cancel(owner, RefuseReason::Failed);
            return;
        }
        transfer.total = Some(data.total);
        transfer.passed += data.bytes.len() as u32;
        let last = data.is_last();
        let (format, total) = (data.format, data.total);
        self.out.push_back((owner.other(), ClipboardMessage::Data(data)));
        if last {
            self.transfers[owner.index()] = None;
            let direction = Direction::from_owner(owner);
            self.events.push_back(RelayEvent::Transferred { direction, format, bytes: total });
        }
    }

    fn on_refused(&mut self, owner: End, refused: ClipboardRefused) {
        let matches = self.transfers[owner.index()]
            .is_some_and(|t| (t.serial, t.format) == (refused.serial, refused.format));
        if matches {
            self.transfers[owner.index()] = None;
            self.out.push_back((owner.other(), ClipboardMessage::Refused(refused)));
        }
    }

    /// Ends the transfer `owner` owes, telling the asker why.
    fn cancel(&mut self, owner: End, reason: RefuseReason) {
        if let Some(t) = self.transfers[owner.index()].take() {
            let refused = ClipboardRefused { serial: t.serial, format: t.format, reason };
            self.out.push_back((owner.other(), ClipboardMessage::Refused(refused)));
        }
    }

    /// Tells `end` that what the other end offered is gone (an empty grab).
    fn withdraw_from(&mut self, end: End) {
        if self.connected[end.index()] {
            self.out
                .push_back((end, ClipboardMessage::Grab(ClipboardGrab { serial: 0, formats: Vec::new() })));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ClipboardFormat::{Html, Png, Text};

    fn grab(serial: u32, formats: &[ClipboardFormat]) -> ClipboardMessage {
        ClipboardMessage::Grab(ClipboardGrab { serial, formats: formats.to_vec() })
    }

    fn request(serial: u32, format: ClipboardFormat) -> ClipboardMessage {
        ClipboardMessage::Request(ClipboardRequest { serial, format })
    }

    fn refused(serial: u32, format: ClipboardFormat, reason: RefuseReason) -> ClipboardMessage {
        ClipboardMessage::Refused(ClipboardRefused { serial, format, reason })
    }

    fn drain(relay: &mut ClipboardRelay) -> Vec<(End, ClipboardMessage)> {
        std::iter::from_fn(|| relay.poll_transmit()).collect()
    }

    fn both_connected(policy: ClipboardPolicy) -> ClipboardRelay {
        let mut relay = ClipboardRelay::new(policy);
        relay.connected(End::Client);
        relay.connected(End::Guest);
        relay
    }

    #[test]
    fn a_paste_in_the_guest_moves_the_clients_content_chunk_by_chunk() {
        let mut relay = both_connected(ClipboardPolicy::BOTH);
        relay.from_end(End::Client, grab(7, &[Text, Html]));
        assert_eq!(drain(&mut relay), [(End::Guest, grab(7, &[Text, Html]))]);
        relay.from_end(End::Guest, request(7, Text));
        assert_eq!(drain(&mut relay), [(End::Client, request(7, Text))]);
        let content = vec![b'x'; 100_000];
        let chunks = ClipboardData::chunks(7, Text, &content);
        assert_eq!(chunks.len(), 3);
        for chunk in &chunks {
            relay.from_end(End::Client, ClipboardMessage::Data(chunk.clone()));
        }
        let passed: Vec<_> = drain(&mut relay);
        assert_eq!(passed.len(), 3);
        assert!(passed.iter().all(|(end, _)| *end == End::Guest));
        assert_eq!(
            relay.poll_event(),
            Some(RelayEvent::Transferred { direction: Direction::ToGuest, format: Text, bytes: 100_000 })
        );
        // Late or repeated chunks after the end are not passed on.
        relay.from_end(End::Client, ClipboardMessage::Data(chunks[2].clone()));
        assert_eq!(drain(&mut relay), []);
    }

    #[test]
    fn the_policy_keeps_content_on_its_side_and_says_so() {
        let mut relay = both_connected(ClipboardPolicy { to_guest: false, from_guest: true });
        relay.from_end(End::Client, grab(1, &[Text]));
        assert_eq!(drain(&mut relay), [(End::Client, refused(1, Text, RefuseReason::NotShared))]);
        assert_eq!(
            relay.poll_event(),
            Some(RelayEvent::Denied { direction: Direction::ToGuest, formats: vec![Text] })
        );
        // A guest that asks anyway (a forged request) is refused too.
        relay.from_end(End::Guest, request(1, Text));
        assert_eq!(drain(&mut relay), [(End::Guest, refused(1, Text, RefuseReason::Policy))]);
        // The other direction works.
        relay.from_end(End::Guest, grab(4, &[Png]));
        assert_eq!(drain(&mut relay), [(End::Client, grab(4, &[Png]))]);

        // Nothing at all.
        let mut relay = both_connected(ClipboardPolicy::NONE);
        relay.from_end(End::Guest, grab(4, &[Png, Text]));
        assert_eq!(drain(&mut relay), [(End::Guest, refused(4, Png, RefuseReason::NotShared))]);
        assert_eq!(
            relay.poll_event(),
            Some(RelayEvent::Denied { direction: Direction::FromGuest, formats: vec![Png, Text] })
        );
        relay.from_end(End::Client, request(4, Png));
        assert_eq!(drain(&mut relay), [(End::Client, refused(4, Png, RefuseReason::Policy))]);
    }

    #[test]
    fn a_policy_change_withdraws_what_was_offered() {
        let mut relay = both_connected(ClipboardPolicy::BOTH);
        relay.from_end(End::Guest, grab(2, &[Text]));
        drain(&mut relay);
        relay.set_policy(ClipboardPolicy { to_guest: true, from_guest: false });
        assert_eq!(drain(&mut relay), [(End::Client, grab(0, &[]))]);
        relay.from_end(End::Client, request(2, Text));
        assert_eq!(drain(&mut relay), [(End::Client, refused(2, Text, RefuseReason::Policy))]);
    }

    #[test]
    fn requests_for_other_content_are_refused_without_bothering_the_owner() {
        let mut relay = both_connected(ClipboardPolicy::BOTH);
        relay.from_end(End::Guest, request(1, Text));
        assert_eq!(drain(&mut relay), [(End::Guest, refused(1, Text, RefuseReason::Gone))]);
        relay.from_end(End::Client, grab(5, &[Text]));
        drain(&mut relay);
        relay.from_end(End::Guest, request(4, Text));
        relay.from_end(End::Guest, request(5, Png));
        assert_eq!(
            drain(&mut relay),
            [
                (End::Guest, refused(4, Text, RefuseReason::Gone)),
                (End::Guest, refused(5, Png, RefuseReason::NoFormat))
            ]
        );
    }

    #[test]
    fn chunks_that_do_not_continue_the_transfer_cancel_it() {
        let mut relay = both_connected(ClipboardPolicy::BOTH);
        relay.from_end(End::Guest, grab(3, &[Png]));
        relay.from_end(End::Client, request(3, Png));
        drain(&mut relay);
        let png = [b"\x89PNG\r\n\x1a\n".as_slice(), &[0u8; 60_000]].concat();
        let chunks = ClipboardData::chunks(3, Png, &png);
        // The second chunk first: a gap.
        relay.from_end(End::Guest, ClipboardMessage::Data(chunks[1].clone()));
        assert_eq!(drain(&mut relay), [(End::Client, refused(3, Png, RefuseReason::Failed))]);
        // What comes after the cancel is dropped.
        relay.from_end(End::Guest, ClipboardMessage::Data(chunks[0].clone()));
        assert_eq!(drain(&mut relay), []);

        // A total that changes midway.
        relay.from_end(End::Client, request(3, Png));
        drain(&mut relay);
        relay.from_end(End::Guest, ClipboardMessage::Data(chunks[0].clone()));
        let mut second = chunks[1].clone();
        second.total += 1;
        relay.from_end(End::Guest, ClipboardMessage::Data(second));
        let sent = drain(&mut relay);
        assert_eq!(sent.len(), 2);
        assert_eq!(sent[1], (End::Client, refused(3, Png, RefuseReason::Failed)));
    }

    #[test]
    fn an_end_that_leaves_takes_its_content_and_answers_with_it() {
        let mut relay = both_connected(ClipboardPolicy::BOTH);
        relay.from_end(End::Client, grab(9, &[Text]));
        relay.from_end(End::Guest, request(9, Text));
        drain(&mut relay);
        relay.disconnected(End::Client);
        assert_eq!(
            drain(&mut relay),
            [(End::Guest, refused(9, Text, RefuseReason::Gone)), (End::Guest, grab(0, &[]))]
        );
        // The guest's content waits for the next client.
        relay.from_end(End::Guest, grab(11, &[Html]));
        assert_eq!(drain(&mut relay), []);
        relay.connected(End::Client);
        assert_eq!(drain(&mut relay), [(End::Client, grab(11, &[Html]))]);
    }

    #[test]
    fn a_paste_of_something_else_replaces_the_pending_one_and_its_asker_is_told() {
        let mut relay = both_connected(ClipboardPolicy::BOTH);
        relay.from_end(End::Guest, grab(2, &[Text, Html]));
        relay.from_end(End::Client, request(2, Html));
        relay.from_end(End::Client, request(2, Text));
        assert_eq!(
            drain(&mut relay)[1..],
            [
                (End::Guest, request(2, Html)),
                (End::Client, refused(2, Html, RefuseReason::Gone)),
                (End::Guest, request(2, Text))
            ]
        );
        // The same paste again: asked again while nothing crossed, then no more.
        relay.from_end(End::Client, request(2, Text));
        assert_eq!(drain(&mut relay), [(End::Guest, request(2, Text))]);
        let chunks = ClipboardData::chunks(2, Text, &vec![b'a'; 60_000]);
        relay.from_end(End::Guest, ClipboardMessage::Data(chunks[0].clone()));
        relay.from_end(End::Client, request(2, Text));
        relay.from_end(End::Guest, ClipboardMessage::Data(chunks[1].clone()));
        let sent = drain(&mut relay);
        assert!(
            sent.iter().all(|(end, m)| *end == End::Client && matches!(m, ClipboardMessage::Data(_))),
            "{sent:?}"
        );
        assert_eq!(sent.len(), 2);
        // A policy change refuses what is on its way.
        relay.from_end(End::Client, request(2, Html));
        drain(&mut relay);
        relay.set_policy(ClipboardPolicy { to_guest: true, from_guest: false });
        assert_eq!(
            drain(&mut relay),
            [(End::Client, refused(2, Html, RefuseReason::Policy)), (End::Client, grab(0, &[]))]
        );
    }

    #[test]
    fn a_new_grab_refuses_the_pending_paste_of_the_old_one() {
        let mut relay = both_connected(ClipboardPolicy::BOTH);
        relay.from_end(End::Client, grab(1, &[Text]));
        relay.from_end(End::Guest, request(1, Text));
        drain(&mut relay);
        relay.from_end(End::Client, grab(2, &[Text]));
        assert_eq!(
            drain(&mut relay),
            [(End::Guest, refused(1, Text, RefuseReason::Gone)), (End::Guest, grab(2, &[Text]))]
        );
        // The cleared clipboard is withdrawn.
        relay.from_end(End::Client, grab(3, &[]));
        assert_eq!(drain(&mut relay), [(End::Guest, grab(0, &[]))]);
    }
}
