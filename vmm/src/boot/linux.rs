//! The Linux x86 boot protocol's zero page (Documentation/arch/x86/boot.rst).

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use vm_memory::{Bytes, GuestAddress};

use super::layout::{CMDLINE_ADDR, ZERO_PAGE_ADDR};
use super::{BootError, Initrd};
use crate::memory::GuestMemory;
use crate::memory::e820_map;

/// The 64-bit entry point (`startup_64`) is 0x200 bytes into the protected-mode kernel.
pub const STARTUP_64_OFFSET: u64 = 0x200;
/// `boot_flag` must hold this.
pub const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
/// `header` must hold "HdrS".
pub const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
/// "Undefined" boot loader id: we are not one of the registered ones.
pub const KERNEL_LOADER_OTHER: u8 = 0xff;
/// The kernel may be relocated to a 16 MiB boundary.
pub const KERNEL_MIN_ALIGNMENT: u32 = 0x100_0000;

/// Builds the zero page: the kernel's setup header with our fields, and the E820 map.
pub fn zero_page(
    mut hdr: setup_header,
    cmdline_len: usize,
    initrd: Option<Initrd>,
    rsdp: GuestAddress,
    mem_size: u64,
) -> boot_params {
    hdr.type_of_loader = KERNEL_LOADER_OTHER;
    hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    hdr.header = KERNEL_HDR_MAGIC;
    hdr.cmd_line_ptr = CMDLINE_ADDR.0 as u32;
    hdr.cmdline_size = cmdline_len as u32;
    hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    if let Some(initrd) = initrd {
        hdr.ramdisk_image = initrd.addr.0 as u32;
        hdr.ramdisk_size = initrd.size as u32;
    }
    // Boot protocol 2.14: where the ACPI RSDP is (no scan needed).
    let mut params = boot_params { hdr, acpi_rsdp_addr: rsdp.0, ..Default::default() };
    for (i, entry) in e820_map(mem_size).iter().enumerate().take(params.e820_table.len()) {
        params.e820_table[i] =
            boot_e820_entry { addr: entry.addr.0, size: entry.size, r#type: entry.kind as u32 };
        params.e820_entries = i as u8 + 1;
    }
    params
}

/// Writes the zero page at [`ZERO_PAGE_ADDR`].
pub fn write_zero_page(
    mem: &GuestMemory,
    hdr: setup_header,
    cmdline_len: usize,
    initrd: Option<Initrd>,
    rsdp: GuestAddress,
    mem_size: u64,
) -> Result<(), BootError> {
    mem.write_obj(zero_page(hdr, cmdline_len, initrd, rsdp, mem_size), ZERO_PAGE_ADDR)
        .map_err(|e| BootError::GuestMemory(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_zero_page_has_the_magics_cmdline_initrd_and_e820() {
        let params = zero_page(
            setup_header::default(),
            22,
            Some(Initrd { addr: GuestAddress(0x7f0_0000), size: 0x1234 }),
            GuestAddress(0xe_0000),
            128 << 20,
        );
        let hdr = params.hdr;
        assert_eq!({ hdr.boot_flag }, 0xaa55);
        assert_eq!({ hdr.header }, 0x5372_6448);
        assert_eq!({ hdr.type_of_loader }, 0xff);
        assert_eq!({ hdr.cmd_line_ptr }, 0x2_0000);
        assert_eq!({ hdr.cmdline_size }, 22);
        assert_eq!({ hdr.ramdisk_image }, 0x7f0_0000);
        assert_eq!({ hdr.ramdisk_size }, 0x1234);
        assert_eq!({ params.acpi_rsdp_addr }, 0xe_0000);
        assert_eq!(params.e820_entries, 3);
        let ram = params.e820_table[2];
        assert_eq!(({ ram.addr }, { ram.size }, { ram.r#type }), (0x10_0000, (128 << 20) - 0x10_0000, 1));
    }
}
