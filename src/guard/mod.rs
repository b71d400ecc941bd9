//! [`TokenGuard`], the public facade: it ties the roots, the DEK cache, the sealing
//! and the store together.
//!
//! Request path of a warm `get`: one redb read transaction, one record lookup, a
//! header parse, a cache hit for the provider DEK, one AES-GCM open. The hardware is
//! touched only when a DEK is not cached: once per provider DEK per process (plus one
//! unwrap of the store's integrity key at open, which is also how a wrong root is
//! caught before anything else happens).

pub mod refresh;
pub mod revoke;
pub mod roots;
pub mod rotate;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use redb::{ReadTransaction, ReadableTable, ReadableTableMetadata, WriteTransaction};
use serde::Serialize;
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::audit::{self, AuditEvent, AuditReport, NewEvent};
use crate::cache::{CacheLimits, CachedDek, DekCache};
use crate::error::{Error, Result};
use crate::root::{Check, RootKey};
use crate::seal::{self, Metadata, ParsedRecord, RecordHeader, RecordView, STORE_ID_LEN, SecretKind, TokenState};
use crate::secret::{DekMaterial, Secret};
use crate::store::schema::{self, DekEntry, DekState, RootPin, RootWrapped};
use crate::store::{self as st, Store, StoreOptions};

/// Current time in unix seconds.
pub(crate) fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

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
}

impl Default for GuardOptions {
    fn default() -> Self {
        GuardOptions {
            cache: CacheLimits::default(),
            require_hardware: false,
            actor: format!("pid:{}", std::process::id()),
            max_dek_encryptions: 1 << 30,
            max_dek_age: None,
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

/// One item of [`TokenGuard::put_many`].
#[derive(Debug)]
pub struct PutItem {
    /// Provider.
    pub provider: String,
    /// Name.
    pub name: String,
    /// The secret.
    pub secret: Secret,
    /// Metadata.
    pub options: PutOptions,
}

/// Options of a `get`.
#[derive(Debug, Clone, Copy, Default)]
pub struct GetOptions {
    /// Return an expired token instead of failing with [`Error::Expired`].
    pub allow_expired: bool,
}

/// What `list` shows of a token: never its secret.
#[derive(Debug, Clone, Serialize)]
pub struct TokenInfo {
    /// Provider.
    pub provider: String,
    /// Name.
    pub name: String,
    /// DEK version that sealed it.
    pub dek_version: u32,
    /// Metadata (as stored; authenticated when the token is opened).
    #[serde(flatten)]
    pub meta: Metadata,
    /// Whether the token is past its not-after now.
    pub expired: bool,
}

/// Counters and totals for `stats`.
#[derive(Debug, Clone, Serialize)]
pub struct Stats {
    /// Tokens per provider.
    pub tokens_per_provider: BTreeMap<String, u64>,
    /// Tokens per provider and state (`active`, `expired`, `needs_reauth`), plus
    /// `revoked` from the tombstones.
    pub states_per_provider: BTreeMap<String, BTreeMap<String, u64>>,
    /// Total tokens.
    pub tokens: u64,
    /// DEK versions per provider, with state and encryption count.
    pub deks: Vec<DekInfo>,
    /// Hardware calls made by this process.
    pub hardware: HardwareCalls,
    /// DEK cache misses in this process (each one a lookup of the store's DEK entry,
    /// and an unwrap unless another thread just did it).
    pub cache_misses: u64,
    /// DEKs cached now.
    pub cache_entries: usize,
    /// Audit events stored.
    pub audit_events: u64,
}

/// One DEK version as `stats` reports it.
#[derive(Debug, Clone, Serialize)]
pub struct DekInfo {
    /// Provider.
    pub provider: String,
    /// Version.
    pub version: u32,
    /// State.
    pub state: DekState,
    /// Records sealed under it so far.
    pub encryptions: u64,
    /// Records that use it now.
    pub records: u64,
}

/// Hardware calls of this process, by kind.
#[derive(Debug, Clone, Copy, Serialize, Default)]
pub struct HardwareCalls {
    /// DEK (and integrity-key) unwraps.
    pub unwraps: u64,
    /// Wraps of existing DEKs.
    pub wraps: u64,
    /// DEK generations.
    pub generates: u64,
}

#[derive(Default)]
struct Counters {
    unwraps: AtomicU64,
    wraps: AtomicU64,
    generates: AtomicU64,
}

struct ActiveRoot {
    root_id: u16,
    key: Box<dyn RootKey>,
}

struct Inner {
    store: Store,
    store_id: [u8; STORE_ID_LEN],
    roots: Vec<ActiveRoot>,
    pins: Vec<RootPin>,
    integrity_key: Zeroizing<[u8; 32]>,
    audit_key: Zeroizing<[u8; 32]>,
    cache: DekCache,
    counters: Counters,
    opts: GuardOptions,
    refresh: refresh::RefreshState,
}

/// The credential guard. `Send + Sync` and cheap to clone: share one per process.
#[derive(Clone)]
pub struct TokenGuard {
    inner: Arc<Inner>,
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
const MAX_SECRET: usize = 64 * 1024;

/// Checks a provider or token name: 1–128 bytes of `[A-Za-z0-9._@+:-]`.
pub fn validate_ident(kind: &str, s: &str) -> Result<()> {
    let ok =
        !s.is_empty() && s.len() <= MAX_IDENT && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"._@+:-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidInput(format!(
            "{kind} must be 1-{MAX_IDENT} characters of A-Z a-z 0-9 . _ @ + : - (got {} bytes)",
            s.len()
        )))
    }
}

