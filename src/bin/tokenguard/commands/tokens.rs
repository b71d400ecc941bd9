//! Tokens in and out: put, get, list, delete, status.

use std::io::{IsTerminal, Write};

use serde_json::json;
use tokenguard::error::exit;
use tokenguard::guard::revoke::TokenStatus;
use tokenguard::{Error, GetOptions, Result};

use super::{Ctx, fmt_time, print_json, stdout_error};
use crate::cli::{GetArgs, PutArgs};
use crate::input;

pub fn put(ctx: &Ctx, a: PutArgs) -> Result<i32> {
    tokenguard::guard::validate_ident("provider", &a.provider)?;
    tokenguard::guard::validate_ident("name", &a.name)?;
    let labels = input::parse_labels(&a.labels)?;
    let raw = input::read_input(a.from_file.as_deref())?;
    let (secret, parsed) = input::parse_secret(raw, a.raw, a.keep_newline)?;
    let t = tokenguard::now();
    let expires_at = input::expiry(a.expires_in.as_deref(), a.expires_at.as_deref(), parsed.expires_in, t)?;
    let opts = input::put_options(labels, expires_at, parsed);
    let meta = ctx.open()?.put(&a.provider, &a.name, secret, opts)?;
    if ctx.json {
        print_json(&json!({"stored": {"provider": a.provider, "name": a.name, "meta": meta}}))?;
    }
    Ok(exit::OK)
}

pub fn get(ctx: &Ctx, a: GetArgs) -> Result<i32> {
    let g = ctx.open()?;
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
    if ctx.json {
        let text = value
            .expose_str()
            .ok_or_else(|| Error::InvalidInput("the secret is not UTF-8; use get without --json".into()))?;
        let v = zeroize::Zeroizing::new(
            json!({"provider": a.provider, "name": a.name, "field": a.field, "value": text, "meta": meta}).to_string(),
        );
        writeln!(out, "{}", v.as_str()).map_err(stdout_error)?;
    } else {
        out.write_all(value.expose()).map_err(stdout_error)?;
        if std::io::stdout().is_terminal() {
            writeln!(out).map_err(stdout_error)?;
        }
    }
    out.flush().map_err(stdout_error)?;
    Ok(exit::OK)
}

pub fn list(ctx: &Ctx, provider: Option<&str>) -> Result<i32> {
    let items = ctx.open()?.list(provider)?;
    if ctx.json {
        print_json(&serde_json::to_value(&items).unwrap_or_default())?;
        return Ok(exit::OK);
    }
    let mut out = std::io::stdout().lock();
    if items.is_empty() {
        writeln!(out, "no tokens").map_err(stdout_error)?;
    }
    for t in items {
        let labels: Vec<String> = t.meta.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        writeln!(
            out,
            "{}/{}\t{:?}\texpires {}{}\tdek v{}\t{}",
            t.provider,
            t.name,
            t.meta.state,
            fmt_time(t.meta.expires_at),
            if t.expired { " (EXPIRED)" } else { "" },
            t.dek_version,
            labels.join(",")
        )
        .map_err(stdout_error)?;
    }
    Ok(exit::OK)
}

pub fn delete(ctx: &Ctx, provider: &str, name: &str) -> Result<i32> {
    ctx.open()?.delete(provider, name)?;
    if ctx.json {
        print_json(&json!({"deleted": {"provider": provider, "name": name}}))?;
    }
    Ok(exit::OK)
}

pub fn status(ctx: &Ctx, provider: &str, name: &str) -> Result<i32> {
    let st = ctx.open()?.status(provider, name)?;
    let text = match &st {
        TokenStatus::Active { meta } => format!("active (expires {})", fmt_time(meta.expires_at)),
        TokenStatus::Expired { meta } => format!("expired at {}", fmt_time(meta.expires_at)),
        TokenStatus::NeedsReauth { .. } => "needs re-authorisation (the provider refused its refresh token)".into(),
        TokenStatus::Revoked { tombstone: t } => {
            format!("revoked at {} by {}: {}", fmt_time(Some(t.revoked_at)), t.actor, t.reason)
        }
        TokenStatus::Shredded { .. } => "shredded: its provider's data keys were destroyed".into(),
    };
    ctx.out(serde_json::to_value(&st).unwrap_or_default(), text)?;
    Ok(exit::OK)
}
