//! The session server: one QUIC endpoint per VM that streams the desktop to one client, and
//! what it needs: the display encoders ([`display`]) and synthetic desktops ([`synthetic`]).
//!
//! Invariants: this crate is the protocol's I/O shell on the host side (the protocol's state
//! machines are in `pleiades-protocol`); it reaches the VM only through its
//! [`Controller`](pleiades_control::Controller) and the devices' host handles; it is the only
//! host crate with QUIC, TLS and the codecs.
//!
//! It is the same for both VMMs: it consumes the GPU's [`DisplaySink`](pleiades_virtio::gpu::DisplaySink)
//! and feeds input through the VM's [`Controller`] (`send_input`, `set_layout`), which routes to
//! the in-process devices or to the device processes. The wire protocol is
//! `pleiades-protocol` (docs/protocol.md); this module is its I/O shell:
//!
//! - [`tls`]: the self-signed certificate the connection file pins, the QUIC server config;
//! - [`connection`]: one client: handshake (ticket checked and consumed), the control stream
//!   pumped through `pleiades_protocol::control::ServerControl` (pings, frame acks into the
//!   pacer, layouts, resume tokens, goodbye), input stream, and the display thread that encodes
//!   the sink's damage ([`crate::display`]) when the pacer allows (about one frame in flight,
//!   latest wins: damage accumulates in the sink while a frame is out);
//! - [`input`]: protocol input → virtio-input events, with a rate limit;
//! - [`audio`]: the sound device's playback as Opus datagrams, the client's microphone back;
//! - the clipboard channel (in [`connection`]): the client's clipboard stream in, to the VM's
//!   [`ClipboardPort`](pleiades_control::ClipboardPort) (the relay to the guest agent, which
//!   applies the pool's policy), and what the relay has for the client out on a stream of ours;
//!   the files channel the same way, to the VM's [`FilePort`](pleiades_control::FilePort).
//!
//! One client per desktop: a new connection with a valid ticket takes over, and the previous
//! one is told so (`Goodbye`, reason `Replaced`) and closed. A client that lost its connection comes back with
//! the one-time resume token its session was given (`RESUME`), which takes over the same way. Threads: a small tokio runtime for QUIC, and one display thread per connection (the
//! encoder is CPU-bound).

pub mod admission;
pub mod audio;
pub mod connection;
pub mod display;
pub mod input;
pub mod synthetic;
pub mod tls;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use pleiades_protocol::connfile::Connection;
use pleiades_protocol::handshake::{Capabilities, ServerHandshake};
use pleiades_protocol::resume::ResumeTokens;
use pleiades_protocol::ticket::{PublicKey, TicketClaims, TicketSigner, TicketVerifier};

use pleiades_control::{CommandError, Controller};

/// How long a ticket minted by the host itself (`--connection-file`) is valid.
pub const LOCAL_TICKET_SECS: u64 = 600;

/// What the server needs to know.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Where to listen (UDP).
    pub listen: SocketAddr,
    /// This desktop's name: tickets must name it.
    pub desktop: String,
    /// This host's name: tickets must name it.
    pub host: String,
    /// Who signs tickets (the broker's key, or the host's own for `--connection-file`).
    pub ticket_key: PublicKey,
    /// The desktop's generation this process serves (the broker's start, restart or recycle
    /// command names it): tickets must name it too, so that a ticket issued for an earlier
    /// process of the desktop (another user's) does not open this one. `None`: any ticket.
    pub generation: Option<u64>,
    /// Keep the certificate in this directory (made once, shared by the host's VMs); `None`:
    /// a fresh one for this server.
    pub identity_dir: Option<std::path::PathBuf>,
    /// The VM has a mouse: clients may send relative motion (`RELATIVE_POINTER`).
    pub relative_pointer: bool,
    /// The share of one CPU core (percent) this desktop's H.264 encoding may use; 0: no limit
    /// (docs/host.md, "The encoder's CPU budget").
    pub encoder_cpu_budget_percent: u32,
}

