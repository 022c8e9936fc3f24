//! A session over a connected QUIC connection: the handshake, then one task per stream.
//!
//! ```text
//! control bi-stream ── Hello/Welcome, then one pump task around `ClientControl` (protocol/):
//!                      pings and the RTT, acks, ClientStats, layouts, resume token, Goodbye
//! input uni-stream  ── writer task (the input API's messages, highest priority)
//! clipboard uni-stream ── writer task, with CLIPBOARD (opened at the first message)
//! files uni-stream  ── writer task, with FILES (opened at the first message)
//! USB uni-streams   ── with USB: lane 0 (attach, detach) and one per device's data, each
//!                      opened at its first message by a writer task of its own
//! server uni-streams── one task each: display (decode, present, FrameAck), cursor, clipboard,
//!                      files or USB
//! datagrams         ── cursor positions, latest wins; audio frames to [`crate::audio`]
//! ```
//!
//! Tasks talk through bounded channels and one shared state (surfaces, cursor, and the control
//! channel's state machine, which the display tasks hand their acks and the API its intents).
//! The caller sees [`SessionEvent`]s: frames with their stats, layouts, the server's goodbye and
//! failures. A protocol error on any channel closes the whole connection with the channel's
//! error code (docs/protocol.md §2 allows ending only the channel; a server that sends malformed
//! display data is broken, and a headless recorder should fail loudly, not record a frozen
//! screen). Every wait is bounded: the handshake by 10 s, the rest by QUIC's 30 s idle timeout,
//! which the pings keep from firing while the server is alive.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use pleiades_protocol::control::{
    ClientControl, ClientEvent, CloseReason, ControlConfig, GOODBYE_LINGER_US, IntentError,
};
use pleiades_protocol::handshake::{self, Capabilities, ClientHandshake, HandshakeError};
use pleiades_protocol::transport::{self, MAX_DISPLAY_STREAMS, error_code, priority};
use pleiades_protocol::wire::{
    self, AudioPacket, Channel, ChannelMessage, ClipboardMessage, ControlMessage, CursorMessage,
    CursorPosition, CursorShape, Datagram, DisplayMessage, FileMessage, FrameAck, Goodbye, GoodbyeReason,
    InputMessage, Key, Monitor, PointerAbs, Queued, StreamDecoder, UsbMessage, Wheel,
};
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinSet;

use crate::clock::monotonic_us;
use crate::connect::Connected;
use crate::display::{DisplayStream, Displays, FrameStats, Framebuffer};
use crate::error::ClientError;

/// How long the client waits for `Welcome` or `Refused` after connecting.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_micros(handshake::HANDSHAKE_TIMEOUT_US);
/// How long a server stream may take to send its one-byte channel prelude.
const PRELUDE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `disconnect` waits for the server to close after the `Goodbye`.
const GOODBYE_TIMEOUT: Duration = Duration::from_micros(GOODBYE_LINGER_US);
/// Queued events before the display tasks wait for the consumer (backpressure, which the
/// server's pacing turns into a lower frame rate).
const EVENT_QUEUE: usize = 1024;
/// Queued outgoing messages per stream.
const SEND_QUEUE: usize = 1024;
/// Largest chunk read from a stream at once.
const READ_CHUNK: usize = 1 << 20;

/// What the client offers and calls itself.
#[derive(Debug, Clone)]
pub struct SessionOptions {
    pub client_name: String,
    pub capabilities: Capabilities,
}

impl Default for SessionOptions {
    fn default() -> Self {
        Self {
            client_name: format!("pleiades-client {}", env!("CARGO_PKG_VERSION")),
            capabilities: Capabilities::ZSTD_TILES
                | Capabilities::H264
                | Capabilities::CURSOR_CHANNEL
                | Capabilities::CURSOR_DATAGRAMS
                | Capabilities::DYNAMIC_LAYOUT
                | Capabilities::AUDIO
                | Capabilities::CLIPBOARD
                | Capabilities::RESUME
                | Capabilities::RELATIVE_POINTER
                | Capabilities::FILES
                | Capabilities::COPY_RECT
                | Capabilities::PALETTE_TILES
                | Capabilities::SCALED_VIDEO
                | Capabilities::USB,
        }
    }
}

/// What happened in the session, in order per stream.
#[derive(Debug)]
pub enum SessionEvent {
    /// A frame was presented (and acked).
    Frame(FrameStats),
    /// The server's monitor layout (after `Welcome` and on every change).
    Layout(Vec<Monitor>),
    /// A new cursor shape.
    CursorShape { serial: u32, width: u16, height: u16 },
    /// The server ended the session.
    Goodbye(Goodbye),
    /// The server closed the connection cleanly (code 0) without a `Goodbye` this client read
    /// first: also an orderly end. Carries the close reason text.
    ServerClosed(String),
    /// The session failed; the connection is closed.
    Failed(ClientError),
}

