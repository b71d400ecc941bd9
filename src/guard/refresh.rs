//! The refresh engine: OAuth token sets kept fresh, one refresh at a time.
//!
//! - **When**: a token set is due once it has lived `fraction` (default 90 %) of its
//!   lifetime (from its last write to its not-after), or is within `margin` of
//!   expiring. A token with no not-after is never due.
//! - **Single-flight in a process**: one lock per token; callers that queue behind a
//!   refresh re-read the store when they get the lock and find the fresh token.
//! - **Across processes**: a lease in the store (`refresh_leases`, taken in a write
//!   transaction) makes one process the refresher; the others wait for the record to
//!   change and adopt the winner's token, so the guard itself never spends a rotated
//!   refresh token twice. The final write is a compare-and-set on the record's
//!   `updated` time. A lease outlives a crashed holder by at most `lease`.
//! - **Persist before handing out**: the new set is sealed and committed before
//!   `get_fresh` returns it. A response without a refresh token keeps the old one;
//!   `expires_in` becomes an absolute not-after.
//! - **Failures**: `invalid_grant` marks the token as needing re-authorisation (no
//!   retry loop; visible in `status`, `list`, `stats`). Transient failures back off
//!   exponentially with jitter up to a cap, honour `Retry-After`, and serve the old
//!   token while it is still valid. Every attempt is an audit event.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::keys::Sealer;
use super::{Inner, TokenGuard};
use crate::audit::NewEvent;
use crate::clock::now;
use crate::error::{Error, Result, exit};
use crate::seal::{Metadata, SecretKind, TokenState};
use crate::secret::{Secret, TokenSet, field};
use crate::store::{Lease as LeaseRow, StoreRead, StoreWrite, WriteTxn};
use crate::sync::{lock, read, write};

/// The pause between attempts to commit a provider's answer that the store's
/// database could not take.
const COMMIT_RETRY: Duration = Duration::from_millis(250);

/// What a refresher returns on success.
#[derive(Debug)]
pub struct RefreshedTokens {
    /// The new fields (at least `access_token`; `refresh_token` when rotated).
    pub tokens: TokenSet,
    /// Lifetime in seconds, if the provider said.
    pub expires_in: Option<u64>,
    /// `token_type`, if given.
    pub token_type: Option<String>,
    /// Granted scopes, if given.
    pub scopes: Option<Vec<String>>,
}

/// Why a refresh failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RefreshError {
    /// The refresh token is no longer valid: a human must re-authorise.
    InvalidGrant(String),
    /// Worth retrying later (timeout, 5xx, 429, unreadable response).
    Transient {
        /// What happened.
        detail: String,
        /// The provider's `Retry-After`, if any.
        retry_after: Option<Duration>,
    },
    /// Retrying will not help (bad client credentials, missing refresh token).
    Failed(String),
}

/// A provider's refresh hook: the built-in OAuth client, or a service's own.
pub trait Refresher: Send + Sync {
    /// Exchanges `current` (the stored token set) for a new one.
    fn refresh(
        &self,
        provider: &str,
        name: &str,
        current: &TokenSet,
    ) -> std::result::Result<RefreshedTokens, RefreshError>;
}

/// When and how hard to refresh.
#[derive(Debug, Clone, Copy)]
pub struct RefreshPolicy {
    /// Refresh once this fraction of the lifetime has passed (default 0.9).
    pub fraction: f64,
    /// …or when the token expires within this margin (default 60 s).
    pub margin: Duration,
    /// Attempts per refresh while the old token is expired (default 5).
    pub max_attempts: u32,
    /// First backoff delay (default 500 ms); doubles per failure, with jitter.
    pub base_delay: Duration,
    /// Backoff cap (default 60 s).
    pub max_delay: Duration,
    /// How long a cross-process refresh lease lasts (default 30 s).
    pub lease: Duration,
}

impl Default for RefreshPolicy {
    fn default() -> Self {
        RefreshPolicy {
            fraction: 0.9,
            margin: Duration::from_secs(60),
            max_attempts: 5,
            base_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(60),
            lease: Duration::from_secs(30),
        }
    }
}

/// What happened to one token in a refresh.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// A new token set was fetched and stored.
    Refreshed,
    /// Nothing to do: another caller refreshed it, or it was not due.
    Fresh,
    /// Another process committed a refresh first; its token was taken.
    Adopted,
    /// The provider refused the refresh token: a human must re-authorise.
    NeedsReauth,
    /// A transient failure; the still-valid token is served until the next attempt.
    BackingOff,
    /// The refresh failed.
    Failed,
}

