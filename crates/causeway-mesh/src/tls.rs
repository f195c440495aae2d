//! Mutual TLS between sidecars. A sidecar's outbound side verifies that the peer's chain leads to
//! the mesh's trust anchors and that the peer's certificate carries the SPIFFE ID the control
//! plane named for the destination (not a DNS name: workload certificates have none); its
//! inbound side requires a client certificate from the mesh. Both present a
//! [`RotatingIdentity`], which a renewal swaps in place, so rotation never drops a connection.

use std::fmt;
use std::sync::{Arc, RwLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, verify_server_cert_signed_by_trust_anchor};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::{ClientHello, ParsedCertificate, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{CertificateError, DigitallySignedStruct, OtherError, RootCertStore, SignatureScheme};

use crate::spiffe::SpiffeId;

#[derive(Debug, thiserror::Error)]
pub enum MeshTlsError {
    #[error("the certificate or key PEM is not usable: {0}")]
    Pem(String),
    #[error("invalid TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    #[error("the peer is {found}, not {expected} as the control plane named for this destination")]
    WrongPeer { expected: SpiffeId, found: String },
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The mesh's trust anchors from PEM (one or more roots: old and new during a rotation).
pub fn trust_anchors(pem: &str) -> Result<Arc<RootCertStore>, MeshTlsError> {
    let mut roots = RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut pem.as_bytes()) {
        let cert = cert.map_err(|err| MeshTlsError::Pem(err.to_string()))?;
        roots.add(cert)?;
    }
    if roots.is_empty() {
        return Err(MeshTlsError::Pem("no trust anchor in the PEM".into()));
    }
    Ok(Arc::new(roots))
}

/// This workload's certificate chain and key, replaced in place by a renewal: handshakes that
/// start afterwards present the new certificate, connections already open keep theirs.
pub struct RotatingIdentity {
    current: RwLock<Arc<CertifiedKey>>,
}

impl fmt::Debug for RotatingIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RotatingIdentity(..)")
    }
}

fn certified_key(chain_pem: &str, key_pem: &str) -> Result<Arc<CertifiedKey>, MeshTlsError> {
    let chain = rustls_pemfile::certs(&mut chain_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| MeshTlsError::Pem(err.to_string()))?;
    if chain.is_empty() {
        return Err(MeshTlsError::Pem("no certificate in the chain PEM".into()));
    }
    let key = rustls_pemfile::private_key(&mut key_pem.as_bytes())
        .map_err(|err| MeshTlsError::Pem(err.to_string()))?
        .ok_or_else(|| MeshTlsError::Pem("no private key in the key PEM".into()))?;
    Ok(Arc::new(CertifiedKey::from_der(chain, key, &provider())?))
}

impl RotatingIdentity {
    pub fn new(chain_pem: &str, key_pem: &str) -> Result<Arc<Self>, MeshTlsError> {
        Ok(Arc::new(Self {
            current: RwLock::new(certified_key(chain_pem, key_pem)?),
        }))
    }

    /// Swaps in a renewed certificate; a chain that does not match its key is refused and the
    /// current one stays.
    pub fn rotate(&self, chain_pem: &str, key_pem: &str) -> Result<(), MeshTlsError> {
        let renewed = certified_key(chain_pem, key_pem)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = renewed;
        Ok(())
    }

    fn get(&self) -> Arc<CertifiedKey> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl ResolvesServerCert for RotatingIdentity {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.get())
    }
}

