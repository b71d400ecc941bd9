//! The configuration file's schema: serde types and their defaults, nothing else.
//!
//! The config names every backend whatever is compiled in; naming one this build lacks
//! is a clear error when the root is built, not a parse failure. Each backend parses
//! its own settings (`root::pkcs11` its URI and key id, `root::tpm` its handle and PCR
//! bank); putting roots, options and a guard together is `compose.rs`. A PIN is never
//! written here: `pin_source` says where to read it (`crate::pin`). Relative paths are
//! resolved against the config file's directory. `hsm-config/` holds commented
//! references.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::cache::CacheLimits;
use crate::error::{Error, Result};
use crate::guard::refresh::RefreshPolicy;
use crate::store::{StoreMode, StoreOptions};

pub use crate::compose::RootUse;
pub use crate::pin::resolve_pin;

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Refuse non-hardware roots. Set it in production.
    #[serde(default)]
    pub require_hardware: bool,
    /// The store.
    pub store: StoreConfig,
    /// DEK cache limits.
    #[serde(default)]
    pub cache: CacheConfig,
    /// The roots; any one opens the store.
    #[serde(default)]
    pub roots: Vec<RootConfig>,
    /// OAuth providers whose token sets the built-in client refreshes
    /// (`[providers.NAME]`). Client secrets are stored sealed in the guard under
    /// provider `oauth-client`, name NAME — never here.
    #[serde(default)]
    pub providers: BTreeMap<String, crate::oauth::OAuthConfig>,
    /// Refresh policy (`[refresh]`).
    #[serde(default)]
    pub refresh: RefreshConfig,
    /// Rotation policy (`[rotation]`).
    #[serde(default)]
    pub rotation: RotationConfig,
    /// The agent (`[agent]`, `[[agent.allow]]`): `tokenguard serve` and the CLI's way
    /// to it.
    #[serde(default)]
    pub agent: Option<crate::agent::AgentConfig>,
    /// Directory of the config file, for relative paths.
    #[serde(skip)]
    pub base_dir: PathBuf,
    /// age identities rebuilt in this process (`tokenguard recovery combine … --
    /// COMMAND`), offered to every `age` root whose recipient is theirs.
    #[serde(skip)]
    pub recovered_identities: Vec<std::sync::Arc<crate::root::age::AgeIdentity>>,
    /// With `backend = "postgres"`: keep a notification listener beside the log's
    /// connection (`crate::fleet::LogConfig::listen`). On by default, for services;
    /// the CLI turns it off for its one-shot commands.
    #[serde(skip_deserializing, default = "listen_by_default")]
    pub fleet_listener: bool,
}

fn listen_by_default() -> bool {
    true
}

/// Whether a libpq connection string or URL carries a password: a `password`
/// keyword or query parameter, or a password in a URL's user information.
pub(crate) fn url_has_password(url: &str) -> bool {
    if url.to_ascii_lowercase().contains("password") {
        return true;
    }
    let Some(rest) = url.strip_prefix("postgresql://").or_else(|| url.strip_prefix("postgres://")) else {
        return false;
    };
    let authority = rest.split(['/', '?']).next().unwrap_or_default();
    authority.rsplit_once('@').is_some_and(|(userinfo, _)| userinfo.contains(':'))
}

/// `[store]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// `redb` (the default: one store file) or `postgres` (a fleet: `path` is this
    /// host's copy of a log kept in PostgreSQL; docs/FLEET-DESIGN.md).
    #[serde(default)]
    pub backend: StoreBackend,
    /// Path of the store file (with `backend = "postgres"`: this host's copy).
    pub path: PathBuf,
    /// `backend = "postgres"`: the database, as a libpq connection string: a Unix
    /// socket directory (`host=/run/postgresql dbname=tokenguard user=host_a`), or a
    /// host name over TCP with `ca_file` (TLS required). A password in it is refused.
    #[serde(default)]
    pub url: Option<String>,
    /// `backend = "postgres"`: where the database password comes from, as PINs do
    /// (`env:VAR` or `file:PATH`, mode 0600). None: peer or trust authentication.
    #[serde(default)]
    pub password_source: Option<String>,
    /// `backend = "postgres"` with a TCP host: the CA certificates (PEM) that sign
    /// the database's certificate. TLS is then required, the host name checked, and
    /// no other CA trusted. Refused with a Unix socket.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// `backend = "postgres"`: a read answers from this host's copy while its last
    /// look at the log is younger than this, milliseconds (default 1000); otherwise
    /// it looks first, or fails with exit 12. 0: every read looks.
    #[serde(default = "default_staleness_ms")]
    pub fleet_staleness_ms: u64,
    /// `shared` (default) or `exclusive`.
    #[serde(default)]
    pub mode: StoreMode,
    /// Longest wait for a busy store, milliseconds (default 5000).
    #[serde(default = "default_busy_ms")]
    pub busy_timeout_ms: u64,
    /// How often a running process looks whether another changed the store,
    /// milliseconds (default 1000): the bound on how long a revocation, shred or
    /// rotation elsewhere, or an edit of the file, stays unseen. At most 60000.
    #[serde(default = "default_recheck_ms")]
    pub recheck_ms: u64,
}

