//! A provider that answers at once, for tests and benchmarks that measure or check
//! the store's side of a refresh: answer n carries access token `at-n` and refresh
//! token `rt-n`, and it counts its calls. The including module names the crate's
//! types in a sibling module `tokenguard_refresher_api` (the library's own tests
//! and a bench reach them by different paths).

use std::sync::atomic::{AtomicUsize, Ordering};

use super::tokenguard_refresher_api::{RefreshError, RefreshedTokens, Refresher, SecretBytes, TokenSet};

#[derive(Default)]
pub struct Counting(AtomicUsize);

impl Counting {
    pub fn calls(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

impl Refresher for Counting {
    fn refresh(&self, _: &str, _: &str, _: &TokenSet) -> Result<RefreshedTokens, RefreshError> {
        let n = self.0.fetch_add(1, Ordering::SeqCst) + 1;
        Ok(RefreshedTokens {
            tokens: TokenSet::new()
                .with("access_token", SecretBytes::from_slice(format!("at-{n}").as_bytes()))
                .with("refresh_token", SecretBytes::from_slice(format!("rt-{n}").as_bytes())),
            expires_in: Some(3600),
            token_type: None,
            scopes: None,
        })
    }
}
