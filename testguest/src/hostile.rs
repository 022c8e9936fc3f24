//! Hostile mode: the guest turns malicious, then proves the devices survived.
//!
//! 1. Garbage PCI configuration writes to every function of bus 0, present or not: command
//!    registers, BARs, random offsets, odd widths, nonsense 0xCF8 addresses. Everything that
//!    was written on a present function is saved first and restored afterwards.
//! 2. Garbage virtio common configuration on every virtio device: out-of-range queue
//!    selectors, queue sizes 0/3/0xFFFF, wild ring addresses, odd status sequences, unknown
//!    feature bits, bogus notifications; then a reset.
//! 3. On the first virtio-rng device, properly initialised: descriptors outside RAM, absurd
//!    lengths, a looping chain, garbage indirect tables, an available index that jumps by
//!    1000, …; after each a notification, a bounded wait, a reset and a good request.
//!
//! Every wait is bounded; the normal device tests run afterwards (see `main.rs`).
//!
//! Under QEMU, `desc-len-4g` is the slow one: QEMU's virtio-rng sizes its entropy request by
//! the guest's descriptor and generates 4 GiB of random bytes (seconds of host CPU and 4 GiB
//! of transient host memory) before it finds the buffer unmappable. A VMM should bound it.

use core::fmt::{self, Write};

use crate::arch::{inl, outl, outw};
use crate::devices::{self, RNG_REQUEST};
use crate::dma::{self, DeviceMemory, MAX_DEVICES};
use crate::pci::{self, Bdf, Bus, MAX_FUNCTIONS};
use crate::report::{Errors, JsonStr};
use crate::virtio::{
    CONFIG_MSIX_VECTOR, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, DEVICE_FEATURE, DEVICE_FEATURE_SELECT,
    DEVICE_STATUS, DRIVER_FEATURE, DRIVER_FEATURE_SELECT, Descriptor, DeviceType, NUM_QUEUES, QUEUE_DESC,
    QUEUE_DEVICE, QUEUE_DRIVER, QUEUE_ENABLE, QUEUE_MSIX_VECTOR, QUEUE_SELECT, QUEUE_SIZE,
    STATUS_NEEDS_RESET, VirtioPci, Virtqueue,
};

/// BAR garbage: the sizing pattern, zero, and addresses in the PCI hole (never over the
/// guest's own RAM above 1 MiB, never over the local APIC).
const GARBAGE_BARS: [u32; 4] = [0xFFFF_FFFF, 0x0000_0000, 0xDEAD_B000, 0xA5A5_A5A0];
/// Random configuration offsets written per function.
const RANDOM_OFFSETS: usize = 8;
/// How long an abused queue gets to answer.
const ABUSE_WAIT_MS: u64 = 300;
/// An address far outside any guest's RAM.
const OUTSIDE_RAM: u64 = 0xFFFF_FFFF_F000;

/// xorshift64: deterministic garbage, the same every run.
#[derive(Debug)]
struct Garbage(u64);

impl Garbage {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn u32(&mut self) -> u32 {
        (self.next() >> 16) as u32
    }
}

#[derive(Debug, Clone, Copy)]
struct Abuse {
    name: &'static str,
    /// The device returned the buffer (with this used length).
    completed: Option<u32>,
    needs_reset: bool,
    recovered: bool,
}

const ABUSES: usize = 10;

/// What the hostile phase did, for the result line.
#[derive(Debug)]
pub struct HostileReport {
    pci_writes: u32,
    cfg_writes: u32,
    restored: bool,
    abuses: [Option<Abuse>; ABUSES],
}

impl HostileReport {
    pub fn write_json(&self, out: &mut impl Write) -> fmt::Result {
        write!(
            out,
            "{{\"pci_writes\":{},\"cfg_writes\":{},\"restored\":{},\"abuses\":[",
            self.pci_writes, self.cfg_writes, self.restored
        )?;
        for (i, a) in self.abuses.iter().flatten().enumerate() {
            if i > 0 {
                out.write_char(',')?;
            }
            write!(out, "{{\"name\":{},\"completed\":{},", JsonStr(a.name), a.completed.is_some())?;
            if let Some(len) = a.completed {
                write!(out, "\"used_len\":{len},")?;
            }
            write!(out, "\"needs_reset\":{},\"recovered\":{}}}", a.needs_reset, a.recovered)?;
        }
        out.write_str("]}")
    }
}

