//! The PKCS#11 backend against two independent implementations — SoftHSM2 (C++) and
//! kryoptic (Rust, from crates.io) — with the same suite: put/get/doctor through the
//! library and the CLI, mechanism probing, tamper detection, and byte-for-byte
//! agreement of the token's key wrapping with an independent RFC 3394 / RFC 5649
//! implementation (the aes-kw crate) under a known, imported KEK.
//!
//! kryoptic's module is found through `TOKENGUARD_TEST_KRYOPTIC_MODULE` (set by
//! .ci/test.sh, which builds it with .ci/kryoptic.sh). Missing, the tests fail.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::PathBuf;
use std::sync::OnceLock;

use common::{TestEnv, code, stderr};
use cryptoki::object::{Attribute, KeyType, ObjectClass};
use redb::{ReadableDatabase, TableDefinition};
use tokenguard::store::DekEntry;
use tokenguard::{Error, PutOptions, Secret, TokenSet};

const KRYOPTIC_LABEL: &str = "tg-kryoptic";

struct Kryoptic {
    module: PathBuf,
    conf: PathBuf,
    pin_file: PathBuf,
}

/// The kryoptic token of this test binary: its own sqlite database and config.
fn kryoptic() -> &'static Kryoptic {
    static K: OnceLock<Kryoptic> = OnceLock::new();
    K.get_or_init(|| {
        let module = std::env::var("TOKENGUARD_TEST_KRYOPTIC_MODULE").map(PathBuf::from).unwrap_or_else(|_| {
            panic!("TOKENGUARD_TEST_KRYOPTIC_MODULE is not set: build kryoptic with .ci/kryoptic.sh (the README's test command does)")
        });
        assert!(module.exists(), "{} does not exist", module.display());
        common::softhsm(); // environment set-up of this process first
        let dir = tempfile::Builder::new().prefix("tg-kryoptic-").tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap().keep();
        let conf = dir.join("kryoptic.conf");
        std::fs::write(&conf, format!("[[slots]]\nslot = 1\ndbtype = \"sqlite\"\ndbargs = \"{}\"\n", dir.join("token.sql").display()))
            .unwrap();
        // SAFETY: once, before this process loads the kryoptic module.
        #[allow(unsafe_code)]
        unsafe {
            std::env::set_var("KRYOPTIC_CONF", &conf)
        };
        let pin_file = dir.join("user.pin");
        common::write_0600(&pin_file, b"kryoptic-user-pin");
        let so = secrecy::SecretString::from("kryoptic-so-pin".to_string());
        let user = secrecy::SecretString::from("kryoptic-user-pin".to_string());
        tokenguard::root::pkcs11::init_token(&module, KRYOPTIC_LABEL, &so, &user).unwrap();
        Kryoptic { module, conf, pin_file }
    })
}

#[derive(Clone, Copy, Debug)]
enum Impl {
    SoftHsm,
    Kryoptic,
}

/// A test env on the given implementation (`extra` goes into the root section).
fn env_on(imp: Impl, name: &str, extra: &str) -> TestEnv {
    let env = TestEnv::new(name);
    if let Impl::Kryoptic = imp {
        let k = kryoptic();
        let text = std::fs::read_to_string(&env.config_path).unwrap();
        let hsm = common::softhsm();
        let text = text
            .replace(&hsm.module.display().to_string(), &k.module.display().to_string())
            .replace("token_label = \"tg-test\"", &format!("token_label = \"{KRYOPTIC_LABEL}\""))
            .replace(&hsm.pin_file.display().to_string(), &k.pin_file.display().to_string())
            .replace(
                &format!("SOFTHSM2_CONF = \"{}\"", hsm.conf.display()),
                &format!("KRYOPTIC_CONF = \"{}\"", k.conf.display()),
            );
        std::fs::write(&env.config_path, text).unwrap();
    }
    if !extra.is_empty() {
        let text = std::fs::read_to_string(&env.config_path).unwrap();
        std::fs::write(&env.config_path, text.replace("[roots.env]", &format!("{extra}\n[roots.env]"))).unwrap();
    }
    env
}

