//! The redb implementation of [`StoreRead`] and [`StoreWrite`]: one file, created 0600
//! in a 0700 directory, opened shared (`MultiWriter`) or exclusive.

//!
//! `mod.rs` holds the file, its tables and the transactions; `read.rs` the read
//! operations (written once for both transaction kinds), `write.rs` the writes.

mod link;
mod read;
mod snapshots;
pub(crate) mod txn;
mod write;

#[cfg(all(test, feature = "postgres"))]
pub(crate) use link::ListenerHealth;
#[cfg(feature = "postgres")]
pub(crate) use link::Watch;
pub(crate) use link::{FleetHealth, Follower, Link, Log, Starter};
pub(crate) use txn::WriteTxn;

use std::fs;
use std::ops::Bound;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use redb::{
    Builder, ConcurrencyMode, Database, DatabaseError, Key, ReadTransaction, ReadableDatabase, ReadableTable,
    ReadableTableMetadata, TableDefinition, TableError, TransactionError, Value, WriteTransaction,
};

use super::anchor::{CounterLock, Position};
use super::journal::{Appended, Journal};
use super::schema::{self, Anchor, DekEntry, RootPin, RootWrapped, Tombstone};
use super::state::{self, Acc, Change, Head, Row, RowKey, StateCell, StateCheck, StateKey, StateReport};
use super::{
    CoveredVisitor, Dump, IndexKeys, Lease, RecordBuilder, RecordVisitor, SCHEMA_VERSION, StoreMeta, StoreMode,
    StoreOptions, StoreRead, StoreWrite,
};
use crate::error::{Error, Result};
use crate::seal::{RecordView, STORE_ID_LEN};

pub(crate) const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
pub(crate) const DEKS: TableDefinition<(&str, u32), &[u8]> = TableDefinition::new("deks");
pub(crate) const TOKENS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("tokens");
pub(crate) const BY_DEK: TableDefinition<(&str, u32, &str), ()> = TableDefinition::new("by_dek");
pub(crate) const BY_EXPIRY: TableDefinition<(u64, &str, &str), ()> = TableDefinition::new("by_expiry");
pub(crate) const TOMBSTONES: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("tombstones");
pub(crate) const AUDIT: TableDefinition<u64, &[u8]> = TableDefinition::new("audit");
pub(crate) const REFRESH_LEASES: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("refresh_leases");

pub(super) const META_SCHEMA: &str = "schema_version";
pub(super) const META_STORE_ID: &str = "store_id";
pub(super) const META_ROOTS: &str = "roots";
pub(super) const META_INTEGRITY_KEY: &str = "integrity_key";
pub(super) const META_CREATED: &str = "created";
pub(super) const META_AUDIT_HEAD: &str = "audit_head";
pub(super) const META_STATE_HEAD: &str = "state_head";
pub(super) const META_AUDIT_ARCHIVE: &str = "audit_archive";
pub(super) const META_ANCHOR: &str = "anchor";
/// Present in a fleet host's copy (written when it joins its log; not a covered
/// row): a handle of it that is not joined to the log reads and writes nothing.
pub(super) const META_FLEET_MEMBER: &str = "fleet_member";

macro_rules! from_redb {
    ($($t:ty => $op:literal),* $(,)?) => {$(
        impl From<$t> for Error {
            fn from(e: $t) -> Self {
                match redb::Error::from(e) {
                    redb::Error::Corrupted(_) => Error::integrity("reading the store file"),
                    // The file system said no (full, read-only, …): keep the cause, so
                    // the message and the hint can say what to do.
                    redb::Error::Io(io) => Error::Io { operation: concat!("store ", $op), path: "the store file".into(), source: io },
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
    /// Kept read snapshots (exclusive mode); declared before `db`, so they end first.
    snapshots: snapshots::Snapshots,
    db: Database,
    /// Set when an engine panic was caught during a write: no later write commits.
    poisoned: std::sync::atomic::AtomicBool,
    /// The authenticated state this process has verified (see `store::state`).
    state: std::sync::Arc<StateCell>,
    /// The root whose hardware counter the store is bound to, as configured in this
    /// process (see `store::anchor`).
    counter: std::sync::Mutex<Option<CounterRoot>>,
    /// What the open found wrong with the counter, when it let that through.
    counter_problem: std::sync::Mutex<Option<String>>,
    /// The queue of this process's writers (see `write_inner`).
    writers: parking_lot::Mutex<()>,
    /// The read journal, when the owner of an exclusive store attached one: every
    /// write folds it in first (see `store::journal`). Taken after `writers`.
    journal: parking_lot::Mutex<Option<Journal>>,
    /// Why this handle may not write: an open (for inspection) could not fold a read
    /// journal left by a crash (a write would take the sequence numbers of the events
    /// in it), or another host changed the pinned roots (`block_writes`).
    unfolded: parking_lot::Mutex<Option<String>>,
    /// The fleet log this store is a copy of, when it is one (see `link`).
    link: std::sync::OnceLock<Link>,
    /// The file is a fleet host's copy ([`META_FLEET_MEMBER`]), found when the
    /// owner armed the check: reads and writes need the link.
    fleet_member: std::sync::atomic::AtomicBool,
    path: PathBuf,
    opts: StoreOptions,
}

/// Given the store's generation and its state head's bytes, the batches of the log
/// after it, in order (see `Store::catch_up`).
type Fetch<'a> = dyn FnMut(u64, &[u8]) -> Result<Vec<Vec<u8>>> + 'a;

/// What [`Store::catch_up`] did: the generations before and after.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CaughtUp {
    pub before: u64,
    pub after: u64,
    /// A batch rotated the integrity key: the state key is the new one from now on.
    pub rekeyed: bool,
}

/// A root that offers a [`crate::root::MonotonicCounter`].
pub(crate) type CounterRoot = std::sync::Arc<dyn crate::root::RootKey>;

/// How a write treats the rollback anchor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AnchorWrite {
    /// Moves it one step with the commit when the store is bound; a bound store with
    /// no counter configured is not written.
    Advance,
    /// Binds the store to the configured counter, which must not exist yet (`init`, a
    /// plain `upgrade`): an existing counter may be another store's, or this one's
    /// from before an older copy was put back.
    BindNew,
    /// Binds the store to the configured counter at its current value, making it if
    /// needed, or unbinds it when none is configured: `restore`, `salvage`, and
    /// `upgrade --accept-current-state`.
    Rebind,
}

/// How a write computes its new head: the generations before and after, and the
/// head's bytes.
type Seal<'a> = dyn Fn(&WriteTxn) -> Result<(u64, u64, Vec<u8>)> + 'a;

/// What every attempt of one write shares (`Store::write_inner`).
struct Attempt<'a> {
    resealed: bool,
    anchor: AnchorWrite,
    counter: Option<&'a CounterRoot>,
    start: Instant,
    /// Told when a run of the body ends without a commit, before its transaction.
    abandoned: &'a dyn Fn(),
}

/// Calls its function when dropped, unless disarmed.
struct OnDrop<'a>(Option<&'a dyn Fn()>);

impl OnDrop<'_> {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for OnDrop<'_> {
    fn drop(&mut self) {
        if let Some(f) = self.0.take() {
            f();
        }
    }
}

/// How an attempt reaches the fleet log.
enum Via<'a> {
    /// Under the log's lock (held since before the copy caught up), or with no log.
    Locked(Option<link::Held<'a>>),
    /// Without the lock: the batch's insert decides (an optimistic write).
    Alone(&'a link::Link),
}

/// How an attempt ended.
enum Tried<T> {
    /// Committed (in the log first, for a copy of one).
    Done(T),
    /// `f`'s answer, from the copy as it was at generation `read_at` (alone; 0
    /// under the lock), with nothing written: `f` changed nothing or failed.
    Unconfirmed { answer: Result<T>, read_at: u64 },
    /// Alone, and another writer was first: nothing written anywhere.
    Lost,
}

/// Where a store stands against its rollback counter (`doctor`, open).
#[derive(Debug)]
pub(crate) enum CounterStatus {
    /// No counter configured and the store is not bound to one.
    Unbound,
    /// A counter is configured; the store is not bound to it yet (`upgrade` binds).
    NotBound { counter_id: String },
    /// Bound, and the counter agrees.
    Current { counter_id: String, value: u64 },
    /// Bound; the last commit's increment had not happened and was finished now.
    Finished { counter_id: String, value: u64 },
    /// The store and the counter disagree (or one is missing).
    Wrong(Error),
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).field("mode", &self.opts.mode).finish()
    }
}