fn derive(key: &[u8; 32], label: &[u8]) -> Zeroizing<[u8; 32]> {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key length");
    m.update(label);
    Zeroizing::new(m.finalize().into_bytes().into())
}

fn check_hardware(roots: &[Box<dyn RootKey>], require: bool) -> Result<()> {
    if require && let Some(r) = roots.iter().find(|r| !r.is_hardware()) {
        return Err(Error::Config(format!(
            "require_hardware = true, but a {} root is configured; remove it or set require_hardware = false (development only)",
            r.backend()
        )));
    }
    if roots.is_empty() {
        return Err(Error::Config("no root is configured: add a [[roots]] section".into()));
    }
    Ok(())
}

/// A root that depends on PCR values is never the only way in: a firmware update
/// would lock the store.
fn check_not_only_policy_bound(roots: &[Box<dyn RootKey>]) -> Result<()> {
    if !roots.is_empty() && roots.iter().all(|r| r.is_policy_bound()) {
        return Err(Error::Config(
            "a PCR-bound TPM root cannot be the only root (a firmware or boot change would lock the store): \
             add a second root, e.g. an HSM or an offline recovery key"
                .into(),
        ));
    }
    Ok(())
}

fn random_array<const N: usize>() -> Result<[u8; N]> {
    let mut a = [0u8; N];
    getrandom::fill(&mut a).map_err(|e| Error::Hardware {
        backend: "os",
        operation: "getrandom",
        detail: e.to_string(),
    })?;
    Ok(a)
}

impl TokenGuard {
    /// Creates a new store at `path` pinned to `roots`; every root wraps the store's
    /// integrity key (and later every DEK).
    pub fn create(
        path: &Path,
        store_opts: StoreOptions,
        roots: Vec<Box<dyn RootKey>>,
        opts: GuardOptions,
    ) -> Result<Self> {
        check_hardware(&roots, opts.require_hardware)?;
        check_not_only_policy_bound(&roots)?;
        let mut pins = Vec::new();
        for (i, r) in roots.iter().enumerate() {
            let id = r.identity()?;
            pins.push(RootPin { root_id: i as u16 + 1, pin: id.pin(), description: id.description });
        }
        let ik = DekMaterial::random()?;
        let mut wrapped = Vec::new();
        for (r, p) in roots.iter().zip(&pins) {
            wrapped.push(RootWrapped { root_id: p.root_id, wrapped: r.wrap(&ik)? });
        }
        let store_id = random_array::<STORE_ID_LEN>()?;
        let store = Store::create(path, store_opts)?;
        let active = roots.into_iter().zip(&pins).map(|(key, p)| ActiveRoot { root_id: p.root_id, key }).collect();
        let inner = Inner::new(store, store_id, active, pins.clone(), &ik, opts);
        inner.counters.wraps.fetch_add(wrapped.len() as u64, Ordering::Relaxed);
        inner.store.write(|txn| {
            let mut meta = txn.open_table(st::META)?;
            meta.insert(st::META_SCHEMA, st::SCHEMA_VERSION.to_be_bytes().as_slice())?;
            meta.insert(st::META_STORE_ID, store_id.as_slice())?;
            meta.insert(st::META_ROOTS, schema::encode_roots(&pins).as_slice())?;
            meta.insert(st::META_INTEGRITY_KEY, schema::encode_wrapped_key(&wrapped).as_slice())?;
            meta.insert(st::META_CREATED, now().to_be_bytes().as_slice())?;
            drop(meta);
            // Create every table now, so readers never meet a missing one.
            txn.open_table(st::DEKS)?;
            txn.open_table(st::TOKENS)?;
            txn.open_table(st::BY_DEK)?;
            txn.open_table(st::BY_EXPIRY)?;
            txn.open_table(st::TOMBSTONES)?;
            txn.open_table(st::AUDIT)?;
            txn.open_table(st::REFRESH_LEASES)?;
            let detail = pins.iter().map(|p| p.description.as_str()).collect::<Vec<_>>().join("; ");
            inner.audit(txn, NewEvent { op: "init", outcome: "ok", detail, ..Default::default() })
        })?;
        tracing::info!(path = %path.display(), roots = pins.len(), "created store");
        Ok(TokenGuard { inner: Arc::new(inner) })
    }

