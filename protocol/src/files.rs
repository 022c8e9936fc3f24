//! The VM process's file transfer relay, sans I/O: between the session's client (files
//! channel), which sends files, and the guest (agent link), which writes them into the user's
//! Downloads. The pool's policy is enforced here, on the host, and so are the transfer's rules,
//! whatever either end does.
//!
//! ```text
//! client ──Offer──▶ relay ──Offer──▶ agent         (allowed, fewer than MAX_FILE_TRANSFERS)
//! client ◀─Accept── relay ◀─Accept── agent         (offset: what the guest already has)
//! client ──Data───▶ relay ──Data───▶ agent         (in order, within the window, ≤ size)
//! client ◀─Progress relay ◀─Progress agent         (the window moves on)
//! client ◀─Done──── relay ◀─Done──── agent         + FileEvent::Completed
//! client ──Offer──▶ relay ──Refused{Policy}──▶ client    + FileEvent::Denied (audited)
//! ```
//!
//! The window: the client may send at most [`FILE_WINDOW`] bytes beyond what the guest
//! reported written (or the offset it accepted at). That bounds what the VM process holds for
//! a slow guest to [`MAX_FILE_TRANSFERS`] × [`FILE_WINDOW`]; a client that sends beyond it, out
//! of order or past the size loses the transfer (`Refused{Protocol}`), the guest keeps what
//! arrived. When the client's connection ends, the guest is told `Cancel{Interrupted}` (it
//! keeps the partial file for a later offer); when the guest's link ends, the client is told
//! `Refused{Interrupted}` (it offers again to resume). Nothing is buffered here.

use std::collections::{BTreeMap, VecDeque};

pub use crate::clipboard::End;
use crate::wire::{CancelReason, FILE_WINDOW, FileData, FileMessage, FileRefuseReason, MAX_FILE_TRANSFERS};

/// What happened to a transfer, for the VM process's counters and logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileEvent {
    /// The pool's policy refused an offer (the broker audits it).
    Denied { name: String, size: u64 },
    /// A file arrived whole in the guest, its SHA-256 checked.
    Completed { name: String, size: u64, stored_as: String },
    /// A transfer ended without the file in place.
    Failed { name: String, reason: FileRefuseReason },
}

#[derive(Debug)]
enum State {
    /// Offered to the guest, not accepted yet.
    Offered,
    /// Accepted: the client sends `next..limit` now.
    Open { next: u64, limit: u64 },
}

#[derive(Debug)]
struct Transfer {
    name: String,
    size: u64,
    state: State,
}

/// The relay; the VM process's agent thread drives it.
#[derive(Debug)]
pub struct FileRelay {
    allowed: bool,
    client: bool,
    guest: bool,
    transfers: BTreeMap<u32, Transfer>,
    out: VecDeque<(End, FileMessage)>,
    events: VecDeque<FileEvent>,
    bytes_to_guest: u64,
}

impl FileRelay {
    /// A relay that lets files through when `allowed` (the pool's policy).
    pub fn new(allowed: bool) -> Self {
        Self {
            allowed,
            client: false,
            guest: false,
            transfers: BTreeMap::new(),
            out: VecDeque::new(),
            events: VecDeque::new(),
            bytes_to_guest: 0,
        }
    }

    pub fn allowed(&self) -> bool {
        self.allowed
    }

    /// Changes the policy; turning it off ends the transfers in progress (the guest deletes
    /// what arrived of them).
    pub fn set_allowed(&mut self, allowed: bool) {
        self.allowed = allowed;
        if !allowed {
            for (id, transfer) in std::mem::take(&mut self.transfers) {
                self.send(End::Guest, FileMessage::Cancel { id, reason: CancelReason::User });
                self.refuse(id, transfer.name, FileRefuseReason::Policy);
            }
        }
    }

    /// Bytes passed on to the guest so far.
    pub fn bytes_to_guest(&self) -> u64 {
        self.bytes_to_guest
    }

    /// Transfers in progress.
    pub fn transfers(&self) -> usize {
        self.transfers.len()
    }

    /// `end` is there now.
    pub fn connected(&mut self, end: End) {
        match end {
            End::Client => self.client = true,
            End::Guest => self.guest = true,
        }
    }

