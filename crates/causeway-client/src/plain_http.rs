//! Small plain-HTTP/1.1 requests to admin and registry endpoints on this machine (health checks,
//! registration, status), one connection per request.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

#[derive(Debug, thiserror::Error)]
pub enum PlainHttpError {
    #[error("{method} http://{addr}{path}: {message}")]
    Failed {
        method: Method,
        addr: SocketAddr,
        path: String,
        message: String,
    },
    #[error("{method} http://{addr}{path}: no answer within {timeout:?}")]
    Timeout {
        method: Method,
        addr: SocketAddr,
        path: String,
        timeout: Duration,
    },
}

/// Sends one request and reads the whole answer.
pub async fn request(
    method: Method,
    addr: SocketAddr,
    path: &str,
    json_body: Option<Vec<u8>>,
    timeout: Duration,
) -> Result<(StatusCode, Bytes), PlainHttpError> {
    let failed = |message: String| PlainHttpError::Failed {
        method: method.clone(),
        addr,
        path: path.to_string(),
        message,
    };
    let exchange = async {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|err| failed(err.to_string()))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|err| failed(err.to_string()))?;
        tokio::spawn(connection);
        let mut builder = Request::builder()
            .method(method.clone())
            .uri(path)
            .header(header::HOST, addr.to_string());
        if json_body.is_some() {
            builder = builder.header(header::CONTENT_TYPE, "application/json");
        }
        let request = builder
            .body(Full::new(Bytes::from(
                json_body.clone().unwrap_or_default(),
            )))
            .map_err(|err| failed(err.to_string()))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|err| failed(err.to_string()))?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|err| failed(err.to_string()))?
            .to_bytes();
        Ok((status, body))
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| PlainHttpError::Timeout {
            method: method.clone(),
            addr,
            path: path.to_string(),
            timeout,
        })?
}
