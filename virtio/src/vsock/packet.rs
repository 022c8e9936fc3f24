//! virtio-vsock packets (virtio 1.2, 5.10.6): the 44-byte little-endian header every packet
//! starts with, and the operations it names.

/// Bytes of a packet header.
pub const HEADER_LEN: usize = 44;
/// The host's context id: where every guest packet must be addressed.
pub const HOST_CID: u64 = 2;
/// `VIRTIO_VSOCK_TYPE_STREAM`, the only socket type offered (no `F_SEQPACKET`).
pub const TYPE_STREAM: u16 = 1;
/// `VIRTIO_VSOCK_SHUTDOWN_RCV`: the sender will receive no more.
pub const SHUTDOWN_RCV: u32 = 1;
/// `VIRTIO_VSOCK_SHUTDOWN_SEND`: the sender will send no more.
pub const SHUTDOWN_SEND: u32 = 2;

/// `VIRTIO_VSOCK_OP_*`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum Op {
    Request = 1,
    Response = 2,
    Rst = 3,
    Shutdown = 4,
    Rw = 5,
    CreditUpdate = 6,
    CreditRequest = 7,
}

impl Op {
    pub fn from_raw(raw: u16) -> Option<Self> {
        Some(match raw {
            1 => Self::Request,
            2 => Self::Response,
            3 => Self::Rst,
            4 => Self::Shutdown,
            5 => Self::Rw,
            6 => Self::CreditUpdate,
            7 => Self::CreditRequest,
            _ => return None,
        })
    }
}

/// `struct virtio_vsock_hdr`, field by field (the wire form is packed, little-endian).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    /// Payload bytes after the header.
    pub len: u32,
    pub socket_type: u16,
    /// The raw operation ([`Op::from_raw`]): a guest may send any value.
    pub op: u16,
    pub flags: u32,
    /// The sender's receive buffer for this connection, in bytes.
    pub buf_alloc: u32,
    /// Bytes the sender has taken out of that buffer so far (wrapping).
    pub fwd_cnt: u32,
}

impl Header {
    pub fn parse(b: &[u8; HEADER_LEN]) -> Self {
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        let u16_at = |i: usize| u16::from_le_bytes(b[i..i + 2].try_into().expect("2 bytes"));
        Self {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            socket_type: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.socket_type.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    pub fn op(&self) -> Option<Op> {
        Op::from_raw(self.op)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_header_is_the_kernels_packed_little_endian_layout() {
        // A REQUEST from guest 3 port 1234 to the host's port 5000, as Linux writes it.
        let mut wire = [0u8; HEADER_LEN];
        wire[0] = 3;
        wire[8] = 2;
        wire[16..20].copy_from_slice(&1234u32.to_le_bytes());
        wire[20..24].copy_from_slice(&5000u32.to_le_bytes());
        wire[28] = 1;
        wire[30] = 1;
        wire[36..40].copy_from_slice(&262_144u32.to_le_bytes());
        let h = Header::parse(&wire);
        assert_eq!((h.src_cid, h.dst_cid, h.src_port, h.dst_port), (3, HOST_CID, 1234, 5000));
        assert_eq!(
            (h.socket_type, h.op(), h.buf_alloc, h.fwd_cnt, h.len),
            (TYPE_STREAM, Some(Op::Request), 262_144, 0, 0)
        );
        assert_eq!(h.to_bytes(), wire);
        assert_eq!(Op::from_raw(0), None);
        assert_eq!(Op::from_raw(8), None);
    }
}
