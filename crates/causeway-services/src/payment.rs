//! Payment Service (technique 4's caller): `POST /payments` `{"orderId":..,"userId":..,"amount":..}`
//! records a payment in its own database, then asks Order Service to mark the order paid
//! (`POST /orders/{id}/paid`), through the shared client library (and, when meshed, through its
//! sidecar). `GET /payments/{id}` reads one back.
//!
//! Idempotent on an `Idempotency-Key` header, per user: a repeat with the same key and body is
//! answered from the stored payment (with `Idempotent-Replayed: true`), the same key with
//! another body is a 422. The payment is written before Order Service is called, so nothing is
//! lost when that call fails: it stays `pending`, the answer says so, and a repeat with the same
//! key completes it. The call to Order Service carries the payment id as its own
//! `Idempotency-Key`, which is what makes it safe for the client library and the sidecar to retry.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use bytes::Bytes;
use causeway_client::{IDEMPOTENCY_KEY, ServiceClient};
use causeway_core::server_timing::{self, TimingEntry};
use causeway_core::trace_context::TraceContext;
use http::{HeaderMap, HeaderName, HeaderValue, Request, StatusCode, header};
use http_body_util::{BodyExt, Limited};
use serde::{Deserialize, Serialize};
use sqlx::Row;

use crate::db::{self, Database};
use crate::http::{ApiError, Caller, service_api};
use crate::order::OrderPaid;
use crate::user::{ORDER_SERVICE, report_call};
use crate::{ServiceDeps, ServiceError};

/// Set on an answer that repeats a stored payment rather than making a new one.
pub const IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");
/// Server-Timing step of this service.
pub const PAYMENT_SERVICE_STEP: &str = "payment-service";
const MAX_KEY_LEN: usize = 255;
const MAX_BODY: usize = 16 * 1024;
/// A larger Order Service answer is refused rather than buffered.
const MAX_UPSTREAM_BODY: usize = 64 * 1024;
/// The largest amount accepted, in cents (ten billion): beyond it an f64 loses cents.
const MAX_AMOUNT_CENTS: i64 = 1_000_000_000_000;

const SCHEMA: &[&str] = &["CREATE TABLE IF NOT EXISTS payments (
        payment_id TEXT PRIMARY KEY,
        user_id BIGINT NOT NULL,
        order_id BIGINT NOT NULL,
        amount_cents BIGINT NOT NULL,
        idempotency_key TEXT,
        status TEXT NOT NULL,
        detail TEXT NOT NULL,
        created_at_ms BIGINT NOT NULL,
        UNIQUE (user_id, idempotency_key)
    )"];

/// The columns [`read_payment`] reads, then `$where`.
macro_rules! select_payment {
    ($where:literal) => {
        concat!(
            "SELECT payment_id, user_id, order_id, amount_cents, status, detail FROM payments WHERE ",
            $where
        )
    };
}

/// `POST /payments`' body.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct NewPayment {
    order_id: i64,
    user_id: i64,
    amount: f64,
}

/// A payment's state: `pending` until Order Service confirmed the order paid, `paid` after,
/// `rejected` when Order Service refused (no such order, paid by another payment).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PaymentStatus {
    Pending,
    Paid,
    Rejected,
}

impl PaymentStatus {
    fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Paid => "paid",
            Self::Rejected => "rejected",
        }
    }

    fn parse(stored: &str) -> Option<Self> {
        match stored {
            "pending" => Some(Self::Pending),
            "paid" => Some(Self::Paid),
            "rejected" => Some(Self::Rejected),
            _ => None,
        }
    }
}

/// One payment as the API shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Payment {
    pub payment_id: String,
    pub order_id: i64,
    pub user_id: i64,
    /// In currency units, two decimals.
    pub amount: f64,
    pub status: PaymentStatus,
    /// Why it is in that state (Order Service's answer, or why it could not be reached).
    pub detail: String,
    /// The Order Service instance that marked the order paid, on the call that did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub order_instance: Option<String>,
}

#[derive(Clone)]
struct PaymentState {
    instance: String,
    db: Database,
    client: Arc<ServiceClient>,
}

