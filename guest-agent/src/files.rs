//! The guest end of file transfer: files the session's client sends land in the user's
//! Downloads. Run by the per-user session part ([`crate::session`]), so every file is written
//! by the user, with the user's own rights and quota, never by the root service.
//!
//! A file arrives in a partial file named after its content (`.pleiades-<sha256>-<size>.part`
//! in the same directory), so that an interrupted transfer of the same file (a link drop, a new
//! connection, another client) resumes where it stopped: the offer is answered with the
//! partial's length ([`FileMessage::Accept`]), and its bytes are hashed again to continue the
//! SHA-256. When the last byte is written the file is synced and its SHA-256 compared with the
//! offer's; only then does it take its name (a hard link that never replaces: an existing file
//! makes it "name (2).ext"), and the partial goes. A damaged file is deleted
//! ([`FileRefuseReason::Checksum`]); a cancelled one too; an interrupted one is kept.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use pleiades_protocol::wire::{
    CancelReason, FileData, FileMessage, FileOffer, FileRefuseReason, MAX_FILE_TRANSFERS, file_name_ok,
};
use ring::digest::{Context, SHA256};

/// The receiver reports progress whenever this much more was written (and at the end): often
/// enough that the sender's window ([`pleiades_protocol::wire::FILE_WINDOW`]) never runs dry.
pub const PROGRESS_EVERY: u64 = 512 * 1024;
/// Most "name (N).ext" tried before giving up on a free name.
const MAX_RENAMES: u32 = 1000;

/// One file arriving.
struct Incoming {
    name: String,
    size: u64,
    sha256: [u8; 32],
    partial: PathBuf,
    file: File,
    hash: Context,
    received: u64,
    reported: u64,
}

/// The files arriving into one directory.
pub struct Downloads {
    dir: PathBuf,
    open: HashMap<u32, Incoming>,
}

impl std::fmt::Debug for Downloads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Downloads").field("dir", &self.dir).field("open", &self.open.len()).finish()
    }
}

/// The user's download directory: `$XDG_DOWNLOAD_DIR` when set to an absolute path, else
/// `~/Downloads`.
pub fn download_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("XDG_DOWNLOAD_DIR").map(PathBuf::from).filter(|d| d.is_absolute()) {
        return Some(dir);
    }
    std::env::var_os("HOME").map(|home| PathBuf::from(home).join("Downloads"))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// "name (n).ext" (the extension is what follows the last dot, unless the name starts with it).
fn numbered(name: &str, n: u32) -> String {
    match name.rfind('.').filter(|&dot| dot > 0) {
        Some(dot) => format!("{} ({n}){}", &name[..dot], &name[dot..]),
        None => format!("{name} ({n})"),
    }
}

