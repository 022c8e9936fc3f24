//! Sound for tests and benchmarks: `pleiades-agent tone` plays a sine on the first ALSA card,
//! `pleiades-agent record` records from it and prints the recording (a mono WAV, base64) on
//! stdout between `PLEIADES-WAV-BEGIN` and `PLEIADES-WAV-END`.
//!
//! The agent talks to the kernel's PCM devices itself ([`alsa`]: a few ioctls) instead of
//! shipping alsa-utils: `aplay`/`arecord` would need alsa-lib, its configuration tree, glibc's
//! shared objects and the dynamic loader in an initramfs that is otherwise static.

#[allow(unsafe_code)]
mod alsa;

use std::io;
use std::path::Path;

pub use alsa::Pcm;

pub const RATE: u32 = 48_000;
/// 20 ms periods in a 160 ms buffer (virtio-snd's default maximum buffer).
pub const PERIOD_FRAMES: u32 = 960;
pub const BUFFER_FRAMES: u32 = 7680;

/// What `tone` played.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ToneReport {
    pub freq: f64,
    pub frames: u64,
    /// RMS of the samples written (full scale 32768).
    pub rms: f64,
    pub period_frames: u32,
    pub buffer_frames: u32,
    pub xruns: u32,
}

/// `seconds` of a `freq` Hz sine at `amplitude` (0..1 of full scale), both channels.
pub fn sine(freq: f64, amplitude: f64, frames: u64, start: u64) -> Vec<i16> {
    (start..start + frames)
        .flat_map(|i| {
            let v = (amplitude
                * 32767.0
                * (2.0 * std::f64::consts::PI * freq * i as f64 / f64::from(RATE)).sin())
                as i16;
            [v, v]
        })
        .collect()
}

/// Plays a sine on `device` (e.g. `/dev/snd/pcmC0D0p`).
pub fn tone(device: &Path, freq: f64, amplitude: f64, seconds: f64) -> io::Result<ToneReport> {
    let mut pcm = Pcm::open(device, PERIOD_FRAMES, BUFFER_FRAMES)?;
    let total = (seconds.clamp(0.0, 3600.0) * f64::from(RATE)) as u64;
    let mut written = 0u64;
    let mut sum_sq = 0f64;
    while written < total {
        let n = u64::from(PERIOD_FRAMES).min(total - written);
        let chunk = sine(freq, amplitude, n, written);
        sum_sq += chunk.iter().step_by(2).map(|s| f64::from(*s).powi(2)).sum::<f64>();
        pcm.write(&chunk)?;
        written += n;
    }
    pcm.drain()?;
    Ok(ToneReport {
        freq,
        frames: written,
        rms: (sum_sq / written.max(1) as f64).sqrt(),
        period_frames: pcm.period_frames,
        buffer_frames: pcm.buffer_frames,
        xruns: pcm.xruns,
    })
}

/// Records `seconds` from `device` (e.g. `/dev/snd/pcmC0D0c`); returns the left channel.
pub fn record(device: &Path, seconds: f64) -> io::Result<Vec<i16>> {
    let mut pcm = Pcm::open(device, PERIOD_FRAMES, BUFFER_FRAMES)?;
    let total = (seconds.clamp(0.0, 60.0) * f64::from(RATE)) as usize;
    let mut stereo = vec![0i16; total * 2];
    pcm.read(&mut stereo)?;
    pcm.stop()?;
    Ok(stereo.iter().step_by(2).copied().collect())
}

/// A mono 48 kHz 16-bit WAV file.
pub fn wav(samples: &[i16]) -> Vec<u8> {
    let data_len = (samples.len() * 2) as u32;
    let mut out = Vec::with_capacity(44 + data_len as usize);
    out.extend_from_slice(b"RIFF");
    out.extend_from_slice(&(36 + data_len).to_le_bytes());
    out.extend_from_slice(b"WAVEfmt ");
    out.extend_from_slice(&16u32.to_le_bytes());
    out.extend_from_slice(&1u16.to_le_bytes()); // PCM
    out.extend_from_slice(&1u16.to_le_bytes()); // mono
    out.extend_from_slice(&RATE.to_le_bytes());
    out.extend_from_slice(&(RATE * 2).to_le_bytes());
    out.extend_from_slice(&2u16.to_le_bytes());
    out.extend_from_slice(&16u16.to_le_bytes());
    out.extend_from_slice(b"data");
    out.extend_from_slice(&data_len.to_le_bytes());
    samples.iter().for_each(|s| out.extend_from_slice(&s.to_le_bytes()));
    out
}

/// Standard base64 with padding.
pub fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_and_wav() {
        assert_eq!(base64(b"Man"), "TWFu");
        assert_eq!(base64(b"Ma"), "TWE=");
        assert_eq!(base64(b"M"), "TQ==");
        let w = wav(&[1, -1]);
        assert_eq!(w.len(), 48);
        assert_eq!(&w[..4], b"RIFF");
        assert_eq!(&w[44..], &[1, 0, 0xff, 0xff]);
        let s = sine(440.0, 0.5, 48_000, 0);
        let rms = (s.iter().step_by(2).map(|v| f64::from(*v).powi(2)).sum::<f64>() / 48_000.0).sqrt();
        assert!((rms - 0.5 * 32767.0 / 2f64.sqrt()).abs() < 20.0, "{rms}");
    }
}
