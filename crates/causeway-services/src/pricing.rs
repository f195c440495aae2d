//! Pricing Service: `pricing.v1.PricingService` over gRPC (protobuf over HTTP/2 with TLS), with the
//! standard `grpc.health.v1.Health` and server reflection (`grpc.reflection.v1` and `v1alpha`)
//! beside it. A request message over the size limit is `RESOURCE_EXHAUSTED`.
//! List prices live in its own database (table `prices`); live repricing drifts them in memory and
//! stores nothing.
//!
//! Every call continues the caller's trace (`traceparent`, `x-request-id` metadata), answers with
//! `traceresponse` and `x-request-id` metadata (unary calls add `server-timing` when the caller
//! asks for it with [`SERVER_TIMING_REQUEST`]), is logged as one JSON event and counted in
//! Prometheus. The caller's deadline (`grpc-timeout`) bounds the work of
//! every method, streams included, and ends the call with `DEADLINE_EXCEEDED`; a caller that
//! cancels stops the work (its stream task ends and logs it).
//!
//! ```no_run
//! # async fn host(deps: causeway_services::ServiceDeps, tls: causeway_core::tls::CertPaths,
//! #     mut metrics: causeway_core::telemetry::Metrics, mut shutdown: causeway_core::serve::Shutdown)
//! # -> Result<(), causeway_services::pricing::PricingError> {
//! use causeway_services::pricing;
//! let app = pricing::app(&deps).await?;
//! app.register_metrics(&mut metrics);
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! pricing::serve(app, listener, &tls, async move { shutdown.wait().await }).await?;
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::fmt::Write as _;
use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use causeway_client::grpc::limit::LimitRequests;
use causeway_client::grpc::{code_name, parse_grpc_timeout};
use causeway_core::serve::{KeepAlive, shutdown_channel};
use causeway_core::server_timing::{self, SERVER_TIMING};
use causeway_core::telemetry::{HistogramFamily, Metrics, latency_histogram};
use causeway_core::tls::CertPaths;
use causeway_core::trace_context::{REQUEST_ID, TraceContext};
use causeway_proto::pricing::v1::pricing_service_server::{PricingService, PricingServiceServer};
use causeway_proto::pricing::v1::{
    BasketItem, Counter as CounterOffer, GetPriceRequest, Offer, Price, PriceUpdate, Quote,
    QuoteLine, StreamPricesRequest,
};
use http::{HeaderMap, HeaderName, HeaderValue};
use hyper_util::service::TowerToHyperService;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use sqlx::Row;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataMap;
use tonic::service::Routes;
use tonic::{Code, Request, Response, Status, Streaming};

use crate::db::{self, Database};

mod reflection;
use crate::{ServiceDeps, ServiceError};

/// The service's name in discovery (`pricing-service.internal`).
pub const SERVICE_NAME: &str = "pricing-service";
/// Request metadata that delays `GetPrice` by this many milliseconds (at most 30 000): a test
/// and demo hook for deadlines. Anything else in it is `INVALID_ARGUMENT`.
pub const DEBUG_DELAY_METADATA: &str = "causeway-debug-delay-ms";
/// Response metadata naming the caller's trace and this call's span (W3C Trace Context level 2).
pub const TRACERESPONSE: HeaderName = HeaderName::from_static("traceresponse");
/// Request metadata asking for `server-timing` metadata on unary answers (any value). Only callers
/// that show or pass on the timings ask (Inventory Service, `causeway demo grpc`): formatting them
/// and sending values that header compression cannot reuse cost every call.
pub const SERVER_TIMING_REQUEST: &str = "causeway-server-timing";
/// `Server-Timing` entry names in unary answers' `server-timing` metadata.
pub const TIMING_DB: &str = "pricing-db";
pub const TIMING_SERVICE: &str = "pricing-service";
/// The request headers read on every call, as names that need no parsing per lookup (a `&str`
/// key is parsed and validated each time).
const GRPC_TIMEOUT_HEADER: HeaderName = HeaderName::from_static("grpc-timeout");
const SERVER_TIMING_REQUEST_HEADER: HeaderName = HeaderName::from_static(SERVER_TIMING_REQUEST);
const DEBUG_DELAY_HEADER: HeaderName = HeaderName::from_static(DEBUG_DELAY_METADATA);

const MAX_DEBUG_DELAY: Duration = Duration::from_secs(30);
const MAX_STREAM_SKUS: usize = 32;
const INTERVAL_MS: std::ops::RangeInclusive<u32> = 10..=60_000;
const ROUNDS: std::ops::RangeInclusive<u32> = 1..=1000;
const QUANTITY: std::ops::RangeInclusive<i64> = 1..=10_000;
const MAX_BASKET_ITEMS: i32 = 1000;
const MAX_OFFERS: u32 = 1000;
/// Requests are a few SKUs: anything larger is refused before it is decoded.
const MAX_REQUEST_BYTES: usize = 64 * 1024;
/// Stream messages buffered towards a slow reader before the stream waits for it.
const STREAM_BUFFER: usize = 16;
/// How long open connections may finish after shutdown.
const DRAIN: Duration = Duration::from_secs(2);
const SKU_FORMAT: &str = "expected \"SKU-\" followed by 4 digits, e.g. SKU-0001";

