//! The reverse-proxy role: TLS-terminated HTTP/1.1 and HTTP/2 in, API gateway checks (JWT, rate
//! limit, body size), routing by path prefix to a service, forwarding through the shared client
//! library (discovery, balancing, retries), and the answer streamed back with the hop's
//! `Server-Timing` entry, request id and access log line.

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use causeway_client::{CallError, CallOptions, ServiceClient};
use causeway_core::serve::{BoxError, error_response};
use causeway_core::server_timing::{self, TimingEntry, steps};
use causeway_core::telemetry::HttpMetrics;
use causeway_core::topology::{ReverseProxyConfig, RouteConfig};
use causeway_core::trace_context::{REQUEST_ID, TraceContext};
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;

use crate::auth::{AuthError, Verifier};

pub type ProxyBody = BoxBody<Bytes, BoxError>;

/// Set by the gateway for the services behind it; never taken from the client.
pub const AUTHENTICATED_SUBJECT: HeaderName = HeaderName::from_static("x-authenticated-subject");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Hop-by-hop headers of a response, not passed on (RFC 9110 §7.6.1).
const HOP_BY_HOP: [HeaderName; 5] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::TRAILER,
];

pub struct Gateway {
    instance: String,
    routes: Vec<RouteConfig>,
    verifier: Verifier,
    limiter: DefaultKeyedRateLimiter<String>,
    client: Arc<ServiceClient>,
    metrics: HttpMetrics,
    max_body_bytes: usize,
    request_timeout: Duration,
}

enum Refusal {
    Status(StatusCode, &'static str, String),
    Unauthorized(AuthError),
    RateLimited(Duration),
}

impl Gateway {
    pub fn new(
        instance: String,
        config: &ReverseProxyConfig,
        jwt_key: &[u8],
        client: Arc<ServiceClient>,
        metrics: HttpMetrics,
    ) -> Self {
        let mut routes = config.routes.clone();
        // Longest prefix first, so that the first match is the most specific.
        routes.sort_by_key(|route| std::cmp::Reverse(route.prefix.len()));
        let per_second =
            NonZeroU32::new(config.rate_limit.requests_per_second).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(config.rate_limit.burst).unwrap_or(NonZeroU32::MIN);
        Self {
            instance,
            routes,
            verifier: Verifier::new(jwt_key, &config.jwt),
            limiter: RateLimiter::keyed(Quota::per_second(per_second).allow_burst(burst)),
            client,
            metrics,
            max_body_bytes: config.max_body_bytes,
            request_timeout: Duration::from_millis(config.request_timeout_ms),
        }
    }

    /// Forgets rate-limit state of clients that have been quiet, so memory stays bounded.
    pub fn forget_idle_clients(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }

