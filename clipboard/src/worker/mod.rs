//! The clipboard thread: one loop that waits on the X connection and the wake socket, runs the
//! calls' commands, dispatches X events to the owner side (`serve`) and the requestor side
//! (`fetch`), and fires their timers.

mod fetch;
mod serve;

use std::collections::VecDeque;
use std::io::Read;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, TrySendError};
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout};
use x11rb::connection::{Connection, RequestConnection};
use x11rb::errors::{ConnectionError, ReplyError};
use x11rb::protocol::Event;
use x11rb::protocol::xfixes::{self, ConnectionExt as _, SelectionEventMask};
use x11rb::protocol::xproto::{
    ConnectionExt as _, CreateWindowAux, EventMask, PropertyNotifyEvent, Timestamp, Window, WindowClass,
};
use x11rb::rust_connection::RustConnection;
use x11rb::wrapper::ConnectionExt as _;
use x11rb::{COPY_DEPTH_FROM_PARENT, COPY_FROM_PARENT, CURRENT_TIME, NONE};

use self::fetch::Requesting;
use self::serve::Serving;
use crate::targets::{Atoms, STRING};
use crate::{ClipboardError, Command, LocalEvent};

/// Most bytes of one INCR chunk we send.
const MAX_CHUNK: usize = 256 * 1024;
/// How often held-back events are offered again while the channel is full.
const RETRY_EVENTS: Duration = Duration::from_millis(50);
/// Longest poll without a timer due (the loop has nothing to do then anyway).
const IDLE_POLL: Duration = Duration::from_secs(60);

/// Results of X requests whose X protocol errors are handled where they happen; only the
/// connection's own errors (`Err`) end the thread.
pub(crate) type XResult<T> = Result<T, ConnectionError>;

/// Splits a reply's error into the fatal (connection) and the local (X protocol) kind.
pub(crate) fn split<T>(r: Result<T, ReplyError>) -> XResult<Result<T, ClipboardError>> {
    match r {
        Ok(v) => Ok(Ok(v)),
        Err(ReplyError::ConnectionError(e)) => Err(e),
        Err(ReplyError::X11Error(e)) => Ok(Err(ClipboardError::X11(format!("{:?}", e.error_kind)))),
    }
}

/// Who owns CLIPBOARD, as XFixes last said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Owner {
    Nobody,
    Us,
    /// A local application's window, and the time it took the selection.
    App(Window, Timestamp),
}

/// The events on their way to the caller: a bounded channel, and behind it what did not fit.
#[derive(Debug)]
pub(crate) struct Outbox {
    tx: SyncSender<LocalEvent>,
    held: VecDeque<LocalEvent>,
}

impl Outbox {
    pub(crate) fn push(&mut self, event: LocalEvent) {
        if matches!(event, LocalEvent::Grabbed(_) | LocalEvent::Released) {
            // Only the latest state of the local clipboard matters.
            self.held.retain(|e| !matches!(e, LocalEvent::Grabbed(_) | LocalEvent::Released));
        }
        self.held.push_back(event);
        self.deliver();
    }

    fn deliver(&mut self) {
        while let Some(event) = self.held.pop_front() {
            match self.tx.try_send(event) {
                Ok(()) => {}
                Err(TrySendError::Full(event)) => {
                    self.held.push_front(event);
                    return;
                }
                // Nobody listens: the clipboard still serves, the events go nowhere.
                Err(TrySendError::Disconnected(_)) => self.held.clear(),
            }
        }
    }
}

/// Everything the thread owns.
#[derive(Debug)]
pub(crate) struct Worker {
    pub(crate) conn: RustConnection,
    pub(crate) window: Window,
    pub(crate) atoms: Atoms,
    pub(crate) limit: usize,
    /// Content up to this size goes in one ChangeProperty; above it, INCR.
    pub(crate) chunk: usize,
    pub(crate) events: Outbox,
    pub(crate) owner: Owner,
    /// Whether the last announcement was `Grabbed` (so that a `Released` means something).
    pub(crate) announced: bool,
    pub(crate) serving: Serving,
    pub(crate) requesting: Requesting,
    commands: Receiver<Command>,
    wake: UnixStream,
}

