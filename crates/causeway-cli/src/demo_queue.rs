//! `causeway demo queue`: a real email through the running system, shown as the six steps of the
//! message-queue flow in the reference (message creation, queueing, broker, consumption,
//! acknowledgement, retry). The first message succeeds; the second fails processing on every
//! attempt, so it shows the retries with their backoff and its end in the dead-letter queue.
//! Every number comes from those messages: Email Service's `Server-Timing`, the notification
//! Notification Service stored, its record of failed deliveries, and the broker itself: on the
//! embedded broker the demo peeks the queue (which shows ready, delayed and unacked messages)
//! every millisecond while the first message travels, to see when the broker let go of it.
//! Where a backend cannot show a number, the output says why instead of showing one.

use std::collections::HashMap;
use std::fmt::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use causeway_core::Topology;
use causeway_core::server_timing::{self, TimingEntry, steps};
use causeway_core::trace_context::TraceContext;
use causeway_queue::{BackendKind, QueueBackend, headers};
use causeway_services::email::{EmailRecord, EmailSent};
use causeway_services::notification::{FailedDelivery, Notification};
use http::{HeaderMap, Method};

use crate::demo::{DEMO_USER, DemoAccess};

/// How often the demo looks for the consumer's result.
const POLL: Duration = Duration::from_millis(10);
/// How often the demo peeks the broker while it waits for the first message's ack.
const WATCH_EVERY: Duration = Duration::from_millis(1);
/// At most this many messages per peek; a queue holding more makes a peek inconclusive, and
/// the demo then peeks only every [`WATCH_FULL_EVERY`] rather than copy a backlog every millisecond.
const WATCH_LIMIT: usize = 100;
const WATCH_FULL_EVERY: Duration = Duration::from_millis(100);
/// How long to wait for the consumer's result, and for the broker to let go of the message.
const PATIENCE: Duration = Duration::from_secs(15);

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
        let response = crate::edge::api_request(
            self.addr,
            &self.ca,
            &self.token,
            method,
            path,
            body.as_ref(),
            headers,
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
    // The failed-delivery log belongs to no one user: the operator reads it.
    let operator = Edge {
        addr: edge_addr,
        ca: edge.ca.clone(),
        token: access.operator_token,
    };
    let broker_url = crate::queue::broker_url(topology, data_dir, None);
    // Shown without its password.
    let broker_shown = causeway_queue::BrokerTarget::parse(&broker_url)
        .map(|target| target.display())
        .unwrap_or(broker_url);
    let broker = crate::queue::connect(topology, data_dir, None).await?;
    let spec = &topology.messaging.notification_queue;
    let mut out = String::new();

    // The message that succeeds, with the broker watched (where it can be) until it lets go of it.
    let trace = TraceContext::continue_from(&HeaderMap::new());
    let notifications_path = format!("/api/notifications?userId={DEMO_USER}");
    let (target, watched_target) = tokio::sync::watch::channel(None);
    let sent_at = now_ms();
    let watching = async {
        match unobservable_ack(broker.kind()) {
            None => Ok(watch_until_gone(&*broker, &spec.name, watched_target).await),
            Some(why) => Err(why),
        }
    };
    let consuming = async {
        let target = target;
        let (email, response) = edge.send_email(false, &trace).await?;
        target.send_replace(Some(email.message_id.clone()));
        let message_id = email.message_id.clone();
        let notification = edge
            .poll::<Vec<Notification>, _>(&notifications_path, PATIENCE, |list| {
                list.iter()
                    .find(|notification| notification.message_id == message_id)
                    .cloned()
            })
            .await
            .context("Notification Service did not store the notification")?;
        anyhow::Ok((email, response, notification))
    };
    let (watched, consumed) = tokio::join!(watching, consuming);
    let (email, response, notification) = consumed?;
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
    // Latencies: to the microsecond where the source measures that finely, else whole
    // milliseconds (epoch-millisecond timestamps); `≤` for an upper bound.
    let fine = |ms: Option<f64>| ms.map(|ms| format!("{ms:>8.3} ms"));
    let mut step = |number: u32, name: &str, latency: Option<String>, what: String| {
        let latency = latency.unwrap_or_else(|| format!("{:>11}", "-"));
        let _ = writeln!(out, " {number}. {name:<20} {latency}  {what}");
    };
    step(
        1,
        "Message creation",
        fine(ms(&find(steps::EMAIL_DB))),
        format!(
            "{}; message {} = {payload}",
            desc(&find(steps::EMAIL_DB)),
            email.message_id
        ),
    );
    step(
        2,
        "Queueing",
        fine(ms(&find(steps::QUEUE_PUBLISH))),
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
        fine(held),
        format!(
            "{} held the message until Notification Service took it (sent to delivered, at most {} unacked per consumer)",
            spec.name, topology.messaging.prefetch
        ),
    );
    step(
        4,
        "Message consumption",
        fine(Some(processing_ms)),
        format!(
            "Notification Service stored \"{}\" for user {} (attempt {}); {} ms from send to commit",
            notification.text,
            notification.user_id,
            notification.attempt,
            end_to_end.map_or_else(|| "?".to_string(), |ms| format!("{ms:.0}"))
        ),
    );
    let counts = match &queue_after {
        Some(queue) => format!(
            "{} now has ready {}, unacked {}",
            spec.name,
            count(queue.ready),
            count(queue.unacked)
        ),
        None => format!("{} cannot be listed", spec.name),
    };
    let (ack_latency, ack_what) = acknowledgment(&watched, &notification, sent_at);
    step(
        5,
        "Acknowledgment",
        ack_latency.map(|ms| format!("≤{ms:>7} ms")),
        format!("{ack_what}; {counts}"),
    );

    // The message that fails.
    let trace = TraceContext::continue_from(&HeaderMap::new());
    let sent_at = now_ms();
    let (failing, _) = edge.send_email(true, &trace).await?;
    let policy = &spec.policy;
    let total_backoff: Duration = (1..policy.max_attempts).map(|n| policy.backoff(n)).sum();
    let failures_path = format!(
        "/api/notifications/failures?messageId={}",
        failing.message_id
    );
    let failures = operator
        .poll::<Vec<FailedDelivery>, _>(&failures_path, total_backoff + PATIENCE, |failures| {
            failures
                .iter()
                .any(|failure| failure.outcome == "dead-lettered")
                .then(|| failures.clone())
        })
        .await
        .context("the failing message did not reach the dead-letter queue")?;
    // From the first failed attempt to the last (the dead-lettering), by Notification Service's
    // record of each failure.
    let retrying = failures
        .first()
        .zip(failures.last())
        .map(|(first, last)| last.failed_at - first.failed_at);
    step(
        6,
        "Retry",
        retrying.map(|ms| format!("{ms:>8} ms")),
        format!(
            "email {} (message {}) fails processing on purpose: first failure to dead letter, by the times Notification Service recorded each failure (each once the broker had taken the retry, so a gap is the backoff give or take how long the broker took to take each one); policy: {} attempts, backoff from {} ms doubling up to {} ms",
            failing.email_id,
            failing.message_id,
            policy.max_attempts,
            policy.initial_backoff_ms,
            policy.max_backoff_ms
        ),
    );
    let mut previous: Option<&FailedDelivery> = None;
    for failure in &failures {
        let waited = previous.map_or_else(String::new, |before| {
            format!(
                " ({} ms after attempt {})",
                failure.failed_at - before.failed_at,
                before.attempt
            )
        });
        let _ = writeln!(
            out,
            "    attempt {} at +{:>5} ms{waited}: {} -> {}",
            failure.attempt,
            failure.failed_at - sent_at,
            failure.reason,
            failure.outcome
        );
        previous = Some(failure);
    }
    let _ = writeln!(
        out,
        "    {}",
        dead_letter_line(&*broker, &spec.name, &failing.message_id).await
    );
    Ok(out)
}

