//! Agent channel messages: the VM process and the guest agent (`pleiades-agent`), over the
//! guest's vsock.
//!
//! This channel never travels on a session: it is the one stream between a VM process and the
//! agent inside its guest (vsock port [`crate::agent::AGENT_PORT`]), framed like every stream
//! channel so that the same decoder, limits and fuzz target serve it. The link's state machine
//! (version negotiation, which side may send what) is [`crate::agent`]; the byte layouts are in
//! `docs/protocol.md`, "The agent channel".

use super::codec::{Put, Reader};
use super::{Channel, ChannelMessage, ClipboardMessage, FileMessage, UsbSpeed, types};

/// Longest host name, OS name, kernel release or user name, in bytes.
pub const MAX_AGENT_TEXT: usize = 255;
/// Longest network address text (`fe80::1%eth0/64`), in bytes.
pub const MAX_ADDRESS_LEN: usize = 64;
/// Most network addresses in one [`GuestInfo`].
pub const MAX_ADDRESSES: usize = 32;

/// The agent's first message: the channel versions it speaks and its own version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentHello {
    pub min_version: u16,
    pub max_version: u16,
    /// The agent's release (`pleiades-agent --version`), for the admin console.
    pub agent_version: String,
}

/// What the guest is: sent after the welcome and again whenever it changes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GuestInfo {
    pub hostname: String,
    /// The distribution's `PRETTY_NAME` (os-release).
    pub os: String,
    /// The kernel release (`uname -r`).
    pub kernel: String,
    /// The guest's addresses with prefix length (`10.0.2.15/24`), loopback left out.
    pub addresses: Vec<String>,
}

/// Who uses the guest now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum SessionActivity {
    /// Nobody is logged in to the graphical session.
    NoUser = 0,
    /// A user is logged in and the screen is unlocked.
    Active = 1,
    /// A user is logged in and the screen is locked.
    Locked = 2,
}

/// The guest's session: its user, whether it is locked, and how long since the user's last
/// input (the guest's own idle time, which the broker's idle policy uses).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionState {
    pub activity: SessionActivity,
    /// Empty when [`SessionActivity::NoUser`].
    pub user: String,
    pub idle_ms: u64,
}

/// What the host asks the guest to do with its power.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum PowerAction {
    Shutdown = 0,
    Reboot = 1,
}

/// Everything the agent channel carries; [`crate::agent`] checks the direction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentMessage {
    /// Agent → host, first.
    Hello(AgentHello),
    /// Host → agent: the version chosen, the answer to `Hello`.
    Welcome { version: u16 },
    /// Agent → host.
    GuestInfo(GuestInfo),
    /// Agent → host.
    SessionState(SessionState),
    /// Host → agent: lock the graphical session's screen (the client disconnected).
    LockScreen,
    /// Host → agent: unlock it again (a client with a ticket for this desktop, which the broker
    /// gives only to the desktop's user, connected).
    UnlockScreen,
    /// Host → agent: shut the guest down or restart it cleanly.
    Power(PowerAction),
    /// Both ways: the guest session's clipboard (the VM process relays to and from the
    /// session's client, [`crate::clipboard`]).
    Clipboard(ClipboardMessage),
    /// Both ways: files the session's client sends into the guest user's Downloads (the VM
    /// process relays and checks them, [`crate::files`]).
    Files(FileMessage),
    /// Host → agent: "connect to [`crate::agent::USB_PORT`], send `token` (8 bytes,
    /// little-endian), and attach that stream to `vhci-hcd` as device `id` at `speed`".
    UsbAttach { id: u32, token: u64, speed: UsbSpeed },
    /// Agent → host: device `id` is on the guest's virtual USB port `port`.
    UsbAttached { id: u32, port: u32 },
    /// Agent → host: device `id` could not be attached, and why (for the host's log).
    UsbFailed { id: u32, reason: String },
}

impl AgentMessage {
    /// Whether the guest agent may send this message.
    pub fn from_agent(&self) -> bool {
        matches!(
            self,
            AgentMessage::Hello(_)
                | AgentMessage::GuestInfo(_)
                | AgentMessage::SessionState(_)
                | AgentMessage::Clipboard(_)
                | AgentMessage::UsbAttached { .. }
                | AgentMessage::UsbFailed { .. }
        ) || matches!(self, AgentMessage::Files(f) if !f.from_sender())
    }

