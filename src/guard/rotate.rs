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

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::TokenGuard;
use super::keys::Sealer;
use crate::audit::NewEvent;
use crate::error::{Error, Result};
use crate::secret::Secret;
use crate::store::{DekState, StoreRead, StoreWrite};

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
    /// Provider whose records were re-encrypted.
    pub provider: String,
    /// The version records were moved to.
    pub target_version: u32,
    /// Records under older versions before the run.
    pub pending: u64,
    /// Records moved by this run.
    pub moved: u64,
    /// Transactions committed.
    pub batches: u64,
    /// Records left under their old version because they do not open
    /// (`provider/name`; see `tokenguard doctor`): one never stops the others.
    pub skipped: Vec<String>,
}

/// What re-encryption found when it opened one record.
enum Opened {
    /// The secret, to move.
    Secret(Secret),
    /// The record does not open (damaged, or under a destroyed version): left where it is.
    Skip(Error),
    /// Its data key does not unwrap: every record under it would fail alike.
    Stop(Error),
}

impl TokenGuard {
    /// Creates a new DEK version for `provider`; new writes use it, the previous
    /// active version becomes decrypt-only. Returns the new version.
    pub fn rotate_dek(&self, provider: &str) -> Result<u32> {
        super::validate_ident("provider", provider)?;
        let inner = &*self.inner;
        inner.write(|txn| {
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
        let mut out: Vec<String> = Vec::new();
        for (p, _) in self.inner.store.read()?.deks(None, None)? {
            if out.last() != Some(&p) {
                out.push(p);
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
        let target = txn
            .deks(Some(provider), None)?
            .into_iter()
            .filter(|(_, e)| e.state == DekState::Active)
            .map(|(_, e)| e.version)
            .max()
            .unwrap_or(0);
        let n = txn.indexed_under(provider, 0, target, usize::MAX)?.len() as u64;
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
        let mut report = ReencryptReport {
            provider: provider.into(),
            target_version: target,
            pending,
            moved: 0,
            batches: 0,
            skipped: Vec::new(),
        };
        if opts.dry_run || pending == 0 || target == 0 {
            return Ok(report);
        }
        let batch = opts.batch_size.max(1);
        let start = Instant::now();
        let mut skipped: std::collections::BTreeSet<String> = std::collections::BTreeSet::new();
        loop {
            let moved = inner.write(|txn| {
                // The active version may have changed since the count (a rotation
                // in another process): the sealer reads it inside the transaction.
                let upcoming = BTreeMap::from([(provider, batch as u64)]);
                let mut sealer = Sealer::new(inner, txn, &upcoming)?;
                let version = sealer.version(provider).ok_or_else(|| Error::integrity("selecting a data key"))?;
                // Records skipped earlier in this run stay indexed under their old
                // version: ask for that many more, and leave them out.
                let names: Vec<(u32, String)> = txn
                    .indexed_under(provider, 0, version, batch + skipped.len())?
                    .into_iter()
                    .filter(|(_, n)| !skipped.contains(n))
                    .take(batch)
                    .collect();
                if names.is_empty() {
                    return Ok(None);
                }
                let mut moving = Vec::with_capacity(names.len());
                let mut newly_skipped = Vec::new();
                for (old_version, name) in &names {
                    if txn.drop_stale_index(provider, *old_version, name)? {
                        continue; // the record is gone, or already moved
                    }
                    // The data key is looked up apart from the record: a key that
                    // does not unwrap stops the run (every record under it would
                    // fail alike); a record that does not parse or open is left
                    // where it is and the others move (finding 9), as is one under a
                    // destroyed (shredded) version, which can never move.
                    let opened = txn.with_record(provider, name, |rec| {
                        Ok(match inner.cipher(txn, provider, name, rec.dek_version) {
                            Ok(c) => match rec.open(&c.cipher, &inner.store_id) {
                                Ok(s) => Opened::Secret(s),
                                Err(e) => Opened::Skip(e),
                            },
                            Err(e @ Error::Shredded { .. }) => Opened::Skip(e),
                            Err(e) => Opened::Stop(e),
                        })
                    });
                    match opened {
                        Ok(Some(Opened::Secret(secret))) => moving.push((name.as_str(), secret)),
                        Ok(Some(Opened::Stop(e))) => return Err(e),
                        Ok(None) => return Err(Error::integrity("finding an indexed record")),
                        // (An integrity error from the read itself: the record does
                        // not parse.)
                        Ok(Some(Opened::Skip(e))) | Err(e @ Error::Integrity { .. }) => {
                            tracing::warn!(provider, name = %name, error = %e, "record left under its old version");
                            newly_skipped.push(name.clone());
                        }
                        Err(e) => return Err(e),
                    }
                }
                if moving.is_empty() {
                    return Ok(Some((0, newly_skipped)));
                }
                let items: Vec<(&str, &str, &Secret)> = moving.iter().map(|(n, s)| (provider, *n, s)).collect();
                // Same metadata, new key: only the DEK version in the header moves.
                let written = sealer.put_many(txn, &items, &mut |_, old| old.and_then(|o| o.metadata().ok()))?;
                if written.iter().any(Option::is_none) {
                    return Err(Error::integrity("re-sealing a record"));
                }
                let count = written.len() as u64;
                sealer.finish(txn)?;
                let moved_now = (count, newly_skipped);
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
                Ok(Some(moved_now))
            })?;
            let Some((moved, newly_skipped)) = moved else { break };
            skipped.extend(newly_skipped);
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
        report.skipped = skipped.into_iter().map(|n| format!("{provider}/{n}")).collect();
        Ok(report)
    }

    /// Retires every version of `provider` below `below`: refused while any record
    /// still uses one of them (the error says how many and which command moves them);
    /// otherwise their wrapped material is erased. Returns the versions retired.
    pub fn retire(&self, provider: &str, below: u32) -> Result<Vec<u32>> {
        super::validate_ident("provider", provider)?;
        let inner = &*self.inner;
        let retired = inner.write(|txn| {
            let entries: Vec<_> = txn.deks(Some(provider), Some(below))?.into_iter().map(|(_, e)| e).collect();
            if entries.is_empty() {
                return Err(Error::NotFound {
                    provider: provider.into(),
                    name: format!("(DEK versions below {below})"),
                });
            }
            if let Some(e) = entries.iter().find(|e| e.state == DekState::Active) {
                return Err(Error::InvalidInput(format!(
                    "version {} of {provider} is the active data key; run `tokenguard rotate-dek {provider}` first",
                    e.version
                )));
            }
            // The records themselves say which versions are in use, not the by_dek
            // index: an index entry a file writer deleted must not let a key that a
            // record still needs be erased. A record that does not parse could be
            // under any version, so it keeps them all.
            let mut users: std::collections::BTreeMap<u32, u64> = std::collections::BTreeMap::new();
            let mut unreadable = 0u64;
            txn.scan_records(Some(provider), &mut |_, _, rec| {
                match rec {
                    Ok(r) if entries.iter().any(|e| e.version == r.dek_version) => {
                        *users.entry(r.dek_version).or_default() += 1;
                    }
                    Ok(_) => {}
                    Err(_) => unreadable += 1,
                }
                Ok(std::ops::ControlFlow::Continue(()))
            })?;
            if !users.is_empty() || unreadable > 0 {
                let mut detail: Vec<String> = users.iter().map(|(v, n)| format!("version {v}: {n} records")).collect();
                if unreadable > 0 {
                    detail.push(format!("{unreadable} records that do not parse (see `tokenguard doctor`)"));
                }
                return Err(Error::InUse {
                    provider: provider.into(),
                    detail: detail.join(", "),
                    records: users.values().sum::<u64>() + unreadable,
                });
            }
            inner.end_versions(txn, provider, entries.into_iter(), DekState::Retired, "retire", "versions")
        })?;
        inner.cache.forget(provider, &retired);
        Ok(retired)
    }
}
