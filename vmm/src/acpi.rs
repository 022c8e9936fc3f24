//! The ACPI tables the guest finds at boot: RSDP → XSDT → FADT (+ FACS, DSDT) and MADT.
//!
//! A legacy (not hardware-reduced) platform, the way a PC and QEMU's q35 present it, reduced to
//! what the VMM really has:
//! - **FADT**: the PM1a event block at [`legacy::PM1A_EVT_PORT`] (status and enable, with the
//!   fixed-feature power button) and the PM1a control block after it (sleep type and enable:
//!   `poweroff` writes S5 there), the SCI on IRQ 9, ACPI always enabled (no SMI command port),
//!   the reset register at port 0xCF9 (value 6, as on a PC), and the boot architecture flags
//!   that say there is no i8042 and no VGA (Linux then skips probing them). No PM timer, no
//!   GPE blocks, no sleep button.
//! - **DSDT**: `\_S5` (sleep type 0, what [`legacy::power`] takes as soft off) and the PCI host
//!   bridge `\_SB.PCI0` (bus 0, config mechanism #1 ports, the I/O ranges and the MMIO window
//!   where the VMM puts BARs). No `_PRT`: every device uses MSI-X.
//! - **MADT**: one enabled local APIC per vCPU (APIC id = vCPU index), the IOAPIC, and the
//!   SCI's interrupt source override (level-triggered), and LINT1 as NMI.
//!
//! The tables live in the reserved low-memory area at [`ACPI_TABLES_ADDR`]; Linux is told
//! where the RSDP is through the zero page (`acpi_rsdp_addr`), ELF guests through the PVH
//! start info, and both could also find it by scanning 0xE0000..0xFFFFF.

use acpi_tables::Aml;
use acpi_tables::aml::{
    AddressSpace, AddressSpaceCacheable, Device, EISAName, IO, Name, Package, ResourceTemplate, Scope,
};
use acpi_tables::sdt::Sdt;
use acpi_tables::{facs::FACS, rsdp::Rsdp, xsdt::XSDT};
use vm_memory::{Bytes, GuestAddress};

use crate::legacy;
use crate::memory::{GuestMemory, PCI_MMIO_END, PCI_MMIO_START};

/// Where the tables go: the reserved area below the BIOS area (E820 reserved).
pub const ACPI_TABLES_ADDR: GuestAddress = GuestAddress(0xe_0000);
/// The room they have (up to the MP table's BIOS area).
pub const ACPI_TABLES_SIZE: u64 = 0x1_0000;
/// The SCI's ISA IRQ (and GSI).
pub const SCI_IRQ: u32 = 9;
/// The IOAPIC's address and the local APICs' (KVM's in-kernel irqchip puts them there).
const IOAPIC_ADDR: u32 = 0xfec0_0000;
const LAPIC_ADDR: u32 = 0xfee0_0000;
/// The reset register (shared with PCI config mechanism #1's range) and what resets.
const RESET_PORT: u64 = 0xcf9;
const RESET_VALUE: u8 = 0x6;

const OEM_ID: [u8; 6] = *b"PLEIAD";
const OEM_REVISION: u32 = 1;

/// FADT (revision 6, 276 bytes) field offsets (ACPI 6.5, 5.2.9).
mod fadt {
    pub const LENGTH: u32 = 276;
    pub const FIRMWARE_CTRL: usize = 36;
    pub const DSDT: usize = 40;
    pub const SCI_INT: usize = 46;
    pub const PM1A_EVT_BLK: usize = 56;
    pub const PM1A_CNT_BLK: usize = 64;
    pub const PM1_EVT_LEN: usize = 88;
    pub const PM1_CNT_LEN: usize = 89;
    pub const IAPC_BOOT_ARCH: usize = 109;
    pub const FLAGS: usize = 112;
    pub const RESET_REG: usize = 116;
    pub const RESET_VALUE: usize = 128;
    pub const MINOR_VERSION: usize = 131;
    pub const X_FIRMWARE_CTRL: usize = 132;
    pub const X_DSDT: usize = 140;
    pub const X_PM1A_EVT_BLK: usize = 148;
    pub const X_PM1A_CNT_BLK: usize = 172;
    pub const HYPERVISOR_VENDOR: usize = 268;

