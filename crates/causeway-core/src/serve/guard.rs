//! The HTTP/1.1 front guard: every request head on a connection is read, checked and, when it
//! is refused, answered here, before the server library sees a byte of it.
//!
//! Written by hand because hyper offers no hook for what it does with bad input: it answers
//! framing errors itself with a bare status line (no body, no log line), drops `Content-Length`
//! when `Transfer-Encoding` is present instead of refusing the request (RFC 9112 §6.3 allows a
//! server to refuse it, and a proxy that forwards such a request is a smuggling risk for the
//! next hop), closes a slow head without an answer, and closes a connection that still holds
//! unread request bytes, which makes the kernel reset it and the client often lose the answer.
//!
//! The guard sits between the socket (or TLS stream) and hyper and follows the connection's
//! message framing on the read side:
//! - A head is handed on only once it is complete and has passed the checks: parsed with
//!   httparse (the parser hyper uses, with the same settings, so whatever passes here parses
//!   there), within the header byte and line limits (431), a request target hyper accepts
//!   (414), one plain decimal `Content-Length` or a single `chunked` coding and never both (400).
//! - Its body is then passed through while counting it down (`Content-Length`) or following
//!   the chunked coding to its end, so the guard knows where the next head begins. A chunked
//!   body it cannot follow is passed on unexamined: hyper fails on it and closes.
//! - A head must arrive within the header timeout (from the connection's start for the first
//!   request, from its first byte for later ones): a partial head then gets 408; a connection
//!   that sends nothing is closed silently after the header timeout (first request) or the idle
//!   timeout (keep-alive, counted from the last byte written).
//! - An HTTP/2 preface (`PRI * HTTP/2.0`), and an upgrade once the answer is `101`, make the rest
//!   of the connection opaque.
//!
//! A refusal is logged once ([`Refusal::log`]), hyper reads an end of stream (hyper runs with
//! `half_close`, so a response still being written is finished first), and the JSON answer is
//! written when hyper shuts the connection down. Shutdown then lingers as nginx's lingering
//! close does: after the answer and the write side's FIN, up to [`LINGER_BYTES`] of unread
//! request bytes are read and discarded for at most [`LINGER_TIME`], so that the client reads
//! the answer (a 413, 431 or 400 sent while it was still sending) instead of a reset.

use std::io;
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker, ready};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use http::StatusCode;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use crate::proxy_config::Limits;
use crate::refusal::Refusal;

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// hyper answers longer request targets with 414; the guard does first.
const MAX_URI_LEN: usize = u16::MAX as usize - 1;
/// The most header lines a listener may be configured to accept (the parser's slots live on
/// the stack).
pub const MAX_HEADER_COUNT: usize = 256;
/// How long a closing connection's unread request bytes are drained after the answer.
pub const LINGER_TIME: Duration = Duration::from_secs(2);
/// How many unread request bytes a closing connection drains at most.
pub const LINGER_BYTES: usize = 1024 * 1024;
/// The longest chunk-size line or trailer line the guard follows.
const MAX_CHUNK_LINE: usize = 4096;
/// How much is read from the socket at a time while the guard buffers.
const READ_CHUNK: usize = 8 * 1024;

/// What the guard enforces, from a listener's [`Limits`].
#[derive(Clone, Debug)]
pub struct GuardSettings {
    pub max_header_bytes: usize,
    pub max_header_count: usize,
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
}

impl From<&Limits> for GuardSettings {
    fn from(limits: &Limits) -> Self {
        Self {
            max_header_bytes: limits.max_header_bytes,
            max_header_count: limits.max_header_count.min(MAX_HEADER_COUNT),
            header_timeout: limits.header_timeout(),
            idle_timeout: limits.idle_timeout(),
        }
    }
}

