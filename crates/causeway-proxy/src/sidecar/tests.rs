//! Sidecars over real sockets: a control plane (the real gRPC server with its CA, tokens and
//! configuration feed), an Order app behind its sidecar, and a Payment sidecar whose app is
//! the test. Every hop is a real connection on 127.0.0.1 with ports chosen at run time.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use causeway_core::serve::{ShutdownTrigger, shutdown_channel};
use causeway_core::tls::LocalCa;
use causeway_core::topology::ReverseProxyConfig;
use causeway_mesh::client::ControlPlaneTarget;
use causeway_mesh::server::{ConfigFeed, ControlPlane};
use causeway_mesh::{BootstrapKey, MeshAuthority, TokenVerifier};
use causeway_proto::mesh::v1 as pb;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use super::*;

const TRUST_DOMAIN: &str = "causeway.local";
const CONTROL_PLANE_NAME: &str = "mesh-control-plane.internal";

fn spiffe(service: &str) -> SpiffeId {
    SpiffeId::new(TRUST_DOMAIN, "default", service).expect("id")
}

const POLICY: &str = "\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: { name: payments-mark-orders-paid }
spec:
  selector: { matchLabels: { app: order-service } }
  action: ALLOW
  rules:
    - from: [{ source: { principals: [causeway.local/ns/default/sa/payment-service] } }]
      to: [{ operation: { methods: [POST], paths: ['/orders/*'] } }]
";

/// The Order app: answers with what it was asked and the caller identity it was told, or with
/// `status` when that is set to something other than 200.
struct App {
    addr: SocketAddr,
    hits: Arc<AtomicUsize>,
    status: Arc<AtomicU16>,
    _stop: ShutdownTrigger,
}

impl App {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let hits = Arc::new(AtomicUsize::new(0));
        let status = Arc::new(AtomicU16::new(200));
        let (stop, shutdown) = shutdown_channel();
        let (counted, answer) = (hits.clone(), status.clone());
        tokio::spawn(causeway_core::serve::serve(
            listener,
            None,
            move |_peer| {
                let (hits, status) = (counted.clone(), answer.clone());
                hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
                    hits.fetch_add(1, Ordering::SeqCst);
                    let status = StatusCode::from_u16(status.load(Ordering::SeqCst))
                        .unwrap_or(StatusCode::OK);
                    let identities: Vec<String> = request
                        .headers()
                        .get_all(PEER_IDENTITY)
                        .iter()
                        .map(|value| value.to_str().unwrap_or("?").to_string())
                        .collect();
                    let body = serde_json::json!({
                        "method": request.method().as_str(),
                        "path": request.uri().path(),
                        "peer_identity": identities,
                        "subject": request
                            .headers()
                            .get("x-authenticated-subject")
                            .and_then(|v| v.to_str().ok()),
                    });
                    async move {
                        let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
                        *response.status_mut() = status;
                        Ok::<_, std::convert::Infallible>(response)
                    }
                })
            },
            shutdown,
            Duration::from_millis(100),
        ));
        Self {
            addr,
            hits,
            status,
            _stop: stop,
        }
    }
}

/// A control plane and the sidecars started against it.
struct Mesh {
    dir: std::path::PathBuf,
    root: LocalCa,
    key: BootstrapKey,
    feed: Arc<ConfigFeed>,
    target: ControlPlaneTarget,
    client: Arc<causeway_client::ServiceClient>,
    _control_plane: ShutdownTrigger,
    /// Each sidecar's shutdown, held until the test ends.
    sidecars: Vec<ShutdownTrigger>,
}

