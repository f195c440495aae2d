//! The reverse-proxy role: TLS-terminated HTTP/1.1 and HTTP/2 in, API gateway checks (JWT, rate
//! limit, body size), routing by path prefix, and the answer streamed back with the hop's
//! `Server-Timing` entry, request id and access log line.
//!
//! Every route forwards through the proxy engine's [`Upstream`](crate::upstream::Upstream) with
//! its route's [`UpstreamConfig`] (balancing policy, outlier ejection, retries within a budget,
//! per-endpoint attempt metrics), whether its endpoints are fixed addresses (plain HTTP/1.1 or
//! h2c) or the instances of a discovered service (DNS SRV through the client library's resolver,
//! re-resolved on the TTL; HTTP/2 over TLS on the client library's connections); see
//! the `pool` module.
//!
//! WebSocket: an HTTP/1.1 upgrade (`Connection: upgrade`, `Upgrade: websocket`) on a route with a
//! static HTTP/1.1 upstream is forwarded with its `Upgrade` kept; when the upstream answers
//! `101 Switching Protocols` the 101 goes back to the client and the two upgraded connections
//! are spliced byte for byte until either side closes, or until a drain
//! ([`Gateway::drain_tunnels`]) has given them their grace period and closes them. Routes to
//! discovered services (HTTP/2 to the service) and to h2c upstreams cannot carry an HTTP/1.1
//! upgrade and answer 501 `websocket_unsupported`. HTTP/2 extended CONNECT (RFC 8441, WebSocket over HTTP/2) is not
//! supported, in either direction.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use causeway_client::ServiceClient;
use causeway_core::principal::{self, Principal};
use causeway_core::serve::{BoxError, Shutdown, error_response};
use causeway_core::server_timing::{self, TimingEntry, steps};
use causeway_core::telemetry::HttpMetrics;
use causeway_core::topology::{
    ReverseProxyConfig, RouteConfig, ServerTimingPolicy, UpstreamProtocol,
};
use causeway_core::trace_context::{REQUEST_ID, TRACEPARENT, TraceContext};
use http::header::{self, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery};
use http::{HeaderMap, Request, Response, StatusCode, Uri};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Body as _, Incoming};
use hyper_util::rt::TokioIo;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::task::JoinHandle;

use crate::auth::{AuthError, Verifier};
use crate::hygiene::{self, Forwarding, Limits, LimitsExt, Upgrade};
use crate::rate_limit::{ClientKey, RateLimit};
use crate::routing::RouteTable;
use crate::sidecar::{MeshRole, PEER_IDENTITY};
use crate::upstream::{FailureKind, RetryDecision, UpstreamConfig, UpstreamMetrics};

mod pool;

use causeway_client::IDEMPOTENCY_KEY;
use pool::{AttemptMetrics, Pool, Transport};

pub type ProxyBody = BoxBody<Bytes, BoxError>;

/// Set by the gateway for the services behind it; never taken from the client.
pub use causeway_core::principal::AUTHENTICATED_SUBJECT;
/// This proxy's name in `Via` (a pseudonym: instance names stay internal).
const VIA_NAME: &str = "causeway";

pub struct Gateway {
    instance: String,
    /// In the route table's order; the table picks an index.
    routes: Vec<Route>,
    table: RouteTable,
    verifier: Arc<Verifier>,
    limiter: Arc<RateLimit>,
    /// Its discovery and connections serve the routes to services.
    client: Arc<ServiceClient>,
    metrics: HttpMetrics,
    /// Body size and request timeout are enforced here; the serve loop applies the rest.
    limits: Limits,
    upstream_metrics: UpstreamMetrics,
    attempts: AttemptMetrics,
    /// WebSocket tunnels: ended ones by outcome, open ones, bytes each way.
    tunnels: TunnelMetrics,
    /// Tells open tunnels that a drain has begun, and when it ends; each open tunnel holds a
    /// receiver, so the drain knows when the last one has ended.
    draining: Arc<tokio::sync::watch::Sender<Option<tokio::time::Instant>>>,
    /// Whether clients reach this gateway over plain HTTP (benchmarks, behind a TLS terminator).
    plain_http: bool,
    /// Who gets `Server-Timing` with the internal hops.
    server_timing: ServerTimingPolicy,
    /// Set when this gateway is half of a mesh sidecar (see [`crate::sidecar`]).
    mesh: Option<MeshRole>,
}

/// What a gateway passes on to the one that replaces it on a reload (see [`Gateway::reload`]).
struct Carried {
    instance: String,
    limits: Limits,
    verifier: Arc<Verifier>,
    limiter: Arc<RateLimit>,
    client: Arc<ServiceClient>,
    metrics: HttpMetrics,
    upstream_metrics: UpstreamMetrics,
    attempts: AttemptMetrics,
    tunnels: TunnelMetrics,
    draining: Arc<tokio::sync::watch::Sender<Option<tokio::time::Instant>>>,
    plain_http: bool,
    server_timing: ServerTimingPolicy,
    mesh: Option<MeshRole>,
}

/// A route with what it forwards to.
struct Route {
    config: RouteConfig,
    /// Its fixed addresses or its discovered service (shared by the routes to that service with
    /// the same policy), or why that could not be built: the route then answers 502.
    pool: Result<Arc<Pool>, String>,
}

enum Refusal {
    Status(StatusCode, &'static str, String),
    /// A hygiene or limit refusal (already logged).
    Hygiene(hygiene::Refusal),
    Unauthorized(AuthError),
    RateLimited(Duration),
}

/// Who a request came from, as the checks found it.
struct Caller<'t> {
    peer: SocketAddr,
    /// The verified mesh identity of the calling sidecar (inbound half only).
    mesh_peer: Option<&'t causeway_mesh::SpiffeId>,
    trace: &'t TraceContext,
    request_id: Option<&'t HeaderValue>,
    principal: Option<Principal>,
    /// The answer may carry `Server-Timing` (the tiers behind are asked for it).
    timing: bool,
}

