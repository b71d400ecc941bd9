//! Sealed backups: the store's ciphertexts and wrapped keys, never a plaintext.
//!
//! A backup is one file (docs/FORMAT.md §backup): a magic and version, the store id,
//! the pinned roots, the wrapped integrity key, every DEK entry, every sealed record,
//! the tombstones and the audit chain, then an HMAC-SHA256 over all of it under a key
//! derived from the store's integrity key. Only a configured root can unwrap that key,
//! so only the owner of a root can verify — or forge — a backup. Restoring checks the
//! MAC before writing anything, and restores into a new store file with the same store
//! id, so every record's AAD still matches. The file is written 0600 to a temporary
//! name, synced and renamed: a crash leaves either no backup or a whole one.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use crate::codec::{Malformed, Reader, Writer};
use crate::crypto::{MAC_LEN, hmac, hmac_verify};
use crate::error::{Error, Result};
use crate::guard::{GuardOptions, TokenGuard};
use crate::root::RootKey;
use crate::store::{Dump, SCHEMA_VERSION, Store, StoreMeta, StoreOptions, StoreRead, schema};

/// First bytes of every backup file.
pub const BACKUP_MAGIC: &[u8; 8] = b"TGBACKUP";
/// Backup format version 1 (tokenguard 0.1): everything up to the audit head.
pub const BACKUP_FORMAT_V1: u8 = 1;
/// Backup format version written by this build: version 1 plus the archive of
/// earlier audit keys (docs/FORMAT.md).
pub const BACKUP_FORMAT_V2: u8 = 2;
const MAC_LABEL: &[u8] = b"tokenguard/backup-mac/v1";

/// What a backup held.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct BackupSummary {
    /// DEK versions.
    pub deks: u64,
    /// Sealed records.
    pub tokens: u64,
    /// Tombstones of revoked tokens.
    pub tombstones: u64,
    /// Audit events.
    pub audit_events: u64,
}

fn count(n: usize) -> u64 {
    n as u64
}

/// Serialises the whole store (one read snapshot) into backup bytes.
pub fn export(guard: &TokenGuard) -> Result<(Vec<u8>, BackupSummary)> {
    // The snapshot is verified against its state head before it is dumped: a backup
    // MAC'd over replayed rows would bring them back at the next restore.
    let txn = guard.store().read()?;
    let state = guard.store().verify_snapshot(&txn)?;
    if !state.verified {
        return Err(Error::integrity("backing up a store whose rows do not match its authenticated state"));
    }
    let d = txn.dump()?;
    let mut w = Writer::with_capacity(4096);
    w.raw(BACKUP_MAGIC).u8(BACKUP_FORMAT_V2).raw(&d.store_id).u32(SCHEMA_VERSION);
    w.bytes(&d.roots).bytes(&d.integrity_key);
    w.count(d.deks.len());
    for (p, ver, v) in &d.deks {
        w.str(p).u32(*ver).bytes(v);
    }
    w.count(d.tokens.len());
    for (p, n, v) in &d.tokens {
        w.str(p).str(n).bytes(v);
    }
    w.count(d.tombstones.len());
    for (p, n, v) in &d.tombstones {
        w.str(p).str(n).bytes(v);
    }
    w.count(d.audit.len());
    for (seq, v) in &d.audit {
        w.u64(*seq).bytes(v);
    }
    w.bytes(&d.audit_head);
    w.bytes(&d.audit_archive);
    let mut out = w.finish();
    let tag = hmac(&guard.integrity_subkey(MAC_LABEL), &[&out]);
    out.extend_from_slice(&tag);
    let s = BackupSummary {
        deks: count(d.deks.len()),
        tokens: count(d.tokens.len()),
        tombstones: count(d.tombstones.len()),
        audit_events: count(d.audit.len()),
    };
    Ok((out, s))
}

/// Writes a backup of `guard` to `path` (0600, atomically; refuses to overwrite).
pub fn write_backup(guard: &TokenGuard, path: &Path) -> Result<BackupSummary> {
    if path.exists() {
        return Err(Error::InvalidInput(format!("{} exists; choose a new backup file name", path.display())));
    }
    crate::files::check_parent_dir(path)?;
    let (bytes, summary) = export(guard)?;
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let mut f = fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp).map_err(|e| Error::Io {
        operation: "creating backup",
        path: path.into(),
        source: e,
    })?;
    let res = f.write_all(&bytes).and_then(|_| f.sync_all());
    if let Err(e) = res {
        let _ = fs::remove_file(&tmp);
        return Err(Error::Io { operation: "writing backup", path: path.into(), source: e });
    }
    // A hard link never replaces a file another process created meanwhile.
    let placed = fs::hard_link(&tmp, path);
    let _ = fs::remove_file(&tmp);
    placed.map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            Error::InvalidInput(format!("{} exists; choose a new backup file name", path.display()))
        } else {
            Error::Io { operation: "placing backup", path: path.into(), source: e }
        }
    })?;
    audit_backup(guard, &summary, &path.display().to_string())?;
    Ok(summary)
}

/// Writes a backup of `guard` to `out` (e.g. stdout, `backup -`); `to` names it in
/// the audit trail.
pub fn write_backup_to(guard: &TokenGuard, out: &mut impl Write, to: &str) -> Result<BackupSummary> {
    let (bytes, summary) = export(guard)?;
    out.write_all(&bytes).map_err(|e| Error::Io { operation: "writing backup to", path: to.into(), source: e })?;
    audit_backup(guard, &summary, to)?;
    Ok(summary)
}

