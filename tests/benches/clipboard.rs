//! The clipboard benchmark: `cargo bench -p pleiades-tests --bench clipboard` (build the
//! binaries of the same profile first: `cargo build --release -p pleiades-host -p
//! pleiades-client --bins`; or run both with `--profile dev`). Needs the desktop image (`cargo
//! xtask desktop-image`), Xvfb and xclip.
//!
//! The desktop image under `pleiades-host run --vmm qemu` (QEMU TCG here: the guest's side is
//! emulated and slow), with its guest agent, served on loopback; the headless client on a
//! private Xvfb shares that display's clipboard. In the guest's terminal an echo loop watches
//! the clipboard and answers every `pingN` with `pongN`; on the client's display the benchmark
//! copies `pingN` and pastes until `pongN` arrives. That is a **round trip** of two lazy
//! transfers: the client's grab to the guest, the guest's paste of it (request, data), the
//! guest's grab back, the client's paste of that. Then a **large paste**: 6 MiB of text copied
//! in the guest, pasted on the client, timed and turned into MB/s.
//!
//! Both on loopback and through the link emulator at 20 ms RTT and 100 Mbit/s, each against the
//! same measurement made with the echo loop on the client's own display (two local X clients,
//! the same polling), in the same run: the ratio is what crossing to the desktop costs.
//!
//! Then **file transfer**: `pleiades send` of a 50 MiB file into the guest's Downloads on the
//! same two paths, timed from the desktop's accept to its done (the client's report: the
//! file's hashing and the connection's setup are left out), against the large paste of the same
//! run (the same agent path into and out of the guest) and, through the link, against the
//! link's own 100 Mbit/s.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use pleiades_control::{Request, request};
use pleiades_tests::desktop::{run_desktop_image, wait_usable};
use pleiades_tests::image::DesktopImage;
use pleiades_tests::linkem::{Link, LinkConfig};
use pleiades_tests::served::mint_connection as mint;
use pleiades_tests::xvfb::Xvfb;
use pleiades_tests::{wait_for, workspace_binary};

const DESKTOP_BOOT: Duration = Duration::from_secs(900);
const PINGS: usize = 8;
/// The guest's answer to `pingN`: `pongN`, polled every 100 ms (the local reference polls the same).
const ECHO_LOOP: &str = "while :;do t=$(xclip -o -sel c 2>/dev/null);case $t in ping*)printf pong${t#ping}|xclip -i -sel c;;esac;sleep 0.1;done";
/// The large paste: 6 MiB of base64 text.
const LARGE: &str = "head -c 4718592 /dev/urandom|base64 -w0|xclip -i -sel c";
const LARGE_BYTES: usize = 4718592 / 3 * 4;

fn main() {
    let image = DesktopImage::locate().expect("the desktop image: cargo xtask desktop-image");
    let dir = tempfile::tempdir().unwrap();
    let (mut vm, control, file) = boot(&image, dir.path());
    let x = Xvfb::start(640, 480).expect("Xvfb");
    let local = Xvfb::start(640, 480).expect("Xvfb");

    // The reference: the echo loop on a display of its own, beside the client's.
    let mut echo = local.command("sh").args(["-c", ECHO_LOOP]).spawn().unwrap();
    let reference = round_trips(&local, "local");
    let _ = echo.kill();
    let _ = echo.wait();
    let reference_large = large_paste(&local, || {
        let _ = local.command("sh").args(["-c", LARGE]).status();
    });

    // The guest's echo loop, typed into its terminal.
    let client = connect(&x, &file, dir.path(), "loopback");
    wait_for("the guest's session", Duration::from_secs(120), || {
        let status = request(&control, &Request::Status, Duration::from_secs(30)).ok()?.result?;
        (status["agent"]["session"] == "active").then_some(())
    })
    .unwrap();
    type_slowly(&control, "", Some("ctrl+alt+t"));
    std::thread::sleep(Duration::from_secs(20));
    type_slowly(&control, &format!("{ECHO_LOOP}\n"), None);
    let loopback = round_trips(&x, "loopback");
    report("loopback", &loopback, &reference);
    // The large paste: the guest's loop is replaced by the copy.
    let loopback_large = large_paste(&x, || type_slowly(&control, &format!("{LARGE}\n"), Some("ctrl+c")));
    report_large("loopback", loopback_large, reference_large);
    finish(client);
    let big = dir.path().join("big.bin");
    std::fs::write(&big, pleiades_tests::incompressible(FILE_BYTES, 0x2545_F491_4F6C_DD1D)).unwrap();
    let loopback_file = send_file(&control, dir.path(), None, &big, "loopback");
    report_file("loopback", loopback_file, loopback_large);

    // The same through the link emulator: 20 ms RTT, 100 Mbit/s.
    let through = mint_through_link(&control, dir.path());
    let client = connect(&x, &through.1, dir.path(), "wan");
    type_slowly(&control, &format!("{ECHO_LOOP}\n"), None);
    let wan = round_trips(&x, "wan");
    report("20 ms RTT, 100 Mbit/s", &wan, &reference);
    let wan_large = large_paste(&x, || type_slowly(&control, &format!("{LARGE}\n"), Some("ctrl+c")));
    report_large("20 ms RTT, 100 Mbit/s", wan_large, reference_large);
    finish(client);
    let wan_file = send_file(&control, dir.path(), Some(&through.0), &big, "wan");
    report_file("20 ms RTT, 100 Mbit/s", wan_file, wan_large);
    println!("file transfer through the link: {:.0} % of its 100 Mbit/s", wan_file * 8.0 / 100.0 * 100.0);
    drop(through);

    let status = request(&control, &Request::Status, Duration::from_secs(30)).unwrap().result.unwrap();
    println!("the VM process's clipboard counters: {}", status["agent"]["clipboard"]);
    let _ = vm.kill();
    let _ = vm.wait();
}

