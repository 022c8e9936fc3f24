//! The VM process's USB relay, sans I/O: between the session's client, whose USB devices are
//! redirected (USB channel, [`UsbMessage`]), and the guest, where each device is a USB/IP
//! stream that the agent handed to the kernel's `vhci-hcd` over a vsock connection of its own
//! (port [`crate::agent::USB_PORT`]). The pool's policy is enforced here, on the host, and every
//! byte of every device's stream is checked by a [`UsbipLink`] and passed on re-encoded, so that
//! neither a hostile client nor a hostile guest kernel can make the other side parse anything
//! the link did not accept.
//!
//! ```text
//! client ──Attach{id, info}──▶ relay                 policy, a free slot, an agent
//!                               relay ──AttachInGuest{id, token}──▶ agent (agent link)
//!                               relay ◀──vsock connect + token───── agent
//! client ◀──Attached{id}─────── relay                the guest's stream is there
//!                               relay ◀──UsbAttached{id, port}───── agent (+ UsbEvent::Attached, audited)
//! client ◀─▶ Data{id, bytes} ◀─▶ relay ◀─▶ ToGuest / from_guest (USB/IP, checked both ways)
//! client ──Detach{id}─────────▶ relay ──CloseGuest{id}──▶          (the guest sees an unplug)
//! client ──Attach{denied}─────▶ relay ──Refused{Policy}──▶ client  + UsbEvent::Denied (audited)
//! ```
//!
//! The guest's vsock connection proves which attach it answers with a random token that only
//! the agent link carried. When the client's connection ends every device is unplugged in the
//! guest; when the guest closes a device's stream the client hears `Detached{Guest}`. Nothing is
//! buffered here beyond one PDU per direction and device ([`UsbipLink`]).

use std::collections::{BTreeMap, VecDeque};

use crate::usbip::{UsbipError, UsbipLink};
use crate::wire::{
    MAX_USB_CHUNK, MAX_USB_DEVICES, UsbDetachReason, UsbDeviceInfo, UsbMessage, UsbRefuseReason, UsbSpeed,
};

/// How long the guest has to connect a device's stream after the attach was asked for (ticks
/// of the caller's clock, [`UsbRelay::tick`]: seconds in the VM process).
pub const ATTACH_TIMEOUT_TICKS: u32 = 15;

/// Which devices a desktop's pool lets its users redirect.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UsbPolicy {
    /// Every device.
    pub all: bool,
    /// Devices whose every class (the device's, unless 0, and each interface's) is one of
    /// these: `03` human interface, `08` mass storage, `0e` video, `01` audio, `0b` smart card…
    pub classes: Vec<u8>,
    /// Devices with one of these `(vendor, product)` ids, whatever their classes.
    pub devices: Vec<(u16, u16)>,
}

impl UsbPolicy {
    /// Nothing may be redirected (the default).
    pub const NONE: UsbPolicy = UsbPolicy { all: false, classes: Vec::new(), devices: Vec::new() };

    /// Whether `device` may be redirected.
    pub fn allows(&self, device: &UsbDeviceInfo) -> bool {
        if self.all || self.devices.contains(&(device.vendor_id, device.product_id)) {
            return true;
        }
        let mut classes = device.classes().peekable();
        classes.peek().is_some() && classes.all(|c| self.classes.contains(&c))
    }

    /// Parses `all`, `none`, or a comma-separated list of `class=HH` (a class, in hex) and
    /// `VVVV:PPPP` (a vendor and product id, in hex): `class=03,class=0b,0525:a4a5`.
    pub fn parse(text: &str) -> Result<UsbPolicy, String> {
        match text.trim() {
            "all" => return Ok(UsbPolicy { all: true, ..UsbPolicy::NONE }),
            "none" | "" => return Ok(UsbPolicy::NONE),
            _ => {}
        }
        let mut policy = UsbPolicy::NONE;
        for rule in text.split(',').map(str::trim) {
            let hex = |s: &str, digits: usize| {
                (s.len() == digits && s.bytes().all(|b| b.is_ascii_hexdigit()))
                    .then(|| u16::from_str_radix(s, 16).ok())
                    .flatten()
            };
            if let Some(class) = rule.strip_prefix("class=") {
                let class = hex(class, 2)
                    .ok_or_else(|| format!("{rule:?}: a class is two hex digits, as in class=08"))?;
                policy.classes.push(class as u8);
            } else if let Some((vendor, product)) = rule.split_once(':') {
                match (hex(vendor, 4), hex(product, 4)) {
                    (Some(v), Some(p)) => policy.devices.push((v, p)),
                    _ => return Err(format!("{rule:?}: a device is VVVV:PPPP in hex, as in 0525:a4a5")),
                }
            } else {
                return Err(format!(
                    "{rule:?} is not a USB rule: use all, none, or a list of class=HH and VVVV:PPPP"
                ));
            }
        }
        Ok(policy)
    }
}

