//! The discovery server end to end: registrations over real HTTP on 127.0.0.1, answers over real
//! UDP and TCP DNS.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::Duration;

use causeway_core::registry_api::{ErrorBody, InstanceRecord, RegisteredInstance, RegistryListing};
use causeway_core::serve::{ShutdownTrigger, shutdown_channel};
use causeway_core::telemetry::Metrics;
use causeway_core::topology::DiscoveryConfig;
use causeway_discovery::{DiscoveryServer, Registry};
use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::task::JoinHandle;

const TTL: u32 = 7;

struct Harness {
    dns: SocketAddr,
    api: SocketAddr,
    trigger: ShutdownTrigger,
    task: JoinHandle<()>,
}

impl Harness {
    async fn start(expiry: Duration) -> Self {
        let config = DiscoveryConfig {
            dns_listen: "127.0.0.1:0".parse().unwrap(),
            api_listen: "127.0.0.1:0".parse().unwrap(),
            record_ttl_secs: TTL,
            ..DiscoveryConfig::default()
        };
        let mut metrics = Metrics::new("discovery", "discovery-1");
        let server = DiscoveryServer::bind(&config, Registry::new(expiry), &mut metrics)
            .await
            .expect("bind");
        assert_eq!(server.dns_addr.ip(), config.dns_listen.ip());
        assert_ne!(server.dns_addr.port(), 0);
        let (trigger, shutdown) = shutdown_channel();
        let (dns, api) = (server.dns_addr, server.api_addr);
        let task = tokio::spawn(server.run(metrics.into_shared(), shutdown));
        Self {
            dns,
            api,
            trigger,
            task,
        }
    }

    async fn stop(self) {
        self.trigger.fire();
        tokio::time::timeout(Duration::from_secs(5), self.task)
            .await
            .expect("run returns after shutdown")
            .expect("run does not panic");
    }

    async fn http(&self, method: &str, path: &str, body: Option<&[u8]>) -> (u16, String) {
        http(self.api, method, path, body).await
    }

    async fn register(&self, record: &InstanceRecord) {
        let body = serde_json::to_vec(record).unwrap();
        let path = format!("/v1/registry/{}/{}", record.service, record.instance);
        let (status, response) = self.http("PUT", &path, Some(&body)).await;
        assert_eq!(status, 200, "{response}");
        let stored: InstanceRecord = serde_json::from_str(&response).unwrap();
        assert_eq!(&stored, record);
    }

    async fn udp(&self, name: &str, qtype: RecordType) -> Message {
        udp_query(self.dns, &query(name, qtype)).await
    }

    async fn tcp(&self, name: &str, qtype: RecordType) -> Message {
        tcp_query(self.dns, &query(name, qtype)).await
    }
}

fn record(service: &str, instance: &str, port: u16, admin_port: Option<u16>) -> InstanceRecord {
    InstanceRecord {
        service: service.into(),
        instance: instance.into(),
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
        admin_addr: admin_port.map(|port| SocketAddr::from(([127, 0, 0, 1], port))),
        pid: Some(1234),
    }
}

/// A minimal HTTP/1.1 exchange: one request, `Connection: close`, read to the end.
async fn http(addr: SocketAddr, method: &str, path: &str, body: Option<&[u8]>) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let body = body.unwrap_or_default();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    // A server may answer (413) and close before reading a large body; that is fine.
    let _ = stream.write_all(body).await;
    let mut response = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut response))
        .await
        .expect("HTTP response within 5 s");
    let text = String::from_utf8(response).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("a complete response");
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    assert!(
        !head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "test client reads plain bodies only: {head}"
    );
    (status, body.to_string())
}

fn error_code(body: &str) -> String {
    let error: ErrorBody = serde_json::from_str(body).expect("a JSON error body");
    assert!(!error.message.is_empty());
    error.error
}

static NEXT_ID: AtomicU16 = AtomicU16::new(1);

fn query(name: &str, qtype: RecordType) -> Message {
    let mut message = Message::new(
        NEXT_ID.fetch_add(1, Ordering::Relaxed),
        MessageType::Query,
        OpCode::Query,
    );
    message.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
    message
}

async fn udp_query(server: SocketAddr, message: &Message) -> Message {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    socket
        .send_to(&message.to_vec().unwrap(), server)
        .await
        .unwrap();
    let mut buf = vec![0; 65_535];
    let (len, _) = tokio::time::timeout(Duration::from_secs(5), socket.recv_from(&mut buf))
        .await
        .expect("UDP answer within 5 s")
        .unwrap();
    let response = Message::from_vec(&buf[..len]).unwrap();
    assert_eq!(response.metadata.id, message.metadata.id);
    assert_eq!(response.metadata.message_type, MessageType::Response);
    response
}

