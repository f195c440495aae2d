//! Message size limits answered as gRPC specifies: a message over the limit is
//! `RESOURCE_EXHAUSTED`, as grpc-go, grpc-java and Envoy answer. tonic's codec reports its own
//! limits as `OUT_OF_RANGE`, so Causeway checks the size first, here, on the bodies it reads:
//! servers wrap each request body ([`limit_request`]), the client's channel each response body.
//!
//! The check reads only the 5-byte prefix of each length-prefixed message (compression flag,
//! then the length, big-endian) and passes every frame on untouched; a prefix that announces more
//! than the limit ends the body with a [`Status`], which tonic hands to the call as it is.

use std::error::Error;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use hyper::body::{Body, Frame, SizeHint};
use tonic::Status;

/// The largest message tonic decodes unless told otherwise (its `DEFAULT_MAX_RECV_MESSAGE_SIZE`).
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

/// The gRPC message prefix: one compression flag byte and a four-byte length.
const PREFIX: usize = 5;

type BoxError = Box<dyn Error + Send + Sync + 'static>;

/// The status for a message of `len` bytes over `limit`, worded as grpc-go words it.
pub fn message_too_large(len: usize, limit: usize) -> Status {
    Status::resource_exhausted(format!(
        "received message larger than max ({len} vs. {limit} bytes)"
    ))
}

/// Reads `status` from tonic's encoder, which reports a message over its send limit as
/// `OUT_OF_RANGE`, as `RESOURCE_EXHAUSTED`. Only for statuses an encoder produced: a server's
/// own `OUT_OF_RANGE` answer means what it says.
pub fn encoder_status(status: Status) -> Status {
    if status.code() == tonic::Code::OutOfRange {
        Status::resource_exhausted(status.message().to_string())
    } else {
        status
    }
}

/// `request` with its body limited to messages of at most `limit` bytes.
pub fn limit_request<B>(request: http::Request<B>, limit: usize) -> http::Request<LimitedBody<B>> {
    request.map(|body| LimitedBody::new(body, limit))
}

/// A gRPC server (e.g. tonic's `Routes`) whose requests' messages may be at most `limit` bytes:
/// a larger one is answered `RESOURCE_EXHAUSTED` before it is read. Set the services' own
/// `max_decoding_message_size` no lower, or tonic's `OUT_OF_RANGE` comes first.
#[derive(Clone, Debug)]
pub struct LimitRequests<S> {
    inner: S,
    limit: usize,
}

impl<S> LimitRequests<S> {
    pub fn new(inner: S, limit: usize) -> Self {
        Self { inner, limit }
    }
}

impl<S, B> tower::Service<http::Request<B>> for LimitRequests<S>
where
    S: tower::Service<http::Request<LimitedBody<B>>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> S::Future {
        self.inner.call(limit_request(request, self.limit))
    }
}

/// A gRPC body whose messages may be at most `limit` bytes long (see the module docs).
#[derive(Debug)]
pub struct LimitedBody<B> {
    inner: B,
    limit: usize,
    /// Bytes of the current message still to come.
    remaining: usize,
    /// The prefix read so far, when a frame ended inside one.
    prefix: [u8; PREFIX],
    prefix_len: usize,
    failed: bool,
}

impl<B> LimitedBody<B> {
    pub fn new(inner: B, limit: usize) -> Self {
        Self {
            inner,
            limit,
            remaining: 0,
            prefix: [0; PREFIX],
            prefix_len: 0,
            failed: false,
        }
    }

    /// Follows the message framing through `data`; the first prefix over the limit is an error.
    fn check(&mut self, mut data: &[u8]) -> Result<(), Status> {
        while !data.is_empty() {
            if self.remaining > 0 {
                let skipped = self.remaining.min(data.len());
                self.remaining -= skipped;
                data = &data[skipped..];
                continue;
            }
            let taken = (PREFIX - self.prefix_len).min(data.len());
            self.prefix[self.prefix_len..self.prefix_len + taken].copy_from_slice(&data[..taken]);
            self.prefix_len += taken;
            data = &data[taken..];
            if self.prefix_len == PREFIX {
                self.prefix_len = 0;
                let len = (&self.prefix[1..]).get_u32() as usize;
                if len > self.limit {
                    return Err(message_too_large(len, self.limit));
                }
                self.remaining = len;
            }
        }
        Ok(())
    }
}

impl<B> Body for LimitedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if this.failed {
            return Poll::Ready(None);
        }
        let frame = match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
            Some(Ok(frame)) => frame,
            Some(Err(err)) => return Poll::Ready(Some(Err(err.into()))),
            None => return Poll::Ready(None),
        };
        if let Some(data) = frame.data_ref()
            && let Err(status) = this.check(data)
        {
            this.failed = true;
            return Poll::Ready(Some(Err(Box::new(status))));
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.failed || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};

    fn framed(len: u32) -> Vec<u8> {
        let mut bytes = vec![0];
        bytes.extend_from_slice(&len.to_be_bytes());
        bytes.extend(std::iter::repeat_n(7, len as usize));
        bytes
    }

    /// Feeds `chunks` through a body limited to `limit`; the status it ended with, if any.
    async fn run(chunks: Vec<Vec<u8>>, limit: usize) -> Result<usize, Status> {
        let frames = chunks
            .into_iter()
            .map(|chunk| Ok::<_, std::io::Error>(Frame::data(Bytes::from(chunk))));
        let mut body = LimitedBody::new(StreamBody::new(futures_util::stream::iter(frames)), limit);
        let mut seen = 0;
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(frame) => seen += frame.into_data().map_or(0, |data| data.len()),
                Err(err) => return Err(*err.downcast::<Status>().expect("a Status")),
            }
        }
        Ok(seen)
    }

    #[tokio::test]
    async fn messages_up_to_the_limit_pass_untouched() {
        let mut two = framed(10);
        two.extend(framed(0));
        two.extend(framed(10));
        assert_eq!(run(vec![two.clone()], 10).await.unwrap(), two.len());
        // Prefixes and messages split across frames at every point.
        let split: Vec<Vec<u8>> = two.iter().map(|byte| vec![*byte]).collect();
        assert_eq!(run(split, 10).await.unwrap(), two.len());
    }

    #[tokio::test]
    async fn a_message_over_the_limit_is_resource_exhausted() {
        let mut bytes = framed(3);
        bytes.extend(framed(11));
        let status = run(vec![bytes.clone()], 10).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert!(status.message().contains("11 vs. 10"), "{status:?}");
        // A prefix split over two frames is still read.
        let (head, tail) = bytes.split_at(10);
        let status = run(vec![head.to_vec(), tail.to_vec()], 10)
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
    }

    #[test]
    fn encoder_limits_read_as_resource_exhausted() {
        let status = encoder_status(Status::out_of_range("encoded message length too large"));
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert_eq!(
            encoder_status(Status::internal("x")).code(),
            tonic::Code::Internal
        );
    }
}
