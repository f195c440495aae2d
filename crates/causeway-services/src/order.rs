//! Order Service: `GET /orders?userId=123` lists a user's orders from its database, and
//! `POST /orders/{id}/paid` (Payment Service's call through the mesh) marks an order paid by a
//! payment, idempotently: the same payment again is answered as the first time, another
//! payment for a paid order is a 409.

use std::time::Instant;

use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use causeway_core::server_timing::{self, TimingEntry, steps};
use causeway_core::trace_context::TraceContext;
use http::{HeaderMap, StatusCode};
use serde::{Deserialize, Serialize};
use sqlx::Row;

use crate::db::{self, Database};
use crate::http::{ApiError, Caller, read_rows, service_api};
use crate::{ServiceDeps, ServiceError};

/// One order as the API shows it (the reference's `[{ orderId: 1, item: "Book" }]`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Order {
    pub order_id: i64,
    pub user_id: i64,
    pub item: String,
    pub quantity: i64,
}

const SCHEMA_AND_SEED: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS orders (
        order_id BIGINT PRIMARY KEY,
        user_id BIGINT NOT NULL,
        item TEXT NOT NULL,
        quantity BIGINT NOT NULL
    )",
    "CREATE INDEX IF NOT EXISTS orders_by_user ON orders (user_id)",
    // One row per paid order: the key makes a second, different payment visible as a conflict.
    "CREATE TABLE IF NOT EXISTS order_payments (
        order_id BIGINT PRIMARY KEY,
        payment_id TEXT NOT NULL,
        paid_at_ms BIGINT NOT NULL
    )",
    "INSERT INTO orders (order_id, user_id, item, quantity) VALUES
        (1, 123, 'Book', 1),
        (2, 123, 'Fountain pen', 3),
        (3, 124, 'Laptop', 1),
        (4, 124, 'Notebook', 5),
        (5, 125, 'Compiler manual', 2)
     ON CONFLICT (order_id) DO NOTHING",
];

#[derive(Clone)]
struct OrderState {
    instance: String,
    db: Database,
}

#[derive(Deserialize)]
struct OrdersQuery {
    #[serde(rename = "userId")]
    user_id: Option<String>,
}

/// Opens (and seeds) the database and builds the application.
pub async fn app(deps: &ServiceDeps) -> Result<Router, ServiceError> {
    let db = db::connect(deps.database_url.as_deref(), &deps.default_sqlite_path).await?;
    db.run_script(SCHEMA_AND_SEED).await?;
    let state = OrderState {
        instance: deps.instance.clone(),
        db,
    };
    let routes = Router::new()
        .route("/orders", get(list_orders))
        .route("/orders/{id}/paid", post(mark_paid));
    Ok(service_api(routes, state, &deps.http_metrics))
}

async fn list_orders(
    State(state): State<OrderState>,
    Extension(trace): Extension<TraceContext>,
    caller: Caller,
    query: Result<Query<OrdersQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let bad_request = |message: String| {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_user_id", message).for_request(&trace)
    };
    let Query(query) = query.map_err(|err| bad_request(err.body_text()))?;
    let raw = query
        .user_id
        .ok_or_else(|| bad_request("the userId query parameter is required".into()))?;
    let user_id: i64 = raw
        .parse()
        .map_err(|_| bad_request(format!("userId must be an integer, not {raw:?}")))?;
    caller.may_act_for_user(user_id)?;

    let db_started = Instant::now();
    let rows = sqlx::query(
        "SELECT order_id, user_id, item, quantity FROM orders WHERE user_id = $1 ORDER BY order_id",
    )
    .bind(user_id)
    .fetch_all(&state.db.pool)
    .await
    .map_err(|err| {
        ApiError::database_unavailable(&state.instance, "read orders", &err).for_request(&trace)
    })?;
    let orders = read_rows(&rows, |row| {
        Ok(Order {
            order_id: row.try_get("order_id")?,
            user_id: row.try_get("user_id")?,
            item: row.try_get("item")?,
            quantity: row.try_get("quantity")?,
        })
    })
    .map_err(|err| err.for_request(&trace))?;
    let db_elapsed = db_started.elapsed();

    let mut headers = HeaderMap::new();
    server_timing::append(
        &mut headers,
        &TimingEntry::new(
            steps::ORDER_DB,
            db_elapsed,
            format!(
                "{} read {} orders of user {user_id} from {}",
                state.instance,
                orders.len(),
                state.db.url
            ),
        ),
    );
    server_timing::append(
        &mut headers,
        &TimingEntry::new(
            steps::ORDER_SERVICE,
            started.elapsed(),
            state.instance.clone(),
        ),
    );
    Ok((StatusCode::OK, headers, Json(orders)).into_response())
}

