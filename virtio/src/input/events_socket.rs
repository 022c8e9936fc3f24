//! The host-side events socket of an input backend process (`pleiades-host device keyboard
//! --events SOCKET`).
//!
//! A Unix stream socket, mode 0600. A client connects, writes events as 8-byte
//! `virtio_input_event` records (le16 type, le16 code, le32 value) and closes; each
//! `SYN_REPORT` ends a report that is queued for the guest. A trailing partial record or an
//! unfinished report is dropped. Connections are served one at a time.

use std::io::{self, Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::device::InputSender;
use super::event::{EVENT_SIZE, InputEvent};

/// How long a client may take to send its events.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

/// Binds `path` (replacing a stale socket, never another kind of file) with mode 0600.
pub fn bind(path: &Path) -> io::Result<UnixListener> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ));
        }
        if UnixStream::connect(path).is_ok() {
            return Err(io::Error::new(io::ErrorKind::AddrInUse, format!("{} is in use", path.display())));
        }
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Binds `path` and feeds what arrives there to `sender`, on a thread of its own.
pub fn listen(path: &Path, sender: InputSender) -> io::Result<()> {
    let listener = bind(path)?;
    spawn(listener, sender, path.to_owned())
}

/// Serves `listener` on a thread of its own, feeding `sender`; runs as long as the process.
pub fn spawn(listener: UnixListener, sender: InputSender, path: PathBuf) -> io::Result<()> {
    std::thread::Builder::new().name("input-events".into()).spawn(move || {
        for stream in listener.incoming() {
            match stream {
                Ok(stream) => {
                    let _ = stream.set_read_timeout(Some(CLIENT_TIMEOUT));
                    if let Err(e) = serve_client(stream, sender.clone()) {
                        tracing::warn!("input events socket {}: {e}", path.display());
                    }
                }
                Err(e) => {
                    tracing::warn!("input events socket {}: accept failed: {e}", path.display());
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    })?;
    Ok(())
}

/// Reads one client's records until it closes.
pub fn serve_client(mut stream: impl Read, mut sender: InputSender) -> io::Result<()> {
    let mut record = [0u8; EVENT_SIZE];
    loop {
        match stream.read_exact(&mut record) {
            Ok(()) => sender.send(InputEvent::from_bytes(record)),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
    }
}

/// Sends `events` to the events socket at `path` (what `run` does for `ctl type/key/pointer`).
pub fn send(path: &Path, events: &[InputEvent]) -> io::Result<()> {
    let mut stream = UnixStream::connect(path)?;
    stream.set_write_timeout(Some(CLIENT_TIMEOUT))?;
    let bytes: Vec<u8> = events.iter().flat_map(|e| e.to_bytes()).collect();
    stream.write_all(&bytes)?;
    stream.shutdown(std::net::Shutdown::Write)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::input::Input;
    use crate::input::event::{BTN_LEFT, EV_ABS};
    use std::time::Instant;

    #[test]
    fn events_sent_to_the_socket_are_queued_as_reports() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tablet.events");
        let tablet = Input::tablet().unwrap();
        listen(&path, tablet.sender()).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // A second listener on a live socket is refused.
        assert!(bind(&path).is_err());

        send(&path, &[InputEvent::key(BTN_LEFT, true), InputEvent::syn()]).unwrap();
        // An unfinished report and a partial record are dropped when the client closes.
        let mut stream = UnixStream::connect(&path).unwrap();
        stream.write_all(&InputEvent::new(EV_ABS, 0, 1).to_bytes()).unwrap();
        stream.write_all(&[1, 2, 3]).unwrap();
        drop(stream);
        // Served one at a time: once a third client is through, the others are too.
        send(&path, &[InputEvent::syn()]).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while tablet.metrics().reports_queued.get() < 2 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(tablet.metrics().reports_queued.get(), 2);
        assert_eq!(tablet.pending_events(), 3);
    }

    #[test]
    fn a_file_in_the_way_is_not_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events");
        std::fs::write(&path, b"keep me").unwrap();
        assert!(bind(&path).unwrap_err().to_string().contains("not a socket"));
        assert_eq!(std::fs::read(&path).unwrap(), b"keep me");
    }
}
