//! Where the boot structures go in low guest memory, and the page tables and GDT the boot vCPU
//! starts with (the same for Linux and ELF guests).

use vm_memory::{Bytes, GuestAddress};

use super::BootError;
use crate::memory::GuestMemory;

/// The GDT: null, 64-bit code, data, TSS.
pub const GDT_ADDR: GuestAddress = GuestAddress(0x500);
/// An empty IDT: no interrupt handlers until the guest installs its own.
pub const IDT_ADDR: GuestAddress = GuestAddress(0x520);
/// The PVH `hvm_start_info` and its memory map.
pub const START_INFO_ADDR: GuestAddress = GuestAddress(0x6000);
pub const MEMMAP_ADDR: GuestAddress = GuestAddress(0x6040);
/// Linux's zero page (`boot_params`).
pub const ZERO_PAGE_ADDR: GuestAddress = GuestAddress(0x7000);
/// Identity-mapping page tables: PML4, one PDPT, four PDs of 2 MiB pages (0xb000..0xf000)
/// mapping the low 4 GiB, the MMIO hole included, so small guests reach the LAPIC and BARs.
pub const PML4_ADDR: GuestAddress = GuestAddress(0x9000);
pub const PDPT_ADDR: GuestAddress = GuestAddress(0xa000);
pub const PD_ADDR: GuestAddress = GuestAddress(0xb000);
/// Gigabytes identity-mapped at boot.
pub const IDENTITY_MAPPED_GIB: u64 = 4;
/// The kernel command line.
pub const CMDLINE_ADDR: GuestAddress = GuestAddress(0x2_0000);
/// Room for the command line, NUL included.
pub const CMDLINE_MAX: usize = 4096;

/// GDT selectors.
pub const CODE_SELECTOR: u16 = 1 << 3;
pub const DATA_SELECTOR: u16 = 2 << 3;
pub const TSS_SELECTOR: u16 = 3 << 3;

/// A GDT descriptor from its parts.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
}

/// The boot GDT: flat 64-bit code (L=1), flat data, a 32-bit TSS (KVM wants a usable TR).
pub const GDT: [u64; 4] =
    [0, gdt_entry(0xa09b, 0, 0xfffff), gdt_entry(0xc093, 0, 0xfffff), gdt_entry(0x808b, 0, 0xfffff)];

const PAGE_PRESENT_RW: u64 = 0x3;
const PAGE_SIZE_2M: u64 = 0x80;

/// Writes the GDT, an empty IDT and page tables identity-mapping the low 4 GiB.
pub fn write_page_tables_and_gdt(mem: &GuestMemory) -> Result<(), BootError> {
    let write = |value: u64, addr: GuestAddress| {
        mem.write_obj(value, addr).map_err(|e| BootError::GuestMemory(e.to_string()))
    };
    for (i, entry) in GDT.iter().enumerate() {
        write(*entry, GuestAddress(GDT_ADDR.0 + 8 * i as u64))?;
    }
    write(0, IDT_ADDR)?;
    write(PDPT_ADDR.0 | PAGE_PRESENT_RW, PML4_ADDR)?;
    for gib in 0..IDENTITY_MAPPED_GIB {
        let pd = PD_ADDR.0 + gib * 0x1000;
        write(pd | PAGE_PRESENT_RW, GuestAddress(PDPT_ADDR.0 + 8 * gib))?;
    }
    // The PDs are contiguous: entry i of the 2048 maps 2 MiB page i.
    for i in 0..512 * IDENTITY_MAPPED_GIB {
        write((i << 21) | PAGE_PRESENT_RW | PAGE_SIZE_2M, GuestAddress(PD_ADDR.0 + 8 * i))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_are_the_usual_flat_ones() {
        assert_eq!(GDT[1], 0x00af_9b00_0000_ffff);
        assert_eq!(GDT[2], 0x00cf_9300_0000_ffff);
        assert_eq!(GDT[3], 0x008f_8b00_0000_ffff);
    }

    #[test]
    fn the_low_four_gigabytes_are_identity_mapped() {
        let mem = crate::memory::create_guest_memory(16).unwrap();
        write_page_tables_and_gdt(&mem).unwrap();
        assert_eq!(mem.read_obj::<u64>(PML4_ADDR).unwrap(), 0xa003);
        assert_eq!(mem.read_obj::<u64>(GuestAddress(PDPT_ADDR.0 + 24)).unwrap(), 0xe003);
        assert_eq!(mem.read_obj::<u64>(GuestAddress(PD_ADDR.0 + 8 * 511)).unwrap(), (511 << 21) | 0x83);
        let lapic_entry = GuestAddress(PD_ADDR.0 + 8 * (0xfee0_0000 >> 21));
        assert_eq!(mem.read_obj::<u64>(lapic_entry).unwrap(), 0xfee0_0000 | 0x83);
    }
}
