//! Serving HTTP (1.1 and 2, over TLS or plain) with graceful shutdown, and the admin endpoint
//! every component exposes (`/healthz`, `/metrics`).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::{Body, Incoming};
use hyper::service::Service;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use rustls::pki_types::CertificateDer;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::proxy_config::Limits;
use crate::telemetry::Metrics;

mod guard;
pub mod proxy_protocol;

pub use guard::{GuardSettings, Http1Guard, LINGER_BYTES, LINGER_TIME, MAX_HEADER_COUNT};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How long a TLS handshake may take before the connection is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Tells servers and background tasks to stop. Cloned freely; fired once.
#[derive(Clone)]
pub struct Shutdown {
    receiver: watch::Receiver<bool>,
}

pub struct ShutdownTrigger {
    sender: watch::Sender<bool>,
}

pub fn shutdown_channel() -> (ShutdownTrigger, Shutdown) {
    let (sender, receiver) = watch::channel(false);
    (ShutdownTrigger { sender }, Shutdown { receiver })
}

impl ShutdownTrigger {
    pub fn fire(&self) {
        let _ = self.sender.send(true);
    }
}

impl Shutdown {
    /// Resolves once shutdown is fired (or the trigger is dropped).
    pub async fn wait(&mut self) {
        let _ = self.receiver.wait_for(|fired| *fired).await;
    }

    /// A future that resolves once shutdown is fired, for servers that take one.
    pub fn fired(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut shutdown = self.clone();
        async move { shutdown.wait().await }
    }

    pub fn is_fired(&self) -> bool {
        *self.receiver.borrow()
    }
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn termination_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// What serves one connection's requests: a hyper service whose futures and body can move
/// between threads. Implemented for every such service; it names the bounds once for the
/// serving functions below.
pub trait ConnectionService:
    Service<
        Request<Incoming>,
        Response = Response<Self::ResponseBody>,
        Future: Send + 'static,
        Error: Into<BoxError>,
    > + Send
    + 'static
{
    type ResponseBody: Body<Data: Send, Error: Into<BoxError>> + Send + 'static;
}

impl<S, B> ConnectionService for S
where
    S: Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body<Data: Send, Error: Into<BoxError>> + Send + 'static,
{
    type ResponseBody = B;
}

/// Accepts connections until shutdown, serving each with the service `make_service` builds for
/// the peer address; then lets open connections finish for up to `drain`.
pub async fn serve<M, S>(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    make_service: M,
    shutdown: Shutdown,
    drain: Duration,
) where
    M: Fn(SocketAddr) -> S + Send + Sync + 'static,
    S: ConnectionService,
{
    serve_limited(
        listener,
        tls,
        make_service,
        shutdown,
        drain,
        None,
        Unlimited,
    )
    .await
}

/// Whether a new connection is served: a permit held for the connection's life, or a refusal.
/// The proxy's connection limiter implements it; core cannot know its refusal type.
pub trait Admission: Send + Sync + 'static {
    type Permit: Send + 'static;
    /// `None` refuses the connection (the implementation logs why).
    fn admit(&self, peer: SocketAddr) -> Option<Self::Permit>;
    /// Answers a refused plain-HTTP connection before it is closed (TLS ones are just closed).
    fn refuse(&self, stream: TcpStream) -> impl Future<Output = ()> + Send + 'static;
}

/// Admits every connection ([`serve`]).
struct Unlimited;

impl Admission for Unlimited {
    type Permit = ();

    fn admit(&self, _peer: SocketAddr) -> Option<()> {
        Some(())
    }

    fn refuse(&self, _stream: TcpStream) -> impl Future<Output = ()> + Send + 'static {
        std::future::ready(())
    }
}

