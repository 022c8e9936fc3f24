//! The jail every desktop's processes run in (`pleiades-host jail`), in the spirit of
//! Firecracker's jailer and crosvm's minijail.
//!
//! The host daemon runs as root; a desktop's VM process faces the internet (its session server)
//! and parses everything its guest writes. So the daemon starts each VM process as
//! `pleiades-host jail --spec JSON -- pleiades-host run …`, and the jail, still root:
//!
//! 1. puts itself into the desktop's cgroup (memory, CPU and process limits, [`cgroup`]);
//! 2. joins the desktop's network namespace (QEMU's user-mode network lives there), or makes an
//!    empty one; the session server's UDP socket is bound by the daemon on the host's network
//!    and handed over as a file descriptor, so the VM process needs no host network;
//! 3. unshares mount, IPC, UTS and PID namespaces;
//! 4. builds a root on a tmpfs that holds only what the desktop needs, each file at the path it
//!    has on the host (so no argument needs rewriting): the system's programs and libraries
//!    (`/usr`) read-only, a few files of `/etc`, the desktop's kernel, initrd and disk template
//!    read-only, its own directory and disk overlay writable, a `/dev` with `null`, `zero`,
//!    `full`, `random`, `urandom` (and `kvm` for Pleiades' VMM), a fresh `/proc` and `/tmp`;
//!    then `pivot_root`s into it (where `/` is not a mount point, as in a chroot, it moves the
//!    new root over `/` and chroots, as runc's `--no-pivot` does);
//! 5. forks: the child is PID 1 of the desktop's PID namespace; it drops to the desktop's own
//!    user and group (no supplementary groups), sets `no_new_privs` and the parent-death signal,
//!    keeps only the file descriptors it was given, installs the seccomp allowlist of its kind
//!    ([`seccomp`]) and execs the program with a cleared environment (`PATH` and what the spec
//!    names). The parent also drops to that user, sets `no_new_privs` and its own tiny seccomp
//!    allowlist, forwards SIGTERM/SIGINT/SIGHUP to the child and exits as the child did: it is
//!    what the daemon waits on and kills (the child and every process of the namespace die with
//!    it).
//!
//! Everything a VM process starts (device backends, QEMU, qemu-storage-daemon) inherits the
//! jail: the same user, namespaces, cgroup and filter (a child may add its own, narrower one:
//! QEMU runs with `-sandbox on`).

pub mod cgroup;
pub mod seccomp;
mod sys;

use std::ffi::{CString, OsString};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use nix::mount::{MsFlags, mount};
use nix::sched::CloneFlags;
use nix::sys::signal::{SigSet, Signal};
use nix::sys::stat::{Mode, SFlag};
use nix::unistd::{ForkResult, Gid, Pid, Uid};
use serde::{Deserialize, Serialize};

pub use sys::{pass_fd, take_fd};

/// The file descriptor the session server's socket is handed over as.
pub const SESSION_SOCKET_FD: i32 = 3;

/// What a jail is made of; the daemon writes it, `pleiades-host jail --spec` reads it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct JailSpec {
    /// The desktop's id: the UTS namespace's host name and the cgroup's name.
    pub name: String,
    /// The desktop's own user and group (no name needed: nothing else uses these numbers).
    pub uid: u32,
    pub gid: u32,
    /// An empty directory the root is built on (a tmpfs is mounted there).
    pub root: PathBuf,
    /// The files and directories the desktop may see, each at its own path.
    pub binds: Vec<Bind>,
    /// `/dev/kvm` in the jail (Pleiades' VMM).
    pub kvm: bool,
    /// The network namespace to join (`/run/netns/NAME`); `None`: a new, empty one.
    pub netns: Option<PathBuf>,
    /// The cgroup and its limits; `None`: none (the host has no cgroup hierarchy it can use).
    pub cgroup: Option<cgroup::CgroupSpec>,
    /// The working directory in the jail.
    pub cwd: PathBuf,
    /// Environment variables beyond `PATH` (the environment is cleared otherwise).
    pub env: Vec<(String, String)>,
    /// File descriptors kept open beyond 0, 1 and 2.
    pub keep_fds: Vec<i32>,
    /// The seccomp allowlist the program runs under.
    pub seccomp: Option<seccomp::Kind>,
    /// The size of the jail's `/tmp` (MiB).
    pub tmp_mib: u64,
    /// Recording allowlists (docs/security.md): no filter; the program runs under
    /// `strace -f`, which writes into this directory (shown in the jail at its own path).
    #[serde(default)]
    pub record_to: Option<PathBuf>,
}

