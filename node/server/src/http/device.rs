//! The device API, `/api/devices/v1`.
//!
//! Authentication follows Mender's `auth_requests`, with the device's ed25519 key:
//! the device gets a one-time nonce, POSTs `{identity, public_key, nonce}` with the
//! body's signature in `X-Shoal-Signature` (hex), and gets a bearer token if it is
//! accepted (401 while it is pending or rejected). A device is named by its key's
//! id, so the key that signs its auth requests is also its LAN identity.
//!
//! Chunks: `POST .../deployments/{id}/chunks` with `{"ids": [...]}` (only ids of
//! the deployment's release, at most [`CHUNK_BATCH_IDS_MAX`] ids and
//! [`CHUNK_BATCH_BYTES_MAX`] stored bytes) answers `application/vnd.shoal.chunks`:
//! for each id in the order asked, the 32-byte id, its stored length as a
//! big-endian `u32`, then the stored (zstd or raw) bytes as in the chunk store.
//! `Content-Length` is exact, so a cut connection is always noticed.

use std::collections::{BTreeMap, HashSet};

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};
use shoal_artifact::manifest::ChunkId;
use shoal_signing::PublicKey;
use sqlx::Row;

use super::error::{ApiError, ApiResult};
use super::extractor::{ApiJson, ApiPath, ApiQuery, DeviceAuth, DeviceToken, device_token_refused};
use super::{audit, check_hex_id};
use crate::Ctx;
use crate::db::{now_ms, random_hex};
use crate::filter::valid_name;
use crate::rollouts;
use crate::view::{DeviceKey, Verdict};
use shoal_fleet::{Admission, ReportError, Status};

/// The header holding the hex ed25519 signature of an auth request's body.
pub const SIGNATURE_HEADER: &str = "x-shoal-signature";
/// The largest auth request body.
pub const AUTH_REQUEST_MAX: usize = 64 * 1024;
/// How long an auth nonce is valid, in milliseconds.
pub const NONCE_TTL_MS: i64 = 60_000;
/// The most identity attributes an auth request may carry.
pub const IDENTITY_ATTRIBUTES_MAX: usize = 32;
/// The most chunk ids in one batch.
pub const CHUNK_BATCH_IDS_MAX: usize = 4096;
/// The most stored bytes one batch may ask for.
pub const CHUNK_BATCH_BYTES_MAX: u64 = 64 * 1024 * 1024;
/// Chunk store requests one chunk batch has in flight at once.
const STORE_REQUESTS_MAX: usize = 8;
/// The most inventory attributes a device may have.
pub const INVENTORY_ATTRIBUTES_MAX: usize = 256;
/// The longest inventory or identity value, in bytes.
pub const VALUE_LEN_MAX: usize = 1024;
/// The most log lines in one upload.
pub const LOG_LINES_MAX: usize = 1000;
/// The longest log line, in bytes.
pub const LOG_LINE_LEN_MAX: usize = 4096;

/// A fresh auth nonce.
#[derive(Debug, Serialize)]
pub struct Nonce {
    /// The nonce, to put in the next auth request.
    pub nonce: String,
    /// How long it stays valid.
    pub expires_in_s: i64,
}

/// `GET /authentication/nonce`: a nonce for one auth request (single use, 60 s).
pub async fn nonce(ctx: axum::extract::State<Ctx>) -> ApiResult<axum::Json<Nonce>> {
    let now = now_ms();
    sqlx::query("DELETE FROM auth_nonces WHERE expires_ms <= $1")
        .bind(now)
        .execute(&ctx.db)
        .await?;
    let nonce = random_hex(16);
    sqlx::query("INSERT INTO auth_nonces (nonce, expires_ms) VALUES ($1, $2)")
        .bind(&nonce)
        .bind(now + NONCE_TTL_MS)
        .execute(&ctx.db)
        .await?;
    Ok(axum::Json(Nonce {
        nonce,
        expires_in_s: NONCE_TTL_MS / 1000,
    }))
}

/// An auth request's body.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AuthRequest {
    /// Identity attributes (e.g. `mac`, `serial`), shown to operators.
    pub identity: BTreeMap<String, String>,
    /// The device's ed25519 public key, 32 bytes in hex.
    pub public_key: String,
    /// A nonce from `GET /authentication/nonce`.
    pub nonce: String,
}

/// The answer to an accepted device's auth request.
#[derive(Debug, Serialize)]
pub struct AuthToken {
    /// The bearer token for the other device endpoints.
    pub token: String,
    /// The device's id (its key id).
    pub device_id: String,
    /// Seconds until the token expires.
    pub expires_in_s: i64,
}

