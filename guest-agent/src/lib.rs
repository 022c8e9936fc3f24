//! The Pleiades guest agent.
//!
//! It runs inside the desktop VM. Its first job is the boot handshake: once the guest's init
//! has loaded the device drivers, [`ready::GuestInfo::collect`] reads what the kernel reports
//! (release, CPUs, memory, the virtio devices whose drivers bound) and the agent prints it on
//! the serial console as one line, `PLEIADES-READY {json}`, that the host side parses with
//! [`ready::parse_ready_line`]. It also powers the guest off cleanly when the host presses the
//! virtual ACPI power button ([`power`]), draws the test and benchmark workloads
//! ([`workload`]), plays and records sound for the audio tests ([`sound`]) and measures block
//! devices for the disk benchmarks ([`disk`]).
//!
//! As a service (`pleiades-agent run`, [`service`]) it keeps a link to its VM process over
//! vsock: the guest's facts and session, the host's lock and power requests; its per-user
//! part (`pleiades-agent session`, [`session`]) reports the graphical session's idle time,
//! holds the guest end of the clipboard and writes the files the client sends into the user's
//! Downloads ([`files`]); the service attaches the USB devices the client redirects to the
//! kernel's `vhci-hcd` ([`usb`]).

pub mod disk;
pub mod files;
pub mod power;
pub mod ready;
pub mod service;
pub mod session;
pub mod sound;
pub mod usb;
pub mod workload;