impl ResolvesClientCert for RotatingIdentity {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.get())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Verifies a server by its SPIFFE ID after verifying its chain to the mesh's anchors.
#[derive(Debug)]
struct SpiffeServerVerifier {
    roots: Arc<RootCertStore>,
    expected: SpiffeId,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        let found = SpiffeId::from_certificate(end_entity);
        if found.as_ref() == Ok(&self.expected) {
            return Ok(ServerCertVerified::assertion());
        }
        let error = MeshTlsError::WrongPeer {
            expected: self.expected.clone(),
            found: match found {
                Ok(id) => id.to_string(),
                Err(err) => err.to_string(),
            },
        };
        Err(rustls::Error::InvalidCertificate(CertificateError::Other(
            OtherError(Arc::new(error)),
        )))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The outbound side's configuration for one destination: present `identity`, accept only a
/// peer that is `expected`. HTTP/2 only: one multiplexed connection per sidecar pair.
pub fn client_config(
    identity: Arc<RotatingIdentity>,
    roots: Arc<RootCertStore>,
    expected: SpiffeId,
) -> Result<Arc<rustls::ClientConfig>, MeshTlsError> {
    let provider = provider();
    let verifier = Arc::new(SpiffeServerVerifier {
        roots,
        expected,
        provider: provider.clone(),
    });
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(identity);
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// The inbound side's configuration: present `identity`, require a client certificate that
/// chains to the mesh's anchors. Who the client is, and whether it may call, is decided per
/// request from its certificate by the authorization policy.
pub fn server_config(
    identity: Arc<RotatingIdentity>,
    roots: Arc<RootCertStore>,
) -> Result<Arc<rustls::ServerConfig>, MeshTlsError> {
    let provider = provider();
    let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
        .build()
        .map_err(|err| MeshTlsError::Config(rustls::Error::General(err.to_string())))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(identity);
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio_rustls::{TlsAcceptor, TlsConnector};

    use super::*;
    use crate::authority::MeshAuthority;
    use crate::client::WorkloadKey;

    struct Mesh {
        dir: std::path::PathBuf,
        authority: MeshAuthority,
        roots: Arc<RootCertStore>,
    }

    impl Mesh {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir()
                .join(format!("causeway-mesh-tls-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            let authority = MeshAuthority::load_or_create(&dir).expect("authority");
            let roots = trust_anchors(&std::fs::read_to_string(dir.join("ca.pem")).expect("ca"))
                .expect("roots");
            Self {
                dir,
                authority,
                roots,
            }
        }

        fn identity(&self, service: &str) -> (Arc<RotatingIdentity>, String) {
            let id = SpiffeId::new("causeway.local", "default", service).expect("id");
            let key = WorkloadKey::generate().expect("key");
            let issued = self
                .authority
                .certify(&key.csr_der().expect("csr"), &id, Duration::from_secs(60))
                .expect("issued");
            let identity =
                RotatingIdentity::new(&issued.chain_pem, &key.private_key_pem()).expect("identity");
            (identity, issued.serial)
        }
    }

    impl Drop for Mesh {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    /// One handshake and an echoed byte; the server's view of the client's SPIFFE ID.
    async fn handshake(
        server: Arc<rustls::ServerConfig>,
        client: Arc<rustls::ClientConfig>,
    ) -> (Result<(), String>, Result<String, String>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let accept = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.map_err(|e| e.to_string())?;
            let mut tls = TlsAcceptor::from(server)
                .accept(stream)
                .await
                .map_err(|e| e.to_string())?;
            let peer = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|chain| chain.first().cloned())
                .ok_or("no client certificate")?;
            let mut byte = [0u8; 1];
            tls.read_exact(&mut byte).await.map_err(|e| e.to_string())?;
            tls.write_all(&byte).await.map_err(|e| e.to_string())?;
            SpiffeId::from_certificate(&peer)
                .map(|id| id.to_string())
                .map_err(|e| e.to_string())
        });
        let client_side = async {
            let stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
            let name = ServerName::try_from("order-service.mesh").expect("name");
            let mut tls = TlsConnector::from(client)
                .connect(name, stream)
                .await
                .map_err(|e| e.to_string())?;
            tls.write_all(b"x").await.map_err(|e| e.to_string())?;
            let mut byte = [0u8; 1];
            tls.read_exact(&mut byte).await.map_err(|e| e.to_string())?;
            Ok(())
        }
        .await;
        let server_side = tokio::time::timeout(Duration::from_secs(5), accept)
            .await
            .map_err(|_| "server timed out".to_string())
            .and_then(|joined| joined.map_err(|e| e.to_string()))
            .and_then(|result| result);
        (client_side, server_side)
    }

    #[tokio::test]
    async fn sidecars_verify_each_other_by_spiffe_id() {
        let mesh = Mesh::new("verify");
        let (order, _) = mesh.identity("order-service");
        let (payment, _) = mesh.identity("payment-service");
        let server = server_config(order.clone(), mesh.roots.clone()).expect("server");
        let expect =
            |service: &str| SpiffeId::new("causeway.local", "default", service).expect("id");

        let client = client_config(payment.clone(), mesh.roots.clone(), expect("order-service"))
            .expect("client");
        let (client_side, server_side) = handshake(server.clone(), client).await;
        assert_eq!(client_side, Ok(()));
        assert_eq!(
            server_side,
            Ok("spiffe://causeway.local/ns/default/sa/payment-service".to_string())
        );

        // The control plane said the destination is Pricing: Order's certificate is refused.
        let wrong = client_config(
            payment.clone(),
            mesh.roots.clone(),
            expect("pricing-service"),
        )
        .expect("client");
        let (client_side, _) = handshake(server.clone(), wrong).await;
        let error = client_side.expect_err("wrong peer accepted");
        assert!(
            error.contains("order-service") && error.contains("pricing-service"),
            "{error}"
        );

        // A server from another CA is refused by the client; a client of another CA by the server.
        let other = Mesh::new("other");
        let (stranger, _) = other.identity("order-service");
        let foreign_server = server_config(stranger.clone(), other.roots.clone()).expect("server");
        let client = client_config(payment.clone(), mesh.roots.clone(), expect("order-service"))
            .expect("client");
        let (client_side, _) = handshake(foreign_server, client).await;
        assert!(client_side.is_err(), "a server of another CA was accepted");
        let foreign_client =
            client_config(stranger, mesh.roots.clone(), expect("order-service")).expect("client");
        let (_, server_side) = handshake(server.clone(), foreign_client).await;
        assert!(server_side.is_err(), "a client of another CA was accepted");
    }

    #[tokio::test]
    async fn a_rotated_identity_is_presented_by_the_next_handshake() {
        let mesh = Mesh::new("rotate");
        let (order, _) = mesh.identity("order-service");
        let (payment, first_serial) = mesh.identity("payment-service");
        let id = SpiffeId::new("causeway.local", "default", "payment-service").expect("id");
        let key = WorkloadKey::generate().expect("key");
        let renewed = mesh
            .authority
            .certify(&key.csr_der().expect("csr"), &id, Duration::from_secs(60))
            .expect("issued");
        assert_ne!(renewed.serial, first_serial);
        // A chain with someone else's key is refused and the current identity stays.
        let unrelated = WorkloadKey::generate().expect("key");
        assert!(
            payment
                .rotate(&renewed.chain_pem, &unrelated.private_key_pem())
                .is_err()
        );
        payment
            .rotate(&renewed.chain_pem, &key.private_key_pem())
            .expect("rotate");
        let presented = payment.get();
        let leaf = presented.cert.first().expect("leaf");
        let serial = x509_parser::parse_x509_certificate(leaf)
            .expect("parse")
            .1
            .raw_serial()
            .iter()
            .map(|byte| format!("{byte:02x}"))
            .collect::<String>();
        assert_eq!(serial, renewed.serial);
        let server = server_config(order, mesh.roots.clone()).expect("server");
        let client = client_config(
            payment,
            mesh.roots.clone(),
            SpiffeId::new("causeway.local", "default", "order-service").expect("id"),
        )
        .expect("client");
        let (client_side, server_side) = handshake(server, client).await;
        assert_eq!(client_side, Ok(()));
        assert!(server_side.is_ok(), "{server_side:?}");
    }
}
