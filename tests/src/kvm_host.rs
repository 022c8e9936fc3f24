//! A "KVM host" for tests: a VM with a real, hardware-backed-looking KVM, where Linux guests run
//! on Pleiades' own VMM.
//!
//! This machine's `/dev/kvm` is a nested, software-assisted KVM (no vmx/svm flag): the no_std
//! test guest runs on it, a stock Linux kernel does not. QEMU's TCG with `-cpu max` however
//! offers its guest AMD's `svm` with nested paging (`npt`), and there the trixie kernel's
//! `kvm_amd` loads and gives a `/dev/kvm` that runs Linux guests.
//!
//! [`KvmHost::boot`] starts that outer VM under `qemu-system-x86_64 -accel tcg -cpu max` (2
//! vCPUs, 3 GiB by default, QEMU under `setpriv --pdeathsig KILL` so that it dies with the test
//! process; dropping the fixture kills it too):
//!
//! - kernel: the test image's (`target/guest/vmlinuz`); initramfs:
//!   `target/guest/initramfs-kvm-host.cpio`, the test image with the modules of
//!   `guest/kvm-host-modules.txt` (kvm_amd, 9p and their chains) appended as a second archive.
//!   The test image boots as usual (READY), then the fixture loads those modules in the order
//!   xtask resolved (`/etc/pleiades/kvm-host-modules`) and checks that `/dev/kvm` appeared.
//! - this machine's root file system, read-only over virtio-9p (`mount_tag=hostroot`,
//!   `cache=loose`), mounted at `/host`, with the VM's own `/proc`, `/sys`, `/dev`, and tmpfs
//!   on `/tmp`, `/run` and `/dev/shm`. The console's shell then `chroot`s into it: commands run
//!   with this machine's own binaries and libraries (`pleiades-host`, `qemu-system-x86_64`),
//!   and every path of this machine outside `/tmp` means the same file inside.
//! - a writable scratch directory, this machine's [`KvmHost::scratch`], over a second virtio-9p
//!   (`mount_tag=scratch`) mounted at the same path inside: files go in and out there (never as
//!   base64 over the console).
//!
//! QEMU gets SIGKILL when the thread that booted the fixture ends (Linux's parent-death signal
//! follows the thread): keep the fixture in the thread that made it, as tests do.
//!
//! Commands go over the serial console ([`KvmHost::run`], the [`Guest::run`] machinery). Inner
//! VMs ([`KvmHost::run_vm`], [`KvmHost::start_vm`]) are `pleiades-host run` with their serial
//! console and log written to the scratch directory and read from this side.
//!
//! Everything inside is TCG-emulated, the inner guest nested on top: times measured here are
//! TCG-nested figures, useful to compare runs on this fixture, not hardware.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use pleiades_vmm::accel::{Accel, AccelChoice};

use crate::image::GuestImage;
use crate::qemu::{Guest, GuestError, qemu_binary};

/// The outer VM's kernel command line (serial only: it has no display).
const CMDLINE: &str = "console=ttyS0,115200 quiet panic=-1";

/// Where the host root is mounted inside before the chroot.
const HOST_ROOT: &str = "/host";

/// 9p mount options: the Linux 9p2000.L dialect over virtio, large messages.
const NINEP: &str = "trans=virtio,version=9p2000.L,msize=512000";

/// `PATH` inside the chroot.
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// How long one command inside may take. Generous: while an inner VM boots on the nested KVM
/// its vCPUs take the KVM host's, and on a loaded machine (this VM's own vCPUs are emulated) a
/// shell's answer once took over 60 s; a command that truly hangs still fails.
const STEP_TIMEOUT: Duration = Duration::from_secs(180);

/// What the KVM host needs from this machine.
#[derive(Debug, Clone)]
pub struct KvmHostParts {
    /// The test image's kernel (also the KVM host's).
    pub kernel: PathBuf,
    /// `initramfs-kvm-host.cpio`.
    pub initramfs: PathBuf,
    /// The Linux test image, for inner guests.
    pub image: GuestImage,
    /// The no_std test guest, for inner guests.
    pub testguest: PathBuf,
    /// `pleiades-host`, run inside.
    pub host: PathBuf,
}

