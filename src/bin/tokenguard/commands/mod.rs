//! One function per command, grouped by family: load the config, call the library,
//! print the result. Business logic lives in the library; exit codes come from typed
//! values (`Error::exit_code`, `Outcome::exit_code`, `report_exit_code`).

/// Prints a line on stdout; a closed stdout is an error the caller returns (and
/// `main` turns into a quiet exit), never a panic.
macro_rules! say {
    ($($t:tt)*) => { $crate::commands::say(format_args!($($t)*)) };
}

/// Prints a line on stderr, best effort (a closed stderr is not worth failing for).
macro_rules! note {
    ($($t:tt)*) => { $crate::commands::note(format_args!($($t)*), true) };
}

/// As `note!`, without the newline (a prompt).
macro_rules! note_inline {
    ($($t:tt)*) => { $crate::commands::note(format_args!($($t)*), false) };
}

mod admin;
mod lifecycle;
mod recovery;
mod refresh;
mod roots;
mod tokens;

use std::fmt::Display;
use std::io::Write;
use std::path::{Path, PathBuf};

use tokenguard::config::Config;
use tokenguard::{Error, GuardOptions, Result, TokenGuard};

use crate::cli::{Cli, Command};

/// What every command has: the loaded config and the output mode.
pub struct Ctx {
    pub config: Config,
    /// The file `config` came from (the agent reads its rules again from it).
    pub config_path: PathBuf,
    pub json: bool,
    /// `--direct`: never through the agent.
    pub direct: bool,
    /// Set when a command ran on a store whose authenticated state does not verify:
    /// it finishes its report, and the exit code still says integrity (4).
    pub degraded: std::cell::Cell<bool>,
}

impl Ctx {
    /// Opens the configured guard, with this process as the audit actor.
    pub fn open(&self) -> Result<TokenGuard> {
        self.config.open_guard_with(self.guard_options())
    }

    /// Opens the guard for inspection and incident response (doctor, list, status,
    /// audit, revoke, shred, upgrade, salvage): a store whose rows do not match its
    /// authenticated state still opens, with a warning; secrets are never opened then.
    pub fn open_for_inspection(&self, warn: bool) -> Result<TokenGuard> {
        let g = self.config.open_guard_with(GuardOptions {
            state_check: tokenguard::store::StateCheck::Report,
            ..self.guard_options()
        })?;
        let s = g.state();
        self.degraded.set(!s.verified);
        if warn && let Some(p) = &s.problem {
            note!(
                "warning: {p}. Secrets are not opened; reports and revocations go ahead. See `tokenguard doctor` \
                 and the README's \"Security notes\"."
            );
        }
        Ok(g)
    }

    /// A connection to the agent, when one is configured for the CLI and --direct
    /// was not given. Configured but not answering is an error (exit 11), never a
    /// silent fall-back to the store: the two paths differ in who holds the PIN and
    /// who audits.
    pub fn agent(&self) -> Result<Option<tokenguard::agent::Client>> {
        if self.direct {
            return Ok(None);
        }
        // A refresh may call the provider and back off: a minute at least.
        let wait = |ms: u64| std::time::Duration::from_millis(ms.max(60_000));
        // TOKENGUARD_SOCKET names an agent whatever the configuration says.
        if let Some(s) = std::env::var_os("TOKENGUARD_SOCKET").filter(|s| !s.is_empty()) {
            let ms = self.config.agent.as_ref().map_or(0, |a| a.request_timeout_ms);
            return tokenguard::agent::Client::connect(std::path::Path::new(&s), wait(ms)).map(Some);
        }
        match &self.config.agent {
            Some(a) if a.cli => tokenguard::agent::Client::connect(&a.socket, wait(a.request_timeout_ms)).map(Some),
            _ => Ok(None),
        }
    }

    /// The agent, for a command that only it serves.
    pub fn agent_required(&self, what: &str) -> Result<tokenguard::agent::Client> {
        self.agent()?.ok_or_else(|| {
            Error::Config(format!("{what} talks to the agent: configure [agent] (and do not pass --direct)"))
        })
    }

    /// Guard options of the config, with this process as the audit actor.
    pub fn guard_options(&self) -> GuardOptions {
        // A store opened with an identity rebuilt from custodians' shares says so in
        // every audit event of the command.
        let via = if self.config.recovered_identities.is_empty() { "" } else { " via=recovery-shares" };
        GuardOptions { actor: format!("{}{via}", actor()), ..self.config.guard_options() }
    }

    /// Prints `v` in JSON mode, `text` otherwise.
    pub fn out(&self, v: serde_json::Value, text: impl Display) -> Result<()> {
        if self.json {
            print_json(&v)
        } else {
            let mut out = std::io::stdout().lock();
            writeln!(out, "{text}").map_err(stdout_error)
        }
    }
}

