//! Where the sound device meets the session: played PCM out, captured PCM in.
//!
//! The device pushes each playback period here when its period clock says it has been played
//! ([`SoundHandle::push_playback`]), and pulls capture periods from here
//! ([`SoundHandle::pull_capture`]). It never waits: playback beyond
//! [`MAX_PLAYBACK_FRAMES`] drops the oldest frames (no consumer, or a slow one), and a capture
//! period with no microphone data is silence. The session server takes the playback
//! ([`SoundHandle::take_playback`]) and feeds the microphone ([`SoundHandle::push_capture`]).
//! Locks are held only for the copies.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

/// The one PCM format the device offers: 48 kHz, two channels, signed 16-bit little-endian.
pub const SAMPLE_RATE: u32 = 48_000;
pub const CHANNELS: usize = 2;
/// Bytes per frame (one sample per channel).
pub const FRAME_BYTES: usize = CHANNELS * 2;
/// Played frames kept for a consumer (1 s); older ones are dropped.
pub const MAX_PLAYBACK_FRAMES: usize = SAMPLE_RATE as usize;
/// Microphone frames kept for the guest (0.5 s); older ones are dropped.
pub const MAX_CAPTURE_FRAMES: usize = SAMPLE_RATE as usize / 2;

/// One period the guest played.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PcmChunk {
    /// When its first frame played, on [`monotonic_us`](crate::gpu::monotonic_us)
    /// (the display frames' clock).
    pub play_us: u64,
    /// When the guest handed it to the device (same clock).
    pub queued_us: u64,
    /// Interleaved stereo samples.
    pub samples: Vec<i16>,
}

/// What the sound device did, for `ctl status` and the benchmark.
#[derive(Debug, Default)]
pub struct SndMetrics {
    pub control_requests: AtomicU64,
    pub bad_requests: AtomicU64,
    pub periods_played: AtomicU64,
    pub bytes_played: AtomicU64,
    pub periods_captured: AtomicU64,
    pub bytes_captured: AtomicU64,
    /// Capture frames that had no microphone data (silence).
    pub capture_silence_frames: AtomicU64,
    /// Playback frames dropped because nobody took them.
    pub playback_dropped_frames: AtomicU64,
    /// Times the guest let a running stream run dry.
    pub underruns: AtomicU64,
    /// Sum over played periods of guest hand-over → play time (µs), for the mean.
    pub queued_to_play_us: AtomicU64,
}

impl SndMetrics {
    pub(super) fn refused(&self) -> u64 {
        self.bad_requests.fetch_add(1, Ordering::Relaxed)
    }

    /// A snapshot as JSON.
    pub fn to_json(&self) -> serde_json::Value {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        serde_json::json!({
            "control_requests": get(&self.control_requests),
            "bad_requests": get(&self.bad_requests),
            "periods_played": get(&self.periods_played),
            "bytes_played": get(&self.bytes_played),
            "periods_captured": get(&self.periods_captured),
            "bytes_captured": get(&self.bytes_captured),
            "capture_silence_frames": get(&self.capture_silence_frames),
            "playback_dropped_frames": get(&self.playback_dropped_frames),
            "underruns": get(&self.underruns),
            "mean_queued_to_play_us": get(&self.queued_to_play_us).checked_div(get(&self.periods_played)).unwrap_or(0),
        })
    }
}

#[derive(Debug, Default)]
struct Playback {
    chunks: VecDeque<PcmChunk>,
    frames: usize,
}

#[derive(Debug)]
struct Shared {
    playback: Mutex<Playback>,
    played: Condvar,
    capture: Mutex<VecDeque<i16>>,
    metrics: SndMetrics,
}

/// The host side of one sound device. Cheap to clone.
#[derive(Debug, Clone)]
pub struct SoundHandle {
    shared: Arc<Shared>,
}