/// What peeking the broker showed about one message; times in milliseconds since the epoch.
#[derive(Default)]
struct Watched {
    /// The publisher's send time, from the message's headers, if a peek found the message.
    published_at: Option<i64>,
    /// When the last peek that still found the message began.
    last_held: Option<i64>,
    /// When the first peek that no longer found it ended.
    gone_by: Option<i64>,
    /// Why the watch ended without seeing the message go.
    trouble: Option<String>,
}

/// Peeks `queue` every [`WATCH_EVERY`] until the message named on `target` is no longer there
/// (the broker has taken its ack), or for [`PATIENCE`] after it was named. Starts before the
/// message exists, so that it may see the message while the broker holds it; a peek shows ready,
/// delayed and unacked messages, so the message leaves the peeks only when it is acked.
async fn watch_until_gone(
    backend: &dyn QueueBackend,
    queue: &str,
    target: tokio::sync::watch::Receiver<Option<String>>,
) -> Watched {
    // What each message looked like at its latest sighting: (published at, sighted at).
    let mut sighted: HashMap<String, (Option<i64>, i64)> = HashMap::new();
    let mut deadline = Instant::now() + PATIENCE;
    let mut named = false;
    loop {
        let began = now_ms();
        // Named before this peek began, so the broker had confirmed the message by then.
        let wanted = target.borrow().clone();
        if wanted.is_some() && !named {
            named = true;
            deadline = Instant::now() + PATIENCE;
        }
        let messages = match backend.peek(queue, WATCH_LIMIT).await {
            Ok(messages) => messages,
            Err(err) => {
                return Watched {
                    trouble: Some(format!("cannot peek {queue}: {err}")),
                    ..Watched::default()
                };
            }
        };
        let ended = now_ms();
        for message in &messages {
            let published_at = message
                .headers
                .get(headers::PUBLISHED_AT)
                .and_then(|at| at.parse().ok());
            sighted.insert(message.message_id.clone(), (published_at, began));
        }
        let complete = messages.len() < WATCH_LIMIT;
        if let Some(id) = &wanted
            && complete
            && !messages.iter().any(|message| &message.message_id == id)
        {
            let (published_at, last_held) = sighted.get(id).copied().unzip();
            return Watched {
                published_at: published_at.flatten(),
                last_held,
                gone_by: Some(ended),
                trouble: None,
            };
        }
        if wanted.is_none() && target.has_changed().is_err() {
            return Watched {
                trouble: Some("the email was not sent".into()),
                ..Watched::default()
            };
        }
        if Instant::now() > deadline {
            return Watched {
                trouble: Some(format!(
                    "{queue} still held it after {PATIENCE:?} (or holds more than {WATCH_LIMIT} messages)"
                )),
                ..Watched::default()
            };
        }
        tokio::time::sleep(if complete {
            WATCH_EVERY
        } else {
            WATCH_FULL_EVERY
        })
        .await;
    }
}

