//! One client connection: handshake, control, input, display, cursor, clipboard, files and USB.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use pleiades_control::RelayPort;
use pleiades_protocol::control::{ControlConfig, IntentError, ServerControl, ServerEvent};
use pleiades_protocol::handshake::{Capabilities, Refusal, ServerOutcome, Session};
use pleiades_protocol::resume;
use pleiades_protocol::ticket::TicketClaims;
use pleiades_protocol::transport::{error_code, priority, stream_prelude};
use pleiades_protocol::wire::{
    self, Channel, ChannelMessage, ClipboardMessage, ControlMessage, CursorMessage, CursorPosition,
    CursorShape, Datagram, FileMessage, GoodbyeReason, InputMessage, Monitor, Queued, RefuseCode,
    StreamDecoder, UsbMessage,
};
use tokio::sync::{Notify, watch};

use super::Shared;
use super::input::InputRouter;
use crate::display::{DisplayEncoder, EncoderSettings};
use pleiades_virtio::gpu::{Framebuffer, GpuHandle, monotonic_us};

/// How long a client has to send `Hello` (docs/protocol.md, 3).
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Video bitrate bounds whatever the estimate says (bits per second).
const MIN_VIDEO_BITRATE: u64 = 250_000;
const MAX_VIDEO_BITRATE: u64 = 20_000_000;
/// Until the pacer has measured the path.
const DEFAULT_VIDEO_BITRATE: u64 = 4_000_000;
/// Largest chunk read from the control stream at once.
const CONTROL_CHUNK: usize = 64 * 1024;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Serves one connection until it ends.
pub(crate) async fn serve(shared: Arc<Shared>, conn: quinn::Connection, place: crate::admission::Place) {
    shared.metrics.connections.fetch_add(1, Ordering::Relaxed);
    let remote = conn.remote_address();
    let outcome = handshake(&shared, &conn).await;
    // A stranger no more: accepted, or on its way out.
    drop(place);
    match outcome {
        Ok(Some(opened)) => {
            let session = &opened.session;
            tracing::info!("session {}: {} connected from {remote}", session.session_id, session.peer_name);
            run(shared, conn, opened).await;
        }
        Ok(None) => {}
        Err(e) => {
            tracing::info!("session: {remote}: {e}");
            conn.close(error_code::PROTOCOL_VIOLATION.into(), e.as_bytes());
        }
    }
}

/// A session the handshake opened.
struct Opened {
    session: Session,
    /// Whose ticket (or resumed session) it is.
    user: String,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    /// Control bytes that came after `Hello` in the same read.
    leftover: Vec<u8>,
}

/// `Hello` → `Welcome` (the session is open) or `Refused` (`None`).
async fn handshake(shared: &Arc<Shared>, conn: &quinn::Connection) -> Result<Option<Opened>, String> {
    let first = tokio::time::timeout(HELLO_TIMEOUT, async {
        let (send, mut recv) = conn.accept_bi().await.map_err(|e| format!("no control stream: {e}"))?;
        let mut decoder = StreamDecoder::<ControlMessage>::new();
        let mut buf = vec![0u8; 4096];
        loop {
            let n = recv.read(&mut buf).await.map_err(|e| format!("control stream: {e}"))?;
            let Some(n) = n else { return Err("the control stream ended before Hello".to_owned()) };
            let mut chunk = &buf[..n];
            if let Some(message) = decoder.decode(&mut chunk).map_err(|e| format!("bad Hello: {e}"))? {
                return Ok((message, send, recv, chunk.to_vec()));
            }
        }
    })
    .await;
    let (message, mut send, recv, leftover) = match first {
        Ok(result) => result?,
        Err(_) => {
            conn.close(error_code::HANDSHAKE_TIMEOUT.into(), b"no Hello within 10 s");
            return Ok(None);
        }
    };
    let session_id = shared.next_session.fetch_add(1, Ordering::Relaxed);
    let outcome = shared.handshake.on_first_message(&message, session_id, |ticket: &str| {
        if resume::is_resume_token(ticket) {
            let now = super::unix_now();
            let resumed = lock(&shared.resume).redeem(ticket, &shared.desktop, now)?;
            tracing::info!("session {session_id}: resumes session {}", resumed.session_id);
            return Ok(TicketClaims {
                id: [0; 16],
                user: resumed.user,
                desktop: shared.desktop.clone(),
                host: String::new(),
                issued_at: now,
                expires_at: now,
                generation: None,
            });
        }
        let claims = lock(&shared.verifier).verify(ticket, super::unix_now()).map_err(Refusal::from)?;
        if claims.desktop != shared.desktop {
            return Err(Refusal::new(
                RefuseCode::WrongDesktop,
                format!("the ticket is for desktop {:?}, this is {:?}", claims.desktop, shared.desktop),
            ));
        }
        Ok(claims)
    });
    match outcome {
        ServerOutcome::Accept { reply, session, claims } => {
            write(&mut send, &reply).await?;
            tracing::info!("session {session_id}: ticket of {} for {} accepted", claims.user, claims.desktop);
            Ok(Some(Opened { session, user: claims.user, send, recv, leftover }))
        }
        ServerOutcome::Refuse { reply, code } => {
            shared.metrics.refused.fetch_add(1, Ordering::Relaxed);
            tracing::info!("session: refused {}: {code:?}", conn.remote_address());
            write(&mut send, &reply).await?;
            let _ = send.finish();
            // Let the client read the refusal before the connection goes.
            let _ = tokio::time::timeout(Duration::from_secs(2), conn.closed()).await;
            conn.close(error_code::REFUSED.into(), b"refused");
            Ok(None)
        }
    }
}

