//! Hermetic fixtures on a real SoftHSM2 token.
//!
//! Each test binary gets its own SoftHSM2 token directory, `softhsm2.conf` and token
//! (initialised once, in-process, before any guard loads the module). Each test gets
//! its own root key (unique label) and its own store directory, so tests run in
//! parallel without sharing state. A missing SoftHSM2 is a failure, never a skip.
#![allow(dead_code, unsafe_code, clippy::unwrap_used)]

pub mod endpoint;
pub mod postgres;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

use tokenguard::config::Config;
use tokenguard::{GuardOptions, TokenGuard};

pub const TOKEN_LABEL: &str = "tg-test";

pub struct SoftHsm {
    pub dir: PathBuf,
    pub module: PathBuf,
    pub conf: PathBuf,
    pub pin_file: PathBuf,
    pub serial: String,
}

pub fn module_path() -> PathBuf {
    if let Ok(p) = std::env::var("TOKENGUARD_TEST_PKCS11_MODULE") {
        return PathBuf::from(p);
    }
    for p in [
        "/usr/lib/softhsm/libsofthsm2.so",
        "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
        "/usr/local/lib/softhsm/libsofthsm2.so",
    ] {
        if Path::new(p).exists() {
            return PathBuf::from(p);
        }
    }
    panic!("SoftHSM2 is not installed: run ./softhsm-setup.sh --deps-only (tests never skip a missing component)");
}

pub fn tmp_base() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
}

/// The per-binary token. Initialised once; sets SOFTHSM2_CONF for this process.
pub fn softhsm() -> &'static SoftHsm {
    static HSM: OnceLock<SoftHsm> = OnceLock::new();
    HSM.get_or_init(|| {
        let module = module_path();
        let dir = tempfile::Builder::new().prefix("tg-hsm-").tempdir_in(tmp_base()).unwrap().keep();
        std::fs::create_dir_all(dir.join("tokens")).unwrap();
        let conf = dir.join("softhsm2.conf");
        std::fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                dir.join("tokens").display()
            ),
        )
        .unwrap();
        // SAFETY: runs once, inside OnceLock initialisation, before this process
        // loads the PKCS#11 module; test threads that need the module all wait on
        // this OnceLock first.
        unsafe {
            std::env::set_var("SOFTHSM2_CONF", &conf);
            // libtss2 logs expected TPM errors to stderr; keep test output readable.
            std::env::set_var("TSS2_LOG", "all+NONE");
        }
        let pin_file = dir.join("user.pin");
        write_0600(&pin_file, b"test-user-pin-1234");
        let so = secrecy::SecretString::from("test-so-pin-5678".to_string());
        let user = secrecy::SecretString::from("test-user-pin-1234".to_string());
        let serial = tokenguard::root::pkcs11::init_token(&module, TOKEN_LABEL, &so, &user).unwrap();
        SoftHsm { dir, module, conf, pin_file, serial }
    })
}

/// The store file opened with redb alone, as an attacker's (or an independent
/// reader's) tool would.
pub fn raw_db(path: &Path) -> redb::Database {
    let mut b = redb::Builder::new();
    b.set_concurrency_mode(redb::ConcurrencyMode::MultiWriter);
    b.open(path).unwrap()
}

