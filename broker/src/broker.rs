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

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pleiades_protocol::connfile::{Connection, FORMAT_VERSION};
use pleiades_protocol::ticket::{PublicKey, TicketClaims, TicketSigner};
use serde::{Deserialize, Serialize};
use sqlx::{Any, Row, Transaction};

use crate::auth::{LocalPasswords, PasswordBackend};
use crate::clock::Clock;
use crate::db::{Db, get_i64, get_str, is_retryable, is_unique_violation, new_id};
use crate::error::{Error, Result};
use crate::model::*;
use crate::secret;

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
    /// Failed logins per user name before it is locked for `login_window_secs`.
    pub login_failures_per_user: u32,
    /// Login attempts per client address per `login_window_secs`.
    pub login_attempts_per_ip: u32,
    pub login_window_secs: u64,
    /// A desktop that failed to start waits this long before its next start; the wait doubles
    /// with every failure in a row.
    pub start_retry_secs: u64,
    /// The longest wait between two starts of a failing desktop.
    pub start_retry_max_secs: u64,
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
        }
    }
}

const TICKET_KEY_SETTING: &str = "ticket_signing_key_pkcs8";
/// Attempts of one allocation under lock contention before giving up.
const ALLOC_ATTEMPTS: u32 = 50;

/// The broker core. Cheap to share (`Arc`).
#[derive(Debug)]
pub struct Broker {
    pub db: Db,
    clock: Arc<dyn Clock>,
    signer: TicketSigner,
    pub settings: BrokerSettings,
    limiter: Mutex<RateLimiter>,
    password_backends: Vec<Arc<dyn PasswordBackend>>,
}

// The host API's messages live in the protocol crate: `pleiades-host serve` uses the same types.
pub use pleiades_protocol::hostapi::{
    CommandAck, Heartbeat, HeartbeatReply, HostCommand, HostRegistered, HostRegistration, RunningDesktop,
    VmImage,
};

impl Broker {
    /// Opens the broker on a database; the ticket key is created once and shared by every
    /// broker on that database.
    pub async fn open(db: Db, clock: Arc<dyn Clock>, settings: BrokerSettings) -> Result<Self> {
        let signer = load_or_create_signer(&db).await?;
        Ok(Self {
            db,
            clock,
            signer,
            settings,
            limiter: Mutex::new(RateLimiter::default()),
            password_backends: vec![Arc::new(LocalPasswords)],
        })
    }

    /// Adds a password backend for another account source (LDAP, …).
    pub fn with_password_backend(mut self, backend: Arc<dyn PasswordBackend>) -> Self {
        self.password_backends.retain(|b| b.source() != backend.source());
        self.password_backends.push(backend);
        self
    }

    pub fn now(&self) -> i64 {
        self.clock.now() as i64
    }

    pub fn ticket_public_key(&self) -> PublicKey {
        self.signer.public_key()
    }

    // ----- audit -------------------------------------------------------------------------

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

    // ----- users and groups --------------------------------------------------------------

    pub async fn create_user(
        &self,
        actor: &Actor,
        name: &str,
        display_name: &str,
        password: Option<&str>,
        is_admin: bool,
    ) -> Result<User> {
        actor.require_admin()?;
        if !valid_name(name) {
            return Err(Error::Invalid("user name: 1-64 letters, digits, '-', '_', '.', '@'".into()));
        }
        let hash = match password {
            Some(p) if p.len() < 8 => return Err(Error::Invalid("password: at least 8 characters".into())),
            Some(p) => Some(hash_blocking(p.to_owned()).await?),
            None => None,
        };
        let id = new_id("u");
        let display = if display_name.is_empty() { name } else { display_name };
        sqlx::query("INSERT INTO users (id, name, display_name, password_hash, source, is_admin, created_at) VALUES ($1, $2, $3, $4, 'local', $5, $6)")
            .bind(&id)
            .bind(name)
            .bind(display)
            .bind(hash)
            .bind(i64::from(is_admin))
            .bind(self.now())
            .execute(&self.db.pool)
            .await
            .map_err(|e| conflict(e, &format!("user {name}")))?;
        self.audit(&actor.name, "user.create", name, if is_admin { "admin" } else { "user" }).await?;
        self.user_by_name(name).await
    }

    pub async fn set_password(&self, actor: &Actor, name: &str, password: &str) -> Result<()> {
        actor.require_admin()?;
        if password.len() < 8 {
            return Err(Error::Invalid("password: at least 8 characters".into()));
        }
        let hash = hash_blocking(password.to_owned()).await?;
        let done = sqlx::query("UPDATE users SET password_hash = $1 WHERE name = $2")
            .bind(hash)
            .bind(name)
            .execute(&self.db.pool)
            .await?;
        if done.rows_affected() == 0 {
            return Err(Error::NotFound(format!("user {name}")));
        }
        self.audit(&actor.name, "user.password", name, "").await
    }

