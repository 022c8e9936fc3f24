//! A type-0 PCI configuration space: 64 dwords with a write mask per bit, so that every guest
//! write, garbage included, can only change what a real device would let it change.
//!
//! BAR sizing falls out of the masks: the guest writes all ones, the masked bits stay zero, and
//! the read-back value tells the size. Only one BAR kind exists here: a 64-bit memory BAR in
//! BAR0/BAR1, which is all a virtio-pci device needs.

/// Dword indices and bits of the header.
pub const REG_ID: usize = 0;
pub const REG_COMMAND_STATUS: usize = 1;
pub const REG_CLASS_REVISION: usize = 2;
pub const REG_HEADER: usize = 3;
pub const REG_BAR0: usize = 4;
pub const REG_BAR1: usize = 5;
pub const REG_SUBSYSTEM: usize = 11;
pub const REG_CAP_POINTER: usize = 13;
pub const REG_INTERRUPT: usize = 15;
pub const COMMAND_IO: u32 = 1 << 0;
pub const COMMAND_MEMORY: u32 = 1 << 1;
pub const COMMAND_BUS_MASTER: u32 = 1 << 2;
pub const COMMAND_INTX_DISABLE: u32 = 1 << 10;
pub const STATUS_CAP_LIST: u32 = 1 << 20;
pub const BAR_MEM_64BIT: u32 = 0b100;
/// Capabilities start right after the standard header.
pub const FIRST_CAP_OFFSET: usize = 0x40;
pub const CONFIG_SPACE_SIZE: usize = 256;
const DWORDS: usize = CONFIG_SPACE_SIZE / 4;

/// Identity of a PCI function.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciIdentity {
    pub vendor: u16,
    pub device: u16,
    pub class: u8,
    pub subclass: u8,
    pub prog_if: u8,
    pub revision: u8,
    pub subsystem_vendor: u16,
    pub subsystem: u16,
}

/// Capability ids.
pub const CAP_ID_VENDOR: u8 = 0x09;
pub const CAP_ID_MSIX: u8 = 0x11;

/// The configuration space of one function.
#[derive(Debug, Clone)]
pub struct PciConfiguration {
    regs: [u32; DWORDS],
    writable: [u32; DWORDS],
    bar_size: Option<u64>,
    next_cap: usize,
    last_cap: Option<usize>,
}

impl PciConfiguration {
    pub fn new(id: PciIdentity) -> Self {
        let mut regs = [0u32; DWORDS];
        let mut writable = [0u32; DWORDS];
        regs[REG_ID] = u32::from(id.vendor) | u32::from(id.device) << 16;
        regs[REG_CLASS_REVISION] = u32::from(id.revision)
            | u32::from(id.prog_if) << 8
            | u32::from(id.subclass) << 16
            | u32::from(id.class) << 24;
        regs[REG_SUBSYSTEM] = u32::from(id.subsystem_vendor) | u32::from(id.subsystem) << 16;
        writable[REG_COMMAND_STATUS] =
            COMMAND_IO | COMMAND_MEMORY | COMMAND_BUS_MASTER | COMMAND_INTX_DISABLE;
        writable[REG_INTERRUPT] = 0xff;
        Self { regs, writable, bar_size: None, next_cap: FIRST_CAP_OFFSET, last_cap: None }
    }

    /// Adds the 64-bit memory BAR (BAR0/BAR1) of `size` bytes (a power of two, at least 4 KiB).
    pub fn add_bar64(&mut self, size: u64) {
        debug_assert!(size.is_power_of_two() && size >= 0x1000);
        let mask = !(size - 1);
        self.regs[REG_BAR0] = BAR_MEM_64BIT;
        self.writable[REG_BAR0] = mask as u32 & !0xf;
        self.writable[REG_BAR1] = (mask >> 32) as u32;
        self.bar_size = Some(size);
    }

    /// Sets the BAR's guest address (the VMM's initial assignment).
    pub fn set_bar_address(&mut self, addr: u64) {
        self.regs[REG_BAR0] = (addr as u32 & self.writable[REG_BAR0]) | BAR_MEM_64BIT;
        self.regs[REG_BAR1] = (addr >> 32) as u32 & self.writable[REG_BAR1];
    }

    /// The BAR's address and size, if there is one.
    pub fn bar(&self) -> Option<(u64, u64)> {
        let size = self.bar_size?;
        let addr = u64::from(self.regs[REG_BAR0] & !0xf) | u64::from(self.regs[REG_BAR1]) << 32;
        Some((addr, size))
    }

    /// Where the BAR should be decoded now: memory decoding on, and a programmed address (not
    /// the all-ones sizing pattern, not wrapping around).
    pub fn active_bar(&self) -> Option<(u64, u64)> {
        let (addr, size) = self.bar()?;
        let sizing = addr == (!(size - 1)) & !0xf;
        (self.memory_enabled() && addr != 0 && !sizing && addr.checked_add(size).is_some())
            .then_some((addr, size))
    }

    pub fn memory_enabled(&self) -> bool {
        self.regs[REG_COMMAND_STATUS] & COMMAND_MEMORY != 0
    }

    /// Sets command register bits as firmware would (memory decoding on at boot).
    pub fn set_command(&mut self, bits: u32) {
        self.regs[REG_COMMAND_STATUS] |= bits & self.writable[REG_COMMAND_STATUS];
    }

