//! The PVH `hvm_start_info` that ELF guests find through `rsi` (xen/include/public/arch-x86/
//! hvm/start_info.h): magic, version 1, the command line, the ACPI RSDP and an E820-style
//! memory map.

use vm_memory::{Bytes, GuestAddress};

use super::BootError;
use super::layout::{MEMMAP_ADDR, START_INFO_ADDR};
use crate::memory::{GuestMemory, e820_map};

/// `XEN_HVM_START_MAGIC_VALUE`.
pub const START_INFO_MAGIC: u32 = 0x336e_c578;

/// The start info bytes (56 bytes, little-endian, no modules).
pub fn start_info_bytes(
    cmdline: GuestAddress,
    rsdp: GuestAddress,
    memmap: GuestAddress,
    entries: u32,
) -> Vec<u8> {
    let mut b = Vec::with_capacity(56);
    b.extend_from_slice(&START_INFO_MAGIC.to_le_bytes());
    b.extend_from_slice(&1u32.to_le_bytes()); // version
    b.extend_from_slice(&0u32.to_le_bytes()); // flags
    b.extend_from_slice(&0u32.to_le_bytes()); // nr_modules
    b.extend_from_slice(&0u64.to_le_bytes()); // modlist_paddr
    b.extend_from_slice(&cmdline.0.to_le_bytes());
    b.extend_from_slice(&rsdp.0.to_le_bytes());
    b.extend_from_slice(&memmap.0.to_le_bytes());
    b.extend_from_slice(&entries.to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes()); // reserved
    b
}

/// Writes the start info and memory map; returns the start info's address (for `rsi`).
pub fn write_start_info(
    mem: &GuestMemory,
    cmdline: GuestAddress,
    rsdp: GuestAddress,
    mem_size: u64,
) -> Result<GuestAddress, BootError> {
    let map = e820_map(mem_size);
    let mut table = Vec::new();
    for entry in &map {
        table.extend_from_slice(&entry.addr.0.to_le_bytes());
        table.extend_from_slice(&entry.size.to_le_bytes());
        table.extend_from_slice(&(entry.kind as u32).to_le_bytes());
        table.extend_from_slice(&0u32.to_le_bytes());
    }
    let info = start_info_bytes(cmdline, rsdp, MEMMAP_ADDR, map.len() as u32);
    let err = |e: vm_memory::GuestMemoryError| BootError::GuestMemory(e.to_string());
    mem.write_slice(&table, MEMMAP_ADDR).map_err(err)?;
    mem.write_slice(&info, START_INFO_ADDR).map_err(err)?;
    Ok(START_INFO_ADDR)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_info_has_the_pvh_layout() {
        let mem = crate::memory::create_guest_memory(64).unwrap();
        let addr = write_start_info(&mem, GuestAddress(0x2_0000), GuestAddress(0xe_0000), 64 << 20).unwrap();
        let read32 = |off: u64| mem.read_obj::<u32>(GuestAddress(addr.0 + off)).unwrap();
        let read64 = |off: u64| mem.read_obj::<u64>(GuestAddress(addr.0 + off)).unwrap();
        assert_eq!(read32(0), 0x336e_c578);
        assert_eq!(read32(4), 1);
        assert_eq!(read64(24), 0x2_0000);
        assert_eq!(read64(32), 0xe_0000, "the RSDP");
        assert_eq!(read64(40), MEMMAP_ADDR.0);
        assert_eq!(read32(48), 3);
        // Third entry: RAM from 1 MiB to the end.
        let entry = GuestAddress(MEMMAP_ADDR.0 + 2 * 24);
        assert_eq!(mem.read_obj::<u64>(entry).unwrap(), 0x10_0000);
        assert_eq!(mem.read_obj::<u64>(GuestAddress(entry.0 + 8)).unwrap(), (64 << 20) - 0x10_0000);
        assert_eq!(mem.read_obj::<u32>(GuestAddress(entry.0 + 16)).unwrap(), 1);
    }
}
