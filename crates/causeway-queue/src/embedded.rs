//! The backend for Causeway's embedded broker (`causeway-broker`): gRPC over TLS.
//!
//! Publishing shares one long-lived `Publish` stream per backend: each publish sends its message
//! with a fresh correlation number and waits for the confirm carrying that number, so many
//! publishes are in flight on one stream and share the broker's group commits. If the stream
//! breaks, the publishes waiting on it fail with [`QueueError::Disconnected`] (they may or may
//! not have been committed: callers retry, which is at-least-once) and the next publish opens a
//! new stream. Each subscription is one `Consume` stream; a delivery's settle sends its command on
//! that stream and returns once the broker answers that it has durably recorded it.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use causeway_core::telemetry::error_chain;
use causeway_proto::broker::v1 as pb;
use pb::broker_client::BrokerClient;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Status};

use crate::message::resolve_message_id;
use crate::{
    BackendKind, BrokerTarget, Confirmation, ConnectOptions, Delivery, DeliveryStream,
    OutgoingMessage, PeekedMessage, QueueBackend, QueueError, QueueInfo, QueuePolicy, QueueSpec,
    Settle, validate_queue_name,
};

const KIND: BackendKind = BackendKind::Embedded;
/// The largest message the client encodes or decodes; the broker's limit is the same.
const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// Waiters by correlation number or delivery tag; `None` once the stream is gone, so that a
/// waiter registered after the stream broke fails at once instead of timing out.
type Waiters<T> = Arc<Mutex<Option<HashMap<u64, oneshot::Sender<T>>>>>;

fn register<T>(waiters: &Waiters<T>, key: u64) -> Option<oneshot::Receiver<T>> {
    let (sender, receiver) = oneshot::channel();
    let mut guard = waiters
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    guard.as_mut()?.insert(key, sender);
    Some(receiver)
}

fn take_waiter<T>(waiters: &Waiters<T>, key: u64) -> Option<oneshot::Sender<T>> {
    let mut guard = waiters
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    guard.as_mut()?.remove(&key)
}

/// Marks the stream gone and returns the waiters left.
fn close_waiters<T>(waiters: &Waiters<T>) -> Vec<oneshot::Sender<T>> {
    let mut guard = waiters
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    guard
        .take()
        .map(|map| map.into_values().collect())
        .unwrap_or_default()
}

fn disconnected(message: impl Into<String>) -> QueueError {
    QueueError::Disconnected {
        backend: KIND,
        message: message.into(),
    }
}

/// A failed call, as the caller sees it; `queue` names the queue the call was about.
fn from_status(status: &Status, queue: &str) -> QueueError {
    match status.code() {
        Code::NotFound => QueueError::NoSuchQueue(queue.to_string()),
        Code::Unavailable | Code::Cancelled | Code::Unknown | Code::Aborted => {
            disconnected(status.message())
        }
        _ => QueueError::Broker {
            backend: KIND,
            message: format!("{:?}: {}", status.code(), status.message()),
        },
    }
}

fn from_operation_error(error: pb::OperationError, queue: &str) -> QueueError {
    from_status(
        &Status::new(Code::from_i32(error.code), error.message),
        queue,
    )
}

/// One `Publish` stream and the publishes waiting for its confirms.
struct PublishStream {
    requests: mpsc::UnboundedSender<pb::PublishRequest>,
    waiters: Waiters<Result<u64, pb::OperationError>>,
}

impl PublishStream {
    fn is_open(&self) -> bool {
        !self.requests.is_closed()
            && self
                .waiters
                .lock()
                .map(|guard| guard.is_some())
                .unwrap_or(false)
    }
}

/// A connection to the embedded broker.
pub struct EmbeddedBackend {
    client: BrokerClient<Channel>,
    target: String,
    client_name: String,
    connect_timeout: Duration,
    confirm_timeout: Duration,
    publisher: tokio::sync::Mutex<Option<Arc<PublishStream>>>,
    correlation: AtomicU64,
}

