//! Status text as pixels: the public-domain 8×8 VGA-style font of the `font8x8` crate (no
//! dependencies, no font files, no shaping: ASCII is all the client writes).

use font8x8::legacy::BASIC_LEGACY;

/// An image of `lines`, white on a translucent black box, premultiplied BGRA, each font pixel
/// `scale` × `scale`. Characters outside ASCII show as `?`. Returns (width, height, pixels).
pub fn render(lines: &[String], scale: u32) -> (u32, u32, Vec<u8>) {
    const PAD: u32 = 6;
    let scale = scale.clamp(1, 8);
    let columns = lines.iter().map(|l| l.chars().count()).max().unwrap_or(0) as u32;
    let width = columns * 8 * scale + 2 * PAD;
    let height = lines.len() as u32 * 10 * scale + 2 * PAD;
    // Background: black at 75 % (premultiplied: colour 0, alpha 192).
    let mut pixels: Vec<u8> = [0u8, 0, 0, 192].repeat((width * height) as usize);
    for (row, line) in lines.iter().enumerate() {
        for (column, c) in line.chars().enumerate() {
            let glyph =
                BASIC_LEGACY.get(c as usize).filter(|_| c.is_ascii()).unwrap_or(&BASIC_LEGACY[b'?' as usize]);
            let (x0, y0) = (PAD + column as u32 * 8 * scale, PAD + row as u32 * 10 * scale + scale);
            for (gy, bits) in glyph.iter().enumerate() {
                for gx in 0..8u32 {
                    if bits & (1 << gx) == 0 {
                        continue;
                    }
                    for dy in 0..scale {
                        for dx in 0..scale {
                            let (x, y) = (x0 + gx * scale + dx, y0 + gy as u32 * scale + dy);
                            let at = ((y * width + x) * 4) as usize;
                            if let Some(p) = pixels.get_mut(at..at + 4) {
                                p.copy_from_slice(&[255, 255, 255, 255]);
                            }
                        }
                    }
                }
            }
        }
    }
    (width, height, pixels)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_drawn_in_white_on_a_translucent_box() {
        let (w, h, pixels) = render(&["Hi".into(), "é".into()], 2);
        assert_eq!((w, h), (2 * 8 * 2 + 12, 2 * 10 * 2 + 12));
        assert_eq!(pixels.len(), (w * h * 4) as usize);
        let white = pixels.chunks_exact(4).filter(|p| *p == [255, 255, 255, 255]).count();
        assert!(white > 50, "{white} white pixels");
        assert_eq!(&pixels[..4], &[0, 0, 0, 192]);
    }
}
