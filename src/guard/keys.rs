//! Data keys: finding the cipher of a DEK version (cache or hardware), choosing and
//! creating the active version, and [`Sealer`], the one path by which a sealed record
//! is written (put, put_many, refresh, re-encryption).

use std::collections::BTreeMap;
use std::sync::Arc;

use super::{Counters, Inner};
use crate::audit::NewEvent;
use crate::cache::CachedDek;
use crate::error::{Error, Result};
use crate::seal::{self, Metadata, NONCE_LEN, RecordHeader, RecordView};
use crate::secret::{DekMaterial, Secret};
use crate::store::{DekEntry, DekState, RootWrapped, StoreRead, StoreWrite};

impl Inner {
    /// The descriptions of the roots of `pins` that are not configured in this
    /// process (so cannot wrap a new key).
    pub(super) fn unconfigured<'p>(&self, pins: &'p [crate::store::RootPin]) -> Vec<&'p str> {
        pins.iter()
            .filter(|p| !self.roots.iter().any(|r| r.root_id == p.root_id))
            .map(|p| p.description.as_str())
            .collect()
    }

    /// Unwraps `entry` with the first configured root (hardware first, age last) that
    /// has a blob for it. As for the integrity key at open, a root whose wraps only
    /// its key can make and whose wrap does not open is not overruled by an age root
    /// (anyone who knows a recipient can encrypt to it).
    pub(super) fn unwrap_entry(&self, entry: &DekEntry) -> Result<DekMaterial> {
        let mut last = None;
        let mut refused = false;
        for r in self.roots.iter().filter(|r| r.key.can_unwrap()) {
            if let Some(w) = entry.for_root(r.root_id) {
                let authenticated = r.key.wraps_authenticate();
                if refused && !authenticated {
                    return Err(Error::integrity(
                        "checking a data key (a configured root's own wrap does not open it, and a key wrapped to \
                         an age recipient is not taken instead)",
                    ));
                }
                Counters::add(&self.counters.unwraps, 1);
                match r.key.unwrap(w) {
                    Ok(d) => return Ok(d),
                    Err(e @ Error::Integrity { .. }) => {
                        refused |= authenticated;
                        last = Some(e);
                    }
                    Err(e) => last = Some(e),
                }
            }
        }
        Err(last.unwrap_or_else(|| Error::integrity("finding a DEK wrapped for a configured root")))
    }

    /// The cipher of (provider, version): from the cache, or unwrapped from the DEK
    /// entry `txn` sees. Concurrent misses on one DEK cost one hardware unwrap.
    pub(super) fn cipher(
        &self,
        txn: &impl StoreRead,
        provider: &str,
        name: &str,
        version: u32,
    ) -> Result<Arc<CachedDek>> {
        // A DEK another process rotated, retired or shredded leaves the cache before
        // it is used again (the store notices within its recheck interval).
        for (p, v) in self.store.take_changed_deks() {
            tracing::debug!(provider = %p, version = v, "data key changed in the store; dropped from the cache");
            self.cache.forget(&p, &[v]);
        }
        self.cache.get_or_load(provider, version, || {
            let entry = txn.dek(provider, version)?.ok_or_else(|| Error::integrity("finding the record's data key"))?;
            if entry.state == DekState::Destroyed {
                return Err(Error::Shredded { provider: provider.into(), name: name.into(), version });
            }
            tracing::debug!(provider, version, "data key not cached; unwrapping");
            self.unwrap_entry(&entry)
        })
    }

    /// The highest DEK version of `provider` (0 if none) and its active entry.
    pub(super) fn dek_versions(&self, txn: &impl StoreRead, provider: &str) -> Result<(u32, Option<DekEntry>)> {
        let deks = txn.deks(Some(provider), None)?;
        let highest = deks.iter().map(|(_, e)| e.version).max().unwrap_or(0);
        let active = deks.into_iter().rev().map(|(_, e)| e).find(|e| e.state == DekState::Active);
        Ok((highest, active))
    }

    /// The provider's active DEK for `upcoming` new encryptions. Creates version 1
    /// for a new provider, and rotates automatically when the active version would
    /// pass its encryption bound (random 96-bit nonces: NIST SP 800-38D caps one key
    /// at 2^32 messages; the default bound is 2^30). Runs inside the write
    /// transaction, so two processes never both create the same version.
    pub(super) fn active_dek_for_write(
        &self,
        txn: &impl StoreWrite,
        provider: &str,
        upcoming: u64,
    ) -> Result<(u32, Arc<CachedDek>)> {
        let (highest, active) = self.dek_versions(txn, provider)?;
        if let Some(e) = active {
            if e.encryptions.saturating_add(upcoming) <= self.opts.max_dek_encryptions {
                let c = self.cipher(txn, provider, "", e.version)?;
                return Ok((e.version, c));
            }
            let v = e.version;
            self.set_dek_state(txn, provider, e, DekState::DecryptOnly)?;
            tracing::info!(provider, version = v, "data key reached its encryption bound; rotating");
            let c = self.create_dek(txn, provider, highest + 1, "dek-auto-rotate")?;
            return Ok((highest + 1, c));
        }
        if highest == 0 {
            check_new_provider_case(txn, provider)?;
        }
        let c = self.create_dek(txn, provider, highest + 1, "dek-create")?;
        Ok((highest + 1, c))
    }

    /// Creates DEK `version` of `provider`: generated by the first root (in the
    /// hardware), wrapped under every other root, inserted as active.
    pub(super) fn create_dek(
        &self,
        txn: &impl StoreWrite,
        provider: &str,
        version: u32,
        op: &str,
    ) -> Result<Arc<CachedDek>> {
        // Read the pinned roots inside the transaction: another process may have
        // added one since this guard opened.
        let pins = txn.roots()?;
        let missing = self.unconfigured(&pins);
        if !missing.is_empty() {
            // A DEK some pinned root cannot open would silently weaken recovery.
            return Err(Error::Config(format!(
                "creating a data key for {provider} needs every pinned root configured; missing: {}",
                missing.join("; ")
            )));
        }
        // Wrapped under the pinned roots only: a root removed from the store but still
        // named in this process's config must never get a new key.
        let pinned: Vec<&super::ActiveRoot> =
            self.roots.iter().filter(|r| pins.iter().any(|p| p.root_id == r.root_id)).collect();
        let (first, rest) = pinned.split_first().ok_or_else(|| Error::Config("no usable root".into()))?;
        Counters::add(&self.counters.generates, 1);
        let (dek, w) = first.key.generate_dek()?;
        first.check_wrap(&w, &dek, &self.counters)?;
        let mut wrapped = vec![RootWrapped { root_id: first.root_id, wrapped: w }];
        for r in rest {
            wrapped.push(RootWrapped { root_id: r.root_id, wrapped: r.wrap_checked(&dek, &self.counters)? });
        }
        let entry =
            DekEntry { version, state: DekState::Active, created: crate::clock::now(), encryptions: 0, wrapped };
        txn.put_dek(provider, &entry)?;
        self.audit(
            txn,
            NewEvent { op, provider, outcome: "ok", detail: format!("version {version}"), ..Default::default() },
        )?;
        tracing::debug!(provider, version, "created data key");
        crate::sync::lock(&self.uncommitted).push((provider.to_string(), version));
        Ok(self.cache.insert(provider, version, &dek))
    }
}

