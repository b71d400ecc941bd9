//! Revocation, expiry, purge, crypto-shredding and per-token status.
//!
//! Revoking erases the sealed record and leaves a tombstone (time, reason, actor and
//! the token's non-secret metadata), so `get` can say *when and why* instead of "not
//! found". Shredding destroys every DEK version of a provider: its records remain but
//! can never be opened again, and the guard reports them as shredded, not corrupt.

use std::ops::ControlFlow;

use serde::Serialize;

use super::{TokenGuard, validate_ident};
use crate::audit::NewEvent;
use crate::clock::now;
use crate::error::{Error, Result};
use crate::seal::{Metadata, RecordView, TokenState};
use crate::store::{DekState, StoreRead, StoreWrite, WriteTxn};

pub use crate::store::Tombstone;

/// Which tokens a revocation applies to.
#[derive(Debug, Clone)]
pub enum RevokeTarget<'a> {
    /// One token.
    One {
        /// Provider of the token.
        provider: &'a str,
        /// Name of the token.
        name: &'a str,
    },
    /// Every token of a provider.
    Provider(&'a str),
    /// Every token carrying this label (e.g. `owner=alice`).
    Label {
        /// Label key.
        key: &'a str,
        /// Label value.
        value: &'a str,
    },
}

/// What `status` reports for one token.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum TokenStatus {
    /// Usable: not expired, not revoked, not awaiting re-authorisation.
    Active {
        /// Its authenticated metadata.
        meta: Metadata,
    },
    /// Past its not-after.
    Expired {
        /// Its authenticated metadata.
        meta: Metadata,
    },
    /// The provider refused its refresh token; needs a human.
    NeedsReauth {
        /// Its authenticated metadata.
        meta: Metadata,
    },
    /// Revoked; only the tombstone remains.
    Revoked {
        /// The tombstone.
        tombstone: Tombstone,
    },
    /// Its provider's keys were destroyed: unrecoverable.
    Shredded {
        /// Its authenticated metadata.
        meta: Metadata,
    },
}

/// Options of [`TokenGuard::purge`].
#[derive(Debug, Clone, Copy, Default)]
pub struct PurgeOptions {
    /// Remove tokens past their not-after.
    pub expired: bool,
    /// Remove tombstones of revoked tokens.
    pub revoked: bool,
    /// Only what expired / was revoked at least this many seconds ago.
    pub older_than: u64,
}

/// What a purge removed.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct PurgeReport {
    /// Expired tokens removed.
    pub expired: u64,
    /// Tombstones removed.
    pub tombstones: u64,
}

/// Items removed per purge transaction.
const PURGE_BATCH: usize = 500;

impl TokenGuard {
    /// Revokes the targeted tokens with `reason`: each sealed record is removed and a
    /// tombstone left. Returns the (provider, name) pairs revoked.
    pub fn revoke(&self, target: RevokeTarget<'_>, reason: &str) -> Result<Vec<(String, String)>> {
        check_reason(reason)?;
        match &target {
            RevokeTarget::One { provider, name } => {
                validate_ident("provider", provider)?;
                validate_ident("name", name)?;
            }
            RevokeTarget::Provider(p) => validate_ident("provider", p)?,
            RevokeTarget::Label { key, .. } => validate_ident("label key", key)?,
        }
        let inner = &*self.inner;
        let inspecting = !inner.store.state_report().verified;
        inner.write(|txn| {
            let victims: Vec<(String, String)> = match &target {
                RevokeTarget::One { provider, name } => {
                    if txn.with_record(provider, name, |_| Ok(()))?.is_none() {
                        return Err(Error::NotFound { provider: provider.to_string(), name: name.to_string() });
                    }
                    vec![(provider.to_string(), name.to_string())]
                }
                RevokeTarget::Provider(p) => collect_names(txn, Some(p), |_| Ok(true))?,
                RevokeTarget::Label { key, value } => {
                    collect_names(txn, None, |rec| label_matches(rec, key, value, inspecting))?
                }
            };
            for (p, n) in &victims {
                inner.revoke_one(txn, p, n, reason)?;
            }
            Ok(victims)
        })
    }

    /// The state of one token: active, expired, needs re-authorisation, revoked or
    /// shredded. Opens nothing.
    pub fn status(&self, provider: &str, name: &str) -> Result<TokenStatus> {
        let txn = self.inner.store.read()?;
        let found = txn.with_record_meta(provider, name, |rec| Ok((rec.dek_version, rec.metadata()?)))?;
        let Some((version, meta)) = found else {
            return match txn.tombstone(provider, name)? {
                Some(t) => Ok(TokenStatus::Revoked { tombstone: t }),
                None => Err(Error::NotFound { provider: provider.into(), name: name.into() }),
            };
        };
        if txn.dek(provider, version)?.is_some_and(|e| e.state == DekState::Destroyed) {
            return Ok(TokenStatus::Shredded { meta });
        }
        Ok(match meta.state {
            TokenState::NeedsReauth => TokenStatus::NeedsReauth { meta },
            _ if meta.is_expired_at(now()) => TokenStatus::Expired { meta },
            _ => TokenStatus::Active { meta },
        })
    }

