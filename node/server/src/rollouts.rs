//! The driver of `shoal_fleet`'s rollouts: loads a deployment's [`Rollout`] and
//! device [`Entry`]s from the database in a transaction that holds the deployment's
//! row, lets the rollout decide, and stores what changed. Every decision (who may
//! start, phases, halts, retries, abort) is the fleet crate's; this module only
//! moves rows, so several servers on one PostgreSQL decide alike.

use std::time::Duration;

use shoal_fleet::{DeviceId, Effect, Entry, Instant, Rollout, State, Status};
use sqlx::{AnyConnection, Row};

use crate::Ctx;
use crate::db::now_ms;
use crate::http::audit;
use crate::http::error::{ApiError, ApiResult};

/// The rollout clock: the server's wall clock in Unix milliseconds.
pub fn instant(now_ms: i64) -> Instant {
    Instant::from_millis(u64::try_from(now_ms).unwrap_or(0))
}

/// A rollout state's name, as stored in `deployments.status`.
pub fn state_name(state: State) -> String {
    state.to_string()
}

/// Loads deployment `id`'s rollout, first taking its row's write lock (an update
/// that changes nothing: a row lock on PostgreSQL, the write lock on SQLite) so
/// concurrent requests, on any server, take turns. 404 if there is no such
/// deployment.
pub async fn lock(conn: &mut AnyConnection, id: &str) -> ApiResult<Rollout> {
    let n = sqlx::query("UPDATE deployments SET rollout = rollout WHERE id = $1")
        .bind(id)
        .execute(&mut *conn)
        .await?
        .rows_affected();
    if n == 0 {
        return Err(ApiError::not_found(format!("no deployment {id}")));
    }
    let text: String = sqlx::query("SELECT rollout FROM deployments WHERE id = $1")
        .bind(id)
        .fetch_one(&mut *conn)
        .await?
        .try_get("rollout")?;
    parse(&text)
}

/// Parses a stored rollout (the fleet crate checks it as it loads).
pub fn parse(text: &str) -> ApiResult<Rollout> {
    serde_json::from_str(text).map_err(|e| ApiError::Internal(format!("stored rollout: {e}")))
}

/// An entry from a `deployment_devices` row with `device_id`, `status`, `phase`
/// and `attempts`.
pub fn entry_of(row: &sqlx::any::AnyRow) -> ApiResult<Entry> {
    let device: String = row.try_get("device_id")?;
    let status: String = row.try_get("status")?;
    let phase: i64 = row.try_get("phase")?;
    let attempts: i64 = row.try_get("attempts")?;
    Ok(Entry {
        device: DeviceId::new(device),
        phase: u32::try_from(phase).map_err(|_| ApiError::Internal("stored phase".into()))?,
        status: status
            .parse()
            .map_err(|e| ApiError::Internal(format!("stored status: {e}")))?,
        attempts: u32::try_from(attempts)
            .map_err(|_| ApiError::Internal("stored attempts".into()))?,
    })
}

/// Device `device`'s entry in deployment `id`, if it is in it.
pub async fn entry(conn: &mut AnyConnection, id: &str, device: &str) -> ApiResult<Option<Entry>> {
    let row = sqlx::query(
        "SELECT device_id, status, phase, attempts FROM deployment_devices \
         WHERE deployment_id = $1 AND device_id = $2",
    )
    .bind(id)
    .bind(device)
    .fetch_optional(&mut *conn)
    .await?;
    row.as_ref().map(entry_of).transpose()
}

/// Every entry of deployment `id`, in device order.
pub async fn entries(conn: &mut AnyConnection, id: &str) -> ApiResult<Vec<Entry>> {
    sqlx::query(
        "SELECT device_id, status, phase, attempts FROM deployment_devices \
         WHERE deployment_id = $1 ORDER BY device_id",
    )
    .bind(id)
    .fetch_all(&mut *conn)
    .await?
    .iter()
    .map(entry_of)
    .collect()
}

