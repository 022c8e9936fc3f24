//! The host daemon's side of the host API (docs/broker.md, "Hosts"): HTTPS to the broker, with
//! the broker's certificate pinned by its SHA-256 or checked against a given CA, and the host's
//! own identity ([`HostIdentity`]) presented as the TLS client certificate of every request:
//! the broker pins it at registration, so the credential alone is not enough.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use pleiades_protocol::hostapi::{CommandAck, Heartbeat, HeartbeatReply, HostRegistered, HostRegistration};
use pleiades_protocol::pinning::PinnedCertVerifier;
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::identity::HostIdentity;

/// How the daemon trusts the broker's HTTPS certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trust {
    /// Exactly the certificate with this SHA-256 (what `pleiades-broker host token create`
    /// prints): the broker's self-made certificate needs nothing else.
    Pin(String),
    /// A certificate chain to this CA (PEM), for the broker's name.
    Ca(PathBuf),
    /// Plain HTTP: loopback only (tests, or a broker behind a local TLS proxy).
    LoopbackHttp,
}

/// Errors talking to the broker.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("the broker refused the host's credential or token (HTTP 401/403): {0}")]
    Unauthorized(String),
    #[error("the broker answered HTTP {status}: {message}")]
    Status { status: u16, message: String },
    #[error("cannot reach the broker at {url}: {error}")]
    Unreachable { url: String, error: String },
    #[error("{0}")]
    Setup(String),
}

/// A client of one broker.
pub struct BrokerClient {
    http: reqwest::Client,
    base: String,
    credential: Option<String>,
}

impl std::fmt::Debug for BrokerClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the credential.
        f.debug_struct("BrokerClient").field("base", &self.base).finish_non_exhaustive()
    }
}

impl BrokerClient {
    /// `base`: the broker's URL (`https://broker:8443`); `identity`: the client certificate
    /// every HTTPS request presents (plain HTTP has none to present).
    pub fn new(base: &str, trust: &Trust, identity: &HostIdentity) -> Result<Self, BrokerError> {
        let base = base.trim_end_matches('/').to_owned();
        let setup = |e: String| BrokerError::Setup(e);
        let builder = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .connect_timeout(Duration::from_secs(10))
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("pleiades-host/", env!("CARGO_PKG_VERSION")));
        let builder = match trust {
            Trust::LoopbackHttp => {
                if !is_loopback_http(&base) {
                    return Err(setup(format!(
                        "{base}: plain HTTP is only for a broker on this machine (http://127.0.0.1:…); \
                         use https:// with --broker-cert-sha256 or --broker-ca"
                    )));
                }
                builder
            }
            Trust::Pin(_) | Trust::Ca(_) if !base.starts_with("https://") => {
                return Err(setup(format!("{base}: the broker URL must start with https://")));
            }
            Trust::Pin(pin) => {
                let provider = Arc::new(rustls::crypto::ring::default_provider());
                let verifier = PinnedCertVerifier::new(pin, provider.clone()).ok_or_else(|| {
                    setup("--broker-cert-sha256 must be 64 hex digits (the SHA-256 of the broker's certificate)".into())
                })?;
                let (chain, key) = identity.client_auth();
                let tls = tls_builder(provider)?
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(verifier))
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| setup(format!("the host identity cannot be used: {e}")))?;
                builder.use_preconfigured_tls(tls)
            }
            Trust::Ca(path) => {
                let provider = Arc::new(rustls::crypto::ring::default_provider());
                let (chain, key) = identity.client_auth();
                let tls = tls_builder(provider)?
                    .with_root_certificates(ca_roots(path)?)
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| setup(format!("the host identity cannot be used: {e}")))?;
                builder.use_preconfigured_tls(tls)
            }
        };
        let http = builder.build().map_err(|e| setup(format!("cannot set up HTTPS: {e}")))?;
        Ok(Self { http, base, credential: None })
    }

    /// Uses this credential (from [`Self::register`] or a stored registration) from now on.
    pub fn set_credential(&mut self, credential: &str) {
        self.credential = Some(credential.to_owned());
    }

    pub async fn register(&self, registration: &HostRegistration) -> Result<HostRegistered, BrokerError> {
        self.post("/api/v1/hosts/register", registration, false).await
    }

    pub async fn heartbeat(&self, beat: &Heartbeat) -> Result<HeartbeatReply, BrokerError> {
        self.post("/api/v1/hosts/heartbeat", beat, true).await
    }

    pub async fn ack(&self, command_id: &str, ack: &CommandAck) -> Result<(), BrokerError> {
        let path = format!("/api/v1/hosts/commands/{command_id}/ack");
        let _: serde_json::Value = self.post(&path, ack, true).await?;
        Ok(())
    }

    async fn post<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &impl Serialize,
        authenticated: bool,
    ) -> Result<T, BrokerError> {
        let url = format!("{}{path}", self.base);
        let mut request = self.http.post(&url).json(body);
        if authenticated {
            let credential =
                self.credential.as_deref().ok_or_else(|| BrokerError::Setup("not registered".into()))?;
            request = request.bearer_auth(credential);
        }
        let response = request
            .send()
            .await
            .map_err(|e| BrokerError::Unreachable { url: self.base.clone(), error: error_chain(&e) })?;
        let status = response.status();
        if status.is_success() {
            let text = response
                .text()
                .await
                .map_err(|e| BrokerError::Unreachable { url: self.base.clone(), error: error_chain(&e) })?;
            // An empty body (an ack) reads as JSON null.
            let text = if text.trim().is_empty() { "null" } else { &text };
            return serde_json::from_str(text).map_err(|e| BrokerError::Status {
                status: status.as_u16(),
                message: format!("unexpected answer to {path}: {e}"),
            });
        }
        let message = response
            .json::<serde_json::Value>()
            .await
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_owned))
            .unwrap_or_else(|| status.canonical_reason().unwrap_or("error").to_owned());
        Err(match status.as_u16() {
            401 | 403 => BrokerError::Unauthorized(message),
            code => BrokerError::Status { status: code, message },
        })
    }
}