    /// IA-PC boot architecture flags: bit 0 legacy devices, 1 8042, 2 VGA not present,
    /// 3 MSI not supported, 4 PCIe ASPM controls, 5 CMOS RTC not present.
    pub const BOOT_ARCH_VGA_NOT_PRESENT: u16 = 1 << 2;
    /// FADT flags: 0 WBINVD, 4 PWR_BUTTON (1: no fixed-feature power button), 5 SLP_BUTTON
    /// (1: none), 8 TMR_VAL_EXT, 10 RESET_REG_SUP.
    pub const FLAG_WBINVD: u32 = 1 << 0;
    pub const FLAG_NO_SLEEP_BUTTON: u32 = 1 << 5;
    pub const FLAG_RESET_REG_SUP: u32 = 1 << 10;
}

/// A Generic Address Structure for a port-I/O register of `bits` bits.
fn io_gas(port: u64, bits: u8, access_size: u8) -> [u8; 12] {
    let mut gas = [0u8; 12];
    gas[0] = 1; // system I/O
    gas[1] = bits;
    gas[2] = 0; // bit offset
    gas[3] = access_size; // 1 byte, 2 word, 3 dword, 4 qword
    gas[4..12].copy_from_slice(&port.to_le_bytes());
    gas
}

/// The DSDT's AML: `\_S5` and the PCI host bridge.
fn dsdt() -> Sdt {
    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, *b"PLDSDT  ", OEM_REVISION);
    let mut aml = Vec::new();
    // \_S5: SLP_TYPa, SLP_TYPb (and two reserved values).
    let zero = 0u8;
    Name::new("_S5_".into(), &Package::new(vec![&zero, &zero, &zero, &zero])).to_aml_bytes(&mut aml);
    let hid = EISAName::new("PNP0A03");
    let uid = 0u8;
    let seg = 0u8;
    let bus_numbers = AddressSpace::new_bus_number(0u16, 0xffu16);
    let config_ports = IO::new(0xcf8, 0xcf8, 1, 8);
    let io_low = AddressSpace::new_io(0u16, 0xcf7u16, None);
    let io_high = AddressSpace::new_io(0xd00u16, 0xffffu16, None);
    let window = AddressSpace::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        PCI_MMIO_START as u32,
        (PCI_MMIO_END - 1) as u32,
        None,
    );
    let crs = ResourceTemplate::new(vec![&bus_numbers, &config_ports, &io_low, &io_high, &window]);
    let names = [
        Name::new("_HID".into(), &hid),
        Name::new("_UID".into(), &uid),
        Name::new("_SEG".into(), &seg),
        Name::new("_BBN".into(), &seg),
        Name::new("_CRS".into(), &crs),
    ];
    let pci0 = Device::new("PCI0".into(), names.iter().map(|n| n as &dyn Aml).collect());
    Scope::new("\\_SB_".into(), vec![&pci0]).to_aml_bytes(&mut aml);
    dsdt.append_slice(&aml);
    dsdt
}

fn fadt_table(dsdt: u64, facs: u64) -> Sdt {
    let mut t = Sdt::new(*b"FACP", fadt::LENGTH, 6, OEM_ID, *b"PLFACP  ", OEM_REVISION);
    let evt = legacy::PM1A_EVT_PORT;
    let cnt = legacy::PM1A_EVT_PORT + legacy::PM1A_CNT_OFFSET;
    t.write_u32(fadt::FIRMWARE_CTRL, facs as u32);
    t.write_u32(fadt::DSDT, dsdt as u32);
    t.write_u16(fadt::SCI_INT, SCI_IRQ as u16);
    // SMI_CMD stays 0: ACPI is always enabled, there is no legacy mode to leave.
    t.write_u32(fadt::PM1A_EVT_BLK, evt as u32);
    t.write_u32(fadt::PM1A_CNT_BLK, cnt as u32);
    t.write_u8(fadt::PM1_EVT_LEN, 4);
    t.write_u8(fadt::PM1_CNT_LEN, 2);
    t.write_u16(fadt::IAPC_BOOT_ARCH, fadt::BOOT_ARCH_VGA_NOT_PRESENT);
    t.write_u32(fadt::FLAGS, fadt::FLAG_WBINVD | fadt::FLAG_NO_SLEEP_BUTTON | fadt::FLAG_RESET_REG_SUP);
    t.write_bytes(fadt::RESET_REG, &io_gas(RESET_PORT, 8, 1));
    t.write_u8(fadt::RESET_VALUE, RESET_VALUE);
    t.write_u8(fadt::MINOR_VERSION, 5);
    t.write_u64(fadt::X_FIRMWARE_CTRL, facs);
    t.write_u64(fadt::X_DSDT, dsdt);
    t.write_bytes(fadt::X_PM1A_EVT_BLK, &io_gas(evt, 32, 2));
    t.write_bytes(fadt::X_PM1A_CNT_BLK, &io_gas(cnt, 16, 2));
    t.write_bytes(fadt::HYPERVISOR_VENDOR, b"PLEIADES");
    t.update_checksum();
    t
}

