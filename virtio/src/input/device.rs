//! The input device state and its [`VirtioDevice`] implementation.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard};

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::config::{CONFIG_SIZE, InputConfig, InputIdentity};
use super::event::InputEvent;
use super::metrics::InputMetrics;
use super::request::{EventBuffer, parse_status};
use crate::{DeviceError, DeviceType, GuestMemory, VIRTIO_F_VERSION_1, VirtioDevice};

const EVENTQ: usize = 0;
const STATUSQ: usize = 1;
const QUEUE_SIZES: &[u16] = DeviceType::Input.queue_max_sizes();
/// Host events waiting for guest buffers beyond this push out the oldest report: a guest that
/// does not read its input must not make the host hold an unbounded backlog.
pub const MAX_PENDING_EVENTS: usize = 16 * 1024;
/// Problems logged individually before the device goes quiet about them.
const LOGGED_PROBLEMS: u64 = 16;

/// What the device and its senders share.
#[derive(Debug)]
struct Shared {
    /// Whole reports, oldest first, each ended by `SYN_REPORT`.
    pending: Mutex<VecDeque<InputEvent>>,
    /// Written when a report is queued: the worker wakes on it.
    wake: EventFd,
    identity: InputIdentity,
    metrics: Arc<InputMetrics>,
}

impl Shared {
    fn pending(&self) -> MutexGuard<'_, VecDeque<InputEvent>> {
        self.pending.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn queue_report(&self, report: &[InputEvent]) {
        if report.len() > MAX_PENDING_EVENTS {
            self.metrics.events_dropped.add(report.len() as u64);
            return;
        }
        let mut pending = self.pending();
        while pending.len() + report.len() > MAX_PENDING_EVENTS {
            // Drop the oldest whole report so the guest never sees half of one.
            let mut dropped = 0;
            while let Some(event) = pending.pop_front() {
                dropped += 1;
                if event.is_syn_report() {
                    break;
                }
            }
            if self.metrics.events_dropped.add(dropped) == 0 {
                tracing::warn!(
                    "virtio-input: the guest is not reading its input; dropping the oldest events"
                );
            }
        }
        pending.extend(report);
        self.metrics.reports_queued.add(1);
        drop(pending);
        if let Err(e) = self.wake.write(1) {
            tracing::warn!("virtio-input: cannot wake the device: {e}");
        }
    }
}

/// Feeds host events to an [`Input`] device from any thread. Events are collected until a
/// `SYN_REPORT` and then queued as one report. A clone starts with no partial report of its own.
#[derive(Debug)]
pub struct InputSender {
    shared: Arc<Shared>,
    partial: Vec<InputEvent>,
}

impl Clone for InputSender {
    fn clone(&self) -> Self {
        Self { shared: self.shared.clone(), partial: Vec::new() }
    }
}

impl InputSender {
    /// Adds one event; a `SYN_REPORT` queues the report it ends. Events the device cannot send
    /// (not in its `EV_BITS`) are refused and counted.
    pub fn send(&mut self, event: InputEvent) {
        if !self.shared.identity.can_send(&event) {
            self.shared.metrics.events_refused.add(1);
            return;
        }
        if self.partial.len() >= MAX_PENDING_EVENTS {
            // A report that never ends: drop it rather than grow without bound.
            self.shared.metrics.events_dropped.add(self.partial.len() as u64);
            self.partial.clear();
        }
        self.partial.push(event);
        if event.is_syn_report() {
            self.shared.queue_report(&self.partial);
            self.partial.clear();
        }
    }

    /// Sends `events` and ends the report with `SYN_REPORT` if they do not.
    pub fn send_report(&mut self, events: &[InputEvent]) {
        for event in events {
            self.send(*event);
        }
        if events.last().is_none_or(|e| !e.is_syn_report()) {
            self.send(InputEvent::syn());
        }
    }
}

/// A virtio input device: a keyboard or a tablet.
#[derive(Debug)]
pub struct Input {
    config: InputConfig,
    shared: Arc<Shared>,
    acked_features: u64,
}