const SCHEMA_AND_SEED: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS prices (
        sku TEXT PRIMARY KEY,
        currency TEXT NOT NULL,
        unit_price_cents BIGINT NOT NULL,
        updated_at BIGINT NOT NULL
    )",
    // 2025-01-01T00:00:00Z; SKU-0001..0005 are the ones Inventory Service stocks.
    "INSERT INTO prices (sku, currency, unit_price_cents, updated_at) VALUES
        ('SKU-0001', 'USD', 12999, 1735689600000),
        ('SKU-0002', 'USD', 4999, 1735689600000),
        ('SKU-0003', 'USD', 32900, 1735689600000),
        ('SKU-0004', 'USD', 18950, 1735689600000),
        ('SKU-0005', 'USD', 3999, 1735689600000),
        ('SKU-0006', 'USD', 24900, 1735689600000),
        ('SKU-0007', 'USD', 8999, 1735689600000),
        ('SKU-0008', 'USD', 1299, 1735689600000)
     ON CONFLICT (sku) DO NOTHING",
];

#[derive(Debug, thiserror::Error)]
pub enum PricingError {
    #[error(transparent)]
    Service(#[from] ServiceError),
    #[error("gRPC TLS: {0}")]
    Tls(#[from] causeway_core::tls::TlsError),
    #[error("cannot build gRPC reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HandledLabels {
    method: String,
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    method: String,
}

/// The Prometheus families the service counts into; [`PricingApp::register_metrics`] exports them.
#[derive(Clone)]
struct PricingMetrics {
    handled: Family<HandledLabels, Counter>,
    duration: HistogramFamily<MethodLabels>,
    active_streams: Family<MethodLabels, Gauge>,
}

impl Default for PricingMetrics {
    fn default() -> Self {
        Self {
            handled: Family::default(),
            duration: Family::new_with_constructor(latency_histogram),
            active_streams: Family::default(),
        }
    }
}

/// The service's methods, as logged and labelled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Method {
    GetPrice,
    StreamPrices,
    QuoteBasket,
    LivePricing,
}

impl Method {
    const ALL: [Method; 4] = [
        Method::GetPrice,
        Method::StreamPrices,
        Method::QuoteBasket,
        Method::LivePricing,
    ];

    fn name(self) -> &'static str {
        match self {
            Method::GetPrice => "GetPrice",
            Method::StreamPrices => "StreamPrices",
            Method::QuoteBasket => "QuoteBasket",
            Method::LivePricing => "LivePricing",
        }
    }
}

/// gRPC status codes are 0 to 16.
const STATUS_CODES: usize = 17;

/// One method's series, looked up in the families at their first use and kept: a call then
/// counts without building, hashing and looking up label sets. Series still appear in
/// `/metrics` only once used, as before.
struct MethodMetrics {
    method: Method,
    families: PricingMetrics,
    duration: OnceLock<Histogram>,
    active_streams: OnceLock<Gauge>,
    handled: [OnceLock<Counter>; STATUS_CODES],
}

impl MethodMetrics {
    fn new(method: Method, families: &PricingMetrics) -> Self {
        Self {
            method,
            families: families.clone(),
            duration: OnceLock::new(),
            active_streams: OnceLock::new(),
            handled: std::array::from_fn(|_| OnceLock::new()),
        }
    }

    fn labels(&self) -> MethodLabels {
        MethodLabels {
            method: self.method.name().to_string(),
        }
    }

    fn duration(&self) -> &Histogram {
        self.duration
            .get_or_init(|| self.families.duration.get_or_create(&self.labels()).clone())
    }

    fn active_streams(&self) -> &Gauge {
        self.active_streams.get_or_init(|| {
            self.families
                .active_streams
                .get_or_create(&self.labels())
                .clone()
        })
    }

    fn handled(&self, code: Code) -> Counter {
        let create = || {
            self.families
                .handled
                .get_or_create(&HandledLabels {
                    method: self.method.name().to_string(),
                    code: code_name(code).to_string(),
                })
                .clone()
        };
        match usize::try_from(i32::from(code))
            .ok()
            .and_then(|index| self.handled.get(index))
        {
            Some(slot) => slot.get_or_init(create).clone(),
            None => create(),
        }
    }
}

/// The Pricing Service with its database open and seeded, ready to [`serve`].
#[derive(Clone)]
pub struct PricingApp {
    instance: String,
    db: Database,
    metrics: PricingMetrics,
}

/// Opens (and seeds) the database.
pub async fn app(deps: &ServiceDeps) -> Result<PricingApp, ServiceError> {
    let db = db::connect(deps.database_url.as_deref(), &deps.default_sqlite_path).await?;
    db.run_script(SCHEMA_AND_SEED).await?;
    Ok(PricingApp {
        instance: deps.instance.clone(),
        db,
        metrics: PricingMetrics::default(),
    })
}

