//! SPICE as a reference for the display benchmarks (`benches/guest_display.rs`): QEMU's own
//! SPICE server on loopback, its client `remote-viewer` under Xvfb, and a TCP relay between them
//! that counts the bytes each way and can emulate a slow, distant link.
//!
//! - [`spice_args`]: the QEMU arguments of a guest whose display is served by SPICE (QEMU's own
//!   `virtio-gpu-pci`, the device the guest also sees under `pleiades-host run --device gpu`,
//!   there through `vhost-user-gpu-pci`).
//! - [`TcpRelay`]: a TCP relay (every connection the client opens, forwarded to the server) that
//!   counts the TCP payload bytes each way — the application's bytes, no IP or TCP headers, as
//!   [`crate::linkem`] counts UDP payloads for QUIC — and applies a one-way delay and a byte-rate
//!   limit per direction (shared by all of the client's connections, like one link). **No loss**:
//!   a TCP byte stream relayed in userspace cannot lose a segment (the kernel retransmits below
//!   the relay), and this kernel has no `netem`. A relay with a loss probability is refused;
//!   figures on a lossy link favour SPICE, whose TCP would slow down and stall there.
//! - [`Viewer`]: `remote-viewer spice://…` on an Xvfb display, killed on drop.
//! - [`prerequisites`]: QEMU's SPICE module (`qemu-system-modules-spice`), `remote-viewer`
//!   (`virt-viewer`) and `tcpdump` (the benchmark's packet capture, [`crate::pcap`]), all
//!   installed by `./dev deps` (group `spice`).
//!
//! Times are real: use it for figures, never for assertions on timing.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::linkem::LinkConfig;
use crate::xvfb::Xvfb;

/// QEMU's SPICE module, `remote-viewer` and `tcpdump`, or what to install.
pub fn prerequisites() -> Result<(), String> {
    let qemu = crate::qemu::qemu_binary();
    let help = Command::new(&qemu)
        .args(["-machine", "none", "-nodefaults", "-display", "none", "-spice", "help"])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| {
            format!("cannot run {}: {e}: install `qemu-system-x86` (`./dev deps qemu`)", qemu.display())
        })?;
    let said = format!("{}{}", String::from_utf8_lossy(&help.stdout), String::from_utf8_lossy(&help.stderr));
    if !said.contains("streaming-video") {
        return Err(format!(
            "QEMU ({}) has no SPICE server: install `qemu-system-modules-spice` (from bookworm-backports, \
             like qemu-system-x86; `./dev deps spice` does it). QEMU said: {}",
            qemu.display(),
            said.lines().next().unwrap_or("").trim()
        ));
    }
    crate::prerequisite::command("remote-viewer").map_err(|_| {
        "`remote-viewer` is not installed: install `virt-viewer` (`./dev deps spice`)".to_owned()
    })?;
    crate::prerequisite::command("tcpdump").map_err(|_| {
        "`tcpdump` is not installed (the benchmark counts bytes with a packet capture on loopback): \
         install `tcpdump` (`./dev deps spice`)"
            .to_owned()
    })?;
    crate::prerequisite::command("Xvfb")
        .map_err(|_| "`Xvfb` is not installed: install `xvfb` (`./dev deps gui`)".to_owned())?;
    Ok(())
}

/// A TCP port on loopback that was free a moment ago (for QEMU's `-spice port=`).
pub fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// QEMU arguments for a guest with QEMU's virtio-gpu (one `width`×`height` monitor) served by
/// SPICE on `127.0.0.1:port`, without a password. `streaming_video` is SPICE's
/// `streaming-video` (`off`, `all`, `filter`: with `filter` the server finds regions that
/// change like a video and sends them as an MJPEG stream; QEMU's default is `off`).
pub fn spice_args(port: u16, width: u32, height: u32, streaming_video: &str) -> Vec<String> {
    vec![
        "-device".into(),
        format!("virtio-gpu-pci,xres={width},yres={height}"),
        "-spice".into(),
        format!("port={port},addr=127.0.0.1,disable-ticketing=on,streaming-video={streaming_video}"),
    ]
}

/// Bytes and connections that crossed a [`TcpRelay`].
#[derive(Debug, Default)]
pub struct RelayStats {
    /// TCP payload bytes the server sent (read from its sockets), all connections together.
    pub from_server: AtomicU64,
    /// TCP payload bytes the client sent.
    pub from_client: AtomicU64,
    /// Connections accepted from the client (SPICE opens one per channel).
    pub connections: AtomicU64,
}

/// One direction's link: when it is free to carry the next byte.
struct Pacer {
    free_at: Mutex<Instant>,
}

