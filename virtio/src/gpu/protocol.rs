//! The virtio-gpu wire format (virtio 1.2, 5.7.6) and its parser.
//!
//! Every control and cursor request is parsed from the bytes of its readable descriptors into a
//! typed [`Request`] before the device does anything with it. The parser checks only the shape
//! (lengths, counts, known command types); the device checks the meaning (ids, rectangles,
//! guest addresses). Both report a [`GpuError`], which becomes the virtio-gpu error response
//! the driver expects; nothing the guest sends can make the parser panic or allocate more than
//! [`MAX_REQUEST_BYTES`]. `fuzz/fuzz_targets/virtio_gpu.rs` drives this parser and the device.

use std::fmt;

/// The control header every request and response starts with.
pub const HEADER_SIZE: usize = 24;
/// The most bytes a request may have: a header, an attach-backing body and
/// [`MAX_BACKING_ENTRIES`] entries.
pub const MAX_REQUEST_BYTES: usize = HEADER_SIZE + 8 + MAX_BACKING_ENTRIES * MEM_ENTRY_SIZE;
/// The most scatter-gather entries one resource's backing may have (QEMU's limit too): enough
/// for a 64 MiB framebuffer in 4 KiB pages.
pub const MAX_BACKING_ENTRIES: usize = 16 * 1024;
/// The size of one `virtio_gpu_mem_entry`.
pub const MEM_ENTRY_SIZE: usize = 16;
/// The most scanouts the protocol can describe (`VIRTIO_GPU_MAX_SCANOUTS`).
pub const MAX_SCANOUTS: usize = 16;
/// The size of the EDID blob in `virtio_gpu_resp_edid`.
pub const EDID_BLOB_SIZE: usize = 1024;

/// `VIRTIO_GPU_F_EDID`.
pub const VIRTIO_GPU_F_EDID: u64 = 1 << 1;
/// `VIRTIO_GPU_FLAG_FENCE`: the driver wants the response to carry its fence.
pub const FLAG_FENCE: u32 = 1;
/// `VIRTIO_GPU_EVENT_DISPLAY`: the display configuration changed; re-read it.
pub const EVENT_DISPLAY: u32 = 1;

/// Command types.
pub mod cmd {
    pub const GET_DISPLAY_INFO: u32 = 0x0100;
    pub const RESOURCE_CREATE_2D: u32 = 0x0101;
    pub const RESOURCE_UNREF: u32 = 0x0102;
    pub const SET_SCANOUT: u32 = 0x0103;
    pub const RESOURCE_FLUSH: u32 = 0x0104;
    pub const TRANSFER_TO_HOST_2D: u32 = 0x0105;
    pub const RESOURCE_ATTACH_BACKING: u32 = 0x0106;
    pub const RESOURCE_DETACH_BACKING: u32 = 0x0107;
    pub const GET_CAPSET_INFO: u32 = 0x0108;
    pub const GET_CAPSET: u32 = 0x0109;
    pub const GET_EDID: u32 = 0x010a;
    pub const UPDATE_CURSOR: u32 = 0x0300;
    pub const MOVE_CURSOR: u32 = 0x0301;
}

/// Response types.
pub mod resp {
    pub const OK_NODATA: u32 = 0x1100;
    pub const OK_DISPLAY_INFO: u32 = 0x1101;
    pub const OK_EDID: u32 = 0x1104;
    pub const ERR_UNSPEC: u32 = 0x1200;
    pub const ERR_OUT_OF_MEMORY: u32 = 0x1201;
    pub const ERR_INVALID_SCANOUT_ID: u32 = 0x1202;
    pub const ERR_INVALID_RESOURCE_ID: u32 = 0x1203;
    pub const ERR_INVALID_PARAMETER: u32 = 0x1205;
}

