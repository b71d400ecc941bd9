//! DEK rotation, re-encryption and retirement.
//!
//! `rotate_dek` makes a new DEK version take the writes (the old one becomes
//! decrypt-only); `reencrypt` moves existing records forward in batches, one
//! transaction per batch, driven by the `by_dek` index — so it is resumable by
//! construction: after a crash, what is left is exactly what the index still lists
//! under old versions. Reads and writes go on meanwhile (redb MVCC: a batch commits
//! atomically, readers see either the old or the new record, both of which open).
//! `retire` refuses while any record uses a version and erases its wrapped material
//! once none does.

use std::time::{Duration, Instant};

use redb::ReadableTable;
use serde::Serialize;

use super::{TokenGuard, now};
use crate::audit::NewEvent;
use crate::error::{Error, Result};
use crate::seal::{self, ParsedRecord};
use crate::store::schema::{DekEntry, DekState};
use crate::store::{self as st};

/// Options of [`TokenGuard::reencrypt`].
#[derive(Debug, Clone, Copy)]
pub struct ReencryptOptions {
    /// Records per transaction.
    pub batch_size: usize,
    /// Upper bound on records per second (`None`: as fast as the store allows).
    pub max_per_second: Option<f64>,
    /// Count only; change nothing.
    pub dry_run: bool,
}

impl Default for ReencryptOptions {
    fn default() -> Self {
        ReencryptOptions { batch_size: 500, max_per_second: None, dry_run: false }
    }
}

/// What a re-encryption did (or, dry, would do) for one provider.
#[derive(Debug, Clone, Serialize)]
pub struct ReencryptReport {
    /// Provider.
    pub provider: String,
    /// The version records were moved to.
    pub target_version: u32,
    /// Records under older versions before the run.
    pub pending: u64,
    /// Records moved by this run.
    pub moved: u64,
    /// Transactions committed.
    pub batches: u64,
}

impl TokenGuard {
    /// Creates a new DEK version for `provider`; new writes use it, the previous
    /// active version becomes decrypt-only. Returns the new version.
    pub fn rotate_dek(&self, provider: &str) -> Result<u32> {
        super::validate_ident("provider", provider)?;
        let inner = &*self.inner;
        inner.store.write(|txn| {
            let (highest, active) = inner.dek_versions(txn, provider)?;
            if highest == 0 {
                return Err(Error::NotFound { provider: provider.into(), name: "(no data key yet)".into() });
            }
            if let Some(e) = active {
                inner.set_dek_state(txn, provider, e, DekState::DecryptOnly)?;
            }
            let v = highest + 1;
            inner.create_dek(txn, provider, v, "dek-rotate")?;
            Ok(v)
        })
    }

    /// Providers that have at least one DEK.
    pub fn providers(&self) -> Result<Vec<String>> {
        let txn = self.inner.store.read()?;
        let mut out: Vec<String> = Vec::new();
        for item in txn.open_table(st::DEKS)?.iter()? {
            let (k, _) = item?;
            let p = k.value().0;
            if out.last().map(String::as_str) != Some(p) {
                out.push(p.to_string());
            }
        }
        Ok(out)
    }

    /// Moves every record of `provider` (or of every provider) that is sealed under an
    /// older DEK version to the active one, `batch_size` records per transaction.
    /// `progress(provider, done, total)` is called after each batch.
    pub fn reencrypt(
        &self,
        provider: Option<&str>,
        opts: ReencryptOptions,
        mut progress: impl FnMut(&str, u64, u64),
    ) -> Result<Vec<ReencryptReport>> {
        let providers = match provider {
            Some(p) => {
                super::validate_ident("provider", p)?;
                vec![p.to_string()]
            }
            None => self.providers()?,
        };
        let mut out = Vec::new();
        for p in providers {
            out.push(self.reencrypt_provider(&p, opts, &mut progress)?);
        }
        Ok(out)
    }

    fn pending(&self, provider: &str) -> Result<(u32, u64)> {
        let txn = self.inner.store.read()?;
        let deks = txn.open_table(st::DEKS)?;
        let mut target = 0;
        for item in deks.range((provider, 0u32)..=(provider, u32::MAX))? {
            let (k, v) = item?;
            if DekEntry::decode(v.value())?.state == DekState::Active {
                target = k.value().1;
            }
        }
        let by_dek = txn.open_table(st::BY_DEK)?;
        let n = by_dek.range((provider, 0u32, "")..(provider, target, ""))?.count() as u64;
        Ok((target, n))
    }

