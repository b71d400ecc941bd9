//! Configuration: TOML file, RFC 7512 `pkcs11:` URIs, PIN sources.
//!
//! The config names every backend whatever is compiled in; naming one this build
//! lacks is a clear error, not a parse failure. A PIN is never written in the config
//! or on the command line: `pin_source` says where to read it (`env:VAR`,
//! `file:PATH` — refused when group- or world-readable — or `prompt`). Relative paths
//! are resolved against the config file's directory. `hsm-config/` holds commented
//! references.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::SecretString;
use serde::Deserialize;
use zeroize::Zeroizing;

use crate::cache::CacheLimits;
use crate::error::{Error, Result};
use crate::guard::{GuardOptions, TokenGuard};
use crate::root::RootKey;
use crate::store::{StoreMode, StoreOptions};

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
    /// Directory of the config file, for relative paths.
    #[serde(skip)]
    pub base_dir: PathBuf,
}

/// `[store]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// Path of the redb file.
    pub path: PathBuf,
    /// `shared` (default) or `exclusive`.
    #[serde(default)]
    pub mode: ModeConfig,
    /// Longest wait for a busy store, milliseconds (default 5000).
    #[serde(default = "default_busy")]
    pub busy_timeout_ms: u64,
}

fn default_busy() -> u64 {
    5000
}

/// Store sharing mode in the config.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ModeConfig {
    /// Several processes.
    #[default]
    Shared,
    /// One process.
    Exclusive,
}

/// `[cache]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    /// Most DEKs cached (default 1024).
    #[serde(default = "default_entries")]
    pub max_entries: usize,
    /// Seconds a DEK stays cached (default 3600).
    #[serde(default = "default_age")]
    pub max_age_secs: u64,
}

fn default_entries() -> usize {
    1024
}
fn default_age() -> u64 {
    3600
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig { max_entries: default_entries(), max_age_secs: default_age() }
    }
}

/// `[rotation]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RotationConfig {
    /// `doctor` warns about active DEKs older than this many days.
    pub max_dek_age_days: Option<u64>,
    /// Encryptions after which a DEK rotates by itself (default 2^30).
    pub max_dek_encryptions: Option<u64>,
}

/// `[refresh]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RefreshConfig {
    /// Refresh after this fraction of a token's lifetime (default 0.9).
    #[serde(default = "default_fraction")]
    pub fraction: f64,
    /// …or when it expires within this many seconds (default 60).
    #[serde(default = "default_margin")]
    pub margin_secs: u64,
    /// Attempts while the old token is expired (default 5).
    #[serde(default = "default_attempts")]
    pub max_attempts: u32,
    /// First backoff delay in milliseconds (default 500).
    #[serde(default = "default_base_delay")]
    pub base_delay_ms: u64,
    /// Backoff cap in seconds (default 60).
    #[serde(default = "default_max_delay")]
    pub max_delay_secs: u64,
    /// How long a process's refresh lease holds off other processes, in seconds
    /// (default 30); the longest another process waits after a refresher crashed.
    #[serde(default = "default_lease")]
    pub lease_secs: u64,
}

fn default_lease() -> u64 {
    30
}

fn default_fraction() -> f64 {
    0.9
}
fn default_margin() -> u64 {
    60
}
fn default_attempts() -> u32 {
    5
}
fn default_base_delay() -> u64 {
    500
}
fn default_max_delay() -> u64 {
    60
}

impl Default for RefreshConfig {
    fn default() -> Self {
        RefreshConfig {
            fraction: default_fraction(),
            margin_secs: default_margin(),
            max_attempts: default_attempts(),
            base_delay_ms: default_base_delay(),
            max_delay_secs: default_max_delay(),
            lease_secs: default_lease(),
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
    /// `auto`, `aes-kw`, `aes-kw-pad`, `aes-gcm`.
    pub mechanism: Option<String>,
    /// Most sessions open at once (default 4).
    pub max_sessions: Option<usize>,
    /// Environment the module needs (e.g. `SOFTHSM2_CONF`). The CLI sets it before
    /// loading the module; a library user must start the service with it.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
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
    /// PCR policy bank: "sha256" (default) or "sha1".
    pub pcr_bank: Option<String>,
    /// PCRs to seal to (e.g. [0, 2, 4, 7]); absent or empty: no PCR policy.
    #[serde(default)]
    pub pcrs: Vec<u8>,
}

/// `backend = "soft"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SoftConfig {
    /// The key file (0600).
    pub key_file: PathBuf,
}

/// A parsed RFC 7512 PKCS#11 URI (the parts tokenguard uses).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pkcs11Uri {
    /// `token=`.
    pub token: Option<String>,
    /// `serial=`.
    pub serial: Option<String>,
    /// `object=`.
    pub object: Option<String>,
    /// `id=` (raw bytes).
    pub id: Option<Vec<u8>>,
    /// `type=`.
    pub object_type: Option<String>,
    /// `module-path=`.
    pub module_path: Option<String>,
    /// `pin-source=`.
    pub pin_source: Option<String>,
}