/// `pleiades-host run` with the desktop image and its agent, served on loopback.
fn boot(image: &DesktopImage, dir: &Path) -> (Child, PathBuf, PathBuf) {
    let (mut command, control) = run_desktop_image(image, dir);
    let file = dir.join("desk.pleiades");
    let vm = command
        .args(["--device", "gpu", "--device", "keyboard", "--device", "tablet", "--device", "vsock"])
        .args(["--listen", "127.0.0.1:0", "--connection-file"])
        .arg(&file)
        .spawn()
        .unwrap();
    wait_for("the control socket", Duration::from_secs(60), || control.exists().then_some(())).unwrap();
    let usable = wait_usable(&control, DESKTOP_BOOT).unwrap();
    println!("desktop image usable after {:.1} s (QEMU TCG)", usable.as_secs_f64());
    (vm, control, file)
}

/// A new connection file for the VM, pointing at a link emulator in front of it.
fn mint_through_link(control: &Path, dir: &Path) -> (Link, PathBuf) {
    let direct = mint(control, None);
    let server = format!("{}:{}", direct.host, direct.port).parse().unwrap();
    let link = Link::start(server, LinkConfig::wan(Duration::from_millis(20), 0.0, 100)).unwrap();
    let file = dir.join("wan.pleiades");
    std::fs::write(&file, mint(control, Some(&link)).to_toml()).unwrap();
    (link, file)
}

/// The file sent into the guest.
const FILE_BYTES: usize = 50 << 20;

/// `pleiades send` of `file` (through `link` when given); MB/s from the desktop's accept to its
/// done, as the client reports it.
fn send_file(control: &Path, dir: &Path, link: Option<&Link>, file: &Path, name: &str) -> f64 {
    let connection = dir.join(format!("send-{name}.pleiades"));
    std::fs::write(&connection, mint(control, link).to_toml()).unwrap();
    let report = dir.join(format!("send-{name}.json"));
    let status = Command::new(workspace_binary("pleiades").unwrap())
        .arg("send")
        .arg(&connection)
        .arg(file)
        .arg("--report")
        .arg(&report)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join(format!("send-{name}.log"))).unwrap())
        .status()
        .unwrap();
    assert!(status.success(), "pleiades send failed: see send-{name}.log");
    let files: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    assert_eq!(files[0]["state"], "done", "{files}");
    let seconds = files[0]["elapsed_s"].as_f64().expect("the transfer's time");
    FILE_BYTES as f64 / 1e6 / seconds
}

fn report_file(path: &str, mb_s: f64, large_paste: Duration) {
    let paste = LARGE_BYTES as f64 / 1e6 / large_paste.as_secs_f64();
    println!(
        "file transfer ({} MiB into the guest's Downloads, SHA-256 checked there), {path}: {mb_s:.1} MB/s; \
         the large paste out of the guest, same path, same run: {paste:.1} MB/s; ratio {:.2}x",
        FILE_BYTES >> 20,
        mb_s / paste
    );
}

