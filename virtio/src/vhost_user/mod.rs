//! Serving a [`VirtioDevice`](crate::VirtioDevice) as a vhost-user backend.
//!
//! `pleiades-host device <kind> --socket PATH` runs one device in its own process (the process
//! isolation crosvm and cloud-hypervisor use). Its frontend is Pleiades' VMM or stock QEMU
//! (`-chardev socket,id=c,path=PATH -device vhost-user-rng-pci,chardev=c`). The device code is
//! the same as in-process; only who owns the queues changes: here the `vhost-user-backend`
//! crate maps the guest memory the frontend shares and calls [`VhostUserDevice`] when a queue
//! is kicked.

mod backend;

pub use backend::{VhostUserDevice, serve};
