//! Read snapshots kept from one read to the next, in exclusive mode.
//!
//! Beginning a redb read transaction registers it with the database's transaction
//! tracker, under a mutex every reading thread shares; ending it takes that mutex
//! again. On the warm `get` path that is most of the engine's cost, and the point
//! where two threads reading at once wait for each other.
//!
//! In exclusive mode this process is the only writer (redb locks the whole file), so
//! a snapshot stays the newest state until this process commits. Each thread
//! therefore keeps its snapshot in a slot of its own and reuses it until the store's
//! commit count moves; the commit then drops every stale snapshot it can lock, so a
//! kept snapshot never pins pages for longer than one commit.
//!
//! A slot is taken with `try_lock`: a thread whose slot is busy (a nested read, or
//! more threads than slots) begins a fresh transaction, exactly as in shared mode.
//! Shared mode keeps no slots: another process may commit at any time.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use parking_lot::{MappedMutexGuard, Mutex, MutexGuard};
use redb::{ReadOnlyTable, ReadTransaction};

/// The `tokens` table, as a kept snapshot holds it open.
pub(super) type TokensTable = ReadOnlyTable<(&'static str, &'static str), &'static [u8]>;

/// The kept snapshot of one slot.
pub(super) struct Kept {
    pub(super) txn: ReadTransaction,
    /// The `tokens` table, opened once per snapshot (`None`: the file has none).
    pub(super) tokens: Option<TokensTable>,
    /// The state floor read before the snapshot began (see `Store::read`).
    pub(super) floor: u64,
    /// The commit count read before the snapshot began (set by the slot).
    commits: u64,
}

impl Kept {
    pub(super) fn new(txn: ReadTransaction, tokens: Option<TokensTable>, floor: u64) -> Self {
        Kept { txn, tokens, floor, commits: 0 }
    }
}

/// One slot, alone on its cache lines, so threads reading their own slots do not
/// share a line.
#[repr(align(128))]
struct Slot(Mutex<Option<Kept>>);

/// The kept snapshots of one store.
pub(super) struct Snapshots {
    slots: Box<[Slot]>,
    commits: AtomicU64,
}

/// A thread's slot index (the same for every store; slots are per store).
fn thread_index() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local!(static INDEX: usize = NEXT.fetch_add(1, Ordering::Relaxed));
    INDEX.with(|i| *i)
}

impl Snapshots {
    /// Slots for `enabled` (exclusive mode): twice the machine's parallelism,
    /// between 4 and 64; none otherwise.
    pub(super) fn new(enabled: bool) -> Self {
        let n = if enabled {
            std::thread::available_parallelism().map_or(4, |n| n.get().saturating_mul(2)).clamp(4, 64)
        } else {
            0
        };
        Snapshots { slots: (0..n).map(|_| Slot(Mutex::new(None))).collect(), commits: AtomicU64::new(0) }
    }

    /// This thread's slot holding a current snapshot: kept, or made by `begin`
    /// after the commit count is read. A kept snapshot is current while no commit
    /// happened since it began and its floor is still the state's `floor` (a floor
    /// that moved since, by a commit or a verification, is the one a fresh read would
    /// be checked against). `None`: no slots (shared mode) or the slot is busy; the
    /// caller reads a fresh snapshot.
    pub(super) fn current(
        &self,
        floor: u64,
        begin: impl FnOnce() -> crate::error::Result<Kept>,
    ) -> Option<crate::error::Result<MappedMutexGuard<'_, Kept>>> {
        if self.slots.is_empty() {
            return None;
        }
        let mut slot = self.slots[thread_index() % self.slots.len()].0.try_lock()?;
        let commits = self.commits.load(Ordering::Acquire);
        if slot.as_ref().is_none_or(|k| k.commits != commits || k.floor != floor) {
            // The stale snapshot goes first, so its pages are free for the new one.
            *slot = None;
            match begin() {
                Ok(kept) => *slot = Some(Kept { commits, ..kept }),
                Err(e) => return Some(Err(e)),
            }
        }
        MutexGuard::try_map(slot, Option::as_mut).ok().map(Ok)
    }

    /// After a commit: every kept snapshot is stale. Those not in use are dropped
    /// now; one in use is replaced at its thread's next read.
    pub(super) fn committed(&self) {
        let now = self.commits.fetch_add(1, Ordering::AcqRel) + 1;
        for s in &*self.slots {
            if let Some(mut slot) = s.0.try_lock()
                && slot.as_ref().is_some_and(|k| k.commits != now)
            {
                *slot = None;
            }
        }
    }

    /// Snapshots kept now (tests).
    #[cfg(test)]
    pub(super) fn kept(&self) -> usize {
        self.slots.iter().filter(|s| s.0.lock().is_some()).count()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::super::{Snapshot, Store};
    use crate::store::schema::Tombstone;
    use crate::store::state::StateKey;
    use crate::store::{StoreMeta, StoreMode, StoreOptions, StoreRead, StoreWrite};

    fn store(dir: &std::path::Path, mode: StoreMode) -> Store {
        let meta = StoreMeta { schema: 0, store_id: [1; 16], roots: Vec::new(), integrity_key: Vec::new() };
        let opts = StoreOptions { mode, ..Default::default() };
        Store::create(&dir.join("s.redb"), opts, &meta, StateKey::derive(&[7; 32]), 1, |_| Ok(())).unwrap()
    }

    fn tomb() -> Tombstone {
        Tombstone { revoked_at: 1, reason: "r".into(), actor: "a".into(), expires_at: None, labels: Default::default() }
    }

    #[test]
    fn a_snapshot_in_use_during_a_commit_is_renewed_at_its_next_read() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path(), StoreMode::Exclusive);
        let held = s.read().unwrap();
        assert!(matches!(held.0, Snapshot::Kept(_)));
        // Another thread commits while this thread's slot is in use: the sweep cannot
        // take it, so only the commit count tells this thread's next read.
        std::thread::scope(|t| t.spawn(|| s.write(|w| w.put_tombstone("p", "n", Some(&tomb())))).join().unwrap())
            .unwrap();
        assert!(held.tombstone("p", "n").unwrap().is_none(), "a snapshot sees the state it began in");
        // A nested read on the same thread finds the slot busy and reads afresh.
        let nested = s.read().unwrap();
        assert!(matches!(nested.0, Snapshot::Fresh(_)));
        assert!(nested.tombstone("p", "n").unwrap().is_some());
        drop((nested, held));
        assert!(s.read().unwrap().tombstone("p", "n").unwrap().is_some(), "the kept snapshot was not renewed");
        // Idle kept snapshots end with the next commit: none pins its pages longer.
        s.write(|w| w.put_tombstone("p", "m", Some(&tomb()))).unwrap();
        assert_eq!(s.snapshots.kept(), 0);
        assert!(s.read().unwrap().tombstone("p", "m").unwrap().is_some());
        assert_eq!(s.snapshots.kept(), 1);
    }

    #[test]
    fn shared_mode_keeps_no_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path(), StoreMode::Shared);
        assert!(matches!(s.read().unwrap().0, Snapshot::Fresh(_)));
        assert_eq!(s.snapshots.kept(), 0);
    }
}