impl PricingApp {
    /// GetPrice's lookup alone (SKU check and database read), without the per-call logging,
    /// metrics, deadline and trace handling that `serve` adds: what `causeway bench grpc` serves
    /// from a bare tonic server and over REST to compare against the full service.
    pub async fn lookup(&self, sku: &str) -> Result<Price, Status> {
        check_sku(sku)?;
        let list = read_list_price(&self.db, &self.instance, sku).await?;
        Ok(Price {
            sku: list.sku,
            currency: list.currency,
            unit_price_cents: list.unit_price_cents,
            updated_at: list.updated_at,
            served_by: self.instance.clone(),
        })
    }

    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// Registers (once per registry) `grpc_server_handled` (calls by method and status code),
    /// `grpc_server_handling_seconds` (latency by method; streams: until their end) and
    /// `grpc_server_active_streams` (open streaming calls by method).
    pub fn register_metrics(&self, metrics: &mut Metrics) {
        let registry = metrics.registry_mut();
        registry.register(
            "grpc_server_handled",
            "gRPC calls completed, by method and status code",
            self.metrics.handled.clone(),
        );
        registry.register(
            "grpc_server_handling_seconds",
            "gRPC call duration, by method (streams: until they end)",
            self.metrics.duration.clone(),
        );
        registry.register(
            "grpc_server_active_streams",
            "Streaming gRPC calls in progress, by method",
            self.metrics.active_streams.clone(),
        );
    }
}

