//! The real-guest display benchmark, Pleiades and SPICE side by side:
//! `cargo bench -p pleiades-tests --bench guest_display` (issue #20).
//!
//! The same Linux test guest image (`target/guest/`, `./dev guest-image`; 2 vCPUs, 512 MiB, QEMU
//! TCG where there is no KVM) draws the same workloads (`pleiades-agent workload NAME --seconds
//! N` inside the guest: typing, scroll, video, motion, and idle when picked; they draw through
//! the guest's fbdev on its virtio-gpu, see `guest-agent/src/workload.rs`), served two ways:
//! - **Pleiades**: `pleiades-host run --vmm qemu --device gpu --listen` (Pleiades' virtio-gpu
//!   over vhost-user, `vhost-user-gpu-pci` in QEMU) and the headless client, `pleiades connect
//!   FILE --headless --record DIR`, through `pleiades_tests::linkem`'s link emulator;
//! - **SPICE**: the image under plain QEMU with QEMU's own `virtio-gpu-pci` (the same virtio-gpu
//!   device to the guest, the same 1280x800 screen; no QXL) and `-spice` (QEMU's SPICE server,
//!   its default image compression, `streaming-video=filter`: SPICE may send a region that
//!   changes like a video as an MJPEG stream, whether it does is its own call; QEMU's default is
//!   `off`; `PLEIADES_BENCH_SPICE_VIDEO=off|all|filter` changes it), and `remote-viewer`
//!   (virt-viewer) as its client on an Xvfb display, through `pleiades_tests::spice::TcpRelay`.
//!
//! Each run: the guest first draws the workloads' still desktop background (`workload idle`
//! for a second), a new client connects and receives that first full-screen picture; once the
//! picture has settled (Pleiades: the first frame acked, then no frame sent or acked for 750 ms;
//! SPICE: less than 1.5 kB from the server in 750 ms, 3 s after connecting at the earliest),
//! a packet capture on loopback starts (`pleiades_tests::pcap::Capture`: `tcpdump -i lo` on the
//! server's port, waited for until it listens), the byte counters and the clocks are read, the
//! workload starts in the guest (typed on its serial console, in the background), and after `N`
//! seconds the counters and clocks are read again, the capture is stopped and the client is
//! ended; the next run waits for the workload to end (its "drew N frames" goes to stderr with
//! each run's figures, and the capture's packet counts and client → server bytes). Printed per
//! link and workload:
//! - **kB/s** (1 kB = 1000 bytes), both sides counted the same way, by the packet capture: the
//!   IP bytes the server sent towards the client in the measured `N` seconds (the packets whose
//!   source port is the server's and whose capture time lies in the window; each one's IP total
//!   length: IP header, UDP or TCP header and payload, no Ethernet header). Packets that carry
//!   only acknowledgements count alike: QUIC's ACK packets and SPICE's pure TCP ACKs (the
//!   server's acks of the client's input and of its window updates). Pleiades: the session
//!   server's UDP port, the leg between the server and the link emulator (before the link's
//!   loss and drops); SPICE: QEMU's SPICE TCP port, the leg between QEMU and the relay, every
//!   SPICE channel (main, display, cursor, inputs, …) together. Loopback's MTU is 64 KiB and lo
//!   takes GSO/TSO packets whole: one captured packet may carry many QUIC datagrams or TCP
//!   segments, so IP and UDP/TCP headers count once per loopback packet (fewer than on a
//!   1500-byte link, for both), while QUIC's own header and AEAD tag per datagram count in full;
//! - **Pleiades/SPICE**: the ratio of the two, and whether it meets issue #20's target, bytes
//!   ≤ 0.5× SPICE's;
//! - **payload kB/s P / S**: the same window's application payload bytes server → client, no
//!   IP/UDP/TCP headers: Pleiades the UDP payloads (QUIC packets, their ACK frames and AEAD tags
//!   included) the server sent into the link emulator (`LinkStats::bytes_from_server`), SPICE
//!   the TCP payloads read from QEMU's SPICE sockets by the relay (its TCP ACKs have none). An
//!   earlier count, unfair to QUIC; kept beside the capture's. Where this machine's kernel
//!   dropped datagrams for the link emulator's full receive buffer (stderr says how many,
//!   `RcvbufErrors`), the capture counts them and the payload count does not;
//! - **Pleiades fps and p50/p95 ms**: from the client's `frames.jsonl`, the frames presented in
//!   the measured window (`decoded_us`, CLOCK_MONOTONIC, compared with this process's
//!   CLOCK_MONOTONIC at the start and end of the window) per second, and their update latency
//!   (`update_latency_us`: the guest flush captured by the server → the client presented it,
//!   one clock). The guest's fbdev emulation flushes what was written every 50 ms, so a frame the
//!   TCG guest draws slowly (the video's 360 rows, one write each) may arrive in parts: fps counts
//!   the updates the client presented, not the frames the guest drew (their count goes to
//!   stderr). SPICE's frame rate and latency are `-`: `remote-viewer` exposes no per-frame
//!   timing, and SPICE has no frame acks to count;
//! - **first kB**: the payload bytes from connecting to the settled first picture (handshake
//!   included), counted as the payload kB/s are: not in kB/s.
//!
//! The links: loopback (`LinkConfig::CLEAN`, the relays only count) and a bad WAN, 100 ms RTT,
//! 10 Mbit/s each way and, for Pleiades' QUIC only, 2 % loss each way
//! (`LinkConfig::wan(100 ms, 0.02, 10)`). SPICE's relay applies the same delay (50 ms each way)
//! and rate (a byte pacer per direction, shared by its TCP connections, reading stopped while
//! more than 200 ms of sending waits, so that the server's TCP feels the backpressure), but **no
//! loss**: a TCP byte stream cannot lose a segment in a userspace relay (the kernel below it
//! retransmits) and this kernel has no `netem`. SPICE's WAN row is therefore on a lossless link,
//! which favours SPICE; the printed legend says so.
//!
//! **Typing under CPU pressure** (Pleiades only, loopback): (a) `workload typing` alone, (b)
//! `workload typing` and `workload video` at the same time in the guest (both in the background;
//! QEMU TCG then takes both of this machine's cores: the CPU pressure). For each, the frames
//! with tiles (`tiles` > 0: the typed characters; the video region goes as H.264 `videos`)
//! give the typing update latency p50/p95 and frames/s; (b) also gives the frames with video
//! per second. Printed next to each other.
//!
//! Times are real and include this machine's other load; no figure is asserted.
//! `PLEIADES_BENCH_SECONDS` (default 10) sets each measured window; `PLEIADES_BENCH_WORKLOADS`
//! and `PLEIADES_BENCH_LINKS` (comma lists of the names printed, `loopback`, `wan`) pick a
//! subset; `PLEIADES_BENCH_PRESSURE=0` skips the pressure block (run only with the loopback
//! link). It first builds `pleiades-host` and `pleiades` with its own profile into its own
//! target directory (`cargo bench` builds the release ones; `--profile dev` works too, slower)
//! and runs those. Missing `remote-viewer`, QEMU's SPICE module or `tcpdump` (`./dev deps
//! spice`), or a tcpdump that cannot capture on `lo` (it needs root or CAP_NET_RAW), is said
//! clearly; under `CI=true` it fails.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use pleiades_tests::image::GuestImage;
use pleiades_tests::linkem::{Link, LinkConfig};
use pleiades_tests::pcap::{self, Capture, Traffic, Transport};
use pleiades_tests::qemu::{Guest, GuestConfig, WAIT_FOR_TTY1_SHELL};
use pleiades_tests::served::{self, ServedDesktop};
use pleiades_tests::spice::{self, TcpRelay, Viewer};
use pleiades_tests::xvfb::Xvfb;
use pleiades_tests::{prerequisite, wait_for};

