//! The host's identity towards its broker: a key pair and a self-signed certificate, made once
//! in the state directory (`host-identity-cert.pem`, `host-identity-key.pem`, both mode 0600),
//! that every HTTPS request to the broker presents as its TLS client certificate. The broker
//! pins its SHA-256 at registration, so that the host's credential works only from the machine
//! that holds this key (docs/broker.md, "Hosts"; docs/security.md).
//!
//! It is not the session certificate (`STATE_DIR/tls/`, a copy of which every desktop's jail
//! gets): no VM process is ever given this key. It lives beside the registration, outside
//! `tls/` and `desktops/`, the only parts of the state directory a jail sees.

use std::path::{Path, PathBuf};

use pleiades_protocol::hostapi::HOST_IDENTITY_NAME;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

pub const CERT_FILE: &str = "host-identity-cert.pem";
pub const KEY_FILE: &str = "host-identity-key.pem";

/// Why the host identity cannot be loaded or made.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("cannot read the host identity {path}: {error}")]
    Read { path: PathBuf, error: String },
    #[error(
        "the host identity in {dir} is incomplete ({missing} is missing): restore it from a backup, \
         or remove both {CERT_FILE} and {KEY_FILE} to make a new one (the broker then refuses this host \
         until an admin registers it again: `pleiades-broker host token create --name NAME --replace`)"
    )]
    Incomplete { dir: PathBuf, missing: &'static str },
    #[error("cannot write the host identity {path}: {error}")]
    Write { path: PathBuf, error: std::io::Error },
    #[error("cannot make the host identity: {0}")]
    Generate(String),
}

/// The certificate and key the daemon presents to its broker.
pub struct HostIdentity {
    cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
}

impl std::fmt::Debug for HostIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("HostIdentity").field("sha256", &self.fingerprint()).finish_non_exhaustive()
    }
}

impl HostIdentity {
    /// The identity kept in `state_dir`, made there the first time (ECDSA P-256, subject and
    /// issuer `CN=`[`HOST_IDENTITY_NAME`]). Both files or neither: half a pair is refused
    /// rather than replaced, since a new certificate locks the host out of its broker.
    pub fn load_or_create(state_dir: &Path) -> Result<Self, IdentityError> {
        let (cert_path, key_path) = (state_dir.join(CERT_FILE), state_dir.join(KEY_FILE));
        match (cert_path.exists(), key_path.exists()) {
            (true, true) => Self::load(&cert_path, &key_path),
            (false, false) => Self::create(&cert_path, &key_path),
            (cert, _) => Err(IdentityError::Incomplete {
                dir: state_dir.to_owned(),
                missing: if cert { KEY_FILE } else { CERT_FILE },
            }),
        }
    }

    fn load(cert_path: &Path, key_path: &Path) -> Result<Self, IdentityError> {
        let read = |path: &Path, error: String| IdentityError::Read { path: path.to_owned(), error };
        let cert = CertificateDer::from_pem_file(cert_path).map_err(|e| read(cert_path, e.to_string()))?;
        let key = PrivateKeyDer::from_pem_file(key_path).map_err(|e| read(key_path, e.to_string()))?;
        let identity = Self { cert, key };
        // A key that does not match its certificate is refused now, not at the first request.
        identity.client_config_check().map_err(|e| read(key_path, e))?;
        Ok(identity)
    }

    fn create(cert_path: &Path, key_path: &Path) -> Result<Self, IdentityError> {
        let generate = |e: rcgen::Error| IdentityError::Generate(e.to_string());
        let key_pair = rcgen::KeyPair::generate().map_err(generate)?;
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(rcgen::DnType::CommonName, HOST_IDENTITY_NAME);
        let cert = params.self_signed(&key_pair).map_err(generate)?;
        // The key first, then the certificate, each complete before it appears under its name:
        // a certificate on disk always has its key.
        for (path, pem) in [(key_path, key_pair.serialize_pem()), (cert_path, cert.pem())] {
            pleiades_session::write_private(path, pem.as_bytes())
                .map_err(|error| IdentityError::Write { path: path.to_owned(), error })?;
        }
        tracing::info!(cert = %cert_path.display(), "made the host's identity towards the broker");
        Ok(Self { cert: cert.der().clone(), key: PrivateKeyDer::Pkcs8(key_pair.serialize_der().into()) })
    }

    /// Lowercase hex SHA-256 of the certificate: what the broker pins.
    pub fn fingerprint(&self) -> String {
        pleiades_protocol::pinning::cert_sha256(&self.cert)
    }

    /// The certificate chain and key for rustls' `with_client_auth_cert`.
    pub fn client_auth(&self) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        (vec![self.cert.clone()], self.key.clone_key())
    }

    fn client_config_check(&self) -> Result<(), String> {
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let (chain, key) = self.client_auth();
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_client_auth_cert(chain, key)
            .map(drop)
            .map_err(|e| format!("not a usable key for its certificate: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn the_identity_is_made_once_private_and_then_reused() {
        let dir = tempfile::tempdir().unwrap();
        let made = HostIdentity::load_or_create(dir.path()).unwrap();
        for file in [CERT_FILE, KEY_FILE] {
            let mode = std::fs::metadata(dir.path().join(file)).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{file}");
        }
        let key = std::fs::read(dir.path().join(KEY_FILE)).unwrap();
        let again = HostIdentity::load_or_create(dir.path()).unwrap();
        assert_eq!(again.fingerprint(), made.fingerprint(), "the same certificate on the next start");
        assert_eq!(std::fs::read(dir.path().join(KEY_FILE)).unwrap(), key, "the same key");
        assert_eq!(made.fingerprint().len(), 64);
        // Subject and issuer are the name the broker hints in its certificate request.
        let name = pleiades_protocol::hostapi::host_identity_rdns_der();
        let occurrences = made.cert.windows(name.len()).filter(|w| *w == name.as_slice()).count();
        assert_eq!(occurrences, 2, "issuer and subject are CN={HOST_IDENTITY_NAME}");
        assert!(!format!("{made:?}").contains("PRIVATE"), "no key in debug output");
    }

    #[test]
    fn half_a_pair_is_refused_not_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let made = HostIdentity::load_or_create(dir.path()).unwrap();
        std::fs::remove_file(dir.path().join(KEY_FILE)).unwrap();
        let e = HostIdentity::load_or_create(dir.path()).unwrap_err();
        assert!(e.to_string().contains("--replace"), "{e}");
        assert!(dir.path().join(CERT_FILE).exists(), "the certificate is kept");
        // Another identity's key with this certificate: refused when loaded.
        let other = tempfile::tempdir().unwrap();
        HostIdentity::load_or_create(other.path()).unwrap();
        std::fs::copy(other.path().join(KEY_FILE), dir.path().join(KEY_FILE)).unwrap();
        let e = HostIdentity::load_or_create(dir.path()).unwrap_err();
        assert!(e.to_string().contains(KEY_FILE), "{e}");
        drop(made);
    }
}
