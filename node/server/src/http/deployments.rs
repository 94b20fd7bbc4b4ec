//! Deployments: a release sent to a set of accepted devices (listed, a group, or an
//! inventory filter, resolved when the deployment is created), rolled out in phases
//! with an automatic halt by a `shoal_fleet` rollout (its policy given at creation;
//! default: everyone at once), with each device's state, logs, abort, retry of
//! failed devices, pause, resume and opening the next phase by hand.
//!
//! A deployment to a dynamic group (or a filter) is **frozen at creation**: the
//! accepted devices that match then are its devices; one that matches later does
//! not join it, one that stops matching stays in. This is hawkBit's rollout
//! semantics (its groups are computed when the rollout is created): a phase "10%"
//! and a halt at "5% failures" need a fixed denominator, and an operator reading
//! "900 of 1,000 succeeded" must not see the 1,000 move. Mender's open-ended
//! dynamic-group deployments (devices joining later get the update too) are a
//! different tool, continuous delivery; for that, create a new deployment to the
//! group when devices have joined (those who already run the release report
//! already-installed).

use std::collections::BTreeMap;

use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use sqlx::Row;

use super::error::{ApiError, ApiResult};
use super::extractor::{ApiAuth, ApiJson, ApiPath, Role};
use super::{audit, check_hex_id, devices, groups, releases};
use crate::Ctx;
use crate::db::{now_ms, random_hex};
use crate::filter;
use crate::rollouts::{self, instant};
use crate::view;
use shoal_fleet::{ControlError, DeviceId, Effect, Entry, Policy, Rollout, Status};

/// The body of `POST /deployments`: a name, a release and exactly one target.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NewDeployment {
    /// A name for people.
    pub name: String,
    /// The release's id.
    pub release: String,
    /// Device ids.
    #[serde(default)]
    pub devices: Option<Vec<String>>,
    /// A group's name.
    #[serde(default)]
    pub group: Option<String>,
    /// An inventory filter.
    #[serde(default)]
    pub filter: Option<Vec<String>>,
    /// How to roll out: phases, their proceed conditions, the failure limit that
    /// halts, retries (`shoal_fleet::Policy`). Default: one phase, no limit.
    #[serde(default)]
    pub policy: Option<Policy>,
}

/// A deployment.
#[derive(Debug, Serialize)]
pub struct Deployment {
    /// Its id.
    pub id: String,
    /// Its name.
    pub name: String,
    /// The release's id.
    pub release_id: String,
    /// What it was created for.
    pub target: serde_json::Value,
    /// The rollout's state: running, paused, halted, aborted or finished.
    pub status: String,
    /// Why it last halted by itself.
    pub halt_reason: Option<String>,
    /// The rollout: policy, phases with their counts, what the next phase waits for.
    pub rollout: serde_json::Value,
    /// When it was created.
    pub created_ms: i64,
    /// The token that created it.
    pub created_by: String,
    /// When it finished or was aborted.
    pub finished_ms: Option<i64>,
    /// How many devices are in each state.
    pub stats: BTreeMap<String, i64>,
}

/// One device's state in a deployment.
#[derive(Debug, Serialize)]
pub struct DeviceState {
    /// The device.
    pub device_id: String,
    /// Its state: pending, downloading, installing, rebooting, success, failure,
    /// already-installed, noartifact, aborted or decommissioned.
    pub status: String,
    /// Free text from the device.
    pub substate: Option<String>,
    /// Its rollout phase (1-based).
    pub phase: i64,
    /// Failures retried so far.
    pub attempts: i64,
    /// Last change.
    pub updated_ms: i64,
    /// When it finished.
    pub finished_ms: Option<i64>,
}

/// One line of a device's deployment log.
#[derive(Debug, Serialize)]
pub struct LogLine {
    /// The device's timestamp.
    pub timestamp_ms: i64,
    /// Level.
    pub level: String,
    /// Message.
    pub message: String,
}

/// Whether a device whose inventory names `device_type` can take a release built
/// for `release_types` (empty: any). A device whose inventory has not arrived yet
/// (no `device_type`) is not marked `noartifact` when the deployment is made: it
/// stays pending, and the device's own offer check (the manifest's device types)
/// refuses a release that is not for it, with a failure report. Marking it at
/// creation would leave a device accepted moments before the deployment out of it
/// for good.
fn compatible(release_types: &[String], device_type: Option<&str>) -> bool {
    release_types.is_empty() || device_type.is_none_or(|t| release_types.iter().any(|r| r == t))
}

