//! The RabbitMQ backend (AMQP 0.9.1 through lapin).
//!
//! # Topology
//!
//! For a queue `q` the backend declares durable **classic** queues:
//! - `q`: the queue itself;
//! - `q.dlq`: its dead-letter queue;
//! - `q.retry.<ms>`: one delay queue per distinct backoff of the queue's policy, with a queue-wide
//!   `x-message-ttl` of `<ms>` that dead-letters expired messages back to `q` through the default
//!   exchange. A queue-wide TTL (rather than per-message expiration on one retry queue) matters:
//!   RabbitMQ only expires messages at the head of a queue, so a 10 s message would hold back a
//!   200 ms one queued behind it. A delay outside the policy's steps gets its queue on demand.
//!
//! Why not quorum queues: RabbitMQ 3.10's quorum queues put a message that is given back (a
//! consumer crashed, or `peek` returned it) at the *back* of the queue, which breaks the
//! interface's promises that one consumer sees publish order and that `peek` consumes nothing
//! (the conformance suite caught both). Classic queues put it back in its place. The price: no
//! `x-delivery-count` (a `redelivered` delivery counts as one more attempt, however often it came
//! back) and at-most-once internal dead-lettering from a retry queue to `q` (a durable queue on a
//! single node does not drop it; a mirrored cluster could on failover).
//!
//! # Delivery guarantees
//!
//! Messages are persistent (delivery mode 2) and published with publisher confirms and the
//! `mandatory` flag: `publish` returns once the broker acked, a nack is `PublishRefused`, an
//! unroutable message (the queue does not exist) is `NoSuchQueue`, no answer within
//! `confirm_timeout` is `ConfirmTimeout`. Consumers use manual acks and `basic.qos(prefetch)`.
//! Retrying or dead-lettering publishes the copy with confirmation first and acks the original
//! only then, so a crash in between duplicates a message but never loses it.
//!
//! # Attempts
//!
//! A delivery's attempt is the `x-causeway-attempt` header (1 when absent) plus the times the
//! broker took it back from a consumer that did not settle it: `x-delivery-count` where the queue
//! counts them (quorum queues declared by someone else), else one if the delivery is
//! `redelivered`.
//!
//! # Operator views
//!
//! `peek` takes messages with `basic.get` on a channel of its own and gives them all back with
//! `basic.nack(requeue)`: they keep their place, but the broker counts the peek as a delivery
//! (the `redelivered` flag is set), so a peeked message's next delivery counts one attempt more. `list` uses passive declares: `ready` and `consumers` come
//! from the broker, `delayed` is the sum of the retry queues, `unacked` is unknown (`None`) without
//! the management plugin. `redrive` moves dead letters with `basic.get`, a confirmed publish and
//! then the ack.
//!
//! # Backends compared
//!
//! | | embedded | AMQP (this) | MQTT |
//! |---|---|---|---|
//! | confirm | broker sequence | publisher confirm | PUBACK |
//! | retry delay | broker | TTL retry queues | held back by the consumer |
//! | dead-letter queue | broker | `q.dlq`, published by the library | `.../q.dlq` topic, published by the library |
//! | attempts after a consumer crash | broker counts | `redelivered` flag (+1) | DUP flag (+1) |
//! | counts in `list` | all | ready, consumers, delayed | none |
//! | peek | yes | yes (counts as a delivery) | no |

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::StreamExt;

use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicNackOptions, BasicPublishOptions,
    BasicQosOptions, ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Acker, Confirmation as LapinConfirmation};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, Consumer};
use tokio::sync::Mutex;

use crate::message::resolve_message_id;
use crate::wire_headers;
use crate::{
    BackendKind, BrokerTarget, Confirmation, ConnectOptions, Delivery, DeliveryStream,
    OutgoingMessage, PeekedMessage, QueueBackend, QueueError, QueueInfo, QueueSpec,
    validate_queue_name,
};

const KIND: BackendKind = BackendKind::Amqp;
const PERSISTENT: u8 = 2;

