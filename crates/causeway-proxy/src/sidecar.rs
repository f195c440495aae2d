//! The mesh sidecar role (technique 4): the gateway's engine configured as the two halves of a
//! sidecar, each a [`Gateway`](crate::Gateway) in a mesh mode:
//!
//! - **outbound**: the app's plain HTTP on loopback, routed by `Host` (the destination service's
//!   name) to that service's sidecars as the control plane lists them (not DNS), balanced, retried
//!   and circuit-broken by the engine's [`Upstream`](crate::upstream::Upstream), over one
//!   HTTP/2 mutual-TLS connection per peer that must present the SPIFFE ID the control plane
//!   names for the destination;
//! - **inbound**: mutual TLS with a mesh certificate required, each request authorized against
//!   the mesh policy by the caller's verified identity (403 naming the rule otherwise), then
//!   passed to the local app with that identity in [`PEER_IDENTITY`], which the app can trust
//!   because the sidecar removes whatever a caller put there.
//!
//! [`MeshContext`] holds what both halves share: the identity the sidecar presents (rotated in
//! place by the identity agent), the trust anchors, the configuration in force (from
//! [`ConfigWatcher`]) and the mTLS connections per destination.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use causeway_client::connection::Connections;
use causeway_core::topology::{RouteConfig, service_route_policy};
use causeway_mesh::policy::PathMatch;
use causeway_mesh::tls::RotatingIdentity;
use causeway_mesh::watch::{Applied, ConfigWatcher};
use causeway_mesh::{RouteRule, SpiffeId};
use http::HeaderName;
use rustls::RootCertStore;

use crate::routing::RouteTable;

/// The caller's verified mesh identity (`spiffe://...`), set by the inbound sidecar for its app;
/// whatever a caller sends under this name is removed first.
pub const PEER_IDENTITY: HeaderName = HeaderName::from_static("x-causeway-peer-identity");

/// Which half of a sidecar a gateway is.
#[derive(Clone)]
pub enum MeshRole {
    Outbound(Arc<MeshContext>),
    Inbound(Arc<MeshContext>),
}

impl MeshRole {
    pub fn context(&self) -> &Arc<MeshContext> {
        match self {
            Self::Outbound(context) | Self::Inbound(context) => context,
        }
    }
}

/// What a sidecar's two halves share.
pub struct MeshContext {
    /// The service this sidecar's app is (the policy's `selector` for inbound calls).
    pub service: String,
    pub own_identity: SpiffeId,
    pub watcher: ConfigWatcher,
    identity: Arc<RotatingIdentity>,
    roots: Arc<RootCertStore>,
    connect_timeout: Duration,
    peers: Mutex<HashMap<String, Arc<PeerSet>>>,
}

/// The connections to one destination's sidecars, verified as its identity.
pub struct PeerSet {
    pub identity: SpiffeId,
    pub connections: Connections,
}

impl MeshContext {
    pub fn new(
        service: String,
        own_identity: SpiffeId,
        watcher: ConfigWatcher,
        identity: Arc<RotatingIdentity>,
        roots: Arc<RootCertStore>,
        connect_timeout: Duration,
    ) -> Self {
        Self {
            service,
            own_identity,
            watcher,
            identity,
            roots,
            connect_timeout,
            peers: Mutex::new(HashMap::new()),
        }
    }

    /// The configuration in force; a sidecar is started only once it has one.
    pub fn applied(&self) -> Result<Arc<Applied>, String> {
        self.watcher
            .current()
            .ok_or_else(|| "the sidecar has no mesh configuration yet".to_string())
    }

    /// The connections to `service`'s sidecars, as `applied` names its identity; built anew
    /// when the identity changes.
    pub fn peers(&self, service: &str, applied: &Applied) -> Result<Arc<PeerSet>, String> {
        let destination = applied
            .destinations
            .get(service)
            .ok_or_else(|| format!("{service} is not a meshed service"))?;
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(set) = peers.get(service)
            && set.identity == destination.identity
        {
            return Ok(set.clone());
        }
        let config = causeway_mesh::tls::client_config(
            self.identity.clone(),
            self.roots.clone(),
            destination.identity.clone(),
        )
        .map_err(|err| err.to_string())?;
        let set = Arc::new(PeerSet {
            identity: destination.identity.clone(),
            connections: Connections::new(config, self.connect_timeout),
        });
        peers.insert(service.to_string(), set.clone());
        Ok(set)
    }
}

/// The outbound half's routes for `applied`: per destination, one route per `HTTPRoute` rule
/// (its timeouts and retries as the route's policy) and a catch-all with the defaults, matched
/// by the `Host` the app sent.
pub fn outbound_routes(applied: &Applied) -> RouteTable {
    let mut hosts = Vec::new();
    for service in applied.destinations.keys() {
        let mut routes: Vec<(PathMatch, RouteConfig)> = applied
            .policy
            .routes_of(service)
            .iter()
            .map(|rule| {
                let route = mesh_route(service, &rule.path, route_policy(rule));
                (rule.path.clone(), route)
            })
            .collect();
        let catch_all = PathMatch::Prefix("/".into());
        if !routes
            .iter()
            .any(|(path, _)| path.precedence() == catch_all.precedence())
        {
            let route = mesh_route(service, &catch_all, route_policy_default());
            routes.push((catch_all, route));
        }
        hosts.push((service.clone(), routes));
    }
    RouteTable::by_host(hosts)
}

