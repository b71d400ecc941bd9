//! Operating the store: doctor, stats, backup, restore, audit.

use serde_json::json;
use tokenguard::error::exit;
use tokenguard::root::{Check, Status, report_exit_code};
use tokenguard::{Result, backup};

use super::{Ctx, fmt_time, print_json, printable};
use crate::cli::AuditCommand;
use crate::input;

pub fn doctor(ctx: &Ctx) -> Result<i32> {
    let mut checks = Vec::new();
    if ctx.config.require_hardware {
        checks.push(Check::pass("require_hardware", "soft roots are refused"));
    } else {
        checks.push(Check::warn(
            "require_hardware",
            "false: a soft (file) root would be accepted; set require_hardware = true in production",
        ));
    }
    if let Some(mut agent) = ctx.agent()? {
        // The agent holds the store: it runs the checks, and says how it audits reads.
        let remote: Vec<Check> = agent.call(tokenguard::agent::protocol::Request::new("doctor"))?;
        checks.extend(remote);
        return print_checks(ctx, &checks);
    }
    if let Some(a) = &ctx.config.agent {
        checks.push(Check::warn(
            "agent read audit",
            format!(
                "not checked: --direct bypasses the agent (configured read audit: {})",
                serde_json::to_value(a.read_audit)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default()
            ),
        ));
    }
    match ctx.open_for_inspection(false) {
        Ok(g) => checks.extend(g.doctor()),
        Err(e) => {
            let mut check = Check::error("open store", &e);
            if let Some(h) = e.hint() {
                check.detail.push_str("; ");
                check.detail.push_str(&h);
            }
            checks.push(check);
            #[cfg(feature = "pkcs11")]
            for file in tokenguard::root::pkcs11::softhsm_empty_token_files() {
                checks.push(Check::fail(
                    "SoftHSM2 token file",
                    tokenguard::root::FailureClass::Hardware,
                    format!(
                        "{} is empty: a process was killed while logging in; run ./softhsm-setup.sh --repair \
                         (it restores the copy it kept when it initialised the token)",
                        file.display()
                    ),
                ));
            }
        }
    }
    print_checks(ctx, &checks)
}

fn print_checks(ctx: &Ctx, checks: &[Check]) -> Result<i32> {
    let failed = checks.iter().filter(|c| c.status == Status::Fail).count();
    if ctx.json {
        print_json(&json!({"ok": failed == 0, "checks": checks}))?;
    } else {
        for c in checks {
            let tag = match c.status {
                Status::Ok => "ok  ",
                Status::Warn => "warn",
                Status::Fail => "FAIL",
            };
            say!("{tag} {}: {}", c.name, c.detail)?;
        }
        if failed == 0 {
            say!("doctor: no failures")?;
        } else {
            say!("doctor: {failed} check(s) failed")?;
        }
    }
    Ok(report_exit_code(checks))
}

pub fn stats(ctx: &Ctx) -> Result<i32> {
    if let Some(mut agent) = ctx.agent()? {
        let v: serde_json::Value = agent.call(tokenguard::agent::protocol::Request::new("stats"))?;
        if ctx.json {
            print_json(&v)?;
            return Ok(exit::OK);
        }
        let (s, a) = (&v["store"], &v["agent"]);
        say!("tokens: {}", s["tokens"])?;
        say!("DEK versions: {}", s["deks"].as_array().map_or(0, Vec::len))?;
        say!("audit events: {}", s["audit_events"])?;
        say!(
            "agent: up {} s, {} connections, {} requests served, {} refused, {} rate limited, read audit {}, {}",
            a["uptime_secs"],
            a["connections"],
            a["served"],
            a["refused"],
            a["rate_limited"],
            a["read_audit"].as_str().unwrap_or("?"),
            if a["locked"] == true { "LOCKED" } else { "unlocked" }
        )?;
        let gc = &a["audit_group_commit"];
        if let (Some(commits @ 1..), Some(events), Some(us)) =
            (gc["commits"].as_u64(), gc["events"].as_u64(), gc["commit_us"].as_u64())
        {
            say!(
                "agent audit writer: {commits} commits, {events} events ({:.1} per commit, largest {}), {:.0} µs per commit",
                events as f64 / commits as f64,
                gc["largest"],
                us as f64 / commits as f64
            )?;
        }
        return Ok(exit::OK);
    }
    let s = ctx.open_for_inspection(true)?.stats()?;
    if ctx.json {
        print_json(&serde_json::to_value(&s).unwrap_or_default())?;
        return Ok(exit::OK);
    }
    say!("tokens: {}", s.tokens)?;
    for (p, states) in &s.states_per_provider {
        let n = s.tokens_per_provider.get(p).copied().unwrap_or(0);
        let detail: Vec<String> = states.iter().map(|(k, v)| format!("{k} {v}")).collect();
        say!("  {p}: {n} stored ({})", detail.join(", "))?;
    }
    say!("DEK versions:")?;
    for d in &s.deks {
        say!("  {} v{} {}: {} records, {} encryptions", d.provider, d.version, d.state, d.records, d.encryptions)?;
    }
    say!(
        "hardware calls (this process): {} unwraps, {} wraps, {} generates",
        s.hardware.unwraps,
        s.hardware.wraps,
        s.hardware.generates
    )?;
    say!("audit events: {}", s.audit_events)?;
    Ok(exit::OK)
}