const ALL_WORKLOADS: &[&str] = &["idle", "typing", "scroll", "video", "motion"];
const DEFAULT_WORKLOADS: &[&str] = &["typing", "scroll", "video", "motion"];
/// The guest's screen, both ways (Pleiades' GPU default; QEMU's `xres`/`yres`).
const SCREEN: (u32, u32) = (1280, 800);
const SHELL: Duration = Duration::from_secs(60);

fn links() -> Vec<(&'static str, LinkConfig)> {
    vec![("loopback", LinkConfig::CLEAN), ("wan", LinkConfig::wan(Duration::from_millis(100), 0.02, 10))]
}

fn link_title(name: &str) -> &'static str {
    match name {
        "loopback" => "loopback (no delay, no loss, no rate limit)",
        _ => {
            "wan: 100 ms RTT, 10 Mbit/s each way; 2 % loss each way for Pleiades (QUIC), none for SPICE (TCP)"
        }
    }
}

fn pick<'a>(env: &str, all: &[&'a str], default: &[&'a str]) -> Vec<&'a str> {
    match std::env::var(env) {
        Ok(list) => all.iter().copied().filter(|w| list.split(',').any(|x| x.trim() == *w)).collect(),
        Err(_) => default.to_vec(),
    }
}

/// UDP datagrams dropped so far for a full socket receive buffer, every socket's
/// (`/proc/net/snmp`, `Udp: … RcvbufErrors`).
fn udp_rcvbuf_errors() -> Option<u64> {
    let snmp = std::fs::read_to_string("/proc/net/snmp").ok()?;
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp: "));
    let (names, values) = (udp.next()?, udp.next()?);
    let at = names.split_whitespace().position(|n| n == "RcvbufErrors")?;
    values.split_whitespace().nth(at)?.parse().ok()
}

/// CLOCK_MONOTONIC in µs, the clock of the client's `frames.jsonl`.
fn monotonic_us() -> u64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).expect("CLOCK_MONOTONIC");
    t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1000
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// p50 and p95 (ms) of the frames' update latency.
fn latency(frames: &[&serde_json::Value]) -> (f64, f64) {
    let mut ms: Vec<f64> =
        frames.iter().filter_map(|f| f["update_latency_us"].as_f64()).map(|us| us / 1000.0).collect();
    ms.sort_by(f64::total_cmp);
    (percentile(&ms, 0.5), percentile(&ms, 0.95))
}

