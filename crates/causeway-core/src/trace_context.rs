//! W3C Trace Context (`traceparent`) and request ids, carried hop by hop.
//!
//! Parsing and formatting are OpenTelemetry's `TraceContextPropagator`; ids come from its random
//! generator. Every hop continues the caller's trace with a span of its own, and keeps the
//! `x-request-id` the edge assigned (which defaults to the trace id, so logs of one request share it).

use http::{HeaderMap, HeaderName, HeaderValue};
use opentelemetry::Context;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{IdGenerator, RandomIdGenerator};

pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// The trace position of one hop: its trace, its own span, and the request id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    pub sampled: bool,
    pub request_id: String,
}

struct Headers<'a>(&'a HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(HeaderName::as_str).collect()
    }
}

struct HeadersMut<'a>(&'a mut HeaderMap);

impl Injector for HeadersMut<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(key.as_bytes()),
            HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}

impl TraceContext {
    /// Starts this hop's span: continues the caller's trace if its `traceparent` is valid,
    /// else starts a new trace. A missing or invalid `x-request-id` becomes the trace id.
    pub fn continue_from(headers: &HeaderMap) -> Self {
        let parent = TraceContextPropagator::new().extract(&Headers(headers));
        let parent_span = parent.span();
        let parent = parent_span.span_context();
        let ids = RandomIdGenerator::default();
        let (trace_id, sampled) = if parent.is_valid() {
            (parent.trace_id(), parent.is_sampled())
        } else {
            (ids.new_trace_id(), true)
        };
        let request_id = headers
            .get(REQUEST_ID)
            .and_then(|value| value.to_str().ok())
            .filter(|id| is_valid_request_id(id))
            .map(str::to_owned)
            .unwrap_or_else(|| trace_id.to_string());
        Self {
            trace_id,
            span_id: ids.new_span_id(),
            sampled,
            request_id,
        }
    }

    /// Sets `traceparent` (this hop as the parent) and `x-request-id` on an outgoing request.
    pub fn inject(&self, headers: &mut HeaderMap) {
        let flags = if self.sampled {
            TraceFlags::SAMPLED
        } else {
            TraceFlags::default()
        };
        let span = SpanContext::new(
            self.trace_id,
            self.span_id,
            flags,
            true,
            TraceState::default(),
        );
        let context = Context::new().with_remote_span_context(span);
        TraceContextPropagator::new().inject_context(&context, &mut HeadersMut(headers));
        if let Ok(value) = HeaderValue::from_str(&self.request_id) {
            headers.insert(REQUEST_ID, value);
        }
    }

    pub fn traceparent(&self) -> String {
        let mut headers = HeaderMap::new();
        self.inject(&mut headers);
        headers
            .get(TRACEPARENT)
            .and_then(|value| value.to_str().ok())
            .unwrap_or_default()
            .to_string()
    }
}

/// A request id for an answer made before any request could be read (a fresh trace id's form).
pub fn new_request_id() -> String {
    RandomIdGenerator::default().new_trace_id().to_string()
}

/// Request ids from outside are kept only when short and printable, so they are safe in logs.
fn is_valid_request_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn continues_a_valid_parent_with_a_new_span() {
        let mut headers = HeaderMap::new();
        headers.insert(TRACEPARENT, HeaderValue::from_static(PARENT));
        let hop = TraceContext::continue_from(&headers);
        assert_eq!(hop.trace_id.to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_ne!(hop.span_id.to_string(), "00f067aa0ba902b7");
        assert_eq!(hop.request_id, "4bf92f3577b34da6a3ce929d0e0e4736");

        let mut out = HeaderMap::new();
        hop.inject(&mut out);
        let sent = out.get(TRACEPARENT).unwrap().to_str().unwrap();
        assert!(
            sent.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
            "{sent}"
        );
        assert!(sent.ends_with("-01"));
        assert_eq!(
            out.get(REQUEST_ID).unwrap(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
    }

    #[test]
    fn invalid_parent_starts_a_new_trace() {
        let mut headers = HeaderMap::new();
        headers.insert(
            TRACEPARENT,
            HeaderValue::from_static("00-00000000000000000000000000000000-00f067aa0ba902b7-01"),
        );
        let hop = TraceContext::continue_from(&headers);
        assert_ne!(hop.trace_id, TraceId::INVALID);
    }

    #[test]
    fn keeps_a_sane_request_id_and_replaces_a_hostile_one() {
        let mut headers = HeaderMap::new();
        headers.insert(REQUEST_ID, HeaderValue::from_static("req-42"));
        assert_eq!(TraceContext::continue_from(&headers).request_id, "req-42");
        headers.insert(REQUEST_ID, HeaderValue::from_static("a b\"c"));
        let hop = TraceContext::continue_from(&headers);
        assert_eq!(hop.request_id, hop.trace_id.to_string());
    }
}
