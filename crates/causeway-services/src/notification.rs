//! Notification Service: consumes the notification queue, stores one notification per message,
//! and acks only after that write has committed; `GET /notifications?userId=123` lists them.
//!
//! Deliveries are at least once, so the write is idempotent on the message id: a redelivered
//! message (after a crash between commit and ack, or a publisher's outbox relay sending again)
//! is acked without a second row. A message published without an id (a foreign client) arrives
//! with its content id from `causeway-queue` (`sha256:` of its payload), so id-less messages with
//! different bodies are separate notifications and only a byte-identical body is a duplicate.
//! A failure that may pass (the database is busy) is retried with the queue's backoff; a message
//! that can never be processed (wrong shape) is dead-lettered at once; a message that keeps
//! failing ends in the dead-letter queue after the policy's attempts.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Json, Router};
use causeway_core::serve::Shutdown;
use causeway_core::trace_context::TraceContext;
use causeway_queue::{BrokerLink, Delivery, QueueSpec, SettleOutcome, headers};
use http::{HeaderMap, HeaderValue, StatusCode};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use serde::{Deserialize, Serialize};
use sqlx::Row;

use crate::db::{self, Database};
use crate::email::EmailSent;
use crate::http::{ApiError, Caller, read_rows, service_api};
use crate::{ServiceDeps, ServiceError};

/// The first wait before subscribing again after the broker went away; it doubles up to the max.
const RESUBSCRIBE_MIN: Duration = Duration::from_millis(200);
const RESUBSCRIBE_MAX: Duration = Duration::from_secs(5);

/// One stored notification.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Notification {
    pub message_id: String,
    pub email_id: i64,
    pub user_id: i64,
    pub text: String,
    /// Which delivery of the message was processed (1: the first).
    pub attempt: i64,
    /// Milliseconds from the publisher's send to this consumer's commit.
    pub latency_ms: Option<i64>,
    /// Microseconds this consumer spent on it, from delivery to commit.
    pub processing_us: i64,
}

const SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS notifications (
        message_id TEXT PRIMARY KEY,
        email_id BIGINT NOT NULL,
        user_id BIGINT NOT NULL,
        text TEXT NOT NULL,
        attempt BIGINT NOT NULL,
        latency_ms BIGINT,
        processing_us BIGINT NOT NULL,
        stored_at BIGINT NOT NULL
    )",
    "CREATE INDEX IF NOT EXISTS notifications_by_user ON notifications (user_id)",
    // Every delivery that was not processed, and what became of it: the service's own record of
    // retries, which `causeway demo queue` shows.
    "CREATE TABLE IF NOT EXISTS notification_failures (
        message_id TEXT NOT NULL,
        attempt BIGINT NOT NULL,
        failed_at BIGINT NOT NULL,
        reason TEXT NOT NULL,
        outcome TEXT NOT NULL,
        PRIMARY KEY (message_id, attempt)
    )",
];

/// A delivery that failed, as `GET /notifications/failures?messageId=` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FailedDelivery {
    pub message_id: String,
    pub attempt: i64,
    /// Milliseconds since the Unix epoch.
    pub failed_at: i64,
    pub reason: String,
    /// `retry in N ms`, `dead-lettered` or `rejected`.
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    queue: String,
    outcome: &'static str,
}

/// The consumer's metrics, registered by the caller.
#[derive(Clone)]
pub struct ConsumerMetrics {
    /// Deliveries by how they ended: acked, duplicate, retried, dead_lettered, rejected.
    outcomes: Family<OutcomeLabels, Counter>,
    /// Publish-to-commit latency of processed messages.
    end_to_end: Histogram,
}

impl Default for ConsumerMetrics {
    fn default() -> Self {
        Self {
            outcomes: Family::default(),
            end_to_end: causeway_core::telemetry::latency_histogram(),
        }
    }
}

impl ConsumerMetrics {
    pub fn register(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register(
            "queue_consumer_deliveries",
            "Deliveries consumed, by queue and outcome",
            self.outcomes.clone(),
        );
        registry.register(
            "queue_consumer_end_to_end_seconds",
            "From the publisher's send to the consumer's commit",
            self.end_to_end.clone(),
        );
    }

