//! The guest's display layout under `--vmm qemu`, set through QEMU's per-head VNC servers.
//!
//! # Why VNC
//!
//! With `-device vhost-user-gpu-pci` QEMU, not the Pleiades backend, owns the virtio-gpu config
//! fields `events_read`/`num_scanouts` and the display layout the guest is offered (QEMU's
//! `req_state`, filled by QEMU's UI through `dpy_set_ui_info`); a config-change message from
//! the backend is refused. The one way in from outside is therefore QEMU's UI, and the UI that
//! QEMU can run headless, per head and on a Unix socket is its VNC server: the RFB
//! `SetDesktopSize` client message (ExtendedDesktopSize extension) makes QEMU call
//! `dpy_set_ui_info` on that VNC display's console, i.e. on one head of the GPU. QEMU then
//! raises `VIRTIO_GPU_EVENT_DISPLAY`, the guest driver re-reads the display info and switches
//! mode. A size of 0x0 clears the head's enabled bit (virtio-gpu-base `ui_info`), so the guest
//! sees that connector disconnected.
//!
//! [`qemu_args`] gives the `-vnc` options (one VNC server per head, `unix:DIR/headN.sock`),
//! [`set_layout`] sends each head its size. The RFB client ([`RfbClient`]) is deliberately
//! small: RFB 3.8, security type None only (the sockets live in the VM's private directory),
//! it never asks for pixels, and it reads only the few server messages that can arrive
//! unasked. Everything the server sends is bounded: every read has a deadline, every length is
//! checked before it is used, and nothing the server announces is allocated up front, so a
//! broken or hostile server gives an error, never a hang or a huge allocation.
//!
//! # What QEMU answers
//!
//! QEMU replies to `SetDesktopSize` at once with an ExtendedDesktopSize rectangle whose
//! x-position is 1 ("this client asked") and whose y-position is the status: 4, "request
//! forwarded", because the guest applies the size asynchronously (3 "invalid screen layout" if
//! the head's device cannot be resized, e.g. a VGA). When the guest has switched mode, QEMU
//! sends a second, server-initiated one (x-position 0) with the new size;
//! [`RfbClient::wait_for_size`] waits for it. QEMU ignores a request equal to the last one it
//! forwarded for that head (it still answers 4).
//!
//! # The guest's side
//!
//! At boot QEMU's virtio-gpu enables head 0 only (1280x800); a size is all another head needs to
//! come on. Linux's virtio-gpu acknowledges a display event (`events_clear`) only after it has
//! queued GET_DISPLAY_INFO, so an event for a second head that lands in between is lost: QEMU
//! has stored the size, but the guest only sees it on the next display event. [`set_layout`]
//! therefore connects to every head first and sends all sizes together, so that they reach QEMU
//! before the guest reacts to the first.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The ExtendedDesktopSize pseudo-encoding.
pub const ENCODING_EXTENDED_DESKTOP_SIZE: i32 = -308;
/// The DesktopSize pseudo-encoding.
pub const ENCODING_DESKTOP_SIZE: i32 = -223;
/// The Raw encoding (always allowed by the protocol; skipped if a server sends it).
const ENCODING_RAW: i32 = 0;

/// The protocol version this client speaks.
const PROTOCOL_VERSION: &[u8; 12] = b"RFB 003.008\n";
/// Security type None.
const SECURITY_NONE: u8 = 1;

/// Client message types.
const MSG_SET_ENCODINGS: u8 = 2;
const MSG_SET_DESKTOP_SIZE: u8 = 251;
/// Server message types.
const MSG_FRAMEBUFFER_UPDATE: u8 = 0;
const MSG_SET_COLOUR_MAP_ENTRIES: u8 = 1;
const MSG_BELL: u8 = 2;
const MSG_SERVER_CUT_TEXT: u8 = 3;

/// The longest reason string or desktop name read from a server; longer ones are an error.
const MAX_TEXT: u32 = 4096;
/// The most clipboard text skipped before giving up on a server.
const MAX_CUT_TEXT: u32 = 1 << 20;
/// The most pixel data skipped in one Raw rectangle (this client never asks for pixels).
const MAX_RAW_RECT: u64 = 256 << 20;

/// The largest width or height a head can be given.
pub const MAX_DIMENSION: u32 = 8192;
/// The most heads [`set_layout`] looks for (`max_outputs` of virtio-gpu is at most 16).
pub const MAX_HEADS: u32 = 16;
/// How long one head may take to connect, shake hands and answer.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// The ExtendedDesktopSize status code (the rectangle's y-position).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResizeStatus {
    /// 0: done.
    Ok,
    /// 1: resizing is administratively prohibited.
    Prohibited,
    /// 2: the server is out of resources.
    OutOfResources,
    /// 3: the layout is invalid (QEMU: this head's display cannot be resized).
    InvalidLayout,
    /// 4: forwarded to the guest, which applies it asynchronously (QEMU's answer).
    Forwarded,
    /// A code the protocol does not define.
    Unknown(u16),
}

impl ResizeStatus {
    /// Decodes the y-position field.
    pub fn from_code(code: u16) -> Self {
        match code {
            0 => Self::Ok,
            1 => Self::Prohibited,
            2 => Self::OutOfResources,
            3 => Self::InvalidLayout,
            4 => Self::Forwarded,
            other => Self::Unknown(other),
        }
    }

    /// Whether the request was taken (done, or forwarded to the guest).
    pub fn accepted(self) -> bool {
        matches!(self, Self::Ok | Self::Forwarded)
    }
}

