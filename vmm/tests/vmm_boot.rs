//! Boots tiny hand-made guests on /dev/kvm with Pleiades' VMM.
//!
//! Each guest is a few bytes of x86-64 machine code in a minimal ELF, entered in 64-bit mode per
//! the boot contract (docs/vmm.md). The CI machine has /dev/kvm; without it these tests fail
//! with a message that says so.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use pleiades_virtio::rng::Rng;
use pleiades_vmm::{DeviceSpec, ExitReason, RebootPolicy, SerialOut, Vm, VmConfig, VmError};

const ENTRY: u64 = 0x10_0000;

fn require_kvm() {
    if let Err(e) = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        panic!(
            "these tests boot guests on KVM, but /dev/kvm cannot be opened ({e}): run them on a machine with KVM (the CI machine has it) and access to /dev/kvm"
        );
    }
}

/// A minimal ELF64 executable: one PT_LOAD segment per (physical address, bytes).
fn elf(entry: u64, segments: &[(u64, &[u8])]) -> Vec<u8> {
    let phnum = segments.len() as u16;
    let mut out = Vec::new();
    out.extend_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
    out.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    out.extend_from_slice(&0x3eu16.to_le_bytes()); // x86-64
    out.extend_from_slice(&1u32.to_le_bytes());
    out.extend_from_slice(&entry.to_le_bytes());
    out.extend_from_slice(&64u64.to_le_bytes()); // e_phoff
    out.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&64u16.to_le_bytes());
    out.extend_from_slice(&56u16.to_le_bytes());
    out.extend_from_slice(&phnum.to_le_bytes());
    out.extend_from_slice(&64u16.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    let mut offset = 0x1000u64;
    for (paddr, code) in segments {
        out.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
        out.extend_from_slice(&7u32.to_le_bytes());
        out.extend_from_slice(&offset.to_le_bytes());
        out.extend_from_slice(&paddr.to_le_bytes());
        out.extend_from_slice(&paddr.to_le_bytes());
        out.extend_from_slice(&(code.len() as u64).to_le_bytes());
        out.extend_from_slice(&(code.len() as u64).to_le_bytes());
        out.extend_from_slice(&0x1000u64.to_le_bytes());
        offset += 0x1000;
    }
    for (_, code) in segments {
        out.resize(out.len().next_multiple_of(0x1000), 0);
        out.extend_from_slice(code);
    }
    out
}

/// `out 0x3f8, byte` for each byte (64-bit code).
fn print(text: &[u8]) -> Vec<u8> {
    let mut code = vec![0x66, 0xba, 0xf8, 0x03];
    for b in text {
        code.extend_from_slice(&[0xb0, *b, 0xee]);
    }
    code
}

/// `out 0x604, 0x2000` (ACPI SLP_EN, S5), then halt forever.
const POWER_OFF: &[u8] = &[0x66, 0xba, 0x04, 0x06, 0x66, 0xb8, 0x00, 0x20, 0x66, 0xef, 0xf4, 0xeb, 0xfd];
/// `cli; hlt; jmp hlt`.
const HALT: &[u8] = &[0xfa, 0xf4, 0xeb, 0xfd];
/// `ud2` with no IDT: #UD → #GP → #DF → triple fault.
const TRIPLE_FAULT: &[u8] = &[0x0f, 0x0b];

struct Guest {
    dir: tempfile::TempDir,
}

impl Guest {
    fn new(code: &[u8]) -> Self {
        Self::with_segments(&[(ENTRY, code)])
    }

