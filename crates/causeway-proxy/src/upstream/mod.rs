//! Upstreams: the set of endpoints behind one route, and everything that decides which endpoint a
//! request goes to and whether it is tried again.
//!
//! - [`Upstream`] holds the endpoint set (replaced atomically when discovery changes, keeping the
//!   state of endpoints that stay), hands out a [`PickGuard`] per request from
//!   [`Upstream::pick`] and learns from what the guard records: latency (a peak-EWMA per
//!   endpoint) and failures (passive outlier detection).
//! - Balancing ([`BalancePolicy`]): round robin, nginx's smooth weighted round robin,
//!   least-request as power of two choices over EWMA × (in-flight + 1) as linkerd2-proxy, and
//!   Maglev consistent hashing on a header or cookie for sticky routing.
//! - Health: passive outlier detection ([`OutlierConfig`]: consecutive 5xx or connect failures
//!   eject an endpoint for a growing time, never more than a share of the set) and active HTTP
//!   checks ([`HealthCheckConfig`], [`Upstream::spawn_health_checker`]). Balancers only ever see
//!   endpoints that are healthy and not ejected.
//! - Retries: [`RetryPolicy`] says which failures may be retried (idempotent methods on connect
//!   failure or 503; anything on a connect failure that sent no bytes), [`RetryBudget`] caps
//!   retries to a share of the traffic, and [`RetrySession`] walks one request through its
//!   attempts under a per-try timeout and an overall deadline.
//!
//! Everything is configured by one [`UpstreamConfig`], so a topology file can set it per route.
//! Every time-dependent method has an `_at(now)` twin so tests (and callers with their own
//! clock) control time.
//!
//! ```ignore
//! let upstream = Upstream::with_metrics("orders", config, specs, metrics.clone())?;
//! let _checker = upstream.spawn_health_checker(shutdown.clone());
//! // per request:
//! let guard = upstream.pick(request.headers())?;          // PickError → 503
//! let outcome = forward(guard.addr(), request).await;      // Outcome::Response(status) / ...
//! guard.record(outcome);
//! ```

mod balance;
mod endpoint;
mod health;
mod outlier;
mod retry;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use causeway_core::serve::Shutdown;
use http::{HeaderMap, Method};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::registry::Registry;
use tokio::task::JoinHandle;

pub use balance::{
    BalancePolicy, ConsistentHash, DEFAULT_MAGLEV_TABLE_SIZE, Fallback, HashKey, LeastRequest,
    MaglevError, MaglevTable, RoundRobin, WeightedRoundRobin, hash_bytes,
};
pub use endpoint::{Endpoint, EndpointSpec, Outcome, PeakEwma, PickGuard};
pub use health::{HealthCheckConfig, check_endpoint, check_round, spawn_health_checker};
use outlier::Verdict;
pub use outlier::{EjectReason, OutlierConfig};
pub use retry::{
    FailureKind, NoRetry, RetryBudget, RetryBudgetConfig, RetryCounters, RetryDecision,
    RetryPolicy, RetryPolicyExt, RetrySession, is_idempotent,
};

use balance::Balancer;
use endpoint::lock;

pub use causeway_core::proxy_config::{EwmaConfig, UpstreamConfig};

/// The whole config's checks: the plain ones, and that a Maglev table can be built at the
/// configured size (that needs the table builder, which lives here).
pub fn validate_config(config: &UpstreamConfig) -> Result<(), String> {
    config.validate()?;
    if let BalancePolicy::ConsistentHash { table_size, .. } = &config.balance {
        // Validated against an empty set here; the endpoint count is checked on each update.
        MaglevTable::new(&[], *table_size).map_err(|err| err.to_string())?;
    }
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("upstream {upstream}: invalid configuration: {message}")]
    InvalidConfig { upstream: String, message: String },
    #[error("upstream {upstream}: endpoint id {id:?} appears more than once")]
    DuplicateEndpoint { upstream: String, id: String },
    #[error("upstream {upstream}: {source}")]
    Maglev {
        upstream: String,
        #[source]
        source: MaglevError,
    },
}

