//! VM control: the [`Controller`] every kind of VM implements (Pleiades' own VMM, QEMU, a
//! synthetic desktop, and the session server around any of them), and the control socket
//! behind it: `pleiades-host run --control SOCKET` serves it, `pleiades-host ctl SOCKET
//! <command>` talks to it. The same commands work whichever VMM runs the guest.
//!
//! Invariants: this crate knows devices only through their host handles
//! ([`pleiades_virtio`]); it runs no VM and no session. The socket's I/O is blocking, on a
//! thread of its own.
//!
//! Wire format: one JSON request line, one JSON response line, then the server closes the
//! connection. Requests are `{"command":"status"}`, `{"command":"shutdown"}`,
//! `{"command":"reboot"}`, `{"command":"type","text":"ls\n"}`, `{"command":"key","combo":"ctrl+c"}`,
//! `{"command":"pointer","x":16384,"y":16384,"click":"left"}`; responses are `{"ok":true,"result":…}` or
//! `{"ok":false,"error":"…"}`. The socket is created with mode 0600: only its owner may
//! control the VM.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub mod screenshot;

use pleiades_protocol::wire::ClipboardMessage;
use pleiades_virtio::DeviceKind;
use pleiades_virtio::gpu::GpuHandle;
use pleiades_virtio::input::event::{
    ABS_X, ABS_Y, BTN_LEFT, BTN_MIDDLE, BTN_RIGHT, EV_ABS, EV_REL, REL_WHEEL, TABLET_MAX,
};
use pleiades_virtio::input::{InputEvent, keymap};

/// The most bytes a request line may have.
const MAX_REQUEST: u64 = 64 * 1024;
/// The most bytes a response line may have (a base64 PNG of a large monitor fits).
const MAX_RESPONSE: u64 = 96 << 20;

/// A control request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "kebab-case")]
pub enum Request {
    /// What the VM is doing.
    Status,
    /// Power the guest off cleanly (ACPI power button), then end the VM.
    Shutdown,
    /// Restart the guest.
    Reboot,
    /// Type text with the virtual keyboard (US layout; `\n` is Enter).
    Type { text: String },
    /// Press a key combination such as `ctrl+alt+f2` (pressed in order, released in reverse).
    Key { combo: String },
    /// Move the tablet pointer to (`x`, `y`) in tablet units (0 to 32767 on both axes, whatever
    /// the guest's screen size), then optionally click a button there and turn the wheel
    /// (positive: away from the user, i.e. scroll up).
    Pointer {
        x: u32,
        y: u32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        click: Option<PointerButton>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        wheel: Option<i32>,
    },
    /// What a scanout (monitor) shows now, as a PNG (answered base64-encoded).
    Screenshot {
        #[serde(default)]
        scanout: u32,
    },
    /// Ask the guest to use these monitor sizes (`[[1280, 720], …]`, left to right; monitors
    /// beyond the list are switched off).
    Layout { sizes: Vec<(u32, u32)> },
    /// Mint a one-time connection (a fresh ticket) for the session server: answered as the
    /// connection file's TOML.
    ConnectionFile,
    /// Drop the session's client, if one is connected (the VM goes on).
    Disconnect,
    /// Debug builds only (release builds answer an error): make a system call that no VM
    /// process's seccomp allowlist holds (`chroot`), for the test that shows the jail killing
    /// the process for it.
    TestForbiddenSyscall,
}

/// A tablet button.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum PointerButton {
    Left,
    Right,
    Middle,
}

/// Which virtual input device events go to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputDevice {
    Keyboard,
    Tablet,
    Mouse,
}

impl InputDevice {
    /// The `--device` kind.
    pub fn kind(self) -> DeviceKind {
        match self {
            Self::Keyboard => DeviceKind::Keyboard,
            Self::Tablet => DeviceKind::Tablet,
            Self::Mouse => DeviceKind::Mouse,
        }
    }
}

