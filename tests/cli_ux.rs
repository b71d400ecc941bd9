//! The CLI as a security engineer meets it: the README runbook, pipes that close
//! early, Ctrl-C at a hidden prompt (on a real pty), real providers' token responses,
//! `exec`, the git credential helper, JSON shapes, and the guard rails.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::process::Stdio;

use common::{TestEnv, code, stderr};

fn ok(env: &TestEnv, args: &[&str], stdin: &[u8]) -> String {
    let o = env.run(args, stdin);
    assert_eq!(code(&o), 0, "tokenguard {args:?}\nstderr: {}", stderr(&o));
    String::from_utf8(o.stdout).unwrap()
}

fn json(env: &TestEnv, args: &[&str]) -> serde_json::Value {
    let mut a = args.to_vec();
    a.push("--json");
    serde_json::from_str(&ok(env, &a, b"")).unwrap_or_else(|e| panic!("{args:?}: not one JSON value: {e}"))
}

fn init(name: &str) -> TestEnv {
    let env = TestEnv::new(name);
    ok(&env, &["init"], b"");
    env
}

#[test]
fn the_readme_runbook_ends_with_a_clean_doctor() {
    let env = init("runbook");
    ok(&env, &["put", "p", "a"], b"secret-a");
    ok(&env, &["put", "p", "b"], b"secret-b");
    ok(&env, &["rotate-dek", "p"], b"");
    ok(&env, &["reencrypt", "p"], b"");
    ok(&env, &["retire", "p", "--below", "2"], b"");
    let o = env.run(&["doctor"], b"");
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(code(&o), 0, "a retired (erased) version is no tamper alarm:\n{out}");
    assert!(!out.contains("FAIL"), "{out}");
    assert_eq!(ok(&env, &["get", "p/a"], b""), "secret-a");
}

/// Runs `args` with stdout read for a moment and then closed, as `| head -1` does.
fn into_closed_pipe(env: &TestEnv, args: &[&str]) -> (i32, String) {
    let mut child =
        env.cli().args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut first = [0u8; 64];
    let _ = child.stdout.as_mut().unwrap().read(&mut first);
    drop(child.stdout.take());
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    (child.wait().unwrap().code().unwrap_or(-1), err)
}

#[test]
fn a_closed_pipe_ends_quietly() {
    let env = init("pipe");
    let g = env.open();
    let label = "x".repeat(200);
    let items = (0..800)
        .map(|i| tokenguard::PutItem {
            provider: "github".into(),
            name: format!("token-{i:04}"),
            secret: tokenguard::Secret::raw(b"s".to_vec()),
            options: tokenguard::PutOptions {
                labels: [("note".to_string(), label.clone())].into_iter().collect(),
                ..Default::default()
            },
        })
        .collect();
    g.put_many(items).unwrap();
    // ~75 bytes a line: 1,500 lines are well past 64 KiB whatever the actor's length
    // (700 were not always: the line length depends on the pid's digits).
    for i in 0..1500 {
        g.audit_event("get", "github", &format!("token-{i:04}"), "ok").unwrap();
    }
    drop(g);
    // More output than a pipe buffer (64 KiB) holds, so the writer meets the close.
    for args in [&["list"][..], &["list", "--json"], &["audit", "list"], &["audit", "list", "--json"]] {
        let (c, err) = into_closed_pipe(&env, args);
        assert_eq!(c, 141, "{args:?}: {err}");
        assert!(err.is_empty(), "{args:?} printed to stderr: {err}");
    }
}

