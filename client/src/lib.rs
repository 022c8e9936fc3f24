//! The Pleiades thin client (`pleiades`): windowed, or headless for tests and benchmarks.
//!
//! A thin I/O shell around the sans-IO `pleiades-protocol` crate, as docs/protocol.md expects:
//!
//! - [`connect`]: connection file or URI, QUIC with the server's certificate pinned.
//! - [`session`]: the handshake and one task per stream; input API; events.
//! - [`display`]: framebuffers per scanout, tiles and H.264 applied, per-frame stats (sans-IO).
//! - [`recorder`]: the headless recorder behind `pleiades connect --headless --record DIR`.
//! - [`script`] and [`keymap`]: the recorder's input script.
//! - [`audio`]: playback through the jitter buffer and Opus (WAV when headless), the microphone.
//! - [`clipboard`]: this machine's X clipboard shared with the desktop's, lazily, both ways.
//! - [`files`]: files sent into the desktop's Downloads, resumable (`pleiades send`, drops).
//! - [`usb`]: USB devices to redirect: the device trait, the emulated USB stick.
//! - [`window`]: the windowed client (winit + wgpu): windows per monitor, input, reconnect.
//! - [`clock`]: `CLOCK_MONOTONIC` µs, the clock the server stamps frames with.
//!
//! Guide: docs/client.md.

pub mod audio;
pub mod clipboard;
pub mod clock;
pub mod connect;
pub mod display;
pub mod error;
pub mod files;
pub mod keymap;
pub mod recorder;
pub mod script;
pub mod session;
pub mod usb;
pub mod window;

pub use error::ClientError;
