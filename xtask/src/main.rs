//! `cargo xtask`: Pleiades' project tooling.
//!
//! - `deps`: installs the Debian packages the project needs (idempotent).
//! - `guest-image`: builds the test guest image into `target/guest/` (cached): the Linux image
//!   and the no_std test guest `testguest.elf`.
//! - `desktop-image`: builds the graphical desktop image into `target/desktop/` (cached):
//!   Debian trixie with Xfce on a qcow2 disk, for pools of real desktops.
//! - `demo`: the main job: everything above, then the broker (SQLite) with a pool of the test
//!   image, a host daemon registered with it, a desktop for the demo user, and the headless
//!   client on it with the broker's ticket; prints the portal URL and the demo logins.
//! - `soak`: the whole test suite N times in a row (optionally beside a build), recorded in
//!   `tests/soak-runs.tsv`.
//! - `check`: the architecture's invariants (crate layers, module imports, where `unsafe` is).
//! - `test`: everything CI runs: deps, image, `cargo fmt --check`, clippy, `npm ci` of the
//!   browser tests (skipped when up to date), all tests.

mod apt;
mod architecture;
mod cgroups;
mod cpio;
mod desktop_image;
mod fuzz;
mod guest_image;
mod kmod;
mod npm;
mod soak;
mod testguest;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

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
    /// Build the desktop image into target/desktop/: Debian trixie with Xfce, LightDM logging
    /// the user in, PipeWire, systemd-networkd and the agent, on a qcow2 disk (a pool's template).
    DesktopImage {
        /// Rebuild even if nothing changed.
        #[arg(long)]
        force: bool,
    },
    /// The main job: install and build, then the broker (SQLite) with a pool of the test image,
    /// a host daemon registered with it, a desktop for the demo user and the headless client on
    /// it; prints the portal URL and the demo logins.
    Demo {
        /// Keep it all running until Enter is pressed. Default: when stdin is a terminal.
        #[arg(long)]
        interactive: Option<bool>,
    },
    /// Fuzz longer than the test command does: each target (or those named) for N minutes, J at
    /// a time; each run is recorded in fuzz/runs.tsv with its coverage.
    Fuzz {
        /// Minutes per target (at least 1).
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
        minutes: u64,
        /// Targets run at the same time (each takes one core; at least 1).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
        jobs: u16,
        /// Targets to run (default: all of them).
        targets: Vec<String>,
    },
    /// Run the whole test suite N times in a row (`CI=true`), each run recorded in
    /// tests/soak-runs.tsv: tests that pass by luck show up here.
    Soak {
        /// How many runs (at least 1).
        #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
        runs: u32,
        /// Keep a release build of the workspace running beside the tests (a loaded machine).
        #[arg(long)]
        load: bool,
    },
    /// Check the architecture's invariants: crate layers, no import cycle between modules,
    /// `unsafe` only where allowed, a code map that names every module (ARCHITECTURE.md).
    Check,
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
            testguest::install(&root, &pleiades_testkit::image::default_dir(&root), force).map(drop)
        }
        Cmd::GuestImage { force, testguest_only: false } => {
            guest_image::GuestImageBuild { root, force }.run().map(drop)
        }
        Cmd::DesktopImage { force } => desktop_image::build(&root, force).map(drop),
        Cmd::Demo { interactive } => demo(&root, interactive),
        Cmd::Check => check_architecture(&root),
        Cmd::Fuzz { minutes, jobs, targets } => fuzz::run_long(&root, &targets, minutes, usize::from(jobs)),
        Cmd::Soak { runs, load } => soak::run(&root, runs, load),
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

fn check_architecture(root: &Path) -> Result<()> {
    let violations = architecture::check(root);
    for violation in &violations {
        eprintln!("  {}", violation.0);
    }
    if !violations.is_empty() {
        bail!("{} architecture invariants broken (ARCHITECTURE.md, \"Invariants\")", violations.len());
    }
    println!(
        "    crate layers, module imports, unsafe code and the code map keep ARCHITECTURE.md's invariants"
    );
    Ok(())
}

fn test(root: &Path, no_deps: bool) -> Result<()> {
    let started = Instant::now();
    if !no_deps {
        step("Debian packages");
        deps(&[])?;
    }
    step("cgroups (the desktops' jails)");
    cgroups::ensure()?;
    let t = step("Test guest image");
    guest_image::GuestImageBuild { root: root.to_owned(), force: false }.run()?;
    println!("    {:.1} s", t.elapsed().as_secs_f64());
    let t = step("Desktop image (the graphical desktop's end-to-end test boots it)");
    desktop_image::build(root, false)?;
    println!("    {:.1} s", t.elapsed().as_secs_f64());

    step("cargo fmt --check");
    cargo(root, &["fmt", "--all", "--", "--check"]).context("formatting differs: run `cargo fmt --all`")?;
    for manifest in [TESTGUEST_MANIFEST, FUZZ_MANIFEST] {
        cargo(root, &["fmt", "--manifest-path", manifest, "--", "--check"])
            .with_context(|| format!("formatting differs: run `cargo fmt --manifest-path {manifest}`"))?;
    }
    step("architecture invariants");
    check_architecture(root)?;
    let t = step("cargo clippy --all-targets -- -D warnings");
    cargo(root, &["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"])?;
    for manifest in [TESTGUEST_MANIFEST, FUZZ_MANIFEST] {
        cargo(root, &["clippy", "--manifest-path", manifest, "--all-targets", "--", "-D", "warnings"])?;
    }
    println!("    {:.1} s", t.elapsed().as_secs_f64());
    let t = step("npm ci (browser test packages)");
    npm::ci(root)?;
    println!("    {:.1} s", t.elapsed().as_secs_f64());
    let t = step("cargo test");
    // Every test binary runs even after a failure: one run shows every failing test.
    cargo(root, &["test", "--workspace", "--no-fail-fast"])?;
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
    step("cgroups (the desktops' jails)");
    cgroups::ensure()?;
    step("Test guest image");
    guest_image::GuestImageBuild { root: root.to_owned(), force: false }.run()?;
    step("Desktop image (what the demo user gets: Debian with Xfce)");
    desktop_image::build(root, false)?;
    step("Building pleiades-broker, pleiades-host, the pleiades client and the demo");
    #[rustfmt::skip]
    cargo(root, &["build", "--bins", "--package", "pleiades-broker", "--package", "pleiades-host",
                  "--package", "pleiades-client", "--package", "pleiades-tests"])?;
    // The demo itself needs the host and the QUIC stack, which the bootstrap must not build:
    // it is a program of the test kit, run once the packages and binaries are there.
    let target_dir = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
    let mut demo = Command::new(target_dir.join("debug/pleiades-demo"));
    if let Some(interactive) = interactive {
        demo.arg(format!("--interactive={interactive}"));
    }
    let status = demo.current_dir(root).status().context("cannot run pleiades-demo")?;
    if !status.success() {
        bail!("the demo failed ({status})");
    }
    Ok(())
}
