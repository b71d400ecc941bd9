//! The library on a real SoftHSM2 token: round trips, expiry, DEK caching, threads,
//! backup/restore, recovery after the module is finalised underneath.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::TestEnv;
use tokenguard::{Error, GetOptions, PutItem, PutOptions, Secret, TokenGuard, TokenSet, TokenState};

fn raw(s: &str) -> Secret {
    Secret::raw(s.as_bytes().to_vec())
}

fn value(g: &TokenGuard, p: &str, n: &str) -> Vec<u8> {
    g.get(p, n).unwrap().field(None).unwrap().expose().to_vec()
}

#[test]
fn raw_and_token_set_round_trip() {
    let env = TestEnv::new("roundtrip");
    let g = env.init();
    let mut labels = BTreeMap::new();
    labels.insert("owner".to_string(), "alice".to_string());
    let meta =
        g.put("github", "ci-bot", raw("ghp_abcdef0123456789"), PutOptions { labels, ..Default::default() }).unwrap();
    assert_eq!(meta.state, TokenState::Active);
    assert_eq!(value(&g, "github", "ci-bot"), b"ghp_abcdef0123456789");

    let set = TokenSet::new()
        .with("access_token", "ya29.ACCESS".to_string())
        .with("refresh_token", "1//REFRESH".to_string())
        .with("id_token", "eyJ.ID".to_string());
    g.put("google", "svc", Secret::TokenSet(set), PutOptions { scopes: vec!["email".into()], ..Default::default() })
        .unwrap();
    let (s, m) = g.get_with("google", "svc", GetOptions::default()).unwrap();
    assert_eq!(s.field(None).unwrap().expose(), b"ya29.ACCESS");
    assert_eq!(s.field(Some("refresh_token")).unwrap().expose(), b"1//REFRESH");
    assert_eq!(s.field(Some("id_token")).unwrap().expose(), b"eyJ.ID");
    assert!(s.field(Some("nope")).is_none());
    assert_eq!(m.scopes, vec!["email".to_string()]);

    // Replacing keeps `created`, moves `updated`, and survives reopening.
    g.put("github", "ci-bot", raw("ghp_second"), PutOptions::default()).unwrap();
    drop(g);
    let g = env.open();
    assert_eq!(value(&g, "github", "ci-bot"), b"ghp_second");
    let list = g.list(None).unwrap();
    assert_eq!(
        list.iter().map(|t| (t.provider.as_str(), t.name.as_str())).collect::<Vec<_>>(),
        [("github", "ci-bot"), ("google", "svc")]
    );
    assert_eq!(g.list(Some("google")).unwrap().len(), 1);

    g.delete("github", "ci-bot").unwrap();
    assert!(matches!(g.get("github", "ci-bot"), Err(Error::NotFound { .. })));
    assert!(matches!(g.delete("github", "ci-bot"), Err(Error::NotFound { .. })));
    assert!(g.audit_verify().unwrap().first_bad.is_none());
}

#[test]
fn expired_tokens_fail_unless_allowed() {
    let env = TestEnv::new("expiry");
    let g = env.init();
    g.put("slack", "old", raw("xoxb-old"), PutOptions { expires_at: Some(1), ..Default::default() }).unwrap();
    g.put("slack", "new", raw("xoxb-new"), PutOptions { expires_at: Some(u64::MAX / 2), ..Default::default() })
        .unwrap();
    match g.get("slack", "old") {
        Err(e @ Error::Expired { .. }) => assert_eq!(e.exit_code(), 7),
        other => panic!("expected Expired, got {other:?}"),
    }
    let (s, _) = g.get_with("slack", "old", GetOptions { allow_expired: true }).unwrap();
    assert_eq!(s.field(None).unwrap().expose(), b"xoxb-old");
    assert_eq!(value(&g, "slack", "new"), b"xoxb-new");
    let l = g.list(Some("slack")).unwrap();
    assert!(l.iter().find(|t| t.name == "old").unwrap().expired);
}

