//! `tokenguard exec`: a child process with tokens in its environment or in private
//! files, like `sops exec-env` / `exec-file` and systemd's `LoadCredential=`.
//!
//! - A secret is put only into the child's environment (never this process's, so
//!   `/proc/PID/environ` of the parent never holds it) and never into anyone's argv.
//! - `--file` writes each secret to a 0600 file in a 0700 directory on a tmpfs
//!   (`$XDG_RUNTIME_DIR`, else `/dev/shm`; with neither, `--file` is refused rather
//!   than putting a secret on a disk), passes its path, and removes the directory
//!   when the child exits — also when this process gets SIGTERM or SIGHUP, which it
//!   passes on to the child first. SIGINT from a terminal reaches the child directly
//!   (same process group), so it is not passed on twice.
//! - The child's exit code is passed through (128 + N when a signal ended it).
//! - A SIGKILL of this process cannot be caught: the directory then stays until the
//!   tmpfs is cleared (logout, reboot). Named files cannot avoid that.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use tokenguard::{Error, GetOptions, Result, TokenGuard};

use crate::input::TokenSpec;

/// A private directory removed on drop, files and all.
struct PrivateDir(PathBuf);

impl PrivateDir {
    fn create() -> Result<Self> {
        let base = std::env::var_os("XDG_RUNTIME_DIR")
            .map(PathBuf::from)
            .filter(|p| p.is_dir())
            .or_else(|| Some(PathBuf::from("/dev/shm")).filter(|p| p.is_dir()))
            .ok_or_else(|| {
                Error::InvalidInput(
                    "--file needs a tmpfs ($XDG_RUNTIME_DIR or /dev/shm) so no secret lands on a disk; use --env"
                        .into(),
                )
            })?;
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
        let dir = base.join(format!("tokenguard-exec-{}-{nanos:08x}", std::process::id()));
        fs::DirBuilder::new().mode(0o700).create(&dir).map_err(|e| Error::Io {
            operation: "creating a private directory",
            path: dir.clone(),
            source: e,
        })?;
        Ok(PrivateDir(dir))
    }

    fn write(&self, var: &str, value: &[u8]) -> Result<PathBuf> {
        let path = self.0.join(var);
        let io = |e| Error::Io { operation: "writing a secret file", path: path.clone(), source: e };
        let mut f = fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path).map_err(io)?;
        f.write_all(value).map_err(io)?;
        Ok(path)
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        // Overwrite our files before unlinking them; never follow a link the child
        // may have put there (it would point the zeros at another file).
        if let Ok(entries) = fs::read_dir(&self.0) {
            for e in entries.flatten() {
                let is_file = fs::symlink_metadata(e.path()).is_ok_and(|m| m.file_type().is_file());
                if let (true, Ok(mut f)) =
                    (is_file, fs::OpenOptions::new().write(true).custom_flags(libc::O_NOFOLLOW).open(e.path()))
                    && let Ok(m) = f.metadata()
                {
                    let _ = f.write_all(&vec![0u8; usize::try_from(m.len()).unwrap_or(0)]);
                }
            }
        }
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn read(g: &TokenGuard, spec: &TokenSpec) -> Result<tokenguard::SecretBytes> {
    let (value, _) = crate::commands::read_audited(
        g,
        "exec",
        &spec.provider,
        &spec.name,
        spec.field.as_deref(),
        GetOptions::default(),
    )?;
    Ok(value)
}

/// Runs `command` with the tokens of `env` (`VAR=TOKEN`) and `files` (`VAR=TOKEN`);
/// returns the child's exit code.
pub fn run(g: TokenGuard, env: &[String], files: &[String], command: &[String]) -> Result<i32> {
    let (program, args) = command.split_first().ok_or_else(|| Error::InvalidInput("exec needs a command".into()))?;
    let mut child = Command::new(program);
    child.args(args);
    for e in env {
        let (var, spec) = TokenSpec::assignment(e)?;
        let value = read(&g, &spec)?;
        let text = value.expose_str().ok_or_else(|| {
            Error::InvalidInput(format!("{var}: the secret is not UTF-8; use --file for binary secrets"))
        })?;
        child.env(var, text);
    }
    // From the moment secret files exist, SIGTERM and SIGHUP are kept for the child
    // (and passed on once it runs), so the files are always removed by this process.
    tokenguard::signals::child_starting();
    let prepared = (|| -> Result<Option<PrivateDir>> {
        let dir = if files.is_empty() { None } else { Some(PrivateDir::create()?) };
        if let Some(dir) = &dir {
            for f in files {
                let (var, spec) = TokenSpec::assignment(f)?;
                let path = dir.write(var, read(&g, &spec)?.expose())?;
                child.env(var, path);
            }
        }
        Ok(dir)
    })();
    let dir = match prepared {
        Ok(d) => d,
        Err(e) => {
            // (The files are gone with the closure.) A signal kept meanwhile ends
            // this process now.
            tokenguard::signals::forward_to_child(0);
            return Err(e);
        }
    };
    // The child may run for hours, and may call tokenguard itself: the store, the
    // token session and the cached keys are let go before it starts.
    drop(g);
    // SIGTERM and SIGHUP go to the child (kept until its pid is known), and this
    // process stays to remove the files after it.
    let mut running = match child.spawn() {
        Ok(r) => r,
        Err(e) => {
            // The files go first: a signal kept meanwhile ends this process now.
            drop(dir);
            tokenguard::signals::forward_to_child(0);
            return Err(Error::Io { operation: "starting", path: Path::new(program).into(), source: e });
        }
    };
    tokenguard::signals::forward_to_child(running.id());
    let status = running.wait().map_err(|e| Error::Io { operation: "waiting for", path: program.into(), source: e });
    drop(dir);
    // The pid is free again: nothing more is passed on to it.
    tokenguard::signals::forward_to_child(0);
    let status = status?;
    Ok(status.code().or_else(|| status.signal().map(|s| 128 + s)).unwrap_or(1))
}
