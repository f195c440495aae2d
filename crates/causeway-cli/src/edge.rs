//! A small HTTPS client for the edge, used by `causeway demo` and the integration tests: it
//! measures the connection's phases (TCP, TLS, time to headers) the way a client sees them.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

#[derive(Debug)]
pub struct EdgeResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub timings: EdgeTimings,
}

#[derive(Clone, Copy, Debug)]
pub struct EdgeTimings {
    pub tcp: Duration,
    pub tls: Duration,
    /// From sending the request to the response headers.
    pub to_headers: Duration,
    pub total: Duration,
}

impl EdgeResponse {
    pub fn json(&self) -> anyhow::Result<serde_json::Value> {
        serde_json::from_slice(&self.body).with_context(|| {
            format!(
                "answer is not JSON: {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

/// Sends one request over a new HTTP/1.1-over-TLS connection to `edge`, verifying the server as
/// `server_name` against the CA at `ca_path`.
pub async fn request(
    edge: SocketAddr,
    server_name: &str,
    ca_path: &Path,
    method: Method,
    path: &str,
    headers: HeaderMap,
    body: Bytes,
) -> anyhow::Result<EdgeResponse> {
    let started = Instant::now();
    let tcp = TcpStream::connect(edge)
        .await
        .with_context(|| format!("cannot connect to the edge at {edge}"))?;
    let _ = tcp.set_nodelay(true);
    let tcp_done = started.elapsed();
    let config = causeway_core::tls::client_config_with_alpn(ca_path, &[b"http/1.1"])?;
    let name = ServerName::try_from(server_name.to_string())
        .with_context(|| format!("{server_name} is not a valid server name"))?;
    let tls = TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .with_context(|| format!("TLS with the edge at {edge} failed"))?;
    let tls_done = started.elapsed();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .context("HTTP handshake with the edge failed")?;
    tokio::spawn(connection);
    let mut request = Request::builder()
        .method(method)
        .uri(path)
        .header(header::HOST, format!("{server_name}:{}", edge.port()))
        .body(Full::new(body))?;
    request.headers_mut().extend(headers);
    let sent = Instant::now();
    let response = sender
        .send_request(request)
        .await
        .context("the edge closed the connection without answering")?;
    let to_headers = sent.elapsed();
    let (parts, body) = response.into_parts();
    let body = body
        .collect()
        .await
        .context("reading the answer failed")?
        .to_bytes();
    Ok(EdgeResponse {
        status: parts.status,
        headers: parts.headers,
        body,
        timings: EdgeTimings {
            tcp: tcp_done,
            tls: tls_done - tcp_done,
            to_headers,
            total: started.elapsed(),
        },
    })
}

/// [`request`] to the API behind the edge as the holder of `token`, with `body` (if any) sent as
/// JSON; `headers` are sent too (a trace context, say).
pub async fn api_request(
    edge: SocketAddr,
    ca_path: &Path,
    token: &str,
    method: Method,
    path: &str,
    body: Option<&serde_json::Value>,
    mut headers: HeaderMap,
) -> anyhow::Result<EdgeResponse> {
    let bearer = http::HeaderValue::from_str(&format!("Bearer {token}"))
        .context("the token is not a valid header value")?;
    headers.insert(header::AUTHORIZATION, bearer);
    let body = match body {
        Some(body) => {
            headers.insert(
                header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            );
            Bytes::from(serde_json::to_vec(body)?)
        }
        None => Bytes::new(),
    };
    request(edge, "localhost", ca_path, method, path, headers, body).await
}