/// Serves `pricing.v1.PricingService`, health and reflection over TLS (HTTP/2 only) on `listener`
/// until `shutdown` resolves; then reports NOT_SERVING, ends open streams with `UNAVAILABLE`, and
/// lets calls in flight finish for up to two seconds.
pub async fn serve(
    app: PricingApp,
    listener: TcpListener,
    tls: &CertPaths,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), PricingError> {
    let tls = tokio_rustls::TlsAcceptor::from(causeway_core::tls::grpc_server_config(tls)?);
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<PricingServiceServer<Pricing>>().await;
    // Both reflection versions list both, as they are both served.
    let descriptors = || {
        tonic_reflection::server::Builder::configure()
            .include_reflection_service(false)
            .register_encoded_file_descriptor_set(causeway_proto::PRICING_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(
                tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
            )
    };
    let reflection_v1 = reflection::v1::service(descriptors().build_v1()?);
    let reflection_v1alpha = reflection::v1alpha::service(descriptors().build_v1alpha()?);

    let (stop_streams, stopping) = watch::channel(false);
    let instance = app.instance.clone();
    let pricing = PricingServiceServer::new(Pricing {
        inner: Arc::new(Inner {
            instance: app.instance.clone(),
            methods: Method::ALL.map(|method| MethodMetrics::new(method, &app.metrics)),
            db: app.db,
            stopping,
        }),
    })
    .max_decoding_message_size(MAX_REQUEST_BYTES);
    let addr = listener.local_addr()?;
    let routes = Routes::new(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(pricing)
        .prepare();
    tracing::info!(%instance, %addr, "pricing gRPC server listening (TLS, HTTP/2)");
    let (stop_serving, serving_stopped) = shutdown_channel();
    let signal = async move {
        shutdown.await;
        tracing::info!(%instance, "stopping: NOT_SERVING, streams ended, draining calls in flight");
        health
            .set_service_status("", tonic_health::ServingStatus::NotServing)
            .await;
        health
            .set_not_serving::<PricingServiceServer<Pricing>>()
            .await;
        let _ = stop_streams.send(true);
        stop_serving.fire();
    };
    // Served by the machinery every other component uses, not tonic's transport server, whose
    // grpc-timeout layer would start a second deadline timer per call (the methods above keep
    // the caller's deadline themselves) among layers this service does not use.
    let server = causeway_core::serve::serve_http2(
        listener,
        Some(tls),
        // Every service's requests are a few SKUs or names; a larger message is
        // RESOURCE_EXHAUSTED (tonic's own limit below would say OUT_OF_RANGE).
        move |_| TowerToHyperService::new(LimitRequests::new(routes.clone(), MAX_REQUEST_BYTES)),
        serving_stopped,
        DRAIN,
        KeepAlive::default(),
    );
    tokio::join!(signal, server);
    Ok(())
}

/// Whether `sku` is `SKU-` followed by exactly four ASCII digits.
pub fn is_valid_sku(sku: &str) -> bool {
    let bytes = sku.as_bytes();
    bytes.len() == 8 && bytes.starts_with(b"SKU-") && bytes[4..].iter().all(u8::is_ascii_digit)
}

fn check_sku(sku: &str) -> Result<(), Status> {
    if is_valid_sku(sku) {
        return Ok(());
    }
    let shown: String = sku.chars().take(32).collect();
    Err(Status::invalid_argument(format!(
        "malformed SKU {shown:?}: {SKU_FORMAT}"
    )))
}

fn check_quantity(sku: &str, quantity: i64) -> Result<(), Status> {
    if QUANTITY.contains(&quantity) {
        return Ok(());
    }
    Err(Status::invalid_argument(format!(
        "quantity of {sku} must be {} to {}, not {quantity}",
        QUANTITY.start(),
        QUANTITY.end()
    )))
}

/// Volume discount: 5% from 10 units, 10% from 100.
pub fn volume_discount_percent(quantity: i64) -> i64 {
    match quantity {
        q if q >= 100 => 10,
        q if q >= 10 => 5,
        _ => 0,
    }
}

/// The lowest unit price accepted for `quantity` units: list price less the volume discount,
/// rounded up to a cent.
pub fn floor_unit_price(list_cents: i64, quantity: i64) -> i64 {
    (list_cents * (100 - volume_discount_percent(quantity)) + 99) / 100
}

/// The next round's price in live repricing: about 1% (at least a cent) up or down, by a fixed
/// pattern per SKU, so that every run shows the same sequence.
pub fn drift(price_cents: i64, sku: &str, round: u32) -> i64 {
    let number: u32 = sku.get(4..).and_then(|d| d.parse().ok()).unwrap_or(0);
    let step = (price_cents / 100).max(1);
    if (number + round).is_multiple_of(3) {
        (price_cents - step).max(1)
    } else {
        price_cents + step
    }
}

fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// When this server gives up on a call: the caller's `grpc-timeout`, a moment early, so that the
/// caller gets this server's `DEADLINE_EXCEEDED` (saying what stopped) before its own timer
/// fires. Streams end on time too.
fn call_deadline(metadata: &MetadataMap, received: Instant) -> Option<Instant> {
    let timeout = metadata
        .as_ref()
        .get(GRPC_TIMEOUT_HEADER)
        .and_then(|value| parse_grpc_timeout(value.as_bytes()))?;
    let margin = (timeout / 50).clamp(Duration::from_millis(1), Duration::from_millis(10));
    Some(received + timeout.saturating_sub(margin))
}

async fn until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

async fn within<T>(
    deadline: Option<Instant>,
    method: &str,
    work: impl Future<Output = Result<T, Status>>,
) -> Result<T, Status> {
    match deadline {
        None => work.await,
        Some(deadline) => tokio::time::timeout_at(deadline, work)
            .await
            .unwrap_or_else(|_| Err(deadline_exceeded(method))),
    }
}

fn deadline_exceeded(method: &str) -> Status {
    Status::deadline_exceeded(format!(
        "{method}: the caller's deadline passed; work stopped"
    ))
}

/// One list price, as stored.
#[derive(Clone, Debug)]
struct ListPrice {
    sku: String,
    currency: String,
    unit_price_cents: i64,
    updated_at: i64,
}

/// The stored list price of `sku`: the lookup every method starts from.
async fn read_list_price(db: &Database, instance: &str, sku: &str) -> Result<ListPrice, Status> {
    let row = sqlx::query(
        "SELECT sku, currency, unit_price_cents, updated_at FROM prices WHERE sku = $1",
    )
    .bind(sku)
    .fetch_optional(&db.pool)
    .await
    .map_err(|err| {
        tracing::error!(error = %err, "prices query failed");
        Status::unavailable(format!("{instance} cannot read prices: {err}"))
    })?
    .ok_or_else(|| Status::not_found(format!("no price for {sku}")))?;
    let column = |err: sqlx::Error| Status::internal(format!("bad prices row: {err}"));
    Ok(ListPrice {
        sku: row.try_get("sku").map_err(column)?,
        currency: row.try_get("currency").map_err(column)?,
        unit_price_cents: row.try_get("unit_price_cents").map_err(column)?,
        updated_at: row.try_get("updated_at").map_err(column)?,
    })
}

struct Inner {
    instance: String,
    db: Database,
    /// In the order of [`Method::ALL`].
    methods: [MethodMetrics; 4],
    /// Set at shutdown: open streams end with `UNAVAILABLE`.
    stopping: watch::Receiver<bool>,
}

impl Inner {
    fn metrics(&self, method: Method) -> &MethodMetrics {
        &self.methods[method as usize]
    }

    async fn list_price(&self, sku: &str) -> Result<ListPrice, Status> {
        read_list_price(&self.db, &self.instance, sku).await
    }

    /// Looks `sku` up once per session.
    async fn cached_price<'a>(
        &self,
        cache: &'a mut HashMap<String, ListPrice>,
        sku: &str,
    ) -> Result<&'a ListPrice, Status> {
        if !cache.contains_key(sku) {
            let price = self.list_price(sku).await?;
            cache.insert(sku.to_string(), price);
        }
        cache
            .get(sku)
            .ok_or_else(|| Status::internal("price cache lost an entry"))
    }

    fn price(&self, list: &ListPrice, unit_price_cents: i64, updated_at: i64) -> Price {
        Price {
            sku: list.sku.clone(),
            currency: list.currency.clone(),
            unit_price_cents,
            updated_at,
            served_by: self.instance.clone(),
        }
    }

    fn stopped(&self) -> impl Future<Output = ()> + use<> {
        let mut stopping = self.stopping.clone();
        async move {
            let _ = stopping.wait_for(|stop| *stop).await;
        }
    }

    fn shutting_down(&self) -> Status {
        Status::unavailable(format!(
            "{} is shutting down; call another instance",
            self.instance
        ))
    }
}