fn check_identity(identity: &BTreeMap<String, String>) -> ApiResult<()> {
    if identity.is_empty() {
        return Err(ApiError::bad("identity must have at least one attribute"));
    }
    if identity.len() > IDENTITY_ATTRIBUTES_MAX {
        return Err(ApiError::bad(format!(
            "identity has more than {IDENTITY_ATTRIBUTES_MAX} attributes"
        )));
    }
    for (k, v) in identity {
        if !valid_name(k) {
            return Err(ApiError::bad(format!(
                "identity attribute name {k:?} is not 1 to 128 characters of A-Z a-z 0-9 _ . - :"
            )));
        }
        if v.len() > VALUE_LEN_MAX {
            return Err(ApiError::bad(format!(
                "identity attribute {k} is longer than {VALUE_LEN_MAX} bytes"
            )));
        }
    }
    Ok(())
}

/// Parses a hex ed25519 public key.
pub fn parse_public_key(hex_key: &str) -> ApiResult<PublicKey> {
    let bytes: [u8; 32] = hex::decode(hex_key)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| ApiError::bad("public_key is not 32 bytes of hex"))?;
    PublicKey::from_bytes(&bytes)
        .map_err(|e| ApiError::bad(format!("public_key is not an ed25519 key: {e}")))
}

/// `POST /authentication/auth_requests`.
pub async fn auth_request(
    ctx: axum::extract::State<Ctx>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<axum::Json<AuthToken>> {
    if body.len() > AUTH_REQUEST_MAX {
        return Err(ApiError::TooLarge(format!(
            "auth request is larger than {AUTH_REQUEST_MAX} bytes"
        )));
    }
    let req: AuthRequest =
        serde_json::from_slice(&body).map_err(|e| ApiError::bad(format!("auth request: {e}")))?;
    check_identity(&req.identity)?;
    let key = parse_public_key(&req.public_key)?;
    let sig: [u8; 64] = headers
        .get(SIGNATURE_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| hex::decode(v.trim()).ok())
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| {
            ApiError::bad(format!(
                "missing or malformed {SIGNATURE_HEADER} header (64 bytes of hex)"
            ))
        })?;
    if !key.verify(&body, &sig) {
        return Err(ApiError::Unauthorized(
            "auth request signature does not verify with its public key".into(),
        ));
    }
    let now = now_ms();
    let used = sqlx::query("DELETE FROM auth_nonces WHERE nonce = $1 AND expires_ms > $2")
        .bind(&req.nonce)
        .bind(now)
        .execute(&ctx.db)
        .await?;
    if used.rows_affected() != 1 {
        return Err(ApiError::Unauthorized(
            "auth nonce unknown, used or expired; get a new one".into(),
        ));
    }
    let device_id = hex::encode(key.id().0);
    let identity =
        serde_json::to_string(&req.identity).map_err(|e| ApiError::Internal(e.to_string()))?;
    let mut tx = ctx.db.begin().await?;
    let inserted = sqlx::query(
        "INSERT INTO devices (id, public_key, identity, status, created_ms, updated_ms, last_seen_ms) \
         VALUES ($1, $2, $3, 'pending', $4, $4, $4) ON CONFLICT (id) DO NOTHING",
    )
    .bind(&device_id)
    .bind(&req.public_key)
    .bind(&identity)
    .bind(now)
    .execute(&mut *tx)
    .await?;
    if inserted.rows_affected() == 1 {
        audit(
            &mut tx,
            &format!("device:{device_id}"),
            "device.pending",
            &device_id,
            serde_json::json!({ "identity": req.identity }),
        )
        .await?;
        tx.commit().await?;
        tracing::info!(device = %device_id, "new device pending");
        return Err(pending(&device_id));
    }
    // Status and token epoch in one statement (one snapshot): a rejection committed
    // meanwhile either shows in both or bumps the epoch past this token's.
    let row = sqlx::query(
        "SELECT d.status, COALESCE(e.epoch, 0) AS epoch FROM devices d \
         LEFT JOIN device_epochs e ON e.device_id = d.id WHERE d.id = $1",
    )
    .bind(&device_id)
    .fetch_one(&mut *tx)
    .await?;
    let status: String = row.try_get("status")?;
    let epoch: i64 = row.try_get("epoch")?;
    match status.as_str() {
        "accepted" => {}
        "preauthorized" => {
            sqlx::query("UPDATE devices SET status = 'accepted', updated_ms = $2 WHERE id = $1")
                .bind(&device_id)
                .bind(now)
                .execute(&mut *tx)
                .await?;
            audit(
                &mut tx,
                &format!("device:{device_id}"),
                "device.accept",
                &device_id,
                serde_json::json!({ "reason": "preauthorized key" }),
            )
            .await?;
        }
        "pending" => {
            sqlx::query("UPDATE devices SET identity = $2, last_seen_ms = $3 WHERE id = $1")
                .bind(&device_id)
                .bind(&identity)
                .bind(now)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            return Err(pending(&device_id));
        }
        _ => {
            tx.commit().await?;
            return Err(ApiError::Unauthorized(format!(
                "device {device_id} is {status}"
            )));
        }
    }
    let token = ctx.tokens.issue(
        &device_id,
        epoch,
        now.saturating_add(ctx.limits.device_token_ttl_ms),
    );
    sqlx::query("UPDATE devices SET identity = $2, last_seen_ms = $3 WHERE id = $1")
        .bind(&device_id)
        .bind(&identity)
        .bind(now)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    if let Some(key) = DeviceKey::parse(&device_id) {
        ctx.last_seen.written(key, now);
    }
    Ok(axum::Json(AuthToken {
        token,
        device_id,
        expires_in_s: ctx.limits.device_token_ttl_ms / 1000,
    }))
}

