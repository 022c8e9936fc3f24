//! virtio-input (virtio 1.2, 5.8): the configuration's select/subsel protocol, the event
//! queue (0) and the status queue (1); keyboards and tablets.
//!
//! Only `VIRTIO_F_VERSION_1` is accepted. The configuration is read after FEATURES_OK and
//! before DRIVER_OK, as Linux does: write `select` and `subsel`, read `size`, then `size`
//! bytes of the union at offset 8.
//!
//! ## Test
//!
//! 1. `ID_NAME` (size > 0, printable), `ID_SERIAL` and `ID_DEVIDS` (reported when present),
//!    `EV_BITS` for `EV_KEY`, `EV_REL`, `EV_ABS`, `EV_LED`.
//! 2. The kind: a **tablet** has `EV_ABS` with `ABS_X` and `ABS_Y`, an `ABS_INFO` for each with
//!    `max` > 0 and > `min`, and `EV_KEY` with `BTN_LEFT`; a **keyboard** has `EV_KEY` with
//!    `KEY_A`. Anything else is reported as `input` (name and some event type required).
//! 3. The queues: eight 8-byte device-writable buffers on the event queue, then one
//!    `EV_LED` event (`LED_NUML` on) on the status queue: the device must return that buffer.
//!    Events that arrive meanwhile are reported; none are required.
//!
//! ## Hostile checks (`mode=hostile`, before the test)
//!
//! - Garbage selectors must read back `size` 0 (5.8.6.1: "the device MUST set the size field
//!   to zero if it doesn't support a given select and subsel combination"): select 0
//!   (`UNSET`), 0x04, 0x13, 0x7F, 0xFF; `EV_BITS` and `ABS_INFO` with subsel 0xFF (no such
//!   event type or axis); on a keyboard, `ABS_INFO` for `ABS_X`. The name must read back the
//!   same afterwards.
//! - Bad buffers, each on a freshly started device, then a reset and a good status write that
//!   must come back: on the event queue a device-readable buffer, a 4-byte buffer and one
//!   outside RAM (the device may only use them when it has an event, so they are posted and
//!   the device must still serve the status queue); on the status queue a device-writable
//!   buffer, a 4-byte buffer and one outside RAM (each may be returned or make the device ask
//!   for a reset; it must work after the reset).
//!
//! ## Waiting for events (`input_wait=MS`)
//!
//! After every device's test, the guest starts all input devices again, posts event buffers,
//! prints `PLEIADES-TESTGUEST-INPUT-WAITING` on its own line and waits up to MS milliseconds
//! until each device has delivered one report (events up to and including `SYN_REPORT`). The
//! events are reported per device as `"events":[[type,code,value],…]`; a device that sent
//! nothing in time is an error.

use core::fmt::{self, Write};

use crate::config::Mode;
use crate::devices::roundtrip;
use crate::dma::{self, DeviceMemory};
use crate::memory::MmioRegion;
use crate::report::{FixedStr, JsonStr};
use crate::serial::log;
use crate::time::Deadline;
use crate::virtio::{DESC_F_WRITE, Descriptor, VirtioError, VirtioPci, Virtqueue};

// Configuration selectors (5.8.2).
const CFG_UNSET: u8 = 0x00;
const CFG_ID_NAME: u8 = 0x01;
const CFG_ID_SERIAL: u8 = 0x02;
const CFG_ID_DEVIDS: u8 = 0x03;
const CFG_EV_BITS: u8 = 0x11;
const CFG_ABS_INFO: u8 = 0x12;
// Configuration layout.
const CFG_SELECT: u64 = 0;
const CFG_SUBSEL: u64 = 1;
const CFG_SIZE: u64 = 2;
const CFG_DATA: u64 = 8;
const CFG_DATA_MAX: u8 = 128;

// evdev event types and codes.
const EV_SYN: u16 = 0x00;
const EV_KEY: u8 = 0x01;
const EV_REL: u8 = 0x02;
const EV_ABS: u8 = 0x03;
const EV_LED: u8 = 0x11;
const SYN_REPORT: u16 = 0;
const KEY_A: u16 = 30;
const BTN_LEFT: u16 = 0x110;
const ABS_X: u8 = 0;
const ABS_Y: u8 = 1;
const LED_NUML: u16 = 0;

