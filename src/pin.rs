//! PIN sources. A PIN is never written in the config or on the command line:
//! `pin_source` says where to read it — `env:VAR`, `file:PATH` (refused when group- or
//! world-readable, but for a systemd credential's ACL mask) or `prompt` (a terminal
//! only). The PIN comes back as a
//! [`SecretString`]; no error message ever carries it.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use secrecy::SecretString;
use zeroize::Zeroizing;

use crate::config::resolve_path;
use crate::error::{Error, Result};

/// PINs taken out of the environment by [`take_from_env`], by variable name.
static TAKEN: std::sync::Mutex<Vec<(String, SecretString)>> = std::sync::Mutex::new(Vec::new());

/// Moves the PINs of `vars` from the environment into this process's memory, so no
/// child process (`tokenguard exec`'s, a module's helper) inherits them and nothing
/// later reads them from `environ` (security issue, finding 18). `resolve_pin` finds
/// them there.
///
/// The value's bytes in the environment block are overwritten with zeros before the
/// variable is removed: removing it alone leaves them in memory (and in
/// `/proc/PID/environ`, which shows the original block).
///
/// # Safety
///
/// Changes the environment: call it only while no other thread reads or changes
/// the environment, as the CLI does in `main`'s thread before any module is loaded
/// (its one other thread, the signal thread, never touches the environment).
#[allow(unsafe_code)]
pub unsafe fn take_from_env(vars: &[String]) {
    let mut taken = crate::sync::lock(&TAKEN);
    for var in vars {
        if let Ok(v) = std::env::var(var) {
            taken.retain(|(k, _)| k != var);
            taken.push((var.clone(), SecretString::from(v)));
            if let Ok(name) = std::ffi::CString::new(var.as_str()) {
                // SAFETY: getenv returns a pointer into the environment block (or
                // null); its `strlen` bytes are the value, ours to overwrite, and no
                // other thread reads them (the caller's guarantee).
                unsafe {
                    let p = libc::getenv(name.as_ptr());
                    if !p.is_null() {
                        std::ptr::write_bytes(p, 0, libc::strlen(p));
                    }
                }
            }
            // SAFETY: as above.
            unsafe { std::env::remove_var(var) };
        }
    }
}

/// Whether a PIN file's `mode` is private enough: no group or other bits — except
/// that a systemd credential (a file inside `$CREDENTIALS_DIRECTORY`, which systemd
/// makes readable by the service alone) may show group read: systemd 254 and later
/// grant the service user access through an ACL, and the ACL mask shows as the group
/// bits (`0440`). Write and other bits are refused there too.
pub(crate) fn pin_mode_ok(path: &Path, mode: u32, credentials: Option<&Path>) -> bool {
    if mode & 0o077 == 0 {
        return true;
    }
    let inside = credentials.is_some_and(|dir| match (std::fs::canonicalize(dir), std::fs::canonicalize(path)) {
        (Ok(dir), Ok(file)) => file.parent() == Some(dir.as_path()),
        _ => false,
    });
    inside && mode & 0o037 == 0
}

/// Reads a PIN from its source. Never logs or returns it in an error.
pub fn resolve_pin(source: &str, base: &Path) -> Result<SecretString> {
    if let Some(var) = source.strip_prefix("env:") {
        use secrecy::ExposeSecret;
        if let Some((_, pin)) = crate::sync::lock(&TAKEN).iter().find(|(k, _)| k == var) {
            return Ok(SecretString::from(pin.expose_secret().to_owned()));
        }
        let v = std::env::var(var)
            .map_err(|_| Error::Config(format!("pin_source {source:?}: environment variable {var} is not set")))?;
        return Ok(SecretString::from(v));
    }
    if let Some(p) = source.strip_prefix("file:") {
        let path = resolve_path(base, Path::new(p));
        let meta = std::fs::metadata(&path).map_err(|e| Error::Config(format!("pin file {}: {e}", path.display())))?;
        let mode = meta.permissions().mode() & 0o777;
        let credentials = std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from);
        if !pin_mode_ok(&path, mode, credentials.as_deref()) {
            return Err(Error::Config(format!(
                "pin file {} is readable by group or others (mode {mode:o}); chmod 600 it",
                path.display()
            )));
        }
        let raw = Zeroizing::new(
            std::fs::read(&path).map_err(|e| Error::Config(format!("pin file {}: {e}", path.display())))?,
        );
        let text = std::str::from_utf8(&raw)
            .map_err(|_| Error::Config(format!("pin file {} is not UTF-8", path.display())))?;
        return Ok(SecretString::from(text.trim_end_matches(['\n', '\r']).to_string()));
    }
    if source == "prompt" {
        use std::io::IsTerminal;
        if !std::io::stdin().is_terminal() {
            return Err(Error::Config(
                "pin_source = \"prompt\" needs a terminal; use env: or file: for services".into(),
            ));
        }
        let pin = crate::tty::read_hidden("Token PIN: ")?;
        return Ok(SecretString::from(pin.as_str()));
    }
    // The value is not shown: a PIN or key pasted where its source belongs would be.
    Err(Error::Config(
        "a PIN, passphrase or key source must be env:VAR, file:PATH or prompt (the value given is not shown)".into(),
    ))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn group_read_is_allowed_only_for_a_systemd_credential() {
        let dir = std::env::temp_dir().join(format!("tg-pin-{}", std::process::id()));
        let creds = dir.join("credentials");
        std::fs::create_dir_all(&creds).unwrap();
        let inside = creds.join("hsm-pin");
        let outside = dir.join("hsm.pin");
        std::fs::write(&inside, "1234").unwrap();
        std::fs::write(&outside, "1234").unwrap();
        // 0600 passes anywhere.
        assert!(pin_mode_ok(&outside, 0o600, None));
        assert!(pin_mode_ok(&inside, 0o400, Some(&creds)));
        // 0440 (systemd's ACL mask) passes inside the credentials directory only.
        assert!(pin_mode_ok(&inside, 0o440, Some(&creds)));
        assert!(!pin_mode_ok(&outside, 0o440, Some(&creds)));
        assert!(!pin_mode_ok(&inside, 0o440, None));
        // Not through a name that only starts like the directory, nor a subdirectory.
        let lookalike = dir.join("credentials-evil");
        std::fs::create_dir_all(lookalike.join("x")).unwrap();
        std::fs::write(lookalike.join("hsm-pin"), "1").unwrap();
        assert!(!pin_mode_ok(&lookalike.join("hsm-pin"), 0o440, Some(&creds)));
        // Group write, or anything for others, is refused there too.
        assert!(!pin_mode_ok(&inside, 0o460, Some(&creds)));
        assert!(!pin_mode_ok(&inside, 0o444, Some(&creds)));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
