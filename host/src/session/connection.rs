//! One client connection: handshake, control, input, display and cursor.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use pleiades_protocol::handshake::{Capabilities, Refusal, ServerOutcome, Session};
use pleiades_protocol::pacing::{FramePacer, PacerConfig};
use pleiades_protocol::resume;
use pleiades_protocol::ticket::TicketClaims;
use pleiades_protocol::transport::{error_code, priority, stream_prelude};
use pleiades_protocol::wire::{
    self, Channel, ControlMessage, CursorMessage, CursorPosition, CursorShape, Datagram, InputMessage,
    Monitor, Pong, RefuseCode, ResumeToken, StreamDecoder,
};
use tokio::sync::mpsc;

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

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Serves one connection until it ends.
pub(crate) async fn serve(shared: Arc<Shared>, conn: quinn::Connection) {
    shared.metrics.connections.fetch_add(1, Ordering::Relaxed);
    let remote = conn.remote_address();
    match handshake(&shared, &conn).await {
        Ok(Some((session, send, recv))) => {
            tracing::info!("session {}: {} connected from {remote}", session.session_id, session.peer_name);
            run(shared, conn, session, send, recv).await;
        }
        Ok(None) => {}
        Err(e) => {
            tracing::info!("session: {remote}: {e}");
            conn.close(error_code::PROTOCOL_VIOLATION.into(), e.as_bytes());
        }
    }
}

type Streams = (Session, quinn::SendStream, quinn::RecvStream);