/// One measured window.
struct Measured {
    /// Server → client IP bytes per second (the packet capture), in kB/s.
    ip_kb_s: f64,
    /// The capture's counts: server → client and client → server IP bytes and packets.
    traffic: Traffic,
    /// Server → client payload bytes per second (linkem's or the relay's count), in kB/s.
    kb_s: f64,
    /// Pleiades: UDP datagrams this machine's kernel dropped in the window for a full receive
    /// buffer (`RcvbufErrors`, every socket's): the capture counts them, the link never saw them.
    rcvbuf_drops: Option<u64>,
    /// Server → client bytes from connecting to the settled first picture, in kB.
    first_kb: f64,
    /// Pleiades: the frames presented in the window (`frames.jsonl` lines).
    frames: Vec<serde_json::Value>,
    seconds: f64,
    /// What the guest's workloads said when they ended (`drew N frames`).
    said: String,
}

impl Measured {
    /// What stderr gets for each run.
    fn summary(&self) -> String {
        let t = &self.traffic;
        format!(
            "{:.1} kB/s IP ({} packets; client → server {:.1} kB/s, {} packets{}), {:.1} kB/s payload ({})",
            self.ip_kb_s,
            t.from_port_packets,
            t.to_port_bytes as f64 / 1000.0 / self.seconds,
            t.to_port_packets,
            t.dropped.filter(|d| *d > 0).map_or(String::new(), |d| format!("; tcpdump dropped {d}"))
                + &self.rcvbuf_drops.filter(|d| *d > 0).map_or(String::new(), |d| format!(
                    "; {d} UDP datagrams dropped for full receive buffers"
                )),
            self.kb_s,
            self.said
        )
    }

    fn fps(&self, keep: impl Fn(&serde_json::Value) -> bool) -> f64 {
        self.frames.iter().filter(|f| keep(f)).count() as f64 / self.seconds
    }
}

/// Starts the workloads in the guest's background, `seconds` long.
fn start_workloads(guest: &mut Guest, workloads: &[&str], seconds: u32) -> Result<(), String> {
    let started: Vec<String> = workloads
        .iter()
        .map(|w| format!("(pleiades-agent workload {w} --seconds {seconds} > /tmp/workload-{w}.log 2>&1 &)"))
        .collect();
    guest.run(&started.join("; "), SHELL).map(drop).map_err(|e| e.to_string())
}

/// Waits (bounded) until no workload runs in the guest; what the workloads said (`drew N
/// frames`).
fn wait_workloads_done(guest: &mut Guest) -> Result<String, String> {
    let script = "i=0; while ps | grep -q '[w]orkload' && [ $i -lt 300 ]; do i=$((i+1)); sleep 0.2; done; \
                  ! ps | grep -q '[w]orkload' && cat /tmp/workload-*.log && rm -f /tmp/workload-*.log";
    guest
        .run(script, Duration::from_secs(90))
        .map(|lines| lines.join("; "))
        .map_err(|e| format!("a workload did not end: {e}"))
}

/// Draws the workloads' still desktop background, the picture every run starts from.
fn draw_background(guest: &mut Guest) -> Result<(), String> {
    guest
        .run("pleiades-agent workload idle --seconds 1 > /dev/null 2>&1", SHELL)
        .map(drop)
        .map_err(|e| format!("the background: {e}"))
}

