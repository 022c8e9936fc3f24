//! PCI: bus 0 behind configuration mechanism #1 (ports 0xCF8/0xCFC), a host bridge at 00:00.0
//! and devices at 00:01.0 and up, one function each.
//!
//! The root owns the slots. After every configuration write it asks the device where its BAR
//! should be decoded ([`PciDevice::bar_mapping`]) and, when that changed, moves the device on
//! the MMIO bus and tells it ([`PciDevice::bar_moved`]) so it can move its ioeventfds.

pub mod config;
pub mod msix;

use std::sync::{Arc, Mutex};

use crate::bus::{Bus, BusDevice, SharedDevice, fill_le, le_value};
use crate::exit::{ExitLatch, ExitReason};
use config::{PciConfiguration, PciIdentity};

/// The port range of configuration mechanism #1 (0xCF8..0xD00); 0xCF9 inside it is the reset
/// control register.
pub const PCI_CONFIG_IO_PORT: u64 = 0xcf8;
pub const PCI_CONFIG_IO_LEN: u64 = 8;
/// Devices per bus.
pub const MAX_DEVICES: usize = 32;

/// A PCI function as the root sees it. Its BAR accesses come through [`BusDevice`].
pub trait PciDevice: BusDevice {
    /// Reads dword `reg` of the configuration space.
    fn read_config(&mut self, reg: usize) -> u32;
    /// Writes `data` at byte `offset` of dword `reg`.
    fn write_config(&mut self, reg: usize, offset: usize, data: &[u8]);
    /// Where the BAR should be decoded now (address, size), if anywhere.
    fn bar_mapping(&self) -> Option<(u64, u64)>;
    /// The BAR is now decoded at `addr` (or nowhere).
    fn bar_moved(&mut self, addr: Option<u64>);
}

/// The host bridge: identity only.
#[derive(Debug)]
pub struct HostBridge {
    config: PciConfiguration,
}

impl HostBridge {
    pub fn new() -> Self {
        Self {
            config: PciConfiguration::new(PciIdentity {
                vendor: 0x8086,
                device: 0x1237, // i440FX, which every guest knows
                class: 0x06,
                subclass: 0x00,
                prog_if: 0,
                revision: 2,
                subsystem_vendor: 0x1af4,
                subsystem: 0x1100,
            }),
        }
    }
}

impl Default for HostBridge {
    fn default() -> Self {
        Self::new()
    }
}

impl BusDevice for HostBridge {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn write(&mut self, _offset: u64, _data: &[u8]) {}
}

impl PciDevice for HostBridge {
    fn read_config(&mut self, reg: usize) -> u32 {
        self.config.read(reg)
    }
    fn write_config(&mut self, reg: usize, offset: usize, data: &[u8]) {
        self.config.write(reg, offset, data);
    }
    fn bar_mapping(&self) -> Option<(u64, u64)> {
        None
    }
    fn bar_moved(&mut self, _addr: Option<u64>) {}
}

/// A shared PCI device.
pub type SharedPciDevice = Arc<Mutex<dyn PciDevice>>;

struct Slot {
    pci: SharedPciDevice,
    bus: SharedDevice,
    mapped: Option<(u64, u64)>,
}

/// PCI errors.
#[derive(Debug, thiserror::Error)]
pub enum PciError {
    #[error("PCI bus 0 is full ({MAX_DEVICES} devices); attach fewer devices")]
    BusFull,
    #[error("cannot map the BAR of PCI device {device:02x} at {addr:#x}: {source}")]
    Map { device: usize, addr: u64, source: crate::bus::BusError },
}

/// Bus 0 and the 0xCF8/0xCFC ports.
pub struct PciRoot {
    slots: Vec<Slot>,
    mmio_bus: Arc<Bus>,
    latch: Arc<ExitLatch>,
    address: u32,
}

impl std::fmt::Debug for PciRoot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PciRoot").field("devices", &self.slots.len()).finish_non_exhaustive()
    }
}

const CONFIG_ADDRESS_ENABLE: u32 = 1 << 31;
/// 0xCF9 bits: "system reset" with "reset CPU".
const RESET_CPU: u8 = 1 << 2;

impl PciRoot {
    /// A bus with the host bridge at 00:00.0.
    pub fn new(mmio_bus: Arc<Bus>, latch: Arc<ExitLatch>) -> Self {
        let bridge = Arc::new(Mutex::new(HostBridge::new()));
        Self {
            slots: vec![Slot { pci: bridge.clone(), bus: bridge, mapped: None }],
            mmio_bus,
            latch,
            address: 0,
        }
    }

