//! User Service: `GET /users/{id}` and `GET /users/{id}/orders`, the second reading the user from
//! its own database and the orders from Order Service (`GET /orders?userId=`) through the shared
//! client library. Each hop's timings come back as `Server-Timing` entries.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Json, Router};
use bytes::Bytes;
use causeway_client::{CallReport, ServiceClient};
use causeway_core::server_timing::{self, TimingEntry, steps};
use causeway_core::trace_context::TraceContext;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Limited};
use serde::{Deserialize, Serialize};
use sqlx::Row;

use crate::db::{self, Database};
use crate::http::{ApiError, Caller, service_api};
use crate::order::Order;
use crate::{ServiceDeps, ServiceError};

pub const ORDER_SERVICE: &str = "order-service";
/// An Order Service answer larger than this is refused rather than buffered.
const MAX_UPSTREAM_BODY: usize = 4 * 1024 * 1024;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct User {
    pub id: i64,
    pub name: String,
    pub email: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UserOrders {
    pub user: User,
    pub orders: Vec<Order>,
    /// Which instances answered, so balancing is visible from outside.
    pub served_by: ServedBy,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServedBy {
    pub user_service: String,
    pub order_service: Option<String>,
}

const SCHEMA_AND_SEED: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS users (
        id BIGINT PRIMARY KEY,
        name TEXT NOT NULL,
        email TEXT NOT NULL
    )",
    "INSERT INTO users (id, name, email) VALUES
        (123, 'Ada Lovelace', 'ada@example.com'),
        (124, 'Alan Turing', 'alan@example.com'),
        (125, 'Grace Hopper', 'grace@example.com'),
        (126, 'Edsger Dijkstra', 'edsger@example.com')
     ON CONFLICT (id) DO NOTHING",
];

#[derive(Clone)]
struct UserState {
    instance: String,
    db: Database,
    client: Arc<ServiceClient>,
}

pub async fn app(deps: &ServiceDeps, client: Arc<ServiceClient>) -> Result<Router, ServiceError> {
    let db = db::connect(deps.database_url.as_deref(), &deps.default_sqlite_path).await?;
    db.run_script(SCHEMA_AND_SEED).await?;
    let state = UserState {
        instance: deps.instance.clone(),
        db,
        client,
    };
    let routes = Router::new()
        .route("/users/{id}", get(get_user))
        .route("/users/{id}/orders", get(get_user_orders));
    Ok(service_api(routes, state, &deps.http_metrics))
}

fn parse_user_id(raw: &str, trace: &TraceContext) -> Result<i64, ApiError> {
    raw.parse().map_err(|_| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_user_id",
            format!("user id must be an integer, not {raw:?}"),
        )
        .for_request(trace)
    })
}

async fn load_user(
    state: &UserState,
    id: i64,
    trace: &TraceContext,
) -> Result<(User, Duration), ApiError> {
    let started = Instant::now();
    let row = sqlx::query("SELECT id, name, email FROM users WHERE id = $1")
        .bind(id)
        .fetch_optional(&state.db.pool)
        .await
        .map_err(|err| {
            ApiError::database_unavailable(&state.instance, "read users", &err).for_request(trace)
        })?
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "user_not_found",
                format!("no user with id {id}"),
            )
            .for_request(trace)
        })?;
    let user = User {
        id: row.try_get("id").unwrap_or(id),
        name: row.try_get("name").unwrap_or_default(),
        email: row.try_get("email").unwrap_or_default(),
    };
    Ok((user, started.elapsed()))
}

async fn get_user(
    State(state): State<UserState>,
    Extension(trace): Extension<TraceContext>,
    caller: Caller,
    Path(raw_id): Path<String>,
) -> Result<Json<User>, ApiError> {
    let id = parse_user_id(&raw_id, &trace)?;
    caller.may_act_for_user(id)?;
    Ok(Json(load_user(&state, id, &trace).await?.0))
}