/// [`serve`] under a proxy listener's [`Limits`] (the defaults if none are given): the HTTP/1.1
/// front guard (header size and count, framing checks, header and idle timeouts, answered
/// refusals and lingering close: see [`Http1Guard`]), the HTTP/2 header list limit, and each
/// connection admitted by `admission` (max connections).
/// Body size and request timeout are the service's to enforce, since it answers for them.
pub async fn serve_limited<M, S, A>(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    make_service: M,
    shutdown: Shutdown,
    drain: Duration,
    limits: Option<&Limits>,
    admission: A,
) where
    M: Fn(SocketAddr) -> S + Send + Sync + 'static,
    S: ConnectionService,
    A: Admission,
{
    let default_limits;
    let limits = match limits {
        Some(limits) => limits,
        None => {
            default_limits = Limits::default();
            &default_limits
        }
    };
    let mut builder = auto::Builder::new(TokioExecutor::new());
    limits.apply_auto(&mut builder);
    let connections = Connections {
        builder,
        guard: Some(Arc::new(GuardSettings::from(limits))),
        proxy_protocol_from: limits.proxy_protocol_from.clone().into(),
        proxy_protocol_timeout: limits.header_timeout(),
    };
    serve_with(
        listener,
        tls,
        move |peer: &Peer| make_service(peer.addr),
        shutdown,
        drain,
        connections,
        admission,
    )
    .await
}

/// How often an idle HTTP/2 connection is pinged, and how long the answer may take before the
/// connection is closed ([`serve_http2`]).
#[derive(Clone, Copy, Debug)]
pub struct KeepAlive {
    pub interval: Duration,
    pub timeout: Duration,
}

impl Default for KeepAlive {
    /// A ping every 10 s, answered within 5 s: a peer that vanished without closing is noticed
    /// within 15 s. Causeway's gRPC servers (Pricing, the broker) use these.
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(10),
            timeout: Duration::from_secs(5),
        }
    }
}

/// [`serve`] for a protocol that runs only over HTTP/2 (gRPC): a connection that does not start
/// with the HTTP/2 preface is refused, and idle connections are pinged as `keep_alive` says, so
/// that a peer that vanished without closing is noticed.
pub async fn serve_http2<M, S>(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    make_service: M,
    shutdown: Shutdown,
    drain: Duration,
    keep_alive: KeepAlive,
) where
    M: Fn(SocketAddr) -> S + Send + Sync + 'static,
    S: ConnectionService,
{
    serve_http2_with_peer(
        listener,
        tls,
        move |peer: &Peer| make_service(peer.addr),
        shutdown,
        drain,
        keep_alive,
    )
    .await
}

/// [`serve_http2`] for a service that needs to know who connected: it is built after the TLS
/// handshake, from the [`Peer`] with the client's certificate chain (mutual TLS).
pub async fn serve_http2_with_peer<M, S>(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    make_service: M,
    shutdown: Shutdown,
    drain: Duration,
    keep_alive: KeepAlive,
) where
    M: Fn(&Peer) -> S + Send + Sync + 'static,
    S: ConnectionService,
{
    let mut builder = auto::Builder::new(TokioExecutor::new()).http2_only();
    builder
        .http2()
        .timer(hyper_util::rt::TokioTimer::new())
        .keep_alive_interval(keep_alive.interval)
        .keep_alive_timeout(keep_alive.timeout);
    serve_with(
        listener,
        tls,
        make_service,
        shutdown,
        drain,
        Connections::plain(builder),
        Unlimited,
    )
    .await
}

/// Who is on the other end of a connection, as the listener knows it before the first request.
#[derive(Clone, Debug)]
pub struct Peer {
    /// The client's address (from the PROXY protocol header where the listener reads one).
    pub addr: SocketAddr,
    /// The chain the client presented in the TLS handshake, leaf first, already verified by the
    /// acceptor's client verifier; empty where no client certificate was asked for or given.
    pub certificates: Vec<CertificateDer<'static>>,
}

impl Peer {
    fn plain(addr: SocketAddr) -> Self {
        Self {
            addr,
            certificates: Vec::new(),
        }
    }
}

/// How a serving function's connections are served.
struct Connections {
    /// hyper's, configured by the serving function.
    builder: auto::Builder<TokioExecutor>,
    /// The HTTP/1.1 front guard's settings, where HTTP/1.1 is served behind it.
    guard: Option<Arc<GuardSettings>>,
    /// Sources whose connections may start with a PROXY protocol v2 header (none: not read).
    proxy_protocol_from: Arc<[ipnet::IpNet]>,
    proxy_protocol_timeout: Duration,
}

