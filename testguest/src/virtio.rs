//! Virtio 1.x over PCI (modern transport): finding the structures through the capability
//! list, mapping BARs, MSI-X, device initialisation (spec 3.1) and split virtqueues.

use core::fmt;
use core::sync::atomic::{Ordering, fence};

use crate::dma::{self, DeviceMemory};
use crate::interrupts::{self, DEVICE_VECTOR};
use crate::memory::{MAPPED_END, MmioRegion, PhysAddr};
use crate::pci::{self, Bdf, Function, MemoryBar};
use crate::pvh::StartInfo;
use crate::time::Deadline;

pub const VIRTIO_VENDOR: u16 = 0x1AF4;

/// A virtio device type (5.x of the spec): 3 console, 4 rng, …
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceType(pub u16);

const TYPE_NAMES: [(u16, &str); 16] = [
    (1, "net"),
    (2, "block"),
    (3, "console"),
    (4, "rng"),
    (5, "balloon"),
    (8, "scsi"),
    (9, "9p"),
    (16, "gpu"),
    (18, "input"),
    (19, "vsock"),
    (20, "crypto"),
    (23, "iommu"),
    (24, "mem"),
    (25, "sound"),
    (26, "fs"),
    (27, "pmem"),
];

impl DeviceType {
    pub const CONSOLE: Self = Self(3);
    pub const RNG: Self = Self(4);
    pub const GPU: Self = Self(16);
    pub const INPUT: Self = Self(18);
    pub const SOUND: Self = Self(25);

    pub fn from_name(name: &str) -> Option<Self> {
        TYPE_NAMES.iter().find(|(_, n)| *n == name).map(|(id, _)| Self(*id))
    }

    /// The type of a PCI function, if it is a virtio device: modern ids 0x1040 + type,
    /// transitional ids 0x1000–0x103F carry the type in the subsystem id.
    pub fn of(function: &Function) -> Option<Self> {
        if function.vendor != VIRTIO_VENDOR {
            return None;
        }
        match function.device {
            0x1040..=0x107F => Some(Self(function.device - 0x1040)),
            0x1000..=0x103F => Some(Self(function.subsystem)),
            _ => None,
        }
    }
}

impl fmt::Display for DeviceType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match TYPE_NAMES.iter().find(|(id, _)| *id == self.0) {
            Some((_, name)) => f.write_str(name),
            None => write!(f, "type-{}", self.0),
        }
    }
}

// virtio_pci_cap cfg_type values.
const CAP_COMMON: u8 = 1;
const CAP_NOTIFY: u8 = 2;
const CAP_ISR: u8 = 3;
const CAP_DEVICE: u8 = 4;
const PCI_CAP_VENDOR: u8 = 0x09;
const PCI_CAP_MSIX: u8 = 0x11;

// Common configuration registers.
pub const DEVICE_FEATURE_SELECT: u64 = 0x00;
pub const DEVICE_FEATURE: u64 = 0x04;
pub const DRIVER_FEATURE_SELECT: u64 = 0x08;
pub const DRIVER_FEATURE: u64 = 0x0C;
pub const CONFIG_MSIX_VECTOR: u64 = 0x10;
pub const NUM_QUEUES: u64 = 0x12;
pub const DEVICE_STATUS: u64 = 0x14;
pub const QUEUE_SELECT: u64 = 0x16;
pub const QUEUE_SIZE: u64 = 0x18;
pub const QUEUE_MSIX_VECTOR: u64 = 0x1A;
pub const QUEUE_ENABLE: u64 = 0x1C;
pub const QUEUE_NOTIFY_OFF: u64 = 0x1E;
pub const QUEUE_DESC: u64 = 0x20;
pub const QUEUE_DRIVER: u64 = 0x28;
pub const QUEUE_DEVICE: u64 = 0x30;
const COMMON_CFG_LEN: u64 = 0x38;

