//! `pleiades-host`: runs desktop VMs and their devices.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use pleiades_control::{self as control, ControlServer, Controller, PointerButton, Request};
use pleiades_host::run::{Layout, RunArgs, Vmm, parse_layout};
use pleiades_host::vm::DeviceKind;
use pleiades_host::vm::disk::Disk;
use pleiades_host::vm::native::NativeVm;
use pleiades_host::vm::qemu::QemuVm;
use pleiades_session as session;
use pleiades_virtio::VirtioDevice;
use pleiades_virtio::console::Console;
use pleiades_virtio::gpu::{Gpu, GpuConfig};
use pleiades_virtio::input::{Input, events_socket, keymap};
use pleiades_virtio::rng::Rng;
use pleiades_vmm::config::BootSpec;

#[derive(Debug, Parser)]
#[command(name = "pleiades-host", version, about = "Pleiades host: desktop VMs and their devices")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Boot a VM: one process per VM. Exits 0 when the guest powers off.
    Run(Box<RunArgs>),
    /// The host daemon: register with a broker, heartbeat, and run the desktops it asks for
    /// (one `run` process each). Runs until SIGTERM/SIGINT, which stops the desktops.
    Serve(Box<pleiades_host::serve::ServeArgs>),
    /// Talk to a running VM's control socket.
    Ctl {
        /// The VM's control socket (`run --control`).
        socket: PathBuf,
        #[command(subcommand)]
        command: CtlCommand,
    },
    /// Serve one virtio device as a vhost-user backend on a Unix socket (for Pleiades' VMM or
    /// QEMU's `-device vhost-user-<kind>-pci`). Exits when the frontend disconnects.
    Device {
        /// The device to serve: `rng` (entropy from the host's /dev/urandom), `console` (the
        /// guest's output to this process's stdout; Pleiades' VMM only, QEMU has no vhost-user
        /// console), `keyboard`, `tablet` (absolute pointer, three buttons, wheel), `mouse`
        /// (relative motion: a client's relative mode), `gpu` (2D, for QEMU's
        /// `vhost-user-gpu-pci`: one monitor, the display goes to QEMU's console) or `sound`/`snd`
        /// (for QEMU's `vhost-user-snd-pci`: plays into nothing, records silence). `pleiades-host
        /// run` serves its GPU and sound itself, to stream them to the client.
        kind: DeviceKind,
        /// Unix socket to listen on.
        #[arg(long)]
        socket: PathBuf,
        /// keyboard/tablet: also take host input events on this Unix socket (mode 0600; 8-byte
        /// virtio_input_event records, each report ended by SYN_REPORT).
        #[arg(long)]
        events: Option<PathBuf>,
    },
    /// Run a program in a desktop's jail (the host daemon starts every VM process this way;
    /// docs/security.md). Needs root; the program runs as the spec's unprivileged user.
    #[command(hide = true)]
    Jail {
        /// The jail, as JSON (`pleiades_host::jail::JailSpec`).
        #[arg(long)]
        spec: String,
        /// The program and its arguments.
        #[arg(last = true, required = true)]
        program: Vec<std::ffi::OsString>,
    },
}

