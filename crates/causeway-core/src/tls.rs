//! The local certificate authority and the rustls configurations built on it.
//!
//! `causeway up` creates a CA once in `<data_dir>/tls` (kept across runs, so a client that trusts
//! `ca.pem` keeps trusting it) and issues a fresh leaf certificate per service at every start. Every
//! listener serves TLS with ALPN `h2` and `http/1.1`; every client verifies against `ca.pem`.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

const CA_COMMON_NAME: &str = "Causeway Local CA";
const CA_CERT_FILE: &str = "ca.pem";
const CA_KEY_FILE: &str = "ca-key.pem";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("{path} holds no usable {what}")]
    BadPem { path: PathBuf, what: &'static str },
    #[error("invalid TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> TlsError + 'a {
    move |source| TlsError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// Paths of one issued certificate and its key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertPaths {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A CA whose key lives in the data dir.
pub struct LocalCa {
    dir: PathBuf,
    issuer: Issuer<'static, KeyPair>,
}

impl LocalCa {
    /// Loads the CA from `dir`, creating it (and `dir`) on first use.
    pub fn load_or_create(dir: &Path) -> Result<Self, TlsError> {
        fs::create_dir_all(dir).map_err(io_err("create directory", dir))?;
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        let key = if cert_path.exists() && key_path.exists() {
            let pem = fs::read_to_string(&key_path).map_err(io_err("read", &key_path))?;
            KeyPair::from_pem(&pem).map_err(|_| TlsError::BadPem {
                path: key_path.clone(),
                what: "private key",
            })?
        } else {
            let key = KeyPair::generate()?;
            let cert = ca_params().self_signed(&key)?;
            write_private(&key_path, &key.serialize_pem())?;
            fs::write(&cert_path, cert.pem()).map_err(io_err("write", &cert_path))?;
            key
        };
        // The issuer is rebuilt from the same subject and key, so leaf certificates chain to the
        // `ca.pem` written at creation (the authority key identifier derives from the key).
        Ok(Self {
            dir: dir.to_path_buf(),
            issuer: Issuer::new(ca_params(), key),
        })
    }

    pub fn ca_cert_path(&self) -> PathBuf {
        self.dir.join(CA_CERT_FILE)
    }

    /// Issues a server and client certificate for `names` (DNS names or IP addresses) and writes
    /// it as `<file_stem>.pem` and `<file_stem>-key.pem`.
    pub fn issue(&self, file_stem: &str, names: &[String]) -> Result<CertPaths, TlsError> {
        let mut params = CertificateParams::new(names.to_vec())?;
        params.distinguished_name.push(
            DnType::CommonName,
            names.first().cloned().unwrap_or_default(),
        );
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        let paths = CertPaths {
            cert: self.dir.join(format!("{file_stem}.pem")),
            key: self.dir.join(format!("{file_stem}-key.pem")),
        };
        write_private(&paths.key, &key.serialize_pem())?;
        fs::write(&paths.cert, cert.pem()).map_err(io_err("write", &paths.cert))?;
        Ok(paths)
    }
}

fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, CA_COMMON_NAME);
    name.push(DnType::OrganizationName, "Causeway");
    params.distinguished_name = name;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

/// Writes a secret readable by its owner only.
pub fn write_private(path: &Path, contents: &str) -> Result<(), TlsError> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    options.mode(0o600);
    let mut file = options.open(path).map_err(io_err("write", path))?;
    file.write_all(contents.as_bytes())
        .map_err(io_err("write", path))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = fs::read(path).map_err(io_err("read", path))?;
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(io_err("parse", path))?;
    if certs.is_empty() {
        return Err(TlsError::BadPem {
            path: path.to_path_buf(),
            what: "certificate",
        });
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = fs::read(path).map_err(io_err("read", path))?;
    rustls_pemfile::private_key(&mut pem.as_slice())
        .map_err(io_err("parse", path))?
        .ok_or_else(|| TlsError::BadPem {
            path: path.to_path_buf(),
            what: "private key",
        })
}

/// A server configuration offering HTTP/2 and HTTP/1.1 through ALPN.
pub fn server_config(paths: &CertPaths) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(load_certs(&paths.cert)?, load_key(&paths.key)?)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// A client configuration that trusts only the CA at `ca_path` and speaks HTTP/2.
pub fn client_config(ca_path: &Path) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    client_config_with_alpn(ca_path, &[b"h2"])
}

/// A client configuration that trusts only the CA at `ca_path`, offering `alpn` protocols.
pub fn client_config_with_alpn(
    ca_path: &Path,
    alpn: &[&[u8]],
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in load_certs(ca_path)? {
        roots.add(cert)?;
    }
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|protocol| protocol.to_vec()).collect();
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("causeway-tls-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn ca_is_kept_across_loads_and_leaves_verify_against_it() {
        use rustls::client::danger::ServerCertVerifier;
        let dir = temp_dir("keep");
        let first = LocalCa::load_or_create(&dir).unwrap();
        let ca_pem = fs::read_to_string(first.ca_cert_path()).unwrap();
        drop(first);
        let second = LocalCa::load_or_create(&dir).unwrap();
        assert_eq!(fs::read_to_string(second.ca_cert_path()).unwrap(), ca_pem);

        let leaf = second.issue("svc", &["svc.internal".to_string()]).unwrap();
        let leaf_der = load_certs(&leaf.cert).unwrap().remove(0);
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(load_certs(&second.ca_cert_path()).unwrap().remove(0))
            .unwrap();
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            provider(),
        )
        .build()
        .unwrap();
        let name = rustls::pki_types::ServerName::try_from("svc.internal").unwrap();
        let now = rustls::pki_types::UnixTime::now();
        verifier
            .verify_server_cert(&leaf_der, &[], &name, &[], now)
            .expect("leaf issued after a reload chains to the original ca.pem");
        let other = rustls::pki_types::ServerName::try_from("other.internal").unwrap();
        assert!(
            verifier
                .verify_server_cert(&leaf_der, &[], &other, &[], now)
                .is_err()
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn garbage_key_is_a_clear_error() {
        let dir = temp_dir("garbage");
        LocalCa::load_or_create(&dir).unwrap();
        fs::write(dir.join(CA_KEY_FILE), "not a key").unwrap();
        let err = LocalCa::load_or_create(&dir).err().unwrap();
        assert!(err.to_string().contains("ca-key.pem"), "{err}");
        fs::remove_dir_all(&dir).unwrap();
    }
}
