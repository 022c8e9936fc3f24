//! The broker's operations: accounts, pools, allocation, tickets, hosts, policy.
//!
//! Every operation that changes state writes an audit entry. The HTTP layer and the CLI call
//! these methods and nothing else, so authorization rules live here, next to the data.
//!
//! Allocation invariant: a desktop is assigned to at most one user. Each allocation runs in one
//! transaction that first bumps its pool's `alloc_seq` (a row lock on PostgreSQL, the write lock
//! on SQLite), so allocations in one pool are serialized on both backends; the claim itself is
//! a conditional `UPDATE … WHERE state = 'ready' AND user_id IS NULL` whose `rows_affected` is
//! checked, so even a missed lock could not hand one desktop to two users.
//!
//! States (of desktops, hosts, sessions and host commands) and command kinds are enums
//! ([`crate::model`], [`CommandKind`]). A state that a query writes is bound from its enum, so
//! that every way into a state is found by its variant; the states a query only tests stay
//! literals in its SQL, where they read as the condition they are.

mod accounts;
mod desktops;
mod hosts;
mod policy;
mod pools;
mod sessions;
mod ticket_key;
mod tx;

use std::sync::{Arc, Mutex};

use pleiades_protocol::ticket::{PublicKey, TicketSigner};
use serde::{Deserialize, Serialize};

use crate::auth::ldap::Directory;
use crate::clock::Clock;
use crate::db::{Db, get_i64, get_str, is_unique_violation};
use crate::error::{Error, Result};
use crate::model::{Actor, AuditEntry};
use crate::secret;

use accounts::RateLimiter;
pub use hosts::Transport;
use ticket_key::load_or_create_signer;
pub use ticket_key::{KEY_FILE as TICKET_KEY_FILE, import_ticket_key};

/// Tunables of the broker core (the `[broker]` table of broker.toml).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct BrokerSettings {
    /// Connection tickets live this long (seconds).
    pub ticket_lifetime_secs: u64,
    /// Hosts are asked to heartbeat this often.
    pub heartbeat_interval_secs: u64,
    /// A host silent this long is lost: its desktops fail.
    pub heartbeat_timeout_secs: u64,
    /// Browser sessions last this long.
    pub web_session_secs: u64,
    /// API bearer tokens last this long.
    pub api_token_secs: u64,
    /// Failed logins per user name from one source (an IPv4 address, an IPv6 /64) before that
    /// source is locked out of the name for `login_window_secs`; from all sources together,
    /// ten times this.
    pub login_failures_per_user: u32,
    /// Login attempts per client address per `login_window_secs`.
    pub login_attempts_per_ip: u32,
    pub login_window_secs: u64,
    /// A desktop that failed to start waits this long before its next start; the wait doubles
    /// with every failure in a row.
    pub start_retry_secs: u64,
    /// The longest wait between two starts of a failing desktop.
    pub start_retry_max_secs: u64,
    /// A command a host took and has not answered this long fails (and a desktop it was
    /// starting fails with it, to be retried as any failed start).
    pub command_timeout_secs: u64,
    /// Finished host commands and ended sessions are kept this long, then deleted.
    pub history_secs: u64,
    /// The audit log is kept this long.
    pub audit_retention_secs: u64,
}

impl Default for BrokerSettings {
    fn default() -> Self {
        Self {
            ticket_lifetime_secs: 60,
            heartbeat_interval_secs: 5,
            heartbeat_timeout_secs: 30,
            web_session_secs: 8 * 3600,
            api_token_secs: 24 * 3600,
            login_failures_per_user: 5,
            login_attempts_per_ip: 30,
            login_window_secs: 300,
            start_retry_secs: 5,
            start_retry_max_secs: 300,
            command_timeout_secs: 900,
            history_secs: 30 * 86_400,
            audit_retention_secs: 365 * 86_400,
        }
    }
}

/// The broker core. Cheap to share (`Arc`).
#[derive(Debug)]
pub struct Broker {
    pub db: Db,
    clock: Arc<dyn Clock>,
    signer: TicketSigner,
    pub settings: BrokerSettings,
    limiter: Mutex<RateLimiter>,
    /// Password checks at once (one per core): a login burst queues instead of taking the
    /// machine.
    verify_slots: tokio::sync::Semaphore,
    /// The LDAP directory whose users may sign in too, if one is configured.
    directory: Option<Arc<Directory>>,
}

// The host API's messages live in the protocol crate: `pleiades-host serve` uses the same types.
pub use pleiades_protocol::hostapi::{
    CommandAck, CommandKind, GuestReport, Heartbeat, HeartbeatReply, HostCommand, HostRegistered,
    HostRegistration, RunningDesktop, VmImage,
};

impl Broker {
    /// Opens the broker on a database. The ticket signing key lives in `state_dir`
    /// (`ticket-key.pk8`, made once, mode 0600; the directory 0700), the database keeps only
    /// its public key: every broker on one database signs with the same key, copied to its
    /// state directory ([`ticket_key`]).
    pub async fn open(
        db: Db,
        clock: Arc<dyn Clock>,
        settings: BrokerSettings,
        state_dir: &std::path::Path,
    ) -> Result<Self> {
        let signer = load_or_create_signer(&db, state_dir).await?;
        Ok(Self {
            db,
            clock,
            signer,
            settings,
            limiter: Mutex::new(RateLimiter::default()),
            verify_slots: tokio::sync::Semaphore::new(
                std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get),
            ),
            directory: None,
        })
    }

    /// Lets the users of an LDAP directory sign in, next to the broker's own accounts.
    pub fn with_directory(mut self, directory: Arc<Directory>) -> Self {
        self.directory = Some(directory);
        self
    }

    pub fn directory(&self) -> Option<&Arc<Directory>> {
        self.directory.as_ref()
    }

    pub fn now(&self) -> i64 {
        self.clock.now() as i64
    }

    pub fn ticket_public_key(&self) -> PublicKey {
        self.signer.public_key()
    }

    pub async fn audit(&self, actor: &str, action: &str, target: &str, detail: &str) -> Result<()> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        sqlx::query(
            "INSERT INTO audit_log (id, at, actor, action, target, detail) VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(format!("{nanos:024}-{}", secret::random_hex(4)))
        .bind(self.now())
        .bind(actor)
        .bind(action)
        .bind(target)
        .bind(detail)
        .execute(&self.db.pool)
        .await?;
        Ok(())
    }

    pub async fn list_audit(&self, actor: &Actor, limit: i64) -> Result<Vec<AuditEntry>> {
        actor.require_admin()?;
        let rows =
            sqlx::query("SELECT at, actor, action, target, detail FROM audit_log ORDER BY id DESC LIMIT $1")
                .bind(limit.clamp(1, 10_000))
                .fetch_all(&self.db.pool)
                .await?;
        rows.iter()
            .map(|r| {
                Ok(AuditEntry {
                    at: get_i64(r, "at")?,
                    actor: get_str(r, "actor")?,
                    action: get_str(r, "action")?,
                    target: get_str(r, "target")?,
                    detail: get_str(r, "detail")?,
                })
            })
            .collect()
    }
}

/// A host's reason, as stored: one line, at most 500 characters.
fn truncate_reason(reason: &str) -> String {
    let line: String = reason.split_whitespace().collect::<Vec<_>>().join(" ");
    match line.char_indices().nth(500) {
        Some((at, _)) => format!("{}…", &line[..at]),
        None => line,
    }
}

fn conflict(e: sqlx::Error, what: &str) -> Error {
    if is_unique_violation(&e) { Error::Conflict(what.to_owned()) } else { e.into() }
}
