use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use causeway_core::serve::shutdown_channel;
use causeway_core::topology::RateLimitConfig;
use tokio::net::UdpSocket;

use super::*;

fn config(burst: u32) -> RateLimitConfig {
    RateLimitConfig {
        requests_per_second: 1,
        burst,
        ..RateLimitConfig::default()
    }
}

fn subject(name: &str) -> ClientKey {
    ClientKey::Subject(name.into())
}

fn admitted(limit: &RateLimit, key: &ClientKey, tries: usize) -> usize {
    (0..tries).filter(|_| limit.check(key).is_ok()).count()
}

/// A limit whose admitted requests are kept for the report, as `spawn_sharing` makes it.
fn shared(config: &RateLimitConfig) -> RateLimit {
    let limit = RateLimit::new(config);
    limit
        .shared
        .store(true, std::sync::atomic::Ordering::Relaxed);
    limit
}

#[test]
fn what_one_instance_admits_is_spent_from_the_others_buckets() {
    let (a, b) = (shared(&config(4)), shared(&config(4)));
    let key = subject("123");
    assert_eq!(admitted(&a, &key, 3), 3);
    let unsent = a.take_unsent();
    assert_eq!(unsent.get(&key), Some(&3));
    assert!(a.take_unsent().is_empty(), "a report is sent once");
    for (key, hits) in &unsent {
        b.absorb(key, *hits);
    }
    // Four in all, whichever instance a request reaches: one left at b.
    assert_eq!(admitted(&b, &key, 4), 1);
    // Another client's budget is its own.
    assert_eq!(admitted(&b, &subject("124"), 4), 4);
    // More reported than the bucket holds empties it and nothing else.
    b.absorb(&subject("125"), 1_000_000);
    assert_eq!(admitted(&b, &subject("125"), 1), 0);
}

#[test]
fn an_unshared_limit_keeps_nothing_to_report() {
    let alone = RateLimit::new(&config(4));
    assert_eq!(admitted(&alone, &subject("123"), 6), 4);
    assert!(alone.take_unsent().is_empty());
}

#[test]
fn large_reports_split_into_datagrams_that_each_parse() {
    let unsent: HashMap<ClientKey, u32> = (0..5000u32)
        .map(|n| {
            (
                subject(&format!("user-{n:05}-with-a-long-subject")),
                n % 7 + 1,
            )
        })
        .chain([(ClientKey::Ip("2001:db8::1".parse().unwrap()), 2)])
        .chain([(subject(&"x".repeat(MAX_DATAGRAM)), 1)])
        .collect();
    let expected: u64 = unsent
        .iter()
        .filter(|(key, _)| !matches!(key, ClientKey::Subject(s) if s.len() >= MAX_DATAGRAM))
        .map(|(_, hits)| u64::from(*hits))
        .sum();
    let datagrams = datagrams("reverse-proxy-1", unsent);
    assert!(datagrams.len() > 1, "{} datagrams", datagrams.len());
    let mut total = 0;
    for datagram in &datagrams {
        assert!(datagram.len() <= MAX_DATAGRAM, "{} bytes", datagram.len());
        let report: Report = serde_json::from_slice(datagram).expect("a report");
        assert_eq!(report.from, "reverse-proxy-1");
        total += report
            .hits
            .iter()
            .map(|(_, hits)| u64::from(*hits))
            .sum::<u64>();
    }
    // All but the subject too long to report.
    assert_eq!(total, expected);
}

struct Fixed(&'static str, Vec<SocketAddr>);

impl PeerSource for Fixed {
    fn instance(&self) -> &str {
        self.0
    }

    async fn list(&self) -> Option<Vec<SocketAddr>> {
        Some(self.1.clone())
    }
}

/// Two instances on real UDP sockets: a burst spent at one is gone at the other within a few
/// intervals; a datagram from an address that is not a peer spends nothing.
#[tokio::test]
async fn two_instances_share_one_budget_over_udp() {
    let (sa, sb) = (
        UdpSocket::bind("127.0.0.1:0").await.unwrap(),
        UdpSocket::bind("127.0.0.1:0").await.unwrap(),
    );
    let (addr_a, addr_b) = (sa.local_addr().unwrap(), sb.local_addr().unwrap());
    let a = Arc::new(RateLimit::new(&config(6)));
    let b = Arc::new(RateLimit::new(&config(6)));
    let (stop, shutdown) = shutdown_channel();
    let interval = Duration::from_millis(20);
    let tasks = [
        spawn_sharing(
            a.clone(),
            sa,
            Fixed("a", vec![addr_b]),
            interval,
            shutdown.clone(),
        ),
        spawn_sharing(
            b.clone(),
            sb,
            Fixed("b", vec![addr_a]),
            interval,
            shutdown.clone(),
        ),
    ];
    // An outsider's forged report first: b must not believe it.
    let outsider = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let forged = serde_json::to_vec(&Report {
        from: "a".into(),
        hits: vec![(subject("victim"), 6)],
    })
    .unwrap();
    outsider.send_to(&forged, addr_b).await.unwrap();

    // Both have listed the other (a report before that would find nobody to go to).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while (a.metrics.peers.get(), b.metrics.peers.get()) != (1, 1) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the peers never listed each other"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let key = subject("123");
    assert_eq!(admitted(&a, &key, 5), 5);
    // b hears of a's five and keeps the one left (the refill at 1/s adds at most one meanwhile).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while b.metrics.hits_received.get() < 5 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        b.metrics.hits_received.get(),
        5,
        "b never heard of a's requests"
    );
    assert!(admitted(&b, &key, 6) <= 2);
    assert_eq!(
        admitted(&b, &subject("victim"), 6),
        6,
        "a forged report was believed"
    );
    assert!(b.metrics.datagrams_refused.get() >= 1);
    stop.fire();
    for task in tasks {
        task.await.unwrap();
    }
}
