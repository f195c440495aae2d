//! Work in progress: the embedded backend (every operation answers Unsupported until it is built).

use async_trait::async_trait;

use crate::{
    BackendKind, BrokerTarget, Confirmation, ConnectOptions, DeliveryStream, OutgoingMessage,
    PeekedMessage, QueueBackend, QueueError, QueueInfo, QueueSpec,
};

pub struct EmbeddedBackend;

fn unsupported(operation: &'static str) -> QueueError {
    QueueError::Unsupported {
        backend: BackendKind::Embedded,
        operation,
        why: "not built yet",
    }
}

impl EmbeddedBackend {
    pub async fn connect(
        _target: &BrokerTarget,
        _options: &ConnectOptions,
    ) -> Result<Self, QueueError> {
        Err(unsupported("connect"))
    }
}

#[async_trait]
impl QueueBackend for EmbeddedBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Embedded
    }
    async fn declare(&self, _spec: &QueueSpec) -> Result<(), QueueError> {
        Err(unsupported("declare"))
    }
    async fn publish_validated(
        &self,
        _spec: &QueueSpec,
        _message: OutgoingMessage,
    ) -> Result<Confirmation, QueueError> {
        Err(unsupported("publish"))
    }
    async fn open_stream(
        &self,
        _spec: &QueueSpec,
        _prefetch: u16,
    ) -> Result<Box<dyn DeliveryStream>, QueueError> {
        Err(unsupported("subscribe"))
    }
    async fn list(&self, _known: &[QueueSpec]) -> Result<Vec<QueueInfo>, QueueError> {
        Err(unsupported("list"))
    }
    async fn peek(&self, _queue: &str, _limit: usize) -> Result<Vec<PeekedMessage>, QueueError> {
        Err(unsupported("peek"))
    }
    async fn redrive(&self, _spec: &QueueSpec, _limit: Option<u64>) -> Result<u64, QueueError> {
        Err(unsupported("redrive"))
    }
    async fn delete(&self, _spec: &QueueSpec) -> Result<(), QueueError> {
        Err(unsupported("delete"))
    }
}