/// One call from start to end: its trace, deadline, log line and metrics. Dropped unfinished
/// (tonic dropped the handler because the caller cancelled), it records `CANCELLED`.
struct Call {
    method: Method,
    trace: TraceContext,
    /// The caller's `x-request-id`, when it is the one this call goes by: answered as it came.
    request_id: Option<HeaderValue>,
    started: std::time::Instant,
    deadline: Option<Instant>,
    inner: Arc<Inner>,
    streaming: bool,
    finished: bool,
}

impl Call {
    fn begin(inner: &Arc<Inner>, method: Method, metadata: &MetadataMap, streaming: bool) -> Self {
        let received = Instant::now();
        let headers: &HeaderMap = metadata.as_ref();
        let trace = TraceContext::continue_from(headers);
        let request_id = headers
            .get(REQUEST_ID)
            .filter(|value| value.as_bytes() == trace.request_id.as_bytes())
            .cloned();
        if streaming {
            inner.metrics(method).active_streams().inc();
        }
        Self {
            method,
            trace,
            request_id,
            started: std::time::Instant::now(),
            deadline: call_deadline(metadata, received),
            inner: inner.clone(),
            streaming,
            finished: false,
        }
    }

    /// `traceresponse` and `x-request-id`, for the response's metadata.
    fn response_headers(&self) -> HeaderMap {
        let mut headers = HeaderMap::with_capacity(4);
        let flags = if self.trace.sampled { "01" } else { "00" };
        let mut value = String::with_capacity(55);
        let _ = write!(
            value,
            "00-{}-{}-{flags}",
            self.trace.trace_id, self.trace.span_id
        );
        if let Ok(value) = HeaderValue::from_maybe_shared(bytes::Bytes::from(value)) {
            headers.insert(TRACERESPONSE, value);
        }
        let request_id = match &self.request_id {
            Some(value) => Ok(value.clone()),
            None => HeaderValue::from_str(&self.trace.request_id),
        };
        if let Ok(value) = request_id {
            headers.insert(REQUEST_ID, value);
        }
        headers
    }

    fn finish(mut self, code: Code, detail: &str) {
        self.record(code, detail);
    }

    fn record(&mut self, code: Code, detail: &str) {
        self.finished = true;
        let elapsed = self.started.elapsed();
        let metrics = self.inner.metrics(self.method);
        metrics.handled(code).inc();
        metrics.duration().observe(elapsed.as_secs_f64());
        if self.streaming {
            metrics.active_streams().dec();
        }
        tracing::info!(
            request_id = self.trace.request_id.as_str(),
            trace_id = %self.trace.trace_id,
            span_id = %self.trace.span_id,
            instance = self.inner.instance.as_str(),
            method = self.method.name(),
            status = code_name(code),
            elapsed_ms = elapsed.as_secs_f64() * 1000.0,
            detail,
            "grpc call"
        );
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        if !self.finished {
            self.record(Code::Cancelled, "the caller cancelled; work stopped");
        }
    }
}

#[derive(Clone)]
struct Pricing {
    inner: Arc<Inner>,
}

impl Pricing {
    /// Runs a call with a single answer: within the deadline, logged and counted, with trace
    /// metadata on the answer, and timing metadata if the caller asked for it (`work` answers
    /// its own entry, if any, only then).
    async fn unary<T>(
        &self,
        method: Method,
        metadata: &MetadataMap,
        work: impl Future<Output = Result<(T, Option<HeaderValue>, String), Status>>,
    ) -> Result<Response<T>, Status> {
        let call = Call::begin(&self.inner, method, metadata, false);
        match within(call.deadline, method.name(), work).await {
            Ok((message, timing, detail)) => {
                let mut headers = call.response_headers();
                if wants_timing(metadata) {
                    headers.extend(timing.map(|value| (SERVER_TIMING, value)));
                    let service = server_timing::entry_value(
                        TIMING_SERVICE,
                        call.started.elapsed(),
                        format_args!("{} {}", self.inner.instance, method.name()),
                    );
                    headers.extend(service.map(|value| (SERVER_TIMING, value)));
                }
                call.finish(Code::Ok, &detail);
                Ok(Response::from_parts(
                    MetadataMap::from_headers(headers),
                    message,
                    Default::default(),
                ))
            }
            Err(status) => {
                call.finish(status.code(), status.message());
                Err(status)
            }
        }
    }

    async fn get_price_work(
        &self,
        sku: String,
        delay: Duration,
        timing: bool,
    ) -> Result<(Price, Option<HeaderValue>, String), Status> {
        check_sku(&sku)?;
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let db_started = std::time::Instant::now();
        let list = self.inner.list_price(&sku).await?;
        let timing = timing
            .then(|| {
                server_timing::entry_value(
                    TIMING_DB,
                    db_started.elapsed(),
                    format_args!(
                        "{} read the price of {sku} from {}",
                        self.inner.instance, self.inner.db.url
                    ),
                )
            })
            .flatten();
        let price = Price {
            sku: list.sku,
            currency: list.currency,
            unit_price_cents: list.unit_price_cents,
            updated_at: list.updated_at,
            served_by: self.inner.instance.clone(),
        };
        Ok((price, timing, sku))
    }

