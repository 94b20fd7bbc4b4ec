//! Device groups: static (a list of devices) and dynamic (an inventory filter,
//! evaluated whenever the group is used).

use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use sqlx::Row;

use super::audit;
use super::devices::{self, Device, parse_filter};
use super::error::{ApiError, ApiResult};
use super::extractor::{ApiAuth, ApiJson, ApiPath, Role};
use crate::Ctx;
use crate::db::now_ms;
use crate::filter;

/// The most devices a static group may list.
pub const GROUP_DEVICES_MAX: usize = 100_000;

/// A group.
#[derive(Debug, Serialize)]
pub struct Group {
    /// Its name.
    pub name: String,
    /// `static` or `dynamic`.
    pub kind: &'static str,
    /// A static group's devices.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub devices: Option<Vec<String>>,
    /// A dynamic group's filter.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub filter: Option<Vec<String>>,
    /// When it was made or last replaced.
    pub created_ms: i64,
}

/// The body of `PUT /groups/{name}`: exactly one of `devices` and `filter`.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PutGroup {
    /// Device ids, for a static group.
    #[serde(default)]
    pub devices: Option<Vec<String>>,
    /// Filter texts (all must hold), for a dynamic group.
    #[serde(default)]
    pub filter: Option<Vec<String>>,
}

fn check_name(name: &str) -> ApiResult<()> {
    if filter::valid_name(name) {
        Ok(())
    } else {
        Err(ApiError::bad(
            "group names are 1 to 128 characters of A-Z a-z 0-9 _ . - :",
        ))
    }
}

async fn get_group(ctx: &Ctx, name: &str) -> ApiResult<Group> {
    let row = sqlx::query("SELECT name, filter, created_ms FROM device_groups WHERE name = $1")
        .bind(name)
        .fetch_optional(&ctx.db)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no group {name}")))?;
    let filter: Option<String> = row.try_get("filter")?;
    let created_ms = row.try_get("created_ms")?;
    match filter {
        Some(f) => Ok(Group {
            name: name.to_owned(),
            kind: "dynamic",
            devices: None,
            filter: Some(
                serde_json::from_str(&f)
                    .map_err(|e| ApiError::Internal(format!("stored filter: {e}")))?,
            ),
            created_ms,
        }),
        None => {
            let mut devices = Vec::new();
            for r in sqlx::query(
                "SELECT device_id FROM group_members WHERE group_name = $1 ORDER BY device_id",
            )
            .bind(name)
            .fetch_all(&ctx.db)
            .await?
            {
                devices.push(r.try_get("device_id")?);
            }
            Ok(Group {
                name: name.to_owned(),
                kind: "static",
                devices: Some(devices),
                filter: None,
                created_ms,
            })
        }
    }
}

/// The devices of group `name` now (a dynamic group's filter evaluated now).
pub async fn members(ctx: &Ctx, name: &str) -> ApiResult<Vec<Device>> {
    let group = get_group(ctx, name).await?;
    let all = devices::load(ctx, None).await?;
    Ok(match (group.devices, group.filter) {
        (Some(ids), _) => all.into_iter().filter(|d| ids.contains(&d.id)).collect(),
        (None, Some(f)) => {
            let conds = parse_filter(&f)?;
            all.into_iter()
                .filter(|d| filter::matches(&conds, &d.inventory))
                .collect()
        }
        (None, None) => Vec::new(),
    })
}

/// `GET /groups`.
pub async fn list(State(ctx): State<Ctx>, auth: ApiAuth) -> ApiResult<axum::Json<Vec<Group>>> {
    auth.require(Role::Viewer)?;
    let mut out = Vec::new();
    for row in sqlx::query("SELECT name FROM device_groups ORDER BY name")
        .fetch_all(&ctx.db)
        .await?
    {
        let name: String = row.try_get("name")?;
        out.push(get_group(&ctx, &name).await?);
    }
    Ok(axum::Json(out))
}

