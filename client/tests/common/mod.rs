//! What the client's tests run against.
//!
//! - [`Desktop`]: the real session server (`pleiades_host::session`) on a synthetic desktop
//!   (`pleiades_host::synthetic`, as `pleiades-host run --synthetic`): the host's handshake,
//!   control pump, encoder and input path, without a VM.
//! - [`fixture`]: a thin quinn server for what a real server never does (a malformed display
//!   stream, a message only a client may send, silence) or a synthetic desktop has not (a
//!   cursor). Its control channel is the protocol's own `ServerControl`, pumped here.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use pleiades_client::clock::monotonic_us;
use pleiades_client::connect::{self, cert_sha256};
use pleiades_control::Controller;
use pleiades_protocol::connfile::Connection;
use pleiades_protocol::control::{ControlConfig, ServerControl, ServerEvent};
use pleiades_protocol::handshake::{Capabilities, ServerHandshake, ServerOutcome};
use pleiades_protocol::ticket::TicketClaims;
use pleiades_protocol::transport::{self, ALPN, error_code};
use pleiades_protocol::wire::{
    self, Channel, ControlMessage, CursorMessage, CursorPosition, CursorShape, Datagram, DisplayMessage,
    FrameBegin, GoodbyeReason, Monitor, MonitorSize, StreamDecoder,
};
use pleiades_session::synthetic::{SyntheticVm, Workload};
use pleiades_session::{LocalTickets, SessionConfig, SessionServer};
use pleiades_virtio::gpu::Framebuffer;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::sync::oneshot;

/// Bounds every wait so that a broken client fails the test instead of hanging.
pub const LIMIT: Duration = Duration::from_secs(20);

/// The runtime a test's client runs on (the session server has its own).
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

/// A synthetic desktop served by the host's real session server on loopback.
pub struct Desktop {
    pub controller: Arc<dyn Controller>,
    pub server: SessionServer,
    tickets: LocalTickets,
    _vm: SyntheticVm,
}

const HOST: &str = "127.0.0.1";

impl Desktop {
    pub fn start(workload: Workload, width: u32, height: u32) -> Self {
        let vm = SyntheticVm::start(workload, width, height).unwrap();
        let controller = vm.controller();
        let tickets = LocalTickets::new(HOST, "synthetic").unwrap();
        let config = SessionConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            desktop: "synthetic".into(),
            host: HOST.into(),
            ticket_key: tickets.public_key(),
            generation: None,
            identity_dir: None,
            relative_pointer: false,
            encoder_cpu_budget_percent: 0,
        };
        let server = SessionServer::start(&config, controller.clone()).unwrap();
        Self { controller, server, tickets, _vm: vm }
    }

    /// A connection with a fresh one-time ticket.
    pub fn connection(&self) -> Connection {
        self.server.connection(HOST, self.tickets.mint().unwrap())
    }

    /// The painter stops; the server goes on serving what the screen shows.
    pub fn stop_painting(&self) {
        self.controller.shutdown().unwrap();
    }

    /// What the desktop shows now.
    pub fn screen(&self) -> Framebuffer {
        self.controller.display().unwrap().sink().screenshot(0).unwrap()
    }

    /// Input events that reached the desktop's devices.
    pub fn input_events(&self) -> u64 {
        self.controller.status()["input_events"].as_u64().unwrap()
    }

    /// The session server's part of `ctl status`.
    pub fn session_status(&self) -> serde_json::Value {
        self.server.status()
    }
}

impl Drop for Desktop {
    fn drop(&mut self) {
        let _ = self.controller.shutdown();
    }
}

/// Whether the client's picture is the host's, pixel for pixel (the X byte aside).
pub fn same_pixels(client: &pleiades_client::display::Framebuffer, host: &Framebuffer) -> bool {
    (client.width, client.height) == (host.width, host.height)
        && client.pixels.chunks_exact(4).zip(host.pixels.chunks_exact(4)).all(|(a, b)| a[..3] == b[..3])
}

/// What the fixture does after the `Hello`.
#[derive(Debug, Clone, Copy)]
pub enum Behavior {
    /// Welcome, a layout, a cursor shape and two positions; follows the client's layout request;
    /// waits for an answer to its ping; then Goodbye.
    Cursor,
    /// Welcome, then a display stream with a tile of unknown encoding.
    Malformed,
    /// Welcome, then a `ClientStats` on the control stream: a message only a client may send.
    WrongDirection,
    /// Reads the `Hello` and never answers.
    Silent,
}

/// What the fixture saw.
#[derive(Debug, Default)]
pub struct Observed {
    /// What the client's `Hello` offered.
    pub offered: Option<Capabilities>,
    /// The layout the client asked for.
    pub layout_request: Option<Vec<MonitorSize>>,
    /// The fixture measured an RTT from the client's answer to its ping.
    pub rtt_us: Option<u64>,
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
        usb_auto: String::new(),
    }
}

/// The fixture's control channel: `ServerControl` over the quinn stream, pumped one event at
/// a time.
struct Control {
    control: ServerControl,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
}

impl Control {
    async fn flush(&mut self) {
        let mut bytes = Vec::new();
        while let Some(message) = self.control.poll_transmit() {
            wire::encode(&message, &mut bytes).unwrap();
        }
        if !bytes.is_empty() {
            let _ = self.send.write_all(&bytes).await;
        }
    }

