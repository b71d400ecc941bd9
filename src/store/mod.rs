//! The store: every persisted structure behind typed operations, inside read and
//! write transactions. Nothing outside this module names the database engine.
//!
//! The seam is two traits: [`StoreRead`] (what a read snapshot answers) and
//! [`StoreWrite`] (what a write transaction changes). The guard is written against
//! them; `redb_store/` implements them on one redb file. Any second engine must keep
//! the same semantics (the fleet store's proposed shape, docs/FLEET-DESIGN.md, keeps
//! redb as each process's cache instead):
//! - a write transaction is atomic and durable on commit, one at a time per store;
//! - [`StoreWrite::put_record`] keeps the `by_dek` and `by_expiry` indexes in step
//!   with the record, always — no caller writes an index entry;
//! - a record is only ever stored under the (provider, name) its header names;
//! - the audit chain is appended under the write lock, never forked.
//!
//! Tables (docs/FORMAT.md §store): `meta`, `deks`, `tokens`, `by_dek`, `by_expiry`,
//! `tombstones`, `audit`, `refresh_leases`. Store creation is written once
//! ([`Store::create`]), and `restore` uses it.
//!
//! Concurrency: by default the file is opened so several processes can share it (the
//! CLI beside a service); one write transaction runs at a time across processes.
//! `exclusive` mode is the faster single-process option (FACTS: ~1.7 µs vs ~5 µs per
//! read transaction). Every open and every write waits at most `busy_timeout`, then
//! fails with [`Error::StoreBusy`]: never a hang.

pub(crate) mod anchor;
pub(crate) mod journal;
pub(crate) mod redb_store;
pub(crate) mod schema;
pub(crate) mod state;

use std::ops::ControlFlow;
use std::time::Duration;

use crate::error::Result;
use crate::seal::{RecordView, STORE_ID_LEN};

pub(crate) use redb_store::WriteTxn;
pub(crate) use redb_store::{AnchorWrite, CounterStatus, Store};
pub use schema::{DekEntry, DekState, RootPin, RootWrapped, Tombstone};
pub use state::{StateCheck, StateReport};

/// Decodes the pinned-roots value of a store or backup (docs/FORMAT.md): the
/// deliberate way in to the store's encodings for independent verifiers and fuzzing.
pub fn decode_roots(bytes: &[u8]) -> Result<Vec<RootPin>> {
    schema::decode_roots(bytes)
}

/// Decodes a wrapped-integrity-key value (docs/FORMAT.md), as [`decode_roots`].
pub fn decode_wrapped_key(bytes: &[u8]) -> Result<Vec<RootWrapped>> {
    schema::decode_wrapped_key(bytes)
}

/// Schema version written by this build. 2 added the authenticated state head; a
/// version-1 store opens after an explicit `tokenguard upgrade`.
pub const SCHEMA_VERSION: u32 = 2;

/// The oldest schema version this build reads (and upgrades).
pub const MIN_SCHEMA_VERSION: u32 = 1;

/// How processes share the store file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreMode {
    /// Several processes may read and write (one writer at a time). The default.
    #[default]
    Shared,
    /// This process alone: faster reads; others get "busy".
    Exclusive,
}

/// Options for opening a store.
#[derive(Debug, Clone, Copy)]
pub struct StoreOptions {
    /// Sharing mode.
    pub mode: StoreMode,
    /// Longest wait for the file or the write lock.
    pub busy_timeout: Duration,
}

impl StoreOptions {
    /// The default bounded wait for a busy store.
    pub const DEFAULT_BUSY_TIMEOUT: Duration = Duration::from_secs(5);
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions { mode: StoreMode::Shared, busy_timeout: Self::DEFAULT_BUSY_TIMEOUT }
    }
}

/// The store's identity and keys (schema version checked on read), written once at
/// creation; the roots change later.
#[derive(Debug, Clone)]
pub(crate) struct StoreMeta {
    /// Schema version (ignored on create: a new store is always [`SCHEMA_VERSION`]).
    pub schema: u32,
    pub store_id: [u8; STORE_ID_LEN],
    pub roots: Vec<RootPin>,
    pub integrity_key: Vec<RootWrapped>,
}

