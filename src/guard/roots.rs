//! Adding and removing roots: rewrap only, never a token touched.
//!
//! Each change is one write transaction: the new root's wrap of the integrity key
//! and of every live DEK, or the removal of a root's wraps, and the pinned-roots list
//! all commit together — a crash half-way leaves the store exactly as before. A root
//! rotation is "add the new key, move the config to it, remove the old one".

use redb::{ReadableTable, WriteTransaction};

use super::{TokenGuard, now};
use crate::audit::NewEvent;
use crate::error::{Error, Result};
use crate::root::RootKey;
use crate::secret::DekMaterial;
use crate::store::schema::{self, DekEntry, DekState, RootPin, RootWrapped};
use crate::store::{self as st};

impl TokenGuard {
    /// The roots pinned in the store now (re-read; another process may have changed
    /// them since this guard opened).
    pub fn pinned_roots(&self) -> Result<Vec<RootPin>> {
        let txn = self.inner.store.read()?;
        schema::decode_roots(
            &st::meta_get(&txn, st::META_ROOTS)?.ok_or_else(|| Error::integrity("reading the pinned roots"))?,
        )
    }

    /// Pins `root` in the store and wraps the integrity key and every live DEK under
    /// it, in one transaction. This guard's own roots unwrap them (O(DEKs) hardware
    /// unwraps). Reopen guards afterwards to use the new root.
    pub fn add_root(&self, root: Box<dyn RootKey>) -> Result<RootPin> {
        let inner = &*self.inner;
        let id = root.identity()?;
        inner.store.write(|txn| {
            let (mut pins, mut ik) = read_roots(txn)?;
            if pins.iter().any(|p| p.pin == id.pin()) {
                return Err(Error::InvalidInput(format!("{} is already a root of this store", id.description)));
            }
            let root_id = pins.iter().map(|p| p.root_id).max().unwrap_or(0) + 1;
            let pin = RootPin { root_id, pin: id.pin(), description: id.description.clone() };

            // The integrity key.
            let ik_plain = DekMaterial::from_slice(&inner.integrity_key[..])?;
            inner.counters.wraps.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            ik.push(RootWrapped { root_id, wrapped: root.wrap(&ik_plain)? });

            // Every DEK that still has material.
            let entries = all_deks(txn)?;
            let mut deks = txn.open_table(st::DEKS)?;
            let mut n = 0;
            for (provider, mut e) in entries {
                if matches!(e.state, DekState::Retired | DekState::Destroyed) {
                    continue;
                }
                let dek = inner.unwrap_entry(&e)?;
                inner.counters.wraps.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                e.wrapped.push(RootWrapped { root_id, wrapped: root.wrap(&dek)? });
                deks.insert((provider.as_str(), e.version), e.encode().as_slice())?;
                n += 1;
            }
            drop(deks);
            pins.push(pin.clone());
            let mut meta = txn.open_table(st::META)?;
            meta.insert(st::META_ROOTS, schema::encode_roots(&pins).as_slice())?;
            meta.insert(st::META_INTEGRITY_KEY, schema::encode_wrapped_key(&ik).as_slice())?;
            drop(meta);
            inner.audit(
                txn,
                NewEvent {
                    op: "root-add",
                    outcome: "ok",
                    detail: format!("root {root_id}: {} ({n} data keys wrapped, at {})", id.description, now()),
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
        inner.store.write(|txn| {
            let (pins, mut ik) = read_roots(txn)?;
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
            let entries = all_deks(txn)?;
            let mut deks = txn.open_table(st::DEKS)?;
            for (provider, mut e) in entries {
                let before = e.wrapped.len();
                e.wrapped.retain(|w| w.root_id != root_id);
                if e.wrapped.len() != before {
                    deks.insert((provider.as_str(), e.version), e.encode().as_slice())?;
                }
            }
            drop(deks);
            let mut meta = txn.open_table(st::META)?;
            meta.insert(st::META_ROOTS, schema::encode_roots(&rest).as_slice())?;
            meta.insert(st::META_INTEGRITY_KEY, schema::encode_wrapped_key(&ik).as_slice())?;
            drop(meta);
            inner.audit(
                txn,
                NewEvent { op: "root-remove", outcome: "ok", detail: format!("root {root_id}: {}", gone.description), ..Default::default() },
            )?;
            Ok(gone)
        })
    }
}

/// The pinned roots and the wrapped integrity key, as this transaction sees them.
fn read_roots(txn: &WriteTransaction) -> Result<(Vec<RootPin>, Vec<RootWrapped>)> {
    let meta = txn.open_table(st::META)?;
    let pins = meta.get(st::META_ROOTS)?.ok_or_else(|| Error::integrity("reading the pinned roots"))?;
    let ik = meta.get(st::META_INTEGRITY_KEY)?.ok_or_else(|| Error::integrity("reading the integrity key"))?;
    Ok((schema::decode_roots(pins.value())?, schema::decode_wrapped_key(ik.value())?))
}

/// Every DEK entry, by provider.
fn all_deks(txn: &WriteTransaction) -> Result<Vec<(String, DekEntry)>> {
    let deks = txn.open_table(st::DEKS)?;
    let mut v = Vec::new();
    for item in deks.iter()? {
        let (k, val) = item?;
        v.push((k.value().0.to_string(), DekEntry::decode(val.value())?));
    }
    Ok(v)
}
