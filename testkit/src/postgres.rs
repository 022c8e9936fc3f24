//! A private PostgreSQL server for tests, on 127.0.0.1 and a free port.
//!
//! [`PgServer::start`] copies a cluster template (made once with `initdb` and cached under the
//! temp directory, keyed by the server version), starts `postgres` with its own unix-socket
//! directory, and stops it when dropped. Debian's server binaries live in
//! `/usr/lib/postgresql/<version>/bin` (package `postgresql`, installed by `./dev deps`);
//! `PLEIADES_PG_BIN` points elsewhere. PostgreSQL refuses to run as root, so as root every
//! server command runs as the `postgres` user (`runuser`) in a directory that user owns.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Why a test PostgreSQL could not be started.
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error(
        "PostgreSQL server binaries not found ({0}). Install them with `./dev deps` \
         (group postgresql), or point PLEIADES_PG_BIN at a directory holding initdb, pg_ctl, postgres"
    )]
    Missing(String),
    #[error("`{command}` failed: {detail}")]
    Command { command: String, detail: String },
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}

/// A running server; stopped (immediate shutdown) and deleted on drop.
#[derive(Debug)]
pub struct PgServer {
    bin: PathBuf,
    dir: tempfile::TempDir,
    port: u16,
}

fn bin_dir() -> Result<PathBuf, PgError> {
    if let Some(dir) = std::env::var_os("PLEIADES_PG_BIN") {
        let dir = PathBuf::from(dir);
        return if dir.join("postgres").exists() {
            Ok(dir)
        } else {
            Err(PgError::Missing(format!("{}/postgres", dir.display())))
        };
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("postgres").exists().then_some((version, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, b)| b).ok_or_else(|| PgError::Missing("/usr/lib/postgresql/*/bin/postgres".into()))
}

/// Runs a server binary, as `postgres` when we are root.
fn pg_command(bin: &Path, tool: &str, args: &[&str]) -> Result<Output, PgError> {
    let exe = bin.join(tool);
    let mut cmd = if crate::prerequisite::is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(&exe);
        c
    } else {
        Command::new(&exe)
    };
    let out = cmd.args(args).current_dir("/").output()?;
    if !out.status.success() {
        return Err(PgError::Command {
            command: format!("{tool} {}", args.join(" ")),
            detail: format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        });
    }
    Ok(out)
}

fn chown_to_postgres(path: &Path) -> Result<(), PgError> {
    if crate::prerequisite::is_root() {
        let out = Command::new("chown").args(["-R", "postgres:postgres"]).arg(path).output()?;
        if !out.status.success() {
            return Err(PgError::Command {
                command: format!("chown -R postgres {}", path.display()),
                detail: String::from_utf8_lossy(&out.stderr).into_owned(),
            });
        }
    }
    Ok(())
}

/// The cached `initdb` output for this server version, made once per machine.
///
/// Tests of one binary run on threads of one process and several test binaries run at once, so
/// the template is built under an exclusive lock (`flock` on a file beside it), in a private
/// directory that is renamed into place only when `initdb` has finished: a reader sees no
/// template or a whole one, never half of one.
fn template(bin: &Path) -> Result<PathBuf, PgError> {
    let version = bin.parent().and_then(|p| p.file_name()).and_then(|n| n.to_str()).unwrap_or("x").to_owned();
    let tmp = std::env::temp_dir();
    let root = tmp.join(format!("pleiades-pg-template-{version}"));
    if root.join("PG_VERSION").exists() {
        return Ok(root);
    }
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(tmp.join(format!("pleiades-pg-template-{version}.lock")))?;
    lock.lock()?;
    if root.join("PG_VERSION").exists() {
        return Ok(root); // Made by whoever held the lock before us.
    }
    // A template left half-made by a killed run (no PG_VERSION yet) is not to be trusted.
    if root.exists() {
        std::fs::remove_dir_all(&root)?;
    }
    let building = tempfile::Builder::new().prefix("pleiades-pg-template-building-").tempdir_in(&tmp)?;
    let data = building.path().join("data");
    std::fs::create_dir(&data)?;
    chown_to_postgres(building.path())?;
    let dir = data.to_str().expect("temp paths are UTF-8");
    pg_command(
        bin,
        "initdb",
        &["-D", dir, "-U", "postgres", "--auth=trust", "-E", "UTF8", "--locale=C", "--no-sync"],
    )?;
    std::fs::rename(&data, &root)?;
    drop(lock);
    Ok(root)
}

