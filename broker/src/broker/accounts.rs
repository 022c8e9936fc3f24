//! Users, groups, logins and the tokens that keep a login.

use std::collections::HashMap;

use sqlx::Row;

use super::{Broker, BrokerSettings, conflict};
use crate::auth::ExternalIdentity;
use crate::db::{get_i64, get_str, new_id};
use crate::error::{Error, Result};
use crate::model::{Actor, Group, User, valid_name};
use crate::secret;

impl Broker {
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
        // A new password ends every browser session and API token of the old one.
        let ended =
            sqlx::query("DELETE FROM auth_tokens WHERE user_id = (SELECT id FROM users WHERE name = $1)")
                .bind(name)
                .execute(&self.db.pool)
                .await?
                .rows_affected();
        self.audit(&actor.name, "user.password", name, &format!("{ended} sessions ended")).await
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
        let source: String = sqlx::query("SELECT source FROM user_groups WHERE id = $1")
            .bind(&group_id)
            .fetch_one(&self.db.pool)
            .await
            .and_then(|r| r.try_get("source"))?;
        if source != "local" {
            return Err(Error::Invalid(format!(
                "group {group} comes from the directory ({source}): its members are set there, at each sign-in"
            )));
        }
        let user = self.user_by_name(user).await?;
        sqlx::query("INSERT INTO group_members (group_id, user_id) VALUES ($1, $2)")
            .bind(&group_id)
            .bind(&user.id)
            .execute(&self.db.pool)
            .await
            .map_err(|e| conflict(e, &format!("{} in {group}", user.name)))?;
        self.audit(&actor.name, "group.member.add", group, &user.name).await
    }

    /// A group's id; a group the broker does not have yet but the directory does is made
    /// (as the directory's), so that administrators entitle directory groups before any of
    /// their members has signed in.
    pub(super) async fn group_or_directory_group(&self, name: &str) -> Result<String> {
        match self.group_id(name).await {
            Err(Error::NotFound(what)) => {
                let Some(directory) = &self.directory else { return Err(Error::NotFound(what)) };
                match directory.group_exists(name).await {
                    Ok(true) => {}
                    Ok(false) => {
                        return Err(Error::NotFound(format!(
                            "{what}: neither the broker nor the directory has it"
                        )));
                    }
                    Err(e) => {
                        tracing::warn!("looking up a directory group: {e}");
                        return Err(Error::Unavailable("the directory".into()));
                    }
                }
                self.external_group("ldap", name)
                    .await?
                    .ok_or_else(|| Error::Conflict(format!("group {name} is a local group")))
            }
            other => other,
        }
    }

    pub(super) async fn group_id(&self, name: &str) -> Result<String> {
        let row = sqlx::query("SELECT id FROM user_groups WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.db.pool)
            .await?;
        row.map(|r| get_str(&r, "id")).transpose()?.ok_or_else(|| Error::NotFound(format!("group {name}")))
    }

    pub async fn list_groups(&self, actor: &Actor) -> Result<Vec<Group>> {
        actor.require_admin()?;
        let groups = sqlx::query("SELECT id, name, source FROM user_groups ORDER BY name")
            .fetch_all(&self.db.pool)
            .await?;
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
                Ok(Group { id, name: get_str(g, "name")?, source: get_str(g, "source")?, members: names })
            })
            .collect()
    }
}