impl KvmHostParts {
    /// Finds the images (`cargo xtask guest-image`), `pleiades-host` (built beside the tests),
    /// QEMU and `setpriv`; says what is missing. Paths are made absolute, and none may be under
    /// `/tmp` (a tmpfs inside).
    pub fn locate() -> Result<Self, String> {
        crate::prerequisite::command(&qemu_binary().to_string_lossy())?;
        crate::prerequisite::command("setpriv")?;
        let image = GuestImage::locate().map_err(|e| e.to_string())?;
        let initramfs = crate::image::kvm_host_initramfs().map_err(|e| e.to_string())?;
        let testguest = crate::image::testguest_elf().map_err(|e| e.to_string())?;
        let host = crate::workspace_binary("pleiades-host")?;
        let absolute = |p: &Path| -> Result<PathBuf, String> {
            let p = std::fs::canonicalize(p).map_err(|e| format!("{}: {e}", p.display()))?;
            if p.starts_with("/tmp") {
                return Err(format!(
                    "{} is under /tmp, which the KVM host replaces with its own tmpfs",
                    p.display()
                ));
            }
            Ok(p)
        };
        Ok(Self {
            kernel: absolute(&image.kernel)?,
            initramfs: absolute(&initramfs)?,
            image: GuestImage { kernel: absolute(&image.kernel)?, initramfs: absolute(&image.initramfs)? },
            testguest: absolute(&testguest)?,
            host: absolute(&host)?,
        })
    }
}

/// The outer VM's size.
#[derive(Debug, Clone)]
pub struct KvmHostConfig {
    pub cpus: u32,
    pub memory_mib: u32,
    /// From starting QEMU to the outer test image's READY line.
    pub boot_timeout: Duration,
    /// Copy the console to stdout (also with `PLEIADES_ECHO_CONSOLE=1`).
    pub echo_console: bool,
    /// More QEMU arguments (devices, a network, a QMP socket: [`crate::thin_client`]).
    pub qemu_args: Vec<String>,
}

impl Default for KvmHostConfig {
    fn default() -> Self {
        Self {
            cpus: 2,
            memory_mib: 3072,
            boot_timeout: crate::qemu::boot_timeout(),
            echo_console: false,
            qemu_args: Vec::new(),
        }
    }
}

/// Why the KVM host is not usable.
#[derive(Debug, thiserror::Error)]
pub enum KvmHostError {
    #[error(transparent)]
    Guest(#[from] GuestError),
    #[error("cannot create the scratch directory: {0}")]
    Scratch(std::io::Error),
    #[error(
        "the KVM host's CPU has no svm flag: this QEMU's `-cpu max` under TCG does not offer AMD-V. /proc/cpuinfo flags: {flags}"
    )]
    NoSvm { flags: String },
    #[error("{module} did not load: {output}\ndmesg:\n{dmesg}")]
    Module { module: String, output: String, dmesg: String },
    #[error("kvm_amd loaded but /dev/kvm did not appear\ndmesg:\n{dmesg}")]
    NoKvm { dmesg: String },
    #[error("KVM host setup: {step} failed:\n{output}\ndmesg:\n{dmesg}")]
    Setup { step: String, output: String, dmesg: String },
    #[error(
        "inner VM {name}: {what}\nserial console ({serial}):\n{serial_tail}\npleiades-host log:\n{log_tail}"
    )]
    Inner { name: String, what: String, serial: String, serial_tail: String, log_tail: String },
}

/// How long the KVM host took to come up (wall clock here).
#[derive(Debug, Clone, Copy)]
pub struct BootTimes {
    /// From starting QEMU to the outer image's READY line.
    pub ready: Duration,
    /// From starting QEMU to the shell in this machine's root (modules loaded, mounts done).
    pub shell: Duration,
}