/// `[store] backend`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreBackend {
    /// One redb file.
    #[default]
    Redb,
    /// A fleet: the log in PostgreSQL, a redb copy per host (cargo feature
    /// `postgres`).
    Postgres,
}

fn default_staleness_ms() -> u64 {
    1000
}

fn default_busy_ms() -> u64 {
    u64::try_from(StoreOptions::DEFAULT_BUSY_TIMEOUT.as_millis()).unwrap_or(u64::MAX)
}

fn default_recheck_ms() -> u64 {
    u64::try_from(crate::guard::GuardOptions::DEFAULT_STATE_RECHECK.as_millis()).unwrap_or(u64::MAX)
}

/// `[cache]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// Most DEKs cached (default 1024).
    pub max_entries: usize,
    /// Seconds a DEK stays cached (default 3600).
    pub max_age_secs: u64,
}

impl Default for CacheConfig {
    fn default() -> Self {
        let d = CacheLimits::default();
        CacheConfig { max_entries: d.max_entries, max_age_secs: d.max_age.as_secs() }
    }
}

/// `[rotation]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RotationConfig {
    /// `doctor` warns about active DEKs older than this many days.
    pub max_dek_age_days: Option<u64>,
    /// Encryptions after which a DEK rotates by itself (default 2^30, at most 2^32).
    pub max_dek_encryptions: Option<u64>,
}

/// `[refresh]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RefreshConfig {
    /// Refresh after this fraction of a token's lifetime (default 0.9).
    pub fraction: f64,
    /// …or when it expires within this many seconds (default 60).
    pub margin_secs: u64,
    /// Attempts while the old token is expired (default 5).
    pub max_attempts: u32,
    /// First backoff delay in milliseconds (default 500).
    pub base_delay_ms: u64,
    /// Backoff cap in seconds (default 60).
    pub max_delay_secs: u64,
    /// How long a process's refresh lease holds off other processes, in seconds
    /// (default 30); the longest another process waits after a refresher crashed.
    pub lease_secs: u64,
}

impl Default for RefreshConfig {
    fn default() -> Self {
        let p = RefreshPolicy::default();
        RefreshConfig {
            fraction: p.fraction,
            margin_secs: p.margin.as_secs(),
            max_attempts: p.max_attempts,
            base_delay_ms: u64::try_from(p.base_delay.as_millis()).unwrap_or(u64::MAX),
            max_delay_secs: p.max_delay.as_secs(),
            lease_secs: p.lease.as_secs(),
        }
    }
}

/// One `[[roots]]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "backend", rename_all = "lowercase", deny_unknown_fields)]
pub enum RootConfig {
    /// A PKCS#11 token.
    Pkcs11(Pkcs11Config),
    /// A TPM 2.0.
    Tpm(TpmConfig),
    /// A key file (development, offline recovery).
    Soft(SoftConfig),
    /// An age X25519 recipient: an escrow root whose identity may stay offline.
    Age(AgeConfig),
}

/// Which wrap mechanism a PKCS#11 root uses for new wraps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mechanism {
    /// Probe: AES-KW, then 0x210A, then AES-GCM.
    #[default]
    Auto,
    /// Only `CKM_AES_KEY_WRAP` (RFC 3394).
    AesKw,
    /// Only `CKM_AES_KEY_WRAP_PAD` (0x210A).
    AesKwPad,
    /// Only `CKM_AES_GCM` encryption of the key bytes.
    AesGcm,
}

