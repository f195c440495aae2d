//! What a route forwards to: a [`Pool`], the proxy engine's [`Upstream`] (balancing, outlier
//! ejection, health, retry budget) with the transport its attempts take. Routes to fixed
//! addresses and routes to discovered services differ only in the transport, so both share the
//! gateway's forwarding loop, retries and metrics:
//!
//! - [`Transport::Fixed`]: plain HTTP/1.1 or h2c to configured addresses, on a pooled
//!   keep-alive client per thread.
//! - [`Transport::Discovered`]: a service's instances as discovery lists them (DNS SRV through
//!   the client library's resolver), over the client library's HTTP/2-over-TLS connections
//!   (verified against the local CA, one multiplexed connection per instance and thread). The endpoint set
//!   is resolved again when the answer's TTL is up (in the background, by the first request
//!   that finds it due), after a connect failure, and at once when a pick finds no endpoint.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use causeway_client::ServiceClient;
use causeway_client::connection::Connections;
use causeway_client::discovery::{Endpoint as Instance, ResolveError};
use causeway_core::telemetry::{HistogramFamily, error_chain, latency_histogram};
use causeway_core::topology::{RouteConfig, StaticUpstream, UpstreamProtocol};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri, header};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use thread_local::ThreadLocal;

use super::{AttemptLabels, ProxyBody, Refusal, escape_description};
use crate::sidecar::MeshContext;
use crate::upstream::{
    EndpointLabels, EndpointSpec, FailureKind, Outcome, PickGuard, Upstream, UpstreamConfig,
    UpstreamError, UpstreamMetrics,
};

/// A discovered set is resolved again at most this often, whatever the TTL (a stale answer
/// has none), so that a service that is down does not cost a DNS query per request.
const MIN_REFRESH: Duration = Duration::from_millis(200);
/// After a failed lookup, the set in use is kept and the lookup tried again after this long.
const LOOKUP_RETRY: Duration = Duration::from_secs(1);

/// Attempts per endpoint and outcome, and their latency to response headers.
#[derive(Clone, Default)]
pub(super) struct AttemptMetrics {
    pub(super) attempts: Family<AttemptLabels, Counter>,
    pub(super) latency: AttemptLatency,
}

#[derive(Clone)]
pub(super) struct AttemptLatency(pub(super) HistogramFamily<EndpointLabels>);

impl Default for AttemptLatency {
    fn default() -> Self {
        Self(Family::new_with_constructor(latency_histogram))
    }
}

pub(super) struct Pool {
    pub(super) upstream: Upstream,
    pub(super) transport: Transport,
    metrics: AttemptMetrics,
}

pub(super) enum Transport {
    Fixed(Fixed),
    Discovered(Discovered),
    Mesh(Mesh),
}

/// A meshed service's sidecars, as the control plane lists them, over mutual TLS verified as
/// the identity it names (a sidecar's outbound half, see [`crate::sidecar`]).
pub(super) struct Mesh {
    pub(super) service: String,
    authority: Authority,
    context: Arc<MeshContext>,
    /// The configuration version whose endpoints the upstream holds (`u64::MAX`: none yet).
    synced: AtomicU64,
}

pub(super) struct Fixed {
    /// One keep-alive pool per thread: the gateway is shared by per-core workers, each a
    /// single-threaded runtime, and a pooled connection is driven by a task on the runtime that
    /// opened it; a worker using another's connection would wake that thread for every read.
    clients: ThreadLocal<Client<HttpConnector, ProxyBody>>,
    pool_settings: PoolSettings,
    /// HTTP/1.1 (which can carry a WebSocket upgrade) or h2c (which cannot).
    pub(super) protocol: UpstreamProtocol,
    /// Per address: its URI authority and Server-Timing description, formatted once.
    targets: Vec<(SocketAddr, Authority, String)>,
}

/// How a fixed upstream's per-thread clients are built.
struct PoolSettings {
    connect_timeout: Duration,
    idle_timeout: Duration,
    max_idle_per_addr: usize,
    h2c: bool,
}

impl PoolSettings {
    fn client(&self) -> Client<HttpConnector, ProxyBody> {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(self.connect_timeout));
        Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(self.idle_timeout)
            .pool_max_idle_per_host(self.max_idle_per_addr)
            .http2_only(self.h2c)
            .build(connector)
    }
}

