//! The client against the host's real session server on a synthetic desktop (tests/common):
//! a whole session, the recorder's files, certificate pinning, a refused ticket; and against a
//! thin fixture whose control channel is the protocol's `ServerControl`, for what a real server
//! never sends: a cursor of its own, a malformed display stream, a client's message, silence.
//! And a scrolling page of text: copies on the wire, every frame the client shows pixel-exact.

mod common;

use std::time::Duration;

use common::{Behavior, Desktop, LIMIT, connection, fixture, runtime, same_pixels};
use pleiades_client::ClientError;
use pleiades_client::connect::{self, cert_sha256};
use pleiades_client::display::Codec;
use pleiades_client::recorder::{self, RecordOptions};
use pleiades_client::script;
use pleiades_client::session::{Session, SessionEvent, SessionOptions};
use pleiades_protocol::handshake::Capabilities;
use pleiades_protocol::transport::error_code;
use pleiades_protocol::wire::{self, Channel, GoodbyeReason, Monitor, MonitorSize, RefuseCode};
use pleiades_session::synthetic::Workload;

/// Lossless tiles only: what the client shows can be compared with the host pixel for pixel.
fn lossless() -> SessionOptions {
    let options = SessionOptions::default();
    SessionOptions { capabilities: options.capabilities.difference(Capabilities::H264), ..options }
}

