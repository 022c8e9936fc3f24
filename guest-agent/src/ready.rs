//! Guest facts and the `PLEIADES-READY` line.
//!
//! Everything is read through a root directory (normally `/`) so that tests can point it at a
//! fixture tree that mimics `/proc` and `/sys`.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The marker that starts the READY line on the serial console.
pub const READY_MARKER: &str = "PLEIADES-READY ";

/// What the guest reports once it is up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestInfo {
    /// Kernel release (`uname -r`).
    pub kernel: String,
    /// Online CPUs.
    pub cpus: u32,
    /// Memory the kernel manages (`MemTotal`), in MiB.
    pub memory_mib: u64,
    /// Virtio devices whose driver is bound, in bus order.
    pub devices: Vec<VirtioDevice>,
}

/// One virtio device with a bound driver.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioDevice {
    /// Device type by its virtio name: `rng`, `gpu`, `input`, `console`, ... (`id-N` if unknown).
    pub kind: String,
    /// The Linux driver bound to it, e.g. `virtio_rng`.
    pub driver: String,
    /// The transport address: a PCI address such as `0000:00:03.0`, or the bus name.
    pub address: String,
}

/// Why the guest facts could not be read.
#[derive(Debug, thiserror::Error)]
pub enum InfoError {
    #[error("cannot read {path}: {error}")]
    Read { path: PathBuf, error: io::Error },
    #[error("{path} has an unexpected format: {what}")]
    Format { path: PathBuf, what: String },
}

/// Why a READY line could not be parsed.
#[derive(Debug, thiserror::Error)]
pub enum ReadyLineError {
    #[error("no {READY_MARKER:?} marker in the line")]
    NoMarker,
    #[error("READY payload is not valid guest info JSON: {0}")]
    Json(#[from] serde_json::Error),
}

/// The virtio device-type names of the virtio 1.2 specification (section 5).
pub fn virtio_kind_name(device_id: u32) -> String {
    match device_id {
        1 => "net",
        2 => "block",
        3 => "console",
        4 => "rng",
        5 => "balloon",
        8 => "scsi",
        9 => "9p",
        16 => "gpu",
        18 => "input",
        19 => "vsock",
        20 => "crypto",
        24 => "mem",
        25 => "sound",
        26 => "fs",
        27 => "pmem",
        _ => return format!("id-{device_id}"),
    }
    .to_owned()
}

impl GuestInfo {
    /// Reads the guest facts below `root` (`/` in the guest).
    pub fn collect(root: &Path) -> Result<Self, InfoError> {
        let kernel = read_trimmed(&root.join("proc/sys/kernel/osrelease"))?;
        let cpus_path = root.join("sys/devices/system/cpu/online");
        let cpus = parse_cpu_list(&read_trimmed(&cpus_path)?).ok_or_else(|| InfoError::Format {
            path: cpus_path.clone(),
            what: "expected a CPU list such as 0-3,5".into(),
        })?;
        let meminfo_path = root.join("proc/meminfo");
        let memory_kib = parse_mem_total_kib(&read(&meminfo_path)?).ok_or_else(|| InfoError::Format {
            path: meminfo_path.clone(),
            what: "no MemTotal line".into(),
        })?;
        let devices = virtio_devices(&root.join("sys/bus/virtio/devices"))?;
        Ok(Self { kernel, cpus, memory_mib: memory_kib / 1024, devices })
    }

    /// The one line printed on the serial console: `PLEIADES-READY {json}`.
    pub fn ready_line(&self) -> String {
        // Serializing plain strings and integers cannot fail.
        let json = serde_json::to_string(self).unwrap_or_default();
        format!("{READY_MARKER}{json}")
    }
}

/// Finds a READY line in a line of console output (which may carry other text before it).
pub fn parse_ready_line(line: &str) -> Result<GuestInfo, ReadyLineError> {
    let start = line.find(READY_MARKER).ok_or(ReadyLineError::NoMarker)?;
    let payload = line[start + READY_MARKER.len()..].trim();
    Ok(serde_json::from_str(payload)?)
}

fn read(path: &Path) -> Result<String, InfoError> {
    fs::read_to_string(path).map_err(|error| InfoError::Read { path: path.to_owned(), error })
}

fn read_trimmed(path: &Path) -> Result<String, InfoError> {
    Ok(read(path)?.trim().to_owned())
}

/// Counts the CPUs in a kernel CPU list (`0-3,6,8-9`).
fn parse_cpu_list(list: &str) -> Option<u32> {
    let mut count = 0u32;
    for part in list.split(',').filter(|p| !p.is_empty()) {
        count += match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (u32, u32) = (a.parse().ok()?, b.parse().ok()?);
                b.checked_sub(a)?.checked_add(1)?
            }
            None => {
                part.parse::<u32>().ok()?;
                1
            }
        };
    }
    (count > 0).then_some(count)
}

