//! The ticket signing key, one per broker database.

use pleiades_protocol::ticket::{PublicKey, TicketSigner};

use crate::db::{Db, get_str, is_unique_violation};
use crate::error::{Error, Result};

const TICKET_KEY_SETTING: &str = "ticket_signing_key_pkcs8";

/// Installs `pkcs8` (an Ed25519 key) as the ticket signing key of a broker database that has
/// none yet, or that already has this very key. Returns the public key hosts verify with.
///
/// For a key kept outside the broker (made by the admin's tooling, shared with a standby
/// broker on its own database). A key already in use is never replaced: hosts and connection
/// tickets out there depend on it.
pub async fn import_ticket_key(db: &Db, pkcs8: &[u8]) -> Result<PublicKey> {
    use base64::Engine as _;
    let signer = TicketSigner::from_pkcs8(pkcs8)
        .map_err(|e| Error::Invalid(format!("not an Ed25519 key in PKCS#8 form: {e}")))?;
    let encoded = base64::engine::general_purpose::STANDARD.encode(pkcs8);
    let inserted = sqlx::query("INSERT INTO settings (key, value) VALUES ($1, $2)")
        .bind(TICKET_KEY_SETTING)
        .bind(&encoded)
        .execute(&db.pool)
        .await;
    match inserted {
        Ok(_) => Ok(signer.public_key()),
        Err(e) if is_unique_violation(&e) => {
            let current = load_or_create_signer(db).await?;
            if current.public_key() == signer.public_key() {
                Ok(current.public_key())
            } else {
                Err(Error::Conflict(
                    "this broker already signs tickets with another key; import a key into a new database, \
                     before any other command"
                        .into(),
                ))
            }
        }
        Err(e) => Err(e.into()),
    }
}

pub(super) async fn load_or_create_signer(db: &Db) -> Result<TicketSigner> {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    for _ in 0..3 {
        let row = sqlx::query("SELECT value FROM settings WHERE key = $1")
            .bind(TICKET_KEY_SETTING)
            .fetch_optional(&db.pool)
            .await?;
        if let Some(row) = row {
            let der = b64
                .decode(get_str(&row, "value")?)
                .map_err(|_| Error::Internal("stored ticket key is not base64".into()))?;
            return Ok(TicketSigner::from_pkcs8(&der)?);
        }
        let der = TicketSigner::generate_pkcs8()?;
        let inserted = sqlx::query("INSERT INTO settings (key, value) VALUES ($1, $2)")
            .bind(TICKET_KEY_SETTING)
            .bind(b64.encode(&der))
            .execute(&db.pool)
            .await;
        match inserted {
            Ok(_) => return Ok(TicketSigner::from_pkcs8(&der)?),
            Err(e) if is_unique_violation(&e) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(Error::Internal("could not load the ticket key".into()))
}