/// Why no endpoint could be picked (the gateway answers 503).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PickError {
    #[error("upstream {upstream} has no endpoints")]
    NoEndpoints { upstream: String },
    #[error("upstream {upstream}: none of its {total} endpoints is healthy and not ejected")]
    NoneAvailable { upstream: String, total: usize },
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabels {
    pub upstream: String,
    pub endpoint: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabels {
    pub upstream: String,
}

/// Metrics of any number of upstreams; create one, [`register`](Self::register) it once, and
/// hand clones to [`Upstream::with_metrics`].
#[derive(Clone, Debug, Default)]
pub struct UpstreamMetrics {
    pub ejections: Family<EndpointLabels, Counter>,
    pub ejected: Family<EndpointLabels, Gauge>,
    pub healthy: Family<EndpointLabels, Gauge>,
    pub retries: Family<UpstreamLabels, Counter>,
    pub retry_budget_exhausted: Family<UpstreamLabels, Counter>,
    /// The upstreams built with these metrics, read at scrape time for their requests in flight
    /// (each endpoint already counts them for least-request balancing, so a request pays nothing
    /// more for the metric).
    live: Arc<Mutex<Vec<Weak<Inner>>>>,
}

/// `upstream_in_flight`: requests in flight per endpoint, from the live upstreams at scrape time.
#[derive(Debug)]
struct InFlightCollector {
    live: Arc<Mutex<Vec<Weak<Inner>>>>,
}

impl Collector for InFlightCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let upstreams: Vec<Arc<Inner>> = {
            let mut live = lock(&self.live);
            live.retain(|upstream| upstream.strong_count() > 0);
            live.iter().filter_map(Weak::upgrade).collect()
        };
        // Summed per label set: after a reload an old and a new upstream of the same name may
        // both be live until the old one's requests have finished.
        let mut in_flight: BTreeMap<(String, String), i64> = BTreeMap::new();
        for upstream in &upstreams {
            let set = upstream
                .set
                .read()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .clone();
            for endpoint in &set.endpoints {
                *in_flight
                    .entry((upstream.name.to_string(), endpoint.id().to_string()))
                    .or_default() += endpoint.in_flight() as i64;
            }
        }
        let gauge = ConstGauge::new(0i64);
        let mut family = encoder.encode_descriptor(
            "upstream_in_flight",
            "Requests in flight per upstream endpoint",
            None,
            gauge.metric_type(),
        )?;
        for ((upstream, endpoint), value) in in_flight {
            let labels = EndpointLabels { upstream, endpoint };
            ConstGauge::new(value).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

impl UpstreamMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "upstream_ejections",
            "Outlier-detection ejections per upstream endpoint",
            self.ejections.clone(),
        );
        registry.register(
            "upstream_ejected",
            "1 while the endpoint is ejected by outlier detection",
            self.ejected.clone(),
        );
        registry.register(
            "upstream_healthy",
            "1 while active health checks find the endpoint healthy",
            self.healthy.clone(),
        );
        registry.register(
            "upstream_retries",
            "Retries taken per upstream",
            self.retries.clone(),
        );
        registry.register(
            "upstream_retry_budget_exhausted",
            "Retries refused because the upstream's retry budget was spent",
            self.retry_budget_exhausted.clone(),
        );
        registry.register_collector(Box::new(InFlightCollector {
            live: self.live.clone(),
        }));
    }

    fn track(&self, upstream: &Arc<Inner>) {
        let mut live = lock(&self.live);
        live.retain(|upstream| upstream.strong_count() > 0);
        live.push(Arc::downgrade(upstream));
    }

    fn labels(endpoint: &Endpoint) -> EndpointLabels {
        EndpointLabels {
            upstream: endpoint.upstream().to_string(),
            endpoint: endpoint.id().to_string(),
        }
    }

    pub(crate) fn set_healthy(&self, endpoint: &Endpoint, healthy: bool) {
        self.healthy
            .get_or_create(&Self::labels(endpoint))
            .set(i64::from(healthy));
    }

    fn set_ejected(&self, endpoint: &Endpoint, ejected: bool) {
        self.ejected
            .get_or_create(&Self::labels(endpoint))
            .set(i64::from(ejected));
    }

    fn forget(&self, endpoint: &Endpoint) {
        let labels = Self::labels(endpoint);
        self.ejected.remove(&labels);
        self.healthy.remove(&labels);
    }
}