/// The guest's fbdev size (`W,H`).
fn guest_screen(guest: &mut Guest) -> String {
    guest
        .run("cat /sys/class/graphics/fb0/virtual_size", SHELL)
        .ok()
        .and_then(|lines| lines.last().cloned())
        .unwrap_or_else(|| "?".into())
}

/// A child process killed on drop (after SIGTERM, bounded).
struct Process(Child);

impl Process {
    /// SIGTERM, then up to `grace` to exit, then SIGKILL.
    fn end(&mut self, grace: Duration) {
        if let Ok(None) = self.0.try_wait() {
            let _ = Command::new("kill").args(["-TERM", &self.0.id().to_string()]).status();
            if wait_for("a child to exit", grace, || self.0.try_wait().ok().flatten()).is_err() {
                let _ = self.0.kill();
            }
        }
        let _ = self.0.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.end(Duration::from_secs(5));
    }
}

/// The session server's (frames sent, frames acked), every connection's.
fn frame_counters(desktop: &ServedDesktop) -> (u64, u64) {
    let response = pleiades_control::request(
        &desktop.control(),
        &pleiades_control::Request::Status,
        Duration::from_secs(30),
    );
    let session = response.ok().and_then(|r| r.result).map(|r| r["session"].clone()).unwrap_or_default();
    (session["frames"].as_u64().unwrap_or(0), session["frames_acked"].as_u64().unwrap_or(0))
}

/// The Pleiades side: a served guest and its client.
struct Pleiades {
    desktop: ServedDesktop,
    client: PathBuf,
    server: std::net::SocketAddr,
    runs: u32,
}

/// Builds `pleiades-host` and `pleiades` with this bench's profile into its target directory
/// (sources may change while benchmarks run: what was built now is what is measured) and
/// returns their paths; a failed build is said, and binaries already there are used.
fn build_binaries() -> Result<(PathBuf, PathBuf), String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let dir = exe.parent().and_then(|deps| deps.parent()).ok_or("the bench has no target directory")?;
    let target = dir.parent().ok_or("the bench has no target directory")?;
    let profile = match dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") => "dev".to_owned(),
        Some(other) => other.to_owned(),
        None => return Err("the bench's profile directory has no name".into()),
    };
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let built = Command::new(cargo)
        .args([
            "build",
            "--quiet",
            "--profile",
            &profile,
            "-p",
            "pleiades-host",
            "-p",
            "pleiades-client",
            "--bins",
        ])
        .env("CARGO_TARGET_DIR", target)
        .current_dir(pleiades_testkit::workspace_root())
        .status()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if !built.success() {
        eprintln!("building pleiades-host and pleiades ({profile}) failed: using the binaries already built");
    }
    let (host, client) = (dir.join("pleiades-host"), dir.join("pleiades"));
    for path in [&host, &client] {
        if !path.is_file() {
            return Err(format!("{} is missing", path.display()));
        }
    }
    Ok((host, client))
}

impl Pleiades {
    fn boot() -> Result<(Self, String), String> {
        let (host, client) = build_binaries()?;
        let booted = std::panic::catch_unwind(|| {
            let (mut desktop, _) = ServedDesktop::boot_host(&host, &["gpu"], &[]);
            desktop.settle_console(SHELL);
            desktop
        });
        let mut desktop = booted.map_err(|e| {
            e.downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_else(|| "the served guest did not boot".into())
        })?;
        let file = std::fs::read_to_string(desktop.connection_file()).map_err(|e| e.to_string())?;
        let connection =
            pleiades_protocol::connfile::Connection::from_toml(&file).map_err(|e| e.to_string())?;
        let server =
            format!("{}:{}", connection.host, connection.port).parse().map_err(|e| format!("{e}"))?;
        let screen = guest_screen(&mut desktop.guest);
        Ok((Self { desktop, client, server, runs: 0 }, screen))
    }