async fn get_user_orders(
    State(state): State<UserState>,
    Extension(trace): Extension<TraceContext>,
    caller: Caller,
    Path(raw_id): Path<String>,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let id = parse_user_id(&raw_id, &trace)?;
    caller.may_act_for_user(id)?;
    let (user, db_elapsed) = load_user(&state, id, &trace).await?;

    let mut request = Request::get(format!("/orders?userId={id}"))
        .body(Bytes::new())
        .map_err(|err| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "bad_request",
                err.to_string(),
            )
        })?;
    // Order Service authorizes the same caller, not User Service.
    caller.principal.to_headers(request.headers_mut());
    let (result, report) = state.client.send(ORDER_SERVICE, request, &trace).await;
    let mut headers = HeaderMap::new();
    report_call(
        &mut headers,
        &report,
        "GET",
        &format!("/orders?userId={id}"),
    );
    let unavailable = |message: String| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "order_service_unavailable",
            message,
        )
        .for_request(&trace)
    };
    let response = result.map_err(|err| {
        tracing::warn!(request_id = %trace.request_id, error = %err, "order service call failed");
        unavailable(err.to_string())
    })?;
    let status = response.status();
    for entry in server_timing::parse(response.headers()) {
        server_timing::append(&mut headers, &entry);
    }
    let body = Limited::new(response.into_body(), MAX_UPSTREAM_BODY)
        .collect()
        .await
        .map_err(|err| unavailable(format!("reading Order Service's answer failed: {err}")))?
        .to_bytes();
    if status != StatusCode::OK {
        return Err(ApiError::new(
            StatusCode::BAD_GATEWAY,
            "order_service_error",
            format!(
                "Order Service answered {status}: {}",
                String::from_utf8_lossy(&body)
            ),
        )
        .for_request(&trace));
    }
    let orders: Vec<Order> = serde_json::from_slice(&body).map_err(|err| {
        ApiError::new(
            StatusCode::BAD_GATEWAY,
            "order_service_error",
            format!("Order Service answered malformed JSON: {err}"),
        )
        .for_request(&trace)
    })?;

    server_timing::append(
        &mut headers,
        &TimingEntry::new(
            steps::USER_DB,
            db_elapsed,
            format!("{} read user {id} from {}", state.instance, state.db.url),
        ),
    );
    server_timing::append(
        &mut headers,
        &TimingEntry::new(
            steps::USER_SERVICE,
            started.elapsed(),
            format!(
                "{} combined user {id} ({}) with {} orders",
                state.instance,
                user.name,
                orders.len()
            ),
        ),
    );
    let body = UserOrders {
        user,
        orders,
        served_by: ServedBy {
            user_service: state.instance.clone(),
            order_service: report.answered_by().map(|e| e.instance.clone()),
        },
    };
    Ok((StatusCode::OK, headers, Json(body)).into_response())
}

/// Turns the client library's report into `Server-Timing` entries: discovery, balancing, call.
pub fn report_call(headers: &mut HeaderMap, report: &CallReport, method: &str, path: &str) {
    if let Some(resolution) = &report.resolution {
        let addresses: Vec<String> = resolution
            .endpoints
            .iter()
            .map(|e| format!("{}={}", e.instance, e.addr))
            .collect();
        server_timing::append(
            headers,
            &TimingEntry::new(
                steps::DNS,
                resolution.elapsed,
                format!(
                    "{} SRV via {}{}: {}",
                    resolution.name.trim_end_matches('.'),
                    resolution.server,
                    if resolution.cached {
                        " (cached within TTL)"
                    } else {
                        ""
                    },
                    addresses.join(" ")
                ),
            ),
        );
    }
    let Some(last) = report.attempts.last() else {
        return;
    };
    let through_sidecar = last.endpoint.instance == causeway_client::client::SIDECAR_ENDPOINT;
    if !through_sidecar {
        report_balancing(headers, report, last);
    }
    let connection = match last.connect {
        Some(connect) if through_sidecar => format!(
            "new HTTP/2 connection, TCP connect {:.3} ms",
            connect.as_secs_f64() * 1000.0
        ),
        Some(connect) => format!(
            "new HTTP/2 connection, TCP+TLS handshake {:.3} ms",
            connect.as_secs_f64() * 1000.0
        ),
        None => "reused HTTP/2 connection".to_string(),
    };
    let description = if through_sidecar {
        format!(
            "{method} http://{}.internal{path} to its sidecar at {} ({connection}, plain on loopback; the mesh carries it over mutual TLS)",
            report.service, last.endpoint.addr
        )
    } else {
        format!(
            "{method} https://{}.internal{path} to {} ({connection}); TLS verified against the Causeway CA",
            report.service, last.endpoint.addr
        )
    };
    server_timing::append(
        headers,
        &TimingEntry::new(steps::UPSTREAM, last.elapsed, description),
    );
}

/// The client library's choice of instance, as a `Server-Timing` entry.
fn report_balancing(headers: &mut HeaderMap, report: &CallReport, last: &causeway_client::Attempt) {
    let instances = report
        .resolution
        .as_ref()
        .map(|r| r.endpoints.len())
        .unwrap_or(0);
    let history: Vec<String> = report
        .attempts
        .iter()
        .map(|a| format!("{}: {}", a.endpoint.instance, a.outcome))
        .collect();
    server_timing::append(
        headers,
        &TimingEntry::new(
            steps::BALANCE,
            Duration::ZERO,
            format!(
                "round robin picked {} of {instances} instances; attempts: {}",
                last.endpoint.instance,
                history.join(", ")
            ),
        ),
    );
}
