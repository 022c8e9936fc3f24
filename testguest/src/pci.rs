//! PCI configuration space through the legacy ports 0xCF8/0xCFC, bus 0 enumeration, BAR
//! sizing and assignment.

use core::fmt;

use crate::arch::{inb, inl, inw, outb, outl, outw};

const CONFIG_ADDRESS: u16 = 0xCF8;
const CONFIG_DATA: u16 = 0xCFC;

pub const VENDOR_ID: u8 = 0x00;
pub const DEVICE_ID: u8 = 0x02;
pub const COMMAND: u8 = 0x04;
pub const STATUS: u8 = 0x06;
pub const HEADER_TYPE: u8 = 0x0E;
pub const BAR0: u8 = 0x10;
pub const SUBSYSTEM_ID: u8 = 0x2E;
pub const CAPABILITIES: u8 = 0x34;

pub const COMMAND_IO: u16 = 1 << 0;
pub const COMMAND_MEMORY: u16 = 1 << 1;
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;
const STATUS_CAPABILITIES: u16 = 1 << 4;

pub const MAX_FUNCTIONS: usize = 64;

/// Bus, device, function.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bdf {
    pub bus: u8,
    pub device: u8,
    pub function: u8,
}

impl Bdf {
    pub const fn new(bus: u8, device: u8, function: u8) -> Self {
        Self { bus, device: device & 0x1F, function: function & 0x7 }
    }

    fn address(self, offset: u8) -> u32 {
        0x8000_0000
            | u32::from(self.bus) << 16
            | u32::from(self.device) << 11
            | u32::from(self.function) << 8
            | u32::from(offset & 0xFC)
    }

    pub fn read32(self, offset: u8) -> u32 {
        outl(CONFIG_ADDRESS, self.address(offset));
        inl(CONFIG_DATA)
    }

    pub fn read16(self, offset: u8) -> u16 {
        outl(CONFIG_ADDRESS, self.address(offset));
        inw(CONFIG_DATA + u16::from(offset & 2))
    }

    pub fn read8(self, offset: u8) -> u8 {
        outl(CONFIG_ADDRESS, self.address(offset));
        inb(CONFIG_DATA + u16::from(offset & 3))
    }

    pub fn write32(self, offset: u8, value: u32) {
        outl(CONFIG_ADDRESS, self.address(offset));
        outl(CONFIG_DATA, value);
    }

    pub fn write16(self, offset: u8, value: u16) {
        outl(CONFIG_ADDRESS, self.address(offset));
        outw(CONFIG_DATA + u16::from(offset & 2), value);
    }

    pub fn write8(self, offset: u8, value: u8) {
        outl(CONFIG_ADDRESS, self.address(offset));
        outb(CONFIG_DATA + u16::from(offset & 3), value);
    }

    /// The capability list: (offset, id) pairs; at most 48, stops at loops into the header.
    pub fn capabilities(self) -> impl Iterator<Item = (u8, u8)> {
        let mut next =
            if self.read16(STATUS) & STATUS_CAPABILITIES != 0 { self.read8(CAPABILITIES) & 0xFC } else { 0 };
        (0..48).map_while(move |_| {
            if next < 0x40 {
                return None;
            }
            let at = next;
            let id = self.read8(at);
            next = self.read8(at + 1) & 0xFC;
            Some((at, id))
        })
    }
}

impl fmt::Display for Bdf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02x}:{:02x}.{:x}", self.bus, self.device, self.function)
    }
}

/// A function that answered on bus 0.
#[derive(Debug, Clone, Copy)]
pub struct Function {
    pub bdf: Bdf,
    pub vendor: u16,
    pub device: u16,
    pub subsystem: u16,
    pub header_type: u8,
}

impl Function {
    /// BARs in this header layout.
    pub fn bar_count(&self) -> u8 {
        match self.header_type & 0x7F {
            0 => 6,
            1 => 2,
            _ => 0,
        }
    }
}

/// The functions found on bus 0.
#[derive(Debug)]
pub struct Bus {
    functions: [Option<Function>; MAX_FUNCTIONS],
}

impl Bus {
    pub fn functions(&self) -> impl Iterator<Item = &Function> {
        self.functions.iter().flatten()
    }
}

