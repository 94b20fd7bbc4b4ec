//! Deployments: a release sent to a set of accepted devices (listed, a group, or an
//! inventory filter, resolved when the deployment is created), with each device's
//! state, logs, abort, retry of failed devices, pause and resume.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use sqlx::{AnyConnection, Row};

use super::error::{ApiError, ApiResult};
use super::extractor::{ApiAuth, ApiJson, ApiPath, Role};
use super::{audit, check_hex_id, devices, groups, releases};
use crate::Ctx;
use crate::db::{now_ms, random_hex};
use crate::filter;

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
    /// active, paused, aborted or finished.
    pub status: String,
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
    /// 1, plus one per retry.
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
    Ok(Deployment {
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

/// Marks every active or paused deployment with no unfinished device finished.
pub async fn finish_done(conn: &mut AnyConnection, now: i64) -> ApiResult<()> {
    sqlx::query(
        "UPDATE deployments SET status = 'finished', finished_ms = $1 \
         WHERE status IN ('active', 'paused') AND NOT EXISTS \
         (SELECT 1 FROM deployment_devices dd WHERE dd.deployment_id = deployments.id \
          AND dd.status IN ('pending', 'downloading', 'installing', 'rebooting'))",
    )
    .bind(now)
    .execute(conn)
    .await?;
    Ok(())
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
    let mut tx = ctx.db.begin().await?;
    sqlx::query(
        "INSERT INTO deployments (id, name, release_id, target, status, created_ms, created_by) \
         VALUES ($1, $2, $3, $4, 'active', $5, $6)",
    )
    .bind(&id)
    .bind(&req.name)
    .bind(&release.id)
    .bind(target_json.to_string())
    .bind(now)
    .bind(auth.actor())
    .execute(&mut *tx)
    .await?;
    let mut incompatible = 0;
    for d in &targets {
        let compatible = release.device_types.is_empty()
            || d.inventory
                .get("device_type")
                .is_some_and(|t| release.device_types.contains(t));
        let status = if compatible { "pending" } else { "noartifact" };
        if !compatible {
            incompatible += 1;
        }
        sqlx::query(
            "INSERT INTO deployment_devices (deployment_id, device_id, status, substate, attempts, created_ms, updated_ms, finished_ms) \
             VALUES ($1, $2, $3, $4, 1, $5, $5, $6)",
        )
        .bind(&id)
        .bind(&d.id)
        .bind(status)
        .bind((!compatible).then_some("device_type not in the release's device types"))
        .bind(now)
        .bind((!compatible).then_some(now))
        .execute(&mut *tx)
        .await?;
    }
    finish_done(&mut tx, now).await?;
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
    tx.commit().await?;
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

/// Moves a deployment from one of `from` to `to` (409 otherwise), in `tx`.
async fn transition(
    conn: &mut AnyConnection,
    id: &str,
    from: &[&str],
    to: &str,
    now: i64,
) -> ApiResult<()> {
    let row = sqlx::query("SELECT status FROM deployments WHERE id = $1")
        .bind(id)
        .fetch_optional(&mut *conn)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no deployment {id}")))?;
    let status: String = row.try_get("status")?;
    if !from.contains(&status.as_str()) {
        return Err(ApiError::conflict(format!(
            "deployment {id} is {status}; it must be {} for this",
            from.join(" or ")
        )));
    }
    let finished = matches!(to, "aborted" | "finished");
    let done = sqlx::query(
        "UPDATE deployments SET status = $2, finished_ms = CASE WHEN $3 = 1 THEN $4 ELSE NULL END \
         WHERE id = $1 AND status = $5",
    )
    .bind(id)
    .bind(to)
    .bind(i64::from(finished))
    .bind(now)
    .bind(&status)
    .execute(&mut *conn)
    .await?;
    if done.rows_affected() != 1 {
        return Err(ApiError::conflict(format!(
            "deployment {id} changed meanwhile; try again"
        )));
    }
    Ok(())
}

/// `POST /deployments/{id}/abort`: devices that have not finished end as
/// `aborted`; their next status report, manifest or chunk request gets 409.
pub async fn abort(
    State(ctx): State<Ctx>,
    auth: ApiAuth,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<axum::Json<Deployment>> {
    auth.require(Role::Operator)?;
    check_hex_id(&id, 32, "deployment")?;
    let now = now_ms();
    let mut tx = ctx.db.begin().await?;
    transition(&mut tx, &id, &["active", "paused"], "aborted", now).await?;
    let n = sqlx::query(
        "UPDATE deployment_devices SET status = 'aborted', updated_ms = $2, finished_ms = $2 \
         WHERE deployment_id = $1 AND status IN ('pending', 'downloading', 'installing', 'rebooting')",
    )
    .bind(&id)
    .bind(now)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    audit(
        &mut tx,
        &auth.actor(),
        "deployment.abort",
        &id,
        serde_json::json!({ "devices_aborted": n }),
    )
    .await?;
    tx.commit().await?;
    Ok(axum::Json(get_one(&ctx, &id).await?))
}

/// `POST /deployments/{id}/retry`: failed devices go back to pending (and a
/// finished deployment becomes active again). 409 if aborted or none failed.
pub async fn retry(
    State(ctx): State<Ctx>,
    auth: ApiAuth,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<axum::Json<Deployment>> {
    auth.require(Role::Operator)?;
    let dep = get_one(&ctx, &id).await?;
    if dep.status == "aborted" {
        return Err(ApiError::conflict(format!("deployment {id} was aborted")));
    }
    let now = now_ms();
    let mut tx = ctx.db.begin().await?;
    let n = sqlx::query(
        "UPDATE deployment_devices SET status = 'pending', substate = NULL, attempts = attempts + 1, \
         updated_ms = $2, finished_ms = NULL WHERE deployment_id = $1 AND status = 'failure'",
    )
    .bind(&id)
    .bind(now)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if n == 0 {
        return Err(ApiError::conflict(format!(
            "deployment {id} has no failed devices"
        )));
    }
    sqlx::query(
        "UPDATE deployments SET status = 'active', finished_ms = NULL WHERE id = $1 AND status = 'finished'",
    )
    .bind(&id)
    .execute(&mut *tx)
    .await?;
    audit(
        &mut tx,
        &auth.actor(),
        "deployment.retry",
        &id,
        serde_json::json!({ "devices_retried": n }),
    )
    .await?;
    tx.commit().await?;
    Ok(axum::Json(get_one(&ctx, &id).await?))
}

/// `POST /deployments/{id}/pause`: devices get no new work from it (next answers
/// as if it were not there) until it is resumed.
pub async fn pause(
    State(ctx): State<Ctx>,
    auth: ApiAuth,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<axum::Json<Deployment>> {
    auth.require(Role::Operator)?;
    check_hex_id(&id, 32, "deployment")?;
    let mut tx = ctx.db.begin().await?;
    transition(&mut tx, &id, &["active"], "paused", now_ms()).await?;
    audit(
        &mut tx,
        &auth.actor(),
        "deployment.pause",
        &id,
        serde_json::json!({}),
    )
    .await?;
    tx.commit().await?;
    Ok(axum::Json(get_one(&ctx, &id).await?))
}

/// `POST /deployments/{id}/resume`.
pub async fn resume(
    State(ctx): State<Ctx>,
    auth: ApiAuth,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<axum::Json<Deployment>> {
    auth.require(Role::Operator)?;
    check_hex_id(&id, 32, "deployment")?;
    let mut tx = ctx.db.begin().await?;
    transition(&mut tx, &id, &["paused"], "active", now_ms()).await?;
    audit(
        &mut tx,
        &auth.actor(),
        "deployment.resume",
        &id,
        serde_json::json!({}),
    )
    .await?;
    tx.commit().await?;
    Ok(axum::Json(get_one(&ctx, &id).await?))
}