/// Bodies up to this size (declared by `Content-Length`) are buffered on routes to fixed
/// addresses, so that a failed attempt can be retried; larger or unsized ones (chunked uploads,
/// gRPC streams) are streamed through and retried only when they never left (a consumed stream
/// cannot be sent again). Routes to services buffer every body but gRPC's, within the limit.
const REPLAY_LIMIT: u64 = 64 * 1024;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AttemptLabels {
    upstream: String,
    endpoint: String,
    /// The status code, or `connect_failure`, `failure`, `timeout`.
    outcome: Cow<'static, str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TunnelLabels {
    route: String,
    /// `closed`, `error` or `upgrade_failed`.
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TunnelRouteLabels {
    route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TunnelBytesLabels {
    route: String,
    /// `to_upstream` or `to_client`.
    direction: &'static str,
}

/// Metrics of spliced WebSocket connections.
#[derive(Clone, Default)]
struct TunnelMetrics {
    ended: Family<TunnelLabels, Counter>,
    open: Family<TunnelRouteLabels, Gauge>,
    bytes: Family<TunnelBytesLabels, Counter>,
}

impl Gateway {
    /// A gateway routing by `config.routes` (see [`with_routes`](Self::with_routes) for Ingress).
    pub fn new(
        instance: String,
        config: &ReverseProxyConfig,
        jwt_key: &[u8],
        client: Arc<ServiceClient>,
        metrics: HttpMetrics,
    ) -> Self {
        let table = RouteTable::from_routes(config.routes.clone());
        Self::with_routes(instance, config, table, jwt_key, client, metrics)
    }

    /// A gateway routing by `table` (from the topology's routes or Ingress files).
    pub fn with_routes(
        instance: String,
        config: &ReverseProxyConfig,
        table: RouteTable,
        jwt_key: &[u8],
        client: Arc<ServiceClient>,
        metrics: HttpMetrics,
    ) -> Self {
        Self::build(
            table,
            Carried {
                instance,
                limits: config.listener_limits(),
                verifier: Arc::new(Verifier::new(jwt_key, &config.jwt)),
                limiter: Arc::new(RateLimit::new(&config.rate_limit)),
                client,
                metrics,
                upstream_metrics: UpstreamMetrics::default(),
                attempts: AttemptMetrics::default(),
                tunnels: TunnelMetrics::default(),
                draining: Arc::new(tokio::sync::watch::Sender::new(None)),
                plain_http: false,
                server_timing: config.server_timing,
                mesh: None,
            },
            &[],
        )
    }

    /// A sidecar half: the outbound one routes by `Host` to the meshed services of the
    /// configuration in force (rebuilt with [`reload`](Self::reload) when a new one is
    /// applied); the inbound one forwards to `app` (plain HTTP/1.1 on loopback) what the
    /// policy lets in. `config` gives the listener limits and request timeout.
    pub fn sidecar(
        instance: String,
        config: &ReverseProxyConfig,
        role: MeshRole,
        app: Option<SocketAddr>,
        client: Arc<ServiceClient>,
        metrics: HttpMetrics,
    ) -> Result<Self, String> {
        let table = match (&role, app) {
            (MeshRole::Outbound(context), _) => {
                crate::sidecar::outbound_routes(&*context.applied()?)
            }
            (MeshRole::Inbound(_), Some(app)) => RouteTable::from_routes(vec![RouteConfig {
                prefix: "/".into(),
                service: String::new(),
                strip_prefix: None,
                auth: false,
                // Retries are the caller's outbound half's to make, with its budget.
                upstream: Some(causeway_core::topology::StaticUpstream {
                    policy: crate::sidecar::inbound_policy(),
                    ..causeway_core::topology::StaticUpstream::http1(vec![app])
                }),
                policy: UpstreamConfig::default(),
            }]),
            (MeshRole::Inbound(_), None) => {
                return Err("an inbound sidecar needs its app's address".into());
            }
        };
        Ok(Self::build(
            table,
            Carried {
                instance,
                limits: config.listener_limits(),
                verifier: Arc::new(Verifier::new(b"", &config.jwt)),
                limiter: Arc::new(RateLimit::new(&config.rate_limit)),
                client,
                metrics,
                upstream_metrics: UpstreamMetrics::default(),
                attempts: AttemptMetrics::default(),
                tunnels: TunnelMetrics::default(),
                draining: Arc::new(tokio::sync::watch::Sender::new(None)),
                plain_http: matches!(role, MeshRole::Outbound(_)),
                // A sidecar's callers are its app and other sidecars: each hop reports itself,
                // and the edge decides what leaves the system.
                server_timing: ServerTimingPolicy::Always,
                mesh: Some(role),
            },
            &[],
        ))
    }

    /// A gateway with `table`'s routes (an Ingress reload) that carries this one on: the
    /// settings, the rate limiter's state, the metrics (registered once, from the first
    /// gateway), the WebSocket tunnels (one [`drain_tunnels`](Self::drain_tunnels) covers those
    /// of every generation) and the pools of upstreams whose routes did not change, with their
    /// endpoints, outlier state, retry budget and health checkers. New upstreams get no health
    /// checker (Ingress routes configure none).
    pub fn reload(&self, table: RouteTable) -> Self {
        let carried = Carried {
            instance: self.instance.clone(),
            limits: self.limits.clone(),
            verifier: self.verifier.clone(),
            limiter: self.limiter.clone(),
            client: self.client.clone(),
            metrics: self.metrics.clone(),
            upstream_metrics: self.upstream_metrics.clone(),
            attempts: self.attempts.clone(),
            tunnels: self.tunnels.clone(),
            draining: self.draining.clone(),
            plain_http: self.plain_http,
            server_timing: self.server_timing,
            mesh: self.mesh.clone(),
        };
        Self::build(table, carried, &self.routes)
    }

    /// Builds the routes' pools, taking those of `previous` routes that are unchanged.
    fn build(table: RouteTable, carried: Carried, previous: &[Route]) -> Self {
        let Carried {
            instance,
            limits,
            verifier,
            limiter,
            client,
            metrics,
            upstream_metrics,
            attempts,
            tunnels,
            draining,
            plain_http,
            server_timing,
            mesh,
        } = carried;
        let request_timeout = limits.request_timeout();
        // Routes to one service with one policy share a pool: one endpoint set, one outlier
        // state and one retry budget per service, as the service's callers see it.
        let mut discovered: Vec<(&str, &UpstreamConfig, Arc<Pool>)> = previous
            .iter()
            .filter(|old| old.config.upstream.is_none())
            .filter_map(|old| {
                let pool = old.pool.as_ref().ok()?;
                Some((
                    old.config.service.as_str(),
                    &old.config.policy,
                    pool.clone(),
                ))
            })
            .collect();
        let mut routes = Vec::with_capacity(table.routes().len());
        for route in table.routes() {
            let pool = match &route.upstream {
                Some(upstream) => match previous.iter().find_map(|old| {
                    let same =
                        old.config.prefix == route.prefix && old.config.upstream == route.upstream;
                    same.then(|| old.pool.as_ref().ok()).flatten()
                }) {
                    Some(pool) => Ok(pool.clone()),
                    None => Pool::fixed(
                        &instance,
                        route,
                        upstream,
                        request_timeout,
                        &upstream_metrics,
                        &attempts,
                    )
                    .map(Arc::new),
                },
                None => match discovered.iter().find(|(service, policy, _)| {
                    *service == route.service && **policy == route.policy
                }) {
                    Some((.., pool)) => Ok(pool.clone()),
                    None => {
                        let name = if discovered
                            .iter()
                            .any(|(service, ..)| *service == route.service)
                        {
                            format!("{}@{}", route.service, route.prefix)
                        } else {
                            route.service.clone()
                        };
                        match &mesh {
                            Some(MeshRole::Outbound(context)) => Pool::mesh(
                                name,
                                &route.service,
                                &route.policy,
                                context.clone(),
                                request_timeout,
                                &upstream_metrics,
                                &attempts,
                            ),
                            _ => Pool::discovered(
                                name,
                                &route.service,
                                &route.policy,
                                client.clone(),
                                request_timeout,
                                &upstream_metrics,
                                &attempts,
                            ),
                        }
                        .map(|pool| {
                            let pool = Arc::new(pool);
                            discovered.push((&route.service, &route.policy, pool.clone()));
                            pool
                        })
                    }
                },
            };
            let pool = pool.map_err(|err| {
                // The route answers 502 naming this rather than taking the proxy down.
                tracing::error!(route = %route.prefix, error = %err, "upstream unusable");
                err.to_string()
            });
            routes.push(Route {
                config: route.clone(),
                pool,
            });
        }
        Self {
            instance,
            routes,
            table,
            verifier,
            limiter,
            client,
            metrics,
            limits,
            upstream_metrics,
            attempts,
            tunnels,
            draining,
            plain_http,
            server_timing,
            mesh,
        }
    }

    /// Registers the upstreams' metrics (ejections, health, retries, budget, attempts and their
    /// latency per endpoint, for static and discovered upstreams alike) in the proxy's registry.
    pub fn register_upstream_metrics(&self, registry: &mut Registry) {
        self.upstream_metrics.register(registry);
        registry.register(
            "upstream_attempts",
            "Attempts per upstream endpoint, by status or failure",
            self.attempts.attempts.clone(),
        );
        registry.register(
            "upstream_attempt_duration_seconds",
            "Attempt latency to response headers per upstream endpoint",
            self.attempts.latency.0.clone(),
        );
        registry.register(
            "websocket_tunnels",
            "WebSocket tunnels that ended, by route and outcome (closed, error, upgrade_failed, \
             drained: closed by the proxy at the end of a drain's grace period)",
            self.tunnels.ended.clone(),
        );
        registry.register(
            "websocket_tunnels_open",
            "WebSocket tunnels open now, by route",
            self.tunnels.open.clone(),
        );
        registry.register(
            "websocket_tunnel_bytes",
            "Bytes carried by WebSocket tunnels, by route and direction",
            self.tunnels.bytes.clone(),
        );
    }

    /// Starts the active health checkers of upstreams that configure one (a discovered
    /// service's instances are checked on their admin ports); they stop on `shutdown`.
    pub fn spawn_health_checkers(&self, shutdown: &Shutdown) -> Vec<JoinHandle<()>> {
        let mut pools: Vec<&Arc<Pool>> = Vec::new();
        for route in &self.routes {
            if let Ok(pool) = &route.pool
                && !pools.iter().any(|seen| Arc::ptr_eq(seen, pool))
            {
                pools.push(pool);
            }
        }
        pools
            .into_iter()
            .filter_map(|pool| pool.upstream.spawn_health_checker(shutdown.clone()))
            .collect()
    }

    /// Marks the gateway as reached over plain HTTP (for `X-Forwarded-Proto` and Server-Timing).
    pub fn serving_plain_http(mut self) -> Self {
        self.plain_http = true;
        self
    }

    /// The drain of open WebSocket tunnels, for a shutdown: they carry on for `grace` (a client
    /// may close on its own, or reconnect elsewhere when told by the application), and those
    /// still open then are closed. Resolves when every tunnel has ended; tunnels opened during
    /// the drain get what is left of the grace period. Call it after the listener has stopped
    /// accepting, on the runtime(s) that serve the tunnels (each per-core worker awaiting it
    /// keeps its tunnels running until they end).
    pub async fn drain_tunnels(&self, grace: Duration) {
        let deadline = tokio::time::Instant::now() + grace;
        self.draining.send_if_modified(|current| {
            // An earlier drain's deadline stands.
            let first = current.is_none();
            if first {
                *current = Some(deadline);
            }
            first
        });
        let open = self.draining.receiver_count();
        if open > 0 {
            tracing::info!(
                open,
                grace_ms = grace.as_millis() as u64,
                "draining websocket tunnels"
            );
        }
        // Ends when the last tunnel's receiver is dropped; the margin covers closing them.
        let _ = tokio::time::timeout(grace + Duration::from_secs(1), self.draining.closed()).await;
    }

    /// The rate limit's state, for the task that shares its budget with the other instances.
    pub fn rate_limit(&self) -> Arc<RateLimit> {
        self.limiter.clone()
    }

    /// Forgets rate-limit state of clients that have been quiet, so memory stays bounded.
    pub fn forget_idle_clients(&self) {
        self.limiter.forget_idle_clients();
    }

    /// What the listener serving this gateway must apply (`causeway_core::serve::serve_limited`).
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Buffers a request body up to the limit (so that it can be retried on another instance),
    /// within the request timeout: a client that trickles its body gets 408.
    async fn read_body(&self, headers: &HeaderMap, body: Incoming) -> Result<Bytes, Refusal> {
        self.limits
            .check_declared_length(headers)
            .map_err(Refusal::Hygiene)?;
        let collected = self
            .limits
            .within_request_timeout(Limited::new(body, self.limits.max_body_bytes).collect())
            .await
            .map_err(Refusal::Hygiene)?;
        Ok(collected
            .map_err(|err| {
                if err.is::<http_body_util::LengthLimitError>() {
                    self.too_large()
                } else {
                    Refusal::Status(
                        StatusCode::BAD_REQUEST,
                        "body_unreadable",
                        format!("could not read the request body: {err}"),
                    )
                }
            })?
            .to_bytes())
    }

    /// The route for a request to `host` (`Host` or `:authority`) and `path`.
    fn route(&self, host: Option<&str>, path: &str) -> Option<&Route> {
        self.table
            .lookup(host, path)
            .and_then(|index| self.routes.get(index))
    }

    /// Where the routes came from, for logs.
    pub fn route_source(&self) -> &'static str {
        self.table.source()
    }

    fn too_large(&self) -> Refusal {
        Refusal::Hygiene(hygiene::Refusal::body_too_large(self.limits.max_body_bytes))
    }

    /// Request headers as they leave for the upstream: hop-by-hop fields removed (`Upgrade` too,
    /// unless a WebSocket upgrade is passed through; `te: trailers` stays for gRPC), every
    /// internal header the client sent removed (`causeway_core::principal::is_internal`), the
    /// principal and the `Server-Timing` request set only as the gateway decided them, then
    /// `X-Forwarded-*`, `Forwarded` and `Via` for this hop.
    fn prepare_request_headers(
        &self,
        headers: &mut HeaderMap,
        version: http::Version,
        authority: Option<&Authority>,
        peer: SocketAddr,
        caller: &Caller<'_>,
        upgrade: Upgrade,
    ) {
        hygiene::strip_hop_by_hop(headers, upgrade);
        match &self.mesh {
            // The edge trusts nothing internal a client sends.
            None => principal::strip_internal(headers),
            // Within the mesh the app's headers pass (the principal it acts for among them),
            // except the peer identity, which only an inbound sidecar states.
            Some(_) => {
                headers.remove(PEER_IDENTITY);
            }
        }
        if let Some(identity) = caller.mesh_peer
            && let Ok(value) = HeaderValue::try_from(identity.to_string())
        {
            headers.insert(PEER_IDENTITY, value);
        }
        if let Some(principal) = &caller.principal {
            principal.to_headers(headers);
        }
        if caller.timing {
            headers.insert(
                principal::SERVER_TIMING_REQUEST,
                HeaderValue::from_static("1"),
            );
        }
        // HTTP/1.1 names the host in `Host`, HTTP/2 in `:authority`.
        let host = headers
            .get(header::HOST)
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned)
            .or_else(|| authority.map(|authority| authority.as_str().to_owned()));
        hygiene::add_forwarding_headers(
            headers,
            &Forwarding {
                peer,
                proto: if self.plain_http { "http" } else { "https" },
                host: host.as_deref(),
                version,
                proxy_name: VIA_NAME,
            },
        );
    }

    /// Handles one request from `peer`.
    pub async fn handle(
        &self,
        request: Request<Incoming>,
        peer: SocketAddr,
    ) -> Response<ProxyBody> {
        self.handle_from(request, peer, None).await
    }

    /// Handles one request from `peer`, whose verified mesh identity is `mesh_peer` (an inbound
    /// sidecar's caller).
    pub async fn handle_from(
        &self,
        request: Request<Incoming>,
        peer: SocketAddr,
        mesh_peer: Option<&causeway_mesh::SpiffeId>,
    ) -> Response<ProxyBody> {
        let started = Instant::now();
        let trace = TraceContext::continue_from(request.headers());
        // Built once, sent upstream and back to the client.
        let request_id = HeaderValue::from_str(&trace.request_id).ok();
        let method = request.method().clone();
        // Cheap: a URI's parts are reference-counted.
        let uri = request.uri().clone();
        let version = request.version();
        let host = request
            .headers()
            .get(header::HOST)
            .and_then(|value| value.to_str().ok())
            .or_else(|| uri.authority().map(|authority| authority.as_str()));
        let route = self.route(host, uri.path());
        let route_name = route.map_or("unmatched", |route| route.config.prefix.as_str());

        let grpc = is_grpc(request.headers());
        let mut timing = self.server_timing == ServerTimingPolicy::Always;
        let (mut response, detail) = match self
            .forward(
                route,
                request,
                (peer, mesh_peer),
                &trace,
                request_id.as_ref(),
                &mut timing,
            )
            .await
        {
            Ok(forwarded) => forwarded,
            Err(refusal) => {
                if let Refusal::Hygiene(refusal) = &refusal {
                    refusal.log(peer, Some(&trace.request_id));
                }
                let response = if grpc {
                    grpc_refusal(refusal)
                } else {
                    refusal_response(refusal, &trace.request_id)
                };
                let detail = Cow::Owned(format!("{} refused the request", self.instance));
                (response, detail)
            }
        };
        let elapsed = started.elapsed();
        let headers = response.headers_mut();
        if let Some(value) = request_id {
            headers.insert(REQUEST_ID, value);
        }
        let transport = match &self.mesh {
            Some(MeshRole::Inbound(_)) => "mutual TLS",
            _ if self.plain_http => "plain HTTP",
            _ => "TLS",
        };
        let step = match &self.mesh {
            None => steps::EDGE_PROXY,
            Some(MeshRole::Outbound(_)) => steps::SIDECAR_OUTBOUND,
            Some(MeshRole::Inbound(_)) => steps::SIDECAR_INBOUND,
        };
        if !timing {
            // The internal hops' names and addresses stay inside.
            headers.remove(server_timing::SERVER_TIMING);
        }
        match detail {
            _ if !timing => {}
            // Formatted once at start-up and already escaped: one write per request.
            Cow::Borrowed(escaped) => {
                // Milliseconds with three decimals from integer microseconds (no float formatting).
                let micros = elapsed.as_micros();
                let mut value = String::with_capacity(escaped.len() + 64);
                let _ = write!(
                    value,
                    "{step};dur={}.{:03};desc=\"{escaped}; client spoke {version:?} over {transport}\"",
                    micros / 1000,
                    micros % 1000,
                );
                if let Ok(value) = HeaderValue::try_from(value) {
                    headers.append(server_timing::SERVER_TIMING, value);
                }
            }
            Cow::Owned(detail) => server_timing::append(
                headers,
                &TimingEntry::new(
                    step,
                    elapsed,
                    format!("{detail}; client spoke {version:?} over {transport}"),
                ),
            ),
        }
        let status = response.status().as_u16();
        self.metrics.observe(route_name, &method, status, elapsed);
        let identities = self.mesh.as_ref().map(|role| {
            let own = role.context().own_identity.to_string();
            match role {
                MeshRole::Outbound(_) => (own, route.map(|route| route.config.service.clone())),
                MeshRole::Inbound(_) => (
                    mesh_peer.map(ToString::to_string).unwrap_or_default(),
                    Some(own),
                ),
            }
        });
        let (source_identity, destination) = match &identities {
            Some((source, destination)) => (Some(source.as_str()), destination.as_deref()),
            None => (None, None),
        };
        tracing::info!(
            request_id = %trace.request_id,
            trace_id = %trace.trace_id,
            client = %peer,
            %method,
            path = uri.path(),
            status,
            elapsed_ms = elapsed.as_secs_f64() * 1000.0,
            source_identity,
            destination,
            "access"
        );
        response
    }

    /// Checks the request and forwards it; `timing` is set when the caller may see the hops'
    /// `Server-Timing` (the `debug` policy: once its token shows the `debug` scope).
    async fn forward<'a>(
        &'a self,
        route: Option<&'a Route>,
        request: Request<Incoming>,
        (peer, mesh_peer): (SocketAddr, Option<&causeway_mesh::SpiffeId>),
        trace: &TraceContext,
        request_id: Option<&HeaderValue>,
        timing: &mut bool,
    ) -> Result<(Response<ProxyBody>, Cow<'a, str>), Refusal> {
        // Framing first: nothing else may act on a request whose end is in doubt.
        hygiene::check_request_head(request.version(), request.headers())
            .map_err(Refusal::Hygiene)?;
        let route = route.ok_or_else(|| {
            Refusal::Status(
                StatusCode::NOT_FOUND,
                "no_route",
                format!("no route for {}", request.uri().path()),
            )
        })?;

        let principal = if route.config.auth {
            let claims = self
                .verifier
                .verify(
                    request
                        .headers()
                        .get(header::AUTHORIZATION)
                        .map(HeaderValue::as_bytes),
                )
                .map_err(Refusal::Unauthorized)?;
            Some(Principal::new(claims.sub, claims.scope.as_deref()))
        } else {
            None
        };
        if self.server_timing == ServerTimingPolicy::Debug {
            *timing = principal
                .as_ref()
                .is_some_and(|principal| principal.has_scope(principal::scopes::DEBUG));
        }

        if let Some(MeshRole::Inbound(context)) = &self.mesh {
            self.authorize(context, mesh_peer, &request, peer)?;
        }
        // A sidecar serves one app: the edge rate-limits what comes from outside.
        if self.mesh.is_none() {
            let client_key = match &principal {
                Some(principal) => ClientKey::Subject(principal.subject.clone()),
                None => ClientKey::Ip(peer.ip()),
            };
            if let Err(wait) = self.limiter.check(&client_key) {
                return Err(Refusal::RateLimited(wait));
            }
        }

        // Checked after auth and rate limiting: an upgrade is a request like any other until then.
        let websocket = is_websocket_upgrade(request.version(), request.headers());
        let pool = route.pool.as_ref().map_err(|problem| {
            Refusal::Status(
                StatusCode::BAD_GATEWAY,
                "no_upstream",
                format!(
                    "route {} has no usable upstream: {problem}",
                    route.config.prefix
                ),
            )
        })?;
        if websocket {
            match &pool.transport {
                Transport::Fixed(fixed) if fixed.protocol == UpstreamProtocol::Http1 => {}
                Transport::Fixed(_) => {
                    return Err(Refusal::Status(
                        StatusCode::NOT_IMPLEMENTED,
                        "websocket_unsupported",
                        format!(
                            "route {} forwards to its upstream over h2c, which cannot carry an \
                             HTTP/1.1 WebSocket upgrade; use an HTTP/1.1 upstream for WebSocket",
                            route.config.prefix
                        ),
                    ));
                }
                Transport::Mesh(mesh) => {
                    return Err(Refusal::Status(
                        StatusCode::NOT_IMPLEMENTED,
                        "websocket_unsupported",
                        format!(
                            "calls to {} cross the mesh over HTTP/2, which cannot carry an \
                             HTTP/1.1 WebSocket upgrade",
                            mesh.service
                        ),
                    ));
                }
                Transport::Discovered(discovered) => {
                    return Err(Refusal::Status(
                        StatusCode::NOT_IMPLEMENTED,
                        "websocket_unsupported",
                        format!(
                            "route {} forwards to service {} over HTTP/2, which cannot carry an \
                             HTTP/1.1 WebSocket upgrade; WebSocket is proxied only on routes \
                             with a static HTTP/1.1 upstream",
                            route.config.prefix, discovered.service
                        ),
                    ));
                }
            }
        }
        self.forward_upstream(
            route,
            pool,
            request,
            websocket,
            Caller {
                peer,
                mesh_peer,
                trace,
                request_id,
                principal,
                timing: *timing,
            },
        )
        .await
    }

    /// To the route's upstream: fixed addresses over plain HTTP on pooled keep-alive
    /// connections, or a discovered service's instances over HTTP/2 with TLS. The endpoint is
    /// picked per attempt by the route's [`Upstream`] (hash key from the headers), every
    /// outcome is recorded for outlier detection and the attempt metrics, and failed attempts
    /// are retried as its [`crate::upstream::RetrySession`] allows: idempotent requests on
    /// connect failure, reset or a retryable status, any request on a connect failure (nothing
    /// was sent), each attempt under the per-try timeout, all within the deadline and the retry
    /// budget. Buffered bodies can be sent again; a streamed one (gRPC, or large or unsized to
    /// fixed addresses, see [`REPLAY_LIMIT`]) only when it never left.
    ///
    /// A WebSocket upgrade (`websocket`) goes out with `Upgrade` and `Connection: upgrade`; it is
    /// retried only after a connect failure (nothing was sent), never after a status or once
    /// bytes went out. A 101 answer is returned with its `Upgrade` and the two upgraded
    /// connections spliced in a task of their own; any other answer passes through as is.
    async fn forward_upstream<'a>(
        &self,
        route: &Route,
        pool: &'a Arc<Pool>,
        mut request: Request<Incoming>,
        websocket: bool,
        caller: Caller<'_>,
    ) -> Result<(Response<ProxyBody>, Cow<'a, str>), Refusal> {
        let (peer, trace, request_id) = (caller.peer, caller.trace, caller.request_id);
        let mut client_upgrade = websocket.then(|| hyper::upgrade::on(&mut request));
        let (mut parts, body) = request.into_parts();
        self.limits
            .check_declared_length(&parts.headers)
            .map_err(Refusal::Hygiene)?;
        let path_and_query = match (&route.config.strip_prefix, parts.uri.path_and_query()) {
            (None, Some(path_and_query)) => path_and_query.clone(),
            _ => PathAndQuery::try_from(rewrite_path(&route.config, &parts.uri)).map_err(|_| {
                Refusal::Status(
                    StatusCode::BAD_REQUEST,
                    "bad_path",
                    format!("cannot forward {}", parts.uri.path()),
                )
            })?,
        };
        let original_authority = parts.uri.authority().cloned();
        let grpc = is_grpc(&parts.headers);
        let headers = &mut parts.headers;
        self.prepare_request_headers(
            headers,
            parts.version,
            original_authority.as_ref(),
            peer,
            &caller,
            if websocket {
                Upgrade::PassThrough
            } else {
                Upgrade::Strip
            },
        );
        inject_trace(trace, request_id, headers);

        let replayable = match &pool.transport {
            Transport::Fixed(_) => body
                .size_hint()
                .exact()
                .is_some_and(|length| length <= REPLAY_LIMIT),
            // gRPC streams both ways and its messages carry their own size limits.
            Transport::Discovered(_) | Transport::Mesh(_) => !grpc,
        };
        let (replay, mut streamed) = if body.is_end_stream() {
            (Some(Bytes::new()), None)
        } else if replayable {
            (Some(self.read_body(&parts.headers, body).await?), None)
        } else if grpc {
            (
                None,
                Some(body.map_err(|err| -> BoxError { Box::new(err) }).boxed()),
            )
        } else {
            let limited = Limited::new(body, self.limits.max_body_bytes);
            (
                None,
                Some(limited.map_err(|err| -> BoxError { err }).boxed()),
            )
        };

        let upstream = &pool.upstream;
        let mut session = upstream
            .retry_session(parts.method.clone())
            .with_idempotency_key(parts.headers.contains_key(IDEMPOTENCY_KEY));
        loop {
            let Some(attempt_timeout) = session.attempt_timeout() else {
                return Err(Refusal::Status(
                    StatusCode::GATEWAY_TIMEOUT,
                    "upstream_timeout",
                    format!("{} did not answer within the deadline", upstream.name()),
                ));
            };
            let guard = pool.pick(&parts.headers).await.map_err(|message| {
                Refusal::Status(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "upstream_unavailable",
                    message,
                )
            })?;
            let endpoint = guard.endpoint().clone();
            let addr = endpoint.addr();
            let body = match (&replay, streamed.take()) {
                (Some(bytes), _) => Full::new(bytes.clone())
                    .map_err(|never| match never {})
                    .boxed(),
                (None, Some(body)) => body,
                // A streamed body went with an earlier attempt; the loop ends after it.
                (None, None) => break,
            };
            let attempt =
                pool.attempt(addr, &parts.method, &parts.headers, &path_and_query, body)?;
            let failure = match pool.send(guard, attempt, attempt_timeout).await {
                Ok(mut response) => {
                    let status = response.status();
                    let detail = match pool.fixed_detail(addr) {
                        Some(detail) => Cow::Borrowed(detail),
                        None => Cow::Owned(self.service_detail(
                            &route.config,
                            &parts.uri,
                            &path_and_query,
                            caller.principal.as_ref().map(|p| p.subject.as_str()),
                            endpoint.id(),
                        )),
                    };
                    if status == StatusCode::SWITCHING_PROTOCOLS
                        && let Some(client_upgrade) = client_upgrade.take()
                    {
                        let upstream_upgrade = hyper::upgrade::on(&mut response);
                        self.splice(Tunnel {
                            route: route.config.prefix.clone(),
                            peer,
                            upstream: addr,
                            request_id: trace.request_id.clone(),
                            client: client_upgrade,
                            upstream_io: upstream_upgrade,
                        });
                        let (mut parts, _) = response.into_parts();
                        hygiene::strip_hop_by_hop(&mut parts.headers, Upgrade::PassThrough);
                        hygiene::add_via(&mut parts.headers, parts.version, VIA_NAME);
                        let body = Full::new(Bytes::new())
                            .map_err(|never| match never {})
                            .boxed();
                        return Ok((Response::from_parts(parts, body), detail));
                    }
                    // An upgrade that got an answer is never sent again.
                    let retryable = !websocket
                        && upstream
                            .config()
                            .retry
                            .retry_statuses
                            .contains(&status.as_u16());
                    if retryable
                        && replay.is_some()
                        && session.after_failure(FailureKind::Status(status), true)
                            == RetryDecision::Retry
                    {
                        back_off(&session).await;
                        continue;
                    }
                    let (mut parts, body) = response.into_parts();
                    prepare_response_headers(&mut parts.headers, parts.version);
                    let body = body.map_err(|err| -> BoxError { Box::new(err) }).boxed();
                    return Ok((Response::from_parts(parts, body), detail));
                }
                Err(failure) => failure,
            };
            // A request that never left keeps its body, streamed or not.
            if let Some(unsent) = failure.unsent
                && replay.is_none()
            {
                streamed = Some(unsent.into_body());
            }
            let bytes_sent = failure.kind != FailureKind::ConnectFailure;
            if (replay.is_none() && streamed.is_none())
                || (websocket && bytes_sent)
                || session.after_failure(failure.kind, bytes_sent) != RetryDecision::Retry
            {
                return Err(failure.refusal);
            }
            back_off(&session).await;
        }
        Err(Refusal::Status(
            StatusCode::BAD_GATEWAY,
            "upstream_unavailable",
            format!("{} could not be reached", upstream.name()),
        ))
    }

    /// An inbound sidecar's check of a call against the mesh policy in force: the caller's
    /// verified identity, method and path; a denial names the rule (or the default deny) in
    /// the 403 and in a log line.
    fn authorize(
        &self,
        context: &crate::sidecar::MeshContext,
        caller: Option<&causeway_mesh::SpiffeId>,
        request: &Request<Incoming>,
        peer: SocketAddr,
    ) -> Result<(), Refusal> {
        let applied = context.applied().map_err(|message| {
            Refusal::Status(StatusCode::SERVICE_UNAVAILABLE, "mesh_not_ready", message)
        })?;
        let method = request.method().as_str();
        let path = request.uri().path();
        let decision = applied
            .policy
            .authorize(&context.service, caller, method, path);
        if decision.allowed() {
            return Ok(());
        }
        let caller_name =
            caller.map_or_else(|| "no mesh identity".to_string(), ToString::to_string);
        let reason = decision.reason(&context.service);
        tracing::warn!(
            event = "mesh.denied",
            source_identity = %caller_name,
            destination = %context.service,
            client = %peer,
            method,
            path,
            policy_version = applied.version,
            reason = %reason,
            "call denied by mesh policy"
        );
        Err(Refusal::Status(
            StatusCode::FORBIDDEN,
            "mesh_policy_denied",
            format!(
                "{caller_name} may not call {method} {path} on {}: {reason}",
                context.service
            ),
        ))
    }

    /// The Server-Timing description of a request routed to a discovered service.
    fn service_detail(
        &self,
        route: &RouteConfig,
        uri: &Uri,
        upstream_path: &PathAndQuery,
        subject: Option<&str>,
        instance: &str,
    ) -> String {
        format!(
            "{} checked {}, rate limit ok, routed {} to {} ({instance}) as {}",
            self.instance,
            match subject {
                Some(sub) => format!("JWT sub={sub}"),
                None => "no auth (public route)".to_string(),
            },
            uri.path(),
            route.service,
            upstream_path.as_str(),
        )
    }

    /// Splices an upgraded client connection to the upgraded upstream one in a task of its own,
    /// which ends when either side closes (or fails), or when a drain's grace period is over
    /// (see [`drain_tunnels`](Self::drain_tunnels)), and then logs one line and counts the
    /// tunnel with the bytes carried each way.
    fn splice(&self, tunnel: Tunnel) {
        let metrics = self.tunnels.clone();
        // Held for the tunnel's life: the drain waits for every receiver to go.
        let mut draining = self.draining.subscribe();
        tokio::spawn(async move {
            let Tunnel {
                route,
                peer,
                upstream,
                request_id,
                client,
                upstream_io,
            } = tunnel;
            let opened = Instant::now();
            let (client, upstream_io) = match tokio::try_join!(client, upstream_io) {
                Ok(both) => both,
                Err(err) => {
                    tracing::warn!(
                        %request_id,
                        client = %peer,
                        %upstream,
                        route = %route,
                        error = %err,
                        "websocket upgrade failed after 101"
                    );
                    metrics
                        .ended
                        .get_or_create(&TunnelLabels {
                            route,
                            outcome: "upgrade_failed",
                        })
                        .inc();
                    return;
                }
            };
            // A handle of its own: the family's lock is not held while the tunnel runs.
            let open = metrics
                .open
                .get_or_create(&TunnelRouteLabels {
                    route: route.clone(),
                })
                .clone();
            open.inc();
            let mut client = Counted::new(TokioIo::new(client));
            let mut upstream_io = Counted::new(TokioIo::new(upstream_io));
            let result = {
                let copy = tokio::io::copy_bidirectional(&mut client, &mut upstream_io);
                tokio::pin!(copy);
                tokio::select! {
                    result = &mut copy => Some(result),
                    deadline = drain_deadline(&mut draining) => {
                        tokio::time::timeout_at(deadline, &mut copy).await.ok()
                    }
                }
            };
            let drained = result.is_none();
            if drained {
                // Bytes are spliced, not framed, so no WebSocket close frame can be sent
                // safely mid-stream: both sides see the connection end (TLS close_notify and
                // FIN towards the client).
                use tokio::io::AsyncWriteExt as _;
                let _ = tokio::time::timeout(Duration::from_millis(100), async {
                    let _ = client.shutdown().await;
                    let _ = upstream_io.shutdown().await;
                })
                .await;
            }
            let result = result.unwrap_or(Ok((0, 0)));
            open.dec();
            drop(draining);
            // Bytes read from one side are the bytes carried towards the other.
            let (to_upstream, to_client) = (client.read, upstream_io.read);
            let outcome = match (&result, drained) {
                (_, true) => "drained",
                (Ok(_), false) => "closed",
                (Err(_), false) => "error",
            };
            metrics
                .ended
                .get_or_create(&TunnelLabels {
                    route: route.clone(),
                    outcome,
                })
                .inc();
            for (direction, bytes) in [("to_upstream", to_upstream), ("to_client", to_client)] {
                metrics
                    .bytes
                    .get_or_create(&TunnelBytesLabels {
                        route: route.clone(),
                        direction,
                    })
                    .inc_by(bytes);
            }
            let error = result.err().map(|err| err.to_string());
            tracing::info!(
                %request_id,
                client = %peer,
                %upstream,
                route = %route,
                outcome,
                to_upstream_bytes = to_upstream,
                to_client_bytes = to_client,
                duration_ms = opened.elapsed().as_secs_f64() * 1000.0,
                error = error.as_deref().unwrap_or(""),
                "websocket tunnel ended"
            );
        });
    }
}

