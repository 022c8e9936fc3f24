//! Pleiades' own VMM: one KVM virtual machine per process.
//!
//! ```text
//! Vm::new(VmConfig) ─ validates ─▶ Vm::run() ─┬─ boot: memory, KVM VM, kernel, buses, devices,
//!                                             │        vCPU threads
//!                                             ├─ wait on the ExitLatch (power-off port, reset
//!                                             │   ports, triple fault, VmHandle, vCPU errors)
//!                                             ├─ stop vCPUs, take the virtio devices back
//!                                             └─ Reboot → boot again; else return ExitReason
//! ```
//!
//! Modules, one concern each: [`memory`] (RAM and the physical map), [`boot`] (kernel, initrd,
//! zero page / PVH start info, MP table, page tables), [`cpu`] (CPUID, registers, vCPU
//! threads), [`bus`] (port/MMIO dispatch), [`legacy`] (serial, CMOS RTC, power, i8042), [`pci`] (config
//! mechanism #1, config space, MSI-X), [`virtio_pci`] (the modern virtio transport),
//! [`interrupts`] (GSI routing, irqfd, ioeventfd), [`exit`] (why a boot ended) and [`sys`] (the
//! only `unsafe`). Beside the machine: [`config`] (a boot request validated once, for this VMM
//! and for QEMU alike) and [`accel`] (whether KVM is hardware-backed here). See docs/vmm.md.

pub mod accel;
pub mod acpi;
pub mod boot;
pub mod bus;
pub mod config;
pub mod cpu;
pub mod exit;
pub mod interrupts;
pub mod legacy;
pub mod memory;
pub mod pci;
mod sys;
pub mod vhost_user;
pub mod virtio_pci;

use std::fs::File;
use std::io::Read;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY, kvm_pit_config};
use kvm_ioctls::{Kvm, VmFd};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

pub use exit::ExitReason;
use exit::{ExitLatch, StopRequest};
pub use legacy::SerialOut;
use legacy::{I8042, PmControl, SerialPort};
use memory::{GuestMemory, MAX_MEMORY_MIB, MIN_MEMORY_MIB, PCI_MMIO_END, PCI_MMIO_START};
use pleiades_virtio::{DeviceType, VirtioDevice};
use vhost_user::VhostUserFrontend;
use virtio_pci::{QueueServer, VirtioPciDevice};

/// A device to attach.
pub enum DeviceSpec {
    /// A device served in-process by a worker thread of the VMM.
    Virtio(Box<dyn VirtioDevice>),
    /// A device served by a vhost-user backend listening on `socket` (connected by `Vm::new`,
    /// for the VM's lifetime).
    VhostUser { kind: DeviceType, socket: PathBuf },
}

impl std::fmt::Debug for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Virtio(d) => write!(f, "Virtio({})", d.device_type().name()),
            Self::VhostUser { kind, socket } => write!(f, "VhostUser({}, {})", kind.name(), socket.display()),
        }
    }
}

/// What happens when the guest resets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RebootPolicy {
    /// Boot the guest again (a PC's behaviour).
    #[default]
    Restart,
    /// Return [`ExitReason::Reboot`] from [`Vm::run`] (tests, supervisors that restart).
    Exit,
}

/// Everything needed to create a VM.
#[derive(Debug)]
pub struct VmConfig {
    /// A bzImage (Linux) or an ELF test guest.
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub memory_mib: u64,
    pub cpus: u8,
    pub serial: SerialOut,
    pub devices: Vec<DeviceSpec>,
    pub on_reboot: RebootPolicy,
}

impl VmConfig {
    /// A config with defaults: 512 MiB, 1 vCPU, serial on stdio, no devices.
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        Self {
            kernel: kernel.into(),
            initrd: None,
            cmdline: "console=ttyS0 reboot=k panic=-1".into(),
            memory_mib: 512,
            cpus: 1,
            serial: SerialOut::Stdio,
            devices: Vec::new(),
            on_reboot: RebootPolicy::Restart,
        }
    }
}

