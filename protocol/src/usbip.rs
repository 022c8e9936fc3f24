//! USB/IP, sans I/O: the message set a redirected USB device speaks between the guest kernel's
//! `vhci-hcd` (the USB/IP *client*: it submits URBs) and the device's side (the thin client's
//! real or emulated device: it answers them). The VM process relays every device's stream and
//! checks it here ([`UsbipLink`]), so neither a hostile guest nor a hostile client can make it
//! buffer without bound, answer a request that was never made, or return more than was asked.
//!
//! The layout is the Linux kernel's (`Documentation/usb/usbip_protocol.rst`): a 48-byte header
//! of big-endian 32-bit fields, then the transfer buffer (an OUT submit's data, an IN answer's
//! data), then isochronous packet descriptors (16 bytes each).
//!
//! ```text
//! guest (vhci-hcd)                       device side (client)
//!   CMD_SUBMIT{seq 7, IN ep 1, 512}  ──▶
//!                                    ◀──  RET_SUBMIT{seq 7, status 0, actual 512} + 512 bytes
//!   CMD_UNLINK{seq 8, unlink 9}      ──▶
//!                                    ◀──  RET_UNLINK{seq 8, status -ECONNRESET}
//! ```

use std::collections::HashMap;

/// The four commands.
pub const CMD_SUBMIT: u32 = 1;
pub const CMD_UNLINK: u32 = 2;
pub const RET_SUBMIT: u32 = 3;
pub const RET_UNLINK: u32 = 4;
/// Every PDU's header.
pub const HEADER_LEN: usize = 48;
/// One isochronous packet descriptor.
pub const ISO_DESCRIPTOR_LEN: usize = 16;
/// The largest transfer buffer one URB may carry here (a USB stick's 120 KiB reads, a webcam's
/// isochronous frames, with room).
pub const MAX_TRANSFER: u32 = 4 << 20;
/// Most isochronous packets in one URB.
pub const MAX_ISO_PACKETS: u32 = 1024;
/// Most URBs in flight on one device (vhci-hcd keeps far fewer).
pub const MAX_IN_FLIGHT: usize = 1024;

/// A transfer's direction, as the URB sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Host to device.
    Out = 0,
    /// Device to host.
    In = 1,
}

/// One isochronous packet of a URB.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct IsoPacket {
    pub offset: u32,
    pub length: u32,
    pub actual_length: u32,
    pub status: u32,
}

/// "Run this URB": from the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CmdSubmit {
    pub seqnum: u32,
    pub devid: u32,
    pub direction: Direction,
    /// 0–15.
    pub ep: u32,
    pub transfer_flags: u32,
    /// The data that follows (OUT), or the most the guest takes back (IN).
    pub transfer_buffer_length: u32,
    pub start_frame: i32,
    /// The isochronous packets; 0 or 0xffffffff for a URB that is not isochronous (kept as
    /// sent: [`CmdSubmit::iso_count`] reads it).
    pub number_of_packets: u32,
    pub interval: i32,
    /// A control transfer's setup packet.
    pub setup: [u8; 8],
    /// OUT: `transfer_buffer_length` bytes; IN: empty.
    pub data: Vec<u8>,
    pub iso: Vec<IsoPacket>,
}

impl CmdSubmit {
    /// A URB that is not isochronous on endpoint `ep`: an OUT one carries `data` (its length is
    /// the transfer's), an IN one asks for `length` bytes (`data` empty); `setup` for control
    /// transfers (endpoint 0), zeros otherwise.
    pub fn new(
        seqnum: u32,
        devid: u32,
        ep: u32,
        direction: Direction,
        length: u32,
        setup: [u8; 8],
        data: Vec<u8>,
    ) -> Self {
        Self {
            seqnum,
            devid,
            direction,
            ep,
            transfer_flags: 0,
            transfer_buffer_length: length,
            start_frame: 0,
            number_of_packets: 0,
            interval: 0,
            setup,
            data,
            iso: Vec::new(),
        }
    }

