//! The redb implementation of [`StoreRead`] and [`StoreWrite`]: one file, created 0600
//! in a 0700 directory, opened shared (`MultiWriter`) or exclusive.

use std::fs;
use std::ops::Bound;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use redb::{
    Builder, ConcurrencyMode, Database, DatabaseError, Key, ReadTransaction, ReadableDatabase, ReadableTable,
    ReadableTableMetadata, TableDefinition, TableError, TransactionError, Value, WriteTransaction,
};

use super::schema::{self, DekEntry, RootPin, RootWrapped, Tombstone};
use super::{
    Dump, IndexKeys, Lease, RecordBuilder, RecordVisitor, SCHEMA_VERSION, StoreMeta, StoreMode, StoreOptions,
    StoreRead, StoreWrite,
};
use crate::error::{Error, Result};
use crate::seal::{RecordView, STORE_ID_LEN};

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const DEKS: TableDefinition<(&str, u32), &[u8]> = TableDefinition::new("deks");
const TOKENS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("tokens");
const BY_DEK: TableDefinition<(&str, u32, &str), ()> = TableDefinition::new("by_dek");
const BY_EXPIRY: TableDefinition<(u64, &str, &str), ()> = TableDefinition::new("by_expiry");
const TOMBSTONES: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("tombstones");
const AUDIT: TableDefinition<u64, &[u8]> = TableDefinition::new("audit");
const REFRESH_LEASES: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("refresh_leases");

const META_SCHEMA: &str = "schema_version";
const META_STORE_ID: &str = "store_id";
const META_ROOTS: &str = "roots";
const META_INTEGRITY_KEY: &str = "integrity_key";
const META_CREATED: &str = "created";
const META_AUDIT_HEAD: &str = "audit_head";

macro_rules! from_redb {
    ($($t:ty => $op:literal),* $(,)?) => {$(
        impl From<$t> for Error {
            fn from(e: $t) -> Self {
                match redb::Error::from(e) {
                    redb::Error::Corrupted(_) => Error::integrity("reading the store file"),
                    other => Error::Store { operation: $op, detail: other.to_string() },
                }
            }
        }
    )*};
}

from_redb!(
    redb::TransactionError => "transaction",
    redb::TableError => "table",
    redb::StorageError => "storage",
    redb::CommitError => "commit",
);

/// An open store.
pub(crate) struct Store {
    db: Database,
    path: PathBuf,
    opts: StoreOptions,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).field("mode", &self.opts.mode).finish()
    }
}

fn builder(opts: &StoreOptions) -> Builder {
    let mut b = Builder::new();
    b.set_concurrency_mode(match opts.mode {
        StoreMode::Shared => ConcurrencyMode::MultiWriter,
        StoreMode::Exclusive => ConcurrencyMode::ExclusiveWriter,
    });
    b
}

fn backoff(attempt: u32) -> Duration {
    Duration::from_millis((1u64 << attempt.min(6)).min(50))
}

fn waited_ms(start: Instant) -> u64 {
    u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX)
}

fn map_db_error(path: &Path, e: DatabaseError) -> Error {
    match e {
        DatabaseError::Storage(redb::StorageError::Io(io)) if io.kind() == std::io::ErrorKind::InvalidData => {
            Error::integrity("opening the store file (not a tokenguard store, or damaged)")
        }
        DatabaseError::Storage(redb::StorageError::Io(io)) => {
            Error::Io { operation: "opening store", path: path.into(), source: io }
        }
        DatabaseError::Storage(redb::StorageError::Corrupted(_)) => Error::integrity("opening the store file"),
        other => Error::Store { operation: "open", detail: other.to_string() },
    }
}

