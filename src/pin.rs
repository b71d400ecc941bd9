//! PIN sources. A PIN is never written in the config or on the command line:
//! `pin_source` says where to read it — `env:VAR`, `file:PATH` (refused when group- or
//! world-readable) or `prompt` (a terminal only). The PIN comes back as a
//! [`SecretString`]; no error message ever carries it.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

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
        if mode & 0o077 != 0 {
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
    Err(Error::Config(format!("pin_source must be env:VAR, file:PATH or prompt (got {source:?})")))
}
