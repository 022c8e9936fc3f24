//! The ticket signing key: a file in the broker's state directory, never in the database.
//!
//! The private key (Ed25519, PKCS#8 DER) is `STATE_DIR/ticket-key.pk8`, mode 0600, in a
//! directory made 0700. The database holds only the public key (`settings.ticket_public_key`),
//! so that every broker on one database signs with the same key or refuses to start: a second
//! broker gets a copy of the file (or `ticket-key --import`). Whoever reads the database (a
//! dump, a backup, its server's admin) cannot sign tickets.
//!
//! Brokers before this kept the private key in the database (`ticket_signing_key_pkcs8`). At
//! start it moves into the key file, the public key is recorded, and the row is erased: on
//! SQLite with `secure_delete` and the WAL checkpointed and truncated, so that neither the
//! database file nor its WAL keeps the bytes; on PostgreSQL the table is rewritten (`VACUUM
//! FULL`); the server's WAL and older backups may still hold the key there.

use std::path::Path;

use pleiades_protocol::ticket::{PublicKey, TicketSigner};
use sqlx::Executor as _;

use crate::db::{Backend, Db, get_str, is_unique_violation};
use crate::error::{Error, Result};
use crate::private::{create_private, create_private_dir, read_private};

/// The key file's name in the state directory.
pub const KEY_FILE: &str = "ticket-key.pk8";
/// Where brokers before kept the private key (base64 PKCS#8): migrated away at start.
const LEGACY_KEY_SETTING: &str = "ticket_signing_key_pkcs8";
/// The public key of the database's tickets (base64url).
const PUBLIC_KEY_SETTING: &str = "ticket_public_key";

fn key_error(what: impl std::fmt::Display) -> Error {
    Error::TicketKey(what.to_string())
}

fn signer_of(pkcs8: &[u8], origin: &Path) -> Result<TicketSigner> {
    TicketSigner::from_pkcs8(pkcs8)
        .map_err(|e| key_error(format!("{} is not an Ed25519 key in PKCS#8 form: {e}", origin.display())))
}

/// Installs `pkcs8` (an Ed25519 key) as the ticket signing key: into this broker's state
/// directory, and as the database's key when it has none yet (or has this very key). Returns
/// the public key hosts verify with.
///
/// For a key kept outside the broker (made by the admin's tooling, shared with a standby
/// broker on its own database), or for a second broker on a database another broker made the
/// key of. A key already in use is never replaced: hosts and connection tickets out there
/// depend on it.
pub async fn import_ticket_key(db: &Db, state_dir: &Path, pkcs8: &[u8]) -> Result<PublicKey> {
    let signer = TicketSigner::from_pkcs8(pkcs8)
        .map_err(|e| Error::Invalid(format!("not an Ed25519 key in PKCS#8 form: {e}")))?;
    let public = signer.public_key();
    if let Some(current) = database_key(db).await?
        && current != public
    {
        return Err(Error::Conflict(format!(
            "this database's tickets are signed with another key ({}); import a key into a new \
             database, before any other command",
            current.to_base64()
        )));
    }
    let path = key_path(state_dir)?;
    // The very file being imported may be the key file's place: it becomes private.
    if std::fs::read(&path).is_ok_and(|kept| kept == pkcs8) {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| key_error(format!("{}: {e}", path.display())))?;
    }
    if !create_private(&path, pkcs8).map_err(|e| key_error(format!("{}: {e}", path.display())))? {
        let kept = read_key_file(&path)?.unwrap_or_default();
        if signer_of(&kept, &path)?.public_key() != public {
            return Err(Error::Conflict(format!(
                "{} holds another key; this broker signs with it already",
                path.display()
            )));
        }
    }
    load_or_create_signer(db, state_dir).await.map(|s| s.public_key())
}

/// The signer of this broker: the key file's key, made (or migrated out of the database) on
/// first use, and checked against the database's public key.
pub(super) async fn load_or_create_signer(db: &Db, state_dir: &Path) -> Result<TicketSigner> {
    let path = key_path(state_dir)?;
    migrate_key_out_of_database(db, &path).await?;
    for _ in 0..3 {
        let file = read_key_file(&path)?;
        let recorded = database_key(db).await?;
        match (file, recorded) {
            (Some(pkcs8), Some(public)) => {
                let signer = signer_of(&pkcs8, &path)?;
                if signer.public_key() != public {
                    return Err(key_error(format!(
                        "{} holds the key {}, but this database's tickets are signed with {}: this state \
                         directory belongs to another database",
                        path.display(),
                        signer.public_key().to_base64(),
                        public.to_base64()
                    )));
                }
                return Ok(signer);
            }
            (Some(pkcs8), None) => {
                let signer = signer_of(&pkcs8, &path)?;
                record_public_key(db, signer.public_key()).await?;
            }
            (None, Some(public)) => {
                return Err(key_error(format!(
                    "this database's tickets are signed with the key {}, and this broker has no copy of it \
                     at {}: copy {KEY_FILE} (mode 0600) from the state directory of a broker on this \
                     database, or install it with `pleiades-broker ticket-key --import FILE`",
                    public.to_base64(),
                    path.display()
                )));
            }
            (None, None) => {
                let pkcs8 = TicketSigner::generate_pkcs8()?;
                create_private(&path, &pkcs8).map_err(|e| key_error(format!("{}: {e}", path.display())))?;
                tracing::info!(key = %path.display(), "made the ticket signing key");
            }
        }
    }
    Err(key_error("the key file and the database keep changing under this broker"))
}

