//! An in-process broker for tests: TLS certificates from a fresh local CA, a listener on
//! `127.0.0.1:0`, and a handle that stops it and closes its store.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use causeway_broker::testing::LocalBroker;
//! let broker = LocalBroker::start().await?; // fresh temporary directory, removed on drop
//! let options = broker.connect_options(causeway_queue::ConnectOptions::new("test"));
//! let backend = causeway_queue::connect(&broker.target(), &options).await?;
//! # drop(backend);
//! broker.stop().await?;
//! # Ok(()) }
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use causeway_core::tls::LocalCa;
use causeway_core::topology::BrokerConfig;
use causeway_queue::{BrokerTarget, ConnectOptions};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::{Broker, BrokerError, serve};

/// The name the test broker's certificate carries (also `ConnectOptions`'s default).
pub const SERVER_NAME: &str = "broker.internal";

/// A running in-process broker. Stop it with [`LocalBroker::stop`] (dropping it stops the server
/// too, without waiting).
pub struct LocalBroker {
    pub addr: SocketAddr,
    /// The CA that signed the broker's certificate: `ConnectOptions::ca_cert`.
    pub ca_cert: PathBuf,
    /// The name to verify: `ConnectOptions::server_name`.
    pub server_name: String,
    pub broker: Broker,
    stop: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<Result<(), BrokerError>>>,
    /// A directory this handle created and removes when dropped.
    owned_dir: Option<PathBuf>,
}

impl LocalBroker {
    /// A broker on a fresh temporary directory (removed when the handle is dropped).
    pub async fn start() -> Result<LocalBroker, BrokerError> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "causeway-local-broker-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        let mut broker = start_local(&dir).await?;
        broker.owned_dir = Some(dir);
        Ok(broker)
    }

    /// Where clients connect.
    pub fn target(&self) -> BrokerTarget {
        BrokerTarget::Embedded {
            host: self.addr.ip().to_string(),
            port: self.addr.port(),
        }
    }

    /// `options` with the CA certificate and server name that this broker's certificate needs.
    pub fn connect_options(&self, mut options: ConnectOptions) -> ConnectOptions {
        options.ca_cert = Some(self.ca_cert.clone());
        options.server_name = self.server_name.clone();
        options
    }

    /// `causeway://127.0.0.1:<port>`, for `causeway_queue::BrokerTarget::parse`.
    pub fn url(&self) -> String {
        format!("causeway://{}", self.addr)
    }

    /// Stops the server, waits for it, and closes the store so that the same directory can be
    /// opened again.
    pub async fn stop(mut self) -> Result<(), BrokerError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let result = match self.server.take() {
            Some(server) => server.await.unwrap_or(Ok(())),
            None => Ok(()),
        };
        self.broker.close().await;
        result
    }
}

impl Drop for LocalBroker {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(dir) = self.owned_dir.take() {
            // An open store file may be unlinked; the broker closes it when its last task ends.
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Opens a broker on `data_dir` (store in `<data_dir>/broker/`, CA and certificate in
/// `<data_dir>/tls/`) with the default configuration and serves it on `127.0.0.1:0`.
pub async fn start_local(data_dir: &Path) -> Result<LocalBroker, BrokerError> {
    start_local_with(data_dir, &BrokerConfig::default()).await
}

/// [`start_local`] with `config`'s `fsync` and `max_batch` (its addresses are ignored).
pub async fn start_local_with(
    data_dir: &Path,
    config: &BrokerConfig,
) -> Result<LocalBroker, BrokerError> {
    let ca = LocalCa::load_or_create(&data_dir.join("tls"))?;
    let certs = ca.issue(
        "broker",
        &[SERVER_NAME.to_string(), "127.0.0.1".to_string()],
    )?;
    let broker = Broker::open(data_dir, config)?;
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
        .await
        .map_err(BrokerError::Bind)?;
    let addr = listener.local_addr().map_err(BrokerError::Bind)?;
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn({
        let broker = broker.clone();
        async move {
            serve(broker, listener, &certs, async move {
                let _ = stopped.await;
            })
            .await
        }
    });
    Ok(LocalBroker {
        addr,
        ca_cert: ca.ca_cert_path(),
        server_name: SERVER_NAME.to_string(),
        broker,
        stop: Some(stop),
        server: Some(server),
        owned_dir: None,
    })
}
