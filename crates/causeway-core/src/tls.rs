//! The local certificate authority and the rustls configurations built on it.
//!
//! `causeway up` creates a CA once in `<data_dir>/tls` (kept across runs, so a client that trusts
//! `ca.pem` keeps trusting it) and issues a fresh leaf certificate per service at every start. Every
//! listener serves TLS with ALPN `h2` and `http/1.1`; every client verifies against `ca.pem`.
//!
//! The reverse proxy serves several certificates, chosen by SNI ([`SniCertificates`]): those of
//! the Ingress files' `spec.tls[]` Secrets (issued by `causeway up` from the CA into
//! `tls/secret-<name>.pem`, as cert-manager would fill a Kubernetes Secret), those named in
//! `reverse_proxy.certificates`, and the edge certificate as the default.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

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
    #[error("certificate {cert} with key {key} is not usable: {source}")]
    Unusable {
        cert: PathBuf,
        key: PathBuf,
        source: rustls::Error,
    },
    #[error("{0:?} is not a usable TLS Secret name (lowercase letters, digits, '-' and '.')")]
    SecretName(String),
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

impl LocalCa {
    /// Issues an intermediate CA under this root (it may sign leaves, not further CAs) and writes
    /// it as `<file_stem>.pem` and `<file_stem>-key.pem`, unless a valid pair is already there:
    /// the mesh's certificate authority, whose workload certificates then chain to `ca.pem`.
    pub fn issue_intermediate(
        &self,
        file_stem: &str,
        common_name: &str,
    ) -> Result<CertPaths, TlsError> {
        let paths = CertPaths {
            cert: self.dir.join(format!("{file_stem}.pem")),
            key: self.dir.join(format!("{file_stem}-key.pem")),
        };
        if paths.cert.exists() && paths.key.exists() {
            return Ok(paths);
        }
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params
            .distinguished_name
            .push(DnType::OrganizationName, "Causeway");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
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

/// Whether a mutual-TLS listener lets in a client that presents no certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientAuth {
    Required,
    /// The handshake succeeds without one; a certificate that is presented must still verify.
    Optional,
}

/// A server configuration that asks clients for a certificate chaining to `ca_path`, with the
/// given ALPN protocols.
pub fn mutual_server_config(
    paths: &CertPaths,
    ca_path: &Path,
    client_auth: ClientAuth,
    alpn: &[&[u8]],
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in load_certs(ca_path)? {
        roots.add(cert)?;
    }
    let builder =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider());
    let builder = match client_auth {
        ClientAuth::Required => builder,
        ClientAuth::Optional => builder.allow_unauthenticated(),
    };
    let verifier = builder
        .build()
        .map_err(|err| TlsError::Config(rustls::Error::General(err.to_string())))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(load_certs(&paths.cert)?, load_key(&paths.key)?)?;
    config.alpn_protocols = alpn.iter().map(|protocol| protocol.to_vec()).collect();
    Ok(Arc::new(config))
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

/// A server configuration offering HTTP/2 only, for gRPC servers: a client that cannot speak
/// HTTP/2 fails at the handshake, with a TLS alert that says so, instead of on its first request.
pub fn grpc_server_config(paths: &CertPaths) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let mut config = server_config(paths)?;
    Arc::make_mut(&mut config).alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// Where the certificate of the TLS Secret `secret` (an Ingress `spec.tls[].secretName`) lives
/// in the CA's directory `tls_dir`: `secret-<name>.pem` and `secret-<name>-key.pem`.
pub fn secret_cert(tls_dir: &Path, secret: &str) -> Result<CertPaths, TlsError> {
    let stem = secret_file_stem(secret)?;
    Ok(CertPaths {
        cert: tls_dir.join(format!("{stem}.pem")),
        key: tls_dir.join(format!("{stem}-key.pem")),
    })
}

/// The file stem [`LocalCa::issue`] writes a Secret's certificate under (the prefix keeps it
/// apart from the CA's and the services' files).
pub fn secret_file_stem(secret: &str) -> Result<String, TlsError> {
    let valid = !secret.is_empty()
        && secret.len() <= 253
        && !secret.starts_with('.')
        && secret
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
    if !valid {
        return Err(TlsError::SecretName(secret.to_string()));
    }
    Ok(format!("secret-{secret}"))
}

/// The hosts of each Secret among `(secretName, hosts)` TLS entries, merged across entries in
/// first-appearance order; entries without hosts (they mean the default certificate) are left
/// out.
pub fn hosts_by_secret<'a>(
    entries: impl IntoIterator<Item = (&'a str, &'a [String])>,
) -> Vec<(String, Vec<String>)> {
    let mut merged: Vec<(String, Vec<String>)> = Vec::new();
    for (secret, hosts) in entries {
        if hosts.is_empty() {
            continue;
        }
        let at = match merged.iter().position(|(name, _)| name == secret) {
            Some(at) => at,
            None => {
                merged.push((secret.to_string(), Vec::new()));
                merged.len() - 1
            }
        };
        for host in hosts {
            if !merged[at].1.contains(host) {
                merged[at].1.push(host.clone());
            }
        }
    }
    merged
}

