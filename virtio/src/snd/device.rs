//! The sound device state and its [`VirtioDevice`] implementation.
//!
//! Two PCM streams share one ALSA PCM device in the guest (both have HDA function 0): stream 0
//! plays (output), stream 1 records (input). Each has a jack (line out, microphone) and a
//! stereo channel map, which is what the Linux driver asks for at probe.
//!
//! The **period clock**: a tx message is not completed when it arrives but when the stream has
//! had time to play it at 48 kHz, counted from PCM_START (a 5 ms timerfd ticks while a stream
//! runs). Completing at once would let the guest play at CPU speed. Capture works the same
//! way: an rx message is filled (from the microphone, or silence) and completed when its
//! frames have had time to be recorded. A stream the guest lets run dry restarts its clock
//! when new buffers come, so a late guest is not made up for with a burst.

use std::collections::VecDeque;
use std::os::fd::{AsFd, AsRawFd, RawFd};

use nix::sys::time::TimeSpec;
use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};
use virtio_queue::{Queue, QueueOwnedT, QueueT};

use super::protocol::{
    CHMAP_FL, CHMAP_FR, CHMAP_INFO_SIZE, CHMAP_MAX_SIZE, CONFIG_SIZE, ControlRequest, Direction, FORMAT_S16,
    JACK_INFO_SIZE, MAX_CONTROL_BYTES, PCM_INFO_SIZE, Query, RATE_48000, SetParams, SndError, status,
};
use super::request::{MAX_XFER_BYTES, Message, Regions, RxRequest, TxRequest};
use super::sink::{FRAME_BYTES, SAMPLE_RATE, SoundHandle};
use crate::gpu::monotonic_us;
use crate::{DeviceError, DeviceType, GuestMemory, VIRTIO_F_VERSION_1, VirtioDevice, read_config_bytes};

pub const CONTROLQ: usize = 0;
pub const EVENTQ: usize = 1;
pub const TXQ: usize = 2;
pub const RXQ: usize = 3;
const QUEUE_SIZES: &[u16] = DeviceType::Sound.queue_max_sizes();
/// The period clock's tick.
const TICK_US: u64 = 5_000;
/// How late a running stream's next buffer may be before it counts as an underrun.
const UNDERRUN_SLACK_US: u64 = 20_000;
/// Bad requests logged individually before the device goes quiet about them.
const LOGGED_BAD_REQUESTS: u64 = 16;
/// The largest ring buffer a stream may ask for (a second of audio is 192 000 bytes).
const MAX_BUFFER_BYTES: u32 = 1 << 20;

/// Stream ids.
pub const PLAYBACK_STREAM: u32 = 0;
pub const CAPTURE_STREAM: u32 = 1;
const BYTES_PER_SECOND: u64 = SAMPLE_RATE as u64 * FRAME_BYTES as u64;

/// A stream's state (virtio 1.2, 5.14.6.6.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// No parameters yet.
    Idle,
    /// Parameters set (also after RELEASE).
    Configured,
    Prepared,
    Running,
    Stopped,
}

/// A message waiting for the period clock.
#[derive(Debug)]
enum Pending {
    Tx { head: u16, pcm: Vec<u8>, status: Regions, queued_us: u64 },
    Rx { head: u16, pcm: Regions, status: Regions },
}

impl Pending {
    fn bytes(&self) -> u64 {
        match self {
            Self::Tx { pcm, .. } => pcm.len() as u64,
            Self::Rx { pcm, .. } => u64::from(pcm.len()),
        }
    }
}

#[derive(Debug)]
struct Stream {
    direction: Direction,
    state: State,
    period_bytes: u32,
    pending: VecDeque<Pending>,
    /// The clock's origin and the bytes played (or recorded) since.
    origin_us: u64,
    clocked_bytes: u64,
}

impl Stream {
    fn new(direction: Direction) -> Self {
        Self {
            direction,
            state: State::Idle,
            period_bytes: 0,
            pending: VecDeque::new(),
            origin_us: 0,
            clocked_bytes: 0,
        }
    }

    fn queue(&self) -> usize {
        match self.direction {
            Direction::Output => TXQ,
            Direction::Input => RXQ,
        }
    }

    /// When the byte at `offset` from the clock's origin plays.
    fn time_of(&self, offset: u64) -> u64 {
        self.origin_us + offset * 1_000_000 / BYTES_PER_SECOND
    }
}

/// A virtio sound device: one playback and one capture stream at 48 kHz S16LE stereo.
#[derive(Debug)]
pub struct Sound {
    acked_features: u64,
    streams: [Stream; 2],
    handle: SoundHandle,
    timer: TimerFd,
    timer_armed: bool,
    /// Streams whose pending I/O a RELEASE ended, completed on the next tick.
    release_pending: Vec<usize>,
}

