//! Port-I/O and MMIO dispatch: address ranges mapped to devices (crosvm's `Bus`/`BusDevice`).
//!
//! A vCPU exit carries an address and a data slice; the bus finds the device whose range holds
//! the address and calls it with the offset into that range. Unclaimed addresses read as all
//! ones (what real hardware returns for nothing on the bus) and ignore writes.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

/// A device on a bus. `offset` is relative to the start of the range it was inserted at.
pub trait BusDevice: Send {
    /// Fills `data` (1, 2, 4 or 8 bytes) from the register at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Writes `data` to the register at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// A shared device as the bus holds it.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// Bus errors.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("bus range {base:#x}+{len:#x} overlaps a device already there; pick another address")]
    Overlap { base: u64, len: u64 },
    #[error("bus range {base:#x}+{len:#x} is empty or wraps around")]
    BadRange { base: u64, len: u64 },
}

#[derive(Clone)]
struct Entry {
    len: u64,
    device: SharedDevice,
}

/// An address space (port I/O or MMIO) with devices in it.
#[derive(Default)]
pub struct Bus {
    entries: RwLock<BTreeMap<u64, Entry>>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ranges: Vec<_> = self
            .entries
            .read()
            .map(|e| e.iter().map(|(b, e)| format!("{b:#x}+{:#x}", e.len)).collect())
            .unwrap_or_default();
        f.debug_struct("Bus").field("ranges", &ranges).finish()
    }
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    /// Maps `device` at `base..base+len`.
    pub fn insert(&self, base: u64, len: u64, device: SharedDevice) -> Result<(), BusError> {
        if len == 0 || base.checked_add(len).is_none() {
            return Err(BusError::BadRange { base, len });
        }
        let mut entries = self.entries.write().unwrap_or_else(|e| e.into_inner());
        let end = base + len;
        let overlaps_before = entries.range(..end).next_back().is_some_and(|(b, e)| b + e.len > base);
        if overlaps_before {
            return Err(BusError::Overlap { base, len });
        }
        entries.insert(base, Entry { len, device });
        Ok(())
    }

    /// Unmaps the range that starts at `base`.
    pub fn remove(&self, base: u64) -> bool {
        self.entries.write().unwrap_or_else(|e| e.into_inner()).remove(&base).is_some()
    }

    fn find(&self, addr: u64) -> Option<(u64, SharedDevice)> {
        let entries = self.entries.read().unwrap_or_else(|e| e.into_inner());
        let (base, entry) = entries.range(..=addr).next_back()?;
        (addr - base < entry.len).then(|| (addr - base, entry.device.clone()))
    }

    /// Dispatches a read. Returns whether a device claimed it; unclaimed reads give all ones.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((offset, device)) => {
                device.lock().unwrap_or_else(|e| e.into_inner()).read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Dispatches a write. Returns whether a device claimed it.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((offset, device)) => {
                device.lock().unwrap_or_else(|e| e.into_inner()).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// Reads a little-endian register value of 1..=8 bytes.
pub fn le_value(data: &[u8]) -> u64 {
    let mut bytes = [0u8; 8];
    let n = data.len().min(8);
    bytes[..n].copy_from_slice(&data[..n]);
    u64::from_le_bytes(bytes)
}

/// Fills `data` with the low bytes of `value`, little-endian.
pub fn fill_le(data: &mut [u8], value: u64) {
    let bytes = value.to_le_bytes();
    for (i, b) in data.iter_mut().enumerate() {
        *b = bytes.get(i).copied().unwrap_or(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Recorder {
        writes: Vec<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            fill_le(data, offset);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.writes.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatch_gives_offsets_and_unclaimed_reads_all_ones() {
        let bus = Bus::new();
        let dev = Arc::new(Mutex::new(Recorder { writes: vec![] }));
        bus.insert(0x3f8, 8, dev.clone()).unwrap();
        let mut data = [0u8; 1];
        assert!(bus.read(0x3fa, &mut data));
        assert_eq!(data, [2]);
        assert!(!bus.read(0x400, &mut data));
        assert_eq!(data, [0xff]);
        assert!(!bus.read(0x3f7, &mut data));
        assert!(bus.write(0x3ff, &[7]));
        assert!(!bus.write(0x3f7, &[7]));
        assert_eq!(dev.lock().unwrap().writes, [(7, vec![7])]);
    }

    #[test]
    fn overlaps_and_bad_ranges_are_refused() {
        let bus = Bus::new();
        let dev = Arc::new(Mutex::new(Recorder { writes: vec![] }));
        bus.insert(0x1000, 0x100, dev.clone()).unwrap();
        assert!(bus.insert(0x10ff, 1, dev.clone()).is_err());
        assert!(bus.insert(0xf01, 0x100, dev.clone()).is_err());
        assert!(bus.insert(0x800, 0, dev.clone()).is_err());
        assert!(bus.insert(u64::MAX, 2, dev.clone()).is_err());
        bus.insert(0x1100, 0x100, dev.clone()).unwrap();
        assert!(bus.remove(0x1000));
        bus.insert(0xf00, 0x100, dev).unwrap();
    }
}
