//! A Linux test guest served over the session protocol: `pleiades-host run --vmm qemu
//! --device … --listen 127.0.0.1:0 --connection-file …` with its control socket, the start of
//! the session, audio and window end-to-end tests.

use std::path::{Path, PathBuf};
use std::time::Duration;

use pleiades_agent::ready::GuestInfo;
use pleiades_control::png_of_answer;
use pleiades_control::screenshot::decode_png;
use pleiades_control::{self as control, Request};
use pleiades_virtio::gpu::Framebuffer;

use crate::image::GuestImage;
use crate::qemu::{Guest, WAIT_FOR_TTY1_SHELL, boot_timeout};
use crate::workspace_binary;

/// A new connection (a fresh one-time ticket, `ctl connection-file`) to the VM whose control
/// socket is `control`, through the link emulator `link` when one is given.
pub fn mint_connection(
    control: &Path,
    link: Option<&crate::linkem::Link>,
) -> pleiades_protocol::connfile::Connection {
    let response = control::request(control, &Request::ConnectionFile, CONTROL_TIMEOUT).unwrap();
    assert!(response.ok, "{response:?}");
    let connection = pleiades_protocol::connfile::Connection::from_toml(
        response.result.unwrap()["toml"].as_str().unwrap(),
    )
    .unwrap();
    match link {
        Some(link) => pleiades_protocol::connfile::Connection {
            host: link.client_addr().ip().to_string(),
            port: link.client_addr().port(),
            ..connection
        },
        None => connection,
    }
}

/// A booted, served guest; its files (control socket, connection files, recordings) live in
/// `dir`, removed with it.
#[derive(Debug)]
pub struct ServedDesktop {
    pub guest: Guest,
    pub dir: tempfile::TempDir,
}

const CONTROL_TIMEOUT: Duration = Duration::from_secs(30);

impl ServedDesktop {
    /// Boots the test image with these `--device`s, serving on loopback, and waits for READY.
    pub fn boot(devices: &[&str]) -> (Self, GuestInfo) {
        Self::boot_with(devices, &[])
    }

    /// [`ServedDesktop::boot`] with more arguments for `run` (policies).
    pub fn boot_with(devices: &[&str], extra: &[&str]) -> (Self, GuestInfo) {
        Self::boot_host(&workspace_binary("pleiades-host").unwrap(), devices, extra)
    }

    /// [`ServedDesktop::boot_with`] with the `pleiades-host` binary at `host` (a benchmark that
    /// has just built it, without [`workspace_binary`]'s check against newer sources).
    pub fn boot_host(host: &Path, devices: &[&str], extra: &[&str]) -> (Self, GuestInfo) {
        let image = GuestImage::locate().expect("test guest image");
        let dir = tempfile::tempdir().unwrap();
        let accel = pleiades_vmm::accel::choose().expect("accelerator");
        let file = dir.path().join("desk.pleiades");
        let mut args = vec!["--vmm", "qemu"];
        for device in devices {
            args.extend(["--device", device]);
        }
        args.extend(["--listen", "127.0.0.1:0", "--connection-file", file.to_str().unwrap()]);
        args.extend(extra);
        let mut guest =
            Guest::start_host(host, &image, &args, &dir.path().join("vm.sock"), accel).expect("host starts");
        let info = guest.wait_ready(boot_timeout()).expect("READY");
        (Self { guest, dir }, info)
    }

    /// Waits until the shell on tty1 (what fbcon shows) is up, and stops its cursor blinking:
    /// a blinking cursor would make "the screen stopped changing" never true.
    pub fn settle_console(&mut self, timeout: Duration) {
        self.guest
            .run(
                &format!("{WAIT_FOR_TTY1_SHELL} && echo 0 > /sys/class/graphics/fbcon/cursor_blink"),
                timeout,
            )
            .unwrap();
    }

    pub fn control(&self) -> PathBuf {
        self.dir.path().join("vm.sock")
    }

    /// The connection file `run` wrote at start (one use).
    pub fn connection_file(&self) -> PathBuf {
        self.dir.path().join("desk.pleiades")
    }

    /// A fresh one-time connection file (`ctl connection-file`) named `name` in `dir`.
    pub fn mint(&self, name: &str) -> PathBuf {
        let out = self.dir.path().join(name);
        let response = control::request(&self.control(), &Request::ConnectionFile, CONTROL_TIMEOUT).unwrap();
        assert!(response.ok, "{response:?}");
        std::fs::write(&out, response.result.unwrap()["toml"].as_str().unwrap()).unwrap();
        out
    }

    /// What monitor 0 shows now (`ctl screenshot`).
    pub fn screenshot(&self) -> Framebuffer {
        let response =
            control::request(&self.control(), &Request::Screenshot { scanout: 0 }, CONTROL_TIMEOUT).unwrap();
        decode_png(&png_of_answer(&response).unwrap()).unwrap()
    }

    /// `ctl status`.
    pub fn status(&self) -> serde_json::Value {
        let response = control::request(&self.control(), &Request::Status, CONTROL_TIMEOUT).unwrap();
        response.result.unwrap_or_default()
    }
}
