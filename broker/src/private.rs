//! The broker's private files: the state directory (mode 0700), and the secrets in it (mode
//! 0600): the ticket signing key and the generated TLS key. The database file is made 0600 too
//! ([`crate::db`]).

use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::Path;

/// Creates `dir` (and missing parents) with mode 0700. An existing directory is left as it is,
/// with a warning when others may enter it.
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    let mode = std::fs::metadata(dir)?.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        tracing::warn!(
            "the broker's state directory {} has mode {mode:03o}: others may reach its files (chmod 700 it)",
            dir.display()
        );
    }
    Ok(())
}

/// Writes `bytes` to `path` (mode 0600), replacing it.
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// Creates `path` (mode 0600) holding `bytes`, whole, unless it exists: `Ok(false)` then. The
/// bytes go to a temporary file first, which is then linked to `path`; so a concurrent reader
/// never sees half a file, and of two writers one wins.
pub fn create_private(path: &Path, bytes: &[u8]) -> std::io::Result<bool> {
    let mut tmp_name = path.file_name().unwrap_or_default().to_owned();
    tmp_name.push(format!(".{}.tmp", crate::secret::random_hex(6)));
    let tmp = path.with_file_name(tmp_name);
    let written = (|| {
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()
    })();
    let linked = written.and_then(|()| std::fs::hard_link(&tmp, path));
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(e),
    }
}

/// Reads a secret file: `None` when there is none; an error when others may read it.
pub fn read_private(path: &Path) -> std::io::Result<Option<Vec<u8>>> {
    let mode = match std::fs::metadata(path) {
        Ok(m) => m.permissions().mode() & 0o777,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    if mode & 0o077 != 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!("{} has mode {mode:03o}: others may read this secret (chmod 600 it)", path.display()),
        ));
    }
    std::fs::read(path).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_files_are_created_once_and_whole() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("a/state");
        create_private_dir(&state).unwrap();
        assert_eq!(std::fs::metadata(&state).unwrap().permissions().mode() & 0o777, 0o700);
        let key = state.join("key");
        assert!(create_private(&key, b"first").unwrap());
        assert!(!create_private(&key, b"second").unwrap(), "an existing file is kept");
        assert_eq!(read_private(&key).unwrap().unwrap(), b"first");
        assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(std::fs::read_dir(&state).unwrap().count(), 1, "no temporary file is left");
        assert!(read_private(&state.join("none")).unwrap().is_none());
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(read_private(&key).unwrap_err().to_string().contains("chmod 600"));
    }
}
