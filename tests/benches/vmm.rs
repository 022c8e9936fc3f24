//! The VMM benchmark: `cargo bench -p pleiades-tests --bench vmm` (after `cargo build --release
//! --workspace`: it runs the release `pleiades-host`).
//!
//! Prints medians over several runs, each figure next to a reference measured in the same run
//! (these machines are noisy; only ratios mean something):
//! - the Linux test image: start → READY, READY → exit after `poweroff`, and the VMM's resident
//!   memory beyond guest RAM, for QEMU with its own virtio-rng (the reference), `pleiades-host
//!   run --vmm qemu` (QEMU + Pleiades' vhost-user rng process) and `--vmm pleiades`, all on the
//!   same accelerator;
//! - the minimal test guest on KVM: start → exit, and `rng_loop` entropy requests per second,
//!   for QEMU+KVM with its own virtio-rng (the reference) and Pleiades' VMM with the rng device
//!   in-process and as a vhost-user process.
//!
//! `PLEIADES_BENCH_RUNS` (default 5) sets the runs per row, `PLEIADES_BENCH_RNG_LOOP` (default
//! 20000) the requests per rng loop.
//!
//! `-- --kvm-host` runs the same benchmark inside the test kit's KVM host
//! ([`pleiades_tests::kvm_host`]): a VM under QEMU TCG `-cpu max` whose KVM is hardware-backed
//! (svm + npt), so that every row, `--vmm pleiades` with Linux included, runs on one real KVM.
//! Nesting distorts the absolute figures (the KVM host's CPU is emulated: every guest
//! instruction, exit and device request costs tens of times what it costs on hardware); the
//! ratios between rows measured in the same KVM host are what the benchmark reports.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use pleiades_control::{self as control, Request};
use pleiades_tests::image::GuestImage;
use pleiades_tests::qemu::{Guest, GuestConfig, boot_timeout};
use pleiades_tests::testguest::{self, TestGuestConfig};
use pleiades_vmm::accel::{Accel, AccelChoice};

/// One run of a test guest row with a command line: (start → exit seconds, rng requests per
/// second).
type RunOnce<'a> = dyn Fn(&str) -> Result<(f64, f64), String> + 'a;

fn env_number(name: &str, default: u32) -> u32 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// Resident memory of processes beyond their shared-memory mappings (guest RAM is a shared
/// memfd for every VMM measured here), in MiB.
fn rss_beyond_guest_ram_mib(pids: &[u32]) -> f64 {
    let kib: u64 = pids
        .iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/status")).ok())
        .map(|status| {
            status
                .lines()
                .filter(|l| l.starts_with("RssAnon:") || l.starts_with("RssFile:"))
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum::<u64>()
        })
        .sum();
    kib as f64 / 1024.0
}

#[derive(Debug, Default)]
struct LinuxRow {
    ready_s: Vec<f64>,
    exit_s: Vec<f64>,
    rss_mib: Vec<f64>,
}

/// One Linux boot: start → READY, RSS at READY, READY → exit after poweroff.
fn linux_once(
    mut guest: Guest,
    pids_at_ready: impl Fn(&Guest) -> Vec<u32>,
    started: Instant,
    row: &mut LinuxRow,
) -> Result<(), String> {
    guest.wait_ready(boot_timeout()).map_err(|e| e.to_string())?;
    let ready = started.elapsed();
    let rss = rss_beyond_guest_ram_mib(&pids_at_ready(&guest));
    let ready_at = Instant::now();
    let status = guest.poweroff(Duration::from_secs(120)).map_err(|e| e.to_string())?;
    if !status.success() {
        return Err(format!("exit status {status}"));
    }
    row.ready_s.push(ready.as_secs_f64());
    row.exit_s.push(ready_at.elapsed().as_secs_f64());
    row.rss_mib.push(rss);
    Ok(())
}

fn linux_qemu_reference(image: &GuestImage, accel: &AccelChoice, row: &mut LinuxRow) -> Result<(), String> {
    let config = GuestConfig {
        cpus: 2,
        memory_mib: 512,
        shared_memory: true,
        accel: Some(accel.clone()),
        ..GuestConfig::default()
    }
    .device("virtio-rng-pci");
    let started = Instant::now();
    let guest = Guest::start(image, &config).map_err(|e| e.to_string())?;
    linux_once(guest, |g| vec![g.pid()], started, row)
}

fn linux_pleiades_host(
    image: &GuestImage,
    vmm: &str,
    accel: &AccelChoice,
    row: &mut LinuxRow,
) -> Result<(), String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let socket = dir.path().join("vm.sock");
    let started = Instant::now();
    let args = ["--vmm", vmm, "--device", "rng"];
    let guest =
        Guest::start_host(&host(), image, &args, &socket, accel.clone()).map_err(|e| e.to_string())?;
    let pids = |g: &Guest| {
        let mut pids = vec![g.pid()];
        if let Ok(status) = control::request(&socket, &Request::Status, Duration::from_secs(10))
            && let Some(result) = status.result
        {
            pids.extend(result["qemu_pid"].as_u64().map(|p| p as u32));
            for device in result["devices"].as_array().into_iter().flatten() {
                pids.extend(device["pid"].as_u64().map(|p| p as u32));
            }
        }
        pids
    };
    linux_once(guest, pids, started, row)
}