/// Waits for `what` to become true, bounded.
fn wait_for(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + LIMIT;
    while !check() {
        assert!(std::time::Instant::now() < deadline, "gave up waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_session_shows_the_desktop_acks_its_frames_sends_input_and_hears_why_it_ends() {
    let desktop = Desktop::start(Workload::Typing, 320, 200);
    let rt = runtime();
    let conn = desktop.connection();
    let mut session = rt.block_on(async {
        let connected = connect::connect(&conn).await.unwrap();
        Session::start(connected, &conn.ticket, lossless()).await.unwrap()
    });
    assert!(
        session.handle.info().peer_name.starts_with("pleiades-host"),
        "{}",
        session.handle.info().peer_name
    );
    let next = |session: &mut Session| {
        rt.block_on(async { tokio::time::timeout(LIMIT, session.next_event()).await })
            .expect("an event")
            .expect("events")
    };

    let (mut frames, mut layout) = (0u64, None);
    while frames < 3 || layout.is_none() {
        match next(&mut session) {
            SessionEvent::Frame(stats) => {
                assert_eq!((stats.scanout, stats.codec == Codec::H264), (0, false));
                assert!(stats.decoded_us >= stats.received_us);
                frames += 1;
            }
            SessionEvent::Layout(monitors) => layout = Some(monitors),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(layout.unwrap(), [Monitor { id: 0, x: 0, y: 0, width: 320, height: 200 }]);

    // Input reaches the desktop's devices: a key press and release (2 events each with their
    // SYN), a pointer position (3), a click (2 + 2) and a wheel detent (2).
    let before = desktop.input_events();
    let handle = session.handle.clone();
    rt.block_on(async {
        handle.send_key(30, true).await.unwrap();
        handle.send_key(30, false).await.unwrap();
        handle.send_pointer(0, 5, 6).await.unwrap();
        handle.send_buttons(wire::buttons::LEFT).await.unwrap();
        handle.send_buttons(0).await.unwrap();
        handle.send_wheel(0, -120).await.unwrap();
    });
    wait_for("the input events", || desktop.input_events() >= before + 13);
    assert_eq!(desktop.input_events(), before + 13);

    // Once the desktop stops drawing, the client's picture becomes the host's, exactly.
    desktop.stop_painting();
    let pump = rt.spawn(async move {
        while let Some(event) = session.next_event().await {
            if let SessionEvent::Goodbye(goodbye) = event {
                return Some(goodbye);
            }
        }
        None
    });
    wait_for("the client's picture to be the host's", || {
        handle.snapshot(0).is_some_and(|picture| same_pixels(&picture, &desktop.screen()))
    });
    // Both sides measured the path, and the server heard the acks.
    wait_for("an RTT on both sides", || {
        handle.ping_rtt_us().is_some() && desktop.session_status()["rtt_us"].as_u64() > Some(0)
    });
    wait_for("the acks of the frames seen", || {
        desktop.session_status()["frames_acked"].as_u64() >= Some(frames)
    });
    let status = desktop.session_status();
    assert!(status["frames_acked"].as_u64() <= status["frames"].as_u64(), "{status}");

    // The server ends the session and says why.
    assert!(desktop.server.disconnect("the desktop is being updated"));
    let goodbye = rt.block_on(async { tokio::time::timeout(LIMIT, pump).await }).expect("the end").unwrap();
    let goodbye = goodbye.expect("a Goodbye");
    assert_eq!(
        (goodbye.reason, goodbye.message.as_str()),
        (GoodbyeReason::Admin, "the desktop is being updated")
    );
    wait_for("the server to see the client go", || desktop.session_status()["client_connected"] == false);
}

/// A picture of the synthetic desktop's workload, drawn the way its thread draws it.
struct Picture(Vec<u8>, u32, u32);

impl pleiades_session::synthetic::workload::Canvas for Picture {
    fn size(&self) -> (u32, u32) {
        (self.1, self.2)
    }
    fn put(&mut self, x: u32, y: u32, w: u32, h: u32, pixels: &[u8]) -> std::io::Result<()> {
        for row in 0..h {
            let at = ((y + row) * self.1 + x) as usize * 4;
            let from = (row * w) as usize * 4;
            self.0[at..at + w as usize * 4].copy_from_slice(&pixels[from..from + w as usize * 4]);
        }
        Ok(())
    }
}

#[test]
fn scrolling_text_arrives_as_copies_and_every_frame_shown_is_pixel_exact() {
    use pleiades_session::synthetic::workload;
    let (w, h) = (320, 200);
    // The pictures the scrolling workload draws, step by step (each step redraws the screen).
    let steps = 400u64;
    let pictures: Vec<Vec<u8>> = (1..=steps)
        .map(|n| {
            let mut picture = Picture(vec![0; (w * h * 4) as usize], w, h);
            workload::step(Workload::Scroll, &mut picture, n).unwrap();
            picture.0
        })
        .collect();
    let desktop = Desktop::start(Workload::Scroll, w, h);
    let rt = runtime();
    let conn = desktop.connection();
    // H.264 offered too: scrolling text must not become video.
    let mut session = rt.block_on(async {
        let connected = connect::connect(&conn).await.unwrap();
        Session::start(connected, &conn.ticket, SessionOptions::default()).await.unwrap()
    });
    assert!(session.handle.info().capabilities.contains(Capabilities::COPY_RECT));
    assert!(session.handle.info().capabilities.contains(Capabilities::PALETTE_TILES));
    let handle = session.handle.clone();
    let (mut frames, mut with_copies, mut last_step) = (0u32, 0u32, 0usize);
    while with_copies < 10 {
        let event = rt
            .block_on(async { tokio::time::timeout(LIMIT, session.next_event()).await })
            .expect("an event")
            .expect("events");
        let SessionEvent::Frame(stats) = event else { continue };
        frames += 1;
        assert_ne!(stats.codec, Codec::H264, "frame {}: scrolling text went as video", stats.frame_id);
        assert_ne!(stats.codec, Codec::Mixed, "frame {}: scrolling text went as video", stats.frame_id);
        with_copies += u32::from(stats.copies > 0);
        // What the client shows is one of the workload's pictures, exactly, and a later one
        // than before (the first frame shows the desktop before the first step, skipped).
        let shown = handle.snapshot(0).expect("a picture");
        let same =
            |p: &Vec<u8>| shown.pixels.chunks_exact(4).zip(p.chunks_exact(4)).all(|(a, b)| a[..3] == b[..3]);
        match pictures.iter().position(same) {
            Some(step) => {
                assert!(
                    step >= last_step,
                    "frame {} went back from step {last_step} to {step}",
                    stats.frame_id
                );
                last_step = step;
            }
            None if frames == 1 => {}
            None => panic!("frame {} ({stats:?}) is not a picture the desktop drew", stats.frame_id),
        }
        assert!(frames < 300, "{frames} frames and only {with_copies} with copies");
    }
    // The copies carried the scroll: far fewer bytes than the screen's.
    let status = desktop.session_status();
    assert!(status["frames"].as_u64() >= Some(u64::from(frames)), "{status}");
}

#[test]
fn the_recorder_writes_frames_pngs_and_a_summary() {
    let desktop = Desktop::start(Workload::Typing, 320, 200);
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let conn = desktop.connection();
    let before = desktop.input_events();
    let summary = rt.block_on(async {
        let connected = connect::connect(&conn).await.unwrap();
        let session = Session::start(connected, &conn.ticket, lossless()).await.unwrap();
        let options = RecordOptions {
            dir: Some(dir.path().to_owned()),
            duration: Some(Duration::from_secs(3)),
            snapshot_every: None,
            script: script::parse("# test\nlayout 640x480\ntype a\n").unwrap(),
        };
        recorder::record(session, options).await.map_err(|(_, e)| e).unwrap()
    });
    assert_eq!(summary.end, "duration", "{}", summary.end_detail);
    assert!(summary.frames >= 1, "{summary:?}");
    assert_eq!(summary.codecs.get("tiles"), Some(&summary.frames));
    assert!(summary.server_name.starts_with("pleiades-host"));
    assert!(summary.ping_rtt_us.is_some(), "the server answered the client's pings");
    assert_eq!(desktop.input_events(), before + 4, "the typed a: down and up, each with its SYN");

    let frames = std::fs::read_to_string(dir.path().join("frames.jsonl")).unwrap();
    assert_eq!(frames.lines().count() as u64, summary.frames);
    let line: serde_json::Value = serde_json::from_str(frames.lines().next().unwrap()).unwrap();
    assert_eq!(line["codec"], "tiles");
    assert!(line["update_latency_us"].is_i64());
    let summary_json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary_json["frames"], summary.frames);
    assert!(summary_json["latency"]["p95_us"].is_i64());
    let png = std::fs::read(dir.path().join("scanout-0.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    // The recorder said goodbye when its time was up: the server let the desktop go.
    let status = || desktop.session_status();
    wait_for("the server to see the client go", || status()["client_connected"] == false);
}

#[test]
fn the_wrong_certificate_and_an_empty_pin_are_refused() {
    let desktop = Desktop::start(Workload::Idle, 64, 64);
    let rt = runtime();
    let other = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let wrong_pin = cert_sha256(other.cert.der());
    let right = desktop.connection();
    let error = rt
        .block_on(connect::connect(&pleiades_protocol::connfile::Connection {
            cert_sha256: wrong_pin.clone(),
            ..right.clone()
        }))
        .unwrap_err();
    let ClientError::WrongCertificate { got, expected } = &error else { panic!("{error}") };
    assert_eq!((got.as_str(), expected), (desktop.server.fingerprint(), &wrong_pin));
    let text = error.to_string();
    assert!(text.contains("not the one the connection file pins") && text.contains(got), "{text}");

    let empty = pleiades_protocol::connfile::Connection { cert_sha256: String::new(), ..right };
    let error = rt.block_on(connect::connect(&empty)).unwrap_err();
    assert!(matches!(error, ClientError::NoPin), "{error}");
}

#[test]
fn a_ticket_used_twice_is_refused_with_its_code() {
    let desktop = Desktop::start(Workload::Idle, 64, 64);
    let rt = runtime();
    let conn = desktop.connection();
    rt.block_on(async {
        let first =
            Session::start(connect::connect(&conn).await.unwrap(), &conn.ticket, lossless()).await.unwrap();
        first.disconnect("done").await;
        let connected = connect::connect(&conn).await.unwrap();
        let error = Session::start(connected, &conn.ticket, lossless()).await.unwrap_err();
        let ClientError::Refused { code, message } = &error else { panic!("{error}") };
        assert_eq!(*code, RefuseCode::ReusedTicket, "{message}");
        let text = error.to_string();
        assert!(text.contains("ReusedTicket") && text.contains("code 3"), "{text}");
    });
    assert_eq!(desktop.session_status()["refused"], 1);
}

#[test]
fn the_cursor_layouts_and_pings_of_a_server() {
    let rt = runtime();
    rt.block_on(async {
        let fixture = fixture(Behavior::Cursor);
        let conn = connection(&fixture, &fixture.pin);
        let connected = connect::connect(&conn).await.unwrap();
        let mut session = Session::start(connected, &conn.ticket, SessionOptions::default()).await.unwrap();
        assert_eq!(
            (session.handle.info().session_id, session.handle.info().peer_name.as_str()),
            (42, "fixture")
        );
        let (mut layouts, mut shape, mut goodbye) = (Vec::new(), None, None);
        while goodbye.is_none() {
            match tokio::time::timeout(LIMIT, session.next_event()).await.expect("an event").expect("events")
            {
                SessionEvent::Layout(monitors) => {
                    if layouts.is_empty() {
                        session.handle.request_layout(&[(1024, 768), (800, 600)]).await.unwrap();
                    }
                    layouts.push(monitors);
                }
                SessionEvent::CursorShape { serial, width, height } => shape = Some((serial, width, height)),
                SessionEvent::Goodbye(g) => goodbye = Some(g),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(goodbye.unwrap().reason, GoodbyeReason::Shutdown);
        assert_eq!(layouts.len(), 2, "{layouts:?}");
        assert_eq!(layouts[0], [Monitor { id: 0, x: 0, y: 0, width: 32, height: 16 }]);
        assert_eq!((layouts[1][1].x, layouts[1][1].width), (1024, 800), "the server followed the request");
        assert_eq!(session.handle.layout(), layouts[1]);

        assert_eq!(shape, Some((7, 2, 2)));
        let cursor = session.handle.cursor();
        assert_eq!(cursor.shape.unwrap().hot_x, 1);
        // Latest wins: the older position sent after it is ignored. (Datagrams are unreliable in
        // general; on loopback with an idle receiver they arrive.)
        let position = cursor.position.expect("a cursor position datagram");
        assert_eq!((position.seq, position.x, position.y), (3, 10, 11));

        let observed = fixture.observed.await.unwrap();
        assert_eq!(
            observed.layout_request.unwrap(),
            [MonitorSize { width: 1024, height: 768 }, MonitorSize { width: 800, height: 600 }]
        );
        assert!(observed.rtt_us.is_some(), "the client answered the server's ping");
        assert_eq!(observed.offered, Some(SessionOptions::default().capabilities));
    });
}

#[test]
fn a_malformed_display_message_ends_the_session_with_a_clear_error() {
    let rt = runtime();
    rt.block_on(async {
        let fixture = fixture(Behavior::Malformed);
        let conn = connection(&fixture, &fixture.pin);
        let connected = connect::connect(&conn).await.unwrap();
        let mut session = Session::start(connected, &conn.ticket, SessionOptions::default()).await.unwrap();
        let error = loop {
            match tokio::time::timeout(LIMIT, session.next_event()).await.expect("an event").expect("events")
            {
                SessionEvent::Failed(error) => break error,
                SessionEvent::Frame(stats) => panic!("a frame from a malformed stream: {stats:?}"),
                _ => {}
            }
        };
        let ClientError::Protocol { channel, detail } = &error else { panic!("{error}") };
        assert_eq!(*channel, Channel::Display);
        assert!(detail.contains("unknown tile encoding"), "{detail}");
        let observed = fixture.observed.await.unwrap();
        assert_eq!(observed.client_close_code, Some(u64::from(error_code::MALFORMED_MESSAGE)));
    });
}

#[test]
fn a_message_only_a_client_may_send_ends_the_session_and_names_it() {
    let rt = runtime();
    rt.block_on(async {
        let fixture = fixture(Behavior::WrongDirection);
        let conn = connection(&fixture, &fixture.pin);
        let connected = connect::connect(&conn).await.unwrap();
        let mut session = Session::start(connected, &conn.ticket, SessionOptions::default()).await.unwrap();
        let error = loop {
            match tokio::time::timeout(LIMIT, session.next_event()).await.expect("an event").expect("events")
            {
                SessionEvent::Failed(error) => break error,
                SessionEvent::Layout(_) => {}
                other => panic!("{other:?}"),
            }
        };
        let ClientError::Protocol { channel, detail } = &error else { panic!("{error}") };
        assert_eq!(*channel, Channel::Control);
        assert_eq!(detail, "the server sent ClientStats (0x0008), which only a client may send");
        let observed = fixture.observed.await.unwrap();
        assert_eq!(observed.client_close_code, Some(u64::from(error_code::PROTOCOL_VIOLATION)));
    });
}

#[test]
fn a_server_that_never_answers_times_out_after_10_s() {
    let rt = runtime();
    rt.block_on(async {
        let fixture = fixture(Behavior::Silent);
        let conn = connection(&fixture, &fixture.pin);
        let connected = connect::connect(&conn).await.unwrap();
        let error = Session::start(connected, &conn.ticket, SessionOptions::default()).await.unwrap_err();
        assert!(matches!(error, ClientError::HandshakeTimeout), "{error}");
        assert!(error.to_string().contains("within 10 s"));
    });
}
