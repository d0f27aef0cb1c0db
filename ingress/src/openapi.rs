//! The OpenAPI 3 document of what this ingress serves, where Mosec serves its own
//! (`/openapi/metadata.json`, Swagger UI under `/openapi/swagger/`).
//!
//! The ingress never runs Python: each route's request and response types come from its
//! registration record ([`RouteTypes`], written by the launcher from the workers'
//! `get_forward_json_schema`), and the statuses from [`crate::status`], the one HTTP
//! mapping. The document is built per request from the live route table, so it follows
//! routes as agents come and go.

use natserve_protocol::{RouteRecord, RouteTypes};
use serde_json::{json, Map, Value};

pub const METADATA_PATH: &str = "/openapi/metadata.json";
pub const SWAGGER_PATH: &str = "/openapi/swagger/";

/// What a `POST <route>` can answer besides 200, as [`crate::status::answer`] maps it.
const ROUTE_ERRORS: &[(u16, &str)] = &[
    (400, "undecodable body, or a worker's ClientError"),
    (408, "the request body did not arrive before the deadline"),
    (413, "body over the size limit"),
    (415, "a Content-Encoding other than gzip or zstd"),
    (422, "a worker's ValidationError"),
    (429, "a stage's queue is full; retry after Retry-After"),
    (500, "the worker raised or crashed"),
    (
        503,
        "no live agent serves a stage, NATS unreachable, or draining",
    ),
    (504, "the deadline passed"),
];

/// The whole document for `routes` (each with its slug, as the route table lists them).
pub fn document(routes: &[(String, RouteRecord)]) -> Value {
    let mut paths = Map::new();
    let mut schemas = Map::new();
    paths.insert(
        "/".into(),
        plain_get("readiness: 200 `ok` when every stage is served"),
    );
    paths.insert("/metrics".into(), plain_get("Prometheus metrics"));
    for (_, record) in routes {
        let types = record.types.as_ref();
        if let Some(types) = types {
            schemas.extend(types.components.clone());
        }
        paths.insert(
            record.route.clone(),
            json!({ "post": operation(record, types) }),
        );
    }
    json!({
        "openapi": "3.0.3",
        "info": {
            "title": "natserve",
            "description": "Routes served through NATS JetStream, with the types their workers declare",
            "version": env!("CARGO_PKG_VERSION"),
        },
        "paths": paths,
        "components": { "schemas": schemas },
    })
}

fn plain_get(summary: &str) -> Value {
    json!({ "get": {
        "summary": summary,
        "responses": {
            "200": { "description": "OK", "content": { "text/plain": { "schema": { "type": "string" } } } },
            "503": { "description": "not ready, with the reason" },
        },
    }})
}

fn operation(record: &RouteRecord, types: Option<&RouteTypes>) -> Value {
    let any = || json!({});
    let (request_mime, request_schema, response_mime, response_schema) = match types {
        Some(t) => (
            t.request.mime.as_str(),
            t.request.schema.clone(),
            t.response.mime.as_str(),
            t.response.schema.clone(),
        ),
        None => ("application/json", any(), "application/json", any()),
    };
    let mut responses = Map::new();
    responses.insert(
        "200".into(),
        json!({ "description": "the last stage's answer", "content": { response_mime: { "schema": response_schema } } }),
    );
    for (status, description) in ROUTE_ERRORS {
        responses.insert(
            status.to_string(),
            json!({ "description": description, "content": { "text/plain": { "schema": { "type": "string" } } } }),
        );
    }
    json!({
        "summary": format!("{} ({})", record.route, record.names.join(" → ")),
        "requestBody": { "required": true, "content": { request_mime: { "schema": request_schema } } },
        "responses": responses,
    })
}

/// Swagger UI on the document. Its script and style load from a CDN, so the page needs
/// the browser to reach one; the document itself is served by the ingress.
pub fn swagger_page() -> String {
    format!(
        r##"<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>natserve API</title>
  <link rel="stylesheet" href="https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui.css">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui-bundle.js"></script>
  <script>
    window.ui = SwaggerUIBundle({{ url: "{METADATA_PATH}", dom_id: "#swagger-ui" }});
  </script>
</body>
</html>
"##
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use natserve_protocol::BodyType;

    fn record(route: &str, types: Option<RouteTypes>) -> (String, RouteRecord) {
        let record = RouteRecord {
            route: route.into(),
            stages: 1,
            names: vec!["W".into()],
            types,
            streams: false,
            durable_replies: false,
            queues: Vec::new(),
        };
        (route.trim_start_matches('/').into(), record)
    }

    #[test]
    fn routes_become_post_operations_with_their_types() {
        let typed = RouteTypes {
            request: BodyType {
                mime: "application/msgpack".into(),
                schema: json!({"$ref": "#/components/schemas/In"}),
            },
            response: BodyType {
                mime: "application/json".into(),
                schema: json!({"type": "number"}),
            },
            components: json!({"In": {"type": "object"}})
                .as_object()
                .unwrap()
                .clone(),
        };
        let doc = document(&[record("/typed", Some(typed)), record("/plain", None)]);
        let typed = &doc["paths"]["/typed"]["post"];
        assert_eq!(
            typed["requestBody"]["content"]["application/msgpack"]["schema"]["$ref"],
            "#/components/schemas/In"
        );
        assert_eq!(
            typed["responses"]["200"]["content"]["application/json"]["schema"]["type"],
            "number"
        );
        assert_eq!(doc["components"]["schemas"]["In"]["type"], "object");
        let plain = &doc["paths"]["/plain"]["post"];
        assert_eq!(
            plain["requestBody"]["content"]["application/json"]["schema"],
            json!({})
        );
        for status in ["400", "413", "422", "429", "500", "503", "504"] {
            assert!(plain["responses"][status].is_object(), "{status}");
        }
        assert!(doc["paths"]["/"]["get"].is_object());
        assert!(swagger_page().contains(METADATA_PATH));
    }
}
