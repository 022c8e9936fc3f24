//! The virtio-input configuration space (virtio 1.2, 5.8.4).
//!
//! ```text
//! struct virtio_input_config { u8 select; u8 subsel; u8 size; u8 reserved[5]; u8 u[128]; }
//! ```
//! The driver writes `select` and `subsel`, then reads `size` and the first `size` bytes of `u`.
//! A question the device has no answer to reads `size` 0.

use std::collections::BTreeMap;

use super::event::*;
use crate::read_config_bytes;

/// Size of `struct virtio_input_config`.
pub const CONFIG_SIZE: usize = 136;
/// Offset of the union `u`.
const UNION_OFFSET: usize = 8;
/// The most bytes one answer may have.
const UNION_SIZE: usize = 128;

pub const CFG_UNSET: u8 = 0x00;
pub const CFG_ID_NAME: u8 = 0x01;
pub const CFG_ID_SERIAL: u8 = 0x02;
pub const CFG_ID_DEVIDS: u8 = 0x03;
pub const CFG_PROP_BITS: u8 = 0x10;
pub const CFG_EV_BITS: u8 = 0x11;
pub const CFG_ABS_INFO: u8 = 0x12;

/// `BUS_VIRTUAL` from `linux/input.h`.
const BUS_VIRTUAL: u16 = 0x06;
/// The vendor id QEMU's virtio input devices use (Red Hat); drivers do not look at it.
const VENDOR: u16 = 0x0627;

/// `struct virtio_input_absinfo`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AbsInfo {
    pub min: u32,
    pub max: u32,
    pub fuzz: u32,
    pub flat: u32,
    pub res: u32,
}

/// What an input device says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputIdentity {
    pub name: String,
    pub serial: String,
    /// `struct virtio_input_devids`: bustype, vendor, product, version.
    pub devids: [u16; 4],
    /// `INPUT_PROP_*` bits.
    pub prop_bits: Vec<u16>,
    /// Per event type, the codes the device can send.
    pub ev_bits: BTreeMap<u16, Vec<u16>>,
    /// Per absolute axis, its range.
    pub abs_info: BTreeMap<u16, AbsInfo>,
}

impl InputIdentity {
    /// A keyboard: every keyboard key code and the three lock LEDs. `EV_REP` is not offered:
    /// the guest's software auto-repeat would fire when a release is late (a slow guest, a busy
    /// host), and the host sends repeats itself if it wants them.
    pub fn keyboard() -> Self {
        let mut ev_bits = BTreeMap::new();
        ev_bits.insert(EV_KEY, (1..=KEY_MAX_KEYBOARD).collect());
        ev_bits.insert(EV_LED, vec![LED_NUML, LED_CAPSL, LED_SCROLLL]);
        Self {
            name: "Pleiades Keyboard".into(),
            serial: "pleiades-keyboard-0".into(),
            devids: [BUS_VIRTUAL, VENDOR, 0x0001, 0x0001],
            prop_bits: Vec::new(),
            ev_bits,
            abs_info: BTreeMap::new(),
        }
    }

    /// A tablet: absolute X/Y in 0..=[`TABLET_MAX`], left/right/middle buttons and a wheel.
    /// `INPUT_PROP_DIRECT` is not set: it is a pointer, not a touch screen.
    pub fn tablet() -> Self {
        let mut ev_bits = BTreeMap::new();
        ev_bits.insert(EV_KEY, vec![BTN_LEFT, BTN_RIGHT, BTN_MIDDLE]);
        ev_bits.insert(EV_REL, vec![REL_WHEEL]);
        ev_bits.insert(EV_ABS, vec![ABS_X, ABS_Y]);
        let axis = AbsInfo { min: 0, max: TABLET_MAX, ..AbsInfo::default() };
        Self {
            name: "Pleiades Tablet".into(),
            serial: "pleiades-tablet-0".into(),
            devids: [BUS_VIRTUAL, VENDOR, 0x0003, 0x0001],
            prop_bits: Vec::new(),
            ev_bits,
            abs_info: BTreeMap::from([(ABS_X, axis), (ABS_Y, axis)]),
        }
    }

