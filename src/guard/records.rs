//! Tokens in and out: put, put_many, get, list, delete, and the audit trail's reads.

use std::collections::BTreeMap;
use std::ops::ControlFlow;

use super::keys::Sealer;
use super::{GetOptions, PutItem, PutOptions, TokenGuard, TokenInfo, validate_ident};
use crate::audit::{self, AuditEvent, AuditRecord, AuditReport, NewEvent};
use crate::error::{Error, Result};
use crate::seal::{Metadata, SecretKind, TokenState};
use crate::secret::Secret;
use crate::store::{StoreRead, StoreWrite};

const MAX_SECRET: usize = 64 * 1024;
const MAX_LABEL_VALUE: usize = 256;

fn validate_item(it: &PutItem) -> Result<()> {
    validate_ident("provider", &it.provider)?;
    validate_ident("name", &it.name)?;
    let size = match &it.secret {
        Secret::Raw(s) => s.len(),
        Secret::TokenSet(t) => t.iter().map(|(n, v)| n.len() + v.len()).sum(),
    };
    if size == 0 || size > MAX_SECRET {
        return Err(Error::InvalidInput(format!("a secret must be 1 to {MAX_SECRET} bytes")));
    }
    for (k, v) in &it.options.labels {
        validate_ident("label key", k)?;
        if v.len() > MAX_LABEL_VALUE || v.chars().any(char::is_control) {
            return Err(Error::InvalidInput(format!(
                "label values are at most {MAX_LABEL_VALUE} printable characters"
            )));
        }
    }
    Ok(())
}

/// What [`TokenGuard::list_report`] found.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ListReport {
    /// The tokens, sorted.
    pub tokens: Vec<TokenInfo>,
    /// Records that do not parse, as `provider/name`.
    pub damaged: Vec<String>,
}

impl TokenGuard {
    /// Seals and stores `secret` under (provider, name), replacing any earlier value.
    pub fn put(&self, provider: &str, name: &str, secret: Secret, options: PutOptions) -> Result<Metadata> {
        self.put_checked(provider, name, secret, options, true).map(|(m, _)| m)
    }

    /// As [`TokenGuard::put`]; with `overwrite` false, an existing token is refused
    /// ([`Error::Exists`]) in the same transaction that would replace it. Returns the
    /// metadata written and whether a token was replaced.
    pub fn put_checked(
        &self,
        provider: &str,
        name: &str,
        secret: Secret,
        options: PutOptions,
        overwrite: bool,
    ) -> Result<(Metadata, bool)> {
        let item = PutItem { provider: provider.into(), name: name.into(), secret, options };
        let (mut out, replaced) = self.put_items(std::slice::from_ref(&item), "put", overwrite)?;
        Ok((out.pop().ok_or_else(|| Error::integrity("storing a record"))?, replaced > 0))
    }

    /// Stores many tokens in one transaction: one durable commit for all of them.
    pub fn put_many(&self, items: Vec<PutItem>) -> Result<usize> {
        self.put_items(&items, "put_many", true)?;
        Ok(items.len())
    }

    /// Writes `items` in one transaction; returns their metadata and how many
    /// replaced an existing token.
    fn put_items(&self, items: &[PutItem], op: &str, overwrite: bool) -> Result<(Vec<Metadata>, usize)> {
        for it in items {
            validate_item(it)?;
        }
        let inner = &*self.inner;
        let t = crate::clock::now();
        inner.write(|txn| {
            let mut upcoming: BTreeMap<&str, u64> = BTreeMap::new();
            for it in items {
                *upcoming.entry(it.provider.as_str()).or_default() += 1;
            }
            let mut sealer = Sealer::new(inner, txn, &upcoming)?;
            let keys: Vec<(&str, &str)> = items.iter().map(|it| (it.provider.as_str(), it.name.as_str())).collect();
            // A put re-issues a revoked name: its tombstone goes.
            txn.remove_tombstones(&keys)?;
            let batch: Vec<(&str, &str, &Secret)> =
                items.iter().map(|it| (it.provider.as_str(), it.name.as_str(), &it.secret)).collect();
            let mut replaced = 0;
            let written = sealer.put_many(txn, &batch, &mut |i, old| {
                let it = items.get(i)?;
                if old.is_some() {
                    replaced += 1;
                    if !overwrite {
                        return None;
                    }
                }
                Some(Metadata {
                    // An existing record keeps its first-stored time.
                    created: old.map_or(t, |o| o.created),
                    // Every write moves `updated` forward, even within one second: it
                    // is the record's version, which refresh compares and sets.
                    updated: old.map_or(t, |o| t.max(o.updated.saturating_add(1))),
                    expires_at: it.options.expires_at,
                    state: TokenState::Active,
                    kind: SecretKind::of(&it.secret),
                    token_type: it.options.token_type.clone(),
                    scopes: it.options.scopes.clone(),
                    labels: it.options.labels.clone(),
                })
            })?;
            if !overwrite && replaced > 0 {
                let it = &items[0];
                return Err(Error::Exists { provider: it.provider.clone(), name: it.name.clone() });
            }
            let out =
                written.into_iter().collect::<Option<Vec<_>>>().ok_or_else(|| Error::integrity("storing a record"))?;
            sealer.finish(txn)?;
            match items {
                [it] => inner.audit(
                    txn,
                    NewEvent { op, provider: &it.provider, name: &it.name, outcome: "ok", detail: String::new() },
                )?,
                _ => inner.audit(
                    txn,
                    NewEvent { op, outcome: "ok", detail: format!("{} tokens", items.len()), ..Default::default() },
                )?,
            }
            tracing::debug!(op, records = items.len(), "records sealed and committed");
            Ok((out, replaced))
        })
    }

