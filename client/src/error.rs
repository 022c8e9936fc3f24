//! What can go wrong between reading a connection file and the end of a session, each worded
//! for the person who has to fix it.

use pleiades_protocol::connfile::ConnectionError;
use pleiades_protocol::control::IntentError;
use pleiades_protocol::handshake::HandshakeError;
use pleiades_protocol::wire::{Channel, GoodbyeReason, RefuseCode};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot read the connection file {path}: {error}")]
    ReadFile { path: String, error: std::io::Error },
    #[error("the connection data is not valid: {0}")]
    Connection(#[from] ConnectionError),
    #[error(
        "the connection file has no cert_sha256: refusing to connect without a pinned server certificate"
    )]
    NoPin,
    #[error("cannot resolve {host}:{port}: {error}")]
    Resolve { host: String, port: u16, error: String },
    #[error("cannot set up QUIC: {0}")]
    Setup(String),
    #[error("the server at {addr} is unreachable: {detail}")]
    Unreachable { addr: String, detail: String },
    #[error(
        "the server's certificate is not the one the connection file pins (sha256 {got}, expected {expected})"
    )]
    WrongCertificate { got: String, expected: String },
    #[error("the server refused the session: {code:?} (code {}): {message}", code.to_u16())]
    Refused { code: RefuseCode, message: String },
    #[error("no Welcome or Refused from the server within 10 s of connecting")]
    HandshakeTimeout,
    #[error("the handshake failed: {0}")]
    Handshake(HandshakeError),
    #[error("the server broke the protocol on the {channel} channel: {detail}")]
    Protocol { channel: Channel, detail: String },
    #[error("the server said goodbye ({reason:?}): {message}")]
    Goodbye { reason: GoodbyeReason, message: String },
    #[error("the connection was lost: {0}")]
    ConnectionLost(#[from] quinn::ConnectionError),
    #[error("the {channel} stream failed: {error}")]
    Stream { channel: Channel, error: String },
    #[error("the session is closed")]
    Closed,
    #[error("not sent: {0}")]
    NotSent(IntentError),
    #[error("the desktop takes no files (its host runs no guest agent for it)")]
    NoFiles,
    #[error("the session ended before the files were sent: {0} (run the same command again: it resumes)")]
    Interrupted(String),
}

impl From<IntentError> for ClientError {
    fn from(error: IntentError) -> Self {
        match error {
            IntentError::Closed => ClientError::Closed,
            other => ClientError::NotSent(other),
        }
    }
}
