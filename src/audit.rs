//! The tamper-evident audit trail.
//!
//! Each event (time, operation, provider, name, outcome, actor, detail — never a
//! secret) is appended in the same write transaction as the change it records, with
//! a sequence number and `mac = HMAC-SHA256(audit_key, encoding ‖ prev_mac)`. The audit
//! key is derived from the store's integrity key, which only the root can unwrap. A
//! deleted, reordered or edited event breaks the chain; a truncated tail is caught by
//! the MAC'd head kept beside the chain, and the head itself is a row of the store's
//! authenticated state (`store::state`), so an older head put back is caught there.
//! What neither catches: an older copy of the whole store (events, head and state
//! together) — a rollback, which only a hardware counter or an external witness
//! (e.g. exporting the head to a SIEM) detects.
//!
//! Removing a root rotates the integrity key, and with it the audit key: the keys of
//! earlier eras stay in an archive sealed under the current integrity key
//! ([`AuditKeys`]), each with the last sequence number it MAC'd.

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::codec::{Malformed, Reader, Writer};
use crate::crypto::hmac;
use crate::error::{Error, Result};
use crate::store::journal::{Entry, Links};
use crate::store::{StoreRead, StoreWrite};

const EVENT_FORMAT_V1: u8 = 1;
const AUDIT_KEY_LABEL: &[u8] = b"tokenguard/audit-key/v1";
const ARCHIVE_KEY_LABEL: &[u8] = b"tokenguard/audit-archive/v1";
/// One archived key: the last sequence number it MAC'd, and the key.
const ARCHIVE_ENTRY_LEN: usize = 8 + 32;

/// The audit keys of a store: the one in force and those of earlier eras.
pub(crate) struct AuditKeys {
    current: Zeroizing<[u8; 32]>,
    /// (last sequence number MAC'd under it, key), ascending.
    archive: Vec<(u64, Zeroizing<[u8; 32]>)>,
}

impl AuditKeys {
    /// The keys of a store whose integrity key is `ik`, with the archive `sealed`
    /// (from `meta.audit_archive`) if there is one.
    pub(crate) fn load(ik: &[u8; 32], sealed: Option<&[u8]>) -> Result<Self> {
        let mut keys = AuditKeys { current: crate::crypto::derive(ik, AUDIT_KEY_LABEL), archive: Vec::new() };
        let Some(sealed) = sealed else { return Ok(keys) };
        let bad = || Error::integrity("opening the archive of audit keys");
        // At least one entry: 40 bytes and the 8 of the key wrap.
        if sealed.len() < ARCHIVE_ENTRY_LEN + 8 {
            return Err(bad());
        }
        use aes_kw::KeyInit;
        let kek = crate::crypto::derive(ik, ARCHIVE_KEY_LABEL);
        let mut plain = Zeroizing::new(vec![0u8; sealed.len().saturating_sub(8)]);
        aes_kw::KwAes256::new((&*kek).into()).unwrap_key(sealed, &mut plain).map_err(|_| bad())?;
        if plain.len() % ARCHIVE_ENTRY_LEN != 0 {
            return Err(bad());
        }
        for e in plain.chunks_exact(ARCHIVE_ENTRY_LEN) {
            let (seq, key) = e.split_at(8);
            let seq = u64::from_be_bytes(seq.try_into().map_err(|_| bad())?);
            let key: [u8; 32] = key.try_into().map_err(|_| bad())?;
            if keys.archive.last().is_some_and(|(last, _)| *last >= seq) {
                return Err(bad());
            }
            keys.archive.push((seq, Zeroizing::new(key)));
        }
        Ok(keys)
    }

    /// The key that MAC'd event `seq`.
    pub(crate) fn for_seq(&self, seq: u64) -> &[u8; 32] {
        self.archive.iter().find(|(last, _)| seq <= *last).map_or(&*self.current, |(_, k)| k)
    }

    /// The key new events are MAC'd with.
    pub(crate) fn current(&self) -> &[u8; 32] {
        &self.current
    }

