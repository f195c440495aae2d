//! Coalesced writes for HTTP/2 client connections: a request's HEADERS and DATA leave in one write.
//!
//! hyper's HTTP/2 client writes a request in two steps. The connection task opens the stream,
//! writes its HEADERS frame and flushes; only then does h2 give the new stream send window, which
//! wakes the task that pipes the body, and the DATA frame goes out on the connection task's next
//! poll. Over TLS that is two records and two `write`s per call, and the server wakes and reads
//! twice before it can answer a unary gRPC call (measured with `strace` in `docs/benchmarks.md`).
//!
//! [`CoalescedWrites`] sits between hyper and the TLS stream. Writes are collected in a buffer;
//! a flush first gives up its turn once (it wakes its own task and returns `Pending`, so the
//! task goes to the back of the run queue, behind the body task that the same poll woke), so the
//! body task can hand its DATA frame to the connection, and then writes everything collected as
//! one. The cost is one more poll of the connection task per flush; nothing waits on a timer, so
//! a lone frame is delayed by one scheduler turn, not by a Nagle-style interval. The turn is not
//! `tokio::task::yield_now`: that defers the wake-up until the worker has polled its I/O driver,
//! one more `epoll_wait` per flush (`strace` of `causeway bench grpc` at one caller: 4.7 per call
//! with it, 3.8 without). On a runtime with one worker (the benchmarks') a request always leaves
//! in one write; with several, another worker can run the body task after the flush has gone
//! out, and such a request takes two writes as before. Written by hand because neither hyper nor
//! h2 offers it (they flush per poll) and no maintained crate provides a flush-deferring adapter.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The most bytes held before they are written without waiting for a flush.
const MAX_HELD: usize = 64 * 1024;

/// An I/O stream whose writes are held until a flush, and whose flush waits one scheduler turn
/// (see the module doc). Reads pass straight through.
pub struct CoalescedWrites<T> {
    io: T,
    held: Vec<u8>,
    /// How much of `held` has been written to `io`.
    written: usize,
    /// Whether a pending flush has given up its turn once already.
    turn_given: bool,
}

impl<T> CoalescedWrites<T> {
    pub fn new(io: T) -> Self {
        Self {
            io,
            held: Vec::new(),
            written: 0,
            turn_given: false,
        }
    }

    pub fn get_ref(&self) -> &T {
        &self.io
    }
}

impl<T: AsyncWrite + Unpin> CoalescedWrites<T> {
    /// Writes out everything held; a flush that comes later waits its own turn.
    fn poll_write_held(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.held.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.held[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        self.held.clear();
        self.written = 0;
        self.turn_given = false;
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for CoalescedWrites<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for CoalescedWrites<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.held.len() + buf.len() > MAX_HELD {
            ready!(this.poll_write_held(cx))?;
            if buf.len() > MAX_HELD {
                return Pin::new(&mut this.io).poll_write(cx, buf);
            }
        }
        this.held.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.held.is_empty() {
            return Pin::new(&mut this.io).poll_flush(cx);
        }
        if !this.turn_given {
            this.turn_given = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        ready!(this.poll_write_held(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_write_held(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use hyper::{Request, Response};
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use tokio::net::{TcpListener, TcpStream};

    use super::*;

    /// Counts the writes that reach the socket.
    struct CountingWrites {
        io: TcpStream,
        writes: Arc<AtomicUsize>,
    }

    impl AsyncRead for CountingWrites {
        fn poll_read(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for CountingWrites {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let this = self.get_mut();
            let written = Pin::new(&mut this.io).poll_write(cx, buf);
            if let Poll::Ready(Ok(_)) = written {
                this.writes.fetch_add(1, Ordering::SeqCst);
            }
            written
        }
        fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.get_mut().io).poll_flush(cx)
        }
        fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
        }
    }

    /// An h2c server that answers every request with the length of its body.
    async fn echo_length_server() -> std::net::SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let service = hyper::service::service_fn(|request: Request<_>| async move {
                    let body = http_body_util::BodyExt::collect(request.into_body()).await?;
                    let length = body.to_bytes().len().to_string();
                    Ok::<_, hyper::Error>(Response::new(Full::new(Bytes::from(length))))
                });
                tokio::spawn(
                    hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tcp), service),
                );
            }
        });
        addr
    }

    /// Socket writes per POST (after the handshake and a first request have settled), with or
    /// without the adapter.
    async fn writes_per_post(coalesce: bool) -> f64 {
        let addr = echo_length_server().await;
        let writes = Arc::new(AtomicUsize::new(0));
        let tcp = TcpStream::connect(addr).await.unwrap();
        tcp.set_nodelay(true).unwrap();
        let counting = CountingWrites {
            io: tcp,
            writes: writes.clone(),
        };
        let executor = TokioExecutor::new();
        let mut sender = if coalesce {
            let (sender, connection) = hyper::client::conn::http2::handshake(
                executor,
                TokioIo::new(CoalescedWrites::new(counting)),
            )
            .await
            .unwrap();
            tokio::spawn(connection);
            sender
        } else {
            let (sender, connection) =
                hyper::client::conn::http2::handshake(executor, TokioIo::new(counting))
                    .await
                    .unwrap();
            tokio::spawn(connection);
            sender
        };
        let mut post = async |body: &'static str| {
            sender.ready().await.unwrap();
            let request = Request::post("http://test/")
                .body(Full::new(Bytes::from_static(body.as_bytes())))
                .unwrap();
            let response = sender.send_request(request).await.unwrap();
            let length = response.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(length, body.len().to_string());
        };
        post("warm-up").await;
        // Let SETTINGS acknowledgements and window updates from the first exchange go out.
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let before = writes.load(Ordering::SeqCst);
        const POSTS: usize = 20;
        for _ in 0..POSTS {
            post("{\"sku\":\"SKU-1\"}").await;
        }
        (writes.load(Ordering::SeqCst) - before) as f64 / POSTS as f64
    }

    #[tokio::test]
    async fn a_request_with_a_body_leaves_in_one_write() {
        let plain = writes_per_post(false).await;
        let coalesced = writes_per_post(true).await;
        // Without the adapter hyper writes HEADERS and DATA separately (this checks the test
        // sees what the adapter is for); with it, one write per request.
        assert!(plain >= 1.9, "plain hyper: {plain} writes per request");
        assert!(
            coalesced <= 1.05,
            "coalesced: {coalesced} writes per request"
        );
    }

    /// With several workers another one can run the body task after the held flush has gone
    /// out, so some requests still take two writes (up to a third of them in runs here).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn coalescing_mostly_holds_on_a_multi_thread_runtime() {
        let coalesced = writes_per_post(true).await;
        assert!(coalesced < 1.7, "coalesced: {coalesced} writes per request");
    }

    #[tokio::test]
    async fn a_large_body_is_written_in_full() {
        let addr = echo_length_server().await;
        let tcp = TcpStream::connect(addr).await.unwrap();
        let (mut sender, connection) = hyper::client::conn::http2::handshake(
            TokioExecutor::new(),
            TokioIo::new(CoalescedWrites::new(tcp)),
        )
        .await
        .unwrap();
        tokio::spawn(connection);
        // Larger than the adapter holds and than the peer's initial window.
        let body = Bytes::from(vec![b'x'; 300 * 1024]);
        let request = Request::post("http://test/")
            .body(Full::new(body.clone()))
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        let length = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(length, body.len().to_string());
    }
}
