//! The configuration a user or a cluster hands over: a topology file (TOML) and Kubernetes
//! Ingress documents (YAML). Each parses and validates, or says why; none panics.
#![no_main]

use causeway_core::topology::Topology;
use causeway_proxy::ingress::IngressRoutes;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(topology) = Topology::parse(text) {
        let _ = topology.validate();
    }
    if let Ok(routes) = IngressRoutes::from_yaml_str(text) {
        // Whatever was accepted can be looked up.
        let _ = routes.lookup(Some("example.com"), "/api/x");
        let _ = routes.lookup(None, "/");
        let _ = routes.tls_secret_for("example.com");
    }
});
