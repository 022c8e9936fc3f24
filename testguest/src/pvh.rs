//! The PVH start info (`struct hvm_start_info`, Xen's `arch-x86/hvm/start_info.h`): the
//! command line, the RSDP hint and the memory map.

use core::fmt;

use crate::memory::{PhysAddr, read_firmware, read_firmware_u8};

pub const START_INFO_MAGIC: u32 = 0x336e_c578;
/// Memory map entries read at most.
const MAX_MEMMAP_ENTRIES: u32 = 128;
/// Command line bytes read at most.
pub const MAX_CMDLINE: usize = 1024;
pub const E820_RAM: u32 = 1;

#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct RawStartInfo {
    magic: u32,
    version: u32,
    flags: u32,
    nr_modules: u32,
    modlist_paddr: u64,
    cmdline_paddr: u64,
    rsdp_paddr: u64,
    memmap_paddr: u64,
    memmap_entries: u32,
    reserved: u32,
}

#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct RawMemmapEntry {
    addr: u64,
    size: u64,
    kind: u32,
    reserved: u32,
}

/// One memory map entry (`kind` 1 = RAM).
#[derive(Debug, Clone, Copy)]
pub struct MemmapEntry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

/// The validated start info.
#[derive(Debug, Clone, Copy)]
pub struct StartInfo {
    pub cmdline: Option<PhysAddr>,
    pub rsdp: Option<PhysAddr>,
    memmap: Option<PhysAddr>,
    memmap_entries: u32,
}

#[derive(Debug, Clone, Copy)]
pub enum StartInfoError {
    Null,
    Unreadable(PhysAddr),
    BadMagic(u32),
}

impl fmt::Display for StartInfoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Null => write!(f, "no start info (rsi/ebx was 0)"),
            Self::Unreadable(a) => write!(f, "start info at {a} is outside readable memory"),
            Self::BadMagic(m) => write!(f, "start info magic is {m:#x}, not {START_INFO_MAGIC:#x}"),
        }
    }
}

fn nonzero(addr: u64) -> Option<PhysAddr> {
    (addr != 0).then_some(PhysAddr(addr))
}

impl StartInfo {
    pub fn read(addr: PhysAddr) -> Result<Self, StartInfoError> {
        if addr.0 == 0 {
            return Err(StartInfoError::Null);
        }
        let raw: RawStartInfo = read_firmware(addr).ok_or(StartInfoError::Unreadable(addr))?;
        if raw.magic != START_INFO_MAGIC {
            return Err(StartInfoError::BadMagic(raw.magic));
        }
        // The memory map fields exist from version 1 on.
        let (memmap, memmap_entries) = if raw.version >= 1 {
            (nonzero(raw.memmap_paddr), raw.memmap_entries.min(MAX_MEMMAP_ENTRIES))
        } else {
            (None, 0)
        };
        Ok(Self {
            cmdline: nonzero(raw.cmdline_paddr),
            rsdp: nonzero(raw.rsdp_paddr),
            memmap,
            memmap_entries,
        })
    }

    /// The command line, copied into `buf`: up to the first NUL, at most [`MAX_CMDLINE`]
    /// bytes, non-ASCII bytes replaced by `?`.
    pub fn cmdline<'a>(&self, buf: &'a mut [u8; MAX_CMDLINE]) -> &'a str {
        let mut len = 0;
        if let Some(addr) = self.cmdline {
            while len < MAX_CMDLINE {
                match read_firmware_u8(addr.add(len as u64)) {
                    None | Some(0) => break,
                    Some(b) => buf[len] = if b.is_ascii() { b } else { b'?' },
                }
                len += 1;
            }
        }
        core::str::from_utf8(&buf[..len]).unwrap_or("")
    }

    pub fn memmap(&self) -> impl Iterator<Item = MemmapEntry> + '_ {
        (0..self.memmap_entries).map_while(move |i| {
            let raw: RawMemmapEntry = read_firmware(self.memmap?.add(u64::from(i) * 24))?;
            Some(MemmapEntry { addr: raw.addr, size: raw.size, kind: raw.kind })
        })
    }

    /// Bytes of RAM in the memory map.
    pub fn ram_bytes(&self) -> u64 {
        self.memmap().filter(|e| e.kind == E820_RAM).fold(0u64, |sum, e| sum.saturating_add(e.size))
    }

    /// Whether `[start, end)` touches RAM according to the memory map.
    pub fn overlaps_ram(&self, start: u64, end: u64) -> bool {
        self.memmap()
            .filter(|e| e.kind == E820_RAM)
            .any(|e| start < e.addr.saturating_add(e.size) && e.addr < end)
    }
}
