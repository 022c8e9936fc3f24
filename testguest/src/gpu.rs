//! virtio-gpu in 2D mode (virtio 1.2, 5.7): the control queue (0) and the cursor queue (1),
//! driven the way a 2D driver does, and in hostile mode first with malformed and out-of-range
//! commands.
//!
//! Only `VIRTIO_F_VERSION_1` and `VIRTIO_GPU_F_EDID` are accepted. Every control request is a
//! chain of one device-readable descriptor (the request) and one device-writable descriptor
//! (the response, [`RESPONSE_LEN`] bytes), one request in flight at a time; every wait is
//! bounded (a device that does not answer gives an error, never a hang).
//!
//! ## Normal path
//!
//! 1. `GET_DISPLAY_INFO`: `OK_DISPLAY_INFO`, scanout 0 enabled with a non-zero size;
//!    `num_scanouts` (configuration) between 1 and 16.
//! 2. `GET_EDID` for scanout 0 when `VIRTIO_GPU_F_EDID` was accepted: `OK_EDID`, size ≥ 128,
//!    the EDID header `00 FF FF FF FF FF FF 00`, the first block's checksum 0.
//! 3. `RESOURCE_CREATE_2D` id 1, `B8G8R8X8_UNORM`, 64x64; `RESOURCE_ATTACH_BACKING` with the
//!    16 KiB backing in three pieces of odd sizes, out of order in memory; a test pattern;
//!    `TRANSFER_TO_HOST_2D`; `SET_SCANOUT` 0 → 1; `RESOURCE_FLUSH` with
//!    `VIRTIO_GPU_FLAG_FENCE`: the response carries the flag and the same `fence_id`.
//! 4. Cursor: resource 2 (64x64, backing, transferred), then `UPDATE_CURSOR` and `MOVE_CURSOR`
//!    on the cursor queue (no response; the buffer must come back used).
//! 5. `SET_SCANOUT` 0 → resource 0 (disable), `RESOURCE_DETACH_BACKING`, `RESOURCE_UNREF`.
//!
//! Every command but the cursor ones must be answered `OK_NODATA` (0x1100) unless said
//! otherwise above.
//!
//! ## Hostile checks (`mode=hostile`, before the normal path)
//!
//! Fixtures: resource 10 (64x64 with backing) and resource 11 (64x64, no backing). After every
//! check a `GET_DISPLAY_INFO` must still be answered. A device that does not answer a check
//! (`timeout`) or stops answering after it (`stopped-answering`) fails the check and is reset
//! and set up again (counted as `recovered`). The expected answers are
//! the spec's (5.7.6.7/5.7.6.8); where the spec names no error code the table says which
//! one a device must give (the one that fits its description):
//!
//! | check | request | expected |
//! | --- | --- | --- |
//! | `unknown-command` | type 0x0777 | `ERR_UNSPEC` 0x1200 |
//! | `truncated-header` | 8 bytes of a `GET_DISPLAY_INFO` header | `ERR_UNSPEC` |
//! | `create-id-0` | create 2D with resource id 0 | `ERR_INVALID_RESOURCE_ID` 0x1203 |
//! | `create-duplicate` | create 2D with id 10 again | `ERR_INVALID_RESOURCE_ID` |
//! | `create-bad-format` | format 0x77 | `ERR_INVALID_PARAMETER` 0x1205 |
//! | `create-width-0` | 0x64 | `ERR_INVALID_PARAMETER` or `ERR_OUT_OF_MEMORY` 0x1201 |
//! | `create-height-0` | 64x0 | the same |
//! | `create-width-2g` | (1 << 31)x1 | the same |
//! | `create-overflow` | 0x10000 x 0x10000 (w·h·4 overflows 32 bits) | the same |
//! | `create-max` | 0xFFFFFFFF x 0xFFFFFFFF | the same |
//! | `transfer-outside` | transfer 32,32 64x64 on the 64x64 resource 10 | `ERR_INVALID_PARAMETER` |
//! | `transfer-x-overflow` | x 16, width 0xFFFFFFF8 (x + width wraps to 8) | `ERR_INVALID_PARAMETER` |
//! | `flush-outside` | flush 0,0 65x64 | `ERR_INVALID_PARAMETER` |
//! | `flush-y-overflow` | y 32, height 0xFFFFFFF0 | `ERR_INVALID_PARAMETER` |
//! | `scanout-outside` | scanout 0 → 10, 0,0 128x64 | `ERR_INVALID_PARAMETER` |
//! | `scanout-x-overflow` | x 0xFFFFFFC0, width 0x80 | `ERR_INVALID_PARAMETER` |
//! | `scanout-id-99` | scanout 99 → 10 | `ERR_INVALID_SCANOUT_ID` 0x1202 |
//! | `scanout-unknown-resource` | scanout 0 → 0xDEAD | `ERR_INVALID_RESOURCE_ID` |
//! | `unref-unknown` | unref 0xDEAD | `ERR_INVALID_RESOURCE_ID` |
//! | `attach-unknown` | attach backing to 0xDEAD | `ERR_INVALID_RESOURCE_ID` |
//! | `detach-unknown` | detach backing from 0xDEAD | `ERR_INVALID_RESOURCE_ID` |
//! | `transfer-unknown` | transfer to 0xDEAD | `ERR_INVALID_RESOURCE_ID` |
//! | `flush-unknown` | flush 0xDEAD | `ERR_INVALID_RESOURCE_ID` |
//! | `transfer-no-backing` | transfer to resource 11 | `ERR_UNSPEC` |
//! | `attach-outside-ram` | resource 11, one entry at 1 << 50 | `ERR_INVALID_PARAMETER` or `ERR_UNSPEC` |
//! | `attach-nr-entries-huge` | resource 11, `nr_entries` 0xFFFFFFFF, one entry in the buffer | any error 0x1200–0x1205 |
//! | `many-resources` | 2,000 creates of 1x1 (ids 1000…), then unref of each | each create `OK_NODATA` or `ERR_OUT_OF_MEMORY`, each unref of a created one `OK_NODATA` |
//!
//! A create that unexpectedly succeeds is unref'd again; an attach that unexpectedly succeeds
//! is detached again.
//!
//! A reference device may answer a check differently from the spec; the command line can
//! name such checks (`gpu_deviations=NAME,…`): their answers are then reported as deviations
//! instead of failures, so a test against that device states exactly which answers it
//! tolerates.

