//! The session's audio on the client: the guest's playback through an adaptive jitter buffer
//! and Opus (FEC and concealment on loss) to the output, and a microphone to the guest.
//!
//! - Playback: `AudioPlayback` datagrams go into [`JitterBuffer`] (protocol crate, sans-IO);
//!   a 5 ms tick pulls each 20 ms frame when its time comes and decodes it: the packet, the
//!   next packet's in-band FEC for a lost one, Opus concealment when both are lost, silence
//!   in an underrun. The headless client writes what it would play to `playback.wav`
//!   ([`AudioOptions::playback_wav`]). Every second an `AudioFeedback` tells the server the
//!   loss seen, which becomes its encoder's loss hint.
//! - Microphone: a WAV file ([`AudioOptions::mic_wav`], 48 kHz, 16-bit, mono or stereo),
//!   looped, or the sound card's input ([`AudioOptions::microphone`]), sent as 20 ms
//!   `AudioRecord` frames in real time.
//! - The sound card ([`device`], cpal): the speaker plays what the WAV gets
//!   ([`AudioOptions::speaker`]). A device that does not open is logged and left out; the
//!   session goes on.
//!
//! Latency per played frame is its output time minus its `timestamp_us` (when the guest's
//! device played it): both are `CLOCK_MONOTONIC` on one machine in tests.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use audiopus::coder::{Decoder, Encoder};
use audiopus::{Application, Bitrate, Channels, SampleRate};
use pleiades_protocol::handshake::Capabilities;
use pleiades_protocol::jitter::{self, JitterBuffer, Playout};
use pleiades_protocol::wire::{AUDIO_FRAME_SAMPLES, AudioFeedback, AudioPacket, Datagram, MAX_OPUS_BYTES};
use serde::Serialize;

pub mod device;

use crate::clock::monotonic_us;
use crate::error::ClientError;
use crate::session::SessionHandle;

/// Samples (both channels) in one 20 ms frame.
pub const FRAME_LEN: usize = AUDIO_FRAME_SAMPLES as usize * 2;
/// The microphone's Opus bitrate.
pub const MIC_BITRATE: i32 = 64_000;
/// The datagram header before the Opus bytes (channel, type, seq, timestamp, frames).
const DATAGRAM_HEADER: u64 = 17;

/// What to do with audio.
#[derive(Debug, Clone, Default)]
pub struct AudioOptions {
    /// Write what would be played here (48 kHz stereo 16-bit WAV).
    pub playback_wav: Option<PathBuf>,
    /// Send this WAV file (48 kHz, 16-bit, mono or stereo) as the microphone, looped.
    pub mic_wav: Option<PathBuf>,
    /// Play through the default output device.
    pub speaker: bool,
    /// Record from the default input device (unless `mic_wav` is given).
    pub microphone: bool,
}

/// Where the microphone frames come from.
enum MicSource {
    File { samples: Vec<i16>, at: usize },
    Device(device::Microphone),
}

impl MicSource {
    /// The next 20 ms, if there is one yet.
    fn next(&mut self, frame: &mut [i16; FRAME_LEN]) -> bool {
        match self {
            Self::File { samples, at } => {
                let mut filled = 0;
                while filled < FRAME_LEN {
                    let take = (FRAME_LEN - filled).min(samples.len() - *at);
                    frame[filled..filled + take].copy_from_slice(&samples[*at..*at + take]);
                    filled += take;
                    *at = (*at + take) % samples.len();
                }
                true
            }
            Self::Device(mic) => mic.take(frame),
        }
    }
}

/// Latency of played frames, µs.
#[derive(Debug, Clone, Default, Serialize)]
pub struct AudioLatency {
    pub p50_us: i64,
    pub p95_us: i64,
    pub max_us: i64,
}

