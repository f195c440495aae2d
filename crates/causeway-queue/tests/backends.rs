//! The RabbitMQ and MQTT backends against live brokers. Each scenario runs for a backend when its
//! URL is set (`CAUSEWAY_TEST_AMQP_URL`, `CAUSEWAY_TEST_MQTT_URL`) and is skipped with a note
//! otherwise, unless `CAUSEWAY_REQUIRE_BROKERS=1` makes a missing URL a failure.

use std::sync::Arc;
use std::time::{Duration, Instant};

use causeway_queue::{
    BrokerTarget, ConnectOptions, Delivery, OutgoingMessage, QueueBackend, QueueError, QueuePolicy,
    QueueSpec, SettleOutcome, Subscription, headers,
};

const AMQP: &str = "CAUSEWAY_TEST_AMQP_URL";
const MQTT: &str = "CAUSEWAY_TEST_MQTT_URL";
const WAIT: Duration = Duration::from_secs(10);

/// A backend for the broker `var` names, or `None` (after a note) when the variable is unset.
async fn backend(var: &str, test: &str) -> Option<Arc<dyn QueueBackend>> {
    let Ok(url) = std::env::var(var) else {
        assert!(
            std::env::var("CAUSEWAY_REQUIRE_BROKERS").as_deref() != Ok("1"),
            "CAUSEWAY_REQUIRE_BROKERS=1 but {var} is not set"
        );
        eprintln!("skipping {test}: set {var} to run it against a live broker");
        return None;
    };
    let target = BrokerTarget::parse(&url).expect("broker URL");
    let options = ConnectOptions::new(format!("test-{test}-{:08x}", rand::random::<u32>()));
    Some(
        causeway_queue::connect(&target, &options)
            .await
            .expect("connect"),
    )
}

fn unique_spec(test: &str, policy: QueuePolicy) -> QueueSpec {
    QueueSpec::new(format!("test-{test}-{:08x}", rand::random::<u32>()), policy)
}

fn fast_policy(max_attempts: u32, backoff_ms: u64) -> QueuePolicy {
    QueuePolicy {
        max_attempts,
        initial_backoff_ms: backoff_ms,
        max_backoff_ms: backoff_ms * 4,
        ..QueuePolicy::default()
    }
}

async fn publish(backend: &dyn QueueBackend, spec: &QueueSpec, n: u32) -> String {
    let message = OutgoingMessage::json(&serde_json::json!({ "n": n }))
        .expect("json")
        .with_header(headers::REQUEST_ID, format!("req-{n}"));
    backend
        .publish(spec, message)
        .await
        .expect("publish")
        .message_id
}

async fn next(subscription: &mut Subscription) -> Delivery {
    tokio::time::timeout(WAIT, subscription.next())
        .await
        .expect("a delivery within the wait")
        .expect("delivery")
}

fn number(delivery: &Delivery) -> u64 {
    delivery.json::<serde_json::Value>().expect("json")["n"]
        .as_u64()
        .expect("n")
}

/// Nothing more arrives within a short wait.
async fn assert_empty(subscription: &mut Subscription) {
    if let Ok(delivery) =
        tokio::time::timeout(Duration::from_millis(700), subscription.next()).await
    {
        panic!("unexpected delivery {delivery:?}");
    }
}

async fn publish_confirm_then_consume_and_ack(backend: Arc<dyn QueueBackend>) {
    let spec = unique_spec("ack", QueuePolicy::default());
    backend.declare(&spec).await.expect("declare");
    backend.declare(&spec).await.expect("declare is idempotent");
    let id = publish(&*backend, &spec, 7).await;
    let mut subscription = backend.subscribe(&spec, 4).await.expect("subscribe");
    let delivery = next(&mut subscription).await;
    assert_eq!(delivery.message_id, id);
    assert_eq!(number(&delivery), 7);
    assert_eq!(delivery.attempt, 1);
    assert!(!delivery.redelivered);
    assert_eq!(delivery.header(headers::REQUEST_ID), Some("req-7"));
    assert_eq!(delivery.header(headers::MESSAGE_ID), Some(id.as_str()));
    delivery.ack().await.expect("ack");
    assert_empty(&mut subscription).await;
    drop(subscription);
    // Acked means gone: a new subscription sees nothing.
    let mut again = backend.subscribe(&spec, 4).await.expect("subscribe");
    assert_empty(&mut again).await;
    drop(again);
    backend.delete(&spec).await.expect("delete");
}