use core::fmt::{self, Write};

use crate::config::Mode;
use crate::devices::REQUEST_TIMEOUT_MS;
use crate::dma::{self, DeviceMemory};
use crate::memory::PhysAddr;
use crate::report::{Errors, FixedStr, JsonStr};
use crate::serial::log;
use crate::virtio::{DESC_F_NEXT, DESC_F_WRITE, Descriptor, VirtioError, VirtioPci, Virtqueue};

pub const VIRTIO_GPU_F_EDID: u64 = 1 << 1;

// Command types.
const CMD_GET_DISPLAY_INFO: u32 = 0x0100;
const CMD_RESOURCE_CREATE_2D: u32 = 0x0101;
const CMD_RESOURCE_UNREF: u32 = 0x0102;
const CMD_SET_SCANOUT: u32 = 0x0103;
const CMD_RESOURCE_FLUSH: u32 = 0x0104;
const CMD_TRANSFER_TO_HOST_2D: u32 = 0x0105;
const CMD_RESOURCE_ATTACH_BACKING: u32 = 0x0106;
const CMD_RESOURCE_DETACH_BACKING: u32 = 0x0107;
const CMD_GET_EDID: u32 = 0x010A;
const CMD_UPDATE_CURSOR: u32 = 0x0300;
const CMD_MOVE_CURSOR: u32 = 0x0301;
/// No command has this type.
const CMD_UNKNOWN: u32 = 0x0777;

// Response types.
pub const OK_NODATA: u32 = 0x1100;
pub const OK_DISPLAY_INFO: u32 = 0x1101;
pub const OK_EDID: u32 = 0x1104;
pub const ERR_UNSPEC: u32 = 0x1200;
pub const ERR_OUT_OF_MEMORY: u32 = 0x1201;
pub const ERR_INVALID_SCANOUT_ID: u32 = 0x1202;
pub const ERR_INVALID_RESOURCE_ID: u32 = 0x1203;
pub const ERR_INVALID_CONTEXT_ID: u32 = 0x1204;
pub const ERR_INVALID_PARAMETER: u32 = 0x1205;

const FLAG_FENCE: u32 = 1;
const FORMAT_B8G8R8X8_UNORM: u32 = 2;

const HDR_LEN: u32 = 24;
/// The most scanouts the spec allows (`VIRTIO_GPU_MAX_SCANOUTS`).
pub const MAX_SCANOUTS: usize = 16;
const EDID_HEADER: [u8; 8] = [0, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0];

// Configuration (5.7.4).
const CFG_NUM_SCANOUTS: u64 = 8;

/// In the device slot's buffer page: the control request, the cursor request, the response.
const REQUEST_AT: u64 = 0;
const CURSOR_REQUEST_AT: u64 = 0x600;
const RESPONSE_AT: u64 = 0x800;
pub const RESPONSE_LEN: u32 = 0x800;
/// A `virtio_gpu_update_cursor`.
const CURSOR_REQUEST_LEN: u32 = 56;

/// The images: 64x64, 32 bits per pixel.
const SIDE: u32 = 64;
const IMAGE_BYTES: u64 = (SIDE * SIDE * 4) as u64;
/// Resource 1's backing in the large area: (offset in the image, offset in the area, length);
/// three pieces of odd sizes, the second below the first in memory, a gap before the third.
const PIECES: [(u64, u64, u64); 3] = [(0, 0x2000, 0x1400), (0x1400, 0, 0x1C00), (0x3000, 0x3800, 0x1000)];
/// Resource 2's (and the hostile fixture's) backing in the large area: one piece.
const CURSOR_BACKING: u64 = 0x5000;

const IMAGE: u32 = 1;
const CURSOR: u32 = 2;
const FIXTURE: u32 = 10;
const FIXTURE_NO_BACKING: u32 = 11;
const UNKNOWN_ID: u32 = 0xDEAD;
const FENCE_ID: u64 = 0x1234_5678_9ABC_DEF0;

/// How long a hostile request gets before the device counts as stuck.
const HOSTILE_TIMEOUT_MS: u64 = 1000;
/// Creates in the `many-resources` check.
const MANY: u32 = 2000;
const MANY_FIRST_ID: u32 = 1000;

/// What came back for a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Got {
    Code(u32),
    /// No used buffer in time.
    Timeout,
    /// The device returned a descriptor that was not the request's.
    BadUsed,
    /// Answered, but `GET_DISPLAY_INFO` got no answer afterwards.
    Stopped,
}

