//! A desktop's cgroup: memory, CPU and process-count limits for all its processes.
//!
//! cgroup v2 where the host has it (Debian 12 and every current distribution): one group
//! `ROOT/desktop-<id>` under the daemon's root group (`/sys/fs/cgroup/pleiades` by default; under
//! systemd, point `--cgroup-root` into the unit's delegated subtree). Hosts still on the legacy
//! v1 hierarchies (as the machine these tests run on) get the same group in each of the
//! `memory`, `cpu` and `pids` hierarchies.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

/// Where the host's cgroup file system is.
pub const CGROUP_FS: &str = "/sys/fs/cgroup";

/// The hierarchy the host has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Version {
    V1,
    V2,
}

impl Version {
    /// The hierarchy of this host, if it has one with the controllers the jail uses.
    pub fn detect() -> Option<Self> {
        let fs = Path::new(CGROUP_FS);
        if let Ok(controllers) = std::fs::read_to_string(fs.join("cgroup.controllers")) {
            let have: Vec<&str> = controllers.split_whitespace().collect();
            return ["memory", "cpu", "pids"].iter().all(|c| have.contains(c)).then_some(Self::V2);
        }
        V1_CONTROLLERS.iter().all(|c| fs.join(c).join("cgroup.procs").exists()).then_some(Self::V1)
    }
}

/// The v1 hierarchies a jail joins.
const V1_CONTROLLERS: &[&str] = &["memory", "cpu", "pids"];

/// A desktop's cgroup and its limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CgroupSpec {
    pub version: Version,
    /// The daemon's group, relative to the hierarchy's root (`pleiades`).
    pub parent: PathBuf,
    /// Memory of all the desktop's processes together, guest RAM included (bytes).
    pub memory_max: u64,
    /// CPU time per 100 ms period, in µs (200 000: two cores).
    pub cpu_quota_us: u64,
    /// Processes and threads.
    pub pids_max: u64,
}

const CPU_PERIOD_US: u64 = 100_000;

impl CgroupSpec {
    /// The group's directories (one under v2, one per controller under v1).
    pub fn dirs(&self, name: &str) -> Vec<PathBuf> {
        let leaf = self.parent.join(format!("desktop-{name}"));
        match self.version {
            Version::V2 => vec![Path::new(CGROUP_FS).join(leaf)],
            Version::V1 => V1_CONTROLLERS.iter().map(|c| Path::new(CGROUP_FS).join(c).join(&leaf)).collect(),
        }
    }

    /// Makes the group (anew: a group left by an earlier process is emptied first by the
    /// daemon), sets its limits and moves this process into it.
    pub fn create_and_join(&self, name: &str) -> Result<()> {
        if self.parent.is_absolute() || self.parent.components().any(|c| c == std::path::Component::ParentDir)
        {
            bail!("the cgroup parent {} must be relative to {CGROUP_FS}", self.parent.display());
        }
        if self.version == Version::V2 {
            enable_controllers(&self.parent)?;
        }
        let pid = std::process::id().to_string();
        for dir in self.dirs(name) {
            std::fs::create_dir_all(&dir).with_context(|| format!("cannot make {}", dir.display()))?;
            for (file, value) in self.limits(&dir) {
                write(&dir.join(file), &value)?;
            }
            write(&dir.join("cgroup.procs"), &pid)?;
        }
        Ok(())
    }

    /// The files that hold the limits in `dir` (which controller's it is, under v1).
    fn limits(&self, dir: &Path) -> Vec<(&'static str, String)> {
        let cpu = format!("{} {CPU_PERIOD_US}", self.cpu_quota_us);
        match self.version {
            Version::V2 => vec![
                ("memory.max", self.memory_max.to_string()),
                ("memory.swap.max", "0".into()),
                ("cpu.max", cpu),
                ("pids.max", self.pids_max.to_string()),
            ],
            Version::V1 => {
                let controller = dir
                    .strip_prefix(CGROUP_FS)
                    .ok()
                    .and_then(|p| p.components().next())
                    .and_then(|c| c.as_os_str().to_str())
                    .unwrap_or("");
                match controller {
                    "memory" => vec![("memory.limit_in_bytes", self.memory_max.to_string())],
                    "cpu" => vec![
                        ("cpu.cfs_period_us", CPU_PERIOD_US.to_string()),
                        ("cpu.cfs_quota_us", self.cpu_quota_us.to_string()),
                    ],
                    "pids" => vec![("pids.max", self.pids_max.to_string())],
                    _ => vec![],
                }
            }
        }
    }