impl Outcome {
    /// The name printed and serialised (`refreshed`, `needs-reauth`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Refreshed => "refreshed",
            Outcome::Fresh => "fresh",
            Outcome::Adopted => "adopted",
            Outcome::NeedsReauth => "needs-reauth",
            Outcome::BackingOff => "backing-off",
            Outcome::Failed => "failed",
        }
    }

    /// The CLI exit code this outcome asks for (0 unless something needs attention).
    pub fn exit_code(self) -> i32 {
        match self {
            Outcome::NeedsReauth => exit::EXPIRED,
            Outcome::Failed => exit::OTHER,
            Outcome::Refreshed | Outcome::Fresh | Outcome::Adopted | Outcome::BackingOff => exit::OK,
        }
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Outcome of one refresh attempt, for `refresh --due`.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct RefreshOutcome {
    /// Provider of the token refreshed.
    pub provider: String,
    /// Token name.
    pub name: String,
    /// What happened.
    pub outcome: Outcome,
    /// Detail (never a token).
    pub detail: String,
}

#[derive(Debug, Clone, Copy)]
struct Backoff {
    failures: u32,
    next_at: Instant,
}

type Key = (String, String);

/// Per-guard refresh state.
pub(crate) struct RefreshState {
    refreshers: RwLock<HashMap<String, Arc<dyn Refresher>>>,
    policy: RwLock<RefreshPolicy>,
    flights: Mutex<HashMap<Key, Arc<Mutex<()>>>>,
    backoff: Mutex<HashMap<Key, Backoff>>,
    owner: [u8; 16],
}

impl RefreshState {
    /// Fresh state with a random lease-owner id. A failed CSPRNG is an error: a
    /// zero id would let two processes share one lease.
    pub(crate) fn new() -> Result<Self> {
        Ok(RefreshState {
            refreshers: RwLock::new(HashMap::new()),
            policy: RwLock::new(RefreshPolicy::default()),
            flights: Mutex::new(HashMap::new()),
            backoff: Mutex::new(HashMap::new()),
            owner: crate::crypto::random_array()?,
        })
    }
}

/// Whether `meta` is due for a refresh at `now` under `policy`.
pub fn is_due(meta: &Metadata, policy: &RefreshPolicy, now: u64) -> bool {
    let Some(exp) = meta.expires_at else { return false };
    if now.saturating_add(policy.margin.as_secs()) >= exp {
        return true;
    }
    let start = meta.updated.min(exp);
    let lifetime = (exp - start) as f64;
    now as f64 >= start as f64 + lifetime * policy.fraction.clamp(0.0, 1.0)
}

fn jitter(d: Duration) -> Duration {
    // Full range 50-100 %: spreads retries of many tokens without ever waiting longer
    // than the nominal delay. Without randomness, the nominal delay itself.
    let Ok(b) = crate::crypto::random_array::<4>() else { return d };
    let f = 0.5 + 0.5 * (f64::from(u32::from_le_bytes(b)) / f64::from(u32::MAX));
    d.mul_f64(f)
}

enum Lease {
    /// This guard holds it.
    Ours,
    /// Another holder refreshed the token meanwhile (the record changed).
    Changed,
    /// Another live lease; retry after waiting.
    Busy,
}

impl TokenGuard {
    /// Registers the refresher of `provider` (replacing any earlier one).
    pub fn set_refresher(&self, provider: &str, refresher: Arc<dyn Refresher>) {
        write(&self.inner.refresh.refreshers).insert(provider.into(), refresher);
    }

    /// Sets the refresh policy.
    pub fn set_refresh_policy(&self, policy: RefreshPolicy) {
        *write(&self.inner.refresh.policy) = policy;
    }

    fn policy(&self) -> RefreshPolicy {
        *read(&self.inner.refresh.policy)
    }

    /// A token that is valid for at least the policy's margin: refreshed first when
    /// it is due (see the module docs).
    pub fn get_fresh(&self, provider: &str, name: &str) -> Result<Secret> {
        let (secret, meta) = self.get_with(provider, name, super::GetOptions { allow_expired: true })?;
        if meta.state == TokenState::NeedsReauth {
            return Err(Error::NeedsReauth { provider: provider.into(), name: name.into() });
        }
        if !is_due(&meta, &self.policy(), now()) {
            return Ok(secret);
        }
        self.refresh_token(provider, name, false).map(|(s, _)| s)
    }

    /// Refreshes now, whether due or not (`tokenguard refresh PROVIDER NAME`).
    pub fn refresh_now(&self, provider: &str, name: &str) -> Result<(Secret, RefreshOutcome)> {
        self.refresh_token(provider, name, true)
    }

    /// Refreshes every token set that is due, or that expires within `within`
    /// (`refresh --due`); one outcome per token considered. Never stops at the first
    /// failure.
    pub fn refresh_due(&self, within: Option<Duration>) -> Result<Vec<RefreshOutcome>> {
        let policy = self.policy();
        let t = now();
        let listed = self.list_report(None)?;
        // A record that does not parse cannot be refreshed: reported, and the others
        // go ahead (finding 9).
        let refreshers: Vec<String> = read(&self.inner.refresh.refreshers).keys().cloned().collect();
        let mut out: Vec<RefreshOutcome> = listed
            .damaged
            .into_iter()
            .filter_map(|key| {
                let (p, n) = key.split_once('/').unwrap_or((key.as_str(), ""));
                // Only where a refresher would have looked.
                refreshers.iter().any(|r| r == p).then(|| RefreshOutcome {
                    provider: p.into(),
                    name: n.into(),
                    outcome: Outcome::Failed,
                    detail: "the record does not parse (see `tokenguard doctor`)".into(),
                })
            })
            .collect();
        for info in listed.tokens {
            if info.meta.kind != SecretKind::TokenSet || info.meta.state != TokenState::Active {
                continue;
            }
            let soon = within.is_some_and(|w| info.meta.expires_at.is_some_and(|e| e <= t.saturating_add(w.as_secs())));
            if !(soon || is_due(&info.meta, &policy, t)) {
                continue;
            }
            if !read(&self.inner.refresh.refreshers).contains_key(&info.provider) {
                continue;
            }
            let (p, n) = (info.provider, info.name);
            out.push(match self.refresh_token(&p, &n, soon) {
                Ok((_, o)) => o,
                Err(e) => RefreshOutcome {
                    outcome: match e {
                        Error::NeedsReauth { .. } => Outcome::NeedsReauth,
                        _ => Outcome::Failed,
                    },
                    detail: e.to_string(),
                    provider: p,
                    name: n,
                },
            });
        }
        Ok(out)
    }

    fn refresh_token(&self, provider: &str, name: &str, force: bool) -> Result<(Secret, RefreshOutcome)> {
        let inner = &*self.inner;
        let key: Key = (provider.into(), name.into());
        let outcome = |o: Outcome, d: String| RefreshOutcome {
            provider: provider.into(),
            name: name.into(),
            outcome: o,
            detail: d,
        };
        let refresher = read(&inner.refresh.refreshers).get(provider).cloned().ok_or_else(|| {
            Error::Config(format!("no refresher for provider {provider}: add [providers.{provider}] to the config"))
        })?;
        // What the record looked like before queueing: a forced refresh that finds it
        // rewritten after the wait adopts that write instead of refreshing again.
        let before = self.get_with(provider, name, super::GetOptions { allow_expired: true })?.1.updated;
        let flight = lock(&inner.refresh.flights).entry(key.clone()).or_default().clone();
        let _flight = lock(&flight);
        let policy = self.policy();
        let mut attempt = 0u32;
        loop {
            // Re-read under the flight lock: a refresh that finished while we waited
            // (in this process or another) is adopted, not repeated.
            let (secret, meta) = self.get_with(provider, name, super::GetOptions { allow_expired: true })?;
            if meta.state == TokenState::NeedsReauth {
                return Err(Error::NeedsReauth { provider: provider.into(), name: name.into() });
            }
            let t = now();
            let rewritten = force && meta.updated != before;
            if (!force && !is_due(&meta, &policy, t)) || rewritten {
                return Ok((secret, outcome(Outcome::Fresh, "another caller refreshed it".into())));
            }
            let valid = !meta.is_expired_at(t);
            if let Some(b) = lock(&inner.refresh.backoff).get(&key).copied() {
                let wait = b.next_at.saturating_duration_since(Instant::now());
                if !wait.is_zero() {
                    if valid && !force {
                        return Ok((
                            secret,
                            outcome(Outcome::BackingOff, format!("next attempt in {wait:?}; serving the valid token")),
                        ));
                    }
                    std::thread::sleep(wait.min(policy.max_delay));
                }
            }
            let Secret::TokenSet(current) = &secret else {
                return Err(Error::InvalidInput(format!(
                    "{provider}/{name} is a raw secret, not a token set: nothing to refresh"
                )));
            };
            let leased_at = Instant::now();
            match inner.take_lease(provider, name, meta.updated, &policy)? {
                Lease::Ours => {}
                Lease::Changed => continue,
                Lease::Busy => {
                    // Another process is refreshing: wait for its commit.
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
            }
            let result = refresher.refresh(provider, name, current);
            match result {
                Ok(new) => {
                    lock(&inner.refresh.backoff).remove(&key);
                    // A fleet store's database may be away for a moment: the answer
                    // (a rotated refresh token with it, which the provider will not
                    // take back) is committed again while the lease holds, never
                    // dropped at the first failure. A batch that did reach the log
                    // is caught up with first, and then adopted below.
                    let deadline = leased_at + policy.lease.mul_f64(0.8);
                    // An attempt waits for the store's locks (and a fleet log's
                    // lock and statement) before it commits: one starts only if it
                    // can end by then.
                    let attempt_takes = COMMIT_RETRY + inner.store.write_takes();
                    let mut retried = false;
                    let committed = loop {
                        let attempt = inner.write(|txn| {
                            inner.release_lease(txn, provider, name)?;
                            let again = RefreshedTokens {
                                tokens: new.tokens.duplicate(),
                                expires_in: new.expires_in,
                                token_type: new.token_type.clone(),
                                scopes: new.scopes.clone(),
                            };
                            inner.commit_refresh(txn, provider, name, meta.updated, current, &meta, again)
                        });
                        match attempt {
                            // The database away, the log's lock held too long, or a
                            // catch-up that rotated the keys under this write: each
                            // safe to run again.
                            Err(Error::Database { .. } | Error::StoreBusy { .. } | Error::FleetConflict { .. })
                                if Instant::now() + attempt_takes < deadline =>
                            {
                                retried = true;
                                tracing::warn!(
                                    provider,
                                    name,
                                    "the refreshed token could not be committed yet; trying again while the lease \
                                     holds"
                                );
                                std::thread::sleep(COMMIT_RETRY);
                            }
                            other => break other?,
                        }
                    };
                    return match committed {
                        Some(s) => Ok((s, outcome(Outcome::Refreshed, String::new()))),
                        None => {
                            let s = self.get(provider, name)?;
                            // A retry whose earlier attempt did reach the log (its
                            // answer lost) finds its own token there: refreshed.
                            let ours = |s: &Secret| match s {
                                Secret::TokenSet(t) => t
                                    .get("access_token")
                                    .zip(new.tokens.get("access_token"))
                                    .is_some_and(|(a, b)| a.expose() == b.expose()),
                                _ => false,
                            };
                            if retried && ours(&s) {
                                return Ok((s, outcome(Outcome::Refreshed, "committed on a retry".into())));
                            }
                            // Lost a race despite the lease (it expired under us):
                            // the store holds the winner's token; use it.
                            tracing::warn!(provider, name, "refresh lost a race; adopting the stored token");
                            Ok((s, outcome(Outcome::Adopted, "another process committed first".into())))
                        }
                    };
                }
                Err(RefreshError::InvalidGrant(why)) => {
                    lock(&inner.refresh.backoff).remove(&key);
                    inner.write(|txn| {
                        inner.release_lease(txn, provider, name)?;
                        inner.mark_needs_reauth(txn, provider, name, meta.updated, &secret, &meta, &why)
                    })?;
                    return Err(Error::NeedsReauth { provider: provider.into(), name: name.into() });
                }
                Err(RefreshError::Failed(why)) => {
                    inner.end_attempt(provider, name, "failed", &why)?;
                    return Err(Error::RefreshFailed { provider: provider.into(), name: name.into(), detail: why });
                }
                Err(RefreshError::Transient { detail, retry_after }) => {
                    inner.end_attempt(provider, name, "transient", &detail)?;
                    attempt += 1;
                    let failures = lock(&inner.refresh.backoff).get(&key).map_or(0, |b| b.failures) + 1;
                    let exp = policy.base_delay.saturating_mul(1u32 << (failures - 1).min(16));
                    let delay = jitter(exp.min(policy.max_delay)).max(retry_after.unwrap_or_default());
                    lock(&inner.refresh.backoff)
                        .insert(key.clone(), Backoff { failures, next_at: Instant::now() + delay });
                    tracing::warn!(
                        provider,
                        name,
                        attempt,
                        delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                        "refresh failed transiently"
                    );
                    if valid && !force {
                        return Ok((secret, outcome(Outcome::BackingOff, detail)));
                    }
                    if attempt >= policy.max_attempts {
                        return Err(Error::RefreshFailed {
                            provider: provider.into(),
                            name: name.into(),
                            detail: format!("{detail} (gave up after {attempt} attempts)"),
                        });
                    }
                }
            }
        }
    }
}

impl Inner {
    /// Takes the cross-process refresh lease of a token whose record was last written
    /// at `seen_updated`.
    fn take_lease(&self, provider: &str, name: &str, seen_updated: u64, policy: &RefreshPolicy) -> Result<Lease> {
        self.write(|txn| {
            let current = txn
                .with_record(provider, name, |r| Ok(r.updated))?
                .ok_or_else(|| Error::NotFound { provider: provider.into(), name: name.into() })?;
            if current != seen_updated {
                return Ok(Lease::Changed);
            }
            let t = now();
            if txn.lease(provider, name)?.is_some_and(|l| l.owner != self.refresh.owner && l.until > t) {
                return Ok(Lease::Busy);
            }
            let until = t.saturating_add(policy.lease.as_secs().max(1));
            txn.put_lease(provider, name, Some(LeaseRow { owner: self.refresh.owner, until }))?;
            Ok(Lease::Ours)
        })
    }

    /// Releases the lease and audits a failed attempt, in one transaction.
    fn end_attempt(&self, provider: &str, name: &str, outcome: &str, detail: &str) -> Result<()> {
        self.write(|txn| {
            self.release_lease(txn, provider, name)?;
            self.audit(txn, NewEvent { op: "refresh", provider, name, outcome, detail: detail.into() })
        })
    }

    fn release_lease(&self, txn: &WriteTxn, provider: &str, name: &str) -> Result<()> {
        txn.put_lease(provider, name, None)
    }

    /// Writes the refreshed set if the record is still the one we refreshed (its
    /// `updated` unchanged); `None` when another writer got there first.
    #[allow(clippy::too_many_arguments)]
    fn commit_refresh(
        &self,
        txn: &WriteTxn,
        provider: &str,
        name: &str,
        seen_updated: u64,
        old: &TokenSet,
        old_meta: &Metadata,
        new: RefreshedTokens,
    ) -> Result<Option<Secret>> {
        let mut set = new.tokens;
        if set.get(field::REFRESH_TOKEN).is_none() {
            // RFC 6749 §6: the provider MAY issue a new refresh token; if it does not,
            // the old one stays valid, with its own lifetime.
            for kept in [field::REFRESH_TOKEN, "refresh_token_expires_at"] {
                if let Some(v) = old.get(kept) {
                    set.insert(kept, v.duplicate());
                }
            }
        }
        if set.get(field::ID_TOKEN).is_none()
            && let Some(id) = old.get(field::ID_TOKEN)
        {
            set.insert(field::ID_TOKEN, id.duplicate());
        }
        let t = now();
        let meta = Metadata {
            created: old_meta.created,
            updated: t.max(seen_updated + 1),
            expires_at: new.expires_in.map(|s| t.saturating_add(s)),
            state: TokenState::Active,
            kind: SecretKind::TokenSet,
            token_type: new.token_type.or_else(|| old_meta.token_type.clone()),
            scopes: new.scopes.unwrap_or_else(|| old_meta.scopes.clone()),
            labels: old_meta.labels.clone(),
        };
        let secret = Secret::TokenSet(set);
        if !self.put_if_unchanged(txn, provider, name, seen_updated, &secret, meta)? {
            return Ok(None);
        }
        self.audit(txn, NewEvent { op: "refresh", provider, name, outcome: "ok", detail: String::new() })?;
        Ok(Some(secret))
    }

    #[allow(clippy::too_many_arguments)]
    fn mark_needs_reauth(
        &self,
        txn: &WriteTxn,
        provider: &str,
        name: &str,
        seen_updated: u64,
        secret: &Secret,
        meta: &Metadata,
        why: &str,
    ) -> Result<()> {
        let mut m = meta.clone();
        m.state = TokenState::NeedsReauth;
        m.updated = now().max(seen_updated + 1);
        self.put_if_unchanged(txn, provider, name, seen_updated, secret, m)?;
        self.audit(txn, NewEvent { op: "refresh", provider, name, outcome: "invalid_grant", detail: why.into() })
    }

    /// Seals and writes one record if the stored one was last written at
    /// `seen_updated` (compare-and-set); returns whether it was written.
    fn put_if_unchanged(
        &self,
        txn: &WriteTxn,
        provider: &str,
        name: &str,
        seen_updated: u64,
        secret: &Secret,
        meta: Metadata,
    ) -> Result<bool> {
        let mut sealer = Sealer::new(self, txn, &BTreeMap::from([(provider, 1)]))?;
        let written =
            sealer.put(txn, provider, name, secret, |old| old.filter(|o| o.updated == seen_updated).map(|_| meta))?;
        sealer.finish(txn)?;
        Ok(written.is_some())
    }
}
