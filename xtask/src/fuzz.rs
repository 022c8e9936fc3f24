//! Runs the fuzz targets in `fuzz/`: briefly in `./dev test`, for as long as asked in `cargo
//! xtask fuzz --minutes N`.
//!
//! `fuzz/` has the `cargo fuzz` layout (`cargo fuzz run virtio_queue` works with cargo-fuzz
//! installed). These commands do what `cargo fuzz run --sanitizer none` does without the extra
//! tool: they build each target with libFuzzer's coverage instrumentation (stable rustc flags;
//! `--target` keeps them off build scripts) and run it on a corpus kept in
//! `target/fuzz-corpus/` plus the committed seeds in `fuzz/seeds/<target>/` (read, never
//! written). A crash fails the run and leaves the input in `target/fuzz-artifacts/`. Each long
//! run appends a line to `fuzz/runs.tsv` (date, target, CPU seconds, runs, coverage,
//! features, result), the record the CPU-hours in docs/development.md are summed from; it is
//! committed, so the record outlives the machine (the corpus in `target/` does not). The CPU
//! seconds are the fuzzer processes' own (user + system, from the kernel's count of waited-for
//! children), so that a run that shared the machine (`nice -n 19` beside a build) counts what it
//! really got; a batch of several targets at once shares its total evenly.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// The fuzz targets.
pub const TARGETS: &[&str] = &[
    "virtio_queue",
    "virtio_input",
    "virtio_gpu",
    "virtio_snd",
    "virtio_vsock",
    "protocol_decoder",
    "protocol_handshake",
    "protocol_control",
    "protocol_parsers",
];
/// How long each target runs in the test command.
const SECONDS_BRIEFLY: u64 = 15;
const TRIPLE: &str = "x86_64-unknown-linux-gnu";

const RUSTFLAGS: &str = "--cfg fuzzing -Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
     -Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
     -Cllvm-args=-sanitizer-coverage-trace-compares -Cdebug-assertions";

/// What one run of a target did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outcome {
    pub runs: u64,
    /// libFuzzer's `cov:` (edges reached) and `ft:` (features) at the end.
    pub coverage: u64,
    pub features: u64,
}

/// Builds the targets and runs each for 15 seconds (the test command).
pub fn run_briefly(root: &Path) -> Result<()> {
    build(root)?;
    for target in TARGETS {
        let outcome = run_target(root, target, SECONDS_BRIEFLY).0?;
        println!(
            "    fuzz {target}: {SECONDS_BRIEFLY} s, no crash ({} runs, cov {}, ft {})",
            outcome.runs, outcome.coverage, outcome.features
        );
    }
    Ok(())
}

/// Builds the targets and runs each of `targets` (all when empty) for `minutes`, `jobs` at a
/// time; records each run in `fuzz/runs.tsv` and prints the CPU time so far per target.
pub fn run_long(root: &Path, targets: &[String], minutes: u64, jobs: usize) -> Result<()> {
    for target in targets {
        if !TARGETS.contains(&target.as_str()) {
            bail!("unknown fuzz target {target:?}; the targets: {}", TARGETS.join(", "));
        }
    }
    let chosen: Vec<&str> =
        if targets.is_empty() { TARGETS.to_vec() } else { targets.iter().map(String::as_str).collect() };
    build(root)?;
    let seconds = minutes * 60;
    let mut failures = Vec::new();
    for batch in chosen.chunks(jobs.max(1)) {
        let results: Vec<(&str, (Result<Outcome>, u64))> = std::thread::scope(|scope| {
            let handles: Vec<_> = batch
                .iter()
                .map(|target| (*target, scope.spawn(move || run_target(root, target, seconds))))
                .collect();
            handles
                .into_iter()
                .map(|(t, h)| {
                    (t, h.join().unwrap_or_else(|_| (Err(anyhow::anyhow!("the runner panicked")), 0)))
                })
                .collect()
        });
        for (target, (result, cpu)) in results {
            let line = match &result {
                Ok(o) => format!("{target}\t{cpu}\t{}\t{}\t{}\tok", o.runs, o.coverage, o.features),
                Err(e) => format!("{target}\t{cpu}\t\t\t\tcrash: {}", first_line(&format!("{e:#}"))),
            };
            record(root, &line)?;
            match result {
                Ok(o) => println!(
                    "fuzz {target}: {minutes} min ({cpu} CPU s), no crash: {} runs, cov {}, ft {}",
                    o.runs, o.coverage, o.features
                ),
                Err(e) => {
                    println!("fuzz {target}: {e:#}");
                    failures.push(target);
                }
            }
        }
    }
    println!("\nCPU time per target recorded in fuzz/runs.tsv:");
    for (target, seconds) in cpu_seconds(&std::fs::read_to_string(runs_file(root)).unwrap_or_default()) {
        println!("  {target:<20} {:.2} h", seconds as f64 / 3600.0);
    }
    if !failures.is_empty() {
        bail!("fuzz targets crashed: {}", failures.join(", "));
    }
    Ok(())
}

