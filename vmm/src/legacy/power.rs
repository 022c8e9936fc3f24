//! Power control: the ACPI PM1a control register (power-off) and the i8042 reset line.

use std::sync::Arc;

use crate::bus::{BusDevice, fill_le, le_value};
use crate::exit::{ExitLatch, ExitReason};

/// PM1a_CNT's SLP_EN bit; SLP_TYP (bits 10..13) 0 is S5 (soft off) as on QEMU q35.
const SLP_EN: u64 = 1 << 13;
const SLP_TYP_MASK: u64 = 0b111 << 10;

/// The ACPI PM1a event block (0x600, 4 bytes) and control register (0x604, 2 bytes).
#[derive(Debug)]
pub struct PmControl {
    latch: Arc<ExitLatch>,
    control: u16,
}

impl PmControl {
    pub fn new(latch: Arc<ExitLatch>) -> Self {
        Self { latch, control: 0 }
    }
}

impl BusDevice for PmControl {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = if offset == super::PM1A_CNT_OFFSET { u64::from(self.control) } else { 0 };
        fill_le(data, value);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset != super::PM1A_CNT_OFFSET {
            return;
        }
        let value = le_value(data);
        if value & SLP_EN != 0 && value & SLP_TYP_MASK == 0 {
            self.latch.exit(ExitReason::PowerOff);
        }
        // SLP_EN is write-only; other sleep types are not supported and ignored.
        self.control = (value & !SLP_EN) as u16;
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
        let mut pm = PmControl::new(latch.clone());
        pm.write(4, &0x1c00u16.to_le_bytes()); // SLP_TYP 7 without SLP_EN: nothing
        pm.write(4, &(0x1c00u16 | 0x2000).to_le_bytes()); // S7?: not S5, ignored
        pm.write(0, &[0xff; 4]);
        assert!(!latch.stopping());
        pm.write(4, &0x2000u16.to_le_bytes());
        assert_eq!(latch.wait(), StopRequest::Exit(ExitReason::PowerOff));
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
