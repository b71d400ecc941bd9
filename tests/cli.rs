//! The `tokenguard` CLI as a user runs it: snapshot cases (args, stdin, exit code,
//! exact stderr), every documented failure with its exit code, and two processes
//! writing one store at once.
#![allow(clippy::unwrap_used)]

mod common;

use common::{TestEnv, code, run_cmd, stderr};

/// One CLI case: arguments, stdin, expected exit code, stdout and stderr. `[DIR]`
/// in expectations stands for the test's directory.
struct Case {
    args: &'static [&'static str],
    stdin: &'static [u8],
    code: i32,
    stdout: Option<&'static str>,
    stderr: &'static str,
}

fn check(env: &TestEnv, cases: &[Case]) {
    let dir = env.dir.display().to_string();
    for c in cases {
        let o = env.run(c.args, c.stdin);
        let err = stderr(&o).replace(&dir, "[DIR]");
        let out = String::from_utf8_lossy(&o.stdout).replace(&dir, "[DIR]");
        assert_eq!(code(&o), c.code, "tokenguard {:?}: exit code\nstderr: {err}\nstdout: {out}", c.args);
        assert_eq!(err, c.stderr, "tokenguard {:?}: stderr", c.args);
        if let Some(s) = c.stdout {
            assert_eq!(out, s, "tokenguard {:?}: stdout", c.args);
        }
    }
}

#[test]
fn snapshot_cases() {
    let env = TestEnv::new("snap");
    let o = env.run(&["init"], b"");
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    check(
        &env,
        &[
            Case { args: &["put", "github", "ci-bot", "--expires-in", "8h", "--label", "owner=alice"], stdin: b"ghp_SNAPSHOT\n", code: 0, stdout: Some(""), stderr: "" },
            Case { args: &["get", "github", "ci-bot"], stdin: b"", code: 0, stdout: Some("ghp_SNAPSHOT"), stderr: "" },
            Case {
                args: &["put", "google", "svc"],
                stdin: br#"{"access_token":"ya29.SNAP","refresh_token":"1//SNAP","expires_in":3600,"token_type":"Bearer","scope":"email"}"#,
                code: 0,
                stdout: Some(""),
                stderr: "",
            },
            Case { args: &["get", "google", "svc"], stdin: b"", code: 0, stdout: Some("ya29.SNAP"), stderr: "" },
            Case { args: &["get", "google", "svc", "--field", "refresh_token"], stdin: b"", code: 0, stdout: Some("1//SNAP"), stderr: "" },
            Case {
                args: &["get", "google", "svc", "--field", "client_secret"],
                stdin: b"",
                code: 3,
                stdout: Some(""),
                stderr: "error: token google/svc has no field \"client_secret\"\n",
            },
            Case {
                args: &["get", "github", "nobody"],
                stdin: b"",
                code: 3,
                stdout: Some(""),
                stderr: "error: no token github/nobody in the store\nhint: `tokenguard list` shows what is stored\n",
            },
            // A not-after in the past is refused on the command line …
            Case {
                args: &["put", "github", "old", "--expires-at", "1000"],
                stdin: b"ghp_OLD",
                code: 2,
                stdout: Some(""),
                stderr: "error: invalid input: --expires-at is not in the future\n",
            },
            // … but a provider's response is stored as it came (a GitHub App token).
            Case {
                args: &["put", "github", "old"],
                stdin: br#"{"token":"ghp_OLD","expires_at":"1970-01-01T00:16:40Z","permissions":{"contents":"read"}}"#,
                code: 0,
                stdout: Some(""),
                stderr: "",
            },
            Case {
                args: &["get", "github", "old"],
                stdin: b"",
                code: 7,
                stdout: Some(""),
                stderr: "error: token github/old expired at 1000 (unix seconds)\nhint: refresh or replace the token; `get --allow-expired` reads it anyway\n",
            },
            Case { args: &["get", "github", "old", "--allow-expired"], stdin: b"", code: 0, stdout: Some("ghp_OLD"), stderr: "" },
            Case {
                args: &["put", "github", "empty"],
                stdin: b"",
                code: 2,
                stdout: Some(""),
                stderr: "error: invalid input: the secret is empty (nothing on stdin?)\n",
            },
            Case {
                args: &["put", "git hub", "x"],
                stdin: b"s",
                code: 2,
                stdout: Some(""),
                stderr: "error: invalid input: provider: character ' ' at position 4 is not allowed; names are 1-128 \
                         characters of A-Z a-z 0-9 . _ @ + : - (safe unquoted in shells, file names, URLs and audit lines; \
                         `/` separates provider and name); case matters\n",
            },
            Case {
                args: &["put", "github", "x", "--expires-in", "soon"],
                stdin: b"s",
                code: 2,
                stdout: Some(""),
                stderr: "error: invalid input: --expires-in: expected number at 0 (examples: 8h, 30m, 7d)\n",
            },
            Case { args: &["delete", "github", "old"], stdin: b"", code: 0, stdout: Some(""), stderr: "" },
            Case {
                args: &["delete", "github", "old"],
                stdin: b"",
                code: 3,
                stdout: Some(""),
                stderr: "error: no token github/old in the store\nhint: `tokenguard list` shows what is stored\n",
            },
            Case { args: &["audit", "verify"], stdin: b"", code: 0, stdout: None, stderr: "" },
            // A second init of the store this config opens is a no-op, and says so.
            Case {
                args: &["init"],
                stdin: b"",
                code: 0,
                stdout: Some("store [DIR]/store/tokens.redb is already initialised; nothing to do\n"),
                stderr: "",
            },
        ],
    );
    // list --json carries metadata and never a secret.
    let o = env.run(&["list", "--json"], b"");
    assert_eq!(code(&o), 0);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let arr = v.as_array().unwrap();
    assert_eq!(arr.len(), 2);
    assert_eq!(arr[0]["provider"], "github");
    assert_eq!(arr[0]["labels"]["owner"], "alice");
    assert_eq!(arr[1]["token_type"], "Bearer");
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(!text.contains("SNAP"), "{text}");
    // doctor passes on a healthy store.
    let o = env.run(&["doctor"], b"");
    assert_eq!(code(&o), 0, "{}", String::from_utf8_lossy(&o.stdout));
    // Usage errors are exit 2 (clap), help is 0.
    assert_eq!(code(&env.run(&["get"], b"")), 2);
    assert_eq!(code(&env.run(&["frobnicate"], b"")), 2);
    assert_eq!(code(&env.run(&["--help"], b"")), 0);
    // A secret is never accepted on argv: there is no flag for it.
    assert_eq!(code(&env.run(&["put", "github", "x", "--secret", "ghp_ARGV"], b"")), 2);
}

