//! `--vmm pleiades`: Pleiades' own VMM runs the vCPUs ([`pleiades_vmm`]).
//!
//! Devices run in-process by default (a worker thread each); `--device KIND,backend=vhost-user`
//! serves one over vhost-user, which the VMM attaches as a vhost-user frontend, as `--vmm qemu`
//! does for every device: in its own `pleiades-host device` process, or for the GPU and sound
//! (whose display and audio the session server here needs) from a thread of this process. The
//! control socket's commands go to the VM's [`VmHandle`]; `type`/`key`/`pointer` go to the
//! keyboard and tablet, in-process or over their backend's events socket.

use std::fs::OpenOptions;
use std::io::Write;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use super::agent::{Agent, GUEST_CID};
use super::device_process::{self, DeviceProcess};
use super::device_thread;
use super::disk::{Disk, StorageDaemon};
use super::{DeviceKind, DeviceRequest, SerialOut, Serving};
use pleiades_control::{CommandError, Controller, InputDevice};
use pleiades_protocol::wire::PowerAction;
use pleiades_virtio::console::Console;
use pleiades_virtio::gpu::{Gpu, GpuHandle};
use pleiades_virtio::input::{Input, InputEvent, InputSender, events_socket};
use pleiades_virtio::rng::Rng;
use pleiades_virtio::snd::{Sound, SoundHandle};
use pleiades_virtio::vsock::Vsock;
use pleiades_virtio::{DeviceType, VirtioDevice};
use pleiades_vmm::config::BootSpec;
use pleiades_vmm::{DeviceSpec, ExitReason, Vm, VmConfig, VmHandle};

/// How long a guest may take to power off after the power button before it is stopped, as
/// under `--vmm qemu`.
const SHUTDOWN_GRACE: std::time::Duration = super::qemu::SHUTDOWN_GRACE;

/// How the host reaches an input device.
enum InputRoute {
    InProcess(Mutex<InputSender>),
    Socket(std::path::PathBuf),
}

/// A VM on Pleiades' own VMM, with its device processes.
pub struct NativeVm {
    vm: Vm,
    controller: Arc<NativeController>,
    _device_processes: Vec<DeviceProcess>,
    _storage: Option<StorageDaemon>,
    _scratch: tempfile::TempDir,
}

impl std::fmt::Debug for NativeVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NativeVm").finish_non_exhaustive()
    }
}

/// Where an in-process console writes: the same place as the serial console.
fn console_output(serial: &SerialOut) -> Result<Box<dyn Write + Send>> {
    Ok(match serial {
        SerialOut::Stdio => Box::new(std::io::stdout()),
        SerialOut::Null => Box::new(std::io::sink()),
        SerialOut::File(path) => Box::new(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("cannot open {} for the console", path.display()))?,
        ),
    })
}

impl NativeVm {
    /// Creates the VM: devices (in-process or as backend processes), memory, vCPUs.
    pub fn new(
        spec: &BootSpec,
        devices: &[DeviceRequest],
        disks: &[Disk],
        serial: &SerialOut,
    ) -> Result<Self> {
        let scratch = tempfile::Builder::new().prefix("pleiades-vm-").tempdir()?;
        let mut specs = Vec::new();
        let mut processes = Vec::new();
        let mut inputs = Vec::new();
        let mut gpu = None;
        let mut sound = None;
        let mut agent = None;
        // The GPU's index among the devices when a vhost-user backend serves it: the VMM then
        // signals its layout changes (the backend cannot interrupt the guest).
        let mut vhost_user_gpu = None;
        for (i, request) in devices.iter().enumerate() {
            match request.serving.unwrap_or(Serving::InProcess) {
                Serving::VhostUser => {
                    let socket = scratch.path().join(format!("{}-{i}.sock", request.kind));
                    match request.kind {
                        // Their host sides (display sink, played audio) serve this process's
                        // session server: a thread here, as under --vmm qemu.
                        DeviceKind::Gpu => {
                            if gpu.is_some() {
                                bail!("one --device gpu per VM (use heads=N for several monitors)");
                            }
                            gpu = Some(device_thread::serve_gpu(request, &socket)?);
                            vhost_user_gpu = Some(specs.len());
                        }
                        DeviceKind::Sound => {
                            if sound.is_some() {
                                bail!("one --device sound per VM");
                            }
                            sound = Some(device_thread::serve_sound(&socket)?);
                        }
                        DeviceKind::Vsock => {
                            if agent.is_some() {
                                bail!("one --device vsock per VM");
                            }
                            agent = Some(Agent::start(device_thread::serve_vsock(&socket)?)?);
                        }
                        kind => {
                            let process = device_process::start(kind, &socket)?;
                            if let Some(events) = &process.events {
                                inputs.push((kind, InputRoute::Socket(events.clone())));
                            }
                            processes.push(process);
                        }
                    }
                    specs.push(DeviceSpec::VhostUser { kind: request.kind.device_type(), socket });
                }
                Serving::InProcess => {
                    let device: Box<dyn VirtioDevice> = match request.kind {
                        DeviceKind::Rng => Box::new(Rng::new()?),
                        DeviceKind::Console => Box::new(Console::new(console_output(serial)?, None)),
                        DeviceKind::Keyboard | DeviceKind::Tablet | DeviceKind::Mouse => {
                            let input = match request.kind {
                                DeviceKind::Keyboard => Input::keyboard()?,
                                DeviceKind::Tablet => Input::tablet()?,
                                _ => Input::mouse()?,
                            };
                            inputs.push((request.kind, InputRoute::InProcess(Mutex::new(input.sender()))));
                            Box::new(input)
                        }
                        DeviceKind::Gpu => {
                            if gpu.is_some() {
                                bail!("one --device gpu per VM (use heads=N for several monitors)");
                            }
                            let device = Gpu::new(&request.gpu_config())?;
                            gpu = Some(device.handle());
                            Box::new(device)
                        }
                        DeviceKind::Sound => {
                            if sound.is_some() {
                                bail!("one --device sound per VM");
                            }
                            let device = Sound::new()?;
                            sound = Some(device.handle());
                            Box::new(device)
                        }
                        DeviceKind::Vsock => {
                            if agent.is_some() {
                                bail!("one --device vsock per VM");
                            }
                            let (device, handle) = Vsock::new(GUEST_CID, Default::default())?;
                            agent = Some(Agent::start(handle)?);
                            Box::new(device)
                        }
                    };
                    specs.push(DeviceSpec::Virtio(device));
                }
            }
        }
        // The disks: QEMU's block layer in a qemu-storage-daemon, over vhost-user-blk.
        let storage = if disks.is_empty() {
            None
        } else {
            let daemon = StorageDaemon::start(disks, scratch.path(), spec.cpus)?;
            for socket in &daemon.sockets {
                specs.push(DeviceSpec::VhostUser { kind: DeviceType::Block, socket: socket.clone() });
            }
            Some(daemon)
        };
        let mut config = VmConfig::new(&spec.kernel);
        config.initrd = spec.initrd.clone();
        config.cmdline = spec.cmdline.clone();
        config.memory_mib = spec.memory_mib;
        config.cpus = spec.cpus;
        config.serial = serial.clone();
        config.devices = specs;
        let vm = Vm::new(config)?;
        let controller =
            Arc::new(NativeController { handle: vm.handle(), inputs, gpu, sound, agent, vhost_user_gpu });
        Ok(Self { vm, controller, _device_processes: processes, _storage: storage, _scratch: scratch })
    }

