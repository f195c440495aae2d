//! The load-balancer role in layer-4 mode: accepts TCP connections at the edge and splices each
//! to a healthy instance of the upstream service (TLS passes through to the reverse proxies,
//! which terminate it). It is the proxy engine's [`Upstream`] configured for layer 4: instances
//! come from discovery; active health checks (`GET /healthz` on each instance's admin port, found
//! through `_admin._tcp` SRV records) take an instance out after `unhealthy_threshold` failures
//! and put it back after `healthy_threshold` passes; a failed connect (passive check) ejects the
//! instance for a while and the connection is tried on the next one. Each connection starts with
//! a PROXY protocol v2 header naming the client (`send_proxy_protocol`), so that the proxies log,
//! rate-limit and forward (`X-Forwarded-For`) by the client's address rather than this one's.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::time::Duration;

use causeway_client::Discovery;
use causeway_core::serve::{Shutdown, accept, proxy_protocol};
use causeway_core::telemetry::Metrics;
use causeway_core::topology::LoadBalancerConfig;
use http::{HeaderMap, StatusCode};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use crate::upstream::{
    BalancePolicy, EndpointSpec, HealthCheckConfig, Outcome, OutlierConfig, Upstream,
    UpstreamConfig, UpstreamMetrics,
};

/// One upstream instance and what the balancer knows of its health.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backend {
    pub instance: String,
    pub addr: SocketAddr,
    pub healthy: bool,
    /// Taken out for failed connects until its ejection ends.
    pub ejected: bool,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendLabels {
    backend: String,
}

#[derive(Clone, Default)]
struct BalancerMetrics {
    connections: Family<BackendLabels, Counter>,
    active: Gauge,
    connect_failures: Family<BackendLabels, Counter>,
    refused: Counter,
}

pub struct Balancer {
    config: LoadBalancerConfig,
    discovery: Discovery,
    upstream: Upstream,
    health_check: HealthCheckConfig,
    metrics: BalancerMetrics,
}

/// The L4 role's settings for the proxy engine's upstream machinery: round robin over healthy
/// endpoints, active checks of each instance's admin `/healthz`, and a failed connect ejecting
/// the endpoint until the next health-check rounds could have seen it back.
fn upstream_config(config: &LoadBalancerConfig) -> (UpstreamConfig, HealthCheckConfig) {
    let health_check = HealthCheckConfig {
        path: "/healthz".into(),
        interval_ms: config.health_check_interval_ms,
        timeout_ms: config.health_check_timeout_ms,
        healthy_threshold: config.healthy_threshold,
        unhealthy_threshold: config.unhealthy_threshold,
    };
    let upstream = UpstreamConfig {
        balance: BalancePolicy::RoundRobin,
        outlier: OutlierConfig {
            consecutive_connect_failures: 1,
            base_ejection_ms: config.health_check_interval_ms.saturating_mul(2).max(1),
            max_ejection_ms: config.health_check_interval_ms.saturating_mul(20).max(1),
            max_ejection_percent: 100,
            ..OutlierConfig::default()
        },
        health_check: Some(health_check.clone()),
        ..UpstreamConfig::default()
    };
    (upstream, health_check)
}

impl Balancer {
    pub fn new(config: LoadBalancerConfig, discovery: Discovery, metrics: &mut Metrics) -> Self {
        let m = BalancerMetrics::default();
        let registry = metrics.registry_mut();
        registry.register(
            "lb_connections",
            "Connections spliced to each backend",
            m.connections.clone(),
        );
        registry.register(
            "lb_active_connections",
            "Open spliced connections",
            m.active.clone(),
        );
        registry.register(
            "lb_connect_failures",
            "Failed connects to each backend",
            m.connect_failures.clone(),
        );
        registry.register(
            "lb_refused_connections",
            "Connections closed because no backend was healthy",
            m.refused.clone(),
        );
        let upstream_metrics = UpstreamMetrics::default();
        upstream_metrics.register(registry);
        let (upstream_config, health_check) = upstream_config(&config);
        let upstream = Upstream::with_metrics(
            config.upstream.clone(),
            upstream_config,
            Vec::new(),
            upstream_metrics,
        )
        .unwrap_or_else(|err| {
            // Only a consistent-hash table can fail to build, and the L4 role balances round robin.
            unreachable!("the L4 balancer's upstream configuration is fixed: {err}")
        });
        Self {
            config,
            discovery,
            upstream,
            health_check,
            metrics: m,
        }
    }

    pub fn backends(&self) -> Vec<Backend> {
        self.upstream
            .endpoints()
            .iter()
            .map(|endpoint| Backend {
                instance: endpoint.id().to_string(),
                addr: endpoint.addr(),
                healthy: endpoint.is_healthy(),
                ejected: endpoint.is_ejected(std::time::Instant::now()),
            })
            .collect()
    }