    /// The isochronous packets, `None` for a URB that is not isochronous.
    pub fn iso_count(&self) -> Option<u32> {
        iso_count(self.number_of_packets).ok().flatten()
    }
}

/// "This is how URB `seqnum` went": from the device's side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetSubmit {
    pub seqnum: u32,
    /// 0, or a negative errno (`-EPIPE` for a stall, …).
    pub status: i32,
    pub actual_length: u32,
    pub start_frame: i32,
    /// As in [`CmdSubmit::number_of_packets`].
    pub number_of_packets: u32,
    pub error_count: i32,
    /// IN: `actual_length` bytes; OUT: empty.
    pub data: Vec<u8>,
    pub iso: Vec<IsoPacket>,
}

impl RetSubmit {
    /// How URB `seqnum` (not isochronous) ended: `status` 0 or a negative errno, `data` an IN
    /// transfer's bytes, `actual_length` what it moved (an OUT transfer's bytes taken).
    pub fn new(seqnum: u32, status: i32, actual_length: u32, data: Vec<u8>) -> Self {
        Self {
            seqnum,
            status,
            actual_length,
            start_frame: 0,
            number_of_packets: 0,
            error_count: 0,
            data,
            iso: Vec::new(),
        }
    }
}

/// One USB/IP message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pdu {
    Submit(CmdSubmit),
    /// "Cancel URB `unlink_seqnum`": from the guest.
    Unlink {
        seqnum: u32,
        devid: u32,
        unlink_seqnum: u32,
    },
    Ret(RetSubmit),
    /// The answer to unlink `seqnum`: non-zero (`-ECONNRESET`) when the URB was cancelled (it
    /// gets no `RET_SUBMIT`), 0 when it had completed first (its `RET_SUBMIT` went before).
    RetUnlink {
        seqnum: u32,
        status: i32,
    },
}

/// Why a stream broke the protocol. The link is over after any of these.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UsbipError {
    #[error("unknown USB/IP command {0:#x}")]
    UnknownCommand(u32),
    #[error("USB/IP command {0:#x} travels the other way")]
    WrongDirection(u32),
    #[error("a transfer of {0} bytes is over the {MAX_TRANSFER}-byte limit")]
    TooLarge(u32),
    #[error("{0} isochronous packets is over the limit of {MAX_ISO_PACKETS}")]
    TooManyPackets(u32),
    #[error("bad field: {0}")]
    Malformed(&'static str),
    #[error("URB {0} is already in flight")]
    DuplicateSeqnum(u32),
    #[error("more than {MAX_IN_FLIGHT} URBs in flight")]
    TooManyInFlight,
    #[error("an answer to URB {0}, which is not in flight")]
    NotInFlight(u32),
    #[error("URB {seqnum} returns {actual} bytes, more than the {asked} asked for")]
    Overrun { seqnum: u32, actual: u32, asked: u32 },
    #[error("the link already failed")]
    Failed,
}