/// Where the config is when neither --config nor TOKENGUARD_CONFIG says:
/// `$XDG_CONFIG_HOME/tokenguard/tokenguard.toml` (`~/.config/…`), then
/// `/etc/tokenguard/tokenguard.toml`.
fn default_config() -> Option<PathBuf> {
    let user = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")));
    user.map(|d| d.join("tokenguard/tokenguard.toml"))
        .into_iter()
        .chain([PathBuf::from("/etc/tokenguard/tokenguard.toml")])
        .find(|p| p.is_file())
}

fn load_config(path: Option<&PathBuf>) -> Result<(Config, PathBuf)> {
    let found = path.cloned().or_else(default_config);
    if found.is_none() && std::env::var_os("TOKENGUARD_SOCKET").is_some_and(|s| !s.is_empty()) {
        // A client of the agent needs no configuration of its own: no store, no root,
        // no PIN (every command that would need them fails with a clear error).
        let config = Config::parse("[store]\npath = \"/nonexistent/tokenguard/agent-client\"\n", Path::new("/"))?;
        return Ok((config, PathBuf::new()));
    }
    let path = found.ok_or_else(|| {
        Error::Config(
            "no configuration: pass --config FILE, set TOKENGUARD_CONFIG, or create \
             ~/.config/tokenguard/tokenguard.toml or /etc/tokenguard/tokenguard.toml \
             (./softhsm-setup.sh writes one for a development token)"
                .into(),
        )
    })?;
    let config = Config::load(&path)?;
    apply_module_env(&config);
    // SAFETY: as for `apply_module_env`: main's thread, before any thread that
    // reads the environment exists.
    #[allow(unsafe_code)]
    unsafe {
        tokenguard::pin::take_from_env(&config.pin_env_vars())
    };
    Ok((config, path))
}

/// Sets the environment the PKCS#11 module needs (e.g. SOFTHSM2_CONF) before the
/// module is loaded.
#[allow(unsafe_code)]
fn apply_module_env(config: &Config) {
    for (k, v) in config.module_env() {
        // SAFETY: called from main's thread before any thread that reads the
        // environment exists: the only other one is the signal thread, which never
        // does; no module is loaded yet and logging writes synchronously.
        unsafe { std::env::set_var(k, v) };
    }
}

/// The audit actor of this CLI process: OS user (uid from /proc, name from the
/// environment when set) and pid.
fn actor() -> String {
    use std::os::unix::fs::MetadataExt;
    let uid = std::fs::metadata("/proc/self").map(|m| m.uid().to_string()).unwrap_or_else(|_| "?".into());
    // The name comes from the environment: keep only what cannot forge an audit line.
    let user: String = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_default()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || "._@-".contains(*c))
        .take(64)
        .collect();
    format!("cli uid={uid}{}{} pid={}", if user.is_empty() { "" } else { " user=" }, user, std::process::id())
}

/// Reads one field of a token and audits the read as `op`, with its outcome. Reads
/// through the CLI are audited (one commit per process is cheap next to the process
/// start); a failure to audit does not hide the read's own error.
pub fn read_audited(
    g: &TokenGuard,
    op: &str,
    provider: &str,
    name: &str,
    field: Option<&str>,
    opts: tokenguard::GetOptions,
) -> Result<(tokenguard::SecretBytes, tokenguard::Metadata)> {
    let res = g.get_field(provider, name, field, opts);
    let outcome = tokenguard::audit::read_outcome(&res);
    let audited = g.audit_event(op, provider, name, outcome);
    let out = res?;
    match audited {
        // A full disk stops writes, not reads of what was acknowledged: the read is
        // served, and the missing audit event is said out loud.
        Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::StorageFull => {
            note!("warning: this read is not in the audit trail: the store's file system is full");
        }
        other => other?,
    }
    Ok(out)
}

/// Text from the store (names, reasons, actors, details) made safe for a terminal:
/// control characters are shown escaped, so a stored value cannot forge output
/// lines or send escape sequences.
pub fn printable(s: &str) -> std::borrow::Cow<'_, str> {
    if s.chars().any(char::is_control) { tokenguard::agent::protocol::escape_controls(s).into() } else { s.into() }
}

pub fn say(args: std::fmt::Arguments<'_>) -> Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_fmt(args).and_then(|()| out.write_all(b"\n")).map_err(stdout_error)
}

pub fn note(args: std::fmt::Arguments<'_>, newline: bool) {
    let mut err = std::io::stderr().lock();
    let _ = err.write_fmt(args);
    if newline {
        let _ = err.write_all(b"\n");
    }
}

pub fn stdout_error(e: std::io::Error) -> Error {
    Error::Io { operation: "writing", path: "stdout".into(), source: e }
}

pub fn print_json(v: &serde_json::Value) -> Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{v}").map_err(stdout_error)
}

/// `t` as RFC 3339, or "never".
pub fn fmt_time(t: Option<u64>) -> String {
    t.map_or_else(|| "never".into(), tokenguard::clock::rfc3339)
}

/// Runs the command; returns the exit code on success paths that are not 0.
pub fn run(cli: Cli) -> Result<i32> {
    run_with(cli, Vec::new())
}

