//! An emulated USB stick: a file as a USB 2.0 mass-storage device (Bulk-Only Transport, SCSI
//! transparent command set), as Linux's own file-backed storage gadget presents one
//! (`g_mass_storage`, 0525:a4a5). The guest's real `usb-storage` and `sd` drivers drive it like
//! any stick: enumeration on endpoint 0, then command blocks (CBW) on the bulk OUT endpoint,
//! data on either, a status (CSW) on bulk IN.
//!
//! ```text
//! OUT ep 2: CBW{tag, READ(10) lba 8, 4 blocks}   IN ep 1: 2048 bytes   IN ep 1: CSW{tag, 0}
//! ```
//!
//! SCSI: TEST UNIT READY, REQUEST SENSE, INQUIRY, MODE SENSE (6, 10), START STOP UNIT, PREVENT
//! ALLOW MEDIUM REMOVAL, READ CAPACITY (10, 16), READ FORMAT CAPACITIES, READ and WRITE (10,
//! 16), SYNCHRONIZE CACHE, VERIFY; anything else fails with ILLEGAL REQUEST sense, as a real
//! stick answers. Blocks are 512 bytes; a file of any size is rounded down to whole blocks.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use pleiades_protocol::usbip::{CmdSubmit, Direction};

use pleiades_protocol::wire::UsbSpeed;

use super::{Completion, Completions, DeviceInfo, UsbDevice};

pub const VENDOR_ID: u16 = 0x0525;
pub const PRODUCT_ID: u16 = 0xa4a5;
const BLOCK: u64 = 512;
const BULK_IN: u32 = 1;
const BULK_OUT: u32 = 2;
/// Largest data phase taken from one command (the guest asks for at most 240 blocks by default).
const MAX_DATA: u32 = 16 << 20;

const DEVICE_DESCRIPTOR: [u8; 18] = [
    18, 1, 0x00, 0x02, // USB 2.0
    0, 0, 0, 64, // class in the interface; ep0 64 bytes
    0x25, 0x05, 0xa5, 0xa4, // 0525:a4a5
    0x00, 0x01, 1, 2, 3, 1, // bcdDevice 1.00, strings 1-3, one configuration
];

const CONFIGURATION: [u8; 32] = [
    9, 2, 32, 0, 1, 1, 0, 0x80, 50, // one interface, bus powered, 100 mA
    9, 4, 0, 0, 2, 0x08, 0x06, 0x50, 0, // mass storage, SCSI transparent, Bulk-Only
    7, 5, 0x81, 2, 0x00, 0x02, 0, // bulk IN ep 1, 512 bytes
    7, 5, 0x02, 2, 0x00, 0x02, 0, // bulk OUT ep 2, 512 bytes
];

/// SCSI sense: key, additional sense code, qualifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Sense(u8, u8, u8);

const NO_SENSE: Sense = Sense(0, 0, 0);
const INVALID_COMMAND: Sense = Sense(0x05, 0x20, 0);
const INVALID_FIELD: Sense = Sense(0x05, 0x24, 0);
const OUT_OF_RANGE: Sense = Sense(0x05, 0x21, 0);
const READ_ERROR: Sense = Sense(0x03, 0x11, 0);
const WRITE_ERROR: Sense = Sense(0x03, 0x0c, 0);

/// Where the Bulk-Only Transport is.
#[derive(Debug)]
enum Phase {
    /// Waiting for a CBW on bulk OUT.
    Command,
    /// Data for the host, then the status.
    DataIn { data: Vec<u8>, sent: usize, tag: u32, asked: u32, status: u8 },
    /// Data from the host for a WRITE at `lba` (`None`: for a command that failed, taken and
    /// dropped), then the status.
    DataOut { tag: u32, lba: Option<u64>, expected: u32, received: Vec<u8>, status: u8 },
    /// The CSW, on the next bulk IN.
    Status { tag: u32, residue: u32, status: u8 },
}

/// The emulated stick.
pub struct EmulatedDisk {
    file: File,
    blocks: u64,
    read_only: bool,
    serial: String,
    configuration: u8,
    phase: Phase,
    sense: Sense,
}

