//! The Pleiades wire protocol, sans-IO.
//!
//! - [`ticket`]: one-time connection tickets, signed by the broker (Ed25519) and verified by
//!   hosts with a replay cache.
//! - [`connfile`]: connection files (TOML) and `pleiades://` URIs that carry a ticket to the
//!   client.
//! - [`wire`]: the session's messages (control, input, display, cursor), their binary framing
//!   and the incremental [`wire::StreamDecoder`]. Format: `docs/protocol.md`.
//! - [`hostapi`]: the messages between `pleiades-host serve` and the broker (JSON).
//! - [`handshake`]: `Hello` → `Welcome`/`Refused`, version and capability negotiation.
//! - [`jitter`]: the audio receiver's adaptive jitter buffer (FEC, concealment, underruns).
//! - [`transport`]: how channels map onto QUIC streams and datagrams, priorities, error codes.
//! - [`keys`]: evdev key codes of a US layout (characters and key names).
//! - [`pinning`]: certificate pinning (SHA-256 of the DER certificate); the rustls verifier
//!   with the `rustls` feature.
//! - [`resume`]: one-time resume tokens that let a client get its session back after a network
//!   loss (the connection file's ticket is spent by then).
//! - [`pacing`]: frame pacing (frames in flight from the bandwidth-delay product), RTT and
//!   delivery-rate estimates.
//! - [`control`]: the control channel after the handshake as two state machines,
//!   [`control::ServerControl`] and [`control::ClientControl`]: pings and the RTT, frame acks into
//!   the pacer, layouts, resume tokens, goodbye, the direction rules.
//! - [`agent`]: the link between a VM process and its guest agent over vsock (hello and
//!   version, guest facts, session state, lock and power requests), [`agent::HostLink`] and
//!   [`agent::AgentLink`].
//! - [`clipboard`]: the VM process's clipboard relay between the session's client and the guest
//!   session, with the pool's policy ([`clipboard::ClipboardRelay`]).
//! - [`usbip`]: USB/IP, the message set of a redirected USB device, checked both ways
//!   ([`usbip::UsbipLink`]).
//! - [`files`]: the VM process's file transfer relay from the session's client to the guest,
//!   with the pool's policy and the transfer window ([`files::FileRelay`]).
//!
//! Nothing here opens a socket, starts a thread or reads a clock: time is a parameter, so every
//! piece is unit- and property-testable on plain values.
//!
//! # How a transport uses it
//!
//! The QUIC shells in host/ and client/ own the connection and the clock; per session:
//!
//! 1. Client: connect with ALPN [`transport::ALPN`] and the pinned certificate, open the first
//!    bidirectional stream, write [`handshake::ClientHandshake::hello`] (via [`wire::encode`]),
//!    decode the answer with a `StreamDecoder<ControlMessage>` and pass it to
//!    [`handshake::ClientHandshake::on_message`].
//! 2. Server: accept the first bidirectional stream, decode the first message and answer with
//!    [`handshake::ServerHandshake::on_first_message`] (its `TicketCheck` wraps
//!    [`ticket::TicketVerifier`] and the desktop check); on `Refuse`, write the reply and close
//!    with [`transport::error_code::REFUSED`].
//! 3. Both: open the unidirectional streams of the negotiated channels, each starting with
//!    [`transport::stream_prelude`], at the [`transport::priority`] of its channel; accept the
//!    peer's with [`wire::Channel::from_uni_prelude`] and one [`wire::StreamDecoder`] per stream
//!    (display messages then through [`wire::FrameSequence`]); datagrams through
//!    [`wire::decode_datagram`]. A decoder error ends its channel with
//!    [`wire::DecodeError::error_code`].
//! 4. Both: after the handshake, pump the control stream through [`control::ServerControl`] or
//!    [`control::ClientControl`]: bytes and local intents in with the time, messages to write,
//!    events and the next timer out.
//! 5. Server: send frames when [`control::ServerControl::may_send_frame`] allows (its
//!    [`pacing::FramePacer`] has the `FrameAck`s and `Pong`s), and give the encoder
//!    [`pacing::FramePacer::target_bitrate`] and [`pacing::FramePacer::target_fps`].

pub mod agent;
pub mod clipboard;
pub mod connfile;
pub mod control;
pub mod error_code;
pub mod files;
pub mod handshake;
pub mod hostapi;
pub mod jitter;
pub mod keys;
pub mod pacing;
pub mod pinning;
pub mod resume;
pub mod ticket;
pub mod transport;
pub mod usb;
pub mod usbip;
pub mod wire;
