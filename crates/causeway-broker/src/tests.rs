use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use causeway_core::queue_policy::QueuePolicy;
use causeway_core::topology::BrokerConfig;

use crate::{Broker, BrokerError, Consumer, ConsumerEvent, Delivered, SettleAction, headers};

/// A fresh directory per test, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "causeway-broker-{name}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn open(dir: &TempDir, max_batch: usize) -> Broker {
    let config = BrokerConfig {
        max_batch,
        ..BrokerConfig::default()
    };
    open_with(dir, &config).await
}

/// Opens the broker in `dir` and declares `orders`.
async fn open_with(dir: &TempDir, config: &BrokerConfig) -> Broker {
    let broker = Broker::open(&dir.0, config).unwrap();
    broker
        .declare("orders", QueuePolicy::default())
        .await
        .unwrap();
    broker
}

async fn publish(broker: &Broker, id: &str) -> u64 {
    let payload = format!(r#"{{"id":"{id}"}}"#);
    broker
        .publish("orders", id, HashMap::new(), payload)
        .await
        .unwrap()
}

async fn next(consumer: &mut Consumer) -> Delivered {
    match tokio::time::timeout(Duration::from_secs(5), consumer.next()).await {
        Ok(ConsumerEvent::Delivery(delivered)) => delivered,
        Ok(ConsumerEvent::Closed(err)) => panic!("subscription closed: {err}"),
        Err(_) => panic!("no delivery within 5 s"),
    }
}

async fn nothing_within(consumer: &mut Consumer, wait: Duration) {
    if let Ok(event) = tokio::time::timeout(wait, consumer.next()).await {
        panic!("unexpected event {event:?}");
    }
}

async fn settle(consumer: &Consumer, delivered: &Delivered, action: SettleAction) {
    consumer
        .settle(delivered.tag, action)
        .unwrap()
        .wait()
        .await
        .unwrap();
}

#[tokio::test]
async fn reopening_keeps_ready_and_unacked_messages_with_their_attempts() {
    let dir = TempDir::new("reopen");
    let broker = open(&dir, 64).await;
    for id in ["a", "b", "c"] {
        publish(&broker, id).await;
    }
    let mut consumer = broker.subscribe("orders", 1).unwrap();
    let first = next(&mut consumer).await;
    assert_eq!(
        (first.message.message_id.as_str(), first.message.deliveries),
        ("a", 1)
    );
    // Closing with `a` unacked: the store must still hold it, with its delivery counted.
    broker.close().await;
    drop(consumer);
    drop(broker);

    let broker = Broker::open(&dir.0, &BrokerConfig::default()).unwrap();
    let stats = broker.list();
    let orders = stats.iter().find(|queue| queue.name == "orders").unwrap();
    assert_eq!((orders.ready, orders.unacked), (3, 0));
    assert!(stats.iter().any(|queue| queue.name == "orders.dlq"));
    let mut consumer = broker.subscribe("orders", 10).unwrap();
    let again = next(&mut consumer).await;
    assert_eq!(again.message.message_id, "a");
    assert_eq!(
        again.message.deliveries, 2,
        "the first delivery was persisted"
    );
    assert!(again.redelivered);
    assert_eq!(next(&mut consumer).await.message.message_id, "b");
    assert_eq!(next(&mut consumer).await.message.message_id, "c");
    // New sequences continue after the old ones.
    let sequence = publish(&broker, "d").await;
    assert!(sequence > again.message.sequence);
}

#[tokio::test]
async fn concurrent_operations_share_commits() {
    let dir = TempDir::new("group");
    let broker = open(&dir, 1024).await;
    let before = broker.commits();
    let pending: Vec<_> = (0..200)
        .map(|n| {
            broker
                .begin_publish("orders", format!("m{n}"), HashMap::new(), "{}".into())
                .unwrap()
        })
        .collect();
    let mut sequences = Vec::new();
    for publish in pending {
        sequences.push(publish.wait().await.unwrap());
    }
    let grouped = broker.commits() - before;
    assert!(grouped < 50, "200 publishes took {grouped} commits");
    assert!(sequences.windows(2).all(|pair| pair[0] < pair[1]));
    drop(broker);

    // With batches of one, every publish pays its own commit.
    let dir = TempDir::new("single");
    let broker = open(&dir, 1).await;
    let before = broker.commits();
    let pending: Vec<_> = (0..50)
        .map(|n| {
            broker
                .begin_publish("orders", format!("m{n}"), HashMap::new(), "{}".into())
                .unwrap()
        })
        .collect();
    for publish in pending {
        publish.wait().await.unwrap();
    }
    assert!(broker.commits() - before >= 50);
}

#[tokio::test]
async fn a_consumer_that_goes_away_returns_its_deliveries_in_order() {
    let dir = TempDir::new("disconnect");
    let broker = open(&dir, 64).await;
    for id in ["a", "b", "c"] {
        publish(&broker, id).await;
    }
    let mut first = broker.subscribe("orders", 2).unwrap();
    let a = next(&mut first).await;
    let b = next(&mut first).await;
    assert!(!a.redelivered && !b.redelivered);
    nothing_within(&mut first, Duration::from_millis(100)).await;
    drop(first);

    let mut second = broker.subscribe("orders", 5).unwrap();
    let ids: Vec<(String, u32, bool)> = [
        next(&mut second).await,
        next(&mut second).await,
        next(&mut second).await,
    ]
    .into_iter()
    .map(|d| (d.message.message_id, d.message.deliveries, d.redelivered))
    .collect();
    assert_eq!(
        ids,
        [
            ("a".to_string(), 2, true),
            ("b".to_string(), 2, true),
            ("c".to_string(), 1, false)
        ]
    );
}

#[tokio::test]
async fn delayed_retries_come_back_in_due_order_after_their_delay() {
    let dir = TempDir::new("delay");
    let broker = open(&dir, 64).await;
    publish(&broker, "a").await;
    publish(&broker, "b").await;
    let mut consumer = broker.subscribe("orders", 10).unwrap();
    let a = next(&mut consumer).await;
    let b = next(&mut consumer).await;
    let started = Instant::now();
    let retry = |millis| SettleAction::Redeliver {
        delay: Duration::from_millis(millis),
        next_attempt: 2,
    };
    settle(&consumer, &a, retry(400)).await;
    settle(&consumer, &b, retry(150)).await;
    let delayed = broker.list();
    assert_eq!(
        delayed.iter().find(|q| q.name == "orders").unwrap().delayed,
        2
    );

    let first = next(&mut consumer).await;
    let first_after = started.elapsed();
    let second = next(&mut consumer).await;
    let second_after = started.elapsed();
    assert_eq!(first.message.message_id, "b");
    assert_eq!(second.message.message_id, "a");
    assert!(first_after >= Duration::from_millis(140), "{first_after:?}");
    assert!(
        second_after >= Duration::from_millis(390),
        "{second_after:?}"
    );
    assert_eq!((first.message.deliveries, first.redelivered), (2, true));
    settle(&consumer, &first, SettleAction::Ack).await;
    settle(&consumer, &second, SettleAction::Ack).await;
    assert!(broker.peek("orders", 10).unwrap().is_empty());
}

#[tokio::test]
async fn dead_letters_carry_why_and_redrive_brings_them_back_fresh() {
    let dir = TempDir::new("dlq");
    let broker = open(&dir, 64).await;
    publish(&broker, "poison").await;
    publish(&broker, "fine").await;
    let mut consumer = broker.subscribe("orders", 1).unwrap();
    let poison = next(&mut consumer).await;
    settle(
        &consumer,
        &poison,
        SettleAction::DeadLetter {
            reason: "cannot parse".into(),
            attempts: 1,
        },
    )
    .await;
    let fine = next(&mut consumer).await;
    assert_eq!(fine.message.message_id, "fine");
    settle(&consumer, &fine, SettleAction::Ack).await;

    let dead = broker.peek("orders.dlq", 10).unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].message_id, "poison");
    assert_eq!(dead[0].deliveries, 1);
    assert_eq!(dead[0].headers[headers::DEAD_LETTER_REASON], "cannot parse");
    assert_eq!(dead[0].headers[headers::ORIGINAL_QUEUE], "orders");
    assert_eq!(dead[0].headers[headers::ATTEMPT], "1");

    assert_eq!(broker.redrive("orders", None).await.unwrap(), 1);
    assert!(broker.peek("orders.dlq", 10).unwrap().is_empty());
    let back = next(&mut consumer).await;
    assert_eq!(back.message.message_id, "poison");
    assert_eq!((back.message.deliveries, back.redelivered), (1, false));
    assert!(
        !back
            .message
            .headers
            .contains_key(headers::DEAD_LETTER_REASON)
    );
    assert_eq!(broker.redrive("orders", None).await.unwrap(), 0);
}

