//! The redb store: one file, created 0600 in a 0700 directory, its tables, and
//! transactions that never hang.
//!
//! Tables (docs/FORMAT.md §store):
//! - `meta`: schema version, store id, pinned roots, the wrapped integrity key;
//! - `deks`: (provider, version) → [`schema::DekEntry`];
//! - `tokens`: (provider, name) → sealed record ([`crate::seal`]);
//! - `by_dek`: (provider, version, name) → () — "which records still use version N";
//! - `by_expiry`: (not-after, provider, name) → () — "what expires within T";
//! - `tombstones`: (provider, name) → revocation tombstone;
//! - `audit`: sequence → MAC-chained event ([`crate::audit`]);
//! - `refresh_leases`: (provider, name) → which process is refreshing it, until when.
//!
//! Concurrency: by default the file is opened in redb's `MultiWriter` mode, so the CLI
//! can work on a store a service holds open; one write transaction runs at a time
//! across processes. `exclusive` mode is the faster single-process option (FACTS:
//! ~1.7 µs vs ~5 µs per read transaction). Every open and every write waits at most
//! `busy_timeout`, then fails with [`Error::StoreBusy`]: never a hang.

pub mod schema;

use std::fs;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use redb::{
    Builder, ConcurrencyMode, Database, DatabaseError, ReadTransaction, ReadableDatabase, TableDefinition,
    TransactionError, WriteTransaction,
};

use crate::error::{Error, Result};

/// Schema version written by this build.
pub const SCHEMA_VERSION: u32 = 1;

pub(crate) const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
pub(crate) const DEKS: TableDefinition<(&str, u32), &[u8]> = TableDefinition::new("deks");
pub(crate) const TOKENS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("tokens");
pub(crate) const BY_DEK: TableDefinition<(&str, u32, &str), ()> = TableDefinition::new("by_dek");
pub(crate) const BY_EXPIRY: TableDefinition<(u64, &str, &str), ()> = TableDefinition::new("by_expiry");
pub(crate) const TOMBSTONES: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("tombstones");
pub(crate) const AUDIT: TableDefinition<u64, &[u8]> = TableDefinition::new("audit");
pub(crate) const REFRESH_LEASES: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("refresh_leases");

pub(crate) const META_SCHEMA: &str = "schema_version";
pub(crate) const META_STORE_ID: &str = "store_id";
pub(crate) const META_ROOTS: &str = "roots";
pub(crate) const META_INTEGRITY_KEY: &str = "integrity_key";
pub(crate) const META_CREATED: &str = "created";

/// How processes share the store file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StoreMode {
    /// Several processes may read and write (redb `MultiWriter`). The default.
    #[default]
    Shared,
    /// This process alone (redb `ExclusiveWriter`): faster reads; others get "busy".
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

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions { mode: StoreMode::Shared, busy_timeout: Duration::from_secs(5) }
    }
}

/// An open store.
pub struct Store {
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
    /// missing). Fails if the file exists.
    pub fn create(path: &Path, opts: StoreOptions) -> Result<Store> {
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
        let backend = redb::backends::FileBackend::new(file).map_err(|e| map_db_error(path, e))?;
        let db = builder(&opts).create_with_backend(backend).map_err(|e| map_db_error(path, e))?;
        Ok(Store { db, path: path.into(), opts })
    }

    /// Opens an existing store, waiting up to `busy_timeout` while another process
    /// holds it exclusively.
    pub fn open(path: &Path, opts: StoreOptions) -> Result<Store> {
        if !path.exists() {
            return Err(Error::NoStore(path.into()));
        }
        let start = Instant::now();
        let mut attempt = 0;
        loop {
            match builder(&opts).open(path) {
                Ok(db) => {
                    return Ok(Store { db, path: path.into(), opts });
                }
                Err(DatabaseError::DatabaseAlreadyOpen) | Err(DatabaseError::LockProtocolMismatch) => {
                    if start.elapsed() >= opts.busy_timeout {
                        return Err(Error::StoreBusy {
                            path: path.into(),
                            waited_ms: start.elapsed().as_millis() as u64,
                        });
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

    /// Options in force.
    pub fn options(&self) -> StoreOptions {
        self.opts
    }

    /// A consistent read snapshot.
    pub fn read(&self) -> Result<ReadTransaction> {
        Ok(self.db.begin_read()?)
    }

    /// Runs `f` in a write transaction and commits it durably. Waits at most
    /// `busy_timeout` for the write lock. An error from `f` aborts the transaction.
    pub fn write<T>(&self, f: impl FnOnce(&WriteTransaction) -> Result<T>) -> Result<T> {
        let txn = self.begin_write()?;
        let out = f(&txn)?;
        txn.commit()?;
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
                        return Err(Error::StoreBusy {
                            path: self.path.clone(),
                            waited_ms: start.elapsed().as_millis() as u64,
                        });
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

    /// redb's own structural check (B-tree and checksums). Needs exclusive access.
    pub fn check_file_integrity(path: &Path) -> Result<bool> {
        let mut db = builder(&StoreOptions { mode: StoreMode::Exclusive, ..Default::default() }).open(path).map_err(
            |e| match e {
                DatabaseError::DatabaseAlreadyOpen => Error::StoreBusy { path: path.into(), waited_ms: 0 },
                e => map_db_error(path, e),
            },
        )?;
        db.check_integrity().map_err(|e| map_db_error(path, e))
    }
}

/// Reads a meta value in a read transaction.
pub(crate) fn meta_get(txn: &ReadTransaction, key: &str) -> Result<Option<Vec<u8>>> {
    let t = match txn.open_table(META) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    Ok(t.get(key)?.map(|v| v.value().to_vec()))
}
