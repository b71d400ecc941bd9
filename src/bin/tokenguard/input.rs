//! Reading a secret from stdin or a file, and turning it into a [`Secret`].
//!
//! Input that is a JSON object with an `access_token` or `refresh_token` is an OAuth
//! token set: string fields become secret fields, except `token_type` and `scope`,
//! which are metadata, and `expires_in`, which becomes a not-after. Anything else is a
//! raw secret. Buffers are zeroized; nothing here is logged.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Read};
use std::path::Path;

use tokenguard::secret::field;
use tokenguard::{Error, PutOptions, Result, Secret, SecretBytes, TokenSet};
use zeroize::Zeroizing;

const MAX_INPUT: u64 = 64 * 1024;

/// Reads the whole secret input.
pub fn read_input(from_file: Option<&Path>) -> Result<Zeroizing<Vec<u8>>> {
    let mut buf = Zeroizing::new(Vec::new());
    match from_file {
        Some(p) => {
            let f =
                std::fs::File::open(p).map_err(|e| Error::InvalidInput(format!("cannot read {}: {e}", p.display())))?;
            f.take(MAX_INPUT + 1)
                .read_to_end(&mut buf)
                .map_err(|e| Error::InvalidInput(format!("reading {}: {e}", p.display())))?;
        }
        None if std::io::stdin().is_terminal() => {
            let s = rpassword::prompt_password("Secret (input hidden): ")
                .map_err(|e| Error::InvalidInput(format!("reading the secret: {e}")))?;
            buf = Zeroizing::new(s.into_bytes());
        }
        None => {
            std::io::stdin()
                .take(MAX_INPUT + 1)
                .read_to_end(&mut buf)
                .map_err(|e| Error::InvalidInput(format!("reading stdin: {e}")))?;
        }
    }
    if buf.len() as u64 > MAX_INPUT {
        return Err(Error::InvalidInput(format!("the secret input is larger than {MAX_INPUT} bytes")));
    }
    Ok(buf)
}

/// What a parsed input yields besides the secret.
#[derive(Debug, Default)]
pub struct Parsed {
    pub expires_in: Option<u64>,
    pub token_type: Option<String>,
    pub scopes: Vec<String>,
}

/// Turns input bytes into a secret.
pub fn parse_secret(mut input: Zeroizing<Vec<u8>>, raw: bool, keep_newline: bool) -> Result<(Secret, Parsed)> {
    if !keep_newline {
        let n = input.len();
        // Truncated bytes stay in the Vec's capacity, which Zeroizing wipes on drop.
        if input.ends_with(b"\r\n") {
            input.truncate(n - 2);
        } else if input.ends_with(b"\n") {
            input.truncate(n - 1);
        }
    }
    if input.is_empty() {
        return Err(Error::InvalidInput("the secret is empty (nothing on stdin?)".into()));
    }
    let looks_json = input.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{');
    if raw || !looks_json {
        let v = std::mem::take(&mut *input);
        return Ok((Secret::Raw(SecretBytes::new(v)), Parsed::default()));
    }
    let map: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&input).map_err(|e| {
        Error::InvalidInput(format!(
            "input looks like JSON but does not parse (line {}, column {}); use --raw to store it as is",
            e.line(),
            e.column()
        ))
    })?;
    if !map.contains_key(field::ACCESS_TOKEN) && !map.contains_key(field::REFRESH_TOKEN) {
        let v = std::mem::take(&mut *input);
        return Ok((Secret::Raw(SecretBytes::new(v)), Parsed::default()));
    }
    let mut parsed = Parsed::default();
    let mut set = TokenSet::new();
    for (k, v) in map {
        match (k.as_str(), v) {
            ("expires_in", serde_json::Value::Number(n)) => {
                parsed.expires_in = Some(
                    n.as_u64()
                        .ok_or_else(|| Error::InvalidInput("expires_in must be a whole number of seconds".into()))?,
                );
            }
            ("expires_in", serde_json::Value::String(s)) => {
                parsed.expires_in = Some(
                    s.parse()
                        .map_err(|_| Error::InvalidInput("expires_in must be a whole number of seconds".into()))?,
                );
            }
            ("token_type", serde_json::Value::String(s)) => parsed.token_type = Some(s),
            ("scope", serde_json::Value::String(s)) => {
                parsed.scopes = s.split_whitespace().map(str::to_owned).collect()
            }
            (_, serde_json::Value::String(s)) => {
                tokenguard::guard::validate_ident("token-set field name", &k)?;
                set.insert(k, SecretBytes::from(s));
            }
            (_, serde_json::Value::Null) => {}
            (_, _) => {
                return Err(Error::InvalidInput(format!("token-set field {k:?} must be a string")));
            }
        }
    }
    Ok((Secret::TokenSet(set), parsed))
}

