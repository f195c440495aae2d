//! API tokens: HS256 JWTs signed with a secret kept in the data dir. `causeway token` issues
//! them; the gateway verifies signature, expiry, issuer and audience, and says which check failed.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use causeway_core::topology::JwtConfig;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use rand::RngCore;
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read token signing key {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot write token signing key {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error("token signing key {path} is too short ({len} bytes; at least 32 are needed)")]
    TooShort { path: String, len: usize },
    #[error("cannot sign token: {0}")]
    Sign(#[from] jsonwebtoken::errors::Error),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub iss: String,
    pub aud: String,
    pub iat: u64,
    pub exp: u64,
    /// Space-separated scopes (the `scope` claim of RFC 8693 §4.2 and RFC 9068), such as
    /// `admin` or `debug` (see `causeway_core::principal::scopes`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
}

/// Reads the signing secret, creating a random one (readable by its owner only) on first use.
pub fn load_or_create_key(path: &Path) -> Result<Vec<u8>, KeyError> {
    let shown = path.display().to_string();
    if !path.exists() {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|source| KeyError::Write {
                path: shown.clone(),
                source,
            })?;
        }
        let mut secret = [0u8; 32];
        rand::rng().fill_bytes(&mut secret);
        let hex: String = secret.iter().map(|b| format!("{b:02x}")).collect();
        causeway_core::tls::write_private(path, &hex).map_err(|err| KeyError::Write {
            path: shown.clone(),
            source: std::io::Error::other(err.to_string()),
        })?;
    }
    let key = std::fs::read(path).map_err(|source| KeyError::Read {
        path: shown.clone(),
        source,
    })?;
    let key = key.trim_ascii().to_vec();
    if key.len() < 32 {
        return Err(KeyError::TooShort {
            path: shown,
            len: key.len(),
        });
    }
    Ok(key)
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Issues a token for `subject` valid for `ttl_secs` (negative: already expired, for tests).
pub fn issue(
    key: &[u8],
    config: &JwtConfig,
    subject: &str,
    ttl_secs: i64,
) -> Result<String, KeyError> {
    issue_scoped(key, config, subject, &[], ttl_secs)
}

/// [`issue`] with `scopes` in the token's `scope` claim.
pub fn issue_scoped(
    key: &[u8],
    config: &JwtConfig,
    subject: &str,
    scopes: &[&str],
    ttl_secs: i64,
) -> Result<String, KeyError> {
    let iat = now();
    let exp = iat.saturating_add_signed(ttl_secs);
    let claims = Claims {
        sub: subject.to_string(),
        iss: config.issuer.clone(),
        aud: config.audience.clone(),
        iat,
        exp,
        scope: (!scopes.is_empty()).then(|| scopes.join(" ")),
    };
    Ok(jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(key),
    )?)
}

/// Why a request was not authenticated; each becomes a 401 with its code.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error(
        "no Authorization header; send `Authorization: Bearer <token>` (get one with `causeway token --sub <user>`)"
    )]
    Missing,
    #[error("the Authorization header is not `Bearer <token>`")]
    NotBearer,
    #[error("the token is malformed: {0}")]
    Malformed(String),
    #[error("the token's signature does not verify")]
    BadSignature,
    #[error("the token expired")]
    Expired,
    #[error("the token is not valid yet")]
    NotYetValid,
    #[error("the token's {0} is not accepted here")]
    WrongClaim(&'static str),
}

impl AuthError {
    pub fn code(&self) -> &'static str {
        match self {
            AuthError::Missing => "missing_token",
            AuthError::NotBearer | AuthError::Malformed(_) => "malformed_token",
            AuthError::BadSignature => "invalid_signature",
            AuthError::Expired => "token_expired",
            AuthError::NotYetValid => "token_not_yet_valid",
            AuthError::WrongClaim(_) => "invalid_claims",
        }
    }
}

/// Verifies bearer tokens.
pub struct Verifier {
    key: DecodingKey,
    validation: Validation,
}