fn madt_table(cpus: u8) -> Sdt {
    let mut t = Sdt::new(*b"APIC", 44, 5, OEM_ID, *b"PLMADT  ", OEM_REVISION);
    t.write_u32(36, LAPIC_ADDR);
    t.write_u32(40, 1); // PCAT_COMPAT: the legacy 8259s exist (masked).
    for cpu in 0..cpus {
        // Type 0, length 8: ACPI processor UID, APIC id, flags (1: enabled).
        t.append_slice(&[0, 8, cpu, cpu, 1, 0, 0, 0]);
    }
    // Type 1, length 12: IOAPIC id (after the CPUs'), reserved, address, GSI base 0.
    let mut ioapic = vec![1, 12, cpus, 0];
    ioapic.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    ioapic.extend_from_slice(&0u32.to_le_bytes());
    t.append_slice(&ioapic);
    // Type 2, length 10: bus 0 (ISA), source IRQ, GSI, flags (polarity bits 0-1, trigger 2-3).
    // The ISA IRQs are the IOAPIC pins of the same number (KVM's routes, the MP table): only
    // the SCI differs from ISA's edge default, active high and level-triggered. (Not IRQ 0 →
    // GSI 2 as on real boards: KVM's PIT raises GSI 0, and a timer override to pin 2 left Linux
    // without timer interrupts.)
    let mut sci = vec![2, 10, 0, SCI_IRQ as u8];
    sci.extend_from_slice(&SCI_IRQ.to_le_bytes());
    sci.extend_from_slice(&0b1101u16.to_le_bytes());
    t.append_slice(&sci);
    // Type 4, length 6: LINT1 of every local APIC (0xff) is the NMI, conforming flags.
    t.append_slice(&[4, 6, 0xff, 0, 0, 1]);
    t.update_checksum();
    t
}

/// Everything above, laid out from [`ACPI_TABLES_ADDR`]: the bytes and the RSDP's address.
pub fn tables(cpus: u8) -> (Vec<u8>, GuestAddress) {
    let base = ACPI_TABLES_ADDR.0;
    let mut bytes = Vec::new();
    let place = |bytes: &mut Vec<u8>, table: &[u8], align: usize| -> u64 {
        while !bytes.len().is_multiple_of(align) {
            bytes.push(0);
        }
        let at = base + bytes.len() as u64;
        bytes.extend_from_slice(table);
        at
    };
    // The RSDP first (it points at the XSDT, written below once its address is known).
    let rsdp_at = place(&mut bytes, &[0u8; 36], 16);
    let dsdt = dsdt();
    let dsdt_at = place(&mut bytes, dsdt.as_slice(), 8);
    let mut facs_bytes = Vec::new();
    FACS::new().to_aml_bytes(&mut facs_bytes);
    let facs_at = place(&mut bytes, &facs_bytes, 64);
    let fadt_at = place(&mut bytes, fadt_table(dsdt_at, facs_at).as_slice(), 8);
    let madt_at = place(&mut bytes, madt_table(cpus).as_slice(), 8);
    let mut xsdt = XSDT::new(OEM_ID, *b"PLXSDT  ", OEM_REVISION);
    xsdt.add_entry(fadt_at);
    xsdt.add_entry(madt_at);
    let mut xsdt_bytes = Vec::new();
    xsdt.to_aml_bytes(&mut xsdt_bytes);
    let xsdt_at = place(&mut bytes, &xsdt_bytes, 8);
    let mut rsdp = Vec::new();
    Rsdp::new(OEM_ID, xsdt_at).to_aml_bytes(&mut rsdp);
    let offset = (rsdp_at - base) as usize;
    bytes[offset..offset + rsdp.len()].copy_from_slice(&rsdp);
    (bytes, GuestAddress(rsdp_at))
}

