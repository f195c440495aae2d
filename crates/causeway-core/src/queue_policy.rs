//! Queue names and policies: shared by the topology (which declares the queues), the queue
//! library's backends and the embedded broker, so that all of them apply the same rules.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A queue name that cannot be used everywhere.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid queue name {name:?}: {reason}")]
pub struct QueueNameError {
    pub name: String,
    pub reason: &'static str,
}

/// A payload a queue does not accept.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PayloadError {
    #[error("payload of {size} bytes exceeds the queue's limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
    #[error("payload is not JSON: {0}")]
    NotJson(String),
}

/// The suffix of a queue's dead-letter queue: `notification-queue` -> `notification-queue.dlq`.
pub const DEAD_LETTER_SUFFIX: &str = ".dlq";

/// The longest queue name; AMQP allows 255 bytes, MQTT topics more, and names also become file
/// and table keys in the embedded broker.
pub const MAX_QUEUE_NAME_BYTES: usize = 200;

/// The dead-letter queue of `queue`.
pub fn dead_letter_queue_name(queue: &str) -> String {
    format!("{queue}{DEAD_LETTER_SUFFIX}")
}

/// Queue names are ASCII letters, digits, `-`, `_` and `.`, so that the same name is valid as an
/// AMQP queue, an MQTT topic level and a key in the embedded broker.
pub fn validate_queue_name(name: &str) -> Result<(), QueueNameError> {
    let invalid = |reason| {
        Err(QueueNameError {
            name: name.to_string(),
            reason,
        })
    };
    if name.is_empty() {
        return invalid("it is empty");
    }
    if name.len() > MAX_QUEUE_NAME_BYTES {
        return invalid("it is longer than 200 bytes");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return invalid("only ASCII letters, digits, '-', '_' and '.' are allowed");
    }
    if name.starts_with('.') || name.ends_with('.') {
        return invalid("it may not start or end with '.'");
    }
    Ok(())
}

/// How a queue treats failures and what it accepts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QueuePolicy {
    /// Deliveries before a message that keeps failing goes to the dead-letter queue.
    pub max_attempts: u32,
    /// The wait before the second attempt; each later wait doubles, up to `max_backoff_ms`.
    pub initial_backoff_ms: u64,
    pub max_backoff_ms: u64,
    /// Larger payloads are refused at publish.
    pub max_payload_bytes: usize,
}

impl Default for QueuePolicy {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            initial_backoff_ms: 200,
            max_backoff_ms: 10_000,
            max_payload_bytes: 256 * 1024,
        }
    }
}

impl QueuePolicy {
    /// The wait after failed attempt `attempt` (1-based) before the next one.
    pub fn backoff(&self, attempt: u32) -> Duration {
        crate::backoff::doubling(self.initial_backoff_ms, self.max_backoff_ms, attempt)
    }

    /// Payloads are JSON documents of at most `max_payload_bytes`.
    pub fn validate_payload(&self, payload: &[u8]) -> Result<(), PayloadError> {
        if payload.len() > self.max_payload_bytes {
            return Err(PayloadError::TooLarge {
                size: payload.len(),
                limit: self.max_payload_bytes,
            });
        }
        serde_json::from_slice::<serde::de::IgnoredAny>(payload)
            .map(|_| ())
            .map_err(|err| PayloadError::NotJson(err.to_string()))
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.max_attempts == 0 {
            return Err("max_attempts must be at least 1".into());
        }
        if self.max_payload_bytes == 0 {
            return Err("max_payload_bytes must be positive".into());
        }
        Ok(())
    }
}

/// A queue and its policy: what services declare, publish to and consume from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSpec {
    pub name: String,
    #[serde(default)]
    pub policy: QueuePolicy,
}

impl QueueSpec {
    pub fn new(name: impl Into<String>, policy: QueuePolicy) -> Self {
        Self {
            name: name.into(),
            policy,
        }
    }

    pub fn dead_letter_queue(&self) -> String {
        dead_letter_queue_name(&self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let policy = QueuePolicy {
            initial_backoff_ms: 100,
            max_backoff_ms: 1000,
            ..QueuePolicy::default()
        };
        let waits: Vec<u64> = (1..=6)
            .map(|attempt| policy.backoff(attempt).as_millis() as u64)
            .collect();
        assert_eq!(waits, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(policy.backoff(u32::MAX), Duration::from_millis(1000));
    }

    #[test]
    fn payloads_must_be_json_within_the_limit() {
        let policy = QueuePolicy {
            max_payload_bytes: 32,
            ..QueuePolicy::default()
        };
        policy.validate_payload(br#"{"emailId":123}"#).unwrap();
        assert!(matches!(
            policy.validate_payload(b"not json"),
            Err(PayloadError::NotJson(_))
        ));
        assert!(matches!(
            policy.validate_payload(br#"{"emailId":123,"status":"sent","x":1}"#),
            Err(PayloadError::TooLarge {
                size: 37,
                limit: 32
            })
        ));
    }

    #[test]
    fn queue_names_are_checked() {
        validate_queue_name("notification-queue").unwrap();
        validate_queue_name("notification-queue.dlq").unwrap();
        for bad in ["", ".x", "x.", "a/b", "a b", "#", "é"] {
            assert!(validate_queue_name(bad).is_err(), "{bad:?} accepted");
        }
        assert!(validate_queue_name(&"q".repeat(201)).is_err());
    }
}
