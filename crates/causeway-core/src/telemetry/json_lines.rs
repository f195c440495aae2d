//! The JSON line every component logs per event, written straight into the line buffer.
//!
//! The lines have the shape of tracing-subscriber's JSON format with flattened events
//! (`{"timestamp":…,"level":…,<fields>,"target":…}`), which is what log readers here expect.
//! tracing-subscriber builds each of its JSON lines through a map of `serde_json::Value`s, an
//! allocation per field, which was the largest part of a gRPC call's own cost in Pricing
//! Service (`docs/benchmarks.md`). This formatter writes each field as it is visited, escaping
//! strings on the way, and allocates nothing. No maintained crate offers such a formatter for
//! `tracing-subscriber`'s `fmt` layer, hence this module.

use std::fmt::{self, Write as _};

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_log::NormalizeEvent;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// Formats events as one JSON object per line (see the module doc).
pub struct JsonLines;

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        // Events forwarded from the `log` crate carry their real target and level aside.
        let normalized = event.normalized_metadata();
        let meta = normalized.as_ref().unwrap_or_else(|| event.metadata());
        writer.write_str("{\"timestamp\":\"")?;
        SystemTime.format_time(&mut writer)?;
        write!(writer, "\",\"level\":\"{}\"", meta.level())?;
        let mut fields = FieldWriter {
            out: &mut writer,
            result: Ok(()),
        };
        event.record(&mut fields);
        fields.result?;
        writer.write_str(",\"target\":")?;
        write_json_str(&mut writer, meta.target())?;
        writer.write_str("}\n")
    }
}

/// Writes each field as `,"name":value`.
struct FieldWriter<'a, 'w> {
    out: &'a mut Writer<'w>,
    result: fmt::Result,
}

impl FieldWriter<'_, '_> {
    fn entry(&mut self, field: &Field, value: impl FnOnce(&mut Writer<'_>) -> fmt::Result) {
        // What the `log` crate's records carry besides the message (their target is used above).
        if self.result.is_err() || field.name().starts_with("log.") {
            return;
        }
        self.result = (|| {
            self.out.write_char(',')?;
            write_json_str(self.out, field.name())?;
            self.out.write_char(':')?;
            value(self.out)
        })();
    }
}

impl Visit for FieldWriter<'_, '_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.entry(field, |out| write_json_str(out, value));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.entry(field, |out| {
            out.write_char('"')?;
            write!(Escaped(out), "{value:?}")?;
            out.write_char('"')
        });
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.entry(field, |out| {
            out.write_char('"')?;
            write!(Escaped(out), "{value}")?;
            out.write_char('"')
        });
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.entry(field, |out| write!(out, "{value}"));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.entry(field, |out| write!(out, "{value}"));
    }

    fn record_i128(&mut self, field: &Field, value: i128) {
        self.entry(field, |out| write!(out, "{value}"));
    }

    fn record_u128(&mut self, field: &Field, value: u128) {
        self.entry(field, |out| write!(out, "{value}"));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.entry(field, |out| write!(out, "{value}"));
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        // JSON has no NaN or infinities; Rust's `Display` for finite floats is valid JSON.
        self.entry(field, |out| {
            if value.is_finite() {
                write!(out, "{value}")
            } else {
                out.write_str("null")
            }
        });
    }
}

fn write_json_str(out: &mut impl fmt::Write, value: &str) -> fmt::Result {
    out.write_char('"')?;
    Escaped(out).write_str(value)?;
    out.write_char('"')
}

/// Escapes what JSON requires inside a string: quotes, backslashes and control characters.
struct Escaped<'a, W: fmt::Write + ?Sized>(&'a mut W);

impl<W: fmt::Write + ?Sized> fmt::Write for Escaped<'_, W> {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        let mut plain = 0;
        for (at, byte) in text.bytes().enumerate() {
            let escape = match byte {
                b'"' => "\\\"",
                b'\\' => "\\\\",
                b'\n' => "\\n",
                b'\r' => "\\r",
                b'\t' => "\\t",
                0..=0x1f | 0x7f => "",
                _ => continue,
            };
            self.0.write_str(&text[plain..at])?;
            if escape.is_empty() {
                write!(self.0, "\\u{byte:04x}")?;
            } else {
                self.0.write_str(escape)?;
            }
            plain = at + 1;
        }
        self.0.write_str(&text[plain..])
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tracing_subscriber::fmt::MakeWriter;

    use super::*;

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Captured {
        type Writer = Captured;
        fn make_writer(&'a self) -> Self::Writer {
            self.clone()
        }
    }

    fn lines_of(log: impl FnOnce()) -> Vec<serde_json::Value> {
        let captured = Captured::default();
        let subscriber = tracing_subscriber::fmt()
            .event_format(JsonLines)
            .with_writer(captured.clone())
            .with_max_level(tracing::Level::TRACE)
            .finish();
        tracing::subscriber::with_default(subscriber, log);
        let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        assert!(text.ends_with('\n'), "{text:?}");
        text.lines()
            .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{line}: {e}")))
            .collect()
    }

    #[test]
    fn every_field_kind_is_valid_json() {
        let error = std::io::Error::other("disk \"full\"");
        let lines = lines_of(|| {
            tracing::info!(
                request_id = "req-1",
                trace_id = %"4bf92f35",
                attempt = 3u64,
                delta = -2i64,
                ratio = 0.5f64,
                missing = f64::NAN,
                ok = true,
                error = &error as &(dyn std::error::Error + 'static),
                shown = ?Some(1),
                "grpc call"
            );
            tracing::warn!("second line");
        });
        assert_eq!(lines.len(), 2);
        let line = &lines[0];
        assert_eq!(line["level"], "INFO");
        assert_eq!(line["message"], "grpc call");
        assert_eq!(line["request_id"], "req-1");
        assert_eq!(line["trace_id"], "4bf92f35");
        assert_eq!(line["attempt"], 3);
        assert_eq!(line["delta"], -2);
        assert_eq!(line["ratio"], 0.5);
        assert!(line["missing"].is_null());
        assert_eq!(line["ok"], true);
        assert_eq!(line["error"], "disk \"full\"");
        assert_eq!(line["shown"], "Some(1)");
        assert_eq!(line["target"], module_path!());
        let timestamp = line["timestamp"].as_str().unwrap();
        assert!(
            timestamp.starts_with("20") && timestamp.ends_with('Z'),
            "{timestamp}"
        );
        assert_eq!(lines[1]["level"], "WARN");
        assert_eq!(lines[1]["message"], "second line");
    }

    #[test]
    fn strings_are_escaped() {
        let awkward = "quote \" backslash \\ newline \n tab \t bell \u{7} é ✓";
        let lines = lines_of(|| tracing::info!(detail = awkward, "{awkward}"));
        assert_eq!(lines[0]["detail"], awkward);
        assert_eq!(lines[0]["message"], awkward);
    }
}
