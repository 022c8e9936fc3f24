//! The session handshake: one `Hello`, one `Welcome` or `Refused`.
//!
//! ```text
//! client                                   server
//!   │ opens the control stream (bidi #0)     │
//!   │ ── Hello{versions, caps, ticket} ────▶ │ version check, then ticket check (one-time)
//!   │ ◀──────── Welcome{version, caps, id} ─ │ session open: both sides open their streams
//!   │ ◀──────── Refused{code, message} ───── │ …or refused: the server closes the connection
//! ```
//!
//! [`ClientHandshake`] builds the `Hello` and judges the answer; [`ServerHandshake`] answers a
//! `Hello` using a caller-supplied [`TicketCheck`] (on a host: [`crate::ticket::TicketVerifier`]
//! plus "is this my desktop"). Both are plain values: no I/O, no clock.
//!
//! The server checks the version before the ticket, so that a client refused for its version
//! has not spent its one-time ticket.
//!
//! Timeouts are the caller's: the client gives up [`HANDSHAKE_TIMEOUT_US`] after the
//! connection is up without a `Welcome`/`Refused`; the server closes a connection whose `Hello`
//! has not arrived within the same time (error code
//! [`crate::transport::error_code::HANDSHAKE_TIMEOUT`]).

use std::fmt;
use std::ops::{BitAnd, BitOr};

use crate::ticket::{TicketClaims, TicketError};
use crate::wire::{ControlMessage, Hello, MAX_NAME_LEN, MAX_TEXT_LEN, RefuseCode, Refused, Welcome};

/// The only protocol version so far.
pub const PROTOCOL_VERSION: u16 = 1;
/// Versions this implementation speaks.
pub const VERSION_MIN: u16 = 1;
pub const VERSION_MAX: u16 = 1;

/// How long either side waits for the other's handshake message (µs).
pub const HANDSHAKE_TIMEOUT_US: u64 = 10_000_000;

/// A set of optional features. A session has the intersection of what both sides offered; a
/// bit this version does not know is simply never in the intersection.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Capabilities(u64);

impl Capabilities {
    /// `Tile` with `TileData::Zstd`.
    pub const ZSTD_TILES: Self = Self(1 << 0);
    /// `Video` (H.264) updates.
    pub const H264: Self = Self(1 << 1);
    /// The cursor channel: the client draws the cursor. Without it the server draws the cursor
    /// into the frames.
    pub const CURSOR_CHANNEL: Self = Self(1 << 2);
    /// Cursor positions as QUIC datagrams (else on the cursor stream).
    pub const CURSOR_DATAGRAMS: Self = Self(1 << 3);
    /// The guest follows `RequestLayout` (resize-to-window).
    pub const DYNAMIC_LAYOUT: Self = Self(1 << 4);
    /// The audio channel: Opus playback and microphone datagrams (channel 4).
    pub const AUDIO: Self = Self(1 << 5);
    /// The USB channel (5): the client redirects its USB devices into the desktop, as the
    /// desktop's pool allows.
    pub const USB: Self = Self(1 << 6);
    /// The clipboard channel (6): lazy clipboard sharing both ways, as the desktop's pool allows.
    pub const CLIPBOARD: Self = Self(1 << 7);
    /// The server sends `ResumeToken`s; the client may resume the session with one after losing
    /// its connection.
    pub const RESUME: Self = Self(1 << 8);
    /// The server's VM has a mouse: the client may send `PointerRel` (relative motion).
    pub const RELATIVE_POINTER: Self = Self(1 << 9);
    /// The files channel (8): the client sends files into the guest user's Downloads, as the
    /// desktop's pool allows.
    pub const FILES: Self = Self(1 << 10);
    /// Display `Copy` updates: the server sends a scroll or a move as "copy these pixels"
    /// plus what it exposed.
    pub const COPY_RECT: Self = Self(1 << 11);
    /// `Tile` with `TileData::Palette`: text and UI as a few colours and small indices.
    pub const PALETTE_TILES: Self = Self(1 << 12);
    /// A `Video` picture may be smaller than its region: the client scales it up to fill it
    /// ([`crate::wire::scale`]). A server on a CPU budget encodes a busy region smaller.
    pub const SCALED_VIDEO: Self = Self(1 << 13);

    /// Every capability this version implements.
    pub const SUPPORTED: Self = Self(
        Self::ZSTD_TILES.0
            | Self::H264.0
            | Self::CURSOR_CHANNEL.0
            | Self::CURSOR_DATAGRAMS.0
            | Self::DYNAMIC_LAYOUT.0
            | Self::AUDIO.0
            | Self::CLIPBOARD.0
            | Self::RESUME.0
            | Self::RELATIVE_POINTER.0
            | Self::FILES.0
            | Self::COPY_RECT.0
            | Self::PALETTE_TILES.0
            | Self::SCALED_VIDEO.0
            | Self::USB.0,
    );