pub fn backup(ctx: &Ctx, file: &std::path::Path) -> Result<i32> {
    use std::io::{IsTerminal, Write};
    let g = ctx.open()?;
    if file == std::path::Path::new("-") {
        if std::io::stdout().is_terminal() {
            return Err(tokenguard::Error::InvalidInput(
                "a backup is binary: redirect stdout to a file (`backup - > FILE`), or name the file".into(),
            ));
        }
        let s = backup::write_backup_to(&g, &mut std::io::stdout().lock(), "stdout")?;
        std::io::stdout().flush().map_err(super::stdout_error)?;
        note!(
            "wrote a backup to stdout ({} tokens, {} DEK versions, {} audit events)",
            s.tokens,
            s.deks,
            s.audit_events
        );
        return Ok(exit::OK);
    }
    let s = backup::write_backup(&g, file)?;
    ctx.out(
        json!({"backup": file, "summary": s}),
        format!(
            "wrote {} ({} tokens, {} DEK versions, {} audit events)",
            file.display(),
            s.tokens,
            s.deks,
            s.audit_events
        ),
    )?;
    Ok(exit::OK)
}

pub fn restore(ctx: &Ctx, file: &std::path::Path) -> Result<i32> {
    let (g, s) = ctx.config.restore_guard(file, ctx.guard_options())?;
    // A backup from before a `root remove` pins the removed root again: say so.
    for p in g.unconfigured_roots()? {
        note!(
            "warning: the restored store pins root {} ({}), which is not configured here; if it was removed before, \
             run `tokenguard root remove {}` again",
            p.root_id,
            printable(&p.description),
            p.root_id
        );
    }
    let path = &ctx.config.store.path;
    ctx.out(json!({"restored": path, "summary": s}), format!("restored {} tokens into {}", s.tokens, path.display()))?;
    Ok(exit::OK)
}

pub fn migrate(ctx: &Ctx, to: &std::path::Path, unjoined: bool) -> Result<i32> {
    let mut dest = tokenguard::Config::load(to)?;
    // One-shot, as every CLI command: no fleet listener.
    dest.fleet_listener = false;
    let (g, m) = ctx.config.migrate_to(&dest, ctx.guard_options(), unjoined)?;
    drop(g);
    let s = &m.summary;
    let mut text = format!(
        "migrated {} tokens ({} DEK versions, {} tombstones, {} audit events) from {} to {}; all {} records open there",
        s.tokens,
        s.deks,
        s.tombstones,
        s.audit_events,
        ctx.config.store_description(),
        dest.store_description(),
        m.records_opened
    );
    if m.shredded > 0 {
        text.push_str(&format!(" ({} shredded records copied as they were)", m.shredded));
    }
    if unjoined {
        text.push_str(
            "\nwarning: the source was a fleet host's copy read without its log: it may lack the fleet's newest writes \
             and revocations",
        );
    }
    text.push_str(
        "\nthe source keeps its tokens (its audit trail records the copy): stop using it, or the two stores part ways",
    );
    ctx.out(json!({"migrated": m, "from": ctx.config.store_description(), "to": dest.store_description()}), text)?;
    Ok(exit::OK)
}

pub fn salvage(ctx: &Ctx, to: &std::path::Path, accept: bool) -> Result<i32> {
    let g = ctx.open_for_inspection(true)?;
    let state = g.state();
    if !state.verified && !accept {
        return Err(tokenguard::Error::Integrity {
            context: "salvaging a store whose rows do not match its authenticated state (the new store would vouch \
                      for them): investigate with `tokenguard doctor`, restore a backup, or pass \
                      --accept-current-state",
        });
    }
    let r = g.salvage(to, ctx.config.store_options())?;
    // The operator accepted the rows; the result is the salvage's own.
    ctx.degraded.set(false);
    let mut text = format!("saved {} of {} records into {}", r.saved, r.records, to.display());
    if !r.lost.is_empty() {
        text.push_str(&format!("\ncould not save (they do not verify): {}", r.lost.join(", ")));
    }
    if !r.audit_kept {
        text.push_str("\nthe audit chain did not verify: the new store's chain starts with the salvage");
    }
    ctx.out(serde_json::to_value(&r).unwrap_or_default(), text)?;
    Ok(if r.lost.is_empty() { exit::OK } else { exit::OTHER })
}

