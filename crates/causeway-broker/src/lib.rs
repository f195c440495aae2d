//! Causeway's embedded message broker. It owns durable queues: their messages on disk (one redb
//! file under `<data_dir>/broker/`), the in-memory index that decides what is delivered next
//! (ready, delayed, unacked), dead-letter queues (`<queue>.dlq`) and redrive, and the gRPC API
//! (`causeway.broker.v1.Broker`, over TLS) through which services publish with confirms and
//! consume with prefetch and settle commands. The rules every broker shares (queue names, payload
//! limits, attempts and backoff) come from `causeway_core::queue_policy`; the client side is
//! `causeway_queue::embedded`. A message published without an id is stored under its content id
//! (`causeway_queue::content_message_id`: `sha256:` and the hex SHA-256 of its payload, the id
//! the other backends' deliveries get too), counted in `broker_derived_message_ids`.
//!
//! Why redb for storage and group commit: see the `store` module; why gRPC bidirectional streams
//! for the wire protocol: see the `server` module. Tests start an in-process broker with
//! [`testing::LocalBroker`].
//!
//! ```no_run
//! # async fn run(data_dir: &std::path::Path, certs: &causeway_core::tls::CertPaths) -> Result<(), causeway_broker::BrokerError> {
//! let config = causeway_core::topology::BrokerConfig::default();
//! let broker = causeway_broker::Broker::open(data_dir, &config)?;
//! let listener = tokio::net::TcpListener::bind(config.listen).await.map_err(causeway_broker::BrokerError::Bind)?;
//! causeway_broker::serve(broker, listener, certs, std::future::pending()).await
//! # }
//! ```

mod broker;
mod metrics;
mod server;
mod store;
pub mod testing;

use std::path::PathBuf;

use causeway_core::queue_policy::{PayloadError, QueueNameError};

pub use broker::{
    Broker, Consumer, ConsumerEvent, DB_FILE, Delivered, Pending, QueueStats, SettleAction, headers,
};
pub use causeway_proto::broker::v1::StoredMessage;
pub use server::{MAX_MESSAGE_BYTES, serve};
pub use store::LAZY_FLUSH;

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("cannot open the broker store {path}: {source}")]
    Open { path: PathBuf, source: redb::Error },
    #[error("broker storage error: {0}")]
    Storage(#[from] redb::Error),
    #[error("cannot create {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the broker store holds unreadable data: {0}")]
    Corrupt(String),
    #[error("cannot start the broker's writer thread: {0}")]
    Thread(std::io::Error),
    #[error("Broker::open must be called within a Tokio runtime")]
    NoRuntime,
    #[error(transparent)]
    InvalidQueueName(#[from] QueueNameError),
    #[error(transparent)]
    Payload(#[from] PayloadError),
    #[error("invalid queue policy: {0}")]
    InvalidPolicy(String),
    #[error("invalid message: {0}")]
    InvalidMessage(String),
    #[error("queue {0:?} does not exist")]
    NoSuchQueue(String),
    #[error("no unsettled delivery with tag {0} on this subscription")]
    UnknownDelivery(u64),
    #[error("the commit failed: {0}")]
    Commit(String),
    #[error("the broker is closed")]
    Closed,
    #[error("cannot issue the broker's certificate: {0}")]
    Certificate(#[from] causeway_core::tls::TlsError),
    #[error("cannot load the broker's TLS certificate: {0}")]
    ServerTls(#[source] causeway_core::tls::TlsError),
    #[error("cannot listen: {0}")]
    Bind(std::io::Error),
}

impl BrokerError {
    /// The gRPC status a client sees for this error.
    pub fn to_status(&self) -> tonic::Status {
        use tonic::Status;
        let message = self.to_string();
        match self {
            BrokerError::InvalidQueueName(_)
            | BrokerError::Payload(_)
            | BrokerError::InvalidPolicy(_)
            | BrokerError::InvalidMessage(_) => Status::invalid_argument(message),
            BrokerError::NoSuchQueue(_) => Status::not_found(message),
            BrokerError::UnknownDelivery(_) => Status::failed_precondition(message),
            BrokerError::Closed => Status::unavailable(message),
            _ => Status::internal(message),
        }
    }
}

#[cfg(test)]
mod tests;
