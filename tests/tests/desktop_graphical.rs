//! The graphical desktop image end to end (`cargo xtask desktop-image`: Debian trixie, Xfce on
//! Xorg, on a disk), through the broker and `pleiades-host serve` (`--vmm qemu`, 2 vCPUs,
//! 2 GiB, its network), and the headless client with the broker's ticket:
//!
//! - the desktop is graphical: the recording shows Xfce's panel along the top and its
//!   wallpaper, not a console;
//! - its resolution follows the client: after the client asks for 1024x768 the guest's screen
//!   is 1024x768 (from its first 1280x800), panel and all;
//! - typing reaches a terminal that runs what is typed: Ctrl+Alt+T opens Xfce's terminal, and a
//!   typed `printf` paints it magenta (24-bit colour), which the recording shows;
//! - the guest agent reports the user, OS, address and idle time; the screen locks when the
//!   client leaves and unlocks for the returning one;
//! - the clipboard works both ways between a client on its own X display (Xvfb, `xclip`) and
//!   the guest's Xfce session: text copied on the client is pasted in the guest (whose terminal
//!   copies back its SHA-256), and a PNG that crossed into the guest is copied there again and
//!   arrives in the client's clipboard byte for byte;
//! - a 50 MiB file sent with `pleiades send` through the link emulator arrives in the user's
//!   Downloads although the link goes down in the middle of it: the client resumes its session
//!   and the transfer goes on from what the guest already had (not from the start); the guest's
//!   own `sha256sum` of the file, copied to the client's clipboard, is the sent file's;
//! - with the clipboard and files off (`run --clipboard none --file-transfer deny`, what a pool
//!   with both switches off boots), the guest's copy never reaches the client, the client's
//!   never reaches the guest, a file is refused, and the VM process counts each attempt (which
//!   the broker audits).
//!
//! The boot is timed from the request to the VM running, to the READY line (the agent prints it
//! once the user's session runs its panel) and to the panel and wallpaper on the screen, and
//! printed.

use std::time::{Duration, Instant};

use std::path::Path;
use std::process::{Child, Command, Stdio};

use pleiades_control::screenshot::{decode_png, encode_png};
use pleiades_control::{Request, request};
use pleiades_tests::desktop::{not_a_desktop, wait_usable};
use pleiades_tests::image::{DesktopImage, GuestImage};
use pleiades_tests::prerequisite::{Missing, missing};
use pleiades_tests::stack::{Stack, StackOptions};
use pleiades_tests::wait_for;
use pleiades_tests::xvfb::Xvfb;
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

    // A file, through a link that goes down meanwhile.
    let sent = file_through_a_link_drop(&stack, &bearer, &desktop, &control, dir.path());

    // The clipboard, both ways, with a third client that has an X display; it also reads the
    // file's SHA-256 as the guest computes it.
    clipboard_both_ways(&stack, &bearer, &desktop, &control, dir.path(), &guest_report, &sent);

    // A clean power-off through the daemon.
    let status = stack.host.terminate(Duration::from_secs(120)).unwrap();
    assert!(status.success(), "{}", stack.logs_tail());
    drop(stack);

    // The same image with the pool's data loss prevention switches off.
    nothing_crosses_when_the_pool_forbids_it(&image, dir.path());
}

