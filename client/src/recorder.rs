//! The headless recorder: run a session for a while, replay an input script, and write what
//! arrived to a directory that tests and benchmarks read.
//!
//! Files in the record directory (docs/client.md):
//! - `frames.jsonl`: one [`FrameStats`] object per presented frame, in arrival order;
//! - `scanout-N.png`: each scanout's last presented frame, written at the end;
//! - `scanout-N-<ms>.png`: every `--snapshot-every`, `<ms>` = milliseconds since the session
//!   opened;
//! - `NAME.png` (+ `NAME-scanout-N.png` for further scanouts): the script's `snapshot NAME`;
//! - `summary.json`: [`Summary`].
//!
//! PNGs are written from the presented buffers, never mid-frame. The recorder does no drawing:
//! the cursor is reported, not composited.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use pleiades_protocol::wire::{Goodbye, Monitor};
use serde::Serialize;
use tokio::sync::mpsc;

use crate::display::{Codec, FrameStats};
use crate::error::ClientError;
use crate::script::{Command, Step};
use crate::session::{Session, SessionEvent, SessionHandle};

/// Wheel detent in the protocol's units.
const WHEEL_DETENT: i32 = 120;
/// Pause between a click's press and release, so the guest sees both.
const CLICK_HOLD: Duration = Duration::from_millis(20);
/// Pause after each key transition of `type` and `key`: 500 a second, a fast typist's pace and
/// a quarter of what the host's input limit passes (session/src/input.rs), so a long script line
/// arrives whole.
const KEY_GAP: Duration = Duration::from_millis(2);

/// What to record and for how long.
#[derive(Debug, Clone, Default)]
pub struct RecordOptions {
    /// Where the files go; `None` records nothing but the returned summary.
    pub dir: Option<PathBuf>,
    /// End the session after this long; `None` runs until the server ends it (or Ctrl-C).
    pub duration: Option<Duration>,
    /// Write `scanout-N-<ms>.png` this often.
    pub snapshot_every: Option<Duration>,
    /// The input script, already parsed.
    pub script: Vec<Step>,
}

/// Capture-to-present latency over the recorded frames (µs).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Latency {
    pub p50_us: i64,
    pub p95_us: i64,
    pub max_us: i64,
}

/// `summary.json`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    pub session_id: u64,
    pub server_name: String,
    pub capabilities: String,
    /// Seconds from `Welcome` to the end.
    pub duration_s: f64,
    pub frames: u64,
    /// Display bytes of the recorded frames (headers included).
    pub bytes: u64,
    pub kbit_s: f64,
    pub fps: f64,
    pub latency: Latency,
    /// Frames per codec: `tiles`, `h264`, `mixed`, `empty`.
    pub codecs: BTreeMap<String, u64>,
    pub decode_errors: u64,
    /// QUIC's RTT estimate at the end (µs).
    pub rtt_us: u64,
    /// Smoothed RTT of this client's pings (µs), if any came back.
    pub ping_rtt_us: Option<u64>,
    pub scanouts: Vec<u32>,
    pub layout: Vec<LayoutMonitor>,
    pub cursor_shapes: u64,
    /// Commands in the input script.
    pub script_steps: usize,
    /// Whether the whole script ran (`true` without a script).
    pub script_done: bool,
    /// `script` (the script ended and no duration was given), `duration`, `goodbye`,
    /// `interrupted` or `error`.
    pub end: String,
    /// The goodbye's reason and text, or the error.
    pub end_detail: String,
}

/// One monitor of the last `DisplayLayout`.
#[derive(Debug, Clone, Serialize)]
pub struct LayoutMonitor {
    pub id: u32,
    pub x: i32,
    pub y: i32,
    pub width: u32,
    pub height: u32,
}

impl From<&Monitor> for LayoutMonitor {
    fn from(m: &Monitor) -> Self {
        Self { id: m.id, x: m.x, y: m.y, width: m.width, height: m.height }
    }
}