pub const STATUS_ACKNOWLEDGE: u8 = 1;
pub const STATUS_DRIVER: u8 = 2;
pub const STATUS_DRIVER_OK: u8 = 4;
pub const STATUS_FEATURES_OK: u8 = 8;
pub const STATUS_NEEDS_RESET: u8 = 0x40;
pub const STATUS_FAILED: u8 = 0x80;
/// The status once features are negotiated.
const FEATURES_OK: u8 = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;

pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
pub const NO_VECTOR: u16 = 0xFFFF;
/// How long a completed request's interrupt may lag behind its used-ring entry.
const IRQ_GRACE_MS: u64 = 20;
/// Queue size the guest uses (or less, if the device offers less).
pub const QUEUE_SIZE_MAX: u16 = 16;

pub const DESC_F_NEXT: u16 = 1;
pub const DESC_F_WRITE: u16 = 2;
pub const DESC_F_INDIRECT: u16 = 4;

// Layout of a queue's page: descriptors, then the driver (avail) and device (used) rings.
const AVAIL_OFFSET: u64 = 0x100;
const USED_OFFSET: u64 = 0x200;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeError {
    MissingCap(&'static str),
    CapOutsideBar(&'static str),
    BarUnusable(u8),
    NoBarSpace(u8),
}

impl fmt::Display for ProbeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::MissingCap(c) => write!(f, "no {c} capability"),
            Self::CapOutsideBar(c) => write!(f, "the {c} structure lies outside its BAR"),
            Self::BarUnusable(b) => write!(f, "BAR {b} is not a memory BAR"),
            Self::NoBarSpace(b) => write!(f, "no room in the MMIO window for BAR {b}"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VirtioError {
    ResetTimeout,
    NoVersion1,
    FeaturesRejected,
    TooFewQueues(u16),
    QueueUnavailable(u16),
    NotifyOutsideBar(u16),
    Timeout(u16),
    BadUsed { queue: u16, id: u32 },
}

impl fmt::Display for VirtioError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ResetTimeout => write!(f, "the device did not finish its reset"),
            Self::NoVersion1 => write!(f, "the device does not offer VIRTIO_F_VERSION_1"),
            Self::FeaturesRejected => write!(f, "FEATURES_OK did not stick"),
            Self::TooFewQueues(n) => write!(f, "the device has only {n} queues"),
            Self::QueueUnavailable(q) => write!(f, "queue {q} has size 0"),
            Self::NotifyOutsideBar(q) => {
                write!(f, "queue {q}'s notify address is outside the notify structure")
            }
            Self::Timeout(q) => write!(f, "no used buffer on queue {q} in time"),
            Self::BadUsed { queue, id } => write!(f, "queue {queue} returned unknown descriptor id {id}"),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct CapLocation {
    bar: u8,
    offset: u32,
    length: u32,
}

#[derive(Debug, Clone, Copy)]
struct MsixCap {
    cap: u8,
    bar: u8,
    table_offset: u32,
    entries: u16,
}

/// A virtio-pci device with its structures mapped.
#[derive(Debug, Clone, Copy)]
pub struct VirtioPci {
    pub bdf: Bdf,
    pub kind: DeviceType,
    pub common: MmioRegion,
    notify: MmioRegion,
    notify_multiplier: u32,
    pub isr: Option<MmioRegion>,
    pub device_cfg: Option<MmioRegion>,
    msix: Option<(MsixCap, MmioRegion)>,
    /// Whether the last queue setup got an MSI-X vector.
    pub queue_vector_ok: bool,
}

/// The BARs a probe assigned (reported).
#[derive(Debug, Clone, Copy, Default)]
pub struct Assigned(pub u8);

/// Finds and maps a virtio device's structures; assigns BARs that are unassigned or unusable
/// (0, above 4 GiB, over RAM), or all of them with `reassign`, from `window`, then enables
/// memory decoding and bus mastering.
pub fn probe(
    function: &Function,
    kind: DeviceType,
    window: &mut pci::BarWindow,
    start_info: Option<&StartInfo>,
    reassign: bool,
) -> Result<(VirtioPci, Assigned), ProbeError> {
    let bdf = function.bdf;
    let (mut common, mut notify, mut isr, mut device) = (None, None, None, None);
    let mut notify_multiplier = 0;
    let mut msix = None;
    for (at, id) in bdf.capabilities() {
        match id {
            PCI_CAP_VENDOR => {
                let location = CapLocation {
                    bar: bdf.read8(at + 4),
                    offset: bdf.read32(at + 8),
                    length: bdf.read32(at + 12),
                };
                if location.bar > 5 {
                    continue;
                }
                // The first structure of each type is the one to use.
                match bdf.read8(at + 3) {
                    CAP_COMMON => common = common.or(Some(location)),
                    CAP_NOTIFY if notify.is_none() => {
                        notify = Some(location);
                        notify_multiplier = bdf.read32(at + 16);
                    }
                    CAP_ISR => isr = isr.or(Some(location)),
                    CAP_DEVICE => device = device.or(Some(location)),
                    _ => {}
                }
            }
            PCI_CAP_MSIX => {
                let table = bdf.read32(at + 4);
                msix = Some(MsixCap {
                    cap: at,
                    bar: (table & 7) as u8,
                    table_offset: table & !7,
                    entries: (bdf.read16(at + 2) & 0x7FF) + 1,
                });
            }
            _ => {}
        }
    }
    let common = common.ok_or(ProbeError::MissingCap("common cfg"))?;
    let notify = notify.ok_or(ProbeError::MissingCap("notify cfg"))?;

    let mut needed = 0u8;
    for loc in [Some(common), Some(notify), isr, device].into_iter().flatten() {
        needed |= 1 << loc.bar;
    }
    if let Some(m) = msix
        && m.bar <= 5
    {
        needed |= 1 << m.bar;
    }

    let command = bdf.read16(pci::COMMAND);
    bdf.write16(pci::COMMAND, command & !pci::COMMAND_MEMORY);
    let mut bars: [Option<MemoryBar>; 6] = [None; 6];
    let mut assigned = Assigned::default();
    let mut result = Ok(());
    for index in 0..6u8 {
        if needed & (1 << index) == 0 {
            continue;
        }
        let Some(mut bar) = pci::probe_memory_bar(bdf, index) else {
            result = Err(ProbeError::BarUnusable(index));
            break;
        };
        let end = bar.addr.saturating_add(bar.size);
        let unusable = reassign
            || bar.addr == 0
            || end > pci::BAR_WINDOW_END
            || start_info.is_some_and(|si| si.overlaps_ram(bar.addr, end));
        if unusable {
            let Some(addr) = window.alloc(bar.size) else {
                result = Err(ProbeError::NoBarSpace(index));
                break;
            };
            pci::set_memory_bar(bdf, index, bar, addr);
            bar.addr = addr;
            assigned.0 |= 1 << index;
        }
        bars[usize::from(index)] = Some(bar);
    }
    bdf.write16(
        pci::COMMAND,
        command | pci::COMMAND_MEMORY | pci::COMMAND_BUS_MASTER | pci::COMMAND_INTX_DISABLE,
    );
    result?;

    let region = |loc: CapLocation, name: &'static str, min: u64| -> Result<MmioRegion, ProbeError> {
        let bar = bars[usize::from(loc.bar)].ok_or(ProbeError::BarUnusable(loc.bar))?;
        let (offset, length) = (u64::from(loc.offset), u64::from(loc.length));
        let inside = offset.checked_add(length).is_some_and(|end| end <= bar.size);
        let base = bar.addr + offset;
        if !inside || length < min || base + length > MAPPED_END {
            return Err(ProbeError::CapOutsideBar(name));
        }
        // SAFETY: inside a memory BAR of this device (checked), which lies below 4 GiB in the
        // window the guest assigned or firmware assigned outside RAM.
        Ok(unsafe { MmioRegion::new(PhysAddr(base), length) })
    };
    let msix = match msix {
        Some(m) if m.bar <= 5 => {
            let loc = CapLocation { bar: m.bar, offset: m.table_offset, length: u32::from(m.entries) * 16 };
            Some((m, region(loc, "MSI-X table", 16)?))
        }
        _ => None,
    };
    let device = VirtioPci {
        bdf,
        kind,
        common: region(common, "common cfg", COMMON_CFG_LEN)?,
        notify: region(notify, "notify cfg", 2)?,
        notify_multiplier,
        isr: isr.map(|l| region(l, "isr cfg", 1)).transpose()?,
        device_cfg: device.map(|l| region(l, "device cfg", 0)).transpose()?,
        msix,
        queue_vector_ok: false,
    };
    Ok((device, assigned))
}

/// A used-ring element.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Used {
    pub id: u32,
    pub len: u32,
}

/// A descriptor as the guest writes it (garbage included).
#[derive(Debug, Clone, Copy)]
pub struct Descriptor {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

/// A split virtqueue in one page of the DMA pool.
#[derive(Debug)]
pub struct Virtqueue {
    pub index: u16,
    pub size: u16,
    desc: PhysAddr,
    avail: PhysAddr,
    used: PhysAddr,
    notify_offset: u64,
    next_avail: u16,
    last_used: u16,
}

impl Virtqueue {
    pub fn write_descriptor(&self, index: u16, d: Descriptor) {
        let at = self.desc.add(u64::from(index % self.size) * 16);
        dma::write_u64(at, d.addr);
        dma::write_u32(at.add(8), d.len);
        dma::write_u16(at.add(12), d.flags);
        dma::write_u16(at.add(14), d.next);
    }

    /// Puts `head` in the available ring and publishes it.
    pub fn publish(&mut self, head: u16) {
        let slot = u64::from(self.next_avail % self.size);
        dma::write_u16(self.avail.add(4 + 2 * slot), head);
        self.next_avail = self.next_avail.wrapping_add(1);
        self.set_avail_idx(self.next_avail);
    }

    /// Writes the available index as is (the hostile mode makes it jump).
    pub fn set_avail_idx(&mut self, idx: u16) {
        fence(Ordering::SeqCst);
        dma::write_u16(self.avail.add(2), idx);
        fence(Ordering::SeqCst);
    }

    pub fn next_avail(&self) -> u16 {
        self.next_avail
    }

    /// The next used element, if the device returned one.
    pub fn poll_used(&mut self) -> Option<Used> {
        fence(Ordering::SeqCst);
        if dma::read_u16(self.used.add(2)) == self.last_used {
            return None;
        }
        fence(Ordering::SeqCst);
        let at = self.used.add(4 + 8 * u64::from(self.last_used % self.size));
        self.last_used = self.last_used.wrapping_add(1);
        Some(Used { id: dma::read_u32(at), len: dma::read_u32(at.add(4)) })
    }
}

impl VirtioPci {
    pub fn status(&self) -> u8 {
        self.common.read8(DEVICE_STATUS)
    }

    pub fn set_status(&self, status: u8) {
        self.common.write8(DEVICE_STATUS, status);
    }

    pub fn has_msix(&self) -> bool {
        self.msix.is_some()
    }

    /// Points MSI-X table entry 0 at the boot CPU with [`DEVICE_VECTOR`], unmasks it and
    /// enables MSI-X.
    pub fn enable_msix(&self, apic_id: u8) {
        let Some((cap, table)) = self.msix else { return };
        table.write32(0, 0xFEE0_0000 | u32::from(apic_id) << 12);
        table.write32(4, 0);
        table.write32(8, u32::from(DEVICE_VECTOR));
        table.write32(12, 0);
        let control = self.bdf.read16(cap.cap + 2);
        self.bdf.write16(cap.cap + 2, (control | 0x8000) & !0x4000);
    }

    /// Writes 0 to the status and waits (bounded) until it reads back 0.
    pub fn reset(&self) -> Result<(), VirtioError> {
        self.set_status(0);
        let deadline = Deadline::after_ms(1000);
        for _ in 0..10_000_000u32 {
            if self.status() == 0 {
                return Ok(());
            }
            if deadline.passed() {
                break;
            }
            core::hint::spin_loop();
        }
        Err(VirtioError::ResetTimeout)
    }

    pub fn device_features(&self) -> u64 {
        self.common.write32(DEVICE_FEATURE_SELECT, 0);
        let low = self.common.read32(DEVICE_FEATURE);
        self.common.write32(DEVICE_FEATURE_SELECT, 1);
        let high = self.common.read32(DEVICE_FEATURE);
        (u64::from(high) << 32) | u64::from(low)
    }

    /// Spec 3.1.1: reset, ACKNOWLEDGE, DRIVER, features (VERSION_1 only), FEATURES_OK, the
    /// first `queue_count` queues, DRIVER_OK.
    pub fn init(
        &mut self,
        memory: &DeviceMemory,
        queue_count: u16,
    ) -> Result<[Option<Virtqueue>; 2], VirtioError> {
        self.negotiate(0)?;
        self.start(memory, queue_count)
    }

    /// Spec 3.1.1 steps 1–6: reset, ACKNOWLEDGE, DRIVER, and the features: VERSION_1 and
    /// those of `wanted` that the device offers; FEATURES_OK. Returns the accepted features.
    /// The device configuration may be read from here on (virtio-input's is, before the
    /// queues exist, as Linux does).
    pub fn negotiate(&mut self, wanted: u64) -> Result<u64, VirtioError> {
        self.reset()?;
        self.set_status(STATUS_ACKNOWLEDGE);
        self.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        let offered = self.device_features();
        if offered & VIRTIO_F_VERSION_1 == 0 {
            self.set_status(STATUS_FAILED);
            return Err(VirtioError::NoVersion1);
        }
        let accepted = offered & (wanted | VIRTIO_F_VERSION_1);
        self.common.write32(DRIVER_FEATURE_SELECT, 0);
        self.common.write32(DRIVER_FEATURE, accepted as u32);
        self.common.write32(DRIVER_FEATURE_SELECT, 1);
        self.common.write32(DRIVER_FEATURE, (accepted >> 32) as u32);
        self.set_status(FEATURES_OK);
        if self.status() & STATUS_FEATURES_OK == 0 {
            self.set_status(STATUS_FAILED);
            return Err(VirtioError::FeaturesRejected);
        }
        Ok(accepted)
    }

    /// Spec 3.1.1 steps 7–8 after [`Self::negotiate`]: the first `queue_count` queues (two
    /// at most), then DRIVER_OK.
    pub fn start(
        &mut self,
        memory: &DeviceMemory,
        queue_count: u16,
    ) -> Result<[Option<Virtqueue>; 2], VirtioError> {
        self.common.write16(CONFIG_MSIX_VECTOR, NO_VECTOR);
        let available = self.common.read16(NUM_QUEUES);
        if available < queue_count {
            self.set_status(STATUS_FAILED);
            return Err(VirtioError::TooFewQueues(available));
        }
        let mut queues = [None, None];
        self.queue_vector_ok = true;
        for (index, slot) in queues.iter_mut().enumerate().take(usize::from(queue_count.min(2))) {
            match self.setup_queue(index as u16, memory.queues[index]) {
                Ok(q) => *slot = Some(q),
                Err(e) => {
                    self.set_status(STATUS_FAILED);
                    return Err(e);
                }
            }
        }
        self.set_status(FEATURES_OK | STATUS_DRIVER_OK);
        Ok(queues)
    }

    /// [`Self::start`] with the queues of the given indices (in the device's two queue pages),
    /// e.g. virtio-snd's control queue 0 and tx queue 2; the others stay disabled.
    pub fn start_indices(
        &mut self,
        memory: &DeviceMemory,
        indices: [u16; 2],
    ) -> Result<[Option<Virtqueue>; 2], VirtioError> {
        self.common.write16(CONFIG_MSIX_VECTOR, NO_VECTOR);
        let available = self.common.read16(NUM_QUEUES);
        if available <= indices[0].max(indices[1]) {
            self.set_status(STATUS_FAILED);
            return Err(VirtioError::TooFewQueues(available));
        }
        let mut queues = [None, None];
        self.queue_vector_ok = true;
        for (slot, (index, page)) in queues.iter_mut().zip(indices.iter().zip(memory.queues)) {
            match self.setup_queue(*index, page) {
                Ok(q) => *slot = Some(q),
                Err(e) => {
                    self.set_status(STATUS_FAILED);
                    return Err(e);
                }
            }
        }
        self.set_status(FEATURES_OK | STATUS_DRIVER_OK);
        Ok(queues)
    }

    fn setup_queue(&mut self, index: u16, page: PhysAddr) -> Result<Virtqueue, VirtioError> {
        self.common.write16(QUEUE_SELECT, index);
        let max = self.common.read16(QUEUE_SIZE);
        if max == 0 {
            return Err(VirtioError::QueueUnavailable(index));
        }
        let size = max.min(QUEUE_SIZE_MAX);
        self.common.write16(QUEUE_SIZE, size);
        dma::fill(page, dma::PAGE_SIZE, 0);
        let queue = Virtqueue {
            index,
            size,
            desc: page,
            avail: page.add(AVAIL_OFFSET),
            used: page.add(USED_OFFSET),
            notify_offset: u64::from(self.common.read16(QUEUE_NOTIFY_OFF))
                * u64::from(self.notify_multiplier),
            next_avail: 0,
            last_used: 0,
        };
        if queue.notify_offset + 2 > self.notify.len() {
            return Err(VirtioError::NotifyOutsideBar(index));
        }
        self.common.write64_split(QUEUE_DESC, queue.desc.0);
        self.common.write64_split(QUEUE_DRIVER, queue.avail.0);
        self.common.write64_split(QUEUE_DEVICE, queue.used.0);
        let vector = if self.msix.is_some() { 0 } else { NO_VECTOR };
        self.common.write16(QUEUE_MSIX_VECTOR, vector);
        self.queue_vector_ok &= vector == 0 && self.common.read16(QUEUE_MSIX_VECTOR) == 0;
        self.common.write16(QUEUE_ENABLE, 1);
        Ok(queue)
    }

    pub fn notify(&self, queue: &Virtqueue) {
        fence(Ordering::SeqCst);
        self.notify.write16(queue.notify_offset, queue.index);
    }

    /// Notifies with a queue index of the caller's choosing (hostile mode).
    pub fn notify_raw(&self, offset: u64, value: u16) {
        self.notify.write16(offset, value);
    }

    /// Waits (bounded) for the next used element of `queue`, halting between checks.
    ///
    /// Interrupts are only let in while waiting, so when the used ring is seen first the
    /// device's MSI-X may still be pending (or on its way): it then gets a short bounded
    /// grace period, so that `irqs` counts what the device sent.
    pub fn wait_used(&self, queue: &mut Virtqueue, timeout_ms: u64) -> Option<Used> {
        let irqs_before = interrupts::device_irqs();
        let deadline = Deadline::after_ms(timeout_ms);
        let mut used = None;
        for _ in 0..timeout_ms.saturating_mul(8).saturating_add(1000) {
            used = queue.poll_used();
            if used.is_some() || deadline.passed() {
                break;
            }
            interrupts::idle();
        }
        let used = used.or_else(|| queue.poll_used())?;
        if self.queue_vector_ok {
            let grace = Deadline::after_ms(IRQ_GRACE_MS);
            interrupts::interrupt_window();
            for _ in 0..IRQ_GRACE_MS * 8 {
                if interrupts::device_irqs() != irqs_before || grace.passed() {
                    break;
                }
                interrupts::idle();
            }
        }
        Some(used)
    }
}
