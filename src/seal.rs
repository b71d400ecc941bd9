//! Sealed token records: the encoding, the AAD that binds a record to its place, and
//! AES-256-GCM seal/open.
//!
//! A record is `header ‖ nonce ‖ ciphertext+tag`. The header holds everything that is
//! not secret (format version, provider, name, DEK version, metadata) and is
//! authenticated verbatim: the AAD is a domain-separation constant, the store id and
//! the header bytes. Editing any of them (an expiry, a state, a label), or moving a
//! record to another provider, name or store, makes the open fail. The exact layout is
//! in docs/FORMAT.md, with a test vector checked by `tests/format_vector.rs`.

use std::collections::BTreeMap;

use aes_gcm::Aes256Gcm;
use aes_gcm::aead::{Aead, Nonce, Payload};
use serde::Serialize;

use crate::codec::{Malformed, Reader, Writer};
use crate::error::{Error, Result};
use crate::secret::Secret;

/// Version of the record format written by this build.
pub const RECORD_FORMAT_V1: u8 = 1;

/// Domain-separation constant at the head of every record's AAD.
pub const RECORD_AAD_DOMAIN: &[u8] = b"tokenguard/record/v1";

/// Length of the AES-GCM nonce.
pub const NONCE_LEN: usize = 12;

/// Length of a store id.
pub const STORE_ID_LEN: usize = 16;

/// Lifecycle state of a stored token (authenticated metadata).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum TokenState {
    /// Usable (subject to its not-after).
    Active,
    /// The provider rejected its refresh token; a human must re-authorise.
    NeedsReauth,
    /// Revoked: the secret was erased, only the tombstone remains.
    Revoked,
}

impl TokenState {
    fn code(self) -> u8 {
        match self {
            TokenState::Active => 1,
            TokenState::NeedsReauth => 2,
            TokenState::Revoked => 3,
        }
    }

    fn from_code(c: u8) -> Result<Self, Malformed> {
        Ok(match c {
            1 => TokenState::Active,
            2 => TokenState::NeedsReauth,
            3 => TokenState::Revoked,
            _ => return Err(Malformed),
        })
    }
}

/// Whether the sealed secret is a raw secret or a token set (not secret).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SecretKind {
    /// One opaque secret.
    Raw,
    /// Named fields (OAuth token set).
    TokenSet,
}

impl SecretKind {
    fn code(self) -> u8 {
        match self {
            SecretKind::Raw => 1,
            SecretKind::TokenSet => 2,
        }
    }

    fn from_code(c: u8) -> Result<Self, Malformed> {
        match c {
            1 => Ok(SecretKind::Raw),
            2 => Ok(SecretKind::TokenSet),
            _ => Err(Malformed),
        }
    }

    pub(crate) fn of(secret: &Secret) -> Self {
        match secret {
            Secret::Raw(_) => SecretKind::Raw,
            Secret::TokenSet(_) => SecretKind::TokenSet,
        }
    }
}

/// Non-secret metadata of a token, authenticated with it. In JSON, times come as
/// RFC 3339 (`expires_at`) and unix seconds (`expires_at_unix`); the stored state is
/// left out in favour of one computed status ([`crate::guard::Condition`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Metadata {
    /// When the token was first stored (unix seconds).
    pub created: u64,
    /// When it was last written (unix seconds).
    pub updated: u64,
    /// Not-after (unix seconds); `None` for a token that does not expire.
    pub expires_at: Option<u64>,
    /// Stored lifecycle state. Not serialised: outputs carry one computed status
    /// ([`crate::guard::Condition`]) instead, so "active" never stands beside "expired".
    pub state: TokenState,
    /// Raw secret or token set.
    pub kind: SecretKind,
    /// OAuth `token_type`, e.g. `Bearer`.
    pub token_type: Option<String>,
    /// OAuth scopes, in the order given.
    pub scopes: Vec<String>,
    /// Free-form labels (owner, environment, ticket…), sorted by key.
    pub labels: BTreeMap<String, String>,
}

