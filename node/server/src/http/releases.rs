//! Releases: `.shoal` artifacts uploaded by operators, verified against the
//! server's trust root while they stream in (nothing is listed before the whole
//! artifact verified), listed, deleted (refused while a deployment uses them), and
//! a delta preview: what a device on each currently installed release must fetch.
//!
//! Devices report their installed release in the inventory attributes
//! `release_name` and `release_version`.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::body::Body;
use axum::extract::State;
use axum::http::StatusCode;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use sqlx::Row;

use super::error::{ApiError, ApiResult};
use super::extractor::{ApiAuth, ApiPath, Role};
use super::{audit, check_hex_id};
use crate::Ctx;
use crate::chunks::AddError;
use crate::db::now_ms;

/// A release.
#[derive(Debug, Clone, Serialize)]
pub struct Release {
    /// The BLAKE3 hash of its manifest, in hex.
    pub id: String,
    /// Its name.
    pub name: String,
    /// Its version.
    pub version: String,
    /// Device types it is compatible with (empty: any).
    pub device_types: Vec<String>,
    /// Bytes of its payloads, uncompressed.
    pub payload_bytes: i64,
    /// Bytes of its distinct chunks as stored (compressed).
    pub stored_bytes: i64,
    /// Its distinct chunks.
    pub chunks: i64,
    /// When it was uploaded.
    pub created_ms: i64,
}

fn from_row(row: &sqlx::any::AnyRow) -> ApiResult<Release> {
    let types: String = row.try_get("device_types")?;
    Ok(Release {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        version: row.try_get("version")?,
        device_types: serde_json::from_str(&types)
            .map_err(|e| ApiError::Internal(format!("stored device types: {e}")))?,
        payload_bytes: row.try_get("payload_bytes")?,
        stored_bytes: row.try_get("stored_bytes")?,
        chunks: row.try_get("chunks")?,
        created_ms: row.try_get("created_ms")?,
    })
}

/// The release with id `id`, or 404.
pub async fn get_one(ctx: &Ctx, id: &str) -> ApiResult<Release> {
    check_hex_id(id, 64, "release")?;
    let row = sqlx::query("SELECT * FROM releases WHERE id = $1")
        .bind(id)
        .fetch_optional(&ctx.db)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no release {id}")))?;
    from_row(&row)
}

/// `GET /releases`.
pub async fn list(State(ctx): State<Ctx>, auth: ApiAuth) -> ApiResult<axum::Json<Vec<Release>>> {
    auth.require(Role::Viewer)?;
    let rows = sqlx::query("SELECT * FROM releases ORDER BY name, created_ms")
        .fetch_all(&ctx.db)
        .await?;
    Ok(axum::Json(
        rows.iter().map(from_row).collect::<ApiResult<_>>()?,
    ))
}

