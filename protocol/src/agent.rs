//! The agent link, sans I/O: the VM process ([`HostLink`]) and the guest agent ([`AgentLink`])
//! over one vsock stream (the guest connects to the host, context id 2, port [`AGENT_PORT`]).
//!
//! ```text
//! agent                                   VM process
//!   Hello{min..max, agent version}  ──▶
//!   GuestInfo, SessionState …       ──▶     (may follow Hello at once)
//!                                   ◀──   Welcome{version}   (the highest both speak)
//!                                   ◀──   LockScreen, UnlockScreen, Power
//! ```
//!
//! The agent speaks first; anything before its `Hello`, a second `Hello`, a message in the
//! wrong direction or no common version ends the link ([`LinkError`]): the VM process closes the
//! connection and the agent connects again after a pause, which is also how a restarted agent
//! (or a restarted VM process) finds its peer again. Every byte goes through the bounded
//! [`StreamDecoder`], so a hostile guest costs the VM process at most one 64 KiB message.
//! The messages are [`crate::wire::AgentMessage`]; docs/protocol.md, "The agent channel",
//! has the layouts.

use crate::wire::{
    AgentHello, AgentMessage, ChannelMessage, ClipboardMessage, DecodeError, EncodeError, FileMessage,
    GuestInfo, PowerAction, SessionState, StreamDecoder, UsbSpeed, encode,
};

/// The vsock port the VM process listens on for its guest's agent.
pub const AGENT_PORT: u32 = 20556;
/// The vsock port the VM process listens on for redirected USB devices: the agent connects
/// once per device it was asked to attach, sends the attach's token (8 bytes, little-endian),
/// and hands the connected socket to the guest kernel's `vhci-hcd`, which speaks USB/IP on it
/// ([`crate::usbip`]).
pub const USB_PORT: u32 = 20557;
/// The agent channel versions this build speaks.
pub const MIN_VERSION: u16 = 1;
pub const MAX_VERSION: u16 = 1;

/// Why a link ended. The connection is closed after any of these.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error(transparent)]
    Encode(#[from] EncodeError),
    #[error("message {0:#06x} travels the other way")]
    WrongDirection(u16),
    #[error("the agent's first message must be Hello, not {0:#06x}")]
    HelloFirst(u16),
    #[error("a second Hello")]
    HelloTwice,
    #[error(
        "no common agent channel version: the agent speaks {min} to {max}, this host {MIN_VERSION} to {MAX_VERSION}"
    )]
    NoCommonVersion { min: u16, max: u16 },
    #[error("a second Welcome")]
    WelcomeTwice,
    #[error("the host chose version {0}, which this agent did not offer")]
    UnofferedVersion(u16),
    #[error("the link already failed")]
    Failed,
}

/// Frames out, a bounded decoder in, and the rule that a failed link stays failed.
#[derive(Debug, Default)]
struct Framing {
    decoder: StreamDecoder<AgentMessage>,
    out: Vec<u8>,
    failed: bool,
}

impl Framing {
    fn send(&mut self, message: &AgentMessage) -> Result<(), LinkError> {
        if self.failed {
            return Err(LinkError::Failed);
        }
        encode(message, &mut self.out)?;
        Ok(())
    }

    /// Decodes `bytes` and hands each message to `each`; the first error fails the link.
    fn receive(
        &mut self,
        mut bytes: &[u8],
        mut each: impl FnMut(AgentMessage) -> Result<(), LinkError>,
    ) -> Result<(), LinkError> {
        if self.failed {
            return Err(LinkError::Failed);
        }
        let result = (|| {
            while let Some(message) = self.decoder.decode(&mut bytes)? {
                each(message)?;
            }
            Ok(())
        })();
        self.failed = result.is_err();
        result
    }
}

/// What the VM process learns from its guest's agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostEvent {
    /// The agent said hello; `version` is the channel version chosen.
    Connected {
        version: u16,
        agent_version: String,
    },
    GuestInfo(GuestInfo),
    SessionState(SessionState),
    /// The guest session's clipboard ([`crate::clipboard::ClipboardRelay`] checks it).
    Clipboard(ClipboardMessage),
    /// The guest's answers about files sent into it ([`crate::files::FileRelay`] checks them).
    Files(FileMessage),
    /// A device the host asked for is attached in the guest, on virtual port `port`.
    UsbAttached {
        id: u32,
        port: u32,
    },
    /// A device the host asked for could not be attached.
    UsbFailed {
        id: u32,
        reason: String,
    },
}

/// The VM process's end of one agent connection.
#[derive(Debug, Default)]
pub struct HostLink {
    framing: Framing,
    version: Option<u16>,
}

