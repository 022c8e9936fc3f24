//! The requestor side: asking a local owner for its TARGETS (on each new owner) and for its
//! content (`fetch`), reading the answer from our window's property, INCR included.
//!
//! A conversion is a small state machine driven by SelectionNotify and PropertyNotify; its
//! property reads are round trips to the server only, never waits on the owner.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use x11rb::protocol::xproto::{
    Atom, AtomEnum, ConnectionExt as _, Property, PropertyNotifyEvent, SelectionNotifyEvent, Timestamp,
};
use x11rb::{CURRENT_TIME, NONE};

use super::{Outbox, Owner, Worker, XResult, split};
use crate::targets::{STRING, from_string_property, html_to_utf8};
use crate::{ClipboardError, FETCH_DEADLINE, FETCH_TIMEOUT, Format, LocalEvent};

/// How long a new owner may take to answer TARGETS.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// Most bytes of a TARGETS answer (16 Ki atoms).
const MAX_TARGETS_BYTES: usize = 64 * 1024;
/// One GetProperty reads at most this many 32-bit units (1 MiB).
const READ_LONGS: u32 = 256 * 1024;

/// What the requestor side holds: at most one TARGETS probe and one fetch at a time.
#[derive(Debug, Default)]
pub(crate) struct Requesting {
    probe: Option<Conversion>,
    fetch: Option<Conversion>,
    queue: VecDeque<(u64, Format, Instant)>,
    /// The current local owner's TARGETS, once known.
    owner_targets: Option<Vec<Atom>>,
    /// Which landing property the next conversion uses.
    next_landing: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Purpose {
    Probe,
    Fetch { id: u64, format: Format },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// ConvertSelection sent; the owner's SelectionNotify is awaited.
    Asked,
    /// INCR: chunks arrive as new values of the property.
    Incremental,
}

/// One ConvertSelection and the reading of its answer.
#[derive(Debug)]
struct Conversion {
    purpose: Purpose,
    /// Targets still to try, the one asked first.
    targets: Vec<Atom>,
    property: Atom,
    time: Timestamp,
    stage: Stage,
    /// The answer's type and format, from its first read.
    kind: Option<(Atom, u8)>,
    data: Vec<u8>,
    limit: usize,
    /// How long each step may take.
    step: Duration,
    step_deadline: Instant,
    deadline: Instant,
}

impl Conversion {
    fn next_deadline(&self) -> Instant {
        self.step_deadline.min(self.deadline)
    }
}

impl Requesting {
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        let active = [&self.probe, &self.fetch].into_iter().flatten().map(Conversion::next_deadline);
        active.chain(self.queue.iter().map(|(_, _, deadline)| *deadline)).min()
    }

    pub(crate) fn stop_probe(&mut self) {
        self.probe = None;
        self.owner_targets = None;
    }

    /// The thread ends: every fetch not done yet fails.
    pub(crate) fn fail_all(&mut self, events: &mut Outbox) {
        let active = self.fetch.take().and_then(|c| match c.purpose {
            Purpose::Fetch { id, .. } => Some(id),
            Purpose::Probe => None,
        });
        for id in active.into_iter().chain(self.queue.drain(..).map(|(id, _, _)| id)) {
            events.push(LocalEvent::Fetched { id, result: Err(ClipboardError::Stopped) });
        }
    }
}

/// What reading a property gave.
enum Read {
    /// Its type, format and bytes (it is deleted).
    Value(Atom, u8, Vec<u8>),
    /// The property does not exist.
    Missing,
}

impl Worker {
    /// Asks a new local owner what it offers.
    pub(crate) fn probe(&mut self, time: Timestamp) -> XResult<()> {
        let targets = vec![self.atoms.TARGETS];
        let conversion = self.convert(Purpose::Probe, targets, time, MAX_TARGETS_BYTES, PROBE_TIMEOUT)?;
        self.requesting.probe = Some(conversion);
        Ok(())
    }

    pub(crate) fn fetch(&mut self, id: u64, format: Format) -> XResult<()> {
        if self.serving.owned() || self.owner == Owner::Us {
            // The content is the remote side's own: nothing local to read.
            self.events.push(LocalEvent::Fetched { id, result: Err(ClipboardError::Unavailable(format)) });
            return Ok(());
        }
        self.requesting.queue.push_back((id, format, Instant::now() + FETCH_DEADLINE));
        self.start_next_fetch()
    }