pub(super) struct Discovered {
    pub(super) service: String,
    /// `<service>.<zone>`: the name the instances' certificates are verified against, and the
    /// `:authority` they are sent.
    host: String,
    authority: Authority,
    client: Arc<ServiceClient>,
    /// The client library's HTTP/2-over-TLS connections, one set per thread (see
    /// [`Fixed::clients`] for why).
    connections: ThreadLocal<Connections>,
    /// Whether the instances' admin addresses are resolved too, for active health checks.
    health_checked: bool,
    epoch: Instant,
    /// When the set is next resolved, in milliseconds since `epoch` (read per request, no lock).
    due_ms: AtomicU64,
    /// Serialises resolutions; holds when the last one finished.
    resolving: tokio::sync::Mutex<Option<Instant>>,
    /// Why the last resolution found nothing (the 503's message while the set is empty).
    last_error: Mutex<Option<String>>,
}

/// A failed attempt: how it failed (for the retry decision), what the client is told if it is
/// the last, and the request when it never left, so that even a streamed body can be sent to
/// another endpoint.
pub(super) struct AttemptFailure {
    pub(super) kind: FailureKind,
    pub(super) refusal: Refusal,
    pub(super) unsent: Option<Request<ProxyBody>>,
}

impl Pool {
    /// Fixed addresses over plain HTTP; named after the route.
    pub(super) fn fixed(
        instance: &str,
        route: &RouteConfig,
        upstream: &StaticUpstream,
        request_timeout: Duration,
        upstream_metrics: &UpstreamMetrics,
        metrics: &AttemptMetrics,
    ) -> Result<Self, UpstreamError> {
        let pool_settings = PoolSettings {
            connect_timeout: request_timeout.min(Duration::from_secs(5)),
            idle_timeout: Duration::from_millis(upstream.pool_idle_timeout_ms),
            max_idle_per_addr: upstream.pool_max_idle_per_addr,
            h2c: upstream.protocol == UpstreamProtocol::H2c,
        };
        let protocol_name = match upstream.protocol {
            UpstreamProtocol::Http1 => "HTTP/1.1",
            UpstreamProtocol::H2c => "h2c",
        };
        let prefix = &route.prefix;
        let targets = upstream
            .addrs
            .iter()
            .filter_map(|addr| {
                let authority = Authority::try_from(addr.to_string()).ok()?;
                let detail = escape_description(&format!(
                    "{instance} routed {prefix} to {addr} over {protocol_name}"
                ));
                Some((*addr, authority, detail))
            })
            .collect();
        let specs = upstream
            .addrs
            .iter()
            .map(|addr| EndpointSpec::new(addr.to_string(), *addr))
            .collect();
        let upstream_engine = Upstream::with_metrics(
            prefix.clone(),
            within(&upstream.policy, request_timeout),
            specs,
            upstream_metrics.clone(),
        )?;
        Ok(Self {
            upstream: upstream_engine,
            transport: Transport::Fixed(Fixed {
                clients: ThreadLocal::new(),
                pool_settings,
                protocol: upstream.protocol,
                targets,
            }),
            metrics: metrics.clone(),
        })
    }

    /// A discovered service's instances; empty until the first request resolves them.
    pub(super) fn discovered(
        name: String,
        service: &str,
        policy: &UpstreamConfig,
        client: Arc<ServiceClient>,
        request_timeout: Duration,
        upstream_metrics: &UpstreamMetrics,
        metrics: &AttemptMetrics,
    ) -> Result<Self, UpstreamError> {
        let host = client.discovery().host_name(service);
        let authority =
            Authority::try_from(host.as_str()).map_err(|err| UpstreamError::InvalidConfig {
                upstream: name.clone(),
                message: format!("{host} is not a host name: {err}"),
            })?;
        let upstream = Upstream::with_metrics(
            name,
            within(policy, request_timeout),
            Vec::new(),
            upstream_metrics.clone(),
        )?;
        Ok(Self {
            upstream,
            transport: Transport::Discovered(Discovered {
                service: service.to_string(),
                host,
                authority,
                client,
                connections: ThreadLocal::new(),
                health_checked: policy.health_check.is_some(),
                epoch: Instant::now(),
                due_ms: AtomicU64::new(0),
                resolving: tokio::sync::Mutex::new(None),
                last_error: Mutex::new(None),
            }),
            metrics: metrics.clone(),
        })
    }

