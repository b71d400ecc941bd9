//! The authenticated store state: every security-relevant row bound, under a key only
//! a root can unlock, to one MAC'd head that a file writer can neither forge nor roll
//! back piecemeal (docs/FORMAT.md §state, docs/DESIGN-NOTES.md "Authenticated state").
//!
//! - **Covered rows**: records, tombstones, DEK entries, the pinned roots, the wrapped
//!   integrity key and the audit head. Each contributes
//!   `HMAC(k_state, label ‖ kind ‖ key ‖ value)`; the contributions are summed mod
//!   2^256 into an accumulator (a keyed set hash: the order of rows does not matter,
//!   and a write moves it by the rows it changes, in O(changed rows)).
//! - **The head** (`meta/state_head`): `generation ‖ accumulator ‖ MAC`, the MAC
//!   binding the store id. Every committed write bumps the generation.
//! - **Not covered**: the `by_dek`/`by_expiry` indexes (derived; every user checks an
//!   entry against its record) and refresh leases (liveness, not secrecy); audit
//!   entries are chained to the covered audit head.
//!
//! Checks: a full verification (O(rows)) when a guard opens the store, in `doctor`,
//! and whenever another process has moved the generation. Between them, every read
//! compares what it finds with the verified state this process holds ([`Known`]): a
//! record's AES-GCM tag on the `get` path (the open that follows authenticates the
//! rest), a row's full contribution elsewhere. The generation is looked at again at
//! most every `recheck` (default 1 s), which bounds how long a change by another
//! process (a revocation, a shred) or a file edit stays unseen.

use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};

use foldhash::fast::RandomState;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use zeroize::Zeroizing;

use super::StoreRead;
use crate::codec::{Reader, Writer};
use crate::error::{Error, Result};
use crate::seal::STORE_ID_LEN;
use crate::sync::{lock, read, write};

/// Derivation label of the state key (from the store's integrity key).
pub(crate) const STATE_KEY_LABEL: &[u8] = b"tokenguard/state-key/v1";
const ROW_LABEL: &[u8] = b"tokenguard/state-row/v1";
const HEAD_LABEL: &[u8] = b"tokenguard/state-head/v1";
const BATCH_LABEL: &[u8] = b"tokenguard/state-batch/v1";
/// Version byte of the head encoding.
pub(crate) const HEAD_FORMAT_V1: u8 = 1;
/// Length of an encoded head: version, generation, accumulator, MAC.
pub(crate) const HEAD_LEN: usize = 1 + 8 + 32 + 32;
/// Length of the record mark kept per record: its AES-GCM tag.
pub(crate) const TAG_LEN: usize = 16;

/// The kinds of covered row (the byte that separates their contributions).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Row {
    Record = 1,
    Tombstone = 2,
    Dek = 3,
    Roots = 4,
    IntegrityKey = 5,
    AuditHead = 6,
    AuditArchive = 7,
    Anchor = 8,
}

/// A covered row's key.
#[derive(Debug, Clone, Copy)]
pub(crate) enum RowKey<'a> {
    /// (provider, name): records and tombstones.
    Name(&'a str, &'a str),
    /// (provider, version): DEK entries.
    Version(&'a str, u32),
    /// The one row of its kind (roots, integrity key, audit head).
    Single,
}

/// The owned form of a row's key, as [`Known`] holds it.
pub(crate) fn owned_key(row: Row, k: RowKey<'_>) -> OwnedKey {
    k.owned(row)
}

impl RowKey<'_> {
    fn owned(self, row: Row) -> OwnedKey {
        match self {
            RowKey::Name(p, n) => (row, p.to_owned(), n.to_owned(), 0),
            RowKey::Version(p, v) => (row, p.to_owned(), String::new(), v),
            RowKey::Single => (row, String::new(), String::new(), 0),
        }
    }
}

pub(crate) type OwnedKey = (Row, String, String, u32);

/// A row's contribution to the accumulator.
pub(crate) type Digest = [u8; 32];

/// The key of the state MACs, derived from the store's integrity key.
pub(crate) struct StateKey(Zeroizing<[u8; 32]>);

impl StateKey {
    pub(crate) fn derive(integrity_key: &[u8; 32]) -> Self {
        StateKey(crate::crypto::derive(integrity_key, STATE_KEY_LABEL))
    }

    /// `HMAC(k_state, "tokenguard/state-row/v1" ‖ kind ‖ key ‖ u32 len ‖ value)`, each
    /// key part length-prefixed (u32, big-endian) so no two rows share an input.
    pub(crate) fn row(&self, row: Row, key: RowKey<'_>, value: &[u8]) -> Digest {
        let kind = [row as u8];
        let vlen = len32(value);
        match key {
            RowKey::Name(p, n) => crate::crypto::hmac(
                &self.0,
                &[
                    ROW_LABEL,
                    &kind,
                    &len32(p.as_bytes()),
                    p.as_bytes(),
                    &len32(n.as_bytes()),
                    n.as_bytes(),
                    &vlen,
                    value,
                ],
            ),
            RowKey::Version(p, v) => crate::crypto::hmac(
                &self.0,
                &[ROW_LABEL, &kind, &len32(p.as_bytes()), p.as_bytes(), &v.to_be_bytes(), &vlen, value],
            ),
            RowKey::Single => crate::crypto::hmac(&self.0, &[ROW_LABEL, &kind, &vlen, value]),
        }
    }

