//! Structured logs and Prometheus metrics, the same way in every component.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tracing_subscriber::EnvFilter;

/// JSON lines on stderr; the level comes from `CAUSEWAY_LOG` (or `RUST_LOG`), default `info`.
pub fn init_logging() {
    install(std::io::stderr);
}

/// The same JSON lines, appended to `path` (for benchmarks, whose stderr is the user's terminal).
pub fn init_logging_to_file(path: &std::path::Path) -> std::io::Result<()> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    install(std::sync::Mutex::new(file));
    Ok(())
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
        .json()
        .flatten_event(true)
        .with_current_span(false)
        .with_span_list(false)
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
