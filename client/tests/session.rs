//! The client against a small real quinn server (a test fixture, not a product: the host's
//! session server in host/ is the real one). The fixture speaks just enough of the protocol:
//! the handshake via `ServerHandshake`, one display stream, the control stream's acks.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use pleiades_client::ClientError;
use pleiades_client::clock::monotonic_us;
use pleiades_client::connect::{self, cert_sha256};
use pleiades_client::display::Codec;
use pleiades_client::recorder::{self, RecordOptions};
use pleiades_client::script;
use pleiades_client::session::{Session, SessionEvent, SessionOptions};
use pleiades_protocol::connfile::Connection;
use pleiades_protocol::handshake::{Capabilities, Refusal, ServerHandshake, ServerOutcome};
use pleiades_protocol::ticket::TicketClaims;
use pleiades_protocol::transport::{self, ALPN, error_code};
use pleiades_protocol::wire::{
    self, Channel, ControlMessage, DisplayMessage, FrameAck, FrameBegin, FrameEnd, Goodbye, GoodbyeReason,
    InputMessage, Key, Monitor, Rect, RefuseCode, StreamDecoder, Tile, TileData,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::sync::oneshot;

/// Bounds every wait of the fixture so that a broken client fails the test instead of hanging.
const LIMIT: Duration = Duration::from_secs(20);

/// What the fixture does after the `Hello`.
#[derive(Debug, Clone, Copy)]
enum Behavior {
    /// Welcome, a layout, one frame of tiles; wait for its ack and an `a` key; Goodbye.
    Serve,
    /// Refused with this code.
    Refuse(RefuseCode),
    /// Welcome, then a display stream with a tile of unknown encoding.
    Malformed,
}

/// What the fixture saw.
#[derive(Debug, Default)]
struct Observed {
    ack: Option<FrameAck>,
    key_a: bool,
    /// The code the client closed the connection with, if it did.
    client_close_code: Option<u64>,
}

struct Fixture {
    addr: SocketAddr,
    pin: String,
    observed: oneshot::Receiver<Observed>,
    _endpoint: quinn::Endpoint,
}

fn fixture(behavior: Behavior) -> Fixture {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let cert: CertificateDer<'static> = certified.cert.der().clone();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(certified.signing_key.serialize_der()));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], key)
        .unwrap();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).unwrap();
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(Arc::new(connect::transport_config()));
    let endpoint = quinn::Endpoint::server(config, "127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = endpoint.local_addr().unwrap();
    let (observed_tx, observed) = oneshot::channel();
    let server = endpoint.clone();
    tokio::spawn(async move {
        let observed = tokio::time::timeout(LIMIT, serve(server, behavior)).await.unwrap_or_default();
        let _ = observed_tx.send(observed);
    });
    Fixture { addr, pin: cert_sha256(&cert), observed, _endpoint: endpoint }
}

fn connection(fixture: &Fixture, pin: &str) -> Connection {
    Connection {
        version: 1,
        host: "127.0.0.1".into(),
        port: fixture.addr.port(),
        cert_sha256: pin.into(),
        ticket: "pt1.test-ticket".into(),
        desktop: "test".into(),
    }
}

/// The control stream's reading end in the fixture: messages queue up, pings and stats are
/// dropped (the fixture does not measure anything).
struct ControlReader {
    recv: quinn::RecvStream,
    decoder: StreamDecoder<ControlMessage>,
    queue: std::collections::VecDeque<ControlMessage>,
}

impl ControlReader {
    async fn next(&mut self) -> Option<ControlMessage> {
        loop {
            if let Some(message) = self.queue.pop_front() {
                return Some(message);
            }
            let chunk = self.recv.read_chunk(1 << 16, true).await.ok()??;
            let mut out = Vec::new();
            self.decoder.decode_all(&chunk.bytes, &mut out).ok()?;
            self.queue.extend(
                out.into_iter()
                    .filter(|m| !matches!(m, ControlMessage::Ping(_) | ControlMessage::ClientStats(_))),
            );
        }
    }
}

async fn serve(endpoint: quinn::Endpoint, behavior: Behavior) -> Observed {
    let mut observed = Observed::default();
    let Some(incoming) = endpoint.accept().await else { return observed };
    let Ok(conn) = incoming.await else { return observed };
    let Ok((mut send, recv)) = conn.accept_bi().await else { return observed };
    let mut control = ControlReader { recv, decoder: StreamDecoder::new(), queue: Default::default() };
    let Some(hello) = control.next().await else { return observed };
    let handshake = ServerHandshake::new("fixture", Capabilities::SUPPORTED);
    let check = |ticket: &str| match behavior {
        Behavior::Refuse(code) => Err(Refusal::new(code, "the ticket was used already")),
        _ => {
            assert_eq!(ticket, "pt1.test-ticket");
            Ok(TicketClaims {
                id: [1; 16],
                user: "alice".into(),
                desktop: "test".into(),
                host: "fixture".into(),
                issued_at: 0,
                expires_at: u64::MAX,
            })
        }
    };
    match handshake.on_first_message(&hello, 42, check) {
        ServerOutcome::Refuse { reply, .. } => {
            send.write_all(&wire::encode_to_vec(&reply).unwrap()).await.unwrap();
            let _ = send.finish();
            let _ = send.stopped().await;
            conn.close(error_code::REFUSED.into(), b"refused");
            return observed;
        }
        ServerOutcome::Accept { reply, .. } => {
            send.write_all(&wire::encode_to_vec(&reply).unwrap()).await.unwrap();
        }
    }
    let layout = ControlMessage::DisplayLayout(vec![Monitor { id: 0, x: 0, y: 0, width: 32, height: 16 }]);
    send.write_all(&wire::encode_to_vec(&layout).unwrap()).await.unwrap();

    let mut display = conn.open_uni().await.unwrap();
    display.write_all(&transport::stream_prelude(Channel::Display)).await.unwrap();
    let capture_us = monotonic_us();
    let begin =
        DisplayMessage::FrameBegin(FrameBegin { frame_id: 1, scanout: 0, width: 32, height: 16, capture_us });
    display.write_all(&wire::encode_to_vec(&begin).unwrap()).await.unwrap();

    if let Behavior::Malformed = behavior {
        // A tile with encoding 9: type 0x0202, body = rect + encoding + 4 bytes.
        let mut bytes = vec![0x02, 0x02];
        let mut body = Vec::new();
        for v in [0u32, 0, 4, 4] {
            body.extend_from_slice(&v.to_le_bytes());
        }
        body.push(9);
        body.extend_from_slice(&[1, 2, 3, 4]);
        bytes.extend_from_slice(&(body.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&body);
        display.write_all(&bytes).await.unwrap();
        let closed = conn.closed().await;
        if let quinn::ConnectionError::ApplicationClosed(close) = closed {
            observed.client_close_code = Some(close.error_code.into_inner());
        }
        return observed;
    }

    let zstd_pixels: Vec<u8> = (0..16 * 8).flat_map(|i| [i as u8, 0x80, 0x40, 0]).collect();
    let messages = [
        DisplayMessage::Tile(Tile {
            rect: Rect { x: 0, y: 0, width: 32, height: 16 },
            data: TileData::Solid(0x00c0_ffee),
        }),
        DisplayMessage::Tile(Tile {
            rect: Rect { x: 16, y: 8, width: 16, height: 8 },
            data: TileData::Zstd(zstd::bulk::compress(&zstd_pixels, 3).unwrap()),
        }),
        DisplayMessage::FrameEnd(FrameEnd { frame_id: 1 }),
    ];
    for message in &messages {
        display.write_all(&wire::encode_to_vec(message).unwrap()).await.unwrap();
    }

    // The client must ack the frame on the control stream.
    while observed.ack.is_none() {
        match control.next().await {
            Some(ControlMessage::FrameAck(ack)) => observed.ack = Some(ack),
            Some(_) => {}
            None => return observed,
        }
    }
    // And its input stream must carry key A (down and up).
    let Ok(mut input) = conn.accept_uni().await else { return observed };
    let mut prelude = [0u8; 1];
    input.read_exact(&mut prelude).await.unwrap();
    assert_eq!(prelude[0], Channel::Input.id());
    let mut input_decoder = StreamDecoder::<InputMessage>::new();
    let mut keys = Vec::new();
    while keys.len() < 2 {
        let Ok(Some(chunk)) = input.read_chunk(1024, true).await else { return observed };
        input_decoder.decode_all(&chunk.bytes, &mut keys).unwrap();
    }
    observed.key_a = keys[..2]
        == [
            InputMessage::Key(Key { code: 30, down: true }),
            InputMessage::Key(Key { code: 30, down: false }),
        ];

    let goodbye =
        ControlMessage::Goodbye(Goodbye { reason: GoodbyeReason::Shutdown, message: "test over".into() });
    send.write_all(&wire::encode_to_vec(&goodbye).unwrap()).await.unwrap();
    let _ = send.finish();
    // The client closes after a Goodbye; close anyway if it does not.
    let _ = tokio::time::timeout(Duration::from_secs(2), conn.closed()).await;
    conn.close(error_code::NO_ERROR.into(), b"goodbye");
    observed
}

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
    while goodbye.is_none() {
        let event =
            tokio::time::timeout(LIMIT, session.next_event()).await.expect("an event").expect("events");
        match event {
            SessionEvent::Frame(stats) => {
                frame = Some(stats);
                session.handle.send_key(30, true).await.unwrap();
                session.handle.send_key(30, false).await.unwrap();
            }
            SessionEvent::Layout(monitors) => layout = Some(monitors),
            SessionEvent::Goodbye(g) => goodbye = Some(g),
            SessionEvent::CursorShape { .. } => {}
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

    let fb = session.handle.snapshot(0).unwrap();
    assert_eq!(fb.pixel(0, 0), Some([0xee, 0xff, 0xc0, 0]));
    assert_eq!(fb.pixel(16, 8), Some([0, 0x80, 0x40, 0]));
    assert_eq!(fb.pixel(31, 15), Some([127, 0x80, 0x40, 0]));

    let observed = fixture.observed.await.unwrap();
    let ack = observed.ack.expect("the frame was acked");
    assert_eq!((ack.frame_id, ack.scanout), (1, 0));
    assert_eq!((ack.received_us, ack.decoded_us), (stats.received_us, stats.decoded_us));
    assert!(observed.key_a, "the key arrived on the input stream");
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
        script: script::parse("# test\ntype a\n").unwrap(),
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