/// A row's reference: this row is it, or it is another row's figure, which is missing when that
/// row failed (then no ratio is printed: never one against another row by mistake).
#[derive(Debug, Clone, Copy)]
enum Reference {
    ThisRow,
    Measured(Option<f64>),
}

impl Reference {
    fn ratio(self, value: f64, per: impl Fn(f64, f64) -> f64) -> String {
        match self {
            Reference::ThisRow => "1.00 (ref)".to_owned(),
            Reference::Measured(Some(reference)) => format!("{:.2}", per(value, reference)),
            Reference::Measured(None) => "no ref".to_owned(),
        }
    }
}

fn linux_row(
    name: &str,
    runs: u32,
    reference: Reference,
    mut once: impl FnMut(&mut LinuxRow) -> Result<(), String>,
) -> Option<f64> {
    let mut row = LinuxRow::default();
    for _ in 0..runs {
        if let Err(e) = once(&mut row) {
            println!("  {name:<30} failed: {}", e.lines().next().unwrap_or(""));
            return None;
        }
    }
    let ready = median(row.ready_s);
    let ratio = reference.ratio(ready, |v, r| v / r);
    println!(
        "  {name:<30} {ready:>9.2} {:>9.2} {:>12.1} {ratio:>14}",
        median(row.exit_s),
        median(row.rss_mib)
    );
    Some(ready)
}

/// One test guest run: (start → exit seconds, rng requests per second).
fn testguest_once(
    cmd_or_qemu: Result<Command, &TestGuestConfig>,
    elf: &Path,
    accel: &AccelChoice,
) -> Result<(f64, f64), String> {
    let run = match cmd_or_qemu {
        Ok(cmd) => testguest::run_command(cmd, Duration::from_secs(300), accel.clone()),
        Err(config) => testguest::run(elf, config),
    }
    .map_err(|e| e.to_string())?;
    if run.result["result"] != "pass" || !run.status.success() {
        return Err(format!("{} (exit {})", run.result["errors"], run.status));
    }
    let requests = run.result["rng_loop"]["requests"].as_f64().unwrap_or(f64::NAN);
    let us = run.result["rng_loop"]["us"].as_f64().unwrap_or(f64::NAN);
    Ok((run.elapsed.as_secs_f64(), requests / us * 1e6))
}

/// Boots the KVM host and runs this benchmark (this very executable) inside it.
fn in_kvm_host(runs: u32, rng_loop: u32) {
    use pleiades_tests::kvm_host::{KvmHost, KvmHostConfig, KvmHostParts, shell_quote};
    let parts = KvmHostParts::locate().unwrap_or_else(|e| panic!("the KVM host cannot start: {e}"));
    let mut host = KvmHost::boot(parts, &KvmHostConfig::default()).unwrap_or_else(|e| panic!("{e}"));
    let boot = host.boot_times();
    println!(
        "KVM host (QEMU TCG -cpu max, kvm_amd, {} vCPUs): READY after {:.1} s; the benchmark runs inside",
        KvmHostConfig::default().cpus,
        boot.ready.as_secs_f64()
    );
    let exe = std::env::current_exe().expect("this benchmark's executable");
    let command = format!(
        "cd /tmp && PLEIADES_BENCH_RUNS={runs} PLEIADES_BENCH_RNG_LOOP={rng_loop} {} 2>&1",
        shell_quote(&exe.display().to_string())
    );
    let lines = host.run(&command, Duration::from_secs(3 * 3600)).unwrap_or_else(|e| panic!("{e}"));
    for line in lines {
        println!("{line}");
    }
}