fn pending(device_id: &str) -> ApiError {
    ApiError::Unauthorized(format!(
        "device {device_id} is pending: an operator must accept it"
    ))
}

/// A release as devices see it.
#[derive(Debug, Serialize)]
pub struct ReleaseRef {
    /// The manifest hash.
    pub id: String,
    /// Release name.
    pub name: String,
    /// Release version.
    pub version: String,
}

/// The next deployment for a device.
#[derive(Debug, Serialize)]
pub struct NextDeployment {
    /// The deployment's id.
    pub id: String,
    /// Its name.
    pub name: String,
    /// The device's state in it so far.
    pub status: String,
    /// The release to install.
    pub release: ReleaseRef,
    /// Where to get the signed manifest.
    pub manifest_url: String,
    /// Where to POST chunk batches.
    pub chunks_url: String,
    /// A static base URL serving the chunk store (`chunks/<2 hex>/<64 hex>`), if
    /// the server has one; the device may fetch from it instead.
    pub chunk_base_url: Option<String>,
}

/// `GET /deployments/next`: the oldest deployment that serves this device now
/// (its rollout admits it: its phase is open and the rollout runs, or it already
/// started), or 204.
///
/// The token is verified without the database ([`crate::token`]), and this
/// server's [`crate::view`] answers the common case, a device with nothing to do,
/// with a 204 and no database round trip at all. A device that may have an open
/// deployment (or any device, while the view is stale) costs one query: the
/// device's status and epoch and its open deployments, read together. Nothing is
/// written (a `last_seen_ms` is noted for [`crate::last_seen`]).
pub async fn next(
    ctx: axum::extract::State<Ctx>,
    DeviceToken(claims): DeviceToken,
) -> ApiResult<Response> {
    let now = now_ms();
    let generation = match ctx
        .view
        .verdict(&claims.key, claims.epoch, std::time::Instant::now())
    {
        Verdict::Refused => return Err(device_token_refused()),
        Verdict::Idle => {
            ctx.last_seen.seen(&claims.device_id, claims.key, now);
            return Ok(StatusCode::NO_CONTENT.into_response());
        }
        Verdict::AskDatabase { generation } => generation,
    };
    let rows = sqlx::query(
        "SELECT d.id, d.name, d.release_id, d.rollout, dd.device_id, dd.status, dd.phase, dd.attempts, \
         r.name AS release_name, r.version \
         FROM devices v LEFT JOIN device_epochs e ON e.device_id = v.id \
         LEFT JOIN (deployment_devices dd JOIN deployments d ON d.id = dd.deployment_id \
         JOIN releases r ON r.id = d.release_id) \
         ON dd.device_id = v.id AND d.status IN ('running', 'paused', 'halted') \
         AND dd.status IN ('pending', 'downloading', 'installing', 'rebooting') \
         WHERE v.id = $1 AND v.status = 'accepted' AND COALESCE(e.epoch, 0) <= $2 \
         ORDER BY d.created_ms, d.id",
    )
    .bind(&claims.device_id)
    .bind(claims.epoch)
    .fetch_all(&ctx.db)
    .await?;
    if rows.is_empty() {
        return Err(device_token_refused());
    }
    ctx.last_seen.seen(&claims.device_id, claims.key, now);
    // The device without an open deployment: one row, no deployment.
    let rows: Vec<_> = rows
        .iter()
        .filter(|row| {
            row.try_get::<Option<String>, _>("id")
                .is_ok_and(|id| id.is_some())
        })
        .collect();
    if rows.is_empty() {
        // Nothing open: the view need not send this device here again.
        ctx.view.settle(&claims.key, generation);
    }
    for row in rows {
        let text: String = row.try_get("rollout")?;
        let rollout = rollouts::parse(&text)?;
        let entry = rollouts::entry_of(row)?;
        if rollout.admission(&entry) != Admission::Serve {
            continue;
        }
        let id: String = row.try_get("id")?;
        let base = "/api/devices/v1/deployments";
        return Ok(axum::Json(NextDeployment {
            manifest_url: format!("{base}/{id}/manifest"),
            chunks_url: format!("{base}/{id}/chunks"),
            name: row.try_get("name")?,
            status: row.try_get("status")?,
            release: ReleaseRef {
                id: row.try_get("release_id")?,
                name: row.try_get("release_name")?,
                version: row.try_get("version")?,
            },
            chunk_base_url: ctx.chunk_base_url.clone(),
            id,
        })
        .into_response());
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// A device's view of one deployment it is part of.
struct Membership {
    release_id: String,
}

/// Checks deployment `id` for `device`: 404 if there is no such deployment, 403 if
/// it is not for this device; with `serving`, 409 unless its rollout serves the
/// device now (aborted, finished, or not admitted: it must stop).
async fn membership(ctx: &Ctx, device: &str, id: &str, serving: bool) -> ApiResult<Membership> {
    check_hex_id(id, 32, "deployment")?;
    let dep = sqlx::query("SELECT release_id, rollout FROM deployments WHERE id = $1")
        .bind(id)
        .fetch_optional(&ctx.db)
        .await?
        .ok_or_else(|| ApiError::not_found("no such deployment"))?;
    let mut conn = ctx.db.acquire().await?;
    let entry = rollouts::entry(&mut conn, id, device)
        .await?
        .ok_or_else(|| ApiError::Forbidden(format!("deployment {id} is not for this device")))?;
    if serving {
        let text: String = dep.try_get("rollout")?;
        match rollouts::parse(&text)?.admission(&entry) {
            Admission::Serve => {}
            Admission::NotYet(wait) => {
                return Err(ApiError::conflict(format!(
                    "deployment {id} does not serve this device now: {wait}"
                )));
            }
            Admission::Done(Status::Aborted) => {
                return Err(ApiError::conflict(format!("deployment {id} was aborted")));
            }
            Admission::Done(status) => {
                return Err(ApiError::conflict(format!(
                    "this device finished deployment {id} as {status}"
                )));
            }
        }
    }
    Ok(Membership {
        release_id: dep.try_get("release_id")?,
    })
}

async fn release(ctx: &Ctx, id: &str) -> ApiResult<std::sync::Arc<crate::release_cache::Release>> {
    if let Some(r) = ctx.releases.get(id) {
        return Ok(r);
    }
    let c = ctx.clone();
    let id = id.to_owned();
    tokio::task::spawn_blocking(move || c.releases.load(&c.store, &c.root, &id))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .map_err(|e| ApiError::Internal(format!("loading release: {e}")))
}

/// Content type of a manifest answered as a delta (the bytes of a
/// [`shoal_artifact::manifest_delta::ManifestDelta`]).
pub const MANIFEST_DELTA_TYPE: &str = "application/vnd.shoal.manifest-delta.v1";
/// Content type of a manifest answered whole (its signed envelope).
pub const ENVELOPE_TYPE: &str = "application/vnd.shoal.envelope";

/// The manifest request's query.
#[derive(Debug, Deserialize)]
pub struct ManifestQuery {
    /// The manifest hashes (64 hex digits, comma-separated, at most
    /// [`crate::manifest_deltas::HELD_MAX`]) the device keeps, its running
    /// release's first. Daemons from before omit it.
    #[serde(default)]
    pub held: Option<String>,
}

/// `GET /deployments/{id}/manifest`: the release's signed manifest envelope, as
/// uploaded; the device verifies it against its own trust root. A device naming
/// the manifests it keeps (`?held=`) gets a manifest delta against the first of
/// them this server holds too, when that is smaller
/// ([`MANIFEST_DELTA_TYPE`], [`crate::manifest_deltas`]); otherwise the envelope.
pub async fn manifest(
    ctx: axum::extract::State<Ctx>,
    auth: DeviceAuth,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<ManifestQuery>,
) -> ApiResult<Response> {
    let held = crate::manifest_deltas::parse_held(q.held.as_deref().unwrap_or(""))
        .map_err(ApiError::BadRequest)?;
    let m = membership(&ctx, &auth.device_id, &id, true).await?;
    let r = release(&ctx, &m.release_id).await?;
    for base in &held {
        // A manifest this server does not hold (never uploaded, deleted, or not
        // verifying any more) is skipped: the device's view and the server's may
        // disagree, and the envelope always works.
        let base_id = hex::encode(base);
        let b = match release(&ctx, &base_id).await {
            Ok(b) => b,
            Err(e) => {
                tracing::debug!(device = %auth.device_id, base = %base_id, error = %e, "a held manifest is not here");
                continue;
            }
        };
        if let Some(delta) = ctx.manifest_deltas.delta(r.clone(), b).await {
            tracing::info!(device = %auth.device_id, deployment = %id, base = %base_id, bytes = delta.len(), envelope_bytes = r.envelope.len(), "manifest served as a delta");
            return Ok((
                [(header::CONTENT_TYPE, MANIFEST_DELTA_TYPE)],
                delta.as_ref().clone(),
            )
                .into_response());
        }
    }
    Ok(([(header::CONTENT_TYPE, ENVELOPE_TYPE)], r.envelope.clone()).into_response())
}

/// A batch of chunk ids.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ChunkBatch {
    /// Chunk ids (64 hex digits each), in the order the device wants them.
    pub ids: Vec<String>,
    /// The manifest hash (64 hex digits) of the release the device runs, whose
    /// payload its running slot holds from offset 0. When the deployment's release
    /// has per-base encodings against it, the answer is version 2
    /// (`application/vnd.shoal.chunks.v2`): chunks that have one come
    /// delta-encoded, the others plain. Otherwise (and without it, as daemons from
    /// before send), version 1: plain chunks only.
    #[serde(default)]
    pub base: Option<String>,
}

/// How one chunk of a batch is sent.
enum Frame {
    /// Its plain stored form, of this length.
    Plain(u32),
    /// Its delta record against the device's base, of this length.
    Delta(u32),
}

/// `POST /deployments/{id}/chunks`: the stored chunks asked for, framed.
pub async fn chunks(
    ctx: axum::extract::State<Ctx>,
    auth: DeviceAuth,
    ApiPath(id): ApiPath<String>,
    ApiJson(batch): ApiJson<ChunkBatch>,
) -> ApiResult<Response> {
    let m = membership(&ctx, &auth.device_id, &id, true).await?;
    if batch.ids.is_empty() {
        return Err(ApiError::bad("ids is empty"));
    }
    if batch.ids.len() > CHUNK_BATCH_IDS_MAX {
        return Err(ApiError::BadRequest(format!(
            "a batch has at most {CHUNK_BATCH_IDS_MAX} chunk ids"
        )));
    }
    let base: Option<[u8; 32]> = match &batch.base {
        None => None,
        Some(text) => Some(
            text.parse::<ChunkId>()
                .map_err(|_| ApiError::bad(format!("base {text:?} is not 64 hex digits")))?
                .0,
        ),
    };
    let r = release(&ctx, &m.release_id).await?;
    let mut seen = HashSet::with_capacity(batch.ids.len());
    let mut wanted = Vec::with_capacity(batch.ids.len());
    for text in &batch.ids {
        let cid: ChunkId = text
            .parse()
            .map_err(|_| ApiError::bad(format!("chunk id {text:?} is not 64 hex digits")))?;
        if !r.chunks.contains_key(&cid) {
            return Err(ApiError::bad(format!(
                "chunk {cid} is not in this deployment's release"
            )));
        }
        if !seen.insert(cid) {
            return Err(ApiError::bad(format!("chunk {cid} is asked for twice")));
        }
        wanted.push(cid);
    }
    // The release's encodings against the device's base, if they were made (an
    // unknown base, or none made yet: every chunk plain).
    let index = match &base {
        Some(b) => ctx
            .encodings
            .get(&ctx.store, b, &r.manifest.hash())
            .await
            .map_err(|e| ApiError::Internal(format!("per-base encodings: {e}")))?,
        None => None,
    };
    // The store keeps the first stored form it got of a chunk, which may differ in
    // size from the one this release's artifact had: measure the stored objects.
    let sized: Vec<(ChunkId, Frame)> = futures_util::stream::iter(wanted)
        .map(|cid| {
            let store = ctx.store.clone();
            let delta = index
                .as_ref()
                .and_then(|i| i.get(&cid).copied())
                .zip(base);
            async move {
                // A record the index lists is measured too: one pruned by a
                // deletion racing an encoding is sent plain, not promised.
                if let Some((len, b)) = delta {
                    let stored = store
                        .delta_size(&b, &cid)
                        .await
                        .map_err(|e| ApiError::Internal(format!("delta record {cid}: {e}")))?;
                    if stored == Some(u64::from(len)) {
                        return Ok((cid, Frame::Delta(len)));
                    }
                    tracing::warn!(chunk = %cid, expected = len, stored = ?stored, "a per-base delta record the index lists is missing or changed; sending the plain chunk");
                }
                let len = store
                    .chunk_size(&cid)
                    .await
                    .map_err(|e| ApiError::Internal(format!("chunk {cid}: {e}")))?
                    .ok_or_else(|| {
                        ApiError::Internal(format!("chunk {cid} is missing from the store"))
                    })?;
                let len = u32::try_from(len)
                    .map_err(|_| ApiError::Internal(format!("chunk {cid} is too large")))?;
                Ok::<_, ApiError>((cid, Frame::Plain(len)))
            }
        })
        .buffered(STORE_REQUESTS_MAX)
        .try_collect()
        .await?;
    // Version 2 exactly when there are encodings to send.
    let v2 = index.is_some();
    let header_len: u64 = if v2 { 37 } else { 36 };
    let total: u64 = sized
        .iter()
        .map(|(_, f)| {
            header_len
                + u64::from(match f {
                    Frame::Plain(n) | Frame::Delta(n) => *n,
                })
        })
        .sum();
    if total > CHUNK_BATCH_BYTES_MAX {
        return Err(ApiError::TooLarge(format!(
            "the batch is {total} bytes; at most {CHUNK_BATCH_BYTES_MAX} per request"
        )));
    }
    let deltas = sized
        .iter()
        .filter(|(_, f)| matches!(f, Frame::Delta(_)))
        .count();
    // Operators (and the static-host test) read what the server itself streams.
    tracing::info!(device = %auth.device_id, deployment = %id, chunks = sized.len(), deltas, bytes = total, "chunk batch served");
    let store = ctx.store.clone();
    let stream = futures_util::stream::iter(sized).map(move |(cid, frame)| {
        let store = store.clone();
        async move {
            let (kind, expected, data) = match frame {
                Frame::Plain(n) => (
                    0u8,
                    n,
                    store.chunk(&cid).await.map_err(std::io::Error::other)?,
                ),
                Frame::Delta(n) => (
                    1u8,
                    n,
                    match &base {
                        Some(b) => store.delta(b, &cid).await.map_err(std::io::Error::other)?,
                        None => None,
                    },
                ),
            };
            let data = data.ok_or_else(|| {
                std::io::Error::other(format!("chunk {cid} vanished while served"))
            })?;
            if data.len() != expected as usize {
                tracing::error!(chunk = %cid, expected, actual = data.len(), kind, "chunk changed size while served");
                return Err(std::io::Error::other("chunk changed size"));
            }
            let mut out = Vec::with_capacity(37 + data.len());
            out.extend_from_slice(cid.as_bytes());
            if v2 {
                out.push(kind);
            }
            out.extend_from_slice(&expected.to_be_bytes());
            out.extend_from_slice(&data);
            Ok::<_, std::io::Error>(Bytes::from(out))
        }
    })
    // Reads ahead a few chunks (an object store answers each after a round trip);
    // frames still go out in the order asked.
    .buffered(STORE_REQUESTS_MAX);
    let content_type = if v2 {
        "application/vnd.shoal.chunks.v2"
    } else {
        "application/vnd.shoal.chunks"
    };
    Ok((
        [
            (header::CONTENT_TYPE, content_type.to_owned()),
            (header::CONTENT_LENGTH, total.to_string()),
        ],
        Body::from_stream(stream),
    )
        .into_response())
}

/// A status report.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StatusReport {
    /// One of Mender's states: downloading, installing, rebooting, success,
    /// failure, already-installed.
    pub status: String,
    /// Free text shown to operators (at most 256 bytes).
    #[serde(default)]
    pub substate: Option<String>,
}