/// Memory in use, MiB.
#[derive(Debug, Clone, Copy)]
pub struct MemoryUse {
    /// The outer QEMU's resident set on this machine.
    pub qemu_rss_mib: u64,
    /// Inside the KVM host: `MemTotal - MemAvailable`.
    pub guest_used_mib: u64,
    /// Inside the KVM host: `MemTotal`.
    pub guest_total_mib: u64,
}

/// An inner VM that ran to its end ([`KvmHost::run_vm`]).
#[derive(Debug)]
pub struct InnerRun {
    /// `pleiades-host run`'s exit status (137 when the timeout killed it).
    pub status: i32,
    /// Its serial console.
    pub serial: Vec<String>,
    /// Its stdout and stderr (at `PLEIADES_LOG=info`: the exit reason).
    pub log: Vec<String>,
    /// Wall clock here, around the command.
    pub elapsed: Duration,
}

/// An inner VM running in the background ([`KvmHost::start_vm`]).
#[derive(Debug)]
pub struct InnerVm {
    pub name: String,
    /// `pleiades-host run`'s pid inside.
    pub pid: u32,
    /// Its control socket (inside).
    pub control: String,
    /// Its serial console file (the same path here and inside).
    pub serial: PathBuf,
    /// Its stdout and stderr.
    pub log: PathBuf,
    /// When it was started (here).
    pub started: Instant,
}

/// The KVM host VM. Dropping it kills QEMU.
#[derive(Debug)]
pub struct KvmHost {
    // Dropped first: QEMU dies before its scratch directory is removed.
    guest: Guest,
    scratch: tempfile::TempDir,
    parts: KvmHostParts,
    times: BootTimes,
}

impl KvmHost {
    /// Boots the KVM host and leaves its console in a shell in this machine's root, with
    /// `/dev/kvm`. Each step's failure says what and shows the VM's `dmesg`.
    pub fn boot(parts: KvmHostParts, config: &KvmHostConfig) -> Result<Self, KvmHostError> {
        let scratch = tempfile::Builder::new()
            .prefix("pleiades-kvm-host-")
            .tempdir_in("/tmp")
            .map_err(KvmHostError::Scratch)?;
        // QEMU dies with this process, even when it is killed (setpriv sets the parent-death
        // signal and execs QEMU, so the pid is QEMU's).
        let mut cmd = Command::new("setpriv");
        cmd.args(["--pdeathsig", "KILL", "--"])
            .arg(qemu_binary())
            .args(["-nodefaults", "-no-user-config", "-display", "none", "-vga", "none", "-monitor", "none"])
            .args(["-serial", "stdio", "-no-reboot", "-machine", "q35", "-cpu", "max"])
            // Multi-threaded TCG even where QEMU has bug 3040 (see `accel_option`): on one
            // thread for both vCPUs the Linux guest nested in this one printed nothing in 300 s.
            .args(["-accel", "tcg,thread=multi"])
            .args(["-smp", &config.cpus.to_string(), "-m", &format!("{}M", config.memory_mib)])
            .arg("-kernel")
            .arg(&parts.kernel)
            .arg("-initrd")
            .arg(&parts.initramfs)
            .args(["-append", CMDLINE])
            .args(["-fsdev", "local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap"])
            .args(["-device", "virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot"])
            .arg("-fsdev")
            .arg(format!(
                "local,id=scratch,path={},security_model=none,multidevs=remap",
                scratch.path().display().to_string().replace(',', ",,")
            ))
            .args(["-device", "virtio-9p-pci,fsdev=scratch,mount_tag=scratch"])
            .args(&config.qemu_args);
        let accel = AccelChoice {
            accel: Accel::Tcg,
            reason: "the KVM host runs under TCG with -cpu max (svm + npt for its own KVM)".into(),
        };
        let started = Instant::now();
        let mut guest = Guest::from_command(cmd, accel, config.echo_console)?;
        guest.wait_ready(config.boot_timeout)?;
        let ready = started.elapsed();
        let mut host = Self { guest, scratch, parts, times: BootTimes { ready, shell: ready } };
        host.setup()?;
        host.times.shell = started.elapsed();
        Ok(host)
    }