impl Drop for Mesh {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A running sidecar: where its app calls out, and where other sidecars call in.
struct Running {
    outbound: SocketAddr,
    inbound: SocketAddr,
    sidecar: Arc<Sidecar>,
}

static NEXT: AtomicUsize = AtomicUsize::new(0);

impl Mesh {
    async fn start(lifetime: Duration) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "causeway-sidecar-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        let root = LocalCa::load_or_create(&dir).expect("root");
        let server_certs = root
            .issue("mesh-control-plane", &[CONTROL_PLANE_NAME.to_string()])
            .expect("control plane cert");
        let ca_pem = std::fs::read_to_string(root.ca_cert_path()).expect("ca");
        let key = BootstrapKey::generate();
        let feed = Arc::new(ConfigFeed::default());
        let control_plane = ControlPlane {
            authority: MeshAuthority::load_or_create(&dir).expect("authority"),
            tokens: TokenVerifier::new(&key, None),
            trust_anchors_pem: ca_pem.clone(),
            trust_domain: TRUST_DOMAIN.into(),
            default_lifetime: lifetime,
            config: feed.subscribe(),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let target = ControlPlaneTarget {
            addr: listener.local_addr().expect("addr"),
            server_name: CONTROL_PLANE_NAME.into(),
            ca_pem,
            timeout: Duration::from_secs(5),
        };
        let (stop, mut stopped) = shutdown_channel();
        let ca_path = root.ca_cert_path();
        tokio::spawn(async move {
            causeway_mesh::server::serve(
                control_plane,
                listener,
                &server_certs,
                &ca_path,
                async move { stopped.wait().await },
            )
            .await
            .expect("control plane serves");
        });
        let mut metrics = causeway_core::telemetry::Metrics::new("sidecar", "test");
        let settings = causeway_client::ClientSettings {
            dns_addr: "127.0.0.1:9".parse().expect("addr"),
            zone: "internal".into(),
            config: causeway_core::topology::ClientConfig::default(),
        };
        let client = Arc::new(
            causeway_client::ServiceClient::new(settings, &root.ca_cert_path(), &mut metrics)
                .expect("client"),
        );
        Self {
            dir,
            root,
            key,
            feed,
            target,
            client,
            _control_plane: stop,
            sidecars: Vec::new(),
        }
    }

    /// Publishes `policy` with a destination per (service, inbound address) given.
    fn publish(&self, policy: &str, destinations: &[(&str, SocketAddr)]) -> u64 {
        let grouped: Vec<(&str, Vec<SocketAddr>)> = destinations
            .iter()
            .map(|(service, addr)| (*service, vec![*addr]))
            .collect();
        self.publish_instances(policy, &grouped)
    }

    /// Publishes `policy` with each service's sidecars at the addresses given (instance `n`
    /// at the `n`th).
    fn publish_instances(&self, policy: &str, destinations: &[(&str, Vec<SocketAddr>)]) -> u64 {
        let destinations = destinations
            .iter()
            .map(|(service, addrs)| pb::Destination {
                service: service.to_string(),
                spiffe_id: spiffe(service).to_string(),
                endpoints: addrs
                    .iter()
                    .enumerate()
                    .map(|(index, addr)| pb::MeshEndpoint {
                        instance: format!("{service}-{}", index + 1),
                        addr: addr.to_string(),
                    })
                    .collect(),
            })
            .collect();
        self.feed
            .publish("mesh-policy.yaml", policy, destinations)
            .unwrap_or_else(|| self.feed.version())
    }

    /// Starts `service`'s sidecar on `inbound` (bound by the caller, so that its address could
    /// be published first) in front of `app`.
    async fn sidecar(
        &mut self,
        service: &str,
        inbound: tokio::net::TcpListener,
        app: SocketAddr,
    ) -> Running {
        self.sidecar_of(service, 1, inbound, app).await
    }

