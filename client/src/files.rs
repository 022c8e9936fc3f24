//! Files sent into the desktop: `pleiades send TARGET FILE…`, `connect --send FILE`, and files
//! dropped on the window. They land in the desktop user's Downloads (docs/client.md, "Files").
//!
//! The queue ([`FileQueue`]) outlives sessions: each session that has `FILES` runs
//! [`send_files`] over it, one file at a time. A file is offered with its size and SHA-256
//! (computed here first); the desktop answers with the offset it already has (an earlier,
//! interrupted transfer of the same file), and the client sends from there, at most
//! [`FILE_WINDOW`] beyond what the desktop reported written. When the connection drops, the
//! file stays queued and the next session (a resume, or a new connection) offers it again: it
//! continues where the desktop's partial file ends. The desktop checks the SHA-256 before the
//! file takes its name; a refusal says why ([`FileRefuseReason`]).

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use pleiades_protocol::handshake::Capabilities;
use pleiades_protocol::wire::{
    CancelReason, FILE_WINDOW, FileData, FileMessage, FileOffer, FileRefuseReason, MAX_FILE_BYTES,
    MAX_FILE_CHUNK, file_name_ok,
};
use serde::Serialize;
use tokio::sync::{Notify, mpsc};

use crate::session::SessionHandle;

/// Bytes of file data the client lets wait for the files stream (beyond that it waits for the
/// stream to take them, so the window's bytes are not all queued at once).
const STREAM_QUEUE: u64 = 1 << 20;
/// Pause before offering again a file the desktop could not take now (busy, interrupted).
const RETRY_PAUSE: Duration = Duration::from_secs(2);
/// Offers of one file refused with a "later" reason before it counts as failed.
const MAX_RETRIES: u32 = 30;

/// Where a file stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum FileState {
    /// Waiting for a session (or for its turn).
    Queued,
    /// Being sent.
    Sending,
    /// In the desktop's Downloads under `stored_as`, its SHA-256 checked there.
    Done { stored_as: String },
    /// Given up, and why.
    Failed { reason: String },
}

/// One file to send, and what happened to it.
#[derive(Debug, Clone, Serialize)]
pub struct OutgoingFile {
    #[serde(skip)]
    pub path: PathBuf,
    pub name: String,
    pub size: u64,
    /// Hex.
    pub sha256: String,
    #[serde(skip)]
    digest: [u8; 32],
    #[serde(flatten)]
    pub state: FileState,
    /// What the desktop said it had when the file was last accepted (> 0: a resume).
    pub accepted_at: Vec<u64>,
    /// Bytes the desktop reported written.
    pub received: u64,
    /// Bytes this client sent, in all sessions (more than the size when data in flight was
    /// lost with a connection).
    pub sent: u64,
    /// Seconds from the desktop's first accept to its done (or to now): the transfer itself,
    /// without the hashing before it.
    pub elapsed_s: f64,
    #[serde(skip)]
    retries: u32,
    #[serde(skip)]
    first_accept: Option<std::time::Instant>,
}

impl OutgoingFile {
    /// Reads `path` whole once for its SHA-256 (blocking: call it off the async runtime).
    pub fn prepare(path: &Path) -> Result<Self, String> {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .filter(|n| file_name_ok(n))
            .ok_or_else(|| format!("{}: not a file name the desktop takes", path.display()))?
            .to_owned();
        let mut file =
            std::fs::File::open(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let metadata = file.metadata().map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        if !metadata.is_file() {
            return Err(format!("{} is not a regular file", path.display()));
        }
        if metadata.len() > MAX_FILE_BYTES {
            return Err(format!("{} is larger than {} GiB", path.display(), MAX_FILE_BYTES >> 30));
        }
        let mut hash = ring::digest::Context::new(&ring::digest::SHA256);
        let mut buf = vec![0u8; 1 << 20];
        let mut size = 0u64;
        loop {
            let n = file.read(&mut buf).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            if n == 0 {
                break;
            }
            hash.update(&buf[..n]);
            size += n as u64;
        }
        let digest: [u8; 32] = hash.finish().as_ref().try_into().expect("SHA-256 is 32 bytes");
        Ok(Self {
            path: path.to_owned(),
            name,
            size,
            sha256: digest.iter().map(|b| format!("{b:02x}")).collect(),
            digest,
            state: FileState::Queued,
            accepted_at: Vec::new(),
            received: 0,
            sent: 0,
            elapsed_s: 0.0,
            retries: 0,
            first_accept: None,
        })
    }

    fn offer(&self, id: u32) -> FileMessage {
        FileMessage::Offer(FileOffer { id, size: self.size, sha256: self.digest, name: self.name.clone() })
    }
}

/// The files to send, shared by the sessions that send them and whoever shows progress.
#[derive(Debug, Clone, Default)]
pub struct FileQueue {
    files: Arc<Mutex<Vec<OutgoingFile>>>,
    changed: Arc<Notify>,
}

impl FileQueue {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Vec<OutgoingFile>> {
        self.files.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn push(&self, file: OutgoingFile) {
        self.lock().push(file);
        self.changed.notify_waiters();
        self.changed.notify_one();
    }

