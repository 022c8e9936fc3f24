//! One end of the lazy clipboard: a local clipboard (the client's desktop, or the guest
//! session's) on one side, the protocol's [`ClipboardMessage`]s on the other. The client and
//! the guest agent's session part run the same peer; only their transport differs (the
//! session's clipboard stream, the agent's local socket and vsock).
//!
//! ```text
//! local copy      → Grabbed(formats)         → Grab{serial+1, formats}
//! remote Grab     → remote_grab(formats)       (the local clipboard now offers them)
//! local paste     → DataWanted{request, fmt} → Request{remote serial, fmt}
//! remote Data…    → (reassembled, checked)   → provide(request, Some(bytes))
//! remote Request  → fetch(id, fmt)           → Fetched{id, bytes} → Data chunks
//! ```
//!
//! Incoming content is bounded by the peer's limit (at most
//! [`MAX_CLIPBOARD_BYTES`]) while it arrives, must continue where the last chunk ended, and
//! must be what its format says ([`ClipboardFormat::accepts`]) before a local application
//! sees it; anything else refuses the paste.

use std::collections::{HashMap, VecDeque};

use pleiades_protocol::wire::{
    ClipboardData, ClipboardFormat, ClipboardGrab, ClipboardMessage, ClipboardRefused, ClipboardRequest,
    MAX_CLIPBOARD_BYTES, RefuseReason,
};

use crate::{ClipboardError, LocalEvent, X11Clipboard};

/// What the peer needs of the local clipboard ([`crate::X11Clipboard`], or a test's).
pub trait LocalClipboard {
    /// The other end has content in these formats (none: it has nothing now).
    fn remote_grab(&self, formats: Vec<ClipboardFormat>);
    /// The answer to a local paste the peer was told of.
    fn provide(&self, request: u64, data: Option<Vec<u8>>);
    /// Reads the local content as `format`; the result comes back through
    /// [`ClipboardPeer::local_fetched`].
    fn fetch(&self, id: u64, format: ClipboardFormat);
}

impl LocalClipboard for X11Clipboard {
    fn remote_grab(&self, formats: Vec<ClipboardFormat>) {
        X11Clipboard::remote_grab(self, formats);
    }

    fn provide(&self, request: u64, data: Option<Vec<u8>>) {
        X11Clipboard::provide(self, request, data);
    }

    fn fetch(&self, id: u64, format: ClipboardFormat) {
        X11Clipboard::fetch(self, id, format);
    }
}

/// What happened that the program may tell its user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerEvent {
    /// The desktop's policy kept what the local user copied from the other end.
    Denied { formats: Vec<ClipboardFormat> },
    /// A local paste got the other end's content.
    Pasted { format: ClipboardFormat, bytes: usize },
    /// A local paste got nothing.
    PasteFailed { format: ClipboardFormat, reason: RefuseReason },
}

/// Content arriving for local pastes.
#[derive(Debug)]
struct Incoming {
    serial: u32,
    format: ClipboardFormat,
    /// The local pastes waiting for it (several pastes of one format share a request).
    requests: Vec<u64>,
    bytes: Vec<u8>,
}

/// The peer's state; feed it local events and remote messages, send what
/// [`Self::poll_transmit`] gives.
#[derive(Debug)]
pub struct ClipboardPeer {
    limit: usize,
    /// The local content's serial and formats, as last announced.
    serial: u32,
    formats: Vec<ClipboardFormat>,
    /// The other end's content.
    remote: Option<ClipboardGrab>,
    /// At most one per format: local pastes waiting for remote data.
    incoming: Vec<Incoming>,
    /// Local reads for remote pastes: fetch id → (serial, format).
    fetches: HashMap<u64, (u32, ClipboardFormat)>,
    next_fetch: u64,
    out: VecDeque<ClipboardMessage>,
    events: VecDeque<PeerEvent>,
}

