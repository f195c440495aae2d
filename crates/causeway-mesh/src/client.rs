//! The sidecar's side of identity: a key pair made where it is used, a CSR for it, and the
//! `Certify` call that turns the CSR into a workload certificate.

use std::time::Duration;

use causeway_proto::mesh::v1 as pb;
use pb::mesh_control_client::MeshControlClient;
use rcgen::{CertificateParams, KeyPair};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot make a key or CSR: {0}")]
    Key(#[from] rcgen::Error),
    #[error("cannot reach the control plane at {addr}: {message}")]
    Connect { addr: String, message: String },
    #[error("the control plane refused: {0}")]
    Refused(#[from] tonic::Status),
}

/// A workload's private key; it never leaves the process that made it.
pub struct WorkloadKey {
    key: KeyPair,
}

impl WorkloadKey {
    pub fn generate() -> Result<Self, ClientError> {
        Ok(Self {
            key: KeyPair::generate()?,
        })
    }

    pub fn private_key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// A CSR for this key; the control plane decides the names.
    pub fn csr_der(&self) -> Result<Vec<u8>, ClientError> {
        Ok(CertificateParams::default()
            .serialize_request(&self.key)?
            .der()
            .to_vec())
    }
}

/// How to reach the control plane.
#[derive(Clone, Debug)]
pub struct ControlPlaneTarget {
    pub addr: std::net::SocketAddr,
    /// The name its certificate carries.
    pub server_name: String,
    /// The root it is verified against (PEM).
    pub ca_pem: String,
    pub timeout: Duration,
}

/// How the caller proves who it is.
pub enum Proof<'a> {
    BootstrapToken(&'a str),
    /// The current certificate chain and its key (PEM), for a renewal.
    Certificate {
        chain_pem: &'a str,
        key_pem: &'a str,
    },
}

/// A channel to the control plane, presenting `identity` (chain and key PEM) when given.
pub(crate) async fn channel(
    target: &ControlPlaneTarget,
    identity: Option<(&str, &str)>,
) -> Result<Channel, ClientError> {
    let connect_error = |message: String| ClientError::Connect {
        addr: target.addr.to_string(),
        message,
    };
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&target.ca_pem))
        .domain_name(target.server_name.clone());
    if let Some((chain_pem, key_pem)) = identity {
        tls = tls.identity(Identity::from_pem(chain_pem, key_pem));
    }
    Endpoint::from_shared(format!("https://{}", target.addr))
        .map_err(|err| connect_error(err.to_string()))?
        .connect_timeout(target.timeout)
        .tls_config(tls)
        .map_err(|err| connect_error(err.to_string()))?
        .connect()
        .await
        .map_err(|err| connect_error(err.to_string()))
}

/// Asks the control plane to certify `key`.
pub async fn certify(
    target: &ControlPlaneTarget,
    key: &WorkloadKey,
    proof: Proof<'_>,
    lifetime: Option<Duration>,
) -> Result<pb::CertifyResponse, ClientError> {
    let (token, identity) = match proof {
        Proof::BootstrapToken(token) => (token.to_string(), None),
        Proof::Certificate { chain_pem, key_pem } => (String::new(), Some((chain_pem, key_pem))),
    };
    let mut request = tonic::Request::new(pb::CertifyRequest {
        csr_der: key.csr_der()?,
        bootstrap_token: token,
        lifetime_seconds: lifetime.map(|l| l.as_secs()).unwrap_or(0),
    });
    request.set_timeout(target.timeout);
    let response = MeshControlClient::new(channel(target, identity).await?)
        .certify(request)
        .await?;
    Ok(response.into_inner())
}

/// What each sidecar has acknowledged, as the control plane books it (`causeway mesh policy`).
pub async fn sidecars(target: &ControlPlaneTarget) -> Result<pb::SidecarsResponse, ClientError> {
    let mut request = tonic::Request::new(pb::SidecarsRequest {});
    request.set_timeout(target.timeout);
    Ok(MeshControlClient::new(channel(target, None).await?)
        .sidecars(request)
        .await?
        .into_inner())
}

/// The certificate a sidecar presents now, with its key.
#[derive(Clone)]
pub struct Held {
    pub certificate: pb::CertifyResponse,
    pub key_pem: String,
}

/// A sidecar's identity kept fresh: the first certificate by bootstrap token, then renewals
/// (a new key each time, proved by the current certificate) when two thirds of its lifetime
/// have passed, retried with backoff while the control plane is unreachable. Static stability:
/// while renewal fails, the current certificate keeps serving until it expires.
pub struct IdentityAgent {
    pub identity: std::sync::Arc<crate::tls::RotatingIdentity>,
    current: tokio::sync::watch::Receiver<Held>,
}

