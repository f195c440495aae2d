//! Behaviour of the upstream as a whole: distributions, ejection and recovery, health checks.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use http::{HeaderMap, HeaderValue, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::*;

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn specs(ids: &[&str]) -> Vec<EndpointSpec> {
    ids.iter()
        .enumerate()
        .map(|(i, id)| EndpointSpec::new(*id, addr(10_000 + i as u16)))
        .collect()
}

fn upstream(policy: BalancePolicy, specs: Vec<EndpointSpec>) -> Upstream {
    let config = UpstreamConfig {
        balance: policy,
        ..UpstreamConfig::default()
    };
    Upstream::new("test", config, specs).expect("valid upstream")
}

/// Picks `n` times (each request finishing at once) and returns the endpoint ids in order.
fn pick_ids(upstream: &Upstream, headers: &HeaderMap, n: usize, now: Instant) -> Vec<String> {
    (0..n)
        .map(|_| {
            let guard = upstream.pick_at(headers, now).expect("an endpoint");
            guard.endpoint().id().to_string()
        })
        .collect()
}

fn counts(ids: &[String]) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for id in ids {
        *counts.entry(id.clone()).or_insert(0) += 1;
    }
    counts
}

fn header_key(value: &str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(
        "x-user",
        HeaderValue::from_str(value).expect("ascii header value"),
    );
    headers
}

fn hash_on_header() -> BalancePolicy {
    BalancePolicy::ConsistentHash {
        key: HashKey::Header {
            name: "x-user".into(),
        },
        table_size: DEFAULT_MAGLEV_TABLE_SIZE,
        fallback: Fallback::RoundRobin,
    }
}

fn hashed_owner(upstream: &Upstream, key: &str, now: Instant) -> String {
    let guard = upstream
        .pick_at(&header_key(key), now)
        .expect("an endpoint");
    guard.endpoint().id().to_string()
}

fn endpoint_named(upstream: &Upstream, id: &str) -> Arc<Endpoint> {
    upstream
        .endpoints()
        .into_iter()
        .find(|endpoint| endpoint.id() == id)
        .expect("endpoint in set")
}

/// Records `n` outcomes on endpoint `id` as if the balancer had sent them there.
fn record(upstream: &Upstream, id: &str, outcome: Outcome, n: usize, now: Instant) {
    let endpoint = endpoint_named(upstream, id);
    for _ in 0..n {
        upstream.track_at(&endpoint, now).record_at(outcome, now);
    }
}

#[test]
fn round_robin_rotates_exactly() {
    let upstream = upstream(BalancePolicy::RoundRobin, specs(&["a", "b", "c"]));
    let ids = pick_ids(&upstream, &HeaderMap::new(), 9, Instant::now());
    assert_eq!(ids, ["a", "b", "c", "a", "b", "c", "a", "b", "c"]);
}

#[test]
fn smooth_weighted_round_robin_follows_nginx() {
    let specs = vec![
        EndpointSpec::new("a", addr(1)).with_weight(5),
        EndpointSpec::new("b", addr(2)).with_weight(1),
        EndpointSpec::new("c", addr(3)).with_weight(1),
    ];
    let upstream = upstream(BalancePolicy::WeightedRoundRobin, specs);
    let ids = pick_ids(&upstream, &HeaderMap::new(), 700, Instant::now());
    assert_eq!(ids[..7], ["a", "a", "b", "a", "c", "a", "a"]);
    assert_eq!(ids[7..14], ids[..7], "the cycle repeats");
    let counts = counts(&ids);
    assert_eq!(
        (counts["a"], counts["b"], counts["c"]),
        (500, 100, 100),
        "exact proportions"
    );
}