impl Connections {
    fn plain(builder: auto::Builder<TokioExecutor>) -> Self {
        Self {
            builder,
            guard: None,
            proxy_protocol_from: Arc::from([]),
            proxy_protocol_timeout: HANDSHAKE_TIMEOUT,
        }
    }
}

/// The accept loop every serving function shares. Each connection's service is made for its
/// client's address: the peer's, or the one a trusted balancer's PROXY protocol header names.
async fn serve_with<M, S, A>(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    make_service: M,
    mut shutdown: Shutdown,
    drain: Duration,
    connections: Connections,
    admission: A,
) where
    M: Fn(&Peer) -> S + Send + Sync + 'static,
    S: ConnectionService,
    A: Admission,
{
    let graceful = GracefulShutdown::new();
    let make_service = Arc::new(make_service);
    let builder = Arc::new(connections.builder);
    let (guard, proxy_protocol_from) = (connections.guard, connections.proxy_protocol_from);
    let proxy_protocol_timeout = connections.proxy_protocol_timeout;
    while let Some((mut stream, peer)) = accept(&listener, &mut shutdown).await {
        let Some(permit) = admission.admit(peer) else {
            if tls.is_none() {
                // Answered off the accept loop: a slow client must not hold up the others.
                tokio::spawn(admission.refuse(stream));
            }
            continue;
        };
        let make_service = make_service.clone();
        let builder = builder.clone();
        let tls = tls.clone();
        let guard = guard.clone();
        let proxy_protocol_from = proxy_protocol_from.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let _permit = permit;
            let peer = if proxy_protocol_from.is_empty() {
                peer
            } else {
                match proxy_protocol::client_address(
                    &mut stream,
                    peer,
                    &proxy_protocol_from,
                    proxy_protocol_timeout,
                )
                .await
                {
                    Ok(client) => client,
                    Err(err) => {
                        tracing::warn!(
                            event = "proxy.refused",
                            reason = err.reason(),
                            %peer,
                            detail = %err,
                            "connection refused"
                        );
                        return;
                    }
                }
            };
            let result = match (tls, guard) {
                (Some(acceptor), guard) => {
                    let tls_stream = match tokio::time::timeout(
                        HANDSHAKE_TIMEOUT,
                        acceptor.accept(stream),
                    )
                    .await
                    {
                        Ok(Ok(tls_stream)) => tls_stream,
                        Ok(Err(err)) => {
                            tracing::info!(%peer, error = %err, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::info!(%peer, "TLS handshake timed out");
                            return;
                        }
                    };
                    let certificates = tls_stream
                        .get_ref()
                        .1
                        .peer_certificates()
                        .map(|chain| chain.iter().map(|cert| cert.clone().into_owned()).collect())
                        .unwrap_or_default();
                    let service = make_service(&Peer {
                        addr: peer,
                        certificates,
                    });
                    match guard {
                        Some(settings) => {
                            let h2 = tls_stream.get_ref().1.alpn_protocol() == Some(b"h2");
                            let io = if h2 {
                                Http1Guard::opaque(tls_stream, peer, settings)
                            } else {
                                Http1Guard::new(tls_stream, peer, settings)
                            };
                            let connection = builder
                                .serve_connection_with_upgrades(TokioIo::new(io), service)
                                .into_owned();
                            watcher.watch(connection).await
                        }
                        None => {
                            let connection = builder
                                .serve_connection_with_upgrades(TokioIo::new(tls_stream), service)
                                .into_owned();
                            watcher.watch(connection).await
                        }
                    }
                }
                (None, Some(settings)) => {
                    let service = make_service(&Peer::plain(peer));
                    let io = Http1Guard::new(stream, peer, settings);
                    let connection = builder
                        .serve_connection_with_upgrades(TokioIo::new(io), service)
                        .into_owned();
                    watcher.watch(connection).await
                }
                (None, None) => {
                    let service = make_service(&Peer::plain(peer));
                    let connection = builder
                        .serve_connection_with_upgrades(TokioIo::new(stream), service)
                        .into_owned();
                    watcher.watch(connection).await
                }
            };
            if let Err(err) = result {
                tracing::debug!(%peer, error = %err, "connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(drain, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("connections still open after the drain period; closing them");
    }
}

/// The next connection (with `TCP_NODELAY` set), or `None` once shutdown fires.
pub async fn accept(
    listener: &TcpListener,
    shutdown: &mut Shutdown,
) -> Option<(tokio::net::TcpStream, SocketAddr)> {
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    return Some((stream, peer));
                }
                Err(err) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = shutdown.wait() => return None,
        }
    }
}