/// `backend = "pkcs11"`. Either `uri`, or the separate keys (keys override the URI).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pkcs11Config {
    /// RFC 7512 URI: `pkcs11:token=…;object=…;type=secret-key?module-path=…&pin-source=…`.
    pub uri: Option<String>,
    /// Path of the PKCS#11 module.
    pub module: Option<PathBuf>,
    /// Token label.
    pub token_label: Option<String>,
    /// Token serial.
    pub token_serial: Option<String>,
    /// Key label (default `tokenguard-root`).
    pub key_label: Option<String>,
    /// Key id, hex.
    pub key_id: Option<String>,
    /// Where the user PIN comes from.
    pub pin_source: Option<String>,
    /// Mechanism for new wraps (default `auto`).
    #[serde(default)]
    pub mechanism: Mechanism,
    /// Most sessions open at once (default 4).
    pub max_sessions: Option<usize>,
    /// Label of a token data object to keep the store's rollback counter in (one per
    /// store); absent: no counter from this root.
    pub counter_label: Option<String>,
    /// Let `init` and `root add` adopt a key whose `CKA_LOCAL` is false (its value was
    /// imported, so it existed outside the token): only for a deliberate key
    /// ceremony. Default false.
    #[serde(default)]
    pub allow_imported_key: bool,
    /// Environment the module needs (e.g. `SOFTHSM2_CONF`). The CLI sets it before
    /// loading the module; a library user must start the service with it.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

/// The PCR bank a TPM policy reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PcrBank {
    /// SHA-256 (default).
    #[default]
    Sha256,
    /// SHA-1, for old TPMs.
    Sha1,
}

/// `backend = "tpm"`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TpmConfig {
    /// TCTI, as tpm2-tools spell it (default: `TPM2TOOLS_TCTI`, then `device:/dev/tpmrm0`).
    pub tcti: Option<String>,
    /// Persistent handle of the storage key, e.g. "0x81000a10".
    pub persistent_handle: Option<String>,
    /// Salted, encrypted sessions for commands carrying a DEK (default true).
    pub parameter_encryption: Option<bool>,
    /// PCR policy bank (default sha256).
    #[serde(default)]
    pub pcr_bank: PcrBank,
    /// PCRs to seal to (e.g. [0, 2, 4, 7]); absent or empty: no PCR policy.
    #[serde(default)]
    pub pcrs: Vec<u8>,
    /// Where the PIN of the sealed data keys' authorisation value is read (`env:VAR`,
    /// `file:PATH`, `prompt`); absent: keys are sealed without one (doctor warns).
    pub pin_source: Option<String>,
    /// NV index (hex, owner range) of the store's rollback counter, e.g.
    /// "0x01810a10"; absent: no counter from this root.
    pub nv_counter: Option<String>,
}

/// `backend = "soft"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SoftConfig {
    /// The key file (0600).
    pub key_file: PathBuf,
}

/// `backend = "age"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgeConfig {
    /// The age X25519 recipient (`age1…`) every data key and the integrity key are
    /// encrypted to; its identity opens them. Public. Several escrow holders are
    /// several age roots, or one split among custodians (`recovery split`).
    pub recipient: String,
    /// Where the root's authentication key is read, as a PIN is (`env:VAR`,
    /// `file:PATH`, `prompt`): 64 hex digits. Needed to wrap when the identity is not
    /// configured; it cannot decrypt anything.
    pub auth_key_source: Option<String>,
    /// An age identity file (`AGE-SECRET-KEY-1…` lines, as `age-keygen` writes, or
    /// that file encrypted with a passphrase), mode 0600. Absent: the root is
    /// wrap-only, as an escrow root normally is.
    pub identity_file: Option<PathBuf>,
    /// Where the passphrase of a passphrase-protected `identity_file` is read, as a
    /// PIN is (`env:VAR`, `file:PATH`, `prompt`).
    pub passphrase_source: Option<String>,
}

/// A file holding root entries only (`root add --root-config FILE`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RootsFile {
    #[serde(default)]
    pub roots: Vec<RootConfig>,
}