    pub async fn user_by_name(&self, name: &str) -> Result<User> {
        let row = sqlx::query("SELECT * FROM users WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.db.pool)
            .await?;
        row.as_ref().map(User::from_row).transpose()?.ok_or_else(|| Error::NotFound(format!("user {name}")))
    }

    pub async fn user_by_id(&self, id: &str) -> Result<User> {
        let row =
            sqlx::query("SELECT * FROM users WHERE id = $1").bind(id).fetch_optional(&self.db.pool).await?;
        row.as_ref().map(User::from_row).transpose()?.ok_or_else(|| Error::NotFound("user".into()))
    }

    pub async fn list_users(&self, actor: &Actor) -> Result<Vec<User>> {
        actor.require_admin()?;
        let rows = sqlx::query("SELECT * FROM users ORDER BY name").fetch_all(&self.db.pool).await?;
        rows.iter().map(User::from_row).collect()
    }

    pub async fn create_group(&self, actor: &Actor, name: &str) -> Result<()> {
        actor.require_admin()?;
        if !valid_name(name) {
            return Err(Error::Invalid("group name: 1-64 letters, digits, '-', '_', '.'".into()));
        }
        sqlx::query("INSERT INTO user_groups (id, name, created_at) VALUES ($1, $2, $3)")
            .bind(new_id("g"))
            .bind(name)
            .bind(self.now())
            .execute(&self.db.pool)
            .await
            .map_err(|e| conflict(e, &format!("group {name}")))?;
        self.audit(&actor.name, "group.create", name, "").await
    }

    pub async fn add_group_member(&self, actor: &Actor, group: &str, user: &str) -> Result<()> {
        actor.require_admin()?;
        let group_id = self.group_id(group).await?;
        let user = self.user_by_name(user).await?;
        sqlx::query("INSERT INTO group_members (group_id, user_id) VALUES ($1, $2)")
            .bind(&group_id)
            .bind(&user.id)
            .execute(&self.db.pool)
            .await
            .map_err(|e| conflict(e, &format!("{} in {group}", user.name)))?;
        self.audit(&actor.name, "group.member.add", group, &user.name).await
    }

    async fn group_id(&self, name: &str) -> Result<String> {
        let row = sqlx::query("SELECT id FROM user_groups WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.db.pool)
            .await?;
        row.map(|r| get_str(&r, "id")).transpose()?.ok_or_else(|| Error::NotFound(format!("group {name}")))
    }

    pub async fn list_groups(&self, actor: &Actor) -> Result<Vec<Group>> {
        actor.require_admin()?;
        let groups =
            sqlx::query("SELECT id, name FROM user_groups ORDER BY name").fetch_all(&self.db.pool).await?;
        let members = sqlx::query(
            "SELECT m.group_id, u.name FROM group_members m JOIN users u ON u.id = m.user_id ORDER BY u.name",
        )
        .fetch_all(&self.db.pool)
        .await?;
        groups
            .iter()
            .map(|g| {
                let id = get_str(g, "id")?;
                let mut names = Vec::new();
                for m in &members {
                    if get_str(m, "group_id")? == id {
                        names.push(get_str(m, "name")?);
                    }
                }
                Ok(Group { id, name: get_str(g, "name")?, members: names })
            })
            .collect()
    }

    // ----- authentication ----------------------------------------------------------------

    /// Checks a user name and password, rate-limited per user name and per client address,
    /// with the [`PasswordBackend`] of the account's source (local argon2id by default).
    pub async fn login(&self, name: &str, password: &str, client: &str) -> Result<User> {
        let now = self.clock.now();
        self.limiter.lock().expect("limiter lock").check(&self.settings, name, client, now)?;
        let row = sqlx::query("SELECT * FROM users WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.db.pool)
            .await?;
        let (user, hash) = match &row {
            Some(r) => (Some(User::from_row(r)?), r.try_get::<Option<String>, _>("password_hash")?),
            None => (None, None),
        };
        // Unknown names (and sources without a backend) are checked against a dummy hash, so
        // that timing does not tell which names exist.
        let backend = user
            .as_ref()
            .and_then(|u| self.password_backends.iter().find(|b| b.source() == u.source).cloned());
        let (backend, hash, real): (Arc<dyn PasswordBackend>, _, _) = match backend {
            Some(b) => (b, hash, true),
            None => (Arc::new(LocalPasswords), Some(secret::dummy_hash().to_owned()), false),
        };
        let verified = {
            let (name, password) = (name.to_owned(), password.to_owned());
            tokio::task::spawn_blocking(move || backend.verify(&name, hash.as_deref(), &password) && real)
                .await
                .map_err(|e| Error::Internal(e.to_string()))?
        };
        match user {
            Some(user) if verified => {
                self.limiter.lock().expect("limiter lock").succeeded(name);
                self.audit(&user.name, "login", &user.name, client).await?;
                Ok(user)
            }
            _ => {
                self.limiter.lock().expect("limiter lock").failed(name, now);
                self.audit(name, "login.failed", name, client).await?;
                Err(Error::Unauthenticated)
            }
        }
    }

    /// A new browser session (`web`) or API token (`api`) for the user: `(token, csrf)`.
    pub async fn create_auth_token(&self, user: &User, kind: &str) -> Result<(String, String)> {
        let token = secret::new_token();
        let csrf = secret::new_token();
        let lifetime =
            if kind == "web" { self.settings.web_session_secs } else { self.settings.api_token_secs };
        sqlx::query("INSERT INTO auth_tokens (token_hash, user_id, kind, csrf, created_at, expires_at) VALUES ($1, $2, $3, $4, $5, $6)")
            .bind(secret::token_hash(&token))
            .bind(&user.id)
            .bind(kind)
            .bind(&csrf)
            .bind(self.now())
            .bind(self.now() + lifetime as i64)
            .execute(&self.db.pool)
            .await?;
        Ok((token, csrf))
    }

    /// Resolves a session cookie or bearer token: `(actor, csrf, kind)`.
    pub async fn authenticate_token(&self, token: &str) -> Result<(Actor, String, String)> {
        let row = sqlx::query(
            "SELECT t.csrf, t.kind, t.expires_at, u.id, u.name, u.is_admin FROM auth_tokens t JOIN users u ON u.id = t.user_id WHERE t.token_hash = $1",
        )
        .bind(secret::token_hash(token))
        .fetch_optional(&self.db.pool)
        .await?
        .ok_or(Error::Unauthenticated)?;
        if get_i64(&row, "expires_at")? <= self.now() {
            return Err(Error::Unauthenticated);
        }
        let actor = Actor {
            user_id: get_str(&row, "id")?,
            name: get_str(&row, "name")?,
            is_admin: get_i64(&row, "is_admin")? != 0,
        };
        Ok((actor, get_str(&row, "csrf")?, get_str(&row, "kind")?))
    }

    pub async fn logout(&self, actor: &Actor, token: &str) -> Result<()> {
        sqlx::query("DELETE FROM auth_tokens WHERE token_hash = $1")
            .bind(secret::token_hash(token))
            .execute(&self.db.pool)
            .await?;
        self.audit(&actor.name, "logout", &actor.name, "").await
    }

    // ----- images and pools --------------------------------------------------------------

    pub async fn create_image(&self, actor: &Actor, image: &Image) -> Result<Image> {
        actor.require_admin()?;
        if !valid_name(&image.name) || image.vcpus < 1 || image.memory_mib < 64 {
            return Err(Error::Invalid("image: valid name, vcpus >= 1, memory_mib >= 64".into()));
        }
        let id = new_id("i");
        sqlx::query("INSERT INTO images (id, name, kernel, initrd, cmdline, disk, vcpus, memory_mib, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)")
            .bind(&id)
            .bind(&image.name)
            .bind(&image.kernel)
            .bind(&image.initrd)
            .bind(&image.cmdline)
            .bind(image.disk.clone())
            .bind(image.vcpus)
            .bind(image.memory_mib)
            .bind(self.now())
            .execute(&self.db.pool)
            .await
            .map_err(|e| conflict(e, &format!("image {}", image.name)))?;
        self.audit(
            &actor.name,
            "image.create",
            &image.name,
            &format!("kernel={} initrd={}", image.kernel, image.initrd),
        )
        .await?;
        Ok(Image { id, ..image.clone() })
    }

    pub async fn list_images(&self) -> Result<Vec<Image>> {
        let rows = sqlx::query("SELECT * FROM images ORDER BY name").fetch_all(&self.db.pool).await?;
        rows.iter().map(Image::from_row).collect()
    }

    async fn image_by(&self, column: &str, value: &str) -> Result<Image> {
        // `column` is one of two literals chosen by this module, never user input.
        let sql = format!("SELECT * FROM images WHERE {column} = $1");
        let row = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(value).fetch_optional(&self.db.pool).await?;
        row.as_ref()
            .map(Image::from_row)
            .transpose()?
            .ok_or_else(|| Error::NotFound(format!("image {value}")))
    }

    pub async fn create_pool(&self, actor: &Actor, spec: &PoolSpec) -> Result<Pool> {
        actor.require_admin()?;
        spec.validate()?;
        let image = self.image_by("name", &spec.image).await?;
        let id = new_id("p");
        let display = if spec.display_name.trim().is_empty() {
            spec.name.clone()
        } else {
            spec.display_name.trim().to_owned()
        };
        sqlx::query(
            "INSERT INTO pools (id, name, display_name, kind, image_id, min_size, max_size, spares, idle_timeout_secs, disconnect_timeout_secs, enabled, alloc_seq, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, 1, 0, $11)",
        )
        .bind(&id)
        .bind(&spec.name)
        .bind(&display)
        .bind(spec.kind.as_str())
        .bind(&image.id)
        .bind(spec.min_size)
        .bind(spec.max_size)
        .bind(spec.spares)
        .bind(spec.idle_timeout_secs)
        .bind(spec.disconnect_timeout_secs)
        .bind(self.now())
        .execute(&self.db.pool)
        .await
        .map_err(|e| conflict(e, &format!("pool {}", spec.name)))?;
        self.audit(&actor.name, "pool.create", &spec.name, &pool_detail(spec)).await?;
        self.pool(&id).await
    }

    /// Edits sizes, timeouts and display name (kind and image are fixed once desktops exist).
    pub async fn update_pool(&self, actor: &Actor, id: &str, spec: &PoolSpec, enabled: bool) -> Result<Pool> {
        actor.require_admin()?;
        spec.validate()?;
        let pool = self.pool(id).await?;
        let display = if spec.display_name.trim().is_empty() {
            pool.name.clone()
        } else {
            spec.display_name.trim().to_owned()
        };
        sqlx::query(
            "UPDATE pools SET display_name = $1, min_size = $2, max_size = $3, spares = $4, idle_timeout_secs = $5, disconnect_timeout_secs = $6, enabled = $7 WHERE id = $8",
        )
        .bind(display)
        .bind(spec.min_size)
        .bind(spec.max_size)
        .bind(spec.spares)
        .bind(spec.idle_timeout_secs)
        .bind(spec.disconnect_timeout_secs)
        .bind(i64::from(enabled))
        .bind(id)
        .execute(&self.db.pool)
        .await?;
        self.audit(
            &actor.name,
            "pool.update",
            &pool.name,
            &format!("{} enabled={enabled}", pool_detail(spec)),
        )
        .await?;
        self.pool(id).await
    }

    pub async fn pool(&self, id: &str) -> Result<Pool> {
        let row =
            sqlx::query("SELECT * FROM pools WHERE id = $1").bind(id).fetch_optional(&self.db.pool).await?;
        row.as_ref().map(Pool::from_row).transpose()?.ok_or_else(|| Error::NotFound("pool".into()))
    }

    pub async fn pool_by_name(&self, name: &str) -> Result<Pool> {
        let row = sqlx::query("SELECT * FROM pools WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.db.pool)
            .await?;
        row.as_ref().map(Pool::from_row).transpose()?.ok_or_else(|| Error::NotFound(format!("pool {name}")))
    }

    pub async fn list_pools(&self) -> Result<Vec<Pool>> {
        let rows = sqlx::query("SELECT * FROM pools ORDER BY name").fetch_all(&self.db.pool).await?;
        rows.iter().map(Pool::from_row).collect()
    }

    pub async fn entitle(&self, actor: &Actor, pool_id: &str, kind: PrincipalKind, name: &str) -> Result<()> {
        actor.require_admin()?;
        let pool = self.pool(pool_id).await?;
        let principal = match kind {
            PrincipalKind::User => self.user_by_name(name).await?.id,
            PrincipalKind::Group => self.group_id(name).await?,
        };
        sqlx::query("INSERT INTO entitlements (pool_id, principal_kind, principal_id) VALUES ($1, $2, $3)")
            .bind(&pool.id)
            .bind(kind.as_str())
            .bind(&principal)
            .execute(&self.db.pool)
            .await
            .map_err(|e| conflict(e, &format!("entitlement of {name}")))?;
        self.audit(&actor.name, "pool.entitle", &pool.name, &format!("{} {name}", kind.as_str())).await
    }

    pub async fn unentitle(
        &self,
        actor: &Actor,
        pool_id: &str,
        kind: PrincipalKind,
        name: &str,
    ) -> Result<()> {
        actor.require_admin()?;
        let pool = self.pool(pool_id).await?;
        let principal = match kind {
            PrincipalKind::User => self.user_by_name(name).await?.id,
            PrincipalKind::Group => self.group_id(name).await?,
        };
        sqlx::query(
            "DELETE FROM entitlements WHERE pool_id = $1 AND principal_kind = $2 AND principal_id = $3",
        )
        .bind(&pool.id)
        .bind(kind.as_str())
        .bind(&principal)
        .execute(&self.db.pool)
        .await?;
        self.audit(&actor.name, "pool.unentitle", &pool.name, &format!("{} {name}", kind.as_str())).await
    }

    pub async fn entitlements(&self, pool_id: &str) -> Result<Vec<Entitlement>> {
        let rows = sqlx::query(
            "SELECT e.principal_kind AS kind, COALESCE(u.name, g.name) AS name FROM entitlements e \
             LEFT JOIN users u ON e.principal_kind = 'user' AND u.id = e.principal_id \
             LEFT JOIN user_groups g ON e.principal_kind = 'group' AND g.id = e.principal_id \
             WHERE e.pool_id = $1 ORDER BY e.principal_kind, name",
        )
        .bind(pool_id)
        .fetch_all(&self.db.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let kind =
                    if get_str(r, "kind")? == "user" { PrincipalKind::User } else { PrincipalKind::Group };
                Ok(Entitlement { kind, name: get_str(r, "name")? })
            })
            .collect()
    }

    /// Pools the user may use: entitled directly or through a group, and enabled.
    pub async fn entitled_pools(&self, actor: &Actor) -> Result<Vec<Pool>> {
        let rows = sqlx::query(
            "SELECT * FROM pools WHERE enabled = 1 AND id IN (SELECT pool_id FROM entitlements WHERE \
             (principal_kind = 'user' AND principal_id = $1) OR \
             (principal_kind = 'group' AND principal_id IN (SELECT group_id FROM group_members WHERE user_id = $1))) ORDER BY display_name",
        )
        .bind(&actor.user_id)
        .fetch_all(&self.db.pool)
        .await?;
        rows.iter().map(Pool::from_row).collect()
    }

    async fn is_entitled(&self, actor: &Actor, pool_id: &str) -> Result<bool> {
        Ok(self.entitled_pools(actor).await?.iter().any(|p| p.id == pool_id))
    }

    // ----- desktops: allocation, connection ----------------------------------------------

    /// Gives the user a desktop of the pool: theirs if they have one (persistent, or a
    /// floating one they are disconnected from), else a ready one, else a new one started on
    /// the least-loaded host that has the image.
    pub async fn request_desktop(&self, actor: &Actor, pool_id: &str) -> Result<Desktop> {
        let pool = self.pool(pool_id).await?;
        if !self.is_entitled(actor, &pool.id).await? {
            self.audit(&actor.name, "desktop.request.denied", &pool.name, "not entitled").await?;
            return Err(Error::Forbidden);
        }
        if !pool.enabled {
            return Err(Error::Invalid(format!("pool {} is disabled", pool.name)));
        }
        let desktop = retry(|| self.try_allocate(&actor.user_id, &pool)).await?;
        self.audit(
            &actor.name,
            "desktop.allocate",
            &desktop.name,
            &format!("pool={} state={}", pool.name, desktop.state.as_str()),
        )
        .await?;
        if let Err(e) = self.refill_pool(&pool).await {
            tracing::warn!(pool = %pool.name, "could not refill spares: {e}");
        }
        Ok(desktop)
    }

    async fn try_allocate(&self, user_id: &str, pool: &Pool) -> Result<Desktop> {
        let now = self.now();
        let mut tx = self.db.pool.begin().await?;
        lock_pool(&mut tx, &pool.id).await?;
        // Theirs already: a persistent desktop they own, or one they are (dis)connected from.
        let mine = sqlx::query("SELECT * FROM desktops WHERE pool_id = $1 AND (user_id = $2 OR owner_id = $2) ORDER BY created_at LIMIT 1")
            .bind(&pool.id)
            .bind(user_id)
            .fetch_optional(&mut *tx)
            .await?;
        if let Some(row) = mine {
            let desktop = Desktop::from_row(&row)?;
            if desktop.state == DesktopState::Failed {
                // Theirs, and failing: started again for them once its wait is over.
                self.start_failed_again(&mut tx, pool, &desktop, Some(user_id), now).await?;
                resume_or_start_session(&mut tx, &desktop.id, user_id, now).await?;
            } else if matches!(desktop.state, DesktopState::Disconnected | DesktopState::Ready) {
                sqlx::query("UPDATE desktops SET state = 'in_use', user_id = $1, state_since = $2, last_activity = $2, generation = generation + 1 WHERE id = $3")
                    .bind(user_id)
                    .bind(now)
                    .bind(&desktop.id)
                    .execute(&mut *tx)
                    .await?;
                resume_or_start_session(&mut tx, &desktop.id, user_id, now).await?;
            }
            tx.commit().await?;
            return self.desktop(&desktop.id).await;
        }
        let owner = (pool.kind == PoolKind::Persistent).then(|| user_id.to_owned());
        let ready = sqlx::query("SELECT id FROM desktops WHERE pool_id = $1 AND state = 'ready' AND user_id IS NULL AND owner_id IS NULL ORDER BY created_at, id LIMIT 1")
            .bind(&pool.id)
            .fetch_optional(&mut *tx)
            .await?;
        if let Some(row) = ready {
            let id = get_str(&row, "id")?;
            let claimed = sqlx::query(
                "UPDATE desktops SET state = 'in_use', user_id = $1, owner_id = $2, state_since = $3, last_activity = $3, generation = generation + 1 \
                 WHERE id = $4 AND state = 'ready' AND user_id IS NULL",
            )
            .bind(user_id)
            .bind(owner)
            .bind(now)
            .bind(&id)
            .execute(&mut *tx)
            .await?;
            if claimed.rows_affected() != 1 {
                // Someone else won this desktop: try again from the start.
                tx.rollback().await?;
                return Err(Error::Conflict("desktop claimed concurrently".into()));
            }
            resume_or_start_session(&mut tx, &id, user_id, now).await?;
            tx.commit().await?;
            return self.desktop(&id).await;
        }
        let id = match self.provision(&mut tx, pool, Some(user_id), owner.as_deref()).await {
            Err(Error::PoolExhausted(_)) => {
                // Full: a failed desktop that nobody holds is started again for this user.
                let failed = sqlx::query("SELECT * FROM desktops WHERE pool_id = $1 AND state = 'failed' AND user_id IS NULL AND owner_id IS NULL ORDER BY retry_at, id LIMIT 1")
                    .bind(&pool.id)
                    .fetch_optional(&mut *tx)
                    .await?;
                let Some(row) = failed else { return Err(Error::PoolExhausted(pool.name.clone())) };
                let desktop = Desktop::from_row(&row)?;
                sqlx::query("UPDATE desktops SET owner_id = $1 WHERE id = $2")
                    .bind(owner.as_deref())
                    .bind(&desktop.id)
                    .execute(&mut *tx)
                    .await?;
                self.start_failed_again(&mut tx, pool, &desktop, Some(user_id), now).await?;
                desktop.id
            }
            other => other?,
        };
        resume_or_start_session(&mut tx, &id, user_id, now).await?;
        tx.commit().await?;
        self.desktop(&id).await
    }

    /// Starts a failed desktop again, in place (same id, same owner), on the least-loaded host
    /// with its image, for `user_id` (or as a spare). Refused with the host's last reason while
    /// the desktop's wait is not over: a desktop that cannot start is retried with a doubling
    /// delay, never in a loop.
    async fn start_failed_again(
        &self,
        tx: &mut Transaction<'_, Any>,
        pool: &Pool,
        desktop: &Desktop,
        user_id: Option<&str>,
        now: i64,
    ) -> Result<()> {
        if desktop.retry_at > now {
            return Err(Error::StartFailing {
                pool: pool.name.clone(),
                reason: desktop.last_error.clone().unwrap_or_else(|| "unknown".into()),
                retry_in_secs: desktop.retry_at - now,
            });
        }
        let image = image_of_pool(tx, &pool.id).await?;
        let host = choose_host(tx, &image).await?;
        let moved = sqlx::query(
            "UPDATE desktops SET state = 'provisioning', host_id = $1, user_id = $2, state_since = $3, last_activity = $3, \
             generation = generation + 1, session_port = NULL WHERE id = $4 AND state = 'failed'",
        )
        .bind(&host)
        .bind(user_id.map(str::to_owned))
        .bind(now)
        .bind(&desktop.id)
        .execute(&mut **tx)
        .await?;
        if moved.rows_affected() != 1 {
            return Err(Error::Conflict("desktop changed concurrently".into()));
        }
        queue_command(tx, &host, &desktop.id, "start", now).await
    }

    /// How long a desktop waits before its next start when it has failed `failures` times in a
    /// row before this failure: at once after a first failure (a lost VM or host is replaced
    /// without delay), then `start_retry_secs`, doubling up to `start_retry_max_secs`.
    fn retry_delay(&self, failures: i64) -> i64 {
        if failures <= 0 {
            return 0;
        }
        let base = self.settings.start_retry_secs.max(1);
        let doubled = base.saturating_mul(1 << (failures - 1).min(20));
        doubled.min(self.settings.start_retry_max_secs.max(base)) as i64
    }

    /// The desktop failed to start, or its VM or host was lost: `reason` is kept for the
    /// admin and the user, its sessions end, and its next start waits ([`Self::retry_delay`]).
    async fn mark_failed(
        &self,
        tx: &mut Transaction<'_, Any>,
        desktop_id: &str,
        reason: &str,
        session_end: &str,
        now: i64,
    ) -> Result<()> {
        let row = sqlx::query("SELECT start_failures FROM desktops WHERE id = $1")
            .bind(desktop_id)
            .fetch_optional(&mut **tx)
            .await?;
        let Some(row) = row else { return Ok(()) };
        let failures = get_i64(&row, "start_failures")?;
        sqlx::query(
            "UPDATE desktops SET state = 'failed', state_since = $1, last_error = $2, start_failures = $3, retry_at = $4 WHERE id = $5",
        )
        .bind(now)
        .bind(truncate_reason(reason))
        .bind(failures + 1)
        .bind(now + self.retry_delay(failures))
        .bind(desktop_id)
        .execute(&mut **tx)
        .await?;
        end_sessions(tx, desktop_id, session_end, now).await
    }

    /// Creates a desktop row on the least-loaded host with the image and queues its start.
    /// Runs inside the caller's transaction, after `lock_pool`.
    async fn provision(
        &self,
        tx: &mut Transaction<'_, Any>,
        pool: &Pool,
        user_id: Option<&str>,
        owner_id: Option<&str>,
    ) -> Result<String> {
        // Failed desktops count: they are started again in place, never replaced by new ones.
        let all = sqlx::query("SELECT COUNT(*) AS n FROM desktops WHERE pool_id = $1")
            .bind(&pool.id)
            .fetch_one(&mut **tx)
            .await?;
        if get_i64(&all, "n")? >= pool.max_size {
            return Err(Error::PoolExhausted(pool.name.clone()));
        }
        // Everything inside the transaction uses its connection: asking the pool for a second
        // one while holding the pool lock can exhaust the pool under load.
        let image = image_of_pool(tx, &pool.id).await?;
        let host = choose_host(tx, &image).await?;
        let now = self.now();
        let id = new_id("d");
        let name = format!("{}-{}", pool.name, &id[2..8]);
        sqlx::query(
            "INSERT INTO desktops (id, pool_id, name, host_id, state, owner_id, user_id, generation, state_since, last_activity, created_at) \
             VALUES ($1, $2, $3, $4, 'provisioning', $5, $6, 0, $7, $7, $7)",
        )
        .bind(&id)
        .bind(&pool.id)
        .bind(&name)
        .bind(&host)
        .bind(owner_id.map(str::to_owned))
        .bind(user_id.map(str::to_owned))
        .bind(now)
        .execute(&mut **tx)
        .await?;
        queue_command(tx, &host, &id, "start", now).await?;
        Ok(id)
    }

    pub async fn desktop(&self, id: &str) -> Result<Desktop> {
        let row = sqlx::query("SELECT * FROM desktops WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.db.pool)
            .await?;
        row.as_ref().map(Desktop::from_row).transpose()?.ok_or_else(|| Error::NotFound("desktop".into()))
    }

    /// The user's desktops (assigned or owned), failed ones with the reason.
    pub async fn my_desktops(&self, actor: &Actor) -> Result<Vec<Desktop>> {
        let rows = sqlx::query("SELECT * FROM desktops WHERE (user_id = $1 OR owner_id = $1) ORDER BY name")
            .bind(&actor.user_id)
            .fetch_all(&self.db.pool)
            .await?;
        rows.iter().map(Desktop::from_row).collect()
    }

    pub async fn list_desktops(&self, actor: &Actor) -> Result<Vec<Desktop>> {
        actor.require_admin()?;
        let rows = sqlx::query("SELECT * FROM desktops ORDER BY name").fetch_all(&self.db.pool).await?;
        rows.iter().map(Desktop::from_row).collect()
    }

    /// The desktop, if this user may control it (assigned to them, or owned by them).
    /// Admins get no exception: nobody gets a ticket for another user's desktop.
    async fn my_desktop(&self, actor: &Actor, desktop_id: &str, action: &str) -> Result<Desktop> {
        let desktop = match self.desktop(desktop_id).await {
            Ok(d) => d,
            Err(Error::NotFound(_)) => {
                self.audit(&actor.name, &format!("{action}.denied"), desktop_id, "no such desktop").await?;
                return Err(Error::Forbidden);
            }
            Err(e) => return Err(e),
        };
        let mine = desktop.user_id.as_deref() == Some(&actor.user_id)
            || desktop.owner_id.as_deref() == Some(&actor.user_id);
        if !mine || actor.user_id.is_empty() {
            self.audit(&actor.name, &format!("{action}.denied"), &desktop.name, "not the user's desktop")
                .await?;
            return Err(Error::Forbidden);
        }
        Ok(desktop)
    }

    /// Issues a one-time ticket for the user's desktop and the connection data that carries it.
    pub async fn connect(&self, actor: &Actor, desktop_id: &str) -> Result<Connection> {
        let desktop = self.my_desktop(actor, desktop_id, "desktop.connect").await?;
        if !matches!(desktop.state, DesktopState::InUse | DesktopState::Disconnected | DesktopState::Ready) {
            return Err(Error::NotReady(desktop.name));
        }
        let host = self.host(desktop.host_id.as_deref().unwrap_or_default()).await?;
        if host.state != "online" {
            return Err(Error::NotReady(desktop.name));
        }
        let now = self.now();
        let updated = sqlx::query(
            "UPDATE desktops SET state = 'in_use', user_id = $1, state_since = CASE WHEN state = 'in_use' THEN state_since ELSE $2 END, last_activity = $2 \
             WHERE id = $3 AND state IN ('in_use', 'disconnected', 'ready') AND (user_id = $1 OR owner_id = $1)",
        )
        .bind(&actor.user_id)
        .bind(now)
        .bind(&desktop.id)
        .execute(&self.db.pool)
        .await?;
        if updated.rows_affected() != 1 {
            return Err(Error::NotReady(desktop.name));
        }
        let mut tx = self.db.pool.begin().await?;
        resume_or_start_session(&mut tx, &desktop.id, &actor.user_id, now).await?;
        tx.commit().await?;
        let claims = TicketClaims::new(
            &actor.name,
            &desktop.id,
            &host.id,
            now as u64,
            self.settings.ticket_lifetime_secs,
        )?;
        let ticket = self.signer.issue(&claims)?;
        // The ticket id identifies the ticket in the audit log; the ticket itself is a secret.
        self.audit(
            &actor.name,
            "desktop.connect",
            &desktop.name,
            &format!("ticket={} host={}", claims.id_hex(), host.name),
        )
        .await?;
        // One session server per VM: the desktop's own port when its host reported one.
        let port_row = sqlx::query("SELECT session_port FROM desktops WHERE id = $1")
            .bind(&desktop.id)
            .fetch_one(&self.db.pool)
            .await?;
        let port = port_row.try_get::<Option<i64>, _>("session_port")?.unwrap_or(host.session_port);
        Ok(Connection {
            version: FORMAT_VERSION,
            host: host.address,
            port: u16::try_from(port).unwrap_or(0),
            cert_sha256: host.cert_sha256,
            ticket,
            desktop: desktop.name,
        })
    }

    /// Restarts the user's desktop (the host stops and starts the VM).
    pub async fn restart(&self, actor: &Actor, desktop_id: &str) -> Result<()> {
        let desktop = self.my_desktop(actor, desktop_id, "desktop.restart").await?;
        let now = self.now();
        if desktop.state == DesktopState::Failed {
            let pool = self.pool(&desktop.pool_id).await?;
            let mut tx = self.db.pool.begin().await?;
            lock_pool(&mut tx, &pool.id).await?;
            self.start_failed_again(&mut tx, &pool, &desktop, Some(&actor.user_id), now).await?;
            tx.commit().await?;
            return self.audit(&actor.name, "desktop.restart", &desktop.name, "after a failure").await;
        }
        let Some(host) = desktop.host_id.clone() else { return Err(Error::NotReady(desktop.name)) };
        let mut tx = self.db.pool.begin().await?;
        let moved = sqlx::query("UPDATE desktops SET state = 'provisioning', state_since = $1 WHERE id = $2 AND state IN ('in_use', 'disconnected', 'ready')")
            .bind(now)
            .bind(&desktop.id)
            .execute(&mut *tx)
            .await?;
        if moved.rows_affected() != 1 {
            return Err(Error::NotReady(desktop.name));
        }
        queue_command(&mut tx, &host, &desktop.id, "restart", now).await?;
        tx.commit().await?;
        self.audit(&actor.name, "desktop.restart", &desktop.name, "").await
    }

    /// The user is done with the desktop: a floating one is reverted and returned to the
    /// pool, a persistent one stays theirs.
    pub async fn release(&self, actor: &Actor, desktop_id: &str) -> Result<()> {
        let desktop = self.my_desktop(actor, desktop_id, "desktop.release").await?;
        self.end_use(&desktop, "released").await?;
        self.audit(&actor.name, "desktop.release", &desktop.name, "").await
    }

    /// Ends the desktop's session; floating desktops go to recycling, persistent ones back
    /// to their owner's `ready`.
    async fn end_use(&self, desktop: &Desktop, reason: &str) -> Result<()> {
        let pool = self.pool(&desktop.pool_id).await?;
        let now = self.now();
        let mut tx = self.db.pool.begin().await?;
        end_sessions(&mut tx, &desktop.id, reason, now).await?;
        if pool.kind == PoolKind::Floating {
            let moved = sqlx::query("UPDATE desktops SET state = 'recycling', user_id = NULL, state_since = $1 WHERE id = $2 AND state IN ('in_use', 'disconnected')")
                .bind(now)
                .bind(&desktop.id)
                .execute(&mut *tx)
                .await?;
            if let (1, Some(host)) = (moved.rows_affected(), &desktop.host_id) {
                queue_command(&mut tx, host, &desktop.id, "recycle", now).await?;
            }
        } else {
            sqlx::query("UPDATE desktops SET state = 'ready', user_id = NULL, state_since = $1 WHERE id = $2 AND state IN ('in_use', 'disconnected')")
                .bind(now)
                .bind(&desktop.id)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    // ----- sessions ----------------------------------------------------------------------

    pub async fn list_sessions(&self, actor: &Actor, live_only: bool) -> Result<Vec<Session>> {
        actor.require_admin()?;
        let filter = if live_only { "WHERE s.state <> 'ended'" } else { "" };
        let sql = format!(
            "SELECT s.*, d.name AS desktop_name, u.name AS user_name FROM sessions s JOIN desktops d ON d.id = s.desktop_id \
             JOIN users u ON u.id = s.user_id {filter} ORDER BY s.started_at DESC, s.id LIMIT 500"
        );
        // `filter` is one of two literals.
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql)).fetch_all(&self.db.pool).await?;
        rows.iter()
            .map(|r| {
                Ok(Session {
                    id: get_str(r, "id")?,
                    desktop_id: get_str(r, "desktop_id")?,
                    desktop_name: get_str(r, "desktop_name")?,
                    user_id: get_str(r, "user_id")?,
                    user_name: get_str(r, "user_name")?,
                    state: get_str(r, "state")?,
                    started_at: get_i64(r, "started_at")?,
                    ended_at: r.try_get("ended_at")?,
                    end_reason: r.try_get("end_reason")?,
                })
            })
            .collect()
    }

    /// Admin: drops the client of a live session; the desktop stays assigned (disconnected)
    /// so that its user can resume.
    pub async fn disconnect_session(&self, actor: &Actor, session_id: &str) -> Result<()> {
        actor.require_admin()?;
        let now = self.now();
        let row = sqlx::query("SELECT desktop_id FROM sessions WHERE id = $1 AND state = 'active'")
            .bind(session_id)
            .fetch_optional(&self.db.pool)
            .await?;
        let desktop_id = row
            .map(|r| get_str(&r, "desktop_id"))
            .transpose()?
            .ok_or_else(|| Error::NotFound("live session".into()))?;
        let desktop = self.desktop(&desktop_id).await?;
        let mut tx = self.db.pool.begin().await?;
        sqlx::query("UPDATE sessions SET state = 'disconnected' WHERE id = $1")
            .bind(session_id)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "UPDATE desktops SET state = 'disconnected', state_since = $1 WHERE id = $2 AND state = 'in_use'",
        )
        .bind(now)
        .bind(&desktop.id)
        .execute(&mut *tx)
        .await?;
        if let Some(host) = &desktop.host_id {
            queue_command(&mut tx, host, &desktop.id, "disconnect", now).await?;
        }
        tx.commit().await?;
        self.audit(&actor.name, "session.disconnect", &desktop.name, session_id).await
    }

    // ----- hosts -------------------------------------------------------------------------

    /// A registration token for hosts; one-time tokens work once. Returned once, stored hashed.
    pub async fn create_host_token(
        &self,
        actor: &Actor,
        description: &str,
        one_time: bool,
        lifetime_secs: i64,
    ) -> Result<String> {
        actor.require_admin()?;
        let token = format!("hrt_{}", secret::new_token());
        sqlx::query("INSERT INTO host_tokens (token_hash, description, one_time, used, created_at, expires_at) VALUES ($1, $2, $3, 0, $4, $5)")
            .bind(secret::token_hash(&token))
            .bind(description)
            .bind(i64::from(one_time))
            .bind(self.now())
            .bind(self.now() + lifetime_secs.max(1))
            .execute(&self.db.pool)
            .await?;
        self.audit(
            &actor.name,
            "host.token.create",
            description,
            if one_time { "one-time" } else { "reusable" },
        )
        .await?;
        Ok(token)
    }

    pub async fn register_host(&self, reg: &HostRegistration, client: &str) -> Result<HostRegistered> {
        let now = self.now();
        if !valid_name(&reg.name)
            || reg.address.is_empty()
            || reg.session_port == 0
            || reg.cores < 1
            || reg.memory_mib < 1
        {
            return Err(Error::Invalid("host: valid name, address, session_port, cores, memory_mib".into()));
        }
        let hash = secret::token_hash(&reg.token);
        // One-time tokens are spent by a conditional update, so two hosts cannot share one.
        let spent = sqlx::query("UPDATE host_tokens SET used = used + 1 WHERE token_hash = $1 AND expires_at > $2 AND (one_time = 0 OR used = 0)")
            .bind(&hash)
            .bind(now)
            .execute(&self.db.pool)
            .await?;
        if spent.rows_affected() != 1 {
            self.audit(&reg.name, "host.register.denied", &reg.name, client).await?;
            return Err(Error::Unauthenticated);
        }
        let credential = format!("hcr_{}", secret::new_token());
        let existing = sqlx::query("SELECT id FROM hosts WHERE name = $1")
            .bind(&reg.name)
            .fetch_optional(&self.db.pool)
            .await?;
        let id = match existing {
            Some(r) => get_str(&r, "id")?,
            None => new_id("h"),
        };
        let mut tx = self.db.pool.begin().await?;
        sqlx::query("DELETE FROM hosts WHERE id = $1").bind(&id).execute(&mut *tx).await?;
        sqlx::query(
            "INSERT INTO hosts (id, name, address, session_port, cert_sha256, credential_hash, cores, memory_mib, state, last_heartbeat, registered_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'online', $9, $9)",
        )
        .bind(&id)
        .bind(&reg.name)
        .bind(&reg.address)
        .bind(i64::from(reg.session_port))
        .bind(&reg.cert_sha256)
        .bind(secret::token_hash(&credential))
        .bind(reg.cores)
        .bind(reg.memory_mib)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        set_host_images(&mut tx, &id, &reg.images).await?;
        tx.commit().await?;
        self.audit(
            &reg.name,
            "host.register",
            &reg.name,
            &format!("{}:{} from {client}", reg.address, reg.session_port),
        )
        .await?;
        Ok(HostRegistered {
            host_id: id,
            credential,
            ticket_public_key: self.signer.public_key().to_base64(),
            heartbeat_interval_secs: self.settings.heartbeat_interval_secs,
            heartbeat_timeout_secs: self.settings.heartbeat_timeout_secs,
        })
    }

    pub async fn host_by_credential(&self, credential: &str) -> Result<Host> {
        let row = sqlx::query("SELECT * FROM hosts WHERE credential_hash = $1")
            .bind(secret::token_hash(credential))
            .fetch_optional(&self.db.pool)
            .await?;
        row.as_ref().map(Host::from_row).transpose()?.ok_or(Error::Unauthenticated)
    }

    pub async fn host(&self, id: &str) -> Result<Host> {
        let row =
            sqlx::query("SELECT * FROM hosts WHERE id = $1").bind(id).fetch_optional(&self.db.pool).await?;
        row.as_ref().map(Host::from_row).transpose()?.ok_or_else(|| Error::NotFound("host".into()))
    }

    pub async fn list_hosts(&self, actor: &Actor) -> Result<Vec<Host>> {
        actor.require_admin()?;
        let rows = sqlx::query("SELECT * FROM hosts ORDER BY name").fetch_all(&self.db.pool).await?;
        let images = sqlx::query("SELECT host_id, image_name FROM host_images ORDER BY image_name")
            .fetch_all(&self.db.pool)
            .await?;
        let counts = sqlx::query("SELECT host_id, COUNT(*) AS n FROM desktops WHERE state <> 'failed' AND host_id IS NOT NULL GROUP BY host_id")
            .fetch_all(&self.db.pool)
            .await?;
        let mut hosts: Vec<Host> = rows.iter().map(Host::from_row).collect::<Result<_>>()?;
        for h in &mut hosts {
            for r in &images {
                if get_str(r, "host_id")? == h.id {
                    h.images.push(get_str(r, "image_name")?);
                }
            }
            for r in &counts {
                if get_str(r, "host_id")? == h.id {
                    h.desktops = get_i64(r, "n")?;
                }
            }
        }
        Ok(hosts)
    }

    /// A host's heartbeat: records capacity and what runs, and hands over queued commands.
    pub async fn heartbeat(&self, host: &Host, beat: &Heartbeat) -> Result<HeartbeatReply> {
        let now = self.now();
        let mut tx = self.db.pool.begin().await?;
        sqlx::query("UPDATE hosts SET cores = $1, memory_mib = $2, last_heartbeat = $3, state = 'online' WHERE id = $4")
            .bind(beat.cores)
            .bind(beat.memory_mib)
            .bind(now)
            .bind(&host.id)
            .execute(&mut *tx)
            .await?;
        set_host_images(&mut tx, &host.id, &beat.images).await?;
        for running in &beat.desktops {
            if let Some(port) = running.port {
                sqlx::query("UPDATE desktops SET session_port = $1 WHERE id = $2 AND host_id = $3")
                    .bind(i64::from(port))
                    .bind(&running.id)
                    .bind(&host.id)
                    .execute(&mut *tx)
                    .await?;
            }
            let row = sqlx::query("SELECT state FROM desktops WHERE id = $1 AND host_id = $2")
                .bind(&running.id)
                .bind(&host.id)
                .fetch_optional(&mut *tx)
                .await?;
            match row.map(|r| get_str(&r, "state")).transpose()? {
                // Not ours (any more), or failed while the host was away: stop it.
                None => queue_command(&mut tx, &host.id, &running.id, "stop", now).await?,
                Some(s) if s == "failed" => {
                    queue_command(&mut tx, &host.id, &running.id, "stop", now).await?
                }
                Some(s) if running.connected => {
                    sqlx::query("UPDATE desktops SET last_activity = $1 WHERE id = $2")
                        .bind(now)
                        .bind(&running.id)
                        .execute(&mut *tx)
                        .await?;
                    // A disconnect still on its way to the host does not count as a return.
                    let in_flight = sqlx::query(
                        "SELECT COUNT(*) AS n FROM host_commands WHERE desktop_id = $1 AND kind = 'disconnect' AND state IN ('pending', 'sent')",
                    )
                    .bind(&running.id)
                    .fetch_one(&mut *tx)
                    .await?;
                    if s == "disconnected" && get_i64(&in_flight, "n")? == 0 {
                        // The user came back with the client: the session is live again.
                        sqlx::query("UPDATE desktops SET state = 'in_use', state_since = $1 WHERE id = $2")
                            .bind(now)
                            .bind(&running.id)
                            .execute(&mut *tx)
                            .await?;
                        sqlx::query("UPDATE sessions SET state = 'active' WHERE desktop_id = $1 AND state = 'disconnected'").bind(&running.id).execute(&mut *tx).await?;
                    }
                }
                Some(_) => {}
            }
        }
        let vanished = self.vanished_desktops(&mut tx, host, beat, now).await?;
        let rows = sqlx::query(
            "SELECT c.id, c.kind, c.desktop_id, d.name AS desktop_name, d.pool_id FROM host_commands c LEFT JOIN desktops d ON d.id = c.desktop_id \
             WHERE c.host_id = $1 AND c.state = 'pending' ORDER BY c.created_at, c.id",
        )
        .bind(&host.id)
        .fetch_all(&mut *tx)
        .await?;
        let mut commands = Vec::with_capacity(rows.len());
        for r in &rows {
            let id = get_str(r, "id")?;
            // At most once: a command is handed out by the transaction that flips it to sent.
            let taken =
                sqlx::query("UPDATE host_commands SET state = 'sent' WHERE id = $1 AND state = 'pending'")
                    .bind(&id)
                    .execute(&mut *tx)
                    .await?;
            if taken.rows_affected() != 1 {
                continue;
            }
            let kind = get_str(r, "kind")?;
            let pool_id: Option<String> = r.try_get("pool_id")?;
            let image = match (&*kind, pool_id) {
                ("start" | "restart" | "recycle", Some(pool_id)) => {
                    Some(image_of_pool(&mut tx, &pool_id).await?.into())
                }
                _ => None,
            };
            commands.push(HostCommand {
                id,
                kind,
                desktop_id: get_str(r, "desktop_id")?,
                desktop_name: r.try_get::<Option<String>, _>("desktop_name")?.unwrap_or_default(),
                image,
            });
        }
        tx.commit().await?;
        if host.state != "online" {
            self.audit(&host.name, "host.online", &host.name, "heartbeat after loss").await?;
        }
        for name in vanished {
            tracing::warn!(host = %host.name, desktop = %name, "desktop no longer runs on its host");
            self.audit(&host.name, "desktop.vanished", &name, "not running on its host").await?;
        }
        Ok(HeartbeatReply { commands, heartbeat_interval_secs: self.settings.heartbeat_interval_secs })
    }

    /// Desktops that should run on the host but that it no longer reports (the VM died):
    /// failed, their sessions ended. Only desktops settled for two heartbeat intervals with no
    /// command in flight count, so that a heartbeat racing a start acknowledgement is harmless.
    async fn vanished_desktops(
        &self,
        tx: &mut Transaction<'_, Any>,
        host: &Host,
        beat: &Heartbeat,
        now: i64,
    ) -> Result<Vec<String>> {
        let settled = now - 2 * self.settings.heartbeat_interval_secs as i64;
        let expected = sqlx::query(
            "SELECT id, name FROM desktops d WHERE host_id = $1 AND state IN ('ready', 'in_use', 'disconnected') AND state_since < $2 \
             AND NOT EXISTS (SELECT 1 FROM host_commands c WHERE c.desktop_id = d.id AND c.state IN ('pending', 'sent'))",
        )
        .bind(&host.id)
        .bind(settled)
        .fetch_all(&mut **tx)
        .await?;
        let mut vanished = Vec::new();
        for row in &expected {
            let id = get_str(row, "id")?;
            if beat.desktops.iter().any(|d| d.id == id) {
                continue;
            }
            let reason = format!("its VM no longer runs on host {}", host.name);
            self.mark_failed(tx, &id, &reason, "vm_lost", now).await?;
            vanished.push(get_str(row, "name")?);
        }
        Ok(vanished)
    }

    /// The host finished (or failed) a command.
    pub async fn ack_command(&self, host: &Host, command_id: &str, ack: &CommandAck) -> Result<()> {
        let now = self.now();
        let row = sqlx::query(
            "SELECT kind, desktop_id FROM host_commands WHERE id = $1 AND host_id = $2 AND state = 'sent'",
        )
        .bind(command_id)
        .bind(&host.id)
        .fetch_optional(&self.db.pool)
        .await?
        .ok_or_else(|| Error::NotFound("command".into()))?;
        let kind = get_str(&row, "kind")?;
        let desktop_id = get_str(&row, "desktop_id")?;
        let mut tx = self.db.pool.begin().await?;
        sqlx::query("UPDATE host_commands SET state = $1, error = $2 WHERE id = $3")
            .bind(if ack.ok { "done" } else { "failed" })
            .bind(ack.error.clone())
            .bind(command_id)
            .execute(&mut *tx)
            .await?;
        if !ack.ok {
            sqlx::query("UPDATE hosts SET last_error = $1 WHERE id = $2")
                .bind(truncate_reason(&format!(
                    "{kind} {desktop_id}: {}",
                    ack.error.as_deref().unwrap_or("no reason given")
                )))
                .bind(&host.id)
                .execute(&mut *tx)
                .await?;
        }
        if let (true, Some(port)) = (ack.ok, ack.port) {
            sqlx::query("UPDATE desktops SET session_port = $1 WHERE id = $2 AND host_id = $3")
                .bind(i64::from(port))
                .bind(&desktop_id)
                .bind(&host.id)
                .execute(&mut *tx)
                .await?;
        }
        match (kind.as_str(), ack.ok) {
            ("start" | "restart", true) => {
                sqlx::query(
                    "UPDATE desktops SET state = CASE WHEN user_id IS NULL THEN 'ready' ELSE 'in_use' END, state_since = $1, last_activity = $1, \
                     start_failures = 0, last_error = NULL, retry_at = 0 WHERE id = $2 AND state = 'provisioning'",
                )
                .bind(now)
                .bind(&desktop_id)
                .execute(&mut *tx)
                .await?;
            }
            ("recycle", true) => {
                sqlx::query("UPDATE desktops SET state = 'ready', user_id = NULL, state_since = $1 WHERE id = $2 AND state = 'recycling'")
                    .bind(now)
                    .bind(&desktop_id)
                    .execute(&mut *tx)
                    .await?;
            }
            ("start" | "restart" | "recycle", false) => {
                let reason = ack.error.as_deref().unwrap_or("the host gave no reason");
                self.mark_failed(&mut tx, &desktop_id, reason, "start_failed", now).await?;
            }
            _ => {}
        }
        tx.commit().await?;
        if !ack.ok {
            self.audit(
                &host.name,
                &format!("host.{kind}.failed"),
                &desktop_id,
                ack.error.as_deref().unwrap_or(""),
            )
            .await?;
        }
        Ok(())
    }

    // ----- policy ------------------------------------------------------------------------

    /// One round of background work: lost hosts, idle and disconnected desktops, spares.
    /// Safe to run from several brokers at once (every transition is a conditional update).
    pub async fn maintain(&self) -> Result<()> {
        self.reap_lost_hosts().await?;
        self.apply_session_policy().await?;
        for pool in self.list_pools().await?.into_iter().filter(|p| p.enabled) {
            if let Err(e) = self.refill_pool(&pool).await {
                tracing::warn!(pool = %pool.name, "could not refill: {e}");
            }
        }
        Ok(())
    }

    async fn reap_lost_hosts(&self) -> Result<()> {
        let now = self.now();
        let cutoff = now - self.settings.heartbeat_timeout_secs as i64;
        let rows = sqlx::query("SELECT id, name FROM hosts WHERE state = 'online' AND last_heartbeat < $1")
            .bind(cutoff)
            .fetch_all(&self.db.pool)
            .await?;
        for r in rows {
            let (id, name) = (get_str(&r, "id")?, get_str(&r, "name")?);
            let mut tx = self.db.pool.begin().await?;
            let lost = sqlx::query(
                "UPDATE hosts SET state = 'lost' WHERE id = $1 AND state = 'online' AND last_heartbeat < $2",
            )
            .bind(&id)
            .bind(cutoff)
            .execute(&mut *tx)
            .await?;
            if lost.rows_affected() != 1 {
                continue;
            }
            let desktops = sqlx::query("SELECT id FROM desktops WHERE host_id = $1 AND state <> 'failed'")
                .bind(&id)
                .fetch_all(&mut *tx)
                .await?;
            let reason =
                format!("host {name} was lost: no heartbeat for {} s", self.settings.heartbeat_timeout_secs);
            for d in &desktops {
                self.mark_failed(&mut tx, &get_str(d, "id")?, &reason, "host_lost", now).await?;
            }
            sqlx::query("UPDATE host_commands SET state = 'dropped' WHERE host_id = $1 AND state IN ('pending', 'sent')").bind(&id).execute(&mut *tx).await?;
            tx.commit().await?;
            tracing::warn!(host = %name, desktops = desktops.len(), "host lost: no heartbeat");
            self.audit("system", "host.lost", &name, &format!("{} desktops failed", desktops.len())).await?;
        }
        Ok(())
    }

    async fn apply_session_policy(&self) -> Result<()> {
        let now = self.now();
        for pool in self.list_pools().await? {
            // Idle: in use but no client seen for idle_timeout → disconnected.
            let idle = sqlx::query(
                "SELECT id FROM desktops WHERE pool_id = $1 AND state = 'in_use' AND last_activity < $2",
            )
            .bind(&pool.id)
            .bind(now - pool.idle_timeout_secs)
            .fetch_all(&self.db.pool)
            .await?;
            for r in &idle {
                let id = get_str(r, "id")?;
                let moved = sqlx::query("UPDATE desktops SET state = 'disconnected', state_since = $1 WHERE id = $2 AND state = 'in_use' AND last_activity < $3")
                    .bind(now)
                    .bind(&id)
                    .bind(now - pool.idle_timeout_secs)
                    .execute(&self.db.pool)
                    .await?;
                if moved.rows_affected() == 1 {
                    sqlx::query("UPDATE sessions SET state = 'disconnected' WHERE desktop_id = $1 AND state = 'active'").bind(&id).execute(&self.db.pool).await?;
                    self.audit("system", "desktop.idle", &id, "disconnected by idle policy").await?;
                }
            }
            // Disconnected for disconnect_timeout → recycled (floating) or back to the owner.
            let stale = sqlx::query(
                "SELECT * FROM desktops WHERE pool_id = $1 AND state = 'disconnected' AND state_since < $2",
            )
            .bind(&pool.id)
            .bind(now - pool.disconnect_timeout_secs)
            .fetch_all(&self.db.pool)
            .await?;
            for r in &stale {
                let desktop = Desktop::from_row(r)?;
                self.end_use(&desktop, "disconnect_timeout").await?;
                self.audit("system", "desktop.recycle", &desktop.name, "disconnected too long").await?;
            }
            // A floating desktop that failed under its user stays theirs (they see why) until
            // they come back or the disconnect timeout passes; then the pool may start it again.
            if pool.kind == PoolKind::Floating {
                sqlx::query("UPDATE desktops SET user_id = NULL WHERE pool_id = $1 AND state = 'failed' AND user_id IS NOT NULL AND state_since < $2")
                    .bind(&pool.id)
                    .bind(now - pool.disconnect_timeout_secs)
                    .execute(&self.db.pool)
                    .await?;
            }
        }
        Ok(())
    }

    /// Starts desktops until the pool has `spares` unassigned ones and at least `min_size`
    /// that are not failed, and starts failed unassigned desktops again once their wait is over.
    /// Every desktop counts against `max_size`, failed ones too.
    pub async fn refill_pool(&self, pool: &Pool) -> Result<usize> {
        let mut started = 0;
        for _ in 0..pool.max_size.max(0) {
            let made = retry(|| async {
                let now = self.now();
                let mut tx = self.db.pool.begin().await?;
                lock_pool(&mut tx, &pool.id).await?;
                let counts = sqlx::query(
                    "SELECT COUNT(*) AS total, COUNT(CASE WHEN state <> 'failed' THEN 1 END) AS working, \
                     COUNT(CASE WHEN state IN ('ready', 'provisioning') AND user_id IS NULL AND owner_id IS NULL THEN 1 END) AS spare \
                     FROM desktops WHERE pool_id = $1",
                )
                .bind(&pool.id)
                .fetch_one(&mut *tx)
                .await?;
                let (total, working, spare) =
                    (get_i64(&counts, "total")?, get_i64(&counts, "working")?, get_i64(&counts, "spare")?);
                let due = sqlx::query("SELECT * FROM desktops WHERE pool_id = $1 AND state = 'failed' AND user_id IS NULL AND owner_id IS NULL AND retry_at <= $2 ORDER BY retry_at, id LIMIT 1")
                    .bind(&pool.id)
                    .bind(now)
                    .fetch_optional(&mut *tx)
                    .await?;
                if let Some(row) = due {
                    self.start_failed_again(&mut tx, pool, &Desktop::from_row(&row)?, None, now).await?;
                } else if total < pool.max_size && (spare < pool.spares || working < pool.min_size) {
                    self.provision(&mut tx, pool, None, None).await?;
                } else {
                    tx.rollback().await?;
                    return Ok(false);
                }
                tx.commit().await?;
                Ok(true)
            })
            .await?;
            if !made {
                break;
            }
            started += 1;
        }
        if started > 0 {
            self.audit("system", "pool.refill", &pool.name, &format!("started {started}")).await?;
        }
        Ok(started)
    }
}

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

async fn load_or_create_signer(db: &Db) -> Result<TicketSigner> {
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

/// Serializes allocations within one pool (row lock on PostgreSQL, write lock on SQLite).
async fn lock_pool(tx: &mut Transaction<'_, Any>, pool_id: &str) -> Result<()> {
    sqlx::query("UPDATE pools SET alloc_seq = alloc_seq + 1 WHERE id = $1")
        .bind(pool_id)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

async fn image_of_pool(tx: &mut Transaction<'_, Any>, pool_id: &str) -> Result<Image> {
    let row = sqlx::query("SELECT i.* FROM images i JOIN pools p ON p.image_id = i.id WHERE p.id = $1")
        .bind(pool_id)
        .fetch_optional(&mut **tx)
        .await?;
    row.as_ref().map(Image::from_row).transpose()?.ok_or_else(|| Error::NotFound("image of pool".into()))
}

/// The online host with the image and the lowest memory load that still fits the image.
async fn choose_host(tx: &mut Transaction<'_, Any>, image: &Image) -> Result<String> {
    let hosts = sqlx::query(
        "SELECT h.id, h.name, h.memory_mib FROM hosts h JOIN host_images hi ON hi.host_id = h.id WHERE h.state = 'online' AND hi.image_name = $1 ORDER BY h.name",
    )
    .bind(&image.name)
    .fetch_all(&mut **tx)
    .await?;
    // Summed by the database: one row per host, not one per desktop.
    let used = sqlx::query(
        "SELECT d.host_id, CAST(SUM(i.memory_mib) AS BIGINT) AS memory_mib FROM desktops d JOIN pools p ON p.id = d.pool_id \
         JOIN images i ON i.id = p.image_id WHERE d.state <> 'failed' AND d.host_id IS NOT NULL GROUP BY d.host_id",
    )
    .fetch_all(&mut **tx)
    .await?;
    let mut load: HashMap<String, i64> = HashMap::new();
    for r in &used {
        load.insert(get_str(r, "host_id")?, get_i64(r, "memory_mib")?);
    }
    let mut best: Option<(f64, String)> = None;
    for h in &hosts {
        let id = get_str(h, "id")?;
        let capacity = get_i64(h, "memory_mib")?.max(1);
        let used = load.get(&id).copied().unwrap_or(0);
        if used + image.memory_mib > capacity {
            continue;
        }
        let ratio = used as f64 / capacity as f64;
        if best.as_ref().is_none_or(|(b, _)| ratio < *b) {
            best = Some((ratio, id));
        }
    }
    best.map(|(_, id)| id).ok_or_else(|| Error::NoCapacity(image.name.clone()))
}

async fn queue_command(
    tx: &mut Transaction<'_, Any>,
    host_id: &str,
    desktop_id: &str,
    kind: &str,
    now: i64,
) -> Result<()> {
    sqlx::query("INSERT INTO host_commands (id, host_id, desktop_id, kind, state, created_at) VALUES ($1, $2, $3, $4, 'pending', $5)")
        .bind(format!("c-{now:012}-{}", secret::random_hex(6)))
        .bind(host_id)
        .bind(desktop_id)
        .bind(kind)
        .bind(now)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

async fn set_host_images(tx: &mut Transaction<'_, Any>, host_id: &str, images: &[String]) -> Result<()> {
    sqlx::query("DELETE FROM host_images WHERE host_id = $1").bind(host_id).execute(&mut **tx).await?;
    let mut seen = std::collections::HashSet::new();
    for image in images.iter().filter(|i| seen.insert(i.as_str())) {
        sqlx::query("INSERT INTO host_images (host_id, image_name) VALUES ($1, $2)")
            .bind(host_id)
            .bind(image)
            .execute(&mut **tx)
            .await?;
    }
    Ok(())
}

async fn resume_or_start_session(
    tx: &mut Transaction<'_, Any>,
    desktop_id: &str,
    user_id: &str,
    now: i64,
) -> Result<()> {
    let resumed = sqlx::query(
        "UPDATE sessions SET state = 'active' WHERE desktop_id = $1 AND user_id = $2 AND state <> 'ended'",
    )
    .bind(desktop_id)
    .bind(user_id)
    .execute(&mut **tx)
    .await?;
    if resumed.rows_affected() == 0 {
        sqlx::query("INSERT INTO sessions (id, desktop_id, user_id, state, started_at) VALUES ($1, $2, $3, 'active', $4)")
            .bind(new_id("s"))
            .bind(desktop_id)
            .bind(user_id)
            .bind(now)
            .execute(&mut **tx)
            .await?;
    }
    Ok(())
}

async fn end_sessions(tx: &mut Transaction<'_, Any>, desktop_id: &str, reason: &str, now: i64) -> Result<()> {
    sqlx::query("UPDATE sessions SET state = 'ended', ended_at = $1, end_reason = $2 WHERE desktop_id = $3 AND state <> 'ended'")
        .bind(now)
        .bind(reason)
        .bind(desktop_id)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Runs an operation again while it loses races (lock contention, a concurrent claim).
async fn retry<T, F, Fut>(mut op: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let mut attempt = 0;
    loop {
        attempt += 1;
        match op().await {
            Err(e)
                if attempt < ALLOC_ATTEMPTS
                    && (is_retryable(&e) || matches!(e, Error::Conflict(_)) || is_unique(&e)) =>
            {
                tokio::time::sleep(Duration::from_millis(2 * u64::from(attempt.min(25)))).await;
            }
            other => return other,
        }
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

fn is_unique(e: &Error) -> bool {
    matches!(e, Error::Db(db) if is_unique_violation(db))
}

fn conflict(e: sqlx::Error, what: &str) -> Error {
    if is_unique_violation(&e) { Error::Conflict(what.to_owned()) } else { e.into() }
}

fn pool_detail(spec: &PoolSpec) -> String {
    format!(
        "kind={} image={} min={} max={} spares={} idle={}s disconnect={}s",
        spec.kind.as_str(),
        spec.image,
        spec.min_size,
        spec.max_size,
        spec.spares,
        spec.idle_timeout_secs,
        spec.disconnect_timeout_secs
    )
}

async fn hash_blocking(password: String) -> Result<String> {
    tokio::task::spawn_blocking(move || secret::hash_password(&password))
        .await
        .map_err(|e| Error::Internal(e.to_string()))?
}

/// Fixed-window login limits, per user name (failures) and per client address (attempts).
/// In memory: with several brokers each enforces its own limits.
#[derive(Debug, Default)]
struct RateLimiter {
    user_failures: HashMap<String, (u64, u32)>,
    ip_attempts: HashMap<String, (u64, u32)>,
}

impl RateLimiter {
    fn check(&mut self, s: &BrokerSettings, user: &str, ip: &str, now: u64) -> Result<()> {
        let window = s.login_window_secs;
        self.user_failures.retain(|_, (start, _)| now < *start + window);
        self.ip_attempts.retain(|_, (start, _)| now < *start + window);
        let entry = self.ip_attempts.entry(ip.to_owned()).or_insert((now, 0));
        entry.1 += 1;
        if entry.1 > s.login_attempts_per_ip {
            return Err(Error::RateLimited);
        }
        if self.user_failures.get(user).is_some_and(|(_, n)| *n >= s.login_failures_per_user) {
            return Err(Error::RateLimited);
        }
        Ok(())
    }

    fn failed(&mut self, user: &str, now: u64) {
        self.user_failures.entry(user.to_owned()).or_insert((now, 0)).1 += 1;
    }

    fn succeeded(&mut self, user: &str) {
        self.user_failures.remove(user);
    }
}
