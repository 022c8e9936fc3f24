//! Screenshots: a scanout's [`Framebuffer`] as a PNG file and back.

use std::io::Cursor;

use pleiades_virtio::gpu::Framebuffer;

/// Encodes a frame as an 8-bit RGB PNG (fast compression: screenshots are taken while the
/// guest runs).
pub fn encode_png(frame: &Framebuffer) -> Result<Vec<u8>, png::EncodingError> {
    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, frame.width, frame.height);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    encoder.set_compression(png::Compression::Fast);
    let mut writer = encoder.write_header()?;
    let mut rgb = Vec::with_capacity(frame.pixels.len() / 4 * 3);
    for p in frame.pixels.chunks_exact(4) {
        rgb.extend_from_slice(&[p[2], p[1], p[0]]);
    }
    writer.write_image_data(&rgb)?;
    writer.finish()?;
    Ok(out)
}

/// Decodes an 8-bit RGB or RGBA PNG (what [`encode_png`] and QEMU's `screendump` write).
pub fn decode_png(bytes: &[u8]) -> Result<Framebuffer, String> {
    let decoder = png::Decoder::new(Cursor::new(bytes));
    let mut reader = decoder.read_info().map_err(|e| format!("not a PNG: {e}"))?;
    let (width, height) = (reader.info().width, reader.info().height);
    let mut buf = vec![0u8; reader.output_buffer_size().ok_or("the PNG is too large")?];
    let info = reader.next_frame(&mut buf).map_err(|e| format!("corrupt PNG: {e}"))?;
    let channels = match (info.color_type, info.bit_depth) {
        (png::ColorType::Rgb, png::BitDepth::Eight) => 3,
        (png::ColorType::Rgba, png::BitDepth::Eight) => 4,
        other => return Err(format!("unsupported PNG pixel format {other:?}")),
    };
    let mut frame = Framebuffer::new(width, height);
    for (dst, src) in frame.pixels.chunks_exact_mut(4).zip(buf[..info.buffer_size()].chunks_exact(channels)) {
        dst.copy_from_slice(&[src[2], src[1], src[0], 0]);
    }
    Ok(frame)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_survives_png() {
        let mut frame = Framebuffer::new(3, 2);
        for (i, p) in frame.pixels.chunks_exact_mut(4).enumerate() {
            p.copy_from_slice(&[i as u8, 10 * i as u8, 100, 0]);
        }
        let back = decode_png(&encode_png(&frame).unwrap()).unwrap();
        assert_eq!(back, frame);
        assert_eq!(back.rgb(2, 1), (100, 50, 5));
        assert!(decode_png(b"not a png").is_err());
    }
}
