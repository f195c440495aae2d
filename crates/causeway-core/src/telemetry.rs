//! Structured logs and Prometheus metrics, the same way in every component.

use std::io::Write as _;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tracing_subscriber::EnvFilter;

mod json_lines;

/// JSON lines on stderr; the level comes from `CAUSEWAY_LOG` (or `RUST_LOG`), default `info`.
/// Each line is written as it is logged (for commands, whose stderr is the user's terminal).
pub fn init_logging() {
    install(std::io::stderr);
}

/// The same JSON lines on stderr, buffered and written by a background thread (see
/// [`LogGuard`]): for components under `causeway up`, whose stderr is their log file and who log
/// a line per request. An info line reaches the file within 100 ms, a warning or
/// an error at once; a process killed with SIGKILL loses at most that interval's info lines.
/// Keep the guard until the process exits: dropping it writes what is buffered.
pub fn init_logging_buffered() -> LogGuard {
    let guard = LogGuard::start(std::io::stderr());
    install(guard.writer());
    guard
}

/// The same JSON lines, appended to `path` (for benchmarks, whose stderr is the user's terminal),
/// buffered and written by a background thread (see [`LogGuard`]): keep the guard until the
/// process exits. Dropping it at once flushes and makes every later line unbuffered.
pub fn init_logging_to_file(path: &std::path::Path) -> std::io::Result<LogGuard> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    let guard = LogGuard::start(file);
    install(guard.writer());
    Ok(guard)
}

/// How long an info or debug line may wait in the buffer.
const LOG_FLUSH_INTERVAL: Duration = Duration::from_millis(100);
/// The buffer is written as soon as this much has accumulated.
const LOG_FLUSH_BYTES: usize = 64 * 1024;
/// A logging thread that falls this far behind makes the loggers wait (no line is dropped).
const LOG_BUFFER_LIMIT: usize = 4 * 1024 * 1024;

/// The buffered, non-blocking log writer: each line is appended to a shared buffer under a short
/// lock (no syscall on the logging thread), and a background thread writes the buffer out every
/// [`LOG_FLUSH_INTERVAL`], when it reaches [`LOG_FLUSH_BYTES`], or at once for a warning or an
/// error. Dropping the guard writes what is buffered and stops the thread; lines logged after
/// that are written directly, in order.
pub struct LogGuard {
    shared: Arc<LogBuffer>,
    thread: Option<std::thread::JoinHandle<()>>,
}

struct LogBuffer {
    state: std::sync::Mutex<LogState>,
    /// Taken after `state` (or alone), never the other way round.
    out: std::sync::Mutex<Box<dyn std::io::Write + Send>>,
    /// Wakes the background thread (flush now, or stop).
    wake: std::sync::Condvar,
    /// Wakes loggers waiting for room.
    drained: std::sync::Condvar,
}

#[derive(Default)]
struct LogState {
    pending: Vec<u8>,
    /// Flush without waiting for the interval (a warning or an error is pending).
    urgent: bool,
    /// The guard asked the thread to write what is left and stop.
    stopping: bool,
    /// The thread is gone and nothing is buffered: loggers write directly.
    stopped: bool,
}

impl LogGuard {
    fn start(out: impl std::io::Write + Send + 'static) -> Self {
        let shared = Arc::new(LogBuffer {
            state: std::sync::Mutex::new(LogState {
                pending: Vec::with_capacity(LOG_FLUSH_BYTES),
                ..LogState::default()
            }),
            out: std::sync::Mutex::new(Box::new(out)),
            wake: std::sync::Condvar::new(),
            drained: std::sync::Condvar::new(),
        });
        let writer = shared.clone();
        let thread = std::thread::Builder::new()
            .name("log-writer".into())
            .spawn(move || writer.run())
            .ok();
        if thread.is_none() {
            // No thread: every line is written directly.
            shared.lock().stopped = true;
        }
        Self { shared, thread }
    }

    fn writer(&self) -> LogWriter {
        LogWriter {
            shared: self.shared.clone(),
        }
    }
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        self.shared.lock().stopping = true;
        self.shared.wake.notify_all();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl LogBuffer {
    fn lock(&self) -> std::sync::MutexGuard<'_, LogState> {
        // A panic while holding the lock leaves at worst a partial line: keep logging.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn write_out(&self, bytes: &[u8]) -> std::io::Result<()> {
        let mut out = self
            .out
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        out.write_all(bytes).and_then(|()| out.flush())
    }

    /// The background thread: writes the buffer out when it is due, outside the state lock.
    fn run(&self) {
        let mut spare = Vec::with_capacity(LOG_FLUSH_BYTES);
        let mut state = self.lock();
        loop {
            let due = state.urgent || state.pending.len() >= LOG_FLUSH_BYTES;
            if !due && !state.stopping {
                state = self
                    .wake
                    .wait_timeout(state, LOG_FLUSH_INTERVAL)
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .0;
            }
            if state.pending.is_empty() {
                if state.stopping {
                    // Nothing buffered and nothing being written: later lines go straight out.
                    state.stopped = true;
                    return;
                }
                continue;
            }
            std::mem::swap(&mut state.pending, &mut spare);
            state.urgent = false;
            drop(state);
            self.drained.notify_all();
            let _ = self.write_out(&spare);
            spare.clear();
            state = self.lock();
        }
    }
}

/// What the `fmt` layer writes each line through: one `write` call per formatted event.
#[derive(Clone)]
struct LogWriter {
    shared: Arc<LogBuffer>,
}