/// `POST /orders/{id}/paid`'s body.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MarkPaid {
    pub payment_id: String,
}

/// What `POST /orders/{id}/paid` answers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OrderPaid {
    pub order_id: i64,
    pub payment_id: String,
    pub paid_at_ms: i64,
    /// True when this payment had marked the order paid before (a repeated call).
    pub already_paid: bool,
    pub instance: String,
}

async fn mark_paid(
    State(state): State<OrderState>,
    Extension(trace): Extension<TraceContext>,
    caller: Caller,
    Path(raw_id): Path<String>,
    body: bytes::Bytes,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let fail =
        |status, code, message: String| ApiError::new(status, code, message).for_request(&trace);
    let order_id: i64 = raw_id.parse().map_err(|_| {
        fail(
            StatusCode::BAD_REQUEST,
            "invalid_order_id",
            format!("order id must be an integer, not {raw_id:?}"),
        )
    })?;
    let request: MarkPaid = serde_json::from_slice(&body).map_err(|err| {
        fail(
            StatusCode::BAD_REQUEST,
            "invalid_body",
            format!("expected {{\"paymentId\": \"...\"}}: {err}"),
        )
    })?;
    if request.payment_id.is_empty() || request.payment_id.len() > 128 {
        return Err(fail(
            StatusCode::BAD_REQUEST,
            "invalid_body",
            "paymentId must be 1 to 128 characters".into(),
        ));
    }
    let unavailable = |doing: &str, err: &sqlx::Error| {
        ApiError::database_unavailable(&state.instance, doing, err).for_request(&trace)
    };
    let owner: i64 = sqlx::query("SELECT user_id FROM orders WHERE order_id = $1")
        .bind(order_id)
        .fetch_optional(&state.db.pool)
        .await
        .map_err(|err| unavailable("read orders", &err))?
        .ok_or_else(|| {
            fail(
                StatusCode::NOT_FOUND,
                "order_not_found",
                format!("no order with id {order_id}"),
            )
        })?
        .try_get("user_id")
        .map_err(|err| ApiError::bad_row(&err).for_request(&trace))?;
    caller.may_act_for_user(owner)?;

    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_millis() as i64);
    let inserted = sqlx::query(
        "INSERT INTO order_payments (order_id, payment_id, paid_at_ms) VALUES ($1, $2, $3)
         ON CONFLICT (order_id) DO NOTHING",
    )
    .bind(order_id)
    .bind(&request.payment_id)
    .bind(now_ms)
    .execute(&state.db.pool)
    .await
    .map_err(|err| unavailable("record the payment", &err))?
    .rows_affected();
    let row = sqlx::query("SELECT payment_id, paid_at_ms FROM order_payments WHERE order_id = $1")
        .bind(order_id)
        .fetch_one(&state.db.pool)
        .await
        .map_err(|err| unavailable("read the payment", &err))?;
    let (paid_by, paid_at_ms): (String, i64) =
        (|| Ok((row.try_get("payment_id")?, row.try_get("paid_at_ms")?)))()
            .map_err(|err: sqlx::Error| ApiError::bad_row(&err).for_request(&trace))?;
    if paid_by != request.payment_id {
        return Err(fail(
            StatusCode::CONFLICT,
            "order_already_paid",
            format!(
                "order {order_id} was paid by payment {paid_by}, not {}",
                request.payment_id
            ),
        ));
    }
    tracing::info!(
        event = "order.paid",
        order_id,
        payment_id = %paid_by,
        repeated = inserted == 0,
        "order marked paid"
    );
    let mut headers = HeaderMap::new();
    server_timing::append(
        &mut headers,
        &TimingEntry::new(
            steps::ORDER_SERVICE,
            started.elapsed(),
            format!("{} marked order {order_id} paid", state.instance),
        ),
    );
    let answer = OrderPaid {
        order_id,
        payment_id: paid_by,
        paid_at_ms,
        already_paid: inserted == 0,
        instance: state.instance.clone(),
    };
    Ok((StatusCode::OK, headers, Json(answer)).into_response())
}
