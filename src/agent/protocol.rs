//! The agent's wire protocol (`docs/PROTOCOL.md` is its specification): frames of a
//! 4-byte big-endian length and that many bytes of one UTF-8 JSON object, over a Unix
//! stream socket. One request, one response, in order; a connection carries any
//! number of them.
//!
//! Secrets cross the wire only inside a response to an allowed caller, or in a `put`
//! request. Frames are read into and written from zeroizing buffers, and secret
//! values are (de)serialised through [`WireSecret`], never a plain `String`.

use std::collections::BTreeMap;
use std::io::{Read, Write};

use base64::Engine;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::secret::SecretBytes;

/// The protocol version this build speaks.
pub const VERSION: u32 = 1;
/// Largest request body, bytes: a `put` of the largest secret the store takes (64
/// KiB) fits even in base64 or with every byte escaped; every connection may hold
/// one in memory.
pub const MAX_REQUEST: usize = 512 << 10;
/// Largest response body, bytes.
pub const MAX_RESPONSE: usize = 16 << 20;

/// Why a frame could not be read.
#[derive(Debug)]
pub enum FrameError {
    /// The connection failed or timed out.
    Io(std::io::Error),
    /// The length prefix is over the limit (or zero).
    BadLength(usize),
    /// The peer closed the connection inside a frame.
    Truncated,
}

/// Reads the rest of a frame whose first length byte is `first` (the caller waited
/// for it with its own timeout). The body goes into a zeroizing buffer. `r` bounds
/// the whole read (the agent's reader gives up at a deadline).
pub fn read_frame_after(first: u8, r: &mut impl Read, max: usize) -> Result<Zeroizing<Vec<u8>>, FrameError> {
    let mut len = [first, 0, 0, 0];
    read_exact(r, &mut len[1..])?;
    let n = u32::from_be_bytes(len) as usize;
    if n == 0 || n > max {
        return Err(FrameError::BadLength(n));
    }
    let mut body = Zeroizing::new(vec![0u8; n]);
    read_exact(r, &mut body)?;
    Ok(body)
}

/// Reads one whole frame; `Ok(None)`: the peer closed the connection between frames.
pub fn read_frame(r: &mut impl Read, max: usize) -> Result<Option<Zeroizing<Vec<u8>>>, FrameError> {
    let mut first = [0u8; 1];
    loop {
        match r.read(&mut first) {
            Ok(0) => return Ok(None),
            Ok(_) => return read_frame_after(first[0], r, max).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(FrameError::Io(e)),
        }
    }
}

fn read_exact(r: &mut impl Read, buf: &mut [u8]) -> Result<(), FrameError> {
    r.read_exact(buf).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => FrameError::Truncated,
        _ => FrameError::Io(e),
    })
}

/// Writes `body` as one frame (length prefix and body in one write where possible).
pub fn write_frame(w: &mut impl Write, body: &[u8]) -> std::io::Result<()> {
    let len = u32::try_from(body.len())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "frame over 4 GiB"))?;
    let mut frame = Zeroizing::new(Vec::with_capacity(body.len() + 4));
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(body);
    w.write_all(&frame)?;
    w.flush()
}

/// `s` with control characters escaped (no terminal escape sequences, no forged lines).
pub fn escape_controls(s: &str) -> String {
    s.chars().flat_map(|c| if c.is_control() { c.escape_default().collect::<Vec<_>>() } else { vec![c] }).collect()
}

/// Why JSON did not parse, in words that never echo the input.
pub(crate) fn json_problem(e: &serde_json::Error) -> &'static str {
    match e.classify() {
        serde_json::error::Category::Io => "I/O",
        serde_json::error::Category::Syntax => "syntax",
        serde_json::error::Category::Data => "unexpected fields or types",
        serde_json::error::Category::Eof => "cut short",
    }
}

/// A secret on the wire: a JSON string, UTF-8 text as it is, other bytes in base64
/// with `"encoding": "base64"` beside it.
pub struct WireSecret(pub SecretBytes);

