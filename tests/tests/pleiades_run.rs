//! `pleiades-host run --vmm pleiades` end to end on KVM: the minimal test guest drives
//! virtio-rng and virtio-console both in-process and over vhost-user, on 2 vCPUs, and
//! `ctl status`/`shutdown` control a running Pleiades VM.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use pleiades_control::{self as control, Request};
use pleiades_tests::testguest;
use pleiades_vmm::accel::{Accel, AccelChoice};

fn testguest_elf() -> std::path::PathBuf {
    pleiades_tests::image::testguest_elf().unwrap_or_else(|e| panic!("{e}"))
}

fn kvm() -> AccelChoice {
    assert!(
        std::path::Path::new("/dev/kvm").exists(),
        "Pleiades' VMM needs /dev/kvm (the build machines have a nested KVM; the tests expect it)"
    );
    AccelChoice { accel: Accel::Kvm, reason: "Pleiades' VMM".into() }
}

#[test]
fn the_test_guest_drives_in_process_and_vhost_user_devices_and_powers_off() {
    let elf = testguest_elf();
    let mut cmd = Command::new(host());
    cmd.args(["run", "--vmm", "pleiades", "--cpus", "2", "--memory", "256M"])
        .args(["--device", "rng", "--device", "console"])
        .args(["--device", "rng,backend=vhost-user", "--device", "console,backend=vhost-user"])
        .args(["--cmdline", "expect=rng,console"])
        .arg("--kernel")
        .arg(&elf);
    let run = testguest::run_command(cmd, Duration::from_secs(120), kvm()).expect("the test guest runs");
    eprintln!("start -> exit {:?}: {}", run.elapsed, run.result);
    assert_eq!(run.result["result"], "pass", "{:#}", run.result);
    assert!(run.status.success(), "exit status {}", run.status);
    assert_eq!(run.result["cpus"], 2);
    let devices = run.result["devices"].as_array().unwrap();
    let kinds: Vec<_> =
        devices.iter().map(|d| (d["kind"].as_str().unwrap(), d["ok"].as_bool().unwrap())).collect();
    assert_eq!(kinds, [("rng", true), ("console", true), ("rng", true), ("console", true)]);
    assert!(devices.iter().all(|d| d["msix"] == true), "{devices:?}");
    // Both consoles' output reached the host: the in-process one writes where the serial
    // console goes (stdout), the backend process to its stdout (inherited).
    let console_lines =
        run.console.iter().filter(|l| l.contains("PLEIADES-CONSOLE-OUT hello from the test guest")).count();
    assert_eq!(console_lines, 2, "{:#?}", run.console);
}

#[test]
fn ctl_status_and_shutdown_control_a_running_pleiades_vm() {
    let elf = testguest_elf();
    let _ = kvm();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("vm.sock");
    // A long entropy loop keeps the guest busy until it is shut down.
    let mut child = Command::new(host())
        .args(["run", "--vmm", "pleiades", "--cpus", "1", "--memory", "128M", "--serial", "null"])
        .args(["--device", "rng", "--cmdline", "rng_loop=10000000"])
        .arg("--kernel")
        .arg(&elf)
        .arg("--control")
        .arg(&socket)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !socket.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = control::request(&socket, &Request::Status, Duration::from_secs(10)).expect("status");
    assert!(status.ok, "{status:?}");
    let result = status.result.unwrap();
    assert_eq!(result["vmm"], "pleiades", "{result:#}");
    assert_eq!(result["cpus"], 1);
    assert_eq!(result["devices"].as_array().map(Vec::len), Some(1), "{result:#}");

    let shutdown = control::request(&socket, &Request::Shutdown, Duration::from_secs(10)).expect("shutdown");
    assert!(shutdown.ok, "{shutdown:?}");
    let deadline = Instant::now() + Duration::from_secs(30);
    let exit = loop {
        if let Some(exit) = child.try_wait().unwrap() {
            break exit;
        }
        assert!(Instant::now() < deadline, "the VM did not end after ctl shutdown");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(exit.success(), "{exit}");
    assert!(!socket.exists(), "the control socket is removed on exit");
}

/// `pleiades-host`, built beside the tests.
fn host() -> std::path::PathBuf {
    pleiades_tests::workspace_binary("pleiades-host").unwrap_or_else(|e| panic!("{e}"))
}
