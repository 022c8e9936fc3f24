//! A small real quinn session server for the client's tests: a test fixture, not a product
//! (the host's session server in host/ is the real one). It speaks just enough of the
//! protocol: the handshake via `ServerHandshake`, one display stream, the control stream's
//! acks, the input stream.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use pleiades_client::clock::monotonic_us;
use pleiades_client::connect::{self, cert_sha256};
use pleiades_protocol::connfile::Connection;
use pleiades_protocol::handshake::{Capabilities, Refusal, ServerHandshake, ServerOutcome};
use pleiades_protocol::ticket::TicketClaims;
use pleiades_protocol::transport::{self, ALPN, error_code};
use pleiades_protocol::wire::{
    self, Channel, ControlMessage, CursorMessage, CursorPosition, CursorShape, Datagram, DisplayMessage,
    FrameAck, FrameBegin, FrameEnd, Goodbye, GoodbyeReason, InputMessage, Key, Monitor, MonitorSize, Ping,
    Rect, RefuseCode, StreamDecoder, Tile, TileData,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::sync::oneshot;

/// Bounds every wait of the fixture so that a broken client fails the test instead of hanging.
pub const LIMIT: Duration = Duration::from_secs(20);

/// What the fixture does after the `Hello`.
#[derive(Debug, Clone, Copy)]
pub enum Behavior {
    /// Welcome, a layout, one frame of tiles; wait for its ack and an `a` key; Goodbye.
    Serve,
    /// Refused with this code.
    Refuse(RefuseCode),
    /// Welcome, then a display stream with a tile of unknown encoding.
    Malformed,
    /// Reads the `Hello` and never answers.
    Silent,
}

/// What the fixture saw.
#[derive(Debug, Default)]
pub struct Observed {
    pub ack: Option<FrameAck>,
    /// What the client's `Hello` offered.
    pub offered: Option<Capabilities>,
    /// The client answered the fixture's `Ping{nonce: 99}`.
    pub pong: bool,
    pub key_a: bool,
    /// Every input message, in order, up to key A's release.
    pub inputs: Vec<InputMessage>,
    /// The client's `RequestLayout`.
    pub layout_request: Option<Vec<MonitorSize>>,
    /// The code the client closed the connection with, if it did.
    pub client_close_code: Option<u64>,
}

pub struct Fixture {
    pub addr: SocketAddr,
    pub pin: String,
    pub observed: oneshot::Receiver<Observed>,
    _endpoint: quinn::Endpoint,
}

pub fn fixture(behavior: Behavior) -> Fixture {
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

pub fn connection(fixture: &Fixture, pin: &str) -> Connection {
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
    if let ControlMessage::Hello(h) = &hello {
        observed.offered = Some(h.capabilities);
    }
    if let Behavior::Silent = behavior {
        let _ = tokio::time::timeout(LIMIT, conn.closed()).await;
        return observed;
    }
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
    let ping = ControlMessage::Ping(Ping { nonce: 99, sent_us: 1 });
    send.write_all(&wire::encode_to_vec(&ping).unwrap()).await.unwrap();

    if let Behavior::Serve = behavior {
        // A cursor shape on the cursor stream and a position as a datagram, as a host sends them.
        let mut cursor = conn.open_uni().await.unwrap();
        cursor.write_all(&transport::stream_prelude(Channel::Cursor)).await.unwrap();
        let shape = CursorMessage::Shape(CursorShape {
            serial: 7,
            width: 2,
            height: 2,
            hot_x: 1,
            hot_y: 0,
            bgra: vec![0xff; 16],
        });
        cursor.write_all(&wire::encode_to_vec(&shape).unwrap()).await.unwrap();
        let position = CursorPosition { seq: 3, scanout: 0, x: 10, y: 11, visible: true };
        conn.send_datagram(wire::encode_datagram(&Datagram::CursorPosition(position)).into()).unwrap();
        let older = CursorPosition { seq: 2, scanout: 0, x: 1, y: 1, visible: true };
        conn.send_datagram(wire::encode_datagram(&Datagram::CursorPosition(older)).into()).unwrap();
    }
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
    while observed.ack.is_none() || !observed.pong {
        match control.next().await {
            Some(ControlMessage::FrameAck(ack)) => observed.ack = Some(ack),
            Some(ControlMessage::Pong(pong)) => observed.pong = pong.nonce == 99 && pong.sent_us == 1,
            Some(ControlMessage::RequestLayout(sizes)) => observed.layout_request = Some(sizes),
            Some(_) => {}
            None => return observed,
        }
    }
    // Its input stream carries whatever the test sent, ending with key A down and up.
    let Ok(mut input) = conn.accept_uni().await else { return observed };
    let mut prelude = [0u8; 1];
    input.read_exact(&mut prelude).await.unwrap();
    assert_eq!(prelude[0], Channel::Input.id());
    let mut input_decoder = StreamDecoder::<InputMessage>::new();
    let key_a_up = InputMessage::Key(Key { code: 30, down: false });
    while !observed.inputs.contains(&key_a_up) {
        let Ok(Some(chunk)) = input.read_chunk(1024, true).await else { return observed };
        input_decoder.decode_all(&chunk.bytes, &mut observed.inputs).unwrap();
    }
    observed.key_a = observed.inputs.ends_with(&[InputMessage::Key(Key { code: 30, down: true }), key_a_up]);
    // Both tests also ask for a layout (on the control stream, so in no fixed order with input).
    while observed.layout_request.is_none() {
        match control.next().await {
            Some(ControlMessage::RequestLayout(sizes)) => observed.layout_request = Some(sizes),
            Some(_) => {}
            None => return observed,
        }
    }

    let goodbye =
        ControlMessage::Goodbye(Goodbye { reason: GoodbyeReason::Shutdown, message: "test over".into() });
    send.write_all(&wire::encode_to_vec(&goodbye).unwrap()).await.unwrap();
    let _ = send.finish();
    // The client closes after a Goodbye; close anyway if it does not.
    let _ = tokio::time::timeout(Duration::from_secs(2), conn.closed()).await;
    conn.close(error_code::NO_ERROR.into(), b"goodbye");
    observed
}