#[test]
fn least_request_avoids_a_slow_endpoint() {
    let upstream = upstream(
        BalancePolicy::LeastRequest,
        specs(&["fast1", "fast2", "slow", "fast3"]),
    );
    let t0 = Instant::now();
    let slow = endpoint_named(&upstream, "slow");
    // A 500 ms answer makes its estimate 500 ms at once (peak); the others stay at 30 ms.
    let guard = upstream.track_at(&slow, t0);
    let now = t0 + Duration::from_millis(500);
    guard.record_at(Outcome::Response(StatusCode::OK), now);
    for id in ["fast1", "fast2", "fast3"] {
        record(&upstream, id, Outcome::Response(StatusCode::OK), 1, now);
    }
    assert!(slow.ewma_latency(now) >= Duration::from_millis(499));

    let counts = counts(&pick_ids(&upstream, &HeaderMap::new(), 4000, now));
    let to_slow = counts.get("slow").copied().unwrap_or(0);
    assert!(
        to_slow < 200,
        "slow endpoint got {to_slow} of 4000: {counts:?}"
    );
    for id in ["fast1", "fast2", "fast3"] {
        assert!(counts[id] > 1000, "{counts:?}");
    }
}

#[test]
fn least_request_avoids_an_endpoint_with_many_in_flight() {
    let upstream = upstream(BalancePolicy::LeastRequest, specs(&["a", "busy", "b"]));
    let now = Instant::now();
    let busy = endpoint_named(&upstream, "busy");
    let held: Vec<PickGuard> = (0..20).map(|_| upstream.track_at(&busy, now)).collect();
    assert_eq!(busy.in_flight(), 20);

    let counts = counts(&pick_ids(&upstream, &HeaderMap::new(), 3000, now));
    let to_busy = counts.get("busy").copied().unwrap_or(0);
    assert!(
        to_busy < 150,
        "busy endpoint got {to_busy} of 3000: {counts:?}"
    );

    drop(held);
    assert_eq!(busy.in_flight(), 0, "dropped guards leave the count");
    let counts = counts_after_release(&upstream, now);
    assert!(
        counts["busy"] > 700,
        "back in rotation once idle: {counts:?}"
    );
}

fn counts_after_release(upstream: &Upstream, now: Instant) -> HashMap<String, usize> {
    counts(&pick_ids(upstream, &HeaderMap::new(), 3000, now))
}

#[test]
fn maglev_is_sticky_and_spreads_keys_evenly() {
    let ids: Vec<String> = (0..10).map(|i| format!("e{i}")).collect();
    let id_refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    let upstream = upstream(hash_on_header(), specs(&id_refs));
    let now = Instant::now();
    for key in ["alice", "bob", "carol"] {
        let first = hashed_owner(&upstream, key, now);
        for _ in 0..20 {
            assert_eq!(hashed_owner(&upstream, key, now), first, "key {key}");
        }
    }
    let owners: Vec<String> = (0..10_000)
        .map(|i| hashed_owner(&upstream, &format!("user-{i}"), now))
        .collect();
    let counts = counts(&owners);
    assert_eq!(counts.len(), 10);
    for (id, count) in &counts {
        // 1000 expected each; ±15% is about five standard deviations.
        assert!((850..=1150).contains(count), "{id}: {count} ({counts:?})");
    }
}

#[test]
fn maglev_moves_only_the_removed_endpoints_keys() {
    let ids: Vec<String> = (0..10).map(|i| format!("e{i}")).collect();
    let id_refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    let all = specs(&id_refs);
    let upstream = upstream(hash_on_header(), all.clone());
    let now = Instant::now();
    let keys: Vec<String> = (0..10_000).map(|i| format!("user-{i}")).collect();
    let before: Vec<String> = keys
        .iter()
        .map(|key| hashed_owner(&upstream, key, now))
        .collect();

    let without_e3: Vec<EndpointSpec> = all.into_iter().filter(|s| s.id != "e3").collect();
    upstream.update(without_e3).expect("update");
    let after: Vec<String> = keys
        .iter()
        .map(|key| hashed_owner(&upstream, key, now))
        .collect();

    let mut moved_elsewhere = 0;
    for (was, is) in before.iter().zip(&after) {
        assert_ne!(is, "e3");
        if was != "e3" && was != is {
            moved_elsewhere += 1;
        }
    }
    // Maglev trades a little disruption for balance (18 of 10000 keys here); modulo hashing
    // would move ~90%.
    assert!(
        moved_elsewhere < 100,
        "{moved_elsewhere} of 10000 keys moved between surviving endpoints"
    );
}

