use std::time::Instant;

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::BodyExt;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};

use super::*;

fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (name, value) in pairs {
        map.append(
            HeaderName::from_bytes(name.as_bytes()).unwrap(),
            HeaderValue::from_str(value).unwrap(),
        );
    }
    map
}

fn sorted(map: &HeaderMap) -> Vec<(String, String)> {
    let mut pairs: Vec<(String, String)> = map
        .iter()
        .map(|(name, value)| {
            (
                name.to_string(),
                value.to_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    pairs.sort();
    pairs
}

fn owned(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut pairs: Vec<(String, String)> = pairs
        .iter()
        .map(|(name, value)| (name.to_string(), value.to_string()))
        .collect();
    pairs.sort();
    pairs
}

#[test]
fn hop_by_hop_headers_are_stripped() {
    type Case = (
        &'static [(&'static str, &'static str)],
        Upgrade,
        &'static [(&'static str, &'static str)],
    );
    let cases: &[Case] = &[
        (
            &[
                ("connection", "keep-alive, X-Secret , host"),
                ("keep-alive", "timeout=5"),
                ("x-secret", "1"),
                ("proxy-connection", "keep-alive"),
                ("proxy-authorization", "Basic x"),
                ("proxy-authenticate", "Basic"),
                ("trailer", "expires"),
                ("transfer-encoding", "chunked"),
                ("upgrade", "websocket"),
                ("host", "example.com"),
                ("accept", "*/*"),
            ],
            Upgrade::Strip,
            &[("host", "example.com"), ("accept", "*/*")],
        ),
        // gRPC: `te: trailers` survives; other TE codings don't.
        (
            &[("te", "trailers"), ("content-type", "application/grpc")],
            Upgrade::Strip,
            &[("te", "trailers"), ("content-type", "application/grpc")],
        ),
        (
            &[("te", "gzip, trailers;q=0.5")],
            Upgrade::Strip,
            &[("te", "trailers")],
        ),
        (&[("te", "gzip")], Upgrade::Strip, &[]),
        // A WebSocket upgrade passed through keeps Upgrade and a bare `Connection: upgrade`.
        (
            &[
                ("connection", "Upgrade, x-hop"),
                ("upgrade", "websocket"),
                ("x-hop", "1"),
                ("sec-websocket-key", "abc"),
            ],
            Upgrade::PassThrough,
            &[
                ("connection", "upgrade"),
                ("upgrade", "websocket"),
                ("sec-websocket-key", "abc"),
            ],
        ),
        // Pass-through without an Upgrade header adds nothing.
        (&[("connection", "close")], Upgrade::PassThrough, &[]),
    ];
    for (input, upgrade, expected) in cases {
        let mut map = headers(input);
        strip_hop_by_hop(&mut map, *upgrade);
        assert_eq!(sorted(&map), owned(expected), "{input:?} {upgrade:?}");
    }
}

#[test]
fn forwarding_headers_append_to_earlier_hops() {
    let mut map = headers(&[
        ("x-forwarded-for", "10.0.0.1"),
        ("x-forwarded-for", "10.0.0.2"),
        ("x-forwarded-proto", "http"),
        ("x-forwarded-host", "spoofed"),
        ("forwarded", "for=10.0.0.1"),
        ("via", "1.1 edge"),
    ]);
    add_forwarding_headers(
        &mut map,
        &Forwarding {
            peer: "[2001:db8::1]:4711".parse().unwrap(),
            proto: "https",
            host: Some("localhost:8443"),
            version: Version::HTTP_2,
            proxy_name: "causeway",
        },
    );
    assert_eq!(
        sorted(&map),
        owned(&[
            ("x-forwarded-for", "10.0.0.1, 10.0.0.2, 2001:db8::1"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "localhost:8443"),
            (
                "forwarded",
                "for=10.0.0.1, for=\"[2001:db8::1]:4711\";proto=https;host=\"localhost:8443\"",
            ),
            ("via", "1.1 edge, 2 causeway"),
        ])
    );

    let mut map = HeaderMap::new();
    add_forwarding_headers(
        &mut map,
        &Forwarding {
            peer: "127.0.0.1:5000".parse().unwrap(),
            proto: "http",
            host: None,
            version: Version::HTTP_11,
            proxy_name: "causeway",
        },
    );
    assert_eq!(
        sorted(&map),
        owned(&[
            ("x-forwarded-for", "127.0.0.1"),
            ("x-forwarded-proto", "http"),
            ("forwarded", "for=\"127.0.0.1:5000\";proto=http"),
            ("via", "1.1 causeway"),
        ])
    );
    let mut map = HeaderMap::new();
    add_via(&mut map, Version::HTTP_10, "p");
    assert_eq!(map[header::VIA], "1.0 p");
    assert_eq!(quote_if_needed("::1"), "\"[::1]\"");
    assert_eq!(quote_if_needed("a\"b"), "\"a\\\"b\"");
}

#[test]
fn request_heads_are_checked() {
    let ok: &[(Version, &[(&str, &str)])] = &[
        (Version::HTTP_11, &[("host", "a.example:8443")]),
        (
            Version::HTTP_11,
            &[("host", "a"), ("content-length", "0012")],
        ),
        (
            Version::HTTP_11,
            &[("host", "a"), ("transfer-encoding", "Chunked")],
        ),
        (Version::HTTP_10, &[]),
        (Version::HTTP_2, &[("content-length", "5")]),
    ];
    for (version, pairs) in ok {
        assert_eq!(
            check_request_head(*version, &headers(pairs)),
            Ok(()),
            "{pairs:?}"
        );
    }
    type Refused = (
        Version,
        &'static [(&'static str, &'static str)],
        &'static str,
    );
    let refused: &[Refused] = &[
        (Version::HTTP_11, &[], "missing_host"),
        (
            Version::HTTP_11,
            &[("host", "a"), ("host", "b")],
            "multiple_host",
        ),
        (Version::HTTP_11, &[("host", "a b")], "invalid_host"),
        (Version::HTTP_11, &[("host", "user@a")], "invalid_host"),
        (
            Version::HTTP_11,
            &[
                ("host", "a"),
                ("content-length", "5"),
                ("transfer-encoding", "chunked"),
            ],
            "ambiguous_framing",
        ),
        (
            Version::HTTP_11,
            &[
                ("host", "a"),
                ("content-length", "5"),
                ("content-length", "6"),
            ],
            "conflicting_content_length",
        ),
        (
            Version::HTTP_11,
            &[("host", "a"), ("content-length", "5, 5")],
            "duplicate_content_length",
        ),
        (
            Version::HTTP_11,
            &[
                ("host", "a"),
                ("content-length", "5"),
                ("content-length", "5"),
            ],
            "duplicate_content_length",
        ),
        (
            Version::HTTP_11,
            &[("host", "a"), ("content-length", "+5")],
            "invalid_content_length",
        ),
        (
            Version::HTTP_11,
            &[("host", "a"), ("content-length", "0x5")],
            "invalid_content_length",
        ),
        (
            Version::HTTP_11,
            &[("host", "a"), ("content-length", "")],
            "invalid_content_length",
        ),
        (
            Version::HTTP_11,
            &[("host", "a"), ("content-length", "99999999999999999999")],
            "invalid_content_length",
        ),
        (
            Version::HTTP_11,
            &[("host", "a"), ("transfer-encoding", "gzip, chunked")],
            "unsupported_transfer_encoding",
        ),
        (
            Version::HTTP_11,
            &[
                ("host", "a"),
                ("transfer-encoding", "chunked"),
                ("transfer-encoding", "chunked"),
            ],
            "unsupported_transfer_encoding",
        ),
        (
            Version::HTTP_11,
            &[("host", "a"), ("transfer-encoding", "identity")],
            "unsupported_transfer_encoding",
        ),
        (
            Version::HTTP_10,
            &[("transfer-encoding", "chunked")],
            "transfer_encoding_in_http10",
        ),
    ];
    for (version, pairs, reason) in refused {
        let refusal = check_request_head(*version, &headers(pairs)).expect_err(reason);
        assert_eq!(refusal.reason, *reason, "{pairs:?}");
        assert_eq!(refusal.status, StatusCode::BAD_REQUEST);
        let response = refusal.to_response();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        assert_eq!(response.headers()[header::CONNECTION], "close");
    }
}

#[test]
fn limits_parse_with_defaults_and_refuse_unknown_fields() {
    let limits: Limits = serde_json::from_str(r#"{"max_header_count": 50}"#).unwrap();
    assert_eq!(limits.max_header_count, 50);
    assert_eq!(limits.max_body_bytes, Limits::default().max_body_bytes);
    limits.validate().unwrap();
    assert!(serde_json::from_str::<Limits>(r#"{"max_headers": 5}"#).is_err());
    let small = Limits {
        max_header_bytes: 100,
        ..Limits::default()
    };
    assert!(
        small
            .validate()
            .unwrap_err()
            .to_string()
            .contains("max_header_bytes")
    );
    let zero = Limits {
        max_connections: 0,
        ..Limits::default()
    };
    assert!(zero.validate().is_err());

    let limits = Limits {
        max_body_bytes: 10,
        ..Limits::default()
    };
    assert_eq!(
        limits.check_declared_length(&headers(&[("content-length", "10")])),
        Ok(())
    );
    let refusal = limits
        .check_declared_length(&headers(&[("content-length", "11")]))
        .unwrap_err();
    assert_eq!(refusal.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(refusal.limit, Some(10));
}

#[tokio::test]
async fn request_timeout_is_408() {
    let limits = Limits {
        request_timeout_ms: 20,
        ..Limits::default()
    };
    assert_eq!(limits.within_request_timeout(async { 7 }).await, Ok(7));
    let refusal = limits
        .within_request_timeout(tokio::time::sleep(Duration::from_secs(5)))
        .await
        .unwrap_err();
    assert_eq!(refusal.status, StatusCode::REQUEST_TIMEOUT);
    assert_eq!(refusal.limit, Some(20));
}

#[test]
fn connection_limiter_caps_and_frees() {
    let limiter = ConnectionLimiter::new(2);
    let peer: SocketAddr = "127.0.0.1:1".parse().unwrap();
    let first = limiter.try_acquire(peer).unwrap();
    let _second = limiter.try_acquire(peer).unwrap();
    assert_eq!(limiter.active(), 2);
    let refusal = limiter.try_acquire(peer).unwrap_err();
    assert_eq!(refusal.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(refusal.limit, Some(2));
    drop(first);
    assert_eq!(limiter.active(), 1);
    limiter.try_acquire(peer).unwrap();
}

// ---- Raw TCP against Causeway's serving loop with a handler that uses these functions ----

/// Which layer answered: the front guard and our check both answer with a JSON reason; only
/// the handler answers `ok`.
async fn handle(
    request: http::Request<Incoming>,
) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    if let Err(refusal) = check_request_head(request.version(), request.headers()) {
        return Ok(refusal.to_response());
    }
    match request.into_body().collect().await {
        Ok(body) => Ok(Response::new(Full::new(Bytes::from(format!(
            "ok {}",
            body.to_bytes().len()
        ))))),
        Err(err) => Ok(Refusal::bad_request("body_unreadable", err.to_string()).to_response()),
    }
}

/// `causeway_core::serve::serve_limited` with `limits`, on 127.0.0.1:0 (as the proxy serves).
async fn server(limits: Limits) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (trigger, shutdown) = causeway_core::serve::shutdown_channel();
    tokio::spawn(async move {
        // Fired when the test's runtime drops the task.
        let _trigger = trigger;
        let admission = ConnectionLimiter::new(limits.max_connections);
        causeway_core::serve::serve_limited(
            listener,
            None,
            |_peer| hyper::service::service_fn(handle),
            shutdown,
            Duration::from_secs(1),
            Some(&limits),
            admission,
        )
        .await;
    });
    addr
}

/// Sends `bytes` and reads until the server closes (or 3 s pass).
async fn exchange(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(3), stream.read_to_end(&mut answer)).await;
    String::from_utf8_lossy(&answer).into_owned()
}

fn status_of(answer: &str) -> u16 {
    answer
        .split(' ')
        .nth(1)
        .and_then(|status| status.parse().ok())
        .unwrap_or(0)
}

const NORMAL: &[u8] =
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello";

#[tokio::test]
async fn smuggling_attempts_over_raw_tcp_get_400_with_a_reason() {
    let addr = server(Limits::default()).await;
    // (request head and body, the reason its JSON answer gives)
    let attempts: &[(&str, &str)] = &[
        (
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
            "conflicting_content_length",
        ),
        (
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 5\r\n\r\nhello",
            "invalid_content_length",
        ),
        (
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +5\r\n\r\nhello",
            "invalid_content_length",
        ),
        (
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0x5\r\n\r\nhello",
            "invalid_content_length",
        ),
        (
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5 5\r\n\r\nhello",
            "invalid_content_length",
        ),
        (
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n",
            "unsupported_transfer_encoding",
        ),
        (
            "POST / HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            "transfer_encoding_in_http10",
        ),
        (
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
            "unsupported_transfer_encoding",
        ),
        (
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            "unsupported_transfer_encoding",
        ),
        (
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            "ambiguous_framing",
        ),
        (
            "GET / HTTP/1.1\r\nHost: a\r\nX-Folded: a\r\n b\r\n\r\n",
            "malformed_request",
        ),
        (
            "GET / HTTP/1.1\r\nHost: a\r\nX-Bad : a\r\n\r\n",
            "malformed_request",
        ),
        (
            "GET / HTTP/1.1\r\nHost: a\r\nX(Bad): a\r\n\r\n",
            "malformed_request",
        ),
        (
            "GET / HTTP/1.1\r\nHost: a\r\nX-Bad: a\x00b\r\n\r\n",
            "malformed_request",
        ),
        (
            "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            "multiple_host",
        ),
        ("GET / HTTP/1.1\r\n\r\n", "missing_host"),
        ("GET / HTTP/1.1\r\nHost: a/b\r\n\r\n", "invalid_host"),
        (
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
            "body_unreadable",
        ),
    ];
    for (request, reason) in attempts {
        let answer = exchange(addr, request.as_bytes()).await;
        assert_eq!(status_of(&answer), 400, "{request:?} -> {answer:?}");
        assert!(
            answer.contains(&format!("\"error\":\"{reason}\"")),
            "{request:?} -> {answer}"
        );
        // The server still serves a normal request on a fresh connection.
        let answer = exchange(addr, NORMAL).await;
        assert!(
            answer.starts_with("HTTP/1.1 200") && answer.ends_with("ok 5"),
            "{answer}"
        );
    }
}

/// Content-Length with Transfer-Encoding is refused before anything reads the body (RFC 9112
/// §6.3), in either order, so a request hidden in the body is never served.
#[tokio::test]
async fn content_length_with_transfer_encoding_is_refused() {
    let addr = server(Limits::default()).await;
    let smuggled = "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n\
                    0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n";
    let answer = exchange(addr, smuggled.as_bytes()).await;
    assert_eq!(answer.matches("HTTP/1.1 ").count(), 1, "{answer}");
    assert_eq!(status_of(&answer), 400, "{answer}");
    assert!(
        answer.contains("\"error\":\"ambiguous_framing\""),
        "{answer}"
    );
    let reversed = "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 40\r\n\r\n\
                    0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n";
    let answer = exchange(addr, reversed.as_bytes()).await;
    assert_eq!(answer.matches("HTTP/1.1 ").count(), 1, "{answer}");
    assert!(
        answer.contains("\"error\":\"ambiguous_framing\""),
        "{answer}"
    );
    let answer = exchange(addr, NORMAL).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

fn small_limits() -> Limits {
    Limits {
        max_header_bytes: 8192,
        max_header_count: 20,
        header_timeout_ms: 300,
        idle_timeout_ms: 300,
        ..Limits::default()
    }
}

#[tokio::test]
async fn header_limits_answer_431_with_a_reason() {
    let addr = server(small_limits()).await;
    let big = format!(
        "GET / HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\n\r\n",
        "a".repeat(9000)
    );
    let answer = exchange(addr, big.as_bytes()).await;
    assert_eq!(status_of(&answer), 431, "{answer}");
    assert!(
        answer.contains("\"error\":\"header_too_large\""),
        "{answer}"
    );

    let mut many = String::from("GET / HTTP/1.1\r\nHost: a\r\n");
    for index in 0..25 {
        many.push_str(&format!("X-H{index}: v\r\n"));
    }
    many.push_str("\r\n");
    let answer = exchange(addr, many.as_bytes()).await;
    assert_eq!(status_of(&answer), 431, "{answer}");
    assert!(
        answer.contains("\"error\":\"too_many_headers\""),
        "{answer}"
    );

    // Just under both limits is fine.
    let mut fits = String::from("GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n");
    for index in 0..15 {
        fits.push_str(&format!("X-H{index}: {}\r\n", "v".repeat(100)));
    }
    fits.push_str("\r\n");
    let answer = exchange(addr, fits.as_bytes()).await;
    assert_eq!(status_of(&answer), 200, "{answer}");
}

#[tokio::test]
async fn a_silent_connection_is_closed_and_a_stalled_head_gets_408() {
    let addr = server(small_limits()).await;
    // Silent from the start: closed without an answer.
    let started = Instant::now();
    let answer = exchange(addr, b"").await;
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(250) && elapsed < Duration::from_secs(2),
        "closed after {elapsed:?}: {answer:?}"
    );
    assert_eq!(answer, "");
    // A head that starts and stalls: answered.
    let started = Instant::now();
    let answer = exchange(addr, b"GET / HTTP/1.1\r\nHost: a\r\n").await;
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(status_of(&answer), 408, "{answer}");
    assert!(answer.contains("\"error\":\"header_timeout\""), "{answer}");
}

#[tokio::test]
async fn over_limit_connections_get_503() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let limiter = ConnectionLimiter::new(1);
    let mut registry = prometheus_client::registry::Registry::default();
    limiter.register(&mut registry);
    let open_connections = move || {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(text.contains("proxy_connections_max 1"), "{text}");
        text.lines()
            .find_map(|line| line.strip_prefix("proxy_connections_open "))
            .map(|value| value.to_string())
            .unwrap_or_else(|| panic!("no proxy_connections_open in {text}"))
    };
    assert_eq!(open_connections(), "0");
    tokio::spawn(async move {
        while let Ok((stream, peer)) = listener.accept().await {
            match limiter.try_acquire(peer) {
                Ok(permit) => {
                    tokio::spawn(async move {
                        let connection = hyper::server::conn::http1::Builder::new()
                            .serve_connection(
                                TokioIo::new(stream),
                                hyper::service::service_fn(handle),
                            );
                        let _ = connection.await;
                        drop(permit);
                    });
                }
                Err(refusal) => refuse_connection(stream, &refusal).await,
            }
        }
    });
    let mut held = TcpStream::connect(addr).await.unwrap();
    held.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let mut first = [0u8; 12];
    held.read_exact(&mut first).await.unwrap();
    assert_eq!(&first, b"HTTP/1.1 200");
    let answer = exchange(addr, NORMAL).await;
    assert_eq!(status_of(&answer), 503, "{answer}");
    assert!(answer.contains("too_many_connections"), "{answer}");
    assert_eq!(
        open_connections(),
        "1",
        "the held connection, not the refused one"
    );
    drop(held);
    // The slot frees once the held connection ends.
    let mut answer = String::new();
    for _ in 0..50 {
        answer = exchange(addr, NORMAL).await;
        if status_of(&answer) == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(status_of(&answer), 200, "{answer}");
}
