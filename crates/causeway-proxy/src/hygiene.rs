//! Request and response hygiene, and the limits a proxy enforces on what its clients send: the
//! functions the gateway calls on every proxied message, and what the serve loop needs to cap
//! connections, header sections and idle clients.
//!
//! - [`strip_hop_by_hop`]: RFC 9110 §7.6.1 connection-specific fields never cross a hop.
//! - [`add_forwarding_headers`] and [`add_via`]: `X-Forwarded-For/Proto/Host`, RFC 7239
//!   `Forwarded` and `Via`.
//! - [`check_request_head`]: request smuggling and malformed framing, refused with 400.
//! - [`Limits`]: header bytes/count, header and idle timeouts (enforced by the serving loop's
//!   HTTP/1.1 front guard, `causeway_core::serve::Http1Guard`, which answers 400/408/414/431 with
//!   the same JSON error shape), body size (413), request timeout (408), and
//!   [`ConnectionLimiter`] for max connections (503).
//!
//! Every refusal is a [`Refusal`]: a status, a stable reason, the limit where one applies, and
//! one structured log line (`event = "proxy.refused"`) when the caller logs it.
//!
//! ## Which layer catches which smuggling attempt (HTTP/1.1; tested over raw TCP)
//!
//! | attempt | caught by | reason (400) |
//! | --- | --- | --- |
//! | `Content-Length` with `Transfer-Encoding`, either order | front guard | `ambiguous_framing` (RFC 9112 §6.3) |
//! | two `Content-Length` lines that differ | front guard | `conflicting_content_length` |
//! | two identical `Content-Length` lines | - | accepted as one (RFC 9110 §8.6 allows it) |
//! | `Content-Length` not plain decimal (`5, 5`, `+5`, `0x5`, `5 5`, `-1`) | front guard | `invalid_content_length` |
//! | `Transfer-Encoding` other than one `chunked` (`gzip, chunked`, `chunked, gzip`, two lines) | front guard | `unsupported_transfer_encoding` (other codings would be forwarded without the coding the re-framed body lost) |
//! | `Transfer-Encoding` in an HTTP/1.0 request | front guard | `transfer_encoding_in_http10` |
//! | obs-fold, space before the colon, bad bytes in names/values | front guard (httparse) | `malformed_request` |
//! | several `Host` lines, invalid `Host`, HTTP/1.1 without `Host` | [`check_request_head`] | `multiple_host`, `invalid_host`, `missing_host` (RFC 9112 §3.2) |
//! | a bad chunk size in the body | hyper, while the body is read | `body_unreadable` |
//!
//! [`check_request_head`] still checks CL+TE and duplicate lengths itself, so that the rule holds
//! whatever parsed the head (HTTP/2 front ends, another server library).
//!
//! For HTTP/2 the `h2` crate refuses connection-specific headers (`Transfer-Encoding`,
//! `Connection`, ...) and a `Content-Length` that disagrees with the DATA frames as stream errors.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Version};
use tokio::io::AsyncWriteExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const FORWARDED: HeaderName = HeaderName::from_static("forwarded");
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

pub use causeway_core::refusal::Refusal;

// ---- Hop-by-hop headers ----

/// Whether an `Upgrade` (WebSocket, h2c) is being passed through to the upstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Upgrade {
    Strip,
    PassThrough,
}