pub async fn app(deps: &ServiceDeps, client: Arc<ServiceClient>) -> Result<Router, ServiceError> {
    let db = db::connect(deps.database_url.as_deref(), &deps.default_sqlite_path).await?;
    db.run_script(SCHEMA).await?;
    let state = PaymentState {
        instance: deps.instance.clone(),
        db,
        client,
    };
    let routes = Router::new()
        .route("/payments", post(create_payment))
        .route("/payments/{id}", get(get_payment));
    Ok(service_api(routes, state, &deps.http_metrics))
}

/// `amount` in cents, if it is a positive amount with at most two decimals.
fn amount_in_cents(amount: f64) -> Option<i64> {
    let cents = (amount * 100.0).round();
    let whole_cents = (amount * 100.0 - cents).abs() < 1e-6;
    (amount.is_finite() && whole_cents && cents >= 1.0 && cents <= MAX_AMOUNT_CENTS as f64)
        .then_some(cents as i64)
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, String> {
    let Some(value) = headers.get(IDEMPOTENCY_KEY) else {
        return Ok(None);
    };
    let key = value
        .to_str()
        .map_err(|_| "the Idempotency-Key must be visible ASCII".to_string())?;
    if key.is_empty() || key.len() > MAX_KEY_LEN {
        return Err(format!(
            "the Idempotency-Key must be 1 to {MAX_KEY_LEN} characters"
        ));
    }
    Ok(Some(key.to_string()))
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_millis() as i64)
}

async fn create_payment(
    State(state): State<PaymentState>,
    Extension(trace): Extension<TraceContext>,
    caller: Caller,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let invalid = |message: String| {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_payment", message).for_request(&trace)
    };
    if body.len() > MAX_BODY {
        return Err(invalid(format!("the body is over {MAX_BODY} bytes")));
    }
    let request: NewPayment = serde_json::from_slice(&body).map_err(|err| {
        invalid(format!(
            "expected {{\"orderId\": <integer>, \"userId\": <integer>, \"amount\": <number>}}: {err}"
        ))
    })?;
    let amount_cents = amount_in_cents(request.amount).ok_or_else(|| {
        invalid(format!(
            "amount must be positive with at most two decimals, not {}",
            request.amount
        ))
    })?;
    let key = idempotency_key(&headers).map_err(invalid)?;
    caller.may_act_for_user(request.user_id)?;

    let unavailable = |doing: &str, err: &sqlx::Error| {
        ApiError::database_unavailable(&state.instance, doing, err).for_request(&trace)
    };
    let payment_id = format!("pay_{}", causeway_queue::new_message_id());
    // With a key, a concurrent or repeated request finds the first one's row.
    sqlx::query(
        "INSERT INTO payments (payment_id, user_id, order_id, amount_cents, idempotency_key,
             status, detail, created_at_ms)
         VALUES ($1, $2, $3, $4, $5, 'pending', 'recorded; Order Service not called yet', $6)
         ON CONFLICT (user_id, idempotency_key) DO NOTHING",
    )
    .bind(&payment_id)
    .bind(request.user_id)
    .bind(request.order_id)
    .bind(amount_cents)
    .bind(key.clone())
    .bind(now_ms())
    .execute(&state.db.pool)
    .await
    .map_err(|err| unavailable("record the payment", &err))?;
    let stored = match &key {
        Some(key) => load_by_key(&state, request.user_id, key)
            .await
            .map_err(|err| unavailable("read the payment", &err))?,
        None => load_by_id(&state, &payment_id)
            .await
            .map_err(|err| unavailable("read the payment", &err))?,
    }
    .ok_or_else(|| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "payment_lost",
            format!("payment {payment_id} was written but cannot be read back"),
        )
        .for_request(&trace)
    })?;
    let (mut payment, stored_cents) = stored;
    if payment.order_id != request.order_id || stored_cents != amount_cents {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "idempotency_key_reused",
            format!(
                "this Idempotency-Key was used for payment {} of order {} (amount {}); a different request needs a new key",
                payment.payment_id, payment.order_id, payment.amount
            ),
        )
        .for_request(&trace));
    }
    // A finished payment is answered as stored; a pending one (Order Service was not reached
    // before) is carried on by this request.
    if payment.status != PaymentStatus::Pending {
        let replayed = payment.payment_id != payment_id;
        return Ok(answer(&state, payment, replayed, HeaderMap::new(), started));
    }
    let resumed = payment.payment_id != payment_id;

    let mut timings = HeaderMap::new();
    let outcome = mark_order_paid(&state, &caller, &payment, &trace, &mut timings).await;
    let (status, detail) = match &outcome {
        OrderOutcome::Paid(paid) => {
            payment.order_instance = Some(paid.instance.clone());
            let again = if paid.already_paid { " (again)" } else { "" };
            (
                PaymentStatus::Paid,
                format!(
                    "order {} marked paid by {}{again}",
                    paid.order_id, paid.instance
                ),
            )
        }
        OrderOutcome::Refused(why) => (PaymentStatus::Rejected, why.clone()),
        OrderOutcome::Unreachable(why) => (
            PaymentStatus::Pending,
            format!("{why}; repeat the request with the same Idempotency-Key to complete it"),
        ),
    };
    if status != PaymentStatus::Pending {
        sqlx::query(
            "UPDATE payments SET status = $1, detail = $2 WHERE payment_id = $3 AND status = 'pending'",
        )
        .bind(status.as_str())
        .bind(&detail)
        .bind(&payment.payment_id)
        .execute(&state.db.pool)
        .await
        .map_err(|err| unavailable("record the payment's outcome", &err))?;
    }
    tracing::info!(
        event = "payment.processed",
        payment_id = %payment.payment_id,
        order_id = payment.order_id,
        status = status.as_str(),
        detail = %detail,
        resumed,
        "payment processed"
    );
    payment.status = status;
    payment.detail = detail;
    Ok(answer(&state, payment, false, timings, started))
}

