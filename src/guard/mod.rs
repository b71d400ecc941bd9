//! [`TokenGuard`], the public facade: it ties the roots, the DEK cache, the sealing
//! and the typed store together.
//!
//! Request path of a warm `get`: one read transaction, one record lookup, a header
//! parse, a cache hit for the provider DEK, one AES-GCM open. The hardware is touched
//! only when a DEK is not cached: once per provider DEK per process (plus one unwrap
//! of the store's integrity key at open, which is also how a wrong root is caught
//! before anything else happens).
//!
//! One file per job: `open` (create and open, root matching), `records` (put, get,
//! list, delete), `keys` (DEK selection, creation, unwrapping, sealing a record),
//! `doctor` (checks and statistics), and the lifecycle files `rotate`, `revoke`,
//! `refresh` and `roots`.

mod doctor;
mod fleet;
mod journal;
mod keys;
mod open;
mod records;
#[cfg(test)]
mod replay_tests;
pub use records::ListReport;
pub mod refresh;
pub mod revoke;
pub mod roots;
pub mod rotate;
mod salvage;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;
use zeroize::Zeroizing;

use crate::audit::NewEvent;
use crate::cache::{CacheLimits, DekCache};
use crate::error::{Error, Result};
use crate::root::RootKey;
use crate::seal::{Metadata, STORE_ID_LEN};
use crate::secret::{DekMaterial, Secret};
use crate::store::CounterStatus;
use crate::store::{DekState, RootPin, Store, StoreRead, StoreWrite};

pub use doctor::{DekInfo, FleetWrites, HardwareCalls, RecordScan, Stats};
pub use journal::JournalStatus;
pub(crate) use open::{check_hardware, unlock_key};
pub use salvage::SalvageReport;

/// Options of a guard beyond its store and roots.
#[derive(Debug, Clone)]
pub struct GuardOptions {
    /// DEK cache limits.
    pub cache: CacheLimits,
    /// Refuse non-hardware roots (`soft`). The production setting.
    pub require_hardware: bool,
    /// Recorded as the actor of audit events.
    pub actor: String,
    /// Encryptions after which a DEK version is rotated automatically (default 2^30;
    /// NIST SP 800-38D allows 2^32 with random 96-bit nonces).
    pub max_dek_encryptions: u64,
    /// Rotation policy: an active DEK older than this is reported by `doctor`.
    pub max_dek_age: Option<std::time::Duration>,
    /// How often a running guard looks whether another process changed the store
    /// (default 1 s): the bound on how long a revocation, shred, retirement or
    /// rotation by another process, or an edit of the file, stays unseen.
    pub state_recheck: std::time::Duration,
    /// Whether a store whose rows do not match its authenticated state is refused
    /// (the default) or opened for inspection (`doctor`, `upgrade`, incident
    /// response; secrets are never opened then).
    pub state_check: crate::store::StateCheck,
}

impl GuardOptions {
    /// The default automatic-rotation bound: 2^30 encryptions per DEK version.
    pub const DEFAULT_MAX_DEK_ENCRYPTIONS: u64 = 1 << 30;
    /// The most encryptions one DEK version may ever make: 2^32 (NIST SP 800-38D
    /// §8.3, random 96-bit nonces). A larger setting is capped to it.
    pub const MAX_DEK_ENCRYPTIONS: u64 = 1 << 32;
    /// The default bound on how long a change by another process stays unseen.
    pub const DEFAULT_STATE_RECHECK: std::time::Duration = std::time::Duration::from_secs(1);
}

impl Default for GuardOptions {
    fn default() -> Self {
        GuardOptions {
            cache: CacheLimits::default(),
            require_hardware: false,
            actor: format!("pid:{}", std::process::id()),
            max_dek_encryptions: Self::DEFAULT_MAX_DEK_ENCRYPTIONS,
            max_dek_age: None,
            state_recheck: Self::DEFAULT_STATE_RECHECK,
            state_check: crate::store::StateCheck::Enforce,
        }
    }
}

/// Optional metadata of a `put`.
#[derive(Debug, Clone, Default)]
pub struct PutOptions {
    /// Not-after, unix seconds.
    pub expires_at: Option<u64>,
    /// Labels (owner, environment, …).
    pub labels: BTreeMap<String, String>,
    /// OAuth `token_type`.
    pub token_type: Option<String>,
    /// OAuth scopes.
    pub scopes: Vec<String>,
}