/// Removes hop-by-hop headers (RFC 9110 §7.6.1): `Connection` and every header it names,
/// `Keep-Alive`, `Proxy-Connection`, `Proxy-Authenticate`, `Proxy-Authorization`, `Trailer`,
/// `Transfer-Encoding`, `Upgrade`, and `TE` except `te: trailers` (gRPC needs it, and it is the
/// only `TE` HTTP/2 allows). With [`Upgrade::PassThrough`] and an `Upgrade` header present,
/// `Upgrade` stays and `Connection` becomes exactly `upgrade`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: Upgrade) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|token| HeaderName::from_bytes(token.trim().as_bytes()).ok())
        .collect();
    let pass_upgrade = upgrade == Upgrade::PassThrough && headers.contains_key(header::UPGRADE);
    for name in named {
        // `Host` is end-to-end and required upstream; `TE` and `Upgrade` are handled below.
        if name != header::HOST && name != header::TE && name != header::UPGRADE {
            headers.remove(&name);
        }
    }
    for name in [
        header::CONNECTION,
        KEEP_ALIVE,
        PROXY_CONNECTION,
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
        header::TRAILER,
        header::TRANSFER_ENCODING,
    ] {
        headers.remove(name);
    }
    let wants_trailers = headers
        .get_all(header::TE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|token| {
            token
                .split(';')
                .next()
                .is_some_and(|coding| coding.trim().eq_ignore_ascii_case("trailers"))
        });
    headers.remove(header::TE);
    if wants_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    if pass_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(header::UPGRADE);
    }
}

// ---- Forwarding headers ----

/// What the proxy knows about the hop it received a request on.
#[derive(Clone, Copy, Debug)]
pub struct Forwarding<'a> {
    /// The client's address (the TCP peer).
    pub peer: SocketAddr,
    /// `https` or `http`: what the client used to reach this proxy.
    pub proto: &'a str,
    /// The `Host` (or `:authority`) the client asked for.
    pub host: Option<&'a str>,
    /// The client's HTTP version, for `Via`.
    pub version: Version,
    /// This proxy's name in `Via`.
    pub proxy_name: &'a str,
}

/// Appends the peer to `X-Forwarded-For` (earlier hops' lines joined into one), sets
/// `X-Forwarded-Proto` and `X-Forwarded-Host` (replacing what the client sent: only this hop
/// knows them), appends an RFC 7239 `Forwarded` element and a `Via` entry.
pub fn add_forwarding_headers(headers: &mut HeaderMap, forwarding: &Forwarding<'_>) {
    let peer_ip = forwarding.peer.ip().to_string();
    append_list(headers, X_FORWARDED_FOR, &peer_ip);
    if let Ok(proto) = HeaderValue::from_str(forwarding.proto) {
        headers.insert(X_FORWARDED_PROTO, proto);
    }
    match forwarding.host.map(HeaderValue::from_str) {
        Some(Ok(host)) => {
            headers.insert(X_FORWARDED_HOST, host);
        }
        _ => {
            headers.remove(X_FORWARDED_HOST);
        }
    }
    let mut element = format!(
        "for={};proto={}",
        quote_if_needed(&forwarding.peer.to_string()),
        quote_if_needed(forwarding.proto)
    );
    if let Some(host) = forwarding.host {
        element.push_str(";host=");
        element.push_str(&quote_if_needed(host));
    }
    append_list(headers, FORWARDED, &element);
    add_via(headers, forwarding.version, forwarding.proxy_name);
}

/// Appends `<version> <name>` to `Via` (`1.1 causeway`, `2 causeway`); for requests and
/// responses alike.
pub fn add_via(headers: &mut HeaderMap, version: Version, proxy_name: &str) {
    let protocol = match version {
        Version::HTTP_09 => "0.9",
        Version::HTTP_10 => "1.0",
        Version::HTTP_2 => "2",
        Version::HTTP_3 => "3",
        _ => "1.1",
    };
    append_list(headers, header::VIA, &format!("{protocol} {proxy_name}"));
}

/// Joins every existing line of a list header and `item` into one line.
fn append_list(headers: &mut HeaderMap, name: HeaderName, item: &str) {
    let mut joined: Vec<&str> = headers
        .get_all(&name)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .map(str::trim)
        .filter(|value| !value.is_empty())
        .collect();
    joined.push(item);
    if let Ok(value) = HeaderValue::from_str(&joined.join(", ")) {
        headers.insert(name, value);
    }
}