/// `STATE_DIR/ticket-key.pk8`, the directory made 0700 if missing.
fn key_path(state_dir: &Path) -> Result<std::path::PathBuf> {
    create_private_dir(state_dir)
        .map_err(|e| key_error(format!("cannot create the state directory {}: {e}", state_dir.display())))?;
    Ok(state_dir.join(KEY_FILE))
}

fn read_key_file(path: &Path) -> Result<Option<Vec<u8>>> {
    read_private(path).map_err(|e| key_error(format!("{}: {e}", path.display())))
}

async fn database_key(db: &Db) -> Result<Option<PublicKey>> {
    let row = sqlx::query("SELECT value FROM settings WHERE key = $1")
        .bind(PUBLIC_KEY_SETTING)
        .fetch_optional(&db.pool)
        .await?;
    row.map(|r| {
        PublicKey::from_base64(&get_str(&r, "value")?)
            .map_err(|_| key_error("the database's ticket public key is not base64url Ed25519"))
    })
    .transpose()
}

/// Records the database's public key, or checks the one another broker recorded first.
async fn record_public_key(db: &Db, public: PublicKey) -> Result<()> {
    let inserted = sqlx::query("INSERT INTO settings (key, value) VALUES ($1, $2)")
        .bind(PUBLIC_KEY_SETTING)
        .bind(public.to_base64())
        .execute(&db.pool)
        .await;
    match inserted {
        Ok(_) => Ok(()),
        Err(e) if is_unique_violation(&e) => match database_key(db).await? {
            Some(recorded) if recorded == public => Ok(()),
            Some(recorded) => Err(key_error(format!(
                "this database's tickets are signed with the key {}, not this broker's {}",
                recorded.to_base64(),
                public.to_base64()
            ))),
            None => Err(key_error("the database's ticket public key vanished")),
        },
        Err(e) => Err(e.into()),
    }
}

/// A private key that an older broker kept in the database moves to the key file (written
/// before the row goes), its public key is recorded, and the row is erased.
async fn migrate_key_out_of_database(db: &Db, path: &Path) -> Result<()> {
    use base64::Engine as _;
    let row = sqlx::query("SELECT value FROM settings WHERE key = $1")
        .bind(LEGACY_KEY_SETTING)
        .fetch_optional(&db.pool)
        .await?;
    let Some(row) = row else { return Ok(()) };
    let pkcs8 = base64::engine::general_purpose::STANDARD
        .decode(get_str(&row, "value")?)
        .map_err(|_| key_error("the ticket key stored in the database is not base64"))?;
    let signer = TicketSigner::from_pkcs8(&pkcs8)
        .map_err(|e| key_error(format!("the ticket key stored in the database: {e}")))?;
    if !create_private(path, &pkcs8).map_err(|e| key_error(format!("{}: {e}", path.display())))? {
        let kept = read_key_file(path)?.unwrap_or_default();
        if signer_of(&kept, path)?.public_key() != signer.public_key() {
            return Err(key_error(format!(
                "{} holds another key than the one this database kept: move one of them away",
                path.display()
            )));
        }
    }
    record_public_key(db, signer.public_key()).await?;
    erase_legacy_key(db).await?;
    tracing::info!(key = %path.display(), "moved the ticket signing key out of the database");
    Ok(())
}

/// Deletes the old key row so that its bytes leave the database's files too.
async fn erase_legacy_key(db: &Db) -> Result<()> {
    let mut conn = db.pool.acquire().await?;
    if db.backend == Backend::Sqlite {
        // Deleted content is overwritten with zeros instead of left in the page.
        conn.execute("PRAGMA secure_delete = ON").await?;
    }
    sqlx::query("DELETE FROM settings WHERE key = $1").bind(LEGACY_KEY_SETTING).execute(&mut *conn).await?;
    match db.backend {
        Backend::Sqlite => {
            // The page that held the key goes back into the database file, and the WAL,
            // whose older frames still hold it, is emptied.
            let row = sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)").fetch_optional(&mut *conn).await?;
            let busy = row.map(|r| crate::db::get_i64(&r, "busy")).transpose()?.unwrap_or(0);
            if busy != 0 {
                tracing::warn!(
                    "the WAL could not be checkpointed: it may hold the old ticket key until the next checkpoint"
                );
            }
            conn.execute("PRAGMA secure_delete = OFF").await?;
        }
        Backend::Postgres => {
            // A new table file without the dead row (the server's WAL is beyond reach).
            if let Err(e) = conn.execute("VACUUM FULL settings").await {
                tracing::warn!(
                    "VACUUM FULL settings failed ({e}): the old key row may stay on disk until a vacuum"
                );
            }
        }
    }
    Ok(())
}
