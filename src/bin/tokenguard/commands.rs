//! One function per command: load config, call the library, print the result.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;

use serde_json::json;
use tokenguard::config::{Config, RootUse};
use tokenguard::error::exit;
use tokenguard::root::Status;
use tokenguard::{Error, GetOptions, Result, TokenGuard, backup};

use crate::cli::{AuditCommand, Cli, Command, GetArgs, PutArgs, RootCommand};
use crate::input;
use tokenguard::guard::revoke::{PurgeOptions, RevokeTarget, TokenStatus};
use tokenguard::guard::rotate::ReencryptOptions;

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn load_config(path: Option<&PathBuf>) -> Result<Config> {
    let path = path.ok_or_else(|| {
        Error::Config(
            "no configuration: pass --config FILE or set TOKENGUARD_CONFIG (./softhsm-setup.sh prints one)".into(),
        )
    })?;
    let config = Config::load(path)?;
    apply_module_env(&config);
    Ok(config)
}

/// Sets the environment the PKCS#11 module needs (e.g. SOFTHSM2_CONF) before the
/// module is loaded.
#[allow(unsafe_code)]
fn apply_module_env(config: &Config) {
    for (k, v) in config.module_env() {
        // SAFETY: called from main's thread before any other thread exists (no
        // module is loaded yet, logging writes synchronously), so nothing reads the
        // environment concurrently.
        unsafe { std::env::set_var(k, v) };
    }
}

/// The audit actor of this CLI process: OS user (uid from /proc, name from the
/// environment when set) and pid.
fn actor() -> String {
    use std::os::unix::fs::MetadataExt;
    let uid = std::fs::metadata("/proc/self").map(|m| m.uid().to_string()).unwrap_or_else(|_| "?".into());
    let user = std::env::var("USER").or_else(|_| std::env::var("LOGNAME")).unwrap_or_default();
    format!("cli uid={uid}{}{} pid={}", if user.is_empty() { "" } else { " user=" }, user, std::process::id())
}

fn open(config: &Config) -> Result<TokenGuard> {
    let roots = config.build_roots(RootUse::Open)?;
    let mut opts = config.guard_options();
    opts.actor = actor();
    let g = TokenGuard::open(&config.store.path, config.store_options(), roots, opts)?;
    config.install_refreshers(&g)?;
    Ok(g)
}

fn print_json(v: &serde_json::Value) -> Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{v}").map_err(|e| Error::Io { operation: "writing", path: "stdout".into(), source: e })
}