/// Stores the rollout of deployment `id` and the `changed` entries, and records the
/// rollout's own changes (phases opened, halts, the end) in the audit log.
pub async fn save(
    conn: &mut AnyConnection,
    id: &str,
    rollout: &Rollout,
    changed: &[Entry],
    effects: &[Effect],
    now: i64,
) -> ApiResult<()> {
    let state = rollout.state();
    let over = matches!(state, State::Aborted | State::Finished);
    let text = serde_json::to_string(rollout).map_err(|e| ApiError::Internal(e.to_string()))?;
    let timer = rollout
        .poll_timeout()
        .map(|t| i64::try_from(t.as_millis()).unwrap_or(i64::MAX));
    sqlx::query(
        "UPDATE deployments SET rollout = $2, status = $3, halt_reason = $4, next_timer_ms = $5, \
         finished_ms = CASE WHEN $6 = 1 THEN COALESCE(finished_ms, $7) ELSE NULL END WHERE id = $1",
    )
    .bind(id)
    .bind(text)
    .bind(state_name(state))
    .bind(rollout.halt_reason().map(|h| h.to_string()))
    .bind(timer)
    .bind(i64::from(over))
    .bind(now)
    .execute(&mut *conn)
    .await?;
    for e in changed {
        sqlx::query(
            "UPDATE deployment_devices SET status = $3, phase = $4, attempts = $5, updated_ms = $6, \
             finished_ms = CASE WHEN $7 = 1 THEN $6 ELSE NULL END \
             WHERE deployment_id = $1 AND device_id = $2",
        )
        .bind(id)
        .bind(e.device.as_str())
        .bind(e.status.as_str())
        .bind(i64::from(e.phase))
        .bind(i64::from(e.attempts))
        .bind(now)
        .bind(i64::from(e.status.is_final()))
        .execute(&mut *conn)
        .await?;
    }
    for effect in effects {
        let (action, details) = match effect {
            Effect::PhaseOpened { phase, devices } => (
                "rollout.phase_opened",
                serde_json::json!({ "phase": phase + 1, "devices": devices }),
            ),
            Effect::Halted(reason) => (
                "rollout.halted",
                serde_json::json!({ "reason": reason.to_string() }),
            ),
            Effect::Finished => ("rollout.finished", serde_json::json!({})),
            Effect::Status { .. } | Effect::Retrying { .. } => continue,
        };
        if let Effect::Halted(reason) = effect {
            tracing::warn!(deployment = %id, %reason, "rollout halted");
        }
        audit(conn, "rollout", action, id, details).await?;
    }
    Ok(())
}

/// Runs the timers that are due (a phase's soak delay), on every deployment whose
/// `next_timer_ms` passed. Several servers may run this at once: each deployment is
/// handled under its row lock, and a timer already handled is no longer due.
pub async fn tick(ctx: &Ctx) -> ApiResult<usize> {
    let now = now_ms();
    let due: Vec<String> = sqlx::query(
        "SELECT id FROM deployments WHERE next_timer_ms IS NOT NULL AND next_timer_ms <= $1 ORDER BY id",
    )
    .bind(now)
    .fetch_all(&ctx.db)
    .await?
    .iter()
    .map(|r| r.try_get("id"))
    .collect::<Result<_, _>>()?;
    for id in &due {
        let mut tx = ctx.db.begin().await?;
        let mut rollout = lock(&mut tx, id).await?;
        if rollout.poll_timeout().is_some_and(|t| t <= instant(now)) {
            let effects = rollout.handle_timeout(instant(now));
            save(&mut tx, id, &rollout, &[], &effects, now).await?;
        }
        tx.commit().await?;
    }
    Ok(due.len())
}

/// Runs [`tick`] every `period` until the task is aborted.
pub async fn run_timers(ctx: Ctx, period: Duration) {
    let mut interval = tokio::time::interval(period);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        if let Err(e) = tick(&ctx).await {
            tracing::error!(error = %e, "rollout timers");
        }
    }
}

/// Whether a status is one a device has not finished with.
pub fn unfinished(status: Status) -> bool {
    !status.is_final()
}