impl Verifier {
    pub fn new(key: &[u8], config: &JwtConfig) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_issuer(&[&config.issuer]);
        validation.set_audience(&[&config.audience]);
        validation.set_required_spec_claims(&["exp", "sub", "iss", "aud"]);
        validation.leeway = config.leeway_secs;
        validation.validate_nbf = true;
        Self {
            key: DecodingKey::from_secret(key),
            validation,
        }
    }

    /// Checks an `Authorization` header value.
    pub fn verify(&self, authorization: Option<&[u8]>) -> Result<Claims, AuthError> {
        let header = authorization.ok_or(AuthError::Missing)?;
        let header = std::str::from_utf8(header).map_err(|_| AuthError::NotBearer)?;
        let token = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .map(str::trim)
            .filter(|token| !token.is_empty())
            .ok_or(AuthError::NotBearer)?;
        jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)
            .map(|data| data.claims)
            .map_err(|err| match err.kind() {
                ErrorKind::InvalidSignature => AuthError::BadSignature,
                ErrorKind::ExpiredSignature => AuthError::Expired,
                ErrorKind::ImmatureSignature => AuthError::NotYetValid,
                ErrorKind::InvalidIssuer => AuthError::WrongClaim("issuer"),
                ErrorKind::InvalidAudience => AuthError::WrongClaim("audience"),
                ErrorKind::InvalidAlgorithm => AuthError::WrongClaim("algorithm"),
                _ => AuthError::Malformed(err.to_string()),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn verifier() -> Verifier {
        Verifier::new(KEY, &JwtConfig::default())
    }

    fn bearer(token: &str) -> Vec<u8> {
        format!("Bearer {token}").into_bytes()
    }

    #[test]
    fn accepts_a_fresh_token() {
        let token = issue(KEY, &JwtConfig::default(), "123", 60).unwrap();
        let claims = verifier().verify(Some(&bearer(&token))).unwrap();
        assert_eq!(claims.sub, "123");
    }

    #[test]
    fn scopes_travel_in_the_scope_claim() {
        let token =
            issue_scoped(KEY, &JwtConfig::default(), "ops", &["admin", "debug"], 60).unwrap();
        let claims = verifier().verify(Some(&bearer(&token))).unwrap();
        assert_eq!(claims.scope.as_deref(), Some("admin debug"));
        let plain = issue(KEY, &JwtConfig::default(), "123", 60).unwrap();
        assert_eq!(
            verifier().verify(Some(&bearer(&plain))).unwrap().scope,
            None
        );
    }

    #[test]
    fn names_each_failure() {
        let config = JwtConfig::default();
        let v = verifier();
        assert_eq!(v.verify(None), Err(AuthError::Missing));
        assert_eq!(v.verify(Some(b"Basic abc")), Err(AuthError::NotBearer));
        assert!(matches!(
            v.verify(Some(&bearer("not.a.jwt"))),
            Err(AuthError::Malformed(_))
        ));
        let expired = issue(KEY, &config, "123", -120).unwrap();
        assert_eq!(v.verify(Some(&bearer(&expired))), Err(AuthError::Expired));
        let other_key = issue(b"another-key-another-key-another-k", &config, "123", 60).unwrap();
        assert_eq!(
            v.verify(Some(&bearer(&other_key))),
            Err(AuthError::BadSignature)
        );
        let foreign = JwtConfig {
            audience: "someone-else".into(),
            ..config
        };
        let wrong_aud = issue(KEY, &foreign, "123", 60).unwrap();
        assert_eq!(
            v.verify(Some(&bearer(&wrong_aud))),
            Err(AuthError::WrongClaim("audience"))
        );
    }

    #[test]
    fn key_is_created_once_and_kept() {
        let dir = std::env::temp_dir().join(format!("causeway-key-{}", std::process::id()));
        let path = dir.join("jwt.key");
        let first = load_or_create_key(&path).unwrap();
        assert_eq!(first.len(), 64);
        assert_eq!(load_or_create_key(&path).unwrap(), first);
        std::fs::write(&path, "short").unwrap();
        assert!(matches!(
            load_or_create_key(&path),
            Err(KeyError::TooShort { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