impl Broker {
    /// Checks a user name and password, rate-limited per user name and per client address.
    ///
    /// A local account's password is checked against its argon2id hash. A name the broker has
    /// as a directory account, or does not know at all, goes to the LDAP directory when one is
    /// configured ([`crate::auth::ldap`]); a directory sign-in then updates the user's row and
    /// groups ([`Self::sign_in_external`]). Unknown names without a directory are checked
    /// against a dummy hash, so that timing does not tell which names exist.
    pub async fn login(&self, name: &str, password: &str, client: &str) -> Result<User> {
        let now = self.clock.now();
        // The attempt counts as a failure from here (a success takes it back): requests in
        // parallel cannot pass the limit while their passwords are being checked.
        self.limiter.lock().expect("limiter lock").check(&self.settings, name, client, now)?;
        let row = sqlx::query("SELECT * FROM users WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.db.pool)
            .await?;
        let (user, hash) = match &row {
            Some(r) => (Some(User::from_row(r)?), r.try_get::<Option<String>, _>("password_hash")?),
            None => (None, None),
        };
        // Password hashing and directory binds are costly: only so many at once, however
        // many come.
        let slot = tokio::time::timeout(VERIFY_WAIT, self.verify_slots.acquire())
            .await
            .map_err(|_| Error::RateLimited)?
            .map_err(|e| Error::Internal(e.to_string()))?;
        let directory = match (&user, &self.directory) {
            (Some(u), Some(d)) if u.source == "ldap" => Some(d.clone()),
            (None, Some(d)) => Some(d.clone()),
            _ => None,
        };
        let verified = match directory {
            Some(directory) => match directory.authenticate(name, password).await {
                Ok(Some(identity)) => {
                    drop(slot);
                    let user = self.sign_in_external(&identity).await?;
                    self.limiter.lock().expect("limiter lock").succeeded(name, client);
                    self.audit(&user.name, "login", &user.name, &format!("{client} (directory)")).await?;
                    return Ok(user);
                }
                Ok(None) => false,
                Err(e) => {
                    // Not the user's failure: the attempt does not count against them.
                    self.limiter.lock().expect("limiter lock").undo(name, client);
                    tracing::warn!("directory sign-in: {e}");
                    self.audit("directory", "login.error", "directory", &e.to_string()).await?;
                    return Err(Error::Unavailable("the directory".into()));
                }
            },
            None => {
                let local = user.as_ref().is_some_and(|u| u.source == "local");
                let hash = hash.filter(|_| local);
                let password = password.to_owned();
                tokio::task::spawn_blocking(move || {
                    // An account without a password costs the same time as a wrong password.
                    let checked =
                        secret::verify_password(&password, hash.as_deref().unwrap_or(secret::dummy_hash()));
                    checked && hash.is_some()
                })
                .await
                .map_err(|e| Error::Internal(e.to_string()))?
            }
        };
        drop(slot);
        match user {
            Some(user) if verified => {
                self.limiter.lock().expect("limiter lock").succeeded(name, client);
                self.audit(&user.name, "login", &user.name, client).await?;
                Ok(user)
            }
            Some(user) => {
                self.audit(&user.name, "login.failed", &user.name, client).await?;
                Err(Error::Unauthenticated)
            }
            // What was typed as a name may be a password typed in the wrong field: not kept.
            None => {
                self.audit("unknown user", "login.failed", "unknown user", client).await?;
                Err(Error::Unauthenticated)
            }
        }
    }

    /// Makes or updates the user a directory (or another identity source) vouched for, and
    /// their memberships of that source's groups; the caller then gives them a session.
    ///
    /// - A local account of the same name is never taken over: the sign-in is refused.
    /// - The user's display name, DN and (when the source says) administrator flag follow
    ///   the source at every sign-in.
    /// - The source's groups are made as they are first seen (`user_groups.source`); a local
    ///   group of the same name is left alone (a directory cannot put people in it). The user's
    ///   memberships of the source's groups become exactly the source's list; memberships an
    ///   administrator gave in local groups stay.
    pub async fn sign_in_external(&self, identity: &ExternalIdentity) -> Result<User> {
        let source = identity.source;
        sqlx::query(
            "INSERT INTO users (id, name, display_name, password_hash, source, is_admin, created_at, external_id) \
             VALUES ($1, $2, $3, NULL, $4, $5, $6, $7) ON CONFLICT (name) DO NOTHING",
        )
        .bind(new_id("u"))
        .bind(&identity.name)
        .bind(&identity.display_name)
        .bind(source)
        .bind(i64::from(identity.is_admin.unwrap_or(false)))
        .bind(self.now())
        .bind(&identity.external_id)
        .execute(&self.db.pool)
        .await?;
        let user = self.user_by_name(&identity.name).await?;
        if user.source != source {
            tracing::warn!(user = %user.name, "a {source} sign-in for a {} account of the same name is refused", user.source);
            self.audit(
                &user.name,
                "login.failed",
                &user.name,
                &format!("a {} account, not {source}", user.source),
            )
            .await?;
            return Err(Error::Unauthenticated);
        }
        sqlx::query(
            "UPDATE users SET display_name = $1, external_id = $2, is_admin = COALESCE($3, is_admin) WHERE id = $4",
        )
        .bind(&identity.display_name)
        .bind(&identity.external_id)
        .bind(identity.is_admin.map(i64::from))
        .bind(&user.id)
        .execute(&self.db.pool)
        .await?;
        let mut joined = Vec::new();
        for group in &identity.groups {
            if let Some(id) = self.external_group(source, group).await? {
                sqlx::query(
                    "INSERT INTO group_members (group_id, user_id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                )
                .bind(&id)
                .bind(&user.id)
                .execute(&self.db.pool)
                .await?;
                joined.push(id);
            }
        }
        let current = sqlx::query(
            "SELECT m.group_id FROM group_members m JOIN user_groups g ON g.id = m.group_id \
             WHERE m.user_id = $1 AND g.source = $2",
        )
        .bind(&user.id)
        .bind(source)
        .fetch_all(&self.db.pool)
        .await?;
        for row in current {
            let id = get_str(&row, "group_id")?;
            if !joined.contains(&id) {
                sqlx::query("DELETE FROM group_members WHERE group_id = $1 AND user_id = $2")
                    .bind(&id)
                    .bind(&user.id)
                    .execute(&self.db.pool)
                    .await?;
            }
        }
        self.user_by_id(&user.id).await
    }

    /// The id of `source`'s group `name`, made if it is new; `None` when a group of that name
    /// belongs to another source.
    async fn external_group(&self, source: &str, name: &str) -> Result<Option<String>> {
        sqlx::query("INSERT INTO user_groups (id, name, created_at, source) VALUES ($1, $2, $3, $4) ON CONFLICT (name) DO NOTHING")
            .bind(new_id("g"))
            .bind(name)
            .bind(self.now())
            .bind(source)
            .execute(&self.db.pool)
            .await?;
        let row = sqlx::query("SELECT id, source FROM user_groups WHERE name = $1")
            .bind(name)
            .fetch_one(&self.db.pool)
            .await?;
        if get_str(&row, "source")? != source {
            tracing::warn!(
                group = name,
                "a local group has the name of a {source} group: its members stay as they are"
            );
            return Ok(None);
        }
        Ok(Some(get_str(&row, "id")?))
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
}

async fn hash_blocking(password: String) -> Result<String> {
    tokio::task::spawn_blocking(move || secret::hash_password(&password))
        .await
        .map_err(|e| Error::Internal(e.to_string()))?
}

/// How long a login waits for a password check to be free before it is turned away.
const VERIFY_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// How many times the per-source failure limit a user name may fail from all sources together
/// in a window (a guess spread over many addresses).
const DISTRIBUTED_FACTOR: u32 = 10;

/// Fixed-window login limits, in memory (with several brokers each enforces its own):
/// - attempts per client source (an IPv4 address, an IPv6 /64);
/// - failures per user name *and source*: a guesser locks out its own source, not the user;
/// - failures per user name from every source, [`DISTRIBUTED_FACTOR`] times higher.
///
/// An attempt counts as a failure when it starts; a success takes its own count back and
/// clears its source's.
#[derive(Debug, Default)]
pub(super) struct RateLimiter {
    failures: HashMap<(String, String), (u64, u32)>,
    user_failures: HashMap<String, (u64, u32)>,
    source_attempts: HashMap<String, (u64, u32)>,
    /// Host registrations that were (or may yet be) refused, per source.
    registrations: HashMap<String, (u64, u32)>,
}

/// Refused host registrations per source and window before the source is turned away: the
/// endpoint answers anyone, and each refusal is audited.
pub(super) const REFUSED_REGISTRATIONS_PER_SOURCE: u32 = 20;

/// The bucket a client address counts in: an IPv6 address by its /64 (one host has many).
fn source_bucket(client: &str) -> String {
    match client.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V6(v6)) if v6.to_ipv4_mapped().is_none() => {
            let mut octets = v6.octets();
            octets[8..].fill(0);
            format!("{}/64", std::net::Ipv6Addr::from(octets))
        }
        Ok(std::net::IpAddr::V6(v6)) => v6.to_ipv4_mapped().map(|v4| v4.to_string()).unwrap_or_default(),
        _ => client.to_owned(),
    }
}

impl RateLimiter {
    fn check(&mut self, s: &BrokerSettings, user: &str, client: &str, now: u64) -> Result<()> {
        let window = s.login_window_secs;
        let live = |(start, _): &mut (u64, u32)| now < *start + window;
        self.failures.retain(|_, v| live(v));
        self.user_failures.retain(|_, v| live(v));
        self.source_attempts.retain(|_, v| live(v));
        let source = source_bucket(client);
        let attempts = self.source_attempts.entry(source.clone()).or_insert((now, 0));
        attempts.1 += 1;
        if attempts.1 > s.login_attempts_per_ip {
            return Err(Error::RateLimited);
        }
        let key = (user.to_owned(), source);
        let here = self.failures.get(&key).map_or(0, |(_, n)| *n);
        let everywhere = self.user_failures.get(user).map_or(0, |(_, n)| *n);
        if here >= s.login_failures_per_user
            || everywhere >= s.login_failures_per_user.saturating_mul(DISTRIBUTED_FACTOR)
        {
            return Err(Error::RateLimited);
        }
        self.failures.entry(key).or_insert((now, 0)).1 += 1;
        self.user_failures.entry(user.to_owned()).or_insert((now, 0)).1 += 1;
        Ok(())
    }

