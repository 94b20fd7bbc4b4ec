//! Management of devices: list (by status and inventory filter), show, accept,
//! reject, preauthorize, decommission.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use sqlx::Row;

use super::device::parse_public_key;
use super::error::{ApiError, ApiResult};
use super::extractor::{ApiAuth, ApiJson, ApiPath, ApiQuery, Role};
use super::{audit, check_hex_id};
use crate::Ctx;
use crate::db::now_ms;
use crate::filter;
use crate::rollouts;
use crate::view;
use shoal_fleet::filter::Filter;

/// The device statuses.
pub const STATUSES: &[&str] = &["pending", "accepted", "rejected", "preauthorized"];

/// A device as the management API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Device {
    /// Its id: the BLAKE3 key id of its ed25519 public key, in hex.
    pub id: String,
    /// Its ed25519 public key, in hex.
    pub public_key: String,
    /// Identity attributes from its auth requests.
    pub identity: BTreeMap<String, String>,
    /// pending, accepted, rejected or preauthorized.
    pub status: String,
    /// When it was first seen or preauthorized.
    pub created_ms: i64,
    /// When its status last changed.
    pub updated_ms: i64,
    /// When it last authenticated or polled.
    pub last_seen_ms: Option<i64>,
    /// Its inventory.
    pub inventory: BTreeMap<String, String>,
}

/// All devices (with `status`, if given), ordered by id, with inventories.
pub async fn load(ctx: &Ctx, status: Option<&str>) -> ApiResult<Vec<Device>> {
    let rows = match status {
        Some(s) => {
            sqlx::query("SELECT * FROM devices WHERE status = $1 ORDER BY id")
                .bind(s)
                .fetch_all(&ctx.db)
                .await?
        }
        None => {
            sqlx::query("SELECT * FROM devices ORDER BY id")
                .fetch_all(&ctx.db)
                .await?
        }
    };
    let mut inventories: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    for row in sqlx::query("SELECT device_id, name, value FROM inventory")
        .fetch_all(&ctx.db)
        .await?
    {
        inventories
            .entry(row.try_get("device_id")?)
            .or_default()
            .insert(row.try_get("name")?, row.try_get("value")?);
    }
    rows.iter()
        .map(|row| {
            let id: String = row.try_get("id")?;
            let identity: String = row.try_get("identity")?;
            Ok(Device {
                public_key: row.try_get("public_key")?,
                identity: serde_json::from_str(&identity)
                    .map_err(|e| ApiError::Internal(format!("stored identity: {e}")))?,
                status: row.try_get("status")?,
                created_ms: row.try_get("created_ms")?,
                updated_ms: row.try_get("updated_ms")?,
                last_seen_ms: row.try_get("last_seen_ms")?,
                inventory: inventories.remove(&id).unwrap_or_default(),
                id,
            })
        })
        .collect()
}

/// Parses filter texts into one filter (400 on a bad one).
pub fn parse_filter(texts: &[String]) -> ApiResult<Option<Filter>> {
    filter::parse(texts).map_err(|e| ApiError::bad(e.to_string()))
}

/// Query of `GET /devices`: `status=...`, `filter=COND` (repeatable), `limit`,
/// `offset`.
fn parse_list_query(
    pairs: Vec<(String, String)>,
) -> ApiResult<(Option<String>, Vec<String>, usize, usize)> {
    let (mut status, mut filters, mut limit, mut offset) = (None, Vec::new(), 1000usize, 0usize);
    for (k, v) in pairs {
        match k.as_str() {
            "status" => {
                if !STATUSES.contains(&v.as_str()) {
                    return Err(ApiError::bad(format!(
                        "unknown status {v:?} (one of: {})",
                        STATUSES.join(", ")
                    )));
                }
                status = Some(v);
            }
            "filter" => filters.push(v),
            "limit" => {
                limit = v
                    .parse()
                    .ok()
                    .filter(|n| (1..=10_000).contains(n))
                    .ok_or_else(|| ApiError::bad("limit must be 1 to 10000"))?;
            }
            "offset" => {
                offset = v
                    .parse()
                    .map_err(|_| ApiError::bad("offset must be a non-negative integer"))?;
            }
            other => return Err(ApiError::bad(format!("unknown query parameter {other:?}"))),
        }
    }
    Ok((status, filters, limit, offset))
}