/// The tablet events of a `pointer` request: move, then press and release `click`, then turn
/// the wheel by `wheel` notches.
pub fn pointer_events(
    x: u32,
    y: u32,
    click: Option<PointerButton>,
    wheel: Option<i32>,
) -> Result<Vec<InputEvent>, String> {
    if x > TABLET_MAX || y > TABLET_MAX {
        return Err(format!("pointer coordinates are tablet units, 0 to {TABLET_MAX}; got ({x}, {y})"));
    }
    let mut events =
        vec![InputEvent::new(EV_ABS, ABS_X, x), InputEvent::new(EV_ABS, ABS_Y, y), InputEvent::syn()];
    if let Some(button) = click {
        let code = match button {
            PointerButton::Left => BTN_LEFT,
            PointerButton::Right => BTN_RIGHT,
            PointerButton::Middle => BTN_MIDDLE,
        };
        events.extend([
            InputEvent::key(code, true),
            InputEvent::syn(),
            InputEvent::key(code, false),
            InputEvent::syn(),
        ]);
    }
    if let Some(notches) = wheel.filter(|n| *n != 0) {
        // The wire value is the two's complement of the signed evdev value.
        events.extend([InputEvent::new(EV_REL, REL_WHEEL, notches as u32), InputEvent::syn()]);
    }
    Ok(events)
}

/// A control response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Response {
    pub fn ok(result: serde_json::Value) -> Self {
        Self { ok: true, result: Some(result), error: None }
    }

    pub fn error(message: impl Into<String>) -> Self {
        Self { ok: false, result: None, error: Some(message.into()) }
    }
}

/// The PNG of a `ctl screenshot` answer (`{"png_base64": …}`), or why there is none.
pub fn png_of_answer(response: &Response) -> Result<Vec<u8>, String> {
    use base64::Engine as _;
    if !response.ok {
        return Err(response.error.clone().unwrap_or_else(|| "the VM refused".into()));
    }
    response
        .result
        .as_ref()
        .and_then(|r| r["png_base64"].as_str())
        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
        .ok_or_else(|| "the VM's screenshot answer has no PNG".into())
}

/// Why a VM did not do what a [`Controller`] was asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    /// The VM has no such device.
    #[error("this VM has no {0} (add --device {0})")]
    NoDevice(DeviceKind),
    /// The VM serves no client.
    #[error("this VM has no session server (start it with --listen)")]
    NoSession,
    /// The request's values are not acceptable (a size, a coordinate, a key).
    #[error("{0}")]
    Invalid(String),
    /// The VMM, a device or a device process could not do it.
    #[error("{0}")]
    Failed(String),
}

/// What a running VM offers its host: the control socket, the session server and signals all
/// go through this.
pub trait Controller: Send + Sync {
    fn status(&self) -> serde_json::Value;
    fn shutdown(&self) -> Result<(), CommandError>;
    fn reboot(&self) -> Result<(), CommandError>;
    /// Sends whole reports of input events to the VM's keyboard, tablet or mouse.
    fn send_input(&self, device: InputDevice, _events: &[InputEvent]) -> Result<(), CommandError> {
        Err(CommandError::NoDevice(device.kind()))
    }
    /// The GPU's host side (display sink, scanouts), if the VM has a GPU.
    fn display(&self) -> Option<GpuHandle> {
        None
    }
    /// The sound device's host side (played audio, microphone), if the VM has one.
    fn sound(&self) -> Option<pleiades_virtio::snd::SoundHandle> {
        None
    }
    /// Asks the guest to use these monitor sizes, left to right.
    fn set_layout(&self, _sizes: &[(u32, u32)]) -> Result<(), CommandError> {
        Err(CommandError::NoDevice(DeviceKind::Gpu))
    }
    /// A new one-time connection file (TOML) for this desktop's session server.
    fn connection_file(&self) -> Result<String, CommandError> {
        Err(CommandError::NoSession)
    }
    /// Closes the session's client connection; `Ok(false)` when none was connected.
    fn disconnect_client(&self) -> Result<bool, CommandError> {
        Err(CommandError::NoSession)
    }
    /// The session server took a client with a ticket for this desktop (a new one, a resumed
    /// one, or one that replaced the previous client).
    fn client_arrived(&self) {}
    /// The session's client left (closed, lost, sent away) and no other took its place.
    fn client_left(&self) {}
    /// The guest session's clipboard, if the VM has an agent link to relay it through.
    fn clipboard(&self) -> Option<Arc<ClipboardPort>> {
        None
    }
    /// Files sent into the guest, if the VM has an agent link to relay them through.
    fn files(&self) -> Option<Arc<FilePort>> {
        None
    }
    /// The client's USB devices, if the VM has an agent link to attach them through.
    fn usb(&self) -> Option<Arc<UsbPort>> {
        None
    }
}

