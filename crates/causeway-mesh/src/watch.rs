//! The sidecar's side of `Watch`: the mesh's configuration as this sidecar has applied it.
//! Each version the control plane sends is checked and turned into an [`Applied`] (the policy
//! parsed, the destinations' identities and addresses read) and acknowledged; a version that
//! does not check is refused with why and the previous one stays in force. Static stability:
//! when the stream breaks, the last applied configuration keeps serving while the watcher
//! reconnects with backoff, presenting whichever certificate the identity agent holds then.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use causeway_core::serve::Shutdown;
use causeway_proto::mesh::v1 as pb;
use pb::mesh_control_client::MeshControlClient;

use crate::client::{ClientError, ControlPlaneTarget, Held};
use crate::policy::MeshPolicy;
use crate::spiffe::SpiffeId;

/// One configuration version, ready for the data path.
#[derive(Debug)]
pub struct Applied {
    pub version: u64,
    pub policy: MeshPolicy,
    /// By service name.
    pub destinations: BTreeMap<String, DestinationView>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DestinationView {
    /// What every endpoint must present.
    pub identity: SpiffeId,
    /// (instance, sidecar inbound address), in the control plane's order.
    pub endpoints: Vec<(String, SocketAddr)>,
}

impl Applied {
    /// Checks `config` the way the data path will use it.
    pub fn from_config(config: &pb::MeshConfig, trust_domain: &str) -> Result<Self, String> {
        let policy = MeshPolicy::parse(&config.policy_file, &config.policy_yaml, trust_domain)
            .map_err(|err| err.to_string())?;
        let mut destinations = BTreeMap::new();
        for destination in &config.destinations {
            let identity: SpiffeId = destination.spiffe_id.parse().map_err(|err| {
                format!(
                    "destination {}: identity {:?}: {err}",
                    destination.service, destination.spiffe_id
                )
            })?;
            let endpoints = destination
                .endpoints
                .iter()
                .map(|endpoint| {
                    endpoint
                        .addr
                        .parse()
                        .map(|addr| (endpoint.instance.clone(), addr))
                        .map_err(|_| {
                            format!(
                                "destination {}: endpoint {} has no usable address {:?}",
                                destination.service, endpoint.instance, endpoint.addr
                            )
                        })
                })
                .collect::<Result<_, _>>()?;
            destinations.insert(
                destination.service.clone(),
                DestinationView {
                    identity,
                    endpoints,
                },
            );
        }
        Ok(Self {
            version: config.version,
            policy,
            destinations,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("no configuration from the control plane within {0:?}")]
    NoConfiguration(Duration),
}

/// The configuration in force, kept up to date in the background until shutdown.
#[derive(Clone)]
pub struct ConfigWatcher {
    current: tokio::sync::watch::Receiver<Option<Arc<Applied>>>,
}

impl ConfigWatcher {
    /// Starts watching as `instance`, presenting the identity in `held`.
    pub fn start(
        target: ControlPlaneTarget,
        instance: String,
        trust_domain: String,
        held: tokio::sync::watch::Receiver<Held>,
        mut shutdown: Shutdown,
    ) -> Self {
        let (publish, current) = tokio::sync::watch::channel(None);
        tokio::spawn(async move {
            let mut backoff = Duration::from_millis(100);
            loop {
                let outcome = tokio::select! {
                    outcome = watch_once(&target, &instance, &trust_domain, &held, &publish) => outcome,
                    _ = shutdown.wait() => return,
                };
                let applied = publish.borrow().as_ref().map(|applied| applied.version);
                match outcome {
                    // A stream that delivered something was healthy: start again quickly.
                    Ok(true) => backoff = Duration::from_millis(100),
                    Ok(false) => {}
                    Err(err) => tracing::warn!(
                        event = "mesh.watch_failed",
                        error = %err,
                        applied_version = applied,
                        retry_in_ms = backoff.as_millis() as u64,
                        "lost the control plane; the last configuration keeps serving"
                    ),
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.wait() => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        });
        Self { current }
    }

    /// The configuration in force, if one has been applied.
    pub fn current(&self) -> Option<Arc<Applied>> {
        self.current.borrow().clone()
    }

    /// Waits for the first applied configuration (a sidecar is not ready before it has one).
    pub async fn first(&mut self, patience: Duration) -> Result<Arc<Applied>, WatchError> {
        let applied =
            tokio::time::timeout(patience, self.current.wait_for(|applied| applied.is_some()))
                .await
                .map_err(|_| WatchError::NoConfiguration(patience))?
                .map_err(|_| WatchError::NoConfiguration(patience))?;
        applied.clone().ok_or(WatchError::NoConfiguration(patience))
    }

    /// Resolves when another version has been applied.
    pub async fn changed(&mut self) -> bool {
        self.current.changed().await.is_ok()
    }
}

/// One `Watch` stream, until it ends; whether it delivered any configuration.
async fn watch_once(
    target: &ControlPlaneTarget,
    instance: &str,
    trust_domain: &str,
    held: &tokio::sync::watch::Receiver<Held>,
    publish: &tokio::sync::watch::Sender<Option<Arc<Applied>>>,
) -> Result<bool, ClientError> {
    let (chain_pem, key_pem) = {
        let held = held.borrow();
        (held.certificate.chain_pem.clone(), held.key_pem.clone())
    };
    let channel = crate::client::channel(target, Some((&chain_pem, &key_pem))).await?;
    let (acks, outgoing) = tokio::sync::mpsc::channel::<pb::WatchRequest>(4);
    let _ = acks
        .send(pb::WatchRequest {
            instance: instance.to_string(),
            version: 0,
            error: String::new(),
        })
        .await;
    let outgoing = futures_util::stream::unfold(outgoing, |mut outgoing| async move {
        outgoing.recv().await.map(|item| (item, outgoing))
    });
    let mut configs = MeshControlClient::new(channel)
        .watch(outgoing)
        .await?
        .into_inner();
    let mut delivered = false;
    while let Some(config) = configs.message().await? {
        delivered = true;
        let ack = match Applied::from_config(&config, trust_domain) {
            Ok(applied) => {
                tracing::info!(
                    event = "mesh.config_applied",
                    version = applied.version,
                    destinations = applied.destinations.len(),
                    "mesh configuration applied"
                );
                publish.send_replace(Some(Arc::new(applied)));
                String::new()
            }
            Err(error) => {
                tracing::error!(
                    event = "mesh.config_refused",
                    version = config.version,
                    error,
                    "mesh configuration refused; the previous one stays in force"
                );
                error
            }
        };
        let ack = pb::WatchRequest {
            instance: instance.to_string(),
            version: config.version,
            error: ack,
        };
        if acks.send(ack).await.is_err() {
            break;
        }
    }
    Ok(delivered)
}
