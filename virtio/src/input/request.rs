//! Parsing the buffers of the two input queues.
//!
//! An eventq buffer must be device-writable, inside guest RAM and hold at least one 8-byte event;
//! a statusq buffer must be device-readable and hold one event. Anything else is refused here,
//! before the device touches guest memory.

use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use super::event::{EVENT_SIZE, InputEvent};
use crate::GuestMemory;

/// The most descriptors a chain may use to hold one 8-byte event.
const MAX_DESCRIPTORS: usize = EVENT_SIZE;

/// Why a chain is not a usable input buffer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("descriptor {0} is read-only; event buffers must be device-writable")]
    ReadOnly(usize),
    #[error("descriptor {0} is device-writable; status buffers must be readable")]
    WriteOnly(usize),
    #[error("the buffer holds {0} bytes, less than one 8-byte event")]
    TooShort(u64),
    #[error("buffer at {addr:#x} with length {len} is outside guest memory")]
    OutOfBounds { addr: u64, len: u32 },
    #[error("the descriptor chain loops or points outside the descriptor table")]
    BrokenChain,
    #[error("an event spread over more than {MAX_DESCRIPTORS} descriptors")]
    TooFragmented,
}

/// Where in guest memory the next event goes: up to 8 bytes over one or more ranges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventBuffer {
    ranges: Vec<(GuestAddress, usize)>,
}

/// The ranges of the first `EVENT_SIZE` bytes of a chain, checked for direction and bounds.
fn event_ranges(
    chain: DescriptorChain<&GuestMemory>,
    mem: &GuestMemory,
    writable: bool,
) -> Result<Vec<(GuestAddress, usize)>, RequestError> {
    let mut ranges = Vec::new();
    let mut total: u64 = 0;
    let mut cut_short = false;
    for (i, desc) in chain.enumerate() {
        // The iterator stops after as many descriptors as the queue has; a last descriptor
        // that still says NEXT means the chain looped or left the table.
        cut_short = desc.has_next();
        match (writable, desc.is_write_only()) {
            (true, false) => return Err(RequestError::ReadOnly(i)),
            (false, true) => return Err(RequestError::WriteOnly(i)),
            _ => {}
        }
        if total >= EVENT_SIZE as u64 || desc.len() == 0 {
            total += u64::from(desc.len());
            continue;
        }
        let take = (EVENT_SIZE as u64 - total).min(u64::from(desc.len()));
        let addr = desc.addr();
        let in_ram = addr
            .checked_add(take - 1)
            .is_some_and(|last| mem.address_in_range(addr) && mem.address_in_range(last));
        if !in_ram {
            return Err(RequestError::OutOfBounds { addr: addr.raw_value(), len: desc.len() });
        }
        if ranges.len() == MAX_DESCRIPTORS {
            return Err(RequestError::TooFragmented);
        }
        ranges.push((addr, take as usize));
        total += u64::from(desc.len());
    }
    if cut_short {
        return Err(RequestError::BrokenChain);
    }
    if total < EVENT_SIZE as u64 {
        return Err(RequestError::TooShort(total));
    }
    Ok(ranges)
}

impl EventBuffer {
    /// Parses and validates an eventq chain.
    pub fn parse(chain: DescriptorChain<&GuestMemory>, mem: &GuestMemory) -> Result<Self, RequestError> {
        Ok(Self { ranges: event_ranges(chain, mem, true)? })
    }

    /// Writes `event` into the buffer; returns the bytes written (always 8).
    pub fn write(&self, event: InputEvent, mem: &GuestMemory) -> Result<u32, vm_memory::GuestMemoryError> {
        let bytes = event.to_bytes();
        let mut offset = 0;
        for (addr, len) in &self.ranges {
            mem.write_slice(&bytes[offset..offset + len], *addr)?;
            offset += len;
        }
        Ok(EVENT_SIZE as u32)
    }
}

/// Parses a statusq chain into the event the driver sends (e.g. a keyboard LED change).
pub fn parse_status(
    chain: DescriptorChain<&GuestMemory>,
    mem: &GuestMemory,
) -> Result<InputEvent, RequestError> {
    let ranges = event_ranges(chain, mem, false)?;
    let mut bytes = [0u8; EVENT_SIZE];
    let mut offset = 0;
    for (addr, len) in ranges {
        // Checked against guest memory in `event_ranges`.
        mem.read_slice(&mut bytes[offset..offset + len], addr)
            .map_err(|_| RequestError::OutOfBounds { addr: addr.raw_value(), len: len as u32 })?;
        offset += len;
    }
    Ok(InputEvent::from_bytes(bytes))
}
