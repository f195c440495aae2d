//! The mesh certificate authority: an intermediate CA under the local root (the trust anchor)
//! that signs workload certificates from CSRs. The subject and names a CSR asks for are ignored:
//! the certificate carries the SPIFFE ID the caller proved (with a bootstrap token or its current
//! certificate), and only the CSR's public key is kept, so private keys never leave the sidecar.

use std::path::Path;
use std::time::{Duration, SystemTime};

use rcgen::{
    CertificateParams, CertificateSigningRequestParams, DnType, ExtendedKeyUsagePurpose, Issuer,
    KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::pki_types::CertificateSigningRequestDer;

use crate::spiffe::SpiffeId;

/// A clock a little behind the issuer's must not see a fresh certificate as not yet valid.
const BACKDATE: Duration = Duration::from_secs(60);
/// The file stem of the issuer's certificate and key in the TLS directory.
pub const ISSUER_FILE_STEM: &str = "mesh-issuer";

#[derive(Debug, thiserror::Error)]
pub enum AuthorityError {
    #[error("the certificate signing request is not valid: {0}")]
    BadRequest(String),
    #[error("cannot load the mesh issuer: {0}")]
    Issuer(String),
    #[error("signing failed: {0}")]
    Sign(#[from] rcgen::Error),
    #[error("a lifetime of {0:?} is outside what the mesh issues (1 s to 30 days)")]
    Lifetime(Duration),
}

/// A signed workload certificate.
#[derive(Clone, Debug)]
pub struct Issued {
    /// The leaf then the issuer, PEM: what a sidecar presents.
    pub chain_pem: String,
    /// The leaf's serial number, hex.
    pub serial: String,
    pub not_after: SystemTime,
}

pub struct MeshAuthority {
    issuer: Issuer<'static, KeyPair>,
    issuer_pem: String,
}

impl MeshAuthority {
    /// Creates the issuer under the local root in `tls_dir` on first use, then loads it.
    pub fn load_or_create(tls_dir: &Path) -> Result<Self, AuthorityError> {
        let root = causeway_core::tls::LocalCa::load_or_create(tls_dir)
            .map_err(|err| AuthorityError::Issuer(err.to_string()))?;
        let paths = root
            .issue_intermediate(ISSUER_FILE_STEM, "Causeway Mesh Issuer")
            .map_err(|err| AuthorityError::Issuer(err.to_string()))?;
        let read = |path: &Path| {
            std::fs::read_to_string(path)
                .map_err(|err| AuthorityError::Issuer(format!("{}: {err}", path.display())))
        };
        Self::from_pem(&read(&paths.cert)?, &read(&paths.key)?)
    }

    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, AuthorityError> {
        let key =
            KeyPair::from_pem(key_pem).map_err(|err| AuthorityError::Issuer(err.to_string()))?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key)
            .map_err(|err| AuthorityError::Issuer(err.to_string()))?;
        Ok(Self {
            issuer,
            issuer_pem: cert_pem.trim_end().to_string() + "\n",
        })
    }

    /// The issuer's own certificate (PEM), the second certificate of every chain it signs.
    pub fn issuer_pem(&self) -> &str {
        &self.issuer_pem
    }

    /// Signs the CSR's key as `identity` for `lifetime`.
    pub fn certify(
        &self,
        csr_der: &[u8],
        identity: &SpiffeId,
        lifetime: Duration,
    ) -> Result<Issued, AuthorityError> {
        if lifetime < Duration::from_secs(1) || lifetime > Duration::from_secs(30 * 24 * 3600) {
            return Err(AuthorityError::Lifetime(lifetime));
        }
        // Parsing checks the CSR's self-signature: the caller holds the key it asks us to certify.
        let request =
            CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(csr_der))
                .map_err(|err| AuthorityError::BadRequest(err.to_string()))?;
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, identity.service_account());
        params.subject_alt_names =
            vec![SanType::URI(identity.to_string().try_into().map_err(
                |err: rcgen::Error| AuthorityError::BadRequest(err.to_string()),
            )?)];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        let now = SystemTime::now();
        let not_after = now + lifetime;
        params.not_before = (now - BACKDATE).into();
        params.not_after = not_after.into();
        let mut serial: [u8; 16] = rand::random();
        serial[0] &= 0x7f; // a positive INTEGER
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        let signed = CertificateSigningRequestParams {
            params,
            public_key: request.public_key,
        }
        .signed_by(&self.issuer)?;
        Ok(Issued {
            chain_pem: signed.pem() + &self.issuer_pem,
            serial: serial.iter().map(|byte| format!("{byte:02x}")).collect(),
            not_after,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use rustls::RootCertStore;
    use rustls::pki_types::{CertificateDer, UnixTime};
    use rustls::server::WebPkiClientVerifier;

    use super::*;

    fn certs(pem: &str) -> Vec<CertificateDer<'static>> {
        rustls_pemfile::certs(&mut pem.as_bytes())
            .collect::<Result<_, _>>()
            .expect("pem")
    }

    fn csr(key: &KeyPair, asked_names: Vec<String>) -> Vec<u8> {
        CertificateParams::new(asked_names)
            .expect("params")
            .serialize_request(key)
            .expect("csr")
            .der()
            .to_vec()
    }

    #[test]
    fn a_workload_certificate_chains_to_the_root_and_names_the_proved_identity() {
        let dir = std::env::temp_dir().join(format!("causeway-mesh-ca-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let authority = MeshAuthority::load_or_create(&dir).expect("authority");
        let identity = SpiffeId::new("causeway.local", "default", "order-service").expect("id");
        let key = KeyPair::generate().expect("key");
        // The CSR asks for another name: the certificate carries the proved identity only.
        let request = csr(&key, vec!["payment-service.internal".into()]);
        let issued = authority
            .certify(&request, &identity, Duration::from_secs(3600))
            .expect("issued");
        let chain = certs(&issued.chain_pem);
        assert_eq!(chain.len(), 2, "leaf and issuer");
        assert_eq!(SpiffeId::from_certificate(&chain[0]), Ok(identity.clone()));

        let mut roots = RootCertStore::empty();
        let root_pem = std::fs::read_to_string(dir.join("ca.pem")).expect("root");
        roots.add(certs(&root_pem).remove(0)).expect("root");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .expect("verifier");
        verifier
            .verify_client_cert(&chain[0], &chain[1..], UnixTime::now())
            .expect("chains to the root as a client certificate");
        let expired_by_then = UnixTime::since_unix_epoch(
            (issued.not_after + Duration::from_secs(1))
                .duration_since(SystemTime::UNIX_EPOCH)
                .expect("after 1970"),
        );
        assert!(
            verifier
                .verify_client_cert(&chain[0], &chain[1..], expired_by_then)
                .is_err(),
            "the certificate must expire after its lifetime"
        );

        // A second certificate for the same key (a rotation) has a new serial; the issuer
        // reloaded from disk signs certificates that chain the same way.
        let again = MeshAuthority::load_or_create(&dir)
            .expect("reloaded")
            .certify(&request, &identity, Duration::from_secs(5))
            .expect("issued");
        assert_ne!(again.serial, issued.serial);
        let chain = certs(&again.chain_pem);
        verifier
            .verify_client_cert(&chain[0], &chain[1..], UnixTime::now())
            .expect("chains");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_tampered_or_garbage_request_and_a_silly_lifetime_are_refused() {
        let dir = std::env::temp_dir().join(format!("causeway-mesh-bad-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let authority = MeshAuthority::load_or_create(&dir).expect("authority");
        let identity = SpiffeId::new("causeway.local", "default", "order-service").expect("id");
        let mut request = csr(&KeyPair::generate().expect("key"), Vec::new());
        let last = request.len() - 1;
        request[last] ^= 0x01; // the signature no longer verifies
        assert!(matches!(
            authority.certify(&request, &identity, Duration::from_secs(60)),
            Err(AuthorityError::BadRequest(_))
        ));
        assert!(matches!(
            authority.certify(b"garbage", &identity, Duration::from_secs(60)),
            Err(AuthorityError::BadRequest(_))
        ));
        let good = csr(&KeyPair::generate().expect("key"), Vec::new());
        assert!(matches!(
            authority.certify(&good, &identity, Duration::from_millis(10)),
            Err(AuthorityError::Lifetime(_))
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
