//! The broker's gRPC API over TLS.
//!
//! Why gRPC with bidirectional streams: HTTP/2 gives per-stream flow control, so a slow consumer
//! pushes back on the broker without blocking other streams on the connection; TLS comes with
//! rustls and the local CA every other Causeway component already uses; and one long-lived stream
//! lets a publisher keep many messages in flight, each confirmed by correlation number as soon as
//! its group commit lands, instead of paying a round trip plus an fsync per message. Consumers
//! settle on the same stream their deliveries arrive on, so the broker knows which consumer a
//! delivery belongs to and returns its unsettled deliveries when the stream ends.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use causeway_client::grpc::limit::LimitRequests;
use causeway_core::queue_policy::QueuePolicy;
use causeway_core::serve::{KeepAlive, serve_http2, shutdown_channel};
use causeway_core::tls::CertPaths;
use causeway_proto::broker::v1 as pb;
use hyper::body::Incoming;
use hyper_util::service::TowerToHyperService;
use pb::broker_server::{Broker as BrokerApi, BrokerServer};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::service::Routes;
use tonic::transport::server::TcpConnectInfo;
use tonic::{Request, Response, Status, Streaming};
use tower::ServiceExt;

use crate::{Broker, BrokerError, ConsumerEvent, SettleAction};

/// The largest request the server decodes (a message with its headers); payload limits per
/// queue are lower.
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;
/// Publishes one stream may have waiting for their commit before the server stops reading it.
const MAX_IN_FLIGHT_PER_STREAM: usize = 4096;
/// How long calls in flight may finish after shutdown before the server closes them.
const DRAIN: Duration = Duration::from_secs(2);

struct Service {
    broker: Broker,
    stopping: watch::Receiver<bool>,
}

fn policy_from_proto(policy: Option<pb::QueuePolicy>) -> QueuePolicy {
    let defaults = QueuePolicy::default();
    let Some(policy) = policy else {
        return defaults;
    };
    QueuePolicy {
        max_attempts: policy.max_attempts,
        initial_backoff_ms: policy.initial_backoff_ms,
        max_backoff_ms: policy.max_backoff_ms,
        max_payload_bytes: usize::try_from(policy.max_payload_bytes).unwrap_or(usize::MAX),
    }
}

fn operation_error(err: &BrokerError) -> pb::OperationError {
    let status = err.to_status();
    pb::OperationError {
        code: status.code() as i32,
        message: status.message().to_string(),
    }
}

async fn stopped(stopping: &mut watch::Receiver<bool>) {
    if stopping.wait_for(|stop| *stop).await.is_err() {
        std::future::pending::<()>().await;
    }
}

fn settle_action(command: pb::settle_command::Action) -> SettleAction {
    use pb::settle_command::Action;
    match command {
        Action::Ack(_) => SettleAction::Ack,
        Action::Redeliver(redeliver) => SettleAction::Redeliver {
            delay: Duration::from_millis(redeliver.delay_ms),
            next_attempt: redeliver.next_attempt,
        },
        Action::DeadLetter(dead_letter) => SettleAction::DeadLetter {
            reason: dead_letter.reason,
            attempts: dead_letter.attempts,
        },
    }
}

#[tonic::async_trait]
impl BrokerApi for Service {
    async fn declare(
        &self,
        request: Request<pb::DeclareRequest>,
    ) -> Result<Response<pb::DeclareResponse>, Status> {
        let request = request.into_inner();
        self.broker
            .declare(&request.queue, policy_from_proto(request.policy))
            .await
            .map_err(|err| err.to_status())?;
        Ok(Response::new(pb::DeclareResponse {}))
    }

    async fn list_queues(
        &self,
        _request: Request<pb::ListQueuesRequest>,
    ) -> Result<Response<pb::ListQueuesResponse>, Status> {
        let queues = self
            .broker
            .list()
            .into_iter()
            .map(|queue| pb::QueueStats {
                name: queue.name,
                ready: queue.ready,
                unacked: queue.unacked,
                delayed: queue.delayed,
                consumers: queue.consumers,
            })
            .collect();
        Ok(Response::new(pb::ListQueuesResponse { queues }))
    }

    async fn peek(
        &self,
        request: Request<pb::PeekRequest>,
    ) -> Result<Response<pb::PeekResponse>, Status> {
        let request = request.into_inner();
        let messages = self
            .broker
            .peek(&request.queue, request.limit as usize)
            .map_err(|err| err.to_status())?;
        Ok(Response::new(pb::PeekResponse { messages }))
    }