impl Sound {
    pub fn new() -> std::io::Result<Self> {
        Self::with_handle(SoundHandle::new())
    }

    /// A device whose audio goes to and comes from `handle`.
    pub fn with_handle(handle: SoundHandle) -> std::io::Result<Self> {
        let timer =
            TimerFd::new(ClockId::CLOCK_MONOTONIC, TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC)?;
        Ok(Self {
            acked_features: 0,
            streams: [Stream::new(Direction::Output), Stream::new(Direction::Input)],
            handle,
            timer,
            timer_armed: false,
            release_pending: Vec::new(),
        })
    }

    /// The host side: played audio out, microphone in.
    pub fn handle(&self) -> SoundHandle {
        self.handle.clone()
    }

    fn refuse(&self, what: &str, e: &dyn std::fmt::Display) {
        if self.handle.metrics().refused() < LOGGED_BAD_REQUESTS {
            tracing::warn!("virtio-snd: bad {what}: {e}");
        }
    }

    fn stream_mut(&mut self, id: u32) -> Result<&mut Stream, SndError> {
        self.streams.get_mut(id as usize).ok_or_else(|| SndError::BadMessage(format!("no stream {id}")))
    }

    /// Executes a control request; returns the response (header and any infos).
    fn control(&mut self, request: &ControlRequest) -> Result<Vec<u8>, SndError> {
        let mut out = status::OK.to_le_bytes().to_vec();
        match *request {
            ControlRequest::JackInfo(q) => infos(&mut out, q, 2, JACK_INFO_SIZE, jack_info)?,
            ControlRequest::PcmInfo(q) => infos(&mut out, q, 2, PCM_INFO_SIZE, pcm_info)?,
            ControlRequest::ChmapInfo(q) => infos(&mut out, q, 2, CHMAP_INFO_SIZE, chmap_info)?,
            ControlRequest::JackRemap => {
                return Err(SndError::NotSupported("jacks cannot be remapped".into()));
            }
            ControlRequest::SetParams(p) => self.set_params(&p)?,
            ControlRequest::Prepare(id) => {
                let s = self.stream_mut(id)?;
                match s.state {
                    State::Configured | State::Prepared | State::Stopped => s.state = State::Prepared,
                    State::Idle => {
                        return Err(SndError::BadMessage(format!("stream {id}: PREPARE before SET_PARAMS")));
                    }
                    State::Running => {
                        return Err(SndError::BadMessage(format!("stream {id}: PREPARE while running")));
                    }
                }
            }
            ControlRequest::Start(id) => {
                let s = self.stream_mut(id)?;
                match s.state {
                    State::Prepared | State::Stopped => {
                        s.state = State::Running;
                        s.origin_us = monotonic_us();
                        s.clocked_bytes = 0;
                    }
                    State::Running => {
                        return Err(SndError::BadMessage(format!("stream {id} is already started")));
                    }
                    _ => return Err(SndError::BadMessage(format!("stream {id}: START before PREPARE"))),
                }
                self.arm_timer();
            }
            ControlRequest::Stop(id) => {
                let s = self.stream_mut(id)?;
                if s.state != State::Running {
                    return Err(SndError::BadMessage(format!("stream {id}: STOP while not running")));
                }
                s.state = State::Stopped;
                self.arm_timer();
            }
            ControlRequest::Release(id) => {
                let s = self.stream_mut(id)?;
                match s.state {
                    State::Prepared | State::Stopped | State::Configured => s.state = State::Configured,
                    State::Idle => {
                        return Err(SndError::BadMessage(format!("stream {id}: RELEASE before SET_PARAMS")));
                    }
                    State::Running => {
                        return Err(SndError::BadMessage(format!("stream {id}: RELEASE while running")));
                    }
                }
                // RELEASE ends the stream's pending I/O. That happens on the next tick, which
                // has the stream's queue (this is the control queue).
                if !s.pending.is_empty() {
                    self.release_pending.push(id as usize);
                }
                self.arm_timer();
            }
        }
        Ok(out)
    }

    fn set_params(&mut self, p: &SetParams) -> Result<(), SndError> {
        let s = self.stream_mut(p.stream_id)?;
        if s.state == State::Running {
            return Err(SndError::BadMessage(format!("stream {}: SET_PARAMS while running", p.stream_id)));
        }
        if p.features != 0 {
            return Err(SndError::NotSupported(format!("stream features {:#x}", p.features)));
        }
        if p.channels != 2 || p.format != FORMAT_S16 || p.rate != RATE_48000 {
            return Err(SndError::NotSupported(format!(
                "{} channels, format {}, rate {}: only stereo S16 at 48 kHz",
                p.channels, p.format, p.rate
            )));
        }
        let frame = FRAME_BYTES as u32;
        if p.period_bytes == 0
            || !p.period_bytes.is_multiple_of(frame)
            || p.buffer_bytes < p.period_bytes
            || !p.buffer_bytes.is_multiple_of(p.period_bytes)
            || p.buffer_bytes > MAX_BUFFER_BYTES
        {
            return Err(SndError::BadMessage(format!(
                "buffer of {} bytes in periods of {} bytes",
                p.buffer_bytes, p.period_bytes
            )));
        }
        s.period_bytes = p.period_bytes;
        s.state = State::Configured;
        Ok(())
    }

