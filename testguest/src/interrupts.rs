//! The IDT, the local xAPIC and the interrupt handlers.
//!
//! - Vector [`DEVICE_VECTOR`]: MSI-X from virtio devices; counted in [`device_irqs`].
//! - Vector [`TIMER_VECTOR`]: the local APIC timer, periodic, so that every `sti; hlt` wakes up
//!   even when a device never interrupts.
//! - Exceptions 0–31: fatal; reported as a failure, then the guest powers off.
//! - Every other vector: acknowledged and ignored; 0xFF is the APIC's spurious vector.

use core::arch::{asm, global_asm};
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

pub use crate::arch::interrupt_window;
use crate::arch::{inb, outb, rdmsr, wait_for_interrupt, wrmsr};
use crate::boot::CODE_SELECTOR;
use crate::memory::{MmioRegion, PhysAddr};

pub const DEVICE_VECTOR: u8 = 0x40;
pub const TIMER_VECTOR: u8 = 0x41;
pub const SPURIOUS_VECTOR: u8 = 0xFF;

/// The local APIC's registers at their architectural address.
pub const LAPIC_BASE: PhysAddr = PhysAddr(0xFEE0_0000);
// SAFETY: the local APIC's register page; the guest never relocates it, and nothing else is
// mapped there.
const LAPIC: MmioRegion = unsafe { MmioRegion::new(LAPIC_BASE, 0x1000) };

const LAPIC_ID: u64 = 0x20;
const LAPIC_TPR: u64 = 0x80;
const LAPIC_SVR: u64 = 0xF0;
const LAPIC_LVT_TIMER: u64 = 0x320;
const LAPIC_TIMER_INITIAL: u64 = 0x380;
const LAPIC_TIMER_DIVIDE: u64 = 0x3E0;
const IA32_APIC_BASE: u32 = 0x1B;

#[unsafe(no_mangle)]
static DEVICE_IRQS: AtomicU64 = AtomicU64::new(0);
#[unsafe(no_mangle)]
static TIMER_IRQS: AtomicU64 = AtomicU64::new(0);
#[unsafe(no_mangle)]
static OTHER_IRQS: AtomicU64 = AtomicU64::new(0);

/// Device (MSI-X) interrupts taken so far.
pub fn device_irqs() -> u64 {
    DEVICE_IRQS.load(Ordering::Relaxed)
}

pub fn timer_irqs() -> u64 {
    TIMER_IRQS.load(Ordering::Relaxed)
}

global_asm!(
    r#"
    .pushsection .text.isr, "ax"
    .code64
    .global isr_device
isr_device:
    lock incq DEVICE_IRQS(%rip)
    jmp isr_eoi
    .global isr_timer
isr_timer:
    lock incq TIMER_IRQS(%rip)
    jmp isr_eoi
    .global isr_other
isr_other:
    lock incq OTHER_IRQS(%rip)
isr_eoi:
    push %rax
    movabs $0xFEE000B0, %rax
    movl $0, (%rax)
    pop %rax
    iretq
    .global isr_spurious
isr_spurious:
    iretq

    /* One 16-byte stub per exception: push the vector, then the common path. */
    .balign 16
    .global exception_stubs
exception_stubs:
    .irp vec, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .balign 16
    pushq $\vec
    jmp exception_common
    .endr
exception_common:
    mov (%rsp), %rdi
    lea 8(%rsp), %rsi
    and $-16, %rsp
    call exception_fatal
1:  cli
    hlt
    jmp 1b
    .popsection
"#,
    options(att_syntax)
);

unsafe extern "C" {
    fn isr_device();
    fn isr_timer();
    fn isr_other();
    fn isr_spurious();
    fn exception_stubs();
}

/// Called by the exception stubs with the vector and the CPU's frame (error code first for
/// the vectors that have one).
#[unsafe(no_mangle)]
extern "C" fn exception_fatal(vector: u64, frame: *const u64) -> ! {
    let has_error_code = matches!(vector, 8 | 10..=14 | 17 | 21 | 29 | 30);
    let rip_index = usize::from(has_error_code);
    let read = |i: usize| {
        crate::memory::read_firmware_u64(PhysAddr((frame as u64).wrapping_add(8 * i as u64))).unwrap_or(0)
    };
    let error = if has_error_code { read(0) } else { 0 };
    let rip = read(rip_index);
    crate::report::fatal(format_args!(
        "exception {vector} at rip {rip:#x}, error code {error:#x}, cr2 {:#x}",
        crate::arch::cr2()
    ))
}

