//! virtio-input end to end: `pleiades-host run --vmm qemu --device keyboard --device tablet`
//! serves both as vhost-user processes, the guest's virtio_input driver binds them, and
//! `ctl type` / `ctl pointer` reach the guest's input layer.

use std::time::Duration;

use pleiades_control::{self as control, PointerButton, Request};
use pleiades_tests::image::GuestImage;
use pleiades_tests::qemu::{Guest, WAIT_FOR_TTY1_SHELL, boot_timeout};

const SHELL: Duration = Duration::from_secs(60);

fn ctl(socket: &std::path::Path, request: Request) {
    let response = control::request(socket, &request, Duration::from_secs(30)).unwrap();
    assert!(response.ok, "{request:?}: {response:?}");
}

#[test]
fn keyboard_and_tablet_are_bound_and_ctl_input_reaches_the_guest() {
    let image = GuestImage::locate().expect("test guest image");
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("vm.sock");
    let accel = pleiades_vmm::accel::choose().expect("accelerator");
    let host = pleiades_tests::workspace_binary("pleiades-host").unwrap();
    let args = ["--vmm", "qemu", "--device", "rng", "--device", "keyboard", "--device", "tablet"];
    let mut guest = Guest::start_host(&host, &image, &args, &socket, accel).expect("pleiades-host starts");
    let info = guest.wait_ready(boot_timeout()).expect("READY");
    let mut devices: Vec<_> = info.devices.iter().map(|d| (d.kind.as_str(), d.driver.as_str())).collect();
    devices.sort();
    assert_eq!(devices, [("input", "virtio_input"), ("input", "virtio_input"), ("rng", "virtio_rng")]);

    let names = guest.run("cat /sys/class/input/event*/device/name", SHELL).unwrap();
    assert!(names.iter().any(|n| n == "Pleiades Keyboard"), "{names:?}");
    assert!(names.iter().any(|n| n == "Pleiades Tablet"), "{names:?}");

    // The keyboard types into the shell on tty1, which writes to the serial console. First make
    // sure that shell is up (a bounded wait; typed keys would be lost with no tty1 reader).
    guest.run(WAIT_FOR_TTY1_SHELL, SHELL).expect("a shell on tty1");
    ctl(&socket, Request::Type { text: "echo PLEIADES-$((6*7))-TYPED > /dev/ttyS0\n".into() });
    guest.wait_for("PLEIADES-42-TYPED", SHELL).expect("the typed command ran in the guest");

    // Pointer events: read the tablet's evdev node in the background, then move and click.
    let tablet = pleiades_tests::evdev::node_of("Pleiades Tablet");
    guest
        .run(
            &format!(
                "EV={tablet}; dd if=/dev/input/$EV of=/tmp/ev bs=24 count=9 2>/dev/null & DD=$!; \
                 for i in $(seq 50); do ls -l /proc/$DD/fd 2>/dev/null | grep -q /dev/input && break; sleep 0.2; done; \
                 ls -l /proc/$DD/fd | grep -c /dev/input"
            ),
            SHELL,
        )
        .unwrap();
    ctl(&socket, Request::Pointer { x: 1234, y: 32767, click: Some(PointerButton::Left), wheel: Some(-1) });
    // `wait` returns once dd has its 9 events; if they never come the command times out.
    let od = guest.run("wait $DD; od -An -v -tx1 /tmp/ev", SHELL).expect("tablet events reached /dev/input");
    let events = pleiades_tests::evdev::events_from_od(&od);
    const EV_SYN: u16 = 0;
    const EV_KEY: u16 = 1;
    const EV_REL: u16 = 2;
    const EV_ABS: u16 = 3;
    assert_eq!(
        events,
        [
            (EV_ABS, 0, 1234),
            (EV_ABS, 1, 32767),
            (EV_SYN, 0, 0),
            (EV_KEY, 0x110, 1),
            (EV_SYN, 0, 0),
            (EV_KEY, 0x110, 0),
            (EV_SYN, 0, 0),
            (EV_REL, 8, -1),
            (EV_SYN, 0, 0),
        ],
        "{od:?}"
    );

    // `ctl key` works too (Enter on an empty tty1 line), and bad input is refused with a reason.
    ctl(&socket, Request::Key { combo: "enter".into() });
    let bad =
        control::request(&socket, &Request::Pointer { x: 40000, y: 0, click: None, wheel: None }, SHELL)
            .unwrap();
    assert!(!bad.ok && bad.error.unwrap().contains("0 to 32767"));

    ctl(&socket, Request::Shutdown);
    let exit = guest.wait_exit(Duration::from_secs(90)).expect("pleiades-host exits");
    assert!(exit.success(), "{exit}");
}