/// VMM errors. The messages say what to do.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error(
        "cannot open /dev/kvm ({0}); the Pleiades VMM needs KVM: load the kvm module and run with access to /dev/kvm (root here), or use --vmm qemu"
    )]
    Kvm(kvm_ioctls::Error),
    #[error("KVM refused to {what}: {source}")]
    KvmSetup { what: &'static str, source: kvm_ioctls::Error },
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Memory(#[from] memory::MemoryError),
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    #[error(transparent)]
    Pci(#[from] pci::PciError),
    #[error(transparent)]
    Device(#[from] virtio_pci::VirtioPciError),
    #[error(transparent)]
    Bus(#[from] bus::BusError),
    #[error(transparent)]
    VhostUser(#[from] vhost_user::VhostUserError),
    #[error("cannot set up the serial console: {0}")]
    Serial(std::io::Error),
    #[error("cannot set up the ACPI interrupt (SCI): {0}")]
    Sci(std::io::Error),
    #[error("cannot start a thread: {0}")]
    Thread(std::io::Error),
    #[error("the guest stopped with an error: {0}")]
    Guest(String),
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::KvmSetup { what, source }
}

/// Where the VM stands, shared with [`VmHandle`]s.
#[derive(Debug)]
struct Shared {
    cpus: u8,
    memory_mib: u64,
    control: Mutex<Control>,
    /// The running boot's ACPI power management block (the power button).
    power: Mutex<Option<Arc<Mutex<PmControl>>>>,
    devices: Mutex<Vec<Arc<Mutex<VirtioPciDevice>>>>,
    device_names: Vec<&'static str>,
}

#[derive(Debug, Default)]
struct Control {
    state: &'static str,
    started: Option<Instant>,
    boots: u64,
    latch: Option<Arc<ExitLatch>>,
    pending: Option<ExitReason>,
}

/// A handle on a VM for other threads (the control socket): status, shutdown, reboot.
#[derive(Debug, Clone)]
pub struct VmHandle {
    shared: Arc<Shared>,
}

impl VmHandle {
    /// State, vCPUs, memory, uptime and devices with their counters.
    pub fn status(&self) -> serde_json::Value {
        let (state, uptime, boots) = {
            let c = self.shared.control.lock().unwrap_or_else(|e| e.into_inner());
            (c.state, c.started.map(|s| s.elapsed().as_secs_f64()), c.boots)
        };
        let live = self.shared.devices.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let power = self.shared.power.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let listening =
            power.is_some_and(|pm| pm.lock().unwrap_or_else(|e| e.into_inner()).power_button_enabled());
        let devices: Vec<serde_json::Value> = if live.is_empty() {
            self.shared.device_names.iter().map(|n| serde_json::json!({ "type": n })).collect()
        } else {
            live.iter().map(|d| d.lock().unwrap_or_else(|e| e.into_inner()).status_json()).collect()
        };
        serde_json::json!({
            "vmm": "pleiades",
            "state": state,
            "cpus": self.shared.cpus,
            "memory_mib": self.shared.memory_mib,
            "uptime_s": uptime,
            "boots": boots,
            "acpi": { "power_button_enabled": listening },
            "devices": devices,
        })
    }

    /// Presses the ACPI power button. Returns whether the guest listens (an ACPI OS enabled
    /// the power button event); it then powers off by itself, as it sees fit.
    pub fn press_power_button(&self) -> bool {
        let power = self.shared.power.lock().unwrap_or_else(|e| e.into_inner()).clone();
        power.is_some_and(|pm| pm.lock().unwrap_or_else(|e| e.into_inner()).press_power_button())
    }

    /// Asks the guest to power off with the ACPI power button (pressed again every 5 s), and
    /// stops the VM if it has not within `grace` ([`Vm::run`] then returns [`ExitReason::Shutdown`]); at once if no ACPI
    /// OS listens to the button (a guest without ACPI, or one still booting).
    pub fn shutdown(&self, grace: Duration) {
        let latch = self.shared.control.lock().unwrap_or_else(|e| e.into_inner()).latch.clone();
        if !self.press_power_button() {
            self.power_off();
            return;
        }
        let Some(latch) = latch else { return };
        // Pressed again every few seconds meanwhile: a guest whose power-button daemon was not
        // listening yet (just rebooted) misses a press, as a PC's OS does.
        const PRESS_AGAIN: Duration = Duration::from_secs(5);
        let handle = self.clone();
        let spawned = std::thread::Builder::new().name("vmm-shutdown".into()).spawn(move || {
            let deadline = Instant::now() + grace;
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    tracing::warn!("vmm: the guest did not power off within {grace:?}; stopping it");
                    latch.exit(ExitReason::Shutdown);
                    return;
                }
                if latch.wait_timeout(left.min(PRESS_AGAIN)).is_some() {
                    return;
                }
                if left > PRESS_AGAIN {
                    handle.press_power_button();
                }
            }
        });
        if spawned.is_err() {
            self.power_off();
        }
    }

    /// Stops the VM at once: the vCPUs stop where they are ([`ExitReason::Shutdown`]).
    pub fn power_off(&self) {
        self.request(ExitReason::Shutdown);
    }

    /// Signals a configuration change of the `index`-th device (in [`VmConfig::devices`]
    /// order) to the guest; a device that does not exist (yet) is ignored.
    pub fn signal_config_change(&self, index: usize) {
        let devices = self.shared.devices.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(device) = devices.get(index) {
            device.lock().unwrap_or_else(|e| e.into_inner()).signal_config_change();
        }
    }

    /// Resets the guest (boots it again).
    pub fn reboot(&self) {
        self.request(ExitReason::Reboot);
    }

    fn request(&self, reason: ExitReason) {
        let mut c = self.shared.control.lock().unwrap_or_else(|e| e.into_inner());
        let posted = c.latch.as_ref().is_some_and(|latch| latch.exit(reason.clone()));
        if !posted {
            // Between boots, or while a boot is ending for another reason: the next boot sees
            // it before it starts.
            c.pending = Some(reason);
        }
    }
}

/// A virtual machine.
pub struct Vm {
    config: VmConfig,
    kvm: Kvm,
    devices: Vec<QueueServer>,
    serial_file: Option<File>,
    serial_input: Arc<Mutex<Option<Arc<Mutex<SerialPort>>>>>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm").field("config", &self.config).finish_non_exhaustive()
    }
}

/// The most vCPUs: APIC ids are 8 bits in the MP table and the IOAPIC takes the next id. The
/// one definition of this limit: the boot request ([`config`]) and the machine check it.
pub const MAX_CPUS: u8 = 254;
/// Where KVM puts its TSS and identity-map pages (below the BIOS, inside the MMIO hole's top).
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;
const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

impl Vm {
    /// Validates `config` and opens KVM. Nothing runs until [`Vm::run`].
    pub fn new(mut config: VmConfig) -> Result<Self, VmError> {
        let kvm = Kvm::new().map_err(VmError::Kvm)?;
        let max_cpus = kvm.get_max_vcpus().min(usize::from(MAX_CPUS));
        if config.cpus == 0 || usize::from(config.cpus) > max_cpus {
            return Err(VmError::Config(format!(
                "{} vCPUs requested; this host's KVM supports 1 to {max_cpus}",
                config.cpus
            )));
        }
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&config.memory_mib) {
            return Err(memory::MemoryError::Size(config.memory_mib).into());
        }
        File::open(&config.kernel)
            .map_err(|source| boot::BootError::OpenKernel { path: config.kernel.clone(), source })?;
        if let Some(initrd) = &config.initrd {
            let size = std::fs::metadata(initrd)
                .map_err(|source| boot::BootError::OpenInitrd { path: initrd.clone(), source })?
                .len();
            let limit = memory::low_ram_end(config.memory_mib << 20);
            if size >= limit {
                return Err(boot::BootError::InitrdTooLarge { size, limit }.into());
            }
        }
        let mut devices = Vec::new();
        for spec in std::mem::take(&mut config.devices) {
            match spec {
                DeviceSpec::Virtio(device) => devices.push(QueueServer::InProcess(device)),
                DeviceSpec::VhostUser { kind, socket } => {
                    devices.push(QueueServer::VhostUser(VhostUserFrontend::connect(kind, &socket)?));
                }
            }
        }
        let bars = (PCI_MMIO_END - PCI_MMIO_START) / virtio_pci::BAR_SIZE;
        if devices.len() as u64 > bars.min(pci::MAX_DEVICES as u64 - 1) {
            return Err(pci::PciError::BusFull.into());
        }
        let serial_file = match &config.serial {
            SerialOut::File(path) => Some(legacy::serial::open_append(path).map_err(VmError::Serial)?),
            _ => None,
        };
        let shared = Arc::new(Shared {
            cpus: config.cpus,
            memory_mib: config.memory_mib,
            control: Mutex::new(Control { state: "created", ..Default::default() }),
            devices: Mutex::new(Vec::new()),
            power: Mutex::new(None),
            device_names: devices.iter().map(|d| d.device_type().name()).collect(),
        });
        Ok(Self { config, kvm, devices, serial_file, serial_input: Default::default(), shared })
    }

    /// A handle for other threads.
    pub fn handle(&self) -> VmHandle {
        VmHandle { shared: self.shared.clone() }
    }

    /// Boots the guest and runs it until it powers off, is shut down, or fails. Resets boot
    /// it again unless [`VmConfig::on_reboot`] says [`RebootPolicy::Exit`].
    pub fn run(&mut self) -> Result<ExitReason, VmError> {
        self.start_serial_input();
        loop {
            let result = self.boot_once();
            let reason = {
                let mut c = self.shared.control.lock().unwrap_or_else(|e| e.into_inner());
                c.latch = None;
                c.state = "stopped";
                result?
            };
            match reason {
                ExitReason::Reboot if self.config.on_reboot == RebootPolicy::Restart => {
                    tracing::info!("vmm: guest reset; booting it again");
                }
                other => return Ok(other),
            }
        }
    }

    fn boot_once(&mut self) -> Result<ExitReason, VmError> {
        let latch = Arc::new(ExitLatch::new());
        {
            let mut c = self.shared.control.lock().unwrap_or_else(|e| e.into_inner());
            match c.pending.take() {
                Some(ExitReason::Reboot) | None => {}
                Some(other) => return Ok(other),
            }
            c.latch = Some(latch.clone());
        }
        let machine = Machine::build(self, latch.clone());
        let machine = match machine {
            Ok(machine) => machine,
            Err(e) => {
                return Err(e);
            }
        };
        {
            let mut c = self.shared.control.lock().unwrap_or_else(|e| e.into_inner());
            c.state = "running";
            c.started = Some(Instant::now());
            c.boots += 1;
        }
        let request = latch.wait();
        let devices = machine.stop();
        *self.serial_input.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.shared.devices.lock().unwrap_or_else(|e| e.into_inner()).clear();
        self.devices = devices;
        match request {
            StopRequest::Exit(reason) => Ok(reason),
            StopRequest::Error(e) => Err(VmError::Guest(e)),
        }
    }

    /// Stdin feeds the serial port when the console is on stdio (a terminal or a pipe, as QEMU's
    /// `-serial stdio`). Input waits while the UART's FIFO is full, as with flow control; it is
    /// dropped only while no machine runs (between a reset and the next boot).
    fn start_serial_input(&self) {
        if self.config.serial != SerialOut::Stdio {
            return;
        }
        let slot = self.serial_input.clone();
        let _ = std::thread::Builder::new().name("serial-input".into()).spawn(move || {
            let mut buf = [0u8; 64];
            let mut stdin = std::io::stdin();
            while let Ok(n) = stdin.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let mut pending = &buf[..n];
                while !pending.is_empty() {
                    let taken = match slot.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
                        Some(port) => port.lock().unwrap_or_else(|e| e.into_inner()).enqueue_input(pending),
                        None => pending.len(),
                    };
                    pending = &pending[taken..];
                    if !pending.is_empty() {
                        std::thread::sleep(std::time::Duration::from_millis(1));
                    }
                }
            }
        });
    }
}