/// A connection's transport with the guard in front of it.
pub struct Http1Guard<T> {
    inner: T,
    peer: SocketAddr,
    settings: Arc<GuardSettings>,
    framing: Framing,
    /// Bytes read from the peer and not yet handed on.
    pending: BytesMut,
    /// How many of `pending`'s first bytes may be handed on (a checked head, body bytes).
    released: usize,
    /// Where the search for the end of the current head goes on in `pending`.
    scanned: usize,
    /// The header or idle deadline while a head is awaited; the linger deadline at close.
    timer: Pin<Box<Sleep>>,
    /// A head has begun to arrive: its header timer runs.
    head_started: bool,
    /// No message has been completed yet (the first head's timer runs from the start).
    first_message: bool,
    /// A head that asked for an upgrade was handed on; its answer's status decides what the
    /// following bytes are, so reading waits for it.
    upgrade_requested: bool,
    read_waker: Option<Waker>,
    /// The last time a byte was written: keep-alive idleness counts from there.
    last_write: Instant,
    /// The peer closed its side (nothing left to drain at close).
    peer_closed: bool,
    /// The answer to write when the connection closes.
    answer: Option<Vec<u8>>,
    /// The answer has been taken for writing.
    answered: bool,
    close: Close,
}

enum Framing {
    /// Waiting for a head: nothing is handed on until it is complete and checked.
    Head,
    /// The rest of a `Content-Length` body.
    Length(u64),
    Chunked(Chunked),
    /// Upgraded, HTTP/2, or a chunked body the guard could not follow: bytes pass unexamined.
    Opaque,
    /// Refused or timed out: hyper reads the end of the stream.
    Ended,
}

enum Close {
    Open,
    Answer { bytes: Vec<u8>, written: usize },
    Flush,
    Shutdown,
    Linger { budget: usize },
    Done,
}

/// What the head in `pending` amounts to so far.
enum Head {
    Incomplete,
    Accepted {
        len: usize,
        framing: Framing,
        upgrade: bool,
    },
    Http2,
    Refused(Refusal),
}

impl<T> Http1Guard<T> {
    pub fn new(inner: T, peer: SocketAddr, settings: Arc<GuardSettings>) -> Self {
        let now = Instant::now();
        let timer = Box::pin(tokio::time::sleep_until(now + settings.header_timeout));
        Self {
            inner,
            peer,
            settings,
            framing: Framing::Head,
            pending: BytesMut::new(),
            released: 0,
            scanned: 0,
            timer,
            head_started: false,
            first_message: true,
            upgrade_requested: false,
            read_waker: None,
            last_write: now,
            peer_closed: false,
            answer: None,
            answered: false,
            close: Close::Open,
        }
    }

    /// A transport the guard does not examine (HTTP/2 negotiated by ALPN).
    pub fn opaque(inner: T, peer: SocketAddr, settings: Arc<GuardSettings>) -> Self {
        let mut guard = Self::new(inner, peer, settings);
        guard.framing = Framing::Opaque;
        guard
    }

    fn end_of_message(&mut self) {
        self.framing = Framing::Head;
        self.head_started = false;
        self.first_message = false;
        self.scanned = 0;
    }

    fn refuse(&mut self, refusal: Refusal) {
        // No request was read, so none names an id: a fresh one ties the answer to the log line.
        let request_id = crate::trace_context::new_request_id();
        refusal.log(self.peer, Some(&request_id));
        self.answer = Some(refusal.to_http1_bytes(&request_id));
        self.framing = Framing::Ended;
    }

