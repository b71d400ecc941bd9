//! A damaged store file — truncated, zeroed pages, random garbage, empty — gives a
//! clear exit 4 (or 1) with a hint: never a panic, never a hang. A store whose
//! records are damaged but whose file still opens is named record by record by
//! `doctor`, and `salvage` copies what still verifies into a new store.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::{TestEnv, code, stderr};
use redb::ReadableTable;

fn run_bounded(env: &TestEnv, args: &[&str]) -> std::process::Output {
    let start = Instant::now();
    let o = env.run(args, b"");
    assert!(start.elapsed() < Duration::from_secs(30), "{args:?} took {:?}", start.elapsed());
    o
}

#[test]
fn damaged_files_fail_clearly() {
    let env = TestEnv::new("damaged");
    let g = env.init();
    for i in 0..60 {
        g.put("p", &format!("t{i}"), tokenguard::Secret::raw(format!("v{i}").into_bytes()), Default::default())
            .unwrap();
    }
    drop(g);
    let good = std::fs::read(&env.store_path).unwrap();
    let len = good.len();
    type Damage = Box<dyn Fn(&mut Vec<u8>)>;
    let damages: Vec<(&str, Damage)> = vec![
        ("truncated", Box::new(|b: &mut Vec<u8>| b.truncate(b.len() / 3))),
        ("zeroed pages", Box::new(|b: &mut Vec<u8>| b[4096..4096 * 5].fill(0))),
        (
            "garbage",
            Box::new(move |b: &mut Vec<u8>| {
                let mut x: u32 = 0x1234_5678;
                for byte in &mut b[8192..(8192 + 20_000).min(len)] {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    *byte = (x & 0xff) as u8;
                }
            }),
        ),
        (
            "late garbage",
            Box::new(move |b: &mut Vec<u8>| {
                let at = len / 2;
                b[at..(at + 30_000).min(len)].fill(0xa5);
            }),
        ),
        ("empty", Box::new(|b: &mut Vec<u8>| b.clear())),
    ];
    for (what, damage) in &damages {
        let mut bytes = good.clone();
        damage(&mut bytes);
        std::fs::write(&env.store_path, &bytes).unwrap();
        for args in [&["list"][..], &["get", "p", "t3"], &["doctor"], &["audit", "verify"]] {
            let o = run_bounded(&env, args);
            let err = stderr(&o);
            let out = String::from_utf8_lossy(&o.stdout);
            assert!(!err.contains("panicked") && !err.contains("internal error"), "{what} {args:?}: {err}");
            let c = code(&o);
            if c == 0 {
                // Damage that misses everything this command reads is no failure.
                continue;
            }
            assert!(c == 4 || c == 1, "{what} {args:?}: exit {c}\n{err}{out}");
            assert!(err.contains("hint:") || out.contains("FAIL"), "{what} {args:?}: no hint\n{err}{out}");
        }
    }
}