fn be32(bytes: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

/// The header's bytes in `range` must be zero (fields the protocol sets to 0, and padding):
/// each PDU has one encoding, so what the VM process passes on is exactly what it checked.
fn zero(h: &[u8], range: std::ops::Range<usize>) -> Result<(), UsbipError> {
    if h[range].iter().any(|&b| b != 0) {
        return Err(UsbipError::Malformed("a field that must be zero is not"));
    }
    Ok(())
}

fn iso_count(raw: u32) -> Result<Option<u32>, UsbipError> {
    match raw {
        0 | u32::MAX => Ok(None),
        n if n > MAX_ISO_PACKETS => Err(UsbipError::TooManyPackets(n)),
        n => Ok(Some(n)),
    }
}

fn put_iso(out: &mut Vec<u8>, iso: &[IsoPacket]) {
    for p in iso {
        for v in [p.offset, p.length, p.actual_length, p.status] {
            out.extend_from_slice(&v.to_be_bytes());
        }
    }
}

impl Pdu {
    /// The wire bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN);
        let mut put = |v: u32| out.extend_from_slice(&v.to_be_bytes());
        match self {
            Pdu::Submit(s) => {
                for v in [CMD_SUBMIT, s.seqnum, s.devid, s.direction as u32, s.ep, s.transfer_flags] {
                    put(v);
                }
                put(s.transfer_buffer_length);
                put(s.start_frame as u32);
                put(s.number_of_packets);
                put(s.interval as u32);
                out.extend_from_slice(&s.setup);
                out.extend_from_slice(&s.data);
                put_iso(&mut out, &s.iso);
            }
            Pdu::Unlink { seqnum, devid, unlink_seqnum } => {
                for v in [CMD_UNLINK, *seqnum, *devid, 0, 0, *unlink_seqnum] {
                    put(v);
                }
                out.resize(HEADER_LEN, 0);
            }
            Pdu::Ret(r) => {
                for v in
                    [RET_SUBMIT, r.seqnum, 0, 0, 0, r.status as u32, r.actual_length, r.start_frame as u32]
                {
                    put(v);
                }
                put(r.number_of_packets);
                put(r.error_count as u32);
                out.resize(HEADER_LEN, 0);
                out.extend_from_slice(&r.data);
                put_iso(&mut out, &r.iso);
            }
            Pdu::RetUnlink { seqnum, status } => {
                for v in [RET_UNLINK, *seqnum, 0, 0, 0, *status as u32] {
                    put(v);
                }
                out.resize(HEADER_LEN, 0);
            }
        }
        out
    }
}

/// What a submit in flight expects back.
#[derive(Debug, Clone, Copy)]
struct InFlight {
    direction: Direction,
    asked: u32,
    iso: Option<u32>,
}

/// One direction's bytes, decoded as they come.
#[derive(Debug, Default)]
struct Reader {
    buf: Vec<u8>,
}

impl Reader {
    /// The next whole PDU's length, once its header is in, given what its body must hold.
    fn take(
        &mut self,
        needed: impl FnOnce(&[u8]) -> Result<usize, UsbipError>,
    ) -> Result<Option<Vec<u8>>, UsbipError> {
        if self.buf.len() < HEADER_LEN {
            return Ok(None);
        }
        let total = HEADER_LEN + needed(&self.buf[..HEADER_LEN])?;
        if self.buf.len() < total {
            return Ok(None);
        }
        let rest = self.buf.split_off(total);
        Ok(Some(std::mem::replace(&mut self.buf, rest)))
    }
}

fn read_iso(bytes: &[u8], count: Option<u32>) -> Vec<IsoPacket> {
    (0..count.unwrap_or(0) as usize)
        .map(|i| {
            let at = i * ISO_DESCRIPTOR_LEN;
            IsoPacket {
                offset: be32(bytes, at),
                length: be32(bytes, at + 4),
                actual_length: be32(bytes, at + 8),
                status: be32(bytes, at + 12),
            }
        })
        .collect()
}

/// One redirected device's USB/IP stream, both ways, checked: what the guest submits and
/// unlinks, what the device's side returns. The buffers are bounded by one PDU each
/// ([`MAX_TRANSFER`] and its descriptors); the URBs in flight by [`MAX_IN_FLIGHT`].
#[derive(Debug, Default)]
pub struct UsbipLink {
    from_guest: Reader,
    from_device: Reader,
    in_flight: HashMap<u32, InFlight>,
    /// Unlinks not answered yet: their seqnum → the URB they cancel.
    unlinks: HashMap<u32, u32>,
    failed: bool,
}

impl UsbipLink {
    pub fn new() -> Self {
        Self::default()
    }

    /// URBs submitted and not answered.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Bytes the guest sent: the whole PDUs among them. After an error the link is over.
    pub fn from_guest(&mut self, bytes: &[u8]) -> Result<Vec<Pdu>, UsbipError> {
        self.guarded(|link| {
            link.from_guest.buf.extend_from_slice(bytes);
            let mut out = Vec::new();
            while let Some(pdu) = link.next_from_guest()? {
                out.push(pdu);
            }
            Ok(out)
        })
    }