impl EmbeddedBackend {
    /// Connects over TLS, trusting only `options.ca_cert` and expecting the broker's certificate
    /// to name `options.server_name`.
    pub async fn connect(
        target: &BrokerTarget,
        options: &ConnectOptions,
    ) -> Result<Self, QueueError> {
        let connect_error = |message: String| QueueError::Connect {
            backend: KIND,
            target: target.display(),
            message,
        };
        let BrokerTarget::Embedded { host, port } = target else {
            return Err(connect_error("not a causeway:// URL".into()));
        };
        let ca_path = options.ca_cert.as_ref().ok_or_else(|| {
            connect_error("the embedded broker needs ConnectOptions::ca_cert (the local CA)".into())
        })?;
        let ca = tokio::fs::read(ca_path).await.map_err(|err| {
            connect_error(format!(
                "cannot read the CA certificate {}: {err}",
                ca_path.display()
            ))
        })?;
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(ca))
            .domain_name(options.server_name.clone());
        let authority = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        let endpoint = Endpoint::from_shared(format!("https://{authority}"))
            .map_err(|err| connect_error(err.to_string()))?
            .connect_timeout(options.connect_timeout)
            .tcp_nodelay(true)
            // Notices a broker that vanished without closing the connection.
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5))
            .tls_config(tls)
            .map_err(|err| connect_error(format!("invalid TLS configuration: {err}")))?;
        let channel = tokio::time::timeout(options.connect_timeout, endpoint.connect())
            .await
            .map_err(|_| {
                connect_error(format!(
                    "no connection within {:?}",
                    options.connect_timeout
                ))
            })?
            .map_err(|err| connect_error(error_chain(&err)))?;
        tracing::info!(
            event = "queue.connected",
            backend = %KIND,
            target = %target,
            client = %options.client_name,
            "connected to the embedded broker"
        );
        Ok(Self {
            client: BrokerClient::new(channel)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
            target: target.display(),
            client_name: options.client_name.clone(),
            connect_timeout: options.connect_timeout,
            confirm_timeout: options.confirm_timeout,
            publisher: tokio::sync::Mutex::new(None),
            correlation: AtomicU64::new(1),
        })
    }

    /// The open publish stream, or a new one if there is none or it broke.
    async fn publish_stream(&self) -> Result<Arc<PublishStream>, QueueError> {
        let mut publisher = self.publisher.lock().await;
        if let Some(stream) = publisher.as_ref().filter(|stream| stream.is_open()) {
            return Ok(stream.clone());
        }
        let (requests, receiver) = mpsc::unbounded_channel();
        let mut client = self.client.clone();
        let call = client.publish(UnboundedReceiverStream::new(receiver));
        let mut confirms = tokio::time::timeout(self.connect_timeout, call)
            .await
            .map_err(|_| {
                disconnected(format!(
                    "no publish stream within {:?}",
                    self.connect_timeout
                ))
            })?
            .map_err(|status| {
                disconnected(format!(
                    "cannot open a publish stream: {}",
                    status.message()
                ))
            })?
            .into_inner();
        let stream = Arc::new(PublishStream {
            requests,
            waiters: Arc::new(Mutex::new(Some(HashMap::new()))),
        });
        let waiters = stream.waiters.clone();
        let target = self.target.clone();
        tokio::spawn(async move {
            let why = loop {
                match confirms.message().await {
                    Ok(Some(confirm)) => {
                        let result = match confirm.result {
                            Some(pb::publish_confirm::Result::Sequence(sequence)) => Ok(sequence),
                            Some(pb::publish_confirm::Result::Error(error)) => Err(error),
                            None => Err(pb::OperationError {
                                code: Code::Internal as i32,
                                message: "a confirm without a result".into(),
                            }),
                        };
                        if let Some(waiter) = take_waiter(&waiters, confirm.correlation) {
                            let _ = waiter.send(result);
                        }
                    }
                    Ok(None) => break "the broker ended the publish stream".to_string(),
                    Err(status) => break status.message().to_string(),
                }
            };
            let lost = close_waiters(&waiters);
            if !lost.is_empty() {
                tracing::warn!(
                    event = "queue.publish_stream_lost",
                    backend = %KIND,
                    target = %target,
                    unconfirmed = lost.len(),
                    reason = %why,
                    "publish stream broke; unconfirmed publishes fail and may be retried"
                );
            }
            // Dropping the senders tells each waiter the stream is gone.
        });
        *publisher = Some(stream.clone());
        Ok(stream)
    }

    async fn call<T>(
        &self,
        queue: &str,
        call: impl std::future::Future<Output = Result<tonic::Response<T>, Status>>,
    ) -> Result<T, QueueError> {
        call.await
            .map(tonic::Response::into_inner)
            .map_err(|status| from_status(&status, queue))
    }
}

