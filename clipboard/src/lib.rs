//! The X11 CLIPBOARD selection as one end of Pleiades' lazy clipboard.
//!
//! Two programs use it: the thin client, for the user's own X display, and the guest agent's
//! per-user session part, for the desktop's X display. Each bridges [`X11Clipboard`]'s events
//! and calls to the clipboard messages of `pleiades_protocol::wire::clipboard`; this crate does
//! not speak the protocol, only the local X clipboard in its terms ([`Format`]). Nothing moves
//! until someone pastes.
//!
//! One thread per [`X11Clipboard`] owns the X connection (pure Rust `x11rb`, no libxcb) and a
//! hidden, never mapped InputOnly window. It waits with `poll(2)` on the connection and on a
//! wake socket (the calls queue commands and wake it), with a timeout for its timers, and is a
//! state machine throughout: no wait on another client ever blocks it.
//!
//! # Local copy → remote paste (we are the requestor)
//!
//! ```text
//! app: SetSelectionOwner(CLIPBOARD) ─▶ XFixes SelectionNotify(owner) ─▶ ConvertSelection(TARGETS)
//!   ─▶ SelectionNotify ─▶ read the ATOM list ─▶ LocalEvent::Grabbed([Text, Png])
//! fetch(id, Png) ─▶ ConvertSelection(image/png → our property) ─▶ SelectionNotify
//!   ─▶ GetProperty(delete) in chunks ─▶ LocalEvent::Fetched { id, Ok(bytes) }
//!        or type INCR: delete, then per PropertyNotify(NewValue) read+delete a chunk,
//!        until a zero-length one
//! ```
//!
//! - The owner's TARGETS is mapped: `UTF8_STRING`, `text/plain;charset=utf-8`, `STRING`,
//!   `TEXT` → [`Format::Text`]; `text/html` → Html; `image/png` → Png; anything else is
//!   ignored. An owner offering none of these (or not answering TARGETS) is reported as
//!   [`LocalEvent::Released`] when a grab had been reported before, and not at all otherwise:
//!   the local clipboard then holds nothing the other side can use.
//! - Text is fetched as `UTF8_STRING`, then `text/plain;charset=utf-8`, then `STRING`
//!   (Latin-1, unless its bytes already are UTF-8), among those the owner lists. Text and HTML
//!   come out as UTF-8 (invalid sequences replaced; UTF-16 HTML with a byte order mark, as some
//!   browsers offer it, converted); a PNG must start with PNG's signature.
//! - At most `limit` bytes are read ([`ClipboardError::TooLarge`], checked from the property's
//!   size before reading it); each step waits at most [`FETCH_TIMEOUT`] and a whole fetch at
//!   most [`FETCH_DEADLINE`]. Fetches run one at a time, in order.
//! - Conversions land in one of four properties of our window, in turn, so that an owner still
//!   writing an abandoned INCR transfer does not write into the next fetch's property.
//!
//! # Remote copy → local paste (we are the owner)
//!
//! ```text
//! remote_grab([Text, Png]) ─▶ ChangeProperty(append 0 bytes) ─▶ PropertyNotify(time T)
//!   ─▶ SetSelectionOwner(CLIPBOARD, T) ─▶ GetSelectionOwner = us?
//! app: ConvertSelection(UTF8_STRING) ─▶ SelectionRequest ─▶ LocalEvent::DataWanted { request, Text }
//! provide(request, Some(bytes)) ─▶ ChangeProperty(requestor's property) ─▶ SendEvent(SelectionNotify)
//!   or, above the chunk size: property INCR(size), then a chunk per PropertyNotify(Delete)
//!   on the requestor's window, then a zero-length one
//! ```
//!
//! - The ownership timestamp is a real server time, from a zero-length property append on our
//!   window (ICCCM §2.1: never `CurrentTime`); ownership is verified with GetSelectionOwner.
//! - Served targets: `TARGETS`, `TIMESTAMP`, and per offered format: Text as `UTF8_STRING`,
//!   `text/plain;charset=utf-8`, `text/plain`, `TEXT` (all UTF-8, typed `UTF8_STRING` for
//!   `TEXT`) and `STRING` (converted to Latin-1 as ICCCM says, `?` for what Latin-1 lacks);
//!   Html as `text/html`; Png as `image/png`. `MULTIPLE` and anything else are refused
//!   (property None), as are requests older than our ownership. A requestor's property None
//!   (obsolete clients) means the target atom.
//! - Pastes of one format while its [`LocalEvent::DataWanted`] is unanswered wait on the same
//!   request; the answer is cached for the current remote grab, so a second paste is served
//!   at once. A request unanswered after [`ANSWER_TIMEOUT`] is refused.
//! - INCR chunks are `min(maximum request bytes / 4, 256 KiB)`; each transfer may wait
//!   [`TRANSFER_TIMEOUT`] for the requestor to delete the property, then it is dropped.
//! - On SelectionClear (a local app copied) we stop serving; XFixes then reports that app's
//!   grab like any other.
//!
//! # Bounds
//!
//! The event channel holds [`EVENT_QUEUE`] events; when the caller falls behind, reports of
//! local grabs coalesce (the newest wins) and the rest wait in a queue whose size the caller's
//! own calls bound. Outgoing transfers, pastes waiting per request and the bytes of one
//! content are capped; a hostile local client (wrong types or formats, endless INCR, windows
//! that vanish) gets refused or timed out, never a panic or a hang. An X protocol error
//! (typically a requestor's window that is gone) is logged; an error of the connection itself
//! ends the thread, and the event channel disconnects.