    /// Every file and where it stands.
    pub fn snapshot(&self) -> Vec<OutgoingFile> {
        self.lock().clone()
    }

    /// Whether every file is done or failed.
    pub fn finished(&self) -> bool {
        self.lock().iter().all(|f| matches!(f.state, FileState::Done { .. } | FileState::Failed { .. }))
    }

    /// Waits until something changed (a file added, progress, an end).
    pub async fn changed(&self) {
        self.changed.notified().await;
    }

    fn update(&self, index: usize, f: impl FnOnce(&mut OutgoingFile)) {
        if let Some(file) = self.lock().get_mut(index) {
            f(file);
        }
        self.changed.notify_waiters();
    }

    /// A file that was being sent when its session ended goes back to the queue (the next
    /// session resumes it).
    pub fn requeue_interrupted(&self) {
        for file in self.lock().iter_mut() {
            if file.state == FileState::Sending {
                file.state = FileState::Queued;
            }
        }
        self.changed.notify_waiters();
    }

    /// One line for a window's title: the file being sent and how far, or the last one's end.
    pub fn status_line(&self) -> Option<String> {
        let files = self.lock();
        if let Some(f) = files.iter().find(|f| f.state == FileState::Sending) {
            let percent = (f.received * 100).checked_div(f.size).unwrap_or(100);
            let waiting = files.iter().filter(|f| f.state == FileState::Queued).count();
            let more = if waiting > 0 { format!(" (+{waiting} queued)") } else { String::new() };
            return Some(format!("sending {} {percent} %{more}", f.name));
        }
        match &files.last()?.state {
            FileState::Done { stored_as } => Some(format!("sent to Downloads/{stored_as}")),
            FileState::Failed { reason } => Some(format!("not sent: {reason}")),
            FileState::Queued => Some("files waiting for the desktop".into()),
            FileState::Sending => None,
        }
    }

