//! Sound end to end: `pleiades-host run --vmm qemu --device gpu --device sound --listen` runs
//! the Linux test image with Pleiades' virtio-snd served to QEMU's `vhost-user-snd-pci`; the
//! guest's snd_virtio binds and ALSA gets a card. The headless client records what it would
//! play (`playback.wav`) and sends a WAV as its microphone (`--mic`).
//!
//! 1. The guest plays 440 Hz (`pleiades-agent tone`): the client's WAV has its dominant
//!    frequency at 440 ± 2 Hz, at the level the guest wrote (RMS within ±25 %: Opus at
//!    96 kbit/s keeps a pure tone's level within a few percent; the margin covers the fades
//!    where the tone starts and stops inside a 5 ms window).
//! 2. The client's microphone plays 1 kHz: the guest's recording (`pleiades-agent record`,
//!    out over the serial console in base64) has it at 1000 ± 2 Hz.
//! 3. Through `linkem` with 2 % loss each way, lost audio is repaired: some frames were rebuilt
//!    from FEC or concealed, every such frame is audible, and no quiet stretch over 20 ms is
//!    left that an underrun does not explain (a guest starved under TCG plays late, which the
//!    client's `silence`/`expand` repairs record; that is scheduling, measured in `cargo bench
//!    -p pleiades-tests --bench audio`, not a failure of loss repair).
//!
//! Between 1 and 2 a client sends bad audio datagrams (Opus that does not decode, playback
//! frames in the wrong direction): the server drops and counts them, and the session and the
//! VM go on (2 runs after it).
//!
//! The test asserts on content only, never on timings; every wait is bounded.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use pleiades_protocol::connfile::Connection;
use pleiades_tests::audio::{
    dominant_frequency, left, longest_gap_ms, read_wav, rms, tone_span, write_sine_wav,
};
use pleiades_tests::linkem::{Link, LinkConfig};
use pleiades_tests::served::ServedDesktop;
use pleiades_tests::workspace_binary;

const SHELL: Duration = Duration::from_secs(120);
const AMPLITUDE: f64 = 0.5;

type Desktop = ServedDesktop;

