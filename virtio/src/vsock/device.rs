//! The vsock device's queues ([`Vsock`]) and the VM process's end of them ([`VsockHandle`]).
//!
//! Queues: rx (0, the device writes packets into the guest's buffers), tx (1, the guest's
//! packets), event (2, only a transport reset would go there: its buffers are kept, never
//! used). Each tx chain is one packet: the header, then `len` payload bytes, read as a whole
//! before the muxer sees it; a chain shorter than its header says, or longer than
//! [`Limits::max_payload`], is dropped (counted) and completed.
//!
//! The handle and the device share the [`Muxer`]. What the handle does that may give the guest
//! a packet kicks the device (an eventfd among the device's host events); what the device does
//! that the handle should hear about (a connection, bytes, a close) makes
//! [`VsockHandle::events`] readable.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard};

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::muxer::{ConnKey, Event, Limits, MuxError, Muxer};
use super::packet::{HEADER_LEN, Header};
use crate::{DeviceError, DeviceType, GuestMemory, VIRTIO_F_VERSION_1, VirtioDevice, read_config_bytes};

const RXQ: usize = 0;
const TXQ: usize = 1;
const QUEUE_SIZES: &[u16] = DeviceType::Vsock.queue_max_sizes();
/// `struct virtio_vsock_config { le64 guest_cid; }`.
const CONFIG_SIZE: usize = 8;

#[derive(Debug)]
struct Shared {
    muxer: Mutex<Muxer>,
    /// Readable while the muxer has events for the handle.
    events: EventFd,
    /// Readable when the handle gave the muxer something for the guest.
    kick: EventFd,
    /// When the device was made: the muxer's clock counts from here.
    start: std::time::Instant,
}

impl Shared {
    fn muxer(&self) -> MutexGuard<'_, Muxer> {
        // A panic while holding the lock cannot leave the muxer half-changed in a way that
        // matters more than stopping would: go on with it.
        self.muxer.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
}

/// A virtio-vsock device for one guest.
#[derive(Debug)]
pub struct Vsock {
    shared: Arc<Shared>,
    acked_features: u64,
    /// Packets the guest sent that were malformed and dropped.
    pub dropped_packets: u64,
}

/// The VM process's end of the guest's vsock: listen, connect, read, write, close.
#[derive(Debug, Clone)]
pub struct VsockHandle {
    shared: Arc<Shared>,
}

impl Vsock {
    /// A device for the guest with context id `guest_cid` (3 or more).
    pub fn new(guest_cid: u64, limits: Limits) -> std::io::Result<(Self, VsockHandle)> {
        if guest_cid < 3 || guest_cid >= u64::from(u32::MAX) {
            return Err(std::io::Error::other(format!(
                "vsock: {guest_cid} is not a guest context id (3 to 2^32-2)"
            )));
        }
        let shared = Arc::new(Shared {
            muxer: Mutex::new(Muxer::new(guest_cid, limits)),
            events: EventFd::new(EFD_NONBLOCK)?,
            kick: EventFd::new(EFD_NONBLOCK)?,
            start: std::time::Instant::now(),
        });
        Ok((Self { shared: shared.clone(), acked_features: 0, dropped_packets: 0 }, VsockHandle { shared }))
    }

    /// Reads one packet from a tx chain: `None` when it is malformed.
    fn read_packet(
        chain: virtio_queue::DescriptorChain<&GuestMemory>,
        mem: &GuestMemory,
        max: u32,
    ) -> Option<(Header, Vec<u8>)> {
        let mut reader = chain.reader(mem).ok()?;
        let mut raw = [0u8; HEADER_LEN];
        reader.read_exact(&mut raw).ok()?;
        let header = Header::parse(&raw);
        if header.len > max || reader.available_bytes() < header.len as usize {
            return None;
        }
        let mut payload = vec![0u8; header.len as usize];
        reader.read_exact(&mut payload).ok()?;
        Some((header, payload))
    }

    fn transmit(&mut self, queue: &mut Queue, mem: &GuestMemory) -> Result<bool, DeviceError> {
        let max = self.shared.muxer().limits().max_payload;
        let mut packets = Vec::new();
        let completed = crate::serve_available(TXQ, queue, mem, |chain| {
            packets.push(Self::read_packet(chain, mem, max));
            Ok(0)
        })?;
        let mut muxer = self.shared.muxer();
        for packet in packets {
            match packet {
                Some((header, payload)) => muxer.from_guest(&header, &payload),
                None => self.dropped_packets += 1,
            }
        }
        Ok(!completed.is_empty())
    }