async fn write<M: wire::ChannelMessage>(send: &mut quinn::SendStream, message: &M) -> Result<(), String> {
    let bytes = wire::encode_to_vec(message).map_err(|e| e.to_string())?;
    send.write_all(&bytes).await.map_err(|e| e.to_string())
}

/// A session's control channel: the state machine, shared by the pump, the display thread and
/// whoever ends the session, and the pump's wake-up for what they queue (quinn's
/// `ConnectionRef` around `quinn_proto::Connection`).
pub(crate) struct ControlLink {
    state: Mutex<ServerControl>,
    wake: Notify,
}

impl ControlLink {
    fn new(control: ServerControl) -> Self {
        Self { state: Mutex::new(control), wake: Notify::new() }
    }

    fn lock(&self) -> MutexGuard<'_, ServerControl> {
        lock(&self.state)
    }

    /// Ends the session with `Goodbye`: the client hears why, and the connection closes when it
    /// has (or after the linger).
    pub(crate) fn say_goodbye(&self, reason: GoodbyeReason, message: &str) {
        self.lock().close(reason, message, monotonic_us());
        self.wake.notify_one();
    }

    /// Tells the client the guest's monitors if they changed since it was last told.
    fn announce_layout(&self, monitors: Vec<Monitor>) {
        match self.lock().announce_layout(monitors) {
            Ok(true) => self.wake.notify_one(),
            Ok(false) | Err(IntentError::Closed) => {}
            Err(e) => tracing::warn!("session: not announcing the guest's layout: {e}"),
        }
    }
}

/// The session that has the desktop now.
pub(crate) struct Live {
    pub id: u64,
    pub control: Arc<ControlLink>,
}

