//! Input channel messages, client → server.
//!
//! Input is what the user feels first, so it has its own stream with the highest send priority
//! ([`crate::transport::priority::INPUT`]) and is reliable and ordered: a lost key-up would
//! leave a key stuck. The host turns these into virtio-input events (evdev codes).

use super::codec::{Put, Reader};
use super::{Channel, ChannelMessage, types};

/// A key press or release; `code` is a Linux evdev key code (`KEY_A` = 30).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Key {
    pub code: u16,
    pub down: bool,
}

/// The pointer's absolute position in scanout pixels (the client maps window coordinates).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PointerAbs {
    pub scanout: u32,
    pub x: u32,
    pub y: u32,
}

/// Relative pointer motion in the client's device units (with `RELATIVE_POINTER`: the VM's
/// mouse moves, the guest applies its own acceleration).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PointerRel {
    pub dx: i32,
    pub dy: i32,
}

/// Wheel motion in 1/120 of a detent (as Linux `REL_WHEEL_HI_RES`): 120 is one notch.
/// `dy > 0` scrolls up (away from the user), `dx > 0` scrolls right.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wheel {
    pub dx: i32,
    pub dy: i32,
}

/// Bits of [`InputMessage::Buttons`].
pub mod buttons {
    pub const LEFT: u32 = 1 << 0;
    pub const RIGHT: u32 = 1 << 1;
    pub const MIDDLE: u32 = 1 << 2;
    pub const SIDE: u32 = 1 << 3;
    pub const EXTRA: u32 = 1 << 4;
}

/// Everything the input channel carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputMessage {
    Key(Key),
    PointerAbs(PointerAbs),
    /// The full set of pressed pointer buttons ([`buttons`]); the host derives presses and
    /// releases from the change, so a state is never lost or doubled.
    Buttons(u32),
    Wheel(Wheel),
    /// Release every pressed key and button (the client lost focus).
    ReleaseAll,
    PointerRel(PointerRel),
}

impl ChannelMessage for InputMessage {
    const CHANNEL: Channel = Channel::Input;

    fn message_type(&self) -> u16 {
        match self {
            InputMessage::Key(_) => types::KEY,
            InputMessage::PointerAbs(_) => types::POINTER_ABS,
            InputMessage::Buttons(_) => types::BUTTONS,
            InputMessage::Wheel(_) => types::WHEEL,
            InputMessage::ReleaseAll => types::RELEASE_ALL,
            InputMessage::PointerRel(_) => types::POINTER_REL,
        }
    }

    fn validate(&self) -> Result<(), &'static str> {
        Ok(())
    }

    fn encode_fields(&self, out: &mut Vec<u8>) {
        match self {
            InputMessage::Key(k) => {
                out.put_u16(k.code);
                out.put_bool(k.down);
            }
            InputMessage::PointerAbs(p) => {
                out.put_u32(p.scanout);
                out.put_u32(p.x);
                out.put_u32(p.y);
            }
            InputMessage::Buttons(mask) => out.put_u32(*mask),
            InputMessage::Wheel(w) => {
                out.put_i32(w.dx);
                out.put_i32(w.dy);
            }
            InputMessage::ReleaseAll => {}
            InputMessage::PointerRel(p) => {
                out.put_i32(p.dx);
                out.put_i32(p.dy);
            }
        }
    }

    fn decode_body(ty: u16, r: &mut Reader<'_>) -> Result<Option<Self>, &'static str> {
        let message = match ty {
            types::KEY => InputMessage::Key(Key { code: r.u16()?, down: r.bool()? }),
            types::POINTER_ABS => {
                InputMessage::PointerAbs(PointerAbs { scanout: r.u32()?, x: r.u32()?, y: r.u32()? })
            }
            types::BUTTONS => InputMessage::Buttons(r.u32()?),
            types::WHEEL => InputMessage::Wheel(Wheel { dx: r.i32()?, dy: r.i32()? }),
            types::RELEASE_ALL => InputMessage::ReleaseAll,
            types::POINTER_REL => InputMessage::PointerRel(PointerRel { dx: r.i32()?, dy: r.i32()? }),
            _ => return Ok(None),
        };
        Ok(Some(message))
    }
}
