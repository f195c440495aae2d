//! [`GrpcChannel`]: the transport under a [`GrpcBalancer`](super::GrpcBalancer)'s generated
//! clients. Every request picks an instance (the less busy of two chosen at random, by requests
//! in flight) and goes over that instance's HTTP/2-over-TLS connection from the client library's
//! [`Connections`], whose writes are coalesced (a unary call leaves in one TLS record, see
//! [`crate::coalesce`]).
//!
//! tonic's own balanced `Channel` is not used because its connections cannot take a custom
//! connector, and its request buffer adds a hand-off to a worker task on every call; this
//! transport sends from the caller's task.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::uri::{Authority, Scheme};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming};
use sync_wrapper::SyncWrapper;
use tokio::sync::watch;
use tonic::Status;

use crate::connection::Connections;
use crate::discovery::Endpoint;

use super::limit::{DEFAULT_MAX_MESSAGE_BYTES, LimitedBody};
use super::parse_grpc_timeout;

/// An instance in rotation, with the requests now in flight to it.
#[derive(Debug)]
pub(super) struct Member {
    pub endpoint: Endpoint,
    in_flight: AtomicUsize,
}

impl Member {
    pub fn new(endpoint: Endpoint) -> Arc<Self> {
        Arc::new(Self {
            endpoint,
            in_flight: AtomicUsize::new(0),
        })
    }
}

/// The instances in rotation, and how many refreshes (and probing refreshes) produced it.
#[derive(Clone, Debug, Default)]
pub(super) struct Snapshot {
    pub members: Vec<Arc<Member>>,
    pub refreshes: u64,
    pub probes: u64,
}

/// A balanced gRPC transport to every instance in a [`GrpcBalancer`](super::GrpcBalancer)'s
/// rotation; cheap to clone. Generated clients take it like a tonic `Channel`
/// (`PricingServiceClient::new(balancer.channel())`). A request's `grpc-timeout` bounds the wait
/// for its response headers, answered as `DEADLINE_EXCEEDED`; a connection that cannot be opened
/// or breaks is `UNAVAILABLE`.
#[derive(Clone)]
pub struct GrpcChannel {
    inner: Arc<ChannelInner>,
    /// The largest response message accepted, see [`with_max_decoding_message_size`](Self::with_max_decoding_message_size).
    max_response_message: usize,
}

struct ChannelInner {
    service: String,
    authority: Authority,
    connections: Connections,
    rotation: watch::Receiver<Snapshot>,
    /// Drives the random choice of two instances.
    picks: AtomicU64,
}

impl std::fmt::Debug for GrpcChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcChannel")
            .field("service", &self.inner.service)
            .field("authority", &self.inner.authority)
            .finish_non_exhaustive()
    }
}

impl GrpcChannel {
    /// A channel to `service`'s instances in `rotation`, each verified as `server_name`.
    pub(super) fn new(
        service: &str,
        server_name: &str,
        tls: Arc<rustls::ClientConfig>,
        connect_timeout: Duration,
        rotation: watch::Receiver<Snapshot>,
    ) -> Result<Self, super::GrpcClientError> {
        let authority = server_name
            .parse()
            .map_err(|_| super::GrpcClientError::BadName {
                name: server_name.to_string(),
            })?;
        Ok(Self {
            inner: Arc::new(ChannelInner {
                service: service.to_string(),
                authority,
                connections: Connections::new(tls, connect_timeout),
                rotation,
                picks: AtomicU64::new(0),
            }),
            max_response_message: DEFAULT_MAX_MESSAGE_BYTES,
        })
    }

    /// Accepts response messages of up to `limit` bytes (default 4 MiB, tonic's own default);
    /// a larger one ends the call with `RESOURCE_EXHAUSTED`. Set limits here rather than on the
    /// generated client: tonic reports its own decoding limit as `OUT_OF_RANGE`. Likewise, a
    /// request over the generated client's `max_encoding_message_size` reaches the caller as
    /// `RESOURCE_EXHAUSTED`.
    pub fn with_max_decoding_message_size(mut self, limit: usize) -> Self {
        self.max_response_message = limit;
        self
    }

    /// A channel to one fixed instance at `addr`, verified as `server_name` (benchmarks, tools).
    pub fn fixed(
        server_name: &str,
        addr: std::net::SocketAddr,
        tls: Arc<rustls::ClientConfig>,
        connect_timeout: Duration,
    ) -> Result<Self, super::GrpcClientError> {
        let member = Member::new(Endpoint {
            instance: server_name.to_string(),
            addr,
        });
        let (_, rotation) = watch::channel(Snapshot {
            members: vec![member],
            ..Snapshot::default()
        });
        Self::new(server_name, server_name, tls, connect_timeout, rotation)
    }

