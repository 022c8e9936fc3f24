//! Display encoding: from the GPU's display sink to what goes on the wire.
//!
//! - [`tiles`]: the screen in 64x64 tiles, diffed against what the client holds, each sent as
//!   one colour, zstd or raw B, G, R, X bytes (lossless: text and static content).
//! - [`motion`]: which region is video-like (tiles changing frame after frame).
//! - [`video`]: H.264 (OpenH264) for that region.
//! - [`encoder`]: one scanout's encoder for one client, tying the three together, with the
//!   lossless refresh when motion stops.
//!
//! How much to send and how often is the connection controller's decision (bandwidth and RTT
//! estimates in `pleiades-protocol`); this module only encodes what it is told to.

pub mod encoder;
pub mod motion;
pub mod tiles;
pub mod video;

pub use encoder::{DisplayEncoder, EncodedFrame, EncoderSettings};
