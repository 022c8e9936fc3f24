//! The windowed client end to end, on a private Xvfb display with Mesa's software Vulkan/GL (no
//! GPU): `pleiades-host run --vmm qemu …` serves the Linux test image; `pleiades connect FILE`
//! (no `--headless`) connects through the link emulator and opens a real window. The test then
//!
//! 1. screenshots the X screen (`xwd -root`, decoded by the test kit) and finds the guest's console in the window, pixel for
//!    pixel equal to the host's own `ctl screenshot`;
//! 2. types with `xdotool` (a command that echoes a marker to the serial console) and clicks
//!    (the guest reads the button press from its tablet's /dev/input/eventN); Ctrl+Alt+G grabs
//!    the pointer and relative motion reaches the guest's mouse; Ctrl+Alt releases it;
//! 3. resizes the window with `xdotool windowsize`: the guest's resolution follows;
//! 4. takes the link down: the title says "reconnecting"; up again: the client resumes with its
//!    resume token (the connection file's ticket is spent), shows "connected", typing works and
//!    the window shows the guest again.
//!
//! A second test adds and removes a guest monitor (`ctl layout`): a window opens and closes with
//! it. A third opens the USB menu (Ctrl+Alt+U) and moves an emulated stick out of the desktop
//! and back with it. Nothing here asserts on timing: every wait is a bounded poll.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use pleiades_control::{self as control, Request};
use pleiades_protocol::connfile::Connection;
use pleiades_tests::linkem::{Link, LinkConfig};
use pleiades_tests::served::ServedDesktop;
use pleiades_tests::workspace_binary;
use pleiades_tests::xvfb::Xvfb;
use pleiades_tests::xwd::{self, Rgb};
use pleiades_virtio::gpu::Framebuffer;

const SHELL: Duration = Duration::from_secs(60);
/// How long the window may take to show something (software rendering on a busy machine).
const WINDOW: Duration = Duration::from_secs(90);
const SCREEN: (u32, u32) = (1920, 1200);

/// What these tests do on the private X display beyond running programs there.
trait XTools {
    /// Runs an X tool; its stdout, or `None` if it failed.
    fn tool(&self, program: &str, args: &[&str]) -> Option<String>;
    /// The whole X screen (read from `xwd`'s dump directly: no ImageMagick needed).
    fn screenshot(&self) -> Rgb;
}

impl XTools for Xvfb {
    fn tool(&self, program: &str, args: &[&str]) -> Option<String> {
        let output = self.command(program).args(args).stderr(Stdio::null()).output().ok()?;
        output.status.success().then(|| String::from_utf8_lossy(&output.stdout).into_owned())
    }

    fn screenshot(&self) -> Rgb {
        let output =
            self.command("xwd").args(["-root", "-silent"]).output().expect("xwd runs (apt install x11-apps)");
        assert!(output.status.success(), "xwd failed");
        xwd::decode(&output.stdout).expect("an xwd dump of a TrueColor screen")
    }
}

/// The windowed client; killed on drop. Its log goes to a file the failures print.
struct Client {
    child: Child,
    log: PathBuf,
}

