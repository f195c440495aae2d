//! Work in progress: the amqp backend.

use crate::{BackendKind, BrokerTarget, ConnectOptions, QueueError};

pub struct AmqpBackend;

impl AmqpBackend {
    pub async fn connect(
        _target: &BrokerTarget,
        _options: &ConnectOptions,
    ) -> Result<Self, QueueError> {
        Err(QueueError::Unsupported {
            backend: BackendKind::Amqp,
            operation: "connect",
            why: "not built yet",
        })
    }
}
