//! Lifecycle: revoke, expiring, purge, rotate-dek, reencrypt, retire, shred.

use std::io::IsTerminal;

use serde_json::json;
use tokenguard::compose::UpstreamOutcome;
use tokenguard::error::exit;
use tokenguard::guard::revoke::{PurgeOptions, RevokeTarget, TokenStatus};
use tokenguard::guard::rotate::ReencryptOptions;
use tokenguard::{Error, Result};

use super::{Ctx, fmt_time, printable};
use crate::cli::RevokeArgs;
use crate::input;

fn lines(items: impl IntoIterator<Item = String>, empty: &str) -> String {
    let text = items.into_iter().collect::<Vec<_>>().join("\n");
    if text.is_empty() { empty.into() } else { text }
}

pub fn revoke(ctx: &Ctx, a: RevokeArgs) -> Result<i32> {
    let one = match (&a.provider, &a.name, a.all, &a.label) {
        (Some(p), n, false, None) if n.is_some() || p.contains('/') => Some(input::token_ref(p, n.as_deref())?),
        _ => None,
    };
    let target = match (&one, &a.provider, &a.name, a.all, &a.label) {
        (Some((p, n)), ..) => RevokeTarget::One { provider: p, name: n },
        (None, Some(p), None, true, None) => RevokeTarget::Provider(p),
        (None, None, None, false, Some(l)) => {
            let (k, v) = l.split_once('=').ok_or_else(|| Error::InvalidInput("--label must be KEY=VALUE".into()))?;
            RevokeTarget::Label { key: k, value: v }
        }
        _ => {
            return Err(Error::InvalidInput(
                "revoke takes PROVIDER NAME (or PROVIDER/NAME), or PROVIDER --all, or --label KEY=VALUE".into(),
            ));
        }
    };
    if let Some(agent) = ctx.agent()? {
        return revoke_through(ctx, agent, &target, &a);
    }
    let g = ctx.open_for_inspection(true)?;
    let objects = |pairs: &[(String, String)]| -> serde_json::Value {
        pairs.iter().map(|(p, n)| json!({"provider": p, "name": n})).collect()
    };
    if let RevokeTarget::One { provider, name } = &target
        && let Ok(TokenStatus::Revoked { tombstone: t }) = g.status(provider, name)
    {
        let text = format!(
            "{provider}/{name}: already revoked at {} by {}: {}",
            fmt_time(Some(t.revoked_at)),
            t.actor,
            t.reason
        );
        ctx.out(json!({"revoked": [], "already_revoked": objects(&[(provider.to_string(), name.to_string())])}), text)?;
        return Ok(exit::OK);
    }
    if a.dry_run {
        let would = g.revoke_preview(&target)?;
        let text = lines(would.iter().map(|(p, n)| format!("would revoke {p}/{n}")), "nothing matches");
        ctx.out(json!({"would_revoke": objects(&would)}), text)?;
        return Ok(exit::OK);
    }
    let r = ctx.config.revoke(&g, target, &a.reason)?;
    if let Some(up) = &r.upstream {
        let hint = up.hint;
        match &up.outcome {
            UpstreamOutcome::Accepted => note!("provider revocation endpoint accepted the {hint}"),
            UpstreamOutcome::Refused => {
                note!("warning: provider revocation endpoint refused the {hint}; revoking locally anyway")
            }
            UpstreamOutcome::Failed(e) => note!("warning: provider revocation failed ({e}); revoking locally anyway"),
        }
    }
    let text = lines(r.revoked.iter().map(|(p, n)| format!("revoked {p}/{n}")), "nothing matched");
    ctx.out(json!({"revoked": objects(&r.revoked)}), text)?;
    Ok(exit::OK)
}

/// `revoke` of one token through the agent (which asks the provider too, as the
/// direct path does).
fn revoke_through(
    ctx: &Ctx,
    mut agent: tokenguard::agent::Client,
    target: &RevokeTarget<'_>,
    a: &RevokeArgs,
) -> Result<i32> {
    use tokenguard::agent::protocol::Request;
    let RevokeTarget::One { provider, name } = target else {
        return Err(Error::InvalidInput(
            "the agent revokes one token at a time; for --all or --label, stop the agent and pass --direct".into(),
        ));
    };
    let status: serde_json::Value = agent.call(Request::token("status", provider, name))?;
    if a.dry_run {
        let would =
            if status["status"] == "revoked" { vec![] } else { vec![json!({"provider": provider, "name": name})] };
        let text =
            if would.is_empty() { "nothing matches".to_string() } else { format!("would revoke {provider}/{name}") };
        ctx.out(json!({"would_revoke": would}), text)?;
        return Ok(exit::OK);
    }
    let mut r = Request::token("revoke", provider, name);
    r.reason = Some(a.reason.clone());
    let v: serde_json::Value = agent.call(r)?;
    if let Some(t) = v.get("tombstone") {
        let s = |k: &str| t[k].as_str().unwrap_or_default().to_string();
        let text = format!(
            "{provider}/{name}: already revoked at {} by {}: {}",
            fmt_time(t["revoked_at_unix"].as_u64()),
            printable(&s("actor")),
            printable(&s("reason"))
        );
        ctx.out(json!({"revoked": [], "already_revoked": v["already_revoked"]}), text)?;
        return Ok(exit::OK);
    }
    for n in v["notes"].as_array().into_iter().flatten() {
        note!("{}", printable(n.as_str().unwrap_or_default()));
    }
    let text = format!("revoked {provider}/{name}");
    ctx.out(json!({"revoked": v["revoked"]}), text)?;
    Ok(exit::OK)
}