impl Client {
    fn log(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

type Desktop = ServedDesktop;

/// Boots the test image with `gpu` (its options), keyboard, tablet and mouse, serving on
/// loopback, its console settled.
fn boot_desktop(gpu: &str) -> Desktop {
    let (mut desktop, _) = ServedDesktop::boot(&[gpu, "keyboard", "tablet", "mouse"]);
    desktop.settle_console(SHELL);
    desktop
}

/// Polls `check` every 250 ms until it gives a value or `timeout` passes.
fn poll<T>(timeout: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return Some(value);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The client's windows' ids (none if there are none).
fn windows(x: &Xvfb) -> Vec<String> {
    let out = x.tool("xdotool", &["search", "--name", "^Pleiades: "]).unwrap_or_default();
    out.lines().map(str::to_owned).collect()
}

/// The client's first window: its id.
fn find_window(x: &Xvfb, client: &Client) -> String {
    poll(WINDOW, || windows(x).into_iter().next())
        .unwrap_or_else(|| panic!("no client window appeared; client log:\n{}", client.log()))
}

/// Starts `pleiades connect FILE` on the X display, logging to `DIR/client.log`.
fn start_client(x: &Xvfb, file: &Path, dir: &Path) -> Client {
    start_client_with(x, file, dir, &[])
}

/// [`start_client`] with more arguments.
fn start_client_with(x: &Xvfb, file: &Path, dir: &Path, extra: &[&str]) -> Client {
    let log = dir.join("client.log");
    let child = x
        .command(workspace_binary("pleiades").unwrap().to_str().unwrap())
        .arg("connect")
        .arg(file)
        .args(extra)
        .env("RUST_LOG", "info,quinn=warn,wgpu_core=warn,wgpu_hal=warn,naga=warn")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("pleiades runs");
    Client { child, log }
}

fn title(x: &Xvfb, window: &str) -> String {
    x.tool("xdotool", &["getwindowname", window]).unwrap_or_default().trim().to_owned()
}

fn wait_title(x: &Xvfb, window: &str, client: &Client, needle: &str, timeout: Duration) {
    poll(timeout, || title(x, window).contains(needle).then_some(())).unwrap_or_else(|| {
        panic!(
            "the title never said {needle:?} (it says {:?}); client log:\n{}",
            title(x, window),
            client.log()
        )
    });
}

/// The window's position and size on the screen.
fn geometry(x: &Xvfb, window: &str) -> (u32, u32, u32, u32) {
    let out = x.tool("xdotool", &["getwindowgeometry", "--shell", window]).expect("window geometry");
    let value = |key: &str| -> u32 {
        out.lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {key} in {out}"))
    };
    (value("X"), value("Y"), value("WIDTH"), value("HEIGHT"))
}

/// Pixels of `guest` that differ from the screen area at (left, top).
fn differing(screen: &Rgb, (left, top): (u32, u32), guest: &Framebuffer) -> u64 {
    if left + guest.width > screen.width || top + guest.height > screen.height {
        return u64::MAX;
    }
    let mut count = 0;
    for y in 0..guest.height {
        for x in 0..guest.width {
            let (r, g, b) = guest.rgb(x, y);
            count += u64::from(screen.pixel(left + x, top + y) != Some([r, g, b]));
        }
    }
    count
}

/// The window shows exactly the host's screenshot (bounded retries while the screen settles).
fn assert_window_shows_guest(x: &Xvfb, window: &str, desktop: &Desktop, client: &Client, artifact: &str) {
    let mut last = (0, (0, 0), (0, 0));
    let same = poll(WINDOW, || {
        let guest = desktop.screenshot();
        let (left, top, ..) = geometry(x, window);
        let screen = x.screenshot();
        let diff = differing(&screen, (left, top), &guest);
        last = (diff, (left, top), (guest.width, guest.height));
        (diff == 0).then_some(())
    });
    assert!(
        same.is_some(),
        "the window never showed the guest's screen: {} pixels differ at {:?} for a {:?} guest; client log:\n{}",
        last.0,
        last.1,
        last.2,
        client.log()
    );
    save_artifact(artifact, &x.screenshot());
}

/// Keeps what the X screen showed as `<target>/artifacts/window/NAME.png`, to look at.
fn save_artifact(name: &str, screen: &Rgb) {
    let mut frame = Framebuffer::new(screen.width, screen.height);
    for (out, [r, g, b]) in frame.pixels.chunks_exact_mut(4).zip(&screen.pixels) {
        out.copy_from_slice(&[*b, *g, *r, 0xff]);
    }
    pleiades_tests::save_artifact("window", name, &frame);
}

#[test]
fn the_window_shows_the_guest_takes_input_resizes_it_and_resumes_after_a_network_loss() {
    let mut desktop = boot_desktop("gpu");
    let x = Xvfb::start(SCREEN.0, SCREEN.1).expect("a private X display");

    // The client reaches the host through the link emulator, which can take the path down.
    let connection =
        Connection::from_toml(&std::fs::read_to_string(desktop.dir.path().join("desk.pleiades")).unwrap())
            .unwrap();
    let server: std::net::SocketAddr = format!("{}:{}", connection.host, connection.port).parse().unwrap();
    let link = Link::start(server, LinkConfig::CLEAN).unwrap();
    let through_link = Connection {
        host: link.client_addr().ip().to_string(),
        port: link.client_addr().port(),
        ..connection
    };
    let file = desktop.dir.path().join("link.pleiades");
    std::fs::write(&file, through_link.to_toml()).unwrap();
    let client = start_client(&x, &file, desktop.dir.path());

    // 1. The window shows the guest's console, pixel for pixel.
    let window = find_window(&x, &client);
    wait_title(&x, &window, &client, "[connected]", WINDOW);
    assert_window_shows_guest(&x, &window, &desktop, &client, "1-console");

    // 2. Keys typed into the window reach the guest's shell on tty1…
    let focus = || x.tool("xdotool", &["windowfocus", "--sync", &window]);
    focus().expect("focus the window");
    x.tool("xdotool", &["type", "--delay", "40", "echo PLEIADES-WINDOW-$((6*7)) > /dev/ttyS0"]).unwrap();
    x.tool("xdotool", &["key", "Return"]).unwrap();
    if let Err(e) = desktop.guest.wait_for("PLEIADES-WINDOW-42", SHELL) {
        panic!("the typed command did not run in the guest: {e}\nclient log:\n{}", client.log());
    }
    // …and so does a click: the guest reads it from its tablet.
    let tablet = pleiades_tests::evdev::node_of("Pleiades Tablet");
    desktop
        .guest
        .run(
            &format!(
                "EV={tablet}; dd if=/dev/input/$EV of=/tmp/ev bs=24 2>/dev/null & \
                 for i in $(seq 50); do ls -l /proc/$!/fd 2>/dev/null | grep -q /dev/input && break; sleep 0.2; done"
            ),
            SHELL,
        )
        .unwrap();
    x.tool("xdotool", &["mousemove", "--window", &window, "200", "150", "click", "1"]).unwrap();
    const BTN_LEFT_DOWN: (u16, u16, i32) = (1, 0x110, 1);
    let clicked = poll(SHELL, || {
        let od = desktop.guest.run("od -An -v -tx1 /tmp/ev", SHELL).ok()?;
        pleiades_tests::evdev::events_from_od(&od).contains(&BTN_LEFT_DOWN).then_some(())
    });
    assert!(clicked.is_some(), "the click never reached the guest; client log:\n{}", client.log());

    // Relative mode: Ctrl+Alt+G grabs the pointer, and its motion reaches the guest's mouse.
    let mouse = pleiades_tests::evdev::node_of("Pleiades Mouse");
    desktop
        .guest
        .run(
            &format!(
                "EV={mouse}; dd if=/dev/input/$EV of=/tmp/rel bs=24 2>/dev/null & \
                 for i in $(seq 50); do ls -l /proc/$!/fd 2>/dev/null | grep -q /dev/input && break; sleep 0.2; done"
            ),
            SHELL,
        )
        .unwrap();
    focus().expect("focus the window");
    x.tool("xdotool", &["key", "ctrl+alt+g"]).unwrap();
    wait_title(&x, &window, &client, "pointer grabbed", WINDOW);
    const EV_REL: u16 = 2;
    let moved = poll(SHELL, || {
        x.tool("xdotool", &["mousemove_relative", "--", "25", "15"])?;
        let od = desktop.guest.run("od -An -v -tx1 /tmp/rel", SHELL).ok()?;
        pleiades_tests::evdev::events_from_od(&od)
            .iter()
            .any(|&(kind, code, value)| kind == EV_REL && code == 0 && value != 0)
            .then_some(())
    });
    assert!(moved.is_some(), "no relative motion reached the guest's mouse; client log:\n{}", client.log());
    x.tool("xdotool", &["key", "ctrl+alt"]).unwrap();
    poll(WINDOW, || (!title(&x, &window).contains("grabbed")).then_some(()))
        .unwrap_or_else(|| panic!("Ctrl+Alt did not release the pointer; client log:\n{}", client.log()));

    // 3. Resizing the window resizes the guest's monitor.
    let before = desktop.screenshot();
    let (width, height) = (1024, 640);
    assert_ne!((before.width, before.height), (width, height));
    x.tool("xdotool", &["windowsize", &window, &width.to_string(), &height.to_string()]).unwrap();
    let resized = poll(WINDOW, || {
        let shot = desktop.screenshot();
        ((shot.width, shot.height) == (width, height)).then_some(())
    });
    assert!(
        resized.is_some(),
        "the guest stayed {}x{}; client log:\n{}",
        desktop.screenshot().width,
        desktop.screenshot().height,
        client.log()
    );
    assert_window_shows_guest(&x, &window, &desktop, &client, "2-resized");

    // 4. The network goes away: the window says so; it comes back: the session resumes.
    link.set_down(true);
    wait_title(&x, &window, &client, "reconnecting", WINDOW);
    std::thread::sleep(Duration::from_secs(4));
    link.set_down(false);
    wait_title(&x, &window, &client, "[connected]", WINDOW);
    focus().expect("focus the window");
    x.tool("xdotool", &["type", "--delay", "40", "echo PLEIADES-RESUMED-$((6*7)) > /dev/ttyS0"]).unwrap();
    x.tool("xdotool", &["key", "Return"]).unwrap();
    if let Err(e) = desktop.guest.wait_for("PLEIADES-RESUMED-42", SHELL) {
        panic!("typing did not work after resuming: {e}\nclient log:\n{}", client.log());
    }
    assert_window_shows_guest(&x, &window, &desktop, &client, "3-resumed");
    let log = std::fs::read_to_string(&client.log).unwrap_or_default();
    assert!(log.contains("the session resumed"), "the client resumed with its token:\n{}", client.log());

    let status = control::request(&desktop.control(), &Request::Status, Duration::from_secs(30)).unwrap();
    let session = &status.result.unwrap()["session"];
    assert!(session["connections"].as_u64().unwrap() >= 2, "{session}");
    drop(client);
    assert!(control::request(&desktop.control(), &Request::Shutdown, Duration::from_secs(30)).unwrap().ok);
    assert!(desktop.guest.wait_exit(SHELL).unwrap().success());
}

#[test]
fn windows_follow_the_guests_monitors() {
    let mut desktop = boot_desktop("gpu,heads=2");
    let x = Xvfb::start(SCREEN.0, SCREEN.1).expect("a private X display");
    let client = start_client(&x, &desktop.dir.path().join("desk.pleiades"), desktop.dir.path());
    let shown = find_window(&x, &client);
    wait_title(&x, &shown, &client, "[connected]", WINDOW);
    let layout = |sizes: Vec<(u32, u32)>| {
        let response =
            control::request(&desktop.control(), &Request::Layout { sizes }, Duration::from_secs(30))
                .unwrap();
        assert!(response.ok, "{response:?}");
    };
    // One monitor to begin with: one window.
    layout(vec![(1024, 768)]);
    let first = poll(WINDOW, || match windows(&x).as_slice() {
        [only] => Some(only.clone()),
        _ => None,
    })
    .unwrap_or_else(|| panic!("windows: {:?}; client log:\n{}", windows(&x), client.log()));

    // A second monitor: a second window, of its size, named after its scanout.
    layout(vec![(1024, 768), (800, 600)]);
    let two = poll(WINDOW, || {
        let ids = windows(&x);
        let titles: Vec<String> = ids.iter().map(|id| title(&x, id)).collect();
        let second = ids.iter().zip(&titles).find(|(_, t)| t.contains(" #1 ["))?.0.clone();
        (ids.len() == 2 && titles.iter().all(|t| t.contains("[connected]"))).then_some(second)
    });
    let second =
        two.unwrap_or_else(|| panic!("no second window: {:?}; client log:\n{}", windows(&x), client.log()));
    let sized = poll(WINDOW, || {
        let (.., w, h) = geometry(&x, &second);
        ((w, h) == (800, 600)).then_some(())
    });
    assert!(sized.is_some(), "the second window is {:?}", geometry(&x, &second));

    // Back to one monitor: its window goes, the first one stays.
    layout(vec![(1024, 768)]);
    let one = poll(WINDOW, || (windows(&x) == [first.clone()]).then_some(()));
    assert!(one.is_some(), "windows left: {:?}; client log:\n{}", windows(&x), client.log());
    drop(client);
    assert!(control::request(&desktop.control(), &Request::Shutdown, Duration::from_secs(30)).unwrap().ok);
    assert!(desktop.guest.wait_exit(SHELL).unwrap().success());
}

#[test]
fn the_usb_menu_takes_a_stick_back_from_the_desktop_and_gives_it_again() {
    let (mut desktop, _) = ServedDesktop::boot_with(&["gpu", "vsock"], &["--usb", "0525:a4a5"]);
    let stick = desktop.dir.path().join("stick.img");
    pleiades_tests::disk::ext4_raw(&stick, 8, &[("x", b"x")]).unwrap();
    let usb = |desktop: &Desktop| desktop.status()["agent"]["usb"].clone();
    poll(Duration::from_secs(120), || (desktop.status()["agent"]["connected"] == true).then_some(()))
        .expect("the agent connects");
    let x = Xvfb::start(SCREEN.0, SCREEN.1).expect("a private X display");
    let client = start_client_with(
        &x,
        &desktop.dir.path().join("desk.pleiades"),
        desktop.dir.path(),
        &["--usb-emulated-disk", stick.to_str().unwrap()],
    );
    let window = find_window(&x, &client);
    wait_title(&x, &window, &client, "[connected]", WINDOW);
    assert!(desktop.guest.wait_path("/dev/sda", true).unwrap(), "no stick; client log:\n{}", client.log());
    x.tool("xdotool", &["windowfocus", "--sync", &window]).expect("focus the window");

    // The menu lists the stick as in the desktop; it draws over the guest's picture.
    let (left, top, ..) = geometry(&x, &window);
    let before = x.screenshot();
    x.tool("xdotool", &["key", "ctrl+alt+u"]).unwrap();
    let shown = poll(WINDOW, || {
        let screen = x.screenshot();
        (differing(&screen, (left, top), &desktop.screenshot()) > 500).then_some(screen)
    })
    .unwrap_or_else(|| panic!("the USB menu did not show; client log:\n{}", client.log()));
    save_artifact("usb-menu", &shown);
    assert!(before.pixels != shown.pixels);

    // 1: taken back. The guest sees the stick go; the desktop's counters say so.
    x.tool("xdotool", &["key", "1"]).unwrap();
    assert!(
        desktop.guest.wait_path("/dev/sda", false).unwrap(),
        "still there; client log:\n{}",
        client.log()
    );
    poll(WINDOW, || (usb(&desktop)["devices"].as_array().map(Vec::len) == Some(0)).then_some(()))
        .unwrap_or_else(|| panic!("{:#}", usb(&desktop)));
    // 1 again (the stick, now here): it goes back in. The menu refuses a choice from a list
    // that changed since it was drawn (the stick moving): press again until it is current.
    poll(WINDOW, || client.log().contains("USB menu: taking it back").then_some(())).unwrap();
    let mut presses = 0;
    poll(WINDOW, || {
        let log = std::fs::read_to_string(&client.log).unwrap_or_default();
        if log.contains("USB menu: redirecting it into the desktop") {
            return Some(());
        }
        if presses == log.matches("USB menu: ").count() - 1 {
            presses += 1;
            x.tool("xdotool", &["key", "1"]).unwrap();
        }
        None
    })
    .unwrap_or_else(|| panic!("the stick was not redirected again; client log:\n{}", client.log()));
    assert!(desktop.guest.wait_path("/dev/sda", true).unwrap(), "not back; client log:\n{}", client.log());
    assert!(usb(&desktop)["attached"].as_u64() >= Some(2), "{:#}", usb(&desktop));
    // Escape closes the menu; keys go to the desktop again.
    x.tool("xdotool", &["key", "Escape"]).unwrap();
    let log = client.log();
    assert!(log.contains("USB menu: redirecting it into the desktop"), "{log}");
}