impl std::fmt::Display for ResizeStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Ok => f.write_str("resized"),
            Self::Prohibited => f.write_str("resizing is administratively prohibited"),
            Self::OutOfResources => f.write_str("the server is out of resources"),
            Self::InvalidLayout => f.write_str(
                "invalid screen layout (QEMU says this when the head's display cannot be resized: \
                 use a virtio-gpu device for `display=`)",
            ),
            Self::Forwarded => f.write_str("forwarded to the guest"),
            Self::Unknown(code) => write!(f, "unknown status {code}"),
        }
    }
}

/// The server's answer to `SetDesktopSize`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResizeReply {
    pub status: ResizeStatus,
    /// The framebuffer size the server reported with its answer (the size before the guest
    /// applies a forwarded request).
    pub width: u16,
    pub height: u16,
}

/// What the server said in `ServerInit`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerInit {
    pub width: u16,
    pub height: u16,
    pub bits_per_pixel: u8,
    pub name: String,
}

/// What can go wrong talking RFB to one VNC server.
#[derive(Debug, thiserror::Error)]
pub enum RfbError {
    #[error(
        "cannot connect: {error}. Is QEMU running with the `-vnc` options from `qemu_layout::qemu_args`?"
    )]
    Connect { error: io::Error },
    #[error("no answer within {waited:?} while {step}; QEMU may be stopped, paused or overloaded")]
    Timeout { step: &'static str, waited: Duration },
    #[error("the server closed the connection while {step}")]
    Closed { step: &'static str },
    #[error("I/O error while {step}: {error}")]
    Io { step: &'static str, error: io::Error },
    #[error(
        "not an RFB server (it greeted with {greeting:?}); use the sockets from `qemu_layout::qemu_args`"
    )]
    NotRfb { greeting: String },
    #[error("the server speaks RFB {version}; this client needs 3.8 or newer (QEMU speaks 3.8)")]
    OldVersion { version: String },
    #[error("the server refused the connection: {reason}")]
    Refused { reason: String },
    #[error(
        "the server requires authentication (security types {offered:?}, None is 1); start the per-head \
         VNC servers without password or TLS, as `qemu_layout::qemu_args` does"
    )]
    NoSecurityNone { offered: Vec<u8> },
    #[error("the server rejected security type None: {reason}")]
    SecurityFailed { reason: String },
    #[error("protocol error: {what}")]
    Protocol { what: String },
}

/// A connected RFB 3.8 client (security None) that can resize the server's desktop.
#[derive(Debug)]
pub struct RfbClient {
    stream: UnixStream,
    init: ServerInit,
    /// The desktop size as last reported by the server.
    size: (u16, u16),
    /// Bytes per pixel of the server's pixel format (to skip a Raw rectangle).
    bytes_per_pixel: u64,
}

/// One rectangle of interest in a FramebufferUpdate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SizeEvent {
    /// ExtendedDesktopSize: `reason` is the x-position (0 server, 1 this client, 2 another
    /// client), `status` the y-position.
    Extended { reason: u16, status: u16, width: u16, height: u16 },
    /// DesktopSize (the server changed the size).
    Plain { width: u16, height: u16 },
}

impl RfbClient {
    /// Connects to the server at `path` and does the handshake (version, security None,
    /// `ClientInit` shared, `ServerInit`) within `timeout`, then announces the
    /// ExtendedDesktopSize and DesktopSize pseudo-encodings.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self, RfbError> {
        let deadline = Instant::now() + timeout;
        let stream = UnixStream::connect(path).map_err(|error| RfbError::Connect { error })?;
        stream
            .set_write_timeout(Some(timeout.max(Duration::from_millis(1))))
            .map_err(|error| RfbError::Io { step: "configuring the socket", error })?;
        let mut reader = Deadline { stream: &stream, deadline, timeout };

        let mut greeting = [0u8; 12];
        reader.read_exact(&mut greeting, "reading the protocol version")?;
        let version = parse_version(&greeting)?;
        if version < (3, 8) {
            return Err(RfbError::OldVersion { version: format!("{}.{}", version.0, version.1) });
        }
        write_all(&stream, PROTOCOL_VERSION, "sending the protocol version")?;

        let count = reader.read_u8("reading the security types")?;
        if count == 0 {
            let reason = reader.read_text("reading why the server refused")?;
            return Err(RfbError::Refused { reason });
        }
        let mut offered = vec![0u8; usize::from(count)];
        reader.read_exact(&mut offered, "reading the security types")?;
        if !offered.contains(&SECURITY_NONE) {
            return Err(RfbError::NoSecurityNone { offered });
        }
        write_all(&stream, &[SECURITY_NONE], "choosing security type None")?;
        if reader.read_u32("reading the security result")? != 0 {
            let reason = reader.read_text("reading why security failed")?;
            return Err(RfbError::SecurityFailed { reason });
        }

        // ClientInit: shared, so that a viewer on the same head is not disconnected.
        write_all(&stream, &[1], "sending ClientInit")?;
        let mut server_init = [0u8; 20];
        reader.read_exact(&mut server_init, "reading ServerInit")?;
        let width = u16::from_be_bytes([server_init[0], server_init[1]]);
        let height = u16::from_be_bytes([server_init[2], server_init[3]]);
        let bits_per_pixel = server_init[4];
        let name = reader.read_text("reading the desktop name")?;
        let bytes_per_pixel = match bits_per_pixel {
            8 | 16 | 32 => u64::from(bits_per_pixel / 8),
            other => {
                return Err(RfbError::Protocol { what: format!("ServerInit has {other} bits per pixel") });
            }
        };
        let init = ServerInit { width, height, bits_per_pixel, name };
        tracing::debug!(path = %path.display(), ?init, "RFB handshake done");

