//! Lossless tiles: which parts of the screen changed, and their compressed pixels.
//!
//! The screen is cut into [`TILE`]x[`TILE`] tiles. The encoder keeps what the client holds
//! losslessly (`sent`); a damaged tile whose pixels equal what was sent is dropped (guests often
//! flush more than they change), a changed tile is sent as one colour when it is uniform
//! (backgrounds, cleared lines), as a palette of at most 16 colours and an index per pixel
//! (text, UI: [`pleiades_protocol::wire::palette`], the indices zstd-compressed when that is
//! smaller; with capability `PALETTE_TILES`), or as zstd-compressed B, G, R, X bytes (icons,
//! pictures), whichever is smallest, or raw when compression does not pay.

use pleiades_protocol::wire::palette;
use pleiades_virtio::gpu::Framebuffer;
use pleiades_virtio::gpu::protocol::Rect;

/// The tile side in pixels.
pub const TILE: u32 = 64;
/// zstd level for tiles: fast (≈600 MB/s on framebuffer content) with text-friendly ratios.
const ZSTD_LEVEL: i32 = 1;

/// How a tile's pixels travel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TileData {
    /// Every pixel is this B, G, R, X value.
    Solid([u8; 4]),
    /// zstd of the B, G, R, X rows (`width * 4` bytes each).
    Zstd(Vec<u8>),
    /// The B, G, R, X rows uncompressed.
    Raw(Vec<u8>),
    /// 2 to 16 colours (B, G, R, X as little-endian `u32`) and the packed indices, zstd-compressed
    /// or not.
    Palette { colours: Vec<u32>, zstd: bool, indices: Vec<u8> },
}

