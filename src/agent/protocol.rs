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

/// Reads frames from one connection. Each read takes what the socket has, up to the
/// buffer's size, so a small frame (length and body) costs one system call; a frame
/// larger than the buffer is read into a buffer of its own. Both buffers are wiped:
/// the bytes of a frame once it is taken out, the rest on drop.
///
/// The agent reads a request's first bytes with [`FrameReader::peek`] and takes them
/// off the socket only after it answered ([`FrameReader::settle`]): taking bytes off a
/// Unix socket wakes a client blocked on it, and a client woken while its request is
/// still being served only goes back to sleep. On a virtual machine that needless
/// wake-up cost about a fifth of a `get`'s round trip.
pub struct FrameReader {
    buf: Zeroizing<Vec<u8>>,
    /// Buffered bytes not yet returned are `buf[start..end]`.
    start: usize,
    end: usize,
    /// Bytes at the end of the buffer that were peeked: still queued in the socket.
    unsettled: usize,
    max: usize,
}

impl std::fmt::Debug for FrameReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameReader").field("buffered", &(self.end - self.start)).finish_non_exhaustive()
    }
}

/// What one read of a [`FrameReader`] buffers at most.
const READ_BUFFER: usize = 16 << 10;

impl FrameReader {
    /// A reader of frames of at most `max` bytes.
    pub fn new(max: usize) -> Self {
        FrameReader { buf: Zeroizing::new(vec![0u8; READ_BUFFER]), start: 0, end: 0, unsettled: 0, max }
    }

    /// With nothing buffered: copies what `s` has queued into the buffer, leaving it
    /// queued until [`FrameReader::settle`] (or the next read) takes it off. The
    /// number of bytes (0: the peer closed the connection).
    pub fn peek(&mut self, s: &std::os::unix::net::UnixStream) -> std::io::Result<usize> {
        use std::os::fd::AsRawFd;
        if self.has_buffered() || self.unsettled > 0 {
            return Err(std::io::Error::other("peek with bytes buffered"));
        }
        (self.start, self.end) = (0, 0);
        let n = nix::sys::socket::recv(s.as_raw_fd(), &mut self.buf[..], nix::sys::socket::MsgFlags::MSG_PEEK)
            .map_err(|e| std::io::Error::from_raw_os_error(e as i32))?;
        (self.end, self.unsettled) = (n, n);
        Ok(n)
    }

