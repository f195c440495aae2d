//! The guard in front of a real server on 127.0.0.1, driven by a raw TCP client that sends
//! exactly the bytes each case needs.

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::*;
use crate::serve::{ShutdownTrigger, serve_limited, shutdown_channel};

struct Server {
    addr: SocketAddr,
    handled: Arc<AtomicUsize>,
    trigger: ShutdownTrigger,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    async fn stop(self) {
        self.trigger.fire();
        let _ = self.task.await;
    }
}

fn limits() -> Limits {
    Limits {
        max_header_bytes: 8192,
        max_header_count: 20,
        header_timeout_ms: 300,
        idle_timeout_ms: 600,
        ..Limits::default()
    }
}

/// Answers `/echo` with the request body's length and `/early-413` with a 413 without reading
/// the body; everything else with 200 and the path.
async fn start(limits: Limits) -> Server {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let handled = Arc::new(AtomicUsize::new(0));
    let counter = handled.clone();
    let (trigger, shutdown) = shutdown_channel();
    let task = tokio::spawn(async move {
        let make_service = move |_peer| {
            let counter = counter.clone();
            hyper::service::service_fn(move |request: Request<Incoming>| {
                let counter = counter.clone();
                async move {
                    counter.fetch_add(1, Ordering::SeqCst);
                    let path = request.uri().path().to_owned();
                    let response = match path.as_str() {
                        "/early-413" => {
                            // As a body limit does: read up to the limit, then answer.
                            let limited =
                                http_body_util::Limited::new(request.into_body(), 64 * 1024);
                            let _ = limited.collect().await;
                            let mut response = Response::new(Full::new(Bytes::from("too large")));
                            *response.status_mut() = StatusCode::PAYLOAD_TOO_LARGE;
                            response
                        }
                        "/echo" => {
                            let body = request.into_body().collect().await;
                            let len = body.map(|body| body.to_bytes().len()).unwrap_or(0);
                            Response::new(Full::new(Bytes::from(format!("len={len}"))))
                        }
                        _ => Response::new(Full::new(Bytes::from(path))),
                    };
                    Ok::<_, Infallible>(response)
                }
            })
        };
        serve_limited(
            listener,
            None,
            make_service,
            shutdown,
            Duration::from_secs(1),
            Some(&limits),
            crate::serve::Unlimited,
        )
        .await;
    });
    Server {
        addr,
        handled,
        trigger,
        task,
    }
}

/// Everything the server sends until it closes (bounded in time).
async fn read_all(stream: &mut TcpStream) -> std::io::Result<String> {
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut out))
        .await
        .map_err(|_| std::io::Error::other("the server did not close"))??;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

async fn exchange(addr: SocketAddr, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(request).await.expect("send");
    read_all(&mut stream).await.expect("answer")
}

fn json_error(answer: &str) -> serde_json::Value {
    let body = answer.rsplit("\r\n\r\n").next().unwrap_or_default();
    serde_json::from_str(body).unwrap_or_else(|err| panic!("not JSON ({err}): {answer:?}"))
}

#[tokio::test]
async fn content_length_with_transfer_encoding_is_refused_before_the_handler() {
    let server = start(limits()).await;
    let answer = exchange(
        server.addr,
        b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n\
          0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
    let error = json_error(&answer);
    assert_eq!(error["error"], "ambiguous_framing");
    // The same shape as every other refusal: with the id that the answer's header carries too.
    let request_id = error["request_id"].as_str().expect("a request id");
    assert!(
        answer.contains(&format!("x-request-id: {request_id}")),
        "{answer}"
    );
    assert_eq!(
        server.handled.load(Ordering::SeqCst),
        0,
        "nothing reached the handler"
    );
    // Either order of the two lines.
    let answer = exchange(
        server.addr,
        b"POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!(json_error(&answer)["error"], "ambiguous_framing");
    assert_eq!(server.handled.load(Ordering::SeqCst), 0);
    server.stop().await;
}

#[tokio::test]
async fn malformed_heads_get_the_json_error_shape() {
    let server = start(limits()).await;
    let cases: &[(&[u8], &str, &str)] = &[
        (
            b"GET / HTTP/1.1\r\nHo st: a\r\n\r\n",
            "400",
            "malformed_request",
        ),
        (
            b"GET / HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n",
            "400",
            "malformed_request",
        ),
        (
            b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: +5\r\n\r\n",
            "400",
            "invalid_content_length",
        ),
        (
            b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            "400",
            "conflicting_content_length",
        ),
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            "400",
            "unsupported_transfer_encoding",
        ),
        (
            b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
            "400",
            "transfer_encoding_in_http10",
        ),
    ];
    for (request, status, reason) in cases {
        let answer = exchange(server.addr, request).await;
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status} ")),
            "{request:?}: {answer}"
        );
        assert_eq!(json_error(&answer)["error"], *reason, "{request:?}");
    }
    let many: String = (0..30).map(|i| format!("x-{i}: v\r\n")).collect();
    let answer = exchange(
        server.addr,
        format!("GET / HTTP/1.1\r\nHost: a\r\n{many}\r\n").as_bytes(),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 431 "), "{answer}");
    assert_eq!(json_error(&answer)["error"], "too_many_headers");
    assert_eq!(server.handled.load(Ordering::SeqCst), 0);
    server.stop().await;
}

