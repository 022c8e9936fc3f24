//! `--vmm qemu`: QEMU runs the vCPUs, Pleiades' devices are attached over vhost-user.
//!
//! Each device runs as its own `pleiades-host device <kind> --socket …` process (the same
//! backends that serve Pleiades' VMM); QEMU connects to them with `-device vhost-user-*-pci`.
//! Guest RAM is a shared memfd so the backends can map it. The control socket's commands go to
//! QEMU's QMP: `status` → `query-status`, `shutdown` → `system_powerdown` (ACPI power button,
//! then a hard stop after a grace period), `reboot` → `system_reset`; `type`, `key` and
//! `pointer` go to the keyboard's and tablet's backends over their events sockets.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use super::agent::{Agent, GUEST_CID};
use super::device_process::{self, DeviceProcess};
use super::device_thread;
use super::disk::{self, Disk, qemu_opt};
use super::net::NetRequest;
use super::qemu_display::{self, QemuDisplay};
pub use super::qmp::Qmp;
use super::{DeviceKind, DeviceRequest, Serving};
use pleiades_control::{CommandError, Controller, InputDevice};
use pleiades_protocol::wire::PowerAction;
use pleiades_virtio::gpu::GpuHandle;
use pleiades_virtio::input::{InputEvent, events_socket};
use pleiades_virtio::snd::SoundHandle;
use pleiades_vmm::SerialOut;
use pleiades_vmm::accel::{Accel, AccelChoice};
use pleiades_vmm::config::BootSpec;

/// How long a clean power-off may take before QEMU is stopped hard.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// The QEMU binary (`PLEIADES_QEMU` overrides).
pub fn qemu_binary() -> PathBuf {
    std::env::var_os("PLEIADES_QEMU").map_or_else(|| "qemu-system-x86_64".into(), PathBuf::from)
}

/// QEMU's `-accel` option for `accel` with `cpus` vCPUs.
///
/// TCG runs each vCPU on a thread of its own, except where the QEMU binary has
/// [QEMU bug 3040](https://gitlab.com/qemu-project/qemu/-/issues/3040): before 10.0.4 a vCPU
/// that changes the memory map (a PCI BAR programmed at boot) swaps in another vCPU's new
/// dispatch table at once but flushes that vCPU's TLB later, and an MMIO access in between
/// aborts QEMU (`iotlb_to_section: Assertion 'section_index < d->map.sections_nb' failed`).
/// Seen in this project's CI (bookworm-backports' 10.0.2, 2 vCPUs, a desktop booting while two
/// others ran). With one thread for all vCPUs the flush happens before the other vCPU runs again;
/// the test image boots as fast either way (4.3 s to READY with 2 vCPUs, both ways, here).
pub fn accel_option(accel: Accel, cpus: u32) -> String {
    match accel {
        Accel::Kvm => "kvm".to_owned(),
        Accel::Tcg => tcg_option(cpus, qemu_version().as_ref()),
    }
}

/// [`accel_option`] for TCG, with the QEMU version (`None`: unknown) spelled out.
fn tcg_option(cpus: u32, version: Option<&QemuVersion>) -> String {
    let multi_threaded_is_safe = version.is_some_and(|v| *v >= MTTCG_DISPATCH_FIX);
    if cpus > 1 && !multi_threaded_is_safe { "tcg,thread=single".to_owned() } else { "tcg".to_owned() }
}

/// The first QEMU release with the fix for bug 3040 (commit 2865bf1c, in stable 10.0.4; 10.1.0
/// has it too).
const MTTCG_DISPATCH_FIX: QemuVersion = QemuVersion(10, 0, 4);

/// A QEMU release: major, minor, micro.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct QemuVersion(pub u32, pub u32, pub u32);