pub fn write_0600(path: &Path, data: &[u8]) {
    std::fs::write(path, data).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// One test's world: its own key label, store directory and config file.
pub struct TestEnv {
    pub dir: PathBuf,
    pub key_label: String,
    pub config_path: PathBuf,
    pub store_path: PathBuf,
}

impl TestEnv {
    pub fn new(name: &str) -> Self {
        Self::with_config(name, "")
    }

    /// `extra_store` is appended to the [store] section.
    pub fn with_config(name: &str, extra_store: &str) -> Self {
        let hsm = softhsm();
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let key_label = format!("{name}-{}-{n}", std::process::id());
        let dir = tempfile::Builder::new().prefix(&format!("tg-{name}-")).tempdir_in(tmp_base()).unwrap().keep();
        let store_path = dir.join("store").join("tokens.redb");
        let config_path = dir.join("tokenguard.toml");
        let text = format!(
            r#"require_hardware = true
[store]
path = "{store}"
busy_timeout_ms = 2000
{extra_store}
[[roots]]
backend = "pkcs11"
module = "{module}"
token_label = "{TOKEN_LABEL}"
key_label = "{key_label}"
pin_source = "file:{pin}"
[roots.env]
SOFTHSM2_CONF = "{conf}"
"#,
            store = store_path.display(),
            module = hsm.module.display(),
            pin = hsm.pin_file.display(),
            conf = hsm.conf.display(),
        );
        std::fs::write(&config_path, text).unwrap();
        TestEnv { dir, key_label, config_path, store_path }
    }

    pub fn config(&self) -> Config {
        Config::load(&self.config_path).unwrap()
    }

    /// `init` through the library.
    pub fn init(&self) -> TokenGuard {
        self.config().init_guard().unwrap()
    }

    pub fn open(&self) -> TokenGuard {
        self.try_open().unwrap()
    }

    pub fn try_open(&self) -> tokenguard::Result<TokenGuard> {
        let c = self.config();
        c.open_guard_with(GuardOptions { actor: "test".into(), ..c.guard_options() })
    }

    /// Asserts that the store no longer opens because its rows do not match its
    /// authenticated state (exit 4), as after any edit of the file.
    pub fn assert_state_refused(&self, what: &str) {
        match self.try_open() {
            Err(e @ tokenguard::Error::Integrity { .. }) => assert_eq!(e.exit_code(), 4),
            Err(other) => panic!("{what}: expected the state check to refuse the open, got {other:?}"),
            Ok(_) => panic!("{what}: an edited store opened"),
        }
    }

    /// What an operator does with `tokenguard upgrade --accept-current-state`: opens
    /// for inspection and accepts the rows as they are. Tamper tests use it to reach
    /// the layer below the state check (AEAD, AAD, key wrap) and show that it fails
    /// closed too. Returns the guard, which then opens secrets again.
    pub fn accept_state(&self) -> TokenGuard {
        let c = self.config();
        let g = c
            .open_guard_with(GuardOptions {
                actor: "test".into(),
                state_check: tokenguard::store::StateCheck::Report,
                ..c.guard_options()
            })
            .unwrap();
        g.upgrade(true).unwrap();
        g
    }

    /// A `tokenguard` command with this env's config.
    pub fn cli(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_tokenguard"));
        c.env("TOKENGUARD_CONFIG", &self.config_path).env_remove("RUST_LOG");
        c
    }

    /// Runs the CLI with `args` and `stdin`.
    pub fn run(&self, args: &[&str], stdin: &[u8]) -> Output {
        run_cmd(self.cli().args(args), stdin)
    }
}

pub fn run_cmd(cmd: &mut Command, stdin: &[u8]) -> Output {
    use std::io::Write;
    let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    // The child may exit before reading its input (an early error): ignore EPIPE.
    let _ = child.stdin.take().unwrap().write_all(stdin);
    child.wait_with_output().unwrap()
}

pub fn code(o: &Output) -> i32 {
    o.status.code().unwrap_or(-1)
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Every file below `dir`, recursively.
pub fn files_below(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        if let Ok(rd) = std::fs::read_dir(&d) {
            for e in rd.flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else {
                    out.push(p);
                }
            }
        }
    }
    out
}

/// Whether `needle` occurs in `hay`.
pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Runs `f` holding the exclusive lock every tokenguard process takes on the SoftHSM2
/// token directory (`.tokenguard.lock`) while it logs in. SoftHSM2 rewrites its token
/// file on a login and on every token-object change, so a test's own cryptoki calls
/// that do either must not interleave with a tokenguard login in another thread or
/// process (a half-written file makes the other side fail with CKR_GENERAL_ERROR).
/// `f` must not open a guard itself: the lock would wait for this one.
pub fn with_token_lock<T>(f: impl FnOnce() -> T) -> T {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let path = softhsm().dir.join("tokens").join(".tokenguard.lock");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .unwrap();
    // SAFETY: flock on a descriptor this function owns; released when `file` drops.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
    assert_eq!(rc, 0, "flock {}", path.display());
    let out = f();
    drop(file);
    out
}

/// A logged-in user session on the test token, through a separate cryptoki context
/// (the same loaded module, as another library in the process would have).
pub fn user_session() -> cryptoki::session::Session {
    let hsm = softhsm();
    session_on(&hsm.module, TOKEN_LABEL, &hsm.pin_file)
}

/// A logged-in user session on the token labelled `label` of `module`.
pub fn session_on(module: &Path, label: &str, pin_file: &Path) -> cryptoki::session::Session {
    use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
    // Loading the token, finding it and logging in read the token's files, which a
    // tokenguard process may be rewriting (a login, a counter increment): all of it
    // under the lock tokenguard takes for the same steps.
    with_token_lock(|| {
        let ctx = Pkcs11::new(module).unwrap();
        let _ = ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK));
        let slot = ctx
            .get_slots_with_token()
            .unwrap()
            .into_iter()
            .find(|s| ctx.get_token_info(*s).unwrap().label().trim() == label)
            .unwrap();
        let session = ctx.open_rw_session(slot).unwrap();
        let pin = secrecy::SecretString::from(std::fs::read_to_string(pin_file).unwrap());
        match session.login(cryptoki::session::UserType::User, Some(&pin)) {
            Ok(()) | Err(cryptoki::error::Error::Pkcs11(cryptoki::error::RvError::UserAlreadyLoggedIn, _)) => {}
            Err(e) => panic!("login: {e}"),
        }
        session
    })
}

/// The secret key object labelled `label`.
pub fn find_key(session: &cryptoki::session::Session, label: &str) -> Vec<cryptoki::object::ObjectHandle> {
    use cryptoki::object::{Attribute, ObjectClass};
    session
        .find_objects(&[Attribute::Class(ObjectClass::SECRET_KEY), Attribute::Label(label.as_bytes().to_vec())])
        .unwrap()
}

