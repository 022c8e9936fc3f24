//! `cargo xtask soak`: the whole test suite several times in a row, to catch tests that pass by
//! luck (timing, ordering, leftovers of an earlier run).
//!
//! Each run is `cargo test --workspace --no-fail-fast` with `CI=true` (so a missing
//! prerequisite fails instead of skipping), its output kept in `target/soak/run-N.log`, and one
//! line appended to `tests/soak-runs.tsv` (date, commit, load, seconds, passed, failed, ignored,
//! the failing tests): committed, so the record travels with the code it speaks of.
//!
//! `--load` runs another build beside the tests for their whole duration: a release build of
//! the workspace into its own target directory, started afresh whenever it finishes, at normal
//! priority — what a developer's machine or a shared CI runner looks like.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail};

/// What one `cargo test` run reported.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Tally {
    pub passed: u64,
    pub failed: u64,
    pub ignored: u64,
    /// Names of failing tests (`name ... FAILED` lines) and binaries that failed to run.
    pub failures: Vec<String>,
}

/// Sums the `test result:` lines of a `cargo test` output and collects the failures.
pub fn tally(output: &str) -> Tally {
    let mut t = Tally::default();
    for line in output.lines() {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("test result: ") {
            for part in rest.split(';') {
                let mut words = part.split_whitespace().rev();
                let (Some(what), Some(count)) = (words.next(), words.next()) else { continue };
                let Ok(count) = count.parse::<u64>() else { continue };
                match what {
                    "passed" => t.passed += count,
                    "failed" => t.failed += count,
                    "ignored" => t.ignored += count,
                    _ => {}
                }
            }
        } else if let Some(name) = line.strip_prefix("test ").and_then(|l| l.strip_suffix(" ... FAILED")) {
            t.failures.push(name.to_owned());
        } else if line.starts_with("error: test failed, to rerun pass") {
            t.failures.push(line.trim_start_matches("error: ").to_owned());
        }
    }
    t
}

/// Runs the suite `runs` times (with a build beside it when `load`), records each run; fails
/// when any run failed.
pub fn run(root: &Path, runs: u32, load: bool) -> Result<()> {
    let logs = root.join("target/soak");
    std::fs::create_dir_all(&logs).with_context(|| format!("cannot create {}", logs.display()))?;
    let commit = git_head(root);
    let mut failed_runs = 0;
    for n in 1..=runs {
        println!(
            "\n==> soak run {n} of {runs}{}",
            if load { " (with a release build beside it)" } else { "" }
        );
        let mut loader = if load { Some(Loader::start(root)?) } else { None };
        let started = Instant::now();
        let log_path = logs.join(format!("run-{n}.log"));
        let status = cargo_test(root, &log_path);
        let seconds = started.elapsed().as_secs();
        let builds = loader.as_mut().map(Loader::stop);
        let output = std::fs::read_to_string(&log_path).unwrap_or_default();
        let t = tally(&output);
        let ok = status? && t.failed == 0 && t.failures.is_empty() && t.passed > 0;
        if !ok {
            failed_runs += 1;
        }
        let load_label = match builds {
            Some(builds) => format!("release build beside ({builds} started)"),
            None => "none".to_owned(),
        };
        println!(
            "    {}: {} passed, {} failed, {} ignored in {} s (log: {})",
            if ok { "ok" } else { "FAILED" },
            t.passed,
            t.failed,
            t.ignored,
            seconds,
            log_path.display()
        );
        for f in &t.failures {
            println!("      {f}");
        }
        record(
            root,
            &format!(
                "{commit}\t{load_label}\t{seconds}\t{}\t{}\t{}\t{}",
                t.passed,
                t.failed,
                t.ignored,
                if t.failures.is_empty() { "-".to_owned() } else { t.failures.join(", ") }
            ),
        )?;
    }
    if failed_runs > 0 {
        bail!("{failed_runs} of {runs} runs failed (logs in {})", logs.display());
    }
    println!("\nAll {runs} runs passed; recorded in tests/soak-runs.tsv.");
    Ok(())
}

/// `cargo test --workspace --no-fail-fast` with `CI=true`, output (both streams) to `log`;
/// whether it exited 0.
fn cargo_test(root: &Path, log: &Path) -> Result<bool> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let file = std::fs::File::create(log).with_context(|| format!("cannot write {}", log.display()))?;
    let err = file.try_clone().context("cannot duplicate the log file")?;
    let status = Command::new(cargo)
        .args(["test", "--workspace", "--no-fail-fast"])
        .env("CI", "true")
        .current_dir(root)
        .stdout(file)
        .stderr(err)
        .status()
        .context("cannot run cargo test")?;
    Ok(status.success())
}

/// A release build of the workspace in a loop, in its own target directory.
struct Loader {
    child: Child,
    dir: PathBuf,
}

impl Loader {
    fn start(root: &Path) -> Result<Self> {
        let dir = root.join("target/soak-load");
        // Each round starts from nothing so that the load lasts (a finished build is idle).
        let script = format!(
            "n=0; while :; do n=$((n+1)); echo $n > '{dir}/.rounds'; rm -rf '{dir}/release'; \
             cargo build --release --workspace --quiet --target-dir '{dir}' >/dev/null 2>&1; done",
            dir = dir.display()
        );
        std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let child = Command::new("setsid")
            .args(["bash", "-c", &script])
            .current_dir(root)
            .stdin(Stdio::null())
            .spawn()
            .context("cannot start the background build (setsid, bash)")?;
        Ok(Self { child, dir })
    }

    /// Stops the loop and everything it started; how many builds were started.
    fn stop(&mut self) -> String {
        let pid = self.child.id();
        // The loop runs in its own session: signal the whole process group.
        let _ = Command::new("kill").args(["--", &format!("-{pid}")]).status();
        let _ = self.child.wait();
        std::fs::read_to_string(self.dir.join(".rounds")).map_or_else(|_| "?".into(), |s| s.trim().to_owned())
    }
}

fn git_head(root: &Path) -> String {
    Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(root)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map_or_else(|| "?".to_owned(), |o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
}

fn record(root: &Path, line: &str) -> Result<()> {
    let path = root.join("tests/soak-runs.tsv");
    let fresh = !path.exists();
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    if fresh {
        writeln!(
            file,
            "# cargo xtask soak: one line per `CI=true cargo test --workspace --no-fail-fast` run"
        )?;
        writeln!(file, "# unix time\tcommit\tload\tseconds\tpassed\tfailed\tignored\tfailures")?;
    }
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    writeln!(file, "{now}\t{line}").with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tally_sums_every_binary_and_names_failures() {
        let out = "\
running 3 tests
test a ... ok
test b::c ... FAILED
test d ... ignored
test result: FAILED. 1 passed; 1 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.01s

running 2 tests
test result: ok. 2 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 1.00s
error: test failed, to rerun pass `-p x --test y`
";
        let t = tally(out);
        assert_eq!((t.passed, t.failed, t.ignored), (3, 1, 1));
        assert_eq!(
            t.failures,
            vec!["b::c".to_owned(), "test failed, to rerun pass `-p x --test y`".to_owned()]
        );
    }

    #[test]
    fn tally_of_nothing_is_empty() {
        assert_eq!(tally("error: could not compile `x`"), Tally::default());
    }
}
