//! The mesh's processes: the control plane (identities, policy file, destinations from the
//! registry) and each meshed instance's sidecar, plus what a meshed app does differently (it
//! also serves its sidecar on a loopback listener the supervisor handed it).
//!
//! A sidecar registers its inbound (mutual-TLS) address in discovery as service
//! `<app service>-mesh`, instance `<app instance>`; the control plane reads those entries into
//! each destination's endpoints, so that endpoints come from discovery as the mesh's do in
//! Kubernetes (from EndpointSlices), while callers resolve them through the control plane.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::fd::FromRawFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use causeway_client::ServiceClient;
use causeway_core::registry_api::RegistryListing;
use causeway_core::serve::{Shutdown, bind};
use causeway_core::telemetry::Metrics;
use causeway_core::topology::instance_addr;
use causeway_core::{InheritedListener, Launch, MeshLaunch, Role};
use causeway_mesh::client::ControlPlaneTarget;
use causeway_mesh::server::{ConfigFeed, ControlPlane};
use causeway_mesh::{BootstrapKey, MeshAuthority, MeshPolicy, SpiffeId, TokenVerifier};
use causeway_proto::mesh::v1 as pb;
use causeway_proxy::sidecar::{Sidecar, SidecarSettings, serve_inbound, serve_outbound};
use tokio::task::JoinHandle;

use super::{DRAIN, announce_as};

/// How long a sidecar waits at start for its first configuration.
const CONFIG_PATIENCE: Duration = Duration::from_secs(10);

/// The registry service under which `service`'s sidecars list their inbound addresses.
pub fn mesh_service_name(service: &str) -> String {
    format!("{service}-mesh")
}

/// The name the control plane's certificate carries.
pub fn control_plane_server_name(zone: &str) -> String {
    format!("{}.{zone}", Role::MeshControlPlane.name())
}

/// A listener the supervisor bound and this process inherited.
pub fn inherited(listener: &InheritedListener) -> anyhow::Result<tokio::net::TcpListener> {
    // SAFETY: the supervisor handed this descriptor to this process for this listener alone
    // (see `MeshLaunch`); nothing else here owns it.
    let std_listener = unsafe { std::net::TcpListener::from_raw_fd(listener.fd) };
    let actual = std_listener
        .local_addr()
        .with_context(|| format!("inherited descriptor {} is not a listener", listener.fd))?;
    anyhow::ensure!(
        actual == listener.addr,
        "inherited descriptor {} listens on {actual}, not {}",
        listener.fd,
        listener.addr
    );
    std_listener.set_nonblocking(true)?;
    Ok(tokio::net::TcpListener::from_std(std_listener)?)
}

fn mesh_launch(launch: &Launch) -> anyhow::Result<&MeshLaunch> {
    launch
        .mesh
        .as_ref()
        .context("a mesh component started without its mesh launch")
}

/// The services a meshed app reaches through its sidecar: the other meshed ones.
pub fn meshed_peers(launch: &Launch) -> Vec<String> {
    let own = launch.role.name();
    launch
        .topology
        .mesh
        .services
        .iter()
        .filter(|service| service.as_str() != own)
        .cloned()
        .collect()
}

