//! The ingress role's routing: routes read from Kubernetes `networking.k8s.io/v1` Ingress
//! documents, so that one YAML file (several documents separated by `---`) configures both the
//! local run and a cluster.
//!
//! Only what routing needs is read: `metadata.name`/`namespace`, `spec.ingressClassName`,
//! `spec.defaultBackend`, `spec.tls[]` and `spec.rules[]`, plus Causeway's own annotations (as
//! ingress-nginx reads `nginx.ingress.kubernetes.io/*`): [`STRIP_PREFIX_ANNOTATION`] removes a
//! path prefix before forwarding, [`AUTH_ANNOTATION`] `"false"` makes the Ingress's routes
//! public (by default the gateway requires a valid token), and [`BALANCE_ANNOTATION`] picks the
//! balancing policy over the backend's instances. Every other field (labels, other
//! annotations, `status`, ...) is ignored, as a controller ignores what it doesn't implement.
//! Matching follows <https://kubernetes.io/docs/concepts/services-networking/ingress/>:
//!
//! - Hosts: an exact host beats a wildcard (`*.foo.com` covers exactly one DNS label:
//!   `bar.foo.com`, not `baz.bar.foo.com` nor `foo.com`), which beats rules without a host. The
//!   host is chosen first and the path is matched among that host's paths only (as ingress-nginx's
//!   server blocks do); a host whose paths don't match falls to the default backend, not to a less
//!   specific host. Ingresses naming the same host have their paths merged.
//! - Paths: `Exact` compares the whole path, case-sensitively. `Prefix` compares `/`-separated
//!   elements, ignoring a trailing slash (`/foo/bar/` matches `/foo/bar` and `/foo/bar/baz`, not
//!   `/foo/barbaz`). `ImplementationSpecific` is treated as `Prefix` here: the API leaves its
//!   meaning to the controller and element-wise prefix is the least surprising choice. The
//!   longest path wins, and `Exact` beats `Prefix` of the same length. Identical paths keep the
//!   first in file order.
//! - Documents whose `ingressClassName` names a class other than [`INGRESS_CLASS`] are skipped
//!   (another controller's), and listed by [`IngressRoutes::skipped`]; no class means ours.
//! - Only one default backend may be configured across all documents; two different ones are an
//!   error rather than a silent pick.
//!
//! YAML is read with `serde-saphyr`: `serde_yaml` is deprecated and unmaintained, and its forks
//! (`serde_yaml_ng`, `serde_norway`) still sit on `unsafe-libyaml`, a C-to-Rust translation.
//! `serde-saphyr` is actively released, pure safe Rust on a maintained YAML 1.2 parser, designed
//! for panic-free parsing with budgets against hostile input (anchor bombs), and reports
//! line/column in its errors, which is what a hand-edited routing file needs.

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;

use serde::Deserialize;
use serde::de::IgnoredAny;

use crate::upstream::BalancePolicy;

/// The `ingressClassName` this controller serves (documents without a class are served too).
pub const INGRESS_CLASS: &str = "causeway";

const API_VERSION: &str = "networking.k8s.io/v1";
const KIND: &str = "Ingress";

#[derive(Debug, thiserror::Error)]
pub enum IngressError {
    #[error("cannot read ingress file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{source_name}: invalid YAML: {message}")]
    Yaml {
        source_name: String,
        message: String,
    },
    #[error("{source_name}, document {document}{ingress}: {field}: {message}")]
    Invalid {
        source_name: String,
        /// 1-based, counting non-empty documents.
        document: usize,
        /// ` (namespace/name)` when known, for the message.
        ingress: String,
        field: String,
        message: String,
    },
    #[error("default backends conflict: {first} and {second} both set spec.defaultBackend")]
    DefaultBackendConflict { first: String, second: String },
}

/// A Service port, by number or by name (a name resolves through SRV records, e.g. `_https._tcp`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ServicePort {
    Number(u16),
    Name(String),
}

impl fmt::Display for ServicePort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServicePort::Number(number) => write!(f, "{number}"),
            ServicePort::Name(name) => f.write_str(name),
        }
    }
}

/// Where a matched request goes: a Service (in the Ingress's namespace) and its port.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Backend {
    pub service: String,
    pub port: ServicePort,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PathType {
    Exact,
    Prefix,
    /// Matched as `Prefix` (see the module doc).
    ImplementationSpecific,
}

/// A matched route, for routing, logs and metrics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    /// `<namespace>/<name>#<rule index><path>`, or `<namespace>/<name>#default`.
    pub id: String,
    pub backend: Backend,
    /// The Ingress's namespace, where `backend.service` lives.
    pub namespace: String,
    /// The rule's host as written (`*.foo.com`), `None` for all hosts or the default backend.
    pub host: Option<String>,
    /// The path as written, `None` for the default backend.
    pub path: Option<String>,
    pub path_type: Option<PathType>,
    /// From [`STRIP_PREFIX_ANNOTATION`]: removed from the path before forwarding.
    pub strip_prefix: Option<String>,
    /// From [`AUTH_ANNOTATION`]: whether a valid token is required (the default).
    pub auth: bool,
    /// From [`BALANCE_ANNOTATION`]: the balancing policy over the service's instances, when
    /// not the default (least request).
    pub balance: Option<BalancePolicy>,
}