impl std::fmt::Debug for EmulatedDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmulatedDisk").field("blocks", &self.blocks).field("phase", &self.phase).finish()
    }
}

fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn be_u64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().expect("8 bytes"))
}

/// A string descriptor (UTF-16LE).
fn string_descriptor(text: &str) -> Vec<u8> {
    let units: Vec<u16> = text.encode_utf16().take(126).collect();
    let mut out = vec![2 + 2 * units.len() as u8, 3];
    out.extend(units.iter().flat_map(|u| u.to_le_bytes()));
    out
}

impl EmulatedDisk {
    /// `path` as the stick's medium (written through unless `read_only`).
    pub fn open(path: &Path, read_only: bool) -> std::io::Result<Self> {
        let file = std::fs::OpenOptions::new().read(true).write(!read_only).open(path)?;
        let blocks = file.metadata()?.len() / BLOCK;
        if blocks == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{} is smaller than one 512-byte block", path.display()),
            ));
        }
        // A serial the guest keeps for the same medium (12 hex digits, as USB sticks have).
        let serial = format!("{:012X}", blocks.wrapping_mul(0x9E37_79B9) & 0xFFFF_FFFF_FFFF);
        Ok(Self { file, blocks, read_only, serial, configuration: 0, phase: Phase::Command, sense: NO_SENSE })
    }

    fn control(&mut self, urb: &CmdSubmit) -> Completion {
        let s = urb.setup;
        let (request_type, request) = (s[0], s[1]);
        let value = u16::from_le_bytes([s[2], s[3]]);
        let length = usize::from(u16::from_le_bytes([s[6], s[7]]));
        let reply = |mut data: Vec<u8>| {
            data.truncate(length);
            Completion::ok_in(data)
        };
        match (request_type, request) {
            // GET_DESCRIPTOR
            (0x80, 6) => match (value >> 8, value & 0xff) {
                (1, _) => reply(DEVICE_DESCRIPTOR.to_vec()),
                (2, 0) => reply(CONFIGURATION.to_vec()),
                (3, 0) => reply(vec![4, 3, 0x09, 0x04]),
                (3, 1) => reply(string_descriptor("Pleiades")),
                (3, 2) => reply(string_descriptor("Emulated USB disk")),
                (3, 3) => reply(string_descriptor(&self.serial)),
                // No device qualifier, no BOS: a stall, which the guest's core expects from a
                // high-speed-only device.
                _ => Completion::stall(),
            },
            // SET_CONFIGURATION
            (0x00, 9) if value <= 1 => {
                self.configuration = value as u8;
                self.phase = Phase::Command;
                Completion::ok_out(0)
            }
            // GET_CONFIGURATION
            (0x80, 8) => reply(vec![self.configuration]),
            // GET_STATUS (device, interface, endpoint)
            (0x80..=0x82, 0) => reply(vec![0, 0]),
            // SET_INTERFACE to the only alternate setting
            (0x01, 11) if value == 0 => Completion::ok_out(0),
            // CLEAR_FEATURE(ENDPOINT_HALT): nothing is ever halted here.
            (0x02, 1) => Completion::ok_out(0),
            // Bulk-Only Mass Storage Reset
            (0x21, 0xff) => {
                self.phase = Phase::Command;
                Completion::ok_out(0)
            }
            // Get Max LUN: one LUN.
            (0xa1, 0xfe) => reply(vec![0]),
            _ => Completion::stall(),
        }
    }

    fn bulk_out(&mut self, data: &[u8]) -> Completion {
        match std::mem::replace(&mut self.phase, Phase::Command) {
            Phase::Command => self.command_block(data),
            Phase::DataOut { tag, lba, expected, mut received, status } => {
                let take = (expected as usize - received.len()).min(data.len());
                received.extend_from_slice(&data[..take]);
                if received.len() < expected as usize {
                    self.phase = Phase::DataOut { tag, lba, expected, received, status };
                } else {
                    let status = match lba.map(|lba| self.file.write_all_at(&received, lba * BLOCK)) {
                        Some(Ok(())) => 0,
                        Some(Err(_)) => {
                            self.sense = WRITE_ERROR;
                            1
                        }
                        None => status,
                    };
                    self.phase = Phase::Status { tag, residue: 0, status };
                }
                Completion::ok_out(take as u32)
            }
            other => {
                // Data out of turn: the host resets the transport to recover.
                self.phase = other;
                Completion::stall()
            }
        }
    }

    fn bulk_in(&mut self, length: u32) -> Completion {
        match std::mem::replace(&mut self.phase, Phase::Command) {
            Phase::DataIn { data, sent, tag, asked, status } => {
                let end = (sent + length as usize).min(data.len());
                let chunk = data[sent..end].to_vec();
                if end < data.len() {
                    self.phase = Phase::DataIn { data, sent: end, tag, asked, status };
                } else {
                    let residue = asked.saturating_sub(data.len() as u32);
                    self.phase = Phase::Status { tag, residue, status };
                }
                Completion::ok_in(chunk)
            }
            Phase::Status { tag, residue, status } => {
                let mut csw = b"USBS".to_vec();
                csw.extend(tag.to_le_bytes());
                csw.extend(residue.to_le_bytes());
                csw.push(status);
                Completion::ok_in(csw)
            }
            other => {
                self.phase = other;
                Completion::stall()
            }
        }
    }

    /// A CBW: runs the command or prepares its data phase.
    fn command_block(&mut self, cbw: &[u8]) -> Completion {
        if cbw.len() != 31 || &cbw[..4] != b"USBC" {
            // Not a CBW: stall; the host's error handling resets us.
            return Completion::stall();
        }
        let tag = u32::from_le_bytes(cbw[4..8].try_into().expect("4 bytes"));
        let asked = u32::from_le_bytes(cbw[8..12].try_into().expect("4 bytes"));
        let to_host = cbw[12] & 0x80 != 0;
        let cb = &cbw[15..31];
        let cb_len = usize::from(cbw[14]).clamp(1, 16);
        let (result, sense) = self.scsi(&cb[..cb_len], asked, to_host);
        self.sense = sense;
        // The data phase the host announced happens whatever the command did: a failed command
        // gives a short (empty) IN transfer, or takes the OUT data and drops it; the status
        // says how it went.
        self.phase = match result {
            Scsi::In(mut data, status) if to_host => {
                data.truncate(asked as usize);
                Phase::DataIn { data, sent: 0, tag, asked, status }
            }
            Scsi::In(..) => {
                Phase::DataOut { tag, lba: None, expected: asked, received: Vec::new(), status: 2 }
            }
            Scsi::Out { lba, bytes } => {
                Phase::DataOut { tag, lba: Some(lba), expected: bytes, received: Vec::new(), status: 0 }
            }
            Scsi::Done(status) if asked > 0 && to_host => {
                Phase::DataIn { data: Vec::new(), sent: 0, tag, asked, status }
            }
            Scsi::Done(status) if asked > 0 => {
                Phase::DataOut { tag, lba: None, expected: asked, received: Vec::new(), status }
            }
            Scsi::Done(status) => Phase::Status { tag, residue: 0, status },
        };
        Completion::ok_out(31)
    }

    fn scsi(&mut self, cb: &[u8], asked: u32, to_host: bool) -> (Scsi, Sense) {
        let good = |data: Vec<u8>| (Scsi::In(data, 0), NO_SENSE);
        let fail = |sense: Sense| (Scsi::Done(1), sense);
        let at = |cb: &[u8], i: usize| cb.get(i).copied().unwrap_or(0);
        match cb[0] {
            // TEST UNIT READY, START STOP UNIT, PREVENT ALLOW MEDIUM REMOVAL, VERIFY(10)
            0x00 | 0x1b | 0x1e | 0x2f => (Scsi::Done(0), NO_SENSE),
            // SYNCHRONIZE CACHE(10)
            0x35 => match self.file.sync_data() {
                Ok(()) => (Scsi::Done(0), NO_SENSE),
                Err(_) => fail(WRITE_ERROR),
            },
            // REQUEST SENSE: fixed format, then the sense is cleared.
            0x03 => {
                let Sense(key, asc, ascq) = self.sense;
                let mut data = vec![0u8; 18];
                data[0] = 0x70;
                data[2] = key;
                data[7] = 10;
                data[12] = asc;
                data[13] = ascq;
                self.sense = NO_SENSE;
                (Scsi::In(data, 0), NO_SENSE)
            }
            // INQUIRY (standard data only)
            0x12 if at(cb, 1) & 1 == 0 => {
                let mut data = vec![0u8; 36];
                data[1] = 0x80; // removable
                data[2] = 0x06; // SPC-4
                data[3] = 0x02;
                data[4] = 31;
                data[8..16].copy_from_slice(b"Pleiades");
                data[16..32].copy_from_slice(b"Emulated disk   ");
                data[32..36].copy_from_slice(b"1.00");
                good(data)
            }
            0x12 => fail(INVALID_FIELD),
            // MODE SENSE(6) / (10): no pages, write protection as opened.
            0x1a => good(vec![3, 0, if self.read_only { 0x80 } else { 0 }, 0]),
            0x5a => good(vec![0, 6, 0, if self.read_only { 0x80 } else { 0 }, 0, 0, 0, 0]),
            // READ CAPACITY(10)
            0x25 => {
                let last = u32::try_from(self.blocks - 1).unwrap_or(u32::MAX);
                let mut data = last.to_be_bytes().to_vec();
                data.extend((BLOCK as u32).to_be_bytes());
                good(data)
            }
            // SERVICE ACTION IN: READ CAPACITY(16)
            0x9e if at(cb, 1) & 0x1f == 0x10 => {
                let mut data = vec![0u8; 32];
                data[..8].copy_from_slice(&(self.blocks - 1).to_be_bytes());
                data[8..12].copy_from_slice(&(BLOCK as u32).to_be_bytes());
                good(data)
            }
            // READ FORMAT CAPACITIES: the current (formatted) capacity.
            0x23 => {
                let mut data = vec![0, 0, 0, 8];
                data.extend(u32::try_from(self.blocks).unwrap_or(u32::MAX).to_be_bytes());
                data.extend([0x02, 0, 0x02, 0x00]);
                good(data)
            }
            // READ(10), READ(16), WRITE(10), WRITE(16)
            0x28 | 0x88 | 0x2a | 0x8a if cb.len() >= 10 => {
                let (lba, count) = if cb[0] & 0x80 != 0 && cb.len() >= 16 {
                    (be_u64(&cb[2..10]), u64::from(be_u32(&cb[10..14])))
                } else {
                    (u64::from(be_u32(&cb[2..6])), u64::from(u16::from_be_bytes([cb[7], cb[8]])))
                };
                let bytes = count * BLOCK;
                if lba.checked_add(count).is_none_or(|end| end > self.blocks) {
                    return fail(OUT_OF_RANGE);
                }
                let write = cb[0] == 0x2a || cb[0] == 0x8a;
                // The CBW's direction and length must match the command (the BOT's thirteen
                // cases collapse to these): a mismatch is a phase error.
                if bytes > u64::from(MAX_DATA) || bytes != u64::from(asked) || (count > 0 && write == to_host)
                {
                    return (Scsi::Done(2), INVALID_FIELD);
                }
                if write {
                    if self.read_only {
                        return fail(Sense(0x07, 0x27, 0));
                    }
                    if count == 0 {
                        return (Scsi::Done(0), NO_SENSE);
                    }
                    (Scsi::Out { lba, bytes: bytes as u32 }, NO_SENSE)
                } else {
                    let mut data = vec![0u8; bytes as usize];
                    match self.file.read_exact_at(&mut data, lba * BLOCK) {
                        Ok(()) => good(data),
                        Err(_) => fail(READ_ERROR),
                    }
                }
            }
            _ => fail(INVALID_COMMAND),
        }
    }
}