    /// The header or idle timer fired while a head was awaited.
    fn timed_out(&mut self) {
        if self.head_started {
            let limit = self.settings.header_timeout;
            self.refuse(
                Refusal::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "header_timeout",
                    format!(
                        "the request head did not arrive within {} ms",
                        limit.as_millis()
                    ),
                )
                .with_limit(limit.as_millis() as u64),
            );
        } else {
            tracing::debug!(peer = %self.peer, "idle connection closed");
            self.framing = Framing::Ended;
        }
    }

    /// Whether closing now may leave request bytes unread.
    fn may_hold_unread_bytes(&self) -> bool {
        if self.peer_closed {
            return false;
        }
        self.answered
            || !self.pending.is_empty()
            || !matches!(self.framing, Framing::Head | Framing::Ended)
    }

    fn inspect_head(&mut self) -> Head {
        // RFC 9112 §2.2: empty lines before the request line are ignored.
        let blank = self
            .pending
            .iter()
            .take_while(|&&byte| byte == b'\r' || byte == b'\n')
            .count();
        if blank > 0 {
            self.pending.advance(blank);
            self.scanned = self.scanned.saturating_sub(blank);
        }
        let bytes = &self.pending[..];
        if bytes.is_empty() {
            return Head::Incomplete;
        }
        if self.first_message {
            let n = bytes.len().min(H2_PREFACE.len());
            if bytes[..n] == H2_PREFACE[..n] {
                return if n == H2_PREFACE.len() {
                    Head::Http2
                } else {
                    Head::Incomplete
                };
            }
        }
        // Parse only once the head's end has arrived, so a trickled head costs linear time.
        let Some(end) = find_head_end(bytes, self.scanned) else {
            self.scanned = bytes.len().saturating_sub(3);
            return if bytes.len() > self.settings.max_header_bytes {
                Head::Refused(header_too_large(self.settings.max_header_bytes))
            } else {
                Head::Incomplete
            };
        };
        if end > self.settings.max_header_bytes {
            return Head::Refused(header_too_large(self.settings.max_header_bytes));
        }
        let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADER_COUNT];
        let slots = &mut slots[..self.settings.max_header_count];
        let mut request = httparse::Request::new(&mut []);
        match httparse::ParserConfig::default().parse_request_with_uninit_headers(
            &mut request,
            &bytes[..end],
            slots,
        ) {
            Ok(httparse::Status::Complete(len)) => match framing_of(&request) {
                Ok((framing, upgrade)) => Head::Accepted {
                    len,
                    framing,
                    upgrade,
                },
                Err(refusal) => Head::Refused(refusal),
            },
            // The end marker was inside something httparse reads differently: malformed.
            Ok(httparse::Status::Partial) => Head::Refused(Refusal::bad_request(
                "malformed_request",
                "the request head is malformed: it ends before its header section does",
            )),
            Err(httparse::Error::TooManyHeaders) => Head::Refused(
                Refusal::new(
                    StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                    "too_many_headers",
                    format!(
                        "a request may carry at most {} header lines",
                        self.settings.max_header_count
                    ),
                )
                .with_limit(self.settings.max_header_count as u64),
            ),
            Err(err) => Head::Refused(Refusal::bad_request(
                "malformed_request",
                format!("the request head is malformed: {err}"),
            )),
        }
    }
}