/// Runs the command; returns the exit code on success paths that are not 0.
pub fn run(cli: Cli) -> Result<i32> {
    let json = cli.json;
    if let Command::InitToken(a) = &cli.command {
        return init_token(a);
    }
    let config = load_config(cli.config.as_ref())?;
    match cli.command {
        Command::InitToken(a) => init_token(&a),
        Command::Init => init(&config, json),
        Command::Put(a) => put(&config, a, json),
        Command::Get(a) => get(&config, a, json),
        Command::List { provider } => list(&config, provider.as_deref(), json),
        Command::Delete { provider, name } => {
            open(&config)?.delete(&provider, &name)?;
            if json {
                print_json(&json!({"deleted": {"provider": provider, "name": name}}))?;
            }
            Ok(exit::OK)
        }
        Command::Doctor => doctor(&config, json),
        c @ (Command::Status { .. }
        | Command::Revoke(_)
        | Command::Expiring { .. }
        | Command::Purge { .. }
        | Command::RotateDek { .. }
        | Command::Reencrypt { .. }
        | Command::Retire { .. }
        | Command::Shred { .. }
        | Command::RotateRoot { .. }
        | Command::Root(_)) => lifecycle(&config, c, json),
        Command::Refresh(a) => refresh(&config, a, json),
        Command::Stats => {
            let s = open(&config)?.stats()?;
            if json {
                print_json(&serde_json::to_value(&s).unwrap_or_default())?;
            } else {
                println!("tokens: {}", s.tokens);
                for (p, states) in &s.states_per_provider {
                    let n = s.tokens_per_provider.get(p).copied().unwrap_or(0);
                    let detail: Vec<String> = states.iter().map(|(k, v)| format!("{k} {v}")).collect();
                    println!("  {p}: {n} stored ({})", detail.join(", "));
                }
                println!("DEK versions:");
                for d in &s.deks {
                    println!(
                        "  {} v{} {:?}: {} records, {} encryptions",
                        d.provider, d.version, d.state, d.records, d.encryptions
                    );
                }
                println!(
                    "hardware calls (this process): {} unwraps, {} wraps, {} generates",
                    s.hardware.unwraps, s.hardware.wraps, s.hardware.generates
                );
                println!("audit events: {}", s.audit_events);
            }
            Ok(exit::OK)
        }
        Command::Backup { file } => {
            let g = open(&config)?;
            let s = backup::write_backup(&g, &file)?;
            if json {
                print_json(&json!({"backup": file, "summary": s}))?;
            } else {
                println!(
                    "wrote {} ({} tokens, {} DEK versions, {} audit events)",
                    file.display(),
                    s.tokens,
                    s.deks,
                    s.audit_events
                );
            }
            Ok(exit::OK)
        }
        Command::Restore { file } => {
            let roots = config.build_roots(RootUse::Open)?;
            let mut opts = config.guard_options();
            opts.actor = actor();
            let (_, s) = backup::restore(&file, &config.store.path, config.store_options(), roots, opts)?;
            if json {
                print_json(&json!({"restored": config.store.path, "summary": s}))?;
            } else {
                println!("restored {} tokens into {}", s.tokens, config.store.path.display());
            }
            Ok(exit::OK)
        }
        Command::Audit(AuditCommand::Verify) => {
            let r = open(&config)?.audit_verify()?;
            if json {
                print_json(&serde_json::to_value(&r).unwrap_or_default())?;
            }
            match r.first_bad {
                None => {
                    if !json {
                        println!("audit chain intact: {} events verified", r.events);
                    }
                    Ok(exit::OK)
                }
                Some((seq, why)) => {
                    eprintln!("error: audit chain broken at event {seq}: {why}");
                    Ok(exit::INTEGRITY)
                }
            }
        }
        Command::Audit(AuditCommand::Export) => {
            for e in open(&config)?.audit_list(1)? {
                print_json(&serde_json::to_value(&e).unwrap_or_default())?;
            }
            Ok(exit::OK)
        }
        Command::Audit(AuditCommand::List { since, provider }) => {
            let from = since.as_deref().map(|s| input::time_or_ago(s, now())).transpose()?.unwrap_or(0);
            let events: Vec<_> = open(&config)?
                .audit_list(1)?
                .into_iter()
                .filter(|e| e.time >= from && provider.as_deref().is_none_or(|p| p == e.provider))
                .collect();
            if json {
                for e in &events {
                    print_json(&serde_json::to_value(e).unwrap_or_default())?;
                }
            } else {
                for e in &events {
                    println!(
                        "{:>6} {} {:<10} {}/{} {} [{}] {}",
                        e.seq,
                        humantime::format_rfc3339_seconds(
                            std::time::UNIX_EPOCH + std::time::Duration::from_secs(e.time)
                        ),
                        e.op,
                        e.provider,
                        e.name,
                        e.outcome,
                        e.actor,
                        e.detail
                    );
                }
            }
            Ok(exit::OK)
        }
    }
}

#[cfg(feature = "pkcs11")]
fn init_token(a: &crate::cli::InitTokenArgs) -> Result<i32> {
    let here = std::path::Path::new(".");
    let so = tokenguard::config::resolve_pin(&a.so_pin_source, here)?;
    let user = tokenguard::config::resolve_pin(&a.pin_source, here)?;
    let serial = tokenguard::root::pkcs11::init_token(&a.module, &a.label, &so, &user)?;
    println!("token {:?} ready (serial {serial})", a.label);
    Ok(exit::OK)
}

#[cfg(not(feature = "pkcs11"))]
fn init_token(_a: &crate::cli::InitTokenArgs) -> Result<i32> {
    Err(Error::BackendNotCompiled("pkcs11"))
}