async fn retry_backs_off_then_succeeds(backend: Arc<dyn QueueBackend>) {
    let spec = unique_spec("retry", fast_policy(3, 400));
    backend.declare(&spec).await.expect("declare");
    let id = publish(&*backend, &spec, 1).await;
    let mut subscription = backend.subscribe(&spec, 1).await.expect("subscribe");
    let first = next(&mut subscription).await;
    assert_eq!(first.attempt, 1);
    let failed_at = Instant::now();
    let outcome = first.retry("smtp down").await.expect("retry");
    assert_eq!(
        outcome,
        SettleOutcome::RetryScheduled {
            after: Duration::from_millis(400),
            next_attempt: 2
        }
    );
    let second = next(&mut subscription).await;
    let waited = failed_at.elapsed();
    assert!(
        waited >= Duration::from_millis(400),
        "redelivered after {waited:?}"
    );
    assert_eq!(second.message_id, id);
    assert_eq!(second.attempt, 2);
    assert_eq!(number(&second), 1);
    assert_eq!(second.header(headers::REQUEST_ID), Some("req-1"));
    second.ack().await.expect("ack");
    assert_empty(&mut subscription).await;
    drop(subscription);
    backend.delete(&spec).await.expect("delete");
}

async fn dead_letters_after_max_attempts(backend: Arc<dyn QueueBackend>) {
    let spec = unique_spec("dlq", fast_policy(2, 100));
    backend.declare(&spec).await.expect("declare");
    let id = publish(&*backend, &spec, 3).await;
    let mut subscription = backend.subscribe(&spec, 1).await.expect("subscribe");
    let first = next(&mut subscription).await;
    assert!(matches!(
        first.retry("boom").await.expect("retry"),
        SettleOutcome::RetryScheduled { .. }
    ));
    let second = next(&mut subscription).await;
    assert_eq!(second.attempt, 2);
    let outcome = second.retry("boom again").await.expect("retry");
    assert!(
        matches!(&outcome, SettleOutcome::DeadLettered { reason } if reason.contains("boom again")),
        "{outcome:?}"
    );
    assert_empty(&mut subscription).await;
    drop(subscription);

    let dlq = QueueSpec::new(spec.dead_letter_queue(), QueuePolicy::default());
    let mut dead = backend.subscribe(&dlq, 1).await.expect("subscribe dlq");
    let letter = next(&mut dead).await;
    assert_eq!(letter.message_id, id);
    assert_eq!(number(&letter), 3);
    assert_eq!(
        letter.header(headers::ORIGINAL_QUEUE),
        Some(spec.name.as_str())
    );
    assert_eq!(letter.header(headers::ATTEMPT), Some("2"));
    let reason = letter
        .header(headers::DEAD_LETTER_REASON)
        .unwrap_or_default();
    assert!(reason.contains("failed 2 of 2 attempts"), "{reason}");
    assert!(reason.contains("boom again"), "{reason}");
    letter.ack().await.expect("ack");
    drop(dead);
    backend.delete(&spec).await.expect("delete");
}

async fn unsettled_deliveries_come_back(backend: Arc<dyn QueueBackend>) {
    let spec = unique_spec("crash", QueuePolicy::default());
    backend.declare(&spec).await.expect("declare");
    let id = publish(&*backend, &spec, 5).await;
    let mut subscription = backend.subscribe(&spec, 1).await.expect("subscribe");
    let delivery = next(&mut subscription).await;
    assert_eq!(delivery.attempt, 1);
    // The consumer "crashes": neither the delivery nor the subscription is settled.
    drop(delivery);
    drop(subscription);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut resumed = backend.subscribe(&spec, 1).await.expect("subscribe");
    let again = next(&mut resumed).await;
    assert_eq!(again.message_id, id);
    assert!(again.redelivered);
    assert_eq!(again.attempt, 2, "a crash counts as an attempt");
    again.ack().await.expect("ack");
    assert_empty(&mut resumed).await;
    drop(resumed);
    backend.delete(&spec).await.expect("delete");
}

async fn one_consumer_sees_publish_order(backend: Arc<dyn QueueBackend>) {
    let spec = unique_spec("fifo", QueuePolicy::default());
    backend.declare(&spec).await.expect("declare");
    for n in 0..20 {
        publish(&*backend, &spec, n).await;
    }
    let mut subscription = backend.subscribe(&spec, 5).await.expect("subscribe");
    let mut seen = Vec::new();
    for _ in 0..20 {
        let delivery = next(&mut subscription).await;
        seen.push(number(&delivery));
        delivery.ack().await.expect("ack");
    }
    assert_eq!(seen, (0..20).collect::<Vec<u64>>());
    drop(subscription);
    backend.delete(&spec).await.expect("delete");
}