    /// The controller for the control socket and signals.
    pub fn controller(&self) -> Arc<dyn Controller> {
        self.controller.clone()
    }

    /// The guest agent's link, with `--device vsock`.
    pub fn agent(&self) -> Option<&Agent> {
        self.controller.agent.as_ref()
    }

    /// Runs the guest until it powers off or is shut down.
    pub fn run(mut self) -> Result<ExitReason> {
        Ok(self.vm.run()?)
    }
}

struct NativeController {
    handle: VmHandle,
    /// The GPU's device index when a vhost-user backend serves it.
    vhost_user_gpu: Option<usize>,
    inputs: Vec<(DeviceKind, InputRoute)>,
    gpu: Option<GpuHandle>,
    sound: Option<SoundHandle>,
    agent: Option<Agent>,
}

impl Controller for NativeController {
    fn status(&self) -> Value {
        let mut status = self.handle.status();
        if let Some(gpu) = &self.gpu {
            status["gpu"] = gpu.status();
        }
        if let Some(sound) = &self.sound {
            status["sound"] = sound.status();
        }
        if let Some(agent) = &self.agent {
            status["agent"] = serde_json::to_value(agent.status()).unwrap_or_default();
        }
        status
    }

    fn sound(&self) -> Option<SoundHandle> {
        self.sound.clone()
    }

    fn shutdown(&self) -> Result<(), CommandError> {
        // Through the guest agent first; then the ACPI power button; the vCPUs are stopped if
        // the guest ignores it (or has no ACPI).
        let handle = self.handle.clone();
        let acpi = move || handle.shutdown(SHUTDOWN_GRACE);
        if !self.agent.as_ref().is_some_and(|a| a.power_then(PowerAction::Shutdown, acpi.clone())) {
            acpi();
        }
        Ok(())
    }

    fn reboot(&self) -> Result<(), CommandError> {
        let handle = self.handle.clone();
        let reset = move || handle.reboot();
        if !self.agent.as_ref().is_some_and(|a| a.power_then(PowerAction::Reboot, reset.clone())) {
            reset();
        }
        Ok(())
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
        gpu.set_layout(sizes).map_err(|e| CommandError::Invalid(e.to_string()))?;
        if let Some(index) = self.vhost_user_gpu {
            self.handle.signal_config_change(index);
        }
        Ok(())
    }

    fn send_input(&self, device: InputDevice, events: &[InputEvent]) -> Result<(), CommandError> {
        let kind = device.kind();
        let (_, route) = self.inputs.iter().find(|(k, _)| *k == kind).ok_or(CommandError::NoDevice(kind))?;
        match route {
            InputRoute::InProcess(sender) => {
                sender.lock().unwrap_or_else(|p| p.into_inner()).send_report(events);
                Ok(())
            }
            InputRoute::Socket(path) => events_socket::send(path, events)
                .map_err(|e| CommandError::Failed(format!("the {kind} device process: {e}"))),
        }
    }
}
