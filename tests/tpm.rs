//! The TPM 2.0 root against real swtpm processes, one per test, on loopback, started
//! and stopped by the tests themselves.
#![allow(clippy::unwrap_used)]

mod common;

use std::str::FromStr;

use common::{Swtpm, TestEnv, code, stderr};
use tokenguard::config::{Config, RootUse};
use tokenguard::{Error, GuardOptions, PutOptions, Secret, TokenGuard};

fn tpm_root_toml(tpm: &Swtpm, extra: &str) -> String {
    format!("[[roots]]\nbackend = \"tpm\"\ntcti = \"{}\"\n{extra}\n", tpm.tcti())
}

/// An env whose config has the given roots (TOML) instead of the SoftHSM2 root.
fn env_with_roots(name: &str, roots: &str, require_hardware: bool) -> TestEnv {
    let env = TestEnv::new(name);
    std::fs::write(
        &env.config_path,
        format!(
            "require_hardware = {require_hardware}\n[store]\npath = \"{}\"\nbusy_timeout_ms = 2000\n{roots}",
            env.store_path.display()
        ),
    )
    .unwrap();
    env
}

fn raw(s: &str) -> Secret {
    Secret::raw(s.as_bytes().to_vec())
}

fn value(g: &TokenGuard, p: &str, n: &str) -> Vec<u8> {
    g.get(p, n).unwrap_or_else(|e| panic!("{p}/{n}: {e}")).field(None).unwrap().expose().to_vec()
}

#[test]
fn put_get_on_tpm_survives_a_restart_and_a_tpm_outage() {
    let mut tpm = Swtpm::start();
    let env = env_with_roots("tpm-basic", &tpm_root_toml(&tpm, ""), true);
    let o = env.run(&["init"], b"");
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("TPM storage key"));
    assert_eq!(code(&env.run(&["put", "github", "a"], b"ghp_TPM_A")), 0);
    let g = env.open();
    g.put("slack", "b", raw("xoxb_TPM_B"), PutOptions::default()).unwrap();
    assert_eq!(value(&g, "github", "a"), b"ghp_TPM_A");
    assert_eq!(g.hardware_calls().unwraps, 2, "integrity key + github; slack's DEK came from generation");

    // The TPM goes away: a cold DEK cannot be unsealed; a clear error, no panic.
    tpm.stop();
    g.clear_dek_cache();
    match g.get("slack", "b") {
        Err(e @ Error::Hardware { .. }) => assert_eq!(e.exit_code(), 5),
        other => panic!("{other:?}"),
    }
    let o = env.run(&["get", "slack", "b"], b"");
    assert_eq!(code(&o), 5, "{}", stderr(&o));
    // It comes back (same state): the same guard reconnects; a new process works.
    tpm.restart();
    assert_eq!(value(&g, "slack", "b"), b"xoxb_TPM_B");
    let o = env.run(&["get", "github", "a"], b"");
    assert_eq!((code(&o), o.stdout.as_slice()), (0, &b"ghp_TPM_A"[..]), "{}", stderr(&o));
    let o = env.run(&["doctor"], b"");
    assert_eq!(code(&o), 0, "{}", String::from_utf8_lossy(&o.stdout));
}

#[test]
fn a_wiped_tpm_is_a_wrong_root_and_changes_nothing() {
    let mut tpm = Swtpm::start();
    let env = env_with_roots("tpm-wipe", &tpm_root_toml(&tpm, ""), true);
    assert_eq!(code(&env.run(&["init"], b"")), 0);
    assert_eq!(code(&env.run(&["put", "github", "a"], b"ghp_W")), 0);
    let before = dump(&env);
    tpm.wipe_state();
    let o = env.run(&["get", "github", "a"], b"");
    assert_eq!(code(&o), 4, "{}", stderr(&o));
    assert!(stderr(&o).contains("wrong root key") && stderr(&o).contains("TPM storage key"), "{}", stderr(&o));
    assert!(dump(&env) == before, "the store's contents changed");
}