/// A file or directory of the host, seen in the jail at `target` (usually its own path).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Bind {
    pub source: PathBuf,
    pub target: PathBuf,
    pub writable: bool,
}

impl Bind {
    /// `path` at its own path, read-only.
    pub fn ro(path: impl Into<PathBuf>) -> Self {
        let path = path.into();
        Self { source: path.clone(), target: path, writable: false }
    }
    /// `path` at its own path, writable.
    pub fn rw(path: impl Into<PathBuf>) -> Self {
        Self { writable: true, ..Self::ro(path) }
    }
}

/// The `PATH` of jailed programs.
pub const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The system's programs and libraries, read-only (a merged-/usr system's `/bin`, `/lib`… are
/// links into `/usr`, kept as links).
pub const SYSTEM_DIRS: &[&str] = &["/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"];

/// The files of `/etc` a VM process reads (the dynamic loader's cache, name resolution for
/// QEMU's DNS forwarder, time zone); nothing else of `/etc` (no passwords, no keys).
pub const ETC_FILES: &[&str] = &[
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/nsswitch.conf",
    "/etc/hosts",
    "/etc/host.conf",
    "/etc/localtime",
    "/etc/gai.conf",
];

/// Character devices of the jail's `/dev`: name, major, minor, mode.
const DEVICES: &[(&str, u64, u64, u32)] = &[
    ("null", 1, 3, 0o666),
    ("zero", 1, 5, 0o666),
    ("full", 1, 7, 0o666),
    ("random", 1, 8, 0o666),
    ("urandom", 1, 9, 0o666),
];

/// `pleiades-host jail`: builds the jail of `spec` and runs `program` in it; returns the exit
/// code to end with (the program's, or 128 + the signal that killed it). Must be called while
/// the process has one thread (it forks).
pub fn enter(spec: &JailSpec, program: &[OsString]) -> Result<i32> {
    if program.is_empty() {
        bail!("no program to run in the jail");
    }
    if !Uid::effective().is_root() {
        bail!(
            "the jail needs root (it makes namespaces, a cgroup and mounts); run the host daemon as root, or with --jail off"
        );
    }
    if spec.uid == 0 || spec.gid == 0 {
        bail!("a jail never runs as root (uid {} gid {})", spec.uid, spec.gid);
    }
    sys::check_single_threaded()?;
    if let Some(cgroup) = &spec.cgroup {
        cgroup.create_and_join(&spec.name).context("cannot put the jail into its cgroup")?;
    }
    match &spec.netns {
        Some(path) => {
            let ns = std::fs::File::open(path)
                .with_context(|| format!("cannot open the network namespace {}", path.display()))?;
            nix::sched::setns(ns, CloneFlags::CLONE_NEWNET)
                .with_context(|| format!("cannot join the network namespace {}", path.display()))?;
        }
        None => nix::sched::unshare(CloneFlags::CLONE_NEWNET).context("cannot make a network namespace")?,
    }
    nix::sched::unshare(
        CloneFlags::CLONE_NEWNS
            | CloneFlags::CLONE_NEWIPC
            | CloneFlags::CLONE_NEWUTS
            | CloneFlags::CLONE_NEWPID,
    )
    .context("cannot make the jail's namespaces")?;
    nix::unistd::sethostname(&spec.name).context("cannot set the jail's host name")?;
    build_root(spec).context("cannot build the jail's root")?;
    let filter = spec.seccomp.filter(|_| spec.record_to.is_none()).map(seccomp::Kind::filter).transpose()?;
    let waiter_filter = seccomp::Kind::Waiter.filter()?;
    let mut program = program.to_vec();
    if let Some(dir) = &spec.record_to {
        let out = dir.join(format!("{}.{}.strace", spec.name, std::process::id()));
        let mut traced: Vec<OsString> =
            vec!["/usr/bin/strace".into(), "-f".into(), "-qq".into(), "-o".into()];
        traced.push(out.into());
        traced.push("--".into());
        traced.extend(program);
        program = traced;
    }
    let exe = &program[0];
    let argv: Vec<CString> = program.iter().map(|a| cstring(a.as_bytes())).collect::<Result<_>>()?;
    let mut env = vec![cstring(format!("PATH={PATH}").as_bytes())?];
    for (key, value) in &spec.env {
        env.push(cstring(format!("{key}={value}").as_bytes())?);
    }
    let exe = cstring(exe.as_bytes())?;
    // Signals the waiter forwards (and SIGCHLD) arrive on a signalfd; blocked from before the
    // fork so none is lost, unblocked in the child before it execs.
    let mut signals = SigSet::empty();
    for signal in [Signal::SIGCHLD, Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP, Signal::SIGQUIT] {
        signals.add(signal);
    }
    signals.thread_block().context("cannot block signals")?;
    match sys::fork()? {
        ForkResult::Child => {
            // PID 1 of the desktop's PID namespace. Nothing here may return into the caller.
            let error = child(spec, &signals, filter.as_ref(), &exe, &argv, &env);
            eprintln!("pleiades-host jail: {error:#}");
            std::process::exit(127);
        }
        ForkResult::Parent { child } => waiter(spec, child, &signals, &waiter_filter),
    }
}

