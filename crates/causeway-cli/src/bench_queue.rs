//! `causeway bench queue`: the same workload through every broker reachable from this machine, in
//! one run: Causeway's embedded broker (started here, in-process, on a fresh directory with fsync
//! on), RabbitMQ (a durable classic queue: persistent messages, written before the confirm) and an MQTT broker at
//! QoS 1. Publishers send 1 KiB persistent JSON messages and wait for each confirm, `concurrency`
//! of them in flight; one consumer with a prefetch window acks every message after receiving it.
//! Reported: messages consumed per second, publish-to-confirm and publish-to-delivery latency.

use std::fmt::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use causeway_queue::{
    BrokerTarget, ConnectOptions, OutgoingMessage, QueueBackend, QueuePolicy, QueueSpec,
};

use crate::loadgen::{self, LoadShape};

/// The header carrying the publisher's send time in microseconds since the Unix epoch.
const SENT_US: &str = "x-bench-sent-us";
/// The consumer's prefetch window.
const PREFETCH: u16 = 256;
/// The payload size the issue asks for.
const PAYLOAD_BYTES: usize = 1024;

#[derive(Clone, Debug)]
pub struct QueueBenchOptions {
    pub shape: LoadShape,
    pub amqp_url: String,
    pub mqtt_url: String,
}

/// One backend's results.
struct QueueReport {
    name: String,
    consumed_per_second: f64,
    published: u64,
    publish_errors: u64,
    confirm_p50: Duration,
    confirm_p99: Duration,
    delivery_p50: Duration,
    delivery_p99: Duration,
}

pub async fn run(options: &QueueBenchOptions) -> anyhow::Result<String> {
    let mut out = String::new();
    let mut reports = Vec::new();

    let local = causeway_broker::testing::LocalBroker::start().await?;
    let options_for = |name: &str| ConnectOptions::new(format!("causeway-bench-{name}"));
    let embedded = causeway_queue::connect(
        &local.target(),
        &local.connect_options(options_for("embedded")),
    )
    .await?;
    reports.push(measure("embedded broker (fsync)", embedded, options.shape).await?);
    drop(local);

    for (name, url) in [
        ("RabbitMQ durable queue", &options.amqp_url),
        ("MQTT QoS 1", &options.mqtt_url),
    ] {
        let target = BrokerTarget::parse(url)?;
        match causeway_queue::connect(&target, &options_for(name)).await {
            Ok(backend) => reports.push(measure(name, backend, options.shape).await?),
            Err(err) => {
                let _ = writeln!(out, "skipped {name}: {err}");
            }
        }
    }

    let _ = writeln!(
        out,
        "{} publishers with confirms, 1 consumer (prefetch {PREFETCH}, ack each), {PAYLOAD_BYTES}-byte persistent messages, {}s measured after {}s warm-up\n",
        options.shape.concurrency,
        options.shape.duration.as_secs(),
        options.shape.warmup.as_secs()
    );
    let base = reports
        .first()
        .map(|report| report.consumed_per_second)
        .unwrap_or(1.0);
    let _ = writeln!(
        out,
        "{:<26} {:>10} {:>9} {:>11} {:>11} {:>12} {:>12} {:>8}",
        "broker",
        "msgs/s",
        "vs 1st",
        "confirm p50",
        "confirm p99",
        "delivery p50",
        "delivery p99",
        "errors"
    );
    for report in &reports {
        let _ = writeln!(
            out,
            "{:<26} {:>10.0} {:>8.2}x {:>8} µs {:>8} µs {:>9} µs {:>9} µs {:>8}",
            report.name,
            report.consumed_per_second,
            report.consumed_per_second / base.max(f64::EPSILON),
            report.confirm_p50.as_micros(),
            report.confirm_p99.as_micros(),
            report.delivery_p50.as_micros(),
            report.delivery_p99.as_micros(),
            report.publish_errors,
        );
    }
    let _ = writeln!(
        out,
        "\nmsgs/s: messages published in the measured window and consumed (acked), per second of the window plus the consumer's drain time; {} messages published in all",
        reports.iter().map(|r| r.published).sum::<u64>()
    );
    Ok(out)
}

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_micros() as u64)
        .unwrap_or(0)
}

/// A 1 KiB JSON payload.
fn payload() -> Vec<u8> {
    let mut body = serde_json::to_vec(&serde_json::json!({
        "emailId": 123,
        "status": "sent",
        "padding": "",
    }))
    .unwrap_or_default();
    // Pad inside the last string so the payload stays JSON and is exactly PAYLOAD_BYTES long.
    let padding = PAYLOAD_BYTES.saturating_sub(body.len());
    let insert_at = body.len().saturating_sub(2);
    body.splice(insert_at..insert_at, std::iter::repeat_n(b'x', padding));
    body
}