/// Why recording failed.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("cannot write {path}: {error}")]
    Write { path: String, error: std::io::Error },
    #[error(transparent)]
    Session(#[from] ClientError),
}

fn write_error(path: &Path) -> impl FnOnce(std::io::Error) -> RecordError + '_ {
    move |error| RecordError::Write { path: path.display().to_string(), error }
}

/// How the session ended.
enum End {
    ScriptDone,
    Duration,
    Goodbye(Goodbye),
    ServerClosed(String),
    Interrupted,
    Failed(ClientError),
}

/// Runs the session until the duration is over (without one and with a script: until the script
/// is done), the server says goodbye, Ctrl-C, or a failure; writes the files; returns the summary
/// (also on a session failure, with the error).
pub async fn record(mut session: Session, options: RecordOptions) -> Result<Summary, (Summary, RecordError)> {
    let started = Instant::now();
    let handle = session.handle.clone();
    let mut summary = Summary {
        session_id: handle.info().session_id,
        server_name: handle.info().peer_name.clone(),
        capabilities: format!("{:?}", handle.info().capabilities),
        script_steps: options.script.len(),
        script_done: options.script.is_empty(),
        ..Summary::default()
    };
    if let Some(dir) = &options.dir
        && let Err(error) = std::fs::create_dir_all(dir)
    {
        return Err((summary, write_error(dir)(error)));
    }
    let mut frames_file = match &options.dir {
        Some(dir) => {
            let path = dir.join("frames.jsonl");
            match std::fs::File::create(&path) {
                Ok(file) => Some((std::io::BufWriter::new(file), path)),
                Err(error) => return Err((summary, write_error(&path)(error))),
            }
        }
        None => None,
    };

    // The script runs on its own task so that a long `wait` never delays acks or events.
    let (script_done_tx, mut script_done) = mpsc::channel::<Result<(), RecordError>>(1);
    let script_task =
        tokio::spawn(run_script(handle.clone(), options.script.clone(), options.dir.clone(), script_done_tx));

    let deadline = options.duration.map(|d| tokio::time::Instant::now() + d);
    let end_with_script = options.duration.is_none() && !options.script.is_empty();
    let mut snapshot_timer = options.snapshot_every.map(|every| {
        let mut timer = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        timer
    });
    // SIGTERM ends the recording as Ctrl-C does (files written, goodbye said): what a supervisor
    // or `timeout` sends, and what reaches a client started in the background.
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    let mut latencies = Vec::new();
    let mut failure: Option<RecordError> = None;
    let mut script_running = true;

    let end = loop {
        let sleep_until_deadline = async {
            match deadline {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        let snapshot_tick = async {
            match &mut snapshot_timer {
                Some(timer) => timer.tick().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            event = session.next_event() => match event {
                Some(SessionEvent::Frame(stats)) => {
                    summary.frames += 1;
                    summary.bytes += stats.bytes;
                    *summary.codecs.entry(codec_name(stats.codec).to_owned()).or_default() += 1;
                    latencies.push(stats.update_latency_us);
                    if let Some((file, path)) = &mut frames_file
                        && let Err(error) = write_frame(file, &stats) {
                            failure = Some(write_error(path)(error));
                            break End::Duration;
                        }
                }
                Some(SessionEvent::Layout(_)) => {}
                Some(SessionEvent::CursorShape { .. }) => summary.cursor_shapes += 1,
                Some(SessionEvent::Goodbye(goodbye)) => break End::Goodbye(goodbye),
                Some(SessionEvent::ServerClosed(reason)) => break End::ServerClosed(reason),
                Some(SessionEvent::Failed(error)) => break End::Failed(error),
                None => break End::Failed(ClientError::Closed),
            },
            () = sleep_until_deadline => break End::Duration,
            _ = snapshot_tick => {
                if let Some(dir) = &options.dir {
                    let ms = started.elapsed().as_millis();
                    if let Err(error) = write_scanouts(&handle, dir, &format!("-{ms}")).await {
                        failure = Some(error);
                        break End::Duration;
                    }
                }
            }
            done = script_done.recv(), if script_running => {
                script_running = false;
                if let Some(Err(error)) = done {
                    failure = Some(error);
                    break End::Duration;
                }
                tracing::info!("the input script is done");
                summary.script_done = true;
                if end_with_script {
                    break End::ScriptDone;
                }
            }
            _ = tokio::signal::ctrl_c() => break End::Interrupted,
            Some(()) = async {
                match &mut terminate {
                    Some(signal) => signal.recv().await,
                    None => std::future::pending().await,
                }
            } => break End::Interrupted,
        }
    };
    script_task.abort();

    summary.duration_s = started.elapsed().as_secs_f64();
    summary.rtt_us = handle.quic_rtt().as_micros() as u64;
    summary.ping_rtt_us = handle.ping_rtt_us();
    summary.decode_errors = handle.decode_errors();
    summary.scanouts = handle.scanouts();
    summary.layout = handle.layout().iter().map(LayoutMonitor::from).collect();
    if summary.duration_s > 0.0 {
        summary.fps = summary.frames as f64 / summary.duration_s;
        summary.kbit_s = summary.bytes as f64 * 8.0 / 1000.0 / summary.duration_s;
    }
    summary.latency = latency(&mut latencies);

    if !summary.script_done {
        tracing::warn!("the session ended before the input script did");
    }
    let session_error = match end {
        End::ScriptDone => {
            summary.end = "script".into();
            None
        }
        End::Duration => {
            summary.end = "duration".into();
            None
        }
        End::Interrupted => {
            summary.end = "interrupted".into();
            None
        }
        End::Goodbye(goodbye) => {
            summary.end = "goodbye".into();
            summary.end_detail = format!("{:?}: {}", goodbye.reason, goodbye.message);
            None
        }
        End::ServerClosed(reason) => {
            summary.end = "goodbye".into();
            summary.end_detail = format!("the server closed the connection: {reason}");
            None
        }
        End::Failed(error) => {
            summary.end = "error".into();
            summary.end_detail = error.to_string();
            Some(error)
        }
    };
    if let Some(error) = &failure {
        summary.end = "error".into();
        summary.end_detail = error.to_string();
    }
    // Files first (the session's surfaces stay readable after it closed), then the goodbye.
    let written = write_final(&handle, &options, frames_file, &summary).await;
    if session_error.is_none() {
        session.disconnect("recording finished").await;
    }
    let error = failure.or(session_error.map(RecordError::Session)).or(written.err());
    match error {
        Some(error) => Err((summary, error)),
        None => Ok(summary),
    }
}

async fn write_final(
    handle: &SessionHandle,
    options: &RecordOptions,
    frames_file: Option<(std::io::BufWriter<std::fs::File>, PathBuf)>,
    summary: &Summary,
) -> Result<(), RecordError> {
    if let Some((mut file, path)) = frames_file {
        file.flush().map_err(write_error(&path))?;
    }
    let Some(dir) = &options.dir else { return Ok(()) };
    write_scanouts(handle, dir, "").await?;
    let path = dir.join("summary.json");
    let mut text = serde_json::to_string_pretty(summary).map_err(|e| write_error(&path)(e.into()))?;
    text.push('\n');
    std::fs::write(&path, text).map_err(write_error(&path))
}

fn codec_name(codec: Codec) -> &'static str {
    match codec {
        Codec::Empty => "empty",
        Codec::Tiles => "tiles",
        Codec::H264 => "h264",
        Codec::Mixed => "mixed",
    }
}

fn write_frame(file: &mut impl Write, stats: &FrameStats) -> std::io::Result<()> {
    serde_json::to_writer(&mut *file, stats)?;
    file.write_all(b"\n")
}

/// Nearest-rank percentiles; zeros without frames.
fn latency(samples: &mut [i64]) -> Latency {
    if samples.is_empty() {
        return Latency::default();
    }
    samples.sort_unstable();
    let rank = |p: f64| {
        let index = ((p * samples.len() as f64).ceil() as usize).clamp(1, samples.len()) - 1;
        samples[index]
    };
    Latency { p50_us: rank(0.50), p95_us: rank(0.95), max_us: samples[samples.len() - 1] }
}

/// `scanout-N{suffix}.png` for every scanout, encoded off the async threads.
async fn write_scanouts(handle: &SessionHandle, dir: &Path, suffix: &str) -> Result<(), RecordError> {
    for scanout in handle.scanouts() {
        let Some(frame) = handle.snapshot(scanout) else { continue };
        let path = dir.join(format!("scanout-{scanout}{suffix}.png"));
        write_png(frame, path).await?;
    }
    Ok(())
}

async fn write_png(frame: crate::display::Framebuffer, path: PathBuf) -> Result<(), RecordError> {
    let result = tokio::task::spawn_blocking({
        let path = path.clone();
        move || frame.write_png(&path)
    })
    .await
    .map_err(|e| std::io::Error::other(e.to_string()))
    .and_then(|r| r);
    result.map_err(write_error(&path))
}

/// The script's `snapshot NAME`: `NAME.png` is the lowest scanout, `NAME-scanout-N.png` each
/// further one.
async fn write_named_snapshot(handle: &SessionHandle, dir: &Path, name: &str) -> Result<(), RecordError> {
    let scanouts = handle.scanouts();
    if scanouts.is_empty() {
        tracing::warn!(name, "snapshot requested before any frame arrived; nothing written");
    }
    for (index, scanout) in scanouts.into_iter().enumerate() {
        let Some(frame) = handle.snapshot(scanout) else { continue };
        let file = if index == 0 { format!("{name}.png") } else { format!("{name}-scanout-{scanout}.png") };
        write_png(frame, dir.join(file)).await?;
    }
    Ok(())
}

async fn run_script(
    handle: SessionHandle,
    steps: Vec<Step>,
    dir: Option<PathBuf>,
    done: mpsc::Sender<Result<(), RecordError>>,
) {
    let result = run_steps(&handle, &steps, dir.as_deref()).await;
    let _ = done.send(result).await;
}

async fn run_steps(handle: &SessionHandle, steps: &[Step], dir: Option<&Path>) -> Result<(), RecordError> {
    for step in steps {
        tracing::debug!(line = step.line, command = ?step.command, "script");
        match &step.command {
            Command::Keys(strokes) => {
                for stroke in strokes {
                    handle.send_key(stroke.code, stroke.down).await?;
                    tokio::time::sleep(KEY_GAP).await;
                }
            }
            Command::Move { scanout, x, y } => handle.send_pointer(*scanout, *x, *y).await?,
            Command::Click(mask) => {
                handle.send_buttons(*mask).await?;
                tokio::time::sleep(CLICK_HOLD).await;
                handle.send_buttons(0).await?;
            }
            Command::Wheel(detents) => handle.send_wheel(0, detents.saturating_mul(WHEEL_DETENT)).await?,
            Command::Wait(duration) => tokio::time::sleep(*duration).await,
            Command::Layout(sizes) => handle.request_layout(sizes).await?,
            Command::Snapshot(name) => match dir {
                Some(dir) => write_named_snapshot(handle, dir, name).await?,
                None => tracing::warn!(name, "snapshot without --record: nothing written"),
            },
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let mut samples: Vec<i64> = (1..=100).rev().collect();
        let l = latency(&mut samples);
        assert_eq!((l.p50_us, l.p95_us, l.max_us), (50, 95, 100));
        assert_eq!(latency(&mut []).p95_us, 0);
        assert_eq!(latency(&mut [7]).p50_us, 7);
    }
}
