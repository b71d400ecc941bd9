//! Escrow roots and k-of-n custodians, as a security team runs them: the `age` root
//! wraps every new key with its identity offline, custodians' shares rebuild that
//! identity when the HSM is gone, and the wraps are age's own format (the Debian `age`
//! CLI, Go's reference implementation, opens them). Everything through the CLI on a
//! real SoftHSM2 token; the `age` CLI is required, never skipped.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{TestEnv, code, run_cmd, stderr};
use redb::{ReadableDatabase, TableDefinition};
use tokenguard::store::DekEntry;

fn tool(name: &str) -> Command {
    let found = std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()));
    assert!(found, "{name} is missing: .ci/test.sh installs it (apt-get install age); tests never skip it");
    Command::new(name)
}

/// A custodian's own age key, made by `age-keygen`: (identity file, recipient).
fn age_keygen(dir: &Path, name: &str) -> (PathBuf, String) {
    let key = dir.join(format!("{name}.key"));
    let o = tool("age-keygen").arg("-o").arg(&key).output().unwrap();
    assert!(o.status.success(), "age-keygen: {}", String::from_utf8_lossy(&o.stderr));
    let o = tool("age-keygen").arg("-y").arg(&key).output().unwrap();
    (key, String::from_utf8(o.stdout).unwrap().trim().to_string())
}

/// `age -d -i KEY FILE`, as a custodian decrypts their share.
fn age_decrypt(key: &Path, file: &Path) -> std::process::Output {
    tool("age").arg("-d").arg("-i").arg(key).arg(file).output().unwrap()
}

/// An age root entry: the recipient, and the identity file or the authentication key
/// file (a production config names the key only).
fn age_root(recipient: &str, identity: Option<&Path>, auth: Option<&Path>) -> String {
    let id = identity.map(|p| format!("identity_file = {:?}\n", p.display().to_string())).unwrap_or_default();
    let auth = auth.map(|p| format!("auth_key_source = \"file:{}\"\n", p.display())).unwrap_or_default();
    format!("[[roots]]\nbackend = \"age\"\nrecipient = {recipient:?}\n{id}{auth}")
}

/// `tokenguard recovery auth-key`: the authentication key file of an identity.
fn auth_key(env: &TestEnv, key: &Path) -> PathBuf {
    let out = key.with_extension("auth");
    ok(
        &env.run(&["recovery", "auth-key", "--identity", key.to_str().unwrap(), "--out", out.to_str().unwrap()], b""),
        "auth-key",
    );
    out
}

/// The env's PKCS#11 root entry, with another key label: a "new HSM".
fn hsm_root(env: &TestEnv, label: &str) -> String {
    let text = std::fs::read_to_string(&env.config_path).unwrap();
    let at = text.find("[[roots]]").unwrap();
    let end = text[at + 1..].find("[[roots]]").map_or(text.len(), |e| at + 1 + e);
    text[at..end].replace(&format!("key_label = \"{}\"", env.key_label), &format!("key_label = \"{label}\""))
}

/// A config for the env's store with `roots` only (no hardware required).
fn config_with(env: &TestEnv, name: &str, require_hardware: bool, roots: &str) -> PathBuf {
    let path = env.dir.join(name);
    let text = format!(
        "require_hardware = {require_hardware}\n[store]\npath = {:?}\nbusy_timeout_ms = 2000\n{roots}",
        env.store_path.display().to_string()
    );
    std::fs::write(&path, text).unwrap();
    path
}

fn tg(config: &Path, args: &[&str], stdin: &[u8]) -> std::process::Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tokenguard"));
    c.env("TOKENGUARD_CONFIG", config).env_remove("RUST_LOG").args(args);
    run_cmd(&mut c, stdin)
}

fn ok(o: &std::process::Output, what: &str) -> String {
    assert_eq!(code(o), 0, "{what}: {}", stderr(o));
    String::from_utf8(o.stdout.clone()).unwrap()
}

/// Deletes the env's root key from the token: the HSM is gone.
fn destroy_hsm_key(env: &TestEnv) {
    let session = common::user_session();
    common::with_token_lock(|| {
        for k in common::find_key(&session, &env.key_label) {
            session.destroy_object(k).unwrap();
        }
    });
}

