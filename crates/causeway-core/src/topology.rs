//! The topology file: one typed configuration struct per component, read from one TOML file
//! (`causeway.toml`), with defaults that run the whole system on one machine.
//!
//! A listen address with port 0 takes any free port; a listen address with a fixed port gives
//! instance `n` (0-based) port `port + n`, so `listen = "127.0.0.1:9200"` with three instances
//! uses 9200, 9201 and 9202.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::proxy_config::{Limits, UpstreamConfig};
use crate::queue_policy::{QueuePolicy, QueueSpec, validate_queue_name};
use crate::registry_api::is_dns_label;

/// The file `causeway` reads when no `--config` is given and one exists in the working directory.
pub const DEFAULT_TOPOLOGY_FILE: &str = "causeway.toml";

#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    #[error("cannot read topology file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("malformed topology file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid topology: {0}")]
    Invalid(String),
}

/// Every process `causeway up` starts plays one of these roles.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    Discovery,
    LoadBalancer,
    ReverseProxy,
    UserService,
    OrderService,
    PaymentService,
    PricingService,
    InventoryService,
    Broker,
    EmailService,
    NotificationService,
    /// The service mesh's control plane: identities, policy, destinations.
    MeshControlPlane,
    /// A meshed service instance's sidecar (see [`Topology::sidecar_app`]).
    Sidecar,
}

impl Role {
    /// In start order: discovery first (everyone registers with it), the edge last.
    pub const ALL: [Role; 13] = [
        Role::Discovery,
        Role::Broker,
        Role::MeshControlPlane,
        // Before the apps: a meshed app starts only once its sidecar has an identity and
        // its first configuration.
        Role::Sidecar,
        Role::OrderService,
        Role::PaymentService,
        Role::PricingService,
        Role::UserService,
        Role::InventoryService,
        Role::NotificationService,
        Role::EmailService,
        Role::ReverseProxy,
        Role::LoadBalancer,
    ];

    /// The role's name, which is also its service name in discovery.
    pub fn name(self) -> &'static str {
        match self {
            Role::Discovery => "discovery",
            Role::LoadBalancer => "load-balancer",
            Role::ReverseProxy => "reverse-proxy",
            Role::UserService => "user-service",
            Role::OrderService => "order-service",
            Role::PaymentService => "payment-service",
            Role::PricingService => "pricing-service",
            Role::InventoryService => "inventory-service",
            Role::Broker => "broker",
            Role::EmailService => "email-service",
            Role::NotificationService => "notification-service",
            Role::MeshControlPlane => "mesh-control-plane",
            Role::Sidecar => "sidecar",
        }
    }

    pub fn from_name(name: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|role| role.name() == name)
    }

    /// Instance `index` (0-based) is named `<role>-<index + 1>`.
    pub fn instance_name(self, index: usize) -> String {
        format!("{}-{}", self.name(), index + 1)
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The whole system's configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Topology {
    /// Certificates, keys, databases, logs and run state live here.
    pub data_dir: PathBuf,
    pub discovery: DiscoveryConfig,
    pub load_balancer: LoadBalancerConfig,
    pub reverse_proxy: ReverseProxyConfig,
    pub user_service: ServiceConfig,
    pub order_service: ServiceConfig,
    /// `POST /payments`, which has Order Service mark the order paid (the mesh's scenario).
    pub payment_service: ServiceConfig,
    /// gRPC `pricing.v1.PricingService`.
    pub pricing_service: ServiceConfig,
    pub inventory_service: ServiceConfig,
    /// Publishes to `messaging.notification_queue`.
    pub email_service: ServiceConfig,
    /// Consumes `messaging.notification_queue`.
    pub notification_service: ServiceConfig,
    /// Causeway's embedded broker (runs unless `messaging.broker_url` names another broker).
    pub broker: BrokerConfig,
    pub messaging: MessagingConfig,
    pub client: ClientConfig,
    /// The service mesh (technique 4): which services get sidecars, and its control plane.
    pub mesh: MeshConfig,
}

impl Default for Topology {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from(".causeway"),
            discovery: DiscoveryConfig::default(),
            load_balancer: LoadBalancerConfig::default(),
            reverse_proxy: ReverseProxyConfig::default(),
            user_service: ServiceConfig::with_instances(1),
            order_service: ServiceConfig::with_instances(3),
            payment_service: ServiceConfig::with_instances(1),
            pricing_service: ServiceConfig::with_instances(2),
            inventory_service: ServiceConfig::with_instances(1),
            email_service: ServiceConfig::with_instances(1),
            notification_service: ServiceConfig::with_instances(1),
            broker: BrokerConfig::default(),
            messaging: MessagingConfig::default(),
            client: ClientConfig::default(),
            mesh: MeshConfig::default(),
        }
    }
}

/// The service mesh: every instance of a meshed service gets a sidecar, started before it; the
/// services' calls to each other go through the sidecars, over mutual TLS with identities the
/// control plane issues.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MeshConfig {
    pub enabled: bool,
    /// The services that get sidecars; a meshed service calls another one through its sidecar.
    pub services: Vec<String>,
    /// `spiffe://<trust_domain>/ns/<namespace>/sa/<service>`.
    pub trust_domain: String,
    pub namespace: String,
    /// The policy file (`HTTPRoute`s and `AuthorizationPolicy`s); unset: `mesh-policy.yaml` in
    /// the data dir, written with the default policy when missing. Changes apply live.
    pub policy_file: Option<PathBuf>,
    pub control_plane_listen: SocketAddr,
    pub control_plane_admin_listen: SocketAddr,
    /// Asked for each workload certificate; sidecars renew at two thirds of it.
    pub certificate_lifetime_ms: u64,
    /// How often the control plane reads the registry and the policy file for changes.
    pub refresh_interval_ms: u64,
}