/// The child: `/proc`, the user, the last restrictions, then the program.
fn child(
    spec: &JailSpec,
    signals: &SigSet,
    filter: Option<&seccomp::Filter>,
    exe: &CString,
    argv: &[CString],
    env: &[CString],
) -> anyhow::Error {
    let run = || -> Result<std::convert::Infallible> {
        mount(
            Some("proc"),
            "/proc",
            Some("proc"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            None::<&str>,
        )
        .context("cannot mount the jail's /proc")?;
        drop_privileges(spec)?;
        std::env::set_current_dir(&spec.cwd)
            .with_context(|| format!("cannot enter {} in the jail", spec.cwd.display()))?;
        close_fds_except(&spec.keep_fds)?;
        signals.thread_unblock().context("cannot unblock signals")?;
        if let Some(filter) = filter {
            filter.apply().context("cannot install the seccomp filter")?;
        }
        nix::unistd::execve(exe, argv, env)
            .with_context(|| format!("cannot run {} in the jail", exe.to_string_lossy()))
    };
    match run() {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

/// The parent: unprivileged, it waits for the child and forwards signals to it.
fn waiter(spec: &JailSpec, child: Pid, signals: &SigSet, filter: &seccomp::Filter) -> Result<i32> {
    use nix::sys::signalfd::SignalFd;
    use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
    let fd = SignalFd::new(signals).context("cannot make a signalfd")?;
    drop_privileges(spec)?;
    close_fds_except(&[std::os::fd::AsRawFd::as_raw_fd(&fd)])?;
    filter.apply().context("cannot install the waiter's seccomp filter")?;
    loop {
        match waitpid(child, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(_, code)) => return Ok(code),
            Ok(WaitStatus::Signaled(_, signal, _)) => {
                if signal == Signal::SIGSYS {
                    eprintln!(
                        "pleiades-host jail: the VM process made a system call outside its seccomp allowlist and was killed"
                    );
                } else {
                    eprintln!("pleiades-host jail: the VM process was killed by {signal}");
                }
                return Ok(128 + signal as i32);
            }
            Ok(_) => {}
            Err(nix::errno::Errno::ECHILD) => return Ok(127),
            Err(e) => return Err(e).context("cannot wait for the VM process"),
        }
        match fd.read_signal() {
            Ok(Some(info)) => {
                if let Ok(signal) = Signal::try_from(info.ssi_signo as i32)
                    && signal != Signal::SIGCHLD
                {
                    let _ = nix::sys::signal::kill(child, signal);
                }
            }
            Ok(None) => {}
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e).context("cannot read signals"),
        }
    }
}

/// The desktop's user and group, no supplementary groups, `no_new_privs`, and death with the
/// parent (set after the user changes, which clears it).
fn drop_privileges(spec: &JailSpec) -> Result<()> {
    let (uid, gid) = (Uid::from_raw(spec.uid), Gid::from_raw(spec.gid));
    nix::unistd::setgroups(&[]).context("cannot clear supplementary groups")?;
    nix::unistd::setresgid(gid, gid, gid).context("cannot change group")?;
    nix::unistd::setresuid(uid, uid, uid).context("cannot change user")?;
    nix::sys::prctl::set_no_new_privs().context("cannot set no_new_privs")?;
    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).context("cannot set the parent-death signal")?;
    Ok(())
}

/// Closes every file descriptor above 2 that is not in `keep` (up to the descriptor limit).
fn close_fds_except(keep: &[i32]) -> Result<()> {
    let (soft, _) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .context("cannot read the descriptor limit")?;
    let last = i32::try_from(soft.min(1 << 20)).unwrap_or(1 << 20);
    for fd in 3..last {
        if !keep.contains(&fd) {
            // Most are not open: EBADF.
            let _ = nix::unistd::close(fd);
        }
    }
    Ok(())
}

fn cstring(bytes: &[u8]) -> Result<CString> {
    CString::new(bytes).context("an argument holds a NUL byte")
}

