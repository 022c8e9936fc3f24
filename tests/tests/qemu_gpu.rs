//! virtio-gpu end to end: `pleiades-host run --vmm qemu --device gpu` serves the GPU over
//! vhost-user (`vhost-user-gpu-pci`), the guest's virtio_gpu DRM driver binds it and fbcon
//! draws the console into it; `ctl screenshot` shows that console, and what `ctl type` types
//! appears on it; `ctl layout` makes the guest switch resolution, on one monitor and on two.

use std::path::Path;
use std::time::{Duration, Instant};

use pleiades_control::png_of_answer;
use pleiades_control::screenshot::decode_png;
use pleiades_control::{self as control, Request, Response};
use pleiades_tests::image::GuestImage;
use pleiades_tests::qemu::{Guest, WAIT_FOR_TTY1_SHELL, boot_timeout};
use pleiades_virtio::gpu::Framebuffer;

const SHELL: Duration = Duration::from_secs(60);

fn ctl(socket: &Path, request: Request) -> Response {
    let response = control::request(socket, &request, Duration::from_secs(30)).unwrap();
    assert!(response.ok, "{request:?}: {response:?}");
    response
}

/// `ctl screenshot` of `scanout`, decoded; `None` while the scanout shows nothing.
fn screenshot(socket: &Path, scanout: u32) -> Option<Framebuffer> {
    let response =
        control::request(socket, &Request::Screenshot { scanout }, Duration::from_secs(30)).unwrap();
    let png = png_of_answer(&response).ok()?;
    let frame = decode_png(&png).unwrap();
    let result = response.result.unwrap();
    assert_eq!(
        (u64::from(frame.width), u64::from(frame.height)),
        (result["width"].as_u64().unwrap(), result["height"].as_u64().unwrap())
    );
    Some(frame)
}

/// Rows that have text on them: pixels clearly brighter than the black console background.
fn text_rows(frame: &Framebuffer) -> Vec<u32> {
    (0..frame.height)
        .filter(|&y| {
            (0..frame.width)
                .filter(|&x| {
                    let (r, g, b) = frame.rgb(x, y);
                    u32::from(r) + u32::from(g) + u32::from(b) > 300
                })
                .count()
                > 0
        })
        .collect()
}

