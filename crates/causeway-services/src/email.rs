//! Email Service: `POST /emails` records an email and tells Notification Service about it through
//! the notification queue (`{"emailId":123,"status":"sent","userId":...}`); `GET /emails/{id}` shows
//! an email and whether its message reached the broker.
//!
//! The email row and its message are written in one transaction (a transactional outbox): the
//! message is published after the commit and marked published once the broker confirms it
//! durable. If the broker is down the request still succeeds (202, the message waits in the
//! outbox) and a relay publishes it when the broker is back, under the same message id, so a
//! message is never lost and consumers can drop the duplicate a crash between confirm and mark
//! may cause.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use causeway_core::serve::Shutdown;
use causeway_core::server_timing::{self, TimingEntry, steps};
use causeway_core::trace_context::TraceContext;
use causeway_queue::{BrokerLink, Confirmation, OutgoingMessage, QueueSpec, headers};
use http::{HeaderMap, StatusCode};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use serde::{Deserialize, Serialize};
use sqlx::Row;

use crate::db::{self, Database};
use crate::http::{ApiError, Caller, service_api};
use crate::{ServiceDeps, ServiceError};

/// How often the relay looks for messages that were not published.
const RELAY_INTERVAL: Duration = Duration::from_secs(1);
/// The relay leaves a fresh message to the request that wrote it for this long.
const RELAY_GRACE_MS: i64 = 3_000;
const RELAY_BATCH: i64 = 100;

/// What `POST /emails` takes.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SendEmail {
    pub user_id: i64,
    #[serde(default = "default_subject")]
    pub subject: String,
    /// Demo switch: Notification Service fails to process this email's message on every attempt,
    /// so it shows retries with backoff ending in the dead-letter queue.
    #[serde(default)]
    pub fail_notification: bool,
}

fn default_subject() -> String {
    "Your order has shipped".into()
}

/// The message Email Service publishes (the reference's `{"emailId":123,"status":"sent"}`).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EmailSent {
    pub email_id: i64,
    pub status: String,
    pub user_id: i64,
    /// Present only on demo messages that must fail processing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub simulate_failure: Option<String>,
}

/// What `POST /emails` and `GET /emails/{id}` answer.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EmailRecord {
    pub email_id: i64,
    pub user_id: i64,
    pub subject: String,
    pub status: String,
    pub message_id: String,
    /// Whether the broker has confirmed the message durable.
    pub published: bool,
    /// The broker's sequence number for it, where the broker has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub broker_sequence: Option<u64>,
}

fn schema(postgres: bool) -> &'static [&'static str] {
    if postgres {
        &[
            "CREATE TABLE IF NOT EXISTS emails (
                email_id BIGSERIAL PRIMARY KEY,
                user_id BIGINT NOT NULL,
                subject TEXT NOT NULL,
                status TEXT NOT NULL,
                created_at BIGINT NOT NULL
            )",
            OUTBOX,
        ]
    } else {
        &[
            "CREATE TABLE IF NOT EXISTS emails (
                email_id INTEGER PRIMARY KEY AUTOINCREMENT,
                user_id BIGINT NOT NULL,
                subject TEXT NOT NULL,
                status TEXT NOT NULL,
                created_at BIGINT NOT NULL
            )",
            OUTBOX,
        ]
    }
}

const OUTBOX: &str = "CREATE TABLE IF NOT EXISTS email_outbox (
    message_id TEXT PRIMARY KEY,
    email_id BIGINT NOT NULL,
    queue TEXT NOT NULL,
    payload TEXT NOT NULL,
    headers TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    published_at BIGINT
)";

#[derive(Clone)]
struct EmailState {
    instance: String,
    db: Database,
    broker: Arc<BrokerLink>,
    queue: QueueSpec,
    metrics: PublisherMetrics,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PublishLabels {
    queue: String,
    /// `confirmed` (by the request), `outboxed` (left for the relay), `relayed` (by the relay).
    outcome: &'static str,
}

/// How Email Service's messages reached the broker; registered by the caller.
#[derive(Clone, Default)]
pub struct PublisherMetrics {
    messages: Family<PublishLabels, Counter>,
}

impl PublisherMetrics {
    pub fn register(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register(
            "queue_publisher_messages",
            "Messages published, by queue and how: confirmed by the request, outboxed for the relay, relayed",
            self.messages.clone(),
        );
    }

