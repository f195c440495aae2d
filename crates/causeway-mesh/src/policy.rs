//! The mesh policy file: routes and authorization in the Kubernetes shapes their users know.
//!
//! One YAML file of several documents:
//! - `HTTPRoute` (`gateway.networking.k8s.io/v1`, attached to a Service as the GAMMA initiative
//!   does for meshes): per path match, `timeouts.request` / `timeouts.backendRequest` and a
//!   `retry` of `attempts`, `backoff` and `codes` (the Gateway API's HTTPRoute retry);
//! - `AuthorizationPolicy` (`security.istio.io/v1`): `selector.matchLabels.app` names the
//!   service, `action` is `ALLOW` or `DENY`, `rules[].from[].source.principals` the callers
//!   (Istio's `trust-domain/ns/x/sa/y`, or a full SPIFFE ID; `*` for any mesh identity) and
//!   `rules[].to[].operation` the methods and paths (exact, `/prefix*`, `*suffix` or `*`).
//!
//! A meshed service is default deny: with no ALLOW rule that matches, the call is refused, and
//! every decision names the rule (file, line, policy) that made it, so "which policy denied me"
//! has an answer. DENY rules are looked at first, as in Istio.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;
use serde_saphyr::Spanned;

use crate::spiffe::SpiffeId;

const ROUTE_API: &str = "gateway.networking.k8s.io/v1";
const AUTHZ_API: &str = "security.istio.io/v1";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("{file}: {message}")]
    Yaml { file: String, message: String },
    #[error("{file}:{line}: {message}")]
    Invalid {
        file: String,
        line: usize,
        message: String,
    },
}

/// Where a rule was written, for decisions and errors.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleRef {
    pub file: String,
    pub line: usize,
    /// `namespace/name` of the policy document.
    pub policy: String,
}

impl std::fmt::Display for RuleRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}:{})", self.policy, self.file, self.line)
    }
}

/// The document being read, for its errors and the rules it makes.
struct DocumentContext<'a> {
    file: &'a str,
    /// The line of its `kind`.
    line: usize,
    name: String,
    namespace: String,
}

impl DocumentContext<'_> {
    fn invalid(&self, line: usize, message: String) -> PolicyError {
        PolicyError::Invalid {
            file: self.file.to_string(),
            line,
            message,
        }
    }

    fn rule(&self, line: usize) -> RuleRef {
        RuleRef {
            file: self.file.to_string(),
            line,
            policy: format!("{}/{}", self.namespace, self.name),
        }
    }
}

/// What the outbound side applies to a call matched by a route rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteRule {
    pub path: PathMatch,
    /// The whole call, retries included.
    pub request_timeout: Option<Duration>,
    /// One attempt.
    pub attempt_timeout: Option<Duration>,
    /// Attempts after the first.
    pub retries: u32,
    pub retry_backoff: Duration,
    /// Statuses that are retried (a reset connection always is, for a call that may be retried).
    pub retry_codes: Vec<u16>,
    pub rule: RuleRef,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PathMatch {
    Exact(String),
    Prefix(String),
}

impl PathMatch {
    /// Does `path` match? A prefix matches whole segments, as the Gateway API's `PathPrefix`
    /// does: `/api` matches `/api` and `/api/x`, not `/apix`.
    pub fn matches(&self, path: &str) -> bool {
        match self {
            Self::Exact(exact) => path == exact,
            Self::Prefix(prefix) => {
                let prefix = prefix.trim_end_matches('/');
                prefix.is_empty()
                    || path == prefix
                    || path
                        .strip_prefix(prefix)
                        .is_some_and(|rest| rest.starts_with('/'))
            }
        }
    }