    /// Bytes the device's side sent: the whole PDUs among them. After an error the link is over.
    pub fn from_device(&mut self, bytes: &[u8]) -> Result<Vec<Pdu>, UsbipError> {
        self.guarded(|link| {
            link.from_device.buf.extend_from_slice(bytes);
            let mut out = Vec::new();
            while let Some(pdu) = link.next_from_device()? {
                out.push(pdu);
            }
            Ok(out)
        })
    }

    /// The device went away: every URB in flight ends (the caller answers each with an error
    /// status, so that the guest's driver sees a disconnect rather than a hang). Their seqnums.
    pub fn abandon(&mut self) -> Vec<u32> {
        self.unlinks.clear();
        let mut seqnums: Vec<u32> = self.in_flight.drain().map(|(seqnum, _)| seqnum).collect();
        seqnums.sort_unstable();
        seqnums
    }

    fn guarded<T>(&mut self, f: impl FnOnce(&mut Self) -> Result<T, UsbipError>) -> Result<T, UsbipError> {
        if self.failed {
            return Err(UsbipError::Failed);
        }
        let result = f(self);
        if result.is_err() {
            self.failed = true;
            self.from_guest.buf = Vec::new();
            self.from_device.buf = Vec::new();
        }
        result
    }

    fn next_from_guest(&mut self) -> Result<Option<Pdu>, UsbipError> {
        let Some(bytes) = self.from_guest.take(|h| match be32(h, 0) {
            CMD_SUBMIT => {
                let length = be32(h, 24);
                if length > MAX_TRANSFER {
                    return Err(UsbipError::TooLarge(length));
                }
                let iso = iso_count(be32(h, 32))?.unwrap_or(0) as usize;
                let data = if be32(h, 12) == Direction::Out as u32 { length as usize } else { 0 };
                Ok(data + iso * ISO_DESCRIPTOR_LEN)
            }
            CMD_UNLINK => {
                zero(h, 12..20)?;
                zero(h, 24..HEADER_LEN)?;
                Ok(0)
            }
            RET_SUBMIT | RET_UNLINK => Err(UsbipError::WrongDirection(be32(h, 0))),
            other => Err(UsbipError::UnknownCommand(other)),
        })?
        else {
            return Ok(None);
        };
        let seqnum = be32(&bytes, 4);
        let devid = be32(&bytes, 8);
        if be32(&bytes, 0) == CMD_UNLINK {
            if self.unlinks.contains_key(&seqnum) || self.in_flight.contains_key(&seqnum) {
                return Err(UsbipError::DuplicateSeqnum(seqnum));
            }
            if self.unlinks.len() >= MAX_IN_FLIGHT {
                return Err(UsbipError::TooManyInFlight);
            }
            let unlink_seqnum = be32(&bytes, 20);
            self.unlinks.insert(seqnum, unlink_seqnum);
            return Ok(Some(Pdu::Unlink { seqnum, devid, unlink_seqnum }));
        }
        let direction = match be32(&bytes, 12) {
            0 => Direction::Out,
            1 => Direction::In,
            _ => return Err(UsbipError::Malformed("direction")),
        };
        let ep = be32(&bytes, 16);
        if ep > 15 {
            return Err(UsbipError::Malformed("endpoint"));
        }
        let transfer_buffer_length = be32(&bytes, 24);
        let iso_packets = iso_count(be32(&bytes, 32))?;
        if self.in_flight.contains_key(&seqnum) || self.unlinks.contains_key(&seqnum) {
            return Err(UsbipError::DuplicateSeqnum(seqnum));
        }
        if self.in_flight.len() >= MAX_IN_FLIGHT {
            return Err(UsbipError::TooManyInFlight);
        }
        let data_len = if direction == Direction::Out { transfer_buffer_length as usize } else { 0 };
        let body = &bytes[HEADER_LEN..];
        self.in_flight
            .insert(seqnum, InFlight { direction, asked: transfer_buffer_length, iso: iso_packets });
        Ok(Some(Pdu::Submit(CmdSubmit {
            seqnum,
            devid,
            direction,
            ep,
            transfer_flags: be32(&bytes, 20),
            transfer_buffer_length,
            start_frame: be32(&bytes, 28) as i32,
            number_of_packets: be32(&bytes, 32),
            interval: be32(&bytes, 36) as i32,
            setup: bytes[40..48].try_into().expect("8 bytes"),
            data: body[..data_len].to_vec(),
            iso: read_iso(&body[data_len..], iso_packets),
        })))
    }

