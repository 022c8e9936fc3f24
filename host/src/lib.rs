//! Pleiades host: `pleiades-host run` (one VM process), `serve` (the host daemon), `ctl` and
//! `device`, around the crates that hold the parts:
//! [`pleiades_virtio`] (the devices), [`pleiades_vmm`] (Pleiades' own KVM VMM),
//! [`pleiades_control`] (VM control and the control socket), [`pleiades_session`] (the session
//! server, display encoders, synthetic desktops).
//!
//! - [`vm`]: one VM process: `--vmm pleiades` ([`vm::native`]) or `--vmm qemu` ([`vm::qemu`]),
//!   the `--device` requests, the device processes.
//! - [`serve`]: the host daemon (`serve --broker`): registers, heartbeats, runs the broker's
//!   desktops as VM processes.
//! - [`jail`]: the jail every desktop's processes run in (user, namespaces, root, cgroup,
//!   seccomp).
//! - [`run`]: the arguments of `pleiades-host run`, shared by the binary and the daemon.

pub mod jail;
pub mod run;
pub mod serve;
pub mod vm;
