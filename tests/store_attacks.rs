//! The store-writer attack suite (README "Security notes"): an attacker who can read
//! and write the store file, but holds no root, edits it between CLI calls. The edits
//! are made by `raw` below, which links redb and names the tables itself; it uses none
//! of tokenguard's store code, as an attacker's tool would not. Every case replays a
//! row that was once valid (an old token after a revoke or an overwrite, an old DEK
//! entry after a rotation or a shred, an old tombstone, old roots, an old audit head)
//! or edits an index, and must end in exit 4 or a refusal — never in old plaintext.
#![allow(missing_docs, clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::{TestEnv, code, stderr};
use tokenguard::TokenGuard;

/// The attacker's tool: redb and the table names, nothing of tokenguard.
mod raw {
    use std::collections::BTreeMap;
    use std::path::Path;

    use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

    pub const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
    pub const DEKS: TableDefinition<(&str, u32), &[u8]> = TableDefinition::new("deks");
    pub const TOKENS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("tokens");
    pub const BY_DEK: TableDefinition<(&str, u32, &str), ()> = TableDefinition::new("by_dek");
    pub const BY_EXPIRY: TableDefinition<(u64, &str, &str), ()> = TableDefinition::new("by_expiry");
    pub const TOMBSTONES: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("tombstones");
    pub const AUDIT: TableDefinition<u64, &[u8]> = TableDefinition::new("audit");

    fn db(path: &Path) -> Database {
        let mut b = redb::Builder::new();
        b.set_concurrency_mode(redb::ConcurrencyMode::MultiWriter);
        b.open(path).unwrap()
    }

    /// Every security-relevant row, as stored.
    #[derive(Clone, Debug, Default)]
    pub struct Snap {
        pub meta: BTreeMap<String, Vec<u8>>,
        pub deks: BTreeMap<(String, u32), Vec<u8>>,
        pub tokens: BTreeMap<(String, String), Vec<u8>>,
        pub tombstones: BTreeMap<(String, String), Vec<u8>>,
        pub audit: BTreeMap<u64, Vec<u8>>,
    }

    pub fn snapshot(path: &Path) -> Snap {
        let db = db(path);
        let r = db.begin_read().unwrap();
        let mut s = Snap::default();
        for item in r.open_table(META).unwrap().iter().unwrap() {
            let (k, v) = item.unwrap();
            s.meta.insert(k.value().into(), v.value().to_vec());
        }
        for item in r.open_table(DEKS).unwrap().iter().unwrap() {
            let (k, v) = item.unwrap();
            let (p, ver) = k.value();
            s.deks.insert((p.into(), ver), v.value().to_vec());
        }
        for item in r.open_table(TOKENS).unwrap().iter().unwrap() {
            let (k, v) = item.unwrap();
            let (p, n) = k.value();
            s.tokens.insert((p.into(), n.into()), v.value().to_vec());
        }
        for item in r.open_table(TOMBSTONES).unwrap().iter().unwrap() {
            let (k, v) = item.unwrap();
            let (p, n) = k.value();
            s.tombstones.insert((p.into(), n.into()), v.value().to_vec());
        }
        for item in r.open_table(AUDIT).unwrap().iter().unwrap() {
            let (k, v) = item.unwrap();
            s.audit.insert(k.value(), v.value().to_vec());
        }
        s
    }