impl ClipboardPeer {
    /// A peer that accepts content of up to `limit` bytes (capped at [`MAX_CLIPBOARD_BYTES`]).
    pub fn new(limit: usize) -> Self {
        Self {
            limit: limit.min(MAX_CLIPBOARD_BYTES as usize),
            serial: 0,
            formats: Vec::new(),
            remote: None,
            incoming: Vec::new(),
            fetches: HashMap::new(),
            next_fetch: 1,
            out: VecDeque::new(),
            events: VecDeque::new(),
        }
    }

    pub fn poll_transmit(&mut self) -> Option<ClipboardMessage> {
        self.out.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<PeerEvent> {
        self.events.pop_front()
    }

    /// A new link to the other end (the session or the agent link started again): it learns
    /// the local content again; what came from the previous link is gone.
    pub fn reconnected(&mut self, local: &impl LocalClipboard) {
        self.fail_incoming(local, RefuseReason::Gone);
        if self.remote.take().is_some() {
            local.remote_grab(Vec::new());
        }
        self.fetches.clear();
        if !self.formats.is_empty() {
            self.out.push_back(ClipboardMessage::Grab(ClipboardGrab {
                serial: self.serial,
                formats: self.formats.clone(),
            }));
        }
    }

    /// What the local X clipboard reported.
    pub fn on_local(&mut self, event: LocalEvent, local: &impl LocalClipboard) {
        match event {
            LocalEvent::Grabbed(formats) => self.local_grabbed(formats),
            LocalEvent::Released => self.local_released(),
            LocalEvent::DataWanted { request, format } => self.local_wants(request, format, local),
            LocalEvent::Fetched { id, result } => self.local_fetched(
                id,
                result.map_err(|e| match e {
                    ClipboardError::TooLarge { .. } => RefuseReason::TooLarge,
                    ClipboardError::Unavailable(_) => RefuseReason::NoFormat,
                    _ => RefuseReason::Failed,
                }),
            ),
        }
    }

    /// A local application copied something offered in `formats`.
    pub fn local_grabbed(&mut self, formats: Vec<ClipboardFormat>) {
        let mut formats = formats;
        formats.sort();
        formats.dedup();
        formats.truncate(pleiades_protocol::wire::MAX_CLIPBOARD_FORMATS);
        self.serial = self.serial.wrapping_add(1);
        self.formats = formats.clone();
        self.fetches.clear();
        self.out.push_back(ClipboardMessage::Grab(ClipboardGrab { serial: self.serial, formats }));
    }

    /// The local clipboard has no owner any more.
    pub fn local_released(&mut self) {
        if !self.formats.is_empty() {
            self.local_grabbed(Vec::new());
        }
    }

    /// A local application pastes the other end's content (`request` is the local clipboard's).
    pub fn local_wants(&mut self, request: u64, format: ClipboardFormat, local: &impl LocalClipboard) {
        let Some(remote) = self.remote.as_ref().filter(|r| r.formats.contains(&format)) else {
            local.provide(request, None);
            return;
        };
        if let Some(waiting) =
            self.incoming.iter_mut().find(|i| i.serial == remote.serial && i.format == format)
        {
            waiting.requests.push(request);
            // Nothing came yet: ask again (the relay passes the request on only while nothing
            // of the content crossed), in case the first one was replaced on its way.
            if waiting.bytes.is_empty() {
                self.out
                    .push_back(ClipboardMessage::Request(ClipboardRequest { serial: remote.serial, format }));
            }
            return;
        }
        self.incoming.push(Incoming {
            serial: remote.serial,
            format,
            requests: vec![request],
            bytes: Vec::new(),
        });
        self.out.push_back(ClipboardMessage::Request(ClipboardRequest { serial: remote.serial, format }));
    }

    /// The local clipboard's answer to [`LocalClipboard::fetch`].
    pub fn local_fetched(&mut self, id: u64, result: Result<Vec<u8>, RefuseReason>) {
        let Some((serial, format)) = self.fetches.remove(&id) else { return };
        if serial != self.serial {
            // The local content changed meanwhile; the other end learnt it with a new grab.
            return;
        }
        let result = result.and_then(|bytes| {
            if bytes.len() > self.limit {
                Err(RefuseReason::TooLarge)
            } else if !format.accepts(&bytes) {
                Err(RefuseReason::NoFormat)
            } else {
                Ok(bytes)
            }
        });
        match result {
            Ok(bytes) => {
                for chunk in ClipboardData::chunks(serial, format, &bytes) {
                    self.out.push_back(ClipboardMessage::Data(chunk));
                }
            }
            Err(reason) => {
                self.out.push_back(ClipboardMessage::Refused(ClipboardRefused { serial, format, reason }))
            }
        }
    }

    /// What the other end sent.
    pub fn on_remote(&mut self, message: ClipboardMessage, local: &impl LocalClipboard) {
        match message {
            ClipboardMessage::Grab(grab) => {
                self.fail_incoming(local, RefuseReason::Gone);
                if !grab.formats.is_empty() {
                    // The local clipboard offers the other end's content now: this end's own
                    // is gone (a new link must not announce it again).
                    self.formats.clear();
                    self.fetches.clear();
                }
                local.remote_grab(grab.formats.clone());
                self.remote = Some(grab).filter(|g| !g.formats.is_empty());
            }
            ClipboardMessage::Request(request) => {
                if request.serial != self.serial || !self.formats.contains(&request.format) {
                    let refused = ClipboardRefused {
                        serial: request.serial,
                        format: request.format,
                        reason: RefuseReason::Gone,
                    };
                    self.out.push_back(ClipboardMessage::Refused(refused));
                    return;
                }
                // The same paste again while the local clipboard is being read for it: that
                // read answers both (one local read per content and format at a time, whatever
                // the other end asks).
                if self.fetches.values().any(|key| *key == (request.serial, request.format)) {
                    return;
                }
                let id = self.next_fetch;
                self.next_fetch += 1;
                self.fetches.insert(id, (request.serial, request.format));
                local.fetch(id, request.format);
            }
            ClipboardMessage::Data(data) => self.on_data(data, local),
            ClipboardMessage::Refused(refused) if refused.reason == RefuseReason::NotShared => {
                // About this end's own copy, not about a paste.
                if refused.serial == self.serial {
                    self.events.push_back(PeerEvent::Denied { formats: self.formats.clone() });
                }
            }
            ClipboardMessage::Refused(refused) => {
                if let Some(index) = self
                    .incoming
                    .iter()
                    .position(|i| (i.serial, i.format) == (refused.serial, refused.format))
                {
                    let incoming = self.incoming.swap_remove(index);
                    self.fail(incoming, refused.reason, local);
                }
            }
        }
    }

    fn on_data(&mut self, data: ClipboardData, local: &impl LocalClipboard) {
        let Some(index) =
            self.incoming.iter().position(|i| (i.serial, i.format) == (data.serial, data.format))
        else {
            return;
        };
        let incoming = &mut self.incoming[index];
        let broken = data.offset as usize != incoming.bytes.len() || data.total as usize > self.limit;
        if broken {
            let reason =
                if data.total as usize > self.limit { RefuseReason::TooLarge } else { RefuseReason::Failed };
            let incoming = self.incoming.swap_remove(index);
            return self.fail(incoming, reason, local);
        }
        if incoming.bytes.is_empty() {
            incoming.bytes.reserve_exact(data.total as usize);
        }
        incoming.bytes.extend_from_slice(&data.bytes);
        if !data.is_last() {
            return;
        }
        let incoming = self.incoming.swap_remove(index);
        if !incoming.format.accepts(&incoming.bytes) {
            return self.fail(incoming, RefuseReason::NoFormat, local);
        }
        self.events.push_back(PeerEvent::Pasted { format: incoming.format, bytes: incoming.bytes.len() });
        let (last, rest) = incoming.requests.split_last().expect("at least one request");
        for request in rest {
            local.provide(*request, Some(incoming.bytes.clone()));
        }
        local.provide(*last, Some(incoming.bytes));
    }

    fn fail(&mut self, incoming: Incoming, reason: RefuseReason, local: &impl LocalClipboard) {
        self.events.push_back(PeerEvent::PasteFailed { format: incoming.format, reason });
        for request in incoming.requests {
            local.provide(request, None);
        }
    }

    fn fail_incoming(&mut self, local: &impl LocalClipboard, reason: RefuseReason) {
        for incoming in std::mem::take(&mut self.incoming) {
            self.fail(incoming, reason, local);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use super::*;
    use ClipboardFormat::{Html, Png, Text};

    /// A local clipboard that records what the peer asked of it.
    #[derive(Default)]
    struct Recorder {
        calls: RefCell<Vec<String>>,
        provided: RefCell<Vec<(u64, Option<Vec<u8>>)>>,
    }

    impl LocalClipboard for Recorder {
        fn remote_grab(&self, formats: Vec<ClipboardFormat>) {
            self.calls.borrow_mut().push(format!("grab {formats:?}"));
        }
        fn provide(&self, request: u64, data: Option<Vec<u8>>) {
            self.provided.borrow_mut().push((request, data));
        }
        fn fetch(&self, id: u64, format: ClipboardFormat) {
            self.calls.borrow_mut().push(format!("fetch {id} {format:?}"));
        }
    }

    fn sent(peer: &mut ClipboardPeer) -> Vec<ClipboardMessage> {
        std::iter::from_fn(|| peer.poll_transmit()).collect()
    }

    /// Two peers joined back to back, as the relay joins them when the policy allows.
    fn pump(a: &mut ClipboardPeer, a_local: &Recorder, b: &mut ClipboardPeer, b_local: &Recorder) {
        for _ in 0..100 {
            let (from_a, from_b) = (sent(a), sent(b));
            if from_a.is_empty() && from_b.is_empty() {
                return;
            }
            for m in from_a {
                b.on_remote(m, b_local);
            }
            for m in from_b {
                a.on_remote(m, a_local);
            }
        }
        panic!("the peers never settle");
    }

    #[test]
    fn a_copy_on_one_end_is_pasted_on_the_other_lazily() {
        let (mut client, client_local) = (ClipboardPeer::new(usize::MAX), Recorder::default());
        let (mut guest, guest_local) = (ClipboardPeer::new(usize::MAX), Recorder::default());
        client.local_grabbed(vec![Png, Text, Text]);
        pump(&mut client, &client_local, &mut guest, &guest_local);
        assert_eq!(*guest_local.calls.borrow(), ["grab [Text, Png]"]);
        // Nothing was fetched: the data moves on paste.
        assert!(client_local.calls.borrow().is_empty());

        guest.local_wants(1, Png, &guest_local);
        guest.local_wants(2, Png, &guest_local);
        // Two local pastes of the same format: asked twice (nothing came yet), read once.
        let requests = sent(&mut guest);
        let request = ClipboardMessage::Request(ClipboardRequest { serial: 1, format: Png });
        assert_eq!(requests, [request.clone(), request]);
        for request in requests {
            client.on_remote(request, &client_local);
        }
        pump(&mut client, &client_local, &mut guest, &guest_local);
        assert_eq!(*client_local.calls.borrow(), ["fetch 1 Png"]);
        let png = [b"\x89PNG\r\n\x1a\n".as_slice(), &vec![7u8; 200_000]].concat();
        client.local_fetched(1, Ok(png.clone()));
        pump(&mut client, &client_local, &mut guest, &guest_local);
        assert_eq!(*guest_local.provided.borrow(), [(1, Some(png.clone())), (2, Some(png.clone()))]);
        assert_eq!(guest.poll_event(), Some(PeerEvent::Pasted { format: Png, bytes: png.len() }));
        // A format the owner did not offer is refused locally, with no message.
        guest.local_wants(3, Html, &guest_local);
        assert_eq!(guest_local.provided.borrow().last(), Some(&(3, None)));
        assert!(sent(&mut guest).is_empty());
    }

    #[test]
    fn content_that_is_not_its_format_or_too_large_is_refused() {
        let (mut owner, owner_local) = (ClipboardPeer::new(usize::MAX), Recorder::default());
        let (mut paster, paster_local) = (ClipboardPeer::new(1000), Recorder::default());
        owner.local_grabbed(vec![Text, Png]);
        pump(&mut owner, &owner_local, &mut paster, &paster_local);
        // Not UTF-8: the owner itself refuses to send it.
        paster.local_wants(1, Text, &paster_local);
        pump(&mut owner, &owner_local, &mut paster, &paster_local);
        owner.local_fetched(1, Ok(vec![0xff, 0xfe]));
        pump(&mut owner, &owner_local, &mut paster, &paster_local);
        assert_eq!(paster_local.provided.borrow().last(), Some(&(1, None)));
        assert_eq!(
            paster.poll_event(),
            Some(PeerEvent::PasteFailed { format: Text, reason: RefuseReason::NoFormat })
        );
        // Over the paster's limit: refused when the first chunk announces it.
        paster.local_wants(2, Png, &paster_local);
        pump(&mut owner, &owner_local, &mut paster, &paster_local);
        owner.local_fetched(2, Ok([b"\x89PNG\r\n\x1a\n".as_slice(), &[0; 5000]].concat()));
        pump(&mut owner, &owner_local, &mut paster, &paster_local);
        assert_eq!(paster_local.provided.borrow().last(), Some(&(2, None)));
        assert_eq!(
            paster.poll_event(),
            Some(PeerEvent::PasteFailed { format: Png, reason: RefuseReason::TooLarge })
        );
        // A forged chunk that skips ahead fails the paste, and nothing of it reaches the app.
        paster.local_wants(3, Text, &paster_local);
        sent(&mut paster);
        let forged = ClipboardData { serial: 1, format: Text, offset: 10, total: 20, bytes: vec![b'a'; 10] };
        paster.on_remote(ClipboardMessage::Data(forged), &paster_local);
        assert_eq!(paster_local.provided.borrow().last(), Some(&(3, None)));
    }

    #[test]
    fn a_new_remote_grab_or_link_fails_waiting_pastes_and_requests_for_old_content_are_refused() {
        let (mut peer, local) = (ClipboardPeer::new(usize::MAX), Recorder::default());
        peer.on_remote(ClipboardMessage::Grab(ClipboardGrab { serial: 5, formats: vec![Text] }), &local);
        peer.local_wants(1, Text, &local);
        peer.on_remote(ClipboardMessage::Grab(ClipboardGrab { serial: 6, formats: vec![Html] }), &local);
        assert_eq!(*local.provided.borrow(), [(1, None)]);
        assert_eq!(*local.calls.borrow(), ["grab [Text]", "grab [Html]"]);
        sent(&mut peer);
        // The other end asks for content this end no longer has.
        peer.local_grabbed(vec![Text]);
        peer.local_grabbed(vec![Text]);
        sent(&mut peer);
        peer.on_remote(ClipboardMessage::Request(ClipboardRequest { serial: 1, format: Text }), &local);
        assert_eq!(
            sent(&mut peer),
            [ClipboardMessage::Refused(ClipboardRefused {
                serial: 1,
                format: Text,
                reason: RefuseReason::Gone
            })]
        );
        // A fetch that completes after the local content changed is not sent.
        peer.on_remote(ClipboardMessage::Request(ClipboardRequest { serial: 2, format: Text }), &local);
        peer.local_grabbed(vec![Png]);
        sent(&mut peer);
        peer.local_fetched(1, Ok(b"old".to_vec()));
        assert!(sent(&mut peer).is_empty());
        // A new link: the remote content is withdrawn locally, the local one announced again.
        peer.reconnected(&local);
        assert_eq!(local.calls.borrow().last().unwrap(), "grab []");
        assert_eq!(
            sent(&mut peer),
            [ClipboardMessage::Grab(ClipboardGrab { serial: 3, formats: vec![Png] })]
        );
    }

    #[test]
    fn a_policy_refusal_of_the_local_grab_is_reported() {
        let (mut peer, local) = (ClipboardPeer::new(usize::MAX), Recorder::default());
        peer.local_grabbed(vec![Text]);
        sent(&mut peer);
        let refused = ClipboardRefused { serial: 1, format: Text, reason: RefuseReason::NotShared };
        peer.on_remote(ClipboardMessage::Refused(refused), &local);
        assert_eq!(peer.poll_event(), Some(PeerEvent::Denied { formats: vec![Text] }));
    }
}