impl<T: AsyncRead + Unpin> Http1Guard<T> {
    /// Reads more from the peer into `pending`; the number of bytes (0 at the end of the stream).
    fn fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let start = self.pending.len();
        self.pending.resize(start + READ_CHUNK, 0);
        let mut read = ReadBuf::new(&mut self.pending[start..]);
        let result = Pin::new(&mut self.inner).poll_read(cx, &mut read);
        let n = read.filled().len();
        self.pending.truncate(start + n);
        ready!(result)?;
        if n == 0 {
            self.peer_closed = true;
        }
        Poll::Ready(Ok(n))
    }

    /// Reads straight into `buf`, at most `limit` bytes.
    fn read_into(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
        limit: usize,
    ) -> Poll<io::Result<usize>> {
        let room = buf.initialize_unfilled_to(limit.min(buf.remaining()));
        let mut read = ReadBuf::new(room);
        ready!(Pin::new(&mut self.inner).poll_read(cx, &mut read))?;
        let n = read.filled().len();
        buf.advance(n);
        if n == 0 {
            self.peer_closed = true;
        }
        Poll::Ready(Ok(n))
    }

    /// Waits for a complete head, checks it and decides what follows it.
    fn poll_head(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            match self.inspect_head() {
                Head::Accepted {
                    len,
                    framing,
                    upgrade,
                } => {
                    self.released = len;
                    self.framing = framing;
                    self.upgrade_requested = upgrade;
                    return Poll::Ready(Ok(()));
                }
                Head::Http2 => {
                    self.framing = Framing::Opaque;
                    return Poll::Ready(Ok(()));
                }
                Head::Refused(refusal) => {
                    self.refuse(refusal);
                    return Poll::Ready(Ok(()));
                }
                Head::Incomplete => {}
            }
            match self.fill(cx) {
                Poll::Ready(Ok(0)) => {
                    // The peer is gone; a partial head has nobody to answer.
                    self.framing = Framing::Ended;
                    return Poll::Ready(Ok(()));
                }
                Poll::Ready(Ok(_)) => {
                    if !self.head_started && self.pending.iter().any(|&b| b != b'\r' && b != b'\n')
                    {
                        self.head_started = true;
                        if !self.first_message {
                            let deadline = Instant::now() + self.settings.header_timeout;
                            self.timer.as_mut().reset(deadline);
                        }
                    }
                }
                Poll::Ready(Err(err)) => return Poll::Ready(Err(err)),
                Poll::Pending => {
                    if !self.first_message && !self.head_started {
                        // Idle keep-alive: counted from the last write, re-armed lazily.
                        let deadline = self.last_write + self.settings.idle_timeout;
                        if self.timer.deadline() != deadline {
                            self.timer.as_mut().reset(deadline);
                        }
                    }
                    ready!(self.timer.as_mut().poll(cx));
                    self.timed_out();
                    return Poll::Ready(Ok(()));
                }
            }
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Http1Guard<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if this.released > 0 {
                let n = this.released.min(buf.remaining());
                buf.put_slice(&this.pending[..n]);
                this.pending.advance(n);
                this.released -= n;
                this.scanned = 0;
                return Poll::Ready(Ok(()));
            }
            match &mut this.framing {
                Framing::Ended => return Poll::Ready(Ok(())),
                Framing::Opaque => {
                    if !this.pending.is_empty() {
                        this.released = this.pending.len();
                        continue;
                    }
                    return Pin::new(&mut this.inner).poll_read(cx, buf);
                }
                Framing::Length(0) => this.end_of_message(),
                Framing::Length(remaining) => {
                    if !this.pending.is_empty() {
                        let n = (this.pending.len() as u64).min(*remaining);
                        *remaining -= n;
                        this.released = n as usize;
                        continue;
                    }
                    let limit = usize::try_from(*remaining).unwrap_or(usize::MAX);
                    let n = ready!(this.read_into(cx, buf, limit))?;
                    if let Framing::Length(remaining) = &mut this.framing {
                        *remaining -= n as u64;
                    }
                    return Poll::Ready(Ok(()));
                }
                Framing::Chunked(_) => {
                    if this.pending.is_empty() && ready!(this.fill(cx))? == 0 {
                        return Poll::Ready(Ok(()));
                    }
                    let Framing::Chunked(chunked) = &mut this.framing else {
                        continue;
                    };
                    match chunked.follow(&this.pending) {
                        Followed::More(n) => this.released = n,
                        Followed::End(n) => {
                            this.released = n;
                            this.end_of_message();
                        }
                        Followed::Lost => {
                            this.released = this.pending.len();
                            this.framing = Framing::Opaque;
                        }
                    }
                }
                Framing::Head => {
                    if this.upgrade_requested {
                        // The answer decides whether what follows is HTTP at all.
                        this.read_waker = Some(cx.waker().clone());
                        return Poll::Pending;
                    }
                    ready!(this.poll_head(cx))?;
                }
            }
        }
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> Http1Guard<T> {
    /// Watches the answer to an upgrade request: `101` makes the connection opaque.
    fn saw_written(&mut self, first: &[u8]) {
        self.last_write = Instant::now();
        if !self.upgrade_requested || first.is_empty() {
            return;
        }
        if first.starts_with(b"HTTP/1.1 101") {
            self.framing = Framing::Opaque;
        } else if first.len() >= 10 && first.starts_with(b"HTTP/1.1 1") {
            // Another interim answer (100 Continue): the final one is still to come.
            return;
        }
        self.upgrade_requested = false;
        if let Some(waker) = self.read_waker.take() {
            waker.wake();
        }
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Http1Guard<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let written = ready!(Pin::new(&mut this.inner).poll_write(cx, buf))?;
        if written > 0 {
            this.saw_written(buf);
        }
        Poll::Ready(Ok(written))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let written = ready!(Pin::new(&mut this.inner).poll_write_vectored(cx, bufs))?;
        if written > 0 {
            let first = bufs.iter().find(|buf| !buf.is_empty());
            this.saw_written(first.map_or(&[][..], |buf| &buf[..]));
        }
        Poll::Ready(Ok(written))
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    /// Writes a refusal's answer, shuts the write side and lingers (see the module doc).
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            match &mut this.close {
                Close::Open => {
                    this.close = match this.answer.take() {
                        Some(bytes) => {
                            this.answered = true;
                            Close::Answer { bytes, written: 0 }
                        }
                        None => Close::Flush,
                    };
                }
                Close::Answer { bytes, written } => {
                    while *written < bytes.len() {
                        match ready!(Pin::new(&mut this.inner).poll_write(cx, &bytes[*written..])) {
                            Ok(0) | Err(_) => {
                                this.close = Close::Done;
                                return Poll::Ready(Ok(()));
                            }
                            Ok(n) => *written += n,
                        }
                    }
                    this.close = Close::Flush;
                }
                Close::Flush => {
                    ready!(Pin::new(&mut this.inner).poll_flush(cx))?;
                    this.close = Close::Shutdown;
                }
                Close::Shutdown => {
                    ready!(Pin::new(&mut this.inner).poll_shutdown(cx))?;
                    if this.may_hold_unread_bytes() {
                        this.timer.as_mut().reset(Instant::now() + LINGER_TIME);
                        this.close = Close::Linger {
                            budget: LINGER_BYTES,
                        };
                    } else {
                        this.close = Close::Done;
                    }
                }
                Close::Linger { budget } => {
                    if this.timer.as_mut().poll(cx).is_ready() {
                        this.close = Close::Done;
                        continue;
                    }
                    let mut scratch = [0u8; 4096];
                    let mut read = ReadBuf::new(&mut scratch);
                    match ready!(Pin::new(&mut this.inner).poll_read(cx, &mut read)) {
                        Ok(()) if !read.filled().is_empty() => {
                            *budget = budget.saturating_sub(read.filled().len());
                            if *budget == 0 {
                                this.close = Close::Done;
                            }
                        }
                        _ => this.close = Close::Done,
                    }
                }
                Close::Done => return Poll::Ready(Ok(())),
            }
        }
    }
}

