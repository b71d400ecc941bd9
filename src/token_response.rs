//! OAuth token responses as providers really send them (RFC 6749 §5.1 plus what
//! Google, GitHub OAuth and App, Slack v2, Microsoft, Atlassian and Okta/Auth0 add),
//! turned into a sealed [`TokenSet`] and its non-secret metadata. One parser, used by
//! `put` and by the refresh client.
//!
//! Rules:
//! - a JSON object with a string `access_token`, `refresh_token` or `token` (GitHub
//!   App installation tokens) is a token response;
//! - `expires_in` (seconds) and `expires_at` (RFC 3339 or unix seconds) give the
//!   access token's not-after; `token_type` and `scope` (space- or comma-separated,
//!   or an array) become metadata; none of these four is stored as a field;
//! - any other `NAME_expires_in` becomes a field `NAME_expires_at` holding an absolute
//!   unix time (e.g. `refresh_token_expires_at`), and so does a nested object's own
//!   `expires_in` (`authed_user.expires_at`), so a later read knows when that token
//!   lapses without knowing when it was stored;
//! - two values for one field name (after flattening) are refused, never one kept;
//! - every other value is a sealed field: strings as they are, numbers and booleans
//!   as their JSON text, nested objects flattened with dots (`authed_user.access_token`,
//!   `team.id`), arrays as their JSON text; `null` is dropped.

use serde_json::{Map, Value};

use crate::error::{Error, Result};
use crate::secret::{SecretBytes, TokenSet, field};

/// A parsed token response.
#[derive(Debug, Default)]
pub struct TokenResponse {
    /// Every field that is not metadata, sealed.
    pub tokens: TokenSet,
    /// The access token's not-after, unix seconds.
    pub expires_at: Option<u64>,
    /// `token_type`, e.g. `Bearer`.
    pub token_type: Option<String>,
    /// Granted scopes, if the response says.
    pub scopes: Option<Vec<String>>,
}

/// Suffix of a lifetime in seconds; the field becomes `…_expires_at`.
const EXPIRES_IN: &str = "_expires_in";
/// Deepest nesting flattened into fields.
const MAX_DEPTH: usize = 4;

/// Whether `v` looks like a token response (see the module docs).
pub fn is_token_response(v: &Map<String, Value>) -> bool {
    [field::ACCESS_TOKEN, field::REFRESH_TOKEN, field::TOKEN].iter().any(|k| v.get(*k).is_some_and(Value::is_string))
}

/// Parses a token response received at `now` (unix seconds). `Ok(None)` when the
/// JSON is an object but not a token response.
pub fn parse(json: &[u8], now: u64) -> Result<Option<TokenResponse>> {
    let map: Map<String, Value> = serde_json::from_slice(json).map_err(|e| {
        Error::InvalidInput(format!(
            "input looks like JSON but does not parse (line {}, column {}); use --raw to store it as is",
            e.line(),
            e.column()
        ))
    })?;
    if !is_token_response(&map) {
        return Ok(None);
    }
    let mut out = TokenResponse::default();
    for (k, v) in map {
        match (k.as_str(), v) {
            (_, Value::Null) => {}
            ("expires_in", v) => out.expires_at = Some(now.saturating_add(seconds(&k, &v)?)),
            ("expires_at", v) => out.expires_at = Some(timestamp(&k, &v)?),
            ("token_type", Value::String(s)) => out.token_type = Some(s),
            ("scope", v) => out.scopes = Some(scopes(&v)?),
            (_, v) => flatten(&mut out.tokens, &k, v, now, 0)?,
        }
    }
    Ok(Some(out))
}

fn flatten(set: &mut TokenSet, name: &str, v: Value, now: u64, depth: usize) -> Result<()> {
    // `x_expires_in` at any depth, and a nested object's own `expires_in` (Slack's
    // `authed_user.expires_in`), become absolute times.
    let stem = name
        .strip_suffix(EXPIRES_IN)
        .map(|s| format!("{s}_expires_at"))
        .or_else(|| name.strip_suffix(".expires_in").map(|parent| format!("{parent}.expires_at")));
    if let Some(at_name) = stem {
        let at = now.saturating_add(seconds(name, &v)?);
        return insert(set, &at_name, at.to_string());
    }
    match v {
        Value::Null => Ok(()),
        Value::String(s) => insert(set, name, s),
        Value::Bool(b) => insert(set, name, b.to_string()),
        Value::Number(n) => insert(set, name, n.to_string()),
        Value::Array(_) => insert(set, name, v.to_string()),
        Value::Object(m) if depth < MAX_DEPTH => {
            for (k, v) in m {
                flatten(set, &format!("{name}.{k}"), v, now, depth + 1)?;
            }
            Ok(())
        }
        Value::Object(_) => insert(set, name, v.to_string()),
    }
}

fn insert(set: &mut TokenSet, name: &str, value: String) -> Result<()> {
    crate::guard::validate_ident("token-set field name", name).map_err(|_| {
        Error::InvalidInput(format!("a token response field name is not allowed: {}", crate::guard::IDENT_RULE))
    })?;
    // Two values for one field (`{"a.b":…,"a":{"b":…}}`, or `x_expires_in` beside
    // `x_expires_at`): refuse rather than keep one silently.
    if set.get(name).is_some() {
        return Err(Error::InvalidInput(format!("the token response has two values for field {name:?}")));
    }
    set.insert(name, SecretBytes::from(value));
    Ok(())
}

fn seconds(name: &str, v: &Value) -> Result<u64> {
    let n = match v {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    };
    n.ok_or_else(|| Error::InvalidInput(format!("token response field {name:?} must be a whole number of seconds")))
}

fn timestamp(name: &str, v: &Value) -> Result<u64> {
    let bad = || Error::InvalidInput(format!("token response field {name:?} must be RFC 3339 or unix seconds"));
    match v {
        Value::Number(n) => n.as_u64().ok_or_else(bad),
        Value::String(s) => match s.parse::<u64>() {
            Ok(secs) => Ok(secs),
            Err(_) => humantime::parse_rfc3339_weak(s)
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| d.as_secs())
                .ok_or_else(bad),
        },
        _ => Err(bad()),
    }
}

fn scopes(v: &Value) -> Result<Vec<String>> {
    match v {
        // RFC 6749 separates scopes with spaces; GitHub with commas.
        Value::String(s) => {
            Ok(s.split(|c: char| c.is_whitespace() || c == ',').filter(|s| !s.is_empty()).map(str::to_owned).collect())
        }
        Value::Array(a) => a
            .iter()
            .map(|s| {
                s.as_str().map(str::to_owned).ok_or_else(|| Error::InvalidInput("scope entries must be strings".into()))
            })
            .collect(),
        _ => Err(Error::InvalidInput("token response field \"scope\" must be a string or an array".into())),
    }
}
