//! The read journal of an exclusive guard (see `store::journal`): audit events made
//! durable by one `fdatasync` and folded into the store's chain by its next write.

use super::{Inner, TokenGuard};
use crate::audit::{AuditRecord, NewEvent};
use crate::error::{Error, Result};
use crate::store::journal::Appended;
use crate::store::{StoreRead, StoreWrite};

/// Where a guard's read journal stands (`doctor` and the agent's `stats`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct JournalStatus {
    /// The journal file.
    pub path: std::path::PathBuf,
    /// Events on disk in the journal that the store's chain does not hold yet.
    pub pending: usize,
}

pub(super) fn new_events(events: &[AuditRecord]) -> impl Iterator<Item = (String, NewEvent<'_>)> {
    events.iter().map(|e| {
        let ev =
            NewEvent { op: &e.op, provider: &e.provider, name: &e.name, outcome: &e.outcome, detail: e.detail.clone() };
        (e.actor.clone(), ev)
    })
}

impl TokenGuard {
    /// Attaches the read journal: from now on [`TokenGuard::audit_journaled`] makes
    /// events durable in `<store>.audit-journal` (0600) with one `fdatasync` per
    /// batch, and every write of this guard folds them into the store's chain first.
    /// Exclusive mode only (the agent's): this process must be the store's one writer.
    pub fn start_read_journal(&self) -> Result<()> {
        if self.inner.store.journal_status().is_some() {
            return Ok(());
        }
        // Whatever an earlier owner left is folded before the file is reused.
        fold_leftover_journal(&self.inner)?;
        self.inner.store.attach_journal()?;
        tracing::info!(path = %crate::store::journal::path_of(self.path()).display(), "read journal attached");
        Ok(())
    }

    /// Appends `events` to the audit trail, each under its own actor, durably: in the
    /// read journal when one is attached (folded into the store by the next write, or
    /// [`TokenGuard::fold_journal`]), otherwise in one store commit
    /// ([`TokenGuard::audit_batch`]). On `Ok` the events are on disk.
    pub fn audit_journaled(&self, events: &[AuditRecord]) -> Result<()> {
        if events.is_empty() {
            return Ok(());
        }
        let inner = &*self.inner;
        for _ in 0..2 {
            let appended = inner.store.journal_append(|head, archive| {
                let keys = inner.keys();
                if archive != keys.archive.as_deref() {
                    return Err(Error::integrity(
                        "journaling an audit event: the store's keys were replaced (a `root remove` or `upgrade`); \
                         reopen the store",
                    ));
                }
                crate::audit::link(&keys.audit, head, new_events(events))
            })?;
            match appended {
                None => break,
                Some(Appended::Done) => {
                    tracing::trace!(events = events.len(), "audit events journaled");
                    return Ok(());
                }
                // Full: fold, and try once more; a batch larger than the whole journal
                // is committed to the store directly.
                Some(Appended::Full) => {
                    self.fold_journal()?;
                }
            }
        }
        self.audit_batch(events)
    }

    /// Folds the read journal into the store's chain now (one durable commit) and
    /// returns how many events it moved; 0, and no commit, when it holds none.
    pub fn fold_journal(&self) -> Result<usize> {
        let Some((_, pending)) = self.inner.store.journal_status() else { return Ok(0) };
        if pending == 0 {
            return Ok(0);
        }
        // Any write folds the journal first; this one does nothing else. If it fails,
        // the journal takes no new events until a fold succeeds: reads are not
        // answered for longer than the store can take their events in.
        if let Err(e) = self.inner.write(|_| Ok(())) {
            self.inner.store.journal_stall(&e.to_string());
            return Err(e);
        }
        tracing::debug!(events = pending, "read journal folded into the store");
        Ok(pending)
    }

    /// The read journal's file and what it holds, when one is attached.
    pub fn journal_status(&self) -> Option<JournalStatus> {
        self.inner.store.journal_status().map(|(path, pending)| JournalStatus { path, pending })
    }
}

/// Folds into the store's chain what a read journal left by a process that stopped
/// without folding it (a crash, a SIGKILL, a power cut): every frame past the store's
/// head that continues the chain, link and MAC checked, with an event that says how
/// many came from the journal and how many frames past the head did not continue it.
/// Then the journal is marked empty. Run at every open: a store's next writer, of any
/// process, folds first.
pub(super) fn fold_leftover_journal(inner: &Inner) -> Result<()> {
    let path = inner.store.path();
    let frames = crate::store::journal::read_frames(path)?;
    if frames.is_empty() {
        return Ok(());
    }
    let keys = inner.keys();
    let report = std::cell::Cell::new((0usize, 0usize));
    inner.write(|txn| {
        if txn.audit_archive()? != keys.archive {
            return Err(Error::integrity("folding the read journal: the store's audit keys are not this guard's"));
        }
        let head = txn.audit_head()?;
        // Frames at or below the head must be the store's own entries, byte for byte.
        let first_held = frames.iter().filter_map(|f| crate::audit::decode_entry(f).ok()).map(|e| e.seq).min();
        let stored = match first_held {
            Some(from) => txn.audit_entries(from)?,
            None => Vec::new(),
        };
        let c = crate::audit::continuation(&keys.audit, head.as_deref(), &frames, &stored)?;
        report.set((c.entries.len(), c.discarded + c.conflicting));
        if c.entries.is_empty() && c.discarded == 0 && c.conflicting == 0 {
            return Ok(());
        }
        if !c.entries.is_empty() {
            txn.append_audit(&c.entries, &c.head)?;
        }
        let journal = crate::store::journal::path_of(path);
        let mut detail = format!(
            "{} events folded from the read journal {} that its writer left unfolded (an unclean stop)",
            c.entries.len(),
            journal.display()
        );
        if c.discarded > 0 {
            detail.push_str(&format!(
                "; {} frames after them do not continue the chain and were discarded (a write cut short by the stop, \
                 or an edit of the file)",
                c.discarded
            ));
        }
        if c.conflicting > 0 {
            detail.push_str(&format!(
                "; {} frames at or below the store's head differ from the store's own events (an edit of the file, or \
                 events written over them by a process that did not fold the journal)",
                c.conflicting
            ));
        }
        let outcome = if c.discarded + c.conflicting > 0 { "discarded" } else { "ok" };
        inner.audit(txn, NewEvent { op: "audit-journal", outcome, detail, ..Default::default() })
    })?;
    crate::store::journal::clear(path)?;
    let (folded, discarded) = report.get();
    if folded > 0 || discarded > 0 {
        tracing::warn!(folded, discarded, "read journal left by an unclean stop folded into the audit trail");
    }
    Ok(())
}
