//! One conformance suite, three backends: every test here runs against Causeway's embedded broker
//! (started in-process on 127.0.0.1 with a port chosen at run time), RabbitMQ
//! (`CAUSEWAY_TEST_AMQP_URL`) and an MQTT 5 broker (`CAUSEWAY_TEST_MQTT_URL`).
//!
//! Without those variables the RabbitMQ and MQTT runs print why they were skipped; with
//! `CAUSEWAY_REQUIRE_BROKERS=1` (as `.ci/run` sets) a missing variable fails the test instead, so
//! CI cannot skip them silently. Every test uses its own queue names and deletes its queues.

use std::sync::Arc;
use std::time::{Duration, Instant};

use causeway_queue::{
    BackendKind, BrokerTarget, ConnectOptions, Delivery, OutgoingMessage, PayloadError,
    QueueBackend, QueueError, QueuePolicy, QueueSpec, SettleOutcome, Subscription, headers,
};

/// How long any single expected delivery may take before the test fails.
const RECEIVE_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a test waits to be sure that nothing (more) arrives.
const QUIET_PERIOD: Duration = Duration::from_millis(700);

/// A connected backend plus whatever keeps it running (the in-process embedded broker).
///
/// `causeway_broker::testing::LocalBroker` is the embedded broker's test fixture:
/// `LocalBroker::start() -> Result<LocalBroker, _>` opens a broker on a fresh temporary directory
/// with certificates from a fresh local CA, serves it on 127.0.0.1:0, and stops it (removing the
/// directory) on drop; `target()` is its `BrokerTarget` and `connect_options(options)` adds the CA
/// certificate and server name a client needs.
struct Fixture {
    backend: Arc<dyn QueueBackend>,
    raw: RawPublisher,
    _broker: Option<causeway_broker::testing::LocalBroker>,
}

/// Publishes as a foreign client would (Python's pika or paho, or a gRPC client of the embedded
/// broker): straight onto the transport, with no message id and no headers, bypassing the
/// library's publish (which always sets an id).
#[derive(Clone)]
enum RawPublisher {
    /// The embedded broker's gRPC API.
    Embedded {
        addr: std::net::SocketAddr,
        ca_cert: std::path::PathBuf,
        server_name: String,
    },
    /// AMQP 0.9.1 through lapin, without the `message_id` property.
    Amqp { url: String },
    /// MQTT 5 through rumqttc, without user properties.
    Mqtt { host: String, port: u16 },
}

impl RawPublisher {
    async fn publish(&self, queue: &str, payload: &'static [u8]) {
        tokio::time::timeout(RECEIVE_TIMEOUT, self.publish_confirmed(queue, payload))
            .await
            .unwrap_or_else(|_| panic!("no confirm for a raw publish to {queue}"));
    }