impl Store {
    /// Creates a new store file (mode 0600) in `path`'s directory (created 0700 when
    /// missing), writes `meta` and every table, then runs `then` in the same
    /// transaction (the first audit event, or a restore's rows). Fails if the file
    /// exists; a failure removes the half-made file.
    pub(crate) fn create(
        path: &Path,
        opts: StoreOptions,
        meta: &StoreMeta,
        created: u64,
        then: impl FnOnce(&WriteTxn) -> Result<()>,
    ) -> Result<Store> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
            && !dir.exists()
        {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(Error::io("creating store directory", dir))?;
        }
        let file =
            fs::OpenOptions::new().read(true).write(true).create_new(true).mode(0o600).open(path).map_err(|e| {
                if e.kind() == std::io::ErrorKind::AlreadyExists {
                    Error::StoreExists(path.into())
                } else {
                    Error::Io { operation: "creating store", path: path.into(), source: e }
                }
            })?;
        let made = (|| {
            let backend = redb::backends::FileBackend::new(file).map_err(|e| map_db_error(path, e))?;
            let db = builder(&opts).create_with_backend(backend).map_err(|e| map_db_error(path, e))?;
            let store = Store { db, path: path.into(), opts };
            store.write(|txn| {
                let mut m = txn.0.open_table(META)?;
                m.insert(META_SCHEMA, SCHEMA_VERSION.to_be_bytes().as_slice())?;
                m.insert(META_STORE_ID, meta.store_id.as_slice())?;
                m.insert(META_ROOTS, schema::encode_roots(&meta.roots).as_slice())?;
                m.insert(META_INTEGRITY_KEY, schema::encode_wrapped_key(&meta.integrity_key).as_slice())?;
                m.insert(META_CREATED, created.to_be_bytes().as_slice())?;
                drop(m);
                // Every table exists from the start, so readers never meet a missing one.
                txn.0.open_table(DEKS)?;
                txn.0.open_table(TOKENS)?;
                txn.0.open_table(BY_DEK)?;
                txn.0.open_table(BY_EXPIRY)?;
                txn.0.open_table(TOMBSTONES)?;
                txn.0.open_table(AUDIT)?;
                txn.0.open_table(REFRESH_LEASES)?;
                then(txn)
            })?;
            Ok(store)
        })();
        if made.is_err() {
            let _ = fs::remove_file(path);
        }
        made
    }

    /// Opens an existing store, waiting up to `busy_timeout` while another process
    /// holds it exclusively.
    pub(crate) fn open(path: &Path, opts: StoreOptions) -> Result<Store> {
        if !path.exists() {
            return Err(Error::NoStore(path.into()));
        }
        let start = Instant::now();
        let mut attempt = 0;
        loop {
            match builder(&opts).open(path) {
                Ok(db) => return Ok(Store { db, path: path.into(), opts }),
                Err(DatabaseError::DatabaseAlreadyOpen) | Err(DatabaseError::LockProtocolMismatch) => {
                    if start.elapsed() >= opts.busy_timeout {
                        return Err(Error::StoreBusy { path: path.into(), waited_ms: waited_ms(start) });
                    }
                    std::thread::sleep(backoff(attempt));
                    attempt += 1;
                }
                Err(e) => return Err(map_db_error(path, e)),
            }
        }
    }

    /// The store file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A consistent read snapshot.
    pub(crate) fn read(&self) -> Result<ReadTxn> {
        Ok(ReadTxn(self.db.begin_read()?))
    }

    /// Runs `f` in a write transaction and commits it durably. Waits at most
    /// `busy_timeout` for the write lock. An error from `f` aborts the transaction.
    pub(crate) fn write<T>(&self, f: impl FnOnce(&WriteTxn) -> Result<T>) -> Result<T> {
        let txn = WriteTxn(self.begin_write()?);
        let out = f(&txn)?;
        txn.0.commit()?;
        Ok(out)
    }

    fn begin_write(&self) -> Result<WriteTransaction> {
        let start = Instant::now();
        let mut attempt = 0;
        loop {
            match self.db.try_begin_write() {
                Ok(t) => return Ok(t),
                Err(TransactionError::WouldBlock) => {
                    if start.elapsed() >= self.opts.busy_timeout {
                        return Err(Error::StoreBusy { path: self.path.clone(), waited_ms: waited_ms(start) });
                    }
                    std::thread::sleep(backoff(attempt).min(Duration::from_millis(5)));
                    attempt += 1;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// File-system permission problems of the store file and its directory.
    pub fn permission_problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Ok(m) = fs::metadata(&self.path) {
            let mode = m.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                out.push(format!("store file {} has mode {mode:o}; expected 600", self.path.display()));
            }
        }
        if let Some(dir) = self.path.parent()
            && let Ok(m) = fs::metadata(dir)
        {
            let mode = m.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                out.push(format!("store directory {} has mode {mode:o}; expected 700", dir.display()));
            }
        }
        out
    }
}