#[test]
fn consistent_hash_on_a_cookie_falls_back_without_one() {
    let policy = BalancePolicy::ConsistentHash {
        key: HashKey::Cookie {
            name: "session".into(),
        },
        table_size: 251,
        fallback: Fallback::RoundRobin,
    };
    let upstream = upstream(policy, specs(&["a", "b", "c"]));
    let now = Instant::now();
    let mut headers = HeaderMap::new();
    headers.insert(
        http::header::COOKIE,
        HeaderValue::from_static("theme=dark; session=s-123"),
    );
    let ids = pick_ids(&upstream, &headers, 30, now);
    assert!(ids.iter().all(|id| *id == ids[0]), "{ids:?}");
    // No cookie: round robin over all three.
    let ids = pick_ids(&upstream, &HeaderMap::new(), 3, now);
    assert_eq!(counts(&ids).len(), 3, "{ids:?}");
}

#[test]
fn hashed_key_moves_off_an_ejected_endpoint_and_comes_back() {
    let mut config = UpstreamConfig {
        balance: hash_on_header(),
        ..UpstreamConfig::default()
    };
    config.outlier.consecutive_5xx = 2;
    config.outlier.max_ejection_percent = 50;
    let upstream = Upstream::new("test", config, specs(&["a", "b", "c", "d"])).expect("upstream");
    let t0 = Instant::now();
    let owner = hashed_owner(&upstream, "alice", t0);
    record(&upstream, &owner, Outcome::Failure, 2, t0);
    let elsewhere = hashed_owner(&upstream, "alice", t0);
    assert_ne!(elsewhere, owner);
    assert_eq!(
        hashed_owner(&upstream, "alice", t0),
        elsewhere,
        "still sticky"
    );
    let later = t0 + Duration::from_secs(31);
    assert_eq!(hashed_owner(&upstream, "alice", later), owner);
}

fn outlier_upstream(ids: &[&str], max_ejection_percent: u8) -> Upstream {
    let mut config = UpstreamConfig {
        balance: BalancePolicy::RoundRobin,
        ..UpstreamConfig::default()
    };
    config.outlier = OutlierConfig {
        enabled: true,
        consecutive_5xx: 3,
        consecutive_connect_failures: 2,
        base_ejection_ms: 10_000,
        max_ejection_ms: 25_000,
        max_ejection_percent,
    };
    Upstream::new("test", config, specs(ids)).expect("upstream")
}

fn ejected(upstream: &Upstream, now: Instant) -> Vec<String> {
    upstream
        .endpoints()
        .iter()
        .filter(|endpoint| endpoint.is_ejected(now))
        .map(|endpoint| endpoint.id().to_string())
        .collect()
}