    /// The next file to send.
    fn next(&self) -> Option<(usize, OutgoingFile)> {
        let files = self.lock();
        files.iter().position(|f| f.state == FileState::Queued).map(|i| (i, files[i].clone()))
    }
}

/// How one transfer went.
enum Outcome {
    Done(String),
    Refused(FileRefuseReason),
    /// The session ended (the file stays queued for the next one).
    SessionOver,
    LocalError(String),
}

/// Sends the queue's files over `session`, one at a time, for as long as the session lasts
/// (then the file in progress goes back to the queue). Returns at once without `FILES`.
pub async fn send_files(session: SessionHandle, queue: FileQueue) {
    if !session.info().capabilities.contains(Capabilities::FILES) {
        tracing::info!("the desktop takes no files");
        return;
    }
    let (tx, mut answers) = mpsc::unbounded_channel();
    session.on_files(move |message| {
        let _ = tx.send(message);
    });
    let mut next_id = 1u32;
    loop {
        let Some((index, file)) = queue.next() else {
            queue.changed().await;
            continue;
        };
        let id = next_id;
        next_id = next_id.wrapping_add(1);
        queue.update(index, |f| f.state = FileState::Sending);
        let outcome = transfer(&session, &queue, index, &file, id, &mut answers).await;
        let end = match outcome {
            Outcome::Done(stored_as) => {
                tracing::info!(
                    name = file.name,
                    stored_as,
                    size = file.size,
                    "sent: the file is in the desktop's Downloads"
                );
                FileState::Done { stored_as }
            }
            Outcome::Refused(reason) if reason.retry_later() && file.retries < MAX_RETRIES => {
                tracing::info!(
                    name = file.name,
                    ?reason,
                    "the desktop cannot take the file now; offering it again"
                );
                queue.update(index, |f| f.retries += 1);
                tokio::time::sleep(RETRY_PAUSE).await;
                FileState::Queued
            }
            Outcome::Refused(reason) => {
                tracing::warn!(name = file.name, ?reason, "not sent: {}", reason.describe());
                FileState::Failed { reason: reason.describe().to_owned() }
            }
            Outcome::LocalError(why) => {
                tracing::warn!(name = file.name, "not sent: {why}");
                let _ = session.send_file_message(FileMessage::Cancel { id, reason: CancelReason::User });
                FileState::Failed { reason: why }
            }
            Outcome::SessionOver => {
                queue.update(index, |f| f.state = FileState::Queued);
                return;
            }
        };
        queue.update(index, |f| f.state = end);
    }
}

/// Offers `file` as transfer `id` and sends it as the desktop's answers allow.
async fn transfer(
    session: &SessionHandle,
    queue: &FileQueue,
    index: usize,
    file: &OutgoingFile,
    id: u32,
    answers: &mut mpsc::UnboundedReceiver<FileMessage>,
) -> Outcome {
    if !session.send_file_message(file.offer(id)) {
        return Outcome::SessionOver;
    }
    let mut local: Option<std::fs::File> = None;
    // Sent up to `next`; the desktop allows up to `limit`.
    let (mut next, mut limit) = (0u64, 0u64);
    let mut buf = vec![0u8; MAX_FILE_CHUNK];
    loop {
        // Send what the window and the stream's queue allow.
        while let Some(reader) = local.as_mut()
            && next < limit.min(file.size)
            && session.files_queued() < STREAM_QUEUE
        {
            let want = (limit.min(file.size) - next).min(MAX_FILE_CHUNK as u64) as usize;
            let n = match reader.read(&mut buf[..want]) {
                Ok(0) => {
                    return Outcome::LocalError(format!(
                        "{} became shorter while sending",
                        file.path.display()
                    ));
                }
                Ok(n) => n,
                Err(e) => return Outcome::LocalError(format!("cannot read {}: {e}", file.path.display())),
            };
            let data = FileData { id, offset: next, bytes: buf[..n].to_vec() };
            if !session.send_file_message(FileMessage::Data(data)) {
                return Outcome::SessionOver;
            }
            next += n as u64;
            queue.update(index, |f| f.sent += n as u64);
        }
        // The stream's queue drains on its own: look again soon when only it holds us back.
        let waiting_for_stream = local.is_some() && next < limit.min(file.size);
        let answer = if waiting_for_stream {
            match tokio::time::timeout(Duration::from_millis(5), answers.recv()).await {
                Ok(answer) => answer,
                Err(_) => continue,
            }
        } else {
            answers.recv().await
        };
        let Some(answer) = answer else { return Outcome::SessionOver };
        if answer.id() != id {
            continue;
        }
        match answer {
            FileMessage::Accept { offset, .. } if local.is_none() && offset <= file.size => {
                let mut reader = match std::fs::File::open(&file.path) {
                    Ok(reader) => reader,
                    Err(e) => {
                        return Outcome::LocalError(format!("cannot read {}: {e}", file.path.display()));
                    }
                };
                if let Err(e) = reader.seek(SeekFrom::Start(offset)) {
                    return Outcome::LocalError(format!("cannot read {}: {e}", file.path.display()));
                }
                if offset > 0 {
                    tracing::info!(
                        name = file.name,
                        offset,
                        "resuming: the desktop has the first {offset} bytes"
                    );
                }
                local = Some(reader);
                next = offset;
                limit = offset + FILE_WINDOW;
                queue.update(index, |f| {
                    f.accepted_at.push(offset);
                    f.received = offset;
                    f.first_accept.get_or_insert_with(std::time::Instant::now);
                });
            }
            FileMessage::Progress { received, .. } => {
                limit = limit.max(received + FILE_WINDOW);
                queue.update(index, |f| {
                    f.received = received;
                    f.elapsed_s = f.first_accept.map_or(0.0, |at| at.elapsed().as_secs_f64());
                });
            }
            FileMessage::Done { name, .. } => {
                queue.update(index, |f| {
                    f.elapsed_s = f.first_accept.map_or(0.0, |at| at.elapsed().as_secs_f64())
                });
                return Outcome::Done(name);
            }
            FileMessage::Refused { reason, .. } => return Outcome::Refused(reason),
            other => tracing::debug!(?other, "an unexpected file message"),
        }
    }
}

/// Without a datagram from the server for this long (it pings every second) the path counts as
/// down and `pleiades send` resumes (as the window does).
const STALL: Duration = Duration::from_secs(3);

/// `pleiades send`: connects with `connection`'s ticket and sends the queue's files; when the
/// path goes silent or the connection is lost, resumes the session with its one-time resume
/// token (backing off, for as long as the token lives) and goes on where the desktop's partial
/// file ends. Returns when every file is done or failed (`Err` when the desktop could not be
/// reached again, with the files' states in the queue).
pub async fn send_until_done(
    connection: &pleiades_protocol::connfile::Connection,
    options: crate::session::SessionOptions,
    queue: &FileQueue,
) -> Result<(), crate::ClientError> {
    use crate::session::{Session, SessionEvent};
    let mut credential = connection.ticket.clone();
    let mut lost: Option<std::time::Instant> = None;
    let lifetime = Duration::from_secs(pleiades_protocol::resume::RESUME_LIFETIME_S);
    let mut attempt = 0u32;
    loop {
        let started = async {
            let connected = crate::connect::connect(connection).await?;
            Session::start(connected, &credential, options.clone()).await
        }
        .await;
        let mut session = match started {
            Ok(session) => session,
            Err(error) => {
                let retry = lost.is_some_and(|at| at.elapsed() < lifetime)
                    && matches!(
                        error,
                        crate::ClientError::Unreachable { .. }
                            | crate::ClientError::HandshakeTimeout
                            | crate::ClientError::ConnectionLost(_)
                            | crate::ClientError::Stream { .. }
                    );
                if !retry {
                    return Err(error);
                }
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(250 << attempt.min(4))).await;
                continue;
            }
        };
        if lost.take().is_some() {
            tracing::info!(attempt, "the session resumed; the files go on");
        }
        attempt = 0;
        if !session.handle.info().capabilities.contains(Capabilities::FILES) {
            session.disconnect("no files").await;
            return Err(crate::ClientError::NoFiles);
        }
        let sender = tokio::spawn(send_files(session.handle.clone(), queue.clone()));
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        let mut heard = (session.handle.datagrams_received(), std::time::Instant::now());
        let why = loop {
            tokio::select! {
                event = session.next_event() => match event {
                    Some(SessionEvent::Goodbye(goodbye)) => break Err(format!("the server ended the session: {}", goodbye.message)),
                    Some(SessionEvent::ServerClosed(reason)) => break Err(format!("the server closed the session: {reason}")),
                    Some(SessionEvent::Failed(crate::ClientError::ConnectionLost(e))) => break Ok(e.to_string()),
                    Some(SessionEvent::Failed(error)) => break Err(error.to_string()),
                    None => break Ok("the session's tasks ended".into()),
                    Some(_) => {}
                },
                _ = tick.tick() => {
                    if queue.finished() {
                        sender.abort();
                        session.disconnect("the files are sent").await;
                        return Ok(());
                    }
                    let datagrams = session.handle.datagrams_received();
                    if datagrams != heard.0 {
                        heard = (datagrams, std::time::Instant::now());
                    } else if heard.1.elapsed() >= STALL {
                        break Ok(format!("no answer from the server for {} s", STALL.as_secs()));
                    }
                }
            }
        };
        sender.abort();
        let _ = sender.await;
        // The file in progress goes back to the queue for the next session.
        queue.requeue_interrupted();
        let token = session.handle.resume_token();
        match (why, token) {
            (Ok(why), Some(token)) => {
                tracing::warn!(%why, "the connection is lost; resuming");
                credential = token;
                lost = Some(std::time::Instant::now());
            }
            (Ok(why), None) | (Err(why), _) => {
                return Err(crate::ClientError::Interrupted(why));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_is_prepared_with_its_size_and_sha256() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hello.txt");
        std::fs::write(&path, b"hello").unwrap();
        let file = OutgoingFile::prepare(&path).unwrap();
        assert_eq!((file.name.as_str(), file.size), ("hello.txt", 5));
        // sha256("hello"), from coreutils.
        assert_eq!(file.sha256, "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824");
        assert!(OutgoingFile::prepare(dir.path()).unwrap_err().contains("not a regular file"));
        assert!(OutgoingFile::prepare(&dir.path().join("missing")).unwrap_err().contains("cannot read"));
        let json = serde_json::to_value(&file).unwrap();
        assert_eq!(json["state"], "queued");
    }
}
