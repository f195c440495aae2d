//! The control plane's gRPC server (`causeway.mesh.v1.MeshControl`), over TLS that asks for a
//! client certificate without requiring one: a sidecar's first call has only its bootstrap
//! token, later ones present the mesh certificate they renew. `Watch` streams the mesh's
//! configuration from a [`ConfigFeed`] to every sidecar and books their acknowledgements.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, UNIX_EPOCH};

use causeway_core::serve::{KeepAlive, Peer, serve_http2_with_peer, shutdown_channel};
use causeway_core::tls::{CertPaths, ClientAuth};
use causeway_proto::mesh::v1 as pb;
use hyper_util::service::TowerToHyperService;
use pb::mesh_control_server::{MeshControl, MeshControlServer};
use rustls::pki_types::CertificateDer;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tonic::service::Routes;
use tonic::{Request, Response, Status, Streaming};

use crate::authority::MeshAuthority;
use crate::bootstrap::TokenVerifier;
use crate::spiffe::SpiffeId;

const DRAIN: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot build the control plane's TLS configuration: {0}")]
    Tls(#[from] causeway_core::tls::TlsError),
    #[error("cannot read the mesh issuer certificate: {0}")]
    Issuer(String),
}

/// What the control plane issues with.
pub struct ControlPlane {
    pub authority: MeshAuthority,
    pub tokens: TokenVerifier,
    /// The roots sidecars trust (PEM).
    pub trust_anchors_pem: String,
    pub trust_domain: String,
    pub default_lifetime: Duration,
    /// What `Watch` streams.
    pub config: tokio::sync::watch::Receiver<Arc<pb::MeshConfig>>,
}

/// The configuration the control plane serves, versioned: a new version only when something
/// changed, so that a sidecar's acknowledged version says whether it has converged.
pub struct ConfigFeed {
    sender: tokio::sync::watch::Sender<Arc<pb::MeshConfig>>,
}

impl Default for ConfigFeed {
    fn default() -> Self {
        Self {
            sender: tokio::sync::watch::Sender::new(Arc::new(pb::MeshConfig::default())),
        }
    }
}

impl ConfigFeed {
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<Arc<pb::MeshConfig>> {
        self.sender.subscribe()
    }

    /// Serves `policy_yaml` (already checked) and `destinations` (sorted, so that the same
    /// state is the same version); returns the new version, or None if nothing changed.
    pub fn publish(
        &self,
        policy_file: &str,
        policy_yaml: &str,
        mut destinations: Vec<pb::Destination>,
    ) -> Option<u64> {
        destinations.sort_by(|a, b| a.service.cmp(&b.service));
        for destination in &mut destinations {
            destination
                .endpoints
                .sort_by(|a, b| a.instance.cmp(&b.instance));
        }
        let mut published = None;
        self.sender.send_if_modified(|current| {
            let same = current.policy_file == policy_file
                && current.policy_yaml == policy_yaml
                && current.destinations == destinations;
            if same {
                return false;
            }
            let version = current.version + 1;
            *current = Arc::new(pb::MeshConfig {
                version,
                policy_file: policy_file.to_string(),
                policy_yaml: policy_yaml.to_string(),
                destinations: std::mem::take(&mut destinations),
            });
            published = Some(version);
            true
        });
        published
    }

    pub fn version(&self) -> u64 {
        self.sender.borrow().version
    }
}

/// What each sidecar has acknowledged, by instance.
#[derive(Default)]
struct SidecarBook {
    entries: Mutex<BTreeMap<String, BookEntry>>,
}

struct BookEntry {
    spiffe_id: String,
    applied_version: u64,
    last_error: String,
    /// Open `Watch` streams of this instance (a reconnect may overlap the old stream's end).
    streams: u32,
    last_seen: Instant,
}

impl SidecarBook {
    fn with_entry(
        &self,
        instance: &str,
        spiffe_id: &SpiffeId,
        update: impl FnOnce(&mut BookEntry),
    ) {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let entry = entries
            .entry(instance.to_string())
            .or_insert_with(|| BookEntry {
                spiffe_id: spiffe_id.to_string(),
                applied_version: 0,
                last_error: String::new(),
                streams: 0,
                last_seen: Instant::now(),
            });
        entry.spiffe_id = spiffe_id.to_string();
        entry.last_seen = Instant::now();
        update(entry);
    }