/// One item of [`TokenGuard::put_many`]: a secret and where it goes.
#[derive(Debug)]
pub struct PutItem {
    /// Provider (see [`validate_ident`]).
    pub provider: String,
    /// Token name within the provider.
    pub name: String,
    /// The secret.
    pub secret: Secret,
    /// Expiry, labels and OAuth metadata stored with it.
    pub options: PutOptions,
}

/// Options of a `get`.
#[derive(Debug, Clone, Copy, Default)]
pub struct GetOptions {
    /// Return an expired token instead of failing with [`Error::Expired`].
    pub allow_expired: bool,
}

/// What a token is now: the one status every output shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Condition {
    /// Usable.
    Active,
    /// Past its not-after.
    Expired,
    /// The provider refused its refresh token: a human must re-authorise.
    NeedsReauth,
    /// Its provider's data keys were destroyed: unrecoverable.
    Shredded,
}

impl Condition {
    /// The condition of a record with `meta`, sealed under a DEK version that is
    /// `destroyed` or not, at `now`.
    pub fn of(meta: &Metadata, destroyed: bool, now: u64) -> Self {
        if destroyed {
            Condition::Shredded
        } else if meta.state == crate::seal::TokenState::NeedsReauth {
            Condition::NeedsReauth
        } else if meta.is_expired_at(now) {
            Condition::Expired
        } else {
            Condition::Active
        }
    }

    /// The name printed and serialised.
    pub fn as_str(self) -> &'static str {
        match self {
            Condition::Active => "active",
            Condition::Expired => "expired",
            Condition::NeedsReauth => "needs_reauth",
            Condition::Shredded => "shredded",
        }
    }
}

/// What `list` shows of a token: never its secret.
#[derive(Debug, Clone, Serialize)]
pub struct TokenInfo {
    /// Provider of the token.
    pub provider: String,
    /// Token name.
    pub name: String,
    /// What it is now.
    pub status: Condition,
    /// DEK version that sealed it.
    pub dek_version: u32,
    /// Metadata (as stored; authenticated when the token is opened).
    #[serde(flatten)]
    pub meta: Metadata,
    /// Whether the token is past its not-after now.
    pub expired: bool,
}

#[derive(Default)]
struct Counters {
    unwraps: AtomicU64,
    wraps: AtomicU64,
    generates: AtomicU64,
    verifies: AtomicU64,
}

impl Counters {
    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// A configured root and the id the store knows it by.
struct ActiveRoot {
    root_id: u16,
    /// Shared with the store when this root offers its rollback counter.
    key: Arc<dyn RootKey>,
}

impl ActiveRoot {
    /// Wraps `key` and unwraps the result again before it is stored (finding 11): a
    /// token that returns a blob it cannot open (a mechanism quirk, an IV it chose
    /// and did not return) is caught now, not when this root is the last way in.
    fn wrap_checked(&self, key: &DekMaterial, counters: &Counters) -> Result<crate::root::Wrapped> {
        Counters::add(&counters.wraps, 1);
        let w = self.key.wrap(key)?;
        self.check_wrap(&w, key, counters)?;
        Ok(w)
    }

