//! Encodings of the store's own structures: wrapped keys, DEK entries, pinned roots,
//! tombstones and refresh leases. docs/FORMAT.md specifies each one; all use the
//! canonical codec, and every decoder is strict (a malformed value is an integrity
//! failure, never a panic).

use std::collections::BTreeMap;

use serde::Serialize;

use super::Lease;
use crate::codec::{Malformed, Reader, Writer};
use crate::error::{Error, Result};
use crate::root::{WrapMechanism, Wrapped};

/// Version of the DEK-entry and meta encodings.
pub const ENTRY_FORMAT_V1: u8 = 1;

/// A wrapped key under one root of the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootWrapped {
    /// The store's id for the root (index into the pinned roots).
    pub root_id: u16,
    /// Mechanism and blob.
    pub wrapped: Wrapped,
}

pub(crate) fn encode_wrapped_list(w: &mut Writer, list: &[RootWrapped]) {
    w.count(list.len());
    for rw in list {
        w.u16(rw.root_id).u16(rw.wrapped.mechanism.code()).bytes(&rw.wrapped.blob);
    }
}

pub(crate) fn decode_wrapped_list(r: &mut Reader<'_>) -> Result<Vec<RootWrapped>, Malformed> {
    let n = r.count(8)?;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let root_id = r.u16()?;
        let mechanism = WrapMechanism::from_code(r.u16()?).ok_or(Malformed)?;
        let blob = r.bytes()?.to_vec();
        out.push(RootWrapped { root_id, wrapped: Wrapped { mechanism, blob } });
    }
    Ok(out)
}

/// Lifecycle state of a DEK version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DekState {
    /// Used for new writes (the highest active version) and reads.
    Active,
    /// Reads only; a newer version takes the writes.
    DecryptOnly,
    /// No record uses it; material kept until destroyed.
    Retired,
    /// Material erased (crypto-shredded).
    Destroyed,
}

impl std::fmt::Display for DekState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DekState::Active => "active",
            DekState::DecryptOnly => "decrypt-only",
            DekState::Retired => "retired",
            DekState::Destroyed => "destroyed",
        })
    }
}

impl DekState {
    fn code(self) -> u8 {
        match self {
            DekState::Active => 1,
            DekState::DecryptOnly => 2,
            DekState::Retired => 3,
            DekState::Destroyed => 4,
        }
    }

    fn from_code(c: u8) -> Result<Self, Malformed> {
        Ok(match c {
            1 => DekState::Active,
            2 => DekState::DecryptOnly,
            3 => DekState::Retired,
            4 => DekState::Destroyed,
            _ => return Err(Malformed),
        })
    }
}

/// One DEK version of a provider, wrapped under every root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DekEntry {
    /// Version number (1, 2, …), never reused.
    pub version: u32,
    /// Lifecycle state.
    pub state: DekState,
    /// Creation time, unix seconds.
    pub created: u64,
    /// Number of records sealed under it (the AES-GCM random-nonce budget).
    pub encryptions: u64,
    /// The key wrapped under each root.
    pub wrapped: Vec<RootWrapped>,
}

impl DekEntry {
    /// The canonical encoding (docs/FORMAT.md).
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(64 + self.wrapped.len() * 48);
        w.u8(ENTRY_FORMAT_V1).u32(self.version).u8(self.state.code()).u64(self.created).u64(self.encryptions);
        encode_wrapped_list(&mut w, &self.wrapped);
        w.finish()
    }

    /// Decodes and validates an entry (malformed input is an integrity failure).
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let f = || -> Result<Self, Malformed> {
            let mut r = Reader::new(bytes);
            if r.u8()? != ENTRY_FORMAT_V1 {
                return Err(Malformed);
            }
            let e = DekEntry {
                version: r.u32()?,
                state: DekState::from_code(r.u8()?)?,
                created: r.u64()?,
                encryptions: r.u64()?,
                wrapped: decode_wrapped_list(&mut r)?,
            };
            r.finish()?;
            Ok(e)
        };
        f().map_err(|_| Error::integrity("decoding a data-key entry"))
    }

    /// The blob wrapped under `root_id`.
    pub fn for_root(&self, root_id: u16) -> Option<&Wrapped> {
        self.wrapped.iter().find(|w| w.root_id == root_id).map(|w| &w.wrapped)
    }
}

/// A root pinned in the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RootPin {
    /// The store's id for this root.
    pub root_id: u16,
    /// `backend:fingerprint`, compared at open (shown as `identity`).
    #[serde(rename = "identity")]
    pub pin: String,
    /// Human description.
    pub description: String,
}

pub(crate) fn encode_roots(roots: &[RootPin]) -> Vec<u8> {
    let mut w = Writer::default();
    w.u8(ENTRY_FORMAT_V1).count(roots.len());
    for r in roots {
        w.u16(r.root_id).str(&r.pin).str(&r.description);
    }
    w.finish()
}

