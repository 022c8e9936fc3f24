//! The agent's per-user part and its link to the system service, split as spice-vdagent (in
//! the user's session) and spice-vdagentd (the system service) are.
//!
//! `pleiades-agent session` runs inside the graphical session (XDG autostart): every
//! [`REPORT_EVERY`] it measures the user's idle time from the X server (`xprintidle`, the
//! XScreenSaver extension) and whether logind says the session is locked, and sends that as an
//! agent-channel `SessionState` frame over the service's local socket ([`SOCKET`]).
//!
//! The service ([`SessionReports`]) accepts those connections, decodes them with the same
//! bounded decoder as the vsock link, and names the user from the connection's peer
//! credentials (`SO_PEERCRED`), never from what the process claims. When the session part's
//! connection ends (the user logged out) the session is reported empty.
//!
//! The session part is also the guest end of the clipboard (as spice-vdagent is): it runs a
//! [`ClipboardPeer`] over the session's X clipboard ([`X11Clipboard`]) and exchanges its
//! clipboard messages with the service on the same socket, which relays them to and from the
//! host. Only a part of the user whose session is in the foreground of the seat (logind's
//! `seat0` `ActiveSession`) may have the clipboard, as only spice-vdagentd's active-session
//! agent does; of those, the latest to connect. When it goes, what it offered is withdrawn.
//! The service writes to it from a thread of its own with a bounded queue (a part that does not
//! read is cut off, never the service's loop), gives it the host's latest copy when it takes
//! the clipboard, and gives the host the part's latest copy again on every new vsock link.
//!
//! The same part receives the files the session's client sends ([`crate::files`]): they are
//! written by the user's own process, into the user's Downloads. The service only relays, and
//! remembers which transfers it passed to the part: when the part goes, the host hears that
//! they were interrupted; when the vsock link goes, the part does.

use std::collections::{BTreeSet, VecDeque};
use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::Command;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nix::sys::eventfd::{EfdFlags, EventFd};
use pleiades_clipboard::{ClipboardPeer, LocalEvent, X11Clipboard};
use pleiades_protocol::wire::{
    AgentMessage, CancelReason, ClipboardGrab, ClipboardMessage, FILE_WINDOW, FileMessage, FileRefuseReason,
    MAX_AGENT_TEXT, MAX_CLIPBOARD_BYTES, MAX_FILE_CHUNK, MAX_FILE_TRANSFERS, SessionActivity, SessionState,
    StreamDecoder, encode_to_vec,
};

use crate::files::Downloads;

/// The service's socket for the session parts.
pub const SOCKET: &str = "/run/pleiades-agent/session.sock";
/// How often the session part reports.
pub const REPORT_EVERY: Duration = Duration::from_secs(2);
/// Most session parts connected at once (one per graphical login; a few spare).
const MAX_SESSIONS: usize = 8;
/// Clipboard bytes from the session part waiting for the vsock loop beyond this cut the part
/// off (one whole content fits).
const MAX_TO_HOST: usize = MAX_CLIPBOARD_BYTES as usize + 1024 * 1024;
/// How long a write of clipboard data to a session part may block its writer thread.
const PART_WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Frames queued for a session part's writer: one whole clipboard content in chunks, every
/// file transfer's window in chunks, and some room.
const PART_QUEUE: usize = pleiades_protocol::wire::MAX_CLIPBOARD_QUEUE
    / pleiades_protocol::wire::MAX_CLIPBOARD_CHUNK
    + MAX_FILE_TRANSFERS * (FILE_WINDOW as usize / MAX_FILE_CHUNK + 1)
    + 64;

/// Whether a process of this user id may have the guest's clipboard.
pub type ClipboardGate = Arc<dyn Fn(u32) -> bool + Send + Sync>;

/// The session part that has the clipboard and receives files (the active part).
#[derive(Debug)]
struct Part {
    id: u64,
    /// Frames for its writer thread.
    frames: std::sync::mpsc::SyncSender<Vec<u8>>,
    /// To cut it off.
    stream: UnixStream,
}