/// Runs one storage-engine operation. redb answers some damage in a file (a page
/// of zeros, garbage where a B-tree node should be) with a panic rather than an
/// error; that is a damaged store, reported as one — never a crash of the caller.
pub(super) fn engine<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|_| Err(Error::integrity(PANIC_CONTEXT)))
}

/// `f` as a write body that runs once (`Store::write_inner` runs it again only when
/// told it may).
fn once<T>(f: impl FnOnce(&WriteTxn) -> Result<T>) -> impl FnMut(&WriteTxn) -> Result<T> {
    let mut f = Some(f);
    move |txn| match f.take() {
        Some(f) => f(txn),
        None => Err(Error::integrity("running a write transaction twice")),
    }
}

/// The context of an integrity error that stands for a caught engine panic.
const PANIC_CONTEXT: &str = "reading the store file (a damaged page)";

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
    /// transaction (the first audit event, or a restore's rows), and seals the first
    /// state head under `key`. Fails if the file exists; a failure removes the
    /// half-made file.
    pub(crate) fn create(
        path: &Path,
        opts: StoreOptions,
        meta: &StoreMeta,
        key: StateKey,
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
            let store = Store::new(db, path, opts);
            // A journal left at this path by a store that is gone belongs to no chain
            // of this one: marked empty, so that no open reports its frames.
            super::journal::clear(path)?;
            store.state.key_for_creation(key, meta.store_id);
            store.write_from(Some(state::GENESIS), |txn| {
                let mut m = txn.write_table(META)?;
                m.insert(META_SCHEMA, SCHEMA_VERSION.to_be_bytes().as_slice())?;
                m.insert(META_STORE_ID, meta.store_id.as_slice())?;
                m.insert(META_CREATED, created.to_be_bytes().as_slice())?;
                drop(m);
                txn.put_roots(&meta.roots, &meta.integrity_key)?;
                // Every table exists from the start, so readers never meet a missing one.
                txn.write_table(DEKS)?;
                txn.write_table(TOKENS)?;
                txn.write_table(BY_DEK)?;
                txn.write_table(BY_EXPIRY)?;
                txn.write_table(TOMBSTONES)?;
                txn.write_table(AUDIT)?;
                txn.write_table(REFRESH_LEASES)?;
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
            let opened = std::panic::catch_unwind(|| builder(&opts).open(path))
                .map_err(|_| Error::integrity("opening the store file (a damaged page)"))?;
            match opened {
                Ok(db) => return Ok(Store::new(db, path, opts)),
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

    fn new(db: Database, path: &Path, opts: StoreOptions) -> Store {
        Store {
            snapshots: snapshots::Snapshots::new(opts.mode == StoreMode::Exclusive),
            db,
            path: path.into(),
            opts,
            poisoned: Default::default(),
            state: Default::default(),
            counter: Default::default(),
            counter_problem: Default::default(),
            writers: parking_lot::Mutex::new(()),
            journal: parking_lot::Mutex::new(None),
            unfolded: parking_lot::Mutex::new(None),
            link: std::sync::OnceLock::new(),
            fleet_member: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Hands every later write's batch to `sink` before the write commits here (a
    /// link that records only; see `link`).
    #[cfg(test)]
    pub(crate) fn set_batch_sink(&self, sink: impl FnMut(&txn::Batch) -> Result<()> + Send + 'static) -> Result<()> {
        self.set_link(Link::recording(sink))
    }

    /// Refuses every later write of this handle: the read journal left by a crash
    /// could not be folded (`why`).
    pub(crate) fn block_writes_unfolded(&self, why: String) {
        self.block_writes(format!(
            "not writing: the read journal a crashed agent left could not be folded into the audit trail ({why}); \
             fix that and open the store again (or move the journal file aside, giving up its events)"
        ));
    }

    /// Refuses every later write of this handle with `message` (a configuration
    /// error: the store must be opened again). The first reason stays.
    pub(crate) fn block_writes(&self, message: String) {
        self.unfolded.lock().get_or_insert(message);
    }

    /// A fold of the read journal failed with `why`: it takes no new events until a
    /// fold succeeds.
    pub(crate) fn journal_stall(&self, why: &str) {
        if let Some(j) = self.journal.lock().as_mut() {
            j.stall(why);
        }
    }

    /// Attaches the read journal (see `store::journal`): exclusive mode only, where
    /// this process is the store's one writer and its chain head cannot move under it.
    /// What the journal file held must have been folded already.
    pub(crate) fn attach_journal(&self) -> Result<()> {
        if self.opts.mode != StoreMode::Exclusive {
            return Err(Error::Config(
                "the read journal needs the store in exclusive mode (one process owns it, as the agent does)".into(),
            ));
        }
        if self.link.get().is_some() {
            return Err(Error::Config(
                "the read journal is not supported on a fleet store yet (its events must be appended under the \
                 fleet's lock)"
                    .into(),
            ));
        }
        let mut slot = self.journal.lock();
        if slot.is_some() {
            return Ok(());
        }
        let txn = self.read()?;
        let (head, archive) = (txn.audit_head()?, txn.audit_archive()?);
        drop(txn);
        *slot = Some(Journal::attach(&self.path, head, archive)?);
        Ok(())
    }

    /// Appends a batch to the read journal (see [`Journal::append`]); `None` when no
    /// journal is attached.
    pub(crate) fn journal_append(
        &self,
        link: impl FnOnce(Option<&[u8]>, Option<&[u8]>) -> Result<super::journal::Links>,
    ) -> Result<Option<Appended>> {
        match self.journal.lock().as_mut() {
            Some(j) => j.append(link).map(Some),
            None => Ok(None),
        }
    }

    /// The attached journal's file and the entries it holds that the store does not.
    pub(crate) fn journal_status(&self) -> Option<(PathBuf, usize)> {
        self.journal.lock().as_ref().map(|j| (j.path().to_path_buf(), j.pending()))
    }

    /// The store file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Gives the store its state key (derived from the unwrapped integrity key) and
    /// verifies every covered row against the head: the open-time check. `recheck`
    /// bounds how long a change by another process stays unseen.
    pub(crate) fn verify_state(
        &self,
        key: StateKey,
        store_id: [u8; STORE_ID_LEN],
        recheck: Duration,
        check: StateCheck,
    ) -> Result<StateReport> {
        self.state.arm(key, store_id, recheck, check);
        self.state.verify(&self.read()?)
    }

    /// Verifies the state of the snapshot `txn` in full (a backup, before its dump).
    pub(crate) fn verify_snapshot(&self, txn: &ReadTxn<'_>) -> Result<StateReport> {
        self.state.verify(txn)
    }

    /// Verifies the whole state again now (doctor).
    pub(crate) fn reverify_state(&self) -> Result<StateReport> {
        self.state.verify(&self.read()?)
    }

    /// The last verification's result, with the rollback counter's problem (when the
    /// store was opened for inspection despite one).
    pub(crate) fn state_report(&self) -> StateReport {
        let mut r = self.state.report();
        if let Some(p) = crate::sync::lock(&self.counter_problem).clone() {
            r.verified = false;
            r.problem.get_or_insert(p);
        }
        r
    }

    /// Notes (or clears) a disagreement with the rollback counter that an open for
    /// inspection let through.
    pub(crate) fn note_counter_problem(&self, problem: Option<String>) {
        *crate::sync::lock(&self.counter_problem) = problem;
    }

    /// Sets the root whose counter this process binds the store to (`None`: no counter
    /// configured).
    pub(crate) fn use_counter(&self, root: Option<CounterRoot>) {
        *crate::sync::lock(&self.counter) = root;
    }

    fn counter_root(&self) -> Option<CounterRoot> {
        crate::sync::lock(&self.counter).clone()
    }

    /// Where the store stands against its counter; finishes an increment that a
    /// writer's death interrupted. Anything but agreement is looked at again under
    /// the counter lock, so a writer between its commit and its increment is never
    /// taken for a rollback.
    pub(crate) fn check_counter(&self) -> Result<CounterStatus> {
        match self.check_counter_once(false)? {
            s @ (CounterStatus::Unbound | CounterStatus::Current { .. }) => Ok(s),
            _ => self.check_counter_once(true),
        }
    }

    fn check_counter_once(&self, locked: bool) -> Result<CounterStatus> {
        let _lock = if locked { Some(CounterLock::take(&self.path, self.opts.busy_timeout)?) } else { None };
        let stored = self.read()?.anchor()?;
        let root = self.counter_root();
        let (root, stored) = match (root, stored) {
            (None, None) => return Ok(CounterStatus::Unbound),
            (None, Some(a)) => {
                return Ok(CounterStatus::Wrong(Error::Config(format!(
                    "the store is bound to the rollback counter {}, and no configured root offers it: configure it \
                     (nv_counter, counter_label), or unbind the store with `tokenguard upgrade --accept-current-state`",
                    a.counter_id
                ))));
            }
            (Some(r), None) => return Ok(CounterStatus::NotBound { counter_id: counter_of(&r)?.counter_id()? }),
            (Some(r), Some(a)) => (r, a),
        };
        let c = counter_of(&root)?;
        let id = c.counter_id()?;
        match super::anchor::position(&stored, &id, c.read_counter()?) {
            Position::Current => Ok(CounterStatus::Current { counter_id: id, value: stored.value }),
            Position::Wrong(e) => Ok(CounterStatus::Wrong(e)),
            Position::OneAhead if !locked => Ok(CounterStatus::Finished { counter_id: id, value: stored.value }),
            Position::OneAhead => {
                advance_counter(c, &id, stored.value)?;
                tracing::warn!(counter = %id, value = stored.value, "finished a rollback-counter increment that a writer's exit interrupted");
                Ok(CounterStatus::Finished { counter_id: id, value: stored.value })
            }
        }
    }

    /// Binds the store to the configured counter at its current value (making the
    /// counter if it does not exist), or unbinds it when none is configured.
    /// `f` runs in the same transaction (an audit event).
    pub(crate) fn bind_counter(
        &self,
        how: AnchorWrite,
        f: impl FnOnce(&WriteTxn) -> Result<()>,
    ) -> Result<Option<u64>> {
        self.write_inner(false, how, false, &mut once(f), &|| {}, &|txn| self.seal_moved(txn, None))?;
        self.note_counter_problem(None);
        Ok(self.read()?.anchor()?.map(|a| a.value))
    }

    /// DEK versions another process changed since the last call (see
    /// `StateCell::take_changed_deks`).
    pub(crate) fn take_changed_deks(&self) -> Vec<(String, u32)> {
        self.state.take_changed_deks()
    }

    /// A consistent read snapshot.
    pub(crate) fn read(&self) -> Result<ReadTxn<'_>> {
        self.check_member()?;
        // A copy of a fleet log older than its bound catches up first.
        self.read_current()?;
        self.snapshot()
    }

    /// A read snapshot as the file is now: no fleet check, no catch-up.
    fn snapshot(&self) -> Result<ReadTxn<'_>> {
        // The floor is read before the snapshot begins: anything seen by then is in it.
        let begin = || {
            let floor = self.state.floor();
            engine(|| Ok((self.db.begin_read()?, floor)))
        };
        let keep = || {
            let (txn, floor) = begin()?;
            // Not opened (missing, or an error): reads open it each time, as a fresh
            // snapshot does, and meet the error where they need the table.
            let tokens = engine(|| Ok(txn.open_table(TOKENS).ok())).ok().flatten();
            Ok(snapshots::Kept::new(txn, tokens, floor))
        };
        if let Some(kept) = self.snapshots.current(self.state.floor(), keep) {
            let kept = kept?;
            let floor = kept.floor;
            return Ok(ReadTxn(Snapshot::Kept(kept), &self.state, floor));
        }
        let (txn, floor) = begin()?;
        Ok(ReadTxn(Snapshot::Fresh(txn), &self.state, floor))
    }

    /// Runs `f` in a write transaction, moves the state head by the covered rows it
    /// changed, and commits both durably. Waits at most `busy_timeout` for the write
    /// lock. An error from `f` aborts the transaction.
    /// `f` may run more than once, each time in a new transaction of which only the
    /// last commits (a copy of a fleet log tries a write without the log's lock
    /// first): every effect of `f` must be in its transaction.
    pub(crate) fn write<T>(&self, mut f: impl FnMut(&WriteTxn) -> Result<T>) -> Result<T> {
        self.write_abandoning(&mut f, &|| {})
    }

    /// As [`Store::write`]; `abandoned` runs as soon as a run of `f` is dropped
    /// uncommitted to run again, before anything is committed in its place (the
    /// owner forgets what the run left in its caches).
    pub(crate) fn write_abandoning<T>(
        &self,
        f: &mut dyn FnMut(&WriteTxn) -> Result<T>,
        abandoned: &dyn Fn(),
    ) -> Result<T> {
        self.write_inner(false, AnchorWrite::Advance, true, f, abandoned, &|txn| self.seal_moved(txn, None))
    }

    /// Runs `f`, then recomputes the accumulator from every covered row and writes a
    /// new head (generation one past the old one, if it verifies), and the current
    /// schema version: `tokenguard upgrade`, which accepts the store's rows as they
    /// are. The caller has made sure the operator asked for exactly that.
    pub(crate) fn reseal_with_key<T>(
        &self,
        new_key: StateKey,
        anchor: AnchorWrite,
        f: impl FnOnce(&WriteTxn) -> Result<T>,
    ) -> Result<T> {
        self.reseal_under(Some(new_key), false, anchor, f)
    }

    /// A write whose head, and every row's contribution, are under `new_key` from
    /// this commit on (`f` rotated the integrity key). Only over a state that
    /// verifies: a rotation vouches for nothing it has not checked.
    /// `anchor`: how the rollback anchor moves (`upgrade` binds).
    pub(crate) fn rekey<T>(
        &self,
        new_key: StateKey,
        anchor: AnchorWrite,
        f: impl FnOnce(&WriteTxn) -> Result<T>,
    ) -> Result<T> {
        self.reseal_under(Some(new_key), true, anchor, f)
    }

    fn reseal_under<T>(
        &self,
        new_key: Option<StateKey>,
        require_head: bool,
        anchor: AnchorWrite,
        f: impl FnOnce(&WriteTxn) -> Result<T>,
    ) -> Result<T> {
        let out = self.write_inner(true, anchor, false, &mut once(f), &|| {}, &|txn| {
            let armed = self.state.key()?;
            let (old_key, store_id) = &*armed;
            let key = new_key.as_ref().unwrap_or(old_key);
            txn.write_table(META)?.insert(META_SCHEMA, SCHEMA_VERSION.to_be_bytes().as_slice())?;
            let old = txn.state_head()?.and_then(|b| Head::decode(&b, old_key, store_id).ok());
            let (mut acc, mut acc_old) = (Acc::default(), Acc::default());
            txn.visit_covered(&mut |row, k, v| {
                acc.add(&key.row(row, k, v));
                if require_head {
                    acc_old.add(&old_key.row(row, k, v));
                }
                Ok(())
            })?;
            if require_head {
                // A key rotation vouches only for rows that verify: the rows now must be
                // the verified ones moved by exactly this transaction's changes. (Checked
                // here, after `f`, so nothing `f` read can have been swapped since.)
                let Some(h) = old else {
                    return Err(Error::integrity("verifying the store's state head before a key rotation"));
                };
                let mut expect = h.acc;
                expect.merge(&txn.delta.borrow());
                if expect != acc_old {
                    return Err(Error::integrity(
                        "verifying the store's rows before a key rotation (they do not match the state head)",
                    ));
                }
            }
            // Never behind a generation this process has seen (a reseal over a head that
            // did not decode would otherwise start again from 1).
            let before = old.map_or(0, |h| h.generation).max(self.state.floor());
            let after = Head { generation: before + 1, acc };
            Ok((before, after.generation, after.encode(key, store_id)))
        })?;
        if let Some(k) = new_key {
            self.state.rekey(k)?;
        }
        // The commit happened: a failed check now (the file edited right after it) is
        // for the next read to report, not a reason to tell the caller it did not.
        if let Err(e) = self.read().and_then(|t| self.state.verify(&t)) {
            tracing::warn!(error = %e, "the store's state did not verify right after a reseal");
        }
        Ok(out)
    }

    /// [`Store::write`], starting from `genesis` instead of the stored head (the
    /// creating transaction).
    fn write_from<T>(&self, genesis: Option<Head>, f: impl FnOnce(&WriteTxn) -> Result<T>) -> Result<T> {
        self.write_inner(false, AnchorWrite::Advance, false, &mut once(f), &|| {}, &|txn| self.seal_moved(txn, genesis))
    }

    /// The new head of a write: the old one moved by the transaction's changes.
    fn seal_moved(&self, txn: &WriteTxn, genesis: Option<Head>) -> Result<(u64, u64, Vec<u8>)> {
        {
            let armed = self.state.key()?;
            let (key, store_id) = &*armed;
            let before = match genesis {
                Some(g) => g,
                None => match txn.state_head()? {
                    Some(b) => Head::decode(&b, key, store_id)?,
                    None => {
                        return Err(Error::integrity(
                            "writing to a store without a state head (run `tokenguard upgrade` first)",
                        ));
                    }
                },
            };
            let mut acc = before.acc;
            acc.merge(&txn.delta.borrow());
            let after = Head { generation: before.generation + 1, acc };
            Ok((before.generation, after.generation, after.encode(key, store_id)))
        }
    }

    /// One write: `f`, then `seal` (which computes the new head), then the commit.
    /// `resealed`: the head was recomputed rather than moved by the changes, so the
    /// process's known state is verified afresh instead of updated. `again`: `f` may
    /// run a second time (its effects are all in its transaction), so a copy of a
    /// fleet log may first try the write without the log's lock (below);
    /// `abandoned` runs whenever a run of `f` ends without a commit, before its
    /// transaction ends (so before anything is committed in its place).
    ///
    /// A copy of a fleet log writes in one of two ways (docs/FLEET-DESIGN.md, "A
    /// write"):
    /// - **alone** (optimistic): `f` runs on the copy as it is, and its batch goes to
    ///   the log in one statement that inserts it only where the log still ends
    ///   where the copy does and no writer holds the lock. A write that lost (another
    ///   host was first) commits nothing anywhere and runs again under the lock. A
    ///   write that changed nothing, or failed, answered from the copy as it was: the
    ///   answer stands once a look finds the log no further on; otherwise it runs
    ///   again under the lock;
    /// - **under the lock**: the log's lock, the copy caught up under it, then `f`.
    fn write_inner<T>(
        &self,
        resealed: bool,
        anchor: AnchorWrite,
        again: bool,
        f: &mut dyn FnMut(&WriteTxn) -> Result<T>,
        abandoned: &dyn Fn(),
        seal: &Seal<'_>,
    ) -> Result<T> {
        if self.poisoned.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(Error::integrity("writing to a store whose engine failed earlier in this process"));
        }
        // Writers of this process queue here first, on a lock that is eventually fair
        // and that they wait on rather than poll: polling for redb's write lock (and
        // the counter lock), a thread can lose every round to the others and time out
        // while they keep writing. Only other processes are polled for below.
        let start = Instant::now();
        self.check_member()?;
        let _writer = self.lock_writers()?;
        let _in_write = link::InWrite::enter();
        // Under the lock: a block set by a catch-up that committed while this write
        // waited (the pinned roots changed) holds for it too.
        if let Some(message) = self.unfolded.lock().clone() {
            return Err(Error::Config(message));
        }
        // With a counter, one lock orders the transaction and the increment after it
        // across processes (taken before the write lock, released after the increment).
        let counter = self.counter_root();
        let _counter_lock = match &counter {
            Some(_) => Some(CounterLock::take(&self.path, self.opts.busy_timeout.saturating_sub(start.elapsed()))?),
            None => None,
        };
        let w = Attempt { resealed, anchor, counter: counter.as_ref(), start, abandoned };
        if let Some(link) = self.link.get()
            && again
            && !resealed
            && counter.is_none()
            && !link.behind()
        {
            match self.attempt(&w, Via::Alone(link), f, seal)? {
                Tried::Done(out) => {
                    link.wrote_alone();
                    return Ok(out);
                }
                Tried::Unconfirmed { answer, read_at } => {
                    // Only if the copy is still at what `f` read (another process
                    // sharing the file may have moved it since) and the log holds
                    // nothing newer.
                    let out = self.look(link)?;
                    if out.after == read_at {
                        return answer;
                    }
                    if out.rekeyed {
                        // As under the lock (`lock_log`): what the caller prepared
                        // may stand on the old keys.
                        return Err(Error::FleetConflict { generation: out.after });
                    }
                    link.lost_alone();
                }
                Tried::Lost => link.lost_alone(),
            }
        }
        // A copy of a fleet log: the log's lock, and the copy caught up under it,
        // before this write reads anything (released on every way out but the append).
        // Its waits for the copy's locks share one busy timeout with the first run's
        // (a bound callers plan with: `write_takes`).
        let held = self.lock_log()?;
        match self.attempt(&w, Via::Locked(held), f, seal)? {
            Tried::Done(out) => Ok(out),
            Tried::Unconfirmed { answer, .. } => answer,
            Tried::Lost => Err(Error::integrity("a write under the fleet log's lock lost to another writer")),
        }
    }

    /// One write transaction of [`Store::write_inner`]'s, by way of `via`.
    fn attempt<T>(
        &self,
        w: &Attempt<'_>,
        via: Via<'_>,
        f: &mut dyn FnMut(&WriteTxn) -> Result<T>,
        seal: &Seal<'_>,
    ) -> Result<Tried<T>> {
        let alone = matches!(via, Via::Alone(_));
        let recording = match &via {
            Via::Alone(_) | Via::Locked(Some(_)) => true,
            Via::Locked(None) => false,
        };
        let txn = WriteTxn::new(self.begin_write(w.start)?, self.state.clone(), recording);
        // A run that does not commit is reported before its transaction ends (so
        // before anything can be committed in its place): declared after it,
        // dropped before it.
        let abandon = OnDrop(Some(w.abandoned));
        // A termination signal waits for the commit (or the abort) to finish.
        let _critical = crate::signals::Critical::enter();
        engine(|| self.state.before_write(&txn))?;
        // The generation `f` reads (alone: an answer without a batch stands only
        // if the copy is still there once the log has been looked at).
        let read_at = match alone {
            true => {
                let armed = self.state.key()?;
                let head = txn.state_head()?.ok_or_else(|| Error::integrity("reading the store's state head"))?;
                Head::decode(&head, &armed.0, &armed.1)?.generation
            }
            false => 0,
        };
        let poison = |e: Error| {
            // After a caught engine panic the in-memory state is not to be trusted:
            // no later write of this process may commit it.
            if matches!(e, Error::Integrity { context: PANIC_CONTEXT }) {
                self.poisoned.store(true, std::sync::atomic::Ordering::SeqCst);
            }
            e
        };
        // The read journal goes in first, as it is: its entries are the chain's next
        // links, so whatever `f` audits comes after them. Held until the commit is
        // known, so that no batch links to a head this transaction moves.
        let mut journal = self.journal.lock();
        if let Some((entries, head)) = journal.as_ref().and_then(|j| j.to_fold()) {
            // The pending entries link from the head the round began at; a store whose
            // head moved otherwise (it cannot, while this process is its one writer)
            // would have its newer events overwritten.
            if txn.audit_head().map_err(poison)?.as_deref() != journal.as_ref().and_then(|j| j.base()) {
                if let Some(j) = journal.as_mut() {
                    j.fail("the store's audit head moved under it");
                }
                return Err(Error::integrity(
                    "folding the read journal: the store's audit head is not the one it links from",
                ));
            }
            txn.append_audit(entries, head).map_err(poison)?;
        }
        let out = match engine(|| f(&txn)).map_err(poison) {
            Ok(out) => out,
            // Alone, a failure may stand on a copy behind the log: dropped (aborted),
            // and confirmed by a look. Not a caught engine panic.
            Err(e) if alone && !self.poisoned.load(std::sync::atomic::Ordering::SeqCst) => {
                return Ok(Tried::Unconfirmed { answer: Err(e), read_at });
            }
            Err(e) => return Err(e),
        };
        if recording && !w.resealed && txn.with_writes(<[txn::RowWrite]>::is_empty) {
            // A copy of a fleet log: a write that changed nothing (a lease another
            // host holds, a compare-and-set that lost) makes no batch and no commit,
            // so that waiting never becomes a fleet write. Dropped: aborted; the
            // log's lock is released.
            return Ok(Tried::Unconfirmed { answer: Ok(out), read_at });
        }
        let chain_after = match journal.as_ref() {
            Some(_) => Some((txn.audit_head().map_err(poison)?, txn.audit_archive().map_err(poison)?)),
            None => None,
        };
        // The head this write builds on, which its batch is chained to.
        let prev_head = if recording { txn.state_head().map_err(poison)?.unwrap_or_default() } else { Vec::new() };
        let advanced = engine(|| advance_anchor(&txn, w.counter, w.anchor)).map_err(poison)?;
        let (before, after, head) = engine(|| {
            let (before, after, head) = seal(&txn)?;
            txn.write_table(META)?.insert(META_STATE_HEAD, head.as_slice())?;
            Ok((before, after, head))
        })
        .map_err(poison)?;
        if recording {
            // In the log first: a write that fails here commits nothing in this copy.
            let armed = self.state.key()?;
            let batch =
                txn.with_writes(|w| txn::seal_batch(&armed.0, &armed.1, &prev_head, &head, before, after, w))?;
            match via {
                Via::Locked(Some(held)) => held.append(&batch)?,
                Via::Locked(None) => {}
                Via::Alone(link) => {
                    if !link.append_alone(&batch)? {
                        return Ok(Tried::Lost);
                    }
                }
            }
        }
        let changes = std::mem::take(&mut *txn.changes.borrow_mut());
        // redb makes a commit visible before it can still fail (its post-commit free
        // pass): kept snapshots are renewed whatever the outcome.
        let committed = engine(|| txn.commit());
        self.snapshots.committed();
        if committed.is_err() && journal.is_some() {
            // Whether this commit's audit events (the journal's, and the write's own)
            // are in the store is unknown (redb can fail after making a commit
            // visible): neither the journal nor this process may go on linking from a
            // head it does not know. The next open folds what the store lacks, link by
            // link.
            self.poisoned.store(true, std::sync::atomic::Ordering::SeqCst);
            if let Some(j) = journal.as_mut() {
                j.fail("a commit that folded it failed");
            }
        }
        if committed.is_err() {
            // The log holds this write; this copy does not: the next read looks.
            self.unsync();
        }
        committed.map_err(poison)?;
        abandon.disarm();
        if let (Some(j), Some((head, archive))) = (journal.as_mut(), chain_after) {
            j.folded(head, archive);
        }
        drop(journal);
        if let (Some(next), Some(root)) = (advanced, w.counter) {
            // Committed. Until the counter moves, the copy of the store from before
            // this commit would still be accepted: retried, and a failure is the
            // caller's error (the change itself is in the store).
            let c = counter_of(root)?;
            if let Err(e) = c.counter_id().and_then(|id| advance_counter(c, &id, next)) {
                tracing::error!(error = %e, "the rollback counter was not advanced after a commit");
                return Err(Error::Hardware {
                    backend: root.backend(),
                    operation: "advancing the rollback counter after a commit",
                    detail: format!(
                        "the change WAS committed, but the counter was not advanced ({e}); until the next open or \
                         write finishes it, a copy of the store from before this change would be accepted"
                    ),
                });
            }
        }
        if w.resealed {
            self.state.resealed(after);
        } else {
            self.state.committed(before, after, changes, &head);
        }
        Ok(Tried::Done(out))
    }

    /// The generation of the state head as stored now (its MAC checked).
    pub(crate) fn head_generation(&self) -> Result<u64> {
        self.state_head().map(|(generation, _)| generation)
    }

    /// The state head as stored now: its generation (MAC checked) and its bytes.
    pub(crate) fn state_head(&self) -> Result<(u64, Vec<u8>)> {
        let armed = self.state.key()?;
        // As the file is now (a copy joining its log reads this before the link).
        let head = self.snapshot()?.state_head()?.ok_or_else(|| Error::integrity("reading the store's state head"))?;
        Ok((Head::decode(&head, &armed.0, &armed.1)?.generation, head))
    }

    /// Brings this store forward by the batches of the fleet log that `fetch` returns
    /// (given the store's generation, it returns the batches after it, in order) in
    /// one transaction, and commits only a state that verifies. `fetch` runs under
    /// this store's write lock, so no write of this process comes between what it
    /// read and what is applied. Checked:
    /// - each batch's MAC is checked under the state key in force before it, and
    ///   nothing of a batch is decoded before (`txn::open_batch`);
    /// - its generations must follow the store's own, one at a time: a batch left
    ///   out, repeated or moved is refused;
    /// - its rows are applied, and the state head they end on must decode at the
    ///   generation the batch claims;
    /// - the state is checked before the commit: batch by batch, when this process's
    ///   verified state is the copy's (the accumulator, moved by the covered rows each
    ///   batch sets and removes, must reach the head that batch brings; the metadata
    ///   must still parse), in full otherwise (a copy moved under this process, a
    ///   batch that rekeys).
    ///
    /// A failure anywhere leaves the store as it was. `on_commit` runs after the
    /// commit, under the write lock. `unlock`: the new state key,
    /// when a batch's head does not open under the old one (it rotated the integrity
    /// key, as `root remove` does); the caller's roots unwrap it from the rows just
    /// applied, or the catch-up fails.
    #[cfg(test)]
    pub(crate) fn catch_up(
        &self,
        fetch: &mut dyn FnMut(u64) -> Result<Vec<Vec<u8>>>,
        unlock: &mut dyn FnMut(&WriteTxn) -> Result<StateKey>,
        on_commit: &mut dyn FnMut(&CaughtUp) -> Result<()>,
    ) -> Result<CaughtUp> {
        let _writer = self.lock_writers()?;
        let _in_write = link::InWrite::enter();
        self.catch_up_locked(&mut |generation, _| fetch(generation), unlock, on_commit)
    }

    /// Whether this process's verified state is exactly what a full verification of
    /// the store finds now.
    #[cfg(test)]
    pub(crate) fn known_is_verified(&self) -> Result<bool> {
        self.state.known_is_verified(&self.read()?)
    }

    /// The state key and store id, for tests that seal batches as a host would.
    #[cfg(test)]
    pub(crate) fn state_key(&self) -> Result<state::Armed> {
        self.state.key()
    }

    /// This process's write lock (its writers queue on it; see `write_inner`).
    fn lock_writers(&self) -> Result<parking_lot::MutexGuard<'_, ()>> {
        let start = Instant::now();
        self.writers
            .try_lock_for(self.opts.busy_timeout)
            .ok_or_else(|| Error::StoreBusy { path: self.path.clone(), waited_ms: waited_ms(start) })
    }

    /// [`Store::catch_up`], under the write lock the caller holds.
    fn catch_up_locked(
        &self,
        fetch: &mut Fetch<'_>,
        unlock: &mut dyn FnMut(&WriteTxn) -> Result<StateKey>,
        on_commit: &mut dyn FnMut(&CaughtUp) -> Result<()>,
    ) -> Result<CaughtUp> {
        if self.poisoned.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(Error::integrity("writing to a store whose engine failed earlier in this process"));
        }
        // Not yet with a read journal (its pending events link from the audit head a
        // batch moves) or a rollback counter (its anchor row is another host's): the
        // fleet design moves both under the fleet's lock (docs/FLEET-DESIGN.md).
        if self.journal.lock().is_some() || self.counter_root().is_some() {
            return Err(Error::Config(
                "a fleet cache with a read journal or a rollback counter is not supported yet".into(),
            ));
        }
        let armed = self.state.key()?;
        let (old_key, store_id) = (&armed.0, &armed.1);
        let head_missing = || Error::integrity("reading the state head while catching up with the fleet log");
        // A look from a read snapshot first: most find nothing new, and need no write
        // transaction.
        let seen = self.read()?.state_head()?.ok_or_else(head_missing)?;
        let seen_generation = Head::decode(&seen, old_key, store_id)?.generation;
        let peeked = fetch(seen_generation, &seen)?;
        if peeked.is_empty() {
            return Ok(CaughtUp { before: seen_generation, after: seen_generation, rekeyed: false });
        }
        let start = Instant::now();
        let txn = WriteTxn::new(self.begin_write(start)?, self.state.clone(), false);
        let _critical = crate::signals::Critical::enter();
        let mut new_key: Option<StateKey> = None;
        let head_now = engine(|| txn.state_head()?.ok_or_else(head_missing))?;
        let at_first = Head::decode(&head_now, old_key, store_id)?;
        let first = at_first.generation;
        // Another process sharing this copy may have applied them meanwhile.
        let batches = if head_now == seen { peeked } else { fetch(first, &head_now)? };
        // Checked batch by batch from this process's verified state when that is the
        // copy's (the accumulator moved by each batch's covered rows must reach the
        // head it brings): O(rows the batches change). Otherwise, or once a batch
        // rekeys, the result is verified in full before the commit: O(rows).
        let mut follow = self.state.follow(first, &head_now, at_first.acc);
        let mut last_head = head_now.clone();
        let last = engine(|| {
            let mut generation = first;
            for bytes in &batches {
                let key = new_key.as_ref().unwrap_or(old_key);
                let prev_head = txn.state_head()?.ok_or_else(head_missing)?;
                let (before, after, rows) = txn::open_batch(key, store_id, &prev_head, bytes)?;
                if before != generation || after != generation.wrapping_add(1) {
                    return Err(Error::integrity(
                        "catching up with the fleet log: a batch does not follow the last one (left out, repeated or \
                         moved)",
                    ));
                }
                // What only the store's creation or this copy's joining writes — the
                // store's identity, its creation time, the fleet-member mark — no
                // batch writes: rows the state does not cover, which a key holder's
                // batch could otherwise change on every host.
                let own = [META_STORE_ID, META_CREATED, META_FLEET_MEMBER];
                if rows.iter().any(|w| w.table == 0 && own.iter().any(|k| w.key == k.as_bytes())) {
                    return Err(Error::integrity(
                        "catching up with the fleet log: a batch writes the store's identity or a copy's own mark",
                    ));
                }
                txn.replay(&rows)?;
                if let Some(f) = follow.as_mut() {
                    txn::visit_covered_writes(&rows, &mut |row, k, new| {
                        self.state.follow_row(f, old_key, row, k, new);
                        Ok(())
                    })?;
                }
                let head_bytes = txn.state_head()?.ok_or_else(head_missing)?;
                let head = match Head::decode(&head_bytes, key, store_id) {
                    Ok(h) => h,
                    Err(_) => {
                        let k = unlock(&txn)?;
                        let h = Head::decode(&head_bytes, &k, store_id)?;
                        new_key = Some(k);
                        // Every row's digest moves with the key: verified in full.
                        follow = None;
                        h
                    }
                };
                if head.generation != after {
                    return Err(Error::integrity(
                        "catching up with the fleet log: a batch's state head is not at the generation it claims",
                    ));
                }
                if follow.as_ref().is_some_and(|f| !f.reaches(&head.acc)) {
                    return Err(Error::integrity(
                        "catching up with the fleet log: a batch's rows do not add up to the state head it brings",
                    ));
                }
                last_head = head_bytes;
                generation = after;
            }
            Ok(generation)
        })?;
        if last == first {
            // Nothing to apply: the transaction is dropped, not committed.
            return Ok(CaughtUp { before: first, after: last, rekeyed: false });
        }
        let full = match follow {
            // What the full check reads besides the rows: the metadata still parses
            // (a batch may have written it).
            Some(_) => engine(|| txn.meta().map(|_| None))?,
            None => Some(engine(|| self.state.verify_pending(&txn, new_key.as_ref()))?),
        };
        let committed = engine(|| txn.commit());
        self.snapshots.committed();
        committed?;
        let out = CaughtUp { before: first, after: last, rekeyed: new_key.is_some() };
        match (full, follow) {
            (Some(verified), _) => drop(self.state.install_verified(verified, new_key)),
            (None, Some(followed)) => self.state.followed(first, last, followed, &last_head),
            (None, None) => {}
        }
        // Still under the write lock: no write of this process runs between the new
        // state and what the caller keeps in step with it (the guard's audit keys).
        on_commit(&out)?;
        Ok(out)
    }

    /// redb's write lock, polled until `busy_timeout` after `start` (when the write
    /// began waiting).
    pub(super) fn begin_write(&self, start: Instant) -> Result<WriteTransaction> {
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

fn counter_of(root: &CounterRoot) -> Result<&dyn crate::root::MonotonicCounter> {
    root.counter().ok_or_else(|| Error::Config("the root offers no rollback counter".into()))
}

/// Moves the counter `counter_id` from `target - 1` to `target` (nothing if it is
/// there already), retrying a failed call a few times. A counter anywhere else moved
/// under the lock: an error.
fn advance_counter(c: &dyn crate::root::MonotonicCounter, counter_id: &str, target: u64) -> Result<()> {
    let from = target.checked_sub(1).ok_or_else(|| Error::integrity("reading the rollback anchor"))?;
    let mut last = None;
    for pause_ms in [0u64, 10, 50, 200] {
        std::thread::sleep(Duration::from_millis(pause_ms));
        match c.increment_counter(from) {
            Ok(v) if v == target => return Ok(()),
            Ok(v) => {
                return Err(Error::Rollback {
                    counter_id: counter_id.into(),
                    stored: target,
                    counter: Some(v),
                    what: "the counter moved while the store's counter lock was held (a writer that does not take \
                           the lock, or a counter shared with another store)",
                });
            }
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| Error::integrity("advancing the rollback counter")))
}

/// Moves the anchor in `txn` (see `store::anchor`); returns the value the counter
/// must reach once the transaction commits, if any.
fn advance_anchor(txn: &WriteTxn, root: Option<&CounterRoot>, how: AnchorWrite) -> Result<Option<u64>> {
    let Some(root) = root else {
        return match (how, txn.anchor()?) {
            (_, None) => Ok(None),
            (AnchorWrite::Rebind, Some(_)) => txn.put_anchor(None).map(|()| None),
            // A write that does not move a bound store's anchor would let the copy
            // from before it pass for current.
            (_, Some(a)) => Err(Error::Config(format!(
                "the store is bound to the rollback counter {}, and no configured root offers it: configure it \
                 (nv_counter, counter_label) to write",
                a.counter_id
            ))),
        };
    };
    let c = counter_of(root)?;
    let counter_id = c.counter_id()?;
    let next = match how {
        AnchorWrite::BindNew => match c.read_counter()? {
            None => 1 + c.create_counter()?,
            Some(v) => {
                return Err(Error::Config(format!(
                    "the rollback counter {counter_id} exists already (at {v}): another store may be bound to it, or \
                     this one was, before an older copy of it was put back. Configure a counter of this store's \
                     own, or bind to this one with `tokenguard upgrade --accept-current-state`"
                )));
            }
        },
        AnchorWrite::Rebind => {
            1 + match c.read_counter()? {
                Some(v) => v,
                None => c.create_counter()?,
            }
        }
        AnchorWrite::Advance => {
            let Some(stored) = txn.anchor()? else { return Ok(None) };
            match super::anchor::position(&stored, &counter_id, c.read_counter()?) {
                Position::Current => stored.value + 1,
                Position::OneAhead => {
                    advance_counter(c, &counter_id, stored.value)?;
                    stored.value + 1
                }
                Position::Wrong(e) => return Err(e),
            }
        }
    };
    txn.put_anchor(Some(&Anchor { counter_id, value: next }))?;
    Ok(Some(next))
}

/// A read snapshot, with the state it is checked against and its floor.
pub(crate) struct ReadTxn<'s>(Snapshot<'s>, &'s StateCell, u64);

#[cfg(test)]
impl ReadTxn<'_> {
    /// The redb transaction, for tests that compare stores row for row.
    pub(crate) fn raw(&self) -> &ReadTransaction {
        &self.0
    }
}

/// A read transaction begun for one read, or this thread's kept one.
enum Snapshot<'s> {
    Fresh(ReadTransaction),
    Kept(parking_lot::MappedMutexGuard<'s, snapshots::Kept>),
}

impl std::ops::Deref for Snapshot<'_> {
    type Target = ReadTransaction;

    fn deref(&self) -> &ReadTransaction {
        match self {
            Snapshot::Fresh(t) => t,
            Snapshot::Kept(k) => &k.txn,
        }
    }
}

