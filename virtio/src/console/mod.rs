//! virtio-console (virtio 1.2, 5.3) with a single port: queue 0 (receiveq) carries host input to
//! the guest, queue 1 (transmitq) carries guest output to the host. `VIRTIO_CONSOLE_F_MULTIPORT`
//! is not offered, so the driver binds `hvc0` to it.

mod device;

pub use device::Console;