    fn check_wrap(&self, w: &crate::root::Wrapped, key: &DekMaterial, counters: &Counters) -> Result<()> {
        check_wrap(&*self.key, w, key, counters)
    }
}

/// Unwraps a fresh wrap of `key` under `root` and compares.
/// A wrap-only root (an age escrow root without its identity) cannot be checked so:
/// its wrap is software encryption by the `age` crate, not a token's mechanism, and
/// the recovery test opens such wraps with the identity and with the `age` CLI.
fn check_wrap(root: &dyn RootKey, w: &crate::root::Wrapped, key: &DekMaterial, counters: &Counters) -> Result<()> {
    if !root.can_unwrap() {
        return Ok(());
    }
    Counters::add(&counters.verifies, 1);
    let back = root.unwrap(w)?;
    if back.expose() != key.expose() {
        return Err(Error::Hardware {
            backend: root.backend(),
            operation: "checking a fresh wrap",
            detail: "the key unwrapped from a new wrap is not the key that was wrapped".into(),
        });
    }
    Ok(())
}

struct Inner {
    store: Store,
    store_id: [u8; STORE_ID_LEN],
    roots: Vec<ActiveRoot>,
    pins: Vec<RootPin>,
    /// The integrity key and the audit keys: replaced together when `root remove`
    /// rotates the integrity key.
    keys: std::sync::RwLock<Arc<GuardKeys>>,
    cache: DekCache,
    /// DEK versions created in the write transaction in progress: cached for it, and
    /// forgotten again if it does not commit (another process may then create the
    /// same version with another key).
    uncommitted: std::sync::Mutex<Vec<(String, u32)>>,
    counters: Counters,
    opts: GuardOptions,
    refresh: refresh::RefreshState,
    /// Configured roots with a pinned identity that did not open the integrity key at
    /// open: left out of `roots` (they wrap nothing), reported by `doctor`.
    rejected_roots: Vec<u16>,
}

/// The store's integrity key and the audit keys derived from and archived under it.
struct GuardKeys {
    integrity_key: Zeroizing<[u8; 32]>,
    audit: crate::audit::AuditKeys,
    /// The sealed archive of audit keys these keys were loaded with (or made): a
    /// store whose archive differs had its keys replaced by another process (or by
    /// this one, in a transaction whose keys are not swapped in yet), and this guard
    /// must not write audit events with its keys.
    archive: Option<Vec<u8>>,
}

/// The credential guard. `Send + Sync` and cheap to clone: share one per process.
#[derive(Clone)]
pub struct TokenGuard {
    inner: Arc<Inner>,
}

thread_local! {
    /// The actor of [`TokenGuard::on_behalf_of`] on this thread.
    static ACTING_FOR: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

impl TokenGuard {
    /// Runs `f` with `actor` as the audit actor of every event this thread writes
    /// meanwhile, and of the tombstones it makes: an agent acting for its clients.
    pub fn on_behalf_of<R>(&self, actor: &str, f: impl FnOnce(&TokenGuard) -> R) -> R {
        struct Restore(Option<String>);
        impl Drop for Restore {
            fn drop(&mut self) {
                let before = self.0.take();
                ACTING_FOR.with(|a| *a.borrow_mut() = before);
            }
        }
        let before = ACTING_FOR.with(|a| a.borrow_mut().replace(actor.to_string()));
        let _restore = Restore(before);
        f(self)
    }
}

impl std::fmt::Debug for TokenGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenGuard")
            .field("store", &self.inner.store)
            .field("roots", &self.inner.pins)
            .finish_non_exhaustive()
    }
}

const MAX_IDENT: usize = 128;
const IDENT_PUNCTUATION: &[u8] = b"._@+:-";

/// The rule every provider, token name, label key and token-set field name follows,
/// and why.
pub const IDENT_RULE: &str = "names are 1-128 characters of A-Z a-z 0-9 . _ @ + : - (safe unquoted in shells, \
     file names, URLs and audit lines; `/` separates provider and name); case matters";

/// Checks a provider or token name against [`IDENT_RULE`]. The error names the first
/// character that is not allowed and its position, never the value (a secret typed
/// in the wrong place must not reach a log).
pub fn validate_ident(kind: &str, s: &str) -> Result<()> {
    if s.is_empty() || s.len() > MAX_IDENT {
        return Err(Error::InvalidInput(format!("{kind} is {} bytes long; {IDENT_RULE}", s.len())));
    }
    match s
        .char_indices()
        .find(|(_, c)| !(c.is_ascii_alphanumeric() || c.is_ascii() && IDENT_PUNCTUATION.contains(&(*c as u8))))
    {
        None => Ok(()),
        Some((i, c)) => {
            let shown =
                if c.is_ascii_graphic() || c == ' ' { format!("{c:?}") } else { format!("U+{:04X}", u32::from(c)) };
            Err(Error::InvalidInput(format!(
                "{kind}: character {shown} at position {} is not allowed; {IDENT_RULE}",
                i + 1
            )))
        }
    }
}

impl TokenGuard {
    /// The store's random id (bound into every record's AAD).
    pub fn store_id(&self) -> [u8; STORE_ID_LEN] {
        self.inner.store_id
    }

