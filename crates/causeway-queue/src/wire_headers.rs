//! Header rules shared by the backends that carry Causeway's bookkeeping in message headers (AMQP
//! headers, MQTT 5 user properties): the attempt count, the dead-letter annotations and the
//! headers a broker adds that must not travel with a republished copy.

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;

use crate::{QueueError, Settle, dead_letter_queue_name, headers};

/// A delivery that the library settles by publishing a confirmed copy and only then acking the
/// original (a crash in between duplicates, never loses): retries and dead letters on AMQP and
/// MQTT. The backend says how to publish, ack and delay; [`Settle`] follows from it.
#[async_trait]
pub(crate) trait CopyThenAck: Send + Sync {
    fn queue(&self) -> &str;
    fn headers(&self) -> &BTreeMap<String, String>;
    /// Publishes the payload with `headers` to `queue` and waits for the broker's confirmation.
    async fn publish_copy(
        &self,
        queue: &str,
        headers: &BTreeMap<String, String>,
    ) -> Result<(), QueueError>;
    async fn ack_original(&self) -> Result<(), QueueError>;
    /// Where a copy that must wait `delay` (non-zero) goes; may add headers to `copy`.
    async fn delayed_queue(
        &self,
        delay: Duration,
        copy: &mut BTreeMap<String, String>,
    ) -> Result<String, QueueError>;
}

#[async_trait]
impl<T: CopyThenAck> Settle for T {
    async fn ack(self: Box<Self>) -> Result<(), QueueError> {
        self.ack_original().await
    }

    async fn redeliver(
        self: Box<Self>,
        delay: Duration,
        next_attempt: u32,
    ) -> Result<(), QueueError> {
        let mut copy = retry_headers(self.headers(), next_attempt);
        let target = if delay.is_zero() {
            self.queue().to_string()
        } else {
            self.delayed_queue(delay, &mut copy).await?
        };
        self.publish_copy(&target, &copy).await?;
        self.ack_original().await
    }

    async fn dead_letter(self: Box<Self>, reason: &str, attempts: u32) -> Result<(), QueueError> {
        let copy = dead_letter_headers(self.headers(), self.queue(), reason, attempts);
        self.publish_copy(&dead_letter_queue_name(self.queue()), &copy)
            .await?;
        self.ack_original().await
    }
}

/// Headers a broker adds on its own (RabbitMQ's dead-lettering and quorum-queue bookkeeping, our
/// MQTT not-before time): dropped when a message is copied, so a copy starts clean.
pub(crate) fn is_transport_header(name: &str) -> bool {
    matches!(name, "x-death" | "x-delivery-count" | NOT_BEFORE)
        || name.starts_with("x-first-death-")
        || name.starts_with("x-last-death-")
}

/// Milliseconds since the Unix epoch before which a copy must not be delivered (MQTT only: the
/// consumer waits it out, since MQTT brokers cannot delay a message).
pub(crate) const NOT_BEFORE: &str = "x-causeway-not-before";

/// The attempt recorded in `headers` (1 when absent or unreadable: a first delivery).
pub(crate) fn recorded_attempt(headers: &BTreeMap<String, String>) -> u32 {
    headers
        .get(headers::ATTEMPT)
        .and_then(|value| value.trim().parse::<u32>().ok())
        .unwrap_or(1)
        .max(1)
}

/// The headers of a copy to deliver again as attempt `next_attempt`.
pub(crate) fn retry_headers(
    headers: &BTreeMap<String, String>,
    next_attempt: u32,
) -> BTreeMap<String, String> {
    let mut copy = clean_copy(headers);
    copy.insert(headers::ATTEMPT.to_string(), next_attempt.to_string());
    copy
}

/// The headers of a dead letter of `queue` that failed `attempts` times because of `reason`.
pub(crate) fn dead_letter_headers(
    headers: &BTreeMap<String, String>,
    queue: &str,
    reason: &str,
    attempts: u32,
) -> BTreeMap<String, String> {
    let mut copy = clean_copy(headers);
    copy.insert(headers::ATTEMPT.to_string(), attempts.to_string());
    copy.insert(headers::DEAD_LETTER_REASON.to_string(), reason.to_string());
    copy.insert(headers::ORIGINAL_QUEUE.to_string(), queue.to_string());
    copy
}

/// The headers of a redriven dead letter: no dead-letter annotations, attempts start over.
pub(crate) fn redrive_headers(headers: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    let mut copy = clean_copy(headers);
    for name in [
        headers::ATTEMPT,
        headers::DEAD_LETTER_REASON,
        headers::ORIGINAL_QUEUE,
    ] {
        copy.remove(name);
    }
    copy
}

/// Deliveries so far of a message at rest: a dead letter records its attempts; a queued message
/// waiting for attempt `n` was delivered `n - 1` times, plus `returned` broker-side returns.
pub(crate) fn deliveries_so_far(headers: &BTreeMap<String, String>, returned: u32) -> u32 {
    let recorded = recorded_attempt(headers);
    if headers.contains_key(headers::DEAD_LETTER_REASON) {
        recorded
    } else {
        recorded - 1 + returned
    }
}

fn clean_copy(headers: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    headers
        .iter()
        .filter(|(name, _)| !is_transport_header(name))
        .map(|(name, value)| (name.clone(), value.clone()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn copies_carry_the_attempt_and_drop_broker_headers() {
        let original = map(&[
            (headers::MESSAGE_ID, "m1"),
            ("x-delivery-count", "2"),
            ("x-first-death-queue", "q.retry.100"),
            (NOT_BEFORE, "123"),
        ]);
        assert_eq!(recorded_attempt(&original), 1);
        let retry = retry_headers(&original, 3);
        assert_eq!(
            retry,
            map(&[(headers::MESSAGE_ID, "m1"), (headers::ATTEMPT, "3")])
        );
        let dead = dead_letter_headers(&retry, "q", "boom", 3);
        assert_eq!(dead[headers::DEAD_LETTER_REASON], "boom");
        assert_eq!(dead[headers::ORIGINAL_QUEUE], "q");
        assert_eq!(deliveries_so_far(&dead, 0), 3);
        assert_eq!(deliveries_so_far(&retry, 1), 3);
        assert_eq!(redrive_headers(&dead), map(&[(headers::MESSAGE_ID, "m1")]));
    }
}
