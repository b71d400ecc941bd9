//! Tampering with the store file directly: every single-byte flip in a sealed record,
//! a record moved to another provider or name, an edited expiry or state, a swapped
//! DEK, a corrupt file. Each must fail closed with the integrity error (exit 4) and
//! never open into any plaintext: first at the authenticated state (the store does
//! not open), then, once an operator accepts the edited rows, at the layer below
//! (AES-GCM, the AAD, the key wrap). tests/store_attacks.rs replays valid old rows.
#![allow(clippy::unwrap_used)]

mod common;

use common::TestEnv;
use redb::{Database, ReadableDatabase, TableDefinition};
use tokenguard::{Error, PutOptions, Secret};

const TOKENS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("tokens");
const DEKS: TableDefinition<(&str, u32), &[u8]> = TableDefinition::new("deks");

fn db(env: &TestEnv) -> Database {
    let mut b = redb::Builder::new();
    b.set_concurrency_mode(redb::ConcurrencyMode::MultiWriter);
    b.open(&env.store_path).unwrap()
}

fn read_record(env: &TestEnv, p: &str, n: &str) -> Vec<u8> {
    let db = db(env);
    let r = db.begin_read().unwrap();
    let t = r.open_table(TOKENS).unwrap();
    t.get((p, n)).unwrap().unwrap().value().to_vec()
}

fn write_record(env: &TestEnv, p: &str, n: &str, v: &[u8]) {
    let db = db(env);
    let w = db.begin_write().unwrap();
    w.open_table(TOKENS).unwrap().insert((p, n), v).unwrap();
    w.commit().unwrap();
}

fn assert_integrity<T: std::fmt::Debug>(r: tokenguard::Result<T>, what: &str) {
    match r {
        Err(e @ Error::Integrity { .. }) => assert_eq!(e.exit_code(), 4),
        other => panic!("{what}: expected an integrity failure, got {other:?}"),
    }
}

fn setup(name: &str) -> TestEnv {
    let env = TestEnv::new(name);
    let g = env.init();
    let labels = [("owner".to_string(), "alice".to_string())].into();
    g.put(
        "github",
        "ci-bot",
        Secret::raw(b"ghp_TAMPER_TARGET".to_vec()),
        PutOptions { expires_at: Some(4_000_000_000), labels, ..Default::default() },
    )
    .unwrap();
    g.put("github", "other", Secret::raw(b"ghp_OTHER_SECRET".to_vec()), PutOptions::default()).unwrap();
    g.put("slack", "ci-bot", Secret::raw(b"xoxb_SLACK_SECRET".to_vec()), PutOptions::default()).unwrap();
    env
}

#[test]
fn every_single_byte_flip_fails_closed() {
    let env = setup("flip");
    let orig = read_record(&env, "github", "ci-bot");
    let g = env.open();
    assert_eq!(g.get("github", "ci-bot").unwrap().field(None).unwrap().expose(), b"ghp_TAMPER_TARGET");
    drop(g);
    for pos in 0..orig.len() {
        for bit in [0x01u8, 0x80] {
            let mut t = orig.clone();
            t[pos] ^= bit;
            write_record(&env, "github", "ci-bot", &t);
            let what = format!("flip {bit:#x} at byte {pos}");
            env.assert_state_refused(&what);
            assert_integrity(env.accept_state().get("github", "ci-bot"), &what);
        }
    }
    // Truncations too.
    for cut in [0, 1, orig.len() / 2, orig.len() - 1] {
        write_record(&env, "github", "ci-bot", &orig[..cut]);
        env.assert_state_refused(&format!("truncated to {cut}"));
        assert_integrity(env.accept_state().get("github", "ci-bot"), &format!("truncated to {cut}"));
    }
    // The untouched records still open, and restoring the original bytes works (once
    // accepted: the last accepted state held the truncated record).
    write_record(&env, "github", "ci-bot", &orig);
    env.assert_state_refused("original bytes back");
    let g = env.accept_state();
    assert_eq!(g.get("github", "ci-bot").unwrap().field(None).unwrap().expose(), b"ghp_TAMPER_TARGET");
    assert_eq!(g.get("github", "other").unwrap().field(None).unwrap().expose(), b"ghp_OTHER_SECRET");
}

#[test]
fn moved_records_fail_closed() {
    let env = setup("move");
    let rec = read_record(&env, "github", "ci-bot");
    // Same provider, other name: the stored header names ci-bot.
    write_record(&env, "github", "other", &rec);
    // Other provider, same name: wrong DEK and wrong AAD.
    write_record(&env, "slack", "ci-bot", &rec);
    env.assert_state_refused("moved records");
    let g = env.accept_state();
    assert_integrity(g.get("github", "other"), "record copied to another name");
    assert_integrity(g.get("slack", "ci-bot"), "record copied to another provider");
    assert_eq!(g.get("github", "ci-bot").unwrap().field(None).unwrap().expose(), b"ghp_TAMPER_TARGET");
}