        let mut set_encodings = vec![MSG_SET_ENCODINGS, 0, 0, 2];
        set_encodings.extend_from_slice(&ENCODING_EXTENDED_DESKTOP_SIZE.to_be_bytes());
        set_encodings.extend_from_slice(&ENCODING_DESKTOP_SIZE.to_be_bytes());
        write_all(&stream, &set_encodings, "sending SetEncodings")?;
        Ok(Self { stream, size: (width, height), init, bytes_per_pixel })
    }

    /// What the server said in `ServerInit`.
    pub fn server_init(&self) -> &ServerInit {
        &self.init
    }

    /// The desktop size as last reported by the server.
    pub fn size(&self) -> (u16, u16) {
        self.size
    }

    /// Asks for a one-screen desktop of `width` x `height` (0x0: no screen) and waits up to
    /// `timeout` for the server's answer to this request.
    pub fn set_desktop_size(
        &mut self,
        width: u16,
        height: u16,
        timeout: Duration,
    ) -> Result<ResizeReply, RfbError> {
        self.send_set_desktop_size(width, height)?;
        self.read_resize_reply(timeout)
    }

    /// Sends `SetDesktopSize` for a one-screen desktop of `width` x `height` (0x0: no screen)
    /// without waiting for the answer ([`Self::read_resize_reply`]).
    pub fn send_set_desktop_size(&mut self, width: u16, height: u16) -> Result<(), RfbError> {
        let mut msg = vec![MSG_SET_DESKTOP_SIZE, 0];
        msg.extend_from_slice(&width.to_be_bytes());
        msg.extend_from_slice(&height.to_be_bytes());
        msg.extend_from_slice(&[1, 0]); // one screen, padding
        msg.extend_from_slice(&0u32.to_be_bytes()); // screen id
        msg.extend_from_slice(&[0, 0, 0, 0]); // x, y
        msg.extend_from_slice(&width.to_be_bytes());
        msg.extend_from_slice(&height.to_be_bytes());
        msg.extend_from_slice(&0u32.to_be_bytes()); // flags
        write_all(&self.stream, &msg, "sending SetDesktopSize")
    }

    /// Waits up to `timeout` for the server's answer to a `SetDesktopSize` (an
    /// ExtendedDesktopSize rectangle with x-position 1, "this client"); other size reports
    /// before it are noted and skipped.
    pub fn read_resize_reply(&mut self, timeout: Duration) -> Result<ResizeReply, RfbError> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.next_size_event(deadline, timeout, "waiting for the answer to SetDesktopSize")? {
                SizeEvent::Extended { reason: 1, status, width, height } => {
                    let reply = ResizeReply { status: ResizeStatus::from_code(status), width, height };
                    tracing::debug!(?reply, "SetDesktopSize answered");
                    return Ok(reply);
                }
                other => tracing::debug!(?other, "desktop size event before the answer"),
            }
        }
    }

    /// Waits up to `timeout` until the server reports a desktop of `width` x `height` (the
    /// guest applied a forwarded request). Returns at once if that is already the size.
    pub fn wait_for_size(&mut self, width: u16, height: u16, timeout: Duration) -> Result<(), RfbError> {
        let deadline = Instant::now() + timeout;
        while self.size != (width, height) {
            self.next_size_event(deadline, timeout, "waiting for the guest to apply the size")?;
        }
        Ok(())
    }

    /// Reads server messages until a desktop size rectangle arrives; other messages are
    /// skipped (bounded).
    fn next_size_event(
        &mut self,
        deadline: Instant,
        timeout: Duration,
        step: &'static str,
    ) -> Result<SizeEvent, RfbError> {
        let mut reader = Deadline { stream: &self.stream, deadline, timeout };
        loop {
            match reader.read_u8(step)? {
                MSG_FRAMEBUFFER_UPDATE => {
                    let mut header = [0u8; 3];
                    reader.read_exact(&mut header, step)?;
                    let rects = u16::from_be_bytes([header[1], header[2]]);
                    let mut found = None;
                    for _ in 0..rects {
                        if let Some(event) = read_rect(&mut reader, self.bytes_per_pixel, step)? {
                            let size = match event {
                                SizeEvent::Extended { width, height, .. }
                                | SizeEvent::Plain { width, height } => (width, height),
                            };
                            self.size = size;
                            // Keep the first answer to this client, else the last event.
                            if !matches!(found, Some(SizeEvent::Extended { reason: 1, .. })) {
                                found = Some(event);
                            }
                        }
                    }
                    if let Some(event) = found {
                        return Ok(event);
                    }
                }
                MSG_SET_COLOUR_MAP_ENTRIES => {
                    let mut header = [0u8; 5];
                    reader.read_exact(&mut header, step)?;
                    let colours = u16::from_be_bytes([header[3], header[4]]);
                    reader.skip(u64::from(colours) * 6, step)?;
                }
                MSG_BELL => {}
                MSG_SERVER_CUT_TEXT => {
                    let mut padding = [0u8; 3];
                    reader.read_exact(&mut padding, step)?;
                    let len = reader.read_u32(step)?;
                    if len > MAX_CUT_TEXT {
                        return Err(RfbError::Protocol {
                            what: format!("ServerCutText of {len} bytes (at most {MAX_CUT_TEXT} accepted)"),
                        });
                    }
                    reader.skip(u64::from(len), step)?;
                }
                other => {
                    return Err(RfbError::Protocol {
                        what: format!("unexpected server message type {other} while {step}"),
                    });
                }
            }
        }
    }
}

