//! # The Pleiades test guest
//!
//! A small `no_std` program that Pleiades' VMM boots to test itself, and that also runs under
//! stock QEMU (`-kernel testguest.elf`), so it is checked against QEMU's reference virtio
//! devices. It finds the virtio-pci devices on bus 0, drives virtio-rng, virtio-console,
//! virtio-gpu (2D, `gpu.rs`) and virtio-input (keyboards and tablets, `input.rs`) through MSI-X
//! interrupts, counts the CPUs in the firmware tables, prints exactly one line
//!
//! ```text
//! PLEIADES-TESTGUEST {"result":"pass"|"fail","mode":…,"cpus":N,"devices":[…],"irqs":N,"errors":[…]}
//! ```
//!
//! on COM1 and powers off.
//!
//! ## Boot contract
//!
//! The ELF is linked at 1 MiB physical (virtual = physical), has no relocations, and is
//! loaded by its program headers (zero-fill `.bss` to `p_memsz`). Two entries:
//!
//! 1. **64-bit entry at `e_entry`** (Pleiades' VMM): long mode, paging on with at least the
//!    low 1 GiB identity-mapped, a flat 64-bit code segment, interrupts disabled, CR4 with
//!    PAE | OSFXSR | OSXMMEXCPT, `rsi` = guest-physical address of a PVH `hvm_start_info`
//!    (magic 0x336ec578; `cmdline_paddr`, `rsdp_paddr` (optional), `memmap_paddr` /
//!    `memmap_entries` from version 1). No stack is needed: the guest loads its own stack,
//!    GDT and page tables at once. The start info, command line and memory map must lie
//!    outside the image (`[1 MiB, end of .bss)`) and below 3 GiB.
//! 2. **PVH 32-bit entry** named by the ELF note `XEN_ELFNOTE_PHYS32_ENTRY` (type 18, name
//!    "Xen"; what QEMU uses): 32-bit protected mode, paging off, `ebx` = `hvm_start_info`.
//!    A trampoline builds page tables, enables long mode and SSE and joins the 64-bit path.
//!
//! The guest's own code uses no SSE (it is built with `-sse,-sse2`; see `.cargo/config.toml`),
//! but enables it, as the PVH path promises the same state as the 64-bit entry.
//!
//! The guest relies on: COM1 (16550 at 0x3F8), PCI configuration ports 0xCF8/0xCFC, a local
//! xAPIC at 0xFEE0_0000 with a working timer, MSI-X on virtio devices, and power-off by writing
//! 0x2000 (SLP_EN, SLP_TYP 0) as 16 bits to port 0x604. Memory BARs that are 0 (unassigned),
//! above 4 GiB or over RAM are assigned by the guest from `[0xC000_0000, 0xFEC0_0000)`,
//! skipping BARs already assigned and the memory map's entries. It also reads, when present,
//! the MP table and the ACPI MADT (for `cpus`), and uses the PIT to calibrate the TSC (CPUID
//! leaves 0x15/0x16/0x40000010 otherwise).
//!
//! ## Command line
//!
//! `mode=normal` (default) or `mode=hostile`; `expect=rng,console` lists device kinds that
//! must be found and work, else the result is `fail`; `bars=reassign` assigns every virtio
//! BAR from the guest's own window (the path a VMM without firmware takes); `fault=panic` or
//! `fault=exception` fails on purpose (the failure line, then power-off);
//! `gpu_deviations=CHECK,…` names virtio-gpu hostile checks whose answers are reported as
//! deviations instead of failures (for a reference device that departs from the spec there;
//! see `gpu.rs`); `rng_loop=N` times N entropy requests after the tests; `input_wait=MS`
//! starts the input devices again after the tests, prints `PLEIADES-TESTGUEST-INPUT-WAITING`
//! on its own line and waits up to MS milliseconds for one event report from each (the host
//! injects them; the events are in the result, a device that sent none is a failure).
//!
//! In hostile mode the guest first behaves maliciously (garbage PCI configuration writes,
//! garbage virtio common configuration, malformed descriptor chains on virtio-rng, each
//! followed by a reset), restores what it trashed, and then runs the normal tests: the result
//! is `pass` when the devices still work and the guest never hung. A virtio-gpu first gets
//! malformed and out-of-range commands, each of which must be answered with the error the spec
//! asks for (the table in `gpu.rs`), then its normal test; a virtio-input device gets garbage
//! configuration selectors (which must read back size 0) and bad event and status buffers.

#![no_std]
#![no_main]

mod arch;
mod boot;
mod config;
mod cpus;
mod devices;
mod dma;
mod gpu;
mod hostile;
mod input;
mod interrupts;
mod inventory;
mod memory;
mod pci;
mod power;
mod pvh;
mod report;
mod serial;
mod sound;
mod time;
mod virtio;

