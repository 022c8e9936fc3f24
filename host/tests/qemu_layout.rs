//! The display layout through QEMU's per-head VNC servers, end to end: the test image boots
//! under QEMU with QEMU's own `virtio-gpu-pci,max_outputs=2` (the reference device, so this
//! does not depend on Pleiades' GPU) and the `-vnc` heads from `qemu_layout::qemu_args`; a
//! size sent to a head reaches the guest's DRM connector and QEMU's console of that head.

use std::path::Path;
use std::time::{Duration, Instant};

use pleiades_host::qemu::Qmp;
use pleiades_host::qemu_layout::{self, ResizeStatus, RfbClient};
use pleiades_tests::image::GuestImage;
use pleiades_tests::qemu::{Guest, GuestConfig};
use serde_json::json;

const SHELL: Duration = Duration::from_secs(60);
/// How long the guest may take to apply a size (bounded waits only; nothing asserts on time).
const APPLY: Duration = Duration::from_secs(60);
const GPU: &str = "gpu0";

/// The guest's connector `n` (1-based, as the kernel names virtio-gpu's).
fn connector(n: u32) -> String {
    format!("/sys/class/drm/card0-Virtual-{n}")
}

/// Waits in the guest until the connector's status and first (preferred) mode are as given,
/// then returns `status first-mode`.
fn wait_connector(guest: &mut Guest, n: u32, status: &str, mode: Option<&str>) -> String {
    let c = connector(n);
    let first_mode = format!("$(head -n1 {c}/modes 2>/dev/null)");
    let want = format!("{status} {}", mode.unwrap_or("")).trim_end().to_owned();
    let state = format!("echo $(cat {c}/status) {first_mode}");
    let out = guest
        .run(
            &format!(
                "for i in $(seq 200); do [ \"$({state})\" = '{want}' ] && break; sleep 0.2; done; {state}"
            ),
            SHELL,
        )
        .expect("the guest shell answers");
    // QEMU's own stderr lines are in the transcript too.
    out.iter().filter(|l| !l.starts_with("stderr: ")).cloned().collect::<Vec<_>>().join("\n")
}

/// Width, height and whether any pixel is not black, from a binary PPM (P6) file.
fn ppm_info(path: &Path) -> (u32, u32, bool) {
    let data = std::fs::read(path).expect("screendump file");
    let mut fields = Vec::new();
    let mut pos = 0;
    while fields.len() < 4 {
        while data[pos].is_ascii_whitespace() {
            pos += 1;
        }
        let start = pos;
        while !data[pos].is_ascii_whitespace() {
            pos += 1;
        }
        fields.push(String::from_utf8_lossy(&data[start..pos]).into_owned());
    }
    assert_eq!(fields[0], "P6", "{path:?} is not a binary PPM");
    let pixels = &data[pos + 1..];
    (fields[1].parse().unwrap(), fields[2].parse().unwrap(), pixels.iter().any(|&b| b != 0))
}

/// Takes screendumps of `head` until it is `width` x `height` (bounded), and returns the last.
fn wait_screendump(qmp: &mut Qmp, dir: &Path, head: u32, width: u32, height: u32) -> (u32, u32, bool) {
    let file = dir.join(format!("head{head}.ppm"));
    let deadline = Instant::now() + APPLY;
    loop {
        qmp.execute("screendump", json!({"filename": file, "device": GPU, "head": head, "format": "ppm"}))
            .expect("QMP screendump");
        let info = ppm_info(&file);
        if (info.0, info.1) == (width, height) || Instant::now() > deadline {
            return info;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn vnc_heads_resize_the_guests_virtio_gpu_outputs() {
    let image = GuestImage::locate().expect("test guest image");
    let dir = tempfile::Builder::new().prefix("pl-layout-").tempdir().unwrap();
    let qmp_path = dir.path().join("qmp.sock");
    let config = GuestConfig::default()
        .device(&format!("virtio-gpu-pci,id={GPU},max_outputs=2"))
        .args(qemu_layout::qemu_args(GPU, 2, dir.path()))
        .args(["-qmp".to_owned(), format!("unix:{},server=on,wait=off", qmp_path.display())]);
    let (mut guest, info) = Guest::boot(&image, &config).expect("the guest boots");
    assert!(
        info.devices.iter().any(|d| d.kind == "gpu" && d.driver == "virtio_gpu"),
        "virtio_gpu bound: {:?}",
        info.devices
    );
    let mut qmp = Qmp::connect(&qmp_path, Duration::from_secs(30)).expect("QMP");

    let drm = guest.run("ls -1 /sys/class/drm/", SHELL).unwrap();
    for name in ["card0-Virtual-1", "card0-Virtual-2"] {
        assert!(drm.iter().any(|l| l == name), "{drm:?}");
    }
    // At boot QEMU enables head 0 only (1280x800), head 1 is off.
    assert_eq!(wait_connector(&mut guest, 1, "connected", Some("1280x800")), "connected 1280x800");
    assert_eq!(wait_connector(&mut guest, 2, "disconnected", None), "disconnected");

    // One head through the client directly: QEMU forwards the request, and reports the new
    // size once the guest has switched.
    let mut head0 = RfbClient::connect(&qemu_layout::head_socket(dir.path(), 0), Duration::from_secs(10))
        .expect("VNC head 0");
    assert_eq!(head0.server_init().name, "QEMU");
    let reply = head0.set_desktop_size(1280, 720, Duration::from_secs(10)).expect("SetDesktopSize");
    assert_eq!(reply.status, ResizeStatus::Forwarded, "{reply:?}");
    head0.wait_for_size(1280, 720, APPLY).expect("QEMU reports the guest's new mode");
    drop(head0);
    assert_eq!(wait_connector(&mut guest, 1, "connected", Some("1280x720")), "connected 1280x720");
    let dump = wait_screendump(&mut qmp, dir.path(), 0, 1280, 720);
    assert_eq!((dump.0, dump.1), (1280, 720), "head 0 screendump");

    // Two monitors: head 1 is turned on by its size alone.
    let replies = qemu_layout::set_layout(dir.path(), &[(1024, 768), (1024, 768)]).expect("set_layout");
    assert!(replies.iter().all(|r| r.status == ResizeStatus::Forwarded), "{replies:?}");
    for n in [1, 2] {
        assert_eq!(wait_connector(&mut guest, n, "connected", Some("1024x768")), "connected 1024x768");
    }
    for head in [0, 1] {
        let dump = wait_screendump(&mut qmp, dir.path(), head, 1024, 768);
        assert_eq!(dump, (1024, 768, true), "head {head} screendump: 1024x768 and not blank (fbcon)");
    }

    // Back to one monitor: a head beyond the list gets 0x0, and the guest sees it unplugged.
    qemu_layout::set_layout(dir.path(), &[(1024, 768)]).expect("set_layout");
    assert_eq!(wait_connector(&mut guest, 2, "disconnected", None), "disconnected");
    assert_eq!(wait_connector(&mut guest, 1, "connected", Some("1024x768")), "connected 1024x768");

    let dmesg = guest.run("dmesg | grep -i -E 'virtio.gpu|\\[drm\\]' | tail -n 20", SHELL).unwrap();
    println!("guest dmesg:\n{}", dmesg.join("\n"));
    let exit = guest.poweroff(Duration::from_secs(90)).expect("the guest powers off");
    assert!(exit.success(), "{exit}");
}