    /// Whether the host may send this message.
    pub fn from_host(&self) -> bool {
        match self {
            AgentMessage::Clipboard(_) => true,
            AgentMessage::Files(f) => f.from_sender(),
            _ => !self.from_agent(),
        }
    }
}

fn text_ok(text: &str, max: usize) -> bool {
    text.len() <= max && !text.chars().any(char::is_control)
}

impl ChannelMessage for AgentMessage {
    const CHANNEL: Channel = Channel::Agent;

    fn message_type(&self) -> u16 {
        match self {
            AgentMessage::Hello(_) => types::AGENT_HELLO,
            AgentMessage::Welcome { .. } => types::AGENT_WELCOME,
            AgentMessage::GuestInfo(_) => types::GUEST_INFO,
            AgentMessage::SessionState(_) => types::SESSION_STATE,
            AgentMessage::LockScreen => types::LOCK_SCREEN,
            AgentMessage::UnlockScreen => types::UNLOCK_SCREEN,
            AgentMessage::Power(_) => types::POWER,
            AgentMessage::Clipboard(c) => {
                types::AGENT_CLIPBOARD_GRAB + (c.message_type() - types::CLIPBOARD_GRAB)
            }
            AgentMessage::Files(f) => types::AGENT_FILE_OFFER + (f.message_type() - types::FILE_OFFER),
            AgentMessage::UsbAttach { .. } => types::AGENT_USB_ATTACH,
            AgentMessage::UsbAttached { .. } => types::AGENT_USB_ATTACHED,
            AgentMessage::UsbFailed { .. } => types::AGENT_USB_FAILED,
        }
    }

