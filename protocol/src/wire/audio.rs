//! Audio datagrams (channel 4): Opus packets both ways and the receiver's loss report.
//!
//! ```text
//! 0x0401 AudioPlayback  server → client   seq:u32 | timestamp_us:u64 | frames:u16 | opus:bytes*
//! 0x0402 AudioRecord    client → server   seq:u32 | timestamp_us:u64 | frames:u16 | opus:bytes*
//! 0x0403 AudioFeedback  client → server   loss_permille:u16 | delay_ms:u16
//! ```
//!
//! Audio is 48 kHz stereo Opus in 20 ms frames ([`AUDIO_FRAME_SAMPLES`] per channel), one frame
//! per datagram, with in-band FEC. `seq` counts frames (a gap is a loss or a pause);
//! `timestamp_us` is when the frame's first sample played in the guest (playback) or was
//! captured (record), on the sender's monotonic clock, the clock of `FrameBegin.capture_us`:
//! a client presents audio and video with the same offset (lip sync).

use super::codec::{Put, Reader};

/// Samples per channel in one audio datagram: 20 ms at 48 kHz.
pub const AUDIO_FRAME_SAMPLES: u16 = 960;
/// Audio sample rate (Hz) and channels of version 1.
pub const AUDIO_SAMPLE_RATE: u32 = 48_000;
pub const AUDIO_CHANNELS: u16 = 2;
/// The largest Opus packet in a datagram (Opus' own limit is 1275 bytes per frame; the
/// datagram limit leaves room for the 17-byte header).
pub const MAX_OPUS_BYTES: usize = 1000;

/// One Opus frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AudioPacket {
    pub seq: u32,
    pub timestamp_us: u64,
    pub opus: Vec<u8>,
}

/// What the audio receiver saw recently; the sender tunes its encoder's loss hint from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AudioFeedback {
    /// Packets lost (not recovered in time), per thousand, over the last few seconds.
    pub loss_permille: u16,
    /// The receiver's jitter-buffer delay.
    pub delay_ms: u16,
}

pub(crate) fn put_packet(p: &AudioPacket, out: &mut Vec<u8>) {
    out.put_u32(p.seq);
    out.put_u64(p.timestamp_us);
    out.put_u16(AUDIO_FRAME_SAMPLES);
    out.extend_from_slice(&p.opus);
}

pub(crate) fn read_packet(r: &mut Reader<'_>) -> Result<AudioPacket, &'static str> {
    let seq = r.u32()?;
    let timestamp_us = r.u64()?;
    if r.u16()? != AUDIO_FRAME_SAMPLES {
        return Err("audio frames other than 960 samples (20 ms) are not in version 1");
    }
    let opus = r.rest();
    if opus.is_empty() || opus.len() > MAX_OPUS_BYTES {
        return Err("Opus packet empty or over 1000 bytes");
    }
    Ok(AudioPacket { seq, timestamp_us, opus })
}

pub(crate) fn put_feedback(f: &AudioFeedback, out: &mut Vec<u8>) {
    out.put_u16(f.loss_permille);
    out.put_u16(f.delay_ms);
}

pub(crate) fn read_feedback(r: &mut Reader<'_>) -> Result<AudioFeedback, &'static str> {
    let f = AudioFeedback { loss_permille: r.u16()?, delay_ms: r.u16()? };
    if f.loss_permille > 1000 {
        return Err("loss over 1000 per mille");
    }
    Ok(f)
}