    /// A host registration from `client` may go on; it counts as refused until
    /// [`Self::registered`] takes it back.
    pub(super) fn check_registration(&mut self, s: &BrokerSettings, client: &str, now: u64) -> Result<()> {
        let window = s.login_window_secs;
        self.registrations.retain(|_, (start, _)| now < *start + window);
        let entry = self.registrations.entry(source_bucket(client)).or_insert((now, 0));
        if entry.1 >= REFUSED_REGISTRATIONS_PER_SOURCE {
            return Err(Error::RateLimited);
        }
        entry.1 += 1;
        Ok(())
    }

    pub(super) fn registered(&mut self, client: &str) {
        if let Some((_, n)) = self.registrations.get_mut(&source_bucket(client)) {
            *n = n.saturating_sub(1);
        }
    }

    /// Takes an attempt back that was not the user's to fail (the directory was unreachable).
    fn undo(&mut self, user: &str, client: &str) {
        let source = source_bucket(client);
        if let Some((_, n)) = self.failures.get_mut(&(user.to_owned(), source.clone())) {
            *n = n.saturating_sub(1);
        }
        if let Some((_, n)) = self.user_failures.get_mut(user) {
            *n = n.saturating_sub(1);
        }
        if let Some((_, n)) = self.source_attempts.get_mut(&source) {
            *n = n.saturating_sub(1);
        }
    }

