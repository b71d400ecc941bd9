//! One error type for the whole library.
//!
//! Every failure a caller can act on has its own variant, and every variant maps to one
//! of the CLI's documented exit codes ([`Error::exit_code`]). Messages name the failing
//! operation and, where there is one, what to do next ([`Error::hint`]); they never carry
//! a secret, a PIN or key material. Integrity failures are deliberately opaque: a failed
//! unwrap, a failed AEAD open and a malformed record all surface as [`Error::Integrity`],
//! so the error says nothing an attacker could use as a decryption oracle.

use std::path::PathBuf;

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Stable process exit codes of the `tokenguard` CLI (DESIGN §8). This module is the
/// one table of them: `tokenguard --help` prints [`exit::TABLE`], and a test holds the
/// README's table to it.
pub mod exit {
    /// Success.
    pub const OK: i32 = 0;
    /// Any other error (I/O, internal).
    pub const OTHER: i32 = 1;
    /// Bad command line or invalid input.
    pub const USAGE: i32 = 2;
    /// The requested token, provider or field does not exist.
    pub const NOT_FOUND: i32 = 3;
    /// Integrity failure: tampering, corruption, or a different root key.
    pub const INTEGRITY: i32 = 4;
    /// Hardware or authentication: PKCS#11 module, token, PIN, TPM.
    pub const HARDWARE: i32 = 5;
    /// The store is held by another process beyond the bounded wait.
    pub const BUSY: i32 = 6;
    /// The token has expired or was revoked.
    pub const EXPIRED: i32 = 7;
    /// Configuration error.
    pub const CONFIG: i32 = 8;
    /// The agent refused the request: no `[[agent.allow]]` rule allows it for this
    /// caller.
    pub const REFUSED: i32 = 9;
    /// The agent refused the request for now: the caller is over its rate.
    pub const RATE_LIMITED: i32 = 10;
    /// An agent is configured, but it does not answer.
    pub const AGENT_UNAVAILABLE: i32 = 11;
    /// The fleet store's database (PostgreSQL) is unreachable or failed the request.
    pub const DATABASE: i32 = 12;
    /// Interrupted at a prompt (Ctrl-C), the terminal restored: 128 + SIGINT, as a
    /// shell reports it.
    pub const INTERRUPTED: i32 = 130;
    /// Standard output was closed by its reader (`tokenguard list | head -1`): the
    /// CLI stops quietly with the status a shell gives `ls | head` (128 + SIGPIPE).
    pub const CLOSED_PIPE: i32 = 141;

    /// Every exit code with its meaning, in order.
    pub const TABLE: &[(i32, &str)] = &[
        (OK, "ok"),
        (OTHER, "other error"),
        (USAGE, "usage or invalid input"),
        (NOT_FOUND, "not found (token, field, store)"),
        (INTEGRITY, "integrity failure: tampering, corruption, wrong root key, an altered recovery share"),
        (HARDWARE, "hardware or authentication: module, token, PIN, TPM"),
        (BUSY, "store busy: held by another process beyond `busy_timeout_ms`"),
        (EXPIRED, "expired or revoked"),
        (CONFIG, "configuration"),
        (REFUSED, "refused by the agent's policy"),
        (RATE_LIMITED, "rate limited by the agent; retry later"),
        (AGENT_UNAVAILABLE, "agent unavailable: configured, but not answering (`--direct` bypasses it)"),
        (DATABASE, "the fleet store's database is unavailable or failed the request; retry once it is back"),
        (INTERRUPTED, "interrupted at a prompt (Ctrl-C); the terminal is restored"),
        (CLOSED_PIPE, "stdout closed by its reader (piped into `head`); it stops quietly, as `ls` does"),
    ];

    /// The table as help text.
    pub fn help_text() -> String {
        let codes: Vec<String> = TABLE.iter().map(|(c, m)| format!("  {c}  {}", m.replace('`', ""))).collect();
        format!("Exit codes:\n{}", codes.join("\n"))
    }

