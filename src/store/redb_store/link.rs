//! The store's side of the fleet log (docs/FLEET-DESIGN.md, "A write" and "Coherence
//! and its bound"). A store with a [`Link`] is one host's copy of a log that other
//! hosts write too:
//! - **every write** commits here only once the log has its sealed batch, and the
//!   log takes a batch only on top of the state it was built on, its newest: no
//!   write of any host builds on a state older than the log's, so a compare-and-set,
//!   a refresh lease or a provider's first data key means the same across the fleet
//!   as in one store. A write first runs on the copy as it is and offers its batch
//!   without the log's lock (one statement: `Log::append_alone`); when another
//!   host's batch was first, or the write changed nothing or failed and a look finds
//!   the log further on, it runs again under the log's write lock, after applying
//!   the batches other hosts appended (checked as [`Store::catch_up`] checks them).
//!   A write that may not run twice (a rotation, a counter) takes the lock at once;
//! - **a read** of a store whose last look at the log is older than the staleness
//!   bound catches up first (one round trip), or fails: a read never answers from a
//!   copy older than the bound. With a notification listener ([`Watch`]), a read
//!   looks as soon as another host's batch is heard of, and the bound runs from the
//!   listener's last heartbeat when that is newer than the last look.
//!
//! The log itself (PostgreSQL) is in `crate::fleet`; the state logic stays here, in
//! one place, for every kind of write.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use redb::ReadableDatabase;

use super::txn::{Batch, WriteTxn};
use super::{CaughtUp, Store, engine};
use crate::error::{Error, Result};
use crate::store::state::StateKey;

