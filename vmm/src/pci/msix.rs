//! MSI-X: the vector table and pending-bit array a device exposes in its BAR, and the enable /
//! function-mask bits from its capability.
//!
//! Interrupts of in-process devices are raised from userspace (the worker calls the transport's
//! `Interrupt`), so masking is exact: a masked vector sets its pending bit instead of firing,
//! and unmasking it fires it.

/// Bytes per table entry: address low/high, data, vector control.
pub const MSIX_ENTRY_SIZE: u64 = 16;
const VECTOR_CTRL_MASKED: u32 = 1;
/// Message control bits in the capability.
pub const MSIX_ENABLE: u16 = 1 << 15;
pub const MSIX_FUNCTION_MASK: u16 = 1 << 14;

/// An MSI message: where and what the device writes to interrupt a CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MsiMessage {
    pub address: u64,
    pub data: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    address_lo: u32,
    address_hi: u32,
    data: u32,
    control: u32,
}

impl Default for Entry {
    fn default() -> Self {
        // Vectors come out of reset masked.
        Self { address_lo: 0, address_hi: 0, data: 0, control: VECTOR_CTRL_MASKED }
    }
}

/// What a table write changed, for the transport to act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableWrite {
    /// Nothing that matters (out of range, read-only bits).
    Nothing,
    /// The message of `vector` changed: update its route.
    Message(u16),
    /// `vector` was unmasked while it had a pending interrupt: fire it now.
    UnmaskedPending(u16),
}

/// The MSI-X state of one function.
#[derive(Debug, Clone)]
pub struct Msix {
    entries: Vec<Entry>,
    pending: Vec<bool>,
    enabled: bool,
    function_masked: bool,
}

impl Msix {
    pub fn new(vectors: u16) -> Self {
        let n = usize::from(vectors);
        Self {
            entries: vec![Entry::default(); n],
            pending: vec![false; n],
            enabled: false,
            function_masked: false,
        }
    }

    pub fn vectors(&self) -> u16 {
        self.entries.len() as u16
    }

    /// The table's size in the BAR.
    pub fn table_size(&self) -> u64 {
        self.entries.len() as u64 * MSIX_ENTRY_SIZE
    }

    /// The PBA's size in the BAR (whole qwords).
    pub fn pba_size(&self) -> u64 {
        self.entries.len().div_ceil(64) as u64 * 8
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    pub fn message(&self, vector: u16) -> Option<MsiMessage> {
        let e = self.entries.get(usize::from(vector))?;
        Some(MsiMessage { address: u64::from(e.address_lo) | u64::from(e.address_hi) << 32, data: e.data })
    }

    /// Whether `vector` may fire now (enabled, function and vector unmasked).
    pub fn can_fire(&self, vector: u16) -> bool {
        self.enabled
            && !self.function_masked
            && self.entries.get(usize::from(vector)).is_some_and(|e| e.control & VECTOR_CTRL_MASKED == 0)
    }

    /// Records an interrupt that could not fire.
    pub fn set_pending(&mut self, vector: u16) {
        if let Some(p) = self.pending.get_mut(usize::from(vector)) {
            *p = true;
        }
    }

    /// Applies the capability's message control; returns the vectors to fire now (pending
    /// ones that became deliverable).
    pub fn set_control(&mut self, control: u16) -> Vec<u16> {
        self.enabled = control & MSIX_ENABLE != 0;
        self.function_masked = control & MSIX_FUNCTION_MASK != 0;
        self.take_deliverable()
    }

    fn take_deliverable(&mut self) -> Vec<u16> {
        let mut fire = Vec::new();
        for v in 0..self.vectors() {
            if self.pending[usize::from(v)] && self.can_fire(v) {
                self.pending[usize::from(v)] = false;
                fire.push(v);
            }
        }
        fire
    }

    /// Reads the table at `offset` (4- or 8-byte accesses; others read zero).
    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let index = (offset / MSIX_ENTRY_SIZE) as usize;
        let Some(e) = self.entries.get(index) else { return };
        let words = [e.address_lo, e.address_hi, e.data, e.control];
        let word = ((offset % MSIX_ENTRY_SIZE) / 4) as usize;
        match data.len() {
            4 if offset.is_multiple_of(4) => data.copy_from_slice(&words[word].to_le_bytes()),
            8 if offset.is_multiple_of(8) => {
                data[..4].copy_from_slice(&words[word].to_le_bytes());
                data[4..].copy_from_slice(&words[word + 1].to_le_bytes());
            }
            _ => {}
        }
    }

