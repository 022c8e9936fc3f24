//! The desktops a host daemon runs: one `pleiades-host run` process per desktop (the process
//! is the isolation boundary, as in the architecture), each with its own session server on a
//! port of the host's range, its control socket, serial log and process log under
//! `STATE_DIR/desktops/<id>/`.
//!
//! VM processes are started under util-linux's `setpriv --pdeathsig KILL` from one long-lived
//! thread (the parent-death signal belongs to the thread that forked): when the daemon dies,
//! its VMs go with it and the broker re-provisions them (they would otherwise run on unseen).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pleiades_protocol::clipboard::ClipboardPolicy;
use pleiades_protocol::hostapi::{DesktopNetwork, GuestReport, RunningDesktop, VmImage};
use pleiades_protocol::usb::UsbPolicy;

use pleiades_control::{self as control, Request};

use super::disks::DiskStore;
use super::jails::{DesktopJail, JailCleanup, JailSettings};
use super::network::{DesktopNet, HostNetwork, NetPolicy};

/// How long a VM process may take to open its control socket and session server.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a guest may take to power off before its process is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a status request to a VM may take during a heartbeat.
const STATUS_TIMEOUT: Duration = Duration::from_secs(2);

/// The UDP ports session servers may use, inclusive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl std::str::FromStr for PortRange {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not a port range like 47000-47099");
        let (a, b) = s.split_once('-').ok_or_else(bad)?;
        let (first, last) =
            (a.trim().parse::<u16>().map_err(|_| bad())?, b.trim().parse::<u16>().map_err(|_| bad())?);
        if first == 0 || last < first {
            return Err(bad());
        }
        Ok(Self { first, last })
    }
}

/// What every VM of this host is started with.
#[derive(Debug, Clone)]
pub struct VmSettings {
    /// This program (`pleiades-host`), run as `pleiades-host run …`.
    pub exe: PathBuf,
    /// `--vmm` for `run` (`pleiades` or `qemu`); `None`: `run` decides.
    pub vmm: Option<String>,
    /// `--device` arguments (a GPU is required: the session serves its display).
    pub devices: Vec<String>,
    pub listen_ip: IpAddr,
    pub ports: PortRange,
    /// Where clients reach this host.
    pub address: String,
    /// The broker's host id: tickets name it.
    pub host_id: String,
    /// The broker's ticket key (base64url).
    pub ticket_key: String,
    pub state_dir: PathBuf,
    /// The host's cores and memory (MiB): an image asking for more is refused.
    pub cores: i64,
    pub memory_mib: i64,
    /// How VM processes are jailed; `None`: not at all (`--jail off`, a daemon not run as root).
    pub jail: Option<JailSettings>,
    /// The directories images' kernels, initrds and disk templates must be in (canonical).
    pub image_dirs: Vec<PathBuf>,
    /// `run --encoder-cpu-budget` (percent of one core).
    pub encoder_cpu_budget: u32,
}

/// A desktop's VM process.
struct VmProcess {
    child: Child,
    port: u16,
    control: PathBuf,
    /// The desktop's network namespace and link, removed when the process is forgotten.
    _net: Option<DesktopNet>,
    /// The desktop's generation it serves (`run --ticket-generation`).
    generation: Option<u64>,
    /// The desktop's cgroup and jail root, removed when the process is forgotten.
    _jail: Option<JailCleanup>,
}

/// Spawns processes from one thread that lives as long as the daemon.
#[derive(Debug, Clone)]
pub struct Spawner {
    requests: std::sync::mpsc::Sender<(Command, std::sync::mpsc::Sender<std::io::Result<Child>>)>,
}

impl Spawner {
    pub fn start() -> std::io::Result<Self> {
        let (tx, rx) =
            std::sync::mpsc::channel::<(Command, std::sync::mpsc::Sender<std::io::Result<Child>>)>();
        std::thread::Builder::new().name("vm-spawner".into()).spawn(move || {
            for (mut command, reply) in rx {
                let _ = reply.send(command.spawn());
            }
        })?;
        Ok(Self { requests: tx })
    }

    fn spawn(&self, command: Command) -> std::io::Result<Child> {
        let (tx, rx) = std::sync::mpsc::channel();
        let gone = || std::io::Error::other("the spawner thread is gone");
        self.requests.send((command, tx)).map_err(|_| gone())?;
        rx.recv().map_err(|_| gone())?
    }
}

/// The running desktops.
pub struct Desktops {
    settings: VmSettings,
    disks: DiskStore,
    spawner: Spawner,
    running: Mutex<HashMap<String, VmProcess>>,
    /// Ports given to VM processes that are being started and are not in `running` yet: two
    /// desktops starting at once must not both take the lowest free port.
    claimed_ports: Mutex<std::collections::HashSet<u16>>,
    /// Commands for one desktop run one at a time, in the order they came.
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// The host's side of desktops' networks, set up for the first desktop that has one.
    network: Mutex<Option<HostNetwork>>,
}

impl std::fmt::Debug for Desktops {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Desktops").field("settings", &self.settings).finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Desktops {
    pub fn new(settings: VmSettings, spawner: Spawner) -> Self {
        let disks = DiskStore::new(&settings.state_dir);
        Self {
            settings,
            disks,
            spawner,
            running: Mutex::new(HashMap::new()),
            claimed_ports: Mutex::new(Default::default()),
            locks: Mutex::new(HashMap::new()),
            network: Mutex::new(None),
        }
    }

    /// The lock that orders one desktop's commands.
    pub fn desktop_lock(&self, desktop_id: &str) -> Arc<tokio::sync::Mutex<()>> {
        lock(&self.locks).entry(desktop_id.to_owned()).or_default().clone()
    }

