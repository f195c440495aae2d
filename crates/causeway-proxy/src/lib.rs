//! Causeway's proxy engine: the machinery every proxy role is built from, and the roles. The
//! machinery: [`upstream`] (endpoint sets, balancing, outlier ejection, health checks, retry
//! budgets), [`hygiene`] (hop-by-hop headers, forwarding headers, smuggling checks, limits),
//! [`routing`] (route tables from the topology or from Kubernetes [`ingress`] documents) and
//! [`reload`] (swapping configuration without dropping requests). The roles: the edge load
//! balancer (layer 4, over the reverse-proxy instances) and the reverse proxy / API gateway /
//! ingress (TLS termination, JWT and rate-limit checks, routing to discovered services or to fixed
//! upstreams, both through the same [`upstream`] machinery: balancing, ejection and retries
//! within a budget per route). Both find their upstreams through discovery and report
//! Prometheus metrics; the mesh-sidecar role is to be configured on the same parts.

pub mod auth;
pub mod balancer;
pub mod gateway;
pub mod hygiene;
pub mod ingress;
pub mod rate_limit;
pub mod reload;
pub mod routing;
pub mod sidecar;
pub mod upstream;

pub use balancer::Balancer;
pub use gateway::Gateway;