#[test]
fn a_wrap_only_age_root_lets_new_providers_be_put_and_its_identity_alone_opens_the_store() {
    let env = TestEnv::new("age-wrap-only");
    ok(&env.run(&["init"], b""), "init");
    ok(&env.run(&["put", "github", "ci"], b"ghp_BEFORE_ESCROW"), "put");
    let (key, recipient) = age_keygen(&env.dir, "escrow");
    let auth = auth_key(&env, &key);

    // The escrow root is added with its public recipient and authentication key only.
    let root_file = env.dir.join("age-root.toml");
    std::fs::write(&root_file, age_root(&recipient, None, Some(&auth))).unwrap();
    ok(&env.run(&["root", "add", "--root-config", root_file.to_str().unwrap()], b""), "root add");
    // The production config names the recipient (require_hardware = true stays).
    let mut text = std::fs::read_to_string(&env.config_path).unwrap();
    text.push_str(&age_root(&recipient, None, Some(&auth)));
    std::fs::write(&env.config_path, text).unwrap();

    // The scenario of the issue: a new provider's data key needs every pinned root,
    // and the offline one wraps without its identity.
    ok(&env.run(&["put", "newprov", "key"], b"np_AFTER_ESCROW"), "put for a new provider");
    let doctor = env.run(&["doctor"], b"");
    let out = ok(&doctor, "doctor");
    assert!(out.contains("wrap-only") && out.contains("expected"), "{out}");

    // Its identity in a production config (require_hardware) is refused, with why.
    let prod_with_identity = config_with(
        &env,
        "prod-with-identity.toml",
        true,
        &format!("{}{}", hsm_root(&env, &env.key_label), age_root(&recipient, Some(&key), None)),
    );
    let o = tg(&prod_with_identity, &["list"], b"");
    assert_eq!(code(&o), 8, "{}", stderr(&o));
    assert!(stderr(&o).contains("drop identity_file"), "{}", stderr(&o));

    // The authentication key of another escrow root (files mixed up): refused at
    // once (exit 8), not found out in a recovery.
    let (other_key, _) = age_keygen(&env.dir, "other");
    let other_auth = auth_key(&env, &other_key);
    let mixed = config_with(
        &env,
        "mixed.toml",
        true,
        &format!("{}{}", hsm_root(&env, &env.key_label), age_root(&recipient, None, Some(&other_auth))),
    );
    let o = tg(&mixed, &["put", "another", "x"], b"v");
    assert_eq!(code(&o), 8, "{}", stderr(&o));
    assert!(stderr(&o).contains("mixed up"), "{}", stderr(&o));
    // A config of only the recipients cannot open anything, and says so.
    let only_recipients = config_with(&env, "only-recipients.toml", false, &age_root(&recipient, None, Some(&auth)));
    let o = tg(&only_recipients, &["get", "github", "ci"], b"");
    assert_eq!(code(&o), 8, "{}", stderr(&o));
    assert!(stderr(&o).contains("wrap-only"), "{}", stderr(&o));

    // The HSM key is deleted: the production config fails, the identity alone reads
    // both the old and the new provider.
    destroy_hsm_key(&env);
    let o = env.run(&["get", "github", "ci"], b"");
    assert_ne!(code(&o), 0, "the HSM key is gone");
    // The production entry copied into the recovery config, with the identity added:
    // the service's key file is not on this host, and is not needed.
    let recovery = config_with(
        &env,
        "recovery.toml",
        false,
        &age_root(&recipient, Some(&key), Some(Path::new("/nonexistent/escrow-auth.key"))),
    );
    assert_eq!(ok(&tg(&recovery, &["get", "github", "ci"], b""), "get with the identity"), "ghp_BEFORE_ESCROW");
    assert_eq!(ok(&tg(&recovery, &["get", "newprov", "key"], b""), "get with the identity"), "np_AFTER_ESCROW");
    let out = ok(&tg(&recovery, &["doctor"], b""), "doctor with the identity");
    assert!(out.contains("software key"), "{out}");
}

