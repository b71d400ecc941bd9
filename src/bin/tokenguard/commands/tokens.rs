//! Tokens in and out: put, get, list, delete, status.

use std::io::{IsTerminal, Write};

use serde_json::json;
use tokenguard::agent::protocol::{Request, WireSecret};
use tokenguard::error::exit;
use tokenguard::guard::revoke::TokenStatus;
use tokenguard::guard::validate_ident;
use tokenguard::{Error, GetOptions, Result};

use super::{Ctx, fmt_time, print_json, printable, read_audited, stdout_error};
use crate::cli::{GetArgs, PutArgs, TokenRef};
use crate::input;

pub fn put(ctx: &Ctx, a: PutArgs) -> Result<i32> {
    let (provider, name) = input::token_ref(&a.token.provider, a.token.name.as_deref())?;
    let labels = input::parse_labels(&a.labels)?;
    let raw = input::read_input(a.from_file.as_deref())?;
    let t = tokenguard::now();
    // A file's bytes are kept exactly; text on stdin loses one trailing newline.
    let strip = a.from_file.is_none() && !a.keep_newline;
    let (secret, parsed) = input::parse_secret(raw, a.raw, strip, t)?;
    let expires_at = input::expiry(a.expires_in.as_deref(), a.expires_at.as_deref(), parsed.expires_at, t)?;
    let opts = input::put_options(labels, expires_at, parsed);
    let stored = match ctx.agent()? {
        Some(mut agent) => {
            let mut r = Request::token("put", &provider, &name);
            match secret {
                tokenguard::Secret::Raw(v) => {
                    let w = WireSecret(v);
                    r.encoding = w.encoding();
                    r.value = Some(w);
                }
                tokenguard::Secret::TokenSet(set) => {
                    r.token_set = Some(
                        set.iter()
                            .map(|(k, v)| (k.to_string(), WireSecret(tokenguard::SecretBytes::from_slice(v.expose()))))
                            .collect(),
                    );
                }
            }
            r.expires_at = opts.expires_at;
            r.labels = opts.labels;
            r.scopes = opts.scopes;
            r.token_type = opts.token_type;
            r.overwrite = !a.no_overwrite;
            agent.call::<serde_json::Value>(r)?
        }
        None => {
            let (meta, replaced) = ctx.open()?.put_checked(&provider, &name, secret, opts, !a.no_overwrite)?;
            json!({"stored": {"provider": provider, "name": name, "replaced": replaced, "meta": meta}})
        }
    };
    if ctx.json {
        print_json(&stored)?;
    } else if stored["stored"]["replaced"] == json!(true) {
        note!("replaced the existing token {provider}/{name} (--no-overwrite refuses)");
    }
    Ok(exit::OK)
}

pub fn get(ctx: &Ctx, a: GetArgs) -> Result<i32> {
    let (provider, name) = input::token_ref(&a.token.provider, a.token.name.as_deref())?;
    let (value, meta) = match ctx.agent()? {
        Some(mut agent) => {
            // The metadata is printed only with --json.
            let got = if ctx.json {
                agent.get_with_meta(&provider, &name, a.field.as_deref(), a.allow_expired)?
            } else {
                agent.get(&provider, &name, a.field.as_deref(), a.allow_expired)?
            };
            let meta = got.meta.clone().unwrap_or_default();
            (got.secret()?, meta)
        }
        None => {
            let g = ctx.open()?;
            let opts = GetOptions { allow_expired: a.allow_expired };
            let (value, meta) = read_audited(&g, "get", &provider, &name, a.field.as_deref(), opts)?;
            (value, serde_json::to_value(&meta).unwrap_or_default())
        }
    };
    if let Some(path) = &a.output {
        write_private_file(path, value.expose())?;
        if ctx.json {
            print_json(&json!({"provider": provider, "name": name, "field": a.field, "written_to": path}))?;
        }
        return Ok(exit::OK);
    }
    let mut out = std::io::stdout().lock();
    if ctx.json {
        let text = value
            .expose_str()
            .ok_or_else(|| Error::InvalidInput("the secret is not UTF-8; use get without --json".into()))?;
        // Serialised straight from borrowed fields into one zeroizing buffer, sized so it
        // never grows (JSON escaping at most sextuples a byte): no plain copy of the
        // secret in a `serde_json::Value` or a reallocated buffer.
        #[derive(serde::Serialize)]
        struct Out<'a> {
            provider: &'a str,
            name: &'a str,
            field: Option<&'a str>,
            value: &'a str,
            meta: &'a serde_json::Value,
        }
        let mut v = zeroize::Zeroizing::new(Vec::with_capacity(text.len() * 6 + 4096));
        let o = Out { provider: &provider, name: &name, field: a.field.as_deref(), value: text, meta: &meta };
        serde_json::to_writer(&mut *v, &o).map_err(|e| Error::InvalidInput(format!("encoding JSON: {e}")))?;
        v.push(b'\n');
        out.write_all(&v).map_err(stdout_error)?;
    } else {
        out.write_all(value.expose()).map_err(stdout_error)?;
        if std::io::stdout().is_terminal() {
            writeln!(out).map_err(stdout_error)?;
        }
    }
    out.flush().map_err(stdout_error)?;
    Ok(exit::OK)
}

