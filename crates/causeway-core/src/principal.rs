//! Who a request acts for, as the edge verified it, and the headers Causeway's tiers use among
//! themselves.
//!
//! The authorization model: the edge (the reverse proxy) verifies the caller's token and passes
//! its subject and scopes on in [`AUTHENTICATED_SUBJECT`] and [`AUTHENTICATED_SCOPE`]; every
//! header a client sends under those names, or any other internal name ([`is_internal`]), is
//! removed at the edge first, so a service can trust what it reads there. A service authorizes
//! by that [`Principal`]: a user's data is readable and writable by that user (subject equal to
//! the user id) and by a principal with the [`scopes::ADMIN`] scope; anyone else gets 403, and a
//! request with no principal 401. A service passes the principal on when it calls another, so
//! the callee authorizes the same user.

use http::HeaderMap;
use http::header::{HeaderName, HeaderValue};

/// The token's subject, set by the edge; never taken from a client.
pub const AUTHENTICATED_SUBJECT: HeaderName = HeaderName::from_static("x-authenticated-subject");
/// The token's scopes (space-separated, as the token's `scope` claim), set by the edge.
pub const AUTHENTICATED_SCOPE: HeaderName = HeaderName::from_static("x-authenticated-scope");
/// Asks the tiers behind the edge for `Server-Timing` entries (the edge sets it when the
/// answer's timings may go to the caller).
pub const SERVER_TIMING_REQUEST: HeaderName = HeaderName::from_static("causeway-server-timing");

/// The scopes Causeway's services give a meaning to.
pub mod scopes {
    /// Reads and writes any user's data.
    pub const ADMIN: &str = "admin";
    /// Gets `Server-Timing` with the internal hops from the edge.
    pub const DEBUG: &str = "debug";
}

/// Whether `name` is one of the headers the tiers use among themselves: the principal headers
/// and everything named `causeway-*` or `x-causeway-*`. The edge removes them from what clients
/// send.
pub fn is_internal(name: &HeaderName) -> bool {
    let name = name.as_str();
    name.starts_with("causeway-")
        || name.starts_with("x-causeway-")
        || name.starts_with("x-authenticated-")
}

/// Removes every internal header (see [`is_internal`]).
pub fn strip_internal(headers: &mut HeaderMap) {
    // Collected first: removing while iterating is not possible, and the usual case finds none.
    let internal: Vec<HeaderName> = headers
        .keys()
        .filter(|name| is_internal(name))
        .cloned()
        .collect();
    for name in internal {
        headers.remove(name);
    }
}

/// The authenticated caller a request acts for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    pub subject: String,
    pub scopes: Vec<String>,
}

impl Principal {
    pub fn new(subject: impl Into<String>, scope: Option<&str>) -> Self {
        Self {
            subject: subject.into(),
            scopes: scope
                .unwrap_or("")
                .split_ascii_whitespace()
                .map(str::to_owned)
                .collect(),
        }
    }

    /// The principal the edge set on a request, if any.
    pub fn from_headers(headers: &HeaderMap) -> Option<Self> {
        let subject = headers.get(AUTHENTICATED_SUBJECT)?.to_str().ok()?;
        if subject.is_empty() {
            return None;
        }
        let scope = headers
            .get(AUTHENTICATED_SCOPE)
            .and_then(|value| value.to_str().ok());
        Some(Self::new(subject, scope))
    }

    /// Sets this principal on a request (replacing any other).
    pub fn to_headers(&self, headers: &mut HeaderMap) {
        headers.remove(AUTHENTICATED_SUBJECT);
        headers.remove(AUTHENTICATED_SCOPE);
        if let Ok(subject) = HeaderValue::from_str(&self.subject) {
            headers.insert(AUTHENTICATED_SUBJECT, subject);
        }
        if !self.scopes.is_empty()
            && let Ok(scope) = HeaderValue::from_str(&self.scopes.join(" "))
        {
            headers.insert(AUTHENTICATED_SCOPE, scope);
        }
    }

    pub fn has_scope(&self, scope: &str) -> bool {
        self.scopes.iter().any(|held| held == scope)
    }

    /// Whether this principal may read or change the data of user `user_id`.
    pub fn may_act_for_user(&self, user_id: i64) -> bool {
        // The subject's exact text: "0123" or "+123" is another subject, not user 123.
        self.has_scope(scopes::ADMIN) || self.subject == user_id.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_principal_round_trips_through_headers() {
        let principal = Principal::new("123", Some("debug  admin"));
        assert_eq!(principal.scopes, ["debug", "admin"]);
        let mut headers = HeaderMap::new();
        headers.insert(AUTHENTICATED_SUBJECT, HeaderValue::from_static("forged"));
        principal.to_headers(&mut headers);
        assert_eq!(Principal::from_headers(&headers), Some(principal));
        assert_eq!(Principal::from_headers(&HeaderMap::new()), None);
    }

    #[test]
    fn users_act_for_themselves_and_admins_for_anyone() {
        let user = Principal::new("124", None);
        assert!(user.may_act_for_user(124));
        assert!(!user.may_act_for_user(123));
        assert!(!Principal::new("0124x", None).may_act_for_user(124));
        assert!(!Principal::new("0124", None).may_act_for_user(124));
        assert!(Principal::new("ops", Some("admin")).may_act_for_user(123));
        assert!(!Principal::new("ops", Some("debug")).may_act_for_user(123));
    }

    #[test]
    fn internal_headers_are_recognised_and_stripped() {
        let mut headers = HeaderMap::new();
        for name in [
            "x-authenticated-subject",
            "x-authenticated-scope",
            "causeway-server-timing",
            "causeway-debug-delay-ms",
            "x-causeway-attempt",
            "accept",
        ] {
            headers.insert(HeaderName::from_static(name), HeaderValue::from_static("1"));
        }
        strip_internal(&mut headers);
        assert_eq!(headers.len(), 1);
        assert!(headers.contains_key("accept"));
    }
}
