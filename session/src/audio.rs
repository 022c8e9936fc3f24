//! The session's audio: the guest's playback to the client, the client's microphone to the
//! guest, as Opus frames in QUIC datagrams (docs/protocol.md, "Audio").
//!
//! - Playback: a thread takes what the sound device played from its
//!   [`SoundHandle`] (it never blocks the device: the handle buffers a bounded second),
//!   cuts it into 20 ms frames, encodes them with Opus (in-band FEC, the loss hint from the
//!   client's `AudioFeedback`) and sends one `AudioPlayback` datagram per frame. Opus keeps its
//!   FEC in the SILK layer, which music at 96 kbit/s does not use (CELT-only, 20 kHz): while
//!   the client reports loss of [`LOSSY_PERMILLE`] or more, the encoder is told the signal is
//!   voice, which keeps it in hybrid mode (SILK + CELT, 12 kHz audio bandwidth) where lost
//!   frames are recovered from the next packet instead of concealed. Each carries
//!   when its first sample played on the device's period clock: the clock of the display
//!   frames' `capture_us`, so the client can line the two up.
//! - Record: `AudioRecord` datagrams are decoded in sequence order (a single lost frame from
//!   the next packet's FEC, longer gaps concealed) and fed to the device's capture stream.
//!   Late, duplicate and malformed datagrams are dropped and counted; nothing ends the session.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::time::Duration;

use audiopus::coder::{Decoder, Encoder};
use audiopus::{Application, Bitrate, Channels, SampleRate, Signal};
use pleiades_protocol::wire::{self, AUDIO_FRAME_SAMPLES, AudioPacket, Datagram, MAX_OPUS_BYTES, Side};

use pleiades_virtio::snd::{CHANNELS, SoundHandle};

/// Samples (both channels) in one frame.
const FRAME_LEN: usize = AUDIO_FRAME_SAMPLES as usize * CHANNELS;
const FRAME_US: u64 = 20_000;
/// The Opus bitrate of the playback stream.
pub const PLAYBACK_BITRATE: i32 = 96_000;
/// The loss hint before the client reports any, in percent.
const DEFAULT_LOSS_HINT: u8 = 5;
/// Reported loss (per mille) from which the encoder favours FEC over audio bandwidth.
pub const LOSSY_PERMILLE: u16 = 10;
/// No `AudioFeedback` yet.
const NO_REPORT: u16 = u16::MAX;

/// What the encoder is told for the loss the client reported (`NO_REPORT`: none yet): the
/// loss hint in percent (a bit more than seen: FEC is cheap, gaps are not) and the signal.
pub fn encoder_policy(loss_permille: u16) -> (u8, Signal) {
    if loss_permille == NO_REPORT {
        return (DEFAULT_LOSS_HINT, Signal::Auto);
    }
    let hint = (u32::from(loss_permille) / 10 + 1).clamp(1, 30) as u8;
    let signal = if loss_permille >= LOSSY_PERMILLE { Signal::Voice } else { Signal::Auto };
    (hint, signal)
}
/// The longest gap in the microphone stream that is concealed; longer ones are skipped.
const MAX_CONCEALED_FRAMES: u64 = 5;

/// Counters of a session's audio.
#[derive(Debug, Default)]
pub struct AudioMetrics {
    pub frames_sent: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub mic_frames: AtomicU64,
    pub mic_recovered: AtomicU64,
    pub dropped_datagrams: AtomicU64,
}

/// A 48 kHz stereo Opus encoder for 20 ms frames with in-band FEC.
pub fn opus_encoder(bitrate: i32, loss_percent: u8) -> Result<Encoder, String> {
    let mut encoder =
        Encoder::new(SampleRate::Hz48000, Channels::Stereo, Application::Audio).map_err(|e| e.to_string())?;
    encoder.set_bitrate(Bitrate::BitsPerSecond(bitrate)).map_err(|e| e.to_string())?;
    encoder.set_inband_fec(true).map_err(|e| e.to_string())?;
    encoder.set_packet_loss_perc(loss_percent).map_err(|e| e.to_string())?;
    Ok(encoder)
}

/// Cuts played PCM into timestamped 20 ms frames.
#[derive(Debug, Default)]
pub struct Framer {
    pending: Vec<i16>,
    /// When `pending[0]` played.
    pending_us: u64,
}

impl Framer {
    /// Adds a chunk that started playing at `play_us`; returns the complete frames and their
    /// timestamps. A chunk that does not follow on (the guest paused) flushes the partial
    /// frame padded with silence.
    pub fn push(&mut self, play_us: u64, samples: &[i16]) -> Vec<(u64, Vec<i16>)> {
        let mut frames = Vec::new();
        let expected = self.pending_us + (self.pending.len() / CHANNELS) as u64 * 1_000_000 / 48_000;
        if !self.pending.is_empty() && play_us.abs_diff(expected) > FRAME_US {
            self.pending.resize(FRAME_LEN, 0);
            frames.push((self.pending_us, std::mem::take(&mut self.pending)));
        }
        if self.pending.is_empty() {
            self.pending_us = play_us;
        }
        self.pending.extend_from_slice(samples);
        while self.pending.len() >= FRAME_LEN {
            let rest = self.pending.split_off(FRAME_LEN);
            frames.push((self.pending_us, std::mem::replace(&mut self.pending, rest)));
            self.pending_us += FRAME_US;
        }
        frames
    }
}