fn pct_decode(s: &str) -> Result<Vec<u8>> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex =
                s.get(i + 1..i + 3).ok_or_else(|| Error::Config(format!("bad percent-escape in pkcs11 URI: {s:?}")))?;
            let v = u8::from_str_radix(hex, 16)
                .map_err(|_| Error::Config(format!("bad percent-escape in pkcs11 URI: {s:?}")))?;
            out.push(v);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Ok(out)
}

fn pct_str(s: &str) -> Result<String> {
    String::from_utf8(pct_decode(s)?).map_err(|_| Error::Config("pkcs11 URI attribute is not UTF-8".into()))
}

impl Pkcs11Uri {
    /// Parses `pkcs11:path-attrs?query-attrs`. Unknown attributes are rejected, and so
    /// is `pin-value`: a PIN never goes in a URI.
    pub fn parse(uri: &str) -> Result<Self> {
        let rest = uri.strip_prefix("pkcs11:").ok_or_else(|| Error::Config(format!("not a pkcs11: URI: {uri:?}")))?;
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        let mut u = Pkcs11Uri::default();
        for attr in path.split(';').filter(|a| !a.is_empty()) {
            let (k, v) = attr
                .split_once('=')
                .ok_or_else(|| Error::Config(format!("pkcs11 URI attribute without '=': {attr:?}")))?;
            match k {
                "token" => u.token = Some(pct_str(v)?),
                "serial" => u.serial = Some(pct_str(v)?),
                "object" => u.object = Some(pct_str(v)?),
                "id" => u.id = Some(pct_decode(v)?),
                "type" => u.object_type = Some(pct_str(v)?),
                "manufacturer"
                | "model"
                | "library-description"
                | "library-manufacturer"
                | "library-version"
                | "slot-description"
                | "slot-manufacturer"
                | "slot-id" => {}
                other => {
                    return Err(Error::Config(format!("unsupported pkcs11 URI path attribute {other:?}")));
                }
            }
        }
        for attr in query.split('&').filter(|a| !a.is_empty()) {
            let (k, v) = attr
                .split_once('=')
                .ok_or_else(|| Error::Config(format!("pkcs11 URI query attribute without '=': {attr:?}")))?;
            match k {
                "module-path" => u.module_path = Some(pct_str(v)?),
                "pin-source" => u.pin_source = Some(pct_str(v)?),
                "pin-value" => {
                    return Err(Error::Config(
                        "pin-value in a pkcs11 URI is refused: put the PIN in a 0600 file or an environment variable and use pin-source".into(),
                    ));
                }
                "module-name" => {}
                other => {
                    return Err(Error::Config(format!("unsupported pkcs11 URI query attribute {other:?}")));
                }
            }
        }
        if let Some(t) = &u.object_type
            && t != "secret-key"
        {
            return Err(Error::Config(format!("the root key must be type=secret-key, not {t:?}")));
        }
        Ok(u)
    }
}

/// Reads a PIN from its source. Never logs or returns it in an error.
pub fn resolve_pin(source: &str, base: &Path) -> Result<SecretString> {
    if let Some(var) = source.strip_prefix("env:") {
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
        let pin =
            rpassword::prompt_password("Token PIN: ").map_err(|e| Error::Config(format!("reading the PIN: {e}")))?;
        return Ok(SecretString::from(pin));
    }
    Err(Error::Config(format!("pin_source must be env:VAR, file:PATH or prompt (got {source:?})")))
}

