//! The device tests: virtio-rng (two 64-byte requests) and virtio-console (a line out on the
//! transmit queue, a receive buffer posted).

use core::fmt::{self, Write};

use crate::dma::{self, DeviceMemory};
use crate::memory::PhysAddr;
use crate::report::FixedStr;
use crate::virtio::{DESC_F_WRITE, Descriptor, VirtioError, VirtioPci, Virtqueue};

pub const RNG_REQUEST: u32 = 64;
/// Time a device gets to answer a request.
pub const REQUEST_TIMEOUT_MS: u64 = 3000;
/// Time the console gets to deliver input.
const CONSOLE_RX_WAIT_MS: u64 = 500;
/// Received bytes quoted in the result.
pub const CONSOLE_RX_SHOWN: usize = 64;
pub const CONSOLE_LINE: &[u8] = b"PLEIADES-CONSOLE-OUT hello from the test guest\n";

#[derive(Debug, Clone, Copy, Default)]
pub struct RngResult {
    pub bytes: [u32; 2],
    pub nonzero: bool,
    pub distinct: bool,
}

impl RngResult {
    pub fn ok(&self) -> bool {
        self.bytes == [RNG_REQUEST; 2] && self.nonzero && self.distinct
    }
}

#[derive(Debug, Clone, Copy, Default)]
pub struct ConsoleResult {
    pub tx: u32,
    pub rx: u32,
    /// The first received bytes, non-ASCII ones as `?`.
    pub rx_data: FixedStr<CONSOLE_RX_SHOWN>,
}

/// What went wrong in a device test.
#[derive(Debug, Clone, Copy)]
pub enum TestError {
    Virtio(VirtioError),
    Rng(RngResult),
    Gpu(crate::gpu::GpuError),
    Input(crate::input::InputError),
    Sound(crate::sound::SoundError),
    /// The host promised console input (`console_input=`) and none came.
    ConsoleInput,
}

impl From<VirtioError> for TestError {
    fn from(e: VirtioError) -> Self {
        Self::Virtio(e)
    }
}

impl fmt::Display for TestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Virtio(e) => e.fmt(f),
            Self::Gpu(e) => e.fmt(f),
            Self::Sound(e) => e.fmt(f),
            Self::Input(e) => e.fmt(f),
            Self::ConsoleInput => f.write_str("console: the promised input never arrived"),
            Self::Rng(r) => write!(
                f,
                "rng returned {:?} bytes (want {RNG_REQUEST} each), nonzero {}, distinct {}",
                r.bytes, r.nonzero, r.distinct
            ),
        }
    }
}

/// Sends one buffer and waits for it to come back; returns the used length.
pub fn roundtrip(
    device: &VirtioPci,
    queue: &mut Virtqueue,
    buffer: PhysAddr,
    len: u32,
    flags: u16,
) -> Result<u32, VirtioError> {
    let head = queue.next_avail() % queue.size;
    queue.write_descriptor(head, Descriptor { addr: buffer.0, len, flags, next: 0 });
    queue.publish(head);
    device.notify(queue);
    let used = device.wait_used(queue, REQUEST_TIMEOUT_MS).ok_or(VirtioError::Timeout(queue.index))?;
    if used.id != u32::from(head) {
        return Err(VirtioError::BadUsed { queue: queue.index, id: used.id });
    }
    Ok(used.len)
}

/// Two 64-byte entropy requests into separate buffers; leaves the device reset.
pub fn test_rng(device: &mut VirtioPci, memory: &DeviceMemory) -> Result<RngResult, TestError> {
    let [Some(mut queue), _] = device.init(memory, 1)? else {
        return Err(VirtioError::QueueUnavailable(0).into());
    };
    let buffers = [memory.buffer, memory.buffer.add(256)];
    let mut result = RngResult::default();
    dma::fill(memory.buffer, 512, 0);
    for (i, buffer) in buffers.iter().enumerate() {
        result.bytes[i] = roundtrip(device, &mut queue, *buffer, RNG_REQUEST, DESC_F_WRITE)?;
    }
    let byte = |b: usize, i: u64| dma::read_u8(buffers[b].add(i));
    result.nonzero = (0..2).all(|b| (0..u64::from(RNG_REQUEST)).any(|i| byte(b, i) != 0));
    result.distinct = (0..u64::from(RNG_REQUEST)).any(|i| byte(0, i) != byte(1, i));
    let _ = device.reset();
    if result.ok() { Ok(result) } else { Err(TestError::Rng(result)) }
}

/// `count` back-to-back 64-byte entropy requests, each waited for; returns the microseconds
/// they took (TSC). Each request is one notification (a VM exit) and one completion.
pub fn rng_loop(device: &mut VirtioPci, memory: &DeviceMemory, count: u32) -> Result<u64, TestError> {
    let [Some(mut queue), _] = device.init(memory, 1)? else {
        return Err(VirtioError::QueueUnavailable(0).into());
    };
    let start = crate::arch::rdtsc();
    for _ in 0..count {
        let len = roundtrip(device, &mut queue, memory.buffer, RNG_REQUEST, DESC_F_WRITE)?;
        if len != RNG_REQUEST {
            let _ = device.reset();
            return Err(TestError::Rng(RngResult { bytes: [len, 0], ..RngResult::default() }));
        }
    }
    let ticks = crate::arch::rdtsc().wrapping_sub(start);
    let _ = device.reset();
    Ok(ticks.saturating_mul(1000) / crate::time::tsc_per_ms().max(1))
}

/// Posts a receive buffer on queue 0, sends [`CONSOLE_LINE`] on queue 1, and counts what
/// arrives for a moment, or for up to `promised_ms` when the host promised input (then none
/// is a failure); leaves the device reset.
pub fn test_console(
    device: &mut VirtioPci,
    memory: &DeviceMemory,
    promised_ms: Option<u64>,
) -> Result<ConsoleResult, TestError> {
    let [Some(mut rx), Some(mut tx)] = device.init(memory, 2)? else {
        return Err(VirtioError::QueueUnavailable(1).into());
    };
    let rx_buffer = memory.buffer;
    let tx_buffer = memory.buffer.add(2048);
    rx.write_descriptor(0, Descriptor { addr: rx_buffer.0, len: 1024, flags: DESC_F_WRITE, next: 0 });
    rx.publish(0);
    device.notify(&rx);
    for (i, b) in CONSOLE_LINE.iter().enumerate() {
        dma::write_u8(tx_buffer.add(i as u64), *b);
    }
    roundtrip(device, &mut tx, tx_buffer, CONSOLE_LINE.len() as u32, 0)?;
    let received =
        device.wait_used(&mut rx, promised_ms.unwrap_or(CONSOLE_RX_WAIT_MS)).map_or(0, |u| u.len.min(1024));
    let _ = device.reset();
    if received == 0 && promised_ms.is_some() {
        return Err(TestError::ConsoleInput);
    }
    let mut rx_data = FixedStr::new();
    for i in 0..u64::from(received).min(CONSOLE_RX_SHOWN as u64) {
        let byte = dma::read_u8(rx_buffer.add(i));
        let _ = rx_data.write_char(if byte.is_ascii() { char::from(byte) } else { '?' });
    }
    Ok(ConsoleResult { tx: CONSOLE_LINE.len() as u32, rx: received, rx_data })
}
