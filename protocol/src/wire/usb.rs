//! USB redirection messages: USB devices on the client (real ones through libusb, or an
//! emulated stick) that the client's user hands to the desktop. The client announces a device
//! with [`UsbMessage::Attach`]; the VM process checks it against the pool's policy and has the
//! guest agent attach it to the guest kernel's `vhci-hcd` over a vsock stream of its own; from
//! then on the device's USB/IP stream ([`crate::usbip`]) travels in [`UsbMessage::Data`]
//! chunks, checked by the VM process on its way through.
//!
//! ```text
//! client                                        VM process ─ guest (vhci-hcd)
//!   Attach{id, vid:pid, classes, speed, name}  ──▶  policy, then the agent attaches it
//!                                              ◀──  Attached{id} | Refused{id, reason}
//!   Data{id, RET_SUBMIT/RET_UNLINK bytes}      ◀─▶  Data{id, CMD_SUBMIT/CMD_UNLINK bytes}
//!   Detach{id}                                 ──▶  (unplugged: the guest sees a disconnect)
//!                                              ◀──  Detached{id, reason}
//! ```
//!
//! `id` names a device on this connection (the client picks it). Each device's data travels
//! on a stream of its own ([`UsbMessage::lane`]), so a stick's bulk copy never holds up a
//! keyboard's or headset's transfers; announcements and answers share lane 0.

use super::codec::{Put, Reader};
use super::{Channel, ChannelMessage, types};

/// Most bytes of USB/IP stream in one [`UsbMessage::Data`]: fits the channel's 64 KiB body.
pub const MAX_USB_CHUNK: usize = 60 * 1024;
/// Devices redirected at once per session (the VM process refuses more, [`UsbRefuseReason::Busy`]).
pub const MAX_USB_DEVICES: usize = 16;
/// Most interfaces a device lists (their classes are what a policy looks at).
pub const MAX_USB_INTERFACES: usize = 32;
/// Longest device name (the product string), in bytes.
pub const MAX_USB_NAME: usize = 255;
/// What waits for one end across every device: a few of the largest URBs (4 MiB each), which a
/// guest that submits and a device that answers never exceed (USB/IP is request and answer).
pub const MAX_USB_QUEUE: usize = 24 << 20;

/// How fast a device is: the kernel's `enum usb_device_speed`, which `vhci-hcd` takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum UsbSpeed {
    Low = 1,
    Full = 2,
    High = 3,
    Super = 5,
    SuperPlus = 6,
}

impl UsbSpeed {
    pub fn from_u8(v: u8) -> Option<Self> {
        [UsbSpeed::Low, UsbSpeed::Full, UsbSpeed::High, UsbSpeed::Super, UsbSpeed::SuperPlus]
            .into_iter()
            .find(|s| *s as u8 == v)
    }
}

/// What the policy and the guest's attach need to know of a device before any transfer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsbDeviceInfo {
    pub id: u32,
    pub vendor_id: u16,
    pub product_id: u16,
    /// `bDeviceClass` (0: the interfaces say).
    pub class: u8,
    /// Each interface's `bInterfaceClass`, in order (at most [`MAX_USB_INTERFACES`]).
    pub interfaces: Vec<u8>,
    pub speed: UsbSpeed,
    /// The product string, for people (the policy never looks at it).
    pub name: String,
}

impl UsbDeviceInfo {
    /// Every class the device has: its own (unless 0) and its interfaces'.
    pub fn classes(&self) -> impl Iterator<Item = u8> + '_ {
        (self.class != 0).then_some(self.class).into_iter().chain(self.interfaces.iter().copied())
    }
}

/// Why a device was not attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum UsbRefuseReason {
    /// The desktop's pool does not allow this device (its class or VID:PID).
    Policy = 0,
    /// No guest agent runs in the desktop to attach it.
    NoAgent = 1,
    /// [`MAX_USB_DEVICES`] are redirected already.
    Busy = 2,
    /// The guest could not attach it (no `vhci-hcd`, no free port).
    Failed = 3,
}

impl UsbRefuseReason {
    pub fn from_u8(v: u8) -> Option<Self> {
        [UsbRefuseReason::Policy, UsbRefuseReason::NoAgent, UsbRefuseReason::Busy, UsbRefuseReason::Failed]
            .into_iter()
            .find(|r| *r as u8 == v)
    }

    /// What to tell the user.
    pub fn describe(self) -> &'static str {
        match self {
            UsbRefuseReason::Policy => "the desktop's pool does not allow this device",
            UsbRefuseReason::NoAgent => "the desktop's agent is not running",
            UsbRefuseReason::Busy => "too many devices are redirected already",
            UsbRefuseReason::Failed => "the desktop could not attach the device",
        }
    }
}

/// Why a redirected device went away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum UsbDetachReason {
    /// The client detached it (unplugged, or the user stopped redirecting it).
    Client = 0,
    /// The guest let it go (its agent or kernel closed the device's stream).
    Guest = 1,
    /// One side broke USB/IP (the VM process ended the device's stream).
    Protocol = 2,
}