/// `GET /releases/{id}`.
pub async fn show(
    State(ctx): State<Ctx>,
    auth: ApiAuth,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<axum::Json<Release>> {
    auth.require(Role::Viewer)?;
    Ok(axum::Json(get_one(&ctx, &id).await?))
}

/// `POST /releases`: the body is a `.shoal` artifact (any content type), read as
/// it arrives. Its envelope must verify against the server's trust root before a
/// chunk is stored, each chunk is verified before it is stored, and the release is
/// listed only after all of it verified. 201 with the release; 200 if the same
/// release was already there; 409 if another release has its name and version;
/// 413 past the upload limit; 422 if it does not verify.
pub async fn upload(
    State(ctx): State<Ctx>,
    auth: ApiAuth,
    body: Body,
) -> ApiResult<(StatusCode, axum::Json<Release>)> {
    let max = ctx.limits.upload_max_bytes;
    if let Err(e) = auth.require(Role::Operator) {
        // A known token without the role: read the rest of the body (bounded by the
        // upload limit) so the client, still sending, gets the 403 instead of a reset
        // connection (the test saw exit 75, "broken pipe", in place of the answer).
        let mut rest = body.into_data_stream();
        let mut seen: u64 = 0;
        while let Some(Ok(chunk)) = rest.next().await {
            seen += chunk.len() as u64;
            if seen > max {
                break;
            }
        }
        return Err(e);
    }
    let too_large = Arc::new(AtomicBool::new(false));
    let flag = too_large.clone();
    let mut seen: u64 = 0;
    let stream = body.into_data_stream().map(move |chunk| {
        let chunk = chunk.map_err(std::io::Error::other)?;
        seen += chunk.len() as u64;
        if seen > max {
            flag.store(true, Ordering::Relaxed);
            return Err(std::io::Error::other("upload too large"));
        }
        Ok(chunk)
    });
    let reader = tokio_util::io::StreamReader::new(stream);
    let guard = ctx.store_lock.lock().await;
    let c = ctx.clone();
    let now_s = u64::try_from(now_ms() / 1000).ok();
    let added = tokio::task::spawn_blocking(move || {
        let sync = tokio_util::io::SyncIoBridge::new(reader);
        let mut src = std::io::BufReader::with_capacity(256 * 1024, sync);
        let result = c.store.add_artifact_blocking(&mut src, &c.root, now_s);
        if result.is_err() {
            // Read the rest (bounded by the upload limit) so the client, still
            // sending, gets the answer instead of a reset connection.
            let _ = std::io::copy(&mut src, &mut std::io::sink());
        }
        result
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))?;
    drop(guard);
    let report = match added {
        Ok(r) => r,
        Err(_) if too_large.load(Ordering::Relaxed) => {
            return Err(ApiError::TooLarge(format!(
                "the artifact is larger than the upload limit of {max} bytes"
            )));
        }
        Err(e @ AddError::Storage(_)) => return Err(ApiError::Internal(e.to_string())),
        Err(e) => {
            tracing::warn!(error = %e, "artifact upload refused");
            return Err(ApiError::Unprocessable(format!("artifact refused: {e}")));
        }
    };
    let m = &report.manifest;
    let id = hex::encode(m.hash());
    if let Some(row) = sqlx::query("SELECT id FROM releases WHERE name = $1 AND version = $2")
        .bind(&m.name)
        .bind(&m.version)
        .fetch_optional(&ctx.db)
        .await?
    {
        let existing: String = row.try_get("id")?;
        if existing == id {
            return Ok((StatusCode::OK, axum::Json(get_one(&ctx, &id).await?)));
        }
        // Not listed: take the manifest back out (its chunks stay, shared or not,
        // until a deletion collects them).
        let c = ctx.clone();
        let hash = m.hash();
        let _ = tokio::task::spawn_blocking(move || c.store.remove_manifest_blocking(&hash)).await;
        return Err(ApiError::conflict(format!(
            "release {} {} already exists with other content ({existing})",
            m.name, m.version
        )));
    }
    let distinct = m.distinct_chunks();
    let payload_bytes: u64 = m.payloads.iter().map(|p| p.size).sum();
    let stored_bytes: u64 = distinct.iter().map(|c| u64::from(c.stored_size)).sum();
    let mut tx = ctx.db.begin().await?;
    sqlx::query(
        "INSERT INTO releases (id, name, version, device_types, payload_bytes, stored_bytes, chunks, created_ms) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(&id)
    .bind(&m.name)
    .bind(&m.version)
    .bind(serde_json::to_string(&m.device_types).map_err(|e| ApiError::Internal(e.to_string()))?)
    .bind(i64::try_from(payload_bytes).unwrap_or(i64::MAX))
    .bind(i64::try_from(stored_bytes).unwrap_or(i64::MAX))
    .bind(distinct.len() as i64)
    .bind(now_ms())
    .execute(&mut *tx)
    .await?;
    audit(
        &mut tx,
        &auth.actor(),
        "release.upload",
        &id,
        serde_json::json!({
            "name": m.name, "version": m.version,
            "chunks_added": report.chunks_added, "chunks_present": report.chunks_present,
        }),
    )
    .await?;
    tx.commit().await?;
    tracing::info!(release = %id, name = %m.name, version = %m.version, chunks_added = report.chunks_added, "release uploaded");
    // Per-base encodings against the releases most of the fleet runs, in the
    // background (devices polling before they are done get plain chunks).
    match super::devices::load(&ctx, Some("accepted")).await {
        Ok(devices) => {
            if let Err(e) =
                crate::encode_jobs::plan(&ctx, &id, devices.iter().map(|d| &d.inventory)).await
            {
                tracing::warn!(release = %id, error = %e, "cannot queue per-base encodings");
            }
        }
        Err(e) => tracing::warn!(release = %id, error = ?e, "cannot queue per-base encodings"),
    }
    Ok((StatusCode::CREATED, axum::Json(get_one(&ctx, &id).await?)))
}

/// `DELETE /releases/{id}`: 409 while a running, paused or halted deployment uses
/// it.
/// Removes its manifest and the chunks no other release lists.
pub async fn delete(
    State(ctx): State<Ctx>,
    auth: ApiAuth,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<StatusCode> {
    auth.require(Role::Operator)?;
    let release = get_one(&ctx, &id).await?;
    let guard = ctx.store_lock.lock().await;
    let mut tx = ctx.db.begin().await?;
    let users = sqlx::query(
        "SELECT id FROM deployments WHERE release_id = $1 AND status IN ('running', 'paused', 'halted') ORDER BY id",
    )
    .bind(&id)
    .fetch_all(&mut *tx)
    .await?;
    if !users.is_empty() {
        let ids: Vec<String> = users
            .iter()
            .map(|r| r.try_get("id"))
            .collect::<Result<_, _>>()?;
        return Err(ApiError::conflict(format!(
            "release {} {} is used by deployment(s) {}; abort or finish them first",
            release.name,
            release.version,
            ids.join(", ")
        )));
    }
    // Its per-base encodings, as target and as base (their store objects below).
    sqlx::query("DELETE FROM encodings WHERE release_id = $1 OR base_id = $1")
        .bind(&id)
        .execute(&mut *tx)
        .await?;
    sqlx::query("DELETE FROM releases WHERE id = $1")
        .bind(&id)
        .execute(&mut *tx)
        .await?;
    audit(
        &mut tx,
        &auth.actor(),
        "release.delete",
        &id,
        serde_json::json!({ "name": release.name, "version": release.version }),
    )
    .await?;
    let others: Vec<String> = sqlx::query("SELECT id FROM releases")
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .map(|r| r.try_get("id"))
        .collect::<Result<_, _>>()?;
    tx.commit().await?;
    // Collect the chunks only this release listed.
    let c = ctx.clone();
    let removed = tokio::task::spawn_blocking(move || -> ApiResult<(usize, u64)> {
        let gone = c
            .releases
            .load(&c.store, &c.root, &id)
            .map_err(|e| ApiError::Internal(format!("loading release: {e}")))?;
        let mut keep = HashSet::new();
        for o in &others {
            let r = c
                .releases
                .load(&c.store, &c.root, o)
                .map_err(|e| ApiError::Internal(format!("loading release {o}: {e}")))?;
            keep.extend(r.chunks.keys().copied());
        }
        let hash: shoal_artifact::manifest::ChunkId = id
            .parse()
            .map_err(|_| ApiError::Internal("release id".into()))?;
        // The manifest first: a release is never listed in the store without all
        // its chunks.
        c.store
            .remove_manifest_blocking(&hash.0)
            .map_err(|e| ApiError::Internal(format!("removing the manifest: {e}")))?;
        let removed = c
            .store
            .remove_chunks_blocking(gone.chunks.keys().filter(|k| !keep.contains(*k)))
            .map_err(|e| ApiError::Internal(format!("removing chunks: {e}")))?;
        // Its per-base encodings (as base and as target), after the manifest.
        let pruned = c
            .store
            .prune_encodings_blocking(&hash.0)
            .map_err(|e| ApiError::Internal(format!("removing per-base encodings: {e}")))?;
        c.releases.forget(&id);
        c.encodings.forget_involving(&hash.0);
        Ok((removed, pruned.objects))
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))??;
    drop(guard);
    let (removed, encodings_removed) = removed;
    tracing::info!(release = %release.id, chunks_removed = removed, encodings_removed, "release deleted");
    Ok(StatusCode::NO_CONTENT)
}

/// What devices on one installed release must fetch for a release.
#[derive(Debug, Serialize)]
pub struct DeltaRow {
    /// The installed release's name (`null` for devices that report none).
    pub installed_name: Option<String>,
    /// Its version.
    pub installed_version: Option<String>,
    /// Whether the server has that release, so the figure is exact; if not, the
    /// figure is the whole release.
    pub known: bool,
    /// Accepted devices on it.
    pub devices: i64,
    /// Chunks they must fetch.
    pub chunks: u64,
    /// Stored bytes they must fetch.
    pub bytes: u64,
}

/// The delta preview of a release.
#[derive(Debug, Serialize)]
pub struct Delta {
    /// The release.
    pub release: Release,
    /// One row per installed release among accepted devices.
    pub installed: Vec<DeltaRow>,
}

/// `GET /releases/{id}/delta`.
pub async fn delta(
    State(ctx): State<Ctx>,
    auth: ApiAuth,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<axum::Json<Delta>> {
    auth.require(Role::Viewer)?;
    let release = get_one(&ctx, &id).await?;
    let devices = super::devices::load(&ctx, Some("accepted")).await?;
    let mut groups: BTreeMap<(Option<String>, Option<String>), i64> = BTreeMap::new();
    for d in &devices {
        let key = (
            d.inventory.get("release_name").cloned(),
            d.inventory.get("release_version").cloned(),
        );
        *groups.entry(key).or_default() += 1;
    }
    let mut installed_ids = BTreeMap::new();
    for row in sqlx::query("SELECT id, name, version FROM releases")
        .fetch_all(&ctx.db)
        .await?
    {
        let n: String = row.try_get("name")?;
        let v: String = row.try_get("version")?;
        installed_ids.insert((Some(n), Some(v)), row.try_get::<String, _>("id")?);
    }
    let c = ctx.clone();
    let rows = tokio::task::spawn_blocking(move || -> ApiResult<Vec<DeltaRow>> {
        let load = |rid: &str| {
            c.releases
                .load(&c.store, &c.root, rid)
                .map_err(|e| ApiError::Internal(format!("loading release {rid}: {e}")))
        };
        let target = load(&id)?;
        let mut out = Vec::new();
        for ((name, version), count) in groups {
            let base = match installed_ids.get(&(name.clone(), version.clone())) {
                Some(bid) => Some(load(bid)?),
                None => None,
            };
            let (mut chunks, mut bytes) = (0u64, 0u64);
            for (cid, stored) in &target.chunks {
                if base.as_ref().is_some_and(|b| b.chunks.contains_key(cid)) {
                    continue;
                }
                chunks += 1;
                bytes += u64::from(*stored);
            }
            out.push(DeltaRow {
                installed_name: name,
                installed_version: version,
                known: base.is_some(),
                devices: count,
                chunks,
                bytes,
            });
        }
        Ok(out)
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))??;
    Ok(axum::Json(Delta {
        release,
        installed: rows,
    }))
}

/// What to encode a release against.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EncodeRequest {
    /// The base release's id (its manifest hash, 64 hex digits): devices running it
    /// get the release's changed chunks delta-encoded against its bytes.
    pub base: String,
}

/// What an encoding did.
#[derive(Debug, Serialize)]
pub struct EncodeReport {
    /// The release encoded.
    pub release: String,
    /// The base it was encoded against.
    pub base: String,
    /// The figures ([`crate::encodings::Encoded`]).
    #[serde(flatten)]
    pub encoded: crate::encodings::Encoded,
}

/// `POST /releases/{id}/encodings`: computes and stores the release's per-base
/// encodings against `base` ([`crate::encodings`]), then answers 200 with the
/// figures; 404 for an unknown release or base; 422 when they cannot be encoded
/// (no rootfs payload of the same name). One encoding runs at a time.
pub async fn encode(
    State(ctx): State<Ctx>,
    auth: ApiAuth,
    ApiPath(id): ApiPath<String>,
    super::extractor::ApiJson(req): super::extractor::ApiJson<EncodeRequest>,
) -> ApiResult<axum::Json<EncodeReport>> {
    auth.require(Role::Operator)?;
    check_hex_id(&req.base, 64, "base release")?;
    if req.base == id {
        return Err(ApiError::bad("a release is not encoded against itself"));
    }
    get_one(&ctx, &id).await?;
    get_one(&ctx, &req.base).await?;
    let c = ctx.clone();
    let (rid, bid) = (id.clone(), req.base.clone());
    let started = std::time::Instant::now();
    let encoded = tokio::task::spawn_blocking(move || -> ApiResult<crate::encodings::Encoded> {
        let load = |rid: &str| {
            c.releases
                .load(&c.store, &c.root, rid)
                .map_err(|e| ApiError::Internal(format!("loading release {rid}: {e}")))
        };
        let (release, base) = (load(&rid)?, load(&bid)?);
        let out =
            crate::encodings::encode_blocking(&c.store, &base, &release).map_err(|e| match e {
                crate::encodings::EncodeError::NoPayload(m) => ApiError::Unprocessable(m),
                e => ApiError::Internal(format!("encoding: {e}")),
            })?;
        c.encodings.forget(&release.manifest.hash());
        Ok(out)
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))??;
    crate::encode_jobs::record_operator(&ctx.db, &id, &req.base, &encoded).await?;
    let mut tx = ctx.db.begin().await?;
    audit(
        &mut tx,
        &auth.actor(),
        "release.encode",
        &id,
        serde_json::json!({ "base": req.base, "chunks_delta": encoded.chunks_delta, "encoded_bytes": encoded.encoded_bytes }),
    )
    .await?;
    tx.commit().await?;
    tracing::info!(release = %id, base = %req.base, chunks = encoded.chunks, chunks_delta = encoded.chunks_delta, plain_bytes = encoded.plain_bytes, encoded_bytes = encoded.encoded_bytes, ms = started.elapsed().as_millis() as u64, "per-base encodings stored");
    Ok(axum::Json(EncodeReport {
        release: id,
        base: req.base,
        encoded,
    }))
}

/// `GET /releases/{id}/encodings`: the release's per-base encodings
/// ([`crate::encode_jobs`]), queued, running, done or failed.
pub async fn encodings(
    State(ctx): State<Ctx>,
    auth: ApiAuth,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<axum::Json<Vec<crate::encode_jobs::EncodingRow>>> {
    auth.require(Role::Viewer)?;
    get_one(&ctx, &id).await?;
    Ok(axum::Json(crate::encode_jobs::list(&ctx.db, &id).await?))
}
