//! The `pleiades` binary: usage errors, and a headless recording of the host's real session
//! server on a synthetic desktop.

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{Desktop, LIMIT};
use pleiades_session::synthetic::Workload;

fn pleiades(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pleiades")).args(args).env("RUST_LOG", "warn").output().unwrap()
}

/// `pleiades connect FILE --headless --no-h264 ARGS… --input SCRIPT`, its output piped.
fn headless(file: &Path, args: &[&str], script: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pleiades"));
    cmd.arg("connect").arg(file).args(["--headless", "--no-h264"]).args(args).arg("--input").arg(script);
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn the_windowed_client_needs_a_display_and_refuses_headless_only_flags() {
    let uri = "pleiades://127.0.0.1:4433/?ticket=pt1.x&desktop=d";
    let output = Command::new(env!("CARGO_BIN_EXE_pleiades"))
        .args(["connect", uri])
        .env_remove("DISPLAY")
        .env_remove("WAYLAND_DISPLAY")
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    assert!(stderr(&output).contains("no display"), "{}", stderr(&output));

    let output = pleiades(&["connect", uri, "--duration", "1"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr(&output).contains("need --headless"), "{}", stderr(&output));
}

#[test]
fn bad_input_fails_with_a_message() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.pleiades");
    let output = pleiades(&["connect", missing.to_str().unwrap(), "--headless"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("cannot read the connection file"), "{}", stderr(&output));

    let output = pleiades(&["connect", "pleiades://127.0.0.1:4433/?ticket=pt1.x&desktop=d", "--headless"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("no cert_sha256"), "{}", stderr(&output));

    let script = dir.path().join("bad.script");
    std::fs::write(&script, "wait 1\nwait 700000\n").unwrap();
    let uri = format!("pleiades://127.0.0.1:4433/?ticket=pt1.x&desktop=d&cert_sha256={}", "ab".repeat(32));
    let output = pleiades(&["connect", &uri, "--headless", "--input", script.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("line 2") && stderr(&output).contains("10-minute"),
        "{}",
        stderr(&output)
    );

    let output = pleiades(&["connect", &uri, "--headless", "--duration=-1"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("--duration"), "{}", stderr(&output));
}

#[test]
fn a_headless_recording_from_a_connection_file_until_the_server_says_goodbye() {
    let desktop = Desktop::start(Workload::Typing, 320, 200);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("desk.pleiades");
    std::fs::write(&file, desktop.connection().to_toml()).unwrap();
    let script = dir.path().join("input.script");
    std::fs::write(&script, "# pointer, click, two wheel detents, a layout, a key\nmove 0 3 4\nclick right\nwheel 2\nlayout 1280x720\ntype a\n").unwrap();
    let record = dir.path().join("rec");
    let before = desktop.input_events();
    let client = headless(&file, &["--duration", "60", "--record", record.to_str().unwrap()], &script)
        .spawn()
        .unwrap();
    // Pointer (3 events), press and release (2 + 2), the wheel (2), key a down and up (2 + 2).
    let deadline = Instant::now() + LIMIT;
    while desktop.input_events() < before + 13 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(desktop.input_events(), before + 13, "the script's input reached the desktop");
    assert!(desktop.server.disconnect("test over"));
    let output = client.wait_with_output().unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    let summary: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert!(summary["frames"].as_u64() >= Some(1), "{summary:#}");
    assert_eq!(
        (summary["end"].as_str(), summary["end_detail"].as_str()),
        (Some("goodbye"), Some("Admin: test over"))
    );
    let capabilities = summary["capabilities"].as_str().unwrap();
    assert!(!capabilities.contains("H264") && capabilities.contains("ZSTD_TILES"), "{capabilities}");
    for name in ["frames.jsonl", "summary.json", "scanout-0.png"] {
        assert!(record.join(name).is_file(), "{name} missing");
    }
}

#[test]
fn a_session_ends_with_its_script_its_duration_or_sigterm() {
    let desktop = Desktop::start(Workload::Typing, 320, 200);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("desk.pleiades");
    std::fs::write(&file, desktop.connection().to_toml()).unwrap();
    let script = dir.path().join("input.script");
    std::fs::write(&script, "type ab\nwait 300\n").unwrap();
    let before = desktop.input_events();
    let output = headless(&file, &[], &script).output().unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    let summary: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!((summary["end"].as_str(), summary["script_done"].as_bool()), (Some("script"), Some(true)));
    // Two keys, each down and up with its report: all sent before the session ended.
    let deadline = Instant::now() + LIMIT;
    while desktop.input_events() < before + 8 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(desktop.input_events(), before + 8);

    // A duration that ends first cuts the script short, and the summary says so.
    std::fs::write(&script, "wait 600000\n").unwrap();
    std::fs::write(&file, desktop.connection().to_toml()).unwrap(); // tickets are one-time
    let output = headless(&file, &["--duration", "0.5"], &script).output().unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    let summary: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!((summary["end"].as_str(), summary["script_done"].as_bool()), (Some("duration"), Some(false)));

    // SIGTERM ends it cleanly, like Ctrl-C: exit 0, the summary and the files written.
    std::fs::write(&file, desktop.connection().to_toml()).unwrap();
    let record = dir.path().join("rec");
    let acked = desktop.session_status()["frames_acked"].as_u64().unwrap();
    let client = headless(&file, &["--record", record.to_str().unwrap()], &script).spawn().unwrap();
    // Acks come from the recording loop, which is listening for the signal by then.
    let deadline = Instant::now() + LIMIT;
    while desktop.session_status()["frames_acked"].as_u64().unwrap() == acked {
        assert!(Instant::now() < deadline, "the client never acked a frame");
        std::thread::sleep(Duration::from_millis(20));
    }
    let killed = Command::new("kill").args(["-TERM", &client.id().to_string()]).status().unwrap();
    assert!(killed.success());
    let output = client.wait_with_output().unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    let summary: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(
        (summary["end"].as_str(), summary["script_done"].as_bool()),
        (Some("interrupted"), Some(false))
    );
    assert!(record.join("scanout-0.png").is_file());
}