    fn start_next_fetch(&mut self) -> XResult<()> {
        if self.requesting.fetch.is_some() {
            return Ok(());
        }
        let (id, format, deadline, targets) = loop {
            let Some((id, format, deadline)) = self.requesting.queue.pop_front() else { return Ok(()) };
            let mut targets = self.atoms.fetch_targets(format);
            // An owner whose TARGETS we know is asked only for what it listed (some, xclip
            // among them, answer any target with the same bytes).
            if let Some(listed) = &self.requesting.owner_targets {
                targets.retain(|t| listed.contains(t));
            }
            if !targets.is_empty() {
                break (id, format, deadline, targets);
            }
            self.events.push(LocalEvent::Fetched { id, result: Err(ClipboardError::Unavailable(format)) });
        };
        // ICCCM §2.4: the time of the owner's grab, not CurrentTime, where we know it.
        let time = match self.owner {
            Owner::App(_, time) => time,
            Owner::Nobody | Owner::Us => CURRENT_TIME,
        };
        let mut conversion =
            self.convert(Purpose::Fetch { id, format }, targets, time, self.limit, FETCH_TIMEOUT)?;
        conversion.deadline = deadline;
        self.requesting.fetch = Some(conversion);
        Ok(())
    }

    fn convert(
        &mut self,
        purpose: Purpose,
        targets: Vec<Atom>,
        time: Timestamp,
        limit: usize,
        step: Duration,
    ) -> XResult<Conversion> {
        // Not the property of the other conversion in flight, nor the last one's.
        let landings = self.atoms.landings();
        let busy: Vec<Atom> = [&self.requesting.probe, &self.requesting.fetch]
            .into_iter()
            .flatten()
            .map(|c| c.property)
            .collect();
        let next = &mut self.requesting.next_landing;
        let free =
            (0..landings.len()).map(|i| (*next + i) % landings.len()).find(|i| !busy.contains(&landings[*i]));
        // Two conversions at most are in flight: one of the four is always free.
        let index = free.unwrap_or(*next % landings.len());
        *next = index + 1;
        let property = landings[index];
        let now = Instant::now();
        let conversion = Conversion {
            purpose,
            targets,
            property,
            time,
            stage: Stage::Asked,
            kind: None,
            data: Vec::new(),
            limit,
            step,
            step_deadline: now + step,
            deadline: now + step.max(FETCH_DEADLINE),
        };
        self.ask(&conversion)?;
        Ok(conversion)
    }

    fn ask(&mut self, c: &Conversion) -> XResult<()> {
        self.conn.delete_property(self.window, c.property)?;
        self.conn.convert_selection(self.window, self.atoms.CLIPBOARD, c.targets[0], c.property, c.time)?;
        Ok(())
    }

    /// The owner's client closed or its window was destroyed: a fetch still waiting for its
    /// answer gets none (an answer sent before is already in, X keeps one client's order).
    pub(crate) fn owner_died(&mut self) -> XResult<()> {
        match self.requesting.fetch.take() {
            Some(c) => self.finish(c, Err(Refusal::Refused)),
            None => Ok(()),
        }
    }

    /// The owner's answer to one of our ConvertSelections.
    pub(crate) fn selection_notify(&mut self, e: SelectionNotifyEvent) -> XResult<()> {
        if e.requestor != self.window || e.selection != self.atoms.CLIPBOARD {
            return Ok(());
        }
        for which in [Which::Probe, Which::Fetch] {
            let ours = self.slot(which).as_ref().is_some_and(|c| {
                c.stage == Stage::Asked
                    && c.targets[0] == e.target
                    && (e.property == NONE || e.property == c.property)
            });
            if !ours {
                continue;
            }
            if e.property != NONE {
                return self.read_answer(which);
            }
            // Refused: the next target, if any.
            let Some(mut c) = self.slot(which).take() else { return Ok(()) };
            c.targets.remove(0);
            if c.targets.is_empty() {
                return self.finish(c, Err(Refusal::Refused));
            }
            c.step_deadline = Instant::now() + c.step;
            self.ask(&c)?;
            *self.slot(which) = Some(c);
            return Ok(());
        }
        Ok(())
    }