/// What the session parts last reported, shared with the service's vsock loop.
#[derive(Clone)]
pub struct SessionReports {
    state: Arc<Mutex<Reports>>,
    /// Signalled when clipboard messages for the host are waiting.
    wake: Arc<EventFd>,
    gate: ClipboardGate,
}

impl std::fmt::Debug for SessionReports {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionReports").field("state", &self.state).finish_non_exhaustive()
    }
}

#[derive(Debug, Default)]
struct Reports {
    /// The latest report, and a counter bumped by every change the vsock loop has not sent.
    latest: Option<SessionState>,
    changes: u64,
    connected: usize,
    next_part: u64,
    /// The session part that has the guest's clipboard and receives files.
    active_part: Option<Part>,
    /// Its clipboard and file messages for the host, and their bytes.
    to_host: VecDeque<AgentMessage>,
    to_host_bytes: usize,
    /// The file transfers passed to the active part and not ended yet.
    files: BTreeSet<u32>,
    /// The latest copies on either side (given again to a new part, and to a new vsock link).
    host_grab: Option<ClipboardMessage>,
    part_grab: Option<AgentMessage>,
}

impl SessionReports {
    /// Listens on `socket` (made world-writable: any local user may report their own session,
    /// named by the kernel) from a new thread; the clipboard goes to parts of the user whose
    /// session is in the foreground of seat0.
    pub fn listen(socket: &Path) -> std::io::Result<Self> {
        Self::listen_with(socket, Arc::new(|uid| seat_user() == Some(uid)))
    }

    /// [`Self::listen`] with the rule of who may have the clipboard.
    pub fn listen_with(socket: &Path, gate: ClipboardGate) -> std::io::Result<Self> {
        if let Some(dir) = socket.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let _ = std::fs::remove_file(socket);
        let listener = UnixListener::bind(socket)?;
        std::fs::set_permissions(socket, std::os::unix::fs::PermissionsExt::from_mode(0o666))?;
        let reports = Self {
            state: Default::default(),
            wake: Arc::new(EventFd::from_flags(EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)?),
            gate,
        };
        let shared = reports.clone();
        std::thread::Builder::new().name("sessions".into()).spawn(move || {
            for stream in listener.incoming().flatten() {
                if shared.lock().connected >= MAX_SESSIONS {
                    continue;
                }
                shared.lock().connected += 1;
                let each = shared.clone();
                let _ = std::thread::Builder::new().name("session".into()).spawn(move || {
                    each.serve(stream);
                    let mut reports = each.lock();
                    reports.connected -= 1;
                    if reports.connected == 0 {
                        // The last graphical session ended: nobody is logged in.
                        reports.latest = Some(nobody());
                        reports.changes += 1;
                    }
                });
            }
        })?;
        Ok(reports)
    }

    fn lock(&self) -> MutexGuard<'_, Reports> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Reads one session part's reports and clipboard until it disconnects or breaks the
    /// framing; then, if it had the clipboard, withdraws what it offered.
    fn serve(&self, stream: UnixStream) {
        let Some((uid, user)) = peer_user(&stream) else { return };
        let id = {
            let mut reports = self.lock();
            reports.next_part += 1;
            reports.next_part
        };
        if (self.gate)(uid) {
            self.take_active_part(id, &stream);
        }
        self.read_part(stream, &user, id);
        let mut reports = self.lock();
        if reports.active_part.as_ref().is_some_and(|part| part.id == id) {
            reports.active_part = None;
            reports.part_grab = None;
            reports.to_host.push_back(AgentMessage::Clipboard(ClipboardMessage::Grab(ClipboardGrab {
                serial: 0,
                formats: Vec::new(),
            })));
            interrupt_files(&mut reports);
            drop(reports);
            let _ = self.wake.write(1);
        }
    }

