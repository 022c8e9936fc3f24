//! Single CPU instructions: port I/O, the interrupt flag, halting, TSC, CPUID and MSRs.
//!
//! These wrappers are safe functions: the guest is the only software on the machine, and the
//! memory any device may write by DMA is the static pool of [`crate::dma`], which Rust code only
//! reaches through volatile accesses. Port writes can still reset or power off the machine;
//! that is their purpose here.

use core::arch::asm;

pub fn outb(port: u16, value: u8) {
    // SAFETY: port I/O touches no memory Rust knows about (see the module docs).
    unsafe { asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags)) }
}

pub fn outw(port: u16, value: u16) {
    // SAFETY: as in `outb`.
    unsafe { asm!("out dx, ax", in("dx") port, in("ax") value, options(nomem, nostack, preserves_flags)) }
}

pub fn outl(port: u16, value: u32) {
    // SAFETY: as in `outb`.
    unsafe { asm!("out dx, eax", in("dx") port, in("eax") value, options(nomem, nostack, preserves_flags)) }
}

pub fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: as in `outb`.
    unsafe { asm!("in al, dx", in("dx") port, out("al") value, options(nomem, nostack, preserves_flags)) }
    value
}

pub fn inw(port: u16) -> u16 {
    let value: u16;
    // SAFETY: as in `outb`.
    unsafe { asm!("in ax, dx", in("dx") port, out("ax") value, options(nomem, nostack, preserves_flags)) }
    value
}

pub fn inl(port: u16) -> u32 {
    let value: u32;
    // SAFETY: as in `outb`.
    unsafe { asm!("in eax, dx", in("dx") port, out("eax") value, options(nomem, nostack, preserves_flags)) }
    value
}

/// Enables interrupts, halts until one arrives, and disables them again. The `sti` shadow
/// makes the pair atomic: an interrupt pending before `sti` still wakes the `hlt`.
pub fn wait_for_interrupt() {
    // SAFETY: the interrupt handlers (crate::interrupts) save every register they use and
    // return with `iretq`; the handler frame is pushed below the stack pointer, which this
    // block (no `nostack`) allows.
    unsafe { asm!("sti", "hlt", "cli") }
}

/// Opens a one-instruction window for pending interrupts.
pub fn interrupt_window() {
    // SAFETY: as in `wait_for_interrupt`.
    unsafe { asm!("sti", "nop", "cli") }
}

/// Raises an invalid-opcode exception (vector 6).
pub fn invalid_opcode() -> ! {
    // SAFETY: `ud2` faults; the exception handler reports it and powers off.
    unsafe { asm!("ud2", options(noreturn, nomem, nostack)) }
}

/// Halts forever with interrupts off.
pub fn halt_forever() -> ! {
    loop {
        // SAFETY: stops the CPU; nothing to uphold.
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) }
    }
}

pub fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: reads the time stamp counter.
    unsafe { asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags)) }
    (u64::from(hi) << 32) | u64::from(lo)
}

/// CPUID leaf `leaf`, subleaf 0: (eax, ebx, ecx, edx).
pub fn cpuid(leaf: u32) -> (u32, u32, u32, u32) {
    let (eax, ebx, ecx, edx): (u32, u32, u32, u32);
    // SAFETY: CPUID exists in long mode and has no side effects; rbx (reserved by LLVM) is
    // saved and restored around it.
    unsafe {
        asm!("mov {tmp:r}, rbx", "cpuid", "xchg {tmp:r}, rbx", tmp = out(reg) ebx,
             inout("eax") leaf => eax, inout("ecx") 0u32 => ecx, out("edx") edx,
             options(nomem, nostack, preserves_flags))
    }
    (eax, ebx, ecx, edx)
}

pub fn rdmsr(msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: callers only read architectural MSRs that exist on every x86-64 CPU.
    unsafe {
        asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags))
    }
    (u64::from(hi) << 32) | u64::from(lo)
}

pub fn wrmsr(msr: u32, value: u64) {
    // SAFETY: callers only write the APIC base MSR, which touches no memory.
    unsafe {
        asm!("wrmsr", in("ecx") msr, in("eax") value as u32, in("edx") (value >> 32) as u32,
             options(nomem, nostack, preserves_flags))
    }
}

/// The page-fault address.
pub fn cr2() -> u64 {
    let value: u64;
    // SAFETY: reads a control register.
    unsafe { asm!("mov {}, cr2", out(reg) value, options(nomem, nostack, preserves_flags)) }
    value
}
