//! Command-line grammar (clap). Parsing only: no logic lives here.
//!
//! No argument ever carries a secret: secrets come from stdin or `--from-file`, PINs
//! from the config's `pin_source`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// tokenguard — third-party tokens sealed under a hardware root key.
#[derive(Debug, Parser)]
#[command(name = "tokenguard", version, about, long_about = None)]
pub struct Cli {
    /// Configuration file (TOML).
    #[arg(long, global = true, env = "TOKENGUARD_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Machine-readable JSON output.
    #[arg(long, global = true)]
    pub json: bool,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create the store and, if missing, the root key in the token.
    Init,
    /// Store a token, read from stdin (default) or --from-file; never from argv.
    Put(PutArgs),
    /// Print a token's secret (or one field of a token set).
    Get(GetArgs),
    /// List tokens' metadata (never secrets).
    List {
        /// Only this provider.
        provider: Option<String>,
    },
    /// Delete a token.
    Delete {
        /// Provider (github, slack, google, jira, …).
        provider: String,
        /// Token name.
        name: String,
    },
    /// Check that the set-up is safe and the store is intact.
    Doctor,
    /// Counts, DEK versions, hardware calls.
    Stats,
    /// Write a sealed backup (ciphertexts and wrapped keys only).
    Backup {
        /// Backup file to create (must not exist).
        file: PathBuf,
    },
    /// Restore a sealed backup into the configured (new) store path.
    Restore {
        /// Backup file.
        file: PathBuf,
    },
    /// The tamper-evident audit trail.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// A token's state: active, expired, needs-reauth, revoked or shredded.
    Status {
        /// Provider (github, slack, google, jira, …).
        provider: String,
        /// Token name.
        name: String,
    },
    /// Revoke one token, a provider's tokens (--all) or tokens by label.
    Revoke(RevokeArgs),
    /// Tokens expiring within a duration (expired ones included).
    Expiring {
        /// e.g. 24h, 7d.
        #[arg(long, value_name = "DURATION")]
        within: String,
    },
    /// Remove expired tokens and/or revoked tombstones.
    Purge {
        /// Remove expired tokens.
        #[arg(long)]
        expired: bool,
        /// Remove tombstones of revoked tokens.
        #[arg(long)]
        revoked: bool,
        /// Only those that expired / were revoked at least this long ago.
        #[arg(long, value_name = "DURATION")]
        older_than: Option<String>,
    },
    /// New DEK version for a provider's new writes (old records stay readable).
    RotateDek {
        /// Provider (github, slack, google, jira, …).
        provider: String,
    },
    /// Move records sealed under older DEK versions to the active one.
    Reencrypt {
        /// Only this provider (default: all).
        provider: Option<String>,
        /// Records per transaction.
        #[arg(long, default_value_t = 500)]
        batch_size: usize,
        /// At most this many records per second.
        #[arg(long)]
        rate: Option<f64>,
        /// Count only.
        #[arg(long)]
        dry_run: bool,
    },
    /// Retire DEK versions below VERSION (refused while any record uses them).
    Retire {
        /// Provider (github, slack, google, jira, …).
        provider: String,
        /// Retire versions strictly below this one.
        #[arg(long)]
        below: u32,
    },
    /// Destroy every DEK of a provider: its tokens become unrecoverable.
    Shred {
        /// Provider (github, slack, google, jira, …).
        provider: String,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
    /// Generate a new root key in the same token and wrap every DEK under it too.
    RotateRoot {
        /// Label of the new key (default: the current label with a numeric suffix).
        #[arg(long)]
        new_key_label: Option<String>,
    },
    /// Refresh OAuth token sets: one now, every due one (--due), or keep refreshing
    /// (--watch; stops cleanly on SIGTERM/SIGINT).
    Refresh(RefreshArgs),
    /// Roots of the store: list, add, remove (rewrap only, no token re-encrypted).
    #[command(subcommand)]
    Root(RootCommand),
    /// Development: initialise a SoftHSM2/kryoptic token (PINs from sources, never
    /// argv). Used by softhsm-setup.sh; production HSMs use their vendor's tools.
    #[command(hide = true)]
    InitToken(InitTokenArgs),
}

#[derive(Debug, Args)]
pub struct InitTokenArgs {
    /// PKCS#11 module.
    #[arg(long)]
    pub module: PathBuf,
    /// Token label.
    #[arg(long)]
    pub label: String,
    /// SO PIN source (env:VAR or file:PATH).
    #[arg(long)]
    pub so_pin_source: String,
    /// User PIN source (env:VAR or file:PATH).
    #[arg(long)]
    pub pin_source: String,
}

#[derive(Debug, Args)]
pub struct PutArgs {
    /// Provider (github, slack, google, jira, …).
    pub provider: String,
    /// Token name within the provider.
    pub name: String,
    /// Read the secret from this file instead of stdin.
    #[arg(long, value_name = "FILE")]
    pub from_file: Option<PathBuf>,
    /// Expires this long from now (e.g. 8h, 30m, 7d).
    #[arg(long, value_name = "DURATION", conflicts_with = "expires_at")]
    pub expires_in: Option<String>,
    /// Expires at this time (RFC 3339, e.g. 2026-12-01T00:00:00Z, or unix seconds).
    #[arg(long, value_name = "TIME")]
    pub expires_at: Option<String>,
    /// A label key=value (repeatable).
    #[arg(long = "label", value_name = "KEY=VALUE")]
    pub labels: Vec<String>,
    /// Keep a trailing newline of the input (stripped by default).
    #[arg(long)]
    pub keep_newline: bool,
    /// Treat the input as a raw secret even if it is JSON.
    #[arg(long)]
    pub raw: bool,
}

#[derive(Debug, Args)]
pub struct RevokeArgs {
    /// Provider (github, slack, google, jira, …).
    pub provider: Option<String>,
    /// Token name (omit with --all or --label).
    pub name: Option<String>,
    /// Every token of PROVIDER.
    #[arg(long)]
    pub all: bool,
    /// Every token with this label (KEY=VALUE).
    #[arg(long, value_name = "KEY=VALUE")]
    pub label: Option<String>,
    /// Why (recorded in the tombstone and the audit trail).
    #[arg(long)]
    pub reason: String,
}

#[derive(Debug, Args)]
pub struct RefreshArgs {
    /// Provider (with NAME: refresh that token now).
    pub provider: Option<String>,
    /// Token name.
    pub name: Option<String>,
    /// Refresh every token set that is due (for cron / systemd timers).
    #[arg(long)]
    pub due: bool,
    /// With --due/--watch: also refresh what expires within this duration.
    #[arg(long, value_name = "DURATION")]
    pub within: Option<String>,
    /// Keep refreshing due tokens until stopped.
    #[arg(long)]
    pub watch: bool,
    /// With --watch: pause between passes (default 60s).
    #[arg(long, value_name = "DURATION", default_value = "60s")]
    pub interval: String,
}

#[derive(Debug, Subcommand)]
pub enum RootCommand {
    /// The pinned roots.
    List,
    /// Add the root described by the [[roots]] entry of FILE (a TOML file).
    Add {
        /// TOML file with one [[roots]] entry.
        #[arg(long, value_name = "FILE")]
        root_config: PathBuf,
    },
    /// Remove a root by id (refused for the last one).
    Remove {
        /// Root id, from `root list`.
        id: u16,
    },
}

#[derive(Debug, Args)]
pub struct GetArgs {
    /// Provider (github, slack, google, jira, …).
    pub provider: String,
    /// Token name.
    pub name: String,
    /// Field of a token set (default: access_token; a raw secret has no fields).
    #[arg(long)]
    pub field: Option<String>,
    /// Return the token even if it has expired.
    #[arg(long)]
    pub allow_expired: bool,
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// List events.
    List {
        /// Only events from this time on (RFC 3339, unix seconds, or a duration ago: 24h).
        #[arg(long)]
        since: Option<String>,
        /// Only events about this provider.
        #[arg(long)]
        provider: Option<String>,
    },
    /// Verify the MAC chain (exit 4 on a break, naming the first bad event).
    Verify,
    /// Every event as JSON lines, for a SIEM.
    Export,
}
