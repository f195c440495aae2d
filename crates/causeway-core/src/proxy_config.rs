//! The proxy engine's plain configuration: what a listener accepts ([`Limits`]) and how an
//! upstream is balanced, checked and retried ([`UpstreamConfig`]). Pure serde data (plus what
//! needs only `http`/`hyper`), kept here so that the topology can hold it; causeway-proxy
//! re-exports every type from its old path and adds the behaviour that needs its own types.

use std::time::Duration;

use http::{HeaderMap, StatusCode};
use serde::{Deserialize, Serialize};

// ---- Listener limits ----

#[derive(Debug, thiserror::Error)]
pub enum LimitsError {
    #[error("limits.{field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
}

/// What one proxy listener accepts from its clients.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// The whole request head (request line and headers); larger gets 431. At least 8192
    /// (hyper's minimum read buffer).
    pub max_header_bytes: usize,
    /// More header lines get 431.
    pub max_header_count: usize,
    /// Larger bodies get 413.
    pub max_body_bytes: usize,
    /// Whole request, head to last body byte; longer gets 408.
    pub request_timeout_ms: u64,
    /// How long a request head may take to arrive (from the connection's start for its first
    /// request, from the head's first byte for later ones); a partial head then gets 408. Short
    /// by default, against slowloris clients (nginx's `client_header_timeout` is 60 s).
    pub header_timeout_ms: u64,
    /// How long a keep-alive connection may stay idle between requests (from the last byte of
    /// the previous answer); then it is closed.
    pub idle_timeout_ms: u64,
    /// Connections over this are refused (503 on plain HTTP, closed on TLS).
    pub max_connections: usize,
    /// Sources whose connections may start with a PROXY protocol v2 header naming the client
    /// (see [`crate::serve::proxy_protocol`]); empty: no header is read. Set from the role's own
    /// configuration (`reverse_proxy.proxy_protocol_from`), not under `limits`.
    #[serde(skip)]
    pub proxy_protocol_from: Vec<ipnet::IpNet>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_header_bytes: 64 * 1024,
            max_header_count: 100,
            max_body_bytes: 1024 * 1024,
            request_timeout_ms: 30_000,
            header_timeout_ms: 10_000,
            idle_timeout_ms: 30_000,
            max_connections: 10_000,
            proxy_protocol_from: Vec::new(),
        }
    }
}

/// hyper panics on a smaller read buffer.
const MIN_HEADER_BYTES: usize = 8192;

impl Limits {
    pub fn validate(&self) -> Result<(), LimitsError> {
        let invalid = |field, message: String| Err(LimitsError::Invalid { field, message });
        if self.max_header_bytes < MIN_HEADER_BYTES {
            return invalid(
                "max_header_bytes",
                format!("must be at least {MIN_HEADER_BYTES}"),
            );
        }
        if self.max_header_count > crate::serve::MAX_HEADER_COUNT {
            return invalid(
                "max_header_count",
                format!("must be at most {}", crate::serve::MAX_HEADER_COUNT),
            );
        }
        for (field, value) in [
            ("max_header_count", self.max_header_count as u64),
            ("max_body_bytes", self.max_body_bytes as u64),
            ("request_timeout_ms", self.request_timeout_ms),
            ("header_timeout_ms", self.header_timeout_ms),
            ("idle_timeout_ms", self.idle_timeout_ms),
            ("max_connections", self.max_connections as u64),
        ] {
            if value == 0 {
                return invalid(field, "must be positive".into());
            }
        }
        Ok(())
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }

    pub fn header_timeout(&self) -> Duration {
        Duration::from_millis(self.header_timeout_ms)
    }

    pub fn idle_timeout(&self) -> Duration {
        Duration::from_millis(self.idle_timeout_ms)
    }

    fn header_bytes(&self) -> usize {
        self.max_header_bytes.max(MIN_HEADER_BYTES)
    }

    /// Header size and count (431 from hyper) and the header read timeout (connection closed).
    pub fn apply_http1(&self, builder: &mut hyper::server::conn::http1::Builder) {
        builder
            .timer(hyper_util::rt::TokioTimer::new())
            .max_buf_size(self.header_bytes())
            .max_headers(self.max_header_count)
            .header_read_timeout(self.idle_timeout());
    }

    /// The header list limit (HTTP/2 counts decoded bytes plus 32 per field, RFC 9113 §6.5.2).
    pub fn apply_http2<E>(&self, builder: &mut hyper::server::conn::http2::Builder<E>) {
        builder
            .timer(hyper_util::rt::TokioTimer::new())
            .max_header_list_size(u32::try_from(self.header_bytes()).unwrap_or(u32::MAX));
    }

