//! Control channel messages: the handshake, keep-alive, layout, frame acks, stats, goodbye.
//!
//! The control channel is the first bidirectional stream; both directions carry
//! [`ControlMessage`]. Which side may send what is a matter of the session state (the
//! handshake accepts only `Hello` first, and so on), not of the encoding: one enum keeps the
//! decoder the same on both ends.

use super::codec::{Put, Reader};
use super::{
    Channel, ChannelMessage, MAX_DIMENSION, MAX_MONITORS, MAX_NAME_LEN, MAX_TEXT_LEN, MAX_TICKET_LEN, Side,
    types,
};
use crate::handshake::Capabilities;

/// Client → server, the first message of a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// Lowest protocol version the client speaks.
    pub version_min: u16,
    /// Highest protocol version the client speaks (≥ `version_min`).
    pub version_max: u16,
    /// What the client can do.
    pub capabilities: Capabilities,
    /// The one-time connection ticket (`pt1.…`) from the connection file.
    pub ticket: String,
    /// Free text for logs and the admin console (e.g. "pleiades-client 0.3 on fedora-laptop").
    pub client_name: String,
}

/// Server → client: the session is open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Welcome {
    /// The version both sides now speak.
    pub version: u16,
    /// The capabilities both sides have (a subset of what the client offered).
    pub capabilities: Capabilities,
    /// Identifies the session in logs on both sides.
    pub session_id: u64,
    pub server_name: String,
}

/// Server → client: the session is refused; the server closes the connection after sending it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub code: RefuseCode,
    /// Human-readable detail, for logs and the user.
    pub message: String,
}

/// Why a session was refused. Unknown codes from a newer peer decode as [`RefuseCode::Other`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RefuseCode {
    /// The ticket does not parse or its signature does not verify.
    BadTicket,
    /// The ticket's lifetime is over (or has not begun).
    ExpiredTicket,
    /// The ticket was already used: tickets are one-time.
    ReusedTicket,
    /// The ticket is for another desktop or host.
    WrongDesktop,
    /// No protocol version in common.
    UnsupportedVersion,
    /// The desktop has a session that may not be taken over, or the host is at capacity.
    Busy,
    /// The server failed; retrying later may help.
    Internal,
    /// The client broke the protocol (the first message was not a `Hello`).
    Protocol,
    /// A code this version does not know.
    Other(u16),
}

impl RefuseCode {
    pub fn to_u16(self) -> u16 {
        match self {
            RefuseCode::BadTicket => 1,
            RefuseCode::ExpiredTicket => 2,
            RefuseCode::ReusedTicket => 3,
            RefuseCode::WrongDesktop => 4,
            RefuseCode::UnsupportedVersion => 5,
            RefuseCode::Busy => 6,
            RefuseCode::Internal => 7,
            RefuseCode::Protocol => 8,
            RefuseCode::Other(code) => code,
        }
    }

    pub fn from_u16(code: u16) -> Self {
        match code {
            1 => RefuseCode::BadTicket,
            2 => RefuseCode::ExpiredTicket,
            3 => RefuseCode::ReusedTicket,
            4 => RefuseCode::WrongDesktop,
            5 => RefuseCode::UnsupportedVersion,
            6 => RefuseCode::Busy,
            7 => RefuseCode::Internal,
            8 => RefuseCode::Protocol,
            other => RefuseCode::Other(other),
        }
    }
}

/// Either side: a keep-alive and RTT probe. The receiver answers with a [`Pong`] carrying the
/// same fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ping {
    pub nonce: u64,
    /// The sender's clock (µs); only the sender interprets it.
    pub sent_us: u64,
}

/// The answer to a [`Ping`], echoing its fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pong {
    pub nonce: u64,
    pub sent_us: u64,
}

/// One monitor (a scanout of the guest's GPU) in the desktop's coordinate space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Monitor {
    /// The scanout id; display and pointer messages name it.
    pub id: u32,
    pub x: i32,
    pub y: i32,
    pub width: u32,
    pub height: u32,
}

/// A size the client asks for one monitor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MonitorSize {
    pub width: u32,
    pub height: u32,
}

/// Client → server: "I received and decoded this frame"; drives the server's pacing
/// ([`crate::pacing::FramePacer`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameAck {
    pub frame_id: u64,
    pub scanout: u32,
    /// Client clock (µs) when the frame's last byte arrived.
    pub received_us: u64,
    /// Client clock (µs) when the frame was decoded and presented (≥ `received_us`). Only the
    /// difference is meaningful to the server: it is subtracted from the RTT sample.
    pub decoded_us: u64,
}