impl std::fmt::Display for UsbPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.all {
            return f.write_str("all");
        }
        let rules: Vec<String> = self
            .classes
            .iter()
            .map(|c| format!("class={c:02x}"))
            .chain(self.devices.iter().map(|(v, p)| format!("{v:04x}:{p:04x}")))
            .collect();
        if rules.is_empty() { f.write_str("none") } else { f.write_str(&rules.join(",")) }
    }
}

/// What the relay asks of the VM process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UsbOut {
    /// To the session's client.
    ToClient(UsbMessage),
    /// To the agent, over the agent link: attach device `id`, whose stream will present `token`.
    AttachInGuest { id: u32, token: u64, speed: UsbSpeed },
    /// USB/IP bytes for device `id`'s vsock connection.
    ToGuest { id: u32, bytes: Vec<u8> },
    /// Close device `id`'s vsock connection: the guest's kernel sees the device unplugged.
    CloseGuest { id: u32 },
}

/// What happened to a device, for the VM process's counters and audit log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UsbEvent {
    /// The pool's policy refused a device (the broker audits it).
    Denied(UsbDeviceInfo),
    /// A device is in the guest, on virtual port `port` (the broker audits it).
    Attached { device: UsbDeviceInfo, port: u32 },
    /// A device could not be attached.
    Failed { device: UsbDeviceInfo, reason: String },
    /// A device left the guest.
    Detached { device: UsbDeviceInfo, reason: UsbDetachReason },
}

#[derive(Debug)]
enum State {
    /// The agent was asked to attach it; its stream has not connected yet.
    Pending { token: u64, ticks: u32 },
    /// The guest's stream is connected: URBs flow.
    Active,
}

#[derive(Debug)]
struct Device {
    info: UsbDeviceInfo,
    state: State,
    link: UsbipLink,
}

/// The relay; the VM process's agent thread drives it.
pub struct UsbRelay {
    policy: UsbPolicy,
    client: bool,
    agent: bool,
    devices: BTreeMap<u32, Device>,
    /// Fresh tokens (random, from the caller).
    tokens: Box<dyn FnMut() -> u64 + Send>,
    out: VecDeque<UsbOut>,
    events: VecDeque<UsbEvent>,
    bytes_to_guest: u64,
    bytes_from_guest: u64,
}

impl std::fmt::Debug for UsbRelay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UsbRelay")
            .field("policy", &self.policy)
            .field("client", &self.client)
            .field("agent", &self.agent)
            .field("devices", &self.devices)
            .finish_non_exhaustive()
    }
}

impl UsbRelay {
    /// A relay with `policy`; `tokens` gives an unpredictable 64-bit number per attach.
    pub fn new(policy: UsbPolicy, tokens: Box<dyn FnMut() -> u64 + Send>) -> Self {
        Self {
            policy,
            client: false,
            agent: false,
            devices: BTreeMap::new(),
            tokens,
            out: VecDeque::new(),
            events: VecDeque::new(),
            bytes_to_guest: 0,
            bytes_from_guest: 0,
        }
    }

    pub fn policy(&self) -> &UsbPolicy {
        &self.policy
    }

    /// A new policy applies to devices attached from now on.
    pub fn set_policy(&mut self, policy: UsbPolicy) {
        self.policy = policy;
    }

    /// The devices redirected now (attached or on their way).
    pub fn devices(&self) -> impl Iterator<Item = (&UsbDeviceInfo, bool)> {
        self.devices.values().map(|d| (&d.info, matches!(d.state, State::Active)))
    }