    /// The keys after a rotation to integrity key `new_ik`, the current key archived
    /// as the one of events up to `last_seq`; and the archive sealed under `new_ik`
    /// (AES-KW, RFC 3394, of `(last_seq:u64 ‖ key:raw[32])*`).
    pub(crate) fn rotated(&self, new_ik: &[u8; 32], last_seq: u64) -> Result<(Self, Vec<u8>)> {
        let mut archive: Vec<(u64, Zeroizing<[u8; 32]>)> =
            self.archive.iter().map(|(s, k)| (*s, Zeroizing::new(**k))).collect();
        if archive.last().is_none_or(|(s, _)| *s < last_seq) {
            archive.push((last_seq, Zeroizing::new(*self.current)));
        }
        let mut plain = Zeroizing::new(Vec::with_capacity(archive.len() * ARCHIVE_ENTRY_LEN));
        for (s, k) in &archive {
            plain.extend_from_slice(&s.to_be_bytes());
            plain.extend_from_slice(&k[..]);
        }
        use aes_kw::KeyInit;
        let kek = crate::crypto::derive(new_ik, ARCHIVE_KEY_LABEL);
        let mut sealed = vec![0u8; plain.len() + 8];
        aes_kw::KwAes256::new((&*kek).into())
            .wrap_key(&plain, &mut sealed)
            .map_err(|_| Error::integrity("sealing the archive of audit keys"))?;
        Ok((AuditKeys { current: crate::crypto::derive(new_ik, AUDIT_KEY_LABEL), archive }, sealed))
    }
}
const DOMAIN: &[u8] = b"tokenguard/audit/v1";
const HEAD_DOMAIN: &[u8] = b"tokenguard/audit-head/v1";

/// One audit event as stored. In JSON, `time` is RFC 3339 and `time_unix` seconds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEvent {
    /// Position in the chain, from 1.
    pub seq: u64,
    /// Unix seconds.
    pub time: u64,
    /// Operation (`put`, `get`, `delete`, `dek-create`, `init`, …).
    pub op: String,
    /// Provider, or empty.
    pub provider: String,
    /// Token name, or empty.
    pub name: String,
    /// `ok` or a short error class.
    pub outcome: String,
    /// Who: OS user and pid for the CLI, caller-supplied for the library.
    pub actor: String,
    /// Non-secret detail (DEK version, counts).
    pub detail: String,
}

impl Serialize for AuditEvent {
    fn serialize<S: serde::Serializer>(&self, ser: S) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut s = ser.serialize_struct("AuditEvent", 9)?;
        s.serialize_field("seq", &self.seq)?;
        crate::clock::serialize_time(&mut s, "time", "time_unix", Some(self.time))?;
        s.serialize_field("op", &self.op)?;
        s.serialize_field("provider", &self.provider)?;
        s.serialize_field("name", &self.name)?;
        s.serialize_field("outcome", &self.outcome)?;
        s.serialize_field("actor", &self.actor)?;
        s.serialize_field("detail", &self.detail)?;
        s.end()
    }
}

/// The audit outcome of a read that ended with `r`: `ok`, `not-found`,
/// `integrity-failure`, `expired-or-revoked` or `error` (the CLI's reads and the
/// agent's record the same words).
pub fn read_outcome<T>(r: &crate::Result<T>) -> &'static str {
    use crate::error::exit;
    match r {
        Ok(_) => "ok",
        Err(e) => match e.exit_code() {
            exit::NOT_FOUND => "not-found",
            exit::INTEGRITY => "integrity-failure",
            exit::EXPIRED => "expired-or-revoked",
            _ => "error",
        },
    }
}

/// An event for [`crate::TokenGuard::audit_batch`], with its own actor.
#[derive(Debug, Clone, Default)]
pub struct AuditRecord {
    /// Who (e.g. an agent's client: `agent-client uid=… pid=…`).
    pub actor: String,
    /// What (`get`, `list`, `refused`, …).
    pub op: String,
    /// Provider of the token, if any.
    pub provider: String,
    /// Name of the token, if any.
    pub name: String,
    /// `ok`, `not-found`, `refused`, ….
    pub outcome: String,
    /// Free text (never a secret).
    pub detail: String,
}

/// An event to append (sequence and time are filled in).
#[derive(Debug, Clone, Default)]
pub(crate) struct NewEvent<'a> {
    pub op: &'a str,
    pub provider: &'a str,
    pub name: &'a str,
    pub outcome: &'a str,
    pub detail: String,
}

fn encode_body(e: &AuditEvent) -> Vec<u8> {
    let mut w = Writer::with_capacity(128);
    w.u8(EVENT_FORMAT_V1)
        .u64(e.seq)
        .u64(e.time)
        .str(&e.op)
        .str(&e.provider)
        .str(&e.name)
        .str(&e.outcome)
        .str(&e.actor)
        .str(&e.detail);
    w.finish()
}

fn mac(key: &[u8; 32], body: &[u8], prev: &[u8; 32]) -> [u8; 32] {
    hmac(key, &[DOMAIN, body, prev])
}

fn head_mac(key: &[u8; 32], seq: u64, last: &[u8; 32]) -> [u8; 32] {
    hmac(key, &[HEAD_DOMAIN, &seq.to_be_bytes(), last])
}