    /// One edit of the file, in one redb transaction.
    pub enum Edit<'a> {
        Token(&'a str, &'a str, Option<&'a [u8]>),
        Dek(&'a str, u32, Option<&'a [u8]>),
        Tombstone(&'a str, &'a str, Option<&'a [u8]>),
        Meta(&'a str, Option<&'a [u8]>),
        AuditFrom(u64),
        ByDek(&'a str, u32, &'a str, bool),
        ByExpiry(u64, &'a str, &'a str, bool),
    }

    pub fn edit(path: &Path, edits: &[Edit<'_>]) {
        let db = db(path);
        let w = db.begin_write().unwrap();
        for e in edits {
            match *e {
                Edit::Token(p, n, v) => {
                    let mut t = w.open_table(TOKENS).unwrap();
                    match v {
                        Some(v) => drop(t.insert((p, n), v).unwrap()),
                        None => drop(t.remove((p, n)).unwrap()),
                    }
                }
                Edit::Dek(p, ver, v) => {
                    let mut t = w.open_table(DEKS).unwrap();
                    match v {
                        Some(v) => drop(t.insert((p, ver), v).unwrap()),
                        None => drop(t.remove((p, ver)).unwrap()),
                    }
                }
                Edit::Tombstone(p, n, v) => {
                    let mut t = w.open_table(TOMBSTONES).unwrap();
                    match v {
                        Some(v) => drop(t.insert((p, n), v).unwrap()),
                        None => drop(t.remove((p, n)).unwrap()),
                    }
                }
                Edit::Meta(k, v) => {
                    let mut t = w.open_table(META).unwrap();
                    match v {
                        Some(v) => drop(t.insert(k, v).unwrap()),
                        None => drop(t.remove(k).unwrap()),
                    }
                }
                Edit::AuditFrom(seq) => {
                    let mut t = w.open_table(AUDIT).unwrap();
                    let later: Vec<u64> = t.range(seq..).unwrap().map(|i| i.unwrap().0.value()).collect();
                    for s in later {
                        t.remove(s).unwrap();
                    }
                }
                Edit::ByDek(p, v, n, add) => {
                    let mut t = w.open_table(BY_DEK).unwrap();
                    if add {
                        t.insert((p, v, n), ()).unwrap();
                    } else {
                        t.remove((p, v, n)).unwrap();
                    }
                }
                Edit::ByExpiry(at, p, n, add) => {
                    let mut t = w.open_table(BY_EXPIRY).unwrap();
                    if add {
                        t.insert((at, p, n), ()).unwrap();
                    } else {
                        t.remove((at, p, n)).unwrap();
                    }
                }
            }
        }
        w.commit().unwrap();
    }
}

use raw::Edit;

const OLD: &[u8] = b"ghp_OLD_SECRET_MUST_NOT_COME_BACK";

fn ok(env: &TestEnv, args: &[&str], stdin: &[u8]) -> String {
    let o = env.run(args, stdin);
    assert_eq!(code(&o), 0, "{args:?}: {}", stderr(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The edited store: `get` exits 4 without the old plaintext, and `status`,
/// `doctor` and `audit verify` all say something is wrong.
fn assert_caught(env: &TestEnv, what: &str, token: &str) {
    let (p, n) = token.split_once('/').unwrap();
    let o = env.run(&["get", p, n], b"");
    assert_eq!(code(&o), 4, "{what}: get: {}", stderr(&o));
    assert!(!o.stdout.windows(OLD.len()).any(|w| w == OLD), "{what}: old plaintext on stdout");
    for args in [&["status", token][..], &["doctor"], &["audit", "verify"], &["list"]] {
        let o = env.run(args, b"");
        assert_eq!(code(&o), 4, "{what}: {args:?} must fail with 4: {}", stderr(&o));
        assert!(!o.stdout.windows(OLD.len()).any(|w| w == OLD), "{what}: {args:?} printed the old plaintext");
    }
    let o = env.run(&["doctor"], b"");
    let doctor = String::from_utf8_lossy(&o.stdout);
    // The state check fails; with the roots replayed, the open fails before it.
    assert!(
        doctor.contains("FAIL authenticated state") || doctor.contains("FAIL open store: integrity"),
        "{what}: {doctor}"
    );
}

fn store(name: &str) -> TestEnv {
    let env = TestEnv::new(name);
    ok(&env, &["init"], b"");
    ok(&env, &["put", "github", "ci-bot"], OLD);
    ok(&env, &["put", "github", "other"], b"ghp_other");
    env
}

#[test]
fn a_revoked_token_does_not_come_back() {
    let env = store("atk-revoke");
    let before = raw::snapshot(&env.store_path);
    ok(&env, &["revoke", "github/ci-bot", "--reason", "leaked"], b"");
    let row = &before.tokens[&("github".into(), "ci-bot".into())];
    // The old row alone (its tombstone stays), then the old row without the tombstone.
    raw::edit(&env.store_path, &[Edit::Token("github", "ci-bot", Some(row))]);
    assert_caught(&env, "old row after revoke", "github/ci-bot");
    raw::edit(&env.store_path, &[Edit::Tombstone("github", "ci-bot", None)]);
    assert_caught(&env, "old row and no tombstone after revoke", "github/ci-bot");
}

#[test]
fn an_overwritten_token_does_not_roll_back() {
    let env = store("atk-overwrite");
    let before = raw::snapshot(&env.store_path);
    ok(&env, &["put", "github", "ci-bot"], b"ghp_NEW");
    let row = &before.tokens[&("github".into(), "ci-bot".into())];
    raw::edit(&env.store_path, &[Edit::Token("github", "ci-bot", Some(row))]);
    assert_caught(&env, "old row after overwrite", "github/ci-bot");
}

#[test]
fn old_dek_rows_undo_neither_rotation_nor_shred() {
    let env = store("atk-dek");
    let before = raw::snapshot(&env.store_path);
    let v1 = before.deks[&("github".into(), 1)].clone();
    ok(&env, &["rotate-dek", "github"], b"");
    // The active v1 entry back: new writes would land on the old version with its
    // encryption counter reset.
    raw::edit(&env.store_path, &[Edit::Dek("github", 1, Some(&v1)), Edit::Dek("github", 2, None)]);
    assert_caught(&env, "old DEK row after rotate", "github/ci-bot");
    assert_eq!(code(&env.run(&["put", "github", "new"], b"x")), 4, "no write on the rolled-back DEK table");

    let env = store("atk-shred");
    let before = raw::snapshot(&env.store_path);
    ok(&env, &["shred", "github", "--yes"], b"");
    let v1 = &before.deks[&("github".into(), 1)];
    raw::edit(&env.store_path, &[Edit::Dek("github", 1, Some(v1))]);
    assert_caught(&env, "old DEK row after shred", "github/ci-bot");
}

#[test]
fn old_tombstones_roots_and_state_heads_are_caught() {
    // A tombstone replayed over a re-issued name.
    let env = store("atk-tomb");
    ok(&env, &["revoke", "github/ci-bot", "--reason", "leaked"], b"");
    let revoked = raw::snapshot(&env.store_path);
    ok(&env, &["put", "github", "ci-bot"], b"ghp_REISSUED");
    let ts = &revoked.tombstones[&("github".into(), "ci-bot".into())];
    raw::edit(&env.store_path, &[Edit::Tombstone("github", "ci-bot", Some(ts))]);
    assert_caught(&env, "old tombstone", "github/ci-bot");

    // A tombstone deleted: status would say "not found" instead of "revoked".
    let env = store("atk-tomb-del");
    ok(&env, &["revoke", "github/ci-bot", "--reason", "leaked"], b"");
    raw::edit(&env.store_path, &[Edit::Tombstone("github", "ci-bot", None)]);
    assert_caught(&env, "deleted tombstone", "github/ci-bot");

    // The state head deleted, or an older one put back over newer rows.
    let env = store("atk-head");
    let before = raw::snapshot(&env.store_path);
    ok(&env, &["put", "github", "third"], b"x");
    raw::edit(&env.store_path, &[Edit::Meta("state_head", Some(&before.meta["state_head"]))]);
    assert_caught(&env, "older state head", "github/ci-bot");
    raw::edit(&env.store_path, &[Edit::Meta("state_head", None)]);
    assert_caught(&env, "no state head", "github/ci-bot");
    // Nor can it pose as a store from before the head: the refusal names the upgrade.
    raw::edit(&env.store_path, &[Edit::Meta("schema_version", Some(&1u32.to_be_bytes()))]);
    let o = env.run(&["get", "github", "ci-bot"], b"");
    assert_ne!(code(&o), 0);
    // … and the upgrade that would vouch for its rows refuses: its integrity key
    // carries the (keyed) marker of a store made with a state head.
    let o = env.run(&["upgrade"], b"");
    assert_eq!(code(&o), 4, "{}", stderr(&o));
    assert!(stderr(&o).contains("state head was removed"), "{}", stderr(&o));
    assert_ne!(code(&env.run(&["get", "github", "ci-bot"], b"")), 0, "still refused after the refused upgrade");

    // The roots and the wrapped integrity key from before a root was removed.
    let env = store("atk-roots");
    let o = env.run(&["rotate-root", "--new-key-label", &format!("{}-next", env.key_label)], b"");
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let two_roots = raw::snapshot(&env.store_path);
    let text = std::fs::read_to_string(&env.config_path).unwrap();
    let moved =
        text.replace(&format!("key_label = \"{}\"", env.key_label), &format!("key_label = \"{}-next\"", env.key_label));
    std::fs::write(&env.config_path, moved).unwrap();
    ok(&env, &["root", "remove", "1"], b"");
    raw::edit(
        &env.store_path,
        &[
            Edit::Meta("roots", Some(&two_roots.meta["roots"])),
            Edit::Meta("integrity_key", Some(&two_roots.meta["integrity_key"])),
        ],
    );
    assert_caught(&env, "old roots", "github/ci-bot");
}

#[test]
fn a_cut_audit_tail_is_caught() {
    let env = store("atk-audit");
    let before = raw::snapshot(&env.store_path);
    let cut_at = before.audit.keys().max().unwrap() + 1;
    ok(&env, &["put", "github", "later1"], b"x");
    ok(&env, &["revoke", "github/later1", "--reason", "r"], b"");
    // The older head back, and the later events gone: a consistent, shorter chain.
    raw::edit(&env.store_path, &[Edit::Meta("audit_head", Some(&before.meta["audit_head"])), Edit::AuditFrom(cut_at)]);
    assert_caught(&env, "cut audit tail", "github/ci-bot");

    // The whole trail wiped.
    let env = store("atk-audit-wipe");
    raw::edit(&env.store_path, &[Edit::Meta("audit_head", None), Edit::AuditFrom(0)]);
    assert_caught(&env, "wiped audit trail", "github/ci-bot");
}

#[test]
fn edited_indexes_change_nothing() {
    // A stale expiry entry for a live token: purge must not delete it.
    let env = store("atk-index");
    raw::edit(&env.store_path, &[Edit::ByExpiry(1, "github", "ci-bot", true)]);
    let o = env.run(&["purge", "--expired"], b"");
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(ok(&env, &["get", "github", "ci-bot"], b"").as_bytes(), OLD);

    // The by_dek entries of the version-1 records gone: retire must still see them.
    ok(&env, &["rotate-dek", "github"], b"");
    raw::edit(&env.store_path, &[Edit::ByDek("github", 1, "ci-bot", false), Edit::ByDek("github", 1, "other", false)]);
    let o = env.run(&["retire", "github", "--below", "2"], b"");
    assert_ne!(code(&o), 0, "retire erased a data key records still use");
    assert!(stderr(&o).contains("2 records"), "{}", stderr(&o));
    assert_eq!(ok(&env, &["get", "github", "ci-bot"], b"").as_bytes(), OLD);
    // An index entry for a record that does not exist is ignored too.
    raw::edit(&env.store_path, &[Edit::ByDek("github", 2, "ghost", true), Edit::ByExpiry(2, "github", "ghost", true)]);
    ok(&env, &["purge", "--expired"], b"");
    let doctor = ok(&env, &["doctor"], b"");
    assert!(!doctor.contains("FAIL"), "{doctor}");
}

/// A long-running library guard sees a change made by another process within its
/// recheck interval (default 1 s): revocation at once (the row is gone), shredding
/// and an edit of the file within the interval, although it holds the DEK cached.
#[test]
fn lifecycle_changes_reach_a_running_process_within_the_recheck_interval() {
    let env = store("atk-running");
    let g = env.open();
    assert_eq!(g.get("github", "ci-bot").unwrap().field(None).unwrap().expose(), OLD);
    let before = raw::snapshot(&env.store_path);

    ok(&env, &["revoke", "github/ci-bot", "--reason", "leaked"], b"");
    assert!(matches!(g.get("github", "ci-bot"), Err(tokenguard::Error::Revoked { .. })));

    // The file edited under the running process: the old row put back.
    let row = &before.tokens[&("github".into(), "ci-bot".into())];
    raw::edit(&env.store_path, &[Edit::Token("github", "ci-bot", Some(row))]);
    // It knows the row is gone at this generation: the replay is caught at once.
    match g.get("github", "ci-bot") {
        Err(e @ tokenguard::Error::Integrity { .. }) => assert_eq!(e.exit_code(), 4),
        other => panic!("replayed row under a running guard: {:?}", other.map(|_| "plaintext")),
    }
    drop(g);

    // Shredding by another process reaches a guard that holds the DEK in its cache.
    let env = store("atk-running-shred");
    let g = env.open();
    assert_eq!(g.get("github", "other").unwrap().field(None).unwrap().expose(), b"ghp_other");
    ok(&env, &["shred", "github", "--yes"], b"");
    let t = Instant::now();
    loop {
        match g.get("github", "other") {
            Err(tokenguard::Error::Shredded { .. }) => break,
            Ok(_) => assert!(t.elapsed() < Duration::from_millis(1500), "shredded key used for {:?}", t.elapsed()),
            Err(e) => panic!("after shred: unexpected {e:?}"),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Finding 10: a configured root whose key was replaced under the pinned label and id
/// (someone with token access generated a new key there) must not be used, although
/// another root opens the store: it would otherwise wrap every new data key, for
/// whoever made it.
#[test]
fn a_replaced_root_key_is_not_used() {
    use cryptoki::mechanism::Mechanism;
    use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass};
    use tokenguard::GuardOptions;

    let env = TestEnv::new("atk-replaced-root");
    let g = env.init();
    g.put("github", "x", tokenguard::Secret::raw(b"ghp_X".to_vec()), Default::default()).unwrap();
    let recovery = env.dir.join("recovery.key");
    let soft = tokenguard::root::soft::SoftRoot::open_or_create(&recovery).unwrap();
    g.add_root(Box::new(soft)).unwrap();
    drop(g);

    // The HSM key replaced by another with the same label and id.
    let session = common::user_session();
    let old = common::find_key(&session, &env.key_label);
    assert_eq!(old.len(), 1);
    let id = match session.get_attributes(old[0], &[AttributeType::Id]).unwrap().pop() {
        Some(Attribute::Id(id)) => id,
        other => panic!("key id: {other:?}"),
    };
    common::with_token_lock(|| session.destroy_object(old[0])).unwrap();
    common::with_token_lock(|| {
        session.generate_key(
            &Mechanism::AesKeyGen,
            &[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::AES),
                Attribute::ValueLen(32.into()),
                Attribute::Token(true),
                Attribute::Private(true),
                Attribute::Sensitive(true),
                Attribute::Extractable(false),
                Attribute::Label(env.key_label.as_bytes().to_vec()),
                Attribute::Id(id),
                Attribute::Wrap(true),
                Attribute::Unwrap(true),
            ],
        )
    })
    .unwrap();

    let c = env.config();
    let mut roots = c.build_roots(tokenguard::compose::RootUse::Open).unwrap();
    roots.push(Box::new(tokenguard::root::soft::SoftRoot::open(&recovery).unwrap()));
    let g = TokenGuard::open(&c.store.path, c.store_options(), roots, GuardOptions::default()).unwrap();
    // Reads go on through the recovery root …
    assert_eq!(g.get("github", "x").unwrap().field(None).unwrap().expose(), b"ghp_X");
    // … but nothing is wrapped under the impostor: a new provider's key is refused.
    assert!(matches!(
        g.put("newprov", "y", tokenguard::Secret::raw(b"y".to_vec()), Default::default()),
        Err(tokenguard::Error::Config(_))
    ));
    let checks = g.doctor();
    let root1 = checks.iter().find(|c| c.name == "root 1 pinned").unwrap();
    assert_eq!(root1.status, tokenguard::root::Status::Fail, "{root1:?}");
    assert!(root1.detail.contains("does not open this store"), "{}", root1.detail);
}

/// Finding 2: `root remove` cuts the removed root off. Its holder keeps the root (a
/// lost recovery key file), a copy of the store file and a backup from before the
/// removal, and the live file afterwards: nothing written after the removal opens
/// with any key they can unwrap, and they can neither open nor re-pin themselves in
/// the live store. The audit trail still verifies across the key change.
#[test]
fn a_removed_root_opens_nothing_written_afterwards() {
    use tokenguard::root::RootKey;
    use tokenguard::root::soft::SoftRoot;
    use tokenguard::store::{DekEntry, decode_wrapped_key};

    let env = TestEnv::new("atk-removed-root");
    let g = env.init();
    g.put("github", "before", tokenguard::Secret::raw(b"ghp_BEFORE".to_vec()), Default::default()).unwrap();
    let lost = env.dir.join("lost-recovery.key");
    let pin = g.add_root(Box::new(SoftRoot::open_or_create(&lost).unwrap())).unwrap();
    // What the attacker keeps from before the removal: a copy of the file and a backup.
    let copy_before = raw::snapshot(&env.store_path);
    let backup_before = env.dir.join("before.tgbackup");
    drop(g);
    ok(&env, &["backup", backup_before.to_str().unwrap()], b"");
    let o = env.run(&["root", "remove", &pin.root_id.to_string()], b"");
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("records re-encrypted"),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    ok(&env, &["put", "github", "after"], b"ghp_AFTER_REMOVAL");
    ok(&env, &["put", "newprov", "after"], b"np_AFTER_REMOVAL");
    ok(&env, &["put", "github", "before"], b"ghp_BEFORE_REWRITTEN");
    ok(&env, &["audit", "verify"], b"");
    let after = raw::snapshot(&env.store_path);

    // Every data key the removed root can unwrap, from every copy it could have.
    let root = SoftRoot::open(&lost).unwrap();
    let mut keys: Vec<[u8; 32]> = Vec::new();
    for snap in [&copy_before, &after] {
        for v in snap.deks.values() {
            let e = DekEntry::decode(v).unwrap();
            for w in &e.wrapped {
                if let Ok(k) = root.unwrap(&w.wrapped) {
                    keys.push(*k.expose());
                }
            }
        }
    }
    assert!(!keys.is_empty(), "the old copy holds data keys the removed root opens");
    // And the integrity key of the old copy: nothing of the new state verifies under it.
    let old_ik = decode_wrapped_key(&copy_before.meta["integrity_key"]).unwrap();
    assert!(old_ik.iter().any(|w| root.unwrap(&w.wrapped).is_ok()));
    let new_ik = decode_wrapped_key(&after.meta["integrity_key"]).unwrap();
    assert!(new_ik.iter().all(|w| root.unwrap(&w.wrapped).is_err()), "the new integrity key is not wrapped for it");
    assert!(
        !after
            .deks
            .values()
            .any(|v| { DekEntry::decode(v).unwrap().wrapped.iter().any(|w| root.unwrap(&w.wrapped).is_ok()) }),
        "no data key in the live file opens under the removed root"
    );

    let store_id: [u8; 16] = after.meta["store_id"].as_slice().try_into().unwrap();
    for ((p, n), rec) in &after.tokens {
        for k in &keys {
            assert!(
                tokenguard::seal::open_record_with_key(k, &store_id, rec).is_err(),
                "{p}/{n} written after the removal opens under a key of the removed root"
            );
        }
    }

    // The removed root opens neither the live store nor one with its old pin put back.
    let c = env.config();
    let open_with_lost = || {
        TokenGuard::open(
            &c.store.path,
            c.store_options(),
            vec![Box::new(SoftRoot::open(&lost).unwrap())],
            Default::default(),
        )
    };
    assert!(matches!(open_with_lost(), Err(tokenguard::Error::WrongRoot { .. })));
    raw::edit(
        &env.store_path,
        &[
            Edit::Meta("roots", Some(&copy_before.meta["roots"])),
            Edit::Meta("integrity_key", Some(&copy_before.meta["integrity_key"])),
        ],
    );
    match open_with_lost() {
        Err(e) => assert_eq!(e.exit_code(), 4, "{e:?}"),
        Ok(_) => panic!("the removed root re-pinned itself"),
    }
    // What it can still open, as documented: the backup from before the removal.
    let restored = env.dir.join("restored").join("tokens.redb");
    let (rg, _) = tokenguard::backup::restore(
        &backup_before,
        &restored,
        c.store_options(),
        vec![Box::new(SoftRoot::open(&lost).unwrap())],
        Default::default(),
    )
    .unwrap();
    assert_eq!(rg.get("github", "before").unwrap().field(None).unwrap().expose(), b"ghp_BEFORE");
    drop(rg);
    // The operator restoring that backup with the remaining root is told that the
    // removed root is pinned again, and how to remove it.
    let text = std::fs::read_to_string(&env.config_path).unwrap();
    let restored2 = env.dir.join("restored2").join("tokens.redb");
    let cfg2 = env.dir.join("restore2.toml");
    std::fs::write(&cfg2, text.replace(&env.store_path.display().to_string(), &restored2.display().to_string()))
        .unwrap();
    let o = common::run_cmd(
        env.cli().env("TOKENGUARD_CONFIG", &cfg2).args(["restore", backup_before.to_str().unwrap()]),
        b"",
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(
        stderr(&o).contains(&format!("pins root {}", pin.root_id)) && stderr(&o).contains("root remove"),
        "{}",
        stderr(&o)
    );
}

/// Review findings against a running guard: its own writes must not launder a
/// replayed row (they would otherwise cache a shredded key, or re-seal a revoked
/// token), it must refuse the file going back to an older consistent state under
/// it, its backups must not carry replayed rows, and `status` must not trust an
/// edited header.
#[test]
fn a_running_guard_launders_nothing() {
    use tokenguard::Error;

    // A replayed DEK row after a shred, then a write by the running guard.
    let env = store("atk-launder-shred");
    let g = env.open();
    let before = raw::snapshot(&env.store_path);
    g.shred("github").unwrap();
    raw::edit(&env.store_path, &[Edit::Dek("github", 1, Some(&before.deks[&("github".into(), 1)]))]);
    assert!(matches!(
        g.put("github", "new", tokenguard::Secret::raw(b"x".to_vec()), Default::default()),
        Err(Error::Integrity { .. })
    ));
    assert!(g.get("github", "ci-bot").is_err(), "the shredded token opened");
    drop(g);

    // The file put back to an older consistent state (rows, audit and state head):
    // a new process cannot tell (that is the whole-store rollback, README), but the
    // running one has seen the newer generation.
    let env = store("atk-rollback-running");
    let g = env.open();
    assert_eq!(g.get("github", "ci-bot").unwrap().field(None).unwrap().expose(), OLD);
    let older = raw::snapshot(&env.store_path);
    ok(&env, &["revoke", "github/ci-bot", "--reason", "leaked"], b"");
    assert!(matches!(g.get("github", "ci-bot"), Err(Error::Revoked { .. })));
    let cut = older.audit.keys().max().unwrap() + 1;
    raw::edit(
        &env.store_path,
        &[
            Edit::Token("github", "ci-bot", Some(&older.tokens[&("github".into(), "ci-bot".into())])),
            Edit::Tombstone("github", "ci-bot", None),
            Edit::Meta("audit_head", Some(&older.meta["audit_head"])),
            Edit::AuditFrom(cut),
            Edit::Meta("state_head", Some(&older.meta["state_head"])),
        ],
    );
    match g.get("github", "ci-bot") {
        Err(e @ Error::Integrity { .. }) => assert_eq!(e.exit_code(), 4),
        other => panic!("rolled-back store under a running guard: {:?}", other.map(|_| "plaintext")),
    }
    assert!(g.put("github", "z", tokenguard::Secret::raw(b"z".to_vec()), Default::default()).is_err());
    drop(g);

    // A backup by a running guard after a replay: refused, nothing written.
    let env = store("atk-backup-running");
    let g = env.open();
    let before = raw::snapshot(&env.store_path);
    ok(&env, &["revoke", "github/ci-bot", "--reason", "leaked"], b"");
    raw::edit(
        &env.store_path,
        &[
            Edit::Token("github", "ci-bot", Some(&before.tokens[&("github".into(), "ci-bot".into())])),
            Edit::Tombstone("github", "ci-bot", None),
        ],
    );
    let file = env.dir.join("laundered.tgbackup");
    assert!(tokenguard::backup::write_backup(&g, &file).is_err());
    assert!(!file.exists());
    drop(g);

    // `status` of a record whose header was edited (its tag kept): refused.
    let env = store("atk-status-header");
    let g = env.open();
    assert!(g.status("github", "ci-bot").is_ok());
    let rec = raw::snapshot(&env.store_path).tokens[&("github".into(), "ci-bot".into())].clone();
    let mut edited = rec.clone();
    // The record's state byte (active = 1) sits right after the header's times; flip
    // the first byte after the name instead: the DEK version.
    let at = rec.windows(6).position(|w| w == b"ci-bot").unwrap() + 6 + 3;
    edited[at] ^= 1;
    raw::edit(&env.store_path, &[Edit::Token("github", "ci-bot", Some(&edited))]);
    assert!(matches!(g.status("github", "ci-bot"), Err(Error::Integrity { .. })), "{:?}", g.status("github", "ci-bot"));
}

/// Second review: a root removed while it is still named in the config gets no new
/// data key, and a key rotation refuses rows edited after the guard's last check.
#[test]
fn root_remove_leaves_out_a_still_configured_root_and_refuses_edited_rows() {
    use tokenguard::root::soft::SoftRoot;
    use tokenguard::store::DekEntry;

    let env = store("atk-remove-configured");
    let soft_file = env.dir.join("soft.key");
    let g = env.open();
    let soft_id = g.add_root(Box::new(SoftRoot::open_or_create(&soft_file).unwrap())).unwrap().root_id;
    drop(g);
    let c = env.config();
    let both = || {
        let mut roots = c.build_roots(tokenguard::compose::RootUse::Open).unwrap();
        roots.push(Box::new(SoftRoot::open(&soft_file).unwrap()));
        TokenGuard::open(&c.store.path, c.store_options(), roots, Default::default()).unwrap()
    };
    let g = both();
    g.remove_root(soft_id).unwrap();
    g.put("newprov", "x", tokenguard::Secret::raw(b"np".to_vec()), Default::default()).unwrap();
    g.rotate_dek("github").unwrap();
    let snap = raw::snapshot(&env.store_path);
    for ((p, v), bytes) in &snap.deks {
        let e = DekEntry::decode(bytes).unwrap();
        assert!(e.wrapped.iter().all(|w| w.root_id != soft_id), "{p} v{v} is wrapped for the removed root");
    }
    drop(g);

    // Rows edited under a guard that already checked them: the rotation refuses.
    let env = store("atk-rekey-edited");
    let before = raw::snapshot(&env.store_path);
    ok(&env, &["put", "github", "ci-bot"], b"ghp_NEWER");
    let g = env.open();
    let soft_id = g.add_root(Box::new(SoftRoot::open_or_create(&env.dir.join("s.key")).unwrap())).unwrap().root_id;
    raw::edit(
        &env.store_path,
        &[Edit::Token("github", "ci-bot", Some(&before.tokens[&("github".into(), "ci-bot".into())]))],
    );
    match g.remove_root(soft_id) {
        Err(e @ tokenguard::Error::Integrity { .. }) => assert_eq!(e.exit_code(), 4),
        other => panic!("a key rotation vouched for an edited row: {other:?}"),
    }
    assert!(g.get("github", "ci-bot").is_err(), "the old row must not open");
}

/// Finding 11: a root whose fresh wrap does not open again (a token that picks an IV
/// and does not return it, a mechanism quirk) is caught when it wraps, before the
/// blob is stored: neither `root add` nor a new data key keeps such a wrap.
#[test]
fn a_wrap_that_does_not_round_trip_is_refused() {
    use tokenguard::root::soft::SoftRoot;
    use tokenguard::root::{Check, RootIdentity, RootKey, Wrapped};
    use tokenguard::secret::DekMaterial;

    /// A soft root whose wraps come back with one bit flipped.
    #[derive(Debug)]
    struct Garbles(SoftRoot);
    impl RootKey for Garbles {
        fn backend(&self) -> &'static str {
            self.0.backend()
        }
        fn is_hardware(&self) -> bool {
            false
        }
        fn can_unwrap(&self) -> bool {
            true
        }
        fn identity(&self) -> tokenguard::Result<RootIdentity> {
            self.0.identity()
        }
        fn generate_dek(&self) -> tokenguard::Result<(DekMaterial, Wrapped)> {
            self.0.generate_dek()
        }
        fn wrap(&self, dek: &DekMaterial) -> tokenguard::Result<Wrapped> {
            let mut w = self.0.wrap(dek)?;
            w.blob[3] ^= 1;
            Ok(w)
        }
        fn unwrap(&self, wrapped: &Wrapped) -> tokenguard::Result<DekMaterial> {
            self.0.unwrap(wrapped)
        }
        fn health(&self) -> Vec<Check> {
            Vec::new()
        }
        fn is_policy_bound(&self) -> bool {
            false
        }
    }

    let env = store("atk-wrap-roundtrip");
    let file = env.dir.join("garbles.key");
    let g = env.open();
    assert!(g.add_root(Box::new(Garbles(SoftRoot::open_or_create(&file).unwrap()))).is_err());
    assert_eq!(g.pinned_roots().unwrap().len(), 1, "nothing was pinned");
    // Pinned honestly, then configured with the faulty wrap: a new provider's key is refused.
    g.add_root(Box::new(SoftRoot::open(&file).unwrap())).unwrap();
    drop(g);
    let c = env.config();
    let mut roots = c.build_roots(tokenguard::compose::RootUse::Open).unwrap();
    roots.push(Box::new(Garbles(SoftRoot::open(&file).unwrap())));
    let g = TokenGuard::open(&c.store.path, c.store_options(), roots, Default::default()).unwrap();
    assert!(g.put("newprov", "x", tokenguard::Secret::raw(b"x".to_vec()), Default::default()).is_err());
    assert!(raw::snapshot(&env.store_path).deks.keys().all(|(p, _)| p != "newprov"), "no data key was stored");
    assert!(g.hardware_calls().verifies > 0);
}
