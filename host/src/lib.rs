//! Pleiades host: `pleiades-host run` (one VM process), `serve` (the host daemon), `ctl` and
//! `device`, around the crates that hold the parts:
//! [`pleiades_virtio`] (the devices), [`pleiades_vmm`] (Pleiades' own KVM VMM),
//! [`pleiades_control`] (VM control and the control socket).
//!
//! - [`display`]: encoding the GPU's scanouts for a client (lossless tiles, H.264 for motion).
//! - [`vm`]: one VM process: `--vmm pleiades` ([`vm::native`]) or `--vmm qemu` ([`vm::qemu`]),
//!   the `--device` requests, the device processes.
//! - [`session`]: the session server (QUIC): the desktop to one client, input back.
//! - [`serve`]: the host daemon (`serve --broker`): registers, heartbeats, runs the broker's
//!   desktops as VM processes.
//! - [`synthetic`]: synthetic desktops (`run --synthetic`) for protocol figures without a guest.
//! - [`run`]: the arguments of `pleiades-host run`, shared by the binary and the daemon.

pub mod display;
pub mod run;
pub mod serve;
pub mod session;
pub mod synthetic;
pub mod vm;
