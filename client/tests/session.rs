//! The client against the test fixture's quinn server (tests/common): a whole session, the
//! recorder's files, certificate pinning, refusals and a malformed display stream.

mod common;

use common::{Behavior, LIMIT, connection, fixture};
use pleiades_client::ClientError;
use pleiades_client::connect::{self, cert_sha256};
use pleiades_client::display::Codec;
use pleiades_client::recorder::{self, RecordOptions};
use pleiades_client::script;
use pleiades_client::session::{Session, SessionEvent, SessionOptions};
use pleiades_protocol::transport::error_code;
use pleiades_protocol::wire::{
    self, Channel, GoodbyeReason, InputMessage, MonitorSize, PointerAbs, RefuseCode, Wheel,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_decodes_acks_and_sends_input() {
    let fixture = fixture(Behavior::Serve);
    let conn = connection(&fixture, &fixture.pin);
    let connected = connect::connect(&conn).await.unwrap();
    let mut session = Session::start(connected, &conn.ticket, SessionOptions::default()).await.unwrap();
    assert_eq!(session.handle.info().session_id, 42);
    assert_eq!(session.handle.info().peer_name, "fixture");

    let mut frame = None;
    let mut layout = None;
    let mut goodbye = None;
    let mut cursor_shape = None;
    while goodbye.is_none() {
        let event =
            tokio::time::timeout(LIMIT, session.next_event()).await.expect("an event").expect("events");
        match event {
            SessionEvent::Frame(stats) => {
                frame = Some(stats);
                let handle = &session.handle;
                handle.send_pointer(0, 5, 6).await.unwrap();
                handle.send_buttons(wire::buttons::LEFT).await.unwrap();
                handle.send_buttons(0).await.unwrap();
                handle.send_wheel(0, -120).await.unwrap();
                handle.request_layout(&[(1024, 768), (800, 600)]).await.unwrap();
                session.handle.send_key(30, true).await.unwrap();
                session.handle.send_key(30, false).await.unwrap();
            }
            SessionEvent::Layout(monitors) => layout = Some(monitors),
            SessionEvent::Goodbye(g) => goodbye = Some(g),
            SessionEvent::CursorShape { serial, width, height } => {
                cursor_shape = Some((serial, width, height))
            }
            SessionEvent::ServerClosed(reason) => panic!("closed before the Goodbye was read: {reason}"),
            SessionEvent::Failed(error) => panic!("session failed: {error}"),
        }
    }
    let stats = frame.expect("a frame");
    assert_eq!((stats.frame_id, stats.scanout, stats.tiles, stats.codec), (1, 0, 2, Codec::Tiles));
    assert!(stats.bytes > 0 && stats.decoded_us >= stats.received_us);
    assert!(stats.update_latency_us >= 0, "same clock on both ends");
    assert_eq!(layout.unwrap()[0].width, 32);
    assert_eq!(goodbye.unwrap().reason, GoodbyeReason::Shutdown);

    assert_eq!(cursor_shape, Some((7, 2, 2)));
    let cursor = session.handle.cursor();
    assert_eq!(cursor.shape.unwrap().hot_x, 1);
    // Latest wins: the older position sent after it is ignored. (Datagrams are unreliable in
    // general; on loopback with an idle receiver they arrive.)
    let position = cursor.position.expect("a cursor position datagram");
    assert_eq!((position.seq, position.x, position.y), (3, 10, 11));

    let fb = session.handle.snapshot(0).unwrap();
    assert_eq!(fb.pixel(0, 0), Some([0xee, 0xff, 0xc0, 0]));
    assert_eq!(fb.pixel(16, 8), Some([0, 0x80, 0x40, 0]));
    assert_eq!(fb.pixel(31, 15), Some([127, 0x80, 0x40, 0]));

    let observed = fixture.observed.await.unwrap();
    let ack = observed.ack.expect("the frame was acked");
    assert_eq!((ack.frame_id, ack.scanout), (1, 0));
    assert_eq!((ack.received_us, ack.decoded_us), (stats.received_us, stats.decoded_us));
    assert!(observed.key_a, "the key arrived on the input stream");
    assert!(observed.pong, "the fixture's Ping was answered");
    assert_eq!(
        observed.inputs[..4],
        [
            InputMessage::PointerAbs(PointerAbs { scanout: 0, x: 5, y: 6 }),
            InputMessage::Buttons(wire::buttons::LEFT),
            InputMessage::Buttons(0),
            InputMessage::Wheel(Wheel { dx: 0, dy: -120 }),
        ]
    );
    assert_eq!(
        observed.layout_request.unwrap(),
        [MonitorSize { width: 1024, height: 768 }, MonitorSize { width: 800, height: 600 }]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_recorder_writes_frames_pngs_and_a_summary() {
    let fixture = fixture(Behavior::Serve);
    let conn = connection(&fixture, &fixture.pin);
    let dir = tempfile::tempdir().unwrap();
    let connected = connect::connect(&conn).await.unwrap();
    let session = Session::start(connected, &conn.ticket, SessionOptions::default()).await.unwrap();
    // The fixture says goodbye once it saw the key: the script types it after the frame is
    // likely there, but the recording does not depend on that.
    let options = RecordOptions {
        dir: Some(dir.path().to_owned()),
        duration: Some(LIMIT),
        snapshot_every: None,
        script: script::parse("# test\nlayout 640x480\ntype a\n").unwrap(),
    };
    let summary = recorder::record(session, options).await.map_err(|(_, e)| e).unwrap();
    assert_eq!(summary.end, "goodbye", "{}", summary.end_detail);
    assert_eq!(summary.frames, 1);
    assert_eq!(summary.codecs.get("tiles"), Some(&1));
    assert_eq!(summary.session_id, 42);

    let frames = std::fs::read_to_string(dir.path().join("frames.jsonl")).unwrap();
    let line: serde_json::Value = serde_json::from_str(frames.lines().next().unwrap()).unwrap();
    assert_eq!(line["frame_id"], 1);
    assert_eq!(line["codec"], "tiles");
    assert!(line["update_latency_us"].is_i64());
    let summary_json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary_json["frames"], 1);
    assert!(summary_json["latency"]["p95_us"].is_i64());
    let png = std::fs::read(dir.path().join("scanout-0.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    assert!(fixture.observed.await.unwrap().ack.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wrong_certificate_is_refused() {
    let fixture = fixture(Behavior::Serve);
    let other = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let wrong_pin = cert_sha256(other.cert.der());
    let error = connect::connect(&connection(&fixture, &wrong_pin)).await.unwrap_err();
    let ClientError::WrongCertificate { got, expected } = &error else { panic!("{error}") };
    assert_eq!((got, expected), (&fixture.pin, &wrong_pin));
    let text = error.to_string();
    assert!(text.contains("not the one the connection file pins") && text.contains(&fixture.pin), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_pin_refuses_to_connect() {
    let fixture = fixture(Behavior::Serve);
    let error = connect::connect(&connection(&fixture, "")).await.unwrap_err();
    assert!(matches!(error, ClientError::NoPin), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_ticket_names_the_code() {
    let fixture = fixture(Behavior::Refuse(RefuseCode::ReusedTicket));
    let conn = connection(&fixture, &fixture.pin);
    let connected = connect::connect(&conn).await.unwrap();
    let error = Session::start(connected, &conn.ticket, SessionOptions::default()).await.unwrap_err();
    let ClientError::Refused { code, message } = &error else { panic!("{error}") };
    assert_eq!(*code, RefuseCode::ReusedTicket);
    assert_eq!(message, "the ticket was used already");
    let text = error.to_string();
    assert!(text.contains("ReusedTicket") && text.contains("code 3"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_display_message_ends_the_session_with_a_clear_error() {
    let fixture = fixture(Behavior::Malformed);
    let conn = connection(&fixture, &fixture.pin);
    let connected = connect::connect(&conn).await.unwrap();
    let mut session = Session::start(connected, &conn.ticket, SessionOptions::default()).await.unwrap();
    let error = loop {
        match tokio::time::timeout(LIMIT, session.next_event()).await.expect("an event").expect("events") {
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
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_never_answers_times_out_after_10_s() {
    let fixture = fixture(Behavior::Silent);
    let conn = connection(&fixture, &fixture.pin);
    let connected = connect::connect(&conn).await.unwrap();
    let error = Session::start(connected, &conn.ticket, SessionOptions::default()).await.unwrap_err();
    assert!(matches!(error, ClientError::HandshakeTimeout), "{error}");
    assert!(error.to_string().contains("within 10 s"));
}