    /// A meshed service's sidecars; their endpoints come from the configuration in force.
    pub(super) fn mesh(
        name: String,
        service: &str,
        policy: &UpstreamConfig,
        context: Arc<MeshContext>,
        request_timeout: Duration,
        upstream_metrics: &UpstreamMetrics,
        metrics: &AttemptMetrics,
    ) -> Result<Self, UpstreamError> {
        let authority =
            Authority::try_from(service).map_err(|err| UpstreamError::InvalidConfig {
                upstream: name.clone(),
                message: format!("{service} is not a host name: {err}"),
            })?;
        let upstream = Upstream::with_metrics(
            name,
            within(policy, request_timeout),
            Vec::new(),
            upstream_metrics.clone(),
        )?;
        Ok(Self {
            upstream,
            transport: Transport::Mesh(Mesh {
                service: service.to_string(),
                authority,
                context,
                synced: AtomicU64::new(u64::MAX),
            }),
            metrics: metrics.clone(),
        })
    }

    /// An endpoint for the next attempt. A discovered set that is due is resolved again in the
    /// background; one with no endpoint to give is resolved at once, then picked from again.
    pub(super) async fn pick(self: &Arc<Self>, headers: &HeaderMap) -> Result<PickGuard, String> {
        let discovered = match &self.transport {
            Transport::Discovered(discovered) => discovered,
            Transport::Mesh(mesh) => {
                mesh.sync(&self.upstream)?;
                return self
                    .upstream
                    .pick(headers)
                    .map_err(|err| format!("no sidecar of {} to call: {err}", mesh.service));
            }
            Transport::Fixed(_) => {
                return self.upstream.pick(headers).map_err(|err| err.to_string());
            }
        };
        if discovered.claim() {
            let pool = self.clone();
            let asked = Instant::now();
            tokio::spawn(async move {
                if let Transport::Discovered(discovered) = &pool.transport {
                    discovered.refresh(&pool.upstream, asked).await;
                }
            });
        }
        if let Ok(guard) = self.upstream.pick(headers) {
            return Ok(guard);
        }
        discovered.refresh(&self.upstream, Instant::now()).await;
        self.upstream.pick(headers).map_err(|err| {
            discovered
                .last_error
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .clone()
                .unwrap_or_else(|| err.to_string())
        })
    }

    /// The request of one attempt: the path, method and headers the gateway prepared, with the
    /// URI and version this transport speaks to `addr`.
    pub(super) fn attempt(
        &self,
        addr: SocketAddr,
        method: &Method,
        headers: &HeaderMap,
        path_and_query: &PathAndQuery,
        body: ProxyBody,
    ) -> Result<Request<ProxyBody>, Refusal> {
        let mut uri = http::uri::Parts::default();
        let (scheme, authority, version) = match &self.transport {
            Transport::Fixed(fixed) => {
                let Some((_, authority, _)) = fixed.target(addr) else {
                    return Err(Refusal::Status(
                        StatusCode::BAD_GATEWAY,
                        "no_upstream",
                        format!("{addr} is not one of {}'s addresses", self.upstream.name()),
                    ));
                };
                (Scheme::HTTP, authority.clone(), http::Version::default())
            }
            Transport::Discovered(discovered) => (
                Scheme::HTTPS,
                discovered.authority.clone(),
                http::Version::HTTP_2,
            ),
            Transport::Mesh(mesh) => (Scheme::HTTPS, mesh.authority.clone(), http::Version::HTTP_2),
        };
        uri.scheme = Some(scheme);
        uri.authority = Some(authority);
        uri.path_and_query = Some(path_and_query.clone());
        let mut request = Request::new(body);
        *request.method_mut() = method.clone();
        *request.uri_mut() = Uri::from_parts(uri)
            .map_err(|err| Refusal::Status(StatusCode::BAD_REQUEST, "bad_path", err.to_string()))?;
        *request.version_mut() = version;
        *request.headers_mut() = headers.clone();
        if version == http::Version::HTTP_2 {
            // HTTP/2 names the host in `:authority` (the service's name, as TLS verified).
            request.headers_mut().remove(header::HOST);
        }
        Ok(request)
    }

