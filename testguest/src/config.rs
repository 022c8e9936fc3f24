//! What the command line asks for: `mode=normal|hostile`, `expect=KIND,KIND,…` and
//! `bars=reassign` (assign every virtio BAR anew, as if firmware had assigned nothing) and
//! `fault=panic|exception` (fail on purpose, to test the failure path) and `rng_loop=N` (after
//! the tests, N back-to-back 64-byte entropy requests, timed: the VMM benchmark's exit loop) and
//! `gpu_deviations=CHECK,…` (virtio-gpu hostile checks whose answers a reference device gives
//! differently from the spec: reported, not failures; see `gpu.rs`) and `input_wait=MS` (after
//! the tests, announce `PLEIADES-TESTGUEST-INPUT-WAITING` and wait up to MS for one event
//! report from each input device; see `input.rs`) and `console_input=MS` (the host sends the
//! console input: wait up to MS for it, and fail without it).
//! Other words (kernel-style options) are ignored.

use crate::report::Errors;
use crate::virtio::DeviceType;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Normal,
    Hostile,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Self::Normal => "normal",
            Self::Hostile => "hostile",
        }
    }
}

/// A set of virtio device types (ids below 64).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TypeSet(u64);

impl TypeSet {
    pub fn insert(&mut self, t: DeviceType) {
        if t.0 < 64 {
            self.0 |= 1 << t.0;
        }
    }

    pub fn iter(self) -> impl Iterator<Item = DeviceType> {
        (0..64u16).filter(move |i| self.0 & (1 << i) != 0).map(DeviceType)
    }
}

/// A failure asked for on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// A Rust panic.
    Panic,
    /// A CPU exception (invalid opcode).
    Exception,
}

#[derive(Debug, Clone, Copy)]
pub struct Config {
    pub mode: Mode,
    pub expect: TypeSet,
    pub reassign_bars: bool,
    pub fault: Option<Fault>,
    /// Timed entropy requests to make after the tests (0: none).
    pub rng_loop: u32,
    /// virtio-gpu hostile checks whose answers are tolerated (a bit per `gpu::CASES` index).
    pub gpu_deviations: u64,
    /// Milliseconds to wait for injected input events (0: no wait).
    pub input_wait: u64,
    /// Milliseconds to wait for console input the host promises (`None`: a short look, and
    /// none arriving is not a failure).
    pub console_input: Option<u64>,
}

/// The most requests `rng_loop=` may ask for.
pub const MAX_RNG_LOOP: u32 = 10_000_000;

/// Parses the command line; words it cannot understand become errors (the run then fails).
pub fn parse(cmdline: &str, errors: &mut Errors) -> Config {
    let mut config = Config {
        mode: Mode::Normal,
        expect: TypeSet::default(),
        reassign_bars: false,
        fault: None,
        rng_loop: 0,
        gpu_deviations: 0,
        input_wait: 0,
        console_input: None,
    };
    for word in cmdline.split_ascii_whitespace() {
        if let Some(mode) = word.strip_prefix("mode=") {
            config.mode = match mode {
                "normal" => Mode::Normal,
                "hostile" => Mode::Hostile,
                other => {
                    errors.push(format_args!("unknown mode {other:?} on the command line"));
                    config.mode
                }
            };
        } else if let Some(bars) = word.strip_prefix("bars=") {
            match bars {
                "reassign" => config.reassign_bars = true,
                "keep" => config.reassign_bars = false,
                other => errors.push(format_args!("unknown bars={other:?} on the command line")),
            }
        } else if let Some(fault) = word.strip_prefix("fault=") {
            match fault {
                "panic" => config.fault = Some(Fault::Panic),
                "exception" => config.fault = Some(Fault::Exception),
                other => errors.push(format_args!("unknown fault={other:?} on the command line")),
            }
        } else if let Some(count) = word.strip_prefix("rng_loop=") {
            match count.parse::<u32>() {
                Ok(n) if n <= MAX_RNG_LOOP => config.rng_loop = n,
                _ => errors.push(format_args!("rng_loop={count:?} is not a count up to {MAX_RNG_LOOP}")),
            }
        } else if let Some(ms) = word.strip_prefix("input_wait=") {
            match ms.parse::<u64>() {
                Ok(n) if n <= crate::input::MAX_INPUT_WAIT_MS => config.input_wait = n,
                _ => errors.push(format_args!(
                    "input_wait={ms:?} is not milliseconds up to {}",
                    crate::input::MAX_INPUT_WAIT_MS
                )),
            }
        } else if let Some(ms) = word.strip_prefix("console_input=") {
            match ms.parse::<u64>() {
                Ok(n) if n <= crate::input::MAX_INPUT_WAIT_MS => config.console_input = Some(n),
                _ => errors.push(format_args!(
                    "console_input={ms:?} is not milliseconds up to {}",
                    crate::input::MAX_INPUT_WAIT_MS
                )),
            }
        } else if let Some(list) = word.strip_prefix("gpu_deviations=") {
            for name in list.split(',').filter(|n| !n.is_empty()) {
                match crate::gpu::case_index(name) {
                    Some(i) => config.gpu_deviations |= 1 << i,
                    None => errors.push(format_args!("unknown virtio-gpu check {name:?} in gpu_deviations=")),
                }
            }
        } else if let Some(list) = word.strip_prefix("expect=") {
            for name in list.split(',').filter(|n| !n.is_empty()) {
                match DeviceType::from_name(name) {
                    Some(t) => config.expect.insert(t),
                    None => errors.push(format_args!("unknown device kind {name:?} in expect=")),
                }
            }
        }
    }
    config
}
