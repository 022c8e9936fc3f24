//! The sound card through cpal, against a private PulseAudio server with a null sink (this
//! machine has no sound card): `pleiades audio-test` plays a tone and records the sink's
//! monitor, and the frames that went through are counted. A server that is not there is an
//! error with a message, never a panic. `pulseaudio` is the prerequisite (`./dev deps`): the
//! test skips without it outside CI and fails without it under CI; a PulseAudio that is
//! installed but does not start fails the test.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Pulse {
    child: Child,
    server: String,
    _dir: tempfile::TempDir,
}

impl Drop for Pulse {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn pulse(program: &std::path::Path) -> Pulse {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("native");
    let child = Command::new(program)
        .args(["-n", "--daemonize=no", "--exit-idle-time=-1", "--disallow-exit"])
        .args(["-L", "module-null-sink sink_name=nullsink"])
        .arg("-L")
        .arg(format!("module-native-protocol-unix auth-anonymous=1 socket={}", socket.display()))
        .env("HOME", dir.path())
        .env("XDG_RUNTIME_DIR", dir.path())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("pulseaudio.log")).unwrap())
        .spawn()
        .expect("pulseaudio starts");
    let log = dir.path().join("pulseaudio.log");
    let mut pulse = Pulse { child, server: format!("unix:{}", socket.display()), _dir: dir };
    let deadline = Instant::now() + Duration::from_secs(60);
    while !socket.exists() {
        if let Ok(Some(status)) = pulse.child.try_wait() {
            let log = std::fs::read_to_string(&log).unwrap_or_default();
            panic!("pulseaudio exited ({status}) before listening: {log}");
        }
        assert!(Instant::now() < deadline, "pulseaudio did not listen within 60 s");
        std::thread::sleep(Duration::from_millis(50));
    }
    pulse
}

fn audio_test(server: &str, seconds: u32) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_pleiades"))
        .args(["audio-test", "--record", "--seconds", &seconds.to_string()])
        .env("PULSE_SERVER", server)
        .output()
        .expect("pleiades runs")
}

#[test]
fn the_speaker_and_microphone_run_on_pulseaudio_and_a_missing_server_is_an_error() {
    let Some(program) = pleiades_testkit::prerequisite::require(
        "the_speaker_and_microphone_run_on_pulseaudio",
        pleiades_testkit::prerequisite::command("pulseaudio"),
    ) else {
        return;
    };
    let pulse = pulse(&program);
    let output = audio_test(&pulse.server, 3);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    eprintln!("{report}");
    // 3 s of tone: the device took at least half of it, and the monitor recorded as much.
    assert!(report["played_frames"].as_u64().unwrap() >= 72_000, "{report}");
    assert!(report["captured_frames"].as_u64().unwrap() >= 72_000, "{report}");
    assert!(stderr.contains("PulseAudio"), "the PulseAudio host was used: {stderr}");

    // No server there: PulseAudio is skipped; without a sound card the default host fails too,
    // which is an error message, not a crash.
    let output = audio_test("unix:/nonexistent/pulse", 1);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    if !output.status.success() {
        assert!(stderr.contains("speaker") || stderr.contains("output device"), "{stderr}");
    }
}