    fn setup(&mut self) -> Result<(), KvmHostError> {
        // Kernel messages (KVM's unhandled MSRs among them) stay in dmesg, off the console.
        self.step("dmesg -n 1", "dmesg -n 1")?;
        // Loopback, for session servers and clients inside.
        self.step("bringing up loopback", "ip link set lo up")?;
        let flags = self.step("the CPU flags", "grep -m1 '^flags' /proc/cpuinfo")?.join(" ");
        if !flags.split_whitespace().any(|f| f == "svm") {
            return Err(KvmHostError::NoSvm { flags });
        }
        let loaded = self.guest.run(
            "while read -r m; do insmod /lib/modules/$m || echo \"FAILED $m\"; done < /etc/pleiades/kvm-host-modules",
            STEP_TIMEOUT,
        )?;
        if let Some(failed) = loaded.iter().find_map(|l| l.trim().strip_prefix("FAILED ")) {
            let module = failed.trim_end_matches(".ko").to_owned();
            return Err(KvmHostError::Module { module, output: loaded.join("\n"), dmesg: self.dmesg(20) });
        }
        if self.guest.run_status("test -c /dev/kvm", STEP_TIMEOUT)?.0 != 0 {
            return Err(KvmHostError::NoKvm { dmesg: self.dmesg(20) });
        }
        let root = HOST_ROOT;
        self.step(
            "mounting this machine's root over 9p",
            &format!("mkdir -p {root} && mount -t 9p -o {NINEP},ro,cache=loose hostroot {root}"),
        )?;
        self.step(
            "mounting /proc, /sys, /dev, /tmp, /run in it",
            &format!(
                "mount -t proc proc {root}/proc && mount -t sysfs sysfs {root}/sys && mount -o rbind /dev {root}/dev \
                 && mount -t tmpfs tmpfs {root}/dev/shm && mount -t tmpfs -o mode=1777 tmpfs {root}/tmp \
                 && mount -t tmpfs tmpfs {root}/run"
            ),
        )?;
        let scratch = shell_quote(&self.scratch.path().display().to_string());
        self.step(
            "mounting the scratch directory over 9p",
            &format!("mkdir -p {root}{scratch} && mount -t 9p -o {NINEP} scratch {root}{scratch}"),
        )?;
        // The console's shell becomes one in this machine's root: the marker is printed by the
        // new shell (the arithmetic keeps the typed line from matching it). No prompt: a
        // command typed before the shell is up would get it in front of its first line.
        self.guest.send(&format!(
            "chroot {root} /usr/bin/env -i PATH={PATH} HOME=/root TERM=dumb PS1= /bin/sh -c \
             'echo PLEIADES-HOST-ROOT-$((6*7)); exec /bin/sh -i'\n"
        ))?;
        self.guest.wait_for("PLEIADES-HOST-ROOT-42", STEP_TIMEOUT)?;
        let host = shell_quote(&self.parts.host.display().to_string());
        self.step("finding pleiades-host in the chroot", &format!("test -x {host}"))?;
        self.step(
            "writing to the scratch directory",
            &format!("touch {scratch}/.kvm-host && rm {scratch}/.kvm-host"),
        )?;
        Ok(())
    }

    /// Runs `command` and fails with its output (and dmesg) unless it exits 0.
    fn step(&mut self, what: &str, command: &str) -> Result<Vec<String>, KvmHostError> {
        match self.guest.run_status(command, STEP_TIMEOUT)? {
            (0, output) => Ok(output),
            (status, output) => Err(KvmHostError::Setup {
                step: what.to_owned(),
                output: format!("{}\n(exit status {status})", output.join("\n")),
                dmesg: self.dmesg(20),
            }),
        }
    }

    /// The last `lines` lines of the KVM host's kernel log (empty when it cannot be read).
    pub fn dmesg(&mut self, lines: usize) -> String {
        self.guest
            .run(&format!("dmesg | tail -n {lines}"), STEP_TIMEOUT)
            .map(|l| l.join("\n"))
            .unwrap_or_default()
    }