impl fmt::Display for Got {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Code(c) => write!(f, "{c:#x}"),
            Self::Timeout => f.write_str("timeout"),
            Self::BadUsed => f.write_str("bad-used"),
            Self::Stopped => f.write_str("stopped-answering"),
        }
    }
}

/// Response types, for messages: `0x1205|0x1201`.
#[derive(Debug, Clone, Copy)]
struct Codes(&'static [u32]);

impl fmt::Display for Codes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, c) in self.0.iter().enumerate() {
            write!(f, "{}{c:#06x}", if i > 0 { "|" } else { "" })?;
        }
        Ok(())
    }
}

/// A response header and the used length.
#[derive(Debug, Clone, Copy)]
struct Response {
    kind: u32,
    flags: u32,
    fence_id: u64,
    len: u32,
}

#[derive(Debug, Clone, Copy)]
pub enum GpuError {
    Virtio(VirtioError),
    /// A command got the wrong response type.
    Response {
        command: u32,
        want: u32,
        got: u32,
    },
    /// The response was shorter than its type needs.
    Short {
        command: u32,
        len: u32,
    },
    ScanoutCount(u32),
    Display {
        enabled: bool,
        width: u32,
        height: u32,
    },
    Edid(&'static str),
    Fence {
        flags: u32,
        fence_id: u64,
    },
    /// The control queue has room for less than one request.
    QueueTooSmall(u16),
    /// Hostile checks that failed (each is also in the errors).
    Hostile(u32),
}

impl From<VirtioError> for GpuError {
    fn from(e: VirtioError) -> Self {
        Self::Virtio(e)
    }
}

impl fmt::Display for GpuError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Virtio(e) => e.fmt(f),
            Self::Response { command, want, got } => {
                write!(f, "command {command:#06x} answered {got:#06x}, want {want:#06x}")
            }
            Self::Short { command, len } => write!(f, "command {command:#06x}: response of only {len} bytes"),
            Self::ScanoutCount(n) => write!(f, "num_scanouts is {n}, want 1 to {MAX_SCANOUTS}"),
            Self::Display { enabled, width, height } => {
                write!(f, "scanout 0: enabled {enabled}, {width}x{height}")
            }
            Self::Edid(what) => write!(f, "EDID: {what}"),
            Self::Fence { flags, fence_id } => write!(
                f,
                "fenced flush answered flags {flags:#x} fence_id {fence_id:#x}, want the fence flag and {FENCE_ID:#x}"
            ),
            Self::QueueTooSmall(n) => write!(f, "the control queue has {n} entries, want 2 at least"),
            Self::Hostile(n) => write!(f, "{n} hostile checks failed"),
        }
    }
}

/// A hostile check whose answer was not the expected one.
#[derive(Debug, Clone, Copy)]
pub struct Mismatch {
    pub case: &'static str,
    pub got: Got,
    /// Named in `gpu_deviations=`: reported, not a failure.
    pub tolerated: bool,
}

const MAX_MISMATCHES: usize = 12;

/// What the hostile checks found.
#[derive(Debug, Clone, Copy, Default)]
pub struct GpuHostile {
    pub checked: u32,
    pub passed: u32,
    /// Resets needed because the device stopped answering.
    pub recovered: u32,
    pub failed: u32,
    mismatches: [Option<Mismatch>; MAX_MISMATCHES],
}

impl GpuHostile {
    fn record(&mut self, m: Mismatch) {
        if !m.tolerated {
            self.failed += 1;
        }
        if let Some(slot) = self.mismatches.iter_mut().find(|s| s.is_none()) {
            *slot = Some(m);
        }
    }

    pub fn write_json(&self, out: &mut impl Write) -> fmt::Result {
        write!(
            out,
            "{{\"checked\":{},\"passed\":{},\"failed\":{},\"recovered\":{}",
            self.checked, self.passed, self.failed, self.recovered
        )?;
        for (key, tolerated) in [("deviations", true), ("failures", false)] {
            write!(out, ",\"{key}\":{{")?;
            let list = self.mismatches.iter().flatten().filter(|m| m.tolerated == tolerated);
            for (i, m) in list.enumerate() {
                let mut got = FixedStr::<16>::new();
                let _ = write!(got, "{}", m.got);
                write!(out, "{}{}:{}", if i > 0 { "," } else { "" }, JsonStr(m.case), JsonStr(got.as_str()))?;
            }
            out.write_char('}')?;
        }
        out.write_char('}')
    }
}

/// What the result line says about a GPU.
#[derive(Debug, Clone, Copy, Default)]
pub struct GpuResult {
    pub scanouts: u32,
    /// (width, height, enabled) of the first `scanouts` scanouts.
    pub display: [(u32, u32, bool); MAX_SCANOUTS],
    /// `VIRTIO_GPU_F_EDID` was accepted and scanout 0's EDID checked.
    pub edid: bool,
    pub edid_size: u32,
    pub fence: bool,
    pub cursor: bool,
    /// Commands sent on both queues by the normal path.
    pub commands: u32,
    pub hostile: Option<GpuHostile>,
}

