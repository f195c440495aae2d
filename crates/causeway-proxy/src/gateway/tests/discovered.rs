//! Routes to discovered services on the proxy engine: a real registry and DNS server in this
//! process, real HTTP/2-over-TLS instances with certificates from a local CA, and the gateway
//! serving plain HTTP in front.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use causeway_core::registry_api::InstanceRecord;
use causeway_core::serve::{ShutdownTrigger, shutdown_channel};
use causeway_core::telemetry::Metrics;
use causeway_core::tls::LocalCa;
use causeway_core::topology::{
    ClientConfig, DiscoveryConfig, ReverseProxyConfig, RouteConfig, ServerTimingPolicy,
};
use causeway_discovery::{DiscoveryServer, Registry};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use prometheus_client::registry::Registry as Prometheus;

use super::{NEXT_DIR, serve_gateway, test_gateway};
use crate::upstream::{BalancePolicy, UpstreamConfig};

const SERVICE: &str = "order-service";

/// The registry and DNS server, a CA, and the instances started so far.
struct Fixture {
    registry: Registry,
    dns: std::net::SocketAddr,
    ca: LocalCa,
    dir: std::path::PathBuf,
    _discovery: ShutdownTrigger,
    /// Stops the gateways' health checkers when the test ends.
    checkers: std::sync::Mutex<Vec<ShutdownTrigger>>,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One instance of the service: HTTP/2 over TLS, answering `status` with its name, the path
/// and the trace headers it saw.
struct Instance {
    name: &'static str,
    addr: std::net::SocketAddr,
    hits: Arc<AtomicUsize>,
    status: Arc<AtomicU16>,
    stop: Option<ShutdownTrigger>,
    task: tokio::task::JoinHandle<()>,
}

impl Instance {
    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    /// Dies: stops listening and closes its connections (still listed in discovery, as a
    /// killed process is until its heartbeats expire).
    async fn die(&mut self) {
        drop(self.stop.take());
        self.task.abort();
        let deadline = Instant::now() + Duration::from_secs(5);
        while tokio::net::TcpStream::connect(self.addr).await.is_ok() {
            assert!(Instant::now() < deadline, "{} still accepts", self.name);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Fixture {
    async fn start() -> Self {
        let config = DiscoveryConfig {
            dns_listen: ([127, 0, 0, 1], 0).into(),
            api_listen: ([127, 0, 0, 1], 0).into(),
            expiry_ms: 60_000,
            record_ttl_secs: 1,
            ..DiscoveryConfig::default()
        };
        let registry = Registry::new(Duration::from_millis(config.expiry_ms));
        let mut metrics = Metrics::new("discovery", "discovery-1");
        let server = DiscoveryServer::bind(&config, registry.clone(), &mut metrics)
            .await
            .expect("bind discovery");
        let dns = server.dns_addr;
        let (trigger, shutdown) = shutdown_channel();
        tokio::spawn(server.run(metrics.into_shared(), shutdown));
        let dir = std::env::temp_dir().join(format!(
            "causeway-discovered-test-{}-{}",
            std::process::id(),
            NEXT_DIR.fetch_add(1, Ordering::Relaxed)
        ));
        let ca = LocalCa::load_or_create(&dir).expect("CA");
        Self {
            registry,
            dns,
            ca,
            dir,
            _discovery: trigger,
            checkers: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// Starts an instance and registers it.
    async fn instance(&self, name: &'static str) -> Instance {
        let paths = self
            .ca
            .issue(name, &[format!("{SERVICE}.internal")])
            .expect("certificate");
        let tls = tokio_rustls::TlsAcceptor::from(
            causeway_core::tls::server_config(&paths).expect("server config"),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let status = Arc::new(AtomicU16::new(200));
        let (counter, answer) = (hits.clone(), status.clone());
        let make_service = move |_peer| {
            let (counter, answer) = (counter.clone(), answer.clone());
            hyper::service::service_fn(move |request: Request<Incoming>| {
                counter.fetch_add(1, Ordering::SeqCst);
                let seen = |name: &str| {
                    request
                        .headers()
                        .get(name)
                        .and_then(|value| value.to_str().ok())
                        .unwrap_or("-")
                        .to_string()
                };
                let body = format!(
                    "{name} saw {} {} over {:?} authority={} request-id={} traceparent={}",
                    request.method(),
                    request.uri().path_and_query().map_or("", |pq| pq.as_str()),
                    request.version(),
                    request.uri().authority().map_or("-", |a| a.as_str()),
                    seen("x-request-id"),
                    seen("traceparent") != "-",
                );
                let mut response = Response::new(Full::new(Bytes::from(body)));
                *response.status_mut() =
                    StatusCode::from_u16(answer.load(Ordering::SeqCst)).unwrap();
                async move { Ok::<_, std::convert::Infallible>(response) }
            })
        };
        let (stop, shutdown) = shutdown_channel();
        let task = tokio::spawn(causeway_core::serve::serve(
            listener,
            Some(tls),
            make_service,
            shutdown,
            Duration::ZERO,
        ));
        self.register(name, addr);
        Instance {
            name,
            addr,
            hits,
            status,
            stop: Some(stop),
            task,
        }
    }

    fn register(&self, name: &str, addr: std::net::SocketAddr) {
        self.register_with_admin(name, addr, None);
    }

    fn register_with_admin(
        &self,
        name: &str,
        addr: std::net::SocketAddr,
        admin_addr: Option<std::net::SocketAddr>,
    ) {
        self.registry.upsert(InstanceRecord {
            service: SERVICE.into(),
            instance: name.into(),
            addr,
            admin_addr,
            pid: None,
        });
    }

    /// A plain-HTTP admin listener whose `/healthz` answers `status`.
    async fn admin(&self, status: StatusCode) -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let make_service = move |_peer| {
            hyper::service::service_fn(move |request: Request<Incoming>| {
                let status = if request.uri().path() == "/healthz" {
                    status
                } else {
                    StatusCode::NOT_FOUND
                };
                let mut response = Response::new(Full::new(Bytes::new()));
                *response.status_mut() = status;
                async move { Ok::<_, std::convert::Infallible>(response) }
            })
        };
        let (stop, shutdown) = shutdown_channel();
        self.checkers.lock().unwrap().push(stop);
        tokio::spawn(causeway_core::serve::serve(
            listener,
            None,
            make_service,
            shutdown,
            Duration::ZERO,
        ));
        addr
    }

    /// A gateway with one public route `/orders/` to the service, with `policy`; its upstream
    /// metrics are registered in the returned registry.
    async fn gateway(
        &self,
        policy: UpstreamConfig,
    ) -> (std::net::SocketAddr, ShutdownTrigger, Prometheus) {
        let mut metrics = Metrics::new("reverse-proxy", "test");
        let settings = causeway_client::ClientSettings {
            dns_addr: self.dns,
            zone: "internal".into(),
            config: ClientConfig::default(),
        };
        let client =
            causeway_client::ServiceClient::new(settings, &self.ca.ca_cert_path(), &mut metrics)
                .expect("client");
        let config = ReverseProxyConfig {
            routes: vec![RouteConfig {
                prefix: "/orders/".into(),
                service: SERVICE.into(),
                strip_prefix: None,
                auth: false,
                upstream: None,
                policy,
            }],
            request_timeout_ms: 3000,
            // These tests read which instance answered from the hop's Server-Timing entry.
            server_timing: ServerTimingPolicy::Always,
            ..ReverseProxyConfig::default()
        };
        let gateway = test_gateway(&config, client, &mut metrics);
        let mut prometheus = Prometheus::default();
        gateway.register_upstream_metrics(&mut prometheus);
        let (checkers, shutdown) = shutdown_channel();
        gateway.spawn_health_checkers(&shutdown);
        self.checkers.lock().unwrap().push(checkers);
        let (addr, trigger) = serve_gateway(Arc::new(gateway)).await;
        (addr, trigger, prometheus)
    }
}

struct Answer {
    status: StatusCode,
    body: String,
    server_timing: String,
}

async fn send(gateway: std::net::SocketAddr, method: http::Method, path: &str) -> Answer {
    send_with(gateway, method, path, &[]).await
}

async fn send_with(
    gateway: std::net::SocketAddr,
    method: http::Method,
    path: &str,
    headers: &[(&str, &str)],
) -> Answer {
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let body = if method == http::Method::POST {
        Bytes::from_static(b"{\"item\":1}")
    } else {
        Bytes::new()
    };
    let mut request = Request::builder()
        .method(method)
        .uri(format!("http://{gateway}{path}"))
        .header("x-request-id", "req-42");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request.body(Full::new(body)).unwrap();
    let response = tokio::time::timeout(Duration::from_secs(10), client.request(request))
        .await
        .expect("the gateway answers in time")
        .expect("the gateway answers");
    let status = response.status();
    let server_timing = response
        .headers()
        .get_all("server-timing")
        .iter()
        .filter_map(|value| value.to_str().ok())
        .collect::<Vec<_>>()
        .join(", ");
    let body = response.into_body().collect().await.unwrap().to_bytes();
    Answer {
        status,
        body: String::from_utf8_lossy(&body).into_owned(),
        server_timing,
    }
}

async fn get(gateway: std::net::SocketAddr) -> Answer {
    send(gateway, http::Method::GET, "/orders/7?x=1").await
}

fn round_robin() -> UpstreamConfig {
    UpstreamConfig {
        balance: BalancePolicy::RoundRobin,
        ..causeway_core::topology::service_route_policy()
    }
}

/// The value of a metric sample whose line contains every one of `parts`, or 0.
fn sample(prometheus: &Prometheus, name: &str, parts: &[&str]) -> f64 {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, prometheus).unwrap();
    text.lines()
        .filter(|line| line.starts_with(name) && parts.iter().all(|part| line.contains(part)))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn requests_spread_over_discovered_instances_by_the_policy() {
    let fixture = Fixture::start().await;
    let instances = [
        fixture.instance("order-service-1").await,
        fixture.instance("order-service-2").await,
        fixture.instance("order-service-3").await,
    ];
    let (gateway, _stop, prometheus) = fixture.gateway(round_robin()).await;
    let mut served: HashMap<String, usize> = HashMap::new();
    for _ in 0..30 {
        let answer = get(gateway).await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
        // Over HTTP/2 with TLS to the service's name, trace context and request id passed on.
        assert!(
            answer.body.contains(
                "saw GET /orders/7?x=1 over HTTP/2.0 authority=order-service.internal \
                 request-id=req-42 traceparent=true"
            ),
            "{}",
            answer.body
        );
        let name = answer.body.split(' ').next().unwrap().to_string();
        // The hop's Server-Timing entry names the service and the instance that answered.
        assert!(
            answer.server_timing.contains(&format!(
                "routed /orders/7 to order-service ({name}) as /orders/7?x=1; client spoke"
            )),
            "{}",
            answer.server_timing
        );
        *served.entry(name).or_default() += 1;
    }
    // Round robin: an equal share each.
    for instance in &instances {
        assert_eq!(instance.hits(), 10, "{served:?}");
    }
    assert_eq!(
        sample(
            &prometheus,
            "upstream_attempts_total",
            &["endpoint=\"order-service-2\"", "outcome=\"200\""]
        ),
        10.0
    );
    assert_eq!(
        sample(
            &prometheus,
            "upstream_attempt_duration_seconds_count",
            &["upstream=\"order-service\"", "endpoint=\"order-service-3\""]
        ),
        10.0
    );
}

#[tokio::test]
async fn a_failing_instance_is_ejected_and_the_others_take_its_traffic() {
    let fixture = Fixture::start().await;
    let bad = fixture.instance("order-service-1").await;
    let good = [
        fixture.instance("order-service-2").await,
        fixture.instance("order-service-3").await,
    ];
    bad.status.store(500, Ordering::SeqCst);
    let mut policy = round_robin();
    policy.outlier.consecutive_5xx = 3;
    let (gateway, _stop, prometheus) = fixture.gateway(policy).await;
    let mut errors = 0;
    for _ in 0..30 {
        let answer = get(gateway).await;
        if answer.status == StatusCode::INTERNAL_SERVER_ERROR {
            errors += 1;
        } else {
            assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
        }
    }
    // Three 500s in a row (not a retryable status: passed on) ejected it for 30 s.
    assert_eq!(errors, 3);
    assert_eq!(bad.hits(), 3);
    assert_eq!(good[0].hits() + good[1].hits(), 27);
    assert_eq!(
        sample(
            &prometheus,
            "upstream_ejections_total",
            &["endpoint=\"order-service-1\""]
        ),
        1.0
    );
    assert_eq!(
        sample(
            &prometheus,
            "upstream_ejected",
            &["endpoint=\"order-service-1\""]
        ),
        1.0
    );
}

#[tokio::test]
async fn a_post_is_retried_after_a_503_only_when_it_carries_an_idempotency_key() {
    let fixture = Fixture::start().await;
    let busy = fixture.instance("order-service-1").await;
    let _fine = fixture.instance("order-service-2").await;
    busy.status.store(503, Ordering::SeqCst);
    let mut policy = round_robin();
    policy.outlier.enabled = false; // keep the busy instance in rotation
    let (gateway, _stop, prometheus) = fixture.gateway(policy).await;
    let mut unavailable = 0;
    for _ in 0..4 {
        let answer = send(gateway, http::Method::POST, "/orders/1/paid").await;
        if answer.status == StatusCode::SERVICE_UNAVAILABLE {
            unavailable += 1;
        }
    }
    assert_eq!(
        unavailable, 2,
        "a POST without a key is passed the 503, never sent twice"
    );
    let before = busy.hits();
    for _ in 0..4 {
        let answer = send_with(
            gateway,
            http::Method::POST,
            "/orders/1/paid",
            &[("idempotency-key", "pay-7")],
        )
        .await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
        assert!(
            answer.body.starts_with("order-service-2"),
            "{}",
            answer.body
        );
    }
    // Round robin alternates picks, so each keyed POST met the busy instance first, then was
    // retried on the other.
    assert_eq!(busy.hits() - before, 4);
    assert_eq!(
        sample(
            &prometheus,
            "upstream_retries_total",
            &["upstream=\"order-service\""]
        ),
        4.0
    );
}

#[tokio::test]
async fn requests_to_an_instance_that_died_are_retried_on_another() {
    let fixture = Fixture::start().await;
    let mut doomed = fixture.instance("order-service-1").await;
    let survivor = fixture.instance("order-service-2").await;
    let (gateway, _stop, prometheus) = fixture.gateway(round_robin()).await;
    // Both serve, so each has an open connection from the gateway.
    for _ in 0..4 {
        assert_eq!(get(gateway).await.status, StatusCode::OK);
    }
    assert_eq!(doomed.hits(), 2);
    doomed.die().await;

    // Still in DNS: every attempt that goes to it fails to connect and is retried on the
    // survivor (a POST too, since nothing was sent).
    for method in [http::Method::GET, http::Method::POST] {
        for _ in 0..4 {
            let answer = send(gateway, method.clone(), "/orders/1").await;
            assert_eq!(answer.status, StatusCode::OK, "{method}: {}", answer.body);
            assert!(
                answer.body.starts_with("order-service-2"),
                "{}",
                answer.body
            );
        }
    }
    assert_eq!(survivor.hits(), 2 + 8);
    let failed = sample(
        &prometheus,
        "upstream_attempts_total",
        &[
            "endpoint=\"order-service-1\"",
            "outcome=\"connect_failure\"",
        ],
    );
    assert!(failed >= 1.0, "connect failures counted: {failed}");
    assert_eq!(
        sample(
            &prometheus,
            "upstream_retries_total",
            &["upstream=\"order-service\""]
        ),
        failed
    );
}

#[tokio::test]
async fn instances_that_appear_or_leave_discovery_get_or_lose_traffic() {
    let fixture = Fixture::start().await;
    let first = fixture.instance("order-service-1").await;
    let (gateway, _stop, _) = fixture.gateway(round_robin()).await;
    for _ in 0..3 {
        assert!(get(gateway).await.body.starts_with("order-service-1"));
    }

    // Within about a TTL (1 s) of registering, the new instance takes its share.
    let second = fixture.instance("order-service-2").await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while second.hits() == 0 {
        assert!(Instant::now() < deadline, "the new instance got no request");
        assert_eq!(get(gateway).await.status, StatusCode::OK);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Deregistered (it still listens), it gets nothing once the set is resolved again.
    assert!(fixture.registry.remove(SERVICE, "order-service-1"));
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let before = first.hits();
        for _ in 0..6 {
            assert_eq!(get(gateway).await.status, StatusCode::OK);
        }
        if first.hits() == before {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the deregistered instance kept getting requests"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let answer = get(gateway).await;
    assert!(
        answer.body.starts_with("order-service-2"),
        "{}",
        answer.body
    );

    // With none left, the route answers 503 naming why, and recovers when one registers.
    assert!(fixture.registry.remove(SERVICE, "order-service-2"));
    let deadline = Instant::now() + Duration::from_secs(5);
    let unavailable = loop {
        let answer = get(gateway).await;
        if answer.status == StatusCode::SERVICE_UNAVAILABLE {
            break answer;
        }
        assert!(Instant::now() < deadline, "still served: {}", answer.body);
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        unavailable.body.contains("no instances of order-service"),
        "{}",
        unavailable.body
    );
    fixture.register("order-service-1", first.addr);
    let deadline = Instant::now() + Duration::from_secs(5);
    while get(gateway).await.status != StatusCode::OK {
        assert!(Instant::now() < deadline, "the service did not come back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn instances_failing_active_health_checks_on_their_admin_port_get_no_traffic() {
    let fixture = Fixture::start().await;
    let healthy = fixture.instance("order-service-1").await;
    let sick = fixture.instance("order-service-2").await;
    // Registered with admin listeners: the second's /healthz fails (its TLS port serves fine).
    fixture.register_with_admin(
        healthy.name,
        healthy.addr,
        Some(fixture.admin(StatusCode::OK).await),
    );
    fixture.register_with_admin(
        sick.name,
        sick.addr,
        Some(fixture.admin(StatusCode::SERVICE_UNAVAILABLE).await),
    );
    let mut policy = round_robin();
    policy.health_check = Some(crate::upstream::HealthCheckConfig {
        interval_ms: 50,
        timeout_ms: 500,
        healthy_threshold: 1,
        unhealthy_threshold: 1,
        ..Default::default()
    });
    let (gateway, _stop, prometheus) = fixture.gateway(policy).await;
    // The first request resolves the instances (and their admin ports); checks follow.
    assert_eq!(get(gateway).await.status, StatusCode::OK);
    let deadline = Instant::now() + Duration::from_secs(5);
    while sample(
        &prometheus,
        "upstream_healthy",
        &["endpoint=\"order-service-1\""],
    ) != 1.0
        || sample(
            &prometheus,
            "upstream_healthy",
            &["endpoint=\"order-service-2\""],
        ) != 0.0
    {
        assert!(Instant::now() < deadline, "the checks did not run");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before = sick.hits();
    for _ in 0..10 {
        let answer = get(gateway).await;
        assert!(
            answer.body.starts_with("order-service-1"),
            "{}",
            answer.body
        );
    }
    assert_eq!(sick.hits(), before);
}