    fn next_from_device(&mut self) -> Result<Option<Pdu>, UsbipError> {
        let (in_flight, unlinks) = (&self.in_flight, &self.unlinks);
        let Some(bytes) = self.from_device.take(|h| match be32(h, 0) {
            RET_SUBMIT => {
                zero(h, 8..20)?;
                zero(h, 40..HEADER_LEN)?;
                let seqnum = be32(h, 4);
                let urb = in_flight.get(&seqnum).ok_or(UsbipError::NotInFlight(seqnum))?;
                let actual = be32(h, 24);
                if actual > urb.asked {
                    return Err(UsbipError::Overrun { seqnum, actual, asked: urb.asked });
                }
                let iso = iso_count(be32(h, 32))?;
                if iso.is_some() && iso != urb.iso {
                    return Err(UsbipError::Malformed("isochronous packets differ from the request's"));
                }
                let data = if urb.direction == Direction::In { actual as usize } else { 0 };
                Ok(data + iso.unwrap_or(0) as usize * ISO_DESCRIPTOR_LEN)
            }
            RET_UNLINK if !unlinks.contains_key(&be32(h, 4)) => Err(UsbipError::NotInFlight(be32(h, 4))),
            RET_UNLINK => {
                zero(h, 8..20)?;
                zero(h, 24..HEADER_LEN)?;
                Ok(0)
            }
            CMD_SUBMIT | CMD_UNLINK => Err(UsbipError::WrongDirection(be32(h, 0))),
            other => Err(UsbipError::UnknownCommand(other)),
        })?
        else {
            return Ok(None);
        };
        let seqnum = be32(&bytes, 4);
        if be32(&bytes, 0) == RET_UNLINK {
            let status = be32(&bytes, 20) as i32;
            let target = self.unlinks.remove(&seqnum).expect("checked with the header");
            if status != 0 {
                // Cancelled: no RET_SUBMIT follows for it.
                self.in_flight.remove(&target);
            }
            return Ok(Some(Pdu::RetUnlink { seqnum, status }));
        }
        let urb = self.in_flight.remove(&seqnum).expect("checked with the header");
        let actual_length = be32(&bytes, 24);
        let iso_packets = iso_count(be32(&bytes, 32))?;
        let data_len = if urb.direction == Direction::In { actual_length as usize } else { 0 };
        let body = &bytes[HEADER_LEN..];
        Ok(Some(Pdu::Ret(RetSubmit {
            seqnum,
            status: be32(&bytes, 20) as i32,
            actual_length,
            start_frame: be32(&bytes, 28) as i32,
            number_of_packets: be32(&bytes, 32),
            error_count: be32(&bytes, 36) as i32,
            data: body[..data_len].to_vec(),
            iso: read_iso(&body[data_len..], iso_packets),
        })))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Any bytes from either side, in any chunks: no panic, and a failed link stays failed.
        #[test]
        fn arbitrary_streams_never_panic(
            chunks in proptest::collection::vec((any::<bool>(), proptest::collection::vec(any::<u8>(), 0..200)), 0..20)
        ) {
            let mut link = UsbipLink::new();
            for (guest, bytes) in chunks {
                let result = if guest { link.from_guest(&bytes) } else { link.from_device(&bytes) };
                if result.is_err() {
                    prop_assert_eq!(link.from_device(&[]), Err(UsbipError::Failed));
                    break;
                }
                prop_assert!(link.in_flight() <= MAX_IN_FLIGHT);
            }
        }
    }