#[test]
fn consecutive_failures_eject_for_a_growing_time() {
    let upstream = outlier_upstream(&["a", "b", "c"], 50);
    let t0 = Instant::now();
    let bad = Outcome::Response(StatusCode::BAD_GATEWAY);
    record(&upstream, "b", bad, 2, t0);
    assert!(ejected(&upstream, t0).is_empty(), "below the threshold");
    record(&upstream, "b", bad, 1, t0);
    assert_eq!(ejected(&upstream, t0), ["b"]);
    let ids = pick_ids(&upstream, &HeaderMap::new(), 10, t0);
    assert!(
        !ids.iter().any(|id| id == "b"),
        "skipped while ejected: {ids:?}"
    );

    let labels = EndpointLabels {
        upstream: "test".into(),
        endpoint: "b".into(),
    };
    let ejections = |upstream: &Upstream| upstream.metrics().ejections.get_or_create(&labels).get();
    assert_eq!(ejections(&upstream), 1);
    assert_eq!(upstream.metrics().ejected.get_or_create(&labels).get(), 1);

    // Back after 10 s, the first ejection's length.
    let t1 = t0 + Duration::from_millis(9_999);
    assert!(!pick_ids(&upstream, &HeaderMap::new(), 6, t1).contains(&"b".to_string()));
    let t2 = t0 + Duration::from_secs(10);
    assert!(pick_ids(&upstream, &HeaderMap::new(), 6, t2).contains(&"b".to_string()));
    assert_eq!(upstream.metrics().ejected.get_or_create(&labels).get(), 0);

    // Connect failures have their own threshold; the second ejection lasts 20 s.
    record(&upstream, "b", Outcome::ConnectFailure, 2, t2);
    assert_eq!(ejected(&upstream, t2), ["b"]);
    assert_eq!(ejections(&upstream), 2);
    assert!(upstream.endpoints()[1].is_ejected(t2 + Duration::from_millis(19_999)));
    assert!(!upstream.endpoints()[1].is_ejected(t2 + Duration::from_secs(20)));
    // The third would be 30 s but is capped at 25 s.
    let t3 = t2 + Duration::from_secs(20);
    assert!(pick_ids(&upstream, &HeaderMap::new(), 3, t3).contains(&"b".to_string()));
    record(&upstream, "b", bad, 3, t3);
    assert!(upstream.endpoints()[1].is_ejected(t3 + Duration::from_millis(24_999)));
    assert!(!upstream.endpoints()[1].is_ejected(t3 + Duration::from_secs(25)));
    assert_eq!(upstream.endpoints()[1].times_ejected(), 3);
}

#[test]
fn an_endpoint_back_from_ejection_is_half_open_until_one_probe_decides() {
    let upstream = outlier_upstream(&["a", "b", "c"], 50);
    let t0 = Instant::now();
    let bad = Outcome::Response(StatusCode::SERVICE_UNAVAILABLE);
    record(&upstream, "b", bad, 3, t0);
    assert_eq!(ejected(&upstream, t0), ["b"]);

    // Back after 10 s: the first request to b is its probe, and while it is out b gets no other.
    let t1 = t0 + Duration::from_secs(10);
    let mut picks = Vec::new();
    let probe = loop {
        let guard = upstream
            .pick_at(&HeaderMap::new(), t1)
            .expect("an endpoint");
        if guard.endpoint().id() == "b" {
            break guard;
        }
        picks.push(guard);
        assert!(picks.len() < 10, "b never came back");
    };
    assert!(probe.is_probe());
    assert!(endpoint_named(&upstream, "b").is_half_open());
    let others = pick_ids(&upstream, &HeaderMap::new(), 8, t1);
    assert!(!others.contains(&"b".to_string()), "{others:?}");

    // The probe fails: ejected again at once (one failure, not three), for twice as long.
    probe.record_at(bad, t1);
    assert_eq!(ejected(&upstream, t1), ["b"]);
    assert!(endpoint_named(&upstream, "b").is_ejected(t1 + Duration::from_millis(19_999)));
    assert_eq!(endpoint_named(&upstream, "b").times_ejected(), 2);

    // A cancelled probe (dropped without an outcome) hands the probe to the next request.
    let t2 = t1 + Duration::from_secs(20);
    let b = endpoint_named(&upstream, "b");
    assert!(pick_ids(&upstream, &HeaderMap::new(), 3, t2).contains(&"b".to_string()));
    let probe = upstream.track_at(&b, t2);
    assert!(probe.is_probe());
    drop(probe);
    let probe = upstream.track_at(&b, t2);
    assert!(probe.is_probe(), "the cancelled probe was not released");

    // It succeeds: the circuit closes, b takes its share, and ejection needs the threshold again.
    probe.record_at(Outcome::Response(StatusCode::OK), t2);
    assert!(!b.is_half_open());
    let ids = pick_ids(&upstream, &HeaderMap::new(), 9, t2);
    assert_eq!(counts(&ids).get("b"), Some(&3), "{ids:?}");
    record(&upstream, "b", bad, 2, t2);
    assert!(ejected(&upstream, t2).is_empty());
}

