//! The OpenAPI 3.1 document, maintained by hand in `openapi.json` beside this file;
//! a test checks it describes exactly the routes in [`super::ROUTES`].

use axum::http::header;
use axum::response::IntoResponse;

/// The document's text.
pub const DOCUMENT: &str = include_str!("openapi.json");

/// `GET /api/openapi.json`.
pub async fn document() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], DOCUMENT)
}