    /// Adds a device at the next slot; returns its device number. `pci` and `bus` are the
    /// same object seen through its two traits.
    pub fn add(&mut self, pci: SharedPciDevice, bus: SharedDevice) -> Result<usize, PciError> {
        if self.slots.len() >= MAX_DEVICES {
            return Err(PciError::BusFull);
        }
        self.slots.push(Slot { pci, bus, mapped: None });
        let device = self.slots.len() - 1;
        self.update_mapping(device)?;
        Ok(device)
    }

    /// Re-maps the BAR of `device` if the device wants it elsewhere now.
    fn update_mapping(&mut self, device: usize) -> Result<(), PciError> {
        let slot = &mut self.slots[device];
        let wanted = slot.pci.lock().unwrap_or_else(|e| e.into_inner()).bar_mapping();
        if wanted == slot.mapped {
            return Ok(());
        }
        if let Some((old, _)) = slot.mapped.take() {
            self.mmio_bus.remove(old);
        }
        let mut result = Ok(());
        if let Some((addr, size)) = wanted {
            match self.mmio_bus.insert(addr, size, slot.bus.clone()) {
                Ok(()) => slot.mapped = wanted,
                Err(source) => result = Err(PciError::Map { device, addr, source }),
            }
        }
        let at = slot.mapped.map(|(addr, _)| addr);
        slot.pci.lock().unwrap_or_else(|e| e.into_inner()).bar_moved(at);
        result
    }

    /// The device and register the config address points at, if enabled and on bus 0 fn 0.
    fn target(&self) -> Option<(usize, usize)> {
        let a = self.address;
        let bus = (a >> 16) & 0xff;
        let device = ((a >> 11) & 0x1f) as usize;
        let function = (a >> 8) & 0x7;
        let reg = ((a >> 2) & 0x3f) as usize;
        (a & CONFIG_ADDRESS_ENABLE != 0 && bus == 0 && function == 0 && device < self.slots.len())
            .then_some((device, reg))
    }

    fn config_read(&self, offset: usize, data: &mut [u8]) {
        let value = match self.target() {
            Some((device, reg)) => {
                self.slots[device].pci.lock().unwrap_or_else(|e| e.into_inner()).read_config(reg)
            }
            None => 0xffff_ffff,
        };
        let bytes = value.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = bytes.get(offset + i).copied().unwrap_or(0xff);
        }
    }

    fn config_write(&mut self, offset: usize, data: &[u8]) {
        let Some((device, reg)) = self.target() else { return };
        if offset + data.len() > 4 {
            return;
        }
        self.slots[device].pci.lock().unwrap_or_else(|e| e.into_inner()).write_config(reg, offset, data);
        if let Err(e) = self.update_mapping(device) {
            tracing::warn!("pci: {e}; the device stays unmapped until the guest moves it");
        }
    }
}

impl BusDevice for PciRoot {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (offset, data.len()) {
            (0, 4) => fill_le(data, u64::from(self.address)),
            (4..=7, _) => self.config_read(offset as usize - 4, data),
            _ => data.fill(0),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (offset, data.len()) {
            (0, 4) => self.address = le_value(data) as u32,
            (1, 1) if data[0] & RESET_CPU != 0 => {
                self.latch.exit(ExitReason::Reboot);
            }
            (4..=7, _) => self.config_write(offset as usize - 4, data),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn io(root: &mut PciRoot, device: u32, reg: u32) {
        root.write(0, &(0x8000_0000 | device << 11 | reg << 2).to_le_bytes());
    }

    fn read32(root: &mut PciRoot, device: u32, reg: u32) -> u32 {
        io(root, device, reg);
        let mut data = [0u8; 4];
        root.read(4, &mut data);
        u32::from_le_bytes(data)
    }

    struct OneBar {
        config: PciConfiguration,
        moved: Vec<Option<u64>>,
    }

    impl BusDevice for OneBar {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            fill_le(data, offset);
        }
        fn write(&mut self, _: u64, _: &[u8]) {}
    }