    async fn quote_work(
        &self,
        mut items: Streaming<BasketItem>,
    ) -> Result<(Quote, Option<HeaderValue>, String), Status> {
        let mut prices = HashMap::new();
        let mut lines: Vec<QuoteLine> = Vec::new();
        let mut currency: Option<String> = None;
        let mut received = 0;
        while let Some(item) = items.message().await? {
            received += 1;
            if received > MAX_BASKET_ITEMS {
                return Err(Status::invalid_argument(format!(
                    "a basket holds at most {MAX_BASKET_ITEMS} items"
                )));
            }
            check_sku(&item.sku)?;
            check_quantity(&item.sku, item.quantity)?;
            if let Some(line) = lines.iter_mut().find(|line| line.sku == item.sku) {
                line.quantity += item.quantity;
                check_quantity(&item.sku, line.quantity)?;
                continue;
            }
            let list = self.inner.cached_price(&mut prices, &item.sku).await?;
            match &currency {
                Some(currency) if *currency != list.currency => {
                    return Err(Status::failed_precondition(format!(
                        "{} is priced in {}, the basket so far in {currency}",
                        item.sku, list.currency
                    )));
                }
                Some(_) => {}
                None => currency = Some(list.currency.clone()),
            }
            lines.push(QuoteLine {
                sku: item.sku,
                quantity: item.quantity,
                unit_price_cents: list.unit_price_cents,
                ..QuoteLine::default()
            });
        }
        if lines.is_empty() {
            return Err(Status::invalid_argument(
                "empty basket: send at least one BasketItem before closing the stream",
            ));
        }
        let overflow = || Status::out_of_range("basket total does not fit in 64 bits");
        let mut total_cents: i64 = 0;
        let mut units = 0;
        for line in &mut lines {
            let gross = line
                .unit_price_cents
                .checked_mul(line.quantity)
                .ok_or_else(overflow)?;
            line.discount_cents = gross / 100 * volume_discount_percent(line.quantity)
                + gross % 100 * volume_discount_percent(line.quantity) / 100;
            line.line_total_cents = gross - line.discount_cents;
            total_cents = total_cents
                .checked_add(line.line_total_cents)
                .ok_or_else(overflow)?;
            units += line.quantity;
        }
        let detail = format!("{received} items, {} lines", lines.len());
        let quote = Quote {
            lines,
            total_cents,
            currency: currency.unwrap_or_default(),
            items: received,
            units,
            served_by: self.inner.instance.clone(),
        };
        Ok((quote, None, detail))
    }

    fn check_stream_request(request: &StreamPricesRequest) -> Result<(), Status> {
        if request.skus.is_empty() || request.skus.len() > MAX_STREAM_SKUS {
            return Err(Status::invalid_argument(format!(
                "skus must list 1 to {MAX_STREAM_SKUS} SKUs, not {}",
                request.skus.len()
            )));
        }
        for (index, sku) in request.skus.iter().enumerate() {
            check_sku(sku)?;
            if request.skus[..index].contains(sku) {
                return Err(Status::invalid_argument(format!("{sku} is listed twice")));
            }
        }
        if !INTERVAL_MS.contains(&request.interval_ms) {
            return Err(Status::invalid_argument(format!(
                "interval_ms must be {} to {}, not {}",
                INTERVAL_MS.start(),
                INTERVAL_MS.end(),
                request.interval_ms
            )));
        }
        if !ROUNDS.contains(&request.max_updates) {
            return Err(Status::invalid_argument(format!(
                "max_updates must be {} to {}, not {}",
                ROUNDS.start(),
                ROUNDS.end(),
                request.max_updates
            )));
        }
        Ok(())
    }

    /// Sends the rounds of live repricing until done, the deadline, shutdown, or the caller
    /// leaving; the error says which (the caller leaving is `CANCELLED`).
    async fn stream_rounds(
        &self,
        lists: Vec<ListPrice>,
        request: StreamPricesRequest,
        deadline: Option<Instant>,
        sender: &mpsc::Sender<Result<PriceUpdate, Status>>,
    ) -> Result<u64, Status> {
        let interval = Duration::from_millis(u64::from(request.interval_ms));
        let started = Instant::now();
        let mut current: Vec<i64> = lists.iter().map(|list| list.unit_price_cents).collect();
        let mut sent = 0;
        for round in 0..request.max_updates {
            if round > 0 {
                tokio::select! {
                    _ = tokio::time::sleep_until(started + interval * round) => {}
                    _ = until(deadline) => return Err(deadline_exceeded("StreamPrices")),
                    _ = sender.closed() => return Err(Status::cancelled("the caller went away")),
                    _ = self.inner.stopped() => return Err(self.inner.shutting_down()),
                }
            }
            let now = unix_ms();
            for (list, price) in lists.iter().zip(current.iter_mut()) {
                let previous = *price;
                if round > 0 {
                    *price = drift(previous, &list.sku, round);
                }
                let update = PriceUpdate {
                    price: Some(self.inner.price(list, *price, now)),
                    sequence: round,
                    change_cents: *price - previous,
                };
                tokio::select! {
                    sent = sender.send(Ok(update)) => if sent.is_err() {
                        return Err(Status::cancelled("the caller went away"));
                    },
                    _ = until(deadline) => return Err(deadline_exceeded("StreamPrices")),
                    _ = self.inner.stopped() => return Err(self.inner.shutting_down()),
                }
                sent += 1;
            }
        }
        Ok(sent)
    }