/// A swtpm process on loopback, in its own state directory, stopped on drop. State
/// survives `restart` (persistent handles); PCRs reset (startup-clear).
pub struct Swtpm {
    pub dir: PathBuf,
    pub port: u16,
    child: Option<std::process::Child>,
}

/// A port P with P+1 free too, never handed out twice in this process (parallel tests
/// would otherwise race for the same ephemeral port).
fn free_port_pair() -> u16 {
    static TAKEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        drop(l);
        let mut taken = TAKEN.lock().unwrap();
        if port < 65000
            && !taken.iter().any(|t| t.abs_diff(port) <= 1)
            && std::net::TcpListener::bind(("127.0.0.1", port + 1)).is_ok()
        {
            taken.push(port);
            return port;
        }
    }
}

impl Swtpm {
    pub fn start() -> Swtpm {
        let which = Command::new("sh").args(["-c", "command -v swtpm"]).output().unwrap();
        assert!(
            which.status.success(),
            "swtpm is not installed: run ./softhsm-setup.sh --deps-only --tpm (tests never skip)"
        );
        let dir = tempfile::Builder::new().prefix("tg-swtpm-").tempdir_in(tmp_base()).unwrap().keep();
        let mut t = Swtpm { dir, port: 0, child: None };
        t.spawn();
        t
    }

    fn spawn(&mut self) {
        for _ in 0..5 {
            let port = if self.port == 0 { free_port_pair() } else { self.port };
            let child = Command::new("swtpm")
                .args([
                    "socket",
                    "--tpm2",
                    "--server",
                    &format!("type=tcp,port={port},bindaddr=127.0.0.1"),
                    "--ctrl",
                    &format!("type=tcp,port={},bindaddr=127.0.0.1", port + 1),
                    "--tpmstate",
                    &format!("dir={}", self.dir.display()),
                    "--flags",
                    "not-need-init,startup-clear",
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            self.child = Some(child);
            // Ready when the server port accepts connections.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            while std::time::Instant::now() < deadline {
                if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    // Make sure it is *our* swtpm that answered, not another
                    // process's on a port we lost the race for.
                    std::thread::sleep(std::time::Duration::from_millis(30));
                    if self.child.as_mut().is_some_and(|c| c.try_wait().unwrap().is_none()) {
                        self.port = port;
                        return;
                    }
                    break;
                }
                if let Some(c) = self.child.as_mut()
                    && c.try_wait().unwrap().is_some()
                {
                    break; // port taken: try another
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            self.stop();
            if self.port != 0 {
                std::thread::sleep(std::time::Duration::from_millis(200));
            }
        }
        panic!("swtpm did not start");
    }

    pub fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }

    /// Kills the process (like a TPM going away).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts again on the same port with the same state.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// Stops the TPM, deletes its state (as a TPM clear, or another machine, would)
    /// and starts it again on the same port.
    pub fn wipe_state(&mut self) {
        self.stop();
        for f in files_below(&self.dir) {
            let _ = std::fs::remove_file(f);
        }
        self.spawn();
    }
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Points `env`'s config at a SoftHSM2 token of its own, made by
/// `softhsm-setup.sh --dir` (returned): SoftHSM2 rewrites its token file on every
/// login, and a SIGKILL in that window empties it (docs/DESIGN-NOTES.md, "SoftHSM2:
/// logins, kills and a lock"). A test that kills processes at moments that can fall
/// in a login must not take the token the other tests share with it.
pub fn own_token(env: &TestEnv) -> PathBuf {
    let dir = env.dir.join("hsm");
    let o = setup_script(&dir, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let generated = std::fs::read_to_string(dir.join("tokenguard.toml")).unwrap();
    let roots = &generated[generated.find("[[roots]]").unwrap()..];
    let text = std::fs::read_to_string(&env.config_path).unwrap();
    let ours = &text[..text.find("[[roots]]").unwrap()];
    std::fs::write(&env.config_path, format!("{ours}{roots}")).unwrap();
    dir
}

/// Runs `softhsm-setup.sh --dir DIR ARGS…` with this build's CLI.
pub fn setup_script(dir: &Path, args: &[&str]) -> Output {
    Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("softhsm-setup.sh"))
        .arg("--dir")
        .arg(dir)
        .args(args)
        .env("TOKENGUARD_BIN", env!("CARGO_BIN_EXE_tokenguard"))
        .output()
        .unwrap()
}

/// After a kill: if it landed in SoftHSM2's login rewrite and emptied a token file
/// of the token made by [`own_token`] in `hsm`, does what `doctor` says
/// (`softhsm-setup.sh --repair`), as the kill campaign does. Returns whether it had to.
pub fn repair_if_emptied(hsm: &Path, what: &str) -> bool {
    let emptied = std::fs::read_dir(hsm.join("tokens"))
        .unwrap()
        .flatten()
        .any(|t| std::fs::metadata(t.path().join("token.object")).is_ok_and(|m| m.len() == 0));
    if emptied {
        let o = setup_script(hsm, &["--repair"]);
        assert!(o.status.success(), "{what}: {}", String::from_utf8_lossy(&o.stderr));
        eprintln!("{what}: the kill emptied token.object; repaired as doctor says");
    }
    emptied
}
