//! The reverse proxy's route table: which route a request takes. Routes come either from the
//! topology's `reverse_proxy.routes` (the longest matching path prefix wins) or, when
//! `reverse_proxy.ingress` names files, from Kubernetes Ingress documents, matched by host and
//! path as the Ingress API specifies (see [`crate::ingress`]). Either way the gateway sees one
//! list of [`RouteConfig`]s and an index into it per request, so everything it does per route
//! (auth, prefix stripping, forwarding, metrics) is the same for both sources.

use std::path::PathBuf;

use causeway_core::topology::RouteConfig;
use causeway_mesh::policy::PathMatch;

use crate::ingress::{IngressError, IngressRoutes};

pub struct RouteTable {
    routes: Vec<RouteConfig>,
    matcher: Matcher,
}

enum Matcher {
    /// Indexes into `routes`, longest prefix first.
    Prefix(Vec<usize>),
    /// By the host's first label (a service name, as a mesh sidecar's app calls it), then by
    /// path as the Gateway API matches it: each host's routes in order of precedence (exact
    /// paths, then the longest segment-wise prefix).
    Host(std::collections::HashMap<String, Vec<(PathMatch, usize)>>),
    /// The Ingress table, and each Ingress route's index in `routes` by its id.
    Ingress {
        table: Box<IngressRoutes>,
        index: std::collections::HashMap<String, usize>,
    },
}

impl RouteTable {
    /// Routes by path prefix, the longest matching prefix first.
    pub fn from_routes(routes: Vec<RouteConfig>) -> Self {
        let mut order: Vec<usize> = (0..routes.len()).collect();
        // Stable: among equal prefixes the first configured wins.
        order.sort_by_key(|&index| std::cmp::Reverse(routes[index].prefix.len()));
        Self {
            routes,
            matcher: Matcher::Prefix(order),
        }
    }

    /// Routes per host: a request to `order-service`, `order-service:80` or
    /// `order-service.mesh` takes the first of that host's routes whose path matches, exact
    /// paths first, then the longest prefix (matched by whole segments).
    pub fn by_host(hosts: Vec<(String, Vec<(PathMatch, RouteConfig)>)>) -> Self {
        let mut routes = Vec::new();
        let mut by_host = std::collections::HashMap::new();
        for (host, host_routes) in hosts {
            let mut order = Vec::with_capacity(host_routes.len());
            for (path, route) in host_routes {
                order.push((path, routes.len()));
                routes.push(route);
            }
            // Stable: among equal paths the first listed wins.
            order.sort_by_key(|(path, _)| std::cmp::Reverse(path.precedence()));
            by_host.insert(host, order);
        }
        Self {
            routes,
            matcher: Matcher::Host(by_host),
        }
    }

    /// Routes from Ingress documents. Each Ingress route becomes a route to its backend service
    /// through discovery, with the Ingress's `causeway.dev/*` annotations.
    pub fn from_ingress(table: IngressRoutes) -> Self {
        let mut routes = Vec::new();
        let mut index = std::collections::HashMap::new();
        for route in table.routes() {
            index.insert(route.id.clone(), routes.len());
            routes.push(RouteConfig {
                prefix: route.path.clone().unwrap_or_else(|| "/".into()),
                service: route.backend.service.clone(),
                strip_prefix: route.strip_prefix.clone(),
                auth: route.auth,
                upstream: None,
                policy: {
                    let mut policy = causeway_core::topology::service_route_policy();
                    if let Some(balance) = &route.balance {
                        policy.balance = balance.clone();
                    }
                    policy
                },
            });
        }
        Self {
            routes,
            matcher: Matcher::Ingress {
                table: Box::new(table),
                index,
            },
        }
    }

    /// The Ingress files' routes if any are named, else `routes`.
    pub fn load(routes: &[RouteConfig], ingress_files: &[PathBuf]) -> Result<Self, IngressError> {
        if ingress_files.is_empty() {
            return Ok(Self::from_routes(routes.to_vec()));
        }
        Ok(Self::from_ingress(IngressRoutes::from_files(
            ingress_files,
        )?))
    }

    pub fn routes(&self) -> &[RouteConfig] {
        &self.routes
    }

    /// The index in [`routes`](Self::routes) of the route for a request to `host` (the `Host`
    /// header or `:authority`, port allowed) and `path`.
    pub fn lookup(&self, host: Option<&str>, path: &str) -> Option<usize> {
        match &self.matcher {
            Matcher::Prefix(order) => order
                .iter()
                .copied()
                .find(|&index| path.starts_with(&self.routes[index].prefix)),
            Matcher::Host(by_host) => {
                let host = host?;
                let name = host.split([':', '.']).next().unwrap_or(host);
                by_host
                    .get(name)?
                    .iter()
                    .find(|(pattern, _)| pattern.matches(path))
                    .map(|&(_, index)| index)
            }
            Matcher::Ingress { table, index } => table
                .lookup_route(host, path)
                .and_then(|route| index.get(&route.id).copied()),
        }
    }