async fn tcp_query(server: SocketAddr, message: &Message) -> Message {
    let mut stream = TcpStream::connect(server).await.unwrap();
    let bytes = message.to_vec().unwrap();
    let len = u16::try_from(bytes.len()).unwrap();
    stream.write_all(&len.to_be_bytes()).await.unwrap();
    stream.write_all(&bytes).await.unwrap();
    let response = tokio::time::timeout(Duration::from_secs(5), async {
        let len = stream.read_u16().await.unwrap();
        let mut buf = vec![0; usize::from(len)];
        stream.read_exact(&mut buf).await.unwrap();
        buf
    })
    .await
    .expect("TCP answer within 5 s");
    let response = Message::from_vec(&response).unwrap();
    assert_eq!(response.metadata.id, message.metadata.id);
    response
}

fn rdata(records: &[hickory_proto::rr::Record]) -> Vec<String> {
    records.iter().map(|r| r.data.to_string()).collect()
}

fn assert_soa_authority(response: &Message) {
    assert_eq!(response.authorities.len(), 1, "{response:?}");
    let soa = &response.authorities[0];
    assert_eq!(soa.record_type(), RecordType::SOA);
    assert_eq!(soa.name.to_ascii(), "internal.");
    assert_eq!(soa.ttl, TTL);
}

#[tokio::test]
async fn registered_instances_resolve_over_udp_and_tcp() {
    let server = Harness::start(Duration::from_secs(60)).await;
    server
        .register(&record(
            "order-service",
            "order-service-1",
            9001,
            Some(9101),
        ))
        .await;
    server
        .register(&record("order-service", "order-service-2", 9002, None))
        .await;
    server
        .register(&record(
            "order-service",
            "order-service-3",
            9003,
            Some(9103),
        ))
        .await;
    server
        .register(&record("user-service", "user-service-1", 9200, None))
        .await;

    for response in [
        server.udp("order-service.internal.", RecordType::A).await,
        server.tcp("ORDER-service.Internal.", RecordType::A).await,
    ] {
        assert_eq!(response.metadata.response_code, ResponseCode::NoError);
        assert!(response.metadata.authoritative);
        // Three instances on one IP: one A record.
        assert_eq!(rdata(&response.answers), ["127.0.0.1"]);
        assert_eq!(response.answers[0].ttl, TTL);
    }

    let instance = server
        .udp("order-service-2.order-service.internal.", RecordType::A)
        .await;
    assert_eq!(rdata(&instance.answers), ["127.0.0.1"]);

    for response in [
        server
            .udp("_https._tcp.order-service.internal.", RecordType::SRV)
            .await,
        server
            .tcp("_https._tcp.order-service.internal.", RecordType::SRV)
            .await,
    ] {
        assert!(response.metadata.authoritative);
        assert_eq!(
            rdata(&response.answers),
            [
                "0 1 9001 order-service-1.order-service.internal.",
                "0 1 9002 order-service-2.order-service.internal.",
                "0 1 9003 order-service-3.order-service.internal.",
            ]
        );
        let glue: Vec<String> = response
            .additionals
            .iter()
            .map(|r| format!("{} {} {}", r.name, r.record_type(), r.data))
            .collect();
        assert_eq!(
            glue,
            [
                "order-service-1.order-service.internal. A 127.0.0.1",
                "order-service-2.order-service.internal. A 127.0.0.1",
                "order-service-3.order-service.internal. A 127.0.0.1",
            ]
        );
    }

    let admin = server
        .udp("_admin._tcp.order-service.internal.", RecordType::SRV)
        .await;
    assert_eq!(
        rdata(&admin.answers),
        [
            "0 1 9101 order-service-1.order-service.internal.",
            "0 1 9103 order-service-3.order-service.internal.",
        ]
    );

    let (status, body) = server.http("GET", "/v1/registry", None).await;
    assert_eq!(status, 200);
    let listing: RegistryListing = serde_json::from_str(&body).unwrap();
    assert_eq!(listing.expiry_ms, 60_000);
    assert_eq!(listing.services["order-service"].len(), 3);
    assert_eq!(listing.services["user-service"].len(), 1);

    let (status, body) = server.http("GET", "/v1/registry/order-service", None).await;
    assert_eq!(status, 200);
    let live: Vec<RegisteredInstance> = serde_json::from_str(&body).unwrap();
    let names: Vec<&str> = live.iter().map(|i| i.record.instance.as_str()).collect();
    assert_eq!(
        names,
        ["order-service-1", "order-service-2", "order-service-3"]
    );
    let (status, body) = server.http("GET", "/v1/registry/nobody", None).await;
    assert_eq!((status, body.as_str()), (200, "[]"));

    server.stop().await;
}