    async fn publish_confirmed(&self, queue: &str, payload: &'static [u8]) {
        match self {
            RawPublisher::Embedded {
                addr,
                ca_cert,
                server_name,
            } => {
                use causeway_proto::broker::v1 as pb;
                use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
                let ca = std::fs::read(ca_cert).expect("read the test CA");
                let tls = ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(ca))
                    .domain_name(server_name.clone());
                let channel = Endpoint::from_shared(format!("https://{addr}"))
                    .expect("endpoint")
                    .tls_config(tls)
                    .expect("TLS config")
                    .connect()
                    .await
                    .expect("connect to the embedded broker");
                let mut client = pb::broker_client::BrokerClient::new(channel);
                let (requests, receiver) = tokio::sync::mpsc::unbounded_channel();
                requests
                    .send(pb::PublishRequest {
                        correlation: 1,
                        queue: queue.to_string(),
                        // proto3's default: what a client that sets no id sends.
                        message_id: String::new(),
                        headers: Default::default(),
                        payload: bytes::Bytes::from_static(payload),
                    })
                    .expect("queue the publish");
                let mut confirms = client
                    .publish(tokio_stream::wrappers::UnboundedReceiverStream::new(
                        receiver,
                    ))
                    .await
                    .expect("open a publish stream")
                    .into_inner();
                let confirm = confirms
                    .message()
                    .await
                    .expect("the publish stream")
                    .expect("a confirm");
                match confirm.result {
                    Some(pb::publish_confirm::Result::Sequence(_)) => {}
                    other => panic!("the broker refused an id-less message: {other:?}"),
                }
                drop(requests);
            }
            RawPublisher::Amqp { url } => {
                use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
                let connection =
                    lapin::Connection::connect(url, lapin::ConnectionProperties::default())
                        .await
                        .expect("connect to RabbitMQ");
                let channel = connection.create_channel().await.expect("a channel");
                channel
                    .confirm_select(ConfirmSelectOptions::default())
                    .await
                    .expect("confirm mode");
                let options = BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                };
                let confirmation = channel
                    .basic_publish(
                        "".into(),
                        queue.into(),
                        options,
                        payload,
                        lapin::BasicProperties::default().with_delivery_mode(2),
                    )
                    .await
                    .expect("publish")
                    .await
                    .expect("a publisher confirm");
                assert!(
                    matches!(confirmation, lapin::Confirmation::Ack(None)),
                    "{confirmation:?}"
                );
                let _ = connection.close(200, "OK".into()).await;
            }
            RawPublisher::Mqtt { host, port } => {
                use rumqttc::v5::mqttbytes::QoS;
                use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason};
                use rumqttc::v5::{AsyncClient, Event, MqttOptions};
                let client_id = format!(
                    "conformance-raw-{}",
                    &causeway_queue::new_message_id()[..12]
                );
                let (client, mut eventloop) =
                    AsyncClient::new(MqttOptions::new(client_id, host.clone(), *port), 16);
                client
                    .publish(
                        causeway_queue::mqtt::topic(queue),
                        QoS::AtLeastOnce,
                        false,
                        payload,
                    )
                    .await
                    .expect("queue the publish");
                loop {
                    match eventloop.poll().await.expect("the MQTT connection") {
                        Event::Incoming(Packet::PubAck(ack)) => {
                            assert_eq!(ack.reason, PubAckReason::Success, "{ack:?}");
                            break;
                        }
                        _ => continue,
                    }
                }
                let _ = client.disconnect().await;
                // Let the DISCONNECT go out.
                while let Ok(event) = eventloop.poll().await {
                    if matches!(event, Event::Outgoing(rumqttc::Outgoing::Disconnect)) {
                        break;
                    }
                }
            }
        }
    }
}

async fn fixture(kind: BackendKind) -> Option<Fixture> {
    let options = ConnectOptions::new(format!("conformance-{}", causeway_queue::new_message_id()));
    match kind {
        BackendKind::Embedded => {
            let broker = causeway_broker::testing::LocalBroker::start()
                .await
                .expect("start an in-process embedded broker");
            let backend =
                causeway_queue::connect(&broker.target(), &broker.connect_options(options))
                    .await
                    .expect("connect to the in-process embedded broker");
            let raw = RawPublisher::Embedded {
                addr: broker.addr,
                ca_cert: broker.ca_cert.clone(),
                server_name: broker.server_name.clone(),
            };
            Some(Fixture {
                backend,
                raw,
                _broker: Some(broker),
            })
        }
        BackendKind::Amqp | BackendKind::Mqtt => {
            let variable = match kind {
                BackendKind::Amqp => "CAUSEWAY_TEST_AMQP_URL",
                _ => "CAUSEWAY_TEST_MQTT_URL",
            };
            let Ok(url) = std::env::var(variable) else {
                if std::env::var("CAUSEWAY_REQUIRE_BROKERS").as_deref() == Ok("1") {
                    panic!("CAUSEWAY_REQUIRE_BROKERS=1 but {variable} is not set");
                }
                eprintln!("skipped: set {variable} to run the {kind} conformance tests");
                return None;
            };
            let target = BrokerTarget::parse(&url).expect("a valid broker URL");
            let backend = causeway_queue::connect(&target, &options)
                .await
                .unwrap_or_else(|err| panic!("connect to {url}: {err}"));
            let raw = match target {
                BrokerTarget::Mqtt { host, port } => RawPublisher::Mqtt { host, port },
                _ => RawPublisher::Amqp { url },
            };
            Some(Fixture {
                backend,
                raw,
                _broker: None,
            })
        }
    }
}