    /// Part `id` has the clipboard now: a writer thread of its own, and the host's latest copy.
    fn take_active_part(&self, id: u64, stream: &UnixStream) {
        let (Ok(mut writer), Ok(cut)) = (stream.try_clone(), stream.try_clone()) else { return };
        let _ = writer.set_write_timeout(Some(PART_WRITE_TIMEOUT));
        let (frames, queue) = std::sync::mpsc::sync_channel::<Vec<u8>>(PART_QUEUE);
        let spawned = std::thread::Builder::new().name("session-writer".into()).spawn(move || {
            for frame in queue {
                if writer.write_all(&frame).is_err() {
                    // Its reader ends with the connection and withdraws what it offered.
                    let _ = writer.shutdown(std::net::Shutdown::Both);
                    return;
                }
            }
        });
        if spawned.is_err() {
            return;
        }
        let mut reports = self.lock();
        if let Some(old) = reports.active_part.take() {
            // The older part keeps reporting its session, without the clipboard; the files it
            // was receiving are interrupted (offered again, they go to this one).
            drop(old);
            interrupt_files(&mut reports);
        }
        reports.part_grab = None;
        let host_grab = reports.host_grab.clone();
        let part = Part { id, frames, stream: cut };
        if let Some(frame) = host_grab.and_then(|g| encode_to_vec(&AgentMessage::Clipboard(g)).ok()) {
            let _ = part.frames.try_send(frame);
        }
        reports.active_part = Some(part);
    }

    fn read_part(&self, mut stream: UnixStream, user: &str, id: u64) {
        let mut decoder = StreamDecoder::<AgentMessage>::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match stream.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let mut chunk = &buf[..n];
            loop {
                match decoder.decode(&mut chunk) {
                    Ok(Some(AgentMessage::SessionState(state))) => {
                        // The kernel names the user; the report gives only its state.
                        let state = SessionState { user: user.to_owned(), ..state };
                        let state = if state.activity == SessionActivity::NoUser { nobody() } else { state };
                        let mut reports = self.lock();
                        reports.latest = Some(state);
                        reports.changes += 1;
                    }
                    Ok(Some(message @ (AgentMessage::Clipboard(_) | AgentMessage::Files(_)))) => {
                        let mut reports = self.lock();
                        if reports.active_part.as_ref().is_none_or(|part| part.id != id) {
                            // A part without the clipboard (another user's, or an older one).
                            continue;
                        }
                        match &message {
                            AgentMessage::Clipboard(ClipboardMessage::Grab(g)) => {
                                reports.part_grab = (!g.formats.is_empty()).then(|| message.clone());
                            }
                            AgentMessage::Files(file) => {
                                // Only answers about transfers it was given.
                                if file.from_sender() || !reports.files.contains(&file.id()) {
                                    continue;
                                }
                                if matches!(file, FileMessage::Done { .. } | FileMessage::Refused { .. }) {
                                    reports.files.remove(&file.id());
                                }
                            }
                            _ => {}
                        }
                        reports.to_host_bytes += message_len(&message);
                        if reports.to_host_bytes > MAX_TO_HOST {
                            return;
                        }
                        reports.to_host.push_back(message);
                        drop(reports);
                        let _ = self.wake.write(1);
                    }
                    Ok(Some(_)) => return,
                    Ok(None) => break,
                    Err(_) => return,
                }
            }
        }
    }

    /// The fd that becomes readable when [`Self::take_clipboard`] has something.
    pub fn wake_fd(&self) -> BorrowedFd<'_> {
        self.wake.as_fd()
    }

    /// The clipboard and file messages the session part sent for the host.
    pub fn take_for_host(&self) -> Vec<AgentMessage> {
        let _ = self.wake.read();
        let mut reports = self.lock();
        reports.to_host_bytes = 0;
        reports.to_host.drain(..).collect()
    }

    /// Passes the host's clipboard message to the session part that has the clipboard (never
    /// blocking: its writer thread writes); `false` when there is none (nobody is logged in,
    /// or its part is not running).
    pub fn to_session(&self, message: &ClipboardMessage) -> bool {
        let mut reports = self.lock();
        if let ClipboardMessage::Grab(g) = message {
            reports.host_grab = (!g.formats.is_empty()).then(|| message.clone());
        }
        Self::to_part(&mut reports, &AgentMessage::Clipboard(message.clone()))
    }

    /// Passes the host's file message to the active session part; `false` when there is none.
    pub fn file_to_session(&self, message: FileMessage) -> bool {
        let mut reports = self.lock();
        let id = message.id();
        let known = reports.files.contains(&id);
        match &message {
            FileMessage::Offer(_) if reports.active_part.is_some() => {
                reports.files.insert(id);
            }
            FileMessage::Cancel { .. } => {
                reports.files.remove(&id);
            }
            // Data of a transfer the part does not have (it went): the host was told.
            FileMessage::Data(_) if !known => return true,
            _ => {}
        }
        Self::to_part(&mut reports, &AgentMessage::Files(message))
    }

    fn to_part(reports: &mut Reports, message: &AgentMessage) -> bool {
        let Ok(frame) = encode_to_vec(message) else { return false };
        let Some(part) = reports.active_part.as_ref() else { return false };
        if part.frames.try_send(frame).is_ok() {
            return true;
        }
        // A part that does not read is cut off; its reader ends and withdraws its content.
        let _ = part.stream.shutdown(std::net::Shutdown::Both);
        reports.active_part = None;
        interrupt_files(reports);
        false
    }

    /// A new link to the host: what the clipboard's part copied last is offered again (the
    /// host forgot it with the old link), and the part's transfers of the old link end there
    /// (the host offers them again to resume).
    pub fn new_link(&self) {
        let mut reports = self.lock();
        reports.host_grab = None;
        reports.to_host.retain(|m| matches!(m, AgentMessage::Clipboard(_)));
        for id in std::mem::take(&mut reports.files) {
            let cancel = AgentMessage::Files(FileMessage::Cancel { id, reason: CancelReason::Interrupted });
            if let (Ok(frame), Some(part)) = (encode_to_vec(&cancel), reports.active_part.as_ref()) {
                let _ = part.frames.try_send(frame);
            }
        }
        if let Some(grab) = reports.part_grab.clone() {
            reports.to_host.push_back(grab);
            drop(reports);
            let _ = self.wake.write(1);
        }
    }

    /// The latest report if it changed since the last call.
    pub fn take_change(&self, last_seen: &mut u64) -> Option<SessionState> {
        let reports = self.lock();
        if reports.changes == *last_seen {
            return None;
        }
        *last_seen = reports.changes;
        reports.latest.clone()
    }
}