/// RFC 7239 values are tokens or quoted strings; `[::1]:5000` and `host:8443` must be quoted.
fn quote_if_needed(value: &str) -> String {
    let is_tchar = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    if !value.is_empty() && value.bytes().all(is_tchar) {
        return value.to_owned();
    }
    let escaped = value.replace('\\', "\\\\").replace('"', "\\\"");
    let bracketed = match value.parse::<SocketAddr>() {
        // IPv6 with a port already prints as `[::1]:5000`; a bare IPv6 needs its brackets.
        Err(_) if value.parse::<std::net::Ipv6Addr>().is_ok() => format!("[{escaped}]"),
        _ => escaped,
    };
    format!("\"{bracketed}\"")
}

// ---- Request smuggling ----

/// Checks a request head for framing that could make this proxy and the next hop disagree about
/// where a request ends (RFC 9112 §6), and for `Host` errors (RFC 9112 §3.2). Call it before
/// reading the body; a refusal is a 400 and the connection is closed.
pub fn check_request_head(version: Version, headers: &HeaderMap) -> Result<(), Refusal> {
    let mut hosts = headers.get_all(header::HOST).iter();
    match (hosts.next(), hosts.next()) {
        (Some(_), Some(_)) => {
            return Err(Refusal::bad_request(
                "multiple_host",
                "more than one Host header",
            ));
        }
        (Some(host), None) => {
            let valid = host
                .to_str()
                .ok()
                .and_then(|host| host.parse::<http::uri::Authority>().ok())
                .is_some_and(|authority| !authority.as_str().contains('@'));
            if !valid {
                return Err(Refusal::bad_request(
                    "invalid_host",
                    "the Host header is not a valid host[:port]",
                ));
            }
        }
        (None, _) if version == Version::HTTP_11 => {
            return Err(Refusal::bad_request(
                "missing_host",
                "HTTP/1.1 requests must carry a Host header",
            ));
        }
        (None, _) => {}
    }

    let lengths: Vec<&[u8]> = headers
        .get_all(header::CONTENT_LENGTH)
        .iter()
        .flat_map(|value| value.as_bytes().split(|b| *b == b','))
        .map(|item| item.trim_ascii())
        .collect();
    let has_length = !lengths.is_empty();
    for length in &lengths {
        let plain_decimal =
            !length.is_empty() && length.len() <= 19 && length.iter().all(|b| b.is_ascii_digit());
        if !plain_decimal {
            return Err(Refusal::bad_request(
                "invalid_content_length",
                "Content-Length must be a plain decimal number",
            ));
        }
    }
    if lengths.len() > 1 {
        let reason = if lengths.windows(2).all(|pair| pair[0] == pair[1]) {
            "duplicate_content_length"
        } else {
            "conflicting_content_length"
        };
        return Err(Refusal::bad_request(
            reason,
            "exactly one Content-Length value is accepted",
        ));
    }

    let codings: Vec<&[u8]> = headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .flat_map(|value| value.as_bytes().split(|b| *b == b','))
        .map(|item| item.trim_ascii())
        .collect();
    if !codings.is_empty() {
        if version == Version::HTTP_10 {
            return Err(Refusal::bad_request(
                "transfer_encoding_in_http10",
                "HTTP/1.0 requests cannot use Transfer-Encoding",
            ));
        }
        if has_length {
            return Err(Refusal::bad_request(
                "ambiguous_framing",
                "Content-Length and Transfer-Encoding together",
            ));
        }
        if codings.len() != 1 || !codings[0].eq_ignore_ascii_case(b"chunked") {
            return Err(Refusal::bad_request(
                "unsupported_transfer_encoding",
                "Transfer-Encoding must be exactly `chunked`",
            ));
        }
    }
    Ok(())
}

// ---- Limits ----

pub use causeway_core::proxy_config::{Limits, LimitsError};

/// The limit checks that answer with a [`Refusal`] (the plain config lives in causeway-core).
pub trait LimitsExt {
    fn check_declared_length(&self, headers: &HeaderMap) -> Result<(), Refusal>;
    fn within_request_timeout<F: Future + Send>(
        &self,
        work: F,
    ) -> impl Future<Output = Result<F::Output, Refusal>> + Send;
}