/// A fresh queue for one test, with a short backoff so that retries finish quickly.
fn unique_queue(test: &str, max_attempts: u32, initial_backoff_ms: u64) -> QueueSpec {
    QueueSpec {
        name: format!("conf-{test}-{}", &causeway_queue::new_message_id()[..12]),
        policy: QueuePolicy {
            max_attempts,
            initial_backoff_ms,
            max_backoff_ms: initial_backoff_ms * 4,
            max_payload_bytes: 4096,
        },
    }
}

fn dead_letter_spec(spec: &QueueSpec) -> QueueSpec {
    QueueSpec {
        name: causeway_queue::dead_letter_queue_name(&spec.name),
        policy: spec.policy.clone(),
    }
}

async fn next(subscription: &mut Subscription) -> Delivery {
    match tokio::time::timeout(RECEIVE_TIMEOUT, subscription.next()).await {
        Ok(Ok(delivery)) => delivery,
        Ok(Err(err)) => panic!("subscription to {} failed: {err}", subscription.spec().name),
        Err(_) => panic!(
            "no delivery from {} within {RECEIVE_TIMEOUT:?}",
            subscription.spec().name
        ),
    }
}

async fn expect_quiet(subscription: &mut Subscription) {
    if let Ok(result) = tokio::time::timeout(QUIET_PERIOD, subscription.next()).await {
        match result {
            Ok(delivery) => panic!(
                "expected no more deliveries from {}, got {delivery:?}",
                subscription.spec().name
            ),
            Err(err) => panic!("subscription to {} failed: {err}", subscription.spec().name),
        }
    }
}

fn message(n: u64) -> OutgoingMessage {
    OutgoingMessage::json(&serde_json::json!({"emailId": n, "status": "sent"}))
        .expect("a JSON payload")
}

fn email_id(delivery: &Delivery) -> u64 {
    let body: serde_json::Value = delivery.json().expect("a JSON delivery");
    body["emailId"].as_u64().expect("an emailId")
}

/// Confirmed messages are delivered, with their id and headers, and an acked message is gone.
async fn publish_confirm_consume_ack(backend: &dyn QueueBackend) {
    let spec = unique_queue("ack", 3, 100);
    backend.declare(&spec).await.expect("declare");
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let sent = message(123).with_header(headers::TRACEPARENT, traceparent);
    let confirmation = backend.publish(&spec, sent.clone()).await.expect("publish");
    assert_eq!(confirmation.message_id, sent.message_id);

    let mut subscription = backend.subscribe(&spec, 8).await.expect("subscribe");
    let delivery = next(&mut subscription).await;
    assert_eq!(delivery.message_id, sent.message_id);
    assert_eq!(delivery.queue, spec.name);
    assert_eq!(email_id(&delivery), 123);
    assert_eq!(delivery.attempt, 1);
    assert!(!delivery.redelivered);
    assert_eq!(delivery.header(headers::TRACEPARENT), Some(traceparent));
    delivery.ack().await.expect("ack");
    expect_quiet(&mut subscription).await;
    drop(subscription);

    // Acked means gone for good: a new consumer gets nothing.
    let mut again = backend.subscribe(&spec, 8).await.expect("subscribe again");
    expect_quiet(&mut again).await;
    drop(again);
    backend.delete(&spec).await.expect("delete");
}

/// One consumer sees a queue's messages in the order they were published.
async fn fifo_with_one_consumer(backend: &dyn QueueBackend) {
    let spec = unique_queue("fifo", 3, 100);
    backend.declare(&spec).await.expect("declare");
    for n in 0..30 {
        backend.publish(&spec, message(n)).await.expect("publish");
    }
    let mut subscription = backend.subscribe(&spec, 5).await.expect("subscribe");
    let mut seen = Vec::new();
    for _ in 0..30 {
        let delivery = next(&mut subscription).await;
        seen.push(email_id(&delivery));
        delivery.ack().await.expect("ack");
    }
    assert_eq!(seen, (0..30).collect::<Vec<_>>());
    drop(subscription);
    backend.delete(&spec).await.expect("delete");
}

