//! gRPC end to end on 127.0.0.1 (ports chosen at run time): Pricing Service instances serving
//! TLS with certificates from a fresh local CA, a real discovery server listing them, the shared
//! client library's balanced channel, Inventory Service on top, and a Python client generated
//! from the same `.proto`.
//!
//! Each Pricing instance runs on a runtime of its own, so that shutting that runtime down is a
//! crash: its listener and connections vanish at once, without a goodbye.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use causeway_client::ClientSettings;
use causeway_client::grpc::{GrpcBalancer, GrpcCallOptions};
use causeway_client::registration;
use causeway_core::registry_api::InstanceRecord;
use causeway_core::serve::{ShutdownTrigger, shutdown_channel};
use causeway_core::telemetry::{HttpMetrics, Metrics};
use causeway_core::tls::{CertPaths, LocalCa};
use causeway_core::topology::{ClientConfig, DiscoveryConfig};
use causeway_core::trace_context::TraceContext;
use causeway_discovery::{DiscoveryServer, Registry};
use causeway_proto::pricing::v1::pricing_service_client::PricingServiceClient;
use causeway_proto::pricing::v1::pricing_service_server::{PricingService, PricingServiceServer};
use causeway_proto::pricing::v1::{
    BasketItem, Counter, GetPriceRequest, Offer, Price, PriceUpdate, Quote, StreamPricesRequest,
};
use causeway_services::ServiceDeps;
use causeway_services::pricing::{self, DEBUG_DELAY_METADATA};
use http::HeaderMap;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity, Server, ServerTlsConfig};
use tonic::{Code, Request, Response, Status, Streaming};

const PARENT_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
const SKU_FORMAT: &str = "\"SKU-\" followed by 4 digits";

/// A directory of its own per test, removed at the end.
struct TestDir(PathBuf);

impl TestDir {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "causeway-grpc-{name}-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create test dir");
        Self(dir)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct Pki {
    ca: PathBuf,
    pricing: CertPaths,
    authority: LocalCa,
}

fn pki(dir: &Path) -> Pki {
    let authority = LocalCa::load_or_create(&dir.join("tls")).expect("CA");
    let pricing = authority
        .issue(
            "pricing-service",
            &[
                "pricing-service.internal".into(),
                "localhost".into(),
                "127.0.0.1".into(),
            ],
        )
        .expect("issue pricing certificate");
    Pki {
        ca: authority.ca_cert_path(),
        pricing,
        authority,
    }
}

/// One Pricing Service instance on its own runtime.
struct PricingInstance {
    name: String,
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    runtime: Option<tokio::runtime::Runtime>,
    stop: Option<oneshot::Sender<()>>,
    served: Option<tokio::task::JoinHandle<Result<(), pricing::PricingError>>>,
}

impl PricingInstance {
    async fn start(dir: &Path, pki: &Pki, index: usize) -> Self {
        let name = format!("pricing-service-{}", index + 1);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("instance runtime");
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        std_listener.set_nonblocking(true).expect("nonblocking");
        let addr = std_listener.local_addr().expect("local addr");
        let deps = ServiceDeps {
            instance: name.clone(),
            database_url: std::env::var("CAUSEWAY_TEST_DATABASE_URL").ok(),
            default_sqlite_path: dir.join("db").join("pricing-service.db"),
            http_metrics: HttpMetrics::default(),
        };
        let tls = pki.pricing.clone();
        let (ready_tx, ready_rx) = oneshot::channel();
        let (stop, stop_rx) = oneshot::channel::<()>();
        let served = runtime.spawn(async move {
            let app = pricing::app(&deps).await?;
            let mut metrics = Metrics::new("pricing-service", &deps.instance);
            app.register_metrics(&mut metrics);
            let _ = ready_tx.send(Arc::new(metrics));
            let listener = tokio::net::TcpListener::from_std(std_listener)?;
            pricing::serve(app, listener, &tls, async move {
                let _ = stop_rx.await;
            })
            .await
        });
        let metrics = match ready_rx.await {
            Ok(metrics) => metrics,
            Err(_) => panic!("{name} failed to start: {:?}", served.await),
        };
        Self {
            name,
            addr,
            metrics,
            runtime: Some(runtime),
            stop: Some(stop),
            served: Some(served),
        }
    }

    /// The process dies: every socket closes at once.
    fn crash(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }

    /// Graceful shutdown; returns what `serve` returned and how long it took.
    async fn stop(&mut self) -> (Result<(), pricing::PricingError>, Duration) {
        let started = Instant::now();
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let served = self.served.take().expect("still serving");
        let result = tokio::time::timeout(Duration::from_secs(5), served)
            .await
            .expect("serve returns after shutdown")
            .expect("serve task did not panic");
        (result, started.elapsed())
    }

    fn counter(&self, name: &str, labels: &str) -> f64 {
        metric(&self.metrics, name, labels)
    }
}

impl Drop for PricingInstance {
    fn drop(&mut self) {
        self.crash();
    }
}

