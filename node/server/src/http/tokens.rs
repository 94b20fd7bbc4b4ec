//! API tokens (roles viewer, operator, admin) and the audit log.
//!
//! A token is `st_` and 64 hex digits; the database keeps only its hash. The first
//! admin token is made on the server host with `shoal server token` (it writes to
//! the database directly); later ones through this API.

use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use sqlx::{AnyPool, Row};

use super::audit as record;
use super::check_hex_id;
use super::error::{ApiError, ApiResult};
use super::extractor::{ApiAuth, ApiJson, ApiPath, ApiQuery, Role};
use crate::Ctx;
use crate::db::{now_ms, random_hex, token_hash};

/// An API token, without its secret.
#[derive(Debug, Clone, Serialize)]
pub struct Token {
    /// Its id.
    pub id: String,
    /// Who or what it is for.
    pub name: String,
    /// Its role.
    pub role: Role,
    /// When it was made.
    pub created_ms: i64,
    /// When it was revoked.
    pub revoked_ms: Option<i64>,
}

/// A token just made: the only time its secret is shown.
#[derive(Debug, Clone, Serialize)]
pub struct NewToken {
    /// The token.
    #[serde(flatten)]
    pub token: Token,
    /// The bearer secret.
    pub secret: String,
}

/// The body of `POST /tokens`.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CreateToken {
    /// Who or what it is for (1 to 128 bytes).
    pub name: String,
    /// Its role.
    pub role: Role,
}

/// Makes a token and records it in the audit log as done by `actor`.
pub async fn create_token(
    db: &AnyPool,
    name: &str,
    role: Role,
    actor: &str,
) -> ApiResult<NewToken> {
    if name.is_empty() || name.len() > 128 {
        return Err(ApiError::bad("token name must be 1 to 128 bytes"));
    }
    let id = random_hex(8);
    let secret = format!("st_{}", random_hex(32));
    let now = now_ms();
    let mut tx = db.begin().await?;
    sqlx::query(
        "INSERT INTO api_tokens (id, name, role, token_hash, created_ms) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(&id)
    .bind(name)
    .bind(role.as_str())
    .bind(token_hash(&secret))
    .bind(now)
    .execute(&mut *tx)
    .await?;
    record(
        &mut tx,
        actor,
        "token.create",
        &id,
        serde_json::json!({ "name": name, "role": role }),
    )
    .await?;
    tx.commit().await?;
    Ok(NewToken {
        token: Token {
            id,
            name: name.to_owned(),
            role,
            created_ms: now,
            revoked_ms: None,
        },
        secret,
    })
}

/// `GET /tokens` (admin).
pub async fn list(State(ctx): State<Ctx>, auth: ApiAuth) -> ApiResult<axum::Json<Vec<Token>>> {
    auth.require(Role::Admin)?;
    let rows = sqlx::query("SELECT * FROM api_tokens ORDER BY created_ms, id")
        .fetch_all(&ctx.db)
        .await?;
    let out = rows
        .iter()
        .map(|r| {
            let role: String = r.try_get("role")?;
            Ok(Token {
                id: r.try_get("id")?,
                name: r.try_get("name")?,
                role: Role::parse(&role)
                    .ok_or_else(|| ApiError::Internal(format!("stored role {role:?}")))?,
                created_ms: r.try_get("created_ms")?,
                revoked_ms: r.try_get("revoked_ms")?,
            })
        })
        .collect::<ApiResult<_>>()?;
    Ok(axum::Json(out))
}

/// `POST /tokens` (admin).
pub async fn create(
    State(ctx): State<Ctx>,
    auth: ApiAuth,
    ApiJson(req): ApiJson<CreateToken>,
) -> ApiResult<(StatusCode, axum::Json<NewToken>)> {
    auth.require(Role::Admin)?;
    let t = create_token(&ctx.db, &req.name, req.role, &auth.actor()).await?;
    Ok((StatusCode::CREATED, axum::Json(t)))
}

/// `DELETE /tokens/{id}` (admin): revokes a token at once.
pub async fn revoke(
    State(ctx): State<Ctx>,
    auth: ApiAuth,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<StatusCode> {
    auth.require(Role::Admin)?;
    check_hex_id(&id, 16, "token")?;
    let mut tx = ctx.db.begin().await?;
    let n =
        sqlx::query("UPDATE api_tokens SET revoked_ms = $2 WHERE id = $1 AND revoked_ms IS NULL")
            .bind(&id)
            .bind(now_ms())
            .execute(&mut *tx)
            .await?
            .rows_affected();
    if n == 0 {
        return Err(ApiError::not_found(format!("no unrevoked token {id}")));
    }
    record(
        &mut tx,
        &auth.actor(),
        "token.revoke",
        &id,
        serde_json::json!({}),
    )
    .await?;
    tx.commit().await?;
    Ok(StatusCode::NO_CONTENT)
}

/// One audit log entry.
#[derive(Debug, Serialize)]
pub struct AuditEntry {
    /// Its sequence number.
    pub id: i64,
    /// When.
    pub at_ms: i64,
    /// Who: `token:<id>:<name>`, `device:<id>` or `host:<user>`.
    pub actor: String,
    /// What, e.g. `device.accept`.
    pub action: String,
    /// On what (an id or name).
    pub object: String,
    /// Details.
    pub details: serde_json::Value,
}

/// Query of `GET /audit`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    /// At most this many entries, newest first (1 to 10000; default 100).
    #[serde(default)]
    pub limit: Option<i64>,
}

/// The newest `limit` audit entries, newest first.
pub async fn audit_list(ctx: &Ctx, limit: i64) -> ApiResult<Vec<AuditEntry>> {
    let rows = sqlx::query("SELECT * FROM audit_log ORDER BY id DESC LIMIT $1")
        .bind(limit)
        .fetch_all(&ctx.db)
        .await?;
    rows.iter()
        .map(|r| {
            let details: String = r.try_get("details")?;
            Ok(AuditEntry {
                id: r.try_get("id")?,
                at_ms: r.try_get("at_ms")?,
                actor: r.try_get("actor")?,
                action: r.try_get("action")?,
                object: r.try_get("object")?,
                details: serde_json::from_str(&details)
                    .map_err(|e| ApiError::Internal(format!("stored audit details: {e}")))?,
            })
        })
        .collect()
}

/// `GET /audit` (admin).
pub async fn audit(
    State(ctx): State<Ctx>,
    auth: ApiAuth,
    ApiQuery(q): ApiQuery<AuditQuery>,
) -> ApiResult<axum::Json<Vec<AuditEntry>>> {
    auth.require(Role::Admin)?;
    let limit = q.limit.unwrap_or(100);
    if !(1..=10_000).contains(&limit) {
        return Err(ApiError::bad("limit must be 1 to 10000"));
    }
    Ok(axum::Json(audit_list(&ctx, limit).await?))
}
