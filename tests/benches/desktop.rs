//! The desktops benchmark: `cargo bench -p pleiades-tests --bench desktop` (build the binaries of
//! the same profile first: `cargo build --release -p pleiades-host -p pleiades-broker -p
//! pleiades-client --bins`; or run both with `--profile dev`). Needs root (desktops' networks),
//! the test image and the desktop image (`cargo xtask desktop-image`).
//!
//! Through the real broker and `pleiades-host serve` (`--vmm qemu`: QEMU TCG here), it prints:
//! - **boot to a usable desktop**: the desktop image (2 vCPUs, 2 GiB), from the user's request to
//!   Xfce's panel and wallpaper on the screen, against the same image booted by `pleiades-host
//!   run` alone (no broker, no daemon, no network namespace) in the same run;
//! - **recycle**: a floating desktop, from the user's logout to the next user's usable desktop
//!   (a fresh overlay, a new VM), against that first boot;
//! - **disk throughput**: in the test image's guest, `dd` writing 128 MiB to its disk (ext4 on
//!   a qcow2 overlay, virtio-blk; `conv=fsync`) and reading it back with its page cache
//!   dropped, against `dd` of the same sizes on the host, on the file system the overlay lives
//!   on, in the same run. The guest's reads may come from the host's page cache (QEMU opens the
//!   image write-back), so the host's read is of a file it just wrote too.
//!
//! Every figure says which path it comes from: QEMU TCG here, so the ratios are those of
//! emulation, not of KVM.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use pleiades_tests::desktop::{run_desktop_image, wait_usable};
use pleiades_tests::disk::ext4_template;
use pleiades_tests::image::{DesktopImage, GuestImage};
use pleiades_tests::stack::{Stack, StackOptions};
use pleiades_tests::wait_for;

const DESKTOP_BOOT: Duration = Duration::from_secs(900);
const DD_MIB: u64 = 128;

fn options(dir: &Path, pool_kind: &'static str) -> StackOptions {
    StackOptions { spares: 0, max: 1, pool_kind, ..StackOptions::local(dir).unwrap() }
}

/// The desktop image through `pleiades-host run` alone: seconds to a usable desktop.
fn direct_boot(image: &DesktopImage, dir: &Path) -> f64 {
    let (mut command, control) = run_desktop_image(image, dir);
    let started = Instant::now();
    let mut vm = command
        .args(["--device", "gpu", "--device", "keyboard", "--device", "tablet", "--device", "sound"])
        .spawn()
        .unwrap();
    wait_for("the control socket", Duration::from_secs(60), || control.exists().then_some(())).unwrap();
    let usable = wait_usable(&control, DESKTOP_BOOT);
    let seconds = started.elapsed().as_secs_f64();
    let _ = vm.kill();
    let _ = vm.wait();
    usable.unwrap();
    seconds
}

/// Seconds from the user's request (or `since`) to the desktop's usable screen.
fn broker_boot_and_recycle(image: &DesktopImage, guest: &GuestImage, dir: &Path) -> (f64, f64) {
    std::fs::create_dir_all(dir).unwrap();
    let options = options(dir, "floating").with_desktop_image(image);
    let mut stack = Stack::start(options, guest).unwrap();
    let bearer = stack.login("alice", "alice-password-1").unwrap();
    let asked = Instant::now();
    let desktop = stack.request_desktop(&bearer).unwrap();
    stack.wait_in_use(&bearer, &desktop, DESKTOP_BOOT).unwrap();
    let control = stack.host_state.join("desktops").join(&desktop).join("control.sock");
    wait_usable(&control, DESKTOP_BOOT).unwrap();
    let boot = asked.elapsed().as_secs_f64();

    // Logout: the floating desktop is recycled (a fresh overlay, a new VM); the next request
    // gets it once it is ready again.
    let released = Instant::now();
    stack.act(&format!("/api/v1/desktops/{desktop}/release"), &bearer).unwrap();
    let again =
        wait_for("the recycled desktop", DESKTOP_BOOT, || stack.request_desktop(&bearer).ok()).unwrap();
    assert_eq!(again, desktop, "the pool has one desktop");
    stack.wait_in_use(&bearer, &desktop, DESKTOP_BOOT).unwrap();
    wait_for("the second boot", DESKTOP_BOOT, || {
        (stack.serial(&desktop).matches("PLEIADES-READY").count() >= 2).then_some(())
    })
    .unwrap();
    wait_usable(&control, DESKTOP_BOOT).unwrap();
    (boot, released.elapsed().as_secs_f64())
}

