//! Adding and removing roots.
//!
//! Each change is one write transaction, so a crash half-way leaves the store exactly
//! as before. Adding wraps the integrity key and every live DEK under the new root.
//! Removing also replaces the integrity key and rotates every provider's DEK, so the
//! removed root is cut off from everything written afterwards (the records are then
//! moved by `reencrypt`, resumable, and the old versions erased by `retire`). A root
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

    /// The pinned roots that this guard has no configured key for: after a restore of
    /// a backup older than a `root remove`, the removed root is pinned again and must
    /// be removed again.
    pub fn unconfigured_roots(&self) -> Result<Vec<RootPin>> {
        let pins = self.pinned_roots()?;
        let missing = self.inner.unconfigured(&pins);
        Ok(pins.iter().filter(|p| missing.contains(&p.description.as_str())).cloned().collect())
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
            let ik_plain = DekMaterial::from_slice(&inner.keys().integrity_key[..])?;
            Counters::add(&inner.counters.wraps, 1);
            let w = root.wrap(&ik_plain)?;
            // The new root must open what it wrapped before it is pinned (finding 11).
            super::check_wrap(&*root, &w, &ik_plain, &inner.counters)?;
            ik.push(RootWrapped { root_id, wrapped: w });

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

    /// Removes root `root_id` and cuts it off from everything written afterwards, in
    /// one transaction:
    /// - its wraps are erased and it is unpinned;
    /// - every provider's data key is rotated: new versions are wrapped under the
    ///   remaining roots only (the old ones stay readable, decrypt-only, until
    ///   [`TokenGuard::reencrypt`] has moved the records and [`TokenGuard::retire`]
    ///   has erased them — `tokenguard root remove` runs both);
    /// - the integrity key is replaced, and with it the state key, the audit key
    ///   (earlier audit keys are archived under the new integrity key) and the backup
    ///   MAC key, so the removed root can neither read nor forge anything written
    ///   from now on.
    ///
    /// Refused when it is the last root, when only PCR-bound roots would remain, or
    /// when a remaining root is not configured in this process (each one must wrap
    /// the new keys). Other processes that have the store open must reopen it: their
    /// next use of the store fails with an integrity error until they do.
    pub fn remove_root(&self, root_id: u16) -> Result<RootPin> {
        let inner = &*self.inner;
        let old = inner.keys();
        let new_ik = crate::crypto::new_integrity_key()?;
        let new_keys = std::cell::RefCell::new(None);
        let state_key = crate::store::state::StateKey::derive(new_ik.expose());
        let out = inner.with_created(
            |body, _| inner.store.rekey(state_key, crate::store::AnchorWrite::Advance, |txn| body(txn)),
            |txn| {
                let meta = txn.meta()?;
                let pins = meta.roots;
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
                let missing = inner.unconfigured(&rest);
                if !missing.is_empty() {
                    return Err(Error::InvalidInput(format!(
                        "refusing to remove root {root_id}: every remaining root must be configured in this process, \
                     to wrap the new integrity key and data keys; missing: {}",
                        missing.join("; ")
                    )));
                }
                // An identity rebuilt from shares for this one command does not count:
                // the configurations that run afterwards would have no way in.
                let opens = |p: &RootPin| {
                    inner.roots.iter().any(|r| r.root_id == p.root_id && r.key.can_unwrap() && !r.key.recovery_only())
                };
                if !rest.iter().any(opens) {
                    return Err(Error::InvalidInput(format!(
                        "refusing to remove root {root_id}: every remaining root is wrap-only (age recipients without \
                         an identity, or with one rebuilt from shares for this command only), so no configuration \
                         would open the store again; add a root first"
                    )));
                }
                // 1. The removed root's wraps go, and it is unpinned (so the new data keys
                //    below are made for the remaining roots only).
                let ik_rest: Vec<RootWrapped> =
                    meta.integrity_key.into_iter().filter(|w| w.root_id != root_id).collect();
                txn.put_roots(&rest, &ik_rest)?;
                let mut live_providers = Vec::new();
                for (provider, mut e) in txn.deks(None, None)? {
                    let before = e.wrapped.len();
                    e.wrapped.retain(|w| w.root_id != root_id);
                    if e.wrapped.len() != before {
                        txn.put_dek(&provider, &e)?;
                    }
                    if e.state == DekState::Active && live_providers.last() != Some(&provider) {
                        live_providers.push(provider);
                    }
                }
                // 2. A new data key per provider: what is written from now on is out of
                //    the removed root's reach.
                for provider in &live_providers {
                    let (highest, active) = inner.dek_versions(txn, provider)?;
                    if let Some(e) = active {
                        inner.set_dek_state(txn, provider, e, DekState::DecryptOnly)?;
                    }
                    inner.create_dek(txn, provider, highest + 1, "dek-rotate")?;
                }
                // 3. The last event under the old audit key.
                let last_seq = crate::audit::append(
                    txn,
                    &old.audit,
                    &inner.actor(),
                    NewEvent {
                        op: "root-remove",
                        outcome: "ok",
                        detail: format!(
                            "root {root_id}: {}; integrity key replaced, data keys rotated for {} providers",
                            gone.description,
                            live_providers.len()
                        ),
                        ..Default::default()
                    },
                )?;
                // 4. The new integrity key under every remaining root, and the audit keys
                //    of earlier eras archived under it.
                *new_keys.borrow_mut() = Some(inner.replace_integrity_key(txn, &rest, &new_ik, &old, last_seq)?);
                Ok(gone)
            },
        );
        if out.is_ok()
            && let Some(k) = new_keys.into_inner()
        {
            *crate::sync::write(&inner.keys) = std::sync::Arc::new(k);
            tracing::warn!(root_id, "root removed; integrity key replaced and data keys rotated");
        }
        out
    }
}

impl super::Inner {
    /// In a rekeying write transaction: wraps `new_ik` under every root of `pins`
    /// (each must be configured here), pins them with it, and archives the audit key
    /// in force for the events up to `last_seq` under it. Returns the keys this guard
    /// uses once the transaction commits.
    pub(super) fn replace_integrity_key(
        &self,
        txn: &impl StoreWrite,
        pins: &[RootPin],
        new_ik: &DekMaterial,
        old: &super::GuardKeys,
        last_seq: u64,
    ) -> Result<super::GuardKeys> {
        let mut wrapped = Vec::new();
        for p in pins {
            let r = self.roots.iter().find(|r| r.root_id == p.root_id).ok_or_else(|| {
                Error::InvalidInput(format!(
                    "replacing the integrity key needs every pinned root configured in this process; missing: {}",
                    p.description
                ))
            })?;
            wrapped.push(RootWrapped { root_id: r.root_id, wrapped: r.wrap_checked(new_ik, &self.counters)? });
        }
        txn.put_roots(pins, &wrapped)?;
        let (audit, sealed) = old.audit.rotated(new_ik.expose(), last_seq)?;
        txn.put_audit_archive(&sealed)?;
        Ok(super::GuardKeys { integrity_key: zeroize::Zeroizing::new(*new_ik.expose()), audit, archive: Some(sealed) })
    }
}