/// What a SCSI command does next.
enum Scsi {
    /// Data for the host, then status `u8` (0 good, 1 failed).
    In(Vec<u8>, u8),
    /// Data from the host to write at `lba`.
    Out { lba: u64, bytes: u32 },
    /// No data: the status (0 good, 1 failed, 2 phase error).
    Done(u8),
}

impl UsbDevice for EmulatedDisk {
    fn info(&self) -> DeviceInfo {
        DeviceInfo {
            vendor_id: VENDOR_ID,
            product_id: PRODUCT_ID,
            class: 0,
            interfaces: vec![0x08],
            speed: UsbSpeed::High,
            product: "Pleiades emulated USB disk".into(),
        }
    }

    fn park(self: Box<Self>) -> Option<Box<dyn UsbDevice>> {
        Some(self)
    }

    /// The disk answers every URB at once.
    fn submit(&mut self, urb: CmdSubmit, done: &Completions) {
        done.complete(urb.seqnum, self.answer(&urb));
    }
}

impl EmulatedDisk {
    /// Runs one URB to completion.
    pub fn answer(&mut self, urb: &CmdSubmit) -> Completion {
        match (urb.ep, urb.direction) {
            (0, _) => self.control(urb),
            (BULK_IN, Direction::In) => self.bulk_in(urb.transfer_buffer_length),
            (BULK_OUT, Direction::Out) => self.bulk_out(&urb.data),
            _ => Completion::stall(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pleiades_protocol::usbip::{Pdu, UsbipLink};

    /// Drives the disk as the guest's drivers do, through a checked USB/IP link both ways.
    struct Host {
        disk: EmulatedDisk,
        link: UsbipLink,
        seqnum: u32,
        tag: u32,
    }

    impl Host {
        fn urb(
            &mut self,
            ep: u32,
            direction: Direction,
            length: u32,
            setup: [u8; 8],
            data: Vec<u8>,
        ) -> (i32, Vec<u8>, u32) {
            self.seqnum += 1;
            let submit = Pdu::Submit(CmdSubmit::new(self.seqnum, 1, ep, direction, length, setup, data));
            let Pdu::Submit(urb) = self.link.from_guest(&submit.encode()).unwrap().remove(0) else {
                unreachable!()
            };
            let ret = self.disk.answer(&urb).ret(&urb);
            let Pdu::Ret(ret) = self.link.from_device(&Pdu::Ret(ret).encode()).unwrap().remove(0) else {
                unreachable!()
            };
            (ret.status, ret.data, ret.actual_length)
        }

        fn control_in(&mut self, setup: [u8; 8]) -> Vec<u8> {
            let length = u32::from(u16::from_le_bytes([setup[6], setup[7]]));
            let (status, data, _) = self.urb(0, Direction::In, length, setup, Vec::new());
            assert_eq!(status, 0, "{setup:?}");
            data
        }

        /// One SCSI command through the Bulk-Only Transport: its data and its CSW status.
        fn scsi(&mut self, cb: &[u8], length: u32, to_host: bool, out: Vec<u8>) -> (Vec<u8>, u8) {
            self.tag += 1;
            let mut cbw = b"USBC".to_vec();
            cbw.extend(self.tag.to_le_bytes());
            cbw.extend(length.to_le_bytes());
            cbw.push(if to_host { 0x80 } else { 0 });
            cbw.push(0);
            cbw.push(cb.len() as u8);
            cbw.extend(cb);
            cbw.resize(31, 0);
            assert_eq!(self.urb(BULK_OUT, Direction::Out, 31, [0; 8], cbw).0, 0);
            let mut data = Vec::new();
            if length > 0 && to_host {
                let (status, chunk, _) = self.urb(BULK_IN, Direction::In, length, [0; 8], Vec::new());
                assert_eq!(status, 0);
                data = chunk;
            } else if length > 0 {
                assert_eq!(self.urb(BULK_OUT, Direction::Out, length, [0; 8], out).0, 0);
            }
            let (status, csw, _) = self.urb(BULK_IN, Direction::In, 13, [0; 8], Vec::new());
            assert_eq!((status, &csw[..4]), (0, &b"USBS"[..]));
            assert_eq!(
                u32::from_le_bytes(csw[4..8].try_into().unwrap()),
                self.tag,
                "the CSW's tag is the CBW's"
            );
            (data, csw[12])
        }
    }

    fn host(blocks: u64, read_only: bool) -> (Host, tempfile::NamedTempFile) {
        let image = tempfile::NamedTempFile::new().unwrap();
        let content: Vec<u8> = (0..blocks * BLOCK).map(|i| (i / BLOCK) as u8 ^ (i % 251) as u8).collect();
        std::fs::write(image.path(), content).unwrap();
        let disk = EmulatedDisk::open(image.path(), read_only).unwrap();
        (Host { disk, link: UsbipLink::new(), seqnum: 0, tag: 0 }, image)
    }

    #[test]
    fn it_enumerates_as_a_mass_storage_stick() {
        let (mut h, _image) = host(64, false);
        let device = h.control_in([0x80, 6, 0, 1, 0, 0, 18, 0]);
        assert_eq!(device, DEVICE_DESCRIPTOR);
        assert_eq!(
            (u16::from_le_bytes([device[8], device[9]]), u16::from_le_bytes([device[10], device[11]])),
            (0x0525, 0xa4a5)
        );
        // The configuration in two steps, as Linux reads it: its head, then all of it.
        let head = h.control_in([0x80, 6, 0, 2, 0, 0, 9, 0]);
        let total = u16::from_le_bytes([head[2], head[3]]);
        let configuration = h.control_in([0x80, 6, 0, 2, 0, 0, total as u8, 0]);
        assert_eq!(configuration.len(), 32);
        assert_eq!(&configuration[14..17], &[0x08, 0x06, 0x50], "mass storage, SCSI, Bulk-Only");
        assert_eq!(h.control_in([0x80, 6, 2, 3, 0x09, 0x04, 255, 0]), string_descriptor("Emulated USB disk"));
        assert_eq!(
            h.urb(0, Direction::Out, 0, [0, 9, 1, 0, 0, 0, 0, 0], Vec::new()).0,
            0,
            "SET_CONFIGURATION 1"
        );
        assert_eq!(h.control_in([0xa1, 0xfe, 0, 0, 0, 0, 1, 0]), [0], "one LUN");
        // Unknown requests stall, as on real hardware.
        assert_eq!(
            h.urb(0, Direction::In, 10, [0x80, 6, 0, 6, 0, 0, 10, 0], Vec::new()).0,
            crate::usb::STALL
        );
    }

    #[test]
    fn scsi_reads_and_writes_reach_the_file() {
        let (mut h, image) = host(64, false);
        let (inquiry, status) = h.scsi(&[0x12, 0, 0, 0, 36, 0], 36, true, Vec::new());
        assert_eq!((status, &inquiry[8..16]), (0, &b"Pleiades"[..]));
        assert_eq!(h.scsi(&[0x00, 0, 0, 0, 0, 0], 0, false, Vec::new()).1, 0, "ready");
        let (capacity, _) = h.scsi(&[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], 8, true, Vec::new());
        assert_eq!((be_u32(&capacity[..4]), be_u32(&capacity[4..])), (63, 512));
        // READ(10) of blocks 8-11 is the file's bytes there.
        let (read, status) = h.scsi(&[0x28, 0, 0, 0, 0, 8, 0, 0, 4, 0], 2048, true, Vec::new());
        assert_eq!(status, 0);
        assert_eq!(read, std::fs::read(image.path()).unwrap()[8 * 512..12 * 512]);
        // WRITE(10) of blocks 2-3 lands in the file.
        let written: Vec<u8> = (0..1024).map(|i| (i * 7) as u8).collect();
        let status = h.scsi(&[0x2a, 0, 0, 0, 0, 2, 0, 0, 2, 0], 1024, false, written.clone()).1;
        assert_eq!(status, 0);
        assert_eq!(std::fs::read(image.path()).unwrap()[1024..2048], written[..]);
        assert_eq!(h.scsi(&[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0], 0, false, Vec::new()).1, 0, "synchronize");
        // Past the end: CHECK CONDITION, and REQUEST SENSE says why (LBA out of range).
        assert_eq!(h.scsi(&[0x28, 0, 0, 0, 0, 63, 0, 0, 2, 0], 1024, true, Vec::new()).1, 1);
        let (sense, _) = h.scsi(&[0x03, 0, 0, 0, 18, 0], 18, true, Vec::new());
        assert_eq!((sense[2], sense[12]), (0x05, 0x21));
        // An unknown command: ILLEGAL REQUEST, INVALID COMMAND OPERATION CODE.
        assert_eq!(h.scsi(&[0xd9, 0, 0, 0, 0, 0], 0, false, Vec::new()).1, 1);
        let (sense, _) = h.scsi(&[0x03, 0, 0, 0, 18, 0], 18, true, Vec::new());
        assert_eq!((sense[2], sense[12]), (0x05, 0x20));
    }

    #[test]
    fn a_read_only_stick_refuses_writes_and_says_so() {
        let (mut h, image) = host(8, true);
        let before = std::fs::read(image.path()).unwrap();
        let (mode, _) = h.scsi(&[0x1a, 0, 0x3f, 0, 4, 0], 4, true, Vec::new());
        assert_eq!(mode[2] & 0x80, 0x80, "write protected");
        assert_eq!(h.scsi(&[0x2a, 0, 0, 0, 0, 0, 0, 0, 1, 0], 512, false, vec![0; 512]).1, 1);
        assert_eq!(std::fs::read(image.path()).unwrap(), before);
    }

    #[test]
    fn garbage_on_the_bulk_pipe_stalls_and_a_reset_recovers() {
        let (mut h, _image) = host(8, false);
        assert_eq!(h.urb(BULK_OUT, Direction::Out, 5, [0; 8], b"hello".to_vec()).0, crate::usb::STALL);
        assert_eq!(h.urb(BULK_IN, Direction::In, 13, [0; 8], Vec::new()).0, crate::usb::STALL, "no CSW owed");
        assert_eq!(h.urb(0, Direction::Out, 0, [0x21, 0xff, 0, 0, 0, 0, 0, 0], Vec::new()).0, 0, "reset");
        assert_eq!(h.scsi(&[0x00, 0, 0, 0, 0, 0], 0, false, Vec::new()).1, 0);
    }

    /// One URB of an arbitrary guest: often a well-formed CBW with any SCSI command (so the
    /// SCSI parser is reached), otherwise anything on any endpoint.
    fn any_urb() -> impl proptest::strategy::Strategy<Value = (u32, Direction, u32, [u8; 8], Vec<u8>)> {
        use proptest::prelude::*;
        let cbw = (any::<u32>(), any::<bool>(), 1u8..=16, proptest::collection::vec(any::<u8>(), 16))
            .prop_map(|(length, to_host, cb_len, mut cb)| {
                // Reads and writes of any block range, among any other opcode.
                cb[0] = [0x28, 0x2a, 0x88, 0x8a, 0x25, 0x12, 0x03, 0x1a, cb[0]][usize::from(cb[0] % 9)];
                let mut data = b"USBC".to_vec();
                data.extend(7u32.to_le_bytes());
                data.extend((length % (1 << 18)).to_le_bytes());
                data.push(if to_host { 0x80 } else { 0 });
                data.push(0);
                data.push(cb_len);
                data.extend(&cb);
                (BULK_OUT, Direction::Out, 31, [0; 8], data)
            });
        let anything = (
            0u32..4,
            any::<bool>(),
            0u32..(1 << 17),
            any::<[u8; 8]>(),
            proptest::collection::vec(any::<u8>(), 0..600),
        )
            .prop_map(|(ep, in_, length, setup, data)| {
                let direction = if in_ { Direction::In } else { Direction::Out };
                let data = if in_ { Vec::new() } else { data };
                let length = if in_ { length } else { data.len() as u32 };
                (ep, direction, length, setup, data)
            });
        prop_oneof![cbw, anything]
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(200))]
        /// Whatever a guest submits: no panic, never more than asked for, and the medium keeps
        /// its size (no write lands past its end).
        #[test]
        fn any_urb_sequence_is_answered_within_bounds(urbs in proptest::collection::vec(any_urb(), 1..40)) {
            let (mut h, image) = host(16, false);
            for (ep, direction, length, setup, data) in urbs {
                let (_, answer, actual) = h.urb(ep, direction, length, setup, data);
                proptest::prop_assert!(answer.len() as u32 <= length && actual <= length);
            }
            proptest::prop_assert_eq!(std::fs::metadata(image.path()).unwrap().len(), 16 * BLOCK);
        }
    }
}
