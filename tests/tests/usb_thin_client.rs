//! USB redirection on the real-device path: a thin client machine (a QEMU TCG VM with QEMU's
//! emulated USB stick on an xHCI controller, [`ThinClient`]) runs the `pleiades` client, which
//! finds the stick through libusb (`--usb 46f4:0001`), takes it from the thin client's own
//! `usb-storage` driver, and redirects it over the session's QUIC connection into a Linux
//! desktop (QEMU TCG here, the VM process relaying to the guest agent and `vhci-hcd`).
//!
//! - the desktop's own `usb-storage` mounts the stick, reads a file the test put there (same
//!   SHA-256) and writes one that the test then finds in the stick's backing image;
//! - the thin client's USB keyboard (`usb-kbd`) goes along (`--usb 46f4:0001,0627:0001`; the
//!   pool allows `class=03`): a key pressed on it arrives as key events on the desktop's own
//!   `usbhid` keyboard — interrupt transfers that wait in flight until a key is pressed, while
//!   the stick's bulk transfers go on;
//! - the thin client's USB sound card (`usb-audio`) goes along too (`class=01`): a tone the
//!   desktop plays on it through its own `snd-usb-audio` (isochronous OUT transfers) comes out
//!   of the thin client's card, at its frequency;
//! - the thin client's drivers let go of the devices while they are redirected and get them
//!   back after the client ends;
//! - hot-plug both ways: a second stick plugged into the thin client while connected reaches
//!   the desktop; pulled out while the desktop reads it, the desktop sees a disconnect, its
//!   reader ends, and the desktop and the session go on.

use std::time::Duration;

use pleiades_protocol::connfile::Connection;
use pleiades_testkit::wait_for;
use pleiades_tests::disk::{ext4_raw, ext4_read, mount_read_write, sha256_hex};
use pleiades_tests::served::ServedDesktop;
use pleiades_tests::thin_client::{
    AUDIO_USB_ID, HOST_FROM_INSIDE, KEYBOARD_USB_ID, STICK_USB_ID, ThinClient,
};
use pleiades_tests::workspace_binary;

const SHELL: Duration = Duration::from_secs(180);

fn usb_status(desktop: &ServedDesktop) -> serde_json::Value {
    desktop.status()["agent"]["usb"].clone()
}

fn wait_block(desktop: &mut ServedDesktop, thin: &mut ThinClient, dev: &str, present: bool) {
    if !desktop.guest.wait_path(dev, present).unwrap() {
        panic!("{dev} present={present} never came\n{}", evidence(desktop, thin));
    }
}

/// Everything that says why, when a wait fails.
fn evidence(desktop: &mut ServedDesktop, thin: &mut ThinClient) -> String {
    let client_log = std::fs::read_to_string(thin.scratch().join("client.log")).unwrap_or_default();
    format!(
        "desktop: {:#}\nclient log:\n{client_log}\nthin client dmesg:\n{}\ndesktop dmesg:\n{}",
        desktop.status(),
        thin.dmesg(30),
        desktop.guest.run("dmesg | tail -n 30", SHELL).unwrap_or_default().join("\n")
    )
}

