//! The guest agent's link in the VM process: a thread that listens on the guest's vsock (port
//! [`AGENT_PORT`], in this process's own muxer, so no other guest can reach it), runs one
//! [`HostLink`] per agent connection and keeps what the agent last said ([`AgentStatus`], shown
//! in `pleiades-host ctl status` under `agent`).
//!
//! One agent connection at a time: a new one (the agent restarted, or reconnected after this
//! link failed) replaces the old. A link that breaks the protocol is closed and its error kept
//! in the status; the agent's own retry brings it back.
//!
//! The same thread runs the clipboard relay ([`ClipboardRelay`]) between the session's client
//! (attached through [`ClipboardPort`]) and the guest session behind the agent, with the
//! desktop's clipboard policy (`run --clipboard`): what the policy denies never leaves this
//! process, and each denial is counted in the status (`clipboard`) and logged, which is how the
//! broker learns of it and audits it. So does the file relay ([`FileRelay`]): files the
//! session's client sends go to the guest's agent as the pool allows (`run --file-transfer`),
//! within the transfer window, counted in the status (`files`). And the USB relay
//! ([`UsbRelay`]): the client's devices, as the pool allows (`run --usb`), attached by the
//! agent to the guest kernel's `vhci-hcd` over streams of their own ([`super::usb`]), every
//! attach and refusal logged and counted (`usb`).

use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use pleiades_control::RelayPort;
use pleiades_protocol::agent::{AGENT_PORT, HostEvent, HostLink};
use pleiades_protocol::clipboard::{ClipboardPolicy, ClipboardRelay, Direction, End, RelayEvent};
use pleiades_protocol::files::{FileEvent, FileRelay};
use pleiades_protocol::usb::{UsbEvent, UsbOut, UsbPolicy, UsbRelay};
use pleiades_protocol::wire::{
    ClipboardMessage, FILE_WINDOW, FileMessage, MAX_CLIPBOARD_BYTES, MAX_FILE_TRANSFERS, PowerAction,
    SessionActivity, UsbMessage,
};
use pleiades_virtio::vsock::VsockHandle;
use pleiades_virtio::vsock::muxer::{ConnKey, Event};
use serde::Serialize;

use super::usb::UsbStreams;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

/// The guest context id every Pleiades guest has: its vsock ends in its own VM process, so
/// guests never share a context id space and need no host-wide allocation.
pub const GUEST_CID: u64 = 3;
/// How often the thread lets the muxer's clock run its timeouts.
const TICK: Duration = Duration::from_secs(1);
/// Bytes waiting for the guest's credit beyond this end the link (a guest that never reads):
/// one clipboard content (the relay passes a paste on as it arrives), every file transfer's
/// window, and some room.
const MAX_PENDING_OUT: usize =
    MAX_CLIPBOARD_BYTES as usize + MAX_FILE_TRANSFERS * FILE_WINDOW as usize + 256 * 1024;
/// How long a guest has to start a shutdown or restart its agent was asked for (its agent's
/// link closes as the guest goes down) before the VMM's own way is used.
pub const POWER_GRACE: Duration = Duration::from_secs(20);

/// What the guest's agent last said, for status reports.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct AgentStatus {
    pub connected: bool,
    /// The agent channel version in use.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent_version: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub os: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel: Option<String>,
    pub addresses: Vec<String>,
    /// `no-user`, `active` or `locked`, once the agent reported a session.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// The guest user's idle time when the agent last reported it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle_ms: Option<u64>,
    /// Agent connections so far (a restarted agent counts again).
    pub connections: u64,
    /// Why the last link was closed by this side, if it was.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    pub clipboard: ClipboardStatus,
    pub files: FileStatus,
    pub usb: UsbStatus,
}

/// The USB relay's policy, its devices and what went through it.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct UsbStatus {
    /// The policy (`none` until the VM process sets it; see `run --usb`).
    pub policy: String,
    /// The devices redirected now.
    pub devices: Vec<UsbDeviceStatus>,
    /// Devices attached in the guest so far (the broker audits each).
    pub attached: u64,
    /// Devices the policy refused (the broker audits each increase).
    pub denied: u64,
    /// Attaches that failed, and devices unplugged over a broken protocol.
    pub failed: u64,
    pub bytes_to_guest: u64,
    pub bytes_from_guest: u64,
}

/// One redirected device.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct UsbDeviceStatus {
    pub id: u32,
    /// `vvvv:pppp`.
    pub usb_id: String,
    pub name: String,
    /// Its classes (the device's and its interfaces'), in hex.
    pub classes: Vec<String>,
    /// In the guest (else the attach is under way).
    pub attached: bool,
}

/// The file relay's policy and what went through it.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct FileStatus {
    /// The policy: may the client send files into the guest (off until the VM process sets it).
    pub allowed: bool,
    /// Offers the policy refused (the broker audits each increase).
    pub denied: u64,
    /// Files that arrived whole in the guest, their SHA-256 checked.
    pub completed: u64,
    /// Transfers that ended otherwise (interrupted ones resume when offered again).
    pub failed: u64,
    /// Bytes relayed to the guest.
    pub bytes_to_guest: u64,
    /// Transfers in progress.
    pub in_progress: u64,
}

/// The clipboard's policy and what went through it (or did not).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ClipboardStatus {
    /// The policy: may content copied on the client be pasted in the guest, and the other way.
    pub to_guest: bool,
    pub from_guest: bool,
    /// Copies the policy kept on their side, per direction (the broker audits each increase).
    pub denied_to_guest: u64,
    pub denied_from_guest: u64,
    /// Pastes that crossed, and their bytes.
    pub pasted_to_guest: u64,
    pub pasted_from_guest: u64,
    pub bytes_to_guest: u64,
    pub bytes_from_guest: u64,
}

impl Default for ClipboardStatus {
    /// Off both ways until the VM process sets the desktop's policy.
    fn default() -> Self {
        Self {
            to_guest: false,
            from_guest: false,
            denied_to_guest: 0,
            denied_from_guest: 0,
            pasted_to_guest: 0,
            pasted_from_guest: 0,
            bytes_to_guest: 0,
            bytes_from_guest: 0,
        }
    }
}