    /// How the table was built, for logs.
    pub fn source(&self) -> &'static str {
        match self.matcher {
            Matcher::Prefix(_) => "topology routes",
            Matcher::Host(_) => "mesh destinations",
            Matcher::Ingress { .. } => "ingress files",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(prefix: &str, service: &str) -> RouteConfig {
        RouteConfig {
            prefix: prefix.into(),
            service: service.into(),
            strip_prefix: None,
            auth: true,
            upstream: None,
            policy: causeway_core::topology::service_route_policy(),
        }
    }

    #[test]
    fn the_longest_prefix_wins_whatever_the_order() {
        let table = RouteTable::from_routes(vec![
            route("/api/", "api"),
            route("/api/users/", "users"),
            route("/", "web"),
        ]);
        let service = |path: &str| {
            table
                .lookup(None, path)
                .map(|index| table.routes()[index].service.as_str())
        };
        assert_eq!(service("/api/users/1"), Some("users"));
        assert_eq!(service("/api/orders"), Some("api"));
        assert_eq!(service("/index.html"), Some("web"));
        let no_root = RouteTable::from_routes(vec![route("/api/", "api")]);
        assert_eq!(no_root.lookup(None, "/other"), None);
    }

    #[test]
    fn mesh_hosts_match_exact_paths_first_then_whole_segment_prefixes() {
        let exact = |path: &str| PathMatch::Exact(path.into());
        let prefix = |path: &str| PathMatch::Prefix(path.into());
        let table = RouteTable::by_host(vec![
            (
                "order-service".into(),
                vec![
                    (prefix("/"), route("/", "catch-all")),
                    (prefix("/orders"), route("/orders", "orders-prefix")),
                    (
                        exact("/orders/1/paid"),
                        route("/orders/1/paid", "paid-exact"),
                    ),
                ],
            ),
            (
                "user-service".into(),
                vec![(prefix("/users/"), route("/users/", "users"))],
            ),
        ]);
        let service = |host: &str, path: &str| {
            table
                .lookup(Some(host), path)
                .map(|index| table.routes()[index].service.as_str())
        };
        assert_eq!(
            service("order-service", "/orders/1/paid"),
            Some("paid-exact")
        );
        // An exact path is not a prefix of a longer one.
        assert_eq!(
            service("order-service", "/orders/1/paid/x"),
            Some("orders-prefix")
        );
        assert_eq!(
            service("order-service:80", "/orders"),
            Some("orders-prefix")
        );
        // A prefix matches whole segments only.
        assert_eq!(service("order-service.mesh", "/ordersx"), Some("catch-all"));
        assert_eq!(service("user-service", "/users"), Some("users"));
        assert_eq!(service("user-service", "/usersx"), None);
        assert_eq!(service("payment-service", "/orders"), None);
        assert_eq!(table.lookup(None, "/orders"), None);
    }

    #[test]
    fn ingress_routes_match_by_host_and_path_and_keep_annotations() {
        let yaml = r#"
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata:
  name: shop
  annotations: {causeway.dev/strip-prefix: /api, causeway.dev/balance: round_robin}
spec:
  rules:
  - host: shop.example.com
    http:
      paths:
      - {path: /api/cart, pathType: Prefix, backend: {service: {name: cart, port: {number: 80}}}}
  - http:
      paths:
      - {path: /api, pathType: Prefix, backend: {service: {name: api, port: {name: https}}}}
      - {path: /api/cart, pathType: Exact, backend: {service: {name: cart-exact, port: {number: 80}}}}
"#;
        let table = RouteTable::from_ingress(IngressRoutes::from_yaml_str(yaml).unwrap());
        assert_eq!(table.routes().len(), 3);
        // The balance annotation sets the policy; the rest stays the service-route default.
        let mut round_robin = causeway_core::topology::service_route_policy();
        round_robin.balance = crate::upstream::BalancePolicy::RoundRobin;
        assert!(
            table
                .routes()
                .iter()
                .all(|route| route.policy == round_robin)
        );
        let pick = |host: Option<&str>, path: &str| {
            table
                .lookup(host, path)
                .map(|index| table.routes()[index].clone())
        };
        let cart = pick(Some("shop.example.com:8443"), "/api/cart/items").unwrap();
        assert_eq!(cart.service, "cart");
        assert_eq!(cart.strip_prefix.as_deref(), Some("/api"));
        assert!(cart.auth);
        assert_eq!(pick(None, "/api/cart").unwrap().service, "cart-exact");
        assert_eq!(pick(None, "/api/cart/x").unwrap().service, "api");
        assert_eq!(
            pick(Some("other.example.com"), "/api/x").unwrap().service,
            "api"
        );
        // The Ingress API matches whole path elements, unlike a plain prefix.
        assert!(pick(None, "/apix").is_none());
        // A host with its own rules does not fall back to the host-less rules.
        assert!(pick(Some("shop.example.com"), "/api/other").is_none());
    }

    #[test]
    fn loading_prefers_ingress_files_and_reports_their_errors() {
        let dir = std::env::temp_dir().join(format!("causeway-routing-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("routes.yaml");
        std::fs::write(
            &file,
            "apiVersion: v1\nkind: Service\nmetadata: {name: x}\n",
        )
        .unwrap();
        let topology_routes = [route("/api/", "api")];
        let from_topology = RouteTable::load(&topology_routes, &[]).unwrap();
        assert_eq!(from_topology.source(), "topology routes");
        let err = RouteTable::load(&topology_routes, std::slice::from_ref(&file))
            .err()
            .expect("a Service is not an Ingress");
        assert!(err.to_string().contains("routes.yaml"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
