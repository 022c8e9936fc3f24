//! USB redirection end to end: an emulated USB stick on the client (a raw ext4 image) goes
//! through the session's USB channel to the VM process, which checks it against the desktop's
//! policy (`run --usb 0525:a4a5`) and has the guest agent attach it to the Linux guest's own
//! `vhci-hcd` over a vsock stream; the guest's real `usb-storage` and `sd` drivers then use it.
//!
//! 1. The `pleiades` binary (`--usb-emulated-disk`): the guest mounts the stick, reads a file
//!    the test put there (same SHA-256) and writes one that the test then finds in the image.
//! 2. The client library: a second device that the policy does not allow never reaches the
//!    guest (refused, counted for the audit); the allowed one is unplugged while the guest
//!    reads it: the guest sees a disconnect, its reader ends with an error instead of hanging,
//!    and the guest, its agent and the session go on.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use pleiades_client::usb::emulated::EmulatedDisk;
use pleiades_client::usb::redirect::{Redirect, unplug};
use pleiades_client::usb::{Completions, DeviceInfo, UsbDevice};
use pleiades_protocol::connfile::Connection;
use pleiades_protocol::usbip::CmdSubmit;
use pleiades_testkit::wait_for;

#[path = "support/client.rs"]
mod client;
use pleiades_tests::disk::{ext4_raw, ext4_read, mount_read_write, sha256_hex};
use pleiades_tests::served::ServedDesktop;
use pleiades_tests::workspace_binary;

const SHELL: Duration = Duration::from_secs(120);
const STICK_MIB: u32 = 32;

fn usb_status(desktop: &ServedDesktop) -> serde_json::Value {
    desktop.status()["agent"]["usb"].clone()
}

/// Waits until the guest has `dev` (or, with `present == false`, until it is gone).
fn wait_block(desktop: &mut ServedDesktop, dev: &str, present: bool) {
    assert!(desktop.guest.wait_path(dev, present).unwrap(), "{dev} present={present} never came");
}

/// A stick whose ids the pool's policy does not list.
#[derive(Debug)]
struct OtherVendor(EmulatedDisk);

impl UsbDevice for OtherVendor {
    fn info(&self) -> DeviceInfo {
        DeviceInfo { vendor_id: 0x1234, product_id: 0x5678, ..self.0.info() }
    }
    fn submit(&mut self, urb: CmdSubmit, done: &Completions) {
        self.0.submit(urb, done);
    }
    fn park(self: Box<Self>) -> Option<Box<dyn UsbDevice>> {
        Some(self)
    }
}

