//! Composition: turning a [`Config`] into roots, options and a guard — written once,
//! used by the CLI, the tests and library users alike — and the operations that need
//! both a config and a guard (adding a root from a file, rotating the root key,
//! revoking at the provider).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::backup::{self, BackupSummary};
use crate::cache::CacheLimits;
use crate::config::{Config, RootConfig, RootsFile};
use crate::error::{Error, Result};
use crate::guard::refresh::RefreshPolicy;
use crate::guard::revoke::RevokeTarget;
use crate::guard::{GetOptions, GuardOptions, TokenGuard};
use crate::oauth::{CLIENT_SECRET_PROVIDER, OAuthClient};
use crate::root::RootKey;
use crate::secret::SecretBytes;
use crate::store::{RootPin, StoreOptions};

/// What `migrate` copied, and what it checked on the other side.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Migration {
    /// What the copy held.
    pub summary: BackupSummary,
    /// Records opened under the destination's roots (every record not shredded).
    pub records_opened: usize,
    /// Records under destroyed DEKs, copied as they were (they open nowhere).
    pub shredded: usize,
}

/// What a root is being built for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RootUse {
    /// Opening an existing store: keys must exist.
    Open,
    /// `init` or `root add`: keys are created when missing.
    Init,
}

/// Builds one root from its config entry. `require_hardware` refuses a soft root;
/// `recovered` are age identities rebuilt in this process, for the age roots they
/// belong to.
pub fn build_root(
    r: &RootConfig,
    base_dir: &Path,
    usage: RootUse,
    require_hardware: bool,
    recovered: &[Arc<crate::root::age::AgeIdentity>],
) -> Result<Box<dyn RootKey>> {
    match r {
        // Never hardware: under require_hardware it may wrap, not open (the guard
        // refuses one that could open, with why).
        RootConfig::Age(a) => Ok(Box::new(crate::root::age::AgeRoot::from_config(a, base_dir, recovered)?)),
        RootConfig::Soft(s) => {
            if require_hardware {
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
        #[cfg(feature = "pkcs11")]
        RootConfig::Pkcs11(p) => {
            let settings = crate::root::pkcs11::Pkcs11Settings::from_config(p, base_dir)?;
            Ok(Box::new(crate::root::pkcs11::Pkcs11Root::connect(settings, usage == RootUse::Init)?))
        }
        #[cfg(not(feature = "pkcs11"))]
        RootConfig::Pkcs11(_) => {
            let _ = base_dir;
            Err(Error::BackendNotCompiled("pkcs11"))
        }
        #[cfg(feature = "tpm")]
        RootConfig::Tpm(t) => {
            let settings = crate::root::tpm::TpmSettings::from_config(t, base_dir)?;
            Ok(Box::new(crate::root::tpm::TpmRoot::open(settings, usage == RootUse::Init)?))
        }
        #[cfg(not(feature = "tpm"))]
        RootConfig::Tpm(_) => Err(Error::BackendNotCompiled("tpm")),
    }
}

impl Config {
    /// Builds every configured root.
    pub fn build_roots(&self, usage: RootUse) -> Result<Vec<Box<dyn RootKey>>> {
        if self.roots.is_empty() {
            return Err(Error::Config("no [[roots]] configured".into()));
        }
        #[cfg(feature = "pkcs11")]
        self.check_module_env()?;
        let roots: Vec<Box<dyn RootKey>> = self
            .roots
            .iter()
            .map(|r| build_root(r, &self.base_dir, usage, self.require_hardware, &self.recovered_identities))
            .collect::<Result<_>>()?;
        // An identity rebuilt from shares that opens none of the configured roots is a
        // mistake to report, not to ignore.
        for id in &self.recovered_identities {
            let used = self.roots.iter().any(|r| {
                matches!(r, RootConfig::Age(a) if crate::root::age::parse_recipient(&a.recipient)
                    .is_ok_and(|x| x.to_string() == id.recipient()))
            });
            if !used {
                return Err(Error::Config(format!(
                    "the identity rebuilt from the shares (recipient {}) is not a recipient of any configured age root",
                    id.recipient()
                )));
            }
        }
        Ok(roots)
    }

    /// A PKCS#11 module reads its environment when it loads: make sure what the
    /// config names is in force (the CLI sets it; a service must be started with it).
    #[cfg(feature = "pkcs11")]
    fn check_module_env(&self) -> Result<()> {
        for (k, v) in self.module_env() {
            if std::env::var(&k).ok().as_deref() != Some(v.as_str()) {
                return Err(Error::Config(format!(
                    "the PKCS#11 module needs {k}={v} in the environment (the tokenguard CLI sets it; a service must be started with it)"
                )));
            }
        }
        Ok(())
    }

    /// Store options of `[store]`.
    pub fn store_options(&self) -> StoreOptions {
        StoreOptions { mode: self.store.mode, busy_timeout: Duration::from_millis(self.store.busy_timeout_ms) }
    }

    /// Guard options of `[cache]`, `[rotation]` and `require_hardware`.
    pub fn guard_options(&self) -> GuardOptions {
        GuardOptions {
            cache: CacheLimits {
                max_entries: self.cache.max_entries,
                max_age: Duration::from_secs(self.cache.max_age_secs),
            },
            require_hardware: self.require_hardware,
            state_recheck: Duration::from_millis(self.store.recheck_ms.min(60_000)),
            max_dek_age: self.rotation.max_dek_age_days.map(|d| Duration::from_secs(d.saturating_mul(86_400))),
            max_dek_encryptions: self
                .rotation
                .max_dek_encryptions
                .unwrap_or(GuardOptions::DEFAULT_MAX_DEK_ENCRYPTIONS)
                .max(1),
            ..GuardOptions::default()
        }
    }

    /// The refresh policy of `[refresh]`.
    pub fn refresh_policy(&self) -> RefreshPolicy {
        let r = &self.refresh;
        RefreshPolicy {
            fraction: r.fraction,
            margin: Duration::from_secs(r.margin_secs),
            max_attempts: r.max_attempts.max(1),
            base_delay: Duration::from_millis(r.base_delay_ms),
            max_delay: Duration::from_secs(r.max_delay_secs),
            lease: Duration::from_secs(r.lease_secs.max(1)),
        }
    }

    /// Opens the configured store with the default options, with the refresh policy
    /// and the OAuth refreshers of `[providers]` installed.
    pub fn open_guard(&self) -> Result<TokenGuard> {
        self.open_guard_with(self.guard_options())
    }

    /// As [`Config::open_guard`], with `opts` (e.g. [`Config::guard_options`] with an
    /// actor set).
    pub fn open_guard_with(&self, opts: GuardOptions) -> Result<TokenGuard> {
        let open = |opts: GuardOptions| -> Result<TokenGuard> {
            let roots = self.build_roots(RootUse::Open)?;
            let g = TokenGuard::open(&self.store.path, self.store_options(), roots, opts)?;
            self.join_fleet(&g)?;
            Ok(g)
        };
        let mut g = open(opts.clone())?;
        // A fleet copy whose first look brought a roots change made on another host
        // (`root add`, `root remove`): this handle was opened with the pins from
        // before, and writes nothing. Opened once more, it follows the change — or,
        // its own root removed, is refused as any open with a wrong root is.
        if g.roots_moved()? {
            drop(g);
            g = open(opts)?;
        }
        self.install_refreshers(&g)?;
        Ok(g)
    }

    /// With `backend = "postgres"`: joins the guard's store to the fleet log (the
    /// first host starts the log; the others catch up).
    fn join_fleet(&self, g: &TokenGuard) -> Result<()> {
        self.with_log(g, false)
    }

    /// With `backend = "postgres"`, [`crate::fleet::attach`] (or, `new_log`,
    /// [`crate::fleet::start`]) under the `[store]` settings; nothing with redb.
    fn with_log(&self, g: &TokenGuard, new_log: bool) -> Result<()> {
        match self.store.backend {
            crate::config::StoreBackend::Redb => Ok(()),
            #[cfg(feature = "postgres")]
            crate::config::StoreBackend::Postgres => {
                let url = self.store.url.as_deref().ok_or_else(|| Error::Config("[store] url is not set".into()))?;
                let password = match &self.store.password_source {
                    Some(src) if !(src.starts_with("env:") || src.starts_with("file:")) => {
                        return Err(Error::Config(
                            "[store] password_source must be env:VAR or file:PATH (a fleet host runs unattended)"
                                .into(),
                        ));
                    }
                    Some(src) => {
                        use secrecy::ExposeSecret;
                        let p = crate::pin::resolve_pin(src, &self.base_dir)
                            .map_err(|e| Error::Config(format!("[store] password_source: {e}")))?;
                        Some(SecretBytes::from_slice(p.expose_secret().as_bytes()))
                    }
                    None => None,
                };
                let cfg = crate::fleet::LogConfig {
                    url,
                    password: password.as_ref(),
                    ca_file: self.store.ca_file.as_deref(),
                    timeout: Duration::from_millis(self.store.busy_timeout_ms.max(1)),
                    staleness: Duration::from_millis(self.store.fleet_staleness_ms),
                    listen: self.fleet_listener,
                };
                if new_log { crate::fleet::start(g, &cfg) } else { crate::fleet::attach(g, &cfg) }.map(drop)
            }
            #[cfg(not(feature = "postgres"))]
            crate::config::StoreBackend::Postgres => {
                let _ = (g, new_log);
                Err(Error::Config(
                    "[store] backend = \"postgres\": this build has no fleet store (build with --features postgres)"
                        .into(),
                ))
            }
        }
    }

    /// Where this configuration's store is, for messages and the audit trail:
    /// the file, and the fleet log's connection string (which never holds a password).
    pub fn store_description(&self) -> String {
        match (&self.store.backend, &self.store.url) {
            (crate::config::StoreBackend::Postgres, Some(url)) if !crate::config::url_has_password(url) => {
                format!("the fleet store at {} (log: {url})", self.store.path.display())
            }
            (crate::config::StoreBackend::Postgres, Some(_)) => {
                format!("the fleet store at {} (its url is not shown: it holds a password)", self.store.path.display())
            }
            _ => format!("the redb store at {}", self.store.path.display()),
        }
    }

    /// `tokenguard migrate --to`: copies this configuration's store into `to`'s new
    /// store — a redb file, or a copy that starts a fleet log in `to`'s database —
    /// and opens every record there under `to`'s roots before it says yes. The
    /// source's audit trail names the copy before it is made (and a refusal after
    /// it, best effort).
    ///
    /// The copy is a sealed backup held in memory (docs/FORMAT.md): the source's
    /// state is verified before it is read, the backup's MAC is checked under `to`'s
    /// roots before anything is written, and the records, keys, tombstones and audit
    /// chain arrive as the same bytes, so every AAD and rule holds unchanged. Nothing
    /// is left at `to`'s store path when the copy is refused. The source is left as
    /// it was, plus `migrate` events in its audit trail: stop writing to it, or the
    /// two stores part ways (the copy keeps the store id; a copy written to apart from
    /// its log is refused by the fleet, docs/FLEET-DESIGN.md).
    ///
    /// `unjoined`: the source is a fleet host's copy opened with a redb
    /// configuration, without its log — the way out when the fleet's log is lost. The
    /// copy may lack the fleet's newest writes (and revocations): the audit trails
    /// say so.
    pub fn migrate_to(&self, to: &Config, opts: GuardOptions, unjoined: bool) -> Result<(TokenGuard, Migration)> {
        let dest = &to.store.path;
        if dest.exists() {
            return Err(Error::StoreExists(dest.clone()));
        }
        crate::files::check_parent_dir(dest)?;
        let src = if unjoined {
            if self.store.backend != crate::config::StoreBackend::Redb {
                return Err(Error::InvalidInput(
                    "--unjoined-copy takes a configuration with backend = \"redb\" whose path is the fleet host's \
                     copy"
                        .into(),
                ));
            }
            let g = TokenGuard::open(
                &self.store.path,
                self.store_options(),
                self.build_roots(RootUse::Open)?,
                opts.clone(),
            )?;
            g.use_unjoined_copy()?;
            tracing::warn!("migrating a fleet host's copy without its log: it may lack the fleet's newest writes");
            g
        } else {
            self.open_guard_with(opts.clone())?
        };
        let (bytes, summary) = backup::export(&src)?;
        let before = src.open_every_record()?;
        if !before.bad.is_empty() {
            return Err(Error::integrity("migrating a store with records that do not open (see `tokenguard doctor`)"));
        }
        // The source's trail says where its tokens went before anything is made
        // there: a copy never exists that the source's audit trail does not name.
        let to_desc = to.store_description();
        let caveat = if unjoined { " (an unjoined fleet copy: it may lack the fleet's newest writes)" } else { "" };
        src.store()
            .write(|txn| src.audit_in(txn, "migrate", format!("{} tokens to {to_desc}{caveat}", summary.tokens)))?;
        let refused = |why: &Error| {
            let note = format!("not completed: {why}");
            if let Err(e) = src.store().write(|txn| src.audit_in(txn, "migrate", note.clone())) {
                tracing::error!(error = %e, "the source's audit trail could not record the refused migration");
            }
        };
        let roots = match to.build_roots(RootUse::Open) {
            Ok(r) => r,
            Err(e) => {
                refused(&e);
                return Err(e);
            }
        };
        let from = format!("{}{caveat}", self.store_description());
        let (dst, _) = match backup::restore_bytes(&bytes, ("migrate", &from), dest, to.store_options(), roots, opts) {
            Ok(x) => x,
            Err(e) => {
                refused(&e);
                return Err(e);
            }
        };
        drop(bytes);
        // Every record opened before the copy starts a log: a refused copy leaves the
        // database as it was.
        let checked = dst.open_every_record().and_then(|scan| to.with_log(&dst, true).map(|()| scan));
        let after = match checked {
            Ok(scan) if scan.bad.is_empty() && scan.records == before.records && scan.shredded == before.shredded => {
                scan
            }
            other => {
                // Nothing half-made stays behind: the copy is this call's own file.
                drop(dst);
                let removed = std::fs::remove_file(dest);
                let why = match other {
                    Err(e) => e,
                    Ok(scan) => Error::integrity(if scan.bad.is_empty() {
                        "migrating: the copy holds another number of records than the source"
                    } else {
                        "migrating: records of the copy do not open under the destination's roots"
                    }),
                };
                if let Err(e) = removed {
                    tracing::error!(path = %dest.display(), error = %e, "the refused copy could not be removed");
                }
                refused(&why);
                return Err(why);
            }
        };
        Ok((dst, Migration { summary, records_opened: after.records - after.shredded, shredded: after.shredded }))
    }

    /// Creates the configured store (and root keys that do not exist yet).
    pub fn init_guard(&self) -> Result<TokenGuard> {
        self.init_guard_with(self.guard_options())
    }

    /// As [`Config::init_guard`], with `opts`.
    pub fn init_guard_with(&self, opts: GuardOptions) -> Result<TokenGuard> {
        if self.store.path.exists() {
            return Err(Error::StoreExists(self.store.path.clone()));
        }
        let roots = self.build_roots(RootUse::Init)?;
        let g = TokenGuard::create(&self.store.path, self.store_options(), roots, opts)?;
        // The first host starts the log at its new store. Refused (the database
        // holds another store's log, or is down), the new file stays: the next
        // command joins it once the configuration is right, or the fleet's own
        // store file is copied over it.
        self.join_fleet(&g)?;
        Ok(g)
    }

    /// Restores the backup at `file` into the configured (new) store.
    pub fn restore_guard(&self, file: &Path, opts: GuardOptions) -> Result<(TokenGuard, BackupSummary)> {
        if self.store.backend != crate::config::StoreBackend::Redb {
            return Err(Error::Config(
                "restore into a fleet store is not supported yet: restore into a redb store, then make it the \
                 fleet's first host (docs/FLEET-DESIGN.md)"
                    .into(),
            ));
        }
        let roots = self.build_roots(RootUse::Open)?;
        backup::restore(file, &self.store.path, self.store_options(), roots, opts)
    }

    /// The built-in OAuth client of `provider`, with its client secret read (sealed)
    /// from the guard.
    pub fn oauth_client(&self, g: &TokenGuard, provider: &str) -> Result<Option<OAuthClient>> {
        let Some(p) = self.providers.get(provider) else { return Ok(None) };
        let secret = match g.get(CLIENT_SECRET_PROVIDER, provider) {
            Ok(s) => s.field(None).map(SecretBytes::duplicate),
            Err(Error::NotFound { .. }) => None,
            Err(e) => return Err(e),
        };
        OAuthClient::new(p.clone(), secret).map(Some)
    }

    /// Installs the refresh policy and an OAuth refresher per `[providers]` entry.
    pub fn install_refreshers(&self, g: &TokenGuard) -> Result<()> {
        g.set_refresh_policy(self.refresh_policy());
        for name in self.providers.keys() {
            if let Some(c) = self.oauth_client(g, name)? {
                g.set_refresher(name, Arc::new(c));
            }
        }
        Ok(())
    }

    /// Pins the single root described in `root_file` (a file of one `[[roots]]`
    /// entry; its key is created when missing) in `g`'s store.
    pub fn add_root_from_file(&self, g: &TokenGuard, root_file: &Path) -> Result<RootPin> {
        let f = RootsFile::load(root_file)?;
        let [entry] = f.roots.as_slice() else {
            return Err(Error::Config(format!("{} must hold exactly one [[roots]] entry", root_file.display())));
        };
        let base = root_file.parent().unwrap_or(Path::new(""));
        // An added root is often an offline recovery key file: a soft root is
        // accepted here whatever require_hardware says of the roots that open.
        let root = build_root(entry, base, RootUse::Init, false, &self.recovered_identities)?;
        g.add_root(root)
    }

    /// Generates a new key beside the first (PKCS#11) root's key in the same token,
    /// labelled `new_label` (default: the old label with `.rN`), and pins it. The old
    /// root stays pinned until `root remove`.
    #[cfg(feature = "pkcs11")]
    pub fn rotate_root(&self, g: &TokenGuard, new_label: Option<String>) -> Result<RootRotation> {
        let Some(RootConfig::Pkcs11(p)) = self.roots.first() else {
            return Err(Error::Config("rotate-root works on a pkcs11 first root; use `root add` for others".into()));
        };
        let mut settings = crate::root::pkcs11::Pkcs11Settings::from_config(p, &self.base_dir)?;
        let label = new_label.unwrap_or_else(|| format!("{}.r{}", settings.key_label, g.roots().len() + 1));
        settings.key_label = label.clone();
        settings.key_id = None;
        let added = g.add_root(Box::new(crate::root::pkcs11::Pkcs11Root::connect(settings, true)?))?;
        let old = g.roots().iter().map(|r| r.root_id.to_string()).collect::<Vec<_>>().join(" ");
        let next = format!(
            "new root key {label:?} pinned as root {}. Next: set key_label = \"{label}\" in the config (and restart services), then `tokenguard root remove {old}` to retire the old key",
            added.root_id
        );
        Ok(RootRotation { added, label, next })
    }

    /// Root rotation needs the PKCS#11 backend, which this build lacks.
    #[cfg(not(feature = "pkcs11"))]
    pub fn rotate_root(&self, _g: &TokenGuard, _new_label: Option<String>) -> Result<RootRotation> {
        Err(Error::BackendNotCompiled("pkcs11"))
    }

    /// Revokes `target` in the store. For one token whose provider has a
    /// `revocation_url` (RFC 7009), the provider is told first, while the token is
    /// still readable; its answer never stops the local revocation.
    pub fn revoke(&self, g: &TokenGuard, target: RevokeTarget<'_>, reason: &str) -> Result<Revocation> {
        // Nothing is revoked upstream for a revocation the store would refuse.
        crate::guard::revoke::check_reason(reason)?;
        let upstream = match &target {
            RevokeTarget::One { provider, name } => self.revoke_upstream(g, provider, name)?,
            _ => None,
        };
        let revoked = g.revoke(target, reason)?;
        Ok(Revocation { revoked, upstream })
    }

    fn revoke_upstream(&self, g: &TokenGuard, provider: &str, name: &str) -> Result<Option<Upstream>> {
        let Some(client) = self.oauth_client(g, provider)? else { return Ok(None) };
        let Ok((secret, _)) = g.get_with(provider, name, GetOptions { allow_expired: true }) else {
            return Ok(None);
        };
        let (token, hint) = match secret.field(Some("refresh_token")) {
            Some(rt) => (rt, "refresh_token"),
            None => (secret.field(None).ok_or_else(|| Error::InvalidInput("empty token".into()))?, "access_token"),
        };
        let outcome = match client.revoke(token, hint) {
            Ok(true) => UpstreamOutcome::Accepted,
            Ok(false) => UpstreamOutcome::Refused,
            Err(e) => UpstreamOutcome::Failed(e.to_string()),
        };
        Ok(Some(Upstream { hint, outcome }))
    }
}

/// What [`Config::rotate_root`] did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RootRotation {
    /// The new root.
    pub added: RootPin,
    /// Its key label.
    pub label: String,
    /// What the operator does next.
    pub next: String,
}

/// What [`Config::revoke`] did.
#[derive(Debug, Clone)]
pub struct Revocation {
    /// The (provider, name) pairs revoked in the store.
    pub revoked: Vec<(String, String)>,
    /// The provider's answer, when it was asked.
    pub upstream: Option<Upstream>,
}

/// The provider's answer to an RFC 7009 revocation.
#[derive(Debug, Clone)]
pub struct Upstream {
    /// Which token was sent (`refresh_token` or `access_token`).
    pub hint: &'static str,
    /// The answer.
    pub outcome: UpstreamOutcome,
}

/// How the provider answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamOutcome {
    /// The endpoint accepted the revocation.
    Accepted,
    /// It answered with an error status (or there is no endpoint).
    Refused,
    /// The request failed (network, TLS); the detail never holds the token.
    Failed(String),
}