pub fn expiring(ctx: &Ctx, within: &str) -> Result<i32> {
    let list = ctx.open()?.expiring(input::duration(within)?)?;
    let now = tokenguard::now();
    let text = lines(
        list.iter()
            .map(|(p, n, t)| format!("{p}/{n}\t{}{}", fmt_time(Some(*t)), if *t <= now { " (EXPIRED)" } else { "" })),
        "nothing expires in that window",
    );
    let v = list
        .iter()
        .map(|(p, n, t)| json!({"provider": p, "name": n, "expires_at": fmt_time(Some(*t)), "expires_at_unix": t}))
        .collect::<Vec<_>>();
    ctx.out(json!(v), text)?;
    Ok(exit::OK)
}

pub fn purge(ctx: &Ctx, expired: bool, revoked: bool, older_than: Option<String>, dry_run: bool) -> Result<i32> {
    if !expired && !revoked {
        return Err(Error::InvalidInput("purge needs --expired and/or --revoked".into()));
    }
    let older_than = older_than.as_deref().map(input::duration).transpose()?.unwrap_or(0);
    let opts = PurgeOptions { expired, revoked, older_than };
    let g = ctx.open()?;
    if dry_run {
        let r = g.purge_preview(opts)?;
        let text = format!("would purge {} expired tokens and {} tombstones", r.expired, r.tombstones);
        ctx.out(json!({"would_purge": r}), text)?;
        return Ok(exit::OK);
    }
    let r = g.purge(opts)?;
    ctx.out(json!(r), format!("purged {} expired tokens and {} tombstones", r.expired, r.tombstones))?;
    Ok(exit::OK)
}

pub fn rotate_dek(ctx: &Ctx, provider: &str) -> Result<i32> {
    let v = ctx.open()?.rotate_dek(provider)?;
    ctx.out(
        json!({"provider": provider, "version": v}),
        format!(
            "{provider}: new writes use DEK version {v}; run `tokenguard reencrypt {provider}` to move existing records"
        ),
    )?;
    Ok(exit::OK)
}

pub fn reencrypt(ctx: &Ctx, provider: Option<&str>, batch_size: u32, rate: Option<f64>, dry_run: bool) -> Result<i32> {
    let g = ctx.open()?;
    let bar = (!ctx.json && std::io::stderr().is_terminal()).then(|| {
        let b = indicatif::ProgressBar::new(0);
        b.set_style(
            indicatif::ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} ({per_sec}, eta {eta})")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b
    });
    let batch_size = usize::try_from(batch_size).unwrap_or(usize::MAX);
    let opts = ReencryptOptions { batch_size, max_per_second: rate, dry_run };
    let reports = g.reencrypt(provider, opts, |p, done, total| {
        if let Some(b) = &bar {
            b.set_message(p.to_string());
            b.set_length(total);
            b.set_position(done);
        }
    })?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let text = lines(
        reports.iter().map(|r| {
            if dry_run {
                format!("{}: {} records would move to version {}", r.provider, r.pending, r.target_version)
            } else if r.skipped.is_empty() {
                format!(
                    "{}: moved {} records to version {} in {} batches",
                    r.provider, r.moved, r.target_version, r.batches
                )
            } else {
                format!(
                    "{}: moved {} records to version {} in {} batches; left under their old version (they do not \
                     open, see `tokenguard doctor`): {}",
                    r.provider,
                    r.moved,
                    r.target_version,
                    r.batches,
                    r.skipped.join(", ")
                )
            }
        }),
        "no provider has data keys yet",
    );
    ctx.out(json!(reports), text)?;
    Ok(if reports.iter().any(|r| !r.skipped.is_empty()) { exit::INTEGRITY } else { exit::OK })
}

pub fn retire(ctx: &Ctx, provider: &str, below: u32) -> Result<i32> {
    let v = ctx.open()?.retire(provider, below)?;
    ctx.out(
        json!({"provider": provider, "retired": v}),
        format!("{provider}: retired versions {v:?}; their key material is erased"),
    )?;
    Ok(exit::OK)
}

pub fn shred(ctx: &Ctx, provider: &str, yes: bool) -> Result<i32> {
    let g = ctx.open_for_inspection(true)?;
    if !yes {
        if !std::io::stdin().is_terminal() {
            return Err(Error::InvalidInput("shred destroys keys for good: pass --yes in scripts".into()));
        }
        note_inline!(
            "Destroy every data key of {provider}? Its tokens become unrecoverable. Type the provider name to confirm: "
        );
        let mut line = String::new();
        std::io::stdin().read_line(&mut line).map_err(|e| Error::InvalidInput(format!("reading confirmation: {e}")))?;
        if line.trim() != provider {
            return Err(Error::InvalidInput("not confirmed; nothing was destroyed".into()));
        }
    }
    let v = g.shred(provider)?;
    ctx.out(json!({"provider": provider, "destroyed": v}), format!("{provider}: destroyed data key versions {v:?}"))?;
    Ok(exit::OK)
}
