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

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::{Error, Result};

/// Longest wait for the lock before giving up with an error.
const MAX_WAIT: Duration = Duration::from_secs(30);

/// A held lock on the token's files. An exclusive one is also a critical step:
/// a termination signal waits for it (SoftHSM2 truncates its token file mid-login).
pub(super) struct TokenLock {
    _file: File,
    _critical: Option<crate::signals::Critical>,
}

/// The lock file: for SoftHSM2, in its token directory; for any other module, one
/// per module and user, in a directory only this user can write: `$XDG_RUNTIME_DIR`, else `/run/user/UID`, else a private
/// `tokenguard-UID` directory (0700) in the temp directory — never a name in a shared
/// directory that another user could take first and hold. The name comes from the
/// module's canonical path through SHA-256, so every build and every spelling of
/// the path agree.
fn lock_path(module: &Path) -> Result<PathBuf> {
    use sha2::{Digest, Sha256};
    // SoftHSM2, whose files are the ones at stake: beside them, so every process
    // that uses that token directory — whatever its user or environment — takes the
    // same lock.
    if let Some(dir) = super::module::softhsm_token_dir().filter(|d| d.is_dir()) {
        return Ok(dir.join(".tokenguard.lock"));
    }
    let uid = std::fs::metadata("/proc/self").map(|m| m.uid()).unwrap_or(0);
    let canonical = std::fs::canonicalize(module).unwrap_or_else(|_| module.to_path_buf());
    let digest = Sha256::digest(canonical.as_os_str().as_encoded_bytes());
    let name: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
    let dir = match std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from).filter(|d| d.is_dir()) {
        Some(d) => d,
        None => {
            let run = PathBuf::from(format!("/run/user/{uid}"));
            if run.is_dir() { run } else { private_dir(&std::env::temp_dir().join(format!("tokenguard-{uid}")), uid)? }
        }
    };
    Ok(dir.join(format!("tokenguard-pkcs11-{name}.lock")))
}

/// `dir`, created 0700 if missing, and refused unless it is a real directory owned
/// by `uid` that no one else can write.
fn private_dir(dir: &Path, uid: u32) -> Result<PathBuf> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let _ = std::fs::DirBuilder::new().mode(0o700).create(dir);
    let m =
        std::fs::symlink_metadata(dir).map_err(|e| Error::Io { operation: "checking", path: dir.into(), source: e })?;
    if !m.is_dir() || m.uid() != uid || m.permissions().mode() & 0o022 != 0 {
        return Err(Error::Hardware {
            backend: "pkcs11",
            operation: "locking the token",
            detail: format!(
                "{} is not a private directory of this user; remove it or set XDG_RUNTIME_DIR",
                dir.display()
            ),
        });
    }
    Ok(dir.to_path_buf())
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
        let path = lock_path(module)?;
        match crate::sync::flock(&path, exclusive, MAX_WAIT) {
            Ok(Some(file)) => {
                let critical = exclusive.then(crate::signals::Critical::enter);
                Ok(TokenLock { _file: file, _critical: critical })
            }
            Ok(None) => Err(Error::Hardware {
                backend: "pkcs11",
                operation: "locking the token",
                detail: format!("another process held {} for {}s", path.display(), MAX_WAIT.as_secs()),
            }),
            Err(e) => Err(Error::Io { operation: "opening the token lock", path, source: e }),
        }
    }
}