    /// `end` went away: every transfer is interrupted, and the other end is told.
    pub fn disconnected(&mut self, end: End) {
        match end {
            End::Client => self.client = false,
            End::Guest => self.guest = false,
        }
        for (id, transfer) in std::mem::take(&mut self.transfers) {
            match end {
                End::Client => {
                    self.send(End::Guest, FileMessage::Cancel { id, reason: CancelReason::Interrupted });
                    self.events.push_back(FileEvent::Failed {
                        name: transfer.name,
                        reason: FileRefuseReason::Interrupted,
                    });
                }
                End::Guest => self.refuse(id, transfer.name, FileRefuseReason::Interrupted),
            }
        }
    }

    /// A message from `from` (dropped while `from` is not connected: what it says then belongs
    /// to no transfer of this relay's).
    pub fn from_end(&mut self, from: End, message: FileMessage) {
        let connected = match from {
            End::Client => self.client,
            End::Guest => self.guest,
        };
        if !connected {
            return;
        }
        match from {
            End::Client if message.from_sender() => self.on_client(message),
            End::Guest if !message.from_sender() => self.on_guest(message),
            // The other side's messages: the link's own checks keep them out of the agent
            // link; on the session they are simply not the client's to send.
            _ => {}
        }
    }

    /// The next message to send, and to which end.
    pub fn poll_transmit(&mut self) -> Option<(End, FileMessage)> {
        self.out.pop_front()
    }

    /// The next thing that happened.
    pub fn poll_event(&mut self) -> Option<FileEvent> {
        self.events.pop_front()
    }

    fn send(&mut self, to: End, message: FileMessage) {
        let connected = match to {
            End::Client => self.client,
            End::Guest => self.guest,
        };
        if connected {
            self.out.push_back((to, message));
        }
    }

    /// Tells the client that transfer `id` is over, and why.
    fn refuse(&mut self, id: u32, name: String, reason: FileRefuseReason) {
        self.send(End::Client, FileMessage::Refused { id, reason });
        self.events.push_back(FileEvent::Failed { name, reason });
    }

    /// The client broke transfer `id`'s rules: it ends, the guest keeps what arrived.
    fn broken(&mut self, id: u32) {
        if let Some(transfer) = self.transfers.remove(&id) {
            self.send(End::Guest, FileMessage::Cancel { id, reason: CancelReason::Interrupted });
            self.refuse(id, transfer.name, FileRefuseReason::Protocol);
        }
    }

    fn on_client(&mut self, message: FileMessage) {
        match message {
            FileMessage::Offer(offer) => {
                let id = offer.id;
                if self.transfers.contains_key(&id) {
                    // The same id twice: the transfer ends.
                    return self.broken(id);
                }
                let reason = if !self.allowed {
                    Some(FileRefuseReason::Policy)
                } else if self.transfers.len() >= MAX_FILE_TRANSFERS {
                    Some(FileRefuseReason::Busy)
                } else if !self.guest {
                    Some(FileRefuseReason::NoSession)
                } else {
                    None
                };
                match reason {
                    Some(FileRefuseReason::Policy) => {
                        self.send(End::Client, FileMessage::Refused { id, reason: FileRefuseReason::Policy });
                        self.events.push_back(FileEvent::Denied { name: offer.name, size: offer.size });
                    }
                    Some(reason) => self.refuse(id, offer.name, reason),
                    None => {
                        let transfer =
                            Transfer { name: offer.name.clone(), size: offer.size, state: State::Offered };
                        self.transfers.insert(id, transfer);
                        self.send(End::Guest, FileMessage::Offer(offer));
                    }
                }
            }
            FileMessage::Data(FileData { id, offset, bytes }) => {
                // Data of a transfer that already ended (refused while it was on its way) is
                // dropped.
                let Some(transfer) = self.transfers.get_mut(&id) else { return };
                let end = offset + bytes.len() as u64;
                match &mut transfer.state {
                    State::Open { next, limit }
                        if offset == *next && end <= *limit && end <= transfer.size =>
                    {
                        *next = end;
                        self.bytes_to_guest += bytes.len() as u64;
                        self.send(End::Guest, FileMessage::Data(FileData { id, offset, bytes }));
                    }
                    _ => self.broken(id),
                }
            }
            FileMessage::Cancel { id, reason } => {
                if let Some(transfer) = self.transfers.remove(&id) {
                    self.send(End::Guest, FileMessage::Cancel { id, reason });
                    self.events.push_back(FileEvent::Failed {
                        name: transfer.name,
                        reason: FileRefuseReason::Interrupted,
                    });
                }
            }
            _ => {}
        }
    }

