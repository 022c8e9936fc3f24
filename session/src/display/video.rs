//! H.264 for the motion region (OpenH264, built from source: Cisco's patent licence covers
//! only their binaries, so deployments carry their own licensing responsibility; see
//! docs/protocol.md).
//!
//! One encoder per region size and scale: a new one starts a new stream with a key frame.
//! Screen content usage, no frame skipping (a skipped frame would leave the client behind), the
//! bitrate from the connection's controller. Scaled ([`RegionEncoder::new`]'s `scale_percent`
//! below 100, capability `SCALED_VIDEO`), the region is resampled to
//! [`scaled_size`](pleiades_protocol::wire::scale::scaled_size) before encoding and the client
//! scales the picture back up.

use openh264::OpenH264API;
use openh264::encoder::{BitRate, Encoder, EncoderConfig, FrameRate, FrameType, RateControlMode, UsageType};
use openh264::formats::{BgraSliceU8, YUVBuffer};

use pleiades_protocol::wire::scale;
use pleiades_virtio::gpu::Framebuffer;
use pleiades_virtio::gpu::protocol::Rect;

use super::tiles::pixels;

/// One encoded access unit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VideoFrame {
    pub rect: Rect,
    pub keyframe: bool,
    /// Annex-B NAL units.
    pub data: Vec<u8>,
}

/// An H.264 stream of one screen region.
pub struct RegionEncoder {
    rect: Rect,
    bitrate: u32,
    scale_percent: u32,
    /// The encoded picture's size: the region's, or smaller when scaled.
    encoded: (u32, u32),
    encoder: Encoder,
    yuv: YUVBuffer,
}

impl std::fmt::Debug for RegionEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegionEncoder")
            .field("rect", &self.rect)
            .field("bitrate", &self.bitrate)
            .field("encoded", &self.encoded)
            .finish()
    }
}

impl RegionEncoder {
    /// A stream for `rect` (even width and height) at `bitrate` bits per second, each side
    /// encoded at `scale_percent` of the region's (100: as it is).
    pub fn new(rect: Rect, bitrate: u32, fps: f32, scale_percent: u32) -> Result<Self, String> {
        if rect.is_empty() || !rect.width.is_multiple_of(2) || !rect.height.is_multiple_of(2) {
            return Err(format!("an H.264 region must have an even, non-zero size, not {rect}"));
        }
        let config = EncoderConfig::new()
            .bitrate(BitRate::from_bps(bitrate))
            .max_frame_rate(FrameRate::from_hz(fps))
            .rate_control_mode(RateControlMode::Bitrate)
            .usage_type(UsageType::ScreenContentRealTime)
            .adaptive_quantization(false)
            .background_detection(false)
            .skip_frames(false);
        let encoder = Encoder::with_api_config(OpenH264API::from_source(), config)
            .map_err(|e| format!("cannot start the H.264 encoder: {e}"))?;
        let encoded = scale::scaled_size(rect.width, rect.height, scale_percent);
        let yuv = YUVBuffer::new(encoded.0 as usize, encoded.1 as usize);
        Ok(Self { rect, bitrate, scale_percent: scale_percent.min(100), encoded, encoder, yuv })
    }

    pub fn rect(&self) -> Rect {
        self.rect
    }

    pub fn bitrate(&self) -> u32 {
        self.bitrate
    }

    pub fn scale_percent(&self) -> u32 {
        self.scale_percent
    }

    /// The encoded picture's width and height.
    pub fn encoded_size(&self) -> (u32, u32) {
        self.encoded
    }

    /// Asks for a key frame next (a client joined or lost a frame).
    pub fn force_keyframe(&mut self) {
        self.encoder.force_intra_frame();
    }