/// A read snapshot.
pub(crate) struct ReadTxn(ReadTransaction);

/// A write transaction (committed by [`Store::write`]).
pub(crate) struct WriteTxn(WriteTransaction);

/// Opening a table for reading, the one thing the two transaction kinds do
/// differently; every read operation is written once on top of it.
trait Tables {
    fn table<K: Key + 'static, V: Value + 'static>(
        &self,
        def: TableDefinition<'static, K, V>,
    ) -> Result<Option<impl ReadableTable<K, V> + '_>>;
}

impl Tables for ReadTxn {
    fn table<K: Key + 'static, V: Value + 'static>(
        &self,
        def: TableDefinition<'static, K, V>,
    ) -> Result<Option<impl ReadableTable<K, V> + '_>> {
        match self.0.open_table(def) {
            Ok(t) => Ok(Some(t)),
            // A store restored by an older build may lack a table created later.
            Err(TableError::TableDoesNotExist(_)) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }
}

impl Tables for WriteTxn {
    fn table<K: Key + 'static, V: Value + 'static>(
        &self,
        def: TableDefinition<'static, K, V>,
    ) -> Result<Option<impl ReadableTable<K, V> + '_>> {
        Ok(Some(self.0.open_table(def)?))
    }
}

fn meta_value(t: &impl ReadableTable<&'static str, &'static [u8]>, key: &str) -> Result<Option<Vec<u8>>> {
    Ok(t.get(key)?.map(|v| v.value().to_vec()))
}

fn index_keys(v: &RecordView<'_>) -> IndexKeys {
    IndexKeys { dek_version: v.dek_version, expires_at: v.expires_at }
}

impl<T: Tables> StoreRead for T {
    fn meta(&self) -> Result<StoreMeta> {
        let missing = |what| move || Error::integrity(what);
        let t = self.table(META)?.ok_or_else(missing("reading the store metadata"))?;
        let schema_bytes = meta_value(&t, META_SCHEMA)?.ok_or_else(missing("reading the store schema version"))?;
        let schema_version = u32::from_be_bytes(
            schema_bytes.as_slice().try_into().map_err(|_| Error::integrity("reading the store schema version"))?,
        );
        if schema_version != SCHEMA_VERSION {
            return Err(Error::UnsupportedVersion { found: schema_version, supported: SCHEMA_VERSION });
        }
        let store_id: [u8; STORE_ID_LEN] = meta_value(&t, META_STORE_ID)?
            .and_then(|v| v.try_into().ok())
            .ok_or_else(missing("reading the store id"))?;
        let roots =
            schema::decode_roots(&meta_value(&t, META_ROOTS)?.ok_or_else(missing("reading the pinned roots"))?)?;
        let integrity_key = schema::decode_wrapped_key(
            &meta_value(&t, META_INTEGRITY_KEY)?.ok_or_else(missing("reading the integrity key"))?,
        )?;
        Ok(StoreMeta { store_id, roots, integrity_key })
    }

    fn roots(&self) -> Result<Vec<RootPin>> {
        let t = self.table(META)?.ok_or_else(|| Error::integrity("reading the pinned roots"))?;
        schema::decode_roots(&meta_value(&t, META_ROOTS)?.ok_or_else(|| Error::integrity("reading the pinned roots"))?)
    }