    pub const fn empty() -> Self {
        Self(0)
    }

    pub const fn from_bits(bits: u64) -> Self {
        Self(bits)
    }

    pub const fn bits(self) -> u64 {
        self.0
    }

    pub const fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }

    pub const fn intersection(self, other: Self) -> Self {
        Self(self.0 & other.0)
    }

    /// The capabilities in `self` but not in `other`.
    pub const fn difference(self, other: Self) -> Self {
        Self(self.0 & !other.0)
    }
}

impl BitOr for Capabilities {
    type Output = Self;
    fn bitor(self, rhs: Self) -> Self {
        Self(self.0 | rhs.0)
    }
}

impl BitAnd for Capabilities {
    type Output = Self;
    fn bitand(self, rhs: Self) -> Self {
        Self(self.0 & rhs.0)
    }
}

impl fmt::Debug for Capabilities {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const NAMES: [(Capabilities, &str); 14] = [
            (Capabilities::ZSTD_TILES, "ZSTD_TILES"),
            (Capabilities::H264, "H264"),
            (Capabilities::CURSOR_CHANNEL, "CURSOR_CHANNEL"),
            (Capabilities::CURSOR_DATAGRAMS, "CURSOR_DATAGRAMS"),
            (Capabilities::DYNAMIC_LAYOUT, "DYNAMIC_LAYOUT"),
            (Capabilities::AUDIO, "AUDIO"),
            (Capabilities::USB, "USB"),
            (Capabilities::CLIPBOARD, "CLIPBOARD"),
            (Capabilities::RESUME, "RESUME"),
            (Capabilities::RELATIVE_POINTER, "RELATIVE_POINTER"),
            (Capabilities::FILES, "FILES"),
            (Capabilities::COPY_RECT, "COPY_RECT"),
            (Capabilities::PALETTE_TILES, "PALETTE_TILES"),
            (Capabilities::SCALED_VIDEO, "SCALED_VIDEO"),
        ];
        let mut set = f.debug_set();
        let mut rest = self.0;
        for (cap, name) in NAMES {
            if self.contains(cap) {
                set.entry(&format_args!("{name}"));
                rest &= !cap.0;
            }
        }
        if rest != 0 {
            set.entry(&format_args!("{rest:#x}"));
        }
        set.finish()
    }
}

/// What both sides agreed on; the same value on both ends of a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub version: u16,
    pub capabilities: Capabilities,
    pub session_id: u64,
    /// The peer's name (the server's on the client, the client's on the server).
    pub peer_name: String,
}

/// A refusal: the code and the text sent to the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub code: RefuseCode,
    pub message: String,
}

impl Refusal {
    pub fn new(code: RefuseCode, message: impl Into<String>) -> Self {
        Self { code, message: message.into() }
    }

    fn into_message(mut self) -> Refused {
        truncate_utf8(&mut self.message, MAX_TEXT_LEN);
        Refused { code: self.code, message: self.message }
    }
}

/// A ticket error as the client should see it. The message says what was wrong with the
/// ticket, never anything about the host's keys.
impl From<TicketError> for Refusal {
    fn from(error: TicketError) -> Self {
        let code = match error {
            TicketError::Malformed(_)
            | TicketError::BadSignature
            | TicketError::LifetimeTooLong
            | TicketError::FieldTooLong => RefuseCode::BadTicket,
            // A ticket for the desktop's earlier start: as good as expired (the portal gives
            // a new one).
            TicketError::Expired | TicketError::NotYetValid | TicketError::WrongGeneration => {
                RefuseCode::ExpiredTicket
            }
            TicketError::Replayed => RefuseCode::ReusedTicket,
            TicketError::WrongHost => RefuseCode::WrongDesktop,
            TicketError::BadKey | TicketError::Rng => RefuseCode::Internal,
        };
        Refusal::new(code, error.to_string())
    }
}

/// Checks a `Hello`'s ticket. Implemented for closures
/// `FnMut(&str) -> Result<TicketClaims, Refusal>`.
pub trait TicketCheck {
    fn check(&mut self, ticket: &str) -> Result<TicketClaims, Refusal>;
}

impl<F: FnMut(&str) -> Result<TicketClaims, Refusal>> TicketCheck for F {
    fn check(&mut self, ticket: &str) -> Result<TicketClaims, Refusal> {
        self(ticket)
    }
}