    /// Removes the group once its processes are gone (kills what is left first). Errors are
    /// the caller's to log.
    pub fn remove(&self, name: &str) -> Result<()> {
        for dir in self.dirs(name) {
            if !dir.exists() {
                continue;
            }
            kill_all(&dir);
            // The kernel frees the group when its last process is reaped: a few tries.
            let mut last = Ok(());
            for _ in 0..50 {
                last = std::fs::remove_dir(&dir);
                if last.is_ok() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            last.with_context(|| format!("cannot remove the cgroup {}", dir.display()))?;
        }
        Ok(())
    }
}

/// SIGKILLs every process of the group at `dir`.
fn kill_all(dir: &Path) {
    if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
        for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
            let _ =
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        }
    }
}

/// Turns on the memory, cpu and pids controllers from the root down to `parent`'s children.
fn enable_controllers(parent: &Path) -> Result<()> {
    let mut dir = PathBuf::from(CGROUP_FS);
    let mut levels = vec![dir.clone()];
    for component in parent.components() {
        dir.push(component);
        levels.push(dir.clone());
    }
    for level in levels {
        std::fs::create_dir_all(&level).with_context(|| format!("cannot make {}", level.display()))?;
        let enabled = std::fs::read_to_string(level.join("cgroup.subtree_control")).unwrap_or_default();
        let missing: Vec<String> = ["memory", "cpu", "pids"]
            .iter()
            .filter(|c| !enabled.split_whitespace().any(|e| e == **c))
            .map(|c| format!("+{c}"))
            .collect();
        if !missing.is_empty() {
            write(&level.join("cgroup.subtree_control"), &missing.join(" ")).context(
                "cannot enable the memory, cpu and pids controllers (a group with processes cannot have \
                 controlled children: give the daemon a --cgroup-root of its own)",
            )?;
        }
    }
    Ok(())
}

fn write(path: &Path, value: &str) -> Result<()> {
    std::fs::write(path, value).with_context(|| format!("cannot write {value:?} to {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(version: Version) -> CgroupSpec {
        CgroupSpec {
            version,
            parent: "pleiades".into(),
            memory_max: 1 << 30,
            cpu_quota_us: 150_000,
            pids_max: 256,
        }
    }

    #[test]
    fn v2_has_one_group_with_every_limit() {
        let s = spec(Version::V2);
        let dirs = s.dirs("d1");
        assert_eq!(dirs, vec![PathBuf::from("/sys/fs/cgroup/pleiades/desktop-d1")]);
        let limits = s.limits(&dirs[0]);
        assert!(limits.contains(&("memory.max", (1u64 << 30).to_string())));
        assert!(limits.contains(&("cpu.max", "150000 100000".into())));
        assert!(limits.contains(&("pids.max", "256".into())));
    }

    #[test]
    fn v1_has_a_group_per_controller_with_its_own_limit() {
        let s = spec(Version::V1);
        let dirs = s.dirs("d1");
        assert_eq!(dirs.len(), 3);
        let memory = s.limits(Path::new("/sys/fs/cgroup/memory/pleiades/desktop-d1"));
        assert_eq!(memory, vec![("memory.limit_in_bytes", (1u64 << 30).to_string())]);
        let cpu = s.limits(Path::new("/sys/fs/cgroup/cpu/pleiades/desktop-d1"));
        assert!(cpu.contains(&("cpu.cfs_quota_us", "150000".into())));
        let pids = s.limits(Path::new("/sys/fs/cgroup/pids/pleiades/desktop-d1"));
        assert_eq!(pids, vec![("pids.max", "256".into())]);
    }

    #[test]
    fn a_parent_outside_the_hierarchy_is_refused() {
        let mut s = spec(Version::V2);
        s.parent = "../../etc".into();
        assert!(s.create_and_join("d").unwrap_err().to_string().contains("relative"));
        s.parent = "/etc".into();
        assert!(s.create_and_join("d").unwrap_err().to_string().contains("relative"));
    }
}