    /// Sends one attempt within `timeout`, and records its outcome for the balancer and outlier
    /// detection (through `guard`) and in the attempt metrics.
    pub(super) async fn send(
        &self,
        guard: PickGuard,
        request: Request<ProxyBody>,
        timeout: Duration,
    ) -> Result<Response<Incoming>, AttemptFailure> {
        let endpoint = guard.endpoint().clone();
        let addr = endpoint.addr();
        let started = Instant::now();
        let sent = match &self.transport {
            Transport::Fixed(fixed) => fixed.send(addr, request, timeout).await,
            Transport::Discovered(discovered) => {
                discovered.send(endpoint.id(), addr, request, timeout).await
            }
            Transport::Mesh(mesh) => mesh.send(endpoint.id(), addr, request, timeout).await,
        };
        let (outcome, counted) = match &sent {
            Ok(response) => {
                let status = response.status();
                (
                    Outcome::Response(status),
                    std::borrow::Cow::Owned(status.as_u16().to_string()),
                )
            }
            Err(failure) => match failure.kind {
                FailureKind::ConnectFailure => (Outcome::ConnectFailure, "connect_failure".into()),
                FailureKind::PerTryTimeout => (Outcome::Failure, "timeout".into()),
                _ => (Outcome::Failure, "failure".into()),
            },
        };
        guard.record(outcome);
        let labels = EndpointLabels {
            upstream: self.upstream.name().to_string(),
            endpoint: endpoint.id().to_string(),
        };
        self.metrics
            .latency
            .0
            .get_or_create(&labels)
            .observe(started.elapsed().as_secs_f64());
        self.metrics
            .attempts
            .get_or_create(&AttemptLabels {
                upstream: labels.upstream,
                endpoint: labels.endpoint,
                outcome: counted,
            })
            .inc();
        sent
    }

    /// The Server-Timing description of a fixed address (formatted once, at start-up).
    pub(super) fn fixed_detail(&self, addr: SocketAddr) -> Option<&str> {
        match &self.transport {
            Transport::Fixed(fixed) => fixed.target(addr).map(|(_, _, detail)| detail.as_str()),
            Transport::Discovered(_) | Transport::Mesh(_) => None,
        }
    }
}

/// All attempts together stay within the gateway's request timeout.
fn within(policy: &UpstreamConfig, request_timeout: Duration) -> UpstreamConfig {
    let mut config = policy.clone();
    config.retry.deadline_ms = config
        .retry
        .deadline_ms
        .min(request_timeout.as_millis() as u64);
    config
}

impl Fixed {
    fn target(&self, addr: SocketAddr) -> Option<&(SocketAddr, Authority, String)> {
        self.targets.iter().find(|(target, ..)| *target == addr)
    }

    async fn send(
        &self,
        addr: SocketAddr,
        request: Request<ProxyBody>,
        timeout: Duration,
    ) -> Result<Response<Incoming>, AttemptFailure> {
        let client = self.clients.get_or(|| self.pool_settings.client());
        match tokio::time::timeout(timeout, client.request(request)).await {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(err)) => {
                let (kind, what) = if err.is_connect() {
                    (FailureKind::ConnectFailure, "cannot connect to")
                } else {
                    (FailureKind::Other, "failed talking to")
                };
                let source = std::error::Error::source(&err)
                    .map(|source| format!(": {source}"))
                    .unwrap_or_default();
                Err(AttemptFailure {
                    kind,
                    refusal: Refusal::Status(
                        StatusCode::BAD_GATEWAY,
                        "upstream_unavailable",
                        format!("{what} upstream {addr}{source}"),
                    ),
                    // The pooled client keeps the request whether or not it left.
                    unsent: None,
                })
            }
            Err(_) => Err(timed_out(addr, timeout)),
        }
    }
}

fn timed_out(what: impl std::fmt::Display, timeout: Duration) -> AttemptFailure {
    AttemptFailure {
        kind: FailureKind::PerTryTimeout,
        refusal: Refusal::Status(
            StatusCode::GATEWAY_TIMEOUT,
            "upstream_timeout",
            format!("{what} did not answer within {timeout:?}"),
        ),
        unsent: None,
    }
}