    /// `workloads` (started together) through a link with `config`, `seconds` measured.
    fn measure(&mut self, workloads: &[&str], config: LinkConfig, seconds: u32) -> Result<Measured, String> {
        self.runs += 1;
        let dir = self.desktop.dir.path().join(format!("run-{}", self.runs));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        draw_background(&mut self.desktop.guest)?;
        let link = Link::start(self.server, config).map_err(|e| e.to_string())?;
        let connection = served::mint_connection(&self.desktop.control(), Some(&link));
        let target = dir.join("c.pleiades");
        std::fs::write(&target, connection.to_toml()).map_err(|e| e.to_string())?;
        let record = dir.join("rec");
        let log = std::fs::File::create(dir.join("client.log")).map_err(|e| e.to_string())?;
        let (_, acked_before) = frame_counters(&self.desktop);
        let mut client = Process(
            Command::new(&self.client)
                .arg("connect")
                .arg(&target)
                .args(["--headless", "--record"])
                .arg(&record)
                .env("RUST_LOG", "warn")
                .stdin(Stdio::null())
                .stdout(log.try_clone().map_err(|e| e.to_string())?)
                .stderr(log)
                .spawn()
                .map_err(|e| format!("{}: {e}", self.client.display()))?,
        );
        let client_log = || std::fs::read_to_string(dir.join("client.log")).unwrap_or_default();
        wait_for("the first frame acked", SHELL, || {
            if matches!(client.0.try_wait(), Ok(Some(_))) {
                return Some(false);
            }
            (frame_counters(&self.desktop).1 > acked_before).then_some(true)
        })
        .and_then(|alive| if alive { Ok(()) } else { Err("the client ended".into()) })
        .map_err(|e| format!("{e}: {}", client_log()))?;
        // Settled: no frame sent or acked for 750 ms (frames an earlier client left unacked keep
        // the totals apart, so sent == acked is no test).
        let mut last = frame_counters(&self.desktop);
        wait_for("the first picture to settle", Duration::from_secs(30), || {
            std::thread::sleep(Duration::from_millis(750));
            let now = frame_counters(&self.desktop);
            let settled = now == last;
            last = now;
            settled.then_some(())
        })?;
        let capture = Capture::start(Transport::Udp, self.server.port())?;
        let stats = link.stats();
        let first = stats.bytes_from_server.load(Ordering::Relaxed);
        let t0 = monotonic_us();
        let w0 = pcap::now();
        let drops0 = udp_rcvbuf_errors();
        let started = Instant::now();
        start_workloads(&mut self.desktop.guest, workloads, seconds)?;
        std::thread::sleep(
            (started + Duration::from_secs(u64::from(seconds))).saturating_duration_since(Instant::now()),
        );
        let bytes = stats.bytes_from_server.load(Ordering::Relaxed) - first;
        let t1 = monotonic_us();
        let w1 = pcap::now();
        let drops1 = udp_rcvbuf_errors();
        let elapsed = started.elapsed().as_secs_f64();
        let traffic = capture.stop(Some((w0, w1)));
        client.end(Duration::from_secs(30));
        drop(link);
        let said = wait_workloads_done(&mut self.desktop.guest)?;
        let frames: Vec<serde_json::Value> = std::fs::read_to_string(record.join("frames.jsonl"))
            .map_err(|e| format!("no frames.jsonl: {e}: {}", client_log()))?
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|f| f["decoded_us"].as_u64().is_some_and(|t| (t0..=t1).contains(&t)))
            .collect();
        let traffic = traffic?;
        Ok(Measured {
            ip_kb_s: traffic.from_port_bytes as f64 / 1000.0 / elapsed,
            traffic,
            kb_s: bytes as f64 / 1000.0 / elapsed,
            rcvbuf_drops: drops0.zip(drops1).map(|(a, b)| b.saturating_sub(a)),
            first_kb: first as f64 / 1000.0,
            frames,
            seconds: elapsed,
            said,
        })
    }

    fn shutdown(mut self) {
        let _ = pleiades_control::request(
            &self.desktop.control(),
            &pleiades_control::Request::Shutdown,
            Duration::from_secs(30),
        );
        let _ = self.desktop.guest.wait_exit(SHELL);
    }
}

/// The SPICE side: the image under QEMU with SPICE, `remote-viewer` on an Xvfb display.
struct Spice {
    guest: Guest,
    server: std::net::SocketAddr,
    xvfb: Xvfb,
    dir: tempfile::TempDir,
    runs: u32,
}

impl Spice {
    fn boot(streaming_video: &str) -> Result<(Self, String), String> {
        let image = GuestImage::locate().map_err(|e| e.to_string())?;
        let port = spice::free_port().map_err(|e| e.to_string())?;
        let config = GuestConfig {
            qemu_args: spice::spice_args(port, SCREEN.0, SCREEN.1, streaming_video),
            ..GuestConfig::default()
        };
        let (mut guest, _) = Guest::boot(&image, &config).map_err(|e| e.to_string())?;
        guest
            .run(&format!("{WAIT_FOR_TTY1_SHELL} && echo 0 > /sys/class/graphics/fbcon/cursor_blink"), SHELL)
            .map_err(|e| e.to_string())?;
        let screen = guest_screen(&mut guest);
        let xvfb = Xvfb::start(1920, 1080)?;
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let server = format!("127.0.0.1:{port}").parse().map_err(|e| format!("{e}"))?;
        Ok((Self { guest, server, xvfb, dir, runs: 0 }, screen))
    }

