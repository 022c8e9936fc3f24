//! The remote-desktop session end to end: `pleiades-host run --vmm qemu … --listen` runs the
//! Linux test image and serves it over QUIC; the headless client `pleiades connect` connects
//! with the connection file, types into the guest, and records what it shows. Its framebuffer
//! must equal the host's own screenshot pixel for pixel (the console is lossless content), on
//! loopback and through an emulated 100 ms / 2 % loss / 10 Mbit/s link. Bad tickets, a wrong
//! certificate and a malformed message are refused as docs/protocol.md says, and the VM goes on.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use pleiades_control::screenshot::decode_png;
use pleiades_control::{self as control, Request};
use pleiades_protocol::connfile::Connection;
use pleiades_tests::linkem::{Link, LinkConfig};
use pleiades_tests::served::ServedDesktop;
use pleiades_tests::workspace_binary;
use pleiades_virtio::gpu::Framebuffer;

const SHELL: Duration = Duration::from_secs(60);

type Desktop = ServedDesktop;

/// Boots the test image with a GPU, keyboard and tablet, serving on loopback, its console
/// settled.
fn boot_desktop() -> Desktop {
    let (mut desktop, _) = ServedDesktop::boot(&["gpu", "keyboard", "tablet"]);
    desktop.settle_console(SHELL);
    desktop
}

/// Runs `pleiades connect` headless.
fn connect(target: &Path, record: &Path, duration_s: u32, script: Option<&str>) -> Output {
    let client = workspace_binary("pleiades").unwrap();
    let mut cmd = Command::new(client);
    cmd.arg("connect")
        .arg(target)
        .args(["--headless", "--duration", &duration_s.to_string(), "--record"])
        .arg(record);
    if let Some(script) = script {
        let path = record.with_extension("script");
        std::fs::write(&path, script).unwrap();
        cmd.arg("--input").arg(path);
    }
    cmd.output().expect("pleiades runs")
}

/// A headless client recording in the background until [`finish`] ends it.
struct Recording {
    child: Child,
    record: PathBuf,
    /// The session server's (frames sent, frames acked) when it started.
    baseline: (u64, u64),
}

/// The session server's frames sent and frames acked so far (every connection's).
fn frame_counters(desktop: &Desktop) -> (u64, u64) {
    let session = &desktop.status()["session"];
    (session["frames"].as_u64().unwrap_or(0), session["frames_acked"].as_u64().unwrap_or(0))
}

/// Starts `pleiades connect --headless` without a duration, replaying `script` (which should end
/// with a long `wait`: the recording ends when [`finish`] says, not on a clock).
fn start_recording(desktop: &Desktop, target: &Path, record: &Path, script: Option<&str>) -> Recording {
    let baseline = frame_counters(desktop);
    let mut cmd = Command::new(workspace_binary("pleiades").unwrap());
    cmd.arg("connect").arg(target).args(["--headless", "--record"]).arg(record);
    if let Some(script) = script {
        let path = record.with_extension("script");
        std::fs::write(&path, script).unwrap();
        cmd.arg("--input").arg(path);
    }
    let child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("pleiades runs");
    Recording { child, record: record.to_owned(), baseline }
}

/// Waits until the desktop has settled (monitor 0 the same over three screenshots a second
/// apart, no frame sent or acked meanwhile, every frame sent since the client started acked),
/// then ends the client with SIGTERM; its output, and the screen it should have.
fn finish(desktop: &Desktop, mut recording: Recording) -> (Output, Framebuffer) {
    let deadline = Instant::now() + Duration::from_secs(180);
    let (f0, a0) = recording.baseline;
    let mut samples: Vec<(Framebuffer, (u64, u64))> = Vec::new();
    let screen = loop {
        if let Ok(Some(status)) = recording.child.try_wait() {
            let output = recording.child.wait_with_output().unwrap();
            panic!("the client ended by itself ({status}): {}", text(&output));
        }
        samples.push((desktop.screenshot(), frame_counters(desktop)));
        if let [a, b, c] = &samples[samples.len().saturating_sub(3)..] {
            let (frames, acked) = c.1;
            if a.0.pixels == c.0.pixels
                && b.0.pixels == c.0.pixels
                && a.1 == c.1
                && b.1 == c.1
                && acked > a0
                && frames - f0 == acked - a0
            {
                break c.0.clone();
            }
        }
        assert!(Instant::now() < deadline, "the desktop never settled with every frame acked");
        std::thread::sleep(Duration::from_secs(1));
    };
    let pid = recording.child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let deadline = Instant::now() + Duration::from_secs(60);
    while recording.child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = recording.child.kill();
            panic!("the client did not end on SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let output = recording.child.wait_with_output().unwrap();
    assert!(output.status.success(), "{}", text(&output));
    assert_eq!(session_summary(&output)["end"], "interrupted", "{}", text(&output));
    assert!(recording.record.join("scanout-0.png").is_file());
    (output, screen)
}

fn text(output: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
}

/// Opens a pinned QUIC connection and writes `bytes` as the control stream's first bytes;
/// returns what the server answered before it closed (bounded by a timeout).
fn send_raw_control(connection: &Connection, bytes: &[u8]) -> Vec<u8> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let connected =
            pleiades_client::connect::connect(connection).await.expect("TLS with the pinned server");
        let (mut send, mut recv) = connected.connection.open_bi().await.unwrap();
        send.write_all(bytes).await.unwrap();
        let mut answer = Vec::new();
        let mut buf = [0u8; 1024];
        let _ = tokio::time::timeout(Duration::from_secs(10), async {
            while let Ok(Some(n)) = recv.read(&mut buf).await {
                answer.extend_from_slice(&buf[..n]);
            }
        })
        .await;
        let closed = tokio::time::timeout(Duration::from_secs(10), connected.connection.closed()).await;
        assert!(closed.is_ok(), "the server closed the connection");
        answer
    })
}