impl Downloads {
    pub fn new(dir: PathBuf) -> Self {
        Self { dir, open: HashMap::new() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Transfers in progress.
    pub fn open(&self) -> usize {
        self.open.len()
    }

    /// Takes a message from the sender; returns the answers.
    pub fn handle(&mut self, message: FileMessage) -> Vec<FileMessage> {
        match message {
            FileMessage::Offer(offer) => self.offer(offer),
            FileMessage::Data(data) => self.data(data),
            FileMessage::Cancel { id, reason } => {
                if let Some(incoming) = self.open.remove(&id)
                    && reason == CancelReason::User
                {
                    let _ = std::fs::remove_file(&incoming.partial);
                }
                Vec::new()
            }
            // The receiver's own messages: not the sender's to send.
            _ => Vec::new(),
        }
    }

    /// The sender went away: every transfer stops, what arrived is kept for a resume.
    pub fn interrupt_all(&mut self) {
        self.open.clear();
    }

    fn offer(&mut self, offer: FileOffer) -> Vec<FileMessage> {
        let id = offer.id;
        let refuse = |reason| vec![FileMessage::Refused { id, reason }];
        if !file_name_ok(&offer.name) {
            return refuse(FileRefuseReason::BadName);
        }
        if self.open.len() >= MAX_FILE_TRANSFERS
            || self.open.values().any(|o| o.sha256 == offer.sha256 && o.size == offer.size)
        {
            return refuse(FileRefuseReason::Busy);
        }
        // A transfer of the same id that was left open (the sender reused it) is replaced.
        self.open.remove(&id);
        match self.open_partial(&offer) {
            Ok(incoming) => {
                let offset = incoming.received;
                self.open.insert(id, incoming);
                let mut answers = vec![FileMessage::Accept { id, offset }];
                if offset == offer.size {
                    // Everything had arrived already: check it and name it.
                    answers.extend(self.finish(id));
                }
                answers
            }
            Err(reason) => refuse(reason),
        }
    }

    /// Opens (or creates) the partial file of `offer`, hashes what it has, checks the space.
    fn open_partial(&self, offer: &FileOffer) -> Result<Incoming, FileRefuseReason> {
        let failed = |what: &str, e: std::io::Error| {
            eprintln!("pleiades-agent session: files: {what} {}: {e}", self.dir.display());
            if e.raw_os_error() == Some(libc::ENOSPC) {
                FileRefuseReason::NoSpace
            } else {
                FileRefuseReason::Failed
            }
        };
        std::fs::create_dir_all(&self.dir).map_err(|e| failed("cannot create", e))?;
        let partial = self.dir.join(format!(".pleiades-{}-{}.part", hex(&offer.sha256), offer.size));
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            // Never through a link someone put in its place.
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&partial)
            .map_err(|e| failed("cannot create a file in", e))?;
        let mut have = file.metadata().map_err(|e| failed("cannot read a file in", e))?.len();
        if have > offer.size {
            // Not a prefix of this file after all.
            file.set_len(0).map_err(|e| failed("cannot write in", e))?;
            have = 0;
        }
        let mut hash = Context::new(&SHA256);
        let mut buf = vec![0u8; 256 * 1024];
        let mut hashed = 0u64;
        file.seek(SeekFrom::Start(0)).map_err(|e| failed("cannot read in", e))?;
        while hashed < have {
            let want = (have - hashed).min(buf.len() as u64) as usize;
            match file.read(&mut buf[..want]) {
                Ok(0) => break,
                Ok(n) => {
                    hash.update(&buf[..n]);
                    hashed += n as u64;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(failed("cannot read in", e)),
            }
        }
        // Whatever could not be read back is sent again.
        file.set_len(hashed).map_err(|e| failed("cannot write in", e))?;
        file.seek(SeekFrom::Start(hashed)).map_err(|e| failed("cannot write in", e))?;
        let free = nix::sys::statvfs::statvfs(&self.dir)
            .map(|s| s.blocks_available().saturating_mul(s.fragment_size()))
            .unwrap_or(u64::MAX);
        if free < offer.size - hashed {
            return Err(FileRefuseReason::NoSpace);
        }
        Ok(Incoming {
            name: offer.name.clone(),
            size: offer.size,
            sha256: offer.sha256,
            partial,
            file,
            hash,
            received: hashed,
            reported: hashed,
        })
    }

    fn data(&mut self, data: FileData) -> Vec<FileMessage> {
        let FileData { id, offset, bytes } = data;
        let Some(incoming) = self.open.get_mut(&id) else { return Vec::new() };
        let end = offset + bytes.len() as u64;
        if offset != incoming.received || end > incoming.size {
            // The host relays in order; anything else is a sender's bug.
            self.open.remove(&id);
            return vec![FileMessage::Refused { id, reason: FileRefuseReason::Failed }];
        }
        if let Err(e) = incoming.file.write_all(&bytes) {
            eprintln!("pleiades-agent session: files: cannot write {}: {e}", incoming.name);
            let reason = if e.raw_os_error() == Some(libc::ENOSPC) {
                FileRefuseReason::NoSpace
            } else {
                FileRefuseReason::Failed
            };
            // What was written stays, for a resume once there is room.
            self.open.remove(&id);
            return vec![FileMessage::Refused { id, reason }];
        }
        incoming.hash.update(&bytes);
        incoming.received = end;
        let mut answers = Vec::new();
        if end - incoming.reported >= PROGRESS_EVERY || end == incoming.size {
            incoming.reported = end;
            answers.push(FileMessage::Progress { id, received: end });
        }
        if end == incoming.size {
            answers.extend(self.finish(id));
        }
        answers
    }

    /// The whole file is there: sync, check, name.
    fn finish(&mut self, id: u32) -> Option<FileMessage> {
        let incoming = self.open.remove(&id)?;
        let refused = |reason| Some(FileMessage::Refused { id, reason });
        if let Err(e) = incoming.file.sync_all() {
            eprintln!("pleiades-agent session: files: cannot sync {}: {e}", incoming.name);
            return refused(FileRefuseReason::Failed);
        }
        if incoming.hash.finish().as_ref() != incoming.sha256 {
            let _ = std::fs::remove_file(&incoming.partial);
            return refused(FileRefuseReason::Checksum);
        }
        for n in 1..=MAX_RENAMES {
            let name = if n == 1 { incoming.name.clone() } else { numbered(&incoming.name, n) };
            if !file_name_ok(&name) {
                break;
            }
            match std::fs::hard_link(&incoming.partial, self.dir.join(&name)) {
                Ok(()) => {
                    let _ = std::fs::remove_file(&incoming.partial);
                    let _ = std::fs::set_permissions(
                        self.dir.join(&name),
                        std::os::unix::fs::PermissionsExt::from_mode(0o644),
                    );
                    return Some(FileMessage::Done { id, name });
                }
                Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
                Err(e) => {
                    eprintln!("pleiades-agent session: files: cannot name {}: {e}", incoming.name);
                    return refused(FileRefuseReason::Failed);
                }
            }
        }
        refused(FileRefuseReason::BadName)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pleiades_protocol::wire::MAX_FILE_CHUNK;

    fn sha(bytes: &[u8]) -> [u8; 32] {
        ring::digest::digest(&SHA256, bytes).as_ref().try_into().unwrap()
    }

    fn offer(id: u32, name: &str, content: &[u8]) -> FileMessage {
        FileMessage::Offer(FileOffer {
            id,
            size: content.len() as u64,
            sha256: sha(content),
            name: name.into(),
        })
    }

    /// Sends `content[from..to]` in chunks; the answers.
    fn send(d: &mut Downloads, id: u32, content: &[u8], from: usize, to: usize) -> Vec<FileMessage> {
        let mut answers = Vec::new();
        let mut at = from;
        while at < to {
            let end = (at + MAX_FILE_CHUNK).min(to);
            answers.extend(d.handle(FileMessage::Data(FileData {
                id,
                offset: at as u64,
                bytes: content[at..end].to_vec(),
            })));
            at = end;
        }
        answers
    }

    fn content(len: usize, seed: u32) -> Vec<u8> {
        (0..len as u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13 ^ seed) as u8).collect()
    }

    #[test]
    fn a_file_arrives_checked_and_named() {
        let dir = tempfile::tempdir().unwrap();
        let mut d = Downloads::new(dir.path().join("Downloads"));
        let file = content(3 * 1024 * 1024 + 17, 1);
        assert_eq!(d.handle(offer(1, "report.pdf", &file)), vec![FileMessage::Accept { id: 1, offset: 0 }]);
        let answers = send(&mut d, 1, &file, 0, file.len());
        let progress: Vec<u64> = answers
            .iter()
            .filter_map(|a| match a {
                FileMessage::Progress { received, .. } => Some(*received),
                _ => None,
            })
            .collect();
        assert!(progress.len() >= 6 && progress.windows(2).all(|w| w[0] < w[1]), "{progress:?}");
        assert_eq!(progress.last(), Some(&(file.len() as u64)));
        assert_eq!(answers.last(), Some(&FileMessage::Done { id: 1, name: "report.pdf".into() }));
        assert_eq!(std::fs::read(dir.path().join("Downloads/report.pdf")).unwrap(), file);
        // Only the file: the partial is gone.
        assert_eq!(std::fs::read_dir(dir.path().join("Downloads")).unwrap().count(), 1);
        // The same name again: a numbered one, the first untouched.
        let other = content(1000, 2);
        d.handle(offer(2, "report.pdf", &other));
        let answers = send(&mut d, 2, &other, 0, other.len());
        assert_eq!(answers.last(), Some(&FileMessage::Done { id: 2, name: "report (2).pdf".into() }));
        assert_eq!(std::fs::read(dir.path().join("Downloads/report (2).pdf")).unwrap(), other);
        assert_eq!(std::fs::read(dir.path().join("Downloads/report.pdf")).unwrap(), file);
        assert_eq!(numbered(".bashrc", 3), ".bashrc (3)");
        assert_eq!(numbered("a.tar.gz", 2), "a.tar (2).gz");
    }

    #[test]
    fn an_interrupted_transfer_resumes_where_it_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let mut d = Downloads::new(dir.path().to_owned());
        let file = content(1024 * 1024 + 5, 3);
        d.handle(offer(1, "big.bin", &file));
        send(&mut d, 1, &file, 0, 400_000);
        d.interrupt_all();
        // A new connection, a new id: it goes on from 400,000.
        let mut d = Downloads::new(dir.path().to_owned());
        assert_eq!(
            d.handle(offer(7, "big.bin", &file)),
            vec![FileMessage::Accept { id: 7, offset: 400_000 }]
        );
        let answers = send(&mut d, 7, &file, 400_000, file.len());
        assert_eq!(answers.last(), Some(&FileMessage::Done { id: 7, name: "big.bin".into() }));
        assert_eq!(std::fs::read(dir.path().join("big.bin")).unwrap(), file);
        // Interrupted by a cancel: kept too; cancelled by the user: deleted.
        let second = content(200_000, 4);
        d.handle(offer(8, "b.bin", &second));
        send(&mut d, 8, &second, 0, 100_000);
        d.handle(FileMessage::Cancel { id: 8, reason: CancelReason::Interrupted });
        assert_eq!(
            d.handle(offer(9, "b.bin", &second)),
            vec![FileMessage::Accept { id: 9, offset: 100_000 }]
        );
        d.handle(FileMessage::Cancel { id: 9, reason: CancelReason::User });
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "only big.bin");
    }

