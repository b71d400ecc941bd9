//! The read journal: a durable audit event for the price of one `fdatasync`.
//!
//! An agent answers a read only once the read's audit event is on disk. A redb
//! commit costs ≈0.5 ms on the machines we measured; an `fdatasync` of a page
//! overwritten in place ≈0.1 ms. So the one process that owns an exclusive store may
//! append audit events to a journal beside it (`<store>.audit-journal`, 0600) instead
//! of committing them: entries in the stored encoding, already MAC'd and chained as
//! the next links of the store's audit chain (`crate::audit::link`). Each batch is
//! written in place into a preallocated file and `fdatasync`ed before its reads are
//! answered.
//!
//! The store's next write transaction folds the journal in first — it copies the
//! entries and the head as they are, nothing is recomputed — and the journal starts
//! again from its beginning once that commit is durable. Every write folds (so the
//! chain's order is the order of events), and so does a fold the owner asks for (on a
//! timer, when the journal is full, before reading the trail, at stop).
//!
//! After a crash, the next open of the store reads the journal
//! ([`read_frames`]) and the guard folds what continues the store's chain, each
//! entry's link and MAC checked (`crate::audit::continuation`); see the guard's
//! `fold_leftover_journal`. What the journal does not protect, and why that is no
//! weaker than the store itself, is in docs/DESIGN-NOTES.md §"The read journal".
//!
//! File: an 8-byte header (`TGJ` 0x01 and four zero bytes), then frames
//! `len:u32 BE ‖ entry`, 1 ≤ len ≤ 64 KiB. Reading stops at the first frame that does
//! not fit; what follows the batch last written (older frames of an earlier round,
//! zeros) does not continue the chain and is ignored by the guard.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

const MAGIC: [u8; HEADER_LEN] = *b"TGJ\x01\0\0\0\0";
const HEADER_LEN: usize = 8;
/// Where the first frame starts.
const HEADER: u64 = HEADER_LEN as u64;
/// Longest entry a frame may hold (an audit event is a few hundred bytes).
pub(crate) const MAX_ENTRY: usize = 64 * 1024;
/// Size of the journal file. At ≈250 bytes an event, 32k events: the agent folds
/// long before that on its timer unless reads arrive faster than ≈30k/s.
pub(crate) const CAPACITY: u64 = 8 * 1024 * 1024;

/// The journal file of the store at `store`: beside the store file itself, however
/// the path to it is spelled (symbolic links, `..`), so every process finds the same
/// journal.
pub(crate) fn path_of(store: &Path) -> PathBuf {
    let store = std::fs::canonicalize(store).unwrap_or_else(|_| store.to_path_buf());
    let mut p = store.into_os_string();
    p.push(".audit-journal");
    PathBuf::from(p)
}

/// An attached journal: its file, where the next batch goes, and what it holds that
/// the store does not yet.
pub(crate) struct Journal {
    file: File,
    path: PathBuf,
    pos: u64,
    /// Entries written since the last fold, in chain order.
    pending: Vec<Entry>,
    /// The chain's head after `pending` (the store's when `pending` is empty).
    head: Option<Vec<u8>>,
    /// The store's head when this round of `pending` began: a fold is refused unless
    /// the store's head is still exactly this (nothing else may have moved it).
    base: Option<Vec<u8>>,
    /// The store's archive of audit keys when the journal last saw it: a batch is
    /// linked only by keys of that era.
    archive: Option<Vec<u8>>,
    /// Set by an I/O error: the journal takes nothing more (what it holds is still
    /// folded); after a failed `fdatasync` the kernel may have dropped the pages, and
    /// a retry could report success for data that is not on disk.
    broken: Option<String>,
    /// Set when a commit that folded `pending` failed: whether the store holds them
    /// is unknown, so no later transaction folds them (the next open does, link by
    /// link, from the file).
    unsure: bool,
    /// Set when a fold failed (the store takes no write): the journal takes nothing
    /// more until a fold succeeds, so that reads are not answered for longer than
    /// the store can take them in.
    stalled: Option<String>,
}

/// What [`Journal::append`] did.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Appended {
    /// The batch is on disk.
    Done,
    /// The batch does not fit behind what is pending: fold, then try again.
    Full,
}

/// An audit entry as stored: its sequence number and its bytes.
pub(crate) type Entry = (u64, Vec<u8>);

/// A batch of chain links to append: the entries and the head after them.
pub(crate) type Links = (Vec<Entry>, Vec<u8>);

