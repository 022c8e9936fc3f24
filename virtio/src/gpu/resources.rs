//! 2D resources: host-side pixel storage, their guest backing, and the per-VM memory cap.
//!
//! A resource is a `width` x `height` image in one of the 4-byte formats the virtio spec
//! defines. Its pixels live in host memory (what scanouts show and flushes copy from); the
//! guest's copy lives in the scatter-gather *backing* it attaches, and TRANSFER_TO_HOST_2D
//! copies rectangles from the backing into the host pixels. Every byte a guest can make the
//! host allocate is counted against [`GpuLimits`]; every backing entry is checked to lie in
//! guest RAM when attached, and every transfer is checked to stay inside the backing.

use std::collections::HashMap;

use vm_memory::{Bytes, GuestAddress, GuestMemory as _};

use super::protocol::{GpuError, MemEntry, Rect};
use crate::GuestMemory;

/// Bytes per pixel of every supported format.
pub const BYTES_PER_PIXEL: u32 = 4;

/// What a guest may make the host allocate for its GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GpuLimits {
    /// Host memory for resource pixels and cursor images, in bytes.
    pub memory_bytes: u64,
    /// Live resources.
    pub resources: usize,
    /// The widest and tallest resource.
    pub max_dimension: u32,
}

impl Default for GpuLimits {
    fn default() -> Self {
        Self { memory_bytes: 256 << 20, resources: 4096, max_dimension: 16384 }
    }
}

/// The 2D formats (virtio 1.2, 5.7.6.8), named by their byte order in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `B8G8R8A8_UNORM` (1) and `B8G8R8X8_UNORM` (2): Linux's XRGB8888/ARGB8888. The sink's own
    /// order, so flushing them is a plain copy.
    Bgrx,
    /// `A8R8G8B8_UNORM` (3), `X8R8G8B8_UNORM` (4).
    Xrgb,
    /// `R8G8B8A8_UNORM` (67), `R8G8B8X8_UNORM` (134).
    Rgbx,
    /// `X8B8G8R8_UNORM` (68), `A8B8G8R8_UNORM` (121).
    Xbgr,
}

impl Format {
    /// The format of a `virtio_gpu_formats` value.
    pub fn from_virtio(value: u32) -> Option<Self> {
        Some(match value {
            1 | 2 => Self::Bgrx,
            3 | 4 => Self::Xrgb,
            67 | 134 => Self::Rgbx,
            68 | 121 => Self::Xbgr,
            _ => return None,
        })
    }

    /// Converts a row of pixels into the sink's B, G, R, X byte order.
    pub fn to_bgrx(self, src: &[u8], dst: &mut [u8]) {
        // Source byte index of B, G, R, X for each format.
        let order = match self {
            Self::Bgrx => {
                dst.copy_from_slice(src);
                return;
            }
            Self::Xrgb => [3, 2, 1, 0],
            Self::Rgbx => [2, 1, 0, 3],
            Self::Xbgr => [1, 2, 3, 0],
        };
        for (d, s) in dst.chunks_exact_mut(4).zip(src.chunks_exact(4)) {
            d[0] = s[order[0]];
            d[1] = s[order[1]];
            d[2] = s[order[2]];
            d[3] = s[order[3]];
        }
    }
}

/// A resource's backing: guest memory ranges, checked to lie in RAM when attached.
#[derive(Debug, Clone)]
pub struct Backing {
    /// (guest address, length), adjacent entries merged.
    segments: Vec<(GuestAddress, u64)>,
    /// `starts[i]`: the backing offset where segment `i` begins.
    starts: Vec<u64>,
    len: u64,
}

impl Backing {
    /// Checks the entries against guest memory and merges adjacent ones.
    pub fn new(entries: &[MemEntry], mem: &GuestMemory) -> Result<Self, GpuError> {
        let mut segments: Vec<(GuestAddress, u64)> = Vec::with_capacity(entries.len());
        for (i, e) in entries.iter().enumerate() {
            if e.length == 0 {
                continue;
            }
            let addr = GuestAddress(e.addr);
            if !mem.check_range(addr, e.length as usize, vm_memory::Permissions::Read) {
                return Err(GpuError::InvalidParameter(format!(
                    "backing entry {i} ({} bytes at {:#x}) is outside guest memory",
                    e.length, e.addr
                )));
            }
            match segments.last_mut() {
                Some((start, len)) if start.0.checked_add(*len) == Some(e.addr) => {
                    *len += u64::from(e.length)
                }
                _ => segments.push((addr, u64::from(e.length))),
            }
        }
        let mut starts = Vec::with_capacity(segments.len());
        let mut len = 0u64;
        for (_, l) in &segments {
            starts.push(len);
            len += l;
        }
        Ok(Self { segments, starts, len })
    }