fn suite(imp: Impl) {
    let env = env_on(imp, &format!("conf-{imp:?}").to_lowercase(), "");
    let g = env.init();
    g.put("github", "a", Secret::raw(b"ghp_CONFORMANCE".to_vec()), PutOptions::default()).unwrap();
    let set = TokenSet::new().with("access_token", "at".to_string()).with("refresh_token", "rt".to_string());
    g.put("google", "b", Secret::TokenSet(set), PutOptions::default()).unwrap();
    drop(g);
    let g = env.open();
    assert_eq!(g.get("github", "a").unwrap().field(None).unwrap().expose(), b"ghp_CONFORMANCE");
    assert_eq!(g.get("google", "b").unwrap().field(Some("refresh_token")).unwrap().expose(), b"rt");
    let checks = g.doctor();
    for c in &checks {
        assert_ne!(c.status, tokenguard::root::Status::Fail, "{imp:?}: {c:?}");
    }
    let mech = checks.iter().find(|c| c.name == "wrap mechanism").unwrap();
    assert_eq!(mech.detail, "AES-KW (RFC 3394)", "{imp:?} probes to AES-KW");
    // Through the CLI too.
    assert_eq!(code(&env.run(&["put", "jira", "c"], b"jira_TOKEN")), 0);
    let o = env.run(&["get", "jira", "c"], b"");
    assert_eq!((code(&o), o.stdout.as_slice()), (0, &b"jira_TOKEN"[..]), "{imp:?}: {}", stderr(&o));
    let o = env.run(&["doctor"], b"");
    assert_eq!(code(&o), 0, "{imp:?}: {}", String::from_utf8_lossy(&o.stdout));
    drop(g);

    // A tampered wrapped DEK: integrity error, whatever the module's return code
    // (SoftHSM2: CKR_GENERAL_ERROR, kryoptic: CKR_DEVICE_ERROR).
    edit_dek(&env, "github", |e| e.wrapped[0].wrapped.blob[10] ^= 1);
    env.assert_state_refused("tampered wrapped key");
    match env.accept_state().get("github", "a") {
        Err(e @ Error::Integrity { .. }) => assert_eq!(e.exit_code(), 4),
        other => panic!("{imp:?}: tampered wrapped key: {other:?}"),
    }
}

fn edit_dek(env: &TestEnv, provider: &str, f: impl FnOnce(&mut DekEntry)) {
    const DEKS: TableDefinition<(&str, u32), &[u8]> = TableDefinition::new("deks");
    let mut b = redb::Builder::new();
    b.set_concurrency_mode(redb::ConcurrencyMode::MultiWriter);
    let db = b.open(&env.store_path).unwrap();
    let mut e = {
        let r = db.begin_read().unwrap();
        DekEntry::decode(r.open_table(DEKS).unwrap().get((provider, 1)).unwrap().unwrap().value()).unwrap()
    };
    f(&mut e);
    let w = db.begin_write().unwrap();
    w.open_table(DEKS).unwrap().insert((provider, 1), e.encode().as_slice()).unwrap();
    w.commit().unwrap();
}

fn read_dek(env: &TestEnv, provider: &str) -> DekEntry {
    const DEKS: TableDefinition<(&str, u32), &[u8]> = TableDefinition::new("deks");
    let mut b = redb::Builder::new();
    b.set_concurrency_mode(redb::ConcurrencyMode::MultiWriter);
    let db = b.open(&env.store_path).unwrap();
    let r = db.begin_read().unwrap();
    DekEntry::decode(r.open_table(DEKS).unwrap().get((provider, 1)).unwrap().unwrap().value()).unwrap()
}

#[test]
fn softhsm2_passes_the_suite() {
    suite(Impl::SoftHsm);
}

#[test]
fn kryoptic_passes_the_suite() {
    suite(Impl::Kryoptic);
}

/// A known KEK, imported into the token as a non-extractable key.
const KNOWN_KEK: [u8; 32] = [
    0x60, 0x3d, 0xeb, 0x10, 0x15, 0xca, 0x71, 0xbe, 0x2b, 0x73, 0xae, 0xf0, 0x85, 0x7d, 0x77, 0x81, 0x1f, 0x35, 0x2c,
    0x07, 0x3b, 0x61, 0x08, 0xd7, 0x2d, 0x98, 0x10, 0xa3, 0x09, 0x14, 0xdf, 0xf4,
];

fn import_known_kek(imp: Impl, label: &str) {
    let session = match imp {
        Impl::SoftHsm => common::user_session(),
        Impl::Kryoptic => {
            let k = kryoptic();
            common::session_on(&k.module, KRYOPTIC_LABEL, &k.pin_file)
        }
    };
    common::with_token_lock(|| {
        session.create_object(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::Value(KNOWN_KEK.to_vec()),
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Wrap(true),
            Attribute::Unwrap(true),
            Attribute::Encrypt(true),
            Attribute::Decrypt(true),
            Attribute::Label(label.as_bytes().to_vec()),
        ])
    })
    .unwrap();
}

