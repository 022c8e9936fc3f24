//! Palette tiles: a tile of at most [`MAX_COLOURS`] distinct pixels as its colours and one small
//! index per pixel (1, 2 or 4 bits), the format of `TileData::Palette`. Text, UI and icons use a
//! handful of colours: a typed glyph is two, an anti-aliased line of text a dozen; as indices
//! they are 8 to 32 times smaller than their BGRX bytes before any compression (VNC's ZRLE and
//! RDP's planar/interleaved codecs do the same).
//!
//! Each row's indices start on a byte boundary, the first pixel in the most significant bits.
//! Both ends use these functions: the server packs, the client unpacks; an index beyond the
//! palette is an error, never a panic.

/// The most colours a palette tile has (4-bit indices).
pub const MAX_COLOURS: usize = 16;

/// Bits per index for a palette of `colours` entries.
pub fn bits_per_index(colours: usize) -> u32 {
    match colours {
        0..=2 => 1,
        3..=4 => 2,
        _ => 4,
    }
}

/// Bytes of the packed indices of a `width` x `height` tile with `colours` entries.
pub fn packed_len(width: u32, height: u32, colours: usize) -> u64 {
    (u64::from(width) * u64::from(bits_per_index(colours))).div_ceil(8) * u64::from(height)
}

/// The palette (BGRX as little-endian `u32`, in order of first appearance) and the packed
/// indices of `bgrx` (`width` x `height` pixels, rows without padding); `None` with more than
/// [`MAX_COLOURS`] colours or fewer than two (a one-colour tile is `Solid`).
pub fn pack(bgrx: &[u8], width: u32, height: u32) -> Option<(Vec<u32>, Vec<u8>)> {
    let pixels = u64::from(width) * u64::from(height);
    if bgrx.len() as u64 != pixels * 4 || pixels == 0 {
        return None;
    }
    let mut colours: Vec<u32> = Vec::with_capacity(MAX_COLOURS);
    let mut indices: Vec<u8> = Vec::with_capacity(pixels as usize);
    let mut last = (u32::MAX, 0u8);
    for p in bgrx.chunks_exact(4) {
        let colour = u32::from_le_bytes([p[0], p[1], p[2], p[3]]);
        if colour != last.0 || colours.is_empty() {
            let index = match colours.iter().position(|&c| c == colour) {
                Some(i) => i,
                None if colours.len() < MAX_COLOURS => {
                    colours.push(colour);
                    colours.len() - 1
                }
                None => return None,
            };
            last = (colour, index as u8);
        }
        indices.push(last.1);
    }
    if colours.len() < 2 {
        return None;
    }
    let bits = bits_per_index(colours.len());
    let row_bytes = (width * bits).div_ceil(8) as usize;
    let mut packed = vec![0u8; row_bytes * height as usize];
    for (row, out) in indices.chunks_exact(width as usize).zip(packed.chunks_exact_mut(row_bytes)) {
        for (x, &index) in row.iter().enumerate() {
            let bit = x as u32 * bits;
            out[(bit / 8) as usize] |= index << (8 - bits - bit % 8);
        }
    }
    Some((colours, packed))
}