impl Journal {
    /// Opens (making it if needed) the journal of the store at `store`, whose audit
    /// head and archive are `head` and `archive`. Whatever the file held must have
    /// been folded already (the guard does it at open).
    pub(crate) fn attach(store: &Path, head: Option<Vec<u8>>, archive: Option<Vec<u8>>) -> Result<Journal> {
        let path = path_of(store);
        let file = open_private(&path, true)?.ok_or_else(|| Error::Config(format!("creating {}", path.display())))?;
        let len = file.metadata().map_err(Error::io("reading the metadata of", &path))?.len();
        // What is there must be a journal, or zeros: one whose making was cut short.
        let mut magic = [0u8; HEADER_LEN];
        let have = usize::try_from(len).unwrap_or(HEADER_LEN).min(HEADER_LEN);
        if file.read_exact_at(&mut magic[..have], 0).is_err() || (magic != MAGIC && magic != [0; HEADER_LEN]) {
            return Err(Error::Config(format!(
                "{} is in the way of the read journal: it is not a journal; move it away",
                path.display()
            )));
        }
        if len < CAPACITY {
            // Real zeros, not a hole: a write into a hole allocates blocks, and
            // `fdatasync` would then have metadata to write on every batch.
            let zeros = vec![0u8; 1024 * 1024];
            let mut at = len;
            while at < CAPACITY {
                let n = usize::try_from(CAPACITY - at).unwrap_or(zeros.len()).min(zeros.len());
                file.write_all_at(&zeros[..n], at).map_err(Error::io("preallocating", &path))?;
                at += n as u64;
            }
        }
        file.write_all_at(&MAGIC, 0).map_err(Error::io("writing", &path))?;
        file.write_all_at(&[0; 4], HEADER).map_err(Error::io("writing", &path))?;
        file.sync_all().map_err(Error::io("syncing", &path))?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            // The file's name must survive a crash too.
            File::open(dir).and_then(|d| d.sync_all()).map_err(Error::io("syncing the directory of", &path))?;
        }
        Ok(Journal {
            file,
            path,
            pos: HEADER,
            pending: Vec::new(),
            base: head.clone(),
            head,
            archive,
            broken: None,
            unsure: false,
            stalled: None,
        })
    }

    /// The journal file.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Entries on disk that the store does not hold yet.
    pub(crate) fn pending(&self) -> usize {
        self.pending.len()
    }

    /// The store's head this round of pending entries links from.
    pub(crate) fn base(&self) -> Option<&[u8]> {
        self.base.as_deref()
    }

    /// A fold failed with `why`: no new events until one succeeds.
    pub(crate) fn stall(&mut self, why: &str) {
        self.stalled = Some(why.to_string());
    }

    /// Takes nothing more and folds nothing more: `why` (an I/O error, a failed
    /// commit) left what is on disk and what the store holds uncertain. The next open
    /// of the store sorts it out from the file.
    pub(crate) fn fail(&mut self, why: &str) {
        self.broken = Some(why.to_string());
        self.unsure = true;
    }

    /// The entries and head a fold copies into the store (none when nothing is
    /// pending, or after a failure).
    pub(crate) fn to_fold(&self) -> Option<(&[Entry], &[u8])> {
        if self.unsure {
            return None;
        }
        match (&self.pending[..], &self.head) {
            ([], _) | (_, None) => None,
            (p, Some(h)) => Some((p, h)),
        }
    }

    /// Links a batch with `link` (given the chain's head and the archive of audit
    /// keys) and writes it to disk. On `Done` its entries are durable.
    pub(crate) fn append(
        &mut self,
        link: impl FnOnce(Option<&[u8]>, Option<&[u8]>) -> Result<Links>,
    ) -> Result<Appended> {
        if let Some(why) = self.broken.as_ref().or(self.stalled.as_ref()) {
            return Err(Error::Io {
                operation: "appending to the read journal",
                path: self.path.clone(),
                source: std::io::Error::other(format!("it takes nothing more: {why}")),
            });
        }
        let (entries, head) = link(self.head.as_deref(), self.archive.as_deref())?;
        if entries.is_empty() {
            return Ok(Appended::Done);
        }
        let size: usize = entries.iter().map(|(_, e)| 4 + e.len()).sum();
        // A zero length ends every batch (overwritten by the next): what lies beyond
        // (an older round's bytes, not frame-aligned) is never read as frames.
        if self.pos + size as u64 + 4 > CAPACITY {
            return Ok(Appended::Full);
        }
        let mut buf = Vec::with_capacity(size + 4);
        for (_, e) in &entries {
            if e.len() > MAX_ENTRY {
                return Err(Error::InvalidInput(format!("an audit event of {} bytes is too long to journal", e.len())));
            }
            buf.extend_from_slice(&u32::try_from(e.len()).unwrap_or(u32::MAX).to_be_bytes());
            buf.extend_from_slice(e);
        }
        buf.extend_from_slice(&[0; 4]);
        let written = self.file.write_all_at(&buf, self.pos).and_then(|()| self.file.sync_data());
        if let Err(e) = written {
            // Best effort: these reads are refused, so their events must not be
            // folded after a crash either.
            let _ = self.file.write_all_at(&[0; 4], self.pos).and_then(|()| self.file.sync_data());
            self.broken = Some(e.to_string());
            tracing::error!(path = %self.path.display(), error = %e, "the read journal failed; it takes no more events");
            return Err(Error::Io { operation: "writing the read journal", path: self.path.clone(), source: e });
        }
        self.pos += size as u64;
        self.pending.extend(entries);
        self.head = Some(head);
        Ok(Appended::Done)
    }

    /// The store committed, durably, a transaction that folded `pending` first and
    /// left the chain at `head` with the keys of `archive`: the journal starts again
    /// from its beginning. The frames left behind do not continue the chain; the
    /// first one is zeroed so that a reader stops at once (not synced: after a crash
    /// the old frames are only read and skipped).
    pub(crate) fn folded(&mut self, head: Option<Vec<u8>>, archive: Option<Vec<u8>>) {
        self.pending.clear();
        self.base = head.clone();
        self.head = head;
        self.archive = archive;
        self.stalled = None;
        if self.pos != HEADER {
            self.pos = HEADER;
            if let Err(e) = self.file.write_all_at(&[0; 4], HEADER) {
                tracing::warn!(path = %self.path.display(), error = %e, "could not mark the read journal empty");
            }
        }
    }
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal").field("path", &self.path).field("pending", &self.pending.len()).finish()
    }
}

