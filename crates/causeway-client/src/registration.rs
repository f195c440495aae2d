//! Keeping an instance in the registry: register at start, heartbeat while running, deregister
//! on graceful shutdown. An instance that dies without deregistering drops out of DNS when its
//! heartbeats stop (after the registry's expiry).

use std::net::SocketAddr;
use std::time::Duration;

use causeway_core::registry_api::InstanceRecord;
use causeway_core::serve::Shutdown;
use http::{Method, StatusCode};

use crate::plain_http;

const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
#[error("cannot register {instance} with the registry at {registry}: {message}")]
pub struct RegistrationError {
    pub instance: String,
    pub registry: SocketAddr,
    pub message: String,
}

fn path(record: &InstanceRecord) -> String {
    format!("/v1/registry/{}/{}", record.service, record.instance)
}

/// Registers once.
pub async fn register(
    registry: SocketAddr,
    record: &InstanceRecord,
) -> Result<(), RegistrationError> {
    let error = |message: String| RegistrationError {
        instance: record.instance.clone(),
        registry,
        message,
    };
    let body = serde_json::to_vec(record).map_err(|err| error(err.to_string()))?;
    let (status, answer) = plain_http::request(
        Method::PUT,
        registry,
        &path(record),
        Some(body),
        REQUEST_TIMEOUT,
    )
    .await
    .map_err(|err| error(err.to_string()))?;
    if status != StatusCode::OK {
        return Err(error(format!(
            "{status}: {}",
            String::from_utf8_lossy(&answer)
        )));
    }
    Ok(())
}

/// Registers (retrying for up to `patience`), then heartbeats every `interval` in the background
/// until shutdown, when it deregisters.
pub async fn start(
    registry: SocketAddr,
    record: InstanceRecord,
    interval: Duration,
    patience: Duration,
    mut shutdown: Shutdown,
) -> Result<tokio::task::JoinHandle<()>, RegistrationError> {
    let give_up = tokio::time::Instant::now() + patience;
    loop {
        match register(registry, &record).await {
            Ok(()) => break,
            Err(err) if tokio::time::Instant::now() >= give_up => return Err(err),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    tracing::info!(instance = %record.instance, %registry, addr = %record.addr, "registered");
    Ok(tokio::spawn(async move {
        let mut healthy = true;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = shutdown.wait() => break,
            }
            match register(registry, &record).await {
                Ok(()) if !healthy => {
                    healthy = true;
                    tracing::info!(instance = %record.instance, "heartbeats reach the registry again");
                }
                Ok(()) => {}
                Err(err) if healthy => {
                    healthy = false;
                    tracing::warn!(error = %err, "heartbeat failed; will keep trying");
                }
                Err(_) => {}
            }
        }
        let result = plain_http::request(
            Method::DELETE,
            registry,
            &path(&record),
            None,
            REQUEST_TIMEOUT,
        )
        .await;
        match result {
            Ok(_) => tracing::info!(instance = %record.instance, "deregistered"),
            Err(err) => tracing::warn!(error = %err, "deregistration failed"),
        }
    }))
}