/// When the drain that has begun (or begins later) ends; never, if the gateway is gone.
/// Waits out the retry's backoff, if its policy has one (no timer otherwise).
async fn back_off(session: &crate::upstream::RetrySession<'_>) {
    let wait = session.backoff();
    if !wait.is_zero() {
        tokio::time::sleep(wait).await;
    }
}

async fn drain_deadline(
    draining: &mut tokio::sync::watch::Receiver<Option<tokio::time::Instant>>,
) -> tokio::time::Instant {
    // The borrowed value is copied out at once: it holds a lock.
    let deadline = draining
        .wait_for(Option::is_some)
        .await
        .map(|deadline| deadline.unwrap_or_else(tokio::time::Instant::now));
    match deadline {
        Ok(deadline) => deadline,
        Err(_) => std::future::pending().await,
    }
}

/// An upgraded client connection and the upstream's, to be spliced.
struct Tunnel {
    route: String,
    peer: SocketAddr,
    upstream: SocketAddr,
    request_id: String,
    client: hyper::upgrade::OnUpgrade,
    upstream_io: hyper::upgrade::OnUpgrade,
}

/// Counts the bytes read through an I/O object (for a tunnel's byte counts even when it ends in
/// an error, which `copy_bidirectional` reports without them).
struct Counted<T> {
    inner: T,
    read: u64,
}

