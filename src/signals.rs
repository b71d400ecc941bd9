//! Termination signals that never split a step that must not be split.
//!
//! A SIGINT, SIGTERM or SIGHUP that lands while a process loads the PKCS#11 module and
//! logs in (SoftHSM2 rewrites its token file there), or inside a write transaction,
//! is deferred to the end of that step; at any other moment it ends the process at
//! once, as it would have. The library marks those steps ([`Critical`]); a program
//! opts in with [`defer_termination_signals`] (the CLI does, except for commands that
//! handle signals themselves). SIGKILL cannot be deferred: README "Reliability" says
//! what survives it.

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicUsize, Ordering};

use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};

use crate::error::{Error, Result};

static CRITICAL: AtomicUsize = AtomicUsize::new(0);
static PENDING: AtomicI32 = AtomicI32::new(0);
/// A child process that SIGTERM and SIGHUP are passed on to (0: none; -1: one is
/// being started, and a signal waits in `FOR_CHILD` until its pid is known).
static CHILD: AtomicI32 = AtomicI32::new(0);
static FOR_CHILD: AtomicI32 = AtomicI32::new(0);
/// Set instead of ending the process, for a loop that stops between passes.
static STOP: AtomicBool = AtomicBool::new(false);
static STOP_MODE: AtomicBool = AtomicBool::new(false);
/// In serve mode, SIGHUP sets this instead of [`STOP`].
static RELOAD: AtomicBool = AtomicBool::new(false);
static RELOAD_MODE: AtomicBool = AtomicBool::new(false);
/// Set while the signal thread decides to end the process: no critical step may
/// start meanwhile.
static DYING: AtomicBool = AtomicBool::new(false);

/// A step a termination signal must not split; the signal waits for its drop.
pub(crate) struct Critical(());

impl Critical {
    pub(crate) fn enter() -> Self {
        loop {
            CRITICAL.fetch_add(1, Ordering::SeqCst);
            if !DYING.load(Ordering::SeqCst) {
                return Critical(());
            }
            // The process is being ended: do not start a step it would split.
            CRITICAL.fetch_sub(1, Ordering::SeqCst);
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
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
                let child = CHILD.load(Ordering::SeqCst);
                if child == STARTING {
                    // The child is being started: the signal is its, once its pid is
                    // known (whichever side swaps it out delivers it).
                    if sig != SIGINT {
                        FOR_CHILD.store(sig, Ordering::SeqCst);
                        let now = CHILD.load(Ordering::SeqCst);
                        if now != STARTING {
                            deliver(now, FOR_CHILD.swap(0, Ordering::SeqCst));
                        }
                    }
                    continue;
                }
                if child != 0 {
                    // The terminal already sent SIGINT to the whole process group,
                    // the child included: passing it on would deliver it twice.
                    if sig != SIGINT {
                        // SAFETY: kill sends a signal to the child this process
                        // started; it touches no memory.
                        #[allow(unsafe_code)]
                        unsafe {
                            libc::kill(child, sig)
                        };
                    }
                    continue;
                }
                if RELOAD_MODE.load(Ordering::SeqCst) && sig == SIGHUP {
                    RELOAD.store(true, Ordering::SeqCst);
                    continue;
                }
                if STOP_MODE.load(Ordering::SeqCst) {
                    STOP.store(true, Ordering::SeqCst);
                    continue;
                }
                DYING.store(true, Ordering::SeqCst);
                if CRITICAL.load(Ordering::SeqCst) == 0 {
                    die(sig);
                }
                // A step is in progress: its end acts on the signal.
                PENDING.store(sig, Ordering::SeqCst);
                DYING.store(false, Ordering::SeqCst);
                // The step may have ended between the lines above.
                if CRITICAL.load(Ordering::SeqCst) == 0 && PENDING.swap(0, Ordering::SeqCst) != 0 {
                    die(sig);
                }
            }
        })
        .map_err(|e| Error::Io { operation: "starting the signal thread", path: "-".into(), source: e })?;
    Ok(())
}

const STARTING: i32 = -1;

/// Passes `sig` (0: none) on to the child `pid`, or, with no child (it did not
/// start), ends this process as the signal would have.
fn deliver(pid: i32, sig: i32) {
    match (pid, sig) {
        (_, 0) => {}
        (p, s) if p > 0 => {
            // SAFETY: kill sends a signal to the child this process started; it
            // touches no memory.
            #[allow(unsafe_code)]
            unsafe {
                libc::kill(p, s)
            };
        }
        (_, s) => die(s),
    }
}

/// A child is about to be started: SIGTERM and SIGHUP from now on are kept for it,
/// and passed on by [`forward_to_child`] once its pid is known (a signal sent as
/// soon as the child shows signs of life must not end this process first).
pub fn child_starting() {
    CHILD.store(STARTING, Ordering::SeqCst);
}

/// From now on, SIGTERM and SIGHUP are passed on to `pid` (a child this process
/// waits for) and SIGINT is left to the terminal, which sends it to the child too;
/// the process itself goes on to clean up after the child. A signal kept since
/// [`child_starting`] is passed on now (`pid` 0: the child did not start, and the
/// signal ends this process).
pub fn forward_to_child(pid: u32) {
    let pid = i32::try_from(pid).unwrap_or(0);
    CHILD.store(pid, Ordering::SeqCst);
    deliver(pid, FOR_CHILD.swap(0, Ordering::SeqCst));
}

/// From now on, a termination signal only sets [`stop_requested`], for a loop that
/// stops cleanly between passes (critical steps are still never split: the loop
/// looks at the flag between them).
pub fn stop_between_passes() {
    STOP_MODE.store(true, Ordering::SeqCst);
}

/// Whether a termination signal arrived since [`stop_between_passes`].
pub fn stop_requested() -> bool {
    STOP.load(Ordering::SeqCst)
}

/// A long-running server: SIGTERM and SIGINT set [`stop_requested`], SIGHUP sets
/// [`reload_requested`] (critical steps are still never split).
pub fn serve_mode() {
    RELOAD_MODE.store(true, Ordering::SeqCst);
    STOP_MODE.store(true, Ordering::SeqCst);
}

/// Whether a SIGHUP arrived since the last call (serve mode).
pub fn reload_requested() -> bool {
    RELOAD.swap(false, Ordering::SeqCst)
}