impl Input {
    /// A device that says it is `identity`.
    pub fn new(identity: InputIdentity) -> io::Result<Self> {
        let shared = Arc::new(Shared {
            pending: Mutex::default(),
            wake: EventFd::new(EFD_NONBLOCK)?,
            identity: identity.clone(),
            metrics: Arc::default(),
        });
        Ok(Self { config: InputConfig::new(identity), shared, acked_features: 0 })
    }

    /// A keyboard ([`InputIdentity::keyboard`]).
    pub fn keyboard() -> io::Result<Self> {
        Self::new(InputIdentity::keyboard())
    }

    /// A tablet ([`InputIdentity::tablet`]).
    pub fn tablet() -> io::Result<Self> {
        Self::new(InputIdentity::tablet())
    }

    /// A mouse ([`InputIdentity::mouse`]).
    pub fn mouse() -> io::Result<Self> {
        Self::new(InputIdentity::mouse())
    }

    /// A handle the host feeds events through.
    pub fn sender(&self) -> InputSender {
        InputSender { shared: self.shared.clone(), partial: Vec::new() }
    }

    /// The device's counters.
    pub fn metrics(&self) -> Arc<InputMetrics> {
        self.shared.metrics.clone()
    }

    /// Events waiting for guest buffers.
    pub fn pending_events(&self) -> usize {
        self.shared.pending().len()
    }

    fn bad_buffer(&self, queue: usize, head: u16, e: &dyn std::fmt::Display) {
        if self.shared.metrics.bad_buffers.add(1) < LOGGED_PROBLEMS {
            tracing::warn!(queue, head, "virtio-input: bad buffer: {e}");
        }
    }

    /// Writes pending events into the buffers the driver posted, one event per buffer.
    fn deliver(&mut self, queue: &mut Queue, mem: &GuestMemory) -> Result<bool, DeviceError> {
        if !queue.ready() {
            return Ok(false);
        }
        let mut completed = Vec::new();
        {
            let shared = self.shared.clone();
            let mut pending = shared.pending();
            let mut chains = queue
                .iter(mem)
                .map_err(|e| DeviceError::QueueBroken { queue: EVENTQ, reason: e.to_string() })?;
            // A buffer is taken only when there is an event for it.
            while let Some(event) = pending.front().copied() {
                let Some(chain) = chains.next() else { break };
                let head = chain.head_index();
                let written = match EventBuffer::parse(chain, mem) {
                    Ok(buffer) => buffer.write(event, mem).map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                };
                match written {
                    Ok(len) => {
                        pending.pop_front();
                        shared.metrics.events_delivered.add(1);
                        completed.push((head, len));
                    }
                    // The event stays for the next buffer.
                    Err(e) => {
                        self.bad_buffer(EVENTQ, head, &e);
                        completed.push((head, 0));
                    }
                }
            }
        }
        for (head, len) in &completed {
            queue
                .add_used(mem, *head, *len)
                .map_err(|e| DeviceError::UsedRing { queue: EVENTQ, reason: e.to_string() })?;
        }
        Ok(!completed.is_empty())
    }

    /// Consumes the driver's status events (keyboard LEDs); the device has no LEDs to light.
    fn consume_status(&mut self, queue: &mut Queue, mem: &GuestMemory) -> Result<bool, DeviceError> {
        if !queue.ready() {
            return Ok(false);
        }
        let mut completed = Vec::new();
        {
            let chains = queue
                .iter(mem)
                .map_err(|e| DeviceError::QueueBroken { queue: STATUSQ, reason: e.to_string() })?;
            for chain in chains {
                let head = chain.head_index();
                match parse_status(chain, mem) {
                    Ok(event) => {
                        self.shared.metrics.status_events.add(1);
                        tracing::debug!(?event, "virtio-input: status event");
                    }
                    Err(e) => self.bad_buffer(STATUSQ, head, &e),
                }
                completed.push(head);
            }
        }
        for head in &completed {
            queue
                .add_used(mem, *head, 0)
                .map_err(|e| DeviceError::UsedRing { queue: STATUSQ, reason: e.to_string() })?;
        }
        Ok(!completed.is_empty())
    }
}