#[test]
fn a_passphrase_protected_identity_opens_with_its_passphrase_only() {
    let env = TestEnv::new("age-passphrase");
    let identity = tokenguard::root::age::AgeIdentity::generate();
    let recipient = identity.recipient();
    let plain = env.dir.join("plain.key");
    identity.write_new(&plain).unwrap();
    // Encrypted with a passphrase by the age CLI's own format (scrypt recipient),
    // through the library's age dependency: `age -p` needs a terminal.
    let encrypted = env.dir.join("escrow.key.age");
    let text = std::fs::read(&plain).unwrap();
    let e = age::Encryptor::with_user_passphrase(age::secrecy::SecretString::from("correct horse".to_string()));
    let mut out = Vec::new();
    let mut w = e.wrap_output(&mut out).unwrap();
    std::io::Write::write_all(&mut w, &text).unwrap();
    w.finish().unwrap();
    common::write_0600(&encrypted, &out);
    std::fs::remove_file(&plain).unwrap();

    let roots = format!(
        "{}{}passphrase_source = \"env:TG_AGE_PASS\"\n",
        hsm_root(&env, &env.key_label),
        age_root(&recipient, Some(&encrypted), None)
    );
    let cfg = config_with(&env, "with-passphrase.toml", false, &roots);
    let mut c = Command::new(env!("CARGO_BIN_EXE_tokenguard"));
    c.env("TOKENGUARD_CONFIG", &cfg).env("TG_AGE_PASS", "correct horse").args(["init"]);
    ok(&run_cmd(&mut c, b""), "init with both roots");
    let mut c = Command::new(env!("CARGO_BIN_EXE_tokenguard"));
    c.env("TOKENGUARD_CONFIG", &cfg).env("TG_AGE_PASS", "correct horse").args(["put", "slack", "bot"]);
    ok(&run_cmd(&mut c, b"xoxb-PASS"), "put");

    destroy_hsm_key(&env);
    let age_only = format!("{}passphrase_source = \"env:TG_AGE_PASS\"\n", age_root(&recipient, Some(&encrypted), None));
    let cfg = config_with(&env, "age-only.toml", false, &age_only);
    for (pass, want) in [("wrong horse", 8), ("correct horse", 0)] {
        let mut c = Command::new(env!("CARGO_BIN_EXE_tokenguard"));
        c.env("TOKENGUARD_CONFIG", &cfg)
            .env("TG_AGE_PASS", pass)
            .env("RUST_LOG", "trace")
            .args(["get", "slack", "bot"]);
        let o = run_cmd(&mut c, b"");
        assert_eq!(code(&o), want, "{pass}: {}", stderr(&o));
        let all = format!("{}{}", String::from_utf8_lossy(&o.stdout), stderr(&o));
        assert!(
            !all.contains(pass) && !all.contains("AGE-SECRET-KEY"),
            "a passphrase or identity in the output: {all}"
        );
        if want == 0 {
            assert_eq!(String::from_utf8_lossy(&o.stdout), "xoxb-PASS");
        }
    }
}

