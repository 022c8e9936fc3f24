//! Missing prerequisites: a failure under CI, a loud skip elsewhere.
//!
//! CI installs everything the tests need (`./dev test` runs `xtask deps` first), so under CI a
//! missing tool, device or server means the install is broken, and the test must fail instead of
//! passing green without having run. On a developer's machine the same test says, on the
//! terminal and not in the captured output the harness hides, that it did not run and why.
//!
//! Only a missing *prerequisite* goes through here. When the code under test fails (a GPU
//! adapter the client cannot open, a server that does not start) the test fails, always.

use std::io::Write;

/// Environment variable that CI sets (`.ci/run`; most CI systems set it too).
pub const CI_ENV: &str = "CI";

/// Whether this run is CI: `CI` is set to anything but empty, `0` or `false`.
pub fn under_ci() -> bool {
    std::env::var(CI_ENV).is_ok_and(|v| !matches!(v.trim().to_ascii_lowercase().as_str(), "" | "0" | "false"))
}

/// What a test should do about a missing prerequisite.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Missing {
    /// Not CI: the test returns early; the skip has been announced.
    Skip,
    /// CI: the test must fail with this message.
    Fail(String),
}

/// Decides, and announces a skip, for `test` whose prerequisite is missing because of `why`.
pub fn missing(test: &str, why: &str) -> Missing {
    decide(under_ci(), test, why)
}

fn decide(ci: bool, test: &str, why: &str) -> Missing {
    if ci {
        return Missing::Fail(format!(
            "{test}: a prerequisite is missing under CI, where `./dev test` installs everything: {why}"
        ));
    }
    // Straight to the terminal: libtest captures print!/eprint!, not the stderr handle itself.
    let _ = writeln!(std::io::stderr(), "\n*** SKIPPED {test}: {why} (under CI=true this fails) ***");
    Missing::Skip
}

/// Returns the prerequisite, or skips (not CI) or panics (CI) with `why`'s message.
///
/// ```no_run
/// let Some(tool) = pleiades_testkit::prerequisite::require("edid_check", which("edid-decode")) else {
///     return;
/// };
/// # fn which(_: &str) -> Result<std::path::PathBuf, String> { unimplemented!() }
/// ```
pub fn require<T, E: std::fmt::Display>(test: &str, found: Result<T, E>) -> Option<T> {
    match found {
        Ok(value) => Some(value),
        Err(why) => match missing(test, &why.to_string()) {
            Missing::Skip => None,
            Missing::Fail(message) => panic!("{message}"),
        },
    }
}

/// An executable on `PATH`, or why not.
pub fn command(name: &str) -> Result<std::path::PathBuf, String> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
        .ok_or_else(|| format!("`{name}` is not installed (`./dev deps` installs it)"))
}

/// Whether this process runs as root (its effective uid, from /proc/self/status).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("Uid:")).map(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_prerequisite_fails_under_ci_and_skips_elsewhere() {
        match decide(true, "t", "no edid-decode") {
            Missing::Fail(m) => assert!(m.contains("t:") && m.contains("no edid-decode"), "{m}"),
            Missing::Skip => panic!("CI must fail"),
        }
        assert_eq!(decide(false, "t", "no edid-decode"), Missing::Skip);
    }

    #[test]
    fn commands_are_found_on_path() {
        assert!(command("sh").is_ok());
        let e = command("pleiades-no-such-tool").unwrap_err();
        assert!(e.contains("not installed"), "{e}");
    }
}
