//! The Pleiades wire protocol, sans-IO.
//!
//! - [`ticket`]: one-time connection tickets, signed by the broker (Ed25519) and verified by
//!   hosts with a replay cache.
//! - [`connfile`]: connection files (TOML) and `pleiades://` URIs that carry a ticket to the
//!   client.
//! - [`wire`]: the session's messages (control, input, display, cursor), their binary framing
//!   and the incremental [`wire::StreamDecoder`]. Format: `docs/protocol.md`.
//! - [`handshake`]: `Hello` → `Welcome`/`Refused`, version and capability negotiation.
//! - [`transport`]: how channels map onto QUIC streams and datagrams, priorities, error codes.
//! - [`pacing`]: frame pacing (about one frame in flight), RTT and delivery-rate estimates.
//!
//! Nothing here opens a socket, starts a thread or reads a clock: time is a parameter, so every
//! piece is unit- and property-testable on plain values.

pub mod connfile;
pub mod handshake;
pub mod pacing;
pub mod ticket;
pub mod transport;
pub mod wire;