/// `p` resolved against `base` when relative.
pub(crate) fn resolve_path(base: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() { p.to_owned() } else { base.join(p) }
}

/// A TOML error with where it is: "line L, column C: message".
pub(crate) fn toml_error(text: &str, e: &toml::de::Error) -> Error {
    let at = e.span().map(|s| {
        let before = text.get(..s.start).unwrap_or(text);
        let line = before.matches('\n').count() + 1;
        let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        format!("line {line}, column {col}: ")
    });
    Error::Config(format!("{}{}", at.unwrap_or_default(), e.message()))
}

impl Config {
    /// Reads and parses `path`.
    pub fn load(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).map_err(|e| Error::Config(format!("cannot read {}: {e}", path.display())))?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        Self::parse(&text, &base).map_err(|e| match e {
            Error::Config(m) => Error::Config(format!("{}: {m}", path.display())),
            other => other,
        })
    }

    /// Parses config text; relative paths resolve against `base_dir`.
    pub fn parse(text: &str, base_dir: &Path) -> Result<Self> {
        let mut c: Config = toml::from_str(text).map_err(|e| toml_error(text, &e))?;
        if let Some(n) = c.rotation.max_dek_encryptions
            && !(1..=crate::guard::GuardOptions::MAX_DEK_ENCRYPTIONS).contains(&n)
        {
            return Err(Error::Config(format!(
                "rotation.max_dek_encryptions = {n}: it must be 1 to 2^32 (NIST SP 800-38D's bound for random \
                 96-bit nonces under one key)"
            )));
        }
        match (c.store.backend, &c.store.url) {
            (StoreBackend::Postgres, None) => {
                return Err(Error::Config("[store] backend = \"postgres\" needs url (the fleet database)".into()));
            }
            (StoreBackend::Redb, Some(_)) | (StoreBackend::Redb, None) if c.store.password_source.is_some() => {
                return Err(Error::Config("[store] password_source is for backend = \"postgres\"".into()));
            }
            (StoreBackend::Redb, Some(_)) | (StoreBackend::Redb, None) if c.store.ca_file.is_some() => {
                return Err(Error::Config("[store] ca_file is for backend = \"postgres\"".into()));
            }
            (StoreBackend::Redb, Some(_)) => {
                return Err(Error::Config("[store] url is for backend = \"postgres\"".into()));
            }
            _ => {}
        }
        if c.store.url.as_deref().is_some_and(url_has_password) {
            // Refused before anything could print or log it (`store_description`,
            // the audit trail of `migrate`).
            return Err(Error::Config(
                "[store] url holds a password: give it through password_source (env: or file:) instead".into(),
            ));
        }
        if c.store.backend == StoreBackend::Postgres
            && c.roots.iter().any(|r| match r {
                RootConfig::Pkcs11(p) => p.counter_label.is_some(),
                RootConfig::Tpm(t) => t.nv_counter.is_some(),
                _ => false,
            })
        {
            // Refused here, before any open binds a hardware counter to the store.
            return Err(Error::Config(
                "a rollback counter (counter_label / nv_counter) with backend = \"postgres\" is not supported yet: \
                 the fleet log keeps the store's order (docs/FLEET-DESIGN.md)"
                    .into(),
            ));
        }
        c.base_dir = base_dir.to_owned();
        c.store.path = resolve_path(base_dir, &c.store.path);
        c.store.ca_file = c.store.ca_file.as_deref().map(|p| resolve_path(base_dir, p));
        for r in &mut c.roots {
            r.resolve_paths(base_dir);
        }
        if let Some(a) = &mut c.agent {
            a.socket = resolve_path(base_dir, &a.socket);
        }
        Ok(c)
    }

    /// Environment variables the configured modules need, for a caller that can set
    /// them before any thread starts (the CLI).
    pub fn module_env(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for r in &self.roots {
            if let RootConfig::Pkcs11(p) = r {
                for (k, v) in &p.env {
                    let v = if k.ends_with("_CONF") {
                        resolve_path(&self.base_dir, Path::new(v)).display().to_string()
                    } else {
                        v.clone()
                    };
                    out.push((k.clone(), v));
                }
            }
        }
        out
    }

    /// The environment variables the configured roots read their PIN from
    /// (`pin_source = "env:VAR"`, or `pin-source=env:VAR` in a PKCS#11 URI), for a
    /// caller that takes them out of the environment before any thread or child
    /// process starts (the CLI, see [`crate::pin::take_from_env`]).
    pub fn pin_env_vars(&self) -> Vec<String> {
        pin_env_vars_of(&self.roots)
    }

    /// [`Config::pin_env_vars`] of the `[[roots]]` entries of a root file (`root add
    /// --root-config FILE`), for the same caller, before the root is built.
    pub fn root_file_pin_env_vars(path: &Path) -> Result<Vec<String>> {
        Ok(pin_env_vars_of(&RootsFile::load(path)?.roots))
    }
}

