//! Runs the fuzz targets in `fuzz/` briefly, as part of `./dev test`.
//!
//! `fuzz/` has the `cargo fuzz` layout (`cargo fuzz run virtio_queue` works with cargo-fuzz
//! installed). The test command does what `cargo fuzz run --sanitizer none` does without the
//! extra tool: it builds each target with libFuzzer's coverage instrumentation (stable rustc
//! flags; `--target` keeps them off build scripts) and runs it for a few seconds on a corpus
//! kept in `target/fuzz-corpus/`. A crash fails the run and leaves the input in
//! `target/fuzz-artifacts/`.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

/// The fuzz targets and how long each runs in the test command.
pub const TARGETS: &[&str] = &[
    "virtio_queue",
    "virtio_input",
    "virtio_gpu",
    "virtio_snd",
    "protocol_decoder",
    "protocol_handshake",
    "protocol_control",
];
const SECONDS_EACH: u32 = 15;
const TRIPLE: &str = "x86_64-unknown-linux-gnu";

const RUSTFLAGS: &str = "--cfg fuzzing -Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
     -Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
     -Cllvm-args=-sanitizer-coverage-trace-compares -Cdebug-assertions";

/// Builds and runs every target for a few seconds.
pub fn run_briefly(root: &Path) -> Result<()> {
    let target_dir = root.join("target/fuzz");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(&cargo)
        .args(["build", "--release", "--quiet", "--target", TRIPLE, "--bins"])
        .env("RUSTFLAGS", RUSTFLAGS)
        .env("CARGO_TARGET_DIR", &target_dir)
        .current_dir(root.join("fuzz"))
        .status()
        .context("cannot run cargo")?;
    if !status.success() {
        bail!("building the fuzz targets failed ({status})");
    }
    for target in TARGETS {
        let corpus = root.join("target/fuzz-corpus").join(target);
        let artifacts = root.join("target/fuzz-artifacts").join(target);
        std::fs::create_dir_all(&corpus)?;
        std::fs::create_dir_all(&artifacts)?;
        let binary = target_dir.join(TRIPLE).join("release").join(target);
        let mut cmd = Command::new(&binary);
        cmd.arg(format!("-max_total_time={SECONDS_EACH}"))
            .arg(format!("-artifact_prefix={}/", artifacts.display()))
            .arg("-print_final_stats=1")
            .arg(&corpus);
        // Hand-made seeds (`fuzz/seeds/<target>/`): read, never written.
        let seeds = root.join("fuzz/seeds").join(target);
        if seeds.is_dir() {
            cmd.arg(&seeds);
        }
        let output = cmd.output().with_context(|| format!("cannot run {}", binary.display()))?;
        let log = String::from_utf8_lossy(&output.stderr);
        let runs = log.lines().find(|l| l.starts_with("stat::number_of_executed_units")).unwrap_or("");
        if !output.status.success() {
            let tail: Vec<&str> = log.lines().rev().take(30).collect::<Vec<_>>().into_iter().rev().collect();
            bail!(
                "fuzz target {target} failed; crashing input in {}:\n{}",
                artifacts.display(),
                tail.join("\n")
            );
        }
        println!("    fuzz {target}: {SECONDS_EACH} s, no crash ({})", runs.trim());
    }
    Ok(())
}
