//! A store and a backup written by tokenguard 0.1.0 open, read and verify with this
//! build: the on-disk formats did not change (tests/fixtures/v0.1-store/README.md).
#![allow(missing_docs, clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use tokenguard::{Config, Error, GetOptions, Secret, TokenGuard};

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/v0.1-store");

/// A private copy of the fixture (git keeps neither 0600 modes nor our writes out).
fn copy_fixture() -> (tempfile::TempDir, Config) {
    let dir = tempfile::Builder::new().prefix("tg-fixture-").tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let d = dir.path();
    std::fs::create_dir_all(d.join("store")).unwrap();
    for f in ["tokenguard.toml", "root.key", "backup.tgbackup", "store/tokens.redb"] {
        std::fs::copy(Path::new(FIXTURE).join(f), d.join(f)).unwrap();
        std::fs::set_permissions(d.join(f), std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    std::fs::set_permissions(d.join("store"), std::fs::Permissions::from_mode(0o700)).unwrap();
    let config = Config::load(&d.join("tokenguard.toml")).unwrap();
    (dir, config)
}

fn raw(g: &TokenGuard, p: &str, n: &str) -> Vec<u8> {
    match g.get(p, n).unwrap() {
        Secret::Raw(s) => s.expose().to_vec(),
        Secret::TokenSet(_) => panic!("{p}/{n} is a token set"),
    }
}

fn check_contents(g: &TokenGuard) {
    assert_eq!(raw(g, "github", "ci-bot"), b"ghp_fixture_raw_secret");
    assert_eq!(raw(g, "github", "deploy"), b"ghp_fixture_after_rotate");
    assert_eq!(raw(g, "slack", "bot"), b"xoxb-fixture-bot");
    let (set, meta) = g.get_with("google", "svc", GetOptions::default()).unwrap();
    assert_eq!(set.field(None).unwrap().expose(), b"ya29.fixture-access");
    assert_eq!(set.field(Some("refresh_token")).unwrap().expose(), b"1//fixture-refresh");
    assert_eq!(meta.expires_at, Some(4_102_444_800));
    assert_eq!(meta.token_type.as_deref(), Some("Bearer"));
    assert_eq!(meta.scopes, ["email", "profile"]);
    let list = g.list(Some("github")).unwrap();
    assert_eq!(
        list.iter().map(|t| (t.name.as_str(), t.dek_version)).collect::<Vec<_>>(),
        [("ci-bot", 1), ("deploy", 2)]
    );
    assert_eq!(list[0].meta.labels.get("owner").map(String::as_str), Some("platform"));
    match g.get("jira", "old") {
        Err(Error::Revoked { reason, .. }) => assert_eq!(reason, "fixture: left the company"),
        other => panic!("jira/old: {other:?}"),
    }
}

#[test]
fn a_store_written_by_0_1_opens_after_an_upgrade_reads_and_verifies() {
    let (_dir, config) = copy_fixture();
    // A store without the state head is not opened silently: an attacker could make
    // any store look old by deleting its head.
    match config.open_guard() {
        Err(e @ Error::UnsupportedVersion { found: 1, supported: 2 }) => {
            assert!(e.hint().unwrap().contains("tokenguard upgrade"), "{:?}", e.hint());
        }
        other => panic!("expected the upgrade refusal, got {other:?}"),
    }
    let inspect =
        tokenguard::GuardOptions { state_check: tokenguard::store::StateCheck::Report, ..config.guard_options() };
    let g = config.open_guard_with(inspect).unwrap();
    assert!(g.state().upgrade_needed);
    // Secrets stay closed until the upgrade.
    assert!(matches!(g.get("github", "ci-bot"), Err(Error::Integrity { .. })));
    let (before, after) = g.upgrade(false).unwrap();
    assert!(!before.verified && after.verified, "{before:?} {after:?}");
    drop(g);
    let g = config.open_guard().unwrap();
    check_contents(&g);
    let audit = g.audit_verify().unwrap();
    assert_eq!(audit.first_bad, None);
    assert_eq!(audit.events, 15, "13 events, the backup's own, then the upgrade");
    assert_eq!(g.audit_list(0).unwrap().last().unwrap().op, "upgrade");
    let failed: Vec<_> = g.doctor().into_iter().filter(|c| c.status == tokenguard::root::Status::Fail).collect();
    assert!(failed.is_empty(), "{failed:?}");

    // It takes new writes, under the right DEK versions, and still verifies.
    g.put("github", "new", Secret::raw(b"ghp_new".to_vec()), Default::default()).unwrap();
    assert_eq!(g.list(Some("github")).unwrap().iter().find(|t| t.name == "new").unwrap().dek_version, 2);
    drop(g);
    let g = config.open_guard().unwrap();
    assert_eq!(raw(&g, "github", "new"), b"ghp_new");
    assert_eq!(g.audit_verify().unwrap().first_bad, None);
}

#[test]
fn a_backup_written_by_0_1_restores() {
    let (dir, mut config) = copy_fixture();
    config.store.path = dir.path().join("restored").join("tokens.redb");
    let backup: PathBuf = dir.path().join("backup.tgbackup");
    let (g, summary) = config.restore_guard(&backup, config.guard_options()).unwrap();
    assert_eq!((summary.tokens, summary.deks, summary.tombstones, summary.audit_events), (4, 5, 1, 13));
    check_contents(&g);
    assert_eq!(g.audit_verify().unwrap().first_bad, None);
    // A restored 0.1 store verifies, but its integrity key lacks this build's marker:
    // `upgrade` replaces it (so the store cannot later pose as a 0.1 store), and the
    // audit chain still verifies across the key change.
    let (before, after) = g.upgrade(false).unwrap();
    assert!(before.verified && after.verified && after.generation > before.generation, "{before:?} {after:?}");
    assert_eq!(g.audit_list(0).unwrap().last().unwrap().op, "upgrade");
    assert_eq!(g.audit_verify().unwrap().first_bad, None);
    let (again, _) = g.upgrade(false).unwrap();
    assert_eq!(again.generation, after.generation, "a second upgrade has nothing to do");
    check_contents(&g);
}