/// The playback loop: until `stop`, device → Opus → datagrams.
pub(crate) fn playback_loop(
    sound: &SoundHandle,
    conn: &quinn::Connection,
    stop: &AtomicBool,
    reported_loss: &AtomicU16,
    metrics: &AudioMetrics,
) -> Result<(), String> {
    let mut policy = encoder_policy(NO_REPORT);
    let mut encoder = opus_encoder(PLAYBACK_BITRATE, policy.0)?;
    let mut framer = Framer::default();
    let mut seq = 0u32;
    let mut out = vec![0u8; MAX_OPUS_BYTES];
    sound.clear_playback();
    while !stop.load(Ordering::Relaxed) {
        let wanted = encoder_policy(reported_loss.load(Ordering::Relaxed));
        if wanted != policy {
            if wanted.1 != policy.1 {
                tracing::info!("audio: the client reports loss; Opus signal {:?}", wanted.1);
            }
            policy = wanted;
            encoder.set_packet_loss_perc(policy.0).map_err(|e| e.to_string())?;
            encoder.set_signal(policy.1).map_err(|e| e.to_string())?;
        }
        for chunk in sound.take_playback(Duration::from_millis(50)) {
            for (timestamp_us, frame) in framer.push(chunk.play_us, &chunk.samples) {
                let n = encoder.encode(&frame, &mut out).map_err(|e| format!("Opus: {e}"))?;
                let datagram = wire::encode_datagram(&Datagram::AudioPlayback(AudioPacket {
                    seq,
                    timestamp_us,
                    opus: out[..n].to_vec(),
                }));
                seq = seq.wrapping_add(1);
                metrics.frames_sent.fetch_add(1, Ordering::Relaxed);
                metrics.bytes_sent.fetch_add(datagram.len() as u64, Ordering::Relaxed);
                if let Err(e) = conn.send_datagram(datagram.into()) {
                    return Err(format!("cannot send audio: {e}"));
                }
            }
        }
    }
    Ok(())
}

/// Decodes the microphone stream in sequence order into the capture stream.
pub struct MicReceiver {
    decoder: Decoder,
    next_seq: Option<u32>,
    pcm: Vec<i16>,
}

impl std::fmt::Debug for MicReceiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MicReceiver").field("next_seq", &self.next_seq).finish_non_exhaustive()
    }
}

impl MicReceiver {
    pub fn new() -> Result<Self, String> {
        let decoder = Decoder::new(SampleRate::Hz48000, Channels::Stereo).map_err(|e| e.to_string())?;
        Ok(Self { decoder, next_seq: None, pcm: vec![0; FRAME_LEN] })
    }

    /// One packet: returns the PCM to capture (its frame, after any recovered or concealed
    /// ones before it), or nothing for a late or undecodable packet.
    pub fn receive(&mut self, packet: &AudioPacket, metrics: &AudioMetrics) -> Vec<i16> {
        let mut out = Vec::new();
        if let Some(next) = self.next_seq {
            let gap = u64::from(packet.seq.wrapping_sub(next));
            if gap >= 1 << 31 {
                return out; // late or duplicate
            }
            if gap > 0 && gap <= MAX_CONCEALED_FRAMES {
                for _ in 1..gap {
                    if self.decoder.decode(None::<&[u8]>, &mut self.pcm[..], false).is_ok() {
                        out.extend_from_slice(&self.pcm);
                    }
                }
                if self.decoder.decode(Some(&packet.opus[..]), &mut self.pcm[..], true).is_ok() {
                    metrics.mic_recovered.fetch_add(1, Ordering::Relaxed);
                    out.extend_from_slice(&self.pcm);
                }
            }
        }
        match self.decoder.decode(Some(&packet.opus[..]), &mut self.pcm[..], false) {
            Ok(n) if n == usize::from(AUDIO_FRAME_SAMPLES) => {
                out.extend_from_slice(&self.pcm);
                metrics.mic_frames.fetch_add(1, Ordering::Relaxed);
            }
            _ => {
                metrics.dropped_datagrams.fetch_add(1, Ordering::Relaxed);
                return Vec::new();
            }
        }
        self.next_seq = Some(packet.seq.wrapping_add(1));
        out
    }
}

