use std::time::{Duration, Instant};

use vm_memory::Bytes;

use super::*;
use crate::interrupts::fake::FakeResources;
use crate::pci::msix::MSIX_ENABLE;
use pleiades_virtio::rng::Rng;

const BAR: u64 = 0xc000_0000;
const DESC: u64 = 0x1_0000;
const AVAIL: u64 = 0x1_1000;
const USED: u64 = 0x1_2000;
const BUFFER: u64 = 0x2_0000;

fn setup() -> (VirtioPciDevice, GuestMemory, Arc<FakeResources>) {
    let mem = crate::memory::create_guest_memory(16).unwrap();
    let resources = Arc::new(FakeResources::default());
    let mut dev = VirtioPciDevice::new(
        QueueServer::InProcess(Box::new(Rng::new().unwrap())),
        mem.clone(),
        resources.clone(),
        BAR,
    )
    .unwrap();
    dev.bar_moved(Some(BAR));
    (dev, mem, resources)
}

fn w(dev: &mut VirtioPciDevice, offset: u64, value: u64, len: usize) {
    dev.write(offset, &value.to_le_bytes()[..len]);
}

fn r(dev: &mut VirtioPciDevice, offset: u64, len: usize) -> u64 {
    let mut data = vec![0u8; len];
    dev.read(offset, &mut data);
    le_value(&data)
}

/// The Linux driver's init sequence up to FEATURES_OK.
fn negotiate(dev: &mut VirtioPciDevice, features_hi: u32) -> u8 {
    w(dev, DEVICE_STATUS, 0, 1);
    w(dev, DEVICE_STATUS, u64::from(STATUS_ACKNOWLEDGE | STATUS_DRIVER), 1);
    w(dev, DRIVER_FEATURE_SELECT, 1, 4);
    w(dev, DRIVER_FEATURE, u64::from(features_hi), 4);
    w(dev, DEVICE_STATUS, u64::from(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK), 1);
    r(dev, DEVICE_STATUS, 1) as u8
}

fn program_queue(dev: &mut VirtioPciDevice, size: u16, desc: u64) {
    w(dev, QUEUE_SELECT, 0, 2);
    w(dev, QUEUE_SIZE, u64::from(size), 2);
    w(dev, QUEUE_MSIX_VECTOR, 1, 2);
    w(dev, QUEUE_DESC_LO, desc & 0xffff_ffff, 4);
    w(dev, QUEUE_DESC_HI, desc >> 32, 4);
    w(dev, QUEUE_DRIVER_LO, AVAIL, 4);
    w(dev, QUEUE_DRIVER_HI, 0, 4);
    w(dev, QUEUE_DEVICE_LO, USED, 4);
    w(dev, QUEUE_DEVICE_HI, 0, 4);
    w(dev, QUEUE_ENABLE, 1, 2);
}

fn enable_msix(dev: &mut VirtioPciDevice) {
    let reg = dev.msix_cap_offset / 4;
    dev.write_config(reg, 2, &(MSIX_ENABLE | 1).to_le_bytes());
    for v in 0..2u64 {
        let entry = MSIX_TABLE_OFFSET + v * 16;
        w(dev, entry, 0xfee0_0000, 4);
        w(dev, entry + 4, 0, 4);
        w(dev, entry + 8, 0x40 + v, 4);
        w(dev, entry + 12, 0, 4);
    }
}

#[test]
fn identity_and_capabilities() {
    let (mut dev, _, resources) = setup();
    assert_eq!(dev.read_config(0), 0x1044_1af4);
    assert_eq!(dev.read_config(2) & 0xff, 1, "revision 1");
    assert_eq!(dev.read_config(11), 0x1100_1af4);
    // Walk the capability list: four virtio caps then MSI-X.
    let mut at = dev.read_config(13) as usize;
    let mut kinds = Vec::new();
    while at != 0 {
        let dword = dev.read_config(at / 4);
        let id = dword & 0xff;
        kinds.push(if id == 9 { (dword >> 24) & 0xff } else { 0x100 | id });
        at = ((dword >> 8) & 0xff) as usize;
    }
    assert_eq!(kinds, [1, 2, 3, 4, 0x111]);
    assert_eq!(dev.bar_mapping(), Some((BAR, BAR_SIZE)));
    assert_eq!(*resources.ioevents.lock().unwrap(), [BAR + NOTIFY_OFFSET]);
    assert_eq!(r(&mut dev, NUM_QUEUES, 2), 1);
    assert_eq!(r(&mut dev, QUEUE_SIZE, 2), 256);
    w(&mut dev, DEVICE_FEATURE_SELECT, 1, 4);
    assert_eq!(r(&mut dev, DEVICE_FEATURE, 4) & 1, 1, "VERSION_1");
}