/// The VM process's side of one of a session's agent channels (the clipboard, files, USB): the
/// relay between the client and the guest, which enforces the pool's policy
/// ([`pleiades_protocol::clipboard::ClipboardRelay`], [`pleiades_protocol::files::FileRelay`],
/// [`pleiades_protocol::usb::UsbRelay`]).
/// Sessions are named by their id so that a replaced session's late messages and detach do not
/// touch its successor.
pub trait RelayPort<M>: Send + Sync {
    /// Session `session`'s client is the relay's client end now; `to_client` takes what goes to
    /// it (it must not block).
    fn attach(&self, session: u64, to_client: Box<dyn Fn(M) + Send + Sync>);
    /// What session `session`'s client sent on the channel.
    fn client_sent(&self, session: u64, message: M);
    /// Session `session` ended.
    fn detach(&self, session: u64);
}

/// The clipboard channel's relay.
pub type ClipboardPort = dyn RelayPort<ClipboardMessage>;
/// The files channel's relay.
pub type FilePort = dyn RelayPort<pleiades_protocol::wire::FileMessage>;
/// The USB channel's relay.
pub type UsbPort = dyn RelayPort<pleiades_protocol::wire::UsbMessage>;

/// Errors of the control socket.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("{path} is in use by a running VM; choose another --control path")]
    InUse { path: PathBuf },
    #[error("{path} exists and is not a socket; remove it or choose another --control path")]
    NotASocket { path: PathBuf },
    #[error("cannot listen on {path}: {error}")]
    Listen { path: PathBuf, error: std::io::Error },
    #[error("cannot reach the VM at {path}: {error}. Is `pleiades-host run --control {path}` running?")]
    Connect { path: PathBuf, error: std::io::Error },
    #[error("the VM at {path} did not answer: {reason}")]
    NoAnswer { path: PathBuf, reason: String },
}

/// Runs a request against `controller` (the part of the server that does not touch sockets).
pub fn handle_line(line: &str, controller: &dyn Controller) -> Response {
    match serde_json::from_str::<Request>(line) {
        Ok(Request::Status) => Response::ok(controller.status()),
        Ok(Request::Shutdown) => controller.shutdown().map_or_else(
            |e| Response::error(e.to_string()),
            |()| Response::ok(serde_json::json!("shutting down")),
        ),
        Ok(Request::Reboot) => controller.reboot().map_or_else(
            |e| Response::error(e.to_string()),
            |()| Response::ok(serde_json::json!("rebooting")),
        ),
        Ok(Request::Type { text }) => match keymap::text_events(&text) {
            Ok(events) => controller.send_input(InputDevice::Keyboard, &events).map_or_else(
                |e| Response::error(e.to_string()),
                |()| Response::ok(serde_json::json!("typed")),
            ),
            Err(e) => Response::error(e.to_string()),
        },
        Ok(Request::Key { combo }) => match keymap::combo_events(&combo) {
            Ok(events) => controller.send_input(InputDevice::Keyboard, &events).map_or_else(
                |e| Response::error(e.to_string()),
                |()| Response::ok(serde_json::json!("pressed")),
            ),
            Err(e) => Response::error(e.to_string()),
        },
        Ok(Request::Pointer { x, y, click, wheel }) => match pointer_events(x, y, click, wheel) {
            Ok(events) => controller.send_input(InputDevice::Tablet, &events).map_or_else(
                |e| Response::error(e.to_string()),
                |()| Response::ok(serde_json::json!("moved")),
            ),
            Err(e) => Response::error(e),
        },
        Ok(Request::Screenshot { scanout }) => screenshot(controller, scanout),
        Ok(Request::ConnectionFile) => controller.connection_file().map_or_else(
            |e| Response::error(e.to_string()),
            |toml| Response::ok(serde_json::json!({ "toml": toml })),
        ),
        Ok(Request::Disconnect) => controller.disconnect_client().map_or_else(
            |e| Response::error(e.to_string()),
            |was| Response::ok(serde_json::json!({ "disconnected": was })),
        ),
        Ok(Request::Layout { sizes }) => controller.set_layout(&sizes).map_or_else(
            |e| Response::error(e.to_string()),
            |()| Response::ok(serde_json::json!({ "layout": sizes })),
        ),
        Ok(Request::TestForbiddenSyscall) => forbidden_syscall(),
        Err(e) => Response::error(format!(
            "bad request ({e}); commands: status, shutdown, reboot, type, key, pointer, screenshot, layout, connection-file, disconnect"
        )),
    }
}

