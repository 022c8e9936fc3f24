//! Guest-physical addresses, device MMIO and firmware memory, and the C memory functions the
//! compiler expects.
//!
//! The low 4 GiB are identity-mapped (see `boot.rs`): a physical address below 4 GiB is also
//! the virtual address of the same byte.

use core::arch::asm;
use core::fmt;
use core::ptr;

/// The end of the identity map.
pub const MAPPED_END: u64 = 1 << 32;

/// A guest-physical address.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct PhysAddr(pub u64);

impl PhysAddr {
    pub const fn add(self, offset: u64) -> Self {
        Self(self.0.wrapping_add(offset))
    }
}

impl fmt::Debug for PhysAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

impl fmt::Display for PhysAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

/// A window of device registers (part of a PCI BAR, or the local APIC).
#[derive(Debug, Clone, Copy)]
pub struct MmioRegion {
    base: PhysAddr,
    len: u64,
}

impl MmioRegion {
    /// # Safety
    /// `base..base + len` must be device registers below [`MAPPED_END`], not RAM that Rust
    /// code uses.
    pub const unsafe fn new(base: PhysAddr, len: u64) -> Self {
        Self { base, len }
    }

    pub fn base(&self) -> PhysAddr {
        self.base
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether a `size`-byte access at `offset` stays inside the region.
    fn fits(&self, offset: u64, size: u64) -> bool {
        offset.checked_add(size).is_some_and(|end| end <= self.len)
    }

    pub fn read8(&self, offset: u64) -> u8 {
        self.read(offset)
    }
    pub fn read16(&self, offset: u64) -> u16 {
        self.read(offset)
    }
    pub fn read32(&self, offset: u64) -> u32 {
        self.read(offset)
    }
    pub fn write8(&self, offset: u64, value: u8) {
        self.write(offset, value)
    }
    pub fn write16(&self, offset: u64, value: u16) {
        self.write(offset, value)
    }
    pub fn write32(&self, offset: u64, value: u32) {
        self.write(offset, value)
    }
    /// A 64-bit register written as two 32-bit halves, low first (virtio allows this).
    pub fn write64_split(&self, offset: u64, value: u64) {
        self.write32(offset, value as u32);
        self.write32(offset + 4, (value >> 32) as u32);
    }

    /// Out-of-range reads return all ones, as a bus does for a missing device.
    fn read<T: Copy + AllOnes>(&self, offset: u64) -> T {
        if !self.fits(offset, size_of::<T>() as u64) {
            return T::ALL_ONES;
        }
        // SAFETY: inside the region (checked), which `new`'s caller vouched for; aligned
        // because every register offset used is a multiple of its size.
        unsafe { ptr::read_volatile(self.base.0.wrapping_add(offset) as *const T) }
    }

    /// Out-of-range writes are dropped.
    fn write<T: Copy>(&self, offset: u64, value: T) {
        if !self.fits(offset, size_of::<T>() as u64) {
            return;
        }
        // SAFETY: as in `read`.
        unsafe { ptr::write_volatile(self.base.0.wrapping_add(offset) as *mut T, value) }
    }
}

trait AllOnes {
    const ALL_ONES: Self;
}
impl AllOnes for u8 {
    const ALL_ONES: Self = u8::MAX;
}
impl AllOnes for u16 {
    const ALL_ONES: Self = u16::MAX;
}
impl AllOnes for u32 {
    const ALL_ONES: Self = u32::MAX;
}

/// Reads firmware-provided memory (start info, command line, MP and ACPI tables).
///
/// Only addresses below [`FIRMWARE_END`] are read (RAM and the BIOS area, never the PCI hole);
/// anything else, or a range that wraps, gives `None`.
pub fn read_firmware<T: Copy>(addr: PhysAddr) -> Option<T> {
    let end = addr.0.checked_add(size_of::<T>() as u64)?;
    if end > FIRMWARE_END {
        return None;
    }
    // SAFETY: below FIRMWARE_END everything is identity-mapped RAM or ROM; reads have no side
    // effects there, and `read_unaligned` needs no alignment.
    Some(unsafe { ptr::read_unaligned(addr.0 as *const T) })
}

/// Firmware tables are looked for below 3 GiB: above that is the PCI hole.
pub const FIRMWARE_END: u64 = 0xC000_0000;

pub fn read_firmware_u8(addr: PhysAddr) -> Option<u8> {
    read_firmware(addr)
}
pub fn read_firmware_u16(addr: PhysAddr) -> Option<u16> {
    read_firmware(addr)
}
pub fn read_firmware_u32(addr: PhysAddr) -> Option<u32> {
    read_firmware(addr)
}
pub fn read_firmware_u64(addr: PhysAddr) -> Option<u64> {
    read_firmware(addr)
}

// The C memory functions: core calls them and no libc is linked. `rep movsb`/`rep stosb`
// keep the compiler from turning them back into calls to themselves.

/// # Safety
/// `dest` and `src` are valid for `n` bytes and do not overlap.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcpy(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller passes valid, non-overlapping regions; the direction flag is clear.
    unsafe {
        asm!("rep movsb", inout("rcx") n => _, inout("rdi") dest => _, inout("rsi") src => _,
             options(nostack, preserves_flags))
    }
    dest
}

/// # Safety
/// `dest` and `src` are valid for `n` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memmove(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dest as usize) <= (src as usize) || (dest as usize) >= (src as usize).wrapping_add(n) {
        // SAFETY: copying forwards is correct when dest is below src or past its end.
        return unsafe { memcpy(dest, src, n) };
    }
    // SAFETY: valid regions (caller); copying backwards handles dest inside src; the
    // direction flag is restored.
    unsafe {
        asm!("std", "rep movsb", "cld",
             inout("rcx") n => _, inout("rdi") dest.wrapping_add(n - 1) => _,
             inout("rsi") src.wrapping_add(n - 1) => _, options(nostack))
    }
    dest
}

/// # Safety
/// `dest` is valid for `n` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memset(dest: *mut u8, value: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller passes a valid region.
    unsafe {
        asm!("rep stosb", inout("rcx") n => _, inout("rdi") dest => _, in("al") value as u8,
             options(nostack, preserves_flags))
    }
    dest
}

/// # Safety
/// `a` and `b` are valid for `n` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    for i in 0..n {
        // SAFETY: in bounds (caller); volatile so that this loop is not turned into a call.
        let (x, y) = unsafe { (ptr::read_volatile(a.add(i)), ptr::read_volatile(b.add(i))) };
        if x != y {
            return i32::from(x) - i32::from(y);
        }
    }
    0
}

/// # Safety
/// `a` and `b` are valid for `n` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract.
    unsafe { memcmp(a, b, n) }
}