    fn with_segments(segments: &[(u64, &[u8])]) -> Self {
        require_kvm();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("guest.elf"), elf(ENTRY, segments)).unwrap();
        Self { dir }
    }

    fn kernel(&self) -> PathBuf {
        self.dir.path().join("guest.elf")
    }

    fn serial(&self) -> PathBuf {
        self.dir.path().join("serial.log")
    }

    fn config(&self) -> VmConfig {
        let mut config = VmConfig::new(self.kernel());
        config.memory_mib = 64;
        config.serial = SerialOut::File(self.serial());
        config.on_reboot = RebootPolicy::Exit;
        config
    }

    fn output(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(self.serial()).unwrap_or_default()).into_owned()
    }
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn serial_output_arrives_and_the_power_off_port_exits_with_0() {
    // Check the PVH start info magic at [rsi], print P if it is there, then OK.
    let mut code = vec![0x81, 0x3e, 0x78, 0xc5, 0x6e, 0x33]; // cmp dword [rsi], 0x336ec578
    let print_p = print(b"P");
    code.extend_from_slice(&[0x75, print_p.len() as u8]); // jne over the print
    code.extend_from_slice(&print_p);
    code.extend_from_slice(&print(b"OK\n"));
    code.extend_from_slice(POWER_OFF);
    let guest = Guest::new(&code);
    let mut vm = Vm::new(guest.config()).unwrap();
    let reason = vm.run().unwrap();
    assert_eq!(reason, ExitReason::PowerOff);
    assert_eq!(reason.exit_code(), 0);
    assert_eq!(guest.output(), "POK\n");
}

#[test]
fn a_triple_fault_is_a_reboot() {
    let guest = Guest::new(&[print(b"B").as_slice(), TRIPLE_FAULT].concat());
    let mut vm = Vm::new(guest.config()).unwrap();
    assert_eq!(vm.run().unwrap(), ExitReason::Reboot);
    assert_eq!(guest.output(), "B");
}

#[test]
fn a_reset_boots_the_guest_again_until_shutdown() {
    let guest = Guest::new(&[print(b"B").as_slice(), TRIPLE_FAULT].concat());
    let mut config = guest.config();
    config.on_reboot = RebootPolicy::Restart;
    let mut vm = Vm::new(config).unwrap();
    let handle = vm.handle();
    let serial = guest.serial();
    let watcher = std::thread::spawn(move || {
        wait_for("three boots", || std::fs::read(&serial).unwrap_or_default().len() >= 3);
        handle.power_off();
        handle
    });
    assert_eq!(vm.run().unwrap(), ExitReason::Shutdown);
    let handle = watcher.join().unwrap();
    assert!(handle.status()["boots"].as_u64().unwrap() >= 3);
    assert!(guest.output().starts_with("BBB"));
}

#[test]
fn the_i8042_reset_is_a_reboot() {
    // out 0x64, 0xfe
    let guest = Guest::new(&[&[0xb0, 0xfe, 0xe6, 0x64][..], HALT].concat());
    assert_eq!(Vm::new(guest.config()).unwrap().run().unwrap(), ExitReason::Reboot);
}

#[test]
fn two_vcpus_the_boot_cpu_starts_the_other_with_init_sipi() {
    // BSP: INIT then SIPI (vector 8: real mode at 0x8000) to all others through the LAPIC
    // ICR, wait for the AP's flag at 0x5000, print S, power off.
    let mut bsp = vec![
        0xb8, 0x00, 0x03, 0xe0, 0xfe, // mov eax, 0xfee00300 (ICR low)
        0xc7, 0x00, 0x00, 0x45, 0x0c, 0x00, // mov dword [rax], INIT, all excluding self
        0xc7, 0x00, 0x08, 0x46, 0x0c, 0x00, // mov dword [rax], SIPI vector 8
        0x80, 0x3c, 0x25, 0x00, 0x50, 0x00, 0x00, 0x01, // cmp byte [0x5000], 1
        0x75, 0xf6, // jne back to the cmp
    ];
    bsp.extend_from_slice(&print(b"S"));
    bsp.extend_from_slice(POWER_OFF);
    // AP, 16-bit real mode at 0x8000: print A, set the flag, halt.
    let ap = [
        0xba, 0xf8, 0x03, 0xb0, b'A', 0xee, // mov dx, 0x3f8; mov al, 'A'; out dx, al
        0xc6, 0x06, 0x00, 0x50, 0x01, // mov byte [0x5000], 1
        0xfa, 0xf4, 0xeb, 0xfd, // cli; hlt; jmp hlt
    ];
    let guest = Guest::with_segments(&[(ENTRY, &bsp), (0x8000, &ap)]);
    let mut config = guest.config();
    config.cpus = 2;
    let vm = Vm::new(config).unwrap();
    assert_eq!(vm.handle().status()["cpus"], 2);
    assert_eq!(run_with_timeout(vm), ExitReason::PowerOff, "serial: {:?}", guest.output());
    assert_eq!(guest.output(), "AS");
}