/// Why the client's handshake failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    #[error("the server refused the session ({code:?}): {message}")]
    Refused { code: RefuseCode, message: String },
    #[error("the server chose protocol version {chosen}, outside the offered {min}..={max}")]
    VersionNotOffered { chosen: u16, min: u16, max: u16 },
    #[error("the server enabled capabilities the client did not offer: {extra:?}")]
    CapabilitiesNotOffered { extra: Capabilities },
    #[error("expected Welcome or Refused, got message type {ty:#06x}")]
    UnexpectedMessage { ty: u16 },
    #[error("the handshake is already over")]
    AlreadyDone,
}

impl HandshakeError {
    /// The QUIC application error code to close the connection with.
    pub fn error_code(&self) -> u32 {
        use crate::transport::error_code;
        match self {
            HandshakeError::Refused { .. } => error_code::REFUSED,
            _ => error_code::PROTOCOL_VIOLATION,
        }
    }
}

/// The client's side: send [`Self::hello`] first on the control stream, then feed every control
/// message to [`Self::on_message`] until it returns the session or an error.
#[derive(Debug)]
pub struct ClientHandshake {
    hello: Hello,
    done: bool,
}

impl ClientHandshake {
    /// A handshake offering this implementation's versions. `client_name` is cut to
    /// [`MAX_NAME_LEN`] bytes.
    pub fn new(ticket: &str, client_name: &str, capabilities: Capabilities) -> Self {
        let mut client_name = client_name.to_owned();
        truncate_utf8(&mut client_name, MAX_NAME_LEN);
        Self {
            hello: Hello {
                version_min: VERSION_MIN,
                version_max: VERSION_MAX,
                capabilities,
                ticket: ticket.to_owned(),
                client_name,
            },
            done: false,
        }
    }

    /// The first message to send (encode it with [`crate::wire::encode`]; a ticket over 2048
    /// bytes fails there).
    pub fn hello(&self) -> ControlMessage {
        ControlMessage::Hello(self.hello.clone())
    }

    /// Judges the server's answer. Any message but `Welcome` or `Refused` is a protocol error;
    /// so is a `Welcome` that picks a version or capabilities the client did not offer.
    pub fn on_message(&mut self, message: &ControlMessage) -> Result<Session, HandshakeError> {
        if self.done {
            return Err(HandshakeError::AlreadyDone);
        }
        self.done = true;
        match message {
            ControlMessage::Welcome(w) => {
                let (min, max) = (self.hello.version_min, self.hello.version_max);
                if w.version < min || w.version > max {
                    return Err(HandshakeError::VersionNotOffered { chosen: w.version, min, max });
                }
                let extra = w.capabilities.difference(self.hello.capabilities);
                if extra != Capabilities::empty() {
                    return Err(HandshakeError::CapabilitiesNotOffered { extra });
                }
                Ok(Session {
                    version: w.version,
                    capabilities: w.capabilities,
                    session_id: w.session_id,
                    peer_name: w.server_name.clone(),
                })
            }
            ControlMessage::Refused(r) => {
                Err(HandshakeError::Refused { code: r.code, message: r.message.clone() })
            }
            other => Err(HandshakeError::UnexpectedMessage {
                ty: crate::wire::ChannelMessage::message_type(other),
            }),
        }
    }
}

/// The server's answer to the first control message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerOutcome {
    /// Send `reply` (a `Welcome`); the session is open.
    Accept { reply: ControlMessage, session: Session, claims: TicketClaims },
    /// Send `reply` (a `Refused`), then close the connection with
    /// [`crate::transport::error_code::REFUSED`].
    Refuse { reply: ControlMessage, code: RefuseCode },
}

/// The server's side: what it offers and what it calls itself.
#[derive(Debug, Clone)]
pub struct ServerHandshake {
    pub server_name: String,
    pub capabilities: Capabilities,
    pub version_min: u16,
    pub version_max: u16,
}

impl ServerHandshake {
    /// A server speaking this implementation's versions.
    pub fn new(server_name: &str, capabilities: Capabilities) -> Self {
        let mut server_name = server_name.to_owned();
        truncate_utf8(&mut server_name, MAX_NAME_LEN);
        Self { server_name, capabilities, version_min: VERSION_MIN, version_max: VERSION_MAX }
    }

