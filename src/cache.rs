//! The DEK cache: unwrapped DEKs kept as ready AES-256-GCM ciphers, so the hardware is
//! touched once per provider DEK per process rather than once per token.
//!
//! Bounded two ways: number of entries (least recently loaded is evicted first) and age
//! since unwrap (a reload goes back to the hardware, so a revoked root or a removed
//! token is noticed). Ciphers are built with aes-gcm's `zeroize` feature, so
//! the expanded key is wiped when an entry is evicted or the cache is dropped. Lookups
//! take a read lock and do not allocate.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use aes_gcm::{Aes256Gcm, KeyInit};

use crate::error::Result;
use crate::secret::DekMaterial;
use crate::sync::{lock, read, write};

/// Limits of the DEK cache.
#[derive(Debug, Clone, Copy)]
pub struct CacheLimits {
    /// Most DEKs held at once.
    pub max_entries: usize,
    /// Longest time a DEK stays cached after its unwrap.
    pub max_age: Duration,
}

impl Default for CacheLimits {
    fn default() -> Self {
        CacheLimits { max_entries: 1024, max_age: Duration::from_secs(3600) }
    }
}

/// One unwrapped DEK.
pub(crate) struct CachedDek {
    pub(crate) cipher: Aes256Gcm,
    /// When it was unwrapped (`clock::coarse_ms`: checked on every `get`).
    loaded: u64,
}

impl CachedDek {
    pub(crate) fn new(dek: &DekMaterial) -> Self {
        CachedDek { cipher: Aes256Gcm::new(dek.expose().into()), loaded: crate::clock::coarse_ms() }
    }
}

/// Cached ciphers of one provider, by DEK version (a provider has few versions).
type Versions = Vec<(u32, Arc<CachedDek>)>;

/// Cache of ciphers by provider and DEK version.
pub(crate) struct DekCache {
    limits: CacheLimits,
    /// foldhash (seeded per process): looked up on every `get`.
    map: RwLock<HashMap<String, Versions, foldhash::fast::RandomState>>,
    /// Serialises loads, so concurrent misses on one DEK cost one hardware unwrap.
    load_lock: Mutex<()>,
    misses: AtomicU64,
}

impl DekCache {
    pub(crate) fn new(limits: CacheLimits) -> Self {
        DekCache { limits, map: RwLock::new(HashMap::default()), load_lock: Mutex::new(()), misses: AtomicU64::new(0) }
    }

    /// The cipher for (provider, version) if cached and within its limits.
    pub(crate) fn get(&self, provider: &str, version: u32) -> Option<Arc<CachedDek>> {
        let map = read(&self.map);
        let hit = map
            .get(provider)
            .and_then(|v| v.iter().find(|(ver, _)| *ver == version))
            .filter(|(_, c)| {
                crate::clock::coarse_ms().saturating_sub(c.loaded)
                    < u64::try_from(self.limits.max_age.as_millis()).unwrap_or(u64::MAX)
            })
            .map(|(_, c)| c.clone());
        if hit.is_none() {
            self.misses.fetch_add(1, Ordering::Relaxed);
        }
        hit
    }

    /// The cipher for (provider, version): cached, or built from what `load` returns
    /// (a store lookup and a hardware unwrap). Loads are single-flight: threads that
    /// miss together wait for one load and then find its result.
    pub(crate) fn get_or_load(
        &self,
        provider: &str,
        version: u32,
        load: impl FnOnce() -> Result<DekMaterial>,
    ) -> Result<Arc<CachedDek>> {
        if let Some(c) = self.get(provider, version) {
            return Ok(c);
        }
        let _load = lock(&self.load_lock);
        if let Some(c) = self.get(provider, version) {
            return Ok(c);
        }
        let dek = load()?;
        Ok(self.insert(provider, version, &dek))
    }

    pub(crate) fn insert(&self, provider: &str, version: u32, dek: &DekMaterial) -> Arc<CachedDek> {
        let entry = Arc::new(CachedDek::new(dek));
        let mut map = write(&self.map);
        let total: usize = map.values().map(Vec::len).sum();
        if total >= self.limits.max_entries.max(1) {
            // Evict the oldest load.
            let oldest = map
                .iter()
                .flat_map(|(p, v)| v.iter().map(move |(ver, c)| (p.clone(), *ver, c.loaded)))
                .min_by_key(|(_, _, t)| *t);
            if let Some((p, ver, _)) = oldest
                && let Some(v) = map.get_mut(&p)
            {
                v.retain(|(x, _)| *x != ver);
            }
        }
        let list = map.entry(provider.to_owned()).or_default();
        list.retain(|(x, _)| *x != version);
        list.push((version, entry.clone()));
        entry
    }

    /// Forgets the given versions of `provider` (after retiring or shredding them).
    pub(crate) fn forget(&self, provider: &str, versions: &[u32]) {
        let mut map = write(&self.map);
        if let Some(v) = map.get_mut(provider) {
            v.retain(|(x, _)| !versions.contains(x));
        }
    }

    /// Drops every cached DEK (their ciphers are zeroized as the last reference goes).
    pub(crate) fn clear(&self) {
        write(&self.map).clear();
    }

    pub(crate) fn len(&self) -> usize {
        read(&self.map).values().map(Vec::len).sum()
    }

    pub(crate) fn misses(&self) -> u64 {
        self.misses.load(Ordering::Relaxed)
    }
}