    fn arm_timer(&mut self) {
        let running =
            self.streams.iter().any(|s| s.state == State::Running) || !self.release_pending.is_empty();
        if running == self.timer_armed {
            return;
        }
        let result = if running {
            let tick = TimeSpec::from_duration(std::time::Duration::from_micros(TICK_US));
            self.timer.set(Expiration::Interval(tick), TimerSetTimeFlags::empty())
        } else {
            self.timer.unset()
        };
        match result {
            Ok(()) => self.timer_armed = running,
            Err(e) => tracing::error!("virtio-snd: the period clock: {e}"),
        }
    }

    /// Completes every pending message of `stream` (RELEASE, reset) with `status`.
    fn flush(&mut self, stream: usize, queue: &mut Queue, mem: &GuestMemory) -> Result<bool, DeviceError> {
        let pending: Vec<_> = self.streams[stream].pending.drain(..).collect();
        let index = self.streams[stream].queue();
        let mut used = false;
        for p in pending {
            let (head, len) = match p {
                Pending::Tx { head, status, .. } => (head, status.write(mem, &pcm_status(status::OK))),
                Pending::Rx { head, status, .. } => (head, status.write(mem, &pcm_status(status::OK))),
            };
            complete(index, queue, mem, head, len)?;
            used = true;
        }
        Ok(used)
    }

    /// Completes what the period clock says has been played or recorded by `now_us`. Returns
    /// the queues that got used buffers.
    pub fn advance(
        &mut self,
        now_us: u64,
        queues: &mut [Queue],
        mem: &GuestMemory,
    ) -> Result<Vec<usize>, DeviceError> {
        let mut used = Vec::new();
        for id in 0..self.streams.len() {
            let index = self.streams[id].queue();
            let Some(queue) = queues.get_mut(index).filter(|q| q.ready()) else { continue };
            let s = &mut self.streams[id];
            if s.state != State::Running {
                continue;
            }
            let mut any = false;
            while let Some(front) = s.pending.front() {
                let start = s.clocked_bytes;
                let end = start + front.bytes();
                if s.time_of(end) > now_us {
                    break;
                }
                let play_us = s.time_of(start);
                let Some(p) = s.pending.pop_front() else { break };
                s.clocked_bytes = end;
                let (head, len) = match p {
                    Pending::Tx { head, pcm, status, queued_us } => {
                        self.handle.push_playback(play_us, queued_us, &pcm);
                        let m = self.handle.metrics();
                        m.periods_played.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        m.bytes_played.fetch_add(pcm.len() as u64, std::sync::atomic::Ordering::Relaxed);
                        m.queued_to_play_us.fetch_add(
                            play_us.saturating_sub(queued_us),
                            std::sync::atomic::Ordering::Relaxed,
                        );
                        (head, status.write(mem, &pcm_status(status::OK)))
                    }
                    Pending::Rx { head, pcm, status } => {
                        let mut bytes = vec![0u8; pcm.len() as usize];
                        self.handle.pull_capture(&mut bytes);
                        let written = pcm.write(mem, &bytes);
                        let m = self.handle.metrics();
                        m.periods_captured.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        m.bytes_captured.fetch_add(u64::from(written), std::sync::atomic::Ordering::Relaxed);
                        (head, written + status.write(mem, &pcm_status(status::OK)))
                    }
                };
                complete(index, queue, mem, head, len)?;
                any = true;
            }
            if any {
                used.push(index);
            }
        }
        Ok(used)
    }

    /// Runs the control request in `bytes` (a message's readable part); returns the response.
    pub fn control_request(&mut self, bytes: &[u8]) -> Vec<u8> {
        self.handle.metrics().control_requests.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        ControlRequest::parse(bytes).and_then(|request| self.control(&request)).unwrap_or_else(|e| {
            self.refuse("control request", &e);
            e.status().to_le_bytes().to_vec()
        })
    }