    /// The store file.
    pub fn path(&self) -> &Path {
        self.inner.store.path()
    }

    /// The roots pinned in the store when this guard opened it.
    pub fn roots(&self) -> &[RootPin] {
        &self.inner.pins
    }

    /// Forgets every unwrapped DEK held in memory; the next use of each unwraps it
    /// in the hardware again. For operators (e.g. after a root change, or to shrink
    /// the window in which keys sit in memory) and for measuring the cold path.
    pub fn clear_dek_cache(&self) {
        self.inner.cache.clear();
    }

    /// The authenticated state as this guard last verified it (at open, or when
    /// another process moved it).
    pub fn state(&self) -> crate::store::StateReport {
        self.inner.store.state_report()
    }

    /// Verifies every covered row against the state head now, O(rows): what `open`
    /// and `doctor` do. A long-running service may call it on a schedule; the
    /// per-read checks cover the rows it reads in between.
    pub fn verify_state(&self) -> Result<crate::store::StateReport> {
        self.inner.store.reverify_state()
    }

    /// Accepts the store's rows as they are now as its authenticated state, with an
    /// audit event: for a store made by tokenguard 0.1 (no state head), or, with
    /// `accept_mismatch`, after an operator has investigated rows that do not match
    /// the head (doctor's "authenticated state" failure). Open the guard with
    /// [`crate::store::StateCheck::Report`] to reach a store that needs it. Returns
    /// the state before and after.
    pub fn upgrade(&self, accept_mismatch: bool) -> Result<(crate::store::StateReport, crate::store::StateReport)> {
        let inner = &*self.inner;
        let before = inner.store.reverify_state()?;
        let old = inner.keys();
        let marked = crate::crypto::is_marked_integrity_key(&old.integrity_key);
        // The rollback counter: binding a store to a newly configured counter is the
        // operator's plain `upgrade`; accepting a store that disagrees with its counter
        // (an older copy put back on purpose, another counter) needs
        // --accept-current-state.
        use crate::store::AnchorWrite;
        let (counter, how) = match inner.store.check_counter()? {
            CounterStatus::Unbound | CounterStatus::Current { .. } | CounterStatus::Finished { .. } => {
                (None, AnchorWrite::Advance)
            }
            // A counter that exists already may be another store's, or this one's
            // from before an older copy was put back: binding to it is an acceptance.
            CounterStatus::NotBound { counter_id } => (
                Some(("counter-bind", format!("bound to {counter_id}"))),
                if accept_mismatch { AnchorWrite::Rebind } else { AnchorWrite::BindNew },
            ),
            CounterStatus::Wrong(e) if accept_mismatch => {
                (Some(("counter-accept", format!("accepted as found: {e}"))), AnchorWrite::Rebind)
            }
            CounterStatus::Wrong(e) => return Err(e),
        };
        if before.verified && marked {
            let Some((op, detail)) = counter else { return Ok((before.clone(), before)) };
            inner.store.bind_counter(how, |txn| {
                inner.audit(txn, NewEvent { op, outcome: "ok", detail, ..Default::default() }).map(drop)
            })?;
            tracing::warn!(op, "store bound to its rollback counter");
            return Ok((before, inner.store.reverify_state()?));
        }
        // A plain upgrade is for a store made by 0.1. One whose integrity key carries
        // this build's marker had a state head: it was removed, and the rows may be
        // anyone's.
        let downgraded = before.upgrade_needed && marked;
        if !before.verified && (!before.upgrade_needed || downgraded) && !accept_mismatch {
            return Err(Error::integrity(if downgraded {
                "upgrading a store whose state head was removed (it was made with one): treat it as tampered; \
                 restore a backup, or pass --accept-current-state after investigating"
            } else {
                "accepting a store whose rows do not match its state head (pass --accept-current-state \
                 after investigating)"
            }));
        }
        let (op, detail) = if before.verified {
            // A verified store whose key lacks the marker: restored from a 0.1 backup.
            ("upgrade", "integrity key replaced by one with this build's marker".to_string())
        } else if before.upgrade_needed && !downgraded {
            ("upgrade", "schema 1 to 2: state head added over the rows as found; integrity key replaced".to_string())
        } else {
            ("state-accept", format!("rows accepted as found: {}", before.problem.clone().unwrap_or_default()))
        };
        // The integrity key is replaced by one with the marker, so the store cannot be
        // passed off as a 0.1 store again; the audit keys so far are archived.
        let new_ik = crate::crypto::new_integrity_key()?;
        let new_keys = std::cell::RefCell::new(None);
        let work = |txn: &crate::store::WriteTxn| {
            let last_seq = crate::audit::append(
                txn,
                &old.audit,
                &inner.actor(),
                NewEvent { op, outcome: "ok", detail, ..Default::default() },
            )?;
            let pins = txn.roots()?;
            *new_keys.borrow_mut() = Some(inner.replace_integrity_key(txn, &pins, &new_ik, &old, last_seq)?);
            Ok(())
        };
        let key = crate::store::state::StateKey::derive(new_ik.expose());
        // Over a verified store, a rotation that checks the rows again; otherwise the
        // operator's acceptance of the rows as they are.
        // Both bind the store to the configured rollback counter at its current value.
        if before.verified {
            inner.store.rekey(key, how, work)?
        } else {
            inner.store.reseal_with_key(key, how, work)?
        };
        if let Some(k) = new_keys.into_inner() {
            *crate::sync::write(&inner.keys) = Arc::new(k);
        }
        inner.store.note_counter_problem(None);
        let after = inner.store.reverify_state()?;
        tracing::warn!(op, generation = after.generation, "store state resealed over its current rows");
        Ok((before, after))
    }