/// `GET /devices`.
pub async fn list(
    State(ctx): State<Ctx>,
    auth: ApiAuth,
    ApiQuery(q): ApiQuery<Vec<(String, String)>>,
) -> ApiResult<axum::Json<Vec<Device>>> {
    auth.require(Role::Viewer)?;
    let (status, filters, limit, offset) = parse_list_query(q)?;
    let conds = parse_filter(&filters)?;
    let devices = load(&ctx, status.as_deref()).await?;
    Ok(axum::Json(
        devices
            .into_iter()
            .filter(|d| filter::matches(&conds, &d.inventory))
            .skip(offset)
            .take(limit)
            .collect(),
    ))
}

/// One device by id, or 404.
pub async fn get_one(ctx: &Ctx, id: &str) -> ApiResult<Device> {
    check_hex_id(id, 64, "device")?;
    let row = sqlx::query("SELECT * FROM devices WHERE id = $1")
        .bind(id)
        .fetch_optional(&ctx.db)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no device {id}")))?;
    let mut inventory = BTreeMap::new();
    for r in sqlx::query("SELECT name, value FROM inventory WHERE device_id = $1")
        .bind(id)
        .fetch_all(&ctx.db)
        .await?
    {
        inventory.insert(r.try_get("name")?, r.try_get("value")?);
    }
    let identity: String = row.try_get("identity")?;
    Ok(Device {
        id: row.try_get("id")?,
        public_key: row.try_get("public_key")?,
        identity: serde_json::from_str(&identity)
            .map_err(|e| ApiError::Internal(format!("stored identity: {e}")))?,
        status: row.try_get("status")?,
        created_ms: row.try_get("created_ms")?,
        updated_ms: row.try_get("updated_ms")?,
        last_seen_ms: row.try_get("last_seen_ms")?,
        inventory,
    })
}

