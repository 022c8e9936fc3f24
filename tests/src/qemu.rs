//! Boots the test guest under QEMU and talks to its serial console.
//!
//! The serial console is QEMU's stdio (pipes, not a terminal): every line the guest prints is
//! kept in a transcript, and commands are typed into the guest's shell on `ttyS0`.

use std::io::Write;
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use pleiades_agent::ready::{GuestInfo, READY_MARKER, parse_ready_line};

use crate::image::GuestImage;
use pleiades_vmm::accel::{Accel, AccelChoice, AccelError};

/// Environment variable: seconds to wait for READY (default 180).
pub const BOOT_TIMEOUT_ENV: &str = "PLEIADES_BOOT_TIMEOUT";

pub use pleiades_host::vm::qemu::{accel_option, qemu_binary};

/// How long to wait for the guest to come up.
pub fn boot_timeout() -> Duration {
    let secs = std::env::var(BOOT_TIMEOUT_ENV).ok().and_then(|s| s.parse().ok()).unwrap_or(180);
    Duration::from_secs(secs)
}

/// Errors of the guest runner.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    #[error(transparent)]
    Accel(#[from] AccelError),
    #[error(transparent)]
    Image(#[from] crate::image::MissingImage),
    #[error("cannot start {qemu}: {error}. Install QEMU with `cargo xtask deps`, or build the workspace")]
    Spawn { qemu: String, error: std::io::Error },
    #[error("cannot create a scratch directory: {0}")]
    Scratch(std::io::Error),
    #[error("timed out after {waited:?} waiting for {what}; last console lines:\n{tail}")]
    Timeout { what: String, waited: Duration, tail: String },
    #[error("QEMU exited ({status}) while waiting for {what}; last console lines:\n{tail}")]
    Exited { what: String, status: String, tail: String },
    #[error("the READY line is malformed: {error}\n{line}")]
    BadReady { line: String, error: pleiades_agent::ready::ReadyLineError },
    #[error("cannot write to the guest's serial console: {0}")]
    Serial(std::io::Error),
    #[error("`{command}` failed in the guest (exit status {status}); its output:\n{output}")]
    CommandFailed { command: String, status: i32, output: String },
}

/// What to boot.
#[derive(Debug, Clone)]
pub struct GuestConfig {
    pub cpus: u32,
    pub memory_mib: u32,
    /// Extra QEMU arguments, e.g. `["-device", "virtio-rng-pci"]`.
    pub qemu_args: Vec<String>,
    /// Appended to the kernel command line.
    pub cmdline_extra: String,
    /// Back guest RAM with a shared memfd (needed by vhost-user backends).
    pub shared_memory: bool,
    /// Accelerator; `None` chooses with [`pleiades_vmm::accel::choose`].
    pub accel: Option<AccelChoice>,
    /// Copy the console to this process's stdout as it arrives (also with `PLEIADES_ECHO_CONSOLE=1`).
    pub echo_console: bool,
}

impl Default for GuestConfig {
    fn default() -> Self {
        Self {
            cpus: 2,
            memory_mib: 512,
            qemu_args: Vec::new(),
            cmdline_extra: String::new(),
            shared_memory: false,
            accel: None,
            echo_console: std::env::var_os("PLEIADES_ECHO_CONSOLE").is_some(),
        }
    }
}

impl GuestConfig {
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

/// A shell command that waits (up to 20 s) until a process has tty1 open, the shell that fbcon
/// shows and the virtual keyboard types into, and fails if none has: keys typed earlier would
/// be lost.
pub const WAIT_FOR_TTY1_SHELL: &str = "for i in $(seq 100); do ls -l /proc/[0-9]*/fd 2>/dev/null | grep -q 'tty1$' && break; \
     sleep 0.2; done; ls -l /proc/[0-9]*/fd 2>/dev/null | grep -q 'tty1$'";

/// The base kernel command line of the test image.
pub const BASE_CMDLINE: &str = "console=tty1 console=ttyS0,115200 quiet panic=-1";

/// A running QEMU guest. Dropping it kills QEMU.
#[derive(Debug)]
pub struct Guest {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    transcript: Arc<Mutex<Vec<String>>>,
    accel: AccelChoice,
    marker: u64,
    _scratch: Option<tempfile::TempDir>,
}

impl Guest {
    /// Starts QEMU with the test image; does not wait for READY.
    pub fn start(image: &GuestImage, config: &GuestConfig) -> Result<Self, GuestError> {
        let accel = match &config.accel {
            Some(choice) => choice.clone(),
            None => pleiades_vmm::accel::choose()?,
        };
        let scratch =
            tempfile::Builder::new().prefix("pleiades-guest-").tempdir().map_err(GuestError::Scratch)?;
        let mut cmd = Command::new(qemu_binary());
        cmd.args(["-nodefaults", "-no-user-config", "-display", "none", "-vga", "none", "-monitor", "none"])
            .args(["-serial", "stdio", "-no-reboot"])
            .args(["-smp", &config.cpus.to_string(), "-m", &format!("{}M", config.memory_mib)]);
        cmd.args(["-accel", &accel_option(accel.accel, config.cpus)]);
        if config.shared_memory {
            cmd.args([
                "-object",
                &format!("memory-backend-memfd,id=mem,size={}M,share=on", config.memory_mib),
                "-machine",
                "q35,memory-backend=mem",
            ]);
        } else {
            cmd.args(["-machine", "q35"]);
        }
        cmd.args(["-cpu", if accel.accel == Accel::Kvm { "host" } else { "max" }]);
        cmd.arg("-kernel").arg(&image.kernel).arg("-initrd").arg(&image.initramfs);
        let cmdline = format!("{BASE_CMDLINE} {}", config.cmdline_extra).trim().to_owned();
        cmd.args(["-append", &cmdline]);
        cmd.arg("-qmp").arg(format!("unix:{},server=on,wait=off", scratch.path().join("qmp.sock").display()));
        cmd.args(&config.qemu_args);
        Self::spawn(cmd, accel, config.echo_console, Some(scratch))
    }

    /// Starts any command whose stdin/stdout is a guest's serial console, e.g.
    /// `pleiades-host run --serial stdio …`, and talks to it like to QEMU.
    /// `echo_console` copies the console to stdout (also on with `PLEIADES_ECHO_CONSOLE=1`).
    pub fn from_command(cmd: Command, accel: AccelChoice, echo_console: bool) -> Result<Self, GuestError> {
        let echo = echo_console || std::env::var_os("PLEIADES_ECHO_CONSOLE").is_some();
        Self::spawn(cmd, accel, echo, None)
    }

    fn spawn(
        mut cmd: Command,
        accel: AccelChoice,
        echo_console: bool,
        scratch: Option<tempfile::TempDir>,
    ) -> Result<Self, GuestError> {
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let program = cmd.get_program().to_string_lossy().into_owned();
        let mut child = cmd.spawn().map_err(|error| GuestError::Spawn { qemu: program, error })?;

        let transcript = Arc::new(Mutex::new(Vec::new()));
        let (tx, lines) = mpsc::channel();
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        spawn_reader(stdout, "", echo_console, tx.clone(), transcript.clone());
        spawn_reader(stderr, "stderr: ", true, tx, transcript.clone());
        Ok(Self { stdin: child.stdin.take(), child, lines, transcript, accel, marker: 0, _scratch: scratch })
    }

    /// Starts `pleiades-host run` (the binary at `host`) on the test image with 2 vCPUs and
    /// 512 MiB, the serial console on stdio and the control socket at `control`; `args` adds
    /// `--vmm`, `--device` and the like. Host logs are at `warn` unless `PLEIADES_LOG` says
    /// otherwise. Does not wait for READY.
    pub fn start_host(
        host: &std::path::Path,
        image: &GuestImage,
        args: &[&str],
        control: &std::path::Path,
        accel: AccelChoice,
    ) -> Result<Self, GuestError> {
        let mut cmd = Command::new(host);
        cmd.env("PLEIADES_LOG", std::env::var("PLEIADES_LOG").unwrap_or_else(|_| "warn".into()))
            .args(["run", "--cpus", "2", "--memory", "512M", "--cmdline", BASE_CMDLINE])
            .args(args)
            .arg("--kernel")
            .arg(&image.kernel)
            .arg("--initrd")
            .arg(&image.initramfs)
            .arg("--control")
            .arg(control);
        Self::from_command(cmd, accel, false)
    }

    /// Starts the guest and waits for its READY line.
    pub fn boot(image: &GuestImage, config: &GuestConfig) -> Result<(Self, GuestInfo), GuestError> {
        let mut guest = Self::start(image, config)?;
        let info = guest.wait_ready(boot_timeout())?;
        Ok((guest, info))
    }

    /// The process id of the command (QEMU, or `pleiades-host run`).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The accelerator in use and why.
    pub fn accel(&self) -> &AccelChoice {
        &self.accel
    }

    /// Waits for the READY line and parses it.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<GuestInfo, GuestError> {
        let line = self.wait_for_line(|l| l.contains(READY_MARKER), "the PLEIADES-READY line", timeout)?;
        parse_ready_line(&line).map_err(|error| GuestError::BadReady { line, error })
    }

    /// Waits for a console line containing `needle`.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> Result<String, GuestError> {
        self.wait_for_line(|l| l.contains(needle), &format!("{needle:?}"), timeout)
    }

    fn wait_for_line(
        &mut self,
        matches: impl Fn(&str) -> bool,
        what: &str,
        timeout: Duration,
    ) -> Result<String, GuestError> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if matches(&line) => return Ok(line),
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => {
                    return Err(GuestError::Timeout {
                        what: what.to_owned(),
                        waited: timeout,
                        tail: self.tail(30),
                    });
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let status = self.child.wait().map(|s| s.to_string()).unwrap_or_else(|e| e.to_string());
                    return Err(GuestError::Exited { what: what.to_owned(), status, tail: self.tail(30) });
                }
            }
        }
    }

    /// Types `text` on the serial console.
    pub fn send(&mut self, text: &str) -> Result<(), GuestError> {
        let stdin =
            self.stdin.as_mut().ok_or_else(|| GuestError::Serial(std::io::ErrorKind::BrokenPipe.into()))?;
        stdin.write_all(text.as_bytes()).and_then(|()| stdin.flush()).map_err(GuestError::Serial)
    }

    /// Runs a shell command in the guest and returns its output lines (stdout and stderr). A
    /// non-zero exit status is an error ([`GuestError::CommandFailed`]): a setup command that
    /// fails says so here, not later as a timeout. [`Guest::run_status`] expects failures.
    pub fn run(&mut self, command: &str, timeout: Duration) -> Result<Vec<String>, GuestError> {
        match self.run_status(command, timeout)? {
            (0, output) => Ok(output),
            (status, output) => Err(GuestError::CommandFailed {
                command: command.to_owned(),
                status,
                output: output.join("\n"),
            }),
        }
    }

    /// Waits (polling in the guest, up to two minutes) until `path` exists, or with
    /// `present == false` until it is gone; whether it did.
    pub fn wait_path(&mut self, path: &str, present: bool) -> Result<bool, GuestError> {
        let test = if present { format!("[ -e {path} ]") } else { format!("[ ! -e {path} ]") };
        let script = format!("i=0; until {test} || [ $i -gt 240 ]; do i=$((i+1)); sleep 0.5; done; {test}");
        Ok(self.run_status(&script, Duration::from_secs(180))?.0 == 0)
    }

    /// Starts reading block device `dev` in the background, over and over (the page cache
    /// dropped between passes), until a read fails: then it writes `/tmp/reader`. For tests
    /// that pull a device out under a reader ([`Guest::block_reader_ended`]).
    pub fn start_block_reader(&mut self, dev: &str) -> Result<(), GuestError> {
        self.run(
            &format!(
                "rm -f /tmp/reader; (while dd if={dev} of=/dev/null bs=64k 2>/dev/null; do \
                 echo 3 > /proc/sys/vm/drop_caches; done; echo ENDED > /tmp/reader) >/dev/null 2>&1 & true"
            ),
            Duration::from_secs(60),
        )
        .map(drop)
    }

    /// Whether the reader of [`Guest::start_block_reader`] ended (waiting up to a minute for
    /// it): a reader whose device went must fail, not hang.
    pub fn block_reader_ended(&mut self) -> Result<bool, GuestError> {
        let script = "i=0; until [ -e /tmp/reader ] || [ $i -gt 120 ]; do i=$((i+1)); sleep 0.5; done; [ -e /tmp/reader ]";
        Ok(self.run_status(script, Duration::from_secs(180))?.0 == 0)
    }

    /// Runs a shell command in the guest: its exit status and output lines.
    pub fn run_status(&mut self, command: &str, timeout: Duration) -> Result<(i32, Vec<String>), GuestError> {
        self.marker += 1;
        // The shell echoes what is typed; the arithmetic makes the finished marker differ from
        // the echoed command.
        let n = self.marker;
        let begin = format!("PLEIADES-BEGIN-{n}");
        let end = format!("PLEIADES-END-{n}-");
        self.send(&format!("echo PLEIADES-BEGIN-$(({n}*1)); {command}; echo PLEIADES-END-$(({n}*1))-$?\n"))?;
        self.wait_for_line(|l| l.trim() == begin, &begin, timeout)?;
        let mut output = Vec::new();
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self.wait_for_line(|_| true, &end, left)?;
            if let Some(code) = line.trim().strip_prefix(&end) {
                let status = code.parse().unwrap_or(-1);
                return Ok((status, output));
            }
            output.push(line);
        }
    }

    /// Asks the guest to power off and waits for QEMU to exit.
    pub fn poweroff(mut self, timeout: Duration) -> Result<ExitStatus, GuestError> {
        self.send("poweroff\n")?;
        self.wait_exit(timeout)
    }

    /// Waits for QEMU to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus, GuestError> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Ok(status);
            }
            thread::sleep(Duration::from_millis(50));
        }
        Err(GuestError::Timeout { what: "QEMU to exit".into(), waited: timeout, tail: self.tail(20) })
    }

    /// Everything printed so far.
    pub fn transcript(&self) -> Vec<String> {
        self.transcript.lock().map(|t| t.clone()).unwrap_or_default()
    }

    fn tail(&self, n: usize) -> String {
        let t = self.transcript();
        t[t.len().saturating_sub(n)..].join("\n")
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

fn spawn_reader<R: std::io::Read + Send + 'static>(
    mut stream: R,
    prefix: &'static str,
    echo: bool,
    tx: mpsc::Sender<String>,
    transcript: Arc<Mutex<Vec<String>>>,
) {
    thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        let mut pending = Vec::new();
        loop {
            let n = match stream.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if echo {
                // Raw, so that prompts without a newline show up too.
                let mut out = std::io::stdout().lock();
                let _ = out.write_all(&chunk[..n]).and_then(|()| out.flush());
            }
            pending.extend_from_slice(&chunk[..n]);
            while let Some(end) = pending.iter().position(|b| *b == b'\n') {
                let raw: Vec<u8> = pending.drain(..=end).collect();
                let text = String::from_utf8_lossy(&raw);
                let line =
                    format!("{prefix}{}", text.trim_end_matches(['\n', '\r']).trim_start_matches('\r'));
                if let Ok(mut t) = transcript.lock() {
                    t.push(line.clone());
                }
                let _ = tx.send(line);
            }
        }
    });
}