impl<T> Counted<T> {
    fn new(inner: T) -> Self {
        Self { inner, read: 0 }
    }
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Counted<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        let added = buf.filled().len().saturating_sub(before) as u64;
        self.read += added;
        polled
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Counted<T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// An HTTP/1.1 WebSocket handshake: `Connection` naming `upgrade` and `Upgrade` naming
/// `websocket`. Other upgrades (h2c, TLS) are not passed through; their `Upgrade` is stripped.
fn is_websocket_upgrade(version: http::Version, headers: &HeaderMap) -> bool {
    fn names(headers: &HeaderMap, name: HeaderName, token: &str) -> bool {
        headers
            .get_all(name)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(','))
            .any(|item| {
                // `Upgrade` tokens may carry a version (`websocket/13`).
                item.split('/')
                    .next()
                    .is_some_and(|item| item.trim().eq_ignore_ascii_case(token))
            })
    }
    version == http::Version::HTTP_11
        && names(headers, header::CONNECTION, "upgrade")
        && names(headers, header::UPGRADE, "websocket")
}

/// gRPC requests are recognised by their content type (`application/grpc`, `+proto`, ...).
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|value| value.as_bytes().starts_with(b"application/grpc"))
}

fn rewrite_path(route: &RouteConfig, uri: &http::Uri) -> String {
    let path = uri.path();
    let stripped = route
        .strip_prefix
        .as_deref()
        .and_then(|prefix| path.strip_prefix(prefix))
        .unwrap_or(path);
    let stripped = if stripped.starts_with('/') {
        stripped.to_string()
    } else {
        format!("/{stripped}")
    };
    match uri.query() {
        Some(query) => format!("{stripped}?{query}"),
        None => stripped,
    }
}

