//! The virtio devices found on bus 0: probing them, running the test for each kind the guest
//! knows, checking `expect=`, and their part of the result line.

use core::fmt::{self, Write};

use crate::config::{Config, TypeSet};
use crate::devices::{self, ConsoleResult, RngResult, TestError};
use crate::dma::{self, MAX_DEVICES};
use crate::gpu::{self, GpuResult};
use crate::input::{self, InputResult, Waiter};
use crate::interrupts;
use crate::pci::{BarWindow, Bdf, Bus};
use crate::pvh::StartInfo;
use crate::report::{Errors, FixedStr, JsonStr};
use crate::serial::log;
use crate::sound::{self, SoundResult};
use crate::virtio::{self, DeviceType, VirtioPci};

/// What the result line says about one virtio device.
#[derive(Debug, Clone, Copy)]
struct Entry {
    kind: DeviceType,
    bdf: Bdf,
    /// Probed and mapped (the device's structures were found).
    usable: bool,
    msix: bool,
    /// The queues accepted MSI-X vector 0.
    vector: bool,
    /// BARs the guest assigned itself (bit mask).
    assigned: u8,
    tested: bool,
    ok: bool,
    rng: Option<RngResult>,
    console: Option<ConsoleResult>,
    gpu: Option<GpuResult>,
    input: Option<InputResult>,
    sound: Option<SoundResult>,
}

impl Entry {
    fn write_json(&self, out: &mut impl Write) -> fmt::Result {
        let mut kind = FixedStr::<16>::new();
        match &self.input {
            // Keyboards and tablets by what they are.
            Some(i) => kind.write_str(i.kind.name())?,
            None => write!(kind, "{}", self.kind)?,
        }
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
            write!(out, ",\"tx\":{},\"rx\":{},\"rx_data\":{}", c.tx, c.rx, JsonStr(c.rx_data.as_str()))?;
        }
        if let Some(g) = &self.gpu {
            g.write_json(out)?;
        }
        if let Some(i) = &self.input {
            i.write_json(out)?;
        }
        if let Some(s) = &self.sound {
            s.write_json(out)?;
        }
        write!(out, ",\"msix\":{}", self.msix)?;
        if self.tested {
            write!(out, ",\"vector\":{}", self.vector)?;
        }
        write!(out, ",\"assigned_bars\":{}}}", self.assigned)
    }
}

/// The virtio devices, in bus order; slot `i` uses DMA slot `i`.
#[derive(Debug)]
pub struct Inventory {
    entries: [Option<Entry>; MAX_DEVICES],
    virtio: [Option<VirtioPci>; MAX_DEVICES],
}

