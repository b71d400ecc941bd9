//! A distinctive token must never appear outside `get`'s stdout: not in the store
//! file, the SoftHSM2 token directory, a backup, stderr at RUST_LOG=trace, any
//! `Debug` or error output. Files are created 0600 (directories 0700). The root key
//! cannot be read out of the token.
#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::PermissionsExt;

use common::{TestEnv, code, contains, files_below, stderr};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeInfo, AttributeType, KeyType, ObjectClass};

const CANARY: &str = "ghp_CANARY_9f8e7d6c5b4a39281706";
const CANARY_REFRESH: &str = "1//CANARY_REFRESH_0a1b2c3d4e5f";

#[test]
fn the_canary_never_leaks() {
    let env = TestEnv::new("leak");
    let o = env.run(&["init"], b"");
    assert_eq!(code(&o), 0);
    let mut logs = Vec::new();
    let trace = |args: &[&str], stdin: &[u8]| {
        let o = common::run_cmd(env.cli().env("RUST_LOG", "trace").args(args), stdin);
        assert_eq!(code(&o), 0, "{args:?}: {}", stderr(&o));
        o
    };
    logs.push(trace(&["put", "github", "canary"], CANARY.as_bytes()));
    let set = format!(r#"{{"access_token":"{CANARY}","refresh_token":"{CANARY_REFRESH}","expires_in":600}}"#);
    logs.push(trace(&["put", "google", "canary"], set.as_bytes()));
    let got = trace(&["get", "github", "canary"], b"");
    assert_eq!(got.stdout, CANARY.as_bytes(), "get prints the secret on stdout, exactly");
    let got = trace(&["get", "google", "canary", "--field", "refresh_token"], b"");
    assert_eq!(got.stdout, CANARY_REFRESH.as_bytes());
    logs.push(got);
    logs.push(trace(&["list", "--json"], b""));
    logs.push(trace(&["stats", "--json"], b""));
    logs.push(trace(&["doctor"], b""));
    logs.push(trace(&["audit", "list", "--json"], b""));
    let backup = env.dir.join("b.tgbackup");
    logs.push(trace(&["backup", backup.to_str().unwrap()], b""));

    let mut saw_trace = false;
    for o in &logs {
        saw_trace |= !o.stderr.is_empty();
        for c in [CANARY, CANARY_REFRESH] {
            assert!(!contains(&o.stderr, c.as_bytes()), "stderr leaks: {}", stderr(o));
        }
    }
    assert!(saw_trace, "RUST_LOG=trace produced no log at all: the check would be vacuous");
    for o in &logs[2..] {
        // Outputs other than `get` never carry the secret.
        if o.stdout != CANARY_REFRESH.as_bytes() {
            assert!(!contains(&o.stdout, CANARY.as_bytes()), "stdout leaks: {}", String::from_utf8_lossy(&o.stdout));
        }
    }

    // Files at rest: the store, its directory, the backup, the whole token directory.
    let mut scanned = 0;
    for f in files_below(&env.dir).into_iter().chain(files_below(&common::softhsm().dir)) {
        let bytes = std::fs::read(&f).unwrap();
        for c in [CANARY, CANARY_REFRESH] {
            assert!(!contains(&bytes, c.as_bytes()), "{} contains the plaintext", f.display());
        }
        scanned += 1;
    }
    assert!(scanned >= 4, "scanned only {scanned} files");

    // Modes: store 0600 in a 0700 directory; backup 0600.
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&env.store_path), 0o600);
    assert_eq!(mode(env.store_path.parent().unwrap()), 0o700);
    assert_eq!(mode(&backup), 0o600);
}

#[test]
fn debug_and_errors_never_show_secrets_or_pins() {
    let env = TestEnv::new("debug");
    let g = env.init();
    g.put("github", "canary", tokenguard::Secret::raw(CANARY.as_bytes().to_vec()), Default::default()).unwrap();
    let secret = g.get("github", "canary").unwrap();
    let config = env.config();
    let settings = match &config.roots[0] {
        tokenguard::config::RootConfig::Pkcs11(p) => {
            tokenguard::root::pkcs11::Pkcs11Settings::from_config(p, &config.base_dir).unwrap()
        }
        _ => unreachable!(),
    };
    let pin = std::fs::read_to_string(&common::softhsm().pin_file).unwrap();
    let dbg = format!("{secret:?} {g:?} {config:?} {settings:?} {:?}", g.stats().unwrap());
    assert!(!dbg.contains(CANARY), "{dbg}");
    assert!(!dbg.contains(pin.trim()), "{dbg}");
    assert!(dbg.contains("REDACTED"), "{dbg}");

    // Every error the guard can produce here, with a secret and the PIN around.
    let errors = [
        g.get("github", "nobody").unwrap_err(),
        g.put("git hub", CANARY, tokenguard::Secret::raw(CANARY.as_bytes().to_vec()), Default::default()).unwrap_err(),
        tokenguard::config::resolve_pin("env:TG_NO_SUCH_VAR", std::path::Path::new("/")).unwrap_err(),
    ];
    for e in &errors {
        let text = format!("{e} {e:?} {:?}", e.hint());
        assert!(!text.contains(CANARY) && !text.contains(pin.trim()), "{text}");
    }
}