impl TileData {
    /// Bytes on the wire (payload only).
    pub fn len(&self) -> usize {
        match self {
            Self::Solid(_) => 4,
            Self::Zstd(b) | Self::Raw(b) => b.len(),
            Self::Palette { colours, indices, .. } => 2 + 4 * colours.len() + indices.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One encoded tile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tile {
    pub rect: Rect,
    pub data: TileData,
}

/// The tile grid of a `width` x `height` screen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grid {
    pub width: u32,
    pub height: u32,
}

impl Grid {
    pub fn columns(&self) -> u32 {
        self.width.div_ceil(TILE)
    }

    pub fn rows(&self) -> u32 {
        self.height.div_ceil(TILE)
    }

    pub fn len(&self) -> usize {
        (self.columns() * self.rows()) as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The rectangle of tile `index` (clipped to the screen).
    pub fn rect(&self, index: usize) -> Rect {
        let (col, row) = (index as u32 % self.columns(), index as u32 / self.columns());
        let (x, y) = (col * TILE, row * TILE);
        Rect::new(x, y, TILE.min(self.width - x), TILE.min(self.height - y))
    }

    /// The tiles a rectangle touches.
    pub fn covering(&self, r: &Rect) -> impl Iterator<Item = usize> + '_ {
        let r = r.intersect(&Rect::new(0, 0, self.width, self.height));
        let (c0, r0) = (r.x / TILE, r.y / TILE);
        let (c1, r1) = if r.is_empty() {
            (c0, r0)
        } else {
            ((r.x + r.width).div_ceil(TILE), (r.y + r.height).div_ceil(TILE))
        };
        (r0..r1).flat_map(move |row| (c0..c1).map(move |col| (row * self.columns() + col) as usize))
    }
}

/// The B, G, R, X rows of `rect` of `frame`.
pub fn pixels(frame: &Framebuffer, rect: Rect) -> Vec<u8> {
    let mut out = Vec::with_capacity((rect.area() * 4) as usize);
    let stride = frame.stride();
    for y in rect.y..rect.y + rect.height {
        let at = y as usize * stride + rect.x as usize * 4;
        out.extend_from_slice(&frame.pixels[at..at + rect.width as usize * 4]);
    }
    out
}

/// Whether `rect` has the same pixels in both frames (same size).
pub fn same(a: &Framebuffer, b: &Framebuffer, rect: Rect) -> bool {
    let stride = a.stride();
    (rect.y..rect.y + rect.height).all(|y| {
        let at = y as usize * stride + rect.x as usize * 4;
        let len = rect.width as usize * 4;
        a.pixels[at..at + len] == b.pixels[at..at + len]
    })
}

/// The smallest rectangle inside `rect` where the frames differ (same size), if any: a typed
/// character changes a glyph, not the whole tile.
pub fn changed_bounds(a: &Framebuffer, b: &Framebuffer, rect: Rect) -> Option<Rect> {
    let stride = a.stride();
    let (mut x0, mut y0, mut x1, mut y1) = (u32::MAX, u32::MAX, 0, 0);
    for y in rect.y..rect.y + rect.height {
        let at = y as usize * stride + rect.x as usize * 4;
        let len = rect.width as usize * 4;
        let (ra, rb) = (&a.pixels[at..at + len], &b.pixels[at..at + len]);
        if ra == rb {
            continue;
        }
        let first = ra.chunks_exact(4).zip(rb.chunks_exact(4)).position(|(p, q)| p != q).unwrap_or(0) as u32;
        let last = ra.chunks_exact(4).zip(rb.chunks_exact(4)).rposition(|(p, q)| p != q).unwrap_or(0) as u32;
        x0 = x0.min(rect.x + first);
        x1 = x1.max(rect.x + last + 1);
        y0 = y0.min(y);
        y1 = y + 1;
    }
    (x0 != u32::MAX).then(|| Rect::new(x0, y0, x1 - x0, y1 - y0))
}

/// Encodes `rect` of `frame` losslessly, in the smallest of the encodings the client takes
/// (`palette`: it has `PALETTE_TILES`).
pub fn encode(frame: &Framebuffer, rect: Rect, palette: bool) -> Tile {
    let raw = pixels(frame, rect);
    let first: [u8; 4] = [raw[0], raw[1], raw[2], raw[3]];
    if raw.chunks_exact(4).all(|p| p[..3] == first[..3]) {
        return Tile { rect, data: TileData::Solid(first) };
    }
    let mut data = match zstd::bulk::compress(&raw, ZSTD_LEVEL) {
        Ok(z) if z.len() < raw.len() => TileData::Zstd(z),
        _ => TileData::Raw(raw.clone()),
    };
    if palette && let Some((colours, packed)) = palette::pack(&raw, rect.width, rect.height) {
        let plain = TileData::Palette { colours: colours.clone(), zstd: false, indices: packed.clone() };
        if plain.len() < data.len() {
            data = plain;
        }
        if let Ok(z) = zstd::bulk::compress(&packed, ZSTD_LEVEL)
            && z.len() < packed.len()
        {
            let compressed = TileData::Palette { colours, zstd: true, indices: z };
            if compressed.len() < data.len() {
                data = compressed;
            }
        }
    }
    Tile { rect, data }
}

/// Applies a tile to a frame (the client's side, and the encoder's record of what was sent).
pub fn apply(frame: &mut Framebuffer, tile: &Tile) -> Result<(), String> {
    let r = tile.rect;
    if r.is_empty() || !r.within(frame.width, frame.height) {
        return Err(format!("tile {r} is outside the {}x{} screen", frame.width, frame.height));
    }
    let len = r.width as usize * 4;
    let bytes = r.area() as usize * 4;
    let owned;
    let rows: &[u8] = match &tile.data {
        TileData::Solid(p) => {
            owned = p.repeat(r.area() as usize);
            &owned
        }
        TileData::Raw(b) => b,
        TileData::Zstd(z) => {
            owned = zstd::bulk::decompress(z, bytes).map_err(|e| format!("corrupt tile {r}: {e}"))?;
            &owned
        }
        TileData::Palette { colours, zstd, indices } => {
            let packed_len = palette::packed_len(r.width, r.height, colours.len()) as usize;
            let unpacked;
            let packed = if *zstd {
                unpacked = zstd::bulk::decompress(indices, packed_len)
                    .map_err(|e| format!("corrupt palette tile {r}: {e}"))?;
                &unpacked
            } else {
                indices
            };
            let mut pixels = vec![0; bytes];
            palette::unpack(colours, packed, r.width, r.height, &mut pixels)
                .map_err(|e| format!("palette tile {r}: {e}"))?;
            owned = pixels;
            &owned
        }
    };
    if rows.len() != bytes {
        return Err(format!("tile {r} carries {} bytes, not {bytes}", rows.len()));
    }
    let stride = frame.stride();
    for (i, row) in rows.chunks_exact(len).enumerate() {
        let at = (r.y as usize + i) * stride + r.x as usize * 4;
        frame.pixels[at..at + len].copy_from_slice(row);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(width: u32, height: u32, f: impl Fn(u32, u32) -> [u8; 4]) -> Framebuffer {
        let mut fb = Framebuffer::new(width, height);
        for y in 0..height {
            for x in 0..width {
                let at = (y * width + x) as usize * 4;
                fb.pixels[at..at + 4].copy_from_slice(&f(x, y));
            }
        }
        fb
    }

    #[test]
    fn the_grid_covers_edges_and_rectangles() {
        let g = Grid { width: 130, height: 70 };
        assert_eq!((g.columns(), g.rows(), g.len()), (3, 2, 6));
        assert_eq!(g.rect(2), Rect::new(128, 0, 2, 64));
        assert_eq!(g.rect(5), Rect::new(128, 64, 2, 6));
        assert_eq!(g.covering(&Rect::new(60, 60, 10, 10)).collect::<Vec<_>>(), vec![0, 1, 3, 4]);
        assert_eq!(g.covering(&Rect::new(0, 0, 0, 0)).count(), 0);
        assert_eq!(g.covering(&Rect::new(500, 500, 10, 10)).count(), 0);
    }

    #[test]
    fn tiles_round_trip_and_pick_the_cheapest_form() {
        let text =
            frame(64, 64, |x, y| if (x / 3 + y / 5) % 2 == 0 { [255, 255, 255, 0] } else { [0, 0, 0, 0] });
        let noise = frame(64, 64, |x, y| {
            let v = (x.wrapping_mul(2_654_435_761) ^ y.wrapping_mul(40_503)).wrapping_mul(2_246_822_519);
            v.to_le_bytes()
        });
        let solid = frame(64, 64, |_, _| [1, 2, 3, 0]);
        // A typed glyph: two colours in an 8x16 cell.
        let glyph = frame(8, 16, |x, y| {
            if (3..13).contains(&y) && (1..7).contains(&x) && (x * 7 + y * 3) % 4 < 2 {
                [220, 220, 220, 0]
            } else {
                [24, 24, 24, 0]
            }
        });
        for palette in [false, true] {
            for (name, src) in [("text", &text), ("noise", &noise), ("solid", &solid), ("glyph", &glyph)] {
                let rect = Rect::new(0, 0, src.width, src.height);
                let tile = encode(src, rect, palette);
                match (name, palette, &tile.data) {
                    ("text" | "glyph", false, TileData::Zstd(z)) => {
                        assert!(z.len() < 2000, "{name} compresses: {}", z.len())
                    }
                    // Two colours: at most 1 bit a pixel, 512 bytes for 64x64 before zstd.
                    ("text", true, TileData::Palette { colours, .. }) => {
                        assert_eq!(colours.len(), 2);
                        assert!(tile.data.len() < 520, "text as a palette: {}", tile.data.len());
                    }
                    // 16 bytes of indices and 8 of palette beat zstd's frame overhead.
                    ("glyph", true, TileData::Palette { colours, zstd: false, indices }) => {
                        assert_eq!((colours.len(), indices.len()), (2, 16));
                    }
                    ("noise", _, TileData::Raw(_) | TileData::Zstd(_)) | ("solid", _, TileData::Solid(_)) => {
                    }
                    other => panic!("unexpected form {other:?}"),
                }
                let mut out = Framebuffer::new(src.width, src.height);
                apply(&mut out, &tile).unwrap();
                assert!(same(&out, src, rect), "{name} round trip");
            }
        }
        // With palettes, text costs less than as zstd of its pixels.
        let whole = Rect::new(0, 0, 64, 64);
        assert!(encode(&text, whole, true).data.len() < encode(&text, whole, false).data.len());
    }

    #[test]
    fn bad_tiles_are_refused() {
        let mut fb = Framebuffer::new(64, 64);
        let outside = Tile { rect: Rect::new(60, 0, 8, 8), data: TileData::Solid([0; 4]) };
        assert!(apply(&mut fb, &outside).is_err());
        let short = Tile { rect: Rect::new(0, 0, 8, 8), data: TileData::Raw(vec![0; 10]) };
        assert!(apply(&mut fb, &short).is_err());
        let corrupt = Tile { rect: Rect::new(0, 0, 8, 8), data: TileData::Zstd(vec![1, 2, 3]) };
        assert!(apply(&mut fb, &corrupt).is_err());
        let bomb = Tile {
            rect: Rect::new(0, 0, 8, 8),
            data: TileData::Zstd(zstd::bulk::compress(&vec![0u8; 1 << 20], 1).unwrap()),
        };
        assert!(apply(&mut fb, &bomb).is_err(), "more bytes than the tile holds");
        let beyond = Tile {
            rect: Rect::new(0, 0, 8, 1),
            data: TileData::Palette { colours: vec![1, 2, 3], zstd: false, indices: vec![0xff, 0xff] },
        };
        assert!(apply(&mut fb, &beyond).is_err(), "an index beyond the palette");
        let palette_bomb = Tile {
            rect: Rect::new(0, 0, 8, 8),
            data: TileData::Palette {
                colours: vec![1, 2],
                zstd: true,
                indices: zstd::bulk::compress(&vec![0u8; 1 << 20], 1).unwrap(),
            },
        };
        assert!(apply(&mut fb, &palette_bomb).is_err(), "more indices than the tile holds");
    }
}