/// A route to a meshed service; `prefix` carries the rule's path for logs and metrics, the
/// match itself is the [`PathMatch`].
fn mesh_route(
    service: &str,
    path: &PathMatch,
    policy: causeway_core::proxy_config::UpstreamConfig,
) -> RouteConfig {
    RouteConfig {
        prefix: match path {
            PathMatch::Exact(path) | PathMatch::Prefix(path) => path.clone(),
        },
        service: service.to_string(),
        strip_prefix: None,
        auth: false,
        upstream: None,
        policy,
    }
}

/// The engine's policy for a destination without an `HTTPRoute` rule: least request, circuit
/// opened after 5 consecutive failures, idempotent calls (and POSTs with an `Idempotency-Key`)
/// retried twice within the budget, 503 retried.
fn route_policy_default() -> causeway_core::proxy_config::UpstreamConfig {
    service_route_policy()
}

/// The inbound half's policy towards its own app: one endpoint, no retries (the caller's
/// outbound half retries, elsewhere, within its budget).
pub fn inbound_policy() -> causeway_core::proxy_config::UpstreamConfig {
    let mut policy = causeway_core::proxy_config::UpstreamConfig::default();
    policy.retry.max_retries = 0;
    policy
}

/// A rule's timeouts and retries over the defaults.
fn route_policy(rule: &RouteRule) -> causeway_core::proxy_config::UpstreamConfig {
    let mut policy = route_policy_default();
    if let Some(timeout) = rule.request_timeout {
        policy.retry.deadline_ms = timeout.as_millis() as u64;
    }
    if let Some(timeout) = rule.attempt_timeout {
        policy.retry.per_try_timeout_ms = timeout.as_millis() as u64;
    }
    policy.retry.max_retries = rule.retries;
    policy.retry.backoff_ms = rule.retry_backoff.as_millis() as u64;
    if !rule.retry_codes.is_empty() {
        policy.retry.retry_statuses = rule.retry_codes.clone();
    }
    policy
}