    /// Answers the client's first control message. `session_id` is the caller's (random or
    /// counted: this crate has no randomness); `check` runs only when a version is in common.
    pub fn on_first_message(
        &self,
        message: &ControlMessage,
        session_id: u64,
        mut check: impl TicketCheck,
    ) -> ServerOutcome {
        let refuse = |refusal: Refusal| ServerOutcome::Refuse {
            code: refusal.code,
            reply: ControlMessage::Refused(refusal.into_message()),
        };
        let ControlMessage::Hello(hello) = message else {
            return refuse(Refusal::new(RefuseCode::Protocol, "the first message must be Hello"));
        };
        let Some(version) =
            negotiate_version((hello.version_min, hello.version_max), (self.version_min, self.version_max))
        else {
            return refuse(Refusal::new(
                RefuseCode::UnsupportedVersion,
                format!(
                    "client speaks versions {}..={}, this server {}..={}",
                    hello.version_min, hello.version_max, self.version_min, self.version_max
                ),
            ));
        };
        let claims = match check.check(&hello.ticket) {
            Ok(claims) => claims,
            Err(refusal) => return refuse(refusal),
        };
        let capabilities = hello.capabilities & self.capabilities;
        let welcome = Welcome { version, capabilities, session_id, server_name: self.server_name.clone() };
        ServerOutcome::Accept {
            reply: ControlMessage::Welcome(welcome),
            session: Session { version, capabilities, session_id, peer_name: hello.client_name.clone() },
            claims,
        }
    }
}

/// The highest version in both ranges, if any.
pub fn negotiate_version(client: (u16, u16), server: (u16, u16)) -> Option<u16> {
    let low = client.0.max(server.0);
    let high = client.1.min(server.1);
    (low <= high).then_some(high)
}

