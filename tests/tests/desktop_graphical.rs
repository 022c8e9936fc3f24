//! The graphical desktop image end to end (`cargo xtask desktop-image`: Debian trixie, Xfce on
//! Xorg, on a disk), through the broker and `pleiades-host serve` (`--vmm qemu`, 2 vCPUs,
//! 2 GiB, its network), and the headless client with the broker's ticket:
//!
//! - the desktop is graphical: the recording shows Xfce's panel along the top and its
//!   wallpaper, not a console;
//! - its resolution follows the client: after the client asks for 1024x768 the guest's screen
//!   is 1024x768 (from its first 1280x800), panel and all;
//! - typing reaches a terminal that runs what is typed: Ctrl+Alt+T opens Xfce's terminal, and a
//!   typed `printf` paints it magenta (24-bit colour), which the recording shows.
//!
//! The boot is timed from the request to the VM running, to the READY line (the agent prints it
//! once the user's session runs its panel) and to the panel and wallpaper on the screen, and
//! printed.

use std::time::{Duration, Instant};

use pleiades_control::screenshot::decode_png;
use pleiades_tests::desktop::{not_a_desktop, wait_usable};
use pleiades_tests::image::{DesktopImage, GuestImage};
use pleiades_tests::prerequisite::{Missing, missing};
use pleiades_tests::stack::{Stack, StackOptions};
use pleiades_tests::wait_for;
use serde_json::Value;

/// The desktop's boot under TCG takes about a minute unloaded; a loaded machine takes longer.
const DESKTOP_BOOT: Duration = Duration::from_secs(900);