    /// The next event; `None` once the client's stream or connection is gone.
    async fn next_event(&mut self) -> Option<ServerEvent> {
        loop {
            self.flush().await;
            if let Some(event) = self.control.poll_event() {
                return Some(event);
            }
            let wait = self
                .control
                .poll_timeout()
                .map_or(LIMIT, |at| Duration::from_micros(at.saturating_sub(monotonic_us())));
            tokio::select! {
                chunk = self.recv.read_chunk(1 << 16, true) => match chunk {
                    Ok(Some(chunk)) => self.control.handle_stream_data(&chunk.bytes, monotonic_us()),
                    Ok(None) => self.control.handle_stream_end(monotonic_us()),
                    Err(_) => return None,
                },
                () = tokio::time::sleep(wait) => self.control.handle_timeout(monotonic_us()),
            }
        }
    }
}

async fn serve(endpoint: quinn::Endpoint, behavior: Behavior) -> Observed {
    let mut observed = Observed::default();
    let Some(incoming) = endpoint.accept().await else { return observed };
    let Ok(conn) = incoming.await else { return observed };
    let Ok((mut send, mut recv)) = conn.accept_bi().await else { return observed };
    let mut decoder = StreamDecoder::<ControlMessage>::new();
    let hello = loop {
        let Ok(Some(chunk)) = recv.read_chunk(1 << 16, true).await else { return observed };
        let mut input: &[u8] = &chunk.bytes;
        if let Some(message) = decoder.decode(&mut input).unwrap() {
            break message;
        }
    };
    if let ControlMessage::Hello(h) = &hello {
        observed.offered = Some(h.capabilities);
    }
    if let Behavior::Silent = behavior {
        let _ = tokio::time::timeout(LIMIT, conn.closed()).await;
        return observed;
    }
    let handshake = ServerHandshake::new("fixture", Capabilities::SUPPORTED);
    let check = |ticket: &str| {
        assert_eq!(ticket, "pt1.test-ticket");
        Ok(TicketClaims {
            id: [1; 16],
            user: "alice".into(),
            desktop: "test".into(),
            host: "fixture".into(),
            issued_at: 0,
            expires_at: u64::MAX,
            generation: None,
        })
    };
    let ServerOutcome::Accept { reply, session, .. } = handshake.on_first_message(&hello, 42, check) else {
        panic!("the fixture accepts its ticket");
    };
    send.write_all(&wire::encode_to_vec(&reply).unwrap()).await.unwrap();
    let mut control = Control {
        control: ServerControl::new(&session, ControlConfig::default(), monotonic_us()),
        send,
        recv,
    };
    let layout = vec![Monitor { id: 0, x: 0, y: 0, width: 32, height: 16 }];
    control.control.announce_layout(layout).unwrap();
    control.flush().await;

    match behavior {
        Behavior::Cursor => {
            // A cursor shape on the cursor stream and positions as datagrams, as a host sends them.
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
            // Follows the client's layout, and wants an answer to its ping.
            while observed.layout_request.is_none() || observed.rtt_us.is_none() {
                match control.next_event().await {
                    Some(ServerEvent::LayoutWanted(sizes)) => {
                        let mut x = 0;
                        let monitors = sizes
                            .iter()
                            .enumerate()
                            .map(|(id, s)| {
                                let m = Monitor { id: id as u32, x, y: 0, width: s.width, height: s.height };
                                x += s.width as i32;
                                m
                            })
                            .collect();
                        control.control.announce_layout(monitors).unwrap();
                        observed.layout_request = Some(sizes);
                    }
                    Some(ServerEvent::Rtt(sample)) => observed.rtt_us = Some(sample.smoothed_us),
                    Some(ServerEvent::Closed(reason)) => panic!("the client ended the channel: {reason}"),
                    Some(_) => {}
                    None => return observed,
                }
            }
            control.control.close(GoodbyeReason::Shutdown, "test over", monotonic_us());
            control.flush().await;
            // The client closes after a Goodbye; the linger ends the wait if it does not.
            let _ = tokio::time::timeout(Duration::from_secs(2), conn.closed()).await;
            conn.close(error_code::NO_ERROR.into(), b"goodbye");
        }
        Behavior::WrongDirection => {
            let stats = ControlMessage::ClientStats(wire::ClientStats::default());
            control.send.write_all(&wire::encode_to_vec(&stats).unwrap()).await.unwrap();
            observed.client_close_code = close_code(&conn).await;
        }
        Behavior::Malformed => {
            let mut display = conn.open_uni().await.unwrap();
            display.write_all(&transport::stream_prelude(Channel::Display)).await.unwrap();
            let begin = DisplayMessage::FrameBegin(FrameBegin {
                frame_id: 1,
                scanout: 0,
                width: 32,
                height: 16,
                capture_us: monotonic_us(),
            });
            display.write_all(&wire::encode_to_vec(&begin).unwrap()).await.unwrap();
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
            observed.client_close_code = close_code(&conn).await;
        }
        Behavior::Silent => unreachable!(),
    }
    observed
}

async fn close_code(conn: &quinn::Connection) -> Option<u64> {
    match conn.closed().await {
        quinn::ConnectionError::ApplicationClosed(close) => Some(close.error_code.into_inner()),
        _ => None,
    }
}
