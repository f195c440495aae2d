use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;
use serde::Serialize;

use crate::{PayloadError, QueueError, QueuePolicy};

/// Header names every backend carries with a message (as AMQP headers/properties, MQTT 5 user
/// properties, or the embedded broker's header map).
pub mod headers {
    /// The message id, assigned at publish and kept through retries and dead-lettering, so that
    /// consumers can deduplicate at-least-once deliveries. A message that arrives without one
    /// gets [`content_message_id`](super::content_message_id) of its payload, written here too.
    pub const MESSAGE_ID: &str = "message-id";
    /// W3C trace context of the publisher's span.
    pub const TRACEPARENT: &str = "traceparent";
    /// The request id of the request that caused the message.
    pub const REQUEST_ID: &str = "x-request-id";
    /// Milliseconds since the Unix epoch when the publisher sent it.
    pub const PUBLISHED_AT: &str = "x-causeway-published-at";
    /// Which delivery this is (1 on the first), where the backend counts deliveries in a header.
    pub const ATTEMPT: &str = "x-causeway-attempt";
    /// Why a dead letter was dead-lettered.
    pub const DEAD_LETTER_REASON: &str = "x-causeway-dead-letter-reason";
    /// The queue a dead letter came from.
    pub const ORIGINAL_QUEUE: &str = "x-causeway-original-queue";
}

/// A fresh message id: 128 random bits in hex.
pub fn new_message_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// What a content-derived message id starts with.
pub const CONTENT_ID_PREFIX: &str = "sha256:";

/// The id of a message that arrived without one: `sha256:` and the hex SHA-256 of its payload,
/// as SQS FIFO queues' content-based deduplication does. The same bytes always give the same id,
/// so every redelivery of the message has it, and two id-less messages with identical payloads
/// are one message to a consumer that deduplicates (by design: nothing else tells them apart).
pub fn content_message_id(payload: &[u8]) -> String {
    use std::fmt::Write;
    let digest = ring::digest::digest(&ring::digest::SHA256, payload);
    let mut id = String::with_capacity(CONTENT_ID_PREFIX.len() + 64);
    id.push_str(CONTENT_ID_PREFIX);
    for byte in digest.as_ref() {
        let _ = write!(id, "{byte:02x}");
    }
    id
}

/// The id of a message `queue` delivered: the transport's own field if it has one, else the
/// `message-id` header, else [`content_message_id`] (logged). Every backend decodes deliveries
/// (and peeked messages) through this, so none can fall back to an empty id. The id is written
/// into `headers`, from which retries, dead letters and redrives are copied: later attempts then
/// carry it explicitly.
pub(crate) fn resolve_message_id(
    queue: &str,
    transport_id: Option<&str>,
    headers: &mut BTreeMap<String, String>,
    payload: &[u8],
) -> String {
    let carried = transport_id
        .filter(|id| !id.is_empty())
        .or_else(|| {
            headers
                .get(headers::MESSAGE_ID)
                .map(String::as_str)
                .filter(|id| !id.is_empty())
        })
        .map(str::to_string);
    let message_id = carried.unwrap_or_else(|| {
        let derived = content_message_id(payload);
        tracing::info!(
            event = "queue.message_id_derived",
            queue,
            message_id = %derived,
            payload_bytes = payload.len(),
            "a message arrived without an id; using one derived from its payload"
        );
        derived
    });
    headers.insert(headers::MESSAGE_ID.to_string(), message_id.clone());
    message_id
}

/// Milliseconds since the Unix epoch.
pub fn now_millis() -> u64 {
    since_epoch().as_millis() as u64
}

/// Wall-clock time since the Unix epoch, at the clock's own precision.
pub(crate) fn since_epoch() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

/// A message on its way to a queue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutgoingMessage {
    pub message_id: String,
    pub payload: Bytes,
    /// Application headers (trace context, request id, ...); the message id and publish time are
    /// added by [`OutgoingMessage::new`].
    pub headers: BTreeMap<String, String>,
}