    /// A sub-key of the store's integrity key, for MACs over store data (backups).
    pub(crate) fn integrity_subkey(&self, label: &[u8]) -> Zeroizing<[u8; 32]> {
        crate::crypto::derive(&self.inner.keys().integrity_key, label)
    }

    pub(crate) fn store(&self) -> &Store {
        &self.inner.store
    }

    /// Appends an audit event with outcome `ok` in `txn`.
    pub(crate) fn audit_in(&self, txn: &impl StoreWrite, op: &str, detail: String) -> Result<()> {
        self.inner.audit(txn, NewEvent { op, outcome: "ok", detail, ..Default::default() })
    }
}

impl Inner {
    fn new(
        store: Store,
        store_id: [u8; STORE_ID_LEN],
        roots: Vec<ActiveRoot>,
        pins: Vec<RootPin>,
        ik: &DekMaterial,
        opts: GuardOptions,
    ) -> Result<Self> {
        let mut opts = opts;
        opts.max_dek_encryptions = opts.max_dek_encryptions.clamp(1, GuardOptions::MAX_DEK_ENCRYPTIONS);
        // Hardware first, public-key (age) roots last: the first root generates new
        // data keys, and unwrapping tries them in this order (`Inner::unwrap_entry`).
        let mut roots = roots;
        roots.sort_by_key(|r| (!r.key.is_hardware(), !r.key.wraps_authenticate()));
        let archive = store.read()?.audit_archive()?;
        let audit = match crate::audit::AuditKeys::load(ik.expose(), archive.as_deref()) {
            Ok(a) => a,
            // Opened for inspection, a damaged archive must not keep `doctor` out: the
            // audit chain check reports the events it cannot verify.
            Err(e) if opts.state_check == crate::store::StateCheck::Report => {
                tracing::warn!(error = %e, "the archive of audit keys does not open; earlier audit eras unverifiable");
                crate::audit::AuditKeys::load(ik.expose(), None)?
            }
            Err(e) => return Err(e),
        };
        Ok(Inner {
            store,
            store_id,
            roots,
            pins,
            keys: std::sync::RwLock::new(Arc::new(GuardKeys {
                integrity_key: Zeroizing::new(*ik.expose()),
                audit,
                archive,
            })),
            cache: DekCache::new(opts.cache),
            uncommitted: std::sync::Mutex::new(Vec::new()),
            counters: Counters::default(),
            opts,
            refresh: refresh::RefreshState::new()?,
            rejected_roots: Vec::new(),
        })
    }

    /// A write transaction of this guard: the store's, plus the cache kept true to
    /// what committed. `f` may run more than once (`Store::write`): every effect of
    /// it must be in the transaction (the data keys it creates are forgotten here
    /// when their transaction does not commit).
    fn write<T>(&self, f: impl FnMut(&crate::store::WriteTxn) -> Result<T>) -> Result<T> {
        self.with_created(|body, abandoned| self.store.write_abandoning(body, abandoned), f)
    }