/// The README's runbook "the HSM is gone": three custodians of five bring their
/// shares, the store opens, a new HSM root is added, the old one removed, and the
/// identity is split again.
#[test]
fn three_of_five_custodians_recover_the_store_after_the_hsm_is_gone() {
    let env = TestEnv::new("age-custodians");
    ok(&env.run(&["init"], b""), "init");
    let names = ["ana", "ben", "cho", "dev", "eli"];
    let keys: Vec<(PathBuf, String)> = names.iter().map(|n| age_keygen(&env.dir, n)).collect();
    let shares_dir = env.dir.join("shares");
    std::fs::create_dir(&shares_dir).unwrap();
    let split = |dir: &Path| {
        let mut args = vec!["--json".to_string(), "recovery".into(), "split".into(), "-k".into(), "3".into()];
        for (n, (_, r)) in names.iter().zip(&keys) {
            args.push("--custodian".into());
            args.push(format!("{n}={r}"));
        }
        args.push("--out-dir".into());
        args.push(dir.display().to_string());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = ok(&env.run(&args, b""), "recovery split");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        let auth = PathBuf::from(v["auth_key_file"].as_str().unwrap());
        (v["recipient"].as_str().unwrap().to_string(), v["split"].as_str().unwrap().to_string(), auth)
    };
    let (recipient, split_id, auth) = split(&shares_dir);
    let auth_mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&auth).unwrap().permissions());
    assert_eq!(auth_mode & 0o777, 0o600, "the authentication key file");
    for n in names {
        let f = shares_dir.join(format!("{n}.share.age"));
        let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&f).unwrap().permissions());
        assert_eq!(mode & 0o777, 0o600, "{n}'s share file");
    }
    // The same split again into the same directory: refused, nothing overwritten.
    let before = std::fs::read(shares_dir.join("ana.share.age")).unwrap();
    let mut args = vec!["recovery", "split", "-k", "2", "--out-dir", shares_dir.to_str().unwrap()];
    let ana = format!("ana={}", keys[0].1);
    let ben = format!("ben={}", keys[1].1);
    args.extend(["--custodian", &ana, "--custodian", &ben]);
    assert_eq!(code(&env.run(&args, b"")), 2);
    assert_eq!(std::fs::read(shares_dir.join("ana.share.age")).unwrap(), before);

    // The escrow root, wrap-only, in the production config; tokens are written.
    let root_file = env.dir.join("escrow.toml");
    std::fs::write(&root_file, age_root(&recipient, None, Some(&auth))).unwrap();
    ok(&env.run(&["root", "add", "--root-config", root_file.to_str().unwrap()], b""), "root add escrow");
    let mut text = std::fs::read_to_string(&env.config_path).unwrap();
    text.push_str(&age_root(&recipient, None, Some(&auth)));
    std::fs::write(&env.config_path, &text).unwrap();
    ok(&env.run(&["put", "github", "ci"], b"ghp_CUSTODIANS"), "put github");
    ok(&env.run(&["put", "jira", "sync"], b"jira_CUSTODIANS"), "put jira");

    // Each custodian decrypts their own share with the age CLI; nobody else's opens.
    let mut plain = Vec::new();
    for (n, (key, _)) in names.iter().zip(&keys) {
        let o = age_decrypt(key, &shares_dir.join(format!("{n}.share.age")));
        assert!(o.status.success(), "{n}: {}", String::from_utf8_lossy(&o.stderr));
        let p = env.dir.join(format!("{n}.share"));
        common::write_0600(&p, &o.stdout);
        plain.push(p);
    }
    assert!(!age_decrypt(&keys[0].0, &shares_dir.join("ben.share.age")).status.success());
    // A flipped byte in the encrypted file: the custodian's own decryption fails.
    let mut bad = std::fs::read(shares_dir.join("cho.share.age")).unwrap();
    let mid = bad.len() / 2;
    bad[mid] = if bad[mid] == b'A' { b'B' } else { b'A' };
    let bad_file = env.dir.join("cho.share.age.flipped");
    std::fs::write(&bad_file, &bad).unwrap();
    assert!(!age_decrypt(&keys[2].0, &bad_file).status.success(), "age accepted a flipped share file");

    // The HSM is gone.
    destroy_hsm_key(&env);
    assert_ne!(code(&env.run(&["get", "github", "ci"], b"")), 0);
    let p = |i: usize| plain[i].to_str().unwrap().to_string();
    // The drill the README asks for: three custodians' shares open every data key
    // (doctor unwraps each under every configured root, checking each tag).
    let drill_cfg = config_with(&env, "drill.toml", false, &age_root(&recipient, None, None));
    let drill = drill_cfg.to_str().unwrap();
    let o = env.run(&["--config", drill, "recovery", "combine", &p(0), &p(2), &p(4), "--", "doctor"], b"");
    ok(&o, "recovery drill");
    // The recovery config names the recipient only: the shares bring the identity.
    let recovery = config_with(&env, "recovery.toml", false, &age_root(&recipient, None, None));
    let rec = recovery.to_str().unwrap();

    // Two of five: refused (exit 2), nothing written.
    let out_file = env.dir.join("rebuilt.key");
    let o = env.run(&["recovery", "combine", &p(0), &p(1), "--out", out_file.to_str().unwrap()], b"");
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(stderr(&o).contains("needs 3"), "{}", stderr(&o));
    assert!(!out_file.exists());
    // A share of another split among three: refused (exit 2).
    let other_dir = env.dir.join("other");
    std::fs::create_dir(&other_dir).unwrap();
    let (_, other_id, _) = split(&other_dir);
    assert_ne!(other_id, split_id);
    let o = age_decrypt(&keys[4].0, &other_dir.join("eli.share.age"));
    let foreign = env.dir.join("eli-other.share");
    common::write_0600(&foreign, &o.stdout);
    let o = env.run(&["recovery", "combine", &p(0), &p(1), foreign.to_str().unwrap(), "--out", "x.key"], b"");
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(stderr(&o).contains("different splits"), "{}", stderr(&o));
    // A flipped byte in a decrypted share's value: refused (exit 4), nothing written.
    let text = std::fs::read_to_string(&plain[2]).unwrap();
    let at = text.find("value: ").unwrap() + 7;
    let mut bytes = text.into_bytes();
    bytes[at] = if bytes[at] == b'0' { b'1' } else { b'0' };
    let tampered = env.dir.join("cho-tampered.share");
    common::write_0600(&tampered, &bytes);
    let o = env.run(&["recovery", "combine", &p(0), &p(1), tampered.to_str().unwrap(), "--out", "x.key"], b"");
    assert_eq!(code(&o), 4, "{}", stderr(&o));
    assert!(!env.dir.join("x.key").exists() && !Path::new("x.key").exists());
    // The encrypted file given instead of the decrypted one: told what to do.
    let enc = shares_dir.join("ana.share.age");
    let o = env.run(&["recovery", "combine", enc.to_str().unwrap(), &p(1), &p(2), "--out", "x.key"], b"");
    assert_eq!(code(&o), 2);
    assert!(stderr(&o).contains("age -d"), "{}", stderr(&o));

    // Three of five (ana, cho, eli) open the store and add a new HSM root.
    let new_hsm = env.dir.join("new-hsm.toml");
    let new_label = format!("{}-new", env.key_label);
    std::fs::write(&new_hsm, hsm_root(&env, &new_label)).unwrap();
    // At trace level: no identity and no share value in any line of output.
    let o = run_cmd(
        env.cli().env("RUST_LOG", "trace").args([
            "--config",
            rec,
            "recovery",
            "combine",
            &p(0),
            &p(2),
            &p(4),
            "--",
            "root",
            "add",
            "--root-config",
            new_hsm.to_str().unwrap(),
        ]),
        b"",
    );
    ok(&o, "combine -- root add");
    let all = format!("{}{}", String::from_utf8_lossy(&o.stdout), stderr(&o));
    assert!(all.contains("TRACE") || all.contains("DEBUG"), "trace logging was not on");
    assert!(!all.contains("AGE-SECRET-KEY"), "the identity was printed: {all}");
    for p in &plain {
        let text = std::fs::read_to_string(p).unwrap();
        let value = text.lines().find_map(|l| l.strip_prefix("value: ")).unwrap();
        assert!(!all.contains(value), "a share value was printed");
    }
    // The new production config: the new HSM and the escrow recipient.
    let prod = config_with(
        &env,
        "new-prod.toml",
        true,
        &format!("{}{}", hsm_root(&env, &new_label), age_root(&recipient, None, Some(&auth))),
    );
    let roots = ok(&tg(&prod, &["--json", "root", "list"], b""), "root list");
    let roots: serde_json::Value = serde_json::from_str(&roots).unwrap();
    assert_eq!(roots.as_array().unwrap().len(), 3, "{roots}");
    let audit = ok(&tg(&prod, &["audit", "list"], b""), "audit list");
    assert!(
        audit.lines().any(|l| l.contains("root-add") && l.contains("via=recovery-shares")),
        "the recovery is not in the audit trail: {audit}"
    );
    assert_eq!(ok(&tg(&prod, &["get", "github", "ci"], b""), "get via the new HSM"), "ghp_CUSTODIANS");
    // The old HSM root is removed (its key is gone; the rest are configured).
    let old_id = roots.as_array().unwrap()[0]["root_id"].to_string();
    ok(&tg(&prod, &["root", "remove", &old_id], b""), "root remove old HSM");
    assert_eq!(ok(&tg(&prod, &["get", "jira", "sync"], b""), "get after remove"), "jira_CUSTODIANS");

    // Re-split: a new identity, added as a root; the old escrow root removed.
    let resplit_dir = env.dir.join("resplit");
    std::fs::create_dir(&resplit_dir).unwrap();
    let (new_recipient, _, new_auth) = split(&resplit_dir);
    let new_escrow = env.dir.join("new-escrow.toml");
    std::fs::write(&new_escrow, age_root(&new_recipient, None, Some(&new_auth))).unwrap();
    ok(&tg(&prod, &["root", "add", "--root-config", new_escrow.to_str().unwrap()], b""), "root add new escrow");
    let prod2 = config_with(
        &env,
        "new-prod-2.toml",
        true,
        &format!("{}{}", hsm_root(&env, &new_label), age_root(&new_recipient, None, Some(&new_auth))),
    );
    let roots: serde_json::Value =
        serde_json::from_str(&ok(&tg(&prod2, &["--json", "root", "list"], b""), "root list")).unwrap();
    let old_escrow = roots
        .as_array()
        .unwrap()
        .iter()
        .find(|r| {
            r["identity"].as_str().unwrap().starts_with("age:")
                && !r["description"].as_str().unwrap().contains(&new_recipient[..12])
        })
        .unwrap()["root_id"]
        .to_string();
    ok(&tg(&prod2, &["root", "remove", &old_escrow], b""), "root remove old escrow");
    // The old shares rebuild an identity that no longer opens anything new: the old
    // escrow root is gone from the store.
    let o = env.run(&["--config", rec, "recovery", "combine", &p(0), &p(1), &p(3), "--", "get", "github", "ci"], b"");
    assert_ne!(code(&o), 0, "the removed escrow root still opened the store");
    assert_eq!(ok(&tg(&prod2, &["get", "github", "ci"], b""), "get"), "ghp_CUSTODIANS");
}

