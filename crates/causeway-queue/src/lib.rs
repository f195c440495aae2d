//! Causeway's message-queue interface and its backends.
//!
//! One interface ([`QueueBackend`]): publish a message and return once the broker has confirmed it
//! durable; subscribe with a prefetch limit; settle each [`Delivery`] by acking it, retrying it with
//! backoff, requeueing it, or rejecting it to the queue's dead-letter queue. The rules every backend
//! shares live here, once: which payloads are acceptable (JSON, within a size limit), how attempts
//! are counted, when a retry becomes a dead letter and how long each backoff is, and which headers
//! carry the message id and trace context. A backend only supplies the primitives (durable publish,
//! deliveries, ack, delayed redelivery, dead-lettering and the operator views).
//!
//! # Message ids
//!
//! Every message has a non-empty id that consumers deduplicate on (deliveries are at least once).
//! [`OutgoingMessage`] assigns one at publish; a message that arrives without one (published by a
//! foreign client such as pika or paho, or with an empty id) gets [`content_message_id`]:
//! `sha256:` and the hex SHA-256 of its payload, as SQS FIFO queues' content-based deduplication
//! does. The id is resolved where every backend decodes a delivery, logged
//! (`queue.message_id_derived`, with the queue and the id), and written into the delivery's
//! `message-id` header, which the library's retry, dead-letter and redrive copies carry, so every
//! later attempt has the same id (the embedded broker derives it the same way when it takes such a
//! message). Consequence, by design: two id-less messages with different payloads are two
//! messages; two with byte-identical payloads are one message to a deduplicating consumer.
//!
//! Backends: [`embedded`] speaks to Causeway's own broker (the `causeway-broker` crate) over gRPC
//! with TLS, [`amqp`] to RabbitMQ over AMQP 0.9.1 (lapin), [`mqtt`] to an MQTT 5 broker such as
//! Mosquitto (rumqttc). [`connect`] picks one from a broker URL.

pub mod amqp;
pub mod embedded;
mod error;
mod link;
mod message;
pub mod mqtt;
mod target;
mod wire_headers;

use std::sync::Arc;

use async_trait::async_trait;

pub use causeway_core::queue_policy::{
    PayloadError, QueueNameError, QueuePolicy, QueueSpec, dead_letter_queue_name,
    validate_queue_name,
};
pub use error::QueueError;
pub use link::{BrokerLink, ResolveBroker};
pub use message::{
    CONTENT_ID_PREFIX, Delivery, OutgoingMessage, PeekedMessage, Settle, SettleOutcome,
    content_message_id, headers, new_message_id, now_millis,
};
pub use target::{BackendKind, BrokerTarget, ConnectOptions};

/// What the broker said when it took a message: it is durable from here on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Confirmation {
    pub message_id: String,
    /// The broker's position for it, where the broker has one (the embedded broker's sequence).
    pub sequence: Option<u64>,
}

/// One queue as an operator sees it. Counts a backend cannot know are `None`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct QueueInfo {
    pub name: String,
    /// Ready to be delivered now.
    pub ready: Option<u64>,
    /// Delivered and not yet settled.
    pub unacked: Option<u64>,
    /// Waiting out a retry backoff.
    pub delayed: Option<u64>,
    pub consumers: Option<u64>,
}

/// A backend's stream of deliveries for one subscription.
#[async_trait]
pub trait DeliveryStream: Send {
    /// The next delivery. An error means the subscription is over (the connection was lost or
    /// the broker closed it); unacked deliveries go back to the queue, and the caller subscribes
    /// again once the broker is reachable.
    async fn next(&mut self) -> Result<Delivery, QueueError>;
}

/// A broker, as the services and the operator tools use it.
#[async_trait]
pub trait QueueBackend: Send + Sync {
    fn kind(&self) -> BackendKind;

    /// Creates the queue and its dead-letter queue (and whatever the backend needs for delayed
    /// retries) if they do not exist; idempotent.
    async fn declare(&self, spec: &QueueSpec) -> Result<(), QueueError>;

    /// Sends `message` to `spec`'s queue and returns once the broker has confirmed it durable.
    /// Callers go through [`publish`](QueueBackend::publish), which validates first.
    async fn publish_validated(
        &self,
        spec: &QueueSpec,
        message: OutgoingMessage,
    ) -> Result<Confirmation, QueueError>;