impl std::fmt::Debug for WireSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WireSecret(<redacted>)")
    }
}

impl Serialize for WireSecret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0.expose_str() {
            Some(t) => s.serialize_str(t),
            None => s.serialize_str(&Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(self.0.expose()))),
        }
    }
}

impl<'de> Deserialize<'de> for WireSecret {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = WireSecret;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a secret as a string")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<WireSecret, E> {
                Ok(WireSecret(SecretBytes::from_slice(v.as_bytes())))
            }
            fn visit_string<E: serde::de::Error>(self, v: String) -> Result<WireSecret, E> {
                // A string that arrives owned is copied, then wiped. (serde_json
                // unescapes into a scratch buffer of its own, which it does not wipe:
                // README, "Agent", what is left alone.)
                let v = Zeroizing::new(v);
                Ok(WireSecret(SecretBytes::from_slice(v.as_bytes())))
            }
        }
        d.deserialize_string(V)
    }
}

impl WireSecret {
    /// The encoding [`Serialize`] uses for this value: `"utf8"` or `"base64"`.
    pub fn encoding(&self) -> Encoding {
        if self.0.expose_str().is_some() { Encoding::Utf8 } else { Encoding::Base64 }
    }

    /// The bytes of a value received with `encoding`.
    pub fn decode(self, encoding: Encoding) -> Result<SecretBytes, String> {
        match encoding {
            Encoding::Utf8 => Ok(self.0),
            Encoding::Base64 => base64::engine::general_purpose::STANDARD
                .decode(self.0.expose())
                .map(SecretBytes::new)
                .map_err(|_| "the value is not valid base64".to_string()),
        }
    }
}

/// How a secret value is written in a JSON string.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    /// The string is the secret.
    #[default]
    Utf8,
    /// The string is the secret in standard base64.
    Base64,
}

fn yes() -> bool {
    true
}

fn is_true(b: &bool) -> bool {
    *b
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// One request. Which fields an operation reads is in `docs/PROTOCOL.md`; others are
/// ignored, so a newer client's extra fields do not break an older agent.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Request {
    /// Protocol version ([`VERSION`]).
    pub v: u32,
    /// Echoed in the response.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<u64>,
    /// The operation.
    pub op: String,
    /// Provider of the token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    /// Name of the token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Field of a token set (`get`, `get_fresh`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// Serve an expired token (`get`).
    #[serde(default, skip_serializing_if = "is_false")]
    pub allow_expired: bool,
    /// Reason of a revocation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// A raw secret to store (`put`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<WireSecret>,
    /// How `value` is written.
    #[serde(default)]
    pub encoding: Encoding,
    /// A token set to store (`put`), field to value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_set: Option<BTreeMap<String, WireSecret>>,
    /// Not-after, unix seconds (`put`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
    /// Labels (`put`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// OAuth scopes (`put`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scopes: Vec<String>,
    /// OAuth `token_type` (`put`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_type: Option<String>,
    /// Replace an existing token (`put`, default true).
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub overwrite: bool,
}

impl Request {
    /// A request for `op`, version [`VERSION`].
    pub fn new(op: &str) -> Self {
        Request { v: VERSION, op: op.into(), overwrite: true, ..Default::default() }
    }

    /// The same, about `provider/name`.
    pub fn token(op: &str, provider: &str, name: &str) -> Self {
        Request { provider: Some(provider.into()), name: Some(name.into()), ..Request::new(op) }
    }
}

/// An error as the agent reports it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WireError {
    /// Stable kind: `not_found`, `integrity`, `hardware`, `busy`, `expired`,
    /// `revoked`, `shredded`, `needs_reauth`, `config`, `invalid`, `refused`,
    /// `rate_limited`, `locked`, `unavailable`, `audit`, `other`.
    pub kind: String,
    /// What went wrong (never a secret).
    pub message: String,
    /// What to do next.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
    /// The CLI exit code this error maps to.
    pub exit_code: i32,
    /// For `rate_limited`: when to try again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
}