/// The desktop image under `run --clipboard none --file-transfer deny` with its agent: the
/// guest's terminal copies a secret, the client's user copies another and sends a file; none of
/// it crosses, each attempt is counted by the VM process and told to the client.
fn nothing_crosses_when_the_pool_forbids_it(image: &DesktopImage, dir: &Path) {
    let x = match pleiades_tests::prerequisite::command("xclip").and_then(|_| Xvfb::start(640, 480)) {
        Ok(x) => x,
        Err(e) => match missing("desktop_graphical (policy)", &e) {
            Missing::Skip => return,
            Missing::Fail(why) => panic!("{why}"),
        },
    };
    let dir = dir.join("forbidden");
    std::fs::create_dir_all(&dir).unwrap();
    let (mut command, control) = pleiades_tests::desktop::run_desktop_image(image, &dir);
    let file = dir.join("desk.pleiades");
    let mut vm = command
        .args(["--device", "gpu", "--device", "keyboard", "--device", "tablet", "--device", "vsock"])
        .args(["--clipboard", "none", "--file-transfer", "deny"])
        .args(["--listen", "127.0.0.1:0", "--connection-file"])
        .arg(&file)
        .spawn()
        .unwrap();
    wait_for("the control socket", Duration::from_secs(60), || control.exists().then_some(())).unwrap();
    wait_usable(&control, DESKTOP_BOOT).unwrap();
    let status = || request(&control, &Request::Status, Duration::from_secs(30)).ok().and_then(|r| r.result);
    wait_for("the guest's session", Duration::from_secs(300), || {
        status().filter(|s| s["agent"]["session"] == "active")
    })
    .unwrap();

    // The client's user copied something before connecting.
    let mut holder = copy(&x, "UTF8_STRING", b"the client's secret");
    let log = dir.join("client.log");
    let mut client = Command::new(pleiades_tests::workspace_binary("pleiades").unwrap())
        .env("DISPLAY", x.display())
        .arg("connect")
        .arg(&file)
        .args(["--headless", "--no-h264", "--no-audio", "--duration", "600", "--record"])
        .arg(dir.join("rec"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let client_log = || std::fs::read_to_string(&log).unwrap_or_default();
    wait_for("the client's copy refused by the host", Duration::from_secs(120), || {
        status().filter(|s| s["agent"]["clipboard"]["denied_to_guest"].as_u64() >= Some(1))
    })
    .unwrap_or_else(|e| panic!("{e}; the client: {}", client_log()));

    // The guest's user copies a secret: it is counted as kept back, and the client's
    // clipboard keeps its own content all along.
    press(&control, "ctrl+alt+t");
    std::thread::sleep(Duration::from_secs(15));
    let denied = type_until(&control, "echo guest-secret-42|xclip -i -sel c", || {
        status().filter(|s| s["agent"]["clipboard"]["denied_from_guest"].as_u64() >= Some(1))
    });
    denied.unwrap_or_else(|e| panic!("{e}; the client: {}", client_log()));
    for _ in 0..5 {
        assert_eq!(paste(&x, "UTF8_STRING").as_deref(), Some(&b"the client's secret"[..]));
        std::thread::sleep(Duration::from_secs(1));
    }
    assert!(holder.try_wait().unwrap().is_none(), "the guest's copy took the client's selection");
    let _ = holder.kill();

    // A file: refused by the host, nothing sent.
    let secret = dir.join("figures.csv");
    std::fs::write(&secret, "region,revenue\nnorth,42\n").unwrap();
    let report = dir.join("send.json");
    let response = request(&control, &Request::ConnectionFile, Duration::from_secs(30)).unwrap();
    let send_file = dir.join("send.pleiades");
    std::fs::write(&send_file, response.result.unwrap()["toml"].as_str().unwrap()).unwrap();
    let output = Command::new(pleiades_tests::workspace_binary("pleiades").unwrap())
        .arg("send")
        .arg(&send_file)
        .arg(&secret)
        .arg("--report")
        .arg(&report)
        .output()
        .unwrap();
    assert!(!output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let files: Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    assert_eq!((files[0]["state"].as_str(), files[0]["sent"].as_u64()), (Some("failed"), Some(0)), "{files}");
    let counts = status().unwrap();
    println!(
        "desktop image, clipboard and files forbidden: clipboard {}, files {}",
        counts["agent"]["clipboard"], counts["agent"]["files"]
    );
    assert_eq!(counts["agent"]["files"]["denied"], 1);
    assert_eq!(counts["agent"]["files"]["bytes_to_guest"], 0);
    assert_eq!(counts["agent"]["clipboard"]["pasted_to_guest"], 0);
    assert_eq!(counts["agent"]["clipboard"]["pasted_from_guest"], 0);
    let _ = client.kill();
    let _ = client.wait();
    let _ = vm.kill();
    let _ = vm.wait();
}

/// The file sent into the desktop.
const FILE_BYTES: usize = 50 << 20;

/// A file that arrived: its name in Downloads and its SHA-256 (hex).
struct SentFile {
    stored_as: String,
    sha256: String,
}

/// `pleiades send` of a 50 MiB file through the link emulator, which goes down once a fifth of
/// the file crossed and comes back once the client noticed: the client resumes its session with
/// the resume token and the desktop accepts the file again at what it already had.
fn file_through_a_link_drop(
    stack: &Stack,
    bearer: &str,
    desktop: &str,
    control: &Path,
    dir: &Path,
) -> SentFile {
    use pleiades_tests::linkem::{Link, LinkConfig};
    // What arrives must be these bytes, in this order.
    let content =
        pleiades_tests::incompressible(FILE_BYTES, 0x9E37_79B9_7F4A_7C15 ^ u64::from(std::process::id()));
    let path = dir.join("big.bin");
    std::fs::write(&path, &content).unwrap();
    let sha256 = hex(ring::digest::digest(&ring::digest::SHA256, &content).as_ref());
    drop(content);

    let connection = stack.connect(bearer, desktop).unwrap();
    let connection = pleiades_protocol::connfile::Connection::from_toml(
        connection["file"].as_str().expect("a connection file"),
    )
    .unwrap();
    let server = format!("{}:{}", connection.host, connection.port).parse().unwrap();
    let link = Link::start(server, LinkConfig::CLEAN).unwrap();
    let through = pleiades_protocol::connfile::Connection {
        host: link.client_addr().ip().to_string(),
        port: link.client_addr().port(),
        ..connection
    };
    let file = dir.join("send.pleiades");
    std::fs::write(&file, through.to_toml()).unwrap();
    let report = dir.join("send.json");
    let log = dir.join("send.log");
    let mut client = Command::new(pleiades_tests::workspace_binary("pleiades").unwrap())
        .arg("send")
        .arg(&file)
        .arg(&path)
        .arg("--report")
        .arg(&report)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let client_log = || std::fs::read_to_string(&log).unwrap_or_default();
    let relayed = || {
        let status = request(control, &Request::Status, Duration::from_secs(30)).ok()?.result?;
        status["agent"]["files"]["bytes_to_guest"].as_u64()
    };
    let started = Instant::now();
    wait_for("a fifth of the file in the guest", Duration::from_secs(600), || {
        if let Ok(Some(status)) = client.try_wait() {
            panic!("pleiades send ended ({status}) before the link went down: {}", client_log());
        }
        relayed().filter(|b| *b >= FILE_BYTES as u64 / 5)
    })
    .unwrap_or_else(|e| panic!("{e}; the client: {}", client_log()));
    link.set_down(true);
    let down = Instant::now();
    wait_for("the client to notice the link is down", Duration::from_secs(60), || {
        client_log().contains("the connection is lost; resuming").then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}; the client: {}", client_log()));
    std::thread::sleep(Duration::from_secs(2));
    link.set_down(false);
    println!("desktop image: file transfer: the link was down {:.1} s", down.elapsed().as_secs_f64());
    let status =
        wait_for("pleiades send to end", Duration::from_secs(900), || client.try_wait().ok().flatten())
            .unwrap_or_else(|e| panic!("{e}; the client: {}", client_log()));
    assert!(status.success(), "pleiades send failed: {}", client_log());
    let took = started.elapsed();
    let files: Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    println!("desktop image: file transfer report: {files}");
    let sent = &files[0];
    assert_eq!(sent["state"], "done", "{files}");
    assert_eq!(sent["sha256"], sha256.as_str());
    assert!(client_log().contains("the session resumed"), "the client resumed its session: {}", client_log());
    // Accepted twice: from 0, then from what the guest had when the link went down.
    let accepted: Vec<u64> =
        sent["accepted_at"].as_array().unwrap().iter().filter_map(Value::as_u64).collect();
    assert!(
        accepted.len() >= 2 && accepted[0] == 0 && accepted[1..].iter().all(|&a| a >= FILE_BYTES as u64 / 8),
        "the transfer did not resume where it stopped: {files}"
    );
    // Not sent twice: at most the data in flight when the link went down was sent again.
    let resent = sent["sent"].as_u64().unwrap() - FILE_BYTES as u64;
    assert!(resent < 24 << 20, "{resent} bytes sent again: {files}");
    let counts = request(control, &Request::Status, Duration::from_secs(30)).unwrap().result.unwrap();
    println!("desktop image: the VM process's file counters: {}", counts["agent"]["files"]);
    assert_eq!(counts["agent"]["files"]["completed"], 1);
    println!(
        "desktop image: {} MiB sent into the guest's Downloads across a link drop in {:.1} s (resumed at {} bytes, {resent} bytes sent again)",
        FILE_BYTES >> 20,
        took.as_secs_f64(),
        accepted[1]
    );
    SentFile { stored_as: sent["stored_as"].as_str().unwrap().to_owned(), sha256 }
}

/// How long one crossing of the clipboard may take on a loaded machine (the guest runs under
/// TCG: its terminal, xclip and the agent are slow).
const CLIPBOARD_CROSSING: Duration = Duration::from_secs(90);

/// Text copied on the client is pasted in the guest, which copies its SHA-256 back; a PNG
/// copied on the client is pasted in the guest, copied there again and pasted on the client,
/// byte for byte. Each copy's holder (`xclip -quiet`) exits when the other side's copy takes
/// the selection, which shows that what the client pastes last came from the guest.
fn clipboard_both_ways(
    stack: &Stack,
    bearer: &str,
    desktop: &str,
    control: &Path,
    dir: &Path,
    guest_report: &dyn Fn() -> Option<Value>,
    sent: &SentFile,
) {
    let prerequisites = pleiades_tests::prerequisite::command("xclip").and_then(|_| Xvfb::start(640, 480));
    let x = match prerequisites {
        Ok(x) => x,
        Err(e) => match missing("desktop_graphical (clipboard)", &e) {
            Missing::Skip => return,
            Missing::Fail(why) => panic!("{why}"),
        },
    };
    // The client's user copies text before connecting: the client offers it at once.
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    let text = format!("copié sur le client ✓ {nanos}");
    let mut text_holder = copy(&x, "UTF8_STRING", text.as_bytes());

    let connection = stack.connect(bearer, desktop).unwrap();
    let file = dir.join("clip.pleiades");
    std::fs::write(&file, connection["file"].as_str().expect("a connection file")).unwrap();
    let record = dir.join("rec-clip");
    let mut client = Command::new(pleiades_tests::workspace_binary("pleiades").unwrap())
        .env("DISPLAY", x.display())
        .arg("connect")
        .arg(&file)
        .args(["--headless", "--no-h264", "--no-audio", "--duration", "900", "--record"])
        .arg(&record)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("clip-client.log")).unwrap())
        .spawn()
        .unwrap();
    let client_log = || std::fs::read_to_string(dir.join("clip-client.log")).unwrap_or_default();
    wait_for("the screen unlocked for the clipboard's client", Duration::from_secs(120), || {
        guest_report().filter(|g| g["session"] == "active")
    })
    .unwrap_or_else(|e| panic!("{e}; {}", client_log()));
    // A terminal of its own (pacing, not a check: typing below retries).
    press(control, "ctrl+alt+t");
    std::thread::sleep(Duration::from_secs(15));

    // Text: the guest waits until its clipboard offers the client's text, pastes it through
    // sha256sum and copies the digest, which the client's clipboard then offers.
    let digest = hex(ring::digest::digest(&ring::digest::SHA256, text.as_bytes()).as_ref());
    let started = Instant::now();
    let pasted = type_until(
        control,
        "until xclip -o -sel c -t TARGETS|grep -q UTF8;do sleep 1;done;\
         xclip -o -sel c|sha256sum|cut -c1-64|tr -d '\\n'|xclip -i -sel c",
        || paste(&x, "UTF8_STRING").filter(|p| *p == digest.as_bytes()),
    );
    pasted.unwrap_or_else(|e| panic!("{e}; the client: {}", client_log()));
    println!(
        "desktop image: text copied on the client, its SHA-256 copied back from the guest, {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let held = wait_for("the client's text holder to lose the selection", Duration::from_secs(30), || {
        text_holder.try_wait().ok().flatten()
    });
    assert!(held.is_ok(), "the guest's copy did not take the client's selection");

    // A PNG: into the guest, copied there again from a file, and back.
    let mut frame = pleiades_virtio::gpu::Framebuffer::new(97, 61);
    for (i, pixel) in frame.pixels.chunks_exact_mut(4).enumerate() {
        pixel.copy_from_slice(&[(i * 7) as u8, (i / 97 * 4) as u8, (nanos >> (i % 64)) as u8, 255]);
    }
    let png = encode_png(&frame).unwrap();
    let mut png_holder = copy(&x, "image/png", &png);
    let started = Instant::now();
    let pasted = type_until(
        control,
        "until xclip -o -sel c -t TARGETS|grep -q image/png;do sleep 1;done;\
         xclip -o -sel c -t image/png >/tmp/p.png&&xclip -i -sel c -t image/png /tmp/p.png",
        || {
            // Only once the guest's copy took the selection is the client's paste the guest's.
            png_holder.try_wait().ok().flatten()?;
            paste(&x, "image/png").filter(|p| *p == png)
        },
    );
    pasted.unwrap_or_else(|e| panic!("{e}; the client: {}", client_log()));
    println!(
        "desktop image: a {}-byte PNG into the guest and back, byte for byte, {:.1} s",
        png.len(),
        started.elapsed().as_secs_f64()
    );

    // The file sent earlier, as the guest's own sha256sum sees it in the user's Downloads.
    let started = Instant::now();
    // (Any 64 hex digits but the text's digest from above: a wrong file shows as a mismatch.)
    let file_digest = type_until(
        control,
        &format!("sha256sum ~/Downloads/'{}'|cut -c1-64|tr -d '\\n'|xclip -i -sel c", sent.stored_as),
        || {
            paste(&x, "UTF8_STRING")
                .filter(|p| p.len() == 64 && p.iter().all(u8::is_ascii_hexdigit) && *p != digest.as_bytes())
        },
    );
    let file_digest = file_digest.unwrap_or_else(|e| panic!("{e}; the client: {}", client_log()));
    assert_eq!(
        String::from_utf8_lossy(&file_digest),
        sent.sha256,
        "the file in the guest is not the one sent"
    );
    println!(
        "desktop image: the guest's sha256sum of Downloads/{} is the sent file's ({:.1} s)",
        sent.stored_as,
        started.elapsed().as_secs_f64()
    );

    // The client ends cleanly (SIGINT) and says what went through; so does the VM process.
    let _ = Command::new("kill").args(["-INT", &client.id().to_string()]).status();
    let status = wait_for("the clipboard's client to end", Duration::from_secs(60), || {
        client.try_wait().ok().flatten()
    });
    assert!(status.is_ok_and(|s| s.success()), "the client: {}", client_log());
    let summary: Value =
        serde_json::from_slice(&std::fs::read(record.join("clipboard.json")).unwrap()).unwrap();
    println!("desktop image: the client's clipboard: {summary}");
    assert!(summary["copied"].as_u64() >= Some(2) && summary["pasted"].as_u64() >= Some(2), "{summary}");
    let status = request(control, &Request::Status, Duration::from_secs(30)).unwrap().result.unwrap();
    let counts = &status["agent"]["clipboard"];
    println!("desktop image: the VM process's clipboard: {counts}");
    assert!(counts["pasted_to_guest"].as_u64() >= Some(2), "{counts}");
    assert!(counts["pasted_from_guest"].as_u64() >= Some(2), "{counts}");
    assert_eq!(
        (counts["denied_to_guest"].as_u64(), counts["denied_from_guest"].as_u64()),
        (Some(0), Some(0))
    );
}

/// `bytes` copied on the client's display as `target` (held until the guest's copy takes it).
fn copy(x: &Xvfb, target: &str, bytes: &[u8]) -> Child {
    x.copy(target, bytes).expect("xclip runs")
}

/// What a paste of `target` on the client's display gives.
fn paste(x: &Xvfb, target: &str) -> Option<Vec<u8>> {
    x.paste(target, Duration::from_secs(20))
}

fn press(control: &Path, combo: &str) {
    request(control, &Request::Key { combo: combo.into() }, Duration::from_secs(30)).unwrap();
}

/// Types `command` into the guest's terminal until `done` says it worked (the first keystrokes
/// may come before the terminal has opened): at most three times, each given
/// [`CLIPBOARD_CROSSING`]. A few characters at a time: the guest's X server under TCG drops
/// keys that come in one burst.
fn type_until<T>(control: &Path, command: &str, mut done: impl FnMut() -> Option<T>) -> Result<T, String> {
    let mut last = String::new();
    for _ in 0..3 {
        // Whatever an earlier attempt left running or half typed goes; the guest's shell takes
        // a while to draw its prompt again (keys typed meanwhile are lost).
        press(control, "ctrl+c");
        std::thread::sleep(Duration::from_secs(3));
        let line: Vec<char> = format!("{command}\n").chars().collect();
        for piece in line.chunks(4) {
            let text = piece.iter().collect();
            request(control, &Request::Type { text }, Duration::from_secs(60)).unwrap();
            std::thread::sleep(Duration::from_millis(150));
        }
        match wait_for(&format!("the guest to run {command:?}"), CLIPBOARD_CROSSING, &mut done) {
            Ok(value) => return Ok(value),
            Err(e) => last = e,
        }
    }
    Err(last)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