/// Writes a secret to a new file, mode 0600, never over an existing one.
fn write_private_file(path: &std::path::Path, data: &[u8]) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let io = |e| Error::Io { operation: "writing", path: path.into(), source: e };
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            Error::InvalidInput(format!("{} exists; --output never overwrites", path.display()))
        } else {
            io(e)
        }
    })?;
    f.write_all(data).and_then(|()| f.sync_all()).map_err(io)
}

pub fn list(ctx: &Ctx, provider: Option<&str>) -> Result<i32> {
    let (items, damaged) = match ctx.agent()? {
        Some(mut agent) => {
            let mut r = Request::new("list");
            r.provider = provider.map(str::to_string);
            let v: serde_json::Value = agent.call(r)?;
            let damaged =
                v["damaged"].as_array().map(|d| d.iter().filter_map(|x| x.as_str().map(str::to_string)).collect());
            (v["tokens"].clone(), damaged.unwrap_or_default())
        }
        None => {
            let report = ctx.open_for_inspection(true)?.list_report(provider)?;
            (serde_json::to_value(&report.tokens).unwrap_or_default(), report.damaged)
        }
    };
    if !damaged.is_empty() {
        // Listed without them; the exit code says something is wrong (finding 9).
        note!("warning: records that do not parse were left out: {} (see `tokenguard doctor`)", damaged.join(", "));
        ctx.degraded.set(true);
    }
    if ctx.json {
        print_json(&items)?;
        return Ok(exit::OK);
    }
    let items = items.as_array().cloned().unwrap_or_default();
    let mut out = std::io::stdout().lock();
    if items.is_empty() {
        writeln!(out, "no tokens").map_err(stdout_error)?;
    }
    let text = |v: &serde_json::Value| printable(v.as_str().unwrap_or_default()).into_owned();
    for t in items {
        let labels: Vec<String> = t["labels"]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| printable(&format!("{k}={}", v.as_str().unwrap_or_default())).into_owned())
                    .collect()
            })
            .unwrap_or_default();
        writeln!(
            out,
            "{}/{}\t{}\texpires {}\tdek v{}\t{}",
            text(&t["provider"]),
            text(&t["name"]),
            text(&t["status"]),
            fmt_time(t["expires_at_unix"].as_u64()),
            t["dek_version"].as_u64().unwrap_or_default(),
            labels.join(",")
        )
        .map_err(stdout_error)?;
    }
    Ok(exit::OK)
}

pub fn delete(ctx: &Ctx, token: &TokenRef, dry_run: bool) -> Result<i32> {
    let (provider, name) = input::token_ref(&token.provider, token.name.as_deref())?;
    if let Some(mut agent) = ctx.agent()? {
        if dry_run {
            let st: serde_json::Value = agent.call(Request::token("status", &provider, &name))?;
            if st["status"] == "revoked" {
                return Err(Error::NotFound { provider, name });
            }
            let text = format!("would delete {provider}/{name}");
            ctx.out(json!({"would_delete": {"provider": provider, "name": name}}), text)?;
            return Ok(exit::OK);
        }
        let v: serde_json::Value = agent.call(Request::token("delete", &provider, &name))?;
        if ctx.json {
            print_json(&v)?;
        }
        return Ok(exit::OK);
    }
    let g = ctx.open()?;
    if dry_run {
        // The token must exist as a record: a revoked one has only a tombstone.
        match g.status(&provider, &name)? {
            TokenStatus::Revoked { .. } => return Err(Error::NotFound { provider, name }),
            _ => {
                let text = format!("would delete {provider}/{name}");
                ctx.out(json!({"would_delete": {"provider": provider, "name": name}}), text)?;
                return Ok(exit::OK);
            }
        }
    }
    g.delete(&provider, &name)?;
    if ctx.json {
        print_json(&json!({"deleted": {"provider": provider, "name": name}}))?;
    }
    Ok(exit::OK)
}