#[test]
fn edited_metadata_fails_closed() {
    let env = setup("meta");
    let rec = read_record(&env, "github", "ci-bot");
    // The expiry (4_000_000_000 = 0xEE6B2800) sits in the header after the presence
    // tag; extend it by editing its top byte, as an attacker would to keep using a
    // token past its not-after.
    let needle = 4_000_000_000u64.to_be_bytes();
    let at = rec.windows(8).position(|w| w == needle).expect("expiry in header");
    let mut t = rec.clone();
    t[at + 3] = 0xff;
    write_record(&env, "github", "ci-bot", &t);
    env.assert_state_refused("edited expiry");
    assert_integrity(env.accept_state().get("github", "ci-bot"), "edited expiry");

    // Edit the label value ("alice" -> "mallo").
    let at = rec.windows(5).position(|w| w == b"alice").expect("label in header");
    let mut t = rec.clone();
    t[at..at + 5].copy_from_slice(b"mallo");
    write_record(&env, "github", "ci-bot", &t);
    env.assert_state_refused("edited label");
    assert_integrity(env.accept_state().get("github", "ci-bot"), "edited label");
}

#[test]
fn swapped_dek_entries_fail_closed() {
    let env = setup("dekswap");
    {
        let db = db(&env);
        let r = db.begin_read().unwrap();
        let t = r.open_table(DEKS).unwrap();
        let slack = t.get(("slack", 1)).unwrap().unwrap().value().to_vec();
        drop(t);
        drop(r);
        let w = db.begin_write().unwrap();
        w.open_table(DEKS).unwrap().insert(("github", 1), slack.as_slice()).unwrap();
        w.commit().unwrap();
    }
    env.assert_state_refused("swapped DEK entries");
    let g = env.accept_state();
    assert_integrity(g.get("github", "ci-bot"), "github records under slack's DEK");
    // doctor reports it.
    let checks = g.doctor();
    let scan = checks.iter().find(|c| c.name == "record integrity scan").unwrap();
    assert_eq!(scan.status, tokenguard::root::Status::Fail);
    assert!(scan.detail.contains("github/ci-bot"), "{}", scan.detail);
}

#[test]
fn a_corrupted_store_file_is_an_error_not_a_panic() {
    let env = setup("corrupt");
    let bytes = std::fs::read(&env.store_path).unwrap();
    // Garbage in the header, in the middle, and a truncated file.
    let variants: Vec<Vec<u8>> = vec![
        {
            let mut b = bytes.clone();
            for x in &mut b[0..64] {
                *x ^= 0x5a;
            }
            b
        },
        {
            let mut b = bytes.clone();
            let n = b.len();
            let m = n / 2;
            for x in &mut b[m..m + 4096.min(n - m)] {
                *x = 0xff;
            }
            b
        },
        bytes[..bytes.len() / 3].to_vec(),
        Vec::new(),
    ];
    for (i, v) in variants.into_iter().enumerate() {
        std::fs::write(&env.store_path, &v).unwrap();
        let res = std::panic::catch_unwind(|| {
            env.try_open().and_then(|g| g.get("github", "ci-bot").map(|s| s.field(None).unwrap().expose().to_vec()))
        });
        let res = res.unwrap_or_else(|_| panic!("variant {i} panicked"));
        // Damage in free pages may leave the record intact; then it must still be
        // the right plaintext. Otherwise: an error.
        if let Ok(v) = &res {
            assert_eq!(v, b"ghp_TAMPER_TARGET", "variant {i} opened into other plaintext");
        }
        // The CLI reports it with an exit code, not a panic.
        let o = env.run(&["get", "github", "ci-bot"], b"");
        let expect: &[i32] = if res.is_ok() { &[0] } else { &[1, 4] };
        assert!(expect.contains(&common::code(&o)), "variant {i}: exit {} {}", common::code(&o), common::stderr(&o));
        assert!(!common::stderr(&o).contains("panicked"), "{}", common::stderr(&o));
    }
}

mod prop {
    use proptest::prelude::*;
    use tokenguard::seal;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

        /// Arbitrary bytes never parse into something that opens, and never panic.
        #[test]
        fn random_bytes_never_open(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let key = [7u8; 32];
            let r = seal::open_record_with_key(&key, &[1u8; 16], &bytes);
            prop_assert!(r.is_err());
        }

        /// Random edits of a valid record never open (and never into other plaintext).
        #[test]
        fn mutated_records_never_open(edits in proptest::collection::vec((any::<usize>(), 1u8..=255), 1..8)) {
            let key = [9u8; 32];
            let sid = [3u8; 16];
            let header = seal::RecordHeader {
                provider: "github".into(),
                name: "ci-bot".into(),
                dek_version: 1,
                meta: tokenguard::Metadata {
                    created: 1, updated: 2, expires_at: Some(3),
                    state: tokenguard::TokenState::Active, kind: tokenguard::SecretKind::Raw,
                    token_type: None, scopes: vec![], labels: Default::default(),
                },
            };
            let rec = seal::seal_record_for_test_vector(&key, &sid, &header, &tokenguard::Secret::raw(b"s3cret".to_vec()), [5u8; 12]).unwrap();
            let mut t = rec.clone();
            for (pos, x) in &edits {
                let i = pos % t.len();
                t[i] ^= x;
            }
            prop_assume!(t != rec);
            prop_assert!(seal::open_record_with_key(&key, &sid, &t).is_err());
        }
    }
}
