//! Memory shared with devices: a static pool of page-aligned pages, one slot per device, and
//! a larger area for a device that needs more (virtio-gpu's resource backing), used by one
//! device at a time.
//!
//! Devices write these pages behind the compiler's back, so Rust never forms references to
//! them: every access is a bounds-checked volatile read or write at a physical address inside
//! the pool.

use core::cell::UnsafeCell;
use core::ptr;

use crate::memory::PhysAddr;

pub const PAGE_SIZE: u64 = 4096;
/// Virtio devices the guest handles at most.
pub const MAX_DEVICES: usize = 16;
/// Pages per device: one per virtqueue (two queues at most) and one for data buffers.
const PAGES_PER_DEVICE: usize = 3;
/// Pages of the large area: two 64x64 32-bit images (16 KiB each) with gaps between the pieces
/// of the first (scatter-gather backing).
pub const LARGE_PAGES: usize = 10;
/// One more page for the hostile mode's garbage indirect table, then the large area.
const POOL_PAGES: usize = MAX_DEVICES * PAGES_PER_DEVICE + 1 + LARGE_PAGES;

#[repr(C, align(4096))]
struct Pool(UnsafeCell<[[u8; PAGE_SIZE as usize]; POOL_PAGES]>);

// SAFETY: one CPU runs the guest, and the pool is only touched through volatile accesses.
unsafe impl Sync for Pool {}

static POOL: Pool = Pool(UnsafeCell::new([[0; PAGE_SIZE as usize]; POOL_PAGES]));

fn pool_start() -> u64 {
    POOL.0.get() as u64
}

fn page(index: usize) -> PhysAddr {
    PhysAddr(pool_start() + index as u64 * PAGE_SIZE)
}

/// The pages of one device slot.
#[derive(Debug, Clone, Copy)]
pub struct DeviceMemory {
    pub queues: [PhysAddr; 2],
    pub buffer: PhysAddr,
}

/// The pages of device slot `slot` (`slot < MAX_DEVICES`).
pub fn device_memory(slot: usize) -> DeviceMemory {
    let first = slot.min(MAX_DEVICES - 1) * PAGES_PER_DEVICE;
    DeviceMemory { queues: [page(first), page(first + 1)], buffer: page(first + 2) }
}

/// The spare page (hostile mode's garbage).
pub fn spare_page() -> PhysAddr {
    page(MAX_DEVICES * PAGES_PER_DEVICE)
}

/// The large area: [`LARGE_PAGES`] contiguous pages, for one device at a time.
pub fn large_area() -> PhysAddr {
    page(MAX_DEVICES * PAGES_PER_DEVICE + 1)
}

fn in_pool(addr: PhysAddr, size: u64) -> bool {
    let start = pool_start();
    addr.0 >= start
        && addr.0.checked_add(size).is_some_and(|end| end <= start + POOL_PAGES as u64 * PAGE_SIZE)
}

macro_rules! accessors {
    ($read:ident, $write:ident, $t:ty) => {
        /// Reads shared memory; addresses outside the pool read as zero.
        pub fn $read(addr: PhysAddr) -> $t {
            if !in_pool(addr, size_of::<$t>() as u64) {
                return 0;
            }
            // SAFETY: inside the pool (checked); all callers use naturally aligned offsets.
            unsafe { ptr::read_volatile(addr.0 as *const $t) }
        }

        /// Writes shared memory; addresses outside the pool are ignored.
        pub fn $write(addr: PhysAddr, value: $t) {
            if !in_pool(addr, size_of::<$t>() as u64) {
                return;
            }
            // SAFETY: inside the pool (checked); all callers use naturally aligned offsets.
            unsafe { ptr::write_volatile(addr.0 as *mut $t, value) }
        }
    };
}

accessors!(read_u8, write_u8, u8);
accessors!(read_u16, write_u16, u16);
accessors!(read_u32, write_u32, u32);

/// Writes a 64-bit value (descriptor addresses); outside the pool it is ignored.
pub fn write_u64(addr: PhysAddr, value: u64) {
    write_u32(addr, value as u32);
    write_u32(addr.add(4), (value >> 32) as u32);
}

/// Fills `len` bytes at `addr` with `value`.
pub fn fill(addr: PhysAddr, len: u64, value: u8) {
    for i in 0..len {
        write_u8(addr.add(i), value);
    }
}