    fn head_mac(&self, store_id: &[u8; STORE_ID_LEN], generation: u64, acc: &Acc) -> Digest {
        crate::crypto::hmac(&self.0, &[HEAD_LABEL, store_id, &generation.to_be_bytes(), &acc.to_bytes()])
    }

    /// `HMAC(k_state, "tokenguard/state-batch/v1" ‖ store_id ‖ u32 len ‖ prev_head ‖
    /// body)`: a write batch of the fleet log, under the key in force before it,
    /// chained to the state head it was built on (docs/FORMAT.md, "Fleet log batch").
    pub(crate) fn batch_mac(&self, store_id: &[u8; STORE_ID_LEN], prev_head: &[u8], body: &[u8]) -> Digest {
        crate::crypto::hmac(&self.0, &[BATCH_LABEL, store_id, &len32(prev_head), prev_head, body])
    }

    /// Checks a batch's MAC (constant time).
    pub(crate) fn batch_verify(
        &self,
        store_id: &[u8; STORE_ID_LEN],
        prev_head: &[u8],
        body: &[u8],
        mac: &[u8],
    ) -> bool {
        let mut data = Vec::with_capacity(BATCH_LABEL.len() + STORE_ID_LEN + 4 + prev_head.len() + body.len());
        data.extend_from_slice(BATCH_LABEL);
        data.extend_from_slice(store_id);
        data.extend_from_slice(&len32(prev_head));
        data.extend_from_slice(prev_head);
        data.extend_from_slice(body);
        crate::crypto::hmac_verify(&self.0, &data, mac)
    }
}

fn len32(b: &[u8]) -> [u8; 4] {
    // Values are far below 4 GiB (records ≤ 64 KiB of secret); saturate rather than wrap.
    u32::try_from(b.len()).unwrap_or(u32::MAX).to_be_bytes()
}

/// The accumulator: a sum of digests mod 2^256 (four little-endian 64-bit limbs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Acc([u64; 4]);

impl Acc {
    fn limbs(d: &Digest) -> [u64; 4] {
        let mut l = [0u64; 4];
        for (i, c) in d.chunks_exact(8).enumerate() {
            let mut b = [0u8; 8];
            b.copy_from_slice(c);
            l[i] = u64::from_le_bytes(b);
        }
        l
    }

    pub(crate) fn add(&mut self, d: &Digest) {
        let o = Self::limbs(d);
        let mut carry = false;
        for (a, b) in self.0.iter_mut().zip(o) {
            let (s1, c1) = a.overflowing_add(b);
            let (s2, c2) = s1.overflowing_add(u64::from(carry));
            *a = s2;
            carry = c1 || c2;
        }
    }

    pub(crate) fn sub(&mut self, d: &Digest) {
        let o = Self::limbs(d);
        let mut borrow = false;
        for (a, b) in self.0.iter_mut().zip(o) {
            let (s1, c1) = a.overflowing_sub(b);
            let (s2, c2) = s1.overflowing_sub(u64::from(borrow));
            *a = s2;
            borrow = c1 || c2;
        }
    }

    /// Adds another accumulator (a delta).
    pub(crate) fn merge(&mut self, other: &Acc) {
        self.add(&other.to_bytes());
    }

    pub(crate) fn to_bytes(self) -> [u8; 32] {
        let mut out = [0u8; 32];
        for (c, l) in out.chunks_exact_mut(8).zip(self.0) {
            c.copy_from_slice(&l.to_le_bytes());
        }
        out
    }

    fn from_bytes(b: &[u8; 32]) -> Self {
        Acc(Self::limbs(b))
    }
}

/// The head: the generation and the accumulator of the rows it vouches for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Head {
    pub generation: u64,
    pub acc: Acc,
}

impl Head {
    /// `version ‖ generation (u64 BE) ‖ accumulator (32) ‖ HMAC(k_state, label ‖
    /// store_id ‖ generation ‖ accumulator)`.
    pub(crate) fn encode(&self, key: &StateKey, store_id: &[u8; STORE_ID_LEN]) -> Vec<u8> {
        let mut w = Writer::with_capacity(HEAD_LEN);
        w.u8(HEAD_FORMAT_V1).u64(self.generation);
        let mut out = w.finish();
        out.extend_from_slice(&self.acc.to_bytes());
        out.extend_from_slice(&key.head_mac(store_id, self.generation, &self.acc));
        out
    }