/// Decodes the pinned-roots meta value.
pub(crate) fn decode_roots(bytes: &[u8]) -> Result<Vec<RootPin>> {
    let f = || -> Result<Vec<RootPin>, Malformed> {
        let mut r = Reader::new(bytes);
        if r.u8()? != ENTRY_FORMAT_V1 {
            return Err(Malformed);
        }
        let n = r.count(10)?;
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(RootPin { root_id: r.u16()?, pin: r.str()?.to_owned(), description: r.str()?.to_owned() });
        }
        r.finish()?;
        Ok(out)
    };
    f().map_err(|_| Error::integrity("decoding the pinned roots"))
}

pub(crate) fn encode_wrapped_key(list: &[RootWrapped]) -> Vec<u8> {
    let mut w = Writer::default();
    w.u8(ENTRY_FORMAT_V1);
    encode_wrapped_list(&mut w, list);
    w.finish()
}

/// Decodes the wrapped integrity-key meta value.
pub(crate) fn decode_wrapped_key(bytes: &[u8]) -> Result<Vec<RootWrapped>> {
    let f = || -> Result<Vec<RootWrapped>, Malformed> {
        let mut r = Reader::new(bytes);
        if r.u8()? != ENTRY_FORMAT_V1 {
            return Err(Malformed);
        }
        let l = decode_wrapped_list(&mut r)?;
        r.finish()?;
        Ok(l)
    };
    f().map_err(|_| Error::integrity("decoding the store's wrapped integrity key"))
}

/// A revoked token's tombstone. In JSON, times are RFC 3339 plus `*_unix` seconds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tombstone {
    /// When, unix seconds.
    pub revoked_at: u64,
    /// The reason given (`revoke --reason`).
    pub reason: String,
    /// The audit actor that revoked it.
    pub actor: String,
    /// The token's not-after when it was revoked.
    pub expires_at: Option<u64>,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
}

impl Serialize for Tombstone {
    fn serialize<S: serde::Serializer>(&self, ser: S) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut s = ser.serialize_struct("Tombstone", 7)?;
        crate::clock::serialize_time(&mut s, "revoked_at", "revoked_at_unix", Some(self.revoked_at))?;
        s.serialize_field("reason", &self.reason)?;
        s.serialize_field("actor", &self.actor)?;
        crate::clock::serialize_time(&mut s, "expires_at", "expires_at_unix", self.expires_at)?;
        s.serialize_field("labels", &self.labels)?;
        s.end()
    }
}

const TOMBSTONE_V1: u8 = 1;

impl Tombstone {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(64);
        w.u8(TOMBSTONE_V1).u64(self.revoked_at).str(&self.reason).str(&self.actor).opt_u64(self.expires_at);
        w.count(self.labels.len());
        for (k, v) in &self.labels {
            w.str(k).str(v);
        }
        w.finish()
    }

    /// Decodes a stored tombstone.
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let f = || -> Result<Self, Malformed> {
            let mut r = Reader::new(bytes);
            if r.u8()? != TOMBSTONE_V1 {
                return Err(Malformed);
            }
            let revoked_at = r.u64()?;
            let reason = r.str()?.to_string();
            let actor = r.str()?.to_string();
            let expires_at = r.opt_u64()?;
            let n = r.count(8)?;
            let mut labels = BTreeMap::new();
            for _ in 0..n {
                labels.insert(r.str()?.to_string(), r.str()?.to_string());
            }
            r.finish()?;
            Ok(Tombstone { revoked_at, reason, actor, expires_at, labels })
        };
        f().map_err(|_| Error::integrity("decoding a tombstone"))
    }
}

const LEASE_V1: u8 = 1;

pub(crate) fn encode_lease(l: &Lease) -> Vec<u8> {
    let mut w = Writer::with_capacity(25);
    w.u8(LEASE_V1).raw(&l.owner).u64(l.until);
    w.finish()
}

/// A lease that does not decode is treated as absent: it only ever delays a refresh.
pub(crate) fn decode_lease(bytes: &[u8]) -> Option<Lease> {
    let mut r = Reader::new(bytes);
    if r.u8().ok()? != LEASE_V1 {
        return None;
    }
    let owner = r.array::<16>().ok()?;
    let until = r.u64().ok()?;
    r.finish().ok()?;
    Some(Lease { owner, until })
}

/// The store's binding to a hardware rollback counter (`meta.anchor`, a covered row):
/// which counter, and the value it has once the commit that wrote this row finished
/// (docs/FORMAT.md §"Rollback anchor").
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Anchor {
    pub counter_id: String,
    pub value: u64,
}

const ANCHOR_V1: u8 = 1;

impl Anchor {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(16 + self.counter_id.len());
        w.u8(ANCHOR_V1).str(&self.counter_id).u64(self.value);
        w.finish()
    }

    pub(crate) fn decode(bytes: &[u8]) -> Result<Self> {
        let f = || -> Result<Self, Malformed> {
            let mut r = Reader::new(bytes);
            if r.u8()? != ANCHOR_V1 {
                return Err(Malformed);
            }
            let counter_id = r.str()?.to_string();
            let value = r.u64()?;
            r.finish()?;
            Ok(Anchor { counter_id, value })
        };
        f().map_err(|_| Error::integrity("decoding the rollback anchor"))
    }
}
