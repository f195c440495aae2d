//! Work in progress: the embedded backend.

use crate::{BackendKind, BrokerTarget, ConnectOptions, QueueError};

pub struct EmbeddedBackend;

impl EmbeddedBackend {
    pub async fn connect(
        _target: &BrokerTarget,
        _options: &ConnectOptions,
    ) -> Result<Self, QueueError> {
        Err(QueueError::Unsupported {
            backend: BackendKind::Embedded,
            operation: "connect",
            why: "not built yet",
        })
    }
}
