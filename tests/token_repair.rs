//! A SIGKILL during SoftHSM2's login leaves its token.object empty; the development
//! token made by softhsm-setup.sh is repaired by the documented command, which
//! doctor names, and nothing stored is lost.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;

#[test]
fn an_emptied_token_file_is_named_by_doctor_and_repaired_by_the_setup_script() {
    let dir = tempfile::Builder::new().prefix("tg-repair-").tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let setup = Path::new(env!("CARGO_MANIFEST_DIR")).join("softhsm-setup.sh");
    let bin = env!("CARGO_BIN_EXE_tokenguard");
    let run_setup = |extra: &[&str]| {
        let o =
            Command::new(&setup).arg("--dir").arg(dir.path()).args(extra).env("TOKENGUARD_BIN", bin).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    run_setup(&[]);
    let tg = |args: &[&str], stdin: &[u8]| {
        use std::io::Write;
        let mut c = Command::new(bin)
            .args(args)
            .env("TOKENGUARD_CONFIG", dir.path().join("tokenguard.toml"))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let _ = c.stdin.take().unwrap().write_all(stdin);
        c.wait_with_output().unwrap()
    };
    assert!(tg(&["init"], b"").status.success());
    assert!(tg(&["put", "github/ci-bot"], b"ghp_REPAIR").status.success());

    // What a kill in the login window leaves behind.
    let token_dir =
        std::fs::read_dir(dir.path().join("tokens")).unwrap().flatten().map(|e| e.path()).find(|p| p.is_dir()).unwrap();
    std::fs::write(token_dir.join("token.object"), b"").unwrap();
    let o = tg(&["get", "github/ci-bot"], b"");
    assert_eq!(o.status.code(), Some(5), "the token is gone until repaired");
    let o = tg(&["doctor"], b"");
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(5), "{out}");
    assert!(out.contains("is empty") && out.contains("./softhsm-setup.sh --repair"), "{out}");

    // The documented repair; nothing was lost.
    let said = run_setup(&["--repair"]);
    assert!(said.contains("repaired token"), "{said}");
    let o = tg(&["get", "github/ci-bot"], b"");
    assert_eq!(o.stdout, b"ghp_REPAIR", "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(tg(&["doctor"], b"").status.code(), Some(0));
}