    /// Decodes a head and checks its MAC (constant time). A forged, truncated or
    /// foreign head is an integrity failure.
    pub(crate) fn decode(bytes: &[u8], key: &StateKey, store_id: &[u8; STORE_ID_LEN]) -> Result<Head> {
        let bad = || Error::integrity("verifying the store's state head");
        let mut r = Reader::new(bytes);
        if r.u8().map_err(|_| bad())? != HEAD_FORMAT_V1 {
            return Err(bad());
        }
        let generation = r.u64().map_err(|_| bad())?;
        let acc = Acc::from_bytes(&r.array::<32>().map_err(|_| bad())?);
        let mac = r.array::<32>().map_err(|_| bad())?;
        r.finish().map_err(|_| bad())?;
        let mut data = Vec::with_capacity(HEAD_LABEL.len() + STORE_ID_LEN + 40);
        data.extend_from_slice(HEAD_LABEL);
        data.extend_from_slice(store_id);
        data.extend_from_slice(&generation.to_be_bytes());
        data.extend_from_slice(&acc.to_bytes());
        if !crate::crypto::hmac_verify(&key.0, &data, &mac) {
            return Err(bad());
        }
        Ok(Head { generation, acc })
    }
}

/// What a process knows of a record it verified: its AES-GCM tag (the `get` path
/// compares it) and its full contribution (every other read compares that).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Mark {
    tag: [u8; TAG_LEN],
    digest: Digest,
}

impl Mark {
    pub(crate) fn of(key: &StateKey, provider: &str, name: &str, bytes: &[u8]) -> Self {
        Mark { tag: tag_of(bytes), digest: key.row(Row::Record, RowKey::Name(provider, name), bytes) }
    }

    pub(crate) fn digest(&self) -> Digest {
        self.digest
    }
}

/// The last 16 bytes of a stored record: its AES-GCM tag (zeros if shorter, which no
/// record that parses is).
pub(crate) fn tag_of(bytes: &[u8]) -> [u8; TAG_LEN] {
    let mut t = [0u8; TAG_LEN];
    if let Some(s) = bytes.len().checked_sub(TAG_LEN).and_then(|i| bytes.get(i..)) {
        t.copy_from_slice(s);
    }
    t
}

/// A state verified in a transaction not yet committed (see
/// [`StateCell::verify_pending`]).
pub(crate) struct Verified(Known);

/// The verified state a process holds: the generation and every covered row's mark.
#[derive(Debug, Default)]
struct Known {
    generation: u64,
    /// When the head was last looked at (`clock::coarse_ms`); 0: never, or to be
    /// verified again before the fast path is trusted.
    checked: u64,
    /// Why the rows do not verify (report mode only; enforce mode refuses to open).
    problem: Option<String>,
    /// The store predates the head (schema 1): `tokenguard upgrade` is the way on.
    upgrade_needed: bool,
    /// By two independently seeded 64-bit foldhashes of (provider, name): one probe
    /// and no pointer to follow on every `get`. Two names meeting on all 128 bits
    /// would only make a read take the slow path (a tag never matches another
    /// record's); never a wrong answer.
    records: HashMap<u128, Mark, BuildHasherDefault<Prehashed>>,
    rows: HashMap<OwnedKey, Digest, RandomState>,
    /// The state head these rows verified against, or that this process's own
    /// write committed (empty: not known). A catch-up checks from this state only if
    /// the copy holds this very head.
    head: Vec<u8>,
}

impl Known {
    fn report(&self) -> StateReport {
        StateReport {
            generation: self.generation,
            rows: self.records.len() as u64 + self.rows.len() as u64,
            verified: self.problem.is_none(),
            upgrade_needed: self.upgrade_needed,
            problem: self.problem.clone(),
        }
    }

    fn record(&self, provider: &str, name: &str) -> Option<&Mark> {
        self.records.get(&record_key(provider, name))
    }

    fn set_record(&mut self, provider: &str, name: &str, mark: Option<Mark>) {
        match mark {
            Some(m) => {
                self.records.insert(record_key(provider, name), m);
            }
            None => {
                self.records.remove(&record_key(provider, name));
            }
        }
    }

    fn set_row(&mut self, key: OwnedKey, digest: Option<Digest>) {
        match digest {
            Some(d) => self.rows.insert(key, d),
            None => self.rows.remove(&key),
        };
    }

    fn fresh(&self, recheck_ms: u64) -> bool {
        self.checked != 0 && crate::clock::coarse_ms().saturating_sub(self.checked) < recheck_ms
    }
}

/// A catch-up's incremental check in progress ([`StateCell::follow`]): the running
/// accumulator, and the covered rows the batches changed so far (their last value).
pub(crate) struct Follow {
    acc: Acc,
    records: HashMap<(String, String), Option<Mark>>,
    rows: HashMap<OwnedKey, Option<Digest>>,
}

impl Follow {
    /// Whether the rows applied so far add up to the head `acc` (the head a batch
    /// brought, under the MAC already checked).
    pub(crate) fn reaches(&self, acc: &Acc) -> bool {
        self.acc == *acc
    }
}

/// A change of one covered row by a write transaction, applied to [`Known`] once the
/// transaction commits.
#[derive(Debug)]
pub(crate) enum Change {
    Record { provider: String, name: String, mark: Option<Mark> },
    Row { key: OwnedKey, digest: Option<Digest> },
}

/// What a full verification found.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct StateReport {
    /// Generation of the head (0 when there is none).
    pub generation: u64,
    /// Covered rows counted.
    pub rows: u64,
    /// Whether the rows match the head. `false` only when opened for inspection.
    pub verified: bool,
    /// The store was made by a build without the head: `tokenguard upgrade` adds it.
    pub upgrade_needed: bool,
    /// Why not, when not.
    pub problem: Option<String>,
}