#[tokio::test]
async fn missing_names_types_and_foreign_zones() {
    let server = Harness::start(Duration::from_secs(60)).await;
    server
        .register(&record("order-service", "order-service-1", 9001, None))
        .await;

    for response in [
        server.udp("nobody.internal.", RecordType::A).await,
        server
            .tcp("order-service-9.order-service.internal.", RecordType::A)
            .await,
        server
            .udp("_admin._tcp.order-service.internal.", RecordType::SRV)
            .await,
        server
            .udp("a.b.c.order-service.internal.", RecordType::A)
            .await,
    ] {
        assert_eq!(response.metadata.response_code, ResponseCode::NXDomain);
        assert!(response.metadata.authoritative);
        assert!(response.answers.is_empty());
        assert_soa_authority(&response);
    }

    // NODATA: the name exists, the type does not.
    for response in [
        server
            .udp("order-service.internal.", RecordType::AAAA)
            .await,
        server.tcp("order-service.internal.", RecordType::MX).await,
        server
            .udp("_https._tcp.order-service.internal.", RecordType::A)
            .await,
    ] {
        assert_eq!(response.metadata.response_code, ResponseCode::NoError);
        assert!(response.metadata.authoritative);
        assert!(response.answers.is_empty());
        assert_soa_authority(&response);
    }

    let refused = server.udp("example.com.", RecordType::A).await;
    assert_eq!(refused.metadata.response_code, ResponseCode::Refused);
    assert!(!refused.metadata.authoritative);
    assert!(refused.answers.is_empty());

    let mut status = query("internal.", RecordType::SOA);
    status.metadata.op_code = OpCode::Status;
    let notimp = udp_query(server.dns, &status).await;
    assert_eq!(notimp.metadata.response_code, ResponseCode::NotImp);

    let soa = server.tcp("internal.", RecordType::SOA).await;
    assert_eq!(soa.answers.len(), 1);
    assert!(rdata(&soa.answers)[0].starts_with("ns.internal. hostmaster.internal. "));
    let ns = server.udp("internal.", RecordType::NS).await;
    assert_eq!(rdata(&ns.answers), ["ns.internal."]);
    let ns_a = server.udp("ns.internal.", RecordType::A).await;
    assert_eq!(rdata(&ns_a.answers), ["127.0.0.1"]);

    server.stop().await;
}

#[tokio::test]
async fn deregistration_and_expiry_remove_names_from_dns() {
    let server = Harness::start(Duration::from_millis(400)).await;
    server
        .register(&record("order-service", "order-service-1", 9001, None))
        .await;
    server
        .register(&record("user-service", "user-service-1", 9200, None))
        .await;
    let before = server.udp("order-service.internal.", RecordType::A).await;
    assert_eq!(rdata(&before.answers), ["127.0.0.1"]);

    // Keep user-service alive with heartbeats while order-service goes silent.
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        server
            .register(&record("user-service", "user-service-1", 9200, None))
            .await;
    }
    let expired = server.udp("order-service.internal.", RecordType::A).await;
    assert_eq!(expired.metadata.response_code, ResponseCode::NXDomain);
    let alive = server.udp("user-service.internal.", RecordType::A).await;
    assert_eq!(rdata(&alive.answers), ["127.0.0.1"]);

    let (status, body) = server
        .http("DELETE", "/v1/registry/user-service/user-service-1", None)
        .await;
    assert_eq!((status, body.as_str()), (204, ""));
    let gone = server.tcp("user-service.internal.", RecordType::A).await;
    assert_eq!(gone.metadata.response_code, ResponseCode::NXDomain);
    let (status, body) = server
        .http("DELETE", "/v1/registry/user-service/user-service-1", None)
        .await;
    assert_eq!(status, 404);
    assert_eq!(error_code(&body), "unknown_instance");

    let (_, body) = server.http("GET", "/v1/registry", None).await;
    let listing: RegistryListing = serde_json::from_str(&body).unwrap();
    assert!(listing.services.is_empty(), "{listing:?}");

    server.stop().await;
}

