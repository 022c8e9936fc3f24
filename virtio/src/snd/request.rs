//! Parsing a virtio-snd message from a descriptor chain: its readable bytes and where the
//! device may write, every buffer checked against guest memory first.

use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use super::protocol::{PCM_STATUS_SIZE, XFER_HEADER_SIZE};
use crate::GuestMemory;

/// The most PCM bytes one tx or rx message may carry (a period is far smaller: 80 ms of
/// 48 kHz stereo S16 is 15 360 bytes).
pub const MAX_XFER_BYTES: u32 = 256 * 1024;

/// Why a chain is not a valid message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("buffer at {addr:#x} with length {len} is outside guest memory")]
    OutOfBounds { addr: u64, len: u32 },
    #[error("a readable descriptor follows a writable one")]
    ReadAfterWrite,
    #[error("the message is larger than {MAX_XFER_BYTES} bytes")]
    TooLarge,
    #[error("the descriptor chain loops or points outside the descriptor table")]
    BrokenChain,
    #[error("the message has no room for its {0}-byte header or status")]
    NoRoom(usize),
    #[error("cannot read guest memory: {0}")]
    Read(String),
}

/// Guest buffers the device writes, in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Regions {
    pub regions: Vec<(GuestAddress, u32)>,
}

impl Regions {
    /// Total bytes.
    pub fn len(&self) -> u32 {
        self.regions.iter().map(|(_, l)| l).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The regions from byte `from` to the end.
    pub fn split_off(&mut self, from: u32) -> Regions {
        let mut head = Vec::new();
        let mut tail = Vec::new();
        let mut at = 0u32;
        for &(addr, len) in &self.regions {
            if at + len <= from {
                head.push((addr, len));
            } else if at >= from {
                tail.push((addr, len));
            } else {
                let cut = from - at;
                head.push((addr, cut));
                tail.push((addr.unchecked_add(u64::from(cut)), len - cut));
            }
            at += len;
        }
        self.regions = head;
        Regions { regions: tail }
    }

    /// Writes `bytes` from the start (as many as fit). Returns the bytes written.
    pub fn write(&self, mem: &GuestMemory, bytes: &[u8]) -> u32 {
        let mut done = 0usize;
        for &(addr, len) in &self.regions {
            if done >= bytes.len() {
                break;
            }
            let n = (len as usize).min(bytes.len() - done);
            if mem.write_slice(&bytes[done..done + n], addr).is_err() {
                break;
            }
            done += n;
        }
        done as u32
    }
}

/// A message: the bytes the driver wrote and where the device answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub head: u16,
    pub readable: Vec<u8>,
    pub writable: Regions,
}

fn in_memory(mem: &GuestMemory, addr: GuestAddress, len: u32) -> bool {
    len == 0
        || addr
            .checked_add(u64::from(len) - 1)
            .is_some_and(|last| mem.address_in_range(addr) && mem.address_in_range(last))
}

impl Message {
    /// Parses a chain: readable descriptors first (read, at most `max_readable` bytes kept),
    /// then writable ones.
    pub fn parse(
        chain: DescriptorChain<&GuestMemory>,
        mem: &GuestMemory,
        max_readable: u32,
    ) -> Result<Self, RequestError> {
        let head = chain.head_index();
        let mut readable = Vec::new();
        let mut writable = Regions::default();
        let mut total: u64 = 0;
        let mut cut_short = false;
        for desc in chain {
            cut_short = desc.has_next();
            let (addr, len) = (desc.addr(), desc.len());
            total += u64::from(len);
            if total > u64::from(MAX_XFER_BYTES) + 4096 {
                return Err(RequestError::TooLarge);
            }
            if !in_memory(mem, addr, len) {
                return Err(RequestError::OutOfBounds { addr: addr.raw_value(), len });
            }
            if desc.is_write_only() {
                if len > 0 {
                    writable.regions.push((addr, len));
                }
            } else {
                if !writable.is_empty() {
                    return Err(RequestError::ReadAfterWrite);
                }
                let take = (max_readable as usize).saturating_sub(readable.len()).min(len as usize);
                if take < len as usize {
                    return Err(RequestError::TooLarge);
                }
                let start = readable.len();
                readable.resize(start + take, 0);
                mem.read_slice(&mut readable[start..], addr)
                    .map_err(|e| RequestError::Read(e.to_string()))?;
            }
        }
        if cut_short {
            return Err(RequestError::BrokenChain);
        }
        Ok(Self { head, readable, writable })
    }
}

/// A tx (playback) message: stream, the PCM bytes, where the status goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxRequest {
    pub stream_id: u32,
    pub pcm: Vec<u8>,
    pub status: Regions,
}

/// An rx (capture) message: stream, where the PCM goes, where the status goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RxRequest {
    pub stream_id: u32,
    pub pcm: Regions,
    pub status: Regions,
}

impl TxRequest {
    pub fn parse(mut message: Message) -> Result<Self, RequestError> {
        if message.readable.len() < XFER_HEADER_SIZE {
            return Err(RequestError::NoRoom(XFER_HEADER_SIZE));
        }
        if (message.writable.len() as usize) < PCM_STATUS_SIZE {
            return Err(RequestError::NoRoom(PCM_STATUS_SIZE));
        }
        let stream_id = u32::from_le_bytes(message.readable[..4].try_into().unwrap_or_default());
        let pcm = message.readable.split_off(XFER_HEADER_SIZE);
        Ok(Self { stream_id, pcm, status: message.writable })
    }
}

impl RxRequest {
    pub fn parse(mut message: Message) -> Result<Self, RequestError> {
        if message.readable.len() < XFER_HEADER_SIZE {
            return Err(RequestError::NoRoom(XFER_HEADER_SIZE));
        }
        let writable = message.writable.len();
        if (writable as usize) < PCM_STATUS_SIZE {
            return Err(RequestError::NoRoom(PCM_STATUS_SIZE));
        }
        if writable > MAX_XFER_BYTES {
            return Err(RequestError::TooLarge);
        }
        let stream_id = u32::from_le_bytes(message.readable[..4].try_into().unwrap_or_default());
        let status = message.writable.split_off(writable - PCM_STATUS_SIZE as u32);
        Ok(Self { stream_id, pcm: message.writable, status })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_split_inside_a_buffer() {
        let mut r = Regions { regions: vec![(GuestAddress(0x1000), 10), (GuestAddress(0x2000), 6)] };
        let tail = r.split_off(12);
        assert_eq!(r.regions, vec![(GuestAddress(0x1000), 10), (GuestAddress(0x2000), 2)]);
        assert_eq!(tail.regions, vec![(GuestAddress(0x2002), 4)]);
        let mut s = Regions { regions: vec![(GuestAddress(0x1000), 16)] };
        let t = s.split_off(8);
        assert_eq!((s.len(), t.regions[0].0), (8, GuestAddress(0x1008)));
    }
}
