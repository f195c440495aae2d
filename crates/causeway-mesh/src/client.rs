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

/// Asks the control plane to certify `key`.
pub async fn certify(
    target: &ControlPlaneTarget,
    key: &WorkloadKey,
    proof: Proof<'_>,
    lifetime: Option<Duration>,
) -> Result<pb::CertifyResponse, ClientError> {
    let connect_error = |message: String| ClientError::Connect {
        addr: target.addr.to_string(),
        message,
    };
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&target.ca_pem))
        .domain_name(target.server_name.clone());
    let token = match proof {
        Proof::BootstrapToken(token) => token.to_string(),
        Proof::Certificate { chain_pem, key_pem } => {
            tls = tls.identity(Identity::from_pem(chain_pem, key_pem));
            String::new()
        }
    };
    let channel: Channel = Endpoint::from_shared(format!("https://{}", target.addr))
        .map_err(|err| connect_error(err.to_string()))?
        .connect_timeout(target.timeout)
        .timeout(target.timeout)
        .tls_config(tls)
        .map_err(|err| connect_error(err.to_string()))?
        .connect()
        .await
        .map_err(|err| connect_error(err.to_string()))?;
    let response = MeshControlClient::new(channel)
        .certify(pb::CertifyRequest {
            csr_der: key.csr_der()?,
            bootstrap_token: token,
            lifetime_seconds: lifetime.map(|l| l.as_secs()).unwrap_or(0),
        })
        .await?;
    Ok(response.into_inner())
}