/// Provider names are case-sensitive, so `GitHub` and `github` would be two
/// providers with two keys — almost always a typo. A new provider that differs from
/// an existing one only in case is refused, naming the existing spelling.
fn check_new_provider_case(txn: &impl StoreRead, provider: &str) -> Result<()> {
    let existing = txn.deks(None, None)?;
    if let Some((p, _)) = existing.iter().find(|(p, _)| p != provider && p.eq_ignore_ascii_case(provider)) {
        return Err(Error::InvalidInput(format!(
            "provider {provider:?} differs from the existing provider {p:?} only in case; use {p:?} \
             (names are case-sensitive, so this would start a second provider)"
        )));
    }
    Ok(())
}

/// Seals records into one write transaction: the active DEK of each provider chosen
/// once, nonces drawn from the OS in one call for the batch (getrandom costs more
/// than sealing a small secret: FACTS 0.48 µs vs 0.2 µs), and each version's
/// encryption counter moved by what was sealed under it ([`Sealer::finish`]).
pub(super) struct Sealer<'a> {
    inner: &'a Inner,
    deks: BTreeMap<String, (u32, Arc<CachedDek>, u64)>,
    nonces: Vec<u8>,
    next: usize,
}

impl<'a> Sealer<'a> {
    /// A sealer for `upcoming` records per provider.
    pub(super) fn new(inner: &'a Inner, txn: &impl StoreWrite, upcoming: &BTreeMap<&str, u64>) -> Result<Self> {
        let mut deks = BTreeMap::new();
        for (p, n) in upcoming {
            let (v, c) = inner.active_dek_for_write(txn, p, *n)?;
            deks.insert((*p).to_string(), (v, c, 0));
        }
        let total: u64 = upcoming.values().sum();
        let mut nonces = vec![0u8; NONCE_LEN * usize::try_from(total).unwrap_or(0)];
        crate::crypto::fill_random(&mut nonces)?;
        Ok(Sealer { inner, deks, nonces, next: 0 })
    }

