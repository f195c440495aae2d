//! The one doubling backoff every retry in Causeway waits by: queue redeliveries and the proxy
//! engine's retries between attempts.

use std::time::Duration;

/// The wait after failed attempt `attempt` (1-based): `initial_ms`, doubled per attempt, at
/// most `max_ms` (never less than `initial_ms`).
pub fn doubling(initial_ms: u64, max_ms: u64, attempt: u32) -> Duration {
    let doublings = attempt.saturating_sub(1).min(32);
    let millis = initial_ms
        .saturating_mul(1u64 << doublings)
        .min(max_ms.max(initial_ms));
    Duration::from_millis(millis)
}