#[test]
fn snapshot_cases_of_the_newer_commands() {
    let env = TestEnv::new("snap2");
    assert_eq!(code(&env.run(&["init"], b"")), 0);
    let out = env.dir.join("out.txt");
    std::fs::write(&out, b"already here").unwrap();
    let out_arg: &'static str = Box::leak(out.display().to_string().into_boxed_str());
    let get_out: &'static [&'static str] = Box::leak(Box::new(["get", "github/a", "--output", out_arg]));
    check(
        &env,
        &[
            Case { args: &["put", "github/a"], stdin: b"ghp_ONE", code: 0, stdout: Some(""), stderr: "" },
            Case {
                args: &["put", "github", "a", "--no-overwrite"],
                stdin: b"ghp_TWO",
                code: 2,
                stdout: Some(""),
                stderr: "error: token github/a exists (and --no-overwrite was given)\nhint: drop --no-overwrite to replace it, or `tokenguard revoke github/a` first\n",
            },
            Case {
                args: &["put", "github", "argv", "ghp_STRAY"],
                stdin: b"",
                code: 2,
                stdout: Some(""),
                stderr: "error: unexpected argument (not shown: it may be a secret)\nhint: secrets are read from stdin or --from-file, never from the command line; see `tokenguard help`\n",
            },
            Case {
                args: &["delete", "github/a", "--dry-run"],
                stdin: b"",
                code: 0,
                stdout: Some("would delete github/a\n"),
                stderr: "",
            },
            Case {
                args: get_out,
                stdin: b"",
                code: 2,
                stdout: Some(""),
                stderr: "error: invalid input: [DIR]/out.txt exists; --output never overwrites\n",
            },
            Case {
                args: &["exec", "--env", "GH=github", "--", "true"],
                stdin: b"",
                code: 2,
                stdout: Some(""),
                stderr: "error: invalid input: a token is PROVIDER/NAME or PROVIDER/NAME:FIELD (e.g. github/ci-bot)\n",
            },
            Case { args: &["exec", "--", "sh", "-c", "exit 3"], stdin: b"", code: 3, stdout: Some(""), stderr: "" },
            Case {
                args: &["git-credential", "store"],
                stdin: b"host=github.com\npassword=x\n\n",
                code: 0,
                stdout: Some(""),
                stderr: "",
            },
            Case {
                args: &["purge", "--expired", "--dry-run"],
                stdin: b"",
                code: 0,
                stdout: Some("would purge 0 expired tokens and 0 tombstones\n"),
                stderr: "",
            },
            Case { args: &["get", "github/a"], stdin: b"", code: 0, stdout: Some("ghp_ONE"), stderr: "" },
        ],
    );
}