impl LimitsExt for Limits {
    /// 413 when the declared `Content-Length` is over the limit (before reading any of it);
    /// bodies without a length are capped with `http_body_util::Limited` at `max_body_bytes`.
    fn check_declared_length(&self, headers: &HeaderMap) -> Result<(), Refusal> {
        let declared = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.trim().parse::<u64>().ok());
        match declared {
            Some(length) if length > self.max_body_bytes as u64 => {
                Err(Refusal::body_too_large(self.max_body_bytes))
            }
            _ => Ok(()),
        }
    }

    /// Runs the request's work under the request timeout; 408 when it runs out.
    fn within_request_timeout<F: Future + Send>(
        &self,
        work: F,
    ) -> impl Future<Output = Result<F::Output, Refusal>> + Send {
        let limit = self.request_timeout();
        async move {
            tokio::time::timeout(limit, work)
                .await
                .map_err(|_| Refusal::request_timeout(limit))
        }
    }
}

// ---- Connections ----

/// Caps open connections: the accept loop asks for a permit per connection and holds it for the
/// connection's life.
#[derive(Clone, Debug)]
pub struct ConnectionLimiter {
    permits: Arc<Semaphore>,
    max: usize,
}

/// Held while a connection is open; dropping it frees the slot.
#[derive(Debug)]
pub struct ConnectionPermit {
    _permit: OwnedSemaphorePermit,
}

impl ConnectionLimiter {
    pub fn new(max_connections: usize) -> Self {
        let max = max_connections.clamp(1, Semaphore::MAX_PERMITS);
        Self {
            permits: Arc::new(Semaphore::new(max)),
            max,
        }
    }

    /// A permit, or the refusal (already logged) when `max_connections` are open.
    pub fn try_acquire(&self, peer: SocketAddr) -> Result<ConnectionPermit, Refusal> {
        match self.permits.clone().try_acquire_owned() {
            Ok(permit) => Ok(ConnectionPermit { _permit: permit }),
            Err(_) => {
                let refusal = Refusal::too_many_connections(self.max);
                refusal.log(peer, None);
                Err(refusal)
            }
        }
    }

    pub fn active(&self) -> usize {
        self.max - self.permits.available_permits()
    }

    /// Exports `proxy_connections_open` and `proxy_connections_max`, read from the permits at
    /// scrape time.
    pub fn register(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register_collector(Box::new(self.clone()));
    }
}

impl prometheus_client::collector::Collector for ConnectionLimiter {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        use prometheus_client::metrics::gauge::ConstGauge;
        for (name, help, value) in [
            (
                "proxy_connections_open",
                "Client connections open now",
                self.active(),
            ),
            (
                "proxy_connections_max",
                "Client connections allowed at once (limits.max_connections)",
                self.max,
            ),
        ] {
            let gauge = ConstGauge::new(value as i64);
            gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)?;
        }
        Ok(())
    }
}

/// The serve loop's admission: one permit per open connection.
impl causeway_core::serve::Admission for ConnectionLimiter {
    type Permit = ConnectionPermit;

    fn admit(&self, peer: SocketAddr) -> Option<ConnectionPermit> {
        self.try_acquire(peer).ok()
    }

    fn refuse(&self, stream: tokio::net::TcpStream) -> impl Future<Output = ()> + Send + 'static {
        let refusal = Refusal::too_many_connections(self.max);
        async move { refuse_connection(stream, &refusal).await }
    }
}

/// Answers a refused plain-HTTP connection with a bare `503` and closes it (best effort, briefly:
/// an over-limit proxy must not wait on the client). TLS listeners should just drop the socket.
pub async fn refuse_connection(mut stream: tokio::net::TcpStream, refusal: &Refusal) {
    let body = format!(
        "{{\"error\":\"{}\",\"message\":\"{}\"}}",
        refusal.reason, refusal.detail
    );
    let response = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        refusal.status.as_u16(),
        refusal.status.canonical_reason().unwrap_or(""),
        body.len()
    );
    let write = async {
        stream.write_all(response.as_bytes()).await?;
        stream.shutdown().await
    };
    let _ = tokio::time::timeout(Duration::from_millis(100), write).await;
}

#[cfg(test)]
mod tests;
