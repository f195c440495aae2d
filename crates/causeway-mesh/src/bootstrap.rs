//! Bootstrap tokens: how a sidecar proves which workload it belongs to before it has a certificate,
//! as a Kubernetes pod proves its service account with a projected token.
//!
//! `causeway up` mints one token per sidecar start (a JWT signed with HS256 under a key only the
//! supervisor and the control plane read), naming the SPIFFE ID and the instance; the control plane
//! verifies it and accepts each token once. A renewal is authenticated by the sidecar's current
//! mesh certificate instead, so a token is only ever needed for the first certificate.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use rand::RngCore;
use serde::{Deserialize, Serialize};

use crate::spiffe::SpiffeId;

/// The audience every bootstrap token names, so a token minted for something else is refused.
const AUDIENCE: &str = "causeway-mesh-control-plane";
const KEY_BYTES: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("the bootstrap token is malformed: {0}")]
    Malformed(String),
    #[error(
        "the bootstrap token's signature does not verify (forged, or minted under another key)"
    )]
    Forged,
    #[error("the bootstrap token has expired")]
    Expired,
    #[error("the bootstrap token is not meant for the mesh control plane (audience)")]
    WrongAudience,
    #[error("the bootstrap token names {0:?}, which is not a SPIFFE ID")]
    BadSubject(String),
    #[error("the bootstrap token has been used before; each sidecar start gets a fresh one")]
    Reused,
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0} does not hold a bootstrap key")]
    BadKey(PathBuf),
}

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    /// The workload's SPIFFE ID.
    sub: String,
    /// The instance the token was minted for (for logs and the certificate's subject).
    instance: String,
    aud: String,
    /// Unique per token, so that a token is accepted once.
    jti: String,
    iat: u64,
    exp: u64,
}

/// Who a verified token says the caller is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bootstrap {
    pub identity: SpiffeId,
    pub instance: String,
}

/// The shared secret tokens are signed with.
#[derive(Clone)]
pub struct BootstrapKey {
    secret: Vec<u8>,
}

impl std::fmt::Debug for BootstrapKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BootstrapKey(..)")
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs())
        .unwrap_or_default()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

impl BootstrapKey {
    pub fn generate() -> Self {
        let mut secret = vec![0; KEY_BYTES];
        rand::rng().fill_bytes(&mut secret);
        Self { secret }
    }

    /// Loads the key from `path`, creating it (readable by its owner only) on first use.
    pub fn load_or_create(path: &Path) -> Result<Self, TokenError> {
        if path.exists() {
            let text = fs::read_to_string(path).map_err(|source| TokenError::Io {
                action: "read",
                path: path.to_path_buf(),
                source,
            })?;
            let text = text.trim();
            let secret = (0..text.len())
                .step_by(2)
                .map(|at| {
                    text.get(at..at + 2)
                        .and_then(|pair| u8::from_str_radix(pair, 16).ok())
                })
                .collect::<Option<Vec<u8>>>()
                .filter(|secret| secret.len() == KEY_BYTES)
                .ok_or_else(|| TokenError::BadKey(path.to_path_buf()))?;
            return Ok(Self { secret });
        }
        let key = Self::generate();
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).map_err(|source| TokenError::Io {
                action: "create directory",
                path: dir.to_path_buf(),
                source,
            })?;
        }
        causeway_core::tls::write_private(path, &hex(&key.secret)).map_err(|err| {
            TokenError::Io {
                action: "write",
                path: path.to_path_buf(),
                source: std::io::Error::other(err.to_string()),
            }
        })?;
        Ok(key)
    }

    /// A token for one start of `instance`'s sidecar, valid for `lifetime`.
    pub fn mint(&self, identity: &SpiffeId, instance: &str, lifetime: Duration) -> String {
        let mut nonce = [0u8; 16];
        rand::rng().fill_bytes(&mut nonce);
        let issued = now();
        let claims = Claims {
            sub: identity.to_string(),
            instance: instance.to_string(),
            aud: AUDIENCE.to_string(),
            jti: hex(&nonce),
            iat: issued,
            exp: issued + lifetime.as_secs().max(1),
        };
        // Encoding claims of plain strings and numbers with an HMAC key cannot fail.
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(&self.secret),
        )
        .unwrap_or_default()
    }
}

/// Verifies tokens and remembers the ones accepted until they expire. The journal keeps that
/// memory across a restart of the control plane, so a token seen before a crash stays spent.
pub struct TokenVerifier {
    key: DecodingKey,
    validation: Validation,
    spent: Mutex<HashMap<String, u64>>,
    journal: Option<PathBuf>,
}