fn policy_to_proto(policy: &QueuePolicy) -> pb::QueuePolicy {
    pb::QueuePolicy {
        max_attempts: policy.max_attempts,
        initial_backoff_ms: policy.initial_backoff_ms,
        max_backoff_ms: policy.max_backoff_ms,
        max_payload_bytes: policy.max_payload_bytes as u64,
    }
}

#[async_trait]
impl QueueBackend for EmbeddedBackend {
    fn kind(&self) -> BackendKind {
        KIND
    }

    async fn declare(&self, spec: &QueueSpec) -> Result<(), QueueError> {
        validate_queue_name(&spec.name)?;
        validate_queue_name(&spec.dead_letter_queue())?;
        let request = pb::DeclareRequest {
            queue: spec.name.clone(),
            policy: Some(policy_to_proto(&spec.policy)),
        };
        self.call(&spec.name, self.client.clone().declare(request))
            .await
            .map(|_| ())
    }

    async fn publish_validated(
        &self,
        spec: &QueueSpec,
        message: OutgoingMessage,
    ) -> Result<Confirmation, QueueError> {
        validate_queue_name(&spec.name)?;
        let stream = self.publish_stream().await?;
        let correlation = self.correlation.fetch_add(1, Ordering::Relaxed);
        let Some(confirmed) = register(&stream.waiters, correlation) else {
            return Err(disconnected("the publish stream broke"));
        };
        let message_id = message.message_id;
        let request = pb::PublishRequest {
            correlation,
            queue: spec.name.clone(),
            message_id: message_id.clone(),
            headers: message.headers.into_iter().collect(),
            payload: message.payload,
        };
        if stream.requests.send(request).is_err() {
            take_waiter(&stream.waiters, correlation);
            return Err(disconnected("the publish stream broke"));
        }
        match tokio::time::timeout(self.confirm_timeout, confirmed).await {
            Err(_) => {
                take_waiter(&stream.waiters, correlation);
                Err(QueueError::ConfirmTimeout {
                    backend: KIND,
                    message_id,
                    timeout_ms: self.confirm_timeout.as_millis() as u64,
                })
            }
            Ok(Err(_)) => Err(disconnected(format!(
                "the publish stream broke before message {message_id} was confirmed"
            ))),
            Ok(Ok(Ok(sequence))) => Ok(Confirmation {
                message_id,
                sequence: Some(sequence),
            }),
            Ok(Ok(Err(error))) => Err(match from_operation_error(error, &spec.name) {
                QueueError::Broker { message, .. } => QueueError::PublishRefused {
                    backend: KIND,
                    message_id,
                    message,
                },
                other => other,
            }),
        }
    }