/// A connection to RabbitMQ. Cheap to share: operations open short-lived channels; publishes go
/// through one confirm-mode channel, reopened if the broker closed it.
pub struct AmqpBackend {
    shared: Arc<Shared>,
}

struct Shared {
    connection: Connection,
    publisher: Mutex<Option<Channel>>,
    options: ConnectOptions,
    /// Retry queues declared by this process, so `redeliver` declares each at most once.
    retry_queues: StdMutex<HashSet<String>>,
}

impl AmqpBackend {
    pub async fn connect(
        target: &BrokerTarget,
        options: &ConnectOptions,
    ) -> Result<Self, QueueError> {
        let BrokerTarget::Amqp { url } = target else {
            return Err(QueueError::InvalidUrl {
                url: target.display(),
                reason: "not an amqp:// URL".into(),
            });
        };
        let connect_error = |message: String| QueueError::Connect {
            backend: KIND,
            target: target.display(),
            message,
        };
        let properties = ConnectionProperties::default()
            .with_connection_name(LongString::from(options.client_name.clone()));
        let connection = tokio::time::timeout(
            options.connect_timeout,
            Connection::connect(url, properties),
        )
        .await
        .map_err(|_| {
            connect_error(format!(
                "no answer within {} ms",
                options.connect_timeout.as_millis()
            ))
        })?
        .map_err(|err| connect_error(err.to_string()))?;
        Ok(Self {
            shared: Arc::new(Shared {
                connection,
                publisher: Mutex::new(None),
                options: options.clone(),
                retry_queues: StdMutex::new(HashSet::new()),
            }),
        })
    }
}

fn retry_queue_name(queue: &str, delay: Duration) -> String {
    format!("{queue}.retry.{}", delay.as_millis())
}

/// The distinct non-zero backoffs of `spec`'s policy: one retry queue each.
fn retry_delays(spec: &QueueSpec) -> Vec<Duration> {
    let mut delays: Vec<Duration> = (1..spec.policy.max_attempts)
        .map(|attempt| spec.policy.backoff(attempt))
        .filter(|delay| !delay.is_zero())
        .collect();
    delays.sort();
    delays.dedup();
    delays
}

fn broker_error(err: lapin::Error) -> QueueError {
    if err.is_amqp_error() {
        QueueError::Broker {
            backend: KIND,
            message: err.to_string(),
        }
    } else {
        QueueError::Disconnected {
            backend: KIND,
            message: err.to_string(),
        }
    }
}

fn is_not_found(err: &lapin::Error) -> bool {
    matches!(
        err.kind(),
        lapin::ErrorKind::ProtocolError(amqp)
            if matches!(amqp.kind(), AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND))
    )
}

fn text(value: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value.to_string()))
}

fn retry_arguments(queue: &str, delay: Duration) -> FieldTable {
    let mut arguments = FieldTable::default();
    let ttl = i64::try_from(delay.as_millis()).unwrap_or(i64::MAX);
    arguments.insert("x-message-ttl".into(), AMQPValue::LongLongInt(ttl));
    arguments.insert("x-dead-letter-exchange".into(), text(""));
    arguments.insert("x-dead-letter-routing-key".into(), text(queue));
    arguments
}

fn to_field_table(headers: &BTreeMap<String, String>) -> FieldTable {
    let mut table = FieldTable::default();
    for (name, value) in headers {
        // Header names longer than a short string cannot be sent; none of ours are.
        if let Ok(name) = ShortString::try_new(name.clone()) {
            table.insert(name, text(value));
        }
    }
    table
}