/// Why a request failed; each maps to one virtio-gpu error response.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GpuError {
    /// `ERR_UNSPEC`: malformed, unsupported or out of order.
    #[error("{0}")]
    Unspec(String),
    /// `ERR_OUT_OF_MEMORY`: over the VM's GPU memory cap or resource count.
    #[error("out of GPU memory: {0}")]
    OutOfMemory(String),
    /// `ERR_INVALID_SCANOUT_ID`.
    #[error("scanout {0} does not exist")]
    InvalidScanout(u32),
    /// `ERR_INVALID_RESOURCE_ID`: unknown (or, for a create, already used or 0).
    #[error("resource id {0} is invalid")]
    InvalidResource(u32),
    /// `ERR_INVALID_PARAMETER`: a format, size, rectangle or address that does not fit.
    #[error("{0}")]
    InvalidParameter(String),
}

impl GpuError {
    /// The response type the driver gets.
    pub fn response_type(&self) -> u32 {
        match self {
            Self::Unspec(_) => resp::ERR_UNSPEC,
            Self::OutOfMemory(_) => resp::ERR_OUT_OF_MEMORY,
            Self::InvalidScanout(_) => resp::ERR_INVALID_SCANOUT_ID,
            Self::InvalidResource(_) => resp::ERR_INVALID_RESOURCE_ID,
            Self::InvalidParameter(_) => resp::ERR_INVALID_PARAMETER,
        }
    }
}

/// `virtio_gpu_ctrl_hdr`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Header {
    pub kind: u32,
    pub flags: u32,
    pub fence_id: u64,
    pub ctx_id: u32,
    pub ring_idx: u8,
}

impl Header {
    fn parse(b: &[u8; HEADER_SIZE]) -> Self {
        let mut r = Fields(b);
        Self { kind: r.u32(0), flags: r.u32(4), fence_id: r.u64(8), ctx_id: r.u32(16), ring_idx: b[20] }
    }

    /// The header of the response to this request: the fence is echoed when asked for.
    pub fn response(&self, kind: u32) -> [u8; HEADER_SIZE] {
        let mut out = [0u8; HEADER_SIZE];
        out[0..4].copy_from_slice(&kind.to_le_bytes());
        if self.flags & FLAG_FENCE != 0 {
            out[4..8].copy_from_slice(&FLAG_FENCE.to_le_bytes());
            out[8..16].copy_from_slice(&self.fence_id.to_le_bytes());
            out[16..20].copy_from_slice(&self.ctx_id.to_le_bytes());
            out[20] = self.ring_idx;
        }
        out
    }
}

/// `virtio_gpu_rect`. Coordinates are unchecked here; see [`Rect::within`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Rect {
    pub x: u32,
    pub y: u32,
    pub width: u32,
    pub height: u32,
}

impl Rect {
    pub const fn new(x: u32, y: u32, width: u32, height: u32) -> Self {
        Self { x, y, width, height }
    }

    /// Whether the rectangle lies inside a `width` x `height` area (overflow-safe).
    pub fn within(&self, width: u32, height: u32) -> bool {
        let right = u64::from(self.x) + u64::from(self.width);
        let bottom = u64::from(self.y) + u64::from(self.height);
        right <= u64::from(width) && bottom <= u64::from(height)
    }

    pub fn is_empty(&self) -> bool {
        self.width == 0 || self.height == 0
    }

    /// The overlap of two rectangles (empty when they do not meet).
    pub fn intersect(&self, other: &Rect) -> Rect {
        let x0 = self.x.max(other.x);
        let y0 = self.y.max(other.y);
        let x1 = self.x.saturating_add(self.width).min(other.x.saturating_add(other.width));
        let y1 = self.y.saturating_add(self.height).min(other.y.saturating_add(other.height));
        if x1 <= x0 || y1 <= y0 { Rect::default() } else { Rect::new(x0, y0, x1 - x0, y1 - y0) }
    }

    /// The smallest rectangle covering both (an empty one is ignored).
    pub fn union(&self, other: &Rect) -> Rect {
        if self.is_empty() {
            return *other;
        }
        if other.is_empty() {
            return *self;
        }
        let x0 = self.x.min(other.x);
        let y0 = self.y.min(other.y);
        let x1 = self.x.saturating_add(self.width).max(other.x.saturating_add(other.width));
        let y1 = self.y.saturating_add(self.height).max(other.y.saturating_add(other.height));
        Rect::new(x0, y0, x1 - x0, y1 - y0)
    }