/// A client still sending a huge head when it is refused reads the 431, not a reset.
#[tokio::test]
async fn an_oversized_head_is_answered_while_the_client_is_still_sending() {
    let server = start(limits()).await;
    let mut stream = TcpStream::connect(server.addr).await.expect("connect");
    let filler = format!("x-filler: {}\r\n", "a".repeat(1000));
    let mut head = String::from("GET / HTTP/1.1\r\nHost: a\r\n");
    for _ in 0..300 {
        head.push_str(&filler);
    }
    // 300 kB: far more than the socket buffers hold, so the server answers mid-send.
    let _ = stream.write_all(head.as_bytes()).await;
    let answer = read_all(&mut stream)
        .await
        .expect("the answer, not a reset");
    assert!(answer.starts_with("HTTP/1.1 431 "), "{answer}");
    assert_eq!(json_error(&answer)["error"], "header_too_large");
    server.stop().await;
}

/// A handler that answers 413 once its body limit is reached: lingering close keeps the answer
/// while the client is still sending the rest.
#[tokio::test]
async fn an_early_answer_survives_an_unread_body() {
    let server = start(limits()).await;
    let mut stream = TcpStream::connect(server.addr).await.expect("connect");
    let body = vec![b'x'; 8 * 1024 * 1024];
    stream
        .write_all(
            format!(
                "POST /early-413 HTTP/1.1\r\nHost: a\r\nContent-Length: {}\r\n\r\n",
                body.len()
            )
            .as_bytes(),
        )
        .await
        .expect("head");
    let _ = stream.write_all(&body).await;
    let answer = read_all(&mut stream)
        .await
        .expect("the answer, not a reset");
    assert!(answer.starts_with("HTTP/1.1 413 "), "{answer}");
    server.stop().await;
}

#[tokio::test]
async fn a_slow_head_gets_408_and_a_silent_connection_is_closed() {
    let server = start(limits()).await;
    let started = Instant::now();
    let mut stream = TcpStream::connect(server.addr).await.expect("connect");
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: a\r\n")
        .await
        .expect("half a head");
    let answer = read_all(&mut stream).await.expect("answer");
    assert!(answer.starts_with("HTTP/1.1 408 "), "{answer}");
    assert_eq!(json_error(&answer)["error"], "header_timeout");
    assert!(started.elapsed() >= Duration::from_millis(300));

    let mut silent = TcpStream::connect(server.addr).await.expect("connect");
    let answer = read_all(&mut silent).await.expect("closed");
    assert_eq!(
        answer, "",
        "nothing to answer on a connection that said nothing"
    );
    assert_eq!(server.handled.load(Ordering::SeqCst), 0);
    server.stop().await;
}

/// Bodies of both framings are followed, so the next request on the connection is found and
/// checked: a good one is served, a bad pipelined one refused after the good answers.
#[tokio::test]
async fn keep_alive_requests_after_bodies_are_found_and_checked() {
    let server = start(limits()).await;
    let answer = exchange(
        server.addr,
        b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello\
          POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n\
          3;ext=1\r\nabc\r\n4\r\ndefg\r\n0\r\nx-trailer: t\r\n\r\n\
          \r\nGET /third HTTP/1.1\r\nHost: a\r\n\r\n\
          GET /fourth HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
    )
    .await;
    let statuses: Vec<&str> = answer
        .match_indices("HTTP/1.1 ")
        .map(|(at, _)| &answer[at + 9..at + 12])
        .collect();
    assert_eq!(statuses, ["200", "200", "200", "400"], "{answer}");
    assert!(answer.contains("len=5") && answer.contains("len=7") && answer.contains("/third"));
    assert_eq!(json_error(&answer)["error"], "conflicting_content_length");
    assert_eq!(server.handled.load(Ordering::SeqCst), 3);
    server.stop().await;
}

#[tokio::test]
async fn http2_with_prior_knowledge_passes_through() {
    let server = start(limits()).await;
    let stream = TcpStream::connect(server.addr).await.expect("connect");
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .expect("h2 handshake");
    tokio::spawn(connection);
    let request = Request::get("http://a/over-h2")
        .body(Full::new(Bytes::new()))
        .expect("request");
    let response = sender.send_request(request).await.expect("h2 answer");
    assert_eq!(response.status(), StatusCode::OK);
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    assert_eq!(&body[..], b"/over-h2");
    server.stop().await;
}

#[test]
fn chunked_bodies_are_followed_byte_by_byte_and_whole() {
    let body = b"a\r\n0123456789\r\n1;name=\"v\"\r\nx\r\n0\r\ntrailer: yes\r\n\r\nNEXT";
    let end = body.len() - 4;
    let mut whole = Chunked::default();
    assert!(matches!(whole.follow(body), Followed::End(n) if n == end));
    let mut trickled = Chunked::default();
    for (at, byte) in body[..end].iter().enumerate() {
        match trickled.follow(std::slice::from_ref(byte)) {
            Followed::More(1) => assert!(at + 1 < end),
            Followed::End(1) => assert_eq!(at + 1, end),
            _ => panic!("lost at byte {at}"),
        }
    }
    for broken in [
        &b"zz\r\n"[..],
        b"5\nhello",
        b"3\r\nabcX",
        b"1234567890abcdef0\r\n",
    ] {
        assert!(
            matches!(Chunked::default().follow(broken), Followed::Lost),
            "{broken:?}"
        );
    }
}

#[test]
fn the_head_end_is_found_across_fills() {
    assert_eq!(
        find_head_end(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", 0),
        Some(27)
    );
    assert_eq!(
        find_head_end(b"GET / HTTP/1.1\nHost: a\n\nrest", 0),
        Some(24)
    );
    assert_eq!(find_head_end(b"GET / HTTP/1.1\r\nHost: a\r\n\r", 0), None);
    assert_eq!(
        find_head_end(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", 23),
        Some(27)
    );
}