#[tokio::test]
async fn dispatch_is_fair_and_respects_prefetch() {
    let dir = TempDir::new("fair");
    let broker = open(&dir, 64).await;
    let mut one = broker.subscribe("orders", 1).unwrap();
    let mut two = broker.subscribe("orders", 1).unwrap();
    for id in ["a", "b", "c", "d"] {
        publish(&broker, id).await;
    }
    let a = next(&mut one).await;
    let b = next(&mut two).await;
    assert_eq!(
        (a.message.message_id.as_str(), b.message.message_id.as_str()),
        ("a", "b")
    );
    nothing_within(&mut one, Duration::from_millis(100)).await;
    settle(&one, &a, SettleAction::Ack).await;
    assert_eq!(next(&mut one).await.message.message_id, "c");
    // A tag belongs to the consumer it was delivered to.
    assert!(matches!(
        one.settle(b.tag, SettleAction::Ack),
        Err(BrokerError::UnknownDelivery(_))
    ));
}

#[tokio::test]
async fn bad_input_is_refused_with_the_reason() {
    let dir = TempDir::new("refuse");
    let broker = open(&dir, 64).await;
    let small = QueuePolicy {
        max_payload_bytes: 8,
        ..QueuePolicy::default()
    };
    broker.declare("tiny", small).await.unwrap();
    let err = broker
        .publish("tiny", "m", HashMap::new(), "[1,2,3,4,5]")
        .await
        .unwrap_err();
    assert!(matches!(err, BrokerError::Payload(_)), "{err}");
    assert_eq!(err.to_status().code(), tonic::Code::InvalidArgument);
    let err = broker
        .publish("no/such", "m", HashMap::new(), "{}")
        .await
        .unwrap_err();
    assert_eq!(err.to_status().code(), tonic::Code::InvalidArgument);
    let err = broker
        .publish("missing", "m", HashMap::new(), "{}")
        .await
        .unwrap_err();
    assert_eq!(err.to_status().code(), tonic::Code::NotFound);
    let bad_policy = QueuePolicy {
        max_attempts: 0,
        ..QueuePolicy::default()
    };
    assert!(matches!(
        broker.declare("x", bad_policy).await,
        Err(BrokerError::InvalidPolicy(_))
    ));
    broker.delete("tiny").await.unwrap();
    broker.delete("tiny").await.unwrap();
    assert!(
        !broker
            .list()
            .iter()
            .any(|queue| queue.name.starts_with("tiny"))
    );
}

