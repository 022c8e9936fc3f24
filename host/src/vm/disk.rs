//! Disks: a virtio-blk device per `--disk FILE`, served by QEMU's block layer.
//!
//! Pleiades does not parse qcow2 itself: QEMU's block layer is the well-tested implementation
//! of the format (copy-on-write overlays on a read-only template, discard, flush). Under
//! `--vmm qemu` QEMU serves the disk itself (`-blockdev … -device virtio-blk-pci`); under
//! `--vmm pleiades` one `qemu-storage-daemon` process per VM exports every disk of the VM as a
//! vhost-user-blk backend, which the VMM attaches like its own vhost-user devices.
//!
//! Either way the guest's flush is honoured (the image is opened write-back with flushes
//! passed to the host: `cache.direct=off,cache.no-flush=off`), so data the guest has synced is
//! on the host's disk; discard (TRIM) punches holes in the image (`discard=unmap`), and
//! zeroed blocks are unmapped (`detect-zeroes=unmap`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// An image file's format, from its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskFormat {
    Qcow2,
    Raw,
}

impl DiskFormat {
    pub fn name(self) -> &'static str {
        match self {
            Self::Qcow2 => "qcow2",
            Self::Raw => "raw",
        }
    }

    /// qcow2 by its magic (`QFI\xfb`), raw otherwise.
    pub fn detect(path: &Path) -> std::io::Result<Self> {
        use std::io::Read;
        let mut magic = [0u8; 4];
        let mut file = std::fs::File::open(path)?;
        let n = file.read(&mut magic)?;
        Ok(if n == 4 && magic == *b"QFI\xfb" { Self::Qcow2 } else { Self::Raw })
    }
}

/// A `--disk FILE[,readonly]` argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskRequest {
    pub path: PathBuf,
    pub read_only: bool,
}

impl FromStr for DiskRequest {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        // A path may hold commas: only a trailing `,readonly` is an option.
        let (path, read_only) = match s.strip_suffix(",readonly") {
            Some(path) => (path, true),
            None => (s, false),
        };
        if path.is_empty() {
            return Err("--disk takes an image file (qcow2 or raw), optionally followed by ,readonly".into());
        }
        Ok(Self { path: path.into(), read_only })
    }
}

/// A disk checked before a VMM starts: the file exists and its format is known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    pub path: PathBuf,
    pub format: DiskFormat,
    pub read_only: bool,
}

impl Disk {
    pub fn open(request: &DiskRequest) -> Result<Self> {
        let path = std::path::absolute(&request.path)
            .with_context(|| format!("--disk {}", request.path.display()))?;
        let format = DiskFormat::detect(&path)
            .with_context(|| format!("cannot read the disk image {}", path.display()))?;
        Ok(Self { path, format, read_only: request.read_only })
    }

    /// The `-blockdev` values of this disk's protocol node and format node, named `id` (QEMU and
    /// qemu-storage-daemon take the same ones).
    pub fn blockdevs(&self, id: &str) -> [String; 2] {
        let read_only = if self.read_only { "on" } else { "off" };
        [
            format!(
                "driver=file,node-name={id}-file,filename={},cache.direct=off,cache.no-flush=off,discard=unmap,read-only={read_only}",
                qemu_opt(&self.path)
            ),
            format!(
                "driver={},node-name={id},file={id}-file,discard=unmap,detect-zeroes=unmap,read-only={read_only}",
                self.format.name()
            ),
        ]
    }

    /// QEMU's arguments for this disk as virtio-blk `index` (the guest's vda, vdb, …).
    pub fn qemu_args(&self, index: usize, cpus: u8) -> Vec<String> {
        let id = format!("disk{index}");
        let mut args = Vec::new();
        for blockdev in self.blockdevs(&id) {
            args.extend(["-blockdev".to_owned(), blockdev]);
        }
        args.push("-device".into());
        args.push(format!("virtio-blk-pci,drive={id},num-queues={cpus},serial=pleiades-{id}"));
        args
    }
}

/// Each disk's I/O counters from QEMU's `query-blockstats` answer, in disk order (`disk0`,
/// `disk1`, …): bytes and operations read and written, flushes (the guest's FLUSH requests,
/// which reach the host's disk as `fdatasync`) and discards.
pub fn io_counters(blockstats: &serde_json::Value) -> serde_json::Value {
    let mut disks: Vec<serde_json::Value> = blockstats
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .filter(|d| d["node-name"].as_str().is_some_and(|n| n.starts_with("disk")))
        .map(|d| {
            let s = &d["stats"];
            serde_json::json!({
                "node": d["node-name"],
                "rd_bytes": s["rd_bytes"],
                "wr_bytes": s["wr_bytes"],
                "rd_operations": s["rd_operations"],
                "wr_operations": s["wr_operations"],
                "flush_operations": s["flush_operations"],
                "unmap_operations": s["unmap_operations"],
            })
        })
        .collect();
    disks.sort_by(|a, b| a["node"].as_str().cmp(&b["node"].as_str()));
    serde_json::Value::Array(disks)
}

/// A path as the value of a QEMU `key=value,…` option: a comma is written twice.
pub fn qemu_opt(path: &Path) -> String {
    path.display().to_string().replace(',', ",,")
}