fn nobody() -> SessionState {
    SessionState { activity: SessionActivity::NoUser, user: String::new(), idle_ms: 0 }
}

/// The user id and name at the other end of `stream`, from the kernel's peer credentials.
fn peer_user(stream: &UnixStream) -> Option<(u32, String)> {
    let creds = nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::PeerCredentials).ok()?;
    let user = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(creds.uid())).ok()??;
    let name =
        Some(user.name).filter(|name| name.len() <= MAX_AGENT_TEXT && !name.chars().any(char::is_control))?;
    Some((creds.uid(), name))
}

/// The user id of the session in the foreground of seat0, as logind says (`None` without
/// logind, or with nobody there).
fn seat_user() -> Option<u32> {
    let ask = |args: &[&str]| {
        let out = Command::new("loginctl").args(args).output().ok()?;
        let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        (out.status.success() && !text.is_empty()).then_some(text)
    };
    let session = ask(&["show-seat", "seat0", "--property=ActiveSession", "--value"])?;
    ask(&["show-session", &session, "--property=User", "--value"])?.parse().ok()
}

/// The active part went: the host hears that its transfers were interrupted (what arrived
/// stays in the user's Downloads for a resume).
fn interrupt_files(reports: &mut Reports) {
    for id in std::mem::take(&mut reports.files) {
        let refused = FileMessage::Refused { id, reason: FileRefuseReason::Interrupted };
        reports.to_host.push_back(AgentMessage::Files(refused));
    }
}

