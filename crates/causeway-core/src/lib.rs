//! Causeway's shared foundations, used by every component process: the typed topology
//! configuration (`causeway.toml`), the supervisor-to-component launch contract, the local
//! certificate authority and rustls configurations, structured logging and Prometheus metrics,
//! W3C trace context, `Server-Timing` hop reports, the registry's wire types, queue names and policies, and the HTTP serving
//! loop with graceful shutdown and the admin endpoint.

pub mod backoff;
pub mod launch;
pub mod principal;
pub mod proxy_config;
pub mod queue_policy;
pub mod refusal;
pub mod registry_api;
pub mod serve;
pub mod server_timing;
pub mod telemetry;
pub mod tls;
pub mod topology;
pub mod trace_context;

pub use launch::{ChildReport, DataDir, InheritedListener, Launch, MeshLaunch};
pub use topology::{Role, Topology};