    fn measure(&mut self, workload: &str, config: LinkConfig, seconds: u32) -> Result<Measured, String> {
        self.runs += 1;
        draw_background(&mut self.guest)?;
        let relay = TcpRelay::start(self.server, config).map_err(|e| e.to_string())?;
        let log = self.dir.path().join(format!("viewer-{}.log", self.runs));
        let mut viewer =
            Viewer::start(&self.xvfb, relay.addr(), &log).map_err(|e| format!("remote-viewer: {e}"))?;
        let stats = relay.stats();
        let connected = Instant::now();
        let mut last = 0;
        wait_for("SPICE's first picture to settle", Duration::from_secs(90), || {
            std::thread::sleep(Duration::from_millis(750));
            if !viewer.running() {
                return Some(false);
            }
            let now = stats.from_server.load(Ordering::Relaxed);
            let settled = connected.elapsed() > Duration::from_secs(3)
                && stats.connections.load(Ordering::Relaxed) >= 2
                && now > 0
                && now - last < 1500;
            last = now;
            settled.then_some(true)
        })
        .and_then(|alive| if alive { Ok(()) } else { Err("remote-viewer ended".into()) })
        .map_err(|e| format!("{e}: {}", viewer.log_tail()))?;
        let capture = Capture::start(Transport::Tcp, self.server.port())?;
        let first = stats.from_server.load(Ordering::Relaxed);
        let w0 = pcap::now();
        let started = Instant::now();
        start_workloads(&mut self.guest, &[workload], seconds)?;
        std::thread::sleep(
            (started + Duration::from_secs(u64::from(seconds))).saturating_duration_since(Instant::now()),
        );
        let bytes = stats.from_server.load(Ordering::Relaxed) - first;
        let w1 = pcap::now();
        let elapsed = started.elapsed().as_secs_f64();
        let traffic = capture.stop(Some((w0, w1)))?;
        if !viewer.running() {
            return Err(format!("remote-viewer ended during the run: {}", viewer.log_tail()));
        }
        drop(viewer);
        drop(relay);
        let said = wait_workloads_done(&mut self.guest)?;
        Ok(Measured {
            ip_kb_s: traffic.from_port_bytes as f64 / 1000.0 / elapsed,
            traffic,
            kb_s: bytes as f64 / 1000.0 / elapsed,
            rcvbuf_drops: None,
            first_kb: first as f64 / 1000.0,
            frames: Vec::new(),
            seconds: elapsed,
            said,
        })
    }
}

fn ms(v: f64) -> String {
    if v.is_finite() { format!("{v:.0}") } else { "-".into() }
}

