//! virtio-vsock (virtio 1.2, 5.10): sockets between a guest and its own VM process.
//!
//! The guest agent talks to the VM process over vsock, as spice-vdagent talks to QEMU's SPICE
//! server over virtio-serial. The host end of every guest port lives in the VM's own process
//! ([`muxer::Muxer`], one per VM), never in a host-wide socket a guest could reach another VM
//! through.
//!
//! - [`packet`]: the packet header and operations.
//! - [`muxer`]: connections, credit-based flow control, resets and half-closes, sans I/O.
//! - [`device`]: the queues ([`Vsock`], a [`crate::VirtioDevice`]) and the VM process's end
//!   ([`VsockHandle`]).

pub mod device;
pub mod muxer;
pub mod packet;

pub use device::{Vsock, VsockHandle};