#[test]
fn doctor_names_records_that_no_longer_open() {
    let env = TestEnv::new("damaged-records");
    let g = env.init();
    for i in 0..5 {
        g.put("p", &format!("t{i}"), tokenguard::Secret::raw(format!("value-{i}").into_bytes()), Default::default())
            .unwrap();
    }
    drop(g);
    // Flip a byte inside one record's ciphertext, with redb only (not the store code).
    let db = redb::Database::open(&env.store_path).unwrap();
    let table: redb::TableDefinition<(&str, &str), &[u8]> = redb::TableDefinition::new("tokens");
    let w = db.begin_write().unwrap();
    {
        let mut t = w.open_table(table).unwrap();
        let mut v = t.get(("p", "t2")).unwrap().unwrap().value().to_vec();
        let last = v.len() - 1;
        v[last] ^= 1;
        t.insert(("p", "t2"), v.as_slice()).unwrap();
    }
    w.commit().unwrap();
    drop(db);
    let o = run_bounded(&env, &["doctor"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(code(&o), 4, "{out}");
    assert!(out.contains("1 of 5 records fail to open: p/t2"), "{out}");
    // salvage copies every record that still verifies into a new store.
    let to = env.dir.join("salvaged").join("tokens.redb");
    // A damaged record is also a state mismatch: salvage copies rows as they are, so
    // it wants the operator's explicit acceptance, and writes nothing without it.
    let o = run_bounded(&env, &["salvage", "--to", to.to_str().unwrap()]);
    assert_eq!(code(&o), 4, "{}", stderr(&o));
    assert!(stderr(&o).contains("--accept-current-state"), "{}", stderr(&o));
    assert!(!to.exists());
    let o = run_bounded(&env, &["salvage", "--to", to.to_str().unwrap(), "--accept-current-state"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(code(&o), 1, "a salvage that lost a record says so: {out}{}", stderr(&o));
    assert!(out.contains("saved 4 of 5 records") && out.contains("p/t2"), "{out}");
    let text = std::fs::read_to_string(&env.config_path).unwrap();
    let cfg = env.dir.join("salvaged.toml");
    std::fs::write(&cfg, text.replace(&env.store_path.display().to_string(), &to.display().to_string())).unwrap();
    let read = |name: &str| env.cli().args(["get", "p", name]).env("TOKENGUARD_CONFIG", &cfg).output().unwrap();
    assert_eq!(read("t4").stdout, b"value-4");
    assert_eq!(code(&read("t2")), 3, "the damaged record was not copied");
    let o = env.cli().args(["doctor"]).env("TOKENGUARD_CONFIG", &cfg).output().unwrap();
    assert_eq!(code(&o), 0, "{}", String::from_utf8_lossy(&o.stdout));
}

/// A store of `n` records `p/t0…` (with `labels`), whose `p/t1` is then cut short
/// with redb alone (not the store code), so it no longer parses.
fn store_with_a_cut_record(name: &str, n: usize, labels: &[(&str, &str)]) -> TestEnv {
    let env = TestEnv::new(name);
    let g = env.init();
    for i in 0..n {
        let labels = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let opts = tokenguard::PutOptions { labels, ..Default::default() };
        g.put("p", &format!("t{i}"), tokenguard::Secret::raw(format!("value-{i}").into_bytes()), opts).unwrap();
    }
    drop(g);
    let db = redb::Database::open(&env.store_path).unwrap();
    let table: redb::TableDefinition<(&str, &str), &[u8]> = redb::TableDefinition::new("tokens");
    let w = db.begin_write().unwrap();
    w.open_table(table).unwrap().insert(("p", "t1"), &b"\x01\x00"[..]).unwrap();
    w.commit().unwrap();
    env
}

/// Finding 9: one damaged record does not stop incident response. `list` and
/// `revoke --label` report it and carry on with the others; the exit code still says
/// integrity (4), since the store's state does not verify.
#[test]
fn a_damaged_record_does_not_stop_list_or_revoke_by_label() {
    let env = store_with_a_cut_record("damaged-ir", 4, &[("team", "payments")]);

    let o = run_bounded(&env, &["list"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(code(&o), 4, "{out}{}", stderr(&o));
    for n in ["p/t0", "p/t2", "p/t3"] {
        assert!(out.contains(n), "{n} missing from the list: {out}");
    }
    assert!(stderr(&o).contains("t1"), "the damaged record is named: {}", stderr(&o));

    let o = run_bounded(&env, &["revoke", "--label", "team=payments", "--reason", "incident"]);
    assert_eq!(code(&o), 4, "{}", stderr(&o));
    assert!(stderr(&o).contains("t1"), "{}", stderr(&o));
    for n in ["t0", "t2", "t3"] {
        let o = run_bounded(&env, &["status", &format!("p/{n}")]);
        assert!(String::from_utf8_lossy(&o.stdout).contains("revoked"), "{n}: {}", String::from_utf8_lossy(&o.stdout));
    }
}

/// Finding 9 after an operator accepted a damaged store (`upgrade
/// --accept-current-state`): the record that does not parse is named, and `list`,
/// `reencrypt` and `refresh --due` carry on with the others; the exit code still
/// says something is wrong.
#[test]
fn an_accepted_damaged_record_does_not_stop_the_others() {
    let env = store_with_a_cut_record("damaged-accepted", 4, &[]);
    assert_eq!(code(&run_bounded(&env, &["upgrade", "--accept-current-state"])), 0);

    let o = run_bounded(&env, &["list"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(code(&o), 4, "{out}{}", stderr(&o));
    for n in ["p/t0", "p/t2", "p/t3"] {
        assert!(out.contains(n), "{n} missing from the list: {out}");
    }
    assert!(stderr(&o).contains("p/t1"), "the damaged record is named: {}", stderr(&o));

    assert_eq!(code(&run_bounded(&env, &["rotate-dek", "p"])), 0);
    let o = run_bounded(&env, &["reencrypt"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(code(&o), 4, "{out}{}", stderr(&o));
    assert!(out.contains("moved 3 records") && out.contains("p/t1"), "{out}");
    for n in ["t0", "t2", "t3"] {
        let o = run_bounded(&env, &["get", &format!("p/{n}")]);
        assert_eq!(code(&o), 0, "{n}: {}", stderr(&o));
    }
    let o = run_bounded(&env, &["list", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(v.as_array().unwrap().iter().all(|t| t["dek_version"] == 2), "{v}");
}