#[test]
fn a_thin_clients_usb_stick_goes_through_libusb_into_the_desktop_and_hot_plugs_both_ways() {
    let policy = format!("{STICK_USB_ID},class=03,class=01");
    let (mut desktop, _) = ServedDesktop::boot_with(&["gpu", "vsock"], &["--usb", &policy]);
    let dir = desktop.dir.path().to_owned();
    let hello = pleiades_tests::incompressible(2 << 20, 11);
    let (stick, spare) = (dir.join("stick.img"), dir.join("spare.img"));
    ext4_raw(&stick, 32, &[("hello.bin", &hello)]).unwrap();
    ext4_raw(&spare, 16, &[("spare.txt", b"the second stick\n")]).unwrap();
    let mut thin = ThinClient::boot(&stick, &spare).unwrap();

    // The thin client's own kernel has the stick, and the client lists it.
    assert!(thin.usb_storage_bound().unwrap(), "the thin client's usb-storage did not take the stick");
    let client = workspace_binary("pleiades").unwrap();
    let listed = thin.run(&format!("{} usb-list --json", client.display())).unwrap().join("");
    let listed: serde_json::Value = serde_json::from_str(listed.trim()).unwrap();
    assert!(
        listed.as_array().unwrap().iter().any(|d| d["usb_id"] == STICK_USB_ID && d["interfaces"][0] == "08"),
        "{listed:#}"
    );

    // A connection file for the client inside: the session server is on this machine's loopback.
    let mut connection =
        Connection::from_toml(&std::fs::read_to_string(desktop.mint("thin.pleiades")).unwrap()).unwrap();
    connection.host = HOST_FROM_INSIDE.into();
    let connection_file = thin.scratch().join("thin.pleiades");
    std::fs::write(&connection_file, connection.to_toml()).unwrap();
    let record = thin.scratch().join("record");
    wait_for("the agent", Duration::from_secs(120), || {
        (desktop.status()["agent"]["connected"] == true).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}: {:#}", desktop.status()));

    let pid = thin
        .spawn_client(
            &client,
            &[
                "connect",
                &connection_file.display().to_string(),
                "--headless",
                "--no-h264",
                "--no-audio",
                "--record",
                &record.display().to_string(),
                "--usb",
                &format!("{STICK_USB_ID},{KEYBOARD_USB_ID},{AUDIO_USB_ID}"),
            ],
            "client",
        )
        .unwrap();
    if let Err(e) =
        wait_for("the stick, the keyboard and the sound card attached", Duration::from_secs(180), || {
            (usb_status(&desktop)["attached"].as_u64() >= Some(3)).then_some(())
        })
    {
        panic!("{e}\n{}", evidence(&mut desktop, &mut thin));
    }
    wait_block(&mut desktop, &mut thin, "/dev/sda", true);
    // Redirected: the thin client's own driver let go of it.
    assert!(!thin.usb_storage_bound().unwrap(), "the thin client's usb-storage still has the stick");
    let ids = desktop.guest.run("cat /sys/bus/usb/devices/*/idVendor", SHELL).unwrap();
    assert!(ids.iter().any(|l| l.trim() == "46f4") && ids.iter().any(|l| l.trim() == "0627"), "{ids:?}");

    // A key pressed on the thin client's keyboard reaches the desktop's usbhid keyboard.
    let keyboard = pleiades_tests::evdev::node_of("QEMU USB Keyboard");
    let (status, out) = desktop
        .guest
        .run_status(
            &format!(
                "i=0; until [ -n \"{keyboard}\" ] || [ $i -gt 240 ]; do i=$((i+1)); sleep 0.5; done; \
                 EV={keyboard}; [ -n \"$EV\" ] || exit 1; dd if=/dev/input/$EV of=/tmp/kbd bs=24 count=6 2>/dev/null & DD=$!; \
                 for i in $(seq 50); do ls -l /proc/$DD/fd 2>/dev/null | grep -q /dev/input && break; sleep 0.2; done; \
                 ls -l /proc/$DD/fd | grep -c /dev/input"
            ),
            SHELL,
        )
        .unwrap();
    assert_eq!(
        status,
        0,
        "no evdev node for the redirected keyboard: {out:?}\n{}",
        evidence(&mut desktop, &mut thin)
    );
    thin.key("a").unwrap();
    let od = desktop
        .guest
        .run("wait $DD; od -An -v -tx1 /tmp/kbd", SHELL)
        .unwrap_or_else(|e| panic!("no key events: {e}\n{}", evidence(&mut desktop, &mut thin)));
    let events = pleiades_tests::evdev::events_from_od(&od);
    const EV_KEY: u16 = 1;
    const KEY_A: u16 = 30;
    assert!(events.contains(&(EV_KEY, KEY_A, 1)) && events.contains(&(EV_KEY, KEY_A, 0)), "{events:?}");

    // A tone played in the desktop on the redirected sound card comes out of the thin client's.
    wait_block(&mut desktop, &mut thin, "/dev/snd/pcmC0D0p", true);
    let tone = desktop
        .guest
        .run("pleiades-agent tone --device /dev/snd/pcmC0D0p --freq 440 --seconds 2 --amplitude 0.5", SHELL)
        .unwrap_or_else(|e| panic!("the tone did not play: {e}\n{}", evidence(&mut desktop, &mut thin)));
    assert!(tone.iter().any(|l| l.contains("PLEIADES-TONE")), "{tone:?}");
    let heard = wait_for("the tone out of the thin client's card", Duration::from_secs(60), || {
        let left = pleiades_tests::audio::left(&thin.speaker_samples());
        let span = pleiades_tests::audio::tone_span(&left, 48_000, 2000.0)?;
        (span.1 - span.0 >= 24_000).then(|| left[span.0..span.1.min(left.len())].to_vec())
    })
    .unwrap_or_else(|e| {
        panic!("{e}: {} samples\n{}", thin.speaker_samples().len(), evidence(&mut desktop, &mut thin))
    });
    let frequency = pleiades_tests::audio::dominant_frequency(&heard, 48_000.0, 200.0, 2000.0);
    assert!((frequency - 440.0).abs() < 5.0, "the thin client played {frequency:.1} Hz");

    let written = format!("written in the desktop {}", std::process::id());
    let out = desktop
        .guest
        .run(&mount_read_write("/dev/sda", "hello.bin", "from-guest.txt", &written), SHELL)
        .unwrap_or_else(|e| panic!("{e}\n{}", evidence(&mut desktop, &mut thin)));
    let sum = sha256_hex(&hello);
    assert!(out.iter().any(|l| l.starts_with(&sum)), "the desktop read other bytes: {out:?} (want {sum})");

    // Hot-plug: a second stick plugged in while connected reaches the desktop.
    thin.plug().unwrap();
    if let Err(e) = wait_for("the second stick attached", Duration::from_secs(180), || {
        (usb_status(&desktop)["attached"].as_u64() >= Some(4)).then_some(())
    }) {
        panic!("{e}\n{}", evidence(&mut desktop, &mut thin));
    }
    wait_block(&mut desktop, &mut thin, "/dev/sdb", true);
    let out = desktop
        .guest
        .run("mkdir -p /mnt/spare && mount -o ro /dev/sdb /mnt/spare && cat /mnt/spare/spare.txt && umount /mnt/spare", SHELL)
        .unwrap();
    assert!(out.iter().any(|l| l.trim() == "the second stick"), "{out:?}");

    // Pulled out of the thin client while the desktop reads it.
    desktop.guest.start_block_reader("/dev/sdb").unwrap();
    let before = usb_status(&desktop)["bytes_to_guest"].as_u64().unwrap();
    wait_for("the reader under way", Duration::from_secs(120), || {
        (usb_status(&desktop)["bytes_to_guest"].as_u64().unwrap() > before + (1 << 20)).then_some(())
    })
    .unwrap();
    thin.pull("spare").unwrap();
    wait_block(&mut desktop, &mut thin, "/dev/sdb", false);
    assert!(desktop.guest.block_reader_ended().unwrap(), "the desktop's reader hangs");
    desktop.guest.run("dmesg | grep 'USB disconnect'", SHELL).expect("the desktop saw the stick unplugged");
    // The first stick, the desktop and the session go on.
    assert!(desktop.guest.run_status("[ -e /dev/sda ]", SHELL).unwrap().0 == 0, "the first stick went too");
    assert_eq!(desktop.status()["agent"]["connected"], true);

    // The client ends: the desktop sees the stick go; the thin client's driver gets it back.
    assert!(
        thin.stop_client(pid).unwrap(),
        "the client did not end on SIGTERM\n{}",
        evidence(&mut desktop, &mut thin)
    );
    wait_block(&mut desktop, &mut thin, "/dev/sda", false);
    let rebound = (0..60).any(|_| {
        std::thread::sleep(Duration::from_millis(500));
        thin.usb_storage_bound().unwrap()
    });
    assert!(rebound, "the thin client's usb-storage did not get the stick back\n{}", thin.dmesg(20));
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(record.join("usb.json")).unwrap()).unwrap();
    let devices = report.as_array().unwrap();
    assert_eq!(devices.len(), 4, "{report:#}");
    let first = devices.iter().find(|d| d["usb_id"] == STICK_USB_ID).unwrap();
    assert!(first["urbs"].as_u64() > Some(100), "{report:#}");
    assert!(first["bytes_to_guest"].as_u64() >= Some(hello.len() as u64), "{report:#}");
    let keyboard = devices.iter().find(|d| d["usb_id"] == KEYBOARD_USB_ID).unwrap();
    assert!(keyboard["urbs"].as_u64() > Some(2), "{report:#}");
    let audio = devices.iter().find(|d| d["usb_id"] == AUDIO_USB_ID).unwrap();
    assert!(audio["bytes_from_guest"].as_u64() > Some(48_000 * 4), "the tone's samples: {report:#}");
    assert_eq!(devices[3]["state"], "gone", "the pulled stick, plugged in last: {report:#}");
    drop(thin);
    assert_eq!(ext4_read(&stick, "from-guest.txt").unwrap(), format!("{written}\n").into_bytes());
    pleiades_tests::disk::ext4_check(&stick).unwrap_or_else(|e| panic!("{e}"));
}