/// Annotation naming a path prefix the gateway removes before forwarding (`/api`: the edge's
/// `/api/users/1` reaches User Service as `/users/1`).
pub const STRIP_PREFIX_ANNOTATION: &str = "causeway.dev/strip-prefix";
/// Annotation; `"false"` makes the Ingress's routes public.
pub const AUTH_ANNOTATION: &str = "causeway.dev/auth";
/// Annotation choosing how the Ingress's routes balance over their service's instances:
/// `round_robin`, `weighted_round_robin` or `least_request` (the default).
pub const BALANCE_ANNOTATION: &str = "causeway.dev/balance";

/// One `spec.tls[]` entry: the certificate (a Secret's name, which the caller maps to files) for
/// these hosts; empty `hosts` means the default certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsEntry {
    pub hosts: Vec<String>,
    pub secret_name: Option<String>,
    /// `<namespace>/<name>` of the Ingress it came from.
    pub ingress: String,
}

#[derive(Debug)]
struct PathRule {
    exact: bool,
    /// Prefix paths without their trailing slash (`/` becomes empty: matches everything).
    path: String,
    /// Longer wins; `Exact` beats `Prefix` at equal length.
    rank: (usize, bool),
    route: Route,
}

impl PathRule {
    fn matches(&self, path: &str) -> bool {
        if self.exact {
            return path == self.path;
        }
        match path.strip_prefix(self.path.as_str()) {
            Some(rest) => rest.is_empty() || rest.starts_with('/'),
            None => false,
        }
    }
}

#[derive(Debug, Default)]
struct PathTable {
    /// Most specific first, so the first match wins.
    rules: Vec<PathRule>,
}

impl PathTable {
    fn lookup(&self, path: &str) -> Option<&Route> {
        self.rules
            .iter()
            .find(|rule| rule.matches(path))
            .map(|rule| &rule.route)
    }

    fn sort(&mut self) {
        // Stable: among identical paths the first in file order stays first.
        self.rules.sort_by_key(|rule| std::cmp::Reverse(rule.rank));
    }
}

/// The compiled route table of a set of Ingress documents.
#[derive(Debug, Default)]
pub struct IngressRoutes {
    exact_hosts: HashMap<String, PathTable>,
    /// Keyed by the suffix after `*.`.
    wildcard_hosts: HashMap<String, PathTable>,
    any_host: PathTable,
    default_backend: Option<Route>,
    tls: Vec<TlsEntry>,
    skipped: Vec<String>,
    route_count: usize,
}

impl IngressRoutes {
    /// Reads Ingress documents from one YAML text (documents separated by `---`).
    pub fn from_yaml_str(yaml: &str) -> Result<Self, IngressError> {
        let mut builder = Builder::default();
        builder.add_yaml("<yaml>", yaml)?;
        builder.finish()
    }

    /// Reads Ingress documents from several files; hosts shared between files merge their paths.
    pub fn from_files(paths: &[PathBuf]) -> Result<Self, IngressError> {
        let mut builder = Builder::default();
        for path in paths {
            let text = std::fs::read_to_string(path).map_err(|source| IngressError::Read {
                path: path.clone(),
                source,
            })?;
            builder.add_yaml(&path.display().to_string(), &text)?;
        }
        builder.finish()
    }

    /// The backend for a request, or `None` when no rule matches and there is no default backend
    /// (answer 404). `host` is the `Host` header or `:authority`, port allowed.
    pub fn lookup(&self, host: Option<&str>, path: &str) -> Option<&Backend> {
        self.lookup_route(host, path).map(|route| &route.backend)
    }

    /// Like [`lookup`](Self::lookup), with the matched rule (its id names it in logs and metrics).
    pub fn lookup_route(&self, host: Option<&str>, path: &str) -> Option<&Route> {
        let path = if path.is_empty() { "/" } else { path };
        let table = host
            .map(normalize_request_host)
            .and_then(|host| self.host_table(&host))
            .unwrap_or(&self.any_host);
        table.lookup(path).or(self.default_backend.as_ref())
    }

    fn host_table(&self, host: &str) -> Option<&PathTable> {
        if let Some(table) = self.exact_hosts.get(host) {
            return Some(table);
        }
        let (first, rest) = host.split_once('.')?;
        if first.is_empty() {
            return None;
        }
        self.wildcard_hosts.get(rest)
    }

    pub fn default_backend(&self) -> Option<&Route> {
        self.default_backend.as_ref()
    }

    /// Every `spec.tls[]` entry, in file order.
    pub fn tls(&self) -> &[TlsEntry] {
        &self.tls
    }

    /// The Secret whose certificate serves `server_name` (SNI): an exact host, else a wildcard
    /// covering it, else an entry without hosts.
    pub fn tls_secret_for(&self, server_name: &str) -> Option<&str> {
        let name = normalize_request_host(server_name);
        let covers = |pattern: &str| host_matches(pattern, &name);
        let with_secret = |entry: &&TlsEntry| entry.secret_name.is_some();
        let exact = self
            .tls
            .iter()
            .filter(with_secret)
            .find(|entry| entry.hosts.contains(&name));
        let wildcard = || {
            self.tls
                .iter()
                .filter(with_secret)
                .find(|entry| entry.hosts.iter().any(|host| covers(host)))
        };
        let default = || {
            self.tls
                .iter()
                .filter(with_secret)
                .find(|entry| entry.hosts.is_empty())
        };
        exact
            .or_else(wildcard)
            .or_else(default)
            .and_then(|entry| entry.secret_name.as_deref())
    }