    /// Tokens whose not-after falls before `now + within` seconds (already expired
    /// ones included), soonest first, from the expiry index.
    pub fn expiring(&self, within: u64) -> Result<Vec<(String, String, u64)>> {
        let until = now().saturating_add(within);
        let list = self.inner.store.read()?.expiring_before(until, usize::MAX)?;
        Ok(list.into_iter().map(|(t, p, n)| (p, n, t)).collect())
    }

    /// What [`TokenGuard::purge`] with `opts` would remove now; changes nothing.
    pub fn purge_preview(&self, opts: PurgeOptions) -> Result<PurgeReport> {
        let txn = self.inner.store.read()?;
        let cutoff = now().saturating_sub(opts.older_than);
        let mut report = PurgeReport::default();
        if opts.expired {
            for (t, p, n) in txn.expiring_before(cutoff, usize::MAX)? {
                // An index entry counts only if its record says the same, and a token
                // set whose refresh token is still good is kept.
                let matches =
                    txn.with_record_meta(&p, &n, |r| Ok(r.expires_at == Some(t))).unwrap_or(None) == Some(true);
                if matches && !self.inner.refresh_token_alive(&txn, &p, &n)? {
                    report.expired += 1;
                }
            }
        }
        if opts.revoked {
            report.tombstones = txn.tombstones()?.iter().filter(|(_, _, t)| t.revoked_at <= cutoff).count() as u64;
        }
        Ok(report)
    }

    /// The (provider, name) pairs [`TokenGuard::revoke`] of `target` would revoke now;
    /// changes nothing.
    pub fn revoke_preview(&self, target: &RevokeTarget<'_>) -> Result<Vec<(String, String)>> {
        let txn = self.inner.store.read()?;
        match target {
            RevokeTarget::One { provider, name } => Ok(txn
                .with_record(provider, name, |_| Ok(()))?
                .map(|()| (provider.to_string(), name.to_string()))
                .into_iter()
                .collect()),
            RevokeTarget::Provider(p) => collect_names(&txn, Some(p), |_| Ok(true)),
            RevokeTarget::Label { key, value } => {
                let inspecting = !self.inner.store.state_report().verified;
                collect_names(&txn, None, |rec| label_matches(rec, key, value, inspecting))
            }
        }
    }

    /// Removes expired tokens and/or tombstones, in batches (one transaction each),
    /// so a crash part-way leaves a consistent store and a re-run finishes the work.
    pub fn purge(&self, opts: PurgeOptions) -> Result<PurgeReport> {
        let inner = &*self.inner;
        let mut report = PurgeReport::default();
        let cutoff = now().saturating_sub(opts.older_than);
        if opts.expired {
            // The candidates are read once, then removed in batches (one transaction
            // each): a crash part-way leaves a consistent store, and a re-run finishes.
            let candidates = inner.store.read()?.expiring_before(cutoff, usize::MAX)?;
            report.expired = inner.purge_in_batches("expired tokens", &candidates, |txn, (t, p, n)| {
                match txn.with_record(p, n, |r| Ok(r.expires_at == Some(*t))) {
                    Ok(Some(true)) => {}
                    // Gone, or another not-after: the index entry is stale.
                    Ok(_) => {
                        txn.drop_stale_expiry(*t, p, n)?;
                        return Ok(false);
                    }
                    // Damaged: its expiry cannot be trusted; doctor names it, salvage
                    // leaves it behind. Never deleted on an index entry's word.
                    Err(Error::Integrity { .. }) => return Ok(false),
                    Err(e) => return Err(e),
                }
                if inner.refresh_token_alive(txn, p, n)? {
                    return Ok(false);
                }
                Ok(txn.delete_record(p, n)?.is_some())
            })?;
        }
        if opts.revoked {
            let candidates: Vec<(String, String)> = inner
                .store
                .read()?
                .tombstones()?
                .into_iter()
                .filter(|(_, _, t)| t.revoked_at <= cutoff)
                .map(|(p, n, _)| (p, n))
                .collect();
            report.tombstones = inner.purge_in_batches("tombstones", &candidates, |txn, (p, n)| {
                // Re-read: a name revoked again since the list was read is kept.
                if txn.tombstone(p, n)?.is_none_or(|t| t.revoked_at > cutoff) {
                    return Ok(false);
                }
                txn.put_tombstone(p, n, None)?;
                Ok(true)
            })?;
        }
        Ok(report)
    }

    /// Destroys every DEK version of `provider` (crypto-shredding): its tokens become
    /// unrecoverable. Returns the versions destroyed.
    pub fn shred(&self, provider: &str) -> Result<Vec<u32>> {
        validate_ident("provider", provider)?;
        let inner = &*self.inner;
        let destroyed = inner.write(|txn| {
            let entries = txn.deks(Some(provider), None)?;
            if entries.is_empty() {
                return Err(Error::NotFound { provider: provider.into(), name: "(no data keys)".into() });
            }
            let entries = entries.into_iter().map(|(_, e)| e);
            inner.end_versions(txn, provider, entries, DekState::Destroyed, "shred", "destroyed versions")
        })?;
        inner.cache.forget(provider, &destroyed);
        Ok(destroyed)
    }
}