    /// Moves the muxer's packets into the guest's rx buffers while there are both.
    fn deliver(&mut self, queue: &mut Queue, mem: &GuestMemory) -> Result<bool, DeviceError> {
        let mut used = false;
        if !queue.ready() {
            return Ok(false);
        }
        let mut muxer = self.shared.muxer();
        while muxer.has_packets_for_guest() {
            let Some(chain) = queue.pop_descriptor_chain(mem) else { break };
            let head = chain.head_index();
            let mut written = 0u32;
            if let Ok(mut writer) = chain.writer(mem) {
                let room = writer.available_bytes();
                if room >= HEADER_LEN {
                    match muxer.to_guest(room - HEADER_LEN) {
                        Some((header, payload)) => {
                            if writer
                                .write_all(&header.to_bytes())
                                .and_then(|()| writer.write_all(&payload))
                                .is_ok()
                            {
                                written = (HEADER_LEN + payload.len()) as u32;
                            }
                        }
                        None => {
                            // Nothing fits this buffer now (data waits for credit): keep it.
                            queue.go_to_previous_position();
                            break;
                        }
                    }
                }
            }
            // A buffer too small for a header (or outside memory) goes back empty.
            queue
                .add_used(mem, head, written)
                .map_err(|e| DeviceError::UsedRing { queue: RXQ, reason: e.to_string() })?;
            used = true;
        }
        Ok(used)
    }

    /// The handle hears about what the muxer has for it.
    fn notify_handle(&self) {
        let has_events = self.shared.muxer().pending_events() > 0;
        if has_events {
            let _ = self.shared.events.write(1);
        }
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> DeviceType {
        DeviceType::Vsock
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
        read_config_bytes(&self.shared.muxer().guest_cid().to_le_bytes(), offset, data);
    }

    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &GuestMemory,
    ) -> Result<bool, DeviceError> {
        let used = match index {
            RXQ => self.deliver(queue, mem)?,
            TXQ => {
                let used = self.transmit(queue, mem)?;
                // The replies (RESPONSE, RST, data) go to the rx queue, which this call does
                // not hold: the kick brings the device back with every queue.
                if self.shared.muxer().has_packets_for_guest() {
                    let _ = self.shared.kick.write(1);
                }
                used
            }
            _ => false,
        };
        self.notify_handle();
        Ok(used)
    }

    fn host_events(&self) -> Vec<RawFd> {
        vec![self.shared.kick.as_raw_fd()]
    }

    fn handle_host_event(
        &mut self,
        _event: usize,
        queues: &mut [Queue],
        mem: &GuestMemory,
    ) -> Result<Vec<usize>, DeviceError> {
        let _ = self.shared.kick.read();
        let now = self.shared.now_ms();
        self.shared.muxer().tick(now);
        let mut used = Vec::new();
        if let Some(rx) = queues.get_mut(RXQ)
            && self.deliver(rx, mem)?
        {
            used.push(RXQ);
        }
        self.notify_handle();
        Ok(used)
    }

    fn reset(&mut self) {
        self.acked_features = 0;
        self.shared.muxer().reset();
        self.notify_handle();
    }
}

impl VsockHandle {
    fn kick(&self) {
        let _ = self.shared.kick.write(1);
    }

    /// An eventfd (a copy the caller owns, to wait on) that is readable while events wait in
    /// [`Self::poll_event`]: poll until `None` once it is.
    pub fn events(&self) -> std::io::Result<EventFd> {
        self.shared.events.try_clone()
    }

    /// The next thing that happened on the guest's side.
    pub fn poll_event(&self) -> Option<Event> {
        let _ = self.shared.events.read();
        let mut muxer = self.shared.muxer();
        let event = muxer.poll_event();
        if muxer.pending_events() > 0 {
            let _ = self.shared.events.write(1);
        }
        event
    }

    /// Guests may connect to host port `port`.
    pub fn listen(&self, port: u32) {
        self.shared.muxer().listen(port);
    }

    pub fn connect(&self, guest_port: u32) -> Result<ConnKey, MuxError> {
        let key = self.shared.muxer().connect(guest_port)?;
        self.kick();
        Ok(key)
    }

    pub fn send(&self, key: ConnKey, data: &[u8]) -> Result<usize, MuxError> {
        let n = self.shared.muxer().send(key, data)?;
        self.kick();
        Ok(n)
    }

    pub fn recv(&self, key: ConnKey, buf: &mut [u8]) -> Result<usize, MuxError> {
        let n = self.shared.muxer().recv(key, buf)?;
        // Reading may owe the guest a credit update.
        self.kick();
        Ok(n)
    }

    /// Whether the guest's data on `key` has ended and all of it was read.
    pub fn at_end(&self, key: ConnKey) -> bool {
        self.shared.muxer().at_end(key)
    }

    pub fn shutdown_send(&self, key: ConnKey) -> Result<(), MuxError> {
        self.shared.muxer().shutdown_send(key)?;
        self.kick();
        Ok(())
    }

    pub fn close(&self, key: ConnKey) {
        self.shared.muxer().close(key);
        self.kick();
    }

    /// Lets the device's clock run its timeouts (call it every second or so).
    pub fn tick(&self) {
        self.kick();
    }
}

#[cfg(test)]
mod tests;