/// Parses `--label k=v` pairs.
pub fn parse_labels(labels: &[String]) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for l in labels {
        let (k, v) =
            l.split_once('=').ok_or_else(|| Error::InvalidInput(format!("--label must be KEY=VALUE (got {l:?})")))?;
        out.insert(k.to_owned(), v.to_owned());
    }
    Ok(out)
}

/// Resolves the not-after from the flags and the input.
pub fn expiry(
    expires_in: Option<&str>,
    expires_at: Option<&str>,
    from_input: Option<u64>,
    now: u64,
) -> Result<Option<u64>> {
    if let Some(d) = expires_in {
        let d = humantime::parse_duration(d)
            .map_err(|e| Error::InvalidInput(format!("--expires-in {d:?}: {e} (examples: 8h, 30m, 7d)")))?;
        return Ok(Some(now.saturating_add(d.as_secs())));
    }
    if let Some(t) = expires_at {
        if let Ok(secs) = t.parse::<u64>() {
            return Ok(Some(secs));
        }
        let ts = humantime::parse_rfc3339_weak(t)
            .map_err(|e| Error::InvalidInput(format!("--expires-at {t:?}: {e} (RFC 3339 or unix seconds)")))?;
        let secs = ts
            .duration_since(std::time::UNIX_EPOCH)
            .map_err(|_| Error::InvalidInput("--expires-at is before 1970".into()))?
            .as_secs();
        return Ok(Some(secs));
    }
    Ok(from_input.map(|s| now.saturating_add(s)))
}

/// A duration like `8h`, `30m`, `7d`, in seconds.
pub fn duration(s: &str) -> Result<u64> {
    humantime::parse_duration(s)
        .map(|d| d.as_secs())
        .map_err(|e| Error::InvalidInput(format!("{s:?}: {e} (examples: 8h, 30m, 7d)")))
}

/// A point in time: RFC 3339, unix seconds, or a duration ago (`24h`).
pub fn time_or_ago(s: &str, now: u64) -> Result<u64> {
    if let Ok(secs) = s.parse::<u64>() {
        return Ok(secs);
    }
    if let Ok(ts) = humantime::parse_rfc3339_weak(s) {
        return Ok(ts.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0));
    }
    Ok(now.saturating_sub(duration(s)?))
}

/// Put options from parsed flags and input.
pub fn put_options(labels: BTreeMap<String, String>, expires_at: Option<u64>, parsed: Parsed) -> PutOptions {
    PutOptions { expires_at, labels, token_type: parsed.token_type, scopes: parsed.scopes }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_token_set_and_raw() {
        let (s, p) = parse_secret(
            Zeroizing::new(br#"{"access_token":"a1","refresh_token":"r1","expires_in":3600,"token_type":"Bearer","scope":"repo read:org"}"#.to_vec()),
            false,
            false,
        )
        .expect("parse");
        assert_eq!(s.field(None).map(|v| v.expose()), Some(&b"a1"[..]));
        assert_eq!(s.field(Some("refresh_token")).map(|v| v.expose()), Some(&b"r1"[..]));
        assert_eq!(p.expires_in, Some(3600));
        assert_eq!(p.token_type.as_deref(), Some("Bearer"));
        assert_eq!(p.scopes, vec!["repo", "read:org"]);

        let (s, _) = parse_secret(Zeroizing::new(b"ghp_abc\n".to_vec()), false, false).expect("raw");
        assert_eq!(s.field(None).map(|v| v.expose()), Some(&b"ghp_abc"[..]));
        let (s, _) = parse_secret(Zeroizing::new(b"{\"x\":1}".to_vec()), false, false).expect("raw json");
        assert!(matches!(s, Secret::Raw(_)));
        assert!(parse_secret(Zeroizing::new(b"\n".to_vec()), false, false).is_err());
        assert!(parse_secret(Zeroizing::new(b"{broken".to_vec()), false, false).is_err());
    }

    #[test]
    fn expiry_forms() {
        assert_eq!(expiry(Some("8h"), None, None, 100).expect("in"), Some(100 + 8 * 3600));
        assert_eq!(expiry(None, Some("1700000000"), None, 0).expect("at"), Some(1_700_000_000));
        assert_eq!(expiry(None, Some("2023-11-14T22:13:20Z"), None, 0).expect("rfc"), Some(1_700_000_000));
        assert_eq!(expiry(None, None, Some(60), 10).expect("input"), Some(70));
        assert!(expiry(Some("soon"), None, None, 0).is_err());
    }
}