fn value_text(value: &AMQPValue) -> Option<String> {
    Some(match value {
        AMQPValue::LongString(s) => s.to_string(),
        AMQPValue::ShortString(s) => s.as_str().to_string(),
        AMQPValue::Boolean(v) => v.to_string(),
        AMQPValue::ShortShortInt(v) => v.to_string(),
        AMQPValue::ShortShortUInt(v) => v.to_string(),
        AMQPValue::ShortInt(v) => v.to_string(),
        AMQPValue::ShortUInt(v) => v.to_string(),
        AMQPValue::LongInt(v) => v.to_string(),
        AMQPValue::LongUInt(v) => v.to_string(),
        AMQPValue::LongLongInt(v) => v.to_string(),
        AMQPValue::Timestamp(v) => v.to_string(),
        _ => return None,
    })
}

/// What a received message says about itself, read once.
struct Received {
    message_id: String,
    headers: BTreeMap<String, String>,
    /// Times the broker took it back from a consumer (quorum queues' `x-delivery-count`).
    delivery_count: Option<u32>,
}

impl Received {
    /// Reads a message of `queue`; one without an id gets its content id.
    fn read(queue: &str, properties: &BasicProperties, payload: &[u8]) -> Self {
        let table = properties.headers().clone().unwrap_or_default();
        let delivery_count = table
            .inner()
            .get("x-delivery-count")
            .and_then(value_text)
            .and_then(|count| count.parse().ok());
        let mut headers: BTreeMap<String, String> = table
            .inner()
            .iter()
            .filter(|(name, _)| !wire_headers::is_transport_header(name.as_str()))
            .filter_map(|(name, value)| Some((name.as_str().to_string(), value_text(value)?)))
            .collect();
        let transport_id = properties.message_id().as_ref().map(ShortString::as_str);
        let message_id = resolve_message_id(queue, transport_id, &mut headers, payload);
        Self {
            message_id,
            headers,
            delivery_count,
        }
    }
}

impl Shared {
    /// The confirm-mode publishing channel, reopened if the broker closed it.
    async fn publisher(&self) -> Result<Channel, QueueError> {
        let mut publisher = self.publisher.lock().await;
        if let Some(channel) = publisher.as_ref().filter(|ch| ch.status().connected()) {
            return Ok(channel.clone());
        }
        let channel = self
            .connection
            .create_channel()
            .await
            .map_err(broker_error)?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(broker_error)?;
        *publisher = Some(channel.clone());
        Ok(channel)
    }

    async fn channel(&self) -> Result<Channel, QueueError> {
        self.connection.create_channel().await.map_err(broker_error)
    }

    /// Publishes a persistent message to `queue` and waits for the broker's confirm.
    async fn publish(
        &self,
        queue: &str,
        message_id: &str,
        headers: &BTreeMap<String, String>,
        payload: &[u8],
    ) -> Result<(), QueueError> {
        let channel = self.publisher().await?;
        let properties = BasicProperties::default()
            .with_delivery_mode(PERSISTENT)
            .with_content_type("application/json".into())
            .with_message_id(message_id.into())
            .with_headers(to_field_table(headers));
        let options = BasicPublishOptions {
            mandatory: true,
            ..BasicPublishOptions::default()
        };
        let confirm = channel
            .basic_publish("".into(), queue.into(), options, payload, properties)
            .await
            .map_err(broker_error)?;
        let timeout = self.options.confirm_timeout;
        let confirmation = tokio::time::timeout(timeout, confirm)
            .await
            .map_err(|_| QueueError::ConfirmTimeout {
                backend: KIND,
                message_id: message_id.to_string(),
                timeout_ms: timeout.as_millis() as u64,
            })?
            .map_err(broker_error)?;
        match confirmation {
            LapinConfirmation::Nack(_) => Err(QueueError::PublishRefused {
                backend: KIND,
                message_id: message_id.to_string(),
                message: "the broker nacked it".into(),
            }),
            // Returned as unroutable: the default exchange found no queue of that name.
            LapinConfirmation::Ack(Some(_)) => Err(QueueError::NoSuchQueue(queue.to_string())),
            LapinConfirmation::Ack(None) => Ok(()),
            // The channel is in confirm mode, so this means the broker lost track of it.
            LapinConfirmation::NotRequested => Err(QueueError::PublishRefused {
                backend: KIND,
                message_id: message_id.to_string(),
                message: "the broker did not confirm it".into(),
            }),
        }
    }

