//! Parsing an rng request from a descriptor chain.

use virtio_queue::DescriptorChain;
use vm_memory::{Address, GuestAddress, GuestMemoryBackend};

use crate::GuestMemory;

/// The most bytes one request may ask for; longer chains are refused, not truncated, so that a
/// guest cannot make the device read megabytes of entropy per notification.
pub const MAX_REQUEST_BYTES: u32 = 64 * 1024;

/// A validated request: guest buffers to fill, all inside guest memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RngRequest {
    pub buffers: Vec<(GuestAddress, u32)>,
}

/// Why a chain is not a valid rng request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("descriptor {0} is read-only; rng buffers must be device-writable")]
    ReadOnly(usize),
    #[error("the request asks for more than {MAX_REQUEST_BYTES} bytes")]
    TooLarge,
    #[error("buffer at {addr:#x} with length {len} is outside guest memory")]
    OutOfBounds { addr: u64, len: u32 },
    #[error("the descriptor chain is empty")]
    Empty,
    #[error("the descriptor chain loops or points outside the descriptor table")]
    BrokenChain,
}

impl RngRequest {
    /// Parses and validates a chain.
    pub fn parse(chain: DescriptorChain<&GuestMemory>, mem: &GuestMemory) -> Result<Self, RequestError> {
        let mut buffers = Vec::new();
        let mut total: u32 = 0;
        let mut ranges = Vec::new();
        let mut cut_short = false;
        for (i, desc) in chain.enumerate() {
            // The chain iterator stops after as many descriptors as the queue has; a last
            // descriptor that still says NEXT means the chain looped or left the table.
            cut_short = desc.has_next();
            if !desc.is_write_only() {
                return Err(RequestError::ReadOnly(i));
            }
            total = total
                .checked_add(desc.len())
                .filter(|t| *t <= MAX_REQUEST_BYTES)
                .ok_or(RequestError::TooLarge)?;
            ranges.push((desc.addr(), desc.len()));
        }
        if cut_short {
            return Err(RequestError::BrokenChain);
        }
        for (addr, len) in ranges {
            if len == 0 {
                continue;
            }
            let last = addr.checked_add(u64::from(len) - 1);
            if !last.is_some_and(|last| mem.address_in_range(addr) && mem.address_in_range(last)) {
                return Err(RequestError::OutOfBounds { addr: addr.raw_value(), len });
            }
            buffers.push((addr, len));
        }
        if total == 0 {
            return Err(RequestError::Empty);
        }
        Ok(Self { buffers })
    }

    /// Total bytes asked for.
    pub fn len(&self) -> u32 {
        self.buffers.iter().map(|(_, l)| l).sum()
    }

    /// Whether the request asks for nothing (never true for a parsed request).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