/// Client → server, periodically (about once a second): what the client saw, for the
/// server's logs, metrics and adaptation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ClientStats {
    /// Length of the interval these counts cover (µs).
    pub interval_us: u32,
    pub frames_presented: u32,
    /// Frames received but not presented (late, superseded, or failed to decode).
    pub frames_dropped: u32,
    pub bytes_received: u64,
    /// Mean time from a frame's last byte to its presentation (µs).
    pub decode_us_mean: u32,
    /// The client's smoothed RTT from its own pings (µs), 0 if unknown.
    pub rtt_us: u32,
}

/// Either side: the session ends; the sender closes the connection after sending it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Goodbye {
    pub reason: GoodbyeReason,
    /// Human-readable detail, may be empty.
    pub message: String,
}

/// Why a session ended. Unknown reasons from a newer peer decode as [`GoodbyeReason::Other`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GoodbyeReason {
    /// The user closed the client.
    Disconnect,
    /// The desktop is shutting down or rebooting.
    Shutdown,
    /// The session was idle too long.
    Idle,
    /// Another client took over this desktop's session.
    Replaced,
    /// An administrator ended the session.
    Admin,
    /// The sender hit an error it cannot recover from.
    Error,
    Other(u16),
}

impl GoodbyeReason {
    pub fn to_u16(self) -> u16 {
        match self {
            GoodbyeReason::Disconnect => 0,
            GoodbyeReason::Shutdown => 1,
            GoodbyeReason::Idle => 2,
            GoodbyeReason::Replaced => 3,
            GoodbyeReason::Admin => 4,
            GoodbyeReason::Error => 5,
            GoodbyeReason::Other(code) => code,
        }
    }

    pub fn from_u16(code: u16) -> Self {
        match code {
            0 => GoodbyeReason::Disconnect,
            1 => GoodbyeReason::Shutdown,
            2 => GoodbyeReason::Idle,
            3 => GoodbyeReason::Replaced,
            4 => GoodbyeReason::Admin,
            5 => GoodbyeReason::Error,
            other => GoodbyeReason::Other(other),
        }
    }
}

/// Server → client: a one-time token to resume this session on a new connection. It goes in
/// `Hello.ticket` instead of a ticket; each new token replaces the previous one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResumeToken {
    /// `pr1.…`, at most 2048 bytes; secret.
    pub token: String,
    /// Seconds the token stays valid after the connection that received it is lost.
    pub lifetime_s: u32,
}

/// Everything the control channel carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlMessage {
    Hello(Hello),
    Welcome(Welcome),
    Refused(Refused),
    Ping(Ping),
    Pong(Pong),
    /// Server → client: the guest's monitors (sent after `Welcome` and on every change).
    DisplayLayout(Vec<Monitor>),
    /// Client → server: resize the guest's monitors to these sizes (the client's windows).
    RequestLayout(Vec<MonitorSize>),
    ClientStats(ClientStats),
    Goodbye(Goodbye),
    FrameAck(FrameAck),
    /// Server → client, with `RESUME`: the token that lets this client resume the session after
    /// losing its connection (docs/protocol.md, "Resuming").
    ResumeToken(ResumeToken),
}

impl ControlMessage {
    /// Whether `side` may send this message. A receiver ends the session (error code
    /// `PROTOCOL_VIOLATION`) on a message the other side may not send, e.g. a `Welcome` from a
    /// client.
    pub fn may_be_sent_by(&self, side: Side) -> bool {
        match self {
            ControlMessage::Hello(_)
            | ControlMessage::RequestLayout(_)
            | ControlMessage::ClientStats(_)
            | ControlMessage::FrameAck(_) => side == Side::Client,
            ControlMessage::Welcome(_)
            | ControlMessage::Refused(_)
            | ControlMessage::DisplayLayout(_)
            | ControlMessage::ResumeToken(_) => side == Side::Server,
            ControlMessage::Ping(_) | ControlMessage::Pong(_) | ControlMessage::Goodbye(_) => true,
        }
    }

    /// Whether this message belongs to the handshake (`Hello`, `Welcome`, `Refused`): after the
    /// handshake, receiving one is a protocol violation.
    pub fn is_handshake(&self) -> bool {
        matches!(self, ControlMessage::Hello(_) | ControlMessage::Welcome(_) | ControlMessage::Refused(_))
    }
}