    /// Drops the connection to an instance that left the rotation (calls on it finish first).
    pub(super) fn forget(&self, addr: std::net::SocketAddr) {
        self.inner
            .connections
            .discard(self.inner.authority.host(), addr);
    }
}

impl ChannelInner {
    /// Power of two choices: the one of two random instances with fewer requests in flight.
    fn pick(&self) -> Option<Arc<Member>> {
        let rotation = self.rotation.borrow();
        let members = &rotation.members;
        let n = members.len() as u64;
        match n {
            0 => None,
            1 => Some(members[0].clone()),
            _ => {
                let random = splitmix64(self.picks.fetch_add(1, Ordering::Relaxed));
                let first = (random % n) as usize;
                let mut second = ((random >> 32) % (n - 1)) as usize;
                if second >= first {
                    second += 1;
                }
                let (a, b) = (&members[first], &members[second]);
                let busier = |m: &Member| m.in_flight.load(Ordering::Relaxed);
                Some(if busier(b) < busier(a) { b } else { a }.clone())
            }
        }
    }

    async fn send(
        &self,
        request: http::Request<tonic::body::Body>,
        max_response_message: usize,
    ) -> Result<http::Response<ResponseBody>, Status> {
        let member = self.pick().ok_or_else(|| {
            Status::unavailable(format!("no instances of {} in rotation", self.service))
        })?;
        member.in_flight.fetch_add(1, Ordering::Relaxed);
        let _in_flight = scopeguard(&member);
        let timeout = request
            .headers()
            .get("grpc-timeout")
            .and_then(|value| parse_grpc_timeout(value.as_bytes()));
        let (mut parts, body) = request.into_parts();
        let mut uri = std::mem::take(&mut parts.uri).into_parts();
        uri.scheme = Some(Scheme::HTTPS);
        uri.authority = Some(self.authority.clone());
        parts.uri = http::Uri::from_parts(uri)
            .map_err(|err| Status::internal(format!("request URI: {err}")))?;
        parts.version = http::Version::HTTP_2;
        let encoder_failure = EncoderFailure::default();
        let body = SyncRequestBody(SyncWrapper::new(body), encoder_failure.clone())
            .map_err(|status| Box::new(status) as Box<dyn std::error::Error + Send + Sync>)
            .boxed();
        let request = http::Request::from_parts(parts, body);
        let exchange = async {
            let response = self
                .exchange(&member.endpoint, request)
                .await
                .map_err(|status| encoder_failure.take().unwrap_or(status))?;
            Ok(response.map(|body| {
                LimitedBody::new(
                    ReportEncoderFailure {
                        inner: body,
                        failure: encoder_failure,
                    },
                    max_response_message,
                )
            }))
        };
        match timeout {
            None => exchange.await,
            Some(timeout) => tokio::time::timeout(timeout, exchange)
                .await
                .unwrap_or_else(|_| {
                    Err(Status::deadline_exceeded(format!(
                        "{} ({}): no answer within {timeout:?}",
                        self.service, member.endpoint.instance
                    )))
                }),
        }
    }

    async fn exchange(
        &self,
        endpoint: &Endpoint,
        request: http::Request<crate::connection::RequestBody>,
    ) -> Result<http::Response<Incoming>, Status> {
        let server_name = self.authority.host();
        let (mut sender, _) = self
            .connections
            .get(server_name, endpoint.addr)
            .await
            .map_err(|err| Status::unavailable(err.to_string()))?;
        let broken = |err: hyper::Error| {
            if err.is_closed() || err.is_canceled() || err.is_incomplete_message() {
                self.connections.discard(server_name, endpoint.addr);
            }
            super::connection_status(Status::from_error(Box::new(err)))
        };
        sender.ready().await.map_err(broken)?;
        sender.send_request(request).await.map_err(broken)
    }
}

impl tower::Service<http::Request<tonic::body::Body>> for GrpcChannel {
    type Response = http::Response<ResponseBody>;
    type Error = Status;
    type Future = Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Status>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Status>> {
        // Connections open when a request needs one; an empty rotation is answered per request.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let inner = self.inner.clone();
        let limit = self.max_response_message;
        Box::pin(async move { inner.send(request, limit).await })
    }
}

