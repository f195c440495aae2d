//! Causeway's service discovery. It owns the live registry of service instances (kept fresh by
//! heartbeats over an HTTP API, dropping instances whose heartbeats stop) and an authoritative DNS
//! server, over UDP and TCP, for the zone `internal.` that answers from that registry: A/AAAA
//! records for services and instances, SRV records for their TLS and admin listeners. It also
//! serves its own `/healthz` and `/metrics` on the API listener.
//!
//! ```no_run
//! # async fn start(config: causeway_core::topology::DiscoveryConfig, shutdown: causeway_core::serve::Shutdown)
//! # -> Result<(), causeway_discovery::DiscoveryError> {
//! use causeway_core::telemetry::Metrics;
//! use causeway_discovery::{DiscoveryServer, Registry};
//!
//! let registry = Registry::new(std::time::Duration::from_millis(config.expiry_ms));
//! let mut metrics = Metrics::new("discovery", "discovery-1");
//! let server = DiscoveryServer::bind(&config, registry, &mut metrics).await?;
//! println!("DNS on {}, registry on {}", server.dns_addr, server.api_addr);
//! server.run(metrics.into_shared(), shutdown).await;
//! # Ok(()) }
//! ```

mod api;
mod dns;
#[doc(hidden)]
pub mod fuzzing;
mod registry;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use causeway_core::serve::Shutdown;
use causeway_core::telemetry::Metrics;
use causeway_core::topology::DiscoveryConfig;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use tokio::net::{TcpListener, UdpSocket};

pub use api::MAX_BODY_BYTES;
pub use registry::Registry;

use dns::{DnsHandler, QueryLabels, Zone};

/// How often to try again when port 0 gave UDP a port whose TCP twin is taken.
const DNS_BIND_ATTEMPTS: usize = 8;
/// A DNS-over-TCP connection that sends no query for this long is closed.
const DNS_TCP_IDLE: Duration = Duration::from_secs(5);
/// Responses queued per DNS-over-TCP connection.
const DNS_TCP_RESPONSE_BUFFER: usize = 32;
/// How long open API connections may finish after shutdown.
const API_DRAIN: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// A listener could not be bound (or its address read back).
    #[error("cannot listen on {addr} for {what}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid DNS zone {zone:?}: {message}")]
    InvalidZone { zone: String, message: String },
}

/// The bound discovery server: DNS on UDP and TCP at `dns_addr`, the registry API at `api_addr`.
pub struct DiscoveryServer {
    /// Where DNS is served, over both UDP and TCP (the same port).
    pub dns_addr: SocketAddr,
    /// Where the registry HTTP API, `/healthz` and `/metrics` are served.
    pub api_addr: SocketAddr,
    udp: UdpSocket,
    tcp: TcpListener,
    api: TcpListener,
    handler: DnsHandler,
    registry: Registry,
    http_metrics: causeway_core::telemetry::HttpMetrics,
}

impl std::fmt::Debug for DiscoveryServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiscoveryServer")
            .field("dns_addr", &self.dns_addr)
            .field("api_addr", &self.api_addr)
            .finish_non_exhaustive()
    }
}

impl DiscoveryServer {
    /// Binds DNS on UDP and TCP at `config.dns_listen` (the same port; with port 0, UDP picks
    /// the port and TCP takes the same one, retrying a few times if TCP's is taken) and the HTTP
    /// API at `config.api_listen`, and registers the discovery metric families into `metrics`:
    /// `dns_queries` (by qtype, rcode, protocol), `registry_live_instances` (by service, computed
    /// at scrape time) and the standard HTTP server metrics. Nothing is served until [`run`].
    ///
    /// The registry's own expiry is used; `config.expiry_ms` is for whoever builds the registry.
    ///
    /// [`run`]: DiscoveryServer::run
    pub async fn bind(
        config: &DiscoveryConfig,
        registry: Registry,
        metrics: &mut Metrics,
    ) -> Result<Self, DiscoveryError> {
        let zone = Zone::new(&config.zone, config.record_ttl_secs, config.dns_listen.ip())?;
        let (udp, tcp) = bind_dns(config.dns_listen).await?;
        let dns_addr = udp
            .local_addr()
            .map_err(|source| bind_error("DNS (udp)", config.dns_listen, source))?;
        let api = TcpListener::bind(config.api_listen)
            .await
            .map_err(|source| bind_error("the registry API", config.api_listen, source))?;
        let api_addr = api
            .local_addr()
            .map_err(|source| bind_error("the registry API", config.api_listen, source))?;

        let queries = Family::<QueryLabels, Counter>::default();
        let prometheus = metrics.registry_mut();
        prometheus.register(
            "dns_queries",
            "DNS queries answered, by query type, response code and protocol",
            queries.clone(),
        );
        prometheus.register_collector(Box::new(LiveInstances {
            registry: registry.clone(),
        }));
        let http_metrics = metrics.http_server();

        tracing::info!(%dns_addr, %api_addr, zone = %config.zone, "discovery bound");
        Ok(Self {
            dns_addr,
            api_addr,
            udp,
            tcp,
            api,
            handler: DnsHandler::new(zone, registry.clone(), queries),
            registry,
            http_metrics,
        })
    }