fn audit_backup(guard: &TokenGuard, summary: &BackupSummary, to: &str) -> Result<()> {
    guard.store().write(|txn| guard.audit_in(txn, "backup", format!("{} tokens to {to}", summary.tokens)))
}

fn parse(body: &[u8]) -> Result<Dump, Malformed> {
    let mut r = Reader::new(body);
    if r.raw(8)? != BACKUP_MAGIC {
        return Err(Malformed);
    }
    let format = r.u8()?;
    if !matches!(format, BACKUP_FORMAT_V1 | BACKUP_FORMAT_V2) {
        return Err(Malformed);
    }
    let store_id = r.array()?;
    if !(crate::store::MIN_SCHEMA_VERSION..=SCHEMA_VERSION).contains(&r.u32()?) {
        return Err(Malformed);
    }
    let mut d = Dump { store_id, roots: r.bytes()?.to_vec(), integrity_key: r.bytes()?.to_vec(), ..Dump::default() };
    for _ in 0..r.count(12)? {
        d.deks.push((r.str()?.into(), r.u32()?, r.bytes()?.to_vec()));
    }
    for _ in 0..r.count(12)? {
        d.tokens.push((r.str()?.into(), r.str()?.into(), r.bytes()?.to_vec()));
    }
    for _ in 0..r.count(12)? {
        d.tombstones.push((r.str()?.into(), r.str()?.into(), r.bytes()?.to_vec()));
    }
    for _ in 0..r.count(12)? {
        d.audit.push((r.u64()?, r.bytes()?.to_vec()));
    }
    d.audit_head = r.bytes()?.to_vec();
    if format == BACKUP_FORMAT_V2 {
        d.audit_archive = r.bytes()?.to_vec();
    }
    r.finish()?;
    Ok(d)
}

/// Checks a backup's structure (no key needed). For fuzzing and quick triage; the
/// MAC is only checked by [`restore`], which has the root.
pub fn check_structure(bytes: &[u8]) -> Result<()> {
    let body = bytes
        .len()
        .checked_sub(MAC_LEN)
        .map(|n| &bytes[..n])
        .ok_or_else(|| Error::integrity("reading a backup (truncated)"))?;
    parse(body).map(drop).map_err(|_| Error::integrity("parsing a backup"))
}

/// Restores the backup at `path` into a new store at `store_path`, under `roots`.
/// Nothing is written unless the backup's MAC verifies under the store's integrity
/// key, which one of `roots` must unwrap.
pub fn restore(
    path: &Path,
    store_path: &Path,
    store_opts: StoreOptions,
    roots: Vec<Box<dyn RootKey>>,
    opts: GuardOptions,
) -> Result<(TokenGuard, BackupSummary)> {
    let bytes = fs::read(path).map_err(Error::io("reading backup", path))?;
    let from = path.display().to_string();
    restore_bytes(&bytes, ("restore", &from), store_path, store_opts, roots, opts)
}

/// [`restore`] of backup bytes held in memory (`migrate`'s copy); `event` is the
/// audit action and where the bytes came from.
pub fn restore_bytes(
    bytes: &[u8],
    event: (&str, &str),
    store_path: &Path,
    store_opts: StoreOptions,
    roots: Vec<Box<dyn RootKey>>,
    opts: GuardOptions,
) -> Result<(TokenGuard, BackupSummary)> {
    if store_path.exists() {
        return Err(Error::StoreExists(store_path.into()));
    }
    // Before any root unwraps anything: a software root that require_hardware
    // refuses never opens the backup either.
    crate::guard::check_hardware(&roots, opts.require_hardware)?;
    let (body, tag) = bytes
        .len()
        .checked_sub(MAC_LEN)
        .map(|n| bytes.split_at(n))
        .ok_or_else(|| Error::integrity("reading a backup (truncated)"))?;
    let d = parse(body).map_err(|_| Error::integrity("parsing a backup"))?;
    let meta = StoreMeta {
        schema: crate::store::SCHEMA_VERSION,
        store_id: d.store_id,
        roots: schema::decode_roots(&d.roots)?,
        integrity_key: schema::decode_wrapped_key(&d.integrity_key)?,
    };
    let ik = crate::guard::unlock_key(&meta.roots, &meta.integrity_key, &roots)?;
    if !hmac_verify(&crate::crypto::derive(ik.expose(), MAC_LABEL), body, tag) {
        return Err(Error::integrity("verifying the backup's MAC"));
    }
    let summary = BackupSummary {
        deks: count(d.deks.len()),
        tokens: count(d.tokens.len()),
        tombstones: count(d.tombstones.len()),
        audit_events: count(d.audit.len()),
    };
    // The same creation as `init`, with the backup's rows in its first transaction:
    // a failure leaves no store file behind.
    let key = crate::store::state::StateKey::derive(ik.expose());
    drop(Store::create(store_path, store_opts, &meta, key, crate::clock::now(), |txn| txn.load(&d))?);
    // A restore is a deliberate step back: the new store is bound to the rollback
    // counter (if one is configured) at its current value.
    let (action, from) = event;
    let opened = TokenGuard::open_inner(store_path, store_opts, roots, opts, true).and_then(|guard| {
        guard.store().write(|txn| guard.audit_in(txn, action, format!("{} tokens from {from}", summary.tokens)))?;
        Ok(guard)
    });
    match opened {
        Ok(guard) => Ok((guard, summary)),
        Err(e) => {
            // The file is this call's own (created new above): a restore that did
            // not finish leaves none behind.
            if let Err(r) = fs::remove_file(store_path) {
                tracing::error!(path = %store_path.display(), error = %r, "the unfinished restore could not be removed");
            }
            Err(e)
        }
    }
}