/// A failed delivery comes back after the policy's backoff, as the next attempt of the same
/// message; a requeued one comes back at once and also counts as an attempt.
async fn retry_waits_for_backoff_and_counts_attempts(backend: &dyn QueueBackend) {
    let spec = unique_queue("retry", 4, 400);
    backend.declare(&spec).await.expect("declare");
    let sent = message(7);
    backend.publish(&spec, sent.clone()).await.expect("publish");
    let mut subscription = backend.subscribe(&spec, 4).await.expect("subscribe");

    let first = next(&mut subscription).await;
    assert_eq!(first.attempt, 1);
    let failed_at = Instant::now();
    let outcome = first.retry("database unavailable").await.expect("retry");
    assert_eq!(
        outcome,
        SettleOutcome::RetryScheduled {
            after: Duration::from_millis(400),
            next_attempt: 2
        }
    );
    let second = next(&mut subscription).await;
    let waited = failed_at.elapsed();
    assert_eq!(second.message_id, sent.message_id);
    assert_eq!(second.attempt, 2);
    assert!(
        waited >= Duration::from_millis(380),
        "the retry came back after {waited:?}, before the 400 ms backoff"
    );

    let outcome = second.requeue("not now").await.expect("requeue");
    assert_eq!(
        outcome,
        SettleOutcome::RetryScheduled {
            after: Duration::ZERO,
            next_attempt: 3
        }
    );
    let third = next(&mut subscription).await;
    assert_eq!(third.message_id, sent.message_id);
    assert_eq!(third.attempt, 3);
    assert!(third.redelivered);
    third.ack().await.expect("ack");
    expect_quiet(&mut subscription).await;
    drop(subscription);
    backend.delete(&spec).await.expect("delete");
}

/// A message that keeps failing ends in the dead-letter queue after `max_attempts`, with the
/// reason and its original queue; redrive moves it back with a fresh attempt count.
async fn dead_letter_after_max_attempts_then_redrive(backend: &dyn QueueBackend) {
    let spec = unique_queue("dlq", 3, 50);
    backend.declare(&spec).await.expect("declare");
    let sent = message(99);
    backend.publish(&spec, sent.clone()).await.expect("publish");
    let mut subscription = backend.subscribe(&spec, 4).await.expect("subscribe");
    for attempt in 1..=3 {
        let delivery = next(&mut subscription).await;
        assert_eq!(delivery.message_id, sent.message_id);
        assert_eq!(delivery.attempt, attempt);
        let outcome = delivery.retry("template missing").await.expect("retry");
        if attempt < 3 {
            assert!(matches!(outcome, SettleOutcome::RetryScheduled { .. }));
        } else {
            let SettleOutcome::DeadLettered { reason } = outcome else {
                panic!("attempt {attempt} of 3 should dead-letter, got {outcome:?}");
            };
            assert!(reason.contains("template missing"), "{reason}");
        }
    }
    expect_quiet(&mut subscription).await;

    let moved = backend.redrive(&spec, None).await.expect("redrive");
    assert_eq!(moved, 1, "one dead letter to move back");
    let redriven = next(&mut subscription).await;
    assert_eq!(redriven.message_id, sent.message_id);
    assert_eq!(
        redriven.attempt, 1,
        "a redriven message starts its attempts afresh"
    );
    redriven.ack().await.expect("ack");
    assert_eq!(backend.redrive(&spec, None).await.expect("redrive"), 0);
    drop(subscription);
    backend.delete(&spec).await.expect("delete");
}

/// `reject` dead-letters at once; the dead letter keeps its id and payload and says why.
async fn reject_dead_letters_with_reason(backend: &dyn QueueBackend) {
    let spec = unique_queue("reject", 5, 50);
    backend.declare(&spec).await.expect("declare");
    let sent = message(5);
    backend.publish(&spec, sent.clone()).await.expect("publish");
    let mut subscription = backend.subscribe(&spec, 4).await.expect("subscribe");
    let delivery = next(&mut subscription).await;
    delivery.reject("unknown user").await.expect("reject");
    expect_quiet(&mut subscription).await;
    drop(subscription);

    let mut dead = backend
        .subscribe(&dead_letter_spec(&spec), 4)
        .await
        .expect("subscribe to the dead-letter queue");
    let letter = next(&mut dead).await;
    assert_eq!(letter.message_id, sent.message_id);
    assert_eq!(email_id(&letter), 5);
    let reason = letter
        .header(headers::DEAD_LETTER_REASON)
        .expect("a dead-letter reason header");
    assert!(reason.contains("unknown user"), "{reason}");
    assert_eq!(
        letter.header(headers::ORIGINAL_QUEUE),
        Some(spec.name.as_str())
    );
    letter.ack().await.expect("ack the dead letter");
    drop(dead);
    backend.delete(&spec).await.expect("delete");
}

