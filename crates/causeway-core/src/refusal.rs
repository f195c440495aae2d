//! A refused request or connection, the same wherever it is refused: the HTTP/1.1 front guard
//! of [`crate::serve`], the proxy's hygiene checks and limits. Each has a status, a stable
//! reason, a detail for people, the limit where one applies, one structured log line
//! (`event = "proxy.refused"`) and one JSON error shape ([`crate::registry_api::ErrorBody`]).

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::Full;

/// Why a request or connection was refused. `reason` is stable (for logs, metrics and the JSON
/// error body); `detail` is for people.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{status} {reason}: {detail}")]
pub struct Refusal {
    pub status: StatusCode,
    pub reason: &'static str,
    pub detail: String,
    /// The configured limit that was exceeded, where one was.
    pub limit: Option<u64>,
}

impl Refusal {
    pub fn new(status: StatusCode, reason: &'static str, detail: impl Into<String>) -> Self {
        Self {
            status,
            reason,
            detail: detail.into(),
            limit: None,
        }
    }

    pub fn bad_request(reason: &'static str, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, reason, detail)
    }

    pub fn with_limit(mut self, limit: u64) -> Self {
        self.limit = Some(limit);
        self
    }

    pub fn body_too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("request bodies are limited to {limit} bytes"),
        )
        .with_limit(limit as u64)
    }

    pub fn request_timeout(limit: Duration) -> Self {
        Self::new(
            StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            format!("the request took longer than {} ms", limit.as_millis()),
        )
        .with_limit(limit.as_millis() as u64)
    }

    pub fn too_many_connections(limit: usize) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "too_many_connections",
            format!("this proxy serves at most {limit} connections at once"),
        )
        .with_limit(limit as u64)
    }

    /// The one log line of a refusal; `request_id` is the one its answer carries, if any.
    pub fn log(&self, peer: SocketAddr, request_id: Option<&str>) {
        tracing::warn!(
            event = "proxy.refused",
            reason = self.reason,
            status = self.status.as_u16(),
            limit = self.limit,
            %peer,
            request_id,
            detail = %self.detail,
            "request refused"
        );
    }

    /// Whether the connection must close after the answer: after a malformed head the next
    /// request on it cannot be trusted to start where we think it does.
    pub fn closes_connection(&self) -> bool {
        self.status == StatusCode::BAD_REQUEST
    }

    /// The JSON error body.
    pub fn body(&self, request_id: Option<&str>) -> Vec<u8> {
        let body = crate::registry_api::ErrorBody {
            error: self.reason.to_string(),
            message: self.detail.clone(),
            request_id: request_id.map(str::to_owned),
        };
        serde_json::to_vec(&body).unwrap_or_else(|_| b"{}".to_vec())
    }

    /// The JSON error answer, for a server library to send.
    pub fn to_response(&self) -> Response<Full<Bytes>> {
        let mut response =
            crate::serve::error_response(self.status, self.reason, &self.detail, None);
        if self.closes_connection() {
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }

    /// The whole HTTP/1.1 answer as bytes, for a refusal made below the server library (the
    /// connection always closes after it). The request id is sent as `x-request-id` too.
    pub fn to_http1_bytes(&self, request_id: &str) -> Vec<u8> {
        let body = self.body(Some(request_id));
        let mut bytes = format!(
            "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
             x-request-id: {request_id}\r\nconnection: close\r\n\r\n",
            self.status.as_u16(),
            self.status.canonical_reason().unwrap_or(""),
            body.len()
        )
        .into_bytes();
        bytes.extend_from_slice(&body);
        bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http1_answer_is_a_complete_response_with_the_json_error() {
        let refusal = Refusal::bad_request("ambiguous_framing", "both \"lengths\"");
        let bytes = refusal.to_http1_bytes("req-7");
        let text = String::from_utf8(bytes).expect("ascii");
        let (head, body) = text.split_once("\r\n\r\n").expect("head and body");
        assert!(head.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{head}");
        assert!(head.contains(&format!("content-length: {}", body.len())));
        assert!(head.contains("connection: close"));
        let parsed: serde_json::Value = serde_json::from_str(body).expect("json");
        assert_eq!(parsed["error"], "ambiguous_framing");
        assert_eq!(parsed["message"], "both \"lengths\"");
        assert_eq!(parsed["request_id"], "req-7");
        assert!(head.contains("x-request-id: req-7"), "{head}");
    }
}