/// What takes a relay's messages for the session's client.
type ClientSink<M> = Box<dyn Fn(M) + Send + Sync>;

/// What a session asks of one of the relays ([`RelayPort`]).
enum PortRequest<M> {
    Attach { session: u64, sink: ClientSink<M> },
    ClientSent { session: u64, message: M },
    Detach { session: u64 },
}

/// What that means for the relay, given the session attached now.
enum ClientChange<M> {
    /// A client end (a new session's, replacing any other).
    Connected {
        replaced: bool,
    },
    Sent(M),
    Disconnected,
}

impl<M> PortRequest<M> {
    /// Applies the request to `client` (the session attached now); a late message or detach of
    /// a replaced session changes nothing.
    fn apply(self, client: &mut Option<(u64, ClientSink<M>)>) -> Option<ClientChange<M>> {
        let current = |client: &Option<(u64, ClientSink<M>)>, session| {
            client.as_ref().is_some_and(|(current, _)| *current == session)
        };
        match self {
            PortRequest::Attach { session, sink } => {
                let replaced = client.replace((session, sink)).is_some();
                Some(ClientChange::Connected { replaced })
            }
            PortRequest::ClientSent { session, message } => {
                current(client, session).then_some(ClientChange::Sent(message))
            }
            PortRequest::Detach { session } => current(client, session).then(|| {
                *client = None;
                ClientChange::Disconnected
            }),
        }
    }
}

impl<M> ClientChange<M> {
    fn apply_to(self, relay: &mut impl RelayEnds<M>) {
        match self {
            ClientChange::Connected { replaced } => {
                if replaced {
                    relay.disconnected(End::Client);
                }
                relay.connected(End::Client);
            }
            ClientChange::Sent(message) => relay.receive(End::Client, message),
            ClientChange::Disconnected => relay.disconnected(End::Client),
        }
    }
}

/// The clipboard's and the files' relays, as a session's client end changes them.
trait RelayEnds<M> {
    fn connected(&mut self, end: End);
    fn disconnected(&mut self, end: End);
    fn receive(&mut self, end: End, message: M);
}

/// Both relays have the same three methods under these names.
macro_rules! relay_ends {
    ($relay:ty, $message:ty) => {
        impl RelayEnds<$message> for $relay {
            fn connected(&mut self, end: End) {
                <$relay>::connected(self, end);
            }
            fn disconnected(&mut self, end: End) {
                <$relay>::disconnected(self, end);
            }
            fn receive(&mut self, end: End, message: $message) {
                <$relay>::from_end(self, end, message);
            }
        }
    };
}

relay_ends!(ClipboardRelay, ClipboardMessage);
relay_ends!(FileRelay, FileMessage);

impl RelayEnds<UsbMessage> for UsbRelay {
    fn connected(&mut self, _: End) {
        self.client_connected();
    }
    fn disconnected(&mut self, _: End) {
        self.client_disconnected();
    }
    fn receive(&mut self, _: End, message: UsbMessage) {
        self.from_client(message);
    }
}

enum Request {
    LockScreen,
    UnlockScreen,
    Power(PowerAction),
    ClipboardPolicy(ClipboardPolicy),
    Clipboard(PortRequest<ClipboardMessage>),
    FilePolicy(bool),
    Files(PortRequest<FileMessage>),
    UsbPolicy(UsbPolicy),
    Usb(PortRequest<UsbMessage>),
}

/// The VM process's handle on its guest agent.
#[derive(Debug, Clone)]
pub struct Agent {
    status: Arc<Mutex<AgentStatus>>,
    requests: Sender<Request>,
    wake: Arc<EventFd>,
    /// Lock the guest's screen while no client is connected (`run --lock-on-disconnect`).
    lock_on_disconnect: Arc<std::sync::atomic::AtomicBool>,
}

impl Agent {
    /// Listens for the agent on `vsock` from a new thread.
    pub fn start(vsock: VsockHandle) -> Result<Self> {
        let status = Arc::new(Mutex::new(AgentStatus::default()));
        let wake = Arc::new(EventFd::new(EFD_NONBLOCK).context("cannot create an eventfd")?);
        let (requests, received) = mpsc::channel();
        let events = vsock.events().context("cannot watch the vsock device")?;
        vsock.listen(AGENT_PORT);
        UsbStreams::listen(&vsock);
        let random = ring::rand::SystemRandom::new();
        let mut worker = Worker {
            vsock,
            status: status.clone(),
            conn: None,
            received,
            // Nothing crosses until the policy is set (`set_clipboard_policy`; `run` sets it
            // before the guest can speak): the safe default.
            relay: ClipboardRelay::new(ClipboardPolicy::NONE),
            client: None,
            // The same for files (`set_file_transfer`).
            files: FileRelay::new(false),
            files_client: None,
            // And for USB (`set_usb_policy`). The tokens that prove a guest stream's device.
            usb: UsbRelay::new(
                UsbPolicy::NONE,
                Box::new(move || {
                    ring::rand::generate::<[u8; 8]>(&random).map_or(0, |t| u64::from_le_bytes(t.expose()))
                }),
            ),
            usb_client: None,
            usb_streams: UsbStreams::default(),
        };
        let thread_wake = wake.clone();
        std::thread::Builder::new()
            .name("agent".into())
            .spawn(move || {
                if let Err(e) = worker.run(&events, &thread_wake) {
                    tracing::error!("the guest agent link stopped: {e:#}");
                }
            })
            .context("cannot start the agent thread")?;
        Ok(Self { status, requests, wake, lock_on_disconnect: Default::default() })
    }

    /// What the agent last said.
    pub fn status(&self) -> AgentStatus {
        lock(&self.status).clone()
    }

    /// Asks the guest to lock its screen; `false` when no agent is connected.
    pub fn lock_screen(&self) -> bool {
        self.request(Request::LockScreen)
    }

    /// Asks the guest to unlock its screen; `false` when no agent is connected.
    pub fn unlock_screen(&self) -> bool {
        self.request(Request::UnlockScreen)
    }