    async fn open_stream(
        &self,
        spec: &QueueSpec,
        prefetch: u16,
    ) -> Result<Box<dyn DeliveryStream>, QueueError> {
        let (commands, receiver) = mpsc::unbounded_channel();
        let subscribe = pb::consume_request::Command::Subscribe(pb::Subscribe {
            queue: spec.name.clone(),
            prefetch: u32::from(prefetch),
        });
        let _ = commands.send(pb::ConsumeRequest {
            command: Some(subscribe),
        });
        // Dropping the stream ends the request side even while deliveries (holding `commands`)
        // live on, so that the broker returns what was not settled; commands already queued
        // (acks, which nobody awaits) are sent first.
        let (cancel, cancelled) = oneshot::channel::<()>();
        let requests = drain_then_end(receiver, cancelled);
        let mut client = self.client.clone();
        let mut inbound = tokio::time::timeout(self.connect_timeout, client.consume(requests))
            .await
            .map_err(|_| {
                disconnected(format!(
                    "no consume stream within {:?}",
                    self.connect_timeout
                ))
            })?
            .map_err(|status| from_status(&status, &spec.name))?
            .into_inner();
        let settles: Waiters<Result<(), QueueError>> = Arc::new(Mutex::new(Some(HashMap::new())));
        let (deliveries, delivered) = mpsc::unbounded_channel();
        let queue = spec.name.clone();
        let reader_settles = settles.clone();
        tokio::spawn(async move {
            let end = loop {
                match inbound.message().await {
                    Ok(Some(pb::ConsumeResponse { event: Some(event) })) => match event {
                        pb::consume_response::Event::Delivery(delivery) => {
                            let _ = deliveries.send(Ok(delivery));
                        }
                        pb::consume_response::Event::Settled(settled) => {
                            let result = match settled.error {
                                None => Ok(()),
                                Some(error) => Err(from_operation_error(error, &queue)),
                            };
                            match take_waiter(&reader_settles, settled.tag) {
                                Some(waiter) => {
                                    let _ = waiter.send(result);
                                }
                                // An ack nobody waits for (see `EmbeddedSettle::ack`).
                                None => {
                                    if let Err(err) = result {
                                        tracing::warn!(
                                            event = "queue.ack_failed",
                                            queue = %queue,
                                            tag = settled.tag,
                                            error = %err,
                                            "the broker did not record an ack; the message will be delivered again"
                                        );
                                    }
                                }
                            }
                        }
                    },
                    Ok(Some(_)) => {}
                    Ok(None) => break disconnected("the broker ended the subscription"),
                    Err(status) => break from_status(&status, &queue),
                }
            };
            close_waiters(&reader_settles);
            let _ = deliveries.send(Err(end));
        });
        tracing::info!(
            event = "queue.subscribed",
            backend = %KIND,
            queue = %spec.name,
            prefetch,
            client = %self.client_name,
            "subscribed"
        );
        Ok(Box::new(EmbeddedStream {
            spec: spec.clone(),
            delivered,
            commands,
            settles,
            confirm_timeout: self.confirm_timeout,
            _cancel: cancel,
        }))
    }

    async fn list(&self, _known: &[QueueSpec]) -> Result<Vec<QueueInfo>, QueueError> {
        let response = self
            .call(
                "",
                self.client.clone().list_queues(pb::ListQueuesRequest {}),
            )
            .await?;
        Ok(response
            .queues
            .into_iter()
            .map(|queue| QueueInfo {
                name: queue.name,
                ready: Some(queue.ready),
                unacked: Some(queue.unacked),
                delayed: Some(queue.delayed),
                consumers: Some(queue.consumers),
            })
            .collect())
    }

    async fn peek(&self, queue: &str, limit: usize) -> Result<Vec<PeekedMessage>, QueueError> {
        validate_queue_name(queue)?;
        let request = pb::PeekRequest {
            queue: queue.to_string(),
            limit: u32::try_from(limit).unwrap_or(u32::MAX),
        };
        let response = self.call(queue, self.client.clone().peek(request)).await?;
        Ok(response
            .messages
            .into_iter()
            .map(|message| {
                let mut headers = message.headers.into_iter().collect();
                let message_id = resolve_message_id(
                    queue,
                    Some(&message.message_id),
                    &mut headers,
                    &message.payload,
                );
                PeekedMessage {
                    message_id,
                    deliveries: Some(message.deliveries),
                    headers,
                    payload: String::from_utf8_lossy(&message.payload).into_owned(),
                }
            })
            .collect())
    }

    async fn redrive(&self, spec: &QueueSpec, limit: Option<u64>) -> Result<u64, QueueError> {
        validate_queue_name(&spec.name)?;
        let request = pb::RedriveRequest {
            queue: spec.name.clone(),
            limit,
        };
        let response = self
            .call(&spec.name, self.client.clone().redrive(request))
            .await?;
        Ok(response.moved)
    }

    async fn delete(&self, spec: &QueueSpec) -> Result<(), QueueError> {
        validate_queue_name(&spec.name)?;
        let request = pb::DeleteRequest {
            queue: spec.name.clone(),
        };
        self.call(&spec.name, self.client.clone().delete(request))
            .await
            .map(|_| ())
    }
}

/// The commands of `receiver` until `cancelled` fires, then those already queued, then the end.
fn drain_then_end(
    receiver: mpsc::UnboundedReceiver<pb::ConsumeRequest>,
    cancelled: oneshot::Receiver<()>,
) -> impl futures_util::Stream<Item = pb::ConsumeRequest> + Send + 'static {
    futures_util::stream::unfold(
        (receiver, Some(cancelled)),
        |(mut receiver, mut cancelled)| async move {
            loop {
                let Some(until) = cancelled.as_mut() else {
                    let next = receiver.try_recv().ok()?;
                    return Some((next, (receiver, None)));
                };
                tokio::select! {
                    biased;
                    next = receiver.recv() => return next.map(|next| (next, (receiver, cancelled))),
                    _ = until => cancelled = None,
                }
            }
        },
    )
}