fn load_certified_key(paths: &CertPaths) -> Result<Arc<CertifiedKey>, TlsError> {
    let certs = load_certs(&paths.cert)?;
    let key = load_key(&paths.key)?;
    CertifiedKey::from_der(certs, key, &provider())
        .map(Arc::new)
        .map_err(|source| TlsError::Unusable {
            cert: paths.cert.clone(),
            key: paths.key.clone(),
            source,
        })
}

/// Lower case, without a trailing dot.
fn normalize_name(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// Certificates chosen by the name the client asks for (SNI): an exact host, else a wildcard
/// (`*.example.com` covers one label: `a.example.com`, not `example.com` nor `a.b.example.com`),
/// else the default certificate, which also serves clients that send no SNI (IP addresses).
/// When several certificates name the same host, the first given wins.
#[derive(Debug)]
pub struct SniCertificates {
    default: Arc<CertifiedKey>,
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// Keyed by the suffix after `*.`.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
}

impl SniCertificates {
    /// Loads every certificate and key; an unusable one is an error naming its file.
    pub fn new(default: &CertPaths, named: &[(Vec<String>, CertPaths)]) -> Result<Self, TlsError> {
        let mut certificates = Self {
            default: load_certified_key(default)?,
            exact: HashMap::new(),
            wildcard: HashMap::new(),
        };
        for (hosts, paths) in named {
            let key = load_certified_key(paths)?;
            for host in hosts {
                let host = normalize_name(host);
                let (table, name) = match host.strip_prefix("*.") {
                    Some(suffix) => (&mut certificates.wildcard, suffix.to_string()),
                    None => (&mut certificates.exact, host),
                };
                table.entry(name).or_insert_with(|| key.clone());
            }
        }
        Ok(certificates)
    }

    /// The certificate for `server_name` (the SNI; `None` when the client sent none).
    pub fn select(&self, server_name: Option<&str>) -> &Arc<CertifiedKey> {
        let Some(name) = server_name.map(normalize_name) else {
            return &self.default;
        };
        if let Some(key) = self.exact.get(&name) {
            return key;
        }
        name.split_once('.')
            .filter(|(first, _)| !first.is_empty())
            .and_then(|(_, rest)| self.wildcard.get(rest))
            .unwrap_or(&self.default)
    }
}

impl ResolvesServerCert for SniCertificates {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.select(client_hello.server_name()).clone())
    }
}

/// A server configuration like [`server_config`] whose certificate is chosen by SNI.
pub fn server_config_with_sni(
    certificates: SniCertificates,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    server_config_with_resolver(Arc::new(certificates))
}