#[test]
fn the_root_key_cannot_be_read_out_of_the_token() {
    let env = TestEnv::new("rootkey");
    drop(env.init());
    let session = common::user_session();
    let keys = session
        .find_objects(&[Attribute::Class(ObjectClass::SECRET_KEY), Attribute::Label(env.key_label.as_bytes().to_vec())])
        .unwrap();
    assert_eq!(keys.len(), 1);
    let k = keys[0];
    // CKA_VALUE access is refused (get_attributes would hide this; ask for the info).
    let info = session.get_attribute_info(k, &[AttributeType::Value]).unwrap();
    assert!(matches!(info[0], AttributeInfo::Sensitive), "{info:?}");
    let attrs = session
        .get_attributes(
            k,
            &[
                AttributeType::KeyType,
                AttributeType::Token,
                AttributeType::Sensitive,
                AttributeType::Extractable,
                AttributeType::NeverExtractable,
                AttributeType::Local,
                AttributeType::Wrap,
                AttributeType::Unwrap,
                AttributeType::Encrypt,
                AttributeType::Decrypt,
                AttributeType::Sign,
                AttributeType::Derive,
                AttributeType::ValueLen,
            ],
        )
        .unwrap();
    let want = [
        Attribute::KeyType(KeyType::AES),
        Attribute::Token(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::NeverExtractable(true),
        Attribute::Local(true),
        Attribute::Wrap(true),
        Attribute::Unwrap(true),
        Attribute::Encrypt(false),
        Attribute::Decrypt(false),
        Attribute::Sign(false),
        Attribute::Derive(false),
        Attribute::ValueLen(32.into()),
    ];
    for w in want {
        assert!(attrs.contains(&w), "missing {w:?} in {attrs:?}");
    }
    // Wrapping the KEK with itself (an export attempt) is refused.
    assert!(session.wrap_key(&Mechanism::AesKeyWrap, k, k).is_err());
}

#[test]
fn an_extractable_key_is_never_adopted_as_root() {
    let env = TestEnv::new("adopt");
    let session = common::user_session();
    common::with_token_lock(|| {
        session.generate_key(
            &Mechanism::AesKeyGen,
            &[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::AES),
                Attribute::ValueLen(32.into()),
                Attribute::Token(true),
                Attribute::Sensitive(false),
                Attribute::Extractable(true),
                Attribute::Wrap(true),
                Attribute::Unwrap(true),
                Attribute::Label(env.key_label.as_bytes().to_vec()),
            ],
        )
    })
    .unwrap();
    let o = env.run(&["init"], b"");
    assert_eq!(code(&o), 8, "{}", stderr(&o));
    assert!(stderr(&o).contains("must be CKA_SENSITIVE=true and CKA_EXTRACTABLE=false"), "{}", stderr(&o));
    assert!(!env.store_path.exists());
}

/// An `env:` PIN is taken out of the environment before anything runs (security
/// issue, finding 18): a child of `tokenguard exec` does not inherit it, and the PIN
/// still opens the token.
#[test]
fn an_env_pin_does_not_reach_child_processes() {
    let env = TestEnv::new("env-pin");
    let pin_file = common::softhsm().pin_file.display().to_string();
    let text = std::fs::read_to_string(&env.config_path).unwrap();
    std::fs::write(
        &env.config_path,
        text.replace(&format!("pin_source = \"file:{pin_file}\""), "pin_source = \"env:TG_TEST_HSM_PIN\""),
    )
    .unwrap();
    let pin = std::fs::read_to_string(common::softhsm().pin_file.as_path()).unwrap();
    let run = |args: &[&str], stdin: &[u8]| {
        let mut cmd = env.cli();
        cmd.args(args).env("TG_TEST_HSM_PIN", pin.trim_end());
        common::run_cmd(&mut cmd, stdin)
    };
    assert_eq!(common::code(&run(&["init"], b"")), 0);
    assert_eq!(common::code(&run(&["put", "github", "a"], b"ghp_ENVPIN")), 0);
    let o = run(
        &["exec", "--env", "GH=github/a", "--", "sh", "-c", "env; echo ==; tr '\\0' '\\n' < /proc/$PPID/environ"],
        b"",
    );
    assert_eq!(common::code(&o), 0, "{}", common::stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    let (child_env, parent_env) = out.split_once("==").unwrap();
    assert!(child_env.contains("GH=ghp_ENVPIN"), "the child gets the secret it asked for");
    assert!(!child_env.contains("TG_TEST_HSM_PIN"), "the child inherited the PIN variable: {child_env}");
    assert!(!child_env.contains(pin.trim_end()), "the child sees the PIN");
    // The parent's original environment block no longer holds the value either.
    assert!(parent_env.contains("TOKENGUARD_CONFIG"), "the parent's environment was read: {parent_env}");
    assert!(!parent_env.contains(pin.trim_end()), "the PIN is still in the parent's environment block");
}

/// An imported key (`CKA_LOCAL` false: its value existed outside the token) is not
/// pinned into a new store unless the config asks for it (finding 18).
#[test]
fn an_imported_key_is_adopted_only_when_asked() {
    let env = TestEnv::new("imported");
    let session = common::user_session();
    common::with_token_lock(|| {
        session.create_object(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::Value(vec![0x5a; 32]),
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Wrap(true),
            Attribute::Unwrap(true),
            Attribute::Encrypt(true),
            Attribute::Decrypt(true),
            Attribute::Label(env.key_label.as_bytes().to_vec()),
        ])
    })
    .unwrap();
    let o = env.run(&["init"], b"");
    assert_eq!(code(&o), 8, "{}", stderr(&o));
    assert!(stderr(&o).contains("CKA_LOCAL is false"), "{}", stderr(&o));
    assert!(!env.store_path.exists());
    let text = std::fs::read_to_string(&env.config_path).unwrap();
    let key_line = format!("key_label = \"{}\"\n", env.key_label);
    std::fs::write(&env.config_path, text.replace(&key_line, &format!("{key_line}allow_imported_key = true\n")))
        .unwrap();
    let o = env.run(&["init"], b"");
    assert_eq!(code(&o), 0, "{}", stderr(&o));
}
