//! # The Pleiades test guest
//!
//! A small `no_std` program that Pleiades' VMM boots to test itself, and that also runs under
//! stock QEMU (`-kernel testguest.elf`), so it is checked against QEMU's reference virtio
//! devices. It finds the virtio-pci devices on bus 0, drives virtio-rng and virtio-console
//! through MSI-X interrupts, counts the CPUs in the firmware tables, prints exactly one line
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
//! `fault=exception` fails on purpose (the failure line, then power-off).
//!
//! In hostile mode the guest first behaves maliciously (garbage PCI configuration writes,
//! garbage virtio common configuration, malformed descriptor chains on virtio-rng, each
//! followed by a reset), restores what it trashed, and then runs the normal tests: the result
//! is `pass` when the devices still work and the guest never hung.

#![no_std]
#![no_main]

mod arch;
mod boot;
mod config;
mod cpus;
mod devices;
mod dma;
mod hostile;
mod interrupts;
mod memory;
mod pci;
mod power;
mod pvh;
mod report;
mod serial;
mod time;
mod virtio;

use core::fmt::{self, Write};
use core::panic::PanicInfo;

use config::Mode;
use devices::{ConsoleResult, RngResult};
use dma::MAX_DEVICES;
use memory::PhysAddr;
use pci::{BarWindow, Bdf};
use pvh::StartInfo;
use report::{Errors, JsonStr, MARKER};
use serial::{Serial, log};
use virtio::{DeviceType, VirtioPci};

/// What the result line says about one virtio device.
#[derive(Debug, Clone, Copy)]
struct DeviceEntry {
    kind: DeviceType,
    bdf: Bdf,
    /// Probed and mapped (the device's structures were found).
    usable: bool,
    msix: bool,
    /// The queue accepted MSI-X vector 0.
    vector: bool,
    /// BARs the guest assigned itself (bit mask).
    assigned: u8,
    tested: bool,
    ok: bool,
    rng: Option<RngResult>,
    console: Option<ConsoleResult>,
}