/// Reads one rectangle of a FramebufferUpdate; returns it if it is a desktop size.
fn read_rect(
    reader: &mut Deadline<'_>,
    bytes_per_pixel: u64,
    step: &'static str,
) -> Result<Option<SizeEvent>, RfbError> {
    let mut header = [0u8; 12];
    reader.read_exact(&mut header, step)?;
    let field = |i: usize| u16::from_be_bytes([header[i], header[i + 1]]);
    let (x, y, width, height) = (field(0), field(2), field(4), field(6));
    let encoding = i32::from_be_bytes([header[8], header[9], header[10], header[11]]);
    match encoding {
        ENCODING_EXTENDED_DESKTOP_SIZE => {
            let mut screens = [0u8; 4];
            reader.read_exact(&mut screens, step)?;
            // At most 255 screens of 16 bytes: bounded by the field's width.
            reader.skip(u64::from(screens[0]) * 16, step)?;
            Ok(Some(SizeEvent::Extended { reason: x, status: y, width, height }))
        }
        ENCODING_DESKTOP_SIZE => Ok(Some(SizeEvent::Plain { width, height })),
        ENCODING_RAW => {
            let bytes = u64::from(width) * u64::from(height) * bytes_per_pixel;
            if bytes > MAX_RAW_RECT {
                return Err(RfbError::Protocol { what: format!("a Raw rectangle of {bytes} bytes") });
            }
            reader.skip(bytes, step)?;
            Ok(None)
        }
        other => Err(RfbError::Protocol {
            what: format!("a rectangle in encoding {other}, which this client did not ask for"),
        }),
    }
}

/// Parses `RFB xxx.yyy\n`.
fn parse_version(greeting: &[u8; 12]) -> Result<(u32, u32), RfbError> {
    let bad = || RfbError::NotRfb { greeting: String::from_utf8_lossy(greeting).into_owned() };
    let text = std::str::from_utf8(greeting).map_err(|_| bad())?;
    let rest = text.strip_prefix("RFB ").and_then(|r| r.strip_suffix('\n')).ok_or_else(bad)?;
    let (major, minor) = rest.split_once('.').ok_or_else(bad)?;
    if major.len() != 3 || minor.len() != 3 {
        return Err(bad());
    }
    let number = |s: &str| s.parse::<u32>().map_err(|_| bad());
    Ok((number(major)?, number(minor)?))
}

fn write_all(mut stream: &UnixStream, bytes: &[u8], step: &'static str) -> Result<(), RfbError> {
    stream.write_all(bytes).map_err(|error| io_error(error, step, Duration::ZERO))
}

fn io_error(error: io::Error, step: &'static str, waited: Duration) -> RfbError {
    match error.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => RfbError::Timeout { step, waited },
        io::ErrorKind::UnexpectedEof
        | io::ErrorKind::BrokenPipe
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted => RfbError::Closed { step },
        _ => RfbError::Io { step, error },
    }
}

/// Reads from the stream, every read bounded by one overall deadline.
struct Deadline<'a> {
    stream: &'a UnixStream,
    deadline: Instant,
    /// The whole budget, for messages.
    timeout: Duration,
}

impl Deadline<'_> {
    fn read_exact(&mut self, buf: &mut [u8], step: &'static str) -> Result<(), RfbError> {
        let mut filled = 0;
        while filled < buf.len() {
            let left = self.deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(RfbError::Timeout { step, waited: self.timeout });
            }
            self.stream.set_read_timeout(Some(left)).map_err(|error| RfbError::Io { step, error })?;
            match (&mut &*self.stream).read(&mut buf[filled..]) {
                Ok(0) => return Err(RfbError::Closed { step }),
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io_error(e, step, self.timeout)),
            }
        }
        Ok(())
    }

    fn read_u8(&mut self, step: &'static str) -> Result<u8, RfbError> {
        let mut b = [0u8; 1];
        self.read_exact(&mut b, step)?;
        Ok(b[0])
    }

    fn read_u32(&mut self, step: &'static str) -> Result<u32, RfbError> {
        let mut b = [0u8; 4];
        self.read_exact(&mut b, step)?;
        Ok(u32::from_be_bytes(b))
    }

    /// A u32 length and that many bytes of text (at most [`MAX_TEXT`]).
    fn read_text(&mut self, step: &'static str) -> Result<String, RfbError> {
        let len = self.read_u32(step)?;
        if len > MAX_TEXT {
            return Err(RfbError::Protocol {
                what: format!("a {len}-byte string while {step} (at most {MAX_TEXT} accepted)"),
            });
        }
        let mut text = vec![0u8; len as usize];
        self.read_exact(&mut text, step)?;
        Ok(String::from_utf8_lossy(&text).into_owned())
    }

    /// Reads and drops `len` bytes through a small buffer.
    fn skip(&mut self, mut len: u64, step: &'static str) -> Result<(), RfbError> {
        let mut buf = [0u8; 4096];
        while len > 0 {
            let n = len.min(buf.len() as u64) as usize;
            self.read_exact(&mut buf[..n], step)?;
            len -= n as u64;
        }
        Ok(())
    }
}

