//! `tokenguard serve`: the process that owns the store, its hardware session and its
//! DEK cache, and answers clients on a Unix socket after checking who they are.
//!
//! - One listener thread polls the socket (so a stop or reload request is seen within
//!   a quarter second) and starts one thread per connection, at most
//!   `max_connections`; a connection over the limit gets an error frame and is closed.
//! - A connection thread reads a request (the first byte within `idle_timeout_ms`,
//!   the rest within `request_timeout_ms`), decides it against the policy, runs it,
//!   and answers. Frames that do not parse get an error frame; a frame over the limit,
//!   or one cut short, ends the connection.
//! - SIGTERM/SIGINT: the listener stops, requests in flight finish, the audit queue is
//!   committed, the socket is removed. SIGHUP: the `[[agent.allow]]` rules are read
//!   again from the config file (a broken file keeps the rules in force).

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use parking_lot::RwLock;
use serde_json::json;
use zeroize::Zeroizing;

use super::batch::{Batcher, Sink};
use super::policy::{AgentConfig, Caller, Decision, Op, Policy, ReadAudit};
use super::protocol::{self, FrameError, FrameReader, Request, Value, WireError};
use crate::audit::AuditRecord;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::guard::revoke::RevokeTarget;
use crate::guard::{GetOptions, GuardOptions, PutOptions, TokenGuard, validate_ident};
use crate::secret::{Secret, SecretBytes, TokenSet};

/// The running agent.
struct Agent {
    config: Config,
    config_path: PathBuf,
    settings: AgentConfig,
    guard_opts: GuardOptions,
    policy: RwLock<Arc<Policy>>,
    /// `None` in lockdown (shared with the audit writer).
    guard: Arc<RwLock<Option<TokenGuard>>>,
    batcher: Arc<Batcher>,
    connections: AtomicUsize,
    /// Open connections per uid.
    per_uid: parking_lot::Mutex<std::collections::HashMap<u32, usize>>,
    /// Requests being served.
    in_flight: AtomicUsize,
    /// Refusals each uid may still have audited (a token bucket: 10 a second, 20 at
    /// once); beyond it they are counted, and the count goes into the uid's next
    /// recorded refusal.
    refusal_budget: parking_lot::Mutex<std::collections::HashMap<u32, (f64, Instant, u64)>>,
    stopping: AtomicBool,
    started: Instant,
    served: AtomicU64,
    refused: AtomicU64,
    limited: AtomicU64,
    /// The listening socket came from systemd, which owns its file.
    activated: bool,
    /// Refusals made in lockdown, for the trail at unlock, and how many more there were.
    held: parking_lot::Mutex<(Vec<AuditRecord>, u64)>,
}

/// Refusals kept in memory during a lockdown, at most.
const HELD_MAX: usize = 1000;

/// Runs the agent in the foreground until SIGTERM or SIGINT. `config` is the loaded
/// configuration file at `config_path` (read again on SIGHUP for the rules); the store
/// is opened exclusively whatever its `mode` says; `opts` are the guard options
/// (its actor is the agent's own).
pub fn serve(mut config: Config, config_path: &Path, opts: GuardOptions) -> Result<()> {
    let settings = config.agent.clone().ok_or_else(|| {
        Error::Config("`tokenguard serve` needs an [agent] section (see hsm-config/agent.toml)".into())
    })?;
    let policy = Policy::compile(&settings.allow)?;
    if config.store.backend != crate::config::StoreBackend::Redb {
        // Its durable read audit must move under the fleet's lock, and a long-lived
        // guard must follow other hosts' root changes by itself: not built yet.
        return Err(Error::Config(
            "the agent does not serve a fleet store (backend = \"postgres\") yet; use the CLI or the library".into(),
        ));
    }
    config.store.mode = crate::store::StoreMode::Exclusive;
    // A socket systemd passed is taken before anything else opens a descriptor.
    let inherited = inherited_listener(&settings)?;
    let guard = config.open_guard_with(opts.clone())?;
    if settings.read_audit != ReadAudit::Off {
        guard.start_read_journal()?;
    }
    let activated = inherited.is_some();
    let listener = match inherited {
        Some(l) => l,
        None => bind(&settings)?,
    };
    let guard = Arc::new(RwLock::new(Some(guard)));
    let for_audit = guard.clone();
    let sink: Sink =
        Arc::new(move |events: &[AuditRecord]| for_audit.read().clone().map(|g| g.audit_journaled(events)));
    let patience = request_timeout(&settings).saturating_mul(2).saturating_add(Duration::from_secs(10));
    // The read journal joins the store's chain at least this often, busy or idle.
    let for_fold = guard.clone();
    let fold: Box<dyn Fn() + Send + Sync> = Box::new(move || {
        if let Some(g) = for_fold.read().clone()
            && let Err(e) = g.fold_journal()
        {
            tracing::error!(error = %e, "the read journal was not folded into the store");
        }
    });
    let tick = (Duration::from_millis(settings.audit_fold_interval_ms.max(1)), fold);
    let batcher = Batcher::start(sink, Duration::from_millis(settings.audit_linger_ms), patience, Some(tick))?;
    let agent = Arc::new(Agent {
        guard,
        config,
        config_path: config_path.to_path_buf(),
        guard_opts: opts,
        policy: RwLock::new(Arc::new(policy)),
        batcher,
        connections: AtomicUsize::new(0),
        per_uid: Default::default(),
        in_flight: AtomicUsize::new(0),
        refusal_budget: Default::default(),
        stopping: AtomicBool::new(false),
        started: Instant::now(),
        served: AtomicU64::new(0),
        refused: AtomicU64::new(0),
        limited: AtomicU64::new(0),
        activated,
        held: Default::default(),
        settings,
    });
    let out = run(&agent, &listener);
    tracing::info!("agent stopped");
    out
}

