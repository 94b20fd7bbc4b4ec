//! Extractors: authentication (device tokens, API tokens with roles) and wrappers
//! around axum's `Json`, `Path` and `Query` whose rejections are [`ApiError`]s, so
//! every failure has a JSON body.

use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use serde::de::DeserializeOwned;
use sqlx::Row;

use super::error::ApiError;
use crate::Ctx;
use crate::db::{now_ms, token_hash};
use crate::token::Claims;
use crate::view::Verdict;

/// The bearer token of a request, if it has one.
fn bearer(parts: &Parts) -> Result<&str, ApiError> {
    let value = parts
        .headers
        .get(axum::http::header::AUTHORIZATION)
        .ok_or_else(|| ApiError::Unauthorized("missing authorization header".into()))?;
    let value = value
        .to_str()
        .map_err(|_| ApiError::Unauthorized("authorization header is not ascii".into()))?;
    let token = value
        .strip_prefix("Bearer ")
        .ok_or_else(|| ApiError::Unauthorized("authorization is not a bearer token".into()))?
        .trim();
    if token.is_empty() || token.len() > 256 {
        return Err(ApiError::Unauthorized("malformed bearer token".into()));
    }
    Ok(token)
}

/// A device bearer token the server verified itself ([`crate::token`]): the MAC,
/// the expiry and the device it is bound to, with no database round trip. For
/// `GET /deployments/next`, which then asks the [`crate::view`] whether the device
/// was revoked or may have something to do; every other endpoint takes a
/// [`DeviceAuth`].
#[derive(Debug, Clone)]
pub struct DeviceToken(pub Claims);

impl FromRequestParts<Ctx> for DeviceToken {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, ctx: &Ctx) -> Result<Self, ApiError> {
        ctx.tokens
            .verify(bearer(parts)?, now_ms())
            .map(DeviceToken)
            .map_err(|e| ApiError::Unauthorized(format!("{e}; authenticate again")))
    }
}

/// What a device token whose device was revoked (rejected, decommissioned) or is
/// not accepted gets.
pub fn device_token_refused() -> ApiError {
    ApiError::Unauthorized("device token revoked or device not accepted; authenticate again".into())
}

/// An accepted device, authenticated by a device token it got from an auth request.
/// Every device endpoint takes the device from here, never from the request, so a
/// token only ever reaches its own device's data. Beyond the token, the device's
/// status and token epoch are checked in the database, so a device rejected or
/// decommissioned on any server is refused here at once.
#[derive(Debug, Clone)]
pub struct DeviceAuth {
    /// The device's id.
    pub device_id: String,
}

impl FromRequestParts<Ctx> for DeviceAuth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, ctx: &Ctx) -> Result<Self, ApiError> {
        let DeviceToken(claims) = DeviceToken::from_request_parts(parts, ctx).await?;
        if ctx
            .view
            .verdict(&claims.key, claims.epoch, std::time::Instant::now())
            == Verdict::Refused
        {
            return Err(device_token_refused());
        }
        let row = sqlx::query(
            "SELECT v.id FROM devices v LEFT JOIN device_epochs e ON e.device_id = v.id \
             WHERE v.id = $1 AND v.status = 'accepted' AND COALESCE(e.epoch, 0) <= $2",
        )
        .bind(&claims.device_id)
        .bind(claims.epoch)
        .fetch_optional(&ctx.db)
        .await?;
        if row.is_none() {
            return Err(device_token_refused());
        }
        ctx.last_seen.seen(&claims.device_id, claims.key, now_ms());
        Ok(DeviceAuth {
            device_id: claims.device_id,
        })
    }
}

/// What an API token may do. Each role includes the ones below it.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Reads everything but the audit log and tokens.
    Viewer,
    /// Also changes devices, groups, releases and deployments.
    Operator,
    /// Also manages API tokens and reads the audit log.
    Admin,
}

impl Role {
    /// The role's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }

    /// Parses a role name.
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "viewer" => Some(Role::Viewer),
            "operator" => Some(Role::Operator),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }
}

/// A management API caller, authenticated by an API token.
#[derive(Debug, Clone)]
pub struct ApiAuth {
    /// The token's id.
    pub token_id: String,
    /// The token's name (who it was made for).
    pub name: String,
    /// Its role.
    pub role: Role,
}

impl ApiAuth {
    /// Fails with 403 unless the caller has at least `role`.
    pub fn require(&self, role: Role) -> Result<(), ApiError> {
        if self.role >= role {
            Ok(())
        } else {
            Err(ApiError::Forbidden(format!(
                "this needs the {} role; token {} has {}",
                role.as_str(),
                self.name,
                self.role.as_str()
            )))
        }
    }

    /// The caller as the audit log names it.
    pub fn actor(&self) -> String {
        format!("token:{}:{}", self.token_id, self.name)
    }
}

impl FromRequestParts<Ctx> for ApiAuth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, ctx: &Ctx) -> Result<Self, ApiError> {
        let token = bearer(parts)?;
        let row = sqlx::query(
            "SELECT id, name, role FROM api_tokens WHERE token_hash = $1 AND revoked_ms IS NULL",
        )
        .bind(token_hash(token))
        .fetch_optional(&ctx.db)
        .await?;
        let Some(row) = row else {
            return Err(ApiError::Unauthorized(
                "api token unknown or revoked".into(),
            ));
        };
        let role: String = row.try_get("role")?;
        Ok(ApiAuth {
            token_id: row.try_get("id")?,
            name: row.try_get("name")?,
            role: Role::parse(&role)
                .ok_or_else(|| ApiError::Internal(format!("stored token has role {role:?}")))?,
        })
    }
}

/// `axum::Json` with [`ApiError`] rejections.
#[derive(Debug)]
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let axum::Json(v) = axum::Json::<T>::from_request(req, state).await?;
        Ok(ApiJson(v))
    }
}

/// `axum::extract::Path` with [`ApiError`] rejections.
#[derive(Debug)]
pub struct ApiPath<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let axum::extract::Path(v) =
            axum::extract::Path::<T>::from_request_parts(parts, state).await?;
        Ok(ApiPath(v))
    }
}

/// `axum::extract::Query` with [`ApiError`] rejections.
#[derive(Debug)]
pub struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let axum::extract::Query(v) =
            axum::extract::Query::<T>::from_request_parts(parts, state).await?;
        Ok(ApiQuery(v))
    }
}