/// `Hello` → `Welcome` (the session is open) or `Refused` (`None`).
async fn handshake(shared: &Arc<Shared>, conn: &quinn::Connection) -> Result<Option<Streams>, String> {
    let first = tokio::time::timeout(HELLO_TIMEOUT, async {
        let (send, mut recv) = conn.accept_bi().await.map_err(|e| format!("no control stream: {e}"))?;
        let mut decoder = StreamDecoder::<ControlMessage>::new();
        let mut buf = vec![0u8; 4096];
        loop {
            let n = recv.read(&mut buf).await.map_err(|e| format!("control stream: {e}"))?;
            let Some(n) = n else { return Err("the control stream ended before Hello".to_owned()) };
            let mut chunk = &buf[..n];
            if let Some(message) = decoder.decode(&mut chunk).map_err(|e| format!("bad Hello: {e}"))? {
                return Ok((message, send, recv));
            }
        }
    })
    .await;
    let (message, mut send, recv) = match first {
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
            if session.capabilities.contains(Capabilities::RESUME) {
                let token =
                    lock(&shared.resume).issue(session_id, &shared.desktop, &claims.user, super::unix_now());
                if let Some(token) = token {
                    let lifetime_s = resume::RESUME_LIFETIME_S as u32;
                    write(&mut send, &ControlMessage::ResumeToken(ResumeToken { token, lifetime_s })).await?;
                }
            }
            Ok(Some((session, send, recv)))
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

/// The open session: takes over the desktop, then runs until the client leaves.
async fn run(
    shared: Arc<Shared>,
    conn: quinn::Connection,
    session: Session,
    mut control_send: quinn::SendStream,
    control_recv: quinn::RecvStream,
) {
    let previous = lock(&shared.current).replace((session.session_id, conn.clone()));
    if let Some((id, old)) = previous {
        tracing::info!("session {id}: replaced by session {}", session.session_id);
        old.close(error_code::NO_ERROR.into(), b"replaced by a new connection to this desktop");
    }
    let _ = control_send.set_priority(priority::CONTROL);
    let pacer = Arc::new(Mutex::new(FramePacer::new(PacerConfig::default())));
    let stop = Arc::new(AtomicBool::new(false));

    // Control writer: everything the server sends on the control stream goes through it.
    let (control_tx, mut control_rx) = mpsc::channel::<ControlMessage>(64);
    let writer = tokio::spawn(async move {
        while let Some(message) = control_rx.recv().await {
            // A message that does not encode is a bug here, not a reason to end the session.
            let bytes = match wire::encode_to_vec(&message) {
                Ok(bytes) => bytes,
                Err(e) => {
                    tracing::warn!("session: not sending an invalid {message:?}: {e}");
                    continue;
                }
            };
            if control_send.write_all(&bytes).await.is_err() {
                return;
            }
        }
    });

    let gpu = shared.controller.display();
    if let Some(gpu) = &gpu {
        let _ = control_tx.send(ControlMessage::DisplayLayout(monitors(gpu))).await;
    }
    let display = gpu.clone().map(|gpu| {
        let (conn, pacer, stop, shared) = (conn.clone(), pacer.clone(), stop.clone(), shared.clone());
        let layouts = control_tx.clone();
        let handle = tokio::runtime::Handle::current();
        let caps = session.capabilities;
        std::thread::Builder::new().name(format!("display-{}", session.session_id)).spawn(move || {
            if let Err(e) = display_loop(&gpu, &conn, &handle, &pacer, &stop, caps, &shared, &layouts) {
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
    let control = control_loop(&shared, &conn, control_recv, control_tx.clone(), pacer.clone());
    let input = input_loop(&shared, &conn);
    let pinger = ping_loop(control_tx.clone());
    tokio::select! {
        reason = control => tracing::info!("session {}: control ended: {reason}", session.session_id),
        reason = input => tracing::info!("session {}: input ended: {reason}", session.session_id),
        _ = pinger => {}
        reason = datagrams => tracing::info!("session {}: datagrams ended: {reason}", session.session_id),
        e = conn.closed() => tracing::info!("session {}: closed: {e}", session.session_id),
    }
    stop.store(true, Ordering::Relaxed);
    writer.abort();
    for thread in [display, playback].into_iter().flatten().flatten() {
        let _ = tokio::task::spawn_blocking(move || thread.join()).await;
    }
    lock(&shared.resume).session_ended(session.session_id, super::unix_now());
    let mut current = lock(&shared.current);
    if current.as_ref().is_some_and(|(id, _)| *id == session.session_id) {
        *current = None;
    }
    conn.close(error_code::NO_ERROR.into(), b"bye");
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

async fn ping_loop(control: mpsc::Sender<ControlMessage>) {
    let mut nonce = 0u64;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        nonce += 1;
        let ping = ControlMessage::Ping(wire::Ping { nonce, sent_us: monotonic_us() });
        if control.send(ping).await.is_err() {
            return;
        }
    }
}

/// Reads the client's control stream: pongs and frame acks feed the pacer.
async fn control_loop(
    shared: &Arc<Shared>,
    conn: &quinn::Connection,
    mut recv: quinn::RecvStream,
    control: mpsc::Sender<ControlMessage>,
    pacer: Arc<Mutex<FramePacer>>,
) -> String {
    let mut decoder = StreamDecoder::<ControlMessage>::new();
    let mut buf = vec![0u8; 16 * 1024];
    let mut messages = Vec::new();
    let mut layouts = LayoutDebounce::default();
    loop {
        let n = match recv.read(&mut buf).await {
            Ok(Some(n)) => n,
            Ok(None) => return "the client closed its control stream".into(),
            Err(e) => return e.to_string(),
        };
        if let Err(e) = decoder.decode_all(&buf[..n], &mut messages) {
            conn.close(e.error_code().into(), e.to_string().as_bytes());
            return format!("malformed control message: {e}");
        }
        // A layout that came too soon after the last one is applied with the next message (the
        // client pings every second).
        if let Some(sizes) = layouts.poll(monotonic_us()) {
            apply_layout(shared, &control, sizes).await;
        }
        for message in messages.drain(..) {
            if !message.may_be_sent_by(wire::Side::Client) || message.is_handshake() {
                conn.close(
                    error_code::PROTOCOL_VIOLATION.into(),
                    b"a server-only or second handshake message",
                );
                return "protocol violation on the control stream".into();
            }
            match message {
                ControlMessage::Ping(p) => {
                    let _ =
                        control.send(ControlMessage::Pong(Pong { nonce: p.nonce, sent_us: p.sent_us })).await;
                }
                ControlMessage::Pong(p) => lock(&pacer).on_pong(p.sent_us, monotonic_us()),
                ControlMessage::FrameAck(ack) => {
                    lock(&pacer).on_ack(&ack, monotonic_us());
                }
                ControlMessage::RequestLayout(sizes) => {
                    let sizes: Vec<(u32, u32)> = sizes.iter().map(|m| (m.width, m.height)).collect();
                    if let Some(sizes) = layouts.offer(sizes, monotonic_us()) {
                        apply_layout(shared, &control, sizes).await;
                    }
                }
                ControlMessage::Goodbye(g) => {
                    return format!("the client said goodbye ({:?}: {})", g.reason, g.message);
                }
                ControlMessage::ClientStats(s) => tracing::debug!("session: client stats {s:?}"),
                _ => {}
            }
        }
    }
}

/// The client's layout becomes the guest's (a display-change event in the guest).
async fn apply_layout(shared: &Arc<Shared>, control: &mpsc::Sender<ControlMessage>, sizes: Vec<(u32, u32)>) {
    let controller = shared.controller.clone();
    let result = tokio::task::spawn_blocking(move || controller.set_layout(&sizes)).await;
    if let Ok(Err(e)) = result {
        tracing::info!("session: the client's layout was refused: {e}");
    }
    if let Some(gpu) = shared.controller.display() {
        // In the middle of a mode switch the guest may have no monitor on: nothing to say yet
        // (the display thread announces the layout once it settles).
        let monitors = monitors(&gpu);
        if !monitors.is_empty() {
            let _ = control.send(ControlMessage::DisplayLayout(monitors)).await;
        }
    }
}

/// The least time between two layout changes a client can cause: each one makes the guest
/// re-probe its monitors, so a window being dragged must not become hundreds of them.
const LAYOUT_INTERVAL_US: u64 = 250_000;

/// Rate-limits a client's layout requests: the latest wins, at most one per interval.
#[derive(Debug, Default)]
struct LayoutDebounce {
    last_us: Option<u64>,
    pending: Option<Vec<(u32, u32)>>,
}

impl LayoutDebounce {
    /// A request: apply it now (returned) or keep it as the pending one.
    fn offer(&mut self, sizes: Vec<(u32, u32)>, now_us: u64) -> Option<Vec<(u32, u32)>> {
        self.pending = Some(sizes);
        self.poll(now_us)
    }

    /// The pending request, if its time has come.
    fn poll(&mut self, now_us: u64) -> Option<Vec<(u32, u32)>> {
        let due = self.last_us.is_none_or(|last| now_us.saturating_sub(last) >= LAYOUT_INTERVAL_US);
        if due && self.pending.is_some() {
            self.last_us = Some(now_us);
            return self.pending.take();
        }
        None
    }
}

/// Accepts the client's input stream and routes its events to the VM.
async fn input_loop(shared: &Arc<Shared>, conn: &quinn::Connection) -> String {
    let mut router = InputRouter::default();
    let reason = input_streams(shared, conn, &mut router).await;
    // Nothing stays pressed when the client goes.
    for (device, events) in router.release_all() {
        let _ = shared.controller.send_input(device, &events);
    }
    reason
}

async fn input_streams(shared: &Arc<Shared>, conn: &quinn::Connection, router: &mut InputRouter) -> String {
    loop {
        let mut recv = match conn.accept_uni().await {
            Ok(r) => r,
            Err(e) => return e.to_string(),
        };
        let mut prelude = [0u8; 1];
        if recv.read_exact(&mut prelude).await.is_err() {
            continue;
        }
        match Channel::from_uni_prelude(prelude[0]) {
            Ok(Channel::Input) => {}
            _ => {
                let _ = recv.stop(error_code::UNSUPPORTED_CHANNEL.into());
                continue;
            }
        }
        let mut decoder = StreamDecoder::<InputMessage>::new();
        let mut buf = vec![0u8; 4096];
        let mut messages = Vec::new();
        loop {
            let n = match recv.read(&mut buf).await {
                Ok(Some(n)) => n,
                Ok(None) => break,
                Err(e) => return e.to_string(),
            };
            if let Err(e) = decoder.decode_all(&buf[..n], &mut messages) {
                let _ = recv.stop(e.error_code().into());
                conn.close(e.error_code().into(), e.to_string().as_bytes());
                return format!("malformed input: {e}");
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
}

/// One scanout's stream to the client.
struct ScanoutStream {
    encoder: DisplayEncoder,
    frame: Framebuffer,
    stream: quinn::SendStream,
}

/// Encodes the sink's damage and sends frames when the pacer allows; also the cursor and the
/// guest's layout changes.
#[allow(clippy::too_many_arguments)] // the display thread's whole context, borrowed
fn display_loop(
    gpu: &GpuHandle,
    conn: &quinn::Connection,
    rt: &tokio::runtime::Handle,
    pacer: &Mutex<FramePacer>,
    stop: &AtomicBool,
    caps: Capabilities,
    shared: &Shared,
    layouts: &mpsc::Sender<ControlMessage>,
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
    while !stop.load(Ordering::Relaxed) {
        let generation = sink.wait_change(seen, Duration::from_millis(50));
        let now = monitors(gpu);
        if now != announced && !now.is_empty() {
            announced = now.clone();
            let _ = layouts.try_send(ControlMessage::DisplayLayout(now));
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

        if !lock(pacer).may_send(monotonic_us()) {
            // A frame is out: leave the damage in the sink (it accumulates, latest wins).
            std::thread::sleep(Duration::from_millis(2));
            continue;
        }
        seen = generation;
        let settings = {
            let p = lock(pacer);
            EncoderSettings {
                video_bitrate: p
                    .target_bitrate()
                    .unwrap_or(DEFAULT_VIDEO_BITRATE)
                    .clamp(MIN_VIDEO_BITRATE, MAX_VIDEO_BITRATE) as u32,
                fps: p.target_fps() as f32,
                video: caps.contains(Capabilities::H264),
            }
        };
        for (index, slot) in scanouts.iter_mut().enumerate() {
            if !lock(pacer).may_send(monotonic_us()) {
                seen = u64::MAX; // come back for the rest
                break;
            }
            let mut out = match slot.take() {
                Some(s) => s,
                None if sink.sizes().get(index).copied().flatten().is_some() => ScanoutStream {
                    encoder: DisplayEncoder::new(0, 0),
                    stream: open_uni(conn, rt, Channel::Display, priority::DISPLAY)?,
                    frame: Framebuffer::default(),
                },
                None => continue,
            };
            let Some(damage) = sink.take_damage_since(index, &mut out.frame) else {
                // Disabled: keep the stream for when it comes back; the encoder starts over.
                out.encoder.refresh_all();
                *slot = Some(out);
                continue;
            };
            let encoded = out.encoder.encode(&out.frame, &damage.rects, &settings, monotonic_us())?;
            if let Some(encoded) = encoded {
                frame_id += 1;
                let capture_us = if damage.since_us == 0 { monotonic_us() } else { damage.since_us };
                let messages = crate::display::wire_messages(frame_id, index as u32, capture_us, encoded);
                let bytes = send(rt, &mut out.stream, &messages)?;
                lock(pacer).on_sent(frame_id, bytes, monotonic_us());
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_requests_are_limited_and_the_latest_wins() {
        let mut d = LayoutDebounce::default();
        assert_eq!(d.offer(vec![(800, 600)], 1_000_000), Some(vec![(800, 600)]));
        // A dragged window: many requests within the interval; none applied yet.
        for w in 801..900 {
            assert_eq!(d.offer(vec![(w, 600)], 1_000_000 + u64::from(w - 800) * 1000), None);
        }
        assert_eq!(d.poll(1_100_000), None);
        assert_eq!(d.poll(1_250_000), Some(vec![(899, 600)]), "the latest, once the interval passed");
        assert_eq!(d.poll(2_000_000), None, "nothing pending");
    }
}