    /// Runs a write transaction through `run` with `f` as its body, and forgets the
    /// DEK versions `f` created in a transaction that did not commit: `run` calls
    /// `abandoned` when it drops a run of the body to run it again (before anything
    /// is committed in its place, which a reader could meet a forgotten key on), and
    /// a write that fails forgets what its last run created. The versions are taken
    /// while the transaction is still open (one write transaction at a time):
    /// another thread's next transaction cannot mix its versions in.
    fn with_created<T, F>(
        &self,
        run: impl FnOnce(&mut dyn FnMut(&crate::store::WriteTxn) -> Result<T>, &dyn Fn()) -> Result<T>,
        mut f: F,
    ) -> Result<T>
    where
        F: FnMut(&crate::store::WriteTxn) -> Result<T>,
    {
        let created: std::cell::RefCell<Vec<(String, u32)>> = std::cell::RefCell::new(Vec::new());
        let forget = || {
            for (provider, version) in created.borrow_mut().drain(..) {
                self.cache.forget(&provider, &[version]);
            }
        };
        let out = run(
            &mut |txn| {
                // A run before this one was reported through `abandoned`.
                let r = f(txn);
                *created.borrow_mut() = std::mem::take(&mut *crate::sync::lock(&self.uncommitted));
                r
            },
            &forget,
        );
        if out.is_err() {
            forget();
        }
        out
    }

    fn keys(&self) -> Arc<GuardKeys> {
        crate::sync::read(&self.keys).clone()
    }

    fn audit(&self, txn: &impl StoreWrite, ev: NewEvent<'_>) -> Result<()> {
        self.audit_all(txn, [(self.actor(), ev)])
    }

    /// Appends `events`, each under its own actor, in `txn`: the audit keys are
    /// checked against the store's once.
    pub(crate) fn audit_all<'e>(
        &self,
        txn: &impl StoreWrite,
        events: impl IntoIterator<Item = (String, NewEvent<'e>)>,
    ) -> Result<()> {
        let keys = self.keys();
        if txn.audit_archive()? != keys.archive {
            return Err(Error::integrity(
                "appending an audit event: the store's keys were replaced (a `root remove` or `upgrade` by another \
                 process, or one in progress here); reopen the store",
            ));
        }
        crate::audit::append_all(txn, &keys.audit, events).map(drop)
    }

    /// The audit actor of what this thread does now: the caller named by
    /// [`TokenGuard::on_behalf_of`], or the guard's own.
    pub(crate) fn actor(&self) -> String {
        ACTING_FOR.with(|a| a.borrow().clone()).unwrap_or_else(|| self.opts.actor.clone())
    }

    /// Ends `entries` of `provider` in `state` (retired or destroyed: the wrapped
    /// material is erased), skipping any already there or destroyed, and audits
    /// `op` with "`what` [versions]". Returns the versions changed; the caller drops
    /// them from the cache once the transaction commits.
    fn end_versions(
        &self,
        txn: &impl StoreWrite,
        provider: &str,
        entries: impl Iterator<Item = crate::store::DekEntry>,
        state: DekState,
        op: &str,
        what: &str,
    ) -> Result<Vec<u32>> {
        let mut out = Vec::new();
        for e in entries {
            if e.state == state || e.state == DekState::Destroyed {
                continue;
            }
            out.push(e.version);
            self.set_dek_state(txn, provider, e, state)?;
        }
        let detail = format!("{what} {out:?}");
        self.audit(txn, NewEvent { op, provider, outcome: "ok", detail, ..Default::default() })?;
        Ok(out)
    }

    /// Changes a DEK's state; retiring or destroying erases its wrapped material.
    fn set_dek_state(
        &self,
        txn: &impl StoreWrite,
        provider: &str,
        mut e: crate::store::DekEntry,
        state: DekState,
    ) -> Result<()> {
        e.state = state;
        if matches!(state, DekState::Retired | DekState::Destroyed) {
            e.wrapped.clear();
        }
        txn.put_dek(provider, &e)
    }
}
