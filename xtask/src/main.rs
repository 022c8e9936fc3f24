//! `cargo xtask`: Pleiades' project tooling.
//!
//! - `deps`: installs the Debian packages the project needs (idempotent).
//! - `guest-image`: builds the test guest image into `target/guest/` (cached): the Linux image
//!   and the no_std test guest `testguest.elf`.
//! - `demo`: the main job: everything above, then the broker (SQLite) with a pool of the test
//!   image, a host daemon registered with it, a desktop for the demo user, and the headless
//!   client on it with the broker's ticket; prints the portal URL and the demo logins.
//! - `test`: everything CI runs: deps, image, `cargo fmt --check`, clippy, `npm ci` of the
//!   browser tests (skipped when up to date), all tests.

mod apt;
mod cpio;
mod fuzz;
mod guest_image;
mod kmod;
mod npm;
mod testguest;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use pleiades_tests::image::GuestImage;
use pleiades_tests::qemu::boot_timeout;
use pleiades_tests::stack::{Stack, StackOptions};

#[derive(Debug, Parser)]
#[command(name = "cargo xtask", about = "Pleiades project tooling", version)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Install the Debian packages the project needs (as root; idempotent).
    Deps {
        /// Package groups to install (default: all). See `cargo xtask deps --list`.
        groups: Vec<String>,
        /// List the groups and their packages.
        #[arg(long)]
        list: bool,
    },
    /// Build the test guest images into target/guest/: the Linux image (kernel, initramfs with
    /// busybox, modules, agent) and the no_std test guest (testguest.elf).
    GuestImage {
        /// Rebuild even if nothing changed.
        #[arg(long)]
        force: bool,
        /// Only the no_std test guest (no Debian packages needed).
        #[arg(long)]
        testguest_only: bool,
    },
    /// The main job: install and build, then the broker (SQLite) with a pool of the test image,
    /// a host daemon registered with it, a desktop for the demo user and the headless client on
    /// it; prints the portal URL and the demo logins.
    Demo {
        /// Keep it all running until Enter is pressed. Default: when stdin is a terminal.
        #[arg(long)]
        interactive: Option<bool>,
    },
    /// Run every check CI runs: deps, guest image, fmt, clippy, all tests.
    #[command(alias = "ci")]
    Test {
        /// Skip installing Debian packages (they must be present).
        #[arg(long)]
        no_deps: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Cmd) -> Result<()> {
    let root = workspace_root();
    match command {
        Cmd::Deps { groups, list } => {
            if list {
                for g in apt::GROUPS {
                    println!("{:<11} {} ({})", g.name, g.packages.join(" "), g.purpose);
                }
                return Ok(());
            }
            deps(&groups)
        }
        Cmd::GuestImage { force, testguest_only: true } => {
            testguest::install(&root, &pleiades_tests::image::default_dir(&root), force).map(drop)
        }
        Cmd::GuestImage { force, testguest_only: false } => {
            guest_image::GuestImageBuild { root, force }.run().map(drop)
        }
        Cmd::Demo { interactive } => demo(&root, interactive),
        Cmd::Test { no_deps } => test(&root, no_deps),
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask sits in the workspace").to_owned()
}

fn deps(names: &[String]) -> Result<()> {
    let groups: Vec<apt::Group> = if names.is_empty() {
        apt::GROUPS.to_vec()
    } else {
        names
            .iter()
            .map(|n| {
                apt::GROUPS.iter().find(|g| g.name == n).copied().with_context(|| {
                    let known: Vec<_> = apt::GROUPS.iter().map(|g| g.name).collect();
                    format!("unknown package group {n:?}; known groups: {}", known.join(", "))
                })
            })
            .collect::<Result<_>>()?
    };
    let apt = apt::Apt::system();
    // The guest image needs trixie's lists even when every package is present.
    if apt.ensure_sources()? {
        apt.update()?;
    }
    apt.install_groups(&groups)
}

fn step(title: &str) -> Instant {
    println!("\n==> {title}");
    Instant::now()
}

fn cargo(root: &Path, args: &[&str]) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(&cargo).args(args).current_dir(root).status().context("cannot run cargo")?;
    if !status.success() {
        bail!("`cargo {}` failed ({status})", args.join(" "));
    }
    Ok(())
}

/// The no_std test guest is outside the workspace; fmt and clippy reach it by its manifest.
const TESTGUEST_MANIFEST: &str = "testguest/Cargo.toml";
/// The fuzz targets are outside the workspace too (cargo-fuzz layout).
const FUZZ_MANIFEST: &str = "fuzz/Cargo.toml";

fn test(root: &Path, no_deps: bool) -> Result<()> {
    let started = Instant::now();
    if !no_deps {
        step("Debian packages");
        deps(&[])?;
    }
    let t = step("Test guest image");
    guest_image::GuestImageBuild { root: root.to_owned(), force: false }.run()?;
    println!("    {:.1} s", t.elapsed().as_secs_f64());

    step("cargo fmt --check");
    cargo(root, &["fmt", "--all", "--", "--check"]).context("formatting differs: run `cargo fmt --all`")?;
    for manifest in [TESTGUEST_MANIFEST, FUZZ_MANIFEST] {
        cargo(root, &["fmt", "--manifest-path", manifest, "--", "--check"])
            .with_context(|| format!("formatting differs: run `cargo fmt --manifest-path {manifest}`"))?;
    }
    let t = step("cargo clippy --all-targets -- -D warnings");
    cargo(root, &["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"])?;
    cargo(root, &["clippy", "--manifest-path", TESTGUEST_MANIFEST, "--all-targets", "--", "-D", "warnings"])?;
    println!("    {:.1} s", t.elapsed().as_secs_f64());
    let t = step("npm ci (browser test packages)");
    npm::ci(root)?;
    println!("    {:.1} s", t.elapsed().as_secs_f64());
    let t = step("cargo test");
    cargo(root, &["test", "--workspace"])?;
    println!("    {:.1} s", t.elapsed().as_secs_f64());
    let t = step("fuzz targets (briefly)");
    fuzz::run_briefly(root)?;
    println!("    {:.1} s", t.elapsed().as_secs_f64());
    println!("\nAll checks passed in {:.1} min.", started.elapsed().as_secs_f64() / 60.0);
    Ok(())
}