pub fn run(bus: &Bus, devices: &mut [Option<VirtioPci>; MAX_DEVICES], errors: &mut Errors) -> HostileReport {
    crate::serial::log!("hostile: garbage PCI configuration writes");
    let mut report = HostileReport { pci_writes: 0, cfg_writes: 0, restored: true, abuses: [None; ABUSES] };
    let mut garbage = Garbage(0x9E37_79B9_7F4A_7C15);
    pci_garbage(bus, devices, &mut garbage, &mut report, errors);

    crate::serial::log!("hostile: garbage virtio common configuration");
    for device in devices.iter().flatten() {
        common_cfg_garbage(device, &mut garbage, &mut report);
        if let Err(e) = device.reset() {
            errors.push(format_args!(
                "virtio-{} at {} after garbage configuration: {e}",
                device.kind, device.bdf
            ));
        }
    }

    let rng =
        devices.iter_mut().enumerate().find(|(_, d)| d.as_ref().is_some_and(|d| d.kind == DeviceType::RNG));
    match rng {
        Some((slot, Some(device))) => {
            crate::serial::log!("hostile: malformed virtqueues on virtio-rng at {}", device.bdf);
            descriptor_abuse(device, &dma::device_memory(slot), &mut report, errors);
        }
        _ => crate::serial::log!("hostile: no virtio-rng device to abuse"),
    }
    report
}

/// Configuration a present function had before the garbage.
#[derive(Debug, Clone, Copy)]
struct Saved {
    bdf: Bdf,
    command: u16,
    bars: [u32; 6],
    bar_count: u8,
    /// (offset, value) of the header fields and random dwords that were overwritten.
    extra: [(u8, u32); RANDOM_OFFSETS + 2],
    extra_len: usize,
}

fn pci_garbage(
    bus: &Bus,
    devices: &[Option<VirtioPci>; MAX_DEVICES],
    garbage: &mut Garbage,
    report: &mut HostileReport,
    errors: &mut Errors,
) {
    let is_virtio = |bdf: Bdf| devices.iter().flatten().any(|d| d.bdf == bdf);
    let mut saved: [Option<Saved>; MAX_FUNCTIONS] = [None; MAX_FUNCTIONS];
    let mut saved_len = 0;

    for device in 0..32u8 {
        for function in 0..8u8 {
            let bdf = Bdf::new(0, device, function);
            let present = bus.functions().find(|f| f.bdf == bdf);
            // Random offsets only where they cannot break the platform: virtio functions and
            // functions that do not exist. (Chipset registers such as the LPC's PMBASE would
            // take the serial port or the power-off port away.)
            let random = present.is_none() || is_virtio(bdf);
            let mut offsets = [0u8; RANDOM_OFFSETS];
            for o in &mut offsets {
                *o = (0x40 + (garbage.u32() % 0xC0) as u8) & 0xFC;
            }
            if let Some(f) = present {
                if saved_len == MAX_FUNCTIONS {
                    continue;
                }
                let mut s = Saved {
                    bdf,
                    command: bdf.read16(pci::COMMAND),
                    bars: [0; 6],
                    bar_count: f.bar_count(),
                    extra: [(0, 0); RANDOM_OFFSETS + 2],
                    extra_len: 0,
                };
                for i in 0..s.bar_count {
                    s.bars[usize::from(i)] = bdf.read32(pci::BAR0 + 4 * i);
                }
                if random {
                    // Expansion ROM BAR and interrupt line, then the random dwords.
                    for offset in [0x30u8, 0x3C].into_iter().chain(offsets) {
                        s.extra[s.extra_len] = (offset, bdf.read32(offset));
                        s.extra_len += 1;
                    }
                }
                saved[saved_len] = Some(s);
                saved_len += 1;
            }

            for i in 0..6u8 {
                bdf.write32(pci::BAR0 + 4 * i, GARBAGE_BARS[(garbage.next() % 4) as usize]);
                report.pci_writes += 1;
            }
            bdf.write32(pci::COMMAND, garbage.u32() | 0x7);
            report.pci_writes += 1;
            if random {
                bdf.write32(0x30, garbage.u32());
                bdf.write8(0x3C, garbage.u32() as u8);
                for offset in offsets {
                    bdf.write32(offset, garbage.u32());
                    bdf.write16(offset + 2, garbage.u32() as u16);
                    bdf.write8(offset + 1, garbage.u32() as u8);
                    report.pci_writes += 3;
                }
                report.pci_writes += 2;
            }
        }
    }

    crate::serial::log!("hostile: {} garbage writes done", report.pci_writes);
    // Nonsense addresses: a bus that does not exist, reserved bits set, the enable bit clear,
    // and odd-width data accesses. Port 0xCF9 (reset control) is never touched.
    let absent = 0x8000_0000u32 | 0xAB << 16 | 0x15 << 11 | 5 << 8;
    for address in [0x80FF_FFFC, absent | 0x7F00_0000 | 0xFC, absent & 0x7FFF_FFFF, 0x0000_0CF8] {
        outl(0xCF8, address);
        outl(0xCFC, garbage.u32());
        outw(0xCFE, garbage.u32() as u16);
        let _ = inl(0xCFC);
        report.pci_writes += 2;
    }

    crate::serial::log!("hostile: restoring");
    // Restore, newest first: memory decoding off, BARs and fields back, then the command.
    for s in saved[..saved_len].iter().rev().flatten() {
        s.bdf.write16(pci::COMMAND, s.command & !(pci::COMMAND_IO | pci::COMMAND_MEMORY));
        for &(offset, value) in s.extra[..s.extra_len].iter().rev() {
            s.bdf.write32(offset, value);
        }
        for i in 0..s.bar_count {
            s.bdf.write32(pci::BAR0 + 4 * i, s.bars[usize::from(i)]);
        }
        s.bdf.write16(pci::COMMAND, s.command);
        let bars_back = (0..s.bar_count).all(|i| s.bdf.read32(pci::BAR0 + 4 * i) == s.bars[usize::from(i)]);
        let command_back = s.bdf.read16(pci::COMMAND) == s.command;
        if !bars_back || !command_back {
            report.restored = false;
            errors.push(format_args!(
                "{}: configuration not restored after the garbage writes (BARs {bars_back}, command {command_back})",
                s.bdf
            ));
        }
    }
}