struct Shared {
    config: LinkConfig,
    stop: AtomicBool,
    stats: RelayStats,
    /// Client → server, server → client.
    pacers: [Pacer; 2],
    /// Every socket, to shut down on drop (unblocks the threads).
    sockets: Mutex<Vec<TcpStream>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

/// A TCP relay on loopback to `server`: the client connects to [`TcpRelay::addr`]. Dropping it
/// closes every connection and stops it.
pub struct TcpRelay {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for TcpRelay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpRelay").field("addr", &self.addr).finish_non_exhaustive()
    }
}

/// Largest read, so that the rate limit releases bytes in small steps (16 KiB: 13 ms at
/// 10 Mbit/s).
const CHUNK: usize = 16 * 1024;
/// How often blocked threads look at the stop flag.
const POLL: Duration = Duration::from_millis(50);

impl TcpRelay {
    /// A relay to `server` with `config`'s delay (one way, each direction) and rate (each
    /// direction). While more than `config.queue` of transmission time is waiting, the relay
    /// stops reading from the sender, whose TCP then slows down (backpressure, as a full
    /// router buffer would cause). `config.loss` must be 0 (see the module docs).
    pub fn start(server: SocketAddr, config: LinkConfig) -> io::Result<Self> {
        if config.loss > 0.0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a TCP relay cannot lose segments of a byte stream: give it a config without loss",
            ));
        }
        let listener = TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let now = Instant::now();
        let shared = Arc::new(Shared {
            config,
            stop: AtomicBool::new(false),
            stats: RelayStats::default(),
            pacers: [Pacer { free_at: Mutex::new(now) }, Pacer { free_at: Mutex::new(now) }],
            sockets: Mutex::default(),
            threads: Mutex::default(),
        });
        let accept = {
            let shared = shared.clone();
            std::thread::Builder::new().name("spice-relay".into()).spawn(move || {
                while !shared.stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((client, _)) => {
                            if let Err(e) = connect(&shared, client, server) {
                                eprintln!("spice relay: a connection to {server} failed: {e}");
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(10))
                        }
                        Err(_) => std::thread::sleep(POLL),
                    }
                }
            })?
        };
        Ok(Self { addr, shared, accept: Some(accept) })
    }

    /// Where the client connects.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn stats(&self) -> &RelayStats {
        &self.shared.stats
    }
}

impl Drop for TcpRelay {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        for s in self.shared.sockets.lock().unwrap_or_else(|e| e.into_inner()).drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
        let threads: Vec<_> =
            self.shared.threads.lock().unwrap_or_else(|e| e.into_inner()).drain(..).collect();
        for t in threads {
            let _ = t.join();
        }
    }
}

/// Connects an accepted client to the server and starts both directions.
fn connect(shared: &Arc<Shared>, client: TcpStream, server: SocketAddr) -> io::Result<()> {
    client.set_nonblocking(false)?;
    let upstream = TcpStream::connect_timeout(&server, Duration::from_secs(5))?;
    for s in [&client, &upstream] {
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(POLL))?;
    }
    shared.stats.connections.fetch_add(1, Ordering::Relaxed);
    {
        let mut sockets = shared.sockets.lock().unwrap_or_else(|e| e.into_inner());
        sockets.push(client.try_clone()?);
        sockets.push(upstream.try_clone()?);
    }
    let mut threads = Vec::new();
    for (from, to, direction) in [(client.try_clone()?, upstream.try_clone()?, 0), (upstream, client, 1)] {
        let (tx, rx) = mpsc::channel();
        let (a, b) = (shared.clone(), shared.clone());
        threads.push(std::thread::Builder::new().name("spice-relay-rx".into()).spawn(move || {
            read_side(&a, from, direction, &tx);
        })?);
        threads.push(std::thread::Builder::new().name("spice-relay-tx".into()).spawn(move || {
            write_side(&b, to, &rx);
        })?);
    }
    shared.threads.lock().unwrap_or_else(|e| e.into_inner()).extend(threads);
    Ok(())
}

/// A chunk and when it leaves the link; `None` data: the sender closed its side.
type Chunk = (Instant, Option<Vec<u8>>);

/// Reads what one end sends, counts it, and schedules it through the direction's pacer.
fn read_side(shared: &Shared, mut from: TcpStream, direction: usize, tx: &Sender<Chunk>) {
    let counter = if direction == 0 { &shared.stats.from_client } else { &shared.stats.from_server };
    let config = shared.config;
    let mut buf = vec![0u8; CHUNK];
    while !shared.stop.load(Ordering::Relaxed) {
        let n = match from.read(&mut buf) {
            Ok(0) => {
                let _ = tx.send((Instant::now() + config.delay, None));
                return;
            }
            Ok(n) => n,
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => continue,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => {
                let _ = tx.send((Instant::now(), None));
                return;
            }
        };
        counter.fetch_add(n as u64, Ordering::Relaxed);
        let transmit = config
            .rate_bps
            .map_or(Duration::ZERO, |bps| Duration::from_secs_f64((n * 8) as f64 / bps.max(1) as f64));
        // Wait while the link has more than `queue` of transmission time waiting: the sender's
        // TCP window fills meanwhile.
        let release = loop {
            let now = Instant::now();
            let mut free_at = shared.pacers[direction].free_at.lock().unwrap_or_else(|e| e.into_inner());
            let start = (*free_at).max(now);
            let backlog = start.duration_since(now);
            if backlog <= config.queue || shared.stop.load(Ordering::Relaxed) {
                *free_at = start + transmit;
                break *free_at + config.delay;
            }
            drop(free_at);
            std::thread::sleep((backlog - config.queue).min(POLL));
        };
        if tx.send((release, Some(buf[..n].to_vec()))).is_err() {
            return;
        }
    }
}