    /// Answers the offers of one negotiation session, in order.
    async fn negotiate(
        &self,
        mut offers: Streaming<Offer>,
        deadline: Option<Instant>,
        sender: &mpsc::Sender<Result<CounterOffer, Status>>,
    ) -> Result<u32, Status> {
        let mut prices = HashMap::new();
        let mut round = 0;
        loop {
            let offer = tokio::select! {
                offer = offers.message() => match offer? {
                    Some(offer) => offer,
                    None => return Ok(round),
                },
                _ = until(deadline) => return Err(deadline_exceeded("LivePricing")),
                _ = sender.closed() => return Err(Status::cancelled("the caller went away")),
                _ = self.inner.stopped() => return Err(self.inner.shutting_down()),
            };
            round += 1;
            if round > MAX_OFFERS {
                return Err(Status::resource_exhausted(format!(
                    "a session takes at most {MAX_OFFERS} offers; start a new one"
                )));
            }
            check_sku(&offer.sku)?;
            check_quantity(&offer.sku, offer.quantity)?;
            if offer.offered_unit_price_cents <= 0 {
                return Err(Status::invalid_argument(format!(
                    "offered_unit_price_cents must be positive, not {}",
                    offer.offered_unit_price_cents
                )));
            }
            let list = self.inner.cached_price(&mut prices, &offer.sku).await?;
            let counter = counter_offer(&offer, list.unit_price_cents, round);
            tokio::select! {
                sent = sender.send(Ok(counter)) => if sent.is_err() {
                    return Err(Status::cancelled("the caller went away"));
                },
                _ = until(deadline) => return Err(deadline_exceeded("LivePricing")),
            }
        }
    }
}

/// The server's answer to one offer.
fn counter_offer(offer: &Offer, list_cents: i64, round: u32) -> CounterOffer {
    let floor = floor_unit_price(list_cents, offer.quantity);
    let (accepted, unit_price_cents, message) = if offer.offered_unit_price_cents >= floor {
        let agreed = offer.offered_unit_price_cents.min(list_cents);
        (
            true,
            agreed,
            format!(
                "accepted: {} x {} at {agreed} cents per unit",
                offer.quantity, offer.sku
            ),
        )
    } else {
        // Halfway between the offer and the list price, rounded up, but never below the floor.
        let counter = floor.max((offer.offered_unit_price_cents + list_cents + 1) / 2);
        (
            false,
            counter,
            format!(
                "counter-offer: {counter} cents per unit for {} units (list {list_cents})",
                offer.quantity
            ),
        )
    };
    CounterOffer {
        sku: offer.sku.clone(),
        accepted,
        unit_price_cents,
        message,
        round,
        list_unit_price_cents: list_cents,
    }
}

fn wants_timing(metadata: &MetadataMap) -> bool {
    metadata.as_ref().contains_key(SERVER_TIMING_REQUEST_HEADER)
}

fn debug_delay(metadata: &MetadataMap) -> Result<Duration, Status> {
    let Some(value) = metadata.as_ref().get(DEBUG_DELAY_HEADER) else {
        return Ok(Duration::ZERO);
    };
    value
        .to_str()
        .ok()
        .and_then(|text| text.parse::<u64>().ok())
        .map(Duration::from_millis)
        .filter(|delay| *delay <= MAX_DEBUG_DELAY)
        .ok_or_else(|| {
            Status::invalid_argument(format!(
                "{DEBUG_DELAY_METADATA} must be a number of milliseconds up to {}",
                MAX_DEBUG_DELAY.as_millis()
            ))
        })
}

#[tonic::async_trait]
impl PricingService for Pricing {
    async fn get_price(
        &self,
        request: Request<GetPriceRequest>,
    ) -> Result<Response<Price>, Status> {
        let delay = debug_delay(request.metadata());
        let (metadata, _, message) = request.into_parts();
        let timing = wants_timing(&metadata);
        self.unary(Method::GetPrice, &metadata, async move {
            self.get_price_work(message.sku, delay?, timing).await
        })
        .await
    }

    type StreamPricesStream = ReceiverStream<Result<PriceUpdate, Status>>;