    fn process_control(&mut self, queue: &mut Queue, mem: &GuestMemory) -> Result<bool, DeviceError> {
        let mut done = Vec::new();
        {
            let chains = queue.iter(mem).map_err(|e| broken(CONTROLQ, e))?;
            for chain in chains {
                let head = chain.head_index();
                let message = match Message::parse(chain, mem, MAX_CONTROL_BYTES as u32) {
                    Ok(m) => m,
                    Err(e) => {
                        self.refuse("control chain", &e);
                        done.push((head, 0));
                        continue;
                    }
                };
                let response = self.control_request(&message.readable);
                done.push((head, message.writable.write(mem, &response)));
            }
        }
        for (head, len) in done.iter().copied() {
            complete(CONTROLQ, queue, mem, head, len)?;
        }
        Ok(!done.is_empty())
    }

    fn process_xfer(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &GuestMemory,
    ) -> Result<bool, DeviceError> {
        let mut done = Vec::new();
        let now = monotonic_us();
        {
            let chains = queue.iter(mem).map_err(|e| broken(index, e))?;
            for chain in chains {
                let head = chain.head_index();
                let max = if index == TXQ { MAX_XFER_BYTES + 4 } else { 4 };
                let parsed = Message::parse(chain, mem, max).map_err(|e| e.to_string()).and_then(|m| {
                    if index == TXQ {
                        TxRequest::parse(m).map(|t| {
                            (
                                t.stream_id,
                                t.status.clone(),
                                Pending::Tx { head, pcm: t.pcm, status: t.status, queued_us: now },
                            )
                        })
                    } else {
                        RxRequest::parse(m).map(|r| {
                            (
                                r.stream_id,
                                r.status.clone(),
                                Pending::Rx { head, pcm: r.pcm, status: r.status },
                            )
                        })
                    }
                    .map_err(|e| e.to_string())
                });
                let (stream_id, status_regions, pending) = match parsed {
                    Ok(p) => p,
                    Err(e) => {
                        self.refuse("I/O message", &e);
                        done.push((head, 0));
                        continue;
                    }
                };
                let wanted = if index == TXQ { Direction::Output } else { Direction::Input };
                let stream = self.streams.get_mut(stream_id as usize);
                match stream {
                    Some(s)
                        if s.direction == wanted
                            && matches!(s.state, State::Prepared | State::Running | State::Stopped)
                            && pending.bytes().is_multiple_of(FRAME_BYTES as u64) =>
                    {
                        // A running stream that ran dry restarts its clock instead of catching
                        // up in a burst.
                        if s.state == State::Running
                            && s.pending.is_empty()
                            && s.time_of(s.clocked_bytes) + UNDERRUN_SLACK_US < now
                        {
                            self.handle
                                .metrics()
                                .underruns
                                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            s.origin_us = now;
                            s.clocked_bytes = 0;
                        }
                        s.pending.push_back(pending);
                    }
                    _ => {
                        self.refuse("I/O message", &format!("stream {stream_id} cannot take it now"));
                        done.push((head, status_regions.write(mem, &pcm_status(status::BAD_MSG))));
                    }
                }
            }
        }
        for (head, len) in done.iter().copied() {
            complete(index, queue, mem, head, len)?;
        }
        Ok(!done.is_empty())
    }
}

fn broken(queue: usize, e: impl std::fmt::Display) -> DeviceError {
    DeviceError::QueueBroken { queue, reason: e.to_string() }
}

fn complete(
    index: usize,
    queue: &mut Queue,
    mem: &GuestMemory,
    head: u16,
    len: u32,
) -> Result<(), DeviceError> {
    queue.add_used(mem, head, len).map_err(|e| DeviceError::UsedRing { queue: index, reason: e.to_string() })
}

fn pcm_status(code: u32) -> [u8; 8] {
    let mut out = [0u8; 8];
    out[..4].copy_from_slice(&code.to_le_bytes());
    out
}

/// Appends `q.count` infos of `size` bytes each (the driver's size; ours zero-padded).
fn infos(
    out: &mut Vec<u8>,
    q: Query,
    items: u32,
    ours: usize,
    info: fn(u32) -> Vec<u8>,
) -> Result<(), SndError> {
    let end = q.start_id.checked_add(q.count).filter(|e| *e <= items);
    if end.is_none() || (q.size as usize) < ours || q.size > 1024 {
        return Err(SndError::BadMessage(format!(
            "items {}+{} of {items}, {} bytes each",
            q.start_id, q.count, q.size
        )));
    }
    for id in q.start_id..q.start_id + q.count {
        let mut one = info(id);
        one.resize(q.size as usize, 0);
        out.extend_from_slice(&one);
    }
    Ok(())
}

/// Jack 0: line out (green, rear); jack 1: microphone (pink, rear). Both on HDA function 0,
/// both connected. The HDA pin default configurations give the guest its jack names.
fn jack_info(id: u32) -> Vec<u8> {
    let (defconf, caps): (u32, u32) =
        if id == 0 { (0x0101_4010, 0x0000_0014) } else { (0x01a1_9020, 0x0000_0024) };
    let mut out = Vec::with_capacity(JACK_INFO_SIZE);
    out.extend_from_slice(&0u32.to_le_bytes()); // hda_fn_nid
    out.extend_from_slice(&0u32.to_le_bytes()); // features
    out.extend_from_slice(&defconf.to_le_bytes());
    out.extend_from_slice(&caps.to_le_bytes());
    out.push(1); // connected
    out.resize(JACK_INFO_SIZE, 0);
    out
}