/// Unix seconds now.
pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// What every connection of a server shares.
pub(crate) struct Shared {
    pub controller: Arc<dyn Controller>,
    pub desktop: String,
    pub handshake: ServerHandshake,
    pub verifier: Mutex<TicketVerifier>,
    /// Resume tokens of this desktop's sessions (docs/protocol.md, "Resuming").
    pub resume: Mutex<ResumeTokens>,
    /// The session that has the desktop now.
    pub current: Mutex<Option<connection::Live>>,
    pub next_session: AtomicU64,
    pub metrics: SessionMetrics,
    pub audio: Arc<audio::AudioMetrics>,
    /// Connections that have not shown a ticket yet.
    pub admission: admission::Admission,
    /// [`SessionConfig::encoder_cpu_budget_percent`].
    pub encoder_cpu_budget_percent: u32,
}

/// Counters of the session server, for `ctl status`.
#[derive(Debug, Default)]
pub struct SessionMetrics {
    pub connections: AtomicU64,
    pub refused: AtomicU64,
    /// Connection attempts refused before a handshake (too many strangers), and sent to prove
    /// their address first (QUIC retry).
    pub refused_early: AtomicU64,
    pub retried: AtomicU64,
    pub frames: AtomicU64,
    pub bytes: AtomicU64,
    pub input_events: AtomicU64,
    pub input_dropped: AtomicU64,
    /// Frames the clients acknowledged (`FrameAck`s received, in time for the pacer or not).
    pub frames_acked: AtomicU64,
    /// The current session's smoothed ping RTT (µs), 0 before the first answer.
    pub rtt_us: AtomicU64,
}

/// A running session server. Dropping it closes every connection and the endpoint.
pub struct SessionServer {
    shared: Arc<Shared>,
    endpoint: quinn::Endpoint,
    local_addr: SocketAddr,
    fingerprint: String,
    runtime: Option<tokio::runtime::Runtime>,
}

impl std::fmt::Debug for SessionServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionServer").field("local_addr", &self.local_addr).finish_non_exhaustive()
    }
}

impl SessionServer {
    /// Starts listening on `config.listen`.
    pub fn start(config: &SessionConfig, controller: Arc<dyn Controller>) -> anyhow::Result<Self> {
        Self::start_on(config, controller, None)
    }

