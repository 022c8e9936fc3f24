//! Reaching a session server: the connection file or URI, QUIC, and certificate pinning.
//!
//! Trust is the pin, nothing else (docs/protocol.md §1): the server's certificate is accepted
//! exactly when the SHA-256 of its DER encoding equals the `cert_sha256` the broker put in the
//! connection file. No CA, no hostname, no expiry check: hosts use self-generated certificates
//! and the broker vouches for them through the pin. The TLS 1.3 handshake signature is still
//! verified (ring's algorithms), so only the holder of the pinned certificate's key gets in.
//! An empty pin refuses to connect rather than trusting the first certificate seen.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use pleiades_protocol::connfile::Connection;
use pleiades_protocol::transport::{ALPN, IDLE_TIMEOUT_US};
use rustls::pki_types::ServerName;

use crate::error::ClientError;

/// How long connecting (QUIC + TLS) may take before the server counts as unreachable.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Reads a connection: a `pleiades://` URI, or a `.pleiades` file's path or `file://` URL (what
/// desktop environments pass through the .desktop file's `%u`).
pub fn load(target: &str) -> Result<Connection, ClientError> {
    if target.starts_with(pleiades_protocol::connfile::URI_SCHEME) {
        return Ok(Connection::from_uri(target)?);
    }
    if let Some(path) = target.strip_prefix("file://") {
        // `file:///home/…` (an empty host) or `file://localhost/home/…`, percent-encoded.
        let path = path.strip_prefix("localhost").unwrap_or(path);
        return load(&percent_decode(path));
    }
    let read_error = |error| ClientError::ReadFile { path: target.to_owned(), error };
    let file = std::fs::File::open(target).map_err(read_error)?;
    let mut text = String::new();
    // One byte over the format's limit is enough to let the parser say "too long".
    let limit = pleiades_protocol::connfile::MAX_LEN as u64 + 1;
    std::io::Read::read_to_string(&mut std::io::Read::take(file, limit), &mut text).map_err(read_error)?;
    Ok(Connection::from_toml(&text)?)
}

pub use pleiades_protocol::pinning::{PinnedCertVerifier, cert_sha256};

/// `%XX` escapes decoded (invalid ones kept as they are); bytes that are not UTF-8 are replaced.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
        match (bytes[i], hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The QUIC transport settings of a session: the protocol's idle timeout, datagrams on, and
/// receive windows large enough for raw frames on a fast path.
pub fn transport_config() -> quinn::TransportConfig {
    let mut transport = quinn::TransportConfig::default();
    let idle = Duration::from_micros(IDLE_TIMEOUT_US);
    if let Ok(idle) = quinn::IdleTimeout::try_from(idle) {
        transport.max_idle_timeout(Some(idle));
    }
    transport.datagram_receive_buffer_size(Some(1 << 20));
    transport.stream_receive_window(quinn::VarInt::from_u32(16 << 20));
    transport.receive_window(quinn::VarInt::from_u32(64 << 20));
    transport
}

/// A connected QUIC connection and the endpoint that owns its socket (keep both alive).
#[derive(Debug)]
pub struct Connected {
    pub endpoint: quinn::Endpoint,
    pub connection: quinn::Connection,
}

/// Connects to the connection's server with its certificate pinned. Errors say what happened:
/// no pin, wrong certificate, unreachable (within [`CONNECT_TIMEOUT`]).
pub async fn connect(conn: &Connection) -> Result<Connected, ClientError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier =
        Arc::new(PinnedCertVerifier::new(&conn.cert_sha256, provider.clone()).ok_or(ClientError::NoPin)?);
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| ClientError::Setup(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier.clone())
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| ClientError::Setup(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    config.transport_config(Arc::new(transport_config()));

    let addr = resolve(&conn.host, conn.port).await?;
    let bind: SocketAddr =
        if addr.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { (std::net::Ipv6Addr::UNSPECIFIED, 0).into() };
    let endpoint = quinn::Endpoint::client(bind)
        .map_err(|e| ClientError::Setup(format!("cannot open a UDP socket: {e}")))?;
    // The name only feeds SNI: the pin is the trust. An IP literal is a valid server name.
    let server_name =
        if ServerName::try_from(conn.host.as_str()).is_ok() { conn.host.as_str() } else { "pleiades" };
    let unreachable = |detail: String| ClientError::Unreachable { addr: addr.to_string(), detail };
    let connecting =
        endpoint.connect_with(config, addr, server_name).map_err(|e| unreachable(e.to_string()))?;
    let connection = match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
        Err(_) => {
            return Err(unreachable(format!("no QUIC handshake within {} s", CONNECT_TIMEOUT.as_secs())));
        }
        Ok(Err(error)) => {
            if let Some(got) = verifier.mismatch() {
                return Err(ClientError::WrongCertificate {
                    got,
                    expected: conn.cert_sha256.to_ascii_lowercase(),
                });
            }
            return Err(unreachable(error.to_string()));
        }
        Ok(Ok(connection)) => connection,
    };
    tracing::info!(%addr, rtt_us = connection.rtt().as_micros() as u64, "connected");
    Ok(Connected { endpoint, connection })
}

async fn resolve(host: &str, port: u16) -> Result<SocketAddr, ClientError> {
    let resolve_error = |error: String| ClientError::Resolve { host: host.to_owned(), port, error };
    let lookup = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::lookup_host((host, port)))
        .await
        .map_err(|_| resolve_error("timed out".into()))?
        .map_err(|e| resolve_error(e.to_string()))?;
    let mut addrs: Vec<SocketAddr> = lookup.collect();
    // Prefer IPv4 where both exist: test servers bind 0.0.0.0 or 127.0.0.1.
    addrs.sort_by_key(|a| !a.is_ipv4());
    addrs.into_iter().next().ok_or_else(|| resolve_error("no addresses".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_files_load_from_paths_and_file_urls() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("my desk.pleiades");
        let connection = Connection {
            version: 1,
            host: "10.0.0.5".into(),
            port: 4433,
            cert_sha256: "ab".repeat(32),
            ticket: "pt1.x".into(),
            desktop: "desk".into(),
            usb_auto: String::new(),
        };
        std::fs::write(&path, connection.to_toml()).unwrap();
        let url = format!("file://{}", path.display()).replace(' ', "%20");
        assert_eq!(load(&url).unwrap(), connection);
        assert_eq!(load(&format!("file://localhost{}", path.display())).unwrap(), connection);
        assert_eq!(load(path.to_str().unwrap()).unwrap(), connection);
        assert_eq!(percent_decode("a%2Fb%zz%4"), "a/b%zz%4");
    }
}