#[test]
fn ctrl_c_at_the_hidden_prompt_restores_the_terminal() {
    let env = init("pty");
    // A real pseudo-terminal: the child gets it as its controlling terminal, types a
    // few characters and Ctrl-C; then the terminal's echo flag is read back.
    let script = r#"
import os, pty, sys, termios, time
pid, fd = pty.fork()
if pid == 0:
    os.execv(sys.argv[1], [sys.argv[1]] + sys.argv[3:])
out = b""
deadline = time.time() + 20
while sys.argv[2].encode() not in out and time.time() < deadline:
    out += os.read(fd, 1024)
if os.environ.get("PTY_SEND") == "TERM":
    os.write(fd, b"typed-half")
    time.sleep(0.2)
    os.kill(pid, 15)
else:
    os.write(fd, b"typed-half\x03")
_, status = os.waitpid(pid, 0)
echo = bool(termios.tcgetattr(fd)[3] & termios.ECHO)
print(os.waitstatus_to_exitcode(status), echo)
"#;
    let on_pty = |config: &std::path::Path, prompt: &str, args: &[&str], send: &str| {
        let o = std::process::Command::new("python3")
            .args(["-c", script, env!("CARGO_BIN_EXE_tokenguard"), prompt])
            .args(args)
            .env("TOKENGUARD_CONFIG", config)
            .env("PTY_SEND", send)
            .output()
            .unwrap();
        (String::from_utf8_lossy(&o.stdout).trim().to_string(), String::from_utf8_lossy(&o.stderr).into_owned())
    };
    // At the secret prompt of `put`.
    let (out, err) = on_pty(&env.config_path, "input hidden", &["put", "github", "typed"], "CTRL-C");
    assert_eq!(out, "130 True", "exit code and echo after Ctrl-C; stderr: {err}");
    // A SIGTERM at the prompt ends the process as SIGTERM does, the terminal restored.
    let (out, err) = on_pty(&env.config_path, "input hidden", &["put", "github", "typed"], "TERM");
    assert_eq!(out, "-15 True", "exit status and echo after SIGTERM; stderr: {err}");
    assert_eq!(code(&env.run(&["get", "github", "typed"], b"")), 3, "nothing was stored");
    // At the PIN prompt (pin_source = "prompt").
    let text = std::fs::read_to_string(&env.config_path).unwrap();
    let start = text.find("pin_source = \"file:").unwrap();
    let end = start + text[start..].find('\n').unwrap();
    let prompt_config = env.dir.join("prompt.toml");
    std::fs::write(&prompt_config, format!("{}pin_source = \"prompt\"{}", &text[..start], &text[end..])).unwrap();
    let (out, err) = on_pty(&prompt_config, "Token PIN", &["list"], "CTRL-C");
    assert_eq!(out, "130 True", "exit code and echo after Ctrl-C at the PIN prompt; stderr: {err}");
}