/// Sets `traceparent` (this hop as the parent) and `x-request-id` on an upstream request,
/// written directly rather than through an OpenTelemetry propagator, as it runs per request.
fn inject_trace(trace: &TraceContext, request_id: Option<&HeaderValue>, headers: &mut HeaderMap) {
    let flags = if trace.sampled { "01" } else { "00" };
    let mut traceparent = String::with_capacity(55);
    let _ = write!(
        traceparent,
        "00-{}-{}-{flags}",
        trace.trace_id, trace.span_id
    );
    if let Ok(value) = HeaderValue::try_from(traceparent) {
        headers.insert(TRACEPARENT, value);
    }
    if let Some(value) = request_id {
        headers.insert(REQUEST_ID, value.clone());
    }
}

/// Escapes a Server-Timing description (a quoted string): no controls, `"` and `\` escaped.
fn escape_description(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars().filter(|c| !c.is_control()) {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Response headers as they go back to the client: hop-by-hop fields gone, this hop in `Via`
/// (with the protocol the upstream answered in).
fn prepare_response_headers(headers: &mut HeaderMap, version: http::Version) {
    hygiene::strip_hop_by_hop(headers, Upgrade::Strip);
    hygiene::add_via(headers, version, VIA_NAME);
}

fn full(response: Response<Full<Bytes>>) -> Response<ProxyBody> {
    response.map(|body| body.map_err(|never| match never {}).boxed())
}

/// A refusal as gRPC clients expect it: HTTP 200 with the status in a trailers-only response.
fn grpc_refusal(refusal: Refusal) -> Response<ProxyBody> {
    // Codes from grpc/doc/statuscodes.md and the HTTP-to-gRPC mapping.
    let (code, message, retry_after) = match refusal {
        Refusal::Unauthorized(err) => (16, err.to_string(), None),
        Refusal::RateLimited(wait) => (8, "too many requests".to_string(), Some(wait)),
        Refusal::Status(status, _, message)
        | Refusal::Hygiene(hygiene::Refusal {
            status,
            detail: message,
            ..
        }) => {
            let code = match status {
                StatusCode::BAD_REQUEST => 3,
                StatusCode::NOT_FOUND => 12,
                StatusCode::PAYLOAD_TOO_LARGE => 8,
                StatusCode::GATEWAY_TIMEOUT => 4,
                StatusCode::SERVICE_UNAVAILABLE => 14,
                _ => 13,
            };
            (code, message, None)
        }
    };
    let mut response = Response::new(
        Full::new(Bytes::new())
            .map_err(|never| match never {})
            .boxed(),
    );
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    headers.insert("grpc-status", HeaderValue::from(code));
    // grpc-message is percent-encoded; keeping it to printable ASCII keeps it valid as is.
    let printable: String = message
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .collect::<String>()
        .replace('%', "%25");
    if let Ok(value) = HeaderValue::from_str(&printable) {
        headers.insert("grpc-message", value);
    }
    if let Some(wait) = retry_after {
        headers.insert(
            header::RETRY_AFTER,
            HeaderValue::from(wait.as_secs_f64().ceil().max(1.0) as u64),
        );
    }
    response
}

fn refusal_response(refusal: Refusal, request_id: &str) -> Response<ProxyBody> {
    match refusal {
        Refusal::Status(status, code, message) => {
            full(error_response(status, code, message, Some(request_id)))
        }
        Refusal::Hygiene(refusal) => {
            let mut response = full(error_response(
                refusal.status,
                refusal.reason,
                refusal.detail,
                Some(request_id),
            ));
            // After a malformed head the next request on the connection cannot be trusted to
            // start where we think it does.
            if refusal.status == StatusCode::BAD_REQUEST {
                response
                    .headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            response
        }
        Refusal::Unauthorized(err) => {
            let mut response = full(error_response(
                StatusCode::UNAUTHORIZED,
                err.code(),
                err.to_string(),
                Some(request_id),
            ));
            let challenge = match err {
                AuthError::Missing => "Bearer".to_string(),
                err => format!(
                    "Bearer error=\"invalid_token\", error_description=\"{}\"",
                    err.code()
                ),
            };
            if let Ok(value) = HeaderValue::from_str(&challenge) {
                response
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, value);
            }
            response
        }
        Refusal::RateLimited(wait) => {
            let seconds = wait.as_secs_f64().ceil().max(1.0) as u64;
            let mut response = full(error_response(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                format!("too many requests; retry after {seconds} s"),
                Some(request_id),
            ));
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
            response
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use causeway_core::topology::StaticUpstream;
    use hyper_util::rt::TokioExecutor;

    mod discovered;

    fn route(prefix: &str, strip: Option<&str>) -> RouteConfig {
        RouteConfig {
            policy: causeway_core::topology::service_route_policy(),
            prefix: prefix.into(),
            service: "user-service".into(),
            strip_prefix: strip.map(str::to_owned),
            auth: true,
            upstream: None,
        }
    }

    #[test]
    fn rewrites_paths_and_keeps_queries() {
        let uri: http::Uri = "/api/users/123/orders?x=1".parse().unwrap();
        assert_eq!(
            rewrite_path(&route("/api/users/", Some("/api")), &uri),
            "/users/123/orders?x=1"
        );
        assert_eq!(
            rewrite_path(&route("/api/users/", None), &uri),
            "/api/users/123/orders?x=1"
        );
        let uri: http::Uri = "/api".parse().unwrap();
        assert_eq!(rewrite_path(&route("/api", Some("/api")), &uri), "/");
    }

    #[test]
    fn grpc_is_recognised_by_content_type() {
        let mut headers = HeaderMap::new();
        assert!(!is_grpc(&headers));
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc+proto"),
        );
        assert!(is_grpc(&headers));
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        assert!(!is_grpc(&headers));
    }

    #[test]
    fn grpc_refusals_are_trailers_only_responses_with_grpc_codes() {
        let unauthenticated = grpc_refusal(Refusal::Unauthorized(AuthError::Expired));
        assert_eq!(unauthenticated.status(), StatusCode::OK);
        assert_eq!(unauthenticated.headers()["grpc-status"], "16");
        assert_eq!(
            unauthenticated.headers()["grpc-message"],
            "the token expired"
        );
        let limited = grpc_refusal(Refusal::RateLimited(Duration::from_millis(1500)));
        assert_eq!(limited.headers()["grpc-status"], "8");
        assert_eq!(limited.headers()[header::RETRY_AFTER], "2");
        let unavailable = grpc_refusal(Refusal::Status(
            StatusCode::SERVICE_UNAVAILABLE,
            "upstream_unavailable",
            "no instances of pricing-service: 100% down\n".into(),
        ));
        assert_eq!(unavailable.headers()["grpc-status"], "14");
        assert_eq!(
            unavailable.headers()["grpc-message"],
            "no instances of pricing-service: 100%25 down?"
        );
    }

    /// A gateway with one public route to fixed `addrs`, serving plain HTTP on a free port.
    async fn static_gateway(
        addrs: Vec<SocketAddr>,
        protocol: UpstreamProtocol,
    ) -> (SocketAddr, causeway_core::serve::ShutdownTrigger) {
        let mut metrics = causeway_core::telemetry::Metrics::new("reverse-proxy", "test");
        let client = idle_client(&mut metrics);
        let config = ReverseProxyConfig {
            routes: vec![static_route(addrs, protocol)],
            request_timeout_ms: 2000,
            ..ReverseProxyConfig::default()
        };
        start_gateway(config, client, metrics).await
    }

    fn static_route(addrs: Vec<SocketAddr>, protocol: UpstreamProtocol) -> RouteConfig {
        RouteConfig {
            policy: causeway_core::topology::service_route_policy(),
            prefix: "/static/".into(),
            service: String::new(),
            strip_prefix: Some("/static".into()),
            auth: false,
            upstream: Some(StaticUpstream {
                addrs,
                protocol,
                pool_idle_timeout_ms: 1000,
                pool_max_idle_per_addr: 4,
                policy: Default::default(),
            }),
        }
    }

    /// A service client that never finds anything (static routes do not use it).
    fn idle_client(metrics: &mut causeway_core::telemetry::Metrics) -> ServiceClient {
        use causeway_core::topology::ClientConfig;
        let dir = std::env::temp_dir().join(format!(
            "causeway-gateway-test-{}-{}",
            std::process::id(),
            NEXT_DIR.fetch_add(1, Ordering::Relaxed)
        ));
        let ca = causeway_core::tls::LocalCa::load_or_create(&dir).unwrap();
        let settings = causeway_client::ClientSettings {
            dns_addr: "127.0.0.1:9".parse().unwrap(),
            zone: "internal".into(),
            config: ClientConfig::default(),
        };
        let client = ServiceClient::new(settings, &ca.ca_cert_path(), metrics).unwrap();
        // The client has read the CA; nothing else is needed from the directory.
        let _ = std::fs::remove_dir_all(&dir);
        client
    }

    static NEXT_DIR: AtomicUsize = AtomicUsize::new(0);

    /// Serves `config` on plain HTTP on a free port until the trigger fires or drops.
    async fn start_gateway(
        config: ReverseProxyConfig,
        client: ServiceClient,
        mut metrics: causeway_core::telemetry::Metrics,
    ) -> (SocketAddr, causeway_core::serve::ShutdownTrigger) {
        serve_gateway(Arc::new(test_gateway(&config, client, &mut metrics))).await
    }

    /// A gateway for `config`, reached over plain HTTP.
    fn test_gateway(
        config: &ReverseProxyConfig,
        client: ServiceClient,
        metrics: &mut causeway_core::telemetry::Metrics,
    ) -> Gateway {
        Gateway::new(
            "reverse-proxy-test".into(),
            config,
            b"test-key",
            Arc::new(client),
            metrics.http_server(),
        )
        .serving_plain_http()
    }

    /// A gateway (not yet served) with one public route to fixed `addrs` over HTTP/1.1.
    fn static_test_gateway(addrs: Vec<SocketAddr>) -> Arc<Gateway> {
        let mut metrics = causeway_core::telemetry::Metrics::new("reverse-proxy", "test");
        let client = idle_client(&mut metrics);
        let config = ReverseProxyConfig {
            routes: vec![static_route(addrs, UpstreamProtocol::Http1)],
            request_timeout_ms: 2000,
            ..ReverseProxyConfig::default()
        };
        Arc::new(test_gateway(&config, client, &mut metrics))
    }

    /// Serves `gateway` on plain HTTP on a free port until the trigger fires or drops.
    async fn serve_gateway(
        gateway: Arc<Gateway>,
    ) -> (SocketAddr, causeway_core::serve::ShutdownTrigger) {
        let gateway_limits = gateway.limits().clone();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (trigger, shutdown) = causeway_core::serve::shutdown_channel();
        let make_service = move |peer: SocketAddr| {
            let gateway = gateway.clone();
            hyper::service::service_fn(move |request| {
                let gateway = gateway.clone();
                async move { Ok::<_, std::convert::Infallible>(gateway.handle(request, peer).await) }
            })
        };
        let limits = gateway_limits;
        let connections = hygiene::ConnectionLimiter::new(limits.max_connections);
        tokio::spawn(async move {
            causeway_core::serve::serve_limited(
                listener,
                None,
                make_service,
                shutdown,
                Duration::from_millis(100),
                Some(&limits),
                connections,
            )
            .await
        });
        (addr, trigger)
    }

    /// An upstream (HTTP/1.1 or h2c) answering with the path, protocol and trace headers it saw.
    async fn echo_upstream() -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let service = hyper::service::service_fn(|request: Request<Incoming>| async move {
                    let body = format!(
                        "upstream saw {} over {:?} traceparent={} forwarded-proto={}",
                        request.uri().path_and_query().map_or("", |pq| pq.as_str()),
                        request.version(),
                        request.headers().contains_key(TRACEPARENT),
                        request.headers()["x-forwarded-proto"]
                            .to_str()
                            .unwrap_or(""),
                    );
                    Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from(body))))
                });
                tokio::spawn(async move {
                    let builder =
                        hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    let _ = builder
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn static_upstream_routes_answer_through_the_gateway() {
        let upstream = echo_upstream().await;
        for (protocol, version) in [
            (UpstreamProtocol::Http1, "HTTP/1.1"),
            (UpstreamProtocol::H2c, "HTTP/2.0"),
        ] {
            let (gateway, _stop) = static_gateway(vec![upstream], protocol).await;
            for _ in 0..3 {
                let (status, body) = causeway_client::plain_http::request(
                    http::Method::GET,
                    gateway,
                    "/static/hello?x=1",
                    None,
                    Duration::from_secs(5),
                )
                .await
                .unwrap();
                assert_eq!(status, StatusCode::OK);
                assert_eq!(
                    std::str::from_utf8(&body).unwrap(),
                    format!(
                        "upstream saw /hello?x=1 over {version} traceparent=true forwarded-proto=http"
                    )
                );
            }
        }
    }

    #[tokio::test]
    async fn a_dead_static_upstream_gives_a_json_502() {
        let dead = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap()
        };
        let (gateway, _stop) = static_gateway(vec![dead], UpstreamProtocol::Http1).await;
        let (status, body) = causeway_client::plain_http::request(
            http::Method::GET,
            gateway,
            "/static/hello",
            None,
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        assert_eq!(status, StatusCode::BAD_GATEWAY);
        let error: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(error["error"], "upstream_unavailable", "{error}");
        let message = error["message"].as_str().unwrap_or_default();
        assert!(message.contains(&dead.to_string()), "{message}");
    }

    /// An upstream answering with the request headers it saw as a JSON object (one string per
    /// name, lines joined with "\n"), and with hop-by-hop headers of its own on the response.
    async fn header_echo_upstream() -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let service = hyper::service::service_fn(|request: Request<Incoming>| async move {
                    let mut seen = serde_json::Map::new();
                    for name in request.headers().keys() {
                        let lines: Vec<&str> = request
                            .headers()
                            .get_all(name)
                            .iter()
                            .map(|value| value.to_str().unwrap_or("?"))
                            .collect();
                        seen.insert(name.to_string(), lines.join("\n").into());
                    }
                    let body = serde_json::to_vec(&seen).unwrap_or_default();
                    let response = Response::builder()
                        .header("connection", "x-upstream-hop")
                        .header("x-upstream-hop", "1")
                        .header("keep-alive", "timeout=5")
                        .body(Full::new(Bytes::from(body)))
                        .unwrap();
                    Ok::<_, std::convert::Infallible>(response)
                });
                tokio::spawn(async move {
                    let builder = hyper::server::conn::http1::Builder::new();
                    let _ = builder
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        addr
    }

    /// Sends `raw` as is and reads the answer until the server closes the connection.
    async fn raw_exchange(addr: SocketAddr, raw: &str) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream.write_all(raw.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer)).await;
        String::from_utf8_lossy(&answer).into_owned()
    }

    /// The head of an HTTP/1.1 answer, lower-cased, and its body.
    fn split_answer(answer: &str) -> (String, &str) {
        let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((answer, ""));
        (head.to_ascii_lowercase(), body)
    }

    #[tokio::test]
    async fn hop_by_hop_headers_stop_here_and_forwarding_headers_are_added() {
        let upstream = header_echo_upstream().await;
        let (gateway, _stop) = static_gateway(vec![upstream], UpstreamProtocol::Http1).await;
        let answer = raw_exchange(
            gateway,
            "GET /static/h HTTP/1.1\r\nHost: shop.example:8080\r\n\
             Connection: close, x-secret-hop\r\nx-secret-hop: 1\r\nKeep-Alive: timeout=9\r\n\
             Proxy-Authorization: Basic eA==\r\nTE: trailers, deflate\r\nUpgrade: websocket\r\n\
             X-Forwarded-For: 10.9.8.7\r\nx-authenticated-subject: forged\r\n\
             x-end-to-end: kept\r\n\r\n",
        )
        .await;
        let (head, body) = split_answer(&answer);
        assert!(head.starts_with("http/1.1 200"), "{answer}");
        let seen: serde_json::Value = serde_json::from_str(body).unwrap();
        for gone in [
            "x-secret-hop",
            "keep-alive",
            "proxy-authorization",
            "upgrade",
            "x-authenticated-subject",
        ] {
            assert!(
                seen.get(gone).is_none(),
                "{gone} reached the upstream: {seen}"
            );
        }
        // hyper's client sets its own `connection` only when it closes; never the client's.
        assert_ne!(seen["connection"], "close, x-secret-hop", "{seen}");
        assert_eq!(seen["te"], "trailers", "{seen}");
        assert_eq!(seen["x-end-to-end"], "kept");
        assert_eq!(seen["x-forwarded-for"], "10.9.8.7, 127.0.0.1", "{seen}");
        assert_eq!(seen["x-forwarded-proto"], "http");
        assert_eq!(seen["x-forwarded-host"], "shop.example:8080");
        let forwarded = seen["forwarded"].as_str().unwrap_or_default();
        assert!(
            forwarded.starts_with("for=\"127.0.0.1:")
                && forwarded.ends_with(";proto=http;host=\"shop.example:8080\""),
            "{forwarded}"
        );
        assert_eq!(seen["via"], "1.1 causeway");
        // And on the way back: the upstream's hop-by-hop headers stay behind, Via is added.
        assert!(!head.contains("x-upstream-hop"), "{head}");
        assert!(!head.contains("keep-alive"), "{head}");
        assert!(head.contains("\r\nvia: 1.1 causeway"), "{head}");
    }

    #[tokio::test]
    async fn a_smuggling_attempt_gets_400_and_the_next_request_works() {
        let upstream = echo_upstream().await;
        let (gateway, _stop) = static_gateway(vec![upstream], UpstreamProtocol::Http1).await;
        // hyper accepts `gzip, chunked` (its last coding is chunked); the check does not.
        let answer = raw_exchange(
            gateway,
            "POST /static/x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n\
             0\r\n\r\nGET /static/smuggled HTTP/1.1\r\nHost: a\r\n\r\n",
        )
        .await;
        let (head, body) = split_answer(&answer);
        assert!(head.starts_with("http/1.1 400"), "{answer}");
        assert!(head.contains("connection: close"), "{head}");
        assert!(
            !answer.contains("smuggled"),
            "the smuggled request was answered: {answer}"
        );
        let error: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(error["error"], "unsupported_transfer_encoding", "{error}");
        assert!(error["request_id"].is_string(), "{error}");

        let answer = raw_exchange(
            gateway,
            "GET /static/ok HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.contains("upstream saw /ok"), "{answer}");
    }

    /// A gateway with one static route to `upstream` under these listener limits.
    async fn limited_gateway(
        upstream: SocketAddr,
        limits: Limits,
    ) -> (SocketAddr, causeway_core::serve::ShutdownTrigger) {
        let mut metrics = causeway_core::telemetry::Metrics::new("reverse-proxy", "test");
        let client = idle_client(&mut metrics);
        let config = ReverseProxyConfig {
            routes: vec![static_route(vec![upstream], UpstreamProtocol::Http1)],
            request_timeout_ms: 2000,
            limits,
            ..ReverseProxyConfig::default()
        };
        start_gateway(config, client, metrics).await
    }

    #[tokio::test]
    async fn a_header_section_over_the_limit_gets_431() {
        let upstream = echo_upstream().await;
        let limits = Limits {
            max_header_bytes: 8192,
            ..Limits::default()
        };
        let (gateway, _stop) = limited_gateway(upstream, limits).await;
        let big = "x".repeat(9000);
        let answer = raw_exchange(
            gateway,
            &format!(
                "GET /static/a HTTP/1.1\r\nHost: a\r\nx-big: {big}\r\nConnection: close\r\n\r\n"
            ),
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
        let small = raw_exchange(
            gateway,
            "GET /static/a HTTP/1.1\r\nHost: a\r\nx-small: 1\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(small.starts_with("HTTP/1.1 200"), "{small}");
    }

    #[tokio::test]
    async fn connections_over_the_limit_are_refused_with_503() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let upstream = echo_upstream().await;
        let limits = Limits {
            max_connections: 1,
            ..Limits::default()
        };
        let (gateway, _stop) = limited_gateway(upstream, limits).await;
        // One kept-alive connection holds the only slot.
        let mut held = tokio::net::TcpStream::connect(gateway).await.unwrap();
        held.write_all(b"GET /static/a HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 12];
        held.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"HTTP/1.1 200");

        let refused = raw_exchange(gateway, "GET /static/a HTTP/1.1\r\nHost: a\r\n\r\n").await;
        let (head, body) = split_answer(&refused);
        assert!(head.starts_with("http/1.1 503"), "{refused}");
        assert!(body.contains("too_many_connections"), "{body}");

        // Once it closes, the slot is free again.
        drop(held);
        let mut answer = String::new();
        for _ in 0..50 {
            answer = raw_exchange(
                gateway,
                "GET /static/a HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
            )
            .await;
            if answer.starts_with("HTTP/1.1 200") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }

    use std::sync::atomic::{AtomicUsize, Ordering};

    /// An upstream answering every request with `status` and its `name`, counting requests.
    async fn named_upstream(
        name: &'static str,
        status: StatusCode,
    ) -> (SocketAddr, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let counter = hits.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let counter = counter.clone();
                let service = hyper::service::service_fn(move |_request: Request<Incoming>| {
                    counter.fetch_add(1, Ordering::SeqCst);
                    let mut response = Response::new(Full::new(Bytes::from(name)));
                    *response.status_mut() = status;
                    async move { Ok::<_, std::convert::Infallible>(response) }
                });
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        (addr, hits)
    }

    async fn policy_gateway(
        addrs: Vec<SocketAddr>,
        policy: crate::upstream::UpstreamConfig,
    ) -> (SocketAddr, causeway_core::serve::ShutdownTrigger) {
        let mut metrics = causeway_core::telemetry::Metrics::new("reverse-proxy", "test");
        let client = idle_client(&mut metrics);
        let mut route = static_route(addrs, UpstreamProtocol::Http1);
        if let Some(upstream) = route.upstream.as_mut() {
            upstream.policy = policy;
        }
        let config = ReverseProxyConfig {
            routes: vec![route],
            request_timeout_ms: 3000,
            ..ReverseProxyConfig::default()
        };
        start_gateway(config, client, metrics).await
    }

    async fn get(gateway: SocketAddr, method: http::Method) -> (StatusCode, String) {
        let body = (method == http::Method::POST).then(|| b"{}".to_vec());
        let (status, body) = causeway_client::plain_http::request(
            method,
            gateway,
            "/static/x",
            body,
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    /// Each worker thread (a single-threaded runtime, as `causeway up` runs them) keeps its own
    /// keep-alive connections to a static upstream: requests served by two workers in turn
    /// open one connection each and reuse it, rather than passing one connection between them.
    #[tokio::test]
    async fn each_worker_thread_pools_its_own_upstream_connections() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let upstream = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = accepted.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                let service = hyper::service::service_fn(|_request: Request<Incoming>| async {
                    Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from("ok"))))
                });
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        let gateway = static_test_gateway(vec![upstream]);
        // Two workers, each a thread with its own runtime serving its own port.
        let mut workers = Vec::new();
        let mut stops = Vec::new();
        for _ in 0..2 {
            let (addr_sender, addr) = tokio::sync::oneshot::channel();
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let gateway = gateway.clone();
            std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                runtime.block_on(async move {
                    let (addr, _trigger) = serve_gateway(gateway).await;
                    let _ = addr_sender.send(addr);
                    let _ = stopped.await;
                });
            });
            workers.push(addr.await.unwrap());
            stops.push(stop);
        }
        for _ in 0..3 {
            for worker in &workers {
                let (status, body) = causeway_client::plain_http::request(
                    http::Method::GET,
                    *worker,
                    "/static/x",
                    None,
                    Duration::from_secs(5),
                )
                .await
                .unwrap();
                assert_eq!(status, StatusCode::OK, "{body:?}");
            }
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        drop(stops);
    }

    #[tokio::test]
    async fn gets_are_retried_off_a_503_upstream_until_it_is_ejected() {
        use crate::upstream::{BalancePolicy, UpstreamConfig};
        let (bad, bad_hits) = named_upstream("bad", StatusCode::SERVICE_UNAVAILABLE).await;
        let (one, one_hits) = named_upstream("one", StatusCode::OK).await;
        let (two, two_hits) = named_upstream("two", StatusCode::OK).await;
        let mut policy = UpstreamConfig {
            balance: BalancePolicy::RoundRobin,
            ..UpstreamConfig::default()
        };
        policy.outlier.consecutive_5xx = 3;
        let (gateway, _stop) = policy_gateway(vec![bad, one, two], policy).await;
        for _ in 0..12 {
            let (status, body) = get(gateway, http::Method::GET).await;
            assert_eq!(status, StatusCode::OK, "{body}");
        }
        // Three 503s in a row ejected it (base ejection 30 s): no more traffic.
        assert_eq!(bad_hits.load(Ordering::SeqCst), 3);
        for _ in 0..10 {
            assert_eq!(get(gateway, http::Method::GET).await.0, StatusCode::OK);
        }
        assert_eq!(bad_hits.load(Ordering::SeqCst), 3);
        assert_eq!(
            one_hits.load(Ordering::SeqCst) + two_hits.load(Ordering::SeqCst),
            22
        );
    }

    #[tokio::test]
    async fn retries_stop_when_the_budget_is_spent() {
        use crate::upstream::{BalancePolicy, UpstreamConfig};
        let (bad, bad_hits) = named_upstream("bad", StatusCode::SERVICE_UNAVAILABLE).await;
        let (good, _) = named_upstream("good", StatusCode::OK).await;
        let mut policy = UpstreamConfig {
            balance: BalancePolicy::RoundRobin,
            ..UpstreamConfig::default()
        };
        policy.outlier.enabled = false;
        // One retry per second, whatever the traffic.
        policy.retry_budget.ratio = 0.0;
        policy.retry_budget.min_retries_per_second = 1;
        policy.retry_budget.window_ms = 1000;
        policy.retry_budget.buckets = 1;
        let (gateway, _stop) = policy_gateway(vec![bad, good], policy).await;
        let mut statuses = Vec::new();
        for _ in 0..8 {
            statuses.push(get(gateway, http::Method::GET).await.0);
        }
        let unavailable = statuses
            .iter()
            .filter(|s| **s == StatusCode::SERVICE_UNAVAILABLE)
            .count();
        // Half the first attempts hit the bad one; one of those was retried, the rest were not.
        assert!(bad_hits.load(Ordering::SeqCst) >= 4, "{statuses:?}");
        assert!(
            unavailable >= 2,
            "the budget allowed every retry: {statuses:?}"
        );
        assert!(
            unavailable < bad_hits.load(Ordering::SeqCst),
            "nothing was retried: {statuses:?}"
        );
    }

    #[tokio::test]
    async fn a_post_is_not_retried_after_the_upstream_dropped_it_but_a_dead_address_is_skipped() {
        use tokio::io::AsyncReadExt;
        // Reads the request, then closes without answering.
        let dropper = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dropper_addr = dropper.local_addr().unwrap();
        let dropped = Arc::new(AtomicUsize::new(0));
        let counter = dropped.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut stream, _)) = dropper.accept().await {
                let mut buf = [0u8; 4096];
                let _ = stream.read(&mut buf).await;
                counter.fetch_add(1, Ordering::SeqCst);
            }
        });
        let (good, good_hits) = named_upstream("good", StatusCode::OK).await;
        let policy = crate::upstream::UpstreamConfig {
            balance: crate::upstream::BalancePolicy::RoundRobin,
            ..Default::default()
        };
        let (gateway, _stop) = policy_gateway(vec![dropper_addr, good], policy.clone()).await;
        let mut bad_gateway = 0;
        for _ in 0..4 {
            let (status, _) = get(gateway, http::Method::POST).await;
            if status == StatusCode::BAD_GATEWAY {
                bad_gateway += 1;
            } else {
                assert_eq!(status, StatusCode::OK);
            }
        }
        // Every POST that reached the dropper came back as 502, none was sent on.
        assert_eq!(bad_gateway, dropped.load(Ordering::SeqCst));
        assert!(bad_gateway >= 1);
        assert_eq!(good_hits.load(Ordering::SeqCst), 4 - bad_gateway);
        task.abort();

        // A dead address: the connect fails, nothing was sent, so even a POST goes on.
        let dead = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap()
        };
        let (gateway, _stop) = policy_gateway(vec![dead, good], policy).await;
        for method in [
            http::Method::GET,
            http::Method::POST,
            http::Method::GET,
            http::Method::POST,
        ] {
            let (status, body) = get(gateway, method).await;
            assert_eq!(status, StatusCode::OK, "{body}");
            assert_eq!(body, "good");
        }
    }

    #[tokio::test]
    async fn consistent_hashing_keeps_a_key_on_one_upstream() {
        use crate::upstream::{BalancePolicy, Fallback, HashKey, UpstreamConfig};
        let mut addrs = Vec::new();
        for name in ["a", "b", "c"] {
            addrs.push(named_upstream(name, StatusCode::OK).await.0);
        }
        let policy = UpstreamConfig {
            balance: BalancePolicy::ConsistentHash {
                key: HashKey::Header {
                    name: "x-user".into(),
                },
                table_size: 65_537,
                fallback: Fallback::RoundRobin,
            },
            ..UpstreamConfig::default()
        };
        let (gateway, _stop) = policy_gateway(addrs, policy).await;
        let mut seen = std::collections::HashSet::new();
        for user in 0..20 {
            let ask = || async {
                let answer = raw_exchange(
                    gateway,
                    &format!("GET /static/x HTTP/1.1\r\nHost: a\r\nx-user: user-{user}\r\nConnection: close\r\n\r\n"),
                )
                .await;
                split_answer(&answer).1.to_owned()
            };
            let first = ask().await;
            for _ in 0..3 {
                assert_eq!(ask().await, first, "user-{user} moved");
            }
            seen.insert(first);
        }
        assert!(seen.len() > 1, "every key went to one upstream: {seen:?}");
    }

    // ---- WebSocket upgrades ----

    /// An HTTP/1.1 upstream that accepts WebSocket upgrades (101, then echoes every byte) except
    /// on `/refuse`, which it answers with 400; the 101 carries the `x-forwarded-for` it saw.
    async fn websocket_upstream() -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let service =
                    hyper::service::service_fn(|mut request: Request<Incoming>| async move {
                        if request.uri().path() == "/refuse" {
                            let mut response =
                                Response::new(Full::new(Bytes::from("no upgrade here")));
                            *response.status_mut() = StatusCode::BAD_REQUEST;
                            return Ok::<_, std::convert::Infallible>(response);
                        }
                        let saw_upgrade = request.headers().get(header::UPGRADE).cloned();
                        let forwarded_for = request.headers().get("x-forwarded-for").cloned();
                        let upgrade = hyper::upgrade::on(&mut request);
                        tokio::spawn(async move {
                            if let Ok(upgraded) = upgrade.await {
                                let (mut reader, mut writer) =
                                    tokio::io::split(hyper_util::rt::TokioIo::new(upgraded));
                                let _ = tokio::io::copy(&mut reader, &mut writer).await;
                            }
                        });
                        let mut response = Response::builder()
                            .status(StatusCode::SWITCHING_PROTOCOLS)
                            .header(header::CONNECTION, "upgrade")
                            .header("sec-websocket-accept", "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
                        if let Some(value) = saw_upgrade {
                            response = response.header(header::UPGRADE, value);
                        }
                        if let Some(value) = forwarded_for {
                            response = response.header("x-upstream-saw-forwarded-for", value);
                        }
                        Ok(response.body(Full::new(Bytes::new())).unwrap())
                    });
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .with_upgrades()
                        .await;
                });
            }
        });
        addr
    }

    fn handshake(path: &str, extra: &str) -> String {
        format!(
            "GET {path} HTTP/1.1\r\nHost: chat.example\r\nConnection: Upgrade\r\n\
             Upgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Sec-WebSocket-Version: 13\r\n{extra}\r\n"
        )
    }

    /// Reads one answer's head (lower-cased) and its `Content-Length` body, leaving the
    /// connection open.
    async fn read_answer(stream: &mut tokio::net::TcpStream) -> (String, String) {
        use tokio::io::AsyncReadExt;
        let mut buf = Vec::new();
        let mut byte = [0u8; 1];
        while !buf.ends_with(b"\r\n\r\n") {
            let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut byte))
                .await
                .expect("answer head in time")
                .unwrap();
            assert_eq!(
                read,
                1,
                "closed mid-head: {}",
                String::from_utf8_lossy(&buf)
            );
            buf.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&buf).to_ascii_lowercase();
        let length = head
            .lines()
            .find_map(|line| line.strip_prefix("content-length:"))
            .map_or(0, |value| value.trim().parse::<usize>().unwrap());
        let mut body = vec![0u8; length];
        tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut body))
            .await
            .expect("answer body in time")
            .unwrap();
        (head, String::from_utf8_lossy(&body).into_owned())
    }

    /// Sends a WebSocket handshake for `path` on `stream` and reads the answer.
    async fn send_handshake(
        stream: &mut tokio::net::TcpStream,
        path: &str,
        extra: &str,
    ) -> (String, String) {
        use tokio::io::AsyncWriteExt;
        stream
            .write_all(handshake(path, extra).as_bytes())
            .await
            .unwrap();
        read_answer(stream).await
    }

    #[tokio::test]
    async fn a_websocket_upgrade_is_spliced_to_a_static_http1_upstream() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let upstream = websocket_upstream().await;
        let (gateway, _stop) = static_gateway(vec![upstream], UpstreamProtocol::Http1).await;
        let mut stream = tokio::net::TcpStream::connect(gateway).await.unwrap();
        let (head, _) =
            send_handshake(&mut stream, "/static/ws", "X-Forwarded-For: 10.1.2.3\r\n").await;
        assert!(head.starts_with("http/1.1 101"), "{head}");
        assert!(head.contains("\r\nupgrade: websocket"), "{head}");
        assert!(head.contains("\r\nconnection: upgrade"), "{head}");
        assert!(head.contains("\r\nsec-websocket-accept: "), "{head}");
        assert!(head.contains("\r\nvia: 1.1 causeway"), "{head}");
        // The upgrade went upstream as a proxied request, forwarding headers and all.
        assert!(
            head.contains("\r\nx-upstream-saw-forwarded-for: 10.1.2.3, 127.0.0.1"),
            "{head}"
        );

        for message in [
            &b"hello through the tunnel"[..],
            &[0x81, 0x02, b'h', b'i'][..],
        ] {
            stream.write_all(message).await.unwrap();
            let mut echo = vec![0u8; message.len()];
            tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut echo))
                .await
                .expect("echo in time")
                .unwrap();
            assert_eq!(echo, message);
        }
        // Closing our side ends the tunnel: the upstream's side closes and so does ours.
        stream.shutdown().await.unwrap();
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest))
            .await
            .expect("the tunnel closed")
            .unwrap();
        assert!(rest.is_empty(), "{rest:?}");
    }

    #[tokio::test]
    async fn a_drain_gives_open_tunnels_a_grace_period_then_closes_them() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let upstream = websocket_upstream().await;
        let gateway = static_test_gateway(vec![upstream]);
        let mut registry = Registry::default();
        gateway.register_upstream_metrics(&mut registry);
        let (addr, stop) = serve_gateway(gateway.clone()).await;
        let mut tunnels = Vec::new();
        for _ in 0..2 {
            let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            let (head, _) = send_handshake(&mut stream, "/static/ws", "").await;
            assert!(head.starts_with("http/1.1 101"), "{head}");
            tunnels.push(stream);
        }
        let (mut polite, mut idle) = (tunnels.remove(0), tunnels.remove(0));

        // Shutdown: the listener stops, then the tunnels get 600 ms.
        drop(stop);
        let grace = Duration::from_millis(600);
        let started = Instant::now();
        let drain = tokio::spawn({
            let gateway = gateway.clone();
            async move { gateway.drain_tunnels(grace).await }
        });
        // Within the grace period both still carry bytes.
        for stream in [&mut polite, &mut idle] {
            stream.write_all(b"ping").await.unwrap();
            let mut echo = [0u8; 4];
            tokio::time::timeout(Duration::from_secs(2), stream.read_exact(&mut echo))
                .await
                .expect("echo in time")
                .unwrap();
            assert_eq!(&echo, b"ping");
        }
        // One client closes on its own: its tunnel ends as usual.
        polite.shutdown().await.unwrap();
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(2), polite.read_to_end(&mut rest))
            .await
            .expect("the closed tunnel ends")
            .unwrap();
        assert!(started.elapsed() < grace, "{:?}", started.elapsed());
        // The other is closed by the proxy once the grace period is over, and the drain ends.
        let mut rest = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(5), idle.read_to_end(&mut rest))
            .await
            .expect("the proxy closed the open tunnel");
        assert!(closed.is_ok() || rest.is_empty(), "{closed:?}");
        assert!(started.elapsed() >= grace, "{:?}", started.elapsed());
        tokio::time::timeout(Duration::from_secs(2), drain)
            .await
            .expect("the drain ends once the tunnels have")
            .unwrap();
        assert!(started.elapsed() < grace + Duration::from_millis(500));

        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        for expected in [
            "websocket_tunnels_total{route=\"/static/\",outcome=\"closed\"} 1",
            "websocket_tunnels_total{route=\"/static/\",outcome=\"drained\"} 1",
            "websocket_tunnels_open{route=\"/static/\"} 0",
        ] {
            assert!(text.contains(expected), "{expected} in {text}");
        }
        // A drain with no tunnels open ends at once.
        let again = Instant::now();
        gateway.drain_tunnels(Duration::from_secs(5)).await;
        assert!(
            again.elapsed() < Duration::from_secs(1),
            "{:?}",
            again.elapsed()
        );
    }

    #[tokio::test]
    async fn a_reload_keeps_unchanged_upstreams_metrics_and_tunnels() {
        use crate::upstream::UpstreamConfig;
        use tokio::io::AsyncReadExt;
        let (one, one_hits) = named_upstream("one", StatusCode::OK).await;
        let ws = websocket_upstream().await;
        let mut metrics = causeway_core::telemetry::Metrics::new("reverse-proxy", "test");
        let client = idle_client(&mut metrics);
        let service_route = |prefix: &str, policy: UpstreamConfig| RouteConfig {
            prefix: prefix.into(),
            policy,
            ..route(prefix, None)
        };
        let mut ws_route = static_route(vec![ws], UpstreamProtocol::Http1);
        ws_route.prefix = "/ws/".into();
        let config = ReverseProxyConfig {
            routes: vec![
                static_route(vec![one], UpstreamProtocol::Http1),
                service_route("/a/", causeway_core::topology::service_route_policy()),
                ws_route.clone(),
            ],
            request_timeout_ms: 2000,
            ..ReverseProxyConfig::default()
        };
        let first = Arc::new(test_gateway(&config, client, &mut metrics));
        let mut registry = Registry::default();
        first.register_upstream_metrics(&mut registry);
        let (first_addr, _first_stop) = serve_gateway(first.clone()).await;
        let mut tunnel = tokio::net::TcpStream::connect(first_addr).await.unwrap();
        let (head, _) = send_handshake(&mut tunnel, "/ws/chat", "").await;
        assert!(head.starts_with("http/1.1 101"), "{head}");

        let mut moved = static_route(vec![one], UpstreamProtocol::Http1);
        moved.prefix = "/moved/".into();
        let round_robin = UpstreamConfig {
            balance: crate::upstream::BalancePolicy::RoundRobin,
            ..causeway_core::topology::service_route_policy()
        };
        let second = Arc::new(first.reload(RouteTable::from_routes(vec![
            static_route(vec![one], UpstreamProtocol::Http1),
            service_route("/a/", causeway_core::topology::service_route_policy()),
            service_route("/b/", round_robin),
            moved,
        ])));
        let pool = |gateway: &Gateway, index: usize| gateway.routes[index].pool.clone().unwrap();
        // Unchanged routes keep their pools; changed ones get new ones.
        assert!(Arc::ptr_eq(&pool(&first, 0), &pool(&second, 0)));
        assert!(Arc::ptr_eq(&pool(&first, 1), &pool(&second, 1)));
        assert!(!Arc::ptr_eq(&pool(&second, 1), &pool(&second, 2)));
        assert_eq!(pool(&second, 2).upstream.name(), "user-service@/b/");
        assert!(!Arc::ptr_eq(&pool(&first, 0), &pool(&second, 3)));

        // The metrics registered from the first gateway count the second's traffic.
        let (second_addr, _second_stop) = serve_gateway(second.clone()).await;
        let (status, _) = causeway_client::plain_http::request(
            http::Method::GET,
            second_addr,
            "/moved/x",
            None,
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        assert_eq!(status, StatusCode::OK);
        assert_eq!(one_hits.load(Ordering::SeqCst), 1);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        let expected = format!(
            "upstream_attempts_total{{upstream=\"/moved/\",endpoint=\"{one}\",outcome=\"200\"}} 1"
        );
        assert!(text.contains(&expected), "{expected} in {text}");

        // The second gateway's drain covers the tunnel opened on the first.
        second.drain_tunnels(Duration::from_millis(100)).await;
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(2), tunnel.read_to_end(&mut rest))
            .await
            .expect("the tunnel was drained")
            .ok();
    }

    #[tokio::test]
    async fn an_upgrade_the_upstream_refuses_gets_its_answer() {
        use tokio::io::AsyncWriteExt;
        let upstream = websocket_upstream().await;
        let (gateway, _stop) = static_gateway(vec![upstream], UpstreamProtocol::Http1).await;
        let mut stream = tokio::net::TcpStream::connect(gateway).await.unwrap();
        let (head, body) = send_handshake(&mut stream, "/static/refuse", "").await;
        assert!(head.starts_with("http/1.1 400"), "{head}");
        assert!(!head.contains("upgrade: websocket"), "{head}");
        assert_eq!(body, "no upgrade here");
        // The connection stays plain HTTP/1.1.
        stream
            .write_all(b"GET /static/refuse HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .unwrap();
        let (head, _) = read_answer(&mut stream).await;
        assert!(head.starts_with("http/1.1 400"), "{head}");
    }

    #[tokio::test]
    async fn upgrades_to_discovered_services_get_501_and_upgrades_are_authenticated() {
        let upstream = websocket_upstream().await;
        let mut metrics = causeway_core::telemetry::Metrics::new("reverse-proxy", "test");
        let client = idle_client(&mut metrics);
        let mut guarded = static_route(vec![upstream], UpstreamProtocol::Http1);
        guarded.prefix = "/guarded/".into();
        guarded.strip_prefix = Some("/guarded".into());
        guarded.auth = true;
        let h2c = RouteConfig {
            prefix: "/h2c/".into(),
            ..static_route(vec![upstream], UpstreamProtocol::H2c)
        };
        let config = ReverseProxyConfig {
            routes: vec![
                RouteConfig {
                    policy: causeway_core::topology::service_route_policy(),
                    prefix: "/chat/".into(),
                    service: "chat-service".into(),
                    strip_prefix: None,
                    auth: false,
                    upstream: None,
                },
                guarded,
                h2c,
            ],
            request_timeout_ms: 2000,
            ..ReverseProxyConfig::default()
        };
        let (gateway, _stop) = start_gateway(config, client, metrics).await;
        let mut stream = tokio::net::TcpStream::connect(gateway).await.unwrap();

        for (path, service) in [
            ("/chat/room", "chat-service over HTTP/2"),
            ("/h2c/room", "over h2c"),
        ] {
            let (head, body) = send_handshake(&mut stream, path, "").await;
            assert!(head.starts_with("http/1.1 501"), "{head}");
            let error: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert_eq!(error["error"], "websocket_unsupported", "{error}");
            let message = error["message"].as_str().unwrap_or_default();
            let prefix = path.rsplit_once('/').map_or(path, |(prefix, _)| prefix);
            assert!(message.contains(&format!("route {prefix}/")), "{message}");
            assert!(message.contains(service), "{message}");
        }

        // Auth applies before anything is forwarded.
        let (head, body) = send_handshake(&mut stream, "/guarded/ws", "").await;
        assert!(head.starts_with("http/1.1 401"), "{head}");
        assert!(body.contains("missing"), "{body}");
    }

    #[tokio::test]
    async fn an_upgrade_answered_with_503_is_not_retried() {
        use crate::upstream::{BalancePolicy, UpstreamConfig};
        let (bad, bad_hits) = named_upstream("bad", StatusCode::SERVICE_UNAVAILABLE).await;
        let good = websocket_upstream().await;
        let mut policy = UpstreamConfig {
            balance: BalancePolicy::RoundRobin,
            ..UpstreamConfig::default()
        };
        policy.outlier.enabled = false;
        let (gateway, _stop) = policy_gateway(vec![bad, good], policy).await;
        let mut unavailable = 0;
        for _ in 0..4 {
            let mut stream = tokio::net::TcpStream::connect(gateway).await.unwrap();
            let (head, _) = send_handshake(&mut stream, "/static/ws", "").await;
            if head.starts_with("http/1.1 503") {
                unavailable += 1;
            } else {
                assert!(head.starts_with("http/1.1 101"), "{head}");
            }
        }
        // Every upgrade that reached the 503 upstream came back as 503: none went on.
        assert!(unavailable >= 1);
        assert_eq!(unavailable, bad_hits.load(Ordering::SeqCst));
    }
}