    /// On the auto (ALPN / preface sniffing) builder `causeway_core::serve` uses, behind its
    /// HTTP/1.1 front guard ([`crate::serve::Http1Guard`]), which enforces the header limits and
    /// timeouts first and answers for them: hyper's own header timer is off, and hyper runs with
    /// `half_close` so that the guard's end of stream after a refused pipelined head lets the
    /// answer in progress finish. The same size and count stay on hyper as a backstop.
    pub fn apply_auto<E>(&self, builder: &mut hyper_util::server::conn::auto::Builder<E>) {
        builder
            .http1()
            .timer(hyper_util::rt::TokioTimer::new())
            .max_buf_size(self.header_bytes())
            .max_headers(self.max_header_count)
            .header_read_timeout(None)
            .half_close(true);
        builder
            .http2()
            .timer(hyper_util::rt::TokioTimer::new())
            .max_header_list_size(u32::try_from(self.header_bytes()).unwrap_or(u32::MAX));
    }
}

// ---- Balancing ----

/// Which balancer an upstream uses.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "policy", rename_all = "snake_case", deny_unknown_fields)]
pub enum BalancePolicy {
    RoundRobin,
    /// Smooth weighted round robin (nginx).
    WeightedRoundRobin,
    /// Power of two choices over peak-EWMA latency × (in-flight + 1) (linkerd2-proxy).
    #[default]
    LeastRequest,
    /// Maglev consistent hashing on a request header or cookie, for sticky routing.
    ConsistentHash {
        key: HashKey,
        /// Maglev lookup table size; must be prime and well above the endpoint count.
        #[serde(default = "default_table_size")]
        table_size: usize,
        /// Where requests without the key go.
        #[serde(default)]
        fallback: Fallback,
    },
}

/// Where a consistent-hash key comes from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "from", rename_all = "snake_case", deny_unknown_fields)]
pub enum HashKey {
    Header { name: String },
    Cookie { name: String },
}

/// The balancer for requests that carry no hash key.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Fallback {
    #[default]
    LeastRequest,
    RoundRobin,
}

/// 65537 is prime, and with it a key moves to another endpoint with probability ~1/n when one
/// of n endpoints goes, for n up to a few hundred (Maglev paper: M ≫ 100·n keeps imbalance low).
pub const DEFAULT_MAGLEV_TABLE_SIZE: usize = 65_537;

fn default_table_size() -> usize {
    DEFAULT_MAGLEV_TABLE_SIZE
}

impl HashKey {
    /// The key's bytes in these headers, if present.
    pub fn extract<'a>(&self, headers: &'a HeaderMap) -> Option<&'a [u8]> {
        match self {
            HashKey::Header { name } => headers
                .get(name.as_str())
                .map(|value| value.as_bytes())
                .filter(|value| !value.is_empty()),
            HashKey::Cookie { name } => cookie_value(headers, name),
        }
    }
}

/// The value of cookie `name` across all `Cookie` headers (HTTP/2 may split them).
fn cookie_value<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a [u8]> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .flat_map(|value| value.as_bytes().split(|byte| *byte == b';'))
        .find_map(|pair| {
            let pair = pair.trim_ascii();
            let eq = pair.iter().position(|byte| *byte == b'=')?;
            let (key, value) = (&pair[..eq], &pair[eq + 1..]);
            (key.trim_ascii() == name.as_bytes()).then_some(value.trim_ascii())
        })
        .filter(|value| !value.is_empty())
}

// ---- Outlier detection ----

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OutlierConfig {
    pub enabled: bool,
    /// Consecutive 5xx answers (or failures after connecting) that eject an endpoint.
    pub consecutive_5xx: u32,
    /// Consecutive failed connects that eject an endpoint.
    pub consecutive_connect_failures: u32,
    /// The first ejection's length; the n-th lasts n times this, up to `max_ejection_ms`.
    pub base_ejection_ms: u64,
    pub max_ejection_ms: u64,
    /// At most this share of the endpoints is ejected at once (rounded down, and never all).
    pub max_ejection_percent: u8,
}

impl Default for OutlierConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            consecutive_5xx: 5,
            consecutive_connect_failures: 5,
            base_ejection_ms: 30_000,
            max_ejection_ms: 300_000,
            max_ejection_percent: 50,
        }
    }
}

impl OutlierConfig {
    /// How long the `times`-th ejection (1-based) lasts.
    pub fn ejection_duration(&self, times: u32) -> Duration {
        let base = Duration::from_millis(self.base_ejection_ms);
        base.saturating_mul(times.max(1))
            .min(Duration::from_millis(self.max_ejection_ms))
    }

    /// How many of `total` endpoints may be ejected at once.
    pub fn max_ejected(&self, total: usize) -> usize {
        let share = total * usize::from(self.max_ejection_percent.min(100)) / 100;
        share.min(total.saturating_sub(1))
    }
}

