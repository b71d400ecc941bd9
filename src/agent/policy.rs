//! Who may ask the agent for what: the `[agent]` settings and their `[[agent.allow]]`
//! rules, resolved once (user and group names to ids, patterns compiled) so a request
//! is decided without touching the system's user database.
//!
//! Default deny: a request is served only if one rule names the caller (by uid, user,
//! gid or group), lists the operation, and, for an operation on a token, has a pattern
//! matching `provider/name`. `list` shows only the tokens the caller could `get` or
//! `list` through some rule.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::error::{Error, Result};

/// `[agent]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// The Unix socket (default `/run/tokenguard/agent.sock`). Created mode 0660;
    /// its directory, when the agent creates it, 0750.
    #[serde(default = "default_socket")]
    pub socket: PathBuf,
    /// Group owning the socket (default: the agent's own group).
    pub socket_group: Option<String>,
    /// Most connections served at once (default 256); more are refused with an error
    /// frame.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Most connections one uid may hold at once (default 32), so one local user
    /// cannot take every slot.
    #[serde(default = "default_max_connections_per_uid")]
    pub max_connections_per_uid: usize,
    /// Longest time to receive one request once its first byte arrived, and to send
    /// its response, in milliseconds (default 5000).
    #[serde(default = "default_request_timeout_ms")]
    pub request_timeout_ms: u64,
    /// Longest time an open connection may wait between requests, in milliseconds
    /// (default 60000).
    #[serde(default = "default_idle_timeout_ms")]
    pub idle_timeout_ms: u64,
    /// How reads are audited (default `durable`).
    #[serde(default)]
    pub read_audit: ReadAudit,
    /// Time the audit writer waits after an event for more to join its commit, in
    /// milliseconds (default 0: none; events that arrive while a commit runs go into
    /// the next one, which is batching enough under load, and a lone read does not
    /// wait for company).
    #[serde(default = "default_audit_linger_ms")]
    pub audit_linger_ms: u64,
    /// How often the read journal is folded into the store's audit chain, in
    /// milliseconds (default 1000). Every write folds it too, as does `audit` and a
    /// stop. It bounds how many journaled events a crash followed by an edit of the
    /// journal file could take out unseen (docs/DESIGN-NOTES.md, "The read journal").
    #[serde(default = "default_audit_fold_interval_ms")]
    pub audit_fold_interval_ms: u64,
    /// How often the agent refreshes due tokens of `[providers]`, seconds (default
    /// 60; 0: never, `refresh --due` or `get_fresh` only).
    #[serde(default = "default_refresh_interval_secs")]
    pub refresh_interval_secs: u64,
    /// Whether the CLI uses the agent (default true when `[agent]` is present);
    /// `--direct` overrides it per call.
    #[serde(default = "yes")]
    pub cli: bool,
    /// The rules; none means nobody is served.
    #[serde(default)]
    pub allow: Vec<AllowRule>,
}

/// How the agent audits reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ReadAudit {
    /// Each read's response waits until its audit event is committed durably (group
    /// commit: one commit serves every event waiting). Fail closed: no event, no
    /// secret.
    #[default]
    Durable,
    /// Events are committed in batches after the response is sent: a crash may lose
    /// the last few.
    Async,
    /// Reads are not audited (writes and refusals still are).
    Off,
}

/// One `[[agent.allow]]` rule.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AllowRule {
    /// User name of the caller.
    pub user: Option<String>,
    /// Uid of the caller.
    pub uid: Option<u32>,
    /// Group of the caller (primary, or supplementary as the kernel reports it).
    pub group: Option<String>,
    /// Gid of the caller (primary or supplementary).
    pub gid: Option<u32>,
    /// `provider/name` patterns (`*` matches within one part: `stripe/*`, `*/ci-bot`).
    #[serde(default)]
    pub tokens: Vec<String>,
    /// Operations: `get`, `get_fresh`, `list`, `status`, `put`, `delete`, `revoke`,
    /// `refresh`, `admin`.
    pub ops: Vec<String>,
    /// Requests per second or minute, per caller uid: `"50/s"`, `"600/m"`; absent:
    /// unlimited.
    pub rate: Option<String>,
    /// Burst above the rate (default twice the per-second rate, at least 1).
    pub burst: Option<u32>,
}

fn default_audit_fold_interval_ms() -> u64 {
    1000
}
fn default_socket() -> PathBuf {
    PathBuf::from("/run/tokenguard/agent.sock")
}
fn default_max_connections() -> usize {
    256
}
fn default_max_connections_per_uid() -> usize {
    32
}
fn default_request_timeout_ms() -> u64 {
    5000
}
fn default_idle_timeout_ms() -> u64 {
    60_000
}
fn default_audit_linger_ms() -> u64 {
    0
}
fn default_refresh_interval_secs() -> u64 {
    60
}
fn yes() -> bool {
    true
}