/// Opening a table for reading, the one thing the two transaction kinds do
/// differently; every read operation is written once on top of it.
pub(super) trait Tables {
    fn table<K: Key + 'static, V: Value + 'static>(
        &self,
        def: TableDefinition<'static, K, V>,
    ) -> Result<Option<impl ReadableTable<K, V> + '_>>;

    /// Whether this is a write transaction (its reads are checked in full: nothing
    /// there is on the `get` hot path).
    const WRITE: bool;

    /// The state reads are checked against, once a guard has armed it.
    fn checked(&self) -> Option<&StateCell>;

    /// Calls `f` with the covered-row changes this transaction made so far (none for
    /// a read snapshot): a row it wrote is checked against what it wrote.
    fn with_pending<R>(&self, f: impl FnOnce(&[Change]) -> R) -> R;

    /// The lowest generation this snapshot may be at (what the process had seen when
    /// it began).
    fn floor(&self) -> u64;

    /// Calls `f` with the `tokens` row of (`provider`, `name`), if there is one: the
    /// lookup of every `get` (a kept snapshot has the table open already).
    fn with_token_row<R>(&self, provider: &str, name: &str, f: impl FnOnce(Option<&[u8]>) -> Result<R>) -> Result<R> {
        match self.table(TOKENS)? {
            Some(t) => f(t.get((provider, name))?.as_ref().map(|g| g.value())),
            None => f(None),
        }
    }
}