/// Opens `path` for reading and writing, refusing one that is not a regular file
/// owned by this user and private to it; creates it (0600) when `create`. `None`: it
/// does not exist (and `create` is false).
fn open_private(path: &Path, create: bool) -> Result<Option<File>> {
    let opened = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(create)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path);
    let file = match opened {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !create => return Ok(None),
        Err(e) => return Err(Error::io("opening", path)(e)),
    };
    let meta = file.metadata().map_err(Error::io("reading the metadata of", path))?;
    let me = nix::unistd::geteuid().as_raw();
    let mode = meta.permissions().mode() & 0o777;
    if !meta.is_file() || meta.uid() != me || mode & 0o077 != 0 || meta.nlink() != 1 {
        return Err(Error::Config(format!(
            "the read journal {} is not a private file of this user (a regular file, mode {mode:o}, owner {}, {} \
             links): it holds audit events in transit; it must be a file of its own (one link), owned by the \
             user the store is opened as, mode 600",
            path.display(),
            meta.uid(),
            meta.nlink()
        )));
    }
    Ok(Some(file))
}

/// The frames of the journal of the store at `store`, in file order, up to the first
/// that does not fit: what a crash may have left unfolded (the guard keeps those that
/// continue the store's chain). None when there is no journal.
pub(crate) fn read_frames(store: &Path) -> Result<Vec<Vec<u8>>> {
    let path = path_of(store);
    let Some(mut file) = open_private(&path, false)? else { return Ok(Vec::new()) };
    let mut header = [0u8; HEADER_LEN + 4];
    match file.read_exact(&mut header) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(Vec::new()),
        Err(e) => return Err(Error::io("reading", &path)(e)),
    }
    // Zeros where the header goes: a journal whose making was cut short (its writer
    // died preallocating it, before the header), which holds nothing; `attach`
    // takes it over as it is.
    if header[..HEADER_LEN] == [0; HEADER_LEN] {
        return Ok(Vec::new());
    }
    if header[..HEADER_LEN] != MAGIC {
        return Err(Error::integrity("reading the read journal: it does not start as a journal does"));
    }
    if header[HEADER_LEN..] == [0; 4] {
        return Ok(Vec::new());
    }
    let mut bytes = header[HEADER_LEN..].to_vec();
    file.take(CAPACITY).read_to_end(&mut bytes).map_err(Error::io("reading", &path))?;
    let mut frames = Vec::new();
    let mut rest = &bytes[..];
    while let Some((len, tail)) = rest.split_first_chunk::<4>() {
        let len = u32::from_be_bytes(*len) as usize;
        if len == 0 || len > MAX_ENTRY || len > tail.len() {
            break;
        }
        let (frame, tail) = tail.split_at(len);
        frames.push(frame.to_vec());
        rest = tail;
    }
    Ok(frames)
}