    /// Appends a capability; `body` starts after the id and next-pointer bytes. `writable`
    /// gives masks per dword of the capability (id/next bits are never writable). Returns its
    /// offset, or `None` when the space is full.
    pub fn add_capability(&mut self, id: u8, body: &[u8], writable: &[u32]) -> Option<usize> {
        let offset = self.next_cap;
        let len = 2 + body.len();
        if offset + len > CONFIG_SPACE_SIZE {
            return None;
        }
        let mut bytes = vec![id, 0];
        bytes.extend_from_slice(body);
        for (i, b) in bytes.iter().enumerate() {
            self.set_byte(offset + i, *b);
        }
        for (i, mask) in writable.iter().enumerate() {
            let reg = offset / 4 + i;
            if reg < DWORDS {
                self.writable[reg] |= mask & if i == 0 { 0xffff_0000 } else { 0xffff_ffff };
            }
        }
        match self.last_cap {
            Some(last) => self.set_byte(last + 1, offset as u8),
            None => {
                self.regs[REG_CAP_POINTER] = offset as u32;
                self.regs[REG_COMMAND_STATUS] |= STATUS_CAP_LIST;
            }
        }
        self.last_cap = Some(offset);
        self.next_cap = (offset + len + 3) & !3;
        Some(offset)
    }

    fn set_byte(&mut self, offset: usize, value: u8) {
        let shift = (offset % 4) * 8;
        let reg = &mut self.regs[offset / 4];
        *reg = (*reg & !(0xff << shift)) | u32::from(value) << shift;
    }

    /// Reads dword `reg`; out of range reads all ones.
    pub fn read(&self, reg: usize) -> u32 {
        self.regs.get(reg).copied().unwrap_or(0xffff_ffff)
    }

    /// Writes `data` at byte `offset` of dword `reg`, through the write mask.
    pub fn write(&mut self, reg: usize, offset: usize, data: &[u8]) {
        if reg >= DWORDS || offset >= 4 || offset + data.len() > 4 {
            return;
        }
        let mut value = 0u32;
        let mut mask = 0u32;
        for (i, b) in data.iter().enumerate() {
            let shift = (offset + i) * 8;
            value |= u32::from(*b) << shift;
            mask |= 0xff << shift;
        }
        let mask = mask & self.writable[reg];
        self.regs[reg] = (self.regs[reg] & !mask) | (value & mask);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> PciIdentity {
        PciIdentity {
            vendor: 0x1af4,
            device: 0x1044,
            class: 0xff,
            subclass: 0,
            prog_if: 0,
            revision: 1,
            subsystem_vendor: 0x1af4,
            subsystem: 0x40,
        }
    }

    #[test]
    fn identity_and_read_only_registers() {
        let mut cfg = PciConfiguration::new(id());
        assert_eq!(cfg.read(REG_ID), 0x1044_1af4);
        assert_eq!(cfg.read(REG_CLASS_REVISION), 0xff00_0001);
        assert_eq!(cfg.read(REG_SUBSYSTEM), 0x0040_1af4);
        cfg.write(REG_ID, 0, &[0xff; 4]);
        cfg.write(REG_CLASS_REVISION, 0, &[0; 4]);
        assert_eq!(cfg.read(REG_ID), 0x1044_1af4);
        assert_eq!(cfg.read(REG_CLASS_REVISION), 0xff00_0001);
        cfg.write(REG_COMMAND_STATUS, 0, &[0xff, 0xff, 0xff, 0xff]);
        assert_eq!(cfg.read(REG_COMMAND_STATUS), 0x0407);
        assert_eq!(cfg.read(64), 0xffff_ffff);
        cfg.write(64, 0, &[1]);
        cfg.write(3, 3, &[1, 2]);
    }

    #[test]
    fn bar_sizing_and_placement() {
        let mut cfg = PciConfiguration::new(id());
        cfg.add_bar64(0x8000);
        cfg.set_bar_address(0xc000_0000);
        assert_eq!(cfg.bar(), Some((0xc000_0000, 0x8000)));
        assert_eq!(cfg.active_bar(), None, "memory decoding is off");
        cfg.set_command(COMMAND_MEMORY);
        assert_eq!(cfg.active_bar(), Some((0xc000_0000, 0x8000)));
        // Sizing: all ones in, size mask out.
        cfg.write(REG_BAR0, 0, &[0xff; 4]);
        cfg.write(REG_BAR1, 0, &[0xff; 4]);
        assert_eq!(cfg.read(REG_BAR0), 0xffff_8004);
        assert_eq!(cfg.read(REG_BAR1), 0xffff_ffff);
        assert_eq!(cfg.active_bar(), None, "the sizing pattern is not an address");
        // Move it.
        cfg.write(REG_BAR0, 0, &0xd000_1234u32.to_le_bytes());
        cfg.write(REG_BAR1, 0, &[0; 4]);
        assert_eq!(cfg.active_bar(), Some((0xd000_0000, 0x8000)));
        // Byte-wise writes work too.
        cfg.write(REG_BAR0, 3, &[0xe0]);
        assert_eq!(cfg.bar(), Some((0xe000_0000, 0x8000)));
    }

    #[test]
    fn capabilities_are_chained() {
        let mut cfg = PciConfiguration::new(id());
        let a = cfg.add_capability(CAP_ID_VENDOR, &[14, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[]).unwrap();
        let b = cfg.add_capability(CAP_ID_MSIX, &[3, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[0xc000_0000]).unwrap();
        assert_eq!((a, b), (0x40, 0x50));
        assert_eq!(cfg.read(REG_CAP_POINTER), 0x40);
        assert_ne!(cfg.read(REG_COMMAND_STATUS) & STATUS_CAP_LIST, 0);
        assert_eq!(cfg.read(0x40 / 4) & 0xffff, 0x5009);
        assert_eq!(cfg.read(0x50 / 4), 0x0003_0011);
        cfg.write(0x50 / 4, 0, &[0xff; 4]);
        assert_eq!(cfg.read(0x50 / 4), 0xc003_0011);
    }
}