/// Whether a failed verification refuses the open or is reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StateCheck {
    /// Refuse to open a store whose rows do not match its head (the default).
    #[default]
    Enforce,
    /// Open anyway, for `doctor`, `upgrade` and incident response: metadata reads and
    /// writes proceed, secrets are never opened.
    Report,
}

/// The state key and the store id it is bound to.
pub(crate) type Armed = Arc<(StateKey, [u8; STORE_ID_LEN])>;

/// A store's view of its authenticated state: the key (once a guard has unwrapped
/// the integrity key), the verified [`Known`] state, and the DEK rows other
/// processes changed since this process last looked.
#[derive(Default)]
pub(crate) struct StateCell {
    /// The state key and the store id it is bound to: set when a guard opens the
    /// store, replaced when the integrity key is rotated (`root remove`).
    key: RwLock<Option<Armed>>,
    /// Set with the key (read on every `get`, so an atomic rather than the lock).
    is_armed: AtomicBool,
    /// The highest generation this process has seen verified or committed. A
    /// snapshot begun after it was seen cannot legitimately be older: that is a
    /// rollback of the file under the running process.
    max_seen: AtomicU64,
    recheck_ms: AtomicU64,
    report_only: AtomicBool,
    known: RwLock<Known>,
    changed_deks: Mutex<Vec<(String, u32)>>,
    deks_changed: AtomicBool,
}

/// The message of a row that does not match the verified state.
const MISMATCH: &str = "matching a row with the store's authenticated state (replayed, edited, added or removed \
                        outside tokenguard)";

impl StateCell {
    /// Gives the cell its key; the first call wins (one store, one integrity key).
    pub(crate) fn arm(&self, key: StateKey, store_id: [u8; STORE_ID_LEN], recheck: Duration, check: StateCheck) {
        let mut k = write(&self.key);
        if k.is_none() {
            *k = Some(Arc::new((key, store_id)));
        }
        drop(k);
        self.is_armed.store(true, Ordering::Release);
        self.recheck_ms.store(u64::try_from(recheck.as_millis()).unwrap_or(u64::MAX), Ordering::Relaxed);
        self.report_only.store(check == StateCheck::Report, Ordering::Relaxed);
    }

    /// Whether a guard has given the store its key (reads before that — the open
    /// reading the pinned roots — are not checked; every other read comes after).
    pub(crate) fn armed(&self) -> bool {
        self.is_armed.load(Ordering::Acquire)
    }

    pub(crate) fn key(&self) -> Result<Armed> {
        read(&self.key).clone().ok_or_else(|| Error::integrity("using the store before its state key is known"))
    }

    /// Gives the cell its key for the creating transaction only: reads are not
    /// checked until a guard arms it (there is no state to check them against yet).
    pub(crate) fn key_for_creation(&self, key: StateKey, store_id: [u8; STORE_ID_LEN]) {
        *write(&self.key) = Some(Arc::new((key, store_id)));
    }

    /// Replaces the state key (after a committed rotation of the integrity key).
    pub(crate) fn rekey(&self, key: StateKey) -> Result<()> {
        let store_id = self.key()?.1;
        *write(&self.key) = Some(Arc::new((key, store_id)));
        Ok(())
    }

    /// Verifies every covered row `txn` sees against its head, and makes the result
    /// this process's known state (unless it already knows a newer one). With
    /// [`StateCheck::Enforce`], a mismatch is an error; with `Report`, it is
    /// remembered and returned.
    pub(crate) fn verify(&self, txn: &impl StoreRead) -> Result<StateReport> {
        let fresh = self.verify_snapshot(txn)?;
        let report = fresh.report();
        self.install(fresh);
        Ok(report)
    }

    /// The full verification of one snapshot, O(covered rows).
    fn verify_snapshot(&self, txn: &impl StoreRead) -> Result<Known> {
        let armed = self.key()?;
        let (key, store_id) = &*armed;
        self.verify_under(txn, key, store_id)
    }

