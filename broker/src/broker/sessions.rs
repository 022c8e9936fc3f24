//! The sessions admins see and end.

use sqlx::Row;

use super::tx::queue_command;
use super::{Broker, CommandKind};
use crate::db::{get_i64, get_str};
use crate::error::{Error, Result};
use crate::model::{Actor, DesktopState, Session, SessionState};

impl Broker {
    pub async fn list_sessions(&self, actor: &Actor, live_only: bool) -> Result<Vec<Session>> {
        actor.require_admin()?;
        let filter = if live_only { "WHERE s.state <> $1" } else { "" };
        let sql = format!(
            "SELECT s.*, d.name AS desktop_name, u.name AS user_name FROM sessions s JOIN desktops d ON d.id = s.desktop_id \
             JOIN users u ON u.id = s.user_id {filter} ORDER BY s.started_at DESC, s.id LIMIT 500"
        );
        // `filter` is one of two literals.
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
        if live_only {
            query = query.bind(SessionState::Ended.as_str());
        }
        let rows = query.fetch_all(&self.db.pool).await?;
        rows.iter()
            .map(|r| {
                Ok(Session {
                    id: get_str(r, "id")?,
                    desktop_id: get_str(r, "desktop_id")?,
                    desktop_name: get_str(r, "desktop_name")?,
                    user_id: get_str(r, "user_id")?,
                    user_name: get_str(r, "user_name")?,
                    state: SessionState::parse(&get_str(r, "state")?)?,
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
        // Still live? It may have ended since it was read.
        let live = sqlx::query("UPDATE sessions SET state = $1 WHERE id = $2 AND state = 'active'")
            .bind(SessionState::Disconnected.as_str())
            .bind(session_id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if live == 0 {
            tx.rollback().await?;
            return Err(Error::NotFound("live session".into()));
        }
        sqlx::query("UPDATE desktops SET state = $1, state_since = $2 WHERE id = $3 AND state = 'in_use'")
            .bind(DesktopState::Disconnected.as_str())
            .bind(now)
            .bind(&desktop.id)
            .execute(&mut *tx)
            .await?;
        if let Some(host) = &desktop.host_id {
            queue_command(&mut tx, host, &desktop.id, CommandKind::Disconnect, now).await?;
        }
        tx.commit().await?;
        self.audit(&actor.name, "session.disconnect", &desktop.name, session_id).await
    }
}
