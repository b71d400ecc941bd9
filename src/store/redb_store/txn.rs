//! The write transaction, and the record of every row it writes.
//!
//! The redb transaction is private to this module: a table is opened for writing only
//! through [`WriteTxn::write_table`], whose every insert and removal is kept, in order,
//! as a [`RowWrite`]. A commit's writes are then the whole of the change it makes —
//! covered rows, indexes, leases, audit entries, `meta` rows and the state head alike —
//! and [`apply`] makes them again on another copy of the store. That is the replay a
//! fleet host does from the log of write batches (docs/FLEET-DESIGN.md); the test
//! `a_copy_brought_forward_by_the_recorded_writes_equals_the_store` proves a copy so
//! brought forward equals the store byte for byte, so a write that went around the
//! recorder would show.

use std::borrow::Borrow;
use std::cell::RefCell;

use redb::{
    AccessGuard, Key, ReadableTable, StorageError, Table, TableDefinition, TableHandle, Value, WriteTransaction,
};

use super::{AUDIT, BY_DEK, BY_EXPIRY, DEKS, META, REFRESH_LEASES, TOKENS, TOMBSTONES, Tables};
use crate::error::{Error, Result};
use crate::seal::STORE_ID_LEN;
use crate::store::state::{self, Acc, Change, Mark, Row, RowKey, StateCell, StateKey};

/// A write transaction (committed by `Store::write`), with the accumulator delta of
/// the covered rows it changed and the record of every row it wrote.
pub(crate) struct WriteTxn {
    txn: WriteTransaction,
    pub(super) state: std::sync::Arc<StateCell>,
    pub(super) delta: RefCell<Acc>,
    pub(super) changes: RefCell<Vec<Change>>,
    pub(super) floor: u64,
    /// The rows written, when someone takes them (a batch sink is set): a bulk write
    /// (a restore, a rotation of many records) does not keep a copy otherwise.
    writes: Option<RefCell<Vec<RowWrite>>>,
}

/// One row written: its table (an index into [`TABLES`]), its key and its new value
/// (`None`: removed), in redb's own encodings of the table's types.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RowWrite {
    pub table: u8,
    pub key: Vec<u8>,
    pub value: Option<Vec<u8>>,
}

/// The tables of a store, in the order a [`RowWrite`] numbers them.
pub(crate) const TABLES: [&str; 8] =
    ["meta", "deks", "tokens", "by_dek", "by_expiry", "tombstones", "audit", "refresh_leases"];

/// A table opened for writing: every insert and removal is recorded. Reads go through
/// `Deref` to the table.
pub(super) struct Recorded<'t, K: Key + 'static, V: Value + 'static> {
    table: Table<'t, K, V>,
    id: u8,
    writes: Option<&'t RefCell<Vec<RowWrite>>>,
}

impl<K: Key + 'static, V: Value + 'static> Recorded<'_, K, V> {
    pub(super) fn insert<'k, 'v>(
        &mut self,
        key: impl Borrow<K::SelfType<'k>>,
        value: impl Borrow<V::SelfType<'v>>,
    ) -> std::result::Result<Option<AccessGuard<'_, V>>, StorageError> {
        if let Some(w) = self.writes {
            let k = K::as_bytes(key.borrow()).as_ref().to_vec();
            let v = V::as_bytes(value.borrow()).as_ref().to_vec();
            w.borrow_mut().push(RowWrite { table: self.id, key: k, value: Some(v) });
        }
        // A failed insert fails the transaction, and its batch with it.
        self.table.insert(key, value)
    }

    pub(super) fn remove<'k>(
        &mut self,
        key: impl Borrow<K::SelfType<'k>>,
    ) -> std::result::Result<Option<AccessGuard<'_, V>>, StorageError> {
        // Recorded whether or not the row was there: a replay then also clears a row
        // an earlier copy should not have.
        if let Some(w) = self.writes {
            let k = K::as_bytes(key.borrow()).as_ref().to_vec();
            w.borrow_mut().push(RowWrite { table: self.id, key: k, value: None });
        }
        self.table.remove(key)
    }
}

