//! [`GrpcBalancer`]: gRPC calls to a service by name, balanced per request over its live instances.
//!
//! One [`GrpcChannel`] per service: every call (not every connection) picks an instance
//! (power of two choices by requests in flight, over the instances' HTTP/2 connections, each
//! TLS-verified against the local CA as `<service>.<zone>`; see [`channel`]). A background
//! task keeps the channel's instance set equal to what discovery lists, re-resolving the
//! `_https._tcp.<service>.<zone>` SRV record every [`REFRESH_INTERVAL`] (the records' TTL) and on
//! demand.
//!
//! [`GrpcBalancer::unary`] adds what a bare channel lacks: an overall deadline with per-attempt
//! timeouts (sent as `grpc-timeout`), retries on `UNAVAILABLE` (the connection-level failures,
//! where the call was not processed), and trace context. When an attempt fails with
//! `UNAVAILABLE`, the balancer re-resolves at once and probes each instance with a TCP connect,
//! taking those that refuse out of rotation for `endpoint_backoff_ms`, before retrying; so an
//! instance that dies costs the calls in flight on it and no others, even while DNS still lists it.
//!
//! Trace context is injected explicitly per call ([`inject_trace`]) rather than by a channel-wide
//! `Interceptor`, because it belongs to the request being served, which an interceptor cannot see.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use causeway_core::telemetry::{HistogramFamily, Metrics, latency_histogram};
use causeway_core::topology::ClientConfig;
use causeway_core::trace_context::TraceContext;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tonic::metadata::MetadataMap;
use tonic::{Code, Status};

use crate::client::ClientSettings;
use crate::discovery::{Discovery, Endpoint, ResolveError};

mod channel;
pub mod limit;

pub use channel::{GrpcChannel, ReportEncoderFailure, ResponseBody};
use channel::{Member, Snapshot};

/// How often the instance set is re-resolved: the TTL of discovery's records.
pub const REFRESH_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum GrpcClientError {
    #[error("TLS configuration for {service}: {source}")]
    Tls {
        service: String,
        source: Box<causeway_core::tls::TlsError>,
    },
    #[error("{name} is not a usable host name")]
    BadName { name: String },
    #[error(transparent)]
    Discovery(#[from] ResolveError),
    #[error("{service}: {wanted} instance(s) not discovered within {waited:?} (have {have})")]
    NotEnoughInstances {
        service: String,
        wanted: usize,
        have: usize,
        waited: Duration,
    },
}

/// Per-call overrides of the configured timeouts.
#[derive(Clone, Copy, Debug, Default)]
pub struct GrpcCallOptions {
    /// Deadline of the whole call, retries included (default `deadline_ms`).
    pub deadline: Option<Duration>,
    /// Deadline of one attempt (default `attempt_timeout_ms`).
    pub attempt_timeout: Option<Duration>,
}

/// What one attempt of a call did.
#[derive(Clone, Debug)]
pub struct GrpcAttempt {
    pub code: Code,
    pub message: String,
    pub elapsed: Duration,
}

/// What a call did, for logs, metrics and `Server-Timing`.
#[derive(Clone, Debug, Default)]
pub struct GrpcCallReport {
    pub service: String,
    pub method: String,
    pub attempts: Vec<GrpcAttempt>,
    /// Instances in rotation when the call started.
    pub instances: usize,
    pub elapsed: Duration,
}

struct Shared {
    snapshot: watch::Sender<Snapshot>,
    /// Asks the background task for a refresh that re-resolves and probes now.
    probe: Notify,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    service: String,
    method: String,
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabel {
    service: String,
}

#[derive(Clone)]
struct GrpcClientMetrics {
    calls: Family<CallLabels, Counter>,
    retries: Family<ServiceLabel, Counter>,
    duration: HistogramFamily<ServiceLabel>,
    endpoints: Family<ServiceLabel, Gauge>,
}

impl GrpcClientMetrics {
    fn register(metrics: &mut Metrics) -> Self {
        let this = Self {
            calls: Family::default(),
            retries: Family::default(),
            duration: Family::new_with_constructor(latency_histogram),
            endpoints: Family::default(),
        };
        let registry = metrics.registry_mut();
        registry.register(
            "grpc_client_calls",
            "gRPC calls made through GrpcBalancer::unary, by service, method and final status code",
            this.calls.clone(),
        );
        registry.register(
            "grpc_client_retries",
            "gRPC attempts beyond the first (after UNAVAILABLE)",
            this.retries.clone(),
        );
        registry.register(
            "grpc_client_call_duration_seconds",
            "gRPC call latency, retries included",
            this.duration.clone(),
        );
        registry.register(
            "grpc_client_endpoints",
            "Instances in the balanced gRPC channel's rotation",
            this.endpoints.clone(),
        );
        this
    }
}

/// A balanced gRPC channel to every live instance of one service. Dropping it stops its
/// background task; clones of [`channel`](Self::channel) then keep the last instance set.
pub struct GrpcBalancer {
    service: String,
    server_name: String,
    channel: GrpcChannel,
    config: ClientConfig,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
    metrics: GrpcClientMetrics,
}

impl Drop for GrpcBalancer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl std::fmt::Debug for GrpcBalancer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcBalancer")
            .field("service", &self.service)
            .field("endpoints", &self.endpoints())
            .finish_non_exhaustive()
    }
}