impl HostLink {
    pub fn new() -> Self {
        Self::default()
    }

    /// The version agreed on, once the agent said hello.
    pub fn version(&self) -> Option<u16> {
        self.version
    }

    /// Takes bytes the agent sent and returns what they said. After an error the link is over.
    pub fn receive(&mut self, bytes: &[u8]) -> Result<Vec<HostEvent>, LinkError> {
        let mut events = Vec::new();
        let Self { framing, version } = self;
        let mut replies = Vec::new();
        framing.receive(bytes, |message| {
            let ty = message.message_type();
            if !message.from_agent() {
                return Err(LinkError::WrongDirection(ty));
            }
            match (message, *version) {
                (AgentMessage::Hello(hello), None) => {
                    let chosen = hello.max_version.min(MAX_VERSION);
                    if chosen < hello.min_version.max(MIN_VERSION) {
                        return Err(LinkError::NoCommonVersion {
                            min: hello.min_version,
                            max: hello.max_version,
                        });
                    }
                    *version = Some(chosen);
                    replies.push(AgentMessage::Welcome { version: chosen });
                    events.push(HostEvent::Connected { version: chosen, agent_version: hello.agent_version });
                }
                (AgentMessage::Hello(_), Some(_)) => return Err(LinkError::HelloTwice),
                (_, None) => return Err(LinkError::HelloFirst(ty)),
                (AgentMessage::GuestInfo(info), Some(_)) => events.push(HostEvent::GuestInfo(info)),
                (AgentMessage::SessionState(state), Some(_)) => events.push(HostEvent::SessionState(state)),
                (AgentMessage::Clipboard(message), Some(_)) => events.push(HostEvent::Clipboard(message)),
                (AgentMessage::Files(message), Some(_)) => events.push(HostEvent::Files(message)),
                (AgentMessage::UsbAttached { id, port }, Some(_)) => {
                    events.push(HostEvent::UsbAttached { id, port })
                }
                (AgentMessage::UsbFailed { id, reason }, Some(_)) => {
                    events.push(HostEvent::UsbFailed { id, reason })
                }
                (_, Some(_)) => unreachable!("from_agent() lists the agent's messages"),
            }
            Ok(())
        })?;
        for reply in &replies {
            framing.send(reply)?;
        }
        Ok(events)
    }

    /// Asks the guest to lock its screen.
    pub fn lock_screen(&mut self) -> Result<(), LinkError> {
        self.framing.send(&AgentMessage::LockScreen)
    }

    /// Asks the guest to unlock its screen.
    pub fn unlock_screen(&mut self) -> Result<(), LinkError> {
        self.framing.send(&AgentMessage::UnlockScreen)
    }

    /// Asks the guest to shut down or restart.
    pub fn power(&mut self, action: PowerAction) -> Result<(), LinkError> {
        self.framing.send(&AgentMessage::Power(action))
    }

    /// Passes a clipboard message to the guest session.
    pub fn clipboard(&mut self, message: ClipboardMessage) -> Result<(), LinkError> {
        self.framing.send(&AgentMessage::Clipboard(message))
    }

    /// Passes a file transfer message (an offer, data, a cancel) to the guest.
    pub fn files(&mut self, message: FileMessage) -> Result<(), LinkError> {
        self.framing.send(&AgentMessage::Files(message))
    }

    /// Asks the agent to attach a redirected USB device ([`AgentMessage::UsbAttach`]).
    pub fn usb_attach(&mut self, id: u32, token: u64, speed: UsbSpeed) -> Result<(), LinkError> {
        self.framing.send(&AgentMessage::UsbAttach { id, token, speed })
    }

    /// The bytes to write to the agent now.
    pub fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.framing.out)
    }
}

/// What the agent hears from the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentEvent {
    Welcomed {
        version: u16,
    },
    LockScreen,
    UnlockScreen,
    Power(PowerAction),
    /// The client's clipboard, relayed by the VM process.
    Clipboard(ClipboardMessage),
    /// A file the client sends (offer, data, cancel), relayed by the VM process.
    Files(FileMessage),
    /// Attach a redirected USB device ([`AgentMessage::UsbAttach`]).
    UsbAttach {
        id: u32,
        token: u64,
        speed: UsbSpeed,
    },
}

/// The guest agent's end of the link.
#[derive(Debug)]
pub struct AgentLink {
    framing: Framing,
    version: Option<u16>,
}

impl AgentLink {
    /// A new link; its `Hello` is already queued in [`Self::take_output`].
    pub fn new(agent_version: &str) -> Result<Self, LinkError> {
        let mut framing = Framing::default();
        framing.send(&AgentMessage::Hello(AgentHello {
            min_version: MIN_VERSION,
            max_version: MAX_VERSION,
            agent_version: agent_version.to_owned(),
        }))?;
        Ok(Self { framing, version: None })
    }