impl QemuVersion {
    /// Reads `QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2)` (`--version`'s first line).
    pub fn parse(version_output: &str) -> Option<Self> {
        let rest = version_output.lines().next()?.split("version ").nth(1)?;
        let number = rest.split(|c: char| !(c.is_ascii_digit() || c == '.')).next()?;
        let mut parts = number.split('.').map(|p| p.parse::<u32>().ok());
        Some(Self(parts.next()??, parts.next()??, parts.next().flatten().unwrap_or(0)))
    }
}

/// The version of [`qemu_binary`], asked once per process; `None` when it cannot be run or read.
pub fn qemu_version() -> Option<QemuVersion> {
    static VERSION: std::sync::OnceLock<Option<QemuVersion>> = std::sync::OnceLock::new();
    *VERSION.get_or_init(|| {
        let output = Command::new(qemu_binary()).arg("--version").stdin(Stdio::null()).output().ok()?;
        QemuVersion::parse(&String::from_utf8_lossy(&output.stdout))
    })
}

/// The QEMU device name for a Pleiades vhost-user backend.
fn vhost_user_device(kind: DeviceKind) -> Result<&'static str> {
    Ok(match kind {
        DeviceKind::Rng => "vhost-user-rng-pci",
        DeviceKind::Keyboard | DeviceKind::Tablet | DeviceKind::Mouse => "vhost-user-input-pci",
        DeviceKind::Gpu => "vhost-user-gpu-pci",
        DeviceKind::Sound => "vhost-user-snd-pci",
        DeviceKind::Vsock => "vhost-user-vsock-pci",
        DeviceKind::Console => bail!(
            "the console cannot be attached to QEMU over vhost-user (QEMU has no vhost-user console); use --vmm pleiades"
        ),
    })
}

/// Builds QEMU's command line.
fn qemu_command(
    spec: &BootSpec,
    accel: &AccelChoice,
    serial: &SerialOut,
    devices: &[QemuDevice],
    disks: &[Disk],
    net: Option<&NetRequest>,
    qmp: &Path,
) -> Command {
    // QEMU dies with this process, even when it is killed (util-linux's setpriv sets the
    // parent-death signal and execs QEMU, so the pid is QEMU's). In the desktop's network
    // namespace, nsenter enters it first (and execs too: the pid stays QEMU's). Where the
    // namespace has a `resolv.conf` of its own (`/etc/netns/NAME/`: the host's resolver is on
    // its loopback), `ip netns exec` enters it instead, which also mounts that file over
    // /etc/resolv.conf for QEMU's DNS forwarder (in a mount namespace of its own; it needs `/`
    // to be a mount point, as it is on a host).
    let mut cmd = match net.and_then(|n| n.netns.as_deref()) {
        Some(netns) if Path::new("/etc/netns").join(netns).join("resolv.conf").exists() => {
            let mut cmd = Command::new("ip");
            cmd.args(["netns", "exec", netns, "setpriv"]);
            cmd
        }
        Some(netns) => {
            let mut cmd = Command::new("nsenter");
            cmd.arg(format!("--net=/run/netns/{netns}")).arg("setpriv");
            cmd
        }
        None => Command::new("setpriv"),
    };
    cmd.args(["--pdeathsig", "KILL", "--"]).arg(qemu_binary());
    // A GPU needs a UI for host-initiated display changes (see `qemu_display`).
    let display = if devices.iter().any(|d| d.qemu_device == "vhost-user-gpu-pci") {
        qemu_display::QEMU_DISPLAY
    } else {
        "none"
    };
    // QEMU's own seccomp filter, on top of the jail's: no obsolete calls, no privilege
    // changes, no new processes, no scheduling or resource changes.
    cmd.args(["-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"]);
    cmd.args(["-nodefaults", "-no-user-config", "-display", display, "-vga", "none", "-monitor", "none"])
        .args(["-machine", "q35,memory-backend=mem", "-accel", &accel_option(accel.accel, spec.cpus.into())])
        .args(["-object", &format!("memory-backend-memfd,id=mem,size={}M,share=on", spec.memory_mib)])
        .args(["-cpu", if accel.accel == Accel::Kvm { "host" } else { "max" }])
        .args(["-smp", &spec.cpus.to_string(), "-m", &format!("{}M", spec.memory_mib)])
        .arg("-kernel")
        .arg(&spec.kernel);
    if let Some(initrd) = &spec.initrd {
        cmd.arg("-initrd").arg(initrd);
    }
    if !spec.cmdline.is_empty() {
        cmd.args(["-append", &spec.cmdline]);
    }
    match serial {
        SerialOut::Stdio => cmd.args(["-serial", "stdio"]),
        // Appended to, as Pleiades' VMM does (`file:` would truncate it at every boot of a
        // desktop, losing the log of the one before).
        SerialOut::File(path) => cmd
            .arg("-chardev")
            .arg(format!("file,id=serial0,path={},append=on", qemu_opt(path)))
            .args(["-serial", "chardev:serial0"]),
        SerialOut::Null => cmd.args(["-serial", "null"]),
    };
    for (i, device) in devices.iter().enumerate() {
        cmd.arg("-chardev").arg(format!("socket,id=vhu{i},path={}", qemu_opt(&device.socket)));
        cmd.args(["-device", &format!("{},chardev=vhu{i}{}", device.qemu_device, device.options)]);
    }
    for (i, disk) in disks.iter().enumerate() {
        cmd.args(disk.qemu_args(i, spec.cpus));
    }
    if let Some(net) = net {
        cmd.args(net.qemu_args());
    }
    cmd.arg("-qmp").arg(format!("unix:{},server=on,wait=off", qemu_opt(qmp)));
    cmd
}