#[derive(Debug, Subcommand)]
enum CtlCommand {
    /// Print the VM's state as JSON.
    Status,
    /// Power the guest off cleanly (the VM process then exits).
    Shutdown,
    /// Restart the guest.
    Reboot,
    /// Type text with the virtual keyboard (US layout; `\n` is Enter, `\t` Tab).
    Type { text: String },
    /// Press a key combination, e.g. `ctrl+alt+f2`.
    Key { combo: String },
    /// Move the tablet pointer to X Y in tablet units (0-32767 on both axes), optionally click
    /// and scroll.
    Pointer {
        x: u32,
        y: u32,
        #[arg(long)]
        click: Option<PointerButton>,
        /// Then turn the wheel by N notches (negative: towards the user, scroll down).
        #[arg(long, allow_hyphen_values = true)]
        wheel: Option<i32>,
    },
    /// Save what a monitor shows as a PNG file.
    Screenshot {
        /// The monitor (scanout), from 0.
        #[arg(long, default_value_t = 0)]
        scanout: u32,
        /// The PNG file to write.
        out: PathBuf,
    },
    /// Ask the guest to use these monitor sizes, left to right, e.g. `1280x720` or
    /// `1920x1080,1280x1024` (monitors beyond the list are switched off).
    Layout {
        #[arg(value_parser = parse_layout)]
        sizes: Layout,
    },
    /// Drop the session's client, if one is connected (the VM goes on).
    Disconnect,
    /// Debug builds: make a system call outside every seccomp allowlist (a test of the jail).
    #[command(hide = true)]
    TestForbiddenSyscall,
    /// Write a new one-time connection file for the VM's session server (`run --listen`).
    ConnectionFile {
        /// The file to write (mode 0600: it holds a ticket).
        out: PathBuf,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PLEIADES_LOG").unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("pleiades-host: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Run(args) => run_vm(*args),
        Command::Serve(args) => {
            pleiades_host::serve::run(args.resolve()?)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Ctl { socket, command } => {
            let request = match command {
                CtlCommand::Status => Request::Status,
                CtlCommand::Shutdown => Request::Shutdown,
                CtlCommand::Reboot => Request::Reboot,
                CtlCommand::Type { text } => Request::Type { text: keymap::unescape(&text) },
                CtlCommand::Key { combo } => Request::Key { combo },
                CtlCommand::Pointer { x, y, click, wheel } => Request::Pointer { x, y, click, wheel },
                CtlCommand::Screenshot { scanout, ref out } => {
                    let response =
                        control::request(&socket, &Request::Screenshot { scanout }, Duration::from_secs(30))?;
                    return save_screenshot(response, out);
                }
                CtlCommand::Layout { sizes } => Request::Layout { sizes: sizes.0 },
                CtlCommand::Disconnect => Request::Disconnect,
                CtlCommand::TestForbiddenSyscall => Request::TestForbiddenSyscall,
                CtlCommand::ConnectionFile { ref out } => {
                    let response =
                        control::request(&socket, &Request::ConnectionFile, Duration::from_secs(30))?;
                    let Some(toml) = response.result.as_ref().and_then(|r| r["toml"].as_str()) else {
                        eprintln!(
                            "pleiades-host ctl: {}",
                            response.error.unwrap_or_else(|| "the VM refused".into())
                        );
                        return Ok(ExitCode::FAILURE);
                    };
                    let connection = pleiades_protocol::connfile::Connection::from_toml(toml)
                        .map_err(|e| anyhow::anyhow!("the VM answered a bad connection: {e}"))?;
                    session::write_connection_file(out, &connection)?;
                    println!("{}", out.display());
                    return Ok(ExitCode::SUCCESS);
                }
            };
            let response = control::request(&socket, &request, Duration::from_secs(30))?;
            match (response.ok, response.result, response.error) {
                (true, Some(result), _) => {
                    println!("{}", serde_json::to_string_pretty(&result)?);
                    Ok(ExitCode::SUCCESS)
                }
                (true, None, _) => Ok(ExitCode::SUCCESS),
                (false, _, error) => {
                    eprintln!("pleiades-host ctl: {}", error.unwrap_or_else(|| "the VM refused".into()));
                    Ok(ExitCode::FAILURE)
                }
            }
        }
        Command::Jail { spec, program } => {
            let spec: pleiades_host::jail::JailSpec =
                serde_json::from_str(&spec).context("--spec is not a jail specification")?;
            let code = pleiades_host::jail::enter(&spec, &program)?;
            Ok(ExitCode::from(u8::try_from(code).unwrap_or(255)))
        }
        Command::Device { kind, socket, events } => {
            let device: Box<dyn VirtioDevice> = match kind {
                DeviceKind::Rng | DeviceKind::Console | DeviceKind::Gpu | DeviceKind::Sound
                    if events.is_some() =>
                {
                    anyhow::bail!("--events is for keyboard, tablet and mouse")
                }
                DeviceKind::Vsock => anyhow::bail!(
                    "the vsock device is served from the VM process (its host end is the agent's link there), not as a device process"
                ),
                DeviceKind::Gpu => Box::new(Gpu::new(&GpuConfig::default())?),
                DeviceKind::Sound => Box::new(pleiades_virtio::snd::Sound::new()?),
                DeviceKind::Rng => Box::new(Rng::new()?),
                DeviceKind::Console => Box::new(Console::new(Box::new(std::io::stdout()), None)),
                DeviceKind::Keyboard | DeviceKind::Tablet | DeviceKind::Mouse => {
                    let input = match kind {
                        DeviceKind::Keyboard => Input::keyboard()?,
                        DeviceKind::Tablet => Input::tablet()?,
                        _ => Input::mouse()?,
                    };
                    if let Some(events) = &events {
                        events_socket::listen(events, input.sender())
                            .with_context(|| format!("cannot listen on {}", events.display()))?;
                    }
                    Box::new(input)
                }
            };
            pleiades_virtio::vhost_user::serve(device, &socket)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Writes the PNG of a `screenshot` answer to `out`.
fn save_screenshot(response: control::Response, out: &std::path::Path) -> Result<ExitCode> {
    let png = match pleiades_control::png_of_answer(&response) {
        Ok(png) => png,
        Err(error) => {
            eprintln!("pleiades-host ctl: {error}");
            return Ok(ExitCode::FAILURE);
        }
    };
    std::fs::write(out, png).with_context(|| format!("cannot write {}", out.display()))?;
    let result = response.result.unwrap_or_default();
    println!("{}x{} → {}", result["width"], result["height"], out.display());
    Ok(ExitCode::SUCCESS)
}

/// `run --listen-fd`'s socket, taken over first thing (before any child could inherit it) and
/// used when the session server starts.
static LISTEN_SOCKET: std::sync::Mutex<Option<std::net::UdpSocket>> = std::sync::Mutex::new(None);

fn run_vm(args: RunArgs) -> Result<ExitCode> {
    if let Some(fd) = args.listen_fd {
        let socket = pleiades_host::jail::take_fd(fd)?;
        *LISTEN_SOCKET.lock().unwrap_or_else(|p| p.into_inner()) = Some(socket);
    }
    if let Some(workload) = args.synthetic {
        return run_synthetic(workload, &args);
    }
    let kernel = args.kernel.as_deref().context("--kernel is required")?;
    let spec = BootSpec::new(kernel, args.initrd.as_deref(), &args.cmdline, &args.memory, args.cpus)?;
    let hardware_kvm = pleiades_host::run::hardware_kvm();
    let vmm = args.vmm.unwrap_or(if hardware_kvm { Vmm::Pleiades } else { Vmm::Qemu });
    if args.vmm.is_none() {
        tracing::info!(
            "using --vmm {} ({})",
            if vmm == Vmm::Pleiades { "pleiades" } else { "qemu" },
            if hardware_kvm {
                "KVM is hardware-backed"
            } else {
                "no hardware virtualization here: QEMU runs the vCPUs, Pleiades' devices attach over vhost-user"
            }
        );
    }
    match vmm {
        Vmm::Qemu => run_qemu(&spec, &args),
        Vmm::Pleiades => run_pleiades(&spec, &args),
    }
}

fn run_qemu(spec: &BootSpec, args: &RunArgs) -> Result<ExitCode> {
    let accel = pleiades_vmm::accel::choose()?;
    tracing::info!("QEMU accelerator: {} ({})", accel.accel, accel.reason);
    let disks = open_disks(args)?;
    let vm = QemuVm::start(spec, &args.devices, &disks, args.net.as_ref(), &args.serial, accel)?;
    agent_policies(args, vm.agent())?;
    let controller = with_session(args, vm.controller())?;
    let _control = control_vm(args, controller)?;
    let status = vm.wait()?;
    Ok(if status.success() {
        ExitCode::SUCCESS
    } else {
        eprintln!("pleiades-host: QEMU exited with {status}");
        ExitCode::FAILURE
    })
}

fn run_synthetic(workload: pleiades_session::synthetic::Workload, args: &RunArgs) -> Result<ExitCode> {
    let &[(width, height)] = args.synthetic_size.0.as_slice() else {
        anyhow::bail!("--synthetic-size takes one WIDTHxHEIGHT");
    };
    let vm = pleiades_session::synthetic::SyntheticVm::start(workload, width, height)?;
    let controller = with_session(args, vm.controller())?;
    let _control = control_vm(args, controller)?;
    vm.wait();
    Ok(ExitCode::SUCCESS)
}

fn run_pleiades(spec: &BootSpec, args: &RunArgs) -> Result<ExitCode> {
    if args.net.is_some() {
        anyhow::bail!("Pleiades' VMM has no network device yet: use --vmm qemu for --net, or drop --net");
    }
    let disks = open_disks(args)?;
    let vm = NativeVm::new(spec, &args.devices, &disks, &args.serial)?;
    agent_policies(args, vm.agent())?;
    let controller = with_session(args, vm.controller())?;
    let _control = control_vm(args, controller)?;
    let reason = vm.run()?;
    tracing::info!("the VM ended: {reason:?}");
    Ok(ExitCode::from(u8::try_from(reason.exit_code()).unwrap_or(1)))
}

/// `--lock-on-disconnect`: the agent locks and unlocks the guest's screen; `--clipboard`: the
/// directions the agent's clipboard relay lets through; `--file-transfer`: whether its file
/// relay takes files; `--usb`: which devices its USB relay lets into the guest.
fn agent_policies(args: &RunArgs, agent: Option<&pleiades_host::vm::agent::Agent>) -> Result<()> {
    if let Some(agent) = agent {
        agent.set_clipboard_policy(args.clipboard.policy());
        agent.set_file_transfer(args.file_transfer == pleiades_host::run::FileTransferArg::Allow);
        agent.set_usb_policy(args.usb.clone());
    }
    match (args.lock_on_disconnect, agent) {
        (false, _) => Ok(()),
        (true, Some(agent)) => {
            agent.set_lock_on_disconnect(true);
            Ok(())
        }
        (true, None) => {
            anyhow::bail!("--lock-on-disconnect needs the guest agent's link: add --device vsock")
        }
    }
}

fn open_disks(args: &RunArgs) -> Result<Vec<Disk>> {
    args.disks.iter().map(Disk::open).collect()
}

/// Starts the session server when `--listen` asks for one (and writes the connection file).
fn with_session(args: &RunArgs, controller: Arc<dyn Controller>) -> Result<Arc<dyn Controller>> {
    let Some(listen) = args.listen else { return Ok(controller) };
    if controller.display().is_none() {
        anyhow::bail!("--listen serves the desktop's display: add --device gpu");
    }
    let advertise = args.advertise.clone().unwrap_or_else(|| {
        if listen.ip().is_unspecified() {
            nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
                .unwrap_or_else(|| "localhost".into())
        } else {
            listen.ip().to_string()
        }
    });
    let (tickets, ticket_key, ticket_host) = match &args.ticket_key {
        Some(key) => {
            let key = pleiades_protocol::ticket::PublicKey::from_base64(key)
                .map_err(|e| anyhow::anyhow!("--ticket-key is not a base64url Ed25519 key: {e}"))?;
            (None, key, args.ticket_host.clone().unwrap_or_else(|| advertise.clone()))
        }
        None => {
            let tickets = session::LocalTickets::new(&advertise, &args.desktop)?;
            let key = tickets.public_key();
            (Some(tickets), key, advertise.clone())
        }
    };
    let config = session::SessionConfig {
        listen,
        desktop: args.desktop.clone(),
        host: ticket_host,
        ticket_key,
        generation: args.ticket_generation,
        identity_dir: args.tls_identity.clone(),
        relative_pointer: args.devices.iter().any(|d| d.kind == DeviceKind::Mouse),
        encoder_cpu_budget_percent: args.encoder_cpu_budget,
    };
    let socket = LISTEN_SOCKET.lock().unwrap_or_else(|p| p.into_inner()).take();
    if let Some(socket) = &socket
        && socket.local_addr()?.port() != listen.port()
    {
        anyhow::bail!("--listen-fd is bound to {}, not to --listen {listen}", socket.local_addr()?);
    }
    let server = session::SessionServer::start_on(&config, controller.clone(), socket)?;
    let with = session::SessionController::new(controller, server, tickets, &advertise);
    if let Some(path) = &args.connection_file {
        let connection = with.mint_connection().map_err(anyhow::Error::msg)?;
        session::write_connection_file(path, &connection)?;
        tracing::info!(
            "connection file written to {} (one use, valid {} s)",
            path.display(),
            session::LOCAL_TICKET_SECS
        );
    }
    Ok(Arc::new(with))
}

/// Opens the control socket (if asked for) and routes SIGTERM/SIGINT to the controller. The
/// returned server lives as long as the VM runs.
fn control_vm(args: &RunArgs, controller: Arc<dyn Controller>) -> Result<Option<ControlServer>> {
    let server = args
        .control
        .as_deref()
        .map(|path| ControlServer::start(path, controller.clone()))
        .transpose()
        .context("cannot open the control socket")?;
    shutdown_on_signals(controller)?;
    Ok(server)
}

/// SIGTERM and SIGINT ask the guest to power off, like `ctl shutdown`.
fn shutdown_on_signals(controller: Arc<dyn Controller>) -> Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT])?;
    std::thread::Builder::new().name("signals".into()).spawn(move || {
        for signal in signals.forever() {
            tracing::info!("signal {signal}: shutting the guest down");
            if let Err(e) = controller.shutdown() {
                tracing::warn!("shutdown failed: {e}");
            }
        }
    })?;
    Ok(())
}