/// The cursor as last seen: shape from the cursor stream, position from datagrams (or the
/// stream). The headless client draws nothing; a windowed one draws this.
#[derive(Debug, Clone, Default)]
pub struct CursorState {
    pub shape: Option<CursorShape>,
    pub position: Option<CursorPosition>,
}

/// Counters for the summary.
#[derive(Debug, Default)]
struct Counters {
    bytes_received: AtomicU64,
    frames: AtomicU64,
    datagrams_dropped: AtomicU64,
}

#[derive(Debug)]
struct Shared {
    displays: Mutex<Displays>,
    cursor: Mutex<CursorState>,
    /// The control channel (layout, RTT, resume token): its pump drives it, the display tasks
    /// ack into it, the API asks for layouts and says goodbye through it.
    control: Mutex<ClientControl>,
    /// Wakes the pump when something was queued on `control` from outside it.
    control_wake: Notify,
    counters: Counters,
    /// Set when this side ends the session: a closed connection is then no failure.
    closing: AtomicBool,
    /// Where audio datagrams go (the player), once it listens.
    audio: Mutex<Option<mpsc::Sender<AudioPacket>>>,
    /// The clipboard (the clipboard bridge), with `CLIPBOARD`. Until the bridge listens the
    /// server's latest grab waits (the server offers the desktop's clipboard as the session
    /// opens, before the bridge has its X connection).
    clipboard: Exchange<ClipboardMessage>,
    /// Files sent into the desktop ([`crate::files`]), with `FILES`.
    files: Exchange<FileMessage>,
    /// USB devices redirected into the desktop ([`crate::usb`]), with `USB`.
    usb: Exchange<UsbMessage>,
}

/// Takes the server's messages of one channel; must not block.
type Sink<M> = Box<dyn Fn(M) + Send + Sync>;

/// One of the session's channels to the guest agent (the clipboard, files, USB): what the
/// client sends goes out on streams of ours, one per lane ([`Queued::lane`]), each opened by a
/// writer task at its first message; the server's streams are handed to a sink once someone
/// listens.
struct Exchange<M> {
    /// The writer task's queue; `None` without the channel's capability.
    tx: Option<mpsc::UnboundedSender<M>>,
    /// Bytes queued for the server ([`Queued::MAX_QUEUE`] at most).
    queued: AtomicU64,
    /// Takes the server's messages; must not block.
    sink: Mutex<Option<Sink<M>>>,
    /// The server's latest message that [`Exchange::keep_early`] keeps, until a sink listens.
    early: Mutex<Option<M>>,
    keep_early: fn(&M) -> bool,
}

impl<M> std::fmt::Debug for Exchange<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exchange").field("open", &self.tx.is_some()).field("queued", &self.queued).finish()
    }
}

impl<M: Queued> Exchange<M> {
    fn new(open: bool, keep_early: fn(&M) -> bool) -> (Self, mpsc::UnboundedReceiver<M>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let exchange = Self {
            tx: open.then_some(tx),
            queued: AtomicU64::new(0),
            sink: Mutex::new(None),
            early: Mutex::new(None),
            keep_early,
        };
        (exchange, rx)
    }

    fn listen(&self, sink: impl Fn(M) + Send + Sync + 'static) {
        let mut slot = lock(&self.sink);
        if let Some(early) = lock(&self.early).take() {
            sink(early);
        }
        *slot = Some(Box::new(sink));
    }

    fn send(&self, message: M, channel: &str) -> bool {
        let Some(tx) = &self.tx else { return false };
        let size = message.queued_size() as u64;
        let queued = self.queued.fetch_add(size, Ordering::Relaxed) + size;
        if queued > M::MAX_QUEUE as u64 {
            self.queued.fetch_sub(size, Ordering::Relaxed);
            tracing::warn!("more {channel} data waits than the server takes: not sending more");
            return false;
        }
        tx.send(message).is_ok()
    }