impl GpuResult {
    pub fn write_json(&self, out: &mut impl Write) -> fmt::Result {
        write!(out, ",\"scanouts\":{},\"display\":[", self.scanouts)?;
        let shown = &self.display[..(self.scanouts as usize).min(MAX_SCANOUTS)];
        for (i, (w, h, _)) in shown.iter().enumerate() {
            write!(out, "{}[{w},{h}]", if i > 0 { "," } else { "" })?;
        }
        out.write_str("],\"enabled\":[")?;
        for (i, (_, _, enabled)) in shown.iter().enumerate() {
            write!(out, "{}{enabled}", if i > 0 { "," } else { "" })?;
        }
        write!(
            out,
            "],\"edid\":{},\"edid_size\":{},\"fence\":{},\"cursor\":{},\"commands\":{}",
            self.edid, self.edid_size, self.fence, self.cursor, self.commands
        )?;
        if let Some(h) = &self.hostile {
            out.write_str(",\"hostile\":")?;
            h.write_json(out)?;
        }
        Ok(())
    }
}

/// A rectangle (`virtio_gpu_rect`).
#[derive(Debug, Clone, Copy)]
struct Rect {
    x: u32,
    y: u32,
    width: u32,
    height: u32,
}

const FULL: Rect = Rect { x: 0, y: 0, width: SIDE, height: SIDE };

/// A GPU with its queues running.
struct Gpu<'a> {
    device: &'a mut VirtioPci,
    memory: DeviceMemory,
    control: Virtqueue,
    cursor: Virtqueue,
    edid: bool,
    commands: u32,
    timeout_ms: u64,
}

/// Tests the GPU at `device`: in hostile mode the hostile checks first (tolerating the
/// answers of the checks named in `deviations`, a bit per [`CASES`] index), then the normal
/// path; leaves the device reset. The result is filled in as far as the test got.
pub fn test(
    device: &mut VirtioPci,
    memory: &DeviceMemory,
    mode: Mode,
    deviations: u64,
    errors: &mut Errors,
) -> (GpuResult, Result<(), GpuError>) {
    let mut result = GpuResult::default();
    if mode == Mode::Hostile {
        match hostile(device, memory, deviations, errors) {
            Ok(h) => result.hostile = Some(h),
            Err(e) => return (result, Err(e)),
        }
    }
    let outcome = Gpu::start(device, memory).and_then(|mut gpu| {
        let outcome = gpu.normal(&mut result);
        result.commands = gpu.commands;
        let _ = gpu.device.reset();
        outcome
    });
    let failed = result.hostile.map_or(0, |h| h.failed);
    let outcome = outcome.and(if failed > 0 { Err(GpuError::Hostile(failed)) } else { Ok(()) });
    (result, outcome)
}

impl<'a> Gpu<'a> {
    fn start(device: &'a mut VirtioPci, memory: &DeviceMemory) -> Result<Self, GpuError> {
        let accepted = device.negotiate(VIRTIO_GPU_F_EDID)?;
        let [Some(control), Some(cursor)] = device.start(memory, 2)? else {
            return Err(VirtioError::QueueUnavailable(1).into());
        };
        // A request and its response take two descriptors.
        if control.size < 2 {
            let _ = device.reset();
            return Err(GpuError::QueueTooSmall(control.size));
        }
        Ok(Self {
            device,
            memory: *memory,
            control,
            cursor,
            edid: accepted & VIRTIO_GPU_F_EDID != 0,
            commands: 0,
            timeout_ms: REQUEST_TIMEOUT_MS,
        })
    }

    fn request(&self) -> PhysAddr {
        self.memory.buffer.add(REQUEST_AT)
    }

    fn response(&self) -> PhysAddr {
        self.memory.buffer.add(RESPONSE_AT)
    }

    /// Starts a control request: the header with `kind` (no flags, no fence, context 0).
    fn begin(&self, kind: u32) {
        self.header(self.request(), kind, 0, 0);
    }

    fn header(&self, at: PhysAddr, kind: u32, flags: u32, fence_id: u64) {
        dma::write_u32(at, kind);
        dma::write_u32(at.add(4), flags);
        dma::write_u64(at.add(8), fence_id);
        dma::write_u32(at.add(16), 0); // ctx_id
        dma::write_u32(at.add(20), 0); // ring_idx, padding
    }

    /// Writes `values` into the request from byte `offset`.
    fn put(&self, offset: u64, values: &[u32]) {
        for (i, v) in values.iter().enumerate() {
            dma::write_u32(self.request().add(offset + 4 * i as u64), *v);
        }
    }

    fn put_rect(&self, offset: u64, r: Rect) {
        self.put(offset, &[r.x, r.y, r.width, r.height]);
    }

    /// Sends the first `len` bytes of the request on the control queue and waits for the
    /// response.
    fn submit(&mut self, len: u32) -> Result<Response, VirtioError> {
        dma::fill(self.response(), 64, 0);
        let (request, response) = (self.request(), self.response());
        let q = &mut self.control;
        q.write_descriptor(0, Descriptor { addr: request.0, len, flags: DESC_F_NEXT, next: 1 });
        q.write_descriptor(
            1,
            Descriptor { addr: response.0, len: RESPONSE_LEN, flags: DESC_F_WRITE, next: 0 },
        );
        q.publish(0);
        self.device.notify(q);
        self.commands += 1;
        let used = self.device.wait_used(q, self.timeout_ms).ok_or(VirtioError::Timeout(q.index))?;
        if used.id != 0 {
            return Err(VirtioError::BadUsed { queue: q.index, id: used.id });
        }
        let at = self.response();
        Ok(Response {
            kind: dma::read_u32(at),
            flags: dma::read_u32(at.add(4)),
            fence_id: u64::from(dma::read_u32(at.add(8))) | u64::from(dma::read_u32(at.add(12))) << 32,
            len: used.len,
        })
    }

