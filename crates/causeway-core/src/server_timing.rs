//! `Server-Timing` headers (W3C Server Timing): how each hop reports what it did and how long it
//! took, so that `causeway demo` can show the real request's steps from the real response.
//!
//! Written here because the format is a few lines and no maintained crate parses it.
//! Each hop appends entries; an entry's description names the instance that did the work.

use std::fmt::{self, Write};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};

pub const SERVER_TIMING: HeaderName = HeaderName::from_static("server-timing");

#[derive(Clone, Debug, PartialEq)]
pub struct TimingEntry {
    pub name: String,
    /// Milliseconds.
    pub duration_ms: Option<f64>,
    pub description: Option<String>,
}

impl TimingEntry {
    pub fn new(name: &str, duration: Duration, description: impl Into<String>) -> Self {
        Self {
            name: name.to_string(),
            duration_ms: Some(duration.as_secs_f64() * 1000.0),
            description: Some(description.into()),
        }
    }

    fn format(&self) -> String {
        let description = self.description.as_deref().unwrap_or_default();
        let mut out = String::with_capacity(self.name.len() + description.len() + 24);
        out.push_str(&self.name);
        if let Some(ms) = self.duration_ms {
            let _ = write!(out, ";dur={ms:.3}");
        }
        if let Some(desc) = &self.description {
            out.push_str(";desc=\"");
            let _ = Quoted(&mut out).write_str(desc);
            out.push('"');
        }
        out
    }
}

/// Writes the inside of a quoted string: control characters dropped, `"` and `\` escaped.
struct Quoted<'a>(&'a mut String);

impl fmt::Write for Quoted<'_> {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        if text
            .bytes()
            .all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
        {
            self.0.push_str(text);
            return Ok(());
        }
        for c in text.chars().filter(|c| !c.is_control()) {
            if matches!(c, '"' | '\\') {
                self.0.push('\\');
            }
            self.0.push(c);
        }
        Ok(())
    }
}

/// One entry as a `Server-Timing` header value, the description formatted straight into it: for
/// hops that add entries to every answer (no [`TimingEntry`] and no copies on the way). `None`
/// if the description holds characters a header value cannot.
pub fn entry_value(
    name: &str,
    duration: Duration,
    description: fmt::Arguments<'_>,
) -> Option<HeaderValue> {
    let mut out = String::with_capacity(128);
    out.push_str(name);
    let _ = write!(out, ";dur={:.3};desc=\"", duration.as_secs_f64() * 1000.0);
    let _ = Quoted(&mut out).write_fmt(description);
    out.push('"');
    HeaderValue::from_maybe_shared(Bytes::from(out)).ok()
}

/// Appends `entry` as its own `Server-Timing` header line.
pub fn append(headers: &mut HeaderMap, entry: &TimingEntry) {
    if let Ok(value) = HeaderValue::from_str(&entry.format()) {
        headers.append(SERVER_TIMING, value);
    }
}

/// Every entry in every `Server-Timing` line, in order.
pub fn parse(headers: &HeaderMap) -> Vec<TimingEntry> {
    headers
        .get_all(SERVER_TIMING)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(parse_line)
        .collect()
}

fn parse_line(line: &str) -> Vec<TimingEntry> {
    split_outside_quotes(line, ',')
        .into_iter()
        .filter_map(|metric| {
            let mut parts = split_outside_quotes(&metric, ';').into_iter();
            let name = parts.next()?.trim().to_string();
            if name.is_empty() {
                return None;
            }
            let mut entry = TimingEntry {
                name,
                duration_ms: None,
                description: None,
            };
            for param in parts {
                let Some((key, value)) = param.split_once('=') else {
                    continue;
                };
                match key.trim() {
                    "dur" => entry.duration_ms = value.trim().parse().ok(),
                    "desc" => entry.description = Some(unquote(value.trim())),
                    _ => {}
                }
            }
            Some(entry)
        })
        .collect()
}

