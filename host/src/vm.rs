//! What `pleiades-host run` is asked for, independent of which VMM runs the vCPUs.

use std::str::FromStr;

use pleiades_virtio::gpu::GpuConfig;

pub use pleiades_vmm::SerialOut;

/// Who serves a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceBackend {
    /// A worker thread inside the VMM process (Pleiades' VMM only).
    InProcess,
    /// A separate `pleiades-host device` process over vhost-user.
    VhostUser,
}

/// A `--device KIND[,backend=in-process|vhost-user][,heads=N][,memory-mib=M]` argument.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceRequest {
    pub kind: &'static str,
    /// `None`: the VMM's default (in-process for Pleiades' VMM, vhost-user for QEMU).
    pub backend: Option<DeviceBackend>,
    /// gpu: the number of monitors (scanouts), 1 to 16.
    pub heads: Option<u32>,
    /// gpu: the host memory the guest may make the GPU allocate, in MiB.
    pub memory_mib: Option<u32>,
}

impl DeviceRequest {
    pub fn new(kind: &'static str) -> Self {
        Self { kind, backend: None, heads: None, memory_mib: None }
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

/// Device kinds `pleiades-host run --device` knows.
pub const DEVICE_KINDS: &[&str] = &["rng", "console", "keyboard", "tablet", "mouse", "gpu", "sound"];

impl FromStr for DeviceRequest {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut parts = s.split(',');
        let name = match parts.next().unwrap_or_default() {
            "snd" => "sound",
            name => name,
        };
        let kind = DEVICE_KINDS
            .iter()
            .find(|k| **k == name)
            .copied()
            .ok_or_else(|| format!("unknown device {name:?}; known: {}", DEVICE_KINDS.join(", ")))?;
        let mut request = Self::new(kind);
        let number = |key: &str, value: &str, range: std::ops::RangeInclusive<u32>| {
            value.parse::<u32>().ok().filter(|n| range.contains(n)).ok_or_else(|| {
                format!("{key}={value:?}: give a number from {} to {}", range.start(), range.end())
            })
        };
        for option in parts {
            match option.split_once('=') {
                Some(("backend", "in-process")) => request.backend = Some(DeviceBackend::InProcess),
                Some(("backend", "vhost-user")) => request.backend = Some(DeviceBackend::VhostUser),
                Some(("heads", v)) if kind == "gpu" => request.heads = Some(number("heads", v, 1..=16)?),
                Some(("memory-mib", v)) if kind == "gpu" => {
                    request.memory_mib = Some(number("memory-mib", v, 16..=65536)?);
                }
                _ => {
                    let gpu = if kind == "gpu" { ", heads=N, memory-mib=M" } else { "" };
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
        assert_eq!("rng".parse::<DeviceRequest>(), Ok(DeviceRequest::new("rng")));
        assert_eq!(
            "console,backend=in-process".parse::<DeviceRequest>(),
            Ok(DeviceRequest { backend: Some(DeviceBackend::InProcess), ..DeviceRequest::new("console") })
        );
        assert_eq!(
            "gpu,heads=2,memory-mib=64".parse::<DeviceRequest>(),
            Ok(DeviceRequest { heads: Some(2), memory_mib: Some(64), ..DeviceRequest::new("gpu") })
        );
        assert!("gpu,heads=17".parse::<DeviceRequest>().unwrap_err().contains("1 to 16"));
        assert!("rng,heads=2".parse::<DeviceRequest>().is_err(), "heads is a gpu option");
        assert!("speaker".parse::<DeviceRequest>().unwrap_err().contains("known: rng"));
        assert_eq!("snd".parse::<DeviceRequest>(), Ok(DeviceRequest::new("sound")));
        assert!("rng,fast".parse::<DeviceRequest>().is_err());
        assert_eq!("stdio".parse::<SerialOut>(), Ok(SerialOut::Stdio));
        assert_eq!("/tmp/s".parse::<SerialOut>(), Ok(SerialOut::File("/tmp/s".into())));
        assert!("".parse::<SerialOut>().is_err());
    }
}