fn check_monitor_count(count: usize) -> Result<(), &'static str> {
    if count == 0 || count > MAX_MONITORS { Err("monitor count is not within 1..=16") } else { Ok(()) }
}

fn check_size(width: u32, height: u32) -> Result<(), &'static str> {
    if width == 0 || height == 0 || width > MAX_DIMENSION || height > MAX_DIMENSION {
        Err("monitor size is not within 1..=16384")
    } else {
        Ok(())
    }
}

impl ChannelMessage for ControlMessage {
    const CHANNEL: Channel = Channel::Control;

    fn message_type(&self) -> u16 {
        match self {
            ControlMessage::Hello(_) => types::HELLO,
            ControlMessage::Welcome(_) => types::WELCOME,
            ControlMessage::Refused(_) => types::REFUSED,
            ControlMessage::Ping(_) => types::PING,
            ControlMessage::Pong(_) => types::PONG,
            ControlMessage::DisplayLayout(_) => types::DISPLAY_LAYOUT,
            ControlMessage::RequestLayout(_) => types::REQUEST_LAYOUT,
            ControlMessage::ClientStats(_) => types::CLIENT_STATS,
            ControlMessage::Goodbye(_) => types::GOODBYE,
            ControlMessage::FrameAck(_) => types::FRAME_ACK,
            ControlMessage::ResumeToken(_) => types::RESUME_TOKEN,
        }
    }