/// Every table's keys and values, as bytes (redb itself may rewrite its header on
/// open; the contents are what must not change).
fn dump(env: &TestEnv) -> Vec<Vec<u8>> {
    use redb::{ReadableDatabase, ReadableTable, TableDefinition};
    const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
    const DEKS: TableDefinition<(&str, u32), &[u8]> = TableDefinition::new("deks");
    const TOKENS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("tokens");
    let db = common::raw_db(&env.store_path);
    let r = db.begin_read().unwrap();
    let mut out = Vec::new();
    for item in r.open_table(META).unwrap().iter().unwrap() {
        let (k, v) = item.unwrap();
        out.push([k.value().as_bytes(), v.value()].concat());
    }
    for item in r.open_table(DEKS).unwrap().iter().unwrap() {
        let (k, v) = item.unwrap();
        out.push([k.value().0.as_bytes(), &k.value().1.to_be_bytes(), v.value()].concat());
    }
    for item in r.open_table(TOKENS).unwrap().iter().unwrap() {
        let (k, v) = item.unwrap();
        out.push([k.value().0.as_bytes(), k.value().1.as_bytes(), v.value()].concat());
    }
    out
}

#[test]
fn a_foreign_persistent_object_is_never_overwritten() {
    let tpm = Swtpm::start();
    // Another tool's key at our handle: a primary with a different template.
    {
        use tss_esapi::interface_types::dynamic_handles::Persistent;
        use tss_esapi::interface_types::resource_handles::{Hierarchy, Provision};
        let mut ctx = tss_esapi::Context::new(tss_esapi::TctiNameConf::from_str(&tpm.tcti()).unwrap()).unwrap();
        let public = tss_esapi::utils::create_restricted_decryption_rsa_public(
            tss_esapi::structures::SymmetricDefinitionObject::AES_128_CFB,
            tss_esapi::interface_types::key_bits::RsaKeyBits::Rsa2048,
            tss_esapi::structures::RsaExponent::default(),
        )
        .unwrap();
        let p = ctx
            .execute_with_session(Some(tss_esapi::interface_types::session_handles::AuthSession::Password), |c| {
                c.create_primary(Hierarchy::Owner, public, None, None, None, None)
            })
            .unwrap();
        let h = tss_esapi::handles::PersistentTpmHandle::new(0x8100_0A10).unwrap();
        ctx.execute_with_session(Some(tss_esapi::interface_types::session_handles::AuthSession::Password), |c| {
            c.evict_control(Provision::Owner, p.key_handle.into(), Persistent::Persistent(h))
        })
        .unwrap();
    }
    let env = env_with_roots("tpm-foreign", &tpm_root_toml(&tpm, ""), true);
    let o = env.run(&["init"], b"");
    assert_eq!(code(&o), 8, "{}", stderr(&o));
    assert!(stderr(&o).contains("did not create"), "{}", stderr(&o));
    // A different handle works.
    let env = env_with_roots("tpm-foreign2", &tpm_root_toml(&tpm, "persistent_handle = \"0x81000a11\""), true);
    assert_eq!(code(&env.run(&["init"], b"")), 0);
}

fn extend_pcr(tpm: &Swtpm, pcr: u32) {
    use tss_esapi::handles::PcrHandle;
    use tss_esapi::interface_types::algorithm::HashingAlgorithm;
    use tss_esapi::structures::{Digest, DigestValues};
    let mut ctx = tss_esapi::Context::new(tss_esapi::TctiNameConf::from_str(&tpm.tcti()).unwrap()).unwrap();
    let mut vals = DigestValues::new();
    vals.set(HashingAlgorithm::Sha256, Digest::try_from(vec![0x42u8; 32]).unwrap());
    let handle = PcrHandle::try_from(pcr).unwrap();
    ctx.execute_with_session(Some(tss_esapi::interface_types::session_handles::AuthSession::Password), |c| {
        c.pcr_extend(handle, vals)
    })
    .unwrap();
}