/// Uptime in the guest's `/proc/uptime` before and after `command`: seconds it took.
fn timed_in_guest(stack: &Stack, desktop: &str, label: &str, command: &str) -> f64 {
    let expr = format!("cut -d' ' -f1 /proc/uptime; {command}; cut -d' ' -f1 /proc/uptime");
    let answer = stack.ask_guest(desktop, label, &expr);
    let times: Vec<f64> = answer.split_whitespace().filter_map(|t| t.parse().ok()).collect();
    assert_eq!(times.len(), 2, "{label}: {answer:?}");
    times[1] - times[0]
}

/// Seconds `dd` takes on the host.
fn timed_on_host(args: &[String]) -> f64 {
    let started = Instant::now();
    let out = Command::new("dd").args(args).output().unwrap();
    assert!(out.status.success(), "dd {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    started.elapsed().as_secs_f64()
}

fn disk_throughput(guest: &GuestImage, dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let template = dir.join("home.qcow2");
    ext4_template(&template, (DD_MIB as u32) * 2 + 64, &[("README", "bench")]).unwrap();
    let options = StackOptions { disk: Some(template), ..options(dir, "persistent") };
    let mut stack = Stack::start(options, guest).unwrap();
    let bearer = stack.login("alice", "alice-password-1").unwrap();
    let desktop = stack.request_desktop(&bearer).unwrap();
    stack.wait_in_use(&bearer, &desktop, DESKTOP_BOOT).unwrap();
    stack.wait_booted(&desktop, 1);
    let count = format!("count={DD_MIB}");
    let write = timed_in_guest(
        &stack,
        &desktop,
        "write",
        &format!("dd if=/dev/zero of=/home/bench bs=1M {count} conv=fsync 2>/dev/null"),
    );
    let read = timed_in_guest(
        &stack,
        &desktop,
        "read",
        "sync; echo 3 > /proc/sys/vm/drop_caches; dd if=/home/bench of=/dev/null bs=1M 2>/dev/null",
    );
    // The host: the same sizes on the file system of the desktop's overlay.
    let file = stack.host_state.join("disks").join("bench-host.bin");
    let host_write = timed_on_host(&[
        "if=/dev/zero".into(),
        format!("of={}", file.display()),
        "bs=1M".into(),
        count.clone(),
        "conv=fsync".into(),
    ]);
    let host_read = timed_on_host(&[format!("if={}", file.display()), "of=/dev/null".into(), "bs=1M".into()]);
    let _ = std::fs::remove_file(&file);
    let mib_s = |seconds: f64| DD_MIB as f64 / seconds.max(0.001);
    println!(
        "disk write (conv=fsync, {DD_MIB} MiB): guest {:.1} MiB/s, host {:.1} MiB/s, guest/host {:.3}",
        mib_s(write),
        mib_s(host_write),
        mib_s(write) / mib_s(host_write)
    );
    println!(
        "disk read ({DD_MIB} MiB, guest cache dropped): guest {:.1} MiB/s, host {:.1} MiB/s, guest/host {:.3}",
        mib_s(read),
        mib_s(host_read),
        mib_s(read) / mib_s(host_read)
    );
    stack.host.terminate(Duration::from_secs(90)).unwrap();
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo bench -- --list`: nothing to list.
    }
    let guest = GuestImage::locate().expect("the test image: cargo xtask guest-image");
    let dir = tempfile::Builder::new().prefix("pleiades-bench-desktop-").tempdir().unwrap();
    println!("path: QEMU TCG (no hardware KVM here), --vmm qemu, through the broker and pleiades-host serve");
    disk_throughput(&guest, &dir.path().join("disk"));
    match DesktopImage::locate() {
        Ok(image) => {
            let reference = direct_boot(&image, dir.path());
            let (boot, recycle) = broker_boot_and_recycle(&image, &guest, &dir.path().join("broker"));
            println!(
                "boot to a usable desktop (panel + wallpaper): through the broker {boot:.1} s, `pleiades-host run` alone {reference:.1} s, ratio {:.2}",
                boot / reference
            );
            println!(
                "recycle a floating desktop (logout → next user's usable desktop): {recycle:.1} s, {:.2} × the first boot",
                recycle / boot
            );
        }
        Err(e) => println!("boot and recycle: not measured: {e}"),
    }
}