impl<'t, K: Key + 'static, V: Value + 'static> std::ops::Deref for Recorded<'t, K, V> {
    type Target = Table<'t, K, V>;

    fn deref(&self) -> &Table<'t, K, V> {
        &self.table
    }
}

impl WriteTxn {
    /// `record`: keep the rows written, for a batch sink.
    pub(super) fn new(txn: WriteTransaction, state: std::sync::Arc<StateCell>, record: bool) -> Self {
        // A write transaction sees the newest commit: everything seen so far.
        let floor = state.floor();
        WriteTxn {
            txn,
            state,
            delta: Default::default(),
            changes: Default::default(),
            floor,
            writes: record.then(RefCell::default),
        }
    }

    /// Opens `def` for writing (creating it if missing); what is written through it is
    /// recorded. The only way to write a table.
    pub(super) fn write_table<K: Key + 'static, V: Value + 'static>(
        &self,
        def: TableDefinition<'static, K, V>,
    ) -> Result<Recorded<'_, K, V>> {
        let id = table_id(def.name())?;
        Ok(Recorded { table: self.txn.open_table(def)?, id, writes: self.writes.as_ref() })
    }

    /// Calls `f` with the rows written so far, in order (none when not recording).
    pub(super) fn with_writes<R>(&self, f: impl FnOnce(&[RowWrite]) -> R) -> R {
        match &self.writes {
            Some(w) => f(&w.borrow()),
            None => f(&[]),
        }
    }

    pub(super) fn commit(self) -> Result<()> {
        Ok(self.txn.commit()?)
    }

    /// Makes a batch's rows in this transaction, unrecorded (see [`apply`]): the
    /// catch-up of a fleet host, whose state is checked before it commits.
    pub(super) fn replay(&self, writes: &[RowWrite]) -> Result<()> {
        apply(&self.txn, writes)
    }

    /// Moves the accumulator from a covered row's `old` value to its `new` one (either
    /// absent), and notes the change for this process's known state.
    pub(super) fn moved(&self, row: Row, k: RowKey<'_>, old: Option<&[u8]>, new: Option<&[u8]>) -> Result<()> {
        if old == new {
            return Ok(());
        }
        let armed = self.state.key()?;
        let (key, _) = &*armed;
        let mut delta = self.delta.borrow_mut();
        if let Some(o) = old {
            delta.sub(&key.row(row, k, o));
        }
        let change = match (row, k) {
            (Row::Record, RowKey::Name(p, n)) => {
                let mark = new.map(|v| Mark::of(key, p, n, v));
                if let Some(m) = &mark {
                    delta.add(&m.digest());
                }
                Change::Record { provider: p.to_owned(), name: n.to_owned(), mark }
            }
            _ => {
                let d = new.map(|v| key.row(row, k, v));
                if let Some(d) = &d {
                    delta.add(d);
                }
                Change::Row { key: state::owned_key(row, k), digest: d }
            }
        };
        self.changes.borrow_mut().push(change);
        Ok(())
    }
}

impl Tables for WriteTxn {
    fn table<K: Key + 'static, V: Value + 'static>(
        &self,
        def: TableDefinition<'static, K, V>,
    ) -> Result<Option<impl ReadableTable<K, V> + '_>> {
        Ok(Some(self.txn.open_table(def)?))
    }

    const WRITE: bool = true;

    fn checked(&self) -> Option<&StateCell> {
        Some(&self.state)
    }

    fn with_pending<R>(&self, f: impl FnOnce(&[Change]) -> R) -> R {
        f(&self.changes.borrow())
    }

    fn floor(&self) -> u64 {
        self.floor
    }
}

fn table_id(name: &str) -> Result<u8> {
    TABLES.iter().position(|t| *t == name).and_then(|i| u8::try_from(i).ok()).ok_or_else(|| Error::Store {
        operation: "table",
        detail: format!("a table outside the store's schema: {name}"),
    })
}

