//! Adding and removing roots: rewrap only, never a token touched.
//!
//! Each change is one write transaction: the new root's wrap of the integrity key
//! and of every live DEK, or the removal of a root's wraps, and the pinned-roots list
//! all commit together — a crash half-way leaves the store exactly as before. A root
//! rotation is "add the new key, move the config to it, remove the old one".

use super::{Counters, TokenGuard};
use crate::audit::NewEvent;
use crate::error::{Error, Result};
use crate::root::RootKey;
use crate::secret::DekMaterial;
use crate::store::{DekState, RootPin, RootWrapped, StoreRead, StoreWrite};

impl TokenGuard {
    /// The roots pinned in the store now (re-read; another process may have changed
    /// them since this guard opened).
    pub fn pinned_roots(&self) -> Result<Vec<RootPin>> {
        self.inner.store.read()?.roots()
    }

    /// Pins `root` in the store and wraps the integrity key and every live DEK under
    /// it, in one transaction. This guard's own roots unwrap them (O(DEKs) hardware
    /// unwraps). Reopen guards afterwards to use the new root.
    pub fn add_root(&self, root: Box<dyn RootKey>) -> Result<RootPin> {
        let inner = &*self.inner;
        let id = root.identity()?;
        inner.write(|txn| {
            let meta = txn.meta()?;
            let (mut pins, mut ik) = (meta.roots, meta.integrity_key);
            if pins.iter().any(|p| p.pin == id.pin()) {
                return Err(Error::InvalidInput(format!("{} is already a root of this store", id.description)));
            }
            let root_id = pins.iter().map(|p| p.root_id).max().unwrap_or(0) + 1;
            let pin = RootPin { root_id, pin: id.pin(), description: id.description.clone() };

            // The integrity key.
            let ik_plain = DekMaterial::from_slice(&inner.integrity_key[..])?;
            Counters::add(&inner.counters.wraps, 1);
            ik.push(RootWrapped { root_id, wrapped: root.wrap(&ik_plain)? });

            // Every DEK that still has material.
            let mut n = 0;
            for (provider, mut e) in txn.deks(None, None)? {
                if matches!(e.state, DekState::Retired | DekState::Destroyed) {
                    continue;
                }
                let dek = inner.unwrap_entry(&e)?;
                Counters::add(&inner.counters.wraps, 1);
                e.wrapped.push(RootWrapped { root_id, wrapped: root.wrap(&dek)? });
                txn.put_dek(&provider, &e)?;
                n += 1;
            }
            pins.push(pin.clone());
            txn.put_roots(&pins, &ik)?;
            inner.audit(
                txn,
                NewEvent {
                    op: "root-add",
                    outcome: "ok",
                    detail: format!(
                        "root {root_id}: {} ({n} data keys wrapped, at {})",
                        id.description,
                        crate::clock::now()
                    ),
                    ..Default::default()
                },
            )?;
            Ok(pin)
        })
    }

    /// Unpins root `root_id` and erases its wraps, in one transaction. Refused when it
    /// is the last root, or when none of the remaining roots is configured in this
    /// process (nothing here could then prove the store still opens).
    pub fn remove_root(&self, root_id: u16) -> Result<RootPin> {
        let inner = &*self.inner;
        inner.write(|txn| {
            let meta = txn.meta()?;
            let (pins, mut ik) = (meta.roots, meta.integrity_key);
            let Some(gone) = pins.iter().find(|p| p.root_id == root_id).cloned() else {
                return Err(Error::NotFound { provider: "root".into(), name: root_id.to_string() });
            };
            let rest: Vec<RootPin> = pins.into_iter().filter(|p| p.root_id != root_id).collect();
            if rest.is_empty() {
                return Err(Error::InvalidInput(
                    "refusing to remove the last root: the store would never open again".into(),
                ));
            }
            if rest.iter().all(|p| p.pin.contains(crate::root::POLICY_BOUND_MARKER)) {
                return Err(Error::InvalidInput(
                    "refusing to leave only PCR-bound roots: a firmware or boot change would lock the store".into(),
                ));
            }
            if !rest.iter().any(|p| inner.roots.iter().any(|r| r.root_id == p.root_id)) {
                return Err(Error::InvalidInput(format!(
                    "refusing to remove root {root_id}: configure one of the remaining roots in this process first, so the store is known to open without it"
                )));
            }
            ik.retain(|w| w.root_id != root_id);
            for (provider, mut e) in txn.deks(None, None)? {
                let before = e.wrapped.len();
                e.wrapped.retain(|w| w.root_id != root_id);
                if e.wrapped.len() != before {
                    txn.put_dek(&provider, &e)?;
                }
            }
            txn.put_roots(&rest, &ik)?;
            inner.audit(
                txn,
                NewEvent { op: "root-remove", outcome: "ok", detail: format!("root {root_id}: {}", gone.description), ..Default::default() },
            )?;
            Ok(gone)
        })
    }
}