fn parse_mem_total_kib(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn virtio_devices(bus: &Path) -> Result<Vec<VirtioDevice>, InfoError> {
    let entries = match fs::read_dir(bus) {
        Ok(entries) => entries,
        // No virtio bus at all: a guest without virtio devices.
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(error) => return Err(InfoError::Read { path: bus.to_owned(), error }),
    };
    let mut names: Vec<String> =
        entries.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    // virtio0, virtio1, ..., virtio10: order by the number, not the string.
    names.sort_by_key(|n| (n.trim_start_matches("virtio").parse::<u64>().unwrap_or(u64::MAX), n.clone()));

    let mut devices = Vec::new();
    for name in names {
        let dir = bus.join(&name);
        // Only devices whose driver bound count.
        let Ok(driver) = fs::read_link(dir.join("driver")) else { continue };
        let id_path = dir.join("device");
        let id_text = read_trimmed(&id_path)?;
        let id =
            u32::from_str_radix(id_text.trim_start_matches("0x"), 16).map_err(|_| InfoError::Format {
                path: id_path.clone(),
                what: format!("device id {id_text:?} is not hexadecimal"),
            })?;
        // The device directory is a link into the device tree: its parent is the transport
        // device (a PCI function for virtio-pci).
        let address = fs::read_link(&dir)
            .ok()
            .and_then(|target| {
                target.parent().and_then(|p| p.file_name()).map(|n| n.to_string_lossy().into_owned())
            })
            .unwrap_or_else(|| name.clone());
        devices.push(VirtioDevice { kind: virtio_kind_name(id), driver: file_name(&driver), address });
    }
    Ok(devices)
}

fn file_name(path: &Path) -> String {
    path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn write(root: &Path, rel: &str, text: &str) {
        let path = root.join(rel);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, text).unwrap();
    }

    /// Builds a tree shaped like the guest's /proc and /sys with two bound devices and one
    /// device without a driver.
    fn fixture() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        write(root, "proc/sys/kernel/osrelease", "6.12.117+deb13-amd64\n");
        write(root, "sys/devices/system/cpu/online", "0-1\n");
        write(root, "proc/meminfo", "MemTotal:         498116 kB\nMemFree: 1 kB\n");
        for (n, pci, id, driver) in [
            (0, "0000:00:02.0", "0x0010", Some("virtio_gpu")),
            (1, "0000:00:03.0", "0x0004", None),
            (10, "0000:00:04.0", "0x0004", Some("virtio_rng")),
        ] {
            let dev = root.join(format!("sys/devices/pci0000:00/{pci}/virtio{n}"));
            write(&dev, "device", id);
            if let Some(driver) = driver {
                let drv = root.join(format!("sys/bus/virtio/drivers/{driver}"));
                fs::create_dir_all(&drv).unwrap();
                symlink(&drv, dev.join("driver")).unwrap();
            }
            fs::create_dir_all(root.join("sys/bus/virtio/devices")).unwrap();
            symlink(&dev, root.join(format!("sys/bus/virtio/devices/virtio{n}"))).unwrap();
        }
        dir
    }

    #[test]
    fn collects_bound_devices_in_bus_order() {
        let dir = fixture();
        let info = GuestInfo::collect(dir.path()).unwrap();
        assert_eq!(info.kernel, "6.12.117+deb13-amd64");
        assert_eq!(info.cpus, 2);
        assert_eq!(info.memory_mib, 486);
        let kinds: Vec<_> =
            info.devices.iter().map(|d| (d.kind.as_str(), d.driver.as_str(), d.address.as_str())).collect();
        assert_eq!(kinds, [("gpu", "virtio_gpu", "0000:00:02.0"), ("rng", "virtio_rng", "0000:00:04.0")]);
    }

    #[test]
    fn ready_line_round_trips_through_console_noise() {
        let info = GuestInfo::collect(fixture().path()).unwrap();
        let line = info.ready_line();
        assert!(line.starts_with("PLEIADES-READY {\"kernel\":"));
        let noisy = format!("\r[    4.1] random: crng init done{line}\r");
        assert_eq!(parse_ready_line(&noisy).unwrap(), info);
    }

    #[test]
    fn bad_input_is_an_error_not_a_panic() {
        assert!(matches!(parse_ready_line("login: "), Err(ReadyLineError::NoMarker)));
        assert!(matches!(parse_ready_line("PLEIADES-READY {\"kernel\":"), Err(ReadyLineError::Json(_))));
        let dir = fixture();
        write(dir.path(), "sys/devices/system/cpu/online", "3-1\n");
        assert!(matches!(GuestInfo::collect(dir.path()), Err(InfoError::Format { .. })));
        let empty = tempfile::tempdir().unwrap();
        let err = GuestInfo::collect(empty.path()).unwrap_err();
        assert!(err.to_string().contains("osrelease"), "{err}");
    }

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpu_list("0"), Some(1));
        assert_eq!(parse_cpu_list("0-3,6,8-9"), Some(7));
        assert_eq!(parse_cpu_list(""), None);
        assert_eq!(parse_cpu_list("x"), None);
        assert_eq!(parse_cpu_list("0-4294967295"), None);
        assert_eq!(virtio_kind_name(99), "id-99");
    }
}