/// What a request asks to do, as rules name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    /// Read a token (any field, or the whole token set).
    Get,
    /// Read a token, refreshing it first when due.
    GetFresh,
    /// List tokens (only those the caller may see).
    List,
    /// A token's status and metadata.
    Status,
    /// Store a token.
    Put,
    /// Delete a token.
    Delete,
    /// Revoke a token.
    Revoke,
    /// Refresh a token now.
    Refresh,
    /// `stats`, `doctor`, `audit verify`, `lockdown`, `unlock`.
    Admin,
}

impl Op {
    const ALL: [(&'static str, Op); 9] = [
        ("get", Op::Get),
        ("get_fresh", Op::GetFresh),
        ("list", Op::List),
        ("status", Op::Status),
        ("put", Op::Put),
        ("delete", Op::Delete),
        ("revoke", Op::Revoke),
        ("refresh", Op::Refresh),
        ("admin", Op::Admin),
    ];

    /// The name rules use.
    pub fn as_str(self) -> &'static str {
        Op::ALL.iter().find(|(_, o)| *o == self).map_or("?", |(n, _)| n)
    }

    fn parse(s: &str) -> Option<Op> {
        Op::ALL.iter().find(|(n, _)| *n == s).map(|(_, o)| *o)
    }
}

/// Who is asking: the peer credentials of the connection.
#[derive(Debug, Clone)]
pub struct Caller {
    /// Uid (`SO_PEERCRED`).
    pub uid: u32,
    /// Primary gid (`SO_PEERCRED`).
    pub gid: u32,
    /// Pid (`SO_PEERCRED`).
    pub pid: i32,
    /// Supplementary groups (`SO_PEERGROUPS`).
    pub groups: Vec<u32>,
    /// The executable, from `/proc/PID/exe` when readable: for the audit trail
    /// only (a pid can be reused; it never decides anything).
    pub exe: Option<PathBuf>,
}

impl Caller {
    /// The audit actor: `agent-client uid=… gid=… pid=… exe="…"` (the path quoted
    /// and escaped: it is the client's choice).
    pub fn actor(&self) -> String {
        let exe = self.exe.as_ref().map(|p| format!(" exe={:?}", p.display().to_string())).unwrap_or_default();
        format!("agent-client uid={} gid={} pid={}{exe}", self.uid, self.gid, self.pid)
    }

    fn in_group(&self, gid: u32) -> bool {
        self.gid == gid || self.groups.contains(&gid)
    }
}

/// A compiled rule.
#[derive(Debug)]
struct Rule {
    uid: Option<u32>,
    gid: Option<u32>,
    patterns: Vec<glob::Pattern>,
    ops: Vec<Op>,
    /// Tokens per second and bucket size.
    rate: Option<(f64, f64)>,
}

impl Rule {
    fn names(&self, c: &Caller) -> bool {
        self.uid.is_none_or(|u| u == c.uid) && self.gid.is_none_or(|g| c.in_group(g))
    }

    fn covers(&self, provider: &str, name: &str) -> bool {
        let opts = glob::MatchOptions { case_sensitive: true, require_literal_separator: true, ..Default::default() };
        let target = format!("{provider}/{name}");
        self.patterns.iter().any(|p| p.matches_with(&target, opts))
    }
}

/// The decision on one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Served.
    Allow,
    /// No rule allows it.
    Refused,
    /// A rule allows it, but the caller is over its rate.
    Limited {
        /// How long until one more request would be allowed, milliseconds.
        retry_after_ms: u64,
    },
}

/// The compiled `[[agent.allow]]` rules, with the rate buckets of their callers.
#[derive(Debug)]
pub struct Policy {
    rules: Vec<Rule>,
    buckets: parking_lot::Mutex<HashMap<(usize, u32), (f64, Instant)>>,
}

impl Policy {
    /// Compiles the rules: names resolved to ids, patterns and rates parsed. Any
    /// mistake is a configuration error naming the rule.
    pub fn compile(rules: &[AllowRule]) -> Result<Policy> {
        let compiled = rules.iter().enumerate().map(|(i, r)| compile_rule(i, r)).collect::<Result<Vec<_>>>()?;
        Ok(Policy { rules: compiled, buckets: Default::default() })
    }