    pub fn bytes_to_guest(&self) -> u64 {
        self.bytes_to_guest
    }

    pub fn bytes_from_guest(&self) -> u64 {
        self.bytes_from_guest
    }

    /// A session's client is the client end now (a new one replaces the old: its devices go).
    pub fn client_connected(&mut self) {
        self.unplug_all(UsbDetachReason::Client);
        self.client = true;
    }

    /// The client's connection ended: every device it redirected is unplugged in the guest.
    pub fn client_disconnected(&mut self) {
        self.unplug_all(UsbDetachReason::Client);
        self.client = false;
    }

    /// Whether the guest's agent link is up (attaches need it; attached devices do not).
    pub fn agent_connected(&mut self, up: bool) {
        self.agent = up;
        if !up {
            // Attaches the agent was working on will not be answered.
            let pending: Vec<u32> = self
                .devices
                .iter()
                .filter(|(_, d)| matches!(d.state, State::Pending { .. }))
                .map(|(id, _)| *id)
                .collect();
            for id in pending {
                self.fail(id, "the guest agent went away before attaching it");
            }
        }
    }

    /// What the client sent.
    pub fn from_client(&mut self, message: UsbMessage) {
        if !self.client {
            return;
        }
        match message {
            UsbMessage::Attach(info) => self.attach(info),
            UsbMessage::Data { id, bytes } => {
                let Some(device) = self.devices.get_mut(&id) else { return };
                if !matches!(device.state, State::Active) {
                    return self.broken(id, "the client sent data before the device was attached");
                }
                match device.link.from_device(&bytes) {
                    Ok(pdus) => {
                        let mut out = Vec::with_capacity(bytes.len());
                        for pdu in pdus {
                            out.extend(pdu.encode());
                        }
                        if !out.is_empty() {
                            self.bytes_to_guest += out.len() as u64;
                            self.out.push_back(UsbOut::ToGuest { id, bytes: out });
                        }
                    }
                    Err(e) => self.usbip_failed(id, "client", &e),
                }
            }
            UsbMessage::Detach { id } => self.unplug(id, UsbDetachReason::Client),
            // The server's messages: a client that sends them is ignored.
            UsbMessage::Attached { .. } | UsbMessage::Refused { .. } | UsbMessage::Detached { .. } => {}
        }
    }

    fn attach(&mut self, info: UsbDeviceInfo) {
        let id = info.id;
        let refuse = |reason| UsbOut::ToClient(UsbMessage::Refused { id, reason });
        if self.devices.contains_key(&id) {
            // The client's own mistake: any answer (a refusal ends the id's lane) would
            // confuse the device that has the id. Ignored.
        } else if !self.policy.allows(&info) {
            self.out.push_back(refuse(UsbRefuseReason::Policy));
            self.events.push_back(UsbEvent::Denied(info));
        } else if self.devices.len() >= MAX_USB_DEVICES {
            self.out.push_back(refuse(UsbRefuseReason::Busy));
        } else if !self.agent {
            self.out.push_back(refuse(UsbRefuseReason::NoAgent));
        } else {
            let token = (self.tokens)();
            self.out.push_back(UsbOut::AttachInGuest { id, token, speed: info.speed });
            self.devices.insert(
                id,
                Device { info, state: State::Pending { token, ticks: 0 }, link: UsbipLink::new() },
            );
        }
    }

    /// A stream connected to the USB port and presented `token`: the device it belongs to, if
    /// any (the caller closes a stream that belongs to none).
    pub fn guest_connected(&mut self, token: u64) -> Option<u32> {
        let id = self
            .devices
            .iter()
            .find(|(_, d)| matches!(d.state, State::Pending { token: t, .. } if t == token))
            .map(|(id, _)| *id)?;
        if let Some(device) = self.devices.get_mut(&id) {
            device.state = State::Active;
        }
        self.out.push_back(UsbOut::ToClient(UsbMessage::Attached { id }));
        Some(id)
    }

