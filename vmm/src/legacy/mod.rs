//! Legacy PC devices on the port-I/O bus: the COM1 16550, the CMOS RTC, the power-off port, the
//! i8042 reset.
//! The 0xCF9 reset register shares its port range with PCI config mechanism #1 and lives in
//! [`super::pci::PciConfigIo`].

pub mod cmos;
pub mod power;
pub mod serial;

pub use cmos::Cmos;
pub use power::{I8042, PmControl};
pub use serial::{SerialOut, SerialPort};

/// COM1's ports and IRQ.
pub const COM1_PORT: u64 = 0x3f8;
pub const COM1_IRQ: u32 = 4;
/// ACPI PM1a event and control block (as on QEMU q35: PM1a_CNT at 0x604).
pub const PM1A_EVT_PORT: u64 = 0x600;
pub const PM1A_CNT_OFFSET: u64 = 4;
/// The i8042 keyboard controller's data and command ports (0x60, 0x64).
pub const I8042_PORT: u64 = 0x60;