fn lifecycle(config: &Config, command: Command, json: bool) -> Result<i32> {
    let g = open(config)?;
    let out = |v: serde_json::Value, text: String| -> Result<()> {
        if json {
            print_json(&v)
        } else {
            println!("{text}");
            Ok(())
        }
    };
    match command {
        Command::Status { provider, name } => {
            let st = g.status(&provider, &name)?;
            let v = serde_json::to_value(&st).unwrap_or_default();
            let text = match &st {
                TokenStatus::Active { meta } => format!("active (expires {})", fmt_time(meta.expires_at)),
                TokenStatus::Expired { meta } => format!("expired at {}", fmt_time(meta.expires_at)),
                TokenStatus::NeedsReauth { .. } => {
                    "needs re-authorisation (the provider refused its refresh token)".into()
                }
                TokenStatus::Revoked { tombstone: t } => {
                    format!("revoked at {} by {}: {}", fmt_time(Some(t.revoked_at)), t.actor, t.reason)
                }
                TokenStatus::Shredded { .. } => "shredded: its provider's data keys were destroyed".into(),
            };
            out(v, text)?;
        }
        Command::Revoke(a) => {
            let target = match (&a.provider, &a.name, a.all, &a.label) {
                (Some(p), Some(n), false, None) => RevokeTarget::One { provider: p, name: n },
                (Some(p), None, true, None) => RevokeTarget::Provider(p),
                (None, None, false, Some(l)) => {
                    let (k, v) = l
                        .split_once('=')
                        .ok_or_else(|| Error::InvalidInput(format!("--label must be KEY=VALUE (got {l:?})")))?;
                    RevokeTarget::Label { key: k, value: v }
                }
                _ => {
                    return Err(Error::InvalidInput(
                        "revoke takes PROVIDER NAME, or PROVIDER --all, or --label KEY=VALUE".into(),
                    ));
                }
            };
            // RFC 7009: tell the provider first, while the token is still readable.
            if let RevokeTarget::One { provider, name } = &target
                && let Some(client) = config.oauth_client(&g, provider)?
                && let Ok(secret) =
                    g.get_with(provider, name, tokenguard::GetOptions { allow_expired: true }).map(|(s, _)| s)
            {
                let (tok, hint) = match secret.field(Some("refresh_token")) {
                    Some(rt) => (rt, "refresh_token"),
                    None => {
                        (secret.field(None).ok_or_else(|| Error::InvalidInput("empty token".into()))?, "access_token")
                    }
                };
                match client.revoke(tok, hint) {
                    Ok(true) => eprintln!("provider revocation endpoint accepted the {hint}"),
                    Ok(false) => {
                        eprintln!("warning: provider revocation endpoint refused the {hint}; revoking locally anyway")
                    }
                    Err(e) => eprintln!("warning: provider revocation failed ({e}); revoking locally anyway"),
                }
            }
            let done = g.revoke(target, &a.reason)?;
            let text = done.iter().map(|(p, n)| format!("revoked {p}/{n}")).collect::<Vec<_>>().join("\n");
            out(json!({"revoked": done}), if text.is_empty() { "nothing matched".into() } else { text })?;
        }
        Command::Expiring { within } => {
            let d = input::duration(&within)?;
            let list = g.expiring(d)?;
            let text = list
                .iter()
                .map(|(p, n, t)| {
                    format!("{p}/{n}\t{}{}", fmt_time(Some(*t)), if *t <= now() { " (EXPIRED)" } else { "" })
                })
                .collect::<Vec<_>>()
                .join("\n");
            let v = list.iter().map(|(p, n, t)| json!({"provider": p, "name": n, "expires_at": t})).collect::<Vec<_>>();
            out(json!(v), if text.is_empty() { "nothing expires in that window".into() } else { text })?;
        }
        Command::Purge { expired, revoked, older_than } => {
            if !expired && !revoked {
                return Err(Error::InvalidInput("purge needs --expired and/or --revoked".into()));
            }
            let older_than = older_than.as_deref().map(input::duration).transpose()?.unwrap_or(0);
            let r = g.purge(PurgeOptions { expired, revoked, older_than })?;
            out(json!(r), format!("purged {} expired tokens and {} tombstones", r.expired, r.tombstones))?;
        }
        Command::RotateDek { provider } => {
            let v = g.rotate_dek(&provider)?;
            out(
                json!({"provider": provider, "version": v}),
                format!(
                    "{provider}: new writes use DEK version {v}; run `tokenguard reencrypt {provider}` to move existing records"
                ),
            )?;
        }
        Command::Reencrypt { provider, batch_size, rate, dry_run } => {
            let bar = (!json && std::io::stderr().is_terminal()).then(|| {
                let b = indicatif::ProgressBar::new(0);
                b.set_style(
                    indicatif::ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} ({per_sec}, eta {eta})")
                        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
                );
                b
            });
            let opts = ReencryptOptions { batch_size, max_per_second: rate, dry_run };
            let reports = g.reencrypt(provider.as_deref(), opts, |p, done, total| {
                if let Some(b) = &bar {
                    b.set_message(p.to_string());
                    b.set_length(total);
                    b.set_position(done);
                }
            })?;
            if let Some(b) = bar {
                b.finish_and_clear();
            }
            let text = reports
                .iter()
                .map(|r| {
                    if dry_run {
                        format!("{}: {} records would move to version {}", r.provider, r.pending, r.target_version)
                    } else {
                        format!(
                            "{}: moved {} records to version {} in {} batches",
                            r.provider, r.moved, r.target_version, r.batches
                        )
                    }
                })
                .collect::<Vec<_>>()
                .join("\n");
            out(json!(reports), if text.is_empty() { "no provider has data keys yet".into() } else { text })?;
        }
        Command::Retire { provider, below } => {
            let v = g.retire(&provider, below)?;
            out(
                json!({"provider": provider, "retired": v}),
                format!("{provider}: retired versions {v:?}; their key material is erased"),
            )?;
        }
        Command::Shred { provider, yes } => {
            if !yes {
                if !std::io::stdin().is_terminal() {
                    return Err(Error::InvalidInput("shred destroys keys for good: pass --yes in scripts".into()));
                }
                eprint!(
                    "Destroy every data key of {provider}? Its tokens become unrecoverable. Type the provider name to confirm: "
                );
                let mut line = String::new();
                std::io::stdin()
                    .read_line(&mut line)
                    .map_err(|e| Error::InvalidInput(format!("reading confirmation: {e}")))?;
                if line.trim() != provider {
                    return Err(Error::InvalidInput("not confirmed; nothing was destroyed".into()));
                }
            }
            let v = g.shred(&provider)?;
            out(
                json!({"provider": provider, "destroyed": v}),
                format!("{provider}: destroyed data key versions {v:?}"),
            )?;
        }
        Command::Root(RootCommand::List) => {
            let pins = g.pinned_roots()?;
            let text = pins.iter().map(|p| format!("{}\t{}", p.root_id, p.description)).collect::<Vec<_>>().join("\n");
            out(json!(pins), text)?;
        }
        Command::Root(RootCommand::Add { root_config }) => {
            let text = std::fs::read_to_string(&root_config)
                .map_err(|e| Error::Config(format!("cannot read {}: {e}", root_config.display())))?;
            let base = root_config.parent().map(std::path::Path::to_path_buf).unwrap_or_default();
            let extra = Config::parse(&format!("[store]\npath = \"unused\"\n{text}"), &base)?;
            let mut roots = extra.build_roots(RootUse::Init)?;
            if roots.len() != 1 {
                return Err(Error::Config(format!("{} must hold exactly one [[roots]] entry", root_config.display())));
            }
            let pin = g.add_root(roots.remove(0))?;
            out(json!(pin), format!("added root {}: {}", pin.root_id, pin.description))?;
        }
        Command::Root(RootCommand::Remove { id }) => {
            let pin = g.remove_root(id)?;
            out(json!(pin), format!("removed root {}: {}", pin.root_id, pin.description))?;
        }
        Command::RotateRoot { new_key_label } => rotate_root(config, &g, new_key_label, json)?,
        _ => return Err(Error::InvalidInput("not a lifecycle command".into())),
    }
    Ok(exit::OK)
}

