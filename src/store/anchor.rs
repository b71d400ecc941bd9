//! Whole-store rollback: the store's binding to a hardware monotonic counter.
//!
//! The authenticated state catches any row put back on its own, but not a whole older
//! copy of the file (rows and head together): only something outside the file that
//! moves forward can. The store keeps, in a covered row (`meta.anchor`), the value the
//! counter has once the commit that wrote the row is finished. Every write, under a
//! lock held across processes from before the transaction until after the increment:
//!
//! 1. reads the counter; it must equal the stored value (or be one behind it: the
//!    previous writer committed and died before its increment, which is finished now);
//! 2. writes value + 1 in the same transaction as its changes, and commits;
//! 3. increments the counter.
//!
//! A crash between 2 and 3 leaves the store one ahead, which the next open or write
//! finishes. A store whose value is below the counter is an older copy: refused at
//! open (exit 4), reported by `doctor`. The one copy that cannot be told apart is the
//! state just before the last commit, and only while that commit's increment has not
//! happened (docs/DESIGN-NOTES.md §"Whole-store rollback").

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::schema::Anchor;
use crate::error::{Error, Result};

/// Where a store stands against its counter.
#[derive(Debug)]
pub(crate) enum Position {
    /// The counter has the stored value.
    Current,
    /// The counter is one behind: the last commit's increment did not happen.
    OneAhead,
    /// Anything else: an older copy of the store, another counter, a counter gone.
    Wrong(Error),
}

/// Compares the stored anchor with the counter `counter_id` reads `counter`.
pub(crate) fn position(stored: &Anchor, counter_id: &str, counter: Option<u64>) -> Position {
    if stored.counter_id != counter_id {
        return Position::Wrong(Error::Config(format!(
            "the store is bound to the rollback counter {}, but the configured one is {counter_id}; configure \
             that counter, or bind the store to this one with `tokenguard upgrade --accept-current-state`",
            stored.counter_id
        )));
    }
    let Some(c) = counter else {
        return Position::Wrong(Error::Rollback {
            counter_id: counter_id.into(),
            stored: stored.value,
            counter: None,
            what: "the counter does not exist (a cleared TPM or another token?)",
        });
    };
    match c.cmp(&stored.value) {
        std::cmp::Ordering::Equal => Position::Current,
        std::cmp::Ordering::Less if c + 1 == stored.value => Position::OneAhead,
        std::cmp::Ordering::Less => Position::Wrong(Error::Rollback {
            counter_id: counter_id.into(),
            stored: stored.value,
            counter: Some(c),
            what: "the counter is behind the store (it was reset, or is not this store's)",
        }),
        std::cmp::Ordering::Greater => Position::Wrong(Error::Rollback {
            counter_id: counter_id.into(),
            stored: stored.value,
            counter: Some(c),
            what: "the store is older than its counter: an earlier copy of the file was put back",
        }),
    }
}

/// The lock that orders commits and counter increments across processes: an
/// exclusive `flock` on `<store>.counter-lock` (0600), released on drop and by the
/// kernel when a process dies.
pub(crate) struct CounterLock {
    _file: File,
}

/// The lock file of the store at `store`: beside the file the path resolves to, so
/// every process agrees whatever path (a symlink, a relative one) it was given.
pub(crate) fn lock_path(store: &Path) -> PathBuf {
    let store = std::fs::canonicalize(store).unwrap_or_else(|_| store.to_path_buf());
    let mut p = store.as_os_str().to_owned();
    p.push(".counter-lock");
    PathBuf::from(p)
}

impl CounterLock {
    /// Takes the lock, waiting at most `wait` ([`Error::StoreBusy`] then).
    pub(crate) fn take(store: &Path, wait: Duration) -> Result<Self> {
        let path = lock_path(store);
        let start = Instant::now();
        match crate::sync::flock(&path, true, wait) {
            Ok(Some(file)) => Ok(CounterLock { _file: file }),
            Ok(None) => Err(Error::StoreBusy {
                path: store.into(),
                waited_ms: u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX),
            }),
            Err(e) => Err(Error::Io { operation: "locking the counter lock", path, source: e }),
        }
    }
}