#[test]
fn a_request_goes_through_the_worker_and_raises_the_queue_vector() {
    let (mut dev, mem, resources) = setup();
    assert_ne!(negotiate(&mut dev, 1) & STATUS_FEATURES_OK, 0);
    enable_msix(&mut dev);
    assert_eq!(resources.routes.lock().unwrap().len(), 2);
    program_queue(&mut dev, 16, DESC);
    assert_eq!(r(&mut dev, QUEUE_ENABLE, 2), 1);
    // One writable 32-byte buffer.
    mem.write_obj(BUFFER, GuestAddress(DESC)).unwrap();
    mem.write_obj(32u32, GuestAddress(DESC + 8)).unwrap();
    mem.write_obj(2u16, GuestAddress(DESC + 12)).unwrap();
    mem.write_obj(0u16, GuestAddress(AVAIL + 4)).unwrap();
    mem.write_obj(1u16, GuestAddress(AVAIL + 2)).unwrap();
    w(&mut dev, DEVICE_STATUS, 0xf, 1);
    assert_eq!(r(&mut dev, DEVICE_STATUS, 1), 0xf);
    w(&mut dev, NOTIFY_OFFSET, 0, 2);
    let deadline = Instant::now() + Duration::from_secs(10);
    while mem.read_obj::<u16>(GuestAddress(USED + 2)).unwrap() != 1 {
        assert!(Instant::now() < deadline, "the worker never used the buffer");
        std::thread::sleep(Duration::from_millis(5));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while dev.lines.vectors[1].irqfd.read().is_err() {
        assert!(Instant::now() < deadline, "no interrupt on the queue's vector");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(dev.status_json()["metrics"]["activations"], 1);
    // Reset gives the device back and clears the registers.
    w(&mut dev, DEVICE_STATUS, 0, 1);
    assert_eq!(r(&mut dev, DEVICE_STATUS, 1), 0);
    assert!(matches!(dev.serving, Serving::Local { device: Some(_), worker: None }));
    assert_eq!(r(&mut dev, QUEUE_ENABLE, 2), 0);
    // And it can be activated again.
    assert_ne!(negotiate(&mut dev, 1) & STATUS_FEATURES_OK, 0);
    program_queue(&mut dev, 16, DESC);
    w(&mut dev, DEVICE_STATUS, 0xf, 1);
    assert!(dev.take_backend().is_some());
}

#[test]
fn features_not_offered_fail_features_ok() {
    let (mut dev, _, _) = setup();
    assert_eq!(negotiate(&mut dev, 1 | 1 << 20) & STATUS_FEATURES_OK, 0);
    assert_eq!(negotiate(&mut dev, 0) & STATUS_FEATURES_OK, 0, "VERSION_1 is required");
    // DRIVER_OK without FEATURES_OK: refused, NEEDS_RESET.
    w(&mut dev, DEVICE_STATUS, 0x7, 1);
    assert_eq!(
        r(&mut dev, DEVICE_STATUS, 1) as u8 & (STATUS_DRIVER_OK | STATUS_NEEDS_RESET),
        STATUS_NEEDS_RESET
    );
    w(&mut dev, DEVICE_STATUS, 0, 1);
    assert_eq!(r(&mut dev, DEVICE_STATUS, 1), 0);
}

#[test]
fn bad_queues_stay_disabled() {
    let (mut dev, _, _) = setup();
    negotiate(&mut dev, 1);
    program_queue(&mut dev, 3, DESC);
    assert_eq!(r(&mut dev, QUEUE_ENABLE, 2), 0, "size not a power of two");
    program_queue(&mut dev, 512, DESC);
    assert_eq!(r(&mut dev, QUEUE_ENABLE, 2), 0, "larger than the maximum");
    program_queue(&mut dev, 16, 0xff_0000_0000);
    assert_eq!(r(&mut dev, QUEUE_ENABLE, 2), 0, "outside guest memory");
    program_queue(&mut dev, 16, DESC + 1);
    assert_eq!(r(&mut dev, QUEUE_ENABLE, 2), 0, "misaligned");
    w(&mut dev, QUEUE_SELECT, 7, 2);
    w(&mut dev, QUEUE_ENABLE, 1, 2);
    assert_eq!(r(&mut dev, QUEUE_SIZE, 2), 0, "queue 7 does not exist");
    assert_eq!(r(&mut dev, QUEUE_MSIX_VECTOR, 2), u64::from(NO_VECTOR));
    w(&mut dev, MSIX_CONFIG, 99, 2);
    assert_eq!(r(&mut dev, MSIX_CONFIG, 2), u64::from(NO_VECTOR), "no such vector");
}

#[test]
fn garbage_anywhere_in_the_bar_is_harmless() {
    let (mut dev, _, _) = setup();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for _ in 0..50_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let offset = match x % 4 {
            0 => x >> 8 & 0x3f,
            1 => (x >> 8) % BAR_SIZE,
            2 => MSIX_TABLE_OFFSET + (x >> 8) % 0x40,
            _ => (x >> 8) % (BAR_SIZE * 2),
        };
        let len = [1usize, 2, 4, 8][(x >> 40) as usize % 4];
        if x >> 63 == 0 {
            dev.write(offset, &x.rotate_left(9).to_le_bytes()[..len]);
        } else {
            dev.read(offset, &mut [0u8; 8][..len]);
        }
        if x.is_multiple_of(97) {
            dev.write_config((x >> 16) as usize % 70, (x >> 24) as usize % 5, &x.to_le_bytes()[..len.min(4)]);
        }
    }
    // Whatever state it is in, a reset brings it back.
    w(&mut dev, DEVICE_STATUS, 0, 1);
    assert_eq!(r(&mut dev, DEVICE_STATUS, 1), 0);
    assert!(dev.take_backend().is_some());
}