    /// Starts listening on `socket`, bound already (a jailed VM process gets it from the host
    /// daemon: it has no network of its own), or on `config.listen` when `None`.
    pub fn start_on(
        config: &SessionConfig,
        controller: Arc<dyn Controller>,
        socket: Option<std::net::UdpSocket>,
    ) -> anyhow::Result<Self> {
        let names = [config.host.clone(), "localhost".into()];
        let identity = match &config.identity_dir {
            Some(dir) => tls::Identity::load_or_create(dir, &names),
            None => tls::Identity::generate(&names),
        }
        .map_err(anyhow::Error::msg)?;
        let server_config = identity.server_config().map_err(anyhow::Error::msg)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("session")
            .enable_all()
            .build()?;
        let endpoint = runtime
            .block_on(async {
                match socket {
                    None => quinn::Endpoint::server(server_config, config.listen),
                    Some(socket) => {
                        let runtime = quinn::default_runtime()
                            .ok_or_else(|| std::io::Error::other("no async runtime for QUIC"))?;
                        quinn::Endpoint::new(Default::default(), Some(server_config), socket, runtime)
                    }
                }
            })
            .map_err(|e| anyhow::anyhow!("cannot listen on {} (UDP): {e}", config.listen))?;
        let local_addr = endpoint.local_addr()?;
        let mut capabilities = Capabilities::ZSTD_TILES
            | Capabilities::H264
            | Capabilities::CURSOR_CHANNEL
            | Capabilities::CURSOR_DATAGRAMS
            | Capabilities::DYNAMIC_LAYOUT
            | Capabilities::COPY_RECT
            | Capabilities::PALETTE_TILES
            | Capabilities::SCALED_VIDEO
            | Capabilities::RESUME;
        if controller.sound().is_some() {
            capabilities = capabilities | Capabilities::AUDIO;
        }
        if config.relative_pointer {
            capabilities = capabilities | Capabilities::RELATIVE_POINTER;
        }
        if controller.clipboard().is_some() {
            capabilities = capabilities | Capabilities::CLIPBOARD;
        }
        if controller.files().is_some() {
            capabilities = capabilities | Capabilities::FILES;
        }
        if controller.usb().is_some() {
            capabilities = capabilities | Capabilities::USB;
        }
        let shared = Arc::new(Shared {
            controller,
            desktop: config.desktop.clone(),
            handshake: ServerHandshake::new(&format!("pleiades-host {}", config.host), capabilities),
            verifier: Mutex::new(
                TicketVerifier::new(config.ticket_key, &config.host).with_generation(config.generation),
            ),
            resume: Mutex::new(ResumeTokens::new()),
            current: Mutex::new(None),
            next_session: AtomicU64::new(1),
            metrics: SessionMetrics::default(),
            audio: Arc::default(),
            admission: admission::Admission::default(),
            encoder_cpu_budget_percent: config.encoder_cpu_budget_percent,
        });
        let accept = endpoint.clone();
        let accept_shared = shared.clone();
        runtime.spawn(async move {
            while let Some(incoming) = accept.accept().await {
                let shared = accept_shared.clone();
                let source = incoming.remote_address();
                match shared.admission.admit(source.ip(), incoming.remote_address_validated()) {
                    admission::Admit::Yes(place) => {
                        tokio::spawn(async move {
                            match incoming.await {
                                Ok(conn) => connection::serve(shared, conn, place).await,
                                Err(e) => tracing::info!("session: a connection attempt failed: {e}"),
                            }
                        });
                    }
                    admission::Admit::Retry => {
                        shared.metrics.retried.fetch_add(1, Ordering::Relaxed);
                        if incoming.retry().is_err() {
                            shared.metrics.refused_early.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    admission::Admit::No => {
                        shared.metrics.refused_early.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!("session: refused {source}: too many connections without a ticket");
                        incoming.refuse();
                    }
                }
            }
        });
        tracing::info!(
            "session server listening on {local_addr} (UDP), certificate sha256 {}",
            identity.fingerprint()
        );
        Ok(Self { shared, endpoint, local_addr, fingerprint: identity.fingerprint(), runtime: Some(runtime) })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The pinned certificate's fingerprint.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    pub fn metrics(&self) -> &SessionMetrics {
        &self.shared.metrics
    }

    /// A connection for this desktop: address, pinned certificate, `ticket`.
    pub fn connection(&self, host: &str, ticket: String) -> Connection {
        Connection {
            version: 1,
            host: host.to_owned(),
            port: self.local_addr.port(),
            cert_sha256: self.fingerprint.clone(),
            ticket,
            desktop: self.shared.desktop.clone(),
            usb_auto: String::new(),
        }
    }

    /// Ends the client's session, if there is one (the broker's `disconnect`, an administrator
    /// ending a session): the client is told why (`Goodbye`, reason `Admin`), then the connection
    /// closes, and every resume token is forgotten. Returns whether a client was connected.
    pub fn disconnect(&self, reason: &str) -> bool {
        // Ended for good: no resume token brings the session back.
        self.shared.resume.lock().unwrap_or_else(|p| p.into_inner()).revoke_all();
        let current = self.shared.current.lock().unwrap_or_else(|p| p.into_inner()).take();
        match current {
            Some(live) => {
                tracing::info!("session {}: disconnected ({reason})", live.id);
                live.control.say_goodbye(pleiades_protocol::wire::GoodbyeReason::Admin, reason);
                self.shared.controller.client_left();
                true
            }
            None => false,
        }
    }

    /// What `ctl status` shows.
    pub fn status(&self) -> serde_json::Value {
        let m = &self.shared.metrics;
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let connected = self.shared.current.lock().unwrap_or_else(|p| p.into_inner()).is_some();
        serde_json::json!({
            "listen": self.local_addr.to_string(),
            "cert_sha256": self.fingerprint,
            "client_connected": connected,
            "connections": get(&m.connections),
            "refused": get(&m.refused),
            "refused_early": get(&m.refused_early),
            "retried": get(&m.retried),
            "strangers": self.shared.admission.strangers(),
            "frames": get(&m.frames),
            "bytes": get(&m.bytes),
            "input_events": get(&m.input_events),
            "input_dropped": get(&m.input_dropped),
            "frames_acked": get(&m.frames_acked),
            "rtt_us": get(&m.rtt_us),
            "audio_frames": get(&self.shared.audio.frames_sent),
            "audio_bytes": get(&self.shared.audio.bytes_sent),
            "mic_frames": get(&self.shared.audio.mic_frames),
            "dropped_datagrams": get(&self.shared.audio.dropped_datagrams),
        })
    }
}

impl Drop for SessionServer {
    fn drop(&mut self) {
        self.endpoint.close(0u32.into(), b"the desktop is shutting down");
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(Duration::from_secs(2));
        }
    }
}

/// The host's own ticket signer, for `run --listen … --connection-file` without a broker.
#[derive(Debug)]
pub struct LocalTickets {
    signer: TicketSigner,
    pub host: String,
    pub desktop: String,
}

impl LocalTickets {
    pub fn new(host: &str, desktop: &str) -> anyhow::Result<Self> {
        let pkcs8 = TicketSigner::generate_pkcs8().map_err(|e| anyhow::anyhow!("{e}"))?;
        let signer = TicketSigner::from_pkcs8(&pkcs8).map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(Self { signer, host: host.to_owned(), desktop: desktop.to_owned() })
    }