    fn reencrypt_provider(
        &self,
        provider: &str,
        opts: ReencryptOptions,
        progress: &mut impl FnMut(&str, u64, u64),
    ) -> Result<ReencryptReport> {
        let inner = &*self.inner;
        let (target, pending) = self.pending(provider)?;
        let mut report =
            ReencryptReport { provider: provider.into(), target_version: target, pending, moved: 0, batches: 0 };
        if opts.dry_run || pending == 0 || target == 0 {
            return Ok(report);
        }
        let batch = opts.batch_size.max(1);
        let start = Instant::now();
        loop {
            let moved = inner.store.write(|txn| {
                // The active version may have changed since the count (a rotation
                // in another process): re-read it inside the transaction.
                let (version, cipher) = inner.active_dek_for_write(txn, provider, batch as u64)?;
                let names: Vec<(u32, String)> = {
                    let by_dek = txn.open_table(st::BY_DEK)?;
                    let mut v = Vec::with_capacity(batch);
                    for item in by_dek.range((provider, 0u32, "")..(provider, version, ""))?.take(batch) {
                        let (k, _) = item?;
                        let (_, ver, name) = k.value();
                        v.push((ver, name.to_string()));
                    }
                    v
                };
                if names.is_empty() {
                    return Ok(None);
                }
                let mut tokens = txn.open_table(st::TOKENS)?;
                let mut by_dek = txn.open_table(st::BY_DEK)?;
                let mut count = 0u64;
                for (old_version, name) in &names {
                    by_dek.remove((provider, *old_version, name.as_str()))?;
                    let bytes = match tokens.get((provider, name.as_str()))? {
                        Some(g) => g.value().to_vec(),
                        None => continue, // stale index entry: the record is gone
                    };
                    let rec = ParsedRecord::parse(&bytes)?;
                    if rec.header.provider != provider || rec.header.name != *name {
                        return Err(Error::integrity("checking a record's place"));
                    }
                    if rec.header.dek_version >= version {
                        by_dek.insert((provider, rec.header.dek_version, name.as_str()), ())?;
                        continue;
                    }
                    let old = inner.cipher_for_write(txn, provider, name, rec.header.dek_version)?;
                    let secret = rec.open(&old.cipher, &inner.store_id)?;
                    let mut header = rec.header;
                    header.dek_version = version;
                    let sealed = seal::seal_record(&cipher.cipher, &inner.store_id, &header, &secret)?;
                    tokens.insert((provider, name.as_str()), sealed.as_slice())?;
                    by_dek.insert((provider, version, name.as_str()), ())?;
                    count += 1;
                }
                drop((tokens, by_dek));
                let used = [(provider.to_string(), (version, cipher, count))].into_iter().collect();
                inner.count_encryptions(txn, &used)?;
                inner.audit(
                    txn,
                    NewEvent {
                        op: "reencrypt",
                        provider,
                        outcome: "ok",
                        detail: format!("{count} records to version {version}"),
                        ..Default::default()
                    },
                )?;
                Ok(Some(count))
            })?;
            let Some(moved) = moved else { break };
            report.moved += moved;
            report.batches += 1;
            progress(provider, report.moved.min(pending), pending);
            if let Some(rate) = opts.max_per_second.filter(|r| *r > 0.0) {
                let due = Duration::from_secs_f64(report.moved as f64 / rate);
                if let Some(wait) = due.checked_sub(start.elapsed()) {
                    std::thread::sleep(wait);
                }
            }
        }
        Ok(report)
    }

    /// Retires every version of `provider` below `below`: refused while any record
    /// still uses one of them (the error says how many and which command moves them);
    /// otherwise their wrapped material is erased. Returns the versions retired.
    pub fn retire(&self, provider: &str, below: u32) -> Result<Vec<u32>> {
        super::validate_ident("provider", provider)?;
        let inner = &*self.inner;
        let retired = inner.store.write(|txn| {
            let entries: Vec<DekEntry> = {
                let deks = txn.open_table(st::DEKS)?;
                let mut v = Vec::new();
                for item in deks.range((provider, 0u32)..(provider, below))? {
                    let (_, val) = item?;
                    v.push(DekEntry::decode(val.value())?);
                }
                v
            };
            if entries.is_empty() {
                return Err(Error::NotFound {
                    provider: provider.into(),
                    name: format!("(DEK versions below {below})"),
                });
            }
            let by_dek = txn.open_table(st::BY_DEK)?;
            let mut in_use = Vec::new();
            for e in &entries {
                if e.state == DekState::Active {
                    return Err(Error::InvalidInput(format!(
                        "version {} of {provider} is the active data key; run `tokenguard rotate-dek {provider}` first",
                        e.version
                    )));
                }
                let n = by_dek.range((provider, e.version, "")..(provider, e.version + 1, ""))?.count();
                if n > 0 {
                    in_use.push((e.version, n));
                }
            }
            drop(by_dek);
            if !in_use.is_empty() {
                let total: usize = in_use.iter().map(|(_, n)| n).sum();
                return Err(Error::InUse {
                    provider: provider.into(),
                    detail: in_use
                        .iter()
                        .map(|(v, n)| format!("version {v}: {n} records"))
                        .collect::<Vec<_>>()
                        .join(", "),
                    records: total as u64,
                });
            }
            let mut out = Vec::new();
            for e in entries {
                if matches!(e.state, DekState::Retired | DekState::Destroyed) {
                    continue;
                }
                out.push(e.version);
                inner.set_dek_state(txn, provider, e, DekState::Retired)?;
            }
            inner.audit(
                txn,
                NewEvent {
                    op: "retire",
                    provider,
                    outcome: "ok",
                    detail: format!("versions {out:?}"),
                    ..Default::default()
                },
            )?;
            Ok(out)
        })?;
        inner.cache.forget(provider, &retired);
        Ok(retired)
    }

    /// Versions of `provider` older than `max_age` (for the rotation policy).
    pub fn dek_ages(&self) -> Result<Vec<(String, u32, DekState, u64)>> {
        let txn = self.inner.store.read()?;
        let t = now();
        let mut out = Vec::new();
        for item in txn.open_table(st::DEKS)?.iter()? {
            let (k, v) = item?;
            let (p, ver) = k.value();
            let e = DekEntry::decode(v.value())?;
            out.push((p.to_string(), ver, e.state, t.saturating_sub(e.created)));
        }
        Ok(out)
    }
}