/// Builds the root on a tmpfs at `spec.root` and makes it the process's root.
fn build_root(spec: &JailSpec) -> Result<()> {
    let root = &spec.root;
    make_mounts_private(root)?;
    mount(
        Some("tmpfs"),
        root,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0755,size=16m"),
    )
    .with_context(|| format!("cannot mount a tmpfs on {}", root.display()))?;
    for dir in SYSTEM_DIRS {
        let path = Path::new(dir);
        match std::fs::symlink_metadata(path) {
            Ok(meta) if meta.file_type().is_symlink() => {
                let target = std::fs::read_link(path)?;
                std::os::unix::fs::symlink(target, inside(root, path))?;
            }
            Ok(_) => bind(root, &Bind::ro(path))?,
            Err(_) => {}
        }
    }
    // /tmp first: a bind below it (a state directory in /tmp) goes onto this tmpfs.
    let tmp = inside(root, Path::new("/tmp"));
    std::fs::create_dir_all(&tmp)?;
    mount(
        Some("tmpfs"),
        &tmp,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some(format!("mode=1777,size={}m", spec.tmp_mib).as_str()),
    )
    .context("cannot mount the jail's /tmp")?;
    let record = spec.record_to.iter().map(|dir| Bind::rw(dir.clone()));
    for bind_spec in spec.binds.iter().cloned().chain(record) {
        let bind_spec = &bind_spec;
        bind(root, bind_spec)
            .with_context(|| format!("cannot show {} in the jail", bind_spec.source.display()))?;
    }
    make_dev(root, spec)?;
    std::fs::create_dir_all(inside(root, Path::new("/proc")))?;
    enter_root(root)?;
    // The root's own tmpfs holds only mount points and links: read-only from now on.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        None::<&str>,
    )
    .context("cannot make the jail's root read-only")?;
    Ok(())
}

/// Makes every mount of this (new) namespace private, so that nothing mounted for the jail
/// propagates back to the host. Where `/` is not a mount point (a chroot) that cannot be said of
/// `/`: each mount the chroot sees is made private instead, and `root` must be on one of them
/// (the mount under the chroot's root is out of reach).
fn make_mounts_private(root: &Path) -> Result<()> {
    let private = |path: &Path| {
        mount(None::<&str>, path, None::<&str>, MsFlags::MS_REC | MsFlags::MS_PRIVATE, None::<&str>)
    };
    match private(Path::new("/")) {
        Ok(()) => return Ok(()),
        Err(nix::errno::Errno::EINVAL) => {}
        Err(e) => return Err(e).context("cannot make the mounts private"),
    }
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").context("cannot read the mount table")?;
    // Field 5 is the mount point (spaces and the like octal-escaped).
    let points: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .collect();
    for point in &points {
        match private(point) {
            // A mount hidden under a later one, or gone: its own children were covered by MS_REC.
            Ok(()) | Err(nix::errno::Errno::EINVAL | nix::errno::Errno::ENOENT) => {}
            Err(e) => return Err(e).with_context(|| format!("cannot make {} private", point.display())),
        }
    }
    if !points.iter().any(|p| p != Path::new("/") && root.starts_with(p)) {
        bail!(
            "/ is not a mount point (a chroot?) and the jail's root {} is on no mount this process can make private",
            root.display()
        );
    }
    Ok(())
}

/// `pivot_root` into `root`, or (where `/` is not a mount point: a chroot) move it over `/` and
/// chroot into it.
fn enter_root(root: &Path) -> Result<()> {
    let old = inside(root, Path::new("/.old-root"));
    std::fs::create_dir_all(&old)?;
    match nix::unistd::pivot_root(root, &old) {
        Ok(()) => {
            std::env::set_current_dir("/")?;
            nix::mount::umount2("/.old-root", nix::mount::MntFlags::MNT_DETACH)
                .context("cannot detach the host's root")?;
            std::fs::remove_dir("/.old-root")?;
        }
        Err(nix::errno::Errno::EINVAL) => {
            std::fs::remove_dir(&old)?;
            std::env::set_current_dir(root)?;
            mount(Some(root), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
                .context("cannot move the jail's root over /")?;
            nix::unistd::chroot(".").context("cannot chroot into the jail")?;
            std::env::set_current_dir("/")?;
        }
        Err(e) => return Err(e).context("cannot pivot_root into the jail"),
    }
    Ok(())
}

/// `path` of the jail, under `root`.
fn inside(root: &Path, path: &Path) -> PathBuf {
    root.join(path.strip_prefix("/").unwrap_or(path))
}

/// Bind-mounts `bind.source` at `bind.target` in the jail (read-only unless writable; never
/// set-uid programs or device files).
fn bind(root: &Path, bind: &Bind) -> Result<()> {
    if !bind.target.is_absolute() || bind.target.components().any(|c| c == std::path::Component::ParentDir) {
        bail!("{} is not an absolute, plain path", bind.target.display());
    }
    let target = inside(root, &bind.target);
    let meta =
        std::fs::metadata(&bind.source).with_context(|| format!("cannot read {}", bind.source.display()))?;
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent)?;
    }
    if meta.is_dir() {
        std::fs::create_dir_all(&target)?;
    } else if !target.exists() {
        std::fs::File::create(&target)?;
    }
    mount(Some(&bind.source), &target, None::<&str>, MsFlags::MS_BIND | MsFlags::MS_REC, None::<&str>)?;
    let mut flags = MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    if !bind.writable {
        flags |= MsFlags::MS_RDONLY;
    }
    mount(None::<&str>, &target, None::<&str>, flags, None::<&str>)?;
    Ok(())
}

