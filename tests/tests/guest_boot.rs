//! The test guest image boots under QEMU, reports READY with the devices QEMU gave it, runs
//! commands on its serial console and powers off.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use pleiades_tests::image::GuestImage;
use pleiades_tests::qemu::{Guest, GuestConfig, GuestError};

fn kinds(devices: &[pleiades_agent::ready::VirtioDevice]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for d in devices {
        *counts.entry(d.kind.clone()).or_insert(0) += 1;
    }
    counts
}

#[test]
fn guest_boots_to_ready_lists_its_devices_and_powers_off() {
    let image = GuestImage::locate().expect("test guest image");
    let scratch = tempfile::tempdir().unwrap();
    let disk = scratch.path().join("disk.raw");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();

    let config = GuestConfig { cpus: 2, memory_mib: 512, ..GuestConfig::default() }
        .device("virtio-rng-pci")
        .device("virtio-gpu-pci")
        .device("virtio-keyboard-pci")
        .device("virtio-tablet-pci")
        .device("virtio-serial-pci")
        .args(["-drive", &format!("if=none,id=disk0,format=raw,file={}", disk.display())])
        .device("virtio-blk-pci,drive=disk0")
        .args(["-audiodev", "none,id=snd0"])
        .device("virtio-sound-pci,audiodev=snd0");
    let started = Instant::now();
    let (mut guest, info) = Guest::boot(&image, &config).expect("guest boots to READY");
    eprintln!("READY after {:.1} s on {}: {info:?}", started.elapsed().as_secs_f64(), guest.accel().accel);

    assert!(info.kernel.starts_with("6.12."), "kernel {}", info.kernel);
    assert_eq!(info.cpus, 2);
    assert!((400..=512).contains(&info.memory_mib), "memory {} MiB", info.memory_mib);
    let expected: BTreeMap<String, usize> =
        [("rng", 1), ("gpu", 1), ("input", 2), ("console", 1), ("block", 1), ("sound", 1)]
            .into_iter()
            .map(|(k, n)| (k.to_owned(), n))
            .collect();
    assert_eq!(kinds(&info.devices), expected, "{:#?}", info.devices);
    for device in &info.devices {
        assert!(device.address.starts_with("0000:00:"), "virtio-pci address: {device:?}");
    }

    // READY is printed exactly once.
    let ready_lines = guest.transcript().iter().filter(|l| l.contains("PLEIADES-READY")).count();
    assert_eq!(ready_lines, 1);

    // The serial console is a usable shell, and the drivers did their work.
    let cpus = guest.run("grep -c ^processor /proc/cpuinfo", Duration::from_secs(30)).unwrap();
    assert_eq!(cpus, ["2"]);
    let events = guest.run("ls /dev/input", Duration::from_secs(30)).unwrap();
    assert!(events.join(" ").contains("event1"), "evdev nodes: {events:?}");
    let entropy = guest.run("cat /sys/class/misc/hw_random/rng_current", Duration::from_secs(30)).unwrap();
    assert!(entropy.join("").starts_with("virtio_rng"), "{entropy:?}");
    // A command that fails is an error of `run`, with its status and output.
    assert_eq!(
        guest.run_status("echo out; (exit 3)", Duration::from_secs(30)).unwrap(),
        (3, vec!["out".to_owned()])
    );
    let failed = guest.run("false", Duration::from_secs(30)).unwrap_err();
    assert!(matches!(failed, GuestError::CommandFailed { status: 1, .. }), "{failed}");

    let status = guest.poweroff(Duration::from_secs(60)).expect("guest powers off");
    assert!(status.success(), "QEMU exit status {status}");
}

#[test]
fn a_guest_without_devices_reports_none() {
    let image = GuestImage::locate().expect("test guest image");
    let config = GuestConfig { cpus: 1, memory_mib: 256, ..GuestConfig::default() };
    let (guest, info) = Guest::boot(&image, &config).expect("guest boots to READY");
    assert_eq!(info.cpus, 1);
    assert!(info.devices.is_empty(), "{:?}", info.devices);
    assert!(guest.poweroff(Duration::from_secs(60)).unwrap().success());
}