    /// [`Self::submit`], and the response must be `want`.
    fn expect(&mut self, len: u32, want: u32) -> Result<Response, GpuError> {
        let command = dma::read_u32(self.request());
        let response = self.submit(len)?;
        if response.kind != want {
            return Err(GpuError::Response { command, want, got: response.kind });
        }
        if response.len < HDR_LEN {
            return Err(GpuError::Short { command, len: response.len });
        }
        Ok(response)
    }

    fn create_2d(&mut self, id: u32, format: u32, width: u32, height: u32) -> Result<Response, VirtioError> {
        self.begin(CMD_RESOURCE_CREATE_2D);
        self.put(24, &[id, format, width, height]);
        self.submit(40)
    }

    /// `RESOURCE_UNREF`, `RESOURCE_DETACH_BACKING` (same layout).
    fn with_id(&mut self, kind: u32, id: u32) -> Result<Response, VirtioError> {
        self.begin(kind);
        self.put(24, &[id, 0]);
        self.submit(32)
    }

    /// `RESOURCE_ATTACH_BACKING` with `entries` (address, length) in the request.
    fn attach(&mut self, id: u32, entries: &[(u64, u32)]) -> Result<Response, VirtioError> {
        self.begin(CMD_RESOURCE_ATTACH_BACKING);
        self.put(24, &[id, entries.len() as u32]);
        for (i, (addr, len)) in entries.iter().enumerate() {
            let at = 32 + 16 * i as u64;
            self.put(at, &[*addr as u32, (*addr >> 32) as u32, *len, 0]);
        }
        self.submit(32 + 16 * entries.len() as u32)
    }

    fn transfer(&mut self, id: u32, r: Rect) -> Result<Response, VirtioError> {
        self.begin(CMD_TRANSFER_TO_HOST_2D);
        self.put_rect(24, r);
        self.put(40, &[0, 0, id, 0]); // offset (u64), resource_id, padding
        self.submit(56)
    }

    fn set_scanout(&mut self, scanout: u32, id: u32, r: Rect) -> Result<Response, VirtioError> {
        self.begin(CMD_SET_SCANOUT);
        self.put_rect(24, r);
        self.put(40, &[scanout, id]);
        self.submit(48)
    }

    fn flush(&mut self, id: u32, r: Rect) -> Result<Response, VirtioError> {
        self.begin(CMD_RESOURCE_FLUSH);
        self.put_rect(24, r);
        self.put(40, &[id, 0]);
        self.submit(48)
    }

    fn display_info(&mut self) -> Result<Response, VirtioError> {
        self.begin(CMD_GET_DISPLAY_INFO);
        self.submit(HDR_LEN)
    }

    /// Sends a cursor command on the cursor queue; the buffer must come back.
    fn cursor_command(&mut self, kind: u32, x: u32, y: u32, id: u32) -> Result<(), VirtioError> {
        let at = self.memory.buffer.add(CURSOR_REQUEST_AT);
        self.header(at, kind, 0, 0);
        for (i, v) in [0, x, y, 0, id, 8, 8, 0].iter().enumerate() {
            dma::write_u32(at.add(24 + 4 * i as u64), *v); // pos, resource_id, hot_x, hot_y
        }
        let q = &mut self.cursor;
        q.write_descriptor(0, Descriptor { addr: at.0, len: CURSOR_REQUEST_LEN, flags: 0, next: 0 });
        q.publish(0);
        self.device.notify(q);
        self.commands += 1;
        let used = self.device.wait_used(q, self.timeout_ms).ok_or(VirtioError::Timeout(q.index))?;
        if used.id != 0 {
            return Err(VirtioError::BadUsed { queue: q.index, id: used.id });
        }
        Ok(())
    }

    /// The number of scanouts from the configuration.
    fn scanouts(&self) -> Result<u32, GpuError> {
        let n = self.device.device_cfg.map_or(0, |c| c.read32(CFG_NUM_SCANOUTS));
        if n == 0 || n as usize > MAX_SCANOUTS {
            return Err(GpuError::ScanoutCount(n));
        }
        Ok(n)
    }