    /// The version the host chose, once it welcomed the agent.
    pub fn version(&self) -> Option<u16> {
        self.version
    }

    /// Takes bytes the host sent. After an error the link is over.
    pub fn receive(&mut self, bytes: &[u8]) -> Result<Vec<AgentEvent>, LinkError> {
        let mut events = Vec::new();
        let Self { framing, version } = self;
        framing.receive(bytes, |message| {
            let ty = message.message_type();
            if !message.from_host() {
                return Err(LinkError::WrongDirection(ty));
            }
            match message {
                AgentMessage::Welcome { version: chosen } => {
                    if version.is_some() {
                        return Err(LinkError::WelcomeTwice);
                    }
                    if !(MIN_VERSION..=MAX_VERSION).contains(&chosen) {
                        return Err(LinkError::UnofferedVersion(chosen));
                    }
                    *version = Some(chosen);
                    events.push(AgentEvent::Welcomed { version: chosen });
                }
                AgentMessage::LockScreen => events.push(AgentEvent::LockScreen),
                AgentMessage::UnlockScreen => events.push(AgentEvent::UnlockScreen),
                AgentMessage::Power(action) => events.push(AgentEvent::Power(action)),
                AgentMessage::Clipboard(message) => events.push(AgentEvent::Clipboard(message)),
                AgentMessage::Files(message) => events.push(AgentEvent::Files(message)),
                AgentMessage::UsbAttach { id, token, speed } => {
                    events.push(AgentEvent::UsbAttach { id, token, speed })
                }
                _ => unreachable!("from_host() lists the host's messages"),
            }
            Ok(())
        })?;
        Ok(events)
    }

    /// Reports what the guest is (send at connection and whenever it changes).
    pub fn guest_info(&mut self, info: GuestInfo) -> Result<(), LinkError> {
        self.framing.send(&AgentMessage::GuestInfo(info))
    }

    /// Reports the session's user, lock state and idle time.
    pub fn session_state(&mut self, state: SessionState) -> Result<(), LinkError> {
        self.framing.send(&AgentMessage::SessionState(state))
    }

    /// Passes the guest session's clipboard message to the host.
    pub fn clipboard(&mut self, message: ClipboardMessage) -> Result<(), LinkError> {
        self.framing.send(&AgentMessage::Clipboard(message))
    }

    /// Answers about a file the host sends (accept, progress, done, refused).
    pub fn files(&mut self, message: FileMessage) -> Result<(), LinkError> {
        self.framing.send(&AgentMessage::Files(message))
    }

    /// Says how attaching USB device `id` went: on virtual port `port`, or why not.
    pub fn usb_attached(&mut self, id: u32, result: Result<u32, String>) -> Result<(), LinkError> {
        self.framing.send(&match result {
            Ok(port) => AgentMessage::UsbAttached { id, port },
            Err(reason) => AgentMessage::UsbFailed { id, reason },
        })
    }

    /// The bytes to write to the host now.
    pub fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.framing.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{SessionActivity, encode_to_vec};

    fn info() -> GuestInfo {
        GuestInfo {
            hostname: "desk-7".into(),
            os: "Debian GNU/Linux 13 (trixie)".into(),
            kernel: "6.12.57+deb13-amd64".into(),
            addresses: vec!["10.0.2.15/24".into(), "fec0::5054:ff:fe12:3456/64".into()],
        }
    }

    /// Moves everything each side has written to the other, a byte at a time.
    fn exchange(agent: &mut AgentLink, host: &mut HostLink) -> (Vec<AgentEvent>, Vec<HostEvent>) {
        let mut host_events = Vec::new();
        for byte in agent.take_output() {
            host_events.extend(host.receive(&[byte]).unwrap());
        }
        let agent_events = agent.receive(&host.take_output()).unwrap();
        (agent_events, host_events)
    }

    #[test]
    fn hello_welcome_then_facts_and_requests() {
        let mut agent = AgentLink::new("0.1.0").unwrap();
        agent.guest_info(info()).unwrap();
        let state = SessionState { activity: SessionActivity::Active, user: "alice".into(), idle_ms: 1500 };
        agent.session_state(state.clone()).unwrap();
        let mut host = HostLink::new();
        let (agent_events, host_events) = exchange(&mut agent, &mut host);
        assert_eq!(
            host_events,
            [
                HostEvent::Connected { version: 1, agent_version: "0.1.0".into() },
                HostEvent::GuestInfo(info()),
                HostEvent::SessionState(state),
            ]
        );
        assert_eq!(agent_events, [AgentEvent::Welcomed { version: 1 }]);
        assert_eq!((agent.version(), host.version()), (Some(1), Some(1)));
        host.lock_screen().unwrap();
        host.unlock_screen().unwrap();
        host.power(PowerAction::Reboot).unwrap();
        let (agent_events, _) = exchange(&mut agent, &mut host);
        assert_eq!(
            agent_events,
            [AgentEvent::LockScreen, AgentEvent::UnlockScreen, AgentEvent::Power(PowerAction::Reboot)]
        );
    }