fn run(agent: &Arc<Agent>, listener: &UnixListener) -> Result<()> {
    crate::signals::serve_mode();
    tracing::info!(
        socket = %agent.settings.socket.display(),
        rules = agent.settings.allow.len(),
        read_audit = ?agent.settings.read_audit,
        socket_activated = agent.activated,
        "agent listening"
    );
    listener.set_nonblocking(true).map_err(io("setting the socket non-blocking", &agent.settings.socket))?;
    let refresher = start_refresh_scheduler(agent);
    loop {
        if crate::signals::stop_requested() {
            break;
        }
        if crate::signals::reload_requested() {
            agent.reload();
        }
        let ready = {
            let mut fds = [nix::poll::PollFd::new(listener.as_fd(), nix::poll::PollFlags::POLLIN)];
            nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(250u16)).unwrap_or(0)
        };
        if ready == 0 {
            continue;
        }
        match listener.accept() {
            Ok((stream, _)) => agent.admit(stream),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => {
                // EMFILE and the like: the listener stays; the client sees a refusal.
                tracing::warn!(error = %e, "accepting a connection failed");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
    tracing::info!("stopping: no new connections; finishing the requests in flight");
    agent.stopping.store(true, Ordering::SeqCst);
    if !agent.activated {
        let _ = std::fs::remove_file(&agent.settings.socket);
    }
    let deadline = Instant::now() + agent.request_timeout() + Duration::from_secs(1);
    while agent.connections.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    agent.batcher.stop();
    drop(refresher);
    if let Some(g) = agent.guard.write().take() {
        // Nothing is lost if this fails (the next open folds the journal), but a
        // clean stop leaves the whole trail in the store.
        if let Err(e) = g.fold_journal() {
            tracing::error!(error = %e, "the read journal was not folded at stop; the next open folds it");
        }
        g.clear_dek_cache();
    }
    Ok(())
}

/// Creates the socket: its directory 0750 if missing, the socket 0660 (group
/// `socket_group` when set). A live agent on the path is an error; a stale socket
/// file is replaced; anything else on the path is left alone and is an error.
fn bind(s: &AgentConfig) -> Result<UnixListener> {
    let path = &s.socket;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        && !dir.exists()
    {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o750)
            .create(dir)
            .map_err(io("creating the socket directory", dir))?;
    }
    check_socket_dir(path)?;
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if !meta.file_type().is_socket() {
            return Err(Error::Config(format!("{} exists and is not a socket; not replacing it", path.display())));
        }
        if UnixStream::connect(path).is_ok() {
            return Err(Error::Config(format!("an agent already answers at {}", path.display())));
        }
        std::fs::remove_file(path).map_err(io("removing a stale socket", path))?;
    }
    // The socket is born 0660: no moment where anyone else could connect.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o117));
    let bound = UnixListener::bind(path);
    nix::sys::stat::umask(old);
    let listener = bound.map_err(io("binding the agent socket", path))?;
    if let Some(group) = &s.socket_group {
        let gid = nix::unistd::Group::from_name(group)
            .ok()
            .flatten()
            .ok_or_else(|| Error::Config(format!("[agent] socket_group: no group named {group:?}")))?
            .gid;
        nix::unistd::chown(path, None, Some(gid))
            .map_err(|e| io("setting the socket's group", path)(std::io::Error::from(e)))?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .map_err(io("setting the socket's mode", path))?;
    Ok(listener)
}

/// Refuses a socket whose directory others may write: whoever may write it may put
/// their own socket (or a symlink) where the agent and its clients look.
fn check_socket_dir(path: &Path) -> Result<()> {
    let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) else { return Ok(()) };
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(dir).map_err(io("reading the socket directory", dir))?;
    let me = nix::unistd::geteuid().as_raw();
    if meta.mode() & 0o022 != 0 || (meta.uid() != me && meta.uid() != 0) {
        return Err(Error::Config(format!(
            "the socket directory {} is writable by others or owned by another user; use a directory of the \
             agent's own (0750, as `tokenguard serve` makes it when it is missing)",
            dir.display()
        )));
    }
    Ok(())
}

/// The first descriptor systemd passes (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: i32 = 3;