/// What [`visit_covered_writes`] calls: a covered row and its new value (`None`:
/// removed).
pub(super) type CoveredWrite<'a> = dyn FnMut(Row, RowKey<'_>, Option<&[u8]>) -> Result<()> + 'a;

/// The covered rows (what [`crate::store::state`]'s accumulator sums, as
/// `visit_covered` reads them) that `writes` set or remove, in order, each with its
/// new value (`None`: removed); the rows the state does not cover (indexes, audit
/// entries, leases, the rest of the metadata) are skipped. For writes [`apply`] took
/// (so their bytes decode as their tables' types).
pub(super) fn visit_covered_writes(writes: &[RowWrite], f: &mut CoveredWrite<'_>) -> Result<()> {
    for w in writes {
        let new = w.value.as_deref();
        match w.table {
            0 => {
                let key = <&str as redb::Value>::from_bytes(&w.key);
                let row = match key {
                    super::META_ROOTS => Row::Roots,
                    super::META_INTEGRITY_KEY => Row::IntegrityKey,
                    super::META_AUDIT_HEAD => Row::AuditHead,
                    super::META_AUDIT_ARCHIVE => Row::AuditArchive,
                    super::META_ANCHOR => Row::Anchor,
                    _ => continue,
                };
                f(row, RowKey::Single, new)?;
            }
            1 => {
                let (p, v) = <(&str, u32) as redb::Value>::from_bytes(&w.key);
                f(Row::Dek, RowKey::Version(p, v), new)?;
            }
            2 => {
                let (p, n) = <(&str, &str) as redb::Value>::from_bytes(&w.key);
                f(Row::Record, RowKey::Name(p, n), new)?;
            }
            5 => {
                let (p, n) = <(&str, &str) as redb::Value>::from_bytes(&w.key);
                f(Row::Tombstone, RowKey::Name(p, n), new)?;
            }
            _ => {}
        }
    }
    Ok(())
}

/// Makes `writes` (one commit's, in order) in `txn`: the replay of a write batch on
/// another copy of the store. What it leaves is unchecked until the transaction's
/// state is (the caller's part). A write whose bytes are not the canonical encoding
/// of its table's types (what the recorder makes) is an integrity error, never a
/// panic: two different batches never make the same change.
pub(crate) fn apply(txn: &WriteTransaction, writes: &[RowWrite]) -> Result<()> {
    fn one<K: Key + 'static, V: Value + 'static>(
        txn: &WriteTransaction,
        def: TableDefinition<'static, K, V>,
        w: &RowWrite,
    ) -> Result<()> {
        let bad = || Error::integrity("applying a write batch (a row not as the recorder writes it)");
        let key = K::from_bytes(&w.key);
        if K::as_bytes(&key).as_ref() != w.key.as_slice() {
            return Err(bad());
        }
        let mut t = txn.open_table(def)?;
        match &w.value {
            Some(v) => {
                let value = V::from_bytes(v);
                if V::as_bytes(&value).as_ref() != v.as_slice() {
                    return Err(bad());
                }
                drop(t.insert(key, value)?);
            }
            None => drop(t.remove(key)?),
        }
        Ok(())
    }
    // redb panics on bytes its types cannot hold (a short integer, a `&str` that is
    // not UTF-8, a length past the end): caught here, with a context of its own.
    let applied = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        for w in writes {
            match w.table {
                0 => one(txn, META, w)?,
                1 => one(txn, DEKS, w)?,
                2 => one(txn, TOKENS, w)?,
                3 => one(txn, BY_DEK, w)?,
                4 => one(txn, BY_EXPIRY, w)?,
                5 => one(txn, TOMBSTONES, w)?,
                6 => one(txn, AUDIT, w)?,
                7 => one(txn, REFRESH_LEASES, w)?,
                _ => return Err(Error::integrity("applying a write batch (a table outside the schema)")),
            }
        }
        Ok(())
    }));
    applied.unwrap_or_else(|_| Err(Error::integrity("applying a write batch (a row its table's types cannot hold)")))
}

