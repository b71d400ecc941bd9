//! A fleet host's side of the write log (docs/FLEET-DESIGN.md): every write of this
//! guard hands on its sealed batch before it commits, and [`TokenGuard::catch_up`]
//! applies the batches other hosts wrote, checked, to this host's store.

use std::sync::{Arc, Weak};

use super::{GuardKeys, Inner, TokenGuard};
use crate::error::{Error, Result};
use crate::secret::DekMaterial;
use crate::store::StoreRead;
use crate::store::redb_store::{CaughtUp, Follower, Link, Log, WriteTxn};
use crate::store::schema::RootPin;
use crate::store::state::StateKey;

/// The guard's side of following other hosts' batches (see `Follower`): held by the
/// store's link, so only weakly (the guard owns the store).
struct GuardFollower {
    inner: Weak<Inner>,
    /// The integrity key `unlock` opened, for `committed` to install.
    new_ik: std::sync::Mutex<Option<DekMaterial>>,
}

impl GuardFollower {
    fn guard(&self) -> Result<TokenGuard> {
        self.inner
            .upgrade()
            .map(|inner| TokenGuard { inner })
            .ok_or_else(|| Error::Config("the guard of this store was closed".into()))
    }
}

impl Follower for GuardFollower {
    fn unlock(&self, txn: &WriteTxn) -> Result<StateKey> {
        let g = self.guard()?;
        let inner = &*g.inner;
        let meta = txn.meta()?;
        let mut last = None;
        for r in inner.roots.iter().filter(|r| r.key.can_unwrap()) {
            // Only a root pinned under the same id *and* identity it had when this
            // guard opened (ids are reused after a removal).
            let still = |p: &&RootPin| p.root_id == r.root_id && inner.pins.iter().any(|q| q == *p);
            if !meta.roots.iter().any(|p| still(&p)) {
                continue;
            }
            let Some(w) = meta.integrity_key.iter().find(|w| w.root_id == r.root_id) else { continue };
            match r.key.unwrap(&w.wrapped) {
                Ok(ik) => {
                    let key = StateKey::derive(ik.expose());
                    *crate::sync::lock(&self.new_ik) = Some(ik);
                    return Ok(key);
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| Error::WrongRoot {
            pinned: meta.roots.iter().map(|p| p.root_id.to_string()).collect::<Vec<_>>().join(", "),
            found: "one that does not open the integrity key another host's batch put in place (this host's root \
                    was removed there)"
                .into(),
        }))
    }

    fn committed(&self, _: &CaughtUp) -> Result<()> {
        let new_ik = crate::sync::lock(&self.new_ik).take();
        self.guard()?.follow_committed(new_ik)
    }
}

impl TokenGuard {
    fn follower(&self) -> Arc<GuardFollower> {
        Arc::new(GuardFollower { inner: Arc::downgrade(&self.inner), new_ik: std::sync::Mutex::new(None) })
    }

    /// Joins this guard's store to a fleet log (`crate::fleet`): every later write
    /// has its batch in the log, on top of the log's newest state, before it
    /// commits here; a read catches up first when the last look at the log is older than
    /// `staleness`. Once per guard.
    #[cfg_attr(not(feature = "postgres"), expect(dead_code, reason = "the fleet log is its one user"))]
    pub(crate) fn attach_log(
        &self,
        log: Box<dyn Log>,
        staleness: std::time::Duration,
        listener: Option<crate::store::redb_store::Starter>,
    ) -> Result<()> {
        self.inner.store.set_link(Link::new(log, self.follower(), staleness, listener))
    }

    /// Hands every later write's sealed batch to `sink` before the write commits
    /// here; an error from `sink` aborts the write.
    #[cfg(test)]
    pub(crate) fn set_batch_sink(
        &self,
        sink: impl FnMut(&crate::store::redb_store::txn::Batch) -> Result<()> + Send + 'static,
    ) {
        self.inner.store.set_batch_sink(sink).expect("a store takes one sink");
    }

    /// Applies every batch of the fleet log after this store's generation, now;
    /// returns the generation reached. (Reads do this by themselves when the copy is
    /// older than the staleness bound, and writes always.)
    pub fn sync(&self) -> Result<u64> {
        self.inner.store.sync()
    }