#[test]
fn invalid_names_and_empty_secrets_are_refused() {
    let env = TestEnv::new("invalid");
    let g = env.init();
    for (p, n) in [("", "x"), ("git hub", "x"), ("github", "a/b"), ("github", &"x".repeat(200))] {
        let e = g.put(p, n, raw("s"), PutOptions::default()).unwrap_err();
        assert_eq!(e.exit_code(), 2, "{e}");
    }
    assert!(matches!(g.put("github", "x", raw(""), PutOptions::default()), Err(Error::InvalidInput(_))));
}

#[test]
fn hardware_is_touched_once_per_provider_dek() {
    let env = TestEnv::new("hwcount");
    let g = env.init();
    let providers = ["github", "slack", "google", "jira", "gitlab"];
    let items = providers
        .iter()
        .flat_map(|p| {
            (0..20).map(move |i| PutItem {
                provider: p.to_string(),
                name: format!("t{i}"),
                secret: raw(&format!("{p}-{i}")),
                options: PutOptions::default(),
            })
        })
        .collect();
    g.put_many(items).unwrap();
    assert_eq!(g.hardware_calls().generates, providers.len() as u64);
    drop(g);

    let g = env.open();
    assert_eq!(g.hardware_calls().unwraps, 1, "open unwraps the integrity key only");
    for _ in 0..3 {
        for p in providers {
            for i in 0..20 {
                assert_eq!(value(&g, p, &format!("t{i}")), format!("{p}-{i}").as_bytes());
            }
        }
    }
    let stats = g.stats().unwrap();
    assert_eq!(
        stats.hardware.unwraps,
        1 + providers.len() as u64,
        "one unwrap per provider DEK, whatever the number of gets"
    );
    assert_eq!(stats.tokens, 100);
    assert!(stats.deks.iter().all(|d| d.records == 20 && d.encryptions == 20));
}