impl VirtioDevice for Input {
    fn device_type(&self) -> DeviceType {
        DeviceType::Input
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
        self.config.read(offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        self.config.write(offset, data);
    }

    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &GuestMemory,
    ) -> Result<bool, DeviceError> {
        match index {
            EVENTQ => self.deliver(queue, mem),
            STATUSQ => self.consume_status(queue, mem),
            _ => Ok(false),
        }
    }

    fn host_events(&self) -> Vec<RawFd> {
        vec![self.shared.wake.as_raw_fd()]
    }

    fn handle_host_event(
        &mut self,
        _event: usize,
        queues: &mut [Queue],
        mem: &GuestMemory,
    ) -> Result<Vec<usize>, DeviceError> {
        // Level-triggered: drain the wake-up before looking at what is pending.
        match self.shared.wake.read() {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(DeviceError::Host(format!("input wake-up: {e}"))),
        }
        let Some(eventq) = queues.get_mut(EVENTQ) else { return Ok(Vec::new()) };
        Ok(if self.deliver(eventq, mem)? { vec![EVENTQ] } else { Vec::new() })
    }

    fn reset(&mut self) {
        self.acked_features = 0;
        self.config.reset();
        self.shared.pending().clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::input::event::*;
    use crate::test_utils::*;
    use proptest::prelude::{any, proptest};
    use vm_memory::{Bytes, GuestAddress};

    fn event_at(mem: &GuestMemory, addr: u64) -> InputEvent {
        let mut b = [0u8; 8];
        mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
        InputEvent::from_bytes(b)
    }

    /// `n` 8-byte writable buffers, one chain each, at 0x2_0000, 0x2_1000, …
    fn event_buffers(n: u16) -> Vec<virtio_queue::desc::RawDescriptor> {
        (0..n).map(|i| desc(0x2_0000 + u64::from(i) * 0x1000, 8, VRING_DESC_F_WRITE, 0)).collect()
    }

    #[test]
    fn host_reports_reach_the_guests_buffers_in_order() {
        let mem = memory();
        let mut tablet = Input::tablet().unwrap();
        let mut sender = tablet.sender();
        sender.send_report(&[InputEvent::new(EV_ABS, ABS_X, 100), InputEvent::new(EV_ABS, ABS_Y, 32767)]);
        sender.send_report(&[InputEvent::key(BTN_LEFT, true)]);
        // The statusq is not set up (not ready): only the eventq matters here.
        let mut queues = vec![queue_with(&mem, 16, &event_buffers(4)), Queue::new(16).unwrap()];
        let rings = QueueRings::of(&queues[0]);
        assert_eq!(tablet.handle_host_event(0, &mut queues, &mem).unwrap(), [EVENTQ]);
        assert_eq!(used_entries(&mem, &rings), [(0, 8), (1, 8), (2, 8), (3, 8)]);
        assert_eq!(event_at(&mem, 0x2_0000), InputEvent::new(EV_ABS, ABS_X, 100));
        assert_eq!(event_at(&mem, 0x2_1000), InputEvent::new(EV_ABS, ABS_Y, 32767));
        assert_eq!(event_at(&mem, 0x2_2000), InputEvent::syn());
        assert_eq!(event_at(&mem, 0x2_3000), InputEvent::key(BTN_LEFT, true));
        // The last SYN waits for the next buffer the driver posts.
        assert_eq!(tablet.pending_events(), 1);
        assert_eq!(tablet.metrics().events_delivered.get(), 4);
        assert_eq!(tablet.metrics().reports_queued.get(), 2);
    }

    #[test]
    fn buffers_wait_for_events_and_a_half_report_is_not_sent() {
        let mem = memory();
        let mut keyboard = Input::keyboard().unwrap();
        let mut sender = keyboard.sender();
        let mut queue = queue_with(&mem, 16, &event_buffers(2));
        let rings = QueueRings::of(&queue);
        // The driver posts buffers; nothing to send yet: they stay available.
        assert!(!keyboard.process_queue(EVENTQ, &mut queue, &mem).unwrap());
        sender.send(InputEvent::key(30, true));
        assert!(!keyboard.process_queue(EVENTQ, &mut queue, &mem).unwrap());
        assert_eq!(keyboard.pending_events(), 0, "no SYN_REPORT yet");
        sender.send(InputEvent::syn());
        assert!(keyboard.process_queue(EVENTQ, &mut queue, &mem).unwrap());
        assert_eq!(used_entries(&mem, &rings), [(0, 8), (1, 8)]);
        assert_eq!(event_at(&mem, 0x2_0000), InputEvent::key(30, true));
    }

    #[test]
    fn events_the_device_cannot_send_are_refused() {
        let keyboard = Input::keyboard().unwrap();
        let mut sender = keyboard.sender();
        sender.send_report(&[InputEvent::new(EV_ABS, ABS_X, 5), InputEvent::key(BTN_LEFT, true)]);
        assert_eq!(keyboard.metrics().events_refused.get(), 2);
        assert_eq!(keyboard.pending_events(), 1, "only the SYN_REPORT");
    }

    #[test]
    fn a_guest_that_does_not_read_loses_the_oldest_whole_reports() {
        let keyboard = Input::keyboard().unwrap();
        let mut sender = keyboard.sender();
        let reports = MAX_PENDING_EVENTS; // twice as many events as fit
        for i in 0..reports {
            sender.send_report(&[InputEvent::key(1 + (i % 200) as u16, true)]);
        }
        let metrics = keyboard.metrics();
        assert_eq!(keyboard.pending_events(), MAX_PENDING_EVENTS);
        assert_eq!(metrics.events_dropped.get(), MAX_PENDING_EVENTS as u64);
        // What is left starts at a report boundary, and is the newest half.
        let pending = keyboard.shared.pending();
        assert_eq!(pending[0], InputEvent::key(1 + ((reports / 2) % 200) as u16, true));
        assert!(pending[1].is_syn_report());
    }

    #[test]
    fn hostile_event_buffers_complete_with_zero_and_keep_the_event() {
        let mem = memory();
        let mut keyboard = Input::keyboard().unwrap();
        let mut sender = keyboard.sender();
        sender.send_report(&[InputEvent::key(KEY_ENTER, true)]);
        sender.send_report(&[InputEvent::key(KEY_ENTER, false)]);
        let mut queue = queue_with(
            &mem,
            16,
            &[
                desc(0x2_0000, 8, 0, 0),                                      // read-only
                desc(0x2_0000, 7, VRING_DESC_F_WRITE, 0),                     // too short
                desc(0xffff_ffff_f000, 8, VRING_DESC_F_WRITE, 0),             // outside RAM
                desc(0x0f_fffc, 8, VRING_DESC_F_WRITE, 0),                    // runs off RAM
                desc(0x3_0000, 4, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 5), // split 4 + 4: fine
                desc(0x3_0100, 4, VRING_DESC_F_WRITE, 0),
                desc(0x4_0000, 64, VRING_DESC_F_WRITE, 0), // roomy: fine
                desc(0x2_0000, 8, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 7), // loops
            ],
        );
        let rings = QueueRings::of(&queue);
        assert!(keyboard.process_queue(EVENTQ, &mut queue, &mem).unwrap());
        assert_eq!(used_entries(&mem, &rings), [(0, 0), (1, 0), (2, 0), (3, 0), (4, 8), (6, 8), (7, 0)]);
        assert_eq!(keyboard.metrics().bad_buffers.get(), 5);
        assert_eq!(keyboard.pending_events(), 2, "the release waits for good buffers");
        let mut first = [0u8; 4];
        let mut second = [0u8; 4];
        mem.read_slice(&mut first, GuestAddress(0x3_0000)).unwrap();
        mem.read_slice(&mut second, GuestAddress(0x3_0100)).unwrap();
        let split: Vec<u8> = first.iter().chain(&second).copied().collect();
        assert_eq!(split, InputEvent::key(KEY_ENTER, true).to_bytes());
        assert_eq!(event_at(&mem, 0x4_0000), InputEvent::syn());
    }

    #[test]
    fn status_events_are_consumed_and_bad_ones_counted() {
        let mem = memory();
        let mut keyboard = Input::keyboard().unwrap();
        mem.write_slice(&InputEvent::new(EV_LED, LED_CAPSL, 1).to_bytes(), GuestAddress(0x2_0000)).unwrap();
        let mut queue = queue_with(
            &mem,
            16,
            &[
                desc(0x2_0000, 8, 0, 0),
                desc(0x2_0000, 8, VRING_DESC_F_WRITE, 0),
                desc(0x2_0000, 3, 0, 0),
                desc(0xffff_ffff_0000, 8, 0, 0),
            ],
        );
        let rings = QueueRings::of(&queue);
        assert!(keyboard.process_queue(STATUSQ, &mut queue, &mem).unwrap());
        assert_eq!(used_entries(&mem, &rings), [(0, 0), (1, 0), (2, 0), (3, 0)]);
        assert_eq!(keyboard.metrics().status_events.get(), 1);
        assert_eq!(keyboard.metrics().bad_buffers.get(), 3);
    }

    #[test]
    fn a_corrupt_ring_breaks_the_queue_without_panicking() {
        let mem = memory();
        let mut keyboard = Input::keyboard().unwrap();
        keyboard.sender().send_report(&[InputEvent::key(2, true)]);
        for index in [EVENTQ, STATUSQ] {
            let mut queue = queue_with(&mem, 16, &event_buffers(1));
            QueueRings::of(&queue).corrupt_avail_idx(&mem, 1000);
            let err = keyboard.process_queue(index, &mut queue, &mem).unwrap_err();
            assert!(matches!(err, DeviceError::QueueBroken { .. }), "{err}");
        }
    }

    #[test]
    fn a_host_event_without_queues_is_consumed_and_the_events_kept() {
        let mem = memory();
        let mut keyboard = Input::keyboard().unwrap();
        keyboard.sender().send_report(&[InputEvent::key(2, true)]);
        assert_eq!(keyboard.handle_host_event(0, &mut [], &mem).unwrap(), Vec::<usize>::new());
        // The wake-up was drained (level-triggered polling would spin otherwise).
        assert_eq!(keyboard.shared.wake.read().unwrap_err().kind(), io::ErrorKind::WouldBlock);
        assert_eq!(keyboard.pending_events(), 2);
    }

    #[test]
    fn reset_forgets_pending_events_and_the_selection() {
        let mut keyboard = Input::keyboard().unwrap();
        keyboard.sender().send_report(&[InputEvent::key(2, true)]);
        keyboard.write_config(0, &[super::super::config::CFG_ID_NAME, 0]);
        keyboard.reset();
        assert_eq!(keyboard.pending_events(), 0);
        let mut size = [0xffu8];
        keyboard.read_config(2, &mut size);
        assert_eq!(size, [0]);
    }

    proptest! {
        /// Whatever the descriptors say, neither queue panics, hangs or loses count.
        #[test]
        fn arbitrary_descriptors_are_contained(
            descs in proptest::collection::vec((any::<u64>(), any::<u32>(), 0u32..8, 0u16..20), 1..16),
            events in 0usize..24,
            statusq in any::<bool>(),
        ) {
            let mem = memory();
            let raw: Vec<_> = descs.iter().map(|(a, l, f, n)| desc(*a % 0x20_0000, *l % 0x2_0000, *f, *n)).collect();
            let mut queue = queue_with(&mem, 16, &raw);
            let mut tablet = Input::tablet().unwrap();
            let mut sender = tablet.sender();
            for i in 0..events {
                sender.send_report(&[InputEvent::new(EV_ABS, ABS_X, i as u32)]);
            }
            let before = tablet.pending_events();
            let index = if statusq { STATUSQ } else { EVENTQ };
            let _ = tablet.process_queue(index, &mut queue, &mem);
            let delivered = tablet.metrics().events_delivered.get() as usize;
            proptest::prop_assert_eq!(tablet.pending_events() + delivered, before);
        }
    }
}
