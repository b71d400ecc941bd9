//! Reading a secret from stdin or a file, and turning it into a [`Secret`]; token
//! references (`PROVIDER NAME`, `PROVIDER/NAME`, `PROVIDER/NAME:FIELD`).
//!
//! Input that is a JSON object with an `access_token`, `refresh_token` or `token` is
//! an OAuth token response, parsed by the library (`tokenguard::token_response`):
//! every field is sealed, `token_type` and `scope` become metadata, and the
//! `*_expires_in` lifetimes become absolute times. Anything else is a raw secret.
//! Buffers are zeroized; nothing here is logged.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Read};
use std::path::Path;

use tokenguard::guard::validate_ident;
use tokenguard::{Error, PutOptions, Result, Secret, SecretBytes};
use zeroize::Zeroizing;

const MAX_INPUT: u64 = 64 * 1024;

/// Reads the whole secret input.
pub fn read_input(from_file: Option<&Path>) -> Result<Zeroizing<Vec<u8>>> {
    // Sized for the largest accepted input up front: a Vec that grew would leave
    // the earlier, smaller copies of the secret behind in freed memory.
    let mut buf = Zeroizing::new(Vec::with_capacity(usize::try_from(MAX_INPUT + 1).unwrap_or(usize::MAX)));
    match from_file {
        Some(p) => {
            let f =
                std::fs::File::open(p).map_err(|e| Error::InvalidInput(format!("cannot read {}: {e}", p.display())))?;
            f.take(MAX_INPUT + 1)
                .read_to_end(&mut buf)
                .map_err(|e| Error::InvalidInput(format!("reading {}: {e}", p.display())))?;
        }
        None if std::io::stdin().is_terminal() => {
            let s = tokenguard::tty::read_hidden("Secret (input hidden): ")?;
            buf = Zeroizing::new(s.as_bytes().to_vec());
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
    pub expires_at: Option<u64>,
    pub token_type: Option<String>,
    pub scopes: Vec<String>,
}

/// Turns input bytes into a secret. `strip_newline` drops one trailing newline (text
/// typed or piped on stdin); a file's bytes are kept exactly.
pub fn parse_secret(
    mut input: Zeroizing<Vec<u8>>,
    raw: bool,
    strip_newline: bool,
    now: u64,
) -> Result<(Secret, Parsed)> {
    if strip_newline {
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
    if !raw
        && looks_json
        && let Some(r) = tokenguard::token_response::parse(&input, now)?
    {
        let parsed =
            Parsed { expires_at: r.expires_at, token_type: r.token_type, scopes: r.scopes.unwrap_or_default() };
        return Ok((Secret::TokenSet(r.tokens), parsed));
    }
    let v = std::mem::take(&mut *input);
    Ok((Secret::Raw(SecretBytes::new(v)), Parsed::default()))
}

/// A token named on the command line: `PROVIDER/NAME[:FIELD]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenSpec {
    pub provider: String,
    pub name: String,
    pub field: Option<String>,
}

impl TokenSpec {
    /// Parses `PROVIDER/NAME[:FIELD]`. (`:` is allowed in names, so the field is what
    /// follows the last `:` only when a field is asked for explicitly this way.)
    pub fn parse(s: &str) -> Result<Self> {
        let (token, field) = match s.rsplit_once(':') {
            Some((t, f)) if t.contains('/') && !f.contains('/') => (t, Some(f.to_string())),
            _ => (s, None),
        };
        let (provider, name) = token.split_once('/').ok_or_else(|| {
            Error::InvalidInput("a token is PROVIDER/NAME or PROVIDER/NAME:FIELD (e.g. github/ci-bot)".into())
        })?;
        validate_ident("provider", provider)?;
        validate_ident("name", name)?;
        Ok(TokenSpec { provider: provider.into(), name: name.into(), field })
    }

    /// Parses `VAR=PROVIDER/NAME[:FIELD]`.
    pub fn assignment(s: &str) -> Result<(&str, Self)> {
        let (var, spec) =
            s.split_once('=').ok_or_else(|| Error::InvalidInput("expected VAR=PROVIDER/NAME[:FIELD]".into()))?;
        let ok = !var.is_empty()
            && var.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
            && !var.as_bytes()[0].is_ascii_digit();
        if !ok {
            return Err(Error::InvalidInput(format!("{var:?} is not an environment variable name")));
        }
        Ok((var, Self::parse(spec)?))
    }
}

/// (provider, name) from `PROVIDER NAME` or `PROVIDER/NAME`.
pub fn token_ref(provider: &str, name: Option<&str>) -> Result<(String, String)> {
    let (p, n) = match (name, provider.split_once('/')) {
        (Some(n), None) => (provider, n),
        (None, Some((p, n))) => (p, n),
        (Some(_), Some(_)) => {
            return Err(Error::InvalidInput("give the token as PROVIDER NAME or as PROVIDER/NAME, not both".into()));
        }
        (None, None) => return Err(Error::InvalidInput("which token? give PROVIDER NAME or PROVIDER/NAME".into())),
    };
    validate_ident("provider", p)?;
    validate_ident("name", n)?;
    Ok((p.to_string(), n.to_string()))
}

/// Parses `--label k=v` pairs.
pub fn parse_labels(labels: &[String]) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for l in labels {
        let (k, v) = l.split_once('=').ok_or_else(|| Error::InvalidInput("--label must be KEY=VALUE".into()))?;
        out.insert(k.to_owned(), v.to_owned());
    }
    Ok(out)
}

/// Resolves the not-after from the flags and the input. A not-after that is not in
/// the future is refused: a token stored already expired is a mistake.
pub fn expiry(
    expires_in: Option<&str>,
    expires_at: Option<&str>,
    from_input: Option<u64>,
    now: u64,
) -> Result<Option<u64>> {
    let at = if let Some(d) = expires_in {
        let d = humantime::parse_duration(d)
            .map_err(|e| Error::InvalidInput(format!("--expires-in: {e} (examples: 8h, 30m, 7d)")))?;
        if d.as_secs() == 0 {
            return Err(Error::InvalidInput("--expires-in must be at least one second".into()));
        }
        now.saturating_add(d.as_secs())
    } else if let Some(t) = expires_at {
        let secs = match t.parse::<u64>() {
            Ok(secs) => secs,
            Err(_) => humantime::parse_rfc3339_weak(t)
                .map_err(|e| Error::InvalidInput(format!("--expires-at: {e} (RFC 3339 or unix seconds)")))?
                .duration_since(std::time::UNIX_EPOCH)
                .map_err(|_| Error::InvalidInput("--expires-at is before 1970".into()))?
                .as_secs(),
        };
        if secs <= now {
            return Err(Error::InvalidInput("--expires-at is not in the future".into()));
        }
        secs
    } else {
        return Ok(from_input);
    };
    if at > tokenguard::clock::MAX_RFC3339 {
        return Err(Error::InvalidInput("the not-after is past the year 9999".into()));
    }
    Ok(Some(at))
}

/// A duration like `8h`, `30m`, `7d`, in seconds.
pub fn duration(s: &str) -> Result<u64> {
    humantime::parse_duration(s)
        .map(|d| d.as_secs())
        .map_err(|e| Error::InvalidInput(format!("a duration: {e} (examples: 8h, 30m, 7d)")))
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
            true,
            100,
        )
        .expect("parse");
        assert_eq!(s.field(None).map(|v| v.expose()), Some(&b"a1"[..]));
        assert_eq!(s.field(Some("refresh_token")).map(|v| v.expose()), Some(&b"r1"[..]));
        assert_eq!(p.expires_at, Some(3700));
        assert_eq!(p.token_type.as_deref(), Some("Bearer"));
        assert_eq!(p.scopes, vec!["repo", "read:org"]);

        let (s, _) = parse_secret(Zeroizing::new(b"ghp_abc\n".to_vec()), false, true, 0).expect("raw");
        assert_eq!(s.field(None).map(|v| v.expose()), Some(&b"ghp_abc"[..]));
        let (s, _) = parse_secret(Zeroizing::new(b"ghp_abc\n".to_vec()), false, false, 0).expect("exact");
        assert_eq!(s.field(None).map(|v| v.expose()), Some(&b"ghp_abc\n"[..]));
        let (s, _) = parse_secret(Zeroizing::new(b"{\"x\":1}".to_vec()), false, true, 0).expect("raw json");
        assert!(matches!(s, Secret::Raw(_)));
        assert!(parse_secret(Zeroizing::new(b"\n".to_vec()), false, true, 0).is_err());
        assert!(parse_secret(Zeroizing::new(b"{broken".to_vec()), false, true, 0).is_err());
    }

    #[test]
    fn token_references() {
        assert_eq!(token_ref("github/ci-bot", None).expect("slash"), ("github".into(), "ci-bot".into()));
        assert_eq!(token_ref("github", Some("ci-bot")).expect("two"), ("github".into(), "ci-bot".into()));
        assert!(token_ref("github/a", Some("b")).is_err());
        assert!(token_ref("github", None).is_err());
        let s = TokenSpec::parse("slack/bot:authed_user.access_token").expect("field");
        assert_eq!(
            (s.provider.as_str(), s.name.as_str(), s.field.as_deref()),
            ("slack", "bot", Some("authed_user.access_token"))
        );
        assert_eq!(TokenSpec::parse("github/ci-bot").expect("plain").field, None);
        assert!(TokenSpec::assignment("1X=github/a").is_err());
        assert!(TokenSpec::assignment("GH_TOKEN=github").is_err());
        assert_eq!(TokenSpec::assignment("GH_TOKEN=github/a").expect("ok").0, "GH_TOKEN");
    }

    #[test]
    fn expiry_forms() {
        assert_eq!(expiry(Some("8h"), None, None, 100).expect("in"), Some(100 + 8 * 3600));
        assert_eq!(expiry(None, Some("1700000000"), None, 0).expect("at"), Some(1_700_000_000));
        assert_eq!(expiry(None, Some("2023-11-14T22:13:20Z"), None, 0).expect("rfc"), Some(1_700_000_000));
        assert_eq!(expiry(None, None, Some(70), 10).expect("input"), Some(70));
        assert!(expiry(Some("soon"), None, None, 0).is_err());
        assert!(expiry(Some("0s"), None, None, 0).is_err(), "zero lifetime");
        assert!(expiry(None, Some("1700000000"), None, 1_800_000_000).is_err(), "in the past");
    }
}