impl GrpcBalancer {
    /// Starts balancing over the instances of `service` that the DNS server in `settings` lists,
    /// trusting only the CA certificate at `ca_path`, and registers the `grpc_client_*` metric
    /// families into `metrics`. Must be called within a Tokio runtime (it spawns the task that
    /// follows discovery); the first resolution happens in the background, see
    /// [`wait_for_endpoints`](Self::wait_for_endpoints).
    pub fn new(
        service: &str,
        settings: &ClientSettings,
        ca_path: &Path,
        metrics: &mut Metrics,
    ) -> Result<Self, GrpcClientError> {
        let discovery = Discovery::new(settings.dns_addr, &settings.zone)?;
        let server_name = discovery.host_name(service);
        let tls =
            causeway_core::tls::client_config(ca_path).map_err(|source| GrpcClientError::Tls {
                service: service.to_string(),
                source: Box::new(source),
            })?;
        let connect_timeout = Duration::from_millis(settings.config.connect_timeout_ms);
        let shared = Arc::new(Shared {
            snapshot: watch::Sender::new(Snapshot::default()),
            probe: Notify::new(),
        });
        let channel = GrpcChannel::new(
            service,
            &server_name,
            tls,
            connect_timeout,
            shared.snapshot.subscribe(),
        )?;
        let metrics = GrpcClientMetrics::register(metrics);
        let follower = Follower {
            service: service.to_string(),
            discovery,
            channel: channel.clone(),
            connect_timeout,
            shared: shared.clone(),
            backoff: Duration::from_millis(settings.config.endpoint_backoff_ms),
            endpoints_gauge: metrics
                .endpoints
                .get_or_create(&ServiceLabel {
                    service: service.to_string(),
                })
                .clone(),
        };
        let task = tokio::spawn(follower.run());
        Ok(Self {
            service: service.to_string(),
            server_name,
            channel,
            config: settings.config.clone(),
            shared,
            task,
            metrics,
        })
    }

    pub fn service(&self) -> &str {
        &self.service
    }

    /// The name every instance's certificate is verified against, e.g. `pricing-service.internal`.
    pub fn server_name(&self) -> &str {
        &self.server_name
    }

    /// The balanced channel: cheap to clone; every request on it picks an instance. Use it
    /// directly for streaming calls (with [`inject_trace`] and `Request::set_timeout`).
    pub fn channel(&self) -> GrpcChannel {
        self.channel.clone()
    }

    /// The instances in rotation now (sorted by instance name).
    pub fn endpoints(&self) -> Vec<Endpoint> {
        self.shared
            .snapshot
            .borrow()
            .members
            .iter()
            .map(|member| member.endpoint.clone())
            .collect()
    }

