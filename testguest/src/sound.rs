//! virtio-snd (virtio 1.2, 5.14): the control queue (PCM_INFO, SET_PARAMS with good and bad
//! parameters, PREPARE, START twice, STOP, RELEASE) and the tx queue: three 10 ms periods of
//! playback, each completed with an OK status. How long the device took to complete them is
//! reported (`tx_us`; at 48 kHz about 30 ms: the device's period clock), not judged here.

use core::fmt::{self, Write};

use crate::devices::REQUEST_TIMEOUT_MS;
use crate::dma::{self, DeviceMemory};
use crate::memory::PhysAddr;
use crate::virtio::{DESC_F_NEXT, DESC_F_WRITE, Descriptor, VirtioError, VirtioPci, Virtqueue};

const PCM_INFO: u32 = 0x0100;
const PCM_SET_PARAMS: u32 = 0x0101;
const PCM_PREPARE: u32 = 0x0102;
const PCM_RELEASE: u32 = 0x0103;
const PCM_START: u32 = 0x0104;
const PCM_STOP: u32 = 0x0105;
const S_OK: u32 = 0x8000;
const S_BAD_MSG: u32 = 0x8001;
const S_NOT_SUPP: u32 = 0x8002;
const FORMAT_S16: u32 = 5;
const RATE_48000: u32 = 7;
/// 10 ms of 48 kHz stereo S16.
const PERIOD: u32 = 1920;
const MESSAGES: u16 = 3;

/// What the sound test saw.
#[derive(Debug, Clone, Copy, Default)]
pub struct SoundResult {
    /// Control requests answered as expected.
    pub control_ok: u32,
    /// tx messages completed with an OK status.
    pub periods: u32,
    /// Microseconds from queuing the periods to the last completion.
    pub tx_us: u64,
}

impl SoundResult {
    pub fn write_json(&self, out: &mut impl Write) -> fmt::Result {
        write!(
            out,
            ",\"control_ok\":{},\"periods\":{},\"tx_us\":{}",
            self.control_ok, self.periods, self.tx_us
        )
    }
}

#[derive(Debug, Clone, Copy)]
pub enum SoundError {
    Virtio(VirtioError),
    Status { request: u32, want: u32, got: u32 },
    Period { index: u16, status: u32 },
}

impl From<VirtioError> for SoundError {
    fn from(e: VirtioError) -> Self {
        Self::Virtio(e)
    }
}

impl fmt::Display for SoundError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Virtio(e) => e.fmt(f),
            Self::Status { request, want, got } => {
                write!(f, "request {request:#x} answered {got:#x}, want {want:#x}")
            }
            Self::Period { index, status } => write!(f, "period {index} completed with status {status:#x}"),
        }
    }
}

/// Sends `words` as a control request and returns the response's status.
fn control(
    device: &VirtioPci,
    q: &mut Virtqueue,
    buffer: PhysAddr,
    words: &[u32],
) -> Result<u32, VirtioError> {
    let (request, response) = (buffer, buffer.add(512));
    for (i, w) in words.iter().enumerate() {
        dma::write_u32(request.add(4 * i as u64), *w);
    }
    dma::fill(response, 128, 0);
    let head = q.next_avail() % q.size;
    let next = (head + 1) % q.size;
    q.write_descriptor(
        head,
        Descriptor { addr: request.0, len: 4 * words.len() as u32, flags: DESC_F_NEXT, next },
    );
    q.write_descriptor(next, Descriptor { addr: response.0, len: 128, flags: DESC_F_WRITE, next: 0 });
    q.publish(head);
    device.notify(q);
    device.wait_used(q, REQUEST_TIMEOUT_MS).ok_or(VirtioError::Timeout(q.index))?;
    Ok(dma::read_u32(response))
}

pub fn test(device: &mut VirtioPci, memory: &DeviceMemory) -> (SoundResult, Result<(), SoundError>) {
    let mut result = SoundResult::default();
    let outcome = run(device, memory, &mut result);
    let _ = device.reset();
    (result, outcome)
}

fn run(device: &mut VirtioPci, memory: &DeviceMemory, result: &mut SoundResult) -> Result<(), SoundError> {
    device.negotiate(0)?;
    let [Some(mut ctl), Some(mut tx)] = device.start_indices(memory, [0, 2])? else {
        return Err(VirtioError::QueueUnavailable(2).into());
    };
    let buffer = memory.buffer;
    let params = |rate: u32| [PCM_SET_PARAMS, 0, 4 * PERIOD, PERIOD, 0, 2 | FORMAT_S16 << 8 | rate << 16];
    let requests: [(&[u32], u32); 8] = [
        (&[PCM_INFO, 0, 2, 32], S_OK),
        (&params(6), S_NOT_SUPP),
        (&params(RATE_48000), S_OK),
        (&[PCM_START, 0], S_BAD_MSG),
        (&[PCM_PREPARE, 0], S_OK),
        (&[PCM_START, 0], S_OK),
        (&[PCM_START, 0], S_BAD_MSG),
        (&[PCM_INFO, 5, 1, 32], S_BAD_MSG),
    ];
    for (words, want) in requests {
        let got = control(device, &mut ctl, buffer, words)?;
        if got != want {
            return Err(SoundError::Status { request: words[0], want, got });
        }
        result.control_ok += 1;
    }
    // Three periods: one header (stream 0) and one PCM buffer shared by all, a status each.
    let (header, pcm, status) = (buffer.add(1024), buffer.add(1536), buffer.add(3584));
    dma::write_u32(header, 0);
    dma::fill(pcm, u64::from(PERIOD), 0x11);
    for m in 0..MESSAGES {
        let d = m * 3;
        dma::fill(status.add(u64::from(m) * 8), 8, 0xff);
        tx.write_descriptor(d, Descriptor { addr: header.0, len: 4, flags: DESC_F_NEXT, next: d + 1 });
        tx.write_descriptor(d + 1, Descriptor { addr: pcm.0, len: PERIOD, flags: DESC_F_NEXT, next: d + 2 });
        tx.write_descriptor(
            d + 2,
            Descriptor { addr: status.add(u64::from(m) * 8).0, len: 8, flags: DESC_F_WRITE, next: 0 },
        );
    }
    let start = crate::arch::rdtsc();
    for m in 0..MESSAGES {
        tx.publish(m * 3);
    }
    device.notify(&tx);
    for _ in 0..MESSAGES {
        device.wait_used(&mut tx, REQUEST_TIMEOUT_MS).ok_or(VirtioError::Timeout(tx.index))?;
    }
    result.tx_us =
        crate::arch::rdtsc().wrapping_sub(start).saturating_mul(1000) / crate::time::tsc_per_ms().max(1);
    for m in 0..MESSAGES {
        let got = dma::read_u32(status.add(u64::from(m) * 8));
        if got != S_OK {
            return Err(SoundError::Period { index: m, status: got });
        }
        result.periods += 1;
    }
    for (words, want) in [(&[PCM_STOP, 0][..], S_OK), (&[PCM_RELEASE, 0][..], S_OK)] {
        let got = control(device, &mut ctl, buffer, words)?;
        if got != want {
            return Err(SoundError::Status { request: words[0], want, got });
        }
        result.control_ok += 1;
    }
    Ok(())
}
