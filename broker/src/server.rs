//! Serving: HTTPS by default (rustls, ring only), plain HTTP only when asked; the background
//! maintenance loop.
//!
//! Without a configured certificate the broker makes a self-signed one once (kept in
//! `state_dir`) and logs its SHA-256 fingerprint, so that a fresh install is never plain text.
//!
//! HTTPS asks for a client certificate without requiring one ([`HostCertificates`]): hosts
//! present their identity, which registration pins; browsers on the same port present nothing.
//! Every request carries how its connection came ([`Transport`]) for the host API's checks.

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tower::ServiceExt as _;

use crate::broker::{Broker, Transport};
use crate::config::Config;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("TLS: {0}")]
    Tls(String),
}

/// The configured certificate and key files, or the self-signed pair (made once).
fn certificate_files(config: &Config) -> Result<(std::path::PathBuf, std::path::PathBuf), ServeError> {
    match (&config.tls_cert, &config.tls_key) {
        (Some(c), Some(k)) => Ok((c.clone(), k.clone())),
        _ => {
            let (c, k) = self_signed_files(config, Path::new("."));
            if !c.exists() || !k.exists() {
                generate_self_signed(&c, &k)?;
            }
            Ok((c, k))
        }
    }
}

/// Where the self-signed pair is, or is made: the state directory. A broker without a
/// configured `state_dir` whose pair is still in `legacy_dir` (the working directory, the
/// default state directory before it followed the SQLite database) keeps using that pair, so
/// that the hosts' pins of its certificate stay valid.
fn self_signed_files(config: &Config, legacy_dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let pair = |dir: &Path| (dir.join("broker-cert.pem"), dir.join("broker-key.pem"));
    let (cert, key) = pair(&config.state_dir());
    if config.state_dir.is_none() && !cert.exists() {
        let (old_cert, old_key) = pair(legacy_dir);
        if old_cert.exists() && old_key.exists() {
            tracing::warn!(
                "using the TLS certificate in {} (no state_dir configured): set state_dir, or move it to {}",
                legacy_dir.display(),
                config.state_dir().display()
            );
            return (old_cert, old_key);
        }
    }
    (cert, key)
}

fn load_certificates(cert_path: &std::path::Path) -> Result<Vec<CertificateDer<'static>>, ServeError> {
    CertificateDer::pem_file_iter(cert_path)
        .map_err(|e| ServeError::Tls(format!("{}: {e}", cert_path.display())))?
        .collect::<Result<_, _>>()
        .map_err(|e| ServeError::Tls(e.to_string()))
}

/// SHA-256 of the broker's HTTPS certificate (what hosts pin: `pleiades-host serve
/// --broker-cert-sha256`); `None` before the self-signed one is made (at the first `serve`).
pub fn certificate_sha256(config: &Config) -> Option<String> {
    let cert_path = config.tls_cert.clone().unwrap_or_else(|| self_signed_files(config, Path::new(".")).0);
    let certs = load_certificates(&cert_path).ok()?;
    certs.first().map(|c| pleiades_protocol::pinning::cert_sha256(c))
}

/// Loads the configured certificate, or makes (once) and loads a self-signed one.
pub fn tls_config(config: &Config) -> Result<rustls::ServerConfig, ServeError> {
    let (cert_path, key_path) = certificate_files(config)?;
    let certs = load_certificates(&cert_path)?;
    let key = PrivateKeyDer::from_pem_file(&key_path)
        .map_err(|e| ServeError::Tls(format!("{}: {e}", key_path.display())))?;
    if let Some(first) = certs.first() {
        let fp = pleiades_protocol::pinning::cert_sha256(first);
        tracing::info!(cert = %cert_path.display(), sha256 = %fp, "TLS certificate");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let client_certificates = Arc::new(HostCertificates::new(&provider));
    rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ServeError::Tls(e.to_string()))?
        .with_client_cert_verifier(client_certificates)
        .with_single_cert(certs, key)
        .map_err(|e| ServeError::Tls(e.to_string()))
}

/// Client certificates as the host API wants them: asked for, never required (browsers share
/// the port), any self-signed end-entity certificate accepted (a host's is pinned by its
/// SHA-256 at registration, not by a CA), but the handshake's signature always verified with
/// ring's algorithms: a peer that presents a certificate has proved it holds its key.
///
/// The request names one acceptable issuer, `CN=pleiades-host identity` (the name of every
/// host's self-signed identity): a browser then offers none of its user's own certificates and
/// asks its user nothing.
#[derive(Debug)]
pub struct HostCertificates {
    algorithms: rustls::crypto::WebPkiSupportedAlgorithms,
    hints: Vec<rustls::DistinguishedName>,
}

impl HostCertificates {
    pub fn new(provider: &rustls::crypto::CryptoProvider) -> Self {
        Self {
            algorithms: provider.signature_verification_algorithms,
            hints: vec![rustls::DistinguishedName::in_sequence(
                &pleiades_protocol::hostapi::host_identity_rdns_der(),
            )],
        }
    }
}

