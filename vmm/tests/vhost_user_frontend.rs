//! The VMM's vhost-user frontend against each of Pleiades' real backends (served on a thread,
//! as `pleiades-host device` serves them): a driver that takes every queue at the largest size
//! offered (what Linux does) gets rings the backend accepts. A backend refuses a larger ring by
//! hanging up, which the no_std test guest (it uses small rings) never showed.

use pleiades_virtio::console::Console;
use pleiades_virtio::gpu::{Gpu, GpuConfig};
use pleiades_virtio::input::Input;
use pleiades_virtio::rng::Rng;
use pleiades_virtio::snd::Sound;
use pleiades_virtio::test_utils::serve_over_vhost_user;
use pleiades_virtio::{VIRTIO_F_VERSION_1, VirtioDevice};
use pleiades_vmm::memory::create_guest_memory;
use pleiades_vmm::vhost_user::VhostUserFrontend;
use pleiades_vmm::virtio_pci::common_cfg::QueueRegs;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

#[test]
fn every_backend_takes_its_queues_at_the_largest_size_offered() {
    let devices: Vec<Box<dyn VirtioDevice>> = vec![
        Box::new(Rng::new().unwrap()),
        Box::new(Console::new(Box::new(std::io::sink()), None)),
        Box::new(Input::keyboard().unwrap()),
        Box::new(Input::tablet().unwrap()),
        Box::new(Gpu::new(&GpuConfig::default()).unwrap()),
        Box::new(Sound::new().unwrap()),
    ];
    let mem = create_guest_memory(16).unwrap();
    for device in devices {
        let kind = device.device_type();
        let own_sizes = device.queue_max_sizes().to_vec();
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join(format!("{}.sock", kind.name()));
        let backend = serve_over_vhost_user(device, &socket);
        let mut frontend = VhostUserFrontend::connect(kind, &socket).unwrap();
        let offered = frontend.queue_max_sizes().to_vec();
        assert_eq!(offered, own_sizes, "{}: offered sizes", kind.name());
        // Each queue at its largest, rings laid out one after another in guest memory.
        let mut next = 0x10_0000u64;
        let mut take = |bytes: u64| {
            let at = next;
            next += bytes.next_multiple_of(4096);
            at
        };
        let queues: Vec<QueueRegs> = offered
            .iter()
            .map(|&size| {
                let n = u64::from(size);
                let mut q = QueueRegs::new(size);
                q.enabled = true;
                q.desc = take(16 * n);
                q.driver = take(6 + 2 * n);
                q.device = take(6 + 8 * n);
                q
            })
            .collect();
        let kicks: Vec<EventFd> = queues.iter().map(|_| EventFd::new(EFD_NONBLOCK).unwrap()).collect();
        let calls: Vec<EventFd> = queues.iter().map(|_| EventFd::new(EFD_NONBLOCK).unwrap()).collect();
        let call_refs: Vec<&EventFd> = calls.iter().collect();
        let features = frontend.features() & VIRTIO_F_VERSION_1 | VIRTIO_F_VERSION_1;
        frontend.activate(&mem, features, &queues, &kicks, &call_refs).unwrap();
        // Stopping the rings is a round trip: a backend that refused a ring has hung up.
        frontend.reset().unwrap_or_else(|e| panic!("{}: {e}", kind.name()));
        drop(frontend);
        backend.join().unwrap().unwrap_or_else(|e| panic!("{}: the backend failed: {e}", kind.name()));
    }
}