#[test]
fn a_pcr_extend_locks_the_pcr_bound_root_but_the_second_root_opens() {
    let tpm = Swtpm::start();
    // PCR-bound alone is refused.
    let alone = env_with_roots("tpm-pcr-alone", &tpm_root_toml(&tpm, "pcrs = [16]"), true);
    let o = alone.run(&["init"], b"");
    assert_eq!(code(&o), 8, "{}", stderr(&o));
    assert!(stderr(&o).contains("cannot be the only root"), "{}", stderr(&o));

    let env = TestEnv::new("tpm-pcr");
    let key = env.dir.join("recovery.key");
    let roots = format!(
        "{}[[roots]]\nbackend = \"soft\"\nkey_file = \"{}\"\n",
        tpm_root_toml(&tpm, "pcrs = [16]"),
        key.display()
    );
    std::fs::write(
        &env.config_path,
        format!("require_hardware = false\n[store]\npath = \"{}\"\n{roots}", env.store_path.display()),
    )
    .unwrap();
    let g = env.config().init_guard().unwrap();
    g.put("github", "a", raw("ghp_PCR"), PutOptions::default()).unwrap();
    drop(g);
    // Only the TPM root configured: works before the extend.
    let c = env.config();
    let tpm_only = || {
        let mut roots = c.build_roots(RootUse::Open).unwrap();
        roots.truncate(1);
        TokenGuard::open(&c.store.path, c.store_options(), roots, GuardOptions::default())
    };
    assert_eq!(value(&tpm_only().unwrap(), "github", "a"), b"ghp_PCR");
    // doctor shows the policy and the current values.
    let checks = env.open().doctor();
    let pcr = checks.iter().find(|c| c.name == "tpm PCR policy").unwrap();
    assert!(pcr.detail.contains("PCRs [16]"), "{}", pcr.detail);
    // … and tells the truth about the policy unseal (issue 10, finding 8: a salted
    // policy session now) and the missing authorisation value (finding 7).
    let enc = checks.iter().find(|c| c.name == "tpm parameter encryption").unwrap();
    assert_eq!(enc.status, tokenguard::root::Status::Ok, "{enc:?}");
    assert!(enc.detail.contains("salted policy session"), "{}", enc.detail);
    let auth = checks.iter().find(|c| c.name == "tpm authorisation").unwrap();
    assert_eq!(auth.status, tokenguard::root::Status::Warn, "{auth:?}");
    assert!(auth.detail.contains("no pin_source"), "{}", auth.detail);

    extend_pcr(&tpm, 16);
    match tpm_only() {
        Err(e @ Error::Hardware { .. }) => {
            assert_eq!(e.exit_code(), 5);
            assert!(e.to_string().contains("PCR values differ"), "{e}");
        }
        other => panic!("expected a PCR policy failure, got {other:?}"),
    }
    // With the recovery root also configured, the store opens and reads.
    let g = env.open();
    assert_eq!(value(&g, "github", "a"), b"ghp_PCR");
    // The PCR-bound root may not be left alone.
    let pins = g.pinned_roots().unwrap();
    let soft_id = pins.iter().find(|p| p.pin.starts_with("soft:")).unwrap().root_id;
    assert!(matches!(g.remove_root(soft_id), Err(Error::InvalidInput(_))));
}

#[test]
fn multi_root_hsm_and_tpm() {
    let tpm = Swtpm::start();
    let env = TestEnv::new("tpm-multi");
    let mut text = std::fs::read_to_string(&env.config_path).unwrap();
    text.push_str(&tpm_root_toml(&tpm, ""));
    std::fs::write(&env.config_path, text).unwrap();
    let g = env.init();
    assert_eq!(g.roots().len(), 2);
    g.put("github", "a", raw("ghp_MULTI"), PutOptions::default()).unwrap();
    drop(g);
    // Either root alone opens the store.
    let c: Config = env.config();
    for keep in [0usize, 1] {
        let mut roots = c.build_roots(RootUse::Open).unwrap();
        let r = roots.remove(keep);
        let g = TokenGuard::open(&c.store.path, c.store_options(), vec![r], GuardOptions::default()).unwrap();
        assert_eq!(value(&g, "github", "a"), b"ghp_MULTI", "root {keep} alone");
    }
}

/// The wrapped integrity key of the store, read with redb alone (as an attacker
/// holding the file would).
fn wrapped_integrity_key(env: &TestEnv) -> Vec<tokenguard::store::RootWrapped> {
    use redb::{ReadableDatabase, TableDefinition};
    const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
    let mut b = redb::Builder::new();
    b.set_concurrency_mode(redb::ConcurrencyMode::MultiWriter);
    let db = b.open(&env.store_path).unwrap();
    let r = db.begin_read().unwrap();
    let v = r.open_table(META).unwrap().get("integrity_key").unwrap().unwrap().value().to_vec();
    tokenguard::store::decode_wrapped_key(&v).unwrap()
}