#[test]
fn max_ejection_percent_is_respected() {
    let upstream = outlier_upstream(&["a", "b", "c", "d"], 50);
    let now = Instant::now();
    for id in ["a", "b", "c", "d"] {
        record(&upstream, id, Outcome::Failure, 5, now);
    }
    assert_eq!(ejected(&upstream, now), ["a", "b"], "50% of 4");
    let ids = pick_ids(&upstream, &HeaderMap::new(), 4, now);
    assert_eq!(counts(&ids).len(), 2);

    // Even at 100%, one endpoint stays.
    let upstream = outlier_upstream(&["a", "b"], 100);
    record(&upstream, "a", Outcome::Failure, 3, now);
    record(&upstream, "b", Outcome::Failure, 3, now);
    assert_eq!(ejected(&upstream, now), ["a"]);

    // And an ejection that would leave only unhealthy endpoints is skipped.
    let upstream = outlier_upstream(&["a", "b", "c"], 100);
    upstream.endpoints()[1].set_healthy(false);
    record(&upstream, "a", Outcome::Failure, 3, now);
    record(&upstream, "c", Outcome::Failure, 3, now);
    assert_eq!(ejected(&upstream, now), ["a"]);
    assert_eq!(
        pick_ids(&upstream, &HeaderMap::new(), 3, now),
        ["c", "c", "c"]
    );
}

#[test]
fn update_keeps_the_state_of_endpoints_that_stay() {
    let upstream = outlier_upstream(&["a", "b", "c"], 50);
    let now = Instant::now();
    let a = upstream.endpoints()[0].clone();
    let guard = upstream.track_at(&a, now);
    record(&upstream, "b", Outcome::Failure, 3, now);

    let mut next = specs(&["a", "b"]);
    next[1].weight = 7;
    next.push(EndpointSpec::new("d", addr(20_000)));
    upstream.update(next).expect("update");
    let endpoints = upstream.endpoints();
    assert!(Arc::ptr_eq(&endpoints[0], &a));
    assert_eq!(endpoints[0].in_flight(), 1);
    assert!(endpoints[1].is_ejected(now), "ejection kept");
    assert_eq!(endpoints[1].weight(), 7, "weight follows discovery");
    assert_eq!(endpoints[2].id(), "d");
    drop(guard);
    assert_eq!(a.in_flight(), 0);

    // Same id at a new address is a new endpoint.
    upstream
        .update(vec![EndpointSpec::new("b", addr(30_000))])
        .expect("update");
    assert!(!upstream.endpoints()[0].is_ejected(now));

    let duplicate = upstream.update(specs(&["a", "a"]));
    assert!(matches!(
        duplicate,
        Err(UpstreamError::DuplicateEndpoint { .. })
    ));
    upstream.update(Vec::new()).expect("update");
    assert!(matches!(
        upstream.pick_at(&HeaderMap::new(), now),
        Err(PickError::NoEndpoints { .. })
    ));
}