/// One boot of the guest: the KVM VM and everything attached to it.
struct Machine {
    vcpus: Vec<JoinHandle<()>>,
    latch: Arc<ExitLatch>,
    pci_devices: Vec<Arc<Mutex<VirtioPciDevice>>>,
    // Dropped after the vCPUs have stopped; the memory after the VM.
    _vm: Arc<VmFd>,
    _mem: GuestMemory,
}

impl Machine {
    fn build(vm_state: &mut Vm, latch: Arc<ExitLatch>) -> Result<Self, VmError> {
        let config = &vm_state.config;
        let mem = memory::create_guest_memory(config.memory_mib)?;
        let vm = Arc::new(vm_state.kvm.create_vm().map_err(kvm_err("create a VM"))?);
        vm.set_tss_address(KVM_TSS_ADDRESS).map_err(kvm_err("set the TSS address"))?;
        vm.set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS)
            .map_err(kvm_err("set the identity map address"))?;
        vm.create_irq_chip().map_err(kvm_err("create the in-kernel irqchip"))?;
        vm.create_pit2(kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() })
            .map_err(kvm_err("create the PIT"))?;
        sys::register_guest_memory(&vm, &mem).map_err(kvm_err("register guest memory"))?;

        let entry = boot::load(
            &mem,
            boot::BootSource {
                kernel: &config.kernel,
                initrd: config.initrd.as_deref(),
                cmdline: &config.cmdline,
            },
            config.cpus,
        )?;

        let io_bus = Arc::new(bus::Bus::new());
        let mmio_bus = Arc::new(bus::Bus::new());

        // Legacy devices.
        let serial_irq = EventFd::new(EFD_NONBLOCK).map_err(VmError::Serial)?;
        vm.register_irqfd(&serial_irq, legacy::COM1_IRQ).map_err(kvm_err("register the serial irqfd"))?;
        let writer = legacy::serial::open_writer(&config.serial, vm_state.serial_file.as_ref())
            .map_err(VmError::Serial)?;
        let serial = Arc::new(Mutex::new(SerialPort::new(serial_irq, writer)));
        io_bus.insert(legacy::COM1_PORT, 8, serial.clone())?;
        *vm_state.serial_input.lock().unwrap_or_else(|e| e.into_inner()) = Some(serial);
        let sci = EventFd::new(EFD_NONBLOCK).map_err(VmError::Sci)?;
        vm.register_irqfd(&sci, acpi::SCI_IRQ).map_err(kvm_err("register the SCI irqfd"))?;
        let power = Arc::new(Mutex::new(PmControl::new(latch.clone(), Some(sci))));
        io_bus.insert(legacy::PM1A_EVT_PORT, 8, power.clone())?;
        *vm_state.shared.power.lock().unwrap_or_else(|e| e.into_inner()) = Some(power);
        io_bus.insert(legacy::I8042_PORT, 5, Arc::new(Mutex::new(I8042::new(latch.clone()))))?;
        io_bus.insert(legacy::cmos::CMOS_PORT, 2, Arc::new(Mutex::new(legacy::Cmos::default())))?;

        // PCI.
        let resources: Arc<dyn interrupts::VmResources> = Arc::new(interrupts::KvmResources::new(vm.clone()));
        let mut root = pci::PciRoot::new(mmio_bus.clone(), latch.clone());
        let mut pci_devices = Vec::new();
        for (i, device) in std::mem::take(&mut vm_state.devices).into_iter().enumerate() {
            let bar = PCI_MMIO_START + i as u64 * virtio_pci::BAR_SIZE;
            let dev =
                Arc::new(Mutex::new(VirtioPciDevice::new(device, mem.clone(), resources.clone(), bar)?));
            root.add(dev.clone(), dev.clone())?;
            pci_devices.push(dev);
        }
        io_bus.insert(pci::PCI_CONFIG_IO_PORT, pci::PCI_CONFIG_IO_LEN, Arc::new(Mutex::new(root)))?;
        *vm_state.shared.devices.lock().unwrap_or_else(|e| e.into_inner()) = pci_devices.clone();

        // vCPUs.
        let supported =
            vm_state.kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(kvm_err("report its CPUID"))?;
        let xsave = cpu::cpuid::Xsave::for_this_host();
        let ctx = cpu::vcpu::VcpuContext { io_bus, mmio_bus, latch: latch.clone(), mem: mem.clone() };
        let mut machine = Machine { vcpus: Vec::new(), latch, pci_devices, _vm: vm.clone(), _mem: mem };
        // Every vCPU exists and is set up before any runs: the boot CPU's INIT/SIPI to the
        // others must find them.
        let mut vcpus = Vec::new();
        for id in 0..config.cpus {
            let vcpu = vm.create_vcpu(u64::from(id)).map_err(kvm_err("create a vCPU"))?;
            let entries = cpu::cpuid::filter(supported.as_slice(), id, config.cpus, xsave);
            let cpuid = kvm_bindings::CpuId::from_entries(&entries)
                .map_err(|_| VmError::Config("too many CPUID entries".into()))?;
            vcpu.set_cpuid2(&cpuid).map_err(kvm_err("set the vCPU's CPUID"))?;
            cpu::regs::setup_common(&vcpu).map_err(kvm_err("set up vCPU MSRs, FPU and LAPIC"))?;
            if id == 0 {
                cpu::regs::setup_boot_cpu(&vcpu, entry).map_err(kvm_err("set the boot vCPU's registers"))?;
            } else {
                cpu::regs::setup_application_cpu(&vcpu).map_err(kvm_err("park an application vCPU"))?;
            }
            vcpus.push(vcpu);
        }
        for (id, vcpu) in vcpus.into_iter().enumerate() {
            let thread = cpu::vcpu::spawn(id as u8, vcpu, ctx.clone()).map_err(VmError::Thread)?;
            machine.vcpus.push(thread);
        }
        Ok(machine)
    }

    /// Stops the vCPUs and the device workers; returns the devices, reset, for the next boot.
    fn stop(mut self) -> Vec<QueueServer> {
        self.stop_vcpus();
        let mut devices = Vec::new();
        for dev in self.pci_devices.drain(..) {
            // Other holders (the buses, a status() in progress) only see a dead transport now.
            if let Some(device) = dev.lock().unwrap_or_else(|e| e.into_inner()).take_backend() {
                devices.push(device);
            }
        }
        devices
    }

    fn stop_vcpus(&mut self) {
        if !self.latch.stopping() {
            self.latch.post(StopRequest::Exit(ExitReason::Shutdown));
        }
        // A kick can land just before a thread enters KVM_RUN; kick until every thread is out.
        while self.vcpus.iter().any(|t| !t.is_finished()) {
            for thread in self.vcpus.iter().filter(|t| !t.is_finished()) {
                cpu::vcpu::kick(thread);
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        for thread in self.vcpus.drain(..) {
            let _ = thread.join();
        }
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        self.stop_vcpus();
    }
}