fn tpm_settings(tpm: &Swtpm, pin: Option<&str>, pcrs: Option<Vec<u8>>) -> tokenguard::root::tpm::TpmSettings {
    use tokenguard::root::tpm::{TpmAuth, TpmSettings};
    TpmSettings {
        tcti: tpm.tcti(),
        persistent_handle: tokenguard::root::tpm::DEFAULT_PERSISTENT_HANDLE,
        parameter_encryption: true,
        pcrs: pcrs.map(|p| (tss_esapi::interface_types::algorithm::HashingAlgorithm::Sha256, p)),
        auth: pin.map(|p| TpmAuth::from_pin(&secrecy::SecretString::from(p.to_string()))),
        nv_counter: None,
    }
}

/// Finding 7: with a `pin_source`, the sealed keys need the PIN's authorisation value.
/// Someone who can open the TPM device and holds the store file, but not the PIN,
/// unseals nothing; a wrong PIN is exit 5 and changes nothing.
#[test]
fn tpm_keys_sealed_with_a_pin_need_it() {
    use tokenguard::root::tpm::TpmRoot;
    use tokenguard::root::{RootKey, WrapMechanism};
    let tpm = Swtpm::start();
    let env = env_with_roots("tpm-auth", &tpm_root_toml(&tpm, "pin_source = \"env:TG_TPM_PIN\""), true);
    let with_pin = |args: &[&str], stdin: &[u8], pin: &str| {
        let mut cmd = env.cli();
        cmd.args(args).env("TG_TPM_PIN", pin);
        common::run_cmd(&mut cmd, stdin)
    };
    let o = with_pin(&["init"], b"", "4711-right");
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(code(&with_pin(&["put", "github", "a"], b"ghp_AUTH", "4711-right")), 0);
    let o = with_pin(&["get", "github", "a"], b"", "4711-right");
    assert_eq!((code(&o), o.stdout.as_slice()), (0, &b"ghp_AUTH"[..]), "{}", stderr(&o));
    let o = with_pin(&["doctor"], b"", "4711-right");
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("tpm authorisation") && out.contains("pin_source"), "{out}");

    // The wraps say they need the authorisation value.
    let wraps = wrapped_integrity_key(&env);
    assert_eq!(wraps.len(), 1);
    assert_eq!(wraps[0].wrapped.mechanism, WrapMechanism::TpmSealedAuth);

    // A wrong PIN: exit 5, a clear message, nothing changed.
    let before = dump(&env);
    let o = with_pin(&["get", "github", "a"], b"", "0000-wrong");
    assert_eq!(code(&o), 5, "{}", stderr(&o));
    assert!(stderr(&o).contains("authorisation value") && !stderr(&o).contains("0000-wrong"), "{}", stderr(&o));
    assert!(o.stdout.is_empty());
    assert_eq!(dump(&env), before);
    // No PIN configured at all: a configuration error that says what to set.
    let no_pin = TpmRoot::open(tpm_settings(&tpm, None, None), false).unwrap();
    match no_pin.unwrap(&wraps[0].wrapped) {
        Err(e @ Error::Config(_)) => assert!(e.to_string().contains("pin_source"), "{e}"),
        other => panic!("{other:?}"),
    }
    // The attacker relabels the blob as sealed without an authorisation value: the
    // TPM still wants it.
    let relabelled = tokenguard::root::Wrapped { mechanism: WrapMechanism::TpmSealed, ..wraps[0].wrapped.clone() };
    match no_pin.unwrap(&relabelled) {
        Err(e @ Error::Auth { .. }) => assert_eq!(e.exit_code(), 5),
        other => panic!("an unseal without the authorisation value must fail, got {other:?}"),
    }
    // The right PIN through the library opens it.
    let right = TpmRoot::open(tpm_settings(&tpm, Some("4711-right"), None), false).unwrap();
    assert!(right.unwrap(&wraps[0].wrapped).is_ok());
}