/// `audio.json`: how the playback stream went.
#[derive(Debug, Clone, Default, Serialize)]
pub struct AudioSummary {
    pub packets: u64,
    pub bytes: u64,
    pub kbit_s: f64,
    pub frames_played: u64,
    /// Lost frames decoded from the next packet's in-band FEC data.
    pub recovered_fec: u64,
    /// Lost frames whose next packet had no FEC data (a CELT-only packet: Opus carries FEC in
    /// its SILK layer only, so music at high bitrates has none): concealed instead.
    pub fec_unavailable: u64,
    pub concealed: u64,
    pub underruns: u64,
    pub late: u64,
    pub skipped: u64,
    pub decode_errors: u64,
    pub delay_ms: u64,
    /// From each frame's device play time to its output here.
    pub latency: AudioLatency,
    pub mic_frames: u64,
    /// Frames the sound card played (silence included; 0 without `--play`).
    pub speaker_frames: u64,
    pub duration_s: f64,
    /// Kbit/s while packets flowed (`kbit_s` counts the whole session).
    pub stream_kbit_s: f64,
    /// The first frames (by position in the output, 20 ms each) that were not a packet:
    /// `fec`, `conceal`, `expand` or `silence`.
    pub repairs: Vec<(u64, String)>,
}

/// Most entries in [`AudioSummary::repairs`].
const MAX_REPAIRS: usize = 200;

/// The running audio tasks.
#[derive(Debug)]
pub struct Audio {
    stop: Arc<AtomicBool>,
    playback: tokio::task::JoinHandle<Result<AudioSummary, ClientError>>,
    mic: Option<tokio::task::JoinHandle<u64>>,
}

/// A 48 kHz stereo Opus encoder for 20 ms frames, in-band FEC on.
pub fn opus_encoder(bitrate: i32, loss_percent: u8) -> Result<Encoder, ClientError> {
    let setup = |e: audiopus::Error| ClientError::Setup(format!("Opus encoder: {e}"));
    let mut encoder =
        Encoder::new(SampleRate::Hz48000, Channels::Stereo, Application::Audio).map_err(setup)?;
    encoder.set_bitrate(Bitrate::BitsPerSecond(bitrate)).map_err(setup)?;
    encoder.set_inband_fec(true).map_err(setup)?;
    encoder.set_packet_loss_perc(loss_percent).map_err(setup)?;
    Ok(encoder)
}

/// Decodes what the jitter buffer says to play into one 20 ms frame.
#[derive(Debug)]
pub struct PlayoutDecoder {
    decoder: Decoder,
    pub errors: u64,
    /// FEC asked of a packet that has none (CELT-only): Opus conceals instead.
    pub fec_unavailable: u64,
}

/// Whether an Opus packet is CELT-only (TOC configurations 16-31), i.e. has no SILK layer
/// and so no in-band FEC.
pub fn celt_only(packet: &[u8]) -> bool {
    packet.first().is_some_and(|toc| toc >> 3 >= 16)
}

impl PlayoutDecoder {
    pub fn new() -> Result<Self, ClientError> {
        let decoder = Decoder::new(SampleRate::Hz48000, Channels::Stereo)
            .map_err(|e| ClientError::Setup(format!("Opus decoder: {e}")))?;
        Ok(Self { decoder, errors: 0, fec_unavailable: 0 })
    }

    pub fn decode(&mut self, playout: &Playout, out: &mut [i16; FRAME_LEN]) {
        let result = match playout {
            Playout::Packet(p) => self.decoder.decode(Some(&p.opus[..]), &mut out[..], false),
            Playout::Fec(next) => {
                self.fec_unavailable += u64::from(celt_only(&next.opus));
                self.decoder.decode(Some(&next.opus[..]), &mut out[..], true)
            }
            Playout::Conceal | Playout::Expand => self.decoder.decode(None::<&[u8]>, &mut out[..], false),
            Playout::Silence => {
                out.fill(0);
                return;
            }
        };
        if result.is_err() {
            self.errors += 1;
            // A packet that does not decode is concealed instead.
            if self.decoder.decode(None::<&[u8]>, &mut out[..], false).is_err() {
                out.fill(0);
            }
        }
    }
}

