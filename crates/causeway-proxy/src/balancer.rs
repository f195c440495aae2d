//! The load-balancer role in layer-4 mode: accepts TCP connections at the edge and splices each
//! to a healthy instance of the upstream service (TLS passes through to the reverse proxies,
//! which terminate it). Instances come from discovery; active health checks (`GET /healthz` on
//! each instance's admin port, found through `_admin._tcp` SRV records) take an instance out
//! after `unhealthy_threshold` failures and put it back after `healthy_threshold` passes; a failed
//! connect (passive check) counts as a failure and the connection is tried on the next instance.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use causeway_client::Discovery;
use causeway_client::plain_http;
use causeway_core::serve::{Shutdown, accept};
use causeway_core::telemetry::Metrics;
use causeway_core::topology::LoadBalancerConfig;
use http::{Method, StatusCode};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use tokio::net::{TcpListener, TcpStream};

/// One upstream instance and what the balancer knows of its health.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backend {
    pub instance: String,
    pub addr: SocketAddr,
    pub admin: Option<SocketAddr>,
    pub healthy: bool,
    consecutive_failures: u32,
    consecutive_passes: u32,
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
    healthy: Family<BackendLabels, Gauge>,
    refused: Counter,
}

pub struct Balancer {
    config: LoadBalancerConfig,
    discovery: Discovery,
    backends: Mutex<Vec<Backend>>,
    next: AtomicUsize,
    metrics: BalancerMetrics,
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
            "lb_backend_healthy",
            "1 while a backend passes health checks",
            m.healthy.clone(),
        );
        registry.register(
            "lb_refused_connections",
            "Connections closed because no backend was healthy",
            m.refused.clone(),
        );
        Self {
            config,
            discovery,
            backends: Mutex::new(Vec::new()),
            next: AtomicUsize::new(0),
            metrics: m,
        }
    }

    pub fn backends(&self) -> Vec<Backend> {
        self.backends
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Refreshes the backend list from discovery and health-checks every backend, forever.
    pub async fn watch_backends(self: Arc<Self>, mut shutdown: Shutdown) {
        let interval = Duration::from_millis(self.config.health_check_interval_ms);
        loop {
            self.refresh().await;
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = shutdown.wait() => return,
            }
        }
    }

    /// One round: discovery, then a health check of every backend.
    pub async fn refresh(&self) {
        let upstream = &self.config.upstream;
        let listed = self.discovery.resolve(upstream).await;
        let admins = self.discovery.resolve_port(upstream, "admin").await;
        let admin_of: HashMap<String, SocketAddr> = admins
            .map(|r| {
                r.endpoints
                    .into_iter()
                    .map(|e| (e.instance, e.addr))
                    .collect()
            })
            .unwrap_or_default();
        match listed {
            Ok(resolution) => {
                let mut backends = self.backends.lock().unwrap_or_else(|p| p.into_inner());
                let previous = std::mem::take(&mut *backends);
                for endpoint in resolution.endpoints {
                    let known = previous
                        .iter()
                        .find(|b| b.instance == endpoint.instance && b.addr == endpoint.addr);
                    backends.push(match known {
                        Some(backend) => Backend {
                            admin: admin_of.get(&endpoint.instance).copied(),
                            ..backend.clone()
                        },
                        None => {
                            tracing::info!(instance = %endpoint.instance, addr = %endpoint.addr, "backend discovered");
                            Backend {
                                instance: endpoint.instance.clone(),
                                addr: endpoint.addr,
                                admin: admin_of.get(&endpoint.instance).copied(),
                                // Registered instances are serving; checks take them out if not.
                                healthy: true,
                                consecutive_failures: 0,
                                consecutive_passes: 0,
                            }
                        }
                    });
                }
            }
            Err(err) => {
                tracing::warn!(error = %err, "cannot refresh backends; keeping the last list");
            }
        }
        let targets: Vec<(String, Option<SocketAddr>)> = self
            .backends()
            .into_iter()
            .map(|b| (b.instance, b.admin))
            .collect();
        let timeout = Duration::from_millis(self.config.health_check_timeout_ms);
        let checks = targets.into_iter().map(|(instance, admin)| async move {
            let passed = match admin {
                Some(admin) => matches!(
                    plain_http::request(Method::GET, admin, "/healthz", None, timeout).await,
                    Ok((StatusCode::OK, _))
                ),
                // Without an admin port, only passive checks apply.
                None => true,
            };
            (instance, passed)
        });
        for (instance, passed) in futures_util::future::join_all(checks).await {
            self.record_check(&instance, passed);
        }
    }

    fn record_check(&self, instance: &str, passed: bool) {
        let mut backends = self.backends.lock().unwrap_or_else(|p| p.into_inner());
        let Some(backend) = backends.iter_mut().find(|b| b.instance == instance) else {
            return;
        };
        if passed {
            backend.consecutive_failures = 0;
            backend.consecutive_passes += 1;
            if !backend.healthy && backend.consecutive_passes >= self.config.healthy_threshold {
                backend.healthy = true;
                tracing::info!(instance, "backend healthy again");
            }
        } else {
            backend.consecutive_passes = 0;
            backend.consecutive_failures += 1;
            if backend.healthy && backend.consecutive_failures >= self.config.unhealthy_threshold {
                backend.healthy = false;
                tracing::warn!(instance, "backend failed its health checks; taken out");
            }
        }
        self.metrics
            .healthy
            .get_or_create(&BackendLabels {
                backend: instance.to_string(),
            })
            .set(i64::from(backend.healthy));
    }

    /// Healthy backends in round-robin order starting at this connection's turn.
    fn candidates(&self) -> Vec<Backend> {
        let backends = self.backends();
        let healthy: Vec<Backend> = backends.into_iter().filter(|b| b.healthy).collect();
        if healthy.is_empty() {
            return healthy;
        }
        let turn = self.next.fetch_add(1, Ordering::Relaxed) % healthy.len();
        healthy[turn..]
            .iter()
            .chain(&healthy[..turn])
            .cloned()
            .collect()
    }

    /// Accepts and splices connections until shutdown; open connections are left to finish.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, mut shutdown: Shutdown) {
        while let Some((client, peer)) = accept(&listener, &mut shutdown).await {
            let balancer = self.clone();
            tokio::spawn(async move { balancer.splice(client, peer).await });
        }
    }

    async fn splice(&self, mut client: TcpStream, peer: SocketAddr) {
        let connect_timeout = Duration::from_millis(self.config.connect_timeout_ms);
        for backend in self.candidates() {
            let connected =
                tokio::time::timeout(connect_timeout, TcpStream::connect(backend.addr)).await;
            let labels = BackendLabels {
                backend: backend.instance.clone(),
            };
            let mut upstream = match connected {
                Ok(Ok(upstream)) => upstream,
                failed => {
                    let reason = match failed {
                        Ok(Err(err)) => err.to_string(),
                        _ => "timed out".to_string(),
                    };
                    tracing::warn!(instance = %backend.instance, %reason, "connect failed; trying the next backend");
                    self.metrics.connect_failures.get_or_create(&labels).inc();
                    self.mark_down(&backend.instance);
                    continue;
                }
            };
            let _ = upstream.set_nodelay(true);
            self.metrics.connections.get_or_create(&labels).inc();
            self.metrics.active.inc();
            tracing::debug!(%peer, instance = %backend.instance, "connection spliced");
            let result = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
            self.metrics.active.dec();
            if let Err(err) = result {
                tracing::debug!(%peer, instance = %backend.instance, error = %err, "connection ended with an error");
            }
            return;
        }
        self.metrics.refused.inc();
        tracing::warn!(%peer, upstream = %self.config.upstream, "no healthy backend; connection closed");
    }

    /// A failed connect takes the backend out at once; health checks bring it back.
    fn mark_down(&self, instance: &str) {
        let mut backends = self.backends.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(backend) = backends.iter_mut().find(|b| b.instance == instance) {
            backend.healthy = false;
            backend.consecutive_passes = 0;
        }
    }
}