#[test]
fn a_client_usb_stick_is_mounted_read_written_refused_and_unplugged_in_the_guest() {
    let (mut desktop, _) = ServedDesktop::boot_with(&["gpu", "vsock"], &["--usb", "0525:a4a5"]);
    let dir = desktop.dir.path().to_owned();
    let hello = pleiades_tests::incompressible(3 << 20, 7);
    let stick = dir.join("stick.img");
    ext4_raw(&stick, STICK_MIB, &[("hello.bin", &hello)]).unwrap();
    wait_for("the agent", Duration::from_secs(90), || {
        (desktop.status()["agent"]["connected"] == true).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}: {:#}", desktop.status()));
    assert_eq!(usb_status(&desktop)["policy"], "0525:a4a5");

    // 1. The binary with --usb-emulated-disk.
    let record = dir.join("record");
    let mut client = Command::new(workspace_binary("pleiades").unwrap())
        .arg("connect")
        .arg(desktop.connection_file())
        .args(["--headless", "--no-h264", "--no-audio", "--record"])
        .arg(&record)
        .arg("--usb-emulated-disk")
        .arg(&stick)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let attached = wait_for("the stick attached", Duration::from_secs(90), || {
        (usb_status(&desktop)["attached"].as_u64() >= Some(1)).then_some(())
    });
    if let Err(e) = attached {
        let _ = client.kill();
        let output = client.wait_with_output().unwrap();
        let agent_log = desktop.guest.run("cat /run/pleiades-agent.log", SHELL).unwrap_or_default();
        panic!(
            "{e}: {:#}\nclient: {}\nagent: {agent_log:?}",
            usb_status(&desktop),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    wait_block(&mut desktop, "/dev/sda", true);
    // The guest's own USB stack sees the stick: its ids, and usb-storage bound to it.
    let ids = desktop
        .guest
        .run("cat /sys/bus/usb/devices/*/idVendor /sys/bus/usb/devices/*/idProduct", SHELL)
        .unwrap();
    assert!(ids.iter().any(|l| l.trim() == "0525") && ids.iter().any(|l| l.trim() == "a4a5"), "{ids:?}");
    let drivers = desktop.guest.run("ls /sys/bus/usb/drivers/usb-storage/", SHELL).unwrap();
    assert!(drivers.iter().any(|l| l.contains(':')), "usb-storage bound no interface: {drivers:?}");
    let written = format!("written in the guest {}", std::process::id());
    let out = desktop
        .guest
        .run(&mount_read_write("/dev/sda", "hello.bin", "from-guest.txt", &written), SHELL)
        .unwrap();
    let sum = sha256_hex(&hello);
    assert!(out.iter().any(|l| l.starts_with(&sum)), "the guest read other bytes: {out:?} (want {sum})");
    assert!(Command::new("kill").args(["-TERM", &client.id().to_string()]).status().unwrap().success());
    let deadline = Instant::now() + Duration::from_secs(60);
    while client.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the client did not end on SIGTERM");
        std::thread::sleep(Duration::from_millis(100));
    }
    let output = client.wait_with_output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(record.join("usb.json")).unwrap()).unwrap();
    assert_eq!(report[0]["usb_id"], "0525:a4a5", "{report:#}");
    assert!(report[0]["urbs"].as_u64() > Some(100), "{report:#}");
    assert!(report[0]["bytes_to_guest"].as_u64() >= Some(hello.len() as u64), "{report:#}");
    // The client left: the guest saw the stick go.
    wait_block(&mut desktop, "/dev/sda", false);
    assert_eq!(ext4_read(&stick, "from-guest.txt").unwrap(), format!("{written}\n").into_bytes());

    // 2. The library: one stick allowed, one not; the allowed one unplugged mid-read.
    let other = dir.join("other.img");
    ext4_raw(&other, 8, &[("x", b"x")]).unwrap();
    let connection =
        Connection::from_toml(&std::fs::read_to_string(desktop.mint("second.pleiades")).unwrap()).unwrap();
    let session = client::LibrarySession::start(&connection);
    let handle = session.handle.clone();
    let devices: Vec<Box<dyn UsbDevice>> = vec![
        Box::new(EmulatedDisk::open(&stick, false).unwrap()),
        Box::new(OtherVendor(EmulatedDisk::open(&other, false).unwrap())),
    ];
    let redirect = Redirect::start(&handle, devices).expect("the server takes USB devices");
    wait_for("both answers", Duration::from_secs(90), || {
        let reports = redirect.reports();
        (reports[0].state == "attached" && reports[1].state == "refused").then_some(reports)
    })
    .unwrap_or_else(|e| panic!("{e}: {:?}", redirect.reports()));
    assert_eq!(usb_status(&desktop)["denied"], 1, "{:#}", desktop.status());
    wait_block(&mut desktop, "/dev/sda", true);
    let ids = desktop.guest.run("cat /sys/bus/usb/devices/*/idVendor", SHELL).unwrap();
    assert!(!ids.iter().any(|l| l.trim() == "1234"), "a denied device reached the guest: {ids:?}");
    assert!(desktop.guest.run_status("[ -e /dev/sdb ]", SHELL).unwrap().0 != 0, "a second disk appeared");

    // The guest reads the stick over and over; the stick goes while it does.
    desktop.guest.start_block_reader("/dev/sda").unwrap();
    let before = usb_status(&desktop)["bytes_to_guest"].as_u64().unwrap();
    wait_for("the reader under way", Duration::from_secs(120), || {
        (usb_status(&desktop)["bytes_to_guest"].as_u64().unwrap() > before + (1 << 20)).then_some(())
    })
    .unwrap();
    assert!(unplug(&handle, 1));
    wait_block(&mut desktop, "/dev/sda", false);
    assert!(desktop.guest.block_reader_ended().unwrap(), "the reader hangs");
    desktop.guest.run("dmesg | grep 'USB disconnect'", SHELL).expect("the guest saw the stick unplugged");
    let reports = redirect.reports();
    assert_eq!(reports[0].state, "detached", "{reports:?}");
    // The VM and the session go on.
    assert_eq!(
        desktop.guest.run("echo alive", SHELL).unwrap().last().map(|l| l.trim().to_owned()),
        Some("alive".into())
    );
    assert_eq!(desktop.status()["agent"]["connected"], true);
    assert!(!handle.is_closed(), "the session ended with the device");
    assert_eq!(usb_status(&desktop)["devices"].as_array().map(Vec::len), Some(0), "{:#}", desktop.status());
    session.disconnect();
    let (_, devices) = redirect.finish();
    assert_eq!(devices.len(), 2, "the devices come back");
    pleiades_tests::disk::ext4_check(&stick).unwrap_or_else(|e| panic!("{e}"));
}