    fn count(&self, queue: &str, outcome: &'static str) {
        self.messages
            .get_or_create(&PublishLabels {
                queue: queue.to_string(),
                outcome,
            })
            .inc();
    }
}

/// Opens the database, starts the outbox relay (until `shutdown`) and builds the application.
pub async fn app(
    deps: &ServiceDeps,
    broker: Arc<BrokerLink>,
    queue: QueueSpec,
    metrics: PublisherMetrics,
    shutdown: Shutdown,
) -> Result<Router, ServiceError> {
    let db = db::connect(deps.database_url.as_deref(), &deps.default_sqlite_path).await?;
    db.run_script(schema(db.url.starts_with("postgres")))
        .await?;
    let state = EmailState {
        instance: deps.instance.clone(),
        db,
        broker,
        queue,
        metrics,
    };
    tokio::spawn(relay(state.clone(), shutdown));
    let routes = Router::new()
        .route("/emails", post(send_email))
        .route("/emails/{email_id}", get(show_email));
    Ok(service_api(routes, state, &deps.http_metrics))
}

async fn send_email(
    State(state): State<EmailState>,
    Extension(trace): Extension<TraceContext>,
    caller: Caller,
    body: Result<Json<SendEmail>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let Json(request) = body.map_err(|err| {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_email", err.body_text()).for_request(&trace)
    })?;
    caller.may_act_for_user(request.user_id)?;
    let unavailable = |err: sqlx::Error| {
        ApiError::database_unavailable(&state.instance, "record the email", &err)
            .for_request(&trace)
    };

    let db_started = Instant::now();
    let now = causeway_queue::now_millis() as i64;
    let mut tx = state.db.pool.begin().await.map_err(unavailable)?;
    let email_id: i64 = sqlx::query(
        "INSERT INTO emails (user_id, subject, status, created_at) VALUES ($1, $2, 'sent', $3)
         RETURNING email_id",
    )
    .bind(request.user_id)
    .bind(&request.subject)
    .bind(now)
    .fetch_one(&mut *tx)
    .await
    .and_then(|row| row.try_get(0))
    .map_err(unavailable)?;
    let event = EmailSent {
        email_id,
        status: "sent".into(),
        user_id: request.user_id,
        simulate_failure: request
            .fail_notification
            .then(|| "notification processing fails (demo)".to_string()),
    };
    let message = OutgoingMessage::json(&event)
        .map_err(|err| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "bad_message",
                err.to_string(),
            )
        })?
        .with_header(headers::TRACEPARENT, trace.traceparent())
        .with_header(headers::REQUEST_ID, trace.request_id.clone());
    let headers_json = serde_json::to_string(&message.headers).unwrap_or_else(|_| "{}".into());
    sqlx::query(
        "INSERT INTO email_outbox (message_id, email_id, queue, payload, headers, created_at)
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(&message.message_id)
    .bind(email_id)
    .bind(&state.queue.name)
    .bind(String::from_utf8_lossy(&message.payload).into_owned())
    .bind(&headers_json)
    .bind(now)
    .execute(&mut *tx)
    .await
    .map_err(unavailable)?;
    tx.commit().await.map_err(unavailable)?;
    let db_elapsed = db_started.elapsed();

    let publish_started = Instant::now();
    let message_id = message.message_id.clone();
    let confirmation = publish_and_mark(&state, message).await;
    let publish_elapsed = publish_started.elapsed();
    state.metrics.count(
        &state.queue.name,
        if confirmation.is_ok() {
            "confirmed"
        } else {
            "outboxed"
        },
    );
    let (status, published, broker_sequence) = match &confirmation {
        Ok(confirmation) => (StatusCode::CREATED, true, confirmation.sequence),
        // Recorded and in the outbox: the relay publishes it once the broker is reachable.
        Err(_) => (StatusCode::ACCEPTED, false, None),
    };
    tracing::info!(
        event = "email.sent",
        request_id = %trace.request_id,
        email_id,
        user_id = request.user_id,
        message_id = %message_id,
        published,
        "email recorded"
    );

    let mut headers = HeaderMap::new();
    server_timing::append(
        &mut headers,
        &TimingEntry::new(
            steps::EMAIL_DB,
            db_elapsed,
            format!(
                "{} wrote email {email_id} and its outbox message to {}",
                state.instance, state.db.url
            ),
        ),
    );
    let publish_detail = match &confirmation {
        Ok(confirmation) => format!(
            "{} confirmed message {message_id} durable{}",
            state.queue.name,
            confirmation
                .sequence
                .map(|sequence| format!(" at sequence {sequence}"))
                .unwrap_or_default()
        ),
        Err(err) => format!("not published yet ({err}); the outbox relay will retry"),
    };
    server_timing::append(
        &mut headers,
        &TimingEntry::new(steps::QUEUE_PUBLISH, publish_elapsed, publish_detail),
    );
    server_timing::append(
        &mut headers,
        &TimingEntry::new(
            steps::EMAIL_SERVICE,
            started.elapsed(),
            state.instance.clone(),
        ),
    );
    let record = EmailRecord {
        email_id,
        user_id: request.user_id,
        subject: request.subject,
        status: "sent".into(),
        message_id,
        published,
        broker_sequence,
    };
    Ok((status, headers, Json(record)).into_response())
}