    async fn stream_prices(
        &self,
        request: Request<StreamPricesRequest>,
    ) -> Result<Response<Self::StreamPricesStream>, Status> {
        let (metadata, _, request) = request.into_parts();
        let call = Call::begin(&self.inner, Method::StreamPrices, &metadata, true);
        let setup = within(call.deadline, "StreamPrices", async {
            Self::check_stream_request(&request)?;
            let mut lists = Vec::with_capacity(request.skus.len());
            for sku in &request.skus {
                lists.push(self.inner.list_price(sku).await?);
            }
            Ok(lists)
        })
        .await;
        let lists = match setup {
            Ok(lists) => lists,
            Err(status) => {
                call.finish(status.code(), status.message());
                return Err(status);
            }
        };
        let skus = request.skus.len();
        let this = self.clone();
        let deadline = call.deadline;
        Ok(stream_in_background(
            call,
            "the caller cancelled the stream; stopped",
            move |sender| async move {
                let sent = this
                    .stream_rounds(lists, request, deadline, &sender)
                    .await?;
                Ok(format!("{sent} updates of {skus} SKUs"))
            },
        ))
    }

    async fn quote_basket(
        &self,
        request: Request<Streaming<BasketItem>>,
    ) -> Result<Response<Quote>, Status> {
        let (metadata, _, items) = request.into_parts();
        self.unary(Method::QuoteBasket, &metadata, self.quote_work(items))
            .await
    }

    type LivePricingStream = ReceiverStream<Result<CounterOffer, Status>>;

    async fn live_pricing(
        &self,
        request: Request<Streaming<Offer>>,
    ) -> Result<Response<Self::LivePricingStream>, Status> {
        let (metadata, _, offers) = request.into_parts();
        let call = Call::begin(&self.inner, Method::LivePricing, &metadata, true);
        let this = self.clone();
        let deadline = call.deadline;
        Ok(stream_in_background(
            call,
            "the caller cancelled the session; stopped",
            move |sender| async move {
                let answered = this.negotiate(offers, deadline, &sender).await?;
                Ok(format!("{answered} offers answered"))
            },
        ))
    }
}

/// Answers a streaming call: `work` runs in a task of its own, sending the stream's messages,
/// and the call is recorded as it ends; a failure also reaches the caller as the stream's end.
fn stream_in_background<T, F, Fut>(
    call: Call,
    cancelled: &'static str,
    work: F,
) -> Response<ReceiverStream<Result<T, Status>>>
where
    T: Send + 'static,
    F: FnOnce(mpsc::Sender<Result<T, Status>>) -> Fut + Send + 'static,
    Fut: Future<Output = Result<String, Status>> + Send + 'static,
{
    let headers = call.response_headers();
    let (sender, receiver) = mpsc::channel(STREAM_BUFFER);
    tokio::spawn(async move {
        match work(sender.clone()).await {
            Ok(detail) => call.finish(Code::Ok, &detail),
            Err(status) if status.code() == Code::Cancelled => {
                call.finish(Code::Cancelled, cancelled)
            }
            Err(status) => {
                call.finish(status.code(), status.message());
                let _ = sender.send(Err(status)).await;
            }
        }
    });
    Response::from_parts(
        MetadataMap::from_headers(headers),
        ReceiverStream::new(receiver),
        Default::default(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skus_are_sku_dash_four_digits() {
        assert!(is_valid_sku("SKU-0001"));
        assert!(is_valid_sku("SKU-9999"));
        for bad in [
            "",
            "SKU-001",
            "SKU-00001",
            "sku-0001",
            "SKU-00a1",
            "SKU_0001",
            "SKU-٠١٢٣",
        ] {
            assert!(!is_valid_sku(bad), "{bad}");
        }
        let err = check_sku("nope").unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().contains("SKU-0001"), "{}", err.message());
    }

    #[test]
    fn negotiation_accepts_at_the_floor_and_counters_below_it() {
        // List 1000 cents, 10 units: 5% off, floor 950.
        assert_eq!(floor_unit_price(1000, 10), 950);
        assert_eq!(floor_unit_price(1299, 1), 1299);
        assert_eq!(floor_unit_price(1299, 100), 1170); // 1169.1 rounded up
        let offer = |price| Offer {
            sku: "SKU-0001".into(),
            quantity: 10,
            offered_unit_price_cents: price,
        };
        let low = counter_offer(&offer(800), 1000, 1);
        assert!(!low.accepted);
        assert_eq!(low.unit_price_cents, 950); // midpoint 900 is below the floor
        let near = counter_offer(&offer(940), 1000, 2);
        assert_eq!(near.unit_price_cents, 970);
        let taken = counter_offer(&offer(970), 1000, 3);
        assert!(taken.accepted);
        assert_eq!(taken.unit_price_cents, 970);
        let generous = counter_offer(&offer(5000), 1000, 4);
        assert!(generous.accepted);
        assert_eq!(generous.unit_price_cents, 1000, "never above list");
        assert_eq!(generous.round, 4);
    }

    #[test]
    fn drift_moves_about_one_percent_deterministically() {
        let mut price = 12_999;
        for round in 1..=20 {
            let next = drift(price, "SKU-0001", round);
            assert_eq!(next, drift(price, "SKU-0001", round));
            assert_eq!((next - price).abs(), (price / 100).max(1));
            price = next;
        }
        assert_eq!(drift(1, "SKU-0002", 1), 1, "never below a cent");
    }
}