/// The fleet log, as a store uses it. Calls come in the order `lock`, `since`…,
/// then `append` or `release`; or `since` alone (a read's catch-up); or
/// `append_alone` alone (an optimistic write).
pub(crate) trait Log: Send {
    /// Takes the log's write lock for this store, held until `append` or `release`.
    fn lock(&mut self) -> Result<()>;
    /// At most a page of the batches after `generation`, in order, and whether the
    /// page was full (there may be more). `head` is this copy's state head at
    /// `generation`: a log that does not hold that very head there (it lost batches
    /// this copy applied, or this copy was written outside it) is an integrity
    /// error.
    fn since(&mut self, generation: u64, head: &[u8]) -> Result<(Vec<Vec<u8>>, bool)>;
    /// Appends `batch` under the lock and releases it. `Ok` only once the log has
    /// the batch; an error may mean the log has it all the same (its answer lost):
    /// the next catch-up says which.
    fn append(&mut self, batch: &Batch) -> Result<()>;
    /// Releases the lock without appending.
    fn release(&mut self);
    /// Appends `batch` without the lock (an optimistic write): only where the log
    /// ends at the generation the batch builds on, with this copy's head there, and
    /// no writer holds the lock. `Ok(true)` once the log has it; `Ok(false)`: another
    /// writer was first and nothing was appended. An error, as for `append`. (The
    /// default, for logs built by the tests, takes the lock and waits for it.)
    fn append_alone(&mut self, batch: &Batch) -> Result<bool> {
        self.lock()?;
        match self.append(batch) {
            Ok(()) => Ok(true),
            Err(Error::FleetConflict { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }
    /// How long one statement (or the lock's wait) may take before it fails.
    fn timeout(&self) -> std::time::Duration {
        std::time::Duration::ZERO
    }
    /// How full the server's notification queue is (0 to 1), for `doctor`.
    fn queue_usage(&mut self) -> Result<f64> {
        Ok(0.0)
    }
}

/// What `doctor` reports of a fleet copy's link.
pub(crate) struct FleetHealth {
    /// A look at the log now: the generation reached, or why not.
    pub synced: Result<u64>,
    /// The notification listener; `None`: this process keeps none.
    pub listener: Option<ListenerHealth>,
    /// The server's notification queue, used (0 to 1).
    pub queue_usage: Result<f64>,
}

/// What `doctor` reports of a notification listener.
pub(crate) struct ListenerHealth {
    /// Listening now.
    pub listening: bool,
    /// The connections it has made (1 for a listener that never lost one).
    pub connections: u64,
    /// A heartbeat has come back on the current connection.
    pub proven: bool,
    /// Milliseconds since its last heartbeat came back (or it connected).
    pub heartbeat_age_ms: u64,
    /// How long a heartbeat vouches for the copy (the staleness bound).
    pub bound_ms: u64,
}

/// What the store needs from its owner to follow other hosts' batches.
pub(crate) trait Follower: Send + Sync {
    /// The new state key, after a batch whose head does not open under the old one
    /// (it rotated the integrity key): unwrapped by one of the owner's roots from
    /// the rows of `txn`.
    fn unlock(&self, txn: &WriteTxn) -> Result<StateKey>;
    /// After a catch-up committed, under the store's write lock: the owner keeps in
    /// step (its audit keys, its caches). An error blocks the owner's writes (its
    /// own doing) and is the caller's.
    fn committed(&self, out: &CaughtUp) -> Result<()>;
}

/// What a host's notification listener has heard (docs/FLEET-DESIGN.md, "Coherence
/// and its bound"): written by the listener (`crate::fleet`), read by every read of
/// the store. The listener holds a connection that `LISTEN`s on the store's channel;
/// every batch's insert notifies it at commit, naming the batch's generation.
///
/// A read may then answer from the copy past the staleness bound's "last look", up
/// to the listener's last heartbeat — a round trip on the listening connection that
/// came back, so every notification of a batch committed before it had been
/// delivered — as long as the listener has been listening since before the copy's
/// last look and no notification names a generation beyond the copy's. The bound
/// itself still holds from the heartbeat: a listener cut off without a closed socket
/// stops extending it.
#[derive(Default)]
pub(crate) struct Watch {
    /// Counts the times the listener started listening (a new connection); 0:
    /// never. A copy whose last look came before the latest start looks again.
    starts: AtomicU64,
    /// Listening now.
    listening: std::sync::atomic::AtomicBool,
    /// `boot_ms` at the start of the last heartbeat that came back (or when the
    /// listener connected).
    alive_ms: AtomicU64,
    /// A heartbeat has come back on the current connection (for `doctor`).
    proven: std::sync::atomic::AtomicBool,
    /// The highest generation a notification named.
    notified: AtomicU64,
    /// Notifications heard, ever; with `notified`, changed only under this lock (a
    /// read loads `notified` alone): a look forgets a forged generation only when
    /// nothing was heard since it began.
    heard: parking_lot::Mutex<u64>,
}

// Kept by `crate::fleet`'s listener (feature `postgres`).
#[cfg_attr(not(feature = "postgres"), allow(dead_code))]
impl Watch {
    /// The listener listens (again), on a new connection, as of `at_ms`.
    pub(crate) fn started(&self, at_ms: u64) {
        // The start first: a read that sees the new heartbeat time sees it too (it
        // loads them in the other order), and looks.
        self.starts.fetch_add(1, Ordering::AcqRel);
        self.proven.store(false, Ordering::Release);
        self.alive_ms.store(at_ms, Ordering::Release);
        self.listening.store(true, Ordering::Release);
    }

    /// A notification named `generation`.
    pub(crate) fn heard(&self, generation: u64) {
        let mut heard = self.heard.lock();
        self.notified.fetch_max(generation, Ordering::AcqRel);
        *heard += 1;
    }

    /// A heartbeat that started at `at_ms` came back (and what it delivered was
    /// heard first).
    pub(crate) fn alive(&self, at_ms: u64) {
        self.alive_ms.fetch_max(at_ms, Ordering::AcqRel);
        self.proven.store(true, Ordering::Release);
    }

    /// The listening connection is gone: reads fall back to the staleness bound.
    pub(crate) fn lost(&self) {
        self.listening.store(false, Ordering::Release);
    }
}

/// Starts a notification listener that keeps the given [`Watch`] (and stops once
/// the watch is dropped): called once, when the link is made.
pub(crate) type Starter = Box<dyn FnOnce(std::sync::Weak<Watch>) + Send>;

/// A store's link to the fleet log.
pub(crate) struct Link {
    log: parking_lot::Mutex<Box<dyn Log>>,
    follower: Arc<dyn Follower>,
    /// Reads answer from this copy while the last look at the log is younger than
    /// this (milliseconds); `u64::MAX`: reads never look.
    staleness_ms: u64,
    /// `clock::boot_ms` of the last time this copy was known to be the log's
    /// newest (0: never).
    synced_ms: AtomicU64,
    /// What the notification listener heard, if the log has one.
    watch: Option<Arc<Watch>>,
    /// The copy's generation as of its last look or append (never above the copy's).
    known_gen: AtomicU64,
    /// `watch.starts` as it was when the copy's last look (or locked write) began.
    look_start: AtomicU64,
    /// The copy may lack what the log holds (a local commit failed after its batch
    /// reached the log, or the append's answer was lost): the next read looks,
    /// whatever the bound and the listener say.
    must_look: std::sync::atomic::AtomicBool,
    /// Writes of this process the log took without its lock (optimistic), and
    /// those that lost to another writer and ran again under it.
    alone: AtomicU64,
    lost: AtomicU64,
}

/// What a look began with: the listener's start count, the highest generation it
/// had heard of, and how many notifications it had heard.
#[derive(Clone, Copy)]
struct LookMark {
    starts: u64,
    notified: u64,
    heard: u64,
}

impl Link {
    pub(crate) fn new(
        log: Box<dyn Log>,
        follower: Arc<dyn Follower>,
        staleness: std::time::Duration,
        listener: Option<Starter>,
    ) -> Link {
        let watch = listener.map(|start| {
            let w = Arc::default();
            start(Arc::downgrade(&w));
            w
        });
        Link {
            log: parking_lot::Mutex::new(log),
            follower,
            staleness_ms: u64::try_from(staleness.as_millis()).unwrap_or(u64::MAX),
            synced_ms: AtomicU64::new(0),
            watch,
            known_gen: AtomicU64::new(0),
            look_start: AtomicU64::new(0),
            must_look: std::sync::atomic::AtomicBool::new(false),
            alone: AtomicU64::new(0),
            lost: AtomicU64::new(0),
        }
    }

    /// A link that only records: every write's batch goes to `sink` and nothing is
    /// ever read back (the recorder's tests).
    #[cfg(test)]
    pub(crate) fn recording(sink: impl FnMut(&Batch) -> Result<()> + Send + 'static) -> Link {
        struct Recording<F>(F);
        impl<F: FnMut(&Batch) -> Result<()> + Send> Log for Recording<F> {
            fn lock(&mut self) -> Result<()> {
                Ok(())
            }
            fn since(&mut self, _: u64, _: &[u8]) -> Result<(Vec<Vec<u8>>, bool)> {
                Ok((Vec::new(), false))
            }
            fn append(&mut self, batch: &Batch) -> Result<()> {
                (self.0)(batch)
            }
            fn release(&mut self) {}
        }
        struct Nobody;
        impl Follower for Nobody {
            fn unlock(&self, _: &WriteTxn) -> Result<StateKey> {
                Err(Error::integrity("following a rotation with no owner to unwrap the new key"))
            }
            fn committed(&self, _: &CaughtUp) -> Result<()> {
                Ok(())
            }
        }
        Link::new(Box::new(Recording(sink)), Arc::new(Nobody), std::time::Duration::MAX, None)
    }

    /// Whether a read must look at the log first.
    fn stale(&self) -> bool {
        if self.staleness_ms == u64::MAX {
            return false;
        }
        if self.must_look.load(Ordering::Acquire) {
            return true;
        }
        let mut fresh = self.synced_ms.load(Ordering::Acquire);
        if let Some(w) = &self.watch {
            // Loaded before what it vouches for: a heartbeat is recorded after the
            // notifications it delivered.
            let alive = w.alive_ms.load(Ordering::Acquire);
            let starts = w.starts.load(Ordering::Acquire);
            if starts != self.look_start.load(Ordering::Acquire) {
                // The listener started (again) since the last look: what was
                // committed while nobody listened is unknown. Look now.
                return true;
            }
            if w.notified.load(Ordering::Acquire) > self.known_gen.load(Ordering::Acquire) {
                // Another host's batch this copy lacks.
                return true;
            }
            if w.listening.load(Ordering::Acquire) {
                fresh = fresh.max(alive);
            }
        }
        crate::clock::boot_ms().saturating_sub(fresh) >= self.staleness_ms
    }

    /// Appends an optimistic write's batch (`Log::append_alone`): `Ok(true)` once
    /// the log has it, and the copy is then the log's newest as of the insert;
    /// `Ok(false)` when another writer was first.
    pub(super) fn append_alone(&self, batch: &Batch) -> Result<bool> {
        let mut log = self.log.lock();
        let (sent, mark) = (crate::clock::boot_ms(), self.mark());
        match log.append_alone(batch) {
            // The insert found the log ending where the copy did, at or after `sent`.
            Ok(true) => {
                self.synced_at(sent, mark, batch.after);
                Ok(true)
            }
            Ok(false) => Ok(false),
            Err(e) => {
                // The log may hold the batch all the same (its answer lost).
                self.look_next();
                Err(e)
            }
        }
    }

    /// Counts a write the log took without its lock.
    pub(super) fn wrote_alone(&self) {
        self.alone.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a write that ran again under the lock: another writer was first, or
    /// a look did not confirm its answer.
    pub(super) fn lost_alone(&self) {
        self.lost.fetch_add(1, Ordering::Relaxed);
    }

    /// The copy is known to lack what the log holds: a batch of this process's
    /// may be there (its answer lost, or the local commit failed after it), or the
    /// listener heard of a later generation. A write then takes the lock at once
    /// rather than try without it and lose.
    pub(super) fn behind(&self) -> bool {
        self.must_look.load(Ordering::Acquire)
            || self
                .watch
                .as_ref()
                .is_some_and(|w| w.notified.load(Ordering::Acquire) > self.known_gen.load(Ordering::Acquire))
    }

    /// The next read looks, whatever the bound and the listener say.
    fn look_next(&self) {
        self.must_look.store(true, Ordering::Release);
    }

    /// What a look that begins now must record when it ends.
    fn mark(&self) -> LookMark {
        match &self.watch {
            Some(w) => {
                let heard = w.heard.lock();
                LookMark {
                    starts: w.starts.load(Ordering::Acquire),
                    notified: w.notified.load(Ordering::Acquire),
                    heard: *heard,
                }
            }
            None => LookMark { starts: 0, notified: 0, heard: 0 },
        }
    }

    /// A look (or a locked write) that began at `ms` with `mark` found the log's end
    /// at `generation`, and the copy is there.
    fn synced_at(&self, ms: u64, mark: LookMark, generation: u64) {
        self.known_gen.fetch_max(generation, Ordering::AcqRel);
        self.look_start.fetch_max(mark.starts, Ordering::AcqRel);
        if let Some(w) = &self.watch
            && mark.notified > generation
        {
            // Heard before the look began, yet beyond the log's end: no batch's
            // commit sent it (any role that may connect can notify). Forgotten, or
            // it would make every read look — but only if nothing at all was heard
            // since the look began: a real batch's notification heard meanwhile
            // may name a generation below the forged one, and must not be lost.
            let heard = w.heard.lock();
            if *heard == mark.heard {
                w.notified.store(generation, Ordering::Release);
            }
        }
        self.must_look.store(false, Ordering::Release);
        self.synced_ms.fetch_max(ms, Ordering::AcqRel);
    }
}

/// The log's lock while a write holds it: released on every way out but `append`.
pub(super) struct Held<'a> {
    log: parking_lot::MutexGuard<'a, Box<dyn Log>>,
    link: &'a Link,
    /// `boot_ms` when the lock was granted: the copy is the log's newest from then.
    locked_ms: u64,
    mark: LookMark,
    open: bool,
}

impl Held<'_> {
    /// Appends the write's batch and releases the lock; the copy is then the log's
    /// newest as of the lock.
    pub(super) fn append(mut self, batch: &Batch) -> Result<()> {
        self.open = false;
        if let Err(e) = self.log.append(batch) {
            // The log may hold the batch all the same (its answer lost): the next
            // read looks, whatever the bound.
            self.link.look_next();
            return Err(e);
        }
        self.link.synced_at(self.locked_ms, self.mark, batch.after);
        Ok(())
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        if self.open {
            self.log.release();
        }
    }
}

thread_local! {
    /// Set while this thread holds a store's write lock (a write or a catch-up): its
    /// reads must not wait for the lock it holds.
    static IN_WRITE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Marks this thread as inside a write until dropped.
pub(super) struct InWrite(bool);

impl InWrite {
    pub(super) fn enter() -> InWrite {
        InWrite(IN_WRITE.with(|w| w.replace(true)))
    }
}

impl Drop for InWrite {
    fn drop(&mut self) {
        IN_WRITE.with(|w| w.set(self.0));
    }
}

impl Store {
    /// Joins this store to a fleet log: from now on every write goes through it,
    /// and reads catch up when the copy is older than the link's staleness bound.
    /// Once per store; refused for a store with a read journal or a rollback counter
    /// (both must move under the fleet's lock: not built).
    pub(crate) fn set_link(&self, link: Link) -> Result<()> {
        self.check_linkable()?;
        self.link.set(link).map_err(|_| Error::Config("this store is joined to a fleet log already".into()))
    }

    /// Arms the fleet-member check once the owner has opened the store: from now
    /// on, a copy of a fleet log reads and writes nothing until it is joined to it.
    pub(crate) fn arm_member_check(&self) -> Result<()> {
        let marked = self.fleet_mark_raw()?.is_some();
        self.fleet_member.store(marked, Ordering::Release);
        Ok(())
    }

    /// Marks this file as a fleet host's copy (once it is joined to its log): a
    /// handle that opens it without the log — a configuration that says `backend =
    /// "redb"`, the library without `fleet::attach` — reads and writes nothing,
    /// rather than serve what the fleet revoked or write what the fleet never sees.
    /// Not a covered row: a writer of the file can remove it, and then meets the
    /// log's own checks at the next look (exit 4).
    /// The mark names the log (`identity`: where it starts and when it was
    /// started), so that a database holding another log of this store is refused.
    /// Written only when it changes: a join of a marked copy commits nothing.
    pub(crate) fn mark_fleet_member(&self, identity: &[u8]) -> Result<()> {
        if self.fleet_mark_raw()?.as_deref() != Some(identity) {
            let _writer = self.lock_writers()?;
            let txn = self.begin_write(std::time::Instant::now())?;
            engine(|| {
                txn.open_table(super::META)?.insert(super::META_FLEET_MEMBER, identity)?;
                txn.commit()?;
                Ok(())
            })?;
        }
        self.fleet_member.store(true, Ordering::Release);
        Ok(())
    }

    /// The fleet log the mark names; `None` with no mark, or with a mark from before
    /// marks named their log (one byte).
    pub(crate) fn fleet_mark(&self) -> Result<Option<Vec<u8>>> {
        Ok(self.fleet_mark_raw()?.filter(|m| m.len() > 1))
    }

    /// Whether the file carries a fleet mark at all.
    pub(crate) fn fleet_mark_present(&self) -> Result<bool> {
        Ok(self.fleet_mark_raw()?.is_some())
    }

    fn fleet_mark_raw(&self) -> Result<Option<Vec<u8>>> {
        engine(|| {
            let txn = self.db.begin_read()?;
            let Ok(meta) = txn.open_table(super::META) else { return Ok(None) };
            Ok(meta.get(super::META_FLEET_MEMBER)?.map(|v| v.value().to_vec()))
        })
    }

    /// Lets this handle read a fleet copy without its log (`migrate
    /// --unjoined-copy`, when the log is lost): what it reads may lack the fleet's
    /// newest writes.
    pub(crate) fn disarm_member_check(&self) {
        self.fleet_member.store(false, Ordering::Release);
    }

    /// Refuses a read or write of a fleet host's copy that is not joined to its log.
    pub(super) fn check_member(&self) -> Result<()> {
        if self.fleet_member.load(Ordering::Acquire) && self.link.get().is_none() {
            return Err(Error::Config(format!(
                "{} is a fleet host's copy of a store whose log is in PostgreSQL: open it with the fleet's \
                 configuration ([store] backend = \"postgres\"), or take a store out of the fleet with `tokenguard \
                 migrate`",
                self.path.display()
            )));
        }
        Ok(())
    }

    /// The longest a write is expected to wait before it commits or fails (what a
    /// caller that must finish by a deadline plans with): its waits for the copy's
    /// locks share one busy timeout, and a copy of a fleet log adds the wait for the
    /// log's lock, bounded by the log's timeout. Its statements take no lock but
    /// that one (the optimistic insert only tries it), so they answer at once or
    /// fail the write when the database fails.
    pub(crate) fn write_takes(&self) -> std::time::Duration {
        let log = self.link.get().map_or(std::time::Duration::ZERO, |l| l.log.lock().timeout());
        self.opts.busy_timeout + log
    }

    /// How this process's writes reached the log; `None` for a store with no link.
    pub(crate) fn fleet_writes(&self) -> Option<crate::guard::FleetWrites> {
        let link = self.link.get()?;
        Some(crate::guard::FleetWrites {
            alone: link.alone.load(Ordering::Relaxed),
            lost: link.lost.load(Ordering::Relaxed),
        })
    }

    /// The link's health, for `doctor`; `None` for a store with no link.
    pub(crate) fn fleet_health(&self) -> Option<FleetHealth> {
        let link = self.link.get()?;
        let synced = self.sync();
        let listener = link.watch.as_ref().map(|w| ListenerHealth {
            listening: w.listening.load(Ordering::Acquire),
            connections: w.starts.load(Ordering::Acquire),
            proven: w.proven.load(Ordering::Acquire),
            heartbeat_age_ms: crate::clock::boot_ms().saturating_sub(w.alive_ms.load(Ordering::Acquire)),
            bound_ms: link.staleness_ms,
        });
        let queue_usage = link.log.lock().queue_usage();
        Some(FleetHealth { synced, listener, queue_usage })
    }

    /// Refuses what a fleet store does not support yet: a read journal or a
    /// rollback counter (both must move under the fleet's lock: not built).
    pub(crate) fn check_linkable(&self) -> Result<()> {
        if self.journal.lock().is_some() || self.counter_root().is_some() {
            return Err(Error::Config(
                "a fleet store with a read journal (the agent's durable read audit) or a rollback counter is not \
                 supported yet"
                    .into(),
            ));
        }
        Ok(())
    }

    /// The copy is no longer known to be the log's newest: the next read looks.
    pub(super) fn unsync(&self) {
        if let Some(link) = self.link.get() {
            link.look_next();
        }
    }

    /// Before a read: a copy older than the staleness bound catches up first. Not
    /// from inside a write of this thread (the write caught up under the log's lock).
    pub(super) fn read_current(&self) -> Result<()> {
        match self.link.get() {
            Some(link) if link.stale() && !IN_WRITE.with(std::cell::Cell::get) => self.sync().map(drop),
            _ => Ok(()),
        }
    }

    /// Applies every batch the log holds after this copy's generation; returns the
    /// generation reached. A store with no link is current by definition.
    pub(crate) fn sync(&self) -> Result<u64> {
        self.check_member()?;
        let Some(link) = self.link.get() else { return self.head_generation() };
        let stale_at_call = link.stale();
        let _writer = self.lock_writers()?;
        let _in = InWrite::enter();
        // Another thread caught up while this one waited: single flight.
        if stale_at_call && !link.stale() {
            return self.head_generation();
        }
        self.look(link).map(|out| out.after)
    }

    /// A look at the log under the store's write lock (not the log's): the batches
    /// after this copy's generation applied, and the copy the log's newest as of
    /// when the look began.
    pub(super) fn look(&self, link: &Link) -> Result<CaughtUp> {
        let (started, mark) = (crate::clock::boot_ms(), link.mark());
        let mut log = link.log.lock();
        let out = self.catch_up_pages(link, &mut log)?;
        link.synced_at(started, mark, out.after);
        Ok(out)
    }

    /// The write lock of the log, and this copy caught up under it (called by
    /// `write_inner`, under the store's write lock). A catch-up that rotated the
    /// integrity key or blocked this handle's writes fails the write: what its body
    /// prepared may stand on the old keys.
    pub(super) fn lock_log(&self) -> Result<Option<Held<'_>>> {
        let Some(link) = self.link.get() else { return Ok(None) };
        let mut log = link.log.lock();
        let mark = link.mark();
        log.lock()?;
        let mut held = Held { log, link, locked_ms: crate::clock::boot_ms(), mark, open: true };
        let out = self.catch_up_pages(link, &mut held.log)?;
        if out.rekeyed {
            return Err(Error::FleetConflict { generation: out.after });
        }
        if let Some(message) = self.unfolded.lock().clone() {
            return Err(Error::Config(message));
        }
        Ok(Some(held))
    }

    /// Catch-up rounds until the log has no more (under the store's write lock).
    fn catch_up_pages(&self, link: &Link, log: &mut Box<dyn Log>) -> Result<CaughtUp> {
        let follower = link.follower.clone();
        let mut total: Option<CaughtUp> = None;
        loop {
            let mut more = false;
            let out = self.catch_up_locked(
                &mut |generation, head| {
                    let (page, full) = log.since(generation, head)?;
                    if full && page.is_empty() {
                        // Another round would ask the same again, forever.
                        return Err(Error::integrity("reading the fleet log: a full page that holds no batch"));
                    }
                    more = full;
                    Ok(page)
                },
                &mut |txn| follower.unlock(txn),
                &mut |out| follower.committed(out),
            )?;
            let sum = match total {
                Some(t) => CaughtUp { before: t.before, after: out.after, rekeyed: t.rekeyed || out.rekeyed },
                None => out,
            };
            total = Some(sum);
            if !more {
                return Ok(sum);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! The rules of [`Link::stale`] with a listener, driven by hand: what the
    //! listener heard and when, against what the copy's looks found.
    #![allow(clippy::unwrap_used)]

    use std::sync::{Arc, Weak};
    use std::time::Duration;

    use super::*;

    struct NoLog;
    impl Log for NoLog {
        fn lock(&mut self) -> Result<()> {
            Ok(())
        }
        fn since(&mut self, _: u64, _: &[u8]) -> Result<(Vec<Vec<u8>>, bool)> {
            Ok((Vec::new(), false))
        }
        fn append(&mut self, _: &Batch) -> Result<()> {
            Ok(())
        }
        fn release(&mut self) {}
    }
    struct NoFollower;
    impl Follower for NoFollower {
        fn unlock(&self, _: &WriteTxn) -> Result<StateKey> {
            Err(Error::integrity("not in these tests"))
        }
        fn committed(&self, _: &CaughtUp) -> Result<()> {
            Ok(())
        }
    }

    /// A link with a 60 s bound and a listener whose watch the test keeps, the
    /// listener up and the copy just looked (at generation 5).
    fn listening() -> (Link, Arc<Watch>) {
        let slot: Arc<parking_lot::Mutex<Option<Weak<Watch>>>> = Arc::default();
        let keep = slot.clone();
        let link = Link::new(
            Box::new(NoLog),
            Arc::new(NoFollower),
            Duration::from_secs(60),
            Some(Box::new(move |w| *keep.lock() = Some(w))),
        );
        let w = slot.lock().take().unwrap().upgrade().unwrap();
        w.started(crate::clock::boot_ms());
        assert!(link.stale(), "a listener that started since the last look: look first");
        look(&link, 5);
        w.alive(crate::clock::boot_ms());
        assert!(!link.stale());
        (link, w)
    }

    fn look(link: &Link, reached: u64) {
        let mark = link.mark();
        link.synced_at(crate::clock::boot_ms(), mark, reached);
    }

    #[test]
    fn a_forged_generation_never_erases_a_real_one_heard_during_a_look() {
        let (link, w) = listening();
        w.heard(1_000_000);
        assert!(link.stale());
        // A look begins; a real batch (6) is committed and heard during it; the
        // look's snapshot ended at 5.
        let mark = link.mark();
        w.heard(6);
        link.synced_at(crate::clock::boot_ms(), mark, 5);
        w.alive(crate::clock::boot_ms());
        assert!(link.stale(), "the notification of batch 6 was erased with the forged one");
        // A look that reaches 6, with nothing heard meanwhile, forgets the forgery.
        look(&link, 6);
        assert!(!link.stale(), "a forged generation makes every read look");
    }

    #[test]
    fn a_failed_local_commit_or_a_lost_append_answer_makes_the_next_read_look() {
        let (link, w) = listening();
        // The append reached the log (generation 6 recorded), the local commit failed.
        look(&link, 6);
        link.look_next();
        w.alive(crate::clock::boot_ms());
        assert!(link.stale(), "the listener vouched for a copy that lacks its own batch");
        look(&link, 6);
        assert!(!link.stale());
    }

    #[test]
    fn a_listener_that_reconnects_or_goes_quiet_stops_vouching() {
        let (link, w) = listening();
        w.lost();
        w.started(crate::clock::boot_ms());
        assert!(link.stale(), "what was committed while nobody listened was heard by nobody");
        look(&link, 5);
        assert!(!link.stale());
        // Lost, and not back: the plain bound from the last look (60 s) holds.
        w.lost();
        assert!(!link.stale());
    }
}