    /// Starts the sidecar of instance `number` of `service`.
    async fn sidecar_of(
        &mut self,
        service: &str,
        number: usize,
        inbound: tokio::net::TcpListener,
        app: SocketAddr,
    ) -> Running {
        let (stop, shutdown) = shutdown_channel();
        let settings = SidecarSettings {
            service: service.to_string(),
            instance: format!("{service}-{number}-proxy"),
            trust_domain: TRUST_DOMAIN.into(),
            control_plane: self.target.clone(),
            bootstrap_token: self.key.mint(
                &spiffe(service),
                &format!("{service}-{number}"),
                Duration::from_secs(60),
            ),
            certificate_lifetime: None,
            config_patience: Duration::from_secs(5),
            app,
            limits: ReverseProxyConfig {
                request_timeout_ms: 3_000,
                ..ReverseProxyConfig::default()
            },
        };
        let sidecar = Arc::new(
            Sidecar::start(
                settings,
                self.client.clone(),
                causeway_core::telemetry::HttpMetrics::default(),
                shutdown.clone(),
            )
            .await
            .expect("sidecar starts"),
        );
        let outbound_listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let outbound = outbound_listener.local_addr().expect("addr");
        let inbound_addr = inbound.local_addr().expect("addr");
        sidecar.follow_configuration(shutdown.clone());
        let (serving, drain) = (sidecar.clone(), Duration::from_millis(100));
        let inbound_shutdown = shutdown.clone();
        tokio::spawn(async move {
            tokio::join!(
                serve_outbound(&serving, outbound_listener, shutdown, drain),
                serve_inbound(&serving, inbound, inbound_shutdown, drain),
            );
        });
        self.sidecars.push(stop);
        Running {
            outbound,
            inbound: inbound_addr,
            sidecar,
        }
    }
}

async fn listener() -> tokio::net::TcpListener {
    tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind")
}

/// The app's side of a call: plain HTTP to its own sidecar, naming the destination in `Host`.
async fn call(
    outbound: SocketAddr,
    method: &str,
    host: &str,
    path: &str,
    extra: &[(&str, &str)],
) -> (StatusCode, serde_json::Value) {
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let mut request = Request::builder()
        .method(method)
        .uri(format!("http://{outbound}{path}"))
        .header(http::header::HOST, host);
    for (name, value) in extra {
        request = request.header(*name, *value);
    }
    let response = client
        .request(request.body(Full::new(Bytes::new())).expect("request"))
        .await
        .expect("the sidecar answers");
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    (
        status,
        serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
    )
}

/// Order and Payment sidecars, the policy allowing Payment to mark orders paid.
async fn payment_and_order(mesh: &mut Mesh, order_app: &App) -> (Running, Running) {
    let (order_in, payment_in) = (listener().await, listener().await);
    mesh.publish(
        POLICY,
        &[
            ("order-service", order_in.local_addr().expect("addr")),
            ("payment-service", payment_in.local_addr().expect("addr")),
        ],
    );
    let order = mesh
        .sidecar("order-service", order_in, order_app.addr)
        .await;
    // The Payment app is the test itself; its inbound half forwards to a port nobody serves.
    let payment = mesh
        .sidecar(
            "payment-service",
            payment_in,
            "127.0.0.1:9".parse().expect("addr"),
        )
        .await;
    (order, payment)
}

#[tokio::test]
async fn a_call_crosses_both_sidecars_over_mtls_with_the_callers_verified_identity() {
    let mut mesh = Mesh::start(Duration::from_secs(3600)).await;
    let order_app = App::start().await;
    let (order, payment) = payment_and_order(&mut mesh, &order_app).await;

    // A caller cannot put words in the inbound sidecar's mouth: the header it sends is replaced.
    let (status, body) = call(
        payment.outbound,
        "POST",
        "order-service",
        "/orders/7/paid",
        &[
            (
                PEER_IDENTITY.as_str(),
                "spiffe://causeway.local/ns/default/sa/admin",
            ),
            ("x-authenticated-subject", "123"),
        ],
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["path"], "/orders/7/paid");
    assert_eq!(
        body["peer_identity"],
        serde_json::json!([spiffe("payment-service").to_string()]),
        "the app sees exactly the verified caller"
    );
    // The user the payment acts for passes through the mesh.
    assert_eq!(body["subject"], "123");
    assert_eq!(order_app.hits.load(Ordering::SeqCst), 1);

    // Calls the policy does not allow: another path, and another method, each named.
    let (status, body) = call(payment.outbound, "GET", "order-service", "/users/1", &[]).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(body["error"], "mesh_policy_denied");
    let message = body["message"].as_str().expect("message");
    assert!(
        message.contains("payment-service")
            && message.contains("no AuthorizationPolicy rule allows"),
        "{message}"
    );
    assert_eq!(
        order_app.hits.load(Ordering::SeqCst),
        1,
        "a denied call reached the app"
    );

    // A destination that is not in the mesh is refused by the outbound half.
    let (status, _) = call(payment.outbound, "GET", "billing-service", "/", &[]).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // Plain HTTP to the inbound port gets no answer: only mutual TLS is spoken there.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut plain = tokio::net::TcpStream::connect(order.inbound)
        .await
        .expect("connect");
    plain
        .write_all(b"GET /orders/7 HTTP/1.1\r\nhost: order-service\r\n\r\n")
        .await
        .expect("write");
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), plain.read_to_end(&mut answer)).await;
    assert!(
        !answer.starts_with(b"HTTP/"),
        "plain HTTP was answered: {:?}",
        String::from_utf8_lossy(&answer)
    );
    assert_eq!(order_app.hits.load(Ordering::SeqCst), 1);

    // TLS without a client certificate (trusting the right root) is refused too.
    let roots = causeway_mesh::tls::trust_anchors(
        &std::fs::read_to_string(mesh.root.ca_cert_path()).expect("ca"),
    )
    .expect("roots");
    let mut no_cert = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    no_cert.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(no_cert));
    let tcp = tokio::net::TcpStream::connect(order.inbound)
        .await
        .expect("connect");
    let name = rustls::pki_types::ServerName::try_from("order-service").expect("name");
    let refused = match connector.connect(name, tcp).await {
        Err(_) => true,
        // TLS 1.3: the server's refusal of the missing certificate arrives with the first read.
        Ok(mut tls) => {
            let _ = tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
            let mut buffer = [0u8; 64];
            !matches!(
                tokio::time::timeout(Duration::from_secs(5), tls.read(&mut buffer)).await,
                Ok(Ok(n)) if n > 0
            )
        }
    };
    assert!(refused, "a client without a mesh certificate got an answer");

    // And the sidecar keeps serving after all of that.
    let (status, _) = call(
        payment.outbound,
        "POST",
        "order-service",
        "/orders/8/paid",
        &[],
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    drop((order, payment));
}