#[derive(Debug, thiserror::Error)]
pub enum SidecarError {
    #[error("the sidecar got no identity: {0}")]
    Identity(#[from] causeway_mesh::client::AgentError),
    #[error("the sidecar got no configuration: {0}")]
    Configuration(#[from] causeway_mesh::watch::WatchError),
    #[error("the control plane issued an unusable identity: {0}")]
    BadIdentity(String),
    #[error(transparent)]
    Tls(#[from] causeway_mesh::tls::MeshTlsError),
    #[error("cannot build the sidecar's {half} half: {message}")]
    Build { half: &'static str, message: String },
}

/// Where a sidecar gets its identity and configuration, and what it serves.
pub struct SidecarSettings {
    /// The app's service (its identity's service account) and this sidecar's instance name.
    pub service: String,
    pub instance: String,
    pub trust_domain: String,
    pub control_plane: causeway_mesh::client::ControlPlaneTarget,
    /// The single-use token `causeway up` gave this sidecar.
    pub bootstrap_token: String,
    /// Asked of the control plane for each certificate; None for its default.
    pub certificate_lifetime: Option<Duration>,
    /// How long start-up waits for the first configuration.
    pub config_patience: Duration,
    /// The app's plain-HTTP listener on loopback, where inbound calls go.
    pub app: SocketAddr,
    /// Listener limits and the request timeout of both halves.
    pub limits: causeway_core::topology::ReverseProxyConfig,
}

/// A sidecar that holds a certificate and has applied its first configuration: its two halves
/// are ready to serve (see [`serve_outbound`] and [`serve_inbound`]).
pub struct Sidecar {
    pub context: Arc<MeshContext>,
    pub agent: causeway_mesh::client::IdentityAgent,
    pub outbound: Arc<crate::reload::Reloadable<crate::Gateway>>,
    pub inbound: Arc<crate::Gateway>,
    server_config: Arc<rustls::ServerConfig>,
}

impl Sidecar {
    /// Obtains the identity, then the first configuration (in that order: the configuration
    /// stream needs the certificate), and builds both halves. Failing here keeps the app from
    /// starting, as `causeway up` orders it.
    pub async fn start(
        settings: SidecarSettings,
        client: Arc<causeway_client::ServiceClient>,
        metrics: causeway_core::telemetry::HttpMetrics,
        shutdown: causeway_core::serve::Shutdown,
    ) -> Result<Self, SidecarError> {
        let agent = causeway_mesh::client::IdentityAgent::start(
            settings.control_plane.clone(),
            &settings.bootstrap_token,
            settings.certificate_lifetime,
            shutdown.clone(),
        )
        .await?;
        let first = agent.current();
        let own_identity: SpiffeId = first
            .spiffe_id
            .parse()
            .map_err(|err| SidecarError::BadIdentity(format!("{}: {err}", first.spiffe_id)))?;
        let roots = causeway_mesh::tls::trust_anchors(&first.trust_anchors_pem)?;
        let mut watcher = ConfigWatcher::start(
            settings.control_plane.clone(),
            settings.instance.clone(),
            settings.trust_domain.clone(),
            agent.held(),
            shutdown.clone(),
        );
        watcher.first(settings.config_patience).await?;
        tracing::info!(
            event = "mesh.sidecar_ready",
            spiffe_id = %own_identity,
            serial = first.serial,
            "sidecar holds a certificate and its first configuration"
        );
        let connect_timeout = settings
            .limits
            .listener_limits()
            .request_timeout()
            .min(Duration::from_secs(5));
        let context = Arc::new(MeshContext::new(
            settings.service.clone(),
            own_identity,
            watcher,
            agent.identity.clone(),
            roots.clone(),
            connect_timeout,
        ));
        let build = |half: &'static str, role: MeshRole, app: Option<SocketAddr>| {
            crate::Gateway::sidecar(
                format!("{}-{half}", settings.instance),
                &settings.limits,
                role,
                app,
                client.clone(),
                metrics.clone(),
            )
            .map_err(|message| SidecarError::Build { half, message })
        };
        let outbound = build("outbound", MeshRole::Outbound(context.clone()), None)?;
        let inbound = build(
            "inbound",
            MeshRole::Inbound(context.clone()),
            Some(settings.app),
        )?;
        let server_config = causeway_mesh::tls::server_config(agent.identity.clone(), roots)?;
        Ok(Self {
            context,
            agent,
            outbound: Arc::new(crate::reload::Reloadable::new(outbound)),
            inbound: Arc::new(inbound),
            server_config,
        })
    }

    /// Rebuilds the outbound routes whenever a new configuration is applied (pools of unchanged
    /// routes carry on with their endpoints and circuit state); until shutdown.
    pub fn follow_configuration(
        &self,
        mut shutdown: causeway_core::serve::Shutdown,
    ) -> tokio::task::JoinHandle<()> {
        let mut watcher = self.context.watcher.clone();
        let outbound = self.outbound.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    changed = watcher.changed() => if !changed { return },
                    _ = shutdown.wait() => return,
                }
                if let Some(applied) = watcher.current() {
                    let next = outbound.current().reload(outbound_routes(&applied));
                    outbound.replace(next);
                }
            }
        })
    }

    /// The inbound half's TLS: this sidecar's rotating certificate, a mesh client certificate
    /// required.
    pub fn inbound_tls(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.server_config.clone())
    }
}

/// Serves the outbound half (plain HTTP from the app, on loopback) until shutdown.
pub async fn serve_outbound(
    sidecar: &Sidecar,
    listener: tokio::net::TcpListener,
    shutdown: causeway_core::serve::Shutdown,
    drain: Duration,
) {
    let outbound = sidecar.outbound.clone();
    let limits = outbound.current().limits().clone();
    let make_service = move |peer: SocketAddr| {
        let outbound = outbound.clone();
        hyper::service::service_fn(move |request| {
            let gateway = outbound.current();
            async move { Ok::<_, std::convert::Infallible>(gateway.handle(request, peer).await) }
        })
    };
    causeway_core::serve::serve_limited(
        listener,
        None,
        make_service,
        shutdown,
        drain,
        Some(&limits),
        crate::hygiene::ConnectionLimiter::new(limits.max_connections),
    )
    .await;
}

/// Serves the inbound half (HTTP/2 over mutual TLS from other sidecars) until shutdown. The
/// caller's identity is read once per connection from its verified certificate.
pub async fn serve_inbound(
    sidecar: &Sidecar,
    listener: tokio::net::TcpListener,
    shutdown: causeway_core::serve::Shutdown,
    drain: Duration,
) {
    let inbound = sidecar.inbound.clone();
    let make_service = move |peer: &causeway_core::serve::Peer| {
        let inbound = inbound.clone();
        let addr = peer.addr;
        let caller = peer
            .certificates
            .first()
            .and_then(|leaf| SpiffeId::from_certificate(leaf).ok())
            .map(Arc::new);
        hyper::service::service_fn(move |request| {
            let inbound = inbound.clone();
            let caller = caller.clone();
            async move {
                Ok::<_, std::convert::Infallible>(
                    inbound.handle_from(request, addr, caller.as_deref()).await,
                )
            }
        })
    };
    causeway_core::serve::serve_http2_with_peer(
        listener,
        Some(sidecar.inbound_tls()),
        make_service,
        shutdown,
        drain,
        causeway_core::serve::KeepAlive::default(),
    )
    .await;
}

#[cfg(test)]
mod tests;