impl UsbDetachReason {
    pub fn from_u8(v: u8) -> Option<Self> {
        [UsbDetachReason::Client, UsbDetachReason::Guest, UsbDetachReason::Protocol]
            .into_iter()
            .find(|r| *r as u8 == v)
    }
}

/// Everything the USB channel carries. `Attach` and `Detach` go from the client, `Attached`,
/// `Refused` and `Detached` from the server, `Data` both ways.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UsbMessage {
    Attach(UsbDeviceInfo),
    Attached {
        id: u32,
    },
    Refused {
        id: u32,
        reason: UsbRefuseReason,
    },
    /// 1..=[`MAX_USB_CHUNK`] bytes of the device's USB/IP stream (PDUs may span chunks).
    Data {
        id: u32,
        bytes: Vec<u8>,
    },
    Detach {
        id: u32,
    },
    Detached {
        id: u32,
        reason: UsbDetachReason,
    },
}

impl UsbMessage {
    /// The device this message is about.
    pub fn id(&self) -> u32 {
        match self {
            UsbMessage::Attach(d) => d.id,
            UsbMessage::Attached { id }
            | UsbMessage::Refused { id, .. }
            | UsbMessage::Data { id, .. }
            | UsbMessage::Detach { id }
            | UsbMessage::Detached { id, .. } => *id,
        }
    }

    /// Whether the client sends this message (`Data` goes both ways).
    pub fn from_client(&self) -> bool {
        matches!(self, UsbMessage::Attach(_) | UsbMessage::Data { .. } | UsbMessage::Detach { .. })
    }

    /// The stream a sender puts this message on: a device's data on its own (`id + 1`, so one
    /// device's bulk transfers never wait behind another's), everything else on lane 0.
    pub fn lane(&self) -> u64 {
        match self {
            UsbMessage::Data { id, .. } => u64::from(*id) + 1,
            _ => 0,
        }
    }

    /// The device lane this message ends: after a detach or a refusal, the device's data
    /// stream carries nothing more (a new attach of the same id opens a new one).
    pub fn ends_lane(&self) -> Option<u64> {
        match self {
            UsbMessage::Detach { id } | UsbMessage::Detached { id, .. } | UsbMessage::Refused { id, .. } => {
                Some(u64::from(*id) + 1)
            }
            _ => None,
        }
    }

    /// The memory this message takes while it waits in a queue.
    pub fn queued_size(&self) -> usize {
        std::mem::size_of::<Self>()
            + match self {
                UsbMessage::Attach(d) => d.name.len() + d.interfaces.len(),
                UsbMessage::Data { bytes, .. } => bytes.len(),
                _ => 0,
            }
    }

    fn index(&self) -> u16 {
        match self {
            UsbMessage::Attach(_) => 0,
            UsbMessage::Attached { .. } => 1,
            UsbMessage::Refused { .. } => 2,
            UsbMessage::Data { .. } => 3,
            UsbMessage::Detach { .. } => 4,
            UsbMessage::Detached { .. } => 5,
        }
    }

    fn read(index: u16, r: &mut Reader<'_>) -> Result<Option<Self>, &'static str> {
        let id = r.u32()?;
        Ok(Some(match index {
            0 => {
                let vendor_id = r.u16()?;
                let product_id = r.u16()?;
                let class = r.u8()?;
                let speed = UsbSpeed::from_u8(r.u8()?).ok_or("unknown USB speed")?;
                let count = usize::from(r.u8()?);
                if count > MAX_USB_INTERFACES {
                    return Err("too many USB interfaces");
                }
                let interfaces = (0..count).map(|_| r.u8()).collect::<Result<_, _>>()?;
                let name = r.string(MAX_USB_NAME)?;
                UsbMessage::Attach(UsbDeviceInfo {
                    id,
                    vendor_id,
                    product_id,
                    class,
                    interfaces,
                    speed,
                    name,
                })
            }
            1 => UsbMessage::Attached { id },
            2 => UsbMessage::Refused {
                id,
                reason: UsbRefuseReason::from_u8(r.u8()?).ok_or("unknown USB refusal reason")?,
            },
            3 => UsbMessage::Data { id, bytes: r.rest() },
            4 => UsbMessage::Detach { id },
            5 => UsbMessage::Detached {
                id,
                reason: UsbDetachReason::from_u8(r.u8()?).ok_or("unknown USB detach reason")?,
            },
            _ => return Ok(None),
        }))
    }
}

impl ChannelMessage for UsbMessage {
    const CHANNEL: Channel = Channel::Usb;

    fn message_type(&self) -> u16 {
        types::USB_ATTACH + self.index()
    }

    fn validate(&self) -> Result<(), &'static str> {
        match self {
            UsbMessage::Attach(d) => {
                if d.interfaces.len() > MAX_USB_INTERFACES {
                    return Err("too many USB interfaces");
                }
                if d.name.len() > MAX_USB_NAME || d.name.chars().any(char::is_control) {
                    return Err("device name too long or with control characters");
                }
            }
            UsbMessage::Data { bytes, .. } if bytes.is_empty() || bytes.len() > MAX_USB_CHUNK => {
                return Err("USB data chunk empty or over the limit");
            }
            _ => {}
        }
        Ok(())
    }