    fn submit(seqnum: u32, direction: Direction, length: u32, data: Vec<u8>) -> Pdu {
        let ep = if direction == Direction::In { 1 } else { 2 };
        Pdu::Submit(CmdSubmit::new(seqnum, 0x0001_0002, ep, direction, length, [0; 8], data))
    }

    fn ret(seqnum: u32, data: Vec<u8>, actual: u32) -> Pdu {
        Pdu::Ret(RetSubmit::new(seqnum, 0, actual, data))
    }

    #[test]
    fn a_control_request_has_the_kernels_layout() {
        // GET_DESCRIPTOR(device, 18 bytes) on endpoint 0, as vhci-hcd sends it.
        let get_descriptor = Pdu::Submit(CmdSubmit {
            seqnum: 1,
            devid: 0x0001_0002,
            direction: Direction::In,
            ep: 0,
            transfer_flags: 0x200,
            transfer_buffer_length: 18,
            start_frame: 0,
            number_of_packets: 0,
            interval: 0,
            setup: [0x80, 0x06, 0x00, 0x01, 0x00, 0x00, 0x12, 0x00],
            data: Vec::new(),
            iso: Vec::new(),
        });
        let bytes = get_descriptor.encode();
        assert_eq!(bytes.len(), HEADER_LEN);
        assert_eq!(&bytes[..8], &[0, 0, 0, 1, 0, 0, 0, 1]);
        assert_eq!(&bytes[8..16], &[0, 1, 0, 2, 0, 0, 0, 1]);
        assert_eq!(&bytes[24..28], &[0, 0, 0, 18]);
        assert_eq!(&bytes[40..48], &[0x80, 0x06, 0x00, 0x01, 0x00, 0x00, 0x12, 0x00]);
        let mut link = UsbipLink::new();
        assert_eq!(link.from_guest(&bytes).unwrap(), [get_descriptor]);
        let descriptor = vec![18, 1, 0, 2, 0, 0, 0, 64, 0x6b, 0x1d, 0x04, 0x01, 0, 1, 1, 2, 3, 1];
        let answer = ret(1, descriptor, 18);
        assert_eq!(link.from_device(&answer.encode()).unwrap(), [answer]);
        assert_eq!(link.in_flight(), 0);
    }

    #[test]
    fn pdus_cross_in_any_chunks_both_ways() {
        let mut link = UsbipLink::new();
        let out = submit(5, Direction::Out, 3000, vec![7; 3000]);
        let inn = submit(6, Direction::In, 4096, Vec::new());
        let unlink = Pdu::Unlink { seqnum: 7, devid: 1, unlink_seqnum: 6 };
        let stream: Vec<u8> = [&out, &inn, &unlink].iter().flat_map(|p| p.encode()).collect();
        let mut got = Vec::new();
        for chunk in stream.chunks(37) {
            got.extend(link.from_guest(chunk).unwrap());
        }
        assert_eq!(got, [out, inn, unlink]);
        // URB 6 is cancelled (-ECONNRESET): no RET_SUBMIT for it, and it is no longer in flight.
        let answers = [ret(5, Vec::new(), 3000), Pdu::RetUnlink { seqnum: 7, status: -104 }];
        let stream: Vec<u8> = answers.iter().flat_map(Pdu::encode).collect();
        let mut got = Vec::new();
        for chunk in stream.chunks(11) {
            got.extend(link.from_device(chunk).unwrap());
        }
        assert_eq!(got, answers);
        assert_eq!(link.in_flight(), 0);
        assert_eq!(link.from_device(&ret(6, vec![9; 100], 100).encode()), Err(UsbipError::NotInFlight(6)));
    }