impl Default for MeshConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            services: vec![
                Role::PaymentService.name().into(),
                Role::OrderService.name().into(),
            ],
            trust_domain: "causeway.local".into(),
            namespace: "default".into(),
            policy_file: None,
            control_plane_listen: ([127, 0, 0, 1], 0).into(),
            control_plane_admin_listen: ([127, 0, 0, 1], 0).into(),
            certificate_lifetime_ms: 24 * 60 * 60 * 1000,
            refresh_interval_ms: 500,
        }
    }
}

/// The registry and the DNS server that answers from it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DiscoveryConfig {
    /// DNS over UDP and TCP on the same address.
    pub dns_listen: SocketAddr,
    /// Registry HTTP API, `/metrics` and `/healthz`.
    pub api_listen: SocketAddr,
    /// The zone the DNS server is authoritative for.
    pub zone: String,
    /// TTL of every answer; clients re-resolve at least this often.
    pub record_ttl_secs: u32,
    /// How often instances heartbeat.
    pub heartbeat_interval_ms: u64,
    /// An instance missing heartbeats this long leaves the registry and DNS.
    pub expiry_ms: u64,
}

impl Default for DiscoveryConfig {
    fn default() -> Self {
        Self {
            dns_listen: ([127, 0, 0, 1], 5353).into(),
            api_listen: ([127, 0, 0, 1], 5380).into(),
            zone: "internal".into(),
            record_ttl_secs: 1,
            heartbeat_interval_ms: 500,
            expiry_ms: 2000,
        }
    }
}

/// The edge: a layer-4 balancer over the reverse-proxy instances.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoadBalancerConfig {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    /// The service whose instances receive the connections.
    pub upstream: String,
    pub health_check_interval_ms: u64,
    pub health_check_timeout_ms: u64,
    /// Consecutive failed checks before an endpoint is taken out.
    pub unhealthy_threshold: u32,
    /// Consecutive passed checks before it is put back.
    pub healthy_threshold: u32,
    pub connect_timeout_ms: u64,
    /// Start each spliced connection with a PROXY protocol v2 header naming the client, so that
    /// the proxies behind see its address (they must trust this balancer's address: see
    /// `reverse_proxy.proxy_protocol_from`).
    pub send_proxy_protocol: bool,
}

impl Default for LoadBalancerConfig {
    fn default() -> Self {
        Self {
            listen: ([127, 0, 0, 1], 8443).into(),
            admin_listen: ([127, 0, 0, 1], 0).into(),
            upstream: Role::ReverseProxy.name().into(),
            health_check_interval_ms: 500,
            health_check_timeout_ms: 500,
            unhealthy_threshold: 2,
            healthy_threshold: 1,
            connect_timeout_ms: 1000,
            send_proxy_protocol: true,
        }
    }
}

/// TLS termination and the API gateway.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReverseProxyConfig {
    pub instances: usize,
    /// Serving threads per instance, each with its own single-threaded runtime and its own
    /// `SO_REUSEPORT` listener on the instance's address (nginx's `worker_processes`); default:
    /// one per core the process may use.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workers: Option<usize>,
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    /// Names (and IP addresses) on the edge certificate.
    pub server_names: Vec<String>,
    /// Larger request bodies are refused with 413.
    pub max_body_bytes: usize,
    /// Whole-request deadline at the gateway (also the deadline of a static route's retries).
    pub request_timeout_ms: u64,
    /// What the listener accepts: header size and count (431), header-read/idle timeout, max
    /// connections (503). Its `max_body_bytes` and `request_timeout_ms` are the two keys above
    /// (kept from before `limits` existed); setting them here to other values is an error.
    pub limits: Limits,
    pub jwt: JwtConfig,
    pub rate_limit: RateLimitConfig,
    pub routes: Vec<RouteConfig>,
    /// Kubernetes Ingress files (`networking.k8s.io/v1`, e.g. `deploy/k8s/ingress.yaml`) whose
    /// routes replace `routes` when any are named. They are reloaded when they change (or on
    /// SIGHUP) without dropping requests; a file that does not parse leaves the routes in use.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ingress: Vec<PathBuf>,
    /// Certificates of your own (PEM files) served to clients asking for their hosts by SNI,
    /// before those of the Ingress files' `spec.tls[]`; other names get the edge certificate.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub certificates: Vec<CertificateConfig>,
    /// When answers to outside clients carry `Server-Timing` with the internal hops (component
    /// and instance names, addresses): `debug` (the default) for callers whose token has the
    /// `debug` scope, `always`, or `never`.
    pub server_timing: ServerTimingPolicy,
    /// Networks whose connections may start with a PROXY protocol v2 header naming the client
    /// (the edge balancer's address: `127.0.0.1/32` by default). A connection from elsewhere that
    /// sends one is refused and closed; one without a header is served as its own client.
    pub proxy_protocol_from: Vec<ipnet::IpNet>,
}