    fn nonce(&mut self) -> Result<[u8; NONCE_LEN]> {
        match self.nonces.get(self.next..self.next + NONCE_LEN) {
            Some(n) => {
                self.next += NONCE_LEN;
                let mut out = [0u8; NONCE_LEN];
                out.copy_from_slice(n);
                Ok(out)
            }
            None => crate::crypto::random_array(),
        }
    }

    /// Seals each `(provider, name, secret)` of `items` under its provider's active
    /// DEK and stores it, with the metadata `meta` returns given the item's index and
    /// the record stored there now; `meta` returning `None` writes nothing for that
    /// item (a compare-and-set that lost). Returns the metadata written, per item.
    pub(super) fn put_many(
        &mut self,
        txn: &impl StoreWrite,
        items: &[(&str, &str, &Secret)],
        meta: &mut dyn FnMut(usize, Option<&RecordView<'_>>) -> Option<Metadata>,
    ) -> Result<Vec<Option<Metadata>>> {
        let keys: Vec<(&str, &str)> = items.iter().map(|(p, n, _)| (*p, *n)).collect();
        let mut written: Vec<Option<Metadata>> = vec![None; items.len()];
        txn.put_records(&keys, &mut |i, old| {
            let Some(&(provider, name, secret)) = items.get(i) else { return Ok(None) };
            let Some(m) = meta(i, old) else { return Ok(None) };
            let nonce = self.nonce()?;
            let (version, cipher, count) =
                self.deks.get_mut(provider).ok_or_else(|| Error::integrity("selecting a data key"))?;
            let header = RecordHeader { provider: provider.into(), name: name.into(), dek_version: *version, meta: m };
            let record = seal::seal_record_with_nonce(&cipher.cipher, &self.inner.store_id, &header, secret, nonce)?;
            *count += 1;
            written[i] = Some(header.meta);
            Ok(Some(record))
        })?;
        Ok(written)
    }

    /// [`Sealer::put_many`] for one item.
    pub(super) fn put(
        &mut self,
        txn: &impl StoreWrite,
        provider: &str,
        name: &str,
        secret: &Secret,
        meta: impl FnOnce(Option<&RecordView<'_>>) -> Option<Metadata>,
    ) -> Result<Option<Metadata>> {
        let mut meta = Some(meta);
        let mut one = |_: usize, old: Option<&RecordView<'_>>| meta.take().and_then(|f| f(old));
        Ok(self.put_many(txn, &[(provider, name, secret)], &mut one)?.pop().flatten())
    }

    /// The DEK version records of `provider` are sealed under.
    pub(super) fn version(&self, provider: &str) -> Option<u32> {
        self.deks.get(provider).map(|(v, _, _)| *v)
    }

    /// Moves each used version's encryption counter by what was sealed.
    pub(super) fn finish(self, txn: &impl StoreWrite) -> Result<()> {
        for (p, (v, _, n)) in &self.deks {
            if *n == 0 {
                continue;
            }
            if let Some(mut e) = txn.dek(p, *v)? {
                e.encryptions = e.encryptions.saturating_add(*n);
                txn.put_dek(p, &e)?;
            }
        }
        Ok(())
    }
}