/// The open session: takes over the desktop, then runs until the client leaves.
async fn run(shared: Arc<Shared>, conn: quinn::Connection, opened: Opened) {
    let Opened { session, user, send: control_send, recv: control_recv, leftover } = opened;
    let control = ServerControl::new(&session, ControlConfig::default(), monotonic_us());
    let link = Arc::new(ControlLink::new(control));
    let live = Live { id: session.session_id, control: link.clone() };
    let previous = lock(&shared.current).replace(live);
    if let Some(old) = previous {
        tracing::info!("session {}: replaced by session {}", old.id, session.session_id);
        old.control.say_goodbye(GoodbyeReason::Replaced, "replaced by a new connection to this desktop");
    }
    shared.controller.client_arrived();
    let _ = control_send.set_priority(priority::CONTROL);
    let stop = Arc::new(AtomicBool::new(false));

    let gpu = shared.controller.display();
    if let Some(gpu) = &gpu {
        link.announce_layout(monitors(gpu));
    }
    let display = gpu.clone().map(|gpu| {
        let (conn, link, stop, shared) = (conn.clone(), link.clone(), stop.clone(), shared.clone());
        let handle = tokio::runtime::Handle::current();
        let caps = session.capabilities;
        std::thread::Builder::new().name(format!("display-{}", session.session_id)).spawn(move || {
            if let Err(e) = display_loop(&gpu, &conn, &handle, &link, &stop, caps, &shared) {
                tracing::info!("display stream ended: {e}");
                conn.close(error_code::PROTOCOL_VIOLATION.into(), e.as_bytes());
            }
        })
    });

    let reported_loss = super::audio::reported_loss();
    let sound = shared.controller.sound().filter(|_| session.capabilities.contains(Capabilities::AUDIO));
    let playback = sound.clone().map(|sound| {
        let (conn, stop, loss, metrics) =
            (conn.clone(), stop.clone(), reported_loss.clone(), shared.audio.clone());
        std::thread::Builder::new().name(format!("audio-{}", session.session_id)).spawn(move || {
            if let Err(e) = super::audio::playback_loop(&sound, &conn, &stop, &loss, &metrics) {
                tracing::info!("audio playback ended: {e}");
            }
        })
    });
    let datagrams = super::audio::datagram_loop(&conn, sound, reported_loss, shared.audio.clone());
    let (layout_tx, layout_rx) = watch::channel(None);
    let pump = ControlPump {
        shared: &shared,
        conn: &conn,
        link: &link,
        session_id: session.session_id,
        user: &user,
    };
    let control = pump.run(control_send, control_recv, leftover, &layout_tx);
    let layouts = apply_layouts(&shared, &link, layout_rx);
    let clipboard = shared
        .controller
        .clipboard()
        .filter(|_| session.capabilities.contains(Capabilities::CLIPBOARD))
        .map(|port| RelayEnd { port, session: session.session_id });
    let files = shared
        .controller
        .files()
        .filter(|_| session.capabilities.contains(Capabilities::FILES))
        .map(|port| RelayEnd { port, session: session.session_id });
    let usb = shared
        .controller
        .usb()
        .filter(|_| session.capabilities.contains(Capabilities::USB))
        .map(|port| RelayEnd { port, session: session.session_id });
    let clipboard_out = relay_out(&conn, clipboard.clone());
    let files_out = relay_out(&conn, files.clone());
    let usb_out = relay_out(&conn, usb.clone());
    let relays = Relays { clipboard: clipboard.clone(), files: files.clone(), usb: usb.clone() };
    let input = input_loop(&shared, &conn, relays);
    tokio::select! {
        () = clipboard_out => {}
        () = files_out => {}
        () = usb_out => {}
        reason = control => tracing::info!("session {}: control ended: {reason}", session.session_id),
        () = layouts => {}
        reason = input => tracing::info!("session {}: input ended: {reason}", session.session_id),
        reason = datagrams => tracing::info!("session {}: datagrams ended: {reason}", session.session_id),
        e = conn.closed() => tracing::info!("session {}: closed: {e}", session.session_id),
    }
    stop.store(true, Ordering::Relaxed);
    if let Some(end) = &clipboard {
        end.port.detach(end.session);
    }
    if let Some(end) = &files {
        end.port.detach(end.session);
    }
    if let Some(end) = &usb {
        end.port.detach(end.session);
    }
    for thread in [display, playback].into_iter().flatten().flatten() {
        let _ = tokio::task::spawn_blocking(move || thread.join()).await;
    }
    lock(&shared.resume).session_ended(session.session_id, super::unix_now());
    let left = {
        let mut current = lock(&shared.current);
        let ours = current.as_ref().is_some_and(|live| live.id == session.session_id);
        if ours {
            *current = None;
        }
        ours
    };
    if left {
        shared.controller.client_left();
    }
    conn.close(error_code::NO_ERROR.into(), b"bye");
}

/// The I/O around a session's [`ServerControl`]: the control stream and the timers in,
/// messages out, events acted on.
struct ControlPump<'a> {
    shared: &'a Arc<Shared>,
    conn: &'a quinn::Connection,
    link: &'a ControlLink,
    session_id: u64,
    user: &'a str,
}