fn message_len(message: &AgentMessage) -> usize {
    match message {
        AgentMessage::Clipboard(ClipboardMessage::Data(d)) => d.bytes.len() + 16,
        _ => 16,
    }
}

/// What the session part's loop waits for.
enum Input {
    /// The session's X clipboard.
    Local(LocalEvent),
    /// The service (the host's clipboard), on connection `generation`.
    Remote(u64, ClipboardMessage),
    /// The service (files the client sends), on connection `generation`.
    Files(u64, FileMessage),
    /// Connection `generation` to the service ended.
    Closed(u64),
}

/// `pleiades-agent session`: reports this graphical session's idle time and lock state to
/// the service, is the guest end of the clipboard, and receives files into `downloads`
/// (default: [`crate::files::download_dir`]), for ever (reconnecting when the service
/// restarts). Without an X display it reports and receives files only.
pub fn run_session_part(socket: &Path, downloads: Option<std::path::PathBuf>) -> ! {
    let mut files = downloads.or_else(crate::files::download_dir).map(Downloads::new);
    if files.is_none() {
        eprintln!("pleiades-agent session: no HOME and no --downloads: files are refused");
    }
    let (inputs, received) = mpsc::channel();
    let clipboard = match X11Clipboard::connect(None, MAX_CLIPBOARD_BYTES as usize) {
        Ok((clipboard, events)) => {
            let inputs = inputs.clone();
            std::thread::spawn(move || {
                for event in events {
                    if inputs.send(Input::Local(event)).is_err() {
                        return;
                    }
                }
            });
            Some(clipboard)
        }
        Err(e) => {
            eprintln!("pleiades-agent session: no clipboard: {e}");
            None
        }
    };
    let mut peer = ClipboardPeer::new(MAX_CLIPBOARD_BYTES as usize);
    let mut stream: Option<UnixStream> = None;
    let mut generation = 0u64;
    let mut warned = false;
    let mut next_report = Instant::now();
    let mut file_answers = Vec::new();
    loop {
        if stream.is_none() {
            stream = UnixStream::connect(socket).ok();
            if let Some(s) = &stream {
                generation += 1;
                spawn_reader(s, generation, inputs.clone());
                if let Some(clipboard) = &clipboard {
                    peer.reconnected(clipboard);
                }
            }
        }
        let mut frames = Vec::new();
        if Instant::now() >= next_report {
            next_report = Instant::now() + REPORT_EVERY;
            let state = SessionState {
                activity: if locked() { SessionActivity::Locked } else { SessionActivity::Active },
                // The service replaces it with the name the kernel gives.
                user: std::env::var("USER").unwrap_or_else(|_| "user".into()),
                idle_ms: idle_ms().unwrap_or(0),
            };
            frames.extend(encode_to_vec(&AgentMessage::SessionState(state)));
        }
        while let Some(message) = peer.poll_transmit() {
            frames.extend(encode_to_vec(&AgentMessage::Clipboard(message)));
        }
        frames.extend(file_answers.drain(..).filter_map(|m| encode_to_vec(&AgentMessage::Files(m)).ok()));
        let sent = match &mut stream {
            Some(s) => frames.iter().all(|frame| s.write_all(frame).is_ok()),
            None => false,
        };
        if !sent {
            stream = None;
            if !warned {
                eprintln!(
                    "pleiades-agent session: the agent service is not reachable at {}",
                    socket.display()
                );
                warned = true;
            }
        }
        let wait = if stream.is_some() {
            next_report.saturating_duration_since(Instant::now())
        } else {
            REPORT_EVERY
        };
        match received.recv_timeout(wait) {
            Ok(Input::Local(event)) => {
                if let Some(clipboard) = &clipboard {
                    peer.on_local(event, clipboard);
                }
            }
            Ok(Input::Remote(from, message)) if from == generation => {
                if let Some(clipboard) = &clipboard {
                    peer.on_remote(message, clipboard);
                }
            }
            Ok(Input::Files(from, message)) if from == generation => match &mut files {
                Some(files) => file_answers.extend(files.handle(message)),
                None if matches!(message, FileMessage::Offer(_)) => file_answers
                    .push(FileMessage::Refused { id: message.id(), reason: FileRefuseReason::Failed }),
                None => {}
            },
            Ok(Input::Closed(from)) if from == generation => {
                stream = None;
                // What arrived stays for a resume; the ids were the old connection's.
                if let Some(files) = &mut files {
                    files.interrupt_all();
                }
                file_answers.clear();
            }
            Ok(_) | Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => unreachable!("this loop holds a sender"),
        }
        while let Some(event) = peer.poll_event() {
            eprintln!("pleiades-agent session: clipboard: {event:?}");
        }
    }
}