    /// A mouse: relative X/Y, left/right/middle buttons and a wheel, for a client's relative
    /// pointer mode (games and other programs that want motion, not positions).
    pub fn mouse() -> Self {
        let mut ev_bits = BTreeMap::new();
        ev_bits.insert(EV_KEY, vec![BTN_LEFT, BTN_RIGHT, BTN_MIDDLE]);
        ev_bits.insert(EV_REL, vec![REL_X, REL_Y, REL_WHEEL]);
        Self {
            name: "Pleiades Mouse".into(),
            serial: "pleiades-mouse-0".into(),
            devids: [BUS_VIRTUAL, VENDOR, 0x0002, 0x0001],
            prop_bits: Vec::new(),
            ev_bits,
            abs_info: BTreeMap::new(),
        }
    }

    /// Whether the device can send `event` (its type and code are in `EV_BITS`); `SYN` always.
    pub fn can_send(&self, event: &InputEvent) -> bool {
        event.kind == EV_SYN || self.ev_bits.get(&event.kind).is_some_and(|codes| codes.contains(&event.code))
    }

    /// The answer to `select`/`subsel`, at most 128 bytes; empty where there is none.
    pub fn answer(&self, select: u8, subsel: u8) -> Vec<u8> {
        let mut answer = match (select, subsel) {
            (CFG_ID_NAME, 0) => self.name.as_bytes().to_vec(),
            (CFG_ID_SERIAL, 0) => self.serial.as_bytes().to_vec(),
            (CFG_ID_DEVIDS, 0) => self.devids.iter().flat_map(|v| v.to_le_bytes()).collect(),
            (CFG_PROP_BITS, 0) => bitmap(&self.prop_bits),
            (CFG_EV_BITS, kind) => self.ev_bits.get(&u16::from(kind)).map(|c| bitmap(c)).unwrap_or_default(),
            (CFG_ABS_INFO, axis) => self
                .abs_info
                .get(&u16::from(axis))
                .map(|a| [a.min, a.max, a.fuzz, a.flat, a.res].iter().flat_map(|v| v.to_le_bytes()).collect())
                .unwrap_or_default(),
            _ => Vec::new(),
        };
        answer.truncate(UNION_SIZE);
        answer
    }
}

/// A little-endian bitmap with bit `code` set for each code, as short as it can be.
fn bitmap(codes: &[u16]) -> Vec<u8> {
    let Some(max) = codes.iter().max() else { return Vec::new() };
    let mut bits = vec![0u8; usize::from(*max) / 8 + 1];
    for code in codes {
        bits[usize::from(*code) / 8] |= 1 << (code % 8);
    }
    bits
}

/// The configuration space: the identity plus what the driver selected.
#[derive(Debug, Clone)]
pub struct InputConfig {
    identity: InputIdentity,
    select: u8,
    subsel: u8,
}

impl InputConfig {
    pub fn new(identity: InputIdentity) -> Self {
        Self { identity, select: CFG_UNSET, subsel: 0 }
    }

    pub fn identity(&self) -> &InputIdentity {
        &self.identity
    }

    /// The whole config space as the driver sees it now.
    pub fn image(&self) -> [u8; CONFIG_SIZE] {
        let answer = self.identity.answer(self.select, self.subsel);
        let mut image = [0u8; CONFIG_SIZE];
        image[0] = self.select;
        image[1] = self.subsel;
        image[2] = answer.len() as u8;
        image[UNION_OFFSET..UNION_OFFSET + answer.len()].copy_from_slice(&answer);
        image
    }