/// A record's index entries: the DEK version that sealed it and its not-after.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct IndexKeys {
    pub dek_version: u32,
    pub expires_at: Option<u64>,
}

/// A refresh lease: which process refreshes a token, until when.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Lease {
    pub owner: [u8; 16],
    pub until: u64,
}

/// Every row of the store as stored, for a backup (one snapshot) and a restore.
#[derive(Debug, Default)]
pub(crate) struct Dump {
    pub store_id: [u8; STORE_ID_LEN],
    pub roots: Vec<u8>,
    pub integrity_key: Vec<u8>,
    pub deks: Vec<(String, u32, Vec<u8>)>,
    pub tokens: Vec<(String, String, Vec<u8>)>,
    pub tombstones: Vec<(String, String, Vec<u8>)>,
    pub audit: Vec<(u64, Vec<u8>)>,
    pub audit_head: Vec<u8>,
    /// The archive of earlier audit keys (empty before the first key rotation).
    pub audit_archive: Vec<u8>,
}

/// Called by [`StoreRead::scan_records`] with each record's key and parsed view.
pub(crate) type RecordVisitor<'f> = dyn FnMut(&str, &str, Result<RecordView<'_>>) -> Result<ControlFlow<()>> + 'f;

/// Called by [`StoreRead::visit_covered`] with each covered row as stored.
pub(crate) type CoveredVisitor<'f> = dyn FnMut(state::Row, state::RowKey<'_>, &[u8]) -> Result<()> + 'f;

/// Called by [`StoreWrite::put_records`] with a key's index and the record stored
/// there now; returns the new record's bytes, or `None` to leave it.
pub(crate) type RecordBuilder<'f> = dyn FnMut(usize, Option<&RecordView<'_>>) -> Result<Option<Vec<u8>>> + 'f;

/// What a read snapshot answers. Implemented by read and write transactions alike,
/// so every read helper works in both.
pub(crate) trait StoreRead {
    /// Schema version, store id, pinned roots and the wrapped integrity key.
    fn meta(&self) -> Result<StoreMeta>;

    /// The pinned roots, as this transaction sees them.
    fn roots(&self) -> Result<Vec<RootPin>> {
        self.meta().map(|m| m.roots)
    }