/// One set of endpoints and the balancer built for it; replaced whole on updates.
#[derive(Debug)]
struct EndpointSet {
    endpoints: Vec<Arc<Endpoint>>,
    balancer: Balancer,
}

#[derive(Debug)]
struct Inner {
    name: Arc<str>,
    config: UpstreamConfig,
    set: RwLock<Arc<EndpointSet>>,
    /// Serialises updates, so two discovery answers cannot interleave.
    updating: Mutex<()>,
    /// Serialises ejections, so the max-ejection share holds under concurrency.
    ejecting: Mutex<()>,
    budget: RetryBudget,
    metrics: UpstreamMetrics,
}

/// One upstream service: its endpoints, balancer, outlier and health state and retry budget.
/// Cheap to clone (one `Arc`).
#[derive(Clone, Debug)]
pub struct Upstream {
    inner: Arc<Inner>,
}

impl Upstream {
    pub fn new(
        name: impl Into<String>,
        config: UpstreamConfig,
        endpoints: Vec<EndpointSpec>,
    ) -> Result<Self, UpstreamError> {
        Self::with_metrics(name, config, endpoints, UpstreamMetrics::default())
    }

    pub fn with_metrics(
        name: impl Into<String>,
        config: UpstreamConfig,
        endpoints: Vec<EndpointSpec>,
        metrics: UpstreamMetrics,
    ) -> Result<Self, UpstreamError> {
        let name: Arc<str> = name.into().into();
        validate_config(&config).map_err(|message| UpstreamError::InvalidConfig {
            upstream: name.to_string(),
            message,
        })?;
        let empty = EndpointSet {
            endpoints: Vec::new(),
            balancer: Balancer::RoundRobin(RoundRobin::default()),
        };
        let upstream = Self {
            inner: Arc::new(Inner {
                name,
                budget: RetryBudget::new(config.retry_budget.clone()),
                config,
                set: RwLock::new(Arc::new(empty)),
                updating: Mutex::new(()),
                ejecting: Mutex::new(()),
                metrics,
            }),
        };
        upstream.update(endpoints)?;
        upstream.inner.metrics.track(&upstream.inner);
        Ok(upstream)
    }

    pub fn name(&self) -> &str {
        &self.inner.name
    }

    pub fn config(&self) -> &UpstreamConfig {
        &self.inner.config
    }

    pub fn metrics(&self) -> &UpstreamMetrics {
        &self.inner.metrics
    }

    pub fn retry_budget(&self) -> &RetryBudget {
        &self.inner.budget
    }