fn header_too_large(limit: usize) -> Refusal {
    Refusal::new(
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        "header_too_large",
        format!("the request head may be at most {limit} bytes"),
    )
    .with_limit(limit as u64)
}

/// The length of the head in `bytes` up to and including its empty line, searching from `from`.
fn find_head_end(bytes: &[u8], from: usize) -> Option<usize> {
    let mut at = from;
    while let Some(offset) = bytes.get(at..)?.iter().position(|&b| b == b'\n') {
        let lf = at + offset;
        match bytes.get(lf + 1) {
            Some(b'\n') => return Some(lf + 2),
            Some(b'\r') if bytes.get(lf + 2) == Some(&b'\n') => return Some(lf + 3),
            _ => at = lf + 1,
        }
    }
    None
}

/// The body framing a checked head announces, and whether it may be answered with an upgrade.
fn framing_of(request: &httparse::Request<'_, '_>) -> Result<(Framing, bool), Refusal> {
    let http10 = request.version == Some(0);
    if request.path.is_some_and(|path| path.len() > MAX_URI_LEN) {
        return Err(Refusal::new(
            StatusCode::URI_TOO_LONG,
            "uri_too_long",
            format!("the request target may be at most {MAX_URI_LEN} bytes"),
        )
        .with_limit(MAX_URI_LEN as u64));
    }
    let mut length: Option<u64> = None;
    let mut chunked = false;
    let mut upgrade = request.method == Some("CONNECT");
    for header in request.headers.iter() {
        if header.name.eq_ignore_ascii_case("content-length") {
            let value = parse_length(header.value).ok_or_else(|| {
                Refusal::bad_request(
                    "invalid_content_length",
                    "Content-Length must be a plain decimal number",
                )
            })?;
            if length.is_some_and(|seen| seen != value) {
                return Err(Refusal::bad_request(
                    "conflicting_content_length",
                    "the request carries Content-Length lines that differ",
                ));
            }
            length = Some(value);
        } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
            if http10 {
                return Err(Refusal::bad_request(
                    "transfer_encoding_in_http10",
                    "HTTP/1.0 requests cannot carry Transfer-Encoding",
                ));
            }
            if chunked || !header.value.trim_ascii().eq_ignore_ascii_case(b"chunked") {
                return Err(Refusal::bad_request(
                    "unsupported_transfer_encoding",
                    "only a single `Transfer-Encoding: chunked` is accepted",
                ));
            }
            chunked = true;
        } else if header.name.eq_ignore_ascii_case("upgrade") && !http10 {
            upgrade = true;
        }
    }
    if chunked && length.is_some() {
        return Err(Refusal::bad_request(
            "ambiguous_framing",
            "a request may not carry both Content-Length and Transfer-Encoding (RFC 9112 §6.3)",
        ));
    }
    let framing = if chunked {
        Framing::Chunked(Chunked::default())
    } else {
        Framing::Length(length.unwrap_or(0))
    };
    Ok((framing, upgrade))
}