#[test]
fn real_token_responses_store_and_read_back() {
    let env = init("providers");
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/token-responses");
    type Case<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)]);
    let cases: &[Case<'_>] = &[
        (
            "google",
            "google.json",
            &[
                ("", "ya29.a0AfH6SMBx-google-access"),
                ("refresh_token", "1//0gGoogleRefresh"),
                ("id_token", "eyJhbGciOiJSUzI1NiJ9.google.sig"),
            ],
        ),
        ("github", "github-oauth.json", &[("", "gho_16C7e42F292c6912E7710c838347Ae178B4a")]),
        (
            "github-app",
            "github-app-user.json",
            &[
                ("", "ghu_16C7e42F292c6912E7710c838347Ae178B4a"),
                ("refresh_token", "ghr_1B4a2e77838347a7E420ce178F2E7c6912E169246c34E1ccbF66C46812d16D5B1A9Dc86A1498"),
            ],
        ),
        (
            "github-inst",
            "github-app-installation.json",
            &[
                ("", "ghs_16C7e42F292c6912E7710c838347Ae178B4a"),
                ("permissions.contents", "read"),
                ("repository_selection", "selected"),
            ],
        ),
        (
            "slack",
            "slack-v2.json",
            &[
                ("", "xoxb-17653672481-19874698323-pdFZKVeTuE8sk7oOcBrzbqgy"),
                ("authed_user.access_token", "xoxp-1234-authed-user-token"),
                ("team.id", "T9TK3CUKW"),
                ("ok", "true"),
                ("is_enterprise_install", "false"),
            ],
        ),
        (
            "microsoft",
            "microsoft.json",
            &[("", "eyJ0eXAiOiJKV1Qi.microsoft-access"), ("refresh_token", "0.AAAA-microsoft-refresh")],
        ),
        (
            "jira",
            "atlassian.json",
            &[("", "eyJraWQiOiJhdGxhc3NpYW4.jira-access"), ("refresh_token", "eyJraWQiOiJhdGxhc3NpYW4.jira-refresh")],
        ),
        ("okta", "okta.json", &[("", "eyJraWQiOiJva3Rh.okta-access"), ("refresh_token", "okta-refresh-a9Uw")]),
        (
            "auth0",
            "auth0.json",
            &[("", "eyJhbGciOiJSUzI1NiIs.auth0-access"), ("refresh_token", "v1.auth0-refresh-Mf4")],
        ),
    ];
    for (provider, file, fields) in cases {
        let body = std::fs::read(format!("{dir}/{file}")).unwrap();
        ok(&env, &["put", provider, "svc"], &body);
        for (field, want) in *fields {
            let mut args = vec!["get", provider, "svc"];
            if !field.is_empty() {
                args.extend(["--field", field]);
            }
            assert_eq!(ok(&env, &args, b""), *want, "{file} {field}");
        }
    }
    // Metadata and lifetimes.
    let list = json(&env, &["list"]);
    let find = |p: &str| list.as_array().unwrap().iter().find(|t| t["provider"] == p).unwrap().clone();
    assert_eq!(find("google")["token_type"], "Bearer");
    assert_eq!(find("github")["scopes"], serde_json::json!(["repo", "gist"]), "GitHub separates scopes with commas");
    assert_eq!(find("github-inst")["expires_at"], "2099-07-11T22:14:10Z");
    let now = tokenguard::now();
    let rt_exp: u64 = ok(&env, &["get", "github-app/svc", "--field", "refresh_token_expires_at"], b"").parse().unwrap();
    assert!(rt_exp > now + 15_000_000 && rt_exp < now + 16_000_000, "refresh_token_expires_in became an absolute time");
    let ext: u64 = ok(&env, &["get", "microsoft/svc", "--field", "ext_expires_at"], b"").parse().unwrap();
    assert!(ext > now, "ext_expires_in became ext_expires_at");
    // Nothing secret in the metadata.
    let text = list.to_string();
    for secret in ["xoxp-1234", "ghr_1B4a", "okta-refresh", "google-access"] {
        assert!(!text.contains(secret), "{secret} leaked into list --json");
    }
}

#[test]
fn an_expired_access_token_does_not_lock_the_refresh_token() {
    let env = init("rt-expiry");
    let body =
        br#"{"access_token":"at-OLD","refresh_token":"rt-LIVE","expires_at":1000,"refresh_token_expires_in":3600}"#;
    ok(&env, &["put", "acme", "svc"], body);
    assert_eq!(code(&env.run(&["get", "acme", "svc"], b"")), 7, "the access token expired");
    assert_eq!(ok(&env, &["get", "acme", "svc", "--field", "refresh_token"], b""), "rt-LIVE");
    let dead = br#"{"access_token":"at","refresh_token":"rt-DEAD","refresh_token_expires_at":"1000"}"#;
    ok(&env, &["put", "acme", "dead"], dead);
    assert_eq!(code(&env.run(&["get", "acme", "dead", "--field", "refresh_token"], b"")), 7);
}

