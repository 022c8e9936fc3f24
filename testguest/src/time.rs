//! Timeouts from the TSC, calibrated against the PIT (or CPUID when there is no PIT).
//!
//! Every wait in the guest is bounded twice: by a TSC deadline, and by an iteration count in
//! case the TSC does not advance.

use core::sync::atomic::{AtomicU64, Ordering};

use crate::arch::{cpuid, inb, outb, rdtsc};

/// The TSC when the guest started.
static BOOT_TSC: AtomicU64 = AtomicU64::new(0);

/// Records the start time (first thing the guest does).
pub fn mark_boot() {
    BOOT_TSC.store(rdtsc(), Ordering::Relaxed);
}

/// Milliseconds since [`mark_boot`].
pub fn ms_since_boot() -> u64 {
    ms_since(BOOT_TSC.load(Ordering::Relaxed))
}

/// TSC ticks per millisecond; 1 GHz until calibrated.
static TSC_PER_MS: AtomicU64 = AtomicU64::new(1_000_000);

const PIT_HZ: u64 = 1_193_182;
/// Calibration window: 10 ms of PIT channel 2.
const PIT_TICKS: u16 = 11_932;

/// Where the TSC frequency came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TscSource {
    Pit,
    Cpuid,
    Guess,
}

impl TscSource {
    pub fn name(self) -> &'static str {
        match self {
            Self::Pit => "pit",
            Self::Cpuid => "cpuid",
            Self::Guess => "guess",
        }
    }
}

fn plausible(per_ms: u64) -> bool {
    (100_000..=10_000_000).contains(&per_ms)
}

/// Measures the TSC against PIT channel 2 in one-shot mode.
fn calibrate_with_pit() -> Option<u64> {
    let gate = inb(0x61);
    outb(0x61, (gate & !0x02) | 0x01); // speaker off, gate on
    outb(0x43, 0xB0); // channel 2, lobyte/hibyte, mode 0, binary
    outb(0x42, PIT_TICKS as u8);
    outb(0x42, (PIT_TICKS >> 8) as u8);
    let start = rdtsc();
    let mut done = false;
    for _ in 0..50_000_000u32 {
        if inb(0x61) & 0x20 != 0 {
            done = true;
            break;
        }
    }
    let elapsed = rdtsc().wrapping_sub(start);
    outb(0x61, gate);
    let per_ms = elapsed * PIT_HZ / (u64::from(PIT_TICKS) * 1000);
    (done && plausible(per_ms)).then_some(per_ms)
}

/// The TSC frequency from CPUID leaves 0x15, 0x16 or the hypervisor's 0x40000010.
fn tsc_from_cpuid() -> Option<u64> {
    let (max, ..) = cpuid(0);
    if max >= 0x15 {
        let (denominator, numerator, crystal_hz, _) = cpuid(0x15);
        if denominator != 0 && numerator != 0 && crystal_hz != 0 {
            let per_ms = u64::from(crystal_hz) * u64::from(numerator) / u64::from(denominator) / 1000;
            if plausible(per_ms) {
                return Some(per_ms);
            }
        }
    }
    if max >= 0x16 {
        let (base_mhz, ..) = cpuid(0x16);
        let per_ms = u64::from(base_mhz & 0xFFFF) * 1000;
        if plausible(per_ms) {
            return Some(per_ms);
        }
    }
    let (hv_max, ..) = cpuid(0x4000_0000);
    if (0x4000_0010..0x4001_0000).contains(&hv_max) {
        let (tsc_khz, ..) = cpuid(0x4000_0010);
        let per_ms = u64::from(tsc_khz);
        if plausible(per_ms) {
            return Some(per_ms);
        }
    }
    None
}

pub fn calibrate() -> TscSource {
    let (per_ms, source) = match calibrate_with_pit() {
        Some(v) => (v, TscSource::Pit),
        None => match tsc_from_cpuid() {
            Some(v) => (v, TscSource::Cpuid),
            None => (1_000_000, TscSource::Guess),
        },
    };
    TSC_PER_MS.store(per_ms, Ordering::Relaxed);
    source
}

pub fn tsc_per_ms() -> u64 {
    TSC_PER_MS.load(Ordering::Relaxed)
}

/// A point in time `ms` milliseconds from now.
#[derive(Debug, Clone, Copy)]
pub struct Deadline(u64);

impl Deadline {
    pub fn after_ms(ms: u64) -> Self {
        Self(rdtsc().saturating_add(ms.saturating_mul(tsc_per_ms())))
    }

    pub fn passed(self) -> bool {
        rdtsc() >= self.0
    }
}

/// Milliseconds since `start` (a TSC value).
pub fn ms_since(start: u64) -> u64 {
    rdtsc().wrapping_sub(start) / tsc_per_ms().max(1)
}