/// Findings 7 and 8 together: under a PCR policy, the policy also requires the
/// authorisation value (PolicyPCR + PolicyAuthValue), and the unseal runs in a salted
/// session that encrypts the response.
#[test]
fn a_pcr_policy_with_a_pin_needs_both() {
    use tokenguard::root::RootKey;
    use tokenguard::root::tpm::TpmRoot;
    let tpm = Swtpm::start();
    let sealer = TpmRoot::open(tpm_settings(&tpm, Some("pcr-pin"), Some(vec![16])), true).unwrap();
    let (dek, wrapped) = sealer.generate_dek().unwrap();
    assert_eq!(sealer.unwrap(&wrapped).unwrap().expose(), dek.expose());
    // Without parameter encryption the same policy still opens it (the salting is
    // the session's, not the object's).
    let plain = TpmRoot::open(
        tokenguard::root::tpm::TpmSettings {
            parameter_encryption: false,
            ..tpm_settings(&tpm, Some("pcr-pin"), Some(vec![16]))
        },
        false,
    )
    .unwrap();
    assert_eq!(plain.unwrap(&wrapped).unwrap().expose(), dek.expose());
    // The wrong PIN, with the PCRs right, is refused.
    let wrong = TpmRoot::open(tpm_settings(&tpm, Some("not-it"), Some(vec![16])), false).unwrap();
    match wrong.unwrap(&wrapped) {
        Err(e @ Error::Auth { .. }) => assert_eq!(e.exit_code(), 5),
        other => panic!("{other:?}"),
    }
    let checks = sealer.health();
    let auth = checks.iter().find(|c| c.name == "tpm authorisation").unwrap();
    assert_eq!(auth.status, tokenguard::root::Status::Ok, "{auth:?}");
    assert!(auth.detail.contains("PolicyAuthValue"), "{}", auth.detail);
    // The right PIN with the PCRs moved is refused too.
    extend_pcr(&tpm, 16);
    match sealer.unwrap(&wrapped) {
        Err(e @ Error::Hardware { .. }) => assert!(e.to_string().contains("PCR values differ"), "{e}"),
        other => panic!("{other:?}"),
    }
}

