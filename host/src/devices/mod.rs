//! Devices of the VMM.

pub mod vhost_user;
pub mod virtio;