#[test]
fn shutdown_stops_halted_vcpus_and_status_reports_the_vm() {
    let guest = Guest::new(HALT);
    let mut config = guest.config();
    config.cpus = 2;
    config.devices = vec![DeviceSpec::Virtio(Box::new(Rng::new().unwrap()))];
    let mut vm = Vm::new(config).unwrap();
    let handle = vm.handle();
    let watcher = std::thread::spawn(move || {
        wait_for("running", || handle.status()["state"] == "running");
        let status = handle.status();
        handle.power_off();
        status
    });
    assert_eq!(vm.run().unwrap(), ExitReason::Shutdown);
    let status = watcher.join().unwrap();
    assert_eq!(status["cpus"], 2);
    assert_eq!(status["memory_mib"], 64);
    assert_eq!(status["devices"][0]["type"], "rng");
    assert_eq!(status["devices"][0]["bar"], "0xc0000000");
}

/// 64-bit code: a pseudo-random walk over PCI config space (0xCF8/0xCFC) and the first
/// device's BAR, then OK and power off.
fn pci_garbage_guest(iterations: u32) -> Vec<u8> {
    let mut code = vec![0xbb, 0x39, 0x30, 0x00, 0x00]; // mov ebx, 12345
    code.push(0xb9); // mov ecx, iterations
    code.extend_from_slice(&iterations.to_le_bytes());
    let top = code.len();
    let next_random = [0x69, 0xdb, 0x6d, 0x4e, 0xc6, 0x41, 0x81, 0xc3, 0x39, 0x30, 0x00, 0x00];
    code.extend_from_slice(&next_random); // ebx = ebx * 1103515245 + 12345
    code.extend_from_slice(&[0x89, 0xd8]); // mov eax, ebx
    code.extend_from_slice(&[0x25, 0xfc, 0xff, 0x00, 0x00]); // and eax, 0xfffc: device, function, register
    code.extend_from_slice(&[0x0d, 0x00, 0x00, 0x00, 0x80]); // or eax, 0x80000000: enable, bus 0
    code.extend_from_slice(&[0x66, 0xba, 0xf8, 0x0c, 0xef]); // out 0xcf8, eax
    code.extend_from_slice(&next_random);
    code.extend_from_slice(&[0x89, 0xd8]); // mov eax, ebx
    code.extend_from_slice(&[0x66, 0xba, 0xfc, 0x0c, 0xef, 0xed]); // out 0xcfc, eax; in eax, 0xcfc
    code.extend_from_slice(&[0x66, 0xba, 0xfe, 0x0c, 0x66, 0xef]); // out 0xcfe, ax
    code.extend_from_slice(&next_random);
    code.extend_from_slice(&[0x89, 0xdf]); // mov edi, ebx
    code.extend_from_slice(&[0x81, 0xe7, 0xfc, 0x7f, 0x00, 0x00]); // and edi, 0x7ffc
    code.extend_from_slice(&[0x81, 0xcf, 0x00, 0x00, 0x00, 0xc0]); // or edi, 0xc0000000: BAR
    code.extend_from_slice(&[0x89, 0x1f, 0x8b, 0x07]); // mov [rdi], ebx; mov eax, [rdi]
    code.extend_from_slice(&[0xff, 0xc9]); // dec ecx
    code.extend_from_slice(&[0x0f, 0x85]); // jnz top
    let rel = top as i64 - (code.len() as i64 + 4);
    code.extend_from_slice(&(rel as i32).to_le_bytes());
    code.extend_from_slice(&print(b"OK"));
    code.extend_from_slice(POWER_OFF);
    code
}