    pub fn public_key(&self) -> PublicKey {
        self.signer.public_key()
    }

    /// A fresh one-time ticket for the local user.
    pub fn mint(&self) -> anyhow::Result<String> {
        let claims = TicketClaims::new("local", &self.desktop, &self.host, unix_now(), LOCAL_TICKET_SECS)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        self.signer.issue(&claims).map_err(|e| anyhow::anyhow!("{e}"))
    }
}

/// Writes a connection file with mode 0600 (it holds a ticket).
pub fn write_connection_file(path: &Path, connection: &Connection) -> anyhow::Result<()> {
    write_private(path, connection.to_toml().as_bytes())
        .map_err(|e| anyhow::anyhow!("cannot write the connection file {}: {e}", path.display()))
}

/// Writes a file only its owner may read (mode 0600): complete in a temporary file beside it,
/// then renamed, so that a reader never sees half of it.
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut tmp_name = path.file_name().unwrap_or_default().to_owned();
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    let mut file =
        std::fs::OpenOptions::new().create(true).write(true).truncate(true).mode(0o600).open(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// A VM's controller with its session server: `ctl status` shows the session, and
/// `ctl connection-file` mints a new one-time connection (standalone hosts without a broker).
pub struct SessionController {
    inner: Arc<dyn Controller>,
    server: SessionServer,
    tickets: Option<LocalTickets>,
    advertise: String,
}

impl std::fmt::Debug for SessionController {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionController").field("server", &self.server).finish_non_exhaustive()
    }
}

impl SessionController {
    /// `advertise`: the address clients reach the server at (written into connections).
    pub fn new(
        inner: Arc<dyn Controller>,
        server: SessionServer,
        tickets: Option<LocalTickets>,
        advertise: &str,
    ) -> Self {
        Self { inner, server, tickets, advertise: advertise.to_owned() }
    }

    pub fn server(&self) -> &SessionServer {
        &self.server
    }

    /// A fresh connection with a ticket of the host's own.
    pub fn mint_connection(&self) -> Result<Connection, String> {
        let tickets = self.tickets.as_ref().ok_or("this host's tickets come from its broker")?;
        let ticket = tickets.mint().map_err(|e| e.to_string())?;
        Ok(self.server.connection(&self.advertise, ticket))
    }
}

impl Controller for SessionController {
    fn status(&self) -> serde_json::Value {
        let mut status = self.inner.status();
        status["session"] = self.server.status();
        status
    }
    fn shutdown(&self) -> Result<(), CommandError> {
        self.inner.shutdown()
    }
    fn reboot(&self) -> Result<(), CommandError> {
        self.inner.reboot()
    }
    fn send_input(
        &self,
        device: pleiades_control::InputDevice,
        events: &[pleiades_virtio::input::InputEvent],
    ) -> Result<(), CommandError> {
        self.inner.send_input(device, events)
    }
    fn display(&self) -> Option<pleiades_virtio::gpu::GpuHandle> {
        self.inner.display()
    }
    fn set_layout(&self, sizes: &[(u32, u32)]) -> Result<(), CommandError> {
        self.inner.set_layout(sizes)
    }
    fn sound(&self) -> Option<pleiades_virtio::snd::SoundHandle> {
        self.inner.sound()
    }
    fn connection_file(&self) -> Result<String, CommandError> {
        self.mint_connection().map(|c| c.to_toml()).map_err(CommandError::Failed)
    }
    fn disconnect_client(&self) -> Result<bool, CommandError> {
        Ok(self.server.disconnect("disconnected by the broker"))
    }
}
