//! Private files (root key files, age identities, recovery shares): refused when
//! others can read them, created 0600 without ever replacing a file, and synced.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Refuses `path` (a `what`, for the message) when it is missing or readable by group
/// or others, as PIN files are: a systemd credential's ACL mask (0440 inside
/// `$CREDENTIALS_DIRECTORY`) is the one exception.
pub(crate) fn check_private(path: &Path, what: &str) -> Result<()> {
    let meta = std::fs::metadata(path).map_err(|e| Error::Config(format!("{what} {}: {e}", path.display())))?;
    let mode = meta.permissions().mode() & 0o777;
    let credentials = std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from);
    if !crate::pin::pin_mode_ok(path, mode, credentials.as_deref()) {
        return Err(Error::Config(format!(
            "{what} {} is readable by group or others (mode {mode:o}); chmod 600 it",
            path.display()
        )));
    }
    Ok(())
}

/// Refuses a new file's `path` whose directory does not exist, naming the command
/// that makes it private.
pub(crate) fn check_parent_dir(path: &Path) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        && !dir.is_dir()
    {
        return Err(Error::InvalidInput(format!(
            "directory {} does not exist; create it first (mkdir -p -m 700 {})",
            dir.display(),
            dir.display()
        )));
    }
    Ok(())
}

/// Creates `path` with `bytes`: mode 0600, never over an existing file, synced to disk.
pub(crate) fn write_new_private(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(Error::io("creating", path))?;
    f.write_all(bytes).map_err(Error::io("writing", path))?;
    f.sync_all().map_err(Error::io("syncing", path))
}
