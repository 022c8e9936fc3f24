//! The VMM's vhost-user frontend against each of Pleiades' real backends (served on a thread,
//! as `pleiades-host device` serves them): a driver that takes every queue at the largest size
//! offered (what Linux does) gets rings the backend accepts. A backend refuses a larger ring by
//! hanging up, which the no_std test guest (it uses small rings) never showed. The same
//! frontend attaches QEMU's qemu-storage-daemon as a vhost-user-blk backend (desktops' disks).

use pleiades_virtio::console::Console;
use pleiades_virtio::gpu::{Gpu, GpuConfig};
use pleiades_virtio::input::Input;
use pleiades_virtio::rng::Rng;
use pleiades_virtio::snd::Sound;
use pleiades_virtio::test_utils::serve_over_vhost_user;
use pleiades_virtio::{DeviceType, VIRTIO_F_VERSION_1, VirtioDevice};
use pleiades_vmm::memory::create_guest_memory;
use pleiades_vmm::vhost_user::VhostUserFrontend;
use pleiades_vmm::virtio_pci::common_cfg::QueueRegs;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

/// Each queue at its largest, rings laid out one after another in guest memory.
fn rings_at_the_largest_sizes(offered: &[u16]) -> Vec<QueueRegs> {
    let mut next = 0x10_0000u64;
    let mut take = |bytes: u64| {
        let at = next;
        next += bytes.next_multiple_of(4096);
        at
    };
    offered
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
        .collect()
}

/// Hands the rings to the backend and takes them back (a round trip: a backend that refused a
/// ring has hung up).
fn activate_and_reset(frontend: &mut VhostUserFrontend, queues: &[QueueRegs]) -> Result<(), String> {
    let mem = create_guest_memory(16).unwrap();
    let kicks: Vec<EventFd> = queues.iter().map(|_| EventFd::new(EFD_NONBLOCK).unwrap()).collect();
    let calls: Vec<EventFd> = queues.iter().map(|_| EventFd::new(EFD_NONBLOCK).unwrap()).collect();
    let call_refs: Vec<&EventFd> = calls.iter().collect();
    let features = frontend.features() & VIRTIO_F_VERSION_1 | VIRTIO_F_VERSION_1;
    frontend.activate(&mem, features, queues, &kicks, &call_refs)?;
    frontend.reset()
}

#[test]
fn qemu_storage_daemon_serves_a_disk_over_vhost_user_blk() {
    let Some(daemon) = pleiades_testkit::prerequisite::require(
        "qemu_storage_daemon_serves_a_disk_over_vhost_user_blk",
        pleiades_testkit::prerequisite::command("qemu-storage-daemon"),
    ) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    std::fs::File::create(&image).unwrap().set_len(8 << 20).unwrap();
    let socket = dir.path().join("blk.sock");
    let mut child = std::process::Command::new(daemon)
        .arg("--blockdev")
        .arg(format!("driver=file,node-name=f,filename={}", image.display()))
        .arg("--blockdev")
        .arg("driver=raw,node-name=disk0,file=f")
        .arg("--export")
        .arg(format!(
            "type=vhost-user-blk,id=e,node-name=disk0,addr.type=unix,addr.path={},writable=on,num-queues=2",
            socket.display()
        ))
        .spawn()
        .unwrap();
    let listening =
        pleiades_testkit::wait_for("the daemon's socket", std::time::Duration::from_secs(20), || {
            socket.exists().then_some(())
        });
    let result = listening.map_err(|e| e.to_string()).and_then(|()| {
        let mut frontend =
            VhostUserFrontend::connect(DeviceType::Block, &socket).map_err(|e| e.to_string())?;
        assert_eq!(frontend.queue_max_sizes(), [256, 256], "one queue per vCPU, as the backend says");
        // virtio_blk_config.capacity: 512-byte sectors.
        let mut capacity = [0u8; 8];
        frontend.read_config(0, &mut capacity);
        assert_eq!(u64::from_le_bytes(capacity), (8 << 20) / 512);
        // virtio_blk_config.num_queues, read on its own as a driver reads it (libvhost-user
        // answers from byte 0 whatever the offset asked).
        let mut num_queues = [0u8; 2];
        frontend.read_config(34, &mut num_queues);
        assert_eq!(u16::from_le_bytes(num_queues), 2);
        let queues = rings_at_the_largest_sizes(frontend.queue_max_sizes());
        activate_and_reset(&mut frontend, &queues)
    });
    let _ = child.kill();
    let _ = child.wait();
    result.unwrap();
}

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
    for device in devices {
        let kind = device.device_type();
        let own_sizes = device.queue_max_sizes().to_vec();
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join(format!("{}.sock", kind.name()));
        let backend = serve_over_vhost_user(device, &socket);
        let mut frontend = VhostUserFrontend::connect(kind, &socket).unwrap();
        let offered = frontend.queue_max_sizes().to_vec();
        assert_eq!(offered, own_sizes, "{}: offered sizes", kind.name());
        let queues = rings_at_the_largest_sizes(&offered);
        activate_and_reset(&mut frontend, &queues).unwrap_or_else(|e| panic!("{}: {e}", kind.name()));
        drop(frontend);
        backend.join().unwrap().unwrap_or_else(|e| panic!("{}: the backend failed: {e}", kind.name()));
    }
}