impl ControlPump<'_> {
    /// Runs until the control channel ends; returns why.
    async fn run(
        &self,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
        leftover: Vec<u8>,
        layouts: &watch::Sender<Option<Vec<(u32, u32)>>>,
    ) -> String {
        self.link.lock().handle_stream_data(&leftover, monotonic_us());
        let mut out = Vec::new();
        let mut reading = true;
        let mut acked = 0u64;
        loop {
            let (events, deadline) = {
                let mut control = self.link.lock();
                out.clear();
                while let Some(message) = control.poll_transmit() {
                    // Intents are checked when queued: this fails only on a bug here.
                    if let Err(e) = wire::encode(&message, &mut out) {
                        tracing::warn!("session: not sending an invalid {message:?}: {e}");
                    }
                }
                let total = control.acks_received();
                self.shared.metrics.frames_acked.fetch_add(total - acked, Ordering::Relaxed);
                acked = total;
                (std::iter::from_fn(|| control.poll_event()).collect::<Vec<_>>(), control.poll_timeout())
            };
            if !out.is_empty()
                && let Err(e) = send.write_all(&out).await
            {
                return format!("cannot write the control stream: {e}");
            }
            let mut queued = false;
            for event in events {
                match event {
                    ServerEvent::LayoutWanted(sizes) => {
                        layouts.send_replace(Some(sizes.iter().map(|s| (s.width, s.height)).collect()));
                    }
                    ServerEvent::ResumeTokenWanted => queued |= self.issue_resume_token(),
                    ServerEvent::Rtt(sample) => {
                        self.shared.metrics.rtt_us.store(sample.smoothed_us, Ordering::Relaxed);
                    }
                    ServerEvent::ClientStats(stats) => {
                        tracing::debug!("session {}: client stats {stats:?}", self.session_id);
                    }
                    ServerEvent::Closed(reason) => {
                        let _ = send.finish();
                        self.conn.close(reason.error_code().into(), reason.to_string().as_bytes());
                        return reason.to_string();
                    }
                }
            }
            if queued {
                continue;
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
                chunk = recv.read_chunk(CONTROL_CHUNK, true), if reading => {
                    let now = monotonic_us();
                    match chunk {
                        Ok(Some(chunk)) => self.link.lock().handle_stream_data(&chunk.bytes, now),
                        Ok(None) => {
                            reading = false;
                            self.link.lock().handle_stream_end(now);
                        }
                        Err(e) => return format!("the control stream failed: {e}"),
                    }
                }
                () = self.link.wake.notified() => {}
                () = timer => self.link.lock().handle_timeout(monotonic_us()),
            }
        }
    }

    /// A fresh one-time resume token for this session, to the client. Returns whether one was
    /// queued.
    fn issue_resume_token(&self) -> bool {
        let shared = self.shared;
        let token =
            lock(&shared.resume).issue(self.session_id, &shared.desktop, self.user, super::unix_now());
        let Some(token) = token else {
            tracing::warn!("session {}: no resume token (no randomness)", self.session_id);
            return false;
        };
        let lifetime_s = resume::RESUME_LIFETIME_S as u32;
        match self.link.lock().send_resume_token(token, lifetime_s, monotonic_us()) {
            Ok(()) => true,
            Err(e) => {
                tracing::debug!("session {}: resume token not sent: {e}", self.session_id);
                false
            }
        }
    }
}

/// Applies the layouts the client wants, one at a time, the latest winning (the guest may take
/// a while to switch), and tells the client the result.
async fn apply_layouts(
    shared: &Arc<Shared>,
    link: &ControlLink,
    mut wanted: watch::Receiver<Option<Vec<(u32, u32)>>>,
) {
    while wanted.changed().await.is_ok() {
        let Some(sizes) = wanted.borrow_and_update().clone() else { continue };
        let controller = shared.controller.clone();
        let result = tokio::task::spawn_blocking(move || controller.set_layout(&sizes)).await;
        if let Ok(Err(e)) = result {
            tracing::info!("session: the client's layout was refused: {e}");
        }
        // In the middle of a mode switch the guest may have no monitor on: nothing to say yet
        // (the display thread announces the layout once it settles).
        if let Some(gpu) = shared.controller.display() {
            link.announce_layout(monitors(&gpu));
        }
    }
}

/// The guest's monitors as the protocol describes them.
fn monitors(gpu: &GpuHandle) -> Vec<Monitor> {
    let mut x = 0i32;
    gpu.sink()
        .sizes()
        .iter()
        .enumerate()
        .filter_map(|(id, size)| {
            let (width, height) = (*size)?;
            let m = Monitor { id: id as u32, x, y: 0, width, height };
            x = x.saturating_add(width as i32);
            Some(m)
        })
        .collect()
}

