//! The sound card through cpal: a speaker fed from the jitter buffer's output and a microphone
//! that feeds the `AudioRecord` stream. PulseAudio (cpal's pure-Rust client, also PipeWire's
//! pulse server) first, then the platform's default host.
//!
//! cpal streams may not move between threads, so each lives on a thread of its own until it
//! is dropped. The callbacks never wait: the speaker plays silence when nothing is queued and
//! keeps at most [`MAX_QUEUED_FRAMES`]; the microphone's queue is bounded the same way.
//! Opening a device that is not there is an error for the caller to log; the session goes on.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, mpsc};
use std::time::Duration;

use cpal::traits::{DeviceTrait, HostTrait, StreamTrait};

/// Most frames queued for the speaker or from the microphone (250 ms); older ones are dropped.
pub const MAX_QUEUED_FRAMES: usize = 12_000;
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// The device buffer: 40 ms (a server default such as PulseAudio's 2 s would be latency).
const BUFFER_FRAMES: u32 = 1920;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// PulseAudio if it answers, else the default host.
fn host() -> cpal::Host {
    #[cfg(target_os = "linux")]
    match cpal::host_from_id(cpal::HostId::PulseAudio) {
        Ok(host) => return host,
        Err(e) => tracing::info!("PulseAudio: {e}; trying the default sound host"),
    }
    cpal::default_host()
}

/// Logs a stream's errors, the first few only (a broken device can report one per callback).
fn log_errors(what: &'static str) -> impl FnMut(cpal::Error) + Send + 'static {
    let mut count = 0u32;
    move |e| {
        count += 1;
        if count <= 5 {
            tracing::warn!("{what}: {e}");
        }
    }
}

fn config() -> cpal::StreamConfig {
    cpal::StreamConfig {
        channels: 2,
        sample_rate: 48_000,
        buffer_size: cpal::BufferSize::Fixed(BUFFER_FRAMES),
    }
}

#[derive(Debug, Default)]
struct Shared {
    queue: Mutex<VecDeque<i16>>,
    /// Frames that went through the device (speaker: played, silence included; microphone:
    /// captured).
    frames: AtomicU64,
    stop: AtomicBool,
}

/// Runs `build` on a thread that keeps the stream alive until `shared.stop`.
fn keep_stream(
    name: &str,
    shared: Arc<Shared>,
    build: impl FnOnce(Arc<Shared>) -> Result<cpal::Stream, String> + Send + 'static,
) -> Result<std::thread::JoinHandle<()>, String> {
    let (tx, rx) = mpsc::sync_channel(1);
    let thread = std::thread::Builder::new()
        .name(format!("audio-{name}"))
        .spawn(move || {
            let stream =
                match build(shared.clone()).and_then(|s| s.play().map(|()| s).map_err(|e| e.to_string())) {
                    Ok(s) => s,
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
            let _ = tx.send(Ok(()));
            while !shared.stop.load(Ordering::Relaxed) {
                std::thread::park_timeout(Duration::from_millis(100));
            }
            drop(stream);
        })
        .map_err(|e| e.to_string())?;
    match rx.recv_timeout(OPEN_TIMEOUT) {
        Ok(Ok(())) => Ok(thread),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(format!("the {name} did not open within {OPEN_TIMEOUT:?}")),
    }
}

/// The default output device, playing 48 kHz stereo.
#[derive(Debug)]
pub struct Speaker {
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Speaker {
    pub fn open() -> Result<Self, String> {
        let shared = Arc::new(Shared::default());
        let thread = keep_stream("speaker", shared.clone(), |shared| {
            let host = host();
            let device = host.default_output_device().ok_or("no output device")?;
            tracing::info!(host = ?host.id(), device = ?device.id().ok(), "speaker");
            device
                .build_output_stream(
                    config(),
                    move |out: &mut [i16], _: &cpal::OutputCallbackInfo| {
                        let mut queue = lock(&shared.queue);
                        for s in out.iter_mut() {
                            *s = queue.pop_front().unwrap_or(0);
                        }
                        shared.frames.fetch_add(out.len() as u64 / 2, Ordering::Relaxed);
                    },
                    log_errors("speaker"),
                    None,
                )
                .map_err(|e| format!("cannot open the speaker: {e}"))
        })?;
        Ok(Self { shared, thread: Some(thread) })
    }

    /// Queues interleaved stereo samples.
    pub fn play(&self, samples: &[i16]) {
        let mut queue = lock(&self.shared.queue);
        queue.extend(samples);
        let max = MAX_QUEUED_FRAMES * 2;
        if queue.len() > max {
            let excess = queue.len() - max;
            queue.drain(..excess);
        }
    }

    /// Frames the device has taken (silence included).
    pub fn frames_played(&self) -> u64 {
        self.shared.frames.load(Ordering::Relaxed)
    }
}

/// The default input device, recording 48 kHz stereo.
#[derive(Debug)]
pub struct Microphone {
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Microphone {
    pub fn open() -> Result<Self, String> {
        let shared = Arc::new(Shared::default());
        let thread = keep_stream("microphone", shared.clone(), |shared| {
            let host = host();
            let device = host.default_input_device().ok_or("no input device")?;
            tracing::info!(host = ?host.id(), device = ?device.id().ok(), "microphone");
            device
                .build_input_stream(
                    config(),
                    move |data: &[i16], _: &cpal::InputCallbackInfo| {
                        let mut queue = lock(&shared.queue);
                        queue.extend(data);
                        let max = MAX_QUEUED_FRAMES * 2;
                        if queue.len() > max {
                            let excess = queue.len() - max;
                            queue.drain(..excess);
                        }
                        shared.frames.fetch_add(data.len() as u64 / 2, Ordering::Relaxed);
                    },
                    log_errors("microphone"),
                    None,
                )
                .map_err(|e| format!("cannot open the microphone: {e}"))
        })?;
        Ok(Self { shared, thread: Some(thread) })
    }

    /// Takes `samples.len()` interleaved samples if that many are there.
    pub fn take(&self, samples: &mut [i16]) -> bool {
        let mut queue = lock(&self.shared.queue);
        if queue.len() < samples.len() {
            return false;
        }
        let n = samples.len();
        for (s, q) in samples.iter_mut().zip(queue.drain(..n)) {
            *s = q;
        }
        true
    }

    /// Frames captured so far.
    pub fn frames_captured(&self) -> u64 {
        self.shared.frames.load(Ordering::Relaxed)
    }
}

macro_rules! stop_on_drop {
    ($t:ty) => {
        impl Drop for $t {
            fn drop(&mut self) {
                self.shared.stop.store(true, Ordering::Relaxed);
                if let Some(thread) = self.thread.take() {
                    thread.thread().unpark();
                    let _ = thread.join();
                }
            }
        }
    };
}
stop_on_drop!(Speaker);
stop_on_drop!(Microphone);
