//! The refresh engine against a real HTTP token endpoint on loopback (a scriptable
//! server started by each test), with the store on a real SoftHSM2 token.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::Read;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::endpoint::{Endpoint, Reply, counting_rotating, rotating};
use common::{TestEnv, code, stderr};
use tokenguard::guard::refresh::{RefreshError, RefreshedTokens, Refresher};
use tokenguard::guard::revoke::TokenStatus;
use tokenguard::{Error, PutOptions, Secret, SecretBytes, TokenGuard, TokenSet};

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

/// An env whose config has `[providers.acme]` at `url` and a fast refresh policy.
fn env_for(name: &str, url: &str, extra_provider: &str) -> TestEnv {
    let env = TestEnv::new(name);
    let mut text = std::fs::read_to_string(&env.config_path).unwrap();
    text.push_str(&format!(
        "\n[providers.acme]\ntoken_url = \"{url}\"\nclient_id = \"client id/1\"\ntimeout_ms = 2000\n{extra_provider}\n[refresh]\nbase_delay_ms = 100\nmax_delay_secs = 2\nmax_attempts = 3\nlease_secs = 2\n"
    ));
    std::fs::write(&env.config_path, text).unwrap();
    env
}

/// Stores the initial token set (`at-0`/`rt-0`) expiring `expires_in` seconds from
/// now (negative: already expired), and the client secret.
fn seed(g: &TokenGuard, expires_in: i64) {
    let set = TokenSet::new().with("access_token", "at-0".to_string()).with("refresh_token", "rt-0".to_string());
    let expires_at = Some((now() as i64 + expires_in) as u64);
    g.put("acme", "svc", Secret::TokenSet(set), PutOptions { expires_at, ..Default::default() }).unwrap();
    g.put("oauth-client", "acme", Secret::raw(b"s3cr:t".to_vec()), PutOptions::default()).unwrap();
}

fn open(env: &TestEnv) -> TokenGuard {
    env.config().open_guard().unwrap()
}

fn field(s: &Secret, f: &str) -> String {
    s.field(Some(f)).unwrap().expose_str().unwrap().to_string()
}

#[test]
fn success_rotation_and_client_auth() {
    let valid = Arc::new(Mutex::new("rt-0".to_string()));
    let ep = Endpoint::start(rotating(valid.clone()));
    let env = env_for("rf-ok", &ep.url, "");
    seed(&env.init(), 30); // valid, but inside the 60 s margin: due
    let g = open(&env);
    let s = g.get_fresh("acme", "svc").unwrap();
    assert_eq!(field(&s, "access_token"), "at-1");
    assert_eq!(ep.count(), 1);
    let req = ep.seen(0);
    assert_eq!(req.form.get("refresh_token").map(String::as_str), Some("rt-0"));
    // client_secret_basic: urlencoded id and secret, base64.
    use base64::Engine;
    let want = base64::engine::general_purpose::STANDARD.encode("client+id%2F1:s3cr%3At");
    assert_eq!(req.auth.as_deref(), Some(format!("Basic {want}").as_str()));
    assert!(!req.form.contains_key("client_secret"));
    // Persisted before it was returned: a fresh guard reads the same set.
    let again = open(&env).get("acme", "svc").unwrap();
    assert_eq!(field(&again, "refresh_token"), "rt-1");
    let meta = open(&env).list(Some("acme")).unwrap().remove(0).meta;
    assert!(meta.expires_at.unwrap() >= now() + 3500, "expires_in became an absolute not-after");
    assert_eq!(meta.token_type.as_deref(), Some("Bearer"));
    // Fresh now: no second request.
    assert_eq!(field(&g.get_fresh("acme", "svc").unwrap(), "access_token"), "at-1");
    assert_eq!(ep.count(), 1);
    // A forced refresh spends the rotated token, not the old one.
    let (s, _) = g.refresh_now("acme", "svc").unwrap();
    assert_eq!(field(&s, "access_token"), "at-2");
    assert_eq!(ep.seen(1).form.get("refresh_token").map(String::as_str), Some("rt-1"));
    let events = g.audit_list(1).unwrap();
    assert_eq!(events.iter().filter(|e| e.op == "refresh" && e.outcome == "ok").count(), 2);
}