/// The session's end of one of the VM's relays to the guest agent (clipboard, files, USB).
struct RelayEnd<M: 'static> {
    port: Arc<dyn RelayPort<M>>,
    session: u64,
}

impl<M> Clone for RelayEnd<M> {
    fn clone(&self) -> Self {
        Self { port: self.port.clone(), session: self.session }
    }
}

/// The relays this session has (each with its capability).
struct Relays {
    clipboard: Option<RelayEnd<ClipboardMessage>>,
    files: Option<RelayEnd<FileMessage>>,
    usb: Option<RelayEnd<UsbMessage>>,
}

/// Attaches the session to a relay and writes what it has for the client on streams of ours
/// of its channel, one per lane ([`Queued::lane`]: a USB device's data waits only for its own
/// stream's flow control). Never ends by itself: a failed stream only ends that channel. What
/// waits for the client is bounded ([`Queued::MAX_QUEUE`]): a client that does not read, or a
/// guest that floods, ends the session's channel (the relay's client end is detached), never
/// the VM process's memory.
async fn relay_out<M: ChannelMessage + Queued + Send + 'static>(
    conn: &quinn::Connection,
    end: Option<RelayEnd<M>>,
) {
    use std::sync::atomic::AtomicUsize;
    let Some(end) = end else { return std::future::pending().await };
    let channel = M::CHANNEL;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<M>();
    let queued = Arc::new(AtomicUsize::new(0));
    let overflow = Arc::new(Notify::new());
    let (counted, full) = (queued.clone(), overflow.clone());
    end.port.attach(
        end.session,
        Box::new(move |message| {
            let size = message.queued_size();
            if counted.fetch_add(size, Ordering::Relaxed) + size > M::MAX_QUEUE {
                full.notify_one();
                return;
            }
            let _ = tx.send(message);
        }),
    );
    let result: Result<(), String> = async {
        let mut lanes = std::collections::HashMap::new();
        let (failed, mut failure) = tokio::sync::mpsc::channel::<String>(1);
        loop {
            let message = tokio::select! {
                message = rx.recv() => message.ok_or("the relay went away")?,
                () = overflow.notified() => return Err("more data waits than the client reads".into()),
                Some(e) = failure.recv() => return Err(e),
            };
            if let Some(ended) = message.ends_lane() {
                // Its writer finishes the stream once it wrote what it has.
                lanes.remove(&ended);
            }
            let lane = message.lane();
            if !lanes.contains_key(&lane) && lanes.len() >= MAX_LANES {
                return Err(format!("more than {MAX_LANES} streams on the {channel} channel"));
            }
            let writer = lanes.entry(lane).or_insert_with(|| {
                let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
                tokio::spawn(lane_writer(conn.clone(), rx, queued.clone(), failed.clone()));
                tx
            });
            writer.send(message).map_err(|_| "a stream's writer ended".to_owned())?;
        }
    }
    .await;
    if let Err(e) = result {
        tracing::warn!("session {}: the {channel} channel to the client ended: {e}", end.session);
    }
    end.port.detach(end.session);
    drop(rx);
    std::future::pending().await
}

/// Most streams one relayed channel opens to the client: lane 0 and one per USB device.
const MAX_LANES: usize = wire::MAX_USB_DEVICES + 1;

/// Writes one lane's messages on a stream of its own; says why on `failed` if the stream fails.
async fn lane_writer<M: ChannelMessage + Queued>(
    conn: quinn::Connection,
    mut messages: tokio::sync::mpsc::UnboundedReceiver<M>,
    queued: Arc<std::sync::atomic::AtomicUsize>,
    failed: tokio::sync::mpsc::Sender<String>,
) {
    let channel = M::CHANNEL;
    let result: Result<(), String> = async {
        let mut stream = conn.open_uni().await.map_err(|e| e.to_string())?;
        let _ = stream.set_priority(priority::of(channel));
        stream.write_all(&stream_prelude(channel)).await.map_err(|e| e.to_string())?;
        let mut bytes = Vec::new();
        while let Some(message) = messages.recv().await {
            bytes.clear();
            wire::encode(&message, &mut bytes).map_err(|e| e.to_string())?;
            stream.write_all(&bytes).await.map_err(|e| e.to_string())?;
            queued.fetch_sub(message.queued_size(), Ordering::Relaxed);
        }
        Ok(())
    }
    .await;
    if let Err(e) = result {
        let _ = failed.try_send(e);
    }
}

