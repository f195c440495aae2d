//! The one client library every Causeway service and proxy uses to reach another service:
//! discovery through the internal DNS server (SRV records, cached for their TTL), per-request
//! balancing over the instances, HTTP/2 over TLS verified against the local CA, connect and
//! attempt timeouts with an overall deadline, retries on another instance when that is safe, and
//! W3C trace context on every outgoing request. It also keeps an instance registered.

pub mod client;
pub mod coalesce;
pub mod connection;
pub mod discovery;
pub mod grpc;
pub mod plain_http;
pub mod registration;

pub use client::{
    Attempt, CallError, CallOptions, CallReport, ClientSettings, IDEMPOTENCY_KEY, ServiceClient,
};
pub use discovery::{Discovery, Endpoint, Resolution, ResolveError};