const EVENT_LEN: u32 = 8;
/// Event buffers posted on the event queue.
const EVENT_BUFFERS: u16 = 8;
/// Events kept for the result.
pub const EVENTS_SHOWN: usize = 16;
/// Bytes of the name and serial kept.
const ID_SHOWN: usize = 40;
/// In the device slot's buffer page: the event buffers, the status event, the hostile
/// buffers.
const EVENTS_AT: u64 = 0;
const STATUS_AT: u64 = 0x200;
const HOSTILE_AT: u64 = 0x400;
/// An address far outside any guest's RAM.
const OUTSIDE_RAM: u64 = 0xFFFF_FFFF_F000;
/// How long an abused queue gets to answer.
const ABUSE_WAIT_MS: u64 = 300;
/// How long the test looks for events that arrive by themselves.
const EVENT_GLANCE_MS: u64 = 50;

/// What a device is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum InputKind {
    Keyboard,
    Tablet,
    #[default]
    Other,
}

impl InputKind {
    pub fn name(self) -> &'static str {
        match self {
            Self::Keyboard => "keyboard",
            Self::Tablet => "tablet",
            Self::Other => "input",
        }
    }
}

/// An evdev event as the device sent it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Event {
    pub kind: u16,
    pub code: u16,
    pub value: u32,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct InputHostile {
    /// Garbage selectors read, and those that read back size 0.
    pub selectors: u32,
    pub selectors_zero: u32,
    /// Bad buffers posted; after each the device worked again.
    pub buffers: u32,
    pub recovered: u32,
    /// Bad buffers the device returned (used).
    pub returned: u32,
}

/// What the result line says about an input device.
#[derive(Debug, Clone, Copy, Default)]
pub struct InputResult {
    pub kind: InputKind,
    pub name: FixedStr<ID_SHOWN>,
    pub serial: FixedStr<ID_SHOWN>,
    /// bustype, vendor, product, version.
    pub devids: Option<[u16; 4]>,
    /// Bit n: `EV_BITS` for type n (of those read) has a non-zero size.
    pub ev: u32,
    /// `ABS_INFO` max of `ABS_X` and `ABS_Y` (tablets).
    pub abs_max: [u32; 2],
    /// The status buffer came back.
    pub status: bool,
    pub events: [Event; EVENTS_SHOWN],
    pub event_count: usize,
    /// A full report (ending with `SYN_REPORT`) arrived.
    pub report: bool,
    pub hostile: Option<InputHostile>,
}

impl InputResult {
    fn push_event(&mut self, event: Event) {
        if self.event_count < EVENTS_SHOWN {
            self.events[self.event_count] = event;
            self.event_count += 1;
        }
        if event.kind == EV_SYN && event.code == SYN_REPORT {
            self.report = true;
        }
    }

    /// The device-specific part of the `devices` entry (after `kind`).
    pub fn write_json(&self, out: &mut impl Write) -> fmt::Result {
        write!(
            out,
            ",\"name\":{},\"serial\":{}",
            JsonStr(self.name.as_str()),
            JsonStr(self.serial.as_str())
        )?;
        if let Some([bus, vendor, product, version]) = self.devids {
            write!(out, ",\"devids\":[{bus},{vendor},{product},{version}]")?;
        }
        out.write_str(",\"ev\":[")?;
        let types = (0..32u32).filter(|t| self.ev & (1 << t) != 0);
        for (i, t) in types.enumerate() {
            write!(out, "{}{t}", if i > 0 { "," } else { "" })?;
        }
        write!(out, "],\"status\":{}", self.status)?;
        if self.kind == InputKind::Tablet {
            write!(out, ",\"abs_max\":[{},{}]", self.abs_max[0], self.abs_max[1])?;
        }
        out.write_str(",\"events\":[")?;
        for (i, e) in self.events[..self.event_count].iter().enumerate() {
            write!(out, "{}[{},{},{}]", if i > 0 { "," } else { "" }, e.kind, e.code, e.value as i32)?;
        }
        write!(out, "],\"report\":{}", self.report)?;
        if let Some(h) = &self.hostile {
            write!(
                out,
                ",\"hostile\":{{\"selectors\":{},\"selectors_zero\":{},\"buffers\":{},\"returned\":{},\"recovered\":{}}}",
                h.selectors, h.selectors_zero, h.buffers, h.returned, h.recovered
            )?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy)]
pub enum InputError {
    Virtio(VirtioError),
    NoConfig,
    NoName,
    /// What a keyboard or tablet lacks.
    Missing(&'static str),
    /// A garbage selector read back a non-zero size.
    Selector {
        select: u8,
        subsel: u8,
        size: u8,
    },
    /// The name read differently after the garbage selectors.
    NameChanged,
    /// A bad buffer left the device unable to take a status event after a reset.
    NotRecovered(&'static str),
    NoReport,
}

impl From<VirtioError> for InputError {
    fn from(e: VirtioError) -> Self {
        Self::Virtio(e)
    }
}

impl fmt::Display for InputError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Virtio(e) => e.fmt(f),
            Self::NoConfig => f.write_str("no device configuration"),
            Self::NoName => f.write_str("ID_NAME is empty"),
            Self::Missing(what) => write!(f, "{what}"),
            Self::Selector { select, subsel, size } => {
                write!(f, "select {select:#x} subsel {subsel:#x} reads back size {size}, want 0")
            }
            Self::NameChanged => f.write_str("ID_NAME reads differently after garbage selectors"),
            Self::NotRecovered(what) => write!(f, "no status buffer returned after a reset following {what}"),
            Self::NoReport => f.write_str("no event report (ending with SYN_REPORT) within input_wait"),
        }
    }
}

