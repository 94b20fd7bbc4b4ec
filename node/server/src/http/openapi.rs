//! The OpenAPI 3.1 document, `openapi.json` beside this file, edited by hand (the
//! Python generator it once came from fell behind the document and was removed);
//! a test checks it describes exactly the routes in [`super::ROUTES`], and
//! `server_api::schemathesis_against_openapi` runs it against a real server.

use axum::http::header;
use axum::response::IntoResponse;

/// The document's text.
pub const DOCUMENT: &str = include_str!("openapi.json");

/// `GET /api/openapi.json`.
pub async fn document() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], DOCUMENT)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    #[test]
    fn document_describes_exactly_the_routes() {
        let doc: serde_json::Value = serde_json::from_str(super::DOCUMENT).expect("valid JSON");
        assert_eq!(doc["openapi"], "3.1.0");
        let mut documented = BTreeSet::new();
        for (path, item) in doc["paths"].as_object().expect("paths") {
            for method in item.as_object().expect("path item").keys() {
                documented.insert((method.to_uppercase(), path.clone()));
            }
        }
        let routed: BTreeSet<(String, String)> = crate::http::ROUTES
            .iter()
            .map(|(m, p)| ((*m).to_owned(), (*p).to_owned()))
            .collect();
        let missing: Vec<_> = routed.difference(&documented).collect();
        let extra: Vec<_> = documented.difference(&routed).collect();
        assert!(
            missing.is_empty(),
            "routes without a document entry: {missing:?}"
        );
        assert!(extra.is_empty(), "documented but not routed: {extra:?}");
        // Every schema reference resolves.
        let text = super::DOCUMENT;
        for r in text.split("\"$ref\": \"#/components/schemas/").skip(1) {
            let name = &r[..r.find('"').expect("closing quote")];
            assert!(
                doc["components"]["schemas"].get(name).is_some(),
                "unresolved schema {name}"
            );
        }
    }
}