    /// Opens the token (provider, name). Fails with [`Error::Expired`] past its
    /// not-after and [`Error::Revoked`] once revoked.
    pub fn get(&self, provider: &str, name: &str) -> Result<Secret> {
        self.get_inner(provider, name, GetOptions::default(), false).map(|(s, _)| s)
    }

    /// As [`TokenGuard::get`], with options, returning the metadata too.
    pub fn get_with(&self, provider: &str, name: &str, opts: GetOptions) -> Result<(Secret, Metadata)> {
        let (s, m) = self.get_inner(provider, name, opts, true)?;
        Ok((s, m.ok_or_else(|| Error::integrity("decoding metadata"))?))
    }

    /// One field of a token (`None`: the raw secret, or a token set's access token),
    /// with the token's metadata. The token's not-after is its access token's: it
    /// governs the access token only. Any other field is governed by its own
    /// `FIELD_expires_at` in the set, if there is one (a refresh token outlives the
    /// access token it came with).
    pub fn get_field(
        &self,
        provider: &str,
        name: &str,
        field: Option<&str>,
        opts: GetOptions,
    ) -> Result<(crate::secret::SecretBytes, Metadata)> {
        use crate::secret::field as f;
        let (secret, meta) = self.get_inner(provider, name, GetOptions { allow_expired: true }, true)?;
        let meta = meta.ok_or_else(|| Error::integrity("decoding metadata"))?;
        let value = secret.field(field).ok_or_else(|| Error::NoSuchField {
            provider: provider.into(),
            name: name.into(),
            field: field.unwrap_or(f::ACCESS_TOKEN).into(),
        })?;
        let not_after = match (field, &secret) {
            (None | Some(f::ACCESS_TOKEN | f::TOKEN), _) | (_, Secret::Raw(_)) => meta.expires_at,
            (Some(other), Secret::TokenSet(set)) => {
                // `FIELD_expires_at`, or for a nested access token (Slack's
                // `authed_user.access_token`) its object's `expires_at`.
                let sibling =
                    other.strip_suffix(f::ACCESS_TOKEN).filter(|p| p.ends_with('.')).map(|p| format!("{p}expires_at"));
                [Some(format!("{other}_expires_at")), sibling]
                    .into_iter()
                    .flatten()
                    .find_map(|k| set.get(&k).and_then(|v| v.expose_str()).and_then(|v| v.trim().parse::<u64>().ok()))
            }
        };
        if !opts.allow_expired
            && let Some(e) = not_after.filter(|t| crate::clock::now() >= *t)
        {
            return Err(Error::Expired { provider: provider.into(), name: name.into(), expired_at: e });
        }
        Ok((value.duplicate(), meta))
    }

    /// The read path. Works on a borrowed view of the stored record: no copy of the
    /// record and no allocation before the AES-GCM open; full metadata only if asked.
    fn get_inner(
        &self,
        provider: &str,
        name: &str,
        opts: GetOptions,
        with_meta: bool,
    ) -> Result<(Secret, Option<Metadata>)> {
        let inner = &*self.inner;
        let txn = inner.store.read()?;
        let found = txn.with_record(provider, name, |rec| {
            let cipher = inner.cipher(&txn, provider, name, rec.dek_version)?;
            let secret = rec.open(&cipher.cipher, &inner.store_id)?;
            if rec.state == TokenState::Revoked {
                // Revocation removes the record; a record still marked revoked is honoured.
                return Err(Error::Revoked {
                    provider: provider.into(),
                    name: name.into(),
                    revoked_at: rec.updated,
                    reason: "revoked".into(),
                });
            }
            if !opts.allow_expired
                && let Some(e) = rec.expires_at.filter(|t| crate::clock::now() >= *t)
            {
                return Err(Error::Expired { provider: provider.into(), name: name.into(), expired_at: e });
            }
            let meta = if with_meta { Some(rec.metadata()?) } else { None };
            tracing::trace!(provider, name, version = rec.dek_version, "record opened");
            Ok((secret, meta))
        })?;
        match found {
            Some(out) => Ok(out),
            None => Err(match txn.tombstone(provider, name)? {
                Some(t) => Error::Revoked {
                    provider: provider.into(),
                    name: name.into(),
                    revoked_at: t.revoked_at,
                    reason: t.reason,
                },
                None => Error::NotFound { provider: provider.into(), name: name.into() },
            }),
        }
    }