impl Discovered {
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Whether this request should resolve the set again: once it is due, the first request to
    /// find it so claims it (for a while; the resolution sets the next time).
    fn claim(&self) -> bool {
        let now = self.now_ms();
        let due = self.due_ms.load(Ordering::Relaxed);
        now >= due
            && self
                .due_ms
                .compare_exchange(
                    due,
                    now + LOOKUP_RETRY.as_millis() as u64,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
    }

    fn due_in(&self, after: Duration) {
        let after = after.max(MIN_REFRESH).as_millis() as u64;
        self.due_ms.store(self.now_ms() + after, Ordering::Relaxed);
    }

    /// Resolves the service and replaces the upstream's endpoints with the answer (endpoints
    /// that stay keep their state). Concurrent callers share one resolution: one that finished
    /// after `asked`, or within [`MIN_REFRESH`], answers for them.
    async fn refresh(&self, upstream: &Upstream, asked: Instant) {
        let mut last = self.resolving.lock().await;
        if last.is_some_and(|finished| finished > asked || finished.elapsed() < MIN_REFRESH) {
            return;
        }
        let discovery = self.client.discovery();
        let (next, error) = match discovery.resolve(&self.service).await {
            Ok(resolution) => {
                let admin = if self.health_checked {
                    discovery
                        .resolve_port(&self.service, "admin")
                        .await
                        .map(|admin| admin.endpoints)
                        .unwrap_or_default()
                } else {
                    Vec::new()
                };
                self.apply(upstream, &resolution.endpoints, &admin);
                (resolution.ttl, None)
            }
            Err(err @ ResolveError::NoInstances { .. }) => {
                self.apply(upstream, &[], &[]);
                (MIN_REFRESH, Some(err.to_string()))
            }
            Err(err) => {
                tracing::warn!(service = %self.service, error = %err, "cannot resolve; keeping the instances known");
                (LOOKUP_RETRY, Some(err.to_string()))
            }
        };
        *self
            .last_error
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = error;
        self.due_in(next);
        *last = Some(Instant::now());
    }

    /// Replaces the endpoint set when the answer differs from it.
    fn apply(&self, upstream: &Upstream, instances: &[Instance], admin: &[Instance]) {
        let specs: Vec<EndpointSpec> = instances
            .iter()
            .map(|instance| {
                let spec = EndpointSpec::new(instance.instance.clone(), instance.addr);
                match admin
                    .iter()
                    .find(|admin| admin.instance == instance.instance)
                {
                    Some(admin) => spec.with_health_addr(admin.addr),
                    None => spec,
                }
            })
            .collect();
        replace_endpoints(
            upstream,
            specs,
            &self.service,
            "discovered instances changed",
        );
    }

    /// One attempt over the instance's HTTP/2-over-TLS connection (opened if there is none).
    /// After a connect failure, the service is resolved again soon.
    async fn send(
        &self,
        instance: &str,
        addr: SocketAddr,
        request: Request<ProxyBody>,
        timeout: Duration,
    ) -> Result<Response<Incoming>, AttemptFailure> {
        let connections = self
            .connections
            .get_or(|| self.client.connections().empty_like());
        let target = Multiplexed {
            connections,
            server_name: &self.host,
            service: &self.service,
            instance,
            addr,
        };
        send_multiplexed(target, request, timeout, || {
            self.client.discovery().forget_service(&self.service);
            self.due_ms.store(0, Ordering::Relaxed);
        })
        .await
    }
}

impl Mesh {
    /// Brings the upstream's endpoints to the configuration in force.
    fn sync(&self, upstream: &Upstream) -> Result<(), String> {
        let applied = self.context.applied()?;
        if self.synced.swap(applied.version, Ordering::Relaxed) == applied.version {
            return Ok(());
        }
        let specs = applied
            .destinations
            .get(&self.service)
            .map(|destination| {
                destination
                    .endpoints
                    .iter()
                    .map(|(instance, addr)| EndpointSpec::new(instance.clone(), *addr))
                    .collect()
            })
            .unwrap_or_default();
        replace_endpoints(upstream, specs, &self.service, "mesh endpoints changed");
        Ok(())
    }