/// A `Content-Length` value: ASCII digits only (19 at most, so it fits), optional white space.
fn parse_length(value: &[u8]) -> Option<u64> {
    let digits = value.trim_ascii();
    if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// Where a chunked body (RFC 9112 §7.1) stands: enough to find its end, no more.
#[derive(Debug, Default)]
struct Chunked {
    state: ChunkState,
    /// Bytes of the current size or trailer line.
    line: usize,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    /// The chunk size's hex digits (`digits` so far, `size` their value).
    #[default]
    SizeStart,
    Size {
        size: u64,
        digits: u8,
    },
    /// After the size: white space, extensions, up to the CR.
    SizeRest {
        size: u64,
    },
    SizeLf {
        size: u64,
    },
    Data(u64),
    DataCr,
    DataLf,
    /// A trailer line (or the empty line that ends the body).
    Trailer,
    TrailerLf,
}

enum Followed {
    /// These many bytes belong to the body; it goes on.
    More(usize),
    /// The body ends after these many bytes.
    End(usize),
    /// The bytes are not a chunked body the guard can follow.
    Lost,
}

impl Chunked {
    fn follow(&mut self, bytes: &[u8]) -> Followed {
        let mut at = 0;
        while at < bytes.len() {
            if let ChunkState::Data(remaining) = self.state {
                let n = (bytes.len() - at).min(usize::try_from(remaining).unwrap_or(usize::MAX));
                at += n;
                let left = remaining - n as u64;
                self.state = if left == 0 {
                    ChunkState::DataCr
                } else {
                    ChunkState::Data(left)
                };
                continue;
            }
            let byte = bytes[at];
            at += 1;
            let line = self.line + 1;
            let (state, line) = match (self.state, byte) {
                (ChunkState::SizeStart, _) => match hex_value(byte) {
                    Some(value) => (
                        ChunkState::Size {
                            size: u64::from(value),
                            digits: 1,
                        },
                        line,
                    ),
                    None => return Followed::Lost,
                },
                (ChunkState::Size { size, digits }, _) if hex_value(byte).is_some() => {
                    if digits >= 15 {
                        return Followed::Lost;
                    }
                    let value = u64::from(hex_value(byte).unwrap_or(0));
                    (
                        ChunkState::Size {
                            size: size * 16 + value,
                            digits: digits + 1,
                        },
                        line,
                    )
                }
                (ChunkState::Size { size, .. } | ChunkState::SizeRest { size }, b'\r') => {
                    (ChunkState::SizeLf { size }, line)
                }
                (ChunkState::Size { size, .. }, b';' | b' ' | b'\t') => {
                    (ChunkState::SizeRest { size }, line)
                }
                (ChunkState::SizeRest { size }, byte) if byte != b'\n' => {
                    (ChunkState::SizeRest { size }, line)
                }
                (ChunkState::SizeLf { size: 0 }, b'\n') => (ChunkState::Trailer, 0),
                (ChunkState::SizeLf { size }, b'\n') => (ChunkState::Data(size), 0),
                (ChunkState::DataCr, b'\r') => (ChunkState::DataLf, 0),
                (ChunkState::DataLf, b'\n') => (ChunkState::SizeStart, 0),
                (ChunkState::Trailer, b'\r') => (ChunkState::TrailerLf, self.line),
                (ChunkState::Trailer, byte) if byte != b'\n' => (ChunkState::Trailer, line),
                (ChunkState::TrailerLf, b'\n') if self.line == 0 => {
                    *self = Self::default();
                    return Followed::End(at);
                }
                (ChunkState::TrailerLf, b'\n') => (ChunkState::Trailer, 0),
                _ => return Followed::Lost,
            };
            if line > MAX_CHUNK_LINE {
                return Followed::Lost;
            }
            self.state = state;
            self.line = line;
        }
        Followed::More(at)
    }
}

fn hex_value(byte: u8) -> Option<u8> {
    (byte as char)
        .to_digit(16)
        .and_then(|value| u8::try_from(value).ok())
}

#[cfg(test)]
mod tests;
