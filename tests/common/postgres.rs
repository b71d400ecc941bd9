//! A real PostgreSQL server for a test binary: Debian's `postgresql` package (installed
//! by `.ci/test.sh`), `initdb` in a directory of its own, listening on a Unix socket
//! (and, from `start_tcp`, on a loopback port, with TLS under a test CA made here),
//! password authentication (SCRAM), stopped and removed on drop.
//!
//! PostgreSQL refuses to run as root, so under root the server runs as `nobody`
//! (`setpriv`); otherwise as the user running the tests. A missing PostgreSQL is a
//! failure, never a skip.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The role the server is initialised with (its superuser).
pub const USER: &str = "tokenguard";

/// A running server and its data directory.
pub struct PgServer {
    /// The directory of the server: `data/`, the socket, the password file.
    pub dir: PathBuf,
    /// The superuser's password (a test secret: kept in `dir`, never on argv).
    pub password: String,
    /// The port (also the Unix socket's name): 5432, or a free one for `start_tcp`.
    pub port: u16,
    bin: PathBuf,
    child: Option<Child>,
    /// Server settings beyond the defaults (`-c` pairs).
    settings: Vec<String>,
}

/// A test CA and a server certificate it signed, in PEM.
pub struct TestCa {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl TestCa {
    /// A new CA, and a certificate for `names` (DNS names or IP addresses) signed by it.
    pub fn new(names: &[&str]) -> TestCa {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(rcgen::DnType::CommonName, "tokenguard test CA");
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|n| (*n).to_string()).collect();
        let cert = rcgen::CertificateParams::new(names).unwrap().signed_by(&key, &ca, &ca_key).unwrap();
        TestCa { ca_pem: ca.pem(), cert_pem: cert.pem(), key_pem: key.serialize_pem() }
    }
}

/// The directory of PostgreSQL's server programs (`initdb`, `postgres`, `psql`):
/// `TOKENGUARD_TEST_PG_BIN`, or Debian's newest `/usr/lib/postgresql/N/bin`.
pub fn bin_dir() -> PathBuf {
    if let Ok(p) = std::env::var("TOKENGUARD_TEST_PG_BIN") {
        return PathBuf::from(p);
    }
    let newest = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .max();
    match newest.map(|v| PathBuf::from(format!("/usr/lib/postgresql/{v}/bin"))) {
        Some(d) if d.join("initdb").exists() && d.join("postgres").exists() => d,
        _ => panic!(
            "PostgreSQL's server is not installed: apt-get install postgresql, or run .ci/test.sh (tests never \
             skip a missing component)"
        ),
    }
}

