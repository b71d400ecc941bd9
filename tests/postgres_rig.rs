//! The PostgreSQL fixture the fleet store's tests stand on (issue 16): a real server
//! from Debian's package, started by the test binary as an unprivileged user on a
//! Unix socket of its own, with password authentication, that keeps its data across
//! a restart and goes away on drop.
#![allow(clippy::unwrap_used)]

// The fixture alone (the rest of tests/common needs the pkcs11 feature).
#[allow(dead_code)]
#[path = "common/postgres.rs"]
mod postgres;

use postgres::PgServer;
use std::process::Stdio;

#[test]
fn a_server_starts_authenticates_keeps_its_data_over_a_restart_and_goes_away() {
    let mut pg = PgServer::start("rig");
    pg.sql("postgres", "CREATE DATABASE tg");
    pg.sql("tg", "CREATE TABLE t (k bytea PRIMARY KEY, v bytea NOT NULL)");
    // Bytes in, the same bytes out (a sealed record is opaque bytes).
    pg.sql("tg", "INSERT INTO t VALUES ('\\x00ff'::bytea, '\\xdeadbeef'::bytea)");
    assert_eq!(pg.sql("tg", "SELECT encode(v, 'hex') FROM t WHERE k = '\\x00ff'::bytea").trim(), "deadbeef");

    // Only with the password: a wrong one is refused.
    let o = pg.psql("tg").env("PGPASSWORD", "not-it").args(["-c", "SELECT 1"]).stdin(Stdio::null()).output().unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("password authentication failed"), "{o:?}");

    // Not on the network: a Unix socket only.
    let conf = pg.sql("tg", "SHOW listen_addresses");
    assert_eq!(conf.trim(), "");

    pg.restart();
    assert_eq!(pg.sql("tg", "SELECT count(*) FROM t").trim(), "1", "{}", pg.log_text());

    let dir = pg.dir.clone();
    drop(pg);
    assert!(!dir.exists(), "the server's directory outlived it");
}

#[test]
fn two_servers_run_side_by_side() {
    let a = PgServer::start("side-a");
    let b = PgServer::start("side-b");
    a.sql("postgres", "CREATE DATABASE only_a");
    assert_eq!(b.sql("postgres", "SELECT count(*) FROM pg_database WHERE datname = 'only_a'").trim(), "0");
    assert_ne!(a.socket_dir(), b.socket_dir());
}