/// Marks the journal of the store at `store` empty, durably: its frames were folded
/// (after a crash) or found not to continue the chain.
pub(crate) fn clear(store: &Path) -> Result<()> {
    let path = path_of(store);
    let Some(file) = open_private(&path, false)? else { return Ok(()) };
    file.write_all_at(&[0; 4], HEADER).and_then(|()| file.sync_data()).map_err(Error::io("clearing", &path))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn batches_are_framed_folding_starts_again_and_a_reader_stops_where_the_chain_must() {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("s.redb");
        let mut j = Journal::attach(&store, None, None).unwrap();
        let meta = std::fs::metadata(path_of(&store)).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(meta.len(), CAPACITY);
        assert!(read_frames(&store).unwrap().is_empty());
        let batch = |from: u64, n: u64| -> Links {
            ((from..from + n).map(|s| (s, format!("entry {s}").into_bytes())).collect(), b"head".to_vec())
        };
        assert_eq!(j.append(|h, _| Ok(batch(1, 3)).inspect(|_| assert!(h.is_none()))).unwrap(), Appended::Done);
        assert_eq!(
            j.append(|h, _| Ok(batch(4, 2)).inspect(|_| assert_eq!(h, Some(&b"head"[..])))).unwrap(),
            Appended::Done
        );
        assert_eq!(j.pending(), 5);
        let frames = read_frames(&store).unwrap();
        assert_eq!(frames.len(), 5);
        assert_eq!(frames[4], b"entry 5");
        // A fold starts the journal again: a reader sees nothing until the next batch,
        // then the new batch followed by the older frames it did not overwrite.
        j.folded(Some(b"h5".to_vec()), None);
        assert_eq!(j.pending(), 0);
        assert!(read_frames(&store).unwrap().is_empty());
        j.append(|_, _| Ok(batch(6, 1))).unwrap();
        // The older round's frames beyond it are not read: each batch ends in a zero.
        assert_eq!(read_frames(&store).unwrap(), [b"entry 6".to_vec()]);
        // A batch that does not fit is refused before anything is written.
        let big = vec![0u8; MAX_ENTRY];
        let full = j.append(|_, _| Ok(((0..200).map(|s| (s, big.clone())).collect(), Vec::new()))).unwrap();
        assert_eq!(full, Appended::Full);
        assert_eq!(j.pending(), 1);
        clear(&store).unwrap();
        assert!(read_frames(&store).unwrap().is_empty());
    }

    #[test]
    fn a_journal_whose_making_was_cut_short_reads_as_empty_and_is_taken_over() {
        // What a writer killed while preallocating leaves: the file, zeros, no header
        // yet (an agent SIGKILLed at start made the next start fail with exit 4).
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("s.redb");
        for len in [0usize, 5, 12, 1024 * 1024] {
            std::fs::write(path_of(&store), vec![0u8; len]).unwrap();
            std::fs::set_permissions(path_of(&store), std::fs::Permissions::from_mode(0o600)).unwrap();
            assert!(read_frames(&store).unwrap().is_empty(), "{len} zero bytes");
            let mut j = Journal::attach(&store, None, None).unwrap();
            j.append(|_, _| Ok((vec![(1, b"one".to_vec())], b"h1".to_vec()))).unwrap();
            assert_eq!(read_frames(&store).unwrap(), vec![b"one".to_vec()], "{len} zero bytes");
            std::fs::remove_file(path_of(&store)).unwrap();
        }
    }

    #[test]
    fn a_journal_others_can_read_or_another_file_type_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("s.redb");
        drop(Journal::attach(&store, None, None).unwrap());
        std::fs::set_permissions(path_of(&store), std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = read_frames(&store).unwrap_err().to_string();
        assert!(e.contains("not a private file"), "{e}");
        std::fs::remove_file(path_of(&store)).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", path_of(&store)).unwrap();
        assert!(read_frames(&store).is_err());
        assert!(Journal::attach(&store, None, None).is_err());
        std::fs::remove_file(path_of(&store)).unwrap();
        std::fs::write(path_of(&store), b"not a journal at all").unwrap();
        std::fs::set_permissions(path_of(&store), std::fs::Permissions::from_mode(0o600)).unwrap();
        let e = read_frames(&store).unwrap_err().to_string();
        assert!(e.contains("does not start as a journal"), "{e}");
        let e = Journal::attach(&store, None, None).unwrap_err().to_string();
        assert!(e.contains("not a journal; move it away"), "{e}");
        assert_eq!(std::fs::read(path_of(&store)).unwrap(), b"not a journal at all");
        // A second name for the file (a hard link) is refused: attaching would
        // overwrite whatever the other name is.
        std::fs::remove_file(path_of(&store)).unwrap();
        let other = dir.path().join("other");
        std::fs::write(&other, b"").unwrap();
        std::fs::set_permissions(&other, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::hard_link(&other, path_of(&store)).unwrap();
        assert!(Journal::attach(&store, None, None).unwrap_err().to_string().contains("2 links"));
    }
}