/// `test-forbidden-syscall`: `chroot("/")`, which a jailed process's filter answers by killing
/// it (unjailed and unprivileged, it fails with EPERM; as root it changes nothing).
#[cfg(debug_assertions)]
fn forbidden_syscall() -> Response {
    match std::os::unix::fs::chroot("/") {
        Ok(()) => {
            Response::ok(serde_json::json!("chroot(\"/\") was allowed: this process has no seccomp filter"))
        }
        Err(e) => Response::error(format!("chroot(\"/\") failed but did not kill this process: {e}")),
    }
}

#[cfg(not(debug_assertions))]
fn forbidden_syscall() -> Response {
    Response::error("test-forbidden-syscall exists in debug builds only")
}

/// Encodes what `scanout` shows as a PNG.
fn screenshot(controller: &dyn Controller, scanout: u32) -> Response {
    use base64::Engine as _;
    let Some(gpu) = controller.display() else {
        return Response::error(CommandError::NoDevice(DeviceKind::Gpu).to_string());
    };
    if scanout >= gpu.scanouts() {
        return Response::error(format!("scanout {scanout} does not exist; this GPU has {}", gpu.scanouts()));
    }
    let Some(frame) = gpu.sink().screenshot(scanout as usize) else {
        return Response::error(format!(
            "scanout {scanout} shows nothing: the guest has not set it up (is its display driver loaded, is the monitor enabled?)"
        ));
    };
    match crate::screenshot::encode_png(&frame) {
        Ok(png) => Response::ok(serde_json::json!({
            "scanout": scanout,
            "width": frame.width,
            "height": frame.height,
            "png_base64": base64::engine::general_purpose::STANDARD.encode(png),
        })),
        Err(e) => Response::error(format!("cannot encode the screenshot: {e}")),
    }
}

/// Binds a Unix socket at `path` that only this user can ever reach: it is made in a new
/// directory of mode 0700 beside `path`, made 0600 there, then renamed into place (binding at
/// `path` and chmod-ing after would leave a moment in which anyone could connect).
fn bind_private(path: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::DirBuilderExt;
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let private = parent.join(format!(".control-{}-{n}", std::process::id()));
    std::fs::DirBuilder::new().mode(0o700).create(&private)?;
    let staged = private.join("sock");
    let bound = UnixListener::bind(&staged).and_then(|listener| {
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o600))?;
        std::fs::rename(&staged, path)?;
        Ok(listener)
    });
    let _ = std::fs::remove_file(&staged);
    let _ = std::fs::remove_dir(&private);
    bound
}

