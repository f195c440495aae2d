//! Endpoints and their load: the shared per-endpoint state (in-flight requests, peak-EWMA
//! latency, health, outlier counters) and the RAII guard a pick hands out.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use http::StatusCode;
use serde::{Deserialize, Serialize};

use super::Upstream;
use super::outlier::OutlierState;

/// One instance of an upstream service as discovery reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointSpec {
    /// Instance name; also the Maglev identity, so it must be stable across restarts.
    pub id: String,
    pub addr: SocketAddr,
    /// Relative weight for the weighted policies; 0 is treated as 1 there.
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Where active health checks go when not `addr` (an admin port, say).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_addr: Option<SocketAddr>,
}

fn default_weight() -> u32 {
    1
}

impl EndpointSpec {
    pub fn new(id: impl Into<String>, addr: SocketAddr) -> Self {
        Self {
            id: id.into(),
            addr,
            weight: 1,
            health_addr: None,
        }
    }

    pub fn with_weight(mut self, weight: u32) -> Self {
        self.weight = weight;
        self
    }

    pub fn with_health_addr(mut self, addr: SocketAddr) -> Self {
        self.health_addr = Some(addr);
        self
    }
}

/// What became of one request to an endpoint, as the guard records it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// An answer came back; 5xx counts as a failure for outlier detection.
    Response(StatusCode),
    /// The TCP (or TLS) connection could not be set up.
    ConnectFailure,
    /// Connected, but no usable answer (reset, protocol error, per-try timeout).
    Failure,
}

impl Outcome {
    pub fn is_failure(self) -> bool {
        match self {
            Outcome::Response(status) => status.is_server_error(),
            Outcome::ConnectFailure | Outcome::Failure => true,
        }
    }
}

/// Peak-EWMA latency as in linkerd2-proxy / Finagle: a slower observation replaces the estimate
/// at once (so a degrading endpoint is avoided immediately), faster ones pull it down with a
/// weight that grows with the time since the last update, and the estimate decays toward zero
/// while idle so a once-slow endpoint is eventually probed again.
#[derive(Clone, Debug)]
pub struct PeakEwma {
    estimate_ns: f64,
    stamp: Instant,
    decay_ns: f64,
}

impl PeakEwma {
    pub fn new(initial: Duration, decay: Duration, now: Instant) -> Self {
        Self {
            estimate_ns: initial.as_nanos() as f64,
            stamp: now,
            // A zero decay would divide by zero below; one nanosecond means "no memory".
            decay_ns: (decay.as_nanos() as f64).max(1.0),
        }
    }

    pub fn observe(&mut self, rtt: Duration, now: Instant) {
        let rtt_ns = rtt.as_nanos() as f64;
        if rtt_ns > self.estimate_ns {
            self.estimate_ns = rtt_ns;
        } else {
            let weight = self.weight_since(now);
            self.estimate_ns = self.estimate_ns * weight + rtt_ns * (1.0 - weight);
        }
        self.stamp = self.stamp.max(now);
    }

    /// The estimate as of `now`, decayed for the idle time (does not move the stamp).
    pub fn estimate_ns(&self, now: Instant) -> f64 {
        self.estimate_ns * self.weight_since(now)
    }

    fn weight_since(&self, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(self.stamp).as_nanos() as f64;
        (-elapsed / self.decay_ns).exp()
    }
}

/// Health as seen by the active checker.
#[derive(Debug, Default)]
pub(crate) struct HealthCounters {
    pub(crate) passes: u32,
    pub(crate) failures: u32,
}

/// The shared state of one endpoint; it outlives discovery updates that keep the endpoint.
#[derive(Debug)]
pub struct Endpoint {
    id: String,
    addr: SocketAddr,
    health_addr: Option<SocketAddr>,
    weight: AtomicU32,
    upstream: Arc<str>,
    in_flight: AtomicUsize,
    ewma: Mutex<PeakEwma>,
    healthy: AtomicBool,
    pub(crate) health: Mutex<HealthCounters>,
    pub(crate) outlier: Mutex<OutlierState>,
}

impl Endpoint {
    pub(crate) fn new(spec: &EndpointSpec, upstream: Arc<str>, ewma: PeakEwma) -> Self {
        Self {
            id: spec.id.clone(),
            addr: spec.addr,
            health_addr: spec.health_addr,
            weight: AtomicU32::new(spec.weight),
            upstream,
            in_flight: AtomicUsize::new(0),
            ewma: Mutex::new(ewma),
            // Healthy until a checker says otherwise: starting unhealthy would black out a fresh
            // upstream for `healthy_threshold` intervals.
            healthy: AtomicBool::new(true),
            health: Mutex::new(HealthCounters::default()),
            outlier: Mutex::new(OutlierState::default()),
        }
    }

    /// Whether `spec` describes this same endpoint (so its stats carry over).
    pub(crate) fn same_as(&self, spec: &EndpointSpec) -> bool {
        self.id == spec.id && self.addr == spec.addr && self.health_addr == spec.health_addr
    }

