//! The audio benchmark: `cargo bench -p pleiades-tests --bench audio` (build the binaries of the
//! same profile first: `cargo build --release -p pleiades-host -p pleiades-client --bins`; or
//! run both with `--profile dev`).
//!
//! The Linux test image under QEMU plays a 440 Hz tone (`pleiades-agent tone`) while it types
//! on its console (`pleiades-agent workload typing`, so display frames flow too), served by
//! `pleiades-host run --device gpu --device sound --listen`; the headless client records. Per
//! link (loopback; 40 ms RTT at 100 Mbit/s with 1 % loss each way, emulated by
//! `pleiades_tests::linkem`) it prints:
//! - audio latency p50/p95: the device's play clock → the client's output of the frame, plus
//!   the device's mean guest hand-over → play delay (the guest's ALSA buffering), which together
//!   are guest write → client output;
//! - the same run's display update latency p50 (guest flush → client framebuffer), the
//!   reference audio is lined up against (lip sync: their difference is the A/V offset);
//! - kbit/s while audio flows, and the bytes sent against the PCM bytes the guest's sound
//!   device played in the same run (its `bytes_played`);
//! - frames recovered by FEC, concealed (no FEC data for them), and underruns.
//!
//! Both ends use CLOCK_MONOTONIC on this machine, so the latencies are true ones.
//! `PLEIADES_BENCH_SECONDS` (default 6) sets the tone's length.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use pleiades_control::{self as control, Request};
use pleiades_protocol::connfile::Connection;
use pleiades_tests::image::GuestImage;
use pleiades_tests::linkem::{Link, LinkConfig};
use pleiades_tests::qemu::{Guest, boot_timeout};
use pleiades_tests::workspace_binary;

fn status(control_socket: &Path) -> serde_json::Value {
    control::request(control_socket, &Request::Status, Duration::from_secs(30))
        .ok()
        .and_then(|r| r.result)
        .unwrap_or_default()
}

fn mint(control_socket: &Path, out: &Path) -> Connection {
    let response =
        control::request(control_socket, &Request::ConnectionFile, Duration::from_secs(30)).unwrap();
    let toml = response.result.unwrap()["toml"].as_str().unwrap().to_owned();
    std::fs::write(out, &toml).unwrap();
    Connection::from_toml(&toml).unwrap()
}

struct Run {
    audio: serde_json::Value,
    summary: serde_json::Value,
    queued_to_play_ms: f64,
    lost: u64,
    /// PCM bytes the guest's sound device played during the run (the same-run reference).
    pcm_bytes: f64,
}