    /// The backing's size in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Copies `dst.len()` bytes from backing offset `offset` (already checked to fit).
    fn read(&self, mem: &GuestMemory, mut offset: u64, mut dst: &mut [u8]) -> Result<(), GpuError> {
        let mut i = self.starts.partition_point(|&s| s <= offset).saturating_sub(1);
        while !dst.is_empty() {
            let (addr, len) = *self.segments.get(i).ok_or_else(|| {
                GpuError::InvalidParameter(format!("offset {offset} is past the backing's end"))
            })?;
            let within = offset - self.starts[i];
            let take = ((len - within) as usize).min(dst.len());
            let (now, rest) = dst.split_at_mut(take);
            mem.read_slice(now, GuestAddress(addr.0 + within)).map_err(|e| {
                GpuError::InvalidParameter(format!("cannot read the backing at {:#x}: {e}", addr.0 + within))
            })?;
            dst = rest;
            offset += take as u64;
            i += 1;
        }
        Ok(())
    }
}

/// A 2D resource.
#[derive(Debug)]
pub struct Resource {
    pub format: Format,
    pub width: u32,
    pub height: u32,
    /// `width * height * 4` bytes, rows of `stride()` bytes, in the resource's own format.
    pub pixels: Vec<u8>,
    pub backing: Option<Backing>,
}

impl Resource {
    /// Bytes per row.
    pub fn stride(&self) -> usize {
        self.width as usize * BYTES_PER_PIXEL as usize
    }

    /// TRANSFER_TO_HOST_2D: copies `rect` from the backing, whose rows start at `offset` and are
    /// `stride()` bytes apart, into the host pixels. Returns the bytes copied.
    pub fn transfer_to_host(&mut self, mem: &GuestMemory, rect: Rect, offset: u64) -> Result<u64, GpuError> {
        if !rect.within(self.width, self.height) {
            return Err(GpuError::InvalidParameter(format!(
                "transfer {rect} is outside the {}x{} resource",
                self.width, self.height
            )));
        }
        let backing = self.backing.as_ref().ok_or_else(|| {
            GpuError::Unspec("transfer to a resource without backing (attach backing first)".into())
        })?;
        if rect.is_empty() {
            return Ok(0);
        }
        let stride = self.stride() as u64;
        let row_bytes = u64::from(rect.width) * u64::from(BYTES_PER_PIXEL);
        // The last byte read: offset + stride * (height - 1) + row_bytes, overflow-checked.
        let fits = offset
            .checked_add(stride * u64::from(rect.height - 1))
            .and_then(|v| v.checked_add(row_bytes))
            .is_some_and(|end| end <= backing.len());
        if !fits {
            return Err(GpuError::InvalidParameter(format!(
                "transfer {rect} at offset {offset} reads past the {}-byte backing",
                backing.len()
            )));
        }
        let x_bytes = rect.x as usize * BYTES_PER_PIXEL as usize;
        let stride = self.stride();
        if rect.x == 0 && rect.width == self.width {
            // Whole rows: one contiguous copy.
            let start = rect.y as usize * stride;
            let dst = &mut self.pixels[start..start + rect.height as usize * stride];
            backing.read(mem, offset, dst)?;
        } else {
            for h in 0..rect.height as usize {
                let start = (rect.y as usize + h) * stride + x_bytes;
                let dst = &mut self.pixels[start..start + row_bytes as usize];
                backing.read(mem, offset + (h * stride) as u64, dst)?;
            }
        }
        Ok(row_bytes * u64::from(rect.height))
    }
}

/// The resources of one device and what they cost.
#[derive(Debug)]
pub struct Resources {
    limits: GpuLimits,
    map: HashMap<u32, Resource>,
    used_bytes: u64,
}

impl Resources {
    pub fn new(limits: GpuLimits) -> Self {
        Self { limits, map: HashMap::new(), used_bytes: 0 }
    }

