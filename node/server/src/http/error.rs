//! The one error type of every handler: [`ApiError`] turns into a JSON body
//! `{"error": "<message>", "code": "<machine code>"}` with the matching status.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// Why a request failed. Every variant maps to one HTTP status and a stable `code`.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// No credentials, or credentials that are unknown, expired or revoked (401).
    #[error("{0}")]
    Unauthorized(String),
    /// The caller is known but may not do this (403): a device token used for
    /// another device's data, or an API token whose role is too low.
    #[error("{0}")]
    Forbidden(String),
    /// The thing named does not exist (404).
    #[error("{0}")]
    NotFound(String),
    /// The request conflicts with the current state (409): an aborted deployment,
    /// a release still in use, a name taken.
    #[error("{0}")]
    Conflict(String),
    /// The request is malformed or names something invalid (400).
    #[error("{0}")]
    BadRequest(String),
    /// The body, or what it asks for, is larger than allowed (413).
    #[error("{0}")]
    TooLarge(String),
    /// The body is well-formed but its content was refused (422): an artifact that
    /// does not verify against the server's trust root.
    #[error("{0}")]
    Unprocessable(String),
    /// A rejection from axum's own extractors (bad JSON, wrong content type, body
    /// too large), with the status axum chose.
    #[error("{message}")]
    Rejection {
        /// The status axum picked.
        status: StatusCode,
        /// Its message.
        message: String,
    },
    /// The database failed (500; 503 when the pool timed out).
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// Anything else that is the server's fault (500).
    #[error("internal error: {0}")]
    Internal(String),
}

/// A concurrent request created the same thing first (two servers on one database).
fn is_unique_violation(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .is_some_and(|d| d.is_unique_violation())
}

#[derive(Serialize)]
struct Body<'a> {
    error: String,
    code: &'a str,
}

impl ApiError {
    /// The HTTP status of this error.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Rejection { status, .. } => *status,
            ApiError::Database(sqlx::Error::PoolTimedOut) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Database(e) if is_unique_violation(e) => StatusCode::CONFLICT,
            ApiError::Database(_) | ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The machine-readable code of this error.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::Unauthorized(_) => "unauthorized",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::NotFound(_) => "not_found",
            ApiError::Conflict(_) => "conflict",
            ApiError::BadRequest(_) => "bad_request",
            ApiError::TooLarge(_) => "too_large",
            ApiError::Unprocessable(_) => "refused",
            ApiError::Rejection { status, .. } => match *status {
                StatusCode::PAYLOAD_TOO_LARGE => "too_large",
                StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
                StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
                _ => "bad_request",
            },
            ApiError::Database(sqlx::Error::PoolTimedOut) => "unavailable",
            ApiError::Database(e) if is_unique_violation(e) => "conflict",
            ApiError::Database(_) | ApiError::Internal(_) => "internal",
        }
    }

    /// A 400 with `message`.
    pub fn bad(message: impl Into<String>) -> ApiError {
        ApiError::BadRequest(message.into())
    }

    /// A 404 with `message`.
    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::NotFound(message.into())
    }

    /// A 409 with `message`.
    pub fn conflict(message: impl Into<String>) -> ApiError {
        ApiError::Conflict(message.into())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::error!(error = %self, "request failed");
        }
        let body = Body {
            error: self.to_string(),
            code: self.code(),
        };
        (status, Json(body)).into_response()
    }
}

impl From<axum::extract::rejection::JsonRejection> for ApiError {
    fn from(r: axum::extract::rejection::JsonRejection) -> Self {
        ApiError::Rejection {
            status: r.status(),
            message: r.body_text().to_lowercase(),
        }
    }
}

impl From<axum::extract::rejection::PathRejection> for ApiError {
    fn from(r: axum::extract::rejection::PathRejection) -> Self {
        ApiError::Rejection {
            status: r.status(),
            message: r.body_text().to_lowercase(),
        }
    }
}

impl From<axum::extract::rejection::QueryRejection> for ApiError {
    fn from(r: axum::extract::rejection::QueryRejection) -> Self {
        ApiError::Rejection {
            status: r.status(),
            message: r.body_text().to_lowercase(),
        }
    }
}

impl From<axum::extract::rejection::BytesRejection> for ApiError {
    fn from(r: axum::extract::rejection::BytesRejection) -> Self {
        ApiError::Rejection {
            status: r.status(),
            message: r.body_text().to_lowercase(),
        }
    }
}

/// The result type of handlers.
pub type ApiResult<T> = Result<T, ApiError>;
