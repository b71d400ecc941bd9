//! The write recorder is complete: a copy of a store brought forward by replaying the
//! recorded batches of every kind of write equals the store, row for row, and opens.

#![allow(clippy::unwrap_used)]

use std::sync::{Arc, Mutex};

use redb::{Key, ReadableDatabase, ReadableTable, TableDefinition, Value};

use super::revoke::RevokeTarget;
use super::{GetOptions, GuardOptions, PutItem, PutOptions, TokenGuard};
use crate::root::RootKey;
use crate::root::soft::SoftRoot;
use crate::secret::Secret;
use crate::store::redb_store::{self, txn};
use crate::store::{Lease, StoreOptions, StoreWrite};

fn rows<K: Key + 'static, V: Value + 'static>(
    r: &redb::ReadTransaction,
    def: TableDefinition<'static, K, V>,
    out: &mut Vec<(&'static str, Vec<u8>, Vec<u8>)>,
) {
    let name = txn::TABLES.iter().find(|t| **t == redb::TableHandle::name(&def)).unwrap();
    let t = r.open_table(def).unwrap();
    for row in t.iter().unwrap() {
        let (k, v) = row.unwrap();
        out.push((name, K::as_bytes(&k.value()).as_ref().to_vec(), V::as_bytes(&v.value()).as_ref().to_vec()));
    }
}

/// Every row of every table a read transaction sees.
fn dump_txn(r: &redb::ReadTransaction) -> Vec<(&'static str, Vec<u8>, Vec<u8>)> {
    let mut out = Vec::new();
    rows(r, redb_store::META, &mut out);
    rows(r, redb_store::DEKS, &mut out);
    rows(r, redb_store::TOKENS, &mut out);
    rows(r, redb_store::BY_DEK, &mut out);
    rows(r, redb_store::BY_EXPIRY, &mut out);
    rows(r, redb_store::TOMBSTONES, &mut out);
    rows(r, redb_store::AUDIT, &mut out);
    rows(r, redb_store::REFRESH_LEASES, &mut out);
    out
}

/// Every row of the store a guard has open.
fn dump_of(g: &TokenGuard) -> Vec<(&'static str, Vec<u8>, Vec<u8>)> {
    let r = g.inner.store.read().unwrap();
    dump_txn(r.raw())
}

/// Every row of every table of the store file at `path`.
fn dump(path: &std::path::Path) -> Vec<(&'static str, Vec<u8>, Vec<u8>)> {
    dump_txn(&redb::Database::open(path).unwrap().begin_read().unwrap())
}

/// The rows of a sealed batch, its MAC not checked: the raw replay below proves the
/// recorder complete, whatever a catch-up would check.
fn rows_of(sealed: &[u8]) -> Vec<txn::RowWrite> {
    txn::decode_writes(&sealed[20..sealed.len() - 32]).unwrap()
}

/// `rows` sealed again in `sealed`'s envelope, its MAC left as it was.
fn reseal_unkeyed(sealed: &[u8], rows: &[txn::RowWrite]) -> Vec<u8> {
    let mut out = sealed[..20].to_vec();
    out.extend_from_slice(&txn::encode_writes(rows).unwrap());
    out.extend_from_slice(&sealed[sealed.len() - 32..]);
    out
}

fn replay(path: &std::path::Path, batches: &[Vec<u8>]) {
    let db = redb::Database::open(path).unwrap();
    for b in batches {
        let t = db.begin_write().unwrap();
        txn::apply(&t, &rows_of(b)).unwrap();
        t.commit().unwrap();
    }
}

fn opts() -> GuardOptions {
    GuardOptions { require_hardware: false, ..Default::default() }
}

fn raw(s: &str) -> Secret {
    Secret::raw(s.as_bytes().to_vec())
}

#[test]
fn a_copy_brought_forward_by_the_recorded_writes_equals_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let (a, root1, root2) = (dir.path().join("a.redb"), dir.path().join("r1.key"), dir.path().join("r2.key"));
    let soft = |p: &std::path::Path| -> Box<dyn RootKey> { Box::new(SoftRoot::open_or_create(p).unwrap()) };
    drop(TokenGuard::create(&a, StoreOptions::default(), vec![soft(&root1)], opts()).unwrap());
    let start = dir.path().join("start.redb");
    std::fs::copy(&a, &start).unwrap();

    let batches = Arc::new(Mutex::new(Vec::new()));
    let record = |g: &TokenGuard| {
        let sink = batches.clone();
        g.set_batch_sink(move |b: &txn::Batch| {
            assert_eq!(b.after, b.before + 1, "a batch moves the generation by one");
            assert_eq!(txn::batch_generations(&b.bytes), Some((b.before, b.after)));
            sink.lock().unwrap().push(b.bytes.clone());
            Ok(())
        });
    };
    let g = TokenGuard::open(&a, StoreOptions::default(), vec![soft(&root1)], opts()).unwrap();
    record(&g);
    // Every kind of write the guard makes: records with and without expiry (and
    // so their indexes), a first DEK, a batch, a rotation and a re-seal under it, a
    // deletion, revocations (tombstones), a shred, a lease, a root added (every DEK
    // wrapped again) and one removed (the integrity key rotated: a re-sealed head);
    // each audited.
    let exp = PutOptions { expires_at: Some(4_000_000_000), ..Default::default() };
    g.put("github", "ci", raw("ghp_one"), exp.clone()).unwrap();
    g.put("slack", "bot", raw("xoxb-one"), PutOptions::default()).unwrap();
    g.put_many(
        (0..5)
            .map(|i| PutItem {
                provider: "jira".into(),
                name: format!("t{i}"),
                secret: raw(&format!("jira-{i}")),
                options: exp.clone(),
            })
            .collect(),
    )
    .unwrap();
    g.rotate_dek("github").unwrap();
    g.put("github", "ci", raw("ghp_two"), PutOptions::default()).unwrap();
    g.put("github", "deploy", raw("ghp_three"), exp.clone()).unwrap();
    g.delete("jira", "t0").unwrap();
    g.revoke(RevokeTarget::One { provider: "jira", name: "t1" }, "leaked").unwrap();
    g.revoke(RevokeTarget::Provider("slack"), "offboarded").unwrap();
    g.shred("slack").unwrap();
    g.inner
        .store
        .write(|t| t.put_lease("github", "deploy", Some(Lease { owner: [7; 16], until: 4_000_000_000 })))
        .unwrap();
    g.add_root(soft(&root2)).unwrap();
    drop(g);
    let g = TokenGuard::open(&a, StoreOptions::default(), vec![soft(&root1), soft(&root2)], opts()).unwrap();
    record(&g);
    g.remove_root(1).unwrap();
    g.put("github", "after", raw("ghp_four"), PutOptions::default()).unwrap();
    drop(g);
    let batches = std::mem::take(&mut *batches.lock().unwrap());
    assert!(batches.len() >= 13, "{} batches", batches.len());

    // The whole replay equals the store, row for row, and opens under the root that
    // is left, every secret readable.
    let b = dir.path().join("b.redb");
    std::fs::copy(&start, &b).unwrap();
    replay(&b, &batches);
    let (want, got) = (dump(&a), dump(&b));
    assert!(want.len() > 30, "{} rows", want.len());
    assert_eq!(got, want);
    let g = TokenGuard::open(&b, StoreOptions::default(), vec![soft(&root2)], opts()).unwrap();
    for (p, n, v) in [("github", "ci", "ghp_two"), ("github", "deploy", "ghp_three"), ("jira", "t4", "jira-4")] {
        let (got, _) = g.get_field(p, n, None, GetOptions::default()).unwrap();
        assert_eq!(got.expose(), v.as_bytes(), "{p}/{n}");
    }
    g.audit_verify().unwrap();
    drop(g);

    // The comparison sees one batch missing; and a batch edited in the store's
    // database is refused when the copy opens.
    let c = dir.path().join("c.redb");
    std::fs::copy(&start, &c).unwrap();
    replay(&c, &batches[..batches.len() - 1]);
    assert_ne!(dump(&c), want);
    let d = dir.path().join("d.redb");
    std::fs::copy(&start, &d).unwrap();
    // The last put's record, which no later write replaces.
    let at = batches.len() - 1;
    let mut edited = rows_of(&batches[at]);
    let w = edited.iter_mut().find(|w| w.table == 2).unwrap();
    let v = w.value.as_mut().unwrap();
    let last = v.len() - 1;
    v[last] ^= 1;
    let mut forged = batches.clone();
    forged[at] = reseal_unkeyed(&batches[at], &edited);
    replay(&d, &forged);
    assert!(TokenGuard::open(&d, StoreOptions::default(), vec![soft(&root2)], opts()).is_err());

    // The checked way in: a guard on a copy catches up with the sealed batches.
    let e = dir.path().join("e.redb");
    std::fs::copy(&start, &e).unwrap();
    let host = TokenGuard::open(&e, StoreOptions::default(), vec![soft(&root1)], opts()).unwrap();
    let before = dump_of(&host);
    // An edited batch (its MAC no longer matches), one left out, one repeated, and
    // one from another store are refused, and leave the store as it was.
    // An audit entry is not a covered row (its chain is): only the batch's MAC
    // stands between an edit of one and the copy.
    let edit_first = |table: u8| {
        let mut rows = rows_of(&batches[0]);
        let value = rows.iter_mut().find(|w| w.table == table).unwrap().value.as_mut().unwrap();
        value[0] ^= 1;
        let mut out = batches.clone();
        out[0] = reseal_unkeyed(&batches[0], &rows);
        out
    };
    let refused: [(&str, Vec<Vec<u8>>); 5] = [
        ("a record edited", edit_first(2)),
        ("an audit entry edited", edit_first(6)),
        ("one left out", [&batches[..2], &batches[3..]].concat()),
        ("one repeated", [&batches[..2], &batches[1..]].concat()),
        ("another store's", other_store_batches(dir.path(), &root1)),
    ];
    for (what, bs) in refused {
        let err = host.catch_up(|_| Ok(bs.clone())).unwrap_err();
        assert!(matches!(err, crate::Error::Integrity { .. }), "{what}: {err}");
        assert_eq!(dump_of(&host), before, "{what}: the store changed");
    }
    // A host that holds the state key (an insider, a compromised host) seals rows
    // that do not add up to the head they bring: the batch's MAC holds, and the
    // state check refuses it (batch by batch, from the verified state).
    let armed = host.store().state_key().unwrap();
    let (_, start_head) = host.state_head().unwrap();
    // Batch `at` sealed again, rows edited, on the head the batch before it ends on.
    let forge = |at: usize, edit: &dyn Fn(&mut Vec<txn::RowWrite>)| {
        let prev = match at {
            0 => start_head.clone(),
            _ => rows_of(&batches[at - 1])
                .into_iter()
                .find(|w| w.table == 0 && w.key == b"state_head")
                .and_then(|w| w.value)
                .unwrap(),
        };
        let (before_gen, after_gen, mut rows) = txn::open_batch(&armed.0, &armed.1, &prev, &batches[at]).unwrap();
        edit(&mut rows);
        let mut out = batches.clone();
        out[at] = txn::seal_batch(&armed.0, &armed.1, &prev, &[], before_gen, after_gen, &rows).unwrap().bytes;
        out
    };
    let flip_record = |rows: &mut Vec<txn::RowWrite>| {
        let v = rows.iter_mut().find(|w| w.table == 2).unwrap().value.as_mut().unwrap();
        v[0] ^= 1;
    };
    let forged: [(&str, Vec<Vec<u8>>); 4] = [
        ("a record edited under the key", forge(0, &flip_record)),
        ("a record left out under the key", forge(0, &|rows| rows.retain(|w| w.table != 2))),
        (
            "a record added under the key",
            forge(0, &|rows| {
                let mut extra = rows.iter().find(|w| w.table == 2).unwrap().clone();
                extra.key = <(&str, &str) as Value>::as_bytes(&("github", "smuggled")).clone();
                rows.push(extra);
            }),
        ),
        ("the second batch's record edited under the key", forge(1, &flip_record)),
    ];
    for (what, bs) in forged {
        let err = host.catch_up(|_| Ok(bs.clone())).unwrap_err();
        assert!(matches!(err, crate::Error::Integrity { .. }), "{what}: {err}");
        assert!(err.to_string().contains("do not add up"), "{what}: {err}");
        assert_eq!(dump_of(&host), before, "{what}: the store changed");
    }
    // Rows the state does not cover but the store needs (its schema version): the
    // metadata must still parse after the batches, as the full check reads it.
    let unsupported = forge(0, &|rows| {
        rows.push(txn::RowWrite {
            table: 0,
            key: b"schema_version".to_vec(),
            value: Some(99u32.to_be_bytes().to_vec()),
        });
    });
    let err = host.catch_up(|_| Ok(unsupported[..1].to_vec())).unwrap_err();
    assert!(matches!(err, crate::Error::UnsupportedVersion { found: 99, .. }), "{err}");
    assert_eq!(dump_of(&host), before, "the store changed");
    // Rows only the store's creation or a copy's joining writes: no batch may.
    for key in ["store_id", "created", "fleet_member"] {
        let own = forge(0, &|rows| {
            rows.push(txn::RowWrite { table: 0, key: key.as_bytes().to_vec(), value: Some(vec![7; 16]) });
        });
        let err = host.catch_up(|_| Ok(own[..1].to_vec())).unwrap_err();
        assert!(err.to_string().contains("a copy's own mark"), "{key}: {err}");
        assert_eq!(dump_of(&host), before, "{key}: the store changed");
    }
    // Up to the root added; a host with root 1 only cannot follow root 1's removal
    // (its root reads nothing written after), and keeps what it had.
    let added = batches.iter().position(|b| rows_of(b).iter().any(|w| w.table == 0 && w.key == b"roots")).unwrap();
    let caught = host.catch_up(|_| Ok(batches[..=added].to_vec())).unwrap();
    assert_eq!(caught.after - caught.before, u64::try_from(added + 1).unwrap());
    // Checked batch by batch, the state this process now trusts is exactly what a
    // full verification of the copy finds (records with their tags included).
    assert!(host.store().known_is_verified().unwrap());
    let at_added = dump_of(&host);
    let err = host.catch_up(|_| Ok(batches[added + 1..].to_vec())).unwrap_err();
    assert!(matches!(err, crate::Error::WrongRoot { .. }), "{err}");
    assert_eq!(dump_of(&host), at_added);
    drop(host);
    // Reopened with root 2 (now pinned) as well, it follows the rotation, and its
    // copy equals the store row for row; it reads, writes and audits under the new key.
    let host = TokenGuard::open(&e, StoreOptions::default(), vec![soft(&root1), soft(&root2)], opts()).unwrap();
    let caught = host.catch_up(|_| Ok(batches[added + 1..].to_vec())).unwrap();
    assert!(caught.rekeyed);
    assert_eq!(dump_of(&host), want);
    let (got, _) = host.get_field("github", "after", None, GetOptions::default()).unwrap();
    assert_eq!(got.expose(), b"ghp_four");
    // The pinned roots changed under it: it writes nothing (it would wrap new keys
    // for the roots it opened with) until it is opened again.
    let err = host.put("github", "on-e", raw("ghp_five"), PutOptions::default()).unwrap_err();
    assert!(matches!(&err, crate::Error::Config(m) if m.contains("open the store again")), "{err}");
    drop(host);
    let host = TokenGuard::open(&e, StoreOptions::default(), vec![soft(&root2)], opts()).unwrap();
    host.put("github", "on-e", raw("ghp_five"), PutOptions::default()).unwrap();
    host.audit_verify().unwrap();
    // Nothing more to apply: nothing changes.
    let g0 = host.generation().unwrap();
    assert_eq!(host.catch_up(|g| Ok(if g == g0 { Vec::new() } else { vec![vec![0]] })).unwrap().after, g0);
}

