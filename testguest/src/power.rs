//! Powering off: S5 through the ACPI PM1a control register at I/O port 0x604 (q35's, and
//! what Pleiades' VMM implements), then halting for good if that did nothing.

use crate::arch::{halt_forever, outw};

const PM1A_CNT: u16 = 0x604;
/// SLP_EN with SLP_TYP 0 (q35's S5).
const SLP_EN_S5: u16 = 1 << 13;

pub fn off() -> ! {
    crate::interrupts::stop_timer();
    outw(PM1A_CNT, SLP_EN_S5);
    halt_forever()
}
