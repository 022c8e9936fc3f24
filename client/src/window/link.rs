//! The window's connection to the desktop, on the async runtime: connect with the connection
//! file's ticket, run the session, notice a dead path, and resume with the server's one-time
//! resume token (backing off between attempts) until it works or the token's lifetime is over.
//!
//! ```text
//! Connecting ──ok──▶ Connected ──path silent 3 s / connection lost──▶ Reconnecting ──ok──▶ Connected
//!     │                  │                                               │ refused / too late
//!     └─ fails ─▶ Disconnected ◀── Goodbye, clean close, protocol error ─┘
//! ```
//!
//! The ticket is spent by the first connection, so only a session that was given a resume
//! token can come back (docs/protocol.md, "Resuming").

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use pleiades_protocol::connfile::Connection;
use pleiades_protocol::wire::{GoodbyeReason, Monitor};
use tokio::sync::{mpsc, watch};

use crate::ClientError;
use crate::audio::{Audio, AudioOptions};
use crate::connect;
use crate::display::Codec;
use crate::session::{Session, SessionEvent, SessionHandle, SessionOptions};

/// Without a datagram from the server for this long (it pings every second) the path counts as
/// down and the client starts resuming.
pub const STALL: Duration = Duration::from_secs(3);
/// Longest wait between two resume attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(4);
/// The longest a new session waits for the window to say where video is converted.
const GPU_DECISION: Duration = Duration::from_secs(10);
/// How often the watchdog looks and the statistics refresh.
const TICK: Duration = Duration::from_millis(500);

/// What the person in front of the window is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkState {
    Connecting,
    Connected,
    Reconnecting { attempt: u32, why: String },
    Disconnected(String),
}

impl LinkState {
    /// One short line, for the title and the status text.
    pub fn label(&self) -> String {
        match self {
            LinkState::Connecting => "connecting".into(),
            LinkState::Connected => "connected".into(),
            LinkState::Reconnecting { attempt: 0, .. } => "reconnecting".into(),
            LinkState::Reconnecting { attempt, .. } => format!("reconnecting (attempt {})", attempt + 1),
            LinkState::Disconnected(why) => format!("disconnected: {why}"),
        }
    }
}

/// What the link tells the window (through winit's event loop).
#[derive(Debug)]
pub enum LinkEvent {
    State(LinkState),
    /// A frame of `scanout` was presented into the displays.
    Frame {
        scanout: u32,
        codec: Codec,
    },
    Layout(Vec<Monitor>),
    CursorShape,
    /// Once a second while connected: for the overlay.
    Stats {
        rtt_ms: f64,
        kbit_s: f64,
    },
}

/// What the window asks of the session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Key(u16, bool),
    Pointer { scanout: u32, x: u32, y: u32 },
    PointerRel(i32, i32),
    Buttons(u32),
    Wheel(i32, i32),
    ReleaseAll,
    Layout(Vec<(u32, u32)>),
}

/// The live session, shared by the link, the input forwarder and the window.
pub type Current = Arc<Mutex<Option<SessionHandle>>>;

pub fn lock(current: &Current) -> MutexGuard<'_, Option<SessionHandle>> {
    current.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Forwards the window's requests to whichever session is live; drops them while none is.
pub async fn forward_requests(current: Current, mut requests: mpsc::UnboundedReceiver<Request>) {
    while let Some(request) = requests.recv().await {
        let handle = lock(&current).clone();
        let Some(handle) = handle else { continue };
        let sent = match request {
            Request::Key(code, down) => handle.send_key(code, down).await,
            Request::Pointer { scanout, x, y } => handle.send_pointer(scanout, x, y).await,
            Request::PointerRel(dx, dy) => handle.send_pointer_rel(dx, dy).await,
            Request::Buttons(mask) => handle.send_buttons(mask).await,
            Request::Wheel(dx, dy) => handle.send_wheel(dx, dy).await,
            Request::ReleaseAll => handle.release_all().await,
            Request::Layout(sizes) => handle.request_layout(&sizes).await,
        };
        if let Err(error) = sent {
            tracing::debug!(%error, "a request did not go out");
        }
    }
}

/// How a session ended.
enum End {
    /// For good: the server's goodbye, a clean close, an error that a retry will not fix.
    Final(String),
    /// The path or the connection was lost: resume if possible.
    Lost(String),
}