pub async fn start_control_plane(
    launch: &Launch,
    metrics: Metrics,
    shutdown: Shutdown,
) -> anyhow::Result<Vec<JoinHandle<()>>> {
    let config = &launch.topology.mesh;
    let data = launch.data();
    let what = launch.instance();
    let listener = bind(&what, config.control_plane_listen).await?;
    let admin = bind(
        &format!("{what} (admin)"),
        config.control_plane_admin_listen,
    )
    .await?;
    let listen = listener.local_addr()?;
    let policy_file = config
        .policy_file
        .clone()
        .unwrap_or_else(|| data.mesh_policy());
    let key = BootstrapKey::load_or_create(&data.mesh_bootstrap_key())?;
    let feed = Arc::new(ConfigFeed::default());
    let mut sources = Sources {
        policy_file,
        trust_domain: config.trust_domain.clone(),
        namespace: config.namespace.clone(),
        services: config.services.clone(),
        registry: launch.registry_addr,
        policy: None,
    };
    // The file was checked by `up`; a start without a usable policy is a failed start.
    sources.read_policy()?;
    sources.publish(&feed).await;
    let control_plane = ControlPlane {
        authority: MeshAuthority::load_or_create(&data.tls_dir())?,
        tokens: TokenVerifier::new(&key, Some(data.mesh_token_journal())),
        trust_anchors_pem: std::fs::read_to_string(data.ca_cert())
            .with_context(|| format!("reading {}", data.ca_cert().display()))?,
        trust_domain: config.trust_domain.clone(),
        default_lifetime: Duration::from_millis(config.certificate_lifetime_ms),
        config: feed.subscribe(),
    };
    let certs = data.service_cert(Role::MeshControlPlane.name());
    let ca_path = data.ca_cert();
    let mut serving_shutdown = shutdown.clone();
    let server = tokio::spawn(async move {
        let stopped = async move { serving_shutdown.wait().await };
        if let Err(err) =
            causeway_mesh::server::serve(control_plane, listener, &certs, &ca_path, stopped).await
        {
            tracing::error!(error = %err, "the mesh control plane stopped");
        }
    });
    let mut tasks = announce_as(
        launch,
        launch.role.name().to_string(),
        what,
        listen,
        admin,
        metrics,
        &shutdown,
    )
    .await?;
    tasks.push(server);
    let interval = Duration::from_millis(config.refresh_interval_ms.max(50));
    let mut refresh_shutdown = shutdown;
    tasks.push(tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = refresh_shutdown.wait() => return,
            }
            if let Err(err) = sources.read_policy() {
                // Logged once per bad version of the file by read_policy; the old one stays.
                tracing::debug!(error = %err, "mesh policy unchanged");
            }
            sources.publish(&feed).await;
        }
    }));
    Ok(tasks)
}

/// What the control plane's configuration is made of: the policy file and the registry.
struct Sources {
    policy_file: PathBuf,
    trust_domain: String,
    namespace: String,
    services: Vec<String>,
    registry: SocketAddr,
    /// The text in force, and the last text refused (so that it is reported once).
    policy: Option<PolicyText>,
}

struct PolicyText {
    in_force: String,
    refused: Option<String>,
}

impl Sources {
    /// Reads the policy file; a new text that parses replaces the one in force, one that does
    /// not is refused with its file and line, and the one in force stays.
    fn read_policy(&mut self) -> anyhow::Result<()> {
        let file = self.policy_file.display().to_string();
        let text = std::fs::read_to_string(&self.policy_file)
            .with_context(|| format!("reading the mesh policy {file}"))?;
        if let Some(current) = &self.policy
            && (current.in_force == text || current.refused.as_deref() == Some(text.as_str()))
        {
            return Ok(());
        }
        match MeshPolicy::parse(&file, &text, &self.trust_domain) {
            Ok(_) => {
                tracing::info!(event = "mesh.policy_loaded", file = %file, "mesh policy in force");
                self.policy = Some(PolicyText {
                    in_force: text,
                    refused: None,
                });
                Ok(())
            }
            Err(err) => {
                let Some(current) = &mut self.policy else {
                    return Err(err.into());
                };
                tracing::error!(
                    event = "mesh.policy_refused",
                    file = %file,
                    error = %err,
                    "mesh policy refused; the previous one stays in force"
                );
                current.refused = Some(text);
                Err(err.into())
            }
        }
    }

    /// The destinations as the registry lists the sidecars now, published with the policy in
    /// force (a new version only if something changed). An unreachable registry keeps the
    /// last destinations: sidecars keep serving what they have.
    async fn publish(&self, feed: &ConfigFeed) {
        let Some(policy) = &self.policy else { return };
        let listing = match causeway_client::plain_http::request(
            http::Method::GET,
            self.registry,
            "/v1/registry",
            None,
            Duration::from_secs(2),
        )
        .await
        {
            Ok((status, body)) if status.is_success() => {
                match serde_json::from_slice::<RegistryListing>(&body) {
                    Ok(listing) => listing,
                    Err(err) => {
                        tracing::warn!(error = %err, "the registry answered an unreadable listing");
                        return;
                    }
                }
            }
            Ok((status, _)) => {
                tracing::warn!(%status, "the registry refused the listing");
                return;
            }
            Err(err) => {
                tracing::warn!(error = %err, "the registry is unreachable; destinations unchanged");
                return;
            }
        };
        let destinations = self.destinations(&listing.services);
        if let Some(version) = feed.publish(
            &self.policy_file.display().to_string(),
            &policy.in_force,
            destinations,
        ) {
            tracing::info!(
                event = "mesh.config_published",
                version,
                "mesh configuration published"
            );
        }
    }