/// See [`ReverseProxyConfig::server_timing`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ServerTimingPolicy {
    Never,
    #[default]
    Debug,
    Always,
}

/// One `reverse_proxy.certificates` entry: `{ hosts = ["shop.example.com", "*.example.com"],
/// cert = "shop.pem", key = "shop-key.pem" }` (a chain may follow the leaf in `cert`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateConfig {
    pub hosts: Vec<String>,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// gRPC's standard services that the edge routes to Pricing Service by default.
const GRPC_STANDARD_SERVICES: [&str; 3] = [
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

impl Default for ReverseProxyConfig {
    fn default() -> Self {
        Self {
            instances: 2,
            workers: None,
            listen: ([127, 0, 0, 1], 0).into(),
            admin_listen: ([127, 0, 0, 1], 0).into(),
            server_names: vec!["localhost".into(), "127.0.0.1".into(), "::1".into()],
            max_body_bytes: 1024 * 1024,
            request_timeout_ms: 10_000,
            limits: Limits::default(),
            jwt: JwtConfig::default(),
            rate_limit: RateLimitConfig::default(),
            ingress: Vec::new(),
            certificates: Vec::new(),
            server_timing: ServerTimingPolicy::default(),
            proxy_protocol_from: vec![ipnet::IpNet::from(std::net::IpAddr::from([127, 0, 0, 1]))],
            routes: vec![
                RouteConfig {
                    prefix: "/api/users/".into(),
                    service: Role::UserService.name().into(),
                    strip_prefix: Some("/api".into()),
                    auth: true,
                    upstream: None,
                    policy: service_route_policy(),
                },
                RouteConfig {
                    prefix: "/api/inventory/".into(),
                    service: Role::InventoryService.name().into(),
                    strip_prefix: Some("/api".into()),
                    auth: true,
                    upstream: None,
                    policy: service_route_policy(),
                },
                RouteConfig {
                    prefix: "/api/payments".into(),
                    service: Role::PaymentService.name().into(),
                    strip_prefix: Some("/api".into()),
                    auth: true,
                    upstream: None,
                    policy: service_route_policy(),
                },
                RouteConfig {
                    prefix: "/api/emails".into(),
                    service: Role::EmailService.name().into(),
                    strip_prefix: Some("/api".into()),
                    auth: true,
                    upstream: None,
                    policy: service_route_policy(),
                },
                RouteConfig {
                    prefix: "/api/notifications".into(),
                    service: Role::NotificationService.name().into(),
                    strip_prefix: Some("/api".into()),
                    auth: true,
                    upstream: None,
                    policy: service_route_policy(),
                },
                // gRPC through the edge: HTTP/2 end to end, streamed, trailers intact.
                RouteConfig {
                    prefix: "/pricing.v1.PricingService/".into(),
                    service: Role::PricingService.name().into(),
                    strip_prefix: None,
                    auth: true,
                    upstream: None,
                    policy: service_route_policy(),
                },
            ]
            .into_iter()
            // Pricing is the edge's one gRPC service, so the standard health and reflection
            // services (grpcurl, grpc_health_probe) reach it, behind the same JWT check.
            .chain(GRPC_STANDARD_SERVICES.iter().map(|service| RouteConfig {
                prefix: format!("/{service}/"),
                service: Role::PricingService.name().into(),
                strip_prefix: None,
                auth: true,
                upstream: None,
                policy: service_route_policy(),
            }))
            .collect(),
        }
    }
}

impl ReverseProxyConfig {
    /// The listener's limits with the section's own body and request limits.
    pub fn listener_limits(&self) -> Limits {
        Limits {
            max_body_bytes: self.max_body_bytes,
            request_timeout_ms: self.request_timeout_ms,
            proxy_protocol_from: self.proxy_protocol_from.clone(),
            ..self.limits.clone()
        }
    }

    /// Serving threads per instance: `workers`, or one per core.
    pub fn worker_count(&self) -> usize {
        self.workers
            .unwrap_or_else(crate::serve::default_workers)
            .max(1)
    }

    fn validate(&self) -> Result<(), String> {
        if self.workers == Some(0) {
            return Err(
                "reverse_proxy.workers must be at least 1 (or left out: one per core)".into(),
            );
        }
        let defaults = Limits::default();
        // Either place may name them, but not with two different values.
        for (key, own, in_limits, default) in [
            (
                "max_body_bytes",
                self.max_body_bytes as u64,
                self.limits.max_body_bytes as u64,
                defaults.max_body_bytes as u64,
            ),
            (
                "request_timeout_ms",
                self.request_timeout_ms,
                self.limits.request_timeout_ms,
                defaults.request_timeout_ms,
            ),
        ] {
            if in_limits != own && in_limits != default {
                return Err(format!(
                    "reverse_proxy.limits.{key} = {in_limits} conflicts with reverse_proxy.{key} = {own}; set reverse_proxy.{key}"
                ));
            }
        }
        self.listener_limits()
            .validate()
            .map_err(|err| format!("reverse_proxy.{err}"))?;
        for (index, certificate) in self.certificates.iter().enumerate() {
            if certificate.hosts.is_empty() || certificate.hosts.iter().any(|h| h.is_empty()) {
                return Err(format!(
                    "reverse_proxy.certificates[{index}] ({}): hosts must name at least one host, none empty",
                    certificate.cert.display()
                ));
            }
        }
        for route in &self.routes {
            match &route.upstream {
                Some(upstream) => {
                    upstream
                        .policy
                        .validate()
                        .map_err(|err| format!("route {}: upstream.policy: {err}", route.prefix))?;
                    if !is_service_route_policy(&route.policy) {
                        return Err(format!(
                            "route {}: `policy` is for routes to a service; a static upstream's goes in upstream.policy",
                            route.prefix
                        ));
                    }
                }
                None => route
                    .policy
                    .validate()
                    .map_err(|err| format!("route {}: policy: {err}", route.prefix))?,
            }
        }
        Ok(())
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JwtConfig {
    pub issuer: String,
    pub audience: String,
    /// Clock skew tolerated on `exp` and `nbf`.
    pub leeway_secs: u64,
}

impl Default for JwtConfig {
    fn default() -> Self {
        Self {
            issuer: "causeway".into(),
            audience: "causeway-api".into(),
            leeway_secs: 0,
        }
    }
}

/// A token bucket per client (the token's subject, else the client address), one budget for all
/// the reverse-proxy instances (see `causeway_proxy::rate_limit` for how, and its error bound).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimitConfig {
    pub requests_per_second: u32,
    pub burst: u32,
    /// Share the budget among the instances (each reports what it admitted to the others);
    /// off: each instance has the whole budget of its own.
    pub shared: bool,
    /// How often the instances report to each other: the window within which a client can get
    /// more than its budget from several instances.
    pub sync_interval_ms: u64,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        Self {
            requests_per_second: 200,
            burst: 400,
            shared: true,
            sync_interval_ms: 50,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Requests whose path starts with this go to `service`; the longest prefix wins.
    pub prefix: String,
    /// The service (found through discovery) that serves the route; unused with `upstream`.
    #[serde(default)]
    pub service: String,
    /// Removed from the path before forwarding.
    #[serde(default)]
    pub strip_prefix: Option<String>,
    /// Whether a valid JWT is required (`auth = false` makes the route public).
    #[serde(default = "yes")]
    pub auth: bool,
    /// Fixed upstream addresses over plain HTTP instead of a discovered service, e.g.
    /// `upstream = { addrs = ["127.0.0.1:9000"], protocol = "http1" }`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream: Option<StaticUpstream>,
    /// Balancing, outlier detection, active health checks (on the instances' admin ports) and
    /// retries over the service's discovered instances, as a static upstream's `policy`; for
    /// routes with `upstream`, its own `policy` applies instead. Left out, it is
    /// [`service_route_policy`]; a policy that is given starts from the static defaults.
    #[serde(
        default = "service_route_policy",
        skip_serializing_if = "is_service_route_policy"
    )]
    pub policy: UpstreamConfig,
}

/// The policy of a route to a discovered service when it names none: the static defaults
/// (least request, ejection after 5 consecutive 5xx or connect failures, idempotent requests
/// retried twice within a 20 % budget), but no per-try timeout: the services behind have
/// deadlines of their own, so an attempt may take the gateway's whole request timeout.
pub fn service_route_policy() -> UpstreamConfig {
    let mut policy = UpstreamConfig::default();
    policy.retry.per_try_timeout_ms = 0;
    policy
}

fn is_service_route_policy(policy: &UpstreamConfig) -> bool {
    *policy == service_route_policy()
}

/// Upstreams outside discovery, reached over plain HTTP through a pool of kept-alive
/// connections, balanced and retried as `policy` says.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticUpstream {
    pub addrs: Vec<SocketAddr>,
    #[serde(default)]
    pub protocol: UpstreamProtocol,
    /// Idle pooled connections are closed after this long.
    #[serde(default = "default_pool_idle_timeout_ms")]
    pub pool_idle_timeout_ms: u64,
    /// At most this many idle connections are kept per address (and per worker thread: each
    /// worker pools its own, so that a connection is only ever used by the thread driving it).
    #[serde(default = "default_pool_max_idle")]
    pub pool_max_idle_per_addr: usize,
    /// Balancing, outlier detection, active health checks and retries over `addrs`; by default
    /// least-request (P2C over EWMA latency), ejection after 5 consecutive 5xx or connect
    /// failures, idempotent requests retried twice on connect failure or 503 within a 20 %
    /// budget, no active checks. The retry deadline is at most the gateway's request timeout.
    #[serde(default)]
    pub policy: UpstreamConfig,
}