    /// Bytes waiting for the stream.
    fn queued(&self) -> u64 {
        self.queued.load(Ordering::Relaxed)
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Sends input and control messages, reads shared state. Cheap to clone.
#[derive(Debug, Clone)]
pub struct SessionHandle {
    connection: quinn::Connection,
    input: mpsc::Sender<InputMessage>,
    shared: Arc<Shared>,
    info: handshake::Session,
}

/// A running session: its handle, its events and its tasks (aborted on drop).
#[derive(Debug)]
pub struct Session {
    pub handle: SessionHandle,
    events: mpsc::Receiver<SessionEvent>,
    _tasks: JoinSet<()>,
    _endpoint: quinn::Endpoint,
}

impl Session {
    /// Says `Hello`, waits for `Welcome` (at most [`HANDSHAKE_TIMEOUT`]), opens the input stream
    /// and starts the stream tasks.
    pub async fn start(
        connected: Connected,
        ticket: &str,
        options: SessionOptions,
    ) -> Result<Session, ClientError> {
        let Connected { endpoint, connection } = connected;
        let mut handshake = ClientHandshake::new(ticket, &options.client_name, options.capabilities);
        let hello = wire::encode_to_vec(&handshake.hello())
            .map_err(|e| ClientError::Setup(format!("cannot encode Hello: {e}")))?;
        let stream_error = |channel, error: String| ClientError::Stream { channel, error };

        let answer = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
            let (mut send, mut recv) = connection.open_bi().await?;
            let _ = send.set_priority(priority::CONTROL);
            send.write_all(&hello).await.map_err(|e| stream_error(Channel::Control, e.to_string()))?;
            let mut decoder = StreamDecoder::<ControlMessage>::new();
            loop {
                let chunk = recv.read_chunk(READ_CHUNK, true).await.map_err(|e| match e {
                    quinn::ReadError::ConnectionLost(e) => ClientError::ConnectionLost(e),
                    other => stream_error(Channel::Control, other.to_string()),
                })?;
                let Some(chunk) = chunk else {
                    return Err(stream_error(Channel::Control, "the server ended the control stream".into()));
                };
                let mut input: &[u8] = &chunk.bytes;
                match decoder.decode(&mut input) {
                    // The decoder holds nothing after a whole message: the rest is in `input`.
                    Ok(Some(message)) => return Ok((send, recv, message, input.to_vec())),
                    Ok(None) => {}
                    Err(e) => {
                        connection.close(e.error_code().into(), b"malformed handshake answer");
                        return Err(ClientError::Protocol {
                            channel: Channel::Control,
                            detail: e.to_string(),
                        });
                    }
                }
            }
        })
        .await;
        let (send, recv, answer, leftover) = match answer {
            Err(_) => {
                connection.close(error_code::HANDSHAKE_TIMEOUT.into(), b"no Welcome");
                return Err(ClientError::HandshakeTimeout);
            }
            Ok(result) => result?,
        };
        let info = match handshake.on_message(&answer) {
            Ok(info) => info,
            Err(HandshakeError::Refused { code, message }) => {
                connection.close(error_code::REFUSED.into(), b"refused");
                return Err(ClientError::Refused { code, message });
            }
            Err(error) => {
                connection.close(error.error_code().into(), b"bad handshake answer");
                return Err(ClientError::Handshake(error));
            }
        };
        tracing::info!(
            session_id = info.session_id,
            server = %info.peer_name,
            capabilities = ?info.capabilities,
            "session open"
        );

        // Bounded: a server that grants no unidirectional stream would block `open_uni`.
        let input_stream = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
            let mut stream = connection.open_uni().await?;
            let _ = stream.set_priority(priority::INPUT);
            stream
                .write_all(&transport::stream_prelude(Channel::Input))
                .await
                .map_err(|e| stream_error(Channel::Input, e.to_string()))?;
            Ok::<_, ClientError>(stream)
        })
        .await
        .map_err(|_| {
            stream_error(Channel::Input, "the server allowed no input stream within 10 s".into())
        })??;

        let mut control = ClientControl::new(&info, ControlConfig::default(), monotonic_us());
        control.handle_stream_data(&leftover, monotonic_us());
        let (clipboard, clipboard_rx) =
            Exchange::new(info.capabilities.contains(Capabilities::CLIPBOARD), |m: &ClipboardMessage| {
                matches!(m, ClipboardMessage::Grab(_))
            });
        let (files, files_rx) = Exchange::new(info.capabilities.contains(Capabilities::FILES), |_| false);
        let (usb, usb_rx) = Exchange::new(info.capabilities.contains(Capabilities::USB), |_| false);
        let shared = Arc::new(Shared {
            displays: Mutex::new(Displays::new()),
            cursor: Mutex::new(CursorState::default()),
            control: Mutex::new(control),
            control_wake: Notify::new(),
            counters: Counters::default(),
            closing: AtomicBool::new(false),
            audio: Mutex::new(None),
            clipboard,
            files,
            usb,
        });
        let (input_tx, input_rx) = mpsc::channel(SEND_QUEUE);
        let (events_tx, events) = mpsc::channel(EVENT_QUEUE);
        let handle = SessionHandle { connection: connection.clone(), input: input_tx, shared, info };

        let mut tasks = JoinSet::new();
        if handle.shared.clipboard.tx.is_some() {
            tasks.spawn(exchange_writer(handle.clone(), clipboard_rx, |s| &s.clipboard));
        }
        if handle.shared.files.tx.is_some() {
            tasks.spawn(exchange_writer(handle.clone(), files_rx, |s| &s.files));
        }
        if handle.shared.usb.tx.is_some() {
            tasks.spawn(exchange_writer(handle.clone(), usb_rx, |s| &s.usb));
        }
        tasks.spawn(control_pump(handle.clone(), send, recv, events_tx.clone()));
        tasks.spawn(input_writer(handle.clone(), input_stream, input_rx));
        tasks.spawn(accept_streams(handle.clone(), events_tx.clone()));
        tasks.spawn(read_datagrams(handle.clone()));
        tasks.spawn(watch_close(handle.clone(), events_tx));
        Ok(Session { handle, events, _tasks: tasks, _endpoint: endpoint })
    }

    /// The next event; `None` once every task has ended.
    pub async fn next_event(&mut self) -> Option<SessionEvent> {
        self.events.recv().await
    }

    /// Ends the session from this side (`Goodbye`, then close) and lets the close go out.
    pub async fn disconnect(self, message: &str) {
        self.handle.disconnect(message).await;
        let _ = tokio::time::timeout(Duration::from_secs(1), self._endpoint.wait_idle()).await;
    }
}