/// Writes each chunk to the other end when its time comes.
fn write_side(shared: &Shared, mut to: TcpStream, rx: &Receiver<Chunk>) {
    while !shared.stop.load(Ordering::Relaxed) {
        let (release, data) = match rx.recv_timeout(POLL) {
            Ok(chunk) => chunk,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => return,
        };
        loop {
            let wait = release.saturating_duration_since(Instant::now());
            if wait.is_zero() || shared.stop.load(Ordering::Relaxed) {
                break;
            }
            std::thread::sleep(wait.min(POLL));
        }
        match data {
            Some(bytes) => {
                if to.write_all(&bytes).is_err() {
                    let _ = to.shutdown(Shutdown::Both);
                    return;
                }
            }
            None => {
                let _ = to.shutdown(Shutdown::Write);
                return;
            }
        }
    }
}

/// `remote-viewer` connected to a SPICE server, on an X display; killed on drop. Its output
/// goes to `log` (a file), read back by [`Viewer::log_tail`] when something went wrong.
#[derive(Debug)]
pub struct Viewer {
    child: Child,
    log: std::path::PathBuf,
}

impl Viewer {
    /// Starts `remote-viewer spice://ADDR` on `xvfb` (no resizing of the guest, no dialogs
    /// about it: the window takes the guest's size).
    pub fn start(xvfb: &Xvfb, addr: SocketAddr, log: &std::path::Path) -> io::Result<Self> {
        let out = std::fs::File::create(log)?;
        let child = xvfb
            .command("remote-viewer")
            .args(["--auto-resize=never", "--title", "pleiades-bench"])
            .arg(format!("spice://{}:{}", addr.ip(), addr.port()))
            .env("GDK_BACKEND", "x11")
            .env("NO_AT_BRIDGE", "1")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()?;
        Ok(Self { child, log: log.to_owned() })
    }

    /// Whether it still runs.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The last lines it printed.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(10)..].join("\n")
    }
}

impl Drop for Viewer {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg(self.child.id().to_string()).status();
        let gone = crate::wait_for("remote-viewer to exit", Duration::from_secs(5), || {
            self.child.try_wait().ok().flatten()
        });
        if gone.is_err() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server that sends `len` bytes to each connection and counts what it receives.
    fn sender(len: usize) -> (SocketAddr, Arc<AtomicU64>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let got = Arc::new(AtomicU64::new(0));
        let counted = got.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let counted = counted.clone();
                std::thread::spawn(move || {
                    let mut conn = conn;
                    conn.write_all(&vec![7u8; len]).unwrap();
                    conn.shutdown(Shutdown::Write).unwrap();
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = conn.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        counted.fetch_add(n as u64, Ordering::Relaxed);
                    }
                });
            }
        });
        (addr, got)
    }

    #[test]
    fn bytes_are_counted_each_way_through_a_delayed_paced_link() {
        let (server, got) = sender(250_000);
        // 10 Mbit/s and 40 ms each way (how long it takes is for benchmarks, not asserted).
        let config = LinkConfig::wan(Duration::from_millis(80), 0.0, 10);
        let relay = TcpRelay::start(server, config).unwrap();
        let mut client = TcpStream::connect(relay.addr()).unwrap();
        client.write_all(b"hello").unwrap();
        client.shutdown(Shutdown::Write).unwrap();
        let mut received = Vec::new();
        client.read_to_end(&mut received).unwrap();
        assert_eq!(received, vec![7u8; 250_000], "every byte, in order");
        assert_eq!(relay.stats().from_server.load(Ordering::Relaxed), 250_000);
        assert_eq!(relay.stats().from_client.load(Ordering::Relaxed), 5);
        assert_eq!(relay.stats().connections.load(Ordering::Relaxed), 1);
        crate::wait_for("the server to count", Duration::from_secs(10), || {
            (got.load(Ordering::Relaxed) == 5).then_some(())
        })
        .unwrap();
    }

    #[test]
    fn a_lossy_config_is_refused() {
        let e = TcpRelay::start("127.0.0.1:9".parse().unwrap(), LinkConfig::wan(Duration::ZERO, 0.02, 10))
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    }
}
