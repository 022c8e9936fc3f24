//! The cgroup hierarchy the desktops' jails use (docs/security.md): a Debian 12 host has cgroup
//! v2 at /sys/fs/cgroup (systemd mounts it); a machine without one (a bare chroot, a container
//! without systemd) gets it mounted here, as its init would have: cgroup v2 when the kernel
//! gives it the memory controller, else the legacy v1 memory, cpu and pids hierarchies.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

const FS: &str = "/sys/fs/cgroup";

/// Whether /sys/fs/cgroup already has a hierarchy with the memory, cpu and pids controllers.
fn usable() -> bool {
    let fs = Path::new(FS);
    if let Ok(controllers) = std::fs::read_to_string(fs.join("cgroup.controllers")) {
        return ["memory", "cpu", "pids"].iter().all(|c| controllers.split_whitespace().any(|h| h == *c));
    }
    ["memory", "cpu", "pids"].iter().all(|c| fs.join(c).join("cgroup.procs").exists())
}

fn mount(args: &[&str]) -> bool {
    Command::new("mount").args(args).status().is_ok_and(|s| s.success())
}

/// Mounts a cgroup hierarchy where there is none. Needs root; changes nothing where one is.
pub fn ensure() -> Result<()> {
    if usable() {
        println!("    {FS} has the memory, cpu and pids controllers");
        return Ok(());
    }
    if !Path::new(FS).is_dir() {
        bail!("{FS} does not exist: is /sys mounted?");
    }
    let empty = std::fs::read_dir(FS).map(|mut d| d.next().is_none()).unwrap_or(false);
    if !empty {
        bail!(
            "{FS} has a cgroup hierarchy without the memory, cpu and pids controllers: the desktops' jails need them (docs/security.md)"
        );
    }
    if mount(&["-t", "cgroup2", "cgroup2", FS]) {
        if usable() {
            println!("    mounted cgroup v2 on {FS}");
            return Ok(());
        }
        // The kernel's controllers are bound to v1 hierarchies (the host uses them).
        let _ = Command::new("umount").arg(FS).status();
    }
    if !mount(&["-t", "tmpfs", "-o", "mode=0755", "cgroup", FS]) {
        bail!("cannot mount a tmpfs on {FS}");
    }
    for (dir, options) in [("memory", &["memory"][..]), ("cpu", &["cpu", "cpu,cpuacct"]), ("pids", &["pids"])]
    {
        let path = format!("{FS}/{dir}");
        std::fs::create_dir_all(&path).with_context(|| format!("cannot make {path}"))?;
        if !options.iter().any(|o| mount(&["-t", "cgroup", "-o", o, "cgroup", &path])) {
            bail!("cannot mount the cgroup v1 {dir} hierarchy on {path}");
        }
    }
    println!("    mounted the cgroup v1 memory, cpu and pids hierarchies under {FS}");
    Ok(())
}