/// The sealed batches of two writes to another store under the same root.
fn other_store_batches(dir: &std::path::Path, root: &std::path::Path) -> Vec<Vec<u8>> {
    let p = dir.join("other.redb");
    let soft: Box<dyn RootKey> = Box::new(SoftRoot::open_or_create(root).unwrap());
    let g = TokenGuard::create(&p, StoreOptions::default(), vec![soft], opts()).unwrap();
    let out = Arc::new(Mutex::new(Vec::new()));
    let sink = out.clone();
    g.set_batch_sink(move |b: &txn::Batch| {
        sink.lock().unwrap().push(b.bytes.clone());
        Ok(())
    });
    g.put("github", "x", raw("other"), PutOptions::default()).unwrap();
    g.put("github", "y", raw("other"), PutOptions::default()).unwrap();
    drop(g);
    std::mem::take(&mut *out.lock().unwrap())
}

#[test]
fn a_write_batch_decodes_only_as_encoded() {
    let writes = vec![
        txn::RowWrite { table: 2, key: b"k".to_vec(), value: Some(b"v".to_vec()) },
        txn::RowWrite { table: 6, key: vec![0; 8], value: None },
    ];
    let enc = txn::encode_writes(&writes).unwrap();
    assert_eq!(txn::decode_writes(&enc).unwrap(), writes);
    for cut in 0..enc.len() {
        assert!(txn::decode_writes(&enc[..cut]).is_err(), "cut at {cut}");
    }
    let mut long = enc.clone();
    long.push(0);
    assert!(txn::decode_writes(&long).is_err());
    let mut bad_table = enc.clone();
    bad_table[8] = 8;
    assert!(txn::decode_writes(&bad_table).is_err());
    // A count no input could hold reserves nothing.
    let mut huge = enc[..4].to_vec();
    huge.extend_from_slice(&u32::MAX.to_be_bytes());
    assert!(txn::decode_writes(&huge).is_err());
    // Bytes that do not decode as the table's types are an error, not a panic.
    let dir = tempfile::tempdir().unwrap();
    let db = redb::Database::create(dir.path().join("x.redb")).unwrap();
    let t = db.begin_write().unwrap();
    let bad = [txn::RowWrite { table: 2, key: vec![0xff, 0xff, 0xff], value: Some(vec![]) }];
    assert!(txn::apply(&t, &bad).is_err());
    // An audit key (a u64) of 3 bytes; a key that is not UTF-8; an index value that
    // is not empty (redb ignores it, so two batches would make one change).
    let short = [txn::RowWrite { table: 6, key: vec![1, 2, 3], value: Some(b"x".to_vec()) }];
    assert!(txn::apply(&t, &short).is_err());
    let not_utf8 = [txn::RowWrite { table: 0, key: vec![0xc3, 0x28], value: Some(b"x".to_vec()) }];
    assert!(txn::apply(&t, &not_utf8).is_err());
    let encoded = <(&str, u32, &str) as Value>::as_bytes(&("p", 1, "n"));
    let k = AsRef::<[u8]>::as_ref(&encoded).to_vec();
    let index = |value: Vec<u8>| [txn::RowWrite { table: 3, key: k.clone(), value: Some(value) }];
    txn::apply(&t, &index(Vec::new())).unwrap();
    assert!(txn::apply(&t, &index(vec![0])).is_err());
}