/// What can go wrong setting a layout.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error("invalid layout: {0}")]
    Invalid(String),
    #[error(
        "no VNC head sockets (head0.sock …) in {dir}: start QEMU with the `-vnc` options from \
         `qemu_layout::qemu_args` for this directory"
    )]
    NoHeads { dir: PathBuf },
    #[error(
        "the layout has {requested} monitors but the VM has {heads} heads (start it with max_outputs={requested})"
    )]
    TooManyMonitors { requested: usize, heads: u32 },
    #[error("head {head} ({path}): {error}")]
    Head { head: u32, path: PathBuf, error: RfbError },
    #[error("head {head} refused {width}x{height}: {status}")]
    Refused { head: u32, width: u16, height: u16, status: ResizeStatus },
}

/// The VNC socket of head `head` in `dir`.
pub fn head_socket(dir: &Path, head: u32) -> PathBuf {
    dir.join(format!("head{head}.sock"))
}

/// QEMU's `-vnc` arguments for `heads` heads of the display device `device_id` (its `id=`),
/// one VNC server per head on `DIR/headN.sock`. The servers have no password (the directory is
/// the VM's private one) and are force-shared, so a viewer never disconnects the layout client.
/// Keep `dir` short: a Unix socket path has at most 107 bytes.
pub fn qemu_args(device_id: &str, heads: u32, dir: &Path) -> Vec<String> {
    // QEMU option values escape a comma by doubling it.
    let escape = |s: &str| s.replace(',', ",,");
    (0..heads)
        .flat_map(|head| {
            let socket = head_socket(dir, head);
            [
                "-vnc".to_owned(),
                format!(
                    "unix:{},id=pleiades-head{head},display={},head={head},share=force-shared",
                    escape(&socket.to_string_lossy()),
                    escape(device_id)
                ),
            ]
        })
        .collect()
}

/// Checks a layout: 1 to [`MAX_HEADS`] monitors, each 0x0 (off) or 1..=[`MAX_DIMENSION`] on
/// both sides, at least one on.
pub fn validate_layout(sizes: &[(u32, u32)]) -> Result<(), LayoutError> {
    if sizes.is_empty() || sizes.iter().all(|&(w, h)| w == 0 && h == 0) {
        return Err(LayoutError::Invalid("at least one monitor must have a size".into()));
    }
    if sizes.len() > MAX_HEADS as usize {
        return Err(LayoutError::Invalid(format!("{} monitors (at most {MAX_HEADS})", sizes.len())));
    }
    for (i, &(w, h)) in sizes.iter().enumerate() {
        let off = w == 0 && h == 0;
        let valid = (1..=MAX_DIMENSION).contains(&w) && (1..=MAX_DIMENSION).contains(&h);
        if !off && !valid {
            return Err(LayoutError::Invalid(format!(
                "monitor {i} is {w}x{h}: width and height must both be 1 to {MAX_DIMENSION}, or 0x0 to turn it off"
            )));
        }
    }
    Ok(())
}

/// Sends every head in `dir` its size: head N gets `sizes[N]`, a 0x0 size or a head beyond
/// the list turns that head off. Returns each head's answer (QEMU: forwarded to the guest,
/// which applies it asynchronously). Each head gets [`HEAD_TIMEOUT`].
pub fn set_layout(dir: &Path, sizes: &[(u32, u32)]) -> Result<Vec<ResizeReply>, LayoutError> {
    set_layout_with_timeout(dir, sizes, HEAD_TIMEOUT)
}