    /// `<namespace>/<name>` of documents skipped for naming another ingress class.
    pub fn skipped(&self) -> &[String] {
        &self.skipped
    }

    /// How many path rules were compiled (the default backend not counted).
    pub fn route_count(&self) -> usize {
        self.route_count
    }

    /// Every route (path rules, then the default backend), each once.
    pub fn routes(&self) -> impl Iterator<Item = &Route> {
        let mut exact: Vec<_> = self.exact_hosts.iter().collect();
        let mut wildcard: Vec<_> = self.wildcard_hosts.iter().collect();
        // Hash maps iterate in any order; routes should list the same way every time.
        exact.sort_by(|a, b| a.0.cmp(b.0));
        wildcard.sort_by(|a, b| a.0.cmp(b.0));
        exact
            .into_iter()
            .chain(wildcard)
            .map(|(_, table)| table)
            .chain(std::iter::once(&self.any_host))
            .flat_map(|table| table.rules.iter().map(|rule| &rule.route))
            .chain(self.default_backend.iter())
    }
}

/// Whether a rule host (exact or `*.suffix`) covers a normalized request host.
fn host_matches(pattern: &str, host: &str) -> bool {
    match pattern.strip_prefix("*.") {
        Some(suffix) => host
            .split_once('.')
            .is_some_and(|(first, rest)| !first.is_empty() && rest == suffix),
        None => pattern == host,
    }
}

/// Lowercase, without port or trailing dot: `Foo.COM.:8443` → `foo.com`.
fn normalize_request_host(host: &str) -> String {
    let host = host.trim();
    let without_port = if host.starts_with('[') {
        // IPv6 literal: keep the brackets, drop what follows `]`.
        host.find(']').map_or(host, |end| &host[..=end])
    } else {
        host.rsplit_once(':')
            .filter(|(_, port)| port.bytes().all(|b| b.is_ascii_digit()))
            .map_or(host, |(name, _)| name)
    };
    without_port.trim_end_matches('.').to_ascii_lowercase()
}

// ---- What is read from a document ----

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Document {
    api_version: Option<String>,
    kind: Option<String>,
    #[serde(default)]
    metadata: Metadata,
    spec: Option<Spec>,
}

#[derive(Default, Deserialize)]
struct Metadata {
    name: Option<String>,
    namespace: Option<String>,
    #[serde(default)]
    annotations: std::collections::BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Spec {
    ingress_class_name: Option<String>,
    default_backend: Option<RawBackend>,
    #[serde(default)]
    tls: Vec<RawTls>,
    #[serde(default)]
    rules: Vec<RawRule>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawTls {
    #[serde(default)]
    hosts: Vec<String>,
    secret_name: Option<String>,
}

#[derive(Deserialize)]
struct RawRule {
    host: Option<String>,
    http: Option<RawHttp>,
}

#[derive(Deserialize)]
struct RawHttp {
    #[serde(default)]
    paths: Vec<RawPath>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawPath {
    path: Option<String>,
    path_type: Option<String>,
    backend: Option<RawBackend>,
}

#[derive(Deserialize)]
struct RawBackend {
    service: Option<RawService>,
    resource: Option<IgnoredAny>,
}

#[derive(Deserialize)]
struct RawService {
    name: Option<String>,
    port: Option<RawPort>,
}

#[derive(Deserialize)]
struct RawPort {
    number: Option<i64>,
    name: Option<String>,
}

// ---- Compilation ----

#[derive(Default)]
struct Builder {
    routes: IngressRoutes,
    /// Where the default backend came from, for the conflict message.
    default_from: Option<String>,
}

/// Names the document in errors.
struct Context<'a> {
    source_name: &'a str,
    document: usize,
    ingress: String,
}

impl Context<'_> {
    fn invalid(&self, field: impl Into<String>, message: impl Into<String>) -> IngressError {
        IngressError::Invalid {
            source_name: self.source_name.to_owned(),
            document: self.document,
            ingress: if self.ingress.is_empty() {
                String::new()
            } else {
                format!(" ({})", self.ingress)
            },
            field: field.into(),
            message: message.into(),
        }
    }
}

impl Builder {
    fn add_yaml(&mut self, source_name: &str, yaml: &str) -> Result<(), IngressError> {
        let documents: Vec<Document> =
            serde_saphyr::from_multiple(yaml).map_err(|err| IngressError::Yaml {
                source_name: source_name.to_owned(),
                message: err.to_string(),
            })?;
        for (index, document) in documents.into_iter().enumerate() {
            self.add_document(source_name, index + 1, document)?;
        }
        Ok(())
    }