/// Waits (bounded) until a client holds the session.
fn wait_client(desktop: &Desktop) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while desktop.status()["session"]["client_connected"] != true {
        assert!(Instant::now() < deadline, "the client did not connect: {:#}", desktop.status());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Boots the test image with a GPU and the sound device, serving on loopback; snd_virtio has
/// bound and ALSA has a playback and a capture device.
fn boot() -> Desktop {
    let (mut desktop, info) = ServedDesktop::boot(&["gpu", "sound"]);
    assert!(
        info.devices.iter().any(|d| d.driver == "virtio_snd"),
        "snd_virtio did not bind: {:?}",
        info.devices
    );
    let cards = desktop.guest.run("cat /proc/asound/cards; ls /dev/snd", SHELL).unwrap();
    assert!(cards.iter().any(|l| l.contains("pcmC0D0p")), "no ALSA playback device: {cards:?}");
    assert!(cards.iter().any(|l| l.contains("pcmC0D0c")), "no ALSA capture device: {cards:?}");
    desktop
}

/// Starts `pleiades connect --headless` in the background (no duration: [`finish`] ends it).
fn client(target: &Path, record: &Path, mic: Option<&Path>) -> Child {
    let mut cmd = Command::new(workspace_binary("pleiades").unwrap());
    cmd.arg("connect")
        .arg(target)
        .args(["--headless", "--no-h264", "--record"])
        .arg(record)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(mic) = mic {
        cmd.arg("--mic").arg(mic);
    }
    cmd.spawn().expect("pleiades runs")
}

/// Once the server has sent no audio for two seconds (what the guest played has all gone out),
/// ends the client with SIGTERM (it writes its files) and checks it exited 0.
fn finish(desktop: &Desktop, mut child: Child) {
    let deadline = Instant::now() + Duration::from_secs(120);
    let sent = || desktop.status()["session"]["audio_frames"].as_u64().unwrap_or(0);
    let mut last = (sent(), 0);
    while last.1 < 2 {
        assert!(Instant::now() < deadline, "the server never stopped sending audio");
        std::thread::sleep(Duration::from_secs(1));
        let now = sent();
        last = if now == last.0 { (now, last.1 + 1) } else { (now, 0) };
    }
    assert!(Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success());
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the client did not end on SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Plays a tone in the guest while a client records; returns (guest RMS, client's left channel).
fn play_and_record(
    desktop: &mut Desktop,
    target: &Path,
    name: &str,
    seconds: u32,
) -> (f64, Vec<i16>, serde_json::Value) {
    let record = desktop.dir.path().join(name);
    let child = client(target, &record, None);
    wait_client(desktop);
    let out = desktop
        .guest
        .run(&format!("pleiades-agent tone --freq 440 --seconds {seconds} --amplitude {AMPLITUDE}"), SHELL)
        .unwrap();
    let line =
        out.iter().find_map(|l| l.trim().strip_prefix("PLEIADES-TONE ")).unwrap_or_else(|| panic!("{out:?}"));
    eprintln!("{name}: the guest played {line}");
    let report: serde_json::Value = serde_json::from_str(line).unwrap();
    finish(desktop, child);
    let (rate, channels, samples) = read_wav(&std::fs::read(record.join("playback.wav")).unwrap()).unwrap();
    assert_eq!((rate, channels), (48_000, 2));
    let audio: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(record.join("audio.json")).unwrap()).unwrap();
    (report["rms"].as_f64().unwrap(), left(&samples), audio)
}

/// A library session that sends undecodable microphone frames and server-only datagrams.
fn send_bad_audio(file: &Path) {
    use pleiades_client::session::{Session, SessionOptions};
    use pleiades_protocol::wire::{AudioPacket, Datagram};
    let connection = Connection::from_toml(&std::fs::read_to_string(file).unwrap()).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let connected = pleiades_client::connect::connect(&connection).await.expect("connects");
        let session =
            Session::start(connected, &connection.ticket, SessionOptions::default()).await.expect("session");
        for seq in 0..20 {
            let garbage = AudioPacket { seq, timestamp_us: 0, opus: vec![0xff; 7] };
            let _ = session.handle.send_datagram(&Datagram::AudioRecord(garbage.clone()));
            let _ = session.handle.send_datagram(&Datagram::AudioPlayback(garbage));
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        drop(session);
    });
}

#[test]
fn the_guest_plays_and_records_through_the_session() {
    let mut desktop = boot();
    let file = desktop.dir.path().join("desk.pleiades");

    // 1. Playback on loopback.
    let (guest_rms, played, audio) = play_and_record(&mut desktop, &file, "loopback", 4);
    let threshold = guest_rms * 0.3;
    let (start, end) = tone_span(&played, 48_000, threshold).expect("the client played the tone");
    let tone = &played[start..end];
    let freq = dominant_frequency(tone, 48_000.0, 50.0, 5000.0);
    eprintln!(
        "loopback: {:.1} s of tone at {freq:.1} Hz, RMS {:.0} (guest {guest_rms:.0}); audio {audio}",
        tone.len() as f64 / 48_000.0,
        rms(tone)
    );
    assert!((freq - 440.0).abs() <= 2.0, "dominant frequency {freq} Hz");
    let ratio = rms(tone) / guest_rms;
    assert!((0.75..=1.25).contains(&ratio), "level: client RMS / guest RMS = {ratio:.3}");
    assert!(tone.len() > 48_000 * 3, "{} samples of tone", tone.len());

    // Bad audio datagrams: dropped and counted; nothing ends.
    let dropped_before = desktop.status()["session"]["dropped_datagrams"].as_u64().unwrap_or(0);
    send_bad_audio(&desktop.mint("bad.pleiades"));
    let dropped = desktop.status()["session"]["dropped_datagrams"].as_u64().unwrap_or(0) - dropped_before;
    eprintln!("bad audio datagrams: {dropped} dropped");
    assert!(dropped > 0, "the server counted no bad datagram");

    // 2. The client's microphone into the guest's recording.
    let mic = desktop.dir.path().join("mic-1k.wav");
    write_sine_wav(&mic, 1000.0, 0.5, 1.0).unwrap();
    let child = client(&desktop.mint("mic.pleiades"), &desktop.dir.path().join("mic"), Some(&mic));
    wait_client(&desktop);
    std::thread::sleep(Duration::from_millis(500));
    let out = desktop.guest.run("pleiades-agent record --seconds 2", SHELL).unwrap();
    finish(&desktop, child);
    let begin =
        out.iter().position(|l| l.trim() == "PLEIADES-WAV-BEGIN").unwrap_or_else(|| panic!("{out:?}"));
    let end = out.iter().position(|l| l.trim() == "PLEIADES-WAV-END").expect("end of the recording");
    let text: String = out[begin + 1..end].iter().map(|l| l.trim()).collect();
    let wav = base64::engine::general_purpose::STANDARD.decode(text).expect("base64");
    let (rate, channels, recorded) = read_wav(&wav).unwrap();
    assert_eq!((rate, channels), (48_000, 1));
    let last_second = &recorded[recorded.len() - 48_000..];
    let freq = dominant_frequency(last_second, 48_000.0, 50.0, 5000.0);
    eprintln!("microphone: the guest recorded {freq:.1} Hz at RMS {:.0}", rms(last_second));
    assert!(rms(last_second) > 1000.0, "the recording is silent");
    assert!((freq - 1000.0).abs() <= 2.0, "dominant frequency {freq} Hz");

    // 3. 2 % loss each way: lost audio repaired. 8 s of tone is about 400 datagrams, so the
    // chance that the loss misses every one of them is 0.98^400, 3 in 10 000.
    let connection =
        Connection::from_toml(&std::fs::read_to_string(desktop.mint("lossy.pleiades")).unwrap()).unwrap();
    let server: std::net::SocketAddr = format!("{}:{}", connection.host, connection.port).parse().unwrap();
    let link = Link::start(server, LinkConfig::wan(Duration::from_millis(20), 0.02, 100)).unwrap();
    let through_link = Connection {
        host: link.client_addr().ip().to_string(),
        port: link.client_addr().port(),
        ..connection
    };
    let lossy = desktop.dir.path().join("lossy-link.pleiades");
    std::fs::write(&lossy, through_link.to_toml()).unwrap();
    let (guest_rms, played, audio) = play_and_record(&mut desktop, &lossy, "lossy", 8);
    let threshold = guest_rms * 0.3;
    let (start, end) = tone_span(&played, 48_000, threshold).expect("the client played the tone");
    let gap = longest_gap_ms(&played[start..end], 48_000, threshold);
    let repairs: Vec<(u64, String)> = serde_json::from_value(audio["repairs"].clone()).unwrap();
    let unexplained = unexplained_gap_ms(&played, (start, end), threshold, &repairs);
    let stats = link.stats();
    eprintln!("device: {}", desktop.status()["sound"]);
    for (i, w) in played[start..end].chunks(240).enumerate() {
        if rms(w) < threshold {
            eprintln!(
                "quiet 5 ms window at {:.3} s of the WAV (frame {})",
                (start + i * 240) as f64 / 48_000.0,
                (start + i * 240) / 960
            );
        }
    }
    eprintln!(
        "2 % loss: longest gap {gap} ms over {:.1} s; link lost {} of {} packets; audio {audio}",
        (end - start) as f64 / 48_000.0,
        stats.lost.load(std::sync::atomic::Ordering::Relaxed),
        stats.forwarded.load(std::sync::atomic::Ordering::Relaxed)
    );
    let repaired = ["recovered_fec", "fec_unavailable", "concealed"]
        .iter()
        .map(|k| audio[k].as_u64().unwrap_or_else(|| panic!("no {k} in {audio}")))
        .sum::<u64>();
    assert!(repaired > 0, "no lost audio frame was repaired: {audio}");
    // An isolated repair must sound. One that follows other repaired frames (an underrun's
    // expansion, a burst of loss) is the decoder's third or later concealment in a row, which
    // fades out by design (Opus's as every codec's): not held to the threshold.
    let repaired_frames: std::collections::HashSet<u64> = repairs.iter().map(|(f, _)| *f).collect();
    for (frame, kind) in repairs.iter().filter(|(_, k)| k == "fec" || k == "conceal") {
        let (a, b) = (*frame as usize * FRAME, (*frame as usize + 1) * FRAME);
        let after_repairs =
            (1..=2).any(|back| frame.checked_sub(back).is_some_and(|f| repaired_frames.contains(&f)));
        if start <= a && b <= end && !after_repairs {
            assert!(rms(&played[a..b]) >= threshold, "frame {frame}, repaired by {kind}, is quiet");
        }
    }
    assert!(unexplained <= 20.0, "a {unexplained} ms gap in the tone that no underrun explains");
    assert!(stats.lost.load(std::sync::atomic::Ordering::Relaxed) > 0, "the link lost nothing");
    let freq = dominant_frequency(&played[start..end], 48_000.0, 50.0, 5000.0);
    assert!((freq - 440.0).abs() <= 2.0, "dominant frequency {freq} Hz under loss");
}

/// Samples of one 20 ms output frame (one channel).
const FRAME: usize = 960;

/// The longest run of quiet 5 ms windows within `span` of `played`, leaving out windows in or next
/// to a frame the client filled for want of data (`silence`, `expand`: an underrun) and, when the
/// repair list is full, everything after its last entry.
fn unexplained_gap_ms(
    played: &[i16],
    span: (usize, usize),
    threshold: f64,
    repairs: &[(u64, String)],
) -> f64 {
    let underrun: std::collections::HashSet<u64> = repairs
        .iter()
        .filter(|(_, k)| k == "silence" || k == "expand")
        .flat_map(|(f, _)| [f.saturating_sub(1), *f, f + 1])
        .collect();
    let known_until = if repairs.len() >= 200 { repairs.last().map_or(0, |r| r.0) } else { u64::MAX };
    let window = FRAME / 4;
    let (mut longest, mut run) = (0usize, 0usize);
    for at in (span.0..span.1.saturating_sub(window)).step_by(window) {
        let frame = (at / FRAME) as u64;
        if rms(&played[at..at + window]) < threshold && !underrun.contains(&frame) && frame < known_until {
            run += 1;
            longest = longest.max(run);
        } else {
            run = 0;
        }
    }
    longest as f64 * 5.0
}