    fn snapshot(&self) -> Arc<EndpointSet> {
        self.inner
            .set
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// The current endpoints, in discovery's order.
    pub fn endpoints(&self) -> Vec<Arc<Endpoint>> {
        self.snapshot().endpoints.clone()
    }

    /// The endpoint at `addr`, if in the set.
    pub fn endpoint(&self, addr: SocketAddr) -> Option<Arc<Endpoint>> {
        self.snapshot()
            .endpoints
            .iter()
            .find(|endpoint| endpoint.addr() == addr)
            .cloned()
    }

    /// Replaces the endpoint set. Endpoints with the same id and addresses keep their state
    /// (in-flight count, latency, health, ejection); requests in flight finish on the old set.
    pub fn update(&self, specs: Vec<EndpointSpec>) -> Result<(), UpstreamError> {
        let _updating = lock(&self.inner.updating);
        let old = self.snapshot();
        let ewma = &self.inner.config.ewma;
        let now = Instant::now();
        let mut endpoints: Vec<Arc<Endpoint>> = Vec::with_capacity(specs.len());
        for spec in &specs {
            if endpoints.iter().any(|endpoint| endpoint.id() == spec.id) {
                return Err(UpstreamError::DuplicateEndpoint {
                    upstream: self.name().to_string(),
                    id: spec.id.clone(),
                });
            }
            let endpoint = match old.endpoints.iter().find(|old| old.same_as(spec)) {
                Some(kept) => {
                    kept.set_weight(spec.weight);
                    kept.clone()
                }
                None => Arc::new(Endpoint::new(
                    spec,
                    self.inner.name.clone(),
                    PeakEwma::new(
                        Duration::from_millis(ewma.default_rtt_ms),
                        Duration::from_millis(ewma.decay_ms),
                        now,
                    ),
                )),
            };
            endpoints.push(endpoint);
        }
        let balancer =
            Balancer::build(&self.inner.config.balance, &endpoints).map_err(|source| {
                UpstreamError::Maglev {
                    upstream: self.name().to_string(),
                    source,
                }
            })?;
        for gone in old
            .endpoints
            .iter()
            .filter(|old| !endpoints.iter().any(|new| Arc::ptr_eq(old, new)))
        {
            self.inner.metrics.forget(gone);
        }
        for endpoint in &endpoints {
            self.inner
                .metrics
                .set_healthy(endpoint, endpoint.is_healthy());
        }
        let set = Arc::new(EndpointSet {
            endpoints,
            balancer,
        });
        *self
            .inner
            .set
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = set;
        Ok(())
    }

    /// Picks an endpoint for a request with these headers (the hash key comes from them).
    pub fn pick(&self, headers: &HeaderMap) -> Result<PickGuard, PickError> {
        self.pick_at(headers, Instant::now())
    }

    pub fn pick_at(&self, headers: &HeaderMap, now: Instant) -> Result<PickGuard, PickError> {
        let set = self.snapshot();
        if set.endpoints.is_empty() {
            return Err(PickError::NoEndpoints {
                upstream: self.name().to_string(),
            });
        }
        let eligible: Vec<usize> = set
            .endpoints
            .iter()
            .enumerate()
            .filter(|(_, endpoint)| self.is_eligible(endpoint, now))
            .map(|(index, _)| index)
            .collect();
        let index = set
            .balancer
            .pick(&set.endpoints, &eligible, headers, now)
            .ok_or_else(|| PickError::NoneAvailable {
                upstream: self.name().to_string(),
                total: set.endpoints.len(),
            })?;
        Ok(self.track_at(&set.endpoints[index], now))
    }

    /// A guard for a request the caller sends to `endpoint` itself (bypassing the balancer),
    /// so it is counted and its outcome learnt from all the same.
    pub fn track(&self, endpoint: &Arc<Endpoint>) -> PickGuard {
        self.track_at(endpoint, Instant::now())
    }

    pub fn track_at(&self, endpoint: &Arc<Endpoint>, now: Instant) -> PickGuard {
        PickGuard::new(endpoint.clone(), self.clone(), now)
    }

    /// Healthy and not ejected; an ejection whose time is up ends here.
    fn is_eligible(&self, endpoint: &Endpoint, now: Instant) -> bool {
        if !endpoint.is_healthy() {
            return false;
        }
        let mut outlier = lock(&endpoint.outlier);
        if outlier.try_return(now) {
            drop(outlier);
            self.inner.metrics.set_ejected(endpoint, false);
            tracing::info!(
                event = "upstream.returned",
                upstream = endpoint.upstream(),
                endpoint = endpoint.id(),
                addr = %endpoint.addr(),
                circuit = "half_open",
            );
            return true;
        }
        outlier.admits(now)
    }

    /// Learns from one finished request (called by [`PickGuard::record_at`]).
    pub(crate) fn observe(
        &self,
        endpoint: &Arc<Endpoint>,
        outcome: Outcome,
        latency: Duration,
        now: Instant,
    ) {
        let latency = if outcome.is_failure() {
            latency.max(Duration::from_millis(
                self.inner.config.ewma.failure_penalty_ms,
            ))
        } else {
            latency
        };
        endpoint.observe_latency(latency, now);
        let config = &self.inner.config.outlier;
        let verdict = lock(&endpoint.outlier).count(outcome, config, now);
        match verdict {
            Some(Verdict::Eject(reason)) => self.try_eject(endpoint, reason, now),
            Some(Verdict::Closed) => tracing::info!(
                event = "upstream.closed",
                upstream = endpoint.upstream(),
                endpoint = endpoint.id(),
                addr = %endpoint.addr(),
                "the half-open endpoint's probe succeeded"
            ),
            None => {}
        }
    }

    fn try_eject(&self, endpoint: &Arc<Endpoint>, reason: EjectReason, now: Instant) {
        let _ejecting = lock(&self.inner.ejecting);
        let set = self.snapshot();
        if !set.endpoints.iter().any(|e| Arc::ptr_eq(e, endpoint)) || endpoint.is_ejected(now) {
            return; // left the set meanwhile, or ejected by a concurrent failure
        }
        let config = &self.inner.config.outlier;
        let ejected = set.endpoints.iter().filter(|e| e.is_ejected(now)).count();
        let others_available = set
            .endpoints
            .iter()
            .any(|e| !Arc::ptr_eq(e, endpoint) && e.is_healthy() && !e.is_ejected(now));
        if ejected >= config.max_ejected(set.endpoints.len()) || !others_available {
            tracing::warn!(
                event = "upstream.ejection_skipped",
                upstream = endpoint.upstream(),
                endpoint = endpoint.id(),
                reason = reason.as_str(),
                ejected,
                total = set.endpoints.len(),
                max_ejection_percent = config.max_ejection_percent,
            );
            return;
        }
        let (duration, times) = {
            let mut outlier = lock(&endpoint.outlier);
            (outlier.eject(config, now), outlier.times_ejected)
        };
        let labels = UpstreamMetrics::labels(endpoint);
        self.inner.metrics.ejections.get_or_create(&labels).inc();
        self.inner.metrics.set_ejected(endpoint, true);
        tracing::warn!(
            event = "upstream.ejected",
            upstream = endpoint.upstream(),
            endpoint = endpoint.id(),
            addr = %endpoint.addr(),
            reason = reason.as_str(),
            times,
            duration_ms = duration.as_millis() as u64,
        );
    }

    /// Starts one request's retry bookkeeping (deposits into the budget).
    pub fn retry_session(&self, method: Method) -> RetrySession<'_> {
        let labels = UpstreamLabels {
            upstream: self.name().to_string(),
        };
        let metrics = &self.inner.metrics;
        RetrySession::new(&self.inner.config.retry, &self.inner.budget, method)
            .named(self.name())
            .with_counters(RetryCounters {
                retries: metrics.retries.get_or_create(&labels).clone(),
                budget_exhausted: metrics
                    .retry_budget_exhausted
                    .get_or_create(&labels)
                    .clone(),
            })
    }

    /// Starts the active health checker if the config has one; it stops on `shutdown`.
    pub fn spawn_health_checker(&self, shutdown: Shutdown) -> Option<JoinHandle<()>> {
        let config = self.inner.config.health_check.clone()?;
        Some(spawn_health_checker(self.clone(), config, shutdown))
    }
}
