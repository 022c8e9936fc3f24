//! What `pleiades-host run` is asked for, independent of which VMM runs the vCPUs.

use std::path::PathBuf;
use std::str::FromStr;

pub use crate::vmm::SerialOut;

impl FromStr for SerialOut {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "" => Err("--serial needs `stdio`, `null` or a file path".into()),
            "stdio" => Ok(Self::Stdio),
            "null" => Ok(Self::Null),
            path => Ok(Self::File(PathBuf::from(path))),
        }
    }
}

/// Who serves a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceBackend {
    /// A worker thread inside the VMM process (Pleiades' VMM only).
    InProcess,
    /// A separate `pleiades-host device` process over vhost-user.
    VhostUser,
}

/// A `--device KIND[,backend=in-process|vhost-user]` argument.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceRequest {
    pub kind: &'static str,
    /// `None`: the VMM's default (in-process for Pleiades' VMM, vhost-user for QEMU).
    pub backend: Option<DeviceBackend>,
}

/// Device kinds `pleiades-host run --device` knows.
pub const DEVICE_KINDS: &[&str] = &["rng", "console", "keyboard", "tablet"];

impl FromStr for DeviceRequest {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut parts = s.split(',');
        let name = parts.next().unwrap_or_default();
        let kind = DEVICE_KINDS
            .iter()
            .find(|k| **k == name)
            .copied()
            .ok_or_else(|| format!("unknown device {name:?}; known: {}", DEVICE_KINDS.join(", ")))?;
        let mut backend = None;
        for option in parts {
            backend = Some(match option {
                "backend=in-process" => DeviceBackend::InProcess,
                "backend=vhost-user" => DeviceBackend::VhostUser,
                other => {
                    return Err(format!(
                        "unknown device option {other:?}; use backend=in-process or backend=vhost-user"
                    ));
                }
            });
        }
        Ok(Self { kind, backend })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_arguments() {
        assert_eq!("rng".parse::<DeviceRequest>(), Ok(DeviceRequest { kind: "rng", backend: None }));
        assert_eq!(
            "console,backend=in-process".parse::<DeviceRequest>(),
            Ok(DeviceRequest { kind: "console", backend: Some(DeviceBackend::InProcess) })
        );
        assert!("gpu".parse::<DeviceRequest>().unwrap_err().contains("known: rng"));
        assert!("rng,fast".parse::<DeviceRequest>().is_err());
        assert_eq!("stdio".parse::<SerialOut>(), Ok(SerialOut::Stdio));
        assert_eq!("/tmp/s".parse::<SerialOut>(), Ok(SerialOut::File("/tmp/s".into())));
        assert!("".parse::<SerialOut>().is_err());
    }
}