/// The kind of a library error on the wire.
pub fn error_kind(e: &crate::Error) -> &'static str {
    use crate::Error as E;
    match e {
        E::NotFound { .. } | E::NoSuchField { .. } | E::NoStore(_) => "not_found",
        E::Integrity { .. } | E::WrongRoot { .. } | E::Rollback { .. } => "integrity",
        E::Hardware { .. } | E::Auth { .. } => "hardware",
        E::StoreBusy { .. } => "busy",
        E::Expired { .. } => "expired",
        E::Revoked { .. } => "revoked",
        E::Shredded { .. } => "shredded",
        E::NeedsReauth { .. } => "needs_reauth",
        E::Config(_) | E::BackendNotCompiled(_) => "config",
        E::InvalidInput(_) | E::Exists { .. } => "invalid",
        E::Refused { .. } => "refused",
        E::RateLimited { .. } => "rate_limited",
        E::Locked => "locked",
        E::AgentUnavailable { .. } => "unavailable",
        E::Remote { kind, .. } => remote_kind(kind),
        _ => "other",
    }
}

/// A remote kind passed on, as one of the stable kinds.
fn remote_kind(kind: &str) -> &'static str {
    const KINDS: [&str; 16] = [
        "not_found",
        "integrity",
        "hardware",
        "busy",
        "expired",
        "revoked",
        "shredded",
        "needs_reauth",
        "config",
        "invalid",
        "refused",
        "rate_limited",
        "locked",
        "unavailable",
        "audit",
        "other",
    ];
    KINDS.iter().find(|k| **k == kind).copied().unwrap_or("other")
}

impl WireError {
    /// The wire form of a library error.
    pub fn of(e: &crate::Error) -> Self {
        WireError {
            kind: error_kind(e).into(),
            message: e.to_string(),
            hint: e.hint(),
            exit_code: e.exit_code(),
            retry_after_ms: match e {
                crate::Error::RateLimited { retry_after_ms } => Some(*retry_after_ms),
                _ => None,
            },
        }
    }

    /// The library error a client raises for it. Its text is shown with control
    /// characters escaped: it comes from whatever answered on the socket.
    pub fn into_error(mut self) -> crate::Error {
        self.message = escape_controls(&self.message);
        self.hint = self.hint.as_deref().map(escape_controls);
        match self.kind.as_str() {
            "refused" => crate::Error::Remote {
                kind: self.kind,
                message: self.message,
                hint: self.hint,
                code: crate::error::exit::REFUSED,
            },
            "rate_limited" => crate::Error::RateLimited { retry_after_ms: self.retry_after_ms.unwrap_or(0) },
            _ => {
                // An exit code this build does not know is "other".
                let code = if crate::error::exit::TABLE.iter().any(|(c, _)| *c == self.exit_code) {
                    self.exit_code
                } else {
                    crate::error::exit::OTHER
                };
                crate::Error::Remote { kind: self.kind, message: self.message, hint: self.hint, code }
            }
        }
    }
}

/// A response: `{"v":1,"id":…,"ok":true,"result":…}` or `{…,"ok":false,"error":…}`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Response<T> {
    /// Protocol version.
    pub v: u32,
    /// The request's id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<u64>,
    /// Whether it succeeded.
    pub ok: bool,
    /// The result, when `ok`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<T>,
    /// The error, when not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<WireError>,
}

