//! `pleiades-host run --vmm qemu`: QEMU runs the vCPUs, Pleiades' rng device is a separate
//! vhost-user process, and the Linux driver in the test image binds it.

use std::time::Duration;

use pleiades_control::{self as control, Request};
use pleiades_tests::image::GuestImage;
use pleiades_tests::qemu::{Guest, boot_timeout};

#[test]
fn vhost_user_rng_is_bound_by_the_linux_driver_and_ctl_controls_the_vm() {
    let image = GuestImage::locate().expect("test guest image");
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("vm.sock");
    let accel = pleiades_vmm::accel::choose().expect("accelerator");
    let host = pleiades_tests::workspace_binary("pleiades-host").unwrap();
    let args = ["--vmm", "qemu", "--device", "rng"];
    let mut guest = Guest::start_host(&host, &image, &args, &socket, accel).expect("pleiades-host starts");
    let info = guest.wait_ready(boot_timeout()).expect("READY");
    assert_eq!(info.cpus, 2);
    let devices: Vec<_> = info.devices.iter().map(|d| (d.kind.as_str(), d.driver.as_str())).collect();
    assert_eq!(devices, [("rng", "virtio_rng")]);

    // Entropy flows from the backend process into the guest.
    let current = guest.run("cat /sys/class/misc/hw_random/rng_current", Duration::from_secs(30)).unwrap();
    assert_eq!(current.join(""), "virtio_rng.0");
    let hex = guest
        .run("head -c 32 /dev/hwrng | od -An -tx1 | tr -d ' \\n'; echo", Duration::from_secs(30))
        .unwrap();
    let hex = hex.join("");
    assert_eq!(hex.len(), 64, "{hex:?}");
    assert_ne!(hex, "0".repeat(64));

    // `ctl status` describes the VM; the rng is served by its own process.
    let status = control::request(&socket, &Request::Status, Duration::from_secs(30)).unwrap();
    assert!(status.ok, "{status:?}");
    let result = status.result.unwrap();
    assert_eq!(result["vmm"], "qemu");
    assert_eq!(result["state"], "running");
    assert_eq!(result["cpus"], 2);
    let backend = &result["devices"][0];
    assert_eq!(backend["kind"], "rng");
    assert_eq!(backend["backend"], "vhost-user");
    assert_ne!(backend["pid"], result["qemu_pid"]);

    // `ctl shutdown` presses the power button; the guest's agent powers off; exit 0.
    let shutdown = control::request(&socket, &Request::Shutdown, Duration::from_secs(30)).unwrap();
    assert!(shutdown.ok, "{shutdown:?}");
    guest.wait_for("power button pressed", Duration::from_secs(60)).expect("the guest saw the power button");
    let exit = guest.wait_exit(Duration::from_secs(60)).expect("pleiades-host exits");
    assert!(exit.success(), "{exit}");
    assert!(!socket.exists(), "the control socket is removed on exit");
}
