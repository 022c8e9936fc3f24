//! `cargo xtask`: Pleiades' project tooling.
//!
//! - `deps`: installs the Debian packages the project needs (idempotent).
//! - `guest-image`: builds the test guest image into `target/guest/` (cached): the Linux image
//!   and the no_std test guest `testguest.elf`.
//! - `demo`: the main job: everything above, then boots a desktop guest, serves it over the
//!   session protocol and connects the headless client to it.
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
use pleiades_tests::qemu::{BASE_CMDLINE, Guest, boot_timeout};

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
    /// The main job: install, build, and boot a Pleiades desktop guest.
    Demo {
        /// Stay on the guest's serial console (type `poweroff` to leave). Default: when stdin is a terminal.
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
    step("Building pleiades-host and the pleiades client");
    cargo(root, &["build", "--package", "pleiades-host", "--package", "pleiades-client"])?;

    let interactive = interactive.unwrap_or_else(|| std::io::IsTerminal::is_terminal(&std::io::stdin()));
    let image = GuestImage::locate()?;
    let target_dir = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
    let demo_dir = target_dir.join("demo");
    std::fs::create_dir_all(&demo_dir)?;
    let connection = demo_dir.join("desktop.pleiades");
    let _ = std::fs::remove_file(&connection);
    let mut host = Command::new(target_dir.join("debug/pleiades-host"));
    host.args(["run", "--cpus", "2", "--memory", "512M", "--cmdline", BASE_CMDLINE])
        .args(["--device", "rng", "--device", "gpu", "--device", "keyboard", "--device", "tablet"])
        .args(["--listen", "127.0.0.1:0", "--connection-file"])
        .arg(&connection)
        .arg("--control")
        .arg(demo_dir.join("vm.sock"))
        .arg("--kernel")
        .arg(&image.kernel)
        .arg("--initrd")
        .arg(&image.initramfs);
    step("Booting a Pleiades desktop guest: pleiades-host run (it says which VMM it chose and why)");
    let started = Instant::now();
    let mut guest = Guest::from_command(host, pleiades_tests::accel::choose()?, interactive)?;
    let info = guest.wait_ready(boot_timeout())?;
    println!(
        "guest ready in {:.1} s: kernel {}, {} CPUs, {} MiB",
        started.elapsed().as_secs_f64(),
        info.kernel,
        info.cpus,
        info.memory_mib
    );
    for d in &info.devices {
        println!("    virtio-{:<8} driver {:<14} at {}", d.kind, d.driver, d.address);
    }
    let uname = guest.run("uname -a", Duration::from_secs(30))?;
    println!("guest says: {}", uname.join(" "));

    // The desktop over the remote-desktop protocol: the headless client connects with the
    // connection file, types into the guest's console and records what it sees.
    step("Connecting the headless client (pleiades connect --headless) over QUIC");
    let record = demo_dir.join("session");
    let script = demo_dir.join("demo.script");
    std::fs::write(&script, "wait 1000\ntype echo hello from the Pleiades client\\n\nwait 2000\n")?;
    let output = Command::new(target_dir.join("debug/pleiades"))
        .arg("connect")
        .arg(&connection)
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

    if interactive {
        println!(
            "\nYou are on the guest's serial console. Type `poweroff` to leave.\nTo connect another client (it takes the desktop over): \
             target/debug/pleiades-host ctl {} connection-file new.pleiades && \
             target/debug/pleiades connect new.pleiades --headless --record rec --duration 10",
            demo_dir.join("vm.sock").display()
        );
        return console(guest);
    }
    let status = guest.poweroff(Duration::from_secs(60))?;
    println!("guest powered off ({status})");
    Ok(())
}

/// Forwards stdin lines to the guest and prints what it says, until it powers off.
fn console(mut guest: Guest) -> Result<()> {
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    loop {
        if let Ok(status) = guest.wait_exit(Duration::from_millis(100)) {
            println!("guest powered off ({status})");
            return Ok(());
        }
        while let Ok(line) = rx.try_recv() {
            guest.send(&format!("{line}\n"))?;
        }
    }
}