    /// [`StateCell::verify_snapshot`] under `key`, which may not be the cell's yet.
    fn verify_under(&self, txn: &impl StoreRead, key: &StateKey, store_id: &[u8; STORE_ID_LEN]) -> Result<Known> {
        let mut fresh = Known::default();
        let mut acc = Acc::default();
        txn.visit_covered(&mut |row, k, value| {
            match (row, k) {
                (Row::Record, RowKey::Name(p, n)) => {
                    let mark = Mark::of(key, p, n, value);
                    acc.add(&mark.digest);
                    fresh.set_record(p, n, Some(mark));
                }
                _ => {
                    let d = key.row(row, k, value);
                    acc.add(&d);
                    fresh.set_row(k.owned(row), Some(d));
                }
            }
            Ok(())
        })?;
        let head_bytes = txn.state_head()?;
        let head: Option<Option<Head>> = head_bytes.as_deref().map(|b| Head::decode(b, key, store_id).ok());
        let schema = txn.meta()?.schema;
        let problem = match head {
            None if schema >= 2 => Some("the store's state head is missing (deleted outside tokenguard)".into()),
            None => Some(
                "the store has no authenticated state head (made by tokenguard 0.1, or the head was deleted); \
                 run `tokenguard upgrade` once you have checked the store is yours"
                    .into(),
            ),
            Some(None) => Some("the store's state head does not verify (forged, or from another store)".into()),
            Some(Some(h)) if h.acc != acc => Some(format!(
                "the store's rows do not match its authenticated state (generation {}): a row was replayed, edited, \
                 added or removed outside tokenguard",
                h.generation
            )),
            Some(Some(_)) => None,
        };
        fresh.upgrade_needed = head.is_none() && schema < 2;
        if let Some(p) = &problem
            && !self.report_only.load(Ordering::Relaxed)
        {
            tracing::warn!(problem = %p, "store state does not verify");
            return Err(if fresh.upgrade_needed {
                Error::UnsupportedVersion { found: schema, supported: super::SCHEMA_VERSION }
            } else {
                Error::integrity(MISMATCH)
            });
        }
        fresh.generation = head.flatten().map_or(0, |h| h.generation);
        fresh.head = head_bytes.unwrap_or_default();
        fresh.checked = crate::clock::coarse_ms();
        fresh.problem = problem;
        Ok(fresh)
    }

    /// Verifies, in full and under `key` (the cell's own when `None`), a state a
    /// transaction has built but not committed: batches of the fleet log applied to
    /// this store (`Store::catch_up`). Any problem is an error, whatever the check
    /// mode: a batch that does not verify is never committed. The result becomes the
    /// known state through [`StateCell::install_verified`] once the commit is done.
    pub(crate) fn verify_pending(&self, txn: &impl StoreRead, key: Option<&StateKey>) -> Result<Verified> {
        let armed = self.key()?;
        let (own, store_id) = &*armed;
        let fresh = self.verify_under(txn, key.unwrap_or(own), store_id)?;
        match fresh.problem {
            None => Ok(Verified(fresh)),
            Some(_) => Err(Error::integrity(MISMATCH)),
        }
    }

    /// Makes a committed [`StateCell::verify_pending`] result the known state, with
    /// its key when it had one of its own.
    pub(crate) fn install_verified(&self, v: Verified, key: Option<StateKey>) -> StateReport {
        if let Some(k) = key
            && let Ok(armed) = self.key()
        {
            *write(&self.key) = Some(Arc::new((k, armed.1)));
        }
        let report = v.0.report();
        self.install(v.0);
        report
    }

    /// Makes `fresh` the known state unless a newer one is known already, and notes
    /// the DEK rows that changed for the guard's cache.
    fn install(&self, fresh: Known) {
        let mut known = write(&self.known);
        if fresh.problem.is_none() && fresh.generation < self.max_seen.load(Ordering::Acquire) {
            // An older snapshot (one that began before a commit): checked, not kept.
            return;
        }
        if fresh.problem.is_none() {
            self.max_seen.fetch_max(fresh.generation, Ordering::AcqRel);
        }
        let changed: Vec<(String, u32)> = known
            .rows
            .iter()
            .filter(|(k, d)| k.0 == Row::Dek && fresh.rows.get(*k) != Some(*d))
            .map(|((_, p, _, v), _)| (p.clone(), *v))
            .collect();
        *known = fresh;
        drop(known);
        if !changed.is_empty() {
            lock(&self.changed_deks).extend(changed);
            self.deks_changed.store(true, Ordering::Release);
        }
    }

    /// The last verification's result, without reading the store.
    pub(crate) fn report(&self) -> StateReport {
        read(&self.known).report()
    }

    /// Checks the record `txn` holds under (provider, name) — its AES-GCM tag, or its
    /// absence — against the verified state. The `get` path: one map lookup, and a
    /// look at the head at most every `recheck`.
    pub(crate) fn check_record_tag(
        &self,
        txn: &impl StoreRead,
        floor: u64,
        pending: &[Change],
        provider: &str,
        name: &str,
        bytes: Option<&[u8]>,
    ) -> Result<()> {
        if let Some(mark) = pending_record(pending, provider, name) {
            return same(mark.map(|m| m.tag) == bytes.map(tag_of));
        }
        let matches = |k: &Known| k.record(provider, name).map(|m| m.tag) == bytes.map(tag_of);
        self.check(txn, floor, true, matches)
    }

    /// Checks a scanned record's full contribution (metadata reads: the header is not
    /// authenticated by an AES-GCM open there).
    pub(crate) fn check_record_row(
        &self,
        txn: &impl StoreRead,
        floor: u64,
        pending: &[Change],
        provider: &str,
        name: &str,
        bytes: Option<&[u8]>,
    ) -> Result<()> {
        let armed = self.key()?;
        let (key, _) = &*armed;
        let digest = bytes.map(|b| key.row(Row::Record, RowKey::Name(provider, name), b));
        if let Some(mark) = pending_record(pending, provider, name) {
            return same(mark.map(|m| m.digest) == digest);
        }
        self.check(txn, floor, false, |k| k.record(provider, name).map(|m| m.digest) == digest)
    }

