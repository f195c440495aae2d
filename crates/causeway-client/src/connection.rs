//! One multiplexed HTTP/2-over-TLS connection per endpoint, opened on first use and replaced
//! when it closes (or HTTP/2 in the clear, for an app's calls to its own mesh sidecar on
//! loopback, which then carries them over mutual TLS). HTTP/2 lets every request pick its own endpoint without a pool of idle
//! HTTP/1.1 connections per endpoint.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::coalesce::CoalescedWrites;

/// Request bodies: buffered ones (retryable) and streamed ones (gRPC through the edge) alike.
pub type RequestBody = BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

pub type Sender = SendRequest<RequestBody>;

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum ConnectError {
    #[error("connect to {addr} failed: {message}")]
    Tcp { addr: SocketAddr, message: String },
    #[error("connect to {addr} timed out after {after:?}")]
    Timeout { addr: SocketAddr, after: Duration },
    #[error("TLS with {addr} as {server_name} failed: {message}")]
    Tls {
        addr: SocketAddr,
        server_name: String,
        message: String,
    },
    #[error("{addr} does not speak HTTP/2 (ALPN h2 not agreed)")]
    NoHttp2 { addr: SocketAddr },
    #[error("HTTP/2 handshake with {addr} failed: {message}")]
    Handshake { addr: SocketAddr, message: String },
}

type Slot = Arc<tokio::sync::Mutex<Option<Sender>>>;

pub struct Connections {
    /// None: HTTP/2 with prior knowledge over plain TCP.
    tls: Option<TlsConnector>,
    connect_timeout: Duration,
    slots: Mutex<HashMap<(String, SocketAddr), Slot>>,
}

impl Connections {
    pub fn new(tls: Arc<rustls::ClientConfig>, connect_timeout: Duration) -> Self {
        Self {
            tls: Some(TlsConnector::from(tls)),
            connect_timeout,
            slots: Mutex::new(HashMap::new()),
        }
    }

    /// Connections without TLS, for a peer on loopback that adds it (a mesh sidecar).
    pub fn plain(connect_timeout: Duration) -> Self {
        Self {
            tls: None,
            connect_timeout,
            slots: Mutex::new(HashMap::new()),
        }
    }

    /// A set with the same TLS settings and connect timeout and no connections yet (for a caller
    /// that keeps one set per thread, such as the proxy's per-core workers).
    pub fn empty_like(&self) -> Self {
        Self {
            tls: self.tls.clone(),
            connect_timeout: self.connect_timeout,
            slots: Mutex::new(HashMap::new()),
        }
    }

    /// A sender to `addr`, verified as `server_name`; the duration is set when a new connection
    /// had to be opened.
    pub async fn get(
        &self,
        server_name: &str,
        addr: SocketAddr,
    ) -> Result<(Sender, Option<Duration>), ConnectError> {
        let slot = {
            let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
            slots
                .entry((server_name.to_string(), addr))
                .or_default()
                .clone()
        };
        // Held across the connect, so that concurrent callers share one new connection.
        let mut slot = slot.lock().await;
        if let Some(sender) = slot.as_ref().filter(|sender| !sender.is_closed()) {
            return Ok((sender.clone(), None));
        }
        let started = Instant::now();
        let sender = self.connect(server_name, addr).await?;
        *slot = Some(sender.clone());
        Ok((sender, Some(started.elapsed())))
    }

    /// Forgets the connection to `addr` after a failure, so the next call opens a new one.
    pub fn discard(&self, server_name: &str, addr: SocketAddr) {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots.remove(&(server_name.to_string(), addr));
    }

    async fn connect(&self, server_name: &str, addr: SocketAddr) -> Result<Sender, ConnectError> {
        let timed_out = |_| ConnectError::Timeout {
            addr,
            after: self.connect_timeout,
        };
        let deadline = tokio::time::Instant::now() + self.connect_timeout;
        let tcp = tokio::time::timeout_at(deadline, TcpStream::connect(addr))
            .await
            .map_err(timed_out)?
            .map_err(|err| ConnectError::Tcp {
                addr,
                message: err.to_string(),
            })?;
        let _ = tcp.set_nodelay(true);
        let Some(connector) = &self.tls else {
            return Self::handshake(addr, tcp).await;
        };
        let tls_error = |message: String| ConnectError::Tls {
            addr,
            server_name: server_name.to_string(),
            message,
        };
        let name = ServerName::try_from(server_name.to_string())
            .map_err(|err| tls_error(err.to_string()))?;
        let tls = tokio::time::timeout_at(deadline, connector.connect(name, tcp))
            .await
            .map_err(timed_out)?
            .map_err(|err| tls_error(err.to_string()))?;
        if tls.get_ref().1.alpn_protocol() != Some(b"h2") {
            return Err(ConnectError::NoHttp2 { addr });
        }
        Self::handshake(addr, tls).await
    }

    async fn handshake<Io>(addr: SocketAddr, io: Io) -> Result<Sender, ConnectError>
    where
        Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5))
            .handshake(TokioIo::new(CoalescedWrites::new(io)))
            .await
            .map_err(|err| ConnectError::Handshake {
                addr,
                message: err.to_string(),
            })?;
        tokio::spawn(async move {
            if let Err(err) = connection.await {
                tracing::debug!(%addr, error = %err, "upstream connection closed with an error");
            }
        });
        Ok(sender)
    }
}
