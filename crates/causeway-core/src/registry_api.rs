//! Wire types of the instance registry's HTTP API, shared by the discovery server (which serves them)
//! and the client library (which registers instances and heartbeats).
//!
//! `PUT    /v1/registry/{service}/{instance}`  register or heartbeat, body: [`InstanceRecord`]
//! `DELETE /v1/registry/{service}/{instance}`  deregister (graceful shutdown)
//! `GET    /v1/registry`                       every live instance: [`RegistryListing`]
//! `GET    /v1/registry/{service}`             one service's live instances: `Vec<RegisteredInstance>`

use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// What an instance says about itself when it registers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceRecord {
    /// Service name, a DNS label: `order-service` is served as `order-service.internal`.
    pub service: String,
    /// Instance name, a DNS label unique within the service: `order-service-2`.
    pub instance: String,
    /// Where clients connect (the instance's TLS listener).
    pub addr: SocketAddr,
    /// Plain-HTTP admin listener with `/healthz` and `/metrics`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_addr: Option<SocketAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
}

/// A live registry entry as the registry reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisteredInstance {
    #[serde(flatten)]
    pub record: InstanceRecord,
    /// Milliseconds since the last heartbeat.
    pub last_seen_ms_ago: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegistryListing {
    /// How long an instance stays listed without a heartbeat.
    pub expiry_ms: u64,
    pub services: BTreeMap<String, Vec<RegisteredInstance>>,
}

/// The JSON body of every error answer across Causeway's HTTP APIs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// Stable machine-readable code, e.g. `invalid_token`.
    pub error: String,
    /// What went wrong, for a person.
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}

/// Whether `name` is usable as one DNS label (and so as a service or instance name).
pub fn is_dns_label(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && !name.starts_with('-')
        && !name.ends_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_labels() {
        assert!(is_dns_label("order-service"));
        assert!(is_dns_label("order-service-2"));
        assert!(!is_dns_label(""));
        assert!(!is_dns_label("-order"));
        assert!(!is_dns_label("Order"));
        assert!(!is_dns_label("order.service"));
        assert!(!is_dns_label(&"a".repeat(64)));
    }

    #[test]
    fn record_round_trips_as_json() {
        let record = InstanceRecord {
            service: "order-service".into(),
            instance: "order-service-1".into(),
            addr: "127.0.0.1:9000".parse().unwrap(),
            admin_addr: None,
            pid: Some(42),
        };
        let json = serde_json::to_string(&record).unwrap();
        assert!(!json.contains("admin_addr"));
        assert_eq!(
            serde_json::from_str::<InstanceRecord>(&json).unwrap(),
            record
        );
    }
}