    /// The area in pixels.
    pub fn area(&self) -> u64 {
        u64::from(self.width) * u64::from(self.height)
    }

    fn parse(r: &mut Fields<'_>, at: usize) -> Self {
        Self::new(r.u32(at), r.u32(at + 4), r.u32(at + 8), r.u32(at + 12))
    }

    fn write(&self, out: &mut [u8]) {
        for (i, v) in [self.x, self.y, self.width, self.height].into_iter().enumerate() {
            out[i * 4..i * 4 + 4].copy_from_slice(&v.to_le_bytes());
        }
    }
}

impl fmt::Display for Rect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}x{}+{}+{}", self.width, self.height, self.x, self.y)
    }
}

/// One `virtio_gpu_mem_entry`: a piece of a resource's backing in guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemEntry {
    pub addr: u64,
    pub length: u32,
}

/// `virtio_gpu_cursor_pos`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CursorPos {
    pub scanout_id: u32,
    pub x: u32,
    pub y: u32,
}

/// A parsed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    GetDisplayInfo,
    GetEdid { scanout_id: u32 },
    ResourceCreate2d { resource_id: u32, format: u32, width: u32, height: u32 },
    ResourceUnref { resource_id: u32 },
    SetScanout { rect: Rect, scanout_id: u32, resource_id: u32 },
    ResourceFlush { rect: Rect, resource_id: u32 },
    TransferToHost2d { rect: Rect, offset: u64, resource_id: u32 },
    AttachBacking { resource_id: u32, entries: Vec<MemEntry> },
    DetachBacking { resource_id: u32 },
    UpdateCursor { pos: CursorPos, resource_id: u32, hot_x: u32, hot_y: u32 },
    MoveCursor { pos: CursorPos },
}

/// A request: its header (for the response's fence) and the command, or why it is not one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub header: Header,
    pub command: Result<Command, GpuError>,
}

/// Parses the readable bytes of a request. `None` when not even a header arrived: such a
/// request is answered with `ERR_UNSPEC` and a zero header.
pub fn parse(bytes: &[u8]) -> Option<Request> {
    let header = Header::parse(bytes.get(..HEADER_SIZE)?.try_into().ok()?);
    let body = &bytes[HEADER_SIZE..];
    Some(Request { header, command: parse_body(header.kind, body) })
}