/// The headless client on display `x`.
fn connect(x: &Xvfb, file: &Path, dir: &Path, name: &str) -> Child {
    let child = Command::new(workspace_binary("pleiades").unwrap())
        .env("DISPLAY", x.display())
        .arg("connect")
        .arg(file)
        .args(["--headless", "--no-h264", "--no-audio", "--duration", "3600"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join(format!("client-{name}.log"))).unwrap())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(3));
    child
}

fn finish(mut client: Child) {
    let _ = Command::new("kill").args(["-INT", &client.id().to_string()]).status();
    let _ = wait_for("the client to end", Duration::from_secs(30), || client.try_wait().ok().flatten());
    let _ = client.kill();
}

/// Types into the guest a few characters at a time (its X server under TCG drops bursts).
fn type_slowly(control: &Path, text: &str, combo: Option<&str>) {
    if let Some(combo) = combo {
        // Twice, and a pause: a loop's command may eat the first; the shell then takes a while
        // to draw its prompt again (keys typed meanwhile are lost).
        for _ in 0..2 {
            request(control, &Request::Key { combo: combo.into() }, Duration::from_secs(30)).unwrap();
            std::thread::sleep(Duration::from_secs(2));
        }
    }
    let chars: Vec<char> = text.chars().collect();
    for piece in chars.chunks(4) {
        let text: String = piece.iter().collect();
        request(control, &Request::Type { text }, Duration::from_secs(30)).unwrap();
        std::thread::sleep(Duration::from_millis(150));
    }
}

/// `PINGS` round trips on display `x`: copy `pingN`, paste until `pongN`; their durations.
fn round_trips(x: &Xvfb, label: &str) -> Vec<Duration> {
    let mut times = Vec::new();
    // The first is a warm-up (the loop may not run yet); it is not counted.
    for i in 0..=PINGS {
        let token = format!("{label}-{i}-{}", std::process::id());
        let started = Instant::now();
        let mut holder = copy(x, format!("ping{token}").as_bytes());
        let want = format!("pong{token}");
        let timeout = if i == 0 { Duration::from_secs(300) } else { Duration::from_secs(120) };
        wait_for(&format!("{want} on the client's clipboard"), timeout, || {
            (paste(x)? == want.as_bytes()).then_some(())
        })
        .unwrap();
        if i > 0 {
            times.push(started.elapsed());
        }
        let _ = holder.kill();
        let _ = holder.wait();
    }
    times.sort();
    times
}

/// How long the first paste on display `x` of the large content that `copy_large` copies takes
/// (later pastes of the same content would be served from the client's own cache). The copy is
/// there once a holder of other content on `x` lost the selection to it.
fn large_paste(x: &Xvfb, copy_large: impl FnOnce()) -> Duration {
    let mut holder = copy(x, b"waiting for the large copy");
    copy_large();
    wait_for("the large copy to take the selection", Duration::from_secs(300), || {
        holder.try_wait().ok().flatten()
    })
    .unwrap();
    let started = Instant::now();
    let pasted = paste(x).expect("the large paste");
    let took = started.elapsed();
    assert_eq!(pasted.len(), LARGE_BYTES, "the large paste is whole");
    took
}

fn copy(x: &Xvfb, bytes: &[u8]) -> Child {
    x.copy("UTF8_STRING", bytes).expect("xclip runs")
}

fn paste(x: &Xvfb) -> Option<Vec<u8>> {
    x.paste("UTF8_STRING", Duration::from_secs(30))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn report(path: &str, times: &[Duration], reference: &[Duration]) {
    let (p50, max) = (times[times.len() / 2], times[times.len() - 1]);
    let r50 = reference[reference.len() / 2];
    println!(
        "clipboard round trip, {path}: p50 {:.0} ms, max {:.0} ms over {} pings; the same with both ends \
         on the client's display: p50 {:.0} ms; ratio {:.1}x (guest: QEMU TCG)",
        ms(p50),
        ms(max),
        times.len(),
        ms(r50),
        ms(p50) / ms(r50).max(0.001)
    );
}

fn report_large(path: &str, took: Duration, reference: Duration) {
    let mb = LARGE_BYTES as f64 / 1e6;
    println!(
        "clipboard large paste ({mb:.1} MB of text from the guest), {path}: {:.0} ms, {:.1} MB/s; \
         the same from a local owner: {:.0} ms, {:.1} MB/s; ratio {:.1}x",
        ms(took),
        mb / took.as_secs_f64(),
        ms(reference),
        mb / reference.as_secs_f64(),
        took.as_secs_f64() / reference.as_secs_f64()
    );
}