    fn count(&self, queue: &str, outcome: &'static str) {
        self.outcomes
            .get_or_create(&OutcomeLabels {
                queue: queue.to_string(),
                outcome,
            })
            .inc();
    }
}

#[derive(Clone)]
struct NotificationState {
    instance: String,
    db: Database,
}

/// Opens the database, starts the consumer (until `shutdown`) and builds the application.
pub async fn app(
    deps: &ServiceDeps,
    broker: Arc<BrokerLink>,
    queue: QueueSpec,
    prefetch: u16,
    metrics: ConsumerMetrics,
    shutdown: Shutdown,
) -> Result<Router, ServiceError> {
    let db = db::connect(deps.database_url.as_deref(), &deps.default_sqlite_path).await?;
    db.run_script(SCHEMA).await?;
    let state = NotificationState {
        instance: deps.instance.clone(),
        db,
    };
    let consumer = Consumer {
        state: state.clone(),
        broker,
        queue,
        prefetch,
        metrics,
    };
    tokio::spawn(consumer.run(shutdown));
    let routes = Router::new()
        .route("/notifications", get(list_notifications))
        .route("/notifications/failures", get(list_failures));
    Ok(service_api(routes, state, &deps.http_metrics))
}

struct Consumer {
    state: NotificationState,
    broker: Arc<BrokerLink>,
    queue: QueueSpec,
    prefetch: u16,
    metrics: ConsumerMetrics,
}

/// Why a message was not processed.
enum Failure {
    /// May pass on a later attempt.
    Transient(String),
    /// Never will: dead-letter it now.
    Permanent(String),
}

impl Consumer {
    /// Subscribes, processes deliveries one by one, and subscribes again (with backoff) whenever
    /// the broker goes away, until `shutdown`.
    async fn run(self, mut shutdown: Shutdown) {
        let mut wait = RESUBSCRIBE_MIN;
        loop {
            let subscribed = tokio::select! {
                _ = shutdown.wait() => return,
                subscribed = self.broker.subscribe(&self.queue, self.prefetch) => subscribed,
            };
            match subscribed {
                Ok((backend, mut subscription)) => {
                    tracing::info!(
                        event = "queue.subscribed",
                        queue = %self.queue.name,
                        prefetch = self.prefetch,
                        "consuming"
                    );
                    wait = RESUBSCRIBE_MIN;
                    loop {
                        let next = tokio::select! {
                            _ = shutdown.wait() => return,
                            next = subscription.next() => next,
                        };
                        match next {
                            Ok(delivery) => self.handle(delivery).await,
                            Err(err) => {
                                tracing::warn!(
                                    event = "queue.subscription_lost",
                                    queue = %self.queue.name,
                                    error = %err,
                                    "subscription ended; subscribing again"
                                );
                                self.broker.discard(&backend).await;
                                break;
                            }
                        }
                    }
                }
                Err(err) => {
                    tracing::warn!(
                        event = "queue.subscribe_failed",
                        queue = %self.queue.name,
                        error = %err,
                        retry_in_ms = wait.as_millis() as u64,
                        "cannot subscribe"
                    );
                }
            }
            tokio::select! {
                _ = shutdown.wait() => return,
                _ = tokio::time::sleep(wait) => {}
            }
            wait = (wait * 2).min(RESUBSCRIBE_MAX);
        }
    }