fn main() {
    let seconds: u32 =
        std::env::var("PLEIADES_BENCH_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(10).max(1);
    let workloads = pick("PLEIADES_BENCH_WORKLOADS", ALL_WORKLOADS, DEFAULT_WORKLOADS);
    let all_links = links();
    let names: Vec<&str> = all_links.iter().map(|(n, _)| *n).collect();
    let link_names = pick("PLEIADES_BENCH_LINKS", &names, &names);
    let chosen: Vec<(&str, LinkConfig)> =
        all_links.into_iter().filter(|(n, _)| link_names.contains(n)).collect();
    let pressure = link_names.contains(&"loopback")
        && std::env::var("PLEIADES_BENCH_PRESSURE").map_or(true, |v| v.trim() != "0");
    let video_mode = std::env::var("PLEIADES_BENCH_SPICE_VIDEO").unwrap_or_else(|_| "filter".into());

    // Prerequisites first: a missing SPICE is said before minutes of Pleiades runs.
    let Some(()) = prerequisite::require("guest_display", spice::prerequisites()) else {
        return;
    };
    // The byte counts are packet captures: tcpdump must be able to capture on lo.
    let Some(_) = prerequisite::require(
        "guest_display",
        Capture::start(Transport::Udp, 9).and_then(|c| c.stop(None)).map_err(|e| format!("tcpdump: {e}")),
    ) else {
        return;
    };
    let Some(_) = prerequisite::require("guest_display", GuestImage::locate()) else {
        return;
    };

    let accel =
        pleiades_vmm::accel::choose().map(|a| format!("{:?}", a.accel)).unwrap_or_else(|e| e.to_string());
    let build = std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.file_name()?.to_string_lossy().into_owned()))
        .map_or("?".into(), |dir| if dir == "debug" { "dev".to_owned() } else { dir });
    println!(
        "guest display benchmark: the Linux test image (2 vCPUs, 512 MiB, {accel}), {seconds} s per run, \
         Pleiades ({build} build of run --listen and the headless client) and SPICE (QEMU virtio-gpu-pci, \
         streaming-video={video_mode}, remote-viewer)"
    );

    // Pleiades: every link and workload, then the pressure block, on one booted guest.
    type Key = (String, String);
    let mut pleiades: Vec<(Key, Result<Measured, String>)> = Vec::new();
    let mut pressure_rows: Vec<(&str, Result<Measured, String>)> = Vec::new();
    match Pleiades::boot() {
        Ok((mut p, screen)) => {
            println!("Pleiades guest screen: {screen}");
            for (name, config) in &chosen {
                for w in &workloads {
                    let r = p.measure(&[w], *config, seconds);
                    eprintln!(
                        "pleiades {name} {w}: {}",
                        r.as_ref().map_or_else(|e| e.clone(), Measured::summary)
                    );
                    pleiades.push(((name.to_string(), w.to_string()), r));
                }
            }
            if pressure {
                for (label, set) in
                    [("typing alone", &["typing"][..]), ("typing + video", &["typing", "video"][..])]
                {
                    let r = p.measure(set, LinkConfig::CLEAN, seconds);
                    eprintln!(
                        "pleiades pressure {label}: {}",
                        r.as_ref().map_or_else(|e| e.clone(), |m| m.said.clone())
                    );
                    pressure_rows.push((label, r));
                }
            }
            p.shutdown();
        }
        Err(e) => println!("Pleiades: the served guest did not start: {e}"),
    }

    // SPICE: every link and workload on one booted guest.
    let mut spice_rows: Vec<(Key, Result<Measured, String>)> = Vec::new();
    match Spice::boot(&video_mode) {
        Ok((mut s, screen)) => {
            println!("SPICE guest screen: {screen}");
            for (name, config) in &chosen {
                let lossless = LinkConfig { loss: 0.0, ..*config };
                for w in &workloads {
                    let r = s.measure(w, lossless, seconds);
                    eprintln!(
                        "spice {name} {w}: {}",
                        r.as_ref().map_or_else(|e| e.clone(), Measured::summary)
                    );
                    spice_rows.push(((name.to_string(), w.to_string()), r));
                }
            }
            let _ = s.guest.poweroff(SHELL);
        }
        Err(e) => println!("SPICE: the guest did not start: {e}"),
    }

    let find = |rows: &[(Key, Result<Measured, String>)], link: &str, w: &str| -> Option<usize> {
        rows.iter().position(|((l, x), _)| l == link && x == w)
    };
    for (name, _) in &chosen {
        println!("\n{}", link_title(name));
        println!(
            "  {:<8} {:>16} {:>13} {:>15} {:>21} {:>12} {:>19} {:>9} {:>14} {:>16} {:>18}",
            "workload",
            "Pleiades IP kB/s",
            "SPICE IP kB/s",
            "Pleiades/SPICE",
            "payload kB/s P / S",
            "Pleiades fps",
            "Pleiades p50/p95 ms",
            "SPICE fps",
            "SPICE p50/p95",
            "bytes ≤ 0.5× SPICE",
            "first kB P / S"
        );
        for w in &workloads {
            let p = find(&pleiades, name, w).map(|i| &pleiades[i].1);
            let s = find(&spice_rows, name, w).map(|i| &spice_rows[i].1);
            let p_kb = p.and_then(|r| r.as_ref().ok()).map(|m| m.ip_kb_s);
            let s_kb = s.and_then(|r| r.as_ref().ok()).map(|m| m.ip_kb_s);
            let p_payload = p.and_then(|r| r.as_ref().ok()).map(|m| m.kb_s);
            let s_payload = s.and_then(|r| r.as_ref().ok()).map(|m| m.kb_s);
            let (ratio, target) = match (p_kb, s_kb) {
                (Some(a), Some(b)) if b > 0.0 => {
                    (format!("{:.2}", a / b), if a <= 0.5 * b { "yes" } else { "no" }.to_owned())
                }
                _ => ("-".into(), "-".into()),
            };
            let (fps, lat, first_p) = match p.and_then(|r| r.as_ref().ok()) {
                Some(m) => {
                    let all: Vec<&serde_json::Value> = m.frames.iter().collect();
                    let (p50, p95) = latency(&all);
                    (
                        format!("{:.1}", m.fps(|_| true)),
                        format!("{} / {}", ms(p50), ms(p95)),
                        format!("{:.0}", m.first_kb),
                    )
                }
                None => ("-".into(), "-".into(), "-".into()),
            };
            let first_s =
                s.and_then(|r| r.as_ref().ok()).map_or("-".into(), |m| format!("{:.0}", m.first_kb));
            let kb = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.1}"));
            println!(
                "  {:<8} {:>16} {:>13} {:>15} {:>21} {:>12} {:>19} {:>9} {:>14} {:>16} {:>18}",
                w,
                kb(p_kb),
                kb(s_kb),
                ratio,
                format!("{} / {}", kb(p_payload), kb(s_payload)),
                fps,
                lat,
                "-",
                "-",
                target,
                format!("{first_p} / {first_s}")
            );
            for (who, r) in [("Pleiades", p), ("SPICE", s)] {
                if let Some(Err(e)) = r {
                    println!("    {who} failed: {}", e.lines().next().unwrap_or(""));
                }
            }
        }
    }

    if !pressure_rows.is_empty() {
        println!(
            "\ntyping under CPU pressure (Pleiades, loopback, {seconds} s each; the frames with tiles are the typing frames)"
        );
        println!(
            "  {:<16} {:>17} {:>19} {:>15}",
            "run", "typing frames/s", "typing p50/p95 ms", "video frames/s"
        );
        for (label, r) in &pressure_rows {
            match r {
                Ok(m) => {
                    let typing: Vec<&serde_json::Value> =
                        m.frames.iter().filter(|f| f["tiles"].as_u64().unwrap_or(0) > 0).collect();
                    let (p50, p95) = latency(&typing);
                    let video = if label.contains("video") {
                        format!("{:.1}", m.fps(|f| f["videos"].as_u64().unwrap_or(0) > 0))
                    } else {
                        "-".into()
                    };
                    println!(
                        "  {:<16} {:>17.1} {:>19} {:>15}",
                        label,
                        typing.len() as f64 / m.seconds,
                        format!("{} / {}", ms(p50), ms(p95)),
                        video
                    );
                }
                Err(e) => println!("  {label:<16} failed: {}", e.lines().next().unwrap_or("")),
            }
        }
    }

    println!(
        "\n  IP kB/s: IP bytes server → client in the measured window (1 kB = 1000 B), counted the same way for \
         both by a packet capture on loopback (tcpdump -i lo): every packet whose source is the server's port, \
         its IP total length (IP + UDP/TCP headers + payload, no Ethernet header), ACK-only packets included \
         (QUIC's ACK packets and SPICE's pure TCP ACKs alike). Pleiades: the session server's UDP port (the leg \
         between the server and the link emulator, before the link's loss); SPICE: QEMU's SPICE port (the leg \
         between QEMU and the relay, every SPICE channel). Loopback's MTU is 64 KiB and lo takes GSO/TSO \
         packets whole, so IP and UDP/TCP headers count once per loopback packet, for both. The window starts \
         when the workload starts, after the first full-screen picture settled."
    );
    println!(
        "  payload kB/s P / S: the same window's application payload bytes server → client, no IP/UDP/TCP \
         headers: Pleiades the UDP payloads into the link emulator (QUIC's ACKs and AEAD tags included), SPICE \
         the TCP payloads through the relay (its TCP ACKs carry none); datagrams the kernel dropped for the \
         link emulator's full receive buffer (stderr) are in the IP kB/s, not here. first kB P / S: payload bytes from \
         connecting to the settled first picture, connection setup included; not in kB/s."
    );
    println!(
        "  Pleiades fps, p50/p95 (ms): frames presented by the headless client in the window and their update \
         latency (guest flush captured → presented); the guest's fbdev flushes what was written every 50 ms, \
         so a frame the TCG guest draws slowly may arrive in parts (each workload's own count of drawn frames \
         goes to stderr). SPICE fps and latency are not measured (\"-\"): remote-viewer exposes no per-frame \
         timing."
    );
    println!(
        "  wan: SPICE's relay applies the delay and the rate but no loss (a TCP stream cannot lose segments in a \
         userspace relay): SPICE's wan row is on a lossless link, which favours SPICE."
    );
    println!(
        "  Pleiades/SPICE and bytes ≤ 0.5× SPICE: from the IP kB/s (packet capture); the target of issue #20 is \
         Pleiades' at most half of SPICE's."
    );
}