    async fn send(
        &self,
        instance: &str,
        addr: SocketAddr,
        request: Request<ProxyBody>,
        timeout: Duration,
    ) -> Result<Response<Incoming>, AttemptFailure> {
        let peers = match self
            .context
            .applied()
            .and_then(|applied| self.context.peers(&self.service, &applied))
        {
            Ok(peers) => peers,
            Err(message) => {
                return Err(AttemptFailure {
                    kind: FailureKind::ConnectFailure,
                    refusal: Refusal::Status(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "upstream_unavailable",
                        format!("cannot reach {} ({instance}): {message}", self.service),
                    ),
                    unsent: Some(request),
                });
            }
        };
        let target = Multiplexed {
            connections: &peers.connections,
            server_name: &self.service,
            service: &self.service,
            instance,
            addr,
        };
        send_multiplexed(target, request, timeout, || {}).await
    }
}

/// Replaces `upstream`'s endpoints with `specs` when they differ (endpoints that stay keep
/// their state), and logs the new set.
fn replace_endpoints(upstream: &Upstream, specs: Vec<EndpointSpec>, service: &str, what: &str) {
    let current = upstream.endpoints();
    let unchanged = current.len() == specs.len()
        && current.iter().zip(&specs).all(|(endpoint, spec)| {
            endpoint.id() == spec.id
                && endpoint.addr() == spec.addr
                && spec
                    .health_addr
                    .is_none_or(|addr| endpoint.health_addr() == addr)
        });
    if unchanged {
        return;
    }
    let ids: Vec<&str> = specs.iter().map(|spec| spec.id.as_str()).collect();
    match upstream.update(specs.clone()) {
        Ok(()) => tracing::info!(
            event = "upstream.endpoints",
            upstream = upstream.name(),
            %service,
            endpoints = ?ids,
            "{what}"
        ),
        Err(err) => {
            tracing::error!(upstream = upstream.name(), error = %err, "endpoints unusable")
        }
    }
}

/// Where one attempt over a multiplexed HTTP/2-over-TLS connection goes.
struct Multiplexed<'a> {
    connections: &'a Connections,
    /// What the connection is verified as.
    server_name: &'a str,
    service: &'a str,
    instance: &'a str,
    addr: SocketAddr,
}

/// One attempt over `target`'s connection (opened if there is none). Failures before the
/// request went out give it back (after `on_unsent`); a connection that failed is dropped.
async fn send_multiplexed(
    target: Multiplexed<'_>,
    request: Request<ProxyBody>,
    timeout: Duration,
    on_unsent: impl Fn(),
) -> Result<Response<Incoming>, AttemptFailure> {
    let Multiplexed {
        connections,
        server_name,
        service,
        instance,
        addr,
    } = target;
    let unsent = |message: String, request| {
        on_unsent();
        AttemptFailure {
            kind: FailureKind::ConnectFailure,
            refusal: Refusal::Status(
                StatusCode::SERVICE_UNAVAILABLE,
                "upstream_unavailable",
                format!("cannot reach {service} ({instance}): {message}"),
            ),
            unsent: Some(request),
        }
    };
    let attempt = async {
        let mut sender = match connections.get(server_name, addr).await {
            Ok((sender, _)) => sender,
            Err(err) => return Err(unsent(err.to_string(), request)),
        };
        if let Err(err) = sender.ready().await {
            connections.discard(server_name, addr);
            return Err(unsent(format!("connection closed: {err}"), request));
        }
        match sender.try_send_request(request).await {
            Ok(response) => Ok(response),
            Err(mut err) => {
                if sender.is_closed() {
                    connections.discard(server_name, addr);
                }
                let message = error_chain(err.error());
                match err.take_message() {
                    Some(request) => Err(unsent(message, request)),
                    None => Err(AttemptFailure {
                        kind: FailureKind::Other,
                        refusal: Refusal::Status(
                            StatusCode::BAD_GATEWAY,
                            "upstream_unavailable",
                            format!("{service} ({instance}) failed: {message}"),
                        ),
                        unsent: None,
                    }),
                }
            }
        }
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(result) => result,
        Err(_) => Err(timed_out(format_args!("{service} ({instance})"), timeout)),
    }
}
