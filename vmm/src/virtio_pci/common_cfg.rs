//! The registers of `struct virtio_pci_common_cfg` (virtio 1.2, 4.1.4.3) and the per-queue
//! state the driver programs through them.

/// Register offsets.
pub const DEVICE_FEATURE_SELECT: u64 = 0x00;
pub const DEVICE_FEATURE: u64 = 0x04;
pub const DRIVER_FEATURE_SELECT: u64 = 0x08;
pub const DRIVER_FEATURE: u64 = 0x0c;
pub const MSIX_CONFIG: u64 = 0x10;
pub const NUM_QUEUES: u64 = 0x12;
pub const DEVICE_STATUS: u64 = 0x14;
pub const CONFIG_GENERATION: u64 = 0x15;
pub const QUEUE_SELECT: u64 = 0x16;
pub const QUEUE_SIZE: u64 = 0x18;
pub const QUEUE_MSIX_VECTOR: u64 = 0x1a;
pub const QUEUE_ENABLE: u64 = 0x1c;
pub const QUEUE_NOTIFY_OFF: u64 = 0x1e;
pub const QUEUE_DESC_LO: u64 = 0x20;
pub const QUEUE_DESC_HI: u64 = 0x24;
pub const QUEUE_DRIVER_LO: u64 = 0x28;
pub const QUEUE_DRIVER_HI: u64 = 0x2c;
pub const QUEUE_DEVICE_LO: u64 = 0x30;
pub const QUEUE_DEVICE_HI: u64 = 0x34;
/// The structure's size (virtio 1.0 fields).
pub const COMMON_CFG_SIZE: u64 = 0x38;

/// Device status bits.
pub const STATUS_ACKNOWLEDGE: u8 = 1;
pub const STATUS_DRIVER: u8 = 2;
pub const STATUS_DRIVER_OK: u8 = 4;
pub const STATUS_FEATURES_OK: u8 = 8;
pub const STATUS_NEEDS_RESET: u8 = 0x40;
pub const STATUS_FAILED: u8 = 0x80;

/// "No MSI-X vector" in msix_config / queue_msix_vector.
pub const NO_VECTOR: u16 = 0xffff;

/// One queue's registers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueRegs {
    pub max_size: u16,
    pub size: u16,
    pub msix_vector: u16,
    pub enabled: bool,
    pub desc: u64,
    pub driver: u64,
    pub device: u64,
}

impl QueueRegs {
    pub fn new(max_size: u16) -> Self {
        Self {
            max_size,
            size: max_size,
            msix_vector: NO_VECTOR,
            enabled: false,
            desc: 0,
            driver: 0,
            device: 0,
        }
    }
}

/// Sets the low or high half of a 64-bit register.
pub fn set_half(reg: &mut u64, high: bool, value: u32) {
    *reg = if high {
        (*reg & 0xffff_ffff) | u64::from(value) << 32
    } else {
        (*reg & !0xffff_ffff) | u64::from(value)
    };
}

/// The state behind the common configuration registers.
#[derive(Debug, Clone)]
pub struct CommonConfig {
    pub device_feature_select: u32,
    pub driver_feature_select: u32,
    pub driver_features: u64,
    pub msix_config: u16,
    pub status: u8,
    pub config_generation: u8,
    pub queue_select: u16,
    pub queues: Vec<QueueRegs>,
}

impl CommonConfig {
    pub fn new(queue_max_sizes: &[u16]) -> Self {
        Self {
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            msix_config: NO_VECTOR,
            status: 0,
            config_generation: 0,
            queue_select: 0,
            queues: queue_max_sizes.iter().map(|m| QueueRegs::new(*m)).collect(),
        }
    }

    /// Back to the reset state (the generation counter keeps counting).
    pub fn reset(&mut self) {
        let generation = self.config_generation;
        let sizes: Vec<u16> = self.queues.iter().map(|q| q.max_size).collect();
        *self = Self::new(&sizes);
        self.config_generation = generation;
    }

    /// The selected queue, if `queue_select` is in range.
    pub fn selected(&self) -> Option<&QueueRegs> {
        self.queues.get(usize::from(self.queue_select))
    }

    pub fn selected_mut(&mut self) -> Option<&mut QueueRegs> {
        self.queues.get_mut(usize::from(self.queue_select))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn halves_and_reset() {
        let mut r = 0u64;
        set_half(&mut r, false, 0x1000);
        set_half(&mut r, true, 0x2);
        assert_eq!(r, 0x2_0000_1000);
        let mut cfg = CommonConfig::new(&[256, 128]);
        cfg.queue_select = 1;
        cfg.selected_mut().unwrap().size = 4;
        cfg.config_generation = 3;
        cfg.reset();
        assert_eq!(cfg.queues[1], QueueRegs::new(128));
        assert_eq!(cfg.config_generation, 3);
        cfg.queue_select = 2;
        assert!(cfg.selected().is_none());
    }
}
