//! Inventory Service: `GET /inventory/{sku}` answers the stock of a SKU from its own database
//! (table `stock`) together with its price, which it asks Pricing Service for over gRPC
//! (`pricing.v1.PricingService/GetPrice`, protobuf over HTTP/2 with TLS) through the shared
//! client library's balanced channel. The two lookups run concurrently.
//!
//! Pricing's gRPC status becomes an HTTP status with the usual JSON error body:
//! `INVALID_ARGUMENT` 400, `NOT_FOUND` 404, `DEADLINE_EXCEEDED` 504, `UNAVAILABLE` 503, anything
//! else 502. Each answer's `Server-Timing` says what the call did (method, instance, bytes each way)
//! and carries Pricing's own entries.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Json, Router};
use causeway_client::grpc::{GrpcBalancer, GrpcCallOptions, GrpcCallReport, code_name};
use causeway_core::server_timing::{self, TimingEntry};
use causeway_core::trace_context::TraceContext;
use causeway_proto::pricing::v1::pricing_service_client::PricingServiceClient;
use causeway_proto::pricing::v1::{GetPriceRequest, Price};
use http::{HeaderMap, StatusCode};
use prost::Message;
use serde::{Deserialize, Serialize};
use sqlx::Row;
use tonic::Code;
use tonic::metadata::MetadataValue;

use crate::db::{self, Database};
use crate::http::{ApiError, service_api};
use crate::pricing;
use crate::{ServiceDeps, ServiceError};

/// `Server-Timing` entry names Inventory Service reports.
pub const TIMING_DB: &str = "inventory-db";
pub const TIMING_GRPC: &str = "grpc";
pub const TIMING_SERVICE: &str = "inventory-service";

/// One SKU as `GET /inventory/{sku}` shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InventoryItem {
    pub sku: String,
    pub name: String,
    /// Units on hand.
    pub in_stock: i64,
    pub warehouse: String,
    pub price: ItemPrice,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ItemPrice {
    pub unit_price_cents: i64,
    pub currency: String,
    /// The Pricing Service instance that answered.
    pub served_by: String,
}

const SCHEMA_AND_SEED: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS stock (
        sku TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        in_stock BIGINT NOT NULL,
        warehouse TEXT NOT NULL
    )",
    // SKU-0009 is stocked but has no price: Pricing answers NOT_FOUND for it.
    "INSERT INTO stock (sku, name, in_stock, warehouse) VALUES
        ('SKU-0001', 'Mechanical keyboard', 42, 'AMS-1'),
        ('SKU-0002', 'Wireless mouse', 130, 'AMS-1'),
        ('SKU-0003', '27-inch monitor', 7, 'FRA-2'),
        ('SKU-0004', 'USB-C dock', 0, 'FRA-2'),
        ('SKU-0005', 'Laptop stand', 64, 'AMS-1'),
        ('SKU-0009', 'Cable organiser (discontinued)', 3, 'FRA-2')
     ON CONFLICT (sku) DO NOTHING",
];

#[derive(Clone)]
struct InventoryState {
    instance: String,
    db: Database,
    pricing: Arc<GrpcBalancer>,
}

struct Stock {
    name: String,
    in_stock: i64,
    warehouse: String,
}

/// Opens (and seeds) the database and builds the application; `pricing` is the balanced gRPC
/// channel to Pricing Service (its timeouts come from its `ClientConfig`).
pub async fn app(deps: &ServiceDeps, pricing: Arc<GrpcBalancer>) -> Result<Router, ServiceError> {
    let db = db::connect(deps.database_url.as_deref(), &deps.default_sqlite_path).await?;
    db.run_script(SCHEMA_AND_SEED).await?;
    let state = InventoryState {
        instance: deps.instance.clone(),
        db,
        pricing,
    };
    let routes = Router::new().route("/inventory/{sku}", get(get_item));
    Ok(service_api(routes, state, &deps.http_metrics))
}

async fn load_stock(
    state: &InventoryState,
    sku: &str,
) -> Result<(Option<Stock>, Duration), String> {
    let started = Instant::now();
    let row = sqlx::query("SELECT name, in_stock, warehouse FROM stock WHERE sku = $1")
        .bind(sku)
        .fetch_optional(&state.db.pool)
        .await
        .map_err(|err| err.to_string())?;
    let stock = match row {
        None => None,
        Some(row) => Some(Stock {
            name: row.try_get("name").map_err(|err| err.to_string())?,
            in_stock: row.try_get("in_stock").map_err(|err| err.to_string())?,
            warehouse: row.try_get("warehouse").map_err(|err| err.to_string())?,
        }),
    };
    Ok((stock, started.elapsed()))
}

