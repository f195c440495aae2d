//! The whole topology as a user runs it: `causeway up` on ports chosen at run time, driven through
//! the edge, DNS, the admin endpoints and the CLI, including the failure cases.

mod harness;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use bytes::Bytes;
use causeway_client::Discovery;
use causeway_core::Role;
use causeway_core::trace_context::TRACEPARENT;
use harness::{System, causeway, eventually, fresh_dir, signal, test_topology, write_topology};
use http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use nix::sys::signal::Signal;

fn error_code(response: &causeway_cli::edge::EdgeResponse) -> String {
    let json = response.json().expect("error bodies are JSON");
    json["error"].as_str().unwrap_or_default().to_string()
}

/// Runs `causeway demo <technique>`, checks it succeeded and printed every step; returns its output.
fn demo_prints(system: &System, technique: &str, steps: &[&str]) -> String {
    let demo = system.run(&["demo", technique]);
    let text = String::from_utf8_lossy(&demo.stdout).to_string();
    assert!(demo.status.success(), "{demo:?}");
    for step in steps {
        assert!(
            text.contains(step),
            "demo {technique} prints {step:?}: {text}"
        );
    }
    text
}

/// How long to wait for a line in a component's log: logs are buffered, and a line can reach
/// the file a while after it was written (warnings and errors at once).
const LOG_PATIENCE: Duration = Duration::from_secs(5);

fn read_log(system: &System, instance: &str) -> String {
    std::fs::read_to_string(system.data().log(instance)).unwrap_or_default()
}

/// Waits up to `within` until the log of one of `instances` holds every one of `needles`;
/// returns that instance. Check that something is absent from a log only after such a wait.
async fn log_shows(
    system: &System,
    instances: &[&str],
    needles: &[&str],
    within: Duration,
) -> Option<String> {
    eventually(within, async || {
        instances
            .iter()
            .find(|instance| {
                let log = read_log(system, instance);
                needles.iter().all(|needle| log.contains(needle))
            })
            .map(|instance| instance.to_string())
    })
    .await
}

