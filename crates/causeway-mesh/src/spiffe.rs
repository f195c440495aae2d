//! SPIFFE IDs (`spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`), the names workload
//! certificates carry as their one URI SAN, and reading that name back from a peer's certificate.

use std::fmt;
use std::str::FromStr;

use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// A workload identity in the Kubernetes shape Istio and Linkerd use.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    trust_domain: String,
    namespace: String,
    service_account: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeError {
    #[error(
        "{0:?} is not a SPIFFE ID of the form spiffe://<trust-domain>/ns/<namespace>/sa/<name>"
    )]
    Malformed(String),
    #[error("the certificate cannot be read: {0}")]
    Certificate(String),
    #[error("the certificate carries no SPIFFE ID (no spiffe:// URI SAN)")]
    Missing,
    #[error("the certificate carries {0} URI SANs; a workload certificate carries exactly one")]
    Several(usize),
}

/// Lowercase letters, digits, '-' and '.', as a DNS label or a Kubernetes name allows.
fn valid_segment(segment: &str) -> bool {
    !segment.is_empty()
        && segment.len() <= 253
        && segment
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
}

impl SpiffeId {
    pub fn new(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, SpiffeError> {
        let id = Self {
            trust_domain: trust_domain.to_string(),
            namespace: namespace.to_string(),
            service_account: service_account.to_string(),
        };
        if [trust_domain, namespace, service_account]
            .iter()
            .all(|segment| valid_segment(segment))
        {
            Ok(id)
        } else {
            Err(SpiffeError::Malformed(id.to_string()))
        }
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn service_account(&self) -> &str {
        &self.service_account
    }

    /// The SPIFFE ID in a DER-encoded certificate, after the caller has verified the chain.
    pub fn from_certificate(der: &[u8]) -> Result<Self, SpiffeError> {
        let (_, cert) = X509Certificate::from_der(der)
            .map_err(|err| SpiffeError::Certificate(err.to_string()))?;
        let names = cert
            .subject_alternative_name()
            .map_err(|err| SpiffeError::Certificate(err.to_string()))?;
        let uris: Vec<&str> = names
            .iter()
            .flat_map(|extension| extension.value.general_names.iter())
            .filter_map(|name| match name {
                GeneralName::URI(uri) => Some(*uri),
                _ => None,
            })
            .collect();
        match uris.as_slice() {
            [] => Err(SpiffeError::Missing),
            [uri] => uri.parse(),
            several => Err(SpiffeError::Several(several.len())),
        }
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let malformed = || SpiffeError::Malformed(text.to_string());
        let rest = text.strip_prefix("spiffe://").ok_or_else(malformed)?;
        let mut parts = rest.split('/');
        match (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) {
            (Some(domain), Some("ns"), Some(namespace), Some("sa"), Some(account), None) => {
                Self::new(domain, namespace, account).map_err(|_| malformed())
            }
            _ => Err(malformed()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_bad_ones_are_refused() {
        let id: SpiffeId = "spiffe://causeway.local/ns/default/sa/payment-service"
            .parse()
            .expect("valid");
        assert_eq!(id.trust_domain(), "causeway.local");
        assert_eq!(id.namespace(), "default");
        assert_eq!(id.service_account(), "payment-service");
        assert_eq!(
            id.to_string(),
            "spiffe://causeway.local/ns/default/sa/payment-service"
        );
        for bad in [
            "https://causeway.local/ns/default/sa/x",
            "spiffe://causeway.local/ns/default/sa/",
            "spiffe://causeway.local/ns/default/sa/x/extra",
            "spiffe://causeway.local/sa/x",
            "spiffe://Causeway/ns/default/sa/x",
            "spiffe:///ns/default/sa/x",
        ] {
            assert!(bad.parse::<SpiffeId>().is_err(), "{bad} was accepted");
        }
    }

    #[test]
    fn the_id_is_read_from_a_certificate_uri_san() {
        let id = SpiffeId::new("causeway.local", "default", "order-service").expect("valid");
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(Vec::new()).expect("params");
        params.subject_alt_names = vec![rcgen::SanType::URI(
            id.to_string().try_into().expect("ia5 string"),
        )];
        let cert = params.self_signed(&key).expect("cert");
        assert_eq!(SpiffeId::from_certificate(cert.der()), Ok(id));

        let plain = rcgen::CertificateParams::new(vec!["localhost".to_string()])
            .expect("params")
            .self_signed(&key)
            .expect("cert");
        assert_eq!(
            SpiffeId::from_certificate(plain.der()),
            Err(SpiffeError::Missing)
        );
        assert!(matches!(
            SpiffeId::from_certificate(b"not a certificate"),
            Err(SpiffeError::Certificate(_))
        ));
    }
}