/// A listening control socket. Dropping it stops listening and removes the socket file.
#[derive(Debug)]
pub struct ControlServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ControlServer {
    /// Listens on `path` and answers requests with `controller` on a thread of its own.
    pub fn start(path: &Path, controller: Arc<dyn Controller>) -> Result<Self, ControlError> {
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            if !meta.file_type().is_socket() {
                return Err(ControlError::NotASocket { path: path.to_owned() });
            }
            if UnixStream::connect(path).is_ok() {
                return Err(ControlError::InUse { path: path.to_owned() });
            }
            // A stale socket from a VM that is gone.
            let _ = std::fs::remove_file(path);
        }
        let listen_err = |error| ControlError::Listen { path: path.to_owned(), error };
        let listener = bind_private(path).map_err(listen_err)?;
        listener.set_nonblocking(true).map_err(listen_err)?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("control".into())
                .spawn(move || accept_loop(&listener, &*controller, &stop))
                .map_err(listen_err)?
        };
        Ok(Self { path: path.to_owned(), stop, thread: Some(thread) })
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn accept_loop(listener: &UnixListener, controller: &dyn Controller, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, _)) => serve_one(stream, controller),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => {
                tracing::warn!("control socket: accept failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

fn serve_one(stream: UnixStream, controller: &dyn Controller) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(5)));
    let mut line = String::new();
    let response = match BufReader::new((&stream).take(MAX_REQUEST)).read_line(&mut line) {
        Ok(0) => return,
        Ok(_) if !line.ends_with('\n') && line.len() as u64 >= MAX_REQUEST => {
            Response::error(format!("request longer than {MAX_REQUEST} bytes"))
        }
        Ok(_) => handle_line(line.trim(), controller),
        Err(e) => Response::error(format!("cannot read the request: {e}")),
    };
    let mut text = serde_json::to_string(&response).unwrap_or_else(|_| r#"{"ok":false}"#.into());
    text.push('\n');
    let _ = (&stream).write_all(text.as_bytes());
}