    /// Re-resolves now, probing each instance, and returns once that is done.
    pub async fn refresh(&self) {
        let mut updates = self.shared.snapshot.subscribe();
        let done = updates.borrow().probes;
        self.shared.probe.notify_one();
        let _ = updates.wait_for(|snapshot| snapshot.probes > done).await;
    }

    /// Waits until at least `count` instances are in rotation.
    pub async fn wait_for_endpoints(
        &self,
        count: usize,
        timeout: Duration,
    ) -> Result<Vec<Endpoint>, GrpcClientError> {
        let mut updates = self.shared.snapshot.subscribe();
        let waited = tokio::time::timeout(
            timeout,
            updates.wait_for(|snapshot| snapshot.members.len() >= count),
        )
        .await;
        match waited {
            Ok(Ok(_)) => Ok(self.endpoints()),
            _ => Err(GrpcClientError::NotEnoughInstances {
                service: self.service.clone(),
                wanted: count,
                have: self.endpoints().len(),
                waited: timeout,
            }),
        }
    }

    /// Makes a unary call through the balanced channel: `call` gets the channel and the request
    /// (with `grpc-timeout` and trace context set) and performs the method, e.g.
    /// `|channel, request| async move { PricingServiceClient::new(channel).get_price(request).await }`.
    ///
    /// Attempts that fail with `UNAVAILABLE` are retried (after a probing refresh, so the retry
    /// goes to an instance that accepts connections) up to `max_attempts` within the deadline;
    /// use it for idempotent methods. An expired deadline is `DEADLINE_EXCEEDED` whichever side
    /// noticed it.
    pub async fn unary<M, R, F, Fut>(
        &self,
        method: &str,
        message: M,
        trace: &TraceContext,
        options: GrpcCallOptions,
        mut call: F,
    ) -> (Result<tonic::Response<R>, Status>, GrpcCallReport)
    where
        M: Clone,
        F: FnMut(GrpcChannel, tonic::Request<M>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<R>, Status>>,
    {
        let started = Instant::now();
        let deadline_after = options
            .deadline
            .unwrap_or(Duration::from_millis(self.config.deadline_ms));
        let deadline = started + deadline_after;
        let attempt_timeout = options
            .attempt_timeout
            .unwrap_or(Duration::from_millis(self.config.attempt_timeout_ms));
        let mut report = GrpcCallReport {
            service: self.service.clone(),
            method: method.to_string(),
            instances: self.endpoints().len(),
            ..GrpcCallReport::default()
        };
        let max_attempts = self.config.max_attempts.max(1);
        let mut attempt_number = 0;
        let result = loop {
            attempt_number += 1;
            if self.endpoints().is_empty() {
                // Nothing discovered yet (or everything refused): ask again before giving up, as
                // a request on an empty channel would wait for the whole deadline.
                let _ = tokio::time::timeout_at(deadline, self.refresh()).await;
                if self.endpoints().is_empty() {
                    break Err(Status::unavailable(format!(
                        "no reachable instances of {} are registered",
                        self.service
                    )));
                }
            }
            let now = Instant::now();
            if now >= deadline {
                break Err(Status::deadline_exceeded(format!(
                    "{method} on {}: deadline of {deadline_after:?} passed",
                    self.service
                )));
            }
            let timeout = attempt_timeout.min(deadline - now);
            let mut request = tonic::Request::new(message.clone());
            request.set_timeout(timeout);
            inject_trace(request.metadata_mut(), trace);
            let attempt_started = Instant::now();
            // The channel enforces `timeout` itself; this bounds a wait for a ready instance too.
            let outcome =
                match tokio::time::timeout(timeout, call(self.channel.clone(), request)).await {
                    Ok(outcome) => outcome.map_err(|status| {
                        deadline_status(
                            connection_status(status),
                            attempt_started.elapsed(),
                            timeout,
                        )
                    }),
                    Err(_) => Err(Status::deadline_exceeded(format!(
                        "{method} on {}: no answer within {timeout:?}",
                        self.service
                    ))),
                };
            report.attempts.push(GrpcAttempt {
                code: outcome.as_ref().map_or_else(|s| s.code(), |_| Code::Ok),
                message: outcome
                    .as_ref()
                    .err()
                    .map(|s| s.message().to_string())
                    .unwrap_or_default(),
                elapsed: attempt_started.elapsed(),
            });
            match outcome {
                Err(status)
                    if status.code() == Code::Unavailable
                        && attempt_number < max_attempts
                        && Instant::now() < deadline =>
                {
                    tracing::warn!(
                        service = %self.service,
                        method,
                        attempt = attempt_number,
                        error = %status.message(),
                        "gRPC attempt unavailable; probing instances and retrying"
                    );
                    self.metrics
                        .retries
                        .get_or_create(&ServiceLabel {
                            service: self.service.clone(),
                        })
                        .inc();
                    let _ = tokio::time::timeout_at(deadline, self.refresh()).await;
                }
                other => break other,
            }
        };
        report.elapsed = started.elapsed();
        let code = result.as_ref().map_or_else(|s| s.code(), |_| Code::Ok);
        self.metrics
            .calls
            .get_or_create(&CallLabels {
                service: self.service.clone(),
                method: method.to_string(),
                code: code_name(code).to_string(),
            })
            .inc();
        self.metrics
            .duration
            .get_or_create(&ServiceLabel {
                service: self.service.clone(),
            })
            .observe(report.elapsed.as_secs_f64());
        (result, report)
    }
}

/// Turns a broken connection into `UNAVAILABLE`, the code gRPC's specification gives it (and
/// other languages' clients report); tonic reports a request that hyper never sent on a closed
/// connection as `CANCELLED`, and a reset connection as `UNKNOWN`.
fn connection_status(status: Status) -> Status {
    if !matches!(status.code(), Code::Unknown | Code::Cancelled) {
        return status;
    }
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&status);
    while let Some(err) = source {
        let broken = if let Some(hyper) = err.downcast_ref::<hyper::Error>() {
            hyper.is_canceled() || hyper.is_closed() || hyper.is_incomplete_message()
        } else if let Some(io) = err.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind::*;
            matches!(
                io.kind(),
                ConnectionReset | ConnectionAborted | BrokenPipe | UnexpectedEof | NotConnected
            )
        } else {
            false
        };
        if broken {
            return Status::unavailable(format!("connection to the instance broke: {err}"));
        }
        source = err.source();
    }
    status
}

