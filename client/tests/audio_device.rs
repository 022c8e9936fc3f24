//! The sound card through cpal, against a private PulseAudio server with a null sink (this
//! machine has no sound card): `pleiades audio-test` plays a tone and records the sink's
//! monitor, and the frames that went through are counted. A server that is not there is an
//! error with a message, never a panic. Skipped (with a note) where `pulseaudio` is not
//! installed.

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

fn pulse() -> Option<Pulse> {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("native");
    let child = Command::new("pulseaudio")
        .args(["-n", "--daemonize=no", "--exit-idle-time=-1", "--disallow-exit"])
        .args(["-L", "module-null-sink sink_name=nullsink"])
        .arg("-L")
        .arg(format!("module-native-protocol-unix auth-anonymous=1 socket={}", socket.display()))
        .env("HOME", dir.path())
        .env("XDG_RUNTIME_DIR", dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let pulse = Pulse { child, server: format!("unix:{}", socket.display()), _dir: dir };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !socket.exists() {
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Some(pulse)
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
    let Some(pulse) = pulse() else {
        eprintln!("skipped: no pulseaudio here (apt-get install pulseaudio)");
        return;
    };
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
