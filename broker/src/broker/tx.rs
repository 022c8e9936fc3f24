//! Steps that run inside a caller's transaction, and the retry loop around transactions that
//! lose races.

use std::collections::HashMap;
use std::time::Duration;

use sqlx::{Any, Transaction};

use super::CommandKind;
use crate::db::{get_i64, get_str, is_retryable, is_unique_violation, new_id};
use crate::error::{Error, Result};
use crate::model::{CommandState, Image, SessionState};
use crate::secret;

/// Attempts of one transaction that keeps losing races (an allocation, a refill) before giving up.
const RACE_ATTEMPTS: u32 = 50;

/// Serializes allocations within one pool (row lock on PostgreSQL, write lock on SQLite).
pub(super) async fn lock_pool(tx: &mut Transaction<'_, Any>, pool_id: &str) -> Result<()> {
    sqlx::query("UPDATE pools SET alloc_seq = alloc_seq + 1 WHERE id = $1")
        .bind(pool_id)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

pub(super) async fn image_of_pool(tx: &mut Transaction<'_, Any>, pool_id: &str) -> Result<Image> {
    let row = sqlx::query("SELECT i.* FROM images i JOIN pools p ON p.image_id = i.id WHERE p.id = $1")
        .bind(pool_id)
        .fetch_optional(&mut **tx)
        .await?;
    row.as_ref().map(Image::from_row).transpose()?.ok_or_else(|| Error::NotFound("image of pool".into()))
}

/// The image a desktop boots: the one it was made (or last recycled or recomposed) from, or
/// its pool's for a desktop from before desktops remembered theirs.
pub(super) async fn image_of_desktop(tx: &mut Transaction<'_, Any>, desktop_id: &str) -> Result<Image> {
    let row = sqlx::query(
        "SELECT i.* FROM desktops d JOIN pools p ON p.id = d.pool_id JOIN images i ON i.id = COALESCE(d.image_id, p.image_id) WHERE d.id = $1",
    )
    .bind(desktop_id)
    .fetch_optional(&mut **tx)
    .await?;
    row.as_ref().map(Image::from_row).transpose()?.ok_or_else(|| Error::NotFound("image of desktop".into()))
}

/// The online host with the image and the lowest memory load that still fits the image.
pub(super) async fn choose_host(tx: &mut Transaction<'_, Any>, image: &Image) -> Result<String> {
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

/// Queues a command for a host. A command that boots the desktop's VM (start, restart,
/// recycle) begins a new generation of the desktop and carries it: the VM process it starts
/// accepts only tickets of that generation, and the tickets issued from now on name it.
pub(super) async fn queue_command(
    tx: &mut Transaction<'_, Any>,
    host_id: &str,
    desktop_id: &str,
    kind: CommandKind,
    now: i64,
) -> Result<()> {
    let generation = if kind.boots() {
        sqlx::query("UPDATE desktops SET generation = generation + 1 WHERE id = $1")
            .bind(desktop_id)
            .execute(&mut **tx)
            .await?;
        let row = sqlx::query("SELECT generation FROM desktops WHERE id = $1")
            .bind(desktop_id)
            .fetch_one(&mut **tx)
            .await?;
        Some(get_i64(&row, "generation")?)
    } else {
        None
    };
    sqlx::query("INSERT INTO host_commands (id, host_id, desktop_id, kind, state, created_at, generation) VALUES ($1, $2, $3, $4, $5, $6, $7)")
        .bind(format!("c-{now:012}-{}", secret::random_hex(6)))
        .bind(host_id)
        .bind(desktop_id)
        .bind(kind.as_str())
        .bind(CommandState::Pending.as_str())
        .bind(now)
        .bind(generation)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

pub(super) async fn resume_or_start_session(
    tx: &mut Transaction<'_, Any>,
    desktop_id: &str,
    user_id: &str,
    now: i64,
) -> Result<()> {
    let resumed = sqlx::query(
        "UPDATE sessions SET state = $1 WHERE desktop_id = $2 AND user_id = $3 AND state <> 'ended'",
    )
    .bind(SessionState::Active.as_str())
    .bind(desktop_id)
    .bind(user_id)
    .execute(&mut **tx)
    .await?;
    if resumed.rows_affected() == 0 {
        sqlx::query(
            "INSERT INTO sessions (id, desktop_id, user_id, state, started_at) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(new_id("s"))
        .bind(desktop_id)
        .bind(user_id)
        .bind(SessionState::Active.as_str())
        .bind(now)
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

pub(super) async fn end_sessions(
    tx: &mut Transaction<'_, Any>,
    desktop_id: &str,
    reason: &str,
    now: i64,
) -> Result<()> {
    sqlx::query("UPDATE sessions SET state = $1, ended_at = $2, end_reason = $3 WHERE desktop_id = $4 AND state <> 'ended'")
        .bind(SessionState::Ended.as_str())
        .bind(now)
        .bind(reason)
        .bind(desktop_id)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Runs an operation again while it loses races (lock contention, a concurrent claim).
pub(super) async fn retry_lost_races<T, F, Fut>(mut op: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let mut attempt = 0;
    loop {
        attempt += 1;
        match op().await {
            Err(e)
                if attempt < RACE_ATTEMPTS
                    && (is_retryable(&e) || matches!(e, Error::Conflict(_)) || is_unique(&e)) =>
            {
                tokio::time::sleep(Duration::from_millis(2 * u64::from(attempt.min(25)))).await;
            }
            other => return other,
        }
    }
}

fn is_unique(e: &Error) -> bool {
    matches!(e, Error::Db(db) if is_unique_violation(db))
}