    async fn declare_queue(
        &self,
        channel: &Channel,
        name: &str,
        arguments: FieldTable,
    ) -> Result<(), QueueError> {
        channel
            .queue_declare(name.into(), QueueDeclareOptions::durable(), arguments)
            .await
            .map(|_| ())
            .map_err(broker_error)
    }

    async fn declare_retry_queue(
        &self,
        channel: &Channel,
        queue: &str,
        delay: Duration,
    ) -> Result<String, QueueError> {
        let name = retry_queue_name(queue, delay);
        self.declare_queue(channel, &name, retry_arguments(queue, delay))
            .await?;
        self.known_retry_queues().insert(name.clone());
        Ok(name)
    }

    fn known_retry_queues(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.retry_queues
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The retry queue for `delay`, declared on first use by this process.
    async fn retry_queue(&self, queue: &str, delay: Duration) -> Result<String, QueueError> {
        let name = retry_queue_name(queue, delay);
        if self.known_retry_queues().contains(&name) {
            return Ok(name);
        }
        let channel = self.channel().await?;
        let declared = self.declare_retry_queue(&channel, queue, delay).await;
        let _ = channel.close(200, "OK".into()).await;
        declared
    }

    /// `(messages, consumers)` of `queue`, `None` if it does not exist. A passive declare of a
    /// missing queue closes its channel, hence a channel per question.
    async fn counts(&self, queue: &str) -> Result<Option<(u64, u64)>, QueueError> {
        let channel = self.channel().await?;
        let options = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        match channel
            .queue_declare(queue.into(), options, FieldTable::default())
            .await
        {
            Ok(declared) => {
                let _ = channel.close(200, "OK".into()).await;
                Ok(Some((
                    u64::from(declared.message_count()),
                    u64::from(declared.consumer_count()),
                )))
            }
            Err(err) if is_not_found(&err) => Ok(None),
            Err(err) => Err(broker_error(err)),
        }
    }
}

#[async_trait]
impl QueueBackend for AmqpBackend {
    fn kind(&self) -> BackendKind {
        KIND
    }

    async fn declare(&self, spec: &QueueSpec) -> Result<(), QueueError> {
        validate_queue_name(&spec.name)?;
        let shared = &self.shared;
        let channel = shared.channel().await?;
        shared
            .declare_queue(&channel, &spec.name, FieldTable::default())
            .await?;
        shared
            .declare_queue(&channel, &spec.dead_letter_queue(), FieldTable::default())
            .await?;
        for delay in retry_delays(spec) {
            shared
                .declare_retry_queue(&channel, &spec.name, delay)
                .await?;
        }
        let _ = channel.close(200, "OK".into()).await;
        Ok(())
    }

    async fn publish_validated(
        &self,
        spec: &QueueSpec,
        message: OutgoingMessage,
    ) -> Result<Confirmation, QueueError> {
        validate_queue_name(&spec.name)?;
        self.shared
            .publish(
                &spec.name,
                &message.message_id,
                &message.headers,
                &message.payload,
            )
            .await?;
        Ok(Confirmation {
            message_id: message.message_id,
            sequence: None,
        })
    }

    async fn open_stream(
        &self,
        spec: &QueueSpec,
        prefetch: u16,
    ) -> Result<Box<dyn DeliveryStream>, QueueError> {
        let channel = self.shared.channel().await?;
        channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await
            .map_err(broker_error)?;
        let consumer = channel
            .basic_consume(
                spec.name.as_str().into(),
                format!("{}-{}", self.shared.options.client_name, spec.name).into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|err| {
                if is_not_found(&err) {
                    QueueError::NoSuchQueue(spec.name.clone())
                } else {
                    broker_error(err)
                }
            })?;
        Ok(Box::new(AmqpStream {
            shared: self.shared.clone(),
            channel,
            consumer,
            spec: spec.clone(),
        }))
    }