#[test]
fn a_guest_poking_garbage_into_pci_cannot_crash_the_vmm() {
    let guest = Guest::new(&pci_garbage_guest(5000));
    let mut config = guest.config();
    config.devices = vec![DeviceSpec::Virtio(Box::new(Rng::new().unwrap()))];
    let mut vm = Vm::new(config).unwrap();
    // The guest may hit the reset bit of 0xCF9 only through a byte write, which it never
    // does; everything else must leave the VMM running until the power-off.
    assert_eq!(vm.run().unwrap(), ExitReason::PowerOff);
    assert_eq!(guest.output(), "OK");
}

fn new_error(config: VmConfig) -> VmError {
    Vm::new(config).expect_err("the config must be refused")
}

#[test]
fn bad_configs_are_refused_with_clear_errors() {
    let guest = Guest::new(HALT);
    let missing = VmConfig::new("/nonexistent/vmlinuz");
    assert!(new_error(missing).to_string().contains("check the path"));

    let mut cpus = guest.config();
    cpus.cpus = 0;
    assert!(new_error(cpus).to_string().contains("vCPUs requested"));
    let mut cpus = guest.config();
    cpus.cpus = 255;
    assert!(new_error(cpus).to_string().contains("vCPUs requested"));

    let mut memory = guest.config();
    memory.memory_mib = 1 << 40;
    assert!(new_error(memory).to_string().contains("out of range"));

    let big = guest.dir.path().join("big.img");
    std::fs::File::create(&big).unwrap().set_len(64 << 20).unwrap();
    let mut initrd = guest.config();
    initrd.initrd = Some(big);
    assert!(new_error(initrd).to_string().contains("does not fit"));

    let mut vhost = guest.config();
    vhost.devices = vec![DeviceSpec::VhostUser {
        kind: pleiades_virtio::DeviceType::Rng,
        socket: Path::new("/tmp/rng.sock").into(),
    }];
    assert!(new_error(vhost).to_string().contains("vhost-user"));
}

#[test]
fn corrupt_kernels_and_bad_command_lines_fail_at_boot() {
    let guest = Guest::new(HALT);
    let corrupt = guest.dir.path().join("corrupt");
    std::fs::write(&corrupt, vec![0x5a; 8192]).unwrap();
    let mut config = guest.config();
    config.kernel = corrupt;
    let err = Vm::new(config).unwrap().run().unwrap_err();
    assert!(err.to_string().contains("neither an ELF nor a bzImage"), "{err}");

    let truncated = guest.dir.path().join("truncated.elf");
    std::fs::write(&truncated, &std::fs::read(guest.kernel()).unwrap()[..100]).unwrap();
    let mut config = guest.config();
    config.kernel = truncated;
    assert!(Vm::new(config).unwrap().run().is_err());

    let mut config = guest.config();
    config.cmdline = "x".repeat(5000);
    let err = Vm::new(config).unwrap().run().unwrap_err();
    assert!(err.to_string().contains("command line"), "{err}");
}