    /// Starts a subscription with at most `prefetch` unacked deliveries outstanding.
    /// Callers go through [`subscribe`](QueueBackend::subscribe).
    async fn open_stream(
        &self,
        spec: &QueueSpec,
        prefetch: u16,
    ) -> Result<Box<dyn DeliveryStream>, QueueError>;

    /// Queues as an operator sees them. `known` names the queues the caller knows of (backends
    /// that cannot list queues report these and their dead-letter queues).
    async fn list(&self, known: &[QueueSpec]) -> Result<Vec<QueueInfo>, QueueError>;

    /// Up to `limit` messages of `queue` (which may be a dead-letter queue), oldest first,
    /// without consuming them.
    async fn peek(&self, queue: &str, limit: usize) -> Result<Vec<PeekedMessage>, QueueError>;

    /// Moves up to `limit` (all if `None`) dead letters of `spec` back into its queue, each with a
    /// fresh attempt count; a dead letter leaves the dead-letter queue only after the broker has
    /// confirmed its copy in the queue. Returns how many moved.
    async fn redrive(&self, spec: &QueueSpec, limit: Option<u64>) -> Result<u64, QueueError>;

    /// Removes the queue, its dead-letter queue and whatever the backend made for retries, with
    /// their messages (for tests and operators). Deleting a queue that does not exist is not an error.
    async fn delete(&self, spec: &QueueSpec) -> Result<(), QueueError>;

    /// Validates the queue name and `message` against `spec` (JSON, size), then publishes it with
    /// confirmation. A message whose id was left empty goes out with its content id.
    async fn publish(
        &self,
        spec: &QueueSpec,
        message: OutgoingMessage,
    ) -> Result<Confirmation, QueueError> {
        validate_queue_name(&spec.name)?;
        spec.policy.validate_payload(&message.payload)?;
        self.publish_validated(spec, message.with_id_filled_in())
            .await
    }

    /// Subscribes to `spec`'s queue. Deliveries whose payload breaks the queue's rules (not JSON,
    /// too large: published by someone who bypassed [`publish`](QueueBackend::publish)) are
    /// dead-lettered with the reason and never reach the caller.
    async fn subscribe(&self, spec: &QueueSpec, prefetch: u16) -> Result<Subscription, QueueError> {
        validate_queue_name(&spec.name)?;
        let stream = self.open_stream(spec, prefetch.max(1)).await?;
        Ok(Subscription {
            spec: spec.clone(),
            stream,
        })
    }
}

/// Deliveries of one queue that passed the queue's payload rules.
pub struct Subscription {
    spec: QueueSpec,
    stream: Box<dyn DeliveryStream>,
}

impl Subscription {
    pub fn spec(&self) -> &QueueSpec {
        &self.spec
    }

    /// The next acceptable delivery; see [`DeliveryStream::next`] for what an error means.
    pub async fn next(&mut self) -> Result<Delivery, QueueError> {
        loop {
            let delivery = self.stream.next().await?;
            match self.spec.policy.validate_payload(&delivery.payload) {
                Ok(()) => return Ok(delivery),
                Err(problem) => {
                    let message_id = delivery.message_id.clone();
                    let reason = format!("refused on delivery: {problem}");
                    tracing::warn!(
                        event = "queue.delivery_refused",
                        queue = %self.spec.name,
                        message_id = %message_id,
                        error = %problem,
                        "dead-lettering a delivery whose payload breaks the queue's rules"
                    );
                    delivery.reject(&reason).await?;
                }
            }
        }
    }
}

/// Connects to the broker `target` names.
pub async fn connect(
    target: &BrokerTarget,
    options: &ConnectOptions,
) -> Result<Arc<dyn QueueBackend>, QueueError> {
    let backend: Arc<dyn QueueBackend> = match target {
        BrokerTarget::Embedded { .. } => {
            Arc::new(embedded::EmbeddedBackend::connect(target, options).await?)
        }
        BrokerTarget::Amqp { .. } => Arc::new(amqp::AmqpBackend::connect(target, options).await?),
        BrokerTarget::Mqtt { .. } => Arc::new(mqtt::MqttBackend::connect(target, options).await?),
    };
    Ok(backend)
}
