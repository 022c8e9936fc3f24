//! QUIC application error codes (`CONNECTION_CLOSE`, `RESET_STREAM`, `STOP_SENDING`).
//!
//! A leaf module: the wire decoders name the code their errors close a stream with, and
//! [`crate::transport`] re-exports them with the rest of the QUIC mapping.

/// Clean close (after `Goodbye`).
pub const NO_ERROR: u32 = 0;
/// The peer broke the protocol (wrong handshake message, bad `Welcome`…).
pub const PROTOCOL_VIOLATION: u32 = 1;
/// A frame header announced a body over the channel's limit.
pub const MESSAGE_TOO_LARGE: u32 = 2;
/// A message of known type did not parse or validate.
pub const MALFORMED_MESSAGE: u32 = 3;
/// A known message type arrived on another channel's stream.
pub const WRONG_CHANNEL: u32 = 4;
/// A stream ended inside a message.
pub const TRUNCATED: u32 = 5;
/// A stream or datagram named a reserved or unknown channel.
pub const UNSUPPORTED_CHANNEL: u32 = 6;
/// The server refused the session (after sending `Refused`).
pub const REFUSED: u32 = 7;
/// No `Hello` (server) or no answer (client) within the handshake timeout.
pub const HANDSHAKE_TIMEOUT: u32 = 8;