#[test]
fn upstream_config_parses_with_defaults_and_rejects_unknown_fields() {
    let config: UpstreamConfig = serde_json::from_str(
        r#"{
            "balance": {"policy": "consistent_hash", "key": {"from": "header", "name": "x-user"}},
            "outlier": {"consecutive_5xx": 3},
            "health_check": {"path": "/ready"},
            "retry_budget": {"ratio": 0.1}
        }"#,
    )
    .expect("parses");
    assert_eq!(config.outlier.consecutive_5xx, 3);
    assert_eq!(config.outlier.max_ejection_percent, 50);
    let health = config.health_check.as_ref().expect("health check");
    assert_eq!(health.path, "/ready");
    assert_eq!(health.unhealthy_threshold, 3);
    assert_eq!(config.retry_budget.ratio, 0.1);
    assert_eq!(config.retry.retry_statuses, [503]);
    assert_eq!(
        serde_json::from_str::<UpstreamConfig>("{}").expect("empty"),
        UpstreamConfig::default()
    );
    assert!(serde_json::from_str::<UpstreamConfig>(r#"{"retries": {}}"#).is_err());
    assert!(serde_json::from_str::<UpstreamConfig>(r#"{"outlier": {"x": 1}}"#).is_err());

    let bad = UpstreamConfig {
        balance: BalancePolicy::ConsistentHash {
            key: HashKey::Header { name: "k".into() },
            table_size: 1000,
            fallback: Fallback::LeastRequest,
        },
        ..UpstreamConfig::default()
    };
    assert!(matches!(
        Upstream::new("test", bad, Vec::new()),
        Err(UpstreamError::InvalidConfig { .. })
    ));
}

#[test]
fn retry_session_counts_into_upstream_metrics() {
    let mut config = UpstreamConfig::default();
    config.retry_budget.min_retries_per_second = 0;
    let upstream = Upstream::new("test", config, specs(&["a"])).expect("upstream");
    let labels = UpstreamLabels {
        upstream: "test".into(),
    };
    for _ in 0..4 {
        let _ = upstream.retry_session(http::Method::GET);
    }
    let mut session = upstream.retry_session(http::Method::GET);
    // 5 requests, 20%: one retry.
    assert_eq!(
        session.after_failure(FailureKind::ConnectFailure, false),
        RetryDecision::Retry
    );
    assert_eq!(
        session.after_failure(FailureKind::ConnectFailure, false),
        RetryDecision::DoNotRetry(NoRetry::BudgetExhausted)
    );
    let metrics = upstream.metrics();
    assert_eq!(metrics.retries.get_or_create(&labels).get(), 1);
    assert_eq!(
        metrics.retry_budget_exhausted.get_or_create(&labels).get(),
        1
    );
}

#[test]
fn requests_in_flight_per_endpoint_are_exported_at_scrape_time() {
    let metrics = UpstreamMetrics::default();
    let mut registry = prometheus_client::registry::Registry::default();
    metrics.register(&mut registry);
    let scrape = |registry: &prometheus_client::registry::Registry| {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
        text
    };
    let config = UpstreamConfig {
        balance: BalancePolicy::RoundRobin,
        ..UpstreamConfig::default()
    };
    let orders = Upstream::with_metrics("orders", config, specs(&["a", "b"]), metrics.clone())
        .expect("upstream");
    let now = Instant::now();
    let first = orders.pick_at(&HeaderMap::new(), now).expect("an endpoint");
    let second = orders.pick_at(&HeaderMap::new(), now).expect("an endpoint");
    let third = orders.pick_at(&HeaderMap::new(), now).expect("an endpoint");
    let busy = first.endpoint().id().to_string();
    assert_eq!(third.endpoint().id(), busy, "round robin comes back to it");
    let idle = second.endpoint().id().to_string();
    drop(second);
    let text = scrape(&registry);
    assert!(
        text.contains(&format!(
            "upstream_in_flight{{upstream=\"orders\",endpoint=\"{busy}\"}} 2"
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "upstream_in_flight{{upstream=\"orders\",endpoint=\"{idle}\"}} 0"
        )),
        "{text}"
    );
    drop((first, third));
    let text = scrape(&registry);
    assert!(
        text.contains(&format!(
            "upstream_in_flight{{upstream=\"orders\",endpoint=\"{busy}\"}} 0"
        )),
        "{text}"
    );
    // A dropped upstream leaves the metric.
    drop(orders);
    assert!(!scrape(&registry).contains("upstream_in_flight{upstream=\"orders\""));
}

/// A tiny HTTP/1.1 server answering every request with the status in `status`.
async fn status_server(status: Arc<AtomicU16>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let local = listener.local_addr().expect("local addr");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let status = status.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let code = status.load(Ordering::Relaxed);
                let answer =
                    format!("HTTP/1.1 {code} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
                let _ = stream.write_all(answer.as_bytes()).await;
            });
        }
    });
    local
}

async fn closed_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    listener.local_addr().expect("local addr")
}

fn health_config(interval_ms: u64) -> HealthCheckConfig {
    HealthCheckConfig {
        path: "/healthz".into(),
        interval_ms,
        timeout_ms: 1_000,
        healthy_threshold: 2,
        unhealthy_threshold: 3,
    }
}

fn health(upstream: &Upstream) -> Vec<bool> {
    upstream
        .endpoints()
        .iter()
        .map(|e| e.is_healthy())
        .collect()
}