/// Sends one request to the control socket at `path` and returns the answer.
pub fn request(path: &Path, request: &Request, timeout: Duration) -> Result<Response, ControlError> {
    let stream =
        UnixStream::connect(path).map_err(|error| ControlError::Connect { path: path.to_owned(), error })?;
    let no_answer = |reason: String| ControlError::NoAnswer { path: path.to_owned(), reason };
    stream.set_read_timeout(Some(timeout)).map_err(|e| no_answer(e.to_string()))?;
    let mut line = serde_json::to_string(request).map_err(|e| no_answer(e.to_string()))?;
    line.push('\n');
    (&stream).write_all(line.as_bytes()).map_err(|e| no_answer(e.to_string()))?;
    let mut answer = String::new();
    BufReader::new((&stream).take(MAX_RESPONSE))
        .read_line(&mut answer)
        .map_err(|e| no_answer(e.to_string()))?;
    serde_json::from_str(answer.trim()).map_err(|e| no_answer(format!("malformed answer: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Fake(Mutex<Vec<&'static str>>);

    impl Controller for Fake {
        fn status(&self) -> serde_json::Value {
            serde_json::json!({"state": "running"})
        }
        fn shutdown(&self) -> Result<(), CommandError> {
            self.0.lock().unwrap().push("shutdown");
            Ok(())
        }
        fn reboot(&self) -> Result<(), CommandError> {
            Err(CommandError::Failed("reboot is not possible now".into()))
        }
        fn send_input(&self, device: InputDevice, events: &[InputEvent]) -> Result<(), CommandError> {
            let mut log = self.0.lock().unwrap();
            log.push(device.kind().name());
            log.extend(events.iter().map(|e| if e.is_syn_report() { "syn" } else { "event" }));
            Ok(())
        }
    }

    #[test]
    fn input_commands_become_whole_reports_for_the_right_device() {
        let fake = Fake::default();
        let r = handle_line(r#"{"command":"type","text":"a"}"#, &fake);
        assert!(r.ok, "{r:?}");
        let r = handle_line(r#"{"command":"pointer","x":32767,"y":0,"click":"right"}"#, &fake);
        assert!(r.ok, "{r:?}");
        assert_eq!(
            *fake.0.lock().unwrap(),
            [
                "keyboard", "event", "syn", "event", "syn", "tablet", "event", "event", "syn", "event",
                "syn", "event", "syn"
            ]
        );
        let r = handle_line(r#"{"command":"pointer","x":32768,"y":0}"#, &fake);
        assert!(r.error.unwrap().contains("0 to 32767"));
        let r = handle_line(r#"{"command":"key","combo":"ctrl+nope"}"#, &fake);
        assert!(r.error.unwrap().contains("unknown key"));
        let r = handle_line(r#"{"command":"type","text":"é"}"#, &fake);
        assert!(r.error.unwrap().contains("cannot be typed"));
        assert_eq!(
            pointer_events(1, 2, Some(PointerButton::Left), None).unwrap()[3],
            InputEvent::key(BTN_LEFT, true)
        );
        let scroll = pointer_events(1, 2, None, Some(-2)).unwrap();
        assert_eq!(&scroll[3..], [InputEvent::new(EV_REL, REL_WHEEL, (-2i32) as u32), InputEvent::syn()]);
        assert_eq!(pointer_events(1, 2, None, Some(0)).unwrap().len(), 3);
        // A controller without input devices says which one is missing.
        struct NoInput;
        impl Controller for NoInput {
            fn status(&self) -> serde_json::Value {
                serde_json::Value::Null
            }
            fn shutdown(&self) -> Result<(), CommandError> {
                Ok(())
            }
            fn reboot(&self) -> Result<(), CommandError> {
                Ok(())
            }
        }
        let r = handle_line(r#"{"command":"key","combo":"ctrl+alt+f2"}"#, &NoInput);
        assert!(r.error.unwrap().contains("--device keyboard"));
    }

    #[test]
    fn requests_round_trip_over_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.sock");
        let fake = Arc::new(Fake::default());
        let server = ControlServer::start(&path, fake.clone()).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // Bound in a private directory and moved into place: nothing of that is left.
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left, [std::ffi::OsString::from("vm.sock")]);

        let status = request(&path, &Request::Status, Duration::from_secs(5)).unwrap();
        assert_eq!(status, Response::ok(serde_json::json!({"state": "running"})));
        assert!(request(&path, &Request::Shutdown, Duration::from_secs(5)).unwrap().ok);
        assert_eq!(*fake.0.lock().unwrap(), ["shutdown"]);
        let reboot = request(&path, &Request::Reboot, Duration::from_secs(5)).unwrap();
        assert_eq!(reboot.error.as_deref(), Some("reboot is not possible now"));

        // A second server on the same path is refused while the first runs.
        assert!(matches!(ControlServer::start(&path, fake.clone()), Err(ControlError::InUse { .. })));
        drop(server);
        assert!(!path.exists());
        let err = request(&path, &Request::Status, Duration::from_secs(1)).unwrap_err();
        assert!(err.to_string().contains("Is `pleiades-host run --control"), "{err}");
    }

    #[test]
    fn garbage_gets_an_error_answer() {
        let fake = Fake::default();
        for line in ["", "{", "{\"command\":\"explode\"}", "[1,2]", "\u{0}\u{1}"] {
            let r = handle_line(line, &fake);
            assert!(!r.ok, "{line:?}");
            assert!(r.error.unwrap().contains("commands: status"), "{line:?}");
        }
        // Oversized and binary requests over a real socket.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.sock");
        let _server = ControlServer::start(&path, Arc::new(Fake::default())).unwrap();
        let stream = UnixStream::connect(&path).unwrap();
        let big = vec![b'x'; (MAX_REQUEST + 10) as usize];
        let _ = (&stream).write_all(&big);
        let mut answer = String::new();
        BufReader::new(&stream).read_line(&mut answer).unwrap();
        assert!(answer.contains("longer than"), "{answer}");
    }
}
