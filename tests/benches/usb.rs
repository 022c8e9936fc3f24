//! The USB redirection benchmark: `cargo bench -p pleiades-tests --bench usb --profile dev`
//! (the binaries of the same profile must be built: `cargo build --workspace`). Needs the test
//! image (`cargo xtask guest-image`).
//!
//! The Linux test image under `pleiades-host run --vmm qemu` (QEMU TCG here), served on
//! loopback, with one ext4 image twice: as a virtio disk (`--disk`, the reference: the guest
//! reads it through QEMU's block layer) and, as a copy, as the client's emulated USB stick
//! (`--usb-emulated-disk`'s device, through the client library), redirected into the guest's
//! `vhci-hcd`. In the guest, `pleiades-agent disk-bench` reads each: 32 MiB sequentially (MB/s)
//! and 1,000 scattered 4 KiB blocks (reads a second, one at a time), the page cache dropped.
//! The stick is measured on loopback and through the link emulator at 20 ms RTT, 100 Mbit/s;
//! each figure is printed with the virtio disk's of the same run and their ratio.

use std::path::Path;
use std::time::Duration;

use pleiades_client::usb::UsbDevice;
use pleiades_client::usb::emulated::EmulatedDisk;
use pleiades_client::usb::redirect::{Redirect, unplug};
use pleiades_protocol::connfile::Connection;
use pleiades_tests::disk::ext4_raw;
use pleiades_tests::linkem::{Link, LinkConfig};
use pleiades_tests::served::{ServedDesktop, mint_connection as mint};
use pleiades_tests::wait_for;
use serde_json::Value;

#[path = "../tests/support/client.rs"]
mod client;

const SHELL: Duration = Duration::from_secs(600);
const IMAGE_MIB: u32 = 64;
const BENCH: &str = "pleiades-agent disk-bench --sequential-mib 32 --random 1000";

fn main() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    let data = pleiades_tests::incompressible(40 << 20, 0x9e37_79b9_7f4a_7c15);
    ext4_raw(&disk, IMAGE_MIB, &[("data.bin", &data)]).unwrap();
    let stick = dir.path().join("stick.img");
    std::fs::copy(&disk, &stick).unwrap();
    let disk_arg = disk.to_str().unwrap().to_owned();
    let (mut desktop, _) =
        ServedDesktop::boot_with(&["gpu", "vsock"], &["--disk", &disk_arg, "--usb", "0525:a4a5"]);
    wait_for("the agent", Duration::from_secs(120), || {
        (desktop.status()["agent"]["connected"] == true).then_some(())
    })
    .unwrap();

    let reference = disk_bench(&mut desktop, "/dev/vda");
    println!(
        "virtio disk (the same image through QEMU's block layer): {:.1} MB/s sequential, {:.0} random 4 KiB reads/s",
        reference.0, reference.1
    );

    let direct = mint(&desktop.control(), None);
    let server = format!("{}:{}", direct.host, direct.port).parse().unwrap();
    let link = Link::start(server, LinkConfig::wan(Duration::from_millis(20), 0.0, 100)).unwrap();
    for (name, connection) in
        [("loopback", direct), ("20 ms RTT, 100 Mbit/s", mint(&desktop.control(), Some(&link)))]
    {
        let stick = redirected(&mut desktop, &connection, &stick, name);
        println!(
            "USB stick, {name}: {:.1} MB/s sequential ({:.2}× the virtio disk), {:.0} random 4 KiB reads/s ({:.2}×)",
            stick.0,
            stick.0 / reference.0,
            stick.1,
            stick.1 / reference.1
        );
    }
    drop(link);
    let status = desktop.status();
    println!("the VM process's USB counters: {}", status["agent"]["usb"]);
}

/// `disk-bench` of `device` in the guest: (sequential MB/s, random reads a second).
fn disk_bench(desktop: &mut ServedDesktop, device: &str) -> (f64, f64) {
    let out = desktop.guest.run(&format!("{BENCH} {device}"), SHELL).unwrap();
    let line =
        out.iter().find_map(|l| l.trim().strip_prefix("PLEIADES-DISK ")).unwrap_or_else(|| panic!("{out:?}"));
    let report: Value = serde_json::from_str(line).unwrap();
    (report["sequential_mb_s"].as_f64().unwrap(), report["random_iops"].as_f64().unwrap())
}

/// The stick redirected over a session on `connection`, measured in the guest, then unplugged.
fn redirected(desktop: &mut ServedDesktop, connection: &Connection, stick: &Path, name: &str) -> (f64, f64) {
    let session = client::LibrarySession::start(connection);
    let handle = session.handle.clone();
    let devices: Vec<Box<dyn UsbDevice>> = vec![Box::new(EmulatedDisk::open(stick, false).unwrap())];
    let redirect = Redirect::start(&handle, devices).expect("the server takes USB devices");
    let appeared = desktop.guest.wait_path("/dev/sda", true).unwrap();
    assert!(appeared, "{name}: the stick did not appear: {:?}", redirect.reports());
    let figures = disk_bench(desktop, "/dev/sda");
    unplug(&handle, 1);
    assert!(desktop.guest.wait_path("/dev/sda", false).unwrap(), "{name}: the stick did not go");
    session.disconnect();
    let _ = redirect.finish();
    figures
}
