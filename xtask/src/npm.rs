//! Node packages of the browser tests: `npm ci`, skipped when `node_modules` already matches
//! the lockfile.
//!
//! `playwright-core` is held at 1.61: 1.62 and later need Node.js 20, and Debian 12 has 18.
//! It drives Debian's own Chromium (`executablePath`), so no browser is downloaded.

use std::fs;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

/// Folders with a `package-lock.json` whose packages the tests need.
pub const PROJECTS: &[&str] = &["broker/tests/browser"];

/// Copy of the lockfile that `npm ci` last installed from, kept inside `node_modules`.
const STAMP: &str = "node_modules/.pleiades-installed-lock.json";

/// Runs `npm ci` in each project whose `node_modules` is missing or older than its lockfile.
pub fn ci(root: &Path) -> Result<()> {
    for project in PROJECTS {
        let dir = root.join(project);
        let lock = fs::read(dir.join("package-lock.json"))
            .with_context(|| format!("{project}/package-lock.json"))?;
        if fs::read(dir.join(STAMP)).is_ok_and(|installed| installed == lock) {
            println!("    {project}: node_modules up to date");
            continue;
        }
        let status =
            Command::new("npm").args(["ci", "--no-audit", "--no-fund"]).current_dir(&dir).status().context(
                "cannot run npm: install Node.js 18 or newer with npm (Debian: apt-get install nodejs npm)",
            )?;
        if !status.success() {
            bail!("`npm ci` failed in {project} ({status})");
        }
        fs::write(dir.join(STAMP), &lock)?;
        println!("    {project}: npm ci done");
    }
    Ok(())
}