/// The status a payment is answered with: 201 when this request completed it, 200 for a
/// repeat of a completed one, 409 for a rejected one, 503 while it is pending (Order Service
/// was not reached).
fn answer(
    state: &PaymentState,
    payment: Payment,
    replayed: bool,
    mut headers: HeaderMap,
    started: Instant,
) -> Response {
    let status = match payment.status {
        PaymentStatus::Paid if replayed => StatusCode::OK,
        PaymentStatus::Paid => StatusCode::CREATED,
        PaymentStatus::Rejected => StatusCode::CONFLICT,
        PaymentStatus::Pending => StatusCode::SERVICE_UNAVAILABLE,
    };
    if replayed {
        headers.insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
    }
    if payment.status == PaymentStatus::Pending {
        headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    server_timing::append(
        &mut headers,
        &TimingEntry::new(
            PAYMENT_SERVICE_STEP,
            started.elapsed(),
            format!(
                "{} payment {} {}",
                state.instance,
                payment.payment_id,
                payment.status.as_str()
            ),
        ),
    );
    (status, headers, Json(payment)).into_response()
}

enum OrderOutcome {
    Paid(OrderPaid),
    /// Order Service answered and said no: final.
    Refused(String),
    /// No usable answer: the payment stays pending.
    Unreachable(String),
}

async fn mark_order_paid(
    state: &PaymentState,
    caller: &Caller,
    payment: &Payment,
    trace: &TraceContext,
    timings: &mut HeaderMap,
) -> OrderOutcome {
    let path = format!("/orders/{}/paid", payment.order_id);
    let body = serde_json::json!({ "paymentId": payment.payment_id }).to_string();
    let request = Request::post(path.as_str())
        .header(header::CONTENT_TYPE, "application/json")
        // The payment id names this call: repeating it changes nothing, so it may be retried.
        .header(IDEMPOTENCY_KEY, payment.payment_id.as_str())
        .body(Bytes::from(body));
    let mut request = match request {
        Ok(request) => request,
        Err(err) => return OrderOutcome::Unreachable(format!("cannot build the call: {err}")),
    };
    // Order Service authorizes the same user, not Payment Service.
    caller.principal.to_headers(request.headers_mut());
    let (result, report) = state.client.send(ORDER_SERVICE, request, trace).await;
    report_call(timings, &report, "POST", &path);
    let response = match result {
        Ok(response) => response,
        Err(err) => {
            tracing::warn!(request_id = %trace.request_id, error = %err, "order service call failed");
            return OrderOutcome::Unreachable(format!("Order Service was not reached: {err}"));
        }
    };
    let status = response.status();
    for entry in server_timing::parse(response.headers()) {
        server_timing::append(timings, &entry);
    }
    let body = match Limited::new(response.into_body(), MAX_UPSTREAM_BODY)
        .collect()
        .await
    {
        Ok(collected) => collected.to_bytes(),
        Err(err) => {
            return OrderOutcome::Unreachable(format!(
                "reading Order Service's answer failed: {err}"
            ));
        }
    };
    let text = || String::from_utf8_lossy(&body).into_owned();
    match status {
        StatusCode::OK => match serde_json::from_slice::<OrderPaid>(&body) {
            Ok(paid) => OrderOutcome::Paid(paid),
            Err(err) => {
                OrderOutcome::Unreachable(format!("Order Service answered malformed JSON: {err}"))
            }
        },
        StatusCode::NOT_FOUND | StatusCode::CONFLICT | StatusCode::FORBIDDEN => {
            OrderOutcome::Refused(format!("Order Service answered {status}: {}", text()))
        }
        _ => OrderOutcome::Unreachable(format!("Order Service answered {status}: {}", text())),
    }
}

async fn get_payment(
    State(state): State<PaymentState>,
    Extension(trace): Extension<TraceContext>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Payment>, ApiError> {
    let (payment, _) = load_by_id(&state, &id)
        .await
        .map_err(|err| {
            ApiError::database_unavailable(&state.instance, "read payments", &err)
                .for_request(&trace)
        })?
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "payment_not_found",
                format!("no payment with id {id:?}"),
            )
            .for_request(&trace)
        })?;
    caller.may_act_for_user(payment.user_id)?;
    Ok(Json(payment))
}