/// A consumer that dies holding unacked messages loses none: they are delivered again, marked
/// redelivered, and the lost delivery counts as an attempt.
async fn consumer_crash_redelivers_unacked(backend: &dyn QueueBackend) {
    let spec = unique_queue("crash", 5, 50);
    backend.declare(&spec).await.expect("declare");
    for n in 0..3 {
        backend.publish(&spec, message(n)).await.expect("publish");
    }
    let mut doomed = backend.subscribe(&spec, 8).await.expect("subscribe");
    let first = next(&mut doomed).await;
    assert_eq!(email_id(&first), 0);
    first.ack().await.expect("ack");
    let held = next(&mut doomed).await;
    assert_eq!(email_id(&held), 1);
    // The consumer crashes: its unsettled delivery and its subscription vanish.
    drop(held);
    drop(doomed);

    let mut survivor = backend.subscribe(&spec, 8).await.expect("subscribe again");
    let mut redelivered = Vec::new();
    for _ in 0..2 {
        let delivery = next(&mut survivor).await;
        redelivered.push((email_id(&delivery), delivery.redelivered, delivery.attempt));
        delivery.ack().await.expect("ack");
    }
    redelivered.sort();
    assert_eq!(
        redelivered[0],
        (1, true, 2),
        "the crashed consumer's message"
    );
    assert_eq!(redelivered[1].0, 2);
    expect_quiet(&mut survivor).await;
    drop(survivor);
    backend.delete(&spec).await.expect("delete");
}

/// Payloads that break the queue's rules are refused at publish with a clear error; one that
/// bypassed the check is dead-lettered on delivery and never reaches the consumer.
async fn bad_payloads_are_refused(backend: &dyn QueueBackend) {
    let spec = unique_queue("payload", 3, 50);
    backend.declare(&spec).await.expect("declare");
    let not_json = backend
        .publish(&spec, OutgoingMessage::new(&b"{\"emailId\": 12"[..]))
        .await
        .expect_err("a truncated JSON payload is refused");
    assert!(
        matches!(not_json, QueueError::Payload(PayloadError::NotJson(_))),
        "{not_json}"
    );
    assert!(not_json.to_string().contains("not JSON"), "{not_json}");

    let big = serde_json::json!({"body": "x".repeat(5000)});
    let too_large = backend
        .publish(&spec, OutgoingMessage::json(&big).expect("JSON"))
        .await
        .expect_err("a payload over the limit is refused");
    assert!(
        matches!(
            too_large,
            QueueError::Payload(PayloadError::TooLarge { limit: 4096, .. })
        ),
        "{too_large}"
    );

    // A publisher that skips the check (publish_validated) gets its garbage dead-lettered.
    let garbage = OutgoingMessage::new(&b"\xff\xfe not json"[..]);
    backend
        .publish_validated(&spec, garbage.clone())
        .await
        .expect("the broker itself takes any bytes");
    backend.publish(&spec, message(8)).await.expect("publish");
    let mut subscription = backend.subscribe(&spec, 4).await.expect("subscribe");
    let delivery = next(&mut subscription).await;
    assert_eq!(
        email_id(&delivery),
        8,
        "the garbage never reaches the consumer"
    );
    delivery.ack().await.expect("ack");
    drop(subscription);

    // Where the backend can peek, the dead letter says why it is there.
    if let Some(letters) = peek_dead_letters(backend, &spec).await {
        assert_eq!(letters.len(), 1);
        assert_eq!(letters[0].message_id, garbage.message_id);
        let reason = &letters[0].headers[headers::DEAD_LETTER_REASON];
        assert!(reason.contains("not JSON"), "{reason}");
    }
    backend.delete(&spec).await.expect("delete");
}

/// The dead letters of `spec` as `peek` shows them, or `None` where the backend cannot peek.
async fn peek_dead_letters(
    backend: &dyn QueueBackend,
    spec: &QueueSpec,
) -> Option<Vec<causeway_queue::PeekedMessage>> {
    let dlq = causeway_queue::dead_letter_queue_name(&spec.name);
    match backend.peek(&dlq, 10).await {
        Ok(letters) => Some(letters),
        Err(QueueError::Unsupported { .. }) => None,
        Err(err) => panic!("peek {dlq}: {err}"),
    }
}