    pub fn read(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.image(), offset, data);
    }

    /// Only `select` (offset 0) and `subsel` (offset 1) are writable. A write may cover more
    /// (QEMU's vhost-user frontend writes the whole space back); the rest is ignored.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        for (i, byte) in data.iter().enumerate() {
            match offset.checked_add(i as u64) {
                Some(0) => self.select = *byte,
                Some(1) => self.subsel = *byte,
                _ => {}
            }
        }
    }

    pub fn reset(&mut self) {
        self.select = CFG_UNSET;
        self.subsel = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ask(config: &mut InputConfig, select: u8, subsel: u8) -> Vec<u8> {
        config.write(0, &[select, subsel]);
        let mut size = [0u8];
        config.read(2, &mut size);
        let mut data = vec![0u8; usize::from(size[0])];
        config.read(8, &mut data);
        data
    }

    #[test]
    fn keyboard_answers_what_the_linux_driver_asks() {
        let mut c = InputConfig::new(InputIdentity::keyboard());
        assert_eq!(ask(&mut c, CFG_ID_NAME, 0), b"Pleiades Keyboard");
        assert_eq!(ask(&mut c, CFG_ID_SERIAL, 0), b"pleiades-keyboard-0");
        assert_eq!(ask(&mut c, CFG_ID_DEVIDS, 0), [6, 0, 0x27, 0x06, 1, 0, 1, 0]);
        assert_eq!(ask(&mut c, CFG_PROP_BITS, 0), b"");
        let keys = ask(&mut c, CFG_EV_BITS, EV_KEY as u8);
        assert_eq!(keys.len(), 32);
        assert_eq!(keys[0], 0xfe, "codes 1-7 set, 0 (KEY_RESERVED) not");
        assert!(keys[1..31].iter().all(|b| *b == 0xff), "{keys:?}");
        assert_eq!(keys[31], 1, "up to KEY_MICMUTE (248)");
        assert_eq!(ask(&mut c, CFG_EV_BITS, EV_LED as u8), [0b111]);
        assert_eq!(ask(&mut c, CFG_EV_BITS, EV_REP as u8), b"");
        assert_eq!(ask(&mut c, CFG_EV_BITS, EV_ABS as u8), b"");
        assert_eq!(ask(&mut c, CFG_ABS_INFO, 0), b"");
    }

    #[test]
    fn tablet_has_two_axes_three_buttons_and_a_wheel() {
        let mut c = InputConfig::new(InputIdentity::tablet());
        assert_eq!(ask(&mut c, CFG_ID_NAME, 0), b"Pleiades Tablet");
        let buttons = ask(&mut c, CFG_EV_BITS, EV_KEY as u8);
        assert_eq!(buttons.len(), 0x112 / 8 + 1);
        assert_eq!(buttons[0x110 / 8], 0b111);
        assert_eq!(ask(&mut c, CFG_EV_BITS, EV_REL as u8), [0, 1]);
        assert_eq!(ask(&mut c, CFG_EV_BITS, EV_ABS as u8), [0b11]);
        let x = ask(&mut c, CFG_ABS_INFO, ABS_X as u8);
        assert_eq!(x.len(), 20);
        assert_eq!(&x[4..8], &32767u32.to_le_bytes());
        assert_eq!(ask(&mut c, CFG_ABS_INFO, ABS_Y as u8), x);
        assert_eq!(ask(&mut c, CFG_ABS_INFO, 2), b"");
        assert_eq!(ask(&mut c, CFG_PROP_BITS, 0), b"", "INPUT_PROP_DIRECT is not set");
    }

    #[test]
    fn the_mouse_moves_relatively_with_three_buttons_and_a_wheel() {
        let mut c = InputConfig::new(InputIdentity::mouse());
        assert_eq!(ask(&mut c, CFG_ID_NAME, 0), b"Pleiades Mouse");
        assert_eq!(ask(&mut c, CFG_EV_BITS, EV_KEY as u8)[0x110 / 8], 0b111);
        assert_eq!(ask(&mut c, CFG_EV_BITS, EV_REL as u8), [0b11, 1], "REL_X, REL_Y and REL_WHEEL");
        assert_eq!(ask(&mut c, CFG_EV_BITS, EV_ABS as u8), b"", "no absolute axes");
    }

    #[test]
    fn unknown_selects_and_odd_accesses_read_size_zero() {
        let mut c = InputConfig::new(InputIdentity::tablet());
        for (select, subsel) in [(0, 0), (0x04, 0), (0x13, 0), (0xff, 0xff), (CFG_ID_NAME, 1)] {
            assert_eq!(ask(&mut c, select, subsel), b"", "{select:#x}/{subsel}");
        }
        // A whole-space write (as QEMU does) sets select/subsel and ignores the rest.
        let mut whole = [0xaau8; CONFIG_SIZE];
        whole[0] = CFG_ID_NAME;
        whole[1] = 0;
        c.write(0, &whole);
        let mut out = [0u8; CONFIG_SIZE];
        c.read(0, &mut out);
        assert_eq!(&out[..3], &[CFG_ID_NAME, 0, 15]);
        c.write(u64::MAX, &[1, 2, 3]);
        c.read(u64::MAX - 1, &mut out[..4]);
        assert_eq!(&out[..4], &[0, 0, 0, 0]);
    }
}
