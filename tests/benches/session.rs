//! The remote-desktop protocol benchmark: `cargo bench -p pleiades-tests --bench session`.
//!
//! For each network condition (loopback; 20 ms RTT at 100 Mbit/s; 100 ms RTT, 2 % loss each
//! way, 10 Mbit/s — emulated by `pleiades_tests::linkem`, since this kernel has no netem) and
//! each synthetic workload (`pleiades-host run --synthetic`: idle, typing, scroll, video,
//! motion at 1920x1080), it runs the release host and the headless client for a while and
//! prints:
//! - kbit/s and frames/s after the first (full-screen) frame, whose size is shown apart;
//! - update latency, guest flush → client framebuffer updated (CLOCK_MONOTONIC on both ends),
//!   p50 and p95;
//! - host CPU per frame: the session's and encoder's threads only (the synthetic painter, which
//!   stands in for the guest, is left out), from /proc/PID/task/*/stat;
//! - queue growth: the median latency of the last third of the frames over the first third
//!   (about 1 when nothing piles up).
//!
//! It builds the release binaries first. `PLEIADES_BENCH_SECONDS` (default 10) sets each run's
//! length; `PLEIADES_BENCH_WORKLOADS` / `PLEIADES_BENCH_LINKS` (comma lists) pick a subset.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use pleiades_protocol::connfile::Connection;
use pleiades_tests::linkem::{Link, LinkConfig};

const WORKLOADS: &[&str] = &["idle", "typing", "scroll", "video", "motion"];

fn links() -> Vec<(&'static str, Option<LinkConfig>)> {
    vec![
        ("loopback", None),
        ("20ms/100Mbit", Some(LinkConfig::wan(Duration::from_millis(20), 0.0, 100))),
        ("100ms/2%/10Mbit", Some(LinkConfig::wan(Duration::from_millis(100), 0.02, 10))),
    ]
}

fn release_binaries(root: &Path) -> (PathBuf, PathBuf) {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args(["build", "--release", "--quiet", "-p", "pleiades-host", "-p", "pleiades-client", "--bins"])
        .current_dir(root)
        .status()
        .expect("cargo runs");
    assert!(status.success(), "building the release binaries failed");
    let dir = root.join("target/release");
    (dir.join("pleiades-host"), dir.join("pleiades"))
}

/// CPU time (ms) of a process (threads that ended included) minus its threads named `skip`.
fn cpu_ms(pid: u32, skip: &str) -> f64 {
    // utime + stime (fields 14 and 15) in USER_HZ ticks, 100 per second on Linux.
    let ticks = |stat: &str| -> Option<(String, f64)> {
        let (name, rest) = stat.split_once(" (")?.1.rsplit_once(") ")?;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        Some((name.to_owned(), fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?))
    };
    let total = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| ticks(&s))
        .map_or(0.0, |t| t.1);
    let skipped: f64 = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|tasks| {
            tasks
                .flatten()
                .filter_map(|t| std::fs::read_to_string(t.path().join("stat")).ok())
                .filter_map(|s| ticks(&s))
                .filter(|(name, _)| name == skip)
                .map(|(_, t)| t)
                .sum()
        })
        .unwrap_or(0.0);
    (total - skipped) * 10.0
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

struct Row {
    first_kb: f64,
    kbit_s: f64,
    fps: f64,
    p50_ms: f64,
    p95_ms: f64,
    cpu_ms_per_frame: f64,
    growth: f64,
}