/// The value of the sample of `name` whose labels include `labels` (0 if absent).
fn metric(metrics: &Metrics, name: &str, labels: &str) -> f64 {
    metrics
        .render()
        .lines()
        .filter(|line| line.starts_with(&format!("{name}{{")) && line.contains(labels))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn wait_until(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let started = Instant::now();
    while !condition() {
        assert!(
            started.elapsed() < timeout,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn direct_channel(addr: SocketAddr, ca: &Path, server_name: &str) -> Channel {
    let pem = std::fs::read(ca).expect("CA pem");
    tonic::transport::Endpoint::from_shared(format!("https://{addr}"))
        .expect("uri")
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(pem))
                .domain_name(server_name),
        )
        .expect("tls config")
        .connect()
        .await
        .expect("connect over TLS")
}

async fn pricing_client(instance: &PricingInstance, pki: &Pki) -> PricingServiceClient<Channel> {
    PricingServiceClient::new(
        direct_channel(instance.addr, &pki.ca, "pricing-service.internal").await,
    )
}

struct DiscoveryHandle {
    dns: SocketAddr,
    api: SocketAddr,
    _trigger: ShutdownTrigger,
}

/// A real discovery server; instances stay listed for a minute without heartbeats, so that a
/// crashed instance is still in DNS while the client library has to cope with it.
async fn start_discovery() -> DiscoveryHandle {
    let config = DiscoveryConfig {
        dns_listen: ([127, 0, 0, 1], 0).into(),
        api_listen: ([127, 0, 0, 1], 0).into(),
        expiry_ms: 60_000,
        ..DiscoveryConfig::default()
    };
    let registry = Registry::new(Duration::from_millis(config.expiry_ms));
    let mut metrics = Metrics::new("discovery", "discovery-1");
    let server = DiscoveryServer::bind(&config, registry, &mut metrics)
        .await
        .expect("bind discovery");
    let (trigger, shutdown) = shutdown_channel();
    let handle = DiscoveryHandle {
        dns: server.dns_addr,
        api: server.api_addr,
        _trigger: trigger,
    };
    tokio::spawn(server.run(metrics.into_shared(), shutdown));
    handle
}

async fn register(discovery: &DiscoveryHandle, service: &str, instance: &str, addr: SocketAddr) {
    let record = InstanceRecord {
        service: service.into(),
        instance: instance.into(),
        addr,
        admin_addr: None,
        pid: None,
    };
    registration::register(discovery.api, &record)
        .await
        .expect("register");
}

fn balancer(
    discovery: &DiscoveryHandle,
    service: &str,
    ca: &Path,
    config: ClientConfig,
) -> GrpcBalancer {
    let settings = ClientSettings {
        dns_addr: discovery.dns,
        zone: "internal".into(),
        config,
    };
    let mut metrics = Metrics::new("inventory-service", "inventory-service-1");
    GrpcBalancer::new(service, &settings, ca, &mut metrics).expect("balancer")
}

/// Discovery with two Pricing instances registered, and a balancer following them.
async fn two_registered_instances(
    dir: &Path,
    pki: &Pki,
) -> (DiscoveryHandle, Vec<PricingInstance>, Arc<GrpcBalancer>) {
    let discovery = start_discovery().await;
    let mut instances = Vec::new();
    for index in 0..2 {
        let instance = PricingInstance::start(dir, pki, index).await;
        register(&discovery, "pricing-service", &instance.name, instance.addr).await;
        instances.push(instance);
    }
    let balancer = Arc::new(balancer(
        &discovery,
        "pricing-service",
        &pki.ca,
        ClientConfig::default(),
    ));
    (discovery, instances, balancer)
}

fn parent_trace() -> TraceContext {
    let mut headers = HeaderMap::new();
    headers.insert("traceparent", PARENT.parse().expect("header"));
    headers.insert("x-request-id", "test-req-7".parse().expect("header"));
    TraceContext::continue_from(&headers)
}

fn get_price(sku: &str) -> Request<GetPriceRequest> {
    Request::new(GetPriceRequest { sku: sku.into() })
}

async fn price_of(
    balancer: &GrpcBalancer,
    sku: &str,
    trace: &TraceContext,
) -> Result<Response<Price>, Status> {
    balancer
        .unary(
            "GetPrice",
            GetPriceRequest { sku: sku.into() },
            trace,
            GrpcCallOptions::default(),
            |channel, request| async move {
                PricingServiceClient::new(channel).get_price(request).await
            },
        )
        .await
        .0
}

fn expect_status<T: std::fmt::Debug>(result: Result<T, Status>, code: Code, fragment: &str) {
    match result {
        Ok(value) => panic!("expected {code:?} ({fragment}), got {value:?}"),
        Err(status) => {
            assert_eq!(status.code(), code, "{status:?}");
            assert!(
                status.message().contains(fragment),
                "{:?} should contain {fragment:?}",
                status.message()
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn get_price_answers_validates_and_continues_the_trace() {
    let dir = TestDir::new("unary");
    let pki = pki(&dir.0);
    let instance = PricingInstance::start(&dir.0, &pki, 0).await;
    let mut client = pricing_client(&instance, &pki).await;

    let mut request = get_price("SKU-0001");
    causeway_client::grpc::inject_trace(request.metadata_mut(), &parent_trace());
    request.metadata_mut().insert(
        pricing::SERVER_TIMING_REQUEST,
        tonic::metadata::MetadataValue::from_static("1"),
    );
    let response = client.get_price(request).await.expect("GetPrice");
    let metadata = response.metadata().clone();
    let price = response.into_inner();
    assert_eq!(
        price,
        Price {
            sku: "SKU-0001".into(),
            currency: "USD".into(),
            unit_price_cents: 12_999,
            updated_at: 1_735_689_600_000,
            served_by: "pricing-service-1".into(),
        }
    );
    let traceresponse = metadata
        .get("traceresponse")
        .and_then(|v| v.to_str().ok())
        .expect("traceresponse");
    assert!(
        traceresponse.starts_with(&format!("00-{PARENT_TRACE}-")),
        "{traceresponse}"
    );
    let parent_span = parent_trace().span_id.to_string();
    assert!(
        !traceresponse.contains(&parent_span),
        "the server has a span of its own"
    );
    assert_eq!(
        metadata.get("x-request-id").and_then(|v| v.to_str().ok()),
        Some("test-req-7")
    );
    let timings = causeway_core::server_timing::parse(&metadata.clone().into_headers());
    let names: Vec<&str> = timings.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["pricing-db", "pricing-service"], "{timings:?}");
    let db = timings[0].description.as_deref().unwrap_or_default();
    assert!(
        db.starts_with("pricing-service-1 read the price of SKU-0001 from "),
        "{db}"
    );
    assert_eq!(
        timings[1].description.as_deref(),
        Some("pricing-service-1 GetPrice")
    );

    // Without the request for them, the answer has no timings, but its trace metadata still.
    let mut request = get_price("SKU-0002");
    causeway_client::grpc::inject_trace(request.metadata_mut(), &parent_trace());
    let plain = client.get_price(request).await.expect("GetPrice");
    assert_eq!(plain.get_ref().sku, "SKU-0002");
    assert!(
        plain.metadata().get("server-timing").is_none(),
        "{:?}",
        plain.metadata()
    );
    assert_eq!(
        plain
            .metadata()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok()),
        Some("test-req-7")
    );
    assert!(plain.metadata().get("traceresponse").is_some());

    for bad in ["SKU-1", "sku-0001", "", "SKU-00011", "SKU-12a4"] {
        expect_status(
            client.get_price(get_price(bad)).await,
            Code::InvalidArgument,
            SKU_FORMAT,
        );
    }
    expect_status(
        client.get_price(get_price("SKU-0999")).await,
        Code::NotFound,
        "no price for SKU-0999",
    );
    let mut delayed = get_price("SKU-0001");
    delayed
        .metadata_mut()
        .insert(DEBUG_DELAY_METADATA, "soon".parse().expect("metadata"));
    expect_status(
        client.get_price(delayed).await,
        Code::InvalidArgument,
        DEBUG_DELAY_METADATA,
    );

    let handled = "causeway_grpc_server_handled_total";
    assert_eq!(
        instance.counter(handled, "method=\"GetPrice\",code=\"OK\""),
        2.0
    );
    assert_eq!(
        instance.counter(handled, "method=\"GetPrice\",code=\"INVALID_ARGUMENT\""),
        6.0
    );
    assert_eq!(
        instance.counter(handled, "method=\"GetPrice\",code=\"NOT_FOUND\""),
        1.0
    );
    assert_eq!(
        instance.counter(
            "causeway_grpc_server_handling_seconds_count",
            "method=\"GetPrice\""
        ),
        9.0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn stream_prices_sends_rounds_in_order_and_validates() {
    let dir = TestDir::new("stream");
    let pki = pki(&dir.0);
    let instance = PricingInstance::start(&dir.0, &pki, 0).await;
    let mut client = pricing_client(&instance, &pki).await;

    let started = Instant::now();
    let mut stream = client
        .stream_prices(StreamPricesRequest {
            skus: vec!["SKU-0001".into(), "SKU-0002".into()],
            interval_ms: 50,
            max_updates: 3,
        })
        .await
        .expect("StreamPrices")
        .into_inner();
    let mut updates: Vec<PriceUpdate> = Vec::new();
    while let Some(update) = stream.message().await.expect("stream message") {
        updates.push(update);
    }
    assert!(
        started.elapsed() >= Duration::from_millis(100),
        "two intervals between three rounds"
    );
    let order: Vec<(String, u32)> = updates
        .iter()
        .map(|u| {
            (
                u.price.as_ref().map(|p| p.sku.clone()).unwrap_or_default(),
                u.sequence,
            )
        })
        .collect();
    let expected: Vec<(String, u32)> = (0..3)
        .flat_map(|round| {
            [
                ("SKU-0001".to_string(), round),
                ("SKU-0002".to_string(), round),
            ]
        })
        .collect();
    assert_eq!(order, expected);
    let prices: Vec<i64> = updates
        .iter()
        .filter_map(|u| u.price.as_ref().map(|p| p.unit_price_cents))
        .collect();
    assert_eq!(&prices[..2], &[12_999, 4_999], "round 0 is the list price");
    for pair in [(0, 2), (2, 4), (1, 3), (3, 5)] {
        let (before, after) = (prices[pair.0], prices[pair.1]);
        assert_eq!((after - before).abs(), before / 100, "1% drift: {prices:?}");
        assert_eq!(updates[pair.1].change_cents, after - before);
    }
    assert!(updates.iter().all(|u| {
        u.price
            .as_ref()
            .is_some_and(|p| p.served_by == "pricing-service-1" && p.currency == "USD")
    }));

    let request = |skus: &[&str], interval_ms, max_updates| StreamPricesRequest {
        skus: skus.iter().map(|s| s.to_string()).collect(),
        interval_ms,
        max_updates,
    };
    for (bad, fragment) in [
        (request(&[], 50, 3), "skus must list 1 to 32"),
        (request(&["SKU-0001", "SKU-0001"], 50, 3), "listed twice"),
        (request(&["SKU-01"], 50, 3), SKU_FORMAT),
        (
            request(&["SKU-0001"], 5, 3),
            "interval_ms must be 10 to 60000",
        ),
        (
            request(&["SKU-0001"], 50, 0),
            "max_updates must be 1 to 1000",
        ),
        (
            request(&["SKU-0001"], 50, 1001),
            "max_updates must be 1 to 1000",
        ),
    ] {
        expect_status(
            client.stream_prices(bad).await.map(|_| ()),
            Code::InvalidArgument,
            fragment,
        );
    }
    expect_status(
        client
            .stream_prices(request(&["SKU-0001", "SKU-0999"], 50, 3))
            .await
            .map(|_| ()),
        Code::NotFound,
        "SKU-0999",
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn quote_basket_merges_lines_and_applies_volume_discounts() {
    let dir = TestDir::new("quote");
    let pki = pki(&dir.0);
    let instance = PricingInstance::start(&dir.0, &pki, 0).await;
    let mut client = pricing_client(&instance, &pki).await;
    let basket = |items: &[(&str, i64)]| {
        let items: Vec<BasketItem> = items
            .iter()
            .map(|(sku, quantity)| BasketItem {
                sku: sku.to_string(),
                quantity: *quantity,
            })
            .collect();
        tokio_stream::iter(items)
    };

    let quote: Quote = client
        .quote_basket(basket(&[
            ("SKU-0001", 2),
            ("SKU-0008", 5),
            ("SKU-0001", 8),
            ("SKU-0003", 100),
        ]))
        .await
        .expect("QuoteBasket")
        .into_inner();
    let lines: Vec<(&str, i64, i64, i64, i64)> = quote
        .lines
        .iter()
        .map(|l| {
            (
                l.sku.as_str(),
                l.quantity,
                l.unit_price_cents,
                l.discount_cents,
                l.line_total_cents,
            )
        })
        .collect();
    assert_eq!(
        lines,
        [
            ("SKU-0001", 10, 12_999, 6_499, 123_491),
            ("SKU-0008", 5, 1_299, 0, 6_495),
            ("SKU-0003", 100, 32_900, 329_000, 2_961_000),
        ]
    );
    assert_eq!(quote.total_cents, 123_491 + 6_495 + 2_961_000);
    assert_eq!(quote.currency, "USD");
    assert_eq!(quote.items, 4);
    assert_eq!(quote.units, 115);
    assert_eq!(quote.served_by, "pricing-service-1");

    expect_status(
        client.quote_basket(basket(&[])).await,
        Code::InvalidArgument,
        "empty basket",
    );
    expect_status(
        client
            .quote_basket(basket(&[("SKU-0001", 1), ("SKU-0002", 0)]))
            .await,
        Code::InvalidArgument,
        "quantity of SKU-0002 must be 1 to 10000, not 0",
    );
    expect_status(
        client
            .quote_basket(basket(&[("SKU-0001", 9_000), ("SKU-0001", 2_000)]))
            .await,
        Code::InvalidArgument,
        "not 11000",
    );
    expect_status(
        client.quote_basket(basket(&[("bogus", 1)])).await,
        Code::InvalidArgument,
        SKU_FORMAT,
    );
    expect_status(
        client.quote_basket(basket(&[("SKU-0999", 1)])).await,
        Code::NotFound,
        "no price for SKU-0999",
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn live_pricing_negotiates_offer_by_offer() {
    let dir = TestDir::new("live");
    let pki = pki(&dir.0);
    let instance = PricingInstance::start(&dir.0, &pki, 0).await;
    let mut client = pricing_client(&instance, &pki).await;

    let (offers, outgoing) = mpsc::channel(4);
    let mut counters: Streaming<Counter> = client
        .live_pricing(ReceiverStream::new(outgoing))
        .await
        .expect("LivePricing")
        .into_inner();
    let offer = |quantity, price| Offer {
        sku: "SKU-0002".into(),
        quantity,
        offered_unit_price_cents: price,
    };
    // List 4999; 10 units: 5% off, floor 4750. The counter to 4000 is max(floor, midpoint 4500).
    offers.send(offer(10, 4000)).await.expect("send");
    let first = counters.message().await.expect("counter").expect("one");
    assert_eq!(
        (
            first.round,
            first.accepted,
            first.unit_price_cents,
            first.list_unit_price_cents
        ),
        (1, false, 4750, 4999)
    );
    assert!(
        first.message.contains("counter-offer: 4750"),
        "{}",
        first.message
    );
    // Each offer is answered before the next is made: this one depends on the counter.
    offers
        .send(offer(10, first.unit_price_cents))
        .await
        .expect("send");
    let second = counters.message().await.expect("counter").expect("two");
    assert_eq!(
        (second.round, second.accepted, second.unit_price_cents),
        (2, true, 4750)
    );
    offers.send(offer(100, 4400)).await.expect("send");
    let third = counters.message().await.expect("counter").expect("three");
    // 100 units: 10% off, floor 4500; midpoint of 4400 and 4999 is 4700.
    assert_eq!(
        (third.round, third.accepted, third.unit_price_cents),
        (3, false, 4700)
    );
    offers.send(offer(1, 1_000_000)).await.expect("send");
    let fourth = counters.message().await.expect("counter").expect("four");
    assert_eq!(
        (fourth.accepted, fourth.unit_price_cents),
        (true, 4999),
        "capped at list"
    );
    drop(offers);
    assert!(counters.message().await.expect("clean end").is_none());

    let (offers, outgoing) = mpsc::channel(4);
    let mut counters = client
        .live_pricing(ReceiverStream::new(outgoing))
        .await
        .expect("LivePricing")
        .into_inner();
    offers.send(offer(0, 4000)).await.expect("send");
    expect_status(
        counters.message().await,
        Code::InvalidArgument,
        "quantity of SKU-0002",
    );
    wait_until("both sessions are counted", Duration::from_secs(3), || {
        instance.counter(
            "causeway_grpc_server_handled_total",
            "method=\"LivePricing\",code=\"OK\"",
        ) == 1.0
            && instance.counter(
                "causeway_grpc_server_handled_total",
                "method=\"LivePricing\",code=\"INVALID_ARGUMENT\"",
            ) == 1.0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn deadlines_end_streams_with_deadline_exceeded() {
    let dir = TestDir::new("deadline");
    let pki = pki(&dir.0);
    let instance = PricingInstance::start(&dir.0, &pki, 0).await;
    let mut client = pricing_client(&instance, &pki).await;

    // Server streaming: tonic's own timers cover only the response headers; the rounds are bounded
    // by the server's reading of `grpc-timeout`.
    let mut request = Request::new(StreamPricesRequest {
        skus: vec!["SKU-0003".into()],
        interval_ms: 2_000,
        max_updates: 5,
    });
    request.set_timeout(Duration::from_millis(300));
    let started = Instant::now();
    let mut stream = client
        .stream_prices(request)
        .await
        .expect("StreamPrices")
        .into_inner();
    let first = stream.message().await.expect("round 0").expect("an update");
    assert_eq!(first.sequence, 0);
    expect_status(stream.message().await, Code::DeadlineExceeded, "deadline");
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(250) && elapsed < Duration::from_millis(1_500),
        "{elapsed:?}"
    );

    // Bidirectional: an idle session ends at the deadline.
    let (offers, outgoing) = mpsc::channel(4);
    let mut request = Request::new(ReceiverStream::new(outgoing));
    request.set_timeout(Duration::from_millis(300));
    let mut counters = client
        .live_pricing(request)
        .await
        .expect("LivePricing")
        .into_inner();
    offers
        .send(Offer {
            sku: "SKU-0001".into(),
            quantity: 1,
            offered_unit_price_cents: 20_000,
        })
        .await
        .expect("send");
    assert!(counters.message().await.expect("counter").is_some());
    expect_status(counters.message().await, Code::DeadlineExceeded, "deadline");
    drop(offers);

    let handled = "causeway_grpc_server_handled_total";
    wait_until("the server counts both", Duration::from_secs(3), || {
        instance.counter(
            handled,
            "method=\"StreamPrices\",code=\"DEADLINE_EXCEEDED\"",
        ) == 1.0
            && instance.counter(handled, "method=\"LivePricing\",code=\"DEADLINE_EXCEEDED\"") == 1.0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn cancelled_stream_stops_the_server_task() {
    let dir = TestDir::new("cancel");
    let pki = pki(&dir.0);
    let instance = PricingInstance::start(&dir.0, &pki, 0).await;
    let mut client = pricing_client(&instance, &pki).await;
    let active = "causeway_grpc_server_active_streams";
    let labels = "method=\"StreamPrices\"";

    let mut stream = client
        .stream_prices(StreamPricesRequest {
            skus: vec!["SKU-0004".into()],
            interval_ms: 20,
            max_updates: 1000,
        })
        .await
        .expect("StreamPrices")
        .into_inner();
    for round in 0..3 {
        let update = stream.message().await.expect("update").expect("open");
        assert_eq!(update.sequence, round);
    }
    assert_eq!(instance.counter(active, labels), 1.0);
    drop(stream);
    wait_until("the stream task ends", Duration::from_secs(3), || {
        instance.counter(active, labels) == 0.0
    })
    .await;
    assert_eq!(
        instance.counter(
            "causeway_grpc_server_handled_total",
            "method=\"StreamPrices\",code=\"CANCELLED\""
        ),
        1.0
    );
    // The connection is still good for the next call.
    assert!(client.get_price(get_price("SKU-0004")).await.is_ok());
}

#[tokio::test(flavor = "multi_thread")]
async fn health_reflection_and_graceful_shutdown() {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let dir = TestDir::new("health");
    let pki = pki(&dir.0);
    let mut instance = PricingInstance::start(&dir.0, &pki, 0).await;

    // gRPC is HTTP/2 only: a client that offers only HTTP/1.1 is told so at the handshake.
    let http1_only = causeway_core::tls::client_config_with_alpn(&pki.ca, &[b"http/1.1"])
        .expect("client TLS config");
    let tcp = tokio::net::TcpStream::connect(instance.addr)
        .await
        .expect("connect");
    let refused = tokio_rustls::TlsConnector::from(http1_only)
        .connect(
            tokio_rustls::rustls::pki_types::ServerName::try_from("pricing-service.internal")
                .expect("name"),
            tcp,
        )
        .await
        .map(|_| ())
        .expect_err("an HTTP/1.1-only handshake is refused");
    assert!(
        refused.to_string().contains("NoApplicationProtocol"),
        "{refused}"
    );

    let channel = direct_channel(instance.addr, &pki.ca, "pricing-service.internal").await;
    let mut health = HealthClient::new(channel.clone());
    for service in ["", "pricing.v1.PricingService"] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .expect("health check")
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32, "{service:?}");
    }
    expect_status(
        health
            .check(HealthCheckRequest {
                service: "no.such.Service".into(),
            })
            .await,
        Code::NotFound,
        "",
    );

    let mut reflection = ServerReflectionClient::new(channel.clone());
    let requests = [
        MessageRequest::ListServices(String::new()),
        MessageRequest::FileContainingSymbol("pricing.v1.PricingService".into()),
    ]
    .map(|message| ServerReflectionRequest {
        host: String::new(),
        message_request: Some(message),
    });
    let mut answers = reflection
        .server_reflection_info(tokio_stream::iter(requests))
        .await
        .expect("reflection")
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) = answers
        .message()
        .await
        .expect("answer")
        .and_then(|a| a.message_response)
    else {
        panic!("expected a service list");
    };
    let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    names.sort();
    assert_eq!(
        names,
        [
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
            "pricing.v1.PricingService"
        ]
    );
    let Some(MessageResponse::FileDescriptorResponse(files)) = answers
        .message()
        .await
        .expect("answer")
        .and_then(|a| a.message_response)
    else {
        panic!("expected a file descriptor");
    };
    let file = String::from_utf8_lossy(&files.file_descriptor_proto[0]).to_string();
    assert!(file.contains("pricing/v1/pricing.proto") && file.contains("QuoteBasket"));

    // Shutdown ends open streams with UNAVAILABLE (so that clients go elsewhere) and returns.
    let mut stream = PricingServiceClient::new(channel.clone())
        .stream_prices(StreamPricesRequest {
            skus: vec!["SKU-0005".into()],
            interval_ms: 50,
            max_updates: 1000,
        })
        .await
        .expect("StreamPrices")
        .into_inner();
    assert!(stream.message().await.expect("update").is_some());
    let (served, took) = instance.stop().await;
    served.expect("serve ends cleanly");
    assert!(took < Duration::from_millis(2_500), "{took:?}");
    loop {
        match stream.message().await {
            Ok(Some(_)) => continue,
            other => {
                expect_status(other, Code::Unavailable, "shutting down");
                break;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn balanced_channel_spreads_calls_honours_deadlines_and_survives_a_crash() {
    let dir = TestDir::new("balance");
    let pki = pki(&dir.0);
    let (_discovery, mut instances, balancer) = two_registered_instances(&dir.0, &pki).await;
    let endpoints = balancer
        .wait_for_endpoints(2, Duration::from_secs(10))
        .await
        .expect("both instances discovered");
    assert_eq!(
        endpoints.iter().map(|e| e.addr).collect::<Vec<_>>(),
        instances.iter().map(|i| i.addr).collect::<Vec<_>>()
    );
    assert_eq!(balancer.server_name(), "pricing-service.internal");

    // Per request, over one channel: both instances answer.
    let trace = parent_trace();
    let mut served_by = std::collections::HashMap::<String, usize>::new();
    for _ in 0..60 {
        let response = price_of(&balancer, "SKU-0001", &trace)
            .await
            .expect("GetPrice");
        let traceresponse = response
            .metadata()
            .get("traceresponse")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        assert!(
            traceresponse.starts_with(&format!("00-{PARENT_TRACE}-")),
            "{traceresponse}"
        );
        *served_by
            .entry(response.into_inner().served_by)
            .or_default() += 1;
    }
    assert_eq!(served_by.len(), 2, "{served_by:?}");
    assert!(served_by.values().all(|calls| *calls >= 5), "{served_by:?}");

    // A slow answer: the caller's deadline ends the call, and the server's work with it.
    let started = Instant::now();
    let (result, report) = balancer
        .unary(
            "GetPrice",
            GetPriceRequest {
                sku: "SKU-0001".into(),
            },
            &trace,
            GrpcCallOptions {
                deadline: Some(Duration::from_millis(300)),
                attempt_timeout: None,
            },
            |channel, mut request| {
                request
                    .metadata_mut()
                    .insert(DEBUG_DELAY_METADATA, "3000".parse().expect("metadata"));
                async move { PricingServiceClient::new(channel).get_price(request).await }
            },
        )
        .await;
    expect_status(result, Code::DeadlineExceeded, "");
    assert_eq!(report.attempts.len(), 1, "deadlines are not retried");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    let handled = "causeway_grpc_server_handled_total";
    wait_until(
        "the server stops the slow call",
        Duration::from_secs(3),
        || {
            instances
                .iter()
                .map(|i| {
                    i.counter(handled, "method=\"GetPrice\",code=\"DEADLINE_EXCEEDED\"")
                        + i.counter(handled, "method=\"GetPrice\",code=\"CANCELLED\"")
                })
                .sum::<f64>()
                == 1.0
        },
    )
    .await;
    let ok_before: f64 = instances
        .iter()
        .map(|i| i.counter(handled, "method=\"GetPrice\",code=\"OK\""))
        .sum();
    assert_eq!(ok_before, 60.0, "the slow call never completed");

    // Crash one instance under load: it stays in DNS, yet only calls in flight at the crash may
    // fail (the helper retries those too, as a broken connection is UNAVAILABLE), and none
    // started after it.
    let crash_at: Arc<Mutex<Option<Instant>>> = Arc::new(Mutex::new(None));
    let stop = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(AtomicUsize::new(0));
    // (started, served_by or the error)
    let outcomes = Arc::new(Mutex::new(Vec::<(Instant, Result<String, String>)>::new()));
    const WORKERS: usize = 4;
    let workers: Vec<_> = (0..WORKERS)
        .map(|_| {
            let (balancer, stop, calls, outcomes) = (
                balancer.clone(),
                stop.clone(),
                calls.clone(),
                outcomes.clone(),
            );
            tokio::spawn(async move {
                let trace = parent_trace();
                while !stop.load(Ordering::SeqCst) {
                    let started = Instant::now();
                    let result = price_of(&balancer, "SKU-0002", &trace).await;
                    calls.fetch_add(1, Ordering::SeqCst);
                    let outcome = result
                        .map(|response| response.into_inner().served_by)
                        .map_err(|status| format!("{status:?}"));
                    outcomes.lock().expect("lock").push((started, outcome));
                }
            })
        })
        .collect();
    wait_until("calls flow", Duration::from_secs(10), || {
        calls.load(Ordering::SeqCst) >= 80
    })
    .await;
    *crash_at.lock().expect("lock") = Some(Instant::now());
    instances[1].crash();
    let at_crash = calls.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(1)).await;
    wait_until(
        "calls flow after the crash",
        Duration::from_secs(15),
        || calls.load(Ordering::SeqCst) >= at_crash + 150,
    )
    .await;
    stop.store(true, Ordering::SeqCst);
    for worker in workers {
        worker.await.expect("worker");
    }
    let crash_at = crash_at.lock().expect("lock").expect("crashed");
    let outcomes = outcomes.lock().expect("lock").clone();
    let failures: Vec<&String> = outcomes
        .iter()
        .filter_map(|(_, o)| o.as_ref().err())
        .collect();
    assert!(
        failures.len() <= WORKERS,
        "only calls in flight at the crash may fail: {failures:?}"
    );
    // The runtime's sockets close a moment after `shutdown_background` returns.
    let settled = crash_at + Duration::from_millis(100);
    let later: Vec<&Result<String, String>> = outcomes
        .iter()
        .filter(|(started, _)| *started > settled)
        .map(|(_, outcome)| outcome)
        .collect();
    assert!(later.len() >= 100, "{}", later.len());
    assert!(
        later
            .iter()
            .all(|outcome| outcome.as_deref() == Ok("pricing-service-1")),
        "{later:?}"
    );
    println!(
        "{} calls, {} failed (in flight at the crash), {} after it all answered by pricing-service-1",
        outcomes.len(),
        failures.len(),
        later.len()
    );
    let in_rotation: Vec<String> = balancer
        .endpoints()
        .into_iter()
        .map(|e| e.instance)
        .collect();
    assert_eq!(
        in_rotation,
        ["pricing-service-1"],
        "the dead instance is out of rotation"
    );
}

/// A Pricing Service that never answers in time.
struct SlowPricing;

#[tonic::async_trait]
impl PricingService for SlowPricing {
    async fn get_price(&self, _: Request<GetPriceRequest>) -> Result<Response<Price>, Status> {
        tokio::time::sleep(Duration::from_secs(10)).await;
        Err(Status::internal("too late"))
    }

    type StreamPricesStream = ReceiverStream<Result<PriceUpdate, Status>>;

    async fn stream_prices(
        &self,
        _: Request<StreamPricesRequest>,
    ) -> Result<Response<Self::StreamPricesStream>, Status> {
        Err(Status::unimplemented("slow stub"))
    }

    async fn quote_basket(
        &self,
        _: Request<Streaming<BasketItem>>,
    ) -> Result<Response<Quote>, Status> {
        Err(Status::unimplemented("slow stub"))
    }

    type LivePricingStream = ReceiverStream<Result<Counter, Status>>;

    async fn live_pricing(
        &self,
        _: Request<Streaming<Offer>>,
    ) -> Result<Response<Self::LivePricingStream>, Status> {
        Err(Status::unimplemented("slow stub"))
    }
}

struct HttpAnswer {
    status: http::StatusCode,
    headers: HeaderMap,
    body: serde_json::Value,
}

async fn get(app: &axum::Router, path: &str) -> HttpAnswer {
    use tower::ServiceExt;
    let request = http::Request::get(path)
        .header("traceparent", PARENT)
        .body(axum::body::Body::empty())
        .expect("request");
    let response = app.clone().oneshot(request).await.expect("infallible");
    let (parts, body) = response.into_parts();
    let bytes = axum::body::to_bytes(body, 1 << 20).await.expect("body");
    HttpAnswer {
        status: parts.status,
        headers: parts.headers,
        body: serde_json::from_slice(&bytes).expect("JSON body"),
    }
}

fn inventory_deps(dir: &Path) -> ServiceDeps {
    ServiceDeps {
        instance: "inventory-service-1".into(),
        database_url: std::env::var("CAUSEWAY_TEST_DATABASE_URL").ok(),
        default_sqlite_path: dir.join("db").join("inventory-service.db"),
        http_metrics: HttpMetrics::default(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn inventory_combines_stock_with_the_grpc_price() {
    let dir = TestDir::new("inventory");
    let pki = pki(&dir.0);
    let (_discovery, _instances, balancer) = two_registered_instances(&dir.0, &pki).await;
    balancer
        .wait_for_endpoints(2, Duration::from_secs(10))
        .await
        .expect("discovered");
    let app = causeway_services::inventory::app(&inventory_deps(&dir.0), balancer)
        .await
        .expect("inventory app");

    let answer = get(&app, "/inventory/SKU-0001").await;
    assert_eq!(answer.status, http::StatusCode::OK, "{}", answer.body);
    let served_by = answer.body["price"]["servedBy"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(served_by.starts_with("pricing-service-"), "{}", answer.body);
    assert_eq!(
        answer.body,
        serde_json::json!({
            "sku": "SKU-0001",
            "name": "Mechanical keyboard",
            "inStock": 42,
            "warehouse": "AMS-1",
            "price": {"unitPriceCents": 12999, "currency": "USD", "servedBy": served_by}
        })
    );
    let timings = causeway_core::server_timing::parse(&answer.headers);
    let names: Vec<&str> = timings.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "grpc",
            "pricing-db",
            "pricing-service",
            "inventory-db",
            "inventory-service"
        ],
        "{timings:?}"
    );
    let grpc = timings[0].description.clone().unwrap_or_default();
    // GetPriceRequest{sku: "SKU-0001"}: tag, length, 8 bytes.
    assert!(
        grpc.starts_with(&format!(
            "GetPrice via {served_by} over HTTP/2+TLS, request 10 bytes, response "
        )),
        "{grpc}"
    );
    assert!(
        grpc.contains("over 2 instances of pricing-service"),
        "{grpc}"
    );
    assert_eq!(
        answer
            .headers
            .get("x-request-id")
            .and_then(|v| v.to_str().ok()),
        Some(PARENT_TRACE),
        "the request id follows the trace"
    );

    for (path, status, code, fragment) in [
        ("/inventory/SKU-12", 400, "invalid_sku", SKU_FORMAT),
        (
            "/inventory/SKU-0009",
            404,
            "price_not_found",
            "no price for SKU-0009",
        ),
        (
            "/inventory/SKU-0006",
            404,
            "sku_not_found",
            "no stock record for SKU-0006",
        ),
        ("/inventory/SKU-0001/extra", 404, "not_found", "no route"),
    ] {
        let answer = get(&app, path).await;
        assert_eq!(answer.status.as_u16(), status, "{path}: {}", answer.body);
        assert_eq!(answer.body["error"], code, "{path}: {}", answer.body);
        let message = answer.body["message"].as_str().unwrap_or_default();
        assert!(message.contains(fragment), "{path}: {message}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn inventory_maps_unavailable_and_deadline_exceeded() {
    let dir = TestDir::new("inventory-errors");
    let pki = pki(&dir.0);
    let discovery = start_discovery().await;
    let config = ClientConfig {
        attempt_timeout_ms: 300,
        deadline_ms: 600,
        ..ClientConfig::default()
    };

    // Nobody serves pricing-service: 503 at once.
    let nobody = Arc::new(balancer(
        &discovery,
        "pricing-service",
        &pki.ca,
        config.clone(),
    ));
    let app = causeway_services::inventory::app(&inventory_deps(&dir.0), nobody)
        .await
        .expect("inventory app");
    let started = Instant::now();
    let answer = get(&app, "/inventory/SKU-0001").await;
    assert_eq!(
        answer.status,
        http::StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        answer.body
    );
    assert_eq!(answer.body["error"], "pricing_unavailable");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );

    // A Pricing Service that hangs: 504 at the deadline.
    let slow_cert = pki
        .authority
        .issue("slow-pricing", &["slow-pricing.internal".into()])
        .expect("issue");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let identity = Identity::from_pem(
        std::fs::read(&slow_cert.cert).expect("cert"),
        std::fs::read(&slow_cert.key).expect("key"),
    );
    tokio::spawn(
        Server::builder()
            .tls_config(ServerTlsConfig::new().identity(identity))
            .expect("tls")
            .add_service(PricingServiceServer::new(SlowPricing))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    register(&discovery, "slow-pricing", "slow-pricing-1", addr).await;
    let slow = Arc::new(balancer(&discovery, "slow-pricing", &pki.ca, config));
    slow.wait_for_endpoints(1, Duration::from_secs(10))
        .await
        .expect("discovered");
    let app = causeway_services::inventory::app(&inventory_deps(&dir.0), slow)
        .await
        .expect("inventory app");
    let started = Instant::now();
    let answer = get(&app, "/inventory/SKU-0001").await;
    let elapsed = started.elapsed();
    assert_eq!(
        answer.status,
        http::StatusCode::GATEWAY_TIMEOUT,
        "{}",
        answer.body
    );
    assert_eq!(answer.body["error"], "pricing_timeout");
    assert!(
        elapsed >= Duration::from_millis(250) && elapsed < Duration::from_millis(1_500),
        "{elapsed:?}"
    );
    let timings = causeway_core::server_timing::parse(&answer.headers);
    let grpc = timings
        .iter()
        .find(|t| t.name == "grpc")
        .and_then(|t| t.description.clone())
        .unwrap_or_default();
    assert!(
        grpc.contains("no answer; attempts: DEADLINE_EXCEEDED"),
        "{grpc}"
    );
}

/// Why Python cannot run the client, if it cannot.
fn python_missing() -> Option<String> {
    let probe = std::process::Command::new("python3")
        .args(["-c", "import grpc, grpc_tools, grpc_health"])
        .output();
    match probe {
        Err(err) => Some(format!("python3 cannot be run: {err}")),
        Ok(output) if !output.status.success() => Some(format!(
            "python3 lacks grpcio/grpcio-tools/grpcio-health-checking: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        )),
        Ok(_) => None,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn python_client_speaks_to_pricing() {
    if let Some(why) = python_missing() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must run the Python gRPC client: {why}; \
             install with `python3 -m pip install grpcio grpcio-tools grpcio-health-checking`"
        );
        eprintln!(
            "SKIPPED python_client_speaks_to_pricing: {why}; \
             install with `python3 -m pip install grpcio grpcio-tools grpcio-health-checking`"
        );
        return;
    }
    let dir = TestDir::new("python");
    let pki = pki(&dir.0);
    let instance = PricingInstance::start(&dir.0, &pki, 0).await;
    let stubs = dir.0.join("stubs");
    std::fs::create_dir_all(&stubs).expect("stubs dir");
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let proto_root = manifest.join("../../proto");

    let generated = tokio::process::Command::new("python3")
        .args(["-m", "grpc_tools.protoc", "-I"])
        .arg(&proto_root)
        .arg("--python_out")
        .arg(&stubs)
        .arg("--grpc_python_out")
        .arg(&stubs)
        .arg("pricing/v1/pricing.proto")
        .output()
        .await
        .expect("run grpc_tools.protoc");
    assert!(
        generated.status.success(),
        "protoc failed: {}",
        String::from_utf8_lossy(&generated.stderr)
    );

    let run = tokio::process::Command::new("python3")
        .arg(manifest.join("tests/python/pricing_client.py"))
        .arg("--target")
        .arg(instance.addr.to_string())
        .arg("--ca")
        .arg(&pki.ca)
        .arg("--stubs")
        .arg(&stubs)
        .arg("--server-name")
        .arg("pricing-service.internal")
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(120), run)
        .await
        .expect("the Python client finishes")
        .expect("run the Python client");
    let stdout = String::from_utf8_lossy(&output.stdout);
    println!("{stdout}");
    assert!(
        output.status.success(),
        "the Python client failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("all checks passed"), "{stdout}");
}

/// A message over a size limit is RESOURCE_EXHAUSTED wherever it is caught, as grpc-go,
/// grpc-java and Envoy answer (tonic's codec alone says OUT_OF_RANGE): by Pricing for a request
/// of any call kind, and by the client library's channel for a request over the generated
/// client's send limit or a response over the channel's receive limit. Each side keeps serving.
#[tokio::test(flavor = "multi_thread")]
async fn oversized_messages_are_resource_exhausted() {
    let dir = TestDir::new("oversized");
    let pki = pki(&dir.0);
    let instance = PricingInstance::start(&dir.0, &pki, 0).await;
    let huge = "S".repeat(70 * 1024);

    let mut client = pricing_client(&instance, &pki).await;
    expect_status(
        client.get_price(get_price(&huge)).await,
        Code::ResourceExhausted,
        "larger than max",
    );
    let basket = [BasketItem {
        sku: huge.clone(),
        quantity: 1,
    }];
    expect_status(
        client.quote_basket(tokio_stream::iter(basket)).await,
        Code::ResourceExhausted,
        "larger than max",
    );
    let offers = [Offer {
        sku: huge.clone(),
        quantity: 1,
        offered_unit_price_cents: 1,
    }];
    let mut session = client
        .live_pricing(tokio_stream::iter(offers))
        .await
        .expect("LivePricing opens")
        .into_inner();
    expect_status(
        session.message().await,
        Code::ResourceExhausted,
        "larger than max",
    );
    assert!(client.get_price(get_price("SKU-0001")).await.is_ok());

    // The client library's channel: a request over the generated client's send limit...
    let tls = causeway_core::tls::client_config(&pki.ca).expect("client TLS");
    let channel = causeway_client::grpc::GrpcChannel::fixed(
        "pricing-service.internal",
        instance.addr,
        tls,
        Duration::from_secs(2),
    )
    .expect("channel");
    let mut small_sends = PricingServiceClient::new(channel.clone()).max_encoding_message_size(16);
    expect_status(
        small_sends.get_price(get_price(&"S".repeat(100))).await,
        Code::ResourceExhausted,
        "",
    );
    assert!(small_sends.get_price(get_price("SKU-0001")).await.is_ok());
    // Also when the call's response has begun: the second offer is over the limit.
    let offers = [
        Offer {
            sku: "SKU-0001".into(),
            quantity: 1,
            offered_unit_price_cents: 1,
        },
        Offer {
            sku: "S".repeat(100),
            quantity: 1,
            offered_unit_price_cents: 1,
        },
    ];
    let (offer_sender, offer_receiver) = mpsc::channel(2);
    let mut session = small_sends
        .live_pricing(ReceiverStream::new(offer_receiver))
        .await
        .expect("LivePricing opens")
        .into_inner();
    let [first, second] = offers;
    offer_sender.send(first).await.expect("send");
    assert!(session.message().await.expect("counter-offer").is_some());
    offer_sender.send(second).await.expect("send");
    expect_status(session.message().await, Code::ResourceExhausted, "");
    // ...and a response over the channel's receive limit.
    let mut small_answers = PricingServiceClient::new(channel.with_max_decoding_message_size(8));
    expect_status(
        small_answers.get_price(get_price("SKU-0001")).await,
        Code::ResourceExhausted,
        "larger than max",
    );
    // Streamed responses are limited alike.
    let mut stream = small_answers
        .stream_prices(StreamPricesRequest {
            skus: vec!["SKU-0001".into()],
            interval_ms: 10,
            max_updates: 1,
        })
        .await
        .expect("StreamPrices opens")
        .into_inner();
    expect_status(
        stream.message().await,
        Code::ResourceExhausted,
        "larger than max",
    );
}

/// Both reflection versions are served and list each other; an unknown symbol or file is a
/// `NOT_FOUND` ErrorResponse on the stream, which stays open and answers the next request.
#[tokio::test(flavor = "multi_thread")]
async fn reflection_answers_errors_on_the_stream_in_both_versions() {
    let dir = TestDir::new("reflection");
    let pki = pki(&dir.0);
    let instance = PricingInstance::start(&dir.0, &pki, 0).await;
    let channel = direct_channel(instance.addr, &pki.ca, "pricing-service.internal").await;
    let expected_services = [
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
        "pricing.v1.PricingService",
    ];

    macro_rules! check_version {
        ($version:ident) => {{
            use tonic_reflection::pb::$version::ServerReflectionRequest;
            use tonic_reflection::pb::$version::server_reflection_client::ServerReflectionClient;
            use tonic_reflection::pb::$version::server_reflection_request::MessageRequest;
            use tonic_reflection::pb::$version::server_reflection_response::MessageResponse;

            let version = stringify!($version);
            let (requests, outgoing) = mpsc::channel(4);
            let mut answers = ServerReflectionClient::new(channel.clone())
                .server_reflection_info(ReceiverStream::new(outgoing))
                .await
                .expect("reflection stream")
                .into_inner();
            let mut ask = async |message: MessageRequest| {
                requests
                    .send(ServerReflectionRequest {
                        host: String::new(),
                        message_request: Some(message),
                    })
                    .await
                    .expect("stream open");
                tokio::time::timeout(Duration::from_secs(5), answers.message())
                    .await
                    .expect("answered in time")
                    .unwrap_or_else(|status| panic!("{version}: stream ended: {status:?}"))
                    .and_then(|answer| answer.message_response)
                    .unwrap_or_else(|| panic!("{version}: no answer"))
            };
            for unknown in [
                MessageRequest::FileContainingSymbol("no.such.Symbol".into()),
                MessageRequest::FileByFilename("no/such.proto".into()),
            ] {
                match ask(unknown).await {
                    MessageResponse::ErrorResponse(error) => {
                        assert_eq!(
                            error.error_code,
                            Code::NotFound as i32,
                            "{version}: {error:?}"
                        );
                        assert!(error.error_message.contains("not found"), "{error:?}");
                    }
                    other => panic!("{version}: expected an ErrorResponse, got {other:?}"),
                }
            }
            let MessageResponse::ListServicesResponse(list) =
                ask(MessageRequest::ListServices(String::new())).await
            else {
                panic!("{version}: expected a service list after the errors");
            };
            let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
            names.sort();
            assert_eq!(names, expected_services, "{version}");
            let MessageResponse::FileDescriptorResponse(files) = ask(
                MessageRequest::FileContainingSymbol("pricing.v1.PricingService.GetPrice".into()),
            )
            .await
            else {
                panic!("{version}: expected a file descriptor");
            };
            let file = String::from_utf8_lossy(&files.file_descriptor_proto[0]).to_string();
            assert!(file.contains("pricing/v1/pricing.proto"), "{version}");
            drop(requests);
            assert!(
                answers.message().await.expect("clean end").is_none(),
                "{version}"
            );
        }};
    }
    check_version!(v1);
    check_version!(v1alpha);
}