fn parse_body(kind: u32, body: &[u8]) -> Result<Command, GpuError> {
    let need = |n: usize| -> Result<Fields<'_>, GpuError> {
        body.get(..n).map(Fields).ok_or_else(|| {
            GpuError::Unspec(format!(
                "request {kind:#06x} is truncated: {} body bytes, {n} needed",
                body.len()
            ))
        })
    };
    Ok(match kind {
        cmd::GET_DISPLAY_INFO => Command::GetDisplayInfo,
        cmd::GET_EDID => Command::GetEdid { scanout_id: need(8)?.u32(0) },
        cmd::RESOURCE_CREATE_2D => {
            let mut r = need(16)?;
            Command::ResourceCreate2d {
                resource_id: r.u32(0),
                format: r.u32(4),
                width: r.u32(8),
                height: r.u32(12),
            }
        }
        cmd::RESOURCE_UNREF => Command::ResourceUnref { resource_id: need(8)?.u32(0) },
        cmd::SET_SCANOUT => {
            let mut r = need(24)?;
            Command::SetScanout {
                rect: Rect::parse(&mut r, 0),
                scanout_id: r.u32(16),
                resource_id: r.u32(20),
            }
        }
        cmd::RESOURCE_FLUSH => {
            let mut r = need(24)?;
            Command::ResourceFlush { rect: Rect::parse(&mut r, 0), resource_id: r.u32(16) }
        }
        cmd::TRANSFER_TO_HOST_2D => {
            let mut r = need(32)?;
            Command::TransferToHost2d {
                rect: Rect::parse(&mut r, 0),
                offset: r.u64(16),
                resource_id: r.u32(24),
            }
        }
        cmd::RESOURCE_ATTACH_BACKING => {
            let mut r = need(8)?;
            let resource_id = r.u32(0);
            let count = r.u32(4) as usize;
            if count > MAX_BACKING_ENTRIES {
                return Err(GpuError::InvalidParameter(format!(
                    "attach-backing with {count} entries; at most {MAX_BACKING_ENTRIES} are accepted"
                )));
            }
            let raw = body.get(8..8 + count * MEM_ENTRY_SIZE).ok_or_else(|| {
                GpuError::Unspec(format!(
                    "attach-backing announces {count} entries but carries {} bytes of them",
                    body.len().saturating_sub(8)
                ))
            })?;
            let entries = raw
                .chunks_exact(MEM_ENTRY_SIZE)
                .map(|e| {
                    let mut f = Fields(e);
                    MemEntry { addr: f.u64(0), length: f.u32(8) }
                })
                .collect();
            Command::AttachBacking { resource_id, entries }
        }
        cmd::RESOURCE_DETACH_BACKING => Command::DetachBacking { resource_id: need(8)?.u32(0) },
        cmd::UPDATE_CURSOR | cmd::MOVE_CURSOR => {
            let mut r = need(32)?;
            let pos = CursorPos { scanout_id: r.u32(0), x: r.u32(4), y: r.u32(8) };
            if kind == cmd::MOVE_CURSOR {
                Command::MoveCursor { pos }
            } else {
                Command::UpdateCursor { pos, resource_id: r.u32(16), hot_x: r.u32(20), hot_y: r.u32(24) }
            }
        }
        cmd::GET_CAPSET_INFO | cmd::GET_CAPSET => {
            return Err(GpuError::Unspec("no capsets: this is a 2D device (VIRGL is not offered)".into()));
        }
        other => return Err(GpuError::Unspec(format!("unknown or unsupported command {other:#06x}"))),
    })
}

/// Little-endian field reads from a slice already checked to be long enough.
struct Fields<'a>(&'a [u8]);

impl Fields<'_> {
    fn u32(&mut self, at: usize) -> u32 {
        let mut b = [0u8; 4];
        b.copy_from_slice(&self.0[at..at + 4]);
        u32::from_le_bytes(b)
    }

    fn u64(&mut self, at: usize) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.0[at..at + 8]);
        u64::from_le_bytes(b)
    }
}

/// One scanout's entry in `virtio_gpu_resp_display_info`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DisplayOne {
    pub rect: Rect,
    pub enabled: bool,
}

/// The size of `virtio_gpu_resp_display_info`.
pub const DISPLAY_INFO_SIZE: usize = HEADER_SIZE + MAX_SCANOUTS * 24;

/// Encodes `virtio_gpu_resp_display_info` (the header comes from the request).
pub fn display_info_response(header: &Header, displays: &[DisplayOne]) -> Vec<u8> {
    let mut out = vec![0u8; DISPLAY_INFO_SIZE];
    out[..HEADER_SIZE].copy_from_slice(&header.response(resp::OK_DISPLAY_INFO));
    for (i, d) in displays.iter().take(MAX_SCANOUTS).enumerate() {
        let at = HEADER_SIZE + i * 24;
        d.rect.write(&mut out[at..at + 16]);
        out[at + 16..at + 20].copy_from_slice(&u32::from(d.enabled).to_le_bytes());
    }
    out
}

/// Decodes the displays of a `virtio_gpu_resp_display_info` body (after the header), e.g. the
/// one QEMU answers over the vhost-user GPU socket.
pub fn parse_display_info(pmodes: &[u8]) -> Vec<DisplayOne> {
    pmodes
        .chunks_exact(24)
        .take(MAX_SCANOUTS)
        .map(|m| {
            let mut f = Fields(m);
            DisplayOne { rect: Rect::parse(&mut f, 0), enabled: f.u32(16) != 0 }
        })
        .collect()
}

