//! Boots the no_std test guest (`target/guest/testguest.elf` or `$PLEIADES_GUEST_DIR`; `cargo
//! xtask guest-image` builds it) on Pleiades' VMM with virtio-rng and
//! virtio-console, and checks its one `PLEIADES-TESTGUEST {...}` line.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use pleiades_host::devices::virtio::console::Console;
use pleiades_host::devices::virtio::rng::Rng;
use pleiades_host::vmm::{DeviceSpec, ExitReason, RebootPolicy, SerialOut, Vm, VmConfig};

fn testguest() -> PathBuf {
    pleiades_tests::image::testguest_elf().unwrap_or_else(|e| panic!("{e}"))
}

fn boot(cmdline: &str, cpus: u8) -> (ExitReason, serde_json::Value, String) {
    let devices = vec![
        DeviceSpec::Virtio(Box::new(Rng::new().unwrap())),
        DeviceSpec::Virtio(Box::new(Console::new(Box::new(std::io::sink()), None))),
    ];
    boot_with(cmdline, cpus, devices)
}

fn boot_with(cmdline: &str, cpus: u8, devices: Vec<DeviceSpec>) -> (ExitReason, serde_json::Value, String) {
    assert!(
        std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok(),
        "these tests boot the test guest on KVM: /dev/kvm cannot be opened; run them where KVM is available"
    );
    let dir = tempfile::tempdir().unwrap();
    let serial = dir.path().join("serial.log");
    let mut config = VmConfig::new(testguest());
    config.cmdline = cmdline.into();
    config.memory_mib = 128;
    config.cpus = cpus;
    config.serial = SerialOut::File(serial.clone());
    config.on_reboot = RebootPolicy::Exit;
    config.devices = devices;
    let mut vm = Vm::new(config).unwrap();
    let handle = vm.handle();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watchdog = {
        let done = done.clone();
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(60);
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                if Instant::now() > deadline {
                    handle.shutdown();
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let reason = vm.run().unwrap();
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    watchdog.join().unwrap();
    let output = String::from_utf8_lossy(&std::fs::read(&serial).unwrap_or_default()).into_owned();
    eprintln!("{output}");
    let report = output
        .lines()
        .find_map(|l| l.strip_prefix("PLEIADES-TESTGUEST "))
        .and_then(|json| serde_json::from_str(json).ok())
        .unwrap_or(serde_json::Value::Null);
    (reason, report, output)
}

#[test]
fn the_test_guest_passes_with_rng_and_console() {
    let (reason, report, output) = boot("expect=rng,console", 2);
    assert_eq!(report["result"], "pass", "serial:\n{output}");
    assert_eq!(report["cpus"], 2, "serial:\n{output}");
    assert_eq!(reason, ExitReason::PowerOff);
}

#[test]
fn the_test_guest_passes_in_hostile_mode() {
    let (reason, report, output) = boot("mode=hostile expect=rng,console", 1);
    assert_eq!(report["result"], "pass", "serial:\n{output}");
    assert_eq!(reason, ExitReason::PowerOff);
}

#[test]
fn the_test_guest_passes_when_it_reassigns_the_bars() {
    let (reason, report, output) = boot("bars=reassign expect=rng,console", 1);
    assert_eq!(report["result"], "pass", "serial:\n{output}");
    assert_eq!(reason, ExitReason::PowerOff);
}

#[test]
fn the_test_guest_passes_with_rng_served_over_vhost_user() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("rng.sock");
    let backend = {
        let socket = socket.clone();
        std::thread::spawn(move || {
            pleiades_host::devices::vhost_user::serve(Box::new(Rng::new().unwrap()), &socket)
        })
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "the backend never listened");
        std::thread::sleep(Duration::from_millis(10));
    }
    let devices = vec![
        DeviceSpec::VhostUser { kind: pleiades_host::devices::virtio::DeviceType::Rng, socket },
        DeviceSpec::Virtio(Box::new(Console::new(Box::new(std::io::sink()), None))),
    ];
    let (reason, report, output) = boot_with("expect=rng,console", 1, devices);
    assert_eq!(report["result"], "pass", "serial:\n{output}");
    assert_eq!(reason, ExitReason::PowerOff);
    backend.join().unwrap().unwrap();
}