    /// Follows discovery and health-checks every backend until shutdown.
    pub fn watch_backends(self: std::sync::Arc<Self>, shutdown: Shutdown) -> Vec<JoinHandle<()>> {
        let checker = crate::upstream::spawn_health_checker(
            self.upstream.clone(),
            self.health_check.clone(),
            shutdown.clone(),
        );
        let mut shutdown = shutdown;
        let follower = tokio::spawn(async move {
            let interval = Duration::from_millis(self.config.health_check_interval_ms.max(1));
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(interval) => self.refresh().await,
                    _ = shutdown.wait() => return,
                }
            }
        });
        vec![checker, follower]
    }

    /// Takes the instance list from discovery (with each instance's admin port for its checks).
    pub async fn refresh(&self) {
        let service = &self.config.upstream;
        let listed = self.discovery.resolve(service).await;
        let admins = self.discovery.resolve_port(service, "admin").await;
        let admin_of: HashMap<String, SocketAddr> = admins
            .map(|r| {
                r.endpoints
                    .into_iter()
                    .map(|e| (e.instance, e.addr))
                    .collect()
            })
            .unwrap_or_default();
        let resolution = match listed {
            Ok(resolution) => resolution,
            Err(err) => {
                tracing::warn!(error = %err, "cannot refresh backends; keeping the last list");
                return;
            }
        };
        let known: HashSet<String> = self
            .upstream
            .endpoints()
            .iter()
            .map(|endpoint| endpoint.id().to_string())
            .collect();
        let specs = resolution
            .endpoints
            .into_iter()
            .map(|endpoint| {
                if !known.contains(&endpoint.instance) {
                    tracing::info!(instance = %endpoint.instance, addr = %endpoint.addr, "backend discovered");
                }
                let spec = EndpointSpec::new(endpoint.instance.clone(), endpoint.addr);
                match admin_of.get(&endpoint.instance) {
                    Some(admin) => spec.with_health_addr(*admin),
                    None => spec,
                }
            })
            .collect();
        if let Err(err) = self.upstream.update(specs) {
            tracing::warn!(error = %err, "discovery listed an unusable backend set; keeping the last one");
        }
    }

    /// Accepts and splices connections until shutdown; open connections are left to finish.
    pub async fn serve(self: std::sync::Arc<Self>, listener: TcpListener, mut shutdown: Shutdown) {
        while let Some((client, peer)) = accept(&listener, &mut shutdown).await {
            let balancer = self.clone();
            tokio::spawn(async move { balancer.splice(client, peer).await });
        }
    }

    async fn splice(&self, mut client: TcpStream, peer: SocketAddr) {
        let connect_timeout = Duration::from_millis(self.config.connect_timeout_ms);
        let no_headers = HeaderMap::new();
        let mut tried = HashSet::new();
        // Each failed connect ejects its backend, so the next pick is another one.
        while let Ok(guard) = self.upstream.pick(&no_headers) {
            let instance = guard.endpoint().id().to_string();
            if !tried.insert(instance.clone()) {
                break;
            }
            let labels = BackendLabels {
                backend: instance.clone(),
            };
            let connected =
                tokio::time::timeout(connect_timeout, TcpStream::connect(guard.addr())).await;
            let mut upstream = match connected {
                Ok(Ok(upstream)) => upstream,
                failed => {
                    let reason = match failed {
                        Ok(Err(err)) => err.to_string(),
                        _ => "timed out".to_string(),
                    };
                    tracing::warn!(%instance, %reason, "connect failed; trying the next backend");
                    self.metrics.connect_failures.get_or_create(&labels).inc();
                    guard.record(Outcome::ConnectFailure);
                    continue;
                }
            };
            // Before the header is written: with Nagle, the client's first bytes would wait
            // behind its ACK.
            let _ = upstream.set_nodelay(true);
            if self.config.send_proxy_protocol {
                // Before any of the client's bytes, so the proxy reads it ahead of TLS.
                let listener = client.local_addr().unwrap_or(self.config.listen);
                let header = proxy_protocol::header_for(peer, listener);
                if let Err(err) = upstream.write_all(&header).await {
                    tracing::warn!(%instance, error = %err, "PROXY header not sent; trying the next backend");
                    self.metrics.connect_failures.get_or_create(&labels).inc();
                    guard.record(Outcome::ConnectFailure);
                    continue;
                }
            }
            guard.record(Outcome::Response(StatusCode::OK));
            self.metrics.connections.get_or_create(&labels).inc();
            self.metrics.active.inc();
            tracing::debug!(%peer, %instance, "connection spliced");
            let result = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
            self.metrics.active.dec();
            if let Err(err) = result {
                tracing::debug!(%peer, %instance, error = %err, "connection ended with an error");
            }
            return;
        }
        self.metrics.refused.inc();
        tracing::warn!(%peer, upstream = %self.config.upstream, "no healthy backend; connection closed");
    }
}
