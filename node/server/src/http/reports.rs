//! Signed status reports (`shoal_fleet::report`): devices deliver what they queued
//! while offline, with the time each thing happened; operators read them back.
//!
//! `POST /api/devices/v1/reports` takes the reports of **one** device, which need
//! not be the caller: a peer may relay another device's reports (issue 13). Each is
//! verified against the key the server holds for the device it names, so a relay can
//! neither forge nor alter them. A delivery is all or nothing: every report is
//! checked before any is stored.
//!
//! | refused because                               | status |
//! |-----------------------------------------------|--------|
//! | malformed body or report, or a report of another device than `device_id` | 400 |
//! | the device named is pending, rejected or decommissioned | 403 |
//! | no device has that id                         | 404 |
//! | a report's `seq` is stored with different content | 409 |
//! | more than [`REPORTS_MAX`] reports             | 413 |
//! | a signature does not verify with the device's key | 422 |
//!
//! A report already stored with the same text is a duplicate, not an error: delivery is
//! idempotent, and a device that lost the answer sends the same reports again.

use axum::extract::State;
use serde::{Deserialize, Serialize};
use shoal_fleet::report::{OpenError, Signed};
use sqlx::Row;

use super::check_hex_id;
use super::device::parse_public_key;
use super::error::{ApiError, ApiResult};
use super::extractor::{ApiAuth, ApiJson, ApiPath, ApiQuery, DeviceAuth, Role};
use crate::Ctx;
use crate::db::now_ms;

/// The most reports one delivery may carry.
pub const REPORTS_MAX: usize = 100;

/// A delivery of one device's signed reports.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Delivery {
    /// The device whose reports these are (64 hex digits): the caller, or another
    /// device whose reports the caller relays.
    pub device_id: String,
    /// The signed reports, in any order (devices send them oldest first).
    pub reports: Vec<Signed>,
}

/// What a delivery did.
#[derive(Debug, Serialize)]
pub struct Delivered {
    /// `seq` of the reports stored now.
    pub stored: Vec<u64>,
    /// `seq` of the reports that were stored before (same text): nothing changed.
    pub duplicates: Vec<u64>,
}

fn refused(index: usize, seq: Option<u64>, e: OpenError) -> ApiError {
    let which = match seq {
        Some(s) => format!("report {index} (seq {s})"),
        None => format!("report {index}"),
    };
    match e {
        OpenError::Signature(_) => ApiError::Unprocessable(format!("{which}: {e}")),
        OpenError::TooLong => ApiError::TooLarge(format!("{which}: {e}")),
        _ => ApiError::bad(format!("{which}: {e}")),
    }
}

