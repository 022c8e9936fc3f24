//! Boots the no_std test guest (`target/guest/testguest.elf` or `$PLEIADES_GUEST_DIR`; `cargo
//! xtask guest-image` builds it) on Pleiades' VMM with virtio-rng and
//! virtio-console, or the virtio-input keyboard and tablet, and checks its one
//! `PLEIADES-TESTGUEST {...}` line.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use pleiades_virtio::console::Console;
use pleiades_virtio::input::{Input, InputEvent, InputSender};
use pleiades_virtio::rng::Rng;
use pleiades_vmm::{DeviceSpec, ExitReason, RebootPolicy, SerialOut, Vm, VmConfig};

fn testguest() -> PathBuf {
    pleiades_testkit::image::testguest_elf().unwrap_or_else(|e| panic!("{e}"))
}

fn boot(cmdline: &str, cpus: u8) -> (ExitReason, serde_json::Value, String) {
    let devices = vec![
        DeviceSpec::Virtio(Box::new(Rng::new().unwrap())),
        DeviceSpec::Virtio(Box::new(Console::new(Box::new(std::io::sink()), None))),
    ];
    boot_with(cmdline, cpus, devices)
}

fn boot_with(cmdline: &str, cpus: u8, devices: Vec<DeviceSpec>) -> (ExitReason, serde_json::Value, String) {
    boot_watching(cmdline, cpus, devices, |_| {})
}