    fn add_document(
        &mut self,
        source_name: &str,
        document_index: usize,
        document: Document,
    ) -> Result<(), IngressError> {
        let namespace = document
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".to_owned());
        let mut cx = Context {
            source_name,
            document: document_index,
            ingress: String::new(),
        };
        match document.api_version.as_deref() {
            Some(API_VERSION) => {}
            Some(other) => {
                return Err(cx.invalid(
                    "apiVersion",
                    format!("is {other:?}; only {API_VERSION} Ingress is read"),
                ));
            }
            None => return Err(cx.invalid("apiVersion", "missing")),
        }
        match document.kind.as_deref() {
            Some(KIND) => {}
            Some(other) => {
                return Err(cx.invalid(
                    "kind",
                    format!("is {other:?}; only {KIND} documents belong in routing files"),
                ));
            }
            None => return Err(cx.invalid("kind", "missing")),
        }
        let name = document
            .metadata
            .name
            .ok_or_else(|| cx.invalid("metadata.name", "missing"))?;
        cx.ingress = format!("{namespace}/{name}");
        let annotations = &document.metadata.annotations;
        let strip_prefix = annotations.get(STRIP_PREFIX_ANNOTATION).cloned();
        if let Some(prefix) = &strip_prefix
            && (!prefix.starts_with('/') || prefix.ends_with('/'))
        {
            return Err(cx.invalid(
                format!("metadata.annotations[{STRIP_PREFIX_ANNOTATION}]"),
                format!("{prefix:?} must start with '/' and not end with one"),
            ));
        }
        let auth = match annotations.get(AUTH_ANNOTATION).map(String::as_str) {
            None | Some("true") => true,
            Some("false") => false,
            Some(other) => {
                return Err(cx.invalid(
                    format!("metadata.annotations[{AUTH_ANNOTATION}]"),
                    format!("is {other:?}; expected \"true\" or \"false\""),
                ));
            }
        };
        let balance = match annotations.get(BALANCE_ANNOTATION).map(String::as_str) {
            None => None,
            Some("round_robin") => Some(BalancePolicy::RoundRobin),
            Some("weighted_round_robin") => Some(BalancePolicy::WeightedRoundRobin),
            Some("least_request") => Some(BalancePolicy::LeastRequest),
            Some(other) => {
                return Err(cx.invalid(
                    format!("metadata.annotations[{BALANCE_ANNOTATION}]"),
                    format!(
                        "is {other:?}; expected round_robin, weighted_round_robin or least_request"
                    ),
                ));
            }
        };
        let spec = document.spec.ok_or_else(|| cx.invalid("spec", "missing"))?;
        if spec
            .ingress_class_name
            .as_deref()
            .is_some_and(|class| class != INGRESS_CLASS)
        {
            self.routes.skipped.push(cx.ingress.clone());
            return Ok(());
        }

        if let Some(raw) = &spec.default_backend {
            let backend = parse_backend(&cx, "spec.defaultBackend", raw)?;
            let route = Route {
                id: format!("{}#default", cx.ingress),
                backend,
                namespace: namespace.clone(),
                host: None,
                path: None,
                path_type: None,
                strip_prefix: strip_prefix.clone(),
                auth,
                balance: balance.clone(),
            };
            match &self.routes.default_backend {
                Some(existing) if existing.backend != route.backend => {
                    return Err(IngressError::DefaultBackendConflict {
                        first: self.default_from.clone().unwrap_or_default(),
                        second: format!("{source_name} ({})", cx.ingress),
                    });
                }
                Some(_) => {}
                None => {
                    self.default_from = Some(format!("{source_name} ({})", cx.ingress));
                    self.routes.default_backend = Some(route);
                }
            }
        }

        for (index, tls) in spec.tls.into_iter().enumerate() {
            let mut hosts = Vec::with_capacity(tls.hosts.len());
            for (host_index, host) in tls.hosts.iter().enumerate() {
                let field = format!("spec.tls[{index}].hosts[{host_index}]");
                hosts.push(validate_host(&cx, &field, host)?);
            }
            self.routes.tls.push(TlsEntry {
                hosts,
                secret_name: tls.secret_name,
                ingress: cx.ingress.clone(),
            });
        }

        for (rule_index, rule) in spec.rules.into_iter().enumerate() {
            let field = format!("spec.rules[{rule_index}]");
            let host = match &rule.host {
                Some(host) if !host.is_empty() => {
                    Some(validate_host(&cx, &format!("{field}.host"), host)?)
                }
                _ => None,
            };
            let table = match &host {
                None => &mut self.routes.any_host,
                Some(host) => match host.strip_prefix("*.") {
                    Some(suffix) => self
                        .routes
                        .wildcard_hosts
                        .entry(suffix.to_owned())
                        .or_default(),
                    None => self.routes.exact_hosts.entry(host.clone()).or_default(),
                },
            };
            let Some(http) = rule.http else {
                // A host without paths: its requests go to the default backend.
                continue;
            };
            for (path_index, raw) in http.paths.into_iter().enumerate() {
                let field = format!("{field}.http.paths[{path_index}]");
                let path_type = match raw.path_type.as_deref() {
                    Some("Exact") => PathType::Exact,
                    Some("Prefix") => PathType::Prefix,
                    Some("ImplementationSpecific") => PathType::ImplementationSpecific,
                    Some(other) => {
                        return Err(cx.invalid(
                            format!("{field}.pathType"),
                            format!(
                                "{other:?} is not one of Exact, Prefix, ImplementationSpecific"
                            ),
                        ));
                    }
                    None => return Err(cx.invalid(format!("{field}.pathType"), "missing")),
                };
                let path = match raw.path {
                    Some(path) => path,
                    // The API requires a path for Exact and Prefix only.
                    None if path_type == PathType::ImplementationSpecific => "/".to_owned(),
                    None => return Err(cx.invalid(format!("{field}.path"), "missing")),
                };
                if !path.starts_with('/') {
                    return Err(cx.invalid(
                        format!("{field}.path"),
                        format!("{path:?} must begin with '/'"),
                    ));
                }
                let backend = match &raw.backend {
                    Some(backend) => parse_backend(&cx, &format!("{field}.backend"), backend)?,
                    None => return Err(cx.invalid(format!("{field}.backend"), "missing")),
                };
                let exact = path_type == PathType::Exact;
                let match_path = if exact {
                    path.clone()
                } else {
                    path.trim_end_matches('/').to_owned()
                };
                table.rules.push(PathRule {
                    exact,
                    rank: (match_path.len(), exact),
                    path: match_path,
                    route: Route {
                        id: format!("{}#{rule_index}{path}", cx.ingress),
                        backend,
                        namespace: namespace.clone(),
                        host: host.clone(),
                        path: Some(path),
                        path_type: Some(path_type),
                        strip_prefix: strip_prefix.clone(),
                        auth,
                        balance: balance.clone(),
                    },
                });
                self.routes.route_count += 1;
            }
        }
        Ok(())
    }