fn as_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// `program` as the server's user: `nobody` under root, else this user.
fn command(program: &Path) -> Command {
    if as_root() {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

fn check(what: &str, o: &Output) {
    assert!(
        o.status.success(),
        "{what} failed ({}):\n{}{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

impl PgServer {
    /// Initialises a cluster in a new directory (named after `name`) and starts it.
    pub fn start(name: &str) -> PgServer {
        let mut s = PgServer::init(name, 5432);
        s.spawn();
        s
    }

    /// As `start`, listening on a free loopback port too: with TLS under `ca`'s
    /// server certificate, or without TLS when `ca` is `None`.
    pub fn start_tcp(name: &str, ca: Option<&TestCa>) -> PgServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut s = PgServer::init(name, port);
        // Connections logged: a test can tell a TLS session from the log.
        s.settings = vec!["listen_addresses=127.0.0.1".to_string(), "log_connections=on".into()];
        if let Some(ca) = ca {
            use std::os::unix::fs::PermissionsExt;
            let (cert, key) = (s.dir.join("data").join("server.crt"), s.dir.join("data").join("server.key"));
            std::fs::write(&cert, &ca.cert_pem).unwrap();
            std::fs::write(&key, &ca.key_pem).unwrap();
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
            if as_root() {
                for f in [&cert, &key] {
                    nix::unistd::chown(f, Some(65534.into()), Some(65534.into())).unwrap();
                }
            }
            s.settings.extend([
                "ssl=on".to_string(),
                "ssl_cert_file=server.crt".into(),
                "ssl_key_file=server.key".into(),
            ]);
        }
        s.spawn();
        s
    }

    fn init(name: &str, port: u16) -> PgServer {
        use std::os::unix::fs::PermissionsExt;
        let bin = bin_dir();
        // Under /tmp, not the target directory: the server's user must be able to
        // reach it, and a Unix socket's path is limited to 107 bytes.
        let dir = tempfile::Builder::new().prefix(&format!("tg-pg-{name}-")).tempdir_in("/tmp").unwrap().keep();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        let mut seed = [0u8; 8];
        std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom").unwrap(), &mut seed).unwrap();
        let password = format!("pw-{:016x}", u64::from_ne_bytes(seed));
        let pwfile = dir.join("pwfile");
        std::fs::write(&pwfile, &password).unwrap();
        if as_root() {
            nix::unistd::chown(&dir, Some(65534.into()), Some(65534.into())).unwrap();
            nix::unistd::chown(&pwfile, Some(65534.into()), Some(65534.into())).unwrap();
        }
        let o = command(&bin.join("initdb"))
            .arg("-D")
            .arg(dir.join("data"))
            .args(["-U", USER, "-A", "scram-sha-256", "-E", "UTF8", "--locale=C", "--no-instructions"])
            .arg(format!("--pwfile={}", pwfile.display()))
            .stdin(Stdio::null())
            .output()
            .unwrap();
        check("initdb", &o);
        PgServer { dir, password, port, bin, child: None, settings: vec!["listen_addresses=".into()] }
    }

    /// The socket directory: the `host` of a connection string.
    pub fn socket_dir(&self) -> &Path {
        &self.dir
    }

    /// A `psql` on `db` as the superuser, the password from the environment
    /// (`PGPASSWORD`), never argv.
    pub fn psql(&self, db: &str) -> Command {
        let mut c = Command::new(self.bin.join("psql"));
        c.arg("-h")
            .arg(&self.dir)
            .args(["-p", &self.port.to_string()])
            .args(["-U", USER, "-d", db, "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
            .env("PGPASSWORD", &self.password)
            .env("PGCONNECT_TIMEOUT", "5");
        c
    }

    /// Runs `sql` on `db`; its output (unaligned, tuples only).
    pub fn sql(&self, db: &str, sql: &str) -> String {
        let o = self.psql(db).arg("-c").arg(sql).stdin(Stdio::null()).output().unwrap();
        check(&format!("psql -c {sql:?}"), &o);
        String::from_utf8(o.stdout).unwrap()
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join("server.log")).unwrap();
        if as_root() {
            nix::unistd::chown(&self.dir.join("server.log"), Some(65534.into()), Some(65534.into())).unwrap();
        }
        let child = command(&self.bin.join("postgres"))
            .arg("-D")
            .arg(self.dir.join("data"))
            .arg("-k")
            .arg(&self.dir)
            .args(["-p", &self.port.to_string()])
            .args(["-c", "max_connections=40", "-c", "shared_buffers=16MB"])
            .args(self.settings.iter().flat_map(|kv| ["-c", kv.as_str()]))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = Command::new(self.bin.join("pg_isready"))
                .arg("-h")
                .arg(&self.dir)
                .args(["-p", &self.port.to_string()])
                .args(["-U", USER, "-d", "postgres", "-q"])
                .status()
                .is_ok_and(|s| s.success());
            if ready {
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("postgres exited with {status} at start:\n{}", self.log_text());
            }
            assert!(Instant::now() < until, "postgres did not start in 30 s:\n{}", self.log_text());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the server (a fast shutdown: open sessions are ended).
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else { return };
        // SIGINT is PostgreSQL's fast shutdown. Sent by kill(1), so that the fixture
        // needs no unsafe code (the library's unit tests include it). The child is
        // not reaped yet: its pid is still ours.
        let _ = Command::new("kill").args(["-INT", &child.id().to_string()]).status();
        let until = Instant::now() + Duration::from_secs(15);
        while Instant::now() < until {
            if child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Stops and starts the server on the same data (clients see their sessions end).
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// The server's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