impl TokenVerifier {
    pub fn new(key: &BootstrapKey, journal: Option<PathBuf>) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_audience(&[AUDIENCE]);
        validation.set_required_spec_claims(&["exp", "aud", "sub"]);
        validation.leeway = 0;
        let spent = journal
            .as_deref()
            .and_then(|path| fs::read_to_string(path).ok())
            .map(|text| {
                let now = now();
                text.lines()
                    .filter_map(|line| {
                        let (jti, exp) = line.split_once(' ')?;
                        let exp: u64 = exp.parse().ok()?;
                        (exp >= now).then(|| (jti.to_string(), exp))
                    })
                    .collect()
            })
            .unwrap_or_default();
        Self {
            key: DecodingKey::from_secret(&key.secret),
            validation,
            spent: Mutex::new(spent),
            journal,
        }
    }

    /// Checks the token and spends it.
    pub fn verify(&self, token: &str) -> Result<Bootstrap, TokenError> {
        let data =
            jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation).map_err(|err| {
                match err.kind() {
                    ErrorKind::InvalidSignature => TokenError::Forged,
                    ErrorKind::ExpiredSignature => TokenError::Expired,
                    ErrorKind::InvalidAudience => TokenError::WrongAudience,
                    _ => TokenError::Malformed(err.to_string()),
                }
            })?;
        let claims = data.claims;
        let identity: SpiffeId = claims
            .sub
            .parse()
            .map_err(|_| TokenError::BadSubject(claims.sub.clone()))?;
        {
            let mut spent = self.spent.lock().unwrap_or_else(|e| e.into_inner());
            let now = now();
            spent.retain(|_, exp| *exp >= now);
            if spent.contains_key(&claims.jti) {
                return Err(TokenError::Reused);
            }
            spent.insert(claims.jti.clone(), claims.exp);
        }
        if let Some(path) = &self.journal {
            let written = fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .and_then(|mut file| writeln!(file, "{} {}", claims.jti, claims.exp));
            if let Err(err) = written {
                // The token stays spent in memory; only a restart could let it through again.
                tracing::warn!(path = %path.display(), error = %err, "cannot record a spent bootstrap token");
            }
        }
        Ok(Bootstrap {
            identity,
            instance: claims.instance,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payment() -> SpiffeId {
        SpiffeId::new("causeway.local", "default", "payment-service").expect("valid")
    }

    #[test]
    fn a_token_is_accepted_once_and_names_its_workload() {
        let key = BootstrapKey::generate();
        let verifier = TokenVerifier::new(&key, None);
        let token = key.mint(&payment(), "payment-service-1", Duration::from_secs(60));
        let bootstrap = verifier.verify(&token).expect("fresh token");
        assert_eq!(bootstrap.identity, payment());
        assert_eq!(bootstrap.instance, "payment-service-1");
        assert!(matches!(verifier.verify(&token), Err(TokenError::Reused)));
        // Another token for the same workload is a new start, and fine.
        let again = key.mint(&payment(), "payment-service-1", Duration::from_secs(60));
        assert!(verifier.verify(&again).is_ok());
    }

    #[test]
    fn forged_expired_and_garbage_tokens_are_refused() {
        let verifier = TokenVerifier::new(&BootstrapKey::generate(), None);
        let other_key = BootstrapKey::generate();
        let forged = other_key.mint(&payment(), "payment-service-1", Duration::from_secs(60));
        assert!(matches!(verifier.verify(&forged), Err(TokenError::Forged)));
        assert!(matches!(
            verifier.verify("not.a.token"),
            Err(TokenError::Malformed(_))
        ));

        let key = BootstrapKey::generate();
        let verifier = TokenVerifier::new(&key, None);
        let claims = Claims {
            sub: payment().to_string(),
            instance: "payment-service-1".into(),
            aud: AUDIENCE.into(),
            jti: "old".into(),
            iat: now() - 120,
            exp: now() - 60,
        };
        let expired = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(&key.secret),
        )
        .expect("encode");
        assert!(matches!(
            verifier.verify(&expired),
            Err(TokenError::Expired)
        ));
        let elsewhere = Claims {
            aud: "some-api".into(),
            exp: now() + 60,
            ..claims
        };
        let elsewhere = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &elsewhere,
            &EncodingKey::from_secret(&key.secret),
        )
        .expect("encode");
        assert!(matches!(
            verifier.verify(&elsewhere),
            Err(TokenError::WrongAudience)
        ));
    }

    #[test]
    fn a_spent_token_stays_spent_across_a_restart_and_the_key_persists() {
        let dir = std::env::temp_dir().join(format!("causeway-bootstrap-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let key_path = dir.join("bootstrap.key");
        let key = BootstrapKey::load_or_create(&key_path).expect("create");
        let reloaded = BootstrapKey::load_or_create(&key_path).expect("load");
        assert_eq!(key.secret, reloaded.secret);

        let journal = dir.join("spent-tokens");
        let token = key.mint(&payment(), "payment-service-1", Duration::from_secs(60));
        assert!(
            TokenVerifier::new(&key, Some(journal.clone()))
                .verify(&token)
                .is_ok()
        );
        let restarted = TokenVerifier::new(&reloaded, Some(journal));
        assert!(matches!(restarted.verify(&token), Err(TokenError::Reused)));

        fs::write(&key_path, "zz").expect("write");
        assert!(matches!(
            BootstrapKey::load_or_create(&key_path),
            Err(TokenError::BadKey(_))
        ));
        let _ = fs::remove_dir_all(&dir);
    }
}