impl Worker {
    pub(crate) fn connect(
        display: Option<&str>,
        limit: usize,
        commands: Receiver<Command>,
        wake: UnixStream,
        events: SyncSender<LocalEvent>,
    ) -> Result<Worker, ClipboardError> {
        let fail = |what: &str, e: &dyn std::fmt::Display| ClipboardError::Connect(format!("{what}: {e}"));
        let (conn, screen) = RustConnection::connect(display).map_err(|e| fail("cannot connect", &e))?;
        let version = conn.xfixes_query_version(5, 0).map_err(|e| fail("XFixes", &e))?;
        version.reply().map_err(|e| fail("the X server has no XFixes", &e))?;
        let atoms =
            Atoms::new(&conn).map_err(|e| fail("atoms", &e))?.reply().map_err(|e| fail("atoms", &e))?;
        let root =
            conn.setup().roots.get(screen).map(|s| s.root).ok_or_else(|| fail("screen", &"missing"))?;
        let window = conn.generate_id().map_err(|e| fail("window id", &e))?;
        conn.create_window(
            COPY_DEPTH_FROM_PARENT,
            window,
            root,
            -10,
            -10,
            1,
            1,
            0,
            WindowClass::INPUT_ONLY,
            COPY_FROM_PARENT,
            &CreateWindowAux::new().override_redirect(1).event_mask(EventMask::PROPERTY_CHANGE),
        )
        .map_err(|e| fail("window", &e))?
        .check()
        .map_err(|e| fail("window", &e))?;
        conn.change_property8(
            x11rb::protocol::xproto::PropMode::REPLACE,
            window,
            x11rb::protocol::xproto::AtomEnum::WM_NAME,
            STRING,
            b"pleiades-clipboard",
        )
        .map_err(|e| fail("window name", &e))?;
        let all = SelectionEventMask::SET_SELECTION_OWNER
            | SelectionEventMask::SELECTION_WINDOW_DESTROY
            | SelectionEventMask::SELECTION_CLIENT_CLOSE;
        conn.xfixes_select_selection_input(window, atoms.CLIPBOARD, all)
            .map_err(|e| fail("XFixes", &e))?
            .check()
            .map_err(|e| fail("XFixes", &e))?;
        let chunk = (conn.maximum_request_bytes() / 4).clamp(4096, MAX_CHUNK);
        let current = conn.get_selection_owner(atoms.CLIPBOARD).map_err(|e| fail("selection owner", &e))?;
        let current = current.reply().map_err(|e| fail("selection owner", &e))?.owner;
        let mut worker = Worker {
            conn,
            window,
            atoms,
            limit,
            chunk,
            events: Outbox { tx: events, held: VecDeque::new() },
            owner: Owner::Nobody,
            announced: false,
            serving: Serving::default(),
            requesting: Requesting::default(),
            commands,
            wake,
        };
        if current != NONE {
            // Already owned before we came: report it as a grab (its time is unknown).
            worker.owner_changed(current, CURRENT_TIME).map_err(|e| fail("selection owner", &e))?;
        }
        Ok(worker)
    }

    /// The thread's body: runs until `Stop` or a connection error.
    pub(crate) fn run(mut self) {
        match self.serve_forever() {
            Ok(()) => {
                if let Err(e) = self.shut_down() {
                    tracing::debug!("X11 clipboard: closing: {e}");
                }
            }
            Err(e) => {
                tracing::error!("X11 clipboard: the X connection failed, the clipboard stops: {e}");
                self.requesting.fail_all(&mut self.events);
            }
        }
    }