fn run_once(
    host: &Path,
    client: &Path,
    workload: &str,
    link: Option<LinkConfig>,
    seconds: u32,
) -> Result<Row, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let file = dir.path().join("c.pleiades");
    let mut server: Child = Command::new(host)
        .args(["run", "--synthetic", workload, "--listen", "127.0.0.1:0", "--connection-file"])
        .arg(&file)
        .env("PLEIADES_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| e.to_string())?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !file.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let result = (|| {
        let mut connection =
            Connection::from_toml(&std::fs::read_to_string(&file).map_err(|e| e.to_string())?)
                .map_err(|e| e.to_string())?;
        let _link = match link {
            Some(config) => {
                let addr =
                    format!("{}:{}", connection.host, connection.port).parse().map_err(|e| format!("{e}"))?;
                let link = Link::start(addr, config).map_err(|e| e.to_string())?;
                connection.port = link.client_addr().port();
                Some(link)
            }
            None => None,
        };
        let target = dir.path().join("target.pleiades");
        std::fs::write(&target, connection.to_toml()).map_err(|e| e.to_string())?;
        let record = dir.path().join("rec");
        let cpu_before = cpu_ms(server.id(), "synthetic");
        let output = Command::new(client)
            .arg("connect")
            .arg(&target)
            .args(["--headless", "--duration", &seconds.to_string(), "--record"])
            .arg(&record)
            .env("RUST_LOG", "warn")
            .output()
            .map_err(|e| e.to_string())?;
        let cpu = cpu_ms(server.id(), "synthetic") - cpu_before;
        if !output.status.success() {
            return Err(String::from_utf8_lossy(&output.stderr)
                .lines()
                .last()
                .unwrap_or("failed")
                .to_owned());
        }
        let frames: Vec<serde_json::Value> = std::fs::read_to_string(record.join("frames.jsonl"))
            .map_err(|e| e.to_string())?
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        let (first, rest) = frames.split_first().ok_or("no frames")?;
        let bytes: f64 = rest.iter().filter_map(|f| f["bytes"].as_f64()).sum();
        let span_us = match (rest.first(), rest.last()) {
            (Some(a), Some(b)) => {
                (b["decoded_us"].as_f64().unwrap_or(0.0) - a["decoded_us"].as_f64().unwrap_or(0.0)).max(1.0)
            }
            _ => f64::from(seconds) * 1e6,
        };
        let span_s = if rest.len() > 1 { span_us / 1e6 } else { f64::from(seconds) };
        let latencies: Vec<f64> =
            rest.iter().filter_map(|f| f["update_latency_us"].as_f64()).map(|us| us / 1000.0).collect();
        let mut sorted = latencies.clone();
        sorted.sort_by(f64::total_cmp);
        let third = latencies.len() / 3;
        let median = |v: &[f64]| {
            let mut v = v.to_vec();
            v.sort_by(f64::total_cmp);
            percentile(&v, 0.5)
        };
        let growth = if third >= 3 {
            median(&latencies[latencies.len() - third..]) / median(&latencies[..third])
        } else {
            f64::NAN
        };
        Ok(Row {
            first_kb: first["bytes"].as_f64().unwrap_or(0.0) / 1000.0,
            kbit_s: bytes * 8.0 / 1000.0 / span_s.max(f64::from(seconds) - 1.0),
            fps: rest.len() as f64 / span_s.max(1e-3),
            p50_ms: percentile(&sorted, 0.5),
            p95_ms: percentile(&sorted, 0.95),
            cpu_ms_per_frame: cpu / frames.len().max(1) as f64,
            growth,
        })
    })();
    let _ = server.kill();
    let _ = server.wait();
    result
}

fn pick<'a>(env: &str, all: Vec<&'a str>) -> Vec<&'a str> {
    match std::env::var(env) {
        Ok(list) => all.into_iter().filter(|w| list.split(',').any(|x| x == *w)).collect(),
        Err(_) => all,
    }
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_owned();
    let (host, client) = release_binaries(&root);
    let seconds: u32 =
        std::env::var("PLEIADES_BENCH_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(10);
    let workloads = pick("PLEIADES_BENCH_WORKLOADS", WORKLOADS.to_vec());
    let link_names = pick("PLEIADES_BENCH_LINKS", links().iter().map(|(n, _)| *n).collect());
    println!("session benchmark: synthetic 1920x1080 desktops, {seconds} s per run, release binaries");
    for (name, config) in links().into_iter().filter(|(n, _)| link_names.contains(n)) {
        println!("\n{name}");
        println!(
            "  {:<8} {:>10} {:>10} {:>8} {:>10} {:>10} {:>14} {:>8}",
            "workload", "first kB", "kbit/s", "fps", "p50 ms", "p95 ms", "host ms/frame", "growth"
        );
        for workload in &workloads {
            match run_once(&host, &client, workload, config, seconds) {
                Ok(r) => println!(
                    "  {:<8} {:>10.0} {:>10.1} {:>8.1} {:>10.1} {:>10.1} {:>14.2} {:>8.2}",
                    workload, r.first_kb, r.kbit_s, r.fps, r.p50_ms, r.p95_ms, r.cpu_ms_per_frame, r.growth
                ),
                Err(e) => println!("  {workload:<8} failed: {e}"),
            }
        }
    }
    println!(
        "\n  first kB: the first (full-screen) frame; kbit/s, fps, latency: the frames after it; growth: median latency of the last third over the first third"
    );
}