/// The device configuration.
#[derive(Debug, Clone, Copy)]
struct Config(MmioRegion);

impl Config {
    /// Selects `select`/`subsel` and returns the size.
    fn select(&self, select: u8, subsel: u8) -> u8 {
        self.0.write8(CFG_SELECT, select);
        self.0.write8(CFG_SUBSEL, subsel);
        self.0.read8(CFG_SIZE).min(CFG_DATA_MAX)
    }

    fn byte(&self, i: u8) -> u8 {
        self.0.read8(CFG_DATA + u64::from(i))
    }

    fn u16(&self, i: u8) -> u16 {
        u16::from(self.byte(i)) | u16::from(self.byte(i + 1)) << 8
    }

    fn u32(&self, i: u8) -> u32 {
        u32::from(self.u16(i)) | u32::from(self.u16(i + 2)) << 16
    }

    /// A string selector, non-printable bytes as `?`.
    fn string<const N: usize>(&self, select: u8) -> FixedStr<N> {
        let mut s = FixedStr::new();
        let size = self.select(select, 0);
        for i in 0..size {
            let b = self.byte(i);
            if b == 0 {
                break;
            }
            let _ = s.write_char(if b.is_ascii_graphic() || b == b' ' { char::from(b) } else { '?' });
        }
        s
    }

    /// Whether bit `code` is set in the `EV_BITS` bitmap of event type `ev`.
    fn has_code(&self, ev: u8, code: u16) -> bool {
        let size = self.select(CFG_EV_BITS, ev);
        let byte = code / 8;
        byte < u16::from(size) && self.byte(byte as u8) & (1 << (code % 8)) != 0
    }

    /// `ABS_INFO` (min, max) of `axis`, if the device has it.
    fn abs_info(&self, axis: u8) -> Option<(u32, u32)> {
        (self.select(CFG_ABS_INFO, axis) >= 8).then(|| (self.u32(0), self.u32(4)))
    }
}

/// Reads and checks the configuration: fills in the identity, event types and kind.
fn read_config(config: Config, result: &mut InputResult) -> Result<(), InputError> {
    result.name = config.string(CFG_ID_NAME);
    if result.name.as_str().is_empty() {
        return Err(InputError::NoName);
    }
    result.serial = config.string(CFG_ID_SERIAL);
    if config.select(CFG_ID_DEVIDS, 0) >= 8 {
        result.devids = Some([config.u16(0), config.u16(2), config.u16(4), config.u16(6)]);
    }
    for ev in [EV_KEY, EV_REL, EV_ABS, EV_LED] {
        if config.select(CFG_EV_BITS, ev) > 0 {
            result.ev |= 1 << ev;
        }
    }
    if config.has_code(EV_ABS, u16::from(ABS_X)) && config.has_code(EV_ABS, u16::from(ABS_Y)) {
        result.kind = InputKind::Tablet;
        for (i, axis) in [ABS_X, ABS_Y].into_iter().enumerate() {
            let (min, max) = config.abs_info(axis).ok_or(InputError::Missing("tablet without ABS_INFO"))?;
            result.abs_max[i] = max;
            if max == 0 || (max as i32) <= (min as i32) {
                return Err(InputError::Missing("tablet axis with ABS_INFO max not above min"));
            }
        }
        if !config.has_code(EV_KEY, BTN_LEFT) {
            return Err(InputError::Missing("tablet without EV_KEY BTN_LEFT"));
        }
    } else if config.has_code(EV_KEY, KEY_A) {
        result.kind = InputKind::Keyboard;
    } else if result.ev == 0 {
        return Err(InputError::Missing("no event types (EV_BITS) at all"));
    }
    Ok(())
}

