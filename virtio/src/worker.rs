//! The in-process device worker: one thread per activated device that owns its queues.
//!
//! The VMM's transport activates a device by handing it, with its queues, the queues' kick
//! eventfds (ioeventfds registered with KVM) and an [`Interrupt`], to [`spawn`]. The vCPU thread
//! never processes a queue. The worker waits on one epoll set with a typed token per source,
//! and gives the device back when it is stopped (on a driver reset), so the transport can reset
//! it and activate it again. While it runs, the transport reaches the device's configuration
//! space through the worker ([`WorkerHandle::read_config`], [`WorkerHandle::write_config`]): a
//! request, a wake-up and a bounded wait for the answer, so the device's state has one owner.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender, SyncSender, channel, sync_channel};
use std::thread::JoinHandle;
use std::time::Duration;

use virtio_queue::Queue;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::{DeviceError, GuestMemory, VirtioDevice};

/// How a device signals the driver. The transport implements it (MSI-X through irqfd for
/// virtio-pci in Pleiades' VMM).
pub trait Interrupt: Send + Sync {
    /// Used buffers were added to `queue`.
    fn signal_queue(&self, queue: usize) -> io::Result<()>;
    /// The configuration space changed.
    fn signal_config(&self) -> io::Result<()>;
    /// The device found a queue corrupt: set `DEVICE_NEEDS_RESET` and tell the driver.
    fn needs_reset(&self) -> io::Result<()>;
}

/// An activated queue: its state and the eventfd the driver's notifications arrive on.
#[derive(Debug)]
pub struct ActiveQueue {
    pub queue: Queue,
    pub kick: EventFd,
}

/// How long the transport waits for the worker to answer a config access (it is busy at most
/// for one batch of requests).
const CONFIG_TIMEOUT: Duration = Duration::from_secs(2);

/// A configuration-space access the worker performs on the device it owns.
#[derive(Debug)]
enum ConfigOp {
    Read { offset: u64, len: usize },
    Write { offset: u64, data: Vec<u8> },
}

/// A running worker. Dropping the handle does not stop it; call [`WorkerHandle::stop`].
#[derive(Debug)]
pub struct WorkerHandle {
    kill: EventFd,
    config_wake: EventFd,
    config: Sender<(ConfigOp, SyncSender<Vec<u8>>)>,
    thread: Option<JoinHandle<Box<dyn VirtioDevice>>>,
}

impl WorkerHandle {
    fn config_op(&self, op: ConfigOp) -> Option<Vec<u8>> {
        let (reply, answer) = sync_channel(1);
        self.config.send((op, reply)).ok()?;
        self.config_wake.write(1).ok()?;
        let answer = answer.recv_timeout(CONFIG_TIMEOUT);
        if answer.is_err() {
            tracing::warn!("virtio worker: no answer to a config access within {CONFIG_TIMEOUT:?}");
        }
        answer.ok()
    }

    /// Reads the running device's configuration space (zeros if the worker does not answer).
    pub fn read_config(&self, offset: u64, data: &mut [u8]) {
        match self.config_op(ConfigOp::Read { offset, len: data.len() }) {
            Some(bytes) if bytes.len() == data.len() => data.copy_from_slice(&bytes),
            _ => data.fill(0),
        }
    }

    /// Writes the running device's configuration space.
    pub fn write_config(&self, offset: u64, data: &[u8]) {
        self.config_op(ConfigOp::Write { offset, data: data.to_vec() });
    }