fn demo(root: &Path, interactive: Option<bool>) -> Result<()> {
    step("Debian packages");
    deps(&[])?;
    step("Test guest image");
    guest_image::GuestImageBuild { root: root.to_owned(), force: false }.run()?;
    step("Building pleiades-broker, pleiades-host and the pleiades client");
    cargo(
        root,
        &[
            "build",
            "--package",
            "pleiades-broker",
            "--package",
            "pleiades-host",
            "--package",
            "pleiades-client",
        ],
    )?;

    let interactive = interactive.unwrap_or_else(|| std::io::IsTerminal::is_terminal(&std::io::stdin()));
    let image = GuestImage::locate()?;
    let target_dir = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
    let demo_dir = target_dir.join("demo");
    // Each run starts from a fresh broker database and host state.
    let stack_dir = demo_dir.join("stack");
    if stack_dir.exists() {
        std::fs::remove_dir_all(&stack_dir)
            .with_context(|| format!("cannot clear {}", stack_dir.display()))?;
    }
    std::fs::create_dir_all(&demo_dir)?;
    let (user, password) = ("demo", "demo-password");
    let (admin, admin_password) = ("admin", "admin-password");
    let options = StackOptions {
        dir: stack_dir,
        bin_dir: target_dir.join("debug"),
        broker_port: free_port(8443, |p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok())?,
        first_session_port: free_port(47000, |p| std::net::UdpSocket::bind(("127.0.0.1", p)).is_ok())?,
        session_ports: 10,
        vmm: None,
        user: (user.into(), password.into()),
        admin: (admin.into(), admin_password.into()),
        spares: 1,
    };
    step("Starting the broker (SQLite) with a pool of the test image, and a host that registers with it");
    let started = Instant::now();
    let mut stack = Stack::start(options, &image).map_err(anyhow::Error::msg)?;
    println!(
        "broker at {} (certificate sha256 {}), host-1 registered in {:.1} s",
        stack.base,
        stack.pin,
        started.elapsed().as_secs_f64()
    );

    step("The demo user gets a desktop from the pool (REST API); the host boots it");
    let started = Instant::now();
    let bearer = stack.login(user, password).map_err(anyhow::Error::msg)?;
    let desktop = stack.request_desktop(&bearer).map_err(anyhow::Error::msg)?;
    stack.wait_in_use(&bearer, &desktop, boot_timeout()).map_err(anyhow::Error::msg)?;
    let serial = stack.serial_log(&desktop);
    pleiades_tests::stack::wait_for("the guest to boot", boot_timeout(), || {
        let text = std::fs::read_to_string(&serial).unwrap_or_default();
        text.lines().find(|l| l.contains("PLEIADES-READY")).map(str::to_owned)
    })
    .map_err(anyhow::Error::msg)?;
    println!(
        "desktop {desktop} running in {:.1} s (serial console: {})",
        started.elapsed().as_secs_f64(),
        serial.display()
    );

    // The desktop over the remote-desktop protocol: the headless client connects with the
    // broker's one-time ticket, types into the guest's console and records what it sees.
    step("Connecting the headless client (pleiades connect --headless) with the broker's ticket");
    let connection = stack.connect(&bearer, &desktop).map_err(anyhow::Error::msg)?;
    let file = demo_dir.join("desktop.pleiades");
    std::fs::write(&file, connection["file"].as_str().unwrap_or_default())?;
    let record = demo_dir.join("session");
    let script = demo_dir.join("demo.script");
    std::fs::write(&script, "wait 1500\ntype echo hello from the Pleiades client\\n\nwait 2000\n")?;
    let output = Command::new(target_dir.join("debug/pleiades"))
        .arg("connect")
        .arg(&file)
        .args(["--headless", "--duration", "6", "--record"])
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

    let port = stack.options.broker_port;
    println!();
    println!("  Portal:          {}/", stack.base);
    println!("  Log in:          {user} / {password}   (admin console: {admin} / {admin_password})");
    println!("  Certificate:     self-signed, sha256 {}", stack.pin);
    println!(
        "  From elsewhere:  ssh -L {port}:127.0.0.1:{port} root@<this machine>, then https://localhost:{port}/"
    );
    println!("  Broker CLI:      target/debug/pleiades-broker --config {} pool list", stack.config.display());
    println!(
        "  A window:        Connect in the portal, then target/debug/pleiades connect <the downloaded file>"
    );
    println!();
    if interactive {
        println!("Press Enter (or Ctrl-C) to stop the demo: the host powers its desktops off.");
        let mut line = String::new();
        let _ = std::io::stdin().read_line(&mut line);
    }
    step("Stopping: the host daemon powers its desktops off, then the broker stops");
    let status = stack.host.terminate(Duration::from_secs(90)).map_err(anyhow::Error::msg)?;
    println!("host daemon ended ({status})");
    if !output.status.success() {
        bail!("the client could not reach the desktop");
    }
    Ok(())
}

/// The first port from `first` (20 tries) that `free` says is free.
fn free_port(first: u16, free: impl Fn(u16) -> bool) -> Result<u16> {
    (first..first.saturating_add(20))
        .find(|&p| free(p))
        .with_context(|| format!("no free port in {first}-{}", first + 19))
}