    /// Processes one delivery and settles it: ack after the commit, retry or dead-letter if not.
    async fn handle(&self, delivery: Delivery) {
        let trace = trace_of(&delivery);
        let message_id = delivery.message_id.clone();
        let attempt = delivery.attempt;
        let started = Instant::now();
        let processed = self.process(&delivery, started).await;
        let failure_reason = match &processed {
            Err(Failure::Transient(reason) | Failure::Permanent(reason)) => Some(reason.clone()),
            Ok(_) => None,
        };
        let settled = match processed {
            Ok(stored) => {
                let outcome = if stored { "acked" } else { "duplicate" };
                self.metrics.count(&self.queue.name, outcome);
                tracing::info!(
                    event = "notification.stored",
                    trace_id = %trace.trace_id,
                    request_id = %trace.request_id,
                    message_id = %message_id,
                    attempt,
                    duplicate = !stored,
                    elapsed_ms = started.elapsed().as_secs_f64() * 1000.0,
                    "processed; acking"
                );
                delivery.ack().await.map(|()| None)
            }
            Err(Failure::Transient(reason)) => delivery.retry(&reason).await.map(Some),
            Err(Failure::Permanent(reason)) => {
                self.metrics.count(&self.queue.name, "rejected");
                tracing::warn!(
                    event = "notification.rejected",
                    request_id = %trace.request_id,
                    message_id = %message_id,
                    reason = %reason,
                    "dead-lettering a message that cannot be processed"
                );
                delivery.reject(&reason).await.map(|()| None)
            }
        };
        if let Some(reason) = &failure_reason {
            let outcome = match &settled {
                Ok(Some(SettleOutcome::RetryScheduled { after, .. })) => {
                    format!("retry in {} ms", after.as_millis())
                }
                Ok(Some(SettleOutcome::DeadLettered { .. })) => "dead-lettered".into(),
                Ok(None) => "rejected".into(),
                Err(err) => format!("not settled: {err}"),
            };
            self.record_failure(&message_id, attempt, reason, &outcome)
                .await;
        }
        match settled {
            Ok(Some(SettleOutcome::RetryScheduled {
                after,
                next_attempt,
            })) => {
                self.metrics.count(&self.queue.name, "retried");
                tracing::warn!(
                    event = "notification.retry",
                    request_id = %trace.request_id,
                    message_id = %message_id,
                    attempt,
                    next_attempt,
                    backoff_ms = after.as_millis() as u64,
                    "processing failed; retrying after backoff"
                );
            }
            Ok(Some(SettleOutcome::DeadLettered { reason })) => {
                self.metrics.count(&self.queue.name, "dead_lettered");
                tracing::error!(
                    event = "notification.dead_lettered",
                    request_id = %trace.request_id,
                    message_id = %message_id,
                    attempt,
                    reason = %reason,
                    "processing failed on the last attempt; message moved to the dead-letter queue"
                );
            }
            Ok(None) => {}
            // The broker will deliver it again once the subscription is back.
            Err(err) => tracing::warn!(
                message_id = %message_id,
                error = %err,
                "could not settle a delivery"
            ),
        }
    }

    async fn record_failure(&self, message_id: &str, attempt: u32, reason: &str, outcome: &str) {
        let recorded = sqlx::query(
            "INSERT INTO notification_failures (message_id, attempt, failed_at, reason, outcome)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (message_id, attempt) DO NOTHING",
        )
        .bind(message_id)
        .bind(i64::from(attempt))
        .bind(causeway_queue::now_millis() as i64)
        .bind(reason)
        .bind(outcome)
        .execute(&self.state.db.pool)
        .await;
        if let Err(err) = recorded {
            tracing::warn!(message_id, error = %err, "cannot record a failed delivery");
        }
    }