    impl PciDevice for OneBar {
        fn read_config(&mut self, reg: usize) -> u32 {
            self.config.read(reg)
        }
        fn write_config(&mut self, reg: usize, offset: usize, data: &[u8]) {
            self.config.write(reg, offset, data)
        }
        fn bar_mapping(&self) -> Option<(u64, u64)> {
            self.config.active_bar()
        }
        fn bar_moved(&mut self, addr: Option<u64>) {
            self.moved.push(addr);
        }
    }

    fn root_with_device() -> (PciRoot, Arc<Bus>, Arc<Mutex<OneBar>>) {
        let mmio = Arc::new(Bus::new());
        let mut root = PciRoot::new(mmio.clone(), Arc::new(ExitLatch::new()));
        let mut config = PciConfiguration::new(PciIdentity {
            vendor: 0x1af4,
            device: 0x1044,
            class: 0xff,
            subclass: 0,
            prog_if: 0,
            revision: 1,
            subsystem_vendor: 0x1af4,
            subsystem: 0x40,
        });
        config.add_bar64(0x1000);
        config.set_bar_address(0xc000_0000);
        config.set_command(config::COMMAND_MEMORY);
        let dev = Arc::new(Mutex::new(OneBar { config, moved: vec![] }));
        assert_eq!(root.add(dev.clone(), dev.clone()).unwrap(), 1);
        (root, mmio, dev)
    }

    #[test]
    fn enumeration_sees_the_bridge_and_the_device_only() {
        let (mut root, mmio, _) = root_with_device();
        assert_eq!(read32(&mut root, 0, 0), 0x1237_8086);
        assert_eq!(read32(&mut root, 1, 0), 0x1044_1af4);
        assert_eq!(read32(&mut root, 2, 0), 0xffff_ffff);
        assert_eq!(read32(&mut root, 31, 0), 0xffff_ffff);
        // Function 1 and bus 1 are empty; a disabled address reads all ones.
        root.write(0, &(0x8000_0100u32 | 1 << 11).to_le_bytes());
        let mut data = [0u8; 4];
        root.read(4, &mut data);
        assert_eq!(data, [0xff; 4]);
        root.write(0, &0x0000_0800u32.to_le_bytes());
        root.read(4, &mut data);
        assert_eq!(data, [0xff; 4]);
        // Byte and word reads at offsets into the dword.
        io(&mut root, 1, 0);
        let mut word = [0u8; 2];
        root.read(6, &mut word);
        assert_eq!(u16::from_le_bytes(word), 0x1044);
        let mut byte = [0u8; 1];
        root.read(7, &mut byte);
        assert_eq!(byte, [0x10]);
        // The BAR is live on the MMIO bus.
        let mut v = [0u8; 4];
        assert!(mmio.read(0xc000_0010, &mut v));
        assert_eq!(u32::from_le_bytes(v), 0x10);
    }

    #[test]
    fn moving_a_bar_moves_the_mmio_range() {
        let (mut root, mmio, dev) = root_with_device();
        // Linux's sizing dance: decoding off, all ones, read, restore, decoding on.
        io(&mut root, 1, 1);
        root.write(4, &[0, 0]);
        assert!(!mmio.read(0xc000_0000, &mut [0u8; 4]));
        io(&mut root, 1, 4);
        root.write(4, &[0xff; 4]);
        assert_eq!(read32(&mut root, 1, 4), 0xffff_f004);
        io(&mut root, 1, 4);
        root.write(4, &0xd000_0000u32.to_le_bytes());
        io(&mut root, 1, 1);
        root.write(4, &[2, 0]);
        assert!(mmio.read(0xd000_0000, &mut [0u8; 4]));
        assert!(!mmio.read(0xc000_0000, &mut [0u8; 4]));
        assert_eq!(dev.lock().unwrap().moved, [Some(0xc000_0000), None, Some(0xd000_0000)]);
    }

    #[test]
    fn garbage_is_harmless_and_cf9_resets() {
        let (mut root, _, _) = root_with_device();
        let mut x = 0x1234_5678u32;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let offset = u64::from(x % 8);
            let len = [1usize, 2, 4][(x >> 8) as usize % 3];
            let bytes = x.rotate_left(7).to_le_bytes();
            if offset == 1 && len == 1 {
                continue; // that is the reset register
            }
            if x & 1 == 0 {
                root.write(offset, &bytes[..len]);
            } else {
                root.read(offset, &mut [0u8; 4][..len]);
            }
        }
        assert!(!root.latch.stopping());
        root.write(1, &[0x06]);
        assert!(root.latch.stopping());
    }
}