    /// Checks a tombstone or DEK row (or its absence).
    pub(crate) fn check_row(
        &self,
        txn: &impl StoreRead,
        floor: u64,
        pending: &[Change],
        row: Row,
        k: RowKey<'_>,
        value: Option<&[u8]>,
    ) -> Result<()> {
        let armed = self.key()?;
        let (key, _) = &*armed;
        let digest = value.map(|v| key.row(row, k, v));
        let owned = k.owned(row);
        if let Some(d) = pending.iter().rev().find_map(|c| match c {
            Change::Row { key, digest } if *key == owned => Some(*digest),
            _ => None,
        }) {
            return same(d == digest);
        }
        self.check(txn, floor, false, |known| known.rows.get(&owned).copied() == digest)
    }

    /// At the start of a write transaction: if the stored head is not at the
    /// generation this process verified (another process wrote, or the file was
    /// edited), the transaction's snapshot is verified in full first, so every read
    /// the write makes is checked against a state that is the snapshot's own.
    pub(crate) fn before_write(&self, txn: &impl StoreRead) -> Result<()> {
        if read(&self.key).is_none() {
            return Ok(());
        }
        let armed = self.key()?;
        let (key, store_id) = &*armed;
        let Some(bytes) = txn.state_head()? else { return Ok(()) };
        let Ok(head) = Head::decode(&bytes, key, store_id) else { return Ok(()) };
        if head.generation < self.floor() {
            return Err(Error::integrity(
                "checking the store's generation (the file went back to an older state under this process)",
            ));
        }
        {
            let k = read(&self.known);
            if k.checked != 0 && k.generation == head.generation {
                return Ok(());
            }
        }
        self.verify(txn).map(drop)
    }

    /// The generation floor of a snapshot beginning now (see `max_seen`).
    pub(crate) fn floor(&self) -> u64 {
        self.max_seen.load(Ordering::Acquire)
    }

    /// The one check: `matches` against the known state. The fast path is one map
    /// lookup while the last look at the head is younger than `recheck`. Otherwise
    /// the snapshot's own head decides: at the known generation, the known state is
    /// the snapshot's, so a mismatch is an edit; at another generation (another
    /// process wrote, or the snapshot predates a commit), the snapshot is verified
    /// in full and checked against that. In report mode, secrets (`opens`) are
    /// refused and everything else passes.
    fn check(&self, txn: &impl StoreRead, floor: u64, opens: bool, matches: impl Fn(&Known) -> bool) -> Result<()> {
        {
            let k = read(&self.known);
            if k.problem.is_some() {
                return if opens {
                    Err(Error::integrity(
                        "opening a secret of a store whose authenticated state does not verify (see `tokenguard doctor`)",
                    ))
                } else {
                    Ok(())
                };
            }
            if k.fresh(self.recheck_ms.load(Ordering::Relaxed)) && matches(&k) {
                return Ok(());
            }
        }
        let armed = self.key()?;
        let (key, store_id) = &*armed;
        let head = match txn.state_head()? {
            Some(b) => Head::decode(&b, key, store_id).map_err(|_| {
                Error::integrity(
                    "verifying the store's state head (forged, or the keys were rotated by a `root remove` in \
                     another process: reopen the store)",
                )
            })?,
            None => return Err(Error::integrity("reading the store's state head")),
        };
        if head.generation < floor {
            return Err(Error::integrity(
                "checking the store's generation (the file went back to an older state under this process)",
            ));
        }
        {
            let mut k = write(&self.known);
            if k.checked != 0 && k.generation == head.generation {
                k.checked = crate::clock::coarse_ms();
                return if matches(&k) { Ok(()) } else { Err(Error::integrity(MISMATCH)) };
            }
        }
        tracing::debug!(generation = head.generation, "store state moved; verifying the snapshot");
        let fresh = self.verify_snapshot(txn)?;
        let ok = fresh.problem.is_none() && matches(&fresh);
        self.install(fresh);
        if ok { Ok(()) } else { Err(Error::integrity(MISMATCH)) }
    }

    /// After a committed reseal (the head recomputed, perhaps under a new key): the
    /// known state is verified again at the next read.
    pub(crate) fn resealed(&self, after: u64) {
        self.max_seen.fetch_max(after, Ordering::AcqRel);
        write(&self.known).checked = 0;
    }

    /// Applies a committed write's changes when it moved the head from the
    /// generation this process had verified; otherwise the next read verifies again.
    pub(crate) fn committed(&self, before: u64, after: u64, changes: Vec<Change>, head: &[u8]) {
        self.max_seen.fetch_max(after, Ordering::AcqRel);
        let mut k = write(&self.known);
        if k.generation != before || k.checked == 0 {
            k.checked = 0;
            return;
        }
        k.generation = after;
        head.clone_into(&mut k.head);
        for c in changes {
            match c {
                Change::Record { provider, name, mark } => k.set_record(&provider, &name, mark),
                Change::Row { key, digest } => k.set_row(key, digest),
            }
        }
    }