    fn listing(&self) -> Vec<pb::SidecarStatus> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries
            .iter()
            .map(|(instance, entry)| pb::SidecarStatus {
                instance: instance.clone(),
                spiffe_id: entry.spiffe_id.clone(),
                applied_version: entry.applied_version,
                last_error: entry.last_error.clone(),
                connected: entry.streams > 0,
                last_seen_seconds_ago: entry.last_seen.elapsed().as_secs(),
            })
            .collect()
    }
}

/// Serves the control plane on `listener` until `shutdown` resolves. `certs` is the control
/// plane's own server certificate; clients are verified against the root in `ca_path`.
pub async fn serve(
    control_plane: ControlPlane,
    listener: TcpListener,
    certs: &CertPaths,
    ca_path: &std::path::Path,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let tls = TlsAcceptor::from(causeway_core::tls::mutual_server_config(
        certs,
        ca_path,
        ClientAuth::Optional,
        &[b"h2"],
    )?);
    let issuer_der = rustls_pemfile::certs(&mut control_plane.authority.issuer_pem().as_bytes())
        .next()
        .and_then(Result::ok)
        .ok_or_else(|| ServerError::Issuer("no certificate in the issuer PEM".into()))?;
    let shared = Arc::new(Shared {
        control_plane,
        issuer_der,
        book: SidecarBook::default(),
    });
    let (stop, stopped) = shutdown_channel();
    let signal = async move {
        shutdown.await;
        stop.fire();
    };
    let addr = listener.local_addr().ok();
    tracing::info!(event = "mesh.control_plane.listening", addr = ?addr, "mesh control plane listening (TLS, HTTP/2)");
    let server = serve_http2_with_peer(
        listener,
        Some(tls),
        move |peer: &Peer| {
            let service = Service {
                shared: shared.clone(),
                caller: shared.mesh_identity(peer),
                peer: peer.addr,
            };
            TowerToHyperService::new(Routes::new(MeshControlServer::new(service)).prepare())
        },
        stopped,
        DRAIN,
        KeepAlive::default(),
    );
    tokio::join!(signal, server);
    Ok(())
}

struct Shared {
    control_plane: ControlPlane,
    issuer_der: CertificateDer<'static>,
    book: SidecarBook,
}

impl Shared {
    /// The mesh identity a connection's verified client certificate carries: only a certificate
    /// the mesh issuer signed counts (the root also signs the services' plain TLS certificates).
    fn mesh_identity(&self, peer: &Peer) -> Option<SpiffeId> {
        match peer.certificates.as_slice() {
            [leaf, issuer, ..] if *issuer == self.issuer_der => {
                SpiffeId::from_certificate(leaf).ok()
            }
            _ => None,
        }
    }
}

struct Service {
    shared: Arc<Shared>,
    /// The identity of the mesh certificate this connection was opened with, if any.
    caller: Option<SpiffeId>,
    peer: std::net::SocketAddr,
}

impl Service {
    fn refuse(&self, status: Status) -> Status {
        tracing::warn!(
            event = "mesh.certify_refused",
            peer = %self.peer,
            code = ?status.code(),
            reason = status.message(),
            "certificate request refused"
        );
        status
    }
}