    fn normal(&mut self, result: &mut GpuResult) -> Result<(), GpuError> {
        result.scanouts = self.scanouts()?;
        self.check_display(result)?;
        if self.edid {
            result.edid_size = self.check_edid()?;
            result.edid = true;
        }

        let ok = |r: Result<Response, VirtioError>, command: u32| -> Result<(), GpuError> {
            let r = r?;
            if r.kind != OK_NODATA {
                return Err(GpuError::Response { command, want: OK_NODATA, got: r.kind });
            }
            Ok(())
        };
        let area = dma::large_area();
        ok(self.create_2d(IMAGE, FORMAT_B8G8R8X8_UNORM, SIDE, SIDE), CMD_RESOURCE_CREATE_2D)?;
        let entries = PIECES.map(|(_, at, len)| (area.add(at).0, len as u32));
        ok(self.attach(IMAGE, &entries), CMD_RESOURCE_ATTACH_BACKING)?;
        write_pattern(|offset| image_addr(area, offset), 0);
        ok(self.transfer(IMAGE, FULL), CMD_TRANSFER_TO_HOST_2D)?;
        ok(self.set_scanout(0, IMAGE, FULL), CMD_SET_SCANOUT)?;

        // The flush, fenced.
        self.header(self.request(), CMD_RESOURCE_FLUSH, FLAG_FENCE, FENCE_ID);
        self.put_rect(24, FULL);
        self.put(40, &[IMAGE, 0]);
        let r = self.expect(48, OK_NODATA)?;
        if r.flags & FLAG_FENCE == 0 || r.fence_id != FENCE_ID {
            return Err(GpuError::Fence { flags: r.flags, fence_id: r.fence_id });
        }
        result.fence = true;

        // The cursor.
        ok(self.create_2d(CURSOR, FORMAT_B8G8R8X8_UNORM, SIDE, SIDE), CMD_RESOURCE_CREATE_2D)?;
        let backing = area.add(CURSOR_BACKING);
        ok(self.attach(CURSOR, &[(backing.0, IMAGE_BYTES as u32)]), CMD_RESOURCE_ATTACH_BACKING)?;
        write_pattern(|offset| backing.add(offset), 0x80);
        ok(self.transfer(CURSOR, FULL), CMD_TRANSFER_TO_HOST_2D)?;
        self.cursor_command(CMD_UPDATE_CURSOR, 10, 10, CURSOR)?;
        self.cursor_command(CMD_MOVE_CURSOR, 20, 30, CURSOR)?;
        result.cursor = true;

        // Cleanup.
        ok(self.set_scanout(0, 0, Rect { x: 0, y: 0, width: 0, height: 0 }), CMD_SET_SCANOUT)?;
        for id in [IMAGE, CURSOR] {
            ok(self.with_id(CMD_RESOURCE_DETACH_BACKING, id), CMD_RESOURCE_DETACH_BACKING)?;
            ok(self.with_id(CMD_RESOURCE_UNREF, id), CMD_RESOURCE_UNREF)?;
        }
        log!("virtio-gpu: {} commands answered as expected", self.commands);
        Ok(())
    }

    fn check_display(&mut self, result: &mut GpuResult) -> Result<(), GpuError> {
        self.begin(CMD_GET_DISPLAY_INFO);
        let r = self.expect(HDR_LEN, OK_DISPLAY_INFO)?;
        let needed = HDR_LEN + 24 * result.scanouts;
        if r.len < needed {
            return Err(GpuError::Short { command: CMD_GET_DISPLAY_INFO, len: r.len });
        }
        for (i, slot) in result.display.iter_mut().enumerate().take(result.scanouts as usize) {
            let at = self.response().add(24 + 24 * i as u64);
            let (width, height) = (dma::read_u32(at.add(8)), dma::read_u32(at.add(12)));
            *slot = (width, height, dma::read_u32(at.add(16)) != 0);
        }
        let (width, height, enabled) = result.display[0];
        if !enabled || width == 0 || height == 0 {
            return Err(GpuError::Display { enabled, width, height });
        }
        Ok(())
    }

    /// Scanout 0's EDID: returns its size.
    fn check_edid(&mut self) -> Result<u32, GpuError> {
        self.begin(CMD_GET_EDID);
        self.put(24, &[0, 0]);
        let r = self.expect(32, OK_EDID)?;
        let size = dma::read_u32(self.response().add(24));
        if !(128..=1024).contains(&size) {
            return Err(GpuError::Edid("size outside 128..=1024"));
        }
        if r.len < 32 + 128 {
            return Err(GpuError::Short { command: CMD_GET_EDID, len: r.len });
        }
        let edid = self.response().add(32);
        let byte = |i: u64| dma::read_u8(edid.add(i));
        if (0..8).any(|i| byte(i) != EDID_HEADER[i as usize]) {
            return Err(GpuError::Edid("no EDID header"));
        }
        if (0..128).fold(0u8, |sum, i| sum.wrapping_add(byte(i))) != 0 {
            return Err(GpuError::Edid("block 0 checksum is not 0"));
        }
        Ok(size)
    }
}

/// Where byte `offset` of resource 1's image lies in its three-piece backing.
fn image_addr(area: PhysAddr, offset: u64) -> PhysAddr {
    let (start, at, _) =
        PIECES.iter().rev().find(|(start, _, _)| offset >= *start).copied().unwrap_or(PIECES[0]);
    area.add(at + (offset - start))
}

/// A 64x64 B8G8R8X8 test pattern (gradients, an XOR texture in red) through `addr`.
fn write_pattern(addr: impl Fn(u64) -> PhysAddr, tint: u32) {
    for y in 0..SIDE {
        for x in 0..SIDE {
            let pixel = 0xFF00_0000 | ((((x ^ y) * 4) | tint) << 16) | ((y * 4) << 8) | (x * 4);
            dma::write_u32(addr(u64::from(y * SIDE + x) * 4), pixel);
        }
    }
}

// ---- Hostile checks ----

const ANY_ERROR: &[u32] = &[
    ERR_UNSPEC,
    ERR_OUT_OF_MEMORY,
    ERR_INVALID_SCANOUT_ID,
    ERR_INVALID_RESOURCE_ID,
    ERR_INVALID_CONTEXT_ID,
    ERR_INVALID_PARAMETER,
];
const BAD_SIZE: &[u32] = &[ERR_INVALID_PARAMETER, ERR_OUT_OF_MEMORY];

