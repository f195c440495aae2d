//! `causeway demo queue`: a real email through the running system, shown as the six steps of the
//! message-queue flow in the reference (message creation, queueing, broker, consumption,
//! acknowledgement, retry). The first message succeeds; the second fails processing on every
//! attempt, so it shows the retries with their backoff and its end in the dead-letter queue.
//! Every number comes from those messages: Email Service's `Server-Timing`, the notification
//! Notification Service stored, its record of failed deliveries, and the broker's own counts.

use std::fmt::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use causeway_core::Topology;
use causeway_core::server_timing::{self, TimingEntry, steps};
use causeway_core::trace_context::TraceContext;
use causeway_queue::{QueueBackend, headers};
use causeway_services::email::{EmailRecord, EmailSent};
use causeway_services::notification::{FailedDelivery, Notification};
use http::{HeaderMap, HeaderValue, Method, header};

use crate::demo::{DEMO_USER, DemoAccess};

/// How often the demo looks for the consumer's result.
const POLL: Duration = Duration::from_millis(10);

struct Edge {
    addr: SocketAddr,
    ca: std::path::PathBuf,
    token: String,
}

impl Edge {
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<serde_json::Value>,
        trace: Option<&TraceContext>,
    ) -> anyhow::Result<crate::edge::EdgeResponse> {
        let mut headers = HeaderMap::new();
        if let Some(trace) = trace {
            trace.inject(&mut headers);
        }
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {}", self.token))?,
        );
        let body = match body {
            Some(body) => {
                headers.insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                Bytes::from(serde_json::to_vec(&body)?)
            }
            None => Bytes::new(),
        };
        let response = crate::edge::request(
            self.addr,
            "localhost",
            &self.ca,
            method,
            path,
            headers,
            body,
        )
        .await?;
        if !response.status.is_success() {
            bail!(
                "{path} failed with {}: {}",
                response.status,
                String::from_utf8_lossy(&response.body)
            );
        }
        Ok(response)
    }

    /// Sends an email for the demo user through the edge.
    async fn send_email(
        &self,
        fail_notification: bool,
        trace: &TraceContext,
    ) -> anyhow::Result<(EmailRecord, crate::edge::EdgeResponse)> {
        let body = serde_json::json!({
            "userId": DEMO_USER.parse::<i64>()?,
            "subject": "Your order has shipped",
            "failNotification": fail_notification,
        });
        let response = self
            .call(Method::POST, "/api/emails", Some(body), Some(trace))
            .await?;
        let record: EmailRecord = serde_json::from_slice(&response.body)
            .context("Email Service answered something other than an email record")?;
        Ok((record, response))
    }

    /// Waits until `check` finds what it looks for in the JSON at `path`.
    async fn poll<T: serde::de::DeserializeOwned, R>(
        &self,
        path: &str,
        patience: Duration,
        check: impl Fn(&T) -> Option<R>,
    ) -> anyhow::Result<R> {
        let deadline = Instant::now() + patience;
        loop {
            let response = self.call(Method::GET, path, None, None).await?;
            let value: T = serde_json::from_slice(&response.body)
                .with_context(|| format!("{path} answered unexpected JSON"))?;
            if let Some(found) = check(&value) {
                return Ok(found);
            }
            if Instant::now() > deadline {
                bail!("{path} did not show the result within {patience:?}");
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

pub async fn queue(topology: &Topology, data_dir: &Path) -> anyhow::Result<String> {
    let access = DemoAccess::load(topology, data_dir)?;
    let edge_addr = access.edge;
    let edge = Edge {
        addr: edge_addr,
        ca: access.data.ca_cert(),
        token: access.token,
    };
    let broker_url = crate::queue::broker_url(topology, data_dir, None);
    // Shown without its password.
    let broker_shown = causeway_queue::BrokerTarget::parse(&broker_url)
        .map(|target| target.display())
        .unwrap_or(broker_url);
    let broker = crate::queue::connect(topology, data_dir, None).await?;
    let spec = &topology.messaging.notification_queue;
    let mut out = String::new();

    // The message that succeeds.
    let trace = TraceContext::continue_from(&HeaderMap::new());
    let (email, response) = edge.send_email(false, &trace).await?;
    let timings = server_timing::parse(&response.headers);
    let find = |name: &str| timings.iter().find(|entry| entry.name == name).cloned();
    let ms = |entry: &Option<TimingEntry>| entry.as_ref().and_then(|e| e.duration_ms);
    let desc = |entry: &Option<TimingEntry>| {
        entry
            .as_ref()
            .and_then(|e| e.description.clone())
            .unwrap_or_else(|| "(not reported)".into())
    };
    let payload = serde_json::to_string(&EmailSent {
        email_id: email.email_id,
        status: email.status.clone(),
        user_id: email.user_id,
        simulate_failure: None,
    })?;
    let notifications_path = format!("/api/notifications?userId={DEMO_USER}");
    let message_id = email.message_id.clone();
    let notification = edge
        .poll::<Vec<Notification>, _>(&notifications_path, Duration::from_secs(15), |list| {
            list.iter()
                .find(|notification| notification.message_id == message_id)
                .cloned()
        })
        .await
        .context("Notification Service did not store the notification")?;
    let queue_after = broker
        .list(std::slice::from_ref(spec))
        .await
        .ok()
        .and_then(|queues| queues.into_iter().find(|queue| queue.name == spec.name));

    let _ = writeln!(
        out,
        "Message queue: Email Service -> {} -> Notification Service\n\
         broker   {broker_shown} ({} backend)\n\
         request  POST https://localhost:{}/api/emails (request id {}, trace {}): {} after {:.2} ms\n",
        spec.name,
        broker.kind(),
        edge_addr.port(),
        trace.request_id,
        trace.trace_id,
        response.status,
        millis(response.timings.total),
    );
    let mut step = |number: u32, name: &str, latency: Option<f64>, what: String| {
        let latency = latency
            .map(|ms| format!("{ms:>8.3} ms"))
            .unwrap_or_else(|| format!("{:>11}", "-"));
        let _ = writeln!(out, " {number}. {name:<20} {latency}  {what}");
    };
    step(
        1,
        "Message creation",
        ms(&find(steps::EMAIL_DB)),
        format!(
            "{}; message {} = {payload}",
            desc(&find(steps::EMAIL_DB)),
            email.message_id
        ),
    );
    step(
        2,
        "Queueing",
        ms(&find(steps::QUEUE_PUBLISH)),
        format!(
            "{} (publish until the broker's confirm; Email Service answered {} without waiting for the consumer)",
            desc(&find(steps::QUEUE_PUBLISH)),
            response.status
        ),
    );
    let end_to_end = notification.latency_ms.map(|ms| ms as f64);
    let processing_ms = notification.processing_us as f64 / 1000.0;
    let held = end_to_end.map(|total| (total - processing_ms).max(0.0));
    step(
        3,
        "Broker",
        held,
        format!(
            "{} held the message until Notification Service took it (sent to delivered, at most {} unacked per consumer)",
            spec.name, topology.messaging.prefetch
        ),
    );
    step(
        4,
        "Message consumption",
        Some(processing_ms),
        format!(
            "Notification Service stored \"{}\" for user {} (attempt {}); {} ms from send to commit",
            notification.text,
            notification.user_id,
            notification.attempt,
            end_to_end.map_or_else(|| "?".to_string(), |ms| format!("{ms:.0}"))
        ),
    );
    step(
        5,
        "Acknowledgment",
        None,
        match &queue_after {
            Some(queue) => format!(
                "acked after the commit; the broker removed it: {} now has ready {}, unacked {}",
                spec.name,
                count(queue.ready),
                count(queue.unacked)
            ),
            None => format!("acked after the commit; {} removed it", spec.name),
        },
    );

    // The message that fails.
    let trace = TraceContext::continue_from(&HeaderMap::new());
    let sent_at = causeway_queue::now_millis() as i64;
    let (failing, _) = edge.send_email(true, &trace).await?;
    let policy = &spec.policy;
    let total_backoff: Duration = (1..policy.max_attempts).map(|n| policy.backoff(n)).sum();
    let failures_path = format!(
        "/api/notifications/failures?messageId={}",
        failing.message_id
    );
    let failures = edge
        .poll::<Vec<FailedDelivery>, _>(
            &failures_path,
            total_backoff + Duration::from_secs(15),
            |failures| {
                failures
                    .iter()
                    .any(|failure| failure.outcome == "dead-lettered")
                    .then(|| failures.clone())
            },
        )
        .await
        .context("the failing message did not reach the dead-letter queue")?;
    step(
        6,
        "Retry",
        None,
        format!(
            "email {} (message {}) fails processing on purpose; policy: {} attempts, backoff from {} ms doubling up to {} ms",
            failing.email_id,
            failing.message_id,
            policy.max_attempts,
            policy.initial_backoff_ms,
            policy.max_backoff_ms
        ),
    );
    for failure in &failures {
        let _ = writeln!(
            out,
            "    attempt {} at +{:>5} ms: {} -> {}",
            failure.attempt,
            failure.failed_at - sent_at,
            failure.reason,
            failure.outcome
        );
    }
    let _ = writeln!(
        out,
        "    {}",
        dead_letter_line(&*broker, &spec.name, &failing.message_id).await
    );
    Ok(out)
}

/// What the dead-letter queue says about `message_id`.
async fn dead_letter_line(backend: &dyn QueueBackend, queue: &str, message_id: &str) -> String {
    let dlq = causeway_queue::dead_letter_queue_name(queue);
    match backend.peek(&dlq, 1000).await {
        Ok(letters) => match letters
            .iter()
            .find(|letter| letter.message_id == message_id)
        {
            Some(letter) => format!(
                "{dlq} holds it ({} dead letter{} in all): {}; `causeway queue redrive {queue}` moves dead letters back",
                letters.len(),
                if letters.len() == 1 { "" } else { "s" },
                letter
                    .headers
                    .get(headers::DEAD_LETTER_REASON)
                    .map(String::as_str)
                    .unwrap_or("(no reason recorded)")
            ),
            None => format!("{dlq} does not show it (yet)"),
        },
        Err(err) => format!("dead-lettered to {dlq} (cannot look: {err})"),
    }
}

fn count(value: Option<u64>) -> String {
    value.map_or_else(|| "-".to_string(), |n| n.to_string())
}

fn millis(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}
