//! The contract between `causeway up` (the supervisor) and each component process it starts.
//!
//! The supervisor passes a [`Launch`] as JSON in the `CAUSEWAY_LAUNCH` environment variable. The
//! child binds its listeners, then writes exactly one [`ChildReport`] line on stdout: `ready` with
//! the addresses it actually bound (ports may be chosen at run time), or `failed` with the reason.
//! Logs go to stderr, which the supervisor sends to `<data_dir>/logs/<instance>.log`.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::topology::{Role, Topology};

pub const LAUNCH_ENV: &str = "CAUSEWAY_LAUNCH";

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("{LAUNCH_ENV} is not set: components are started by `causeway up`")]
    Missing,
    #[error("{LAUNCH_ENV} is not a valid launch description: {0}")]
    Malformed(String),
}

/// Everything a component process needs to know to start.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Launch {
    pub role: Role,
    /// 0-based index among the role's instances.
    pub index: usize,
    /// The whole topology; `data_dir` is absolute.
    pub topology: Topology,
    /// Where discovery actually listens (its ports may have been chosen at run time).
    pub dns_addr: SocketAddr,
    pub registry_addr: SocketAddr,
    /// For a sidecar and its app: what the mesh gave them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesh: Option<MeshLaunch>,
}

/// A meshed app and its sidecar talk over two loopback listeners that the supervisor binds
/// once and hands down (inherited file descriptors, as systemd's socket activation does), so
/// that either can restart without the other losing track of it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MeshLaunch {
    /// The sidecar's outbound listener, where the app sends its calls to other services.
    pub outbound: InheritedListener,
    /// The app's plain-HTTP listener, where the sidecar's inbound half delivers calls.
    pub app: InheritedListener,
    /// For the sidecar only: where the control plane listens, and the single-use token that
    /// proves which workload it serves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control_plane: Option<SocketAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bootstrap_token: Option<String>,
}

/// A listening socket bound by the supervisor: its address, and the descriptor the child
/// inherited it as.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct InheritedListener {
    pub addr: SocketAddr,
    pub fd: i32,
}

impl Launch {
    pub fn from_env() -> Result<Self, LaunchError> {
        let json = std::env::var(LAUNCH_ENV).map_err(|_| LaunchError::Missing)?;
        serde_json::from_str(&json).map_err(|err| LaunchError::Malformed(err.to_string()))
    }

    pub fn instance(&self) -> String {
        self.topology.instance_name(self.role, self.index)
    }

    pub fn data(&self) -> DataDir {
        DataDir::new(&self.topology.data_dir)
    }
}

/// Where things live in the data dir.
#[derive(Clone, Debug)]
pub struct DataDir {
    root: PathBuf,
}

impl DataDir {
    pub fn new(root: &Path) -> Self {
        Self {
            root: root.to_path_buf(),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn tls_dir(&self) -> PathBuf {
        self.root.join("tls")
    }

    pub fn ca_cert(&self) -> PathBuf {
        self.tls_dir().join("ca.pem")
    }

    /// Certificate and key issued to a service at start.
    pub fn service_cert(&self, service: &str) -> crate::tls::CertPaths {
        crate::tls::CertPaths {
            cert: self.tls_dir().join(format!("{service}.pem")),
            key: self.tls_dir().join(format!("{service}-key.pem")),
        }
    }

    /// The secret that signs and verifies API tokens.
    pub fn jwt_key(&self) -> PathBuf {
        self.root.join("jwt.key")
    }

    pub fn database(&self, service: &str) -> PathBuf {
        self.root.join("db").join(format!("{service}.db"))
    }

    pub fn logs_dir(&self) -> PathBuf {
        self.root.join("logs")
    }

    pub fn log(&self, instance: &str) -> PathBuf {
        self.logs_dir().join(format!("{instance}.log"))
    }

    /// The mesh policy file when the topology names none.
    pub fn mesh_policy(&self) -> PathBuf {
        self.root.join("mesh-policy.yaml")
    }

    /// The key that signs sidecars' bootstrap tokens, and the journal of tokens used.
    pub fn mesh_bootstrap_key(&self) -> PathBuf {
        self.tls_dir().join("mesh-bootstrap.key")
    }

    pub fn mesh_token_journal(&self) -> PathBuf {
        self.root.join("run").join("mesh-tokens-used")
    }

    /// What `causeway up` is running, for `causeway status` and `causeway demo`.
    pub fn state_file(&self) -> PathBuf {
        self.root.join("run").join("state.json")
    }
}

/// The one line a component writes on stdout once started (or failed to).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum ChildReport {
    Ready {
        instance: String,
        pid: u32,
        /// Main listener: TLS for services and proxies, TCP for the balancer, DNS for discovery.
        listen: SocketAddr,
        /// Plain-HTTP `/healthz` and `/metrics`.
        admin: SocketAddr,
    },
    Failed {
        message: String,
    },
}

impl ChildReport {
    /// Writes the report as one line on stdout.
    pub fn emit(&self) {
        let mut stdout = std::io::stdout().lock();
        // The supervisor waits for this line: if stdout is gone there is nobody left to tell.
        let _ = serde_json::to_writer(&mut stdout, self);
        let _ = stdout.write_all(b"\n");
        let _ = stdout.flush();
    }
}
