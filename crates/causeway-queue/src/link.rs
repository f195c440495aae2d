//! A service's lasting link to its broker: connects on first use, declares the service's queues on
//! every new connection, and after a connection failure connects again on the next use (finding
//! the broker anew, since a restarted embedded broker may listen elsewhere). Backends stay simple
//! (one connection, errors when it dies); the retry policy for a whole service lives here.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::Mutex;

use crate::{
    BrokerTarget, Confirmation, ConnectOptions, OutgoingMessage, QueueBackend, QueueError,
    QueueSpec, Subscription,
};

/// Finds the broker to connect to (a fixed URL, or a discovery lookup).
pub type ResolveBroker = Arc<
    dyn Fn() -> Pin<Box<dyn Future<Output = Result<BrokerTarget, QueueError>> + Send>>
        + Send
        + Sync,
>;

pub struct BrokerLink {
    resolve: ResolveBroker,
    options: ConnectOptions,
    queues: Vec<QueueSpec>,
    current: Mutex<Option<Arc<dyn QueueBackend>>>,
}

impl BrokerLink {
    /// A link that finds its broker with `resolve` and declares `queues` on each connection.
    pub fn new(resolve: ResolveBroker, options: ConnectOptions, queues: Vec<QueueSpec>) -> Self {
        Self {
            resolve,
            options,
            queues,
            current: Mutex::new(None),
        }
    }

    /// A link to a broker at a fixed address.
    pub fn fixed(target: BrokerTarget, options: ConnectOptions, queues: Vec<QueueSpec>) -> Self {
        let resolve: ResolveBroker = Arc::new(move || {
            let target = target.clone();
            Box::pin(async move { Ok(target) })
        });
        Self::new(resolve, options, queues)
    }

    /// The connected backend, connecting (and declaring the queues) first if there is none.
    pub async fn backend(&self) -> Result<Arc<dyn QueueBackend>, QueueError> {
        let mut current = self.current.lock().await;
        if let Some(backend) = current.as_ref() {
            return Ok(backend.clone());
        }
        let target = (self.resolve)().await?;
        let backend = crate::connect(&target, &self.options).await?;
        for spec in &self.queues {
            backend.declare(spec).await?;
        }
        tracing::info!(
            event = "queue.connected",
            broker = %target,
            backend = %backend.kind(),
            "connected to the broker"
        );
        *current = Some(backend.clone());
        Ok(backend)
    }

    /// Forgets `failed` if it is still the current connection, so the next use reconnects.
    pub async fn discard(&self, failed: &Arc<dyn QueueBackend>) {
        let mut current = self.current.lock().await;
        if current
            .as_ref()
            .is_some_and(|backend| Arc::ptr_eq(backend, failed))
        {
            *current = None;
        }
    }

    /// Publishes with confirmation; a connection failure drops the connection for the next call.
    pub async fn publish(
        &self,
        spec: &QueueSpec,
        message: OutgoingMessage,
    ) -> Result<Confirmation, QueueError> {
        let backend = self.backend().await?;
        let result = backend.publish(spec, message).await;
        if let Err(err) = &result
            && err.is_connection_problem()
        {
            self.discard(&backend).await;
        }
        result
    }

    /// Subscribes; a connection failure drops the connection for the next call. When the
    /// subscription itself ends with an error, call [`discard`](Self::discard) with the backend
    /// returned here.
    pub async fn subscribe(
        &self,
        spec: &QueueSpec,
        prefetch: u16,
    ) -> Result<(Arc<dyn QueueBackend>, Subscription), QueueError> {
        let backend = self.backend().await?;
        match backend.subscribe(spec, prefetch).await {
            Ok(subscription) => Ok((backend, subscription)),
            Err(err) => {
                if err.is_connection_problem() {
                    self.discard(&backend).await;
                }
                Err(err)
            }
        }
    }
}