    fn on_guest(&mut self, message: FileMessage) {
        let id = message.id();
        // Answers about transfers that are not in progress (ended meanwhile, or made up) are
        // dropped.
        let Some(transfer) = self.transfers.get_mut(&id) else { return };
        match message {
            FileMessage::Accept { offset, .. } => match transfer.state {
                State::Offered if offset <= transfer.size => {
                    transfer.state = State::Open { next: offset, limit: offset.saturating_add(FILE_WINDOW) };
                    self.send(End::Client, message);
                }
                _ => self.guest_broke(id),
            },
            FileMessage::Progress { received, .. } => match &mut transfer.state {
                State::Open { next, limit } if received <= *next => {
                    *limit = (*limit).max(received.saturating_add(FILE_WINDOW));
                    self.send(End::Client, message);
                }
                _ => self.guest_broke(id),
            },
            FileMessage::Done { ref name, .. } => match transfer.state {
                State::Open { next, .. } if next == transfer.size => {
                    let transfer = self.transfers.remove(&id).expect("looked up above");
                    self.events.push_back(FileEvent::Completed {
                        name: transfer.name,
                        size: transfer.size,
                        stored_as: name.clone(),
                    });
                    self.send(End::Client, message);
                }
                _ => self.guest_broke(id),
            },
            FileMessage::Refused { reason, .. } => {
                let transfer = self.transfers.remove(&id).expect("looked up above");
                // The guest may not claim the host's own reasons.
                let reason = match reason {
                    FileRefuseReason::Policy | FileRefuseReason::Busy | FileRefuseReason::Protocol => {
                        FileRefuseReason::Failed
                    }
                    reason => reason,
                };
                self.refuse(id, transfer.name, reason);
            }
            _ => {}
        }
    }