/// Errors writing the tables.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error("the ACPI tables need {0} bytes, more than the {ACPI_TABLES_SIZE} reserved for them")]
    TooLarge(usize),
    #[error("cannot write the ACPI tables to guest memory: {0}")]
    GuestMemory(String),
}

/// Writes the tables for `cpus` vCPUs; returns the RSDP's address.
pub fn write(mem: &GuestMemory, cpus: u8) -> Result<GuestAddress, AcpiError> {
    let (bytes, rsdp) = tables(cpus);
    if bytes.len() as u64 > ACPI_TABLES_SIZE {
        return Err(AcpiError::TooLarge(bytes.len()));
    }
    mem.write_slice(&bytes, ACPI_TABLES_ADDR).map_err(|e| AcpiError::GuestMemory(e.to_string()))?;
    Ok(rsdp)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table_at(bytes: &[u8], addr: u64) -> &[u8] {
        let off = (addr - ACPI_TABLES_ADDR.0) as usize;
        let len = u32::from_le_bytes(bytes[off + 4..off + 8].try_into().unwrap()) as usize;
        &bytes[off..off + len]
    }

    fn checksum_ok(table: &[u8]) -> bool {
        table.iter().fold(0u8, |s, b| s.wrapping_add(*b)) == 0
    }

    #[test]
    fn the_tables_chain_from_the_rsdp_with_valid_checksums() {
        let (bytes, rsdp) = tables(2);
        let off = (rsdp.0 - ACPI_TABLES_ADDR.0) as usize;
        let r = &bytes[off..off + 36];
        assert_eq!(&r[..8], b"RSD PTR ");
        assert!(checksum_ok(&r[..20]), "the ACPI 1.0 checksum");
        assert!(checksum_ok(r), "the extended checksum");
        let xsdt_at = u64::from_le_bytes(r[24..32].try_into().unwrap());
        let xsdt = table_at(&bytes, xsdt_at);
        assert_eq!(&xsdt[..4], b"XSDT");
        assert!(checksum_ok(xsdt));
        let entries: Vec<u64> =
            xsdt[36..].chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap())).collect();
        let signatures: Vec<&[u8]> = entries.iter().map(|&a| &table_at(&bytes, a)[..4]).collect();
        assert_eq!(signatures, [b"FACP", b"APIC"]);
        for &a in &entries {
            assert!(checksum_ok(table_at(&bytes, a)));
        }
        let fadt = table_at(&bytes, entries[0]);
        assert_eq!(fadt.len(), 276);
        let x_dsdt = u64::from_le_bytes(fadt[140..148].try_into().unwrap());
        let dsdt = table_at(&bytes, x_dsdt);
        assert_eq!(&dsdt[..4], b"DSDT");
        assert!(checksum_ok(dsdt));
        // The PM registers are where the VMM's power device answers; the SCI is IRQ 9.
        assert_eq!(u32::from_le_bytes(fadt[56..60].try_into().unwrap()), 0x600);
        assert_eq!(u32::from_le_bytes(fadt[64..68].try_into().unwrap()), 0x604);
        assert_eq!(u16::from_le_bytes(fadt[46..48].try_into().unwrap()), 9);
        let flags = u32::from_le_bytes(fadt[112..116].try_into().unwrap());
        assert_eq!(flags & (1 << 4), 0, "the fixed-feature power button is present");
        let facs = table_at(&bytes, u64::from_le_bytes(fadt[132..140].try_into().unwrap()));
        assert_eq!(&facs[..4], b"FACS");
        assert!(bytes.len() as u64 <= ACPI_TABLES_SIZE);
    }

    #[test]
    fn the_madt_lists_every_cpu_and_the_ioapic() {
        for cpus in [1u8, 2, 8, 254] {
            let madt = madt_table(cpus);
            let t = madt.as_slice();
            assert!(checksum_ok(t));
            let mut at = 44;
            let (mut lapics, mut ioapics, mut overrides, mut nmis) = (Vec::new(), 0, Vec::new(), 0);
            while at < t.len() {
                let (kind, len) = (t[at], t[at + 1] as usize);
                match kind {
                    0 => lapics.push((t[at + 3], t[at + 4])),
                    1 => ioapics += 1,
                    2 => overrides.push((t[at + 3], t[at + 4])),
                    4 => nmis += 1,
                    _ => panic!("unexpected entry {kind}"),
                }
                at += len;
            }
            assert_eq!(at, t.len());
            assert_eq!(lapics, (0..cpus).map(|c| (c, 1)).collect::<Vec<_>>());
            assert_eq!((ioapics, nmis), (1, 1));
            assert_eq!(overrides, [(9, 9)], "only the SCI is overridden (level-triggered)");
        }
    }

    /// ACPICA's own disassembler (`iasl -d`, Debian's `acpica-tools`), the outside reference:
    /// every table decodes without an error, and says what we meant.
    #[test]
    fn acpica_reads_the_tables_as_meant() {
        let Some(iasl) = pleiades_testkit::prerequisite::require(
            "acpica_reads_the_tables_as_meant",
            pleiades_testkit::prerequisite::command("iasl"),
        ) else {
            return;
        };
        let (bytes, rsdp) = tables(2);
        let off = (rsdp.0 - ACPI_TABLES_ADDR.0) as usize;
        let xsdt = table_at(&bytes, u64::from_le_bytes(bytes[off + 24..off + 32].try_into().unwrap()));
        let fadt_at = u64::from_le_bytes(xsdt[36..44].try_into().unwrap());
        let madt_at = u64::from_le_bytes(xsdt[44..52].try_into().unwrap());
        let fadt = table_at(&bytes, fadt_at);
        let dsdt = table_at(&bytes, u64::from_le_bytes(fadt[140..148].try_into().unwrap()));
        let dir = tempfile::tempdir().unwrap();
        let mut decoded = Vec::new();
        for (name, table) in [("dsdt", dsdt), ("facp", fadt), ("apic", table_at(&bytes, madt_at))] {
            let file = dir.path().join(format!("{name}.dat"));
            std::fs::write(&file, table).unwrap();
            let out = std::process::Command::new(&iasl)
                .arg("-d")
                .arg(&file)
                .current_dir(dir.path())
                .output()
                .unwrap();
            let text =
                format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
            assert!(out.status.success(), "iasl -d {name}: {text}");
            assert!(!text.to_lowercase().contains("error"), "iasl -d {name}: {text}");
            decoded.push(std::fs::read_to_string(dir.path().join(format!("{name}.dsl"))).unwrap());
        }
        let [dsdt, facp, apic] = [&decoded[0], &decoded[1], &decoded[2]];
        for needle in ["Name (_S5, Package", "Device (PCI0)", "EisaId (\"PNP0A03\")", "WordBusNumber"] {
            assert!(dsdt.contains(needle), "{needle} in:\n{dsdt}");
        }
        for needle in [
            "PM1A Event Block Address : 00000600",
            "PM1A Control Block Address : 00000604",
            "SCI Interrupt : 0009",
            "Control Method Power Button (V1) : 0",
            "Reset Register Supported (V2) : 1",
            "Value to cause reset : 06",
        ] {
            assert!(facp.contains(needle), "{needle} in:\n{facp}");
        }
        assert_eq!(apic.matches("Subtable Type : 00 [Processor Local APIC]").count(), 2, "{apic}");
        assert!(apic.contains("Source : 09") && apic.contains("Trigger Mode : 3"), "the SCI, level: {apic}");
    }

    #[test]
    fn the_dsdt_names_s5_and_the_pci_host_bridge() {
        let dsdt = dsdt();
        let aml = &dsdt.as_slice()[36..];
        let has = |needle: &[u8]| aml.windows(needle.len()).any(|w| w == needle);
        assert!(has(b"_S5_") && has(b"_SB_") && has(b"PCI0") && has(b"_CRS"));
        // EISA id PNP0A03, compressed.
        assert!(has(&[0x41, 0xd0, 0x0a, 0x03]));
    }
}