#[test]
fn exec_hands_secrets_to_the_child_only_and_cleans_up() {
    let env = init("exec");
    ok(&env, &["put", "github", "ci-bot"], b"ghp_EXEC_ENV");
    ok(&env, &["put", "slack", "bot"], b"xoxb_EXEC_FILE");
    let script = r#"echo "env=$GH"; echo "file=$(cat "$SLACK")"; echo "path=$SLACK";
        tr '\0' '\n' < /proc/$PPID/environ | grep -c EXEC_ || true
        stat -c '%a' "$SLACK"; exit 7"#;
    let o = env.run(&["exec", "--env", "GH=github/ci-bot", "--file", "SLACK=slack/bot", "--", "sh", "-c", script], b"");
    assert_eq!(code(&o), 7, "the child's exit code: {}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "env=ghp_EXEC_ENV");
    assert_eq!(lines[1], "file=xoxb_EXEC_FILE");
    assert_eq!(lines[3], "0", "the parent's environment holds no secret");
    assert_eq!(lines[4], "600");
    let path = lines[2].strip_prefix("path=").unwrap();
    assert!(!std::path::Path::new(path).exists(), "the file is removed when the child exits");

    // SIGTERM to tokenguard: forwarded, the child ends, the file is still removed.
    let mut child = env
        .cli()
        .args(["exec", "--file", "S=slack/bot", "--", "sh", "-c", "echo $S; exec sleep 30"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    std::io::BufRead::read_line(&mut stdout, &mut line).unwrap();
    let path = std::path::PathBuf::from(line.trim());
    assert!(path.exists());
    assert_eq!(std::fs::metadata(path.parent().unwrap()).unwrap().permissions().mode() & 0o777, 0o700);
    std::process::Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(143), "128 + SIGTERM from the child");
    assert!(!path.exists(), "removed after a SIGTERM to the parent");
}

#[test]
fn json_outputs_have_one_shape_per_kind() {
    let env = init("json");
    ok(&env, &["put", "github", "a", "--expires-in", "1h", "--label", "owner=al"], b"s1");
    ok(&env, &["put", "github", "b"], b"s2");
    ok(&env, &["revoke", "github/b", "--reason", "test"], b"");
    // Records are objects naming provider and name; a time `T` comes with `T_unix`.
    fn check(v: &serde_json::Value, what: &str) {
        match v {
            serde_json::Value::Object(m) => {
                // DEK versions name a provider and a version; everything else that
                // names a provider is a token and names it too.
                if m.contains_key("provider") && !m.contains_key("name") && !m.contains_key("version") {
                    panic!("{what}: a provider without a token name: {v}");
                }
                for (k, x) in m {
                    if let Some(base) = k.strip_suffix("_unix") {
                        assert!(x.is_u64() || x.is_null(), "{what}: {k} is seconds");
                        let t = &m[base];
                        assert!(
                            t.is_null() || t.as_str().is_some_and(|s| s.ends_with('Z')),
                            "{what}: {base} is RFC 3339: {t}"
                        );
                    }
                    check(x, what);
                }
            }
            serde_json::Value::Array(a) => {
                assert!(!a.iter().any(|x| x.is_array()), "{what}: a record as a pair: {v}");
                a.iter().for_each(|x| check(x, what));
            }
            _ => {}
        }
    }
    let outputs = [
        ("list", json(&env, &["list"])),
        ("status", json(&env, &["status", "github", "a"])),
        ("status revoked", json(&env, &["status", "github/b"])),
        ("expiring", json(&env, &["expiring", "--within", "2h"])),
        ("audit list", json(&env, &["audit", "list"])),
        ("root list", json(&env, &["root", "list"])),
        ("stats", json(&env, &["stats"])),
        ("doctor", json(&env, &["doctor"])),
        ("purge dry-run", json(&env, &["purge", "--expired", "--dry-run"])),
        ("revoke dry-run", json(&env, &["revoke", "--label", "owner=al", "--reason", "x", "--dry-run"])),
        ("refresh --due", json(&env, &["refresh", "--due"])),
    ];
    for (what, v) in &outputs {
        assert!(v.is_object() || v.is_array(), "{what}: {v}");
        check(v, what);
    }
    assert!(outputs[0].1.is_array() && outputs[4].1.is_array() && outputs[10].1.is_array(), "lists are arrays");
    assert_eq!(outputs[10].1, serde_json::json!([]), "an empty list is []");
    // One truth: an expired token's status is "expired", with no "active" beside it.
    ok(&env, &["put", "github", "old"], br#"{"access_token":"x","expires_at":1000}"#);
    let st = json(&env, &["status", "github", "old"]);
    assert_eq!(st["status"], "expired");
    assert!(!st.to_string().contains("\"active\""), "{st}");
    let list = json(&env, &["list"]);
    let old = list.as_array().unwrap().iter().find(|t| t["name"] == "old").unwrap();
    assert_eq!(old["status"], "expired");
    assert!(!json(&env, &["root", "list"]).to_string().contains("\"pin\""), "no internal names");
}

#[test]
fn guard_rails_and_conveniences() {
    let env = init("rails");
    // A secret typed as an argument is refused and never echoed.
    let o = env.run(&["put", "github", "argv", "ghp_TYPED_ON_ARGV"], b"");
    assert_eq!(code(&o), 2);
    assert!(!stderr(&o).contains("ghp_TYPED_ON_ARGV"), "{}", stderr(&o));
    // put over an existing token says so; --no-overwrite refuses.
    ok(&env, &["put", "github", "a"], b"one");
    let o = env.run(&["put", "github/a"], b"two");
    assert_eq!(code(&o), 0);
    assert!(stderr(&o).contains("replaced the existing token github/a"), "{}", stderr(&o));
    assert_eq!(code(&env.run(&["put", "github", "a", "--no-overwrite"], b"three")), 2);
    assert_eq!(ok(&env, &["get", "github/a"], b""), "two");
    // Case: a second spelling of a provider is refused.
    let o = env.run(&["put", "GitHub", "b"], b"x");
    assert_eq!(code(&o), 2);
    assert!(stderr(&o).contains("only in case"), "{}", stderr(&o));
    // Limits: lifetimes, batch size.
    assert_eq!(code(&env.run(&["put", "github", "c", "--expires-in", "0s"], b"x")), 2);
    assert_eq!(code(&env.run(&["reencrypt", "--batch-size", "0"], b"")), 2);
    // Dry runs change nothing.
    assert!(ok(&env, &["delete", "github", "a", "--dry-run"], b"").contains("would delete github/a"));
    assert!(
        ok(&env, &["revoke", "github", "--all", "--reason", "r", "--dry-run"], b"").contains("would revoke github/a")
    );
    assert_eq!(ok(&env, &["get", "github", "a"], b""), "two");
    // Revoking twice says so.
    ok(&env, &["revoke", "github", "a", "--reason", "gone"], b"");
    let again = ok(&env, &["revoke", "github/a", "--reason", "gone"], b"");
    assert!(again.contains("already revoked"), "{again}");
    // get --output: 0600, never over a file.
    ok(&env, &["put", "slack", "bot"], b"xoxb-OUT");
    let out = env.dir.join("secret.out");
    ok(&env, &["get", "slack", "bot", "--output", out.to_str().unwrap()], b"");
    assert_eq!(std::fs::read(&out).unwrap(), b"xoxb-OUT");
    assert_eq!(std::fs::metadata(&out).unwrap().permissions().mode() & 0o777, 0o600);
    assert_eq!(code(&env.run(&["get", "slack", "bot", "-o", out.to_str().unwrap()], b"")), 2);
    // --from-file keeps a binary file's bytes exactly (trailing newline included).
    let bin = env.dir.join("key.bin");
    std::fs::write(&bin, b"\x00\xffbinary\n").unwrap();
    ok(&env, &["put", "vendor", "key", "--from-file", bin.to_str().unwrap()], b"");
    let o = env.run(&["get", "vendor", "key"], b"");
    assert_eq!(o.stdout, b"\x00\xffbinary\n");
    // backup -: the sealed bytes on stdout; a missing directory gets a hint.
    let o = env.run(&["backup", "-"], b"");
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(o.stdout.starts_with(b"TGBACKUP"));
    let o = env.run(&["backup", env.dir.join("no/such/dir/b.tgbackup").to_str().unwrap()], b"");
    assert_eq!(code(&o), 2);
    assert!(stderr(&o).contains("does not exist; create it first"), "{}", stderr(&o));
    // git credential helper.
    ok(&env, &["put", "git", "github.com"], b"ghp_GIT");
    let o = env.run(&["git-credential", "get"], b"protocol=https\nhost=github.com\n\n");
    assert_eq!(String::from_utf8_lossy(&o.stdout), "username=x-access-token\npassword=ghp_GIT\n\n");
    let o = env.run(&["git-credential", "get"], b"protocol=https\nhost=gitlab.example\n\n");
    assert_eq!((code(&o), o.stdout.len()), (0, 0), "an unknown host gets no answer");
    // Version, completions, man page; library noise stays out of a warn log.
    let v = ok(&env, &["--version"], b"");
    assert!(v.contains("commit") && v.contains("features: pkcs11"), "{v}");
    assert!(ok(&env, &["completions", "bash"], b"").contains("tokenguard"));
    assert!(ok(&env, &["man"], b"").contains(".TH"));
    let o = env.cli().args(["get", "slack", "bot"]).env("RUST_LOG", "warn").output().unwrap();
    assert_eq!(code(&o), 0);
    assert!(o.stderr.is_empty(), "no library noise: {}", String::from_utf8_lossy(&o.stderr));
    // -vvv says what the guard did, never the secret.
    let o = env.cli().args(["-vvv", "get", "slack", "bot"]).output().unwrap();
    let log = String::from_utf8_lossy(&o.stderr);
    assert!(log.contains("record opened") && log.contains("audit event appended"), "{log}");
    assert!(!log.contains("xoxb-OUT") && !log.contains('\u{1b}'), "no secret, no colour into a file: {log}");
}

#[test]
fn the_readme_quickstart_runs_as_written() {
    let env = init("quickstart");
    let readme = include_str!("../README.md");
    let section = readme.split("## Quickstart").nth(1).unwrap();
    let block = section.split("```sh\n").nth(1).unwrap().split("```").next().unwrap();
    assert!(block.starts_with("T=target/release/tokenguard\n"), "{block}");
    let script = block.replacen("T=target/release/tokenguard", &format!("T={}", env!("CARGO_BIN_EXE_tokenguard")), 1);
    let o = std::process::Command::new("bash")
        .args(["-euo", "pipefail", "-c", &script])
        .current_dir(&env.dir)
        .env("TOKENGUARD_CONFIG", &env.config_path)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "stdout:\n{out}\nstderr:\n{}", String::from_utf8_lossy(&o.stderr));
    for want in ["ghp_example0123456789", "1//example", "doctor: no failures", "audit chain intact", "the child has it"]
    {
        assert!(out.contains(want), "{want} missing from:\n{out}");
    }
}

/// What the adversarial review of this CLI found, kept found.
#[test]
fn review_findings_stay_fixed() {
    let env = init("review");
    // 1. HTTP/TLS trace logs would carry the client secret and fresh tokens.
    let server = tiny_http::Server::http("127.0.0.1:0").unwrap();
    let port = server.server_addr().to_ip().unwrap().port();
    let endpoint = std::thread::spawn(move || {
        if let Ok(Some(req)) = server.recv_timeout(std::time::Duration::from_secs(20)) {
            let body = r#"{"access_token":"at-FRESH-SECRET","refresh_token":"rt-NEW","expires_in":3600}"#;
            let _ = req.respond(tiny_http::Response::from_string(body));
        }
    });
    let mut text = std::fs::read_to_string(&env.config_path).unwrap();
    text.push_str(&format!("\n[providers.acme]\ntoken_url = \"http://127.0.0.1:{port}/token\"\nclient_id = \"cid\"\n"));
    std::fs::write(&env.config_path, text).unwrap();
    ok(&env, &["put", "oauth-client", "acme"], b"CLIENT-SECRET-VALUE");
    ok(&env, &["put", "acme", "svc"], br#"{"access_token":"at-OLD","refresh_token":"rt-OLD","expires_in":3600}"#);
    let o = env.cli().args(["-vvv", "refresh", "acme/svc"]).output().unwrap();
    endpoint.join().unwrap();
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let log = String::from_utf8_lossy(&o.stderr);
    let basic = "Y2lkOkNMSUVOVC1TRUNSRVQtVkFMVUU"; // base64 of "cid:CLIENT-SECRET-VALUE", cut
    for secret in ["CLIENT-SECRET", basic, "at-FRESH", "rt-OLD", "rt-NEW", "authorization"] {
        assert!(!log.to_lowercase().contains(&secret.to_lowercase()), "{secret} in the trace log:\n{log}");
    }
    // 2. A far-future not-after: refused on the command line, clamped when a
    //    provider sends it, and never a crash of list.
    assert_eq!(code(&env.run(&["put", "g/n", "--expires-at", "253402300800"], b"x")), 2);
    ok(&env, &["put", "g/far"], br#"{"access_token":"A","expires_in":18446744073709551615}"#);
    assert!(ok(&env, &["list"], b"").contains("9999-12-31T23:59:59Z"));
    json(&env, &["status", "g/far"]);
    // 3. exec's clean-up never writes through a link the child left.
    let victim = env.dir.join("victim.txt");
    std::fs::write(&victim, b"keep me").unwrap();
    let link = format!("ln -s {} \"$(dirname \"$F\")/zz\"", victim.display());
    ok(&env, &["exec", "--file", "F=g/far", "--", "sh", "-c", &link], b"");
    assert_eq!(std::fs::read(&victim).unwrap(), b"keep me");
    // 4. purge --expired keeps a token set whose refresh token is still good.
    ok(&env, &["put", "google", "rt"], br#"{"access_token":"AT","refresh_token":"RT","expires_at":1000}"#);
    ok(&env, &["put", "google", "gone"], br#"{"access_token":"AT","expires_at":1000}"#);
    let r = json(&env, &["purge", "--expired"]);
    assert_eq!(r["expired"], 1, "{r}");
    assert_eq!(ok(&env, &["get", "google/rt", "--field", "refresh_token"], b""), "RT");
    // 5. A nested expires_in becomes an absolute time that governs its token.
    ok(
        &env,
        &["put", "slack", "bot"],
        br#"{"access_token":"xoxb","authed_user":{"access_token":"xoxp","expires_in":0}}"#,
    );
    assert_eq!(code(&env.run(&["get", "slack/bot", "--field", "authed_user.access_token"], b"")), 7);
    // 6. Two values for one field are refused, not one dropped.
    assert_eq!(code(&env.run(&["put", "x", "y"], br#"{"access_token":"a","k.v":"1","k":{"v":"2"}}"#)), 2);
    // 7. Control characters never reach the terminal or the audit trail.
    assert_eq!(code(&env.run(&["revoke", "g/far", "--reason", "x\u{1b}[2J\nFAKE"], b"")), 2);
    ok(&env, &["put", "git", "github.com"], b"ghp_GIT");
    for req in [&b"protocol=http\nhost=github.com\n\n"[..], b"protocol=https\nhost=git\x1bhub.com\n\n"] {
        let o = env.run(&["git-credential", "get"], req);
        assert_eq!((code(&o), o.stdout.len()), (0, 0), "no password over plain HTTP or for an odd host");
    }
    // 8. No value typed on the command line is echoed back, whatever the mistake.
    for args in [
        &["ghp_STRAYVALUE"][..],
        &["put", "a", "b", "--expires-in", "ghp_STRAYVALUE"],
        &["reencrypt", "--batch-size", "ghp_STRAYVALUE"],
    ] {
        let o = env.run(args, b"x");
        assert_eq!(code(&o), 2, "{args:?}");
        assert!(!stderr(&o).contains("ghp_STRAYVALUE"), "{args:?}: {}", stderr(&o));
    }
    // 9. A closed pipe after completions. (A closed stdout at start cannot be told
    //    from /dev/null: Rust's runtime puts /dev/null there before main runs, which
    //    also keeps a later open from taking descriptor 1.)
    let (c, err) = into_closed_pipe(&env, &["completions", "bash"]);
    assert!(c == 141 || c == 0, "{c}: {err}");
    assert!(!err.contains("panicked"), "{err}");
}