    /// Applies the batches `fetch` returns (sealed by other hosts' writes, in
    /// generation order, after the generation it is given) to this guard's store;
    /// see `Store::catch_up` for what is checked and when `fetch` runs. A batch that rotated
    /// the integrity key (a `root remove` elsewhere) is followed when one of this
    /// guard's roots opens the new key: the guard's audit keys follow it, and its
    /// cached data keys are dropped. A host whose root was removed opens nothing
    /// written after the removal: its catch-up fails with [`Error::WrongRoot`].
    #[cfg(test)]
    pub(crate) fn catch_up(&self, mut fetch: impl FnMut(u64) -> Result<Vec<Vec<u8>>>) -> Result<CaughtUp> {
        let follower = self.follower();
        let out = self
            .inner
            .store
            .catch_up(&mut fetch, &mut |txn| follower.unlock(txn), &mut |out| follower.committed(out))?;
        Ok(out)
    }

    /// After a committed catch-up, under the store's write lock: the guard's audit
    /// keys follow a rotated integrity key (its cached data keys are dropped), and a
    /// change of the pinned roots blocks this guard's writes until the store is
    /// opened again — the roots it wraps new keys for are the ones it opened with,
    /// and an id may now name another root.
    fn follow_committed(&self, new_ik: Option<DekMaterial>) -> Result<()> {
        let inner = &*self.inner;
        let block = |why: &str| {
            tracing::warn!(why, "this handle writes nothing until the store is opened again");
            inner.store.block_writes(format!(
                "not writing: {why}; open the store again to follow (this handle would wrap new keys for the roots \
                 it was opened with)"
            ));
        };
        let followed = (|| {
            let read = inner.store.read()?;
            // First: nothing below may leave a roots change unblocked.
            if read.meta()?.roots != inner.pins {
                block("the store's pinned roots changed (a `root add` or `root remove`, here or on another host)");
            }
            if let Some(ik) = new_ik {
                let archive = read.audit_archive()?;
                let audit = crate::audit::AuditKeys::load(ik.expose(), archive.as_deref())?;
                *crate::sync::write(&inner.keys) =
                    Arc::new(GuardKeys { integrity_key: zeroize::Zeroizing::new(*ik.expose()), audit, archive });
                inner.cache.clear();
            }
            Ok(())
        })();
        if let Err(e) = &followed {
            // The catch-up committed, but this handle could not follow it.
            block(&format!("following a caught-up batch failed ({e})"));
        }
        followed
    }

    /// Marks the store file as a copy of the fleet log `identity` (see
    /// `Store::mark_fleet_member`).
    #[cfg_attr(not(feature = "postgres"), expect(dead_code, reason = "the fleet log is its one user"))]
    pub(crate) fn mark_fleet_member(&self, identity: &[u8]) -> Result<()> {
        self.inner.store.mark_fleet_member(identity)
    }

    /// Lets this handle of a fleet host's copy read and write without its log — the
    /// way out when the log is lost (`migrate --unjoined-copy`). Refused for a store
    /// that is not a fleet copy.
    pub(crate) fn use_unjoined_copy(&self) -> Result<()> {
        if self.inner.store.fleet_mark_present()? {
            self.inner.store.disarm_member_check();
            Ok(())
        } else {
            Err(Error::InvalidInput("this store is not a fleet host's copy: migrate it without --unjoined-copy".into()))
        }
    }

    /// The fleet log this store file is a copy of, as its mark names it (`None`:
    /// not a fleet copy, or one marked before marks named their log).
    #[cfg_attr(not(feature = "postgres"), expect(dead_code, reason = "the fleet log is its one user"))]
    pub(crate) fn fleet_mark(&self) -> Result<Option<Vec<u8>>> {
        self.inner.store.fleet_mark()
    }

    /// Refuses a store that cannot join a fleet log (a read journal, a rollback
    /// counter), before anything is written to the log's database.
    #[cfg_attr(not(feature = "postgres"), expect(dead_code, reason = "the fleet log is its one user"))]
    pub(crate) fn check_linkable(&self) -> Result<()> {
        self.inner.store.check_linkable()
    }

    /// Whether the store's pinned roots are no longer those this guard opened with
    /// (a fleet copy that caught up a roots change made on another host): the
    /// guard writes nothing, and must be opened again to follow.
    pub fn roots_moved(&self) -> Result<bool> {
        Ok(self.inner.store.read()?.meta()?.roots != self.inner.pins)
    }

    /// The store's state head as it is now: its generation (MAC checked) and its
    /// encoded bytes.
    #[cfg_attr(not(any(feature = "postgres", test)), expect(dead_code, reason = "the fleet log is its one user"))]
    pub(crate) fn state_head(&self) -> Result<(u64, Vec<u8>)> {
        self.inner.store.state_head()
    }

    /// The generation of the store's state head as it is now (its MAC checked).
    #[cfg(test)]
    pub(crate) fn generation(&self) -> Result<u64> {
        self.inner.store.head_generation()
    }
}
