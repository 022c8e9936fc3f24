//! Pleiades host: the VMM, the virtio devices and the host daemon.
//!
//! - [`devices`]: virtio devices written once against a transport-agnostic trait
//!   ([`devices::virtio::VirtioDevice`]) and served either in-process by the VMM
//!   ([`devices::virtio::worker`]) or as a vhost-user backend process ([`devices::vhost_user`]).
//! - [`vmm`]: Pleiades' own KVM VMM: guest memory, direct kernel boot, vCPUs, legacy devices,
//!   PCI with MSI-X and the virtio-pci transport that drives the devices above.
//! - [`display`]: encoding the GPU's scanouts for a client (lossless tiles, H.264 for motion).
//! - [`config`]: the boot request, validated the same way for both VMMs.
//! - [`qemu`]: `--vmm qemu`, QEMU with Pleiades' devices attached over vhost-user.
//! - [`qemu_display`]: host-initiated display changes under `--vmm qemu`, through QEMU's D-Bus display.
//! - [`control`]: the control socket behind `pleiades-host ctl`; [`screenshot`]: PNGs of
//!   scanouts.
//! - [`session`]: the session server (QUIC): the desktop to one client, input back.
//! - [`serve`]: the host daemon (`serve --broker`): registers, heartbeats, runs the broker's
//!   desktops as VM processes.
//! - [`synthetic`]: synthetic desktops (`run --synthetic`) for protocol figures without a guest.
//! - [`run`]: the arguments of `pleiades-host run`, shared by the binary and the daemon.
//! - [`accel`]: whether KVM is hardware-backed here, which picks the default VMM.

pub mod accel;
pub mod backends;
pub mod config;
pub mod control;
pub mod devices;
#[cfg(feature = "session")]
pub mod display;
pub mod pleiades;
pub mod qemu;
pub mod qemu_display;
#[cfg(feature = "session")]
pub mod run;
pub mod screenshot;
#[cfg(feature = "session")]
pub mod serve;
#[cfg(feature = "session")]
pub mod session;
#[cfg(feature = "session")]
pub mod synthetic;
pub mod vm;
pub mod vmm;
