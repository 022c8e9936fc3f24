//! The `pleiades` binary: usage errors, and a headless recording against the test fixture.

mod common;

use std::process::{Command, Output};

use common::{Behavior, connection, fixture};
use pleiades_protocol::handshake::Capabilities;
use pleiades_protocol::wire::{InputMessage, MonitorSize, PointerAbs, Wheel, buttons};

fn pleiades(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pleiades")).args(args).env("RUST_LOG", "warn").output().unwrap()
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_headless_recording_from_a_connection_file() {
    let fixture = fixture(Behavior::Serve);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("desk.pleiades");
    std::fs::write(&file, connection(&fixture, &fixture.pin).to_toml()).unwrap();
    let script = dir.path().join("input.script");
    std::fs::write(&script, "# the fixture says goodbye after this key\nmove 0 3 4\nclick right\nwheel 2\nlayout 1280x720\ntype a\n").unwrap();
    let record = dir.path().join("rec");
    let args = [
        "connect".to_owned(),
        file.display().to_string(),
        "--headless".into(),
        "--record".into(),
        record.display().to_string(),
        "--duration".into(),
        "20".into(),
        "--input".into(),
        script.display().to_string(),
        "--no-h264".into(),
    ];
    let output = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_pleiades")).args(&args).output().unwrap()
    })
    .await
    .unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    let summary: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(summary["frames"], 1);
    assert_eq!(summary["end"], "goodbye");
    for name in ["frames.jsonl", "summary.json", "scanout-0.png"] {
        assert!(record.join(name).is_file(), "{name} missing");
    }
    let observed = fixture.observed.await.unwrap();
    assert!(observed.ack.is_some() && observed.key_a);
    assert_eq!(
        observed.inputs[..4],
        [
            InputMessage::PointerAbs(PointerAbs { scanout: 0, x: 3, y: 4 }),
            InputMessage::Buttons(buttons::RIGHT),
            InputMessage::Buttons(0),
            InputMessage::Wheel(Wheel { dx: 0, dy: 240 }),
        ]
    );
    assert_eq!(observed.layout_request.unwrap(), [MonitorSize { width: 1280, height: 720 }]);
    let offered = observed.offered.unwrap();
    assert!(
        !offered.contains(Capabilities::H264) && offered.contains(Capabilities::ZSTD_TILES),
        "{offered:?}"
    );
}
