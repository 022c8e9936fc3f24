//! One database code path for SQLite and PostgreSQL: `sqlx::Any` with portable SQL.
//!
//! Portability rules kept by every query in the crate: `$1`-style placeholders (SQLite accepts
//! them too), TEXT ids made by the broker, BIGINT Unix seconds, BIGINT 0/1 flags, no
//! `RETURNING`, no `SUM` (PostgreSQL returns NUMERIC), no upsert syntax but
//! `INSERT … ON CONFLICT … DO NOTHING` (the same on SQLite ≥ 3.24 and PostgreSQL ≥ 9.5).

use std::time::Duration;

use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Executor, Row};

use crate::error::{Error, Result};

/// Embedded migrations, applied in order, each once.
const MIGRATIONS: &[(i64, &str)] = &[
    (1, include_str!("../migrations/0001_initial.sql")),
    (2, include_str!("../migrations/0002_desktop_session_port.sql")),
    (3, include_str!("../migrations/0003_desktop_user_indexes.sql")),
    (4, include_str!("../migrations/0004_start_failures.sql")),
    (5, include_str!("../migrations/0005_disks.sql")),
    (6, include_str!("../migrations/0006_pool_network.sql")),
    (7, include_str!("../migrations/0007_host_token_names.sql")),
    (8, include_str!("../migrations/0008_boot_generation.sql")),
    (9, include_str!("../migrations/0009_directory_accounts.sql")),
    (10, include_str!("../migrations/0010_host_client_cert.sql")),
    (11, include_str!("../migrations/0011_desktop_guest.sql")),
    (12, include_str!("../migrations/0012_pool_lock_on_disconnect.sql")),
    (13, include_str!("../migrations/0013_pool_clipboard.sql")),
    (14, include_str!("../migrations/0014_pool_file_transfer.sql")),
    (15, include_str!("../migrations/0015_pool_usb.sql")),
    (16, include_str!("../migrations/0016_pool_usb_auto.sql")),
];