/// One event's writer; knows whether the event is a warning or an error.
struct LineWriter {
    shared: Arc<LogBuffer>,
    urgent: bool,
}

impl std::io::Write for LineWriter {
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        let mut state = self.shared.lock();
        loop {
            if state.stopped {
                // Written under the state lock, so that lines stay in order.
                self.shared.write_out(line)?;
                return Ok(line.len());
            }
            if state.pending.len() < LOG_BUFFER_LIMIT || state.stopping {
                break;
            }
            self.shared.wake.notify_one();
            state = self
                .shared
                .drained
                .wait(state)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
        state.pending.extend_from_slice(line);
        let wake = self.urgent || state.pending.len() >= LOG_FLUSH_BYTES;
        state.urgent |= self.urgent;
        drop(state);
        if wake {
            self.shared.wake.notify_one();
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = LineWriter;

    fn make_writer(&'a self) -> LineWriter {
        LineWriter {
            shared: self.shared.clone(),
            urgent: false,
        }
    }

    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> LineWriter {
        LineWriter {
            shared: self.shared.clone(),
            urgent: *meta.level() <= tracing::Level::WARN,
        }
    }
}

fn install<W>(writer: W)
where
    W: for<'a> tracing_subscriber::fmt::MakeWriter<'a> + Send + Sync + 'static,
{
    let filter = EnvFilter::try_from_env("CAUSEWAY_LOG")
        .or_else(|_| EnvFilter::try_from_default_env())
        // hickory-server logs every query at info: too much for a DNS server clients poll each TTL.
        .unwrap_or_else(|_| EnvFilter::new("info,hickory_server=warn"));
    // A second initialisation (tests) keeps the first subscriber.
    let _ = tracing_subscriber::fmt()
        .event_format(json_lines::JsonLines)
        .with_env_filter(filter)
        .with_writer(writer)
        .try_init();
}

/// A component's metric registry, labelled with its role and instance.
pub struct Metrics {
    registry: Registry,
}

impl Metrics {
    pub fn new(role: &str, instance: &str) -> Self {
        let labels = [
            ("component".into(), role.to_string().into()),
            ("instance".into(), instance.to_string().into()),
        ];
        Self {
            registry: Registry::with_prefix_and_labels("causeway", labels.into_iter()),
        }
    }

    pub fn registry_mut(&mut self) -> &mut Registry {
        &mut self.registry
    }

    /// Registers the standard HTTP server metrics.
    pub fn http_server(&mut self) -> HttpMetrics {
        let metrics = HttpMetrics::default();
        self.registry.register(
            "http_requests",
            "HTTP requests served, by route, method and status",
            metrics.requests.clone(),
        );
        self.registry.register(
            "http_request_duration_seconds",
            "Time to response headers, by route",
            metrics.duration.clone(),
        );
        metrics
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    pub fn into_shared(self) -> Arc<Self> {
        Arc::new(self)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    pub route: String,
    pub method: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: String,
}

pub type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Latency buckets from 100 µs to about 6.5 s.
pub fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.0, 17))
}

#[derive(Clone)]
pub struct HttpMetrics {
    requests: Family<HttpLabels, Counter>,
    duration: HistogramFamily<RouteLabels>,
}

impl Default for HttpMetrics {
    fn default() -> Self {
        Self {
            requests: Family::default(),
            duration: Family::new_with_constructor(latency_histogram),
        }
    }
}

impl HttpMetrics {
    pub fn observe(&self, route: &str, method: &http::Method, status: u16, elapsed: Duration) {
        self.requests
            .get_or_create(&HttpLabels {
                route: route.to_string(),
                method: method.as_str().to_string(),
                status,
            })
            .inc();
        self.duration
            .get_or_create(&RouteLabels {
                route: route.to_string(),
            })
            .observe(elapsed.as_secs_f64());
    }
}

/// An error and its sources on one line, for logs and error messages (transport errors such as
/// hyper's and tonic's hide the cause in the source chain).
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut message = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffered_log_lines_stay_whole_and_are_written_by_drop() {
        let path = std::env::temp_dir().join(format!("causeway-log-{}.log", std::process::id()));
        let file = std::fs::File::create(&path).unwrap();
        let guard = LogGuard::start(file);
        let threads: Vec<_> = (0..4)
            .map(|thread| {
                let writer = guard.writer();
                std::thread::spawn(move || {
                    for line in 0..2000 {
                        let text = format!("{{\"thread\":{thread},\"line\":{line}}}\n");
                        let mut out = tracing_subscriber::fmt::MakeWriter::make_writer(&writer);
                        std::io::Write::write_all(&mut out, text.as_bytes()).unwrap();
                    }
                })
            })
            .collect();
        threads
            .into_iter()
            .for_each(|thread| thread.join().unwrap());
        drop(guard);
        let text = std::fs::read_to_string(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        assert_eq!(text.lines().count(), 8000);
        assert!(
            text.lines()
                .all(|line| line.starts_with("{\"thread\":") && line.ends_with('}'))
        );
    }

    #[test]
    fn render_shows_labelled_http_metrics() {
        let mut metrics = Metrics::new("order-service", "order-service-1");
        let http = metrics.http_server();
        http.observe("/orders", &http::Method::GET, 200, Duration::from_millis(3));
        http.observe("/orders", &http::Method::GET, 200, Duration::from_millis(5));
        let text = metrics.render();
        assert!(
            text.contains("causeway_http_requests_total{component=\"order-service\",instance=\"order-service-1\",route=\"/orders\",method=\"GET\",status=\"200\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("causeway_http_request_duration_seconds_count{"),
            "{text}"
        );
    }
}