async fn redrive_moves_dead_letters_back(backend: Arc<dyn QueueBackend>) {
    let spec = unique_spec("redrive", QueuePolicy::default());
    backend.declare(&spec).await.expect("declare");
    let first = publish(&*backend, &spec, 1).await;
    let second = publish(&*backend, &spec, 2).await;
    let mut subscription = backend.subscribe(&spec, 2).await.expect("subscribe");
    for _ in 0..2 {
        next(&mut subscription)
            .await
            .reject("malformed")
            .await
            .expect("reject");
    }
    assert_eq!(backend.redrive(&spec, Some(1)).await.expect("redrive"), 1);
    let back = next(&mut subscription).await;
    assert_eq!(back.message_id, first);
    assert_eq!(back.attempt, 1, "redriven messages start over");
    assert_eq!(back.header(headers::DEAD_LETTER_REASON), None);
    assert_eq!(back.header(headers::ORIGINAL_QUEUE), None);
    assert_eq!(back.header(headers::REQUEST_ID), Some("req-1"));
    back.ack().await.expect("ack");
    assert_eq!(backend.redrive(&spec, None).await.expect("redrive"), 1);
    let back = next(&mut subscription).await;
    assert_eq!(back.message_id, second);
    back.ack().await.expect("ack");
    assert_eq!(backend.redrive(&spec, None).await.expect("redrive"), 0);
    drop(subscription);
    backend.delete(&spec).await.expect("delete");
}

macro_rules! scenario {
    ($name:ident, $var:expr, $scenario:ident) => {
        #[tokio::test]
        async fn $name() {
            if let Some(backend) = backend($var, stringify!($name)).await {
                $scenario(backend).await;
            }
        }
    };
}

scenario!(
    amqp_publish_confirm_then_consume_and_ack,
    AMQP,
    publish_confirm_then_consume_and_ack
);
scenario!(
    amqp_retry_backs_off_then_succeeds,
    AMQP,
    retry_backs_off_then_succeeds
);
scenario!(
    amqp_dead_letters_after_max_attempts,
    AMQP,
    dead_letters_after_max_attempts
);
scenario!(
    amqp_unsettled_deliveries_come_back,
    AMQP,
    unsettled_deliveries_come_back
);
scenario!(
    amqp_one_consumer_sees_publish_order,
    AMQP,
    one_consumer_sees_publish_order
);
scenario!(
    amqp_redrive_moves_dead_letters_back,
    AMQP,
    redrive_moves_dead_letters_back
);
scenario!(
    mqtt_publish_confirm_then_consume_and_ack,
    MQTT,
    publish_confirm_then_consume_and_ack
);
scenario!(
    mqtt_retry_backs_off_then_succeeds,
    MQTT,
    retry_backs_off_then_succeeds
);
scenario!(
    mqtt_dead_letters_after_max_attempts,
    MQTT,
    dead_letters_after_max_attempts
);
scenario!(
    mqtt_unsettled_deliveries_come_back,
    MQTT,
    unsettled_deliveries_come_back
);
scenario!(
    mqtt_one_consumer_sees_publish_order,
    MQTT,
    one_consumer_sees_publish_order
);
scenario!(
    mqtt_redrive_moves_dead_letters_back,
    MQTT,
    redrive_moves_dead_letters_back
);