type Check = fn(&mut Gpu<'_>) -> Result<Response, VirtioError>;

/// A create that must fail; if it does not, the resource goes again.
fn bad_create(
    gpu: &mut Gpu<'_>,
    id: u32,
    format: u32,
    width: u32,
    height: u32,
) -> Result<Response, VirtioError> {
    let r = gpu.create_2d(id, format, width, height)?;
    if r.kind == OK_NODATA {
        let _ = gpu.with_id(CMD_RESOURCE_UNREF, id);
    }
    Ok(r)
}

/// An attach to resource 11 that must fail; if it does not, the backing goes again.
fn bad_attach(gpu: &mut Gpu<'_>, nr_entries: u32, addr: u64) -> Result<Response, VirtioError> {
    gpu.begin(CMD_RESOURCE_ATTACH_BACKING);
    gpu.put(24, &[FIXTURE_NO_BACKING, nr_entries]);
    gpu.put(32, &[addr as u32, (addr >> 32) as u32, IMAGE_BYTES as u32, 0]);
    let r = gpu.submit(48)?;
    if r.kind == OK_NODATA {
        let _ = gpu.with_id(CMD_RESOURCE_DETACH_BACKING, FIXTURE_NO_BACKING);
    }
    Ok(r)
}

/// 2,000 small creates, then an unref of each one created: a synthetic response, `OK_NODATA`
/// when every answer was as expected, else the first unexpected one.
fn many_resources(gpu: &mut Gpu<'_>) -> Result<Response, VirtioError> {
    let mut created = 0u32;
    let mut first_bad = None;
    for id in MANY_FIRST_ID..MANY_FIRST_ID + MANY {
        let r = gpu.create_2d(id, FORMAT_B8G8R8X8_UNORM, 1, 1)?;
        match r.kind {
            OK_NODATA => created += 1,
            ERR_OUT_OF_MEMORY => {}
            _ => first_bad = first_bad.or(Some(r)),
        }
    }
    for id in MANY_FIRST_ID..MANY_FIRST_ID + MANY {
        let r = gpu.with_id(CMD_RESOURCE_UNREF, id)?;
        if id < MANY_FIRST_ID + created && r.kind != OK_NODATA {
            first_bad = first_bad.or(Some(r));
        }
    }
    log!("virtio-gpu hostile: many-resources: {created} of {MANY} created");
    Ok(Response { kind: first_bad.map_or(OK_NODATA, |r| r.kind), flags: 0, fence_id: 0, len: HDR_LEN })
}

/// The hostile checks: name, accepted answers, request. See the module docs' table.
const CASES: [(&str, &[u32], Check); 27] = [
    ("unknown-command", &[ERR_UNSPEC], |g| {
        g.begin(CMD_UNKNOWN);
        g.submit(HDR_LEN)
    }),
    ("truncated-header", &[ERR_UNSPEC], |g| {
        g.begin(CMD_GET_DISPLAY_INFO);
        g.submit(8)
    }),
    ("create-id-0", &[ERR_INVALID_RESOURCE_ID], |g| bad_create(g, 0, FORMAT_B8G8R8X8_UNORM, 16, 16)),
    ("create-duplicate", &[ERR_INVALID_RESOURCE_ID], |g| g.create_2d(FIXTURE, FORMAT_B8G8R8X8_UNORM, 16, 16)),
    ("create-bad-format", &[ERR_INVALID_PARAMETER], |g| bad_create(g, 21, 0x77, 16, 16)),
    ("create-width-0", BAD_SIZE, |g| bad_create(g, 22, FORMAT_B8G8R8X8_UNORM, 0, 64)),
    ("create-height-0", BAD_SIZE, |g| bad_create(g, 23, FORMAT_B8G8R8X8_UNORM, 64, 0)),
    ("create-width-2g", BAD_SIZE, |g| bad_create(g, 24, FORMAT_B8G8R8X8_UNORM, 1 << 31, 1)),
    ("create-overflow", BAD_SIZE, |g| bad_create(g, 25, FORMAT_B8G8R8X8_UNORM, 0x1_0000, 0x1_0000)),
    ("create-max", BAD_SIZE, |g| bad_create(g, 26, FORMAT_B8G8R8X8_UNORM, u32::MAX, u32::MAX)),
    ("transfer-outside", &[ERR_INVALID_PARAMETER], |g| {
        g.transfer(FIXTURE, Rect { x: 32, y: 32, width: SIDE, height: SIDE })
    }),
    ("transfer-x-overflow", &[ERR_INVALID_PARAMETER], |g| {
        g.transfer(FIXTURE, Rect { x: 16, y: 0, width: 0xFFFF_FFF8, height: SIDE })
    }),
    ("flush-outside", &[ERR_INVALID_PARAMETER], |g| {
        g.flush(FIXTURE, Rect { x: 0, y: 0, width: SIDE + 1, height: SIDE })
    }),
    ("flush-y-overflow", &[ERR_INVALID_PARAMETER], |g| {
        g.flush(FIXTURE, Rect { x: 0, y: 32, width: SIDE, height: 0xFFFF_FFF0 })
    }),
    ("scanout-outside", &[ERR_INVALID_PARAMETER], |g| {
        g.set_scanout(0, FIXTURE, Rect { x: 0, y: 0, width: 2 * SIDE, height: SIDE })
    }),
    ("scanout-x-overflow", &[ERR_INVALID_PARAMETER], |g| {
        g.set_scanout(0, FIXTURE, Rect { x: 0xFFFF_FFC0, y: 0, width: 0x80, height: SIDE })
    }),
    ("scanout-id-99", &[ERR_INVALID_SCANOUT_ID], |g| g.set_scanout(99, FIXTURE, FULL)),
    ("scanout-unknown-resource", &[ERR_INVALID_RESOURCE_ID], |g| g.set_scanout(0, UNKNOWN_ID, FULL)),
    ("unref-unknown", &[ERR_INVALID_RESOURCE_ID], |g| g.with_id(CMD_RESOURCE_UNREF, UNKNOWN_ID)),
    ("attach-unknown", &[ERR_INVALID_RESOURCE_ID], |g| {
        let backing = dma::large_area().add(CURSOR_BACKING).0;
        g.attach(UNKNOWN_ID, &[(backing, IMAGE_BYTES as u32)])
    }),
    ("detach-unknown", &[ERR_INVALID_RESOURCE_ID], |g| g.with_id(CMD_RESOURCE_DETACH_BACKING, UNKNOWN_ID)),
    ("transfer-unknown", &[ERR_INVALID_RESOURCE_ID], |g| g.transfer(UNKNOWN_ID, FULL)),
    ("flush-unknown", &[ERR_INVALID_RESOURCE_ID], |g| g.flush(UNKNOWN_ID, FULL)),
    ("transfer-no-backing", &[ERR_UNSPEC], |g| g.transfer(FIXTURE_NO_BACKING, FULL)),
    ("attach-outside-ram", &[ERR_INVALID_PARAMETER, ERR_UNSPEC], |g| bad_attach(g, 1, 1 << 50)),
    ("attach-nr-entries-huge", ANY_ERROR, |g| {
        bad_attach(g, u32::MAX, dma::large_area().add(CURSOR_BACKING).0)
    }),
    ("many-resources", &[OK_NODATA], many_resources),
];

/// The index of the hostile check `name` (for `gpu_deviations=`).
pub fn case_index(name: &str) -> Option<usize> {
    CASES.iter().position(|(n, _, _)| *n == name)
}

impl Gpu<'_> {
    /// Resources 10 (with backing) and 11 (without).
    fn fixtures(&mut self) -> Result<(), GpuError> {
        let backing = dma::large_area().add(CURSOR_BACKING).0;
        for r in [
            self.create_2d(FIXTURE, FORMAT_B8G8R8X8_UNORM, SIDE, SIDE)?,
            self.attach(FIXTURE, &[(backing, IMAGE_BYTES as u32)])?,
            self.create_2d(FIXTURE_NO_BACKING, FORMAT_B8G8R8X8_UNORM, SIDE, SIDE)?,
        ] {
            if r.kind != OK_NODATA {
                return Err(GpuError::Response {
                    command: CMD_RESOURCE_CREATE_2D,
                    want: OK_NODATA,
                    got: r.kind,
                });
            }
        }
        Ok(())
    }

    /// Whether the device still answers `GET_DISPLAY_INFO`.
    fn alive(&mut self) -> bool {
        self.display_info().is_ok_and(|r| r.kind == OK_DISPLAY_INFO)
    }
}