impl SessionHandle {
    /// The playback stream's packets from now on (a full queue drops packets: the jitter
    /// buffer conceals them).
    pub fn audio_packets(&self, capacity: usize) -> mpsc::Receiver<AudioPacket> {
        let (tx, rx) = mpsc::channel(capacity);
        *lock(&self.shared.audio) = Some(tx);
        rx
    }

    /// Hands the server's clipboard messages to `sink` from now on (first the server's grab
    /// that came before, if one did).
    pub fn on_clipboard(&self, sink: impl Fn(ClipboardMessage) + Send + Sync + 'static) {
        self.shared.clipboard.listen(sink);
    }

    /// Hands the server's file messages to `sink` from now on.
    pub fn on_files(&self, sink: impl Fn(FileMessage) + Send + Sync + 'static) {
        self.shared.files.listen(sink);
    }

    /// Sends a file message (with `FILES`; without it, once the session ended, or when more
    /// than [`Queued::MAX_QUEUE`] bytes wait for the server, it goes nowhere: `false`).
    pub fn send_file_message(&self, message: FileMessage) -> bool {
        self.shared.files.send(message, "file")
    }

    /// Bytes of file messages waiting for the files stream.
    pub fn files_queued(&self) -> u64 {
        self.shared.files.queued()
    }

    /// Whether the connection is over (closed by either side, or lost).
    pub fn is_closed(&self) -> bool {
        self.connection.close_reason().is_some()
    }

    /// Hands the server's USB messages to `sink` from now on.
    pub fn on_usb(&self, sink: impl Fn(UsbMessage) + Send + Sync + 'static) {
        self.shared.usb.listen(sink);
    }

    /// Sends a USB message (with `USB`; without it, once the session ended, or when more than
    /// [`wire::MAX_USB_QUEUE`] bytes wait for the server, it goes nowhere: `false`).
    pub fn send_usb(&self, message: UsbMessage) -> bool {
        self.shared.usb.send(message, "USB")
    }

    /// Sends a clipboard message (with `CLIPBOARD`; without it, once the session ended, or
    /// when more than [`wire::MAX_CLIPBOARD_QUEUE`] bytes wait for the server, it goes nowhere:
    /// `false`).
    pub fn send_clipboard(&self, message: ClipboardMessage) -> bool {
        self.shared.clipboard.send(message, "clipboard")
    }

    /// Sends a datagram (microphone, audio feedback). Datagrams may be lost; so may this one.
    pub fn send_datagram(&self, datagram: &Datagram) -> Result<(), ClientError> {
        self.connection
            .send_datagram(wire::encode_datagram(datagram).into())
            .map_err(|e| ClientError::Setup(format!("cannot send a datagram: {e}")))
    }

    /// What the handshake agreed on.
    pub fn info(&self) -> &handshake::Session {
        &self.info
    }

    async fn send_input(&self, message: InputMessage) -> Result<(), ClientError> {
        self.input.send(message).await.map_err(|_| ClientError::Closed)
    }

    /// A key (Linux evdev code) going down or up.
    pub async fn send_key(&self, code: u16, down: bool) -> Result<(), ClientError> {
        self.send_input(InputMessage::Key(Key { code, down })).await
    }

    /// The pointer at (x, y) of `scanout`, in scanout pixels.
    pub async fn send_pointer(&self, scanout: u32, x: u32, y: u32) -> Result<(), ClientError> {
        self.send_input(InputMessage::PointerAbs(PointerAbs { scanout, x, y })).await
    }

    /// Relative motion for the VM's mouse (with `RELATIVE_POINTER`).
    pub async fn send_pointer_rel(&self, dx: i32, dy: i32) -> Result<(), ClientError> {
        self.send_input(InputMessage::PointerRel(wire::PointerRel { dx, dy })).await
    }

    /// The full set of pressed buttons ([`wire::buttons`]).
    pub async fn send_buttons(&self, mask: u32) -> Result<(), ClientError> {
        self.send_input(InputMessage::Buttons(mask)).await
    }

    /// Scrolling in 1/120 of a detent; `dy > 0` scrolls up.
    pub async fn send_wheel(&self, dx: i32, dy: i32) -> Result<(), ClientError> {
        self.send_input(InputMessage::Wheel(Wheel { dx, dy })).await
    }

    /// Release every key and button.
    pub async fn release_all(&self) -> Result<(), ClientError> {
        self.send_input(InputMessage::ReleaseAll).await
    }

