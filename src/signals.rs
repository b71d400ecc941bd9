//! Termination signals that never split a step that must not be split.
//!
//! A SIGINT, SIGTERM or SIGHUP that lands while a process loads the PKCS#11 module and
//! logs in (SoftHSM2 rewrites its token file there), or inside a write transaction,
//! is deferred to the end of that step; at any other moment it ends the process at
//! once, as it would have. The library marks those steps ([`Critical`]); a program
//! opts in with [`defer_termination_signals`] (the CLI does, except for commands that
//! handle signals themselves). SIGKILL cannot be deferred: README "Reliability" says
//! what survives it.

use std::sync::atomic::{AtomicI32, AtomicUsize, Ordering};

use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};

use crate::error::{Error, Result};

static CRITICAL: AtomicUsize = AtomicUsize::new(0);
static PENDING: AtomicI32 = AtomicI32::new(0);

/// A step a termination signal must not split; the signal waits for its drop.
pub(crate) struct Critical(());

impl Critical {
    pub(crate) fn enter() -> Self {
        CRITICAL.fetch_add(1, Ordering::SeqCst);
        Critical(())
    }
}

impl Drop for Critical {
    fn drop(&mut self) {
        if CRITICAL.fetch_sub(1, Ordering::SeqCst) == 1 {
            let sig = PENDING.swap(0, Ordering::SeqCst);
            if sig != 0 {
                die(sig);
            }
        }
    }
}

/// Ends the process as `sig` would have, after putting the terminal back if a
/// hidden prompt had changed it.
fn die(sig: i32) {
    crate::tty::restore_after_signal();
    let _ = signal_hook::low_level::emulate_default_handler(sig);
    std::process::exit(128 + sig);
}

/// Installs the deferral for this process: a thread receives SIGINT, SIGTERM and
/// SIGHUP and ends the process at once, or at the end of the critical step in
/// progress. Call it once, early; not in a program that handles these signals itself.
pub fn defer_termination_signals() -> Result<()> {
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP]).map_err(|e| Error::Io {
        operation: "installing signal handlers",
        path: "-".into(),
        source: e,
    })?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                if CRITICAL.load(Ordering::SeqCst) == 0 {
                    die(sig);
                }
                PENDING.store(sig, Ordering::SeqCst);
                // The step may have ended between the two lines above.
                if CRITICAL.load(Ordering::SeqCst) == 0 && PENDING.swap(0, Ordering::SeqCst) != 0 {
                    die(sig);
                }
            }
        })
        .map_err(|e| Error::Io { operation: "starting the signal thread", path: "-".into(), source: e })?;
    Ok(())
}