/// Encodes `virtio_gpu_resp_edid`.
pub fn edid_response(header: &Header, edid: &[u8]) -> Vec<u8> {
    let len = edid.len().min(EDID_BLOB_SIZE);
    let mut out = vec![0u8; HEADER_SIZE + 8 + EDID_BLOB_SIZE];
    out[..HEADER_SIZE].copy_from_slice(&header.response(resp::OK_EDID));
    out[HEADER_SIZE..HEADER_SIZE + 4].copy_from_slice(&(len as u32).to_le_bytes());
    out[HEADER_SIZE + 8..HEADER_SIZE + 8 + len].copy_from_slice(&edid[..len]);
    out
}

pub mod encode {
    //! Request encoders: what a driver sends, for tests, the benchmark and the fuzz target.
    use super::*;

    pub fn header(kind: u32, flags: u32, fence_id: u64) -> Vec<u8> {
        let mut out = vec![0u8; HEADER_SIZE];
        out[0..4].copy_from_slice(&kind.to_le_bytes());
        out[4..8].copy_from_slice(&flags.to_le_bytes());
        out[8..16].copy_from_slice(&fence_id.to_le_bytes());
        out
    }

    pub fn with_u32s(kind: u32, values: &[u32]) -> Vec<u8> {
        let mut out = header(kind, 0, 0);
        values.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes()));
        out
    }

    pub fn create_2d(id: u32, format: u32, width: u32, height: u32) -> Vec<u8> {
        with_u32s(cmd::RESOURCE_CREATE_2D, &[id, format, width, height])
    }

    pub fn attach(id: u32, entries: &[(u64, u32)]) -> Vec<u8> {
        let mut out = with_u32s(cmd::RESOURCE_ATTACH_BACKING, &[id, entries.len() as u32]);
        for (addr, len) in entries {
            out.extend_from_slice(&addr.to_le_bytes());
            out.extend_from_slice(&len.to_le_bytes());
            out.extend_from_slice(&0u32.to_le_bytes());
        }
        out
    }

    pub fn transfer(id: u32, r: Rect, offset: u64) -> Vec<u8> {
        let mut out = with_u32s(cmd::TRANSFER_TO_HOST_2D, &[r.x, r.y, r.width, r.height]);
        out.extend_from_slice(&offset.to_le_bytes());
        out.extend_from_slice(&id.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out
    }

    pub fn set_scanout(scanout: u32, id: u32, r: Rect) -> Vec<u8> {
        with_u32s(cmd::SET_SCANOUT, &[r.x, r.y, r.width, r.height, scanout, id])
    }

    pub fn flush(id: u32, r: Rect) -> Vec<u8> {
        with_u32s(cmd::RESOURCE_FLUSH, &[r.x, r.y, r.width, r.height, id, 0])
    }

    pub fn cursor(kind: u32, scanout: u32, x: u32, y: u32, id: u32, hot: (u32, u32)) -> Vec<u8> {
        with_u32s(kind, &[scanout, x, y, 0, id, hot.0, hot.1, 0])
    }
}

#[cfg(test)]
mod tests {
    use super::encode::*;
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn requests_parse_into_commands() {
        let r = parse(&create_2d(7, 2, 640, 480)).unwrap();
        assert_eq!(
            r.command,
            Ok(Command::ResourceCreate2d { resource_id: 7, format: 2, width: 640, height: 480 })
        );
        let r = parse(&attach(7, &[(0x1000, 4096), (0x8000, 100)])).unwrap();
        assert_eq!(
            r.command,
            Ok(Command::AttachBacking {
                resource_id: 7,
                entries: vec![
                    MemEntry { addr: 0x1000, length: 4096 },
                    MemEntry { addr: 0x8000, length: 100 }
                ]
            })
        );
        let r = parse(&transfer(7, Rect::new(1, 2, 3, 4), 99)).unwrap();
        assert_eq!(
            r.command,
            Ok(Command::TransferToHost2d { rect: Rect::new(1, 2, 3, 4), offset: 99, resource_id: 7 })
        );
        let r = parse(&cursor(cmd::UPDATE_CURSOR, 1, 10, 20, 5, (3, 4))).unwrap();
        assert_eq!(
            r.command,
            Ok(Command::UpdateCursor {
                pos: CursorPos { scanout_id: 1, x: 10, y: 20 },
                resource_id: 5,
                hot_x: 3,
                hot_y: 4
            })
        );
    }