/// Why the ack's time cannot be seen on `kind`; `None` where peeking shows it (the embedded
/// broker's peek includes unacked messages and takes nothing).
fn unobservable_ack(kind: BackendKind) -> Option<String> {
    match kind {
        BackendKind::Embedded => None,
        BackendKind::Amqp => Some("its time cannot be observed on RabbitMQ: basic.ack has no reply, the broker's counts leave out unacked messages, and peeking (basic.get) would take the message from the consumer".into()),
        BackendKind::Mqtt => Some("its time cannot be observed on MQTT: the PUBACK has no reply and MQTT can neither count nor peek".into()),
    }
}

/// Step 5: how long after the consumer stored the notification the broker had let go of the
/// message (an upper bound: the end of the first peek that no longer found it), and what that
/// is based on.
fn acknowledgment(
    watched: &Result<Watched, String>,
    notification: &Notification,
    sent_at: i64,
) -> (Option<i64>, String) {
    let watched = match watched {
        Ok(watched) => watched,
        Err(why) => return (None, format!("acked after the commit; {why}")),
    };
    if let Some(trouble) = &watched.trouble {
        return (None, format!("acked after the commit; no time: {trouble}"));
    }
    let (Some(gone_by), Some(latency_ms)) = (watched.gone_by, notification.latency_ms) else {
        return (
            None,
            "acked after the commit; no time: Notification Service recorded no send-to-store latency".into(),
        );
    };
    // When the consumer stored it, on its clock: the publisher's send time (from the message's
    // headers) plus the latency the consumer recorded. The consumer takes that time as its write
    // begins, so what follows includes the write's commit. Without the send time (no peek found
    // the message), the demo's own send is earlier, which keeps the result an upper bound.
    let stored_at = watched.published_at.unwrap_or(sent_at) + latency_ms;
    let from = if watched.published_at.is_some() {
        "the store time Notification Service recorded, taken as its write began"
    } else {
        "the earliest that store time can be: the demo's send plus the recorded latency"
    };
    let offset = |at: i64| format!("{:+} ms", at - stored_at);
    let held = match watched.last_held {
        Some(last_held) => format!("still held it at {}", offset(last_held)),
        None => "was never seen holding it".into(),
    };
    (
        Some(gone_by - stored_at),
        format!(
            "Notification Service acked after its commit; peeking every {} ms, the broker {held} and had dropped it by {} (from {from})",
            WATCH_EVERY.as_millis(),
            offset(gone_by)
        ),
    )
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

/// Milliseconds since the Unix epoch, as the services' records and message headers keep time.
fn now_ms() -> i64 {
    causeway_queue::now_millis() as i64
}

fn millis(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}