/// Negotiates and reads the configuration (before DRIVER_OK).
fn probe(device: &mut VirtioPci, result: &mut InputResult) -> Result<Config, InputError> {
    device.negotiate(0)?;
    let config = Config(device.device_cfg.ok_or(InputError::NoConfig)?);
    read_config(config, result)?;
    Ok(config)
}

/// Posts the event buffers (descriptors 0..EVENT_BUFFERS).
fn post_events(device: &VirtioPci, queue: &mut Virtqueue, memory: &DeviceMemory) {
    let count = EVENT_BUFFERS.min(queue.size);
    for i in 0..count {
        let addr = memory.buffer.add(EVENTS_AT + u64::from(i) * u64::from(EVENT_LEN));
        dma::fill(addr, u64::from(EVENT_LEN), 0);
        queue.write_descriptor(i, Descriptor { addr: addr.0, len: EVENT_LEN, flags: DESC_F_WRITE, next: 0 });
        queue.publish(i);
    }
    device.notify(queue);
}

/// Takes the events the device returned; each buffer goes back on the queue.
fn drain_events(device: &VirtioPci, queue: &mut Virtqueue, memory: &DeviceMemory, result: &mut InputResult) {
    for _ in 0..queue.size {
        let Some(used) = queue.poll_used() else { break };
        let id = used.id as u16;
        if used.id >= u32::from(EVENT_BUFFERS.min(queue.size)) {
            continue;
        }
        let addr = memory.buffer.add(EVENTS_AT + u64::from(id) * u64::from(EVENT_LEN));
        if used.len >= EVENT_LEN {
            result.push_event(Event {
                kind: dma::read_u16(addr),
                code: dma::read_u16(addr.add(2)),
                value: dma::read_u32(addr.add(4)),
            });
        }
        dma::fill(addr, u64::from(EVENT_LEN), 0);
        queue.publish(id);
        device.notify(queue);
    }
}

/// Sends one `EV_LED` event on the status queue; returns whether the buffer came back.
fn status_write(device: &VirtioPci, queue: &mut Virtqueue, memory: &DeviceMemory) -> Result<(), VirtioError> {
    let at = memory.buffer.add(STATUS_AT);
    dma::write_u16(at, u16::from(EV_LED));
    dma::write_u16(at.add(2), LED_NUML);
    dma::write_u32(at.add(4), 1);
    roundtrip(device, queue, at, EVENT_LEN, 0).map(drop)
}

/// Tests the input device at `device` (hostile checks first in hostile mode); leaves it reset.
/// The result is filled in as far as the test got.
pub fn test(
    device: &mut VirtioPci,
    memory: &DeviceMemory,
    mode: Mode,
) -> (InputResult, Result<(), InputError>) {
    let mut result = InputResult::default();
    let outcome = run(device, memory, mode, &mut result);
    let _ = device.reset();
    (result, outcome)
}

fn run(
    device: &mut VirtioPci,
    memory: &DeviceMemory,
    mode: Mode,
    result: &mut InputResult,
) -> Result<(), InputError> {
    let config = probe(device, result)?;
    if mode == Mode::Hostile {
        let mut hostile = InputHostile::default();
        let outcome = hostile_selectors(config, result, &mut hostile)
            .and_then(|()| hostile_buffers(device, memory, &mut hostile));
        result.hostile = Some(hostile);
        outcome?;
        probe(device, &mut InputResult::default())?;
    }
    let [Some(mut events), Some(mut status)] = device.start(memory, 2)? else {
        return Err(VirtioError::QueueUnavailable(1).into());
    };
    post_events(device, &mut events, memory);
    status_write(device, &mut status, memory)?;
    result.status = true;
    let deadline = Deadline::after_ms(EVENT_GLANCE_MS);
    for _ in 0..EVENT_GLANCE_MS * 8 {
        drain_events(device, &mut events, memory, result);
        if deadline.passed() {
            break;
        }
        crate::interrupts::idle();
    }
    log!("virtio-input {}: {:?}, {} events", result.kind.name(), result.name.as_str(), result.event_count);
    Ok(())
}

/// Garbage selectors must read back size 0; the name must read the same afterwards.
fn hostile_selectors(
    config: Config,
    result: &InputResult,
    hostile: &mut InputHostile,
) -> Result<(), InputError> {
    let mut garbage = [
        (CFG_UNSET, 0),
        (0x04, 0),
        (0x13, 0),
        (0x7F, 0),
        (0xFF, 0xFF),
        (CFG_EV_BITS, 0xFF),
        (CFG_ABS_INFO, 0xFF),
        (CFG_ABS_INFO, ABS_X),
    ];
    let count = if result.kind == InputKind::Keyboard { garbage.len() } else { garbage.len() - 1 };
    let mut first_bad = None;
    for (select, subsel) in &mut garbage[..count] {
        hostile.selectors += 1;
        let size = config.select(*select, *subsel);
        if size == 0 {
            hostile.selectors_zero += 1;
        } else {
            first_bad = first_bad.or(Some(InputError::Selector { select: *select, subsel: *subsel, size }));
        }
    }
    if let Some(e) = first_bad {
        return Err(e);
    }
    if config.string::<ID_SHOWN>(CFG_ID_NAME).as_str() != result.name.as_str() {
        return Err(InputError::NameChanged);
    }
    Ok(())
}

