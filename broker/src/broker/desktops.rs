//! A user's desktops: allocation, provisioning, connection, restart and release, and the
//! start-again of desktops that failed.

use pleiades_protocol::connfile::{Connection, FORMAT_VERSION};
use pleiades_protocol::ticket::TicketClaims;
use sqlx::{Any, Row, Transaction};

use super::tx::{
    choose_host, end_sessions, image_of_desktop, image_of_pool, lock_pool, queue_command,
    resume_or_start_session, retry_lost_races,
};
use super::{Broker, CommandKind, truncate_reason};
use crate::db::{get_i64, get_str, new_id};
use crate::error::{Error, Result};
use crate::model::{Actor, Desktop, DesktopState, HostState, Pool, PoolKind, usb_auto_for_client};

impl Broker {
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
        let desktop = retry_lost_races(|| self.try_allocate(&actor.user_id, &pool)).await?;
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
                sqlx::query("UPDATE desktops SET state = $1, user_id = $2, state_since = $3, last_activity = $3 WHERE id = $4")
                    .bind(DesktopState::InUse.as_str())
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
                "UPDATE desktops SET state = $1, user_id = $2, owner_id = $3, state_since = $4, last_activity = $4 \
                 WHERE id = $5 AND state = 'ready' AND user_id IS NULL",
            )
            .bind(DesktopState::InUse.as_str())
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
    pub(super) async fn start_failed_again(
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
        let image = image_of_desktop(tx, &desktop.id).await?;
        let host = choose_host(tx, &image).await?;
        let moved = sqlx::query(
            "UPDATE desktops SET state = $1, host_id = $2, user_id = $3, state_since = $4, last_activity = $4, \
             session_port = NULL WHERE id = $5 AND state = 'failed'",
        )
        .bind(DesktopState::Provisioning.as_str())
        .bind(&host)
        .bind(user_id.map(str::to_owned))
        .bind(now)
        .bind(&desktop.id)
        .execute(&mut **tx)
        .await?;
        if moved.rows_affected() != 1 {
            return Err(Error::Conflict("desktop changed concurrently".into()));
        }
        queue_command(tx, &host, &desktop.id, CommandKind::Start, now).await
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
    pub(super) async fn mark_failed(
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
        // The count goes up in the database, not from the value read: two failures reported at
        // once (a lost VM and a failed command) count twice.
        sqlx::query(
            "UPDATE desktops SET state = $1, state_since = $2, last_error = $3, start_failures = start_failures + 1, retry_at = $4 WHERE id = $5",
        )
        .bind(DesktopState::Failed.as_str())
        .bind(now)
        .bind(truncate_reason(reason))
        .bind(now + self.retry_delay(failures))
        .bind(desktop_id)
        .execute(&mut **tx)
        .await?;
        end_sessions(tx, desktop_id, session_end, now).await
    }

    /// Creates a desktop row on the least-loaded host with the image and queues its start.
    /// Runs inside the caller's transaction, after `lock_pool`.
    pub(super) async fn provision(
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
            "INSERT INTO desktops (id, pool_id, name, host_id, state, owner_id, user_id, generation, state_since, last_activity, created_at, image_id) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, 0, $8, $8, $8, $9)",
        )
        .bind(&id)
        .bind(&pool.id)
        .bind(&name)
        .bind(&host)
        .bind(DesktopState::Provisioning.as_str())
        .bind(owner_id.map(str::to_owned))
        .bind(user_id.map(str::to_owned))
        .bind(now)
        .bind(&image.id)
        .execute(&mut **tx)
        .await?;
        queue_command(tx, &host, &id, CommandKind::Start, now).await?;
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
        if host.state != HostState::Online {
            return Err(Error::NotReady(desktop.name));
        }
        let now = self.now();
        // Conditional on the generation read with the desktop: a restart or recycle queued
        // since (which bumps it) fails the connect instead of giving this user a ticket for the
        // desktop's next VM process, which may be another user's.
        let updated = sqlx::query(
            "UPDATE desktops SET state = $1, user_id = $2, state_since = CASE WHEN state = 'in_use' THEN state_since ELSE $3 END, last_activity = $3 \
             WHERE id = $4 AND state IN ('in_use', 'disconnected', 'ready') AND (user_id = $2 OR owner_id = $2) AND generation = $5",
        )
        .bind(DesktopState::InUse.as_str())
        .bind(&actor.user_id)
        .bind(now)
        .bind(&desktop.id)
        .bind(desktop.generation)
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
        )?
        .for_generation(u64::try_from(desktop.generation).unwrap_or_default());
        let ticket = self.signer.issue(&claims)?;
        // The ticket id identifies the ticket in the audit log; the ticket itself is a secret.
        self.audit(
            &actor.name,
            "desktop.connect",
            &desktop.name,
            &format!("ticket={} host={}", claims.id_hex(), host.name),
        )
        .await?;
        // One session server per VM: the desktop's own port when its host reported one. And
        // the USB devices the client redirects by itself: its pool's auto-redirect rules, read
        // now, so that a change reaches the next connection.
        let row = sqlx::query(
            "SELECT d.session_port, p.usb_auto FROM desktops d JOIN pools p ON p.id = d.pool_id WHERE d.id = $1",
        )
        .bind(&desktop.id)
        .fetch_one(&self.db.pool)
        .await?;
        let port = row.try_get::<Option<i64>, _>("session_port")?.unwrap_or(host.session_port);
        let usb_auto = usb_auto_for_client(&get_str(&row, "usb_auto")?);
        Ok(Connection {
            version: FORMAT_VERSION,
            host: host.address,
            port: u16::try_from(port).unwrap_or(0),
            cert_sha256: host.cert_sha256,
            ticket,
            desktop: desktop.name,
            usb_auto,
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
        let moved = sqlx::query("UPDATE desktops SET state = $1, state_since = $2 WHERE id = $3 AND state IN ('in_use', 'disconnected', 'ready')")
            .bind(DesktopState::Provisioning.as_str())
            .bind(now)
            .bind(&desktop.id)
            .execute(&mut *tx)
            .await?;
        if moved.rows_affected() != 1 {
            return Err(Error::NotReady(desktop.name));
        }
        queue_command(&mut tx, &host, &desktop.id, CommandKind::Restart, now).await?;
        tx.commit().await?;
        self.audit(&actor.name, "desktop.restart", &desktop.name, "").await
    }

    /// "Reset my desktop": the owner of a persistent desktop reverts it to its pool's image as
    /// it is now (a fresh disk: what they kept on it is gone). Floating desktops are reverted
    /// by leaving them ([`Self::release`]).
    pub async fn reset(&self, actor: &Actor, desktop_id: &str) -> Result<()> {
        let desktop = self.my_desktop(actor, desktop_id, "desktop.reset").await?;
        self.revert(&desktop).await?;
        self.audit(&actor.name, "desktop.reset", &desktop.name, "").await
    }

    /// Recompose (admins): a persistent desktop moves to its pool's current image, on the
    /// admin's schedule. Its disk is made anew from that image's template.
    pub async fn recompose(&self, actor: &Actor, desktop_id: &str) -> Result<()> {
        actor.require_admin()?;
        let desktop = self.desktop(desktop_id).await?;
        self.revert(&desktop).await?;
        self.audit(&actor.name, "desktop.recompose", &desktop.name, "").await
    }

    /// A persistent desktop to its pool's current image with a fresh disk; its owner keeps it.
    async fn revert(&self, desktop: &Desktop) -> Result<()> {
        let pool = self.pool(&desktop.pool_id).await?;
        if pool.kind != PoolKind::Persistent {
            return Err(Error::Invalid(format!(
                "{} is a floating desktop: it is reverted whenever its user leaves it",
                desktop.name
            )));
        }
        let Some(host) = desktop.host_id.clone() else { return Err(Error::NotReady(desktop.name.clone())) };
        let now = self.now();
        let mut tx = self.db.pool.begin().await?;
        end_sessions(&mut tx, &desktop.id, "reverted", now).await?;
        if !queue_recycle(&mut tx, &desktop.id, &host, &pool.image_id, true, now).await? {
            return Err(Error::NotReady(desktop.name.clone()));
        }
        tx.commit().await?;
        Ok(())
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
    pub(super) async fn end_use(&self, desktop: &Desktop, reason: &str) -> Result<()> {
        let pool = self.pool(&desktop.pool_id).await?;
        let now = self.now();
        let mut tx = self.db.pool.begin().await?;
        end_sessions(&mut tx, &desktop.id, reason, now).await?;
        if pool.kind == PoolKind::Floating {
            // Reverted to the pool's image as it is now: a recomposed pool's new template
            // reaches its floating desktops here.
            if let Some(host) = &desktop.host_id {
                queue_recycle(&mut tx, &desktop.id, host, &pool.image_id, false, now).await?;
            }
        } else {
            sqlx::query("UPDATE desktops SET state = $1, user_id = NULL, state_since = $2 WHERE id = $3 AND state IN ('in_use', 'disconnected')")
                .bind(DesktopState::Ready.as_str())
                .bind(now)
                .bind(&desktop.id)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }
}

/// Moves a desktop that is in use or disconnected (or, with `ready_too`, ready) to `recycling`
/// on `image_id`, its user gone, and queues its recycle on `host`: whether it moved.
async fn queue_recycle(
    tx: &mut Transaction<'_, Any>,
    desktop_id: &str,
    host: &str,
    image_id: &str,
    ready_too: bool,
    now: i64,
) -> Result<bool> {
    let sql = if ready_too {
        "UPDATE desktops SET state = $1, user_id = NULL, state_since = $2, image_id = $4 WHERE id = $3 AND state IN ('in_use', 'disconnected', 'ready')"
    } else {
        "UPDATE desktops SET state = $1, user_id = NULL, state_since = $2, image_id = $4 WHERE id = $3 AND state IN ('in_use', 'disconnected')"
    };
    let moved = sqlx::query(sql)
        .bind(DesktopState::Recycling.as_str())
        .bind(now)
        .bind(desktop_id)
        .bind(image_id)
        .execute(&mut **tx)
        .await?;
    if moved.rows_affected() != 1 {
        return Ok(false);
    }
    queue_command(tx, host, desktop_id, CommandKind::Recycle, now).await?;
    Ok(true)
}