fn rewrite_config(env: &TestEnv, from: &str, to: &str) {
    let text = std::fs::read_to_string(&env.config_path).unwrap();
    assert!(text.contains(from), "{from} not in config");
    std::fs::write(&env.config_path, text.replace(from, to)).unwrap();
}

fn assert_fails(env: &TestEnv, args: &[&str], want: i32, must_say: &str) {
    let o = env.run(args, b"x");
    let err = stderr(&o);
    assert_eq!(code(&o), want, "tokenguard {args:?}: {err}");
    assert!(err.contains(must_say), "tokenguard {args:?}: stderr lacks {must_say:?}: {err}");
    assert!(err.contains("hint: ") || want == 2, "no advice: {err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn wrong_pin_is_exit_5() {
    let env = TestEnv::new("wrongpin");
    env.init();
    let bad = env.dir.join("bad.pin");
    common::write_0600(&bad, b"not-the-pin-999");
    let good = common::softhsm().pin_file.display().to_string();
    rewrite_config(&env, &good, &bad.display().to_string());
    assert_fails(&env, &["get", "github", "x"], 5, "CKR_PIN_INCORRECT");
    let o = env.run(&["get", "github", "x"], b"");
    assert!(!stderr(&o).contains("not-the-pin-999"));
}

#[test]
fn pin_file_readable_by_others_is_refused() {
    let env = TestEnv::new("pinperm");
    let loose = env.dir.join("loose.pin");
    std::fs::write(&loose, b"test-user-pin-1234").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o644)).unwrap();
    rewrite_config(&env, &common::softhsm().pin_file.display().to_string(), &loose.display().to_string());
    assert_fails(&env, &["init"], 8, "readable by group or others");
}

#[test]
fn missing_module_is_exit_5() {
    let env = TestEnv::new("nomodule");
    rewrite_config(&env, &common::softhsm().module.display().to_string(), "/nonexistent/libpkcs11-missing.so");
    assert_fails(&env, &["init"], 5, "PKCS#11 module not found at /nonexistent/libpkcs11-missing.so");
}

#[test]
fn absent_token_is_exit_5() {
    let env = TestEnv::new("notoken");
    rewrite_config(&env, "token_label = \"tg-test\"", "token_label = \"no-such-token\"");
    assert_fails(&env, &["init"], 5, "no token with label \"no-such-token\"");
}

#[test]
fn wrong_root_key_is_exit_4_and_names_both() {
    let env = TestEnv::new("wrongroot");
    env.init();
    let other = TestEnv::new("otherroot");
    other.init(); // creates another key in the same token
    rewrite_config(
        &env,
        &format!("key_label = \"{}\"", env.key_label),
        &format!("key_label = \"{}\"", other.key_label),
    );
    assert_fails(&env, &["get", "github", "x"], 4, "wrong root key");
    let o = env.run(&["get", "github", "x"], b"");
    assert!(stderr(&o).contains(&env.key_label) && stderr(&o).contains(&other.key_label), "{}", stderr(&o));
}

