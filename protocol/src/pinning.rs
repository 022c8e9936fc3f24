//! Certificate pinning: trust exactly the certificate whose SHA-256 a peer was told about.
//!
//! Clients pin session servers (the connection file's `cert_sha256`, docs/protocol.md §1), and
//! hosts pin their broker (`pleiades-host serve --broker-cert-sha256`). No CA, no hostname, no
//! expiry check: the pin is the trust. The TLS 1.3 handshake signature is still verified (ring's
//! algorithms), so only the holder of the pinned certificate's key gets through.

#[cfg(feature = "rustls")]
pub use verifier::PinnedCertVerifier;

/// Lowercase hex SHA-256 of a certificate's DER bytes: the pin format.
pub fn cert_sha256(der: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, der).as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(feature = "rustls")]
mod verifier {
    use std::sync::{Arc, Mutex};

    use rustls::DigitallySignedStruct;
    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::crypto::CryptoProvider;
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};

    use super::cert_sha256;

    /// Accepts exactly the certificate whose SHA-256 is the pin. Remembers a mismatch so that the
    /// caller can say which certificate it saw (rustls reports only "invalid certificate").
    #[derive(Debug)]
    pub struct PinnedCertVerifier {
        pin: String,
        provider: Arc<CryptoProvider>,
        mismatch: Mutex<Option<String>>,
    }

    impl PinnedCertVerifier {
        /// A verifier for `pin` (64 hex digits, any case). `None` for an empty or malformed pin.
        pub fn new(pin: &str, provider: Arc<CryptoProvider>) -> Option<Self> {
            let pin = pin.to_ascii_lowercase();
            if pin.len() != 64 || !pin.bytes().all(|b| b.is_ascii_hexdigit()) {
                return None;
            }
            Some(Self { pin, provider, mismatch: Mutex::new(None) })
        }

        /// The SHA-256 of the last certificate refused, if any.
        pub fn mismatch(&self) -> Option<String> {
            self.mismatch.lock().ok().and_then(|m| m.clone())
        }
    }

    impl ServerCertVerifier for PinnedCertVerifier {
        fn verify_server_cert(
            &self,
            end_entity: &CertificateDer<'_>,
            _intermediates: &[CertificateDer<'_>],
            _server_name: &ServerName<'_>,
            _ocsp_response: &[u8],
            _now: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            let got = cert_sha256(end_entity.as_ref());
            // Both are public values (the pin is in the connection file): no constant time needed.
            if got == self.pin {
                return Ok(ServerCertVerified::assertion());
            }
            if let Ok(mut mismatch) = self.mismatch.lock() {
                *mismatch = Some(got);
            }
            Err(rustls::Error::InvalidCertificate(rustls::CertificateError::ApplicationVerificationFailure))
        }

        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(
                message,
                cert,
                dss,
                &self.provider.signature_verification_algorithms,
            )
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                message,
                cert,
                dss,
                &self.provider.signature_verification_algorithms,
            )
        }

        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.provider.signature_verification_algorithms.supported_schemes()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pin_is_the_lowercase_hex_sha256_of_the_der_bytes() {
        assert_eq!(cert_sha256(b""), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    }

    #[cfg(feature = "rustls")]
    #[test]
    fn only_a_64_hex_digit_pin_makes_a_verifier() {
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        assert!(PinnedCertVerifier::new(&"AB".repeat(32), provider.clone()).is_some());
        for bad in ["", "ab", &"g".repeat(64), &"a".repeat(65)] {
            assert!(PinnedCertVerifier::new(bad, provider.clone()).is_none(), "{bad:?}");
        }
    }
}