impl Serialize for Metadata {
    fn serialize<S: serde::Serializer>(&self, ser: S) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut s = ser.serialize_struct("Metadata", 10)?;
        crate::clock::serialize_time(&mut s, "created", "created_unix", Some(self.created))?;
        crate::clock::serialize_time(&mut s, "updated", "updated_unix", Some(self.updated))?;
        crate::clock::serialize_time(&mut s, "expires_at", "expires_at_unix", self.expires_at)?;
        s.serialize_field("kind", &self.kind)?;
        s.serialize_field("token_type", &self.token_type)?;
        s.serialize_field("scopes", &self.scopes)?;
        s.serialize_field("labels", &self.labels)?;
        s.end()
    }
}

impl Metadata {
    /// Whether the token is past its not-after at `now` (unix seconds).
    pub fn is_expired_at(&self, now: u64) -> bool {
        self.expires_at.is_some_and(|t| now >= t)
    }
}

/// Everything about a record except its nonce and ciphertext.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordHeader {
    /// Provider (e.g. `github`).
    pub provider: String,
    /// Token name within the provider.
    pub name: String,
    /// Version of the provider DEK that sealed it.
    pub dek_version: u32,
    /// Authenticated metadata.
    pub meta: Metadata,
}

impl RecordHeader {
    pub(crate) fn encode(&self, w: &mut Writer) {
        let m = &self.meta;
        w.u8(RECORD_FORMAT_V1)
            .str(&self.provider)
            .str(&self.name)
            .u32(self.dek_version)
            .u64(m.created)
            .u64(m.updated)
            .opt_u64(m.expires_at)
            .u8(m.state.code())
            .u8(m.kind.code())
            .opt_str(m.token_type.as_deref())
            .count(m.scopes.len());
        for s in &m.scopes {
            w.str(s);
        }
        w.count(m.labels.len());
        for (k, v) in &m.labels {
            w.str(k).str(v);
        }
    }
}

/// A record split into its parts with its header fully decoded, borrowing the stored
/// bytes. Built on [`RecordView`], the one decoder of the record format.
pub struct ParsedRecord<'a> {
    /// The decoded header.
    pub header: RecordHeader,
    view: RecordView<'a>,
}

impl<'a> ParsedRecord<'a> {
    /// Splits stored record bytes. Malformed input is an integrity failure.
    pub fn parse(bytes: &'a [u8]) -> Result<Self> {
        let view = RecordView::parse(bytes)?;
        let header = RecordHeader {
            provider: view.provider.to_owned(),
            name: view.name.to_owned(),
            dek_version: view.dek_version,
            meta: view.metadata()?,
        };
        Ok(ParsedRecord { header, view })
    }

    /// Authenticates and decrypts with the DEK of `header.dek_version`.
    pub(crate) fn open(&self, cipher: &Aes256Gcm, store_id: &[u8; STORE_ID_LEN]) -> Result<Secret> {
        self.view.open(cipher, store_id)
    }
}

/// A record read in place for the hot path: the header fields a `get` needs,
/// borrowed from the stored bytes, with the rest of the header validated but not
/// decoded (no allocation). [`RecordView::metadata`] decodes it all on demand.
pub struct RecordView<'a> {
    header_bytes: &'a [u8],
    /// Provider, as the header names it.
    pub provider: &'a str,
    /// Token name.
    pub name: &'a str,
    /// DEK version.
    pub dek_version: u32,
    /// Not-after, unix seconds.
    pub expires_at: Option<u64>,
    /// First write.
    pub created: u64,
    /// Last write.
    pub updated: u64,
    /// Lifecycle state.
    pub state: TokenState,
    kind: SecretKind,
    token_type: Option<&'a str>,
    /// The scopes and labels, validated but not decoded.
    tail: &'a [u8],
    nonce: [u8; NONCE_LEN],
    ciphertext: &'a [u8],
}

/// Walks the scopes and labels at the end of a header, calling `scope` and `label`
/// for each: the one decoder of that part, used both to validate (no-op callbacks) and
/// to decode. Label keys must be strictly increasing (one encoding per label set).
fn walk_tail<'a>(
    r: &mut Reader<'a>,
    mut scope: impl FnMut(&'a str),
    mut label: impl FnMut(&'a str, &'a str),
) -> Result<(), Malformed> {
    for _ in 0..r.count(4)? {
        scope(r.str()?);
    }
    let mut last: Option<&str> = None;
    for _ in 0..r.count(8)? {
        let k = r.str()?;
        if last.is_some_and(|l| l >= k) {
            return Err(Malformed);
        }
        label(k, r.str()?);
        last = Some(k);
    }
    Ok(())
}