async fn load_by_id(
    state: &PaymentState,
    payment_id: &str,
) -> Result<Option<(Payment, i64)>, sqlx::Error> {
    let row = sqlx::query(select_payment!("payment_id = $1"))
        .bind(payment_id)
        .fetch_optional(&state.db.pool)
        .await?;
    row.as_ref().map(read_payment).transpose()
}

async fn load_by_key(
    state: &PaymentState,
    user_id: i64,
    key: &str,
) -> Result<Option<(Payment, i64)>, sqlx::Error> {
    let row = sqlx::query(select_payment!("user_id = $1 AND idempotency_key = $2"))
        .bind(user_id)
        .bind(key)
        .fetch_optional(&state.db.pool)
        .await?;
    row.as_ref().map(read_payment).transpose()
}

/// A stored payment and its amount in cents.
fn read_payment(row: &sqlx::any::AnyRow) -> Result<(Payment, i64), sqlx::Error> {
    let cents: i64 = row.try_get("amount_cents")?;
    let stored: String = row.try_get("status")?;
    let status = PaymentStatus::parse(&stored).ok_or_else(|| sqlx::Error::ColumnDecode {
        index: "status".into(),
        source: format!("unknown payment status {stored:?}").into(),
    })?;
    let payment = Payment {
        payment_id: row.try_get("payment_id")?,
        order_id: row.try_get("order_id")?,
        user_id: row.try_get("user_id")?,
        amount: cents as f64 / 100.0,
        status,
        detail: row.try_get("detail")?,
        order_instance: None,
    };
    Ok((payment, cents))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amounts_are_positive_with_at_most_two_decimals() {
        assert_eq!(amount_in_cents(19.99), Some(1999));
        assert_eq!(amount_in_cents(0.01), Some(1));
        assert_eq!(amount_in_cents(100.0), Some(10_000));
        assert_eq!(amount_in_cents(0.0), None);
        assert_eq!(amount_in_cents(-5.0), None);
        assert_eq!(amount_in_cents(1.005), None);
        assert_eq!(amount_in_cents(f64::NAN), None);
        assert_eq!(amount_in_cents(1e13), None);
    }

    #[test]
    fn idempotency_keys_are_short_visible_ascii() {
        let mut headers = HeaderMap::new();
        assert_eq!(idempotency_key(&headers), Ok(None));
        headers.insert(IDEMPOTENCY_KEY, HeaderValue::from_static("pay-1"));
        assert_eq!(idempotency_key(&headers), Ok(Some("pay-1".into())));
        headers.insert(IDEMPOTENCY_KEY, HeaderValue::from_static(""));
        assert!(idempotency_key(&headers).is_err());
        let long = "k".repeat(MAX_KEY_LEN + 1);
        headers.insert(
            IDEMPOTENCY_KEY,
            HeaderValue::from_str(&long).expect("ascii"),
        );
        assert!(idempotency_key(&headers).is_err());
    }
}