/// QEMU's id for the GPU device.
const GPU_ID: &str = "gpu0";

/// A vhost-user device as QEMU sees it.
#[derive(Debug)]
struct QemuDevice {
    socket: PathBuf,
    qemu_device: &'static str,
    /// `,key=value` options after the chardev.
    options: String,
}

/// A running QEMU VM.
#[derive(Debug)]
pub struct QemuVm {
    qemu: Arc<Mutex<Child>>,
    qmp: Arc<Mutex<Qmp>>,
    device_processes: Vec<DeviceProcess>,
    gpu: Option<GpuHandle>,
    sound: Option<SoundHandle>,
    agent: Option<Agent>,
    display: Option<Arc<Mutex<QemuDisplay>>>,
    status: Arc<StatusInfo>,
    _scratch: tempfile::TempDir,
}

#[derive(Debug)]
struct StatusInfo {
    started: Instant,
    accel: AccelChoice,
    spec: BootSpec,
    devices: Vec<Value>,
}

impl QemuVm {
    /// Starts the device processes and QEMU.
    pub fn start(
        spec: &BootSpec,
        devices: &[DeviceRequest],
        disks: &[Disk],
        net: Option<&NetRequest>,
        serial: &SerialOut,
        accel: AccelChoice,
    ) -> Result<Self> {
        let scratch = tempfile::Builder::new().prefix("pleiades-vm-").tempdir()?;
        let mut processes = Vec::new();
        let mut qemu_devices = Vec::new();
        let mut device_info = Vec::new();
        let mut gpu = None;
        let mut sound = None;
        let mut agent = None;
        for (i, device) in devices.iter().enumerate() {
            if device.serving == Some(Serving::InProcess) {
                bail!(
                    "--vmm qemu serves devices only over vhost-user; drop `,backend=in-process` from --device {}",
                    device.kind
                );
            }
            let qemu_device = vhost_user_device(device.kind)?;
            let socket = scratch.path().join(format!("{}-{i}.sock", device.kind));
            let mut options = String::new();
            if device.kind == DeviceKind::Gpu {
                if gpu.is_some() {
                    bail!("one --device gpu per VM (use heads=N for several monitors)");
                }
                let handle = device_thread::serve_gpu(device, &socket)?;
                let heads = handle.scanouts();
                // The GPU offers neither EVENT_IDX nor RING_RESET, and QEMU's vhost-user-gpu does not filter the
                // guest's ring features by the backend's: turn it off on QEMU's side.
                options = format!(",id={GPU_ID},max_outputs={heads},event_idx=off,queue_reset=off");
                device_info.push(json!({"kind": "gpu", "backend": "vhost-user", "heads": heads, "pid": std::process::id()}));
                gpu = Some(handle);
            } else if device.kind == DeviceKind::Sound {
                if sound.is_some() {
                    bail!("one --device sound per VM");
                }
                sound = Some(device_thread::serve_sound(&socket)?);
                device_info
                    .push(json!({"kind": "sound", "backend": "vhost-user", "pid": std::process::id()}));
            } else if device.kind == DeviceKind::Vsock {
                if agent.is_some() {
                    bail!("one --device vsock per VM");
                }
                agent = Some(Agent::start(device_thread::serve_vsock(&socket)?)?);
                device_info.push(json!({"kind": "vsock", "backend": "vhost-user", "guest_cid": GUEST_CID, "pid": std::process::id()}));
            } else {
                let process = device_process::start(device.kind, &socket)?;
                device_info.push(
                    json!({"kind": device.kind.name(), "backend": "vhost-user", "pid": process.child.id()}),
                );
                processes.push(process);
            }
            qemu_devices.push(QemuDevice { socket, qemu_device, options });
        }
        for disk in disks {
            device_info.push(json!({"kind": "disk", "backend": "qemu", "path": disk.path, "format": disk.format.name(), "read_only": disk.read_only}));
        }
        if let Some(net) = net {
            device_info.push(json!({"kind": "net", "backend": "qemu-user", "netns": net.netns, "mac": net.mac.map(super::net::format_mac)}));
        }
        let qmp_path = scratch.path().join("qmp.sock");
        let mut cmd = qemu_command(spec, &accel, serial, &qemu_devices, disks, net, &qmp_path);
        cmd.stdin(if matches!(serial, SerialOut::Stdio) { Stdio::inherit() } else { Stdio::null() });
        tracing::debug!("starting {cmd:?}");
        let mut child = cmd.spawn().with_context(|| {
            let ip = if net.is_some_and(|n| n.netns.is_some()) { " and iproute2" } else { "" };
            format!("cannot start {}: install QEMU{ip} (`./dev deps`)", qemu_binary().display())
        })?;
        let mut qmp = match Qmp::connect(&qmp_path, Duration::from_secs(30)) {
            Ok(q) => q,
            Err(e) => {
                let _ = child.kill();
                let status = child.wait().ok();
                return Err(e.context(format!("QEMU did not start (exit status {status:?})")));
            }
        };
        let display = match gpu {
            Some(_) => match QemuDisplay::connect(&mut qmp) {
                Ok(d) => Some(Arc::new(Mutex::new(d))),
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    bail!("{e}");
                }
            },
            None => None,
        };
        Ok(Self {
            qemu: Arc::new(Mutex::new(child)),
            qmp: Arc::new(Mutex::new(qmp)),
            device_processes: processes,
            gpu,
            sound,
            agent,
            display,
            status: Arc::new(StatusInfo {
                started: Instant::now(),
                accel,
                spec: spec.clone(),
                devices: device_info,
            }),
            _scratch: scratch,
        })
    }

    /// The guest agent's link, with `--device vsock`.
    pub fn agent(&self) -> Option<&Agent> {
        self.agent.as_ref()
    }

    /// The controller for the control socket.
    pub fn controller(&self) -> Arc<dyn Controller> {
        Arc::new(QemuController {
            qemu: self.qemu.clone(),
            qmp: self.qmp.clone(),
            status: self.status.clone(),
            inputs: self.device_processes.iter().filter_map(|p| Some((p.kind, p.events.clone()?))).collect(),
            gpu: self.gpu.clone(),
            sound: self.sound.clone(),
            agent: self.agent.clone(),
            display: self.display.clone(),
        })
    }

    /// Waits for QEMU to exit (guest power-off, or a shutdown request).
    pub fn wait(self) -> Result<ExitStatus> {
        loop {
            if let Some(status) = lock(&self.qemu).try_wait()? {
                drop(self.device_processes);
                return Ok(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Presses the ACPI power button; if the guest ignores it, QEMU is stopped after the grace
/// period.
fn power_button(qemu: &Arc<Mutex<Child>>, qmp: &Arc<Mutex<Qmp>>) -> Result<(), CommandError> {
    lock(qmp).execute("system_powerdown", json!({})).map_err(qmp_failed)?;
    let (qemu, qmp) = (qemu.clone(), qmp.clone());
    std::thread::spawn(move || {
        let deadline = Instant::now() + SHUTDOWN_GRACE;
        while Instant::now() < deadline {
            if !matches!(lock(&qemu).try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        tracing::warn!("the guest did not power off within {SHUTDOWN_GRACE:?}; stopping QEMU");
        let _ = lock(&qmp).execute("quit", json!({}));
    });
    Ok(())
}

struct QemuController {
    qemu: Arc<Mutex<Child>>,
    qmp: Arc<Mutex<Qmp>>,
    status: Arc<StatusInfo>,
    /// (kind, events socket) of each input device process.
    inputs: Vec<(DeviceKind, PathBuf)>,
    gpu: Option<GpuHandle>,
    sound: Option<SoundHandle>,
    agent: Option<Agent>,
    /// QEMU's display, which raises the guest's display-change event (see [`qemu_display`]).
    display: Option<Arc<Mutex<QemuDisplay>>>,
}

impl Controller for QemuController {
    fn status(&self) -> Value {
        let run_state = lock(&self.qmp)
            .execute("query-status", json!({}))
            .ok()
            .and_then(|v| v.get("status").and_then(Value::as_str).map(str::to_owned))
            .unwrap_or_else(|| "unknown".into());
        let s = &self.status;
        json!({
            "vmm": "qemu",
            "state": run_state,
            "accel": s.accel.accel.to_string(),
            "cpus": s.spec.cpus,
            "memory_mib": s.spec.memory_mib,
            "kernel": s.spec.kernel,
            "uptime_s": s.started.elapsed().as_secs_f64(),
            "qemu_pid": lock(&self.qemu).id(),
            "devices": s.devices,
            "gpu": self.gpu.as_ref().map(GpuHandle::status),
            "sound": self.sound.as_ref().map(SoundHandle::status),
            "agent": self.agent.as_ref().map(Agent::status),
            "disks": lock(&self.qmp).execute("query-blockstats", json!({})).ok().map(|v| disk::io_counters(&v)),
        })
    }

    fn sound(&self) -> Option<SoundHandle> {
        self.sound.clone()
    }

    fn shutdown(&self) -> Result<(), CommandError> {
        // Through the guest agent first, then the power button.
        let (qemu, qmp) = (self.qemu.clone(), self.qmp.clone());
        if self.agent.as_ref().is_some_and(|a| {
            a.power_then(PowerAction::Shutdown, move || {
                if let Err(e) = power_button(&qemu, &qmp) {
                    tracing::warn!("{e}");
                }
            })
        }) {
            return Ok(());
        }
        power_button(&self.qemu, &self.qmp)
    }

    fn reboot(&self) -> Result<(), CommandError> {
        let qmp = self.qmp.clone();
        let reset = move || lock(&qmp).execute("system_reset", json!({})).map(drop).map_err(qmp_failed);
        if self.agent.as_ref().is_some_and(|a| {
            let reset = reset.clone();
            a.power_then(PowerAction::Reboot, move || drop(reset()))
        }) {
            return Ok(());
        }
        reset()
    }

    fn display(&self) -> Option<GpuHandle> {
        self.gpu.clone()
    }

    fn client_arrived(&self) {
        if let Some(agent) = &self.agent {
            agent.client_arrived();
        }
    }

    fn client_left(&self) {
        if let Some(agent) = &self.agent {
            agent.client_left();
        }
    }

    fn clipboard(&self) -> Option<std::sync::Arc<pleiades_control::ClipboardPort>> {
        self.agent.clone().map(|agent| std::sync::Arc::new(agent) as _)
    }

    fn files(&self) -> Option<std::sync::Arc<pleiades_control::FilePort>> {
        self.agent.clone().map(|agent| std::sync::Arc::new(agent) as _)
    }

    fn usb(&self) -> Option<std::sync::Arc<pleiades_control::UsbPort>> {
        self.agent.clone().map(|agent| std::sync::Arc::new(agent) as _)
    }

    fn set_layout(&self, sizes: &[(u32, u32)]) -> Result<(), CommandError> {
        let gpu = self.gpu.as_ref().ok_or(CommandError::NoDevice(DeviceKind::Gpu))?;
        let invalid = |e: pleiades_virtio::gpu::LayoutError| CommandError::Invalid(e.to_string());
        GpuHandle::check_layout(gpu.scanouts(), sizes).map_err(invalid)?;
        // The GPU answers the guest from this layout; QEMU's display raises the event.
        gpu.set_layout(sizes).map_err(invalid)?;
        let display =
            self.display.as_ref().ok_or(CommandError::Failed("QEMU's display is not connected".into()))?;
        lock(display).set_layout(sizes).map_err(|e| CommandError::Failed(e.to_string()))
    }

    fn send_input(&self, device: InputDevice, events: &[InputEvent]) -> Result<(), CommandError> {
        let kind = device.kind();
        let (_, socket) = self.inputs.iter().find(|(k, _)| *k == kind).ok_or(CommandError::NoDevice(kind))?;
        events_socket::send(socket, events)
            .map_err(|e| CommandError::Failed(format!("the {kind} device process: {e}")))
    }
}

fn qmp_failed(error: anyhow::Error) -> CommandError {
    CommandError::Failed(format!("QEMU refused: {error:#}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_read_from_qemus_banner() {
        let debian =
            "QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)\nCopyright (c) 2003-2025";
        assert_eq!(QemuVersion::parse(debian), Some(QemuVersion(10, 0, 2)));
        assert_eq!(QemuVersion::parse("QEMU emulator version 9.2.90"), Some(QemuVersion(9, 2, 90)));
        assert_eq!(QemuVersion::parse("QEMU emulator version 11.1"), Some(QemuVersion(11, 1, 0)));
        assert_eq!(QemuVersion::parse("qemu-system-x86_64: command not found"), None);
        assert_eq!(QemuVersion::parse(""), None);
    }

    #[test]
    fn tcg_runs_vcpus_on_one_thread_only_where_qemu_has_the_dispatch_race() {
        let buggy = QemuVersion(10, 0, 2);
        let fixed = QemuVersion(10, 0, 4);
        assert_eq!(tcg_option(2, Some(&buggy)), "tcg,thread=single");
        assert_eq!(tcg_option(2, Some(&QemuVersion(10, 0, 3))), "tcg,thread=single");
        assert_eq!(tcg_option(2, None), "tcg,thread=single", "unknown: the safe way");
        assert_eq!(tcg_option(2, Some(&fixed)), "tcg");
        assert_eq!(tcg_option(8, Some(&QemuVersion(10, 1, 0))), "tcg");
        assert_eq!(tcg_option(1, Some(&buggy)), "tcg", "one vCPU has no other vCPU to race");
        assert_eq!(accel_option(Accel::Kvm, 4), "kvm");
    }
}