/// Whether a failed attempt to resume is worth another try.
fn retryable(error: &ClientError) -> bool {
    matches!(
        error,
        ClientError::Unreachable { .. }
            | ClientError::HandshakeTimeout
            | ClientError::ConnectionLost(_)
            | ClientError::Stream { .. }
            | ClientError::Resolve { .. }
    )
}

/// What the link runs a session with.
#[derive(Debug)]
pub struct Link {
    pub connection: Connection,
    pub options: SessionOptions,
    pub audio: AudioOptions,
    pub current: Current,
    /// The files to send (`--send`, drops): each session sends what is left.
    pub files: crate::files::FileQueue,
    /// The USB devices to redirect (`--usb`, `--usb-emulated-disk`): into each session in turn.
    pub usb: crate::usb::redirect::UsbDevices,
}

impl Link {
    /// Runs the connection until it is over for good; `notify` reaches the window.
    pub async fn supervise(
        self,
        mut gpu_video: watch::Receiver<Option<bool>>,
        notify: impl Fn(LinkEvent) + Send,
    ) {
        let Link { connection, options, audio, current, files, mut usb } = self;
        let mut credential = connection.ticket.clone();
        // Set while resuming: when the path was lost, why, and how long the token lives.
        let mut lost: Option<(Instant, String, Duration)> = None;
        let mut attempt = 0u32;
        loop {
            notify(LinkEvent::State(match &lost {
                None => LinkState::Connecting,
                Some((_, why, _)) => LinkState::Reconnecting { attempt, why: why.clone() },
            }));
            let started = async {
                let connected = connect::connect(&connection).await?;
                Session::start(connected, &credential, options.clone()).await
            }
            .await;
            let mut session = match started {
                Ok(session) => session,
                Err(error) => {
                    let in_time = lost.as_ref().is_some_and(|(at, _, lifetime)| at.elapsed() < *lifetime);
                    if !(in_time && retryable(&error)) {
                        tracing::error!(%error, "cannot connect");
                        notify(LinkEvent::State(LinkState::Disconnected(error.to_string())));
                        return;
                    }
                    attempt += 1;
                    let backoff = Duration::from_millis(250 << attempt.min(5)).min(MAX_BACKOFF);
                    tracing::info!(%error, attempt, ?backoff, "resuming failed; trying again");
                    tokio::time::sleep(backoff).await;
                    continue;
                }
            };
            if lost.take().is_some() {
                tracing::info!(attempt, "the session resumed");
            }
            attempt = 0;
            // Where H.264 pictures become BGRX is decided once per session, before its first frame
            // is drawn: the window says so once it has its GPU (bounded wait; GPU if it never says).
            let waited = tokio::time::timeout(GPU_DECISION, gpu_video.wait_for(Option::is_some)).await;
            let on_gpu = waited.ok().and_then(|r| r.ok().and_then(|d| *d)).unwrap_or(true);
            session.handle.with_displays(|displays| displays.set_gpu_video(on_gpu));
            *lock(&current) = Some(session.handle.clone());
            notify(LinkEvent::State(LinkState::Connected));
            // Sound follows the session: a card that cannot be opened is logged, not fatal.
            let player = match Audio::start(&session.handle, audio.clone()) {
                Ok(player) => player,
                Err(error) => {
                    tracing::warn!(%error, "no sound for this session");
                    None
                }
            };
            // So does the clipboard, where this machine has an X display, and the files to send.
            let clipboard = crate::clipboard::ClipboardBridge::start(&session.handle);
            let sender = tokio::spawn(crate::files::send_files(session.handle.clone(), files.clone()));
            let redirect = usb.redirect(&session.handle);
            let end = run(&mut session, &notify).await;
            sender.abort();
            let _ = sender.await;
            files.requeue_interrupted();
            if let Some(clipboard) = clipboard {
                let summary = tokio::task::spawn_blocking(move || clipboard.finish()).await;
                tracing::info!(?summary, "the clipboard bridge stopped");
            }
            if let Some(player) = player
                && let Err(error) = player.finish().await
            {
                tracing::warn!(%error, "the sound stopped with an error");
            }
            let token = session.handle.resume_token();
            *lock(&current) = None;
            // The devices come back once the session's end reached their threads.
            if let Some(redirect) = redirect {
                usb = tokio::task::spawn_blocking(move || {
                    usb.finished(redirect);
                    usb
                })
                .await
                .unwrap_or_default();
            }
            match end {
                End::Final(why) => {
                    notify(LinkEvent::State(LinkState::Disconnected(why)));
                    session.disconnect("the session is over").await;
                    return;
                }
                End::Lost(why) => {
                    drop(session);
                    let Some(token) = token else {
                        notify(LinkEvent::State(LinkState::Disconnected(format!(
                            "{why} (the server offers no resume)"
                        ))));
                        return;
                    };
                    tracing::warn!(%why, "the connection is lost; resuming");
                    credential = token;
                    let lifetime = Duration::from_secs(pleiades_protocol::resume::RESUME_LIFETIME_S);
                    lost = Some((Instant::now(), why, lifetime));
                }
            }
        }
    }
}

