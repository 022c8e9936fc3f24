//! Guest RAM and the guest-physical memory map.
//!
//! ```text
//! 0x0000_0000 ..       RAM (low): boot structures, the kernel at 1 MiB, the initrd at the top
//! 0x0009_fc00 ..       reserved: EBDA, VGA hole, the BIOS area with the MP table (0xf0000)
//! 0x0010_0000 .. 3 GiB RAM
//! 3 GiB .. 4 GiB       the 32-bit MMIO hole: PCI BARs (3 GiB ..), IOAPIC 0xfec0_0000,
//!                      LAPIC 0xfee0_0000
//! 4 GiB ..             RAM (high): whatever did not fit below the hole
//! ```
//!
//! RAM is always one memfd (two mappings of it when it straddles the hole), so that a
//! vhost-user backend can map the same pages; it costs nothing over anonymous memory.

use std::ffi::CString;

use vm_memory::{FileOffset, GuestAddress};

use super::sys;

pub use pleiades_virtio::GuestMemory;

/// Where the 32-bit MMIO hole starts: RAM below it, PCI BARs inside it.
pub const MMIO_HOLE_START: u64 = 3 << 30;
/// Where the 32-bit MMIO hole ends and high RAM starts.
pub const MMIO_HOLE_END: u64 = 4 << 30;
/// PCI memory BARs are assigned from here up.
pub const PCI_MMIO_START: u64 = MMIO_HOLE_START;
/// And must end below the IOAPIC.
pub const PCI_MMIO_END: u64 = IOAPIC_ADDR;
/// The IOAPIC's MMIO page.
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
/// The local APICs' MMIO page.
pub const LAPIC_ADDR: u64 = 0xfee0_0000;
/// Start of the EBDA/BIOS area that E820 reports as reserved.
pub const EBDA_START: u64 = 0x9_fc00;
/// The BIOS area where guests look for the MP floating pointer.
pub const BIOS_AREA_START: u64 = 0xf_0000;
/// Where "high memory" (the kernel) starts.
pub const HIGH_MEMORY_START: u64 = 0x10_0000;

/// The smallest guest the VMM accepts: the boot structures, a kernel and a little room.
pub const MIN_MEMORY_MIB: u64 = 16;
/// The largest: a sanity limit against typos (1 TiB).
pub const MAX_MEMORY_MIB: u64 = 1 << 20;

/// The E820 type of a range (the PVH memory map uses the same numbers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum E820Type {
    Ram = 1,
    Reserved = 2,
}

/// One entry of the guest's memory map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: GuestAddress,
    pub size: u64,
    pub kind: E820Type,
}

/// The RAM ranges of a guest with `size` bytes of memory: below the hole, then above 4 GiB.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, u64)> {
    if size <= MMIO_HOLE_START {
        vec![(GuestAddress(0), size)]
    } else {
        vec![(GuestAddress(0), MMIO_HOLE_START), (GuestAddress(MMIO_HOLE_END), size - MMIO_HOLE_START)]
    }
}

/// The end of RAM below the MMIO hole.
pub fn low_ram_end(size: u64) -> u64 {
    size.min(MMIO_HOLE_START)
}

/// The memory map the guest is told about (E820 for Linux, the PVH memmap for ELF guests).
pub fn e820_map(size: u64) -> Vec<E820Entry> {
    let mut map = vec![
        E820Entry { addr: GuestAddress(0), size: EBDA_START, kind: E820Type::Ram },
        E820Entry {
            addr: GuestAddress(EBDA_START),
            size: HIGH_MEMORY_START - EBDA_START,
            kind: E820Type::Reserved,
        },
    ];
    for (start, len) in ram_ranges(size) {
        let start = start.0.max(HIGH_MEMORY_START);
        let end = if start >= MMIO_HOLE_END { start + len } else { len.min(MMIO_HOLE_START) };
        if end > start {
            map.push(E820Entry { addr: GuestAddress(start), size: end - start, kind: E820Type::Ram });
        }
    }
    map
}

/// Errors creating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error(
        "guest memory of {0} MiB is out of range: give between {MIN_MEMORY_MIB} MiB and {MAX_MEMORY_MIB} MiB"
    )]
    Size(u64),
    #[error("cannot create the memfd for {mib} MiB of guest memory ({source}); is the host out of memory?")]
    Memfd { mib: u64, source: std::io::Error },
    #[error("cannot map {mib} MiB of guest memory: {reason}")]
    Map { mib: u64, reason: String },
}

/// Creates memfd-backed guest RAM of `mib` MiB with the layout above.
pub fn create_guest_memory(mib: u64) -> Result<GuestMemory, MemoryError> {
    if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&mib) {
        return Err(MemoryError::Size(mib));
    }
    let size = mib << 20;
    let name = CString::new("pleiades-guest-ram").expect("no NUL in a literal");
    let file = sys::memfd(&name, size).map_err(|source| MemoryError::Memfd { mib, source })?;
    let mut offset = 0;
    let mut ranges = Vec::new();
    for (start, len) in ram_ranges(size) {
        let file = file.try_clone().map_err(|source| MemoryError::Memfd { mib, source })?;
        ranges.push((start, len as usize, Some(FileOffset::new(file, offset))));
        offset += len;
    }
    GuestMemory::from_ranges_with_files(ranges).map_err(|e| MemoryError::Map { mib, reason: e.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend};

    #[test]
    fn small_guests_have_one_range_and_a_reserved_bios_area() {
        let map = e820_map(256 << 20);
        assert_eq!(
            map,
            [
                E820Entry { addr: GuestAddress(0), size: 0x9_fc00, kind: E820Type::Ram },
                E820Entry { addr: GuestAddress(0x9_fc00), size: 0x6_0400, kind: E820Type::Reserved },
                E820Entry {
                    addr: GuestAddress(0x10_0000),
                    size: (256 << 20) - 0x10_0000,
                    kind: E820Type::Ram
                },
            ]
        );
    }

    #[test]
    fn large_guests_skip_the_mmio_hole() {
        let size = 5 << 30;
        assert_eq!(ram_ranges(size), [(GuestAddress(0), 3 << 30), (GuestAddress(4 << 30), 2 << 30)]);
        let map = e820_map(size);
        assert_eq!(
            map[2],
            E820Entry { addr: GuestAddress(0x10_0000), size: (3 << 30) - 0x10_0000, kind: E820Type::Ram }
        );
        assert_eq!(map[3], E820Entry { addr: GuestAddress(4 << 30), size: 2 << 30, kind: E820Type::Ram });
    }

    #[test]
    fn absurd_sizes_are_refused() {
        assert!(matches!(create_guest_memory(1), Err(MemoryError::Size(1))));
        assert!(matches!(create_guest_memory(u64::MAX), Err(MemoryError::Size(_))));
    }

    #[test]
    fn memory_is_memfd_backed_and_usable() {
        let mem = create_guest_memory(32).unwrap();
        assert_eq!(mem.num_regions(), 1);
        mem.write_obj(0xdead_beefu32, GuestAddress(0x1000)).unwrap();
        assert_eq!(mem.read_obj::<u32>(GuestAddress(0x1000)).unwrap(), 0xdead_beef);
        assert!(mem.iter().next().unwrap().file_offset().is_some());
    }
}
