//! Each desktop's jail as the daemon sets it up ([`crate::jail`]): the desktop's own user
//! (`--jail-uid-base` + its port's offset in `--ports`, so two running desktops never share
//! one), the files it may see, its cgroup's limits, and the clean-up when its VM ends.

use std::path::{Path, PathBuf};

use pleiades_protocol::hostapi::VmImage;

use crate::jail::cgroup::{CgroupSpec, Version};
use crate::jail::{Bind, ETC_FILES, JailSpec, SESSION_SOCKET_FD, seccomp};

/// Memory a desktop's processes may use beyond its guest RAM (device backends, the session
/// server and its encoder, QEMU's own, TCG's translation cache).
const MEMORY_OVERHEAD_MIB: u64 = 1536;
/// Processes and threads per desktop.
const PIDS_MAX: u64 = 1024;
/// The jail's `/tmp` (vhost-user and QMP sockets live there).
const TMP_MIB: u64 = 64;
/// The environment a VM process keeps (the daemon's own value, when it has one).
const KEPT_ENV: &[&str] =
    &["PLEIADES_LOG", "RUST_BACKTRACE", "PLEIADES_QEMU", "PLEIADES_QEMU_STORAGE_DAEMON"];

/// How the daemon jails its desktops.
#[derive(Debug, Clone)]
pub struct JailSettings {
    /// The first desktop's user and group id.
    pub uid_base: u32,
    /// The cgroup hierarchy and the daemon's group in it; `None`: no limits (none usable).
    pub cgroup: Option<(Version, PathBuf)>,
}

impl JailSettings {
    /// Ends what an earlier daemon with this state directory left: the cgroups (and their
    /// processes) of `desktops`, the ids of its desktops' directories. Other daemons' groups
    /// under the same parent are theirs.
    pub fn clean_stale<'a>(&self, desktops: impl IntoIterator<Item = &'a str>) {
        let Some((version, parent)) = &self.cgroup else { return };
        let spec = CgroupSpec {
            version: *version,
            parent: parent.clone(),
            memory_max: 0,
            cpu_quota_us: 0,
            pids_max: 0,
        };
        for desktop in desktops {
            if spec.dirs(desktop).iter().any(|d| d.exists()) {
                tracing::warn!(desktop, "removing the cgroup an earlier daemon left");
                if let Err(e) = spec.remove(desktop) {
                    tracing::warn!(desktop, "{e:#}");
                }
            }
        }
    }
}

/// What one desktop's jail is made from.
#[derive(Debug)]
pub struct DesktopJail<'a> {
    pub settings: &'a JailSettings,
    pub exe: &'a Path,
    pub desktop_id: &'a str,
    /// Offset of the desktop's port in the range: its user is `uid_base + slot`.
    pub slot: u32,
    pub image: &'a VmImage,
    /// The desktop's directory (logs, sockets, its copy of the session certificate).
    pub dir: &'a Path,
    /// The desktop's disk overlay and the template it stacks on.
    pub disk: Option<(&'a Path, Option<PathBuf>)>,
    /// The desktop's network namespace.
    pub netns: Option<&'a str>,
    pub vmm_is_qemu: bool,
    /// Where the jail's root is built (an empty directory).
    pub root: PathBuf,
    /// The host's session certificate and key (`STATE_DIR/tls`): the desktop gets a copy its
    /// user can read, in `DIR/tls`.
    pub tls: &'a Path,
}

impl DesktopJail<'_> {
    pub fn uid(&self) -> u32 {
        self.settings.uid_base + self.slot
    }

    /// The spec, with the desktop's files given to its user.
    pub fn prepare(&self) -> Result<JailSpec, String> {
        let uid = self.uid();
        let owner = Some(nix::unistd::Uid::from_raw(uid));
        let group = Some(nix::unistd::Gid::from_raw(uid));
        let chown = |path: &Path| {
            nix::unistd::chown(path, owner, group)
                .map_err(|e| format!("cannot give {} to the desktop's user {uid}: {e}", path.display()))
        };
        self.copy_tls()?;
        chown(self.dir)?;
        for entry in std::fs::read_dir(self.dir).map_err(|e| e.to_string())?.flatten() {
            chown(&entry.path())?;
        }
        for entry in std::fs::read_dir(self.dir.join("tls")).map_err(|e| e.to_string())?.flatten() {
            chown(&entry.path())?;
        }
        std::fs::create_dir_all(&self.root)
            .map_err(|e| format!("cannot make {}: {e}", self.root.display()))?;
        let mut binds = vec![Bind::ro(self.exe), Bind::rw(self.dir), Bind::ro(&self.image.kernel)];
        if !self.image.initrd.is_empty() {
            binds.push(Bind::ro(&self.image.initrd));
        }
        if let Some((overlay, template)) = &self.disk {
            chown(overlay)?;
            binds.push(Bind::rw(*overlay));
            if let Some(template) = template {
                binds.push(Bind::ro(template));
            }
        }
        for file in ETC_FILES {
            if Path::new(file).exists() {
                binds.push(Bind::ro(*file));
            }
        }
        // QEMU's DNS forwarder reads resolv.conf: the namespace's own where it has one.
        let resolv = self
            .netns
            .map(|ns| Path::new("/etc/netns").join(ns).join("resolv.conf"))
            .filter(|p| p.exists())
            .unwrap_or_else(|| "/etc/resolv.conf".into());
        if resolv.exists() {
            binds.push(Bind { source: resolv, target: "/etc/resolv.conf".into(), writable: false });
        }
        let memory_mib = u64::try_from(self.image.memory_mib).unwrap_or(0) + MEMORY_OVERHEAD_MIB;
        // The vCPUs and one core more for the devices and the session (TCG's threads too).
        let cores = u64::try_from(self.image.vcpus).unwrap_or(1) + 1;
        let cgroup = self.settings.cgroup.as_ref().map(|(version, parent)| CgroupSpec {
            version: *version,
            parent: parent.clone(),
            memory_max: memory_mib << 20,
            cpu_quota_us: cores * 100_000,
            pids_max: PIDS_MAX,
        });
        if let Some(cgroup) = &cgroup {
            // A group left by this desktop's previous process.
            cgroup.remove(self.desktop_id).map_err(|e| format!("{e:#}"))?;
        }
        let env =
            KEPT_ENV.iter().filter_map(|k| std::env::var(k).ok().map(|v| ((*k).to_owned(), v))).collect();
        Ok(JailSpec {
            name: self.desktop_id.to_owned(),
            uid,
            gid: uid,
            root: self.root.clone(),
            binds,
            kvm: Path::new("/dev/kvm").exists(),
            netns: self.netns.map(|ns| Path::new("/run/netns").join(ns)),
            cgroup,
            cwd: self.dir.to_owned(),
            env,
            keep_fds: vec![SESSION_SOCKET_FD],
            seccomp: Some(if self.vmm_is_qemu { seccomp::Kind::VmQemu } else { seccomp::Kind::VmPleiades }),
            tmp_mib: TMP_MIB,
            // Recording the allowlists (docs/security.md): `PLEIADES_JAIL_RECORD=DIR`.
            record_to: std::env::var_os("PLEIADES_JAIL_RECORD").map(PathBuf::from),
        })
    }
}