#[test]
fn eight_threads_mixed_get_put_lose_nothing() {
    let env = TestEnv::new("threads");
    let g = env.init();
    for t in 0..8 {
        g.put("github", &format!("seed-{t}"), raw(&format!("seed-{t}")), PutOptions::default()).unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    let written = Arc::new(AtomicU64::new(0));
    let handles: Vec<_> = (0..8)
        .map(|t| {
            let g = g.clone();
            let written = written.clone();
            std::thread::spawn(move || {
                let mut i = 0u64;
                let provider = if t % 2 == 0 { "github" } else { "slack" };
                while Instant::now() < deadline {
                    let name = format!("w{t}-{i}");
                    // A write that waited past busy_timeout on a loaded machine was not
                    // acknowledged: a client retries it (nothing may be lost either way).
                    let put = || g.put(provider, &name, raw(&format!("v-{t}-{i}")), PutOptions::default());
                    let mut r = put();
                    while matches!(r, Err(tokenguard::Error::StoreBusy { .. })) {
                        r = put();
                    }
                    r.unwrap();
                    written.fetch_add(1, Ordering::Relaxed);
                    for _ in 0..5 {
                        assert_eq!(value(&g, "github", &format!("seed-{t}")), format!("seed-{t}").as_bytes());
                        assert_eq!(value(&g, provider, &name), format!("v-{t}-{i}").as_bytes());
                    }
                    i += 1;
                }
                (t, i)
            })
        })
        .collect();
    let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    drop(g);
    let g = env.open();
    for (t, n) in results {
        let provider = if t % 2 == 0 { "github" } else { "slack" };
        for i in 0..n {
            assert_eq!(value(&g, provider, &format!("w{t}-{i}")), format!("v-{t}-{i}").as_bytes());
        }
    }
    assert!(written.load(Ordering::Relaxed) > 8);
}

/// Exclusive mode keeps a read snapshot per thread from one read to the next
/// (`store::redb_store::snapshots`). Every read that follows a commit must see it,
/// from any thread; and a kept snapshot must not outlive the next commit, or the
/// pages it pins are never reused and the file grows with every write.
#[test]
fn exclusive_mode_reads_see_every_commit_and_kept_snapshots_do_not_grow_the_file() {
    let env = TestEnv::with_config("kept-snapshots", "mode = \"exclusive\"");
    let g = env.init();
    for t in 0..4 {
        g.put("github", &format!("t{t}"), raw("0"), PutOptions::default()).unwrap();
    }
    // Four threads each write their own token and read every token. A read begun
    // after a put returned sees that put (or a later one), whichever thread made it.
    let committed: [AtomicU64; 4] = Default::default();
    std::thread::scope(|s| {
        for t in 0..4 {
            let (g, committed) = (&g, &committed);
            s.spawn(move || {
                for i in 1..=60u64 {
                    g.put("github", &format!("t{t}"), raw(&i.to_string()), PutOptions::default()).unwrap();
                    committed[t].store(i, Ordering::SeqCst);
                    for (other, done) in committed.iter().enumerate() {
                        let at_least = done.load(Ordering::SeqCst);
                        let v: u64 =
                            String::from_utf8(value(g, "github", &format!("t{other}"))).unwrap().parse().unwrap();
                        assert!(v >= at_least, "thread {t} read t{other} = {v} after {at_least} was committed");
                    }
                }
            });
        }
    });
    // Threads that read once and end leave their snapshots behind in their slots.
    for t in 0..8 {
        let g = g.clone();
        std::thread::spawn(move || assert!(!value(&g, "github", &format!("t{}", t % 4)).is_empty())).join().unwrap();
    }
    let size = || std::fs::metadata(&env.store_path).unwrap().len();
    for i in 0..50 {
        g.put("github", "writer", raw(&format!("w{i}")), PutOptions::default()).unwrap();
    }
    let before = size();
    for i in 0..200 {
        g.put("github", "writer", raw(&format!("w{i}")), PutOptions::default()).unwrap();
    }
    let grown = size().saturating_sub(before);
    // Each put appends one audit event (a few hundred bytes). A snapshot pinned
    // across the 200 commits keeps several 4 KiB pages of each one from reuse (about
    // 50 KiB a commit, measured with the sweep removed).
    assert!(grown < 200 * 1024, "the store grew by {grown} bytes over 200 puts");
    assert_eq!(value(&g, "github", "writer"), b"w199");
}

#[test]
fn backup_restores_under_the_same_root_and_rejects_tampering() {
    let env = TestEnv::new("backup");
    let g = env.init();
    g.put("github", "a", raw("ghp_backup_a"), PutOptions { expires_at: Some(u64::MAX / 2), ..Default::default() })
        .unwrap();
    g.put("jira", "b", raw("jira_backup_b"), PutOptions::default()).unwrap();
    let file = env.dir.join("store.tgbackup");
    let s = tokenguard::backup::write_backup(&g, &file).unwrap();
    assert_eq!(s.tokens, 2);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
    assert!(tokenguard::backup::write_backup(&g, &file).is_err(), "never overwrites");

    let c = env.config();
    let restore_to = env.dir.join("restored").join("tokens.redb");
    let (r, _) = tokenguard::backup::restore(
        &file,
        &restore_to,
        c.store_options(),
        c.build_roots(tokenguard::config::RootUse::Open).unwrap(),
        c.guard_options(),
    )
    .unwrap();
    assert_eq!(value(&r, "github", "a"), b"ghp_backup_a");
    assert_eq!(value(&r, "jira", "b"), b"jira_backup_b");
    assert_eq!(r.store_id(), g.store_id());
    assert!(r.audit_verify().unwrap().first_bad.is_none());
    drop(r);

    // Any flipped byte, and any truncation, is rejected before anything is written.
    let bytes = std::fs::read(&file).unwrap();
    for pos in (0..bytes.len()).step_by(7).chain([bytes.len() - 1]) {
        let mut t = bytes.clone();
        t[pos] ^= 0x01;
        let tf = env.dir.join(format!("t{pos}.tgbackup"));
        std::fs::write(&tf, &t).unwrap();
        let to = env.dir.join(format!("r{pos}")).join("tokens.redb");
        let e = tokenguard::backup::restore(
            &tf,
            &to,
            c.store_options(),
            c.build_roots(tokenguard::config::RootUse::Open).unwrap(),
            c.guard_options(),
        )
        .err()
        .unwrap_or_else(|| panic!("flip at {pos} was accepted"));
        assert!(matches!(e, Error::Integrity { .. } | Error::WrongRoot { .. }), "flip at {pos}: {e}");
        assert!(!to.exists(), "nothing is written for a bad backup");
    }
    let tf = env.dir.join("trunc.tgbackup");
    std::fs::write(&tf, &bytes[..bytes.len() / 2]).unwrap();
    let to = env.dir.join("rtrunc").join("tokens.redb");
    assert!(
        tokenguard::backup::restore(
            &tf,
            &to,
            c.store_options(),
            c.build_roots(tokenguard::config::RootUse::Open).unwrap(),
            c.guard_options()
        )
        .is_err()
    );
}

#[test]
fn guard_recovers_after_the_module_is_finalised_underneath() {
    let env = TestEnv::new("recover");
    let g = env.init();
    g.put("github", "a", raw("ghp_recover"), PutOptions::default()).unwrap();
    drop(g);
    let g = env.open();
    // Another user of the module in this process finalises it (as a token restart
    // or a library re-initialisation would): every session and handle is gone.
    let other = cryptoki::context::Pkcs11::new(common::module_path()).unwrap();
    other.finalize().unwrap();
    // The first get needs a DEK unwrap: it meets CKR_CRYPTOKI_NOT_INITIALIZED,
    // re-initialises, finds token and key again, and succeeds.
    assert_eq!(value(&g, "github", "a"), b"ghp_recover");
    g.put("slack", "b", raw("xoxb-after"), PutOptions::default()).unwrap();
    assert_eq!(value(&g, "slack", "b"), b"xoxb-after");
}

/// The read journal (the agent's durable read audit). Events journaled and never
/// folded by their process, as a SIGKILL leaves them, join the chain at the next
/// open, in order and verified; a frame edited in the file is not folded, and the
/// trail says so; a journal others can read refuses the open; a shared store has
/// none.
#[test]
fn a_read_journal_left_unfolded_joins_the_chain_at_the_next_open_and_an_edited_frame_does_not() {
    use std::os::unix::fs::PermissionsExt;
    use tokenguard::audit::AuditRecord;
    let env = TestEnv::with_config("journal", "mode = \"exclusive\"");
    let g = env.init();
    g.put("p", "t", raw("v"), PutOptions::default()).unwrap();
    g.start_read_journal().unwrap();
    let journal = env.store_path.with_file_name("tokens.redb.audit-journal");
    assert_eq!(std::fs::metadata(&journal).unwrap().permissions().mode() & 0o777, 0o600);
    let rec = |name: &str| AuditRecord {
        actor: "reader uid=1000".into(),
        op: "agent-get".into(),
        provider: "p".into(),
        name: name.into(),
        outcome: "ok".into(),
        detail: String::new(),
    };
    g.audit_journaled(&[rec("r1"), rec("r2")]).unwrap();
    g.audit_journaled(&[rec("r3")]).unwrap();
    assert_eq!(g.journal_status().unwrap().pending, 3);
    // A write folds the journal first: the reads keep their place before it.
    g.put("p", "t2", raw("v2"), PutOptions::default()).unwrap();
    assert_eq!(g.journal_status().unwrap().pending, 0);
    let ops: Vec<(String, String)> =
        g.audit_list(0).unwrap().into_iter().map(|e| (e.op, e.name)).filter(|(_, n)| !n.is_empty()).collect();
    let want: Vec<(String, String)> =
        [("put", "t"), ("agent-get", "r1"), ("agent-get", "r2"), ("agent-get", "r3"), ("put", "t2")]
            .iter()
            .map(|(o, n)| (o.to_string(), n.to_string()))
            .collect();
    assert_eq!(ops, want);
    g.audit_journaled(&[rec("r4"), rec("r5")]).unwrap();
    g.audit_journaled(&[rec("r6")]).unwrap();
    drop(g); // no fold: what a SIGKILL leaves

    // An attacker edits the last frame (its MAC no longer matches).
    let mut bytes = std::fs::read(&journal).unwrap();
    let mut at = 8;
    let mut frames = Vec::new();
    loop {
        let len = u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        if len == 0 || frames.len() == 3 {
            break;
        }
        frames.push(at + 4..at + 4 + len);
        at += 4 + len;
    }
    assert_eq!(frames.len(), 3, "three journaled events");
    let r6 = frames[2].clone();
    let pos = r6.start + bytes[r6.clone()].windows(2).position(|w| w == b"r6").unwrap();
    bytes[pos + 1] = b'7';
    std::fs::write(&journal, &bytes).unwrap();

    // The next open folds r4 and r5, not the edited frame, and records that.
    let g = env.open();
    let events = g.audit_list(0).unwrap();
    let names: Vec<&str> = events.iter().filter(|e| e.op == "agent-get").map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["r1", "r2", "r3", "r4", "r5"]);
    let fold = events.iter().find(|e| e.op == "audit-journal").expect("the fold is recorded");
    assert_eq!(fold.outcome, "discarded");
    assert!(fold.detail.starts_with("2 events folded"), "{}", fold.detail);
    assert!(fold.detail.contains("1 frames after them do not continue the chain"), "{}", fold.detail);
    assert!(g.audit_verify().unwrap().first_bad.is_none());
    drop(g);
    // Opened again: nothing is folded twice.
    let g = env.open();
    assert_eq!(g.audit_list(0).unwrap().len(), events.len());
    // Another crash; this time the attacker renumbers the first frame to an event
    // the store already has (to hide it among them): it is not the store's event of
    // that number, so it is reported, and the frame after it no longer continues.
    g.start_read_journal().unwrap();
    g.audit_journaled(&[rec("r7"), rec("r8")]).unwrap();
    drop(g);
    let mut bytes = std::fs::read(&journal).unwrap();
    // frame: len:u32 ‖ event:bytes (len:u32 ‖ format:u8 ‖ seq:u64 ‖ …) ‖ prev ‖ mac
    bytes[8 + 4 + 4 + 1..8 + 4 + 4 + 9].copy_from_slice(&2u64.to_be_bytes());
    std::fs::write(&journal, &bytes).unwrap();
    let g = env.open();
    let after = g.audit_list(0).unwrap();
    assert!(!after.iter().any(|e| e.name == "r7" || e.name == "r8"));
    let fold = after.iter().rev().find(|e| e.op == "audit-journal").unwrap();
    assert_eq!(fold.outcome, "discarded");
    assert!(fold.detail.starts_with("0 events folded"), "{}", fold.detail);
    assert!(fold.detail.contains("1 frames at or below the store's head differ"), "{}", fold.detail);
    assert!(fold.detail.contains("1 frames after them do not continue"), "{}", fold.detail);
    assert!(g.audit_verify().unwrap().first_bad.is_none());
    drop(g);

    // A journal others can read refuses the open (it would be someone else's to edit).
    std::fs::set_permissions(&journal, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = env.try_open().unwrap_err();
    assert_eq!(e.exit_code(), 8, "{e}");
    assert!(e.to_string().contains("not a private file"), "{e}");
    std::fs::set_permissions(&journal, std::fs::Permissions::from_mode(0o600)).unwrap();
    drop(env.open());

    // A shared store may have other writers: no journal. A journal left at the path
    // of a store that is gone is not this store's: `init` marks it empty.
    let shared = TestEnv::new("journal-shared");
    std::fs::create_dir_all(shared.store_path.parent().unwrap()).unwrap();
    let stray = shared.store_path.with_file_name("tokens.redb.audit-journal");
    let mut old = b"TGJ\x01\0\0\0\0".to_vec();
    old.extend_from_slice(&5u32.to_be_bytes());
    old.extend_from_slice(b"stray");
    common::write_0600(&stray, &old);
    drop(shared.init());
    let g = shared.open();
    assert!(!g.audit_list(0).unwrap().iter().any(|e| e.op == "audit-journal"));
    let e = g.start_read_journal().unwrap_err();
    assert!(e.to_string().contains("exclusive"), "{e}");
    // Without a journal, a journaled batch is one store commit.
    g.audit_journaled(&[rec("direct")]).unwrap();
    assert!(g.audit_list(0).unwrap().iter().any(|e| e.name == "direct"));
}
