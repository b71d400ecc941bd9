//! Revocation, expiry, purge, crypto-shredding and per-token status.
//!
//! Revoking erases the sealed record and leaves a tombstone (time, reason, actor and
//! the token's non-secret metadata), so `get` can say *when and why* instead of "not
//! found". Shredding destroys every DEK version of a provider: its records remain but
//! can never be opened again, and the guard reports them as shredded, not corrupt.

use std::collections::BTreeMap;

use redb::{ReadableTable, WriteTransaction};
use serde::Serialize;

use super::{TokenGuard, now, validate_ident};
use crate::audit::NewEvent;
use crate::codec::{Malformed, Reader, Writer};
use crate::error::{Error, Result};
use crate::seal::{Metadata, ParsedRecord, RecordView, TokenState};
use crate::store::schema::{DekEntry, DekState};
use crate::store::{self as st};

/// Which tokens a revocation applies to.
#[derive(Debug, Clone)]
pub enum RevokeTarget<'a> {
    /// One token.
    One {
        /// Provider.
        provider: &'a str,
        /// Name.
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

/// A revoked token's tombstone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Tombstone {
    /// When, unix seconds.
    pub revoked_at: u64,
    /// Why.
    pub reason: String,
    /// Who.
    pub actor: String,
    /// The token's not-after when it was revoked.
    pub expires_at: Option<u64>,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
}

const TOMBSTONE_V1: u8 = 1;

impl Tombstone {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(64);
        w.u8(TOMBSTONE_V1).u64(self.revoked_at).str(&self.reason).str(&self.actor).opt_u64(self.expires_at);
        w.u32(self.labels.len() as u32);
        for (k, v) in &self.labels {
            w.str(k).str(v);
        }
        w.finish()
    }

    /// Decodes a stored tombstone.
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let f = || -> Result<Self, Malformed> {
            let mut r = Reader::new(bytes);
            if r.u8()? != TOMBSTONE_V1 {
                return Err(Malformed);
            }
            let revoked_at = r.u64()?;
            let reason = r.str()?.to_string();
            let actor = r.str()?.to_string();
            let expires_at = r.opt_u64()?;
            let n = r.count(8)?;
            let mut labels = BTreeMap::new();
            for _ in 0..n {
                labels.insert(r.str()?.to_string(), r.str()?.to_string());
            }
            r.finish()?;
            Ok(Tombstone { revoked_at, reason, actor, expires_at, labels })
        };
        f().map_err(|_| Error::integrity("decoding a tombstone"))
    }
}

