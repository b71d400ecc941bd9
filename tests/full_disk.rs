//! The store on a small file system that fills up, and on a read-only one (real
//! tmpfs mounts, so the test runs as root, as CI does): a write fails clearly,
//! everything acknowledged still reads, writes resume once space is freed, and a
//! backup to a full disk leaves no partial file.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{TestEnv, code, stderr};

/// A tmpfs mounted for one test, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700"), "tmpfs"])
            .arg(dir)
            .status();
        assert!(
            ok.is_ok_and(|s| s.success()),
            "mounting a tmpfs needs root (CI runs as root): run the suite as root, e.g. sudo -E .ci/test.sh"
        );
        Tmpfs(dir.to_path_buf())
    }

    fn remount(&self, opts: &str) {
        assert!(
            Command::new("mount").args(["-o", &format!("remount,{opts}")]).arg(&self.0).status().unwrap().success()
        );
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Fills the file system of `dir` with a file until the writes fail.
fn fill(dir: &Path, name: &str) -> PathBuf {
    let filler = dir.join(name);
    let mut f = std::fs::File::create(&filler).unwrap();
    let chunk = vec![0u8; 16 * 1024];
    while f.write_all(&chunk).is_ok() {}
    let small = [0u8; 512];
    while f.write_all(&small).is_ok() {}
    let _ = f.sync_all();
    filler
}

#[test]
fn a_full_disk_stops_writes_not_reads_and_a_read_only_one_fails_clearly() {
    let env = TestEnv::new("fulldisk");
    let fs = Tmpfs::mount(&env.dir.join("mnt"), "8m");
    let store = fs.0.join("store").join("tokens.redb");
    let text = std::fs::read_to_string(&env.config_path).unwrap();
    std::fs::write(&env.config_path, text.replace(&env.store_path.display().to_string(), &store.display().to_string()))
        .unwrap();
    assert_eq!(code(&env.run(&["init"], b"")), 0);
    for i in 0..20 {
        let o = env.run(&["put", "p", &format!("t{i}")], format!("value-{i}").as_bytes());
        assert_eq!(code(&o), 0, "{}", stderr(&o));
    }

    // Full: a write fails with exit 1 and says what to do; reads go on.
    let filler = fill(&fs.0, "filler-1");
    let o = env.run(&["put", "p", "more"], &vec![b'x'; 4000]);
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    assert!(stderr(&o).contains("the file system is full"), "{}", stderr(&o));
    for i in [0, 7, 19] {
        let o = env.run(&["get", "p", &format!("t{i}")], b"");
        assert_eq!(code(&o), 0, "acknowledged t{i} reads on a full disk: {}", stderr(&o));
        assert_eq!(o.stdout, format!("value-{i}").as_bytes());
    }
    // A backup to the full disk leaves nothing behind. (A failed commit can give
    // pages back, so fill up again first.)
    let filler2 = fill(&fs.0, "filler-2");
    let backup = fs.0.join("b.tgbackup");
    assert_ne!(code(&env.run(&["backup", backup.to_str().unwrap()], b"")), 0);
    let leftovers: Vec<_> = std::fs::read_dir(&fs.0).unwrap().flatten().map(|e| e.file_name()).collect();
    assert!(!leftovers.iter().any(|n| n.to_string_lossy().starts_with("b.")), "{leftovers:?}");

    // Space again: writes resume, no manual step; the store is intact.
    std::fs::remove_file(&filler).unwrap();
    std::fs::remove_file(&filler2).unwrap();
    let o = env.run(&["put", "p", "more"], b"after");
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(env.run(&["get", "p", "more"], b"").stdout, b"after");
    let o = env.run(&["doctor"], b"");
    assert_eq!(code(&o), 0, "{}", String::from_utf8_lossy(&o.stdout));

    // Read-only: a clear error with a hint (the CLI writes audit events), never a panic.
    fs.remount("ro");
    let o = env.run(&["get", "p", "t1"], b"");
    assert!(code(&o) == 0 || (code(&o) == 1 && stderr(&o).contains("read-only")), "exit {}: {}", code(&o), stderr(&o));
    assert!(!stderr(&o).contains("panicked"));
    fs.remount("rw");
}