async fn get_one(ctx: &Ctx, id: &str) -> ApiResult<Deployment> {
    check_hex_id(id, 32, "deployment")?;
    let row = sqlx::query("SELECT * FROM deployments WHERE id = $1")
        .bind(id)
        .fetch_optional(&ctx.db)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no deployment {id}")))?;
    let mut stats = BTreeMap::new();
    for r in sqlx::query(
        "SELECT status, COUNT(*) AS n FROM deployment_devices WHERE deployment_id = $1 GROUP BY status",
    )
    .bind(id)
    .fetch_all(&ctx.db)
    .await?
    {
        stats.insert(r.try_get("status")?, r.try_get("n")?);
    }
    let target: String = row.try_get("target")?;
    let rollout: String = row.try_get("rollout")?;
    let rollout = rollouts::parse(&rollout)?;
    let summary = serde_json::json!({
        "policy": rollout.policy(),
        "summary": rollout.summary(instant(now_ms())),
    });
    Ok(Deployment {
        halt_reason: row.try_get("halt_reason")?,
        rollout: summary,
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        release_id: row.try_get("release_id")?,
        target: serde_json::from_str(&target)
            .map_err(|e| ApiError::Internal(format!("stored target: {e}")))?,
        status: row.try_get("status")?,
        created_ms: row.try_get("created_ms")?,
        created_by: row.try_get("created_by")?,
        finished_ms: row.try_get("finished_ms")?,
        stats,
    })
}

/// `POST /deployments`.
pub async fn create(
    State(ctx): State<Ctx>,
    auth: ApiAuth,
    ApiJson(req): ApiJson<NewDeployment>,
) -> ApiResult<(StatusCode, axum::Json<Deployment>)> {
    auth.require(Role::Operator)?;
    if req.name.is_empty() || req.name.len() > 256 {
        return Err(ApiError::bad("name must be 1 to 256 bytes"));
    }
    let release = releases::get_one(&ctx, &req.release).await?;
    let accepted = devices::load(&ctx, Some("accepted")).await?;
    let (targets, target_json) = match (&req.devices, &req.group, &req.filter) {
        (Some(ids), None, None) => {
            if ids.is_empty() {
                return Err(ApiError::bad("devices is empty"));
            }
            let mut out = Vec::new();
            for id in ids {
                match accepted.iter().find(|d| &d.id == id) {
                    Some(d) => out.push(d.clone()),
                    None => {
                        return Err(ApiError::not_found(format!("no accepted device {id}")));
                    }
                }
            }
            (out, serde_json::json!({ "devices": ids }))
        }
        (None, Some(g), None) => {
            let members = groups::members(&ctx, g).await?;
            let out: Vec<_> = members
                .into_iter()
                .filter(|d| d.status == "accepted")
                .collect();
            (out, serde_json::json!({ "group": g }))
        }
        (None, None, Some(f)) => {
            let conds = devices::parse_filter(f)?;
            let out: Vec<_> = accepted
                .into_iter()
                .filter(|d| filter::matches(&conds, &d.inventory))
                .collect();
            (out, serde_json::json!({ "filter": f }))
        }
        _ => {
            return Err(ApiError::bad(
                "give exactly one target: devices, group or filter",
            ));
        }
    };
    if targets.is_empty() {
        return Err(ApiError::conflict("no accepted device matches the target"));
    }
    let id = random_hex(16);
    let now = now_ms();
    let policy = req.policy.clone().unwrap_or_else(Policy::all_at_once);
    let (mut rollout, mut entries, mut effects) = Rollout::plan(
        policy,
        targets.iter().map(|d| DeviceId::new(d.id.clone())),
        instant(now),
    )
    .map_err(|e| ApiError::bad(format!("policy: {e}")))?;
    let mut incompatible = 0;
    for e in &mut entries {
        let device = targets
            .iter()
            .find(|d| d.id == e.device.as_str())
            .ok_or_else(|| ApiError::Internal("planned a device not targeted".into()))?;
        if !compatible(
            &release.device_types,
            device.inventory.get("device_type").map(String::as_str),
        ) {
            incompatible += 1;
            effects.extend(
                rollout
                    .no_artifact(e, instant(now))
                    .map_err(|e| ApiError::Internal(e.to_string()))?,
            );
        }
    }
    let mut tx = ctx.db.begin().await?;
    sqlx::query(
        "INSERT INTO deployments (id, name, release_id, target, status, rollout, created_ms, created_by) \
         VALUES ($1, $2, $3, $4, 'running', '', $5, $6)",
    )
    .bind(&id)
    .bind(&req.name)
    .bind(&release.id)
    .bind(target_json.to_string())
    .bind(now)
    .bind(auth.actor())
    .execute(&mut *tx)
    .await?;
    for e in &entries {
        sqlx::query(
            "INSERT INTO deployment_devices (deployment_id, device_id, status, substate, phase, attempts, created_ms, updated_ms) \
             VALUES ($1, $2, 'pending', $3, $4, 0, $5, $5)",
        )
        .bind(&id)
        .bind(e.device.as_str())
        .bind((e.status == Status::NoArtifact).then_some("device_type not in the release's device types"))
        .bind(i64::from(e.phase))
        .bind(now)
        .execute(&mut *tx)
        .await?;
    }
    rollouts::save(&mut tx, &id, &rollout, &entries, &effects, now).await?;
    audit(
        &mut tx,
        &auth.actor(),
        "deployment.create",
        &id,
        serde_json::json!({
            "name": req.name, "release": release.id, "target": target_json,
            "devices": targets.len(), "incompatible": incompatible,
        }),
    )
    .await?;
    // Every server's view sends these devices' polls to the database from now on.
    view::record(&mut tx, &[view::Change::Deployment(&id)]).await?;
    tx.commit().await?;
    view::refresh_after_commit(&ctx).await;
    // Per-base encodings of the release against what its devices run, in the
    // background: a device polling before one is done gets plain chunks.
    if let Err(e) =
        crate::encode_jobs::plan(&ctx, &release.id, targets.iter().map(|d| &d.inventory)).await
    {
        tracing::warn!(deployment = %id, error = %e, "cannot queue per-base encodings");
    }
    Ok((StatusCode::CREATED, axum::Json(get_one(&ctx, &id).await?)))
}