    async fn list(&self, known: &[QueueSpec]) -> Result<Vec<QueueInfo>, QueueError> {
        let mut infos = Vec::new();
        for spec in known {
            if let Some((ready, consumers)) = self.shared.counts(&spec.name).await? {
                let mut delayed = 0;
                for delay in retry_delays(spec) {
                    let retry = retry_queue_name(&spec.name, delay);
                    if let Some((waiting, _)) = self.shared.counts(&retry).await? {
                        delayed += waiting;
                    }
                }
                infos.push(QueueInfo {
                    name: spec.name.clone(),
                    ready: Some(ready),
                    unacked: None,
                    delayed: Some(delayed),
                    consumers: Some(consumers),
                });
            }
            let dlq = spec.dead_letter_queue();
            if let Some((ready, consumers)) = self.shared.counts(&dlq).await? {
                infos.push(QueueInfo {
                    name: dlq,
                    ready: Some(ready),
                    unacked: None,
                    delayed: Some(0),
                    consumers: Some(consumers),
                });
            }
        }
        Ok(infos)
    }

    async fn peek(&self, queue: &str, limit: usize) -> Result<Vec<PeekedMessage>, QueueError> {
        let channel = self.shared.channel().await?;
        let mut peeked = Vec::new();
        while peeked.len() < limit {
            let got = channel
                .basic_get(queue.into(), BasicGetOptions { no_ack: false })
                .await;
            let message = match got {
                Ok(Some(message)) => message,
                Ok(None) => break,
                Err(err) if is_not_found(&err) => {
                    return Err(QueueError::NoSuchQueue(queue.to_string()));
                }
                Err(err) => return Err(broker_error(err)),
            };
            let received =
                Received::read(queue, &message.delivery.properties, &message.delivery.data);
            // The broker counts a message we already hold once more when it is given back.
            let returned = received.delivery_count.unwrap_or(0);
            peeked.push(PeekedMessage {
                message_id: received.message_id,
                deliveries: Some(wire_headers::deliveries_so_far(&received.headers, returned)),
                headers: received.headers,
                payload: String::from_utf8_lossy(&message.delivery.data).into_owned(),
            });
        }
        if !peeked.is_empty() {
            // Delivery tag 0 with `multiple` gives back every unacked message of the channel.
            channel
                .basic_nack(
                    0,
                    BasicNackOptions {
                        multiple: true,
                        requeue: true,
                    },
                )
                .await
                .map_err(broker_error)?;
        }
        let _ = channel.close(200, "OK".into()).await;
        Ok(peeked)
    }

    async fn redrive(&self, spec: &QueueSpec, limit: Option<u64>) -> Result<u64, QueueError> {
        let channel = self.shared.channel().await?;
        let dlq = spec.dead_letter_queue();
        let mut moved = 0;
        while limit.is_none_or(|limit| moved < limit) {
            let got = channel
                .basic_get(dlq.as_str().into(), BasicGetOptions { no_ack: false })
                .await;
            let message = match got {
                Ok(Some(message)) => message,
                Ok(None) => break,
                Err(err) if is_not_found(&err) => return Err(QueueError::NoSuchQueue(dlq)),
                Err(err) => return Err(broker_error(err)),
            };
            let received =
                Received::read(&dlq, &message.delivery.properties, &message.delivery.data);
            let headers = wire_headers::redrive_headers(&received.headers);
            // On failure the channel closes below and the dead letter stays where it was.
            self.shared
                .publish(
                    &spec.name,
                    &received.message_id,
                    &headers,
                    &message.delivery.data,
                )
                .await?;
            message
                .delivery
                .acker
                .ack(BasicAckOptions::default())
                .await
                .map_err(broker_error)?;
            moved += 1;
        }
        let _ = channel.close(200, "OK".into()).await;
        Ok(moved)
    }