fn resolve_path(base: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() { p.to_owned() } else { base.join(p) }
}

#[cfg(feature = "pkcs11")]
fn hex_decode(s: &str) -> Result<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return Err(Error::Config(format!("key_id must be hex: {s:?}")));
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).map_err(|_| Error::Config(format!("key_id must be hex: {s:?}"))))
        .collect()
}

/// What a root is being built for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RootUse {
    /// Opening an existing store: keys must exist.
    Open,
    /// `init`: keys are created when missing.
    Init,
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
        let mut c: Config = toml::from_str(text).map_err(|e| Error::Config(e.message().to_string()))?;
        c.base_dir = base_dir.to_owned();
        c.store.path = resolve_path(base_dir, &c.store.path);
        for r in &mut c.roots {
            if let RootConfig::Soft(s) = r {
                s.key_file = resolve_path(base_dir, &s.key_file);
            }
        }
        Ok(c)
    }

    /// Store options.
    pub fn store_options(&self) -> StoreOptions {
        StoreOptions {
            mode: match self.store.mode {
                ModeConfig::Shared => StoreMode::Shared,
                ModeConfig::Exclusive => StoreMode::Exclusive,
            },
            busy_timeout: Duration::from_millis(self.store.busy_timeout_ms),
        }
    }

    /// Guard options.
    pub fn guard_options(&self) -> GuardOptions {
        GuardOptions {
            cache: CacheLimits {
                max_entries: self.cache.max_entries,
                max_age: Duration::from_secs(self.cache.max_age_secs),
            },
            require_hardware: self.require_hardware,
            max_dek_age: self.rotation.max_dek_age_days.map(|d| Duration::from_secs(d * 86_400)),
            max_dek_encryptions: self.rotation.max_dek_encryptions.unwrap_or(1 << 30).max(1),
            ..GuardOptions::default()
        }
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

    /// Builds every configured root.
    pub fn build_roots(&self, usage: RootUse) -> Result<Vec<Box<dyn RootKey>>> {
        if self.roots.is_empty() {
            return Err(Error::Config("no [[roots]] configured".into()));
        }
        let mut out: Vec<Box<dyn RootKey>> = Vec::new();
        for r in &self.roots {
            out.push(self.build_root(r, usage)?);
        }
        Ok(out)
    }

    fn build_root(&self, r: &RootConfig, usage: RootUse) -> Result<Box<dyn RootKey>> {
        match r {
            RootConfig::Soft(s) => {
                if self.require_hardware {
                    return Err(Error::Config(format!(
                        "require_hardware = true refuses the soft root {}: it is for development or offline recovery",
                        s.key_file.display()
                    )));
                }
                let root = match usage {
                    RootUse::Init => crate::root::soft::SoftRoot::open_or_create(&s.key_file)?,
                    RootUse::Open => crate::root::soft::SoftRoot::open(&s.key_file)?,
                };
                Ok(Box::new(root))
            }
            RootConfig::Pkcs11(p) => self.build_pkcs11(p, usage),
            RootConfig::Tpm(t) => self.build_tpm(t, usage),
        }
    }

    #[cfg(not(feature = "tpm"))]
    fn build_tpm(&self, _t: &TpmConfig, _usage: RootUse) -> Result<Box<dyn RootKey>> {
        Err(Error::BackendNotCompiled("tpm"))
    }

    #[cfg(feature = "tpm")]
    fn build_tpm(&self, t: &TpmConfig, usage: RootUse) -> Result<Box<dyn RootKey>> {
        use crate::root::tpm::{DEFAULT_PERSISTENT_HANDLE, TpmRoot, TpmSettings};
        let tcti = t
            .tcti
            .clone()
            .or_else(|| std::env::var("TPM2TOOLS_TCTI").ok())
            .unwrap_or_else(|| "device:/dev/tpmrm0".into());
        let persistent_handle = match &t.persistent_handle {
            Some(h) => u32::from_str_radix(h.trim_start_matches("0x"), 16)
                .map_err(|_| Error::Config(format!("persistent_handle {h:?} must be hex, e.g. \"0x81000a10\"")))?,
            None => DEFAULT_PERSISTENT_HANDLE,
        };
        let bank = match t.pcr_bank.as_deref().unwrap_or("sha256") {
            "sha256" => tss_esapi::interface_types::algorithm::HashingAlgorithm::Sha256,
            "sha1" => tss_esapi::interface_types::algorithm::HashingAlgorithm::Sha1,
            other => return Err(Error::Config(format!("pcr_bank must be sha256 or sha1 (got {other:?})"))),
        };
        let settings = TpmSettings {
            tcti,
            persistent_handle,
            parameter_encryption: t.parameter_encryption.unwrap_or(true),
            pcrs: (!t.pcrs.is_empty()).then(|| (bank, t.pcrs.clone())),
        };
        Ok(Box::new(TpmRoot::open(settings, usage == RootUse::Init)?))
    }

    #[cfg(not(feature = "pkcs11"))]
    fn build_pkcs11(&self, _p: &Pkcs11Config, _usage: RootUse) -> Result<Box<dyn RootKey>> {
        Err(Error::BackendNotCompiled("pkcs11"))
    }

    #[cfg(feature = "pkcs11")]
    fn build_pkcs11(&self, p: &Pkcs11Config, usage: RootUse) -> Result<Box<dyn RootKey>> {
        use crate::root::pkcs11::Pkcs11Root;
        let settings = self.pkcs11_settings(p)?;
        for (k, v) in self.module_env() {
            if std::env::var(&k).ok().as_deref() != Some(v.as_str()) {
                return Err(Error::Config(format!(
                    "the PKCS#11 module needs {k}={v} in the environment (the tokenguard CLI sets it; a service must be started with it)"
                )));
            }
        }
        let root = match usage {
            RootUse::Open => Pkcs11Root::open(settings)?,
            RootUse::Init => Pkcs11Root::open_or_generate(settings)?,
        };
        Ok(Box::new(root))
    }

    /// Resolves a `[[roots]]` pkcs11 entry into settings (reads the PIN).
    #[cfg(feature = "pkcs11")]
    pub fn pkcs11_settings(&self, p: &Pkcs11Config) -> Result<crate::root::pkcs11::Pkcs11Settings> {
        use crate::root::pkcs11::{MechanismPreference, Pkcs11Settings};
        let uri = p.uri.as_deref().map(Pkcs11Uri::parse).transpose()?.unwrap_or_default();
        let module = p
            .module
            .clone()
            .or(uri.module_path.map(PathBuf::from))
            .ok_or_else(|| Error::Config("pkcs11 root needs module (or module-path in the uri)".into()))?;
        let pin_source = p
            .pin_source
            .clone()
            .or(uri.pin_source)
            .ok_or_else(|| Error::Config("pkcs11 root needs pin_source (env:VAR, file:PATH or prompt)".into()))?;
        let token_label = p.token_label.clone().or(uri.token);
        let token_serial = p.token_serial.clone().or(uri.serial);
        if token_label.is_none() && token_serial.is_none() {
            return Err(Error::Config(
                "pkcs11 root needs token_label or token_serial: tokens are never chosen by slot number".into(),
            ));
        }
        let key_id = match &p.key_id {
            Some(h) => Some(hex_decode(h)?),
            None => uri.id,
        };
        let mechanism = match p.mechanism.as_deref().unwrap_or("auto") {
            "auto" => MechanismPreference::Auto,
            "aes-kw" => MechanismPreference::AesKw,
            "aes-kw-pad" => MechanismPreference::AesKwPad,
            "aes-gcm" => MechanismPreference::AesGcm,
            other => {
                return Err(Error::Config(format!(
                    "mechanism must be auto, aes-kw, aes-kw-pad or aes-gcm (got {other:?})"
                )));
            }
        };
        Ok(Pkcs11Settings {
            module: resolve_path(&self.base_dir, &module),
            token_label,
            token_serial,
            key_label: p.key_label.clone().or(uri.object).unwrap_or_else(|| "tokenguard-root".into()),
            key_id,
            pin: resolve_pin(&pin_source, &self.base_dir)?,
            mechanism,
            max_sessions: p.max_sessions.unwrap_or(4),
        })
    }

    /// Opens the configured store, with the refresh policy and the OAuth refreshers
    /// of `[providers]` installed.
    pub fn open_guard(&self) -> Result<TokenGuard> {
        let roots = self.build_roots(RootUse::Open)?;
        let g = TokenGuard::open(&self.store.path, self.store_options(), roots, self.guard_options())?;
        self.install_refreshers(&g)?;
        Ok(g)
    }

    /// The refresh policy of `[refresh]`.
    pub fn refresh_policy(&self) -> crate::guard::refresh::RefreshPolicy {
        let r = &self.refresh;
        crate::guard::refresh::RefreshPolicy {
            fraction: r.fraction,
            margin: Duration::from_secs(r.margin_secs),
            max_attempts: r.max_attempts.max(1),
            base_delay: Duration::from_millis(r.base_delay_ms),
            max_delay: Duration::from_secs(r.max_delay_secs),
            lease: Duration::from_secs(r.lease_secs.max(1)),
        }
    }

    /// The built-in OAuth client of `provider`, with its client secret read (sealed)
    /// from the guard.
    pub fn oauth_client(&self, g: &TokenGuard, provider: &str) -> Result<Option<crate::oauth::OAuthClient>> {
        let Some(p) = self.providers.get(provider) else { return Ok(None) };
        let secret = match g.get(crate::oauth::CLIENT_SECRET_PROVIDER, provider) {
            Ok(s) => s.field(None).map(crate::secret::SecretBytes::duplicate),
            Err(Error::NotFound { .. }) => None,
            Err(e) => return Err(e),
        };
        crate::oauth::OAuthClient::new(p.clone(), secret).map(Some)
    }

    /// Installs the refresh policy and an OAuth refresher per `[providers]` entry.
    pub fn install_refreshers(&self, g: &TokenGuard) -> Result<()> {
        g.set_refresh_policy(self.refresh_policy());
        for name in self.providers.keys() {
            if let Some(c) = self.oauth_client(g, name)? {
                g.set_refresher(name, std::sync::Arc::new(c));
            }
        }
        Ok(())
    }

    /// Creates the configured store (and root keys that do not exist yet).
    pub fn init_guard(&self) -> Result<TokenGuard> {
        if self.store.path.exists() {
            return Err(Error::StoreExists(self.store.path.clone()));
        }
        let roots = self.build_roots(RootUse::Init)?;
        TokenGuard::create(&self.store.path, self.store_options(), roots, self.guard_options())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_rfc7512_uri() {
        let u = Pkcs11Uri::parse(
            "pkcs11:token=my%20token;object=tokenguard-root;id=%01%ff;type=secret-key?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/etc/pin",
        )
        .expect("parse");
        assert_eq!(u.token.as_deref(), Some("my token"));
        assert_eq!(u.object.as_deref(), Some("tokenguard-root"));
        assert_eq!(u.id, Some(vec![0x01, 0xff]));
        assert_eq!(u.module_path.as_deref(), Some("/usr/lib/softhsm/libsofthsm2.so"));
        assert_eq!(u.pin_source.as_deref(), Some("file:/etc/pin"));
    }

    #[test]
    fn refuses_pin_value_and_wrong_type() {
        let e = Pkcs11Uri::parse("pkcs11:token=t?pin-value=1234").expect_err("must refuse");
        assert!(!e.to_string().contains("1234"), "{e}");
        assert!(Pkcs11Uri::parse("pkcs11:token=t;type=private").is_err());
        assert!(Pkcs11Uri::parse("pkcs11:token=%zz").is_err());
        assert!(Pkcs11Uri::parse("https://x").is_err());
    }

    #[test]
    fn names_absent_backend_clearly() {
        let c = Config::parse(
            "[store]\npath = \"s.redb\"\n[[roots]]\nbackend = \"tpm\"\ntcti = \"swtpm:port=2321\"\n",
            Path::new("/tmp"),
        )
        .expect("parse");
        assert_eq!(c.store.path, Path::new("/tmp/s.redb"));
        match c.build_roots(RootUse::Open) {
            #[cfg(not(feature = "tpm"))]
            Err(Error::BackendNotCompiled("tpm")) => {}
            // Compiled in, but nothing listens on that port.
            #[cfg(feature = "tpm")]
            Err(Error::Hardware { backend: "tpm", .. }) => {}
            other => panic!("unexpected {other:?}"),
        }
        assert!(Config::parse("[store]\npath=\"x\"\n[[roots]]\nbackend = \"nope\"\n", Path::new("/")).is_err());
    }
}