impl<'a> RecordView<'a> {
    /// Splits and validates stored record bytes: every field of the header is checked
    /// (strict and canonical), the variable-length tail is kept borrowed. Malformed
    /// input is an integrity failure.
    pub fn parse(bytes: &'a [u8]) -> Result<Self> {
        Self::parse_inner(bytes).map_err(|_| Error::integrity("parsing a sealed record"))
    }

    fn parse_inner(bytes: &'a [u8]) -> Result<Self, Malformed> {
        let mut r = Reader::new(bytes);
        if r.u8()? != RECORD_FORMAT_V1 {
            return Err(Malformed);
        }
        let provider = r.str()?;
        let name = r.str()?;
        let dek_version = r.u32()?;
        let created = r.u64()?;
        let updated = r.u64()?;
        let expires_at = r.opt_u64()?;
        let state = TokenState::from_code(r.u8()?)?;
        let kind = SecretKind::from_code(r.u8()?)?;
        let token_type = r.opt_str()?;
        let tail_start = bytes.len() - r.remaining();
        walk_tail(&mut r, |_| {}, |_, _| {})?;
        let header_len = bytes.len() - r.remaining();
        let nonce = r.array::<NONCE_LEN>()?;
        let ciphertext = r.bytes()?;
        r.finish()?;
        Ok(RecordView {
            header_bytes: &bytes[..header_len],
            provider,
            name,
            dek_version,
            expires_at,
            created,
            updated,
            state,
            kind,
            token_type,
            tail: &bytes[tail_start..header_len],
            nonce,
            ciphertext,
        })
    }

    /// Raw secret or token set.
    pub fn kind(&self) -> SecretKind {
        self.kind
    }

    /// The full metadata (allocates).
    pub fn metadata(&self) -> Result<Metadata> {
        let mut scopes = Vec::new();
        let mut labels = BTreeMap::new();
        walk_tail(
            &mut Reader::new(self.tail),
            |s| scopes.push(s.to_owned()),
            |k, v| {
                labels.insert(k.to_owned(), v.to_owned());
            },
        )
        .map_err(|_| Error::integrity("parsing a sealed record"))?;
        Ok(Metadata {
            created: self.created,
            updated: self.updated,
            expires_at: self.expires_at,
            state: self.state,
            kind: self.kind,
            token_type: self.token_type.map(str::to_owned),
            scopes,
            labels,
        })
    }

    /// Authenticates and decrypts.
    pub(crate) fn open(&self, cipher: &Aes256Gcm, store_id: &[u8; STORE_ID_LEN]) -> Result<Secret> {
        open_parts(cipher, store_id, self.header_bytes, self.nonce, self.ciphertext)
    }
}

/// AES-GCM open of a record's parts; the AAD is assembled on the stack when it fits.
fn open_parts(
    cipher: &Aes256Gcm,
    store_id: &[u8; STORE_ID_LEN],
    header_bytes: &[u8],
    nonce: [u8; NONCE_LEN],
    ciphertext: &[u8],
) -> Result<Secret> {
    let nonce = Nonce::<Aes256Gcm>::from(nonce);
    let decrypt = |aad: &[u8]| {
        cipher
            .decrypt(&nonce, Payload { msg: ciphertext, aad })
            .map_err(|_| Error::integrity("opening a sealed record"))
    };
    const STACK_AAD: usize = 512;
    let aad_len = 4 + RECORD_AAD_DOMAIN.len() + STORE_ID_LEN + header_bytes.len();
    let pt = if aad_len <= STACK_AAD {
        let mut buf = [0u8; STACK_AAD];
        // The domain's length prefix, as `Writer::bytes` writes it (a 20-byte constant).
        buf[..4].copy_from_slice(&u32::try_from(RECORD_AAD_DOMAIN.len()).unwrap_or(u32::MAX).to_be_bytes());
        let mut at = 4;
        for part in [RECORD_AAD_DOMAIN, &store_id[..], header_bytes] {
            buf[at..at + part.len()].copy_from_slice(part);
            at += part.len();
        }
        decrypt(&buf[..aad_len])?
    } else {
        decrypt(&record_aad(store_id, header_bytes))?
    };
    Secret::decode(zeroize::Zeroizing::new(pt))
}