fn split_outside_quotes(text: &str, separator: char) -> Vec<String> {
    let mut parts = vec![String::new()];
    let (mut quoted, mut escaped) = (false, false);
    for c in text.chars() {
        let current = parts.last_mut().expect("parts is never empty");
        if escaped {
            escaped = false;
        } else if quoted && c == '\\' {
            escaped = true;
        } else if c == '"' {
            quoted = !quoted;
        } else if c == separator && !quoted {
            parts.push(String::new());
            continue;
        }
        current.push(c);
    }
    parts
}

fn unquote(value: &str) -> String {
    let Some(inner) = value.strip_prefix('"').and_then(|v| v.strip_suffix('"')) else {
        return value.to_string();
    };
    let mut out = String::new();
    let mut escaped = false;
    for c in inner.chars() {
        if !escaped && c == '\\' {
            escaped = true;
            continue;
        }
        escaped = false;
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_entries_with_awkward_descriptions() {
        let mut headers = HeaderMap::new();
        append(
            &mut headers,
            &TimingEntry::new(
                "db",
                Duration::from_micros(1500),
                "read 2 rows; user \"123\", fast",
            ),
        );
        append(
            &mut headers,
            &TimingEntry::new("lb", Duration::ZERO, "picked order-service-2"),
        );
        let entries = parse(&headers);
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].name, "db");
        assert_eq!(entries[0].duration_ms, Some(1.5));
        assert_eq!(
            entries[0].description.as_deref(),
            Some("read 2 rows; user \"123\", fast")
        );
        assert_eq!(
            entries[1].description.as_deref(),
            Some("picked order-service-2")
        );
    }

    #[test]
    fn entry_values_match_appended_entries() {
        let description = "read \"SKU-0001\" \\ from db\n";
        let mut headers = HeaderMap::new();
        append(
            &mut headers,
            &TimingEntry::new("db", Duration::from_micros(1500), description),
        );
        let value = entry_value(
            "db",
            Duration::from_micros(1500),
            format_args!("read \"{}\" \\ from {}\n", "SKU-0001", "db"),
        )
        .expect("a valid header value");
        assert_eq!(headers.get(SERVER_TIMING), Some(&value));
        assert_eq!(
            value.to_str().unwrap(),
            r#"db;dur=1.500;desc="read \"SKU-0001\" \\ from db""#
        );
    }

    #[test]
    fn parses_foreign_lines_with_several_metrics() {
        let mut headers = HeaderMap::new();
        headers.insert(
            SERVER_TIMING,
            HeaderValue::from_static("cache;desc=\"Cache Read\";dur=23.2, missedCache, db;dur=53"),
        );
        let entries = parse(&headers);
        let names: Vec<_> = entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["cache", "missedCache", "db"]);
        assert_eq!(entries[0].duration_ms, Some(23.2));
        assert_eq!(entries[1].duration_ms, None);
    }
}

/// Names of the entries Causeway's hops report, which `causeway demo` reads back.
pub mod steps {
    /// The reverse proxy at the edge: TLS, gateway checks, routing.
    pub const EDGE_PROXY: &str = "edge-proxy";
    /// A mesh sidecar's outbound half: the app's call routed, balanced, sent over mutual TLS.
    pub const SIDECAR_OUTBOUND: &str = "sidecar-out";
    /// A mesh sidecar's inbound half: mutual TLS ended, the caller authorized, the app called.
    pub const SIDECAR_INBOUND: &str = "sidecar-in";
    /// Discovery of the next service through DNS.
    pub const DNS: &str = "dns";
    /// The client library's choice of instance.
    pub const BALANCE: &str = "lb";
    /// The call to the next service, from first byte sent to response headers.
    pub const UPSTREAM: &str = "upstream";
    pub const ORDER_DB: &str = "order-db";
    pub const ORDER_SERVICE: &str = "order-service";
    pub const USER_DB: &str = "user-db";
    pub const USER_SERVICE: &str = "user-service";
    /// Email Service's transaction: the email row and its outbox row.
    pub const EMAIL_DB: &str = "email-db";
    /// Publishing to the queue, until the broker confirmed the message durable.
    pub const QUEUE_PUBLISH: &str = "queue-publish";
    pub const EMAIL_SERVICE: &str = "email-service";
}
