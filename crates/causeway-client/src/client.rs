//! [`ServiceClient`]: calls a service by name. Each call resolves the name through discovery,
//! picks an instance (round robin, skipping instances that recently refused connections), sends
//! over HTTP/2 with TLS verified against the local CA, and retries on another instance when the
//! attempt failed in a way that is safe to retry. Every call returns a [`CallReport`] of what it
//! did, which services turn into `Server-Timing` entries and metrics.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use causeway_core::telemetry::{HistogramFamily, Metrics, latency_histogram};
use causeway_core::topology::ClientConfig;
use causeway_core::trace_context::TraceContext;
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use crate::connection::{ConnectError, Connections, RequestBody};
use crate::discovery::{Discovery, Endpoint, Resolution, ResolveError};

/// Where discovery is and what to trust.
#[derive(Clone, Debug)]
pub struct ClientSettings {
    pub dns_addr: SocketAddr,
    pub zone: String,
    pub config: ClientConfig,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Tls(#[from] causeway_core::tls::TlsError),
    #[error(transparent)]
    Discovery(#[from] ResolveError),
}

/// Why a call failed; the report says what was tried.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error(transparent)]
    Resolve(#[from] ResolveError),
    #[error("{service}: every attempt failed ({attempts} tried); last: {last}")]
    Exhausted {
        service: String,
        attempts: usize,
        last: String,
    },
    #[error("{service}: no answer within the {deadline:?} deadline")]
    DeadlineExceeded { service: String, deadline: Duration },
    #[error("{service}: {message} (not retried: {method} is not idempotent)")]
    NotRetryable {
        service: String,
        method: Method,
        message: String,
    },
    #[error("invalid request for {service}: {message}")]
    InvalidRequest { service: String, message: String },
}

/// Per-call overrides of the configured timeouts.
#[derive(Clone, Copy, Debug, Default)]
pub struct CallOptions {
    /// Deadline of the whole call, retries included.
    pub deadline: Option<Duration>,
    /// Deadline of one attempt.
    pub attempt_timeout: Option<Duration>,
}

/// What one attempt did.
#[derive(Clone, Debug)]
pub struct Attempt {
    pub endpoint: Endpoint,
    /// Set when this attempt opened a new connection (TCP + TLS + HTTP/2 handshake).
    pub connect: Option<Duration>,
    pub elapsed: Duration,
    /// `200`, `503`, `connect refused: ...`, `timed out`, ...
    pub outcome: String,
}

#[derive(Clone, Debug, Default)]
pub struct CallReport {
    pub service: String,
    pub resolution: Option<Resolution>,
    pub attempts: Vec<Attempt>,
    pub elapsed: Duration,
}

impl CallReport {
    fn new(service: &str) -> Self {
        Self {
            service: service.to_string(),
            ..Self::default()
        }
    }

    /// The endpoint that produced the response, if any did.
    pub fn answered_by(&self) -> Option<&Endpoint> {
        self.attempts.last().map(|attempt| &attempt.endpoint)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    service: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabel {
    service: String,
}

#[derive(Clone)]
struct ClientMetrics {
    calls: Family<CallLabels, Counter>,
    retries: Family<ServiceLabel, Counter>,
    connect_failures: Family<ServiceLabel, Counter>,
    duration: HistogramFamily<ServiceLabel>,
}

impl ClientMetrics {
    fn register(metrics: &mut Metrics) -> Self {
        let this = Self {
            calls: Family::default(),
            retries: Family::default(),
            connect_failures: Family::default(),
            duration: Family::new_with_constructor(latency_histogram),
        };
        let registry = metrics.registry_mut();
        registry.register(
            "client_calls",
            "Calls made through the client library, by service and outcome",
            this.calls.clone(),
        );
        registry.register(
            "client_retries",
            "Attempts beyond the first",
            this.retries.clone(),
        );
        registry.register(
            "client_connect_failures",
            "Connections to an instance that failed",
            this.connect_failures.clone(),
        );
        registry.register(
            "client_call_duration_seconds",
            "Call latency to response headers, retries included",
            this.duration.clone(),
        );
        this
    }
}

pub struct ServiceClient {
    discovery: Discovery,
    connections: Connections,
    config: ClientConfig,
    next: AtomicUsize,
    /// Instances that refused a connection, skipped until the instant given.
    resting: Mutex<HashMap<SocketAddr, Instant>>,
    metrics: ClientMetrics,
    /// Set for a meshed app: its calls to meshed services go to its sidecar.
    sidecar: Option<SidecarRoute>,
}

/// A meshed app's own sidecar: it resolves, balances, retries and encrypts the calls to the
/// services in `services`, so the client sends them there once, in the clear on loopback.
struct SidecarRoute {
    outbound: SocketAddr,
    services: Vec<String>,
    connections: Connections,
}

/// The instance name a call through the sidecar reports as its endpoint.
pub const SIDECAR_ENDPOINT: &str = "sidecar";

enum AttemptError {
    /// Nothing was sent: always safe to try elsewhere.
    Connect(ConnectError),
    /// The request may have reached the instance.
    Request(String),
}

/// Headers that describe one connection and must not be forwarded (RFC 9110 §7.6.1), plus
/// `host`, which HTTP/2 carries as `:authority`.
const CONNECTION_HEADERS: [header::HeaderName; 7] = [
    header::CONNECTION,
    header::HeaderName::from_static("keep-alive"),
    header::HeaderName::from_static("proxy-connection"),
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::TE,
    header::HOST,
];

impl ServiceClient {
    pub fn new(
        settings: ClientSettings,
        ca_path: &Path,
        metrics: &mut Metrics,
    ) -> Result<Self, ClientError> {
        let tls = causeway_core::tls::client_config(ca_path)?;
        Ok(Self {
            discovery: Discovery::new(settings.dns_addr, &settings.zone)?,
            connections: Connections::new(
                tls,
                Duration::from_millis(settings.config.connect_timeout_ms),
            ),
            config: settings.config,
            next: AtomicUsize::new(0),
            resting: Mutex::new(HashMap::new()),
            metrics: ClientMetrics::register(metrics),
            sidecar: None,
        })
    }

    /// Sends calls to `services` through the app's sidecar at `outbound` (plain HTTP/2 on
    /// loopback, one attempt: the sidecar does the discovery, balancing and retries); others
    /// go directly as before.
    pub fn through_sidecar(mut self, outbound: SocketAddr, services: Vec<String>) -> Self {
        let connect_timeout = Duration::from_millis(self.config.connect_timeout_ms);
        self.sidecar = Some(SidecarRoute {
            outbound,
            services,
            connections: Connections::plain(connect_timeout),
        });
        self
    }

    fn sidecar_for(&self, service: &str) -> Option<&SidecarRoute> {
        self.sidecar
            .as_ref()
            .filter(|sidecar| sidecar.services.iter().any(|name| name == service))
    }

    pub fn discovery(&self) -> &Discovery {
        &self.discovery
    }

    /// The HTTP/2-over-TLS connections to instances (verified against the local CA), for a
    /// caller that picks instances itself (the proxy's discovered routes) but should share them.
    pub fn connections(&self) -> &Connections {
        &self.connections
    }

    /// Sends `request` (whose URI is only a path and query) to an instance of `service`, with
    /// the configured timeouts.
    pub async fn send(
        &self,
        service: &str,
        request: Request<Bytes>,
        trace: &TraceContext,
    ) -> (Result<Response<Incoming>, CallError>, CallReport) {
        self.send_with(service, request, trace, CallOptions::default())
            .await
    }

    /// Like [`send`](Self::send), with this call's own timeouts: a proxy gives the call its
    /// route's deadline, so the service behind it can use its own (shorter) ones and answer.
    pub async fn send_with(
        &self,
        service: &str,
        request: Request<Bytes>,
        trace: &TraceContext,
        options: CallOptions,
    ) -> (Result<Response<Incoming>, CallError>, CallReport) {
        let started = Instant::now();
        let mut report = CallReport::new(service);
        let deadline = self.deadline(&options);
        let attempt_timeout = options
            .attempt_timeout
            .unwrap_or(Duration::from_millis(self.config.attempt_timeout_ms));
        let call = self.send_with_retries(service, request, trace, attempt_timeout, &mut report);
        let timed = tokio::time::timeout(deadline, call).await;
        self.finish(service, deadline, timed, started, report)
    }

    /// Sends a request whose body is a stream (a gRPC call through the edge, say). It goes to
    /// one instance: instances that refuse the connection are skipped, but once the body has
    /// started flowing there is no retry. The deadline covers the wait for response headers;
    /// the response body then streams for as long as it lasts.
    pub async fn send_streaming(
        &self,
        service: &str,
        request: Request<RequestBody>,
        trace: &TraceContext,
        options: CallOptions,
    ) -> (Result<Response<Incoming>, CallError>, CallReport) {
        let started = Instant::now();
        let mut report = CallReport::new(service);
        let deadline = self.deadline(&options);
        let call = self.stream_once(service, request, trace, &mut report);
        let timed = tokio::time::timeout(deadline, call).await;
        self.finish(service, deadline, timed, started, report)
    }

    fn deadline(&self, options: &CallOptions) -> Duration {
        options
            .deadline
            .unwrap_or(Duration::from_millis(self.config.deadline_ms))
    }

    /// Turns a call that may have run out of time into its result, and records it.
    fn finish(
        &self,
        service: &str,
        deadline: Duration,
        timed: Result<Result<Response<Incoming>, CallError>, tokio::time::error::Elapsed>,
        started: Instant,
        mut report: CallReport,
    ) -> (Result<Response<Incoming>, CallError>, CallReport) {
        let result = timed.unwrap_or_else(|_| {
            Err(CallError::DeadlineExceeded {
                service: service.to_string(),
                deadline,
            })
        });
        report.elapsed = started.elapsed();
        self.record(service, &result, &report);
        (result, report)
    }

    fn record(
        &self,
        service: &str,
        result: &Result<Response<Incoming>, CallError>,
        report: &CallReport,
    ) {
        let outcome = match result {
            Ok(response) => response.status().as_u16().to_string(),
            Err(CallError::Resolve(_)) => "unresolved".into(),
            Err(CallError::DeadlineExceeded { .. }) => "deadline".into(),
            Err(_) => "failed".into(),
        };
        self.metrics
            .calls
            .get_or_create(&CallLabels {
                service: service.to_string(),
                outcome,
            })
            .inc();
        self.metrics
            .duration
            .get_or_create(&ServiceLabel {
                service: service.to_string(),
            })
            .observe(report.elapsed.as_secs_f64());
    }

    /// The URI and headers every attempt sends: `https://<service>.<zone><path>`, connection
    /// headers removed, this hop's trace context added.
    fn prepare(
        &self,
        service: &str,
        parts: &http::request::Parts,
        trace: &TraceContext,
    ) -> Result<(String, Uri, HeaderMap), CallError> {
        let host = self.discovery.host_name(service);
        let path = parts
            .uri
            .path_and_query()
            .map(|pq| pq.as_str())
            .unwrap_or("/");
        let uri: Uri =
            format!("https://{host}{path}")
                .parse()
                .map_err(|err: http::uri::InvalidUri| CallError::InvalidRequest {
                    service: service.to_string(),
                    message: err.to_string(),
                })?;
        let mut headers = parts.headers.clone();
        // `te: trailers` is the one TE value HTTP/2 allows, and gRPC needs it.
        let keeps_trailers = headers
            .get(header::TE)
            .is_some_and(|value| value.as_bytes().eq_ignore_ascii_case(b"trailers"));
        for name in CONNECTION_HEADERS {
            headers.remove(name);
        }
        if keeps_trailers {
            headers.insert(header::TE, header::HeaderValue::from_static("trailers"));
        }
        trace.inject(&mut headers);
        Ok((host, uri, headers))
    }

    async fn stream_once(
        &self,
        service: &str,
        request: Request<RequestBody>,
        trace: &TraceContext,
        report: &mut CallReport,
    ) -> Result<Response<Incoming>, CallError> {
        let (parts, body) = request.into_parts();
        let (host, uri, headers) = self.prepare(service, &parts, trace)?;
        let resolution = self.discovery.resolve(service).await?;
        let endpoints = resolution.endpoints.clone();
        report.resolution = Some(resolution);
        let mut tried = Vec::new();
        let mut last_failure = String::new();
        for _ in 0..self.config.max_attempts {
            let endpoint = self.pick(&endpoints, &tried);
            tried.push(endpoint.addr);
            let attempt_started = Instant::now();
            let mut attempt = Attempt {
                endpoint: endpoint.clone(),
                connect: None,
                elapsed: Duration::ZERO,
                outcome: String::new(),
            };
            let connected = self.connections.get(&host, endpoint.addr).await;
            let (mut sender, connect) = match connected {
                Ok(connected) => connected,
                Err(err) => {
                    self.connect_failed(service, &endpoint, &err);
                    attempt.outcome = err.to_string();
                    attempt.elapsed = attempt_started.elapsed();
                    last_failure = err.to_string();
                    report.attempts.push(attempt);
                    continue;
                }
            };
            attempt.connect = connect;
            if let Err(err) = sender.ready().await {
                // Nothing was sent on a connection that closed meanwhile: try another.
                self.connections.discard(&host, endpoint.addr);
                attempt.outcome = format!("connection closed: {err}");
                last_failure = attempt.outcome.clone();
                attempt.elapsed = attempt_started.elapsed();
                report.attempts.push(attempt);
                continue;
            }
            let mut outgoing = Request::new(body);
            *outgoing.method_mut() = parts.method.clone();
            *outgoing.uri_mut() = uri;
            *outgoing.headers_mut() = headers;
            *outgoing.version_mut() = http::Version::HTTP_2;
            let result = sender.send_request(outgoing).await;
            attempt.elapsed = attempt_started.elapsed();
            return match result {
                Ok(response) => {
                    attempt.outcome = response.status().as_u16().to_string();
                    report.attempts.push(attempt);
                    Ok(response)
                }
                Err(err) => {
                    self.connections.discard(&host, endpoint.addr);
                    attempt.outcome = causeway_core::telemetry::error_chain(&err);
                    report.attempts.push(attempt);
                    Err(CallError::NotRetryable {
                        service: service.to_string(),
                        method: parts.method.clone(),
                        message: causeway_core::telemetry::error_chain(&err),
                    })
                }
            };
        }
        Err(CallError::Exhausted {
            service: service.to_string(),
            attempts: report.attempts.len(),
            last: last_failure,
        })
    }

    fn connect_failed(&self, service: &str, endpoint: &Endpoint, err: &ConnectError) {
        self.rest(endpoint);
        self.discovery.forget_service(service);
        self.metrics
            .connect_failures
            .get_or_create(&ServiceLabel {
                service: service.to_string(),
            })
            .inc();
        tracing::warn!(service, instance = %endpoint.instance, error = %err, "instance unreachable; trying another");
    }

    async fn send_with_retries(
        &self,
        service: &str,
        request: Request<Bytes>,
        trace: &TraceContext,
        attempt_timeout: Duration,
        report: &mut CallReport,
    ) -> Result<Response<Incoming>, CallError> {
        let (parts, body) = request.into_parts();
        let (host, uri, headers) = self.prepare(service, &parts, trace)?;
        // A key makes a repeat safe for any method: the receiver answers it as the first.
        let idempotent =
            is_idempotent(&parts.method) || parts.headers.contains_key(IDEMPOTENCY_KEY);
        if let Some(sidecar) = self.sidecar_for(service) {
            let endpoint = Endpoint {
                instance: SIDECAR_ENDPOINT.to_string(),
                addr: sidecar.outbound,
            };
            let outgoing = build_request(&parts.method, &uri, &headers, &body);
            let started = Instant::now();
            let attempt = self.attempt(&sidecar.connections, &host, &endpoint, outgoing);
            let result = tokio::time::timeout(attempt_timeout, attempt).await;
            let mut record = Attempt {
                endpoint,
                connect: None,
                elapsed: started.elapsed(),
                outcome: String::new(),
            };
            let outcome = match result {
                Ok(Ok((response, connect))) => {
                    record.connect = connect;
                    record.outcome = response.status().as_u16().to_string();
                    Ok(response)
                }
                Ok(Err(AttemptError::Connect(err))) => Err(err.to_string()),
                Ok(Err(AttemptError::Request(message))) => {
                    sidecar.connections.discard(&host, sidecar.outbound);
                    Err(message)
                }
                Err(_) => Err(format!("no response within {attempt_timeout:?}")),
            };
            if let Err(message) = &outcome {
                record.outcome = format!("the sidecar: {message}");
            }
            report.attempts.push(record);
            return outcome.map_err(|message| CallError::NotRetryable {
                service: service.to_string(),
                method: parts.method.clone(),
                message: format!("through the sidecar at {}: {message}", sidecar.outbound),
            });
        }

        let resolution = self.discovery.resolve(service).await?;
        let endpoints = resolution.endpoints.clone();
        report.resolution = Some(resolution);

        let max_attempts = self.config.max_attempts as usize;
        let mut tried: Vec<SocketAddr> = Vec::new();
        let mut last_failure = String::new();
        for attempt_number in 0..max_attempts {
            if attempt_number > 0 {
                self.metrics
                    .retries
                    .get_or_create(&ServiceLabel {
                        service: service.to_string(),
                    })
                    .inc();
            }
            let endpoint = self.pick(&endpoints, &tried);
            tried.push(endpoint.addr);
            let attempt_started = Instant::now();
            let outgoing = build_request(&parts.method, &uri, &headers, &body);
            let result = tokio::time::timeout(
                attempt_timeout,
                self.attempt(&self.connections, &host, &endpoint, outgoing),
            )
            .await;
            let mut attempt = Attempt {
                endpoint: endpoint.clone(),
                connect: None,
                elapsed: attempt_started.elapsed(),
                outcome: String::new(),
            };
            let retry_allowed = attempt_number + 1 < max_attempts;
            match result {
                Ok(Ok((response, connect))) => {
                    attempt.connect = connect;
                    attempt.outcome = response.status().as_u16().to_string();
                    let overloaded = response.status() == StatusCode::SERVICE_UNAVAILABLE;
                    report.attempts.push(attempt);
                    if overloaded && idempotent && retry_allowed && endpoints.len() > tried.len() {
                        last_failure = format!("{} answered 503", endpoint.instance);
                        continue;
                    }
                    return Ok(response);
                }
                Ok(Err(AttemptError::Connect(err))) => {
                    self.connect_failed(service, &endpoint, &err);
                    attempt.outcome = err.to_string();
                    last_failure = err.to_string();
                    report.attempts.push(attempt);
                }
                Ok(Err(AttemptError::Request(message))) => {
                    self.connections.discard(&host, endpoint.addr);
                    attempt.outcome = message.clone();
                    report.attempts.push(attempt);
                    if !idempotent {
                        return Err(CallError::NotRetryable {
                            service: service.to_string(),
                            method: parts.method.clone(),
                            message,
                        });
                    }
                    tracing::warn!(service, instance = %endpoint.instance, error = %message, "request failed; retrying");
                    last_failure = message;
                }
                Err(_) => {
                    let message = format!("no response within {attempt_timeout:?}");
                    attempt.outcome = message.clone();
                    report.attempts.push(attempt);
                    if !idempotent {
                        return Err(CallError::NotRetryable {
                            service: service.to_string(),
                            method: parts.method.clone(),
                            message,
                        });
                    }
                    last_failure = message;
                }
            }
        }
        Err(CallError::Exhausted {
            service: service.to_string(),
            attempts: report.attempts.len(),
            last: last_failure,
        })
    }

    async fn attempt(
        &self,
        connections: &Connections,
        host: &str,
        endpoint: &Endpoint,
        request: Request<RequestBody>,
    ) -> Result<(Response<Incoming>, Option<Duration>), AttemptError> {
        let (mut sender, connect) = connections
            .get(host, endpoint.addr)
            .await
            .map_err(AttemptError::Connect)?;
        sender
            .ready()
            .await
            .map_err(|err| AttemptError::Request(format!("connection closed: {err}")))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|err| AttemptError::Request(causeway_core::telemetry::error_chain(&err)))?;
        Ok((response, connect))
    }

    /// Round robin over the endpoints not yet tried in this call and not resting; falls back to
    /// resting ones rather than failing without trying.
    fn pick(&self, endpoints: &[Endpoint], tried: &[SocketAddr]) -> Endpoint {
        let now = Instant::now();
        let resting = {
            let mut resting = self.resting.lock().unwrap_or_else(|p| p.into_inner());
            resting.retain(|_, until| *until > now);
            resting.keys().copied().collect::<Vec<_>>()
        };
        let fresh: Vec<&Endpoint> = endpoints
            .iter()
            .filter(|e| !tried.contains(&e.addr))
            .collect();
        let healthy: Vec<&Endpoint> = fresh
            .iter()
            .copied()
            .filter(|e| !resting.contains(&e.addr))
            .collect();
        let choices = if !healthy.is_empty() {
            healthy
        } else if !fresh.is_empty() {
            fresh
        } else {
            endpoints.iter().collect()
        };
        let turn = self.next.fetch_add(1, Ordering::Relaxed);
        choices[turn % choices.len()].clone()
    }

    fn rest(&self, endpoint: &Endpoint) {
        let until = Instant::now() + Duration::from_millis(self.config.endpoint_backoff_ms);
        let mut resting = self.resting.lock().unwrap_or_else(|p| p.into_inner());
        resting.insert(endpoint.addr, until);
    }
}

fn build_request(
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &Bytes,
) -> Request<RequestBody> {
    let body = Full::new(body.clone())
        .map_err(|never| match never {})
        .boxed();
    let mut request = Request::new(body);
    *request.method_mut() = method.clone();
    *request.uri_mut() = uri.clone();
    *request.headers_mut() = headers.clone();
    *request.version_mut() = http::Version::HTTP_2;
    request
}

/// The header with which a caller makes a non-idempotent request safe to repeat (the IETF
/// draft `Idempotency-Key`, as Stripe uses it): the client library and the proxy engine retry
/// a POST or PATCH only when it carries one.
pub const IDEMPOTENCY_KEY: header::HeaderName = header::HeaderName::from_static("idempotency-key");

/// Methods whose repetition has the same effect as one request (RFC 9110 §9.2.2).
pub fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idempotency_follows_rfc_9110() {
        assert!(is_idempotent(&Method::GET));
        assert!(is_idempotent(&Method::PUT));
        assert!(!is_idempotent(&Method::POST));
        assert!(!is_idempotent(&Method::PATCH));
    }
}
