//! Device processes: `pleiades-host device <kind> --socket …`, one per vhost-user device,
//! started by either VMM and ended with the VM.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::DeviceKind;

/// A `pleiades-host device` process serving one device over vhost-user.
#[derive(Debug)]
pub struct DeviceProcess {
    pub kind: DeviceKind,
    pub socket: PathBuf,
    /// The events socket of an input backend (`--events`).
    pub events: Option<PathBuf>,
    pub child: Child,
}

impl Drop for DeviceProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// Starts `pleiades-host device <kind> --socket=<socket>` and waits for the socket.
pub fn start(kind: DeviceKind, socket: &Path) -> Result<DeviceProcess> {
    let exe = std::env::current_exe().context("cannot find the pleiades-host executable")?;
    let mut cmd = Command::new(exe);
    cmd.args(["device", kind.name()]).arg(flag("--socket=", socket)).stdin(Stdio::null());
    // Input backends take host events on a socket of their own (bound before `socket`).
    let events = kind.is_input().then(|| socket.with_extension("events"));
    if let Some(events) = &events {
        cmd.arg(flag("--events=", events));
    }
    let child = cmd.spawn().with_context(|| format!("cannot start the {kind} device backend"))?;
    let mut backend = DeviceProcess { kind, socket: socket.to_owned(), events, child };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        if let Ok(Some(status)) = backend.child.try_wait() {
            bail!("the {kind} device backend exited ({status}) before listening");
        }
        if Instant::now() > deadline {
            bail!("the {kind} device backend did not listen on {} within 10 s", socket.display());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(backend)
}

/// `--name=PATH` as one argument: a path that begins with `-` stays a path.
fn flag(name: &str, path: &Path) -> std::ffi::OsString {
    let mut arg = std::ffi::OsString::from(name);
    arg.push(path);
    arg
}