    fn with_record<R>(
        &self,
        provider: &str,
        name: &str,
        f: impl FnOnce(&RecordView<'_>) -> Result<R>,
    ) -> Result<Option<R>> {
        let Some(t) = self.table(TOKENS)? else { return Ok(None) };
        let Some(guard) = t.get((provider, name))? else { return Ok(None) };
        let view = RecordView::parse(guard.value())?;
        // The AAD binds the header to the ciphertext; this binds the header to the key
        // the record is stored under, so a record copied to another slot fails.
        if view.provider != provider || view.name != name {
            return Err(Error::integrity("checking a record's place"));
        }
        f(&view).map(Some)
    }

    fn scan_records(&self, provider: Option<&str>, f: &mut RecordVisitor<'_>) -> Result<()> {
        let Some(t) = self.table(TOKENS)? else { return Ok(()) };
        let iter = match provider {
            Some(p) => t.range((p, "")..)?,
            None => t.range::<(&str, &str)>(..)?,
        };
        for item in iter {
            let (k, v) = item?;
            let (p, n) = k.value();
            if provider.is_some_and(|want| want != p) {
                break;
            }
            let view = RecordView::parse(v.value()).and_then(|view| {
                if view.provider != p || view.name != n {
                    return Err(Error::integrity("checking a record's place"));
                }
                Ok(view)
            });
            if f(p, n, view)?.is_break() {
                break;
            }
        }
        Ok(())
    }

    fn dek(&self, provider: &str, version: u32) -> Result<Option<DekEntry>> {
        let Some(t) = self.table(DEKS)? else { return Ok(None) };
        let Some(v) = t.get((provider, version))? else { return Ok(None) };
        let e = DekEntry::decode(v.value())?;
        if e.version != version {
            return Err(Error::integrity("checking a data key's version"));
        }
        Ok(Some(e))
    }

    fn deks(&self, provider: Option<&str>, below: Option<u32>) -> Result<Vec<(String, DekEntry)>> {
        let Some(t) = self.table(DEKS)? else { return Ok(Vec::new()) };
        type DekKey<'k> = (&'k str, u32);
        let range: (Bound<DekKey<'_>>, Bound<DekKey<'_>>) = match (provider, below) {
            (Some(p), Some(b)) => (Bound::Included((p, 0)), Bound::Excluded((p, b))),
            (Some(p), None) => (Bound::Included((p, 0)), Bound::Included((p, u32::MAX))),
            (None, _) => (Bound::Unbounded, Bound::Unbounded),
        };
        let mut out = Vec::new();
        for item in t.range(range)? {
            let (k, v) = item?;
            let (p, ver) = k.value();
            if provider.is_none() && below.is_some_and(|b| ver >= b) {
                continue;
            }
            let e = DekEntry::decode(v.value())?;
            if e.version != ver {
                return Err(Error::integrity("checking a data key's version"));
            }
            out.push((p.to_string(), e));
        }
        Ok(out)
    }

    fn indexed_under(&self, provider: &str, from: u32, to: u32, limit: usize) -> Result<Vec<(u32, String)>> {
        let Some(t) = self.table(BY_DEK)? else { return Ok(Vec::new()) };
        let mut out = Vec::new();
        for item in t.range((provider, from, "")..(provider, to, ""))?.take(limit) {
            let (k, _) = item?;
            let (_, ver, name) = k.value();
            out.push((ver, name.to_string()));
        }
        Ok(out)
    }

    fn count_indexed(&self, provider: &str, version: u32) -> Result<u64> {
        let Some(t) = self.table(BY_DEK)? else { return Ok(0) };
        let mut n = 0;
        for item in t.range((provider, version, "")..)? {
            let (k, _) = item?;
            let (p, v, _) = k.value();
            if p != provider || v != version {
                break;
            }
            n += 1;
        }
        Ok(n)
    }

    fn expiring_before(&self, until: u64, limit: usize) -> Result<Vec<(u64, String, String)>> {
        let Some(t) = self.table(BY_EXPIRY)? else { return Ok(Vec::new()) };
        let mut out = Vec::new();
        for item in t.range((0u64, "", "")..(until, "", ""))?.take(limit) {
            let (k, _) = item?;
            let (at, p, n) = k.value();
            out.push((at, p.to_string(), n.to_string()));
        }
        Ok(out)
    }

    fn tombstone(&self, provider: &str, name: &str) -> Result<Option<Tombstone>> {
        let Some(t) = self.table(TOMBSTONES)? else { return Ok(None) };
        let Some(v) = t.get((provider, name))? else { return Ok(None) };
        Tombstone::decode(v.value()).map(Some)
    }

    fn tombstones(&self) -> Result<Vec<(String, String, Tombstone)>> {
        let Some(t) = self.table(TOMBSTONES)? else { return Ok(Vec::new()) };
        let mut out = Vec::new();
        for item in t.iter()? {
            let (k, v) = item?;
            let (p, n) = k.value();
            out.push((p.to_string(), n.to_string(), Tombstone::decode(v.value())?));
        }
        Ok(out)
    }