    /// Starts the incremental check of a catch-up (docs/FLEET-DESIGN.md, "Catch-up"):
    /// possible when this process's verified state is the copy's — at `first`, with
    /// the very `head` (holding `acc`) the copy holds. `None`: the caller verifies
    /// the result in full.
    pub(crate) fn follow(&self, first: u64, head: &[u8], acc: Acc) -> Option<Follow> {
        let k = read(&self.known);
        let usable = k.generation == first
            && k.checked != 0
            && k.problem.is_none()
            && !k.upgrade_needed
            && !k.head.is_empty()
            && k.head == head;
        usable.then(|| Follow { acc, records: HashMap::default(), rows: HashMap::default() })
    }

    /// One covered row a batch sets (`new`) or removes (`None`), under `key` (the
    /// cell's own: a batch that rekeys is verified in full): the accumulator moves
    /// from the row's digest before (an earlier batch's, or the verified state's) to
    /// the new one.
    pub(crate) fn follow_row(&self, f: &mut Follow, key: &StateKey, row: Row, k: RowKey<'_>, new: Option<&[u8]>) {
        match (row, k) {
            (Row::Record, RowKey::Name(p, n)) => {
                let id = (p.to_owned(), n.to_owned());
                let old = match f.records.get(&id) {
                    Some(m) => m.map(|m| m.digest),
                    None => read(&self.known).record(p, n).map(|m| m.digest),
                };
                let mark = new.map(|v| Mark::of(key, p, n, v));
                if let Some(d) = old {
                    f.acc.sub(&d);
                }
                if let Some(m) = &mark {
                    f.acc.add(&m.digest);
                }
                f.records.insert(id, mark);
            }
            _ => {
                let id = k.owned(row);
                let old = match f.rows.get(&id) {
                    Some(d) => *d,
                    None => read(&self.known).rows.get(&id).copied(),
                };
                let digest = new.map(|v| key.row(row, k, v));
                if let Some(d) = old {
                    f.acc.sub(&d);
                }
                if let Some(d) = &digest {
                    f.acc.add(d);
                }
                f.rows.insert(id, digest);
            }
        }
    }

    /// After a committed catch-up checked by [`StateCell::follow`]: the known state
    /// moves from `first` to `last` by the rows the batches changed, and the DEK rows
    /// among them are noted for the guard's cache (another host rotated, retired or
    /// shredded them). If the known state moved meanwhile, the next read verifies
    /// in full.
    pub(crate) fn followed(&self, first: u64, last: u64, f: Follow, head: &[u8]) {
        let deks: Vec<(String, u32)> =
            f.rows.keys().filter(|(row, ..)| *row == Row::Dek).map(|(_, p, _, v)| (p.clone(), *v)).collect();
        let mut changes: Vec<Change> =
            f.records.into_iter().map(|((provider, name), mark)| Change::Record { provider, name, mark }).collect();
        changes.extend(f.rows.into_iter().map(|(key, digest)| Change::Row { key, digest }));
        self.committed(first, last, changes, head);
        if !deks.is_empty() {
            lock(&self.changed_deks).extend(deks);
            self.deks_changed.store(true, Ordering::Release);
        }
    }

    /// Whether the known state is exactly what a full verification of `txn` finds
    /// now (rows, records with their tags, generation and head).
    #[cfg(test)]
    pub(crate) fn known_is_verified(&self, txn: &impl StoreRead) -> Result<bool> {
        let fresh = self.verify_snapshot(txn)?;
        let k = read(&self.known);
        Ok(fresh.problem.is_none()
            && k.generation == fresh.generation
            && k.head == fresh.head
            && k.records == fresh.records
            && k.rows == fresh.rows)
    }

    /// DEK versions another process changed (rotated, retired, shredded) since the
    /// last call: the guard drops them from its cache. One atomic load when none.
    pub(crate) fn take_changed_deks(&self) -> Vec<(String, u32)> {
        if !self.deks_changed.load(Ordering::Relaxed) || !self.deks_changed.swap(false, Ordering::Acquire) {
            return Vec::new();
        }
        std::mem::take(&mut *lock(&self.changed_deks))
    }
}

/// The per-process seeds of the record map's key.
static RECORD_HASH: std::sync::OnceLock<(RandomState, RandomState)> = std::sync::OnceLock::new();

fn record_key(provider: &str, name: &str) -> u128 {
    let (a, b) = RECORD_HASH.get_or_init(Default::default);
    (u128::from(a.hash_one((provider, name))) << 64) | u128::from(b.hash_one((provider, name)))
}

/// The hasher of a map whose keys are already hashes.
#[derive(Default)]
struct Prehashed(u64);

impl Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `u64` keys are hashed here (below); anything else still mixes.
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }

    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }

    fn write_u128(&mut self, v: u128) {
        // Both halves are uniform hashes: the low one is as good a bucket as any.
        self.0 = u64::try_from(v & u128::from(u64::MAX)).unwrap_or_default();
    }
}

/// The latest change of (provider, name) in a write transaction's own pending
/// changes, if it made one: `Some(None)` when it deleted the record.
fn pending_record(pending: &[Change], provider: &str, name: &str) -> Option<Option<Mark>> {
    pending.iter().rev().find_map(|c| match c {
        Change::Record { provider: p, name: n, mark } if p == provider && n == name => Some(*mark),
        _ => None,
    })
}