fn refresh(config: &Config, a: crate::cli::RefreshArgs, json: bool) -> Result<i32> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let g = open(config)?;
    let within = a.within.as_deref().map(input::duration).transpose()?.map(std::time::Duration::from_secs);
    let report = |outcomes: &[tokenguard::guard::refresh::RefreshOutcome]| -> Result<i32> {
        let mut code = exit::OK;
        for o in outcomes {
            if json {
                print_json(&serde_json::to_value(o).unwrap_or_default())?;
            } else {
                println!(
                    "{}/{}: {}{}",
                    o.provider,
                    o.name,
                    o.outcome,
                    if o.detail.is_empty() { String::new() } else { format!(" ({})", o.detail) }
                );
            }
            code = match (o.outcome.as_str(), code) {
                ("needs-reauth", exit::OK) => exit::EXPIRED,
                ("failed", _) => exit::OTHER,
                (_, c) => c,
            };
        }
        Ok(code)
    };
    match (&a.provider, &a.name, a.due, a.watch) {
        (Some(p), Some(n), false, false) => {
            let (_, o) = g.refresh_now(p, n)?;
            report(&[o])
        }
        (None, None, true, false) => report(&g.refresh_due(within)?),
        (None, None, false, true) => {
            let interval = std::time::Duration::from_secs(input::duration(&a.interval)?.max(1));
            let stop = Arc::new(AtomicBool::new(false));
            for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
                signal_hook::flag::register(sig, stop.clone()).map_err(|e| Error::Io {
                    operation: "installing a signal handler",
                    path: "-".into(),
                    source: e,
                })?;
            }
            tracing::info!(interval_s = interval.as_secs(), "refresh --watch started");
            let mut code = exit::OK;
            while !stop.load(Ordering::Relaxed) {
                // A pass refreshes token by token; a signal is only looked at between
                // tokens, so it never interrupts a refresh between answer and commit.
                code = code.max(report(&g.refresh_due(within)?)?);
                let until = std::time::Instant::now() + interval;
                while !stop.load(Ordering::Relaxed) && std::time::Instant::now() < until {
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
            }
            tracing::info!("refresh --watch stopped");
            Ok(code)
        }
        _ => Err(Error::InvalidInput("refresh takes PROVIDER NAME, or --due, or --watch".into())),
    }
}