    fn encode_fields(&self, out: &mut Vec<u8>) {
        out.put_u32(self.id());
        match self {
            UsbMessage::Attach(d) => {
                out.put_u16(d.vendor_id);
                out.put_u16(d.product_id);
                out.put_u8(d.class);
                out.put_u8(d.speed as u8);
                // Validated: at most MAX_USB_INTERFACES.
                out.put_u8(d.interfaces.len() as u8);
                out.extend_from_slice(&d.interfaces);
                out.put_str(&d.name);
            }
            UsbMessage::Refused { reason, .. } => out.put_u8(*reason as u8),
            UsbMessage::Detached { reason, .. } => out.put_u8(*reason as u8),
            UsbMessage::Attached { .. } | UsbMessage::Data { .. } | UsbMessage::Detach { .. } => {}
        }
    }

    fn payload(&self) -> &[u8] {
        match self {
            UsbMessage::Data { bytes, .. } => bytes,
            _ => &[],
        }
    }

    fn decode_body(ty: u16, r: &mut Reader<'_>) -> Result<Option<Self>, &'static str> {
        match ty.checked_sub(types::USB_ATTACH) {
            Some(index) if index < 6 => Self::read(index, r),
            _ => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{StreamDecoder, encode_to_vec};

    fn stick() -> UsbDeviceInfo {
        UsbDeviceInfo {
            id: 7,
            vendor_id: 0x0525,
            product_id: 0xa4a5,
            class: 0,
            interfaces: vec![8],
            speed: UsbSpeed::High,
            name: "Pleiades emulated disk".into(),
        }
    }

    #[test]
    fn attach_has_the_documented_layout() {
        let bytes = encode_to_vec(&UsbMessage::Attach(stick())).unwrap();
        let name = b"Pleiades emulated disk";
        let mut want = vec![0x01, 0x05]; // type 0x0501
        want.extend_from_slice(&(4 + 2 + 2 + 1 + 1 + 1 + 1 + 2 + name.len() as u32).to_le_bytes());
        want.extend_from_slice(&7u32.to_le_bytes());
        want.extend_from_slice(&0x0525u16.to_le_bytes());
        want.extend_from_slice(&0xa4a5u16.to_le_bytes());
        want.extend_from_slice(&[0, 3, 1, 8]);
        want.extend_from_slice(&(name.len() as u16).to_le_bytes());
        want.extend_from_slice(name);
        assert_eq!(bytes, want);
    }

    #[test]
    fn every_message_round_trips_and_data_takes_its_device_lane() {
        let messages = [
            UsbMessage::Attach(stick()),
            UsbMessage::Attached { id: 7 },
            UsbMessage::Refused { id: 7, reason: UsbRefuseReason::Policy },
            UsbMessage::Data { id: 7, bytes: vec![1; MAX_USB_CHUNK] },
            UsbMessage::Detach { id: 7 },
            UsbMessage::Detached { id: 7, reason: UsbDetachReason::Guest },
        ];
        let mut stream = Vec::new();
        for m in &messages {
            stream.extend(encode_to_vec(m).unwrap());
        }
        let mut decoder = StreamDecoder::<UsbMessage>::new();
        let mut out = Vec::new();
        for chunk in stream.chunks(1000) {
            decoder.decode_all(chunk, &mut out).unwrap();
        }
        assert_eq!(out, messages);
        assert_eq!(messages.iter().map(UsbMessage::lane).collect::<Vec<_>>(), [0, 0, 0, 8, 0, 0]);
    }

    #[test]
    fn bad_messages_are_refused_both_ways() {
        for bad in [
            UsbMessage::Data { id: 1, bytes: vec![] },
            UsbMessage::Data { id: 1, bytes: vec![0; MAX_USB_CHUNK + 1] },
            UsbMessage::Attach(UsbDeviceInfo { interfaces: vec![3; MAX_USB_INTERFACES + 1], ..stick() }),
            UsbMessage::Attach(UsbDeviceInfo { name: "a\nb".into(), ..stick() }),
        ] {
            assert!(encode_to_vec(&bad).is_err(), "{bad:?}");
        }
        // An unknown speed on the wire.
        let mut bytes = encode_to_vec(&UsbMessage::Attach(stick())).unwrap();
        bytes[6 + 4 + 2 + 2 + 1] = 4;
        let mut out = Vec::new();
        assert!(StreamDecoder::<UsbMessage>::new().decode_all(&bytes, &mut out).is_err());
    }

    #[test]
    fn classes_are_the_devices_and_its_interfaces() {
        let hub = UsbDeviceInfo { class: 9, interfaces: vec![9], ..stick() };
        assert_eq!(hub.classes().collect::<Vec<_>>(), [9, 9]);
        assert_eq!(stick().classes().collect::<Vec<_>>(), [8]);
    }
}