/// CPU ticks (user + system) of this process's waited-for children so far, from
/// `/proc/self/stat` (`cutime`, `cstime`; in USER_HZ, 100 a second on Linux).
fn children_cpu_now() -> Option<u64> {
    children_cpu_ticks(&std::fs::read_to_string("/proc/self/stat").ok()?)
}

/// One reap at a time: the growth of the children's CPU time across a reap is that child's
/// alone, however many targets run at once.
static REAP: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Waits for `child`; its exit status and the CPU seconds it used (`None` without /proc).
fn wait_measured(child: &mut std::process::Child) -> Result<(std::process::ExitStatus, Option<u64>)> {
    loop {
        {
            let _one = REAP.lock().unwrap_or_else(|p| p.into_inner());
            let before = children_cpu_now();
            if let Some(status) = child.try_wait()? {
                let used = before.zip(children_cpu_now()).map(|(b, a)| a.saturating_sub(b) / 100);
                return Ok((status, used));
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

fn children_cpu_ticks(stat: &str) -> Option<u64> {
    // The command name may hold spaces and parentheses: the fields start after the last ')'.
    let fields: Vec<&str> = stat.get(stat.rfind(')')? + 1..)?.split_whitespace().collect();
    // Field 3 (state) is at index 0: cutime (16) and cstime (17) at 13 and 14.
    Some(fields.get(13)?.parse::<u64>().ok()? + fields.get(14)?.parse::<u64>().ok()?)
}

fn first_line(text: &str) -> &str {
    text.lines().next().unwrap_or("")
}

fn runs_file(root: &Path) -> PathBuf {
    root.join("fuzz/runs.tsv")
}

/// Appends `line` (after a timestamp) to `fuzz/runs.tsv`.
fn record(root: &Path, line: &str) -> Result<()> {
    let path = runs_file(root);
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    writeln!(file, "{now}\t{line}").with_context(|| format!("cannot write {}", path.display()))
}

/// Seconds fuzzed per target in a `runs.tsv` text (comment lines start with `#`), crashes included, in first-seen order.
pub fn cpu_seconds(tsv: &str) -> Vec<(String, u64)> {
    let mut totals: Vec<(String, u64)> = Vec::new();
    for line in tsv.lines().filter(|line| !line.starts_with('#')) {
        let fields: Vec<&str> = line.split('\t').collect();
        let (Some(target), Some(Ok(seconds))) = (fields.get(1), fields.get(2).map(|s| s.parse::<u64>()))
        else {
            continue;
        };
        match totals.iter_mut().find(|(t, _)| t == target) {
            Some((_, total)) => *total += seconds,
            None => totals.push(((*target).to_owned(), seconds)),
        }
    }
    totals
}

fn build(root: &Path) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(&cargo)
        .args(["build", "--release", "--quiet", "--target", TRIPLE, "--bins"])
        .env("RUSTFLAGS", RUSTFLAGS)
        .env("CARGO_TARGET_DIR", root.join("target/fuzz"))
        .current_dir(root.join("fuzz"))
        .status()
        .context("cannot run cargo")?;
    if !status.success() {
        bail!("building the fuzz targets failed ({status})");
    }
    Ok(())
}

/// Runs one built target for `seconds` on its corpus and seeds; what it found, and the CPU
/// seconds it used (its own, whatever else ran beside it).
fn run_target(root: &Path, target: &str, seconds: u64) -> (Result<Outcome>, u64) {
    let mut cpu = 0;
    let result = run_target_measured(root, target, seconds, &mut cpu);
    (result, cpu)
}

fn run_target_measured(root: &Path, target: &str, seconds: u64, cpu: &mut u64) -> Result<Outcome> {
    let corpus = root.join("target/fuzz-corpus").join(target);
    let artifacts = root.join("target/fuzz-artifacts").join(target);
    std::fs::create_dir_all(&corpus)?;
    std::fs::create_dir_all(&artifacts)?;
    let binary = root.join("target/fuzz").join(TRIPLE).join("release").join(target);
    let mut cmd = Command::new(&binary);
    cmd.arg(format!("-max_total_time={seconds}"))
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        .arg("-print_final_stats=1")
        .arg(&corpus);
    let seeds = root.join("fuzz/seeds").join(target);
    if seeds.is_dir() {
        cmd.arg(&seeds);
    }
    let mut child = cmd
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {}", binary.display()))?;
    let mut stderr = child.stderr.take().context("no stderr pipe")?;
    let reader = std::thread::spawn(move || {
        let mut text = Vec::new();
        let _ = std::io::Read::read_to_end(&mut stderr, &mut text);
        text
    });
    let (status, used) = wait_measured(&mut child)?;
    *cpu = used.unwrap_or(seconds);
    let bytes = reader.join().unwrap_or_default();
    let log = String::from_utf8_lossy(&bytes);
    if !status.success() {
        let tail: Vec<&str> = log.lines().rev().take(30).collect::<Vec<_>>().into_iter().rev().collect();
        bail!("fuzz target {target} failed; crashing input in {}:\n{}", artifacts.display(), tail.join("\n"));
    }
    Ok(outcome(&log))
}

/// The runs from `stat::number_of_executed_units` and the last `cov:`/`ft:` libFuzzer printed.
pub fn outcome(log: &str) -> Outcome {
    let number_after = |line: &str, key: &str| -> Option<u64> {
        let rest = &line[line.find(key)? + key.len()..];
        rest.split_whitespace().next()?.parse().ok()
    };
    let mut outcome = Outcome::default();
    for line in log.lines() {
        if let Some(runs) = number_after(line, "stat::number_of_executed_units:") {
            outcome.runs = runs;
        }
        if let (Some(cov), Some(ft)) = (number_after(line, " cov: "), number_after(line, " ft: ")) {
            outcome.coverage = cov;
            outcome.features = ft;
        }
    }
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libfuzzers_last_figures_are_read() {
        let log = "INFO: Seed: 1\n#2\tINITED cov: 10 ft: 12 corp: 1/1b exec/s: 0 rss: 30Mb\n\
                   #9000\tNEW    cov: 321 ft: 987 corp: 40/2Kb lim: 4 exec/s: 3000 rss: 40Mb\n\
                   #12000\tDONE   cov: 330 ft: 1001 corp: 41/2Kb lim: 4 exec/s: 3000 rss: 40Mb\n\
                   stat::number_of_executed_units: 12000\n";
        assert_eq!(outcome(log), Outcome { runs: 12000, coverage: 330, features: 1001 });
        assert_eq!(outcome("nothing here"), Outcome::default());
    }

    #[test]
    fn the_childrens_cpu_time_is_read_after_the_command_name() {
        let stat = "4242 (cargo (x) 1) S 1 2 3 0 -1 4194560 10 20 0 0 7 8 1500 230 20 0 1 0 9 1000 50";
        assert_eq!(children_cpu_ticks(stat), Some(1730));
        assert_eq!(children_cpu_ticks("no fields"), None);
        // This process's own /proc/self/stat reads.
        assert!(children_cpu_now().is_some());
    }

    #[test]
    fn cpu_time_is_summed_per_target_crashes_included() {
        let tsv = "# a note\twith\t99\ttabs\n1\tvirtio_gpu\t600\t5\t6\t7\tok\n2\tvirtio_snd\t60\t\t\t\tcrash: x\n3\tvirtio_gpu\t1200\t1\t2\t3\tok\nbad line\n";
        assert_eq!(cpu_seconds(tsv), [("virtio_gpu".to_owned(), 1800), ("virtio_snd".to_owned(), 60)]);
    }
}