impl super::Inner {
    /// Runs `step` on each of `items`, PURGE_BATCH items per transaction, auditing
    /// each batch that removed something. `step` says whether it removed its item.
    /// Returns the total removed.
    fn purge_in_batches<T>(
        &self,
        what: &str,
        items: &[T],
        mut step: impl FnMut(&WriteTxn, &T) -> Result<bool>,
    ) -> Result<u64> {
        let mut total = 0;
        for chunk in items.chunks(PURGE_BATCH) {
            total += self.write(|txn| {
                let mut n = 0u64;
                for item in chunk {
                    n += u64::from(step(txn, item)?);
                }
                if n > 0 {
                    let detail = format!("{n} {what}");
                    self.audit(txn, NewEvent { op: "purge", outcome: "ok", detail, ..Default::default() })?;
                }
                Ok(n)
            })?;
        }
        Ok(total)
    }

    /// Whether (provider, name) is a token set whose refresh token is still good: its
    /// not-after is the access token's, and purging it would throw away what can
    /// renew it.
    fn refresh_token_alive(&self, txn: &impl StoreRead, provider: &str, name: &str) -> Result<bool> {
        let alive = txn.with_record(provider, name, |rec| {
            if rec.kind() != crate::seal::SecretKind::TokenSet {
                return Ok(false);
            }
            // Damage or shredding: nothing left to renew. Anything else (the hardware,
            // the PIN, a lock) is an error, never a reason to delete.
            let opened =
                self.cipher(txn, provider, name, rec.dek_version).and_then(|c| rec.open(&c.cipher, &self.store_id));
            let set = match opened {
                Ok(crate::secret::Secret::TokenSet(set)) => set,
                Ok(crate::secret::Secret::Raw(_)) | Err(Error::Integrity { .. } | Error::Shredded { .. }) => {
                    return Ok(false);
                }
                Err(e) => return Err(e),
            };
            if set.get(crate::secret::field::REFRESH_TOKEN).is_none() {
                return Ok(false);
            }
            let until = set.get("refresh_token_expires_at").and_then(|v| v.expose_str()?.trim().parse::<u64>().ok());
            Ok(until.is_none_or(|u| u > now()))
        })?;
        Ok(alive == Some(true))
    }

    fn revoke_one(&self, txn: &WriteTxn, provider: &str, name: &str, reason: &str) -> Result<()> {
        let Some(old) = txn.delete_record(provider, name)? else {
            return Ok(());
        };
        let meta = RecordView::parse(&old).and_then(|v| v.metadata()).ok();
        let ts = Tombstone {
            revoked_at: now(),
            reason: reason.into(),
            actor: self.actor(),
            expires_at: meta.as_ref().and_then(|m| m.expires_at),
            labels: meta.map(|m| m.labels).unwrap_or_default(),
        };
        txn.put_tombstone(provider, name, Some(&ts))?;
        self.audit(txn, NewEvent { op: "revoke", provider, name, outcome: "ok", detail: reason.into() })
    }
}

/// Whether a scanned record carries label `key=value`. A record that does not parse
/// while `inspecting` a store whose state does not verify is named in a warning and
/// skipped: its labels cannot be read, and it must not stop the revocation of the
/// others (the exit code still says integrity). Anywhere else it is an error.
fn label_matches(rec: Result<RecordView<'_>>, key: &str, value: &str, inspecting: bool) -> Result<bool> {
    match rec.and_then(|r| r.metadata()) {
        Ok(m) => Ok(m.labels.get(key).map(String::as_str) == Some(value)),
        Err(Error::Integrity { .. }) if inspecting => Ok(false),
        Err(e) => Err(e),
    }
}

/// The names of the records (of one provider) that `keep` selects.
fn collect_names(
    txn: &impl StoreRead,
    provider: Option<&str>,
    keep: impl Fn(Result<RecordView<'_>>) -> Result<bool>,
) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    txn.scan_records(provider, &mut |p, n, rec| {
        if let Err(e) = &rec {
            tracing::warn!(provider = p, name = n, error = %e, "damaged record skipped");
        }
        if keep(rec)? {
            out.push((p.to_string(), n.to_string()));
        }
        Ok(ControlFlow::Continue(()))
    })?;
    Ok(out)
}

/// A revocation's reason: 1-512 printable characters. Checked before anything is
/// done, the provider's revocation endpoint included.
pub fn check_reason(reason: &str) -> Result<()> {
    if reason.trim().is_empty() || reason.len() > 512 || reason.chars().any(char::is_control) {
        return Err(Error::InvalidInput(
            "a revocation needs a reason of 1-512 printable characters (no newlines or control characters)".into(),
        ));
    }
    Ok(())
}
