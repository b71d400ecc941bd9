//! `salvage`: the recovery path when a store's records are damaged but the file still
//! opens. Every record that still verifies is copied, with the DEK entries, the roots
//! and the integrity key, into a new store with the same store id (so every record's
//! AAD still matches); what could not be saved is named.

use std::path::Path;

use serde::Serialize;

use super::TokenGuard;
use crate::audit::NewEvent;
use crate::error::Result;
use crate::seal::RecordView;
use crate::store::{Store, StoreOptions, StoreRead};

/// What a salvage saved and lost.
#[derive(Debug, Clone, Serialize)]
pub struct SalvageReport {
    /// Records in the damaged store.
    pub records: u64,
    /// Records that verified and were copied.
    pub saved: u64,
    /// `provider/name` of every record that did not verify.
    pub lost: Vec<String>,
    /// Whether the audit chain verified and was copied (otherwise the new store's
    /// chain starts with the salvage event).
    pub audit_kept: bool,
}

impl TokenGuard {
    /// Copies everything that still verifies into a new store at `to`.
    pub fn salvage(&self, to: &Path, opts: StoreOptions) -> Result<SalvageReport> {
        let inner = &*self.inner;
        let txn = inner.store.read()?;
        // The snapshot copied is the one checked: refused if its rows do not verify,
        // unless this guard was opened for inspection (the operator accepted them).
        inner.store.verify_snapshot(&txn)?;
        let meta = txn.meta()?;
        let mut dump = txn.dump()?;
        let records = dump.tokens.len() as u64;
        let mut lost = Vec::new();
        dump.tokens.retain(|(p, n, bytes)| {
            let opens = RecordView::parse(bytes).and_then(|rec| {
                if rec.provider != p || rec.name != n {
                    return Err(crate::error::Error::integrity("checking a record's place"));
                }
                let cipher = inner.cipher(&txn, p, n, rec.dek_version)?;
                rec.open(&cipher.cipher, &inner.store_id).map(drop)
            });
            if opens.is_err() {
                lost.push(format!("{p}/{n}"));
            }
            opens.is_ok()
        });
        let audit_kept = self.audit_verify().is_ok_and(|r| r.first_bad.is_none());
        if !audit_kept {
            dump.audit.clear();
            dump.audit_head.clear();
        }
        drop(txn);
        let saved = dump.tokens.len() as u64;
        let detail = format!("{saved} of {records} records from {}", inner.store.path().display());
        let key = crate::store::state::StateKey::derive(&inner.keys().integrity_key);
        let saved_store = Store::create(to, opts, &meta, key, crate::clock::now(), |t| {
            t.load(&dump)?;
            inner.audit(t, NewEvent { op: "salvage", outcome: "ok", detail, ..Default::default() })
        })?;
        // The new store replaces this one: bound to the rollback counter from now on,
        // so this one reads as the older copy it is.
        if let Some(root) = super::open::counter_root(&inner.roots) {
            saved_store.use_counter(Some(root));
            saved_store.bind_counter(crate::store::AnchorWrite::Rebind, |_| Ok(()))?;
        }
        Ok(SalvageReport { records, saved, lost, audit_kept })
    }
}