/// Reads the client's datagrams: microphone frames to the guest, loss feedback to the
/// encoder. Returns when the connection ends.
pub(crate) async fn datagram_loop(
    conn: &quinn::Connection,
    sound: Option<SoundHandle>,
    reported_loss: Arc<AtomicU16>,
    metrics: Arc<AudioMetrics>,
) -> String {
    let mut mic = match MicReceiver::new() {
        Ok(m) => m,
        Err(e) => return format!("no Opus decoder: {e}"),
    };
    loop {
        let bytes = match conn.read_datagram().await {
            Ok(b) => b,
            Err(e) => return e.to_string(),
        };
        match wire::decode_datagram(&bytes) {
            Ok(Some(d)) if !d.may_be_sent_by(Side::Client) => {
                metrics.dropped_datagrams.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Some(Datagram::AudioRecord(packet))) => {
                if let Some(sound) = &sound {
                    let pcm = mic.receive(&packet, &metrics);
                    sound.push_capture(&pcm);
                }
            }
            Ok(Some(Datagram::AudioFeedback(f))) => {
                reported_loss.store(f.loss_permille.min(1000), Ordering::Relaxed);
            }
            Ok(_) => {}
            Err(e) => {
                if metrics.dropped_datagrams.fetch_add(1, Ordering::Relaxed) < 16 {
                    tracing::debug!("session: dropped a datagram: {e}");
                }
            }
        }
    }
}

/// The loss the client reported, shared by the datagram reader and the encoder.
pub(crate) fn reported_loss() -> Arc<AtomicU16> {
    Arc::new(AtomicU16::new(NO_REPORT))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tone(frames: usize, start: usize) -> Vec<i16> {
        (start..start + frames)
            .flat_map(|i| {
                let v = (8000.0 * (i as f64 * 2.0 * std::f64::consts::PI * 440.0 / 48_000.0).sin()) as i16;
                [v, v]
            })
            .collect()
    }

    #[test]
    fn the_framer_cuts_20_ms_frames_with_their_play_time() {
        let mut framer = Framer::default();
        assert!(framer.push(1_000_000, &tone(480, 0)).is_empty());
        let frames = framer.push(1_010_000, &tone(1440, 480));
        assert_eq!(frames.len(), 2);
        assert_eq!((frames[0].0, frames[1].0), (1_000_000, 1_020_000));
        assert!(frames.iter().all(|(_, f)| f.len() == FRAME_LEN));
        // A pause: the partial frame is flushed, the next starts at the new time.
        assert!(framer.push(1_040_000, &tone(100, 0)).is_empty());
        let frames = framer.push(9_000_000, &tone(960, 0));
        assert_eq!(frames.iter().map(|f| f.0).collect::<Vec<_>>(), vec![1_040_000, 9_000_000]);
    }

    #[test]
    fn under_loss_the_encoder_keeps_the_fec_carrying_layer() {
        assert_eq!(encoder_policy(NO_REPORT), (DEFAULT_LOSS_HINT, Signal::Auto));
        assert_eq!(encoder_policy(0), (1, Signal::Auto));
        assert_eq!(encoder_policy(20), (3, Signal::Voice));
        assert_eq!(encoder_policy(1000), (30, Signal::Voice));
        // Music at 96 kbit/s settles on CELT-only (TOC config >= 16: no FEC); told "voice" it
        // stays hybrid (configs 12-15: a SILK layer with FEC).
        for (signal, celt) in [(Signal::Auto, true), (Signal::Voice, false)] {
            let mut encoder = opus_encoder(PLAYBACK_BITRATE, 3).unwrap();
            encoder.set_signal(signal).unwrap();
            let mut out = vec![0u8; MAX_OPUS_BYTES];
            let mut last = 0;
            for f in 0..50 {
                let n = encoder.encode(&tone(960, f * 960), &mut out).unwrap();
                assert!(n > 0);
                last = out[0] >> 3;
            }
            assert_eq!(last >= 16, celt, "{signal:?}: TOC config {last}");
        }
    }

    #[test]
    fn the_microphone_survives_loss_and_garbage() {
        let encoder = opus_encoder(64_000, 10).unwrap();
        let metrics = AudioMetrics::default();
        let mut mic = MicReceiver::new().unwrap();
        let mut out = vec![0u8; MAX_OPUS_BYTES];
        let mut captured = 0;
        for seq in 0..20u32 {
            let n = encoder.encode(&tone(960, seq as usize * 960), &mut out).unwrap();
            let packet = AudioPacket { seq, timestamp_us: 0, opus: out[..n].to_vec() };
            if seq == 5 || seq == 9 || seq == 10 {
                continue; // lost
            }
            captured += mic.receive(&packet, &metrics).len();
            // A duplicate (late) packet adds nothing.
            assert!(mic.receive(&packet, &metrics).is_empty());
        }
        assert_eq!(captured, 20 * FRAME_LEN, "every frame, lost ones recovered or concealed");
        assert_eq!(metrics.mic_recovered.load(Ordering::Relaxed), 2);
        let garbage = AudioPacket { seq: 20, timestamp_us: 0, opus: vec![0xff; 3] };
        assert!(mic.receive(&garbage, &metrics).is_empty());
        assert!(metrics.dropped_datagrams.load(Ordering::Relaxed) >= 1);
    }
}