/// Reads the client's stream of a relayed channel into the relay; a malformed message ends the
/// connection (as on every stream).
async fn relay_in<M: ChannelMessage>(conn: quinn::Connection, mut recv: quinn::RecvStream, end: RelayEnd<M>) {
    let mut decoder = StreamDecoder::<M>::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut messages = Vec::new();
    while let Ok(Some(n)) = recv.read(&mut buf).await {
        if let Err(e) = decoder.decode_all(&buf[..n], &mut messages) {
            let _ = recv.stop(e.error_code().into());
            conn.close(e.error_code().into(), e.to_string().as_bytes());
            return;
        }
        for message in messages.drain(..) {
            end.port.client_sent(end.session, message);
        }
    }
}

/// Accepts the client's unidirectional streams (input, clipboard, files, USB) and routes input
/// to the VM.
async fn input_loop(shared: &Arc<Shared>, conn: &quinn::Connection, relays: Relays) -> String {
    let (streams, mut inputs) = tokio::sync::mpsc::channel(1);
    let accept = accept_streams(conn, streams, relays);
    let mut router = InputRouter::default();
    let read = async {
        while let Some(recv) = inputs.recv().await {
            if let Err(reason) = input_stream(shared, conn, &mut router, recv).await {
                return reason;
            }
        }
        "the input streams ended".to_owned()
    };
    let reason = tokio::select! {
        reason = accept => reason,
        reason = read => reason,
    };
    // Nothing stays pressed when the client goes.
    for (device, events) in router.release_all() {
        let _ = shared.controller.send_input(device, &events);
    }
    reason
}

/// Hands input streams to the input loop and reads clipboard, files and USB streams on tasks of
/// their own; streams of other channels are stopped (the session goes on). Ends when the
/// connection does.
async fn accept_streams(
    conn: &quinn::Connection,
    inputs: tokio::sync::mpsc::Sender<quinn::RecvStream>,
    relays: Relays,
) -> String {
    let usb_streams = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    loop {
        let mut recv = match conn.accept_uni().await {
            Ok(r) => r,
            Err(e) => return e.to_string(),
        };
        let mut prelude = [0u8; 1];
        if recv.read_exact(&mut prelude).await.is_err() {
            continue;
        }
        let Relays { clipboard, files, usb } = &relays;
        match (Channel::from_uni_prelude(prelude[0]), clipboard, files, usb) {
            (Ok(Channel::Input), ..) => {
                if inputs.send(recv).await.is_err() {
                    return "the input loop ended".to_owned();
                }
            }
            (Ok(Channel::Clipboard), Some(end), _, _) => {
                tokio::spawn(relay_in(conn.clone(), recv, end.clone()));
            }
            (Ok(Channel::Files), _, Some(end), _) => {
                tokio::spawn(relay_in(conn.clone(), recv, end.clone()));
            }
            // Lane 0 and one per device at a time: a client that opens more has them stopped.
            (Ok(Channel::Usb), _, _, Some(end)) if usb_streams.load(Ordering::Relaxed) < MAX_LANES => {
                usb_streams.fetch_add(1, Ordering::Relaxed);
                let (conn, end, open) = (conn.clone(), end.clone(), usb_streams.clone());
                tokio::spawn(async move {
                    relay_in(conn, recv, end).await;
                    open.fetch_sub(1, Ordering::Relaxed);
                });
            }
            _ => {
                let _ = recv.stop(error_code::UNSUPPORTED_CHANNEL.into());
            }
        }
    }
}