/// AMQP only: peek gives messages back, list counts them, publishing to a missing queue fails.
#[tokio::test]
async fn amqp_peek_list_and_missing_queues() {
    let Some(backend) = backend(AMQP, "amqp_peek_list").await else {
        return;
    };
    let spec = unique_spec("peek", fast_policy(3, 5_000));
    backend.declare(&spec).await.expect("declare");
    let first = publish(&*backend, &spec, 1).await;
    publish(&*backend, &spec, 2).await;
    let peeked = backend.peek(&spec.name, 10).await.expect("peek");
    assert_eq!(peeked.len(), 2);
    assert_eq!(peeked[0].message_id, first);
    assert_eq!(peeked[0].deliveries, Some(0));
    assert_eq!(peeked[0].payload, r#"{"n":1}"#);
    assert_eq!(peeked[0].headers[headers::REQUEST_ID], "req-1");

    // One message waits out a retry backoff, one is ready.
    let mut subscription = backend.subscribe(&spec, 1).await.expect("subscribe");
    let delivery = next(&mut subscription).await;
    assert_eq!(delivery.message_id, first);
    delivery.retry("later").await.expect("retry");
    drop(subscription);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let infos = backend
        .list(std::slice::from_ref(&spec))
        .await
        .expect("list");
    let queue = infos
        .iter()
        .find(|info| info.name == spec.name)
        .expect("queue");
    assert_eq!(
        (queue.ready, queue.delayed, queue.consumers, queue.unacked),
        (Some(1), Some(1), Some(0), None)
    );
    let dlq = infos
        .iter()
        .find(|info| info.name == spec.dead_letter_queue())
        .expect("dlq");
    assert_eq!(dlq.ready, Some(0));

    let missing = unique_spec("missing", QueuePolicy::default());
    let err = backend
        .publish(&missing, OutgoingMessage::new(&b"{}"[..]))
        .await
        .expect_err("no such queue");
    assert!(matches!(err, QueueError::NoSuchQueue(_)), "{err}");
    assert!(matches!(
        backend.peek(&missing.name, 1).await,
        Err(QueueError::NoSuchQueue(_))
    ));
    backend.delete(&spec).await.expect("delete");
    backend
        .delete(&missing)
        .await
        .expect("deleting a missing queue");
    assert!(backend.list(&[spec]).await.expect("list").is_empty());
}

/// MQTT only: no peek, no counts, and publishing to an undeclared queue reaches no session.
#[tokio::test]
async fn mqtt_peek_list_and_missing_queues() {
    let Some(backend) = backend(MQTT, "mqtt_peek_list").await else {
        return;
    };
    let spec = unique_spec("peek", QueuePolicy::default());
    backend.declare(&spec).await.expect("declare");
    assert!(matches!(
        backend.peek(&spec.name, 1).await,
        Err(QueueError::Unsupported { .. })
    ));
    let infos = backend
        .list(std::slice::from_ref(&spec))
        .await
        .expect("list");
    let names: Vec<&str> = infos.iter().map(|info| info.name.as_str()).collect();
    assert_eq!(names, [spec.name.clone(), spec.dead_letter_queue()]);
    assert!(
        infos
            .iter()
            .all(|info| info.ready.is_none() && info.consumers.is_none())
    );
    let missing = unique_spec("missing", QueuePolicy::default());
    let err = backend
        .publish(&missing, OutgoingMessage::new(&b"{}"[..]))
        .await
        .expect_err("no such queue");
    assert!(matches!(err, QueueError::NoSuchQueue(_)), "{err}");
    backend.delete(&spec).await.expect("delete");
    // The sessions are gone with the queue.
    let err = backend
        .publish(&spec, OutgoingMessage::new(&b"{}"[..]))
        .await
        .expect_err("deleted");
    assert!(matches!(err, QueueError::NoSuchQueue(_)), "{err}");
}

/// MQTT only: a second process declaring a queue that is being consumed leaves the consumer's
/// session alone (no takeover, no redelivery), and a deleted queue can be declared anew.
#[tokio::test]
async fn mqtt_declare_leaves_a_live_consumer_alone() {
    let Some(consumer) = backend(MQTT, "mqtt_declare_consumer").await else {
        return;
    };
    let Some(other) = backend(MQTT, "mqtt_declare_other").await else {
        return;
    };
    let spec = unique_spec("live", QueuePolicy::default());
    consumer.declare(&spec).await.expect("declare");
    let mut subscription = consumer.subscribe(&spec, 4).await.expect("subscribe");
    other
        .declare(&spec)
        .await
        .expect("declare from another process");
    for n in 1..=2 {
        let id = publish(&*other, &spec, n).await;
        let delivery = next(&mut subscription).await;
        assert_eq!(delivery.message_id, id);
        assert_eq!(number(&delivery), u64::from(n));
        assert_eq!(delivery.attempt, 1, "the consumer was not taken over");
        assert!(!delivery.redelivered);
        delivery.ack().await.expect("ack");
    }
    assert_empty(&mut subscription).await;
    drop(subscription);
    other.delete(&spec).await.expect("delete");
    let err = other
        .publish(&spec, OutgoingMessage::new(&b"{}"[..]))
        .await
        .expect_err("deleted");
    assert!(matches!(err, QueueError::NoSuchQueue(_)), "{err}");

    // The markers went with the queue: declaring again creates both sessions anew.
    other.declare(&spec).await.expect("declare after delete");
    let id = publish(&*other, &spec, 3).await;
    let dlq = QueueSpec::new(spec.dead_letter_queue(), QueuePolicy::default());
    publish(&*other, &dlq, 4).await;
    let mut again = consumer.subscribe(&spec, 4).await.expect("subscribe");
    let delivery = next(&mut again).await;
    assert_eq!(delivery.message_id, id);
    assert_eq!(delivery.attempt, 1);
    delivery.ack().await.expect("ack");
    drop(again);
    consumer.delete(&spec).await.expect("delete");
}
