//! QMP, QEMU's JSON machine protocol: one connection, commands in, answers out (events are
//! skipped). `--vmm qemu` drives QEMU with it, and [`super::qemu_display`] hands QEMU a socket
//! through it.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::RawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

/// A QMP connection (QEMU's JSON machine protocol).
#[derive(Debug)]
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    /// Connects, reads the greeting and enters command mode.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() > deadline => {
                    return Err(e).with_context(|| format!("cannot connect to QMP at {}", path.display()));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut qmp = Self { reader: BufReader::new(stream.try_clone()?), writer: stream };
        let greeting = qmp.read_message()?;
        if greeting.get("QMP").is_none() {
            bail!("unexpected QMP greeting: {greeting}");
        }
        qmp.execute("qmp_capabilities", json!({}))?;
        Ok(qmp)
    }

    fn read_message(&mut self) -> Result<Value> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            bail!("QEMU closed the QMP connection");
        }
        Ok(serde_json::from_str(&line)?)
    }

    /// Runs a command and returns its `return` value; events in between are skipped.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value> {
        writeln!(self.writer, "{}", Self::request(command, arguments))?;
        self.answer(command)
    }

    /// Runs a command that takes a file descriptor (`getfd`), passed along with it.
    pub fn execute_with_fd(&mut self, command: &str, arguments: Value, fd: RawFd) -> Result<Value> {
        use vmm_sys_util::sock_ctrl_msg::ScmSocket;
        let line = format!("{}\n", Self::request(command, arguments));
        let sent = self
            .writer
            .send_with_fd(line.as_bytes(), fd)
            .map_err(|e| anyhow::anyhow!("QMP {command}: {e}"))?;
        if sent != line.len() {
            bail!("QMP {command}: the request was cut short");
        }
        self.answer(command)
    }

    fn request(command: &str, arguments: Value) -> Value {
        let mut request = json!({ "execute": command });
        if arguments.as_object().is_some_and(|a| !a.is_empty()) {
            request["arguments"] = arguments;
        }
        request
    }

    fn answer(&mut self, command: &str) -> Result<Value> {
        for _ in 0..1000 {
            let message = self.read_message()?;
            if let Some(value) = message.get("return") {
                return Ok(value.clone());
            }
            if let Some(error) = message.get("error") {
                bail!("QMP {command}: {}", error.get("desc").and_then(Value::as_str).unwrap_or("error"));
            }
        }
        bail!("QMP {command}: no answer among 1000 messages")
    }
}