/// Reads one input stream to its end; `Err` ends the session.
async fn input_stream(
    shared: &Arc<Shared>,
    conn: &quinn::Connection,
    router: &mut InputRouter,
    mut recv: quinn::RecvStream,
) -> Result<(), String> {
    {
        let mut decoder = StreamDecoder::<InputMessage>::new();
        let mut buf = vec![0u8; 4096];
        let mut messages = Vec::new();
        loop {
            let n = match recv.read(&mut buf).await {
                Ok(Some(n)) => n,
                Ok(None) => break,
                Err(e) => return Err(e.to_string()),
            };
            if let Err(e) = decoder.decode_all(&buf[..n], &mut messages) {
                let _ = recv.stop(e.error_code().into());
                conn.close(e.error_code().into(), e.to_string().as_bytes());
                return Err(format!("malformed input: {e}"));
            }
            let monitors = shared.controller.display().map(|g| g.sink().sizes()).unwrap_or_default();
            for message in messages.drain(..) {
                let reports = router.route(&message, &monitors, monotonic_us());
                for (device, events) in reports {
                    shared.metrics.input_events.fetch_add(events.len() as u64, Ordering::Relaxed);
                    if let Err(e) = shared.controller.send_input(device, &events) {
                        tracing::debug!("session: input not delivered: {e}");
                    }
                }
            }
            shared.metrics.input_dropped.store(router.dropped, Ordering::Relaxed);
        }
    }
    Ok(())
}

/// One scanout's stream to the client.
struct ScanoutStream {
    encoder: DisplayEncoder,
    frame: Framebuffer,
    stream: quinn::SendStream,
    /// The capture time of damage the encoder holds back (its CPU budget), if any.
    waiting_since_us: Option<u64>,
}