/// The environment variables the `env:` sources of `roots` name.
fn pin_env_vars_of(roots: &[RootConfig]) -> Vec<String> {
    let mut sources: Vec<String> = Vec::new();
    for r in roots {
        match r {
            RootConfig::Pkcs11(p) => {
                sources.extend(p.pin_source.clone());
                // The URI's query, percent-decoded as the URI parser decodes it.
                if let Some(u) = p.uri.as_deref()
                    && let Some(q) = u.split_once('?').map(|(_, q)| q)
                {
                    sources.extend(
                        form_urlencoded::parse(q.as_bytes())
                            .filter(|(k, _)| k == "pin-source")
                            .map(|(_, v)| v.into_owned()),
                    );
                }
            }
            RootConfig::Tpm(t) => sources.extend(t.pin_source.clone()),
            RootConfig::Age(a) => {
                sources.extend(a.passphrase_source.clone());
                sources.extend(a.auth_key_source.clone());
            }
            RootConfig::Soft(_) => {}
        }
    }
    let mut vars: Vec<String> = sources.iter().filter_map(|s| s.strip_prefix("env:")).map(String::from).collect();
    vars.dedup();
    vars
}

impl RootConfig {
    fn resolve_paths(&mut self, base: &Path) {
        match self {
            RootConfig::Soft(s) => s.key_file = resolve_path(base, &s.key_file),
            RootConfig::Age(a) => a.identity_file = a.identity_file.as_deref().map(|p| resolve_path(base, p)),
            RootConfig::Pkcs11(_) | RootConfig::Tpm(_) => {}
        }
    }
}