    fn validate(&self) -> Result<(), &'static str> {
        match self {
            AgentMessage::Hello(h) => {
                if h.min_version == 0 || h.min_version > h.max_version {
                    return Err("versions must satisfy 1 <= min <= max");
                }
                if !text_ok(&h.agent_version, MAX_AGENT_TEXT) {
                    return Err("agent version too long or with control characters");
                }
            }
            AgentMessage::Welcome { version } if *version == 0 => return Err("version 0 does not exist"),
            AgentMessage::GuestInfo(info) => {
                if ![&info.hostname, &info.os, &info.kernel].iter().all(|t| text_ok(t, MAX_AGENT_TEXT)) {
                    return Err("guest text too long or with control characters");
                }
                if info.addresses.len() > MAX_ADDRESSES {
                    return Err("too many addresses");
                }
                if !info.addresses.iter().all(|a| !a.is_empty() && text_ok(a, MAX_ADDRESS_LEN)) {
                    return Err("an address is empty, too long or has control characters");
                }
            }
            AgentMessage::SessionState(s) => {
                if !text_ok(&s.user, MAX_AGENT_TEXT) {
                    return Err("user name too long or with control characters");
                }
                if (s.activity == SessionActivity::NoUser) != s.user.is_empty() {
                    return Err("a user name goes with a logged-in session, and only with one");
                }
            }
            AgentMessage::Clipboard(c) => c.check()?,
            AgentMessage::Files(f) => f.check()?,
            AgentMessage::UsbFailed { reason, .. } if !text_ok(reason, MAX_AGENT_TEXT) => {
                return Err("reason too long or with control characters");
            }
            AgentMessage::UsbAttach { .. }
            | AgentMessage::UsbAttached { .. }
            | AgentMessage::UsbFailed { .. } => {}
            AgentMessage::Welcome { .. }
            | AgentMessage::LockScreen
            | AgentMessage::UnlockScreen
            | AgentMessage::Power(_) => {}
        }
        Ok(())
    }

    fn encode_fields(&self, out: &mut Vec<u8>) {
        match self {
            AgentMessage::Hello(h) => {
                out.put_u16(h.min_version);
                out.put_u16(h.max_version);
                out.put_str(&h.agent_version);
            }
            AgentMessage::Welcome { version } => out.put_u16(*version),
            AgentMessage::GuestInfo(info) => {
                out.put_str(&info.hostname);
                out.put_str(&info.os);
                out.put_str(&info.kernel);
                // Validated: at most MAX_ADDRESSES.
                out.put_u8(info.addresses.len() as u8);
                for address in &info.addresses {
                    out.put_str(address);
                }
            }
            AgentMessage::SessionState(s) => {
                out.put_u8(s.activity as u8);
                out.put_str(&s.user);
                out.put_u64(s.idle_ms);
            }
            AgentMessage::LockScreen | AgentMessage::UnlockScreen => {}
            AgentMessage::Power(action) => out.put_u8(*action as u8),
            AgentMessage::Clipboard(c) => c.put_fields(out),
            AgentMessage::Files(f) => f.put_fields(out),
            AgentMessage::UsbAttach { id, token, speed } => {
                out.put_u32(*id);
                out.put_u64(*token);
                out.put_u8(*speed as u8);
            }
            AgentMessage::UsbAttached { id, port } => {
                out.put_u32(*id);
                out.put_u32(*port);
            }
            AgentMessage::UsbFailed { id, reason } => {
                out.put_u32(*id);
                out.put_str(reason);
            }
        }
    }

    fn payload(&self) -> &[u8] {
        match self {
            AgentMessage::Clipboard(c) => c.payload_bytes(),
            AgentMessage::Files(f) => f.payload_bytes(),
            _ => &[],
        }
    }

    fn decode_body(ty: u16, r: &mut Reader<'_>) -> Result<Option<Self>, &'static str> {
        let message = match ty {
            types::AGENT_HELLO => AgentMessage::Hello(AgentHello {
                min_version: r.u16()?,
                max_version: r.u16()?,
                agent_version: r.string(MAX_AGENT_TEXT)?,
            }),
            types::AGENT_WELCOME => AgentMessage::Welcome { version: r.u16()? },
            types::GUEST_INFO => {
                let hostname = r.string(MAX_AGENT_TEXT)?;
                let os = r.string(MAX_AGENT_TEXT)?;
                let kernel = r.string(MAX_AGENT_TEXT)?;
                let count = usize::from(r.u8()?);
                if count > MAX_ADDRESSES {
                    return Err("too many addresses");
                }
                let addresses = (0..count).map(|_| r.string(MAX_ADDRESS_LEN)).collect::<Result<_, _>>()?;
                AgentMessage::GuestInfo(GuestInfo { hostname, os, kernel, addresses })
            }
            types::SESSION_STATE => {
                let activity = match r.u8()? {
                    0 => SessionActivity::NoUser,
                    1 => SessionActivity::Active,
                    2 => SessionActivity::Locked,
                    _ => return Err("unknown session activity"),
                };
                AgentMessage::SessionState(SessionState {
                    activity,
                    user: r.string(MAX_AGENT_TEXT)?,
                    idle_ms: r.u64()?,
                })
            }
            types::LOCK_SCREEN => AgentMessage::LockScreen,
            types::UNLOCK_SCREEN => AgentMessage::UnlockScreen,
            types::POWER => AgentMessage::Power(match r.u8()? {
                0 => PowerAction::Shutdown,
                1 => PowerAction::Reboot,
                _ => return Err("unknown power action"),
            }),
            types::AGENT_CLIPBOARD_GRAB..=types::AGENT_CLIPBOARD_REFUSED => {
                return Ok(
                    ClipboardMessage::read(ty - types::AGENT_CLIPBOARD_GRAB, r)?.map(AgentMessage::Clipboard)
                );
            }
            types::AGENT_FILE_OFFER..=types::AGENT_FILE_CANCEL => {
                return Ok(FileMessage::read(ty - types::AGENT_FILE_OFFER, r)?.map(AgentMessage::Files));
            }
            types::AGENT_USB_ATTACH => AgentMessage::UsbAttach {
                id: r.u32()?,
                token: r.u64()?,
                speed: UsbSpeed::from_u8(r.u8()?).ok_or("unknown USB speed")?,
            },
            types::AGENT_USB_ATTACHED => AgentMessage::UsbAttached { id: r.u32()?, port: r.u32()? },
            types::AGENT_USB_FAILED => {
                AgentMessage::UsbFailed { id: r.u32()?, reason: r.string(MAX_AGENT_TEXT)? }
            }
            _ => return Ok(None),
        };
        Ok(Some(message))
    }
}
