//! Whole-store rollback against a hardware counter (security issue, "Rollback of the
//! whole store"): the counter here is a PKCS#11 data object in the SoftHSM2 test token
//! (`counter_label`); `tests/tpm.rs` runs the same attack against a TPM NV counter on
//! swtpm. The attacker copies the store file and puts the copy back later; the test
//! also plays the operator (binding, accepting) and the crash (an increment that never
//! happened), and runs writers side by side and kills them.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{TestEnv, code, stderr, with_token_lock};

/// A SoftHSM2 test env whose root keeps the store's rollback counter.
fn env_with_counter(name: &str) -> (TestEnv, String) {
    let env = TestEnv::new(name);
    let label = format!("ctr-{}", env.key_label);
    set_counter_label(&env, Some(&label));
    (env, label)
}

fn set_counter_label(env: &TestEnv, label: Option<&str>) {
    let text = std::fs::read_to_string(&env.config_path).unwrap();
    let text: String = text.lines().filter(|l| !l.starts_with("counter_label")).map(|l| format!("{l}\n")).collect();
    // After the line that names the root's key: `key_label` here, `uri` in a config
    // from softhsm-setup.sh.
    let with = match (label, text.lines().find(|l| l.starts_with("key_label = ") || l.starts_with("uri = "))) {
        (Some(l), Some(key_line)) => text.replacen(key_line, &format!("{key_line}\ncounter_label = \"{l}\""), 1),
        (Some(_), None) => panic!("no root key line to put the counter after in:\n{text}"),
        (None, _) => text,
    };
    std::fs::write(&env.config_path, with).unwrap();
}

/// The counter objects of `label` (docs: a data object found by its application,
/// the value in its label).
fn counter_objects(s: &cryptoki::session::Session, label: &str) -> Vec<cryptoki::object::ObjectHandle> {
    use cryptoki::object::{Attribute, ObjectClass};
    s.find_objects(&[
        Attribute::Class(ObjectClass::DATA),
        Attribute::Application(format!("tokenguard-counter/{label}").into_bytes()),
    ])
    .unwrap()
}

/// The counter object's value, read with the test's own session.
fn counter_value(label: &str) -> u64 {
    use cryptoki::object::{Attribute, AttributeType};
    let s = common::user_session();
    // Read under the token lock: a tokenguard process may be rewriting the object.
    let attrs = with_token_lock(|| {
        let h = counter_objects(&s, label);
        assert_eq!(h.len(), 1, "one counter object");
        s.get_attributes(h[0], &[AttributeType::Label]).unwrap()
    });
    match attrs.as_slice() {
        [Attribute::Label(v)] => {
            String::from_utf8_lossy(v).strip_prefix(&format!("{label}=")).unwrap().parse().unwrap()
        }
        other => panic!("{other:?}"),
    }
}

/// Sets the counter object's value (what no attacker without the PIN can do: this
/// plays a crash between a commit and its increment, or a reset counter).
fn set_counter(label: &str, v: u64) {
    use cryptoki::object::Attribute;
    let s = common::user_session();
    with_token_lock(|| {
        let h = counter_objects(&s, label);
        s.update_attributes(h[0], &[Attribute::Label(format!("{label}={v}").into_bytes())]).unwrap()
    });
}