pub fn audit(ctx: &Ctx, command: AuditCommand) -> Result<i32> {
    // `verify` through the agent when there is one (it holds the store); `list` and
    // `export` read the store itself (`--direct`, with the agent stopped or locked).
    if matches!(command, AuditCommand::Verify)
        && let Some(mut agent) = ctx.agent()?
    {
        return verify_report(ctx, agent.call(tokenguard::agent::protocol::Request::new("audit_verify"))?);
    }
    let g = ctx.open_for_inspection(true)?;
    match command {
        AuditCommand::Verify => verify_report(ctx, g.audit_verify()?),
        AuditCommand::Export => {
            for e in g.audit_list(1)? {
                print_json(&serde_json::to_value(&e).unwrap_or_default())?;
            }
            Ok(exit::OK)
        }
        AuditCommand::List { since, provider } => {
            let from = since.as_deref().map(|s| input::time_or_ago(s, tokenguard::now())).transpose()?.unwrap_or(0);
            let events = g.audit_list(1)?;
            let events: Vec<_> = events
                .iter()
                .filter(|e| e.time >= from && provider.as_deref().is_none_or(|p| p == e.provider))
                .collect();
            if ctx.json {
                // A list is an array; `audit export` is the JSON-lines stream.
                print_json(&serde_json::to_value(&events).unwrap_or_default())?;
            } else {
                for e in events {
                    say!(
                        "{:>6} {} {:<10} {}/{} {} [{}] {}",
                        e.seq,
                        fmt_time(Some(e.time)),
                        printable(&e.op),
                        printable(&e.provider),
                        printable(&e.name),
                        printable(&e.outcome),
                        printable(&e.actor),
                        printable(&e.detail)
                    )?;
                }
            }
            Ok(exit::OK)
        }
    }
}

/// `upgrade`: adds the authenticated state head to a store made by tokenguard 0.1, or,
/// with `--accept-current-state`, accepts rows that do not match the head after an
/// investigation. Both are audited.
pub fn upgrade(ctx: &Ctx, accept: bool) -> Result<i32> {
    let g = ctx.open_for_inspection(false)?;
    let (before, after) = g.upgrade(accept)?;
    ctx.degraded.set(false);
    let text = if before.verified {
        format!("the store's state already verifies (generation {}); nothing to do", before.generation)
    } else {
        format!(
            "state head written over {} rows (generation {}); was: {}",
            after.rows,
            after.generation,
            before.problem.as_deref().unwrap_or("unverified")
        )
    };
    ctx.out(json!({"before": before, "after": after}), text)?;
    Ok(exit::OK)
}

/// `serve`: the agent, in the foreground, until SIGTERM.
pub fn serve(ctx: &Ctx) -> Result<i32> {
    tokenguard::agent::serve(ctx.config.clone(), &ctx.config_path, ctx.guard_options())?;
    Ok(exit::OK)
}

/// `lockdown` (`on`) and `unlock`: through the agent only.
pub fn lockdown(ctx: &Ctx, on: bool) -> Result<i32> {
    let what = if on { "lockdown" } else { "unlock" };
    let v: serde_json::Value = ctx.agent_required(what)?.call(tokenguard::agent::protocol::Request::new(what))?;
    let text = if on {
        "the agent dropped its keys and closed its hardware session; `tokenguard unlock` opens it again"
    } else {
        "the agent is unlocked"
    };
    if v["audited"] == false {
        note!("warning: the agent could not commit the audit event of this {what} (see its log)");
    }
    ctx.out(v, text)?;
    Ok(exit::OK)
}

/// Prints an audit verification; exit 4 when the chain is broken.
fn verify_report(ctx: &Ctx, r: tokenguard::audit::AuditReport) -> Result<i32> {
    if ctx.json {
        print_json(&serde_json::to_value(&r).unwrap_or_default())?;
    }
    match r.first_bad {
        None => {
            if !ctx.json {
                say!("audit chain intact: {} events verified", r.events)?;
            }
            Ok(exit::OK)
        }
        Some((seq, why)) => {
            note!("error: audit chain broken at event {seq}: {why}");
            Ok(exit::INTEGRITY)
        }
    }
}