    /// Asks the server to resize the guest's monitors (with `DYNAMIC_LAYOUT`). A request not
    /// written yet is replaced by this one.
    pub async fn request_layout(&self, sizes: &[(u32, u32)]) -> Result<(), ClientError> {
        self.control(|control| control.request_layout(sizes)).map_err(ClientError::from)
    }

    /// Runs an intent on the control channel and wakes its pump to write what it queued.
    fn control<R>(&self, intent: impl FnOnce(&mut ClientControl) -> R) -> R {
        let result = intent(&mut lock(&self.shared.control));
        self.shared.control_wake.notify_one();
        result
    }

    /// The last presented frame of `scanout`.
    pub fn snapshot(&self, scanout: u32) -> Option<Framebuffer> {
        lock(&self.shared.displays).snapshot(scanout)
    }

    /// Every scanout that received a frame.
    pub fn scanouts(&self) -> Vec<u32> {
        lock(&self.shared.displays).scanouts()
    }

    /// The server's last `DisplayLayout`.
    pub fn layout(&self) -> Vec<Monitor> {
        lock(&self.shared.control).layout().to_vec()
    }

    pub fn cursor(&self) -> CursorState {
        lock(&self.shared.cursor).clone()
    }

    /// Smoothed RTT from this client's pings (µs).
    pub fn ping_rtt_us(&self) -> Option<u64> {
        lock(&self.shared.control).rtt().smoothed()
    }

    /// QUIC's own RTT estimate.
    pub fn quic_rtt(&self) -> Duration {
        self.connection.rtt()
    }

    pub fn bytes_received(&self) -> u64 {
        self.shared.counters.bytes_received.load(Ordering::Relaxed)
    }

    /// The server's latest one-time resume token, for [`crate::window`]'s reconnect.
    pub fn resume_token(&self) -> Option<String> {
        lock(&self.shared.control).resume_token().map(|token| token.token.clone())
    }

    /// UDP datagrams received on this connection: stops growing when the path is down (the
    /// server pings every second).
    pub fn datagrams_received(&self) -> u64 {
        self.connection.stats().udp_rx.datagrams
    }

    /// Runs `f` on the decoded displays (the window uploads their damage).
    pub fn with_displays<R>(&self, f: impl FnOnce(&mut Displays) -> R) -> R {
        f(&mut lock(&self.shared.displays))
    }

    pub fn decode_errors(&self) -> u64 {
        lock(&self.shared.displays).decode_errors
    }

    /// Sends `Goodbye{Disconnect}`, waits (bounded) until the server closed, closes with code 0.
    pub async fn disconnect(&self, message: &str) {
        self.shared.closing.store(true, Ordering::SeqCst);
        let was_open = self.control(|control| {
            let open = control.is_open();
            control.close(GoodbyeReason::Disconnect, message, monotonic_us());
            open
        });
        if was_open {
            let _ = tokio::time::timeout(GOODBYE_TIMEOUT, self.connection.closed()).await;
        }
        self.connection.close(error_code::NO_ERROR.into(), b"goodbye");
    }

    /// Ends the session because of a protocol error: closes with `code`, reports `error`.
    async fn fail(&self, events: &mpsc::Sender<SessionEvent>, code: u32, error: ClientError) {
        if self.shared.closing.swap(true, Ordering::SeqCst) {
            return;
        }
        tracing::error!(%error, code, "ending the session");
        self.connection.close(code.into(), error.to_string().as_bytes());
        let _ = events.send(SessionEvent::Failed(error)).await;
    }
}

