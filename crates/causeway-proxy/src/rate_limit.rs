//! The API gateway's rate limit: a token bucket per client (its token's subject, else its
//! address; governor's GCRA), with one budget for all the reverse-proxy instances rather than
//! one each, so that N instances do not allow N times the limit.
//!
//! How the budget is shared: every instance keeps the whole bucket for each client and spends it
//! on the requests it admits itself at once, and on those the other instances admitted as soon
//! as it hears of them. Every `sync_interval_ms` (50 ms by default) each instance sends the
//! others, in UDP datagrams to their admin address (the port discovery already publishes as
//! `_admin._tcp`; UDP and TCP ports are separate), how many requests of each client it admitted
//! since the last report. Only datagrams from the instances discovery lists are believed.
//!
//! The error bound, documented in the README: what another instance admitted in the last
//! interval is not counted yet, so a client can exceed its budget by what it gets from the
//! other N-1 instances within one interval: at most its burst on each of them once, when it
//! spreads a fresh burst over all instances within 50 ms, and otherwise about one request per
//! other instance per interval. A lost datagram loses that interval's counts (over-admission,
//! never a refusal of its own). gubernator's GLOBAL behaviour makes the same trade: local
//! answers, asynchronous counts. An instance whose UDP port cannot be bound keeps its own
//! budget and says so in its log.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use causeway_client::Discovery;
use causeway_core::serve::Shutdown;
use causeway_core::topology::RateLimitConfig;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use tokio::net::UdpSocket;
use tokio::task::JoinHandle;

/// Whose budget a request spends: the token's subject, else the client's address.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientKey {
    Subject(String),
    Ip(IpAddr),
}

/// A datagram stays well under the 64 KiB UDP limit; more counts go in more datagrams.
const MAX_DATAGRAM: usize = 32 * 1024;
/// How often the list of the other instances is taken from discovery; more often while it is
/// empty, as it is at start-up until the others have registered.
const PEER_REFRESH: Duration = Duration::from_secs(1);
const PEER_REFRESH_ALONE: Duration = Duration::from_millis(100);

/// One instance's report to the others: requests admitted per client since its last one.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Report {
    from: String,
    hits: Vec<(ClientKey, u32)>,
}

#[derive(Clone, Default)]
struct SharingMetrics {
    /// Requests reported to the other instances (counted once, not per peer).
    hits_sent: Counter,
    /// Requests the other instances reported and this one spent from its buckets.
    hits_received: Counter,
    /// Datagrams dropped: from an address that is not another instance, or not a report.
    datagrams_refused: Counter,
    /// The other instances this one reports to, as discovery last listed them.
    peers: Gauge,
}

pub struct RateLimit {
    limiter: DefaultKeyedRateLimiter<ClientKey>,
    burst: u32,
    /// Set once [`spawn_sharing`] runs: from then on admitted requests are kept for the report.
    shared: AtomicBool,
    /// What this instance admitted since its last report.
    unsent: Mutex<HashMap<ClientKey, u32>>,
    metrics: SharingMetrics,
}

impl RateLimit {
    /// A budget of this instance's own until [`spawn_sharing`] shares it.
    pub fn new(config: &RateLimitConfig) -> Self {
        let per_second = NonZeroU32::new(config.requests_per_second).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(config.burst).unwrap_or(NonZeroU32::MIN);
        Self {
            limiter: RateLimiter::keyed(Quota::per_second(per_second).allow_burst(burst)),
            burst: burst.get(),
            shared: AtomicBool::new(false),
            unsent: Mutex::default(),
            metrics: SharingMetrics::default(),
        }
    }

    /// Spends one request of `key`'s budget, or says how long until it may send again.
    pub fn check(&self, key: &ClientKey) -> Result<(), Duration> {
        self.limiter
            .check_key(key)
            .map_err(|not_until| not_until.wait_time_from(DefaultClock::default().now()))?;
        if self.shared.load(Ordering::Relaxed) {
            let mut unsent = self
                .unsent
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            match unsent.get_mut(key) {
                Some(hits) => *hits = hits.saturating_add(1),
                None => {
                    unsent.insert(key.clone(), 1);
                }
            }
        }
        Ok(())
    }

    /// Spends what another instance admitted for `key`, as far as the bucket holds: a bucket
    /// already empty stays empty (the client waits for its refill, not longer).
    fn absorb(&self, key: &ClientKey, hits: u32) {
        for _ in 0..hits.min(self.burst) {
            if self.limiter.check_key(key).is_err() {
                break;
            }
        }
        self.metrics.hits_received.inc_by(u64::from(hits));
    }

    fn take_unsent(&self) -> HashMap<ClientKey, u32> {
        let mut unsent = self
            .unsent
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        std::mem::take(&mut *unsent)
    }

    /// Forgets clients that have been quiet, so memory stays bounded.
    pub fn forget_idle_clients(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }

    pub fn register(&self, registry: &mut Registry) {
        let metrics = &self.metrics;
        registry.register(
            "rate_limit_shared_hits_sent",
            "Admitted requests reported to the other reverse-proxy instances",
            metrics.hits_sent.clone(),
        );
        registry.register(
            "rate_limit_shared_hits_received",
            "Admitted requests the other instances reported, spent from this one's buckets",
            metrics.hits_received.clone(),
        );
        registry.register(
            "rate_limit_shared_datagrams_refused",
            "Rate-limit datagrams dropped: not from another instance, or not a report",
            metrics.datagrams_refused.clone(),
        );
        registry.register(
            "rate_limit_shared_peers",
            "Other reverse-proxy instances this one shares its rate-limit budget with",
            metrics.peers.clone(),
        );
    }
}

