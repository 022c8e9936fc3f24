//! The virtio input event and the evdev codes Pleiades uses (`linux/input-event-codes.h`).

/// `struct virtio_input_event { le16 type; le16 code; le32 value; }`, the same as the evdev
/// event without its timestamp.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct InputEvent {
    pub kind: u16,
    pub code: u16,
    pub value: u32,
}

/// Size of [`InputEvent`] on the wire.
pub const EVENT_SIZE: usize = 8;

impl InputEvent {
    pub const fn new(kind: u16, code: u16, value: u32) -> Self {
        Self { kind, code, value }
    }

    /// `EV_SYN`/`SYN_REPORT`: the end of a report.
    pub const fn syn() -> Self {
        Self::new(EV_SYN, SYN_REPORT, 0)
    }

    /// A key or button press (`down`) or release.
    pub const fn key(code: u16, down: bool) -> Self {
        Self::new(EV_KEY, code, down as u32)
    }

    /// Whether this event ends a report.
    pub fn is_syn_report(&self) -> bool {
        self.kind == EV_SYN && self.code == SYN_REPORT
    }

    /// The little-endian wire form.
    pub fn to_bytes(self) -> [u8; EVENT_SIZE] {
        let mut b = [0u8; EVENT_SIZE];
        b[0..2].copy_from_slice(&self.kind.to_le_bytes());
        b[2..4].copy_from_slice(&self.code.to_le_bytes());
        b[4..8].copy_from_slice(&self.value.to_le_bytes());
        b
    }

    /// Parses the wire form.
    pub fn from_bytes(b: [u8; EVENT_SIZE]) -> Self {
        Self {
            kind: u16::from_le_bytes([b[0], b[1]]),
            code: u16::from_le_bytes([b[2], b[3]]),
            value: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
        }
    }
}

// Event types.
pub const EV_SYN: u16 = 0x00;
pub const EV_KEY: u16 = 0x01;
pub const EV_REL: u16 = 0x02;
pub const EV_ABS: u16 = 0x03;
pub const EV_LED: u16 = 0x11;
pub const EV_REP: u16 = 0x14;

pub const SYN_REPORT: u16 = 0;

// Relative and absolute axes.
pub const REL_X: u16 = 0x00;
pub const REL_Y: u16 = 0x01;
pub const REL_WHEEL: u16 = 0x08;
pub const ABS_X: u16 = 0x00;
pub const ABS_Y: u16 = 0x01;

// LEDs.
pub const LED_NUML: u16 = 0x00;
pub const LED_CAPSL: u16 = 0x01;
pub const LED_SCROLLL: u16 = 0x02;

// Mouse buttons.
pub const BTN_LEFT: u16 = 0x110;
pub const BTN_RIGHT: u16 = 0x111;
pub const BTN_MIDDLE: u16 = 0x112;

/// The highest code of a keyboard key (`KEY_MICMUTE`); codes 1 to this are keyboard keys.
pub const KEY_MAX_KEYBOARD: u16 = 248;

// Keys (only those named in the code; the rest are numbers in `keymap.rs`).
pub const KEY_ENTER: u16 = 28;
pub const KEY_LEFTCTRL: u16 = 29;
pub const KEY_LEFTSHIFT: u16 = 42;
pub const KEY_LEFTALT: u16 = 56;
pub const KEY_RIGHTALT: u16 = 100;
pub const KEY_LEFTMETA: u16 = 125;

/// The largest absolute coordinate of the tablet (both axes start at 0).
pub const TABLET_MAX: u32 = 32767;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_form_is_little_endian() {
        let e = InputEvent::new(EV_ABS, ABS_Y, 0x0102_0304);
        assert_eq!(e.to_bytes(), [3, 0, 1, 0, 4, 3, 2, 1]);
        assert_eq!(InputEvent::from_bytes(e.to_bytes()), e);
        assert!(InputEvent::syn().is_syn_report());
    }
}