    /// Encodes the region of `frame`.
    pub fn encode(&mut self, frame: &Framebuffer) -> Result<VideoFrame, String> {
        let region = (self.rect.width, self.rect.height);
        let bgrx = if self.encoded == region {
            pixels(frame, self.rect)
        } else {
            // Scaled: the region resampled straight from the frame to the encoded size.
            let start = self.rect.y as usize * frame.stride() + self.rect.x as usize * 4;
            let source = frame.pixels.get(start..).unwrap_or_default();
            scale::bilinear(source, region, frame.stride(), 4, self.encoded)
                .ok_or("the region lies outside the frame")?
        };
        let dims = (self.encoded.0 as usize, self.encoded.1 as usize);
        self.yuv.read_bgra8(BgraSliceU8::new(&bgrx, dims));
        let stream = self.encoder.encode(&self.yuv).map_err(|e| format!("H.264 encoding failed: {e}"))?;
        let keyframe = matches!(stream.frame_type(), FrameType::IDR | FrameType::I);
        Ok(VideoFrame { rect: self.rect, keyframe, data: stream.to_vec() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openh264::decoder::Decoder;
    use openh264::formats::YUVSource;

    /// 320x240 of smooth gradients.
    fn gradients() -> Framebuffer {
        let mut frame = Framebuffer::new(320, 240);
        for (i, p) in frame.pixels.chunks_exact_mut(4).enumerate() {
            let (x, y) = (i % 320, i / 320);
            p.copy_from_slice(&[(x % 256) as u8, (y % 256) as u8, ((x + y) % 256) as u8, 0]);
        }
        frame
    }

    /// Mean absolute error per channel between BGRX `source` and decoded RGB.
    fn mean_error(source: &[u8], rgb: &[u8]) -> f64 {
        let error: u64 = source
            .chunks_exact(4)
            .zip(rgb.chunks_exact(3))
            .map(|(s, d)| (0..3).map(|c| u64::from(s[2 - c].abs_diff(d[c]))).sum::<u64>())
            .sum();
        error as f64 / (rgb.len() as f64)
    }

    #[test]
    fn a_region_encodes_and_decodes_close_to_the_source() {
        let frame = gradients();
        let rect = Rect::new(32, 16, 160, 96);
        let mut encoder = RegionEncoder::new(rect, 2_000_000, 30.0, 100).unwrap();
        let first = encoder.encode(&frame).unwrap();
        assert!(first.keyframe && !first.data.is_empty());
        let mut decoder = Decoder::new().unwrap();
        let yuv = decoder.decode(&first.data).unwrap().expect("a picture");
        let mut rgb = vec![0u8; 160 * 96 * 3];
        yuv.write_rgb8(&mut rgb);
        // Mean absolute error per channel: small for a smooth gradient at 2 Mbit/s.
        let mean = mean_error(&pixels(&frame, rect), &rgb);
        assert!(mean < 6.0, "mean error {mean}");
        assert!(RegionEncoder::new(Rect::new(0, 0, 15, 16), 1_000_000, 30.0, 100).is_err());
    }

    #[test]
    fn a_scaled_region_encodes_a_smaller_picture_of_the_same_content() {
        let frame = gradients();
        let rect = Rect::new(0, 0, 320, 240);
        let mut encoder = RegionEncoder::new(rect, 2_000_000, 30.0, 50).unwrap();
        assert_eq!((encoder.encoded_size(), encoder.scale_percent()), ((160, 120), 50));
        let first = encoder.encode(&frame).unwrap();
        assert_eq!(first.rect, rect, "the picture still fills the whole region");
        let mut decoder = Decoder::new().unwrap();
        let yuv = decoder.decode(&first.data).unwrap().expect("a picture");
        assert_eq!(yuv.dimensions(), (160, 120));
        let mut rgb = vec![0u8; 160 * 120 * 3];
        yuv.write_rgb8(&mut rgb);
        // Close to the source resampled to half size (each pixel the mean of a 2x2 block).
        let half = scale::bilinear(&frame.pixels, (320, 240), 320 * 4, 4, (160, 120)).unwrap();
        let mean = mean_error(&half, &rgb);
        assert!(mean < 6.0, "mean error {mean}");
    }
}