/// Writes the BGRX pixels of a palette tile into `out` (`width` x `height` x 4 bytes).
pub fn unpack(
    colours: &[u32],
    packed: &[u8],
    width: u32,
    height: u32,
    out: &mut [u8],
) -> Result<(), &'static str> {
    if !(2..=MAX_COLOURS).contains(&colours.len()) {
        return Err("a palette tile has 2 to 16 colours");
    }
    if packed.len() as u64 != packed_len(width, height, colours.len()) {
        return Err("palette tile indices are not the tile's size");
    }
    if out.len() as u64 != u64::from(width) * u64::from(height) * 4 {
        return Err("palette tile output is not the tile's size");
    }
    let bits = bits_per_index(colours.len());
    let mask = (1u8 << bits) - 1;
    let row_bytes = (width * bits).div_ceil(8) as usize;
    for (row, pixels) in packed.chunks_exact(row_bytes).zip(out.chunks_exact_mut(width as usize * 4)) {
        for (x, pixel) in pixels.chunks_exact_mut(4).enumerate() {
            let bit = x as u32 * bits;
            let index = (row[(bit / 8) as usize] >> (8 - bits - bit % 8)) & mask;
            let colour = colours.get(usize::from(index)).ok_or("a palette index beyond the palette")?;
            pixel.copy_from_slice(&colour.to_le_bytes());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_glyph_packs_to_a_bit_a_pixel() {
        // 8x2: background and ink.
        let (bg, ink) = ([24, 24, 24, 0], [220, 220, 220, 0]);
        let rows = [[bg, ink, ink, bg, bg, bg, bg, ink], [ink, bg, bg, bg, bg, bg, bg, bg]];
        let bgrx: Vec<u8> = rows.iter().flatten().flatten().copied().collect();
        let (colours, packed) = pack(&bgrx, 8, 2).unwrap();
        assert_eq!(colours, [u32::from_le_bytes(bg), u32::from_le_bytes(ink)]);
        assert_eq!(packed, [0b0110_0001, 0b1000_0000]);
        let mut out = vec![0; bgrx.len()];
        unpack(&colours, &packed, 8, 2, &mut out).unwrap();
        assert_eq!(out, bgrx);
        // One colour is Solid's, seventeen are too many.
        assert_eq!(pack(&[1, 2, 3, 0].repeat(16), 4, 4), None);
        let many: Vec<u8> = (0..17u8).flat_map(|i| [i, 0, 0, 0]).collect();
        assert_eq!(pack(&many, 17, 1), None);
    }

    #[test]
    fn bad_indices_and_sizes_are_errors() {
        let colours = [1, 2, 3];
        // Two bits an index: 3 is beyond a three-colour palette.
        let mut out = vec![0; 4 * 4];
        assert_eq!(
            unpack(&colours, &[0b1100_0000], 4, 1, &mut out),
            Err("a palette index beyond the palette")
        );
        assert!(unpack(&colours, &[0, 0], 4, 1, &mut out).is_err());
        assert!(unpack(&[7], &[0], 4, 1, &mut out).is_err());
        assert!(unpack(&colours, &[0], 4, 1, &mut out[..8]).is_err());
    }

    proptest! {
        /// Any tile of 2 to 16 colours, any size, packs and unpacks to itself, at the packed
        /// size the format says.
        #[test]
        fn pack_and_unpack_round_trip(width in 1u32..70, height in 1u32..20, colours in 2usize..=16, seed in any::<u64>()) {
            let palette: Vec<u32> = (0..colours as u32).map(|i| i.wrapping_mul(0x9e37_79b9) ^ seed as u32).collect();
            let mut state = seed | 1;
            let bgrx: Vec<u8> = (0..width * height)
                .flat_map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    palette[(state % colours as u64) as usize].to_le_bytes()
                })
                .collect();
            if let Some((found, packed)) = pack(&bgrx, width, height) {
                prop_assert!(found.len() <= colours && found.len() >= 2);
                prop_assert_eq!(packed.len() as u64, packed_len(width, height, found.len()));
                let mut out = vec![0; bgrx.len()];
                unpack(&found, &packed, width, height, &mut out).unwrap();
                prop_assert_eq!(out, bgrx);
            }
        }

        /// Any bytes as indices: an error or pixels, never a panic.
        #[test]
        fn any_indices_unpack_or_fail(colours in 0usize..20, packed in proptest::collection::vec(any::<u8>(), 0..64), width in 0u32..40, height in 0u32..8) {
            let palette: Vec<u32> = (0..colours as u32).collect();
            let mut out = vec![0; (width * height * 4) as usize];
            let _ = unpack(&palette, &packed, width, height, &mut out);
        }
    }
}