/// Polls screenshots until `accept` holds (bounded).
fn screenshot_until(
    socket: &Path,
    scanout: u32,
    what: &str,
    accept: impl Fn(&Framebuffer) -> bool,
) -> Framebuffer {
    let deadline = Instant::now() + SHELL;
    let mut last = None;
    while Instant::now() < deadline {
        if let Some(frame) = screenshot(socket, scanout) {
            if accept(&frame) {
                return frame;
            }
            last = Some((frame.width, frame.height, text_rows(&frame).len()));
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    panic!(
        "scanout {scanout}: {what} did not happen within {SHELL:?}; last screenshot (w, h, text rows): {last:?}"
    );
}

fn start(args: &[&str], socket: &Path) -> Guest {
    let image = GuestImage::locate().expect("test guest image");
    let accel = pleiades_vmm::accel::choose().expect("accelerator");
    let host = pleiades_tests::workspace_binary("pleiades-host").unwrap();
    Guest::start_host(&host, &image, args, socket, accel).expect("pleiades-host starts")
}

/// Waits until the shell on tty1 (the console fbcon draws) is up.
fn wait_for_tty1_shell(guest: &mut Guest) {
    guest.run(WAIT_FOR_TTY1_SHELL, SHELL).expect("a shell on tty1");
}

#[test]
fn the_console_is_visible_and_typing_changes_it_where_the_prompt_was() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("vm.sock");
    let mut guest = start(&["--vmm", "qemu", "--device", "gpu", "--device", "keyboard"], &socket);
    let info = guest.wait_ready(boot_timeout()).expect("READY");
    assert!(
        info.devices.iter().any(|d| d.kind == "gpu" && d.driver == "virtio_gpu"),
        "virtio_gpu bound: {:?}",
        info.devices
    );
    wait_for_tty1_shell(&mut guest);

    // fbcon shows the shell's banner and prompt: several rows of text at the top.
    let before = screenshot_until(&socket, 0, "console text", |f| text_rows(f).len() > 20);
    assert_eq!((before.width, before.height), (1280, 800), "the default mode");
    let rows = text_rows(&before);
    let prompt_bottom = *rows.last().unwrap();
    assert!(prompt_bottom < 200, "text at the top of the screen: rows {rows:?}");

    ctl(&socket, Request::Type { text: "echo PLEIADES-TYPED > /dev/ttyS0\n".into() });
    guest.wait_for("PLEIADES-TYPED", SHELL).expect("the typed command ran in the guest");
    // What changed: the prompt line got the command, and a new prompt appeared below it (fbcon
    // draws them one after the other: wait for both, bounded).
    let changed_rows = |f: &Framebuffer| -> Vec<u32> {
        (0..f.height).filter(|&y| (0..f.width).any(|x| f.rgb(x, y) != before.rgb(x, y))).collect()
    };
    let after = screenshot_until(&socket, 0, "the typed line and a new prompt", |f| {
        changed_rows(f).last().is_some_and(|&y| y > prompt_bottom)
    });
    let changed = changed_rows(&after);
    let (first, last) = (changed[0], *changed.last().unwrap());
    let prompt_top = rows.iter().rev().take_while(|&&y| y + 24 > prompt_bottom).last().copied().unwrap();
    assert!(
        first >= prompt_top && first <= prompt_bottom,
        "the change starts on the prompt's line ({prompt_top}..={prompt_bottom}), not at row {first}"
    );
    assert!(last > prompt_bottom, "a new prompt below (changed rows {first}..={last})");
    // The typed command sits right of the prompt on the prompt's line.
    let typed_columns: Vec<u32> = (0..after.width)
        .filter(|&x| (prompt_top..=prompt_bottom).any(|y| after.rgb(x, y) != before.rgb(x, y)))
        .collect();
    assert!(typed_columns[0] > 100, "typed text starts after the prompt, not at x={}", typed_columns[0]);

    ctl(&socket, Request::Shutdown);
    let status = guest.wait_exit(SHELL).expect("the VM ends");
    assert!(status.success(), "{status}");
}

#[test]
fn ctl_layout_switches_the_guest_on_one_and_on_two_monitors() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("vm.sock");
    let mut guest = start(&["--vmm", "qemu", "--device", "gpu,heads=2"], &socket);
    guest.wait_ready(boot_timeout()).expect("READY");
    wait_for_tty1_shell(&mut guest);
    screenshot_until(&socket, 0, "console text", |f| text_rows(f).len() > 20);
    let edid = guest.run("cat /sys/class/drm/card0-Virtual-1/edid | od -An -tx1 | head -1", SHELL).unwrap();
    assert!(edid.iter().any(|l| l.contains("00 ff ff ff ff ff ff 00")), "the guest read our EDID: {edid:?}");

    ctl(&socket, Request::Layout { sizes: vec![(1280, 720)] });
    let one = screenshot_until(&socket, 0, "the switch to 1280x720", |f| (f.width, f.height) == (1280, 720));
    assert!(
        !text_rows(&one).is_empty()
            || screenshot_until(&socket, 0, "text", |f| !text_rows(f).is_empty()).width == 1280
    );
    let modes = guest.run("cat /sys/class/drm/card0-Virtual-1/modes | head -1", SHELL).unwrap();
    assert!(modes.iter().any(|m| m == "1280x720"), "preferred mode: {modes:?}");

    ctl(&socket, Request::Layout { sizes: vec![(1024, 768), (1024, 768)] });
    for scanout in 0..2 {
        let frame = screenshot_until(&socket, scanout, "1024x768 with console text", |f| {
            (f.width, f.height) == (1024, 768) && text_rows(f).len() > 10
        });
        assert_eq!(frame.width, 1024);
    }
    let status = guest.run("cat /sys/class/drm/card0-Virtual-2/status", SHELL).unwrap();
    assert!(status.iter().any(|s| s == "connected"), "the second monitor: {status:?}");

    // A layout the GPU cannot show is refused with a reason, and the VM goes on.
    let refused =
        control::request(&socket, &Request::Layout { sizes: vec![(1024, 768); 3] }, Duration::from_secs(30))
            .unwrap();
    assert!(!refused.ok && refused.error.as_deref().unwrap_or("").contains("2 scanouts"), "{refused:?}");
    ctl(&socket, Request::Shutdown);
    assert!(guest.wait_exit(SHELL).expect("the VM ends").success());
}