/// The magic and version of an encoded write batch.
const BATCH_MAGIC: &[u8; 4] = b"TGW1";

/// Encodes one commit's writes: `TGW1`, a u32 count, then per write its table byte,
/// a u32 key length and the key, and a presence byte followed (when 1) by a u32 value
/// length and the value; integers big-endian.
pub(crate) fn encode_writes(writes: &[RowWrite]) -> Result<Vec<u8>> {
    let len = |n: usize| u32::try_from(n).map_err(|_| Error::InvalidInput("a write batch over 4 GiB".into()));
    let mut out = Vec::with_capacity(
        8 + writes.iter().map(|w| 10 + w.key.len() + w.value.as_ref().map_or(0, Vec::len)).sum::<usize>(),
    );
    out.extend_from_slice(BATCH_MAGIC);
    out.extend_from_slice(&len(writes.len())?.to_be_bytes());
    for w in writes {
        out.push(w.table);
        out.extend_from_slice(&len(w.key.len())?.to_be_bytes());
        out.extend_from_slice(&w.key);
        match &w.value {
            Some(v) => {
                out.push(1);
                out.extend_from_slice(&len(v.len())?.to_be_bytes());
                out.extend_from_slice(v);
            }
            None => out.push(0),
        }
    }
    Ok(out)
}

/// Decodes [`encode_writes`]' bytes; anything else (truncated, trailing bytes, an
/// unknown table or presence byte) is an integrity error.
pub(crate) fn decode_writes(mut b: &[u8]) -> Result<Vec<RowWrite>> {
    let bad = || Error::integrity("decoding a write batch");
    fn take<'a>(b: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        let (head, rest) = b.split_at_checked(n)?;
        *b = rest;
        Some(head)
    }
    fn u32_of(b: &mut &[u8]) -> Option<usize> {
        let v = u32::from_be_bytes(take(b, 4)?.try_into().ok()?);
        usize::try_from(v).ok()
    }
    if take(&mut b, 4) != Some(BATCH_MAGIC.as_slice()) {
        return Err(bad());
    }
    let count = u32_of(&mut b).ok_or_else(bad)?;
    // Each write takes 6 bytes at least: a count beyond that is a lie, not a reason
    // to reserve memory.
    if count > b.len() / 6 {
        return Err(bad());
    }
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let table = *take(&mut b, 1).ok_or_else(bad)?.first().ok_or_else(bad)?;
        if usize::from(table) >= TABLES.len() {
            return Err(bad());
        }
        let klen = u32_of(&mut b).ok_or_else(bad)?;
        let key = take(&mut b, klen).ok_or_else(bad)?.to_vec();
        let value = match take(&mut b, 1).ok_or_else(bad)? {
            [0] => None,
            [1] => {
                let vlen = u32_of(&mut b).ok_or_else(bad)?;
                Some(take(&mut b, vlen).ok_or_else(bad)?.to_vec())
            }
            _ => return Err(bad()),
        };
        out.push(RowWrite { table, key, value });
    }
    if !b.is_empty() {
        return Err(bad());
    }
    Ok(out)
}