#[test]
fn store_held_exclusively_is_exit_6_without_hanging() {
    let env = TestEnv::with_config("busy", "mode = \"exclusive\"");
    let holder = env.init(); // this process holds the file in ExclusiveWriter mode
    let text = std::fs::read_to_string(&env.config_path).unwrap();
    std::fs::write(
        &env.config_path,
        text.replace("mode = \"exclusive\"", "mode = \"shared\"")
            .replace("busy_timeout_ms = 2000", "busy_timeout_ms = 300"),
    )
    .unwrap();
    let start = std::time::Instant::now();
    assert_fails(&env, &["get", "github", "x"], 6, "is in use by another process");
    assert!(start.elapsed() < std::time::Duration::from_secs(10));
    drop(holder);
    // Once released, the same command works (the token is simply not there).
    assert_eq!(code(&env.run(&["get", "github", "x"], b"")), 3);
}

#[test]
fn unreadable_or_invalid_config_is_exit_8() {
    let env = TestEnv::new("badcfg");
    let missing = env.dir.join("missing.toml");
    let o = run_cmd(env.cli().env("TOKENGUARD_CONFIG", &missing).args(["list"]), b"");
    assert_eq!(code(&o), 8, "{}", stderr(&o));
    assert!(stderr(&o).contains("cannot read"), "{}", stderr(&o));

    std::fs::write(&env.config_path, "[store\npath = 1").unwrap();
    assert_fails(&env, &["list"], 8, "configuration:");
    std::fs::write(&env.config_path, "[store]\npath = \"x\"\n[[roots]]\nbackend = \"hsm9000\"\n").unwrap();
    assert_fails(&env, &["list"], 8, "configuration:");
    std::fs::write(
        &env.config_path,
        "[store]\npath = \"x\"\n[[roots]]\nbackend = \"tpm\"\ntcti = \"swtpm:host=127.0.0.1,port=1\"\n",
    )
    .unwrap();
    if cfg!(feature = "tpm") {
        assert_fails(&env, &["list"], 5, "connecting to the TPM");
    } else {
        assert_fails(&env, &["list"], 8, "backend \"tpm\" is not compiled into this build");
    }
    let o = run_cmd(env.cli().env_remove("TOKENGUARD_CONFIG").args(["list"]), b"");
    assert_eq!(code(&o), 8);
}

#[test]
fn soft_root_is_refused_when_hardware_is_required() {
    let env = TestEnv::new("softreq");
    std::fs::write(
        &env.config_path,
        format!(
            "require_hardware = true\n[store]\npath = \"{}\"\n[[roots]]\nbackend = \"soft\"\nkey_file = \"root.key\"\n",
            env.store_path.display()
        ),
    )
    .unwrap();
    assert_fails(&env, &["init"], 8, "require_hardware = true refuses the soft root");
}

/// The body of a writer child process (see `two_processes_write_one_store`).
#[test]
fn child_writer() {
    let (Ok(cfg), Ok(tag)) = (std::env::var("TG_CHILD_CONFIG"), std::env::var("TG_CHILD_TAG")) else {
        return;
    };
    let config = tokenguard::Config::load(std::path::Path::new(&cfg)).unwrap();
    let g = config.open_guard().unwrap();
    for i in 0..150 {
        g.put(
            "github",
            &format!("{tag}-{i}"),
            tokenguard::Secret::raw(format!("{tag}-{i}-value").into_bytes()),
            Default::default(),
        )
        .unwrap();
    }
}

#[test]
fn two_processes_write_one_store() {
    let env = TestEnv::new("twoproc");
    drop(env.init());
    let spawn = |tag: &str| {
        std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "child_writer", "--nocapture", "--test-threads=1"])
            .env("TG_CHILD_CONFIG", &env.config_path)
            .env("TG_CHILD_TAG", tag)
            .env("SOFTHSM2_CONF", &common::softhsm().conf)
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    let (mut a, mut b) = (spawn("a"), spawn("b"));
    assert!(a.wait().unwrap().success());
    assert!(b.wait().unwrap().success());
    let g = env.open();
    for tag in ["a", "b"] {
        for i in 0..150 {
            let s = g.get("github", &format!("{tag}-{i}")).unwrap();
            assert_eq!(s.field(None).unwrap().expose(), format!("{tag}-{i}-value").as_bytes());
        }
    }
    assert_eq!(g.list(Some("github")).unwrap().len(), 300);
    // Both processes raced to create the provider DEK: exactly one version exists.
    assert_eq!(g.stats().unwrap().deks.len(), 1);
}
