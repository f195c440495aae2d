//! Causeway's proxy engine: the machinery every proxy role is built from, and the roles. Today:
//! the edge load balancer (layer 4, health-checked, over the reverse-proxy instances) and the
//! reverse proxy / API gateway (TLS termination, JWT and rate-limit checks, path routing to
//! services through the shared client library). Both find their upstreams through discovery and
//! report Prometheus metrics; the ingress and mesh-sidecar roles are to be configured on the same
//! parts.

pub mod auth;
pub mod balancer;
pub mod gateway;
pub mod hygiene;
pub mod ingress;
pub mod upstream;

pub use balancer::Balancer;
pub use gateway::Gateway;