async fn measure(
    name: &str,
    backend: Arc<dyn QueueBackend>,
    shape: LoadShape,
) -> anyhow::Result<QueueReport> {
    let spec = QueueSpec {
        name: format!("bench-{}", &causeway_queue::new_message_id()[..12]),
        policy: QueuePolicy {
            max_payload_bytes: 64 * 1024,
            ..QueuePolicy::default()
        },
    };
    backend.declare(&spec).await?;

    // The consumer: records each delivery's arrival and its publish-to-delivery latency.
    let stop = Arc::new(AtomicBool::new(false));
    let mut subscription = backend.subscribe(&spec, PREFETCH).await?;
    let consumer_stop = stop.clone();
    let consumer = tokio::spawn(async move {
        let mut arrivals: Vec<(Instant, u64, u32)> = Vec::with_capacity(1 << 16);
        while !consumer_stop.load(Ordering::Relaxed) {
            let next = tokio::time::timeout(Duration::from_millis(200), subscription.next()).await;
            let delivery = match next {
                Ok(Ok(delivery)) => delivery,
                Ok(Err(err)) => {
                    tracing::warn!(error = %err, "bench consumer stopped");
                    break;
                }
                Err(_) => continue,
            };
            let sent = delivery
                .header(SENT_US)
                .and_then(|value| value.parse::<u64>().ok())
                .unwrap_or(0);
            let latency = now_micros().saturating_sub(sent);
            arrivals.push((
                Instant::now(),
                sent,
                u32::try_from(latency).unwrap_or(u32::MAX),
            ));
            if delivery.ack().await.is_err() {
                break;
            }
        }
        arrivals
    });

    let body = bytes::Bytes::from(payload());
    let publish_backend = backend.clone();
    let publish_spec = spec.clone();
    let window_start_us = now_micros() + shape.warmup.as_micros() as u64;
    let unknown = || None;
    let cpu = loadgen::CpuMeters {
        server: &unknown,
        client: &unknown,
    };
    let report = loadgen::run(name, shape, cpu, move || {
        let backend = publish_backend.clone();
        let spec = publish_spec.clone();
        let body = body.clone();
        async move {
            let message = OutgoingMessage::new(body).with_header(SENT_US, now_micros().to_string());
            backend.publish(&spec, message).await.map(|_| ())
        }
    })
    .await;
    let window_end_us = now_micros();
    let published_in_window = report.requests;

    // Let the consumer drain what was published in the window (bounded).
    let drain_deadline = Instant::now() + Duration::from_secs(30);
    let drain_started = Instant::now();
    while Instant::now() < drain_deadline {
        if consumer.is_finished() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        // Stop once the broker reports the backlog gone (or, where it cannot count, after 3 s).
        let listed = backend.list(std::slice::from_ref(&spec)).await.ok();
        let backlog = listed
            .and_then(|queues| queues.into_iter().find(|q| q.name == spec.name))
            .and_then(|queue| Some(queue.ready? + queue.unacked.unwrap_or(0)));
        if backlog == Some(0)
            || backlog.is_none() && drain_started.elapsed() > Duration::from_secs(3)
        {
            break;
        }
    }
    stop.store(true, Ordering::Relaxed);
    let arrivals = consumer.await.unwrap_or_default();
    let in_window: Vec<&(Instant, u64, u32)> = arrivals
        .iter()
        .filter(|(_, sent, _)| *sent >= window_start_us && *sent <= window_end_us)
        .collect();
    let mut latencies: Vec<u32> = in_window.iter().map(|(_, _, latency)| *latency).collect();
    latencies.sort_unstable();
    let window = Duration::from_micros(window_end_us.saturating_sub(window_start_us));
    let last_arrival = in_window.iter().map(|(at, _, _)| *at).max();
    let first_arrival = in_window.iter().map(|(at, _, _)| *at).min();
    let consuming_time = match (first_arrival, last_arrival) {
        (Some(first), Some(last)) => (last - first).max(window),
        _ => window,
    };
    let consumed_per_second = in_window.len() as f64 / consuming_time.as_secs_f64().max(1e-9);
    if (in_window.len() as u64) < published_in_window {
        tracing::warn!(
            broker = name,
            published = published_in_window,
            consumed = in_window.len(),
            "not every message published in the window was consumed before the drain deadline"
        );
    }
    let _ = backend.delete(&spec).await;
    Ok(QueueReport {
        name: name.to_string(),
        consumed_per_second,
        published: published_in_window,
        publish_errors: report.errors,
        confirm_p50: report.p50,
        confirm_p99: report.p99,
        delivery_p50: loadgen::percentile(&latencies, 50.0),
        delivery_p99: loadgen::percentile(&latencies, 99.0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_is_one_kib_of_json() {
        let body = payload();
        assert_eq!(body.len(), PAYLOAD_BYTES);
        let parsed: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
        assert_eq!(parsed["emailId"], 123);
    }
}