impl DeviceEntry {
    fn write_json(&self, out: &mut impl Write) -> fmt::Result {
        let mut kind = report::FixedStr::<16>::new();
        let _ = write!(kind, "{}", self.kind);
        write!(out, "{{\"kind\":{},\"bdf\":\"{}\"", JsonStr(kind.as_str()), self.bdf)?;
        if self.tested {
            write!(out, ",\"ok\":{}", self.ok)?;
        } else {
            write!(out, ",\"tested\":false")?;
        }
        if let Some(r) = self.rng {
            write!(out, ",\"bytes\":[{},{}],\"distinct\":{}", r.bytes[0], r.bytes[1], r.distinct)?;
        }
        if let Some(c) = self.console {
            write!(out, ",\"tx\":{},\"rx\":{}", c.tx, c.rx)?;
        }
        write!(out, ",\"msix\":{}", self.msix)?;
        if self.tested {
            write!(out, ",\"vector\":{}", self.vector)?;
        }
        write!(out, ",\"assigned_bars\":{}}}", self.assigned)
    }
}

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
    if let Some(info) = &info {
        for entry in info.memmap() {
            window.reserve(entry.addr, entry.addr.saturating_add(entry.size));
        }
    }

    let apic_id = interrupts::bsp_apic_id();
    let mut entries: [Option<DeviceEntry>; MAX_DEVICES] = [None; MAX_DEVICES];
    let mut virtio: [Option<VirtioPci>; MAX_DEVICES] = [None; MAX_DEVICES];
    let mut count = 0;
    for function in bus.functions() {
        let Some(kind) = DeviceType::of(function) else { continue };
        if count == MAX_DEVICES {
            errors.push(format_args!("more than {MAX_DEVICES} virtio devices; {} ignored", function.bdf));
            continue;
        }
        let mut entry = DeviceEntry {
            kind,
            bdf: function.bdf,
            usable: false,
            msix: false,
            vector: false,
            assigned: 0,
            tested: false,
            ok: false,
            rng: None,
            console: None,
        };
        match virtio::probe(function, kind, &mut window, info.as_ref(), config.reassign_bars) {
            Ok((device, assigned)) => {
                log!(
                    "virtio-{kind} at {}: common cfg at {}, BARs assigned by the guest {:#x}",
                    function.bdf,
                    device.common.base(),
                    assigned.0
                );
                device.enable_msix(apic_id);
                entry.usable = true;
                entry.msix = device.has_msix();
                entry.assigned = assigned.0;
                virtio[count] = Some(device);
            }
            Err(e) => errors.push(format_args!("virtio-{kind} at {}: {e}", function.bdf)),
        }
        entries[count] = Some(entry);
        count += 1;
    }

    let hostile = (config.mode == Mode::Hostile).then(|| hostile::run(&bus, &mut virtio, &mut errors));

    for (slot, (entry, device)) in entries.iter_mut().zip(virtio.iter_mut()).enumerate() {
        let (Some(entry), Some(device)) = (entry.as_mut(), device.as_mut()) else { continue };
        let memory = dma::device_memory(slot);
        match entry.kind {
            DeviceType::RNG => {
                entry.tested = true;
                match devices::test_rng(device, &memory) {
                    Ok(r) => (entry.ok, entry.rng) = (true, Some(r)),
                    Err(e) => {
                        if let devices::TestError::Rng(r) = e {
                            entry.rng = Some(r);
                        }
                        errors.push(format_args!("virtio-rng at {}: {e}", entry.bdf));
                    }
                }
            }
            DeviceType::CONSOLE => {
                entry.tested = true;
                match devices::test_console(device, &memory) {
                    Ok(c) => (entry.ok, entry.console) = (true, Some(c)),
                    Err(e) => errors.push(format_args!("virtio-console at {}: {e}", entry.bdf)),
                }
            }
            _ => {}
        }
        entry.vector = device.queue_vector_ok;
    }

    for kind in config.expect.iter() {
        let found = entries.iter().flatten().filter(|e| e.kind == kind);
        if found.clone().next().is_none() {
            errors.push(format_args!("expected a virtio-{kind} device, found none"));
        } else if !found.clone().any(|e| e.ok || !e.tested && e.usable) {
            errors.push(format_args!("expected a working virtio-{kind} device"));
        }
    }

    let memory_mib = info.as_ref().map_or(0, |i| i.ram_bytes() >> 20);
    let mut out = Serial;
    let _ = write!(
        out,
        "{MARKER} {{\"result\":\"{}\",\"mode\":\"{}\",\"cpus\":{},\"cpus_mp\":{},\"cpus_madt\":{},\
         \"memory_mib\":{memory_mib},\"tsc\":\"{}\",\"apic_timer\":{apic_timer},\"devices\":[",
        if errors.is_empty() { "pass" } else { "fail" },
        config.mode.name(),
        cpus.best(),
        cpus.mp.unwrap_or(0),
        cpus.madt.unwrap_or(0),
        tsc_source.name(),
    );
    for (i, entry) in entries.iter().flatten().enumerate() {
        if i > 0 {
            let _ = out.write_char(',');
        }
        let _ = entry.write_json(&mut out);
    }
    let _ = write!(out, "],\"irqs\":{}", interrupts::device_irqs());
    if let Some(h) = &hostile {
        let _ = out.write_str(",\"hostile\":");
        let _ = h.write_json(&mut out);
    }
    let _ = write!(out, ",\"boot_ms\":{},\"errors\":", time::ms_since_boot());
    let _ = errors.write_json(&mut out);
    let _ = out.write_str("}\n");
    power::off()
}

#[panic_handler]
fn panic(info: &PanicInfo<'_>) -> ! {
    report::fatal(format_args!("{info}"))
}