    fn destinations(
        &self,
        services: &BTreeMap<String, Vec<causeway_core::registry_api::RegisteredInstance>>,
    ) -> Vec<pb::Destination> {
        self.services
            .iter()
            .filter_map(|service| {
                let identity = SpiffeId::new(&self.trust_domain, &self.namespace, service).ok()?;
                let endpoints = services
                    .get(&mesh_service_name(service))
                    .map(|instances| {
                        instances
                            .iter()
                            .map(|entry| pb::MeshEndpoint {
                                instance: entry.record.instance.clone(),
                                addr: entry.record.addr.to_string(),
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                Some(pb::Destination {
                    service: service.clone(),
                    spiffe_id: identity.to_string(),
                    endpoints,
                })
            })
            .collect()
    }
}

pub async fn start_sidecar(
    launch: &Launch,
    mut metrics: Metrics,
    client: Arc<ServiceClient>,
    shutdown: Shutdown,
) -> anyhow::Result<Vec<JoinHandle<()>>> {
    let topology = &launch.topology;
    let (app_role, app_index) = topology
        .sidecar_app(launch.index)
        .context("this sidecar serves no app instance")?;
    let mesh = mesh_launch(launch)?;
    let app_instance = app_role.instance_name(app_index);
    let data = launch.data();
    let target = ControlPlaneTarget {
        addr: mesh
            .control_plane
            .context("a sidecar needs the control plane's address")?,
        server_name: control_plane_server_name(&topology.discovery.zone),
        ca_pem: std::fs::read_to_string(data.ca_cert())
            .with_context(|| format!("reading {}", data.ca_cert().display()))?,
        timeout: Duration::from_secs(5),
    };
    let settings = SidecarSettings {
        service: app_role.name().to_string(),
        instance: launch.instance(),
        trust_domain: topology.mesh.trust_domain.clone(),
        control_plane: target,
        bootstrap_token: mesh
            .bootstrap_token
            .clone()
            .context("a sidecar needs a bootstrap token")?,
        certificate_lifetime: Some(Duration::from_millis(topology.mesh.certificate_lifetime_ms)),
        config_patience: CONFIG_PATIENCE,
        app: mesh.app.addr,
        limits: topology.reverse_proxy.clone(),
    };
    let outbound_listener = inherited(&mesh.outbound)?;
    let what = launch.instance();
    let inbound_listener = bind(&what, instance_addr(([127, 0, 0, 1], 0).into(), 0)).await?;
    let admin = bind(&format!("{what} (admin)"), ([127, 0, 0, 1], 0).into()).await?;
    let inbound = inbound_listener.local_addr()?;
    let sidecar =
        Arc::new(Sidecar::start(settings, client, metrics.http_server(), shutdown.clone()).await?);
    sidecar
        .outbound
        .current()
        .register_upstream_metrics(metrics.registry_mut());
    tracing::info!(
        event = "mesh.sidecar_serving",
        app = %app_instance,
        outbound = %mesh.outbound.addr,
        %inbound,
        app_addr = %mesh.app.addr,
        "sidecar serving"
    );
    let mut tasks = announce_as(
        launch,
        mesh_service_name(app_role.name()),
        app_instance,
        inbound,
        admin,
        metrics,
        &shutdown,
    )
    .await?;
    tasks.push(sidecar.follow_configuration(shutdown.clone()));
    let (outbound_side, inbound_side) = (sidecar.clone(), sidecar);
    let outbound_shutdown = shutdown.clone();
    tasks.push(tokio::spawn(async move {
        serve_outbound(&outbound_side, outbound_listener, outbound_shutdown, DRAIN).await;
    }));
    tasks.push(tokio::spawn(async move {
        serve_inbound(&inbound_side, inbound_listener, shutdown, DRAIN).await;
    }));
    Ok(tasks)
}