    /// Stores the notification; `Ok(false)` if this message was stored before.
    async fn process(&self, delivery: &Delivery, started: Instant) -> Result<bool, Failure> {
        let event: EmailSent = delivery
            .json()
            .map_err(|err| Failure::Permanent(format!("not an email event: {err}")))?;
        if let Some(failure) = &event.simulate_failure {
            return Err(Failure::Transient(format!(
                "cannot notify user {} about email {}: {failure}",
                event.user_id, event.email_id
            )));
        }
        let now = causeway_queue::now_millis();
        let latency_ms = delivery
            .header(headers::PUBLISHED_AT)
            .and_then(|sent| sent.parse::<u64>().ok())
            .map(|sent| now.saturating_sub(sent) as i64);
        let text = format!("Email {} to you was {}", event.email_id, event.status);
        let inserted = sqlx::query(
            "INSERT INTO notifications
                (message_id, email_id, user_id, text, attempt, latency_ms, processing_us, stored_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
             ON CONFLICT (message_id) DO NOTHING",
        )
        .bind(&delivery.message_id)
        .bind(event.email_id)
        .bind(event.user_id)
        .bind(&text)
        .bind(i64::from(delivery.attempt))
        .bind(latency_ms)
        .bind(started.elapsed().as_micros() as i64)
        .bind(now as i64)
        .execute(&self.state.db.pool)
        .await
        .map_err(|err| {
            Failure::Transient(format!(
                "{} cannot store the notification: {err}",
                self.state.instance
            ))
        })?;
        if let Some(latency_ms) = latency_ms {
            self.metrics.end_to_end.observe(latency_ms as f64 / 1000.0);
        }
        Ok(inserted.rows_affected() == 1)
    }
}

/// The publisher's trace, continued by this consumer.
fn trace_of(delivery: &Delivery) -> TraceContext {
    let mut carried = HeaderMap::new();
    for name in [headers::TRACEPARENT, headers::REQUEST_ID] {
        if let Some(value) = delivery
            .header(name)
            .and_then(|value| HeaderValue::from_str(value).ok())
        {
            carried.insert(name, value);
        }
    }
    TraceContext::continue_from(&carried)
}

#[derive(Deserialize)]
struct NotificationsQuery {
    #[serde(rename = "userId")]
    user_id: Option<String>,
}

async fn list_notifications(
    State(state): State<NotificationState>,
    Extension(trace): Extension<TraceContext>,
    caller: Caller,
    query: Result<Query<NotificationsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
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
    let rows = sqlx::query(
        "SELECT message_id, email_id, user_id, text, attempt, latency_ms, processing_us
         FROM notifications
         WHERE user_id = $1 ORDER BY stored_at, message_id",
    )
    .bind(user_id)
    .fetch_all(&state.db.pool)
    .await
    .map_err(|err| {
        ApiError::database_unavailable(&state.instance, "read notifications", &err)
            .for_request(&trace)
    })?;
    let notifications = read_rows(&rows, |row| {
        Ok(Notification {
            message_id: row.try_get("message_id")?,
            email_id: row.try_get("email_id")?,
            user_id: row.try_get("user_id")?,
            text: row.try_get("text")?,
            attempt: row.try_get("attempt")?,
            latency_ms: row.try_get("latency_ms")?,
            processing_us: row.try_get("processing_us")?,
        })
    })
    .map_err(|err| err.for_request(&trace))?;
    Ok(Json(notifications).into_response())
}

#[derive(Deserialize)]
struct FailuresQuery {
    #[serde(rename = "messageId")]
    message_id: Option<String>,
}

async fn list_failures(
    State(state): State<NotificationState>,
    Extension(trace): Extension<TraceContext>,
    caller: Caller,
    Query(query): Query<FailuresQuery>,
) -> Result<Response, ApiError> {
    // Failed deliveries include messages that name no user (broken bodies): an operator's view.
    caller.require_admin("the failed-delivery log")?;
    let message_id = query.message_id.ok_or_else(|| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_message_id",
            "the messageId query parameter is required",
        )
        .for_request(&trace)
    })?;
    let rows = sqlx::query(
        "SELECT message_id, attempt, failed_at, reason, outcome FROM notification_failures
         WHERE message_id = $1 ORDER BY attempt",
    )
    .bind(&message_id)
    .fetch_all(&state.db.pool)
    .await
    .map_err(|err| {
        ApiError::database_unavailable(&state.instance, "read failures", &err).for_request(&trace)
    })?;
    let failures = read_rows(&rows, |row| {
        Ok(FailedDelivery {
            message_id: row.try_get("message_id")?,
            attempt: row.try_get("attempt")?,
            failed_at: row.try_get("failed_at")?,
            reason: row.try_get("reason")?,
            outcome: row.try_get("outcome")?,
        })
    })
    .map_err(|err| err.for_request(&trace))?;
    Ok(Json(failures).into_response())
}