/// Who the other instances are: their rate-limit addresses, and this instance's name.
pub trait PeerSource: Send + Sync + 'static {
    fn instance(&self) -> &str;
    /// `None` keeps the last list (discovery is unreachable, say).
    fn list(&self) -> impl std::future::Future<Output = Option<Vec<SocketAddr>>> + Send;
}

/// The other instances from discovery: their admin addresses (the same port in UDP), all but
/// `instance`'s own.
pub struct DiscoveredPeers {
    pub discovery: Discovery,
    /// The reverse proxies' service name.
    pub service: String,
    pub instance: String,
}

impl PeerSource for DiscoveredPeers {
    fn instance(&self) -> &str {
        &self.instance
    }

    async fn list(&self) -> Option<Vec<SocketAddr>> {
        match self.discovery.resolve_port(&self.service, "admin").await {
            Ok(resolution) => Some(
                resolution
                    .endpoints
                    .into_iter()
                    .filter(|endpoint| endpoint.instance != self.instance)
                    .map(|endpoint| endpoint.addr)
                    .collect(),
            ),
            Err(err) => {
                tracing::warn!(error = %err, "cannot list the other instances; keeping the last list");
                None
            }
        }
    }
}

/// Reports this instance's admitted requests to the other instances every `interval` over
/// `socket`, and spends theirs, until shutdown.
pub fn spawn_sharing(
    limit: Arc<RateLimit>,
    socket: UdpSocket,
    peers: impl PeerSource,
    interval: Duration,
    mut shutdown: Shutdown,
) -> JoinHandle<()> {
    limit.shared.store(true, Ordering::Relaxed);
    tokio::spawn(async move {
        let mut known: HashSet<SocketAddr> = HashSet::new();
        let mut report = tokio::time::interval(interval.max(Duration::from_millis(1)));
        report.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut next_refresh = tokio::time::Instant::now();
        let mut buffer = vec![0u8; 64 * 1024];
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(next_refresh) => {
                    if let Some(list) = peers.list().await {
                        known = list.into_iter().collect();
                        limit.metrics.peers.set(known.len() as i64);
                    }
                    let wait = if known.is_empty() { PEER_REFRESH_ALONE } else { PEER_REFRESH };
                    next_refresh = tokio::time::Instant::now() + wait;
                }
                // Until discovery lists another instance the counts are kept, not sent to nobody.
                _ = report.tick(), if !known.is_empty() => {
                    let unsent = limit.take_unsent();
                    if unsent.is_empty() {
                        continue;
                    }
                    let hits: u64 = unsent.values().map(|hits| u64::from(*hits)).sum();
                    limit.metrics.hits_sent.inc_by(hits);
                    for datagram in datagrams(peers.instance(), unsent) {
                        for peer in &known {
                            if let Err(err) = socket.send_to(&datagram, peer).await {
                                tracing::debug!(%peer, error = %err, "rate-limit report not sent");
                            }
                        }
                    }
                }
                received = socket.recv_from(&mut buffer) => {
                    let Ok((len, from)) = received else { continue };
                    if !known.contains(&from) {
                        limit.metrics.datagrams_refused.inc();
                        tracing::debug!(%from, "rate-limit datagram from an unknown address dropped");
                        continue;
                    }
                    match serde_json::from_slice::<Report>(&buffer[..len]) {
                        Ok(report) => {
                            for (key, hits) in &report.hits {
                                limit.absorb(key, *hits);
                            }
                        }
                        Err(err) => {
                            limit.metrics.datagrams_refused.inc();
                            tracing::warn!(%from, error = %err, "a rate-limit datagram that is not a report");
                        }
                    }
                }
                _ = shutdown.wait() => return,
            }
        }
    })
}

/// The reports of `unsent`, each within [`MAX_DATAGRAM`] bytes.
fn datagrams(instance: &str, unsent: HashMap<ClientKey, u32>) -> Vec<Vec<u8>> {
    let encode = |hits| {
        serde_json::to_vec(&Report {
            from: instance.to_string(),
            hits,
        })
        .unwrap_or_default()
    };
    let mut datagrams = Vec::new();
    let mut hits = Vec::new();
    let mut size = 0;
    for (key, count) in unsent {
        // An upper bound of the entry's encoded size: quotes, escapes, digits, separators.
        let entry = match &key {
            ClientKey::Subject(subject) => subject.len() * 6 + 32,
            ClientKey::Ip(_) => 64,
        };
        if entry > MAX_DATAGRAM / 2 {
            // A subject this long cannot be reported; that client keeps a per-instance budget.
            continue;
        }
        if size + entry > MAX_DATAGRAM {
            datagrams.push(encode(std::mem::take(&mut hits)));
            size = 0;
        }
        size += entry;
        hits.push((key, count));
    }
    if !hits.is_empty() {
        datagrams.push(encode(hits));
    }
    datagrams
}

#[cfg(test)]
mod tests;
