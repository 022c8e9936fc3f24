//! The owner side: taking CLIPBOARD for the remote side's content and answering local pastes
//! (SelectionRequest), lazily through [`LocalEvent::DataWanted`], with INCR for large content.

use std::sync::Arc;
use std::time::Instant;

use x11rb::connection::Connection;
use x11rb::protocol::xproto::{
    Atom, ChangeWindowAttributesAux, ConnectionExt as _, EventMask, PropMode, Property, PropertyNotifyEvent,
    SELECTION_NOTIFY_EVENT, SelectionClearEvent, SelectionNotifyEvent, SelectionRequestEvent, Timestamp,
    Window,
};
use x11rb::wrapper::ConnectionExt as _;
use x11rb::{CURRENT_TIME, NONE};

use super::{Worker, XResult};
use crate::targets::{ATOM, INTEGER, STRING, to_latin1};
use crate::{ANSWER_TIMEOUT, Format, LocalEvent, TRANSFER_TIMEOUT};

/// Most local pastes waiting on one unanswered request; more are refused at once.
const MAX_WAITING_PASTES: usize = 32;
/// Most outgoing INCR transfers at once; more are refused at once.
const MAX_TRANSFERS: usize = 16;

/// What the owner side holds.
#[derive(Debug, Default)]
pub(crate) struct Serving {
    /// What the remote side offers now (empty: nothing).
    offer: Vec<Format>,
    /// Counts remote grabs (and losses of the selection): answers are cached per content.
    generation: u64,
    /// Answers for the current content, per format.
    cache: Vec<(Format, Arc<[u8]>)>,
    /// Our ownership's timestamp, while we own CLIPBOARD.
    owned_since: Option<Timestamp>,
    /// A timestamp is on its way (see `remote_grab`).
    acquiring: bool,
    /// Unanswered `DataWanted`s.
    requests: Vec<Request>,
    next_request: u64,
    transfers: Vec<Transfer>,
}

/// One `DataWanted` and the pastes waiting for its answer.
#[derive(Debug)]
struct Request {
    id: u64,
    format: Format,
    generation: u64,
    pastes: Vec<Paste>,
    deadline: Instant,
}

/// One local paste: where its answer goes.
#[derive(Debug, Clone, Copy)]
struct Paste {
    requestor: Window,
    selection: Atom,
    target: Atom,
    property: Atom,
    time: Timestamp,
}

/// An outgoing INCR transfer: the rest of `data` goes to the requestor's property, a chunk
/// each time the requestor deletes it.
#[derive(Debug)]
struct Transfer {
    requestor: Window,
    property: Atom,
    type_: Atom,
    data: Arc<[u8]>,
    sent: usize,
    deadline: Instant,
}

impl Serving {
    /// Whether we own CLIPBOARD (or are about to).
    pub(crate) fn owned(&self) -> bool {
        self.owned_since.is_some() || self.acquiring
    }

    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        let requests = self.requests.iter().map(|r| r.deadline);
        requests.chain(self.transfers.iter().map(|t| t.deadline)).min()
    }
}

impl Worker {
    /// The remote side's new content (empty: none). Our ownership needs a server timestamp:
    /// a zero-length append to our own window's property makes the server send a
    /// PropertyNotify carrying its current time (`timestamp_arrived`).
    pub(crate) fn remote_grab(&mut self, mut formats: Vec<Format>) -> XResult<()> {
        let mut seen = Vec::new();
        formats.retain(|f| {
            let new = !seen.contains(f);
            seen.push(*f);
            new
        });
        self.new_content()?;
        self.serving.offer = formats;
        if self.serving.offer.is_empty() {
            if let Some(since) = self.serving.owned_since.take() {
                self.conn.set_selection_owner(NONE, self.atoms.CLIPBOARD, since)?;
            }
        } else if !self.serving.acquiring {
            self.serving.acquiring = true;
            self.conn.change_property8(PropMode::APPEND, self.window, self.atoms.TIME_PROBE, STRING, &[])?;
        }
        Ok(())
    }

    /// Forgets the current content: its cached answers go, its waiting pastes are refused.
    fn new_content(&mut self) -> XResult<()> {
        self.serving.generation += 1;
        self.serving.cache.clear();
        for request in std::mem::take(&mut self.serving.requests) {
            for paste in request.pastes {
                self.refuse(paste)?;
            }
        }
        Ok(())
    }

    pub(crate) fn timestamp_arrived(&mut self, time: Timestamp) -> XResult<()> {
        if !std::mem::take(&mut self.serving.acquiring) || self.serving.offer.is_empty() {
            return Ok(());
        }
        let clipboard = self.atoms.CLIPBOARD;
        self.conn.set_selection_owner(self.window, clipboard, time)?;
        // Someone may hold it with a later time (ICCCM: then our request is ignored).
        let owner = super::split(self.conn.get_selection_owner(clipboard)?.reply())?;
        if matches!(owner, Ok(ref o) if o.owner == self.window) {
            self.serving.owned_since = Some(time);
        } else {
            tracing::warn!("X11 clipboard: could not take CLIPBOARD ({owner:?})");
            self.serving.owned_since = None;
            self.serving.offer.clear();
        }
        Ok(())
    }