/// Pumps the control stream through the session's [`ClientControl`] until the channel ends:
/// the server's bytes and the timers in, messages out, events passed on.
async fn control_pump(
    handle: SessionHandle,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    events: mpsc::Sender<SessionEvent>,
) {
    let shared = &handle.shared;
    let mut out = Vec::new();
    let mut reading = true;
    loop {
        let (happened, deadline) = {
            let mut control = lock(&shared.control);
            out.clear();
            while let Some(message) = control.poll_transmit() {
                // Intents are checked when queued: this fails only on a bug here.
                if let Err(error) = wire::encode(&message, &mut out) {
                    tracing::warn!(%error, "not sending an invalid control message");
                }
            }
            (std::iter::from_fn(|| control.poll_event()).collect::<Vec<_>>(), control.poll_timeout())
        };
        if !out.is_empty()
            && let Err(error) = send.write_all(&out).await
        {
            return tracing::debug!(%error, "control stream closed");
        }
        for event in happened {
            match event {
                ClientEvent::Layout(monitors) => {
                    tracing::info!(?monitors, "display layout");
                    let _ = events.send(SessionEvent::Layout(monitors)).await;
                }
                ClientEvent::ResumeToken(token) => {
                    tracing::debug!(lifetime_s = token.lifetime_s, "resume token")
                }
                ClientEvent::Rtt(sample) => tracing::trace!(rtt_us = sample.latest_us, "ping answered"),
                ClientEvent::Closed(CloseReason::Peer(goodbye)) => {
                    tracing::info!(reason = ?goodbye.reason, message = %goodbye.message, "the server said goodbye");
                    shared.closing.store(true, Ordering::SeqCst);
                    let _ = events.send(SessionEvent::Goodbye(goodbye)).await;
                    handle.connection.close(error_code::NO_ERROR.into(), b"goodbye");
                    return;
                }
                ClientEvent::Closed(CloseReason::Local(_)) => {
                    // Our goodbye went out and the server did not close within the linger.
                    handle.connection.close(error_code::NO_ERROR.into(), b"goodbye");
                    return;
                }
                ClientEvent::Closed(CloseReason::Error(error)) => {
                    let code = error.error_code();
                    let error =
                        ClientError::Protocol { channel: Channel::Control, detail: error.to_string() };
                    return handle.fail(&events, code, error).await;
                }
            }
        }
        let timer = async {
            match deadline {
                Some(at) => {
                    tokio::time::sleep(Duration::from_micros(at.saturating_sub(monotonic_us()))).await
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            chunk = recv.read_chunk(READ_CHUNK, true), if reading => match chunk {
                Ok(Some(chunk)) => lock(&shared.control).handle_stream_data(&chunk.bytes, monotonic_us()),
                Ok(None) => {
                    reading = false;
                    lock(&shared.control).handle_stream_end(monotonic_us());
                }
                // A lost connection is reported once, by `watch_close`.
                Err(error) => return tracing::debug!(%error, "control stream ended"),
            },
            () = shared.control_wake.notified() => {}
            () = timer => lock(&shared.control).handle_timeout(monotonic_us()),
        }
    }
}

async fn input_writer(
    handle: SessionHandle,
    mut send: quinn::SendStream,
    mut queue: mpsc::Receiver<InputMessage>,
) {
    let mut buffer = Vec::new();
    while let Some(first) = queue.recv().await {
        buffer.clear();
        // Everything queued goes out in one write: a typed line is one packet, not forty.
        let mut next = Some(first);
        while let Some(message) = next {
            if let Err(error) = wire::encode(&message, &mut buffer) {
                tracing::warn!(%error, "not sending an invalid input message");
            }
            next = queue.try_recv().ok();
        }
        if let Err(error) = send.write_all(&buffer).await {
            tracing::debug!(%error, "input stream closed");
            break;
        }
    }
    let _ = send.finish();
    drop(handle);
}

/// Hands the messages of one of the agent channels to a writer task per lane
/// ([`Queued::lane`]), started at the lane's first message and ended after the message that
/// ends it ([`Queued::ends_lane`]).
async fn exchange_writer<M: ChannelMessage + Queued + Send + 'static>(
    handle: SessionHandle,
    mut queue: mpsc::UnboundedReceiver<M>,
    exchange: fn(&Shared) -> &Exchange<M>,
) {
    let mut lanes = std::collections::HashMap::new();
    let mut writers = JoinSet::new();
    while let Some(message) = queue.recv().await {
        let lane = message.lane();
        let ended = message.ends_lane();
        let writer = lanes.entry(lane).or_insert_with(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            writers.spawn(lane_writer(handle.clone(), rx, exchange));
            tx
        });
        let _ = writer.send(message);
        if let Some(ended) = ended {
            // Its writer finishes the stream once it wrote what it has.
            lanes.remove(&ended);
        }
        while writers.try_join_next().is_some() {}
    }
    drop(lanes);
    while writers.join_next().await.is_some() {}
}

/// Writes one lane's messages on a stream of their own, opened at the first one.
async fn lane_writer<M: ChannelMessage + Queued>(
    handle: SessionHandle,
    mut queue: mpsc::UnboundedReceiver<M>,
    exchange: fn(&Shared) -> &Exchange<M>,
) {
    let Some(first) = queue.recv().await else { return };
    let queued = &exchange(&handle.shared).queued;
    let result: Result<(), String> = async {
        let mut send = handle.connection.open_uni().await.map_err(|e| e.to_string())?;
        let _ = send.set_priority(priority::of(M::CHANNEL));
        send.write_all(&transport::stream_prelude(M::CHANNEL)).await.map_err(|e| e.to_string())?;
        let mut buffer = Vec::new();
        let mut next = Some(first);
        while let Some(message) = next {
            buffer.clear();
            wire::encode(&message, &mut buffer).map_err(|e| e.to_string())?;
            send.write_all(&buffer).await.map_err(|e| e.to_string())?;
            queued.fetch_sub(message.queued_size() as u64, Ordering::Relaxed);
            next = queue.recv().await;
        }
        let _ = send.finish();
        Ok(())
    }
    .await;
    if let Err(error) = result {
        tracing::debug!(%error, "{} stream closed", M::CHANNEL);
    }
}