fn main() {
    let runs = env_number("PLEIADES_BENCH_RUNS", 5).max(1);
    let rng_loop = env_number("PLEIADES_BENCH_RNG_LOOP", 20_000);
    // `cargo bench` passes `--bench`; `--kvm-host` moves the whole run into the KVM host.
    if std::env::args().any(|a| a == "--kvm-host") {
        in_kvm_host(runs, rng_loop);
        return;
    }
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let hardware_kvm = pleiades_vmm::accel::has_hardware_virtualization(&cpuinfo);

    println!(
        "Pleiades VMM benchmark: medians of {runs} runs; ratios against a reference measured in this run"
    );
    match GuestImage::locate() {
        Err(e) => println!("\nLinux test image: skipped: {e}"),
        Ok(image) => {
            let accel = pleiades_vmm::accel::choose().expect("an accelerator");
            println!("\nLinux test image, 2 vCPUs, 512 MiB, accelerator {} ({})", accel.accel, accel.reason);
            println!(
                "  {:<30} {:>9} {:>9} {:>12} {:>14}",
                "vmm", "ready_s", "exit_s", "rss_mib", "ready/qemu"
            );
            let reference = linux_row("qemu + its virtio-rng (ref)", runs, Reference::ThisRow, |row| {
                linux_qemu_reference(&image, &accel, row)
            });
            linux_row("pleiades-host --vmm qemu", runs, Reference::Measured(reference), |row| {
                linux_pleiades_host(&image, "qemu", &accel, row)
            });
            if hardware_kvm {
                linux_row("pleiades-host --vmm pleiades", runs, Reference::Measured(reference), |row| {
                    linux_pleiades_host(&image, "pleiades", &accel, row)
                });
            } else {
                println!(
                    "  {:<30} skipped: KVM here is not hardware-backed; a stock Linux kernel does not boot on it",
                    "pleiades-host --vmm pleiades"
                );
            }
            println!("  (rss_mib: resident memory beyond guest RAM of the VMM and its device processes)");
        }
    }

    let elf = pleiades_tests::image::default_dir(&pleiades_testkit::workspace_root()).join("testguest.elf");
    let kvm = pleiades_vmm::accel::choose_from(Some("kvm"), &cpuinfo, Path::new("/dev/kvm"));
    match (elf.exists(), kvm) {
        (false, _) => {
            println!("\nMinimal test guest: skipped: {} is missing (cargo xtask guest-image)", elf.display())
        }
        (true, Err(e)) => println!("\nMinimal test guest: skipped: {e}"),
        (true, Ok(kvm)) => {
            println!("\nMinimal test guest on KVM, 1 vCPU, 256 MiB, rng_loop={rng_loop}");
            println!("  {:<30} {:>9} {:>12} {:>14}", "vmm", "boot→exit", "rng req/s", "req/s vs qemu");
            let loop_cmdline = format!("rng_loop={rng_loop}");
            let reference_config = |cmdline: &str| {
                TestGuestConfig {
                    cpus: 1,
                    memory_mib: 256,
                    cmdline: cmdline.to_owned(),
                    accel: Some(AccelChoice { accel: Accel::Kvm, reason: "benchmark".into() }),
                    ..TestGuestConfig::default()
                }
                .device("virtio-rng-pci")
            };
            let pleiades = |backend: &str, cmdline: &str| {
                let mut cmd = Command::new(host());
                cmd.env("PLEIADES_LOG", "warn");
                cmd.args([
                    "run",
                    "--vmm",
                    "pleiades",
                    "--cpus",
                    "1",
                    "--memory",
                    "256M",
                    "--cmdline",
                    cmdline,
                ])
                .args(["--device", &format!("rng,backend={backend}")])
                .arg("--kernel")
                .arg(&elf);
                cmd
            };
            let rows: [(&str, Box<RunOnce<'_>>); 3] = [
                (
                    "qemu+kvm + its virtio-rng (ref)",
                    Box::new(|c| testguest_once(Err(&reference_config(c)), &elf, &kvm)),
                ),
                (
                    "pleiades, rng in-process",
                    Box::new(|c| testguest_once(Ok(pleiades("in-process", c)), &elf, &kvm)),
                ),
                (
                    "pleiades, rng over vhost-user",
                    Box::new(|c| testguest_once(Ok(pleiades("vhost-user", c)), &elf, &kvm)),
                ),
            ];
            // The first row is the reference; when it fails, the others print no ratio.
            let mut reference = Reference::ThisRow;
            for (name, once) in rows {
                let mut times = Vec::new();
                let mut rates = Vec::new();
                let mut failed = None;
                for _ in 0..runs {
                    // Boot alone (no loop), then the request loop for the rate.
                    match once("expect=rng").and_then(|(t, _)| Ok((t, once(&loop_cmdline)?.1))) {
                        Ok((t, r)) => {
                            times.push(t);
                            rates.push(r);
                        }
                        Err(e) => {
                            failed = Some(e);
                            break;
                        }
                    }
                }
                if let Some(e) = failed {
                    println!("  {name:<30} failed: {}", e.lines().next().unwrap_or(""));
                    if matches!(reference, Reference::ThisRow) {
                        reference = Reference::Measured(None);
                    }
                    continue;
                }
                let rate = median(rates);
                let ratio = reference.ratio(rate, |v, r| v / r);
                if matches!(reference, Reference::ThisRow) {
                    reference = Reference::Measured(Some(rate));
                }
                println!("  {name:<30} {:>9.3} {rate:>12.0} {ratio:>14}", median(times));
            }
        }
    }
}

/// `pleiades-host`, built beside the tests.
fn host() -> std::path::PathBuf {
    pleiades_tests::workspace_binary("pleiades-host").unwrap_or_else(|e| panic!("{e}"))
}