/// [`set_layout`] with a timeout per head.
pub fn set_layout_with_timeout(
    dir: &Path,
    sizes: &[(u32, u32)],
    timeout: Duration,
) -> Result<Vec<ResizeReply>, LayoutError> {
    validate_layout(sizes)?;
    let heads = (0..MAX_HEADS).take_while(|&h| head_socket(dir, h).exists()).count() as u32;
    if heads == 0 {
        return Err(LayoutError::NoHeads { dir: dir.to_owned() });
    }
    if sizes.len() > heads as usize {
        return Err(LayoutError::TooManyMonitors { requested: sizes.len(), heads });
    }
    // Every head is connected first and the requests go out together, so that QEMU updates
    // all heads before the guest reacts: Linux's virtio-gpu acknowledges a display event
    // (`events_clear`) only after it has queued GET_DISPLAY_INFO, so a second head's event
    // that lands in between is lost (seen with back-to-back requests under TCG).
    let mut clients = Vec::with_capacity(heads as usize);
    for head in 0..heads {
        let path = head_socket(dir, head);
        match RfbClient::connect(&path, timeout) {
            Ok(client) => clients.push((head, path, client)),
            Err(error) => return Err(LayoutError::Head { head, path, error }),
        }
    }
    let size_of = |head: u32| {
        let (w, h) = sizes.get(head as usize).copied().unwrap_or((0, 0));
        // Validated above: both fit in u16.
        (w as u16, h as u16)
    };
    for (head, path, client) in &mut clients {
        let (width, height) = size_of(*head);
        client.send_set_desktop_size(width, height).map_err(|error| LayoutError::Head {
            head: *head,
            path: path.clone(),
            error,
        })?;
    }
    let mut replies = Vec::with_capacity(clients.len());
    for (head, path, mut client) in clients {
        let (width, height) = size_of(head);
        let reply =
            client.read_resize_reply(timeout).map_err(|error| LayoutError::Head { head, path, error })?;
        if !reply.status.accepted() {
            return Err(LayoutError::Refused { head, width, height, status: reply.status });
        }
        tracing::info!(head, width, height, status = %reply.status, "display head size requested");
        replies.push(reply);
    }
    Ok(replies)
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixListener;
    use std::thread::JoinHandle;

    use super::*;

    const SHORT: Duration = Duration::from_millis(300);

    /// A fake RFB server on `path`: accepts one connection and runs `script` on it.
    fn serve(
        path: &Path,
        script: impl FnOnce(&mut UnixStream) -> io::Result<()> + Send + 'static,
    ) -> JoinHandle<io::Result<()>> {
        let listener = UnixListener::bind(path).unwrap();
        std::thread::spawn(move || {
            let (mut stream, _) = listener.accept()?;
            stream.set_read_timeout(Some(Duration::from_secs(10)))?;
            script(&mut stream)
        })
    }

    fn read_n(stream: &mut UnixStream, n: usize) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; n];
        stream.read_exact(&mut buf)?;
        Ok(buf)
    }

    /// The server side of a good handshake (security None, 1280x800, 32 bpp, "QEMU"); checks
    /// what the client sends, including SetEncodings.
    fn handshake(stream: &mut UnixStream) -> io::Result<()> {
        stream.write_all(b"RFB 003.008\n")?;
        assert_eq!(read_n(stream, 12)?, b"RFB 003.008\n");
        stream.write_all(&[1, SECURITY_NONE])?;
        assert_eq!(read_n(stream, 1)?, [SECURITY_NONE]);
        stream.write_all(&0u32.to_be_bytes())?;
        assert_eq!(read_n(stream, 1)?, [1], "ClientInit shared");
        let mut init = vec![0x05, 0x00, 0x03, 0x20, 32, 24, 0, 1, 0, 255, 0, 255, 0, 255, 16, 8, 0, 0, 0, 0];
        init.extend_from_slice(&4u32.to_be_bytes());
        init.extend_from_slice(b"QEMU");
        stream.write_all(&init)?;
        let encodings = read_n(stream, 12)?;
        assert_eq!(encodings[..4], [MSG_SET_ENCODINGS, 0, 0, 2]);
        assert_eq!(i32::from_be_bytes(encodings[4..8].try_into().unwrap()), -308);
        assert_eq!(i32::from_be_bytes(encodings[8..12].try_into().unwrap()), -223);
        Ok(())
    }

    /// Reads a one-screen SetDesktopSize and returns its size.
    fn read_set_desktop_size(stream: &mut UnixStream) -> io::Result<(u16, u16)> {
        let msg = read_n(stream, 24)?;
        assert_eq!(msg[0], MSG_SET_DESKTOP_SIZE);
        assert_eq!(msg[6], 1, "one screen");
        let w = u16::from_be_bytes([msg[2], msg[3]]);
        let h = u16::from_be_bytes([msg[4], msg[5]]);
        assert_eq!([w, h], [u16::from_be_bytes([msg[16], msg[17]]), u16::from_be_bytes([msg[18], msg[19]])]);
        Ok((w, h))
    }

    /// A FramebufferUpdate with one ExtendedDesktopSize rectangle (as QEMU writes it).
    fn ext_desktop_size(reason: u16, status: u16, w: u16, h: u16) -> Vec<u8> {
        let mut m = vec![MSG_FRAMEBUFFER_UPDATE, 0, 0, 1];
        for v in [reason, status, w, h] {
            m.extend_from_slice(&v.to_be_bytes());
        }
        m.extend_from_slice(&ENCODING_EXTENDED_DESKTOP_SIZE.to_be_bytes());
        m.extend_from_slice(&[1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        m.extend_from_slice(&w.to_be_bytes());
        m.extend_from_slice(&h.to_be_bytes());
        m.extend_from_slice(&[0, 0, 0, 0]);
        m
    }

    #[test]
    fn handshake_and_forwarded_resize_like_qemu() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vnc.sock");
        let server = serve(&path, |s| {
            handshake(s)?;
            let (w, h) = read_set_desktop_size(s)?;
            assert_eq!((w, h), (1280, 720));
            // Noise first: a bell, a colour map, clipboard text, a server-initiated size.
            s.write_all(&[MSG_BELL])?;
            s.write_all(&[MSG_SET_COLOUR_MAP_ENTRIES, 0, 0, 0, 0, 2])?;
            s.write_all(&[0u8; 12])?;
            s.write_all(&[MSG_SERVER_CUT_TEXT, 0, 0, 0, 0, 0, 0, 3, b'a', b'b', b'c'])?;
            s.write_all(&ext_desktop_size(0, 0, 1280, 800))?;
            s.write_all(&ext_desktop_size(1, 4, 1280, 800))?;
            // The guest applies it.
            s.write_all(&ext_desktop_size(0, 0, 1280, 720))?;
            Ok(())
        });
        let mut client = RfbClient::connect(&path, Duration::from_secs(10)).unwrap();
        assert_eq!(
            client.server_init(),
            &ServerInit { width: 1280, height: 800, bits_per_pixel: 32, name: "QEMU".into() }
        );
        let reply = client.set_desktop_size(1280, 720, Duration::from_secs(10)).unwrap();
        assert_eq!(reply, ResizeReply { status: ResizeStatus::Forwarded, width: 1280, height: 800 });
        assert!(reply.status.accepted());
        client.wait_for_size(1280, 720, Duration::from_secs(10)).unwrap();
        assert_eq!(client.size(), (1280, 720));
        server.join().unwrap().unwrap();
    }

    #[test]
    fn refusal_codes_are_reported() {
        for (code, status) in [
            (0, ResizeStatus::Ok),
            (1, ResizeStatus::Prohibited),
            (2, ResizeStatus::OutOfResources),
            (3, ResizeStatus::InvalidLayout),
            (4, ResizeStatus::Forwarded),
            (77, ResizeStatus::Unknown(77)),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("vnc.sock");
            let server = serve(&path, move |s| {
                handshake(s)?;
                read_set_desktop_size(s)?;
                s.write_all(&ext_desktop_size(1, code, 640, 480))
            });
            let mut client = RfbClient::connect(&path, Duration::from_secs(10)).unwrap();
            let reply = client.set_desktop_size(800, 600, Duration::from_secs(10)).unwrap();
            assert_eq!(reply.status, status);
            assert_eq!(reply.status.accepted(), code == 0 || code == 4);
            server.join().unwrap().unwrap();
        }
    }

    #[test]
    fn set_layout_reports_a_refusing_head() {
        let dir = tempfile::tempdir().unwrap();
        let server = serve(&head_socket(dir.path(), 0), |s| {
            handshake(s)?;
            read_set_desktop_size(s)?;
            s.write_all(&ext_desktop_size(1, 3, 640, 480))
        });
        let err = set_layout_with_timeout(dir.path(), &[(1024, 768)], Duration::from_secs(10)).unwrap_err();
        assert!(
            matches!(err, LayoutError::Refused { head: 0, status: ResizeStatus::InvalidLayout, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("virtio-gpu"), "{err}");
        server.join().unwrap().unwrap();
    }

    #[test]
    fn set_layout_sends_every_head_and_turns_extra_heads_off() {
        let dir = tempfile::tempdir().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let servers: Vec<_> = (0..3)
            .map(|head| {
                let tx = tx.clone();
                serve(&head_socket(dir.path(), head), move |s| {
                    handshake(s)?;
                    let size = read_set_desktop_size(s)?;
                    tx.send((head, size)).unwrap();
                    s.write_all(&ext_desktop_size(1, 4, 640, 480))
                })
            })
            .collect();
        let replies =
            set_layout_with_timeout(dir.path(), &[(0, 0), (1024, 768)], Duration::from_secs(10)).unwrap();
        assert_eq!(replies.len(), 3);
        for s in servers {
            s.join().unwrap().unwrap();
        }
        let mut sent: Vec<_> = rx.try_iter().collect();
        sent.sort();
        assert_eq!(sent, [(0, (0, 0)), (1, (1024, 768)), (2, (0, 0))]);
    }

    #[test]
    fn set_layout_validates_before_connecting() {
        let dir = tempfile::tempdir().unwrap();
        for bad in [&[][..], &[(0, 0)], &[(1280, 0)], &[(9000, 100)], &[(100, 100); 17]] {
            let err = set_layout(dir.path(), bad).unwrap_err();
            assert!(matches!(err, LayoutError::Invalid(_)), "{bad:?}: {err}");
        }
        let err = set_layout(dir.path(), &[(1024, 768)]).unwrap_err();
        assert!(matches!(err, LayoutError::NoHeads { .. }), "{err}");
        let _listener = UnixListener::bind(head_socket(dir.path(), 0)).unwrap();
        let err = set_layout(dir.path(), &[(1024, 768), (1024, 768)]).unwrap_err();
        assert!(matches!(err, LayoutError::TooManyMonitors { requested: 2, heads: 1 }), "{err}");
    }

    #[test]
    fn a_missing_socket_says_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let err = RfbClient::connect(&dir.path().join("none.sock"), SHORT).unwrap_err();
        assert!(matches!(err, RfbError::Connect { .. }), "{err}");
        assert!(err.to_string().contains("qemu_args"), "{err}");
    }

    fn connect_err(script: impl FnOnce(&mut UnixStream) -> io::Result<()> + Send + 'static) -> RfbError {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vnc.sock");
        let server = serve(&path, script);
        let err = RfbClient::connect(&path, SHORT).unwrap_err();
        let _ = server.join().unwrap();
        err
    }

    #[test]
    fn security_refusals_are_explained() {
        let err = connect_err(|s| {
            s.write_all(b"RFB 003.008\n")?;
            read_n(s, 12)?;
            s.write_all(&[2, 2, 19])
        });
        assert!(matches!(&err, RfbError::NoSecurityNone { offered } if offered == &[2, 19]), "{err}");
        assert!(err.to_string().contains("without password"), "{err}");

        let err = connect_err(|s| {
            s.write_all(b"RFB 003.008\n")?;
            read_n(s, 12)?;
            s.write_all(&[0, 0, 0, 0, 9])?;
            s.write_all(b"too many!")
        });
        assert!(matches!(&err, RfbError::Refused { reason } if reason == "too many!"), "{err}");

        let err = connect_err(|s| {
            s.write_all(b"RFB 003.008\n")?;
            read_n(s, 12)?;
            s.write_all(&[1, 1])?;
            read_n(s, 1)?;
            s.write_all(&[0, 0, 0, 1, 0, 0, 0, 2, b'n', b'o'])
        });
        assert!(matches!(&err, RfbError::SecurityFailed { reason } if reason == "no"), "{err}");
    }

    #[test]
    fn garbage_and_old_servers_are_refused() {
        let err = connect_err(|s| s.write_all(b"HTTP/1.1 200"));
        assert!(matches!(err, RfbError::NotRfb { .. }), "{err}");
        let err = connect_err(|s| s.write_all(b"RFB 003.00x\n"));
        assert!(matches!(err, RfbError::NotRfb { .. }), "{err}");
        let err = connect_err(|s| s.write_all(b"RFB 003.003\n"));
        assert!(matches!(err, RfbError::OldVersion { .. }), "{err}");
        // Closed half-way through the greeting.
        let err = connect_err(|s| s.write_all(b"RFB 00"));
        assert!(matches!(err, RfbError::Closed { .. }), "{err}");
    }

    #[test]
    fn absurd_lengths_are_errors_not_allocations() {
        // A 4 GiB refusal reason.
        let err = connect_err(|s| {
            s.write_all(b"RFB 003.008\n")?;
            read_n(s, 12)?;
            s.write_all(&[0, 255, 255, 255, 255])
        });
        assert!(matches!(err, RfbError::Protocol { .. }), "{err}");
        // A 4 GiB desktop name.
        let err = connect_err(|s| {
            s.write_all(b"RFB 003.008\n")?;
            read_n(s, 12)?;
            s.write_all(&[1, 1])?;
            read_n(s, 1)?;
            s.write_all(&[0; 4])?;
            read_n(s, 1)?;
            s.write_all(&[0x05, 0, 0x03, 0x20, 32, 24, 0, 1, 0, 255, 0, 255, 0, 255, 16, 8, 0, 0, 0, 0])?;
            s.write_all(&[255, 255, 255, 255])
        });
        assert!(matches!(err, RfbError::Protocol { .. }), "{err}");
    }

    fn resize_err(script: impl FnOnce(&mut UnixStream) -> io::Result<()> + Send + 'static) -> RfbError {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vnc.sock");
        let server = serve(&path, move |s| {
            handshake(s)?;
            read_set_desktop_size(s)?;
            script(s)
        });
        let mut client = RfbClient::connect(&path, Duration::from_secs(10)).unwrap();
        let err = client.set_desktop_size(1024, 768, SHORT).unwrap_err();
        drop(client);
        let _ = server.join().unwrap();
        err
    }

    #[test]
    fn hostile_messages_after_the_handshake_are_errors() {
        // An unknown message type.
        let err = resize_err(|s| s.write_all(&[99]));
        assert!(matches!(&err, RfbError::Protocol { what } if what.contains("type 99")), "{err}");
        // A rectangle in an encoding the client did not ask for (its length is unknowable).
        let err = resize_err(|s| {
            s.write_all(&[0, 0, 0, 1, 0, 0, 0, 0, 0, 8, 0, 8])?;
            s.write_all(&7i32.to_be_bytes())
        });
        assert!(matches!(&err, RfbError::Protocol { what } if what.contains("encoding 7")), "{err}");
        // A huge Raw rectangle and a huge clipboard.
        let err = resize_err(|s| s.write_all(&[0, 0, 0, 1, 0, 0, 0, 0, 255, 255, 255, 255, 0, 0, 0, 0]));
        assert!(matches!(&err, RfbError::Protocol { what } if what.contains("Raw")), "{err}");
        let err = resize_err(|s| s.write_all(&[MSG_SERVER_CUT_TEXT, 0, 0, 0, 255, 255, 255, 255]));
        assert!(matches!(&err, RfbError::Protocol { what } if what.contains("ServerCutText")), "{err}");
        // Closing instead of answering.
        let err = resize_err(|_| Ok(()));
        assert!(matches!(err, RfbError::Closed { .. }), "{err}");
    }

    /// Waits until the client hangs up (bounded by the fake server's read timeout).
    fn until_client_hangs_up(s: &mut UnixStream) -> io::Result<()> {
        let mut buf = [0u8; 64];
        while s.read(&mut buf)? > 0 {}
        Ok(())
    }

    #[test]
    fn a_stalled_server_times_out() {
        // Stalls in the handshake: half a greeting, then nothing.
        let err = connect_err(|s| {
            s.write_all(b"RFB 003")?;
            until_client_hangs_up(s)
        });
        assert!(matches!(err, RfbError::Timeout { .. }), "{err}");

        // Stalls after the request.
        let err = resize_err(until_client_hangs_up);
        assert!(matches!(err, RfbError::Timeout { .. }), "{err}");

        // Trickles bell messages forever: the overall deadline still holds.
        let err = resize_err(|s| {
            for _ in 0..1000 {
                if s.write_all(&[MSG_BELL]).is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Ok(())
        });
        assert!(matches!(err, RfbError::Timeout { .. }), "{err}");
    }

    #[test]
    fn qemu_args_one_vnc_server_per_head() {
        let args = qemu_args("gpu0", 2, Path::new("/run/vm,1"));
        assert_eq!(
            args,
            [
                "-vnc",
                "unix:/run/vm,,1/head0.sock,id=pleiades-head0,display=gpu0,head=0,share=force-shared",
                "-vnc",
                "unix:/run/vm,,1/head1.sock,id=pleiades-head1,display=gpu0,head=1,share=force-shared",
            ]
        );
        assert!(qemu_args("gpu0", 0, Path::new("/tmp")).is_empty());
    }
}
