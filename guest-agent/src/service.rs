//! `pleiades-agent run`: the agent's system service. It connects to its VM process over vsock
//! (context id 2, port [`AGENT_PORT`]), says hello, reports the guest's facts
//! ([`guest_facts`]) at once and whenever they change, and carries out what the host
//! asks (lock the screen, shut down, restart). The graphical session's user, lock state and
//! idle time come from the per-user part ([`crate::session`]) and go to the host as they
//! change; so do its clipboard messages, both ways, and the files the client sends (the service
//! only relays them: the session part has the X clipboard and writes the files as the user, the
//! VM process has the policy). It attaches the USB devices the host redirects into the guest
//! ([`crate::usb`]). When the link ends (the VM process restarted
//! its end, or closed it over a protocol error) it connects again after a pause.
//!
//! The protocol is [`pleiades_protocol::agent`]; this module is only its I/O and the guest's
//! side effects.

use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsFd;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{AddressFamily, SockFlag, SockType, VsockAddr, connect, setsockopt, socket, sockopt};
use nix::sys::time::TimeVal;
use pleiades_protocol::agent::{AGENT_PORT, AgentEvent, AgentLink};
use pleiades_protocol::wire::{
    AgentMessage, ClipboardMessage, ClipboardRefused, FileMessage, FileRefuseReason, GuestInfo,
    MAX_ADDRESS_LEN, MAX_ADDRESSES, MAX_AGENT_TEXT, PowerAction, RefuseReason,
};

use crate::session::SessionReports;

/// The host's vsock context id.
const HOST_CID: u32 = 2;
/// How often the facts are read again (and sent if they changed).
const REFRESH: Duration = Duration::from_secs(5);
/// Pauses between connection attempts: doubling from the first to the last.
const RETRY_FIRST: Duration = Duration::from_millis(250);
const RETRY_LAST: Duration = Duration::from_secs(5);

/// What to run for the host's requests: command lines inside the guest (a program and its
/// arguments, split on white space).
#[derive(Debug, Clone)]
pub struct Actions {
    pub poweroff: String,
    pub reboot: String,
    /// Locks the graphical session's screen; `None` where the guest has no lock (the test image).
    pub lock: Option<String>,
    /// Unlocks it.
    pub unlock: Option<String>,
}

