//! Boots the no_std test guest (`testguest/`) under QEMU and reads its one result line.
//!
//! The guest needs no console input and powers itself off, so this runner only collects the
//! serial output until QEMU exits (or a deadline passes, then QEMU is killed).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::qemu::{accel_option, qemu_binary};
use pleiades_vmm::accel::{ACCEL_ENV, Accel, AccelChoice, AccelError};

/// The marker of the result line.
pub const RESULT_MARKER: &str = "PLEIADES-TESTGUEST ";

/// One run of the test guest.
#[derive(Debug, Clone)]
pub struct TestGuestConfig {
    pub cpus: u32,
    pub memory_mib: u32,
    /// The guest's command line (`mode=…`, `expect=…`).
    pub cmdline: String,
    /// Extra QEMU arguments (devices).
    pub qemu_args: Vec<String>,
    /// QEMU is killed after this long.
    pub timeout: Duration,
    /// Accelerator; `None` chooses with [`pleiades_vmm::accel::choose`].
    pub accel: Option<AccelChoice>,
}

impl Default for TestGuestConfig {
    fn default() -> Self {
        Self {
            cpus: 2,
            memory_mib: 512,
            cmdline: String::new(),
            qemu_args: Vec::new(),
            timeout: Duration::from_secs(180),
            accel: None,
        }
    }
}

impl TestGuestConfig {
    /// Adds `-device SPEC`.
    pub fn device(mut self, spec: &str) -> Self {
        self.qemu_args.extend(["-device".to_owned(), spec.to_owned()]);
        self
    }

    /// Adds raw QEMU arguments.
    pub fn args<I: IntoIterator<Item = S>, S: Into<String>>(mut self, args: I) -> Self {
        self.qemu_args.extend(args.into_iter().map(Into::into));
        self
    }
}

/// What a run produced.
#[derive(Debug)]
pub struct TestGuestRun {
    /// The parsed JSON of the result line.
    pub result: serde_json::Value,
    /// QEMU's exit status (the guest powered off when it is success).
    pub status: ExitStatus,
    /// Every line of the serial console, then QEMU's own messages prefixed `qemu: `.
    pub console: Vec<String>,
    /// From starting QEMU to its exit.
    pub elapsed: Duration,
    pub accel: AccelChoice,
}