    #[test]
    fn isochronous_urbs_carry_their_descriptors() {
        let mut link = UsbipLink::new();
        let iso = vec![IsoPacket { offset: 0, length: 192, actual_length: 0, status: 0 }; 3];
        let submit = Pdu::Submit(CmdSubmit {
            seqnum: 1,
            devid: 1,
            direction: Direction::In,
            ep: 3,
            transfer_flags: 2,
            transfer_buffer_length: 576,
            start_frame: 0,
            number_of_packets: 3,
            interval: 1,
            setup: [0; 8],
            data: Vec::new(),
            iso: iso.clone(),
        });
        assert_eq!(link.from_guest(&submit.encode()).unwrap(), [submit]);
        let back = Pdu::Ret(RetSubmit {
            seqnum: 1,
            status: 0,
            actual_length: 384,
            start_frame: 9,
            number_of_packets: 3,
            error_count: 1,
            data: vec![1; 384],
            iso: vec![IsoPacket { offset: 0, length: 192, actual_length: 192, status: 0 }; 3],
        });
        assert_eq!(link.from_device(&back.encode()).unwrap(), [back]);
    }

    #[test]
    fn what_breaks_the_protocol_ends_the_link() {
        let mut bad = submit(1, Direction::Out, 4, vec![0; 4]).encode();
        bad[0..4].copy_from_slice(&9u32.to_be_bytes());
        type Case = Box<dyn Fn(&mut UsbipLink) -> Result<Vec<Pdu>, UsbipError>>;
        let cases: Vec<(&str, Case)> = vec![
            ("unknown command", Box::new(move |l| l.from_guest(&bad))),
            ("an answer from the guest", Box::new(|l| l.from_guest(&ret(1, vec![], 0).encode()))),
            (
                "a command from the device",
                Box::new(|l| l.from_device(&submit(1, Direction::In, 1, vec![]).encode())),
            ),
            ("an answer to nothing", Box::new(|l| l.from_device(&ret(3, vec![], 0).encode()))),
            (
                "too large",
                Box::new(|l| l.from_guest(&submit(1, Direction::In, MAX_TRANSFER + 1, vec![]).encode())),
            ),
            (
                "the same URB twice",
                Box::new(|l| {
                    l.from_guest(&submit(1, Direction::In, 8, vec![]).encode())?;
                    l.from_guest(&submit(1, Direction::In, 8, vec![]).encode())
                }),
            ),
            (
                "more back than asked",
                Box::new(|l| {
                    l.from_guest(&submit(1, Direction::In, 8, vec![]).encode())?;
                    l.from_device(&ret(1, vec![0; 9], 9).encode())
                }),
            ),
        ];
        for (what, case) in cases {
            let mut link = UsbipLink::new();
            assert!(case(&mut link).is_err(), "{what}");
            assert_eq!(link.from_guest(&[]), Err(UsbipError::Failed), "{what}: a failed link stays failed");
        }
        // Fields the protocol sets to zero must be: one encoding per PDU.
        let mut link = UsbipLink::new();
        link.from_guest(&submit(2, Direction::In, 8, vec![]).encode()).unwrap();
        let mut answer = ret(2, vec![0; 8], 8).encode();
        answer[12] = 1;
        assert!(matches!(link.from_device(&answer), Err(UsbipError::Malformed(_))));
        // A huge announced length is refused on the header, before anything is buffered.
        let mut link = UsbipLink::new();
        let header = submit(1, Direction::Out, u32::MAX, vec![]).encode();
        assert_eq!(link.from_guest(&header[..HEADER_LEN]), Err(UsbipError::TooLarge(u32::MAX)));
    }

    #[test]
    fn a_device_that_goes_leaves_its_urbs_to_be_answered() {
        let mut link = UsbipLink::new();
        for seqnum in [4, 2, 9] {
            link.from_guest(&submit(seqnum, Direction::In, 512, vec![]).encode()).unwrap();
        }
        assert_eq!(link.abandon(), [2, 4, 9]);
        assert_eq!(link.in_flight(), 0);
    }
}