/// The qemu-storage-daemon binary (`PLEIADES_QEMU_STORAGE_DAEMON` overrides).
pub fn storage_daemon_binary() -> PathBuf {
    std::env::var_os("PLEIADES_QEMU_STORAGE_DAEMON")
        .map_or_else(|| "qemu-storage-daemon".into(), PathBuf::from)
}

/// One `qemu-storage-daemon` exporting a VM's disks over vhost-user-blk; ended with the VM.
#[derive(Debug)]
pub struct StorageDaemon {
    child: Child,
    /// One vhost-user socket per disk, in disk order.
    pub sockets: Vec<PathBuf>,
}

impl Drop for StorageDaemon {
    fn drop(&mut self) {
        // SIGTERM: the daemon flushes its images and ends.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl StorageDaemon {
    /// Starts the daemon with one export per disk (sockets in `dir`) and waits until every
    /// socket listens. `queues`: virtqueues per disk (one per vCPU, as QEMU gives virtio-blk).
    pub fn start(disks: &[Disk], dir: &Path, queues: u8) -> Result<Self> {
        let mut cmd = Command::new("setpriv");
        cmd.args(["--pdeathsig", "KILL", "--"]).arg(storage_daemon_binary());
        let mut sockets = Vec::new();
        for (i, disk) in disks.iter().enumerate() {
            let id = format!("disk{i}");
            for blockdev in disk.blockdevs(&id) {
                cmd.args(["--blockdev", &blockdev]);
            }
            let socket = dir.join(format!("{id}.blk.sock"));
            cmd.arg("--export").arg(format!(
                "type=vhost-user-blk,id={id}-export,node-name={id},addr.type=unix,addr.path={},writable={},num-queues={queues}",
                qemu_opt(&socket),
                if disk.read_only { "off" } else { "on" },
            ));
            sockets.push(socket);
        }
        cmd.stdin(Stdio::null());
        let child = cmd.spawn().with_context(|| {
            format!("cannot start {} (apt install qemu-utils)", storage_daemon_binary().display())
        })?;
        let mut daemon = Self { child, sockets };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !daemon.sockets.iter().all(|s| s.exists()) {
            if let Ok(Some(status)) = daemon.child.try_wait() {
                bail!("qemu-storage-daemon exited ({status}) before serving the disks");
            }
            if Instant::now() > deadline {
                bail!("qemu-storage-daemon did not serve the disks within 20 s");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(daemon)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_arguments() {
        assert_eq!(
            "/d/a.qcow2".parse::<DiskRequest>(),
            Ok(DiskRequest { path: "/d/a.qcow2".into(), read_only: false })
        );
        assert_eq!(
            "/d/a,b.raw,readonly".parse::<DiskRequest>(),
            Ok(DiskRequest { path: "/d/a,b.raw".into(), read_only: true })
        );
        assert!("".parse::<DiskRequest>().is_err());
        assert!(",readonly".parse::<DiskRequest>().is_err());
    }

    #[test]
    fn io_counters_come_from_query_blockstats() {
        let answer = serde_json::json!([
            {"device": "", "qdev": "/machine/peripheral-anon/device[1]/virtio-backend", "node-name": "disk1",
             "stats": {"rd_bytes": 1, "wr_bytes": 2, "rd_operations": 3, "wr_operations": 4, "flush_operations": 5, "unmap_operations": 6}},
            {"device": "", "qdev": "/machine/peripheral-anon/device[0]/virtio-backend", "node-name": "disk0",
             "stats": {"rd_bytes": 10, "wr_bytes": 20, "rd_operations": 30, "wr_operations": 40, "flush_operations": 50, "unmap_operations": 0}},
            {"device": "pflash0", "stats": {}},
        ]);
        let disks = io_counters(&answer);
        assert_eq!(disks.as_array().unwrap().len(), 2);
        assert_eq!(disks[0]["node"], "disk0");
        assert_eq!(disks[0]["flush_operations"], 50);
        assert_eq!(disks[1]["wr_bytes"], 2);
        assert_eq!(io_counters(&serde_json::json!({"error": "x"})), serde_json::json!([]));
    }

    #[test]
    fn formats_are_detected_by_content_and_commas_are_escaped() {
        let dir = tempfile::tempdir().unwrap();
        let qcow2 = dir.path().join("x,y.img");
        std::fs::write(&qcow2, b"QFI\xfb\0\0\0\x03").unwrap();
        let raw = dir.path().join("raw.qcow2");
        std::fs::write(&raw, [0u8; 512]).unwrap();
        assert_eq!(DiskFormat::detect(&qcow2).unwrap(), DiskFormat::Qcow2);
        assert_eq!(DiskFormat::detect(&raw).unwrap(), DiskFormat::Raw, "the name does not decide");
        let disk = Disk::open(&DiskRequest { path: qcow2.clone(), read_only: false }).unwrap();
        let args = disk.qemu_args(1, 2);
        assert!(args[1].contains(",,y.img,cache.direct=off,cache.no-flush=off,discard=unmap"), "{args:?}");
        assert!(args[3].starts_with("driver=qcow2,node-name=disk1,file=disk1-file"), "{args:?}");
        assert_eq!(args[5], "virtio-blk-pci,drive=disk1,num-queues=2,serial=pleiades-disk1");
        let missing = Disk::open(&DiskRequest { path: dir.path().join("none"), read_only: false });
        assert!(format!("{:#}", missing.unwrap_err()).contains("cannot read the disk image"));
    }
}