/// Checks a record (or its absence) read in `t`: its AES-GCM tag on a read snapshot
/// (the `get` path, where the open that follows authenticates the rest), its full
/// contribution when `full` or in a write transaction.
pub(super) fn check_record<T: Tables + StoreRead>(
    t: &T,
    provider: &str,
    name: &str,
    bytes: Option<&[u8]>,
    full: bool,
) -> Result<()> {
    match t.checked().filter(|s| s.armed()) {
        None => Ok(()),
        Some(s) if full || T::WRITE => t.with_pending(|p| s.check_record_row(t, t.floor(), p, provider, name, bytes)),
        Some(s) => t.with_pending(|p| s.check_record_tag(t, t.floor(), p, provider, name, bytes)),
    }
}

/// Checks a covered row other than a record (or its absence) read in `t`.
pub(super) fn check_row<T: Tables + StoreRead>(t: &T, row: Row, key: RowKey<'_>, value: Option<&[u8]>) -> Result<()> {
    match t.checked().filter(|s| s.armed()) {
        None => Ok(()),
        Some(s) => t.with_pending(|p| s.check_row(t, t.floor(), p, row, key, value)),
    }
}

impl Tables for ReadTxn<'_> {
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

    const WRITE: bool = false;

    fn checked(&self) -> Option<&StateCell> {
        Some(self.1)
    }

    fn with_pending<R>(&self, f: impl FnOnce(&[Change]) -> R) -> R {
        f(&[])
    }

    fn floor(&self) -> u64 {
        self.2
    }

    fn with_token_row<R>(&self, provider: &str, name: &str, f: impl FnOnce(Option<&[u8]>) -> Result<R>) -> Result<R> {
        match &self.0 {
            Snapshot::Kept(k) if k.tokens.is_some() => match &k.tokens {
                Some(t) => f(t.get((provider, name))?.as_ref().map(|g| g.value())),
                None => f(None),
            },
            _ => match self.table(TOKENS)? {
                Some(t) => f(t.get((provider, name))?.as_ref().map(|g| g.value())),
                None => f(None),
            },
        }
    }
}

pub(super) fn meta_value(t: &impl ReadableTable<&'static str, &'static [u8]>, key: &str) -> Result<Option<Vec<u8>>> {
    Ok(t.get(key)?.map(|v| v.value().to_vec()))
}

pub(super) fn index_keys(v: &RecordView<'_>) -> IndexKeys {
    IndexKeys { dek_version: v.dek_version, expires_at: v.expires_at }
}