pub fn status(ctx: &Ctx, token: &TokenRef) -> Result<i32> {
    let (provider, name) = input::token_ref(&token.provider, token.name.as_deref())?;
    let v = match ctx.agent()? {
        Some(mut agent) => agent.call(Request::token("status", &provider, &name))?,
        None => {
            let st = ctx.open_for_inspection(true)?.status(&provider, &name)?;
            let mut v = serde_json::to_value(&st).unwrap_or_default();
            if let Some(o) = v.as_object_mut() {
                o.insert("provider".into(), provider.into());
                o.insert("name".into(), name.into());
            }
            v
        }
    };
    let meta = &v["meta"];
    let text = match v["status"].as_str().unwrap_or_default() {
        "active" => format!("active (expires {})", fmt_time(meta["expires_at_unix"].as_u64())),
        "expired" => format!("expired at {}", fmt_time(meta["expires_at_unix"].as_u64())),
        "needs_reauth" => "needs re-authorisation (the provider refused its refresh token)".into(),
        "revoked" => {
            let t = &v["tombstone"];
            let s = |k: &str| t[k].as_str().unwrap_or_default().to_string();
            format!(
                "revoked at {} by {}: {}",
                fmt_time(t["revoked_at_unix"].as_u64()),
                printable(&s("actor")),
                printable(&s("reason"))
            )
        }
        "shredded" => "shredded: its provider's data keys were destroyed".into(),
        other => format!("unknown status {:?}", printable(other)),
    };
    ctx.out(v, text)?;
    Ok(exit::OK)
}

/// `git-credential get|store|erase` (git's credential helper protocol): answers
/// `get` with the token as the password; `store` and `erase` are acknowledged and
/// ignored (tokens are managed with `put` and `revoke`). An unknown host gets no
/// answer, so git asks its next helper.
pub fn git_credential(ctx: &Ctx, a: &crate::cli::GitCredentialArgs) -> Result<i32> {
    use std::io::BufRead;
    let (mut host, mut protocol) = (None, None);
    for line in std::io::stdin().lock().lines() {
        let line = line.map_err(|e| Error::InvalidInput(format!("reading git's request: {e}")))?;
        if line.is_empty() {
            break;
        }
        if let Some(h) = line.strip_prefix("host=") {
            host = Some(h.to_string());
        } else if let Some(p) = line.strip_prefix("protocol=") {
            protocol = Some(p.to_string());
        }
    }
    if !matches!(a.operation, crate::cli::GitOperation::Get) {
        return Ok(exit::OK);
    }
    // A token is only ever sent over TLS, and only for a host that is a valid
    // token name (no control characters or other oddities reach the audit trail).
    if protocol.as_deref() != Some("https") || host.as_deref().is_some_and(|h| validate_ident("host", h).is_err()) {
        return Ok(exit::OK);
    }
    let spec = match (&a.token, &host) {
        (Some(t), _) => input::TokenSpec::parse(t)?,
        (None, Some(h)) => input::TokenSpec { provider: "git".into(), name: h.clone(), field: None },
        (None, None) => return Ok(exit::OK),
    };
    let g = ctx.open()?;
    let value = match read_audited(
        &g,
        "git-credential",
        &spec.provider,
        &spec.name,
        spec.field.as_deref(),
        GetOptions::default(),
    ) {
        Ok((v, _)) => v,
        Err(Error::NotFound { .. }) if a.token.is_none() => return Ok(exit::OK),
        Err(e) => return Err(e),
    };
    let token = value.expose_str().filter(|t| !t.contains('\n')).ok_or_else(|| {
        Error::InvalidInput("the token is not one line of UTF-8 text; git cannot use it as a password".into())
    })?;
    let answer = zeroize::Zeroizing::new(format!("username={}\npassword={token}\n\n", a.username));
    let mut out = std::io::stdout().lock();
    out.write_all(answer.as_bytes()).and_then(|()| out.flush()).map_err(stdout_error)?;
    Ok(exit::OK)
}