impl IdentityAgent {
    /// Obtains the first certificate (failing if the token is refused: a sidecar without an
    /// identity must not start) and starts renewing in the background until `shutdown`.
    pub async fn start(
        target: ControlPlaneTarget,
        token: &str,
        lifetime: Option<Duration>,
        mut shutdown: causeway_core::serve::Shutdown,
    ) -> Result<Self, AgentError> {
        let key = WorkloadKey::generate()?;
        let first = certify(&target, &key, Proof::BootstrapToken(token), lifetime).await?;
        let identity = crate::tls::RotatingIdentity::new(&first.chain_pem, &key.private_key_pem())?;
        let (publish, current) = tokio::sync::watch::channel(Held {
            certificate: first,
            key_pem: key.private_key_pem(),
        });
        let rotating = identity.clone();
        tokio::spawn(async move {
            let mut backoff = Duration::from_millis(100);
            loop {
                let (chain_pem, key_pem, not_after) = {
                    let now = publish.borrow();
                    (
                        now.certificate.chain_pem.clone(),
                        now.key_pem.clone(),
                        now.certificate.not_after_unix_seconds,
                    )
                };
                let wait = renewal_delay(not_after, lifetime);
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = shutdown.wait() => return,
                }
                let next_key = match WorkloadKey::generate() {
                    Ok(key) => key,
                    Err(err) => {
                        tracing::error!(error = %err, "cannot make a key for renewal");
                        continue;
                    }
                };
                let proof = Proof::Certificate {
                    chain_pem: &chain_pem,
                    key_pem: &key_pem,
                };
                match certify(&target, &next_key, proof, lifetime).await {
                    Ok(renewed) => match rotating
                        .rotate(&renewed.chain_pem, &next_key.private_key_pem())
                    {
                        Ok(()) => {
                            tracing::info!(
                                event = "mesh.identity_rotated",
                                spiffe_id = renewed.spiffe_id,
                                serial = renewed.serial,
                                "workload certificate renewed"
                            );
                            backoff = Duration::from_millis(100);
                            let _ = publish.send(Held {
                                certificate: renewed,
                                key_pem: next_key.private_key_pem(),
                            });
                        }
                        Err(err) => tracing::error!(error = %err, "renewed certificate unusable"),
                    },
                    Err(err) => {
                        tracing::warn!(
                            event = "mesh.renewal_failed",
                            error = %err,
                            retry_in_ms = backoff.as_millis() as u64,
                            "certificate renewal failed; the current certificate keeps serving"
                        );
                        tokio::select! {
                            _ = tokio::time::sleep(backoff) => {}
                            _ = shutdown.wait() => return,
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(10));
                    }
                }
            }
        });
        Ok(Self { identity, current })
    }

    /// The certificate now presented (serial, expiry, SPIFFE ID).
    pub fn current(&self) -> pb::CertifyResponse {
        self.current.borrow().certificate.clone()
    }

    /// The certificate and its key, for a connection that must present them (the `Watch`).
    pub fn held(&self) -> tokio::sync::watch::Receiver<Held> {
        self.current.clone()
    }

    /// Resolves when a renewal has been swapped in.
    pub async fn rotated(&mut self) -> bool {
        self.current.changed().await.is_ok()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Certify(#[from] ClientError),
    #[error(transparent)]
    Tls(#[from] crate::tls::MeshTlsError),
}

impl From<rcgen::Error> for AgentError {
    fn from(err: rcgen::Error) -> Self {
        Self::Certify(ClientError::Key(err))
    }
}

/// When to renew a certificate that expires at `not_after` (Unix seconds): at two thirds of the
/// lifetime, counted from now when the lifetime is not known.
fn renewal_delay(not_after: u64, lifetime: Option<Duration>) -> Duration {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs_f64())
        .unwrap_or_default();
    let left = (not_after as f64 - now).max(0.0);
    let lifetime = lifetime
        .map(|l| l.as_secs_f64())
        .unwrap_or(left)
        .min(left.max(0.0));
    // Renew once a third of the lifetime is left, leaving time to retry before expiry.
    Duration::from_secs_f64((left - lifetime / 3.0).max(0.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_comes_at_two_thirds_of_the_lifetime() {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs();
        let delay = renewal_delay(now + 30, Some(Duration::from_secs(30)));
        assert!(
            delay >= Duration::from_secs(18) && delay <= Duration::from_secs(21),
            "{delay:?}"
        );
        assert_eq!(renewal_delay(now - 5, None), Duration::ZERO);
    }
}