/// Runs the command, with `recovered` age identities (rebuilt from shares by
/// `recovery combine … -- COMMAND`) offered to the configured age roots.
fn run_with(cli: Cli, recovered: Vec<std::sync::Arc<tokenguard::root::age::AgeIdentity>>) -> Result<i32> {
    // Commands that need no config.
    if let Command::Recovery(c) = cli.command {
        return recovery::run(c, recovery::Outer { config: cli.config, json: cli.json });
    }
    match &cli.command {
        Command::InitToken(a) => return roots::init_token(a),
        Command::Completions { shell } => {
            // Generated into memory first: the generator panics on a closed stdout.
            let mut buf = Vec::new();
            clap_complete::generate(*shell, &mut <Cli as clap::CommandFactory>::command(), "tokenguard", &mut buf);
            std::io::stdout().lock().write_all(&buf).map_err(stdout_error)?;
            return Ok(tokenguard::error::exit::OK);
        }
        Command::Man => {
            let cmd = <Cli as clap::CommandFactory>::command().after_help(tokenguard::error::exit::help_text());
            let mut buf = Vec::new();
            clap_mangen::Man::new(cmd).render(&mut buf).map_err(stdout_error)?;
            std::io::stdout().lock().write_all(&buf).map_err(stdout_error)?;
            return Ok(tokenguard::error::exit::OK);
        }
        _ => {}
    }
    let (mut config, config_path) = load_config(cli.config.as_ref())?;
    config.recovered_identities = recovered;
    // A one-shot command looks at the fleet log when it starts and ends within the
    // staleness bound: a listening connection would only cost the database a
    // backend. `refresh --watch` lives on, and keeps one.
    config.fleet_listener = matches!(&cli.command, Command::Refresh(a) if a.watch);
    let ctx = Ctx { config, config_path, json: cli.json, direct: cli.direct, degraded: Default::default() };
    let code = match cli.command {
        Command::InitToken(_) | Command::Completions { .. } | Command::Man | Command::Recovery(_) => {
            Ok(tokenguard::error::exit::OK)
        }
        Command::Serve => admin::serve(&ctx),
        Command::Lockdown => admin::lockdown(&ctx, true),
        Command::Unlock => admin::lockdown(&ctx, false),
        Command::Init => roots::init(&ctx),
        Command::Root(c) => roots::root(&ctx, c),
        Command::RotateRoot { new_key_label } => roots::rotate_root(&ctx, new_key_label),
        Command::Put(a) => tokens::put(&ctx, a),
        Command::Get(a) => tokens::get(&ctx, a),
        Command::List { provider } => tokens::list(&ctx, provider.as_deref()),
        Command::Delete { token, dry_run } => tokens::delete(&ctx, &token, dry_run),
        Command::Status { token } => tokens::status(&ctx, &token),
        Command::Exec(a) => crate::exec::run(ctx.open()?, &a.env, &a.file, &a.command),
        Command::GitCredential(a) => tokens::git_credential(&ctx, &a),
        Command::Revoke(a) => lifecycle::revoke(&ctx, a),
        Command::Expiring { within } => lifecycle::expiring(&ctx, &within),
        Command::Purge { expired, revoked, older_than, dry_run } => {
            lifecycle::purge(&ctx, expired, revoked, older_than, dry_run)
        }
        Command::RotateDek { provider } => lifecycle::rotate_dek(&ctx, &provider),
        Command::Reencrypt { provider, batch_size, rate, dry_run } => {
            lifecycle::reencrypt(&ctx, provider.as_deref(), batch_size, rate, dry_run)
        }
        Command::Retire { provider, below } => lifecycle::retire(&ctx, &provider, below),
        Command::Shred { provider, yes } => lifecycle::shred(&ctx, &provider, yes),
        Command::Refresh(a) => refresh::refresh(&ctx, a),
        Command::Doctor => admin::doctor(&ctx),
        Command::Stats => admin::stats(&ctx),
        Command::Backup { file } => admin::backup(&ctx, &file),
        Command::Restore { file } => admin::restore(&ctx, &file),
        Command::Migrate { to, unjoined_copy } => admin::migrate(&ctx, &to, unjoined_copy),
        Command::Salvage { to, accept_current_state } => admin::salvage(&ctx, &to, accept_current_state),
        Command::Audit(c) => admin::audit(&ctx, c),
        Command::Upgrade { accept_current_state } => admin::upgrade(&ctx, accept_current_state),
    };
    // On a store whose state does not verify, whatever the command found may be what
    // an attacker left there: the exit code says integrity, whatever happened.
    match code {
        Ok(_) if ctx.degraded.get() => Ok(tokenguard::error::exit::INTEGRITY),
        Err(e) if ctx.degraded.get() && !matches!(e, Error::Integrity { .. }) => {
            note!("error: {e}");
            Ok(tokenguard::error::exit::INTEGRITY)
        }
        other => other,
    }
}