    /// Opens an existing store. At least one of `roots` must be pinned in it and must
    /// unwrap the store's integrity key; otherwise [`Error::WrongRoot`].
    pub fn open(
        path: &Path,
        store_opts: StoreOptions,
        roots: Vec<Box<dyn RootKey>>,
        opts: GuardOptions,
    ) -> Result<Self> {
        check_hardware(&roots, opts.require_hardware)?;
        let store = Store::open(path, store_opts)?;
        let txn = store.read()?;
        let schema_bytes =
            st::meta_get(&txn, st::META_SCHEMA)?.ok_or_else(|| Error::integrity("reading the store schema version"))?;
        let version = u32::from_be_bytes(
            schema_bytes.as_slice().try_into().map_err(|_| Error::integrity("reading the store schema version"))?,
        );
        if version != st::SCHEMA_VERSION {
            return Err(Error::UnsupportedVersion { found: version, supported: st::SCHEMA_VERSION });
        }
        let store_id: [u8; STORE_ID_LEN] = st::meta_get(&txn, st::META_STORE_ID)?
            .and_then(|v| v.try_into().ok())
            .ok_or_else(|| Error::integrity("reading the store id"))?;
        let pins = schema::decode_roots(
            &st::meta_get(&txn, st::META_ROOTS)?.ok_or_else(|| Error::integrity("reading the pinned roots"))?,
        )?;
        let wrapped_ik = schema::decode_wrapped_key(
            &st::meta_get(&txn, st::META_INTEGRITY_KEY)?
                .ok_or_else(|| Error::integrity("reading the integrity key"))?,
        )?;
        drop(txn);

        let matched = match_pins(&pins, &roots)?;
        let ik = unwrap_integrity_key(&pins, &wrapped_ik, &matched, &roots)?;
        let active = roots
            .into_iter()
            .enumerate()
            .filter_map(|(i, key)| {
                matched.iter().find(|(j, _)| *j == i).map(|(_, id)| ActiveRoot { root_id: *id, key })
            })
            .collect();
        let inner = Inner::new(store, store_id, active, pins, &ik, opts);
        inner.counters.unwraps.fetch_add(1, Ordering::Relaxed);
        Ok(TokenGuard { inner: Arc::new(inner) })
    }

    /// The store's random id (bound into every record's AAD).
    pub fn store_id(&self) -> [u8; STORE_ID_LEN] {
        self.inner.store_id
    }

    /// The store file.
    pub fn path(&self) -> &Path {
        self.inner.store.path()
    }

    /// The roots pinned in the store.
    pub fn roots(&self) -> &[RootPin] {
        &self.inner.pins
    }

    /// Seals and stores `secret` under (provider, name), replacing any earlier value.
    pub fn put(&self, provider: &str, name: &str, secret: Secret, options: PutOptions) -> Result<Metadata> {
        let item = PutItem { provider: provider.into(), name: name.into(), secret, options };
        let mut out = self.put_items(std::slice::from_ref(&item), "put")?;
        Ok(out.remove(0))
    }

    /// Stores many tokens in one transaction: one durable commit for all of them.
    pub fn put_many(&self, items: Vec<PutItem>) -> Result<usize> {
        let n = items.len();
        self.put_items(&items, "put_many")?;
        Ok(n)
    }

    fn put_items(&self, items: &[PutItem], op: &str) -> Result<Vec<Metadata>> {
        for it in items {
            validate_ident("provider", &it.provider)?;
            validate_ident("name", &it.name)?;
            let size = match &it.secret {
                Secret::Raw(s) => s.len(),
                Secret::TokenSet(t) => t.iter().map(|(n, v)| n.len() + v.len()).sum(),
            };
            if size == 0 || size > MAX_SECRET {
                return Err(Error::InvalidInput(format!("a secret must be 1 to {MAX_SECRET} bytes")));
            }
            for (k, v) in &it.options.labels {
                validate_ident("label key", k)?;
                if v.len() > 256 || v.chars().any(char::is_control) {
                    return Err(Error::InvalidInput("label values are at most 256 printable characters".into()));
                }
            }
        }
        let inner = &*self.inner;
        let t = now();
        inner.store.write(|txn| {
            let mut out = Vec::with_capacity(items.len());
            let mut upcoming: BTreeMap<&str, u64> = BTreeMap::new();
            for it in items {
                *upcoming.entry(it.provider.as_str()).or_default() += 1;
            }
            let mut deks: BTreeMap<String, (u32, Arc<CachedDek>, u64)> = BTreeMap::new();
            for (p, n) in upcoming {
                let (v, c) = inner.active_dek_for_write(txn, p, n)?;
                deks.insert(p.to_string(), (v, c, 0));
            }
            // A put re-issues a revoked name: its tombstone goes.
            let mut tombs = txn.open_table(st::TOMBSTONES)?;
            for it in items {
                tombs.remove((it.provider.as_str(), it.name.as_str()))?;
            }
            drop(tombs);
            // One CSPRNG call for the whole batch: getrandom costs more than sealing a
            // small secret (FACTS: 0.48 µs vs 0.2 µs).
            let mut nonce_bytes = vec![0u8; seal::NONCE_LEN * items.len()];
            getrandom::fill(&mut nonce_bytes).map_err(|e| Error::Hardware {
                backend: "os",
                operation: "getrandom",
                detail: e.to_string(),
            })?;
            let mut nonces = nonce_bytes.chunks_exact(seal::NONCE_LEN).map(|c| {
                let mut n = [0u8; seal::NONCE_LEN];
                n.copy_from_slice(c);
                n
            });
            let mut tokens = txn.open_table(st::TOKENS)?;
            let mut by_dek = txn.open_table(st::BY_DEK)?;
            let mut by_exp = txn.open_table(st::BY_EXPIRY)?;
            for it in items {
                let Some((version, cipher, count)) = deks.get_mut(&it.provider) else {
                    return Err(Error::integrity("selecting a data key"));
                };
                // The old record (if any) gives `created` and the index entries to drop.
                // A damaged old record is replaced; its index entries cannot be
                // trusted, so stale ones are skipped by the index users.
                let mut created = t;
                if let Some(g) = tokens.get((it.provider.as_str(), it.name.as_str()))?
                    && let Ok(h) = RecordView::parse(g.value())
                {
                    created = h.created;
                    by_dek.remove((h.provider, h.dek_version, h.name))?;
                    if let Some(e) = h.expires_at {
                        by_exp.remove((e, h.provider, h.name))?;
                    }
                }
                let header = RecordHeader {
                    provider: it.provider.clone(),
                    name: it.name.clone(),
                    dek_version: *version,
                    meta: Metadata {
                        created,
                        updated: t,
                        expires_at: it.options.expires_at,
                        state: TokenState::Active,
                        kind: SecretKind::of(&it.secret),
                        token_type: it.options.token_type.clone(),
                        scopes: it.options.scopes.clone(),
                        labels: it.options.labels.clone(),
                    },
                };
                let nonce = nonces.next().ok_or_else(|| Error::integrity("drawing nonces"))?;
                let record = seal::seal_record_with_nonce(&cipher.cipher, &inner.store_id, &header, &it.secret, nonce)?;
                tokens.insert((it.provider.as_str(), it.name.as_str()), record.as_slice())?;
                by_dek.insert((it.provider.as_str(), *version, it.name.as_str()), ())?;
                if let Some(e) = it.options.expires_at {
                    by_exp.insert((e, it.provider.as_str(), it.name.as_str()), ())?;
                }
                *count += 1;
                out.push(header.meta);
            }
            drop((tokens, by_dek, by_exp));
            inner.count_encryptions(txn, &deks)?;
            if items.len() == 1 {
                let it = &items[0];
                inner.audit(
                    txn,
                    NewEvent { op, provider: &it.provider, name: &it.name, outcome: "ok", detail: String::new() },
                )?;
            } else {
                inner.audit(
                    txn,
                    NewEvent { op, outcome: "ok", detail: format!("{} tokens", items.len()), ..Default::default() },
                )?;
            }
            Ok(out)
        })
    }