/// A batch fits only on the state it was written on: two hosts' batches for one
/// generation (a fork the database kept) cannot be spliced into one history, even
/// where the state heads' accumulators would agree (audit-only writes: the audit
/// head each leaves behind is overwritten by the next).
#[test]
fn a_batch_from_another_branch_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root.key");
    let soft = || -> Box<dyn RootKey> { Box::new(SoftRoot::open_or_create(&root).unwrap()) };
    let base = dir.path().join("base.redb");
    drop(TokenGuard::create(&base, StoreOptions::default(), vec![soft()], opts()).unwrap());
    let host = |name: &str| {
        let p = dir.path().join(format!("{name}.redb"));
        std::fs::copy(&base, &p).unwrap();
        let g = TokenGuard::open(&p, StoreOptions::default(), vec![soft()], opts()).unwrap();
        let out = Arc::new(Mutex::new(Vec::new()));
        let sink = out.clone();
        g.set_batch_sink(move |b: &txn::Batch| {
            sink.lock().unwrap().push(b.bytes.clone());
            Ok(())
        });
        (g, out)
    };
    let note = |g: &TokenGuard, what: &str| g.inner.write(|t| g.audit_in(t, "note", what.into())).unwrap();
    let (x, xs) = host("x");
    note(&x, "on branch x");
    let (y, ys) = host("y");
    note(&y, "on branch y");
    note(&y, "on branch y, second");
    let (xs, ys) = (xs.lock().unwrap().clone(), ys.lock().unwrap().clone());
    let (z, _) = host("z");
    let err = z.catch_up(|_| Ok(vec![xs[0].clone(), ys[1].clone()])).unwrap_err();
    assert!(matches!(err, crate::Error::Integrity { .. }), "{err}");
    assert_eq!(z.catch_up(|_| Ok(ys.clone())).unwrap().after, y.generation().unwrap());
    z.audit_verify().unwrap();
}