#[repr(C, align(16))]
struct Idt(UnsafeCell<[u64; 512]>);

// SAFETY: written once by `init` on the only CPU, before interrupts are enabled.
unsafe impl Sync for Idt {}

static IDT: Idt = Idt(UnsafeCell::new([0; 512]));

#[repr(C, packed)]
struct DescriptorPointer {
    limit: u16,
    base: u64,
}

/// A 64-bit interrupt gate to `handler`.
fn gate(handler: u64) -> (u64, u64) {
    let low = (handler & 0xFFFF)
        | (u64::from(CODE_SELECTOR) << 16)
        | (0x8E << 40)
        | (((handler >> 16) & 0xFFFF) << 48);
    (low, handler >> 32)
}

fn set_gate(vector: usize, handler: u64) {
    let (low, high) = gate(handler);
    let base = IDT.0.get() as *mut u64;
    // SAFETY: vector < 256, so both words are inside the table; interrupts are off and no
    // other reference to the table exists.
    unsafe {
        base.add(2 * vector).write_volatile(low);
        base.add(2 * vector + 1).write_volatile(high);
    }
}

/// Installs the IDT, masks the legacy PICs, enables the local APIC and starts its timer.
pub fn init() {
    for vector in 0..256 {
        let handler = match vector {
            0..=31 => exception_stubs as *const () as u64 + 16 * vector as u64,
            v if v == usize::from(DEVICE_VECTOR) => isr_device as *const () as u64,
            v if v == usize::from(TIMER_VECTOR) => isr_timer as *const () as u64,
            v if v == usize::from(SPURIOUS_VECTOR) => isr_spurious as *const () as u64,
            _ => isr_other as *const () as u64,
        };
        set_gate(vector, handler);
    }
    let pointer = DescriptorPointer { limit: 256 * 16 - 1, base: IDT.0.get() as u64 };
    // SAFETY: the IDT is a static, filled above with gates to handlers that exist.
    unsafe { asm!("lidt [{}]", in(reg) &raw const pointer, options(readonly, nostack, preserves_flags)) }

    // The 8259s stay masked: everything arrives through the local APIC.
    outb(0x21, 0xFF);
    outb(0xA1, 0xFF);
    let _ = inb(0x21);

    let base = rdmsr(IA32_APIC_BASE);
    wrmsr(IA32_APIC_BASE, base | (1 << 11));
    LAPIC.write32(LAPIC_TPR, 0);
    LAPIC.write32(LAPIC_SVR, 0x100 | u32::from(SPURIOUS_VECTOR));
    LAPIC.write32(LAPIC_TIMER_DIVIDE, 0x3); // divide by 16
    LAPIC.write32(LAPIC_LVT_TIMER, (1 << 17) | u32::from(TIMER_VECTOR)); // periodic
    LAPIC.write32(LAPIC_TIMER_INITIAL, 100_000);
}

/// Where the APIC base MSR says the local APIC is (reported when it is not at the default).
pub fn apic_base_msr() -> u64 {
    rdmsr(IA32_APIC_BASE) & !0xFFF & ((1 << 52) - 1)
}

/// The boot CPU's local APIC id (the MSI destination).
pub fn bsp_apic_id() -> u8 {
    (LAPIC.read32(LAPIC_ID) >> 24) as u8
}

/// Stops the APIC timer (before power-off).
pub fn stop_timer() {
    LAPIC.write32(LAPIC_TIMER_INITIAL, 0);
}

/// Set once the APIC timer is seen ticking: only then may the guest `hlt`, since a halt with
/// no timer and no device interrupt would never end.
static HALT_OK: AtomicBool = AtomicBool::new(false);

/// Waits (bounded) for the first timer interrupt; returns whether it came.
pub fn check_timer() -> bool {
    let before = timer_irqs();
    let deadline = crate::time::Deadline::after_ms(200);
    for _ in 0..20_000_000u32 {
        interrupt_window();
        if timer_irqs() != before {
            HALT_OK.store(true, Ordering::Relaxed);
            return true;
        }
        if deadline.passed() {
            break;
        }
    }
    false
}

/// Lets interrupts in and waits a little: until the next interrupt when the timer works,
/// else a short spin.
pub fn idle() {
    if HALT_OK.load(Ordering::Relaxed) {
        wait_for_interrupt();
    } else {
        for _ in 0..1000 {
            interrupt_window();
        }
    }
}
