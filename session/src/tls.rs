//! The session server's identity: a self-signed certificate whose SHA-256 fingerprint the
//! connection file pins (docs/protocol.md, 1), and the QUIC server configuration around it.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use pleiades_protocol::transport::{ALPN, IDLE_TIMEOUT_US};

const CERT_FILE: &str = "session-cert.der";
const KEY_FILE: &str = "session-key.der";

/// A certificate and its key.
pub struct Identity {
    pub cert_der: Vec<u8>,
    key_der: Vec<u8>,
}

/// The unidirectional streams a client may have open at once: input, clipboard, files, the
/// USB channel's control lane and one data lane per redirected device. With fewer, a device's
/// lane waits for a stream that never comes (a third USB device hung that way). What they may
/// make this process buffer is bound by the connection's receive window, not by their number.
const CLIENT_UNI_STREAMS: u32 = 4 + pleiades_protocol::wire::MAX_USB_DEVICES as u32;

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("Identity").field("sha256", &self.fingerprint()).finish_non_exhaustive()
    }
}

impl Identity {
    /// A fresh self-signed certificate for `names` (ECDSA P-256).
    pub fn generate(names: &[String]) -> Result<Self, String> {
        let certified = rcgen::generate_simple_self_signed(names.to_vec())
            .map_err(|e| format!("cannot make the session certificate: {e}"))?;
        Ok(Self { cert_der: certified.cert.der().to_vec(), key_der: certified.signing_key.serialize_der() })
    }

    /// The host's identity kept in `dir` (`session-cert.der`, `session-key.der`, both mode
    /// 0600), made there the first time. Every VM of a host serves the same certificate, so the
    /// broker pins one fingerprint per host.
    pub fn load_or_create(dir: &Path, names: &[String]) -> Result<Self, String> {
        let (cert_path, key_path) = (dir.join(CERT_FILE), dir.join(KEY_FILE));
        if cert_path.exists() || key_path.exists() {
            let read = |p: &Path| std::fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display()));
            let identity = Self { cert_der: read(&cert_path)?, key_der: read(&key_path)? };
            // A broken pair is refused now rather than at the first client.
            identity.server_config().map_err(|e| format!("{}: {e}", dir.display()))?;
            return Ok(identity);
        }
        let identity = Self::generate(names)?;
        std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        // The key first, then the certificate, each complete before it appears under its name.
        for (path, bytes) in [(&key_path, &identity.key_der), (&cert_path, &identity.cert_der)] {
            super::write_private(path, bytes).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        }
        Ok(identity)
    }

    /// Lowercase hex SHA-256 of the DER certificate: what `cert_sha256` pins.
    pub fn fingerprint(&self) -> String {
        pleiades_protocol::pinning::cert_sha256(&self.cert_der)
    }

    /// QUIC server configuration: TLS 1.3 only, ALPN `pleiades/1`, datagrams on, the idle
    /// timeout of the protocol.
    pub fn server_config(&self) -> Result<quinn::ServerConfig, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(self.key_der.clone().into());
        let cert = rustls::pki_types::CertificateDer::from(self.cert_der.clone());
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| e.to_string())?
            .with_no_client_auth()
            .with_single_cert(vec![cert], key)
            .map_err(|e| format!("bad session certificate: {e}"))?;
        tls.alpn_protocols = vec![ALPN.to_vec()];
        tls.max_early_data_size = 0;
        let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).map_err(|e| e.to_string())?;
        let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        let mut transport = quinn::TransportConfig::default();
        transport
            .max_idle_timeout(Some(
                Duration::from_micros(IDLE_TIMEOUT_US).try_into().map_err(|e| format!("{e}"))?,
            ))
            .keep_alive_interval(Some(Duration::from_secs(1)))
            .max_concurrent_uni_streams(CLIENT_UNI_STREAMS.into())
            .max_concurrent_bidi_streams(1u32.into())
            // What a client sends is small (control, input, the microphone, a paste) but for a
            // file: 1 MiB a stream keeps a file at 100 Mbit/s on an 80 ms path (256 KiB, the
            // earlier figure, held it to 68 % of 100 Mbit/s at 20 ms); 2 MiB in all bound what a
            // peer can make this process buffer, ticket or not.
            .stream_receive_window((1024u32 * 1024).into())
            .receive_window((2048u32 * 1024).into())
            .datagram_receive_buffer_size(Some(64 * 1024))
            // BBR paces by measured bandwidth and RTT instead of backing off on every loss: a
            // loss-based controller manages ~0.8 Mbit/s on a 100 ms path with 2 % random loss
            // (Mathis), too little for a first full-screen frame.
            .congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default()));
        config.transport_config(Arc::new(transport));
        // Handshakes in progress and the datagrams they may queue (docs/protocol.md, "Before
        // the ticket"): quinn's defaults allow 65 536 and 100 MiB.
        config.max_incoming(256).incoming_buffer_size(16 * 1024).incoming_buffer_size_total(1 << 20);
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fingerprint_is_the_sha256_of_the_der_certificate() {
        let id = Identity::generate(&["localhost".into()]).unwrap();
        let fp = id.fingerprint();
        assert_eq!(fp.len(), 64);
        assert!(fp.chars().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        assert_ne!(fp, Identity::generate(&["localhost".into()]).unwrap().fingerprint(), "fresh keys");
        assert!(!format!("{id:?}").contains("key_der"));
        id.server_config().unwrap();
    }

    #[test]
    fn a_stored_identity_is_made_once_and_then_reused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let made = Identity::load_or_create(dir.path(), &["h".into()]).unwrap();
        let again = Identity::load_or_create(dir.path(), &["h".into()]).unwrap();
        assert_eq!(made.fingerprint(), again.fingerprint());
        let mode = std::fs::metadata(dir.path().join(KEY_FILE)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::write(dir.path().join(KEY_FILE), b"not a key").unwrap();
        let refused = Identity::load_or_create(dir.path(), &["h".into()]).unwrap_err();
        assert!(refused.contains(&dir.path().display().to_string()), "{refused}");
    }
}