pub mod peer;
mod targets;
mod worker;

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::mpsc::{self, Receiver};
use std::thread::JoinHandle;
use std::time::Duration;

pub use peer::{ClipboardPeer, LocalClipboard, PeerEvent};
pub use pleiades_protocol::wire::ClipboardFormat as Format;

/// How long a local paste waits for [`X11Clipboard::provide`] before it is refused.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(15);
/// How long one step of a fetch (the owner's answer, each INCR chunk) may take.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a whole fetch may take, from the call, including the wait behind earlier fetches.
pub const FETCH_DEADLINE: Duration = Duration::from_secs(60);
/// How long an outgoing INCR transfer waits for the requestor to take each chunk.
pub const TRANSFER_TIMEOUT: Duration = Duration::from_secs(10);
/// Events the channel holds before the thread holds them back (see "Bounds").
pub const EVENT_QUEUE: usize = 64;

/// Why clipboard content could not be had.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClipboardError {
    #[error("cannot use the X display: {0}")]
    Connect(String),
    #[error("no local application offers the clipboard as {0:?}")]
    Unavailable(Format),
    #[error("the clipboard content is over the limit of {limit} bytes")]
    TooLarge { limit: usize },
    #[error("the clipboard's owner did not answer in time")]
    Timeout,
    #[error("the clipboard's owner sent unusable data: {0}")]
    Malformed(&'static str),
    #[error("the X server refused a clipboard request: {0}")]
    X11(String),
    #[error("the clipboard thread stopped")]
    Stopped,
}

/// What happens on the local X clipboard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LocalEvent {
    /// A local application took the CLIPBOARD selection; it offers these formats (no
    /// duplicates, in [`Format::ALL`]'s order). Not sent when this crate itself took ownership.
    Grabbed(Vec<Format>),
    /// The local clipboard no longer holds what the last `Grabbed` announced: its owner exited
    /// or cleared it, or a new owner offers no format we know.
    Released,
    /// A local application pastes content the remote side owns (after `remote_grab`). Fetch it
    /// remotely and answer with [`X11Clipboard::provide`].
    DataWanted { request: u64, format: Format },
    /// The result of [`X11Clipboard::fetch`].
    Fetched { id: u64, result: Result<Vec<u8>, ClipboardError> },
}

/// What the calls ask of the thread.
#[derive(Debug)]
pub(crate) enum Command {
    RemoteGrab(Vec<Format>),
    Provide { request: u64, data: Option<Vec<u8>> },
    Fetch { id: u64, format: Format },
    Stop,
}

/// The local X display's CLIPBOARD, run by a thread of its own. Dropping it stops the thread,
/// refuses pastes still waiting and gives up the selection if held.
#[derive(Debug)]
pub struct X11Clipboard {
    commands: mpsc::Sender<Command>,
    wake: UnixStream,
    thread: Option<JoinHandle<()>>,
}

impl X11Clipboard {
    /// Connects to `display` (`None`: `$DISPLAY`), creates the hidden window, subscribes to
    /// XFixes' owner changes of CLIPBOARD and starts the thread. `limit`: the most bytes one
    /// content may have, read or served (callers pass `MAX_CLIPBOARD_BYTES`).
    ///
    /// If a local application already owns CLIPBOARD, its grab is reported as if it had just
    /// happened.
    pub fn connect(
        display: Option<&str>,
        limit: usize,
    ) -> Result<(Self, Receiver<LocalEvent>), ClipboardError> {
        let (wake, wake_rx) =
            UnixStream::pair().map_err(|e| ClipboardError::Connect(format!("wake socket: {e}")))?;
        for end in [&wake, &wake_rx] {
            end.set_nonblocking(true).map_err(|e| ClipboardError::Connect(format!("wake socket: {e}")))?;
        }
        let (commands, commands_rx) = mpsc::channel();
        let (events, events_rx) = mpsc::sync_channel(EVENT_QUEUE);
        let worker = worker::Worker::connect(display, limit, commands_rx, wake_rx, events)?;
        let thread = std::thread::Builder::new()
            .name("x11-clipboard".into())
            .spawn(move || worker.run())
            .map_err(|e| ClipboardError::Connect(format!("cannot start the clipboard thread: {e}")))?;
        Ok((X11Clipboard { commands, wake, thread: Some(thread) }, events_rx))
    }

    /// The remote side has new content in `formats`: take CLIPBOARD, offering them. An empty
    /// list (the remote side's clipboard was cleared) gives up the selection if held. Either
    /// way, answers cached for the previous content are dropped and its waiting pastes refused.
    pub fn remote_grab(&self, formats: Vec<Format>) {
        self.send(Command::RemoteGrab(formats));
    }

    /// Answers [`LocalEvent::DataWanted`]: `Some(bytes)` completes the waiting paste(s) (and is
    /// kept for later pastes of this content), `None` refuses them. An answer to a request that
    /// timed out or whose content was replaced is ignored.
    pub fn provide(&self, request: u64, data: Option<Vec<u8>>) {
        self.send(Command::Provide { request, data });
    }

    /// Reads the local owner's content as `format`; the result arrives as
    /// [`LocalEvent::Fetched`] with this `id`.
    pub fn fetch(&self, id: u64, format: Format) {
        self.send(Command::Fetch { id, format });
    }

    fn send(&self, command: Command) {
        if self.commands.send(command).is_ok() {
            // A full socket already holds a wake-up: nothing lost.
            let _ = (&self.wake).write(&[1]);
        }
    }
}

impl Drop for X11Clipboard {
    fn drop(&mut self) {
        self.send(Command::Stop);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