/// A handle to the broker's database (cheap to clone).
#[derive(Debug, Clone)]
pub struct Db {
    pub pool: AnyPool,
    pub backend: Backend,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Db {
    /// Connects (creating a SQLite file if needed) and applies pending migrations.
    ///
    /// `sqlite:///var/lib/pleiades/broker.db`, `sqlite::memory:` is refused (each pooled
    /// connection would see its own database), `postgres://user@host/db`.
    pub async fn connect(url: &str) -> Result<Self> {
        sqlx::any::install_default_drivers();
        let backend = if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Backend::Postgres
        } else {
            return Err(Error::Invalid("database URL must start with sqlite: or postgres:".into()));
        };
        if url.contains(":memory:") {
            return Err(Error::Invalid("use a SQLite file, not :memory:".into()));
        }
        if backend == Backend::Sqlite
            && let Some(path) = sqlite_path(url)
        {
            create_sqlite_file(&path)?;
        }
        let url = if backend == Backend::Sqlite && !url.contains("mode=") {
            format!("{url}{}mode=rwc", if url.contains('?') { '&' } else { '?' })
        } else {
            url.to_owned()
        };
        let pool = AnyPoolOptions::new()
            .max_connections(if backend == Backend::Sqlite { 8 } else { 16 })
            .acquire_timeout(Duration::from_secs(30))
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if backend == Backend::Sqlite {
                        // WAL: readers never block the writer; busy_timeout: writers queue
                        // instead of failing while another transaction holds the lock.
                        conn.execute("PRAGMA journal_mode = WAL").await?;
                        conn.execute("PRAGMA busy_timeout = 30000").await?;
                        conn.execute("PRAGMA foreign_keys = ON").await?;
                        conn.execute("PRAGMA synchronous = NORMAL").await?;
                    }
                    Ok(())
                })
            })
            .connect(&url)
            .await?;
        let db = Self { pool, backend };
        db.migrate().await?;
        Ok(db)
    }

    async fn migrate(&self) -> Result<()> {
        self.pool
            .execute("CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, applied_at BIGINT NOT NULL)")
            .await?;
        for &(version, sql) in MIGRATIONS {
            let mut tx = self.pool.begin().await?;
            let done: Option<AnyRow> =
                sqlx::query("SELECT version FROM schema_migrations WHERE version = $1")
                    .bind(version)
                    .fetch_optional(&mut *tx)
                    .await?;
            if done.is_some() {
                continue;
            }
            for statement in sql.split(';').map(strip_comments).filter(|s| !s.is_empty()) {
                // Embedded migration text, part of the binary.
                sqlx::query(sqlx::AssertSqlSafe(statement)).execute(&mut *tx).await?;
            }
            let now = crate::clock::Clock::now(&crate::clock::SystemClock) as i64;
            let inserted = sqlx::query("INSERT INTO schema_migrations (version, applied_at) VALUES ($1, $2)")
                .bind(version)
                .bind(now)
                .execute(&mut *tx)
                .await;
            match inserted {
                Ok(_) => tx.commit().await?,
                // Another broker applied it at the same moment: theirs stands.
                Err(e) if is_unique_violation(&e) => tx.rollback().await?,
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }
}

/// The file of a `sqlite:` URL (`sqlite:///abs/b.db`, `sqlite://rel/b.db`, `sqlite:b.db`,
/// with or without `?options`); `None` for other URLs and in-memory databases.
pub fn sqlite_path(url: &str) -> Option<std::path::PathBuf> {
    let rest = url.strip_prefix("sqlite://").or_else(|| url.strip_prefix("sqlite:"))?;
    let file = rest.split('?').next().unwrap_or_default();
    (!file.is_empty() && !file.contains(":memory:")).then(|| file.into())
}

/// A new SQLite database file is made mode 0600, in a directory made 0700 when missing (its
/// WAL and shared-memory files take the database file's mode). An existing file is used as it
/// is, with a warning when others may read it: it holds password and token hashes.
fn create_sqlite_file(path: &std::path::Path) -> Result<()> {
    use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
    let fail = |e: std::io::Error| {
        Error::Internal(format!("cannot create the database file {}: {e}", path.display()))
    };
    match std::fs::metadata(path) {
        Ok(m) => {
            let mode = m.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                tracing::warn!(
                    "the database file {} has mode {mode:03o}: others may read it (chmod 600 it)",
                    path.display()
                );
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty() && !d.exists()) {
                crate::private::create_private_dir(dir).map_err(fail)?;
            }
            match std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path) {
                Ok(_) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
                Err(e) => Err(fail(e)),
            }
        }
        Err(e) => Err(fail(e)),
    }
}

fn strip_comments(statement: &str) -> String {
    statement
        .lines()
        .filter(|l| !l.trim_start().starts_with("--"))
        .collect::<Vec<_>>()
        .join("\n")
        .trim()
        .to_owned()
}

pub fn is_unique_violation(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(d) => {
            d.code().is_some_and(|c| c == "23505" || c == "2067" || c == "1555")
                || d.message().contains("UNIQUE constraint failed")
                || d.message().contains("duplicate key")
        }
        _ => false,
    }
}

/// Lock contention worth retrying: SQLite busy/locked, PostgreSQL serialization or deadlock.
pub fn is_retryable(e: &Error) -> bool {
    match e {
        Error::Db(sqlx::Error::Database(d)) => {
            let code = d.code().unwrap_or_default();
            matches!(code.as_ref(), "5" | "6" | "40001" | "40P01" | "517" | "261")
                || d.message().contains("database is locked")
        }
        Error::Db(sqlx::Error::PoolTimedOut) => true,
        _ => false,
    }
}

pub fn get_i64(row: &AnyRow, col: &str) -> Result<i64> {
    Ok(row.try_get::<i64, _>(col)?)
}

pub fn get_str(row: &AnyRow, col: &str) -> Result<String> {
    Ok(row.try_get::<String, _>(col)?)
}

pub fn get_opt_str(row: &AnyRow, col: &str) -> Result<Option<String>> {
    Ok(row.try_get::<Option<String>, _>(col)?)
}

pub fn get_opt_i64(row: &AnyRow, col: &str) -> Result<Option<i64>> {
    Ok(row.try_get::<Option<i64>, _>(col)?)
}

/// A new random id with a readable prefix: `d-1f3a…` (desktop), `u-…` (user), ….
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}-{}", crate::secret::random_hex(8))
}