    #[test]
    fn the_agent_must_say_hello_first_and_once() {
        let mut host = HostLink::new();
        let early = encode_to_vec(&AgentMessage::GuestInfo(info())).unwrap();
        assert_eq!(host.receive(&early), Err(LinkError::HelloFirst(crate::wire::types::GUEST_INFO)));
        // The link stays failed, whatever comes next.
        let hello = AgentLink::new("x").unwrap().take_output();
        assert_eq!(host.receive(&hello), Err(LinkError::Failed));

        let mut host = HostLink::new();
        let twice = [hello.clone(), hello].concat();
        assert_eq!(host.receive(&twice), Err(LinkError::HelloTwice));
    }

    #[test]
    fn messages_in_the_wrong_direction_end_the_link() {
        let mut host = HostLink::new();
        let welcome = encode_to_vec(&AgentMessage::Welcome { version: 1 }).unwrap();
        assert_eq!(host.receive(&welcome), Err(LinkError::WrongDirection(crate::wire::types::AGENT_WELCOME)));
        let mut agent = AgentLink::new("x").unwrap();
        let info = encode_to_vec(&AgentMessage::GuestInfo(info())).unwrap();
        assert_eq!(agent.receive(&info), Err(LinkError::WrongDirection(crate::wire::types::GUEST_INFO)));
        assert_eq!(agent.guest_info(GuestInfo::default()), Err(LinkError::Failed));
    }

    #[test]
    fn versions_are_negotiated_to_the_highest_common_one() {
        let hello = |min, max| {
            encode_to_vec(&AgentMessage::Hello(AgentHello {
                min_version: min,
                max_version: max,
                agent_version: "9".into(),
            }))
            .unwrap()
        };
        // A newer agent that still speaks 1.
        let mut host = HostLink::new();
        assert_eq!(
            host.receive(&hello(1, 7)).unwrap(),
            [HostEvent::Connected { version: 1, agent_version: "9".into() }]
        );
        // One that no longer does.
        assert_eq!(HostLink::new().receive(&hello(2, 7)), Err(LinkError::NoCommonVersion { min: 2, max: 7 }));
        // A host that picks a version the agent never offered.
        let mut agent = AgentLink::new("x").unwrap();
        let welcome = encode_to_vec(&AgentMessage::Welcome { version: 5 }).unwrap();
        assert_eq!(agent.receive(&welcome), Err(LinkError::UnofferedVersion(5)));
    }

    #[test]
    fn bad_facts_are_refused_on_both_ends() {
        let mut agent = AgentLink::new("x").unwrap();
        let bad = GuestInfo { hostname: "a\nb".into(), ..info() };
        assert!(matches!(agent.guest_info(bad), Err(LinkError::Encode(_))));
        let nobody_named = SessionState { activity: SessionActivity::NoUser, user: "bob".into(), idle_ms: 0 };
        assert!(matches!(agent.session_state(nobody_named), Err(LinkError::Encode(_))));
        // The same bytes forged on the wire are malformed for the host.
        let mut forged = AgentLink::new("x").unwrap().take_output();
        let mut body = Vec::new();
        body.extend_from_slice(&3u16.to_le_bytes());
        body.extend_from_slice(b"a\nb");
        body.extend_from_slice(&[0, 0, 0, 0, 0]);
        forged.extend_from_slice(&crate::wire::types::GUEST_INFO.to_le_bytes());
        forged.extend_from_slice(&(body.len() as u32).to_le_bytes());
        forged.extend_from_slice(&body);
        let mut host = HostLink::new();
        assert!(matches!(host.receive(&forged), Err(LinkError::Decode(DecodeError::Malformed { .. }))));
    }

    #[test]
    fn an_oversized_message_fails_on_its_header() {
        let mut host = HostLink::new();
        let mut header = crate::wire::types::GUEST_INFO.to_le_bytes().to_vec();
        header.extend_from_slice(&(1u32 << 20).to_le_bytes());
        assert!(matches!(host.receive(&header), Err(LinkError::Decode(DecodeError::TooLarge { .. }))));
    }
}