    /// A PropertyNotify on our window's landing properties: an INCR chunk arrived.
    pub(crate) fn landing_property(&mut self, e: PropertyNotifyEvent) -> XResult<()> {
        if e.state != Property::NEW_VALUE {
            return Ok(());
        }
        for which in [Which::Probe, Which::Fetch] {
            if self
                .slot(which)
                .as_ref()
                .is_some_and(|c| c.stage == Stage::Incremental && c.property == e.atom)
            {
                return self.read_answer(which);
            }
        }
        Ok(())
    }

    /// Reads what the owner put in the property: the whole answer, the INCR announcement, or
    /// (in INCR) the next chunk, zero-length for the end.
    fn read_answer(&mut self, which: Which) -> XResult<()> {
        let Some(mut c) = self.slot(which).take() else { return Ok(()) };
        let read = match self.read_property(c.property, c.limit.saturating_sub(c.data.len()))? {
            Ok(read) => read,
            Err(ClipboardError::TooLarge { .. }) => {
                let limit = c.limit;
                return self.finish(c, Err(Refusal::Error(ClipboardError::TooLarge { limit })));
            }
            Err(e) => return self.finish(c, Err(Refusal::Error(e))),
        };
        let (type_, format, bytes) = match (read, c.stage) {
            (Read::Value(type_, format, bytes), _) => (type_, format, bytes),
            // The owner named a property it did not write.
            (Read::Missing, Stage::Asked) => {
                return self.finish(c, Err(Refusal::Error(ClipboardError::Malformed("no property"))));
            }
            // Already read at an earlier notification.
            (Read::Missing, Stage::Incremental) => {
                *self.slot(which) = Some(c);
                return Ok(());
            }
        };
        c.step_deadline = Instant::now() + c.step;
        if c.stage == Stage::Asked && type_ == self.atoms.INCR {
            // ICCCM §2.7.2: the value is a lower bound of the size; our delete (done by the
            // read) asks for the first chunk.
            let lower_bound =
                bytes.get(..4).map_or(0, |b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]) as usize);
            if lower_bound > c.limit {
                let limit = c.limit;
                return self.finish(c, Err(Refusal::Error(ClipboardError::TooLarge { limit })));
            }
            c.stage = Stage::Incremental;
            *self.slot(which) = Some(c);
            return Ok(());
        }
        let done = c.stage == Stage::Asked || bytes.is_empty();
        match c.kind {
            Some(kind) if kind != (type_, format) && !bytes.is_empty() => {
                return self.finish(
                    c,
                    Err(Refusal::Error(ClipboardError::Malformed("INCR chunks of different types"))),
                );
            }
            Some(_) => {}
            None => c.kind = Some((type_, format)),
        }
        c.data.extend_from_slice(&bytes);
        if done {
            let (type_, format) = c.kind.unwrap_or((type_, format));
            let data = std::mem::take(&mut c.data);
            return self.finish(c, Ok((type_, format, data)));
        }
        *self.slot(which) = Some(c);
        Ok(())
    }

    /// Reads our window's `property` and deletes it, in chunks of [`READ_LONGS`], refusing
    /// more than `room` bytes without reading them.
    fn read_property(&mut self, property: Atom, room: usize) -> XResult<Result<Read, ClipboardError>> {
        let head = self.conn.get_property(false, self.window, property, AtomEnum::ANY, 0, 0)?.reply();
        let head = match split(head)? {
            Ok(head) => head,
            Err(e) => return Ok(Err(e)),
        };
        if head.type_ == NONE {
            return Ok(Ok(Read::Missing));
        }
        if head.bytes_after as usize > room {
            self.conn.delete_property(self.window, property)?;
            return Ok(Err(ClipboardError::TooLarge { limit: room }));
        }
        let mut bytes = Vec::with_capacity(head.bytes_after as usize);
        let mut offset = 0u32;
        loop {
            let reply = self
                .conn
                .get_property(true, self.window, property, AtomEnum::ANY, offset, READ_LONGS)?
                .reply();
            let reply = match split(reply)? {
                Ok(reply) => reply,
                Err(e) => return Ok(Err(e)),
            };
            if reply.type_ != head.type_ || reply.format != head.format {
                self.conn.delete_property(self.window, property)?;
                return Ok(Err(ClipboardError::Malformed("the property changed while read")));
            }
            bytes.extend_from_slice(&reply.value);
            if bytes.len() > room {
                self.conn.delete_property(self.window, property)?;
                return Ok(Err(ClipboardError::TooLarge { limit: room }));
            }
            if reply.bytes_after == 0 {
                return Ok(Ok(Read::Value(head.type_, head.format, bytes)));
            }
            if reply.value.is_empty() || reply.value.len() % 4 != 0 {
                self.conn.delete_property(self.window, property)?;
                return Ok(Err(ClipboardError::Malformed("the property changed while read")));
            }
            offset += (reply.value.len() / 4) as u32;
        }
    }

    /// A conversion ended (it is out of its slot): hand its result on and start what waits.
    fn finish(&mut self, c: Conversion, result: Result<(Atom, u8, Vec<u8>), Refusal>) -> XResult<()> {
        match c.purpose {
            Purpose::Probe => {
                let formats = match result {
                    Ok((_, 32, bytes)) => {
                        let atoms: Vec<Atom> = bytes
                            .chunks_exact(4)
                            .map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
                            .collect();
                        let formats: Vec<Format> = Format::ALL
                            .into_iter()
                            .filter(|f| atoms.iter().any(|a| self.atoms.offered_format(*a) == Some(*f)))
                            .collect();
                        self.requesting.owner_targets = Some(atoms);
                        formats
                    }
                    Ok(_) => {
                        tracing::debug!("X11 clipboard: the owner's TARGETS is not a list of atoms");
                        Vec::new()
                    }
                    Err(e) => {
                        tracing::debug!("X11 clipboard: the owner's TARGETS: {e:?}");
                        Vec::new()
                    }
                };
                self.announce(Some(formats));
                Ok(())
            }
            Purpose::Fetch { id, format } => {
                let result = match result {
                    Ok((type_, 8, bytes)) => content(format, type_, bytes),
                    Ok(_) => Err(ClipboardError::Malformed("not 8-bit data")),
                    Err(Refusal::Refused) => Err(ClipboardError::Unavailable(format)),
                    Err(Refusal::Error(e)) => Err(e),
                };
                self.events.push(LocalEvent::Fetched { id, result });
                self.start_next_fetch()
            }
        }
    }

    pub(crate) fn expire_requesting(&mut self, now: Instant) -> XResult<()> {
        for which in [Which::Probe, Which::Fetch] {
            if self.slot(which).as_ref().is_some_and(|c| c.next_deadline() <= now)
                && let Some(c) = self.slot(which).take()
            {
                self.finish(c, Err(Refusal::Error(ClipboardError::Timeout)))?;
            }
        }
        let (late, waiting): (VecDeque<_>, VecDeque<_>) = std::mem::take(&mut self.requesting.queue)
            .into_iter()
            .partition(|(_, _, deadline)| *deadline <= now);
        self.requesting.queue = waiting;
        for (id, _, _) in late {
            self.events.push(LocalEvent::Fetched { id, result: Err(ClipboardError::Timeout) });
        }
        Ok(())
    }

    fn slot(&mut self, which: Which) -> &mut Option<Conversion> {
        match which {
            Which::Probe => &mut self.requesting.probe,
            Which::Fetch => &mut self.requesting.fetch,
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Which {
    Probe,
    Fetch,
}

/// Why a conversion gave nothing.
#[derive(Debug)]
enum Refusal {
    /// The owner refused every target we asked for.
    Refused,
    Error(ClipboardError),
}

/// The owner's bytes as `format`'s content.
fn content(format: Format, type_: Atom, bytes: Vec<u8>) -> Result<Vec<u8>, ClipboardError> {
    match format {
        Format::Text if type_ == STRING => Ok(from_string_property(bytes)),
        Format::Text => Ok(String::from_utf8(bytes)
            .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
            .into_bytes()),
        Format::Html => Ok(html_to_utf8(bytes)),
        Format::Png if format.accepts(&bytes) => Ok(bytes),
        Format::Png => Err(ClipboardError::Malformed("not a PNG")),
    }
}
