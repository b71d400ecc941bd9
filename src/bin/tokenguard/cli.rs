//! Command-line grammar (clap). Parsing only: no logic lives here.
//!
//! No argument ever carries a secret: secrets come from stdin or `--from-file`, PINs
//! from the config's `pin_source`.

use std::path::PathBuf;

use clap::{ArgAction, Args, Parser, Subcommand, ValueEnum};

/// tokenguard — third-party tokens sealed under a hardware root key.
#[derive(Debug, Parser)]
#[command(name = "tokenguard", version, about, long_about = None)]
pub struct Cli {
    /// Configuration file (TOML). Default: $XDG_CONFIG_HOME/tokenguard/tokenguard.toml,
    /// then /etc/tokenguard/tokenguard.toml.
    #[arg(short = 'c', long, global = true, env = "TOKENGUARD_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Machine-readable JSON output.
    #[arg(short = 'j', long, global = true)]
    pub json: bool,

    /// More log output on stderr (-v: info, -vv: debug, -vvv: trace). RUST_LOG wins.
    #[arg(short = 'v', long, global = true, action = ArgAction::Count, conflicts_with = "quiet")]
    pub verbose: u8,

    /// Only errors on stderr.
    #[arg(short = 'q', long, global = true)]
    pub quiet: bool,

    /// Open the store directly even when an agent is configured (it needs the PIN
    /// and the store file; a running agent holds the store, so stop it first).
    #[arg(long, global = true)]
    pub direct: bool,

    #[command(subcommand)]
    pub command: Command,
}