/// Serialises a response into a zeroizing buffer sized so it does not reallocate for
/// a result of up to `hint` bytes (JSON escaping at most sextuples a byte).
pub fn encode<T: Serialize>(id: Option<u64>, result: Result<T, WireError>, hint: usize) -> Zeroizing<Vec<u8>> {
    let (ok, result, error) = match result {
        Ok(r) => (true, Some(r), None),
        Err(e) => (false, None, Some(e)),
    };
    let mut buf = Zeroizing::new(Vec::with_capacity(hint.saturating_mul(6).saturating_add(1024)));
    let r = Response { v: VERSION, id, ok, result, error };
    if serde_json::to_writer(&mut *buf, &r).is_err() {
        buf.clear();
        let e = WireError {
            kind: "other".into(),
            message: "the agent could not encode its response".into(),
            hint: None,
            exit_code: crate::error::exit::OTHER,
            retry_after_ms: None,
        };
        let _ = serde_json::to_writer(
            &mut *buf,
            &Response::<()> { v: VERSION, id, ok: false, result: None, error: Some(e) },
        );
    }
    buf
}

/// A secret value in a result: `{"value": …, "encoding": …}`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Value {
    /// The secret.
    pub value: WireSecret,
    /// How it is written.
    #[serde(default)]
    pub encoding: Encoding,
}

impl Value {
    /// A secret for a response.
    pub fn of(s: SecretBytes) -> Self {
        let w = WireSecret(s);
        Value { encoding: w.encoding(), value: w }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn frames_round_trip_and_bad_lengths_are_refused() {
        let mut buf = Vec::new();
        write_frame(&mut buf, b"{\"v\":1}").unwrap();
        assert_eq!(&buf[..4], &[0, 0, 0, 7]);
        let mut r = &buf[..];
        assert_eq!(&read_frame(&mut r, 100).unwrap().unwrap()[..], b"{\"v\":1}");
        assert!(read_frame(&mut r, 100).unwrap().is_none());
        // Over the limit, zero, truncated in the prefix or in the body.
        assert!(matches!(read_frame(&mut &[0u8, 0, 1, 0][..], 100), Err(FrameError::BadLength(256))));
        assert!(matches!(read_frame(&mut &[0u8, 0, 0, 0][..], 100), Err(FrameError::BadLength(0))));
        assert!(matches!(read_frame(&mut &[0u8, 0][..], 100), Err(FrameError::Truncated)));
        assert!(matches!(read_frame(&mut &[0u8, 0, 0, 5, b'{'][..], 100), Err(FrameError::Truncated)));
    }

    #[test]
    fn secrets_travel_as_text_or_base64_and_never_show_in_debug() {
        let text = Value::of(SecretBytes::from_slice(b"ghp_abc\"def"));
        let j = serde_json::to_string(&text).unwrap();
        assert_eq!(j, r#"{"value":"ghp_abc\"def","encoding":"utf8"}"#);
        let back: Value = serde_json::from_str(&j).unwrap();
        assert_eq!(back.value.decode(back.encoding).unwrap().expose(), b"ghp_abc\"def");
        let bin = Value::of(SecretBytes::from_slice(&[0xff, 0, 1]));
        let j = serde_json::to_string(&bin).unwrap();
        assert_eq!(j, r#"{"value":"/wAB","encoding":"base64"}"#);
        let back: Value = serde_json::from_str(&j).unwrap();
        assert!(!format!("{back:?}").contains("/wAB"));
        assert_eq!(back.value.decode(back.encoding).unwrap().expose(), &[0xff, 0, 1]);
        let mut req = Request::token("put", "p", "n");
        req.value = Some(WireSecret(SecretBytes::from_slice(b"s3cret")));
        assert!(!format!("{req:?}").contains("s3cret"));
    }

    #[test]
    fn requests_ignore_unknown_fields_and_default_overwrite() {
        let r: Request = serde_json::from_str(r#"{"v":1,"op":"get","provider":"p","name":"n","future":1}"#).unwrap();
        assert!(r.overwrite);
        assert_eq!(r.op, "get");
        let j = serde_json::to_string(&Request::token("get", "p", "n")).unwrap();
        assert_eq!(j, r#"{"v":1,"op":"get","provider":"p","name":"n","encoding":"utf8"}"#);
    }
}