fn decode_stored(bytes: &[u8]) -> Result<(AuditEvent, [u8; 32], [u8; 32]), Malformed> {
    let mut r = Reader::new(bytes);
    let body = r.bytes()?;
    let prev = r.array::<32>()?;
    let m = r.array::<32>()?;
    r.finish()?;
    let mut b = Reader::new(body);
    if b.u8()? != EVENT_FORMAT_V1 {
        return Err(Malformed);
    }
    let e = AuditEvent {
        seq: b.u64()?,
        time: b.u64()?,
        op: b.str()?.into(),
        provider: b.str()?.into(),
        name: b.str()?.into(),
        outcome: b.str()?.into(),
        actor: b.str()?.into(),
        detail: b.str()?.into(),
    };
    b.finish()?;
    Ok((e, prev, m))
}

/// Decodes a stored audit entry (for fuzzing and external verifiers).
pub fn decode_entry(bytes: &[u8]) -> Result<AuditEvent> {
    decode_stored(bytes).map(|(e, _, _)| e).map_err(|_| Error::integrity("decoding an audit event"))
}

fn read_head(bytes: Option<&[u8]>) -> Result<(u64, [u8; 32], [u8; 32]), Malformed> {
    match bytes {
        None => Ok((0, [0; 32], [0; 32])),
        Some(b) => {
            let mut r = Reader::new(b);
            let seq = r.u64()?;
            let last = r.array::<32>()?;
            let hm = r.array::<32>()?;
            r.finish()?;
            Ok((seq, last, hm))
        }
    }
}

/// Appends one event: [`append_all`] of one.
pub(crate) fn append(txn: &impl StoreWrite, keys: &AuditKeys, actor: &str, ev: NewEvent<'_>) -> Result<u64> {
    append_all(txn, keys, [(actor.to_string(), ev)])
}

/// Appends `events` in order, each under its own actor, and moves the head once past
/// the last: [`link`] from the store's head, and the store is asked to write the
/// entries and the head together. Returns the last sequence number (the current one
/// when `events` is empty).
pub(crate) fn append_all<'e>(
    txn: &impl StoreWrite,
    keys: &AuditKeys,
    events: impl IntoIterator<Item = (String, NewEvent<'e>)>,
) -> Result<u64> {
    let head = txn.audit_head()?;
    let ((entries, new_head), seq) = link_seq(keys, head.as_deref(), events)?;
    if !entries.is_empty() {
        txn.append_audit(&entries, &new_head)?;
    }
    Ok(seq)
}

/// The next links of the chain whose head is `head`: `events` in order, each under
/// its own actor, encoded as stored, and the head after the last. The head is checked
/// once and the links are computed in memory; nothing is written (the store or the
/// read journal does that). No events: no entries, and the head as it was.
pub(crate) fn link<'e>(
    keys: &AuditKeys,
    head: Option<&[u8]>,
    events: impl IntoIterator<Item = (String, NewEvent<'e>)>,
) -> Result<Links> {
    link_seq(keys, head, events).map(|(links, _)| links)
}

/// The sequence number and last MAC of a stored head, its MAC checked.
fn checked_head(keys: &AuditKeys, head: Option<&[u8]>) -> Result<(u64, [u8; 32])> {
    let (seq, last, hm) = read_head(head).map_err(|_| Error::integrity("reading the audit head"))?;
    if seq > 0 && head_mac(keys.for_seq(seq), seq, &last) != hm {
        return Err(Error::integrity("checking the audit head"));
    }
    Ok((seq, last))
}

fn link_seq<'e>(
    keys: &AuditKeys,
    head: Option<&[u8]>,
    events: impl IntoIterator<Item = (String, NewEvent<'e>)>,
) -> Result<(Links, u64)> {
    let (mut seq, mut last) = checked_head(keys, head)?;
    let key = keys.current();
    let time = crate::clock::now();
    let mut entries = Vec::new();
    for (actor, ev) in events {
        let e = AuditEvent {
            seq: seq + 1,
            time,
            op: ev.op.into(),
            provider: ev.provider.into(),
            name: ev.name.into(),
            outcome: ev.outcome.into(),
            actor,
            detail: ev.detail,
        };
        let body = encode_body(&e);
        let m = mac(key, &body, &last);
        let mut w = Writer::with_capacity(body.len() + 72);
        w.bytes(&body).raw(&last).raw(&m);
        entries.push((e.seq, w.finish()));
        (seq, last) = (e.seq, m);
    }
    Ok(((entries, encode_head(key, seq, &last)), seq))
}

