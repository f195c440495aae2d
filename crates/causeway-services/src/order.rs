//! Order Service: `GET /orders?userId=123` lists a user's orders from its database.

use std::time::Instant;

use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
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
    let routes = Router::new().route("/orders", get(list_orders));
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