use core::fmt::Write;
use core::panic::PanicInfo;

use config::Mode;
use inventory::Inventory;
use memory::PhysAddr;
use pci::BarWindow;
use pvh::StartInfo;
use report::{Errors, MARKER};
use serial::{Serial, log};

/// Called by `boot.rs` on the guest's own stack with the start info's address.
#[unsafe(no_mangle)]
extern "C" fn guest_main(start_info: u64) -> ! {
    time::mark_boot();
    serial::init();
    interrupts::init();
    let tsc_source = time::calibrate();
    let apic_timer = interrupts::check_timer();
    log!(
        "started: TSC {} kHz ({}), APIC timer {}",
        time::tsc_per_ms(),
        tsc_source.name(),
        if apic_timer { "ticking" } else { "silent (polling)" }
    );
    let mut errors = Errors::new();
    if interrupts::apic_base_msr() != interrupts::LAPIC_BASE.0 {
        errors.push(format_args!("the local APIC is at {:#x}, not 0xfee00000", interrupts::apic_base_msr()));
    }

    let info = match StartInfo::read(PhysAddr(start_info)) {
        Ok(info) => Some(info),
        Err(e) => {
            errors.push(format_args!("{e}"));
            None
        }
    };
    let mut cmdline_buf = [0u8; pvh::MAX_CMDLINE];
    let cmdline = info.as_ref().map_or("", |i| i.cmdline(&mut cmdline_buf));
    log!("command line: {cmdline:?}");
    let config = config::parse(cmdline, &mut errors);
    match config.fault {
        Some(config::Fault::Panic) => panic!("fault=panic asked for a panic"),
        Some(config::Fault::Exception) => arch::invalid_opcode(),
        None => {}
    }
    let cpus = cpus::count(info.as_ref().and_then(|i| i.rsdp));

    let bus = pci::scan_bus0();
    let mut window = bar_window(&bus, info.as_ref());
    let mut inventory = Inventory::probe(&bus, &mut window, info.as_ref(), config.reassign_bars, &mut errors);
    let hostile =
        (config.mode == Mode::Hostile).then(|| hostile::run(&bus, inventory.virtio_mut(), &mut errors));
    inventory.test_all(&config, &mut errors);
    if config.input_wait > 0 {
        inventory.input_wait(config.input_wait, &mut errors);
    }
    inventory.check_expected(config.expect, &mut errors);
    let rng_loop_us =
        (config.rng_loop > 0).then(|| inventory.rng_loop(config.rng_loop, &mut errors)).flatten();

    let memory_mib = info.as_ref().map_or(0, |i| i.ram_bytes() >> 20);
    let mut out = Serial;
    let _ = write!(
        out,
        "{MARKER} {{\"result\":\"{}\",\"mode\":\"{}\",\"cpus\":{},\"cpus_mp\":{},\"cpus_madt\":{},\
         \"memory_mib\":{memory_mib},\"tsc\":\"{}\",\"apic_timer\":{apic_timer},\"devices\":",
        if errors.is_empty() { "pass" } else { "fail" },
        config.mode.name(),
        cpus.best(),
        cpus.mp.unwrap_or(0),
        cpus.madt.unwrap_or(0),
        tsc_source.name(),
    );
    let _ = inventory.write_json(&mut out);
    let _ = write!(out, ",\"irqs\":{}", interrupts::device_irqs());
    if let Some(h) = &hostile {
        let _ = out.write_str(",\"hostile\":");
        let _ = h.write_json(&mut out);
    }
    if let Some(us) = rng_loop_us {
        let _ = write!(out, ",\"rng_loop\":{{\"requests\":{},\"us\":{us}}}", config.rng_loop);
    }
    let _ = write!(out, ",\"boot_ms\":{},\"errors\":", time::ms_since_boot());
    let _ = errors.write_json(&mut out);
    let _ = out.write_str("}\n");
    power::off()
}

/// The window for BARs the guest assigns, with every BAR firmware already assigned and every
/// memory map entry kept out of it.
fn bar_window(bus: &pci::Bus, info: Option<&StartInfo>) -> BarWindow {
    let mut window = BarWindow::new();
    for function in bus.functions() {
        let mut index = 0;
        while index < function.bar_count() {
            let bar = pci::probe_memory_bar(function.bdf, index);
            if let Some(bar) = bar.filter(|b| b.addr != 0) {
                window.reserve(bar.addr, bar.addr.saturating_add(bar.size));
            }
            index += if bar.is_some_and(|b| b.is64) { 2 } else { 1 };
        }
    }
    for entry in info.iter().flat_map(|i| i.memmap()) {
        window.reserve(entry.addr, entry.addr.saturating_add(entry.size));
    }
    window
}

#[panic_handler]
fn panic(info: &PanicInfo<'_>) -> ! {
    report::fatal(format_args!("{info}"))
}
