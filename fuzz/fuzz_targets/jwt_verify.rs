//! The gateway's token check on any `Authorization` value: an error or valid claims, never a
//! panic; what it accepts must carry the configured issuer and audience.
#![no_main]

use std::sync::LazyLock;

use causeway_core::topology::JwtConfig;
use causeway_proxy::auth::Verifier;

const KEY: &[u8] = b"causeway-fuzz-signing-key-32-bytes!!";

static VERIFIER: LazyLock<Verifier> = LazyLock::new(|| Verifier::new(KEY, &JwtConfig::default()));

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(claims) = VERIFIER.verify(Some(data)) {
        let config = JwtConfig::default();
        assert_eq!(claims.iss, config.issuer);
        assert_eq!(claims.aud, config.audience);
    }
});