/// A DEK wrapped by the age root is a plain age file: the Debian `age` CLI (Go's
/// reference implementation) decrypts it with the identity, and the key it yields
/// opens the record outside tokenguard's key path.
#[test]
fn the_age_cli_opens_a_dek_wrapped_by_the_age_root() {
    let env = TestEnv::new("age-interop");
    let (key, recipient) = age_keygen(&env.dir, "interop");
    let auth = auth_key(&env, &key);
    let roots = format!("{}{}", hsm_root(&env, &env.key_label), age_root(&recipient, None, Some(&auth)));
    let cfg = config_with(&env, "interop.toml", true, &roots);
    ok(&tg(&cfg, &["init"], b""), "init");
    ok(&tg(&cfg, &["put", "google", "sa"], b"ya29.INTEROP"), "put");
    let store_id = tokenguard::TokenGuard::open(
        &env.store_path,
        Default::default(),
        tokenguard::config::Config::load(&cfg).unwrap().build_roots(tokenguard::config::RootUse::Open).unwrap(),
        Default::default(),
    )
    .unwrap()
    .store_id();

    const DEKS: TableDefinition<(&str, u32), &[u8]> = TableDefinition::new("deks");
    const TOKENS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("tokens");
    let db = common::raw_db(&env.store_path);
    let r = db.begin_read().unwrap();
    let entry = DekEntry::decode(r.open_table(DEKS).unwrap().get(("google", 1)).unwrap().unwrap().value()).unwrap();
    let rec = r.open_table(TOKENS).unwrap().get(("google", "sa")).unwrap().unwrap().value().to_vec();
    let w = entry.wrapped.iter().find(|w| w.wrapped.mechanism == tokenguard::root::WrapMechanism::Age).unwrap();
    assert_eq!(tokenguard::root::WrapMechanism::Age.code(), 7);
    let blob = env.dir.join("dek.age");
    std::fs::write(&blob, &w.wrapped.blob).unwrap();
    assert!(w.wrapped.blob.starts_with(b"age-encryption.org/v1\n"));
    // One X25519 stanza: the root's recipient.
    assert_eq!(w.wrapped.blob.windows(9).filter(|s| s == b"-> X25519").count(), 1);
    let o = age_decrypt(&key, &blob);
    assert!(o.status.success(), "age -d: {}", String::from_utf8_lossy(&o.stderr));
    // The plaintext is the key and its tag, as FORMAT.md says, checked here with the
    // hash and MAC crates alone.
    assert_eq!(o.stdout.len(), 64);
    let dek: [u8; 32] = o.stdout[..32].try_into().unwrap();
    let identity = std::fs::read_to_string(&key).unwrap();
    let identity = identity.lines().find(|l| l.starts_with("AGE-SECRET-KEY-1")).unwrap();
    let auth_key = {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        h.update(b"tokenguard/age-escrow-auth-key/v1");
        h.update(identity.as_bytes());
        h.finalize()
    };
    let hex: String = auth_key.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(std::fs::read_to_string(&auth).unwrap(), format!("{recipient} {hex}\n"));
    let tag = {
        use hmac::Mac;
        let mut m = hmac::Hmac::<sha2::Sha256>::new_from_slice(&auth_key).unwrap();
        m.update(b"tokenguard/age-wrap/v1");
        m.update(recipient.as_bytes());
        m.update(&dek);
        m.finalize().into_bytes()
    };
    assert_eq!(&o.stdout[32..], &tag[..]);
    let (_, secret) = tokenguard::seal::open_record_with_key(&dek, &store_id, &rec).unwrap();
    assert_eq!(secret.field(None).unwrap().expose(), b"ya29.INTEROP");
}