    /// Whether `c` may do `op`, on `token` when it is about one. A rule that allows
    /// it with a rate spends one request of the caller's bucket; the first rule that
    /// allows it without being over its rate decides.
    pub fn decide(&self, c: &Caller, op: Op, token: Option<(&str, &str)>) -> Decision {
        let mut limited = None;
        for (i, r) in self.rules.iter().enumerate() {
            if !r.names(c) || !r.ops.contains(&op) || token.is_some_and(|(p, n)| !r.covers(p, n)) {
                continue;
            }
            match r.rate {
                None => return Decision::Allow,
                Some((per_sec, burst)) => match self.spend(i, c.uid, per_sec, burst) {
                    Ok(()) => return Decision::Allow,
                    Err(wait) => limited = Some(limited.map_or(wait, |w: u64| w.min(wait))),
                },
            }
        }
        match limited {
            Some(retry_after_ms) => Decision::Limited { retry_after_ms },
            None => Decision::Refused,
        }
    }

    /// Whether `c` may see `provider/name` in a listing: a rule names it with `get`,
    /// `get_fresh` or `list` and a pattern that covers the token.
    pub fn may_see(&self, c: &Caller, provider: &str, name: &str) -> bool {
        self.rules.iter().any(|r| {
            r.names(c)
                && r.ops.iter().any(|o| matches!(o, Op::Get | Op::GetFresh | Op::List))
                && r.covers(provider, name)
        })
    }

    /// Takes one request from the bucket of (rule, uid); `Err`: milliseconds until
    /// one is there.
    fn spend(&self, rule: usize, uid: u32, per_sec: f64, burst: f64) -> Result<(), u64> {
        let now = Instant::now();
        let mut buckets = self.buckets.lock();
        let (level, at) = buckets.entry((rule, uid)).or_insert((burst, now));
        *level = (*level + now.duration_since(*at).as_secs_f64() * per_sec).min(burst);
        *at = now;
        if *level >= 1.0 {
            *level -= 1.0;
            Ok(())
        } else {
            let wait = Duration::from_secs_f64((1.0 - *level) / per_sec);
            Err(u64::try_from(wait.as_millis()).unwrap_or(u64::MAX).max(1))
        }
    }
}