impl Default for SoundHandle {
    fn default() -> Self {
        Self::new()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl SoundHandle {
    pub fn new() -> Self {
        Self {
            shared: Arc::new(Shared {
                playback: Mutex::new(Playback::default()),
                played: Condvar::new(),
                capture: Mutex::new(VecDeque::new()),
                metrics: SndMetrics::default(),
            }),
        }
    }

    pub fn metrics(&self) -> &SndMetrics {
        &self.shared.metrics
    }

    /// What `ctl status` shows.
    pub fn status(&self) -> serde_json::Value {
        let mut status = self.shared.metrics.to_json();
        status["format"] = serde_json::json!("S16LE 48000 Hz stereo");
        status
    }

    // --- The device's side ---

    /// A played period (S16LE stereo bytes). Never blocks; drops the oldest frames when full.
    pub fn push_playback(&self, play_us: u64, queued_us: u64, bytes: &[u8]) {
        let samples: Vec<i16> = bytes.chunks_exact(2).map(|b| i16::from_le_bytes([b[0], b[1]])).collect();
        let frames = samples.len() / CHANNELS;
        let mut playback = lock(&self.shared.playback);
        playback.frames += frames;
        playback.chunks.push_back(PcmChunk { play_us, queued_us, samples });
        while playback.frames > MAX_PLAYBACK_FRAMES {
            let Some(old) = playback.chunks.pop_front() else { break };
            let n = old.samples.len() / CHANNELS;
            playback.frames -= n;
            self.shared.metrics.playback_dropped_frames.fetch_add(n as u64, Ordering::Relaxed);
        }
        drop(playback);
        self.shared.played.notify_all();
    }

    /// Fills `out` (S16LE stereo bytes) with microphone frames, silence where there are none.
    /// Returns the frames that came from the microphone.
    pub fn pull_capture(&self, out: &mut [u8]) -> usize {
        let mut capture = lock(&self.shared.capture);
        let mut real = 0;
        for pair in out.chunks_exact_mut(2) {
            let sample = capture.pop_front();
            real += usize::from(sample.is_some());
            pair.copy_from_slice(&sample.unwrap_or(0).to_le_bytes());
        }
        let silent = (out.len() / 2 - real) / CHANNELS;
        self.shared.metrics.capture_silence_frames.fetch_add(silent as u64, Ordering::Relaxed);
        real / CHANNELS
    }

    // --- The session's side ---

    /// Takes everything played since the last call, waiting up to `timeout` for something.
    pub fn take_playback(&self, timeout: Duration) -> Vec<PcmChunk> {
        let mut playback = lock(&self.shared.playback);
        if playback.chunks.is_empty() {
            playback = self
                .shared
                .played
                .wait_timeout_while(playback, timeout, |p| p.chunks.is_empty())
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        playback.frames = 0;
        playback.chunks.drain(..).collect()
    }

    /// Forgets played audio nobody took (a new client starts with what plays now).
    pub fn clear_playback(&self) {
        let mut playback = lock(&self.shared.playback);
        playback.chunks.clear();
        playback.frames = 0;
    }

    /// Microphone samples (interleaved stereo) for the guest's capture stream. Drops the
    /// oldest beyond [`MAX_CAPTURE_FRAMES`].
    pub fn push_capture(&self, samples: &[i16]) {
        let mut capture = lock(&self.shared.capture);
        capture.extend(samples.iter().copied());
        let max = MAX_CAPTURE_FRAMES * CHANNELS;
        if capture.len() > max {
            let excess = capture.len() - max;
            capture.drain(..excess);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn playback_is_bounded_and_capture_pads_with_silence() {
        let sink = SoundHandle::new();
        let period = vec![1u8; 4800 * FRAME_BYTES];
        for i in 0..15 {
            sink.push_playback(i, i, &period);
        }
        let taken = sink.take_playback(Duration::ZERO);
        let frames: usize = taken.iter().map(|c| c.samples.len() / CHANNELS).sum();
        assert!(frames <= MAX_PLAYBACK_FRAMES, "{frames}");
        assert_eq!(taken.last().unwrap().play_us, 14, "the newest kept");
        assert!(sink.metrics().playback_dropped_frames.load(Ordering::Relaxed) > 0);
        assert!(sink.take_playback(Duration::from_millis(1)).is_empty());

        sink.push_capture(&[7, -7, 8, -8]);
        let mut out = [0xffu8; 12];
        assert_eq!(sink.pull_capture(&mut out), 2);
        assert_eq!(out, [7, 0, 0xf9, 0xff, 8, 0, 0xf8, 0xff, 0, 0, 0, 0]);
        sink.push_capture(&vec![1; MAX_CAPTURE_FRAMES * CHANNELS * 3]);
        let mut big = vec![0u8; MAX_CAPTURE_FRAMES * FRAME_BYTES * 2];
        assert_eq!(sink.pull_capture(&mut big), MAX_CAPTURE_FRAMES);
    }
}