    fn lease(&self, provider: &str, name: &str) -> Result<Option<Lease>> {
        let Some(t) = self.table(REFRESH_LEASES)? else { return Ok(None) };
        Ok(t.get((provider, name))?.and_then(|v| schema::decode_lease(v.value())))
    }

    fn audit_entries(&self, from: u64) -> Result<Vec<(u64, Vec<u8>)>> {
        let Some(t) = self.table(AUDIT)? else { return Ok(Vec::new()) };
        let mut out = Vec::new();
        for item in t.range(from..)? {
            let (k, v) = item?;
            out.push((k.value(), v.value().to_vec()));
        }
        Ok(out)
    }

    fn audit_count(&self) -> Result<u64> {
        Ok(match self.table(AUDIT)? {
            Some(t) => t.len()?,
            None => 0,
        })
    }

    fn audit_head(&self) -> Result<Option<Vec<u8>>> {
        let Some(t) = self.table(META)? else { return Ok(None) };
        meta_value(&t, META_AUDIT_HEAD)
    }

    fn dump(&self) -> Result<Dump> {
        let meta_t = self.table(META)?.ok_or_else(|| Error::integrity("reading store metadata"))?;
        let need = |k| meta_value(&meta_t, k)?.ok_or_else(|| Error::integrity("reading store metadata"));
        let mut d = Dump {
            store_id: self.meta()?.store_id,
            roots: need(META_ROOTS)?,
            integrity_key: need(META_INTEGRITY_KEY)?,
            audit_head: meta_value(&meta_t, META_AUDIT_HEAD)?.unwrap_or_default(),
            ..Dump::default()
        };
        if let Some(t) = self.table(DEKS)? {
            for item in t.iter()? {
                let (k, v) = item?;
                let (p, ver) = k.value();
                d.deks.push((p.into(), ver, v.value().to_vec()));
            }
        }
        if let Some(t) = self.table(TOKENS)? {
            for item in t.iter()? {
                let (k, v) = item?;
                let (p, n) = k.value();
                d.tokens.push((p.into(), n.into(), v.value().to_vec()));
            }
        }
        if let Some(t) = self.table(TOMBSTONES)? {
            for item in t.iter()? {
                let (k, v) = item?;
                let (p, n) = k.value();
                d.tombstones.push((p.into(), n.into(), v.value().to_vec()));
            }
        }
        d.audit = self.audit_entries(0)?;
        Ok(d)
    }
}

impl StoreWrite for WriteTxn {
    fn put_records(&self, keys: &[(&str, &str)], build: &mut RecordBuilder<'_>) -> Result<usize> {
        let mut tokens = self.0.open_table(TOKENS)?;
        let mut by_dek = self.0.open_table(BY_DEK)?;
        let mut by_exp = self.0.open_table(BY_EXPIRY)?;
        let mut written = 0;
        for (i, &(provider, name)) in keys.iter().enumerate() {
            let (new, old_idx) = {
                let guard = tokens.get((provider, name))?;
                // A damaged old record is replaced; its index entries cannot be known,
                // so stale ones stay for the index users to skip.
                let old = guard.as_ref().and_then(|g| RecordView::parse(g.value()).ok());
                let old = old.filter(|v| v.provider == provider && v.name == name);
                (build(i, old.as_ref())?, old.as_ref().map(index_keys))
            };
            let Some(new) = new else { continue };
            let view = RecordView::parse(&new)?;
            if view.provider != provider || view.name != name {
                return Err(Error::integrity("checking a record's place"));
            }
            let idx = index_keys(&view);
            tokens.insert((provider, name), new.as_slice())?;
            if let Some(old) = old_idx {
                by_dek.remove((provider, old.dek_version, name))?;
                if let Some(e) = old.expires_at {
                    by_exp.remove((e, provider, name))?;
                }
            }
            by_dek.insert((provider, idx.dek_version, name), ())?;
            if let Some(e) = idx.expires_at {
                by_exp.insert((e, provider, name), ())?;
            }
            written += 1;
        }
        Ok(written)
    }