#[test]
fn a_response_without_refresh_token_keeps_the_old_one_and_post_auth_works() {
    let ep = Endpoint::start(Box::new(|_, n| {
        Reply::json(200, serde_json::json!({"access_token": format!("at-{n}"), "expires_in": 600}))
    }));
    let env = env_for("rf-nort", &ep.url, "client_auth = \"client_secret_post\"");
    seed(&env.init(), 10);
    let g = open(&env);
    let s = g.get_fresh("acme", "svc").unwrap();
    assert_eq!(field(&s, "access_token"), "at-1");
    assert_eq!(field(&s, "refresh_token"), "rt-0");
    let req = ep.seen(0);
    assert_eq!(req.auth, None);
    assert_eq!(req.form.get("client_id").map(String::as_str), Some("client id/1"));
    assert_eq!(req.form.get("client_secret").map(String::as_str), Some("s3cr:t"));
}

#[test]
fn server_error_then_success_backs_off() {
    let valid = Arc::new(Mutex::new("rt-0".to_string()));
    let ok = rotating(valid);
    let ep = Endpoint::start(Box::new(
        move |req, n| if n == 1 { Reply::json(503, serde_json::json!({})) } else { ok(req, n) },
    ));
    let env = env_for("rf-500", &ep.url, "");
    seed(&env.init(), -5); // expired: the caller must wait for a good token
    let g = open(&env);
    let t = Instant::now();
    let s = g.get_fresh("acme", "svc").unwrap();
    assert_eq!(field(&s, "access_token"), "at-2");
    assert_eq!(ep.count(), 2);
    assert!(t.elapsed() >= Duration::from_millis(50), "no backoff observed: {:?}", t.elapsed());
    let outcomes: Vec<_> =
        g.audit_list(1).unwrap().into_iter().filter(|e| e.op == "refresh").map(|e| e.outcome).collect();
    assert_eq!(outcomes, ["transient", "ok"]);
}

#[test]
fn rate_limited_with_retry_after() {
    let valid = Arc::new(Mutex::new("rt-0".to_string()));
    let ok = rotating(valid);
    let ep = Endpoint::start(Box::new(move |req, n| {
        if n == 1 {
            Reply { status: 429, body: "{}".into(), headers: vec![("Retry-After", "1".into())], delay: Duration::ZERO }
        } else {
            ok(req, n)
        }
    }));
    let env = env_for("rf-429", &ep.url, "");
    seed(&env.init(), -5);
    let g = open(&env);
    let t = Instant::now();
    assert_eq!(field(&g.get_fresh("acme", "svc").unwrap(), "access_token"), "at-2");
    assert!(t.elapsed() >= Duration::from_secs(1), "Retry-After not honoured: {:?}", t.elapsed());
    assert_eq!(ep.count(), 2);
}

#[test]
fn invalid_grant_needs_reauthorisation_without_retrying() {
    let ep = Endpoint::start(Box::new(|_, _| {
        Reply::json(
            400,
            serde_json::json!({"error": "invalid_grant", "error_description": "Token has been expired or revoked."}),
        )
    }));
    let env = env_for("rf-invalid", &ep.url, "");
    seed(&env.init(), 10);
    let g = open(&env);
    assert!(matches!(g.get_fresh("acme", "svc"), Err(Error::NeedsReauth { .. })));
    assert!(matches!(g.get_fresh("acme", "svc"), Err(Error::NeedsReauth { .. })));
    assert_eq!(ep.count(), 1, "no retry loop on invalid_grant");
    assert!(matches!(g.status("acme", "svc").unwrap(), TokenStatus::NeedsReauth { .. }));
    assert_eq!(g.list(Some("acme")).unwrap()[0].meta.state, tokenguard::TokenState::NeedsReauth);
    // The CLI says so with exit 7.
    let o = env.run(&["refresh", "acme", "svc"], b"");
    assert_eq!(code(&o), 7, "{}", stderr(&o));
    assert!(stderr(&o).contains("needs re-authorisation"));
    // Storing a new token set (after the consent flow) clears the state.
    seed(&g, 3600);
    assert_eq!(field(&g.get_fresh("acme", "svc").unwrap(), "access_token"), "at-0");
}

#[test]
fn a_slow_endpoint_times_out_and_the_valid_token_is_served() {
    let ep = Endpoint::start(Box::new(|_, n| Reply {
        delay: Duration::from_millis(1500),
        ..Reply::json(200, serde_json::json!({"access_token": format!("at-{n}"), "expires_in": 60}))
    }));
    let env = env_for("rf-slow", &ep.url, "");
    let text = std::fs::read_to_string(&env.config_path).unwrap().replace("timeout_ms = 2000", "timeout_ms = 200");
    std::fs::write(&env.config_path, text).unwrap();
    seed(&env.init(), 30);
    let g = open(&env);
    let t = Instant::now();
    assert_eq!(field(&g.get_fresh("acme", "svc").unwrap(), "access_token"), "at-0", "the still-valid token is served");
    assert!(t.elapsed() < Duration::from_millis(1200), "did not time out: {:?}", t.elapsed());
    // Inside the backoff window, no new request hammers the provider.
    assert_eq!(field(&g.get_fresh("acme", "svc").unwrap(), "access_token"), "at-0");
    assert_eq!(ep.count(), 1);
}

