//! Pleiades host: the VMM, the virtio devices and the host daemon.
//!
//! - [`devices`]: virtio devices written once against a transport-agnostic trait
//!   ([`devices::virtio::VirtioDevice`]) and served either in-process by the VMM
//!   ([`devices::virtio::worker`]) or as a vhost-user backend process ([`devices::vhost_user`]).

pub mod devices;