    /// Locks the guest's screen whenever the session's client leaves, and unlocks it when a
    /// client with a ticket for this desktop arrives (the broker gives those only to the
    /// desktop's user): the pool's lock-on-disconnect policy.
    pub fn set_lock_on_disconnect(&self, on: bool) {
        self.lock_on_disconnect.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// The session server took a client.
    pub fn client_arrived(&self) {
        if self.lock_on_disconnect.load(std::sync::atomic::Ordering::Relaxed) && self.unlock_screen() {
            tracing::info!("a client arrived: the guest's screen is unlocked");
        }
    }

    /// The session's client left.
    pub fn client_left(&self) {
        if self.lock_on_disconnect.load(std::sync::atomic::Ordering::Relaxed) && self.lock_screen() {
            tracing::info!("the client left: the guest's screen is locked");
        }
    }

    /// Sets which ways the clipboard may carry content (the pool's policy).
    pub fn set_clipboard_policy(&self, policy: ClipboardPolicy) {
        {
            let mut status = lock(&self.status);
            status.clipboard.to_guest = policy.to_guest;
            status.clipboard.from_guest = policy.from_guest;
        }
        self.queue(Request::ClipboardPolicy(policy));
    }

    /// Sets whether the client may send files into the guest (the pool's policy).
    pub fn set_file_transfer(&self, allowed: bool) {
        lock(&self.status).files.allowed = allowed;
        self.queue(Request::FilePolicy(allowed));
    }

    /// Sets which USB devices the client may redirect into the guest (the pool's policy).
    pub fn set_usb_policy(&self, policy: UsbPolicy) {
        lock(&self.status).usb.policy = policy.to_string();
        self.queue(Request::UsbPolicy(policy));
    }

    /// Asks the guest to shut down or restart; `false` when no agent is connected.
    pub fn power(&self, action: PowerAction) -> bool {
        self.request(Request::Power(action))
    }

    /// Asks the guest through its agent first, as a user's own shutdown would go (the desktop
    /// closes its session, services stop in order); if the agent's link is still the same one
    /// after [`POWER_GRACE`] (the guest did not go down), runs `fallback` (the ACPI power
    /// button, a reset). `false`, with nothing run, when no agent is connected.
    pub fn power_then(&self, action: PowerAction, fallback: impl FnOnce() + Send + 'static) -> bool {
        let before = self.status().connections;
        if !self.power(action) {
            return false;
        }
        let status = self.status.clone();
        let spawned = std::thread::Builder::new().name("agent-power".into()).spawn(move || {
            std::thread::sleep(POWER_GRACE);
            let same_link = {
                let now = lock(&status);
                now.connected && now.connections == before
            };
            if same_link {
                tracing::warn!("the guest did not act on the agent's {action:?} within {POWER_GRACE:?}; using the VMM's own");
                fallback();
            }
        });
        spawned.is_ok()
    }

    fn request(&self, request: Request) -> bool {
        if !lock(&self.status).connected {
            return false;
        }
        self.queue(request)
    }

    fn queue(&self, request: Request) -> bool {
        let sent = self.requests.send(request).is_ok();
        let _ = self.wake.write(1);
        sent
    }
}

/// A session's side of each relay: its requests, queued for the agent thread under the
/// relay's [`Request`] variant.
macro_rules! relay_port {
    ($message:ty, $variant:ident) => {
        impl RelayPort<$message> for Agent {
            fn attach(&self, session: u64, to_client: ClientSink<$message>) {
                self.queue(Request::$variant(PortRequest::Attach { session, sink: to_client }));
            }

            fn client_sent(&self, session: u64, message: $message) {
                self.queue(Request::$variant(PortRequest::ClientSent { session, message }));
            }

            fn detach(&self, session: u64) {
                self.queue(Request::$variant(PortRequest::Detach { session }));
            }
        }
    };
}

relay_port!(ClipboardMessage, Clipboard);
relay_port!(FileMessage, Files);
relay_port!(UsbMessage, Usb);

fn lock(status: &Mutex<AgentStatus>) -> MutexGuard<'_, AgentStatus> {
    status.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// One agent connection.
struct Connection {
    key: ConnKey,
    link: HostLink,
    /// Bytes for the agent that its credit did not let through yet.
    pending: std::collections::VecDeque<u8>,
}

struct Worker {
    vsock: VsockHandle,
    status: Arc<Mutex<AgentStatus>>,
    conn: Option<Connection>,
    received: Receiver<Request>,
    relay: ClipboardRelay,
    /// The session whose client is the relay's client end.
    client: Option<(u64, ClientSink<ClipboardMessage>)>,
    files: FileRelay,
    files_client: Option<(u64, ClientSink<FileMessage>)>,
    usb: UsbRelay,
    usb_client: Option<(u64, ClientSink<UsbMessage>)>,
    usb_streams: UsbStreams,
}

impl Worker {
    fn run(&mut self, events: &EventFd, wake: &EventFd) -> Result<()> {
        let epoll = Epoll::new().context("cannot create an epoll")?;
        for (fd, token) in [(events, 0u64), (wake, 1)] {
            use std::os::fd::AsRawFd;
            epoll
                .ctl(ControlOperation::Add, fd.as_raw_fd(), EpollEvent::new(EventSet::IN, token))
                .context("cannot watch an eventfd")?;
        }
        let mut ready = [EpollEvent::default(); 2];
        let mut next_tick = Instant::now() + TICK;
        loop {
            let timeout = next_tick.saturating_duration_since(Instant::now());
            match epoll.wait(i32::try_from(timeout.as_millis()).unwrap_or(1000), &mut ready) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e).context("waiting for the vsock device"),
            }
            let _ = wake.read();
            // This process's own requests first: a policy set before the guest spoke applies
            // to what it says.
            loop {
                match self.received.try_recv() {
                    Ok(request) => self.on_request(request),
                    Err(TryRecvError::Empty) => break,
                    // The VM's controller is gone: the VM is ending.
                    Err(TryRecvError::Disconnected) => return Ok(()),
                }
            }
            while let Some(event) = self.vsock.poll_event() {
                self.on_event(event);
            }
            if Instant::now() >= next_tick {
                self.usb.tick();
                self.pump_relay();
                self.vsock.tick();
                next_tick = Instant::now() + TICK;
            }
        }
    }

    fn on_event(&mut self, event: Event) {
        if self.usb_streams.on_event(event, &self.vsock, &mut self.usb) {
            self.pump_relay();
            return self.flush();
        }
        match event {
            Event::Accepted(key) if key.host_port == AGENT_PORT => {
                if let Some(old) = self.conn.take() {
                    tracing::info!("the guest agent connected again; closing its previous link");
                    self.vsock.close(old.key);
                    self.guest_gone();
                }
                self.conn = Some(Connection { key, link: HostLink::new(), pending: Default::default() });
                let mut status = lock(&self.status);
                status.connections += 1;
                status.connected = false;
            }
            Event::Readable(key) if self.is_current(key) => self.read(key),
            Event::Writable(key) if self.is_current(key) => self.flush(),
            Event::Closed(key) if self.is_current(key) => {
                self.conn = None;
                lock(&self.status).connected = false;
                self.guest_gone();
                tracing::info!("the guest agent disconnected");
            }
            // Connections to other ports are the muxer's business (it refuses them), and
            // events of a replaced connection no longer matter.
            _ => {}
        }
    }

    fn is_current(&self, key: ConnKey) -> bool {
        self.conn.as_ref().is_some_and(|c| c.key == key)
    }

    fn read(&mut self, key: ConnKey) {
        let mut buf = [0u8; 16 * 1024];
        loop {
            let n = match self.vsock.recv(key, &mut buf) {
                Ok(n) => n,
                Err(e) => return self.fail(&e.to_string()),
            };
            if n == 0 {
                if self.vsock.at_end(key) {
                    // The agent will not say more: close our side too.
                    self.vsock.close(key);
                    self.conn = None;
                    lock(&self.status).connected = false;
                    self.guest_gone();
                }
                break;
            }
            let Some(conn) = self.conn.as_mut() else { return };
            match conn.link.receive(&buf[..n]) {
                Ok(events) => {
                    for event in events {
                        match event {
                            HostEvent::Clipboard(message) => self.relay.from_end(End::Guest, message),
                            HostEvent::Files(message) => self.files.from_end(End::Guest, message),
                            HostEvent::Connected { .. } => {
                                apply(&mut lock(&self.status), event);
                                self.relay.connected(End::Guest);
                                self.files.connected(End::Guest);
                                self.usb.agent_connected(true);
                            }
                            HostEvent::UsbAttached { id, port } => self.usb.agent_answered(id, Ok(port)),
                            HostEvent::UsbFailed { id, reason } => self.usb.agent_answered(id, Err(reason)),
                            event => apply(&mut lock(&self.status), event),
                        }
                    }
                }
                Err(e) => return self.fail(&format!("the agent broke the protocol: {e}")),
            }
            self.pump_relay();
        }
        self.flush();
    }

    /// The agent's link is gone: the relay's guest end with it.
    fn guest_gone(&mut self) {
        self.relay.disconnected(End::Guest);
        self.files.disconnected(End::Guest);
        self.usb.agent_connected(false);
        self.pump_relay();
    }

    /// Sends what the relays have for each end and counts what happened.
    fn pump_relay(&mut self) {
        self.pump_files();
        self.pump_usb();
        let Self { relay, client, conn, .. } = self;
        deliver(std::iter::from_fn(|| relay.poll_transmit()), client, conn, HostLink::clipboard, "clipboard");
        while let Some(event) = self.relay.poll_event() {
            let mut status = lock(&self.status);
            let counts = &mut status.clipboard;
            match event {
                RelayEvent::Denied { direction, formats } => {
                    let count = match direction {
                        Direction::ToGuest => &mut counts.denied_to_guest,
                        Direction::FromGuest => &mut counts.denied_from_guest,
                    };
                    *count += 1;
                    // The 1st, 2nd, 4th, 8th…: a side that copies in a loop does not flood the log.
                    if count.is_power_of_two() {
                        tracing::warn!(
                            direction = direction.as_str(),
                            ?formats,
                            denied = *count,
                            "clipboard: a copy {} was kept back by the desktop's policy",
                            direction.as_str()
                        );
                    }
                }
                RelayEvent::Transferred { direction, format, bytes } => {
                    tracing::info!(direction = direction.as_str(), ?format, bytes, "clipboard: pasted");
                    match direction {
                        Direction::ToGuest => {
                            counts.pasted_to_guest += 1;
                            counts.bytes_to_guest += u64::from(bytes);
                        }
                        Direction::FromGuest => {
                            counts.pasted_from_guest += 1;
                            counts.bytes_from_guest += u64::from(bytes);
                        }
                    }
                }
            }
        }
    }

    fn on_request(&mut self, request: Request) {
        let mut result = Ok(());
        match request {
            Request::ClipboardPolicy(policy) => self.relay.set_policy(policy),
            Request::FilePolicy(allowed) => self.files.set_allowed(allowed),
            Request::Clipboard(request) => {
                let Some(change) = request.apply(&mut self.client) else { return };
                change.apply_to(&mut self.relay);
            }
            Request::Files(request) => {
                let Some(change) = request.apply(&mut self.files_client) else { return };
                change.apply_to(&mut self.files);
            }
            Request::UsbPolicy(policy) => self.usb.set_policy(policy),
            Request::Usb(request) => {
                let Some(change) = request.apply(&mut self.usb_client) else { return };
                change.apply_to(&mut self.usb);
            }
            link_request => {
                let Some(conn) = self.conn.as_mut() else { return };
                result = match link_request {
                    Request::LockScreen => conn.link.lock_screen(),
                    Request::UnlockScreen => conn.link.unlock_screen(),
                    Request::Power(action) => conn.link.power(action),
                    _ => unreachable!("relay requests are handled above"),
                };
            }
        }
        self.pump_relay();
        match result {
            Ok(()) => self.flush(),
            Err(e) => self.fail(&e.to_string()),
        }
    }

    /// Sends what the file relay has for each end and counts what happened.
    fn pump_files(&mut self) {
        let Self { files, files_client, conn, .. } = self;
        deliver(std::iter::from_fn(|| files.poll_transmit()), files_client, conn, HostLink::files, "file");
        let mut status = lock(&self.status);
        while let Some(event) = self.files.poll_event() {
            let counts = &mut status.files;
            match event {
                FileEvent::Denied { name, size } => {
                    counts.denied += 1;
                    if counts.denied.is_power_of_two() {
                        tracing::warn!(
                            name,
                            size,
                            denied = counts.denied,
                            "files: a file was kept out by the desktop's policy"
                        );
                    }
                }
                FileEvent::Completed { name, size, stored_as } => {
                    counts.completed += 1;
                    tracing::info!(name, size, stored_as, "files: a file arrived in the guest");
                }
                FileEvent::Failed { name, reason } => {
                    counts.failed += 1;
                    tracing::info!(name, ?reason, "files: a transfer ended: {}", reason.describe());
                }
            }
        }
        status.files.bytes_to_guest = self.files.bytes_to_guest();
        status.files.in_progress = self.files.transfers() as u64;
    }

    /// Carries out what the USB relay has for the client, the agent and the devices' streams,
    /// and counts and logs (for the audit) what happened.
    fn pump_usb(&mut self) {
        while let Some(out) = self.usb.poll_transmit() {
            let Some(out) = self.usb_streams.apply(out, &self.vsock, &mut self.usb) else { continue };
            match out {
                UsbOut::ToClient(message) => {
                    if let Some((_, sink)) = &self.usb_client {
                        sink(message);
                    }
                }
                UsbOut::AttachInGuest { id, token, speed } => {
                    if let Some(conn) = self.conn.as_mut()
                        && let Err(e) = conn.link.usb_attach(id, token, speed)
                    {
                        tracing::warn!("usb: cannot ask the agent to attach device {id}: {e}");
                    }
                }
                UsbOut::ToGuest { .. } | UsbOut::CloseGuest { .. } => {}
            }
        }
        let mut status = lock(&self.status);
        let counts = &mut status.usb;
        while let Some(event) = self.usb.poll_event() {
            match event {
                UsbEvent::Denied(device) => {
                    counts.denied += 1;
                    tracing::warn!(
                        usb_id = format!("{:04x}:{:04x}", device.vendor_id, device.product_id),
                        classes = ?device.classes().map(|c| format!("{c:02x}")).collect::<Vec<_>>(),
                        name = device.name,
                        "usb: a device was kept out by the desktop's policy"
                    );
                }
                UsbEvent::Attached { device, port } => {
                    counts.attached += 1;
                    tracing::info!(
                        usb_id = format!("{:04x}:{:04x}", device.vendor_id, device.product_id),
                        name = device.name,
                        port,
                        "usb: a device was attached in the guest"
                    );
                }
                UsbEvent::Failed { device, reason } => {
                    counts.failed += 1;
                    tracing::warn!(name = device.name, "usb: device {} failed: {reason}", device.id);
                }
                UsbEvent::Detached { device, reason } => {
                    tracing::info!(name = device.name, ?reason, "usb: device {} left the guest", device.id);
                }
            }
        }
        counts.devices = self
            .usb
            .devices()
            .map(|(d, attached)| UsbDeviceStatus {
                id: d.id,
                usb_id: format!("{:04x}:{:04x}", d.vendor_id, d.product_id),
                name: d.name.clone(),
                classes: d.classes().map(|c| format!("{c:02x}")).collect(),
                attached,
            })
            .collect();
        counts.bytes_to_guest = self.usb.bytes_to_guest();
        counts.bytes_from_guest = self.usb.bytes_from_guest();
    }

    /// Writes what the link has for the agent, as far as the guest's credit allows.
    fn flush(&mut self) {
        let Some(conn) = self.conn.as_mut() else { return };
        conn.pending.extend(conn.link.take_output());
        while !conn.pending.is_empty() {
            match self.vsock.send(conn.key, conn.pending.make_contiguous()) {
                Ok(0) => break,
                Ok(n) => {
                    conn.pending.drain(..n);
                }
                Err(e) => return self.fail(&e.to_string()),
            }
        }
        if self.conn.as_ref().is_some_and(|c| c.pending.len() > MAX_PENDING_OUT) {
            self.fail("the agent does not read what the host sends");
        }
    }

    fn fail(&mut self, why: &str) {
        tracing::warn!("closing the guest agent's link: {why}");
        if let Some(conn) = self.conn.take() {
            self.vsock.close(conn.key);
            self.guest_gone();
        }
        let mut status = lock(&self.status);
        status.connected = false;
        status.last_error = Some(why.to_owned());
    }
}

