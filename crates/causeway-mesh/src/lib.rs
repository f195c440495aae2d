//! The service mesh's control plane (technique 4). It owns workload identity: the mesh
//! certificate authority, an intermediate under the local root CA that signs SPIFFE certificates
//! (`spiffe://<trust-domain>/ns/<namespace>/sa/<service>` as the one URI SAN) from the sidecars'
//! CSRs, and the bootstrap tokens with which a sidecar proves which workload it is before it has
//! a certificate; and the mesh policy file (Gateway API `HTTPRoute` timeouts and retries, Istio-style
//! `AuthorizationPolicy`, default deny) with the decisions it makes. Sidecars themselves are a role of `causeway-proxy`'s engine; this crate gives
//! them what they verify peers with: [`tls`] (mutual TLS by SPIFFE ID, identities rotated in
//! place), [`client`] (a key made locally, a CSR, the `Certify` call) and [`watch`] (the
//! configuration the control plane streams, applied and acknowledged).

pub mod authority;
pub mod bootstrap;
pub mod client;
pub mod policy;
pub mod server;
pub mod spiffe;
pub mod tls;
pub mod watch;

pub use authority::{AuthorityError, Issued, MeshAuthority};
pub use bootstrap::{Bootstrap, BootstrapKey, TokenError, TokenVerifier};
pub use policy::{Decision, MeshPolicy, PolicyError, RouteRule, RuleRef};
pub use spiffe::{SpiffeError, SpiffeId};