    /// Buffers a request body up to the limit (so that it can be retried on another instance).
    async fn read_body(&self, headers: &HeaderMap, body: Incoming) -> Result<Bytes, Refusal> {
        let too_large = || {
            Refusal::Status(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!(
                    "request bodies are limited to {} bytes",
                    self.max_body_bytes
                ),
            )
        };
        let declared_length = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.parse::<usize>().ok());
        if declared_length.is_some_and(|length| length > self.max_body_bytes) {
            return Err(too_large());
        }
        Ok(Limited::new(body, self.max_body_bytes)
            .collect()
            .await
            .map_err(|err| {
                if err.is::<http_body_util::LengthLimitError>() {
                    too_large()
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

    fn route(&self, path: &str) -> Option<&RouteConfig> {
        self.routes
            .iter()
            .find(|route| path.starts_with(&route.prefix))
    }

    /// Handles one request from `peer`.
    pub async fn handle(
        &self,
        request: Request<Incoming>,
        peer: SocketAddr,
    ) -> Response<ProxyBody> {
        let started = Instant::now();
        let trace = TraceContext::continue_from(request.headers());
        let method = request.method().clone();
        let path = request.uri().path().to_string();
        let version = request.version();
        let route_name = self
            .route(&path)
            .map(|route| route.prefix.clone())
            .unwrap_or_else(|| "unmatched".into());

        let grpc = is_grpc(request.headers());
        let (mut response, detail) = match self.forward(request, peer, &trace).await {
            Ok(forwarded) => forwarded,
            Err(refusal) => {
                let response = if grpc {
                    grpc_refusal(refusal)
                } else {
                    refusal_response(refusal, &trace.request_id)
                };
                let detail = format!("{} refused the request", self.instance);
                (response, detail)
            }
        };
        let elapsed = started.elapsed();
        let headers = response.headers_mut();
        if let Ok(value) = HeaderValue::from_str(&trace.request_id) {
            headers.insert(REQUEST_ID, value);
        }
        server_timing::append(
            headers,
            &TimingEntry::new(
                steps::EDGE_PROXY,
                elapsed,
                format!("{detail}; client spoke {version:?} over TLS"),
            ),
        );
        let status = response.status().as_u16();
        self.metrics.observe(&route_name, &method, status, elapsed);
        tracing::info!(
            request_id = %trace.request_id,
            trace_id = %trace.trace_id,
            client = %peer,
            %method,
            %path,
            status,
            elapsed_ms = elapsed.as_secs_f64() * 1000.0,
            "access"
        );
        response
    }

    async fn forward(
        &self,
        request: Request<Incoming>,
        peer: SocketAddr,
        trace: &TraceContext,
    ) -> Result<(Response<ProxyBody>, String), Refusal> {
        let path = request.uri().path().to_string();
        let route = self.route(&path).ok_or_else(|| {
            Refusal::Status(
                StatusCode::NOT_FOUND,
                "no_route",
                format!("no route for {path}"),
            )
        })?;

        let subject = if route.auth {
            let claims = self
                .verifier
                .verify(
                    request
                        .headers()
                        .get(header::AUTHORIZATION)
                        .map(HeaderValue::as_bytes),
                )
                .map_err(Refusal::Unauthorized)?;
            Some(claims.sub)
        } else {
            None
        };

        let client_key = match &subject {
            Some(sub) => format!("sub:{sub}"),
            None => format!("ip:{}", peer.ip()),
        };
        if let Err(not_until) = self.limiter.check_key(&client_key) {
            return Err(Refusal::RateLimited(
                not_until.wait_time_from(DefaultClock::default().now()),
            ));
        }

        let (parts, body) = request.into_parts();
        let upstream_path = rewrite_path(route, &parts.uri);
        let upstream_uri: http::Uri = upstream_path.parse().map_err(|_| {
            Refusal::Status(
                StatusCode::BAD_REQUEST,
                "bad_path",
                format!("cannot forward {path}"),
            )
        })?;
        let mut headers = parts.headers.clone();
        headers.remove(AUTHENTICATED_SUBJECT);
        if let Some(sub) = &subject
            && let Ok(value) = HeaderValue::from_str(sub)
        {
            headers.insert(AUTHENTICATED_SUBJECT, value);
        }
        add_forwarding_headers(
            &mut headers,
            peer,
            parts.uri.authority().map(|a| a.as_str()),
        );
        let options = CallOptions {
            deadline: Some(self.request_timeout),
            attempt_timeout: Some(self.request_timeout),
        };
        let (result, report) = if is_grpc(&parts.headers) {
            // gRPC streams in both directions and its messages carry their own size limits, so
            // its body is passed through as it comes rather than buffered.
            let body = body.map_err(|err| -> BoxError { Box::new(err) }).boxed();
            let upstream = upstream_request(&parts.method, upstream_uri, headers, body);
            self.client
                .send_streaming(&route.service, upstream, trace, options)
                .await
        } else {
            let body = self.read_body(&parts.headers, body).await?;
            let upstream = upstream_request(&parts.method, upstream_uri, headers, body);
            self.client
                .send_with(&route.service, upstream, trace, options)
                .await
        };
        let response = result.map_err(|err| match err {
            CallError::DeadlineExceeded { .. } => Refusal::Status(
                StatusCode::GATEWAY_TIMEOUT,
                "upstream_timeout",
                err.to_string(),
            ),
            err => Refusal::Status(
                StatusCode::SERVICE_UNAVAILABLE,
                "upstream_unavailable",
                err.to_string(),
            ),
        })?;
        let instance = report
            .answered_by()
            .map(|endpoint| endpoint.instance.clone())
            .unwrap_or_default();
        let detail = format!(
            "{} checked {}, rate limit ok, routed {path} to {} ({instance}) as {upstream_path}",
            self.instance,
            match &subject {
                Some(sub) => format!("JWT sub={sub}"),
                None => "no auth (public route)".to_string(),
            },
            route.service,
        );
        let (mut parts, body) = response.into_parts();
        for name in HOP_BY_HOP {
            parts.headers.remove(name);
        }
        let body = body.map_err(|err| -> BoxError { Box::new(err) }).boxed();
        Ok((Response::from_parts(parts, body), detail))
    }
}

fn upstream_request<B>(
    method: &http::Method,
    uri: http::Uri,
    headers: HeaderMap,
    body: B,
) -> Request<B> {
    let mut request = Request::new(body);
    *request.method_mut() = method.clone();
    *request.uri_mut() = uri;
    *request.headers_mut() = headers;
    request
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

fn add_forwarding_headers(headers: &mut HeaderMap, peer: SocketAddr, authority: Option<&str>) {
    let client_ip = peer.ip().to_string();
    let forwarded_for = match headers
        .get(&X_FORWARDED_FOR)
        .and_then(|value| value.to_str().ok())
    {
        Some(earlier) => format!("{earlier}, {client_ip}"),
        None => client_ip,
    };
    if let Ok(value) = HeaderValue::from_str(&forwarded_for) {
        headers.insert(X_FORWARDED_FOR, value);
    }
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("https"));
    let host = headers
        .get(header::HOST)
        .cloned()
        .or_else(|| authority.and_then(|a| HeaderValue::from_str(a).ok()));
    if let Some(host) = host {
        headers.insert(X_FORWARDED_HOST, host);
    }
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
        Refusal::Status(status, _, message) => {
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

    fn route(prefix: &str, strip: Option<&str>) -> RouteConfig {
        RouteConfig {
            prefix: prefix.into(),
            service: "user-service".into(),
            strip_prefix: strip.map(str::to_owned),
            auth: true,
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

    #[test]
    fn forwarding_headers_append_to_earlier_hops() {
        let mut headers = HeaderMap::new();
        headers.insert(X_FORWARDED_FOR, HeaderValue::from_static("10.0.0.1"));
        headers.insert(header::HOST, HeaderValue::from_static("localhost:8443"));
        add_forwarding_headers(&mut headers, "127.0.0.1:5000".parse().unwrap(), None);
        assert_eq!(headers[&X_FORWARDED_FOR], "10.0.0.1, 127.0.0.1");
        assert_eq!(headers[&X_FORWARDED_PROTO], "https");
        assert_eq!(headers[&X_FORWARDED_HOST], "localhost:8443");
    }
}
