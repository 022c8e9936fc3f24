//! The [`VhostUserBackend`] adapter around a device.

use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use vhost::vhost_user::Listener;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringRwLock, VringT};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventFlag, EventNotifier, new_event_consumer_and_notifier};

use crate::{DeviceError, GuestMemory, VirtioDevice};

struct State {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryAtomic<GuestMemory>,
    /// A queue found corrupt stays stopped until the frontend resets the device.
    broken: bool,
}

/// A device served over vhost-user. Cheap to clone (shared state).
#[derive(Clone)]
pub struct VhostUserDevice {
    state: Arc<Mutex<State>>,
    num_queues: usize,
    max_queue_size: usize,
    features: u64,
    has_config: bool,
    /// Tells the daemon's worker thread to exit (without it, dropping the daemon hangs).
    exit: Arc<(EventConsumer, EventNotifier)>,
}

impl std::fmt::Debug for VhostUserDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostUserDevice").field("num_queues", &self.num_queues).finish_non_exhaustive()
    }
}

impl VhostUserDevice {
    pub fn new(device: Box<dyn VirtioDevice>, mem: GuestMemoryAtomic<GuestMemory>) -> io::Result<Self> {
        let sizes = device.queue_max_sizes();
        let num_queues = sizes.len();
        let max_queue_size = sizes.iter().copied().max().unwrap_or(0) as usize;
        let features = device.features() | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        let has_config = device.config_size() > 0;
        let exit = Arc::new(new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC)?);
        Ok(Self {
            state: Arc::new(Mutex::new(State { device, mem, broken: false })),
            num_queues,
            max_queue_size,
            features,
            has_config,
            exit,
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock would be a bug; keep serving with the state as it is.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl VhostUserDevice {
    /// The epoll data of host event `i`: the daemon reserves 0..=num_queues for the queues
    /// and its exit event.
    fn host_event_data(&self, i: usize) -> u64 {
        (self.num_queues + 1 + i) as u64
    }

    /// One of the device's host event sources is readable. The device gets every queue for the
    /// call (a queue the frontend has not enabled is passed as a not-ready placeholder, which
    /// devices leave alone), and the vrings get them back afterwards.
    fn handle_host_event(&self, event: usize, vrings: &[VringRwLock]) -> io::Result<()> {
        let mut state = self.state();
        let mem = state.mem.memory();
        if state.broken {
            // The source is level-triggered: let the device consume it, with no queues to touch.
            let _ = state.device.handle_host_event(event, &mut [], &mem);
            return Ok(());
        }
        let mut guards: Vec<_> = vrings.iter().map(|v| v.get_mut()).collect();
        let enabled: Vec<bool> = guards.iter().map(|g| g.is_enabled()).collect();
        let mut queues: Vec<Queue> = guards
            .iter_mut()
            .zip(&enabled)
            .map(|(g, on)| if *on { std::mem::take(g.get_queue_mut()) } else { Queue::default() })
            .collect();
        let result = state.device.handle_host_event(event, &mut queues, &mem);
        for ((guard, queue), on) in guards.iter_mut().zip(queues).zip(&enabled) {
            if *on {
                *guard.get_queue_mut() = queue;
            }
        }
        drop(guards);
        match result {
            Ok(used) => {
                for index in used {
                    if let Some(vring) = vrings.get(index) {
                        vring.signal_used_queue()?;
                    }
                }
                Ok(())
            }
            Err(e @ (DeviceError::QueueBroken { .. } | DeviceError::UsedRing { .. })) => {
                tracing::warn!(
                    "vhost-user {}: {e}; queue stopped until reset",
                    state.device.device_type().name()
                );
                state.broken = true;
                Ok(())
            }
            Err(e) => Err(io::Error::other(e.to_string())),
        }
    }
}

impl VhostUserBackend for VhostUserDevice {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        self.num_queues
    }

    fn max_queue_size(&self) -> usize {
        self.max_queue_size
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn acked_features(&self, features: u64) {
        self.state().device.ack_features(features);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        // CONFIG only where there is a config space (QEMU warns about it otherwise).
        let config = if self.has_config {
            VhostUserProtocolFeatures::CONFIG
        } else {
            VhostUserProtocolFeatures::empty()
        };
        config | VhostUserProtocolFeatures::MQ
    }

    fn reset_device(&self) {
        let mut state = self.state();
        state.device.reset();
        state.broken = false;
    }

    fn set_event_idx(&self, _enabled: bool) {
        // EVENT_IDX is not offered; virtio-queue honours the driver's NO_INTERRUPT flag.
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        Some((self.exit.0.try_clone().ok()?, self.exit.1.try_clone().ok()?))
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let mut data = vec![0u8; size.min(4096) as usize];
        self.state().device.read_config(u64::from(offset), &mut data);
        data
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        self.state().device.write_config(u64::from(offset), buf);
        Ok(())
    }

    fn set_gpu_socket(&self, socket: vhost::vhost_user::GpuBackend) -> io::Result<()> {
        self.state().device.set_gpu_socket(socket)
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMemory>) -> io::Result<()> {
        self.state().mem = mem;
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        _thread: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Err(io::Error::other(format!("unexpected event set {evset:?}")));
        }
        let index = usize::from(device_event);
        if index > self.num_queues {
            return self.handle_host_event(index - self.num_queues - 1, vrings);
        }
        let Some(vring) = vrings.get(index) else {
            return Err(io::Error::other(format!("event for unknown queue {index}")));
        };
        let mut state = self.state();
        if state.broken {
            return Ok(());
        }
        let mem = state.mem.memory();
        let result = {
            let mut guard = vring.get_mut();
            let queue = guard.get_queue_mut();
            if !queue.ready() {
                // A kick for a queue the driver left disabled: nothing to serve.
                return Ok(());
            }
            let State { device, .. } = &mut *state;
            device.process_queue(index, queue, &mem)
        };
        match result {
            Ok(true) => vring.signal_used_queue(),
            Ok(false) => Ok(()),
            Err(e @ (DeviceError::QueueBroken { .. } | DeviceError::UsedRing { .. })) => {
                // vhost-user has no way to set DEVICE_NEEDS_RESET from the backend without the
                // backend-request channel; stop the queue and let the driver time out and reset.
                tracing::warn!(
                    "vhost-user {}: {e}; queue stopped until reset",
                    state.device.device_type().name()
                );
                state.broken = true;
                Ok(())
            }
            Err(e) => Err(io::Error::other(e.to_string())),
        }
    }
}

/// Serves `device` on the Unix socket `socket` until the frontend disconnects.
pub fn serve(device: Box<dyn VirtioDevice>, socket: &Path) -> anyhow::Result<()> {
    let name = device.device_type().name();
    let mem = GuestMemoryAtomic::new(GuestMemory::default());
    let backend = VhostUserDevice::new(device, mem.clone())?;
    let mut daemon = VhostUserDaemon::new(format!("pleiades-{name}"), backend.clone(), mem)
        .map_err(|e| anyhow::anyhow!("cannot create the vhost-user daemon: {e}"))?;
    // Host-side event sources (e.g. input injected by the host) wake the daemon's worker too.
    let host_events = backend.state().device.host_events();
    if !host_events.is_empty() {
        let handlers = daemon.get_epoll_handlers();
        let handler =
            handlers.first().ok_or_else(|| anyhow::anyhow!("the vhost-user daemon has no worker"))?;
        for (i, fd) in host_events.into_iter().enumerate() {
            handler
                .register_listener(fd, EventSet::IN, backend.host_event_data(i))
                .map_err(|e| anyhow::anyhow!("cannot watch a host event of the {name} device: {e}"))?;
        }
    }
    // Bind first, so that a bad path is an error now rather than inside the daemon.
    let mut listener = Listener::new(socket, true).map_err(|e| {
        anyhow::anyhow!("cannot listen on {}: {e}; check that its directory exists", socket.display())
    })?;
    tracing::info!("vhost-user {name} backend listening on {}", socket.display());
    let served = daemon.start(&mut listener).and_then(|()| daemon.wait());
    let _ = std::fs::remove_file(socket);
    match served {
        Ok(()) => Ok(()),
        // The frontend going away is how a backend's life normally ends.
        Err(vhost_user_backend::Error::HandleRequest(vhost::vhost_user::Error::Disconnected)) => Ok(()),
        Err(e) => Err(anyhow::anyhow!("vhost-user {name} backend on {}: {e}", socket.display())),
    }
}