/// Encodes the sink's damage and sends frames when the pacer allows; also the cursor and the
/// guest's layout changes.
fn display_loop(
    gpu: &GpuHandle,
    conn: &quinn::Connection,
    rt: &tokio::runtime::Handle,
    control: &ControlLink,
    stop: &AtomicBool,
    caps: Capabilities,
    shared: &Shared,
) -> Result<(), String> {
    let sink = gpu.sink();
    // The guest changes its monitors on its own too (`ctl layout`, a guest tool): the client
    // hears of every settled change (docs/protocol.md: "after Welcome and on every change").
    let mut announced = monitors(gpu);
    let mut scanouts: Vec<Option<ScanoutStream>> = (0..gpu.scanouts()).map(|_| None).collect();
    let mut cursor_stream: Option<quinn::SendStream> = None;
    let (mut cursor_generation, mut cursor_image, mut cursor_serial, mut cursor_seq) =
        (u64::MAX, None, 0u32, 0u64);
    let mut seen = u64::MAX;
    let mut frame_id = 0u64;
    let budget = shared.encoder_cpu_budget_percent;
    while !stop.load(Ordering::Relaxed) {
        // Wake for new damage, or when damage the CPU budget held back is due.
        let now_us = monotonic_us();
        let wait_us = scanouts
            .iter()
            .flatten()
            .filter_map(|s| s.encoder.next_due_us(budget))
            .map(|due| due.saturating_sub(now_us))
            .fold(50_000, u64::min);
        let generation = sink.wait_change(seen, Duration::from_micros(wait_us.max(1_000)));
        let now = monitors(gpu);
        if now != announced {
            announced = now.clone();
            control.announce_layout(now);
        }

        // The cursor: shapes on their stream, positions as datagrams (latest wins).
        let cursor = sink.cursor();
        if cursor.generation != cursor_generation && caps.contains(Capabilities::CURSOR_CHANNEL) {
            cursor_generation = cursor.generation;
            if cursor.image.as_ref().map(Arc::as_ptr) != cursor_image {
                cursor_image = cursor.image.as_ref().map(Arc::as_ptr);
                if let Some(image) = &cursor.image {
                    cursor_serial += 1;
                    let shape = CursorMessage::Shape(CursorShape {
                        serial: cursor_serial,
                        width: 64,
                        height: 64,
                        hot_x: cursor.hot_x as u16,
                        hot_y: cursor.hot_y as u16,
                        bgra: image.to_vec(),
                    });
                    let stream = match &mut cursor_stream {
                        Some(s) => s,
                        None => cursor_stream.insert(open_uni(conn, rt, Channel::Cursor, priority::CURSOR)?),
                    };
                    send(rt, stream, &[shape])?;
                }
            }
            cursor_seq += 1;
            let position = CursorPosition {
                seq: cursor_seq,
                scanout: cursor.scanout,
                x: cursor.x as i32,
                y: cursor.y as i32,
                visible: cursor.visible,
            };
            if caps.contains(Capabilities::CURSOR_DATAGRAMS) {
                let _ = conn.send_datagram(wire::encode_datagram(&Datagram::CursorPosition(position)).into());
            } else if let Some(stream) = &mut cursor_stream {
                send(rt, stream, &[CursorMessage::Position(position)])?;
            }
        }

        if !control.lock().may_send_frame(monotonic_us()) {
            // A frame is out: leave the damage in the sink (it accumulates, latest wins).
            std::thread::sleep(Duration::from_millis(2));
            continue;
        }
        seen = generation;
        let settings = {
            let control = control.lock();
            let p = control.pacer();
            EncoderSettings {
                video_bitrate: p
                    .target_bitrate()
                    .unwrap_or(DEFAULT_VIDEO_BITRATE)
                    .clamp(MIN_VIDEO_BITRATE, MAX_VIDEO_BITRATE) as u32,
                fps: p.target_fps() as f32,
                video: caps.contains(Capabilities::H264),
                copy: caps.contains(Capabilities::COPY_RECT),
                cpu_budget_percent: budget,
                palette: caps.contains(Capabilities::PALETTE_TILES),
                scale: caps.contains(Capabilities::SCALED_VIDEO),
            }
        };
        for (index, slot) in scanouts.iter_mut().enumerate() {
            if !control.lock().may_send_frame(monotonic_us()) {
                seen = u64::MAX; // come back for the rest
                break;
            }
            let mut out = match slot.take() {
                Some(s) => s,
                None if sink.sizes().get(index).copied().flatten().is_some() => ScanoutStream {
                    encoder: DisplayEncoder::new(0, 0),
                    stream: open_uni(conn, rt, Channel::Display, priority::DISPLAY)?,
                    frame: Framebuffer::default(),
                    waiting_since_us: None,
                },
                None => continue,
            };
            let Some(damage) = sink.take_damage_since(index, &mut out.frame) else {
                // Disabled: keep the stream for when it comes back; the encoder starts over.
                out.encoder.refresh_all();
                out.waiting_since_us = None;
                *slot = Some(out);
                continue;
            };
            let now_us = monotonic_us();
            let encoded = out.encoder.encode(&out.frame, &damage.rects, &settings, now_us)?;
            // Damage the CPU budget holds back is older than this frame's: its capture time
            // stays with it until it goes.
            let captured = if damage.since_us == 0 { now_us } else { damage.since_us };
            let oldest = out.waiting_since_us.map_or(captured, |w| w.min(captured));
            out.waiting_since_us = out.encoder.next_due_us(budget).map(|_| oldest);
            if let Some(encoded) = encoded {
                frame_id += 1;
                let capture_us =
                    if encoded.video.is_some() || encoded.tiles.is_empty() { oldest } else { captured };
                let messages = crate::display::wire_messages(frame_id, index as u32, capture_us, encoded);
                let bytes = send(rt, &mut out.stream, &messages)?;
                control.lock().on_frame_sent(frame_id, bytes, monotonic_us());
                shared.metrics.frames.fetch_add(1, Ordering::Relaxed);
                shared.metrics.bytes.fetch_add(bytes, Ordering::Relaxed);
            }
            *slot = Some(out);
        }
    }
    Ok(())
}

fn open_uni(
    conn: &quinn::Connection,
    rt: &tokio::runtime::Handle,
    channel: Channel,
    prio: i32,
) -> Result<quinn::SendStream, String> {
    rt.block_on(async {
        let mut stream = conn.open_uni().await.map_err(|e| e.to_string())?;
        let _ = stream.set_priority(prio);
        stream.write_all(&stream_prelude(channel)).await.map_err(|e| e.to_string())?;
        Ok(stream)
    })
}

/// Encodes and writes messages; returns the bytes written.
fn send<M: wire::ChannelMessage>(
    rt: &tokio::runtime::Handle,
    stream: &mut quinn::SendStream,
    messages: &[M],
) -> Result<u64, String> {
    let mut bytes = Vec::new();
    for m in messages {
        wire::encode(m, &mut bytes).map_err(|e| format!("cannot encode {m:?}: {e}"))?;
    }
    rt.block_on(stream.write_all(&bytes)).map_err(|e| e.to_string())?;
    Ok(bytes.len() as u64)
}