fn pcm_info(id: u32) -> Vec<u8> {
    let direction = if id == PLAYBACK_STREAM { Direction::Output } else { Direction::Input };
    let mut out = Vec::with_capacity(PCM_INFO_SIZE);
    out.extend_from_slice(&0u32.to_le_bytes()); // hda_fn_nid
    out.extend_from_slice(&0u32.to_le_bytes()); // features
    out.extend_from_slice(&(1u64 << FORMAT_S16).to_le_bytes());
    out.extend_from_slice(&(1u64 << RATE_48000).to_le_bytes());
    out.extend_from_slice(&[direction as u8, 2, 2]);
    out.resize(PCM_INFO_SIZE, 0);
    out
}

fn chmap_info(id: u32) -> Vec<u8> {
    let direction = if id == 0 { Direction::Output } else { Direction::Input };
    let mut out = Vec::with_capacity(CHMAP_INFO_SIZE);
    out.extend_from_slice(&0u32.to_le_bytes()); // hda_fn_nid
    out.extend_from_slice(&[direction as u8, 2]);
    let mut positions = [0u8; CHMAP_MAX_SIZE];
    positions[..2].copy_from_slice(&[CHMAP_FL, CHMAP_FR]);
    out.extend_from_slice(&positions);
    out
}

impl VirtioDevice for Sound {
    fn device_type(&self) -> DeviceType {
        DeviceType::Sound
    }

    fn queue_max_sizes(&self) -> &[u16] {
        QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features & self.features();
    }