/// The listening socket systemd passed to this process (socket activation:
/// `LISTEN_PID` names this process and `LISTEN_FDS` is 1), checked to be a listening
/// Unix stream socket at `[agent] socket`; `None` without socket activation. Taken
/// at most once per process.
#[allow(unsafe_code)]
fn inherited_listener(s: &AgentConfig) -> Result<Option<UnixListener>> {
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::sync::atomic::AtomicBool;
    static TAKEN: AtomicBool = AtomicBool::new(false);
    let (Ok(pid), Ok(fds)) = (std::env::var("LISTEN_PID"), std::env::var("LISTEN_FDS")) else {
        return Ok(None);
    };
    if pid.trim().parse::<u32>().ok() != Some(std::process::id()) {
        return Ok(None);
    }
    let bad = |why: String| Error::Config(format!("socket activation: {why}"));
    match fds.trim().parse::<u32>() {
        Ok(1) => {}
        Ok(0) => return Ok(None),
        _ => {
            return Err(bad(format!(
                "systemd passed LISTEN_FDS={fds:?}; tokenguard.socket must have exactly one ListenStream="
            )));
        }
    }
    if TAKEN.swap(true, Ordering::SeqCst) {
        return Err(bad("the passed socket was taken already".into()));
    }
    // Through /proc: whether descriptor 3 is open, and a socket, before owning it.
    let sock = std::fs::metadata(format!("/proc/self/fd/{LISTEN_FDS_START}"))
        .map_err(|e| bad(format!("descriptor {LISTEN_FDS_START} is not open: {e}")))?;
    if !std::os::unix::fs::FileTypeExt::is_socket(&sock.file_type()) {
        return Err(bad(format!("descriptor {LISTEN_FDS_START} is not a socket")));
    }
    // SAFETY: systemd passed descriptor 3 to this process for it to own (LISTEN_PID is
    // this process, LISTEN_FDS is 1); it is open (its /proc entry is), and TAKEN makes
    // sure it gets exactly one owner.
    let fd = unsafe { OwnedFd::from_raw_fd(LISTEN_FDS_START) };
    use nix::sys::socket::{SockType, getsockname, getsockopt, sockopt};
    let ty = getsockopt(&fd, sockopt::SockType).map_err(|e| bad(format!("reading its type: {e}")))?;
    let listening = getsockopt(&fd, sockopt::AcceptConn).map_err(|e| bad(format!("reading its state: {e}")))?;
    let addr = getsockname::<nix::sys::socket::UnixAddr>(std::os::fd::AsRawFd::as_raw_fd(&fd))
        .map_err(|_| bad("it is not a Unix socket (ListenStream= must be a path)".into()))?;
    if ty != SockType::Stream || !listening {
        return Err(bad("it is not a listening stream socket (ListenStream=, Accept=no)".into()));
    }
    let Some(path) = addr.path() else {
        return Err(bad("it has no path (an abstract socket); ListenStream= must be a path".into()));
    };
    if path != s.socket {
        return Err(bad(format!(
            "systemd listens at {} but [agent] socket is {}; clients find the agent by the latter, so make them one",
            path.display(),
            s.socket.display()
        )));
    }
    check_socket_dir(path)?;
    nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC))
        .map_err(|e| bad(format!("setting close-on-exec: {e}")))?;
    Ok(Some(UnixListener::from(fd)))
}

fn io(operation: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.to_path_buf();
    move |source| Error::Io { operation, path, source }
}

/// The peer credentials of a connection: uid, gid and pid (`SO_PEERCRED`) and the
/// supplementary groups (`SO_PEERGROUPS`), all as the kernel recorded them when the
/// client connected; the executable from `/proc`, for the audit trail only (a pid
/// can be reused, so it never decides anything).
fn caller_of(stream: &UnixStream) -> Result<Caller> {
    let cred = nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::PeerCredentials)
        .map_err(|e| Error::Io { operation: "reading peer credentials", path: "-".into(), source: e.into() })?;
    let pid = cred.pid();
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok();
    Ok(Caller { uid: cred.uid(), gid: cred.gid(), pid, groups: peer_groups(stream)?, exe })
}

/// `SO_PEERGROUPS`: the supplementary groups of the peer when it connected.
#[allow(unsafe_code)]
fn peer_groups(stream: &UnixStream) -> Result<Vec<u32>> {
    use std::os::fd::AsRawFd;
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    for _ in 0..2 {
        let mut len = libc::socklen_t::try_from(groups.len() * std::mem::size_of::<libc::gid_t>()).unwrap_or(0);
        // SAFETY: getsockopt writes at most `len` bytes into `groups`' buffer, which
        // holds that many, and sets `len` to the size it wrote or needs.
        let rc = unsafe {
            libc::getsockopt(
                stream.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let n = usize::try_from(len).unwrap_or(0) / std::mem::size_of::<libc::gid_t>();
        if rc == 0 {
            groups.truncate(n);
            return Ok(groups);
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ERANGE) || n <= groups.len() {
            return Err(Error::Io { operation: "reading the peer's groups", path: "-".into(), source: e });
        }
        groups = vec![0; n];
    }
    Err(Error::Io {
        operation: "reading the peer's groups",
        path: "-".into(),
        source: std::io::Error::other("the group list kept growing"),
    })
}

/// Refresh due tokens in the background, every `refresh_interval_secs`.
fn start_refresh_scheduler(agent: &Arc<Agent>) -> Option<std::thread::JoinHandle<()>> {
    let every = Duration::from_secs(agent.settings.refresh_interval_secs);
    if every.is_zero() || agent.config.providers.is_empty() {
        return None;
    }
    let a = agent.clone();
    std::thread::Builder::new()
        .name("agent-refresh".into())
        .spawn(move || {
            let mut next = Instant::now();
            while !a.stopping.load(Ordering::SeqCst) {
                if Instant::now() >= next {
                    // A pass counts as a request in flight: a lockdown waits for it.
                    let _pass = InFlight::enter(&a.in_flight);
                    if let Some(g) = a.guard.read().clone() {
                        match g.refresh_due(None) {
                            Ok(outcomes) => {
                                for o in outcomes {
                                    tracing::info!(provider = %o.provider, name = %o.name, outcome = o.outcome.as_str(), "scheduled refresh");
                                }
                            }
                            Err(e) => tracing::warn!(error = %e, "scheduled refresh pass failed"),
                        }
                    }
                    next = Instant::now() + every;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        })
        .ok()
}

/// Reads from a socket whose reads wake every quarter second, giving up at `until`.
struct Deadline<'a> {
    s: &'a mut UnixStream,
    until: Instant,
}

impl Read for Deadline<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            if Instant::now() >= self.until {
                return Err(std::io::Error::from(std::io::ErrorKind::TimedOut));
            }
            match self.s.read(buf) {
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                other => return other,
            }
        }
    }
}

