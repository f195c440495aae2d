//! The registry's HTTP API (routes in `causeway_core::registry_api`), plus `/healthz` and
//! `/metrics`.

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{DefaultBodyLimit, MatchedPath, Path, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use causeway_core::registry_api::{InstanceRecord, is_dns_label};
use causeway_core::serve::{error_response, json_response};
use causeway_core::telemetry::{HttpMetrics, Metrics};

use crate::dns::NS_LABEL;
use crate::registry::Registry;

/// Registration bodies are a few hundred bytes; anything near this is not a registration.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

#[derive(Clone)]
pub(crate) struct ApiState {
    pub registry: Registry,
    pub metrics: Arc<Metrics>,
    pub http: HttpMetrics,
}

pub(crate) fn router(state: ApiState) -> Router {
    Router::new()
        .route("/v1/registry", get(list_all))
        .route("/v1/registry/{service}", get(list_service))
        .route(
            "/v1/registry/{service}/{instance}",
            axum::routing::put(register).delete(deregister),
        )
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .with_state(state)
}

fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    error_response(status, code, message, None).into_response()
}

fn bad_request(message: impl Into<String>) -> Response {
    error(StatusCode::BAD_REQUEST, "bad_request", message)
}

/// `PUT /v1/registry/{service}/{instance}`: register or heartbeat.
async fn register(
    State(state): State<ApiState>,
    path: Result<Path<(String, String)>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let (service, instance) = match path {
        Ok(Path(names)) => names,
        Err(rejection) => return bad_request(rejection.body_text()),
    };
    let body = match body {
        Ok(body) => body,
        Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!("registration bodies are limited to {MAX_BODY_BYTES} bytes"),
            );
        }
        Err(rejection) => return bad_request(rejection.body_text()),
    };
    for (what, name) in [("service", &service), ("instance", &instance)] {
        if !is_dns_label(name) {
            return bad_request(format!(
                "{what} name {name:?} is not a DNS label (lowercase letters, digits and '-', at most 63)"
            ));
        }
    }
    if service == NS_LABEL {
        return bad_request(format!(
            "service name {NS_LABEL:?} is reserved for the name server"
        ));
    }
    let record: InstanceRecord = match serde_json::from_slice(&body) {
        Ok(record) => record,
        Err(err) => return bad_request(format!("body is not an instance record: {err}")),
    };
    if record.service != service || record.instance != instance {
        return bad_request(format!(
            "body names {}/{} but the path names {service}/{instance}",
            record.service, record.instance
        ));
    }
    // Port 0 is what a listener asks for, never where it listens: an SRV record to it is useless.
    if record.addr.port() == 0 || record.admin_addr.is_some_and(|addr| addr.port() == 0) {
        return bad_request("addr and admin_addr need a port other than 0");
    }
    state.registry.upsert(record.clone());
    json_response(StatusCode::OK, &record).into_response()
}

/// `DELETE /v1/registry/{service}/{instance}`: deregister.
async fn deregister(
    State(state): State<ApiState>,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Response {
    let (service, instance) = match path {
        Ok(Path(names)) => names,
        Err(rejection) => return bad_request(rejection.body_text()),
    };
    if state.registry.remove(&service, &instance) {
        StatusCode::NO_CONTENT.into_response()
    } else {
        error(
            StatusCode::NOT_FOUND,
            "unknown_instance",
            format!("{service}/{instance} is not registered"),
        )
    }
}

/// `GET /v1/registry`
async fn list_all(State(state): State<ApiState>) -> Response {
    json_response(StatusCode::OK, &state.registry.listing()).into_response()
}

/// `GET /v1/registry/{service}`: an unknown service has no live instances, not a 404, so that
/// clients polling for a service that is still starting need no special case.
async fn list_service(
    State(state): State<ApiState>,
    path: Result<Path<String>, PathRejection>,
) -> Response {
    match path {
        Ok(Path(service)) => {
            json_response(StatusCode::OK, &state.registry.live(&service)).into_response()
        }
        Err(rejection) => bad_request(rejection.body_text()),
    }
}

async fn healthz() -> Response {
    json_response(StatusCode::OK, &serde_json::json!({ "status": "ok" })).into_response()
}

async fn metrics(State(state): State<ApiState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}

async fn not_found(request: Request) -> Response {
    error(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("no endpoint {}", request.uri().path()),
    )
}

async fn method_not_allowed(request: Request) -> Response {
    error(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!(
            "{} is not allowed on {}",
            request.method(),
            request.uri().path()
        ),
    )
}

/// Counts requests by route template (not raw path, which would make a series per instance).
async fn observe(State(state): State<ApiState>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = request.method().clone();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", MatchedPath::as_str)
        .to_string();
    let response = next.run(request).await;
    state.http.observe(
        &route,
        &method,
        response.status().as_u16(),
        started.elapsed(),
    );
    response
}