    fn finish(mut self) -> Result<IngressRoutes, IngressError> {
        self.routes.any_host.sort();
        for table in self
            .routes
            .exact_hosts
            .values_mut()
            .chain(self.routes.wildcard_hosts.values_mut())
        {
            table.sort();
        }
        Ok(self.routes)
    }
}

fn parse_backend(cx: &Context<'_>, field: &str, raw: &RawBackend) -> Result<Backend, IngressError> {
    if raw.resource.is_some() {
        return Err(cx.invalid(
            format!("{field}.resource"),
            "resource backends are unsupported; Causeway routes only to Services (use backend.service)",
        ));
    }
    let service = raw
        .service
        .as_ref()
        .ok_or_else(|| cx.invalid(format!("{field}.service"), "missing"))?;
    let name = service
        .name
        .clone()
        .filter(|name| !name.is_empty())
        .ok_or_else(|| cx.invalid(format!("{field}.service.name"), "missing"))?;
    let port = service
        .port
        .as_ref()
        .ok_or_else(|| cx.invalid(format!("{field}.service.port"), "missing"))?;
    let port = match (port.number, &port.name) {
        (Some(number), None) => ServicePort::Number(
            u16::try_from(number)
                .ok()
                .filter(|number| *number != 0)
                .ok_or_else(|| {
                    cx.invalid(
                        format!("{field}.service.port.number"),
                        format!("{number} is not a port (1-65535)"),
                    )
                })?,
        ),
        (None, Some(name)) if !name.is_empty() => ServicePort::Name(name.clone()),
        _ => {
            return Err(cx.invalid(
                format!("{field}.service.port"),
                "set exactly one of number and name",
            ));
        }
    };
    Ok(Backend {
        service: name,
        port,
    })
}

/// Rule and TLS hosts: DNS names, lowercase; a wildcard only as the whole first label.
fn validate_host(cx: &Context<'_>, field: &str, host: &str) -> Result<String, IngressError> {
    let lower = host.to_ascii_lowercase();
    let name = lower.strip_prefix("*.").unwrap_or(&lower);
    let valid_label = |label: &str| {
        !label.is_empty()
            && label.len() <= 63
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-')
    };
    if name.is_empty() || !name.split('.').all(valid_label) {
        return Err(cx.invalid(
            field,
            format!(
                "{host:?} is not a DNS name (a wildcard is allowed only as the first label, `*.example.com`; no ports, no IP addresses)"
            ),
        ));
    }
    if name.parse::<std::net::Ipv4Addr>().is_ok() {
        return Err(cx.invalid(
            field,
            format!("{host:?}: IP addresses are not allowed as hosts"),
        ));
    }
    Ok(lower)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One Ingress without host whose paths are given as (pathType, path); the backend service
    /// of path `i` is `svc-i`.
    fn routes_with_paths(paths: &[(&str, &str)]) -> IngressRoutes {
        let mut yaml = String::from(
            "apiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata:\n  name: t\nspec:\n  rules:\n  - http:\n      paths:\n",
        );
        for (index, (path_type, path)) in paths.iter().enumerate() {
            yaml.push_str(&format!(
                "      - path: {path}\n        pathType: {path_type}\n        backend:\n          service:\n            name: svc-{index}\n            port:\n              number: 80\n"
            ));
        }
        IngressRoutes::from_yaml_str(&yaml).expect("test yaml parses")
    }

    /// The Kubernetes documentation's examples table (Ingress → Examples), one row per request.
    #[test]
    fn kubernetes_documentation_path_matching_examples() {
        type Row = (
            &'static [(&'static str, &'static str)],
            &'static str,
            Option<usize>,
        );
        let rows: &[Row] = &[
            (&[("Prefix", "/")], "/", Some(0)),
            (&[("Prefix", "/")], "/anything/at/all", Some(0)),
            (&[("Exact", "/foo")], "/foo", Some(0)),
            (&[("Exact", "/foo")], "/bar", None),
            (&[("Exact", "/foo")], "/foo/", None),
            (&[("Exact", "/foo/")], "/foo", None),
            (&[("Prefix", "/foo")], "/foo", Some(0)),
            (&[("Prefix", "/foo")], "/foo/", Some(0)),
            (&[("Prefix", "/foo/")], "/foo", Some(0)),
            (&[("Prefix", "/foo/")], "/foo/", Some(0)),
            (&[("Prefix", "/aaa/bb")], "/aaa/bbb", None),
            (&[("Prefix", "/aaa/bbb")], "/aaa/bbb", Some(0)),
            (&[("Prefix", "/aaa/bbb/")], "/aaa/bbb", Some(0)),
            (&[("Prefix", "/aaa/bbb")], "/aaa/bbb/", Some(0)),
            (&[("Prefix", "/aaa/bbb")], "/aaa/bbb/ccc", Some(0)),
            (&[("Prefix", "/aaa/bbb")], "/aaa/bbbxyz", None),
            (&[("Prefix", "/"), ("Prefix", "/aaa")], "/aaa/ccc", Some(1)),
            (
                &[("Prefix", "/"), ("Prefix", "/aaa"), ("Prefix", "/aaa/bbb")],
                "/aaa/bbb",
                Some(2),
            ),
            (
                &[("Prefix", "/"), ("Prefix", "/aaa"), ("Prefix", "/aaa/bbb")],
                "/ccc",
                Some(0),
            ),
            (
                &[("Prefix", "/aaa"), ("Prefix", "/aaa/bbb")],
                "/aaa/bbb",
                Some(1),
            ),
            (&[("Prefix", "/aaa"), ("Prefix", "/aaa/bbb")], "/ccc", None),
            (&[("Prefix", "/aaa")], "/ccc", None),
            (&[("Prefix", "/foo"), ("Exact", "/foo")], "/foo", Some(1)),
            (&[("Exact", "/foo"), ("Prefix", "/foo")], "/foo", Some(0)),
            // Exact is case-sensitive, and so is Prefix.
            (&[("Exact", "/foo")], "/FOO", None),
            (&[("Prefix", "/foo")], "/Foo/bar", None),
            // ImplementationSpecific behaves as Prefix.
            (&[("ImplementationSpecific", "/aaa")], "/aaa/b", Some(0)),
            (&[("ImplementationSpecific", "/aaa")], "/aaab", None),
            // Longest wins regardless of type: a longer Prefix beats a shorter Exact.
            (
                &[("Exact", "/aaa"), ("Prefix", "/aaa/bbb")],
                "/aaa/bbb/c",
                Some(1),
            ),
        ];
        for (paths, request, expected) in rows {
            let routes = routes_with_paths(paths);
            let got = routes
                .lookup(None, request)
                .map(|backend| backend.service.clone());
            let expected = expected.map(|index| format!("svc-{index}"));
            assert_eq!(got, expected, "paths {paths:?}, request {request}");
        }
    }

    const HOSTS: &str = r#"
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata:
  name: hosts
  namespace: web
spec:
  rules:
  - host: foo.bar.com
    http:
      paths:
      - pathType: Prefix
        path: /
        backend: {service: {name: exact, port: {number: 80}}}
  - host: "*.foo.com"
    http:
      paths:
      - pathType: Prefix
        path: /
        backend: {service: {name: wildcard, port: {number: 80}}}
  - host: a.foo.com
    http:
      paths:
      - pathType: Prefix
        path: /
        backend: {service: {name: exact-under-wildcard, port: {name: https}}}
  - http:
      paths:
      - pathType: Prefix
        path: /
        backend: {service: {name: any, port: {number: 8080}}}
"#;

    /// The documentation's "Hostname wildcards" table, plus precedence and normalization.
    #[test]
    fn host_matching_follows_the_wildcard_table() {
        let routes = IngressRoutes::from_yaml_str(HOSTS).unwrap();
        let service = |host: Option<&str>| {
            routes
                .lookup(host, "/x")
                .map(|backend| backend.service.as_str())
        };
        assert_eq!(service(Some("bar.foo.com")), Some("wildcard"));
        assert_eq!(service(Some("baz.bar.foo.com")), Some("any"));
        assert_eq!(service(Some("foo.com")), Some("any"));
        assert_eq!(service(Some(".foo.com")), Some("any"));
        assert_eq!(service(Some("foo.bar.com")), Some("exact"));
        assert_eq!(service(Some("FOO.bar.com:8443")), Some("exact"));
        assert_eq!(service(Some("foo.bar.com.")), Some("exact"));
        assert_eq!(service(Some("a.foo.com")), Some("exact-under-wildcard"));
        assert_eq!(service(Some("[::1]:8443")), Some("any"));
        assert_eq!(service(None), Some("any"));
        let route = routes.lookup_route(Some("a.foo.com"), "/").unwrap();
        assert_eq!(route.id, "web/hosts#2/");
        assert_eq!(route.backend.port, ServicePort::Name("https".into()));
        assert_eq!(route.host.as_deref(), Some("a.foo.com"));
    }

    const MULTI: &str = r#"
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {name: one}
spec:
  ingressClassName: causeway
  defaultBackend:
    service: {name: fallback, port: {number: 80}}
  tls:
  - hosts: [shop.example.com, "*.example.com"]
    secretName: example-tls
  - secretName: default-tls
  rules:
  - host: shop.example.com
    http:
      paths:
      - {path: /cart, pathType: Prefix, backend: {service: {name: cart, port: {number: 80}}}}
---
# An empty document and comments are fine.
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {name: two, namespace: shop, labels: {app: shop}, annotations: {a: b}}
spec:
  rules:
  - host: SHOP.example.com
    http:
      paths:
      - {path: /cart/items, pathType: Exact, backend: {service: {name: items, port: {number: 81}}}}
      - {path: /cart, pathType: Prefix, backend: {service: {name: shadowed, port: {number: 82}}}}
status:
  loadBalancer: {}
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {name: theirs}
spec:
  ingressClassName: nginx
  rules:
  - http:
      paths:
      - {path: /, pathType: Prefix, backend: {service: {name: not-ours, port: {number: 80}}}}
"#;

    #[test]
    fn documents_merge_hosts_and_keep_tls_and_default_backend() {
        let routes = IngressRoutes::from_yaml_str(MULTI).unwrap();
        let service = |host: &str, path: &str| {
            routes
                .lookup(Some(host), path)
                .map(|backend| backend.service.clone())
        };
        assert_eq!(
            service("shop.example.com", "/cart/x").as_deref(),
            Some("cart")
        );
        assert_eq!(
            service("shop.example.com", "/cart/items").as_deref(),
            Some("items")
        );
        // Identical paths: the first in file order wins.
        assert_eq!(
            service("shop.example.com", "/cart").as_deref(),
            Some("cart")
        );
        // The host matched but no path did, and other hosts: the default backend.
        assert_eq!(
            service("shop.example.com", "/other").as_deref(),
            Some("fallback")
        );
        assert_eq!(service("elsewhere", "/").as_deref(), Some("fallback"));
        assert_eq!(routes.default_backend().unwrap().id, "default/one#default");
        assert_eq!(
            routes
                .lookup_route(Some("shop.example.com"), "/cart/items")
                .unwrap()
                .id,
            "shop/two#0/cart/items"
        );
        assert_eq!(routes.skipped(), ["default/theirs"]);
        assert_eq!(routes.route_count(), 3);
        assert_eq!(routes.tls().len(), 2);
        assert_eq!(
            routes.tls_secret_for("shop.example.com"),
            Some("example-tls")
        );
        assert_eq!(
            routes.tls_secret_for("api.example.com:443"),
            Some("example-tls")
        );
        assert_eq!(
            routes.tls_secret_for("a.b.example.com"),
            Some("default-tls")
        );
        assert_eq!(routes.tls_secret_for("localhost"), Some("default-tls"));
    }

    #[test]
    fn no_rule_and_no_default_backend_is_no_route() {
        let routes = routes_with_paths(&[("Exact", "/only")]);
        assert!(routes.lookup(Some("x"), "/other").is_none());
        assert!(routes.default_backend().is_none());
        let empty = IngressRoutes::from_yaml_str("").unwrap();
        assert!(empty.lookup(None, "/").is_none());
    }

    fn error_of(yaml: &str) -> String {
        IngressRoutes::from_yaml_str(yaml)
            .expect_err("should be refused")
            .to_string()
    }

    const HEAD: &str =
        "apiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {name: bad, namespace: ns}\n";

    #[test]
    fn bad_documents_name_the_document_and_field() {
        let ok = format!(
            "{HEAD}spec:\n  rules:\n  - http:\n      paths:\n      - {{path: /, pathType: Prefix, backend: {{service: {{name: a, port: {{number: 1}}}}}}}}\n"
        );
        IngressRoutes::from_yaml_str(&ok).unwrap();

        let message = error_of(&format!(
            "{ok}---\napiVersion: v1\nkind: Service\nmetadata: {{name: s}}\n"
        ));
        assert!(message.contains("document 2"), "{message}");
        assert!(
            message.contains("apiVersion") && message.contains("\"v1\""),
            "{message}"
        );

        let message =
            error_of("apiVersion: networking.k8s.io/v1\nkind: Service\nmetadata: {name: s}\n");
        assert!(message.contains("kind: is \"Service\""), "{message}");

        // (one path entry, what the message must say)
        let cases = [
            (
                "{path: /, pathType: Prefix, backend: {resource: {apiGroup: k8s.example.com, kind: StorageBucket, name: static}}}",
                "(ns/bad): spec.rules[0].http.paths[0].backend.resource: resource backends are unsupported",
            ),
            (
                "{path: /, pathType: Regex, backend: {service: {name: a, port: {number: 1}}}}",
                "spec.rules[0].http.paths[0].pathType: \"Regex\" is not one of",
            ),
            (
                "{path: api, pathType: Prefix, backend: {service: {name: a, port: {number: 1}}}}",
                "paths[0].path: \"api\" must begin with '/'",
            ),
            (
                "{path: /, pathType: Exact, backend: {service: {name: a, port: {number: 70000}}}}",
                "service.port.number: 70000 is not a port",
            ),
            (
                "{path: /, pathType: Exact, backend: {service: {name: a, port: {number: 1, name: x}}}}",
                "service.port: set exactly one of number and name",
            ),
            ("{path: /, pathType: Exact}", "paths[0].backend: missing"),
        ];
        for (entry, expected) in cases {
            let message = error_of(&format!(
                "{HEAD}spec:\n  rules:\n  - http:\n      paths:\n      - {entry}\n"
            ));
            assert!(message.contains(expected), "{entry}: {message}");
        }

        let message = error_of(&format!(
            "{HEAD}spec:\n  rules:\n  - host: \"foo.*.com\"\n    http:\n      paths: []\n"
        ));
        assert!(
            message.contains("spec.rules[0].host: \"foo.*.com\" is not a DNS name"),
            "{message}"
        );

        let message = error_of(&format!("{HEAD}spec:\n  rules: [\n"));
        assert!(message.starts_with("<yaml>: invalid YAML"), "{message}");

        let message = error_of(&format!(
            "{HEAD}spec:\n  defaultBackend: {{service: {{name: a, port: {{number: 1}}}}}}\n---\n{HEAD}spec:\n  defaultBackend: {{service: {{name: b, port: {{number: 1}}}}}}\n"
        ));
        assert!(message.contains("default backends conflict"), "{message}");
    }

    #[test]
    fn files_are_read_and_named_in_errors() {
        let dir = std::env::temp_dir().join(format!("causeway-ingress-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good.yaml");
        let bad = dir.join("bad.yaml");
        std::fs::write(&good, HOSTS).unwrap();
        std::fs::write(&bad, "apiVersion: networking.k8s.io/v1\nkind: Ingress\n").unwrap();
        let routes = IngressRoutes::from_files(std::slice::from_ref(&good)).unwrap();
        assert_eq!(routes.route_count(), 4);
        let message = IngressRoutes::from_files(&[good.clone(), bad.clone()])
            .unwrap_err()
            .to_string();
        assert!(
            message.contains("bad.yaml, document 1: metadata.name: missing"),
            "{message}"
        );
        let message = IngressRoutes::from_files(&[dir.join("absent.yaml")])
            .unwrap_err()
            .to_string();
        assert!(message.contains("cannot read ingress file"), "{message}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn causeway_annotations_strip_prefixes_and_open_routes() {
        let yaml = r#"
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata:
  name: public
  annotations: {causeway.dev/strip-prefix: /v1, causeway.dev/auth: "false"}
spec:
  rules:
  - http: {paths: [{path: /v1/status, pathType: Prefix, backend: {service: {name: status, port: {number: 80}}}}]}
"#;
        let routes = IngressRoutes::from_yaml_str(yaml).unwrap();
        let route = routes.lookup_route(None, "/v1/status/now").unwrap();
        assert_eq!(route.strip_prefix.as_deref(), Some("/v1"));
        assert!(!route.auth);
        assert_eq!(route.balance, None);
        let balanced = yaml.replace(
            r#"causeway.dev/auth: "false""#,
            "causeway.dev/balance: round_robin",
        );
        let routes = IngressRoutes::from_yaml_str(&balanced).unwrap();
        let route = routes.lookup_route(None, "/v1/status").unwrap();
        assert_eq!(route.balance, Some(BalancePolicy::RoundRobin));
        for bad in [
            "causeway.dev/balance: fastest",
            "causeway.dev/auth: maybe",
            "causeway.dev/strip-prefix: v1",
            "causeway.dev/strip-prefix: /v1/",
        ] {
            let yaml = yaml.replace(
                r#"causeway.dev/strip-prefix: /v1, causeway.dev/auth: "false""#,
                bad,
            );
            let err = IngressRoutes::from_yaml_str(&yaml).unwrap_err().to_string();
            assert!(
                err.contains("metadata.annotations[causeway.dev/"),
                "{bad}: {err}"
            );
        }
    }

    /// deploy/k8s/ingress.yaml routes each of the topology's default edge routes to the same
    /// service, and nothing else.
    #[test]
    fn deploy_ingress_matches_the_default_topology_routes() {
        let file = PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../deploy/k8s/ingress.yaml"
        ));
        let routes = IngressRoutes::from_files(&[file]).unwrap();
        let topology = causeway_core::topology::Topology::default();
        let expected = &topology.reverse_proxy.routes;
        assert_eq!(routes.route_count(), expected.len());
        for route in expected {
            let base = route.prefix.trim_end_matches('/');
            for path in [
                route.prefix.clone(),
                format!("{base}/123"),
                format!("{base}/a/b"),
            ] {
                for host in [None, Some("localhost:8443"), Some("causeway.local")] {
                    let matched = routes
                        .lookup_route(host, &path)
                        .unwrap_or_else(|| panic!("{path} via {host:?} has no route"));
                    assert_eq!(matched.backend.service, route.service, "{path}");
                    assert_eq!(matched.backend.port, ServicePort::Name("https".into()));
                    assert_eq!(matched.strip_prefix, route.strip_prefix, "{path}");
                    assert_eq!(matched.auth, route.auth, "{path}");
                }
            }
        }
        assert!(routes.lookup(None, "/api/unknown").is_none());
        assert!(routes.lookup(None, "/api/usersx").is_none());
        assert_eq!(
            routes.tls_secret_for("localhost"),
            Some("causeway-edge-tls")
        );
    }
}