/// `PUT /deployments/{id}/status`: 204; 409 once the deployment was aborted, when
/// the rollout does not admit the device, or when it already finished otherwise; 400
/// for a state a device may not report. The rollout decides (phases, halts,
/// retries): see `shoal_fleet`.
pub async fn status(
    ctx: axum::extract::State<Ctx>,
    auth: DeviceAuth,
    ApiPath(id): ApiPath<String>,
    ApiJson(report): ApiJson<StatusReport>,
) -> ApiResult<StatusCode> {
    let status: Status = report
        .status
        .parse()
        .ok()
        .filter(|s: &Status| s.is_reportable())
        .ok_or_else(|| {
            ApiError::bad(format!(
                "unknown status {:?} (one of: {})",
                report.status,
                Status::ALL
                    .iter()
                    .filter(|s| s.is_reportable())
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })?;
    if report.substate.as_ref().is_some_and(|s| s.len() > 256) {
        return Err(ApiError::bad("substate is longer than 256 bytes"));
    }
    membership(&ctx, &auth.device_id, &id, false).await?;
    let now = now_ms();
    let mut tx = ctx.db.begin().await?;
    let mut rollout = rollouts::lock(&mut tx, &id).await?;
    let mut entry = rollouts::entry(&mut tx, &id, &auth.device_id)
        .await?
        .ok_or_else(|| ApiError::Forbidden(format!("deployment {id} is not for this device")))?;
    let effects = match rollout.report(&mut entry, status, rollouts::instant(now)) {
        Ok(effects) => effects,
        Err(e) => {
            return Err(match e {
                ReportError::NotReportable(_) => ApiError::bad(e.to_string()),
                ReportError::NotInDeployment => ApiError::Forbidden(e.to_string()),
                ReportError::ForeignEntry { .. } => ApiError::Internal(e.to_string()),
                _ => ApiError::conflict(format!("deployment {id}: {e}")),
            });
        }
    };
    rollouts::save(
        &mut tx,
        &id,
        &rollout,
        std::slice::from_ref(&entry),
        &effects,
        now,
    )
    .await?;
    sqlx::query(
        "UPDATE deployment_devices SET substate = $3 WHERE deployment_id = $1 AND device_id = $2",
    )
    .bind(&id)
    .bind(&auth.device_id)
    .bind(&report.substate)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    tracing::info!(device = %auth.device_id, deployment = %id, status = %report.status, "device status");
    Ok(StatusCode::NO_CONTENT)
}

/// One log line.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LogLine {
    /// When, in Unix milliseconds (the device's clock).
    pub timestamp_ms: i64,
    /// `error`, `warn`, `info`, `debug` or `trace`.
    pub level: String,
    /// The message.
    pub message: String,
}

/// A log upload.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LogUpload {
    /// The lines, oldest first.
    pub messages: Vec<LogLine>,
}