/// The client's last frame against the host's screenshot.
fn assert_same_screen(recorded: &Path, host: &Framebuffer) {
    let client = decode_png(&std::fs::read(recorded).expect("the client wrote its last frame")).unwrap();
    assert_eq!((client.width, client.height), (host.width, host.height));
    let differing = client
        .pixels
        .chunks_exact(4)
        .zip(host.pixels.chunks_exact(4))
        .filter(|(a, b)| a[..3] != b[..3])
        .count();
    assert_eq!(differing, 0, "pixels that differ between the client and the host");
}

fn session_summary(output: &Output) -> serde_json::Value {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let start = stdout.find('{').unwrap_or_else(|| panic!("no summary: {}", text(output)));
    serde_json::from_str(&stdout[start..]).unwrap_or_else(|e| panic!("summary: {e}: {}", text(output)))
}

/// Typing through the session reaches the guest, and the client's screen is the host's.
fn type_and_compare(desktop: &mut Desktop, target: &Path, marker: &str) -> serde_json::Value {
    let record = desktop.dir.path().join(format!("rec-{marker}"));
    let script = format!("wait 1500\ntype echo {marker}-$((6*7)) > /dev/ttyS0\\n\nwait 600000\n");
    let recording = start_recording(desktop, target, &record, Some(&script));
    desktop.guest.wait_for(&format!("{marker}-42"), SHELL).expect("the typed command ran in the guest");
    let (output, settled) = finish(desktop, recording);
    let summary = session_summary(&output);
    assert!(summary["frames"].as_u64().unwrap() >= 2, "{summary:#}");
    assert_same_screen(&record.join("scanout-0.png"), &settled);
    summary
}

#[test]
fn the_client_sees_the_guest_and_types_into_it_on_loopback_and_on_a_bad_wan() {
    let mut desktop = boot_desktop();
    let file = desktop.connection_file();
    let loopback = type_and_compare(&mut desktop, &file, "PLEIADES-LAN");
    eprintln!(
        "loopback: {} frames, {:.0} kbit/s, update latency p50 {} µs",
        loopback["frames"],
        loopback["kbit_s"].as_f64().unwrap_or(0.0),
        loopback["latency"]["p50_us"]
    );

    // 100 ms round trip, 2 % loss each way, 10 Mbit/s: input still arrives, and once the screen
    // stops changing the client converges to the host's pixels.
    let connection =
        Connection::from_toml(&std::fs::read_to_string(desktop.mint("wan.pleiades")).unwrap()).unwrap();
    let server: std::net::SocketAddr = format!("{}:{}", connection.host, connection.port).parse().unwrap();
    let link = Link::start(server, LinkConfig::wan(Duration::from_millis(100), 0.02, 10)).unwrap();
    let through_link = Connection {
        host: link.client_addr().ip().to_string(),
        port: link.client_addr().port(),
        ..connection
    };
    let wan_file = desktop.dir.path().join("wan-link.pleiades");
    std::fs::write(&wan_file, through_link.to_toml()).unwrap();
    let wan = type_and_compare(&mut desktop, &wan_file, "PLEIADES-WAN");
    let stats = link.stats();
    eprintln!(
        "100 ms / 2 % / 10 Mbit/s: {} frames, {:.0} kbit/s, latency p50 {} µs; link lost {} packets, forwarded {}",
        wan["frames"],
        wan["kbit_s"].as_f64().unwrap_or(0.0),
        wan["latency"]["p50_us"],
        stats.lost.load(std::sync::atomic::Ordering::Relaxed),
        stats.forwarded.load(std::sync::atomic::Ordering::Relaxed)
    );
    assert!(stats.lost.load(std::sync::atomic::Ordering::Relaxed) > 0, "the link did drop packets");

    let status = control::request(&desktop.control(), &Request::Shutdown, Duration::from_secs(30)).unwrap();
    assert!(status.ok);
    assert!(desktop.guest.wait_exit(SHELL).unwrap().success());
}