// ---- Active health checks ----

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HealthCheckConfig {
    pub path: String,
    pub interval_ms: u64,
    pub timeout_ms: u64,
    /// Consecutive passes that bring an unhealthy endpoint back.
    pub healthy_threshold: u32,
    /// Consecutive failures that take a healthy endpoint out.
    pub unhealthy_threshold: u32,
}

impl Default for HealthCheckConfig {
    fn default() -> Self {
        Self {
            path: "/healthz".into(),
            interval_ms: 5_000,
            timeout_ms: 1_000,
            healthy_threshold: 2,
            unhealthy_threshold: 3,
        }
    }
}

impl HealthCheckConfig {
    pub fn interval(&self) -> Duration {
        // A zero interval would spin.
        Duration::from_millis(self.interval_ms.max(1))
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }
}

// ---- Retries ----

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryBudgetConfig {
    /// Retries may add at most this share of the original requests in the window.
    pub ratio: f64,
    /// A floor so that low-traffic upstreams can still retry.
    pub min_retries_per_second: u32,
    pub window_ms: u64,
    /// The window slides in this many steps.
    pub buckets: u32,
}

impl Default for RetryBudgetConfig {
    fn default() -> Self {
        Self {
            ratio: 0.2,
            min_retries_per_second: 10,
            window_ms: 10_000,
            buckets: 10,
        }
    }
}

/// Which requests may be retried, how often, and within what time.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryPolicy {
    /// Retries after the first attempt (0 turns retries off).
    pub max_retries: u32,
    /// One attempt's limit; 0 means only the deadline applies.
    pub per_try_timeout_ms: u64,
    /// The whole request's limit, all attempts included.
    pub deadline_ms: u64,
    /// Statuses on which an idempotent request is retried.
    pub retry_statuses: Vec<u16>,
    /// Whether an idempotent request whose attempt ran out of time is retried.
    pub retry_per_try_timeout: bool,
    /// Whether an idempotent request whose connection failed after it was sent (reset, closed
    /// by an instance that died) is retried, as nginx's `proxy_next_upstream error` does.
    pub retry_on_reset: bool,
    /// The wait before the first retry (0: at once); each later wait doubles up to
    /// `max_backoff_ms`, and each is jittered down to half so that callers do not retry in step
    /// (Envoy's and the Gateway API's `retry.backoff`). Never past the deadline.
    pub backoff_ms: u64,
    pub max_backoff_ms: u64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_retries: 2,
            per_try_timeout_ms: 2_000,
            deadline_ms: 10_000,
            retry_statuses: vec![StatusCode::SERVICE_UNAVAILABLE.as_u16()],
            retry_per_try_timeout: true,
            retry_on_reset: true,
            backoff_ms: 0,
            max_backoff_ms: 250,
        }
    }
}

impl RetryPolicy {
    pub fn per_try_timeout(&self) -> Option<Duration> {
        (self.per_try_timeout_ms > 0).then(|| Duration::from_millis(self.per_try_timeout_ms))
    }

    pub fn deadline(&self) -> Duration {
        Duration::from_millis(self.deadline_ms)
    }

    /// The longest wait before retry `retry` (1-based), before jitter.
    pub fn backoff(&self, retry: u32) -> Duration {
        crate::backoff::doubling(self.backoff_ms, self.max_backoff_ms, retry)
    }
}

// ---- One upstream ----

/// The latency estimate's settings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EwmaConfig {
    /// The estimate of an endpoint nothing is known about yet.
    pub default_rtt_ms: u64,
    /// How fast old observations fade (the EWMA's time constant).
    pub decay_ms: u64,
    /// A failed request counts as at least this slow, so failing endpoints look expensive.
    pub failure_penalty_ms: u64,
}

impl Default for EwmaConfig {
    fn default() -> Self {
        // linkerd2-proxy's defaults: 30 ms initial estimate, 10 s decay.
        Self {
            default_rtt_ms: 30,
            decay_ms: 10_000,
            failure_penalty_ms: 1_000,
        }
    }
}

/// Everything about how one upstream is balanced, checked and retried.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UpstreamConfig {
    pub balance: BalancePolicy,
    pub ewma: EwmaConfig,
    pub outlier: OutlierConfig,
    /// Active checks; none when absent.
    pub health_check: Option<HealthCheckConfig>,
    pub retry_budget: RetryBudgetConfig,
    pub retry: RetryPolicy,
}

impl UpstreamConfig {
    pub fn validate(&self) -> Result<(), String> {
        let ratio = self.retry_budget.ratio;
        if !ratio.is_finite() || ratio < 0.0 {
            return Err(format!(
                "retry_budget.ratio must be a number >= 0, not {ratio}"
            ));
        }
        if self.outlier.max_ejection_percent > 100 {
            return Err(format!(
                "outlier.max_ejection_percent must be at most 100, not {}",
                self.outlier.max_ejection_percent
            ));
        }
        Ok(())
    }
}