#[derive(Debug, thiserror::Error)]
pub enum TestGuestError {
    #[error(transparent)]
    Accel(#[from] AccelError),
    #[error("cannot start {qemu}: {source}. Install QEMU with `cargo xtask deps`")]
    Spawn { qemu: String, source: std::io::Error },
    #[error("QEMU still ran after {0:?}; killed. Console:\n{1}")]
    Timeout(Duration, String),
    #[error("QEMU exited ({status}) without a result line. Console:\n{console}")]
    NoResult { status: ExitStatus, console: String },
    #[error("{count} result lines, expected exactly one. Console:\n{console}")]
    ResultCount { count: usize, console: String },
    #[error("the result line is not JSON ({source}): {line}")]
    BadJson { line: String, source: serde_json::Error },
}

/// TCG unless `PLEIADES_ACCEL` asks for something else (the guest is small enough for TCG).
fn accel() -> Result<AccelChoice, AccelError> {
    match std::env::var(ACCEL_ENV) {
        Ok(v) if !v.trim().is_empty() => pleiades_vmm::accel::choose(),
        _ => Ok(AccelChoice { accel: Accel::Tcg, reason: "the test guest runs under TCG by default".into() }),
    }
}

/// Boots `elf` with `-kernel` (QEMU uses its PVH entry) and waits for QEMU to exit.
pub fn run(elf: &Path, config: &TestGuestConfig) -> Result<TestGuestRun, TestGuestError> {
    run_watching(elf, config, |_| {})
}

/// [`run`], calling `on_line` with every serial console line as it arrives (on a reader
/// thread): a test acts on a line the guest prints while it waits, such as
/// `PLEIADES-TESTGUEST-INPUT-WAITING`.
pub fn run_watching(
    elf: &Path,
    config: &TestGuestConfig,
    on_line: impl FnMut(&str) + Send + 'static,
) -> Result<TestGuestRun, TestGuestError> {
    let accel = match &config.accel {
        Some(choice) => choice.clone(),
        None => accel()?,
    };
    let mut cmd = Command::new(qemu_binary());
    // Under KVM a plain model: `host`/`max` pass MSRs (IA32_ARCH_CAPABILITIES) that the build
    // machines' software-assisted nested KVM rejects, and the guest needs nothing beyond qemu64.
    let cpu = match accel.accel {
        Accel::Kvm => "qemu64",
        Accel::Tcg => "max",
    };
    cmd.args(["-nodefaults", "-no-user-config", "-display", "none", "-vga", "none", "-monitor", "none"])
        .args(["-serial", "stdio", "-no-reboot", "-machine", "q35", "-cpu", cpu])
        .args(["-accel", &accel_option(accel.accel, config.cpus)])
        .args(["-smp", &config.cpus.to_string(), "-m", &format!("{}M", config.memory_mib)])
        .arg("-kernel")
        .arg(elf)
        .args(["-append", &config.cmdline])
        .args(&config.qemu_args);
    run_command_watching(cmd, config.timeout, accel, on_line)
}

/// Runs any command whose stdout is the test guest's serial console (QEMU, or
/// `pleiades-host run --kernel testguest.elf`) until it exits or `timeout` passes.
pub fn run_command(
    cmd: Command,
    timeout: Duration,
    accel: AccelChoice,
) -> Result<TestGuestRun, TestGuestError> {
    run_command_watching(cmd, timeout, accel, |_| {})
}

/// [`run_command`], calling `on_line` with every line of stdout as it arrives.
pub fn run_command_watching(
    mut cmd: Command,
    timeout: Duration,
    accel: AccelChoice,
    on_line: impl FnMut(&str) + Send + 'static,
) -> Result<TestGuestRun, TestGuestError> {
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let program = cmd.get_program().to_string_lossy().into_owned();
    let started = Instant::now();
    let mut child = cmd.spawn().map_err(|source| TestGuestError::Spawn { qemu: program, source })?;
    let stdout = child.stdout.take().expect("piped stdout");
    let stderr = child.stderr.take().expect("piped stderr");
    let out_reader = thread::spawn(move || read_lines(stdout, "", on_line));
    let err_reader = thread::spawn(move || read_lines(stderr, "qemu: ", |_| {}));

    let deadline = started + timeout;
    let status = loop {
        if let Ok(Some(status)) = child.try_wait() {
            break Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        thread::sleep(Duration::from_millis(20));
    };
    let elapsed = started.elapsed();
    let mut console = out_reader.join().unwrap_or_default();
    console.extend(err_reader.join().unwrap_or_default());
    let Some(status) = status else {
        return Err(TestGuestError::Timeout(timeout, console.join("\n")));
    };

    let results: Vec<&String> = console.iter().filter(|l| l.contains(RESULT_MARKER)).collect();
    let line = match results.as_slice() {
        [] => return Err(TestGuestError::NoResult { status, console: console.join("\n") }),
        [one] => (*one).clone(),
        _ => return Err(TestGuestError::ResultCount { count: results.len(), console: console.join("\n") }),
    };
    let json = line.split_once(RESULT_MARKER).map_or("", |(_, json)| json);
    let result = serde_json::from_str(json)
        .map_err(|source| TestGuestError::BadJson { line: line.clone(), source })?;
    Ok(TestGuestRun { result, status, console, elapsed, accel })
}

fn read_lines(stream: impl std::io::Read, prefix: &str, mut on_line: impl FnMut(&str)) -> Vec<String> {
    BufReader::new(stream)
        .split(b'\n')
        .map_while(Result::ok)
        .map(|raw| {
            let line = format!("{prefix}{}", String::from_utf8_lossy(&raw).trim_end_matches('\r'));
            on_line(&line);
            line
        })
        .collect()
}