/// Reads the service's clipboard and file messages on connection `generation` from a thread.
fn spawn_reader(stream: &UnixStream, generation: u64, inputs: mpsc::Sender<Input>) {
    let Ok(mut stream) = stream.try_clone() else { return };
    std::thread::spawn(move || {
        let mut decoder = StreamDecoder::<AgentMessage>::new();
        let mut buf = vec![0u8; 64 * 1024];
        let mut messages = Vec::new();
        while let Ok(n @ 1..) = stream.read(&mut buf) {
            if decoder.decode_all(&buf[..n], &mut messages).is_err() {
                break;
            }
            for message in messages.drain(..) {
                let input = match message {
                    AgentMessage::Clipboard(message) => Input::Remote(generation, message),
                    AgentMessage::Files(message) => Input::Files(generation, message),
                    _ => continue,
                };
                if inputs.send(input).is_err() {
                    return;
                }
            }
        }
        let _ = inputs.send(Input::Closed(generation));
    });
}

/// Milliseconds since the last input to this X display (`xprintidle`).
fn idle_ms() -> Option<u64> {
    let out = Command::new("xprintidle").output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().parse().ok())?
}

/// Whether this session is locked, as logind sees it: its `LockedHint` (lockers that set it),
/// or the session no longer in the foreground of its seat (light-locker locks by switching to
/// the display manager's greeter).
fn locked() -> bool {
    let Ok(id) = std::env::var("XDG_SESSION_ID") else { return false };
    Command::new("loginctl")
        .args(["show-session", &id, "--property=LockedHint", "--property=Active"])
        .output()
        .is_ok_and(|out| is_locked(&String::from_utf8_lossy(&out.stdout)))
}