    fn succeeded(&mut self, user: &str, client: &str) {
        self.failures.remove(&(user.to_owned(), source_bucket(client)));
        if let Some((_, n)) = self.user_failures.get_mut(user) {
            *n = n.saturating_sub(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_sources_are_their_64_and_mapped_ipv4_is_ipv4() {
        assert_eq!(source_bucket("2001:db8::1"), source_bucket("2001:db8::ffff:2"));
        assert_ne!(source_bucket("2001:db8::1"), source_bucket("2001:db8:0:1::1"));
        assert_eq!(source_bucket("::ffff:192.0.2.1"), "192.0.2.1");
        assert_eq!(source_bucket("192.0.2.1"), "192.0.2.1");
    }

    #[test]
    fn a_guesser_locks_out_its_own_source_and_a_spread_guess_the_name() {
        let s = BrokerSettings::default();
        let mut limiter = RateLimiter::default();
        for _ in 0..s.login_failures_per_user {
            limiter.check(&s, "alice", "192.0.2.1", 0).unwrap();
        }
        assert!(limiter.check(&s, "alice", "192.0.2.1", 0).is_err());
        limiter.check(&s, "alice", "198.51.100.7", 0).unwrap();
        limiter.succeeded("alice", "198.51.100.7");
        // Spread over many sources, the name's own limit holds.
        let mut passed = 0;
        for i in 0..255u8 {
            for _ in 0..s.login_failures_per_user {
                passed += u32::from(limiter.check(&s, "alice", &format!("203.0.113.{i}"), 0).is_ok());
            }
        }
        assert!(passed < s.login_failures_per_user * DISTRIBUTED_FACTOR, "{passed}");
        // A window later, all is forgotten.
        limiter.check(&s, "alice", "192.0.2.1", s.login_window_secs).unwrap();
    }
}