    /// Calls `f` with the record stored under (provider, name), borrowed in place
    /// (the hot path: no copy of the record). `None` when there is none.
    fn with_record<T>(
        &self,
        provider: &str,
        name: &str,
        f: impl FnOnce(&RecordView<'_>) -> Result<T>,
    ) -> Result<Option<T>>;

    /// As [`StoreRead::with_record`], for callers that read the metadata without
    /// opening the secret: the whole stored row is checked against the verified
    /// state, not only the AES-GCM tag that the open would authenticate the rest by.
    fn with_record_meta<T>(
        &self,
        provider: &str,
        name: &str,
        f: impl FnOnce(&RecordView<'_>) -> Result<T>,
    ) -> Result<Option<T>>;

    /// Calls `f` with every record (of one provider), in key order, until it breaks.
    /// A record that does not parse is passed as `Err` with its key, so a caller can
    /// report it and go on.
    fn scan_records(&self, provider: Option<&str>, f: &mut RecordVisitor<'_>) -> Result<()>;

    /// DEK entry `version` of `provider`.
    fn dek(&self, provider: &str, version: u32) -> Result<Option<DekEntry>>;

    /// Every DEK entry (of one provider, and below a version), in key order.
    fn deks(&self, provider: Option<&str>, below: Option<u32>) -> Result<Vec<(String, DekEntry)>>;

    /// Records indexed under versions `from..to` of `provider`: (version, name), at
    /// most `limit`.
    fn indexed_under(&self, provider: &str, from: u32, to: u32, limit: usize) -> Result<Vec<(u32, String)>>;

    /// Number of records indexed under `version` of `provider`.
    fn count_indexed(&self, provider: &str, version: u32) -> Result<u64>;

    /// Index entries of records whose not-after is before `until`, soonest first, at
    /// most `limit`: (not-after, provider, name).
    fn expiring_before(&self, until: u64, limit: usize) -> Result<Vec<(u64, String, String)>>;

    /// The tombstone of (provider, name).
    fn tombstone(&self, provider: &str, name: &str) -> Result<Option<Tombstone>>;

    /// Every tombstone, in key order.
    fn tombstones(&self) -> Result<Vec<(String, String, Tombstone)>>;

    /// The refresh lease of (provider, name).
    fn lease(&self, provider: &str, name: &str) -> Result<Option<Lease>>;

    /// Stored audit entries with sequence ≥ `from`, in order.
    fn audit_entries(&self, from: u64) -> Result<Vec<(u64, Vec<u8>)>>;

    /// Number of stored audit entries.
    fn audit_count(&self) -> Result<u64>;

    /// The stored audit head, if any.
    fn audit_head(&self) -> Result<Option<Vec<u8>>>;

    /// Every row as stored (one snapshot), for a backup.
    fn dump(&self) -> Result<Dump>;

    /// Calls `f` with every row the authenticated state covers, as stored (see
    /// [`state`]).
    fn visit_covered(&self, f: &mut CoveredVisitor<'_>) -> Result<()>;

    /// The stored state head, if any.
    fn state_head(&self) -> Result<Option<Vec<u8>>>;

    /// The archive of earlier audit keys (sealed under the integrity key), if any.
    fn audit_archive(&self) -> Result<Option<Vec<u8>>>;

    /// The store's binding to its hardware rollback counter, if any.
    fn anchor(&self) -> Result<Option<schema::Anchor>>;
}

/// What a write transaction changes, on top of what it reads.
pub(crate) trait StoreWrite: StoreRead {
    /// Writes the records `build` returns for each (provider, name) of `keys`, given
    /// the index of the key and the record stored there now (if it parses), and moves
    /// each record's index entries with it. `build` returning `None` leaves that key
    /// unchanged (a compare-and-set that lost). Every new record must name its
    /// (provider, name) in its header. Returns how many records were written. The
    /// tables are opened once for the batch.
    fn put_records(&self, keys: &[(&str, &str)], build: &mut RecordBuilder<'_>) -> Result<usize>;

    /// Removes the record and its index entries; returns the old record's bytes.
    fn delete_record(&self, provider: &str, name: &str) -> Result<Option<Vec<u8>>>;

    /// Drops an index entry that no longer describes its record (the record is gone,
    /// or is sealed under another version). Returns whether it was stale.
    fn drop_stale_index(&self, provider: &str, version: u32, name: &str) -> Result<bool>;

    /// Drops a stale expiry index entry (the record is gone or has another not-after).
    fn drop_stale_expiry(&self, expires_at: u64, provider: &str, name: &str) -> Result<bool>;

    /// Inserts or replaces DEK entry `entry.version` of `provider`.
    fn put_dek(&self, provider: &str, entry: &DekEntry) -> Result<()>;

    /// Replaces the pinned roots and the wrapped integrity key together.
    fn put_roots(&self, roots: &[RootPin], integrity_key: &[RootWrapped]) -> Result<()>;

    /// Sets or removes the tombstone of (provider, name).
    fn put_tombstone(&self, provider: &str, name: &str, tombstone: Option<&Tombstone>) -> Result<()>;

    /// Removes the tombstones of `keys` (a put re-issuing revoked names), opening the
    /// table once.
    fn remove_tombstones(&self, keys: &[(&str, &str)]) -> Result<()>;

    /// Sets or removes the refresh lease of (provider, name).
    fn put_lease(&self, provider: &str, name: &str, lease: Option<Lease>) -> Result<()>;

    /// Appends audit entries (sequence number, stored bytes) and moves the head,
    /// together.
    fn append_audit(&self, entries: &[(u64, Vec<u8>)], head: &[u8]) -> Result<()>;

    /// Replaces the archive of earlier audit keys (a rotation of the integrity key).
    fn put_audit_archive(&self, sealed: &[u8]) -> Result<()>;

    /// Sets or removes the binding to the hardware rollback counter.
    fn put_anchor(&self, anchor: Option<&schema::Anchor>) -> Result<()>;
}
