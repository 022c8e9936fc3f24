//! The console device state and its [`VirtioDevice`] implementation.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::{DeviceError, DeviceType, GuestMemory, VIRTIO_F_VERSION_1, VirtioDevice, read_config_bytes};

const RECEIVEQ: usize = 0;
const TRANSMITQ: usize = 1;
const QUEUE_SIZES: &[u16] = DeviceType::Console.queue_max_sizes();
/// Host input waiting for guest buffers beyond this is dropped (the guest is not reading).
const MAX_PENDING_INPUT: usize = 64 * 1024;
/// The most one transmit buffer chain may carry.
const MAX_TRANSMIT: u32 = 64 * 1024;
/// `struct virtio_console_config`.
const CONFIG_SIZE: usize = 12;

/// Host-side input of the console: anything readable with a file descriptor to poll.
pub trait ConsoleInput: Read + AsRawFd + Send {}
impl<T: Read + AsRawFd + Send> ConsoleInput for T {}

/// A virtio console: guest output goes to `output`, `input` (if any) goes to the guest.
pub struct Console {
    output: Box<dyn Write + Send>,
    input: Option<Box<dyn ConsoleInput>>,
    pending: VecDeque<u8>,
    acked_features: u64,
}

impl std::fmt::Debug for Console {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Console").field("pending", &self.pending.len()).finish_non_exhaustive()
    }
}

impl Console {
    pub fn new(output: Box<dyn Write + Send>, input: Option<Box<dyn ConsoleInput>>) -> Self {
        Self { output, input, pending: VecDeque::new(), acked_features: 0 }
    }

    /// Moves pending host input into the guest's receive buffers. Returns whether any were used.
    fn deliver(&mut self, queue: &mut Queue, mem: &GuestMemory) -> Result<bool, DeviceError> {
        let mut used = false;
        while !self.pending.is_empty() {
            let Some(chain) = queue.pop_descriptor_chain(mem) else { break };
            let head = chain.head_index();
            let mut written = 0u32;
            for desc in chain {
                if !desc.is_write_only() || self.pending.is_empty() {
                    continue;
                }
                let n = (desc.len() as usize).min(self.pending.len());
                let bytes: Vec<u8> = self.pending.iter().take(n).copied().collect();
                if mem.write_slice(&bytes, desc.addr()).is_err() {
                    // A buffer outside guest memory: complete what was written so far.
                    break;
                }
                self.pending.drain(..n);
                written += n as u32;
            }
            queue
                .add_used(mem, head, written)
                .map_err(|e| DeviceError::UsedRing { queue: RECEIVEQ, reason: e.to_string() })?;
            used = true;
        }
        Ok(used)
    }

    fn transmit(&mut self, queue: &mut Queue, mem: &GuestMemory) -> Result<bool, DeviceError> {
        let mut completed = Vec::new();
        {
            let chains = queue
                .iter(mem)
                .map_err(|e| DeviceError::QueueBroken { queue: TRANSMITQ, reason: e.to_string() })?;
            for chain in chains {
                let head = chain.head_index();
                let mut total = 0u32;
                for desc in chain {
                    if desc.is_write_only() || total.saturating_add(desc.len()) > MAX_TRANSMIT {
                        break;
                    }
                    let mut data = vec![0u8; desc.len() as usize];
                    if read_guest(mem, desc.addr(), &mut data).is_err() {
                        break;
                    }
                    total += desc.len();
                    if let Err(e) = self.output.write_all(&data) {
                        tracing::warn!("virtio-console: output failed: {e}");
                    }
                }
                completed.push(head);
            }
        }
        let _ = self.output.flush();
        for head in &completed {
            queue
                .add_used(mem, *head, 0)
                .map_err(|e| DeviceError::UsedRing { queue: TRANSMITQ, reason: e.to_string() })?;
        }
        Ok(!completed.is_empty())
    }
}

fn read_guest(
    mem: &GuestMemory,
    addr: GuestAddress,
    data: &mut [u8],
) -> Result<(), vm_memory::GuestMemoryError> {
    if data.is_empty() {
        return Ok(());
    }
    if !mem.address_in_range(addr) {
        return Err(vm_memory::GuestMemoryError::InvalidGuestAddress(addr));
    }
    mem.read_slice(data, addr)
}

impl VirtioDevice for Console {
    fn device_type(&self) -> DeviceType {
        DeviceType::Console
    }