    /// Metadata of every token (of one provider), sorted. Never opens a secret. A
    /// record that does not parse is an integrity error here;
    /// [`TokenGuard::list_report`] lists the others and names it.
    pub fn list(&self, provider: Option<&str>) -> Result<Vec<TokenInfo>> {
        let r = self.list_report(provider)?;
        if !r.damaged.is_empty() {
            return Err(Error::integrity("listing records, one of which does not parse (see `tokenguard doctor`)"));
        }
        Ok(r.tokens)
    }

    /// [`TokenGuard::list`], with the records that do not parse named
    /// (`provider/name`): one damaged record never hides the others (security issue,
    /// finding 9). A store whose state verifies holds none, unless the operator
    /// accepted one (`upgrade --accept-current-state`).
    pub fn list_report(&self, provider: Option<&str>) -> Result<ListReport> {
        if let Some(p) = provider {
            validate_ident("provider", p)?;
        }
        let txn = self.inner.store.read()?;
        let t = crate::clock::now();
        let destroyed: std::collections::BTreeSet<(String, u32)> = txn
            .deks(provider, None)?
            .into_iter()
            .filter(|(_, e)| e.state == crate::store::DekState::Destroyed)
            .map(|(p, e)| (p, e.version))
            .collect();
        let mut out = Vec::new();
        let mut damaged = Vec::new();
        txn.scan_records(provider, &mut |p, n, rec| {
            let (rec, meta) = match rec.and_then(|r| r.metadata().map(|m| (r, m))) {
                Ok(x) => x,
                Err(Error::Integrity { .. }) => {
                    tracing::warn!(provider = p, name = n, "damaged record left out of the list");
                    damaged.push(format!("{p}/{n}"));
                    return Ok(ControlFlow::Continue(()));
                }
                Err(e) => return Err(e),
            };
            let shredded = destroyed.contains(&(rec.provider.to_string(), rec.dek_version));
            out.push(TokenInfo {
                provider: rec.provider.to_string(),
                name: rec.name.to_string(),
                status: super::Condition::of(&meta, shredded, t),
                dek_version: rec.dek_version,
                expired: meta.is_expired_at(t),
                meta,
            });
            Ok(ControlFlow::Continue(()))
        })?;
        Ok(ListReport { tokens: out, damaged })
    }

    /// Removes a token and its index entries.
    pub fn delete(&self, provider: &str, name: &str) -> Result<()> {
        validate_ident("provider", provider)?;
        validate_ident("name", name)?;
        let inner = &*self.inner;
        inner.write(|txn| {
            if txn.delete_record(provider, name)?.is_none() {
                return Err(Error::NotFound { provider: provider.into(), name: name.into() });
            }
            inner.audit(txn, NewEvent { op: "delete", provider, name, outcome: "ok", detail: String::new() })
        })
    }

    /// Records an audit event on its own (used by the CLI for reads and failures).
    pub fn audit_event(&self, op: &str, provider: &str, name: &str, outcome: &str) -> Result<()> {
        let inner = &*self.inner;
        inner.write(|txn| inner.audit(txn, NewEvent { op, provider, name, outcome, detail: String::new() }))?;
        tracing::debug!(op, provider, name, outcome, "audit event appended");
        Ok(())
    }

    /// Appends `events` to the audit trail in one durable commit, each under its own
    /// actor: an agent's group commit of its clients' reads. Empty: nothing is written.
    pub fn audit_batch(&self, events: &[AuditRecord]) -> Result<()> {
        if events.is_empty() {
            return Ok(());
        }
        let inner = &*self.inner;
        inner.write(|txn| inner.audit_all(txn, super::journal::new_events(events)))?;
        tracing::debug!(events = events.len(), "audit events appended in one commit");
        Ok(())
    }

    /// Folds the read journal before the trail is read; if that fails the trail is
    /// still read (what the store holds), and the journal's events are not in it.
    fn fold_for_reading(&self) {
        if let Err(e) = self.fold_journal() {
            tracing::warn!(error = %e, "the read journal could not be folded; its events are not in this answer");
        }
    }

    /// Verifies the audit chain (the read journal folded in first, if one is attached).
    pub fn audit_verify(&self) -> Result<AuditReport> {
        self.fold_for_reading();
        audit::verify(&self.inner.store.read()?, &self.inner.keys().audit)
    }

    /// Audit events from sequence `from` on (unverified; run `audit_verify` to check),
    /// the read journal folded in first, if one is attached.
    pub fn audit_list(&self, from: u64) -> Result<Vec<AuditEvent>> {
        self.fold_for_reading();
        audit::list(&self.inner.store.read()?, from)
    }
}
