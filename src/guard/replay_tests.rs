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
    db: &redb::Database,
    def: TableDefinition<'static, K, V>,
    out: &mut Vec<(&'static str, Vec<u8>, Vec<u8>)>,
) {
    let name = txn::TABLES.iter().find(|t| **t == redb::TableHandle::name(&def)).unwrap();
    let r = db.begin_read().unwrap();
    let t = r.open_table(def).unwrap();
    for row in t.iter().unwrap() {
        let (k, v) = row.unwrap();
        out.push((name, K::as_bytes(&k.value()).as_ref().to_vec(), V::as_bytes(&v.value()).as_ref().to_vec()));
    }
}

/// Every row of every table of the store file at `path`.
fn dump(path: &std::path::Path) -> Vec<(&'static str, Vec<u8>, Vec<u8>)> {
    let db = redb::Database::open(path).unwrap();
    let mut out = Vec::new();
    rows(&db, redb_store::META, &mut out);
    rows(&db, redb_store::DEKS, &mut out);
    rows(&db, redb_store::TOKENS, &mut out);
    rows(&db, redb_store::BY_DEK, &mut out);
    rows(&db, redb_store::BY_EXPIRY, &mut out);
    rows(&db, redb_store::TOMBSTONES, &mut out);
    rows(&db, redb_store::AUDIT, &mut out);
    rows(&db, redb_store::REFRESH_LEASES, &mut out);
    out
}

fn replay(path: &std::path::Path, batches: &[Vec<u8>]) {
    let db = redb::Database::open(path).unwrap();
    for b in batches {
        let t = db.begin_write().unwrap();
        txn::apply(&t, &txn::decode_writes(b).unwrap()).unwrap();
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
        g.inner.store.set_batch_sink(Some(Box::new(move |before, after, writes| {
            assert_eq!(after, before + 1, "a batch moves the generation by one");
            sink.lock().unwrap().push(txn::encode_writes(writes).unwrap());
            Ok(())
        })));
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
    let mut edited = txn::decode_writes(&batches[at]).unwrap();
    let w = edited.iter_mut().find(|w| w.table == 2).unwrap();
    let v = w.value.as_mut().unwrap();
    let last = v.len() - 1;
    v[last] ^= 1;
    let mut forged = batches.clone();
    forged[at] = txn::encode_writes(&edited).unwrap();
    replay(&d, &forged);
    assert!(TokenGuard::open(&d, StoreOptions::default(), vec![soft(&root2)], opts()).is_err());
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