    fn delete_record(&self, provider: &str, name: &str) -> Result<Option<Vec<u8>>> {
        let old = self.0.open_table(TOKENS)?.remove((provider, name))?.map(|g| g.value().to_vec());
        if let Some(view) = old.as_deref().and_then(|b| RecordView::parse(b).ok()) {
            self.0.open_table(BY_DEK)?.remove((provider, view.dek_version, name))?;
            if let Some(e) = view.expires_at {
                self.0.open_table(BY_EXPIRY)?.remove((e, provider, name))?;
            }
        }
        Ok(old)
    }

    fn drop_stale_index(&self, provider: &str, version: u32, name: &str) -> Result<bool> {
        let current = self.with_record(provider, name, |v| Ok(v.dek_version)).unwrap_or(None);
        if current == Some(version) {
            return Ok(false);
        }
        self.0.open_table(BY_DEK)?.remove((provider, version, name))?;
        Ok(true)
    }

    fn drop_stale_expiry(&self, expires_at: u64, provider: &str, name: &str) -> Result<bool> {
        let current = self.with_record(provider, name, |v| Ok(v.expires_at)).unwrap_or(None);
        if current == Some(Some(expires_at)) {
            return Ok(false);
        }
        self.0.open_table(BY_EXPIRY)?.remove((expires_at, provider, name))?;
        Ok(true)
    }

    fn put_dek(&self, provider: &str, entry: &DekEntry) -> Result<()> {
        self.0.open_table(DEKS)?.insert((provider, entry.version), entry.encode().as_slice())?;
        Ok(())
    }

    fn put_roots(&self, roots: &[RootPin], integrity_key: &[RootWrapped]) -> Result<()> {
        let mut m = self.0.open_table(META)?;
        m.insert(META_ROOTS, schema::encode_roots(roots).as_slice())?;
        m.insert(META_INTEGRITY_KEY, schema::encode_wrapped_key(integrity_key).as_slice())?;
        Ok(())
    }

    fn put_tombstone(&self, provider: &str, name: &str, tombstone: Option<&Tombstone>) -> Result<()> {
        let mut t = self.0.open_table(TOMBSTONES)?;
        match tombstone {
            Some(ts) => t.insert((provider, name), ts.encode().as_slice())?,
            None => t.remove((provider, name))?,
        };
        Ok(())
    }

    fn remove_tombstones(&self, keys: &[(&str, &str)]) -> Result<()> {
        let mut t = self.0.open_table(TOMBSTONES)?;
        for k in keys {
            t.remove(*k)?;
        }
        Ok(())
    }

    fn put_lease(&self, provider: &str, name: &str, lease: Option<Lease>) -> Result<()> {
        let mut t = self.0.open_table(REFRESH_LEASES)?;
        match lease {
            Some(l) => t.insert((provider, name), schema::encode_lease(&l).as_slice())?,
            None => t.remove((provider, name))?,
        };
        Ok(())
    }

    fn append_audit(&self, seq: u64, entry: &[u8], head: &[u8]) -> Result<()> {
        self.0.open_table(AUDIT)?.insert(seq, entry)?;
        self.0.open_table(META)?.insert(META_AUDIT_HEAD, head)?;
        Ok(())
    }
}

impl WriteTxn {
    /// Writes a backup's rows into this (new) store: DEK entries, records with their
    /// indexes rebuilt from the records themselves, tombstones, the audit chain and
    /// its head, all verbatim.
    pub(crate) fn load(&self, d: &Dump) -> Result<()> {
        for (p, _, v) in &d.deks {
            self.put_dek(p, &DekEntry::decode(v)?)?;
        }
        let keys: Vec<(&str, &str)> = d.tokens.iter().map(|(p, n, _)| (p.as_str(), n.as_str())).collect();
        self.put_records(&keys, &mut |i, _| Ok(d.tokens.get(i).map(|(_, _, v)| v.clone())))?;
        for (p, n, v) in &d.tombstones {
            self.put_tombstone(p, n, Some(&Tombstone::decode(v)?))?;
        }
        let mut audit = self.0.open_table(AUDIT)?;
        for (seq, v) in &d.audit {
            audit.insert(*seq, v.as_slice())?;
        }
        if !d.audit_head.is_empty() {
            self.0.open_table(META)?.insert(META_AUDIT_HEAD, d.audit_head.as_slice())?;
        }
        Ok(())
    }
}
