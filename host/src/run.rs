//! The arguments of `pleiades-host run`: one VM process. The binary parses them, and the host
//! daemon (`serve`) writes them for every desktop it starts, so both sides share this one
//! definition (and a test parses what the daemon writes with it).

use std::path::PathBuf;

use clap::ValueEnum;

use crate::vm::disk::DiskRequest;
use crate::vm::net::NetRequest;
use crate::vm::{DeviceRequest, SerialOut};

/// `run --encoder-cpu-budget`'s default: half a core per desktop for H.264 (a 640x360 video
/// at 30 fps takes a fraction of that; a full-screen 1080p one is slowed to fit).
pub const DEFAULT_ENCODER_CPU_BUDGET: u32 = 50;

/// `pleiades-host run`'s arguments.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Kernel: a Linux bzImage, or an ELF (the minimal test guest).
    #[arg(long, required_unless_present = "synthetic")]
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk.
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, default_value = "console=ttyS0")]
    pub cmdline: String,
    /// Guest RAM, e.g. 512M or 2G.
    #[arg(long, default_value = "512M")]
    pub memory: String,
    /// Virtual CPUs.
    #[arg(long, default_value_t = 1)]
    pub cpus: u32,
    /// Serial console: `stdio` or a file to append to.
    #[arg(long, default_value = "stdio")]
    pub serial: SerialOut,
    /// Open a control socket here (`pleiades-host ctl SOCKET status|shutdown|reboot`).
    #[arg(long)]
    pub control: Option<PathBuf>,
    /// Who runs the vCPUs: Pleiades' own VMM (default where KVM is hardware-backed) or QEMU
    /// with Pleiades' devices over vhost-user (default elsewhere).
    #[arg(long)]
    pub vmm: Option<Vmm>,
    /// A virtio device: `rng`, `console`, `keyboard`, `tablet`, `mouse`, `gpu` or `sound` (`snd`), optionally
    /// `,backend=in-process|vhost-user`; the gpu takes `,heads=N` (monitors, 1-16) and
    /// `,memory-mib=M` (the cap on host memory the guest can make it allocate, default 256).
    /// Repeat for several devices.
    #[arg(long = "device")]
    pub devices: Vec<DeviceRequest>,
    /// A virtio-blk disk: an image file, qcow2 (a copy-on-write overlay on its backing file
    /// works) or raw, optionally `,readonly`. The first is the guest's /dev/vda. Repeat for
    /// several disks.
    #[arg(long = "disk")]
    pub disks: Vec<DiskRequest>,
    /// A virtio-net NIC on QEMU's user-mode network (DHCP, DNS, outbound NAT):
    /// `user[,netns=NAME][,mac=MAC]`. With `netns`, QEMU runs in that network namespace and
    /// the guest reaches only what the namespace can (`pleiades-host serve` makes one per
    /// desktop); without, the guest reaches everything this machine can, its loopback
    /// included. Needs `--vmm qemu`.
    #[arg(long)]
    pub net: Option<NetRequest>,
    /// Serve the desktop to a client (QUIC, UDP) on this address, e.g. `0.0.0.0:4433` or
    /// `127.0.0.1:0` (any free port). Needs `--device gpu`; input goes to the keyboard and
    /// tablet.
    #[arg(long)]
    pub listen: Option<std::net::SocketAddr>,
    /// With `--listen`: serve on this inherited file descriptor, a UDP socket bound to the
    /// `--listen` address already (the host daemon hands it to a jailed VM process, which has
    /// no network of its own to bind in).
    #[arg(long, requires = "listen")]
    pub listen_fd: Option<i32>,
    /// With `--listen`: write a one-time connection file here (`pleiades connect FILE`), with a
    /// ticket the host signs itself (no broker). `ctl connection-file` mints more.
    #[arg(long, requires = "listen")]
    pub connection_file: Option<PathBuf>,
    /// The address clients reach the session server at (default: the `--listen` address, or
    /// this machine's name when that is 0.0.0.0).
    #[arg(long, requires = "listen")]
    pub advertise: Option<String>,
    /// This desktop's name (tickets name it).
    #[arg(long, default_value = "local")]
    pub desktop: String,
    /// Accept tickets signed by this key (base64url Ed25519: the broker's, `pleiades-broker
    /// ticket-key`) instead of minting the host's own.
    #[arg(long, requires = "listen", conflicts_with = "connection_file")]
    pub ticket_key: Option<String>,
    /// The host name tickets must carry (the broker's host id; default: the advertised address).
    #[arg(long, requires = "ticket_key")]
    pub ticket_host: Option<String>,
    /// The desktop's generation this process serves (the broker's start, restart or recycle
    /// command names it): only tickets for it are accepted, so that a ticket issued before a
    /// restart or recycle (another user's) does not open this process.
    #[arg(long, requires = "ticket_key")]
    pub ticket_generation: Option<u64>,
    /// Lock the guest's screen whenever the session's client leaves, and unlock it when a
    /// client with a ticket arrives (the guest agent does both: needs --device vsock).
    #[arg(long, requires = "listen", num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set, default_value_t = false)]
    pub lock_on_disconnect: bool,
    /// Which ways the clipboard may carry content between the client and the guest session
    /// (the pool's data loss prevention switch; the guest agent relays it: needs --device
    /// vsock). Enforced here, whatever the client or the guest does.
    #[arg(long, value_enum, default_value_t = ClipboardArg::Both)]
    pub clipboard: ClipboardArg,
    /// Whether the client may send files into the guest user's Downloads (the pool's data loss
    /// prevention switch; the guest agent receives them: needs --device vsock). Enforced here.
    #[arg(long, value_enum, default_value_t = FileTransferArg::Allow)]
    pub file_transfer: FileTransferArg,
    /// Which of the client's USB devices may be redirected into the guest (the pool's policy;
    /// the guest agent attaches them to vhci-hcd: needs --device vsock): `none`, `all`, or a
    /// comma-separated list of `class=HH` (a USB class in hex: every class of the device must
    /// be listed) and `VVVV:PPPP` (a vendor and product id in hex), e.g.
    /// `class=03,class=0b,0525:a4a5`. Enforced here, whatever the client or the guest does.
    #[arg(long, default_value = "none", value_parser = parse_usb_policy)]
    pub usb: pleiades_protocol::usb::UsbPolicy,
    /// Keep the session certificate in this directory (made once; a host's VMs share it, so
    /// the broker pins one fingerprint). Default: a fresh certificate per run.
    #[arg(long, requires = "listen")]
    pub tls_identity: Option<PathBuf>,
    /// No VM: a synthetic desktop drawn by the host through a real GPU device (for protocol
    /// benchmarks): idle, typing, scroll, video or motion. Use with --listen.
    #[arg(long, conflicts_with_all = ["kernel", "initrd", "devices", "disks", "net"])]
    pub synthetic: Option<pleiades_session::synthetic::Workload>,
    /// The share of one CPU core (percent) this desktop's H.264 encoding may use: past it, the
    /// video region's frame rate drops, then its quality; typing and text are never held back
    /// (docs/host.md, "The encoder's CPU budget"). 0: no limit.
    #[arg(long, default_value_t = DEFAULT_ENCODER_CPU_BUDGET)]
    pub encoder_cpu_budget: u32,
    /// The synthetic desktop's size.
    #[arg(long, default_value = "1920x1080", value_parser = parse_layout)]
    pub synthetic_size: Layout,
}