/// Reads a `CANCELLED` that arrives once the attempt's timeout has passed as `DEADLINE_EXCEEDED`.
/// A server that enforces the `grpc-timeout` it was sent cancels the call when it fires (tonic's
/// server answers `CANCELLED: Timeout expired`); its timer starts after this side's, yet on a busy
/// machine its answer can be read before this side's own timer is polled. Either way the
/// caller's deadline is what ended the call, and the caller must be told so.
fn deadline_status(status: Status, waited: Duration, timeout: Duration) -> Status {
    if status.code() != Code::Cancelled || waited < timeout {
        return status;
    }
    Status::deadline_exceeded(format!(
        "no answer within {timeout:?}; the instance cancelled the call at the deadline: {}",
        status.message()
    ))
}

/// Sets `traceparent` (this hop as the parent) and `x-request-id` in outgoing gRPC metadata.
pub fn inject_trace(metadata: &mut MetadataMap, trace: &TraceContext) {
    let mut headers = std::mem::take(metadata).into_headers();
    trace.inject(&mut headers);
    *metadata = MetadataMap::from_headers(headers);
}

/// Parses a `grpc-timeout` value: up to 8 digits and a unit (H, M, S, m, u, n), per gRPC's
/// HTTP/2 protocol. Shared by the client's channel, which bounds its wait by it, and by servers,
/// which end the call by it.
pub fn parse_grpc_timeout(value: &[u8]) -> Option<Duration> {
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let amount: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b"H" => Duration::from_secs(amount * 3600),
        b"M" => Duration::from_secs(amount * 60),
        b"S" => Duration::from_secs(amount),
        b"m" => Duration::from_millis(amount),
        b"u" => Duration::from_micros(amount),
        b"n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

/// The canonical name of a status code (`OK`, `DEADLINE_EXCEEDED`, ...), as gRPC's
/// specification and other languages' clients spell it.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// The background task that keeps the channel's instance set in line with discovery.
struct Follower {
    service: String,
    discovery: Discovery,
    /// The channel whose rotation this task keeps (its connections are dropped with an instance).
    channel: GrpcChannel,
    connect_timeout: Duration,
    shared: Arc<Shared>,
    backoff: Duration,
    endpoints_gauge: Gauge,
}

impl Follower {
    async fn run(self) {
        let mut in_rotation: HashMap<Endpoint, Arc<Member>> = HashMap::new();
        // Instances that refused a probe, kept out of rotation until the instant given.
        let mut resting: HashMap<Endpoint, Instant> = HashMap::new();
        let mut first = true;
        loop {
            let probe = if first {
                first = false;
                false
            } else {
                tokio::select! {
                    _ = tokio::time::sleep(REFRESH_INTERVAL) => false,
                    _ = self.shared.probe.notified() => true,
                }
            };
            if probe {
                self.discovery.forget_service(&self.service);
            }
            let discovered = match self.discovery.resolve(&self.service).await {
                Ok(resolution) => Some(resolution.endpoints),
                Err(ResolveError::NoInstances { .. }) => Some(Vec::new()),
                Err(err) => {
                    // Keep balancing over what we had: better stale than nothing.
                    tracing::warn!(service = %self.service, error = %err, "re-resolving failed");
                    None
                }
            };
            if let Some(discovered) = discovered {
                let now = Instant::now();
                if probe {
                    for endpoint in self.refusing(&discovered).await {
                        tracing::warn!(
                            service = %self.service,
                            instance = %endpoint.instance,
                            addr = %endpoint.addr,
                            backoff = ?self.backoff,
                            "instance refuses connections; out of rotation"
                        );
                        resting.insert(endpoint, now + self.backoff);
                    }
                }
                resting.retain(|_, until| *until > now);
                let wanted: HashSet<Endpoint> = discovered
                    .into_iter()
                    .filter(|endpoint| !resting.contains_key(endpoint))
                    .collect();
                self.apply(&mut in_rotation, &wanted);
            }
            let mut members: Vec<Arc<Member>> = in_rotation.values().cloned().collect();
            members.sort_by(|a, b| {
                (&a.endpoint.instance, a.endpoint.addr)
                    .cmp(&(&b.endpoint.instance, b.endpoint.addr))
            });
            self.endpoints_gauge.set(members.len() as i64);
            self.shared.snapshot.send_modify(|snapshot| {
                snapshot.members = members;
                snapshot.refreshes += 1;
                if probe {
                    snapshot.probes += 1;
                }
            });
        }
    }

    /// Brings the rotation in line with what is wanted; an instance that stays keeps its
    /// in-flight count, one that leaves has its connection dropped.
    fn apply(&self, in_rotation: &mut HashMap<Endpoint, Arc<Member>>, wanted: &HashSet<Endpoint>) {
        in_rotation.retain(|endpoint, _| {
            let stays = wanted.contains(endpoint);
            if !stays {
                tracing::info!(service = %self.service, instance = %endpoint.instance, addr = %endpoint.addr, "instance leaves the gRPC rotation");
                self.channel.forget(endpoint.addr);
            }
            stays
        });
        for endpoint in wanted {
            if !in_rotation.contains_key(endpoint) {
                tracing::info!(service = %self.service, instance = %endpoint.instance, addr = %endpoint.addr, "instance joins the gRPC rotation");
                in_rotation.insert(endpoint.clone(), Member::new(endpoint.clone()));
            }
        }
    }

    /// The endpoints that do not accept a TCP connection within the connect timeout.
    async fn refusing(&self, endpoints: &[Endpoint]) -> Vec<Endpoint> {
        let timeout = self.connect_timeout;
        let probes = endpoints.iter().map(|endpoint| async move {
            let connected =
                tokio::time::timeout(timeout, tokio::net::TcpStream::connect(endpoint.addr)).await;
            match connected {
                Ok(Ok(_stream)) => None,
                _ => Some(endpoint.clone()),
            }
        });
        futures_util::future::join_all(probes)
            .await
            .into_iter()
            .flatten()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broken_connections_read_as_unavailable() {
        let reset = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset by peer");
        let status = Status::from_error(Box::new(reset));
        assert_eq!(status.code(), Code::Unknown, "tonic's own mapping");
        assert_eq!(connection_status(status).code(), Code::Unavailable);

        let refused = Status::invalid_argument("bad sku");
        assert_eq!(connection_status(refused).code(), Code::InvalidArgument);
        let other = Status::from_error(Box::new(std::io::Error::other("disk on fire")));
        assert_eq!(connection_status(other).code(), Code::Unknown);
    }

    #[test]
    fn a_cancel_at_the_deadline_reads_as_deadline_exceeded() {
        let timeout = Duration::from_millis(300);
        let late = deadline_status(
            Status::cancelled("Timeout expired"),
            Duration::from_millis(301),
            timeout,
        );
        assert_eq!(late.code(), Code::DeadlineExceeded);
        assert!(late.message().contains("Timeout expired"), "{late:?}");

        let early = deadline_status(
            Status::cancelled("client went away"),
            Duration::from_millis(120),
            timeout,
        );
        assert_eq!(
            early.code(),
            Code::Cancelled,
            "a cancel before the deadline stays"
        );
        let answered = deadline_status(
            Status::internal("too late"),
            Duration::from_millis(400),
            timeout,
        );
        assert_eq!(answered.code(), Code::Internal, "a real answer stays");
    }

    #[test]
    fn trace_context_lands_in_metadata() {
        let trace = TraceContext::continue_from(&http::HeaderMap::new());
        let mut metadata = MetadataMap::new();
        metadata.insert("x-other", "kept".parse().unwrap());
        inject_trace(&mut metadata, &trace);
        let traceparent = metadata.get("traceparent").unwrap().to_str().unwrap();
        assert!(traceparent.contains(&trace.trace_id.to_string()));
        assert_eq!(
            metadata.get("x-request-id").unwrap().to_str().unwrap(),
            trace.request_id
        );
        assert_eq!(metadata.get("x-other").unwrap(), "kept");
    }

    #[test]
    fn grpc_timeouts_parse_per_the_protocol() {
        let parse = |value: &str| parse_grpc_timeout(value.as_bytes());
        assert_eq!(parse("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse("3S"), Some(Duration::from_secs(3)));
        assert_eq!(parse("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(parse("1M"), Some(Duration::from_secs(60)));
        assert_eq!(parse("100u"), Some(Duration::from_micros(100)));
        assert_eq!(parse("99999999n"), Some(Duration::from_nanos(99_999_999)));
        assert_eq!(parse("m"), None, "no digits");
        assert_eq!(parse("123456789m"), None, "more than 8 digits");
        assert_eq!(parse("10x"), None, "unknown unit");
        assert_eq!(parse("-1m"), None, "a sign is not a digit");
        assert_eq!(parse("+1m"), None, "a sign is not a digit");
        assert_eq!(parse("1 m"), None);
        assert_eq!(parse(""), None);
    }

    #[test]
    fn code_names_follow_the_grpc_spec() {
        assert_eq!(code_name(Code::Ok), "OK");
        assert_eq!(code_name(Code::DeadlineExceeded), "DEADLINE_EXCEEDED");
        assert_eq!(code_name(Code::Unavailable), "UNAVAILABLE");
    }
}
