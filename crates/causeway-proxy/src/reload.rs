//! Configuration reload without dropping requests: a role keeps its configured state (a gateway
//! with its route table) in a [`Reloadable`]; each request takes the current version once and
//! keeps it to the end, so a reload swaps what new requests see while requests in flight finish
//! on the version they started with. TLS certificates reload the same way
//! ([`ReloadableCertificates`]): handshakes after a reload get the new set, connections already
//! up keep theirs. [`watch_files`] triggers reloads on SIGHUP or when a watched file changes
//! (polled: the routing and certificate files are few and small, and polling works the same on
//! every filesystem, including bind mounts of Kubernetes ConfigMaps and Secrets where inotify
//! misses updates).

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use causeway_core::serve::Shutdown;
use causeway_core::tls::SniCertificates;
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert};
use tokio_rustls::rustls::sign::CertifiedKey;

/// A value that can be replaced while readers hold the previous one.
#[derive(Debug)]
pub struct Reloadable<T> {
    current: RwLock<Arc<T>>,
}

impl<T> Reloadable<T> {
    pub fn new(value: T) -> Self {
        Self {
            current: RwLock::new(Arc::new(value)),
        }
    }

    /// The current version; holders keep it alive across a reload.
    pub fn current(&self) -> Arc<T> {
        self.current
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    pub fn replace(&self, value: T) {
        *self
            .current
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Arc::new(value);
    }
}

/// The certificates a TLS listener serves, chosen by SNI, replaceable while it serves: rotate a
/// certificate file, reload, and the next handshake presents the new certificate.
#[derive(Debug)]
pub struct ReloadableCertificates(Reloadable<SniCertificates>);

impl ReloadableCertificates {
    pub fn new(certificates: SniCertificates) -> Self {
        Self(Reloadable::new(certificates))
    }

    pub fn replace(&self, certificates: SniCertificates) {
        self.0.replace(certificates);
    }
}

impl ResolvesServerCert for ReloadableCertificates {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current().select(client_hello.server_name()).clone())
    }
}

/// What can make a file "changed": its modification time and length.
fn stamp(path: &PathBuf) -> Option<(SystemTime, u64)> {
    let metadata = std::fs::metadata(path).ok()?;
    Some((metadata.modified().ok()?, metadata.len()))
}

/// Calls `reload` on SIGHUP and whenever one of `files` changes (checked every `poll`), until
/// `shutdown`. `reload` reports what happened (it keeps the old configuration on errors) and
/// returns the files to watch from then on: a new configuration may name other files (an Ingress
/// that adds a TLS Secret).
pub async fn watch_files(
    mut files: Vec<PathBuf>,
    poll: Duration,
    mut shutdown: Shutdown,
    mut reload: impl FnMut(&'static str) -> Vec<PathBuf> + Send,
) {
    #[cfg(unix)]
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    let mut stamps: Vec<_> = files.iter().map(stamp).collect();
    loop {
        #[cfg(unix)]
        let signalled = async {
            match hangup.as_mut() {
                Some(hangup) => {
                    hangup.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        #[cfg(not(unix))]
        let signalled = std::future::pending::<()>();
        tokio::select! {
            _ = shutdown.wait() => return,
            _ = signalled => {
                files = reload("SIGHUP");
                stamps = files.iter().map(stamp).collect();
            }
            _ = tokio::time::sleep(poll) => {
                let now: Vec<_> = files.iter().map(stamp).collect();
                if now != stamps {
                    let watched = reload("a watched file changed");
                    // Stamped before the reload read them, so a change made meanwhile is seen.
                    stamps = if watched == files {
                        now
                    } else {
                        watched.iter().map(stamp).collect()
                    };
                    files = watched;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// The certificate the server presents in a handshake over an in-memory stream.
    async fn presented_certificate(
        server: Arc<tokio_rustls::rustls::ServerConfig>,
        client: Arc<tokio_rustls::rustls::ClientConfig>,
    ) -> Vec<u8> {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let acceptor = tokio_rustls::TlsAcceptor::from(server);
        let accepting = tokio::spawn(async move { acceptor.accept(server_io).await.map(drop) });
        let name =
            tokio_rustls::rustls::pki_types::ServerName::try_from("api.example.test").unwrap();
        let stream = tokio_rustls::TlsConnector::from(client)
            .connect(name, client_io)
            .await
            .expect("handshake");
        accepting
            .await
            .unwrap()
            .expect("server side of the handshake");
        stream.get_ref().1.peer_certificates().unwrap()[0].to_vec()
    }

    #[tokio::test]
    async fn handshakes_after_a_certificate_reload_present_the_new_certificate() {
        use causeway_core::tls::{LocalCa, client_config_with_alpn, server_config_with_resolver};
        let dir = std::env::temp_dir().join(format!("causeway-cert-reload-{}", std::process::id()));
        let ca = LocalCa::load_or_create(&dir).unwrap();
        let names = vec!["api.example.test".to_string()];
        let first = ca.issue("api", &names).unwrap();
        let certificates = Arc::new(ReloadableCertificates::new(
            SniCertificates::new(&first, &[]).unwrap(),
        ));
        let server = server_config_with_resolver(certificates.clone()).unwrap();
        let client = client_config_with_alpn(&ca.ca_cert_path(), &[b"h2"]).unwrap();

        let before = presented_certificate(server.clone(), client.clone()).await;
        assert_eq!(
            presented_certificate(server.clone(), client.clone()).await,
            before,
            "the same certificate until a reload"
        );
        // Rotated: the files now hold a new certificate and key, loaded into the same listener.
        let rotated = ca.issue("api", &names).unwrap();
        certificates.replace(SniCertificates::new(&rotated, &[]).unwrap());
        let after = presented_certificate(server, client).await;
        assert_ne!(after, before, "the rotated certificate after the reload");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn readers_keep_the_version_they_took() {
        let config = Reloadable::new("v1".to_string());
        let in_flight = config.current();
        config.replace("v2".to_string());
        assert_eq!(*in_flight, "v1");
        assert_eq!(*config.current(), "v2");
    }

    #[tokio::test]
    async fn a_changed_file_triggers_a_reload_and_an_unchanged_one_does_not() {
        let dir = std::env::temp_dir().join(format!("causeway-reload-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("routes.yaml");
        std::fs::write(&file, "a").unwrap();
        let reloads = Arc::new(AtomicUsize::new(0));
        let (trigger, shutdown) = causeway_core::serve::shutdown_channel();
        let counter = reloads.clone();
        let file_for_reload = file.clone();
        let watcher = tokio::spawn(watch_files(
            vec![file.clone()],
            Duration::from_millis(20),
            shutdown,
            move |_| {
                counter.fetch_add(1, Ordering::SeqCst);
                vec![file_for_reload.clone()]
            },
        ));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(reloads.load(Ordering::SeqCst), 0, "nothing changed yet");
        // A different length is a change even within the filesystem's timestamp granularity.
        std::fs::write(&file, "abc").unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while reloads.load(Ordering::SeqCst) == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "no reload after the change"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        trigger.fire();
        watcher.await.unwrap();
        assert_eq!(reloads.load(Ordering::SeqCst), 1);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