impl StaticUpstream {
    /// `addrs` over HTTP/1.1 with the default pool and policy.
    pub fn http1(addrs: Vec<SocketAddr>) -> Self {
        Self {
            addrs,
            protocol: UpstreamProtocol::Http1,
            pool_idle_timeout_ms: default_pool_idle_timeout_ms(),
            pool_max_idle_per_addr: default_pool_max_idle(),
            policy: UpstreamConfig::default(),
        }
    }
}

/// How a static upstream is spoken to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UpstreamProtocol {
    /// HTTP/1.1 with keep-alive, one request per connection at a time.
    #[default]
    Http1,
    /// HTTP/2 without TLS (prior knowledge), requests multiplexed on one connection.
    H2c,
}

fn default_pool_idle_timeout_ms() -> u64 {
    90_000
}

fn default_pool_max_idle() -> usize {
    256
}

fn yes() -> bool {
    true
}

/// One of the example services.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServiceConfig {
    pub instances: usize,
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    /// `sqlite://...` or `postgres://...`; unset: a SQLite file in the data dir.
    pub database_url: Option<String>,
}

impl ServiceConfig {
    fn with_instances(instances: usize) -> Self {
        Self {
            instances,
            ..Self::default()
        }
    }
}

impl Default for ServiceConfig {
    fn default() -> Self {
        Self {
            instances: 1,
            listen: ([127, 0, 0, 1], 0).into(),
            admin_listen: ([127, 0, 0, 1], 0).into(),
            database_url: None,
        }
    }
}