    async fn redrive(
        &self,
        request: Request<pb::RedriveRequest>,
    ) -> Result<Response<pb::RedriveResponse>, Status> {
        let request = request.into_inner();
        let moved = self
            .broker
            .redrive(&request.queue, request.limit)
            .await
            .map_err(|err| err.to_status())?;
        Ok(Response::new(pb::RedriveResponse { moved }))
    }

    async fn delete(
        &self,
        request: Request<pb::DeleteRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        self.broker
            .delete(&request.into_inner().queue)
            .await
            .map_err(|err| err.to_status())?;
        Ok(Response::new(pb::DeleteResponse {}))
    }

    type PublishStream = UnboundedReceiverStream<Result<pb::PublishConfirm, Status>>;

    async fn publish(
        &self,
        request: Request<Streaming<pb::PublishRequest>>,
    ) -> Result<Response<Self::PublishStream>, Status> {
        let peer = request.remote_addr();
        let mut inbound = request.into_inner();
        let (confirms, receiver) = mpsc::unbounded_channel();
        let broker = self.broker.clone();
        let mut stopping = self.stopping.clone();
        let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT_PER_STREAM));
        tracing::info!(event = "broker.publisher_connected", peer = ?peer, "publish stream opened");
        tokio::spawn(async move {
            loop {
                let Ok(permit) = in_flight.clone().acquire_owned().await else {
                    break;
                };
                let next = tokio::select! {
                    next = inbound.message() => next,
                    _ = stopped(&mut stopping) => {
                        let _ = confirms.send(Err(Status::unavailable("the broker is shutting down")));
                        break;
                    }
                };
                let request = match next {
                    Ok(Some(request)) => request,
                    Ok(None) => break,
                    Err(status) => {
                        tracing::debug!(event = "broker.publish_stream_error", peer = ?peer, %status);
                        break;
                    }
                };
                let correlation = request.correlation;
                let confirm = move |result: Result<u64, BrokerError>| pb::PublishConfirm {
                    correlation,
                    result: Some(match result {
                        Ok(sequence) => pb::publish_confirm::Result::Sequence(sequence),
                        Err(err) => pb::publish_confirm::Result::Error(operation_error(&err)),
                    }),
                };
                match broker.begin_publish(
                    &request.queue,
                    request.message_id,
                    request.headers,
                    request.payload,
                ) {
                    Ok(pending) => {
                        let confirms = confirms.clone();
                        tokio::spawn(async move {
                            let _ = confirms.send(Ok(confirm(pending.wait().await)));
                            drop(permit);
                        });
                    }
                    Err(err) => {
                        let _ = confirms.send(Ok(confirm(Err(err))));
                    }
                }
            }
            tracing::info!(event = "broker.publisher_disconnected", peer = ?peer, "publish stream closed");
        });
        Ok(Response::new(UnboundedReceiverStream::new(receiver)))
    }

    type ConsumeStream = UnboundedReceiverStream<Result<pb::ConsumeResponse, Status>>;

    async fn consume(
        &self,
        request: Request<Streaming<pb::ConsumeRequest>>,
    ) -> Result<Response<Self::ConsumeStream>, Status> {
        let peer = request.remote_addr();
        let mut inbound = request.into_inner();
        let subscribe = match inbound.message().await? {
            Some(pb::ConsumeRequest {
                command: Some(pb::consume_request::Command::Subscribe(subscribe)),
            }) => subscribe,
            _ => {
                return Err(Status::invalid_argument(
                    "the first message of a Consume stream must be a subscribe",
                ));
            }
        };
        let mut consumer = self
            .broker
            .subscribe(&subscribe.queue, subscribe.prefetch)
            .map_err(|err| err.to_status())?;
        tracing::info!(
            event = "broker.consumer_connected",
            peer = ?peer,
            queue = %subscribe.queue,
            consumer = consumer.id(),
            prefetch = subscribe.prefetch,
            "consume stream opened"
        );
        let (outbound, receiver) = mpsc::unbounded_channel();
        let mut stopping = self.stopping.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    event = consumer.next() => match event {
                        ConsumerEvent::Delivery(delivered) => {
                            let message = delivered.message;
                            let delivery = pb::Delivery {
                                tag: delivered.tag,
                                message_id: message.message_id,
                                headers: message.headers,
                                payload: message.payload,
                                attempt: message.deliveries,
                                redelivered: delivered.redelivered,
                            };
                            let event = pb::consume_response::Event::Delivery(delivery);
                            if outbound.send(Ok(pb::ConsumeResponse { event: Some(event) })).is_err() {
                                break;
                            }
                        }
                        ConsumerEvent::Closed(err) => {
                            let _ = outbound.send(Err(err.to_status()));
                            break;
                        }
                    },
                    command = inbound.message() => {
                        let Ok(Some(command)) = command else { break };
                        let Some(pb::consume_request::Command::Settle(settle)) = command.command else {
                            let _ = outbound.send(Err(Status::invalid_argument("expected a settle command")));
                            break;
                        };
                        let tag = settle.tag;
                        let settled = move |result: Result<(), BrokerError>| pb::ConsumeResponse {
                            event: Some(pb::consume_response::Event::Settled(pb::Settled {
                                tag,
                                error: result.err().as_ref().map(operation_error),
                            })),
                        };
                        let Some(action) = settle.action else {
                            let err = BrokerError::InvalidMessage("a settle command without an action".into());
                            let _ = outbound.send(Ok(settled(Err(err))));
                            continue;
                        };
                        match consumer.settle(tag, settle_action(action)) {
                            Ok(pending) => {
                                let outbound = outbound.clone();
                                tokio::spawn(async move {
                                    let _ = outbound.send(Ok(settled(pending.wait().await)));
                                });
                            }
                            Err(err) => {
                                let _ = outbound.send(Ok(settled(Err(err))));
                            }
                        }
                    }
                    _ = stopped(&mut stopping) => {
                        let _ = outbound.send(Err(Status::unavailable("the broker is shutting down")));
                        break;
                    }
                    _ = outbound.closed() => break,
                }
            }
            tracing::info!(
                event = "broker.consumer_disconnected",
                peer = ?peer,
                queue = %consumer.queue(),
                consumer = consumer.id(),
                "consume stream closed"
            );
            // Dropping the consumer returns its unsettled deliveries to the queue.
        });
        Ok(Response::new(UnboundedReceiverStream::new(receiver)))
    }
}