fn served_by(response: &causeway_cli::edge::EdgeResponse) -> String {
    let json = response.json().expect("JSON body");
    json["servedBy"]["orderService"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// A client that sends `GET /api/users/123/orders` through the edge, one new connection per
/// request, from `started` until `run_for` has passed; returns each answer's status (0: none).
fn edge_load(
    system: &System,
    token: &str,
    started: Instant,
    run_for: Duration,
) -> tokio::task::JoinHandle<Vec<u16>> {
    let token = token.to_string();
    let edge = system.edge();
    let ca = system.data().ca_cert();
    tokio::spawn(async move {
        let mut statuses = Vec::new();
        while started.elapsed() < run_for {
            let mut headers = HeaderMap::new();
            headers.insert(
                header::AUTHORIZATION,
                HeaderValue::from_str(&format!("Bearer {token}")).unwrap(),
            );
            let response = causeway_cli::edge::request(
                edge,
                "localhost",
                &ca,
                Method::GET,
                "/api/users/123/orders",
                headers,
                Bytes::new(),
            )
            .await;
            statuses.push(response.map(|r| r.status.as_u16()).unwrap_or(0));
        }
        statuses
    })
}

/// Waits for the `edge_load` workers and checks the load ran (more than 20 requests); returns
/// how many requests were sent and the statuses of those that did not get a 200 (0: no answer).
async fn finished_load(
    workers: impl IntoIterator<Item = tokio::task::JoinHandle<Vec<u16>>>,
) -> (usize, Vec<u16>) {
    let mut statuses = Vec::new();
    for worker in workers {
        statuses.extend(worker.await.expect("load worker"));
    }
    assert!(statuses.len() > 20, "the load ran: {statuses:?}");
    let sent = statuses.len();
    statuses.retain(|status| *status != 200);
    (sent, statuses)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rest_request_travels_every_hop_and_comes_back() {
    let system = System::start(test_topology());
    let stdout = system.stdout.join("\n");
    for instance in [
        "discovery-1",
        "order-service-3",
        "user-service-1",
        "reverse-proxy-2",
        "load-balancer-1",
    ] {
        assert!(stdout.contains(instance), "up lists {instance}: {stdout}");
    }

    let status = system.status_json();
    assert_eq!(status["running"], true, "{status}");
    let components = status["components"].as_array().expect("components");
    // discovery, broker, the mesh control plane, 4 sidecars, 3 order, payment, 2 pricing,
    // user, inventory, notification, email, 2 reverse proxies, load balancer.
    assert_eq!(components.len(), 20, "{status}");
    for component in components {
        assert_eq!(component["health"], "up", "{component}");
        assert!(component["pid"].as_u64().is_some(), "{component}");
        assert!(
            component["metrics"]
                .as_str()
                .unwrap_or_default()
                .ends_with("/metrics")
        );
        // Each process's memory, its proportional share within its resident set.
        let (rss, pss) = (
            component["memory"]["rss_bytes"].as_u64().unwrap_or(0),
            component["memory"]["pss_bytes"].as_u64().unwrap_or(0),
        );
        assert!(rss > 0 && pss > 0 && pss <= rss, "{component}");
    }
    let parts: u64 = components
        .iter()
        .map(|c| c["memory"]["rss_bytes"].as_u64().unwrap_or(0))
        .sum::<u64>()
        + status["supervisor_memory"]["rss_bytes"]
            .as_u64()
            .unwrap_or(0);
    assert_eq!(
        status["total_memory"]["rss_bytes"].as_u64(),
        Some(parts),
        "{status}"
    );

    let token = system.token("123", 300);
    let response = system.get("/api/users/123/orders", Some(&token)).await;
    assert_eq!(response.status, StatusCode::OK, "{:?}", response.body);
    let json = response.json().unwrap();
    assert_eq!(json["user"]["name"], "Ada Lovelace");
    let orders = json["orders"].as_array().expect("orders array");
    assert_eq!(orders.len(), 2, "{json}");
    assert_eq!(orders[0]["orderId"], 1);
    assert_eq!(orders[0]["item"], "Book");
    assert_eq!(orders[0]["userId"], 123);
    assert_eq!(json["servedBy"]["userService"], "user-service-1");

    // Balancing: User Service's client library spreads calls over all three instances. An
    // operator's token (admin scope) reads any user's orders.
    let admin = system.scoped_token("ops", &["admin"], 300);
    let mut seen = BTreeSet::new();
    for _ in 0..9 {
        let response = system.get("/api/users/124/orders", Some(&admin)).await;
        assert_eq!(response.status, StatusCode::OK);
        seen.insert(served_by(&response));
    }
    assert_eq!(
        seen.len(),
        3,
        "every order-service instance answers: {seen:?}"
    );

    // DNS: the internal server answers from the live registry, over real DNS packets.
    let state = system.state();
    let discovery = Discovery::new(state.dns, "internal").unwrap();
    let (addresses, _) = discovery.addresses("order-service").await.unwrap();
    assert_eq!(addresses, vec![std::net::IpAddr::from([127, 0, 0, 1])]);
    let resolution = discovery.resolve("order-service").await.unwrap();
    let listed: Vec<_> = resolution
        .endpoints
        .iter()
        .map(|e| (e.instance.clone(), e.addr))
        .collect();
    let expected: Vec<_> = state
        .components
        .iter()
        .filter(|c| c.role == Role::OrderService)
        .map(|c| (c.instance.clone(), c.listen.unwrap()))
        .collect();
    assert_eq!(listed, expected);
    if let Ok(dig) = std::process::Command::new("dig")
        .args([
            "@127.0.0.1",
            "-p",
            &state.dns.port().to_string(),
            "order-service.internal",
            "A",
            "+short",
        ])
        .output()
    {
        assert_eq!(String::from_utf8_lossy(&dig.stdout).trim(), "127.0.0.1");
    }

    // Metrics: the instance that served counts the request under its route.
    let metrics = system.metrics("order-service-1").await;
    assert!(metrics.contains("causeway_http_requests_total{component=\"order-service\",instance=\"order-service-1\",route=\"/orders\",method=\"GET\",status=\"200\"}"), "{metrics}");
    // The reverse proxies export their open connections, and the one that forwarded the request
    // its attempts and requests in flight per User Service instance.
    let mut proxies_metrics = String::new();
    for proxy in ["reverse-proxy-1", "reverse-proxy-2"] {
        let body = system.metrics(proxy).await;
        assert!(
            body.contains("causeway_proxy_connections_open{"),
            "{proxy}: {body}"
        );
        proxies_metrics.push_str(&body);
    }
    for family in [
        "causeway_upstream_in_flight{",
        "causeway_upstream_attempts_total{",
    ] {
        assert!(
            proxies_metrics
                .lines()
                .any(|line| line.starts_with(family) && line.contains("user-service")),
            "no {family} for user-service: {proxies_metrics}"
        );
    }

    // Trace context: the caller's trace id reaches Order Service's log, two hops away, and the
    // request id the edge returns is in every hop's log.
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let mut headers = HeaderMap::new();
    headers.insert(
        TRACEPARENT,
        HeaderValue::from_str(&format!("00-{trace_id}-00f067aa0ba902b7-01")).unwrap(),
    );
    headers.insert(
        header::AUTHORIZATION,
        HeaderValue::from_str(&format!("Bearer {admin}")).unwrap(),
    );
    let traced = system
        .request(Method::GET, "/api/users/125/orders", headers, Bytes::new())
        .await;
    assert_eq!(traced.status, StatusCode::OK);
    let request_id = traced.headers["x-request-id"].to_str().unwrap().to_string();
    let order_instance = served_by(&traced);
    assert!(
        log_shows(
            &system,
            &[&order_instance],
            &[trace_id, &request_id],
            LOG_PATIENCE
        )
        .await
        .is_some(),
        "{order_instance} logged trace {trace_id} and request {request_id}"
    );
    assert!(
        log_shows(&system, &["user-service-1"], &[&request_id], LOG_PATIENCE)
            .await
            .is_some(),
        "user-service-1 logged request {request_id}"
    );
    assert!(
        log_shows(
            &system,
            &["reverse-proxy-1", "reverse-proxy-2"],
            &[&request_id],
            LOG_PATIENCE
        )
        .await
        .is_some(),
        "a reverse proxy logged request {request_id}"
    );

    // The demo performs a real request and prints the seven steps with latencies.
    let text = demo_prints(
        &system,
        "rest",
        &[
            " 1. DNS lookup",
            " 2. HTTP request",
            " 3. Reverse proxy",
            " 4. Load balancer",
            " 5. Order Service",
            " 6. HTTP response",
            " 7. User Service",
        ],
    );
    assert!(
        text.contains("order-service.internal A -> 127.0.0.1"),
        "{text}"
    );
    assert!(text.contains("\"item\":\"Book\""), "{text}");
    assert!(text.contains("Ada Lovelace"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn gateway_refuses_bad_requests_clearly_and_keeps_serving() {
    let mut topology = test_topology();
    topology.reverse_proxy.rate_limit.requests_per_second = 1;
    topology.reverse_proxy.rate_limit.burst = 4;
    topology.reverse_proxy.max_body_bytes = 1024;
    let system = System::start(topology);
    let path = "/api/users/123/orders";

    let missing = system.get(path, None).await;
    assert_eq!(missing.status, StatusCode::UNAUTHORIZED);
    assert_eq!(error_code(&missing), "missing_token");
    assert_eq!(missing.headers[header::WWW_AUTHENTICATE], "Bearer");

    let expired = system.get(path, Some(&system.token("123", -60))).await;
    assert_eq!(expired.status, StatusCode::UNAUTHORIZED);
    assert_eq!(error_code(&expired), "token_expired");

    let forged = causeway_proxy::auth::issue(
        b"a-key-that-is-not-the-causeway-key!!",
        &system.topology.reverse_proxy.jwt,
        "123",
        300,
    )
    .unwrap();
    let forged = system.get(path, Some(&forged)).await;
    assert_eq!(forged.status, StatusCode::UNAUTHORIZED);
    assert_eq!(error_code(&forged), "invalid_signature");

    let malformed = system.get(path, Some("not-a-jwt")).await;
    assert_eq!(malformed.status, StatusCode::UNAUTHORIZED);
    assert_eq!(error_code(&malformed), "malformed_token");
    let mut basic = HeaderMap::new();
    basic.insert(
        header::AUTHORIZATION,
        HeaderValue::from_static("Basic dXNlcjpwYXNz"),
    );
    let basic = system.request(Method::GET, path, basic, Bytes::new()).await;
    assert_eq!(error_code(&basic), "malformed_token");

    let token = system.token("123", 300);
    // Authorization comes first: only an admin learns that a user does not exist.
    let admin = system.scoped_token("ops", &["admin"], 300);
    let unknown = system.get("/api/users/999/orders", Some(&admin)).await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);
    assert_eq!(error_code(&unknown), "user_not_found");
    let not_a_number = system.get("/api/users/abc/orders", Some(&token)).await;
    assert_eq!(not_a_number.status, StatusCode::BAD_REQUEST);
    let no_route = system.get("/nowhere", Some(&token)).await;
    assert_eq!(no_route.status, StatusCode::NOT_FOUND);
    assert_eq!(error_code(&no_route), "no_route");

    let mut json = HeaderMap::new();
    json.insert(
        header::AUTHORIZATION,
        HeaderValue::from_str(&format!("Bearer {token}")).unwrap(),
    );
    let oversized = system
        .request(Method::POST, path, json, Bytes::from(vec![b'x'; 4096]))
        .await;
    assert_eq!(oversized.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(error_code(&oversized), "body_too_large");

    // One client floods; it gets 429 with Retry-After, while others are unaffected.
    let flood = system.token("flood", 300);
    let mut limited = None;
    for _ in 0..30 {
        let response = system.get("/api/users/124/orders", Some(&flood)).await;
        if response.status == StatusCode::TOO_MANY_REQUESTS {
            limited = Some(response);
            break;
        }
    }
    let limited = limited.expect("the flooding client is rate limited");
    assert_eq!(error_code(&limited), "rate_limited");
    let retry_after: u64 = limited.headers[header::RETRY_AFTER]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry_after >= 1);

    let fine = system
        .get("/api/users/125/orders", Some(&system.token("125", 300)))
        .await;
    assert_eq!(
        fine.status,
        StatusCode::OK,
        "other clients keep being served"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_order_instance_costs_no_request_and_rejoins() {
    let system = System::start(test_topology());
    let token = system.token("123", 300);
    let victim = "order-service-2";
    let old_pid = system.pid_of(victim).expect("victim pid");

    let started = Instant::now();
    let workers = [
        edge_load(&system, &token, started, Duration::from_secs(4)),
        edge_load(&system, &token, started, Duration::from_secs(4)),
    ];
    tokio::time::sleep(Duration::from_secs(1)).await;
    signal(old_pid, Signal::SIGKILL);

    let saw_down = eventually(Duration::from_secs(10), async || {
        let status = system.status_json();
        let component = status["components"]
            .as_array()?
            .iter()
            .find(|c| c["instance"] == victim)?
            .clone();
        (component["health"] == "down" || component["restarts"].as_u64() == Some(1))
            .then_some(component)
    })
    .await;
    assert!(
        saw_down.is_some(),
        "status shows the killed instance down or restarted"
    );

    let (sent, failed) = finished_load(workers).await;
    assert!(
        failed.is_empty(),
        "{} of {sent} requests failed: {failed:?}",
        failed.len()
    );

    let rejoined = eventually(Duration::from_secs(20), async || {
        let status = system.status_json();
        let component = status["components"]
            .as_array()?
            .iter()
            .find(|c| c["instance"] == victim)?
            .clone();
        let pid = component["pid"].as_u64()?;
        (component["health"] == "up" && component["restarts"] == 1 && pid != u64::from(old_pid))
            .then_some(pid)
    })
    .await;
    assert!(
        rejoined.is_some(),
        "up restarted {victim}: {}",
        system.status_json()
    );

    let discovery = Discovery::new(system.state().dns, "internal").unwrap();
    let back_in_dns = eventually(Duration::from_secs(5), async || {
        let resolution = discovery.resolve("order-service").await.ok()?;
        resolution
            .endpoints
            .iter()
            .any(|e| e.instance == victim)
            .then_some(())
    })
    .await;
    assert!(back_in_dns.is_some(), "{victim} is back in DNS");
    let served = eventually(Duration::from_secs(10), async || {
        let response = system.get("/api/users/123/orders", Some(&token)).await;
        (served_by(&response) == victim).then_some(())
    })
    .await;
    assert!(served.is_some(), "{victim} serves requests again");
}

/// One Order Service instance, called with short timeouts: for tests that stop it.
fn one_order_instance_quick_timeouts() -> causeway_core::Topology {
    let mut topology = test_topology();
    topology.order_service.instances = 1;
    topology.client.attempt_timeout_ms = 400;
    topology.client.deadline_ms = 1200;
    topology
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hung_order_service_gives_a_bounded_503() {
    let system = System::start(one_order_instance_quick_timeouts());
    let token = system.token("123", 300);
    let pid = system.pid_of("order-service-1").expect("pid");
    signal(pid, Signal::SIGSTOP);

    for _ in 0..2 {
        let started = Instant::now();
        let response = system.get("/api/users/123/orders", Some(&token)).await;
        assert_eq!(
            response.status,
            StatusCode::SERVICE_UNAVAILABLE,
            "{:?}",
            response.body
        );
        assert_eq!(error_code(&response), "order_service_unavailable");
        assert!(
            started.elapsed() < Duration::from_secs(8),
            "answered without hanging"
        );
        // Once its heartbeats have expired, discovery no longer lists it at all.
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }

    signal(pid, Signal::SIGCONT);
    let recovered = eventually(Duration::from_secs(10), async || {
        let response = system.get("/api/users/123/orders", Some(&token)).await;
        (response.status == StatusCode::OK).then_some(())
    })
    .await;
    assert!(recovered.is_some(), "the resumed instance serves again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_is_quick_and_leaves_nothing_behind() {
    let mut system = System::start(test_topology());
    let running = harness::processes_using(system.data_dir());
    // Every component of the topology (see rest_request_travels_every_hop_and_comes_back).
    assert_eq!(running.len(), 20, "{running:?}");
    let took = system.stop();
    assert!(took < Duration::from_secs(5), "stopped in {took:?}");
    assert!(harness::processes_using(system.data_dir()).is_empty());
    assert!(!system.data().state_file().exists(), "run state removed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn components_stop_when_the_supervisor_is_killed() {
    let system = System::start(test_topology());
    signal(system.supervisor_pid(), Signal::SIGKILL);
    let gone = eventually(Duration::from_secs(5), async || {
        harness::processes_using(system.data_dir())
            .is_empty()
            .then_some(())
    })
    .await;
    assert!(
        gone.is_some(),
        "left: {:?}",
        harness::processes_using(system.data_dir())
    );
}

#[test]
fn a_taken_port_is_named_and_nothing_is_left_running() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let mut topology = test_topology();
    topology.load_balancer.listen = taken.local_addr().unwrap();
    let config = write_topology(&topology);
    let output = causeway(&["--config", config.to_str().unwrap(), "up"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains(&format!("port {port}")) && stderr.contains("not available"),
        "{stderr}"
    );
    assert!(harness::processes_using(&topology.data_dir).is_empty());
}

#[test]
fn a_component_that_cannot_start_stops_the_rest() {
    let mut topology = test_topology();
    // Nothing listens on port 1: Order Service cannot open its database.
    topology.order_service.database_url = Some("postgres://causeway@127.0.0.1:1/none".into());
    let config = write_topology(&topology);
    let output = causeway(&["--config", config.to_str().unwrap(), "up"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("order-service-1 failed to start")
            && stderr.contains("cannot open database postgres://causeway@127.0.0.1:1/none"),
        "{stderr}"
    );
    assert!(
        harness::processes_using(&topology.data_dir).is_empty(),
        "discovery was stopped too"
    );
}

#[test]
fn an_unusable_data_dir_or_topology_is_a_clear_error() {
    let blocker = fresh_dir("file");
    std::fs::write(&blocker, "a file, not a directory").unwrap();
    let mut topology = test_topology();
    topology.data_dir = blocker.join("data");
    let config = write_topology(&topology);
    let output = causeway(&["--config", config.to_str().unwrap(), "up"]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("data dir") && stderr.contains("cannot be created"),
        "{stderr}"
    );
    std::fs::remove_file(&blocker).unwrap();

    let config = fresh_dir("bad-config");
    std::fs::write(&config, "[order_service]\ninstances = \"three\"\n").unwrap();
    let output = causeway(&["--config", config.to_str().unwrap(), "up"]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("malformed topology file") && stderr.contains("line 2"),
        "{stderr}"
    );

    std::fs::write(&config, "[order_service]\ninstances = 0\n").unwrap();
    let output = causeway(&["--config", config.to_str().unwrap(), "up"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success() && stderr.contains("instances must be 1 to 64"),
        "{stderr}"
    );
    std::fs::remove_file(&config).unwrap();

    let output = causeway(&["--config", "/nonexistent/causeway.toml", "status"]);
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr)
            .contains("cannot read topology file /nonexistent/causeway.toml")
    );
}

/// Runs against the PostgreSQL named by `CAUSEWAY_TEST_DATABASE_URL` (`.ci/run` sets it); CI
/// without it is a failure, not a skip.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_run_on_postgresql() {
    let Ok(url) = std::env::var("CAUSEWAY_TEST_DATABASE_URL") else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must set CAUSEWAY_TEST_DATABASE_URL"
        );
        eprintln!("CAUSEWAY_TEST_DATABASE_URL is not set; PostgreSQL backend not exercised");
        return;
    };
    let system = System::start_with(test_topology(), &["--database-url", &url]);
    let token = system.token("123", 300);
    let response = system.get("/api/users/123/orders", Some(&token)).await;
    assert_eq!(response.status, StatusCode::OK, "{:?}", response.body);
    let json = response.json().unwrap();
    assert_eq!(json["user"]["name"], "Ada Lovelace");
    assert_eq!(json["orders"].as_array().map(Vec::len), Some(2));
    // The instance that served logged the request; only then is its log complete enough to
    // show what is not in it.
    let order_instance = served_by(&response);
    let request_id = response.headers["x-request-id"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        log_shows(&system, &[&order_instance], &[&request_id], LOG_PATIENCE)
            .await
            .is_some(),
        "{order_instance} logged request {request_id}"
    );
    assert!(
        !read_log(&system, &order_instance).contains("sqlite"),
        "order service used PostgreSQL"
    );
    let demo = system.run(&["demo", "rest"]);
    assert!(
        String::from_utf8_lossy(&demo.stdout).contains("postgres://"),
        "{demo:?}"
    );
}

/// gRPC from outside: through the load balancer and a reverse proxy (JWT checked), HTTP/2 end to
/// end with trailers intact, in all four call kinds; and Inventory's REST API that uses it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn grpc_works_through_the_edge_and_behind_inventory() {
    use causeway_proto::pricing::v1::pricing_service_client::PricingServiceClient;
    use causeway_proto::pricing::v1::{BasketItem, GetPriceRequest, Offer, StreamPricesRequest};

    let system = System::start(test_topology());
    let token = system.token("123", 300);

    let inventory = system.get("/api/inventory/SKU-0001", Some(&token)).await;
    assert_eq!(inventory.status, StatusCode::OK, "{:?}", inventory.body);
    let json = inventory.json().unwrap();
    assert_eq!(json["sku"], "SKU-0001");
    assert!(json["inStock"].as_i64().is_some(), "{json}");
    assert_eq!(json["price"]["unitPriceCents"], 12999);
    assert!(
        json["price"]["servedBy"]
            .as_str()
            .unwrap_or_default()
            .starts_with("pricing-service-")
    );
    let malformed = system.get("/api/inventory/banana", Some(&token)).await;
    assert_eq!(malformed.status, StatusCode::BAD_REQUEST);
    assert_eq!(error_code(&malformed), "invalid_sku");

    let channel = system.edge_grpc_channel().await;
    let mut client = PricingServiceClient::new(channel);
    fn with_token<T>(message: T, token: &str) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        let value = format!("Bearer {token}").parse().expect("ASCII token");
        request.metadata_mut().insert("authorization", value);
        request
    }

    let refused = client
        .get_price(GetPriceRequest {
            sku: "SKU-0001".into(),
        })
        .await
        .expect_err("no token, no call");
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");

    let price = client
        .get_price(with_token(
            GetPriceRequest {
                sku: "SKU-0001".into(),
            },
            &token,
        ))
        .await
        .expect("GetPrice through the edge")
        .into_inner();
    assert_eq!(price.unit_price_cents, 12999);
    let missing = client
        .get_price(with_token(
            GetPriceRequest {
                sku: "SKU-9999".into(),
            },
            &token,
        ))
        .await
        .expect_err("unknown SKU");
    assert_eq!(
        missing.code(),
        tonic::Code::NotFound,
        "the status travels back in the trailers"
    );

    let mut updates = client
        .stream_prices(with_token(
            StreamPricesRequest {
                skus: vec!["SKU-0001".into()],
                interval_ms: 10,
                max_updates: 3,
            },
            &token,
        ))
        .await
        .expect("StreamPrices through the edge")
        .into_inner();
    let mut count = 0;
    while updates.message().await.expect("stream intact").is_some() {
        count += 1;
    }
    assert_eq!(count, 3);

    let items = vec![
        BasketItem {
            sku: "SKU-0001".into(),
            quantity: 1,
        },
        BasketItem {
            sku: "SKU-0002".into(),
            quantity: 2,
        },
    ];
    let quote = client
        .quote_basket(with_token(tokio_stream::iter(items), &token))
        .await
        .expect("QuoteBasket through the edge")
        .into_inner();
    assert_eq!(quote.lines.len(), 2);
    assert_eq!(quote.units, 3);

    let offers = vec![
        Offer {
            sku: "SKU-0001".into(),
            quantity: 1,
            offered_unit_price_cents: 1,
        },
        Offer {
            sku: "SKU-0001".into(),
            quantity: 1,
            offered_unit_price_cents: 12999,
        },
    ];
    let mut counters = client
        .live_pricing(with_token(tokio_stream::iter(offers), &token))
        .await
        .expect("LivePricing through the edge")
        .into_inner();
    let mut answers = Vec::new();
    while let Some(counter) = counters.message().await.expect("bidi stream intact") {
        answers.push(counter.accepted);
    }
    assert_eq!(answers, vec![false, true]);

    let text = demo_prints(
        &system,
        "grpc",
        &[
            " 1. gRPC client stub",
            " 2. Method call",
            " 3. Protobuf serialization",
            " 4. gRPC server",
            " 5. Response",
            " 6. Secure communication",
            "through the edge",
        ],
    );
    assert!(
        text.contains("0a 08 53 4b 55 2d 30 30 30 31"),
        "the encoded request: {text}"
    );
    // The demo asks Pricing for its Server-Timing entries (answers carry them only on request).
    assert!(
        text.contains("ran GetPrice: pricing-db ") && text.contains("; pricing-service "),
        "the server's own timings: {text}"
    );
}

/// gRPC's standard services reach Pricing Service through the edge, behind the JWT check:
/// health, and server reflection in both versions (grpcurl asks for v1alpha), whose streams
/// answer an unknown symbol with an ErrorResponse and carry on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn grpc_health_and_reflection_work_through_the_edge() {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;

    let system = System::start(test_topology());
    let token = system.token("123", 300);
    let channel = system.edge_grpc_channel().await;
    fn authorized<T>(message: T, token: &str) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        let value = format!("Bearer {token}").parse().expect("ASCII token");
        request.metadata_mut().insert("authorization", value);
        request
    }

    let mut health = HealthClient::new(channel.clone());
    let check = || HealthCheckRequest {
        service: "pricing.v1.PricingService".into(),
    };
    let refused = health.check(check()).await.expect_err("no token, no call");
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    let answer = health
        .check(authorized(check(), &token))
        .await
        .expect("health check through the edge");
    assert_eq!(answer.into_inner().status, ServingStatus::Serving as i32);

    macro_rules! reflect {
        ($version:ident) => {{
            use tonic_reflection::pb::$version::ServerReflectionRequest;
            use tonic_reflection::pb::$version::server_reflection_client::ServerReflectionClient;
            use tonic_reflection::pb::$version::server_reflection_request::MessageRequest;
            use tonic_reflection::pb::$version::server_reflection_response::MessageResponse;

            let requests = [
                MessageRequest::FileContainingSymbol("no.such.Symbol".into()),
                MessageRequest::ListServices(String::new()),
            ]
            .map(|message| ServerReflectionRequest {
                host: String::new(),
                message_request: Some(message),
            });
            let mut reflection = ServerReflectionClient::new(channel.clone());
            let mut answers = reflection
                .server_reflection_info(authorized(tokio_stream::iter(requests), &token))
                .await
                .expect(concat!(
                    stringify!($version),
                    " reflection through the edge"
                ))
                .into_inner();
            let mut next = async || {
                answers
                    .message()
                    .await
                    .expect("stream intact")
                    .and_then(|answer| answer.message_response)
            };
            let Some(MessageResponse::ErrorResponse(error)) = next().await else {
                panic!("expected an ErrorResponse");
            };
            assert_eq!(error.error_code, tonic::Code::NotFound as i32, "{error:?}");
            let Some(MessageResponse::ListServicesResponse(list)) = next().await else {
                panic!("expected the service list after the error");
            };
            let names: BTreeSet<String> = list.service.into_iter().map(|s| s.name).collect();
            assert!(
                names.contains("pricing.v1.PricingService")
                    && names.contains("grpc.reflection.v1alpha.ServerReflection"),
                "{names:?}"
            );
            assert!(next().await.is_none(), "the stream ends cleanly");
        }};
    }
    reflect!(v1);
    reflect!(v1alpha);
}

/// Sends an email through the edge as user 123; returns the status and Email Service's answer.
/// `POST /api/payments` with `key` as its Idempotency-Key.
async fn pay(
    system: &System,
    token: &str,
    key: Option<&str>,
    body: serde_json::Value,
) -> (StatusCode, HeaderMap, serde_json::Value) {
    let mut headers = HeaderMap::new();
    if let Some(key) = key {
        headers.insert("idempotency-key", HeaderValue::from_str(key).unwrap());
    }
    let response = system
        .post_json("/api/payments", token, headers, &body)
        .await;
    let json = response.json().expect("Payment Service answers JSON");
    (response.status, response.headers, json)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_payment_marks_its_order_paid_once_whatever_is_repeated() {
    let system = System::start(test_topology());
    // The debug scope lets the edge pass the hops' Server-Timing on.
    let token = system.scoped_token("123", &["debug"], 300);
    let order_1 = serde_json::json!({"orderId": 1, "userId": 123, "amount": 19.99});

    let (status, headers, first) = pay(&system, &token, Some("checkout-1"), order_1.clone()).await;
    assert_eq!(status, StatusCode::CREATED, "{first}");
    assert_eq!(first["status"], "paid", "{first}");
    assert_eq!(first["amount"], 19.99, "{first}");
    assert!(
        first["orderInstance"]
            .as_str()
            .is_some_and(|instance| instance.starts_with("order-service-")),
        "{first}"
    );
    let timing: Vec<&str> = headers
        .get_all("server-timing")
        .iter()
        .filter_map(|value| value.to_str().ok())
        .collect();
    // The call crossed both sidecars: each reports its hop.
    for step in [
        "payment-service",
        "order-service",
        "upstream",
        "sidecar-out",
        "sidecar-in",
    ] {
        assert!(
            timing.iter().any(|entry| entry.starts_with(step)),
            "{step}: {timing:?}"
        );
    }
    let payment_id = first["paymentId"]
        .as_str()
        .expect("a payment id")
        .to_string();

    // The same request again: the stored payment, not a second one.
    let (status, headers, again) = pay(&system, &token, Some("checkout-1"), order_1.clone()).await;
    assert_eq!(status, StatusCode::OK, "{again}");
    assert_eq!(again["paymentId"], payment_id.as_str(), "{again}");
    assert_eq!(
        headers.get("idempotent-replayed").map(|v| v.as_bytes()),
        Some(&b"true"[..])
    );

    // The same key for another request is refused, naming the payment it belongs to.
    let other_amount = serde_json::json!({"orderId": 1, "userId": 123, "amount": 5});
    let (status, _, reused) = pay(&system, &token, Some("checkout-1"), other_amount).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{reused}");
    assert_eq!(reused["error"], "idempotency_key_reused", "{reused}");
    assert!(
        reused["message"]
            .as_str()
            .unwrap_or_default()
            .contains(&payment_id),
        "{reused}"
    );

    // A second payment for the paid order: Order Service refuses it and the payment says why.
    let (status, _, second) = pay(&system, &token, Some("checkout-2"), order_1.clone()).await;
    assert_eq!(status, StatusCode::CONFLICT, "{second}");
    assert_eq!(second["status"], "rejected", "{second}");
    assert!(
        second["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("order_already_paid"),
        "{second}"
    );

    // Another user's order, and paying as someone else, are refused.
    let (status, _, foreign) = pay(
        &system,
        &token,
        None,
        serde_json::json!({"orderId": 3, "userId": 123, "amount": 1}),
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT, "{foreign}");
    assert!(
        foreign["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("403"),
        "{foreign}"
    );
    let other_user = system.token("124", 300);
    let (status, _, forbidden) = pay(&system, &other_user, None, order_1.clone()).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{forbidden}");

    // Bad input gets a 400 that says what is wrong.
    for (body, mentions) in [
        (serde_json::json!({"orderId": 2, "userId": 123}), "amount"),
        (
            serde_json::json!({"orderId": 2, "userId": 123, "amount": -1}),
            "positive",
        ),
        (
            serde_json::json!({"orderId": 2, "userId": 123, "amount": 1.005}),
            "two decimals",
        ),
        (
            serde_json::json!({"orderId": "two", "userId": 123, "amount": 1}),
            "orderId",
        ),
    ] {
        let (status, _, refused) = pay(&system, &token, None, body.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {refused}");
        assert!(
            refused["message"]
                .as_str()
                .unwrap_or_default()
                .contains(mentions),
            "{body}: {refused}"
        );
    }

    // Read back: paid, and only user 123 (or an admin) may see it.
    let path = format!("/api/payments/{payment_id}");
    let response = system.get(&path, Some(&token)).await;
    assert_eq!(response.status, StatusCode::OK);
    let stored = response.json().expect("json");
    assert_eq!(stored["status"], "paid", "{stored}");
    assert_eq!(stored["orderId"], 1, "{stored}");
    let response = system.get(&path, Some(&other_user)).await;
    assert_eq!(response.status, StatusCode::FORBIDDEN);
    let response = system.get("/api/payments/pay_unknown", Some(&token)).await;
    assert_eq!(response.status, StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_payment_whose_order_service_is_down_is_kept_and_completed_by_a_repeat() {
    let system = System::start(one_order_instance_quick_timeouts());
    let token = system.token("123", 300);
    let order_2 = serde_json::json!({"orderId": 2, "userId": 123, "amount": 42.5});
    let pid = system.pid_of("order-service-1").expect("pid");
    signal(pid, Signal::SIGSTOP);

    let (status, headers, pending) = pay(&system, &token, Some("pay-2"), order_2.clone()).await;
    signal(pid, Signal::SIGCONT);
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{pending}");
    assert_eq!(pending["status"], "pending", "{pending}");
    assert!(headers.contains_key(header::RETRY_AFTER));
    assert!(
        pending["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("same Idempotency-Key"),
        "{pending}"
    );
    let payment_id = pending["paymentId"].as_str().expect("an id").to_string();

    // Once Order Service answers again, the repeat completes the same payment.
    let completed = eventually(Duration::from_secs(10), async || {
        let (status, _, body) = pay(&system, &token, Some("pay-2"), order_2.clone()).await;
        (status != StatusCode::SERVICE_UNAVAILABLE).then_some((status, body))
    })
    .await;
    let (status, paid) = completed.expect("Order Service answers again");
    assert_eq!(status, StatusCode::CREATED, "{paid}");
    assert_eq!(paid["status"], "paid", "{paid}");
    assert_eq!(paid["paymentId"], payment_id.as_str(), "{paid}");
    let (status, headers, again) = pay(&system, &token, Some("pay-2"), order_2).await;
    assert_eq!(status, StatusCode::OK, "{again}");
    assert!(headers.contains_key("idempotent-replayed"));
}

async fn send_email(
    system: &System,
    token: &str,
    fail_notification: bool,
) -> (StatusCode, serde_json::Value) {
    let body = serde_json::json!({"userId": 123, "failNotification": fail_notification});
    let response = system
        .post_json("/api/emails", token, HeaderMap::new(), &body)
        .await;
    let json = response.json().expect("Email Service answers JSON");
    (response.status, json)
}

/// User 123's notifications, as Notification Service lists them.
async fn notifications(system: &System, token: &str) -> Vec<serde_json::Value> {
    let response = system
        .get("/api/notifications?userId=123", Some(token))
        .await;
    assert_eq!(response.status, StatusCode::OK, "{:?}", response.body);
    let json = response.json().expect("JSON");
    json.as_array().expect("a list of notifications").clone()
}

/// The message ids of user 123's notifications.
async fn notified_messages(system: &System, token: &str) -> BTreeSet<String> {
    notifications(system, token)
        .await
        .iter()
        .filter_map(|n| n["messageId"].as_str().map(str::to_string))
        .collect()
}

/// Stops Notification Service (SIGSTOP), then sends `emails` emails, each confirmed by the
/// broker; returns the stopped consumer's pid and the emails' message ids.
async fn emails_for_a_stopped_consumer(
    system: &System,
    token: &str,
    emails: usize,
) -> (u32, BTreeSet<String>) {
    let consumer = system
        .pid_of("notification-service-1")
        .expect("consumer pid");
    signal(consumer, Signal::SIGSTOP);
    let mut sent = BTreeSet::new();
    for _ in 0..emails {
        let (status, email) = send_email(system, token, false).await;
        if status != StatusCode::CREATED {
            signal(consumer, Signal::SIGCONT);
            panic!("not confirmed: {status} {email}");
        }
        sent.insert(email["messageId"].as_str().unwrap().to_string());
    }
    (consumer, sent)
}

/// Checks that the supervisor replaces `instance`'s killed process `old` within 20 s.
async fn assert_restarted(system: &System, instance: &str, old: u32) {
    let restarted = eventually(Duration::from_secs(20), async || {
        let pid = system.pid_of(instance)?;
        (pid != old).then_some(pid)
    })
    .await;
    assert!(restarted.is_some(), "the supervisor restarted {instance}");
}

/// Checks that every message in `expected` becomes a notification within 30 s.
async fn assert_none_lost(system: &System, token: &str, expected: &BTreeSet<String>) {
    let seen = wait_for_notifications(system, token, expected, Duration::from_secs(30)).await;
    let lost: Vec<_> = expected.difference(&seen).collect();
    assert!(
        lost.is_empty(),
        "{} of {} messages lost: {lost:?}",
        lost.len(),
        expected.len()
    );
}

/// `causeway queue ls --json`'s entry for `queue`.
fn queue_counts(system: &System, queue: &str) -> Option<serde_json::Value> {
    let ls = system.run(&["queue", "ls", "--json"]);
    let queues: serde_json::Value = serde_json::from_slice(&ls.stdout).ok()?;
    queues
        .as_array()?
        .iter()
        .find(|entry| entry["name"] == queue)
        .cloned()
}

/// The time `causeway demo queue` printed for a step (`label` as "5. Acknowledgment"), in ms.
fn step_ms(text: &str, label: &str) -> Option<f64> {
    let line = text
        .lines()
        .map(str::trim_start)
        .find(|line| line.starts_with(label))?;
    let mut words = line[label.len()..]
        .trim_start_matches([' ', '≤'])
        .split_whitespace();
    let value = words.next()?.parse().ok()?;
    (words.next() == Some("ms")).then_some(value)
}

/// The demo's retry lines: (attempt, ms since the previous attempt, backoff it was given).
fn retry_lines(text: &str) -> Vec<(u32, Option<i64>, Option<i64>)> {
    let number_before = |line: &str, marker: &str| -> Option<i64> {
        let (before, _) = line.split_once(marker)?;
        before
            .rsplit(|c: char| !c.is_ascii_digit())
            .next()?
            .parse()
            .ok()
    };
    let number_after = |line: &str, marker: &str| -> Option<i64> {
        let (_, after) = line.rsplit_once(marker)?;
        after.split_whitespace().next()?.parse().ok()
    };
    text.lines()
        .map(str::trim_start)
        .filter(|line| line.starts_with("attempt "))
        .filter_map(|line| {
            let attempt = line["attempt ".len()..]
                .split_whitespace()
                .next()?
                .parse()
                .ok()?;
            Some((
                attempt,
                number_before(line, " ms after attempt"),
                number_after(line, "retry in "),
            ))
        })
        .collect()
}

/// Waits until every message in `expected` has become a notification.
async fn wait_for_notifications(
    system: &System,
    token: &str,
    expected: &BTreeSet<String>,
    within: Duration,
) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    let _ = eventually(within, async || {
        seen = notified_messages(system, token).await;
        expected.is_subset(&seen).then_some(())
    })
    .await;
    seen
}

/// The queue scenario on the embedded broker: an email becomes a notification, the demo shows
/// the six steps and a message ending in the dead-letter queue, and the operator tools list,
/// peek and redrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn emails_become_notifications_and_failures_end_in_the_dead_letter_queue() {
    let system = System::start(test_topology());
    let token = system.token("123", 300);

    let (status, email) = send_email(&system, &token, false).await;
    assert_eq!(status, StatusCode::CREATED, "{email}");
    assert_eq!(email["published"], true, "{email}");
    let message_id = email["messageId"]
        .as_str()
        .expect("a message id")
        .to_string();
    let expected = BTreeSet::from([message_id.clone()]);
    let seen = wait_for_notifications(&system, &token, &expected, Duration::from_secs(10)).await;
    assert!(seen.contains(&message_id), "notification stored: {seen:?}");

    let bad = system
        .get("/api/notifications?userId=abc", Some(&token))
        .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);

    let text = demo_prints(
        &system,
        "queue",
        &[
            "1. Message creation",
            "2. Queueing",
            "3. Broker",
            "4. Message consumption",
            "5. Acknowledgment",
            "6. Retry",
            "attempt 3",
            "dead-lettered",
            "notification-queue.dlq holds it",
        ],
    );
    assert!(text.contains("\"status\":\"sent\""), "{text}");
    // Every step has a measured time, and the times make sense together.
    let time = |label: &str| {
        step_ms(&text, label).unwrap_or_else(|| panic!("demo queue times {label}: {text}"))
    };
    for label in [
        "1. Message creation",
        "2. Queueing",
        "3. Broker",
        "4. Message consumption",
    ] {
        let ms = time(label);
        assert!((0.0..10_000.0).contains(&ms), "{label}: {ms} ms: {text}");
    }
    // Step 5 is how long after the consumer's commit the broker had let go of the message: the
    // ack comes after the commit, never before, and the broker takes it at once.
    let ack = time("5. Acknowledgment");
    assert!((0.0..1000.0).contains(&ack), "ack at {ack} ms: {text}");
    // Step 6 runs from the first failed attempt to the last, by the times Notification Service
    // recorded them. Each is recorded once the broker has taken the retry (after its commit), so
    // a single gap can fall short of its backoff by a commit's time; the whole run cannot fall
    // short of the first backoff unless a commit took longer than the second backoff (200 ms).
    let retries = retry_lines(&text);
    let attempts: Vec<u32> = retries.iter().map(|(attempt, _, _)| *attempt).collect();
    assert_eq!(attempts, [1, 2, 3], "{text}");
    let mut total = 0;
    let mut backoffs = Vec::new();
    for pair in retries.windows(2) {
        let (_, _, Some(backoff)) = pair[0] else {
            panic!("attempt {} names its backoff: {text}", pair[0].0)
        };
        let (_, Some(waited), _) = pair[1] else {
            panic!(
                "attempt {} says how long after the one before: {text}",
                pair[1].0
            )
        };
        assert!(
            (1..backoff + 5000).contains(&waited),
            "attempt {} came {waited} ms after the one before: {text}",
            pair[1].0
        );
        backoffs.push(backoff);
        total += waited;
    }
    assert_eq!(backoffs, [100, 200], "the policy's backoff: {text}");
    assert!(total >= 100, "the retries waited: {total} ms: {text}");
    assert_eq!(time("6. Retry"), total as f64, "{text}");

    let ls = system.run(&["queue", "ls"]);
    let listing = String::from_utf8_lossy(&ls.stdout);
    assert!(ls.status.success(), "{ls:?}");
    assert!(listing.contains("notification-queue.dlq"), "{listing}");

    let dlq = system.run(&["queue", "dlq", "notification-queue", "--json"]);
    assert!(dlq.status.success(), "{dlq:?}");
    let letters: serde_json::Value = serde_json::from_slice(&dlq.stdout).expect("JSON");
    let letters = letters.as_array().expect("a list");
    assert_eq!(letters.len(), 1, "the demo's failing message: {letters:?}");
    assert!(
        letters[0]["headers"]["x-causeway-dead-letter-reason"]
            .as_str()
            .unwrap_or_default()
            .contains("failed 3 of 3 attempts"),
        "{letters:?}"
    );
    let dlq = system.run(&["queue", "dlq", "notification-queue"]);
    assert!(dlq.status.success(), "{dlq:?}");
    let listing = String::from_utf8_lossy(&dlq.stdout);
    assert!(
        listing
            .lines()
            .any(|line| line == "notification-queue.dlq: 1 dead letter"),
        "{listing}"
    );
    assert!(listing.contains("failed 3 of 3 attempts"), "{listing}");

    let redrive = system.run(&["queue", "redrive", "notification-queue"]);
    assert!(redrive.status.success(), "{redrive:?}");
    assert!(
        String::from_utf8_lossy(&redrive.stdout)
            .contains("moved 1 dead letter from notification-queue.dlq back to notification-queue"),
        "{redrive:?}"
    );
    // The redriven message still cannot be processed: three more attempts, then back again.
    let back = eventually(Duration::from_secs(10), async || {
        let dlq = system.run(&["queue", "dlq", "notification-queue", "--json"]);
        let letters: serde_json::Value = serde_json::from_slice(&dlq.stdout).ok()?;
        (letters.as_array()?.len() == 1).then_some(())
    })
    .await;
    assert!(
        back.is_some(),
        "the redriven message failed back into the DLQ"
    );

    // Peek shows a message without taking it: one held for a stopped consumer.
    let (consumer, expected) = emails_for_a_stopped_consumer(&system, &token, 1).await;
    let peek = system.run(&["queue", "peek", "notification-queue"]);
    signal(consumer, Signal::SIGCONT);
    let held = expected.first().unwrap().clone();
    let peeked = String::from_utf8_lossy(&peek.stdout);
    assert!(peek.status.success(), "{peek:?}");
    assert!(
        peeked.contains(&format!("message {held}"))
            && peeked.contains("x-causeway-published-at")
            && peeked.contains("\"status\":\"sent\""),
        "{peeked}"
    );
    assert_none_lost(&system, &token, &expected).await;

    // Metrics: how Email Service published, how Notification Service settled, what the broker did.
    let email = system.metrics("email-service-1").await;
    assert!(
        email.contains("queue_publisher_messages_total{")
            && email.contains("outcome=\"confirmed\""),
        "{email}"
    );
    let notification = system.metrics("notification-service-1").await;
    assert!(
        notification.contains("outcome=\"dead_lettered\"")
            && notification.contains("outcome=\"acked\""),
        "{notification}"
    );
    let broker = system.metrics("broker-1").await;
    assert!(broker.contains("notification-queue"), "{broker}");
}

/// The broker is killed with SIGKILL while messages wait for a stopped consumer: no confirmed
/// message is lost, emails sent while it is down wait in Email Service's outbox, and everything
/// arrives once the supervisor has restarted the broker.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_broker_loses_no_confirmed_message() {
    let system = System::start(test_topology());
    let token = system.token("123", 300);
    let (consumer, mut expected) = emails_for_a_stopped_consumer(&system, &token, 20).await;
    let broker = system.pid_of("broker-1").expect("broker pid");
    signal(broker, Signal::SIGKILL);

    // While the broker is down an email is still recorded; its message waits in the outbox.
    let (status, email) = send_email(&system, &token, false).await;
    assert!(
        status == StatusCode::ACCEPTED || status == StatusCode::CREATED,
        "{status}: {email}"
    );
    expected.insert(email["messageId"].as_str().unwrap().to_string());

    assert_restarted(&system, "broker-1", broker).await;
    signal(consumer, Signal::SIGCONT);
    assert_none_lost(&system, &token, &expected).await;
}

/// The consumer dies holding deliveries: Notification Service is stopped (SIGSTOP) so the
/// broker's deliveries to it stay unacked, emails are sent, and it is killed with SIGKILL. The
/// broker gives its unacked deliveries back when the connection drops, the supervisor restarts
/// it, and every email becomes exactly one notification. Were unacked deliveries not given
/// back, the emails would never be notified; were one delivered twice to a consumer that
/// stored it twice, it would be listed twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_consumer_gets_its_unacked_messages_back_once() {
    let system = System::start(test_topology());
    let token = system.token("123", 300);
    let (consumer, expected) = emails_for_a_stopped_consumer(&system, &token, 10).await;
    // All of them delivered to the stopped consumer (within its prefetch window), none acked.
    let mut counts = None;
    let delivered = eventually(Duration::from_secs(10), async || {
        counts = queue_counts(&system, "notification-queue");
        let entry = counts.as_ref()?;
        (entry["unacked"] == expected.len() && entry["ready"] == 0).then_some(())
    })
    .await;
    signal(consumer, Signal::SIGKILL);
    assert!(
        delivered.is_some(),
        "the stopped consumer holds every message unacked: {counts:?}"
    );

    assert_restarted(&system, "notification-service-1", consumer).await;
    assert_none_lost(&system, &token, &expected).await;
    // Nothing arrives twice, late: give a duplicate time to show up before counting.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let listed = notifications(&system, &token).await;
    for id in &expected {
        let times = listed.iter().filter(|n| n["messageId"] == *id).count();
        assert_eq!(times, 1, "message {id} notified {times} times: {listed:?}");
    }
    assert_eq!(listed.len(), expected.len(), "{listed:?}");
    // Each was processed on its second delivery: the one the dead consumer never settled.
    assert!(
        listed.iter().all(|n| n["attempt"] == 2),
        "redelivered: {listed:?}"
    );
    let counts = queue_counts(&system, "notification-queue");
    assert!(
        counts
            .as_ref()
            .is_some_and(|c| c["ready"] == 0 && c["unacked"] == 0),
        "{counts:?}"
    );
}

/// `causeway up --broker` runs the same scenario on RabbitMQ and on MQTT (the URLs come from
/// `CAUSEWAY_TEST_AMQP_URL` and `CAUSEWAY_TEST_MQTT_URL`, which `.ci/run` sets).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_queue_scenario_runs_on_rabbitmq_and_mqtt() {
    for variable in ["CAUSEWAY_TEST_AMQP_URL", "CAUSEWAY_TEST_MQTT_URL"] {
        let Ok(url) = std::env::var(variable) else {
            assert!(
                std::env::var("CAUSEWAY_REQUIRE_BROKERS").as_deref() != Ok("1"),
                "CAUSEWAY_REQUIRE_BROKERS=1 but {variable} is not set"
            );
            eprintln!("{variable} is not set; skipped");
            continue;
        };
        let mut topology = test_topology();
        // Its own queue, so that runs never see each other's messages.
        let suffix = &causeway_queue::new_message_id()[..10];
        topology.messaging.notification_queue.name = format!("notification-queue-{suffix}");
        let system = System::start_with(topology.clone(), &["--broker", &url]);
        let status = system.status_json();
        let components = status["components"].as_array().expect("components");
        assert!(
            components.iter().all(|c| c["role"] != "broker"),
            "no embedded broker when --broker is given: {status}"
        );
        let token = system.token("123", 300);
        let (status, email) = send_email(&system, &token, false).await;
        assert_eq!(status, StatusCode::CREATED, "{url}: {email}");
        let expected = BTreeSet::from([email["messageId"].as_str().unwrap().to_string()]);
        let seen =
            wait_for_notifications(&system, &token, &expected, Duration::from_secs(15)).await;
        assert!(expected.is_subset(&seen), "{url}: {seen:?}");
        let ls = system.run(&["queue", "ls"]);
        assert!(ls.status.success(), "{url}: {ls:?}");
        assert!(
            String::from_utf8_lossy(&ls.stdout)
                .contains(&topology.messaging.notification_queue.name),
            "{url}: {ls:?}"
        );
        // Leave nothing behind on the shared broker.
        let backend = causeway_queue::connect(
            &causeway_queue::BrokerTarget::parse(&url).unwrap(),
            &causeway_queue::ConnectOptions::new("system-test-cleanup"),
        )
        .await
        .expect("connect for clean-up");
        drop(system);
        let _ = backend.delete(&topology.messaging.notification_queue).await;
    }
}

/// The edge balancer (the proxy engine's upstream machinery in layer-4 mode) keeps serving when a
/// reverse proxy dies: a failed connect ejects it and the connection goes to the other one, so
/// only connections already spliced to the dead one can fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_reverse_proxy_costs_only_its_open_connections() {
    let system = System::start(test_topology());
    let token = system.token("123", 300);
    let victim = system.pid_of("reverse-proxy-1").expect("reverse proxy pid");
    let started = Instant::now();
    let workers: Vec<_> = (0..2)
        .map(|_| edge_load(&system, &token, started, Duration::from_secs(3)))
        .collect();
    tokio::time::sleep(Duration::from_millis(800)).await;
    signal(victim, Signal::SIGKILL);
    let (sent, failed) = finished_load(workers).await;
    // At most the one connection each worker had open when the proxy died.
    assert!(
        failed.len() <= 2,
        "{} of {sent} requests failed: {failed:?}",
        failed.len()
    );
}

/// The reverse proxies take their routes from Kubernetes Ingress files and reload them when the
/// file changes: a route added under load starts serving, a broken file is refused (the old routes
/// keep serving), and no request fails along the way.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ingress_routes_reload_under_load_without_failed_requests() {
    let dir = fresh_dir("ingress");
    std::fs::create_dir_all(&dir).unwrap();
    let ingress_file = dir.join("ingress.yaml");
    let edge_routes = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../deploy/k8s/ingress.yaml"
    ))
    .unwrap();
    std::fs::write(&ingress_file, &edge_routes).unwrap();
    let mut topology = test_topology();
    topology.reverse_proxy.ingress = vec![ingress_file.clone()];
    let system = System::start(topology);
    let token = system.token("123", 300);

    // Through the Ingress routes, with the strip-prefix annotation: the REST path works.
    let response = system.get("/api/users/123/orders", Some(&token)).await;
    assert_eq!(response.status, StatusCode::OK, "{:?}", response.body);
    let public = "/public/orders?userId=123";
    assert_eq!(system.get(public, None).await.status, StatusCode::NOT_FOUND);

    let started = Instant::now();
    let workers: Vec<_> = (0..2)
        .map(|_| edge_load(&system, &token, started, Duration::from_secs(4)))
        .collect();

    // A broken file is refused; the routes in use stay.
    tokio::time::sleep(Duration::from_millis(500)).await;
    std::fs::write(
        &ingress_file,
        "apiVersion: networking.k8s.io/v1\nkind: Ingress\n",
    )
    .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // A public route to Order Service added while the load runs.
    let added = format!(
        "{edge_routes}---\n\
         apiVersion: networking.k8s.io/v1\n\
         kind: Ingress\n\
         metadata:\n  name: public-orders\n  namespace: causeway\n  annotations:\n    causeway.dev/strip-prefix: /public\n    causeway.dev/auth: \"false\"\n\
         spec:\n  rules:\n  - http:\n      paths:\n      - {{path: /public/orders, pathType: Prefix, backend: {{service: {{name: order-service, port: {{name: https}}}}}}}}\n"
    );
    std::fs::write(&ingress_file, added).unwrap();
    // The route needs no token at the edge, so the request reaches Order Service without a
    // principal, and Order Service (not the edge's `no_route`) refuses it: the route is live.
    let served = eventually(Duration::from_secs(10), async || {
        let response = system.get(public, None).await;
        (response.status == StatusCode::UNAUTHORIZED && error_code(&response) == "unauthenticated")
            .then_some(())
    })
    .await;
    assert!(served.is_some(), "the added route serves after the reload");

    let (sent, failed) = finished_load(workers).await;
    assert!(
        failed.is_empty(),
        "{} of {sent} requests failed during reloads: {failed:?}",
        failed.len()
    );
    assert!(
        log_shows(
            &system,
            &["reverse-proxy-1"],
            &["routes reloaded", "kept the routes in use"],
            LOG_PATIENCE
        )
        .await
        .is_some(),
        "both reloads are logged: {}",
        read_log(&system, "reverse-proxy-1")
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The reverse proxies pick their certificate by SNI: an Ingress `spec.tls[]` entry's Secret gets
/// a certificate from the local CA at `up` (as cert-manager would fill it), served for its hosts
/// through the load balancer's TLS pass-through; any other name gets the edge certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_edge_serves_ingress_tls_certificates_by_sni() {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName};

    let dir = fresh_dir("ingress-tls");
    std::fs::create_dir_all(&dir).unwrap();
    let ingress_file = dir.join("shop.yaml");
    std::fs::write(
        &ingress_file,
        "apiVersion: networking.k8s.io/v1\n\
         kind: Ingress\n\
         metadata:\n  name: shop\n  namespace: causeway\n  annotations:\n    causeway.dev/strip-prefix: /shop\n\
         spec:\n  tls:\n  - hosts: [shop.causeway.test]\n    secretName: shop-tls\n  rules:\n  - host: shop.causeway.test\n    http:\n      paths:\n      - {path: /shop/users, pathType: Prefix, backend: {service: {name: user-service, port: {name: https}}}}\n",
    )
    .unwrap();
    let mut topology = test_topology();
    topology.reverse_proxy.ingress = vec![ingress_file];
    let system = System::start(topology);
    let ca = system.data().ca_cert();
    let tls_dir = system.data().tls_dir();

    // The certificate presented for `sni`, verified against the CA for that name.
    let presented = async |sni: &str| -> CertificateDer<'static> {
        let config = causeway_core::tls::client_config_with_alpn(&ca, &[b"http/1.1"]).unwrap();
        let tcp = tokio::net::TcpStream::connect(system.edge()).await.unwrap();
        let name = ServerName::try_from(sni.to_string()).unwrap();
        let tls = tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .unwrap_or_else(|err| panic!("TLS as {sni}: {err}"));
        tls.get_ref().1.peer_certificates().unwrap()[0].clone()
    };
    let shop = CertificateDer::from_pem_file(tls_dir.join("secret-shop-tls.pem")).unwrap();
    let edge = CertificateDer::from_pem_file(tls_dir.join("reverse-proxy.pem")).unwrap();
    assert!(shop != edge);
    for _ in 0..2 {
        // Both reverse proxy instances, whichever the balancer picks.
        assert!(presented("shop.causeway.test").await == shop);
        assert!(presented("localhost").await == edge);
    }

    // The route for that host answers over the connection made with its certificate.
    let token = system.token("123", 300);
    let mut headers = HeaderMap::new();
    headers.insert(
        header::AUTHORIZATION,
        HeaderValue::from_str(&format!("Bearer {token}")).unwrap(),
    );
    let response = causeway_cli::edge::request(
        system.edge(),
        "shop.causeway.test",
        &ca,
        Method::GET,
        "/shop/users/123/orders",
        headers,
        Bytes::new(),
    )
    .await
    .unwrap();
    assert_eq!(response.status, StatusCode::OK, "{:?}", response.body);

    // Rotated in place (as cert-manager renews a Secret): new handshakes get the new certificate
    // without a restart, on every reverse proxy instance.
    let ca_files = causeway_core::tls::LocalCa::load_or_create(&tls_dir).unwrap();
    ca_files
        .issue("secret-shop-tls", &["shop.causeway.test".to_string()])
        .unwrap();
    let rotated = CertificateDer::from_pem_file(tls_dir.join("secret-shop-tls.pem")).unwrap();
    assert!(rotated != shop);
    let mut in_a_row = 0;
    let served = eventually(Duration::from_secs(10), async || {
        in_a_row = if presented("shop.causeway.test").await == rotated {
            in_a_row + 1
        } else {
            0
        };
        (in_a_row == 6).then_some(())
    })
    .await;
    assert!(served.is_some(), "the rotated certificate is not served");
    // A broken certificate file is refused with an error, and the one in use stays.
    std::fs::write(tls_dir.join("secret-shop-tls.pem"), "not a certificate").unwrap();
    let refused = log_shows(
        &system,
        &["reverse-proxy-1"],
        &["proxy.certificates_refused"],
        Duration::from_secs(10),
    )
    .await;
    assert!(refused.is_some(), "no refusal logged for the broken file");
    for _ in 0..4 {
        assert!(presented("shop.causeway.test").await == rotated);
        assert!(presented("localhost").await == edge);
    }
    drop(system);

    // A certificate of one's own that cannot be loaded stops `up`, naming the file.
    let mut topology = test_topology();
    topology.reverse_proxy.certificates = vec![causeway_core::topology::CertificateConfig {
        hosts: vec!["mine.causeway.test".into()],
        cert: dir.join("missing.pem"),
        key: dir.join("missing-key.pem"),
    }];
    let config = write_topology(&topology);
    let output = causeway(&["--config", config.to_str().unwrap(), "up"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success() && stderr.contains("missing.pem"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The edge's routes to services run on the proxy engine: an instance behind a route that is
/// killed under load costs no request (the edge retries on the other instance: refused
/// connects, and GETs whose connection died), and once `up` has restarted it, the edge finds
/// it through discovery and sends it requests again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_instance_behind_an_edge_route_costs_no_request() {
    let mut topology = test_topology();
    topology.user_service.instances = 2;
    let system = System::start(topology);
    let token = system.token("123", 300);
    let victim = "user-service-2";
    let old_pid = system.pid_of(victim).expect("victim pid");
    let user_instance = |response: &causeway_cli::edge::EdgeResponse| {
        response.json().expect("JSON body")["servedBy"]["userService"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    let served = eventually(Duration::from_secs(10), async || {
        let response = system.get("/api/users/123/orders", Some(&token)).await;
        (user_instance(&response) == victim).then_some(())
    })
    .await;
    assert!(served.is_some(), "{victim} serves before it is killed");

    let started = Instant::now();
    let workers = [
        edge_load(&system, &token, started, Duration::from_secs(4)),
        edge_load(&system, &token, started, Duration::from_secs(4)),
    ];
    tokio::time::sleep(Duration::from_secs(1)).await;
    signal(old_pid, Signal::SIGKILL);
    let (sent, failed) = finished_load(workers).await;
    assert!(
        failed.is_empty(),
        "{} of {sent} requests failed: {failed:?}",
        failed.len()
    );

    let back = eventually(Duration::from_secs(30), async || {
        let restarted = system.pid_of(victim).is_some_and(|pid| pid != old_pid);
        let response = system.get("/api/users/123/orders", Some(&token)).await;
        (restarted && user_instance(&response) == victim).then_some(())
    })
    .await;
    assert!(
        back.is_some(),
        "the restarted {victim} serves through the edge again: {}",
        system.status_json()
    );
}

/// What a client sends that the tiers must not trust or forward, at every tier: a token reads its
/// own subject's data only (an admin scope reads anyone's); the headers the tiers use among
/// themselves are removed at the edge, so sending them from outside changes nothing; the tiers'
/// `Server-Timing` entries come back only to a token with the debug scope; and a request framed
/// both by Content-Length and Transfer-Encoding is refused with 400 by the edge, by a reverse proxy
/// reached directly, and by a service reached directly.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_tier_trusts_what_a_client_claims() {
    use causeway_core::principal::{AUTHENTICATED_SCOPE, AUTHENTICATED_SUBJECT};

    let system = System::start(test_topology());
    let path = "/api/users/123/orders";
    let other_user = system.token("124", 300);
    let owner = system.token("123", 300);
    let with = |token: &str, extra: &[(&str, &str)]| {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {token}")).unwrap(),
        );
        for (name, value) in extra {
            headers.insert(
                http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        headers
    };

    // Defect 1: a valid token for user 124 does not read user 123's data, in any service.
    let forbidden = system.get(path, Some(&other_user)).await;
    assert_eq!(
        forbidden.status,
        StatusCode::FORBIDDEN,
        "{:?}",
        forbidden.body
    );
    assert_eq!(error_code(&forbidden), "forbidden");
    let forbidden = system
        .get("/api/notifications?userId=123", Some(&other_user))
        .await;
    assert_eq!(
        forbidden.status,
        StatusCode::FORBIDDEN,
        "{:?}",
        forbidden.body
    );
    let json = with(&other_user, &[("content-type", "application/json")]);
    let email = system
        .request(
            Method::POST,
            "/api/emails",
            json,
            Bytes::from_static(br#"{"userId":123,"subject":"not yours"}"#),
        )
        .await;
    assert_eq!(email.status, StatusCode::FORBIDDEN, "{:?}", email.body);
    let failures = system
        .get("/api/notifications/failures?messageId=x", Some(&owner))
        .await;
    assert_eq!(
        failures.status,
        StatusCode::FORBIDDEN,
        "{:?}",
        failures.body
    );
    let own = system.get(path, Some(&owner)).await;
    assert_eq!(own.status, StatusCode::OK, "{:?}", own.body);
    let admin = system.scoped_token("124", &["admin"], 300);
    let as_admin = system.get(path, Some(&admin)).await;
    assert_eq!(as_admin.status, StatusCode::OK, "{:?}", as_admin.body);
    assert_eq!(
        as_admin.json().unwrap()["orders"],
        own.json().unwrap()["orders"]
    );

    // Defect 8: the principal headers sent from outside are replaced by the verified ones.
    for forged in [
        [(AUTHENTICATED_SUBJECT.as_str(), "123"), ("x-ignored", "1")],
        [(AUTHENTICATED_SCOPE.as_str(), "admin"), ("x-ignored", "1")],
        [
            (AUTHENTICATED_SUBJECT.as_str(), "123"),
            (AUTHENTICATED_SCOPE.as_str(), "admin"),
        ],
    ] {
        let response = system
            .request(Method::GET, path, with(&other_user, &forged), Bytes::new())
            .await;
        assert_eq!(
            response.status,
            StatusCode::FORBIDDEN,
            "{forged:?} from outside: {:?}",
            response.body
        );
    }

    // Defect 11: Server-Timing only for the debug scope, whatever the client asks for.
    let plain = system
        .request(
            Method::GET,
            path,
            with(&owner, &[("causeway-server-timing", "1")]),
            Bytes::new(),
        )
        .await;
    assert_eq!(plain.status, StatusCode::OK);
    assert!(
        plain.headers.get("server-timing").is_none(),
        "no timings without the debug scope: {:?}",
        plain.headers
    );
    let debug = system.scoped_token("123", &["debug"], 300);
    let timed = system.get(path, Some(&debug)).await;
    assert_eq!(timed.status, StatusCode::OK);
    let timings: Vec<&str> = timed
        .headers
        .get_all("server-timing")
        .iter()
        .filter_map(|value| value.to_str().ok())
        .collect();
    assert!(
        timings.iter().any(|t| t.contains("order-service"))
            && timings.iter().any(|t| t.starts_with("edge-proxy")),
        "every tier's timings for the debug scope: {timings:?}"
    );

    // Defect 8, on gRPC: Pricing's debug delay knob is internal, so a malformed value sent from
    // outside (INVALID_ARGUMENT when Pricing reads it) never reaches Pricing.
    {
        use causeway_proto::pricing::v1::GetPriceRequest;
        use causeway_proto::pricing::v1::pricing_service_client::PricingServiceClient;
        let channel = system.edge_grpc_channel().await;
        let mut request = tonic::Request::new(GetPriceRequest {
            sku: "SKU-0001".into(),
        });
        let metadata = request.metadata_mut();
        metadata.insert("authorization", format!("Bearer {owner}").parse().unwrap());
        metadata.insert(
            causeway_services::pricing::DEBUG_DELAY_METADATA,
            "soon".parse().unwrap(),
        );
        let price = PricingServiceClient::new(channel)
            .get_price(request)
            .await
            .expect("the internal header is stripped at the edge, so the call succeeds");
        assert_eq!(price.get_ref().unit_price_cents, 12999);
    }

    // Defect 4, per tier: both framings, either order, answered 400 with the JSON reason.
    let reverse_proxy = system.listen_of("reverse-proxy-1");
    let user_service = system.listen_of("user-service-1");
    for (tier, addr) in [
        ("the edge", system.edge()),
        ("a reverse proxy", reverse_proxy),
        ("a service", user_service),
    ] {
        for framing in [
            "Content-Length: 5\r\nTransfer-Encoding: chunked",
            "Transfer-Encoding: chunked\r\nContent-Length: 5",
        ] {
            let raw = format!(
                "POST /api/users/123/orders HTTP/1.1\r\nHost: localhost\r\n\
                 Authorization: Bearer {owner}\r\n{framing}\r\n\r\n0\r\n\r\n"
            );
            let answer = system.raw_https(addr, raw.as_bytes()).await;
            assert!(
                answer.starts_with("HTTP/1.1 400"),
                "{tier} ({framing:?}): {answer}"
            );
            assert!(
                answer.contains("\"error\":\"ambiguous_framing\""),
                "{tier}: {answer}"
            );
        }
    }
    // And every tier keeps serving.
    let after = system.get(path, Some(&owner)).await;
    assert_eq!(after.status, StatusCode::OK);
}

/// The edge balancer names each client to the reverse proxies with a PROXY protocol v2 header,
/// so their access logs (and the `X-Forwarded-For` they send on, and their rate limits by
/// address) carry the client's address, not the balancer's; a client that reaches a reverse
/// proxy directly cannot claim another address with a header of its own, and the proxy keeps
/// serving it and everyone else.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_client_address_survives_the_balancer_and_cannot_be_forged() {
    use std::net::{IpAddr, Ipv4Addr};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let system = System::start(test_topology());
    let token = system.token("123", 300);
    let second_client = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
    let request = format!(
        "GET /api/users/123/orders HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\n\
         Connection: close\r\n\r\n"
    );
    let proxies = ["reverse-proxy-1", "reverse-proxy-2"];

    let answer = system
        .raw_https_from(second_client, system.edge(), request.as_bytes())
        .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        log_shows(
            &system,
            &proxies,
            &["\"client\":\"127.0.0.2:"],
            LOG_PATIENCE
        )
        .await
        .is_some(),
        "no reverse proxy logged the client's own address"
    );

    // Straight to a reverse proxy from 127.0.0.2, which it does not trust to send a header.
    let proxy = system.listen_of("reverse-proxy-1");
    let mut forged = harness::connect_from(second_client, proxy).await;
    let header = causeway_core::serve::proxy_protocol::header_for(
        "198.51.100.7:4000".parse().unwrap(),
        proxy,
    );
    forged.write_all(&header).await.unwrap();
    // Closed without a byte of answer (not even a TLS alert), and said why.
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), forged.read_to_end(&mut answer)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "a forged header got {read:?}: {answer:?}"
    );
    assert!(
        log_shows(
            &system,
            &["reverse-proxy-1"],
            &["proxy_protocol_untrusted", "127.0.0.2:"],
            LOG_PATIENCE
        )
        .await
        .is_some(),
        "the refusal was not logged"
    );
    // The same client without a header is served as itself.
    let answer = system
        .raw_https_from(second_client, proxy, request.as_bytes())
        .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

/// Two reverse proxies, one rate-limit budget: a client whose requests the balancer spreads over
/// both instances gets its burst once, not once per instance (before, each instance had the whole
/// budget of its own, so the second round here was served in full).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_reverse_proxies_share_one_rate_limit_budget() {
    let mut topology = test_topology();
    topology.reverse_proxy.instances = 2;
    topology.reverse_proxy.rate_limit.requests_per_second = 1;
    topology.reverse_proxy.rate_limit.burst = 6;
    let system = System::start(topology);
    let token = system.token("123", 300);
    let path = "/api/users/123/orders";
    // Each instance has found the other (discovery lists an instance once it has registered).
    for proxy in ["reverse-proxy-1", "reverse-proxy-2"] {
        let found = eventually(Duration::from_secs(10), async || {
            let metrics = system.metrics(proxy).await;
            metrics
                .lines()
                .any(|line| {
                    line.starts_with("causeway_rate_limit_shared_peers") && line.ends_with(" 1")
                })
                .then_some(())
        })
        .await;
        assert!(found.is_some(), "{proxy} never found the other instance");
    }

    // The burst, over both instances (one connection per request, balanced round robin).
    for n in 0..6 {
        let response = system.get(path, Some(&token)).await;
        assert_eq!(
            response.status,
            StatusCode::OK,
            "request {n}: {:?}",
            response.body
        );
    }
    for proxy in ["reverse-proxy-1", "reverse-proxy-2"] {
        assert!(
            log_shows(&system, &[proxy], &["\"status\":200"], LOG_PATIENCE)
                .await
                .is_some(),
            "{proxy} served none of the burst"
        );
    }
    // Time for the instances' reports (every 50 ms), then a second round: the budget is spent
    // wherever it lands; the refill (1/s on each bucket) lets at most one more through on each.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut served = 0;
    for _ in 0..6 {
        let response = system.get(path, Some(&token)).await;
        match response.status {
            StatusCode::OK => served += 1,
            StatusCode::TOO_MANY_REQUESTS => assert_eq!(error_code(&response), "rate_limited"),
            other => panic!("{other}: {:?}", response.body),
        }
    }
    assert!(
        served <= 2,
        "{served} of 6 served after the burst was spent"
    );
}

/// `causeway soak` with chaos: every technique runs while each of the chaos victims (order and
/// pricing instances, a reverse proxy, the consumer, the publisher and the broker) is killed,
/// and the end-to-end account must show no message lost, none duplicated, every failing one
/// dead-lettered, and most calls answered. A consumer that stored a redelivery twice, an outbox
/// that lost a message while the broker was down, or a settle count read from the wrong place
/// would each show here.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_soak_with_chaos_loses_and_duplicates_nothing() {
    let topology = test_topology();
    let victims = causeway_cli::soak::chaos_victims(&topology);
    let system = System::start(topology);
    let output = system.run(&[
        "soak",
        "--minutes",
        "0.34",
        "--rate",
        "8",
        "--chaos-every",
        "2",
        "--settle",
        "30",
        "--json",
    ]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: serde_json::Value = serde_json::from_str(&stdout).expect("the soak's JSON");
    let messages = &report["messages"];
    assert_eq!(messages["lost"], 0, "{report:#}");
    assert_eq!(messages["duplicated"], 0, "{report:#}");
    assert_eq!(messages["wrongly_stored"], 0, "{report:#}");
    let published = messages["published"].as_u64().expect("published");
    let consumed = messages["consumed"].as_u64().expect("consumed");
    let dead_lettered = messages["dead_lettered"].as_u64().expect("dead_lettered");
    assert!(published >= 50, "{report:#}");
    assert_eq!(consumed + dead_lettered, published, "{report:#}");
    assert!(dead_lettered > 0, "{report:#}");

    let killed: BTreeSet<&str> = report["chaos"]
        .as_array()
        .expect("chaos events")
        .iter()
        .filter_map(|event| event["instance"].as_str())
        .collect();
    for victim in &victims {
        assert!(
            killed.contains(victim.as_str()),
            "{victim} was not killed: {report:#}"
        );
    }
    for technique in ["rest", "grpc"] {
        let made = report[technique]["made"].as_u64().expect("made");
        let succeeded = report[technique]["succeeded"].as_u64().expect("succeeded");
        assert!(made >= 100, "{technique}: {report:#}");
        assert!(succeeded * 10 >= made * 9, "{technique}: {report:#}");
    }
    // Every component's memory is reported, and those chaos spared lived through the run.
    let memory = report["memory"].as_array().expect("memory");
    assert_eq!(memory.len(), system.state().components.len(), "{report:#}");
    let spared = memory
        .iter()
        .find(|process| process["instance"] == "order-service-1")
        .expect("order-service-1");
    assert_eq!(spared["restarts"], 0, "{report:#}");
    assert!(spared["growth"].is_number(), "{report:#}");
}