/// A bad buffer: its name, the queue (0 events, 1 status), address offset or outside RAM,
/// length, flags.
type BadBuffer = (&'static str, u16, Option<u64>, u32, u16);

const BAD_BUFFERS: [BadBuffer; 6] = [
    ("event-read-only", 0, Some(HOSTILE_AT), EVENT_LEN, 0),
    ("event-short", 0, Some(HOSTILE_AT), 4, DESC_F_WRITE),
    ("event-outside-ram", 0, None, EVENT_LEN, DESC_F_WRITE),
    ("status-write-only", 1, Some(HOSTILE_AT), EVENT_LEN, DESC_F_WRITE),
    ("status-short", 1, Some(HOSTILE_AT), 4, 0),
    ("status-outside-ram", 1, None, EVENT_LEN, 0),
];

/// Each bad buffer on a freshly started device: then the status queue must work (for the
/// event-queue ones, before a reset too), and after a reset it must work.
fn hostile_buffers(
    device: &mut VirtioPci,
    memory: &DeviceMemory,
    hostile: &mut InputHostile,
) -> Result<(), InputError> {
    for (name, queue_index, at, len, flags) in BAD_BUFFERS {
        device.negotiate(0)?;
        let [Some(mut events), Some(mut status)] = device.start(memory, 2)? else {
            return Err(VirtioError::QueueUnavailable(1).into());
        };
        let addr = at.map_or(OUTSIDE_RAM, |offset| memory.buffer.add(offset).0);
        dma::fill(memory.buffer.add(HOSTILE_AT), 16, 0xA5);
        let queue = if queue_index == 0 { &mut events } else { &mut status };
        queue.write_descriptor(0, Descriptor { addr, len, flags, next: 0 });
        queue.publish(0);
        device.notify(queue);
        hostile.buffers += 1;
        if queue_index == 0 {
            // The device keeps the buffer until it has an event; the status queue must work.
            status_write(device, &mut status, memory).map_err(|_| InputError::NotRecovered(name))?;
            if events.poll_used().is_some() {
                hostile.returned += 1;
            }
        } else if device.wait_used(&mut status, ABUSE_WAIT_MS).is_some() {
            hostile.returned += 1;
        }
        let _ = device.reset();
        device.negotiate(0)?;
        let [Some(_), Some(mut status)] = device.start(memory, 2)? else {
            return Err(VirtioError::QueueUnavailable(1).into());
        };
        status_write(device, &mut status, memory).map_err(|_| InputError::NotRecovered(name))?;
        hostile.recovered += 1;
        log!("virtio-input hostile: {name}: the device works after a reset");
        let _ = device.reset();
    }
    Ok(())
}

/// The marker line printed before waiting for injected events.
pub const WAITING_MARKER: &str = "PLEIADES-TESTGUEST-INPUT-WAITING";

/// A started input device waiting for events.
#[derive(Debug)]
pub struct Waiter {
    pub slot: usize,
    events: Virtqueue,
}

/// Starts `device` and posts its event buffers.
pub fn start_waiting(
    device: &mut VirtioPci,
    memory: &DeviceMemory,
    slot: usize,
) -> Result<Waiter, InputError> {
    device.negotiate(0)?;
    let [Some(mut events), _] = device.start(memory, 2)? else {
        return Err(VirtioError::QueueUnavailable(0).into());
    };
    post_events(device, &mut events, memory);
    Ok(Waiter { slot, events })
}

impl Waiter {
    /// Forgets the events of the test, so that only waited-for ones are reported.
    pub fn clear(result: &mut InputResult) {
        result.event_count = 0;
        result.report = false;
    }

    /// Takes what arrived; true once a full report is in.
    pub fn poll(&mut self, device: &VirtioPci, memory: &DeviceMemory, result: &mut InputResult) -> bool {
        drain_events(device, &mut self.events, memory, result);
        result.report
    }
}

/// How long the guest waits for injected events at most.
pub const MAX_INPUT_WAIT_MS: u64 = 600_000;