fn compile_rule(i: usize, r: &AllowRule) -> Result<Rule> {
    let bad = |what: String| Error::Config(format!("[[agent.allow]] rule {}: {what}", i + 1));
    let uid = match (&r.user, r.uid) {
        (Some(_), Some(_)) => return Err(bad("give `user` or `uid`, not both".into())),
        (Some(name), None) => Some(
            nix::unistd::User::from_name(name)
                .ok()
                .flatten()
                .ok_or_else(|| bad(format!("no user named {name:?} on this system")))?
                .uid
                .as_raw(),
        ),
        (None, uid) => uid,
    };
    let gid = match (&r.group, r.gid) {
        (Some(_), Some(_)) => return Err(bad("give `group` or `gid`, not both".into())),
        (Some(name), None) => Some(
            nix::unistd::Group::from_name(name)
                .ok()
                .flatten()
                .ok_or_else(|| bad(format!("no group named {name:?} on this system")))?
                .gid
                .as_raw(),
        ),
        (None, gid) => gid,
    };
    if uid.is_none() && gid.is_none() {
        return Err(bad("name the caller with `user`, `uid`, `group` or `gid`".into()));
    }
    let ops = r
        .ops
        .iter()
        .map(|o| Op::parse(o).ok_or_else(|| bad(format!("unknown op {o:?} (ops: {})", op_names()))))
        .collect::<Result<Vec<_>>>()?;
    if ops.is_empty() {
        return Err(bad("`ops` is empty".into()));
    }
    let token_ops = ops.iter().any(|o| !matches!(o, Op::Admin));
    if token_ops && r.tokens.is_empty() {
        return Err(bad("`tokens` is empty: list the `provider/name` patterns it allows (\"*/*\" for all)".into()));
    }
    let patterns = r
        .tokens
        .iter()
        .map(|t| {
            if t.split('/').count() != 2 {
                return Err(bad(format!("token pattern {t:?} is not `provider/name`")));
            }
            glob::Pattern::new(t).map_err(|e| bad(format!("token pattern {t:?}: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let rate = r.rate.as_deref().map(|s| parse_rate(s, r.burst).map_err(bad)).transpose()?;
    Ok(Rule { uid, gid, patterns, ops, rate })
}

fn op_names() -> String {
    Op::ALL.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
}

/// `"N/s"` or `"N/m"` (N > 0) to (per second, bucket size).
fn parse_rate(s: &str, burst: Option<u32>) -> std::result::Result<(f64, f64), String> {
    let (n, unit) = s.split_once('/').ok_or_else(|| format!("rate {s:?} is not N/s or N/m"))?;
    let n: u32 = n.trim().parse().ok().filter(|n| *n > 0).ok_or_else(|| format!("rate {s:?}: N must be 1 or more"))?;
    let per_sec = match unit.trim() {
        "s" => f64::from(n),
        "m" => f64::from(n) / 60.0,
        other => return Err(format!("rate {s:?}: unit {other:?} is not s or m")),
    };
    let burst = match burst {
        Some(0) => return Err("burst must be 1 or more".into()),
        Some(b) => f64::from(b),
        None => (per_sec * 2.0).max(1.0),
    };
    Ok((per_sec, burst))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn rule(uid: u32, tokens: &[&str], ops: &[&str], rate: Option<&str>) -> AllowRule {
        AllowRule {
            user: None,
            uid: Some(uid),
            group: None,
            gid: None,
            tokens: tokens.iter().map(|s| s.to_string()).collect(),
            ops: ops.iter().map(|s| s.to_string()).collect(),
            rate: rate.map(str::to_string),
            burst: None,
        }
    }

    fn caller(uid: u32, gid: u32) -> Caller {
        Caller { uid, gid, pid: 1, groups: vec![], exe: None }
    }

    #[test]
    fn default_deny_and_patterns_stay_within_their_part() {
        let p = Policy::compile(&[rule(1000, &["stripe/*", "github/ci-bot"], &["get", "list"], None)]).unwrap();
        let c = caller(1000, 1000);
        assert_eq!(p.decide(&c, Op::Get, Some(("stripe", "live"))), Decision::Allow);
        assert_eq!(p.decide(&c, Op::Get, Some(("github", "ci-bot"))), Decision::Allow);
        assert_eq!(p.decide(&c, Op::Get, Some(("github", "other"))), Decision::Refused);
        assert_eq!(p.decide(&c, Op::Put, Some(("stripe", "live"))), Decision::Refused);
        assert_eq!(p.decide(&caller(1001, 1000), Op::Get, Some(("stripe", "live"))), Decision::Refused);
        assert_eq!(p.decide(&c, Op::Admin, None), Decision::Refused);
        // A pattern matches the whole `provider/name`, not a prefix of it.
        let q = Policy::compile(&[rule(1000, &["str*/ci"], &["get"], None)]).unwrap();
        assert_eq!(q.decide(&c, Op::Get, Some(("stripe", "ci"))), Decision::Allow);
        assert_eq!(q.decide(&c, Op::Get, Some(("stripe", "ci-2"))), Decision::Refused);
        assert_eq!(q.decide(&c, Op::Get, Some(("github", "ci"))), Decision::Refused);
        assert!(p.may_see(&c, "stripe", "live"));
        assert!(!p.may_see(&c, "github", "other"));
        assert!(Policy::compile(&[]).unwrap().decide(&c, Op::Get, Some(("a", "b"))) == Decision::Refused);
    }

    #[test]
    fn groups_match_primary_and_supplementary() {
        let mut r = rule(0, &["*/*"], &["get"], None);
        r.uid = None;
        r.gid = Some(500);
        let p = Policy::compile(&[r]).unwrap();
        assert_eq!(p.decide(&caller(7, 500), Op::Get, Some(("a", "b"))), Decision::Allow);
        let mut c = caller(7, 7);
        assert_eq!(p.decide(&c, Op::Get, Some(("a", "b"))), Decision::Refused);
        c.groups = vec![500];
        assert_eq!(p.decide(&c, Op::Get, Some(("a", "b"))), Decision::Allow);
    }

    #[test]
    fn rate_limits_per_uid_with_a_burst() {
        let p = Policy::compile(&[rule(1000, &["*/*"], &["get"], Some("2/s"))]).unwrap();
        let c = caller(1000, 1000);
        let t = Some(("a", "b"));
        // Burst 4 (twice the rate), then limited with a wait of about half a second.
        for _ in 0..4 {
            assert_eq!(p.decide(&c, Op::Get, t), Decision::Allow);
        }
        match p.decide(&c, Op::Get, t) {
            Decision::Limited { retry_after_ms } => assert!((1..=500).contains(&retry_after_ms), "{retry_after_ms}"),
            other => panic!("{other:?}"),
        }
        // Another uid has its own bucket (and is refused: no rule names it).
        assert_eq!(p.decide(&caller(1001, 1000), Op::Get, t), Decision::Refused);
    }

    #[test]
    fn mistakes_are_configuration_errors() {
        for (r, want) in [
            (rule(1, &["*/*"], &["gte"], None), "unknown op"),
            (rule(1, &[], &["get"], None), "`tokens` is empty"),
            (rule(1, &["stripe"], &["get"], None), "not `provider/name`"),
            (rule(1, &["*/*"], &["get"], Some("5/h")), "unit"),
            (rule(1, &["*/*"], &["get"], Some("0/s")), "1 or more"),
            (AllowRule { uid: None, ..rule(1, &["*/*"], &["get"], None) }, "name the caller"),
        ] {
            let e = Policy::compile(&[r]).unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        }
        // Admin alone needs no token patterns.
        Policy::compile(&[rule(1, &[], &["admin"], None)]).unwrap();
    }
}
