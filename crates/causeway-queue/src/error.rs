use causeway_core::queue_policy::{PayloadError, QueueNameError};

use crate::target::BackendKind;

/// Everything that can go wrong between a service and its broker, worded for the person who
/// reads the log line or the CLI's output.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error(transparent)]
    InvalidQueueName(#[from] QueueNameError),
    #[error(transparent)]
    Payload(#[from] PayloadError),
    #[error("invalid broker URL {url:?}: {reason}")]
    InvalidUrl { url: String, reason: String },
    #[error("cannot connect to the {backend} broker at {target}: {message}")]
    Connect {
        backend: BackendKind,
        target: String,
        message: String,
    },
    #[error("connection to the {backend} broker lost: {message}")]
    Disconnected {
        backend: BackendKind,
        message: String,
    },
    #[error("the {backend} broker refused message {message_id}: {message}")]
    PublishRefused {
        backend: BackendKind,
        message_id: String,
        message: String,
    },
    #[error("the {backend} broker did not confirm message {message_id} within {timeout_ms} ms")]
    ConfirmTimeout {
        backend: BackendKind,
        message_id: String,
        timeout_ms: u64,
    },
    #[error("queue {0:?} does not exist")]
    NoSuchQueue(String),
    #[error("{operation} is not supported by the {backend} backend: {why}")]
    Unsupported {
        backend: BackendKind,
        operation: &'static str,
        why: &'static str,
    },
    #[error("{backend} broker error: {message}")]
    Broker {
        backend: BackendKind,
        message: String,
    },
}

impl QueueError {
    /// Whether the connection to the broker is the problem (reconnecting may help), as opposed
    /// to the request (which would fail again).
    pub fn is_connection_problem(&self) -> bool {
        matches!(
            self,
            QueueError::Connect { .. }
                | QueueError::Disconnected { .. }
                | QueueError::ConfirmTimeout { .. }
        )
    }
}