    /// Serves DNS and the API until `shutdown` fires, then stops DNS and gives open API
    /// connections a short drain. `metrics` is the registry passed to [`bind`], now shared; it
    /// is rendered on `GET /metrics`.
    ///
    /// [`bind`]: DiscoveryServer::bind
    pub async fn run(self, metrics: Arc<Metrics>, shutdown: Shutdown) {
        let Self {
            udp,
            tcp,
            api,
            handler,
            registry,
            http_metrics,
            ..
        } = self;
        let mut dns = hickory_server::Server::new(handler);
        dns.register_socket(udp);
        dns.register_listener(tcp, DNS_TCP_IDLE, DNS_TCP_RESPONSE_BUFFER);

        let sweeper = tokio::spawn(sweep(registry.clone(), shutdown.clone()));

        let app = api::router(api::ApiState {
            registry,
            metrics,
            http: http_metrics,
        });
        let mut stop_accepting = shutdown.clone();
        let serve = axum::serve(api, app)
            .with_graceful_shutdown(async move { stop_accepting.wait().await });
        let mut drained = shutdown.clone();
        tokio::select! {
            result = serve => {
                if let Err(err) = result {
                    tracing::error!(error = %err, "registry API server failed");
                }
            }
            _ = async { drained.wait().await; tokio::time::sleep(API_DRAIN).await } => {
                tracing::warn!("registry API connections still open after the drain period");
            }
        }
        if let Err(err) = dns.shutdown_gracefully().await {
            tracing::warn!(error = %err, "DNS server stopped with an error");
        }
        let _ = sweeper.await;
        tracing::info!("discovery stopped");
    }
}

fn bind_error(what: &'static str, addr: SocketAddr, source: std::io::Error) -> DiscoveryError {
    DiscoveryError::Bind { what, addr, source }
}

/// UDP and TCP sockets on the same port.
async fn bind_dns(addr: SocketAddr) -> Result<(UdpSocket, TcpListener), DiscoveryError> {
    let bind_udp = |addr| async move {
        UdpSocket::bind(addr)
            .await
            .map_err(|source| bind_error("DNS (udp)", addr, source))
    };
    let bind_tcp = |addr| async move {
        TcpListener::bind(addr)
            .await
            .map_err(|source| bind_error("DNS (tcp)", addr, source))
    };
    if addr.port() != 0 {
        let udp = bind_udp(addr).await?;
        let tcp = bind_tcp(addr).await?;
        return Ok((udp, tcp));
    }
    let mut attempt = 1;
    loop {
        let udp = bind_udp(addr).await?;
        let port = udp
            .local_addr()
            .map_err(|source| bind_error("DNS (udp)", addr, source))?
            .port();
        // The port UDP got may be in use by some unrelated TCP socket: try another one.
        match bind_tcp(SocketAddr::new(addr.ip(), port)).await {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(DiscoveryError::Bind { source, .. })
                if source.kind() == std::io::ErrorKind::AddrInUse
                    && attempt < DNS_BIND_ATTEMPTS =>
            {
                tracing::debug!(port, "TCP port taken; binding DNS on another port");
                attempt += 1;
            }
            Err(err) => return Err(err),
        }
    }
}

/// Drops expired instances promptly (logging each once), even when nobody asks.
async fn sweep(registry: Registry, mut shutdown: Shutdown) {
    let period = (registry.expiry() / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => registry.sweep(),
            _ = shutdown.wait() => return,
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabels {
    service: String,
}

/// `registry_live_instances{service}`, read from the registry at scrape time so that it is never
/// stale (services with no live instance are absent).
#[derive(Debug)]
struct LiveInstances {
    registry: Registry,
}

impl Collector for LiveInstances {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let family = Family::<ServiceLabels, Gauge>::default();
        for (service, instances) in self.registry.listing().services {
            family
                .get_or_create(&ServiceLabels { service })
                .set(i64::try_from(instances.len()).unwrap_or(i64::MAX));
        }
        let metric = encoder.encode_descriptor(
            "registry_live_instances",
            "Live (recently heartbeating) instances, by service",
            None,
            family.metric_type(),
        )?;
        family.encode(metric)
    }
}
