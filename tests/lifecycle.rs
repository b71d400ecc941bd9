//! Lifecycle on a real SoftHSM2 token: DEK rotation, re-encryption (with readers
//! running and with SIGKILL at random points), retirement, the encryption bound,
//! root add/remove/rotation, revocation, shredding, expiry and purge, the audit chain
//! under tampering, and a plaintext scan after all of it.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::{TestEnv, code, contains, files_below, stderr};
use redb::{ReadableDatabase, TableDefinition};
use tokenguard::guard::revoke::{PurgeOptions, RevokeTarget, TokenStatus};
use tokenguard::guard::rotate::ReencryptOptions;
use tokenguard::store::DekState;
use tokenguard::{Error, GuardOptions, PutItem, PutOptions, Secret, TokenGuard};

fn raw(s: &str) -> Secret {
    Secret::raw(s.as_bytes().to_vec())
}

fn value(g: &TokenGuard, p: &str, n: &str) -> Vec<u8> {
    g.get(p, n).unwrap_or_else(|e| panic!("{p}/{n}: {e}")).field(None).unwrap().expose().to_vec()
}

fn fill(g: &TokenGuard, provider: &str, n: usize, expires_at: Option<u64>) {
    let items = (0..n)
        .map(|i| PutItem {
            provider: provider.into(),
            name: format!("t{i:05}"),
            secret: raw(&format!("{provider}-secret-{i}")),
            options: PutOptions { expires_at, ..Default::default() },
        })
        .collect();
    g.put_many(items).unwrap();
}

fn check_all(g: &TokenGuard, provider: &str, n: usize) {
    for i in 0..n {
        assert_eq!(value(g, provider, &format!("t{i:05}")), format!("{provider}-secret-{i}").as_bytes());
    }
}

fn dek_state(g: &TokenGuard, provider: &str, version: u32) -> (DekState, u64) {
    let s = g.stats().unwrap();
    let d = s.deks.iter().find(|d| d.provider == provider && d.version == version).unwrap();
    (d.state, d.records)
}

#[test]
fn rotate_reencrypt_retire() {
    let env = TestEnv::new("rotate");
    let g = env.init();
    fill(&g, "github", 300, None);
    assert_eq!(g.rotate_dek("github").unwrap(), 2);
    g.put("github", "fresh", raw("sealed-under-v2"), PutOptions::default()).unwrap();
    assert_eq!(dek_state(&g, "github", 1), (DekState::DecryptOnly, 300));
    assert_eq!(dek_state(&g, "github", 2), (DekState::Active, 1));

    match g.retire("github", 2) {
        Err(e @ Error::InUse { records: 300, .. }) => {
            assert!(e.hint().unwrap().contains("tokenguard reencrypt github"), "{:?}", e.hint());
        }
        other => panic!("retire must be refused while used: {other:?}"),
    }
    assert!(matches!(g.retire("github", 3), Err(Error::InvalidInput(_))), "the active version cannot be retired");

    let dry =
        g.reencrypt(Some("github"), ReencryptOptions { dry_run: true, ..Default::default() }, |_, _, _| {}).unwrap();
    assert_eq!((dry[0].pending, dry[0].moved), (300, 0));
    let mut calls = 0;
    let r = g
        .reencrypt(Some("github"), ReencryptOptions { batch_size: 64, ..Default::default() }, |_, done, total| {
            calls += 1;
            assert!(done <= total);
        })
        .unwrap();
    assert_eq!((r[0].moved, r[0].batches, r[0].target_version), (300, 5, 2));
    assert_eq!(calls, 5);
    assert_eq!(g.retire("github", 2).unwrap(), vec![1]);
    assert_eq!(dek_state(&g, "github", 1), (DekState::Retired, 0));
    drop(g);

    // A fresh process: everything opens, and version 1's material is gone from the store.
    let g = env.open();
    check_all(&g, "github", 300);
    assert_eq!(value(&g, "github", "fresh"), b"sealed-under-v2");
    assert_eq!(g.hardware_calls().unwraps, 2, "integrity key + version 2 only");
    drop(g);
    const DEKS: TableDefinition<(&str, u32), &[u8]> = TableDefinition::new("deks");
    let mut b = redb::Builder::new();
    b.set_concurrency_mode(redb::ConcurrencyMode::MultiWriter);
    let db = b.open(&env.store_path).unwrap();
    let r = db.begin_read().unwrap();
    let e =
        tokenguard::store::DekEntry::decode(r.open_table(DEKS).unwrap().get(("github", 1)).unwrap().unwrap().value())
            .unwrap();
    assert!(e.wrapped.is_empty(), "a retired version keeps no wrapped key");
}

