//! Counting CPUs from the firmware tables: the MP table and the ACPI MADT. APs are not started.

use crate::memory::{PhysAddr, read_firmware_u8, read_firmware_u16, read_firmware_u32, read_firmware_u64};

/// What each table says (None: table not found or malformed).
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuCount {
    pub mp: Option<u32>,
    pub madt: Option<u32>,
}

impl CpuCount {
    pub fn best(&self) -> u32 {
        self.mp.unwrap_or(0).max(self.madt.unwrap_or(0))
    }
}

pub fn count(rsdp_hint: Option<PhysAddr>) -> CpuCount {
    CpuCount { mp: find_mp().and_then(mp_cpus), madt: find_rsdp(rsdp_hint).and_then(madt_cpus) }
}

fn checksum_ok(addr: PhysAddr, len: u64) -> bool {
    let mut sum = 0u8;
    for i in 0..len {
        match read_firmware_u8(addr.add(i)) {
            Some(b) => sum = sum.wrapping_add(b),
            None => return false,
        }
    }
    sum == 0
}

/// The BIOS areas to search: the first KiB of the EBDA, the last KiB of base memory, and
/// `[start, end)` of the BIOS ROM.
fn search_areas(rom_start: u64) -> [(u64, u64); 3] {
    let ebda = read_firmware_u16(PhysAddr(0x40E)).map_or(0, |seg| u64::from(seg) << 4);
    let base_kib = read_firmware_u16(PhysAddr(0x413)).map_or(0, u64::from);
    let ebda_area = if (0x400..0xA0000).contains(&ebda) { (ebda, ebda + 1024) } else { (0, 0) };
    let base_end =
        if (1..=640).contains(&base_kib) { (base_kib * 1024 - 1024, base_kib * 1024) } else { (0, 0) };
    [ebda_area, base_end, (rom_start, 0x10_0000)]
}

/// Finds a 16-byte-aligned structure whose first 8 bytes (masked) match.
fn scan(
    areas: &[(u64, u64)],
    signature: u64,
    mask: u64,
    checksum_len: impl Fn(PhysAddr) -> u64,
) -> Option<PhysAddr> {
    for &(start, end) in areas {
        let mut addr = start & !0xF;
        while addr + 16 <= end {
            let p = PhysAddr(addr);
            if read_firmware_u64(p).is_some_and(|v| v & mask == signature) && checksum_ok(p, checksum_len(p))
            {
                return Some(p);
            }
            addr += 16;
        }
    }
    None
}

const MP_SIGNATURE: u64 = 0x5F50_4D5F; // "_MP_"
const PCMP_SIGNATURE: u32 = 0x504D_4350; // "PCMP"

fn find_mp() -> Option<PhysAddr> {
    scan(&search_areas(0xF_0000), MP_SIGNATURE, 0xFFFF_FFFF, |p| {
        16 * u64::from(read_firmware_u8(p.add(8)).unwrap_or(1)).max(1)
    })
}

/// Enabled processor entries in the MP configuration table.
fn mp_cpus(floating: PhysAddr) -> Option<u32> {
    let table = PhysAddr(u64::from(read_firmware_u32(floating.add(4))?));
    if table.0 == 0 || read_firmware_u32(table)? != PCMP_SIGNATURE {
        return None;
    }
    let length = u64::from(read_firmware_u16(table.add(4))?);
    if length < 44 || !checksum_ok(table, length) {
        return None;
    }
    let entries = read_firmware_u16(table.add(34))?;
    let (mut offset, mut cpus) = (44u64, 0u32);
    for _ in 0..entries {
        if offset >= length {
            break;
        }
        let entry = table.add(offset);
        match read_firmware_u8(entry)? {
            0 => {
                if read_firmware_u8(entry.add(3))? & 1 != 0 {
                    cpus += 1;
                }
                offset += 20;
            }
            1..=4 => offset += 8,
            _ => break,
        }
    }
    Some(cpus)
}

const RSDP_SIGNATURE: u64 = 0x2052_5450_2044_5352; // "RSD PTR "
const MADT_SIGNATURE: u32 = 0x4349_5041; // "APIC"
/// Longest ACPI table read.
const MAX_TABLE: u64 = 64 * 1024;

fn find_rsdp(hint: Option<PhysAddr>) -> Option<PhysAddr> {
    if let Some(h) = hint
        && read_firmware_u64(h) == Some(RSDP_SIGNATURE)
        && checksum_ok(h, 20)
    {
        return Some(h);
    }
    scan(&search_areas(0xE_0000), RSDP_SIGNATURE, u64::MAX, |_| 20)
}

/// A table's length, if its header and checksum are sound.
fn table_length(table: PhysAddr) -> Option<u64> {
    let length = u64::from(read_firmware_u32(table.add(4))?);
    (36..=MAX_TABLE).contains(&length).then_some(length).filter(|&l| checksum_ok(table, l))
}

/// Enabled local APICs (and x2APICs) in the MADT.
fn madt_cpus(rsdp: PhysAddr) -> Option<u32> {
    let revision = read_firmware_u8(rsdp.add(15))?;
    let xsdt = if revision >= 2 { read_firmware_u64(rsdp.add(24))? } else { 0 };
    let (root, entry_size) = if xsdt != 0 {
        (PhysAddr(xsdt), 8)
    } else {
        (PhysAddr(u64::from(read_firmware_u32(rsdp.add(16))?)), 4)
    };
    let root_length = table_length(root)?;
    let madt = (0..(root_length - 36) / entry_size).find_map(|i| {
        let at = root.add(36 + i * entry_size);
        let table = if entry_size == 8 { read_firmware_u64(at)? } else { u64::from(read_firmware_u32(at)?) };
        (read_firmware_u32(PhysAddr(table))? == MADT_SIGNATURE).then_some(PhysAddr(table))
    })?;
    let length = table_length(madt)?;
    let (mut offset, mut cpus) = (44u64, 0u32);
    while offset + 2 <= length {
        let entry = madt.add(offset);
        let (kind, len) = (read_firmware_u8(entry)?, u64::from(read_firmware_u8(entry.add(1))?));
        if len < 2 {
            break;
        }
        let enabled = match kind {
            0 if len >= 8 => read_firmware_u32(entry.add(4))? & 1 != 0,
            9 if len >= 16 => read_firmware_u32(entry.add(8))? & 1 != 0,
            _ => false,
        };
        cpus += u32::from(enabled);
        offset += len;
    }
    Some(cpus)
}