    /// Stops the worker and returns the device (for reset and re-activation).
    pub fn stop(mut self) -> Option<Box<dyn VirtioDevice>> {
        let _ = self.kill.write(1);
        self.thread.take().and_then(|t| t.join().ok())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Token {
    Kill,
    Queue(usize),
    Host(usize),
    Config,
}

impl Token {
    fn encode(self) -> u64 {
        match self {
            Self::Kill => 0,
            Self::Queue(i) => 1 << 32 | i as u64,
            Self::Host(i) => 2 << 32 | i as u64,
            Self::Config => 3 << 32,
        }
    }

    fn decode(data: u64) -> Option<Self> {
        let index = (data & 0xffff_ffff) as usize;
        match data >> 32 {
            0 => Some(Self::Kill),
            1 => Some(Self::Queue(index)),
            2 => Some(Self::Host(index)),
            3 => Some(Self::Config),
            _ => None,
        }
    }
}

/// Starts a worker thread for an activated device.
pub fn spawn(
    name: &str,
    device: Box<dyn VirtioDevice>,
    mem: GuestMemory,
    queues: Vec<ActiveQueue>,
    interrupt: Arc<dyn Interrupt>,
) -> io::Result<WorkerHandle> {
    let kill = EventFd::new(EFD_NONBLOCK)?;
    let config_wake = EventFd::new(EFD_NONBLOCK)?;
    let epoll = Epoll::new()?;
    epoll.ctl(
        ControlOperation::Add,
        kill.as_raw_fd(),
        EpollEvent::new(EventSet::IN, Token::Kill.encode()),
    )?;
    epoll.ctl(
        ControlOperation::Add,
        config_wake.as_raw_fd(),
        EpollEvent::new(EventSet::IN, Token::Config.encode()),
    )?;
    let (config, config_requests) = channel();
    for (i, q) in queues.iter().enumerate() {
        epoll.ctl(
            ControlOperation::Add,
            q.kick.as_raw_fd(),
            EpollEvent::new(EventSet::IN, Token::Queue(i).encode()),
        )?;
    }
    for (i, fd) in device.host_events().into_iter().enumerate() {
        epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, Token::Host(i).encode()))?;
    }
    let (queues, kicks) = queues.into_iter().map(|q| (q.queue, q.kick)).unzip();
    let worker = Worker {
        device,
        mem,
        queues,
        kicks,
        interrupt,
        epoll,
        kill: kill.try_clone()?,
        config_wake: config_wake.try_clone()?,
        config_requests,
        broken: false,
    };
    let thread = std::thread::Builder::new().name(format!("virtio-{name}")).spawn(move || worker.run())?;
    Ok(WorkerHandle { kill, config_wake, config, thread: Some(thread) })
}

struct Worker {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemory,
    queues: Vec<Queue>,
    kicks: Vec<EventFd>,
    interrupt: Arc<dyn Interrupt>,
    epoll: Epoll,
    kill: EventFd,
    config_wake: EventFd,
    config_requests: Receiver<(ConfigOp, SyncSender<Vec<u8>>)>,
    /// Set once a queue is found corrupt: nothing more is processed until the driver resets.
    broken: bool,
}

impl Worker {
    fn run(mut self) -> Box<dyn VirtioDevice> {
        let mut events = vec![EpollEvent::default(); 16];
        loop {
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!("virtio worker: epoll failed: {e}");
                    return self.device;
                }
            };
            for event in &events[..n] {
                match Token::decode(event.data()) {
                    Some(Token::Kill) => {
                        let _ = self.kill.read();
                        return self.device;
                    }
                    Some(Token::Queue(i)) => {
                        let _ = self.kicks[i].read();
                        self.process(i);
                    }
                    Some(Token::Host(i)) => self.host_event(i),
                    Some(Token::Config) => self.config_access(),
                    None => {}
                }
            }
        }
    }

    fn process(&mut self, index: usize) {
        // A kick for a queue the driver left disabled has nothing to serve (and iterating it
        // would count as a broken ring).
        if self.broken || !self.queues[index].ready() {
            return;
        }
        let result = self.device.process_queue(index, &mut self.queues[index], &self.mem);
        match result {
            Ok(true) => self.signal(index),
            Ok(false) => {}
            Err(e) => self.fail(e),
        }
    }

    fn host_event(&mut self, event: usize) {
        if self.broken {
            // The source is level-triggered: let the device consume it, with no queues to touch.
            let _ = self.device.handle_host_event(event, &mut [], &self.mem);
            return;
        }
        let result = self.device.handle_host_event(event, &mut self.queues, &self.mem);
        match result {
            Ok(used) => used.into_iter().for_each(|q| self.signal(q)),
            Err(e) => self.fail(e),
        }
        if self.device.take_config_changed()
            && let Err(e) = self.interrupt.signal_config()
        {
            tracing::warn!("virtio worker: cannot signal a configuration change: {e}");
        }
    }

    fn config_access(&mut self) {
        let _ = self.config_wake.read();
        while let Ok((op, reply)) = self.config_requests.try_recv() {
            let answer = match op {
                ConfigOp::Read { offset, len } => {
                    let mut data = vec![0u8; len.min(4096)];
                    self.device.read_config(offset, &mut data);
                    data
                }
                ConfigOp::Write { offset, data } => {
                    self.device.write_config(offset, &data);
                    Vec::new()
                }
            };
            let _ = reply.send(answer);
        }
    }

    fn signal(&mut self, index: usize) {
        let needed = self.queues[index].needs_notification(&self.mem).unwrap_or(true);
        if needed && let Err(e) = self.interrupt.signal_queue(index) {
            tracing::warn!("virtio worker: cannot signal queue {index}: {e}");
        }
    }

    fn fail(&mut self, e: DeviceError) {
        tracing::warn!(
            "virtio-{}: {e}; waiting for the driver to reset the device",
            self.device.device_type().name()
        );
        self.broken = true;
        if let Err(e) = self.interrupt.needs_reset() {
            tracing::warn!("virtio worker: cannot signal needs-reset: {e}");
        }
    }
}