/// A store sealed before `pin_source` was set keeps working once it is, and `doctor`
/// counts the keys still sealed without the authorisation value until they are
/// re-sealed.
#[test]
fn doctor_counts_keys_sealed_before_the_pin() {
    let tpm = Swtpm::start();
    let env = env_with_roots("tpm-auth-later", &tpm_root_toml(&tpm, ""), true);
    assert_eq!(code(&env.run(&["init"], b"")), 0);
    assert_eq!(code(&env.run(&["put", "github", "a"], b"ghp_BEFORE")), 0);
    let text = std::fs::read_to_string(&env.config_path).unwrap();
    std::fs::write(&env.config_path, format!("{text}pin_source = \"env:TG_TPM_PIN\"\n")).unwrap();
    let run = |args: &[&str]| {
        let mut cmd = env.cli();
        cmd.args(args).env("TG_TPM_PIN", "later-pin");
        common::run_cmd(&mut cmd, b"")
    };
    let o = run(&["get", "github", "a"]);
    assert_eq!((code(&o), o.stdout.as_slice()), (0, &b"ghp_BEFORE"[..]), "{}", stderr(&o));
    let line = |o: &std::process::Output| {
        String::from_utf8_lossy(&o.stdout).lines().find(|l| l.contains("tpm sealed keys")).unwrap_or("").to_string()
    };
    let o = run(&["doctor"]);
    assert!(line(&o).contains("2 of 2"), "{}", String::from_utf8_lossy(&o.stdout));
    assert_eq!(code(&run(&["rotate-dek", "github"])), 0);
    let o = run(&["reencrypt"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    // v2 is sealed with the authorisation value; v1 (decrypt-only until retired) and
    // the integrity key are not.
    let o = run(&["doctor"]);
    assert!(line(&o).contains("2 of 3"), "{}", String::from_utf8_lossy(&o.stdout));
    let o = run(&["get", "github", "a"]);
    assert_eq!((code(&o), o.stdout.as_slice()), (0, &b"ghp_BEFORE"[..]), "{}", stderr(&o));
}

/// Whole-store rollback on swtpm: the store is bound to a TPM NV counter (under the
/// PIN's authorisation value), so a copy of the store taken earlier and put back is
/// reported by every open and by `doctor`, until the operator accepts it.
#[test]
fn a_store_copy_put_back_is_caught_by_the_nv_counter() {
    let tpm = Swtpm::start();
    let env = env_with_roots(
        "tpm-nv",
        &tpm_root_toml(&tpm, "pin_source = \"env:TG_TPM_PIN\"\nnv_counter = \"0x01810a10\""),
        true,
    );
    let run = |args: &[&str], stdin: &[u8]| {
        let mut cmd = env.cli();
        cmd.args(args).env("TG_TPM_PIN", "nv-pin");
        common::run_cmd(&mut cmd, stdin)
    };
    let ok = |args: &[&str], stdin: &[u8]| {
        let o = run(args, stdin);
        assert_eq!(code(&o), 0, "{args:?}: {}", stderr(&o));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    ok(&["init"], b"");
    ok(&["put", "github", "a"], b"ghp_OLD");
    let copy = std::fs::read(&env.store_path).unwrap();
    ok(&["put", "github", "a"], b"ghp_NEW");
    let out = ok(&["doctor"], b"");
    assert!(
        out.lines().any(|l| l.starts_with("ok") && l.contains("rollback counter") && l.contains("nv=0x01810a10")),
        "{out}"
    );

    std::fs::write(&env.store_path, &copy).unwrap();
    let o = run(&["get", "github", "a"], b"");
    assert_eq!(code(&o), 4, "{}", stderr(&o));
    assert!(o.stdout.is_empty());
    assert!(stderr(&o).contains("older than its counter"), "{}", stderr(&o));
    let o = run(&["doctor"], b"");
    assert_eq!(code(&o), 4);
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("FAIL rollback counter"),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    // The counter needs the PIN: a wrong one cannot read it, let alone move it.
    let mut cmd = env.cli();
    cmd.args(["get", "github", "a"]).env("TG_TPM_PIN", "wrong");
    assert_eq!(code(&common::run_cmd(&mut cmd, b"")), 5);
    ok(&["upgrade", "--accept-current-state"], b"");
    assert_eq!(ok(&["get", "github", "a"], b""), "ghp_OLD");
}

/// A TPM PIN is refused without parameter encryption: its authorisation value would
/// cross the bus in the clear at every unseal (review of finding 7).
#[test]
fn a_tpm_pin_needs_parameter_encryption() {
    let tpm = Swtpm::start();
    let env = env_with_roots(
        "tpm-auth-plain",
        &tpm_root_toml(&tpm, "pin_source = \"env:TG_TPM_PIN\"\nparameter_encryption = false"),
        true,
    );
    let mut cmd = env.cli();
    cmd.args(["init"]).env("TG_TPM_PIN", "1234");
    let o = common::run_cmd(&mut cmd, b"");
    assert_eq!(code(&o), 8, "{}", stderr(&o));
    assert!(stderr(&o).contains("parameter_encryption"), "{}", stderr(&o));
    assert!(!env.store_path.exists());
}

/// The rollback counter comes from any configured root, pinned or not (review
/// finding 7): a store bound to the TPM's counter keeps opening after `root remove`
/// of the TPM root, as long as that root stays in the config.
#[test]
fn the_counter_of_a_removed_root_still_serves() {
    let tpm = Swtpm::start();
    let env = TestEnv::new("tpm-nv-removed");
    let mut text = std::fs::read_to_string(&env.config_path).unwrap();
    text.push_str(&tpm_root_toml(&tpm, "nv_counter = \"0x01810a11\""));
    std::fs::write(&env.config_path, text).unwrap();
    assert_eq!(code(&env.run(&["init"], b"")), 0);
    assert_eq!(code(&env.run(&["put", "github", "a"], b"ghp_R")), 0);
    let copy = std::fs::read(&env.store_path).unwrap();
    let g = env.open();
    let tpm_id = g.pinned_roots().unwrap().iter().find(|p| p.pin.starts_with("tpm:")).unwrap().root_id;
    g.remove_root(tpm_id).unwrap();
    drop(g);
    let o = env.run(&["get", "github", "a"], b"");
    assert_eq!((code(&o), o.stdout.as_slice()), (0, &b"ghp_R"[..]), "{}", stderr(&o));
    std::fs::write(&env.store_path, &copy).unwrap();
    let o = env.run(&["get", "github", "a"], b"");
    assert_eq!(code(&o), 4, "{}", stderr(&o));
}