#[test]
fn reads_never_fail_during_reencryption() {
    let env = TestEnv::new("readsduring");
    let g = env.init();
    fill(&g, "slack", 2000, None);
    g.rotate_dek("slack").unwrap();
    let stop = AtomicBool::new(false);
    let reads = AtomicU64::new(0);
    /// Stops the readers however the scope's main closure ends: a failed assertion
    /// must fail the test, not leave the readers spinning forever.
    struct StopOnDrop<'a>(&'a AtomicBool);
    impl Drop for StopOnDrop<'_> {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Relaxed);
        }
    }
    std::thread::scope(|s| {
        let _stop_readers = StopOnDrop(&stop);
        for t in 0..3 {
            let (g, stop, reads) = (&g, &stop, &reads);
            s.spawn(move || {
                let mut i = t * 7;
                while !stop.load(Ordering::Relaxed) {
                    i = (i + 613) % 2000;
                    assert_eq!(value(g, "slack", &format!("t{i:05}")), format!("slack-secret-{i}").as_bytes());
                    reads.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        // Writers keep working too.
        let writer = s.spawn(|| {
            for i in 0..50 {
                g.put("slack", &format!("w{i}"), raw(&format!("w{i}")), PutOptions::default()).unwrap();
            }
        });
        let r = g
            .reencrypt(Some("slack"), ReencryptOptions { batch_size: 50, ..Default::default() }, |_, _, _| {})
            .unwrap();
        writer.join().unwrap();
        stop.store(true, Ordering::Relaxed);
        assert_eq!(r[0].moved, 2000);
    });
    assert!(reads.load(Ordering::Relaxed) > 100, "readers barely ran");
    check_all(&g, "slack", 2000);
    assert_eq!(dek_state(&g, "slack", 1).1, 0);
}

#[test]
fn the_encryption_bound_rotates_automatically() {
    let env = TestEnv::new("bound");
    drop(env.init());
    let c = env.config();
    let g = c.open_guard_with(GuardOptions { max_dek_encryptions: 10, ..c.guard_options() }).unwrap();
    for i in 0..25 {
        g.put("jira", &format!("k{i}"), raw(&format!("v{i}")), PutOptions::default()).unwrap();
    }
    let s = g.stats().unwrap();
    let versions: Vec<_> = s.deks.iter().map(|d| (d.version, d.state, d.encryptions)).collect();
    assert_eq!(
        versions,
        vec![(1, DekState::DecryptOnly, 10), (2, DekState::DecryptOnly, 10), (3, DekState::Active, 5)]
    );
    for i in 0..25 {
        assert_eq!(value(&g, "jira", &format!("k{i}")), format!("v{i}").as_bytes());
    }
    drop(g);
    // The rotation policy: doctor warns about an active data key older than the bound.
    std::thread::sleep(Duration::from_millis(1100));
    let g = c.open_guard_with(GuardOptions { max_dek_age: Some(Duration::ZERO), ..c.guard_options() }).unwrap();
    let policy = g.doctor().into_iter().find(|c| c.name == "rotation policy").unwrap();
    assert_eq!(policy.status, tokenguard::root::Status::Warn, "{policy:?}");
    assert!(policy.detail.contains("jira v3"), "{}", policy.detail);
}

#[test]
fn revoked_and_shredded_tokens_never_open() {
    let env = TestEnv::new("revoke");
    let g = env.init();
    let alice: BTreeMap<String, String> = [("owner".to_string(), "alice".to_string())].into();
    g.put("github", "a", raw("ghp_A"), PutOptions { labels: alice.clone(), ..Default::default() }).unwrap();
    g.put("github", "b", raw("ghp_B"), PutOptions::default()).unwrap();
    g.put("slack", "c", raw("xoxb_C"), PutOptions { labels: alice, ..Default::default() }).unwrap();
    g.put("jira", "d", raw("jira_D"), PutOptions::default()).unwrap();
    g.put("jira", "e", raw("jira_E"), PutOptions::default()).unwrap();
    g.put("gitlab", "f", raw("glpat_F"), PutOptions::default()).unwrap();

    let done = g.revoke(RevokeTarget::One { provider: "github", name: "b" }, "leaked in a CI log").unwrap();
    assert_eq!(done, vec![("github".to_string(), "b".to_string())]);
    match g.get("github", "b") {
        Err(e @ Error::Revoked { .. }) => {
            assert_eq!(e.exit_code(), 7);
            assert!(e.to_string().contains("leaked in a CI log"), "{e}");
        }
        other => panic!("{other:?}"),
    }
    let by_label = g.revoke(RevokeTarget::Label { key: "owner", value: "alice" }, "alice left").unwrap();
    assert_eq!(by_label.len(), 2);
    assert!(matches!(g.get("github", "a"), Err(Error::Revoked { .. })));
    assert!(matches!(g.get("slack", "c"), Err(Error::Revoked { .. })));
    assert_eq!(g.revoke(RevokeTarget::Provider("jira"), "vendor breach").unwrap().len(), 2);
    assert!(matches!(g.status("jira", "e").unwrap(), TokenStatus::Revoked { .. }));
    assert!(matches!(g.revoke(RevokeTarget::One { provider: "jira", name: "e" }, " "), Err(Error::InvalidInput(_))));

    assert_eq!(g.shred("gitlab").unwrap(), vec![1]);
    match g.get("gitlab", "f") {
        Err(e @ Error::Shredded { .. }) => assert_eq!(e.exit_code(), 7),
        other => panic!("{other:?}"),
    }
    assert!(matches!(g.status("gitlab", "f").unwrap(), TokenStatus::Shredded { .. }));
    drop(g);
    // A fresh process, no cache: still never opens.
    let g = env.open();
    assert!(matches!(g.get("gitlab", "f"), Err(Error::Shredded { .. })));
    assert!(matches!(g.get("github", "b"), Err(Error::Revoked { .. })));
    // The doctor reports shredded records as shredded, not as corruption.
    let scan = g.doctor().into_iter().find(|c| c.name == "record integrity scan").unwrap();
    assert_eq!(scan.status, tokenguard::root::Status::Ok, "{scan:?}");
    // Re-issuing a revoked name works and clears the tombstone.
    g.put("github", "b", raw("ghp_B2"), PutOptions::default()).unwrap();
    assert_eq!(value(&g, "github", "b"), b"ghp_B2");
    // Through the CLI: exit 7 and the reason.
    let o = env.run(&["get", "slack", "c"], b"");
    assert_eq!(code(&o), 7, "{}", stderr(&o));
    assert!(stderr(&o).contains("alice left"));
    let o = env.run(&["get", "gitlab", "f"], b"");
    assert_eq!(code(&o), 7, "{}", stderr(&o));
    assert!(stderr(&o).contains("shredded"));
    let o = env.run(&["status", "jira", "d"], b"");
    assert!(String::from_utf8_lossy(&o.stdout).contains("revoked at"), "{}", String::from_utf8_lossy(&o.stdout));
}

#[test]
fn expiring_and_purge() {
    let env = TestEnv::new("purge");
    let g = env.init();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    fill(&g, "old", 1200, Some(now - 10));
    g.put("live", "soon", raw("s"), PutOptions { expires_at: Some(now + 3600), ..Default::default() }).unwrap();
    g.put("live", "later", raw("l"), PutOptions { expires_at: Some(now + 30 * 86400), ..Default::default() }).unwrap();
    g.put("live", "never", raw("n"), PutOptions::default()).unwrap();
    let soon = g.expiring(7200).unwrap();
    assert_eq!(soon.len(), 1201);
    assert_eq!(soon.last().unwrap().1, "soon");
    g.revoke(RevokeTarget::One { provider: "live", name: "later" }, "rotated").unwrap();
    let r = g.purge(PurgeOptions { expired: true, revoked: false, older_than: 0 }).unwrap();
    assert_eq!(r.expired, 1200);
    let r = g.purge(PurgeOptions { expired: false, revoked: true, older_than: 3600 }).unwrap();
    assert_eq!(r.tombstones, 0, "the tombstone is younger than an hour");
    let r = g.purge(PurgeOptions { expired: false, revoked: true, older_than: 0 }).unwrap();
    assert_eq!(r.tombstones, 1);
    assert!(matches!(g.get("live", "later"), Err(Error::NotFound { .. })));
    assert_eq!(value(&g, "live", "soon"), b"s");
    assert_eq!(value(&g, "live", "never"), b"n");
    assert_eq!(g.list(Some("old")).unwrap().len(), 0);
    assert_eq!(g.stats().unwrap().tokens, 2);
}

#[test]
fn root_add_remove_and_rotation() {
    let env = TestEnv::new("roots");
    let g = env.init();
    fill(&g, "github", 50, None);
    // Add an offline recovery root (soft key file).
    let recovery = env.dir.join("recovery.key");
    let soft = tokenguard::root::soft::SoftRoot::open_or_create(&recovery).unwrap();
    let pin = g.add_root(Box::new(soft)).unwrap();
    assert_eq!(pin.root_id, 2);
    assert!(matches!(g.remove_root(9), Err(Error::NotFound { .. })));
    drop(g);

    // The recovery root alone opens everything (HSM "lost").
    let c = env.config();
    let open_soft = || {
        let soft = tokenguard::root::soft::SoftRoot::open(&recovery).unwrap();
        TokenGuard::open(&c.store.path, c.store_options(), vec![Box::new(soft)], GuardOptions::default())
    };
    let r = open_soft().unwrap();
    check_all(&r, "github", 50);
    // It refuses to create a new provider DEK the HSM root could not open.
    assert!(matches!(r.put("newprov", "x", raw("x"), PutOptions::default()), Err(Error::Config(_))));
    // Removing the HSM root with only the soft one configured works; the last root never goes.
    r.remove_root(1).unwrap();
    assert!(matches!(r.remove_root(2), Err(Error::InvalidInput(_))));
    check_all(&r, "github", 50);
    drop(r);
    assert!(matches!(env.try_open(), Err(Error::WrongRoot { .. })), "the removed HSM root no longer opens the store");

    // rotate-root through the CLI on a fresh store: new key, config moved, old removed.
    let env = TestEnv::new("rotroot");
    assert_eq!(code(&env.run(&["init"], b"")), 0);
    assert_eq!(code(&env.run(&["put", "github", "x"], b"ghp_ROT")), 0);
    let o = env.run(&["rotate-root", "--new-key-label", &format!("{}-next", env.key_label)], b"");
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let text = std::fs::read_to_string(&env.config_path).unwrap();
    std::fs::write(
        &env.config_path,
        text.replace(&format!("key_label = \"{}\"", env.key_label), &format!("key_label = \"{}-next\"", env.key_label)),
    )
    .unwrap();
    let o = env.run(&["root", "remove", "1"], b"");
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let o = env.run(&["get", "github", "x"], b"");
    assert_eq!((code(&o), o.stdout.as_slice()), (0, &b"ghp_ROT"[..]), "{}", stderr(&o));
    let o = env.run(&["root", "list", "--json"], b"");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 1);
    assert_eq!(v[0]["root_id"], 2);
}

/// Child process for the SIGKILL tests: runs one lifecycle operation to completion.
#[test]
fn lifecycle_child() {
    let (Ok(cfg), Ok(op)) = (std::env::var("TG_LC_CONFIG"), std::env::var("TG_LC_OP")) else { return };
    let g = tokenguard::Config::load(std::path::Path::new(&cfg)).unwrap().open_guard().unwrap();
    // Kill points start after the open: see run_child_killed.
    println!("READY");
    use std::io::Write;
    std::io::stdout().flush().unwrap();
    match op.as_str() {
        "reencrypt" => {
            drop(g.reencrypt(None, ReencryptOptions { batch_size: 40, ..Default::default() }, |_, _, _| {}).unwrap())
        }
        "purge" => drop(g.purge(PurgeOptions { expired: true, revoked: true, older_than: 0 }).unwrap()),
        "addroot" => {
            let key = std::env::var("TG_LC_KEY").unwrap();
            let soft = tokenguard::root::soft::SoftRoot::open_or_create(std::path::Path::new(&key)).unwrap();
            drop(g.add_root(Box::new(soft)).unwrap());
        }
        other => panic!("unknown op {other}"),
    }
    println!("DONE");
}

fn run_child_killed(env: &TestEnv, op: &str, delay: Duration, extra: &[(&str, String)]) -> bool {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", "lifecycle_child", "--nocapture", "--test-threads=1"])
        .env("TG_LC_CONFIG", &env.config_path)
        .env("TG_LC_OP", op)
        .env("SOFTHSM2_CONF", &common::softhsm().conf)
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    for (k, v) in extra {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    // Wait until the child has opened the guard. SoftHSM2 rewrites its token.object
    // file non-atomically when a process logs in: a SIGKILL at that moment truncates
    // it and the development token is gone for every process (a SoftHSM2 limitation,
    // not one of the store; real HSMs keep their state elsewhere). The kill points
    // tested here are inside tokenguard's own operations.
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    while !line.contains("READY") {
        line.clear();
        if std::io::BufRead::read_line(&mut out, &mut line).unwrap() == 0 {
            break;
        }
    }
    std::thread::sleep(delay);
    let _ = child.kill();
    let _ = child.wait();
    let mut rest = Vec::new();
    let _ = std::io::Read::read_to_end(&mut out, &mut rest);
    contains(&rest, b"DONE")
}

fn next_delay(seed: &mut u64, max_ms: u64) -> Duration {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    Duration::from_millis(5 + *seed % max_ms)
}

#[test]
fn sigkill_during_reencrypt_purge_and_root_add() {
    let env = TestEnv::new("lckill");
    let g = env.init();
    fill(&g, "github", 1500, None);
    fill(&g, "stale", 800, Some(1));
    drop(g);
    let mut seed = 0x2545_f491_4f6c_dd1du64 ^ u64::from(std::process::id());
    let mut completed = [0; 3];

    for round in 0..8 {
        env.open().rotate_dek("github").unwrap();
        let done = run_child_killed(&env, "reencrypt", next_delay(&mut seed, 150), &[]);
        completed[0] += done as usize;
        let g = env.open();
        check_all(&g, "github", 1500);
        // Re-running finishes the work.
        g.reencrypt(None, ReencryptOptions::default(), |_, _, _| {}).unwrap();
        let s = g.stats().unwrap();
        let active = s.deks.iter().filter(|d| d.provider == "github" && d.state == DekState::Active).count();
        assert_eq!(active, 1, "round {round}");
        assert!(
            s.deks.iter().filter(|d| d.provider == "github" && d.state != DekState::Active).all(|d| d.records == 0)
        );
    }

    for _ in 0..6 {
        let done = run_child_killed(&env, "purge", next_delay(&mut seed, 40), &[]);
        completed[1] += done as usize;
        let g = env.open();
        check_all(&g, "github", 1500);
        let left = g.list(Some("stale")).unwrap().len();
        for t in g.list(Some("stale")).unwrap() {
            g.get_with("stale", &t.name, tokenguard::GetOptions { allow_expired: true }).unwrap();
        }
        assert!(left <= 800);
    }
    let g = env.open();
    g.purge(PurgeOptions { expired: true, revoked: true, older_than: 0 }).unwrap();
    assert_eq!(g.list(Some("stale")).unwrap().len(), 0);
    drop(g);

    for i in 0..6 {
        let key = env.dir.join(format!("rec{i}.key"));
        let done =
            run_child_killed(&env, "addroot", next_delay(&mut seed, 60), &[("TG_LC_KEY", key.display().to_string())]);
        completed[2] += done as usize;
        let g = env.open();
        check_all(&g, "github", 1500);
        let pins = g.pinned_roots().unwrap();
        if pins.len() > 1 {
            // All or nothing: when the new root is pinned, it alone opens everything.
            let soft = tokenguard::root::soft::SoftRoot::open(&key).unwrap();
            let c = env.config();
            let r = TokenGuard::open(&c.store.path, c.store_options(), vec![Box::new(soft)], GuardOptions::default())
                .unwrap();
            check_all(&r, "github", 1500);
            drop(r);
            let last = pins.last().unwrap().root_id;
            g.remove_root(last).unwrap();
        }
    }
    let g = env.open();
    assert!(g.audit_verify().unwrap().first_bad.is_none());
    eprintln!(
        "children that finished before the kill: reencrypt {}, purge {}, addroot {}",
        completed[0], completed[1], completed[2]
    );
}

const AUDIT: TableDefinition<u64, &[u8]> = TableDefinition::new("audit");

fn edit_audit(env: &TestEnv, f: impl FnOnce(&mut redb::Table<u64, &[u8]>)) {
    let mut b = redb::Builder::new();
    b.set_concurrency_mode(redb::ConcurrencyMode::MultiWriter);
    let db = b.open(&env.store_path).unwrap();
    let w = db.begin_write().unwrap();
    {
        let mut t = w.open_table(AUDIT).unwrap();
        f(&mut t);
    }
    w.commit().unwrap();
}

fn audit_entry(env: &TestEnv, seq: u64) -> Vec<u8> {
    let mut b = redb::Builder::new();
    b.set_concurrency_mode(redb::ConcurrencyMode::MultiWriter);
    let db = b.open(&env.store_path).unwrap();
    let r = db.begin_read().unwrap();
    r.open_table(AUDIT).unwrap().get(seq).unwrap().unwrap().value().to_vec()
}

#[test]
fn audit_chain_detects_deletion_reordering_editing_and_truncation() {
    let mk = |name: &str| {
        let env = TestEnv::new(name);
        let g = env.init();
        for i in 0..6 {
            g.put("github", &format!("a{i}"), raw("x"), PutOptions::default()).unwrap();
        }
        let r = g.audit_verify().unwrap();
        assert!(r.first_bad.is_none(), "{r:?}");
        assert_eq!(r.events, 8, "init + dek-create + 6 puts");
        drop(g);
        env
    };
    let bad = |env: &TestEnv| {
        let o = env.run(&["audit", "verify"], b"");
        assert_eq!(code(&o), 4, "{}", stderr(&o));
        env.open().audit_verify().unwrap().first_bad.unwrap()
    };

    let env = mk("auditdel");
    edit_audit(&env, |t| drop(t.remove(4).unwrap()));
    assert_eq!(bad(&env).0, 4, "a deleted event is named");

    let env = mk("auditswap");
    let (e3, e5) = (audit_entry(&env, 3), audit_entry(&env, 5));
    edit_audit(&env, |t| {
        t.insert(3, e5.as_slice()).unwrap();
        t.insert(5, e3.as_slice()).unwrap();
    });
    assert_eq!(bad(&env).0, 3, "a reordered event is named");

    let env = mk("auditedit");
    let mut e = audit_entry(&env, 6);
    let at = e.windows(2).position(|w| w == b"a3").expect("name in event");
    e[at + 1] = b'9';
    edit_audit(&env, |t| drop(t.insert(6, e.as_slice()).unwrap()));
    let (seq, why) = bad(&env);
    assert_eq!(seq, 6);
    assert!(why.contains("edited"), "{why}");

    let env = mk("audittrunc");
    edit_audit(&env, |t| drop(t.remove(8).unwrap()));
    let (_, why) = bad(&env);
    assert!(why.contains("truncated"), "{why}");
}

#[test]
fn no_plaintext_anywhere_after_a_full_lifecycle() {
    const A: &str = "ghp_LIFECYCLE_CANARY_7f3e9a";
    const B: &str = "xoxb_LIFECYCLE_CANARY_41d2c8";
    let env = TestEnv::new("lcscan");
    let run = |args: &[&str], stdin: &[u8]| {
        let o = common::run_cmd(env.cli().env("RUST_LOG", "trace").args(args), stdin);
        assert_eq!(code(&o), 0, "{args:?}: {}", stderr(&o));
        o
    };
    let mut outs = vec![run(&["init"], b"")];
    outs.push(run(&["put", "github", "a", "--label", "owner=bob"], A.as_bytes()));
    outs.push(run(&["put", "slack", "b", "--expires-in", "1h"], B.as_bytes()));
    outs.push(run(&["rotate-dek", "github"], b""));
    outs.push(run(&["reencrypt"], b""));
    outs.push(run(&["retire", "github", "--below", "2"], b""));
    outs.push(run(&["backup", env.dir.join("one.tgbackup").to_str().unwrap()], b""));
    outs.push(run(&["revoke", "--label", "owner=bob", "--reason", "offboarding"], b""));
    outs.push(run(&["shred", "slack", "--yes"], b""));
    outs.push(run(&["purge", "--expired", "--revoked"], b""));
    outs.push(run(&["audit", "export"], b""));
    outs.push(run(&["stats", "--json"], b""));
    outs.push(run(&["backup", env.dir.join("two.tgbackup").to_str().unwrap()], b""));
    for o in &outs {
        for c in [A, B] {
            assert!(!contains(&o.stdout, c.as_bytes()) && !contains(&o.stderr, c.as_bytes()), "{}", stderr(o));
        }
    }
    for f in files_below(&env.dir) {
        let bytes = std::fs::read(&f).unwrap();
        for c in [A, B] {
            assert!(!contains(&bytes, c.as_bytes()), "{} holds plaintext", f.display());
        }
    }
}
