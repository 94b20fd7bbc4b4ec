//! The HTTP layer: the router, one module per resource, the error type and the
//! extractors.

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::routing::{get, post, put};
use sqlx::AnyConnection;

use crate::Ctx;
use crate::db::now_ms;

pub mod deployments;
pub mod device;
pub mod devices;
pub mod error;
pub mod extractor;
pub mod groups;
pub mod lan;
pub mod openapi;
pub mod releases;
pub mod reports;
pub mod tokens;

use error::ApiError;

/// The address a request came from (the TCP peer), for handlers that need it
/// (`ConnectInfo<PeerAddr>`).
#[derive(Debug, Clone, Copy)]
pub struct PeerAddr(pub std::net::SocketAddr);

impl
    axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, tokio::net::TcpListener>>
    for PeerAddr
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, tokio::net::TcpListener>) -> Self {
        PeerAddr(*stream.remote_addr())
    }
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, crate::tls::Listener>>
    for PeerAddr
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, crate::tls::Listener>) -> Self {
        PeerAddr(*stream.remote_addr())
    }
}

/// The largest JSON body any endpoint takes (artifact uploads have their own limit).
pub const JSON_BODY_MAX: usize = 1024 * 1024;

/// Every route: method and path (axum syntax). The OpenAPI document must describe
/// exactly these (a test checks it).
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/api/openapi.json"),
    ("GET", "/api/devices/v1/authentication/nonce"),
    ("POST", "/api/devices/v1/authentication/auth_requests"),
    ("GET", "/api/devices/v1/deployments/next"),
    ("GET", "/api/devices/v1/credential"),
    ("POST", "/api/devices/v1/lan/peers"),
    ("GET", "/api/devices/v1/deployments/{id}/manifest"),
    ("POST", "/api/devices/v1/deployments/{id}/chunks"),
    ("PUT", "/api/devices/v1/deployments/{id}/status"),
    ("PUT", "/api/devices/v1/deployments/{id}/log"),
    ("GET", "/api/devices/v1/dictionaries/{zstd_id}"),
    ("PUT", "/api/devices/v1/inventory/attributes"),
    ("PATCH", "/api/devices/v1/inventory/attributes"),
    ("POST", "/api/devices/v1/reports"),
    ("GET", "/api/management/v1/devices"),
    ("POST", "/api/management/v1/devices"),
    ("GET", "/api/management/v1/devices/{id}"),
    ("DELETE", "/api/management/v1/devices/{id}"),
    ("POST", "/api/management/v1/devices/{id}/accept"),
    ("POST", "/api/management/v1/devices/{id}/reject"),
    ("GET", "/api/management/v1/devices/{id}/reports"),
    ("GET", "/api/management/v1/groups"),
    ("GET", "/api/management/v1/groups/{name}"),
    ("PUT", "/api/management/v1/groups/{name}"),
    ("DELETE", "/api/management/v1/groups/{name}"),
    ("GET", "/api/management/v1/groups/{name}/devices"),
    ("GET", "/api/management/v1/releases"),
    ("POST", "/api/management/v1/releases"),
    ("GET", "/api/management/v1/releases/{id}"),
    ("DELETE", "/api/management/v1/releases/{id}"),
    ("GET", "/api/management/v1/releases/{id}/delta"),
    ("POST", "/api/management/v1/releases/{id}/encodings"),
    ("GET", "/api/management/v1/releases/{id}/encodings"),
    ("GET", "/api/management/v1/deployments"),
    ("POST", "/api/management/v1/deployments"),
    ("GET", "/api/management/v1/deployments/{id}"),
    ("GET", "/api/management/v1/deployments/{id}/devices"),
    (
        "GET",
        "/api/management/v1/deployments/{id}/devices/{device_id}/log",
    ),
    ("POST", "/api/management/v1/deployments/{id}/abort"),
    ("POST", "/api/management/v1/deployments/{id}/retry"),
    ("POST", "/api/management/v1/deployments/{id}/pause"),
    ("POST", "/api/management/v1/deployments/{id}/resume"),
    ("POST", "/api/management/v1/deployments/{id}/next_phase"),
    ("GET", "/api/management/v1/tokens"),
    ("POST", "/api/management/v1/tokens"),
    ("DELETE", "/api/management/v1/tokens/{id}"),
    ("GET", "/api/management/v1/audit"),
];

