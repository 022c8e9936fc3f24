//! The jail every desktop runs in (issue #14), checked from the host's /proc while desktops
//! run through the broker and `pleiades-host serve` (as root, `--jail auto`):
//!
//! - every process of a desktop (the jail's waiter, `pleiades-host run`, QEMU, the device
//!   backends) runs as the desktop's own unprivileged user, with `NoNewPrivs: 1`,
//!   `Seccomp: 2`, its own mount, network, IPC, UTS and PID namespaces, its desktop's cgroup,
//!   and an environment with nothing but what it needs (no registration token);
//! - its root holds only its own files: not the host's `/etc/shadow`, not the daemon's
//!   credential, not the other desktop's directory; two desktops never share a user;
//! - the desktop still works end to end: the headless client types into it;
//! - a system call outside the allowlist (the debug-only `test-forbidden-syscall` control
//!   request) kills that desktop's VM process only: the other desktop goes on, the broker sees
//!   the desktop fail and provisions it again.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use pleiades_tests::image::GuestImage;
use pleiades_tests::prerequisite::{Missing, is_root, missing};
use pleiades_tests::qemu::boot_timeout;
use pleiades_tests::stack::{Stack, StackOptions};
use pleiades_tests::wait_for;
use serde_json::Value;

/// What a jailed process's environment may hold.
const ALLOWED_ENV: &[&str] =
    &["PATH", "PLEIADES_LOG", "RUST_BACKTRACE", "PLEIADES_QEMU", "PLEIADES_QEMU_STORAGE_DAEMON"];

fn proc_file(pid: u32, name: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/{name}")).unwrap_or_default()
}