/// Causeway's embedded message broker: durable queues on disk behind a gRPC streaming API over TLS.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BrokerConfig {
    /// The broker API (gRPC over TLS).
    pub listen: SocketAddr,
    /// `/metrics` and `/healthz`.
    pub admin_listen: SocketAddr,
    /// Flush every commit to stable storage before confirming. Turn off only for experiments: the
    /// broker then flushes after 100 ms without commits and at close, so a crash (of the process
    /// or the machine) may lose up to about 100 ms of confirmed operations.
    pub fsync: bool,
    /// Most operations written in one commit; concurrent publishes and acks share commits.
    pub max_batch: usize,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            listen: ([127, 0, 0, 1], 5390).into(),
            admin_listen: ([127, 0, 0, 1], 0).into(),
            fsync: true,
            max_batch: 1024,
        }
    }
}

/// The queue scenario: which broker the services use and the queue they share.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MessagingConfig {
    /// `amqp://...` (RabbitMQ), `mqtt://...` (Mosquitto) or `causeway://host:port`; unset: the
    /// embedded broker that `causeway up` starts at `broker.listen`.
    pub broker_url: Option<String>,
    /// Most unacked deliveries a consumer holds at once.
    pub prefetch: u16,
    pub notification_queue: QueueSpec,
}

impl Default for MessagingConfig {
    fn default() -> Self {
        Self {
            broker_url: None,
            prefetch: 32,
            notification_queue: QueueSpec::new("notification-queue", QueuePolicy::default()),
        }
    }
}

/// Defaults of the shared client library.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClientConfig {
    pub connect_timeout_ms: u64,
    /// Deadline of one attempt.
    pub attempt_timeout_ms: u64,
    /// Deadline of the whole call, retries included.
    pub deadline_ms: u64,
    pub max_attempts: u32,
    /// How long an endpoint that refused a connection is skipped.
    pub endpoint_backoff_ms: u64,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            connect_timeout_ms: 1000,
            attempt_timeout_ms: 2000,
            deadline_ms: 5000,
            max_attempts: 3,
            endpoint_backoff_ms: 5000,
        }
    }
}

/// The listen address of instance `index` for a configured base address.
pub fn instance_addr(base: SocketAddr, index: usize) -> SocketAddr {
    if base.port() == 0 {
        base
    } else {
        let port = base.port() as usize + index;
        SocketAddr::new(base.ip(), u16::try_from(port).unwrap_or(u16::MAX))
    }
}

impl Topology {
    /// Reads `path`, or `causeway.toml` in the working directory if present, or the defaults.
    pub fn load(path: Option<&Path>) -> Result<Self, TopologyError> {
        let path = match path {
            Some(path) => path.to_path_buf(),
            None if Path::new(DEFAULT_TOPOLOGY_FILE).exists() => DEFAULT_TOPOLOGY_FILE.into(),
            None => return Ok(Self::default()),
        };
        let text = std::fs::read_to_string(&path).map_err(|source| TopologyError::Read {
            path: path.clone(),
            source,
        })?;
        let topology = Self::parse(&text).map_err(|message| TopologyError::Parse {
            path: path.clone(),
            message,
        })?;
        topology.validate()?;
        Ok(topology)
    }