impl DesktopJail<'_> {
    /// `DIR/tls`: a copy of the host's certificate and key (0400 files in a 0700 directory).
    fn copy_tls(&self) -> Result<(), String> {
        use std::os::unix::fs::PermissionsExt;
        let to = self.dir.join("tls");
        let error =
            |e: std::io::Error| format!("cannot copy the session certificate to {}: {e}", to.display());
        std::fs::create_dir_all(&to).map_err(error)?;
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o700)).map_err(error)?;
        for entry in std::fs::read_dir(self.tls).map_err(error)?.flatten() {
            let target = to.join(entry.file_name());
            let _ = std::fs::remove_file(&target);
            std::fs::copy(entry.path(), &target).map_err(error)?;
            std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o400)).map_err(error)?;
        }
        Ok(())
    }
}

/// Removes a desktop's cgroup and jail root when its VM process is forgotten.
#[derive(Debug)]
pub struct JailCleanup {
    pub desktop_id: String,
    pub cgroup: Option<CgroupSpec>,
    pub root: PathBuf,
}

impl Drop for JailCleanup {
    fn drop(&mut self) {
        if let Some(cgroup) = &self.cgroup
            && let Err(e) = cgroup.remove(&self.desktop_id)
        {
            tracing::warn!(desktop = %self.desktop_id, "{e:#}");
        }
        let _ = std::fs::remove_dir(&self.root);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serve::identity::{CERT_FILE, HostIdentity, KEY_FILE};

    /// The host's identity towards the broker sits in the state directory beside the session
    /// certificate's `tls/` and the desktops' directories: a desktop's jail shows neither it nor
    /// a directory above it, and its copy of `tls/` has only the session certificate.
    #[test]
    fn a_desktop_jail_never_sees_the_host_identity() {
        if !nix::unistd::Uid::effective().is_root() {
            eprintln!("skipped: preparing a jail gives its files to the desktop's user (needs root)");
            return;
        }
        let state = tempfile::tempdir().unwrap();
        let state = state.path();
        HostIdentity::load_or_create(state).unwrap();
        let session =
            pleiades_session::tls::Identity::load_or_create(&state.join("tls"), &["h".into()]).unwrap();
        let dir = state.join("desktops").join("d-1");
        std::fs::create_dir_all(&dir).unwrap();
        let kernel = state.join("vmlinuz");
        std::fs::write(&kernel, b"kernel").unwrap();
        let image = VmImage {
            id: String::new(),
            name: "i".into(),
            kernel: kernel.display().to_string(),
            initrd: String::new(),
            cmdline: String::new(),
            disk: None,
            disk_sha256: None,
            vcpus: 1,
            memory_mib: 256,
        };
        let settings = JailSettings { uid_base: 900_000, cgroup: None };
        let jail = DesktopJail {
            settings: &settings,
            exe: Path::new("/bin/true"),
            desktop_id: "d-1",
            slot: 0,
            image: &image,
            dir: &dir,
            disk: None,
            netns: None,
            vmm_is_qemu: false,
            root: state.join("jails").join("d-1"),
            tls: &state.join("tls"),
        };
        let spec = jail.prepare().unwrap();
        for file in [CERT_FILE, KEY_FILE] {
            let identity = state.join(file);
            for bind in &spec.binds {
                assert!(!identity.starts_with(&bind.source), "{} shows {}", bind.source.display(), file);
            }
        }
        let copied: Vec<_> =
            std::fs::read_dir(dir.join("tls")).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(copied.len(), 2, "{copied:?}");
        assert!(copied.iter().all(|f| f.to_string_lossy().starts_with("session-")), "{copied:?}");
        drop(session);
    }
}
