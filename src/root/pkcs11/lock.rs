//! Cross-process serialisation of the token's files.
//!
//! SoftHSM2 rewrites its `token.object` (truncate, then write) on every successful
//! `C_Login`; another process that loads or reads the token meanwhile sees no token
//! ("tokens present: \"\"") or `CKR_USER_PIN_NOT_INITIALIZED`. So every tokenguard
//! process takes an advisory lock on one file per module and user: exclusive while it
//! loads the module, finds the token and logs in, shared around every other call.
//! A lock is a `flock` on a fresh open of the file, so it works across processes and
//! between threads of one process alike; it is released when dropped (and by the
//! kernel when a process dies, so a SIGKILL never leaves it held). Waits are bounded.

use std::fs::{File, OpenOptions};
use std::hash::{Hash, Hasher};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// Longest wait for the lock before giving up with an error.
const MAX_WAIT: Duration = Duration::from_secs(30);

/// A held lock on the token's files. An exclusive one is also a critical step:
/// a termination signal waits for it (SoftHSM2 truncates its token file mid-login).
pub(super) struct TokenLock {
    _file: File,
    _critical: Option<crate::signals::Critical>,
}

/// The lock file of `module` for this user: in `$XDG_RUNTIME_DIR`, else the temp
/// directory.
fn lock_path(module: &Path) -> PathBuf {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    module.hash(&mut h);
    let uid = std::fs::metadata("/proc/self").map(|m| m.uid()).unwrap_or(0);
    let dir = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .filter(|d| d.is_dir())
        .unwrap_or_else(std::env::temp_dir);
    dir.join(format!("tokenguard-pkcs11-{uid}-{:016x}.lock", h.finish()))
}

impl TokenLock {
    /// For loading the module, finding the token and logging in.
    pub(super) fn exclusive(module: &Path) -> Result<Self> {
        Self::take(module, true)
    }

    /// For any other call into the module.
    pub(super) fn shared(module: &Path) -> Result<Self> {
        Self::take(module, false)
    }

    fn take(module: &Path, exclusive: bool) -> Result<Self> {
        let path = lock_path(module);
        let io = |e| Error::Io { operation: "opening the token lock", path: path.clone(), source: e };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(io)?;
        let start = Instant::now();
        let mut pause = Duration::from_micros(200);
        loop {
            let taken = if exclusive { file.try_lock() } else { file.try_lock_shared() };
            match taken {
                Ok(()) => {
                    let critical = exclusive.then(crate::signals::Critical::enter);
                    return Ok(TokenLock { _file: file, _critical: critical });
                }
                Err(std::fs::TryLockError::WouldBlock) if start.elapsed() < MAX_WAIT => {
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(10));
                }
                Err(std::fs::TryLockError::WouldBlock) => {
                    return Err(Error::Hardware {
                        backend: "pkcs11",
                        operation: "locking the token",
                        detail: format!("another process held {} for {}s", path.display(), MAX_WAIT.as_secs()),
                    });
                }
                Err(std::fs::TryLockError::Error(e)) => return Err(io(e)),
            }
        }
    }
}