    /// The topology as TOML, in the form `load` reads.
    pub fn to_toml(&self) -> Result<String, String> {
        toml::to_string(self).map_err(|err| err.to_string())
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|err| err.to_string().trim_end().to_string())
    }

    /// The configuration of a role's instances, for the roles that run several.
    pub fn instances(&self, role: Role) -> usize {
        match role {
            Role::Discovery | Role::LoadBalancer => 1,
            Role::ReverseProxy => self.reverse_proxy.instances,
            Role::UserService => self.user_service.instances,
            Role::OrderService => self.order_service.instances,
            Role::PaymentService => self.payment_service.instances,
            Role::PricingService => self.pricing_service.instances,
            Role::InventoryService => self.inventory_service.instances,
            Role::EmailService => self.email_service.instances,
            Role::NotificationService => self.notification_service.instances,
            Role::Broker => usize::from(self.messaging.broker_url.is_none()),
            Role::MeshControlPlane => usize::from(self.mesh.enabled),
            Role::Sidecar => self.meshed_instances().len(),
        }
    }

    /// The app instances that get a sidecar, in sidecar index order: each meshed service's
    /// instances in turn.
    pub fn meshed_instances(&self) -> Vec<(Role, usize)> {
        if !self.mesh.enabled {
            return Vec::new();
        }
        Role::ALL
            .into_iter()
            .filter(|role| self.is_meshed(*role))
            .flat_map(|role| (0..self.instances(role)).map(move |index| (role, index)))
            .collect()
    }

    /// Whether `role` is a service with sidecars.
    pub fn is_meshed(&self, role: Role) -> bool {
        self.mesh.enabled
            && self.service(role).is_some()
            && self.mesh.services.iter().any(|name| name == role.name())
    }

    /// The app instance sidecar `index` serves.
    pub fn sidecar_app(&self, index: usize) -> Option<(Role, usize)> {
        self.meshed_instances().get(index).copied()
    }

    /// The sidecar index of app instance `(role, index)`, if it has one.
    pub fn sidecar_of(&self, role: Role, index: usize) -> Option<usize> {
        self.meshed_instances()
            .iter()
            .position(|&app| app == (role, index))
    }

    /// An instance's name: `<role>-<index + 1>`, and for a sidecar `<app instance>-sidecar`
    /// (`order-service-2-sidecar`), so that logs and status say whose it is.
    pub fn instance_name(&self, role: Role, index: usize) -> String {
        match (role, self.sidecar_app(index)) {
            (Role::Sidecar, Some((app, app_index))) => {
                format!("{}-sidecar", app.instance_name(app_index))
            }
            _ => role.instance_name(index),
        }
    }

    /// The configuration of a service role; `None` for discovery and the proxies.
    pub fn service(&self, role: Role) -> Option<&ServiceConfig> {
        match role {
            Role::UserService => Some(&self.user_service),
            Role::OrderService => Some(&self.order_service),
            Role::PaymentService => Some(&self.payment_service),
            Role::PricingService => Some(&self.pricing_service),
            Role::InventoryService => Some(&self.inventory_service),
            Role::EmailService => Some(&self.email_service),
            Role::NotificationService => Some(&self.notification_service),
            Role::Discovery
            | Role::LoadBalancer
            | Role::ReverseProxy
            | Role::Broker
            | Role::MeshControlPlane
            | Role::Sidecar => None,
        }
    }

    pub fn validate(&self) -> Result<(), TopologyError> {
        let invalid = |message: String| Err(TopologyError::Invalid(message));
        for role in [
            Role::ReverseProxy,
            Role::UserService,
            Role::OrderService,
            Role::PaymentService,
            Role::PricingService,
            Role::InventoryService,
            Role::EmailService,
            Role::NotificationService,
        ] {
            let count = self.instances(role);
            if !(1..=64).contains(&count) {
                return invalid(format!("{role}: instances must be 1 to 64, not {count}"));
            }
        }
        if !is_dns_label(&self.discovery.zone) {
            return invalid(format!(
                "discovery.zone {:?} is not a DNS label",
                self.discovery.zone
            ));
        }
        if self.discovery.heartbeat_interval_ms == 0
            || self.discovery.expiry_ms <= self.discovery.heartbeat_interval_ms
        {
            return invalid(
                "discovery.expiry_ms must exceed discovery.heartbeat_interval_ms (> 0)".into(),
            );
        }
        if !is_dns_label(&self.load_balancer.upstream) {
            return invalid(format!(
                "load_balancer.upstream {:?} is not a service name",
                self.load_balancer.upstream
            ));
        }
        // Which source address the balancer's connections leave from is the routing table's
        // business; an empty list is the one mistake that can be seen here.
        if self.load_balancer.send_proxy_protocol
            && self.reverse_proxy.proxy_protocol_from.is_empty()
        {
            return invalid(
                "load_balancer.send_proxy_protocol is on, but reverse_proxy.proxy_protocol_from \
                 trusts no source: the proxies would refuse every connection; name the \
                 balancer's address (e.g. 127.0.0.1/32), or turn send_proxy_protocol off"
                    .into(),
            );
        }
        let limit = &self.reverse_proxy.rate_limit;
        if limit.requests_per_second == 0 || limit.burst == 0 || limit.sync_interval_ms == 0 {
            return invalid("reverse_proxy.rate_limit values must be positive".into());
        }
        self.reverse_proxy
            .validate()
            .map_err(TopologyError::Invalid)?;
        for route in &self.reverse_proxy.routes {
            if !route.prefix.starts_with('/') {
                return invalid(format!(
                    "route prefix {:?} must start with '/'",
                    route.prefix
                ));
            }
            match &route.upstream {
                Some(upstream) if upstream.addrs.is_empty() => {
                    return invalid(format!(
                        "route {:?}: upstream.addrs must name at least one address",
                        route.prefix
                    ));
                }
                Some(_) => {}
                None if !is_dns_label(&route.service) => {
                    return invalid(format!(
                        "route {:?}: {:?} is not a service name",
                        route.prefix, route.service
                    ));
                }
                None => {}
            }
            if let Some(strip) = &route.strip_prefix
                && !route.prefix.starts_with(strip.as_str())
            {
                return invalid(format!(
                    "route {:?}: strip_prefix {strip:?} is not a prefix of it",
                    route.prefix
                ));
            }
        }
        let queue = &self.messaging.notification_queue;
        if let Err(err) = validate_queue_name(&queue.name) {
            return invalid(format!("messaging.notification_queue: {err}"));
        }
        if let Err(err) = queue.policy.validate() {
            return invalid(format!("messaging.notification_queue.policy: {err}"));
        }
        if self.messaging.prefetch == 0 {
            return invalid("messaging.prefetch must be at least 1".into());
        }
        if self.broker.max_batch == 0 {
            return invalid("broker.max_batch must be at least 1".into());
        }
        if self.client.max_attempts == 0 {
            return invalid("client.max_attempts must be at least 1".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_the_defaults() {
        let topology = Topology::parse("").unwrap();
        assert_eq!(topology, Topology::default());
        assert_eq!(topology.instances(Role::OrderService), 3);
        assert_eq!(topology.instances(Role::ReverseProxy), 2);
        topology.validate().unwrap();
    }

    /// The README's example topology is a valid file that states the defaults.
    #[test]
    fn the_readme_example_is_valid_and_shows_the_defaults() {
        let readme = include_str!("../../../README.md");
        let example = readme
            .split("```toml\n")
            .nth(1)
            .and_then(|rest| rest.split("```").next())
            .expect("the README has a toml example");
        let topology = Topology::parse(example).expect("the README's example parses");
        topology.validate().expect("the README's example is valid");
        assert_eq!(topology.broker, BrokerConfig::default());
        assert_eq!(topology.messaging, MessagingConfig::default());
        assert_eq!(topology.client, Topology::default().client);
    }

    #[test]
    fn the_balancer_names_clients_to_proxies_that_trust_it() {
        let topology = Topology::default();
        assert!(topology.load_balancer.send_proxy_protocol);
        let trusted = &topology.reverse_proxy.listener_limits().proxy_protocol_from;
        assert!(
            trusted
                .iter()
                .any(|net| net.contains(&topology.load_balancer.listen.ip()))
        );

        let wider = Topology::parse(
            "[reverse_proxy]\nproxy_protocol_from = [\"10.0.0.0/8\", \"::1/128\"]\n",
        )
        .unwrap();
        wider.validate().unwrap();
        assert_eq!(
            wider
                .reverse_proxy
                .listener_limits()
                .proxy_protocol_from
                .len(),
            2
        );

        // Sending to proxies that trust nobody would refuse every connection: said at load time.
        let nobody = Topology::parse("[reverse_proxy]\nproxy_protocol_from = []\n").unwrap();
        let err = nobody.validate().unwrap_err().to_string();
        assert!(err.contains("proxy_protocol_from"), "{err}");
        let off = Topology::parse(
            "[load_balancer]\nsend_proxy_protocol = false\n[reverse_proxy]\nproxy_protocol_from = []\n",
        )
        .unwrap();
        off.validate().unwrap();
        assert!(
            Topology::parse("[reverse_proxy]\nproxy_protocol_from = [\"10.0.0.0/33\"]\n").is_err()
        );
    }

    #[test]
    fn service_routes_take_a_policy_with_working_defaults() {
        let topology = Topology::parse(
            "[[reverse_proxy.routes]]\nprefix = \"/a/\"\nservice = \"order-service\"\n\
             [[reverse_proxy.routes]]\nprefix = \"/b/\"\nservice = \"order-service\"\npolicy = { balance = { policy = \"round_robin\" }, outlier = { consecutive_5xx = 2 } }\n",
        )
        .unwrap();
        topology.validate().unwrap();
        let routes = &topology.reverse_proxy.routes;
        assert_eq!(routes[0].policy, service_route_policy());
        assert_eq!(routes[0].policy.retry.per_try_timeout_ms, 0);
        assert_eq!(
            routes[1].policy.balance,
            crate::proxy_config::BalancePolicy::RoundRobin
        );
        assert_eq!(routes[1].policy.outlier.consecutive_5xx, 2);

        let both = Topology::parse(
            "[[reverse_proxy.routes]]\nprefix = \"/s/\"\nupstream = { addrs = [\"127.0.0.1:1\"] }\npolicy = { balance = { policy = \"round_robin\" } }\n",
        )
        .unwrap();
        let err = both.validate().unwrap_err().to_string();
        assert!(err.contains("upstream.policy"), "{err}");
        let bad = Topology::parse(
            "[[reverse_proxy.routes]]\nprefix = \"/a/\"\nservice = \"order-service\"\npolicy = { outlier = { max_ejection_percent = 101 } }\n",
        )
        .unwrap();
        let err = bad.validate().unwrap_err().to_string();
        assert!(err.contains("route /a/: policy"), "{err}");
    }

    #[test]
    fn reverse_proxy_limits_and_static_upstream_policies_parse_and_validate() {
        let topology = Topology::parse(
            "[reverse_proxy]\nmax_body_bytes = 2048\nlimits = { max_header_bytes = 16384, max_connections = 5 }\n\
             [[reverse_proxy.routes]]\nprefix = \"/s/\"\nupstream = { addrs = [\"127.0.0.1:1\"], policy = { balance = { policy = \"consistent_hash\", key = { from = \"header\", name = \"x-user\" } } } }\n",
        )
        .unwrap();
        topology.validate().unwrap();
        let limits = topology.reverse_proxy.listener_limits();
        assert_eq!(limits.max_body_bytes, 2048);
        assert_eq!(limits.request_timeout_ms, 10_000);
        assert_eq!(limits.max_header_bytes, 16384);
        assert_eq!(limits.max_connections, 5);
        let policy = &topology.reverse_proxy.routes[0]
            .upstream
            .as_ref()
            .unwrap()
            .policy;
        assert!(matches!(
            policy.balance,
            crate::proxy_config::BalancePolicy::ConsistentHash { .. }
        ));

        let conflicting = Topology::parse(
            "[reverse_proxy]\nmax_body_bytes = 2048\nlimits = { max_body_bytes = 4096 }\n",
        )
        .unwrap();
        let err = conflicting.validate().unwrap_err().to_string();
        assert!(err.contains("max_body_bytes"), "{err}");
        let too_small =
            Topology::parse("[reverse_proxy]\nlimits = { max_header_bytes = 100 }\n").unwrap();
        assert!(too_small.validate().is_err());
    }

    #[test]
    fn reverse_proxy_certificates_parse_validate_and_round_trip() {
        let topology = Topology::parse(
            "[[reverse_proxy.certificates]]\nhosts = [\"shop.example.com\", \"*.apps.example.com\"]\n\
             cert = \"certs/shop.pem\"\nkey = \"certs/shop-key.pem\"\n",
        )
        .unwrap();
        topology.validate().unwrap();
        let certificate = &topology.reverse_proxy.certificates[0];
        assert_eq!(
            certificate.hosts,
            ["shop.example.com", "*.apps.example.com"]
        );
        assert_eq!(certificate.key, PathBuf::from("certs/shop-key.pem"));
        let again = Topology::parse(&topology.to_toml().unwrap()).unwrap();
        assert_eq!(
            again.reverse_proxy.certificates,
            topology.reverse_proxy.certificates
        );
        assert!(
            !Topology::default()
                .to_toml()
                .unwrap()
                .contains("certificates")
        );

        let err = Topology::parse(
            "[[reverse_proxy.certificates]]\nhosts = [\"a\"]\ncert = \"a.pem\"\nkey = \"k.pem\"\nchain = \"c.pem\"\n",
        )
        .unwrap_err();
        assert!(err.contains("chain"), "{err}");
        let no_hosts = Topology::parse(
            "[[reverse_proxy.certificates]]\nhosts = []\ncert = \"a.pem\"\nkey = \"k.pem\"\n",
        )
        .unwrap();
        let err = no_hosts.validate().unwrap_err().to_string();
        assert!(err.contains("reverse_proxy.certificates[0]"), "{err}");
    }

    #[test]
    fn toml_round_trips() {
        let mut topology = Topology::default();
        topology.order_service.instances = 7;
        topology.user_service.database_url = Some("postgres://127.0.0.1/test".into());
        let text = topology.to_toml().unwrap();
        assert_eq!(Topology::parse(&text).unwrap(), topology);
    }

    #[test]
    fn partial_sections_keep_other_defaults() {
        let topology = Topology::parse(
            "data_dir = \"/tmp/x\"\n[order_service]\ninstances = 5\n[load_balancer]\nlisten = \"127.0.0.1:9443\"\n",
        )
        .unwrap();
        assert_eq!(topology.order_service.instances, 5);
        assert_eq!(topology.load_balancer.listen.port(), 9443);
        assert_eq!(topology.load_balancer.upstream, "reverse-proxy");
        assert_eq!(topology.data_dir, PathBuf::from("/tmp/x"));
    }

    #[test]
    fn unknown_keys_and_bad_values_are_reported_with_their_place() {
        let err = Topology::parse("[order_service]\ninstanses = 2\n").unwrap_err();
        assert!(err.contains("instanses"), "{err}");
        let err = Topology::parse("[load_balancer]\nlisten = \"not an address\"\n").unwrap_err();
        assert!(err.contains("line 2"), "{err}");
    }

    #[test]
    fn routes_take_static_upstreams_with_defaults() {
        let text = "[reverse_proxy]\n[[reverse_proxy.routes]]\nprefix = \"/\"\nauth = false\n\
                    upstream = { addrs = [\"127.0.0.1:9000\"], protocol = \"h2c\" }\n";
        let topology = Topology::parse(text).unwrap();
        topology.validate().unwrap();
        let upstream = topology.reverse_proxy.routes[0].upstream.as_ref().unwrap();
        assert_eq!(upstream.protocol, UpstreamProtocol::H2c);
        assert_eq!(upstream.pool_max_idle_per_addr, default_pool_max_idle());
        assert_eq!(
            Topology::parse(&topology.to_toml().unwrap()).unwrap(),
            topology
        );

        let mut topology = topology;
        if let Some(upstream) = topology.reverse_proxy.routes[0].upstream.as_mut() {
            upstream.addrs.clear();
        }
        let err = topology.validate().unwrap_err().to_string();
        assert!(err.contains("upstream.addrs"), "{err}");
    }

    #[test]
    fn validation_names_the_offending_setting() {
        let mut topology = Topology::default();
        topology.order_service.instances = 0;
        let err = topology.validate().unwrap_err().to_string();
        assert!(err.contains("order-service"), "{err}");

        let mut topology = Topology::default();
        topology.reverse_proxy.routes[0].prefix = "api".into();
        assert!(topology.validate().unwrap_err().to_string().contains("'/'"));
    }

    #[test]
    fn fixed_ports_count_up_per_instance() {
        let base: SocketAddr = "127.0.0.1:9200".parse().unwrap();
        assert_eq!(instance_addr(base, 2).port(), 9202);
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        assert_eq!(instance_addr(any, 2).port(), 0);
    }

    #[test]
    fn roles_round_trip_through_names() {
        for role in Role::ALL {
            assert_eq!(Role::from_name(role.name()), Some(role));
        }
        assert_eq!(Role::OrderService.instance_name(1), "order-service-2");
    }
}