#[tokio::test]
async fn health_checks_respect_thresholds_and_flap_back() {
    let ok = status_server(Arc::new(AtomicU16::new(200))).await;
    let failing_status = Arc::new(AtomicU16::new(500));
    let failing = status_server(failing_status.clone()).await;
    let closed = closed_port().await;
    let specs = vec![
        EndpointSpec::new("ok", addr(1)).with_health_addr(ok),
        EndpointSpec::new("failing", addr(2)).with_health_addr(failing),
        EndpointSpec::new("closed", closed),
    ];
    let config = UpstreamConfig {
        balance: BalancePolicy::RoundRobin,
        health_check: Some(health_config(5_000)),
        ..UpstreamConfig::default()
    };
    let upstream = Upstream::new("test", config, specs).expect("upstream");
    let checks = health_config(5_000);

    check_round(&upstream, &checks).await;
    check_round(&upstream, &checks).await;
    assert_eq!(health(&upstream), [true, true, true], "2 failures < 3");
    check_round(&upstream, &checks).await;
    assert_eq!(health(&upstream), [true, false, false]);
    let ids = pick_ids(&upstream, &HeaderMap::new(), 4, Instant::now());
    assert_eq!(ids, ["ok", "ok", "ok", "ok"]);
    let labels = EndpointLabels {
        upstream: "test".into(),
        endpoint: "failing".into(),
    };
    assert_eq!(upstream.metrics().healthy.get_or_create(&labels).get(), 0);

    failing_status.store(200, Ordering::Relaxed);
    check_round(&upstream, &checks).await;
    assert_eq!(health(&upstream), [true, false, false], "1 pass < 2");
    check_round(&upstream, &checks).await;
    assert_eq!(health(&upstream), [true, true, false]);
    assert_eq!(upstream.metrics().healthy.get_or_create(&labels).get(), 1);

    // A pass in between failures restarts the count.
    failing_status.store(503, Ordering::Relaxed);
    check_round(&upstream, &checks).await;
    check_round(&upstream, &checks).await;
    failing_status.store(200, Ordering::Relaxed);
    check_round(&upstream, &checks).await;
    failing_status.store(503, Ordering::Relaxed);
    check_round(&upstream, &checks).await;
    check_round(&upstream, &checks).await;
    assert_eq!(health(&upstream), [true, true, false]);

    // With every endpoint unhealthy there is nothing to pick.
    failing_status.store(500, Ordering::Relaxed);
    let all_failing = vec![
        EndpointSpec::new("failing", addr(2)).with_health_addr(failing),
        EndpointSpec::new("closed", closed),
    ];
    upstream.update(all_failing).expect("update");
    check_round(&upstream, &checks).await;
    assert!(matches!(
        upstream.pick(&HeaderMap::new()),
        Err(PickError::NoneAvailable { total: 2, .. })
    ));
}

#[tokio::test]
async fn health_checker_task_marks_endpoints_and_stops_on_shutdown() {
    let status = Arc::new(AtomicU16::new(200));
    let server = status_server(status.clone()).await;
    let config = UpstreamConfig {
        health_check: Some(health_config(10)),
        ..UpstreamConfig::default()
    };
    let specs = vec![EndpointSpec::new("only", server)];
    let upstream = Upstream::new("test", config, specs).expect("upstream");
    let (trigger, shutdown) = causeway_core::serve::shutdown_channel();
    let task = upstream
        .spawn_health_checker(shutdown)
        .expect("a checker is configured");

    status.store(500, Ordering::Relaxed);
    wait_for(|| !upstream.endpoints()[0].is_healthy()).await;
    status.store(200, Ordering::Relaxed);
    wait_for(|| upstream.endpoints()[0].is_healthy()).await;

    trigger.fire();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("the checker stops on shutdown")
        .expect("the checker did not panic");
    assert!(
        Upstream::new("test", UpstreamConfig::default(), Vec::new())
            .expect("upstream")
            .spawn_health_checker(causeway_core::serve::shutdown_channel().1)
            .is_none(),
        "no checker without a health_check section"
    );
}

async fn wait_for(condition: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not reached in time"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