    /// Opens the token (provider, name). Fails with [`Error::Expired`] past its
    /// not-after and [`Error::Revoked`] once revoked.
    pub fn get(&self, provider: &str, name: &str) -> Result<Secret> {
        self.get_inner(provider, name, GetOptions::default(), false).map(|(s, _)| s)
    }

    /// As [`TokenGuard::get`], with options, returning the metadata too.
    pub fn get_with(&self, provider: &str, name: &str, opts: GetOptions) -> Result<(Secret, Metadata)> {
        let (s, m) = self.get_inner(provider, name, opts, true)?;
        Ok((s, m.ok_or_else(|| Error::integrity("decoding metadata"))?))
    }

    /// The read path. Works on a borrowed view of the stored record: no copy of the
    /// record and no allocation before the AES-GCM open; full metadata only if asked.
    fn get_inner(
        &self,
        provider: &str,
        name: &str,
        opts: GetOptions,
        meta: bool,
    ) -> Result<(Secret, Option<Metadata>)> {
        let inner = &*self.inner;
        let txn = inner.store.read()?;
        let tokens = txn.open_table(st::TOKENS)?;
        let Some(guard) = tokens.get((provider, name))? else {
            return Err(match inner.tombstone(&txn, provider, name)? {
                Some(t) => Error::Revoked {
                    provider: provider.into(),
                    name: name.into(),
                    revoked_at: t.revoked_at,
                    reason: t.reason,
                },
                None => Error::NotFound { provider: provider.into(), name: name.into() },
            });
        };
        let rec = RecordView::parse(guard.value())?;
        // The AAD binds the header to the ciphertext; this binds the header to the key
        // the record is stored under, so a record copied to another slot fails.
        if rec.provider != provider || rec.name != name {
            return Err(Error::integrity("checking a record's place"));
        }
        let cipher = inner.cipher_for_read(&txn, provider, name, rec.dek_version)?;
        let secret = rec.open(&cipher.cipher, &inner.store_id)?;
        if rec.state == TokenState::Revoked {
            // Revocation removes the record; a record still marked revoked is honoured.
            return Err(Error::Revoked {
                provider: provider.into(),
                name: name.into(),
                revoked_at: rec.updated,
                reason: "revoked".into(),
            });
        }
        if !opts.allow_expired
            && let Some(e) = rec.expires_at.filter(|t| now() >= *t)
        {
            return Err(Error::Expired { provider: provider.into(), name: name.into(), expired_at: e });
        }
        let meta = if meta { Some(rec.metadata()?) } else { None };
        Ok((secret, meta))
    }

    /// Metadata of every token (of one provider), sorted. Never opens a secret.
    pub fn list(&self, provider: Option<&str>) -> Result<Vec<TokenInfo>> {
        if let Some(p) = provider {
            validate_ident("provider", p)?;
        }
        let txn = self.inner.store.read()?;
        let tokens = txn.open_table(st::TOKENS)?;
        let t = now();
        let mut out = Vec::new();
        let iter = match provider {
            Some(p) => tokens.range((p, "")..)?,
            None => tokens.range::<(&str, &str)>(..)?,
        };
        for item in iter {
            let (k, v) = item?;
            let (p, n) = k.value();
            if provider.is_some_and(|want| want != p) {
                break;
            }
            let rec = ParsedRecord::parse(v.value())?;
            if rec.header.provider != p || rec.header.name != n {
                return Err(Error::integrity("checking a record's place"));
            }
            let h = rec.header;
            out.push(TokenInfo {
                provider: h.provider,
                name: h.name,
                dek_version: h.dek_version,
                expired: h.meta.is_expired_at(t),
                meta: h.meta,
            });
        }
        Ok(out)
    }

