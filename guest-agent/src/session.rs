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

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use pleiades_protocol::wire::{
    AgentMessage, MAX_AGENT_TEXT, SessionActivity, SessionState, StreamDecoder, encode_to_vec,
};

/// The service's socket for the session parts.
pub const SOCKET: &str = "/run/pleiades-agent/session.sock";
/// How often the session part reports.
pub const REPORT_EVERY: Duration = Duration::from_secs(2);
/// Most session parts connected at once (one per graphical login; a few spare).
const MAX_SESSIONS: usize = 8;

/// What the session parts last reported, shared with the service's vsock loop.
#[derive(Debug, Clone, Default)]
pub struct SessionReports {
    state: Arc<Mutex<Reports>>,
}

#[derive(Debug, Default)]
struct Reports {
    /// The latest report, and a counter bumped by every change the vsock loop has not sent.
    latest: Option<SessionState>,
    changes: u64,
    connected: usize,
}

impl SessionReports {
    /// Listens on `socket` (made world-writable: any local user may report their own session,
    /// named by the kernel) from a new thread.
    pub fn listen(socket: &Path) -> std::io::Result<Self> {
        if let Some(dir) = socket.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let _ = std::fs::remove_file(socket);
        let listener = UnixListener::bind(socket)?;
        std::fs::set_permissions(socket, std::os::unix::fs::PermissionsExt::from_mode(0o666))?;
        let reports = Self::default();
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

    /// Reads one session part's reports until it disconnects or breaks the framing.
    fn serve(&self, mut stream: UnixStream) {
        let user = match peer_user(&stream) {
            Some(user) => user,
            None => return,
        };
        let mut decoder = StreamDecoder::<AgentMessage>::new();
        let mut buf = [0u8; 1024];
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
                        let state = SessionState { user: user.clone(), ..state };
                        let state = if state.activity == SessionActivity::NoUser { nobody() } else { state };
                        let mut reports = self.lock();
                        reports.latest = Some(state);
                        reports.changes += 1;
                    }
                    Ok(Some(_)) => return,
                    Ok(None) => break,
                    Err(_) => return,
                }
            }
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

/// The name of the user at the other end of `stream`, from the kernel's peer credentials.
fn peer_user(stream: &UnixStream) -> Option<String> {
    let creds = nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::PeerCredentials).ok()?;
    let user = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(creds.uid())).ok()??;
    Some(user.name).filter(|name| name.len() <= MAX_AGENT_TEXT && !name.chars().any(char::is_control))
}

/// `pleiades-agent session`: reports this graphical session's idle time and lock state to
/// the service, for ever (reconnecting when the service restarts).
pub fn run_session_part(socket: &Path) -> ! {
    let mut stream: Option<UnixStream> = None;
    let mut warned = false;
    loop {
        let state = SessionState {
            activity: if locked() { SessionActivity::Locked } else { SessionActivity::Active },
            // The service replaces it with the name the kernel gives.
            user: std::env::var("USER").unwrap_or_else(|_| "user".into()),
            idle_ms: idle_ms().unwrap_or(0),
        };
        if stream.is_none() {
            stream = UnixStream::connect(socket).ok();
        }
        let sent = match (&mut stream, encode_to_vec(&AgentMessage::SessionState(state))) {
            (Some(s), Ok(frame)) => s.write_all(&frame).is_ok(),
            _ => false,
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
        std::thread::sleep(REPORT_EVERY);
    }
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
    fn the_kernel_names_the_user_and_a_logout_empties_the_session() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("session.sock");
        let reports = SessionReports::listen(&socket).unwrap();
        let me = peer_user(&UnixStream::pair().unwrap().0).expect("this process's user");
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