/// Serves `causeway.broker.v1.Broker` and `grpc.health.v1` over TLS (HTTP/2 only) on `listener`
/// until `shutdown` resolves; then reports NOT_SERVING, ends open streams with `UNAVAILABLE`, and
/// lets unary calls in flight finish for up to two seconds. The broker stays open (close it with
/// [`Broker::close`]).
///
/// Served by `causeway_core`'s HTTP/2 loop, like every other Causeway server (the same accept
/// loop, TLS handshake timeout, keep-alive and drain), rather than tonic's transport server.
pub async fn serve(
    broker: Broker,
    listener: TcpListener,
    certs: &CertPaths,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), BrokerError> {
    let tls = TlsAcceptor::from(
        causeway_core::tls::grpc_server_config(certs).map_err(BrokerError::ServerTls)?,
    );
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<BrokerServer<Service>>().await;
    let (stop_streams, stopping) = watch::channel(false);
    let service = BrokerServer::new(Service { broker, stopping })
        .max_decoding_message_size(MAX_MESSAGE_BYTES);
    let routes = Routes::new(health_service).add_service(service).prepare();
    let addr = listener.local_addr().map_err(BrokerError::Bind)?;
    let (stop_serving, serving_stopped) = shutdown_channel();
    let signal = async move {
        shutdown.await;
        health.set_not_serving::<BrokerServer<Service>>().await;
        let _ = stop_streams.send(true);
        stop_serving.fire();
    };
    tracing::info!(event = "broker.listening", %addr, "broker gRPC server listening (TLS, HTTP/2)");
    let server = serve_http2(
        listener,
        Some(tls),
        move |peer| {
            tracing::debug!(event = "broker.connection", %peer, "TCP connection accepted");
            // Where tonic's `Request::remote_addr` looks for the peer, so that the stream logs
            // name the publisher or consumer.
            let connection = TcpConnectInfo {
                local_addr: Some(addr),
                remote_addr: Some(peer),
            };
            // A request message over the limit is RESOURCE_EXHAUSTED (tonic's own limit, the
            // same size, would say OUT_OF_RANGE).
            let routes = LimitRequests::new(routes.clone(), MAX_MESSAGE_BYTES);
            TowerToHyperService::new(routes.map_request(
                move |mut request: http::Request<Incoming>| {
                    request.extensions_mut().insert(connection.clone());
                    request
                },
            ))
        },
        serving_stopped,
        DRAIN,
        KeepAlive::default(),
    );
    tokio::join!(signal, server);
    Ok(())
}