/// The integrity-key list of FORMAT.md, encoded by hand (an attacker's tool).
fn encode_ik(list: &[tokenguard::store::RootWrapped]) -> Vec<u8> {
    let mut out = vec![1u8];
    out.extend(u32::try_from(list.len()).unwrap().to_be_bytes());
    for w in list {
        out.extend(w.root_id.to_be_bytes());
        out.extend(w.wrapped.mechanism.code().to_be_bytes());
        out.extend(u32::try_from(w.wrapped.blob.len()).unwrap().to_be_bytes());
        out.extend(&w.wrapped.blob);
    }
    out
}

fn edit_ik(env: &TestEnv, f: impl FnOnce(&mut Vec<tokenguard::store::RootWrapped>)) {
    const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
    let db = common::raw_db(&env.store_path);
    let mut list = {
        let r = db.begin_read().unwrap();
        let v = r.open_table(META).unwrap().get("integrity_key").unwrap().unwrap().value().to_vec();
        tokenguard::store::decode_wrapped_key(&v).unwrap()
    };
    f(&mut list);
    let w = db.begin_write().unwrap();
    w.open_table(META).unwrap().insert("integrity_key", encode_ik(&list).as_slice()).unwrap();
    w.commit().unwrap();
}

/// A wrap to an age recipient can be made by anyone who knows the recipient. With an
/// HSM and the escrow identity both configured, a file writer who removes or spoils
/// the HSM's wrap of the integrity key, and plants an age wrap of a key of their own,
/// gets a refusal — never a store opened with the key they chose.
#[test]
fn a_spoiled_hardware_wrap_never_hands_the_open_to_a_forged_age_wrap() {
    let env = TestEnv::new("age-forged");
    let (key, recipient) = age_keygen(&env.dir, "escrow");
    let both = config_with(
        &env,
        "both.toml",
        false,
        &format!("{}{}", hsm_root(&env, &env.key_label), age_root(&recipient, Some(&key), None)),
    );
    ok(&tg(&both, &["init"], b""), "init");
    ok(&tg(&both, &["put", "github", "ci"], b"ghp_GENUINE"), "put");
    let pristine = std::fs::read(&env.store_path).unwrap();
    let forge = |list: &mut Vec<tokenguard::store::RootWrapped>| {
        // The attacker's own integrity key, wrapped to the public recipient with a tag
        // of their choosing: all that anyone without the authentication key can make.
        let to: age::x25519::Recipient = recipient.parse().unwrap();
        let mut out = Vec::new();
        let e = age::Encryptor::with_recipients(std::iter::once(&to as &dyn age::Recipient)).unwrap();
        let mut w = e.wrap_output(&mut out).unwrap();
        std::io::Write::write_all(&mut w, &[0x42; 64]).unwrap();
        w.finish().unwrap();
        let age = list.iter_mut().find(|w| w.wrapped.mechanism == tokenguard::root::WrapMechanism::Age).unwrap();
        age.wrapped.blob = out;
    };
    // 1. The HSM's wrap removed.
    edit_ik(&env, |list| {
        forge(list);
        list.retain(|w| w.wrapped.mechanism == tokenguard::root::WrapMechanism::Age);
    });
    let o = tg(&both, &["get", "github", "ci"], b"");
    assert_eq!(code(&o), 4, "{}", stderr(&o));
    assert!(stderr(&o).contains("pinned, configured root"), "{}", stderr(&o));
    // 2. The HSM's wrap spoiled (one flipped byte).
    std::fs::write(&env.store_path, &pristine).unwrap();
    edit_ik(&env, |list| {
        forge(list);
        let hsm = list.iter_mut().find(|w| w.wrapped.mechanism != tokenguard::root::WrapMechanism::Age).unwrap();
        hsm.wrapped.blob[5] ^= 1;
    });
    let o = tg(&both, &["get", "github", "ci"], b"");
    assert_eq!(code(&o), 4, "{}", stderr(&o));
    assert!(stderr(&o).contains("age recipient"), "{}", stderr(&o));
    // 3. The recovery itself: the HSM gone, the escrow identity alone. A forged wrap
    //    (no valid tag) does not open; the genuine one does.
    std::fs::write(&env.store_path, &pristine).unwrap();
    let escrow_only = config_with(&env, "escrow-only.toml", false, &age_root(&recipient, Some(&key), None));
    edit_ik(&env, forge);
    let o = tg(&escrow_only, &["get", "github", "ci"], b"");
    assert_eq!(code(&o), 4, "a forged escrow wrap opened the store: {}", stderr(&o));
    // Refused at the wrap (its tag), not later by the state check: a writer who also
    // recomputed the state under their key would have been caught here too.
    assert!(stderr(&o).contains("does not open this store"), "{}", stderr(&o));
    std::fs::write(&env.store_path, &pristine).unwrap();
    assert_eq!(ok(&tg(&escrow_only, &["get", "github", "ci"], b""), "get by the escrow"), "ghp_GENUINE");
    // The untouched file opens, by the HSM.
    assert_eq!(ok(&tg(&both, &["get", "github", "ci"], b""), "get"), "ghp_GENUINE");
}