// `needs_notification` comes from this trait.
use virtio_queue::QueueT as _;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;
    use crate::test_utils::*;
    use std::sync::Mutex;
    use std::time::{Duration, Instant};

    #[derive(Default)]
    struct Recorder(Mutex<Vec<String>>);

    impl Interrupt for Recorder {
        fn signal_queue(&self, queue: usize) -> io::Result<()> {
            self.0.lock().unwrap().push(format!("queue{queue}"));
            Ok(())
        }
        fn signal_config(&self) -> io::Result<()> {
            self.0.lock().unwrap().push("config".into());
            Ok(())
        }
        fn needs_reset(&self) -> io::Result<()> {
            self.0.lock().unwrap().push("needs-reset".into());
            Ok(())
        }
    }

    fn wait_for(rec: &Recorder, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if rec.0.lock().unwrap().iter().any(|s| s == what) {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        panic!("no {what}: {:?}", rec.0.lock().unwrap());
    }

    #[test]
    fn a_kick_is_served_on_the_worker_and_the_device_comes_back() {
        let mem = memory();
        let queue = queue_with(&mem, 16, &[desc(0x2_0000, 32, VRING_DESC_F_WRITE, 0)]);
        let rings = QueueRings::of(&queue);
        let kick = EventFd::new(EFD_NONBLOCK).unwrap();
        let kick_writer = kick.try_clone().unwrap();
        let recorder = Arc::new(Recorder::default());
        let handle = spawn(
            "rng",
            Box::new(Rng::new().unwrap()),
            mem.clone(),
            vec![ActiveQueue { queue, kick }],
            recorder.clone(),
        )
        .unwrap();
        kick_writer.write(1).unwrap();
        wait_for(&recorder, "queue0");
        assert_eq!(used_entries(&mem, &rings), [(0, 32)]);
        let device = handle.stop().expect("device returned");
        assert_eq!(device.device_type().name(), "rng");
    }

    #[test]
    fn the_sound_devices_period_clock_completes_playback_on_the_worker() {
        use crate::snd::protocol::{FORMAT_S16, RATE_48000, code, encode};
        use crate::snd::{PLAYBACK_STREAM, Sound, TXQ};
        use vm_memory::{Bytes, GuestAddress};
        let mem = memory();
        let mut sound = Sound::new().unwrap();
        let sink = sound.handle();
        let period = 960 * 4;
        for request in [
            encode::set_params(PLAYBACK_STREAM, 4 * period, period, 2, FORMAT_S16, RATE_48000),
            encode::stream(code::PCM_PREPARE, PLAYBACK_STREAM),
            encode::stream(code::PCM_START, PLAYBACK_STREAM),
        ] {
            assert_eq!(sound.control_request(&request)[..4], 0x8000u32.to_le_bytes());
        }
        mem.write_slice(&PLAYBACK_STREAM.to_le_bytes(), GuestAddress(0x2_0000)).unwrap();
        mem.write_slice(&vec![7u8; period as usize], GuestAddress(0x2_0100)).unwrap();
        let txq = queue_with(
            &mem,
            16,
            &[
                desc(0x2_0000, 4, VRING_DESC_F_NEXT, 1),
                desc(0x2_0100, period, VRING_DESC_F_NEXT, 2),
                desc(0x3_0000, 8, VRING_DESC_F_WRITE, 0),
            ],
        );
        let rings = QueueRings::of(&txq);
        let mut queues: Vec<ActiveQueue> = (0..4)
            .map(|_| ActiveQueue {
                queue: Queue::new(16).unwrap(),
                kick: EventFd::new(EFD_NONBLOCK).unwrap(),
            })
            .collect();
        queues[TXQ].queue = txq;
        let kick = queues[TXQ].kick.try_clone().unwrap();
        let recorder = Arc::new(Recorder::default());
        let handle = spawn("sound", Box::new(sound), mem.clone(), queues, recorder.clone()).unwrap();
        kick.write(1).unwrap();
        // Completed by the period clock's timerfd on the worker, not by the kick.
        wait_for(&recorder, "queue2");
        assert_eq!(used_entries(&mem, &rings), [(0, 8)]);
        let played = sink.take_playback(Duration::from_secs(1));
        assert_eq!(played.len(), 1);
        assert_eq!(played[0].samples[0], i16::from_le_bytes([7, 7]));
        assert!(handle.stop().is_some());
    }

    #[test]
    fn host_input_wakes_the_worker_and_reaches_the_guest() {
        use crate::input::{Input, InputEvent};
        let mem = memory();
        let eventq = queue_with(&mem, 16, &[desc(0x2_0000, 8, VRING_DESC_F_WRITE, 0)]);
        let rings = QueueRings::of(&eventq);
        let tablet = Input::tablet().unwrap();
        let mut sender = tablet.sender();
        let kicks = [EventFd::new(EFD_NONBLOCK).unwrap(), EventFd::new(EFD_NONBLOCK).unwrap()];
        let [k0, k1] = kicks;
        let statusq = Queue::new(16).unwrap();
        let recorder = Arc::new(Recorder::default());
        let handle = spawn(
            "input",
            Box::new(tablet),
            mem.clone(),
            vec![ActiveQueue { queue: eventq, kick: k0 }, ActiveQueue { queue: statusq, kick: k1 }],
            recorder.clone(),
        )
        .unwrap();
        sender.send_report(&[InputEvent::key(0x110, true)]);
        wait_for(&recorder, "queue0");
        assert_eq!(used_entries(&mem, &rings), [(0, 8)]);
        assert!(handle.stop().is_some());
    }

    #[test]
    fn a_host_display_change_raises_a_config_interrupt_and_config_goes_through_the_worker() {
        use crate::gpu::{Gpu, GpuConfig};
        let mem = memory();
        let gpu = Gpu::new(&GpuConfig { scanouts: 2, ..GpuConfig::default() }).unwrap();
        let handle = gpu.handle();
        let queues = (0..2)
            .map(|_| ActiveQueue {
                queue: Queue::new(16).unwrap(),
                kick: EventFd::new(EFD_NONBLOCK).unwrap(),
            })
            .collect();
        let recorder = Arc::new(Recorder::default());
        let worker = spawn("gpu", Box::new(gpu), mem, queues, recorder.clone()).unwrap();
        let mut events_read = [0u8; 4];
        worker.read_config(0, &mut events_read);
        assert_eq!(events_read, [0; 4]);
        let mut scanouts = [0u8; 4];
        worker.read_config(8, &mut scanouts);
        assert_eq!(u32::from_le_bytes(scanouts), 2);

        handle.set_layout(&[(1024, 768), (1024, 768)]).unwrap();
        wait_for(&recorder, "config");
        worker.read_config(0, &mut events_read);
        assert_eq!(u32::from_le_bytes(events_read), 1, "VIRTIO_GPU_EVENT_DISPLAY");
        worker.write_config(4, &1u32.to_le_bytes());
        worker.read_config(0, &mut events_read);
        assert_eq!(events_read, [0; 4], "events_clear reached the running device");
        assert!(worker.stop().is_some());
    }

    #[test]
    fn a_corrupt_ring_asks_for_a_reset() {
        let mem = memory();
        let queue = queue_with(&mem, 16, &[desc(0x2_0000, 32, VRING_DESC_F_WRITE, 0)]);
        QueueRings::of(&queue).corrupt_avail_idx(&mem, 5000);
        let kick = EventFd::new(EFD_NONBLOCK).unwrap();
        let kick_writer = kick.try_clone().unwrap();
        let recorder = Arc::new(Recorder::default());
        let handle = spawn(
            "rng",
            Box::new(Rng::new().unwrap()),
            mem,
            vec![ActiveQueue { queue, kick }],
            recorder.clone(),
        )
        .unwrap();
        kick_writer.write(1).unwrap();
        wait_for(&recorder, "needs-reset");
        assert!(handle.stop().is_some());
    }
}