/// Runs the service: connects, serves the link, and connects again, for ever.
pub fn run(root: &Path, actions: &Actions, sessions: Option<&SessionReports>) -> ! {
    let mut pause = RETRY_FIRST;
    loop {
        match connect_host() {
            Ok(stream) => {
                pause = RETRY_FIRST;
                match serve(stream, root, actions, sessions) {
                    Ok(()) => eprintln!("pleiades-agent: the host closed the link; connecting again"),
                    Err(e) => eprintln!("pleiades-agent: the link ended: {e}; connecting again"),
                }
            }
            Err(e) if pause == RETRY_FIRST => {
                eprintln!("pleiades-agent: cannot reach the host over vsock: {e}")
            }
            Err(_) => {}
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(RETRY_LAST);
    }
}

/// A stream to the VM process, with a read timeout so the service can refresh between reads.
fn connect_host() -> std::io::Result<File> {
    let fd = socket(AddressFamily::Vsock, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &VsockAddr::new(HOST_CID, AGENT_PORT))?;
    setsockopt(&fd.as_fd(), sockopt::ReceiveTimeout, &TimeVal::new(1, 0))?;
    Ok(File::from(fd))
}

/// Serves one link until it ends: `Ok` when the host closed it.
fn serve(
    mut stream: File,
    root: &Path,
    actions: &Actions,
    sessions: Option<&SessionReports>,
) -> Result<(), String> {
    let mut link = AgentLink::new(env!("CARGO_PKG_VERSION")).map_err(|e| e.to_string())?;
    if let Some(sessions) = sessions {
        sessions.new_link();
    }
    let mut facts = guest_facts(root);
    link.guest_info(facts.clone()).map_err(|e| e.to_string())?;
    let mut refreshed = Instant::now();
    // A new link hears the latest session report at once.
    let mut session_seen = u64::MAX;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let out = link.take_output();
        stream.write_all(&out).map_err(|e| format!("cannot write to the host: {e}"))?;
        let (readable, woken) = wait(&stream, sessions);
        let read = if readable { stream.read(&mut buf) } else { Err(ErrorKind::WouldBlock.into()) };
        match read {
            Ok(0) => return Ok(()),
            Ok(n) => {
                for event in link.receive(&buf[..n]).map_err(|e| e.to_string())? {
                    match event {
                        AgentEvent::Clipboard(message) => {
                            if let Some(refused) = to_session(sessions, message) {
                                link.clipboard(refused).map_err(|e| e.to_string())?;
                            }
                        }
                        AgentEvent::Files(message) => {
                            if let Some(refused) = file_to_session(sessions, message) {
                                link.files(refused).map_err(|e| e.to_string())?;
                            }
                        }
                        AgentEvent::UsbAttach { id, token, speed } => {
                            let result = crate::usb::attach(&crate::usb::vhci_dir(), id, token, speed);
                            match &result {
                                Ok(port) => {
                                    eprintln!("pleiades-agent: USB device {id} attached on port {port}")
                                }
                                Err(e) => eprintln!("pleiades-agent: USB device {id} not attached: {e}"),
                            }
                            let result = result.map_err(|e| clip(&e, MAX_AGENT_TEXT));
                            link.usb_attached(id, result).map_err(|e| e.to_string())?;
                        }
                        event => act(event, actions),
                    }
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(format!("cannot read from the host: {e}")),
        }
        if let Some(sessions) = sessions.filter(|_| woken) {
            for message in sessions.take_for_host() {
                match message {
                    AgentMessage::Files(message) => link.files(message),
                    AgentMessage::Clipboard(message) => link.clipboard(message),
                    _ => Ok(()),
                }
                .map_err(|e| e.to_string())?;
            }
        }
        if let Some(state) = sessions.and_then(|s| s.take_change(&mut session_seen)) {
            link.session_state(state).map_err(|e| e.to_string())?;
        }
        if refreshed.elapsed() >= REFRESH {
            refreshed = Instant::now();
            let now = guest_facts(root);
            if now != facts {
                link.guest_info(now.clone()).map_err(|e| e.to_string())?;
                facts = now;
            }
        }
    }
}

/// Waits up to a second for the host's bytes or the session part's clipboard; says which came.
fn wait(stream: &File, sessions: Option<&SessionReports>) -> (bool, bool) {
    let mut fds = vec![PollFd::new(stream.as_fd(), PollFlags::POLLIN)];
    if let Some(sessions) = sessions {
        fds.push(PollFd::new(sessions.wake_fd(), PollFlags::POLLIN));
    }
    if poll(&mut fds, PollTimeout::from(1000u16)).is_err() {
        return (false, false);
    }
    let ready = |fd: &PollFd| fd.revents().is_some_and(|r| !r.is_empty());
    (ready(&fds[0]), fds.get(1).is_some_and(ready))
}

/// Passes the host's clipboard message to the graphical session; a paste request that finds
/// no session is answered here (`Some`: the refusal to send back).
fn to_session(sessions: Option<&SessionReports>, message: ClipboardMessage) -> Option<ClipboardMessage> {
    if sessions.is_some_and(|s| s.to_session(&message)) {
        return None;
    }
    match message {
        ClipboardMessage::Request(r) => Some(ClipboardMessage::Refused(ClipboardRefused {
            serial: r.serial,
            format: r.format,
            reason: RefuseReason::Gone,
        })),
        _ => None,
    }
}

/// Passes the host's file message to the graphical session's part, which writes the file as
/// its user; an offer that finds no session is refused here (`Some`: the refusal to send back).
fn file_to_session(sessions: Option<&SessionReports>, message: FileMessage) -> Option<FileMessage> {
    let id = message.id();
    let offer = matches!(message, FileMessage::Offer(_));
    if sessions.is_some_and(|s| s.file_to_session(message)) || !offer {
        return None;
    }
    Some(FileMessage::Refused { id, reason: FileRefuseReason::NoSession })
}

fn act(event: AgentEvent, actions: &Actions) {
    let command = match event {
        AgentEvent::Welcomed { version } => {
            eprintln!("pleiades-agent: connected to the host (agent channel version {version})");
            return;
        }
        AgentEvent::LockScreen => actions.lock.as_deref(),
        AgentEvent::UnlockScreen => actions.unlock.as_deref(),
        AgentEvent::Power(PowerAction::Shutdown) => Some(actions.poweroff.as_str()),
        AgentEvent::Power(PowerAction::Reboot) => Some(actions.reboot.as_str()),
        AgentEvent::Clipboard(_) | AgentEvent::Files(_) | AgentEvent::UsbAttach { .. } => return,
    };
    let mut words = command.unwrap_or_default().split_whitespace();
    let Some(program) = words.next() else {
        eprintln!("pleiades-agent: the host asked for {event:?}; this guest has no command for it");
        return;
    };
    eprintln!("pleiades-agent: the host asked for {event:?}: running {}", command.unwrap_or_default());
    match Command::new(program).args(words).spawn() {
        // Reaped by a thread: a lock command may run for as long as the lock holds.
        Ok(mut child) => drop(std::thread::spawn(move || child.wait())),
        Err(e) => eprintln!("pleiades-agent: cannot run {program}: {e}"),
    }
}

/// The guest's facts as the agent reports them: host name, OS, kernel release and addresses,
/// read under `root` (`/` in a guest); what cannot be read is left empty, and everything is
/// clipped to the protocol's limits.
pub fn guest_facts(root: &Path) -> GuestInfo {
    let read = |path: &str| std::fs::read_to_string(root.join(path)).unwrap_or_default();
    GuestInfo {
        hostname: clip(read("proc/sys/kernel/hostname").trim(), MAX_AGENT_TEXT),
        os: clip(&pretty_name(&read("etc/os-release")).unwrap_or_else(|| "Linux".into()), MAX_AGENT_TEXT),
        kernel: clip(read("proc/sys/kernel/osrelease").trim(), MAX_AGENT_TEXT),
        addresses: if root == Path::new("/") { addresses() } else { Vec::new() },
    }
}

/// `PRETTY_NAME` from an os-release text, unquoted.
fn pretty_name(os_release: &str) -> Option<String> {
    let value = os_release.lines().find_map(|l| l.strip_prefix("PRETTY_NAME="))?;
    Some(value.trim().trim_matches('"').trim_matches('\'').to_owned()).filter(|v| !v.is_empty())
}

/// `text` without control characters, at most `max` bytes (on a character boundary).
fn clip(text: &str, max: usize) -> String {
    let mut out: String = text.chars().filter(|c| !c.is_control()).collect();
    while out.len() > max {
        out.pop();
    }
    out
}

/// The interfaces' addresses with prefix length, loopback and link-local IPv6 left out.
fn addresses() -> Vec<String> {
    let Ok(interfaces) = nix::ifaddrs::getifaddrs() else { return Vec::new() };
    let mut out = Vec::new();
    for interface in interfaces {
        let (Some(address), netmask) = (interface.address, interface.netmask) else { continue };
        let text = if let Some(v4) = address.as_sockaddr_in() {
            let ip = v4.ip();
            if ip.is_loopback() {
                continue;
            }
            let prefix = netmask.and_then(|m| m.as_sockaddr_in().map(|m| m.ip().to_bits().count_ones()));
            format!("{ip}/{}", prefix.unwrap_or(32))
        } else if let Some(v6) = address.as_sockaddr_in6() {
            let ip = v6.ip();
            if ip.is_loopback() || ip.is_unicast_link_local() {
                continue;
            }
            let prefix = netmask.and_then(|m| m.as_sockaddr_in6().map(|m| m.ip().to_bits().count_ones()));
            format!("{ip}/{}", prefix.unwrap_or(128))
        } else {
            continue;
        };
        if text.len() <= MAX_ADDRESS_LEN && out.len() < MAX_ADDRESSES && !out.contains(&text) {
            out.push(text);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn facts_come_from_the_guests_files() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("proc/sys/kernel")).unwrap();
        std::fs::create_dir_all(root.path().join("etc")).unwrap();
        std::fs::write(root.path().join("proc/sys/kernel/hostname"), "desk-7\n").unwrap();
        std::fs::write(root.path().join("proc/sys/kernel/osrelease"), "6.12.57+deb13-amd64\n").unwrap();
        std::fs::write(
            root.path().join("etc/os-release"),
            "NAME=\"Debian GNU/Linux\"\nPRETTY_NAME=\"Debian GNU/Linux 13 (trixie)\"\nID=debian\n",
        )
        .unwrap();
        let facts = guest_facts(root.path());
        assert_eq!(facts.hostname, "desk-7");
        assert_eq!(facts.os, "Debian GNU/Linux 13 (trixie)");
        assert_eq!(facts.kernel, "6.12.57+deb13-amd64");
        // Without os-release (the busybox test image) the OS is plain Linux.
        std::fs::remove_file(root.path().join("etc/os-release")).unwrap();
        assert_eq!(guest_facts(root.path()).os, "Linux");
    }

    #[test]
    fn text_is_clipped_to_the_protocols_limits() {
        assert_eq!(clip("a\u{7}b\n", 10), "ab");
        assert_eq!(clip(&"é".repeat(200), 255).len(), 254, "clipped on a character boundary");
        assert_eq!(pretty_name("PRETTY_NAME='Alpine'"), Some("Alpine".into()));
        assert_eq!(pretty_name("PRETTY_NAME=\"\""), None);
    }

    #[test]
    fn this_machines_addresses_fit_the_protocol() {
        // Whatever this machine has, the facts must encode.
        let info = GuestInfo { addresses: addresses(), ..guest_facts(Path::new("/")) };
        let mut link = AgentLink::new("test").unwrap();
        link.guest_info(info).unwrap();
    }
}