/// The router of both APIs over `ctx`.
pub fn router(ctx: Ctx) -> Router {
    let d = "/api/devices/v1";
    let m = "/api/management/v1";
    let device = Router::new()
        .route(&format!("{d}/authentication/nonce"), get(device::nonce))
        .route(
            &format!("{d}/authentication/auth_requests"),
            post(device::auth_request),
        )
        .route(&format!("{d}/deployments/next"), get(device::next))
        .route(&format!("{d}/credential"), get(device::credential))
        .route(&format!("{d}/lan/peers"), post(lan::peers))
        .route(
            &format!("{d}/deployments/{{id}}/manifest"),
            get(device::manifest),
        )
        .route(
            &format!("{d}/deployments/{{id}}/chunks"),
            post(device::chunks),
        )
        .route(
            &format!("{d}/deployments/{{id}}/status"),
            put(device::status),
        )
        .route(&format!("{d}/deployments/{{id}}/log"), put(device::log))
        .route(
            &format!("{d}/dictionaries/{{zstd_id}}"),
            get(device::dictionary),
        )
        .route(
            &format!("{d}/inventory/attributes"),
            put(device::inventory_replace).patch(device::inventory_update),
        )
        .route(&format!("{d}/reports"), post(reports::deliver));
    let management = Router::new()
        .route(
            &format!("{m}/devices"),
            get(devices::list).post(devices::preauthorize),
        )
        .route(
            &format!("{m}/devices/{{id}}"),
            get(devices::show).delete(devices::decommission),
        )
        .route(&format!("{m}/devices/{{id}}/accept"), post(devices::accept))
        .route(&format!("{m}/devices/{{id}}/reject"), post(devices::reject))
        .route(&format!("{m}/devices/{{id}}/reports"), get(reports::list))
        .route(&format!("{m}/groups"), get(groups::list))
        .route(
            &format!("{m}/groups/{{name}}"),
            get(groups::show).put(groups::put).delete(groups::delete),
        )
        .route(
            &format!("{m}/groups/{{name}}/devices"),
            get(groups::devices),
        )
        .route(
            &format!("{m}/releases"),
            get(releases::list)
                .post(releases::upload)
                .layer(DefaultBodyLimit::disable()),
        )
        .route(
            &format!("{m}/releases/{{id}}"),
            get(releases::show).delete(releases::delete),
        )
        .route(&format!("{m}/releases/{{id}}/delta"), get(releases::delta))
        .route(
            &format!("{m}/releases/{{id}}/encodings"),
            post(releases::encode).get(releases::encodings),
        )
        .route(
            &format!("{m}/deployments"),
            get(deployments::list).post(deployments::create),
        )
        .route(&format!("{m}/deployments/{{id}}"), get(deployments::show))
        .route(
            &format!("{m}/deployments/{{id}}/devices"),
            get(deployments::devices),
        )
        .route(
            &format!("{m}/deployments/{{id}}/devices/{{device_id}}/log"),
            get(deployments::device_log),
        )
        .route(
            &format!("{m}/deployments/{{id}}/abort"),
            post(deployments::abort),
        )
        .route(
            &format!("{m}/deployments/{{id}}/retry"),
            post(deployments::retry),
        )
        .route(
            &format!("{m}/deployments/{{id}}/pause"),
            post(deployments::pause),
        )
        .route(
            &format!("{m}/deployments/{{id}}/resume"),
            post(deployments::resume),
        )
        .route(
            &format!("{m}/deployments/{{id}}/next_phase"),
            post(deployments::next_phase),
        )
        .route(
            &format!("{m}/tokens"),
            get(tokens::list).post(tokens::create),
        )
        .route(
            &format!("{m}/tokens/{{id}}"),
            axum::routing::delete(tokens::revoke),
        )
        .route(&format!("{m}/audit"), get(tokens::audit));
    Router::new()
        .route("/api/openapi.json", get(openapi::document))
        .merge(device)
        .merge(management)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(JSON_BODY_MAX))
        .with_state(ctx)
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such endpoint")
}

async fn method_not_allowed() -> ApiError {
    ApiError::Rejection {
        status: StatusCode::METHOD_NOT_ALLOWED,
        message: "method not allowed on this endpoint".into(),
    }
}

/// Records a change in the audit log, in the caller's transaction.
pub async fn audit(
    conn: &mut AnyConnection,
    actor: &str,
    action: &str,
    object: &str,
    details: serde_json::Value,
) -> Result<(), ApiError> {
    sqlx::query(
        "INSERT INTO audit_log (at_ms, actor, action, object, details) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(now_ms())
    .bind(actor)
    .bind(action)
    .bind(object)
    .bind(details.to_string())
    .execute(conn)
    .await?;
    Ok(())
}

/// Checks an id is `len` lowercase hex digits (ids are always that), as a 404 if not:
/// no such thing can exist.
pub fn check_hex_id(id: &str, len: usize, what: &str) -> Result<(), ApiError> {
    if id.len() == len
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        Ok(())
    } else {
        Err(ApiError::not_found(format!("no such {what}")))
    }
}