/// A connection's place in the agent's and its uid's limits, given back on drop.
struct ConnSlot {
    agent: Arc<Agent>,
    uid: u32,
}

impl ConnSlot {
    fn take(agent: &Arc<Agent>, uid: u32) -> Option<ConnSlot> {
        let mut per_uid = agent.per_uid.lock();
        let mine = per_uid.entry(uid).or_insert(0);
        if *mine >= agent.settings.max_connections_per_uid
            || agent.connections.load(Ordering::SeqCst) >= agent.settings.max_connections
        {
            if *mine == 0 {
                per_uid.remove(&uid);
            }
            return None;
        }
        *mine += 1;
        agent.connections.fetch_add(1, Ordering::SeqCst);
        Some(ConnSlot { agent: agent.clone(), uid })
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        let mut per_uid = self.agent.per_uid.lock();
        if let Some(n) = per_uid.get_mut(&self.uid) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                per_uid.remove(&self.uid);
            }
        }
        self.agent.connections.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A request being served (lockdown waits for them), counted on drop too.
struct InFlight<'a>(&'a AtomicUsize);

impl<'a> InFlight<'a> {
    fn enter(n: &'a AtomicUsize) -> Self {
        n.fetch_add(1, Ordering::SeqCst);
        InFlight(n)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// `request_timeout_ms`, between 1 ms and an hour.
fn request_timeout(s: &AgentConfig) -> Duration {
    Duration::from_millis(s.request_timeout_ms.clamp(1, 3_600_000))
}

/// The wire form of an error, with its retry hint.
fn wire(e: &Error) -> WireError {
    WireError::of(e)
}

type Reply = Zeroizing<Vec<u8>>;

fn reply<T: serde::Serialize>(id: Option<u64>, r: Result<T>) -> Reply {
    protocol::encode(id, r.map_err(|e| wire(&e)))
}

impl Agent {
    fn request_timeout(&self) -> Duration {
        request_timeout(&self.settings)
    }

    fn reload(&self) {
        let fresh = Config::load(&self.config_path).and_then(|c| {
            let s = c.agent.ok_or_else(|| Error::Config("the [agent] section is gone".into()))?;
            Policy::compile(&s.allow).map(|p| (p, s.allow.len()))
        });
        match fresh {
            Ok((p, n)) => {
                *self.policy.write() = Arc::new(p);
                tracing::info!(rules = n, "access rules reloaded");
            }
            Err(e) => tracing::error!(error = %e, "reloading the access rules failed; the old rules stay in force"),
        }
    }

    /// Takes a new connection: a thread of its own, or an error frame when the agent
    /// or the caller's uid is at its limit.
    fn admit(self: &Arc<Self>, mut stream: UnixStream) {
        let _ = stream.set_nonblocking(false);
        let _ = stream.set_write_timeout(Some(self.request_timeout()));
        // Reads wake every quarter second, so deadlines and a stop are seen.
        let _ = stream.set_read_timeout(Some(Duration::from_millis(250)));
        let refuse = |stream: &mut UnixStream, msg: &str| {
            let e = Error::AgentUnavailable { socket: self.settings.socket.clone(), detail: msg.into() };
            let _ = stream.write_all(&reply::<()>(None, Err(e)));
        };
        let caller = match caller_of(&stream) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "connection without peer credentials closed");
                return;
            }
        };
        let Some(slot) = ConnSlot::take(self, caller.uid) else {
            tracing::warn!(uid = caller.uid, pid = caller.pid, "connection refused: too many connections");
            refuse(&mut stream, "too many connections; retry shortly");
            return;
        };
        let a = self.clone();
        let spawned = std::thread::Builder::new().name("agent-conn".into()).spawn(move || {
            // Released however the thread ends.
            let _slot = slot;
            a.connection(stream, &caller);
        });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "connection refused: no thread for it");
        }
    }

    fn connection(&self, mut stream: UnixStream, caller: &Caller) {
        tracing::debug!(uid = caller.uid, pid = caller.pid, "client connected");
        let mut frames = FrameReader::new(protocol::MAX_REQUEST);
        loop {
            if !self.await_request(&mut stream, &mut frames) {
                return;
            }
            // The whole rest of the request within request_timeout_ms, however slowly
            // its bytes trickle in.
            let mut rest = Deadline { s: &mut stream, until: Instant::now() + self.request_timeout() };
            let body = match frames.next(&mut rest) {
                Ok(Some(b)) => b,
                Ok(None) => return,
                Err(FrameError::BadLength(n)) => {
                    tracing::warn!(uid = caller.uid, pid = caller.pid, len = n, "frame over the limit; closing");
                    let e = Error::InvalidInput(format!(
                        "a request frame of {n} bytes (limit {} bytes, and not empty)",
                        protocol::MAX_REQUEST
                    ));
                    let _ = stream.write_all(&reply::<()>(None, Err(e)));
                    return;
                }
                Err(FrameError::Truncated | FrameError::Io(_)) => {
                    tracing::debug!(uid = caller.uid, pid = caller.pid, "request cut short or too slow; closing");
                    return;
                }
            };
            let out = match serde_json::from_slice::<Request>(&body) {
                Ok(req) => self.handle(caller, req),
                Err(e) => reply::<()>(
                    None,
                    Err(Error::InvalidInput(format!(
                        "a request that is not valid JSON for the protocol ({})",
                        protocol::json_problem(&e)
                    ))),
                ),
            };
            drop(body);
            // The answer first, then the request's bytes off the socket (see
            // FrameReader::peek).
            if stream.write_all(&out).is_err() || frames.settle(&mut stream).is_err() {
                return;
            }
        }
    }

    /// Waits until bytes of the next request are buffered (the socket's reads wake
    /// every quarter second, so a stop is seen); false: closed, idle too long, or
    /// stopping.
    fn await_request(&self, stream: &mut UnixStream, frames: &mut FrameReader) -> bool {
        let until = Instant::now() + Duration::from_millis(self.settings.idle_timeout_ms.max(1));
        loop {
            if self.stopping.load(Ordering::SeqCst) {
                return false;
            }
            if frames.has_buffered() {
                return true;
            }
            match frames.peek(stream) {
                Ok(0) => return false,
                Ok(_) => return true,
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                    if Instant::now() >= until {
                        return false;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
    }

    fn handle(&self, caller: &Caller, req: Request) -> Reply {
        let id = req.id;
        if req.v != protocol::VERSION {
            return reply::<()>(
                id,
                Err(Error::InvalidInput(format!(
                    "protocol version {} is not spoken here (this agent speaks {})",
                    req.v,
                    protocol::VERSION
                ))),
            );
        }
        let _in_flight = InFlight::enter(&self.in_flight);
        match self.dispatch(caller, req) {
            Ok(r) => {
                self.served.fetch_add(1, Ordering::Relaxed);
                r
            }
            Err(e) => reply::<()>(id, Err(e)),
        }
    }

    fn guard(&self) -> Result<TokenGuard> {
        self.guard.read().clone().ok_or(Error::Locked)
    }

    /// Decides `op` (on `token`) for `caller`; a refusal is audited (without waiting
    /// for its commit) and logged.
    fn allow(&self, caller: &Caller, op: Op, token: Option<(&str, &str)>) -> Result<()> {
        let decision = self.policy.read().decide(caller, op, token);
        let (p, n) = token.unwrap_or(("", ""));
        let (outcome, err) = match decision {
            Decision::Allow => return Ok(()),
            Decision::Refused => {
                self.refused.fetch_add(1, Ordering::Relaxed);
                let target = token.map_or_else(|| "the agent".to_string(), |(p, n)| format!("{p}/{n}"));
                ("refused", Error::Refused { op: op.as_str().into(), target })
            }
            Decision::Limited { retry_after_ms } => {
                self.limited.fetch_add(1, Ordering::Relaxed);
                ("rate-limited", Error::RateLimited { retry_after_ms })
            }
        };
        // Refusals are audited and logged, but one caller cannot flood the trail
        // (and fill the disk every durable read needs): beyond its budget they are
        // counted, and the count is logged.
        let suppressed = {
            let now = Instant::now();
            let mut b = self.refusal_budget.lock();
            if b.len() > 4096 {
                b.retain(|_, (_, at, _)| now.duration_since(*at) < Duration::from_secs(60));
            }
            let (level, at, dropped) = b.entry(caller.uid).or_insert((20.0, now, 0));
            *level = (*level + now.duration_since(*at).as_secs_f64() * 10.0).min(20.0);
            *at = now;
            if *level >= 1.0 {
                *level -= 1.0;
                std::mem::take(dropped)
            } else {
                *dropped += 1;
                u64::MAX
            }
        };
        if suppressed != u64::MAX {
            tracing::warn!(
                uid = caller.uid,
                pid = caller.pid,
                op = op.as_str(),
                provider = p,
                name = n,
                outcome,
                not_audited_before = suppressed,
                "request not served"
            );
            let detail = if suppressed > 0 {
                format!("{suppressed} earlier refusals of this uid over its audit budget were not recorded")
            } else {
                String::new()
            };
            let record = AuditRecord {
                actor: caller.actor(),
                op: format!("agent-{}", op.as_str()),
                provider: p.into(),
                name: n.into(),
                outcome: outcome.into(),
                detail,
            };
            // In lockdown there is no key to extend the chain with: the refusal is
            // kept in memory and recorded at unlock.
            let guard = self.guard.read();
            if guard.is_some() {
                self.batcher.push(record);
            } else {
                self.hold(record);
            }
        }
        Err(err)
    }

    /// Audits a read of `provider/name` with `outcome` as `read_audit` says; in
    /// durable mode, returns only once the event is committed.
    fn audit_read<T>(
        &self,
        caller: &Caller,
        op: &'static str,
        provider: &str,
        name: &str,
        res: &Result<T>,
    ) -> Result<()> {
        if self.settings.read_audit == ReadAudit::Off {
            return Ok(());
        }
        let outcome = crate::audit::read_outcome(res);
        let e = AuditRecord {
            actor: caller.actor(),
            op: op.into(),
            provider: provider.into(),
            name: name.into(),
            outcome: outcome.into(),
            detail: String::new(),
        };
        match self.settings.read_audit {
            ReadAudit::Durable => self.batcher.record(e).map_err(|e| {
                tracing::error!(error = %e, "a read was not served: its audit event was not committed");
                e
            }),
            _ => {
                self.batcher.push(e);
                Ok(())
            }
        }
    }

    fn dispatch(&self, caller: &Caller, mut req: Request) -> Result<Reply> {
        let id = req.id;
        let op = req.op.clone();
        let token = || -> Result<(String, String)> {
            let p = req.provider.clone().ok_or_else(|| Error::InvalidInput(format!("{op} needs `provider`")))?;
            let n = req.name.clone().ok_or_else(|| Error::InvalidInput(format!("{op} needs `name`")))?;
            validate_ident("provider", &p)?;
            validate_ident("name", &n)?;
            Ok((p, n))
        };
        match op.as_str() {
            "ping" => Ok(reply(
                id,
                Ok(json!({
                    "agent": env!("CARGO_PKG_VERSION"),
                    "protocol": protocol::VERSION,
                    "locked": self.guard.read().is_none(),
                    "read_audit": self.settings.read_audit,
                })),
            )),
            "get" | "get_fresh" => {
                let (p, n) = token()?;
                let kind = if op == "get" { Op::Get } else { Op::GetFresh };
                self.allow(caller, kind, Some((&p, &n)))?;
                let g = self.guard()?;
                let res = if kind == Op::Get {
                    g.get_field(&p, &n, req.field.as_deref(), GetOptions { allow_expired: req.allow_expired })
                        .map(|(v, m)| (v, Some(m)))
                } else {
                    g.on_behalf_of(&caller.actor(), |g| g.get_fresh(&p, &n)).and_then(|s| {
                        let v = s.field(req.field.as_deref()).map(|v| SecretBytes::from_slice(v.expose())).ok_or_else(
                            || Error::NoSuchField {
                                provider: p.clone(),
                                name: n.clone(),
                                field: req.field.clone().unwrap_or_else(|| "access_token".into()),
                            },
                        )?;
                        Ok((v, None))
                    })
                };
                let audit_op = if kind == Op::Get { "agent-get" } else { "agent-get_fresh" };
                self.audit_read(caller, audit_op, &p, &n, &res)?;
                let (value, meta) = res?;
                let meta = meta.filter(|_| req.meta);
                #[derive(serde::Serialize)]
                struct Out<'a> {
                    provider: &'a str,
                    name: &'a str,
                    field: Option<&'a str>,
                    value: protocol::WireSecret,
                    encoding: protocol::Encoding,
                    meta: Option<crate::Metadata>,
                }
                let value = protocol::WireSecret(value);
                let encoding = value.encoding();
                let out = Out { provider: &p, name: &n, field: req.field.as_deref(), value, encoding, meta };
                Ok(reply(id, Ok(out)))
            }
            "token_set" => {
                let (p, n) = token()?;
                self.allow(caller, Op::Get, Some((&p, &n)))?;
                let g = self.guard()?;
                let res =
                    g.get_with(&p, &n, GetOptions { allow_expired: req.allow_expired }).and_then(|(s, m)| match s {
                        Secret::TokenSet(set) => Ok((set, m)),
                        Secret::Raw(_) => {
                            Err(Error::InvalidInput(format!("{p}/{n} is a raw secret, not a token set; use get")))
                        }
                    });
                self.audit_read(caller, "agent-token_set", &p, &n, &res)?;
                let (set, meta) = res?;
                let meta = Some(meta).filter(|_| req.meta);
                #[derive(serde::Serialize)]
                struct Out<'a> {
                    provider: &'a str,
                    name: &'a str,
                    fields: std::collections::BTreeMap<&'a str, Value>,
                    meta: Option<crate::Metadata>,
                }
                let fields = set.iter().map(|(k, v)| (k, Value::of(SecretBytes::from_slice(v.expose())))).collect();
                Ok(reply(id, Ok(Out { provider: &p, name: &n, fields, meta })))
            }
            "list" => {
                if let Some(p) = &req.provider {
                    validate_ident("provider", p)?;
                }
                self.allow(caller, Op::List, None)?;
                let g = self.guard()?;
                let policy = self.policy.read().clone();
                let mut r = g.list_report(req.provider.as_deref())?;
                r.tokens.retain(|t| policy.may_see(caller, &t.provider, &t.name));
                r.damaged.retain(|d| d.split_once('/').is_some_and(|(p, n)| policy.may_see(caller, p, n)));
                Ok(reply(id, Ok(json!({"tokens": r.tokens, "damaged": r.damaged}))))
            }
            "status" => {
                let (p, n) = token()?;
                self.allow(caller, Op::Status, Some((&p, &n)))?;
                let st = self.guard()?.status(&p, &n)?;
                let mut v = serde_json::to_value(&st).unwrap_or_default();
                if let Some(o) = v.as_object_mut() {
                    o.insert("provider".into(), p.into());
                    o.insert("name".into(), n.into());
                }
                Ok(reply(id, Ok(v)))
            }
            "put" => {
                let (p, n) = token()?;
                self.allow(caller, Op::Put, Some((&p, &n)))?;
                let secret = match (req.value.take(), req.token_set.take()) {
                    (Some(v), None) => Secret::Raw(v.decode(req.encoding).map_err(Error::InvalidInput)?),
                    (None, Some(fields)) => {
                        let mut set = TokenSet::new();
                        for (k, v) in fields {
                            set.insert(k, v.0);
                        }
                        Secret::TokenSet(set)
                    }
                    _ => return Err(Error::InvalidInput("put needs exactly one of `value` and `token_set`".into())),
                };
                let opts = PutOptions {
                    expires_at: req.expires_at,
                    labels: std::mem::take(&mut req.labels),
                    token_type: req.token_type.take(),
                    scopes: std::mem::take(&mut req.scopes),
                };
                let g = self.guard()?;
                let (meta, replaced) =
                    g.on_behalf_of(&caller.actor(), |g| g.put_checked(&p, &n, secret, opts, req.overwrite))?;
                Ok(reply(id, Ok(json!({"stored": {"provider": p, "name": n, "replaced": replaced, "meta": meta}}))))
            }
            "delete" => {
                let (p, n) = token()?;
                self.allow(caller, Op::Delete, Some((&p, &n)))?;
                let g = self.guard()?;
                g.on_behalf_of(&caller.actor(), |g| g.delete(&p, &n))?;
                Ok(reply(id, Ok(json!({"deleted": {"provider": p, "name": n}}))))
            }
            "revoke" => {
                let (p, n) = token()?;
                self.allow(caller, Op::Revoke, Some((&p, &n)))?;
                let reason = req.reason.clone().unwrap_or_default();
                let g = self.guard()?;
                if let Ok(crate::guard::revoke::TokenStatus::Revoked { tombstone }) = g.status(&p, &n) {
                    let already = json!([{"provider": p, "name": n}]);
                    return Ok(reply(
                        id,
                        Ok(json!({"revoked": [], "already_revoked": already, "tombstone": tombstone})),
                    ));
                }
                let r = g.on_behalf_of(&caller.actor(), |g| {
                    self.config.revoke(g, RevokeTarget::One { provider: &p, name: &n }, &reason)
                })?;
                let warnings: Vec<String> = r
                    .upstream
                    .iter()
                    .map(|u| match &u.outcome {
                        crate::compose::UpstreamOutcome::Accepted => {
                            format!("provider revocation endpoint accepted the {}", u.hint)
                        }
                        crate::compose::UpstreamOutcome::Refused => format!(
                            "warning: provider revocation endpoint refused the {}; revoking locally anyway",
                            u.hint
                        ),
                        crate::compose::UpstreamOutcome::Failed(e) => {
                            format!("warning: provider revocation failed ({e}); revoking locally anyway")
                        }
                    })
                    .collect();
                let done: Vec<_> = r.revoked.into_iter().map(|(p, n)| json!({"provider": p, "name": n})).collect();
                Ok(reply(id, Ok(json!({"revoked": done, "notes": warnings}))))
            }
            "refresh" => {
                let (p, n) = token()?;
                self.allow(caller, Op::Refresh, Some((&p, &n)))?;
                let g = self.guard()?;
                let (_, outcome) = g.on_behalf_of(&caller.actor(), |g| g.refresh_now(&p, &n))?;
                Ok(reply(id, Ok(outcome)))
            }
            "stats" => {
                self.allow(caller, Op::Admin, None)?;
                let s = self.guard()?.stats()?;
                Ok(reply(id, Ok(json!({"store": s, "agent": self.agent_stats()}))))
            }
            "doctor" => {
                self.allow(caller, Op::Admin, None)?;
                let mut checks = self.guard()?.doctor();
                checks.push(self.read_audit_check());
                Ok(reply(id, Ok(checks)))
            }
            "audit_verify" => {
                self.allow(caller, Op::Admin, None)?;
                Ok(reply(id, Ok(self.guard()?.audit_verify()?)))
            }
            "lockdown" => {
                self.allow(caller, Op::Admin, None)?;
                let audited = self.lockdown(caller)?;
                Ok(reply(id, Ok(json!({"locked": true, "audited": audited}))))
            }
            "unlock" => {
                self.allow(caller, Op::Admin, None)?;
                let audited = self.unlock(caller)?;
                Ok(reply(id, Ok(json!({"locked": false, "audited": audited}))))
            }
            other => {
                Err(Error::InvalidInput(format!("unknown operation {:?}", other.chars().take(40).collect::<String>())))
            }
        }
    }

    fn agent_stats(&self) -> serde_json::Value {
        json!({
            "uptime_secs": self.started.elapsed().as_secs(),
            "connections": self.connections.load(Ordering::Relaxed),
            "served": self.served.load(Ordering::Relaxed),
            "refused": self.refused.load(Ordering::Relaxed),
            "rate_limited": self.limited.load(Ordering::Relaxed),
            "read_audit": self.settings.read_audit,
            "audit_group_commit": self.batcher.stats(),
            "audit_journal": self.guard.read().as_ref().and_then(|g| g.journal_status()),
            "locked": self.guard.read().is_none(),
        })
    }

    fn read_audit_check(&self) -> crate::root::Check {
        match self.settings.read_audit {
            ReadAudit::Durable => crate::root::Check::pass(
                "agent read audit",
                format!(
                    "durable: every read is answered after its audit event is on disk (group commit to the read \
                     journal, folded into the store's chain before every write and every {} ms)",
                    self.settings.audit_fold_interval_ms
                ),
            ),
            ReadAudit::Async => crate::root::Check::warn(
                "agent read audit",
                "async: reads are audited in batches after they are answered; a crash may lose the last events",
            ),
            ReadAudit::Off => {
                crate::root::Check::warn("agent read audit", "off: reads through the agent are not audited")
            }
        }
    }

    /// Drops the guard: every cached DEK and the integrity key are zeroized as their
    /// last holder lets go, and the hardware session is closed (logged out). Audited
    /// first, durably, with who asked.
    /// Keeps a refusal made in lockdown for the audit trail at unlock (the first
    /// `HELD_MAX`; the rest are counted).
    fn hold(&self, mut record: AuditRecord) {
        let mut held = self.held.lock();
        if held.0.len() < HELD_MAX {
            let at = crate::clock::rfc3339(crate::now());
            record.detail = if record.detail.is_empty() {
                format!("in lockdown, at {at}")
            } else {
                format!("in lockdown, at {at}; {}", record.detail)
            };
            held.0.push(record);
        } else {
            held.1 += 1;
        }
    }

    fn lockdown(&self, caller: &Caller) -> Result<bool> {
        // The keys go first: an emergency switch must not wait on, or fail with, its
        // own audit record. No request takes the guard from here on.
        let Some(g) = self.guard.write().take() else { return Ok(true) };
        // The lockdown is recorded directly (the audit writer needs the guard that
        // just left), best effort: if the commit fails, the answer says so.
        let audited = g
            .audit_batch(&[AuditRecord {
                actor: caller.actor(),
                op: "agent-lockdown".into(),
                outcome: "ok".into(),
                detail: "keys dropped from memory; hardware session closed".into(),
                ..Default::default()
            }])
            .inspect_err(|e| tracing::error!(error = %e, "the lockdown was not audited"))
            .is_ok();
        // Requests in flight (this one, and a scheduled refresh pass) keep their guard
        // until they finish: wait for them, so the keys are gone when the answer
        // says so.
        let until = Instant::now() + self.request_timeout() + Duration::from_secs(1);
        while self.in_flight.load(Ordering::SeqCst) > 1 && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(5));
        }
        g.clear_dek_cache();
        drop(g);
        tracing::warn!(uid = caller.uid, pid = caller.pid, "lockdown: keys dropped, hardware session closed");
        Ok(audited)
    }

    /// Opens the store again (a login with the configured PIN source); audited. The
    /// open runs without holding the slot, so `ping` and refusals go on meanwhile.
    fn unlock(&self, caller: &Caller) -> Result<bool> {
        if self.guard.read().is_some() {
            return Ok(true);
        }
        let g = self.config.open_guard_with(self.guard_opts.clone())?;
        if self.settings.read_audit != ReadAudit::Off {
            g.start_read_journal()?;
        }
        {
            let mut slot = self.guard.write();
            if slot.is_some() {
                // Another unlock won the race; this guard is dropped.
                return Ok(true);
            }
            *slot = Some(g);
        }
        // What was refused during the lockdown goes into the trail first.
        let (held, lost) = std::mem::take(&mut *self.held.lock());
        for r in held {
            self.batcher.push(r);
        }
        if lost > 0 {
            self.batcher.push(AuditRecord {
                actor: "agent".into(),
                op: "agent-refused".into(),
                outcome: "not-recorded".into(),
                detail: format!("{lost} more refusals during the lockdown were not kept"),
                ..Default::default()
            });
        }
        let audited = self
            .batcher
            .record(AuditRecord {
                actor: caller.actor(),
                op: "agent-unlock".into(),
                outcome: "ok".into(),
                ..Default::default()
            })
            .inspect_err(|e| tracing::error!(error = %e, "the unlock was not audited"))
            .is_ok();
        tracing::warn!(uid = caller.uid, pid = caller.pid, "unlocked: store open again");
        Ok(audited)
    }
}