    /// Takes the peeked bytes off the socket (they are in the buffer already), and
    /// wipes the copy read to do so.
    pub fn settle(&mut self, r: &mut impl Read) -> std::io::Result<()> {
        let mut scratch = Zeroizing::new([0u8; 1024]);
        while self.unsettled > 0 {
            let want = self.unsettled.min(scratch.len());
            match r.read(&mut scratch[..want]) {
                Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => self.unsettled -= n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Whether bytes of a next frame are already buffered.
    pub fn has_buffered(&self) -> bool {
        self.end > self.start
    }

    /// One read from `r` into the buffer: the number of bytes read (0: the peer
    /// closed the connection). Errors, timeouts included, are `r`'s.
    pub fn fill(&mut self, r: &mut impl Read) -> std::io::Result<usize> {
        self.settle(r)?;
        if self.start == self.end {
            (self.start, self.end) = (0, 0);
        } else if self.end == self.buf.len() {
            self.compact();
        }
        let n = r.read(&mut self.buf[self.end..])?;
        self.end += n;
        Ok(n)
    }

    /// Moves the buffered bytes to the front, wiping where they were.
    fn compact(&mut self) {
        let n = self.end - self.start;
        self.buf.copy_within(self.start..self.end, 0);
        zeroize::Zeroize::zeroize(&mut self.buf[n..self.end]);
        (self.start, self.end) = (0, n);
    }

    /// Reads until `want` bytes are buffered (at most the buffer's size).
    fn buffer(&mut self, r: &mut impl Read, want: usize) -> Result<(), FrameError> {
        if self.start + want > self.buf.len() {
            self.compact();
        }
        while self.end - self.start < want {
            match self.fill(r) {
                Ok(0) => return Err(FrameError::Truncated),
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(FrameError::Io(e)),
            }
        }
        Ok(())
    }

    /// The next frame; `Ok(None)`: the peer closed the connection between frames.
    /// `r` bounds the whole read (the agent's reader gives up at a deadline).
    pub fn next(&mut self, r: &mut impl Read) -> Result<Option<Zeroizing<Vec<u8>>>, FrameError> {
        while !self.has_buffered() {
            match self.fill(r) {
                Ok(0) => return Ok(None),
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(FrameError::Io(e)),
            }
        }
        self.buffer(r, 4)?;
        let mut len = [0u8; 4];
        len.copy_from_slice(&self.buf[self.start..self.start + 4]);
        let n = u32::from_be_bytes(len) as usize;
        if n == 0 || n > self.max {
            return Err(FrameError::BadLength(n));
        }
        self.take(4);
        let mut body = Zeroizing::new(vec![0u8; n]);
        if n <= self.buf.len() {
            self.buffer(r, n)?;
            body.copy_from_slice(&self.buf[self.start..self.start + n]);
            self.take(n);
        } else {
            let have = self.end - self.start;
            body[..have].copy_from_slice(&self.buf[self.start..self.end]);
            self.take(have);
            self.settle(r).and_then(|()| r.read_exact(&mut body[have..])).map_err(|e| match e.kind() {
                std::io::ErrorKind::UnexpectedEof => FrameError::Truncated,
                _ => FrameError::Io(e),
            })?;
        }
        Ok(Some(body))
    }

    /// Drops the first `n` buffered bytes, wiping them.
    fn take(&mut self, n: usize) {
        zeroize::Zeroize::zeroize(&mut self.buf[self.start..self.start + n]);
        self.start += n;
    }
}

/// A zeroizing buffer for one frame: room for the length prefix, then the body is
/// written after it and [`finish_frame`] fills the prefix in.
fn frame_buffer(body_capacity: usize) -> Zeroizing<Vec<u8>> {
    let mut b = Zeroizing::new(Vec::with_capacity(body_capacity.saturating_add(4)));
    b.extend_from_slice(&[0; 4]);
    b
}

/// Fills in the length prefix of a frame made with [`frame_buffer`].
fn finish_frame(frame: &mut [u8]) -> std::io::Result<()> {
    let len = u32::try_from(frame.len().saturating_sub(4))
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "frame over 4 GiB"))?;
    frame[..4].copy_from_slice(&len.to_be_bytes());
    Ok(())
}

/// Writes `body` as one frame (length prefix and body in one write).
pub fn write_frame(w: &mut impl Write, body: &[u8]) -> std::io::Result<()> {
    let mut frame = frame_buffer(body.len());
    frame.extend_from_slice(body);
    finish_frame(&mut frame)?;
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
    /// Answer with the token's metadata too (`get`, `token_set`).
    #[serde(default, skip_serializing_if = "is_false")]
    pub meta: bool,
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
    /// `rate_limited`, `locked`, `unavailable`, `database`, `audit`, `other`.
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
        E::StoreBusy { .. } | E::FleetConflict { .. } => "busy",
        E::Database { .. } => "database",
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
    const KINDS: [&str; 17] = [
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
        "database",
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

/// Serialises `v` as one frame (length prefix included) into a zeroizing buffer of
/// exactly its size: a first pass counts the bytes, so the buffer never grows (and
/// leaves no unwiped copy of a secret behind) whatever the value holds.
pub fn frame_of<T: Serialize>(v: &T) -> serde_json::Result<Zeroizing<Vec<u8>>> {
    struct Count(usize);
    impl Write for Count {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0 += b.len();
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut n = Count(0);
    serde_json::to_writer(&mut n, v)?;
    let mut buf = frame_buffer(n.0);
    serde_json::to_writer(&mut *buf, v)?;
    debug_assert_eq!(buf.len(), n.0 + 4);
    finish_frame(&mut buf).map_err(serde_json::Error::io)?;
    Ok(buf)
}

/// A response as one frame ([`frame_of`]); one that cannot be encoded becomes an
/// error response.
pub fn encode<T: Serialize>(id: Option<u64>, result: Result<T, WireError>) -> Zeroizing<Vec<u8>> {
    let (ok, result, error) = match result {
        Ok(r) => (true, Some(r), None),
        Err(e) => (false, None, Some(e)),
    };
    frame_of(&Response { v: VERSION, id, ok, result, error }).unwrap_or_else(|_| {
        let e = WireError {
            kind: "other".into(),
            message: "the agent could not encode its response".into(),
            hint: None,
            exit_code: crate::error::exit::OTHER,
            retry_after_ms: None,
        };
        frame_of(&Response::<()> { v: VERSION, id, ok: false, result: None, error: Some(e) })
            .unwrap_or_else(|_| Zeroizing::new(Vec::new()))
    })
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
        let mut fr = FrameReader::new(100);
        assert_eq!(&fr.next(&mut r).unwrap().unwrap()[..], b"{\"v\":1}");
        assert!(fr.next(&mut r).unwrap().is_none());
        // Over the limit, zero, truncated in the prefix or in the body.
        let next = |bytes: &[u8]| FrameReader::new(100).next(&mut &bytes[..]);
        assert!(matches!(next(&[0u8, 0, 1, 0]), Err(FrameError::BadLength(256))));
        assert!(matches!(next(&[0u8, 0, 0, 0]), Err(FrameError::BadLength(0))));
        assert!(matches!(next(&[0u8, 0]), Err(FrameError::Truncated)));
        assert!(matches!(next(&[0u8, 0, 0, 5, b'{']), Err(FrameError::Truncated)));
    }

    /// Gives at most `step` bytes per read, as a slow socket does.
    struct Trickle<'a>(&'a [u8], usize);

    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = self.1.min(buf.len()).min(self.0.len());
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    #[test]
    fn frames_split_or_run_together_come_out_whole_and_in_order() {
        // Small frames, one larger than the read buffer, small again: sent in one
        // piece, byte by byte, and in odd-sized pieces.
        let bodies: Vec<Vec<u8>> = [3usize, 1, READ_BUFFER - 4, READ_BUFFER * 2 + 7, 10, READ_BUFFER]
            .iter()
            .enumerate()
            .map(|(i, &n)| (0..n).map(|j| u8::try_from((i * 31 + j) % 251).unwrap()).collect())
            .collect();
        let mut wire = Vec::new();
        for b in &bodies {
            write_frame(&mut wire, b).unwrap();
        }
        for step in [usize::MAX, 1, 4093] {
            let mut r = Trickle(&wire, step);
            let mut fr = FrameReader::new(1 << 20);
            for b in &bodies {
                assert_eq!(&fr.next(&mut r).unwrap().unwrap()[..], &b[..], "step {step}");
            }
            assert!(fr.next(&mut r).unwrap().is_none());
            assert!(fr.buf.iter().all(|&b| b == 0), "taken bytes are wiped (step {step})");
        }
    }

    #[test]
    fn peeked_bytes_leave_the_socket_only_when_settled() {
        use nix::sys::socket::{MsgFlags, recv};
        use std::os::fd::AsRawFd;
        let (mut a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
        let queued = |s: &std::os::unix::net::UnixStream| {
            let mut buf = [0u8; 64];
            recv(s.as_raw_fd(), &mut buf, MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT).unwrap_or(0)
        };
        let mut fr = FrameReader::new(1 << 20);
        write_frame(&mut a, b"one").unwrap();
        assert_eq!(fr.peek(&b).unwrap(), 7);
        assert!(fr.peek(&b).is_err(), "a second peek with bytes buffered is refused");
        assert_eq!(&fr.next(&mut b).unwrap().unwrap()[..], b"one");
        assert_eq!(queued(&b), 7, "the request stays queued until it is settled");
        fr.settle(&mut b).unwrap();
        assert_eq!(queued(&b), 0);
        // A small frame and a large one behind it: the large one is read after the
        // peeked bytes are settled, and nothing is left over or read twice.
        let big = vec![7u8; READ_BUFFER * 2];
        let mut wire = Vec::new();
        write_frame(&mut wire, b"two").unwrap();
        write_frame(&mut wire, &big).unwrap();
        write_frame(&mut wire, b"three").unwrap();
        let writer = std::thread::spawn(move || a.write_all(&wire).unwrap());
        assert!(fr.peek(&b).unwrap() > 0);
        assert_eq!(&fr.next(&mut b).unwrap().unwrap()[..], b"two");
        assert_eq!(&fr.next(&mut b).unwrap().unwrap()[..], &big[..]);
        writer.join().unwrap();
        assert_eq!(&fr.next(&mut b).unwrap().unwrap()[..], b"three");
        fr.settle(&mut b).unwrap();
        assert_eq!(queued(&b), 0);
        assert!(!fr.has_buffered());
    }

    #[test]
    fn a_frame_is_allocated_at_its_exact_size_so_it_never_grows_past_a_secret() {
        let mut req = Request::token("put", "p", "n");
        req.value = Some(WireSecret(SecretBytes::from_slice(b"s\x01cret")));
        // Written after the secret, and escaped six-fold: no estimate to outgrow.
        req.labels = (0..50).map(|i| (format!("k{i}"), "\u{1}".repeat(100))).collect();
        let f = frame_of(&req).unwrap();
        assert_eq!(f.len(), f.capacity());
        assert_eq!(u32::from_be_bytes(f[..4].try_into().unwrap()) as usize, f.len() - 4);
        let back: Request = serde_json::from_slice(&f[4..]).unwrap();
        assert_eq!(back.labels.len(), 50);
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