#[cfg(feature = "pkcs11")]
fn rotate_root(config: &Config, g: &TokenGuard, new_label: Option<String>, json: bool) -> Result<()> {
    use tokenguard::config::RootConfig;
    let Some(RootConfig::Pkcs11(p)) = config.roots.first() else {
        return Err(Error::Config("rotate-root works on a pkcs11 first root; use `root add` for others".into()));
    };
    let mut settings = config.pkcs11_settings(p)?;
    let label = new_label.unwrap_or_else(|| {
        let pins = g.roots().len();
        format!("{}.r{}", settings.key_label, pins + 1)
    });
    settings.key_label = label.clone();
    settings.key_id = None;
    let root = tokenguard::root::pkcs11::Pkcs11Root::open_or_generate(settings)?;
    let pin = g.add_root(Box::new(root))?;
    let old: Vec<String> = g.roots().iter().map(|r| r.root_id.to_string()).collect();
    let next = format!(
        "new root key {label:?} pinned as root {}. Next: set key_label = \"{label}\" in the config (and restart services), then `tokenguard root remove {}` to retire the old key",
        pin.root_id,
        old.join(" ")
    );
    if json {
        print_json(&json!({"added": pin, "next": next}))
    } else {
        println!("{next}");
        Ok(())
    }
}

#[cfg(not(feature = "pkcs11"))]
fn rotate_root(_c: &Config, _g: &TokenGuard, _l: Option<String>, _json: bool) -> Result<()> {
    Err(Error::BackendNotCompiled("pkcs11"))
}

fn fmt_time(t: Option<u64>) -> String {
    match t {
        Some(t) => {
            humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_secs(t)).to_string()
        }
        None => "never".into(),
    }
}

fn init(config: &Config, json: bool) -> Result<i32> {
    if config.store.path.exists() {
        return Err(Error::StoreExists(config.store.path.clone()));
    }
    let roots = config.build_roots(RootUse::Init)?;
    let mut opts = config.guard_options();
    opts.actor = actor();
    let g = TokenGuard::create(&config.store.path, config.store_options(), roots, opts)?;
    if json {
        print_json(&json!({"store": g.path(), "roots": g.roots()}))?;
    } else {
        println!("created store {}", g.path().display());
        for r in g.roots() {
            println!("  root {}: {}", r.root_id, r.description);
        }
    }
    Ok(exit::OK)
}

fn put(config: &Config, a: PutArgs, json: bool) -> Result<i32> {
    tokenguard::guard::validate_ident("provider", &a.provider)?;
    tokenguard::guard::validate_ident("name", &a.name)?;
    let labels = input::parse_labels(&a.labels)?;
    let raw = input::read_input(a.from_file.as_deref())?;
    let (secret, parsed) = input::parse_secret(raw, a.raw, a.keep_newline)?;
    let t = now();
    let expires_at = input::expiry(a.expires_in.as_deref(), a.expires_at.as_deref(), parsed.expires_in, t)?;
    let opts = input::put_options(labels, expires_at, parsed);
    let g = open(config)?;
    let meta = g.put(&a.provider, &a.name, secret, opts)?;
    if json {
        print_json(&json!({"stored": {"provider": a.provider, "name": a.name, "meta": meta}}))?;
    }
    Ok(exit::OK)
}