    /// What the agent said about an attach.
    pub fn agent_answered(&mut self, id: u32, result: Result<u32, String>) {
        let Some(device) = self.devices.get(&id) else { return };
        match result {
            Ok(port) => self.events.push_back(UsbEvent::Attached { device: device.info.clone(), port }),
            Err(reason) => self.fail(id, &reason),
        }
    }

    /// Bytes the guest's kernel wrote on device `id`'s stream.
    pub fn from_guest(&mut self, id: u32, bytes: &[u8]) {
        // Only a stream that presented the device's token speaks for it.
        let Some(device) = self.devices.get_mut(&id).filter(|d| matches!(d.state, State::Active)) else {
            return;
        };
        match device.link.from_guest(bytes) {
            Ok(pdus) => {
                let mut out = Vec::new();
                for pdu in pdus {
                    out.extend(pdu.encode());
                }
                self.bytes_from_guest += out.len() as u64;
                for chunk in out.chunks(MAX_USB_CHUNK) {
                    self.out.push_back(UsbOut::ToClient(UsbMessage::Data { id, bytes: chunk.to_vec() }));
                }
            }
            Err(e) => self.usbip_failed(id, "guest", &e),
        }
    }

    /// Device `id`'s stream was closed by the guest (its kernel let the device go).
    pub fn guest_closed(&mut self, id: u32) {
        if let Some(device) = self.devices.remove(&id) {
            self.out.push_back(UsbOut::ToClient(match device.state {
                State::Active => UsbMessage::Detached { id, reason: UsbDetachReason::Guest },
                State::Pending { .. } => UsbMessage::Refused { id, reason: UsbRefuseReason::Failed },
            }));
            self.events.push_back(UsbEvent::Detached { device: device.info, reason: UsbDetachReason::Guest });
        }
    }

    /// One tick of the caller's clock (a second): attaches the guest never connected fail.
    pub fn tick(&mut self) {
        let mut expired = Vec::new();
        for (id, device) in &mut self.devices {
            if let State::Pending { ticks, .. } = &mut device.state {
                *ticks += 1;
                if *ticks >= ATTACH_TIMEOUT_TICKS {
                    expired.push(*id);
                }
            }
        }
        for id in expired {
            self.fail(id, "the guest did not connect the device's stream in time");
        }
    }

    /// The next thing to do.
    pub fn poll_transmit(&mut self) -> Option<UsbOut> {
        self.out.pop_front()
    }

    /// The next thing that happened.
    pub fn poll_event(&mut self) -> Option<UsbEvent> {
        self.events.pop_front()
    }

    fn fail(&mut self, id: u32, reason: &str) {
        let Some(device) = self.devices.remove(&id) else { return };
        self.out.push_back(UsbOut::CloseGuest { id });
        self.out.push_back(UsbOut::ToClient(match device.state {
            State::Pending { .. } => UsbMessage::Refused { id, reason: UsbRefuseReason::Failed },
            State::Active => UsbMessage::Detached { id, reason: UsbDetachReason::Guest },
        }));
        self.events.push_back(UsbEvent::Failed { device: device.info, reason: reason.to_owned() });
    }

    fn usbip_failed(&mut self, id: u32, side: &str, error: &UsbipError) {
        self.broken(id, &format!("the {side} broke USB/IP: {error}"));
    }

    /// A side broke the protocol: the device is unplugged in the guest, the client told.
    fn broken(&mut self, id: u32, reason: &str) {
        let Some(device) = self.devices.remove(&id) else { return };
        self.out.push_back(UsbOut::CloseGuest { id });
        self.out.push_back(UsbOut::ToClient(UsbMessage::Detached { id, reason: UsbDetachReason::Protocol }));
        self.events.push_back(UsbEvent::Failed { device: device.info, reason: reason.to_owned() });
    }

    fn unplug(&mut self, id: u32, reason: UsbDetachReason) {
        let Some(device) = self.devices.remove(&id) else { return };
        self.out.push_back(UsbOut::CloseGuest { id });
        if self.client {
            self.out.push_back(UsbOut::ToClient(UsbMessage::Detached { id, reason }));
        }
        self.events.push_back(UsbEvent::Detached { device: device.info, reason });
    }

