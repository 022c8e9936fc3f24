//! One VM process, whichever VMM runs the vCPUs, and what it is asked for.
//!
//! - [`native`]: `--vmm pleiades`, Pleiades' own VMM ([`pleiades_vmm`]) with the devices
//!   in-process or in device processes;
//! - [`qemu`]: `--vmm qemu`, QEMU with Pleiades' devices attached over vhost-user, and
//!   [`qemu_display`], host-initiated display changes through QEMU's D-Bus display, and
//!   [`qmp`], QEMU's machine protocol;
//! - [`device_process`]: `pleiades-host device <kind>` processes, which either VMM starts;
//! - [`device_thread`]: the GPU, sound and vsock served over vhost-user from this process;
//! - [`agent`]: the guest agent's link over the guest's vsock, and [`usb`], the streams of the
//!   USB devices redirected into the guest;
//! - [`disk`]: virtio-blk disks, served by QEMU's block layer under either VMM;
//! - [`net`]: the NIC, on QEMU's user-mode network in the desktop's network namespace;
//! - here: the `--device` requests both take.

pub mod agent;
pub mod device_process;
pub mod device_thread;
pub mod disk;
pub mod native;
pub mod net;
pub mod qemu;
pub mod qemu_display;
pub mod qmp;
pub mod usb;

use std::str::FromStr;

pub use pleiades_virtio::DeviceKind;
use pleiades_virtio::gpu::GpuConfig;

pub use pleiades_vmm::SerialOut;

/// Where a device's queues are served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Serving {
    /// A worker thread inside the VMM process (Pleiades' VMM only).
    InProcess,
    /// A separate `pleiades-host device` process over vhost-user.
    VhostUser,
}

/// A `--device KIND[,backend=in-process|vhost-user][,heads=N][,memory-mib=M]` argument.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceRequest {
    pub kind: DeviceKind,
    /// `None`: the VMM's default (in-process for Pleiades' VMM, vhost-user for QEMU).
    pub serving: Option<Serving>,
    /// gpu: the number of monitors (scanouts), 1 to 16.
    pub heads: Option<u32>,
    /// gpu: the host memory the guest may make the GPU allocate, in MiB.
    pub memory_mib: Option<u32>,
}

impl DeviceRequest {
    pub fn new(kind: DeviceKind) -> Self {
        Self { kind, serving: None, heads: None, memory_mib: None }
    }

    /// The GPU's setup from `heads` and `memory-mib`.
    pub fn gpu_config(&self) -> GpuConfig {
        let mut config = GpuConfig::default();
        if let Some(heads) = self.heads {
            config.scanouts = heads;
        }
        if let Some(mib) = self.memory_mib {
            config.limits.memory_bytes = u64::from(mib) << 20;
        }
        config
    }
}

impl FromStr for DeviceRequest {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut parts = s.split(',');
        let kind: DeviceKind = parts.next().unwrap_or_default().parse()?;
        let mut request = Self::new(kind);
        let number = |key: &str, value: &str, range: std::ops::RangeInclusive<u32>| {
            value.parse::<u32>().ok().filter(|n| range.contains(n)).ok_or_else(|| {
                format!("{key}={value:?}: give a number from {} to {}", range.start(), range.end())
            })
        };
        for option in parts {
            match option.split_once('=') {
                Some(("backend", "in-process")) => request.serving = Some(Serving::InProcess),
                Some(("backend", "vhost-user")) => request.serving = Some(Serving::VhostUser),
                Some(("heads", v)) if kind == DeviceKind::Gpu => {
                    request.heads = Some(number("heads", v, 1..=16)?)
                }
                Some(("memory-mib", v)) if kind == DeviceKind::Gpu => {
                    request.memory_mib = Some(number("memory-mib", v, 16..=65536)?);
                }
                _ => {
                    let gpu = if kind == DeviceKind::Gpu { ", heads=N, memory-mib=M" } else { "" };
                    return Err(format!(
                        "unknown {kind} option {option:?}; use backend=in-process or backend=vhost-user{gpu}"
                    ));
                }
            }
        }
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_arguments() {
        assert_eq!("rng".parse::<DeviceRequest>(), Ok(DeviceRequest::new(DeviceKind::Rng)));
        assert_eq!(
            "console,backend=in-process".parse::<DeviceRequest>(),
            Ok(DeviceRequest {
                serving: Some(Serving::InProcess),
                ..DeviceRequest::new(DeviceKind::Console)
            })
        );
        assert_eq!(
            "gpu,heads=2,memory-mib=64".parse::<DeviceRequest>(),
            Ok(DeviceRequest { heads: Some(2), memory_mib: Some(64), ..DeviceRequest::new(DeviceKind::Gpu) })
        );
        assert!("gpu,heads=17".parse::<DeviceRequest>().unwrap_err().contains("1 to 16"));
        assert!("rng,heads=2".parse::<DeviceRequest>().is_err(), "heads is a gpu option");
        assert!("speaker".parse::<DeviceRequest>().unwrap_err().contains("known: rng"));
        assert_eq!("snd".parse::<DeviceRequest>(), Ok(DeviceRequest::new(DeviceKind::Sound)));
        assert!("rng,fast".parse::<DeviceRequest>().is_err());
        assert_eq!("stdio".parse::<SerialOut>(), Ok(SerialOut::Stdio));
        assert_eq!("/tmp/s".parse::<SerialOut>(), Ok(SerialOut::File("/tmp/s".into())));
        assert!("".parse::<SerialOut>().is_err());
    }
}