    /// Removes a token and its index entries.
    pub fn delete(&self, provider: &str, name: &str) -> Result<()> {
        validate_ident("provider", provider)?;
        validate_ident("name", name)?;
        let inner = &*self.inner;
        inner.store.write(|txn| {
            let mut tokens = txn.open_table(st::TOKENS)?;
            let old = tokens.remove((provider, name))?.map(|g| g.value().to_vec());
            let Some(old) = old else {
                return Err(Error::NotFound { provider: provider.into(), name: name.into() });
            };
            drop(tokens);
            if let Ok(rec) = ParsedRecord::parse(&old) {
                let h = rec.header;
                txn.open_table(st::BY_DEK)?.remove((provider, h.dek_version, name))?;
                if let Some(e) = h.meta.expires_at {
                    txn.open_table(st::BY_EXPIRY)?.remove((e, provider, name))?;
                }
            }
            inner.audit(txn, NewEvent { op: "delete", provider, name, outcome: "ok", detail: String::new() })
        })
    }

    /// Records an audit event on its own (used by the CLI for reads and failures).
    pub fn audit_event(&self, op: &str, provider: &str, name: &str, outcome: &str) -> Result<()> {
        self.inner
            .store
            .write(|txn| self.inner.audit(txn, NewEvent { op, provider, name, outcome, detail: String::new() }))
    }

    /// Verifies the audit chain.
    pub fn audit_verify(&self) -> Result<AuditReport> {
        let txn = self.inner.store.read()?;
        audit::verify(&txn, &self.inner.audit_key)
    }

    /// Audit events from sequence `from` on (unverified; run `audit_verify` to check).
    pub fn audit_list(&self, from: u64) -> Result<Vec<AuditEvent>> {
        let txn = self.inner.store.read()?;
        audit::list(&txn, from)
    }

    /// Counts, DEK versions and this process's hardware calls.
    pub fn stats(&self) -> Result<Stats> {
        let inner = &*self.inner;
        let txn = inner.store.read()?;
        let mut per = BTreeMap::new();
        let mut states: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
        let mut total = 0;
        let t = now();
        for item in txn.open_table(st::TOKENS)?.iter()? {
            let (k, v) = item?;
            let p = k.value().0.to_string();
            let state = match RecordView::parse(v.value()) {
                Ok(r) if r.state == TokenState::NeedsReauth => "needs_reauth",
                Ok(r) if r.expires_at.is_some_and(|e| t >= e) => "expired",
                Ok(_) => "active",
                Err(_) => "damaged",
            };
            *states.entry(p.clone()).or_default().entry(state.into()).or_insert(0) += 1;
            *per.entry(p).or_insert(0u64) += 1;
            total += 1;
        }
        for item in txn.open_table(st::TOMBSTONES)?.iter()? {
            let (k, _) = item?;
            *states.entry(k.value().0.to_string()).or_default().entry("revoked".into()).or_insert(0) += 1;
        }
        let by_dek = txn.open_table(st::BY_DEK)?;
        let mut deks = Vec::new();
        for item in txn.open_table(st::DEKS)?.iter()? {
            let (k, v) = item?;
            let (p, ver) = k.value();
            let e = DekEntry::decode(v.value())?;
            let records = by_dek
                .range((p, ver, "")..)?
                .take_while(|r| {
                    r.as_ref().is_ok_and(|(k, _)| {
                        let (kp, kv, _) = k.value();
                        kp == p && kv == ver
                    })
                })
                .count() as u64;
            deks.push(DekInfo {
                provider: p.into(),
                version: ver,
                state: e.state,
                encryptions: e.encryptions,
                records,
            });
        }
        let audit_events = txn.open_table(st::AUDIT)?.len()?;
        Ok(Stats {
            tokens_per_provider: per,
            states_per_provider: states,
            tokens: total,
            deks,
            hardware: inner.hardware_calls(),
            cache_misses: inner.cache.misses(),
            cache_entries: inner.cache.len(),
            audit_events,
        })
    }

    /// Forgets every unwrapped DEK held in memory; the next use of each unwraps it
    /// in the hardware again. For operators (e.g. after a root change, or to shrink
    /// the window in which keys sit in memory) and for measuring the cold path.
    pub fn clear_dek_cache(&self) {
        self.inner.cache.clear();
    }

    /// Hardware calls made by this process so far.
    pub fn hardware_calls(&self) -> HardwareCalls {
        self.inner.hardware_calls()
    }