    /// Runs a shell command inside (in this machine's root, as root) and returns its output; a
    /// non-zero exit status is an error ([`GuestError::CommandFailed`]).
    pub fn run(&mut self, command: &str, timeout: Duration) -> Result<Vec<String>, GuestError> {
        self.guest.run(command, timeout)
    }

    /// Runs a shell command inside: its exit status and output.
    pub fn run_status(&mut self, command: &str, timeout: Duration) -> Result<(i32, Vec<String>), GuestError> {
        self.guest.run_status(command, timeout)
    }

    /// The scratch directory: the same path here and inside, writable from both.
    pub fn scratch(&self) -> &Path {
        self.scratch.path()
    }

    /// The images and binaries it runs.
    pub fn parts(&self) -> &KvmHostParts {
        &self.parts
    }

    /// How long it took to come up.
    pub fn boot_times(&self) -> BootTimes {
        self.times
    }

    /// The outer QEMU's process id.
    pub fn qemu_pid(&self) -> u32 {
        self.guest.pid()
    }

    /// The KVM host's /proc/cpuinfo, copied out through the scratch directory.
    pub fn cpuinfo(&mut self) -> Result<String, KvmHostError> {
        let file = self.scratch.path().join("cpuinfo");
        self.step(
            "copying /proc/cpuinfo out",
            &format!("cat /proc/cpuinfo > {}", shell_quote(&path_str(&file))),
        )?;
        std::fs::read_to_string(&file).map_err(KvmHostError::Scratch)
    }

