//! `pleiades-demo`: the main job of `./dev demo`, once the packages, the guest image and the
//! binaries are there (xtask sees to those, then runs this).
//!
//! The broker (SQLite) with a pool of the graphical desktop image (`cargo xtask desktop-image`:
//! Debian with Xfce on a disk, 2 vCPUs, 2 GiB), a host daemon registered with it, a desktop for
//! the demo user (how long its first boot took, to the panel on the screen) and the headless
//! client on it with the broker's ticket, which opens a terminal and types into it; then the
//! portal URL and the demo logins, and (from a terminal) everything keeps running until Enter.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use pleiades_tests::desktop::wait_usable;
use pleiades_tests::image::{DesktopImage, GuestImage};
use pleiades_tests::stack::{Stack, StackOptions};

#[derive(Debug, Parser)]
#[command(name = "pleiades-demo", about = "Pleiades' demo: broker + host + a pool of desktops + the client")]
struct Cli {
    /// Keep it all running until Enter is pressed. Default: when stdin is a terminal.
    #[arg(long)]
    interactive: Option<bool>,
    /// Where the binaries are (default: beside this program).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Where the demo keeps its state and what the client saw (default: `<bin-dir>/../demo`).
    #[arg(long)]
    dir: Option<PathBuf>,
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The desktop's first boot under QEMU TCG takes about 80 s unloaded.
const DESKTOP_BOOT: Duration = Duration::from_secs(900);

fn step(title: &str) {
    println!("\n==> {title}");
}

fn run(cli: Cli) -> Result<()> {
    let bin_dir = match cli.bin_dir {
        Some(dir) => dir,
        None => std::env::current_exe()?.parent().context("this program has no directory")?.to_owned(),
    };
    let demo_dir = cli.dir.unwrap_or_else(|| bin_dir.parent().unwrap_or(&bin_dir).join("demo"));
    let interactive = cli.interactive.unwrap_or_else(|| std::io::IsTerminal::is_terminal(&std::io::stdin()));
    let image = DesktopImage::locate()?;
    let guest = GuestImage { kernel: image.kernel.clone(), initramfs: image.initrd.clone() };
    // Each run starts from a fresh broker database and host state.
    let stack_dir = demo_dir.join("stack");
    if stack_dir.exists() {
        std::fs::remove_dir_all(&stack_dir)
            .with_context(|| format!("cannot clear {}", stack_dir.display()))?;
    }
    std::fs::create_dir_all(&demo_dir)?;
    // The host runs desktops on Pleiades' VMM where KVM is hardware-backed, and that VMM has no
    // network card yet: the pool's desktops get one only under QEMU.
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let network = if pleiades_vmm::accel::has_hardware_virtualization(&cpuinfo) { "none" } else { "nat" };
    let (user, password) = ("demo", "demo-password");
    let (admin, admin_password) = ("admin", "admin-password");
    let options = StackOptions {
        dir: stack_dir,
        bin_dir: bin_dir.clone(),
        broker_port: free_port(8443, |p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok())?,
        first_session_port: free_port(47000, |p| std::net::UdpSocket::bind(("127.0.0.1", p)).is_ok())?,
        session_ports: 10,
        vmm: None,
        user: (user.into(), password.into()),
        admin: (admin.into(), admin_password.into()),
        // One desktop at a time: each takes 2 vCPUs and 2 GiB.
        spares: 0,
        network,
        ..StackOptions::default().with_desktop_image(&image)
    };
    step("Starting the broker (SQLite) with a pool of the desktop image, and a host that registers with it");
    let started = Instant::now();
    let mut stack = Stack::start(options, &guest).map_err(anyhow::Error::msg)?;
    println!(
        "broker at {} (certificate sha256 {}), host-1 registered in {:.1} s",
        stack.base,
        stack.pin,
        started.elapsed().as_secs_f64()
    );

    step(
        "The demo user gets a desktop from the pool (REST API); the host boots it (the first boot copies the template)",
    );
    let started = Instant::now();
    let bearer = stack.login(user, password).map_err(anyhow::Error::msg)?;
    let desktop = stack.request_desktop(&bearer).map_err(anyhow::Error::msg)?;
    stack.wait_in_use(&bearer, &desktop, DESKTOP_BOOT).map_err(anyhow::Error::msg)?;
    let running = started.elapsed();
    let control = stack.host_state.join("desktops").join(&desktop).join("control.sock");
    wait_usable(&control, DESKTOP_BOOT).map_err(anyhow::Error::msg)?;
    println!(
        "desktop {desktop}: its VM ran {:.1} s after the request; Xfce's panel was on the screen after {:.1} s \
         (first boot; serial console: {})",
        running.as_secs_f64(),
        started.elapsed().as_secs_f64(),
        stack.serial_log(&desktop).display()
    );

    // The desktop over the remote-desktop protocol: the headless client connects with the
    // broker's one-time ticket, types into the guest's console and records what it sees.
    step("Connecting the headless client (pleiades connect --headless) with the broker's ticket");
    let connection = stack.connect(&bearer, &desktop).map_err(anyhow::Error::msg)?;
    let file = demo_dir.join("desktop.pleiades");
    std::fs::write(&file, connection["file"].as_str().unwrap_or_default())?;
    let record = demo_dir.join("session");
    let script = demo_dir.join("demo.script");
    std::fs::write(
        &script,
        "wait 1500\nkey ctrl+alt+t\nwait 10000\ntype echo hello from the Pleiades client\\n\nwait 3000\n",
    )?;
    let output = Command::new(bin_dir.join("pleiades"))
        .arg("connect")
        .arg(&file)
        .args(["--headless", "--duration", "20", "--record"])
        .arg(&record)
        .arg("--input")
        .arg(&script)
        .output()?;
    if output.status.success() {
        let summary: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap_or_default();
        println!(
            "client: {} frames, {:.0} kbit/s, update latency p50 {} µs; what it saw: {}",
            summary["frames"],
            summary["kbit_s"].as_f64().unwrap_or(0.0),
            summary["latency"]["p50_us"],
            record.join("scanout-0.png").display()
        );
    } else {
        println!("client failed: {}", String::from_utf8_lossy(&output.stderr).trim());
    }

    print_logins(&stack, &bin_dir, (user, password), (admin, admin_password));
    if interactive {
        println!("Press Enter (or Ctrl-C) to stop the demo: the host powers its desktops off.");
        let mut line = String::new();
        let _ = std::io::stdin().read_line(&mut line);
    }
    step("Stopping: the host daemon powers its desktops off, then the broker stops");
    let status = stack.host.terminate(Duration::from_secs(150)).map_err(anyhow::Error::msg)?;
    println!("host daemon ended ({status})");
    if !output.status.success() {
        bail!("the client could not reach the desktop");
    }
    Ok(())
}

fn print_logins(stack: &Stack, bin_dir: &Path, user: (&str, &str), admin: (&str, &str)) {
    let port = stack.options.broker_port;
    println!();
    println!("  Portal:          {}/", stack.base);
    println!("  Log in:          {} / {}   (admin console: {} / {})", user.0, user.1, admin.0, admin.1);
    println!("  Certificate:     self-signed, sha256 {}", stack.pin);
    println!(
        "  From elsewhere:  ssh -L {port}:127.0.0.1:{port} root@<this machine>, then https://localhost:{port}/"
    );
    println!(
        "  Broker CLI:      {} --config {} pool list",
        bin_dir.join("pleiades-broker").display(),
        stack.config.display()
    );
    println!(
        "  A window:        Connect in the portal, then {} connect <the downloaded file>",
        bin_dir.join("pleiades").display()
    );
    println!();
}

/// The first port from `first` (20 tries) that `free` says is free.
fn free_port(first: u16, free: impl Fn(u16) -> bool) -> Result<u16> {
    (first..first.saturating_add(20))
        .find(|&p| free(p))
        .with_context(|| format!("no free port in {first}-{}", first + 19))
}