/// Reads a 48 kHz 16-bit WAV as interleaved stereo.
pub fn read_wav(path: &std::path::Path) -> Result<Vec<i16>, ClientError> {
    let bad = |e: String| ClientError::Setup(format!("{}: {e}", path.display()));
    let mut reader = hound::WavReader::open(path).map_err(|e| bad(e.to_string()))?;
    let spec = reader.spec();
    if spec.sample_rate != 48_000
        || spec.bits_per_sample != 16
        || spec.sample_format != hound::SampleFormat::Int
    {
        return Err(bad(format!("{spec:?}: give a 48 kHz 16-bit PCM WAV")));
    }
    let samples: Vec<i16> =
        reader.samples::<i16>().collect::<Result<_, _>>().map_err(|e| bad(e.to_string()))?;
    let stereo = match spec.channels {
        1 => samples.iter().flat_map(|s| [*s, *s]).collect(),
        2 => samples,
        n => return Err(bad(format!("{n} channels: give mono or stereo"))),
    };
    if stereo.len() < FRAME_LEN {
        return Err(bad("shorter than 20 ms".into()));
    }
    Ok(stereo)
}

fn percentile(sorted: &[i64], p: f64) -> i64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

impl Audio {
    /// Starts playback (and the microphone) if the session has audio; `None` when it has not.
    pub fn start(handle: &SessionHandle, options: AudioOptions) -> Result<Option<Self>, ClientError> {
        if !handle.info().capabilities.contains(Capabilities::AUDIO) {
            return Ok(None);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let wav = match &options.playback_wav {
            Some(path) => {
                let spec = hound::WavSpec {
                    channels: 2,
                    sample_rate: 48_000,
                    bits_per_sample: 16,
                    sample_format: hound::SampleFormat::Int,
                };
                Some(
                    hound::WavWriter::create(path, spec)
                        .map_err(|e| ClientError::Setup(format!("{}: {e}", path.display())))?,
                )
            }
            None => None,
        };
        let source = match &options.mic_wav {
            Some(path) => Some(MicSource::File { samples: read_wav(path)?, at: 0 }),
            None if options.microphone => match device::Microphone::open() {
                Ok(mic) => Some(MicSource::Device(mic)),
                Err(e) => {
                    tracing::warn!("no microphone ({e}); the session goes on without one");
                    None
                }
            },
            None => None,
        };
        let mic = match source {
            Some(source) => {
                let encoder = opus_encoder(MIC_BITRATE, 5)?;
                Some(tokio::spawn(mic_loop(handle.clone(), source, encoder, stop.clone())))
            }
            None => None,
        };
        let speaker = if options.speaker {
            device::Speaker::open()
                .map_err(|e| tracing::warn!("no speaker ({e}); the session goes on without sound"))
                .ok()
        } else {
            None
        };
        let decoder = PlayoutDecoder::new()?;
        let packets = handle.audio_packets(256);
        let output = Output { wav, speaker };
        let playback = tokio::spawn(playback_loop(handle.clone(), packets, decoder, output, stop.clone()));
        Ok(Some(Self { stop, playback, mic }))
    }

    /// Stops the tasks, finishes the WAV file and returns the summary.
    pub async fn finish(self) -> Result<AudioSummary, ClientError> {
        self.stop.store(true, Ordering::Relaxed);
        let mic_frames = match self.mic {
            Some(mic) => mic.await.unwrap_or(0),
            None => 0,
        };
        let mut summary =
            self.playback.await.map_err(|e| ClientError::Setup(format!("audio task: {e}")))??;
        summary.mic_frames = mic_frames;
        Ok(summary)
    }
}

type WavOut = hound::WavWriter<std::io::BufWriter<std::fs::File>>;

/// Where played frames go.
struct Output {
    wav: Option<WavOut>,
    speaker: Option<device::Speaker>,
}

async fn playback_loop(
    handle: SessionHandle,
    mut packets: tokio::sync::mpsc::Receiver<AudioPacket>,
    mut decoder: PlayoutDecoder,
    output: Output,
    stop: Arc<AtomicBool>,
) -> Result<AudioSummary, ClientError> {
    let Output { mut wav, speaker } = output;
    let started = monotonic_us();
    let mut jb = JitterBuffer::new();
    let mut summary = AudioSummary::default();
    let mut latencies = Vec::new();
    let mut frame = [0i16; FRAME_LEN];
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    let mut next_feedback = started + 1_000_000;
    let mut reported = (0u64, 0u64);
    let mut output_frames = 0u64;
    // The device play time of the last frame of the stream that was output (played or repaired).
    let mut last_frame_us: Option<u64> = None;
    let wav_error = |e: hound::Error| ClientError::Setup(format!("playback.wav: {e}"));
    while !stop.load(Ordering::Relaxed) {
        tokio::select! {
            packet = packets.recv() => {
                let Some(packet) = packet else { break };
                summary.packets += 1;
                summary.bytes += packet.opus.len() as u64 + DATAGRAM_HEADER;
                jb.push(packet, monotonic_us());
            }
            _ = tick.tick() => {
                let now = monotonic_us();
                while let Some((_, playout)) = jb.next(now) {
                    decoder.decode(&playout, &mut frame);
                    let kind = match &playout {
                        Playout::Packet(_) => None,
                        Playout::Fec(_) => Some("fec"),
                        Playout::Conceal => Some("conceal"),
                        Playout::Expand => Some("expand"),
                        Playout::Silence => Some("silence"),
                    };
                    if let Some(kind) = kind && summary.repairs.len() < MAX_REPAIRS {
                        summary.repairs.push((output_frames, kind.to_owned()));
                    }
                    output_frames += 1;
                    // Latency of every frame of the stream, repaired ones included: a lost frame's
                    // play time is the one before it plus a frame, or its FEC carrier's minus one.
                    let frame_us = match &playout {
                        Playout::Packet(p) => Some(p.timestamp_us),
                        Playout::Fec(next) => Some(next.timestamp_us.saturating_sub(jitter::FRAME_US)),
                        Playout::Conceal => last_frame_us.map(|t| t + jitter::FRAME_US),
                        // Filler while waiting or nothing at all: no frame of the stream.
                        Playout::Expand | Playout::Silence => None,
                    };
                    if let Some(t) = frame_us {
                        latencies.push(now as i64 - t as i64);
                        last_frame_us = Some(t);
                    }
                    if let Some(speaker) = &speaker {
                        speaker.play(&frame);
                    }
                    if let Some(wav) = &mut wav {
                        let mut w = wav.get_i16_writer(FRAME_LEN as u32);
                        frame.iter().for_each(|s| w.write_sample(*s));
                        w.flush().map_err(wav_error)?;
                    }
                }
                if now >= next_feedback {
                    next_feedback = now + 1_000_000;
                    let s = jb.stats();
                    let lost = s.recovered_fec + s.concealed;
                    let (lost_delta, total_delta) = (lost - reported.0, lost + s.played - reported.1);
                    reported = (lost, lost + s.played);
                    let loss_permille = (lost_delta * 1000).checked_div(total_delta).unwrap_or(0).min(1000) as u16;
                    let feedback = AudioFeedback { loss_permille, delay_ms: (jb.delay_us() / 1000) as u16 };
                    let _ = handle.send_datagram(&Datagram::AudioFeedback(feedback));
                }
            }
        }
    }
    if let Some(wav) = wav {
        wav.finalize().map_err(wav_error)?;
    }
    summary.speaker_frames = speaker.as_ref().map_or(0, device::Speaker::frames_played);
    let s = jb.stats();
    summary.frames_played = s.played;
    summary.fec_unavailable = decoder.fec_unavailable;
    summary.recovered_fec = s.recovered_fec - decoder.fec_unavailable;
    summary.concealed = s.concealed;
    summary.underruns = s.underruns;
    summary.late = s.late;
    summary.skipped = s.skipped;
    summary.decode_errors = decoder.errors;
    summary.delay_ms = jb.delay_us() / 1000;
    summary.duration_s = (monotonic_us() - started) as f64 / 1e6;
    if summary.duration_s > 0.0 {
        summary.kbit_s = summary.bytes as f64 * 8.0 / 1000.0 / summary.duration_s;
    }
    if summary.packets > 0 {
        summary.stream_kbit_s = summary.bytes as f64 * 8.0 / 1000.0 / (summary.packets as f64 * 0.02);
    }
    latencies.sort_unstable();
    summary.latency = AudioLatency {
        p50_us: percentile(&latencies, 0.5),
        p95_us: percentile(&latencies, 0.95),
        max_us: latencies.last().copied().unwrap_or(0),
    };
    Ok(summary)
}

/// Sends the microphone as 20 ms frames in real time; returns the frames sent.
async fn mic_loop(
    handle: SessionHandle,
    mut source: MicSource,
    encoder: Encoder,
    stop: Arc<AtomicBool>,
) -> u64 {
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    let mut out = vec![0u8; MAX_OPUS_BYTES];
    let mut seq = 0u32;
    let mut frame = [0i16; FRAME_LEN];
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        // A device may deliver in bursts: send what is there.
        while source.next(&mut frame) {
            let Ok(n) = encoder.encode(&frame, &mut out) else { break };
            let packet = AudioPacket { seq, timestamp_us: monotonic_us(), opus: out[..n].to_vec() };
            if handle.send_datagram(&Datagram::AudioRecord(packet)).is_err() {
                return u64::from(seq);
            }
            seq = seq.wrapping_add(1);
            if matches!(source, MicSource::File { .. }) {
                break;
            }
        }
    }
    u64::from(seq)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_playout_decodes_to_a_full_frame() {
        let encoder = opus_encoder(96_000, 5).unwrap();
        let mut out = vec![0u8; MAX_OPUS_BYTES];
        // Opus starts a tone in hybrid mode (SILK + CELT, with FEC data) and settles on
        // CELT-only (no FEC data) within a second at this bitrate.
        let mut packets = Vec::new();
        for f in 0..50 {
            let tone: Vec<i16> = (f * 960..(f + 1) * 960)
                .flat_map(|i| {
                    let v =
                        (10_000.0 * (i as f64 * 2.0 * std::f64::consts::PI * 440.0 / 48_000.0).sin()) as i16;
                    [v, v]
                })
                .collect();
            let n = encoder.encode(&tone, &mut out).unwrap();
            packets.push(AudioPacket { seq: f as u32, timestamp_us: 0, opus: out[..n].to_vec() });
        }
        assert!(!celt_only(&packets[0].opus), "the first frames are hybrid");
        assert!(celt_only(&packets[49].opus), "music at 96 kbit/s settles on CELT");
        let mut decoder = PlayoutDecoder::new().unwrap();
        let mut frame = [1i16; FRAME_LEN];
        for playout in [
            Playout::Packet(packets[0].clone()),
            Playout::Fec(packets[2].clone()),
            Playout::Packet(packets[2].clone()),
            Playout::Fec(packets[49].clone()),
            Playout::Conceal,
            Playout::Expand,
            Playout::Silence,
        ] {
            decoder.decode(&playout, &mut frame);
        }
        assert_eq!(frame, [0; FRAME_LEN]);
        assert_eq!(decoder.fec_unavailable, 1, "FEC asked of a CELT-only packet");
        decoder.decode(
            &Playout::Packet(AudioPacket { seq: 1, timestamp_us: 0, opus: vec![0xff, 0xff] }),
            &mut frame,
        );
        assert_eq!(decoder.errors, 1, "garbage is concealed, not fatal");
    }

    #[test]
    fn wav_input_must_be_48_khz_16_bit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.wav");
        let spec = hound::WavSpec {
            channels: 1,
            sample_rate: 44_100,
            bits_per_sample: 16,
            sample_format: hound::SampleFormat::Int,
        };
        let mut w = hound::WavWriter::create(&path, spec).unwrap();
        (0..48_000).for_each(|_| w.write_sample(0i16).unwrap());
        w.finalize().unwrap();
        assert!(read_wav(&path).is_err());
        let spec = hound::WavSpec { sample_rate: 48_000, ..spec };
        let mut w = hound::WavWriter::create(&path, spec).unwrap();
        (0..4800).for_each(|i| w.write_sample(i as i16).unwrap());
        w.finalize().unwrap();
        let stereo = read_wav(&path).unwrap();
        assert_eq!((stereo.len(), stereo[2], stereo[3]), (9600, 1, 1));
    }
}