    /// Which of several matching rules wins, the greater first: an exact match over any
    /// prefix, then the longest prefix (the Gateway API's precedence).
    pub fn precedence(&self) -> (u8, usize) {
        match self {
            Self::Exact(exact) => (1, exact.len()),
            Self::Prefix(prefix) => (0, prefix.trim_end_matches('/').len()),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Principal {
    Any,
    Exactly(SpiffeId),
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum PathPattern {
    Any,
    Exact(String),
    Prefix(String),
    Suffix(String),
}

impl PathPattern {
    fn parse(text: &str) -> Self {
        if text == "*" {
            Self::Any
        } else if let Some(prefix) = text.strip_suffix('*') {
            Self::Prefix(prefix.to_string())
        } else if let Some(suffix) = text.strip_prefix('*') {
            Self::Suffix(suffix.to_string())
        } else {
            Self::Exact(text.to_string())
        }
    }

    fn matches(&self, path: &str) -> bool {
        match self {
            Self::Any => true,
            Self::Exact(exact) => path == exact,
            Self::Prefix(prefix) => path.starts_with(prefix.as_str()),
            Self::Suffix(suffix) => path.ends_with(suffix.as_str()),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct AuthzRule {
    deny: bool,
    /// Empty: any caller, even one without a mesh identity (as an Istio rule without `from`).
    principals: Vec<Principal>,
    /// Empty: any method.
    methods: Vec<String>,
    /// Empty: any path.
    paths: Vec<PathPattern>,
    rule: RuleRef,
}

impl AuthzRule {
    fn matches(&self, caller: Option<&SpiffeId>, method: &str, path: &str) -> bool {
        let caller_ok = self.principals.is_empty()
            || self.principals.iter().any(|principal| match principal {
                Principal::Any => caller.is_some(),
                Principal::Exactly(id) => caller == Some(id),
            });
        let method_ok = self.methods.is_empty()
            || self
                .methods
                .iter()
                .any(|allowed| allowed.eq_ignore_ascii_case(method));
        let path_ok = self.paths.is_empty() || self.paths.iter().any(|p| p.matches(path));
        caller_ok && method_ok && path_ok
    }
}

/// The inbound side's answer for one call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Allow(RuleRef),
    /// Denied by a DENY rule.
    Denied(RuleRef),
    /// No ALLOW rule matched (default deny).
    NotAllowed,
}

impl Decision {
    pub fn allowed(&self) -> bool {
        matches!(self, Self::Allow(_))
    }

    /// A sentence for the 403 body and the log line.
    pub fn reason(&self, service: &str) -> String {
        match self {
            Self::Allow(rule) => format!("allowed by {rule}"),
            Self::Denied(rule) => format!("denied by {rule}"),
            Self::NotAllowed => format!(
                "no AuthorizationPolicy rule allows this call to {service} (a meshed service denies by default)"
            ),
        }
    }
}

/// The whole policy file, as the sidecars apply it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MeshPolicy {
    routes: BTreeMap<String, Vec<RouteRule>>,
    authorization: BTreeMap<String, Vec<AuthzRule>>,
}

impl MeshPolicy {
    /// Parses `yaml`; `file` names it in errors. Any error refuses the whole file, so a
    /// half-applied policy never exists.
    pub fn parse(file: &str, yaml: &str, trust_domain: &str) -> Result<Self, PolicyError> {
        let documents: Vec<Document> =
            serde_saphyr::from_multiple(yaml).map_err(|err| PolicyError::Yaml {
                file: file.to_string(),
                message: err.to_string(),
            })?;
        let mut policy = Self::default();
        for document in documents {
            let cx = DocumentContext {
                file,
                line: document.kind.referenced.line() as usize,
                name: document.metadata.name.clone(),
                namespace: document
                    .metadata
                    .namespace
                    .clone()
                    .unwrap_or_else(|| "default".to_string()),
            };
            match (document.api_version.as_str(), document.kind.value.as_str()) {
                (ROUTE_API, "HTTPRoute") => policy.add_route(&cx, document.spec)?,
                (AUTHZ_API, "AuthorizationPolicy") => {
                    policy.add_authorization(&cx, document.spec, trust_domain)?
                }
                (api, kind) => {
                    return Err(cx.invalid(
                        cx.line,
                        format!(
                            "{api} {kind} is not a mesh policy document (HTTPRoute of {ROUTE_API}, AuthorizationPolicy of {AUTHZ_API})"
                        ),
                    ));
                }
            }
        }
        Ok(policy)
    }

    fn add_route(&mut self, cx: &DocumentContext, spec: Option<Spec>) -> Result<(), PolicyError> {
        let spec = spec.ok_or_else(|| cx.invalid(cx.line, "HTTPRoute without spec".into()))?;
        let service = spec
            .parent_refs
            .iter()
            .find(|parent| parent.kind.as_deref() == Some("Service"))
            .map(|parent| parent.name.clone())
            .ok_or_else(|| {
                cx.invalid(
                    cx.line,
                    format!(
                        "HTTPRoute {} names no parentRefs of kind Service (a mesh route attaches to the Service it governs)",
                        cx.name
                    ),
                )
            })?;
        for route in spec.rules {
            let at = route.line();
            let parse_duration = |text: &Option<String>| {
                text.as_deref()
                    .map(|text| {
                        parse_gateway_duration(text).ok_or_else(|| {
                            cx.invalid(
                                at,
                                format!(
                                    "{text:?} is not a Gateway API duration such as 500ms, 2s or 1m30s"
                                ),
                            )
                        })
                    })
                    .transpose()
            };
            let timeouts = route.value.timeouts.clone().unwrap_or_default();
            let retry = route.value.retry.clone().unwrap_or_default();
            let backoff = parse_duration(&retry.backoff)?;
            let request_timeout = parse_duration(&timeouts.request)?;
            let attempt_timeout = parse_duration(&timeouts.backend_request)?;
            if let (Some(request), Some(attempt)) = (request_timeout, attempt_timeout)
                && attempt > request
            {
                return Err(cx.invalid(
                    at,
                    "timeouts.backendRequest is longer than timeouts.request".into(),
                ));
            }
            if retry.codes.iter().any(|code| !(500..600).contains(code)) {
                return Err(cx.invalid(at, "retry.codes may name 5xx statuses only".into()));
            }
            let paths = if route.value.matches.is_empty() {
                vec![PathMatch::Prefix("/".into())]
            } else {
                route
                    .value
                    .matches
                    .iter()
                    .map(|matched| {
                        let path = matched.path.clone().unwrap_or_default();
                        let value = path.value.unwrap_or_else(|| "/".into());
                        if !value.starts_with('/') {
                            return Err(cx.invalid(
                                at,
                                format!("path {value:?} does not start with /"),
                            ));
                        }
                        match path.kind.as_deref().unwrap_or("PathPrefix") {
                            "PathPrefix" => Ok(PathMatch::Prefix(value)),
                            "Exact" => Ok(PathMatch::Exact(value)),
                            other => Err(cx.invalid(
                                at,
                                format!(
                                    "path match type {other:?} is not supported (PathPrefix or Exact)"
                                ),
                            )),
                        }
                    })
                    .collect::<Result<_, _>>()?
            };
            for path in paths {
                self.routes
                    .entry(service.clone())
                    .or_default()
                    .push(RouteRule {
                        path,
                        request_timeout,
                        attempt_timeout,
                        retries: retry.attempts.unwrap_or(0),
                        retry_backoff: backoff.unwrap_or(Duration::from_millis(25)),
                        retry_codes: retry.codes.clone(),
                        rule: cx.rule(at),
                    });
            }
        }
        Ok(())
    }

    fn add_authorization(
        &mut self,
        cx: &DocumentContext,
        spec: Option<Spec>,
        trust_domain: &str,
    ) -> Result<(), PolicyError> {
        let spec =
            spec.ok_or_else(|| cx.invalid(cx.line, "AuthorizationPolicy without spec".into()))?;
        let service = spec
            .selector
            .and_then(|selector| selector.match_labels.get("app").cloned())
            .ok_or_else(|| {
                cx.invalid(
                    cx.line,
                    format!(
                        "AuthorizationPolicy {} has no selector.matchLabels.app naming the service it guards",
                        cx.name
                    ),
                )
            })?;
        let deny = match spec.action.as_deref().unwrap_or("ALLOW") {
            "ALLOW" => false,
            "DENY" => true,
            other => {
                return Err(cx.invalid(
                    cx.line,
                    format!("action {other:?} is not supported (ALLOW or DENY)"),
                ));
            }
        };
        for authz in spec.rules {
            let at = authz.line();
            let mut principals = Vec::new();
            for principal in authz
                .value
                .from
                .iter()
                .flat_map(|from| from.source.principals.iter())
            {
                principals.push(
                    parse_principal(principal, trust_domain)
                        .map_err(|message| cx.invalid(at, message))?,
                );
            }
            let operations = authz.value.to.iter().map(|to| &to.operation);
            let mut methods = Vec::new();
            let mut paths = Vec::new();
            for operation in operations {
                methods.extend(operation.methods.iter().cloned());
                paths.extend(operation.paths.iter().map(|p| PathPattern::parse(p)));
            }
            self.authorization
                .entry(service.clone())
                .or_default()
                .push(AuthzRule {
                    deny,
                    principals,
                    methods,
                    paths,
                    rule: cx.rule(at),
                });
        }
        Ok(())
    }

    /// Every route rule for calls to `service`.
    pub fn routes_of(&self, service: &str) -> &[RouteRule] {
        self.routes.get(service).map(Vec::as_slice).unwrap_or(&[])
    }

    /// The route rule for a call to `service`: the longest matching path wins, as in the
    /// Gateway API.
    pub fn route(&self, service: &str, path: &str) -> Option<&RouteRule> {
        self.routes
            .get(service)?
            .iter()
            .filter(|rule| rule.path.matches(path))
            .max_by_key(|rule| rule.path.precedence())
    }

    /// May `caller` (None: no mesh identity) call `method path` on `service`?
    pub fn authorize(
        &self,
        service: &str,
        caller: Option<&SpiffeId>,
        method: &str,
        path: &str,
    ) -> Decision {
        let rules = self
            .authorization
            .get(service)
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        if let Some(denied) = rules
            .iter()
            .find(|rule| rule.deny && rule.matches(caller, method, path))
        {
            return Decision::Denied(denied.rule.clone());
        }
        rules
            .iter()
            .find(|rule| !rule.deny && rule.matches(caller, method, path))
            .map(|allowed| Decision::Allow(allowed.rule.clone()))
            .unwrap_or(Decision::NotAllowed)
    }
}

fn parse_principal(text: &str, trust_domain: &str) -> Result<Principal, String> {
    if text == "*" {
        return Ok(Principal::Any);
    }
    let full = if text.starts_with("spiffe://") {
        text.to_string()
    } else {
        format!("spiffe://{text}")
    };
    let id: SpiffeId = full
        .parse()
        .map_err(|_| format!("principal {text:?} is not trust-domain/ns/<namespace>/sa/<name>"))?;
    if id.trust_domain() != trust_domain {
        return Err(format!(
            "principal {text:?} is in trust domain {:?}; this mesh's is {trust_domain:?}",
            id.trust_domain()
        ));
    }
    Ok(Principal::Exactly(id))
}

/// A Gateway API duration (GEP-2257): one to four parts of digits and `h`, `m`, `s` or `ms`.
fn parse_gateway_duration(text: &str) -> Option<Duration> {
    let mut total = Duration::ZERO;
    let mut rest = text;
    let mut parts = 0;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 || digits > 5 {
            return None;
        }
        let value: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let (unit, len) = if rest.starts_with("ms") {
            (Duration::from_millis(1), 2)
        } else {
            match rest.bytes().next()? {
                b'h' => (Duration::from_secs(3600), 1),
                b'm' => (Duration::from_secs(60), 1),
                b's' => (Duration::from_secs(1), 1),
                _ => return None,
            }
        };
        rest = &rest[len..];
        total += unit * u32::try_from(value).ok()?;
        parts += 1;
    }
    (1..=4).contains(&parts).then_some(total)
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Document {
    api_version: String,
    kind: Spanned<String>,
    metadata: Metadata,
    #[serde(default)]
    spec: Option<Spec>,
}

/// The spec of either kind; `Document::kind` says which fields matter.
#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct Spec {
    #[serde(default)]
    parent_refs: Vec<ParentRef>,
    #[serde(default)]
    rules: Vec<Spanned<Rule>>,
    selector: Option<Selector>,
    action: Option<String>,
}

trait LineOf {
    fn line(&self) -> usize;
}

impl<T> LineOf for Spanned<T> {
    fn line(&self) -> usize {
        self.referenced.line() as usize
    }
}

#[derive(Deserialize)]
struct Metadata {
    name: String,
    namespace: Option<String>,
}

#[derive(Deserialize)]
struct ParentRef {
    kind: Option<String>,
    name: String,
}

/// A rule of either kind: route fields (`matches`, `timeouts`, `retry`) or authorization
/// fields (`from`, `to`).
#[derive(Deserialize, Default, Clone)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Rule {
    #[serde(default)]
    matches: Vec<RouteMatch>,
    timeouts: Option<Timeouts>,
    retry: Option<Retry>,
    #[serde(default)]
    from: Vec<From>,
    #[serde(default)]
    to: Vec<To>,
}

#[derive(Deserialize, Default, Clone)]
struct RouteMatch {
    path: Option<PathSpec>,
}

#[derive(Deserialize, Default, Clone)]
struct PathSpec {
    #[serde(rename = "type")]
    kind: Option<String>,
    value: Option<String>,
}

#[derive(Deserialize, Default, Clone)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Timeouts {
    request: Option<String>,
    backend_request: Option<String>,
}

#[derive(Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
struct Retry {
    attempts: Option<u32>,
    backoff: Option<String>,
    #[serde(default)]
    codes: Vec<u16>,
}

#[derive(Deserialize, Default, Clone)]
struct From {
    source: Source,
}

#[derive(Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
struct Source {
    #[serde(default)]
    principals: Vec<String>,
}

#[derive(Deserialize, Default, Clone)]
struct To {
    operation: Operation,
}

#[derive(Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
struct Operation {
    #[serde(default)]
    methods: Vec<String>,
    #[serde(default)]
    paths: Vec<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Selector {
    match_labels: BTreeMap<String, String>,
}

/// The policy `causeway up` writes when the topology names no file: Payment Service may mark
/// orders paid, with a timeout and retries on that route; every other call between meshed
/// services is denied (a meshed service denies by default).
pub const DEFAULT_POLICY: &str = "\
# Causeway's mesh policy: Gateway API HTTPRoutes (timeouts, retries) and Istio-style
# AuthorizationPolicies (who may call what). A change applies to every sidecar without a
# restart; a file that does not parse is refused with its line, and the old policy stays.
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: order-service
spec:
  parentRefs:
    - kind: Service
      name: order-service
  rules:
    - matches:
        - path: { type: PathPrefix, value: /orders }
      timeouts: { request: 3s, backendRequest: 1s }
      retry: { attempts: 2, backoff: 25ms, codes: [502, 503] }
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: payments-mark-orders-paid
  namespace: default
spec:
  selector:
    matchLabels: { app: order-service }
  action: ALLOW
  rules:
    - from:
        - source: { principals: [causeway.local/ns/default/sa/payment-service] }
      to:
        - operation: { methods: [POST], paths: ['/orders/*'] }
";

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: &str = "\
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: order-service
spec:
  parentRefs:
    - kind: Service
      name: order-service
  rules:
    - matches:
        - path: { type: PathPrefix, value: /orders }
      timeouts: { request: 2s, backendRequest: 500ms }
      retry: { attempts: 2, backoff: 50ms, codes: [502, 503] }
    - matches:
        - path: { type: Exact, value: /orders/export }
      timeouts: { request: 1m30s }
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: payments-mark-orders-paid
  namespace: default
spec:
  selector: { matchLabels: { app: order-service } }
  action: ALLOW
  rules:
    - from:
        - source: { principals: [causeway.local/ns/default/sa/payment-service] }
      to:
        - operation: { methods: [POST], paths: ['*/paid'] }
    - from:
        - source: { principals: ['*'] }
      to:
        - operation: { methods: [GET], paths: ['/healthz'] }
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: no-admin
spec:
  selector: { matchLabels: { app: order-service } }
  action: DENY
  rules:
    - to:
        - operation: { paths: ['/admin*'] }
";

    fn id(service: &str) -> SpiffeId {
        SpiffeId::new("causeway.local", "default", service).expect("id")
    }

    #[test]
    fn routes_pick_the_most_specific_match_with_their_timeouts_and_retries() {
        let policy = MeshPolicy::parse("mesh-policy.yaml", POLICY, "causeway.local").expect("ok");
        let route = policy
            .route("order-service", "/orders/7/paid")
            .expect("route");
        assert_eq!(route.request_timeout, Some(Duration::from_secs(2)));
        assert_eq!(route.attempt_timeout, Some(Duration::from_millis(500)));
        assert_eq!(route.retries, 2);
        assert_eq!(route.retry_backoff, Duration::from_millis(50));
        assert_eq!(route.retry_codes, vec![502, 503]);
        assert_eq!(route.rule.line, 10);
        let export = policy
            .route("order-service", "/orders/export")
            .expect("route");
        assert_eq!(export.request_timeout, Some(Duration::from_secs(90)));
        assert_eq!(export.retries, 0);
        assert!(policy.route("order-service", "/ordersx").is_none());
        assert!(policy.route("pricing-service", "/orders").is_none());
    }

    #[test]
    fn authorization_is_default_deny_and_names_the_deciding_rule() {
        let policy = MeshPolicy::parse("mesh-policy.yaml", POLICY, "causeway.local").expect("ok");
        let payment = id("payment-service");
        let decision = policy.authorize("order-service", Some(&payment), "POST", "/orders/7/paid");
        assert!(decision.allowed(), "{decision:?}");
        assert!(
            decision
                .reason("order-service")
                .contains("default/payments-mark-orders-paid (mesh-policy.yaml:27)"),
            "{}",
            decision.reason("order-service")
        );
        // Another identity, another method, no identity at all: no rule allows them.
        let user = id("user-service");
        for (caller, method, path) in [
            (Some(&user), "POST", "/orders/7/paid"),
            (Some(&payment), "GET", "/orders/7/paid"),
            (None, "POST", "/orders/7/paid"),
            (None, "GET", "/healthz"),
        ] {
            assert_eq!(
                policy.authorize("order-service", caller, method, path),
                Decision::NotAllowed,
                "{caller:?} {method} {path}"
            );
        }
        assert!(
            policy
                .authorize("order-service", Some(&user), "GET", "/healthz")
                .allowed()
        );
        // A DENY rule wins over an ALLOW one.
        assert!(matches!(
            policy.authorize("order-service", Some(&payment), "GET", "/admin/x"),
            Decision::Denied(RuleRef { line: 44, .. })
        ));
        // A service nobody wrote a policy for is meshed and denies everyone.
        assert_eq!(
            policy.authorize("pricing-service", Some(&payment), "GET", "/"),
            Decision::NotAllowed
        );
    }

    #[test]
    fn the_default_policy_lets_payments_mark_orders_paid_and_nothing_else() {
        let policy = MeshPolicy::parse("mesh-policy.yaml", DEFAULT_POLICY, "causeway.local")
            .expect("the default policy parses");
        let payment: SpiffeId = "spiffe://causeway.local/ns/default/sa/payment-service"
            .parse()
            .expect("id");
        let user: SpiffeId = "spiffe://causeway.local/ns/default/sa/user-service"
            .parse()
            .expect("id");
        let allowed = |caller: &SpiffeId, method: &str, service: &str, path: &str| {
            policy
                .authorize(service, Some(caller), method, path)
                .allowed()
        };
        assert!(allowed(&payment, "POST", "order-service", "/orders/1/paid"));
        assert!(!allowed(&payment, "GET", "order-service", "/orders"));
        assert!(!allowed(&user, "POST", "order-service", "/orders/1/paid"));
        assert!(!allowed(&payment, "POST", "payment-service", "/payments"));
        let route = policy
            .route("order-service", "/orders/1/paid")
            .expect("route");
        assert_eq!(route.retries, 2);
        assert_eq!(route.request_timeout, Some(Duration::from_secs(3)));
    }

    #[test]
    fn a_bad_file_is_refused_with_file_and_line() {
        let cases = [
            (
                POLICY.replace("500ms", "half a second"),
                "mesh-policy.yaml:10",
            ),
            (
                POLICY.replace("codes: [502, 503]", "codes: [404]"),
                "mesh-policy.yaml:10",
            ),
            (
                POLICY.replace("causeway.local/ns/default/sa/payment-service", "payments"),
                "mesh-policy.yaml:27",
            ),
            (
                POLICY.replace(
                    "causeway.local/ns/default/sa/payment-service",
                    "other.domain/ns/default/sa/payment-service",
                ),
                "trust domain",
            ),
            (
                POLICY.replace("action: DENY", "action: AUDIT"),
                "mesh-policy.yaml:37",
            ),
            (
                POLICY.replace("kind: Service", "kind: Gateway"),
                "mesh-policy.yaml:2",
            ),
            (POLICY.replace("retry: {", "retries: {"), "mesh-policy.yaml"),
            ("{ not yaml: [".to_string(), "mesh-policy.yaml"),
        ];
        for (yaml, expected) in cases {
            let err = MeshPolicy::parse("mesh-policy.yaml", &yaml, "causeway.local")
                .expect_err("refused")
                .to_string();
            assert!(err.contains(expected), "{err} should name {expected}");
        }
    }

    #[test]
    fn gateway_durations() {
        assert_eq!(
            parse_gateway_duration("500ms"),
            Some(Duration::from_millis(500))
        );
        assert_eq!(
            parse_gateway_duration("1h2m3s4ms"),
            Some(Duration::from_millis(3_723_004))
        );
        for bad in ["", "5", "1.5s", "s", "123456s", "1s1s1s1s1s", "-1s"] {
            assert_eq!(parse_gateway_duration(bad), None, "{bad}");
        }
    }
}
