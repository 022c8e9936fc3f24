//! A private X server (Xvfb) for tests that need an X display; killed on drop.

use std::io::BufRead;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// How long Xvfb may take to start listening.
const START: Duration = Duration::from_secs(30);

/// A private X server on a display number of its own; killed on drop.
#[derive(Debug)]
pub struct Xvfb {
    child: Child,
    display: String,
}

impl Xvfb {
    /// Starts Xvfb with one `width`×`height` 24-bit screen, on a display number it picks
    /// itself (`-displayfd`): the server takes the first number whose lock it can create, so
    /// tests running at once never share a screen (choosing the number here raced: two tests
    /// saw the same free number, the loser's check found the winner's socket, and both drove
    /// one screen). No TCP; `-noreset` keeps the server when its last client leaves.
    pub fn start(width: u32, height: u32) -> Result<Xvfb, String> {
        let screen = format!("{width}x{height}x24");
        let mut child = Command::new("Xvfb")
            .args(["-displayfd", "1", "-screen", "0", &screen, "-nolisten", "tcp", "-noreset"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot run Xvfb (apt install xvfb): {e}"))?;
        // Xvfb writes the number once it listens; read it on a thread so that the wait is bounded.
        let Some(stdout) = child.stdout.take() else { unreachable!("stdout is piped") };
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = std::io::BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let mut xvfb = Xvfb { child, display: String::new() };
        match rx.recv_timeout(START) {
            Ok(line) if line.trim().parse::<u32>().is_ok() => {
                xvfb.display = format!(":{}", line.trim());
                Ok(xvfb)
            }
            other => {
                let status = xvfb.child.try_wait().ok().flatten();
                Err(format!("Xvfb did not say which display it serves ({other:?}, exit status {status:?})"))
            }
        }
    }

    /// The display's name, for `DISPLAY` (`:N`).
    pub fn display(&self) -> &str {
        &self.display
    }

    /// `program`, to be run on this display.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        cmd.env("DISPLAY", &self.display);
        cmd
    }

    /// `bytes` copied to this display's CLIPBOARD as `target` (a MIME type or an atom) by an
    /// `xclip` that holds the selection in the foreground: it exits when another client takes
    /// the selection, which tells the caller that the other client's copy arrived.
    pub fn copy(&self, target: &str, bytes: &[u8]) -> std::io::Result<Child> {
        use std::io::Write;
        let mut holder = self
            .command("xclip")
            .args(["-quiet", "-selection", "clipboard", "-t", target])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        if let Some(mut stdin) = holder.stdin.take() {
            stdin.write_all(bytes)?;
        }
        Ok(holder)
    }

    /// What a paste of this display's CLIPBOARD as `target` gives (`xclip -o`, given at most
    /// `timeout`); `None` if it failed.
    pub fn paste(&self, target: &str, timeout: Duration) -> Option<Vec<u8>> {
        let output = self
            .command("timeout")
            .arg(timeout.as_secs().max(1).to_string())
            .args(["xclip", "-o", "-selection", "clipboard", "-t", target])
            .stderr(Stdio::null())
            .output()
            .ok()?;
        output.status.success().then_some(output.stdout)
    }
}

impl Drop for Xvfb {
    fn drop(&mut self) {
        // SIGTERM first: Xvfb then removes its socket and lock file.
        let _ = Command::new("kill").arg(self.child.id().to_string()).status();
        let gone =
            crate::wait_for("Xvfb to exit", Duration::from_secs(5), || self.child.try_wait().ok().flatten());
        if gone.is_err() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