    /// Host bytes the guest's resources take.
    pub fn used_bytes(&self) -> u64 {
        self.used_bytes
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn get(&self, id: u32) -> Result<&Resource, GpuError> {
        self.map.get(&id).ok_or(GpuError::InvalidResource(id))
    }

    pub fn get_mut(&mut self, id: u32) -> Result<&mut Resource, GpuError> {
        self.map.get_mut(&id).ok_or(GpuError::InvalidResource(id))
    }

    /// RESOURCE_CREATE_2D.
    pub fn create(&mut self, id: u32, format: u32, width: u32, height: u32) -> Result<(), GpuError> {
        if id == 0 || self.map.contains_key(&id) {
            return Err(GpuError::InvalidResource(id));
        }
        let format = Format::from_virtio(format)
            .ok_or_else(|| GpuError::InvalidParameter(format!("unknown pixel format {format}")))?;
        let max = self.limits.max_dimension;
        if width == 0 || height == 0 || width > max || height > max {
            return Err(GpuError::InvalidParameter(format!(
                "a {width}x{height} resource: each side must be 1 to {max}"
            )));
        }
        let bytes = u64::from(width) * u64::from(height) * u64::from(BYTES_PER_PIXEL);
        if self.map.len() >= self.limits.resources {
            return Err(GpuError::OutOfMemory(format!("the VM already has {} resources", self.map.len())));
        }
        if self.used_bytes + bytes > self.limits.memory_bytes {
            return Err(GpuError::OutOfMemory(format!(
                "a {width}x{height} resource needs {bytes} bytes; {} of the VM's {} are in use",
                self.used_bytes, self.limits.memory_bytes
            )));
        }
        // Zeroed pages are only backed by RAM once written.
        let pixels = vec![0u8; bytes as usize];
        self.used_bytes += bytes;
        self.map.insert(id, Resource { format, width, height, pixels, backing: None });
        Ok(())
    }

    /// RESOURCE_UNREF.
    pub fn remove(&mut self, id: u32) -> Result<(), GpuError> {
        let r = self.map.remove(&id).ok_or(GpuError::InvalidResource(id))?;
        self.used_bytes -= r.pixels.len() as u64;
        Ok(())
    }

    /// RESOURCE_ATTACH_BACKING.
    pub fn attach(&mut self, id: u32, entries: &[MemEntry], mem: &GuestMemory) -> Result<(), GpuError> {
        let r = self.get_mut(id)?;
        if r.backing.is_some() {
            return Err(GpuError::Unspec(format!("resource {id} already has backing (detach it first)")));
        }
        r.backing = Some(Backing::new(entries, mem)?);
        Ok(())
    }

    /// RESOURCE_DETACH_BACKING.
    pub fn detach(&mut self, id: u32) -> Result<(), GpuError> {
        let r = self.get_mut(id)?;
        r.backing.take().map(drop).ok_or_else(|| GpuError::Unspec(format!("resource {id} has no backing")))
    }

    /// Drops everything (device reset).
    pub fn clear(&mut self) {
        self.map.clear();
        self.used_bytes = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn mem() -> GuestMemory {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    #[test]
    fn a_transfer_gathers_rows_across_scattered_pages() {
        let mem = mem();
        // A 4x3 resource whose 48-byte image sits in three scattered pieces (16 + 20 + 12).
        let image: Vec<u8> = (0u8..48).collect();
        mem.write_slice(&image[..16], GuestAddress(0x3000)).unwrap();
        mem.write_slice(&image[16..36], GuestAddress(0x1000)).unwrap();
        mem.write_slice(&image[36..], GuestAddress(0x5000)).unwrap();
        let mut res = Resources::new(GpuLimits::default());
        res.create(1, 2, 4, 3).unwrap();
        let entries = [
            MemEntry { addr: 0x3000, length: 16 },
            MemEntry { addr: 0x1000, length: 20 },
            MemEntry { addr: 0x5000, length: 12 },
        ];
        res.attach(1, &entries, &mem).unwrap();
        let r = res.get_mut(1).unwrap();
        assert_eq!(r.transfer_to_host(&mem, Rect::new(0, 0, 4, 3), 0).unwrap(), 48);
        assert_eq!(r.pixels, image);
        // A sub-rectangle: rows start at offset + stride * h.
        r.pixels.fill(0);
        assert_eq!(r.transfer_to_host(&mem, Rect::new(1, 1, 2, 2), 16 + 4).unwrap(), 16);
        assert_eq!(&r.pixels[20..28], &image[20..28]);
        assert_eq!(&r.pixels[36..44], &image[36..44]);
        assert_eq!(r.pixels[..20], [0u8; 20]);
    }

    #[test]
    fn bad_resources_and_transfers_are_refused() {
        let mem = mem();
        let mut res = Resources::new(GpuLimits { memory_bytes: 1 << 16, resources: 2, max_dimension: 1024 });
        assert_eq!(res.create(0, 2, 1, 1), Err(GpuError::InvalidResource(0)));
        assert!(matches!(res.create(1, 999, 1, 1), Err(GpuError::InvalidParameter(_))));
        assert!(matches!(res.create(1, 2, 0, 1), Err(GpuError::InvalidParameter(_))));
        assert!(matches!(res.create(1, 2, 1 << 31, 1 << 31), Err(GpuError::InvalidParameter(_))));
        assert!(matches!(res.create(1, 2, 1024, 1024), Err(GpuError::OutOfMemory(_))));
        res.create(1, 2, 8, 8).unwrap();
        assert_eq!(res.create(1, 2, 8, 8), Err(GpuError::InvalidResource(1)));
        res.create(2, 2, 8, 8).unwrap();
        assert!(matches!(res.create(3, 2, 1, 1), Err(GpuError::OutOfMemory(_))), "resource count cap");
        assert_eq!(res.used_bytes(), 2 * 256);

        let r = res.get_mut(1).unwrap();
        assert!(matches!(r.transfer_to_host(&mem, Rect::new(0, 0, 8, 8), 0), Err(GpuError::Unspec(_))));
        let outside = [MemEntry { addr: 1 << 50, length: 4096 }];
        assert!(matches!(res.attach(1, &outside, &mem), Err(GpuError::InvalidParameter(_))));
        let straddling = [MemEntry { addr: (1 << 20) - 16, length: 4096 }];
        assert!(matches!(res.attach(1, &straddling, &mem), Err(GpuError::InvalidParameter(_))));
        res.attach(1, &[MemEntry { addr: 0x1000, length: 100 }], &mem).unwrap();
        assert!(matches!(res.attach(1, &[], &mem), Err(GpuError::Unspec(_))), "attached twice");
        let r = res.get_mut(1).unwrap();
        for (rect, offset) in [
            (Rect::new(0, 0, 8, 8), 0),            // 256 bytes from a 100-byte backing
            (Rect::new(0, 0, 4, 1), u64::MAX - 2), // offset overflow
            (Rect::new(u32::MAX, 0, 2, 1), 0),     // x + width overflow
            (Rect::new(0, 7, 8, 2), 0),            // below the resource
        ] {
            assert!(
                matches!(r.transfer_to_host(&mem, rect, offset), Err(GpuError::InvalidParameter(_))),
                "{rect} at {offset}"
            );
        }
        res.detach(1).unwrap();
        assert!(matches!(res.detach(1), Err(GpuError::Unspec(_))));
        res.remove(1).unwrap();
        assert_eq!(res.remove(1), Err(GpuError::InvalidResource(1)));
        assert_eq!(res.used_bytes(), 256);
    }

    #[test]
    fn formats_convert_to_bgrx() {
        let px = [10u8, 20, 30, 40];
        let mut out = [0u8; 4];
        Format::from_virtio(2).unwrap().to_bgrx(&px, &mut out);
        assert_eq!(out, px);
        // X8R8G8B8: bytes X, R, G, B.
        Format::from_virtio(4).unwrap().to_bgrx(&px, &mut out);
        assert_eq!(out, [40, 30, 20, 10]);
        // R8G8B8X8: bytes R, G, B, X.
        Format::from_virtio(134).unwrap().to_bgrx(&px, &mut out);
        assert_eq!(out, [30, 20, 10, 40]);
        // X8B8G8R8: bytes X, B, G, R.
        Format::from_virtio(68).unwrap().to_bgrx(&px, &mut out);
        assert_eq!(out, [20, 30, 40, 10]);
        assert_eq!(Format::from_virtio(0), None);
    }
}