/// Whether this machine's KVM is hardware-backed (the CPU has vmx or svm), which makes
/// Pleiades' VMM the default.
pub fn hardware_kvm() -> bool {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    pleiades_vmm::accel::has_hardware_virtualization(&cpuinfo)
}

/// The VMM `run` uses when `--vmm` is not given.
pub fn default_vmm() -> Vmm {
    if hardware_kvm() { Vmm::Pleiades } else { Vmm::Qemu }
}

/// Who runs the vCPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Vmm {
    /// Pleiades' own VMM on KVM.
    Pleiades,
    /// QEMU with Pleiades' devices attached over vhost-user.
    Qemu,
}

/// Monitor sizes, left to right.
#[derive(Debug, Clone)]
pub struct Layout(pub Vec<(u32, u32)>);

pub fn parse_layout(s: &str) -> Result<Layout, String> {
    s.split(',')
        .map(|size| {
            let (w, h) =
                size.trim().split_once(['x', 'X']).ok_or_else(|| format!("{size:?} is not WIDTHxHEIGHT"))?;
            let parse = |v: &str| v.parse::<u32>().map_err(|_| format!("{size:?} is not WIDTHxHEIGHT"));
            Ok((parse(w)?, parse(h)?))
        })
        .collect::<Result<_, _>>()
        .map(Layout)
}

/// `--file-transfer`: whether files may go into the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FileTransferArg {
    Allow,
    Deny,
}

fn parse_usb_policy(text: &str) -> Result<pleiades_protocol::usb::UsbPolicy, String> {
    pleiades_protocol::usb::UsbPolicy::parse(text)
}

/// `--clipboard`: the directions the clipboard may carry content.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ClipboardArg {
    /// Copy and paste both ways.
    Both,
    /// Only what is copied on the client may be pasted in the desktop.
    ToGuest,
    /// Only what is copied in the desktop may be pasted on the client.
    FromGuest,
    /// No clipboard sharing.
    None,
}

impl ClipboardArg {
    pub fn policy(self) -> pleiades_protocol::clipboard::ClipboardPolicy {
        use pleiades_protocol::clipboard::ClipboardPolicy;
        match self {
            ClipboardArg::Both => ClipboardPolicy::BOTH,
            ClipboardArg::ToGuest => ClipboardPolicy { to_guest: true, from_guest: false },
            ClipboardArg::FromGuest => ClipboardPolicy { to_guest: false, from_guest: true },
            ClipboardArg::None => ClipboardPolicy::NONE,
        }
    }
}