    /// The guest answered something impossible about transfer `id`: it ends for both.
    fn guest_broke(&mut self, id: u32) {
        if let Some(transfer) = self.transfers.remove(&id) {
            self.send(End::Guest, FileMessage::Cancel { id, reason: CancelReason::Interrupted });
            self.refuse(id, transfer.name, FileRefuseReason::Failed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{FileOffer, MAX_FILE_CHUNK};

    fn offer(id: u32, size: u64) -> FileMessage {
        FileMessage::Offer(FileOffer { id, size, sha256: [7; 32], name: format!("f{id}.bin") })
    }

    fn data(id: u32, offset: u64, len: usize) -> FileMessage {
        FileMessage::Data(FileData { id, offset, bytes: vec![1; len] })
    }

    fn relay(allowed: bool) -> FileRelay {
        let mut relay = FileRelay::new(allowed);
        relay.connected(End::Client);
        relay.connected(End::Guest);
        relay
    }

    fn drain(relay: &mut FileRelay) -> Vec<(End, FileMessage)> {
        std::iter::from_fn(|| relay.poll_transmit()).collect()
    }

    fn events(relay: &mut FileRelay) -> Vec<FileEvent> {
        std::iter::from_fn(|| relay.poll_event()).collect()
    }

    #[test]
    fn a_file_crosses_within_the_window() {
        let mut r = relay(true);
        r.from_end(End::Client, offer(1, 100_000));
        assert_eq!(drain(&mut r), vec![(End::Guest, offer(1, 100_000))]);
        r.from_end(End::Guest, FileMessage::Accept { id: 1, offset: 40_000 });
        assert_eq!(drain(&mut r), vec![(End::Client, FileMessage::Accept { id: 1, offset: 40_000 })]);
        r.from_end(End::Client, data(1, 40_000, MAX_FILE_CHUNK));
        r.from_end(End::Client, data(1, 40_000 + MAX_FILE_CHUNK as u64, 100_000 - 40_000 - MAX_FILE_CHUNK));
        assert_eq!(drain(&mut r).len(), 2);
        r.from_end(End::Guest, FileMessage::Progress { id: 1, received: 100_000 });
        r.from_end(End::Guest, FileMessage::Done { id: 1, name: "f1 (2).bin".into() });
        assert_eq!(
            drain(&mut r),
            vec![
                (End::Client, FileMessage::Progress { id: 1, received: 100_000 }),
                (End::Client, FileMessage::Done { id: 1, name: "f1 (2).bin".into() })
            ]
        );
        assert_eq!(
            events(&mut r),
            vec![FileEvent::Completed {
                name: "f1.bin".into(),
                size: 100_000,
                stored_as: "f1 (2).bin".into()
            }]
        );
        assert_eq!(r.bytes_to_guest(), 60_000);
        assert_eq!(r.transfers(), 0);
    }

    #[test]
    fn the_policy_refuses_offers_and_counts_them() {
        let mut r = relay(false);
        r.from_end(End::Client, offer(3, 10));
        r.from_end(End::Client, data(3, 0, 10));
        assert_eq!(
            drain(&mut r),
            vec![(End::Client, FileMessage::Refused { id: 3, reason: FileRefuseReason::Policy })]
        );
        assert_eq!(events(&mut r), vec![FileEvent::Denied { name: "f3.bin".into(), size: 10 }]);
        assert_eq!(r.bytes_to_guest(), 0);
    }

    #[test]
    fn turning_the_policy_off_ends_transfers_and_deletes_their_bytes() {
        let mut r = relay(true);
        r.from_end(End::Client, offer(1, 10));
        r.from_end(End::Guest, FileMessage::Accept { id: 1, offset: 0 });
        drain(&mut r);
        r.set_allowed(false);
        assert_eq!(
            drain(&mut r),
            vec![
                (End::Guest, FileMessage::Cancel { id: 1, reason: CancelReason::User }),
                (End::Client, FileMessage::Refused { id: 1, reason: FileRefuseReason::Policy })
            ]
        );
    }

    #[test]
    fn data_beyond_the_window_out_of_order_or_past_the_size_ends_the_transfer() {
        for (what, bad) in [
            ("beyond the window", data(1, FILE_WINDOW, 10)),
            ("a gap", data(1, 10, 10)),
            ("past the size", data(1, 0, 11)),
        ] {
            let size = if what == "past the size" { 10 } else { 1 << 30 };
            let mut r = relay(true);
            r.from_end(End::Client, offer(1, size));
            r.from_end(End::Guest, FileMessage::Accept { id: 1, offset: 0 });
            drain(&mut r);
            if what == "beyond the window" {
                // Up to the window is fine, one byte more is not.
                let mut offset = 0;
                while offset < FILE_WINDOW - 10 {
                    let len = (FILE_WINDOW - 10 - offset).min(MAX_FILE_CHUNK as u64) as usize;
                    r.from_end(End::Client, data(1, offset, len));
                    offset += len as u64;
                }
                r.from_end(End::Client, data(1, offset, 10));
                assert!(drain(&mut r).iter().all(|(end, _)| *end == End::Guest));
                r.from_end(End::Client, data(1, FILE_WINDOW, 1));
            } else {
                r.from_end(End::Client, bad);
            }
            assert_eq!(
                drain(&mut r),
                vec![
                    (End::Guest, FileMessage::Cancel { id: 1, reason: CancelReason::Interrupted }),
                    (End::Client, FileMessage::Refused { id: 1, reason: FileRefuseReason::Protocol })
                ],
                "{what}"
            );
            assert_eq!(r.transfers(), 0);
        }
    }

    #[test]
    fn progress_moves_the_window() {
        let mut r = relay(true);
        r.from_end(End::Client, offer(1, 1 << 30));
        r.from_end(End::Guest, FileMessage::Accept { id: 1, offset: 0 });
        let mut offset = 0;
        while offset < FILE_WINDOW {
            r.from_end(End::Client, data(1, offset, MAX_FILE_CHUNK));
            offset += MAX_FILE_CHUNK as u64;
            if offset == 40 * MAX_FILE_CHUNK as u64 {
                r.from_end(End::Guest, FileMessage::Progress { id: 1, received: offset });
            }
        }
        assert!(drain(&mut r).iter().all(|(_, m)| !matches!(m, FileMessage::Refused { .. })));
        assert_eq!(r.bytes_to_guest(), offset);
    }

    #[test]
    fn the_guest_cannot_claim_more_than_it_was_sent_or_the_hosts_reasons() {
        let mut r = relay(true);
        r.from_end(End::Client, offer(1, 100));
        r.from_end(End::Guest, FileMessage::Accept { id: 1, offset: 0 });
        r.from_end(End::Client, data(1, 0, 50));
        drain(&mut r);
        r.from_end(End::Guest, FileMessage::Done { id: 1, name: "f1.bin".into() });
        assert_eq!(
            drain(&mut r),
            vec![
                (End::Guest, FileMessage::Cancel { id: 1, reason: CancelReason::Interrupted }),
                (End::Client, FileMessage::Refused { id: 1, reason: FileRefuseReason::Failed })
            ]
        );
        r.from_end(End::Client, offer(2, 100));
        r.from_end(End::Guest, FileMessage::Refused { id: 2, reason: FileRefuseReason::Policy });
        assert_eq!(
            drain(&mut r).last(),
            Some(&(End::Client, FileMessage::Refused { id: 2, reason: FileRefuseReason::Failed }))
        );
        assert!(!events(&mut r).iter().any(|e| matches!(e, FileEvent::Denied { .. })));
        // Answers about transfers that do not exist go nowhere.
        r.from_end(End::Guest, FileMessage::Done { id: 9, name: "x".into() });
        r.from_end(End::Guest, FileMessage::Accept { id: 9, offset: 0 });
        assert!(drain(&mut r).is_empty());
    }

    #[test]
    fn disconnects_interrupt_and_keep_what_arrived() {
        let mut r = relay(true);
        r.from_end(End::Client, offer(1, 100));
        r.from_end(End::Client, offer(2, 100));
        drain(&mut r);
        r.disconnected(End::Client);
        assert_eq!(
            drain(&mut r),
            vec![
                (End::Guest, FileMessage::Cancel { id: 1, reason: CancelReason::Interrupted }),
                (End::Guest, FileMessage::Cancel { id: 2, reason: CancelReason::Interrupted })
            ]
        );
        r.connected(End::Client);
        r.from_end(End::Client, offer(1, 100));
        drain(&mut r);
        r.disconnected(End::Guest);
        assert_eq!(
            drain(&mut r),
            vec![(End::Client, FileMessage::Refused { id: 1, reason: FileRefuseReason::Interrupted })]
        );
        // A client that is gone says nothing (found by the fuzzer: its data used to reach the
        // guest of a transfer it never heard the accept of).
        r.disconnected(End::Client);
        r.from_end(End::Client, offer(5, 100));
        r.connected(End::Guest);
        r.from_end(End::Guest, FileMessage::Accept { id: 5, offset: 0 });
        r.from_end(End::Client, data(5, 0, 10));
        assert!(drain(&mut r).is_empty());
        r.connected(End::Client);
        r.disconnected(End::Guest);
        // No guest: no session to receive.
        r.from_end(End::Client, offer(3, 100));
        assert_eq!(
            drain(&mut r),
            vec![(End::Client, FileMessage::Refused { id: 3, reason: FileRefuseReason::NoSession })]
        );
    }

    #[test]
    fn at_most_max_transfers_and_one_per_id() {
        let mut r = relay(true);
        for id in 0..MAX_FILE_TRANSFERS as u32 {
            r.from_end(End::Client, offer(id, 1));
        }
        drain(&mut r);
        r.from_end(End::Client, offer(99, 1));
        assert_eq!(
            drain(&mut r),
            vec![(End::Client, FileMessage::Refused { id: 99, reason: FileRefuseReason::Busy })]
        );
        r.from_end(End::Client, offer(0, 1));
        let out = drain(&mut r);
        assert!(
            out.contains(&(End::Client, FileMessage::Refused { id: 0, reason: FileRefuseReason::Protocol }))
        );
        assert_eq!(r.transfers(), MAX_FILE_TRANSFERS - 1);
    }
}