#[tokio::test]
async fn a_policy_change_applies_live_and_every_sidecar_acknowledges_its_version() {
    let mut mesh = Mesh::start(Duration::from_secs(3600)).await;
    let order_app = App::start().await;
    let (order, payment) = payment_and_order(&mut mesh, &order_app).await;
    let (status, _) = call(
        payment.outbound,
        "POST",
        "order-service",
        "/orders/7/paid",
        &[],
    )
    .await;
    assert_eq!(status, StatusCode::OK);

    // The allowing rule removed: the next calls are denied, without a restart.
    let destinations = [
        ("order-service", order.inbound),
        ("payment-service", payment.inbound),
    ];
    let version = mesh.publish("", &destinations);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (status, body) = call(
            payment.outbound,
            "POST",
            "order-service",
            "/orders/7/paid",
            &[],
        )
        .await;
        if status == StatusCode::FORBIDDEN {
            assert!(
                body["message"]
                    .as_str()
                    .unwrap_or("")
                    .contains("denies by default"),
                "{body}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "the new policy never applied");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Both sidecars say so to the control plane.
    let acknowledged = |listing: &pb::SidecarsResponse, at: u64| {
        listing.sidecars.len() == 2
            && listing
                .sidecars
                .iter()
                .all(|sidecar| sidecar.connected && sidecar.applied_version == at)
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let listing = causeway_mesh::client::sidecars(&mesh.target)
            .await
            .expect("listing");
        if acknowledged(&listing, version) {
            assert_eq!(listing.current_version, version);
            break;
        }
        assert!(Instant::now() < deadline, "not acknowledged: {listing:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A configuration a sidecar cannot apply is refused with why; the one in force stays.
    let bad = mesh.publish("kind: AuthorizationPolicy\nspec: [", &destinations);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let listing = causeway_mesh::client::sidecars(&mesh.target)
            .await
            .expect("listing");
        if listing
            .sidecars
            .iter()
            .all(|sidecar| !sidecar.last_error.is_empty())
        {
            assert!(
                listing
                    .sidecars
                    .iter()
                    .all(|sidecar| sidecar.applied_version == version
                        && sidecar.last_error.contains("mesh-policy.yaml")),
                "{listing:?}"
            );
            assert_eq!(listing.current_version, bad);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the bad version was not refused: {listing:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        payment.sidecar.context.applied().expect("applied").version,
        version
    );
    let (status, _) = call(
        payment.outbound,
        "POST",
        "order-service",
        "/orders/7/paid",
        &[],
    )
    .await;
    assert_eq!(
        status,
        StatusCode::FORBIDDEN,
        "the version in force changed"
    );
}

#[tokio::test]
async fn a_failing_instance_is_retried_around_only_for_safe_calls_and_its_circuit_opens() {
    let mut mesh = Mesh::start(Duration::from_secs(3600)).await;
    let (failing, healthy) = (App::start().await, App::start().await);
    failing.status.store(503, Ordering::SeqCst);
    let (order_1, order_2, payment_in) = (listener().await, listener().await, listener().await);
    let order_addrs = vec![
        order_1.local_addr().expect("addr"),
        order_2.local_addr().expect("addr"),
    ];
    let payment_addr = payment_in.local_addr().expect("addr");
    mesh.publish_instances(
        POLICY,
        &[
            ("order-service", order_addrs),
            ("payment-service", vec![payment_addr]),
        ],
    );
    let _order_1 = mesh
        .sidecar_of("order-service", 1, order_1, failing.addr)
        .await;
    let _order_2 = mesh
        .sidecar_of("order-service", 2, order_2, healthy.addr)
        .await;
    let payment = mesh
        .sidecar(
            "payment-service",
            payment_in,
            "127.0.0.1:9".parse().expect("addr"),
        )
        .await;

    // A POST with an Idempotency-Key is safe to repeat: every one succeeds on the healthy
    // instance, and the failing one stops being tried once its circuit opens.
    for n in 0..40 {
        let key = format!("payment-{n}");
        let (status, body) = call(
            payment.outbound,
            "POST",
            "order-service",
            &format!("/orders/{n}/paid"),
            &[("idempotency-key", &key)],
        )
        .await;
        assert_eq!(status, StatusCode::OK, "call {n}: {body}");
    }
    let failed_attempts = failing.hits.load(Ordering::SeqCst);
    assert!(
        (1..=10).contains(&failed_attempts),
        "the failing instance got {failed_attempts} of 40 calls: its circuit never opened"
    );
    assert!(healthy.hits.load(Ordering::SeqCst) >= 40);

    // A POST without the key is never sent twice: each call is one attempt, and a call that
    // reaches the failing instance (a probe, once its ejection is over) gets its 503.
    failing.hits.store(0, Ordering::SeqCst);
    let applied = payment.sidecar.context.applied().expect("applied");
    assert_eq!(applied.destinations["order-service"].endpoints.len(), 2);
    let before = healthy.hits.load(Ordering::SeqCst);
    let mut unavailable = 0;
    for n in 0..20 {
        let (status, _) = call(
            payment.outbound,
            "POST",
            "order-service",
            &format!("/orders/{n}/paid"),
            &[],
        )
        .await;
        if status == StatusCode::SERVICE_UNAVAILABLE {
            unavailable += 1;
        }
    }
    let attempts =
        failing.hits.load(Ordering::SeqCst) + healthy.hits.load(Ordering::SeqCst) - before;
    assert_eq!(
        attempts, 20,
        "a POST without an Idempotency-Key was sent more than once"
    );
    assert_eq!(unavailable, failing.hits.load(Ordering::SeqCst));
}

#[test]
fn outbound_routes_follow_httproute_paths_and_carry_their_timeouts_and_backoff() {
    let policy = format!(
        "{POLICY}---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{ name: order-service }}
spec:
  parentRefs: [{{ kind: Service, name: order-service }}]
  rules:
    - matches: [{{ path: {{ type: PathPrefix, value: /orders }} }}]
      timeouts: {{ request: 2s, backendRequest: 500ms }}
      retry: {{ attempts: 3, backoff: 40ms, codes: [503] }}
    - matches: [{{ path: {{ type: Exact, value: /orders/export }} }}]
      timeouts: {{ request: 30s }}
"
    );
    let config = pb::MeshConfig {
        version: 1,
        policy_file: "mesh-policy.yaml".into(),
        policy_yaml: policy,
        destinations: vec![pb::Destination {
            service: "order-service".into(),
            spiffe_id: spiffe("order-service").to_string(),
            endpoints: vec![pb::MeshEndpoint {
                instance: "order-service-1".into(),
                addr: "127.0.0.1:1".into(),
            }],
        }],
    };
    let applied = Applied::from_config(&config, TRUST_DOMAIN).expect("valid configuration");
    let table = outbound_routes(&applied);
    let route = |path: &str| {
        table
            .lookup(Some("order-service"), path)
            .map(|index| &table.routes()[index])
    };

    let orders = route("/orders/7/paid").expect("the prefix rule");
    assert_eq!(orders.prefix, "/orders");
    assert_eq!(orders.policy.retry.deadline_ms, 2_000);
    assert_eq!(orders.policy.retry.per_try_timeout_ms, 500);
    assert_eq!(orders.policy.retry.max_retries, 3);
    assert_eq!(orders.policy.retry.backoff_ms, 40);
    assert_eq!(orders.policy.retry.retry_statuses, [503]);

    let export = route("/orders/export").expect("the exact rule");
    assert_eq!(export.policy.retry.deadline_ms, 30_000);
    // An exact path does not cover what lies under it, nor a prefix a longer segment.
    assert_eq!(
        route("/orders/export/2026").map(|r| r.prefix.as_str()),
        Some("/orders")
    );
    let other = route("/ordersx").expect("the catch-all");
    assert_eq!(other.prefix, "/");
    assert_eq!(other.policy, route_policy_default());
    assert!(table.lookup(Some("user-service"), "/orders").is_none());
}
