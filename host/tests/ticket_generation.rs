//! A VM process started for one generation of a desktop (`pleiades-host run
//! --ticket-generation N`, as the host daemon starts it for the broker's start, restart or
//! recycle command) takes only tickets for that generation. Security review: the replay cache
//! lives in the VM process, so a ticket issued for the desktop before its recycle (one user's,
//! valid for up to 10 minutes) opened the recycled desktop's new process (the next user's).
//!
//! The real binary on a synthetic desktop (no guest needed), a QUIC client with the pinned
//! certificate saying `Hello` with each ticket.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pleiades_protocol::handshake::{Capabilities, ClientHandshake, HandshakeError};
use pleiades_protocol::ticket::{TicketClaims, TicketSigner};
use pleiades_protocol::transport::ALPN;
use pleiades_protocol::wire::{self, ControlMessage, RefuseCode, StreamDecoder};

const HOST_ID: &str = "h-1";
const DESKTOP: &str = "d-1";

struct Vm(Child);

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `pleiades-host run --synthetic` serving `DESKTOP` for the broker's key and `generation`, on
/// loopback; returns when its control socket answers.
fn start_vm(dir: &Path, key: &str, generation: u64, port: u16) -> Vm {
    let control = dir.join("vm.sock");
    let log = std::fs::File::create(dir.join("vm.log")).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_pleiades-host"))
        .args(["run", "--synthetic", "idle", "--synthetic-size", "64x48"])
        .arg(format!("--listen=127.0.0.1:{port}"))
        .arg("--advertise=127.0.0.1")
        .arg(format!("--desktop={DESKTOP}"))
        .arg(format!("--ticket-key={key}"))
        .arg(format!("--ticket-host={HOST_ID}"))
        .arg(format!("--ticket-generation={generation}"))
        .arg(format!("--tls-identity={}", dir.join("tls").display()))
        .arg(format!("--control={}", control.display()))
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("pleiades-host runs");
    let mut vm = Vm(child);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = vm.0.try_wait().unwrap() {
            panic!(
                "the VM process ended ({status}): {}",
                std::fs::read_to_string(dir.join("vm.log")).unwrap()
            );
        }
        let request = pleiades_control::Request::Status;
        if control.exists()
            && pleiades_control::request(&control, &request, Duration::from_secs(2)).is_ok_and(|r| r.ok)
        {
            return vm;
        }
        assert!(Instant::now() < deadline, "the VM process did not come up");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Connects (pinning `cert_sha256`), says `Hello` with `ticket`: the server's verdict.
async fn hello(port: u16, cert_sha256: &str, ticket: &str) -> Result<(), HandshakeError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier =
        pleiades_protocol::pinning::PinnedCertVerifier::new(cert_sha256, provider.clone()).unwrap();
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let endpoint = quinn::Endpoint::client(([127, 0, 0, 1], 0).into()).unwrap();
    let connection = endpoint
        .connect_with(quinn::ClientConfig::new(Arc::new(quic)), ([127, 0, 0, 1], port).into(), "localhost")
        .unwrap()
        .await
        .expect("QUIC handshake");
    let mut handshake = ClientHandshake::new(ticket, "ticket-generation test", Capabilities::empty());
    let (mut send, mut recv) = connection.open_bi().await.unwrap();
    send.write_all(&wire::encode_to_vec(&handshake.hello()).unwrap()).await.unwrap();
    let mut decoder = StreamDecoder::<ControlMessage>::new();
    let answer = loop {
        let chunk = recv.read_chunk(64 * 1024, true).await.unwrap().expect("an answer to Hello");
        if let Some(message) = decoder.decode(&mut &chunk.bytes[..]).unwrap() {
            break message;
        }
    };
    let verdict = handshake.on_message(&answer).map(|_| ());
    connection.close(0u32.into(), b"done");
    endpoint.wait_idle().await;
    verdict
}

#[test]
fn a_vm_process_takes_only_tickets_for_its_generation() {
    let dir = tempfile::tempdir().unwrap();
    let pkcs8 = TicketSigner::generate_pkcs8().unwrap();
    let broker = TicketSigner::from_pkcs8(&pkcs8).unwrap();
    let names = ["127.0.0.1".to_owned(), "localhost".to_owned()];
    let identity = pleiades_session::tls::Identity::load_or_create(&dir.path().join("tls"), &names).unwrap();
    let port = std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    // The desktop was started (generation 1) and recycled: this process is generation 2.
    let _vm = start_vm(dir.path(), &broker.public_key().to_base64(), 2, port);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let ticket = |user: &str, generation: Option<u64>| {
        let claims = TicketClaims::new(user, DESKTOP, HOST_ID, now, 600).unwrap();
        broker
            .issue(&match generation {
                Some(g) => claims.for_generation(g),
                None => claims,
            })
            .unwrap()
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let fingerprint = identity.fingerprint();
    let verdict = |ticket: String| runtime.block_on(hello(port, &fingerprint, &ticket));
    let refused = |result: Result<(), HandshakeError>| match result {
        Err(HandshakeError::Refused { code, .. }) => code,
        other => panic!("expected a refusal, got {other:?}"),
    };
    // Alice's ticket from generation 1, still valid: refused, as is a ticket naming no
    // generation.
    assert_eq!(refused(verdict(ticket("alice", Some(1)))), RefuseCode::ExpiredTicket);
    assert_eq!(refused(verdict(ticket("alice", None))), RefuseCode::ExpiredTicket);
    assert_eq!(refused(verdict(ticket("alice", Some(3)))), RefuseCode::ExpiredTicket);
    // Bob's ticket for this generation opens the desktop.
    verdict(ticket("bob", Some(2))).expect("the current generation's ticket is accepted");
}