/// Wraps the token made are exactly what an independent implementation makes.
fn wraps_match_aes_kw(imp: Impl, mechanism: &str) {
    use aes_kw::KeyInit;
    // The known key is imported (CKA_LOCAL false): adopted only when the config says so.
    let env = env_on(
        imp,
        &format!("kat-{imp:?}-{mechanism}").to_lowercase(),
        &format!("mechanism = \"{mechanism}\"\nallow_imported_key = true"),
    );
    import_known_kek(imp, &env.key_label);
    let g = env.init();
    g.put("github", "a", Secret::raw(b"ghp_KNOWN_KEK".to_vec()), PutOptions::default()).unwrap();
    let store_id = g.store_id();
    drop(g);
    let entry = read_dek(&env, "github");
    let blob = &entry.wrapped[0].wrapped.blob;
    let mut dek = [0u8; 40];
    let dek: [u8; 32] = match mechanism {
        "aes-kw" => aes_kw::KwAes256::new(&KNOWN_KEK.into()).unwrap_key(blob, &mut dek).unwrap().try_into().unwrap(),
        "aes-kw-pad" => {
            aes_kw::KwpAes256::new(&KNOWN_KEK.into()).unwrap_key(blob, &mut dek).unwrap().try_into().unwrap()
        }
        _ => unreachable!(),
    };
    // Re-wrapping in software gives the token's bytes exactly (KW is deterministic).
    let mut again = [0u8; 48];
    let rewrapped = match mechanism {
        "aes-kw" => aes_kw::KwAes256::new(&KNOWN_KEK.into()).wrap_key(&dek, &mut again).unwrap().to_vec(),
        _ => aes_kw::KwpAes256::new(&KNOWN_KEK.into()).wrap_key(&dek, &mut again).unwrap().to_vec(),
    };
    assert_eq!(&rewrapped, blob, "{imp:?} {mechanism}: the token's wrap differs from RFC 3394/5649");
    // And that DEK opens the record, outside tokenguard's own key path.
    const TOKENS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("tokens");
    let mut b = redb::Builder::new();
    b.set_concurrency_mode(redb::ConcurrencyMode::MultiWriter);
    let db = b.open(&env.store_path).unwrap();
    let r = db.begin_read().unwrap();
    let rec = r.open_table(TOKENS).unwrap().get(("github", "a")).unwrap().unwrap().value().to_vec();
    let (_, secret) = tokenguard::seal::open_record_with_key(&dek, &store_id, &rec).unwrap();
    assert_eq!(secret.field(None).unwrap().expose(), b"ghp_KNOWN_KEK");
}

#[test]
fn softhsm2_wraps_are_rfc3394_and_rfc5649() {
    wraps_match_aes_kw(Impl::SoftHsm, "aes-kw");
    wraps_match_aes_kw(Impl::SoftHsm, "aes-kw-pad");
}

#[test]
fn kryoptic_wraps_are_rfc3394() {
    wraps_match_aes_kw(Impl::Kryoptic, "aes-kw");
}

#[test]
fn the_gcm_fallback_works_on_both() {
    for imp in [Impl::SoftHsm, Impl::Kryoptic] {
        let env = env_on(imp, &format!("gcm-{imp:?}").to_lowercase(), "mechanism = \"aes-gcm\"");
        let g = env.init();
        g.put("github", "a", Secret::raw(b"ghp_GCM".to_vec()), PutOptions::default()).unwrap();
        drop(g);
        let g = env.open();
        assert_eq!(g.get("github", "a").unwrap().field(None).unwrap().expose(), b"ghp_GCM", "{imp:?}");
        let mech = g.doctor().into_iter().find(|c| c.name == "wrap mechanism").unwrap();
        assert_eq!(mech.detail, "AES-GCM encrypt", "{imp:?}");
        assert_eq!(read_dek(&env, "github").wrapped[0].wrapped.blob.len(), 12 + 32 + 16);
    }
}

/// The PKCS#11 rollback counter (a data object whose label carries the value) works
/// on both implementations: bound at init, one step per commit, a copy put back
/// refused.
#[test]
fn the_rollback_counter_works_on_both() {
    for imp in [Impl::SoftHsm, Impl::Kryoptic] {
        let name = format!("ctr-{imp:?}").to_lowercase();
        let env = env_on(imp, &name, &format!("counter_label = \"{name}-{}\"", std::process::id()));
        drop(env.init());
        assert_eq!(code(&env.run(&["put", "github", "a"], b"ghp_1")), 0);
        let copy = std::fs::read(&env.store_path).unwrap();
        assert_eq!(code(&env.run(&["put", "github", "a"], b"ghp_2")), 0);
        let o = env.run(&["doctor"], b"");
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(out.lines().any(|l| l.starts_with("ok") && l.contains("rollback counter")), "{imp:?}: {out}");
        std::fs::write(&env.store_path, &copy).unwrap();
        let o = env.run(&["get", "github", "a"], b"");
        assert_eq!(code(&o), 4, "{imp:?}: {}", stderr(&o));
        assert!(stderr(&o).contains("older than its counter"), "{imp:?}: {}", stderr(&o));
    }
}