fn same(ok: bool) -> Result<()> {
    if ok { Ok(()) } else { Err(Error::integrity(MISMATCH)) }
}

/// The head a new store starts from.
pub(crate) const GENESIS: Head = Head { generation: 0, acc: Acc([0; 4]) };

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn accumulator_is_order_free_and_subtracts_back() {
        let a = [0xffu8; 32];
        let b = [0x01u8; 32];
        let mut x = Acc::default();
        x.add(&a);
        x.add(&b);
        let mut y = Acc::default();
        y.add(&b);
        y.add(&a);
        assert_eq!(x, y);
        x.sub(&a);
        x.sub(&b);
        assert_eq!(x, Acc::default());
        // Wrap-around: all-ones + 1 is zero mod 2^256.
        let mut z = Acc::default();
        z.add(&a);
        let mut one = [0u8; 32];
        one[0] = 1;
        z.add(&one);
        assert_eq!(z, Acc::default());
    }

    #[test]
    fn head_round_trips_and_refuses_forgery_and_other_stores() {
        let key = StateKey::derive(&[7u8; 32]);
        let id = [1u8; STORE_ID_LEN];
        let mut acc = Acc::default();
        acc.add(&key.row(Row::Record, RowKey::Name("p", "n"), b"v"));
        let h = Head { generation: 9, acc };
        let bytes = h.encode(&key, &id);
        assert_eq!(bytes.len(), HEAD_LEN);
        assert_eq!(Head::decode(&bytes, &key, &id).unwrap(), h);
        assert!(Head::decode(&bytes, &key, &[2u8; STORE_ID_LEN]).is_err());
        assert!(Head::decode(&bytes, &StateKey::derive(&[8u8; 32]), &id).is_err());
        for i in 0..bytes.len() {
            let mut t = bytes.clone();
            t[i] ^= 1;
            assert!(Head::decode(&t, &key, &id).is_err(), "flipped byte {i} accepted");
        }
        assert!(Head::decode(&bytes[..HEAD_LEN - 1], &key, &id).is_err());
    }

    #[test]
    fn row_digests_separate_kinds_and_key_boundaries() {
        let key = StateKey::derive(&[7u8; 32]);
        let a = key.row(Row::Record, RowKey::Name("ab", "c"), b"v");
        let b = key.row(Row::Record, RowKey::Name("a", "bc"), b"v");
        let c = key.row(Row::Tombstone, RowKey::Name("ab", "c"), b"v");
        assert_ne!(a, b);
        assert_ne!(a, c);
        assert_ne!(key.row(Row::Roots, RowKey::Single, b"x"), key.row(Row::IntegrityKey, RowKey::Single, b"x"));
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::cast_possible_truncation)]
mod vector {
    use super::*;

    /// The worked vector of docs/FORMAT.md §"Authenticated state", from its inputs.
    pub(super) fn compute() -> Vec<(&'static str, Vec<u8>)> {
        let ik: [u8; 32] = std::array::from_fn(|i| i as u8);
        let store_id: [u8; STORE_ID_LEN] = std::array::from_fn(|i| 0xa0 + i as u8);
        let key = StateKey::derive(&ik);
        let rows = [
            key.row(Row::Record, RowKey::Name("github", "ci-bot"), b"record bytes"),
            key.row(Row::Dek, RowKey::Version("github", 1), b"dek entry bytes"),
            key.row(Row::AuditHead, RowKey::Single, b"audit head bytes"),
        ];
        let mut acc = Acc::default();
        for r in &rows {
            acc.add(r);
        }
        let head = Head { generation: 7, acc }.encode(&key, &store_id);
        let anchor = crate::store::schema::Anchor {
            counter_id: "pkcs11:serial=0123456789abcdef;label=tokenguard-counter".into(),
            value: 42,
        }
        .encode();
        let anchor_row = key.row(Row::Anchor, RowKey::Single, &anchor);
        vec![
            ("anchor", anchor.clone()),
            ("state_row_anchor", anchor_row.to_vec()),
            ("state_key", key.0.to_vec()),
            ("state_row_record", rows[0].to_vec()),
            ("state_row_dek", rows[1].to_vec()),
            ("state_row_audit_head", rows[2].to_vec()),
            ("state_acc", acc.to_bytes().to_vec()),
            ("state_head", head),
        ]
    }

    fn doc_hex(doc: &str, name: &str) -> Vec<u8> {
        let start = doc.find(&format!("```hex {name}\n")).unwrap_or_else(|| panic!("{name} not in FORMAT.md"));
        let rest = &doc[start + 8 + name.len()..];
        let hex: String = rest[..rest.find("```").unwrap()].chars().filter(char::is_ascii_hexdigit).collect();
        (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect()
    }

    #[test]
    fn state_vector_matches_the_document() {
        let doc = include_str!("../../docs/FORMAT.md");
        for (name, want) in compute() {
            if std::env::var_os("TOKENGUARD_PRINT_VECTORS").is_some() {
                let hex: String = want.iter().map(|b| format!("{b:02x}")).collect();
                println!("{name}: {hex}");
                continue;
            }
            assert_eq!(doc_hex(doc, name), want, "{name}");
        }
    }
}