/// `GET /groups/{name}`.
pub async fn show(
    State(ctx): State<Ctx>,
    auth: ApiAuth,
    ApiPath(name): ApiPath<String>,
) -> ApiResult<axum::Json<Group>> {
    auth.require(Role::Viewer)?;
    check_name(&name)?;
    Ok(axum::Json(get_group(&ctx, &name).await?))
}

/// `GET /groups/{name}/devices`.
pub async fn devices(
    State(ctx): State<Ctx>,
    auth: ApiAuth,
    ApiPath(name): ApiPath<String>,
) -> ApiResult<axum::Json<Vec<Device>>> {
    auth.require(Role::Viewer)?;
    check_name(&name)?;
    Ok(axum::Json(members(&ctx, &name).await?))
}

/// `PUT /groups/{name}`: creates or replaces a group.
pub async fn put(
    State(ctx): State<Ctx>,
    auth: ApiAuth,
    ApiPath(name): ApiPath<String>,
    ApiJson(body): ApiJson<PutGroup>,
) -> ApiResult<axum::Json<Group>> {
    auth.require(Role::Operator)?;
    check_name(&name)?;
    let now = now_ms();
    let (filter_json, ids) = match (&body.devices, &body.filter) {
        (Some(ids), None) => {
            if ids.len() > GROUP_DEVICES_MAX {
                return Err(ApiError::BadRequest(format!(
                    "a static group has at most {GROUP_DEVICES_MAX} devices"
                )));
            }
            (None, ids.clone())
        }
        (None, Some(f)) => {
            parse_filter(f)?;
            (
                Some(serde_json::to_string(f).map_err(|e| ApiError::Internal(e.to_string()))?),
                Vec::new(),
            )
        }
        _ => {
            return Err(ApiError::bad(
                "give exactly one of devices (a static group) and filter (a dynamic group)",
            ));
        }
    };
    let mut tx = ctx.db.begin().await?;
    for id in &ids {
        let exists = sqlx::query("SELECT 1 AS one FROM devices WHERE id = $1")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
        if exists.is_none() {
            return Err(ApiError::not_found(format!("no device {id}")));
        }
    }
    sqlx::query("DELETE FROM device_groups WHERE name = $1")
        .bind(&name)
        .execute(&mut *tx)
        .await?;
    sqlx::query("INSERT INTO device_groups (name, filter, created_ms) VALUES ($1, $2, $3)")
        .bind(&name)
        .bind(&filter_json)
        .bind(now)
        .execute(&mut *tx)
        .await?;
    for id in &ids {
        sqlx::query(
            "INSERT INTO group_members (group_name, device_id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
        )
        .bind(&name)
        .bind(id)
        .execute(&mut *tx)
        .await?;
    }
    audit(
        &mut tx,
        &auth.actor(),
        "group.put",
        &name,
        serde_json::json!({ "devices": body.devices, "filter": body.filter }),
    )
    .await?;
    tx.commit().await?;
    Ok(axum::Json(get_group(&ctx, &name).await?))
}

/// `DELETE /groups/{name}`.
pub async fn delete(
    State(ctx): State<Ctx>,
    auth: ApiAuth,
    ApiPath(name): ApiPath<String>,
) -> ApiResult<StatusCode> {
    auth.require(Role::Operator)?;
    check_name(&name)?;
    let mut tx = ctx.db.begin().await?;
    let gone = sqlx::query("DELETE FROM device_groups WHERE name = $1")
        .bind(&name)
        .execute(&mut *tx)
        .await?;
    if gone.rows_affected() == 0 {
        return Err(ApiError::not_found(format!("no group {name}")));
    }
    audit(
        &mut tx,
        &auth.actor(),
        "group.delete",
        &name,
        serde_json::json!({}),
    )
    .await?;
    tx.commit().await?;
    Ok(StatusCode::NO_CONTENT)
}
