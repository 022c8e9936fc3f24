//! The Intel MultiProcessor table (MP spec 1.4) in the BIOS area: how a guest without ACPI
//! counts and starts its CPUs and finds the IOAPIC and the ISA interrupts.

use vm_memory::{Bytes, GuestAddress};

use super::BootError;
use crate::memory::{BIOS_AREA_START, GuestMemory, IOAPIC_ADDR, LAPIC_ADDR};

/// The floating pointer goes at the start of the BIOS area, the table right after it.
pub const MPTABLE_ADDR: GuestAddress = GuestAddress(BIOS_AREA_START);

const MP_SPEC_REV: u8 = 4;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
/// Family 6 signature and the FPU/APIC feature bits: what guests expect of a processor entry.
const CPU_SIGNATURE: u32 = (6 << 8) | (1 << 4) | 1;
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9);
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IOINTR: u8 = 3;
const ENTRY_LOCALINTR: u8 = 4;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
const ISA_BUS_ID: u8 = 0;
/// The ISA IRQs (0..16) wired to the IOAPIC pins of the same number.
const ISA_IRQS: u8 = 16;

/// The IOAPIC's id: after the CPUs' APIC ids.
pub fn ioapic_id(cpus: u8) -> u8 {
    cpus
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |sum, b| sum.wrapping_sub(*b))
}

/// The floating pointer and the configuration table, as bytes, for a guest at `addr`.
pub fn table_bytes(addr: GuestAddress, cpus: u8) -> Vec<u8> {
    let table_addr = addr.0 as u32 + 16;
    let mut entries = Vec::new();
    let mut count = 0u16;
    for cpu in 0..cpus {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BOOTPROCESSOR } else { 0 };
        entries.extend_from_slice(&[ENTRY_PROCESSOR, cpu, APIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, ISA_BUS_ID]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    let ioapic = ioapic_id(cpus);
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&(IOAPIC_ADDR as u32).to_le_bytes());
    count += 1;
    for irq in 0..ISA_IRQS {
        // Conforming polarity and trigger (flags 0): edge, active high for ISA.
        entries.extend_from_slice(&[ENTRY_IOINTR, INT_TYPE_INT, 0, 0, ISA_BUS_ID, irq, ioapic, irq]);
        count += 1;
    }
    // LINT0 is the 8259's ExtINT, LINT1 NMI, on every local APIC (0xff).
    entries.extend_from_slice(&[ENTRY_LOCALINTR, INT_TYPE_EXTINT, 0, 0, ISA_BUS_ID, 0, 0xff, 0]);
    entries.extend_from_slice(&[ENTRY_LOCALINTR, INT_TYPE_NMI, 0, 0, ISA_BUS_ID, 0, 0xff, 1]);
    count += 2;

    let mut header = Vec::with_capacity(44);
    header.extend_from_slice(b"PCMP");
    header.extend_from_slice(&((44 + entries.len()) as u16).to_le_bytes());
    header.extend_from_slice(&[MP_SPEC_REV, 0]);
    header.extend_from_slice(b"PLEIADES");
    header.extend_from_slice(b"PLEIADES-VMM");
    header.extend_from_slice(&0u32.to_le_bytes()); // OEM table
    header.extend_from_slice(&0u16.to_le_bytes());
    header.extend_from_slice(&count.to_le_bytes());
    header.extend_from_slice(&(LAPIC_ADDR as u32).to_le_bytes());
    header.extend_from_slice(&[0, 0, 0, 0]); // extended table length, checksum, reserved
    let mut table = header;
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut floating = Vec::with_capacity(16);
    floating.extend_from_slice(b"_MP_");
    floating.extend_from_slice(&table_addr.to_le_bytes());
    floating.extend_from_slice(&[1, MP_SPEC_REV, 0, 0, 0, 0, 0, 0]);
    floating[10] = checksum(&floating);

    floating.extend_from_slice(&table);
    floating
}

/// Writes the MP table for `cpus` vCPUs.
pub fn write(mem: &GuestMemory, cpus: u8) -> Result<(), BootError> {
    mem.write_slice(&table_bytes(MPTABLE_ADDR, cpus), MPTABLE_ADDR)
        .map_err(|e| BootError::GuestMemory(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b))
    }

    #[test]
    fn checksums_hold_and_every_cpu_is_listed() {
        let bytes = table_bytes(MPTABLE_ADDR, 3);
        assert_eq!(&bytes[..4], b"_MP_");
        assert_eq!(sum(&bytes[..16]), 0);
        assert_eq!(u32::from_le_bytes(bytes[4..8].try_into().unwrap()), 0xf_0010);
        let table = &bytes[16..];
        assert_eq!(&table[..4], b"PCMP");
        let len = u16::from_le_bytes([table[4], table[5]]) as usize;
        assert_eq!(len, table.len());
        assert_eq!(sum(table), 0);
        let count = u16::from_le_bytes([table[34], table[35]]);
        assert_eq!(count, 3 + 1 + 1 + 16 + 2);
        let cpus: Vec<_> =
            (0..3).map(|i| (table[44 + 20 * i], table[44 + 20 * i + 1], table[44 + 20 * i + 3])).collect();
        assert_eq!(cpus, [(0, 0, 3), (0, 1, 1), (0, 2, 1)]);
    }
}