impl RootsFile {
    /// Reads a file of `[[roots]]` entries; relative paths resolve against its directory.
    pub(crate) fn load(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).map_err(|e| Error::Config(format!("cannot read {}: {e}", path.display())))?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let mut f: RootsFile = toml::from_str(&text)
            .map_err(|e| Error::Config(format!("{}: {}", path.display(), toml_error(&text, &e))))?;
        for r in &mut f.roots {
            r.resolve_paths(&base);
        }
        Ok(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_come_from_the_library_types() {
        let c = Config::parse("[store]\npath = \"s.redb\"\n", Path::new("/tmp")).expect("parse");
        assert_eq!(c.store.path, Path::new("/tmp/s.redb"));
        assert_eq!(c.store.mode, StoreMode::Shared);
        assert_eq!(c.store.busy_timeout_ms, 5000);
        assert_eq!(c.cache.max_entries, CacheLimits::default().max_entries);
        assert_eq!(c.refresh.lease_secs, RefreshPolicy::default().lease.as_secs());
        assert!(Config::parse("[store]\npath=\"x\"\nmode = \"other\"\n", Path::new("/")).is_err());
    }

    #[test]
    fn the_fleet_settings_belong_to_the_postgres_backend() {
        let pg = "[store]\npath = \"c.redb\"\nbackend = \"postgres\"\nurl = \"host=/run/postgresql dbname=tg\"\n";
        let c = Config::parse(pg, Path::new("/")).expect("parse");
        assert_eq!(c.store.backend, StoreBackend::Postgres);
        assert_eq!(c.store.fleet_staleness_ms, 1000);
        let e = Config::parse("[store]\npath = \"c\"\nbackend = \"postgres\"\n", Path::new("/")).expect_err("no url");
        assert!(e.to_string().contains("needs url"), "{e}");
        for url in ["host=/x password=hunter2", "postgresql://u:hunter2@db/tg", "postgres://db/tg?Password=x"] {
            let text = format!("[store]\nbackend = \"postgres\"\npath = \"c\"\nurl = \"{url}\"\n");
            let e = Config::parse(&text, Path::new("/")).expect_err(url);
            assert!(e.to_string().contains("holds a password") && !e.to_string().contains("hunter2"), "{e}");
        }
        let ok = "[store]\nbackend = \"postgres\"\npath = \"c\"\nurl = \"postgresql://u@db:5432/tg\"\n";
        Config::parse(ok, Path::new("/")).expect("a URL with a user and no password");
        let e = Config::parse("[store]\npath = \"c\"\nurl = \"host=/x\"\n", Path::new("/")).expect_err("url on redb");
        assert!(e.to_string().contains("url is for"), "{e}");
        let e = Config::parse("[store]\npath = \"c\"\npassword_source = \"env:X\"\n", Path::new("/"))
            .expect_err("password on redb");
        assert!(e.to_string().contains("password_source is for"), "{e}");
        let e = Config::parse("[store]\npath = \"c\"\nca_file = \"ca.pem\"\n", Path::new("/")).expect_err("ca on redb");
        assert!(e.to_string().contains("ca_file is for"), "{e}");
        let c = Config::parse(&format!("{pg}ca_file = \"ca.pem\"\n"), Path::new("/etc/tg")).expect("parse");
        assert_eq!(c.store.ca_file.as_deref(), Some(Path::new("/etc/tg/ca.pem")));
        assert!(Config::parse("[store]\npath = \"c\"\nbackend = \"mysql\"\n", Path::new("/")).is_err());
    }

    #[test]
    fn enumerations_are_checked_by_the_parser() {
        let ok = "[store]\npath = \"s\"\n[[roots]]\nbackend = \"pkcs11\"\nmechanism = \"aes-kw-pad\"\n";
        let c = Config::parse(ok, Path::new("/")).expect("parse");
        assert!(matches!(&c.roots[0], RootConfig::Pkcs11(p) if p.mechanism == Mechanism::AesKwPad));
        let bad = "[store]\npath = \"s\"\n[[roots]]\nbackend = \"tpm\"\npcr_bank = \"md5\"\n";
        let e = Config::parse(bad, Path::new("/")).expect_err("md5 is no bank");
        assert!(e.to_string().contains("line 3, column 1") && e.to_string().contains("md5"), "{e}");
        assert!(Config::parse("[store]\npath=\"x\"\n[[roots]]\nbackend = \"nope\"\n", Path::new("/")).is_err());
    }

    /// Finding 18: a DEK never makes more than 2^32 encryptions (random nonces).
    #[test]
    fn max_dek_encryptions_is_capped_at_2_32() {
        let at = |n: u64| format!("[store]\npath = \"s\"\n[rotation]\nmax_dek_encryptions = {n}\n");
        assert!(Config::parse(&at(1 << 32), Path::new("/")).is_ok());
        let e = Config::parse(&at((1 << 32) + 1), Path::new("/")).expect_err("over 2^32");
        assert!(e.to_string().contains("2^32"), "{e}");
        assert!(Config::parse(&at(0), Path::new("/")).is_err());
    }

    /// The commented references in hsm-config/ are configurations this build reads.
    #[test]
    fn every_reference_config_parses() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("hsm-config");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).expect("hsm-config/") {
            let path = entry.expect("entry").path();
            if path.extension().is_some_and(|e| e == "toml") {
                let mut text = std::fs::read_to_string(&path).expect("read");
                if !text.contains("\n[store]") {
                    // A fragment (agent.toml): added to a store's configuration.
                    text.push_str("\n[store]\npath = \"s.redb\"\n");
                }
                let c = Config::parse(&text, &dir).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                for r in &c.roots {
                    if let RootConfig::Age(a) = r {
                        crate::root::age::parse_recipient(&a.recipient)
                            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                    }
                }
                n += 1;
            }
        }
        assert!(n >= 6, "{n} references");
    }

    #[test]
    fn recheck_ms_defaults_to_one_second() {
        let c = Config::parse("[store]\npath = \"s\"\n", Path::new("/")).expect("parse");
        assert_eq!(c.store.recheck_ms, 1000);
        assert_eq!(c.guard_options().state_recheck, std::time::Duration::from_secs(1));
    }
}