fn encode_head(key: &[u8; 32], seq: u64, last: &[u8; 32]) -> Vec<u8> {
    let mut h = Writer::with_capacity(72);
    h.u64(seq).raw(last).raw(&head_mac(key, seq, last));
    h.finish()
}

/// What of a read journal's frames continues a chain: see [`continuation`].
#[derive(Debug, Default)]
pub(crate) struct Continuation {
    /// The entries that continue the chain, in order, as stored.
    pub entries: Vec<Entry>,
    /// The head after them.
    pub head: Vec<u8>,
    /// Frames the chain already holds (folded before, or older rounds of the file).
    pub held: usize,
    /// Frames past the store's head that do not continue the chain: a write cut short
    /// by a crash, or an edit.
    pub discarded: usize,
    /// Frames at or below the store's head that are not the store's entry of that
    /// sequence number, byte for byte.
    pub conflicting: usize,
}

/// The frames of a read journal (`store::journal::read_frames`) that continue the
/// chain whose head is `head`: the first entry past the head must be the next link
/// (its sequence number, its previous-MAC and its own MAC checked), and so on; the
/// first frame that is not ends it. Frames at or below the head must equal the
/// store's entries (`stored`, by sequence number, from the lowest such frame on):
/// those are skipped, the others counted as conflicting.
pub(crate) fn continuation(
    keys: &AuditKeys,
    head: Option<&[u8]>,
    frames: &[Vec<u8>],
    stored: &[Entry],
) -> Result<Continuation> {
    let (mut seq, mut last) = checked_head(keys, head)?;
    let store_seq = seq;
    let mut out = Continuation::default();
    let mut ended = false;
    for f in frames {
        let decoded = decode_stored(f).ok();
        match decoded {
            Some((e, _, _)) if e.seq <= store_seq => {
                let same = stored.binary_search_by_key(&e.seq, |(s, _)| *s).is_ok_and(|i| stored[i].1 == *f);
                if same { out.held += 1 } else { out.conflicting += 1 }
            }
            Some((e, _, _)) if e.seq <= seq => out.discarded += 1,
            Some((e, p, m))
                if !ended && e.seq == seq + 1 && p == last && mac(keys.current(), &encode_body(&e), &p) == m =>
            {
                out.entries.push((e.seq, f.clone()));
                (seq, last) = (e.seq, m);
            }
            _ => {
                ended = true;
                out.discarded += 1;
            }
        }
    }
    out.head = encode_head(keys.current(), seq, &last);
    Ok(out)
}

/// Result of [`verify`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AuditReport {
    /// Events checked.
    pub events: u64,
    /// The first bad sequence number and why, if any.
    pub first_bad: Option<(u64, String)>,
}

/// Walks the whole chain and the head.
pub(crate) fn verify(txn: &impl StoreRead, keys: &AuditKeys) -> Result<AuditReport> {
    let mut prev = [0u8; 32];
    let mut n = 0u64;
    for (seq, v) in txn.audit_entries(0)? {
        let expect = n + 1;
        let bad = |why: &str| Ok(AuditReport { events: n, first_bad: Some((seq, why.to_string())) });
        let Ok((e, p, m)) = decode_stored(&v) else {
            return bad("event is malformed");
        };
        if seq != expect {
            return Ok(AuditReport {
                events: n,
                first_bad: Some((expect, format!("event {expect} is missing (next present is {seq})"))),
            });
        }
        if e.seq != seq {
            return bad("event was moved (its sequence number does not match its position)");
        }
        if p != prev {
            return bad("chain broken: previous-MAC does not match (an event before it was deleted or reordered)");
        }
        if mac(keys.for_seq(seq), &encode_body(&e), &p) != m {
            return bad("MAC mismatch: the event was edited");
        }
        prev = m;
        n += 1;
    }
    let head = txn.audit_head()?;
    let (hseq, hlast, hm) = read_head(head.as_deref()).map_err(|_| Error::integrity("reading the audit head"))?;
    if hseq != n || hlast != prev || (hseq > 0 && head_mac(keys.for_seq(hseq), hseq, &hlast) != hm) {
        return Ok(AuditReport {
            events: n,
            first_bad: Some((
                n + 1,
                format!("head says {hseq} events but {n} are present: the tail was truncated or the head edited"),
            )),
        });
    }
    Ok(AuditReport { events: n, first_bad: None })
}

/// Events with `seq >= from`, oldest first, decoded without verification.
pub(crate) fn list(txn: &impl StoreRead, from: u64) -> Result<Vec<AuditEvent>> {
    txn.audit_entries(from)?
        .iter()
        .map(|(_, v)| decode_stored(v).map(|(e, _, _)| e).map_err(|_| Error::integrity("decoding an audit event")))
        .collect()
}