fn get(config: &Config, a: GetArgs, json: bool) -> Result<i32> {
    let g = open(config)?;
    let res = g.get_with(&a.provider, &a.name, GetOptions { allow_expired: a.allow_expired });
    let outcome = match &res {
        Ok(_) => "ok",
        Err(e) => match e.exit_code() {
            exit::NOT_FOUND => "not-found",
            exit::INTEGRITY => "integrity-failure",
            exit::EXPIRED => "expired-or-revoked",
            _ => "error",
        },
    };
    // Reads through the CLI are audited (one commit per process is cheap next to the
    // process start); a failure to audit does not hide the read's own error.
    let audited = g.audit_event("get", &a.provider, &a.name, outcome);
    let (secret, meta) = res?;
    audited?;
    let value = secret.field(a.field.as_deref()).ok_or_else(|| Error::NoSuchField {
        provider: a.provider.clone(),
        name: a.name.clone(),
        field: a.field.clone().unwrap_or_else(|| "access_token".into()),
    })?;
    let mut out = std::io::stdout().lock();
    let w = |e| Error::Io { operation: "writing", path: "stdout".into(), source: e };
    if json {
        let text = value
            .expose_str()
            .ok_or_else(|| Error::InvalidInput("the secret is not UTF-8; use get without --json".into()))?;
        let v = zeroize::Zeroizing::new(
            json!({"provider": a.provider, "name": a.name, "field": a.field, "value": text, "meta": meta}).to_string(),
        );
        writeln!(out, "{}", v.as_str()).map_err(w)?;
    } else {
        out.write_all(value.expose()).map_err(w)?;
        if std::io::stdout().is_terminal() {
            writeln!(out).map_err(w)?;
        }
    }
    out.flush().map_err(w)?;
    Ok(exit::OK)
}

fn list(config: &Config, provider: Option<&str>, json: bool) -> Result<i32> {
    let items = open(config)?.list(provider)?;
    if json {
        print_json(&serde_json::to_value(&items).unwrap_or_default())?;
        return Ok(exit::OK);
    }
    if items.is_empty() {
        println!("no tokens");
    }
    for t in items {
        let exp = match t.meta.expires_at {
            Some(e) => {
                humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_secs(e)).to_string()
            }
            None => "never".into(),
        };
        let labels: Vec<String> = t.meta.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!(
            "{}/{}\t{:?}\texpires {}{}\tdek v{}\t{}",
            t.provider,
            t.name,
            t.meta.state,
            exp,
            if t.expired { " (EXPIRED)" } else { "" },
            t.dek_version,
            labels.join(",")
        );
    }
    Ok(exit::OK)
}

fn doctor(config: &Config, json: bool) -> Result<i32> {
    let mut checks = Vec::new();
    let mut code = exit::OK;
    if config.require_hardware {
        checks.push(tokenguard::root::Check::new("require_hardware", true, "soft roots are refused"));
    } else {
        checks.push(tokenguard::root::Check::warn(
            "require_hardware",
            "false: a soft (file) root would be accepted; set require_hardware = true in production",
        ));
    }
    match open(config) {
        Ok(g) => checks.extend(g.doctor()),
        Err(e) => {
            code = e.exit_code();
            let mut detail = e.to_string();
            if let Some(h) = e.hint() {
                detail.push_str("; ");
                detail.push_str(&h);
            }
            checks.push(tokenguard::root::Check::new("open store", false, detail));
        }
    }
    let failed = checks.iter().filter(|c| c.status == Status::Fail).count();
    if failed > 0 && code == exit::OK {
        code = exit::OTHER;
        if checks.iter().any(|c| {
            c.status == Status::Fail
                && (c.name.contains("integrity") || c.name.contains("audit") || c.name.contains("unwrap"))
        }) {
            code = exit::INTEGRITY;
        }
    }
    if json {
        print_json(&json!({"ok": failed == 0, "checks": checks}))?;
    } else {
        for c in &checks {
            let tag = match c.status {
                Status::Ok => "ok  ",
                Status::Warn => "warn",
                Status::Fail => "FAIL",
            };
            println!("{tag} {}: {}", c.name, c.detail);
        }
        println!(
            "{}",
            if failed == 0 { "doctor: no failures".to_string() } else { format!("doctor: {failed} check(s) failed") }
        );
    }
    Ok(code)
}