    /// Memory in use now.
    pub fn memory(&mut self) -> Result<MemoryUse, KvmHostError> {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.guest.pid())).unwrap_or_default();
        let qemu_rss_mib = kib_field(&status, "VmRSS:").unwrap_or(0) >> 10;
        let meminfo = self.step("reading /proc/meminfo", "cat /proc/meminfo")?.join("\n");
        let total = kib_field(&meminfo, "MemTotal:").unwrap_or(0);
        let available = kib_field(&meminfo, "MemAvailable:").unwrap_or(0);
        Ok(MemoryUse {
            qemu_rss_mib,
            guest_used_mib: total.saturating_sub(available) >> 10,
            guest_total_mib: total >> 10,
        })
    }

    /// Runs `pleiades-host run ARGS` inside to its end (killed after `timeout`), with the serial
    /// console in `scratch/NAME.serial` and its output (`PLEIADES_LOG=info`) in
    /// `scratch/NAME.log`.
    pub fn run_vm(&mut self, name: &str, args: &[&str], timeout: Duration) -> Result<InnerRun, KvmHostError> {
        let (serial, log) = self.vm_files(name);
        let command = format!(
            "cd /tmp && PLEIADES_LOG=info timeout -s KILL {} {} run {} --serial {} </dev/null >{} 2>&1",
            timeout.as_secs().max(1),
            shell_quote(&path_str(&self.parts.host)),
            args.iter().map(|a| shell_quote(a)).collect::<Vec<_>>().join(" "),
            shell_quote(&path_str(&serial)),
            shell_quote(&path_str(&log)),
        );
        let started = Instant::now();
        let (status, _) = self.guest.run_status(&command, timeout + STEP_TIMEOUT)?;
        let elapsed = started.elapsed();
        Ok(InnerRun { status, serial: read_lines(&serial), log: read_lines(&log), elapsed })
    }

    /// Starts `pleiades-host run ARGS` inside in the background, with the serial console in
    /// `scratch/NAME.serial`, its output (`PLEIADES_LOG=info`) in `scratch/NAME.log` and its
    /// control socket at `/tmp/NAME.sock` inside. It ends with [`KvmHost::stop_vm`] or the KVM
    /// host.
    pub fn start_vm(&mut self, name: &str, args: &[&str]) -> Result<InnerVm, KvmHostError> {
        let (serial, log) = self.vm_files(name);
        let control = format!("/tmp/{name}.sock");
        let command = format!(
            "cd /tmp && PLEIADES_LOG=${{PLEIADES_LOG:-info}} {} run {} --serial {} --control {} </dev/null >{} 2>&1 & echo PID=$!",
            shell_quote(&path_str(&self.parts.host)),
            args.iter().map(|a| shell_quote(a)).collect::<Vec<_>>().join(" "),
            shell_quote(&path_str(&serial)),
            shell_quote(&control),
            shell_quote(&path_str(&log)),
        );
        let started = Instant::now();
        let output = self.step(&format!("starting inner VM {name}"), &command)?;
        let pid = output
            .iter()
            .find_map(|l| l.trim().strip_prefix("PID=").and_then(|p| p.parse().ok()))
            .ok_or_else(|| self.inner_error(name, &serial, &log, "no pid printed"))?;
        Ok(InnerVm { name: name.to_owned(), pid, control, serial, log, started })
    }

    /// Waits for a line of `vm`'s serial console that contains `needle`, reading the file here;
    /// fails early when the VM has ended.
    pub fn wait_vm_line(
        &mut self,
        vm: &InnerVm,
        needle: &str,
        timeout: Duration,
    ) -> Result<String, KvmHostError> {
        let deadline = Instant::now() + timeout;
        let mut next_alive_check = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(line) = complete_lines(&vm.serial).into_iter().find(|l| l.contains(needle)) {
                return Ok(line);
            }
            if Instant::now() >= deadline {
                let what = format!("no {needle:?} line after {} s", timeout.as_secs());
                return Err(self.inner_error(&vm.name, &vm.serial, &vm.log, &what));
            }
            if Instant::now() >= next_alive_check {
                next_alive_check = Instant::now() + Duration::from_secs(5);
                if let Some(status) = self.vm_exit_status(vm)? {
                    let what = format!("ended (exit status {status}) before printing {needle:?}");
                    return Err(self.inner_error(&vm.name, &vm.serial, &vm.log, &what));
                }
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// `pleiades-host ctl SOCKET ARGS` for `vm`, its stdout written to `scratch/FILE` and read
    /// back here.
    pub fn ctl(&mut self, vm: &InnerVm, args: &[&str], file: &str) -> Result<String, KvmHostError> {
        let out = self.scratch.path().join(file);
        let command = format!(
            "{} ctl {} {} > {}",
            shell_quote(&path_str(&self.parts.host)),
            shell_quote(&vm.control),
            args.iter().map(|a| shell_quote(a)).collect::<Vec<_>>().join(" "),
            shell_quote(&path_str(&out))
        );
        self.step(&format!("pleiades-host ctl {}", args.join(" ")), &command)?;
        std::fs::read_to_string(&out).map_err(KvmHostError::Scratch)
    }

    /// `vm`'s resident set inside, MiB.
    pub fn vm_rss_mib(&mut self, vm: &InnerVm) -> Result<u64, KvmHostError> {
        let status =
            self.step("reading the inner VM's status", &format!("cat /proc/{}/status", vm.pid))?.join("\n");
        Ok(kib_field(&status, "VmRSS:").unwrap_or(0) >> 10)
    }

    /// `Some(exit status)` once `vm` has ended (reaped by the console's shell), `None` while it
    /// runs.
    pub fn vm_exit_status(&mut self, vm: &InnerVm) -> Result<Option<i32>, KvmHostError> {
        let pid = vm.pid;
        let output = self.step(
            "checking an inner VM",
            &format!("if kill -0 {pid} 2>/dev/null; then echo RUNNING; else wait {pid}; echo EXIT=$?; fi"),
        )?;
        Ok(output.iter().find_map(|l| l.trim().strip_prefix("EXIT=").and_then(|s| s.parse().ok())))
    }

    /// Ends `vm`: `ctl shutdown`, then SIGKILL if it still runs after `grace`. Returns its exit
    /// status and whether it had to be killed.
    pub fn stop_vm(&mut self, vm: &InnerVm, grace: Duration) -> Result<(i32, bool), KvmHostError> {
        // A VM that already ended has no socket; its status is what counts.
        let _ = self.guest.run_status(
            &format!(
                "{} ctl {} shutdown",
                shell_quote(&path_str(&self.parts.host)),
                shell_quote(&vm.control)
            ),
            STEP_TIMEOUT,
        )?;
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Some(status) = self.vm_exit_status(vm)? {
                return Ok((status, false));
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        self.step("killing an inner VM", &format!("kill -KILL {}", vm.pid))?;
        let status = self.vm_exit_status(vm)?.unwrap_or(-1);
        Ok((status, true))
    }

    fn vm_files(&self, name: &str) -> (PathBuf, PathBuf) {
        let serial = self.scratch.path().join(format!("{name}.serial"));
        let log = self.scratch.path().join(format!("{name}.log"));
        let _ = std::fs::remove_file(&serial);
        let _ = std::fs::remove_file(&log);
        (serial, log)
    }

    fn inner_error(&self, name: &str, serial: &Path, log: &Path, what: &str) -> KvmHostError {
        let tail = |p: &Path| {
            let lines = read_lines(p);
            lines[lines.len().saturating_sub(30)..].join("\n")
        };
        KvmHostError::Inner {
            name: name.to_owned(),
            what: what.to_owned(),
            serial: serial.display().to_string(),
            serial_tail: tail(serial),
            log_tail: tail(log),
        }
    }
}

/// A file's lines (none when it does not exist).
fn read_lines(path: &Path) -> Vec<String> {
    std::fs::read(path)
        .map(|bytes| {
            String::from_utf8_lossy(&bytes).lines().map(|l| l.trim_end_matches('\r').to_owned()).collect()
        })
        .unwrap_or_default()
}

/// A file's lines that end with a newline: a line still being written is not one yet.
fn complete_lines(path: &Path) -> Vec<String> {
    let bytes = std::fs::read(path).unwrap_or_default();
    let end = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    String::from_utf8_lossy(&bytes[..end]).lines().map(|l| l.trim_end_matches('\r').to_owned()).collect()
}

fn path_str(path: &Path) -> String {
    path.display().to_string()
}

/// `text` as one word for a POSIX shell.
pub fn shell_quote(text: &str) -> String {
    if !text.is_empty() && text.chars().all(|c| c.is_ascii_alphanumeric() || "/._-=,:+@%".contains(c)) {
        text.to_owned()
    } else {
        format!("'{}'", text.replace('\'', r"'\''"))
    }
}

/// A `Name:   123 kB` field of /proc/meminfo or /proc/PID/status, in KiB.
fn kib_field(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|l| l.trim().strip_prefix(name)?.split_whitespace().next()?.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_words_are_quoted_only_when_needed() {
        assert_eq!(shell_quote("/work/target/debug/pleiades-host"), "/work/target/debug/pleiades-host");
        assert_eq!(shell_quote("console=tty1 console=ttyS0"), "'console=tty1 console=ttyS0'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
    }

    #[test]
    fn a_line_still_being_written_is_not_complete() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("serial");
        assert!(complete_lines(&file).is_empty());
        std::fs::write(&file, "one\r\nPLEIADES-READY {\"ker").unwrap();
        assert_eq!(complete_lines(&file), ["one"]);
        std::fs::write(&file, "one\r\nPLEIADES-READY {}\n").unwrap();
        assert_eq!(complete_lines(&file), ["one", "PLEIADES-READY {}"]);
    }

    #[test]
    fn kib_fields_are_read() {
        let meminfo =
            "MemTotal:        2981888 kB\nMemFree:         2800000 kB\nMemAvailable:    2700000 kB\n";
        assert_eq!(kib_field(meminfo, "MemTotal:"), Some(2_981_888));
        assert_eq!(kib_field(meminfo, "MemAvailable:"), Some(2_700_000));
        assert_eq!(kib_field("VmRSS:\t  153296 kB", "VmRSS:"), Some(153_296));
        assert_eq!(kib_field(meminfo, "VmRSS:"), None);
    }
}
