//! Power control: the ACPI PM1a event and control blocks (the fixed-feature power button, the
//! SCI, power-off) and the i8042 reset line.

use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use crate::bus::{BusDevice, fill_le, le_value};
use crate::exit::{ExitLatch, ExitReason};

/// PM1 status and enable: PWRBTN_STS / PWRBTN_EN (ACPI 6.5, 4.8.3.1).
const PWRBTN: u16 = 1 << 8;
/// PM1_CNT's SCI_EN: ACPI mode. Always on: there is no legacy mode to switch from.
const SCI_EN: u16 = 1 << 0;
/// PM1a_CNT's SLP_EN bit; SLP_TYP (bits 10..13) 0 is S5 (soft off), as the DSDT's `\_S5` says.
const SLP_EN: u64 = 1 << 13;
const SLP_TYP_MASK: u64 = 0b111 << 10;

/// The PM1a event block (4 bytes: status, enable) at [`super::PM1A_EVT_PORT`] and the PM1a
/// control block (2 bytes) right after it, as the FADT describes them ([`crate::acpi`]).
#[derive(Debug)]
pub struct PmControl {
    latch: Arc<ExitLatch>,
    /// The SCI (an irqfd on GSI 9): pulsed when an enabled event becomes pending.
    sci: Option<EventFd>,
    status: u16,
    enable: u16,
    control: u16,
}

impl PmControl {
    /// `sci`: the SCI's irqfd (`None` in tests).
    pub fn new(latch: Arc<ExitLatch>, sci: Option<EventFd>) -> Self {
        Self { latch, sci, status: 0, enable: 0, control: SCI_EN }
    }

    /// Presses the power button: PWRBTN_STS is set, and the SCI raised if the guest enabled the
    /// event. Returns whether it did, i.e. whether an ACPI OS is listening.
    pub fn press_power_button(&mut self) -> bool {
        self.status |= PWRBTN;
        let listening = self.enable & PWRBTN != 0;
        if listening {
            self.raise_sci();
        }
        listening
    }

    /// Whether the guest enabled the power button event (an ACPI OS listens).
    pub fn power_button_enabled(&self) -> bool {
        self.enable & PWRBTN != 0
    }

    fn raise_sci(&self) {
        if let Some(sci) = &self.sci
            && let Err(e) = sci.write(1)
        {
            tracing::warn!("vmm: cannot raise the SCI: {e}");
        }
    }

    /// The 16-bit register at `offset` (0 status, 2 enable, 4 control).
    fn register(&self, offset: u64) -> u16 {
        match offset {
            0 => self.status,
            2 => self.enable,
            o if o == super::PM1A_CNT_OFFSET => self.control,
            _ => 0,
        }
    }

    fn write_register(&mut self, offset: u64, value: u16, full: u64) {
        match offset {
            // Status bits are cleared by writing 1s.
            0 => self.status &= !value,
            2 => {
                let newly = value & !self.enable;
                self.enable = value;
                if newly & self.status != 0 {
                    self.raise_sci();
                }
            }
            o if o == super::PM1A_CNT_OFFSET => {
                if full & SLP_EN != 0 && full & SLP_TYP_MASK == 0 {
                    self.latch.exit(ExitReason::PowerOff);
                }
                // SLP_EN is write-only; other sleep types are not supported and ignored.
                self.control = (value & !(SLP_EN as u16)) | SCI_EN;
            }
            _ => {}
        }
    }
}

impl BusDevice for PmControl {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // Byte, word and dword accesses: each byte from the 16-bit register holding it.
        let mut value = 0u64;
        for i in 0..data.len().min(8) as u64 {
            let at = offset + i;
            let word = self.register(at & !1);
            let byte = if at & 1 == 0 { word & 0xff } else { word >> 8 };
            value |= u64::from(byte) << (8 * i);
        }
        fill_le(data, value);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let full = le_value(data);
        if offset.is_multiple_of(2) && data.len() >= 2 {
            // Whole registers (a dword write at 0 sets status and enable).
            for (i, chunk) in data.chunks(2).enumerate() {
                let value = u16::from(chunk[0]) | chunk.get(1).map_or(0, |b| u16::from(*b) << 8);
                self.write_register(offset + 2 * i as u64, value, full >> (16 * i));
            }
        } else {
            // A single byte: merge it into its register.
            let reg = offset & !1;
            let current = if reg == 0 { 0 } else { self.register(reg) };
            let value = if offset & 1 == 0 {
                (current & 0xff00) | u16::from(data[0])
            } else {
                (current & 0x00ff) | (u16::from(data[0]) << 8)
            };
            self.write_register(reg, value, u64::from(value));
        }
    }
}