/// The guards around a recovery: an identity rebuilt for one command never counts as
/// a way into the store afterwards, production configs refuse identities even for a
/// restore, share files must be private, and the command after `--` runs once.
#[test]
fn recovery_refuses_what_would_outlive_it() {
    let env = TestEnv::new("age-guards");
    ok(&env.run(&["init"], b""), "init");
    ok(&env.run(&["put", "slack", "bot"], b"xoxb-GUARDS"), "put");
    let keys: Vec<(PathBuf, String)> = ["ana", "ben"].iter().map(|n| age_keygen(&env.dir, n)).collect();
    let shares_dir = env.dir.join("shares");
    std::fs::create_dir(&shares_dir).unwrap();
    let a = format!("ana={}", keys[0].1);
    let b = format!("ben={}", keys[1].1);
    let out = ok(
        &env.run(
            &["--json", "recovery", "split", "-k", "2", "--custodian", &a, "--custodian", &b, "--out-dir"]
                .into_iter()
                .chain([shares_dir.to_str().unwrap()])
                .collect::<Vec<_>>(),
            b"",
        ),
        "split",
    );
    let v = serde_json::from_str::<serde_json::Value>(&out).unwrap();
    let recipient = v["recipient"].as_str().unwrap().to_string();
    let auth = PathBuf::from(v["auth_key_file"].as_str().unwrap());
    let root_file = env.dir.join("escrow.toml");
    std::fs::write(&root_file, age_root(&recipient, None, Some(&auth))).unwrap();
    ok(&env.run(&["root", "add", "--root-config", root_file.to_str().unwrap()], b""), "root add");
    let mut plain = Vec::new();
    for (n, (k, _)) in ["ana", "ben"].iter().zip(&keys) {
        let o = age_decrypt(k, &shares_dir.join(format!("{n}.share.age")));
        let p = env.dir.join(format!("{n}.share"));
        common::write_0600(&p, &o.stdout);
        plain.push(p.to_str().unwrap().to_string());
    }
    let both = config_with(
        &env,
        "both.toml",
        false,
        &format!("{}{}", hsm_root(&env, &env.key_label), age_root(&recipient, None, Some(&auth))),
    );
    let both = both.to_str().unwrap();
    let combine = |tail: &[&str]| {
        let mut args = vec!["--config", both, "recovery", "combine", plain[0].as_str(), plain[1].as_str()];
        args.extend(tail);
        env.run(&args, b"")
    };
    // Removing the HSM with the rebuilt identity would leave only the escrow root,
    // which no configuration could open: refused (exit 2), store unchanged.
    let o = combine(&["--", "root", "remove", "1"]);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(stderr(&o).contains("wrap-only"), "{}", stderr(&o));
    assert_eq!(ok(&tg(Path::new(both), &["--json", "root", "list"], b""), "root list").matches("root_id").count(), 2);
    // Nothing long-lived after --, and not --out with it.
    for tail in [
        &["--", "serve"][..],
        &["--", "exec", "--env", "X=slack/bot", "--", "true"],
        &["--", "refresh", "--watch"],
        &["--", "recovery", "combine", "x"],
        &["--out", "id.key", "--", "list"],
    ] {
        let o = combine(tail);
        assert_eq!(code(&o), 2, "{tail:?}: {}", stderr(&o));
    }
    // A one-shot command works, with the outer config.
    assert_eq!(ok(&combine(&["--", "get", "slack", "bot"]), "combine -- get"), "xoxb-GUARDS");
    // Under require_hardware the rebuilt identity is refused (exit 8).
    let prod = config_with(
        &env,
        "prod.toml",
        true,
        &format!("{}{}", hsm_root(&env, &env.key_label), age_root(&recipient, None, Some(&auth))),
    );
    let o = env.run(
        &["--config", prod.to_str().unwrap(), "recovery", "combine", &plain[0], &plain[1], "--", "get", "slack", "bot"],
        b"",
    );
    assert_eq!(code(&o), 8, "{}", stderr(&o));
    // A restore under require_hardware with an identity configured: refused before
    // the backup is opened, and no store is made.
    let backup = env.dir.join("b.tgb");
    ok(&env.run(&["backup", backup.to_str().unwrap()], b""), "backup");
    let id_file = env.dir.join("rebuilt.key");
    ok(&env.run(&["recovery", "combine", &plain[0], &plain[1], "--out", id_file.to_str().unwrap()], b""), "--out");
    let target = env.dir.join("restored.redb");
    let restore_cfg = env.dir.join("restore.toml");
    std::fs::write(
        &restore_cfg,
        format!(
            "require_hardware = true\n[store]\npath = {:?}\n{}",
            target.display().to_string(),
            age_root(&recipient, Some(&id_file), None)
        ),
    )
    .unwrap();
    let o = tg(&restore_cfg, &["restore", backup.to_str().unwrap()], b"");
    assert_eq!(code(&o), 8, "{}", stderr(&o));
    assert!(!target.exists(), "a store was made before the refusal");
    // A share file others can read: refused (exit 2), as a PIN file is.
    std::fs::set_permissions(&plain[0], std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let o = combine(&["--", "get", "slack", "bot"]);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(stderr(&o).contains("chmod 600"), "{}", stderr(&o));
    std::fs::set_permissions(&plain[0], std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    // An altered custodian name: exit 4, naming the share.
    let text = std::fs::read_to_string(&plain[1]).unwrap().replace("custodian: ben", "custodian: eve");
    std::fs::write(&plain[1], text).unwrap();
    let o = combine(&["--", "get", "slack", "bot"]);
    assert_eq!(code(&o), 4, "{}", stderr(&o));
    assert!(stderr(&o).contains("eve"), "{}", stderr(&o));
    // An identity pasted where a recipient belongs is never echoed.
    let secret = std::fs::read_to_string(&keys[0].0).unwrap();
    let secret = secret.lines().find(|l| l.starts_with("AGE-SECRET-KEY-1")).unwrap();
    let o = env.run(&["recovery", "split", "-k", "2", "--custodian", &format!("x={secret}"), "--custodian", &b], b"");
    assert_eq!(code(&o), 2);
    assert!(!stderr(&o).contains(secret) && stderr(&o).contains("public key"), "{}", stderr(&o));
}