fn ok(env: &TestEnv, args: &[&str], stdin: &[u8]) -> String {
    let o = env.run(args, stdin);
    assert_eq!(code(&o), 0, "{args:?}: {}", stderr(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn a_whole_copy_put_back_is_refused_until_the_operator_accepts_it() {
    let (env, label) = env_with_counter("rb-copy");
    ok(&env, &["init"], b"");
    let at_init = counter_value(&label);
    ok(&env, &["put", "github", "a"], b"ghp_OLD");
    ok(&env, &["put", "slack", "b"], b"xoxb_B");
    // Every commit moves the counter by one.
    assert_eq!(counter_value(&label), at_init + 2);
    let copy = std::fs::read(&env.store_path).unwrap();
    ok(&env, &["put", "github", "a"], b"ghp_NEW");
    ok(&env, &["revoke", "slack", "b", "--reason", "leaked"], b"");

    // The attacker puts the whole older file back: rows and state head agree.
    std::fs::write(&env.store_path, &copy).unwrap();
    for args in [&["get", "github", "a"][..], &["get", "slack", "b"][..]] {
        let o = env.run(args, b"");
        assert_eq!(code(&o), 4, "{args:?}: {}", stderr(&o));
        assert!(o.stdout.is_empty(), "no old secret: {:?}", o.stdout);
        assert!(stderr(&o).contains("older than its counter"), "{}", stderr(&o));
    }
    let o = env.run(&["doctor"], b"");
    assert_eq!(code(&o), 4);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.lines().any(|l| l.starts_with("FAIL") && l.contains("rollback counter")), "{out}");
    // Inspection commands still run, and say the store is not to be trusted.
    assert_eq!(code(&env.run(&["list"], b"")), 4);
    // Writes are refused too: nothing is built on the old copy.
    let o = env.run(&["put", "github", "c"], b"x");
    assert_eq!(code(&o), 4, "{}", stderr(&o));
    // A plain upgrade does not accept it; the operator's explicit acceptance does.
    assert_eq!(code(&env.run(&["upgrade"], b"")), 4);
    ok(&env, &["upgrade", "--accept-current-state"], b"");
    assert_eq!(ok(&env, &["get", "github", "a"], b""), "ghp_OLD");
    let out = ok(&env, &["doctor"], b"");
    assert!(out.lines().any(|l| l.starts_with("ok") && l.contains("rollback counter")), "{out}");
    let audit = ok(&env, &["audit", "list"], b"");
    assert!(audit.contains("counter-accept"), "{audit}");
}

#[test]
fn an_interrupted_increment_is_finished_and_a_wrong_counter_refused() {
    let (env, label) = env_with_counter("rb-crash");
    ok(&env, &["init"], b"");
    ok(&env, &["put", "github", "a"], b"ghp_A");
    let v = counter_value(&label);
    // A writer committed and died before its increment: the store is one ahead.
    set_counter(&label, v - 1);
    assert!(!ok(&env, &["status", "github", "a"], b"").is_empty());
    assert_eq!(counter_value(&label), v, "the open finished the increment (status writes nothing)");
    assert_eq!(ok(&env, &["get", "github", "a"], b""), "ghp_A");
    let v = counter_value(&label);
    // The same, met by a write first.
    set_counter(&label, v - 1);
    ok(&env, &["put", "github", "b"], b"ghp_B");
    assert_eq!(counter_value(&label), v + 1);
    // A counter two behind was reset (or is not this store's); one ahead means the
    // file is older than the counter.
    for (value, says) in [(v - 1, "counter is behind"), (v + 3, "older than its counter")] {
        set_counter(&label, value);
        let o = env.run(&["get", "github", "a"], b"");
        assert_eq!(code(&o), 4, "{}", stderr(&o));
        assert!(stderr(&o).contains(says), "{value}: {}", stderr(&o));
    }
    // The counter object gone: refused, not silently unbound.
    let s = common::user_session();
    with_token_lock(|| {
        for h in counter_objects(&s, &label) {
            s.destroy_object(h).unwrap();
        }
    });
    let o = env.run(&["get", "github", "a"], b"");
    assert_eq!(code(&o), 4, "{}", stderr(&o));
    assert!(stderr(&o).contains("does not exist"), "{}", stderr(&o));
}

#[test]
fn binding_and_unbinding_are_explicit() {
    let env = TestEnv::new("rb-bind");
    ok(&env, &["init"], b"");
    ok(&env, &["put", "github", "a"], b"ghp_A");
    let out = ok(&env, &["doctor"], b"");
    assert!(out.lines().any(|l| l.starts_with("warn") && l.contains("rollback counter")), "{out}");
    // Configured later: the store must be bound by the operator first.
    let label = format!("ctr-{}", env.key_label);
    set_counter_label(&env, Some(&label));
    let o = env.run(&["get", "github", "a"], b"");
    assert_eq!(code(&o), 8, "{}", stderr(&o));
    assert!(stderr(&o).contains("not bound"), "{}", stderr(&o));
    // A copy from before the binding stays refused afterwards.
    let unbound_copy = std::fs::read(&env.store_path).unwrap();
    ok(&env, &["upgrade"], b"");
    assert_eq!(ok(&env, &["get", "github", "a"], b""), "ghp_A");
    assert!(ok(&env, &["audit", "list"], b"").contains("counter-bind"));
    let bound = std::fs::read(&env.store_path).unwrap();
    std::fs::write(&env.store_path, &unbound_copy).unwrap();
    // (The copy has no binding: it reads as a store never bound, exit 8, never as a
    // good store.)
    let o = env.run(&["get", "github", "a"], b"");
    assert_eq!(code(&o), 8, "{}", stderr(&o));
    std::fs::write(&env.store_path, &bound).unwrap();
    // Dropping the counter from the config does not silently unbind the store, and
    // no write goes around it (a revoke that did not move the anchor would let the
    // copy from before it pass for current).
    set_counter_label(&env, None);
    let o = env.run(&["get", "github", "a"], b"");
    assert_eq!(code(&o), 8, "{}", stderr(&o));
    assert!(stderr(&o).contains("no configured root offers it"), "{}", stderr(&o));
    let before = std::fs::read(&env.store_path).unwrap();
    let o = env.run(&["revoke", "github", "a", "--reason", "test"], b"");
    assert_ne!(code(&o), 0, "{}", stderr(&o));
    assert!(stderr(&o).contains("no configured root offers it"), "{}", stderr(&o));
    set_counter_label(&env, Some(&label));
    assert_eq!(ok(&env, &["get", "github", "a"], b""), "ghp_A", "the revoke did not happen");
    assert_eq!(std::fs::read(&env.store_path).unwrap().len(), before.len());
    set_counter_label(&env, None);
    // (Opened for inspection, a store that disagrees with its counter exits 4.)
    let o = env.run(&["upgrade"], b"");
    assert_eq!(code(&o), 4, "{}", stderr(&o));
    assert!(stderr(&o).contains("no configured root offers it"), "{}", stderr(&o));
    ok(&env, &["upgrade", "--accept-current-state"], b"");
    assert_eq!(ok(&env, &["get", "github", "a"], b""), "ghp_A");
}

#[test]
fn concurrent_writers_keep_the_counter_in_step() {
    let (env, label) = env_with_counter("rb-concurrent");
    ok(&env, &["init"], b"");
    let start = counter_value(&label);
    let writers: Vec<_> = (0..3)
        .map(|w| {
            let cfg = env.config_path.clone();
            let bin = env!("CARGO_BIN_EXE_tokenguard");
            std::thread::spawn(move || {
                for i in 0..8 {
                    let mut c = std::process::Command::new(bin);
                    c.env("TOKENGUARD_CONFIG", &cfg).args(["put", "github", &format!("w{w}-{i}")]);
                    let o = common::run_cmd(&mut c, format!("secret-{w}-{i}").as_bytes());
                    assert_eq!(code(&o), 0, "writer {w} put {i}: {}", stderr(&o));
                }
            })
        })
        .collect();
    // A reader meanwhile: an open that meets a writer between its commit and its
    // increment must never take that for a rollback (review finding 1).
    let reader = {
        let cfg = env.config_path.clone();
        let bin = env!("CARGO_BIN_EXE_tokenguard");
        std::thread::spawn(move || {
            for _ in 0..20 {
                let mut c = std::process::Command::new(bin);
                c.env("TOKENGUARD_CONFIG", &cfg).args(["list"]);
                let o = common::run_cmd(&mut c, b"");
                assert_eq!(code(&o), 0, "a reader beside the writers: {}", stderr(&o));
            }
        })
    };
    for w in writers {
        w.join().unwrap();
    }
    reader.join().unwrap();
    assert_eq!(counter_value(&label), start + 24, "one step per commit");
    let out = ok(&env, &["doctor"], b"");
    assert!(out.lines().any(|l| l.starts_with("ok") && l.contains("rollback counter")), "{out}");
    assert_eq!(ok(&env, &["get", "github", "w2-7"], b""), "secret-2-7");
}

/// The kills land anywhere, including SoftHSM2's login rewrite, which empties its
/// token file: so this test runs on a token of its own ([`common::own_token`]) and
/// repairs it as `doctor` says. Before, such a kill emptied the token the other tests
/// of this binary share, and they failed with "no token with label".
#[test]
fn writers_killed_at_any_moment_never_read_as_a_rollback() {
    let env = TestEnv::new("rb-kill");
    let hsm = common::own_token(&env);
    set_counter_label(&env, Some("ctr-rb-kill"));
    ok(&env, &["init"], b"");
    ok(&env, &["put", "github", "keep"], b"ghp_KEEP");
    let mut seed = u64::from(std::process::id());
    for i in 0..12 {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let delay = Duration::from_millis((seed >> 33) % 120);
        let mut child = env
            .cli()
            .args(["put", "github", &format!("k{i}")])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        {
            use std::io::Write;
            let _ = child.stdin.take().unwrap().write_all(b"v");
        }
        std::thread::sleep(delay);
        let _ = child.kill();
        let _ = child.wait();
        common::repair_if_emptied(&hsm, &format!("kill {i} at {delay:?}"));
        let o = env.run(&["get", "github", "keep"], b"");
        assert_eq!(
            (code(&o), o.stdout.as_slice()),
            (0, &b"ghp_KEEP"[..]),
            "after kill {i} at {delay:?}: {}",
            stderr(&o)
        );
    }
    let o = env.run(&["doctor"], b"");
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(code(&o), 0, "{out}");
    assert!(out.lines().any(|l| l.starts_with("ok") && l.contains("rollback counter")), "{out}");
}

/// A counter that exists already is never taken over silently (review finding 5): a
/// second store configured with the same counter cannot `init`, and a store put
/// back from before its binding cannot be bound again by a plain `upgrade`.
#[test]
fn an_existing_counter_is_not_taken_over() {
    let (env, label) = env_with_counter("rb-takeover");
    ok(&env, &["init"], b"");
    ok(&env, &["put", "github", "a"], b"ghp_A");
    let other = TestEnv::new("rb-takeover-2");
    set_counter_label(&other, Some(&label));
    let o = other.run(&["init"], b"");
    assert_eq!(code(&o), 8, "{}", stderr(&o));
    assert!(stderr(&o).contains("exists already"), "{}", stderr(&o));
    assert!(!other.store_path.exists(), "no half-made store is left behind");
    // The first store is untouched.
    assert_eq!(ok(&env, &["get", "github", "a"], b""), "ghp_A");

    // A store from before its binding, put back over a bound one: `upgrade` refuses to
    // bind it to the (existing) counter unless the operator accepts it.
    let unbound = TestEnv::new("rb-takeover-3");
    ok(&unbound, &["init"], b"");
    ok(&unbound, &["put", "github", "a"], b"ghp_PRE");
    let pre = std::fs::read(&unbound.store_path).unwrap();
    let label3 = format!("ctr-{}", unbound.key_label);
    set_counter_label(&unbound, Some(&label3));
    ok(&unbound, &["upgrade"], b"");
    ok(&unbound, &["put", "github", "a"], b"ghp_POST");
    std::fs::write(&unbound.store_path, &pre).unwrap();
    let o = unbound.run(&["upgrade"], b"");
    assert_ne!(code(&o), 0, "{}", stderr(&o));
    assert!(stderr(&o).contains("exists already"), "{}", stderr(&o));
    let o = unbound.run(&["get", "github", "a"], b"");
    assert_ne!(code(&o), 0);
    assert!(o.stdout.is_empty());
}

/// An increment is applied once even when it is retried (review finding 3): asked to
/// move the counter from a value it has left already, the counter stays where it is.
#[test]
fn a_retried_increment_is_not_applied_twice() {
    let (env, label) = env_with_counter("rb-retry");
    ok(&env, &["init"], b"");
    let v = counter_value(&label);
    let roots = env.config().build_roots(tokenguard::config::RootUse::Open).unwrap();
    let c = roots[0].counter().expect("the root offers its counter");
    assert_eq!(c.increment_counter(v).unwrap(), v + 1);
    // The same call again (a retry after a lost answer): no second step.
    assert_eq!(c.increment_counter(v).unwrap(), v + 1);
    assert_eq!(counter_value(&label), v + 1);
    // The store is now one behind the counter: an older copy, as far as anyone can
    // tell, and refused.
    let o = env.run(&["list"], b"");
    assert_eq!(code(&o), 4, "{}", stderr(&o));
}