    async fn delete(&self, spec: &QueueSpec) -> Result<(), QueueError> {
        let mut names = vec![spec.name.clone(), spec.dead_letter_queue()];
        names.extend(
            retry_delays(spec)
                .into_iter()
                .map(|delay| retry_queue_name(&spec.name, delay)),
        );
        {
            // Retry queues this process declared on demand for delays outside the policy.
            let prefix = format!("{}.retry.", spec.name);
            let mut known = self.shared.known_retry_queues();
            known.retain(|name| {
                if name.starts_with(&prefix) && !names.contains(name) {
                    names.push(name.clone());
                }
                !name.starts_with(&prefix)
            });
        }
        for name in names {
            let channel = self.shared.channel().await?;
            match channel
                .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
                .await
            {
                Ok(_) => {
                    let _ = channel.close(200, "OK".into()).await;
                }
                Err(err) if is_not_found(&err) => {}
                Err(err) => return Err(broker_error(err)),
            }
        }
        Ok(())
    }
}

/// One subscription: a channel of its own with a consumer. Each delivery keeps the channel open
/// (its acker needs it) until it is settled or dropped.
struct AmqpStream {
    shared: Arc<Shared>,
    channel: Channel,
    consumer: Consumer,
    spec: QueueSpec,
}

#[async_trait]
impl DeliveryStream for AmqpStream {
    async fn next(&mut self) -> Result<Delivery, QueueError> {
        let delivery = match self.consumer.next().await {
            Some(Ok(delivery)) => delivery,
            Some(Err(err)) => return Err(broker_error(err)),
            None => {
                return Err(QueueError::Disconnected {
                    backend: KIND,
                    message: format!("the broker cancelled the consumer of {}", self.spec.name),
                });
            }
        };
        let received = Received::read(&self.spec.name, &delivery.properties, &delivery.data);
        let returned = match received.delivery_count {
            Some(count) => count,
            None => u32::from(delivery.redelivered),
        };
        let attempt = wire_headers::recorded_attempt(&received.headers).saturating_add(returned);
        let payload = Bytes::from(delivery.data);
        let settle = AmqpSettle {
            shared: self.shared.clone(),
            _channel: self.channel.clone(),
            acker: delivery.acker,
            queue: self.spec.name.clone(),
            message_id: received.message_id.clone(),
            headers: received.headers.clone(),
            payload: payload.clone(),
        };
        Ok(Delivery::new(
            self.spec.name.clone(),
            received.message_id,
            payload,
            received.headers,
            attempt,
            delivery.redelivered || attempt > 1,
            self.spec.policy.clone(),
            Box::new(settle),
        ))
    }
}

struct AmqpSettle {
    shared: Arc<Shared>,
    /// Keeps the consumer's channel open while this delivery is unsettled.
    _channel: Channel,
    acker: Acker,
    queue: String,
    message_id: String,
    headers: BTreeMap<String, String>,
    payload: Bytes,
}

#[async_trait]
impl wire_headers::CopyThenAck for AmqpSettle {
    fn queue(&self) -> &str {
        &self.queue
    }

    fn headers(&self) -> &BTreeMap<String, String> {
        &self.headers
    }

    async fn publish_copy(
        &self,
        queue: &str,
        headers: &BTreeMap<String, String>,
    ) -> Result<(), QueueError> {
        self.shared
            .publish(queue, &self.message_id, headers, &self.payload)
            .await
    }

    async fn ack_original(&self) -> Result<(), QueueError> {
        let acked = self
            .acker
            .ack(BasicAckOptions::default())
            .await
            .map_err(broker_error)?;
        if acked {
            Ok(())
        } else {
            // The channel is gone: the broker gives the original back to the queue.
            Err(QueueError::Disconnected {
                backend: KIND,
                message: format!(
                    "the channel of {} closed before message {} was acked",
                    self.queue, self.message_id
                ),
            })
        }
    }

    async fn delayed_queue(
        &self,
        delay: Duration,
        _copy: &mut BTreeMap<String, String>,
    ) -> Result<String, QueueError> {
        self.shared.retry_queue(&self.queue, delay).await
    }
}