    /// A local app took CLIPBOARD from us: we serve no more (pastes already waiting still get
    /// their answer; XFixes reports the app's grab).
    pub(crate) fn selection_clear(&mut self, e: SelectionClearEvent) {
        if e.selection != self.atoms.CLIPBOARD || e.owner != self.window {
            return;
        }
        if let Some(since) = self.serving.owned_since
            && (e.time == CURRENT_TIME || !earlier(e.time, since))
        {
            self.serving.owned_since = None;
            self.serving.offer.clear();
            self.serving.cache.clear();
            self.serving.generation += 1;
        }
    }

    pub(crate) fn selection_request(&mut self, e: SelectionRequestEvent) -> XResult<()> {
        let paste = Paste {
            requestor: e.requestor,
            selection: e.selection,
            target: e.target,
            // ICCCM §2.2: obsolete clients send None; the target then names the property.
            property: if e.property == NONE { e.target } else { e.property },
            time: e.time,
        };
        let Some(since) = self.serving.owned_since else { return self.refuse(paste) };
        if e.selection != self.atoms.CLIPBOARD
            || e.owner != self.window
            || (e.time != CURRENT_TIME && earlier(e.time, since))
        {
            return self.refuse(paste);
        }
        let atoms = &self.atoms;
        if e.target == atoms.TARGETS {
            let mut targets = vec![atoms.TARGETS, atoms.TIMESTAMP];
            for format in &self.serving.offer {
                targets.extend(atoms.served_targets(*format));
            }
            self.conn.change_property32(
                PropMode::REPLACE,
                paste.requestor,
                paste.property,
                ATOM,
                &targets,
            )?;
            return self.notify(paste, paste.property);
        }
        if e.target == atoms.TIMESTAMP {
            self.conn.change_property32(
                PropMode::REPLACE,
                paste.requestor,
                paste.property,
                INTEGER,
                &[since],
            )?;
            return self.notify(paste, paste.property);
        }
        // MULTIPLE included: refused, as every target we do not know.
        let Some(format) = atoms.served_format(e.target).filter(|f| self.serving.offer.contains(f)) else {
            return self.refuse(paste);
        };
        if let Some((_, data)) = self.serving.cache.iter().find(|(f, _)| *f == format) {
            let data = Arc::clone(data);
            return self.send_content(paste, data);
        }
        let generation = self.serving.generation;
        if let Some(request) =
            self.serving.requests.iter_mut().find(|r| r.format == format && r.generation == generation)
        {
            if request.pastes.len() < MAX_WAITING_PASTES {
                request.pastes.push(paste);
                return Ok(());
            }
            return self.refuse(paste);
        }
        self.serving.next_request += 1;
        let id = self.serving.next_request;
        let deadline = Instant::now() + ANSWER_TIMEOUT;
        self.serving.requests.push(Request { id, format, generation, pastes: vec![paste], deadline });
        self.events.push(LocalEvent::DataWanted { request: id, format });
        Ok(())
    }

    pub(crate) fn provide(&mut self, id: u64, data: Option<Vec<u8>>) -> XResult<()> {
        let Some(at) = self.serving.requests.iter().position(|r| r.id == id) else {
            tracing::debug!("X11 clipboard: answer to request {id}, which is no longer waiting");
            return Ok(());
        };
        let request = self.serving.requests.swap_remove(at);
        let data = data.filter(|d| {
            let fits = d.len() <= self.limit;
            if !fits {
                tracing::warn!(
                    "X11 clipboard: refusing {} bytes of {:?}, over the limit",
                    d.len(),
                    request.format
                );
            }
            fits
        });
        let Some(data) = data else {
            for paste in request.pastes {
                self.refuse(paste)?;
            }
            return Ok(());
        };
        let data: Arc<[u8]> = data.into();
        if request.generation == self.serving.generation {
            self.serving.cache.push((request.format, Arc::clone(&data)));
        }
        for paste in request.pastes {
            self.send_content(paste, Arc::clone(&data))?;
        }
        Ok(())
    }