#[test]
fn bad_tickets_wrong_certificates_and_malformed_messages_are_refused_and_the_vm_goes_on() {
    let mut desktop = boot_desktop();
    let record = desktop.dir.path().join("rec");
    let file = desktop.connection_file();
    assert!(connect(&file, &record, 2, None).status.success(), "the first use of the ticket works");

    // The same ticket again: one-time.
    let reused = connect(&file, &record, 2, None);
    assert!(!reused.status.success());
    assert!(text(&reused).contains("ReusedTicket"), "{}", text(&reused));

    // A forged ticket (one byte of the signature changed).
    let mut forged =
        Connection::from_toml(&std::fs::read_to_string(desktop.mint("forged.pleiades")).unwrap()).unwrap();
    let last = forged.ticket.pop().unwrap();
    forged.ticket.push(if last == 'A' { 'B' } else { 'A' });
    let forged_file = desktop.dir.path().join("forged2.pleiades");
    std::fs::write(&forged_file, forged.to_toml()).unwrap();
    let bad = connect(&forged_file, &record, 2, None);
    assert!(!bad.status.success());
    assert!(text(&bad).contains("BadTicket"), "{}", text(&bad));

    // A connection file pinning another certificate: the client refuses the server.
    let mut pinned =
        Connection::from_toml(&std::fs::read_to_string(desktop.mint("pin.pleiades")).unwrap()).unwrap();
    pinned.cert_sha256 = "00".repeat(32);
    let pin_file = desktop.dir.path().join("pin2.pleiades");
    std::fs::write(&pin_file, pinned.to_toml()).unwrap();
    let wrong = connect(&pin_file, &record, 2, None);
    assert!(!wrong.status.success());
    assert!(text(&wrong).contains("is not the one the connection file pins"), "{}", text(&wrong));

    // Garbage on the control stream instead of Hello: the server ends that connection.
    let raw = Connection::from_toml(&std::fs::read_to_string(desktop.mint("raw.pleiades")).unwrap()).unwrap();
    let answer = send_raw_control(&raw, &[0xff, 0xff, 0x10, 0, 0, 0, 1, 2, 3]);
    assert!(answer.is_empty(), "the server answered garbage with {} bytes", answer.len());

    // The VM and the session server go on: a fresh ticket connects and sees the console.
    let record = desktop.dir.path().join("rec-again");
    let again = start_recording(&desktop, &desktop.mint("again.pleiades"), &record, None);
    let (_, settled) = finish(&desktop, again);
    assert_same_screen(&record.join("scanout-0.png"), &settled);
    let status = control::request(&desktop.control(), &Request::Status, Duration::from_secs(30)).unwrap();
    let session = &status.result.unwrap()["session"];
    assert!(session["refused"].as_u64().unwrap() >= 2, "{session}");
    assert!(control::request(&desktop.control(), &Request::Shutdown, Duration::from_secs(30)).unwrap().ok);
    assert!(desktop.guest.wait_exit(SHELL).unwrap().success());
}

#[test]
fn a_guest_video_arrives_as_h264_and_a_new_client_takes_the_desktop_over() {
    let mut desktop = boot_desktop();
    // The agent draws the `video` workload through the guest's fbdev (virtio-gpu underneath).
    desktop.guest.run("(pleiades-agent workload video --seconds 60 > /dev/null 2>&1 &)", SHELL).unwrap();
    let client = workspace_binary("pleiades").unwrap();
    let mut first = Command::new(&client)
        .arg("connect")
        .arg(desktop.connection_file())
        .args(["--headless", "--record"])
        .arg(desktop.dir.path().join("rec-a"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The first client holds the session once it acks a frame.
    let deadline = Instant::now() + SHELL;
    while frame_counters(&desktop).1 == 0 {
        assert!(Instant::now() < deadline, "the first client never acked a frame");
        std::thread::sleep(Duration::from_millis(200));
    }

    // A second client with a fresh ticket takes over; it sees the guest's video as H.264.
    let second = connect(&desktop.mint("second.pleiades"), &desktop.dir.path().join("rec-b"), 8, None);
    assert!(second.status.success(), "{}", text(&second));
    let summary = session_summary(&second);
    let h264 =
        summary["codecs"]["h264"].as_u64().unwrap_or(0) + summary["codecs"]["mixed"].as_u64().unwrap_or(0);
    assert!(h264 > 0, "the guest's video went out as H.264: {summary:#}");

    // The first client (no duration: it runs until the server ends it) was told to go.
    let deadline = Instant::now() + SHELL;
    while first.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = first.kill();
            panic!("the first client was not ended when the second took over");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let first = first.wait_with_output().unwrap();
    let said = text(&first);
    assert!(said.contains("replaced"), "the first client learnt why it was closed: {said}");
    let status = control::request(&desktop.control(), &Request::Status, Duration::from_secs(30)).unwrap();
    assert!(status.result.unwrap()["session"]["connections"].as_u64().unwrap() >= 2);
    assert!(control::request(&desktop.control(), &Request::Shutdown, Duration::from_secs(30)).unwrap().ok);
    assert!(desktop.guest.wait_exit(SHELL).unwrap().success());
}