/// One subscription's deliveries.
struct EmbeddedStream {
    spec: QueueSpec,
    delivered: mpsc::UnboundedReceiver<Result<pb::Delivery, QueueError>>,
    commands: mpsc::UnboundedSender<pb::ConsumeRequest>,
    settles: Waiters<Result<(), QueueError>>,
    confirm_timeout: Duration,
    _cancel: oneshot::Sender<()>,
}

#[async_trait]
impl DeliveryStream for EmbeddedStream {
    async fn next(&mut self) -> Result<Delivery, QueueError> {
        let delivery = match self.delivered.recv().await {
            Some(result) => result?,
            None => return Err(disconnected("the subscription is over")),
        };
        let settle = EmbeddedSettle {
            tag: delivery.tag,
            commands: self.commands.clone(),
            settles: self.settles.clone(),
            timeout: self.confirm_timeout,
        };
        // The broker gives every message an id (a content id if it came without one); resolving
        // here too keeps the rule in one place should an empty id ever arrive.
        let mut headers = delivery.headers.into_iter().collect::<BTreeMap<_, _>>();
        let message_id = resolve_message_id(
            &self.spec.name,
            Some(&delivery.message_id),
            &mut headers,
            &delivery.payload,
        );
        Ok(Delivery::new(
            self.spec.name.clone(),
            message_id,
            delivery.payload,
            headers,
            delivery.attempt,
            delivery.redelivered,
            self.spec.policy.clone(),
            Box::new(settle),
        ))
    }
}

/// Settles one delivery on its subscription's stream.
struct EmbeddedSettle {
    tag: u64,
    commands: mpsc::UnboundedSender<pb::ConsumeRequest>,
    settles: Waiters<Result<(), QueueError>>,
    timeout: Duration,
}

impl EmbeddedSettle {
    async fn send(self, action: pb::settle_command::Action) -> Result<(), QueueError> {
        let lost = || disconnected("the subscription ended before the settlement was recorded");
        let settled = register(&self.settles, self.tag).ok_or_else(lost)?;
        let command = pb::ConsumeRequest {
            command: Some(pb::consume_request::Command::Settle(pb::SettleCommand {
                tag: self.tag,
                action: Some(action),
            })),
        };
        if self.commands.send(command).is_err() {
            take_waiter(&self.settles, self.tag);
            return Err(lost());
        }
        match tokio::time::timeout(self.timeout, settled).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(lost()),
            Err(_) => {
                take_waiter(&self.settles, self.tag);
                Err(disconnected(format!(
                    "the broker did not record the settlement within {:?}",
                    self.timeout
                )))
            }
        }
    }
}

#[async_trait]
impl Settle for EmbeddedSettle {
    /// Sends the ack without waiting for the broker's commit, as AMQP's `basic.ack` does: a
    /// consumer that awaited each ack could settle only one message per commit. An ack lost to a
    /// crash costs a duplicate delivery, never a message (delivery is at least once anyway).
    async fn ack(self: Box<Self>) -> Result<(), QueueError> {
        let command = pb::ConsumeRequest {
            command: Some(pb::consume_request::Command::Settle(pb::SettleCommand {
                tag: self.tag,
                action: Some(pb::settle_command::Action::Ack(pb::Ack {})),
            })),
        };
        self.commands.send(command).map_err(|_| {
            disconnected("the subscription ended before the ack was sent; the message will be delivered again")
        })
    }

    async fn redeliver(
        self: Box<Self>,
        delay: Duration,
        next_attempt: u32,
    ) -> Result<(), QueueError> {
        self.send(pb::settle_command::Action::Redeliver(pb::Redeliver {
            delay_ms: delay.as_millis() as u64,
            next_attempt,
        }))
        .await
    }

    async fn dead_letter(self: Box<Self>, reason: &str, attempts: u32) -> Result<(), QueueError> {
        self.send(pb::settle_command::Action::DeadLetter(pb::DeadLetter {
            reason: reason.to_string(),
            attempts,
        }))
        .await
    }
}