/// Operators see queue depths and can look at messages without consuming them.
async fn list_and_peek(backend: &dyn QueueBackend) {
    let spec = unique_queue("ops", 3, 50);
    backend.declare(&spec).await.expect("declare");
    for n in 0..3 {
        backend.publish(&spec, message(n)).await.expect("publish");
    }
    let listed = backend
        .list(std::slice::from_ref(&spec))
        .await
        .expect("list");
    let queue = listed
        .iter()
        .find(|info| info.name == spec.name)
        .unwrap_or_else(|| panic!("{} missing from {listed:?}", spec.name));
    if let Some(ready) = queue.ready {
        assert_eq!(ready, 3, "{queue:?}");
    }
    let dlq = causeway_queue::dead_letter_queue_name(&spec.name);
    assert!(
        listed.iter().any(|info| info.name == dlq),
        "the dead-letter queue is listed too: {listed:?}"
    );

    match backend.peek(&spec.name, 2).await {
        Ok(peeked) => {
            assert_eq!(peeked.len(), 2);
            let first: serde_json::Value =
                serde_json::from_str(&peeked[0].payload).expect("JSON payload");
            assert_eq!(first["emailId"], 0);
        }
        Err(QueueError::Unsupported { .. }) => {}
        Err(err) => panic!("peek: {err}"),
    }
    // Peeking consumed nothing.
    let mut subscription = backend.subscribe(&spec, 8).await.expect("subscribe");
    for n in 0..3 {
        let delivery = next(&mut subscription).await;
        assert_eq!(email_id(&delivery), n);
        delivery.ack().await.expect("ack");
    }
    drop(subscription);
    backend.delete(&spec).await.expect("delete");
}

const RAW_FIRST: &[u8] = br#"{"emailId":1,"status":"sent","userId":123}"#;
const RAW_SECOND: &[u8] = br#"{"emailId":2,"status":"sent","userId":123}"#;
/// `sha256:` and `printf '%s' '<payload>' | sha256sum`, computed outside the code under test.
const RAW_FIRST_ID: &str =
    "sha256:ae4866cef52054d276c8a98e706a214f1b139459ad8ec77fd9f7227caea9c29d";
const RAW_SECOND_ID: &str =
    "sha256:e69b045ce5dcf60a3287ed77e4143be3aa3e7aabc95383cc3d52b0329e2f36b7";

/// Messages published without an id (by a foreign client, straight onto the transport) are all
/// delivered, each with its content id: different payloads get different ids, identical ones the
/// same id (one message, by design), and a retry and a dead letter keep the id.
async fn messages_without_an_id_get_their_content_id(
    backend: &dyn QueueBackend,
    raw: &RawPublisher,
) {
    let spec = unique_queue("noid", 3, 100);
    backend.declare(&spec).await.expect("declare");
    for payload in [RAW_FIRST, RAW_SECOND, RAW_FIRST] {
        raw.publish(&spec.name, payload).await;
    }
    let mut subscription = backend.subscribe(&spec, 8).await.expect("subscribe");
    let first = next(&mut subscription).await;
    let second = next(&mut subscription).await;
    let repeated = next(&mut subscription).await;
    for (delivery, email, id) in [
        (&first, 1, RAW_FIRST_ID),
        (&second, 2, RAW_SECOND_ID),
        (&repeated, 1, RAW_FIRST_ID),
    ] {
        assert_eq!(email_id(delivery), email);
        assert_eq!(delivery.message_id, id, "{delivery:?}");
        assert_eq!(delivery.header(headers::MESSAGE_ID), Some(id));
        assert_eq!(delivery.attempt, 1);
    }
    assert_ne!(first.message_id, second.message_id);

    // The retried copy is a later attempt of the same message, with the same id.
    let outcome = first.retry("smtp down").await.expect("retry");
    assert!(
        matches!(
            outcome,
            SettleOutcome::RetryScheduled {
                next_attempt: 2,
                ..
            }
        ),
        "{outcome:?}"
    );
    second.ack().await.expect("ack");
    repeated.ack().await.expect("ack");
    let retried = next(&mut subscription).await;
    assert_eq!(email_id(&retried), 1);
    assert_eq!(retried.attempt, 2);
    assert_eq!(retried.message_id, RAW_FIRST_ID);
    assert_eq!(retried.header(headers::MESSAGE_ID), Some(RAW_FIRST_ID));
    retried.reject("unknown user").await.expect("reject");
    expect_quiet(&mut subscription).await;
    drop(subscription);

    // So does its dead letter.
    let mut dead = backend
        .subscribe(&dead_letter_spec(&spec), 4)
        .await
        .expect("subscribe to the dead-letter queue");
    let letter = next(&mut dead).await;
    assert_eq!(letter.message_id, RAW_FIRST_ID);
    assert_eq!(letter.header(headers::MESSAGE_ID), Some(RAW_FIRST_ID));
    letter.ack().await.expect("ack the dead letter");
    drop(dead);
    backend.delete(&spec).await.expect("delete");
}