/// `PUT /deployments/{id}/log`: appends the device's log for this deployment.
pub async fn log(
    ctx: axum::extract::State<Ctx>,
    auth: DeviceAuth,
    ApiPath(id): ApiPath<String>,
    ApiJson(upload): ApiJson<LogUpload>,
) -> ApiResult<StatusCode> {
    if upload.messages.len() > LOG_LINES_MAX {
        return Err(ApiError::BadRequest(format!(
            "a log upload has at most {LOG_LINES_MAX} lines"
        )));
    }
    for l in &upload.messages {
        if !["error", "warn", "info", "debug", "trace"].contains(&l.level.as_str()) {
            return Err(ApiError::bad(format!("unknown log level {:?}", l.level)));
        }
        if l.message.len() > LOG_LINE_LEN_MAX {
            return Err(ApiError::BadRequest(format!(
                "a log line is longer than {LOG_LINE_LEN_MAX} bytes"
            )));
        }
    }
    membership(&ctx, &auth.device_id, &id, false).await?;
    let mut tx = ctx.db.begin().await?;
    for l in &upload.messages {
        sqlx::query(
            "INSERT INTO deployment_logs (deployment_id, device_id, at_ms, level, message) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(&id)
        .bind(&auth.device_id)
        .bind(l.timestamp_ms)
        .bind(&l.level)
        .bind(&l.message)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /dictionaries/{zstd_id}`: a zstd dictionary chunks may be compressed with
/// (the id as 8 hex digits, as in the chunk store).
pub async fn dictionary(
    ctx: axum::extract::State<Ctx>,
    _auth: DeviceAuth,
    ApiPath(zstd_id): ApiPath<String>,
) -> ApiResult<Response> {
    check_hex_id(&zstd_id, 8, "dictionary")?;
    let n =
        u32::from_str_radix(&zstd_id, 16).map_err(|_| ApiError::not_found("no such dictionary"))?;
    match ctx.store.dictionary(n).await {
        Ok(Some(bytes)) => {
            Ok(([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response())
        }
        Ok(None) => Err(ApiError::not_found("no such dictionary")),
        Err(e) => Err(ApiError::Internal(format!("dictionary {zstd_id}: {e}"))),
    }
}

/// One inventory attribute.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Attribute {
    /// Its name.
    pub name: String,
    /// Its value.
    pub value: String,
}

fn check_attributes(attrs: &[Attribute]) -> ApiResult<()> {
    if attrs.len() > INVENTORY_ATTRIBUTES_MAX {
        return Err(ApiError::BadRequest(format!(
            "a device has at most {INVENTORY_ATTRIBUTES_MAX} inventory attributes"
        )));
    }
    let mut names = HashSet::new();
    for a in attrs {
        if !valid_name(&a.name) {
            return Err(ApiError::bad(format!(
                "attribute name {:?} is not 1 to 128 characters of A-Z a-z 0-9 _ . - :",
                a.name
            )));
        }
        if a.value.len() > VALUE_LEN_MAX {
            return Err(ApiError::bad(format!(
                "attribute {} is longer than {VALUE_LEN_MAX} bytes",
                a.name
            )));
        }
        if !names.insert(a.name.as_str()) {
            return Err(ApiError::bad(format!(
                "attribute {} is given twice",
                a.name
            )));
        }
    }
    Ok(())
}

async fn write_inventory(
    ctx: &Ctx,
    device: &str,
    attrs: &[Attribute],
    replace: bool,
) -> ApiResult<StatusCode> {
    check_attributes(attrs)?;
    let now = now_ms();
    let mut tx = ctx.db.begin().await?;
    if replace {
        sqlx::query("DELETE FROM inventory WHERE device_id = $1")
            .bind(device)
            .execute(&mut *tx)
            .await?;
    }
    for a in attrs {
        sqlx::query(
            "INSERT INTO inventory (device_id, name, value, updated_ms) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (device_id, name) DO UPDATE SET value = excluded.value, updated_ms = excluded.updated_ms",
        )
        .bind(device)
        .bind(&a.name)
        .bind(&a.value)
        .bind(now)
        .execute(&mut *tx)
        .await?;
    }
    let count: i64 = sqlx::query("SELECT COUNT(*) AS n FROM inventory WHERE device_id = $1")
        .bind(device)
        .fetch_one(&mut *tx)
        .await?
        .try_get("n")?;
    if count > INVENTORY_ATTRIBUTES_MAX as i64 {
        tx.rollback().await?;
        return Err(ApiError::BadRequest(format!(
            "a device has at most {INVENTORY_ATTRIBUTES_MAX} inventory attributes"
        )));
    }
    tx.commit().await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `PUT /inventory/attributes`: replaces the device's inventory.
pub async fn inventory_replace(
    ctx: axum::extract::State<Ctx>,
    auth: DeviceAuth,
    ApiJson(attrs): ApiJson<Vec<Attribute>>,
) -> ApiResult<StatusCode> {
    write_inventory(&ctx, &auth.device_id, &attrs, true).await
}

/// `PATCH /inventory/attributes`: adds or updates the attributes given.
pub async fn inventory_update(
    ctx: axum::extract::State<Ctx>,
    auth: DeviceAuth,
    ApiJson(attrs): ApiJson<Vec<Attribute>>,
) -> ApiResult<StatusCode> {
    write_inventory(&ctx, &auth.device_id, &attrs, false).await
}

/// The answer of `GET /credential`.
#[derive(Debug, Serialize)]
pub struct IssuedCredential {
    /// The signed credential (an envelope over the device key, the fleet and the
    /// expiry, signed by the server's fleet key), in hex: what the device shows its
    /// LAN peers.
    pub credential: String,
    /// The fleet.
    pub fleet: String,
    /// Unix time (seconds) at and after which it is expired; devices renew at half
    /// its life.
    pub expires_unix_s: u64,
    /// Keys (hex) of decommissioned devices whose credentials have not expired
    /// yet: refused whatever they show.
    pub revoked: Vec<String>,
}

/// `GET /credential`: a fresh fleet membership credential for the (accepted)
/// device, and the revoked keys. 404 when this server issues none (started
/// without `--fleet-key`).
pub async fn credential(
    ctx: axum::extract::State<Ctx>,
    auth: DeviceAuth,
) -> ApiResult<axum::Json<IssuedCredential>> {
    let Some(fleet) = &ctx.fleet else {
        return Err(ApiError::NotFound(
            "this server issues no fleet credentials (it was started without --fleet-key)".into(),
        ));
    };
    let row = sqlx::query("SELECT public_key FROM devices WHERE id = $1")
        .bind(&auth.device_id)
        .fetch_one(&ctx.db)
        .await?;
    let hex_key: String = row.try_get("public_key")?;
    let mut bytes = [0u8; 32];
    hex::decode_to_slice(&hex_key, &mut bytes)
        .map_err(|e| ApiError::Internal(format!("device {}'s key: {e}", auth.device_id)))?;
    let key = PublicKey::from_bytes(&bytes)
        .map_err(|e| ApiError::Internal(format!("device {}'s key: {e}", auth.device_id)))?;
    let now = now_ms();
    let now_s = u64::try_from(now / 1000).unwrap_or(0);
    let expires_unix_s = now_s.saturating_add(fleet.ttl_s);
    let keys: Vec<&shoal_signing::SecretKey> = fleet.keys.iter().collect();
    let signed =
        shoal_signing::Credential::new(key, fleet.name.clone(), expires_unix_s).issue(&keys);
    let revoked =
        sqlx::query("SELECT public_key FROM revoked_keys WHERE until_ms > $1 ORDER BY public_key")
            .bind(now)
            .fetch_all(&ctx.db)
            .await?
            .iter()
            .map(|r| r.try_get("public_key"))
            .collect::<Result<Vec<String>, _>>()?;
    Ok(axum::Json(IssuedCredential {
        credential: hex::encode(signed),
        fleet: fleet.name.clone(),
        expires_unix_s,
        revoked,
    }))
}