    fn validate(&self) -> Result<(), &'static str> {
        match self {
            ControlMessage::Hello(h) => {
                if h.version_min > h.version_max {
                    return Err("version_min is above version_max");
                }
                if h.ticket.len() > MAX_TICKET_LEN {
                    return Err("ticket longer than 2048 bytes");
                }
                if h.client_name.len() > MAX_NAME_LEN {
                    return Err("client name longer than 255 bytes");
                }
            }
            ControlMessage::Welcome(w) => {
                if w.server_name.len() > MAX_NAME_LEN {
                    return Err("server name longer than 255 bytes");
                }
            }
            ControlMessage::Refused(Refused { message, code }) => {
                if message.len() > MAX_TEXT_LEN {
                    return Err("message text longer than 1024 bytes");
                }
                if RefuseCode::from_u16(code.to_u16()) != *code {
                    return Err("RefuseCode::Other holds a code that has a name");
                }
            }
            ControlMessage::Goodbye(Goodbye { message, reason }) => {
                if message.len() > MAX_TEXT_LEN {
                    return Err("message text longer than 1024 bytes");
                }
                if GoodbyeReason::from_u16(reason.to_u16()) != *reason {
                    return Err("GoodbyeReason::Other holds a reason that has a name");
                }
            }
            ControlMessage::DisplayLayout(monitors) => {
                check_monitor_count(monitors.len())?;
                for (i, m) in monitors.iter().enumerate() {
                    check_size(m.width, m.height)?;
                    if monitors[..i].iter().any(|other| other.id == m.id) {
                        return Err("two monitors have the same id");
                    }
                }
            }
            ControlMessage::RequestLayout(sizes) => {
                check_monitor_count(sizes.len())?;
                for s in sizes {
                    check_size(s.width, s.height)?;
                }
            }
            ControlMessage::FrameAck(a) => {
                if a.decoded_us < a.received_us {
                    return Err("frame decoded before it was received");
                }
            }
            ControlMessage::ResumeToken(t) => {
                if t.token.is_empty() || t.token.len() > MAX_TICKET_LEN {
                    return Err("resume token empty or longer than 2048 bytes");
                }
            }
            ControlMessage::Ping(_) | ControlMessage::Pong(_) | ControlMessage::ClientStats(_) => {}
        }
        Ok(())
    }

    fn encode_fields(&self, out: &mut Vec<u8>) {
        match self {
            ControlMessage::Hello(h) => {
                out.put_u16(h.version_min);
                out.put_u16(h.version_max);
                out.put_u64(h.capabilities.bits());
                out.put_str(&h.ticket);
                out.put_str(&h.client_name);
            }
            ControlMessage::Welcome(w) => {
                out.put_u16(w.version);
                out.put_u64(w.capabilities.bits());
                out.put_u64(w.session_id);
                out.put_str(&w.server_name);
            }
            ControlMessage::Refused(r) => {
                out.put_u16(r.code.to_u16());
                out.put_str(&r.message);
            }
            ControlMessage::Ping(Ping { nonce, sent_us }) | ControlMessage::Pong(Pong { nonce, sent_us }) => {
                out.put_u64(*nonce);
                out.put_u64(*sent_us);
            }
            ControlMessage::DisplayLayout(monitors) => {
                out.put_u8(monitors.len().min(usize::from(u8::MAX)) as u8);
                for m in monitors {
                    out.put_u32(m.id);
                    out.put_i32(m.x);
                    out.put_i32(m.y);
                    out.put_u32(m.width);
                    out.put_u32(m.height);
                }
            }
            ControlMessage::RequestLayout(sizes) => {
                out.put_u8(sizes.len().min(usize::from(u8::MAX)) as u8);
                for s in sizes {
                    out.put_u32(s.width);
                    out.put_u32(s.height);
                }
            }
            ControlMessage::ClientStats(s) => {
                out.put_u32(s.interval_us);
                out.put_u32(s.frames_presented);
                out.put_u32(s.frames_dropped);
                out.put_u64(s.bytes_received);
                out.put_u32(s.decode_us_mean);
                out.put_u32(s.rtt_us);
            }
            ControlMessage::Goodbye(g) => {
                out.put_u16(g.reason.to_u16());
                out.put_str(&g.message);
            }
            ControlMessage::FrameAck(a) => {
                out.put_u64(a.frame_id);
                out.put_u32(a.scanout);
                out.put_u64(a.received_us);
                out.put_u64(a.decoded_us);
            }
            ControlMessage::ResumeToken(t) => {
                out.put_str(&t.token);
                out.put_u32(t.lifetime_s);
            }
        }
    }

    fn decode_body(ty: u16, r: &mut Reader<'_>) -> Result<Option<Self>, &'static str> {
        let message = match ty {
            types::HELLO => ControlMessage::Hello(Hello {
                version_min: r.u16()?,
                version_max: r.u16()?,
                capabilities: Capabilities::from_bits(r.u64()?),
                ticket: r.string(MAX_TICKET_LEN)?,
                client_name: r.string(MAX_NAME_LEN)?,
            }),
            types::WELCOME => ControlMessage::Welcome(Welcome {
                version: r.u16()?,
                capabilities: Capabilities::from_bits(r.u64()?),
                session_id: r.u64()?,
                server_name: r.string(MAX_NAME_LEN)?,
            }),
            types::REFUSED => ControlMessage::Refused(Refused {
                code: RefuseCode::from_u16(r.u16()?),
                message: r.string(MAX_TEXT_LEN)?,
            }),
            types::PING => ControlMessage::Ping(Ping { nonce: r.u64()?, sent_us: r.u64()? }),
            types::PONG => ControlMessage::Pong(Pong { nonce: r.u64()?, sent_us: r.u64()? }),
            types::DISPLAY_LAYOUT => {
                let count = usize::from(r.u8()?);
                check_monitor_count(count)?;
                let mut monitors = Vec::with_capacity(count);
                for _ in 0..count {
                    monitors.push(Monitor {
                        id: r.u32()?,
                        x: r.i32()?,
                        y: r.i32()?,
                        width: r.u32()?,
                        height: r.u32()?,
                    });
                }
                ControlMessage::DisplayLayout(monitors)
            }
            types::REQUEST_LAYOUT => {
                let count = usize::from(r.u8()?);
                check_monitor_count(count)?;
                let mut sizes = Vec::with_capacity(count);
                for _ in 0..count {
                    sizes.push(MonitorSize { width: r.u32()?, height: r.u32()? });
                }
                ControlMessage::RequestLayout(sizes)
            }
            types::CLIENT_STATS => ControlMessage::ClientStats(ClientStats {
                interval_us: r.u32()?,
                frames_presented: r.u32()?,
                frames_dropped: r.u32()?,
                bytes_received: r.u64()?,
                decode_us_mean: r.u32()?,
                rtt_us: r.u32()?,
            }),
            types::GOODBYE => ControlMessage::Goodbye(Goodbye {
                reason: GoodbyeReason::from_u16(r.u16()?),
                message: r.string(MAX_TEXT_LEN)?,
            }),
            types::FRAME_ACK => ControlMessage::FrameAck(FrameAck {
                frame_id: r.u64()?,
                scanout: r.u32()?,
                received_us: r.u64()?,
                decoded_us: r.u64()?,
            }),
            types::RESUME_TOKEN => ControlMessage::ResumeToken(ResumeToken {
                token: r.string(MAX_TICKET_LEN)?,
                lifetime_s: r.u32()?,
            }),
            _ => return Ok(None),
        };
        Ok(Some(message))
    }
}