/// `GET /devices/{id}`.
pub async fn show(
    State(ctx): State<Ctx>,
    auth: ApiAuth,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<axum::Json<Device>> {
    auth.require(Role::Viewer)?;
    Ok(axum::Json(get_one(&ctx, &id).await?))
}

async fn set_status(
    ctx: &Ctx,
    auth: &ApiAuth,
    id: &str,
    to: &str,
) -> ApiResult<axum::Json<Device>> {
    auth.require(Role::Operator)?;
    let device = get_one(ctx, id).await?;
    if device.status == to {
        return Ok(axum::Json(device));
    }
    if device.status == "preauthorized" {
        return Err(ApiError::conflict(format!(
            "device {id} is preauthorized and has not authenticated yet; decommission it to withdraw the key"
        )));
    }
    let now = now_ms();
    let mut tx = ctx.db.begin().await?;
    sqlx::query("UPDATE devices SET status = $2, updated_ms = $3 WHERE id = $1")
        .bind(id)
        .bind(to)
        .bind(now)
        .execute(&mut *tx)
        .await?;
    let action = if to == "accepted" {
        "device.accept"
    } else {
        "device.reject"
    };
    audit(
        &mut tx,
        &auth.actor(),
        action,
        id,
        serde_json::json!({ "from": device.status }),
    )
    .await?;
    if to != "accepted" {
        // Every token it holds is refused: at once by the endpoints that check the
        // database, by polls on every server within the view's staleness bound.
        view::revoke(&mut tx, id).await?;
    }
    tx.commit().await?;
    view::refresh_after_commit(ctx).await;
    Ok(axum::Json(get_one(ctx, id).await?))
}

/// `POST /devices/{id}/accept`.
pub async fn accept(
    State(ctx): State<Ctx>,
    auth: ApiAuth,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<axum::Json<Device>> {
    set_status(&ctx, &auth, &id, "accepted").await
}

/// `POST /devices/{id}/reject`: also revokes its tokens.
pub async fn reject(
    State(ctx): State<Ctx>,
    auth: ApiAuth,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<axum::Json<Device>> {
    set_status(&ctx, &auth, &id, "rejected").await
}

/// A key to preauthorize.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Preauthorize {
    /// Identity attributes to show until the device authenticates.
    pub identity: BTreeMap<String, String>,
    /// The device's ed25519 public key, 32 bytes in hex.
    pub public_key: String,
}

/// `POST /devices`: preauthorizes a key; its first auth request is accepted.
pub async fn preauthorize(
    State(ctx): State<Ctx>,
    auth: ApiAuth,
    ApiJson(req): ApiJson<Preauthorize>,
) -> ApiResult<(StatusCode, axum::Json<Device>)> {
    auth.require(Role::Operator)?;
    for (k, v) in &req.identity {
        if !filter::valid_name(k) || v.len() > super::device::VALUE_LEN_MAX {
            return Err(ApiError::bad(format!("bad identity attribute {k:?}")));
        }
    }
    let key = parse_public_key(&req.public_key)?;
    let id = hex::encode(key.id().0);
    let now = now_ms();
    let mut tx = ctx.db.begin().await?;
    let inserted = sqlx::query(
        "INSERT INTO devices (id, public_key, identity, status, created_ms, updated_ms) \
         VALUES ($1, $2, $3, 'preauthorized', $4, $4) ON CONFLICT (id) DO NOTHING",
    )
    .bind(&id)
    .bind(hex::encode(key.to_bytes()))
    .bind(serde_json::to_string(&req.identity).map_err(|e| ApiError::Internal(e.to_string()))?)
    .bind(now)
    .execute(&mut *tx)
    .await?;
    if inserted.rows_affected() != 1 {
        return Err(ApiError::conflict(format!(
            "device {id} already exists; accept it instead"
        )));
    }
    audit(
        &mut tx,
        &auth.actor(),
        "device.preauthorize",
        &id,
        serde_json::json!({ "identity": req.identity }),
    )
    .await?;
    tx.commit().await?;
    Ok((StatusCode::CREATED, axum::Json(get_one(&ctx, &id).await?)))
}

/// `DELETE /devices/{id}`: decommissions a device: its tokens, inventory and group
/// memberships go, its unfinished deployments end as `aborted` (substate
/// `decommissioned`). If its key
/// authenticates again it is a new, pending device.
pub async fn decommission(
    State(ctx): State<Ctx>,
    auth: ApiAuth,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<StatusCode> {
    auth.require(Role::Operator)?;
    let device = get_one(&ctx, &id).await?;
    let now = now_ms();
    let mut tx = ctx.db.begin().await?;
    // Its unfinished deployments: each rollout counts it out (as aborted).
    let open: Vec<String> = sqlx::query(
        "SELECT deployment_id FROM deployment_devices WHERE device_id = $1 \
         AND status IN ('pending', 'downloading', 'installing', 'rebooting') ORDER BY deployment_id",
    )
    .bind(&id)
    .fetch_all(&mut *tx)
    .await?
    .iter()
    .map(|r| r.try_get("deployment_id"))
    .collect::<Result<_, _>>()?;
    for dep in &open {
        let mut rollout = rollouts::lock(&mut tx, dep).await?;
        if let Some(mut entry) = rollouts::entry(&mut tx, dep, &id).await? {
            let effects = rollout
                .decommissioned(&mut entry, rollouts::instant(now))
                .map_err(|e| ApiError::Internal(e.to_string()))?;
            rollouts::save(&mut tx, dep, &rollout, &[entry], &effects, now).await?;
            sqlx::query(
                "UPDATE deployment_devices SET substate = 'decommissioned' \
                 WHERE deployment_id = $1 AND device_id = $2",
            )
            .bind(dep)
            .bind(&id)
            .execute(&mut *tx)
            .await?;
        }
    }
    // Its fleet credential is refused by its peers until it would have expired.
    if let Some(fleet) = &ctx.fleet {
        let until =
            now.saturating_add(i64::try_from(fleet.ttl_s.saturating_mul(1000)).unwrap_or(i64::MAX));
        sqlx::query(
            "INSERT INTO revoked_keys (public_key, until_ms) VALUES ($1, $2) \
             ON CONFLICT (public_key) DO UPDATE SET until_ms = excluded.until_ms",
        )
        .bind(&device.public_key)
        .bind(until)
        .execute(&mut *tx)
        .await?;
    }
    sqlx::query("DELETE FROM devices WHERE id = $1")
        .bind(&id)
        .execute(&mut *tx)
        .await?;
    audit(
        &mut tx,
        &auth.actor(),
        "device.decommission",
        &id,
        serde_json::json!({ "status": device.status, "identity": device.identity }),
    )
    .await?;
    // Its tokens are refused (the epoch outlives the row, so a key that comes back
    // never revives them); last, as `view::revoke` asks.
    view::revoke(&mut tx, &id).await?;
    tx.commit().await?;
    view::refresh_after_commit(&ctx).await;
    Ok(StatusCode::NO_CONTENT)
}