impl OutgoingMessage {
    /// A message with a new id and the publish time; `payload` is checked at publish.
    pub fn new(payload: impl Into<Bytes>) -> Self {
        let message_id = new_message_id();
        let mut headers = BTreeMap::new();
        headers.insert(headers::MESSAGE_ID.to_string(), message_id.clone());
        headers.insert(headers::PUBLISHED_AT.to_string(), now_millis().to_string());
        Self {
            message_id,
            payload: payload.into(),
            headers,
        }
    }

    /// A message whose payload is `value` as JSON.
    pub fn json<T: Serialize>(value: &T) -> Result<Self, QueueError> {
        let payload =
            serde_json::to_vec(value).map_err(|err| PayloadError::NotJson(err.to_string()))?;
        Ok(Self::new(payload))
    }

    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(name.into(), value.into());
        self
    }

    /// Uses `message_id` instead of the generated one (for example an outbox row's id, so that
    /// republishing after a crash keeps the id consumers deduplicate on).
    pub fn with_message_id(mut self, message_id: impl Into<String>) -> Self {
        self.message_id = message_id.into();
        self.headers
            .insert(headers::MESSAGE_ID.to_string(), self.message_id.clone());
        self
    }

    /// The message as it is published: an empty id (the fields are public) becomes the payload's
    /// [`content_message_id`], and the header carries the id (MQTT has no other place for it).
    pub(crate) fn with_id_filled_in(self) -> Self {
        let message_id = if self.message_id.is_empty() {
            content_message_id(&self.payload)
        } else {
            self.message_id.clone()
        };
        self.with_message_id(message_id)
    }
}

/// A message as the operator tools show it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PeekedMessage {
    pub message_id: String,
    /// Deliveries so far (0 if never delivered), where the backend knows.
    pub deliveries: Option<u32>,
    pub headers: BTreeMap<String, String>,
    /// The payload as text (payloads are JSON; anything else is shown lossily).
    pub payload: String,
}

/// The primitives a backend provides to settle one delivery. [`Delivery`] decides which to call.
#[async_trait]
pub trait Settle: Send + Sync {
    /// Done: remove the message. May return once the ack is sent rather than recorded (as
    /// AMQP's `basic.ack`); an ack lost on the way means one more delivery of the message.
    async fn ack(self: Box<Self>) -> Result<(), QueueError>;
    /// Deliver the message again after `delay`, as delivery `next_attempt`.
    async fn redeliver(
        self: Box<Self>,
        delay: Duration,
        next_attempt: u32,
    ) -> Result<(), QueueError>;
    /// Move the message to its queue's dead-letter queue, recording `reason` and the attempts.
    async fn dead_letter(self: Box<Self>, reason: &str, attempts: u32) -> Result<(), QueueError>;
}

/// What became of a delivery that was not acked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SettleOutcome {
    /// It will be delivered again after this wait.
    RetryScheduled { after: Duration, next_attempt: u32 },
    /// It is in the dead-letter queue.
    DeadLettered { reason: String },
}

/// One message handed to a consumer. Drop it unsettled and the backend redelivers it when the
/// subscription ends.
pub struct Delivery {
    pub queue: String,
    pub message_id: String,
    pub payload: Bytes,
    pub headers: BTreeMap<String, String>,
    /// Which delivery of this message this is: 1 the first time.
    pub attempt: u32,
    /// Whether the broker delivered it before (to a consumer that did not settle it, or a retry).
    pub redelivered: bool,
    policy: QueuePolicy,
    settle: Box<dyn Settle>,
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("queue", &self.queue)
            .field("message_id", &self.message_id)
            .field("attempt", &self.attempt)
            .field("redelivered", &self.redelivered)
            .field("payload_bytes", &self.payload.len())
            .finish()
    }
}