    fn config_size(&self) -> usize {
        CONFIG_SIZE
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // jacks, streams, chmaps, controls (0: VIRTIO_SND_F_CTLS is not offered).
        let mut config = [0u8; CONFIG_SIZE];
        config[0..4].copy_from_slice(&2u32.to_le_bytes());
        config[4..8].copy_from_slice(&2u32.to_le_bytes());
        config[8..12].copy_from_slice(&2u32.to_le_bytes());
        read_config_bytes(&config, offset, data);
    }

    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &GuestMemory,
    ) -> Result<bool, DeviceError> {
        // A driver may leave queues disabled (e.g. no capture): a kick for one is no error.
        if !queue.ready() {
            return Ok(false);
        }
        match index {
            CONTROLQ => self.process_control(queue, mem),
            TXQ | RXQ => self.process_xfer(index, queue, mem),
            // Event buffers stay with the device: it has no jack or period events to report.
            _ => Ok(false),
        }
    }

    fn host_events(&self) -> Vec<RawFd> {
        vec![self.timer.as_fd().as_raw_fd()]
    }

    fn handle_host_event(
        &mut self,
        _event: usize,
        queues: &mut [Queue],
        mem: &GuestMemory,
    ) -> Result<Vec<usize>, DeviceError> {
        let mut expirations = [0u8; 8];
        let _ = nix::unistd::read(self.timer.as_fd(), &mut expirations);
        let mut used = Vec::new();
        for stream in std::mem::take(&mut self.release_pending) {
            let index = self.streams[stream].queue();
            if let Some(queue) = queues.get_mut(index).filter(|q| q.ready())
                && self.flush(stream, queue, mem)?
            {
                used.push(index);
            }
        }
        for index in self.advance(monotonic_us(), queues, mem)? {
            if !used.contains(&index) {
                used.push(index);
            }
        }
        self.arm_timer();
        Ok(used)
    }

    fn reset(&mut self) {
        self.acked_features = 0;
        self.streams = [Stream::new(Direction::Output), Stream::new(Direction::Input)];
        self.release_pending.clear();
        self.arm_timer();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snd::protocol::{code, encode};
    use crate::test_utils::*;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    const REQUEST: u64 = 0x4_0000;
    const RESPONSE: u64 = 0x5_0000;
    const PERIOD: u32 = 960 * FRAME_BYTES as u32; // 20 ms

    /// A queue whose rings live at `base` (so several queues can coexist).
    fn queue_at(mem: &GuestMemory, base: u64, descs: &[RawDescriptor]) -> (Queue, QueueRings) {
        let mock = MockSplitQueue::create(mem, GuestAddress(base), 16);
        mock.add_desc_chains(descs, 0).unwrap();
        let q: Queue = mock.create_queue().unwrap();
        let rings = QueueRings::of(&q);
        (q, rings)
    }

    /// Sends one control request; returns the response bytes.
    fn control(snd: &mut Sound, mem: &GuestMemory, request: &[u8]) -> Vec<u8> {
        mem.write_slice(request, GuestAddress(REQUEST)).unwrap();
        let (mut q, rings) = queue_at(
            mem,
            0,
            &[
                desc(REQUEST, request.len() as u32, VRING_DESC_F_NEXT, 1),
                desc(RESPONSE, 256, VRING_DESC_F_WRITE, 0),
            ],
        );
        assert!(snd.process_queue(CONTROLQ, &mut q, mem).unwrap());
        let used = used_entries(mem, &rings);
        let mut out = vec![0u8; used[0].1 as usize];
        mem.read_slice(&mut out, GuestAddress(RESPONSE)).unwrap();
        out
    }

    fn code_of(response: &[u8]) -> u32 {
        u32::from_le_bytes(response[..4].try_into().unwrap())
    }

    fn ok(snd: &mut Sound, mem: &GuestMemory, request: &[u8]) {
        assert_eq!(code_of(&control(snd, mem, request)), status::OK, "{request:?}");
    }

    fn start(snd: &mut Sound, mem: &GuestMemory, stream: u32) {
        ok(snd, mem, &encode::set_params(stream, 4 * PERIOD, PERIOD, 2, FORMAT_S16, RATE_48000));
        ok(snd, mem, &encode::stream(code::PCM_PREPARE, stream));
        ok(snd, mem, &encode::stream(code::PCM_START, stream));
    }

    /// `n` tx messages of one period each (sample value = message index), rings at 0x1_0000.
    fn tx_queue(mem: &GuestMemory, n: u16) -> (Queue, QueueRings) {
        let mut descs = Vec::new();
        for i in 0..n {
            let base = 0x6_0000 + u64::from(i) * 0x2000;
            mem.write_slice(&PLAYBACK_STREAM.to_le_bytes(), GuestAddress(base)).unwrap();
            mem.write_slice(&vec![i as u8 + 1; PERIOD as usize], GuestAddress(base + 0x10)).unwrap();
            let d = i * 3;
            descs.push(desc(base, 4, VRING_DESC_F_NEXT, d + 1));
            descs.push(desc(base + 0x10, PERIOD, VRING_DESC_F_NEXT, d + 2));
            descs.push(desc(base + 0x1f00, 8, VRING_DESC_F_WRITE, 0));
        }
        queue_at(mem, 0x1_0000, &descs)
    }

    #[test]
    fn the_driver_finds_two_streams_two_jacks_and_two_channel_maps() {
        let mem = memory();
        let mut snd = Sound::new().unwrap();
        let mut config = [0u8; 16];
        snd.read_config(0, &mut config);
        assert_eq!(config[..12], [2, 0, 0, 0, 2, 0, 0, 0, 2, 0, 0, 0]);

        let pcm = control(&mut snd, &mem, &encode::query(code::PCM_INFO, 0, 2, 32));
        assert_eq!((code_of(&pcm), pcm.len()), (status::OK, 4 + 64));
        let playback = &pcm[4..36];
        assert_eq!(u64::from_le_bytes(playback[8..16].try_into().unwrap()), 1 << FORMAT_S16);
        assert_eq!(u64::from_le_bytes(playback[16..24].try_into().unwrap()), 1 << RATE_48000);
        assert_eq!(playback[24..27], [Direction::Output as u8, 2, 2]);
        assert_eq!(pcm[36 + 24], Direction::Input as u8);

        let jacks = control(&mut snd, &mem, &encode::query(code::JACK_INFO, 0, 2, 24));
        assert_eq!((code_of(&jacks), jacks.len()), (status::OK, 4 + 48));
        assert_eq!(jacks[4 + 16], 1, "connected");
        let chmaps = control(&mut snd, &mem, &encode::query(code::CHMAP_INFO, 1, 1, 24));
        assert_eq!(chmaps[4 + 4..4 + 8], [Direction::Input as u8, 2, CHMAP_FL, CHMAP_FR]);
        // A larger size from a newer driver is zero-padded; out-of-range items are refused.
        assert_eq!(control(&mut snd, &mem, &encode::query(code::PCM_INFO, 1, 1, 40)).len(), 44);
        assert_eq!(
            code_of(&control(&mut snd, &mem, &encode::query(code::PCM_INFO, 1, 2, 32))),
            status::BAD_MSG
        );
        assert_eq!(
            code_of(&control(&mut snd, &mem, &encode::query(code::JACK_INFO, 0, 1, 8))),
            status::BAD_MSG
        );
    }

    #[test]
    fn playback_completes_at_the_streams_rate_not_on_arrival() {
        let mem = memory();
        let mut snd = Sound::new().unwrap();
        let sink = snd.handle();
        start(&mut snd, &mem, PLAYBACK_STREAM);
        let (mut tx, rings) = tx_queue(&mem, 3);
        assert!(!snd.process_queue(TXQ, &mut tx, &mem).unwrap(), "nothing completed on arrival");
        assert!(used_entries(&mem, &rings).is_empty());

        let mut queues = vec![Queue::default(), Queue::default(), tx, Queue::default()];
        // Before the stream's origin nothing has played.
        assert!(snd.advance(0, &mut queues, &mem).unwrap().is_empty());
        // One period after the origin (taken just now) at most one message is due; far in the
        // future all are, in order, each with its status.
        let used = snd.advance(monotonic_us() + 10_000_000, &mut queues, &mem).unwrap();
        assert_eq!(used, vec![TXQ]);
        let entries = used_entries(&mem, &rings);
        assert_eq!(entries.iter().map(|e| e.0).collect::<Vec<_>>(), vec![0, 3, 6]);
        let mut status_bytes = [0u8; 4];
        mem.read_slice(&mut status_bytes, GuestAddress(0x6_0000 + 0x1f00)).unwrap();
        assert_eq!(u32::from_le_bytes(status_bytes), status::OK);
        let played = sink.take_playback(std::time::Duration::ZERO);
        assert_eq!(played.len(), 3);
        assert_eq!(played[1].samples[0], i16::from_le_bytes([2, 2]));
        assert_eq!(played[1].play_us - played[0].play_us, 20_000, "one period apart on the play clock");
    }

    #[test]
    fn capture_delivers_the_microphone_then_silence() {
        let mem = memory();
        let mut snd = Sound::new().unwrap();
        snd.handle().push_capture(&[100, -100, 200, -200]);
        start(&mut snd, &mem, CAPTURE_STREAM);
        let base = 0x6_0000;
        mem.write_slice(&CAPTURE_STREAM.to_le_bytes(), GuestAddress(base)).unwrap();
        let (mut rx, rings) = queue_at(
            &mem,
            0x1_0000,
            &[
                desc(base, 4, VRING_DESC_F_NEXT, 1),
                desc(base + 0x100, 16, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 2),
                desc(base + 0x200, 8, VRING_DESC_F_WRITE, 0),
            ],
        );
        assert!(!snd.process_queue(RXQ, &mut rx, &mem).unwrap());
        let mut queues = vec![Queue::default(), Queue::default(), Queue::default(), rx];
        assert_eq!(snd.advance(monotonic_us() + 1_000_000, &mut queues, &mem).unwrap(), vec![RXQ]);
        assert_eq!(used_entries(&mem, &rings), vec![(0, 16 + 8)]);
        let mut pcm = [0u8; 16];
        mem.read_slice(&mut pcm, GuestAddress(base + 0x100)).unwrap();
        let samples: Vec<i16> = pcm.chunks(2).map(|b| i16::from_le_bytes([b[0], b[1]])).collect();
        assert_eq!(samples, [100, -100, 200, -200, 0, 0, 0, 0]);
    }

    #[test]
    fn bad_requests_get_error_statuses_and_the_device_goes_on() {
        let mem = memory();
        let mut snd = Sound::new().unwrap();
        let not_supp =
            |s: &mut Sound, r: &[u8]| assert_eq!(code_of(&control(s, &mem, r)), status::NOT_SUPP, "{r:?}");
        let bad =
            |s: &mut Sound, r: &[u8]| assert_eq!(code_of(&control(s, &mem, r)), status::BAD_MSG, "{r:?}");
        // Unsupported parameters.
        not_supp(&mut snd, &encode::set_params(0, 4 * PERIOD, PERIOD, 6, FORMAT_S16, RATE_48000));
        not_supp(&mut snd, &encode::set_params(0, 4 * PERIOD, PERIOD, 2, 3, RATE_48000));
        not_supp(&mut snd, &encode::set_params(0, 4 * PERIOD, PERIOD, 2, FORMAT_S16, 6));
        bad(&mut snd, &encode::set_params(0, 4 * PERIOD, 0, 2, FORMAT_S16, RATE_48000));
        bad(&mut snd, &encode::set_params(0, PERIOD * 3 + 4, PERIOD, 2, FORMAT_S16, RATE_48000));
        bad(&mut snd, &encode::set_params(0, u32::MAX - 3, 4, 2, FORMAT_S16, RATE_48000));
        bad(&mut snd, &encode::set_params(7, 4 * PERIOD, PERIOD, 2, FORMAT_S16, RATE_48000));
        // Out of order, unknown, short.
        bad(&mut snd, &encode::stream(code::PCM_START, 0));
        bad(&mut snd, &encode::stream(code::PCM_PREPARE, 0));
        not_supp(&mut snd, &encode::header(0x0300));
        not_supp(&mut snd, &encode::header(code::JACK_REMAP));
        bad(&mut snd, &[1, 0]);
        // A stream started twice.
        start(&mut snd, &mem, PLAYBACK_STREAM);
        bad(&mut snd, &encode::stream(code::PCM_START, 0));
        bad(&mut snd, &encode::stream(code::PCM_RELEASE, 0));
        // A tx message for the capture stream, one outside guest memory, one without a status.
        let base = 0x6_0000;
        mem.write_slice(&CAPTURE_STREAM.to_le_bytes(), GuestAddress(base)).unwrap();
        mem.write_slice(&PLAYBACK_STREAM.to_le_bytes(), GuestAddress(base + 0x1000)).unwrap();
        let (mut tx, rings) = queue_at(
            &mem,
            0x1_0000,
            &[
                desc(base, 4, VRING_DESC_F_NEXT, 1),
                desc(base + 0x10, 8, VRING_DESC_F_NEXT, 2),
                desc(base + 0x100, 8, VRING_DESC_F_WRITE, 0),
                desc(base + 0x1000, 4, VRING_DESC_F_NEXT, 4),
                desc(0xffff_ffff_0000, 64, VRING_DESC_F_NEXT, 5),
                desc(base + 0x1100, 8, VRING_DESC_F_WRITE, 0),
                desc(base + 0x1000, 4, VRING_DESC_F_NEXT, 7),
                desc(base + 0x10, 8, 0, 0),
            ],
        );
        assert!(snd.process_queue(TXQ, &mut tx, &mem).unwrap());
        let used = used_entries(&mem, &rings);
        assert_eq!(used, vec![(0, 8), (3, 0), (6, 0)], "an error status, then two drops");
        let mut s = [0u8; 4];
        mem.read_slice(&mut s, GuestAddress(base + 0x100)).unwrap();
        assert_eq!(u32::from_le_bytes(s), status::BAD_MSG);
        assert!(snd.handle().metrics().bad_requests.load(std::sync::atomic::Ordering::Relaxed) >= 15);
        // Still working: stop, release, and a new setup.
        ok(&mut snd, &mem, &encode::stream(code::PCM_STOP, 0));
        ok(&mut snd, &mem, &encode::stream(code::PCM_RELEASE, 0));
        start(&mut snd, &mem, PLAYBACK_STREAM);
    }

    #[test]
    fn a_disabled_queue_is_left_alone() {
        let mem = memory();
        let mut snd = Sound::new().unwrap();
        for index in [CONTROLQ, EVENTQ, TXQ, RXQ] {
            assert!(!snd.process_queue(index, &mut Queue::new(16).unwrap(), &mem).unwrap());
        }
        ok(&mut snd, &mem, &encode::query(code::PCM_INFO, 0, 2, 32));
    }

    #[test]
    fn release_completes_pending_io() {
        let mem = memory();
        let mut snd = Sound::new().unwrap();
        start(&mut snd, &mem, PLAYBACK_STREAM);
        let (mut tx, rings) = tx_queue(&mem, 2);
        snd.process_queue(TXQ, &mut tx, &mem).unwrap();
        ok(&mut snd, &mem, &encode::stream(code::PCM_STOP, 0));
        ok(&mut snd, &mem, &encode::stream(code::PCM_RELEASE, 0));
        let mut queues = vec![Queue::default(), Queue::default(), tx, Queue::default()];
        assert_eq!(snd.handle_host_event(0, &mut queues, &mem).unwrap(), vec![TXQ]);
        assert_eq!(used_entries(&mem, &rings).len(), 2);
        assert!(snd.handle().take_playback(std::time::Duration::ZERO).is_empty(), "released, not played");
    }

    proptest::proptest! {
        /// Whatever the descriptors say, the device neither panics nor hangs, on any queue.
        #[test]
        fn arbitrary_descriptors_are_contained(
            queue in 0usize..4,
            started in proptest::prelude::any::<bool>(),
            descs in proptest::collection::vec((proptest::prelude::any::<u64>(), proptest::prelude::any::<u32>(), 0u32..8, 0u16..20), 1..16)
        ) {
            let mem = memory();
            let mut snd = Sound::new().unwrap();
            if started {
                start(&mut snd, &mem, PLAYBACK_STREAM);
                start(&mut snd, &mem, CAPTURE_STREAM);
            }
            let raw: Vec<_> = descs.iter().map(|(a, l, f, n)| desc(*a % 0x10_0000, *l % 0x2_0000, *f, *n)).collect();
            let (mut q, _) = queue_at(&mem, 0x1_0000, &raw);
            let _ = snd.process_queue(queue, &mut q, &mem);
            let mut queues = vec![Queue::default(), Queue::default(), Queue::default(), Queue::default()];
            queues[queue] = q;
            let _ = snd.advance(u64::MAX / 2, &mut queues, &mem);
        }
    }
}