/// A line of /proc/PID/status, after its name.
fn status(pid: u32, field: &str) -> String {
    proc_file(pid, "status")
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")).map(|v| v.trim().to_owned()))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

fn namespace(pid: u32, kind: &str) -> String {
    std::fs::read_link(format!("/proc/{pid}/ns/{kind}"))
        .map(|p| p.display().to_string())
        .unwrap_or_else(|e| panic!("/proc/{pid}/ns/{kind}: {e}"))
}

fn parent(pid: u32) -> Option<u32> {
    let stat = proc_file(pid, "stat");
    // `pid (comm) state ppid …`; comm may hold spaces and parentheses.
    stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse().ok()
}

/// `root` and every process below it.
fn tree(root: u32) -> Vec<u32> {
    let all: Vec<u32> = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    let mut found = vec![root];
    let mut i = 0;
    while i < found.len() {
        let p = found[i];
        let children: Vec<u32> =
            all.iter().copied().filter(|&c| parent(c) == Some(p) && !found.contains(&c)).collect();
        found.extend(children);
        i += 1;
    }
    found
}

fn cmdline(pid: u32) -> String {
    proc_file(pid, "cmdline").replace('\0', " ")
}

/// The jail process (the daemon's child) of `desktop`.
fn jail_of(daemon: u32, desktop: &str) -> u32 {
    let needle = format!("\"name\":\"{desktop}\"");
    tree(daemon)
        .into_iter()
        .find(|&p| parent(p) == Some(daemon) && cmdline(p).contains(" jail ") && cmdline(p).contains(&needle))
        .unwrap_or_else(|| panic!("no jail process for {desktop} under the daemon {daemon}"))
}

/// Checks everything the issue asks of every process of a desktop; returns its user id.
fn check_jailed(daemon: u32, desktop: &str) -> u32 {
    let waiter = jail_of(daemon, desktop);
    let processes = tree(waiter);
    let names: Vec<String> = processes.iter().map(|&p| status(p, "Name")).collect();
    assert!(processes.len() >= 3, "the jail, the VM process and QEMU at least: {names:?}");
    assert!(names.iter().any(|n| n.starts_with("qemu-system")), "{names:?}");
    let uid = status(waiter, "Uid").split_whitespace().next().unwrap().parse::<u32>().unwrap();
    assert_ne!(uid, 0);
    for &pid in &processes {
        let what = format!("{} ({pid}, {})", status(pid, "Name"), cmdline(pid));
        for field in ["Uid", "Gid"] {
            let line = status(pid, field);
            let ids: BTreeSet<&str> = line.split_whitespace().collect();
            assert_eq!(ids, BTreeSet::from([uid.to_string().as_str()]), "{field} of {what}");
        }
        assert_eq!(status(pid, "Groups"), "", "supplementary groups of {what}");
        assert_eq!(status(pid, "NoNewPrivs"), "1", "{what}");
        assert_eq!(status(pid, "Seccomp"), "2", "{what}");
        assert_eq!(status(pid, "CapEff"), "0000000000000000", "capabilities of {what}");
        for kind in ["mnt", "net", "ipc", "uts"] {
            assert_ne!(namespace(pid, kind), namespace(daemon, kind), "{kind} namespace of {what}");
        }
        // The waiter stays in the daemon's PID namespace (the daemon waits for it); every
        // process it starts is in the desktop's.
        let pid_ns = if pid == waiter { namespace(pid, "pid_for_children") } else { namespace(pid, "pid") };
        assert_ne!(pid_ns, namespace(daemon, "pid"), "PID namespace of {what}");
        let cgroup = proc_file(pid, "cgroup");
        assert!(cgroup.contains(&format!("/desktop-{desktop}")), "cgroup of {what}: {cgroup}");
        let environ = proc_file(pid, "environ");
        for variable in environ.split('\0').filter(|v| !v.is_empty()) {
            let key = variable.split('=').next().unwrap();
            assert!(ALLOWED_ENV.contains(&key), "{what} has {key} in its environment");
        }
    }
    uid
}

/// The jail's root as the VM process sees it.
fn root_of(daemon: u32, desktop: &str) -> PathBuf {
    let run = tree(jail_of(daemon, desktop))
        .into_iter()
        .find(|&p| cmdline(p).contains(" run "))
        .expect("the VM process");
    PathBuf::from(format!("/proc/{run}/root"))
}

fn inside(root: &Path, path: &Path) -> PathBuf {
    root.join(path.strip_prefix("/").unwrap())
}

#[test]
fn every_process_of_a_desktop_is_jailed_and_a_forbidden_system_call_ends_only_that_desktop() {
    if !is_root() {
        match missing("desktop_jail", "the jail needs root (namespaces, cgroups, mounts)") {
            Missing::Skip => return,
            Missing::Fail(why) => panic!("{why}"),
        }
    }
    let dir = tempfile::Builder::new().prefix("pleiades-jail-").tempdir().unwrap();
    let options =
        StackOptions { spares: 1, max: 2, network: "nat", ..StackOptions::local(dir.path()).unwrap() };
    let mut stack = Stack::start(options, &GuestImage::locate().expect("test guest image")).unwrap();
    let daemon = stack.host.child.id();
    let bearer = stack.login("alice", "alice-password-1").unwrap();
    let desktop = stack.request_desktop(&bearer).unwrap();
    stack.wait_in_use(&bearer, &desktop, boot_timeout()).unwrap();
    stack.wait_booted(&desktop, 1);
    let admin = stack.login("root", "root-password-1").unwrap();
    let other = wait_for("the spare desktop to run", boot_timeout(), || {
        let all = stack.get("/api/v1/admin/desktops", &admin).ok()?;
        all.as_array()?
            .iter()
            .find(|d| d["id"] != desktop.as_str() && d["state"] == "ready")
            .and_then(|d| d["id"].as_str().map(str::to_owned))
    })
    .unwrap();

    // From /proc: users, no_new_privs, seccomp, namespaces, cgroup, environment.
    let uid = check_jailed(daemon, &desktop);
    let other_uid = check_jailed(daemon, &other);
    assert_ne!(uid, other_uid, "two desktops share a user");

    // The root holds only the desktop's own files.
    let root = root_of(daemon, &desktop);
    let desktops = stack.host_state.join("desktops");
    assert!(inside(&root, &desktops.join(&desktop)).join("control.sock").exists(), "its own directory");
    for hidden in [
        PathBuf::from("/etc/shadow"),
        PathBuf::from("/etc/passwd"),
        PathBuf::from("/root"),
        stack.host_state.join("registration.json"),
        stack.host_state.join("tls/session-key.der"),
        desktops.join(&other),
        stack.config.clone(),
    ] {
        assert!(!inside(&root, &hidden).exists(), "{} is visible in the jail", hidden.display());
    }
    // Its cgroup has limits.
    let cgroup = proc_file(jail_of(daemon, &desktop), "cgroup");
    assert!(memory_limit(&cgroup) < 64 << 30, "no memory limit: {cgroup}");

    // It works end to end: the headless client types into it.
    let connection = stack.connect(&bearer, &desktop).unwrap();
    let file = dir.path().join("desk.pleiades");
    std::fs::write(&file, connection["file"].as_str().unwrap()).unwrap();
    let script = "wait 2000\ntype echo PLEIADES-JAIL-$((6*7)) > /dev/ttyS0\\n\nwait 3000\n";
    let (ok, text) = stack.run_client(&file, &dir.path().join("rec"), script);
    assert!(ok, "the client reaches the jailed desktop: {text}");
    wait_for("the typed line on the serial console", Duration::from_secs(30), || {
        stack.serial(&desktop).contains("PLEIADES-JAIL-42").then_some(())
    })
    .unwrap();

    // A system call outside the allowlist kills that VM process (the spare's), and only that
    // one: Alice's desktop goes on.
    let victim_waiter = jail_of(daemon, &other);
    let alice_waiter = jail_of(daemon, &desktop);
    let control = desktops.join(&other).join("control.sock");
    let answer = pleiades_control::request(
        &control,
        &pleiades_control::Request::TestForbiddenSyscall,
        Duration::from_secs(10),
    );
    assert!(answer.as_ref().is_ok_and(|r| r.result.is_none()) || answer.is_err(), "it answered: {answer:?}");
    let vm_log = desktops.join(&other).join("vm.log");
    wait_for("the jail to report the kill", Duration::from_secs(30), || {
        std::fs::read_to_string(&vm_log)
            .unwrap_or_default()
            .contains("made a system call outside its seccomp allowlist")
            .then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}: {}", std::fs::read_to_string(&vm_log).unwrap_or_default()));
    // (A zombie until the daemon's next heartbeat reaps it.)
    let ended = |pid: u32| {
        proc_file(pid, "stat").rsplit_once(')').is_none_or(|(_, rest)| rest.trim_start().starts_with('Z'))
    };
    wait_for("the killed desktop's jail to end", Duration::from_secs(10), || {
        ended(victim_waiter).then_some(())
    })
    .unwrap();
    assert!(!ended(alice_waiter), "Alice's desktop went too");
    stack.run_in_guest(&desktop, "echo JAIL-AFTER-$((2*21)) > /dev/ttyS0", "JAIL-AFTER-42");

    // The broker sees the desktop fail (its audit says so: the failed state itself may last
    // less than a poll) and provisions it again: a new jail, a second boot.
    let all = stack.get("/api/v1/admin/desktops", &admin).unwrap();
    let name = all.as_array().unwrap().iter().find(|d| d["id"] == other.as_str()).unwrap()["name"]
        .as_str()
        .unwrap()
        .to_owned();
    wait_for("the broker to see the desktop's VM gone", Duration::from_secs(60), || {
        let audit = stack.get("/api/v1/admin/audit", &admin).ok()?;
        audit
            .as_array()?
            .iter()
            .any(|e| e["action"] == "desktop.vanished" && e["target"] == name.as_str())
            .then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", stack.logs_tail()));
    wait_for("the desktop to run again", boot_timeout() * 2, || {
        let all = stack.get("/api/v1/admin/desktops", &admin).ok()?;
        let d: Value = all.as_array()?.iter().find(|d| d["id"] == other.as_str())?.clone();
        (d["state"] == "ready").then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", stack.logs_tail()));
    stack.wait_booted(&other, 2);
    assert_ne!(jail_of(daemon, &other), victim_waiter, "a new VM process");
    check_jailed(daemon, &other);
    assert_eq!(jail_of(daemon, &desktop), alice_waiter, "Alice's VM process is the same");
}

/// The memory limit of the group named in a /proc/PID/cgroup text (v2, or v1's memory
/// hierarchy), in bytes.
fn memory_limit(cgroup: &str) -> u64 {
    let (file, group) = match cgroup.lines().find_map(|l| l.split_once(":memory:")) {
        Some((_, group)) => ("memory.limit_in_bytes", format!("memory{group}")),
        None => {
            let group = cgroup.lines().find_map(|l| l.strip_prefix("0::")).expect("a cgroup v2 line");
            ("memory.max", group.trim_start_matches('/').to_owned())
        }
    };
    let path = Path::new("/sys/fs/cgroup").join(group.trim_start_matches('/')).join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.trim().parse().unwrap_or(u64::MAX)
}
