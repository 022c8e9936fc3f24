//! Pleiades' small shared test fixtures, for every crate's tests and for the bootstrap.
//!
//! Invariant: this crate stays light (std, `tempfile`, `thiserror`). `xtask` builds it before
//! any Debian package is installed, and the broker's tests use it without building the host.
//!
//! - [`image`]: where the test guest image lives (`target/guest/`, built by
//!   `cargo xtask guest-image`).
//! - [`postgres`]: a private PostgreSQL server on loopback for database tests.
//! - [`slapd`]: a private OpenLDAP server on loopback for directory sign-in tests.
//! - [`prerequisite`]: what a test does when something it needs is missing: under CI
//!   (`CI=true`) it fails, elsewhere it says loudly that it skipped.
//! - [`xvfb`]: a private X server (Xvfb) for tests that need a display.
//! - [`wait_for`]: polling for a condition with a bound, instead of sleeping a fixed time.

pub mod image;
pub mod postgres;
pub mod prerequisite;
pub mod slapd;
pub mod xvfb;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The workspace root (this crate sits one level below it).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_default()
}

/// Polls `f` every 250 ms until it gives a value or `timeout` passes.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Result<T, String> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            return Err(format!("timed out after {} s waiting for {what}", timeout.as_secs()));
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_for_returns_the_first_value_or_says_what_it_waited_for() {
        let mut n = 0;
        assert_eq!(
            wait_for("n to reach 3", Duration::from_secs(10), || {
                n += 1;
                (n >= 3).then_some(n)
            }),
            Ok(3)
        );
        let e = wait_for::<()>("nothing", Duration::ZERO, || None).unwrap_err();
        assert!(e.contains("waiting for nothing"), "{e}");
    }
}