/// [`boot_with`], with `watch` called on a thread with the serial log's path while the VM runs.
fn boot_watching(
    cmdline: &str,
    cpus: u8,
    devices: Vec<DeviceSpec>,
    watch: impl FnOnce(PathBuf) + Send + 'static,
) -> (ExitReason, serde_json::Value, String) {
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
    let watcher = {
        let serial = serial.clone();
        std::thread::spawn(move || watch(serial))
    };
    let handle = vm.handle();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watchdog = {
        let done = done.clone();
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(60);
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                if Instant::now() > deadline {
                    handle.power_off();
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let reason = vm.run().unwrap();
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    watchdog.join().unwrap();
    watcher.join().unwrap();
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
    // Both firmware tables say so: the MP table and the ACPI MADT (found from the RSDP the
    // PVH start info names).
    assert_eq!((report["cpus_mp"].as_u64(), report["cpus_madt"].as_u64()), (Some(2), Some(2)), "{report}");
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

/// Serves `device` over vhost-user on a thread; its socket, once it listens, and the thread.
fn serve_over_vhost_user(
    device: Box<dyn pleiades_virtio::VirtioDevice>,
    dir: &std::path::Path,
    name: &str,
) -> (PathBuf, std::thread::JoinHandle<anyhow::Result<()>>) {
    let socket = dir.join(format!("{name}.sock"));
    let backend = pleiades_virtio::test_utils::serve_over_vhost_user(device, &socket);
    (socket, backend)
}

#[test]
fn the_test_guest_drives_the_gpu_and_sound_served_over_vhost_user() {
    use pleiades_virtio::gpu::{Gpu, GpuConfig};
    use pleiades_virtio::snd::Sound;
    // The same devices as in-process, but behind the VMM's vhost-user frontend: the GPU's
    // config space comes over GET_CONFIG, its queues and the sound's four are the backend's.
    let dir = tempfile::tempdir().unwrap();
    let gpu = Gpu::new(&GpuConfig { scanouts: 2, ..GpuConfig::default() }).unwrap();
    let display = gpu.handle();
    let sound = Sound::new().unwrap();
    let audio = sound.handle();
    let (gpu_socket, gpu_backend) = serve_over_vhost_user(Box::new(gpu), dir.path(), "gpu");
    let (snd_socket, snd_backend) = serve_over_vhost_user(Box::new(sound), dir.path(), "sound");
    let devices = vec![
        DeviceSpec::VhostUser { kind: pleiades_virtio::DeviceType::Gpu, socket: gpu_socket },
        DeviceSpec::VhostUser { kind: pleiades_virtio::DeviceType::Sound, socket: snd_socket },
    ];
    let (reason, report, output) = boot_with("expect=gpu,sound", 1, devices);
    assert_eq!(report["result"], "pass", "serial:\n{output}");
    let gpu = &report["devices"][0];
    assert_eq!((gpu["kind"].as_str(), gpu["scanouts"].as_u64()), (Some("gpu"), Some(2)), "{report:#}");
    assert_eq!(gpu["display"][0], serde_json::json!([1280, 800]), "{gpu}");
    assert!(
        display.sink().metrics().flushes.load(std::sync::atomic::Ordering::Relaxed) > 0,
        "flushed to the sink"
    );
    let snd = &report["devices"][1];
    assert_eq!((snd["control_ok"].as_u64(), snd["periods"].as_u64()), (Some(10), Some(3)), "{snd}");
    let played = audio.take_playback(Duration::ZERO);
    assert_eq!(
        played.iter().map(|c| c.samples.len()).sum::<usize>(),
        3 * 960,
        "the periods reached the sink"
    );
    assert_eq!(reason, ExitReason::PowerOff);
    gpu_backend.join().unwrap().unwrap();
    snd_backend.join().unwrap().unwrap();
}

#[test]
fn the_test_guest_passes_with_rng_served_over_vhost_user() {
    let dir = tempfile::tempdir().unwrap();
    let (socket, backend) = serve_over_vhost_user(Box::new(Rng::new().unwrap()), dir.path(), "rng");
    let devices = vec![
        DeviceSpec::VhostUser { kind: pleiades_virtio::DeviceType::Rng, socket },
        DeviceSpec::Virtio(Box::new(Console::new(Box::new(std::io::sink()), None))),
    ];
    let (reason, report, output) = boot_with("expect=rng,console", 1, devices);
    assert_eq!(report["result"], "pass", "serial:\n{output}");
    assert_eq!(reason, ExitReason::PowerOff);
    backend.join().unwrap().unwrap();
}

/// A keyboard and a tablet, and the senders that feed them.
fn input_devices() -> (Vec<DeviceSpec>, InputSender, InputSender) {
    let keyboard = Input::keyboard().unwrap();
    let tablet = Input::tablet().unwrap();
    let senders = (keyboard.sender(), tablet.sender());
    (vec![DeviceSpec::Virtio(Box::new(keyboard)), DeviceSpec::Virtio(Box::new(tablet))], senders.0, senders.1)
}

#[test]
fn the_test_guest_passes_with_keyboard_and_tablet() {
    for mode in ["normal", "hostile"] {
        let (devices, _, _) = input_devices();
        let (reason, report, output) = boot_with(&format!("mode={mode} expect=input"), 1, devices);
        assert_eq!(report["result"], "pass", "serial:\n{output}");
        let kinds: Vec<&serde_json::Value> =
            report["devices"].as_array().unwrap().iter().map(|d| &d["kind"]).collect();
        assert_eq!(kinds, ["keyboard", "tablet"], "serial:\n{output}");
        assert_eq!(reason, ExitReason::PowerOff);
    }
}

#[test]
fn the_test_guest_receives_events_sent_while_it_waits() {
    let (devices, mut keyboard, mut tablet) = input_devices();
    let watch = move |serial: PathBuf| {
        // Send once the guest says it waits (its buffers are posted then).
        let deadline = Instant::now() + Duration::from_secs(50);
        while Instant::now() < deadline {
            let text = std::fs::read_to_string(&serial).unwrap_or_default();
            if text.lines().any(|l| l == "PLEIADES-TESTGUEST-INPUT-WAITING") {
                keyboard.send_report(&[InputEvent { kind: 1, code: 30, value: 1 }]);
                tablet.send_report(&[
                    InputEvent { kind: 3, code: 0, value: 1000 },
                    InputEvent { kind: 3, code: 1, value: 2000 },
                ]);
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let (reason, report, output) = boot_watching("expect=input input_wait=40000", 1, devices, watch);
    assert_eq!(report["result"], "pass", "serial:\n{output}");
    let devices = report["devices"].as_array().unwrap();
    assert_eq!(devices[0]["events"], serde_json::json!([[1, 30, 1], [0, 0, 0]]), "serial:\n{output}");
    assert_eq!(
        devices[1]["events"],
        serde_json::json!([[3, 0, 1000], [3, 1, 2000], [0, 0, 0]]),
        "serial:\n{output}"
    );
    assert_eq!(reason, ExitReason::PowerOff);
}

#[test]
fn the_test_guest_plays_on_the_in_process_sound_device() {
    use pleiades_virtio::snd::Sound;
    // Pleiades' VMM with virtio-snd in-process: control requests good and bad (an unsupported
    // rate, START before PREPARE, a stream started twice, an unknown stream), then three
    // 10 ms periods on the tx queue, completed by the device's period clock with OK statuses.
    let sound = Sound::new().unwrap();
    let handle = sound.handle();
    let (reason, report, output) = boot_with("expect=sound", 1, vec![DeviceSpec::Virtio(Box::new(sound))]);
    assert_eq!(report["result"], "pass", "serial:\n{output}");
    let device = &report["devices"][0];
    assert_eq!(device["kind"], "sound", "{report:#}");
    assert_eq!((device["control_ok"].as_u64(), device["periods"].as_u64()), (Some(10), Some(3)), "{device}");
    eprintln!("three 10 ms periods completed in {} µs (the period clock)", device["tx_us"]);
    let played = handle.take_playback(Duration::ZERO);
    assert_eq!(
        played.iter().map(|c| c.samples.len()).sum::<usize>(),
        3 * 960,
        "the periods reached the sink"
    );
    assert_eq!(played[0].samples[0], i16::from_le_bytes([0x11, 0x11]));
    assert!(handle.metrics().bad_requests.load(std::sync::atomic::Ordering::Relaxed) >= 4);
    assert_eq!(reason, ExitReason::PowerOff);
}

#[test]
fn the_test_guest_drives_the_gpu_with_good_and_hostile_commands() {
    use pleiades_virtio::gpu::{Gpu, GpuConfig};
    // Normal: display info, EDID, a scatter-gather resource flushed to scanout 0, the cursor.
    // Hostile: every bad command gets the spec's error (no QEMU deviations allowed here).
    for mode in ["normal", "hostile"] {
        let gpu = Gpu::new(&GpuConfig { scanouts: 2, ..GpuConfig::default() }).unwrap();
        let handle = gpu.handle();
        let (reason, report, output) =
            boot_with(&format!("mode={mode} expect=gpu"), 1, vec![DeviceSpec::Virtio(Box::new(gpu))]);
        assert_eq!(report["result"], "pass", "{mode}: serial:\n{output}");
        let gpu = &report["devices"][0];
        assert_eq!(gpu["kind"], "gpu", "{report:#}");
        assert_eq!(gpu["scanouts"], 2, "{gpu}");
        assert_eq!(gpu["edid"], true, "{gpu}");
        assert_eq!(gpu["display"][0], serde_json::json!([1280, 800]), "{gpu}");
        if mode == "hostile" {
            let hostile = &gpu["hostile"];
            assert_eq!(hostile["failed"], 0, "{hostile:#}");
            assert_eq!(hostile["deviations"], serde_json::json!({}), "{hostile:#}");
            assert!(hostile["checked"].as_u64().unwrap() >= 20, "{hostile:#}");
            let status = handle.status();
            assert!(status["errors"].as_u64().unwrap() >= 20, "the device counted the refusals: {status}");
        }
        // The guest's last flush of its pattern reached the sink before it disabled the scanout.
        assert!(handle.sink().metrics().flushes.load(std::sync::atomic::Ordering::Relaxed) > 0);
        assert_eq!(reason, ExitReason::PowerOff);
    }
}