type ConfigStream =
    Pin<Box<dyn futures_util::Stream<Item = Result<pb::MeshConfig, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl MeshControl for Service {
    type WatchStream = ConfigStream;

    async fn watch(
        &self,
        request: Request<Streaming<pb::WatchRequest>>,
    ) -> Result<Response<ConfigStream>, Status> {
        let Some(identity) = self.caller.clone() else {
            return Err(self.refuse(Status::unauthenticated(
                "Watch needs a mesh certificate: connect with the certificate Certify issued",
            )));
        };
        let mut acks = request.into_inner();
        let first = acks
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("the stream ended before its first message"))?;
        if !causeway_core::registry_api::is_dns_label(&first.instance) {
            return Err(self.refuse(Status::invalid_argument(format!(
                "instance {:?} is not a DNS label",
                first.instance
            ))));
        }
        let instance = first.instance;
        let shared = self.shared.clone();
        let peer = self.peer;
        shared
            .book
            .with_entry(&instance, &identity, |entry| entry.streams += 1);
        tracing::info!(event = "mesh.watch_opened", %instance, spiffe_id = %identity, %peer, "sidecar watching");
        let mut config = shared.control_plane.config.clone();
        let (send, receive) = tokio::sync::mpsc::channel::<Result<pb::MeshConfig, Status>>(2);
        tokio::spawn(async move {
            let mut pending = Some(config.borrow_and_update().clone());
            loop {
                if let Some(next) = pending.take()
                    && send.send(Ok((*next).clone())).await.is_err()
                {
                    break;
                }
                tokio::select! {
                    changed = config.changed() => match changed {
                        Ok(()) => pending = Some(config.borrow_and_update().clone()),
                        Err(_) => break,
                    },
                    ack = acks.message() => match ack {
                        Ok(Some(ack)) => {
                            shared.book.with_entry(&instance, &identity, |entry| {
                                if ack.error.is_empty() {
                                    entry.applied_version = ack.version;
                                    entry.last_error.clear();
                                } else {
                                    entry.last_error = ack.error.clone();
                                }
                            });
                            if ack.error.is_empty() {
                                tracing::debug!(event = "mesh.config_acked", %instance, version = ack.version, "sidecar applied configuration");
                            } else {
                                tracing::warn!(event = "mesh.config_refused", %instance, version = ack.version, error = ack.error, "sidecar refused configuration");
                            }
                        }
                        Ok(None) | Err(_) => break,
                    },
                }
            }
            shared.book.with_entry(&instance, &identity, |entry| {
                entry.streams = entry.streams.saturating_sub(1)
            });
            tracing::info!(event = "mesh.watch_closed", %instance, %peer, "sidecar stopped watching");
        });
        let stream = futures_util::stream::unfold(receive, |mut receive| async move {
            receive.recv().await.map(|item| (item, receive))
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn sidecars(
        &self,
        _request: Request<pb::SidecarsRequest>,
    ) -> Result<Response<pb::SidecarsResponse>, Status> {
        let (current_version, destinations) = {
            let config = self.shared.control_plane.config.borrow();
            (config.version, config.destinations.clone())
        };
        Ok(Response::new(pb::SidecarsResponse {
            current_version,
            sidecars: self.shared.book.listing(),
            destinations,
        }))
    }

    async fn certify(
        &self,
        request: Request<pb::CertifyRequest>,
    ) -> Result<Response<pb::CertifyResponse>, Status> {
        let request = request.into_inner();
        let control_plane = &self.shared.control_plane;
        let (identity, instance, how) = match &self.caller {
            Some(identity) => (identity.clone(), String::new(), "renewal"),
            None if request.bootstrap_token.is_empty() => {
                return Err(self.refuse(Status::unauthenticated(
                    "no bootstrap token and no mesh certificate: a first certificate needs the token `causeway up` gave this sidecar",
                )));
            }
            None => {
                let bootstrap = control_plane
                    .tokens
                    .verify(&request.bootstrap_token)
                    .map_err(|err| self.refuse(Status::unauthenticated(err.to_string())))?;
                (bootstrap.identity, bootstrap.instance, "bootstrap token")
            }
        };
        if identity.trust_domain() != control_plane.trust_domain {
            return Err(self.refuse(Status::permission_denied(format!(
                "{identity} is not in this mesh's trust domain {}",
                control_plane.trust_domain
            ))));
        }
        let lifetime = match request.lifetime_seconds {
            0 => control_plane.default_lifetime,
            seconds => Duration::from_secs(seconds),
        };
        let issued = control_plane
            .authority
            .certify(&request.csr_der, &identity, lifetime)
            .map_err(|err| self.refuse(Status::invalid_argument(err.to_string())))?;
        let not_after = issued
            .not_after
            .duration_since(UNIX_EPOCH)
            .map(|elapsed| elapsed.as_secs())
            .unwrap_or_default();
        tracing::info!(
            event = "mesh.certified",
            spiffe_id = %identity,
            instance,
            serial = issued.serial,
            lifetime_s = lifetime.as_secs(),
            how,
            peer = %self.peer,
            "workload certificate issued"
        );
        Ok(Response::new(pb::CertifyResponse {
            chain_pem: issued.chain_pem,
            spiffe_id: identity.to_string(),
            serial: issued.serial,
            not_after_unix_seconds: not_after,
            trust_anchors_pem: control_plane.trust_anchors_pem.clone(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use causeway_core::tls::LocalCa;

    use super::*;
    use crate::bootstrap::BootstrapKey;
    use crate::client::{
        AgentError, ClientError, ControlPlaneTarget, IdentityAgent, Proof, WorkloadKey, certify,
    };

    const SERVER_NAME: &str = "mesh-control-plane.internal";

    fn refused_with(
        result: Result<pb::CertifyResponse, ClientError>,
        code: tonic::Code,
        text: &str,
    ) {
        match result {
            Err(ClientError::Refused(status)) => {
                assert_eq!(status.code(), code, "{status:?}");
                assert!(
                    status.message().contains(text),
                    "{status:?} should say {text:?}"
                );
            }
            other => panic!("expected a refusal saying {text:?}, got {other:?}"),
        }
    }

    struct RunningControlPlane {
        dir: std::path::PathBuf,
        root: LocalCa,
        ca_pem: String,
        key: BootstrapKey,
        target: ControlPlaneTarget,
        stop: Option<tokio::sync::oneshot::Sender<()>>,
        server: Option<tokio::task::JoinHandle<Result<(), ServerError>>>,
    }

    impl RunningControlPlane {
        async fn start(name: &str, default_lifetime: Duration) -> Self {
            let dir = std::env::temp_dir().join(format!(
                "causeway-mesh-server-{name}-{}",
                std::process::id()
            ));
            let _ = std::fs::remove_dir_all(&dir);
            let root = LocalCa::load_or_create(&dir).expect("root");
            let server_certs = root
                .issue("mesh-control-plane", &[SERVER_NAME.to_string()])
                .expect("server cert");
            let ca_pem = std::fs::read_to_string(root.ca_cert_path()).expect("ca");
            let key = BootstrapKey::generate();
            let control_plane = ControlPlane {
                authority: MeshAuthority::load_or_create(&dir).expect("authority"),
                tokens: TokenVerifier::new(&key, None),
                trust_anchors_pem: ca_pem.clone(),
                trust_domain: "causeway.local".into(),
                default_lifetime,
                config: ConfigFeed::default().subscribe(),
            };
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let target = ControlPlaneTarget {
                addr: listener.local_addr().expect("addr"),
                server_name: SERVER_NAME.into(),
                ca_pem: ca_pem.clone(),
                timeout: Duration::from_secs(5),
            };
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let ca_path = root.ca_cert_path();
            let server = tokio::spawn(async move {
                serve(control_plane, listener, &server_certs, &ca_path, async {
                    let _ = stopped.await;
                })
                .await
            });
            Self {
                dir,
                root,
                ca_pem,
                key,
                target,
                stop: Some(stop),
                server: Some(server),
            }
        }

        async fn stop(&mut self) {
            if let Some(stop) = self.stop.take() {
                let _ = stop.send(());
            }
            if let Some(server) = self.server.take() {
                server.await.expect("joined").expect("served");
            }
        }
    }

    impl Drop for RunningControlPlane {
        fn drop(&mut self) {
            if let Some(server) = &self.server {
                server.abort();
            }
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    #[tokio::test]
    async fn sidecars_get_certificates_by_token_once_and_renew_with_their_certificate() {
        let mut running = RunningControlPlane::start("certify", Duration::from_secs(3600)).await;
        let (target, key, ca_pem) = (running.target.clone(), &running.key, running.ca_pem.clone());
        let plain_certs = running
            .root
            .issue("order-service", &["order-service.internal".to_string()])
            .expect("a service's plain TLS cert");
        let payment = SpiffeId::new("causeway.local", "default", "payment-service").expect("id");
        let token = key.mint(&payment, "payment-service-1", Duration::from_secs(60));
        let workload = WorkloadKey::generate().expect("key");
        let first = certify(&target, &workload, Proof::BootstrapToken(&token), None)
            .await
            .expect("first certificate");
        assert_eq!(first.spiffe_id, payment.to_string());
        assert_eq!(first.trust_anchors_pem, ca_pem);
        let first_leaf = rustls_pemfile::certs(&mut first.chain_pem.as_bytes())
            .next()
            .expect("leaf")
            .expect("pem");
        assert_eq!(SpiffeId::from_certificate(&first_leaf), Ok(payment.clone()));

        // The same token again (another process replaying it), a forged one, and none at all.
        let thief = WorkloadKey::generate().expect("key");
        refused_with(
            certify(&target, &thief, Proof::BootstrapToken(&token), None).await,
            tonic::Code::Unauthenticated,
            "used before",
        );
        let forged = BootstrapKey::generate().mint(&payment, "x", Duration::from_secs(60));
        refused_with(
            certify(&target, &thief, Proof::BootstrapToken(&forged), None).await,
            tonic::Code::Unauthenticated,
            "signature",
        );
        refused_with(
            certify(&target, &thief, Proof::BootstrapToken(""), None).await,
            tonic::Code::Unauthenticated,
            "no bootstrap token",
        );
        // A certificate the root signed that is not a mesh identity proves nothing.
        let plain_chain = std::fs::read_to_string(&plain_certs.cert).expect("cert");
        let plain_key = std::fs::read_to_string(&plain_certs.key).expect("key");
        refused_with(
            certify(
                &target,
                &thief,
                Proof::Certificate {
                    chain_pem: &plain_chain,
                    key_pem: &plain_key,
                },
                None,
            )
            .await,
            tonic::Code::Unauthenticated,
            "no bootstrap token",
        );

        // Renewal: a new key, proved by the current certificate, no token; a new serial.
        let renewed_key = WorkloadKey::generate().expect("key");
        let renewed = certify(
            &target,
            &renewed_key,
            Proof::Certificate {
                chain_pem: &first.chain_pem,
                key_pem: &workload.private_key_pem(),
            },
            Some(Duration::from_secs(5)),
        )
        .await
        .expect("renewal");
        assert_eq!(renewed.spiffe_id, payment.to_string());
        assert_ne!(renewed.serial, first.serial);
        let now = std::time::SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock")
            .as_secs();
        assert!(renewed.not_after_unix_seconds <= now + 6, "{renewed:?}");
        assert!(first.not_after_unix_seconds >= now + 3500, "{first:?}");

        running.stop().await;
    }

    #[tokio::test]
    async fn an_identity_agent_renews_before_expiry_and_keeps_serving_while_the_control_plane_is_down()
     {
        let mut running = RunningControlPlane::start("agent", Duration::from_secs(3)).await;
        let payment = SpiffeId::new("causeway.local", "default", "payment-service").expect("id");
        let token = running
            .key
            .mint(&payment, "payment-service-1", Duration::from_secs(60));
        let (_trigger, shutdown) = shutdown_channel();
        let mut agent =
            IdentityAgent::start(running.target.clone(), &token, None, shutdown.clone())
                .await
                .expect("first certificate");
        let first = agent.current();
        let mut serials = vec![first.serial.clone()];
        for _ in 0..2 {
            tokio::time::timeout(Duration::from_secs(10), agent.rotated())
                .await
                .expect("renewed within the lifetime");
            let now = agent.current();
            assert_eq!(now.spiffe_id, payment.to_string());
            assert!(
                !serials.contains(&now.serial),
                "a renewal reuses {}",
                now.serial
            );
            serials.push(now.serial);
        }
        // The token was spent by the first certificate: a second agent with it gets nothing.
        assert!(matches!(
            IdentityAgent::start(running.target.clone(), &token, None, shutdown).await,
            Err(AgentError::Certify(ClientError::Refused(_)))
        ));
        // With the control plane gone, renewal fails and the current certificate stays.
        running.stop().await;
        let before = agent.current().serial;
        let outcome = tokio::time::timeout(Duration::from_secs(3), agent.rotated()).await;
        assert!(outcome.is_err(), "rotated without a control plane");
        assert_eq!(agent.current().serial, before);
    }
}