/// Passes the session's events on and watches the path.
async fn run(session: &mut Session, notify: &(impl Fn(LinkEvent) + Send)) -> End {
    let mut tick = tokio::time::interval(TICK);
    let mut heard = (session.handle.datagrams_received(), Instant::now());
    let mut last_tick = Instant::now();
    let mut last_stats = (session.handle.bytes_received(), Instant::now());
    loop {
        tokio::select! {
            event = session.next_event() => match event {
                Some(SessionEvent::Frame(stats)) => {
                    notify(LinkEvent::Frame { scanout: stats.scanout, codec: stats.codec });
                }
                Some(SessionEvent::Layout(monitors)) => notify(LinkEvent::Layout(monitors)),
                Some(SessionEvent::CursorShape { .. }) => notify(LinkEvent::CursorShape),
                Some(SessionEvent::Goodbye(goodbye)) => {
                    let why = match goodbye.reason {
                        GoodbyeReason::Replaced => "another client took this desktop over".to_owned(),
                        reason => format!("the server ended the session ({reason:?}): {}", goodbye.message),
                    };
                    return End::Final(why);
                }
                Some(SessionEvent::ServerClosed(reason)) => {
                    return End::Final(format!("the server closed the session: {reason}"));
                }
                Some(SessionEvent::Failed(ClientError::ConnectionLost(error))) => {
                    return End::Lost(format!("the connection was lost: {error}"));
                }
                Some(SessionEvent::Failed(error)) => return End::Final(error.to_string()),
                None => return End::Lost("the session's tasks ended".into()),
            },
            _ = tick.tick() => {
                let now = Instant::now();
                // A tick this late means this process did not run (a starved machine, a
                // suspended laptop): the server's datagrams may be waiting unread, so silence
                // is only counted from here.
                if now.duration_since(last_tick) > 2 * TICK {
                    tracing::debug!(late_ms = now.duration_since(last_tick).as_millis(), "the client was not running");
                    heard.1 = heard.1.max(now - TICK);
                }
                last_tick = now;
                let datagrams = session.handle.datagrams_received();
                if datagrams != heard.0 {
                    heard = (datagrams, now);
                } else if now.duration_since(heard.1) >= STALL {
                    return End::Lost(format!("no answer from the server for {} s", STALL.as_secs()));
                }
                let elapsed = now.duration_since(last_stats.1);
                if elapsed >= Duration::from_secs(1) {
                    let bytes = session.handle.bytes_received();
                    let kbit_s = (bytes - last_stats.0) as f64 * 8.0 / 1000.0 / elapsed.as_secs_f64();
                    let rtt_ms = session.handle.ping_rtt_us().unwrap_or(0) as f64 / 1000.0;
                    notify(LinkEvent::Stats { rtt_ms, kbit_s });
                    last_stats = (bytes, now);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pleiades_protocol::wire::RefuseCode;

    #[test]
    fn states_read_well_and_only_network_failures_are_retried() {
        assert_eq!(LinkState::Connected.label(), "connected");
        assert_eq!(LinkState::Reconnecting { attempt: 0, why: "x".into() }.label(), "reconnecting");
        assert_eq!(
            LinkState::Reconnecting { attempt: 2, why: "x".into() }.label(),
            "reconnecting (attempt 3)"
        );
        assert_eq!(LinkState::Disconnected("bye".into()).label(), "disconnected: bye");
        assert!(retryable(&ClientError::HandshakeTimeout));
        assert!(retryable(&ClientError::Unreachable { addr: "a".into(), detail: "d".into() }));
        let refused = ClientError::Refused { code: RefuseCode::ExpiredTicket, message: "used".into() };
        assert!(!retryable(&refused), "a refused token is final");
        assert!(!retryable(&ClientError::WrongCertificate { got: "a".into(), expected: "b".into() }));
    }
}