/// The server's messages of one of the agent channels, to its sink.
async fn exchange_stream<M: ChannelMessage>(
    handle: SessionHandle,
    mut recv: quinn::RecvStream,
    events: mpsc::Sender<SessionEvent>,
    exchange: fn(&Shared) -> &Exchange<M>,
) {
    let mut decoder = StreamDecoder::<M>::new();
    let mut messages = Vec::new();
    loop {
        let chunk = match recv.read_chunk(READ_CHUNK, true).await {
            Ok(Some(chunk)) => chunk,
            Ok(None) => return,
            Err(error) => return tracing::debug!(%error, "{} stream ended", M::CHANNEL),
        };
        if let Err(e) = decoder.decode_all(&chunk.bytes, &mut messages) {
            let _ = recv.stop(e.error_code().into());
            let code = e.error_code();
            let error = ClientError::Protocol { channel: M::CHANNEL, detail: e.to_string() };
            return handle.fail(&events, code, error).await;
        }
        let exchange = exchange(&handle.shared);
        let sink = lock(&exchange.sink);
        for message in messages.drain(..) {
            match sink.as_ref() {
                Some(sink) => sink(message),
                // Before anyone listens only the latest of what matters then is kept.
                None if (exchange.keep_early)(&message) => *lock(&exchange.early) = Some(message),
                None => tracing::debug!(?message, "a {} message with nobody to take it", M::CHANNEL),
            }
        }
    }
}

async fn accept_streams(handle: SessionHandle, events: mpsc::Sender<SessionEvent>) {
    let display_streams = Arc::new(AtomicU64::new(0));
    let mut streams = JoinSet::new();
    loop {
        let recv = tokio::select! {
            accepted = handle.connection.accept_uni() => match accepted {
                Ok(recv) => recv,
                Err(_) => break,
            },
            Some(_) = streams.join_next(), if !streams.is_empty() => continue,
        };
        streams.spawn(server_stream(handle.clone(), recv, events.clone(), display_streams.clone()));
    }
    // The connection is over: let the stream tasks finish reporting.
    while streams.join_next().await.is_some() {}
}

async fn server_stream(
    handle: SessionHandle,
    mut recv: quinn::RecvStream,
    events: mpsc::Sender<SessionEvent>,
    display_streams: Arc<AtomicU64>,
) {
    let mut prelude = [0u8; 1];
    match tokio::time::timeout(PRELUDE_TIMEOUT, recv.read_exact(&mut prelude)).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => return tracing::debug!(%error, "server stream ended before its prelude"),
        Err(_) => {
            let _ = recv.stop(error_code::PROTOCOL_VIOLATION.into());
            return tracing::warn!("server stream sent no channel prelude within 10 s");
        }
    }
    match Channel::from_uni_prelude(prelude[0]) {
        Ok(Channel::Display) => {
            if display_streams.fetch_add(1, Ordering::SeqCst) >= MAX_DISPLAY_STREAMS as u64 {
                tracing::warn!("more than {MAX_DISPLAY_STREAMS} display streams; stopping the extra one");
                let _ = recv.stop(error_code::PROTOCOL_VIOLATION.into());
                return;
            }
            display_stream(handle, recv, events).await;
        }
        Ok(Channel::Cursor) => cursor_stream(handle, recv, events).await,
        Ok(Channel::Clipboard) if handle.shared.clipboard.tx.is_some() => {
            exchange_stream(handle, recv, events, |s| &s.clipboard).await;
        }
        Ok(Channel::Files) if handle.shared.files.tx.is_some() => {
            exchange_stream(handle, recv, events, |s| &s.files).await;
        }
        Ok(Channel::Usb) if handle.shared.usb.tx.is_some() => {
            exchange_stream(handle, recv, events, |s| &s.usb).await;
        }
        other => {
            tracing::warn!(
                prelude = prelude[0],
                ?other,
                "stopping a server stream of an unsupported channel"
            );
            let _ = recv.stop(error_code::UNSUPPORTED_CHANNEL.into());
        }
    }
}