    fn unplug_all(&mut self, reason: UsbDetachReason) {
        let ids: Vec<u32> = self.devices.keys().copied().collect();
        let client = std::mem::replace(&mut self.client, false);
        for id in ids {
            self.unplug(id, reason);
        }
        self.client = client;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::usbip::{CmdSubmit, Direction, Pdu, RetSubmit};

    fn stick(id: u32) -> UsbDeviceInfo {
        UsbDeviceInfo {
            id,
            vendor_id: 0x0525,
            product_id: 0xa4a5,
            class: 0,
            interfaces: vec![8],
            speed: UsbSpeed::High,
            name: "stick".into(),
        }
    }

    fn relay(policy: &str) -> UsbRelay {
        let mut next = 100;
        let mut relay = UsbRelay::new(
            UsbPolicy::parse(policy).unwrap(),
            Box::new(move || {
                next += 1;
                next
            }),
        );
        relay.client_connected();
        relay.agent_connected(true);
        relay
    }

    fn drain(relay: &mut UsbRelay) -> Vec<UsbOut> {
        std::iter::from_fn(|| relay.poll_transmit()).collect()
    }

    fn get_descriptor(seqnum: u32) -> Vec<u8> {
        let setup = [0x80, 6, 0, 1, 0, 0, 18, 0];
        Pdu::Submit(CmdSubmit::new(seqnum, 1, 0, Direction::In, 18, setup, vec![])).encode()
    }

    fn answer(seqnum: u32, data: Vec<u8>) -> Vec<u8> {
        Pdu::Ret(RetSubmit::new(seqnum, 0, data.len() as u32, data)).encode()
    }

    /// Attaches device `id` through the agent and its stream (earlier events are drained).
    fn attached(relay: &mut UsbRelay, id: u32) {
        relay.from_client(UsbMessage::Attach(stick(id)));
        let [UsbOut::AttachInGuest { id: got, token, speed: UsbSpeed::High }] = drain(relay)[..] else {
            panic!("no attach in the guest");
        };
        assert_eq!(got, id);
        assert_eq!(relay.guest_connected(token ^ 1), None, "a wrong token attaches nothing");
        assert_eq!(relay.guest_connected(token), Some(id));
        assert_eq!(drain(relay), [UsbOut::ToClient(UsbMessage::Attached { id })]);
        relay.agent_answered(id, Ok(3));
        let events: Vec<UsbEvent> = std::iter::from_fn(|| relay.poll_event()).collect();
        assert_eq!(events.last(), Some(&UsbEvent::Attached { device: stick(id), port: 3 }));
    }

    #[test]
    fn policies_parse_and_decide() {
        let storage = stick(1);
        let hid = UsbDeviceInfo { interfaces: vec![3, 3], ..stick(2) };
        let composite = UsbDeviceInfo { interfaces: vec![3, 8], ..stick(3) };
        let other_id = UsbDeviceInfo { vendor_id: 1, ..composite.clone() };
        let no_classes = UsbDeviceInfo { interfaces: vec![], vendor_id: 9, ..stick(4) };
        let p = UsbPolicy::parse("class=03, 0525:a4a5").unwrap();
        assert!(p.allows(&storage) && p.allows(&hid) && p.allows(&composite));
        assert!(!p.allows(&other_id), "a class outside the list keeps a composite device out");
        assert!(!p.allows(&no_classes));
        assert!(UsbPolicy::parse("all").unwrap().allows(&no_classes));
        assert!(!UsbPolicy::NONE.allows(&hid));
        assert_eq!(p.to_string(), "class=03,0525:a4a5");
        assert_eq!(UsbPolicy::parse(&p.to_string()).unwrap(), p);
        for bad in ["class=3", "class=0x3", "525:a4a5", "usb", "class=03,,"] {
            assert!(UsbPolicy::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_device_attaches_and_its_urbs_cross_checked_both_ways() {
        let mut relay = relay("class=08");
        attached(&mut relay, 7);
        // The guest asks for the device descriptor, split anyhow across vsock reads.
        let cmd = get_descriptor(1);
        relay.from_guest(7, &cmd[..10]);
        relay.from_guest(7, &cmd[10..]);
        assert_eq!(drain(&mut relay), [UsbOut::ToClient(UsbMessage::Data { id: 7, bytes: cmd })]);
        let ret = answer(1, vec![0x12; 18]);
        relay.from_client(UsbMessage::Data { id: 7, bytes: ret.clone() });
        assert_eq!(drain(&mut relay), [UsbOut::ToGuest { id: 7, bytes: ret }]);
        // An answer to nothing: the device is unplugged, the client told why.
        relay.from_client(UsbMessage::Data { id: 7, bytes: answer(9, vec![]) });
        assert_eq!(
            drain(&mut relay),
            [
                UsbOut::CloseGuest { id: 7 },
                UsbOut::ToClient(UsbMessage::Detached { id: 7, reason: UsbDetachReason::Protocol })
            ]
        );
        assert!(matches!(relay.poll_event(), Some(UsbEvent::Failed { .. })));
        assert_eq!(relay.devices().count(), 0);
    }

    #[test]
    fn denied_devices_never_reach_the_guest() {
        let mut relay = relay("class=03");
        relay.from_client(UsbMessage::Attach(stick(1)));
        assert_eq!(
            drain(&mut relay),
            [UsbOut::ToClient(UsbMessage::Refused { id: 1, reason: UsbRefuseReason::Policy })]
        );
        assert_eq!(relay.poll_event(), Some(UsbEvent::Denied(stick(1))));
        // Data for it goes nowhere.
        relay.from_client(UsbMessage::Data { id: 1, bytes: answer(1, vec![]) });
        assert_eq!(drain(&mut relay), []);
    }

    #[test]
    fn unplug_client_loss_and_the_guest_letting_go() {
        let mut relay = relay("all");
        attached(&mut relay, 1);
        attached(&mut relay, 2);
        relay.from_client(UsbMessage::Detach { id: 1 });
        assert_eq!(
            drain(&mut relay),
            [
                UsbOut::CloseGuest { id: 1 },
                UsbOut::ToClient(UsbMessage::Detached { id: 1, reason: UsbDetachReason::Client })
            ]
        );
        relay.guest_closed(2);
        assert_eq!(
            drain(&mut relay),
            [UsbOut::ToClient(UsbMessage::Detached { id: 2, reason: UsbDetachReason::Guest })]
        );
        attached(&mut relay, 3);
        relay.client_disconnected();
        assert_eq!(drain(&mut relay), [UsbOut::CloseGuest { id: 3 }]);
        // Without a client, nothing is attached.
        relay.from_client(UsbMessage::Attach(stick(4)));
        assert_eq!(drain(&mut relay), []);
    }

    #[test]
    fn attaches_fail_without_an_agent_or_in_time_and_are_bounded() {
        let mut relay = relay("all");
        relay.agent_connected(false);
        relay.from_client(UsbMessage::Attach(stick(1)));
        assert_eq!(
            drain(&mut relay),
            [UsbOut::ToClient(UsbMessage::Refused { id: 1, reason: UsbRefuseReason::NoAgent })]
        );
        relay.agent_connected(true);
        relay.from_client(UsbMessage::Attach(stick(1)));
        drain(&mut relay);
        for _ in 0..ATTACH_TIMEOUT_TICKS {
            relay.tick();
        }
        assert_eq!(
            drain(&mut relay),
            [
                UsbOut::CloseGuest { id: 1 },
                UsbOut::ToClient(UsbMessage::Refused { id: 1, reason: UsbRefuseReason::Failed })
            ]
        );
        for id in 0..MAX_USB_DEVICES as u32 {
            relay.from_client(UsbMessage::Attach(stick(id)));
        }
        drain(&mut relay);
        // An id in use is the client's mistake: ignored, the device that has it goes on.
        relay.from_client(UsbMessage::Attach(stick(3)));
        assert_eq!(drain(&mut relay), []);
        relay.from_client(UsbMessage::Attach(stick(99)));
        assert_eq!(
            drain(&mut relay),
            [UsbOut::ToClient(UsbMessage::Refused { id: 99, reason: UsbRefuseReason::Busy })]
        );
        // The agent goes: attaches in progress fail.
        relay.agent_connected(false);
        assert_eq!(relay.devices().count(), 0);
    }
}