/// `POST /reports`: stores a device's signed reports (see the module documentation).
pub async fn deliver(
    State(ctx): State<Ctx>,
    auth: DeviceAuth,
    ApiJson(delivery): ApiJson<Delivery>,
) -> ApiResult<axum::Json<Delivered>> {
    if delivery.reports.is_empty() {
        return Err(ApiError::bad("reports is empty"));
    }
    // The schema's maxItems: a malformed delivery (400, as for any other schema
    // violation), not a body too large to read (413).
    if delivery.reports.len() > REPORTS_MAX {
        return Err(ApiError::bad(format!(
            "a delivery has at most {REPORTS_MAX} reports"
        )));
    }
    let device = &delivery.device_id;
    if !(device.len() == 64
        && device
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
    {
        return Err(ApiError::bad("device_id is not 64 lowercase hex digits"));
    }
    let row = sqlx::query("SELECT public_key, status FROM devices WHERE id = $1")
        .bind(device)
        .fetch_optional(&ctx.db)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no device {device}")))?;
    let status: String = row.try_get("status")?;
    if status != "accepted" {
        return Err(ApiError::Forbidden(format!(
            "device {device} is {status}: its reports are not accepted"
        )));
    }
    let public_key: String = row.try_get("public_key")?;
    let key = parse_public_key(&public_key)
        .map_err(|e| ApiError::Internal(format!("stored key of device {device}: {e}")))?;
    let mut checked = Vec::with_capacity(delivery.reports.len());
    for (i, signed) in delivery.reports.iter().enumerate() {
        let claimed = signed.claimed().map_err(|e| refused(i, None, e))?;
        if &claimed.device_id != device {
            return Err(ApiError::bad(format!(
                "report {i} (seq {}) is of device {}, not {device}",
                claimed.seq, claimed.device_id
            )));
        }
        let report = signed
            .verify(|m, sig| key.verify(m, sig))
            .map_err(|e| refused(i, Some(claimed.seq), e))?;
        let seq = i64::try_from(report.seq)
            .map_err(|_| ApiError::bad(format!("report {i}: seq is larger than 2^63 - 1")))?;
        let at_ms = report
            .at_ms
            .map(i64::try_from)
            .transpose()
            .map_err(|_| ApiError::bad(format!("report {i}: at_ms is larger than 2^63 - 1")))?;
        checked.push((signed, report, seq, at_ms));
    }
    let relayed_by = (auth.device_id != *device).then(|| auth.device_id.clone());
    let now = now_ms();
    let mut out = Delivered {
        stored: Vec::new(),
        duplicates: Vec::new(),
    };
    let mut tx = ctx.db.begin().await?;
    for (signed, report, seq, at_ms) in checked {
        let inserted = sqlx::query(
            "INSERT INTO device_reports (device_id, seq, at_ms, received_ms, relayed_by, origin, \
             deployment_id, release_name, release_version, status, substate, report, signature) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13) \
             ON CONFLICT (device_id, seq) DO NOTHING",
        )
        .bind(device)
        .bind(seq)
        .bind(at_ms)
        .bind(now)
        .bind(relayed_by.as_deref())
        .bind(report.origin.as_str())
        .bind(report.deployment.as_deref())
        .bind(report.release.as_ref().map(|r| r.name.as_str()))
        .bind(report.release.as_ref().map(|r| r.version.as_str()))
        .bind(report.status.as_str())
        .bind(report.substate.as_deref())
        .bind(&signed.report)
        .bind(&signed.signature)
        .execute(&mut *tx)
        .await?;
        if inserted.rows_affected() == 1 {
            out.stored.push(report.seq);
            continue;
        }
        let stored: String =
            sqlx::query("SELECT report FROM device_reports WHERE device_id = $1 AND seq = $2")
                .bind(device)
                .bind(seq)
                .fetch_one(&mut *tx)
                .await?
                .try_get("report")?;
        if stored != signed.report {
            return Err(ApiError::conflict(format!(
                "report seq {} of device {device} is stored with different content",
                report.seq
            )));
        }
        out.duplicates.push(report.seq);
    }
    tx.commit().await?;
    tracing::info!(
        device = %device,
        relayed_by = relayed_by.as_deref().unwrap_or("-"),
        stored = out.stored.len(),
        duplicates = out.duplicates.len(),
        "device reports"
    );
    Ok(axum::Json(out))
}

/// A stored report as the management API shows it.
#[derive(Debug, Serialize)]
pub struct StoredReport {
    /// The device's report number.
    pub seq: i64,
    /// When it happened (the device's clock), Unix milliseconds.
    pub at_ms: Option<i64>,
    /// When the server stored it.
    pub received_ms: i64,
    /// The device that delivered it, when not the reporting device itself.
    pub relayed_by: Option<String>,
    /// `standalone`, `daemon` or `lan`.
    pub origin: String,
    /// The deployment it belongs to, if any.
    pub deployment_id: Option<String>,
    /// Release name.
    pub release_name: Option<String>,
    /// Release version.
    pub release_version: Option<String>,
    /// The state reported.
    pub status: String,
    /// Details.
    pub substate: Option<String>,
}

/// `GET /devices/{id}/reports?after=SEQ&limit=N`: a device's reports by `seq`.
pub async fn list(
    State(ctx): State<Ctx>,
    auth: ApiAuth,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<Vec<(String, String)>>,
) -> ApiResult<axum::Json<Vec<StoredReport>>> {
    auth.require(Role::Viewer)?;
    check_hex_id(&id, 64, "device")?;
    let (mut after, mut limit) = (0i64, 1000i64);
    for (k, v) in q {
        match k.as_str() {
            "after" => {
                after = v
                    .parse()
                    .ok()
                    .filter(|n| *n >= 0)
                    .ok_or_else(|| ApiError::bad("after must be a non-negative integer"))?;
            }
            "limit" => {
                limit = v
                    .parse()
                    .ok()
                    .filter(|n| (1..=10_000).contains(n))
                    .ok_or_else(|| ApiError::bad("limit must be 1 to 10000"))?;
            }
            other => return Err(ApiError::bad(format!("unknown query parameter {other:?}"))),
        }
    }
    if sqlx::query("SELECT id FROM devices WHERE id = $1")
        .bind(&id)
        .fetch_optional(&ctx.db)
        .await?
        .is_none()
    {
        return Err(ApiError::not_found(format!("no device {id}")));
    }
    let rows = sqlx::query(
        "SELECT seq, at_ms, received_ms, relayed_by, origin, deployment_id, release_name, \
         release_version, status, substate FROM device_reports \
         WHERE device_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
    )
    .bind(&id)
    .bind(after)
    .bind(limit)
    .fetch_all(&ctx.db)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(StoredReport {
                seq: r.try_get("seq")?,
                at_ms: r.try_get("at_ms")?,
                received_ms: r.try_get("received_ms")?,
                relayed_by: r.try_get("relayed_by")?,
                origin: r.try_get("origin")?,
                deployment_id: r.try_get("deployment_id")?,
                release_name: r.try_get("release_name")?,
                release_version: r.try_get("release_version")?,
                status: r.try_get("status")?,
                substate: r.try_get("substate")?,
            })
        })
        .collect::<ApiResult<Vec<_>>>()
        .map(axum::Json)
}
