//! virtio-snd (sound device, virtio 1.2, 5.14): a control queue (jack, PCM and channel-map
//! information, PCM_SET_PARAMS / PREPARE / START / STOP / RELEASE), an event queue, and tx and
//! rx queues whose messages carry PCM and end with a per-message status.
//!
//! One playback and one capture stream, 48 kHz S16LE stereo, completed at the stream's real
//! rate (the period clock, see `device.rs`). Played periods go to the [`SoundHandle`] (the
//! session server encodes them); captured periods come from it (the client's microphone) or
//! are silence. Files as in every device: `protocol.rs` the wire format and parser,
//! `request.rs` descriptor chains into typed messages, `device.rs` the device, `sink.rs` the
//! host side and the counters.

mod device;
pub mod protocol;
mod request;
mod sink;

pub use device::{CAPTURE_STREAM, CONTROLQ, EVENTQ, PLAYBACK_STREAM, RXQ, Sound, TXQ};
pub use request::{MAX_XFER_BYTES, RequestError};
pub use sink::{CHANNELS, FRAME_BYTES, PcmChunk, SAMPLE_RATE, SndMetrics, SoundHandle};
