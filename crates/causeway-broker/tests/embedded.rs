//! The embedded broker served in-process over TLS, driven through `causeway_queue`'s
//! `EmbeddedBackend` exactly as services use it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use causeway_broker::testing::{LocalBroker, start_local};
use causeway_queue::embedded::EmbeddedBackend;
use causeway_queue::{
    ConnectOptions, Delivery, OutgoingMessage, QueueBackend, QueueError, QueuePolicy, QueueSpec,
    SettleOutcome, Subscription, headers,
};

async fn connect(broker: &LocalBroker) -> EmbeddedBackend {
    let options = broker.connect_options(ConnectOptions::new("broker-test"));
    EmbeddedBackend::connect(&broker.target(), &options)
        .await
        .expect("connect over TLS")
}

fn spec(name: &str) -> QueueSpec {
    QueueSpec::new(
        name,
        QueuePolicy {
            max_attempts: 3,
            initial_backoff_ms: 100,
            max_backoff_ms: 1000,
            max_payload_bytes: 1024,
        },
    )
}

fn message(n: u64) -> OutgoingMessage {
    OutgoingMessage::json(&serde_json::json!({ "n": n })).unwrap()
}

async fn next(subscription: &mut Subscription) -> Delivery {
    tokio::time::timeout(Duration::from_secs(10), subscription.next())
        .await
        .expect("a delivery within 10 s")
        .expect("the subscription is alive")
}

fn n(delivery: &Delivery) -> u64 {
    delivery.json::<serde_json::Value>().unwrap()["n"]
        .as_u64()
        .unwrap()
}

#[tokio::test]
async fn publish_consume_ack_retry_dead_letter_and_redrive_over_tls() {
    let broker = LocalBroker::start().await.unwrap();
    let backend = connect(&broker).await;
    let spec = spec("emails");
    backend.declare(&spec).await.unwrap();
    backend.declare(&spec).await.expect("declare is idempotent");

    // Many publishes in flight on the one publish stream; every one is confirmed.
    let backend = Arc::new(backend);
    let publishes = (0..50).map(|i| {
        let backend = backend.clone();
        let spec = spec.clone();
        tokio::spawn(async move { backend.publish(&spec, message(i)).await })
    });
    let mut sequences = Vec::new();
    for publish in publishes {
        let confirmation = publish.await.unwrap().expect("confirmed");
        sequences.push(confirmation.sequence.expect("the broker's sequence"));
    }
    sequences.sort();
    sequences.dedup();
    assert_eq!(sequences.len(), 50);

    let mut subscription = backend.subscribe(&spec, 10).await.unwrap();
    let mut seen = Vec::new();
    for _ in 0..50 {
        let delivery = next(&mut subscription).await;
        assert_eq!((delivery.attempt, delivery.redelivered), (1, false));
        seen.push(n(&delivery));
        delivery.ack().await.expect("ack recorded");
    }
    seen.sort();
    assert_eq!(seen, (0..50).collect::<Vec<_>>());

    // Retry: redelivered after the backoff as attempt 2, then dead-lettered at the last attempt.
    backend.publish(&spec, message(100)).await.unwrap();
    let first = next(&mut subscription).await;
    let failed_at = Instant::now();
    assert_eq!(
        first.retry("smtp down").await.unwrap(),
        SettleOutcome::RetryScheduled {
            after: Duration::from_millis(100),
            next_attempt: 2
        }
    );
    let second = next(&mut subscription).await;
    assert!(failed_at.elapsed() >= Duration::from_millis(90));
    assert_eq!(
        (n(&second), second.attempt, second.redelivered),
        (100, 2, true)
    );
    second.retry("smtp down").await.unwrap();
    let third = next(&mut subscription).await;
    assert_eq!(third.attempt, 3);
    assert!(matches!(
        third.retry("smtp down").await.unwrap(),
        SettleOutcome::DeadLettered { .. }
    ));

    let dead = backend.peek(&spec.dead_letter_queue(), 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].deliveries, Some(3));
    assert!(dead[0].headers[headers::DEAD_LETTER_REASON].contains("smtp down"));
    assert_eq!(dead[0].headers[headers::ORIGINAL_QUEUE], "emails");
    let listed = backend.list(&[]).await.unwrap();
    let dlq = listed
        .iter()
        .find(|queue| queue.name == "emails.dlq")
        .unwrap();
    assert_eq!(dlq.ready, Some(1));
    let emails = listed.iter().find(|queue| queue.name == "emails").unwrap();
    assert_eq!(emails.consumers, Some(1));

    assert_eq!(backend.redrive(&spec, None).await.unwrap(), 1);
    let back = next(&mut subscription).await;
    assert_eq!((n(&back), back.attempt, back.redelivered), (100, 1, false));
    back.reject("malformed").await.unwrap();
    let dead = backend.peek(&spec.dead_letter_queue(), 10).await.unwrap();
    assert_eq!(dead[0].headers[headers::DEAD_LETTER_REASON], "malformed");

    drop(subscription);
    backend.delete(&spec).await.unwrap();
    assert!(matches!(
        backend.peek("emails", 1).await,
        Err(QueueError::NoSuchQueue(_))
    ));
    broker.stop().await.unwrap();
}