    fn queue_max_sizes(&self) -> &[u16] {
        QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features & self.features();
    }

    fn config_size(&self) -> usize {
        CONFIG_SIZE
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_console_config { le16 cols; le16 rows; le32 max_nr_ports; le32 emerg_wr; }
        let mut config = [0u8; CONFIG_SIZE];
        config[4..8].copy_from_slice(&1u32.to_le_bytes());
        read_config_bytes(&config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // emerg_wr: a write of one character outputs it immediately.
        if offset == 8
            && let Some(c) = data.first()
        {
            let _ = self.output.write_all(&[*c]).and_then(|()| self.output.flush());
        }
    }

    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &GuestMemory,
    ) -> Result<bool, DeviceError> {
        match index {
            RECEIVEQ => self.deliver(queue, mem),
            TRANSMITQ => self.transmit(queue, mem),
            _ => Ok(false),
        }
    }

    fn host_events(&self) -> Vec<RawFd> {
        self.input.as_ref().map(|i| vec![i.as_raw_fd()]).unwrap_or_default()
    }

    fn handle_host_event(
        &mut self,
        _event: usize,
        queues: &mut [Queue],
        mem: &GuestMemory,
    ) -> Result<Vec<usize>, DeviceError> {
        let Some(input) = self.input.as_mut() else { return Ok(Vec::new()) };
        let mut buf = [0u8; 4096];
        match input.read(&mut buf) {
            Ok(0) => {
                // End of input: dropping it closes the descriptor, which also takes it out of the
                // worker's epoll set (level-triggered, it would fire forever otherwise).
                self.input = None;
                return Ok(Vec::new());
            }
            Ok(n) => {
                let room = MAX_PENDING_INPUT.saturating_sub(self.pending.len());
                self.pending.extend(&buf[..n.min(room)]);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(DeviceError::Host(format!("console input: {e}"))),
        }
        let Some(receiveq) = queues.get_mut(RECEIVEQ) else { return Ok(Vec::new()) };
        Ok(if self.deliver(receiveq, mem)? { vec![RECEIVEQ] } else { Vec::new() })
    }

    fn reset(&mut self) {
        self.acked_features = 0;
        self.pending.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_utils::*;

    #[test]
    fn guest_output_reaches_the_host() {
        let mem = memory();
        mem.write_slice(b"hello ", GuestAddress(0x2_0000)).unwrap();
        mem.write_slice(b"world\n", GuestAddress(0x3_0000)).unwrap();
        let mut queue =
            queue_with(&mem, 16, &[desc(0x2_0000, 6, VRING_DESC_F_NEXT, 1), desc(0x3_0000, 6, 0, 0)]);
        let sink = SharedWriter::default();
        let mut console = Console::new(Box::new(sink.clone()), None);
        assert!(console.process_queue(TRANSMITQ, &mut queue, &mem).unwrap());
        assert_eq!(sink.bytes(), b"hello world\n");
    }

    #[test]
    fn host_input_reaches_the_guest_when_it_posts_buffers() {
        let mem = memory();
        let (mut host_end, device_end) = std::os::unix::net::UnixStream::pair().unwrap();
        host_end.write_all(b"typed\n").unwrap();
        let mut console = Console::new(Box::new(SharedWriter::default()), Some(Box::new(device_end)));
        let mut queues = vec![queue_with(
            &mem,
            16,
            &[desc(0x4_0000, 4, VRING_DESC_F_WRITE, 0), desc(0x5_0000, 16, VRING_DESC_F_WRITE, 0)],
        )];
        let rings = QueueRings::of(&queues[0]);
        assert_eq!(console.handle_host_event(0, &mut queues, &mem).unwrap(), [RECEIVEQ]);
        let mut first = [0u8; 4];
        let mut second = [0u8; 2];
        mem.read_slice(&mut first, GuestAddress(0x4_0000)).unwrap();
        mem.read_slice(&mut second, GuestAddress(0x5_0000)).unwrap();
        assert_eq!((&first, &second), (b"type", b"d\n"));
        assert_eq!(used_entries(&mem, &rings), [(0, 4), (1, 2)]);
    }

    #[test]
    fn config_says_one_port() {
        let console = Console::new(Box::new(SharedWriter::default()), None);
        let mut max_ports = [0u8; 4];
        console.read_config(4, &mut max_ports);
        assert_eq!(u32::from_le_bytes(max_ports), 1);
    }
}