    fn serve_forever(&mut self) -> XResult<()> {
        loop {
            let mut drained = [0u8; 64];
            while matches!((&self.wake).read(&mut drained), Ok(n) if n > 0) {}
            loop {
                match self.commands.try_recv() {
                    Ok(Command::Stop) | Err(TryRecvError::Disconnected) => return Ok(()),
                    Ok(command) => self.command(command)?,
                    Err(TryRecvError::Empty) => break,
                }
            }
            self.expire(Instant::now())?;
            // Replies read while handling may have queued events: drain until none is left, so
            // that poll below waits only for what is really new.
            loop {
                self.conn.flush()?;
                match self.conn.poll_for_event()? {
                    Some(event) => self.event(event)?,
                    None => break,
                }
            }
            self.events.deliver();
            let mut timeout =
                self.next_deadline().map_or(IDLE_POLL, |d| d.saturating_duration_since(Instant::now()));
            if !self.events.held.is_empty() {
                timeout = timeout.min(RETRY_EVENTS);
            }
            // Rounded up to whole milliseconds: rounding down would wake just before the timer.
            let millis = timeout.min(IDLE_POLL).as_nanos().div_ceil(1_000_000);
            let timeout = PollTimeout::try_from(millis).unwrap_or(PollTimeout::MAX);
            let mut fds = [
                PollFd::new(self.conn.stream().as_fd(), PollFlags::POLLIN),
                PollFd::new(self.wake.as_fd(), PollFlags::POLLIN),
            ];
            match nix::poll::poll(&mut fds, timeout) {
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(ConnectionError::IoError(e.into())),
            }
        }
    }

    fn command(&mut self, command: Command) -> XResult<()> {
        match command {
            Command::RemoteGrab(formats) => self.remote_grab(formats),
            Command::Provide { request, data } => self.provide(request, data),
            Command::Fetch { id, format } => self.fetch(id, format),
            Command::Stop => Ok(()),
        }
    }

    fn event(&mut self, event: Event) -> XResult<()> {
        match event {
            Event::SelectionRequest(e) => self.selection_request(e),
            Event::SelectionClear(e) => {
                self.selection_clear(e);
                Ok(())
            }
            Event::SelectionNotify(e) => self.selection_notify(e),
            Event::PropertyNotify(e) => self.property_notify(e),
            Event::XfixesSelectionNotify(e) => self.xfixes_notify(e),
            // A request about another client's window that vanished, typically: its transfer
            // times out.
            Event::Error(e) => {
                tracing::debug!("X11 clipboard: X error {:?} (request {})", e.error_kind, e.major_opcode);
                Ok(())
            }
            _ => Ok(()),
        }
    }

    fn property_notify(&mut self, e: PropertyNotifyEvent) -> XResult<()> {
        if e.window != self.window {
            return self.requestor_property(e);
        }
        if e.atom == self.atoms.TIME_PROBE {
            return self.timestamp_arrived(e.time);
        }
        self.landing_property(e)
    }

    fn xfixes_notify(&mut self, e: xfixes::SelectionNotifyEvent) -> XResult<()> {
        if e.selection != self.atoms.CLIPBOARD {
            return Ok(());
        }
        if e.subtype != xfixes::SelectionEvent::SET_SELECTION_OWNER && matches!(self.owner, Owner::App(..)) {
            self.owner_died()?;
        }
        self.owner_changed(e.owner, e.selection_timestamp)
    }

    /// A new owner of CLIPBOARD (`NONE`: none).
    fn owner_changed(&mut self, owner: Window, time: Timestamp) -> XResult<()> {
        self.requesting.stop_probe();
        if owner == NONE {
            self.owner = Owner::Nobody;
            self.announce(None);
        } else if owner == self.window {
            // Our own grab: the other side knows, it is theirs. Whatever a local app had is gone.
            self.owner = Owner::Us;
            self.announced = false;
        } else {
            self.owner = Owner::App(owner, time);
            self.probe(time)?;
        }
        Ok(())
    }

    /// Reports what a local app offers (`None` or an empty list: nothing usable).
    pub(crate) fn announce(&mut self, formats: Option<Vec<crate::Format>>) {
        match formats {
            Some(formats) if !formats.is_empty() => {
                self.announced = true;
                self.events.push(LocalEvent::Grabbed(formats));
            }
            _ => {
                if std::mem::take(&mut self.announced) {
                    self.events.push(LocalEvent::Released);
                }
            }
        }
    }

    fn expire(&mut self, now: Instant) -> XResult<()> {
        self.expire_serving(now)?;
        self.expire_requesting(now)
    }

    fn next_deadline(&self) -> Option<Instant> {
        [self.serving.next_deadline(), self.requesting.next_deadline()].into_iter().flatten().min()
    }

    fn shut_down(&mut self) -> XResult<()> {
        self.release_everything()?;
        self.requesting.fail_all(&mut self.events);
        self.conn.destroy_window(self.window)?;
        self.conn.flush()
    }
}
