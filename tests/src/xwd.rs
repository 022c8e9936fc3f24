//! Reading `xwd` screen dumps (X Window Dump, the format of `xwd -root`), so that tests can look
//! at an X screen without ImageMagick: a 100-byte big-endian header, the window name, the
//! colormap, then the pixels as the X server holds them. Only what Xvfb's TrueColor screens
//! produce is read (ZPixmap, 24 or 32 bits a pixel); anything else is an error.

/// An RGB image: `width × height` pixels of `[r, g, b]`, rows top to bottom.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rgb {
    pub width: u32,
    pub height: u32,
    pub pixels: Vec<[u8; 3]>,
}

impl Rgb {
    pub fn pixel(&self, x: u32, y: u32) -> Option<[u8; 3]> {
        (x < self.width && y < self.height).then(|| self.pixels[(y * self.width + x) as usize])
    }
}

const HEADER_FIELDS: usize = 25;
const COLOR_ENTRY: usize = 12;
const Z_PIXMAP: u32 = 2;

/// Decodes an xwd dump.
pub fn decode(data: &[u8]) -> Result<Rgb, String> {
    let field = |i: usize| -> Result<u32, String> {
        data.get(i * 4..i * 4 + 4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
            .ok_or_else(|| "the xwd header is cut short".to_owned())
    };
    let header_size = field(0)? as usize;
    if header_size < HEADER_FIELDS * 4 || field(1)? != 7 {
        return Err("not an xwd version 7 dump".into());
    }
    if field(2)? != Z_PIXMAP {
        return Err(format!("xwd pixmap format {} is not ZPixmap", field(2)?));
    }
    let (width, height) = (field(4)?, field(5)?);
    let lsb_first = field(7)? == 0;
    let bits_per_pixel = field(11)?;
    let bytes_per_line = field(12)? as usize;
    let masks = [field(14)?, field(15)?, field(16)?];
    let ncolors = field(19)? as usize;
    if !matches!(bits_per_pixel, 24 | 32) {
        return Err(format!("{bits_per_pixel} bits a pixel: only TrueColor 24/32 is read"));
    }
    let bytes_per_pixel = bits_per_pixel as usize / 8;
    let start = header_size + ncolors * COLOR_ENTRY;
    let need = start + bytes_per_line * height as usize;
    if data.len() < need || bytes_per_line < width as usize * bytes_per_pixel {
        return Err(format!("the xwd dump holds {} bytes, {need} expected", data.len()));
    }
    let channel = |pixel: u32, mask: u32| -> u8 {
        if mask == 0 {
            return 0;
        }
        let value = (pixel & mask) >> mask.trailing_zeros();
        let bits = (mask >> mask.trailing_zeros()).count_ones();
        if bits >= 8 { (value >> (bits - 8)) as u8 } else { (value << (8 - bits)) as u8 }
    };
    let mut pixels = Vec::with_capacity(width as usize * height as usize);
    for row in 0..height as usize {
        let line = &data[start + row * bytes_per_line..][..width as usize * bytes_per_pixel];
        for p in line.chunks_exact(bytes_per_pixel) {
            let mut bytes = [0u8; 4];
            if lsb_first {
                bytes[..bytes_per_pixel].copy_from_slice(p);
            } else {
                bytes[4 - bytes_per_pixel..].copy_from_slice(p);
                bytes.reverse();
            }
            let value = u32::from_le_bytes(bytes);
            pixels.push([channel(value, masks[0]), channel(value, masks[1]), channel(value, masks[2])]);
        }
    }
    Ok(Rgb { width, height, pixels })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dump(lsb: bool) -> Vec<u8> {
        let name = b"root\0\0\0\0";
        let mut header = [0u32; HEADER_FIELDS];
        header[0] = (HEADER_FIELDS * 4 + name.len()) as u32;
        header[1] = 7;
        header[2] = Z_PIXMAP;
        header[3] = 24;
        (header[4], header[5]) = (2, 1);
        header[7] = u32::from(!lsb);
        header[11] = 32;
        header[12] = 8;
        (header[14], header[15], header[16]) = (0xff0000, 0x00ff00, 0x0000ff);
        header[19] = 1;
        let mut out: Vec<u8> = header.iter().flat_map(|f| f.to_be_bytes()).collect();
        out.extend(name);
        out.extend([0u8; COLOR_ENTRY]);
        for pixel in [0x00112233u32, 0x00ffeedd] {
            out.extend(if lsb { pixel.to_le_bytes() } else { pixel.to_be_bytes() });
        }
        out
    }

    #[test]
    fn true_color_dumps_decode_in_both_byte_orders() {
        for lsb in [true, false] {
            let image = decode(&dump(lsb)).unwrap();
            assert_eq!((image.width, image.height), (2, 1));
            assert_eq!(image.pixels, [[0x11, 0x22, 0x33], [0xff, 0xee, 0xdd]]);
        }
        assert!(decode(&dump(true)[..50]).is_err());
    }
}