/// A server configuration like [`server_config`] whose certificate `resolver` picks per
/// handshake (by SNI, and from a set that may be replaced while serving).
pub fn server_config_with_resolver(
    resolver: Arc<dyn ResolvesServerCert>,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
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

    /// Accepts any server certificate: the test looks at which one was presented.
    #[derive(Debug)]
    struct AcceptAny;

    impl rustls::client::danger::ServerCertVerifier for AcceptAny {
        fn verify_server_cert(
            &self,
            _: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &rustls::pki_types::ServerName<'_>,
            _: &[u8],
            _: rustls::pki_types::UnixTime,
        ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        }

        fn verify_tls12_signature(
            &self,
            _: &[u8],
            _: &CertificateDer<'_>,
            _: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
        }

        fn verify_tls13_signature(
            &self,
            _: &[u8],
            _: &CertificateDer<'_>,
            _: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
        }

        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            provider()
                .signature_verification_algorithms
                .supported_schemes()
        }
    }

    /// Handshakes with `server` over an in-memory pipe, sending `sni` (none when `None`); returns
    /// the certificate the server presented and the ALPN protocol agreed.
    async fn presented(
        server: Arc<rustls::ServerConfig>,
        sni: Option<&str>,
    ) -> (CertificateDer<'static>, Option<Vec<u8>>) {
        let (client_end, server_end) = tokio::io::duplex(64 * 1024);
        let acceptor = tokio_rustls::TlsAcceptor::from(server);
        let accepted = tokio::spawn(async move { acceptor.accept(server_end).await.is_ok() });
        let mut config = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAny))
            .with_no_client_auth();
        config.alpn_protocols = vec![b"h2".to_vec()];
        config.enable_sni = sni.is_some();
        let name = rustls::pki_types::ServerName::try_from(sni.unwrap_or("no-sni.invalid"))
            .unwrap()
            .to_owned();
        let stream = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, client_end)
            .await
            .expect("handshake");
        assert!(accepted.await.unwrap());
        let connection = stream.get_ref().1;
        (
            connection.peer_certificates().unwrap()[0].clone(),
            connection.alpn_protocol().map(<[u8]>::to_vec),
        )
    }

    #[tokio::test]
    async fn sni_picks_the_exact_then_the_wildcard_then_the_default_certificate() {
        let dir = temp_dir("sni");
        let ca = LocalCa::load_or_create(&dir).unwrap();
        let default = ca.issue("edge", &["localhost".to_string()]).unwrap();
        let api = ca.issue("api", &["api.example.com".to_string()]).unwrap();
        let apps = ca
            .issue("apps", &["*.apps.example.com".to_string()])
            .unwrap();
        let certificates = SniCertificates::new(
            &default,
            &[
                (vec!["API.example.com".to_string()], api.clone()),
                (vec!["*.apps.example.com".to_string()], apps.clone()),
            ],
        )
        .unwrap();
        let config = server_config_with_sni(certificates).unwrap();
        let der = |paths: &CertPaths| load_certs(&paths.cert).unwrap().remove(0);

        for (sni, expected) in [
            (Some("api.example.com"), &api),
            (Some("x.apps.example.com"), &apps),
            (Some("apps.example.com"), &default),
            (Some("a.b.apps.example.com"), &default),
            (Some("other.example.com"), &default),
            (Some("localhost"), &default),
            (None, &default),
        ] {
            let (certificate, alpn) = presented(config.clone(), sni).await;
            assert!(
                certificate == der(expected),
                "SNI {sni:?} gets {expected:?}"
            );
            assert_eq!(alpn.as_deref(), Some(&b"h2"[..]), "ALPN kept");
        }

        // And a client that verifies against the CA accepts the one picked for its name.
        let (client_end, server_end) = tokio::io::duplex(64 * 1024);
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        tokio::spawn(async move { acceptor.accept(server_end).await.map(|_| ()) });
        let client = client_config(&ca.ca_cert_path()).unwrap();
        let name = rustls::pki_types::ServerName::try_from("x.apps.example.com").unwrap();
        tokio_rustls::TlsConnector::from(client)
            .connect(name, client_end)
            .await
            .expect("the wildcard certificate verifies for x.apps.example.com");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn grpc_servers_agree_on_h2_and_refuse_http1_only_clients() {
        let dir = temp_dir("grpc-alpn");
        let ca = LocalCa::load_or_create(&dir).unwrap();
        let certs = ca
            .issue("pricing", &["pricing.internal".to_string()])
            .unwrap();
        let config = grpc_server_config(&certs).unwrap();
        assert_eq!(config.alpn_protocols, vec![b"h2".to_vec()]);
        let name = rustls::pki_types::ServerName::try_from("pricing.internal").unwrap();

        for (offered, agreed) in [
            (&[&b"h2"[..], b"http/1.1"][..], Some(&b"h2"[..])),
            (&[&b"http/1.1"[..]][..], None),
        ] {
            let (client_end, server_end) = tokio::io::duplex(64 * 1024);
            let acceptor = tokio_rustls::TlsAcceptor::from(config.clone());
            tokio::spawn(async move { acceptor.accept(server_end).await.map(|_| ()) });
            let client = client_config_with_alpn(&ca.ca_cert_path(), offered).unwrap();
            let result = tokio_rustls::TlsConnector::from(client)
                .connect(name.clone(), client_end)
                .await;
            match agreed {
                Some(protocol) => {
                    let stream = result.expect("an h2 client is served");
                    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(protocol));
                }
                None => {
                    let err = result.map(|_| ()).expect_err("HTTP/1.1 only is refused");
                    assert!(
                        err.to_string().contains("NoApplicationProtocol"),
                        "the alert says why: {err}"
                    );
                }
            }
        }
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn unusable_certificates_name_their_file() {
        let dir = temp_dir("sni-bad");
        let ca = LocalCa::load_or_create(&dir).unwrap();
        let default = ca.issue("edge", &["localhost".to_string()]).unwrap();
        let other = ca.issue("other", &["a.example.com".to_string()]).unwrap();
        let missing = CertPaths {
            cert: dir.join("missing.pem"),
            key: other.key.clone(),
        };
        let err =
            SniCertificates::new(&default, &[(vec!["a.example.com".into()], missing)]).unwrap_err();
        assert!(err.to_string().contains("missing.pem"), "{err}");
        // A key that is not the certificate's.
        let mismatched = CertPaths {
            cert: other.cert.clone(),
            key: default.key.clone(),
        };
        let err = SniCertificates::new(&default, &[(vec!["a.example.com".into()], mismatched)])
            .unwrap_err();
        assert!(err.to_string().contains("other.pem"), "{err}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn secret_names_map_to_files_and_hosts_merge() {
        let tls = Path::new("/data/tls");
        let paths = secret_cert(tls, "shop-tls").unwrap();
        assert_eq!(paths.cert, tls.join("secret-shop-tls.pem"));
        assert_eq!(paths.key, tls.join("secret-shop-tls-key.pem"));
        assert!(secret_cert(tls, "../ca").is_err());
        assert!(secret_cert(tls, "").is_err());
        let a = vec!["a.example.com".to_string()];
        let b = vec!["b.example.com".to_string(), "a.example.com".to_string()];
        let none: Vec<String> = Vec::new();
        let merged = hosts_by_secret([
            ("one", a.as_slice()),
            ("default", none.as_slice()),
            ("two", b.as_slice()),
            ("one", b.as_slice()),
        ]);
        assert_eq!(
            merged,
            vec![
                (
                    "one".to_string(),
                    vec!["a.example.com".to_string(), "b.example.com".to_string()]
                ),
                ("two".to_string(), b.clone()),
            ]
        );
    }
}
