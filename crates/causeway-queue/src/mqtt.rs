//! Work in progress: the mqtt backend.

use crate::{BackendKind, BrokerTarget, ConnectOptions, QueueError};

pub struct MqttBackend;

impl MqttBackend {
    pub async fn connect(
        _target: &BrokerTarget,
        _options: &ConnectOptions,
    ) -> Result<Self, QueueError> {
        Err(QueueError::Unsupported {
            backend: BackendKind::Mqtt,
            operation: "connect",
            why: "not built yet",
        })
    }
}