/// Runs `vm`, shutting it down if it has not stopped after 30 s (a guest stuck polling).
fn run_with_timeout(mut vm: Vm) -> ExitReason {
    let handle = vm.handle();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watchdog = {
        let done = done.clone();
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(30);
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                if Instant::now() > deadline {
                    handle.power_off();
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };
    let reason = vm.run().unwrap();
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    watchdog.join().unwrap();
    reason
}

/// 64-bit code: a polling virtio-rng driver (see [`virtio_rng_guest`]), ending with `tail`.
fn virtio_rng_guest_then(tail: &[u8]) -> Vec<u8> {
    let mut code = virtio_rng_guest();
    code.truncate(code.len() - POWER_OFF.len());
    code.extend_from_slice(tail);
    code
}

/// 64-bit code: a polling virtio-rng driver. It finds the device at 00:01.0, negotiates
/// VERSION_1, sets up queue 0 (16 entries: descriptors at 0x10000, avail at 0x11000, used at
/// 0x12000) with one 32-byte writable buffer, sets DRIVER_OK, notifies (an ioeventfd), and
/// waits for the used ring. Prints V (vendor/device id seen), R (request completed), N (32
/// bytes written), then powers off.
fn virtio_rng_guest() -> Vec<u8> {
    let mut code = Vec::new();
    // PCI config of 00:01.0 register 0 through 0xCF8/0xCFC.
    code.extend_from_slice(&[0xb8, 0x00, 0x08, 0x00, 0x80, 0x66, 0xba, 0xf8, 0x0c, 0xef]);
    code.extend_from_slice(&[0x66, 0xba, 0xfc, 0x0c, 0xed]); // in eax, dx
    code.extend_from_slice(&[0x3d, 0xf4, 0x1a, 0x44, 0x10]); // cmp eax, 0x10441af4
    let v = print(b"V");
    code.extend_from_slice(&[0x75, v.len() as u8]);
    code.extend_from_slice(&v);
    code.extend_from_slice(&[0xb8, 0x00, 0x00, 0x00, 0xc0]); // mov eax, 0xc0000000 (BAR0)
    let byte = |code: &mut Vec<u8>, off: u32, value: u8| {
        code.extend_from_slice(&[0xc6, 0x80]);
        code.extend_from_slice(&off.to_le_bytes());
        code.push(value);
    };
    let word = |code: &mut Vec<u8>, off: u32, value: u16| {
        code.extend_from_slice(&[0x66, 0xc7, 0x80]);
        code.extend_from_slice(&off.to_le_bytes());
        code.extend_from_slice(&value.to_le_bytes());
    };
    let dword = |code: &mut Vec<u8>, off: u32, value: u32| {
        code.extend_from_slice(&[0xc7, 0x80]);
        code.extend_from_slice(&off.to_le_bytes());
        code.extend_from_slice(&value.to_le_bytes());
    };
    let mem32 = |code: &mut Vec<u8>, addr: u32, value: u32| {
        code.extend_from_slice(&[0xc7, 0x04, 0x25]);
        code.extend_from_slice(&addr.to_le_bytes());
        code.extend_from_slice(&value.to_le_bytes());
    };
    byte(&mut code, 0x14, 0); // reset
    byte(&mut code, 0x14, 3); // ACKNOWLEDGE | DRIVER
    dword(&mut code, 0x08, 1); // driver_feature_select = 1
    dword(&mut code, 0x0c, 1); // VERSION_1
    byte(&mut code, 0x14, 0xb); // FEATURES_OK
    word(&mut code, 0x16, 0); // queue_select
    word(&mut code, 0x18, 16); // queue_size
    for (off, addr) in [(0x20, 0x1_0000u32), (0x28, 0x1_1000), (0x30, 0x1_2000)] {
        dword(&mut code, off, addr);
        dword(&mut code, off + 4, 0);
    }
    word(&mut code, 0x1c, 1); // queue_enable
    mem32(&mut code, 0x1_0000, 0x3_0000); // descriptor 0: buffer at 0x30000
    mem32(&mut code, 0x1_0004, 0);
    mem32(&mut code, 0x1_0008, 32); // 32 bytes
    mem32(&mut code, 0x1_000c, 2); // VRING_DESC_F_WRITE
    mem32(&mut code, 0x1_1004, 0); // avail ring[0] = descriptor 0
    mem32(&mut code, 0x1_1000, 0x1_0000); // avail flags 0, idx 1
    byte(&mut code, 0x14, 0xf); // DRIVER_OK
    word(&mut code, 0x3000, 0); // notify queue 0
    // Poll the used index.
    let poll = [0x66, 0x83, 0x3c, 0x25, 0x02, 0x20, 0x01, 0x00, 0x01]; // cmp word [0x12002], 1
    code.extend_from_slice(&poll);
    code.extend_from_slice(&[0x75, (-(poll.len() as i8) - 2) as u8]);
    code.extend_from_slice(&print(b"R"));
    code.extend_from_slice(&[0x83, 0x3c, 0x25, 0x08, 0x20, 0x01, 0x00, 0x20]); // cmp dword [0x12008], 32
    let n = print(b"N");
    code.extend_from_slice(&[0x75, n.len() as u8]);
    code.extend_from_slice(&n);
    code.extend_from_slice(POWER_OFF);
    code
}

#[test]
fn a_guest_driver_gets_entropy_from_virtio_rng_over_pci() {
    let guest = Guest::new(&virtio_rng_guest());
    let mut config = guest.config();
    config.devices = vec![DeviceSpec::Virtio(Box::new(Rng::new().unwrap()))];
    let vm = Vm::new(config).unwrap();
    let handle = vm.handle();
    assert_eq!(run_with_timeout(vm), ExitReason::PowerOff, "serial: {:?}", guest.output());
    assert_eq!(guest.output(), "VRN");
    assert_eq!(handle.status()["state"], "stopped");
}

#[test]
fn a_guest_driver_gets_entropy_from_a_vhost_user_rng_backend() {
    let guest = Guest::new(&virtio_rng_guest());
    let socket = guest.dir.path().join("rng.sock");
    let backend = {
        let socket = socket.clone();
        std::thread::spawn(move || pleiades_virtio::vhost_user::serve(Box::new(Rng::new().unwrap()), &socket))
    };
    wait_for("the backend's socket", || socket.exists());
    let mut config = guest.config();
    config.devices = vec![DeviceSpec::VhostUser { kind: pleiades_virtio::DeviceType::Rng, socket }];
    let vm = Vm::new(config).unwrap();
    let handle = vm.handle();
    assert_eq!(run_with_timeout(vm), ExitReason::PowerOff, "serial: {:?}", guest.output());
    assert_eq!(guest.output(), "VRN");
    assert_eq!(handle.status()["devices"][0]["type"], "rng");
    drop(handle);
    // The VM is gone, so is the connection: the backend ends cleanly.
    backend.join().unwrap().unwrap();
}

#[test]
fn devices_work_again_after_a_reset() {
    let guest = Guest::new(&virtio_rng_guest_then(TRIPLE_FAULT));
    let mut config = guest.config();
    config.on_reboot = RebootPolicy::Restart;
    config.devices = vec![DeviceSpec::Virtio(Box::new(Rng::new().unwrap()))];
    let mut vm = Vm::new(config).unwrap();
    let handle = vm.handle();
    let serial = guest.serial();
    let watcher = std::thread::spawn(move || {
        wait_for("three boots that got entropy", || {
            String::from_utf8_lossy(&std::fs::read(&serial).unwrap_or_default()).matches("VRN").count() >= 3
        });
        handle.power_off();
    });
    assert_eq!(vm.run().unwrap(), ExitReason::Shutdown);
    watcher.join().unwrap();
    assert!(guest.output().starts_with("VRNVRNVRN"), "{}", guest.output());
}

#[test]
fn a_vhost_user_device_works_again_after_a_reset() {
    let guest = Guest::new(&virtio_rng_guest_then(TRIPLE_FAULT));
    let socket = guest.dir.path().join("rng.sock");
    let backend = {
        let socket = socket.clone();
        std::thread::spawn(move || pleiades_virtio::vhost_user::serve(Box::new(Rng::new().unwrap()), &socket))
    };
    wait_for("the backend's socket", || socket.exists());
    let mut config = guest.config();
    config.on_reboot = RebootPolicy::Restart;
    config.devices = vec![DeviceSpec::VhostUser { kind: pleiades_virtio::DeviceType::Rng, socket }];
    let mut vm = Vm::new(config).unwrap();
    let handle = vm.handle();
    let serial = guest.serial();
    let watcher = std::thread::spawn(move || {
        wait_for("three boots that got entropy", || {
            String::from_utf8_lossy(&std::fs::read(&serial).unwrap_or_default()).matches("VRN").count() >= 3
        });
        handle.power_off();
    });
    assert_eq!(vm.run().unwrap(), ExitReason::Shutdown);
    watcher.join().unwrap();
    drop(vm);
    assert!(guest.output().starts_with("VRNVRNVRN"), "{}", guest.output());
    backend.join().unwrap().unwrap();
}