#[test]
fn a_redirect_is_not_followed() {
    // First answer: 302 to the same endpoint; any later (followed) request would get a
    // valid token set, which must never be taken.
    let ep = Endpoint::start(Box::new(|_, n| {
        if n == 1 {
            Reply {
                status: 302,
                body: String::new(),
                headers: vec![("Location", "/token?again".into())],
                delay: Duration::ZERO,
            }
        } else {
            Reply::json(200, serde_json::json!({"access_token": "at-REDIRECTED", "expires_in": 3600}))
        }
    }));
    let env = env_for("rf-redirect", &ep.url, "");
    seed(&env.init(), -5);
    let g = open(&env);
    assert!(matches!(g.refresh_now("acme", "svc"), Err(Error::RefreshFailed { .. })));
    assert_eq!(ep.count(), 1, "the redirect was not followed");
    let (s, _) = g.get_with("acme", "svc", tokenguard::GetOptions { allow_expired: true }).unwrap();
    assert_ne!(field(&s, "access_token"), "at-REDIRECTED");
}

#[test]
fn a_malformed_body_is_transient_and_gives_up_after_the_cap() {
    let ep = Endpoint::start(Box::new(|_, _| Reply {
        status: 200,
        body: "<html>proxy error</html>".into(),
        headers: vec![],
        delay: Duration::ZERO,
    }));
    let env = env_for("rf-malformed", &ep.url, "");
    seed(&env.init(), -5);
    let g = open(&env);
    match g.get_fresh("acme", "svc") {
        Err(e @ Error::RefreshFailed { .. }) => assert!(e.to_string().contains("not a token response"), "{e}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(ep.count(), 3, "max_attempts = 3");
    // The old set is untouched.
    let (s, _) = g.get_with("acme", "svc", tokenguard::GetOptions { allow_expired: true }).unwrap();
    assert_eq!(field(&s, "refresh_token"), "rt-0");
}

#[test]
fn sixteen_threads_cause_one_refresh() {
    let valid = Arc::new(Mutex::new("rt-0".to_string()));
    let ok = rotating(valid);
    let ep = Endpoint::start(Box::new(move |req, n| Reply { delay: Duration::from_millis(200), ..ok(req, n) }));
    let env = env_for("rf-16", &ep.url, "");
    seed(&env.init(), 20);
    let g = open(&env);
    let results: Vec<String> = std::thread::scope(|s| {
        let hs: Vec<_> =
            (0..16).map(|_| s.spawn(|| field(&g.get_fresh("acme", "svc").unwrap(), "access_token"))).collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(ep.count(), 1, "exactly one HTTP refresh");
    assert!(results.iter().all(|r| r == "at-1"), "{results:?}");
}

/// The agent refreshes a due token on its own (its scheduler), once, and serves the
/// new one; eight clients asking `get_fresh` of a token that is due cause one refresh.
#[test]
fn the_agent_refreshes_due_tokens_by_itself_and_once_for_many_clients() {
    let valid = Arc::new(Mutex::new("rt-0".to_string()));
    let ok = rotating(valid.clone());
    let ep = Endpoint::start(Box::new(move |req, n| Reply { delay: Duration::from_millis(200), ..ok(req, n) }));
    let env = env_for("rf-agent", &ep.url, "");
    let g = env.init();
    seed(&g, 20);
    drop(g);
    let socket = env.dir.join("agent.sock");
    let mut text = std::fs::read_to_string(&env.config_path).unwrap();
    text.push_str(&format!(
        "\n[agent]\nsocket = \"{}\"\nrefresh_interval_secs = 1\n[[agent.allow]]\nuid = 0\ntokens = [\"*/*\"]\nops = [\"get\", \"get_fresh\", \"put\"]\n",
        socket.display()
    ));
    std::fs::write(&env.config_path, text).unwrap();
    let mut agent =
        env.cli().arg("serve").stdin(std::process::Stdio::null()).stderr(std::process::Stdio::null()).spawn().unwrap();
    let connect = || tokenguard::agent::Client::connect(&socket, Duration::from_secs(10));
    let until = Instant::now() + Duration::from_secs(20);
    while connect().and_then(|mut c| c.ping()).is_err() {
        assert!(Instant::now() < until, "the agent did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The scheduler's pass refreshes the due token without anyone asking.
    let until = Instant::now() + Duration::from_secs(10);
    while ep.count() == 0 {
        assert!(Instant::now() < until, "the agent's scheduler never refreshed the due token");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    let got = connect().unwrap().get("acme", "svc", None, false).unwrap().secret().unwrap();
    assert_eq!(got.expose(), b"at-1");
    assert_eq!(ep.count(), 1);
    // A second token, due, holding the provider's current refresh token: eight
    // clients at once, one refresh between them.
    let current = valid.lock().unwrap().clone();
    let set = TokenSet::new().with("access_token", "bt-0".to_string()).with("refresh_token", current);
    let mut c = connect().unwrap();
    let mut r = tokenguard::agent::protocol::Request::token("put", "acme", "other");
    r.token_set = Some(
        set.iter()
            .map(|(k, v)| (k.to_string(), tokenguard::agent::protocol::WireSecret(SecretBytes::from_slice(v.expose()))))
            .collect(),
    );
    r.expires_at = Some(now() + 20);
    c.call::<serde_json::Value>(r).unwrap();
    let before = ep.count();
    // The rotating endpoint accepts only its latest refresh token: it is rt-1 now.
    let values: Vec<String> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..8)
            .map(|_| {
                s.spawn(|| {
                    let mut r = tokenguard::agent::protocol::Request::token("get_fresh", "acme", "other");
                    r.field = Some("refresh_token".into());
                    let got: tokenguard::agent::client::Got = connect().unwrap().call(r).unwrap();
                    String::from_utf8(got.secret().unwrap().expose().to_vec()).unwrap()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(ep.count() - before <= 1, "{} refreshes for eight clients", ep.count() - before);
    assert!(values.windows(2).all(|w| w[0] == w[1]), "the clients saw different tokens: {values:?}");
    let _ = agent.kill();
    let _ = agent.wait();
}

/// Child process: opens the guard and prints the access token `get_fresh` returns.
/// With TG_RF_ABORT set, it dies right after the provider answered (before commit).
#[test]
fn refresh_child() {
    let Ok(cfg) = std::env::var("TG_RF_CONFIG") else { return };
    let config = tokenguard::Config::load(std::path::Path::new(&cfg)).unwrap();
    let g = config.open_guard().unwrap();
    if std::env::var("TG_RF_ABORT").is_ok() {
        struct AbortAfterAnswer(tokenguard::oauth::OAuthClient);
        impl Refresher for AbortAfterAnswer {
            fn refresh(&self, p: &str, n: &str, cur: &TokenSet) -> Result<RefreshedTokens, RefreshError> {
                let r = self.0.refresh(p, n, cur);
                assert!(r.is_ok(), "{r:?}");
                std::process::abort(); // the provider answered; the commit never happens
            }
        }
        let c = config.oauth_client(&g, "acme").unwrap().unwrap();
        g.set_refresher("acme", Arc::new(AbortAfterAnswer(c)));
    }
    let s = g.get_fresh("acme", "svc").unwrap();
    println!("TOKEN {}", field(&s, "access_token"));
}

fn child(env: &TestEnv, abort: bool) -> std::process::Child {
    let mut c = std::process::Command::new(std::env::current_exe().unwrap());
    c.args(["--exact", "refresh_child", "--nocapture", "--test-threads=1"])
        .env("TG_RF_CONFIG", &env.config_path)
        .env("SOFTHSM2_CONF", &common::softhsm().conf)
        .stdout(std::process::Stdio::piped())
        .stderr(if abort { std::process::Stdio::null() } else { std::process::Stdio::inherit() });
    if abort {
        c.env("TG_RF_ABORT", "1");
    }
    c.spawn().unwrap()
}

fn token_of(out: std::process::Output) -> Option<String> {
    // libtest may print "test refresh_child ... " on the same line.
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines().find_map(|l| l.split_once("TOKEN ").map(|(_, t)| t.trim().to_string()))
}

#[test]
fn two_processes_one_refresh_no_invalid_grant() {
    let (ep, invalid) = counting_rotating(Duration::from_millis(400));
    let env = env_for("rf-2proc", &ep.url, "");
    seed(&env.init(), 20);
    let (a, b) = (child(&env, false), child(&env, false));
    let (ta, tb) = (token_of(a.wait_with_output().unwrap()), token_of(b.wait_with_output().unwrap()));
    assert_eq!(ta.as_deref(), Some("at-1"));
    assert_eq!(tb.as_deref(), Some("at-1"), "the loser adopted the winner's token");
    assert_eq!(ep.count(), 1, "one refresh across both processes");
    assert_eq!(invalid.load(Ordering::Relaxed), 0);
}

#[test]
fn a_crash_between_answer_and_commit_is_recoverable() {
    // A provider that does not rotate refresh tokens: the old one stays valid.
    let ep = Endpoint::start(Box::new(|_, n| {
        Reply::json(200, serde_json::json!({"access_token": format!("at-{n}"), "expires_in": 3600}))
    }));
    let env = env_for("rf-crash", &ep.url, "");
    seed(&env.init(), 20);
    let out = child(&env, true).wait_with_output().unwrap();
    assert!(!out.status.success(), "the child must have died");
    assert_eq!(ep.count(), 1, "the provider answered once");
    // The store still holds the old set, intact.
    let g = open(&env);
    let s = g.get("acme", "svc").unwrap();
    assert_eq!((field(&s, "access_token").as_str(), field(&s, "refresh_token").as_str()), ("at-0", "rt-0"));
    // The dead process's lease expires; the next refresh goes through.
    let t = Instant::now();
    let s = g.get_fresh("acme", "svc").unwrap();
    assert_eq!(field(&s, "access_token"), "at-2");
    assert!(t.elapsed() < Duration::from_secs(10), "waited for the 2 s lease far too long: {:?}", t.elapsed());
    assert!(g.doctor().iter().all(|c| c.status != tokenguard::root::Status::Fail));
}

#[test]
fn cli_refresh_due_and_watch_stop_cleanly() {
    let valid = Arc::new(Mutex::new("rt-0".to_string()));
    let ep = Endpoint::start(rotating(valid));
    let env = env_for("rf-cli", &ep.url, "");
    let g = env.init();
    seed(&g, 30);
    let set = TokenSet::new().with("access_token", "fresh".to_string()).with("refresh_token", "x".to_string());
    g.put(
        "acme",
        "later",
        Secret::TokenSet(set),
        PutOptions { expires_at: Some(now() + 86_400), ..Default::default() },
    )
    .unwrap();
    drop(g);
    let o = env.run(&["refresh", "--due", "--json"], b"");
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    // `--due --json` is one array (a list); `--watch --json` streams JSON lines.
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let lines = v.as_array().unwrap();
    assert_eq!(lines.len(), 1, "only the due token: {lines:?}");
    assert_eq!(lines[0]["outcome"], "refreshed");
    assert!(!String::from_utf8_lossy(&o.stdout).contains("at-1"), "no token in the output");
    assert_eq!(ep.count(), 1);

    // --watch runs until SIGTERM and exits 0, between refreshes.
    let mut child = env
        .cli()
        .args(["refresh", "--watch", "--interval", "1s"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let status = std::process::Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let t = Instant::now();
    let st = child.wait().unwrap();
    assert!(t.elapsed() < Duration::from_secs(3), "did not stop promptly");
    assert_eq!(st.code(), Some(0));
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert!(!err.contains("panicked"), "{err}");
    // The client secret never leaves the guard in the clear.
    let dbg = format!("{:?}", open(&env).get("oauth-client", "acme").unwrap());
    assert!(!dbg.contains("s3cr"));
    let _ = SecretBytes::from_slice(b"");
}

/// Issue 10, finding 15: the refresh compare-and-set must not overwrite a `put` that
/// lands while the provider is being called, even within the same second as the
/// record it refreshed (`updated` has one-second resolution; every write moves it
/// forward, so it is the record's version).
#[test]
fn a_put_during_a_refresh_is_not_overwritten() {
    let env = env_for("rf-put-race", "http://127.0.0.1:9", "");
    seed(&env.init(), -10);
    let g = open(&env);
    struct PutsFirst(TokenGuard);
    impl Refresher for PutsFirst {
        fn refresh(&self, p: &str, n: &str, _cur: &TokenSet) -> Result<RefreshedTokens, RefreshError> {
            let set =
                TokenSet::new().with("access_token", "at-put".to_string()).with("refresh_token", "rt-put".to_string());
            self.0
                .put(p, n, Secret::TokenSet(set), PutOptions::default())
                .map_err(|e| RefreshError::Failed(e.to_string()))?;
            Ok(RefreshedTokens {
                tokens: TokenSet::new().with("access_token", "at-refreshed".to_string()),
                expires_in: Some(3600),
                token_type: None,
                scopes: None,
            })
        }
    }
    g.set_refresher("acme", Arc::new(PutsFirst(g.clone())));
    let (s, out) = g.refresh_now("acme", "svc").unwrap();
    assert_eq!(field(&s, "access_token"), "at-put", "{out:?}");
    assert_eq!(field(&g.get("acme", "svc").unwrap(), "access_token"), "at-put", "the put was overwritten");
}