/// Common configuration writes, counted.
struct CountedWrites<'a> {
    region: &'a crate::memory::MmioRegion,
    writes: u32,
}

impl CountedWrites<'_> {
    fn w8(&mut self, offset: u64, value: u8) {
        self.region.write8(offset, value);
        self.writes += 1;
    }
    fn w16(&mut self, offset: u64, value: u16) {
        self.region.write16(offset, value);
        self.writes += 1;
    }
    fn w32(&mut self, offset: u64, value: u32) {
        self.region.write32(offset, value);
        self.writes += 1;
    }
    fn w64(&mut self, offset: u64, value: u64) {
        self.region.write64_split(offset, value);
        self.writes += 2;
    }
}

fn common_cfg_garbage(device: &VirtioPci, garbage: &mut Garbage, report: &mut HostileReport) {
    let c = &mut CountedWrites { region: &device.common, writes: 0 };
    let queues = c.region.read16(NUM_QUEUES);
    // Queue selectors out of range, with everything a queue has.
    for select in [0xFFFF, queues, queues.wrapping_add(5), 0x8000] {
        c.w16(QUEUE_SELECT, select);
        c.w16(QUEUE_SIZE, 8);
        c.w16(QUEUE_MSIX_VECTOR, 0x1234);
        c.w64(QUEUE_DESC, garbage.next());
        c.w16(QUEUE_ENABLE, 1);
        let _ = c.region.read16(QUEUE_SIZE);
    }
    // Queue 0 with impossible sizes and wild rings.
    c.w16(QUEUE_SELECT, 0);
    for size in [0, 3, 0xFFFF] {
        c.w16(QUEUE_SIZE, size);
    }
    c.w64(QUEUE_DESC, OUTSIDE_RAM);
    c.w64(QUEUE_DRIVER, garbage.next());
    c.w64(QUEUE_DEVICE, u64::MAX);
    c.w16(QUEUE_MSIX_VECTOR, 0x7777);
    c.w16(QUEUE_ENABLE, 1);
    c.w16(QUEUE_ENABLE, 0xBAD);
    // Unknown feature bits, selectors out of range.
    c.w32(DEVICE_FEATURE_SELECT, 0xFFFF_FFFF);
    let _ = c.region.read32(DEVICE_FEATURE);
    for select in [0, 1, 2, 3, 0xDEAD] {
        c.w32(DRIVER_FEATURE_SELECT, select);
        c.w32(DRIVER_FEATURE, 0xFFFF_FFFF);
    }
    c.w16(CONFIG_MSIX_VECTOR, 0xBEEF);
    // Status sequences the spec forbids, with notifications in between.
    for status in [4u8, 8, 0x0F, 0x80, 0xFF, STATUS_NEEDS_RESET, 0x02, 0x07] {
        c.w8(DEVICE_STATUS, status);
        device.notify_raw(0, garbage.u32() as u16);
        device.notify_raw(0, 0);
        c.writes += 2;
    }
    // Reads a driver may do at any time: the ISR (read-to-clear) and the device configuration.
    if let Some(isr) = &device.isr {
        let _ = isr.read8(0);
    }
    if let Some(config) = &device.device_cfg {
        for offset in 0..config.len().min(16) {
            let _ = config.read8(offset);
        }
    }
    report.cfg_writes += c.writes;
}

type AbuseFn = fn(&mut Virtqueue, &DeviceMemory);