#[tokio::test]
async fn bad_requests_are_refused_with_clear_errors() {
    let broker = LocalBroker::start().await.unwrap();
    let backend = connect(&broker).await;
    let spec = spec("strict");
    // Publishing to a queue nobody declared.
    let err = backend.publish(&spec, message(1)).await.unwrap_err();
    assert!(matches!(err, QueueError::NoSuchQueue(_)), "{err}");
    backend.declare(&spec).await.unwrap();
    // Over the queue's limit, skipping the client-side check: the broker refuses it.
    let big = OutgoingMessage::new(format!("\"{}\"", "x".repeat(2000)));
    let err = backend.publish_validated(&spec, big).await.unwrap_err();
    assert!(
        matches!(&err, QueueError::PublishRefused { message, .. } if message.contains("exceeds")),
        "{err}"
    );
    // The stream survives a refused message.
    backend.publish(&spec, message(2)).await.unwrap();
    let missing = self::spec("missing");
    let err = backend
        .subscribe(&missing, 1)
        .await
        .err()
        .expect("no such queue");
    assert!(matches!(err, QueueError::NoSuchQueue(_)), "{err}");
    broker.stop().await.unwrap();
}

#[tokio::test]
async fn dropping_a_subscription_returns_unsettled_deliveries() {
    let broker = LocalBroker::start().await.unwrap();
    let backend = connect(&broker).await;
    let spec = spec("handover");
    backend.declare(&spec).await.unwrap();
    for i in 0..3 {
        backend.publish(&spec, message(i)).await.unwrap();
    }
    let mut doomed = backend.subscribe(&spec, 2).await.unwrap();
    let held = next(&mut doomed).await;
    assert_eq!(n(&held), 0);
    drop(doomed);
    drop(held);
    let mut survivor = backend.subscribe(&spec, 1).await.unwrap();
    let again = next(&mut survivor).await;
    assert_eq!((n(&again), again.attempt, again.redelivered), (0, 2, true));
    again.ack().await.unwrap();
    assert_eq!(n(&next(&mut survivor).await), 1);
    broker.stop().await.unwrap();
}

#[tokio::test]
async fn confirmed_messages_survive_a_restart() {
    let dir = std::env::temp_dir().join(format!("causeway-broker-restart-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let spec = spec("durable");
    {
        let broker = start_local(&dir).await.unwrap();
        let backend = connect(&broker).await;
        backend.declare(&spec).await.unwrap();
        for i in 0..5 {
            backend.publish(&spec, message(i)).await.unwrap();
        }
        let mut subscription = backend.subscribe(&spec, 1).await.unwrap();
        next(&mut subscription).await.ack().await.unwrap();
        // Acks are not awaited (as AMQP's basic.ack): wait until the broker has recorded it.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let queues = backend.list(std::slice::from_ref(&spec)).await.unwrap();
            let queue = queues.iter().find(|q| q.name == spec.name).unwrap();
            // Four left: ready, or the next one already delivered to this prefetch-1 consumer.
            if queue.ready.unwrap_or(0) + queue.unacked.unwrap_or(0) == 4 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the ack was not recorded: {queue:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        drop(subscription);
        drop(backend);
        broker.stop().await.unwrap();
    }
    let broker = start_local(&dir).await.unwrap();
    let backend = connect(&broker).await;
    let peeked = backend.peek("durable", 10).await.unwrap();
    let payloads: Vec<&str> = peeked.iter().map(|m| m.payload.as_str()).collect();
    assert_eq!(
        payloads,
        [r#"{"n":1}"#, r#"{"n":2}"#, r#"{"n":3}"#, r#"{"n":4}"#]
    );
    let mut subscription = backend.subscribe(&spec, 1).await.unwrap();
    assert_eq!(n(&next(&mut subscription).await), 1);
    drop(subscription);
    drop(backend);
    broker.stop().await.unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn a_publish_to_a_stopped_broker_fails_instead_of_hanging() {
    let broker = LocalBroker::start().await.unwrap();
    let backend = connect(&broker).await;
    let spec = spec("gone");
    backend.declare(&spec).await.unwrap();
    backend.publish(&spec, message(1)).await.unwrap();
    broker.stop().await.unwrap();
    let started = Instant::now();
    let err = backend.publish(&spec, message(2)).await.unwrap_err();
    assert!(
        matches!(
            err,
            QueueError::Disconnected { .. } | QueueError::ConfirmTimeout { .. }
        ),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(6));
}

/// A request message over the broker's limit is RESOURCE_EXHAUSTED, as gRPC specifies (tonic
/// alone says OUT_OF_RANGE), and the broker keeps serving.
#[tokio::test]
async fn an_oversized_message_is_resource_exhausted() {
    use causeway_proto::broker::v1::broker_client::BrokerClient;
    use causeway_proto::broker::v1::{DeclareRequest, ListQueuesRequest};
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

    let broker = LocalBroker::start().await.unwrap();
    let pem = std::fs::read(&broker.ca_cert).unwrap();
    let channel = Endpoint::from_shared(format!("https://{}", broker.addr))
        .unwrap()
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(pem))
                .domain_name(broker.server_name.clone()),
        )
        .unwrap()
        .connect()
        .await
        .expect("connect over TLS");
    let mut client = BrokerClient::new(channel);
    let huge = DeclareRequest {
        queue: "q".repeat(causeway_broker::MAX_MESSAGE_BYTES),
        policy: None,
    };
    let status = client.declare(huge).await.expect_err("over the limit");
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("larger than max"), "{status:?}");
    client
        .list_queues(ListQueuesRequest {})
        .await
        .expect("still serving");
}
