//! Bad input to `pleiades-host`: a clear message and a non-zero exit, never a panic.

use std::process::{Command, Output};

fn host(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pleiades-host")).args(args).output().expect("pleiades-host runs")
}

fn assert_refused(output: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "should fail: {stderr}");
    assert!(stderr.contains(needle), "expected {needle:?} in:\n{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn bad_boot_requests_are_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk");
    std::fs::write(&junk, vec![0x42u8; 8192]).unwrap();
    let elf = dir.path().join("guest.elf");
    std::fs::write(&elf, b"\x7fELF\x02\x01\x01\0").unwrap();
    let big = dir.path().join("big.cpio");
    std::fs::write(&big, vec![0u8; 40 << 20]).unwrap();
    let junk = junk.to_str().unwrap();
    let elf = elf.to_str().unwrap();
    let big = big.to_str().unwrap();

    assert_refused(&host(&["run", "--kernel", "/nonexistent/vmlinuz"]), "cannot read the kernel");
    assert_refused(&host(&["run", "--kernel", junk]), "neither a Linux bzImage nor an ELF");
    assert_refused(&host(&["run", "--kernel", elf, "--memory", "12X"]), "is not a size");
    assert_refused(&host(&["run", "--kernel", elf, "--memory", "4M"]), "out of range");
    assert_refused(&host(&["run", "--kernel", elf, "--cpus", "999"]), "--cpus 999 is out of range");
    assert_refused(&host(&["run", "--kernel", elf, "--initrd", big, "--memory", "64M"]), "does not fit");
    assert_refused(&host(&["run", "--kernel", elf, "--device", "floppy"]), "unknown device");
    assert_refused(
        &host(&["run", "--kernel", elf, "--vmm", "qemu", "--device", "console"]),
        "use --vmm pleiades",
    );
}

#[test]
fn ctl_and_device_errors_say_what_to_do() {
    assert_refused(&host(&["ctl", "/nonexistent/vm.sock", "status"]), "Is `pleiades-host run --control");
    assert_refused(&host(&["device", "rng", "--socket", "/nonexistent/dir/rng.sock"]), "rng.sock");
}