    /// The checks of `tokenguard doctor` that need an open guard: root health, every
    /// wrapped DEK under every configured root, every record opened, the audit chain,
    /// file permissions.
    pub fn doctor(&self) -> Vec<Check> {
        let inner = &*self.inner;
        let mut out = Vec::new();
        for r in &inner.roots {
            out.extend(r.key.health());
        }
        for p in &inner.pins {
            let configured = inner.roots.iter().any(|r| r.root_id == p.root_id);
            out.push(Check::new(
                format!("root {} pinned", p.root_id),
                true,
                format!(
                    "{}{}",
                    p.description,
                    if configured { " (configured, opens the store)" } else { " (not configured here)" }
                ),
            ));
        }
        if let Some(max) = inner.opts.max_dek_age {
            let t = now();
            let mut old = Vec::new();
            if let Ok(txn) = inner.store.read()
                && let Ok(deks) = txn.open_table(st::DEKS)
                && let Ok(iter) = deks.iter()
            {
                for (k, v) in iter.flatten() {
                    let (p, ver) = k.value();
                    if let Ok(e) = DekEntry::decode(v.value())
                        && e.state == DekState::Active
                        && t.saturating_sub(e.created) > max.as_secs()
                    {
                        old.push(format!("{p} v{ver} ({} days)", t.saturating_sub(e.created) / 86_400));
                    }
                }
            }
            out.push(if old.is_empty() {
                Check::new(
                    "rotation policy",
                    true,
                    format!("every active data key is younger than {} days", max.as_secs() / 86_400),
                )
            } else {
                Check::warn(
                    "rotation policy",
                    format!(
                        "older than the policy: {}; run `tokenguard rotate-dek PROVIDER` then `reencrypt`",
                        old.join(", ")
                    ),
                )
            });
        }
        let perms = inner.store.permission_problems();
        out.push(Check::new(
            "store permissions",
            perms.is_empty(),
            if perms.is_empty() { "file 600, directory 700".into() } else { perms.join("; ") },
        ));
        out.push(match self.check_all_deks() {
            Ok(n) => {
                Check::new("wrapped DEKs unwrap", true, format!("{n} wrapped DEKs opened under the configured roots"))
            }
            Err(e) => Check::new("wrapped DEKs unwrap", false, e.to_string()),
        });
        out.push(match self.scan_records() {
            Ok((n, shredded, bad)) if bad.is_empty() => Check::new(
                "record integrity scan",
                true,
                format!(
                    "{} records open{}",
                    n - shredded,
                    if shredded > 0 { format!(", {shredded} shredded") } else { String::new() }
                ),
            ),
            Ok((n, _, bad)) => Check::new(
                "record integrity scan",
                false,
                format!("{} of {n} records fail to open: {}", bad.len(), bad.join(", ")),
            ),
            Err(e) => Check::new("record integrity scan", false, e.to_string()),
        });
        out.push(match self.audit_verify() {
            Ok(r) if r.first_bad.is_none() => Check::new("audit chain", true, format!("{} events verified", r.events)),
            Ok(r) => {
                let (seq, why) = r.first_bad.unwrap_or_default();
                Check::new("audit chain", false, format!("event {seq}: {why}"))
            }
            Err(e) => Check::new("audit chain", false, e.to_string()),
        });
        out
    }

    /// Unwraps every wrapped DEK under every configured root (bypassing the cache).
    fn check_all_deks(&self) -> Result<usize> {
        let inner = &*self.inner;
        let txn = inner.store.read()?;
        let mut n = 0;
        for item in txn.open_table(st::DEKS)?.iter()? {
            let (k, v) = item?;
            let e = DekEntry::decode(v.value())?;
            if e.state == DekState::Destroyed {
                continue;
            }
            for r in &inner.roots {
                let w = e
                    .for_root(r.root_id)
                    .ok_or(Error::Integrity { context: "finding a DEK wrapped for a configured root" })?;
                inner.counters.unwraps.fetch_add(1, Ordering::Relaxed);
                r.key.unwrap(w).map_err(|err| match err {
                    Error::Integrity { .. } => {
                        let (p, ver) = k.value();
                        tracing::warn!(provider = p, version = ver, root = r.root_id, "wrapped DEK does not unwrap");
                        Error::integrity("unwrapping a stored DEK")
                    }
                    other => other,
                })?;
                n += 1;
            }
        }
        Ok(n)
    }

    /// Opens every record; returns (count, shredded count, names that fail).
    fn scan_records(&self) -> Result<(usize, usize, Vec<String>)> {
        let inner = &*self.inner;
        let txn = inner.store.read()?;
        let mut n = 0;
        let mut shredded = 0;
        let mut bad = Vec::new();
        for item in txn.open_table(st::TOKENS)?.iter()? {
            let (k, v) = item?;
            let (p, name) = k.value();
            n += 1;
            let ok = ParsedRecord::parse(v.value()).and_then(|rec| {
                if rec.header.provider != p || rec.header.name != name {
                    return Err(Error::integrity("checking a record's place"));
                }
                let c = inner.cipher_for_read(&txn, p, name, rec.header.dek_version)?;
                rec.open(&c.cipher, &inner.store_id).map(drop)
            });
            match ok {
                Ok(()) => {}
                // Destroyed on purpose: unrecoverable by design, not damage.
                Err(Error::Shredded { .. }) => shredded += 1,
                Err(_) => bad.push(format!("{p}/{name}")),
            }
        }
        Ok((n, shredded, bad))
    }

    pub(crate) fn integrity_subkey(&self, label: &[u8]) -> Zeroizing<[u8; 32]> {
        derive(&self.inner.integrity_key, label)
    }

    pub(crate) fn store(&self) -> &Store {
        &self.inner.store
    }

    pub(crate) fn audit_in(&self, txn: &WriteTransaction, op: &str, detail: String) -> Result<()> {
        self.inner.audit(txn, NewEvent { op, outcome: "ok", detail, ..Default::default() })
    }
}

/// Which configured roots (by index) are pinned in the store, with their root ids.
fn match_pins(pins: &[RootPin], roots: &[Box<dyn RootKey>]) -> Result<Vec<(usize, u16)>> {
    let mut found = Vec::new();
    let mut matched = Vec::new();
    for (i, r) in roots.iter().enumerate() {
        let id = r.identity()?;
        match pins.iter().find(|p| p.pin == id.pin()) {
            Some(p) => matched.push((i, p.root_id)),
            None => found.push(id.description),
        }
    }
    if matched.is_empty() {
        return Err(Error::WrongRoot { pinned: describe_pins(pins), found: found.join(" and ") });
    }
    Ok(matched)
}