async fn get_item(
    State(state): State<InventoryState>,
    Extension(trace): Extension<TraceContext>,
    Path(sku): Path<String>,
) -> Response {
    let started = Instant::now();
    let request = GetPriceRequest { sku: sku.clone() };
    let request_bytes = request.encoded_len();
    let price_call = state.pricing.unary(
        "GetPrice",
        request,
        &trace,
        GrpcCallOptions::default(),
        |channel, mut request| async move {
            // Pricing's own entries are passed on in this answer's Server-Timing.
            request.metadata_mut().insert(
                pricing::SERVER_TIMING_REQUEST,
                MetadataValue::from_static("1"),
            );
            PricingServiceClient::new(channel).get_price(request).await
        },
    );
    let (stock, (price, report)) = tokio::join!(load_stock(&state, &sku), price_call);

    let mut headers = HeaderMap::new();
    let answered = price.as_ref().ok().map(|response| response.get_ref());
    report_grpc_call(&mut headers, &report, request_bytes, answered);
    let price = match price {
        Ok(response) => {
            for entry in server_timing::parse(&response.metadata().clone().into_headers()) {
                server_timing::append(&mut headers, &entry);
            }
            response.into_inner()
        }
        Err(status) => {
            tracing::warn!(
                request_id = %trace.request_id,
                code = code_name(status.code()),
                error = %status.message(),
                "GetPrice failed"
            );
            return (headers, pricing_error(&status).for_request(&trace)).into_response();
        }
    };
    let stock = match stock {
        Ok((stock, elapsed)) => {
            server_timing::append(
                &mut headers,
                &TimingEntry::new(
                    TIMING_DB,
                    elapsed,
                    format!(
                        "{} read the stock of {sku} from {}",
                        state.instance, state.db.url
                    ),
                ),
            );
            stock
        }
        Err(err) => {
            let error = ApiError::database_unavailable(&state.instance, "read stock", &err);
            return (headers, error.for_request(&trace)).into_response();
        }
    };
    let Some(stock) = stock else {
        let error = ApiError::new(
            StatusCode::NOT_FOUND,
            "sku_not_found",
            format!("no stock record for {sku}"),
        );
        return (headers, error.for_request(&trace)).into_response();
    };
    server_timing::append(
        &mut headers,
        &TimingEntry::new(
            TIMING_SERVICE,
            started.elapsed(),
            format!(
                "{} combined the stock of {sku} with its price (DB and gRPC concurrently)",
                state.instance
            ),
        ),
    );
    let item = InventoryItem {
        sku,
        name: stock.name,
        in_stock: stock.in_stock,
        warehouse: stock.warehouse,
        price: ItemPrice {
            unit_price_cents: price.unit_price_cents,
            currency: price.currency,
            served_by: price.served_by,
        },
    };
    (StatusCode::OK, headers, Json(item)).into_response()
}

/// The HTTP answer for a failed `GetPrice`.
fn pricing_error(status: &tonic::Status) -> ApiError {
    let (http_status, code) = match status.code() {
        Code::InvalidArgument => (StatusCode::BAD_REQUEST, "invalid_sku"),
        Code::NotFound => (StatusCode::NOT_FOUND, "price_not_found"),
        Code::DeadlineExceeded => (StatusCode::GATEWAY_TIMEOUT, "pricing_timeout"),
        Code::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "pricing_unavailable"),
        _ => (StatusCode::BAD_GATEWAY, "pricing_error"),
    };
    ApiError::new(
        http_status,
        code,
        format!(
            "Pricing Service answered {}: {}",
            code_name(status.code()),
            status.message()
        ),
    )
}

/// The `grpc` `Server-Timing` entry: which method, which instance, how many bytes, which attempts.
fn report_grpc_call(
    headers: &mut HeaderMap,
    report: &GrpcCallReport,
    request_bytes: usize,
    answer: Option<&Price>,
) {
    let attempts: Vec<String> = report
        .attempts
        .iter()
        .map(|attempt| code_name(attempt.code).to_string())
        .collect();
    let description = match answer {
        Some(price) => format!(
            "{} via {} over HTTP/2+TLS, request {request_bytes} bytes, response {} bytes; balanced per request over {} instances of {}; attempts: {}",
            report.method,
            price.served_by,
            price.encoded_len(),
            report.instances,
            report.service,
            attempts.join(", ")
        ),
        None => format!(
            "{} on {} over HTTP/2+TLS, request {request_bytes} bytes, no answer; attempts: {}",
            report.method,
            report.service,
            attempts.join(", ")
        ),
    };
    server_timing::append(
        headers,
        &TimingEntry::new(TIMING_GRPC, report.elapsed, description),
    );
}