/// The AAD of a record: `bytes(RECORD_AAD_DOMAIN) ‖ store_id ‖ header`.
pub fn record_aad(store_id: &[u8; STORE_ID_LEN], header_bytes: &[u8]) -> Vec<u8> {
    let mut w = Writer::with_capacity(4 + RECORD_AAD_DOMAIN.len() + STORE_ID_LEN + header_bytes.len());
    w.bytes(RECORD_AAD_DOMAIN).raw(store_id).raw(header_bytes);
    w.finish()
}

/// Seals `secret` under `cipher` into a complete record with a fresh random nonce.
pub(crate) fn seal_record(
    cipher: &Aes256Gcm,
    store_id: &[u8; STORE_ID_LEN],
    header: &RecordHeader,
    secret: &Secret,
) -> Result<Vec<u8>> {
    seal_record_with_nonce(cipher, store_id, header, secret, crate::crypto::random_array()?)
}

/// As [`seal_record`] with a caller-chosen nonce. The guard passes nonces it drew
/// from the OS CSPRNG in one call for a whole batch; test vectors pass fixed ones. A
/// nonce must never repeat under one key.
pub(crate) fn seal_record_with_nonce(
    cipher: &Aes256Gcm,
    store_id: &[u8; STORE_ID_LEN],
    header: &RecordHeader,
    secret: &Secret,
    nonce: [u8; NONCE_LEN],
) -> Result<Vec<u8>> {
    let mut w = Writer::with_capacity(256);
    header.encode(&mut w);
    let header_len = w.len();
    let plaintext = secret.encode();
    let mut out = w.finish();
    let aad = record_aad(store_id, &out[..header_len]);
    let ct = cipher
        .encrypt(&Nonce::<Aes256Gcm>::from(nonce), Payload { msg: &plaintext, aad: &aad })
        .map_err(|_| Error::integrity("sealing a record"))?;
    out.extend_from_slice(&nonce);
    let mut w = Writer::with_capacity(4 + ct.len());
    w.bytes(&ct);
    out.extend_from_slice(&w.finish());
    Ok(out)
}

/// Opens a record with its DEK given directly: the whole decoding and check a
/// reader needs (docs/FORMAT.md), used by the format test vector, property tests and
/// fuzzing. A service never needs it: the guard finds and unwraps the DEK itself.
pub fn open_record_with_key(
    dek: &[u8; 32],
    store_id: &[u8; STORE_ID_LEN],
    bytes: &[u8],
) -> Result<(RecordHeader, Secret)> {
    use aes_gcm::KeyInit;
    let rec = ParsedRecord::parse(bytes)?;
    let cipher = Aes256Gcm::new(dek.into());
    let secret = rec.open(&cipher, store_id)?;
    Ok((rec.header, secret))
}

/// Seals a record with a given DEK and nonce. Only for test vectors: a nonce must
/// never repeat under one key, which is why the guard always draws a random one.
pub fn seal_record_for_test_vector(
    dek: &[u8; 32],
    store_id: &[u8; STORE_ID_LEN],
    header: &RecordHeader,
    secret: &Secret,
    nonce: [u8; NONCE_LEN],
) -> Result<Vec<u8>> {
    use aes_gcm::KeyInit;
    seal_record_with_nonce(&Aes256Gcm::new(dek.into()), store_id, header, secret, nonce)
}

/// A DEK ready to seal and open records: the same code path the guard runs, for
/// tools that hold a DEK themselves (benchmarks, independent verification).
pub struct RecordKey(Aes256Gcm);

impl RecordKey {
    /// Expands `dek` into a cipher (zeroized on drop).
    pub fn new(dek: &[u8; 32]) -> Self {
        use aes_gcm::KeyInit;
        RecordKey(Aes256Gcm::new(dek.into()))
    }

    /// Seals a record with a fresh random nonce.
    pub fn seal(&self, store_id: &[u8; STORE_ID_LEN], header: &RecordHeader, secret: &Secret) -> Result<Vec<u8>> {
        seal_record(&self.0, store_id, header, secret)
    }

    /// Parses and opens a record.
    pub fn open(&self, store_id: &[u8; STORE_ID_LEN], bytes: &[u8]) -> Result<(RecordHeader, Secret)> {
        let rec = ParsedRecord::parse(bytes)?;
        let s = rec.open(&self.0, store_id)?;
        Ok((rec.header, s))
    }
}

impl std::fmt::Debug for RecordKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RecordKey([REDACTED])")
    }
}