impl Inventory {
    /// Finds the virtio functions on `bus`, maps them (assigning BARs from `window` where
    /// needed) and points their MSI-X at the boot CPU.
    pub fn probe(
        bus: &Bus,
        window: &mut BarWindow,
        info: Option<&StartInfo>,
        reassign_bars: bool,
        errors: &mut Errors,
    ) -> Self {
        let mut inventory = Self { entries: [None; MAX_DEVICES], virtio: [None; MAX_DEVICES] };
        let apic_id = interrupts::bsp_apic_id();
        let mut count = 0;
        for function in bus.functions() {
            let Some(kind) = DeviceType::of(function) else { continue };
            if count == MAX_DEVICES {
                errors.push(format_args!("more than {MAX_DEVICES} virtio devices; {} ignored", function.bdf));
                continue;
            }
            let mut entry = Entry {
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
                gpu: None,
                input: None,
                sound: None,
            };
            match virtio::probe(function, kind, window, info, reassign_bars) {
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
                    inventory.virtio[count] = Some(device);
                }
                Err(e) => errors.push(format_args!("virtio-{kind} at {}: {e}", function.bdf)),
            }
            inventory.entries[count] = Some(entry);
            count += 1;
        }
        inventory
    }

    /// The mapped devices (hostile mode abuses them).
    pub fn virtio_mut(&mut self) -> &mut [Option<VirtioPci>; MAX_DEVICES] {
        &mut self.virtio
    }

    /// Runs the test of every device kind the guest knows (rng, console, gpu, input, sound).
    pub fn test_all(&mut self, config: &Config, errors: &mut Errors) {
        for (slot, (entry, device)) in self.entries.iter_mut().zip(self.virtio.iter_mut()).enumerate() {
            let (Some(entry), Some(device)) = (entry.as_mut(), device.as_mut()) else { continue };
            let memory = dma::device_memory(slot);
            let outcome = match entry.kind {
                DeviceType::RNG => Some(devices::test_rng(device, &memory).map(|r| entry.rng = Some(r))),
                DeviceType::CONSOLE => Some(
                    devices::test_console(device, &memory, config.console_input)
                        .map(|c| entry.console = Some(c)),
                ),
                DeviceType::GPU => {
                    let (result, outcome) =
                        gpu::test(device, &memory, config.mode, config.gpu_deviations, errors);
                    entry.gpu = Some(result);
                    Some(outcome.map_err(TestError::Gpu))
                }
                DeviceType::INPUT => {
                    let (result, outcome) = input::test(device, &memory, config.mode);
                    entry.input = Some(result);
                    Some(outcome.map_err(TestError::Input))
                }
                DeviceType::SOUND => {
                    let (result, outcome) = sound::test(device, &memory);
                    entry.sound = Some(result);
                    Some(outcome.map_err(TestError::Sound))
                }
                _ => None,
            };
            let Some(outcome) = outcome else { continue };
            entry.tested = true;
            entry.vector = device.queue_vector_ok;
            match outcome {
                Ok(()) => entry.ok = true,
                Err(e) => {
                    if let TestError::Rng(r) = e {
                        entry.rng = Some(r);
                    }
                    errors.push(format_args!("virtio-{} at {}: {e}", entry.kind, entry.bdf));
                }
            }
        }
    }

    /// `input_wait=MS`: starts every input device that passed its test, announces
    /// [`input::WAITING_MARKER`] on COM1 and waits up to `ms` for one event report from each.
    pub fn input_wait(&mut self, ms: u64, errors: &mut Errors) {
        let mut waiters: [Option<Waiter>; MAX_DEVICES] = [const { None }; MAX_DEVICES];
        for (slot, (entry, device)) in self.entries.iter_mut().zip(self.virtio.iter_mut()).enumerate() {
            let (Some(entry), Some(device)) = (entry.as_mut(), device.as_mut()) else { continue };
            let Some(result) = entry.input.as_mut().filter(|_| entry.ok) else { continue };
            Waiter::clear(result);
            match input::start_waiting(device, &dma::device_memory(slot), slot) {
                Ok(w) => waiters[slot] = Some(w),
                Err(e) => errors.push(format_args!("virtio-input at {}: {e}", entry.bdf)),
            }
        }
        if waiters.iter().all(Option::is_none) {
            errors.push(format_args!("input_wait: no working virtio-input device to wait on"));
            return;
        }
        let _ = writeln!(crate::serial::Serial, "{}", input::WAITING_MARKER);
        let deadline = crate::time::Deadline::after_ms(ms);
        for _ in 0..ms.saturating_mul(8).saturating_add(1000) {
            let mut waiting = false;
            for waiter in waiters.iter_mut().flatten() {
                let slot = waiter.slot;
                let (Some(entry), Some(device)) = (self.entries[slot].as_mut(), self.virtio[slot].as_ref())
                else {
                    continue;
                };
                if let Some(result) = entry.input.as_mut() {
                    waiting |= !waiter.poll(device, &dma::device_memory(slot), result);
                }
            }
            if !waiting || deadline.passed() {
                break;
            }
            interrupts::idle();
        }
        for waiter in waiters.iter().flatten() {
            let slot = waiter.slot;
            if let (Some(entry), Some(device)) = (self.entries[slot].as_mut(), self.virtio[slot].as_ref()) {
                let _ = device.reset();
                if !entry.input.is_some_and(|i| i.report) {
                    entry.ok = false;
                    errors.push(format_args!(
                        "virtio-input at {}: {}",
                        entry.bdf,
                        input::InputError::NoReport
                    ));
                }
            }
        }
    }

    /// Times `count` entropy requests on the first rng device; returns the microseconds.
    pub fn rng_loop(&mut self, count: u32, errors: &mut Errors) -> Option<u64> {
        let slot = self.entries.iter().position(|e| e.as_ref().is_some_and(|e| e.kind == DeviceType::RNG))?;
        let device = self.virtio[slot].as_mut()?;
        match devices::rng_loop(device, &dma::device_memory(slot), count) {
            Ok(us) => Some(us),
            Err(e) => {
                errors.push(format_args!("rng_loop: {e}"));
                None
            }
        }
    }

    /// Every kind in `expect` must be present, and working where the guest can test it.
    pub fn check_expected(&self, expect: TypeSet, errors: &mut Errors) {
        for kind in expect.iter() {
            let mut found = self.entries.iter().flatten().filter(|e| e.kind == kind).peekable();
            if found.peek().is_none() {
                errors.push(format_args!("expected a virtio-{kind} device, found none"));
            } else if !found.any(|e| e.ok || (!e.tested && e.usable)) {
                errors.push(format_args!("expected a working virtio-{kind} device"));
            }
        }
    }

    /// The `devices` array of the result line.
    pub fn write_json(&self, out: &mut impl Write) -> fmt::Result {
        out.write_char('[')?;
        for (i, entry) in self.entries.iter().flatten().enumerate() {
            if i > 0 {
                out.write_char(',')?;
            }
            entry.write_json(out)?;
        }
        out.write_char(']')
    }
}