/// `loginctl show-session`'s `LockedHint=` and `Active=` lines: locked when hinted or inactive.
fn is_locked(properties: &str) -> bool {
    properties.lines().any(|l| l.trim() == "LockedHint=yes" || l.trim() == "Active=no")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_is_locked_when_logind_hints_it_or_its_greeter_took_the_seat() {
        assert!(!is_locked("LockedHint=no\nActive=yes\n"));
        assert!(is_locked("LockedHint=yes\nActive=yes\n"));
        assert!(is_locked("LockedHint=no\nActive=no\n"));
        assert!(!is_locked(""));
    }

    #[test]
    fn the_latest_session_part_has_the_clipboard_and_takes_its_content_when_it_goes() {
        use pleiades_protocol::wire::{ClipboardFormat, ClipboardRequest};
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("session.sock");
        let reports = SessionReports::listen_with(&socket, Arc::new(|_| true)).unwrap();
        let grab = |serial| {
            AgentMessage::Clipboard(ClipboardMessage::Grab(ClipboardGrab {
                serial,
                formats: vec![ClipboardFormat::Text],
            }))
        };
        let take = |what: &str| {
            pleiades_testkit::wait_for(what, Duration::from_secs(10), || {
                Some(clipboard_only(reports.take_for_host())).filter(|m| !m.is_empty())
            })
            .unwrap()
        };

        let mut first = UnixStream::connect(&socket).unwrap();
        first.write_all(&encode_to_vec(&grab(1)).unwrap()).unwrap();
        assert_eq!(
            take("the first part's copy"),
            [ClipboardMessage::Grab(ClipboardGrab { serial: 1, formats: vec![ClipboardFormat::Text] })]
        );

        // A second session part: the clipboard is its now; the first one's copies are ignored.
        let mut second = UnixStream::connect(&socket).unwrap();
        second.write_all(&encode_to_vec(&grab(7)).unwrap()).unwrap();
        assert!(matches!(
            take("the second part's copy")[..],
            [ClipboardMessage::Grab(ClipboardGrab { serial: 7, .. })]
        ));
        first.write_all(&encode_to_vec(&grab(2)).unwrap()).unwrap();
        // The host's paste request reaches the second part.
        let request =
            ClipboardMessage::Request(ClipboardRequest { serial: 7, format: ClipboardFormat::Text });
        assert!(reports.to_session(&request));
        let mut buf = vec![0u8; 64];
        second.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let n = second.read(&mut buf).unwrap();
        assert_eq!(buf[..n], encode_to_vec(&AgentMessage::Clipboard(request.clone())).unwrap());

        // A new link to the host: the part's copy is offered again.
        reports.new_link();
        assert!(matches!(
            take("the copy again")[..],
            [ClipboardMessage::Grab(ClipboardGrab { serial: 7, .. })]
        ));
        // The host's copy reaches a part that takes the clipboard later.
        let offered =
            ClipboardMessage::Grab(ClipboardGrab { serial: 3, formats: vec![ClipboardFormat::Png] });
        assert!(reports.to_session(&offered));
        let n = second.read(&mut buf).unwrap();
        assert_eq!(buf[..n], encode_to_vec(&AgentMessage::Clipboard(offered.clone())).unwrap());
        let mut third = UnixStream::connect(&socket).unwrap();
        third.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let n = third.read(&mut buf).unwrap();
        assert_eq!(buf[..n], encode_to_vec(&AgentMessage::Clipboard(offered)).unwrap());
        // It goes: what it offered is withdrawn.
        drop(third);
        assert_eq!(
            take("the third part's withdrawal"),
            [ClipboardMessage::Grab(ClipboardGrab { serial: 0, formats: vec![] })]
        );

        // The clipboard's part went: requests find nobody (the older part does not get it back).
        assert!(!reports.to_session(&request));
        drop(second);
    }

    fn clipboard_only(messages: Vec<AgentMessage>) -> Vec<ClipboardMessage> {
        messages
            .into_iter()
            .filter_map(|m| match m {
                AgentMessage::Clipboard(c) => Some(c),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn files_go_to_the_active_part_and_are_interrupted_when_it_goes() {
        use pleiades_protocol::wire::{FileData, FileOffer};
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("session.sock");
        let reports = SessionReports::listen_with(&socket, Arc::new(|_| true)).unwrap();
        let offer = FileMessage::Offer(FileOffer { id: 4, size: 10, sha256: [1; 32], name: "a".into() });
        // No part yet: nobody to receive it.
        assert!(!reports.file_to_session(offer.clone()));
        let mut part = UnixStream::connect(&socket).unwrap();
        part.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        pleiades_testkit::wait_for("the part", Duration::from_secs(10), || {
            reports.lock().active_part.is_some().then_some(())
        })
        .unwrap();
        assert!(reports.file_to_session(offer.clone()));
        let mut buf = vec![0u8; 256];
        let n = part.read(&mut buf).unwrap();
        assert_eq!(buf[..n], encode_to_vec(&AgentMessage::Files(offer)).unwrap());
        // Its answers go to the host; answers about transfers it was not given do not.
        let accept = FileMessage::Accept { id: 4, offset: 0 };
        part.write_all(
            &encode_to_vec(&AgentMessage::Files(FileMessage::Accept { id: 5, offset: 0 })).unwrap(),
        )
        .unwrap();
        part.write_all(&encode_to_vec(&AgentMessage::Files(accept.clone())).unwrap()).unwrap();
        let taken = pleiades_testkit::wait_for("the answer", Duration::from_secs(10), || {
            Some(reports.take_for_host()).filter(|m| !m.is_empty())
        })
        .unwrap();
        assert_eq!(taken, [AgentMessage::Files(accept)]);
        // Data of a transfer that is not the part's is dropped here.
        assert!(reports.file_to_session(FileMessage::Data(FileData { id: 9, offset: 0, bytes: vec![1] })));
        // The part goes: the host hears that transfer 4 was interrupted.
        drop(part);
        let taken = pleiades_testkit::wait_for("the interruption", Duration::from_secs(10), || {
            Some(reports.take_for_host()).filter(|m| m.iter().any(|m| matches!(m, AgentMessage::Files(_))))
        })
        .unwrap();
        assert!(taken.contains(&AgentMessage::Files(FileMessage::Refused {
            id: 4,
            reason: FileRefuseReason::Interrupted
        })));
    }

    #[test]
    fn a_part_of_a_user_not_in_the_seats_foreground_never_has_the_clipboard() {
        use pleiades_protocol::wire::ClipboardFormat;
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("session.sock");
        let reports = SessionReports::listen_with(&socket, Arc::new(|_| false)).unwrap();
        let mut part = UnixStream::connect(&socket).unwrap();
        let grab = ClipboardMessage::Grab(ClipboardGrab { serial: 1, formats: vec![ClipboardFormat::Text] });
        part.write_all(&encode_to_vec(&AgentMessage::Clipboard(grab.clone())).unwrap()).unwrap();
        let state = SessionState { activity: SessionActivity::Active, user: "x".into(), idle_ms: 1 };
        part.write_all(&encode_to_vec(&AgentMessage::SessionState(state)).unwrap()).unwrap();
        // Its report is taken (after its copy, on the same stream); its copy is not.
        let mut seen = 0;
        pleiades_testkit::wait_for("the report", Duration::from_secs(10), || reports.take_change(&mut seen))
            .unwrap();
        assert!(reports.take_for_host().is_empty());
        assert!(!reports.to_session(&grab), "the host's copy reaches no part");
    }

    #[test]
    fn the_kernel_names_the_user_and_a_logout_empties_the_session() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("session.sock");
        let reports = SessionReports::listen(&socket).unwrap();
        let me = peer_user(&UnixStream::pair().unwrap().0).expect("this process's user").1;
        let mut seen = 0;
        assert_eq!(reports.take_change(&mut seen), None);

        let mut part = UnixStream::connect(&socket).unwrap();
        let claim =
            SessionState { activity: SessionActivity::Locked, user: "someone-else".into(), idle_ms: 4200 };
        part.write_all(&encode_to_vec(&AgentMessage::SessionState(claim)).unwrap()).unwrap();
        let state = pleiades_testkit::wait_for("the report", Duration::from_secs(10), || {
            reports.take_change(&mut seen)
        })
        .unwrap();
        assert_eq!(state, SessionState { activity: SessionActivity::Locked, user: me, idle_ms: 4200 });

        // The session part goes away: nobody is logged in.
        drop(part);
        let state = pleiades_testkit::wait_for("the logout", Duration::from_secs(10), || {
            reports.take_change(&mut seen)
        })
        .unwrap();
        assert_eq!(state.activity, SessionActivity::NoUser);

        // A process that sends another message kind is cut off, and the service goes on.
        let mut rogue = UnixStream::connect(&socket).unwrap();
        rogue.write_all(&encode_to_vec(&AgentMessage::LockScreen).unwrap()).unwrap();
        let mut byte = [0u8; 1];
        assert_eq!(rogue.read(&mut byte).unwrap_or(0), 0, "the service closed it");
        let mut part = UnixStream::connect(&socket).unwrap();
        let active = SessionState { activity: SessionActivity::Active, user: "x".into(), idle_ms: 7 };
        part.write_all(&encode_to_vec(&AgentMessage::SessionState(active)).unwrap()).unwrap();
        let state = pleiades_testkit::wait_for("a later report", Duration::from_secs(10), || {
            reports.take_change(&mut seen).filter(|s| s.activity == SessionActivity::Active)
        })
        .unwrap();
        assert_eq!(state.idle_ms, 7);
    }
}