impl rustls::server::danger::ClientCertVerifier for HostCertificates {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        &self.hints
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        // Who the certificate belongs to is the pin's business (broker/src/broker/hosts.rs);
        // that the peer holds its key is checked by the signature methods below, which parse
        // it (a malformed certificate fails there).
        Ok(rustls::server::danger::ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

fn generate_self_signed(cert: &Path, key: &Path) -> Result<(), ServeError> {
    let mut names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
    if let Ok(h) = std::fs::read_to_string("/etc/hostname")
        && !h.trim().is_empty()
    {
        names.push(h.trim().to_owned());
    }
    let made = rcgen::generate_simple_self_signed(names).map_err(|e| ServeError::Tls(e.to_string()))?;
    if let Some(dir) = cert.parent() {
        crate::private::create_private_dir(dir)?;
    }
    std::fs::write(cert, made.cert.pem())?;
    crate::private::write_private(key, made.signing_key.serialize_pem().as_bytes())?;
    tracing::info!(cert = %cert.display(), "generated a self-signed TLS certificate");
    Ok(())
}

/// Connections served at once; more wait in the kernel's backlog, then are closed.
pub const MAX_CONNECTIONS: usize = 1024;
/// How long a client may take for its TLS handshake, and for each request's headers
/// (including the wait for the next request on a kept-alive connection).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one request may take, its body included.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves the router on `listener` until `shutdown` resolves. `tls: None` is plain HTTP.
///
/// Slow clients hold nothing for long (docs/broker.md, "Limits"): the TLS handshake and every
/// request's headers must come within [`HEADER_TIMEOUT`], a request must be done within
/// [`REQUEST_TIMEOUT`], and at most [`MAX_CONNECTIONS`] are served at once.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    tls: Option<rustls::ServerConfig>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let acceptor = tls.map(|mut tls| {
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        tokio_rustls::TlsAcceptor::from(Arc::new(tls))
    });
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    tokio::pin!(shutdown);
    loop {
        let (tcp, addr) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => { tracing::warn!("accept: {e}"); continue; }
            },
            () = &mut shutdown => return Ok(()),
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(peer = %addr, "{MAX_CONNECTIONS} connections already: closing a new one");
            continue;
        };
        let acceptor = acceptor.clone();
        let router = router.clone();
        tokio::spawn(async move {
            let _slot = slot;
            match acceptor {
                Some(acceptor) => match tokio::time::timeout(HEADER_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let client_cert_sha256 = stream
                            .get_ref()
                            .1
                            .peer_certificates()
                            .and_then(|chain| chain.first())
                            .map(|cert| pleiades_protocol::pinning::cert_sha256(cert));
                        let transport = Transport::Https { client_cert_sha256 };
                        serve_connection(stream, addr, transport, router).await
                    }
                    Ok(Err(e)) => tracing::debug!(peer = %addr, "TLS handshake failed: {e}"),
                    Err(_) => tracing::debug!(peer = %addr, "no TLS handshake in time"),
                },
                None => serve_connection(tcp, addr, Transport::PlainHttp, router).await,
            }
        });
    }
}

/// HTTP/1.1 on one connection (the portal and the APIs need nothing more, and h2 costs build
/// time), with the header and request time limits.
async fn serve_connection<S>(stream: S, addr: SocketAddr, transport: Transport, router: Router)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
        req.extensions_mut().insert(ConnectInfo(addr));
        req.extensions_mut().insert(transport.clone());
        let router = router.clone();
        async move {
            match tokio::time::timeout(REQUEST_TIMEOUT, router.oneshot(req)).await {
                Ok(response) => response,
                Err(_) => Ok(axum::response::IntoResponse::into_response((
                    axum::http::StatusCode::REQUEST_TIMEOUT,
                    "the request took too long\n",
                ))),
            }
        }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service)
        .await;
}

/// Runs [`Broker::maintain`] every heartbeat interval, forever.
pub async fn maintenance_loop(broker: Arc<Broker>) {
    let every = Duration::from_secs(broker.settings.heartbeat_interval_secs.max(1));
    loop {
        tokio::time::sleep(every).await;
        if let Err(e) = broker.maintain().await {
            tracing::warn!("maintenance: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_self_signed_pair_follows_the_state_directory_but_an_old_one_in_the_working_directory_stays() {
        let dir = tempfile::tempdir().unwrap();
        let (old, data) = (dir.path().join("old-cwd"), dir.path().join("data"));
        std::fs::create_dir_all(&data).unwrap();
        let config =
            Config { database: format!("sqlite://{}/broker.db", data.display()), ..Config::default() };
        assert_eq!(config.state_dir(), data, "the default state directory is the database's");
        let fresh = self_signed_files(&config, &old);
        assert_eq!(fresh, (data.join("broker-cert.pem"), data.join("broker-key.pem")));
        // A pair made before, in the working directory of a broker without state_dir: kept.
        generate_self_signed(&old.join("broker-cert.pem"), &old.join("broker-key.pem")).unwrap();
        assert_eq!(self_signed_files(&config, &old).0, old.join("broker-cert.pem"));
        // Not when state_dir is configured, nor once the state directory has its own pair.
        let configured = Config { state_dir: Some(data.clone()), ..config.clone() };
        assert_eq!(self_signed_files(&configured, &old).0, data.join("broker-cert.pem"));
        generate_self_signed(&fresh.0, &fresh.1).unwrap();
        assert_eq!(self_signed_files(&config, &old), fresh);
    }
}