fn run_once(
    guest: &mut Guest,
    dir: &Path,
    name: &str,
    link: Option<LinkConfig>,
    seconds: u32,
) -> Result<Run, String> {
    let control_socket = dir.join("vm.sock");
    let file = dir.join(format!("{name}.pleiades"));
    let connection = mint(&control_socket, &file);
    let link = match link {
        Some(config) => {
            let server =
                format!("{}:{}", connection.host, connection.port).parse().map_err(|e| format!("{e}"))?;
            let link = Link::start(server, config).map_err(|e| e.to_string())?;
            let through = Connection {
                host: link.client_addr().ip().to_string(),
                port: link.client_addr().port(),
                ..connection
            };
            std::fs::write(&file, through.to_toml()).map_err(|e| e.to_string())?;
            Some(link)
        }
        None => None,
    };
    let record = dir.join(name);
    let child = Command::new(workspace_binary("pleiades")?)
        .arg("connect")
        .arg(&file)
        .args(["--headless", "--duration", &(seconds + 10).to_string(), "--record"])
        .arg(&record)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while status(&control_socket)["session"]["client_connected"] != true {
        if Instant::now() > deadline {
            return Err("the client did not connect".into());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let before = status(&control_socket)["sound"].clone();
    guest
        .run(
            &format!(
                "pleiades-agent workload typing --seconds {seconds} & pleiades-agent tone --seconds {seconds}; wait"
            ),
            Duration::from_secs(u64::from(seconds) + 120),
        )
        .map_err(|e| e.to_string())?;
    let after = status(&control_socket)["sound"].clone();
    let output = child.wait_with_output().map_err(|e| e.to_string())?;
    if !output.status.success() {
        return Err(String::from_utf8_lossy(&output.stderr).into_owned());
    }
    let read = |f: &str| -> Result<serde_json::Value, String> {
        serde_json::from_str(&std::fs::read_to_string(record.join(f)).map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())
    };
    // The device's mean over this run only: (sum after − sum before) / (periods after − before).
    let periods =
        after["periods_played"].as_f64().unwrap_or(0.0) - before["periods_played"].as_f64().unwrap_or(0.0);
    let mean = |v: &serde_json::Value| {
        v["mean_queued_to_play_us"].as_f64().unwrap_or(0.0) * v["periods_played"].as_f64().unwrap_or(0.0)
    };
    let queued_to_play_ms =
        if periods > 0.0 { (mean(&after) - mean(&before)) / periods / 1000.0 } else { 0.0 };
    let lost = link.map_or(0, |l| l.stats().lost.load(std::sync::atomic::Ordering::Relaxed));
    let pcm_bytes =
        after["bytes_played"].as_f64().unwrap_or(0.0) - before["bytes_played"].as_f64().unwrap_or(0.0);
    Ok(Run { audio: read("audio.json")?, summary: read("summary.json")?, queued_to_play_ms, lost, pcm_bytes })
}

fn main() {
    let seconds: u32 = std::env::var("PLEIADES_BENCH_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(6);
    let image = GuestImage::locate().expect("the test guest image (./dev guest-image)");
    let host: PathBuf = workspace_binary("pleiades-host").expect("pleiades-host of this profile");
    let dir = tempfile::tempdir().unwrap();
    let accel = pleiades_vmm::accel::choose().expect("accelerator");
    let args = ["--vmm", "qemu", "--device", "gpu", "--device", "sound", "--listen", "127.0.0.1:0"];
    let mut guest =
        Guest::start_host(&host, &image, &args, &dir.path().join("vm.sock"), accel).expect("host starts");
    guest.wait_ready(boot_timeout()).expect("READY");
    println!("audio benchmark: {seconds} s of 440 Hz from the guest (QEMU), Opus 96 kbit/s, 20 ms frames");
    println!(
        "  {:<16} {:>9} {:>9} {:>11} {:>11} {:>10} {:>10} {:>9} {:>5} {:>5} {:>5} {:>5}",
        "link",
        "p50 ms",
        "p95 ms",
        "+guest buf",
        "video p50",
        "kbit/s",
        "PCM KiB",
        "vs PCM",
        "fec",
        "conc",
        "undr",
        "lost"
    );
    let links = [
        ("loopback", None),
        ("40ms/1%/100Mbit", Some(LinkConfig::wan(Duration::from_millis(40), 0.01, 100))),
    ];
    for (name, link) in links {
        match run_once(&mut guest, dir.path(), name.split('/').next().unwrap_or(name), link, seconds) {
            Ok(r) => {
                let a = &r.audio;
                let ms = |v: &serde_json::Value| v.as_f64().unwrap_or(0.0) / 1000.0;
                let kbit = a["stream_kbit_s"].as_f64().unwrap_or(0.0);
                // No ratio without its reference.
                let vs_pcm = match a["bytes"].as_f64() {
                    Some(sent) if r.pcm_bytes > 0.0 => format!("{:.1}%", sent / r.pcm_bytes * 100.0),
                    _ => "n/a".to_owned(),
                };
                println!(
                    "  {:<16} {:>9.1} {:>9.1} {:>11.1} {:>11.1} {:>10.1} {:>10.0} {:>9} {:>5} {:>5} {:>5} {:>5}",
                    name,
                    ms(&a["latency"]["p50_us"]),
                    ms(&a["latency"]["p95_us"]),
                    r.queued_to_play_ms,
                    ms(&r.summary["latency"]["p50_us"]),
                    kbit,
                    r.pcm_bytes / 1024.0,
                    vs_pcm,
                    a["recovered_fec"],
                    a["concealed"].as_u64().unwrap_or(0) + a["fec_unavailable"].as_u64().unwrap_or(0),
                    a["underruns"],
                    r.lost,
                );
            }
            Err(e) => println!("  {name:<16} failed: {e}"),
        }
    }
    println!(
        "\n  p50/p95: device play clock → client output; +guest buf: the device's mean guest hand-over → play (guest write → client output = both);\n  video p50: the same run's display update latency (the A/V offset is the difference); PCM KiB: what the guest's sound device played in the run; vs PCM: bytes received / those PCM bytes"
    );
    let _ = guest.run("poweroff -f", Duration::from_secs(10));
}