/// One commit's writes sealed for the fleet log: what a batch sink is handed.
///
/// `TGB1 ‖ before (u64) ‖ after (u64) ‖ rows ‖ MAC`: the rows as [`encode_writes`]
/// makes them, the MAC (HMAC-SHA256, see `StateKey::batch_mac`) under the state key in
/// force *before* the batch, binding the store id, the state head the write built on
/// (so a batch fits only on the state it was written on: a losing batch kept by the
/// database cannot be spliced onto another branch) and everything before it. A host
/// checks the MAC before it decodes anything ([`open_batch`]); a batch that rotates
/// the integrity key is MAC'd under the old key, which every host that read the
/// batches before it holds.
#[derive(Clone)]
pub(crate) struct Batch {
    /// The generation the write built on.
    pub before: u64,
    /// The generation it ends on (the state head's, in the rows).
    pub after: u64,
    /// The sealed bytes.
    #[cfg_attr(
        not(any(test, feature = "postgres")),
        expect(dead_code, reason = "the fleet log (feature `postgres`) is its one reader")
    )]
    pub bytes: Vec<u8>,
    /// The encoded state head the write built on, and the one it ends on (also the
    /// last row of `bytes`): the log keeps each batch's head beside it, so that an
    /// append goes only on top of the very state it was built on.
    #[cfg_attr(not(feature = "postgres"), expect(dead_code, reason = "the fleet log is its one reader"))]
    pub prev_head: Vec<u8>,
    #[cfg_attr(not(feature = "postgres"), expect(dead_code, reason = "the fleet log is its one reader"))]
    pub head: Vec<u8>,
}

impl std::fmt::Debug for Batch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Sealed records only, but no reason to print them.
        f.debug_struct("Batch").field("before", &self.before).field("after", &self.after).finish_non_exhaustive()
    }
}

/// The magic and version of a sealed batch.
const SEALED_MAGIC: &[u8; 4] = b"TGB1";
/// Magic, before, after.
const SEALED_HEADER: usize = 4 + 8 + 8;
const SEALED_MAC: usize = 32;

/// Seals one commit's `writes` (see [`Batch`]).
pub(crate) fn seal_batch(
    key: &StateKey,
    store_id: &[u8; STORE_ID_LEN],
    prev_head: &[u8],
    head: &[u8],
    before: u64,
    after: u64,
    writes: &[RowWrite],
) -> Result<Batch> {
    let rows = encode_writes(writes)?;
    let mut bytes = Vec::with_capacity(SEALED_HEADER + rows.len() + SEALED_MAC);
    bytes.extend_from_slice(SEALED_MAGIC);
    bytes.extend_from_slice(&before.to_be_bytes());
    bytes.extend_from_slice(&after.to_be_bytes());
    bytes.extend_from_slice(&rows);
    let mac = key.batch_mac(store_id, prev_head, &bytes);
    bytes.extend_from_slice(&mac);
    Ok(Batch { before, after, bytes, prev_head: prev_head.to_vec(), head: head.to_vec() })
}

/// Checks a sealed batch's MAC under `key` on top of `prev_head` (the reader's own
/// state head), then decodes it: (before, after, rows). A batch of another store,
/// under another key, built on another state, edited, truncated or extended is an
/// integrity error, and nothing of it is decoded.
pub(crate) fn open_batch(
    key: &StateKey,
    store_id: &[u8; STORE_ID_LEN],
    prev_head: &[u8],
    bytes: &[u8],
) -> Result<(u64, u64, Vec<RowWrite>)> {
    let bad = || {
        Error::integrity(
            "verifying a write batch of the fleet log (edited, truncated, not this store's, or built on another \
             state than this host's)",
        )
    };
    let body_len = bytes.len().checked_sub(SEALED_MAC).filter(|n| *n >= SEALED_HEADER).ok_or_else(bad)?;
    let (body, mac) = bytes.split_at(body_len);
    if !key.batch_verify(store_id, prev_head, body, mac) {
        return Err(bad());
    }
    let (before, after) = batch_generations(bytes).ok_or_else(bad)?;
    Ok((before, after, decode_writes(body.get(SEALED_HEADER..).ok_or_else(bad)?)?))
}

/// The generations a sealed batch claims, unauthenticated: for ordering and error
/// messages only, never for a decision [`open_batch`] has not confirmed.
pub(crate) fn batch_generations(bytes: &[u8]) -> Option<(u64, u64)> {
    if bytes.get(..4)? != SEALED_MAGIC.as_slice() {
        return None;
    }
    let before = u64::from_be_bytes(bytes.get(4..12)?.try_into().ok()?);
    let after = u64::from_be_bytes(bytes.get(12..20)?.try_into().ok()?);
    Some((before, after))
}
