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
/// # Safety
///
/// Changes the environment: call it only while no other thread exists (or could be
/// reading the environment), as the CLI does first thing in `main`'s thread.
#[allow(unsafe_code)]
pub unsafe fn take_from_env(vars: &[String]) {
    let mut taken = crate::sync::lock(&TAKEN);
    for var in vars {
        if let Ok(v) = std::env::var(var) {
            taken.retain(|(k, _)| k != var);
            taken.push((var.clone(), SecretString::from(v)));
            // SAFETY: the caller guarantees no other thread reads the environment.
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