    #[test]
    fn a_damaged_or_strange_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut d = Downloads::new(dir.path().to_owned());
        let file = content(100_000, 5);
        let mut wrong = FileOffer { id: 1, size: file.len() as u64, sha256: sha(b"other"), name: "x".into() };
        d.handle(FileMessage::Offer(wrong.clone()));
        let answers = send(&mut d, 1, &file, 0, file.len());
        assert_eq!(answers.last(), Some(&FileMessage::Refused { id: 1, reason: FileRefuseReason::Checksum }));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "what arrived is deleted");
        wrong.name = "../escape".into();
        assert_eq!(
            d.handle(FileMessage::Offer(wrong)),
            vec![FileMessage::Refused { id: 1, reason: FileRefuseReason::BadName }]
        );
        // Out of order: the transfer ends.
        d.handle(offer(2, "y", &file));
        let gap = FileMessage::Data(FileData { id: 2, offset: 10, bytes: vec![1] });
        assert_eq!(d.handle(gap), vec![FileMessage::Refused { id: 2, reason: FileRefuseReason::Failed }]);
        assert_eq!(d.open(), 0);
        // A link where the partial would be is not followed.
        let evil = FileOffer { id: 3, size: 4, sha256: sha(b"evil"), name: "z".into() };
        let target = dir.path().join("target");
        std::fs::write(&target, "keep").unwrap();
        std::os::unix::fs::symlink(
            &target,
            dir.path().join(format!(".pleiades-{}-4.part", hex(&evil.sha256))),
        )
        .unwrap();
        assert_eq!(
            d.handle(FileMessage::Offer(evil)),
            vec![FileMessage::Refused { id: 3, reason: FileRefuseReason::Failed }]
        );
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "keep");
    }

    #[test]
    fn an_empty_file_or_one_already_there_is_done_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let mut d = Downloads::new(dir.path().to_owned());
        assert_eq!(
            d.handle(offer(1, "empty", b"")),
            vec![FileMessage::Accept { id: 1, offset: 0 }, FileMessage::Done { id: 1, name: "empty".into() }]
        );
        assert_eq!(std::fs::read(dir.path().join("empty")).unwrap(), b"");
    }
}