/// The i8042 just enough for a guest to reset the machine (command 0xFE on port 0x64) and for
/// Linux's probe to find no keyboard.
#[derive(Debug)]
pub struct I8042 {
    latch: Arc<ExitLatch>,
}

impl I8042 {
    pub fn new(latch: Arc<ExitLatch>) -> Self {
        Self { latch }
    }
}

const I8042_COMMAND_OFFSET: u64 = 4;
const I8042_CMD_RESET: u8 = 0xfe;

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Status 0: output buffer empty, input buffer empty; data reads 0.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == I8042_COMMAND_OFFSET && data.first() == Some(&I8042_CMD_RESET) {
            self.latch.exit(ExitReason::Reboot);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exit::StopRequest;

    #[test]
    fn slp_en_with_s5_powers_off() {
        let latch = Arc::new(ExitLatch::new());
        let mut pm = PmControl::new(latch.clone(), None);
        pm.write(4, &0x1c00u16.to_le_bytes()); // SLP_TYP 7 without SLP_EN: nothing
        pm.write(4, &(0x1c00u16 | 0x2000).to_le_bytes()); // S7?: not S5, ignored
        pm.write(0, &[0xff; 4]);
        assert!(!latch.stopping());
        pm.write(4, &0x2000u16.to_le_bytes());
        assert_eq!(latch.wait(), StopRequest::Exit(ExitReason::PowerOff));
    }

    #[test]
    fn the_power_button_raises_the_sci_once_the_guest_enables_it() {
        let latch = Arc::new(ExitLatch::new());
        let sci = EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap();
        let mut pm = PmControl::new(latch, Some(sci.try_clone().unwrap()));
        // SCI_EN reads set: ACPI mode without a switch.
        let mut cnt = [0u8; 2];
        pm.read(4, &mut cnt);
        assert_eq!(u16::from_le_bytes(cnt) & 1, 1);
        // Not enabled yet: the status is pending, no interrupt.
        assert!(!pm.press_power_button());
        assert!(sci.read().is_err(), "no SCI while PWRBTN_EN is clear");
        // Enabling a pending event raises the SCI at once.
        pm.write(2, &0x100u16.to_le_bytes());
        assert_eq!(sci.read().unwrap(), 1);
        let mut status = [0u8; 4];
        pm.read(0, &mut status);
        assert_eq!(u32::from_le_bytes(status), 0x0100_0100, "status and enable in one dword");
        // The guest clears it by writing 1; the next press interrupts again.
        pm.write(0, &0x100u16.to_le_bytes());
        pm.read(0, &mut status[..2]);
        assert_eq!(u16::from_le_bytes([status[0], status[1]]), 0);
        assert!(pm.press_power_button());
        assert_eq!(sci.read().unwrap(), 1);
        // Byte accesses see the same registers.
        let mut byte = [0u8; 1];
        pm.read(1, &mut byte);
        assert_eq!(byte, [1], "PWRBTN_STS is bit 8: the status's high byte");
    }

    #[test]
    fn i8042_reset_reboots() {
        let latch = Arc::new(ExitLatch::new());
        let mut kbd = I8042::new(latch.clone());
        kbd.write(0, &[0xfe]);
        let mut status = [0xffu8];
        kbd.read(4, &mut status);
        assert_eq!(status, [0]);
        assert!(!latch.stopping());
        kbd.write(4, &[0xfe]);
        assert_eq!(latch.wait(), StopRequest::Exit(ExitReason::Reboot));
    }
}