fn hostile(
    device: &mut VirtioPci,
    memory: &DeviceMemory,
    deviations: u64,
    errors: &mut Errors,
) -> Result<GpuHostile, GpuError> {
    let mut report = GpuHostile::default();
    let mut gpu = Gpu::start(device, memory)?;
    gpu.timeout_ms = HOSTILE_TIMEOUT_MS;
    gpu.fixtures()?;
    for (index, (name, want, check)) in CASES.iter().enumerate() {
        let got = match check(&mut gpu) {
            Ok(r) => Got::Code(r.kind),
            Err(VirtioError::Timeout(_)) => Got::Timeout,
            Err(_) => Got::BadUsed,
        };
        // After a timeout or a stray descriptor the queue state is unknown: reset at once.
        let alive = matches!(got, Got::Code(_)) && gpu.alive();
        let got = if matches!(got, Got::Code(_)) && !alive { Got::Stopped } else { got };
        report.checked += 1;
        let expected = matches!(got, Got::Code(c) if want.contains(&c));
        let tolerated = deviations & (1 << index) != 0;
        if expected {
            report.passed += 1;
        } else {
            report.record(Mismatch { case: name, got, tolerated });
            if !tolerated {
                errors.push(format_args!("virtio-gpu hostile {name}: answered {got}, want {}", Codes(want)));
            }
        }
        log!("virtio-gpu hostile: {name}: {got}{}", if expected { "" } else { " (unexpected)" });
        if !alive {
            // Stuck (or broken): a reset, the queues and the fixtures again.
            report.recovered += 1;
            log!("virtio-gpu hostile: resetting the device after {name}");
            gpu = Gpu::start(device, memory)?;
            gpu.timeout_ms = HOSTILE_TIMEOUT_MS;
            gpu.fixtures()?;
            if !gpu.alive() {
                errors.push(format_args!("virtio-gpu hostile: the device does not answer after a reset"));
                report.failed += 1;
                break;
            }
        }
    }
    let _ = gpu.with_id(CMD_RESOURCE_DETACH_BACKING, FIXTURE);
    let _ = gpu.with_id(CMD_RESOURCE_UNREF, FIXTURE);
    let _ = gpu.with_id(CMD_RESOURCE_UNREF, FIXTURE_NO_BACKING);
    let _ = gpu.device.reset();
    Ok(report)
}