/// Passes what a relay has for each end on: to the session's client, or over the agent link
/// (only while it is up).
fn deliver<M>(
    outgoing: impl Iterator<Item = (End, M)>,
    client: &Option<(u64, ClientSink<M>)>,
    conn: &mut Option<Connection>,
    send: fn(&mut HostLink, M) -> Result<(), pleiades_protocol::agent::LinkError>,
    what: &str,
) {
    for (end, message) in outgoing {
        match end {
            End::Client => {
                if let Some((_, sink)) = client {
                    sink(message);
                }
            }
            End::Guest => {
                if let Some(conn) = conn.as_mut()
                    && let Err(e) = send(&mut conn.link, message)
                {
                    tracing::warn!("not sending a {what} message to the guest: {e}");
                }
            }
        }
    }
}

fn apply(status: &mut AgentStatus, event: HostEvent) {
    match event {
        HostEvent::Connected { version, agent_version } => {
            tracing::info!("guest agent {agent_version} connected (channel version {version})");
            status.connected = true;
            status.version = Some(version);
            status.agent_version = Some(agent_version);
        }
        HostEvent::GuestInfo(info) => {
            status.hostname = Some(info.hostname);
            status.os = Some(info.os);
            status.kernel = Some(info.kernel);
            status.addresses = info.addresses;
        }
        HostEvent::SessionState(state) => {
            status.session = Some(match state.activity {
                SessionActivity::NoUser => "no-user",
                SessionActivity::Active => "active",
                SessionActivity::Locked => "locked",
            });
            status.user = Some(state.user).filter(|u| !u.is_empty());
            status.idle_ms = Some(state.idle_ms);
        }
        HostEvent::Clipboard(_)
        | HostEvent::Files(_)
        | HostEvent::UsbAttached { .. }
        | HostEvent::UsbFailed { .. } => {}
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use pleiades_protocol::agent::AgentLink;
    use pleiades_virtio::test_utils::*;
    use pleiades_virtio::vsock::Vsock;
    use pleiades_virtio::vsock::packet::{HEADER_LEN, HOST_CID, Header, Op, TYPE_STREAM};
    use pleiades_virtio::{GuestMemory, VirtioDevice};
    use virtio_queue::{Queue, QueueT};
    use vm_memory::{Bytes, GuestAddress};

    use super::*;

    const RXQ: usize = 0;
    const TXQ: usize = 1;

    fn header(op: Op, src_port: u32, len: u32) -> Header {
        Header {
            src_cid: GUEST_CID,
            dst_cid: HOST_CID,
            src_port,
            dst_port: AGENT_PORT,
            len,
            socket_type: TYPE_STREAM,
            op: op as u16,
            flags: 0,
            buf_alloc: 65536,
            fwd_cnt: 0,
        }
    }

    /// The guest's packets on a tx queue whose rings are at `rings`, one chain each (header,
    /// then payload, as Linux lays them out), their bytes at `data` onwards.
    fn tx_queue(mem: &GuestMemory, rings: u64, data: u64, packets: &[(Header, Vec<u8>)]) -> Queue {
        let mut descs = Vec::new();
        for (i, (h, payload)) in packets.iter().enumerate() {
            let base = data + i as u64 * 0x1_0000;
            mem.write_slice(&h.to_bytes(), GuestAddress(base)).unwrap();
            mem.write_slice(payload, GuestAddress(base + 0x1000)).unwrap();
            let next = (descs.len() + 1) as u16;
            descs.push(desc(base, HEADER_LEN as u32, VRING_DESC_F_NEXT, next));
            descs.push(desc(base + 0x1000, payload.len().max(1) as u32, 0, 0));
        }
        queue_at(mem, rings, 64, &descs)
    }

    /// What the device wrote to the guest: (op, destination port, payload) per used rx buffer.
    fn to_guest(mem: &GuestMemory, rx: &QueueRings) -> Vec<(u16, u32, Vec<u8>)> {
        vsock_received(mem, rx).into_iter().map(|(h, payload)| (h.op, h.dst_port, payload)).collect()
    }

    fn wait(agent: &Agent, what: &str, f: impl Fn(&AgentStatus) -> bool) -> AgentStatus {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let status = agent.status();
            if f(&status) {
                return status;
            }
            assert!(std::time::Instant::now() < deadline, "{what}: {status:?}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn a_guest_that_breaks_the_protocol_is_cut_off_and_the_agent_comes_back() {
        let mem = memory();
        let (mut device, handle) = Vsock::new(GUEST_CID, Default::default()).unwrap();
        let agent = Agent::start(handle).unwrap();
        let mut queues =
            vec![vsock_rx_queue(&mem, 0, 16, 4096), Queue::new(64).unwrap(), Queue::new(64).unwrap()];
        let rx = QueueRings::of(&queues[RXQ]);

        // A guest process connects to the agent's port and sends guest facts before any hello.
        let early = pleiades_protocol::wire::encode_to_vec(
            &pleiades_protocol::wire::AgentMessage::GuestInfo(Default::default()),
        )
        .unwrap();
        queues[TXQ] = tx_queue(
            &mem,
            0x8000,
            0x2_0000,
            &[(header(Op::Request, 5000, 0), vec![]), (header(Op::Rw, 5000, early.len() as u32), early)],
        );
        device.process_queue(TXQ, &mut queues[TXQ], &mem).unwrap();
        let status = wait(&agent, "the link to be cut", |s| s.last_error.is_some());
        assert!(!status.connected && status.connections == 1, "{status:?}");
        assert!(status.last_error.as_deref().unwrap().contains("Hello"), "{status:?}");

        // The real agent connects from another port and says hello: it is welcomed.
        let hello = AgentLink::new("9.9.9").unwrap().take_output();
        queues[TXQ] = tx_queue(
            &mem,
            0xC000,
            0x6_0000,
            &[(header(Op::Request, 5001, 0), vec![]), (header(Op::Rw, 5001, hello.len() as u32), hello)],
        );
        device.process_queue(TXQ, &mut queues[TXQ], &mem).unwrap();
        let status = wait(&agent, "the agent's hello", |s| s.connected);
        assert_eq!((status.connections, status.agent_version.as_deref()), (2, Some("9.9.9")));

        // What the guest got: the first connection closed by the host (a shutdown of both
        // directions; the muxer resets it if the guest lingers), an accepted second one with
        // the welcome on it.
        let sent = wait_for_packets(&mut device, &mut queues, &mem, &rx, 4);
        let closed = |op: u16| op == Op::Shutdown as u16 || op == Op::Rst as u16;
        assert!(sent.iter().any(|(op, port, _)| closed(*op) && *port == 5000), "{sent:?}");
        assert!(sent.iter().any(|(op, port, _)| *op == Op::Response as u16 && *port == 5001), "{sent:?}");
        let welcome =
            sent.iter().find(|(op, port, _)| *op == Op::Rw as u16 && *port == 5001).expect("a welcome");
        let mut link = AgentLink::new("9.9.9").unwrap();
        assert_eq!(
            link.receive(&welcome.2).unwrap(),
            [pleiades_protocol::agent::AgentEvent::Welcomed { version: 1 }]
        );
    }

    #[test]
    fn the_clipboard_crosses_only_where_the_policy_allows() {
        use pleiades_protocol::wire::{
            AgentMessage, ClipboardFormat, ClipboardGrab, ClipboardRefused, RefuseReason, encode_to_vec,
        };
        let mem = memory();
        let (mut device, handle) = Vsock::new(GUEST_CID, Default::default()).unwrap();
        let agent = Agent::start(handle).unwrap();
        agent.set_clipboard_policy(ClipboardPolicy { to_guest: true, from_guest: false });
        let to_client = Arc::new(Mutex::new(Vec::new()));
        let sink = to_client.clone();
        RelayPort::<ClipboardMessage>::attach(&agent, 1, Box::new(move |m| sink.lock().unwrap().push(m)));
        let mut queues =
            vec![vsock_rx_queue(&mem, 0, 16, 4096), Queue::new(64).unwrap(), Queue::new(64).unwrap()];
        let rx = QueueRings::of(&queues[RXQ]);

        // The guest's agent says hello and offers what its user copied: the policy keeps it.
        let mut bytes = AgentLink::new("1.0").unwrap().take_output();
        let grab = ClipboardGrab { serial: 1, formats: vec![ClipboardFormat::Text] };
        bytes.extend(encode_to_vec(&AgentMessage::Clipboard(ClipboardMessage::Grab(grab))).unwrap());
        queues[TXQ] = tx_queue(
            &mem,
            0x8000,
            0x2_0000,
            &[(header(Op::Request, 5000, 0), vec![]), (header(Op::Rw, 5000, bytes.len() as u32), bytes)],
        );
        device.process_queue(TXQ, &mut queues[TXQ], &mem).unwrap();
        let status = wait(&agent, "the denial", |s| s.clipboard.denied_from_guest == 1);
        assert_eq!((status.clipboard.to_guest, status.clipboard.from_guest), (true, false));
        assert!(to_client.lock().unwrap().is_empty(), "nothing of the guest's copy reached the client");

        // The client's copy goes to the guest; when the client leaves it is withdrawn.
        let offered = ClipboardGrab { serial: 5, formats: vec![ClipboardFormat::Text, ClipboardFormat::Png] };
        agent.client_sent(1, ClipboardMessage::Grab(offered.clone()));
        // A message from a session that is not (or no longer) the attached one is ignored.
        agent.client_sent(2, ClipboardMessage::Grab(ClipboardGrab { serial: 6, formats: vec![] }));
        RelayPort::<ClipboardMessage>::detach(&agent, 2);
        RelayPort::<ClipboardMessage>::detach(&agent, 1);
        let received = agent_messages_to_guest(&mut device, &mut queues, &mem, &rx, 4);
        let refused =
            ClipboardRefused { serial: 1, format: ClipboardFormat::Text, reason: RefuseReason::NotShared };
        assert_eq!(
            received,
            [
                AgentMessage::Welcome { version: 1 },
                AgentMessage::Clipboard(ClipboardMessage::Refused(refused)),
                AgentMessage::Clipboard(ClipboardMessage::Grab(offered)),
                AgentMessage::Clipboard(ClipboardMessage::Grab(ClipboardGrab { serial: 0, formats: vec![] })),
            ]
        );
        assert_eq!(agent.status().clipboard.denied_to_guest, 0);
    }

    /// The agent thread on a vsock device whose guest agent (port 5000) said hello, with
    /// session 1's client attached to relay `M`: what the relay sends it lands in `to_client`.
    struct Rig<M> {
        mem: GuestMemory,
        device: Vsock,
        agent: Agent,
        queues: Vec<Queue>,
        rx: QueueRings,
        to_client: Arc<Mutex<Vec<M>>>,
    }

    impl<M: Send + 'static> Rig<M>
    where
        Agent: RelayPort<M>,
    {
        /// `policy` sets the relay's policy before anything happens.
        fn new(policy: impl FnOnce(&Agent)) -> Self {
            let mem = memory();
            let (mut device, handle) = Vsock::new(GUEST_CID, Default::default()).unwrap();
            let agent = Agent::start(handle).unwrap();
            policy(&agent);
            let to_client = Arc::new(Mutex::new(Vec::new()));
            let sink = to_client.clone();
            RelayPort::<M>::attach(&agent, 1, Box::new(move |m| sink.lock().unwrap().push(m)));
            let mut queues =
                vec![vsock_rx_queue(&mem, 0, 16, 4096), Queue::new(64).unwrap(), Queue::new(64).unwrap()];
            let rx = QueueRings::of(&queues[RXQ]);
            let bytes = AgentLink::new("1.0").unwrap().take_output();
            queues[TXQ] = tx_queue(
                &mem,
                0x8000,
                0x2_0000,
                &[(header(Op::Request, 5000, 0), vec![]), (header(Op::Rw, 5000, bytes.len() as u32), bytes)],
            );
            device.process_queue(TXQ, &mut queues[TXQ], &mem).unwrap();
            wait(&agent, "the agent's hello", |s| s.connected);
            Self { mem, device, agent, queues, rx, to_client }
        }
    }

    #[test]
    fn files_reach_the_guest_only_as_the_policy_allows_and_within_the_window() {
        use pleiades_protocol::wire::{AgentMessage, FileData, FileOffer, FileRefuseReason, MAX_FILE_CHUNK};
        let Rig { mem, mut device, agent, mut queues, rx, to_client } =
            Rig::<FileMessage>::new(|agent| agent.set_file_transfer(false));

        // The pool allows no files: the offer is refused here and counted.
        let offer =
            |id| FileMessage::Offer(FileOffer { id, size: 1 << 20, sha256: [3; 32], name: "a.bin".into() });
        agent.client_sent(1, offer(1));
        let status = wait(&agent, "the denial", |s| s.files.denied == 1);
        assert!(!status.files.allowed);
        let refused = |id, reason| FileMessage::Refused { id, reason };
        assert_eq!(*to_client.lock().unwrap(), [refused(1, FileRefuseReason::Policy)]);

        // Allowed: the offer goes to the guest; data before the guest accepted breaks the
        // transfer (the client hears why, the guest is told to stop).
        agent.set_file_transfer(true);
        agent.client_sent(1, offer(2));
        agent
            .client_sent(1, FileMessage::Data(FileData { id: 2, offset: 0, bytes: vec![7; MAX_FILE_CHUNK] }));
        wait(&agent, "the broken transfer", |s| s.files.failed == 1);
        assert_eq!(to_client.lock().unwrap().last(), Some(&refused(2, FileRefuseReason::Protocol)));
        let received = agent_messages_to_guest(&mut device, &mut queues, &mem, &rx, 3);
        assert_eq!(
            received,
            [
                AgentMessage::Welcome { version: 1 },
                AgentMessage::Files(offer(2)),
                AgentMessage::Files(FileMessage::Cancel {
                    id: 2,
                    reason: pleiades_protocol::wire::CancelReason::Interrupted
                }),
            ],
            "no byte of the early data reached the guest"
        );
        assert_eq!(agent.status().files.bytes_to_guest, 0);
    }

    #[test]
    fn a_usb_device_attaches_through_the_agent_and_a_stream_with_its_token() {
        use pleiades_protocol::agent::USB_PORT;
        use pleiades_protocol::usbip::{CmdSubmit, Direction, Pdu, RetSubmit};
        use pleiades_protocol::wire::{
            AgentMessage, UsbDetachReason, UsbDeviceInfo, UsbRefuseReason, UsbSpeed,
        };
        let Rig { mem, mut device, agent, mut queues, rx, to_client } =
            Rig::<UsbMessage>::new(|agent| agent.set_usb_policy(UsbPolicy::parse("class=08").unwrap()));

        // A hub is not mass storage: refused here. The stick goes to the agent with a token.
        let stick = UsbDeviceInfo {
            id: 7,
            vendor_id: 0x0525,
            product_id: 0xa4a5,
            class: 0,
            interfaces: vec![8],
            speed: UsbSpeed::High,
            name: "stick".into(),
        };
        let hub = UsbDeviceInfo { id: 8, class: 9, interfaces: vec![9], ..stick.clone() };
        agent.client_sent(1, UsbMessage::Attach(hub));
        agent.client_sent(1, UsbMessage::Attach(stick));
        wait(&agent, "the denial and the attach", |s| s.usb.denied == 1 && s.usb.devices.len() == 1);
        let received = agent_messages_to_guest(&mut device, &mut queues, &mem, &rx, 2);
        let AgentMessage::UsbAttach { id: 7, token, speed: UsbSpeed::High } = received[1] else {
            panic!("no attach for the stick: {received:?}");
        };

        // A stream with another token is closed; the one with the attach's token is the device's,
        // and the guest kernel's first URB on it reaches the client.
        let setup = [0x80, 6, 0, 1, 0, 0, 18, 0];
        let get_descriptor = Pdu::Submit(CmdSubmit::new(1, 7, 0, Direction::In, 18, setup, vec![])).encode();
        let usb = |op, port, len| Header { dst_port: USB_PORT, ..header(op, port, len) };
        let mut stream = token.to_le_bytes().to_vec();
        stream.extend(&get_descriptor);
        queues[TXQ] = tx_queue(
            &mem,
            0xC000,
            0x6_0000,
            &[
                (usb(Op::Request, 6000, 0), vec![]),
                (usb(Op::Rw, 6000, 8), (token ^ 1).to_le_bytes().to_vec()),
                (usb(Op::Request, 6001, 0), vec![]),
                (usb(Op::Rw, 6001, stream.len() as u32), stream),
            ],
        );
        device.process_queue(TXQ, &mut queues[TXQ], &mem).unwrap();
        wait(&agent, "the stick's stream", |s| s.usb.devices.first().is_some_and(|d| d.attached));
        let want = [
            UsbMessage::Refused { id: 8, reason: UsbRefuseReason::Policy },
            UsbMessage::Attached { id: 7 },
            UsbMessage::Data { id: 7, bytes: get_descriptor.clone() },
        ];
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while to_client.lock().unwrap().len() < want.len() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(*to_client.lock().unwrap(), want);

        // The device's answer reaches the guest's stream, re-encoded; then the client unplugs it.
        let answer = Pdu::Ret(RetSubmit::new(1, 0, 18, vec![0x12; 18])).encode();
        agent.client_sent(1, UsbMessage::Data { id: 7, bytes: answer.clone() });
        agent.client_sent(1, UsbMessage::Detach { id: 7 });
        wait(&agent, "the unplug", |s| s.usb.devices.is_empty());
        let closed = |op: u16| op == Op::Shutdown as u16 || op == Op::Rst as u16;
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let sent = loop {
            let sent = wait_for_packets(&mut device, &mut queues, &mem, &rx, 1);
            let done = sent.iter().any(|(op, port, _)| closed(*op) && *port == 6001);
            if done || std::time::Instant::now() > deadline {
                break sent;
            }
        };
        let on = |port| -> Vec<u8> {
            sent.iter()
                .filter(|(op, p, _)| *op == Op::Rw as u16 && *p == port)
                .flat_map(|(_, _, b)| b.clone())
                .collect()
        };
        assert_eq!(on(6001), answer, "the answer on the device's stream");
        assert!(on(6000).is_empty(), "nothing on the stream with the wrong token");
        assert!(sent.iter().any(|(op, port, _)| closed(*op) && *port == 6000), "{sent:?}");
        assert!(sent.iter().any(|(op, port, _)| closed(*op) && *port == 6001), "{sent:?}");
        assert_eq!(
            to_client.lock().unwrap().last(),
            Some(&UsbMessage::Detached { id: 7, reason: UsbDetachReason::Client })
        );
        let status = agent.status().usb;
        assert_eq!((status.attached, status.denied, status.policy.as_str()), (0, 1, "class=08"));
        assert_eq!(status.bytes_to_guest, answer.len() as u64);
    }

    /// The agent messages the host sent the guest's connection on port 5000, once at least `n`
    /// arrived (or 20 s passed).
    fn agent_messages_to_guest(
        device: &mut Vsock,
        queues: &mut [Queue],
        mem: &GuestMemory,
        rx: &QueueRings,
        n: usize,
    ) -> Vec<pleiades_protocol::wire::AgentMessage> {
        let mut received = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while received.len() < n && std::time::Instant::now() < deadline {
            let sent = wait_for_packets(device, queues, mem, rx, 1);
            let stream: Vec<u8> = sent
                .iter()
                .filter(|(op, port, _)| *op == Op::Rw as u16 && *port == 5000)
                .flat_map(|(_, _, payload)| payload.clone())
                .collect();
            received.clear();
            pleiades_protocol::wire::StreamDecoder::new().decode_all(&stream, &mut received).unwrap();
        }
        received
    }

    /// Lets the device move what the host side has for the guest into the rx buffers until at
    /// least `n` packets arrived there.
    fn wait_for_packets(
        device: &mut Vsock,
        queues: &mut [Queue],
        mem: &GuestMemory,
        rx: &QueueRings,
        n: usize,
    ) -> Vec<(u16, u32, Vec<u8>)> {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            device.handle_host_event(0, queues, mem).unwrap();
            let sent = to_guest(mem, rx);
            if sent.len() >= n || std::time::Instant::now() > deadline {
                return sent;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}
