//! The KVM host fixture end to end (`pleiades_tests::kvm_host`): a VM under QEMU TCG `-cpu max`
//! with `kvm_amd` loaded runs, on Pleiades' own VMM, the no_std test guest and the Linux test
//! image with GPU, keyboard, tablet and sound; its KVM counts as hardware-backed (`--vmm qemu`
//! chooses it).
//!
//! The figures it prints are wall clock on this machine, TCG-nested: the KVM host is emulated
//! and its KVM runs the inner guest with SVM emulated by TCG.

use std::time::{Duration, Instant};

use pleiades_agent::ready::{READY_MARKER, parse_ready_line};
use pleiades_control::screenshot::decode_png;
use pleiades_tests::kvm_host::{KvmHost, KvmHostConfig, KvmHostParts};
use pleiades_tests::prerequisite;
use pleiades_tests::qemu::BASE_CMDLINE;
use pleiades_tests::testguest::RESULT_MARKER;
use pleiades_vmm::accel::has_hardware_virtualization;

/// The inner Linux guest's READY, nested under TCG (seen: about 35 s).
const LINUX_READY_TIMEOUT: Duration = Duration::from_secs(300);

#[test]
fn the_kvm_host_runs_the_test_guest_and_linux_with_devices_on_pleiades_vmm() {
    let Some(parts) = prerequisite::require("kvm_host", KvmHostParts::locate()) else {
        return;
    };
    let started = Instant::now();
    let mut host = KvmHost::boot(parts, &KvmHostConfig::default()).unwrap_or_else(|e| panic!("{e}"));
    let boot = host.boot_times();
    eprintln!(
        "KVM host: READY after {:.1} s, shell in this machine's root after {:.1} s",
        secs(boot.ready),
        secs(boot.shell)
    );

    // Inside, KVM counts as hardware-backed: the CPU has svm (QEMU's -cpu max).
    let cpuinfo = host.cpuinfo().unwrap_or_else(|e| panic!("{e}"));
    assert!(
        has_hardware_virtualization(&cpuinfo),
        "no vmx/svm in the KVM host's /proc/cpuinfo:\n{}",
        cpuinfo.lines().find(|l| l.starts_with("flags")).unwrap_or("")
    );

    // The no_std test guest on Pleiades' VMM, on the KVM host's KVM.
    let elf = host.parts().testguest.display().to_string();
    let run = host
        .run_vm(
            "testguest",
            &["--vmm", "pleiades", "--cpus", "2", "--kernel", &elf],
            Duration::from_secs(180),
        )
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!("inner testguest: exit {} after {:.1} s", run.status, secs(run.elapsed));
    let line = run.serial.iter().find(|l| l.contains(RESULT_MARKER)).unwrap_or_else(|| {
        panic!("no {RESULT_MARKER}line; serial:\n{}\nlog:\n{}", run.serial.join("\n"), run.log.join("\n"))
    });
    let result: serde_json::Value =
        serde_json::from_str(line.split_once(RESULT_MARKER).map_or("", |(_, json)| json)).unwrap();
    assert_eq!(result["result"], "pass", "{result:#}\nlog:\n{}", run.log.join("\n"));
    assert_eq!(result["cpus"], 2, "{result:#}");
    assert_eq!(run.status, 0, "pleiades-host run failed:\n{}", run.log.join("\n"));

    // QEMU runs inside too, and `pleiades-host run --vmm qemu` picks KVM there by itself.
    let qemu = host
        .run_vm(
            "testguest-qemu",
            &["--vmm", "qemu", "--cpus", "2", "--kernel", &elf],
            Duration::from_secs(180),
        )
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!("inner testguest on QEMU+KVM: exit {} after {:.1} s", qemu.status, secs(qemu.elapsed));
    assert!(
        qemu.log.iter().any(|l| l.contains("QEMU accelerator: kvm")),
        "--vmm qemu did not choose KVM in the KVM host:\n{}",
        qemu.log.join("\n")
    );
    assert!(
        qemu.serial.iter().any(|l| l.contains(RESULT_MARKER) && l.contains(r#""result":"pass""#)),
        "the test guest did not pass on QEMU+KVM:\n{}\n{}",
        qemu.serial.join("\n"),
        qemu.log.join("\n")
    );

    // The Linux test image with GPU, keyboard, tablet and sound.
    let image = host.parts().image.clone();
    let (kernel, initrd) = (image.kernel.display().to_string(), image.initramfs.display().to_string());
    let mut args = vec!["--vmm", "pleiades", "--cpus", "2", "--memory", "512M"];
    args.extend(["--device", "gpu", "--device", "keyboard", "--device", "tablet", "--device", "sound"]);
    args.extend(["--cmdline", BASE_CMDLINE, "--kernel", &kernel, "--initrd", &initrd]);
    let vm = host.start_vm("linux", &args).unwrap_or_else(|e| panic!("{e}"));
    let line = host.wait_vm_line(&vm, READY_MARKER, LINUX_READY_TIMEOUT).unwrap_or_else(|e| panic!("{e}"));
    let ready_after = vm.started.elapsed();
    let info = parse_ready_line(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
    eprintln!("inner Linux: READY after {:.1} s: {line}", secs(ready_after));
    assert_eq!(info.cpus, 2, "{line}");
    let bound: Vec<(&str, &str)> =
        info.devices.iter().map(|d| (d.kind.as_str(), d.driver.as_str())).collect();
    assert_eq!(
        bound,
        [
            ("gpu", "virtio_gpu"),
            ("input", "virtio_input"),
            ("input", "virtio_input"),
            ("sound", "virtio_snd")
        ],
        "{line}"
    );
    // The VMM's own view: the four devices in the order given, each with DRIVER_OK set.
    let status = host.ctl(&vm, &["status"], "linux-status.json").unwrap_or_else(|e| panic!("{e}"));
    let status: serde_json::Value = serde_json::from_str(&status).unwrap_or_else(|e| panic!("{e}: {status}"));
    let devices: Vec<(&str, bool)> = status["devices"]
        .as_array()
        .unwrap_or_else(|| panic!("no devices: {status:#}"))
        .iter()
        .map(|d| (d["type"].as_str().unwrap_or("?"), d["driver_ok"].as_bool().unwrap_or(false)))
        .collect();
    assert_eq!(devices, [("gpu", true), ("input", true), ("input", true), ("sound", true)], "{status:#}");
    // Both input devices are the kinds asked for: the keyboard takes a key, the tablet a
    // position (a missing one is refused).
    host.ctl(&vm, &["key", "shift"], "linux-key.out").unwrap_or_else(|e| panic!("{e}"));
    host.ctl(&vm, &["pointer", "16384", "16384"], "linux-pointer.out").unwrap_or_else(|e| panic!("{e}"));
    // The GPU shows the guest's console (fbcon on tty1): the screenshot comes out as a file.
    let png = host.scratch().join("linux.png");
    host.ctl(&vm, &["screenshot", &png.display().to_string()], "linux-screenshot.out")
        .unwrap_or_else(|e| panic!("{e}"));
    let frame = decode_png(&std::fs::read(&png).unwrap()).unwrap_or_else(|e| panic!("{e}"));
    let lit = (0..frame.height)
        .flat_map(|y| (0..frame.width).map(move |x| (x, y)))
        .filter(|&(x, y)| {
            let (r, g, b) = frame.rgb(x, y);
            u32::from(r) + u32::from(g) + u32::from(b) > 300
        })
        .count();
    eprintln!("inner Linux screen: {}x{}, {lit} lit pixels", frame.width, frame.height);
    assert!(lit > 100, "the inner guest's screen shows no text ({}x{})", frame.width, frame.height);

    let memory = host.memory().unwrap_or_else(|e| panic!("{e}"));
    let vm_rss = host.vm_rss_mib(&vm).unwrap_or_else(|e| panic!("{e}"));
    let (exit, killed) = host.stop_vm(&vm, Duration::from_secs(30)).unwrap_or_else(|e| panic!("{e}"));
    let serial = std::fs::read_to_string(&vm.serial).unwrap_or_default();
    let log = std::fs::read_to_string(&vm.log).unwrap_or_default();
    eprintln!("inner Linux serial console:\n{serial}\ninner pleiades-host log:\n{log}");
    // What the KVM host's KVM said about its guests (unhandled MSRs and the like).
    eprintln!(
        "KVM host dmesg, kvm lines:\n{}",
        host.run("dmesg | grep -i kvm", Duration::from_secs(30)).unwrap_or_default().join("\n")
    );
    eprintln!(
        "KVM host figures (wall clock, TCG-nested): to READY {:.1} s, to a shell in the host root {:.1} s; \
         inner testguest {:.1} s; inner Linux to READY {:.1} s; outer QEMU RSS {} MiB; inside {} of {} MiB used, \
         inner pleiades-host RSS {} MiB; ctl shutdown -> exit {exit}{}; total {:.1} s",
        secs(boot.ready),
        secs(boot.shell),
        secs(run.elapsed),
        secs(ready_after),
        memory.qemu_rss_mib,
        memory.guest_used_mib,
        memory.guest_total_mib,
        vm_rss,
        if killed { " (killed)" } else { "" },
        secs(started.elapsed()),
    );
    assert!(!killed, "ctl shutdown did not end the inner VM within 30 s:\n{log}");
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}