    /// Starts the desktop's VM and waits until its session server listens; returns its port.
    /// A desktop that already runs is left alone (a repeated `start` is not an error). A start
    /// that fails leaves nothing behind: the process is ended and the desktop's directory
    /// removed (not its disk), and the error says why (the VM's last log lines), for the
    /// broker to show. A desktop's disk is kept from one start to the next; `fresh_disk`
    /// replaces it with an empty overlay on the image's template (a recycle). The process
    /// accepts only tickets for `generation` (the command's); one running for another
    /// generation is stopped first.
    pub async fn start(
        self: &Arc<Self>,
        desktop_id: &str,
        image: &VmImage,
        fresh_disk: bool,
        network: Option<&DesktopNetwork>,
        boot: Boot,
    ) -> Result<u16, String> {
        check_desktop_id(desktop_id)?;
        if let Some(vm) = lock(&self.running).get_mut(desktop_id)
            && matches!(vm.child.try_wait(), Ok(None))
            && vm.generation == boot.generation
        {
            return Ok(vm.port);
        }
        self.stop(desktop_id).await?;
        self.check_image(image)?;
        let dir = self.settings.state_dir.join("desktops").join(desktop_id);
        let disk = self.prepare_disk(desktop_id, image, fresh_disk).await?;
        let net = match network {
            Some(network) => Some(self.prepare_network(desktop_id, network).await?),
            None => None,
        };
        let started = self.spawn_and_wait(desktop_id, image, disk.as_deref(), net, &dir, boot).await;
        if started.is_err() {
            self.kill(desktop_id);
            if let Err(e) = std::fs::remove_dir_all(&dir)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(desktop = desktop_id, "cannot remove {}: {e}", dir.display());
            }
        }
        started
    }

    async fn spawn_and_wait(
        self: &Arc<Self>,
        desktop_id: &str,
        image: &VmImage,
        disk: Option<&Path>,
        net: Option<DesktopNet>,
        dir: &Path,
        boot: Boot,
    ) -> Result<u16, String> {
        let Boot { generation, lock_on_disconnect, clipboard, file_transfer, usb } = boot;
        std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let mut claim = self.claim_port()?;
        let port = claim.port;
        let control = dir.join("control.sock");
        let log_path = dir.join("vm.log");
        let log = std::fs::File::create(&log_path)
            .map_err(|e| format!("cannot create {}: {e}", log_path.display()))?;
        let log_err = log.try_clone().map_err(|e| e.to_string())?;
        let netns = net.as_ref().map(DesktopNet::netns);
        let mut command = Command::new("setpriv");
        command.args(["--pdeathsig", "KILL", "--"]).arg(&self.settings.exe);
        // The session socket handed to the VM process: open here until it has been spawned.
        let mut passed = None;
        let (cleanup, network) = match &self.settings.jail {
            Some(jail) => {
                let root = self.settings.state_dir.join("jails").join(desktop_id);
                let template = match disk {
                    Some(disk) => super::disks::backing_file(disk)?,
                    None => None,
                };
                let spec = DesktopJail {
                    settings: jail,
                    exe: &self.settings.exe,
                    desktop_id,
                    slot: u32::from(port - self.settings.ports.first),
                    image,
                    dir,
                    disk: disk.map(|d| (d, template)),
                    netns,
                    vmm_is_qemu: self.vmm_is_qemu(),
                    root: root.clone(),
                    tls: &self.settings.state_dir.join("tls"),
                }
                .prepare()?;
                // The jail process's own environment too (its waiter lives on with it).
                command.env_clear().envs(spec.env.iter().cloned()).env("PATH", crate::jail::PATH);
                let json = serde_json::to_string(&spec).map_err(|e| e.to_string())?;
                command.arg("jail").arg(format!("--spec={json}")).arg("--").arg(&self.settings.exe);
                let cleanup = JailCleanup { desktop_id: desktop_id.to_owned(), cgroup: spec.cgroup, root };
                (Some(cleanup), Network::Jailed { netns: netns.is_some() })
            }
            None => (None, Network::Host { netns }),
        };
        // The process serves on the socket bound here, on the host's network (jailed, it is in
        // the desktop's network namespace already): the port stays ours from the claim to the
        // VM's end, and no other start can take it in between.
        let socket = claim.socket.take().ok_or("the port's socket is gone")?;
        let socket = passed.insert(std::os::fd::OwnedFd::from(socket));
        crate::jail::pass_fd(&mut command, socket, crate::jail::SESSION_SOCKET_FD)
            .map_err(|e| format!("{e:#}"))?;
        command
            .arg("run")
            .args(self.run_args(desktop_id, image, disk, network, port, dir))
            .args(generation_arg(generation))
            .args(lock_arg(&self.settings.devices, lock_on_disconnect))
            .arg(format!("--clipboard={}", clipboard.as_arg()))
            .arg(file_transfer_arg(file_transfer))
            .arg(usb_arg(&usb))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        let child = self.spawner.spawn(command).map_err(|e| {
            format!("cannot start `pleiades-host run` (is util-linux's setpriv installed?): {e}")
        })?;
        drop(passed);
        tracing::info!(desktop = desktop_id, port, pid = child.id(), image = %image.name, "VM starting");
        lock(&self.running).insert(
            desktop_id.to_owned(),
            VmProcess { child, port, control: control.clone(), _net: net, generation, _jail: cleanup },
        );
        let this = self.clone();
        let id = desktop_id.to_owned();
        tokio::task::spawn_blocking(move || this.wait_ready(&id, &control, &log_path))
            .await
            .map_err(|e| e.to_string())??;
        tracing::info!(desktop = desktop_id, port, "VM ready: its session server listens");
        Ok(port)
    }

    /// The arguments of `pleiades-host run` for one desktop ([`crate::run::RunArgs`]).
    ///
    /// Every value is joined to its flag (`--ticket-key=VALUE`): a value given as an argument
    /// of its own is read as a flag when it begins with `-`, which a base64url key, a kernel
    /// command line or a name can.
    fn run_args(
        &self,
        desktop_id: &str,
        image: &VmImage,
        disk: Option<&Path>,
        network: Network<'_>,
        port: u16,
        dir: &Path,
    ) -> Vec<std::ffi::OsString> {
        let s = &self.settings;
        // Jailed, the process has a copy of the certificate its user can read.
        let tls_identity = match network {
            Network::Jailed { .. } => dir.join("tls"),
            Network::Host { .. } => s.state_dir.join("tls"),
        };
        let mut args = Vec::new();
        let mut flag = |name: &str, value: &std::ffi::OsStr| {
            let mut arg = std::ffi::OsString::from(format!("--{name}="));
            arg.push(value);
            args.push(arg);
        };
        flag("kernel", image.kernel.as_ref());
        flag("initrd", image.initrd.as_ref());
        flag("cmdline", image.cmdline.as_ref());
        flag("memory", format!("{}M", image.memory_mib).as_ref());
        flag("cpus", image.vcpus.to_string().as_ref());
        flag("serial", dir.join("serial.log").as_os_str());
        flag("control", dir.join("control.sock").as_os_str());
        flag("listen", SocketAddr::new(s.listen_ip, port).to_string().as_ref());
        flag("advertise", s.address.as_ref());
        flag("desktop", desktop_id.as_ref());
        flag("ticket-key", s.ticket_key.as_ref());
        flag("ticket-host", s.host_id.as_ref());
        flag("tls-identity", tls_identity.as_os_str());
        flag("encoder-cpu-budget", s.encoder_cpu_budget.to_string().as_ref());
        if let Some(vmm) = &s.vmm {
            flag("vmm", vmm.as_ref());
        }
        for device in &s.devices {
            flag("device", device.as_ref());
        }
        if let Some(disk) = disk {
            flag("disk", disk.as_os_str());
        }
        let mac = crate::vm::net::format_mac(crate::vm::net::desktop_mac(desktop_id));
        match network {
            Network::Host { netns: Some(netns) } => {
                flag("net", format!("user,netns={netns},mac={mac}").as_ref())
            }
            Network::Host { netns: None } | Network::Jailed { netns: false } => {}
            // In the desktop's namespace already.
            Network::Jailed { netns: true } => flag("net", format!("user,mac={mac}").as_ref()),
        }
        // The session socket, bound by the daemon on the host's network.
        flag("listen-fd", crate::jail::SESSION_SOCKET_FD.to_string().as_ref());
        args
    }

    /// Whether desktops run on QEMU (`--vmm qemu`, or no hardware KVM here).
    fn vmm_is_qemu(&self) -> bool {
        match self.settings.vmm.as_deref() {
            Some(vmm) => vmm == "qemu",
            None => crate::run::default_vmm() == crate::run::Vmm::Qemu,
        }
    }

    /// The desktop's network namespace and link (the host's NAT and filter on first use).
    /// Only QEMU has a network card for desktops: under Pleiades' VMM a desktop whose pool
    /// has a network is refused with what to do.
    async fn prepare_network(
        &self,
        desktop_id: &str,
        network: &DesktopNetwork,
    ) -> Result<DesktopNet, String> {
        if !self.vmm_is_qemu() {
            return Err("this host runs desktops on Pleiades' VMM, which has no network card yet: \
                        set the pool's network to none, or run the host with --vmm qemu"
                .into());
        }
        let host = {
            let mut slot = lock(&self.network);
            match &*slot {
                Some(host) => host.clone(),
                None => slot.insert(HostNetwork::setup()?).clone(),
            }
        };
        let (id, policy) =
            (desktop_id.to_owned(), NetPolicy { host_tcp_ports: network.host_tcp_ports.clone() });
        tokio::task::spawn_blocking(move || host.create(&id, &policy)).await.map_err(|e| e.to_string())?
    }

    /// The desktop's disk, when its image has one: the host's verified copy of the template
    /// (made on first use, which hashes the whole file), and the desktop's overlay on it.
    async fn prepare_disk(
        &self,
        desktop_id: &str,
        image: &VmImage,
        fresh: bool,
    ) -> Result<Option<PathBuf>, String> {
        let Some((source, sha)) = DiskStore::check(image)? else { return Ok(None) };
        let (disks, id, source, sha) =
            (self.disks.clone(), desktop_id.to_owned(), source.to_owned(), sha.to_owned());
        tokio::task::spawn_blocking(move || {
            let template = disks.template(&source, &sha)?;
            disks.overlay(&id, &template, fresh).map(Some)
        })
        .await
        .map_err(|e| e.to_string())?
    }

    fn check_image(&self, image: &VmImage) -> Result<(), String> {
        for (what, path) in [("kernel", &image.kernel), ("initrd", &image.initrd)] {
            if !Path::new(path).is_absolute() || !Path::new(path).is_file() {
                return Err(format!("image {}: the {what} {path:?} is not a file on this host", image.name));
            }
        }
        DiskStore::check(image)?;
        let disk = image.disk.iter().map(|d| ("disk template", d));
        for (what, path) in [("kernel", &image.kernel), ("initrd", &image.initrd)].into_iter().chain(disk) {
            self.check_image_file(&image.name, what, Path::new(path))?;
        }
        if !(1..=self.settings.cores.max(1)).contains(&image.vcpus) {
            return Err(format!(
                "image {}: {} vCPUs, this host has {}",
                image.name, image.vcpus, self.settings.cores
            ));
        }
        if !(64..=self.settings.memory_mib).contains(&image.memory_mib) {
            return Err(format!(
                "image {}: {} MiB of RAM, this host has {} MiB",
                image.name, image.memory_mib, self.settings.memory_mib
            ));
        }
        Ok(())
    }

    /// A file the broker names for an image must be a regular file in one of the host's image
    /// directories (`--image-dir`), whatever links lead to it: a broker cannot have a desktop
    /// boot `/etc/shadow` or the host's keys.
    fn check_image_file(&self, image: &str, what: &str, path: &Path) -> Result<(), String> {
        let real =
            path.canonicalize().map_err(|e| format!("image {image}: the {what} {}: {e}", path.display()))?;
        let inside = self.settings.image_dirs.iter().any(|dir| real.starts_with(dir));
        if !inside || !real.is_file() {
            let dirs: Vec<String> =
                self.settings.image_dirs.iter().map(|d| d.display().to_string()).collect();
            return Err(format!(
                "image {image}: the {what} {} is not a file in this host's image directories ({}); \
                 put it there or start the host with --image-dir",
                path.display(),
                dirs.join(", ")
            ));
        }
        Ok(())
    }

    /// The lowest port of the range that no VM of ours uses or is being given, and that is
    /// free now; claimed until the returned claim is dropped (by then the VM is in `running`,
    /// or failed).
    fn claim_port(&self) -> Result<PortClaim<'_>, String> {
        let mut claimed = lock(&self.claimed_ports);
        let used: Vec<u16> = lock(&self.running).values().map(|vm| vm.port).collect();
        let range = self.settings.ports;
        let port = (range.first..=range.last)
            .filter(|p| !used.contains(p) && !claimed.contains(p))
            .find_map(|p| UdpSocket::bind(SocketAddr::new(self.settings.listen_ip, p)).ok().map(|s| (p, s)))
            .ok_or_else(|| {
                format!("no free UDP port in {}-{} for another desktop", range.first, range.last)
            })?;
        let (port, socket) = port;
        claimed.insert(port);
        Ok(PortClaim { claimed: &self.claimed_ports, port, socket: Some(socket) })
    }

    /// Polls the control socket until the VM answers (its session server is up by then),
    /// failing early when the process ends.
    fn wait_ready(&self, desktop_id: &str, control: &Path, log: &Path) -> Result<(), String> {
        let deadline = Instant::now() + START_TIMEOUT;
        while Instant::now() < deadline {
            if let Some(vm) = lock(&self.running).get_mut(desktop_id)
                && let Ok(Some(status)) = vm.child.try_wait()
            {
                return Err(format!("the VM process ended ({status}): {}", tail(log)));
            }
            if control.exists()
                && let Ok(response) = control::request(control, &Request::Status, STATUS_TIMEOUT)
                && response.ok
            {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(format!("the VM did not come up in {} s: {}", START_TIMEOUT.as_secs(), tail(log)))
    }

    /// Powers the guest off (ACPI), then kills the process if it has not ended in time.
    pub async fn stop(self: &Arc<Self>, desktop_id: &str) -> Result<(), String> {
        let Some(control) = lock(&self.running).get(desktop_id).map(|vm| vm.control.clone()) else {
            return Ok(()); // Not running: already stopped.
        };
        let this = self.clone();
        let id = desktop_id.to_owned();
        tokio::task::spawn_blocking(move || {
            let asked = control::request(&control, &Request::Shutdown, STATUS_TIMEOUT).is_ok_and(|r| r.ok);
            let deadline = Instant::now() + if asked { STOP_TIMEOUT } else { Duration::ZERO };
            loop {
                let ended = lock(&this.running)
                    .get_mut(&id)
                    .is_none_or(|vm| !matches!(vm.child.try_wait(), Ok(None)));
                if ended || Instant::now() >= deadline {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            this.kill(&id);
        })
        .await
        .map_err(|e| e.to_string())?;
        tracing::info!(desktop = desktop_id, "VM stopped");
        Ok(())
    }

    /// Ends the process at once and forgets the desktop.
    fn kill(&self, desktop_id: &str) {
        if let Some(mut vm) = lock(&self.running).remove(desktop_id) {
            let _ = vm.child.kill();
            let _ = vm.child.wait();
        }
    }

    /// Drops the desktop's client, if any.
    pub async fn disconnect(&self, desktop_id: &str) -> Result<(), String> {
        let Some(control) = lock(&self.running).get(desktop_id).map(|vm| vm.control.clone()) else {
            return Ok(());
        };
        let response = tokio::task::spawn_blocking(move || {
            control::request(&control, &Request::Disconnect, STATUS_TIMEOUT)
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
        if response.ok { Ok(()) } else { Err(response.error.unwrap_or_default()) }
    }

    /// Forgets VMs whose process ended (the guest powered off or crashed), then reports the
    /// others with whether a client is connected.
    pub async fn report(self: &Arc<Self>) -> Vec<RunningDesktop> {
        let alive: Vec<(String, PathBuf, u16)> = {
            let mut running = lock(&self.running);
            running.retain(|id, vm| match vm.child.try_wait() {
                Ok(None) => true,
                Ok(Some(status)) => {
                    tracing::warn!(desktop = %id, %status, "VM process ended");
                    false
                }
                Err(e) => {
                    tracing::warn!(desktop = %id, "cannot wait for the VM process: {e}");
                    false
                }
            });
            running.iter().map(|(id, vm)| (id.clone(), vm.control.clone(), vm.port)).collect()
        };
        let disks = self.disks.clone();
        let desktops_dir = self.settings.state_dir.join("desktops");
        // Every VM is asked at once: a few hung ones cost one timeout, not one each.
        tokio::task::spawn_blocking(move || {
            std::thread::scope(|scope| {
                let asks: Vec<_> = alive
                    .into_iter()
                    .map(|(id, control, port)| {
                        let (disks, dir) = (&disks, desktops_dir.join(&id));
                        scope.spawn(move || {
                            rotate_log(&dir.join("serial.log"), SERIAL_LOG_MAX);
                            let status = control::request(&control, &Request::Status, STATUS_TIMEOUT)
                                .ok()
                                .and_then(|r| r.result)
                                .unwrap_or_default();
                            let connected = status["session"]["client_connected"].as_bool() == Some(true);
                            let guest = guest_report(&status["agent"]);
                            let clipboard = serde_json::from_value(status["agent"]["clipboard"].clone()).ok();
                            let files = serde_json::from_value(status["agent"]["files"].clone()).ok();
                            let usb = serde_json::from_value(status["agent"]["usb"].clone()).ok();
                            let disk_bytes = disks.usage(&id);
                            RunningDesktop {
                                id,
                                connected,
                                port: Some(port),
                                disk_bytes,
                                guest,
                                clipboard,
                                files,
                                usb,
                            }
                        })
                    })
                    .collect();
                asks.into_iter().filter_map(|ask| ask.join().ok()).collect()
            })
        })
        .await
        .unwrap_or_default()
    }

    /// Stops every VM at once (the daemon is shutting down).
    pub async fn stop_all(self: &Arc<Self>) {
        let ids: Vec<String> = lock(&self.running).keys().cloned().collect();
        let mut stops = tokio::task::JoinSet::new();
        for id in ids {
            let this = self.clone();
            stops.spawn(async move { this.stop(&id).await });
        }
        while let Some(result) = stops.join_next().await {
            if let Ok(Err(e)) = result {
                tracing::warn!("stopping a VM: {e}");
            }
        }
    }
}

/// A port set aside for a VM being started.
#[derive(Debug)]
struct PortClaim<'a> {
    claimed: &'a Mutex<std::collections::HashSet<u16>>,
    port: u16,
    /// The port's socket, bound while the claim is held (a jailed VM process is given it).
    socket: Option<UdpSocket>,
}

impl Drop for PortClaim<'_> {
    fn drop(&mut self) {
        lock(self.claimed).remove(&self.port);
    }
}

/// The most a desktop's serial log may grow to before it is rotated (`serial.log.1` keeps the
/// previous part): a guest writes to its console as much as it likes.
const SERIAL_LOG_MAX: u64 = 16 << 20;

/// Moves `path`'s content to `path.1` and empties it, once it is larger than `max`. The writer
/// (QEMU, or the VM process) appends, so it goes on writing at the new end.
/// The broker's view of what a VM's agent said (`ctl status`'s `agent`), while one is connected.
fn guest_report(agent: &serde_json::Value) -> Option<GuestReport> {
    if agent["connected"].as_bool() != Some(true) {
        return None;
    }
    let text = |key: &str| agent[key].as_str().map(str::to_owned);
    let report = GuestReport {
        agent_version: text("agent_version")?,
        hostname: text("hostname").unwrap_or_default(),
        os: text("os").unwrap_or_default(),
        kernel: text("kernel").unwrap_or_default(),
        addresses: agent["addresses"]
            .as_array()
            .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect())
            .unwrap_or_default(),
        session: text("session"),
        user: text("user"),
        idle_secs: agent["idle_ms"].as_u64().map(|ms| ms / 1000),
    };
    Some(report)
}

fn rotate_log(path: &Path, max: u64) {
    let Ok(meta) = std::fs::metadata(path) else { return };
    if meta.len() <= max {
        return;
    }
    let kept = path.with_extension("log.1");
    let rotated = std::fs::copy(path, &kept)
        .and_then(|_| std::fs::OpenOptions::new().write(true).open(path))
        .and_then(|file| file.set_len(0));
    match rotated {
        Ok(()) => tracing::info!("{} passed {} MiB: rotated", path.display(), max >> 20),
        Err(e) => tracing::warn!("cannot rotate {}: {e}", path.display()),
    }
}

/// Where a VM process runs, as its `run` arguments say it.
#[derive(Debug, Clone, Copy)]
enum Network<'a> {
    /// Unjailed, on the host's network; QEMU enters the desktop's namespace, if it has one.
    Host { netns: Option<&'a str> },
    /// Jailed: in the desktop's namespace (`netns`) or an empty one, with the session socket
    /// handed over.
    Jailed { netns: bool },
}

/// What a start command asks of the VM process beyond its image and disk.
#[derive(Debug, Clone)]
pub struct Boot {
    pub generation: Option<u64>,
    pub lock_on_disconnect: bool,
    /// The pool's clipboard policy (`run --clipboard`; without a guest agent there is no
    /// clipboard to share anyway).
    pub clipboard: ClipboardPolicy,
    /// The pool's file-transfer policy: whether the client may send files into the guest
    /// (`run --file-transfer allow|deny`).
    pub file_transfer: bool,
    /// The pool's USB policy: which of the client's devices may be redirected into the guest
    /// (`run --usb`).
    pub usb: UsbPolicy,
}

impl Boot {
    /// What `command` (one that boots) asks for. A USB policy that does not parse fails the
    /// command: the desktop is not booted (nor stopped first) with a policy other than its
    /// pool's. A command without one (a broker that predates it) allows no device.
    pub fn of(command: &pleiades_protocol::hostapi::HostCommand) -> Result<Self, String> {
        let usb = match &command.usb {
            Some(text) => UsbPolicy::parse(text)
                .map_err(|e| format!("the pool's USB policy {text:?} is not valid, not booting: {e}"))?,
            None => UsbPolicy::NONE,
        };
        Ok(Boot {
            generation: command.generation,
            lock_on_disconnect: command.lock_on_disconnect,
            clipboard: command.clipboard.unwrap_or_default(),
            file_transfer: command.file_transfer.unwrap_or(true),
            usb,
        })
    }
}

/// `run --usb=POLICY`: the pool's USB policy in its canonical text, always passed, `none` too
/// (the VM process enforces it, whatever the client offers).
fn usb_arg(policy: &UsbPolicy) -> String {
    format!("--usb={policy}")
}

/// `run --file-transfer=allow|deny`: the pool's file-transfer policy, always passed (the VM
/// process enforces it, whatever the client offers).
fn file_transfer_arg(allowed: bool) -> &'static str {
    if allowed { "--file-transfer=allow" } else { "--file-transfer=deny" }
}

/// `run --lock-on-disconnect` when the pool asks for it and the desktop has a guest agent (its
/// vsock device among `devices`) to lock and unlock the screen; the broker gives a ticket for a
/// desktop only to its user, so the next client with one may unlock it.
fn lock_arg(devices: &[String], lock_on_disconnect: bool) -> Option<&'static str> {
    let agent = devices.iter().any(|d| d.split(',').next() == Some("vsock"));
    (lock_on_disconnect && agent).then_some("--lock-on-disconnect")
}