    pub(crate) fn set_weight(&self, weight: u32) {
        self.weight.store(weight, Ordering::Relaxed);
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The address active health checks go to.
    pub fn health_addr(&self) -> SocketAddr {
        self.health_addr.unwrap_or(self.addr)
    }

    pub fn weight(&self) -> u32 {
        self.weight.load(Ordering::Relaxed)
    }

    pub fn upstream(&self) -> &str {
        &self.upstream
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    pub(crate) fn set_healthy(&self, healthy: bool) {
        self.healthy.store(healthy, Ordering::Relaxed);
    }

    /// The latency estimate as of `now`.
    pub fn ewma_latency(&self, now: Instant) -> Duration {
        Duration::from_nanos(lock(&self.ewma).estimate_ns(now) as u64)
    }

    /// The least-request cost: latency estimate × (in-flight + 1), as linkerd2-proxy.
    pub fn cost(&self, now: Instant) -> f64 {
        lock(&self.ewma).estimate_ns(now) * (self.in_flight() as f64 + 1.0)
    }

    pub(crate) fn observe_latency(&self, rtt: Duration, now: Instant) {
        lock(&self.ewma).observe(rtt, now);
    }

    /// Whether the endpoint is back from an ejection and waiting for its probe to succeed.
    pub fn is_half_open(&self) -> bool {
        lock(&self.outlier).is_half_open()
    }

    /// Whether outlier detection has this endpoint ejected at `now` (without returning it).
    pub fn is_ejected(&self, now: Instant) -> bool {
        lock(&self.outlier).is_ejected(now)
    }

    /// How many times outlier detection has ejected this endpoint.
    pub fn times_ejected(&self) -> u32 {
        lock(&self.outlier).times_ejected
    }
}

/// Locks, shrugging off poisoning: the state behind these locks stays consistent after any panic
/// (plain counters and stamps).
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// One request in flight to an endpoint: counts it in the endpoint's in-flight gauge until it is
/// recorded or dropped. Dropping without [`PickGuard::record`] means "cancelled": the request
/// leaves the count but teaches neither the latency estimate nor outlier detection.
#[must_use = "a guard counts a request in flight until it is recorded or dropped"]
pub struct PickGuard {
    endpoint: Arc<Endpoint>,
    upstream: Upstream,
    started: Instant,
    /// This request is the half-open endpoint's probe (see the outlier module).
    probe: bool,
}

impl PickGuard {
    pub(crate) fn new(endpoint: Arc<Endpoint>, upstream: Upstream, started: Instant) -> Self {
        endpoint.in_flight.fetch_add(1, Ordering::Relaxed);
        let probe = lock(&endpoint.outlier).take_probe();
        Self {
            endpoint,
            upstream,
            started,
            probe,
        }
    }

    /// Whether this request probes an endpoint back from an ejection.
    pub fn is_probe(&self) -> bool {
        self.probe
    }

    pub fn endpoint(&self) -> &Arc<Endpoint> {
        &self.endpoint
    }

    pub fn addr(&self) -> SocketAddr {
        self.endpoint.addr
    }

    pub fn started(&self) -> Instant {
        self.started
    }

    /// Records the outcome now; the latency is the time since the pick.
    pub fn record(self, outcome: Outcome) {
        self.record_at(outcome, Instant::now());
    }

    /// Records the outcome as of `now` (tests and callers with their own clock).
    pub fn record_at(mut self, outcome: Outcome, now: Instant) {
        let latency = now.saturating_duration_since(self.started);
        self.upstream.observe(&self.endpoint, outcome, latency, now);
        // The outcome settled the probe; drop decrements in-flight.
        self.probe = false;
    }
}

impl Drop for PickGuard {
    fn drop(&mut self) {
        self.endpoint.in_flight.fetch_sub(1, Ordering::Relaxed);
        if self.probe {
            lock(&self.endpoint.outlier).release_probe();
        }
    }
}

impl std::fmt::Debug for PickGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PickGuard")
            .field("endpoint", &self.endpoint.id)
            .field("addr", &self.endpoint.addr)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peak_ewma_jumps_up_and_decays_down() {
        let t0 = Instant::now();
        let mut ewma = PeakEwma::new(Duration::from_millis(10), Duration::from_secs(10), t0);
        ewma.observe(Duration::from_millis(200), t0);
        assert_eq!(
            ewma.estimate_ns(t0),
            200_000_000.0,
            "a slow answer is taken at once"
        );

        // A fast answer right away barely moves it; after a decay period it weighs much more.
        ewma.observe(Duration::from_millis(1), t0);
        assert!(ewma.estimate_ns(t0) > 199_000_000.0);
        let later = t0 + Duration::from_secs(10);
        ewma.observe(Duration::from_millis(1), later);
        let estimate = ewma.estimate_ns(later);
        assert!(
            estimate < 80_000_000.0 && estimate > 1_000_000.0,
            "{estimate}"
        );

        // Idle time decays the estimate toward zero.
        let idle = later + Duration::from_secs(60);
        assert!(ewma.estimate_ns(idle) < estimate / 100.0);
    }

    #[test]
    fn outcome_failures() {
        assert!(!Outcome::Response(StatusCode::OK).is_failure());
        assert!(!Outcome::Response(StatusCode::NOT_FOUND).is_failure());
        assert!(Outcome::Response(StatusCode::BAD_GATEWAY).is_failure());
        assert!(Outcome::ConnectFailure.is_failure());
        assert!(Outcome::Failure.is_failure());
    }
}