/// Cuts `text` to at most `max` bytes on a character boundary.
fn truncate_utf8(text: &mut String, max: usize) {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ticket::{TicketSigner, TicketVerifier};
    use crate::wire::{Ping, encode_to_vec};
    use proptest::prelude::*;

    fn claims() -> TicketClaims {
        TicketClaims {
            id: [7; 16],
            user: "alice".into(),
            desktop: "d-1".into(),
            host: "host-a".into(),
            issued_at: 0,
            expires_at: 60,
            generation: None,
        }
    }

    fn accept_all(_: &str) -> Result<TicketClaims, Refusal> {
        Ok(claims())
    }

    #[test]
    fn accepted_session_agrees_on_both_sides() {
        // A bit this version does not know is dropped.
        let client_caps =
            Capabilities::ZSTD_TILES | Capabilities::CURSOR_CHANNEL | Capabilities::from_bits(1 << 40);
        let mut client = ClientHandshake::new("pt1.x", "laptop", client_caps);
        let server = ServerHandshake::new("host-a", Capabilities::SUPPORTED);
        let ServerOutcome::Accept { reply, session, claims: got } =
            server.on_first_message(&client.hello(), 42, accept_all)
        else {
            panic!("refused");
        };
        assert_eq!(got, claims());
        assert_eq!(session.capabilities, Capabilities::ZSTD_TILES | Capabilities::CURSOR_CHANNEL);
        assert_eq!(session.peer_name, "laptop");
        let client_session = client.on_message(&reply).unwrap();
        assert_eq!(client_session.version, PROTOCOL_VERSION);
        assert_eq!(client_session.capabilities, session.capabilities);
        assert_eq!(client_session.session_id, 42);
        assert_eq!(client_session.peer_name, "host-a");
        assert_eq!(client.on_message(&reply), Err(HandshakeError::AlreadyDone));
        encode_to_vec(&reply).unwrap();
    }

    #[test]
    fn real_tickets_are_one_time() {
        let signer = TicketSigner::from_pkcs8(&TicketSigner::generate_pkcs8().unwrap()).unwrap();
        let ticket = signer.issue(&TicketClaims::new("alice", "d-1", "host-a", 1_000, 60).unwrap()).unwrap();
        let mut verifier = TicketVerifier::new(signer.public_key(), "host-a");
        let server = ServerHandshake::new("host-a", Capabilities::SUPPORTED);
        let hello = ClientHandshake::new(&ticket, "c", Capabilities::empty()).hello();
        let mut check = |t: &str| verifier.verify(t, 1_010).map_err(Refusal::from);
        assert!(matches!(server.on_first_message(&hello, 1, &mut check), ServerOutcome::Accept { .. }));
        let ServerOutcome::Refuse { reply, code } = server.on_first_message(&hello, 2, &mut check) else {
            panic!("accepted twice");
        };
        assert_eq!(code, RefuseCode::ReusedTicket);
        let mut client = ClientHandshake::new(&ticket, "c", Capabilities::empty());
        assert!(matches!(
            client.on_message(&reply),
            Err(HandshakeError::Refused { code: RefuseCode::ReusedTicket, .. })
        ));
    }

    #[test]
    fn version_is_checked_before_the_ticket() {
        let server = ServerHandshake::new("h", Capabilities::SUPPORTED);
        let mut hello = ClientHandshake::new("t", "c", Capabilities::empty()).hello();
        if let ControlMessage::Hello(h) = &mut hello {
            h.version_min = 2;
            h.version_max = 5;
        }
        let mut checked = false;
        let outcome = server.on_first_message(&hello, 1, |_: &str| {
            checked = true;
            Ok(claims())
        });
        assert!(matches!(outcome, ServerOutcome::Refuse { code: RefuseCode::UnsupportedVersion, .. }));
        assert!(!checked, "a refused version must not spend the ticket");
    }

    #[test]
    fn first_message_must_be_hello() {
        let server = ServerHandshake::new("h", Capabilities::SUPPORTED);
        let ping = ControlMessage::Ping(Ping { nonce: 1, sent_us: 2 });
        assert!(matches!(
            server.on_first_message(&ping, 1, accept_all),
            ServerOutcome::Refuse { code: RefuseCode::Protocol, .. }
        ));
        let mut client = ClientHandshake::new("t", "c", Capabilities::empty());
        assert_eq!(client.on_message(&ping), Err(HandshakeError::UnexpectedMessage { ty: 0x0004 }));
    }

    #[test]
    fn client_rejects_a_welcome_it_did_not_ask_for() {
        let welcome = |version, capabilities| {
            ControlMessage::Welcome(Welcome { version, capabilities, session_id: 1, server_name: "h".into() })
        };
        let mut client = ClientHandshake::new("t", "c", Capabilities::H264);
        assert!(matches!(
            client.on_message(&welcome(2, Capabilities::H264)),
            Err(HandshakeError::VersionNotOffered { chosen: 2, .. })
        ));
        let mut client = ClientHandshake::new("t", "c", Capabilities::H264);
        assert_eq!(
            client.on_message(&welcome(1, Capabilities::H264 | Capabilities::USB)),
            Err(HandshakeError::CapabilitiesNotOffered { extra: Capabilities::USB })
        );
    }

    #[test]
    fn ticket_errors_map_to_refusals() {
        use crate::ticket::TicketError;
        assert_eq!(Refusal::from(TicketError::Expired).code, RefuseCode::ExpiredTicket);
        assert_eq!(Refusal::from(TicketError::Replayed).code, RefuseCode::ReusedTicket);
        assert_eq!(Refusal::from(TicketError::WrongHost).code, RefuseCode::WrongDesktop);
        assert_eq!(Refusal::from(TicketError::BadSignature).code, RefuseCode::BadTicket);
        // Long refusal texts are cut to fit the message.
        let server = ServerHandshake::new("h", Capabilities::SUPPORTED);
        let hello = ClientHandshake::new("t", "c", Capabilities::empty()).hello();
        let outcome = server
            .on_first_message(&hello, 1, |_: &str| Err(Refusal::new(RefuseCode::Busy, "é".repeat(2000))));
        let ServerOutcome::Refuse { reply, .. } = outcome else { panic!() };
        encode_to_vec(&reply).unwrap();
    }

    #[test]
    fn capabilities_debug_names_bits() {
        let caps = Capabilities::H264 | Capabilities::from_bits(1 << 40);
        assert_eq!(format!("{caps:?}"), "{H264, 0x10000000000}");
    }

    proptest! {
        #[test]
        fn negotiation_picks_the_highest_common_version(a in 0u16..8, b in 0u16..8, c in 0u16..8, d in 0u16..8) {
            let client = (a.min(b), a.max(b));
            let server = (c.min(d), c.max(d));
            let common: Vec<u16> = (0..8).filter(|v| (client.0..=client.1).contains(v)
                && (server.0..=server.1).contains(v)).collect();
            prop_assert_eq!(negotiate_version(client, server), common.last().copied());
        }

        #[test]
        fn capabilities_are_the_intersection(client in any::<u64>(), server in any::<u64>()) {
            let mut handshake = ClientHandshake::new("t", "c", Capabilities::from_bits(client));
            let outcome = ServerHandshake::new("h", Capabilities::from_bits(server))
                .on_first_message(&handshake.hello(), 9, accept_all);
            let ServerOutcome::Accept { reply, session, .. } = outcome else {
                return Err(TestCaseError::fail("refused"));
            };
            prop_assert_eq!(session.capabilities.bits(), client & server);
            prop_assert_eq!(handshake.on_message(&reply).map(|s| s.capabilities), Ok(session.capabilities));
        }
    }
}