fn tls_builder(
    provider: Arc<rustls::crypto::CryptoProvider>,
) -> Result<rustls::ConfigBuilder<rustls::ClientConfig, rustls::WantsVerifier>, BrokerError> {
    rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| BrokerError::Setup(e.to_string()))
}

fn ca_roots(path: &Path) -> Result<rustls::RootCertStore, BrokerError> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let bad = |e: String| BrokerError::Setup(format!("--broker-ca {}: {e}", path.display()));
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(path).map_err(|e| bad(e.to_string()))? {
        roots.add(cert.map_err(|e| bad(e.to_string()))?).map_err(|e| bad(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(bad("no certificate in the file".into()));
    }
    Ok(roots)
}

/// `http://127.x.x.x…`, `http://[::1]…` or `http://localhost…`.
fn is_loopback_http(base: &str) -> bool {
    let Some(rest) = base.strip_prefix("http://") else { return false };
    let host = rest.split(['/', '?']).next().unwrap_or_default();
    let host = host
        .rsplit_once(':')
        .filter(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok())
        .map_or(host, |(h, _)| h);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// An error with its causes ("error sending request: … : connection refused").
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity() -> HostIdentity {
        let dir = tempfile::tempdir().unwrap();
        HostIdentity::load_or_create(dir.path()).unwrap()
    }

    #[test]
    fn plain_http_is_refused_unless_the_broker_is_on_loopback() {
        for ok in ["http://127.0.0.1:8080", "http://localhost:1/", "http://[::1]:80", "http://127.1.2.3"] {
            assert!(is_loopback_http(ok), "{ok}");
            BrokerClient::new(ok, &Trust::LoopbackHttp, &identity()).unwrap();
        }
        for refused in
            ["http://10.0.0.1:8080", "http://broker.example:80", "https://127.0.0.1", "http://127.0.0.1.evil"]
        {
            assert!(!is_loopback_http(refused), "{refused}");
            let e = BrokerClient::new(refused, &Trust::LoopbackHttp, &identity()).unwrap_err();
            assert!(e.to_string().contains("plain HTTP"), "{e}");
        }
    }

    #[test]
    fn a_pin_needs_https_and_64_hex_digits() {
        let pin = "ab".repeat(32);
        BrokerClient::new("https://broker:8443", &Trust::Pin(pin.clone()), &identity()).unwrap();
        let e = BrokerClient::new("http://127.0.0.1:1", &Trust::Pin(pin), &identity()).unwrap_err();
        assert!(e.to_string().contains("https://"), "{e}");
        let e = BrokerClient::new("https://broker", &Trust::Pin("abc".into()), &identity()).unwrap_err();
        assert!(e.to_string().contains("64 hex digits"), "{e}");
    }

    #[test]
    fn the_credential_never_shows_in_debug_output() {
        let mut client = BrokerClient::new("http://127.0.0.1:1", &Trust::LoopbackHttp, &identity()).unwrap();
        client.set_credential("very-secret-credential");
        assert!(!format!("{client:?}").contains("very-secret"));
    }
}