/// A token: `PROVIDER NAME`, or `PROVIDER/NAME` as `list` prints it.
#[derive(Debug, Args)]
pub struct TokenRef {
    /// Provider (github, slack, google, jira, …), or PROVIDER/NAME.
    pub provider: String,
    /// Token name within the provider (omit with PROVIDER/NAME).
    pub name: Option<String>,
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
        #[command(flatten)]
        token: TokenRef,
        /// Say what would be deleted; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Check that the set-up is safe and the store is intact.
    Doctor,
    /// Counts, DEK versions, hardware calls.
    Stats,
    /// Write a sealed backup (ciphertexts and wrapped keys only); `-` writes it to
    /// stdout.
    Backup {
        /// Backup file to create (must not exist), or `-` for stdout.
        file: PathBuf,
    },
    /// Copy every record that still verifies (with its keys) into a new store, when
    /// doctor finds damaged records; names what it could not save.
    Salvage {
        /// The new store file (must not exist).
        #[arg(long, value_name = "FILE")]
        to: PathBuf,
        /// Salvage a store whose rows do not match its authenticated state (which a
        /// damaged record also causes). Only after an investigation: the rows are
        /// copied as they are, including any an attacker put back.
        #[arg(long)]
        accept_current_state: bool,
    },
    /// Restore a sealed backup into the configured (new) store path.
    Restore {
        /// Backup file.
        file: PathBuf,
    },
    /// Copy the store into another configuration's new store — redb, or a fleet's
    /// PostgreSQL log — and open every record there before saying yes.
    Migrate {
        /// The destination's configuration (its [store] and [[roots]]); its store
        /// must not exist yet.
        #[arg(long, value_name = "OTHER.toml")]
        to: PathBuf,
        /// The source is a fleet host's copy, opened with a redb configuration
        /// without its log: the way out when the fleet's log is lost (the copy may
        /// lack the fleet's newest writes and revocations).
        #[arg(long)]
        unjoined_copy: bool,
    },
    /// The tamper-evident audit trail.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Add the authenticated state head to a store made by tokenguard 0.1 (once, after
    /// checking the store is yours); or accept rows that doctor says do not match it.
    Upgrade {
        /// Accept rows that do not match the state head, as they are now. Only after
        /// an investigation: it makes whatever an attacker changed part of the
        /// verified state (restoring a backup is the other way).
        #[arg(long)]
        accept_current_state: bool,
    },
    /// A token's state: active, expired, needs-reauth, revoked or shredded.
    Status {
        #[command(flatten)]
        token: TokenRef,
    },
    /// Revoke one token, a provider's tokens (--all) or tokens by label.
    Revoke(RevokeArgs),
    /// Tokens expiring within a duration (expired ones included).
    Expiring {
        /// e.g. 24h, 7d.
        #[arg(short = 'w', long, value_name = "DURATION")]
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
        /// Count what would be removed; change nothing.
        #[arg(long)]
        dry_run: bool,
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
        /// Records per transaction (at least 1).
        #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..))]
        batch_size: u32,
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
    /// Escrow custodians: split a fresh age identity among them (any K of N rebuild
    /// it), or rebuild it from their decrypted shares for one command.
    #[command(subcommand)]
    Recovery(RecoveryCommand),
    /// Run a command with tokens in its environment or in private files, like
    /// `sops exec-env`: `exec --env GH_TOKEN=github/ci-bot -- gh pr list`.
    Exec(ExecArgs),
    /// Git credential helper: `git config credential.helper 'tokenguard git-credential'`
    /// (the token is looked up as provider `git`, name HOST, unless --token says).
    GitCredential(GitCredentialArgs),
    /// Run the agent in the foreground: own the store and serve clients on the
    /// [agent] socket under its [[agent.allow]] rules (SIGTERM stops, SIGHUP reloads
    /// the rules).
    Serve,
    /// Make the agent drop every key from memory and close its hardware session; it
    /// then serves only `unlock` (admin).
    Lockdown,
    /// Make a locked-down agent log in again with its configured PIN source (admin).
    Unlock,
    /// Shell completions for bash, zsh or fish, on stdout.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// The man page (roff), on stdout.
    #[command(hide = true)]
    Man,
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
    #[command(flatten)]
    pub token: TokenRef,
    /// Read the secret from this file (its bytes exactly) instead of stdin.
    #[arg(short = 'f', long, value_name = "FILE")]
    pub from_file: Option<PathBuf>,
    /// Expires this long from now (e.g. 8h, 30m, 7d).
    #[arg(long, value_name = "DURATION", conflicts_with = "expires_at")]
    pub expires_in: Option<String>,
    /// Expires at this time (RFC 3339, e.g. 2026-12-01T00:00:00Z, or unix seconds).
    #[arg(long, value_name = "TIME")]
    pub expires_at: Option<String>,
    /// A label key=value (repeatable).
    #[arg(short = 'l', long = "label", value_name = "KEY=VALUE")]
    pub labels: Vec<String>,
    /// Keep a trailing newline of text on stdin (stripped by default; a file's bytes
    /// are always kept exactly).
    #[arg(long)]
    pub keep_newline: bool,
    /// Treat the input as a raw secret even if it is JSON.
    #[arg(long)]
    pub raw: bool,
    /// Refuse to replace an existing token.
    #[arg(long)]
    pub no_overwrite: bool,
}

#[derive(Debug, Args)]
pub struct GetArgs {
    #[command(flatten)]
    pub token: TokenRef,
    /// Field of a token set (default: access_token; a raw secret has no fields).
    #[arg(short = 'F', long)]
    pub field: Option<String>,
    /// Return the token even if it has expired.
    #[arg(long)]
    pub allow_expired: bool,
    /// Write the secret to this new file (mode 0600; never overwrites) instead of
    /// stdout.
    #[arg(short = 'o', long, value_name = "FILE")]
    pub output: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct RevokeArgs {
    /// Provider, or PROVIDER/NAME.
    pub provider: Option<String>,
    /// Token name (omit with --all, --label or PROVIDER/NAME).
    pub name: Option<String>,
    /// Every token of PROVIDER.
    #[arg(long)]
    pub all: bool,
    /// Every token with this label (KEY=VALUE).
    #[arg(long, value_name = "KEY=VALUE")]
    pub label: Option<String>,
    /// Why (recorded in the tombstone and the audit trail).
    #[arg(short = 'r', long)]
    pub reason: String,
    /// Say what would be revoked; change nothing.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Debug, Args)]
pub struct RefreshArgs {
    /// Provider (with NAME: refresh that token now), or PROVIDER/NAME.
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

#[derive(Debug, Args)]
pub struct ExecArgs {
    /// VAR=PROVIDER/NAME[:FIELD]: put the token in the child's environment as VAR
    /// (repeatable).
    #[arg(short = 'e', long = "env", value_name = "VAR=TOKEN")]
    pub env: Vec<String>,
    /// VAR=PROVIDER/NAME[:FIELD]: write the token to a private 0600 file (removed when
    /// the child exits) and put its path in VAR (repeatable).
    #[arg(short = 'f', long = "file", value_name = "VAR=TOKEN")]
    pub file: Vec<String>,
    /// The command and its arguments.
    #[arg(last = true, required = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

#[derive(Debug, Args)]
pub struct GitCredentialArgs {
    /// The git credential operation: get, store or erase (only get answers).
    pub operation: GitOperation,
    /// The token to answer with (PROVIDER/NAME[:FIELD]); default: provider `git`,
    /// the name being the host git asks for.
    #[arg(long, value_name = "TOKEN")]
    pub token: Option<String>,
    /// The user name git sends with the token (GitHub accepts any; default
    /// x-access-token).
    #[arg(long, default_value = "x-access-token")]
    pub username: String,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum GitOperation {
    /// Answer with the credential.
    Get,
    /// Ignored: tokenguard is managed with `put`.
    Store,
    /// Ignored: tokenguard is managed with `revoke`/`delete`.
    Erase,
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

#[derive(Debug, Subcommand)]
pub enum RecoveryCommand {
    /// Make a fresh age identity and split it among the custodians, any THRESHOLD of
    /// whom rebuild it: writes NAME.share.age per custodian (encrypted to their own
    /// age recipient) and escrow-auth.key (the root's authentication key, for the
    /// service), and prints the new recipient, to configure as an `age` root. The
    /// identity itself is never written.
    Split {
        /// Shares needed to rebuild the identity (2 to the number of custodians).
        #[arg(short = 'k', long)]
        threshold: u8,
        /// A custodian and their own age recipient, NAME=age1… (once per custodian).
        #[arg(long = "custodian", value_name = "NAME=RECIPIENT", required = true)]
        custodians: Vec<String>,
        /// Directory for the share files (none may exist yet).
        #[arg(long, value_name = "DIR", default_value = ".")]
        out_dir: PathBuf,
    },
    /// Derive an age root's authentication key from its identity file, for the
    /// service's auth_key_source (it cannot decrypt anything).
    AuthKey {
        /// The age identity file (as age-keygen writes it).
        #[arg(long, value_name = "FILE")]
        identity: PathBuf,
        /// Where the passphrase of a passphrase-protected identity file is read
        /// (env:VAR, file:PATH or prompt).
        #[arg(long, value_name = "SOURCE")]
        passphrase_source: Option<String>,
        /// The file to write (mode 0600, never over an existing file).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Rebuild the identity from decrypted shares (each custodian runs `age -d -i
    /// THEIR-KEY NAME.share.age > NAME.share`), then write it (--out) or run one
    /// command with it, e.g. `recovery combine a.share b.share c.share -- root add
    /// --root-config new-hsm.toml`.
    Combine {
        /// Decrypted share files.
        #[arg(required = true, value_name = "SHARE")]
        shares: Vec<PathBuf>,
        /// Write the identity to FILE (mode 0600, never over an existing file).
        #[arg(long, value_name = "FILE", conflicts_with = "command")]
        out: Option<PathBuf>,
        /// The tokenguard command to run with the identity (after --); it opens the
        /// store directly, never through an agent.
        #[arg(last = true, value_name = "COMMAND")]
        command: Vec<std::ffi::OsString>,
    },
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