    /// Writes the table at `offset`.
    pub fn write_table(&mut self, offset: u64, data: &[u8]) -> TableWrite {
        let index = (offset / MSIX_ENTRY_SIZE) as usize;
        if index >= self.entries.len() {
            return TableWrite::Nothing;
        }
        let word = ((offset % MSIX_ENTRY_SIZE) / 4) as usize;
        let values: Vec<(usize, u32)> = match data.len() {
            4 if offset.is_multiple_of(4) => {
                vec![(word, u32::from_le_bytes([data[0], data[1], data[2], data[3]]))]
            }
            8 if offset.is_multiple_of(8) => vec![
                (word, u32::from_le_bytes([data[0], data[1], data[2], data[3]])),
                (word + 1, u32::from_le_bytes([data[4], data[5], data[6], data[7]])),
            ],
            _ => return TableWrite::Nothing,
        };
        let before = self.entries[index];
        for (word, value) in values {
            let e = &mut self.entries[index];
            match word {
                0 => e.address_lo = value & !0x3,
                1 => e.address_hi = value,
                2 => e.data = value,
                _ => e.control = value & VECTOR_CTRL_MASKED,
            }
        }
        let after = self.entries[index];
        let vector = index as u16;
        let unmasked = before.control & VECTOR_CTRL_MASKED != 0 && after.control & VECTOR_CTRL_MASKED == 0;
        if unmasked && self.pending[index] && self.can_fire(vector) {
            self.pending[index] = false;
            return TableWrite::UnmaskedPending(vector);
        }
        if (before.address_lo, before.address_hi, before.data)
            != (after.address_lo, after.address_hi, after.data)
        {
            return TableWrite::Message(vector);
        }
        TableWrite::Nothing
    }

    /// Reads the pending-bit array.
    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let mut bits = vec![0u8; self.pba_size() as usize];
        for (v, pending) in self.pending.iter().enumerate() {
            if *pending {
                bits[v / 8] |= 1 << (v % 8);
            }
        }
        let Ok(start) = usize::try_from(offset) else { return };
        for (i, b) in data.iter_mut().enumerate() {
            *b = start.checked_add(i).and_then(|at| bits.get(at)).copied().unwrap_or(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vectors_start_masked_and_messages_are_recorded() {
        let mut msix = Msix::new(3);
        assert_eq!((msix.table_size(), msix.pba_size()), (48, 8));
        let mut data = [0u8; 4];
        msix.read_table(12, &mut data);
        assert_eq!(u32::from_le_bytes(data), 1);
        assert_eq!(msix.write_table(16, &0xfee0_0000u32.to_le_bytes()), TableWrite::Message(1));
        assert_eq!(msix.write_table(24, &0x4041u32.to_le_bytes()), TableWrite::Message(1));
        assert_eq!(msix.message(1), Some(MsiMessage { address: 0xfee0_0000, data: 0x4041 }));
        // 8-byte write of address lo+hi.
        assert_eq!(msix.write_table(32, &0x1_fee0_1000u64.to_le_bytes()), TableWrite::Message(2));
        assert_eq!(msix.message(2).unwrap().address, 0x1_fee0_1000);
        assert!(!msix.can_fire(1), "disabled and masked");
    }

    #[test]
    fn pending_vectors_fire_on_unmask() {
        let mut msix = Msix::new(2);
        msix.set_control(MSIX_ENABLE);
        msix.set_pending(0);
        let mut pba = [0u8; 8];
        msix.read_pba(0, &mut pba);
        assert_eq!(pba[0], 1);
        assert_eq!(msix.write_table(12, &0u32.to_le_bytes()), TableWrite::UnmaskedPending(0));
        msix.read_pba(0, &mut pba);
        assert_eq!(pba[0], 0);
        assert!(msix.can_fire(0));
        // Function mask holds vector 0 back; clearing it delivers.
        msix.set_control(MSIX_ENABLE | MSIX_FUNCTION_MASK);
        assert!(!msix.can_fire(0));
        msix.set_pending(0);
        assert_eq!(msix.set_control(MSIX_ENABLE), vec![0]);
    }

    #[test]
    fn garbage_accesses_are_harmless() {
        let mut msix = Msix::new(1);
        assert_eq!(msix.write_table(u64::MAX, &[1, 2, 3, 4]), TableWrite::Nothing);
        assert_eq!(msix.write_table(1, &[1, 2, 3, 4]), TableWrite::Nothing);
        assert_eq!(msix.write_table(0, &[1, 2]), TableWrite::Nothing);
        let mut big = [0u8; 8];
        msix.read_table(u64::MAX - 3, &mut big);
        msix.read_pba(u64::MAX, &mut big);
        msix.set_pending(99);
    }
}
