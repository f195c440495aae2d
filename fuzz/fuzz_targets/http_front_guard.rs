//! The HTTP/1.1 front guard every listener reads request heads through: any byte stream, cut
//! into reads of any sizes, is passed on (a checked head, a framed body) or refused, never
//! panics, and never hands on more bytes than arrived.
#![no_main]

use std::io;
use std::pin::Pin;
use std::sync::{Arc, LazyLock};
use std::task::{Context, Poll};
use std::time::Duration;

use causeway_core::proxy_config::Limits;
use causeway_core::serve::{GuardSettings, Http1Guard};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

/// The peer: its bytes in reads of the sizes the input's first bytes choose; what is written
/// back is kept (and counted).
struct Peer {
    data: Vec<u8>,
    offset: usize,
    sizes: Vec<usize>,
    turn: usize,
    written: usize,
}

impl AsyncRead for Peer {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let size = self.sizes[self.turn % self.sizes.len()];
        self.turn += 1;
        let end = (self.offset + size).min(self.data.len());
        let n = (end - self.offset).min(buf.remaining());
        let start = self.offset;
        buf.put_slice(&self.data[start..start + n]);
        self.offset += n;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Peer {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.written += buf.len();
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

static RUNTIME: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a runtime")
});

static SETTINGS: LazyLock<Arc<GuardSettings>> = LazyLock::new(|| {
    let limits = Limits {
        max_header_bytes: 8192,
        max_header_count: 32,
        ..Limits::default()
    };
    Arc::new(GuardSettings::from(&limits))
});

libfuzzer_sys::fuzz_target!(|input: &[u8]| {
    let (sizes, data) = input.split_at(input.len().min(4));
    let sizes: Vec<usize> = sizes.iter().map(|&b| usize::from(b).max(1)).collect();
    let sizes = if sizes.is_empty() { vec![4096] } else { sizes };
    let peer = Peer {
        data: data.to_vec(),
        offset: 0,
        sizes,
        turn: 0,
        written: 0,
    };
    RUNTIME.block_on(async {
        let mut guard = Http1Guard::new(peer, "127.0.0.1:1".parse().unwrap(), SETTINGS.clone());
        let mut passed = 0;
        let mut buf = [0u8; 1024];
        loop {
            match tokio::time::timeout(Duration::from_secs(60), guard.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
                Ok(Ok(n)) => passed += n,
            }
            assert!(
                passed <= data.len(),
                "{passed} bytes passed on of {}",
                data.len()
            );
        }
        // An answer (hyper's, or the guard's refusal) goes out and the connection closes.
        let _ = guard
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
            .await;
        let _ = guard.shutdown().await;
    });
});