#[tokio::test]
async fn malformed_registrations_are_refused_with_json_errors() {
    let server = Harness::start(Duration::from_secs(60)).await;
    let good = serde_json::to_vec(&record("order-service", "order-service-1", 9001, None)).unwrap();
    let cases: [(&str, &[u8]); 5] = [
        ("/v1/registry/order-service/order-service-1", b"{not json"),
        (
            "/v1/registry/order-service/order-service-1",
            b"{\"service\":\"order-service\"}",
        ),
        ("/v1/registry/order-service/order-service-2", &good),
        ("/v1/registry/Order-Service/order-service-1", &good),
        ("/v1/registry/order-service/order_service_1", &good),
    ];
    for (path, body) in cases {
        let (status, response) = server.http("PUT", path, Some(body)).await;
        assert_eq!(status, 400, "{path}: {response}");
        assert_eq!(error_code(&response), "bad_request", "{path}");
    }
    let port_zero =
        serde_json::to_vec(&record("order-service", "order-service-1", 0, None)).unwrap();
    let (status, _) = server
        .http(
            "PUT",
            "/v1/registry/order-service/order-service-1",
            Some(&port_zero),
        )
        .await;
    assert_eq!(status, 400);

    let huge = vec![b' '; 100 * 1024];
    let (status, response) = server
        .http(
            "PUT",
            "/v1/registry/order-service/order-service-1",
            Some(&huge),
        )
        .await;
    assert_eq!(status, 413, "{response}");
    assert_eq!(error_code(&response), "payload_too_large");

    let (status, response) = server.http("GET", "/v2/nothing", None).await;
    assert_eq!(status, 404);
    assert_eq!(error_code(&response), "not_found");
    let (status, response) = server.http("POST", "/v1/registry", Some(b"{}")).await;
    assert_eq!(status, 405);
    assert_eq!(error_code(&response), "method_not_allowed");

    // None of it was registered.
    let nx = server.udp("order-service.internal.", RecordType::A).await;
    assert_eq!(nx.metadata.response_code, ResponseCode::NXDomain);

    server.stop().await;
}

#[tokio::test]
async fn large_answers_truncate_over_udp_and_come_whole_over_tcp() {
    let server = Harness::start(Duration::from_secs(60)).await;
    for n in 1..=30 {
        let instance = format!("order-service-{n}");
        server
            .register(&record("order-service", &instance, 9000 + n, None))
            .await;
    }
    let name = "_https._tcp.order-service.internal.";
    let udp = server.udp(name, RecordType::SRV).await;
    assert!(udp.metadata.truncation, "30 SRV records exceed 512 bytes");
    assert!(udp.answers.len() < 30);

    // With EDNS the client may take more over UDP, and gets an OPT record back.
    let mut large = query(name, RecordType::SRV);
    let mut edns = Edns::new();
    edns.set_max_payload(4096);
    large.set_edns(edns);
    let udp = udp_query(server.dns, &large).await;
    assert!(!udp.metadata.truncation);
    assert_eq!(udp.answers.len(), 30);
    assert!(udp.edns.is_some());

    let tcp = server.tcp(name, RecordType::SRV).await;
    assert!(!tcp.metadata.truncation);
    assert_eq!(tcp.answers.len(), 30);
    assert_eq!(tcp.additionals.len(), 30);

    server.stop().await;
}

#[tokio::test]
async fn healthz_and_metrics() {
    let server = Harness::start(Duration::from_secs(60)).await;
    server
        .register(&record("order-service", "order-service-1", 9001, None))
        .await;
    server
        .register(&record("order-service", "order-service-2", 9002, None))
        .await;
    server.udp("order-service.internal.", RecordType::A).await;
    server.tcp("nobody.internal.", RecordType::A).await;

    let (status, body) = server.http("GET", "/healthz", None).await;
    assert_eq!(status, 200);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&body).unwrap(),
        serde_json::json!({ "status": "ok" })
    );

    let (status, text) = server.http("GET", "/metrics", None).await;
    assert_eq!(status, 200);
    let labels = "component=\"discovery\",instance=\"discovery-1\"";
    for line in [
        format!(
            "causeway_dns_queries_total{{{labels},qtype=\"A\",rcode=\"NOERROR\",protocol=\"udp\"}} 1"
        ),
        format!(
            "causeway_dns_queries_total{{{labels},qtype=\"A\",rcode=\"NXDOMAIN\",protocol=\"tcp\"}} 1"
        ),
        format!("causeway_registry_live_instances{{{labels},service=\"order-service\"}} 2"),
        format!(
            "causeway_http_requests_total{{{labels},route=\"/v1/registry/{{service}}/{{instance}}\",method=\"PUT\",status=\"200\"}} 2"
        ),
    ] {
        assert!(text.lines().any(|l| l == line), "missing {line} in\n{text}");
    }

    server.stop().await;
}

#[tokio::test]
async fn bind_errors_name_the_address() {
    let taken = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = taken.local_addr().unwrap();
    let config = DiscoveryConfig {
        dns_listen: addr,
        api_listen: "127.0.0.1:0".parse().unwrap(),
        ..DiscoveryConfig::default()
    };
    let mut metrics = Metrics::new("discovery", "discovery-1");
    let err = DiscoveryServer::bind(&config, Registry::new(Duration::from_secs(1)), &mut metrics)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with(&format!("cannot listen on {addr} for DNS (udp): ")),
        "{err}"
    );
}