async fn display_stream(
    handle: SessionHandle,
    mut recv: quinn::RecvStream,
    events: mpsc::Sender<SessionEvent>,
) {
    let mut decoder = StreamDecoder::<DisplayMessage>::new();
    let mut stream = DisplayStream::new();
    // Bytes consumed since the last whole message: becomes that message's size.
    let mut pending_bytes = 0u64;
    let counters = &handle.shared.counters;
    loop {
        let chunk = match recv.read_chunk(READ_CHUNK, true).await {
            Ok(Some(chunk)) => chunk,
            Ok(None) => {
                if let Err(e) = decoder.finish() {
                    let code = e.error_code();
                    let error = ClientError::Protocol { channel: Channel::Display, detail: e.to_string() };
                    handle.fail(&events, code, error).await;
                }
                return;
            }
            Err(error) => return tracing::debug!(%error, "display stream ended"),
        };
        let received_us = monotonic_us();
        counters.bytes_received.fetch_add(chunk.bytes.len() as u64, Ordering::Relaxed);
        lock(&handle.shared.control).add_received_bytes(chunk.bytes.len() as u64);
        let mut input: &[u8] = &chunk.bytes;
        loop {
            let before = input.len();
            let decoded = decoder.decode(&mut input);
            pending_bytes += (before - input.len()) as u64;
            let message = match decoded {
                Ok(Some(message)) => message,
                Ok(None) => break,
                Err(e) => {
                    let _ = recv.stop(e.error_code().into());
                    let code = e.error_code();
                    let error = ClientError::Protocol { channel: Channel::Display, detail: e.to_string() };
                    return handle.fail(&events, code, error).await;
                }
            };
            let bytes = std::mem::take(&mut pending_bytes);
            let applied = {
                let mut displays = lock(&handle.shared.displays);
                stream.on_message(&mut displays, &message, bytes, received_us, monotonic_us)
            };
            match applied {
                Ok(None) => {}
                Ok(Some(stats)) => {
                    let ack = FrameAck {
                        frame_id: stats.frame_id,
                        scanout: stats.scanout,
                        received_us: stats.received_us,
                        decoded_us: stats.decoded_us,
                    };
                    match handle.control(|control| control.ack_frame(ack)) {
                        Ok(()) => {}
                        Err(IntentError::Closed) => return,
                        Err(error) => tracing::warn!(%error, "frame not acked"),
                    }
                    counters.frames.fetch_add(1, Ordering::Relaxed);
                    let _ = events.send(SessionEvent::Frame(stats)).await;
                }
                Err(e) => {
                    let code = e.error_code();
                    let _ = recv.stop(code.into());
                    let error = ClientError::Protocol { channel: Channel::Display, detail: e.to_string() };
                    return handle.fail(&events, code, error).await;
                }
            }
        }
    }
}

fn apply_position(handle: &SessionHandle, position: CursorPosition) {
    let mut cursor = lock(&handle.shared.cursor);
    if cursor.position.is_none_or(|last| position.seq > last.seq) {
        cursor.position = Some(position);
    }
}

async fn cursor_stream(
    handle: SessionHandle,
    mut recv: quinn::RecvStream,
    events: mpsc::Sender<SessionEvent>,
) {
    let mut decoder = StreamDecoder::<CursorMessage>::new();
    loop {
        let chunk = match recv.read_chunk(READ_CHUNK, true).await {
            Ok(Some(chunk)) => chunk,
            Ok(None) | Err(_) => return,
        };
        let mut input: &[u8] = &chunk.bytes;
        loop {
            match decoder.decode(&mut input) {
                Ok(Some(CursorMessage::Shape(shape))) => {
                    let event = SessionEvent::CursorShape {
                        serial: shape.serial,
                        width: shape.width,
                        height: shape.height,
                    };
                    lock(&handle.shared.cursor).shape = Some(shape);
                    let _ = events.send(event).await;
                }
                Ok(Some(CursorMessage::Position(position))) => apply_position(&handle, position),
                Ok(None) => break,
                Err(e) => {
                    let code = e.error_code();
                    let _ = recv.stop(code.into());
                    let error = ClientError::Protocol { channel: Channel::Cursor, detail: e.to_string() };
                    return handle.fail(&events, code, error).await;
                }
            }
        }
    }
}

async fn read_datagrams(handle: SessionHandle) {
    while let Ok(datagram) = handle.connection.read_datagram().await {
        match wire::decode_datagram(&datagram) {
            Ok(Some(Datagram::CursorPosition(position))) => apply_position(&handle, position),
            Ok(Some(Datagram::AudioPlayback(packet))) => {
                let sender = lock(&handle.shared.audio).clone();
                if let Some(sender) = sender
                    && sender.try_send(packet).is_err()
                {
                    handle.shared.counters.datagrams_dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
            Ok(Some(_)) | Ok(None) => {}
            Err(error) => {
                handle.shared.counters.datagrams_dropped.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%error, "dropped a datagram");
            }
        }
    }
}

async fn watch_close(handle: SessionHandle, events: mpsc::Sender<SessionEvent>) {
    let error = handle.connection.closed().await;
    if let quinn::ConnectionError::ApplicationClosed(close) = &error
        && close.error_code.into_inner() == u64::from(error_code::NO_ERROR)
    {
        // A clean close usually follows a Goodbye on the control stream; give the reader a
        // moment to deliver it, then report the close itself.
        tokio::time::sleep(Duration::from_millis(100)).await;
        if handle.shared.closing.swap(true, Ordering::SeqCst) {
            return;
        }
        let reason = String::from_utf8_lossy(&close.reason).into_owned();
        tracing::info!(reason, "the server closed the connection");
        let _ = events.send(SessionEvent::ServerClosed(reason)).await;
        return;
    }
    if handle.shared.closing.swap(true, Ordering::SeqCst) {
        return;
    }
    tracing::warn!(%error, "connection closed");
    let _ = events.send(SessionEvent::Failed(ClientError::ConnectionLost(error))).await;
}
