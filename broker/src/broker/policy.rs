//! Background work: lost hosts, idle and disconnected desktops, spare desktops.

use super::tx::{lock_pool, queue_command, retry_lost_races};
use super::{Broker, CommandKind};
use crate::db::{get_i64, get_opt_str, get_str};
use crate::error::Result;
use crate::model::{CommandState, Desktop, DesktopState, HostState, Pool, PoolKind, SessionState};

impl Broker {
    /// One round of background work: lost hosts, idle and disconnected desktops, spares.
    /// Safe to run from several brokers at once (every transition is a conditional update).
    pub async fn maintain(&self) -> Result<()> {
        self.reap_lost_hosts().await?;
        self.time_out_commands().await?;
        self.prune().await?;
        self.apply_session_policy().await?;
        for pool in self.list_pools().await?.into_iter().filter(|p| p.enabled) {
            if let Err(e) = self.refill_pool(&pool).await {
                tracing::warn!(pool = %pool.name, "could not refill: {e}");
            }
        }
        Ok(())
    }

    /// Deletes what nothing reads any more: expired browser sessions and API tokens, host
    /// commands finished and sessions ended longer than `history_secs` ago, audit entries
    /// older than `audit_retention_secs`. Returns how many rows went.
    pub async fn prune(&self) -> Result<u64> {
        let now = self.now();
        let history = now - self.settings.history_secs as i64;
        let audit = now - self.settings.audit_retention_secs as i64;
        let mut deleted = 0;
        for (sql, before) in [
            ("DELETE FROM auth_tokens WHERE expires_at < $1", now),
            ("DELETE FROM host_commands WHERE state NOT IN ('pending', 'sent') AND created_at < $1", history),
            ("DELETE FROM sessions WHERE state = 'ended' AND ended_at < $1", history),
            ("DELETE FROM audit_log WHERE at < $1", audit),
        ] {
            deleted += sqlx::query(sql).bind(before).execute(&self.db.pool).await?.rows_affected();
        }
        if deleted > 0 {
            tracing::info!(rows = deleted, "pruned expired tokens, old commands, sessions and audit");
        }
        Ok(deleted)
    }

    /// Commands a live host took (or was given) and never answered within
    /// `command_timeout_secs` (a hung daemon, a start stuck on a disk): failed, and the desktop
    /// they were starting fails with the reason, instead of staying `provisioning` forever.
    async fn time_out_commands(&self) -> Result<()> {
        let now = self.now();
        let timeout = self.settings.command_timeout_secs;
        let rows = sqlx::query(
            "SELECT c.id, c.desktop_id, c.kind, h.name FROM host_commands c JOIN hosts h ON h.id = c.host_id \
             WHERE c.state IN ('pending', 'sent') AND c.created_at < $1",
        )
        .bind(now - timeout as i64)
        .fetch_all(&self.db.pool)
        .await?;
        for r in rows {
            let (id, desktop, kind, host) =
                (get_str(&r, "id")?, get_str(&r, "desktop_id")?, get_str(&r, "kind")?, get_str(&r, "name")?);
            let reason = format!("host {host} did not answer the {kind} command within {timeout} s");
            let mut tx = self.db.pool.begin().await?;
            let failed = sqlx::query(
                "UPDATE host_commands SET state = 'failed', error = $1 WHERE id = $2 AND state IN ('pending', 'sent')",
            )
            .bind(&reason)
            .bind(&id)
            .execute(&mut *tx)
            .await?;
            if failed.rows_affected() != 1 {
                continue;
            }
            let starting = sqlx::query("SELECT 1 FROM desktops WHERE id = $1 AND state = 'provisioning'")
                .bind(&desktop)
                .fetch_optional(&mut *tx)
                .await?
                .is_some();
            if starting {
                self.mark_failed(&mut tx, &desktop, &reason, "command_timeout", now).await?;
            }
            tx.commit().await?;
            tracing::warn!(host = %host, desktop = %desktop, "{reason}");
            self.audit(&host, "command.timeout", &desktop, &reason).await?;
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
                "UPDATE hosts SET state = $1 WHERE id = $2 AND state = 'online' AND last_heartbeat < $3",
            )
            .bind(HostState::Lost.as_str())
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
            sqlx::query(
                "UPDATE host_commands SET state = $1 WHERE host_id = $2 AND state IN ('pending', 'sent')",
            )
            .bind(CommandState::Dropped.as_str())
            .bind(&id)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            tracing::warn!(host = %name, desktops = desktops.len(), "host lost: no heartbeat");
            self.audit("system", "host.lost", &name, &format!("{} desktops failed", desktops.len())).await?;
        }
        Ok(())
    }

    async fn apply_session_policy(&self) -> Result<()> {
        let now = self.now();
        for pool in self.list_pools().await? {
            // Idle: in use, but no client seen (or, while one is connected, no input in the
            // guest, as its agent reports it) for idle_timeout → disconnected; a client still
            // connected is sent away.
            let idle = sqlx::query(
                "SELECT id, host_id FROM desktops WHERE pool_id = $1 AND state = 'in_use' AND last_activity < $2",
            )
            .bind(&pool.id)
            .bind(now - pool.idle_timeout_secs)
            .fetch_all(&self.db.pool)
            .await?;
            for r in &idle {
                let id = get_str(r, "id")?;
                let mut tx = self.db.pool.begin().await?;
                let moved = sqlx::query("UPDATE desktops SET state = $1, state_since = $2 WHERE id = $3 AND state = 'in_use' AND last_activity < $4")
                    .bind(DesktopState::Disconnected.as_str())
                    .bind(now)
                    .bind(&id)
                    .bind(now - pool.idle_timeout_secs)
                    .execute(&mut *tx)
                    .await?;
                if moved.rows_affected() == 1 {
                    sqlx::query("UPDATE sessions SET state = $1 WHERE desktop_id = $2 AND state = 'active'")
                        .bind(SessionState::Disconnected.as_str())
                        .bind(&id)
                        .execute(&mut *tx)
                        .await?;
                    if let Some(host) = get_opt_str(r, "host_id")? {
                        queue_command(&mut tx, &host, &id, CommandKind::Disconnect, now).await?;
                    }
                    tx.commit().await?;
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
            let made = retry_lost_races(|| async {
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