const ABUSE_LIST: [(&str, AbuseFn); ABUSES] = [
    ("desc-outside-ram", |q, _| {
        q.write_descriptor(
            0,
            Descriptor { addr: OUTSIDE_RAM, len: RNG_REQUEST, flags: DESC_F_WRITE, next: 0 },
        );
        q.publish(0);
    }),
    ("desc-len-4g", |q, m| {
        q.write_descriptor(0, Descriptor { addr: m.buffer.0, len: u32::MAX, flags: DESC_F_WRITE, next: 0 });
        q.publish(0);
    }),
    ("chain-readable-len-4g", |q, m| {
        let flags = DESC_F_WRITE | DESC_F_NEXT;
        q.write_descriptor(0, Descriptor { addr: m.buffer.0, len: RNG_REQUEST, flags, next: 1 });
        q.write_descriptor(1, Descriptor { addr: m.buffer.0, len: u32::MAX, flags: 0, next: 0 });
        q.publish(0);
    }),
    ("desc-loop", |q, m| {
        let flags = DESC_F_WRITE | DESC_F_NEXT;
        q.write_descriptor(0, Descriptor { addr: m.buffer.0, len: RNG_REQUEST, flags, next: 0 });
        q.publish(0);
    }),
    ("desc-next-out-of-range", |q, m| {
        let flags = DESC_F_WRITE | DESC_F_NEXT;
        q.write_descriptor(0, Descriptor { addr: m.buffer.0, len: RNG_REQUEST, flags, next: 0xFFFF });
        q.publish(0);
    }),
    ("indirect-garbage-table", |q, _| {
        let table = dma::spare_page();
        dma::fill(table, dma::PAGE_SIZE, 0xA5);
        q.write_descriptor(0, Descriptor { addr: table.0, len: 3 * 16, flags: DESC_F_INDIRECT, next: 0 });
        q.publish(0);
    }),
    ("indirect-bad-length", |q, _| {
        let table = dma::spare_page();
        q.write_descriptor(0, Descriptor { addr: table.0, len: 17, flags: DESC_F_INDIRECT, next: 0 });
        q.publish(0);
    }),
    ("head-out-of-range", |q, _| q.publish(0xFFFF)),
    ("avail-idx-jump-1000", |q, m| {
        q.write_descriptor(
            0,
            Descriptor { addr: m.buffer.0, len: RNG_REQUEST, flags: DESC_F_WRITE, next: 0 },
        );
        q.publish(0);
        q.set_avail_idx(q.next_avail().wrapping_add(1000));
    }),
    ("zero-length", |q, m| {
        q.write_descriptor(0, Descriptor { addr: m.buffer.0, len: 0, flags: DESC_F_WRITE, next: 0 });
        q.publish(0);
    }),
];

fn descriptor_abuse(
    device: &mut VirtioPci,
    memory: &DeviceMemory,
    report: &mut HostileReport,
    errors: &mut Errors,
) {
    for (i, (name, abuse)) in ABUSE_LIST.iter().enumerate() {
        let mut queue = match device.init(memory, 1) {
            Ok([Some(q), _]) => q,
            Ok(_) => continue,
            Err(e) => {
                errors.push(format_args!("virtio-rng init before {name}: {e}"));
                continue;
            }
        };
        abuse(&mut queue, memory);
        device.notify(&queue);
        let completed = device.wait_used(&mut queue, ABUSE_WAIT_MS).map(|u| u.len);
        let needs_reset = device.status() & STATUS_NEEDS_RESET != 0;
        let recovered = match device
            .reset()
            .map_err(devices::TestError::from)
            .and_then(|()| good_request(device, memory))
        {
            Ok(()) => true,
            Err(e) => {
                errors.push(format_args!("virtio-rng did not recover after {name}: {e}"));
                false
            }
        };
        crate::serial::log!("hostile: {name}: used {completed:?}, needs reset {needs_reset}");
        report.abuses[i] = Some(Abuse { name, completed, needs_reset, recovered });
    }
}

/// One well-formed 64-byte request on a freshly initialised device.
fn good_request(device: &mut VirtioPci, memory: &DeviceMemory) -> Result<(), devices::TestError> {
    let [Some(mut queue), _] = device.init(memory, 1)? else {
        return Err(crate::virtio::VirtioError::QueueUnavailable(0).into());
    };
    let len = devices::roundtrip(device, &mut queue, memory.buffer, RNG_REQUEST, DESC_F_WRITE)?;
    let _ = device.reset();
    if len == RNG_REQUEST {
        Ok(())
    } else {
        Err(devices::TestError::Rng(devices::RngResult { bytes: [len, 0], nonzero: false, distinct: false }))
    }
}