/// Stops the server if this process dies without dropping it (a killed or aborted test): a
/// detached shell polls our pid once a second. After a normal drop its `pg_ctl stop` finds no
/// server and does nothing.
fn watchdog(bin: &Path, data: &str) -> Result<(), PgError> {
    let pg_ctl = bin.join("pg_ctl");
    let stop = if crate::prerequisite::is_root() { "runuser -u postgres -- \"$1\"" } else { "\"$1\"" };
    let script = format!(
        "while kill -0 {} 2>/dev/null; do sleep 1; done; exec {stop} -D \"$2\" -m immediate stop",
        std::process::id()
    );
    Command::new("sh")
        .args(["-c", &script, "pleiades-pg-watchdog"])
        .arg(&pg_ctl)
        .arg(data)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    Ok(())
}

fn free_port() -> Result<u16, PgError> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl PgServer {
    /// Starts a fresh, empty server (database `postgres` only).
    pub fn start() -> Result<Self, PgError> {
        let bin = bin_dir()?;
        let template = template(&bin)?;
        let dir = tempfile::Builder::new().prefix("pleiades-pg-").tempdir()?;
        let data = dir.path().join("data");
        let out = Command::new("cp").arg("-a").arg(&template).arg(&data).output()?;
        if !out.status.success() {
            return Err(PgError::Command {
                command: "cp -a".into(),
                detail: String::from_utf8_lossy(&out.stderr).into_owned(),
            });
        }
        chown_to_postgres(dir.path())?;
        let data = data.to_str().expect("temp paths are UTF-8").to_owned();
        let log = dir.path().join("server.log");
        let log = log.to_str().expect("temp paths are UTF-8").to_owned();
        let sock = dir.path().to_str().expect("temp paths are UTF-8").to_owned();
        let mut last = None;
        // A port picked free can be taken before the server binds it: try a few.
        for _ in 0..5 {
            let port = free_port()?;
            let opts = format!(
                "-c listen_addresses=127.0.0.1 -p {port} -k {sock} -c fsync=off -c synchronous_commit=off \
                 -c full_page_writes=off -c max_connections=200"
            );
            match pg_command(
                &bin,
                "pg_ctl",
                &["-D", &data, "-l", &log, "-w", "-t", "60", "-o", &opts, "start"],
            ) {
                Ok(_) => {
                    watchdog(&bin, &data)?;
                    return Ok(Self { bin, dir, port });
                }
                Err(e) => last = Some(e),
            }
        }
        let tail = std::fs::read_to_string(dir.path().join("server.log")).unwrap_or_default();
        Err(match last {
            Some(PgError::Command { command, detail }) => {
                PgError::Command { command, detail: format!("{detail}\n{tail}") }
            }
            Some(e) => e,
            None => PgError::Missing("pg_ctl".into()),
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Creates a database and returns its URL (`postgres://postgres@127.0.0.1:PORT/NAME`).
    pub fn create_database(&self, name: &str) -> Result<String, PgError> {
        let port = self.port.to_string();
        pg_command(&self.bin, "createdb", &["-h", "127.0.0.1", "-p", &port, "-U", "postgres", name])?;
        Ok(self.url(name))
    }

    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let data = self.dir.path().join("data");
        let _ = pg_command(
            &self.bin,
            "pg_ctl",
            &["-D", data.to_str().unwrap_or_default(), "-m", "immediate", "-w", "stop"],
        );
    }
}