impl Delivery {
    /// Built by backends. An empty `message_id` (a backend that did not resolve it) is resolved
    /// here, from the headers or the payload, so that a delivery never has an empty id.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        queue: String,
        message_id: String,
        payload: Bytes,
        mut headers: BTreeMap<String, String>,
        attempt: u32,
        redelivered: bool,
        policy: QueuePolicy,
        settle: Box<dyn Settle>,
    ) -> Self {
        let message_id = resolve_message_id(&queue, Some(&message_id), &mut headers, &payload);
        Self {
            queue,
            message_id,
            payload,
            headers,
            attempt: attempt.max(1),
            redelivered,
            policy,
            settle,
        }
    }

    /// The payload parsed as `T`.
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, QueueError> {
        serde_json::from_slice(&self.payload)
            .map_err(|err| QueueError::Payload(PayloadError::NotJson(err.to_string())))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }

    /// Processing succeeded; the broker forgets the message. Delivery is at least once: an ack
    /// lost to a crash or a broken connection means the message is delivered again.
    pub async fn ack(self) -> Result<(), QueueError> {
        self.settle.ack().await
    }

    /// Processing failed and may succeed later: deliver again after the policy's backoff, or
    /// dead-letter the message if this was its last allowed attempt.
    pub async fn retry(self, reason: &str) -> Result<SettleOutcome, QueueError> {
        let after = self.policy.backoff(self.attempt);
        self.redeliver_or_dead_letter(after, reason).await
    }

    /// Give the message back for immediate redelivery (this delivery still counts as an attempt,
    /// so a message nobody can process still ends in the dead-letter queue).
    pub async fn requeue(self, reason: &str) -> Result<SettleOutcome, QueueError> {
        self.redeliver_or_dead_letter(Duration::ZERO, reason).await
    }

    /// The message can never be processed: dead-letter it now with `reason`.
    pub async fn reject(self, reason: &str) -> Result<(), QueueError> {
        self.settle.dead_letter(reason, self.attempt).await
    }

    async fn redeliver_or_dead_letter(
        self,
        after: Duration,
        reason: &str,
    ) -> Result<SettleOutcome, QueueError> {
        if self.attempt >= self.policy.max_attempts {
            let reason = format!(
                "failed {} of {} attempts; last error: {reason}",
                self.attempt, self.policy.max_attempts
            );
            self.settle.dead_letter(&reason, self.attempt).await?;
            return Ok(SettleOutcome::DeadLettered { reason });
        }
        let next_attempt = self.attempt + 1;
        self.settle.redeliver(after, next_attempt).await?;
        Ok(SettleOutcome::RetryScheduled {
            after,
            next_attempt,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// Records which primitive a delivery chose; an in-memory fake is fine for the policy logic.
    #[derive(Clone, Default)]
    struct Recorder(Arc<Mutex<Vec<String>>>);

    #[async_trait]
    impl Settle for Recorder {
        async fn ack(self: Box<Self>) -> Result<(), QueueError> {
            self.0.lock().unwrap().push("ack".into());
            Ok(())
        }
        async fn redeliver(
            self: Box<Self>,
            delay: Duration,
            next_attempt: u32,
        ) -> Result<(), QueueError> {
            self.0
                .lock()
                .unwrap()
                .push(format!("redeliver {}ms #{next_attempt}", delay.as_millis()));
            Ok(())
        }
        async fn dead_letter(
            self: Box<Self>,
            reason: &str,
            attempts: u32,
        ) -> Result<(), QueueError> {
            self.0
                .lock()
                .unwrap()
                .push(format!("dead-letter after {attempts}: {reason}"));
            Ok(())
        }
    }

    fn delivery(attempt: u32, recorder: &Recorder) -> Delivery {
        let policy = QueuePolicy {
            max_attempts: 3,
            initial_backoff_ms: 100,
            max_backoff_ms: 1000,
            ..QueuePolicy::default()
        };
        Delivery::new(
            "q".into(),
            "id".into(),
            Bytes::from_static(b"{}"),
            BTreeMap::new(),
            attempt,
            attempt > 1,
            policy,
            Box::new(recorder.clone()),
        )
    }

    #[tokio::test]
    async fn retries_back_off_then_dead_letter_on_the_last_attempt() {
        let recorder = Recorder::default();
        let first = delivery(1, &recorder).retry("smtp down").await.unwrap();
        assert_eq!(
            first,
            SettleOutcome::RetryScheduled {
                after: Duration::from_millis(100),
                next_attempt: 2
            }
        );
        delivery(2, &recorder).retry("smtp down").await.unwrap();
        let last = delivery(3, &recorder).retry("smtp down").await.unwrap();
        assert!(matches!(last, SettleOutcome::DeadLettered { .. }));
        delivery(1, &recorder).requeue("busy").await.unwrap();
        delivery(1, &recorder).reject("malformed").await.unwrap();
        delivery(1, &recorder).ack().await.unwrap();
        assert_eq!(
            *recorder.0.lock().unwrap(),
            [
                "redeliver 100ms #2",
                "redeliver 200ms #3",
                "dead-letter after 3: failed 3 of 3 attempts; last error: smtp down",
                "redeliver 0ms #2",
                "dead-letter after 1: malformed",
                "ack",
            ]
        );
    }

    #[test]
    fn content_ids_are_the_payloads_sha256() {
        // `printf '{}' | sha256sum` and `printf '' | sha256sum`.
        assert_eq!(
            content_message_id(b"{}"),
            "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
        );
        assert_eq!(
            content_message_id(b""),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_ne!(
            content_message_id(b"{\"n\":1}"),
            content_message_id(b"{\"n\":2}")
        );
    }

    #[test]
    fn a_delivered_id_is_never_empty() {
        let map = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let mut carried = map(&[(headers::MESSAGE_ID, "m1")]);
        assert_eq!(
            resolve_message_id("q", Some("own"), &mut carried, b"{}"),
            "own"
        );
        assert_eq!(carried[headers::MESSAGE_ID], "own");
        let mut carried = map(&[(headers::MESSAGE_ID, "m1")]);
        assert_eq!(resolve_message_id("q", Some(""), &mut carried, b"{}"), "m1");
        assert_eq!(resolve_message_id("q", None, &mut carried, b"{}"), "m1");
        // No id anywhere (or only empty ones): the content id, written into the headers so that
        // copies made from them carry it.
        for mut headers in [map(&[]), map(&[(headers::MESSAGE_ID, "")])] {
            let id = resolve_message_id("q", Some(""), &mut headers, b"{}");
            assert_eq!(id, content_message_id(b"{}"));
            assert_eq!(headers, map(&[(headers::MESSAGE_ID, id.as_str())]));
        }
        // A backend that hands Delivery::new an empty id still yields a delivery with one.
        let recorder = Recorder::default();
        let delivery = Delivery::new(
            "q".into(),
            String::new(),
            Bytes::from_static(b"{}"),
            BTreeMap::new(),
            1,
            false,
            QueuePolicy::default(),
            Box::new(recorder),
        );
        assert_eq!(delivery.message_id, content_message_id(b"{}"));
        assert_eq!(
            delivery.header(headers::MESSAGE_ID),
            Some(delivery.message_id.as_str())
        );
        // A message published with its id left empty goes out under its content id.
        let mut outgoing = OutgoingMessage::new(&b"{}"[..]);
        outgoing.message_id.clear();
        outgoing.headers.remove(headers::MESSAGE_ID);
        let outgoing = outgoing.with_id_filled_in();
        assert_eq!(outgoing.message_id, content_message_id(b"{}"));
        assert_eq!(outgoing.headers[headers::MESSAGE_ID], outgoing.message_id);
    }

    #[test]
    fn outgoing_messages_carry_their_id_and_publish_time() {
        let message = OutgoingMessage::json(&serde_json::json!({"emailId": 123}))
            .unwrap()
            .with_message_id("outbox-7");
        assert_eq!(message.headers[headers::MESSAGE_ID], "outbox-7");
        assert!(
            message.headers[headers::PUBLISHED_AT]
                .parse::<u64>()
                .unwrap()
                > 0
        );
        assert_eq!(&message.payload[..], br#"{"emailId":123}"#);
    }
}