/// Names that are not valid everywhere are refused before anything reaches a broker.
async fn invalid_queue_names_are_refused(backend: &dyn QueueBackend) {
    let mut spec = unique_queue("name", 3, 50);
    spec.name = "notification queue/#".into();
    let err = backend
        .publish(&spec, message(1))
        .await
        .expect_err("an invalid name is refused");
    assert!(matches!(err, QueueError::InvalidQueueName(_)), "{err}");
    let err = backend
        .subscribe(&spec, 1)
        .await
        .err()
        .expect("an invalid name is refused");
    assert!(matches!(err, QueueError::InvalidQueueName(_)), "{err}");
}

macro_rules! conformance {
    ($($backend:ident => $kind:expr),+ $(,)?) => {$(
        mod $backend {
            use super::*;

            async fn run<F, Fut>(test: F)
            where
                F: FnOnce(Arc<dyn QueueBackend>) -> Fut,
                Fut: std::future::Future<Output = ()>,
            {
                if let Some(fixture) = fixture($kind).await {
                    test(fixture.backend.clone()).await;
                }
            }

            /// `run` for tests that also publish past the library.
            async fn run_raw<F, Fut>(test: F)
            where
                F: FnOnce(Arc<dyn QueueBackend>, RawPublisher) -> Fut,
                Fut: std::future::Future<Output = ()>,
            {
                if let Some(fixture) = fixture($kind).await {
                    test(fixture.backend.clone(), fixture.raw.clone()).await;
                }
            }

            #[tokio::test]
            async fn publish_confirm_consume_ack() {
                run(|b| async move { super::publish_confirm_consume_ack(&*b).await }).await;
            }
            #[tokio::test]
            async fn fifo_with_one_consumer() {
                run(|b| async move { super::fifo_with_one_consumer(&*b).await }).await;
            }
            #[tokio::test]
            async fn retry_waits_for_backoff_and_counts_attempts() {
                run(|b| async move { super::retry_waits_for_backoff_and_counts_attempts(&*b).await })
                    .await;
            }
            #[tokio::test]
            async fn dead_letter_after_max_attempts_then_redrive() {
                run(|b| async move { super::dead_letter_after_max_attempts_then_redrive(&*b).await })
                    .await;
            }
            #[tokio::test]
            async fn reject_dead_letters_with_reason() {
                run(|b| async move { super::reject_dead_letters_with_reason(&*b).await }).await;
            }
            #[tokio::test]
            async fn consumer_crash_redelivers_unacked() {
                run(|b| async move { super::consumer_crash_redelivers_unacked(&*b).await }).await;
            }
            #[tokio::test]
            async fn bad_payloads_are_refused() {
                run(|b| async move { super::bad_payloads_are_refused(&*b).await }).await;
            }
            #[tokio::test]
            async fn list_and_peek() {
                run(|b| async move { super::list_and_peek(&*b).await }).await;
            }
            #[tokio::test]
            async fn messages_without_an_id_get_their_content_id() {
                run_raw(|b, raw| async move {
                    super::messages_without_an_id_get_their_content_id(&*b, &raw).await
                })
                .await;
            }
            #[tokio::test]
            async fn invalid_queue_names_are_refused() {
                run(|b| async move { super::invalid_queue_names_are_refused(&*b).await }).await;
            }
        }
    )+};
}

conformance! {
    embedded => BackendKind::Embedded,
    amqp => BackendKind::Amqp,
    mqtt => BackendKind::Mqtt,
}