/// Counts a request out of its instance's in-flight total when it ends, however it ends.
fn scopeguard(member: &Member) -> impl Drop + '_ {
    struct Leave<'a>(&'a Member);
    impl Drop for Leave<'_> {
        fn drop(&mut self) {
            self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
        }
    }
    Leave(member)
}

/// tonic's request body is `Send` but not `Sync`, which the client library's connections ask of
/// a body; it is only ever polled through `&mut`, so [`SyncWrapper`] makes it `Sync` soundly
/// (at the price of the size hint, which HTTP/2 does not need).
///
/// Its only errors are the encoder's (e.g. a message over the send limit). hyper answers a
/// failed request body by resetting the stream, which the caller would read as `INTERNAL`, so
/// the error is kept in an [`EncoderFailure`] for the caller to get instead.
struct SyncRequestBody(SyncWrapper<tonic::body::Body>, EncoderFailure);

impl Body for SyncRequestBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        Pin::new(this.0.get_mut()).poll_frame(cx).map_err(|status| {
            let status = super::limit::encoder_status(status);
            this.1.keep(Status::new(status.code(), status.message()));
            status
        })
    }
}

/// Where a request body's encoder error waits for the call to pick it up.
#[derive(Clone, Default)]
struct EncoderFailure(Arc<std::sync::Mutex<Option<Status>>>);

impl EncoderFailure {
    fn keep(&self, status: Status) {
        if let Ok(mut slot) = self.0.lock() {
            slot.get_or_insert(status);
        }
    }

    fn take(&self) -> Option<Status> {
        self.0.lock().ok()?.take()
    }
}

/// A response body as a call on the channel reads it: messages limited in size, and the
/// request's encoder error, if it failed after the response began, in place of the reset.
pub type ResponseBody = LimitedBody<ReportEncoderFailure>;

/// A response body that reports its request's encoder error instead of the reset it caused.
pub struct ReportEncoderFailure {
    inner: Incoming,
    failure: EncoderFailure,
}

impl Body for ReportEncoderFailure {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        Pin::new(&mut this.inner)
            .poll_frame(cx)
            .map_err(|err| match this.failure.take() {
                Some(status) => Box::new(status) as Self::Error,
                None => Box::new(err),
            })
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

fn splitmix64(seed: u64) -> u64 {
    let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rotation(count: usize) -> Snapshot {
        Snapshot {
            members: (0..count)
                .map(|i| {
                    Member::new(Endpoint {
                        instance: format!("pricing-service-{}", i + 1),
                        addr: std::net::SocketAddr::from(([127, 0, 0, 1], 9000 + i as u16)),
                    })
                })
                .collect(),
            ..Snapshot::default()
        }
    }

    fn channel_over(snapshot: Snapshot) -> GrpcChannel {
        // A CA of its own per channel: tests run in parallel, and two creating one CA in the same
        // directory would read each other's half-written files.
        static NEXT_DIR: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "causeway-grpc-channel-{}-{}",
            std::process::id(),
            NEXT_DIR.fetch_add(1, Ordering::Relaxed)
        ));
        let ca = causeway_core::tls::LocalCa::load_or_create(&dir).unwrap();
        let tls = causeway_core::tls::client_config(&ca.ca_cert_path()).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        let (_, rotation) = watch::channel(snapshot);
        GrpcChannel::new(
            "pricing-service",
            "pricing-service.internal",
            tls,
            Duration::from_secs(1),
            rotation,
        )
        .unwrap()
    }

    #[test]
    fn picks_spread_and_avoid_the_busiest_instance() {
        let snapshot = rotation(3);
        let members = snapshot.members.clone();
        let channel = channel_over(snapshot);
        let mut picked = std::collections::HashMap::new();
        for _ in 0..300 {
            let member = channel.inner.pick().unwrap();
            *picked.entry(member.endpoint.instance.clone()).or_insert(0) += 1;
        }
        assert_eq!(
            picked.len(),
            3,
            "every idle instance gets calls: {picked:?}"
        );

        // One instance busy: two random choices always include a less busy one.
        members[1].in_flight.store(5, Ordering::Relaxed);
        for _ in 0..300 {
            let member = channel.inner.pick().unwrap();
            assert_ne!(member.endpoint.instance, "pricing-service-2");
        }
    }

    #[test]
    fn an_empty_rotation_has_no_pick() {
        assert!(channel_over(Snapshot::default()).inner.pick().is_none());
        let one = channel_over(rotation(1));
        assert_eq!(
            one.inner.pick().unwrap().endpoint.instance,
            "pricing-service-1"
        );
    }
}