fn describe_pins(pins: &[RootPin]) -> String {
    pins.iter().map(|p| p.description.clone()).collect::<Vec<_>>().join(" or ")
}

/// Unwraps the store's integrity key with the first matched root that can.
fn unwrap_integrity_key(
    pins: &[RootPin],
    wrapped_ik: &[RootWrapped],
    matched: &[(usize, u16)],
    roots: &[Box<dyn RootKey>],
) -> Result<DekMaterial> {
    let mut last_err = None;
    for (i, root_id) in matched {
        let Some(w) = wrapped_ik.iter().find(|w| w.root_id == *root_id) else {
            continue;
        };
        match roots[*i].unwrap(&w.wrapped) {
            Ok(ik) => return Ok(ik),
            Err(Error::Integrity { .. }) => {
                last_err = Some(Error::WrongRoot {
                    pinned: describe_pins(pins),
                    found: "a key with the pinned identity that does not open this store (replaced or re-generated?)"
                        .into(),
                })
            }
            Err(e) => last_err = Some(e),
        }
    }
    Err(last_err.unwrap_or_else(|| Error::integrity("finding the store's integrity key")))
}

/// The store's integrity key, unwrapped by one of `roots` (for restore).
pub(crate) fn unlock_key(
    pins: &[RootPin],
    wrapped_ik: &[RootWrapped],
    roots: &[Box<dyn RootKey>],
) -> Result<DekMaterial> {
    let matched = match_pins(pins, roots)?;
    unwrap_integrity_key(pins, wrapped_ik, &matched, roots)
}

/// HMAC-SHA256 sub-key derivation: `HMAC(key, label)`.
pub(crate) fn derive_key(key: &[u8; 32], label: &[u8]) -> Zeroizing<[u8; 32]> {
    derive(key, label)
}

impl Inner {
    fn new(
        store: Store,
        store_id: [u8; STORE_ID_LEN],
        roots: Vec<ActiveRoot>,
        pins: Vec<RootPin>,
        ik: &DekMaterial,
        opts: GuardOptions,
    ) -> Self {
        Inner {
            store,
            store_id,
            roots,
            pins,
            integrity_key: Zeroizing::new(*ik.expose()),
            audit_key: derive(ik.expose(), b"tokenguard/audit-key/v1"),
            cache: DekCache::new(opts.cache),
            counters: Counters::default(),
            opts,
            refresh: refresh::RefreshState::new(),
        }
    }

    fn hardware_calls(&self) -> HardwareCalls {
        HardwareCalls {
            unwraps: self.counters.unwraps.load(Ordering::Relaxed),
            wraps: self.counters.wraps.load(Ordering::Relaxed),
            generates: self.counters.generates.load(Ordering::Relaxed),
        }
    }

    fn audit(&self, txn: &WriteTransaction, ev: NewEvent<'_>) -> Result<()> {
        audit::append(txn, &self.audit_key, &self.opts.actor, ev)
    }

    fn tombstone(&self, txn: &ReadTransaction, provider: &str, name: &str) -> Result<Option<revoke::Tombstone>> {
        let t = txn.open_table(st::TOMBSTONES)?;
        let Some(v) = t.get((provider, name))? else { return Ok(None) };
        revoke::Tombstone::decode(v.value()).map(Some)
    }

    /// Unwraps `entry` with the first configured root that has a blob for it.
    fn unwrap_entry(&self, entry: &DekEntry) -> Result<DekMaterial> {
        let mut last = None;
        for r in &self.roots {
            if let Some(w) = entry.for_root(r.root_id) {
                self.counters.unwraps.fetch_add(1, Ordering::Relaxed);
                match r.key.unwrap(w) {
                    Ok(d) => return Ok(d),
                    Err(e) => last = Some(e),
                }
            }
        }
        Err(last.unwrap_or_else(|| Error::integrity("finding a DEK wrapped for a configured root")))
    }

