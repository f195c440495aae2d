//! Active health checks: a task per upstream sends `GET <path>` over plain HTTP/1.1 to every
//! endpoint each interval (with the shared client library's one-shot request, a fresh connection
//! each time so a check also proves the endpoint still accepts connections). A 2xx passes;
//! anything else, a timeout or a refused connect fails. `unhealthy_threshold` consecutive
//! failures take an endpoint out of balancing, `healthy_threshold` consecutive passes put it back.

use std::sync::Arc;

use causeway_client::plain_http;
use causeway_core::serve::Shutdown;
use futures_util::future::join_all;
use http::Method;
use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;

use super::Upstream;
use super::endpoint::{Endpoint, lock};

pub use causeway_core::proxy_config::HealthCheckConfig;

/// Counts one check result; returns the endpoint's new health when it changes.
pub(crate) fn apply_check(
    endpoint: &Endpoint,
    passed: bool,
    config: &HealthCheckConfig,
) -> Option<bool> {
    let mut counters = lock(&endpoint.health);
    if passed {
        counters.passes = counters.passes.saturating_add(1);
        counters.failures = 0;
    } else {
        counters.failures = counters.failures.saturating_add(1);
        counters.passes = 0;
    }
    let healthy = endpoint.is_healthy();
    if healthy && counters.failures >= config.unhealthy_threshold.max(1) {
        endpoint.set_healthy(false);
        Some(false)
    } else if !healthy && counters.passes >= config.healthy_threshold.max(1) {
        endpoint.set_healthy(true);
        Some(true)
    } else {
        None
    }
}

/// One check of one endpoint.
pub async fn check_endpoint(endpoint: &Endpoint, config: &HealthCheckConfig) -> bool {
    let addr = endpoint.health_addr();
    match plain_http::request(Method::GET, addr, &config.path, None, config.timeout()).await {
        Ok((status, _)) => status.is_success(),
        Err(err) => {
            tracing::debug!(
                event = "upstream.health_check_failed",
                upstream = endpoint.upstream(),
                endpoint = endpoint.id(),
                error = %err,
            );
            false
        }
    }
}

/// Checks every endpoint of the upstream once, concurrently, and applies the results.
pub async fn check_round(upstream: &Upstream, config: &HealthCheckConfig) {
    let endpoints = upstream.endpoints();
    let results = join_all(
        endpoints
            .iter()
            .map(|endpoint| check_endpoint(endpoint, config)),
    )
    .await;
    for (endpoint, passed) in endpoints.iter().zip(results) {
        apply_result(upstream, endpoint, passed, config);
    }
}

fn apply_result(
    upstream: &Upstream,
    endpoint: &Arc<Endpoint>,
    passed: bool,
    config: &HealthCheckConfig,
) {
    let Some(healthy) = apply_check(endpoint, passed, config) else {
        return;
    };
    upstream.metrics().set_healthy(endpoint, healthy);
    if healthy {
        tracing::info!(
            event = "upstream.healthy",
            upstream = endpoint.upstream(),
            endpoint = endpoint.id(),
            addr = %endpoint.addr(),
        );
    } else {
        tracing::warn!(
            event = "upstream.unhealthy",
            upstream = endpoint.upstream(),
            endpoint = endpoint.id(),
            addr = %endpoint.addr(),
        );
    }
}

/// Runs checks every interval until shutdown fires (a round in progress is abandoned).
pub fn spawn_health_checker(
    upstream: Upstream,
    config: HealthCheckConfig,
    mut shutdown: Shutdown,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(config.interval());
        // A slow round must not be followed by a burst of catch-up rounds.
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.wait() => break,
                _ = async {
                    ticks.tick().await;
                    check_round(&upstream, &config).await;
                } => {}
            }
        }
    })
}