/// Publishes an outbox message and marks it published once the broker has confirmed it.
async fn publish_and_mark(
    state: &EmailState,
    message: OutgoingMessage,
) -> Result<Confirmation, causeway_queue::QueueError> {
    let message_id = message.message_id.clone();
    let confirmation = state
        .broker
        .publish(&state.queue, message)
        .await
        .inspect_err(|err| {
            tracing::warn!(
                event = "email.publish_failed",
                message_id = %message_id,
                error = %err,
                "message stays in the outbox"
            );
        })?;
    let marked = sqlx::query("UPDATE email_outbox SET published_at = $1 WHERE message_id = $2")
        .bind(causeway_queue::now_millis() as i64)
        .bind(&message_id)
        .execute(&state.db.pool)
        .await;
    if let Err(err) = marked {
        // The broker has it; the relay will publish it again and the consumer deduplicates.
        tracing::warn!(message_id = %message_id, error = %err, "cannot mark a message published");
    }
    Ok(confirmation)
}

async fn show_email(
    State(state): State<EmailState>,
    Extension(trace): Extension<TraceContext>,
    caller: Caller,
    Path(raw_id): Path<String>,
) -> Result<Response, ApiError> {
    let email_id: i64 = raw_id.parse().map_err(|_| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_email_id",
            format!("the email id must be an integer, not {raw_id:?}"),
        )
        .for_request(&trace)
    })?;
    let row = sqlx::query(
        "SELECT e.email_id, e.user_id, e.subject, e.status, o.message_id, o.published_at
         FROM emails e JOIN email_outbox o ON o.email_id = e.email_id
         WHERE e.email_id = $1",
    )
    .bind(email_id)
    .fetch_optional(&state.db.pool)
    .await
    .map_err(|err| {
        ApiError::database_unavailable(&state.instance, "read the email", &err).for_request(&trace)
    })?
    .ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "no_such_email",
            format!("there is no email {email_id}"),
        )
        .for_request(&trace)
    })?;
    let record = (|| -> Result<EmailRecord, sqlx::Error> {
        Ok(EmailRecord {
            email_id: row.try_get("email_id")?,
            user_id: row.try_get("user_id")?,
            subject: row.try_get("subject")?,
            status: row.try_get("status")?,
            message_id: row.try_get("message_id")?,
            published: row.try_get::<Option<i64>, _>("published_at")?.is_some(),
            broker_sequence: None,
        })
    })()
    .map_err(|err| ApiError::bad_row(&err).for_request(&trace))?;
    caller.may_act_for_user(record.user_id)?;
    Ok(Json(record).into_response())
}

/// Publishes outbox messages that their request could not (the broker was down, or the process
/// died between commit and confirm), oldest first, until `shutdown`.
async fn relay(state: EmailState, mut shutdown: Shutdown) {
    loop {
        tokio::select! {
            _ = shutdown.wait() => return,
            _ = tokio::time::sleep(RELAY_INTERVAL) => {}
        }
        let cutoff = causeway_queue::now_millis() as i64 - RELAY_GRACE_MS;
        let pending = sqlx::query(
            "SELECT message_id, payload, headers FROM email_outbox
             WHERE published_at IS NULL AND created_at < $1
             ORDER BY created_at, message_id LIMIT $2",
        )
        .bind(cutoff)
        .bind(RELAY_BATCH)
        .fetch_all(&state.db.pool)
        .await;
        let rows = match pending {
            Ok(rows) => rows,
            Err(err) => {
                tracing::warn!(error = %err, "outbox relay cannot read the outbox");
                continue;
            }
        };
        for row in rows {
            let Some(message) = outbox_message(&row) else {
                continue;
            };
            let message_id = message.message_id.clone();
            if publish_and_mark(&state, message).await.is_err() {
                // The broker is still away; try again on the next round, in order.
                break;
            }
            state.metrics.count(&state.queue.name, "relayed");
            tracing::info!(event = "email.relayed", message_id = %message_id, "outbox message published");
        }
    }
}

fn outbox_message(row: &sqlx::any::AnyRow) -> Option<OutgoingMessage> {
    let parsed = (|| -> Result<(String, String, String), sqlx::Error> {
        Ok((
            row.try_get("message_id")?,
            row.try_get("payload")?,
            row.try_get("headers")?,
        ))
    })();
    let (message_id, payload, headers_json) = match parsed {
        Ok(parsed) => parsed,
        Err(err) => {
            tracing::error!(error = %err, "unreadable outbox row");
            return None;
        }
    };
    let mut message = OutgoingMessage::new(payload.into_bytes()).with_message_id(message_id);
    if let Ok(stored) =
        serde_json::from_str::<std::collections::BTreeMap<String, String>>(&headers_json)
    {
        message.headers.extend(stored);
    }
    Some(message)
}
