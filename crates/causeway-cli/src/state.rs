//! What `causeway up` is running, written to `<data_dir>/run/state.json` for `status` and `demo`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use causeway_core::{DataDir, Role};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunState {
    pub supervisor_pid: u32,
    pub data_dir: PathBuf,
    pub dns: SocketAddr,
    pub registry: SocketAddr,
    /// The edge's address, where clients send requests.
    pub edge: Option<SocketAddr>,
    /// The broker the services use, as a URL (`causeway://...` for the embedded broker).
    #[serde(default)]
    pub broker: Option<String>,
    pub components: Vec<ComponentState>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Starting,
    Running,
    /// Exited unexpectedly; a restart is scheduled.
    Down,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ComponentState {
    pub role: Role,
    pub instance: String,
    pub pid: Option<u32>,
    pub listen: Option<SocketAddr>,
    pub admin: Option<SocketAddr>,
    pub phase: Phase,
    pub restarts: u32,
    /// Why it last exited, if it did.
    pub last_exit: Option<String>,
    pub log: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error(
        "causeway is not running with data dir {0} (no run state there); start it with `causeway up`"
    )]
    NotRunning(PathBuf),
    #[error("cannot read {path}: {message}")]
    Read { path: PathBuf, message: String },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl RunState {
    pub fn load(data_dir: &Path) -> Result<Self, StateError> {
        let path = DataDir::new(data_dir).state_file();
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                return Err(StateError::NotRunning(data_dir.to_path_buf()));
            }
            Err(err) => {
                return Err(StateError::Read {
                    path,
                    message: err.to_string(),
                });
            }
        };
        serde_json::from_str(&text).map_err(|err| StateError::Read {
            path,
            message: err.to_string(),
        })
    }

    /// Writes atomically, so a reader never sees half a file.
    pub fn save(&self) -> Result<(), StateError> {
        let path = DataDir::new(&self.data_dir).state_file();
        let write_error = |source| StateError::Write {
            path: path.clone(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(write_error)?;
        }
        let temporary = path.with_extension("json.tmp");
        let json = serde_json::to_vec_pretty(self).unwrap_or_default();
        std::fs::write(&temporary, json).map_err(write_error)?;
        std::fs::rename(&temporary, &path).map_err(write_error)
    }

    pub fn remove(data_dir: &Path) {
        let _ = std::fs::remove_file(DataDir::new(data_dir).state_file());
    }

    pub fn component_mut(&mut self, instance: &str) -> Option<&mut ComponentState> {
        self.components.iter_mut().find(|c| c.instance == instance)
    }
}

/// Whether a process with this pid exists.
pub fn is_alive(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
}