/// Enumerates bus 0: every slot, and functions 1–7 of multi-function devices.
pub fn scan_bus0() -> Bus {
    let mut bus = Bus { functions: [None; MAX_FUNCTIONS] };
    let mut n = 0;
    for device in 0..32 {
        let header = Bdf::new(0, device, 0).read8(HEADER_TYPE);
        let functions = if header & 0x80 != 0 { 8 } else { 1 };
        for function in 0..functions {
            let bdf = Bdf::new(0, device, function);
            let vendor = bdf.read16(VENDOR_ID);
            if vendor == 0xFFFF || vendor == 0 || n == MAX_FUNCTIONS {
                continue;
            }
            bus.functions[n] = Some(Function {
                bdf,
                vendor,
                device: bdf.read16(DEVICE_ID),
                subsystem: bdf.read16(SUBSYSTEM_ID),
                header_type: bdf.read8(HEADER_TYPE),
            });
            n += 1;
        }
    }
    bus
}

/// A memory BAR as found: its address (0 when unassigned) and size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryBar {
    pub addr: u64,
    pub size: u64,
    pub is64: bool,
}

/// Sizes memory BAR `index` (memory decoding is off meanwhile). `None`: not a memory BAR,
/// or not implemented.
pub fn probe_memory_bar(bdf: Bdf, index: u8) -> Option<MemoryBar> {
    if index >= 6 {
        return None;
    }
    let offset = BAR0 + 4 * index;
    let low = bdf.read32(offset);
    if low & 1 != 0 {
        return None;
    }
    let is64 = (low >> 1) & 3 == 2 && index < 5;
    let command = bdf.read16(COMMAND);
    bdf.write16(COMMAND, command & !COMMAND_MEMORY);
    bdf.write32(offset, u32::MAX);
    let mask_low = bdf.read32(offset) & !0xF;
    bdf.write32(offset, low);
    let (high, mask_high) = if is64 {
        let high = bdf.read32(offset + 4);
        bdf.write32(offset + 4, u32::MAX);
        let mask = bdf.read32(offset + 4);
        bdf.write32(offset + 4, high);
        (high, mask)
    } else {
        (0, u32::MAX)
    };
    bdf.write16(COMMAND, command);
    if mask_low == 0 && (!is64 || mask_high == 0) {
        return None;
    }
    let mask = (u64::from(mask_high) << 32) | u64::from(mask_low);
    let size = (!mask).wrapping_add(1);
    Some(MemoryBar { addr: (u64::from(high) << 32) | u64::from(low & !0xF), size, is64 })
}

/// Programs memory BAR `index` with `addr` (both halves of a 64-bit BAR).
pub fn set_memory_bar(bdf: Bdf, index: u8, bar: MemoryBar, addr: u64) {
    let offset = BAR0 + 4 * index;
    let flags = bdf.read32(offset) & 0xF;
    bdf.write32(offset, (addr as u32 & !0xF) | flags);
    if bar.is64 {
        bdf.write32(offset + 4, (addr >> 32) as u32);
    }
}

const MAX_RESERVED: usize = 64;

/// Where the guest puts BARs that nobody assigned: `[0xC000_0000, 0xFEC0_0000)`, skipping
/// anything reserved (BARs firmware assigned, RAM).
#[derive(Debug)]
pub struct BarWindow {
    next: u64,
    end: u64,
    reserved: [(u64, u64); MAX_RESERVED],
    len: usize,
}

pub const BAR_WINDOW_START: u64 = 0xC000_0000;
pub const BAR_WINDOW_END: u64 = 0xFEC0_0000;

impl BarWindow {
    pub fn new() -> Self {
        Self { next: BAR_WINDOW_START, end: BAR_WINDOW_END, reserved: [(0, 0); MAX_RESERVED], len: 0 }
    }

    pub fn reserve(&mut self, start: u64, end: u64) {
        if start < end && self.len < MAX_RESERVED {
            self.reserved[self.len] = (start, end);
            self.len += 1;
        }
    }

    /// A naturally aligned range of `size` bytes (at least a page), or None when full.
    pub fn alloc(&mut self, size: u64) -> Option<u64> {
        let size = size.max(4096).checked_next_power_of_two()?;
        for _ in 0..=MAX_RESERVED {
            let base = self.next.checked_add(size - 1)? & !(size - 1);
            let end = base.checked_add(size)?;
            if end > self.end {
                return None;
            }
            match self.reserved[..self.len].iter().find(|(s, e)| base < *e && *s < end) {
                Some(&(_, e)) => self.next = e,
                None => {
                    self.next = end;
                    self.reserve(base, end);
                    return Some(base);
                }
            }
        }
        None
    }
}

impl Default for BarWindow {
    fn default() -> Self {
        Self::new()
    }
}