/// `run --ticket-generation=N` for a VM process of the desktop's generation N: it accepts only
/// tickets for that generation ([`crate::run::RunArgs::ticket_generation`]).
fn generation_arg(generation: Option<u64>) -> Option<String> {
    generation.map(|g| format!("--ticket-generation={g}"))
}

/// Desktop ids become directory names: letters, digits, `-` and `_` only.
fn check_desktop_id(id: &str) -> Result<(), String> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok { Ok(()) } else { Err(format!("{id:?} is not a valid desktop id")) }
}

/// The last lines of a VM's log, for an error message.
fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let last = lines[lines.len().saturating_sub(3)..].join(" | ");
    if last.is_empty() { format!("see {}", log.display()) } else { last }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn screens_lock_on_disconnect_when_the_pool_says_so_and_an_agent_can() {
        let devices = |d: &[&str]| d.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        assert_eq!(lock_arg(&devices(&["gpu", "vsock"]), true), Some("--lock-on-disconnect"));
        assert_eq!(lock_arg(&devices(&["gpu", "vsock"]), false), None, "the pool turned it off");
        assert_eq!(lock_arg(&devices(&["gpu", "keyboard"]), true), None, "no agent to lock with");
    }

    #[test]
    fn the_agents_status_becomes_the_brokers_guest_report() {
        let status = serde_json::json!({"agent": {
            "connected": true, "version": 1, "agent_version": "0.1.0", "hostname": "desk",
            "os": "Debian GNU/Linux 13 (trixie)", "kernel": "6.12", "addresses": ["10.0.2.15/24"],
            "session": "locked", "user": "alice", "idle_ms": 61_999, "connections": 2
        }});
        let report = guest_report(&status["agent"]).unwrap();
        assert_eq!(report.agent_version, "0.1.0");
        assert_eq!(report.addresses, ["10.0.2.15/24"]);
        assert_eq!(
            (report.session.as_deref(), report.user.as_deref(), report.idle_secs),
            (Some("locked"), Some("alice"), Some(61))
        );
        // No agent connected (or none at all): nothing to report.
        let mut gone = status["agent"].clone();
        gone["connected"] = false.into();
        assert_eq!(guest_report(&gone), None);
        assert_eq!(guest_report(&serde_json::Value::Null), None);
    }

    /// The status poll reads the broker's USB counts from what the VM process's status says.
    #[test]
    fn the_vm_process_usb_status_becomes_the_brokers_usb_counts() {
        let usb = crate::vm::agent::UsbStatus {
            policy: "class=08".into(),
            attached: 2,
            denied: 5,
            failed: 1,
            bytes_to_guest: 1 << 20,
            ..Default::default()
        };
        let status = serde_json::json!({ "agent": { "connected": false, "usb": usb } });
        let counts: pleiades_protocol::hostapi::UsbCounts =
            serde_json::from_value(status["agent"]["usb"].clone()).unwrap();
        assert_eq!((counts.attached, counts.denied), (2, 5));
        // A VM process that predates USB says nothing: no counts, nothing for the broker to audit.
        let old = serde_json::json!({ "agent": { "connected": false } });
        assert!(
            serde_json::from_value::<pleiades_protocol::hostapi::UsbCounts>(old["agent"]["usb"].clone())
                .is_err()
        );
    }

    #[test]
    fn port_ranges_parse_and_refuse_nonsense() {
        assert_eq!("47000-47099".parse::<PortRange>().unwrap(), PortRange { first: 47000, last: 47099 });
        for bad in ["47000", "0-10", "10-5", "a-b", "1-70000"] {
            assert!(bad.parse::<PortRange>().is_err(), "{bad}");
        }
    }

    fn desktops(dir: &Path) -> Desktops {
        let settings = VmSettings {
            exe: "/bin/false".into(),
            vmm: None,
            devices: vec!["gpu".into()],
            listen_ip: IpAddr::from([127, 0, 0, 1]),
            ports: PortRange { first: 47000, last: 47001 },
            address: "127.0.0.1".into(),
            host_id: "h".into(),
            ticket_key: String::new(),
            state_dir: dir.to_owned(),
            cores: 2,
            memory_mib: 4096,
            jail: None,
            image_dirs: vec![dir.canonicalize().unwrap_or_else(|_| dir.to_owned())],
            encoder_cpu_budget: 50,
        };
        Desktops::new(settings, Spawner::start().unwrap())
    }

    #[test]
    fn a_serial_log_past_its_limit_is_rotated_and_its_appender_goes_on() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("serial.log");
        let mut guest = std::fs::OpenOptions::new().create(true).append(true).open(&log).unwrap();
        guest.write_all(&[b'x'; 100]).unwrap();
        rotate_log(&log, 200);
        assert_eq!(std::fs::metadata(&log).unwrap().len(), 100, "under the limit: untouched");
        guest.write_all(&[b'y'; 150]).unwrap();
        rotate_log(&log, 200);
        assert_eq!(std::fs::metadata(&log).unwrap().len(), 0);
        assert_eq!(std::fs::metadata(dir.path().join("serial.log.1")).unwrap().len(), 250);
        guest.write_all(b"after").unwrap();
        assert_eq!(std::fs::read(&log).unwrap(), b"after", "the writer goes on at the new start");
    }

    #[test]
    fn images_this_host_cannot_boot_are_refused_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("vmlinuz");
        std::fs::write(&kernel, b"k").unwrap();
        let image = VmImage {
            id: "i".into(),
            name: "desk".into(),
            kernel: kernel.display().to_string(),
            initrd: kernel.display().to_string(),
            cmdline: String::new(),
            disk: None,
            disk_sha256: None,
            vcpus: 1,
            memory_mib: 512,
        };
        let vms = desktops(dir.path());
        vms.check_image(&image).unwrap();
        // A hostile broker naming a host file, directly or through a link in the directory.
        let link = dir.path().join("link-to-hostname");
        std::os::unix::fs::symlink("/etc/hostname", &link).unwrap();
        let outside = "image directories";
        let cases = [
            (VmImage { kernel: "/etc/shadow".into(), ..image.clone() }, outside),
            (VmImage { initrd: "/etc/hostname".into(), ..image.clone() }, outside),
            (VmImage { kernel: link.display().to_string(), ..image.clone() }, outside),
            (VmImage { kernel: "/nonexistent/vmlinuz".into(), ..image.clone() }, "not a file"),
            (VmImage { initrd: "relative/initrd".into(), ..image.clone() }, "not a file"),
            (VmImage { vcpus: 3, ..image.clone() }, "3 vCPUs"),
            (VmImage { vcpus: 0, ..image.clone() }, "0 vCPUs"),
            (VmImage { memory_mib: 8192, ..image.clone() }, "8192 MiB"),
            (VmImage { disk: Some("/d.qcow2".into()), ..image.clone() }, "SHA-256"),
        ];
        for (bad, why) in cases {
            let e = vms.check_image(&bad).unwrap_err();
            assert!(e.contains(why) && e.contains("desk"), "{e}");
        }
    }

    #[tokio::test]
    async fn stopping_or_disconnecting_a_desktop_that_does_not_run_is_not_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let vms = Arc::new(desktops(dir.path()));
        vms.stop("d-1").await.unwrap();
        vms.disconnect("d-1").await.unwrap();
        assert!(vms.report().await.is_empty());
        let e = vms
            .start(
                "../escape",
                &VmImage {
                    id: String::new(),
                    name: "x".into(),
                    kernel: "/k".into(),
                    initrd: "/i".into(),
                    cmdline: String::new(),
                    disk: None,
                    disk_sha256: None,
                    vcpus: 1,
                    memory_mib: 64,
                },
                false,
                None,
                Boot {
                    generation: Some(1),
                    lock_on_disconnect: true,
                    clipboard: ClipboardPolicy::BOTH,
                    file_transfer: true,
                    usb: UsbPolicy::NONE,
                },
            )
            .await
            .unwrap_err();
        assert!(e.contains("not a valid desktop id"), "{e}");
    }

    /// What the daemon writes, `run` reads back unchanged, whatever the values begin with.
    mod run_arguments {
        use clap::Parser;
        use proptest::prelude::*;

        use super::*;
        use crate::run::RunArgs;

        #[derive(Debug, Parser)]
        struct Run {
            #[command(flatten)]
            args: RunArgs,
        }

        fn base64url(bytes: &[u8]) -> String {
            use base64::Engine as _;
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]
            #[test]
            fn reach_the_vm_process_intact(
                key in proptest::array::uniform32(any::<u8>()),
                desktop in "[-_a-zA-Z0-9]{1,64}",
                host_id in "[-_a-zA-Z0-9]{1,40}",
                address in "-?[-.:a-z0-9]{1,40}",
                cmdline in "[ -~]{0,80}",
                kernel in "/-?[-_ a-zA-Z0-9=,]{1,30}",
                state in "/-?[-_a-z0-9]{1,20}",
                device in prop::sample::select(vec!["gpu", "sound", "keyboard", "tablet", "gpu,heads=2"]),
                generation in proptest::option::of(any::<u64>()),
                usb in prop::sample::select(vec!["none", "all", "class=03", "class=03,class=0b,0525:a4a5", "1d6b:0104"]),
            ) {
                let mut settings = desktops(Path::new(&state)).settings;
                settings.ticket_key = base64url(&key);
                settings.host_id = host_id.clone();
                settings.address = address.clone();
                settings.devices = vec![device.to_owned()];
                settings.vmm = Some("qemu".into());
                let vms = Desktops::new(settings, Spawner::start().unwrap());
                let image = VmImage {
                    id: "i".into(),
                    name: "n".into(),
                    kernel: kernel.clone(),
                    initrd: format!("{kernel}.img"),
                    cmdline: cmdline.clone(),
                    disk: None,
                    disk_sha256: None,
                    vcpus: 2,
                    memory_mib: 768,
                };
                let dir = Path::new(&state).join("desktops").join(&desktop);
                let disk = Path::new(&state).join("disks").join(format!("{desktop}.qcow2"));
                let netns = format!("pleiades-{desktop}");
                let mut argv = vms.run_args(&desktop, &image, Some(&disk), Network::Host { netns: Some(&netns) }, 47001, &dir);
                argv.extend(generation_arg(generation).map(Into::into));
                let usb = UsbPolicy::parse(usb).unwrap();
                argv.push(usb_arg(&usb).into());
                let run = Run::try_parse_from(std::iter::once("run".into()).chain(argv))
                    .map_err(|e| TestCaseError::fail(e.to_string()))?
                    .args;
                prop_assert_eq!(run.ticket_key, Some(base64url(&key)));
                prop_assert_eq!(run.ticket_host.as_deref(), Some(host_id.as_str()));
                prop_assert_eq!(run.ticket_generation, generation);
                prop_assert_eq!(run.usb, usb);
                prop_assert_eq!(run.advertise.as_deref(), Some(address.as_str()));
                prop_assert_eq!(&run.desktop, &desktop);
                prop_assert_eq!(&run.cmdline, &cmdline);
                prop_assert_eq!(run.kernel.as_deref(), Some(Path::new(&kernel)));
                prop_assert_eq!(run.initrd, Some(PathBuf::from(format!("{kernel}.img"))));
                prop_assert_eq!(run.cpus, 2);
                prop_assert_eq!(&run.memory, "768M");
                prop_assert_eq!(run.control, Some(dir.join("control.sock")));
                prop_assert_eq!(run.tls_identity, Some(Path::new(&state).join("tls")));
                prop_assert_eq!(run.listen, Some("127.0.0.1:47001".parse().unwrap()));
                // The daemon's socket, jailed or not: the port never is free between two starts.
                prop_assert_eq!(run.listen_fd, Some(crate::jail::SESSION_SOCKET_FD));
                prop_assert_eq!(run.devices.len(), 1);
                prop_assert_eq!(run.disks, vec![crate::vm::disk::DiskRequest { path: disk, read_only: false }]);
                let net = run.net.expect("--net");
                prop_assert_eq!(net.netns, Some(netns));
                prop_assert_eq!(net.mac, Some(crate::vm::net::desktop_mac(&desktop)));
            }
        }
    }

    #[test]
    fn desktops_starting_at_once_get_different_ports() {
        let dir = tempfile::tempdir().unwrap();
        let vms = desktops(dir.path());
        let first = vms.claim_port().unwrap();
        let second = vms.claim_port().unwrap();
        assert_ne!(first.port, second.port);
        assert!(vms.claim_port().unwrap_err().contains("no free UDP port"), "the range has two ports");
        drop(first);
        assert!(vms.claim_port().is_ok(), "a dropped claim frees its port");
    }

    #[test]
    fn a_boot_passes_the_pools_file_transfer_policy_to_run() {
        let command: pleiades_protocol::hostapi::HostCommand = serde_json::from_str(
            r#"{"id":"c1","kind":"start","desktop_id":"d1","desktop_name":"n","image":null,"generation":3}"#,
        )
        .unwrap();
        let boot = Boot::of(&command).unwrap();
        assert!(boot.file_transfer, "a broker that predates the policy: allowed");
        assert_eq!(file_transfer_arg(boot.file_transfer), "--file-transfer=allow");
        for (told, arg) in [(true, "--file-transfer=allow"), (false, "--file-transfer=deny")] {
            let command =
                pleiades_protocol::hostapi::HostCommand { file_transfer: Some(told), ..command.clone() };
            let boot = Boot::of(&command).unwrap();
            assert_eq!((boot.file_transfer, boot.generation), (told, Some(3)));
            assert_eq!(file_transfer_arg(boot.file_transfer), arg);
        }
    }

    #[test]
    fn a_boot_passes_the_pools_usb_policy_to_run() {
        let command: pleiades_protocol::hostapi::HostCommand = serde_json::from_str(
            r#"{"id":"c1","kind":"start","desktop_id":"d1","desktop_name":"n","image":null,"generation":3}"#,
        )
        .unwrap();
        let boot = Boot::of(&command).unwrap();
        assert_eq!(boot.usb, UsbPolicy::NONE, "a broker that predates the policy: no device");
        assert_eq!(usb_arg(&boot.usb), "--usb=none", "passed even when nothing is allowed");
        for (told, arg) in [
            ("none", "--usb=none"),
            ("all", "--usb=all"),
            ("class=08", "--usb=class=08"),
            (" class=03, class=0B ,0525:A4A5", "--usb=class=03,class=0b,0525:a4a5"),
        ] {
            let command =
                pleiades_protocol::hostapi::HostCommand { usb: Some(told.into()), ..command.clone() };
            let boot = Boot::of(&command).unwrap();
            assert_eq!(boot.generation, Some(3));
            assert_eq!(usb_arg(&boot.usb), arg, "{told:?}");
        }
        // A policy the host cannot read fails the command: never a boot with another policy.
        for bad in ["most", "class=8", "0525-a4a5", "class=03,everything", "usb:all"] {
            let command =
                pleiades_protocol::hostapi::HostCommand { usb: Some(bad.into()), ..command.clone() };
            let e = Boot::of(&command).unwrap_err();
            assert!(e.contains("USB policy") && e.contains(bad) && e.contains("not booting"), "{e}");
        }
    }

    #[test]
    fn desktop_ids_cannot_escape_the_state_directory() {
        check_desktop_id("0b9c2f1e-7d44-4c1a-9a57-1f0e2d3c4b5a").unwrap();
        for bad in ["", "..", "a/b", "../../etc", "x y", &"a".repeat(65)] {
            assert!(check_desktop_id(bad).is_err(), "{bad:?}");
        }
    }
}