#[test]
fn the_graphical_desktop_through_the_broker_follows_the_client_and_runs_typed_commands() {
    let image = match DesktopImage::locate() {
        Ok(image) => image,
        Err(e) => match missing("desktop_graphical", &e.to_string()) {
            Missing::Skip => return,
            Missing::Fail(why) => panic!("{why}"),
        },
    };
    let dir = tempfile::Builder::new().prefix("pleiades-desktop-").tempdir().unwrap();
    let options = StackOptions {
        spares: 0,
        max: 1,
        pool_kind: "persistent",
        ..StackOptions::local(dir.path()).unwrap().with_desktop_image(&image)
    };
    // The test image only fills in what the options leave out (nothing here).
    let guest = GuestImage { kernel: image.kernel.clone(), initramfs: image.initrd.clone() };
    let mut stack = Stack::start(options, &guest).unwrap();
    let bearer = stack.login("alice", "alice-password-1").unwrap();
    let asked = Instant::now();
    let desktop = stack.request_desktop(&bearer).unwrap();
    stack.wait_in_use(&bearer, &desktop, DESKTOP_BOOT).unwrap();
    let started = asked.elapsed();
    wait_for("the desktop's READY line", DESKTOP_BOOT, || {
        stack.serial(&desktop).contains("PLEIADES-READY").then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}; serial console:\n{}\n{}", stack.serial(&desktop), stack.logs_tail()));
    let ready = asked.elapsed();
    // Usable: the panel and the wallpaper are on the screen.
    let control = stack.host_state.join("desktops").join(&desktop).join("control.sock");
    wait_usable(&control, DESKTOP_BOOT).unwrap();
    let usable = asked.elapsed();
    let serial = stack.serial(&desktop);
    let line = serial.lines().find(|l| l.contains("PLEIADES-READY")).unwrap();
    for device in ["\"gpu\"", "\"input\"", "\"sound\"", "\"block\"", "\"net\"", "\"vsock\""] {
        assert!(line.contains(device), "{device} not bound: {line}");
    }
    println!(
        "desktop image: VM running {:.1} s after the request, READY {:.1} s, panel and wallpaper shown {:.1} s",
        started.as_secs_f64(),
        ready.as_secs_f64(),
        usable.as_secs_f64()
    );

    let connection = stack.connect(&bearer, &desktop).unwrap();
    let file = dir.path().join("desk.pleiades");
    std::fs::write(&file, connection["file"].as_str().expect("a connection file")).unwrap();
    let record = dir.path().join("rec");
    // `type` escapes: `\\` is a backslash, `\n` Enter; the guest's bash sees
    // printf '\033[48;2;255;0;255m\033[2J' (a 24-bit magenta background, then clear).
    let script = "wait 3000\nsnapshot initial\nlayout 1024x768\nwait 12000\nsnapshot resized\n\
                  key ctrl+alt+t\nwait 15000\n\
                  type printf '\\\\033[48;2;255;0;255m\\\\033[2J'\\n\nwait 6000\nsnapshot typed\n";
    let (ok, text) = pleiades_tests::stack::run_headless_client(
        &file,
        &record,
        script,
        &["--no-h264", "--no-audio", "--duration", "60"],
    );
    assert!(ok, "the client: {text}");
    let summary: Value =
        serde_json::from_slice(&std::fs::read(record.join("summary.json")).unwrap()).unwrap();
    let snapshot = |name: &str| {
        let path = record.join(format!("{name}.png"));
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}; {summary}", path.display()));
        let frame = decode_png(&bytes).unwrap();
        pleiades_tests::save_artifact("desktop_graphical", name, &frame);
        frame
    };

    let initial = snapshot("initial");
    let size = (initial.width, initial.height);
    assert_ne!(size, (1024, 768), "the guest starts at another size than the client asks for");
    if let Some(why) = not_a_desktop(&initial) {
        panic!("the first screen ({size:?}) is not Xfce's desktop: {why}; {summary}");
    }
    let resized = snapshot("resized");
    let size = (resized.width, resized.height);
    assert_eq!(size, (1024, 768), "the guest did not follow the client's 1024x768; {summary}");
    if let Some(why) = not_a_desktop(&resized) {
        panic!("after the resize the screen is not Xfce's desktop: {why}");
    }
    let typed = snapshot("typed");
    // Frames are BGRX: magenta reads the same either way.
    let magenta = typed.pixels.chunks_exact(4).filter(|c| c[..3] == [255, 0, 255]).count();
    println!("desktop image: {magenta} magenta pixels in the terminal ({}x{})", typed.width, typed.height);
    assert!(magenta > 40_000, "the typed printf did not paint the terminal: {magenta} magenta pixels");

    // The guest agent's report reaches the admin: the logged-in user, the OS, the address the
    // guest got by DHCP, and the user's idle time as the guest's X server counts it, which
    // grows while nobody types. The client has left, so the screen is locked (the pool locks on
    // disconnect: light-locker switched to lightdm's greeter).
    let admin = stack.login("root", "root-password-1").unwrap();
    let guest_report = || -> Option<Value> {
        let desktops = stack.get("/api/v1/admin/desktops", &admin).ok()?;
        let d = desktops.as_array()?.iter().find(|d| d["id"] == desktop.as_str())?.clone();
        d["guest"]["idle_secs"].is_u64().then(|| d["guest"].clone())
    };
    let first = wait_for("the guest's screen locked after the client left", Duration::from_secs(120), || {
        guest_report().filter(|g| g["session"] == "locked")
    })
    .unwrap_or_else(|e| panic!("{e}; {:?}; {}", guest_report(), stack.logs_tail()));
    assert_eq!(first["user"], "user", "the autologin user: {first}");
    assert!(first["os"].as_str().is_some_and(|os| os.starts_with("Debian GNU/Linux")), "{first}");
    assert!(first["addresses"].as_array().is_some_and(|a| a.iter().any(|a| a == "10.0.2.15/24")), "{first}");
    // What the screen shows now (kept to look at): the greeter, not the desktop.
    let locked = pleiades_tests::desktop::screenshot(&control).expect("a screenshot of the locked screen");
    pleiades_tests::save_artifact("desktop_graphical", "locked", &locked);
    assert!(not_a_desktop(&locked).is_some(), "the locked screen still shows the desktop");
    let idle = first["idle_secs"].as_u64().unwrap();
    let later = wait_for("the guest's idle time to grow", Duration::from_secs(120), || {
        guest_report().filter(|g| g["idle_secs"].as_u64() >= Some(idle + 4))
    })
    .unwrap();
    println!("desktop image: guest idle {idle} s, then {} s", later["idle_secs"]);

    // The user comes back with a new ticket: unlocked while the client is there.
    let again = stack.connect(&bearer, &desktop).unwrap();
    let file2 = dir.path().join("again.pleiades");
    std::fs::write(&file2, again["file"].as_str().expect("a connection file")).unwrap();
    let record2 = dir.path().join("rec-again");
    let client = std::thread::spawn(move || {
        pleiades_tests::stack::run_headless_client(
            &file2,
            &record2,
            "wait 30000\nsnapshot back\nwait 5000\n",
            &["--no-h264", "--no-audio", "--duration", "45"],
        )
    });
    let active = wait_for("the screen unlocked for the returning client", Duration::from_secs(60), || {
        guest_report().filter(|g| g["session"] == "active")
    });
    let (ok, text) = client.join().unwrap();
    assert!(ok, "the returning client: {text}");
    active.unwrap_or_else(|e| panic!("{e}; {:?}", guest_report()));
    // And it sees the desktop again (the wallpaper and the terminal), not the blank greeter VT.
    let back = decode_png(&std::fs::read(dir.path().join("rec-again/back.png")).unwrap()).unwrap();
    pleiades_tests::save_artifact("desktop_graphical", "back", &back);
    let black = back.pixels.chunks_exact(4).filter(|c| c[..3] == [0, 0, 0]).count();
    let total = back.pixels.len() / 4;
    assert!(black * 2 < total, "the returning client sees a black screen ({black} of {total} pixels)");

    // A clean power-off through the daemon.
    let status = stack.host.terminate(Duration::from_secs(120)).unwrap();
    assert!(status.success(), "{}", stack.logs_tail());
}