    #[test]
    fn malformed_requests_get_the_right_error() {
        assert_eq!(parse(&[0u8; 8]), None, "no header");
        let truncated = &create_2d(1, 2, 3, 4)[..HEADER_SIZE + 8];
        assert!(matches!(parse(truncated).unwrap().command, Err(GpuError::Unspec(_))));
        let unknown = header(0x0999, 0, 0);
        assert_eq!(parse(&unknown).unwrap().command.unwrap_err().response_type(), resp::ERR_UNSPEC);
        // A count far beyond what the buffer carries is refused without allocating for it.
        let mut lying = attach(1, &[(0x1000, 4096)]);
        lying[HEADER_SIZE + 4..HEADER_SIZE + 8].copy_from_slice(&9_000u32.to_le_bytes());
        assert!(matches!(parse(&lying).unwrap().command, Err(GpuError::Unspec(_))));
        lying[HEADER_SIZE + 4..HEADER_SIZE + 8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(parse(&lying).unwrap().command, Err(GpuError::InvalidParameter(_))));
    }

    #[test]
    fn responses_echo_the_fence_only_when_asked() {
        let fenced = parse(&header(cmd::RESOURCE_FLUSH, FLAG_FENCE, 42)).unwrap().header;
        let out = fenced.response(resp::OK_NODATA);
        assert_eq!(u32::from_le_bytes(out[0..4].try_into().unwrap()), resp::OK_NODATA);
        assert_eq!(u32::from_le_bytes(out[4..8].try_into().unwrap()), FLAG_FENCE);
        assert_eq!(u64::from_le_bytes(out[8..16].try_into().unwrap()), 42);
        let plain = parse(&header(cmd::RESOURCE_FLUSH, 0, 42)).unwrap().header;
        assert_eq!(plain.response(resp::OK_NODATA)[4..16], [0u8; 12]);
    }

    #[test]
    fn display_info_round_trips() {
        let displays = [
            DisplayOne { rect: Rect::new(0, 0, 1024, 768), enabled: true },
            DisplayOne { rect: Rect::new(1024, 0, 800, 600), enabled: false },
        ];
        let out = display_info_response(&Header::default(), &displays);
        assert_eq!(out.len(), DISPLAY_INFO_SIZE);
        let back = parse_display_info(&out[HEADER_SIZE..]);
        assert_eq!(back[..2], displays);
        assert!(back[2..].iter().all(|d| !d.enabled));
    }

    #[test]
    fn rectangles_are_checked_without_overflow() {
        assert!(Rect::new(0, 0, 64, 64).within(64, 64));
        assert!(!Rect::new(1, 0, 64, 64).within(64, 64));
        assert!(!Rect::new(u32::MAX, 0, 2, 1).within(u32::MAX, 1));
        assert_eq!(Rect::new(0, 0, 10, 10).intersect(&Rect::new(5, 5, 10, 10)), Rect::new(5, 5, 5, 5));
        assert!(Rect::new(0, 0, 10, 10).intersect(&Rect::new(10, 0, 5, 5)).is_empty());
        assert_eq!(Rect::new(0, 0, 1, 1).union(&Rect::new(9, 9, 1, 1)), Rect::new(0, 0, 10, 10));
    }

    proptest! {
        #[test]
        fn any_bytes_parse_or_fail_cleanly(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = parse(&bytes);
        }

        #[test]
        fn any_known_command_with_any_body_parses_or_fails_cleanly(
            kind in prop_oneof![Just(cmd::RESOURCE_ATTACH_BACKING), Just(cmd::SET_SCANOUT), Just(cmd::UPDATE_CURSOR)],
            body in proptest::collection::vec(any::<u8>(), 0..300),
        ) {
            let mut bytes = header(kind, 0, 0);
            bytes.extend(body);
            let _ = parse(&bytes);
        }
    }
}