/// The jail's `/dev`: a tmpfs with the few devices a VM process uses, made afresh (never the
/// host's nodes), `/dev/kvm` owned by the desktop's user.
fn make_dev(root: &Path, spec: &JailSpec) -> Result<()> {
    let dev = inside(root, Path::new("/dev"));
    std::fs::create_dir_all(&dev)?;
    mount(
        Some("tmpfs"),
        &dev,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("mode=0755,size=64k"),
    )
    .context("cannot mount the jail's /dev")?;
    let mut devices: Vec<(&str, u64, u64, u32)> = DEVICES.to_vec();
    if spec.kvm {
        devices.push(("kvm", 10, 232, 0o600));
    }
    for (name, major, minor, mode) in devices {
        let path = dev.join(name);
        nix::sys::stat::mknod(
            &path,
            SFlag::S_IFCHR,
            Mode::from_bits_truncate(mode),
            nix::sys::stat::makedev(major, minor),
        )
        .with_context(|| format!("cannot make /dev/{name} in the jail"))?;
        // mknod applies the umask: set the mode as meant.
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(mode))?;
        if name == "kvm" {
            nix::unistd::chown(&path, Some(Uid::from_raw(spec.uid)), Some(Gid::from_raw(spec.gid)))?;
        }
    }
    for (name, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        std::os::unix::fs::symlink(target, dev.join(name))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_round_trip_through_json() {
        let spec = JailSpec {
            name: "d1".into(),
            uid: 1000,
            gid: 1000,
            root: "/var/lib/pleiades/jails/d1".into(),
            binds: vec![Bind::ro("/boot/vmlinuz"), Bind::rw("/var/lib/pleiades/desktops/d1")],
            kvm: true,
            netns: Some("/run/netns/pleiades-d1".into()),
            cgroup: None,
            cwd: "/var/lib/pleiades/desktops/d1".into(),
            env: vec![("RUST_LOG".into(), "info".into())],
            keep_fds: vec![SESSION_SOCKET_FD],
            seccomp: Some(seccomp::Kind::VmQemu),
            tmp_mib: 64,
            record_to: None,
        };
        let json = serde_json::to_string(&spec).unwrap();
        assert_eq!(serde_json::from_str::<JailSpec>(&json).unwrap(), spec);
    }

    #[test]
    fn paths_land_under_the_root() {
        assert_eq!(inside(Path::new("/j"), Path::new("/usr/bin")), Path::new("/j/usr/bin"));
        assert_eq!(inside(Path::new("/j"), Path::new("/")), Path::new("/j"));
    }

    #[test]
    fn a_jail_refuses_root_and_relative_binds() {
        let spec = JailSpec {
            name: "d".into(),
            uid: 0,
            gid: 0,
            root: "/nonexistent".into(),
            binds: vec![],
            kvm: false,
            netns: None,
            cgroup: None,
            cwd: "/".into(),
            env: vec![],
            keep_fds: vec![],
            seccomp: None,
            tmp_mib: 1,
            record_to: None,
        };
        if Uid::effective().is_root() {
            let error = enter(&spec, &["/bin/true".into()]).unwrap_err().to_string();
            assert!(error.contains("never runs as root"), "{error}");
        }
        let error = bind(Path::new("/nonexistent"), &Bind::ro("../etc/shadow")).unwrap_err().to_string();
        assert!(error.contains("not an absolute, plain path"), "{error}");
    }
}