#[tokio::test]
async fn without_fsync_confirmed_messages_are_flushed_by_close() {
    let dir = TempDir::new("nofsync");
    let config = BrokerConfig {
        fsync: false,
        ..BrokerConfig::default()
    };
    let broker = open_with(&dir, &config).await;
    publish(&broker, "a").await;
    drop(broker);
    let broker = Broker::open(&dir.0, &config).unwrap();
    let kept = broker.peek("orders", 10).unwrap();
    assert_eq!(kept.len(), 1);
    assert_eq!(kept[0].message_id, "a");
}

#[tokio::test]
async fn metrics_count_per_queue_and_commits() {
    let dir = TempDir::new("metrics");
    let broker = open(&dir, 64).await;
    let mut registry = prometheus_client::registry::Registry::default();
    broker.register_metrics(&mut registry);
    publish(&broker, "a").await;
    let mut consumer = broker.subscribe("orders", 1).unwrap();
    let delivered = next(&mut consumer).await;
    settle(&consumer, &delivered, SettleAction::Ack).await;
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    for line in [
        r#"broker_published_total{queue="orders"} 1"#,
        r#"broker_delivered_total{queue="orders"} 1"#,
        r#"broker_acked_total{queue="orders"} 1"#,
        r#"broker_ready{queue="orders"} 0"#,
        "broker_commit_batch_operations_count",
        "broker_commit_seconds_bucket",
    ] {
        assert!(text.contains(line), "{line} missing from\n{text}");
    }
}

#[tokio::test]
async fn a_message_without_an_id_is_stored_under_its_content_id() {
    let dir = TempDir::new("content-id");
    let broker = open(&dir, 64).await;
    let mut registry = prometheus_client::registry::Registry::default();
    broker.register_metrics(&mut registry);
    for payload in [r#"{"n":1}"#, r#"{"n":2}"#, r#"{"n":1}"#] {
        broker
            .publish("orders", "", HashMap::new(), payload)
            .await
            .unwrap();
    }
    let ids: Vec<String> = broker
        .peek("orders", 10)
        .unwrap()
        .into_iter()
        .map(|message| message.message_id)
        .collect();
    let first = causeway_queue::content_message_id(br#"{"n":1}"#);
    let second = causeway_queue::content_message_id(br#"{"n":2}"#);
    assert_eq!(ids, [first.clone(), second, first.clone()]);
    // Retried, the message keeps the id.
    let mut consumer = broker.subscribe("orders", 1).unwrap();
    let delivered = next(&mut consumer).await;
    let retry = SettleAction::Redeliver {
        delay: Duration::ZERO,
        next_attempt: 2,
    };
    settle(&consumer, &delivered, retry).await;
    let kept = broker.peek("orders", 10).unwrap();
    assert_eq!(
        kept.last().map(|m| m.message_id.as_str()),
        Some(first.as_str())
    );
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    let line = r#"broker_derived_message_ids_total{queue="orders"} 3"#;
    assert!(text.contains(line), "{line} missing from\n{text}");
}
