//! The client's end of the clipboard: the desktop's X clipboard (the user's own machine) and
//! the session's clipboard channel, joined by a [`ClipboardPeer`] on a thread of its own.
//!
//! ```text
//! X clipboard ── LocalEvent ──▶ ┐
//!                               ├─ ClipboardPeer ── ClipboardMessage ──▶ session (clipboard stream)
//! session ── ClipboardMessage ─▶┘
//! ```
//!
//! Lazy both ways: a copy on this machine only announces its formats; the bytes are read from
//! the local owner when the desktop's user pastes, and the desktop's content is asked for when
//! a local application pastes. What the desktop's pool does not allow is refused by the host,
//! not here; the bridge counts those refusals ([`ClipboardSummary::denied`]) and logs them so
//! the user learns why a paste went nowhere.
//!
//! The bridge runs when the session agreed on `CLIPBOARD` and an X display is reachable
//! (`DISPLAY`; XWayland under Wayland); otherwise the session simply has no clipboard.

use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use pleiades_clipboard::{ClipboardPeer, LocalEvent, PeerEvent, X11Clipboard};
use pleiades_protocol::handshake::Capabilities;
use pleiades_protocol::wire::{ClipboardMessage, MAX_CLIPBOARD_BYTES};
use serde::Serialize;

use crate::session::SessionHandle;

/// What went through the clipboard, for the recorder's `clipboard.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ClipboardSummary {
    /// Local copies announced to the desktop.
    pub copied: u64,
    /// Local pastes of the desktop's content, and their bytes.
    pub pasted: u64,
    pub pasted_bytes: u64,
    /// Local pastes that got nothing.
    pub paste_failures: u64,
    /// Local copies the desktop's policy kept out of it.
    pub denied: u64,
}

enum Input {
    Local(LocalEvent),
    Remote(ClipboardMessage),
    Stop,
}

/// The running bridge; [`Self::finish`] stops it.
#[derive(Debug)]
pub struct ClipboardBridge {
    inputs: Sender<Input>,
    summary: Arc<Mutex<ClipboardSummary>>,
    thread: Option<JoinHandle<()>>,
}

impl ClipboardBridge {
    /// Starts the bridge for `session`: `None` when the session has no clipboard channel or
    /// no X display is reachable (said in the log).
    pub fn start(session: &SessionHandle) -> Option<ClipboardBridge> {
        if !session.info().capabilities.contains(Capabilities::CLIPBOARD) {
            tracing::info!("the desktop offers no clipboard");
            return None;
        }
        let (clipboard, events) = match X11Clipboard::connect(None, MAX_CLIPBOARD_BYTES as usize) {
            Ok(connected) => connected,
            Err(error) => {
                tracing::warn!(%error, "no clipboard sharing: cannot reach this machine's X clipboard");
                return None;
            }
        };
        let (inputs, received) = mpsc::channel();
        let local = inputs.clone();
        std::thread::Builder::new()
            .name("clipboard-x11".into())
            .spawn(move || {
                for event in events {
                    if local.send(Input::Local(event)).is_err() {
                        return;
                    }
                }
            })
            .ok()?;
        let remote = Mutex::new(inputs.clone());
        session.on_clipboard(move |message| {
            let _ = remote.lock().unwrap_or_else(|p| p.into_inner()).send(Input::Remote(message));
        });
        let summary = Arc::new(Mutex::new(ClipboardSummary::default()));
        let (session, counts) = (session.clone(), summary.clone());
        let thread = std::thread::Builder::new()
            .name("clipboard".into())
            .spawn(move || bridge(&clipboard, &received, &session, &counts))
            .ok()?;
        tracing::info!("clipboard shared with the desktop (as its pool allows)");
        Some(ClipboardBridge { inputs, summary, thread: Some(thread) })
    }

    /// What went through so far.
    pub fn summary(&self) -> ClipboardSummary {
        self.summary.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Stops the bridge (this machine's clipboard keeps what it has of its own) and says what
    /// went through.
    pub fn finish(mut self) -> ClipboardSummary {
        let _ = self.inputs.send(Input::Stop);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        self.summary()
    }
}

impl Drop for ClipboardBridge {
    fn drop(&mut self) {
        let _ = self.inputs.send(Input::Stop);
    }
}

fn bridge(
    clipboard: &X11Clipboard,
    inputs: &Receiver<Input>,
    session: &SessionHandle,
    summary: &Mutex<ClipboardSummary>,
) {
    let mut peer = ClipboardPeer::new(MAX_CLIPBOARD_BYTES as usize);
    while let Ok(input) = inputs.recv() {
        match input {
            Input::Local(event) => {
                if matches!(event, LocalEvent::Grabbed(_)) {
                    summary.lock().unwrap_or_else(|p| p.into_inner()).copied += 1;
                }
                peer.on_local(event, clipboard);
            }
            Input::Remote(message) => peer.on_remote(message, clipboard),
            Input::Stop => return,
        }
        while let Some(message) = peer.poll_transmit() {
            if !session.send_clipboard(message) {
                return;
            }
        }
        while let Some(event) = peer.poll_event() {
            let mut counts = summary.lock().unwrap_or_else(|p| p.into_inner());
            match event {
                PeerEvent::Denied { formats } => {
                    counts.denied += 1;
                    tracing::warn!(?formats, "the desktop's policy does not let what you copied into it");
                }
                PeerEvent::Pasted { format, bytes } => {
                    counts.pasted += 1;
                    counts.pasted_bytes += bytes as u64;
                    tracing::info!(?format, bytes, "pasted from the desktop");
                }
                PeerEvent::PasteFailed { format, reason } => {
                    counts.paste_failures += 1;
                    tracing::info!(?format, ?reason, "a paste from the desktop got nothing");
                }
            }
        }
    }
}