/// What `status` reports for one token.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum TokenStatus {
    /// Usable.
    Active {
        /// Metadata.
        meta: Metadata,
    },
    /// Past its not-after.
    Expired {
        /// Metadata.
        meta: Metadata,
    },
    /// The provider refused its refresh token; needs a human.
    NeedsReauth {
        /// Metadata.
        meta: Metadata,
    },
    /// Revoked; only the tombstone remains.
    Revoked {
        /// The tombstone.
        tombstone: Tombstone,
    },
    /// Its provider's keys were destroyed: unrecoverable.
    Shredded {
        /// Metadata.
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

const PURGE_BATCH: usize = 500;

impl TokenGuard {
    /// Revokes the targeted tokens with `reason`: each sealed record is removed and a
    /// tombstone left. Returns the (provider, name) pairs revoked.
    pub fn revoke(&self, target: RevokeTarget<'_>, reason: &str) -> Result<Vec<(String, String)>> {
        if reason.trim().is_empty() || reason.len() > 512 {
            return Err(Error::InvalidInput("a revocation needs a reason of 1-512 characters".into()));
        }
        match &target {
            RevokeTarget::One { provider, name } => {
                validate_ident("provider", provider)?;
                validate_ident("name", name)?;
            }
            RevokeTarget::Provider(p) => validate_ident("provider", p)?,
            RevokeTarget::Label { key, .. } => validate_ident("label key", key)?,
        }
        let inner = &*self.inner;
        inner.store.write(|txn| {
            let victims: Vec<(String, String)> = {
                let tokens = txn.open_table(st::TOKENS)?;
                match &target {
                    RevokeTarget::One { provider, name } => {
                        if tokens.get((*provider, *name))?.is_none() {
                            return Err(Error::NotFound { provider: provider.to_string(), name: name.to_string() });
                        }
                        vec![(provider.to_string(), name.to_string())]
                    }
                    RevokeTarget::Provider(p) => {
                        let mut v = Vec::new();
                        for item in tokens.range((*p, "")..)? {
                            let (k, _) = item?;
                            let (kp, kn) = k.value();
                            if kp != *p {
                                break;
                            }
                            v.push((kp.to_string(), kn.to_string()));
                        }
                        v
                    }
                    RevokeTarget::Label { key, value } => {
                        let mut v = Vec::new();
                        for item in tokens.iter()? {
                            let (k, val) = item?;
                            let rec = ParsedRecord::parse(val.value())?;
                            if rec.header.meta.labels.get(*key).map(String::as_str) == Some(*value) {
                                let (kp, kn) = k.value();
                                v.push((kp.to_string(), kn.to_string()));
                            }
                        }
                        v
                    }
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
        let inner = &*self.inner;
        let txn = inner.store.read()?;
        let tokens = txn.open_table(st::TOKENS)?;
        let Some(v) = tokens.get((provider, name))? else {
            return match inner.tombstone(&txn, provider, name)? {
                Some(t) => Ok(TokenStatus::Revoked { tombstone: t }),
                None => Err(Error::NotFound { provider: provider.into(), name: name.into() }),
            };
        };
        let rec = ParsedRecord::parse(v.value())?;
        if rec.header.provider != provider || rec.header.name != name {
            return Err(Error::integrity("checking a record's place"));
        }
        let meta = rec.header.meta;
        let deks = txn.open_table(st::DEKS)?;
        if let Some(e) = deks.get((provider, rec.header.dek_version))?
            && DekEntry::decode(e.value())?.state == DekState::Destroyed
        {
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
        let txn = self.inner.store.read()?;
        let idx = txn.open_table(st::BY_EXPIRY)?;
        let until = now().saturating_add(within);
        let mut out = Vec::new();
        for item in idx.range((0u64, "", "")..(until, "", ""))? {
            let (k, _) = item?;
            let (t, p, n) = k.value();
            out.push((p.to_string(), n.to_string(), t));
        }
        Ok(out)
    }

    /// Removes expired tokens and/or tombstones, in batches (one transaction each),
    /// so a crash part-way leaves a consistent store and a re-run finishes the work.
    pub fn purge(&self, opts: PurgeOptions) -> Result<PurgeReport> {
        let inner = &*self.inner;
        let mut report = PurgeReport::default();
        let cutoff = now().saturating_sub(opts.older_than);
        if opts.expired {
            report.expired = inner.purge_in_batches("expired tokens", |txn| {
                let victims: Vec<(u64, String, String)> = {
                    let idx = txn.open_table(st::BY_EXPIRY)?;
                    let mut v = Vec::new();
                    for item in idx.range((0u64, "", "")..(cutoff, "", ""))?.take(PURGE_BATCH) {
                        let (k, _) = item?;
                        let (t, p, n) = k.value();
                        v.push((t, p.to_string(), n.to_string()));
                    }
                    v
                };
                let mut tokens = txn.open_table(st::TOKENS)?;
                let mut by_exp = txn.open_table(st::BY_EXPIRY)?;
                let mut by_dek = txn.open_table(st::BY_DEK)?;
                for (t, p, n) in &victims {
                    by_exp.remove((*t, p.as_str(), n.as_str()))?;
                    let old = tokens.remove((p.as_str(), n.as_str()))?.map(|g| g.value().to_vec());
                    if let Some(h) = old.as_deref().and_then(|b| RecordView::parse(b).ok()) {
                        by_dek.remove((p.as_str(), h.dek_version, n.as_str()))?;
                    }
                }
                Ok(victims.len())
            })?;
        }
        if opts.revoked {
            report.tombstones = inner.purge_in_batches("tombstones", |txn| {
                let victims: Vec<(String, String)> = {
                    let t = txn.open_table(st::TOMBSTONES)?;
                    let mut v = Vec::new();
                    for item in t.iter()? {
                        let (k, val) = item?;
                        if Tombstone::decode(val.value())?.revoked_at <= cutoff {
                            let (p, n) = k.value();
                            v.push((p.to_string(), n.to_string()));
                            if v.len() == PURGE_BATCH {
                                break;
                            }
                        }
                    }
                    v
                };
                let mut t = txn.open_table(st::TOMBSTONES)?;
                for (p, n) in &victims {
                    t.remove((p.as_str(), n.as_str()))?;
                }
                Ok(victims.len())
            })?;
        }
        Ok(report)
    }

    /// Destroys every DEK version of `provider` (crypto-shredding): its tokens become
    /// unrecoverable. Returns the versions destroyed.
    pub fn shred(&self, provider: &str) -> Result<Vec<u32>> {
        validate_ident("provider", provider)?;
        let inner = &*self.inner;
        let destroyed = inner.store.write(|txn| {
            let entries: Vec<DekEntry> = {
                let deks = txn.open_table(st::DEKS)?;
                let mut v = Vec::new();
                for item in deks.range((provider, 0u32)..=(provider, u32::MAX))? {
                    let (_, val) = item?;
                    v.push(DekEntry::decode(val.value())?);
                }
                v
            };
            if entries.is_empty() {
                return Err(Error::NotFound { provider: provider.into(), name: "(no data keys)".into() });
            }
            let mut out = Vec::new();
            for e in entries {
                if e.state != DekState::Destroyed {
                    out.push(e.version);
                    inner.set_dek_state(txn, provider, e, DekState::Destroyed)?;
                }
            }
            inner.audit(
                txn,
                NewEvent {
                    op: "shred",
                    provider,
                    outcome: "ok",
                    detail: format!("destroyed versions {out:?}"),
                    ..Default::default()
                },
            )?;
            Ok(out)
        })?;
        inner.cache.forget(provider, &destroyed);
        Ok(destroyed)
    }
}

impl super::Inner {
    /// Runs `step` (which removes at most PURGE_BATCH items) in one transaction per
    /// batch, auditing each batch, until a batch comes back short. Returns the total.
    fn purge_in_batches(&self, what: &str, mut step: impl FnMut(&WriteTransaction) -> Result<usize>) -> Result<u64> {
        let mut total = 0;
        loop {
            let n = self.store.write(|txn| {
                let n = step(txn)?;
                if n > 0 {
                    let detail = format!("{n} {what}");
                    self.audit(txn, NewEvent { op: "purge", outcome: "ok", detail, ..Default::default() })?;
                }
                Ok(n)
            })?;
            total += n as u64;
            if n < PURGE_BATCH {
                return Ok(total);
            }
        }
    }

    fn revoke_one(&self, txn: &WriteTransaction, provider: &str, name: &str, reason: &str) -> Result<()> {
        let mut tokens = txn.open_table(st::TOKENS)?;
        let Some(old) = tokens.remove((provider, name))?.map(|g| g.value().to_vec()) else {
            return Ok(());
        };
        drop(tokens);
        let header = ParsedRecord::parse(&old).ok().map(|r| r.header);
        if let Some(h) = &header {
            txn.open_table(st::BY_DEK)?.remove((provider, h.dek_version, name))?;
            if let Some(e) = h.meta.expires_at {
                txn.open_table(st::BY_EXPIRY)?.remove((e, provider, name))?;
            }
        }
        let ts = Tombstone {
            revoked_at: now(),
            reason: reason.into(),
            actor: self.opts.actor.clone(),
            expires_at: header.as_ref().and_then(|h| h.meta.expires_at),
            labels: header.map(|h| h.meta.labels).unwrap_or_default(),
        };
        txn.open_table(st::TOMBSTONES)?.insert((provider, name), ts.encode().as_slice())?;
        self.audit(txn, NewEvent { op: "revoke", provider, name, outcome: "ok", detail: reason.into() })
    }
}