/// Binds `addr`, naming it in the error so that "address in use" says which address.
pub async fn bind(what: &str, addr: SocketAddr) -> Result<TcpListener, std::io::Error> {
    TcpListener::bind(addr).await.map_err(|err| {
        std::io::Error::new(
            err.kind(),
            format!("cannot listen on {addr} for {what}: {err}"),
        )
    })
}

/// Builds a response with a JSON body.
pub fn json_response(status: StatusCode, body: &impl serde::Serialize) -> Response<Full<Bytes>> {
    let bytes = serde_json::to_vec(body).unwrap_or_else(|_| b"{}".to_vec());
    let mut response = Response::new(Full::new(Bytes::from(bytes)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response
}

/// The error body every Causeway API answers with.
pub fn error_response(
    status: StatusCode,
    code: &str,
    message: impl Into<String>,
    request_id: Option<&str>,
) -> Response<Full<Bytes>> {
    json_response(
        status,
        &crate::registry_api::ErrorBody {
            error: code.to_string(),
            message: message.into(),
            request_id: request_id.map(str::to_owned),
        },
    )
}

/// Serves `/healthz` and `/metrics` on a plain-HTTP admin listener until shutdown.
pub fn serve_admin(
    listener: TcpListener,
    instance: String,
    metrics: Arc<Metrics>,
    shutdown: Shutdown,
) -> impl Future<Output = ()> {
    let make_service = move |_peer| {
        let metrics = metrics.clone();
        let instance = instance.clone();
        hyper::service::service_fn(move |request: Request<Incoming>| {
            let response = admin_response(&request, &instance, &metrics);
            async move { Ok::<_, Infallible>(response) }
        })
    };
    serve(
        listener,
        None,
        make_service,
        shutdown,
        Duration::from_secs(1),
    )
}

fn admin_response(
    request: &Request<Incoming>,
    instance: &str,
    metrics: &Metrics,
) -> Response<Full<Bytes>> {
    match request.uri().path() {
        "/healthz" => json_response(
            StatusCode::OK,
            &serde_json::json!({ "status": "ok", "instance": instance, "pid": std::process::id() }),
        ),
        "/metrics" => {
            let mut response = Response::new(Full::new(Bytes::from(metrics.render())));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            response
        }
        path => error_response(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no admin endpoint {path}; try /healthz or /metrics"),
            None,
        ),
    }
}

/// Listeners for [`serve_per_core`]: `workers` sockets bound to the same address with
/// `SO_REUSEPORT`, so that the kernel spreads new connections over them (nginx's
/// `listen ... reuseport`). Port 0 picks one free port for all of them.
///
/// The address is first bound once without `SO_REUSEPORT` and released: another process already
/// listening there (a stale instance, say) still gives "address in use" instead of silently
/// sharing the port.
pub fn bind_per_core(
    what: &str,
    addr: SocketAddr,
    workers: usize,
) -> Result<Vec<std::net::TcpListener>, std::io::Error> {
    let named = |err: std::io::Error| {
        std::io::Error::new(
            err.kind(),
            format!("cannot listen on {addr} for {what}: {err}"),
        )
    };
    let addr = {
        let probe = std::net::TcpListener::bind(addr).map_err(named)?;
        probe.local_addr()?
    };
    (0..workers.max(1))
        .map(|_| {
            let socket = match addr {
                SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
                SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
            }?;
            socket.set_reuseaddr(true)?;
            #[cfg(unix)]
            socket.set_reuseport(true)?;
            socket.bind(addr)?;
            let listener = socket.listen(1024)?;
            listener.into_std()
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(named)
}

/// The number of workers when none is configured: one per core this process may use.
pub fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

/// Serving threads started by [`serve_per_core`].
pub struct PerCore {
    threads: Vec<std::thread::JoinHandle<()>>,
    done: watch::Receiver<usize>,
}

impl PerCore {
    /// Resolves once every worker has stopped serving (after shutdown and its drain) and its
    /// runtime has been dropped. Callable from any runtime.
    pub async fn finished(mut self) {
        let workers = self.threads.len();
        let _ = self.done.wait_for(|stopped| *stopped >= workers).await;
        // The threads have left their runtimes by now; joining only reaps them.
        for thread in self.threads.drain(..) {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }

    /// Blocks the calling thread until every worker has stopped (for callers without a runtime).
    pub fn join(self) {
        for thread in self.threads {
            let _ = thread.join();
        }
    }
}

/// nginx's model: one thread per listener, each with its own single-threaded tokio runtime, each
/// running `serve_one(worker_index, listener)` (typically [`serve`] or [`serve_limited`] with a
/// clone of the same shutdown and the same shared service state). A connection stays on the
/// thread that accepted it, with no work stealing and no cross-thread wake-ups for its own I/O.
///
/// What a request spawns (upstream connection tasks, say) runs on its worker's runtime. Every
/// runtime is kept running until all workers have finished serving, so that state shared between
/// workers (a connection pool whose connections belong to another worker's runtime) stays usable
/// while the others drain.
pub fn serve_per_core<F, Fut>(
    name: &str,
    listeners: Vec<std::net::TcpListener>,
    serve_one: F,
) -> Result<PerCore, std::io::Error>
where
    F: Fn(usize, TcpListener) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + 'static,
{
    let serve_one = Arc::new(serve_one);
    let workers = listeners.len();
    let (done_sender, done) = watch::channel(0usize);
    let done_sender = Arc::new(done_sender);
    // Everything that can fail before the first thread starts serving.
    let runtimes = listeners
        .into_iter()
        .map(|listener| {
            listener.set_nonblocking(true)?;
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            Ok((listener, runtime))
        })
        .collect::<Result<Vec<_>, std::io::Error>>()?;
    let mut threads = Vec::with_capacity(workers);
    for (index, (listener, runtime)) in runtimes.into_iter().enumerate() {
        let serve_one = serve_one.clone();
        let thread_done = done_sender.clone();
        let mut all_done = done.clone();
        let thread = std::thread::Builder::new()
            .name(format!("{name}-{index}"))
            .spawn(move || {
                runtime.block_on(async move {
                    match TcpListener::from_std(listener) {
                        Ok(listener) => serve_one(index, listener).await,
                        Err(err) => tracing::error!(worker = index, error = %err, "cannot serve"),
                    }
                    thread_done.send_modify(|stopped| *stopped += 1);
                    let _ = all_done.wait_for(|stopped| *stopped >= workers).await;
                });
            });
        match thread {
            Ok(thread) => threads.push(thread),
            Err(err) => {
                // The workers already started serve until shutdown, then need not wait for
                // the ones that never started.
                done_sender.send_modify(|stopped| *stopped += workers - index);
                return Err(err);
            }
        }
    }
    Ok(PerCore { threads, done })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn per_core_workers_share_one_port_and_drain_on_shutdown() {
        let listeners = bind_per_core("test", ([127, 0, 0, 1], 0).into(), 2).unwrap();
        let addr = listeners[0].local_addr().unwrap();
        assert_eq!(listeners[1].local_addr().unwrap(), addr);
        // The port is taken for anyone outside the group.
        assert!(bind_per_core("test", addr, 1).is_err());
        let (trigger, shutdown) = shutdown_channel();
        let workers = serve_per_core("test-worker", listeners, move |worker, listener| {
            let make_service = move |_peer| {
                hyper::service::service_fn(move |_request| async move {
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(worker.to_string()))))
                })
            };
            serve(
                listener,
                None,
                make_service,
                shutdown.clone(),
                Duration::from_millis(200),
            )
        })
        .unwrap();
        for _ in 0..8 {
            let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            stream
                .write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
                .await
                .unwrap();
            let mut answer = String::new();
            stream.read_to_string(&mut answer).await.unwrap();
            assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        }
        trigger.fire();
        tokio::time::timeout(Duration::from_secs(5), workers.finished())
            .await
            .expect("workers stop after shutdown");
        assert!(tokio::net::TcpStream::connect(addr).await.is_err());
    }
}