    #[cfg(test)]
    mod tests {
        /// The README's table is this table, row for row.
        #[test]
        fn readme_table_is_the_code_table() {
            let readme = include_str!("../README.md");
            let section = readme.split("### Exit codes").nth(1).expect("README has an exit-code section");
            let rows: Vec<(i32, &str)> = section
                .lines()
                .skip_while(|l| !l.starts_with('|'))
                .take_while(|l| l.starts_with('|'))
                .filter_map(|l| {
                    let mut cells = l.split('|').map(str::trim).filter(|c| !c.is_empty());
                    Some((cells.next()?.parse().ok()?, cells.next()?))
                })
                .collect();
            assert_eq!(rows, super::TABLE);
        }
    }
}

/// Every error the library returns.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No token is stored under this provider and name.
    #[error("no token {provider}/{name} in the store")]
    NotFound {
        /// Provider of the missing token.
        provider: String,
        /// Name of the missing token.
        name: String,
    },

    /// The token set has no such field, or a raw secret was asked for a field.
    #[error("token {provider}/{name} has no field {field:?}")]
    NoSuchField {
        /// Provider of the token.
        provider: String,
        /// Name of the token.
        name: String,
        /// The field asked for.
        field: String,
    },

    /// A sealed record, wrapped key, backup or the store itself failed its integrity
    /// check. Opaque on purpose: the cause (tampering, corruption, a record moved or
    /// edited, a key that does not belong to this store) is not distinguished.
    #[error(
        "integrity check failed while {context}: the data was modified, is corrupt, or was not sealed for this store"
    )]
    Integrity {
        /// What was being checked (never secret material).
        context: &'static str,
    },

    /// A recovery share failed its check: it was altered, or the shares do not rebuild
    /// the identity their split names (docs/FORMAT.md §"Recovery shares").
    #[error("recovery shares rejected: {0}")]
    BadShare(String),

    /// The store does not match its hardware rollback counter: most often a whole
    /// older copy of the store file was put back (docs/DESIGN-NOTES.md §"Whole-store
    /// rollback").
    #[error(
        "rollback check failed: {what} (counter {counter_id}: store {stored}, counter {})",
        counter.map_or_else(|| "absent".to_string(), |c| c.to_string())
    )]
    Rollback {
        /// The counter's identity.
        counter_id: String,
        /// The value the store says the counter has.
        stored: u64,
        /// The value it has (`None`: no such counter).
        counter: Option<u64>,
        /// What the difference means.
        what: &'static str,
    },

    /// The configured root key is not the one this store was created with.
    #[error("wrong root key: this store is pinned to {pinned}, but the configured root is {found}")]
    WrongRoot {
        /// Human description of the pinned root.
        pinned: String,
        /// Human description of the configured root.
        found: String,
    },

    /// A hardware backend failed (module, token, key, TPM).
    #[error("{backend}: {operation} failed: {detail}")]
    Hardware {
        /// Backend name (`pkcs11`, `tpm`, `soft`).
        backend: &'static str,
        /// The operation that failed.
        operation: &'static str,
        /// What the backend reported (never a PIN or key).
        detail: String,
    },

    /// Login to the token failed (wrong or locked PIN).
    #[error("{backend}: authentication failed: {detail}")]
    Auth {
        /// Backend name.
        backend: &'static str,
        /// What failed (never the PIN).
        detail: String,
    },

    /// The store is held by another process and did not become free in time.
    #[error("store {path} is in use by another process (waited {waited_ms} ms)")]
    StoreBusy {
        /// The store file.
        path: PathBuf,
        /// How long the open or write waited.
        waited_ms: u64,
    },

    /// The token is past its not-after time.
    #[error("token {provider}/{name} expired at {expired_at} (unix seconds)")]
    Expired {
        /// Provider of the token.
        provider: String,
        /// Name of the token.
        name: String,
        /// Not-after time, unix seconds.
        expired_at: u64,
    },

    /// The token was revoked.
    #[error("token {provider}/{name} was revoked at {revoked_at} (unix seconds): {reason}")]
    Revoked {
        /// Provider of the token.
        provider: String,
        /// Name of the token.
        name: String,
        /// When, unix seconds.
        revoked_at: u64,
        /// The reason recorded when it was revoked.
        reason: String,
    },

    /// The provider's data keys were destroyed (`shred`): the token is unrecoverable.
    #[error(
        "token {provider}/{name} is unrecoverable: data key version {version} of {provider} was destroyed (shredded)"
    )]
    Shredded {
        /// Provider of the token.
        provider: String,
        /// Name (empty when not known at the point of failure).
        name: String,
        /// The destroyed DEK version.
        version: u32,
    },

    /// The provider refused the refresh token (`invalid_grant`): a human must
    /// re-authorise and store a new token set.
    #[error("token {provider}/{name} needs re-authorisation: the provider rejected its refresh token")]
    NeedsReauth {
        /// Provider of the token.
        provider: String,
        /// Name of the token within its provider.
        name: String,
    },

    /// A refresh failed and the stored token cannot be served.
    #[error("refreshing {provider}/{name} failed: {detail}")]
    RefreshFailed {
        /// Provider of the token.
        provider: String,
        /// Name of the token within its provider.
        name: String,
        /// What failed (never a token).
        detail: String,
    },

    /// A DEK version cannot be retired while records use it.
    #[error("data keys of {provider} are still in use ({detail}): {records} records must move first")]
    InUse {
        /// Provider of the token.
        provider: String,
        /// Which versions and how many records each.
        detail: String,
        /// Total records.
        records: u64,
    },

    /// The configuration is invalid, incomplete or unreadable.
    #[error("configuration: {0}")]
    Config(String),

    /// The caller passed something invalid (name, label, secret format, duration).
    #[error("invalid input: {0}")]
    InvalidInput(String),

    /// `put --no-overwrite` of a token that exists.
    #[error("token {provider}/{name} exists (and --no-overwrite was given)")]
    Exists {
        /// Provider of the token.
        provider: String,
        /// Name of the token within its provider.
        name: String,
    },

    /// `init` on a store that already exists, or `restore` over a non-empty store.
    #[error("store {0} already exists")]
    StoreExists(PathBuf),

    /// The store file does not exist yet.
    #[error("no store at {0}")]
    NoStore(PathBuf),

    /// The store was written by a newer tokenguard, or by an older one and needs
    /// `tokenguard upgrade`.
    #[error("store schema version {found} is not supported here (this build works on version {supported})")]
    UnsupportedVersion {
        /// Version found in the store or backup.
        found: u32,
        /// Highest version this build understands.
        supported: u32,
    },

    /// The embedded database failed.
    #[error("store {operation} failed: {detail}")]
    Store {
        /// The store operation.
        operation: &'static str,
        /// redb's description.
        detail: String,
    },

    /// An operating-system I/O error, with the path involved.
    #[error("{operation} {path}: {source}")]
    Io {
        /// What was being done.
        operation: &'static str,
        /// The file involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// The user pressed Ctrl-C at a prompt.
    #[error("interrupted")]
    Interrupted,

    /// A backend was named that this build does not include.
    #[error("backend {0:?} is not compiled into this build (enable the cargo feature of the same name)")]
    BackendNotCompiled(&'static str),

    /// The agent's policy does not allow this request for this caller.
    #[error("the agent refused {op} of {target}: no [[agent.allow]] rule allows it for this caller")]
    Refused {
        /// The operation.
        op: String,
        /// What it was about (`provider/name`, or `the agent`).
        target: String,
    },

    /// The caller is over its rate.
    #[error("rate limited by the agent: retry in {retry_after_ms} ms")]
    RateLimited {
        /// When one more request would be allowed.
        retry_after_ms: u64,
    },

    /// The agent is in lockdown: its keys are dropped and it is logged out.
    #[error("the agent is in lockdown: it serves only `ping` and `unlock`")]
    Locked,

    /// An agent is configured, but it does not answer.
    #[error("the agent at {socket} is unavailable: {detail}")]
    AgentUnavailable {
        /// Its socket.
        socket: PathBuf,
        /// What failed.
        detail: String,
    },

    /// The fleet store's database (PostgreSQL) could not be reached, or failed the
    /// request. Whether a write that failed so committed is for the next catch-up
    /// to tell.
    #[error("the store's database is unavailable ({operation}): {detail}")]
    Database {
        /// What was being done.
        operation: &'static str,
        /// What the database or the connection said (never a password).
        detail: String,
    },

    /// Another host changed the fleet log under this write: it wrote the generation
    /// this write would have (a writer shown a lagging log), or rotated the store's
    /// keys before this write could run. Nothing of this write
    /// was committed anywhere; running it again is safe.
    #[error("another host changed the fleet log under this write (generation {generation}); nothing was written")]
    FleetConflict {
        /// The generation of the log when the write found out.
        generation: u64,
    },

    /// An error the agent reported, as it reported it.
    #[error("{message}")]
    Remote {
        /// Its kind on the wire (`docs/PROTOCOL.md`).
        kind: String,
        /// Its message.
        message: String,
        /// Its hint.
        hint: Option<String>,
        /// Its exit code.
        code: i32,
    },
}

impl Error {
    /// The CLI exit code of this error (DESIGN §8).
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::NotFound { .. } | Error::NoSuchField { .. } | Error::NoStore(_) => exit::NOT_FOUND,
            Error::Integrity { .. } | Error::WrongRoot { .. } | Error::Rollback { .. } | Error::BadShare(_) => {
                exit::INTEGRITY
            }
            Error::Hardware { .. } | Error::Auth { .. } => exit::HARDWARE,
            Error::StoreBusy { .. } | Error::FleetConflict { .. } => exit::BUSY,
            Error::Database { .. } => exit::DATABASE,
            Error::Expired { .. } | Error::Revoked { .. } | Error::Shredded { .. } | Error::NeedsReauth { .. } => {
                exit::EXPIRED
            }
            Error::RefreshFailed { .. } => exit::OTHER,
            Error::InUse { .. } => exit::OTHER,
            Error::Config(_) | Error::BackendNotCompiled(_) => exit::CONFIG,
            Error::Interrupted => exit::INTERRUPTED,
            Error::InvalidInput(_) | Error::Exists { .. } => exit::USAGE,
            Error::StoreExists(_) | Error::UnsupportedVersion { .. } | Error::Store { .. } | Error::Io { .. } => {
                exit::OTHER
            }
            Error::Refused { .. } => exit::REFUSED,
            Error::RateLimited { .. } => exit::RATE_LIMITED,
            Error::Locked => exit::HARDWARE,
            Error::AgentUnavailable { .. } => exit::AGENT_UNAVAILABLE,
            Error::Remote { code, .. } => *code,
        }
    }

    /// What a human should do next, where there is a useful answer.
    pub fn hint(&self) -> Option<String> {
        Some(match self {
            Error::NotFound { .. } => "`tokenguard list` shows what is stored".into(),
            Error::NoStore(_) => "run `tokenguard init` first".into(),
            Error::Integrity { .. } => {
                "do not trust this store copy: run `tokenguard doctor`, and restore from a backup if it reports damage"
                    .into()
            }
            Error::Rollback { .. } => "if this copy was put back on purpose (disaster recovery), `tokenguard upgrade \
                --accept-current-state` binds it to the counter again; otherwise restore the newest copy or backup \
                (README: Incident response)"
                .into(),
            Error::BadShare(_) => "ask each custodian to decrypt their share file again (`age -d -i THEIR-KEY \
                FILE`) and pass the output unchanged; a share altered after the split cannot be used"
                .into(),
            Error::WrongRoot { .. } => {
                "point the config at the root key this store was created with (see `tokenguard doctor`)".into()
            }
            Error::Auth { .. } => {
                "check the PIN named by pin_source in the config; repeated failures may lock the token".into()
            }
            Error::Hardware { backend: "pkcs11", operation: "finding the root key", .. } => {
                "run `tokenguard init` to create the store and its root key in the token \
                 (or check key_label / object= in the config)"
                    .into()
            }
            Error::Hardware { backend: "pkcs11", .. } => {
                "check module and token in the config, or run ./softhsm-setup.sh for a development token".into()
            }
            Error::Hardware { backend: "tpm", .. } => {
                "check the TCTI in the config and that the TPM (or swtpm) is reachable".into()
            }
            Error::StoreBusy { .. } => {
                "another process holds the store exclusively; retry, or set store.mode = \"shared\" in every process"
                    .into()
            }
            Error::Database { .. } => {
                "check that PostgreSQL is up and reachable (a running process reads from this host's copy until \
                 its staleness bound; a command that starts looks at the log first). A write that failed so did not \
                 commit here, but may have reached the fleet log (its answer lost): catching up shows it, so look \
                 before writing again"
                    .into()
            }
            Error::FleetConflict { .. } => "run it again: it will build on what the other host wrote".into(),
            Error::Expired { .. } => "refresh or replace the token; `get --allow-expired` reads it anyway".into(),
            Error::InUse { provider, .. } => {
                format!("run `tokenguard reencrypt {provider}` to move them to the active version, then retire again")
            }
            Error::Shredded { .. } => "the provider was crypto-shredded; store a new token under this name".into(),
            Error::NeedsReauth { provider, name } => {
                format!(
                    "run the provider's consent flow again and `tokenguard put {provider} {name}` the new token set"
                )
            }
            Error::RefreshFailed { .. } => {
                "the provider or the network failed; the audit trail has each attempt (`tokenguard audit list`)".into()
            }
            Error::Revoked { .. } => "store a new token with `tokenguard put` if the credential was re-issued".into(),
            Error::Config(_) => "see hsm-config/ for commented reference configurations".into(),
            Error::StoreExists(_) => "choose another store path, or use the existing store".into(),
            Error::UnsupportedVersion { found, supported } if found < supported => {
                "the store was made by an older tokenguard: run `tokenguard upgrade` once, after checking the \
                 file is the one you expect (the upgrade vouches for its rows as they are)"
                    .into()
            }
            Error::Exists { provider, name } => {
                format!("drop --no-overwrite to replace it, or `tokenguard revoke {provider}/{name}` first")
            }
            Error::BackendNotCompiled(b) => {
                format!("rebuild with `cargo build --features {b}`, or remove that root from the config")
            }
            Error::Io { source, .. } if source.kind() == std::io::ErrorKind::StorageFull => {
                "the file system is full: free space there; everything acknowledged before is intact, \
                 and writes resume once there is room"
                    .into()
            }
            Error::Remote { hint, .. } => return hint.clone(),
            Error::Refused { .. } => {
                "ask the agent's operator for a rule in [[agent.allow]] (see `tokenguard doctor` on the agent's host)"
                    .into()
            }
            Error::RateLimited { .. } => "slow down, or ask for a higher `rate` in the rule that serves you".into(),
            Error::Locked => "an administrator runs `tokenguard unlock` when the emergency is over".into(),
            Error::AgentUnavailable { .. } => {
                "start it (`tokenguard serve`, or the tokenguard service), or pass --direct to use the store \
                 without it"
                    .into()
            }
            Error::Io { source, .. } if source.kind() == std::io::ErrorKind::ReadOnlyFilesystem => {
                "the file system is read-only: tokenguard writes even to read (audit events); \
                 mount it read-write, or restore a backup elsewhere"
                    .into()
            }
            _ => return None,
        })
    }

    pub(crate) fn integrity(context: &'static str) -> Self {
        Error::Integrity { context }
    }

    pub(crate) fn io(operation: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| Error::Io { operation, path, source }
    }
}