    /// The cipher of (provider, version), from the cache or unwrapped from the entry
    /// in `deks` (a table of a read or a write transaction). Concurrent misses on
    /// one DEK cost one hardware unwrap.
    fn cipher_from(
        &self,
        deks: &impl ReadableTable<(&'static str, u32), &'static [u8]>,
        provider: &str,
        name: &str,
        version: u32,
    ) -> Result<Arc<CachedDek>> {
        if let Some(c) = self.cache.get(provider, version) {
            return Ok(c);
        }
        let _load = self.cache.load_lock.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = self.cache.get(provider, version) {
            return Ok(c);
        }
        let entry = deks.get((provider, version))?.ok_or_else(|| Error::integrity("finding the record's data key"))?;
        let entry = DekEntry::decode(entry.value())?;
        if entry.version != version {
            return Err(Error::integrity("checking a data key's version"));
        }
        if entry.state == DekState::Destroyed {
            return Err(Error::Shredded { provider: provider.into(), name: name.into(), version });
        }
        let dek = self.unwrap_entry(&entry)?;
        Ok(self.cache.insert(provider, version, &dek))
    }

    fn cipher_for_read(
        &self,
        txn: &ReadTransaction,
        provider: &str,
        name: &str,
        version: u32,
    ) -> Result<Arc<CachedDek>> {
        if let Some(c) = self.cache.get(provider, version) {
            return Ok(c);
        }
        self.cipher_from(&txn.open_table(st::DEKS)?, provider, name, version)
    }

    fn cipher_for_write(
        &self,
        txn: &WriteTransaction,
        provider: &str,
        name: &str,
        version: u32,
    ) -> Result<Arc<CachedDek>> {
        if let Some(c) = self.cache.get(provider, version) {
            return Ok(c);
        }
        self.cipher_from(&txn.open_table(st::DEKS)?, provider, name, version)
    }

    /// The highest DEK version of `provider` (0 if none) and its active entry.
    fn dek_versions(&self, txn: &WriteTransaction, provider: &str) -> Result<(u32, Option<DekEntry>)> {
        let deks = txn.open_table(st::DEKS)?;
        let mut highest = 0;
        let mut active = None;
        for item in deks.range((provider, 0u32)..=(provider, u32::MAX))?.rev() {
            let (k, v) = item?;
            highest = highest.max(k.value().1);
            let e = DekEntry::decode(v.value())?;
            if e.state == DekState::Active {
                active = Some(e);
                break;
            }
        }
        Ok((highest, active))
    }

    /// Changes a DEK's state; retiring or destroying erases its wrapped material.
    fn set_dek_state(&self, txn: &WriteTransaction, provider: &str, mut e: DekEntry, state: DekState) -> Result<()> {
        e.state = state;
        if matches!(state, DekState::Retired | DekState::Destroyed) {
            e.wrapped.clear();
        }
        txn.open_table(st::DEKS)?.insert((provider, e.version), e.encode().as_slice())?;
        Ok(())
    }

    /// The provider's active DEK for `upcoming` new encryptions. Creates version 1
    /// for a new provider, and rotates automatically when the active version would
    /// pass its encryption bound (random 96-bit nonces: NIST SP 800-38D caps one key
    /// at 2^32 messages; the default bound is 2^30). Runs inside the write
    /// transaction, so two processes never both create the same version.
    fn active_dek_for_write(
        &self,
        txn: &WriteTransaction,
        provider: &str,
        upcoming: u64,
    ) -> Result<(u32, Arc<CachedDek>)> {
        let (highest, active) = self.dek_versions(txn, provider)?;
        if let Some(e) = active {
            if e.encryptions.saturating_add(upcoming) <= self.opts.max_dek_encryptions {
                let c = self.cipher_for_write(txn, provider, "", e.version)?;
                return Ok((e.version, c));
            }
            let v = e.version;
            self.set_dek_state(txn, provider, e, DekState::DecryptOnly)?;
            tracing::info!(provider, version = v, "data key reached its encryption bound; rotating");
            let c = self.create_dek(txn, provider, highest + 1, "dek-auto-rotate")?;
            return Ok((highest + 1, c));
        }
        let c = self.create_dek(txn, provider, highest + 1, "dek-create")?;
        Ok((highest + 1, c))
    }

    /// Creates DEK `version` of `provider`: generated by the first root (in the
    /// hardware), wrapped under every other root, inserted as active.
    fn create_dek(&self, txn: &WriteTransaction, provider: &str, version: u32, op: &str) -> Result<Arc<CachedDek>> {
        // Read the pinned roots inside the transaction: another process may have
        // added one since this guard opened.
        let pins = {
            let meta = txn.open_table(st::META)?;
            let bytes = meta.get(st::META_ROOTS)?.ok_or_else(|| Error::integrity("reading the pinned roots"))?;
            schema::decode_roots(bytes.value())?
        };
        let missing: Vec<&str> = pins
            .iter()
            .filter(|p| !self.roots.iter().any(|r| r.root_id == p.root_id))
            .map(|p| p.description.as_str())
            .collect();
        if !missing.is_empty() {
            // A DEK some pinned root cannot open would silently weaken recovery.
            return Err(Error::Config(format!(
                "creating a data key for {provider} needs every pinned root configured; missing: {}",
                missing.join("; ")
            )));
        }
        let (first, rest) = self.roots.split_first().ok_or_else(|| Error::Config("no usable root".into()))?;
        self.counters.generates.fetch_add(1, Ordering::Relaxed);
        let (dek, w) = first.key.generate_dek()?;
        let mut wrapped = vec![RootWrapped { root_id: first.root_id, wrapped: w }];
        for r in rest {
            self.counters.wraps.fetch_add(1, Ordering::Relaxed);
            wrapped.push(RootWrapped { root_id: r.root_id, wrapped: r.key.wrap(&dek)? });
        }
        let entry = DekEntry { version, state: DekState::Active, created: now(), encryptions: 0, wrapped };
        txn.open_table(st::DEKS)?.insert((provider, version), entry.encode().as_slice())?;
        self.audit(
            txn,
            NewEvent { op, provider, outcome: "ok", detail: format!("version {version}"), ..Default::default() },
        )?;
        Ok(self.cache.insert(provider, version, &dek))
    }

    fn count_encryptions(
        &self,
        txn: &WriteTransaction,
        used: &BTreeMap<String, (u32, Arc<CachedDek>, u64)>,
    ) -> Result<()> {
        let mut deks = txn.open_table(st::DEKS)?;
        for (p, (v, _, n)) in used {
            let bytes = deks.get((p.as_str(), *v))?.map(|g| g.value().to_vec());
            let Some(bytes) = bytes else { continue };
            let mut e = DekEntry::decode(&bytes)?;
            e.encryptions = e.encryptions.saturating_add(*n);
            deks.insert((p.as_str(), *v), e.encode().as_slice())?;
        }
        Ok(())
    }
}