    /// Writes `data` (the format's UTF-8 or PNG bytes) as the paste's target wants it.
    fn send_content(&mut self, paste: Paste, data: Arc<[u8]>) -> XResult<()> {
        let (type_, data): (Atom, Arc<[u8]>) = if paste.target == STRING {
            (STRING, to_latin1(&data).into())
        } else if paste.target == self.atoms.TEXT {
            (self.atoms.UTF8_STRING, data)
        } else {
            (paste.target, data)
        };
        if data.len() <= self.chunk {
            self.conn.change_property8(PropMode::REPLACE, paste.requestor, paste.property, type_, &data)?;
            return self.notify(paste, paste.property);
        }
        self.serving.transfers.retain(|t| (t.requestor, t.property) != (paste.requestor, paste.property));
        if self.serving.transfers.len() >= MAX_TRANSFERS {
            tracing::warn!("X11 clipboard: too many transfers at once, refusing a paste");
            return self.refuse(paste);
        }
        // ICCCM §2.7.2: watch the requestor's window before writing INCR, so that its delete
        // (the request for the first chunk) cannot be missed.
        let watch = ChangeWindowAttributesAux::new().event_mask(EventMask::PROPERTY_CHANGE);
        self.conn.change_window_attributes(paste.requestor, &watch)?;
        let size = u32::try_from(data.len()).unwrap_or(u32::MAX);
        self.conn.change_property32(
            PropMode::REPLACE,
            paste.requestor,
            paste.property,
            self.atoms.INCR,
            &[size],
        )?;
        self.serving.transfers.push(Transfer {
            requestor: paste.requestor,
            property: paste.property,
            type_,
            data,
            sent: 0,
            deadline: Instant::now() + TRANSFER_TIMEOUT,
        });
        self.notify(paste, paste.property)
    }

    /// A PropertyNotify on another client's window: a requestor took a chunk of a transfer.
    pub(crate) fn requestor_property(&mut self, e: PropertyNotifyEvent) -> XResult<()> {
        if e.state != Property::DELETE {
            return Ok(());
        }
        let Some(at) =
            self.serving.transfers.iter().position(|t| t.requestor == e.window && t.property == e.atom)
        else {
            return Ok(());
        };
        let transfer = &mut self.serving.transfers[at];
        let end = (transfer.sent + self.chunk).min(transfer.data.len());
        let (requestor, property, type_) = (transfer.requestor, transfer.property, transfer.type_);
        // The last (zero-length) chunk ends the transfer once written.
        let finished = transfer.sent == transfer.data.len();
        let chunk = Arc::clone(&transfer.data);
        let chunk = &chunk[transfer.sent..end];
        transfer.sent = end;
        transfer.deadline = Instant::now() + TRANSFER_TIMEOUT;
        self.conn.change_property8(PropMode::REPLACE, requestor, property, type_, chunk)?;
        if finished {
            self.end_transfer(at)?;
        }
        Ok(())
    }

    fn end_transfer(&mut self, at: usize) -> XResult<()> {
        let transfer = self.serving.transfers.swap_remove(at);
        if !self.serving.transfers.iter().any(|t| t.requestor == transfer.requestor) {
            let unwatch = ChangeWindowAttributesAux::new().event_mask(EventMask::NO_EVENT);
            self.conn.change_window_attributes(transfer.requestor, &unwatch)?;
        }
        Ok(())
    }

    /// Tells the requestor the answer is in `property` (`NONE`: refused).
    fn notify(&mut self, paste: Paste, property: Atom) -> XResult<()> {
        let event = SelectionNotifyEvent {
            response_type: SELECTION_NOTIFY_EVENT,
            sequence: 0,
            time: paste.time,
            requestor: paste.requestor,
            selection: paste.selection,
            target: paste.target,
            property,
        };
        self.conn.send_event(false, paste.requestor, EventMask::NO_EVENT, event)?;
        Ok(())
    }

    fn refuse(&mut self, paste: Paste) -> XResult<()> {
        self.notify(paste, NONE)
    }

    pub(crate) fn expire_serving(&mut self, now: Instant) -> XResult<()> {
        let (late, waiting): (Vec<Request>, Vec<Request>) =
            std::mem::take(&mut self.serving.requests).into_iter().partition(|r| r.deadline <= now);
        self.serving.requests = waiting;
        for request in late {
            tracing::debug!(
                "X11 clipboard: request {} for {:?} unanswered, refused",
                request.id,
                request.format
            );
            for paste in request.pastes {
                self.refuse(paste)?;
            }
        }
        while let Some(at) = self.serving.transfers.iter().position(|t| t.deadline <= now) {
            tracing::debug!("X11 clipboard: a requestor stopped taking its INCR transfer");
            self.end_transfer(at)?;
        }
        Ok(())
    }

    /// At the end: waiting pastes are refused, the selection given up.
    pub(crate) fn release_everything(&mut self) -> XResult<()> {
        self.new_content()?;
        if let Some(since) = self.serving.owned_since.take() {
            self.conn.set_selection_owner(NONE, self.atoms.CLIPBOARD, since)?;
        }
        while !self.serving.transfers.is_empty() {
            self.end_transfer(0)?;
        }
        self.conn.flush()
    }
}

/// Whether X server time `a` is before `b`. The server's millisecond clock wraps every 49.7
/// days; times are compared as the ICCCM asks, within half the range of each other.
fn earlier(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) < 0
}

#[cfg(test)]
mod time_tests {
    use super::earlier;

    #[test]
    fn server_times_compare_across_the_clocks_wrap() {
        assert!(earlier(5, 9) && !earlier(9, 5) && !earlier(7, 7));
        assert!(earlier(u32::MAX - 10, 20), "just before the wrap is earlier than just after");
        assert!(!earlier(20, u32::MAX - 10));
    }
}