/// `GET /deployments`, newest first.
pub async fn list(State(ctx): State<Ctx>, auth: ApiAuth) -> ApiResult<axum::Json<Vec<Deployment>>> {
    auth.require(Role::Viewer)?;
    let mut out = Vec::new();
    for row in sqlx::query("SELECT id FROM deployments ORDER BY created_ms DESC, id")
        .fetch_all(&ctx.db)
        .await?
    {
        let id: String = row.try_get("id")?;
        out.push(get_one(&ctx, &id).await?);
    }
    Ok(axum::Json(out))
}

/// `GET /deployments/{id}`.
pub async fn show(
    State(ctx): State<Ctx>,
    auth: ApiAuth,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<axum::Json<Deployment>> {
    auth.require(Role::Viewer)?;
    Ok(axum::Json(get_one(&ctx, &id).await?))
}

/// `GET /deployments/{id}/devices`: each device's state.
pub async fn devices(
    State(ctx): State<Ctx>,
    auth: ApiAuth,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<axum::Json<Vec<DeviceState>>> {
    auth.require(Role::Viewer)?;
    get_one(&ctx, &id).await?;
    let rows =
        sqlx::query("SELECT * FROM deployment_devices WHERE deployment_id = $1 ORDER BY device_id")
            .bind(&id)
            .fetch_all(&ctx.db)
            .await?;
    let out = rows
        .iter()
        .map(|r| {
            Ok(DeviceState {
                device_id: r.try_get("device_id")?,
                status: r.try_get("status")?,
                substate: r.try_get("substate")?,
                phase: r.try_get::<i64, _>("phase")? + 1,
                attempts: r.try_get("attempts")?,
                updated_ms: r.try_get("updated_ms")?,
                finished_ms: r.try_get("finished_ms")?,
            })
        })
        .collect::<ApiResult<_>>()?;
    Ok(axum::Json(out))
}

/// `GET /deployments/{id}/devices/{device_id}/log`.
pub async fn device_log(
    State(ctx): State<Ctx>,
    auth: ApiAuth,
    ApiPath((id, device_id)): ApiPath<(String, String)>,
) -> ApiResult<axum::Json<Vec<LogLine>>> {
    auth.require(Role::Viewer)?;
    get_one(&ctx, &id).await?;
    check_hex_id(&device_id, 64, "device")?;
    let member = sqlx::query(
        "SELECT 1 AS one FROM deployment_devices WHERE deployment_id = $1 AND device_id = $2",
    )
    .bind(&id)
    .bind(&device_id)
    .fetch_optional(&ctx.db)
    .await?;
    if member.is_none() {
        return Err(ApiError::not_found(format!(
            "device {device_id} is not in deployment {id}"
        )));
    }
    let rows = sqlx::query(
        "SELECT at_ms, level, message FROM deployment_logs \
         WHERE deployment_id = $1 AND device_id = $2 ORDER BY id",
    )
    .bind(&id)
    .bind(&device_id)
    .fetch_all(&ctx.db)
    .await?;
    let out = rows
        .iter()
        .map(|r| {
            Ok(LogLine {
                timestamp_ms: r.try_get("at_ms")?,
                level: r.try_get("level")?,
                message: r.try_get("message")?,
            })
        })
        .collect::<ApiResult<_>>()?;
    Ok(axum::Json(out))
}

fn control_error(id: &str, e: ControlError) -> ApiError {
    match e {
        ControlError::Illegal { .. }
        | ControlError::NoMorePhases
        | ControlError::NothingToRetry => ApiError::conflict(format!("deployment {id}: {e}")),
        other => ApiError::Internal(other.to_string()),
    }
}

/// Runs an operator's command on deployment `id`'s rollout under its row lock,
/// stores what changed, and records it in the audit log.
async fn command(
    ctx: &Ctx,
    auth: &ApiAuth,
    id: &str,
    action: &str,
    run: impl FnOnce(&mut Rollout, &mut Vec<Entry>, i64) -> Result<Vec<Effect>, ControlError>,
) -> ApiResult<axum::Json<Deployment>> {
    auth.require(Role::Operator)?;
    check_hex_id(id, 32, "deployment")?;
    let now = now_ms();
    let mut tx = ctx.db.begin().await?;
    let mut rollout = rollouts::lock(&mut tx, id).await?;
    let mut entries = rollouts::entries(&mut tx, id).await?;
    let before = entries.clone();
    let effects = run(&mut rollout, &mut entries, now).map_err(|e| control_error(id, e))?;
    let changed: Vec<Entry> = entries
        .into_iter()
        .zip(before)
        .filter(|(after, before)| after != before)
        .map(|(after, _)| after)
        .collect();
    rollouts::save(&mut tx, id, &rollout, &changed, &effects, now).await?;
    audit(
        &mut tx,
        &auth.actor(),
        action,
        id,
        serde_json::json!({ "devices_changed": changed.len(), "state": rollouts::state_name(rollout.state()) }),
    )
    .await?;
    // A retry puts failed devices back to pending: every server's view must send
    // their polls to the database again. (Logged for every command: they are rare.)
    view::record(&mut tx, &[view::Change::Deployment(id)]).await?;
    tx.commit().await?;
    view::refresh_after_commit(ctx).await;
    Ok(axum::Json(get_one(ctx, id).await?))
}

/// `POST /deployments/{id}/abort`: devices that have not finished end as
/// `aborted`; their next status report, manifest or chunk request gets 409.
pub async fn abort(
    State(ctx): State<Ctx>,
    auth: ApiAuth,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<axum::Json<Deployment>> {
    command(&ctx, &auth, &id, "deployment.abort", |r, entries, _| {
        r.abort(
            entries
                .iter_mut()
                .filter(|e| rollouts::unfinished(e.status)),
        )
    })
    .await
}

/// `POST /deployments/{id}/retry`: failed devices go back to pending with a fresh
/// retry budget (a finished deployment runs again). 409 if aborted or none failed.
pub async fn retry(
    State(ctx): State<Ctx>,
    auth: ApiAuth,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<axum::Json<Deployment>> {
    command(&ctx, &auth, &id, "deployment.retry", |r, entries, now| {
        r.retry_failed(
            entries.iter_mut().filter(|e| e.status == Status::Failure),
            instant(now),
        )
    })
    .await
}

/// `POST /deployments/{id}/pause`: no device starts and no phase opens until it is
/// resumed; devices already installing carry on.
pub async fn pause(
    State(ctx): State<Ctx>,
    auth: ApiAuth,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<axum::Json<Deployment>> {
    command(&ctx, &auth, &id, "deployment.pause", |r, _, now| {
        r.pause(instant(now))
    })
    .await
}

/// `POST /deployments/{id}/resume`: a paused or halted rollout runs again (a halt's
/// failures so far are accepted; the next final failure checks the limit again).
pub async fn resume(
    State(ctx): State<Ctx>,
    auth: ApiAuth,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<axum::Json<Deployment>> {
    command(&ctx, &auth, &id, "deployment.resume", |r, _, now| {
        r.resume(instant(now))
    })
    .await
}

/// `POST /deployments/{id}/next_phase`: opens the next phase now, whatever its
/// proceed condition says (the way to open a phase that has none).
pub async fn next_phase(
    State(ctx): State<Ctx>,
    auth: ApiAuth,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<axum::Json<Deployment>> {
    command(&ctx, &auth, &id, "deployment.next_phase", |r, _, now| {
        r.open_next_phase(instant(now))
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::compatible;

    #[test]
    fn only_a_known_other_device_type_is_incompatible() {
        let types = vec!["board-a".to_string(), "board-b".to_string()];
        assert!(compatible(&types, Some("board-b")));
        assert!(!compatible(&types, Some("board-c")));
        // The inventory has not arrived: the device decides when it is offered.
        assert!(compatible(&types, None));
        assert!(compatible(&[], Some("anything")));
    }
}
