//! Display application tests: real encoders (zstd, OpenH264) in, pixels out.

use openh264::encoder::{Encoder, EncoderConfig};
use openh264::formats::{BgraSliceU8, YUVBuffer};
use pleiades_protocol::wire::{FrameBegin, FrameEnd, Tile, TileData};

use super::*;

fn begin(frame_id: u64, width: u32, height: u32) -> DisplayMessage {
    DisplayMessage::FrameBegin(FrameBegin { frame_id, scanout: 0, width, height, capture_us: 1_000 })
}

fn end(frame_id: u64) -> DisplayMessage {
    DisplayMessage::FrameEnd(FrameEnd { frame_id })
}

fn tile(x: u32, y: u32, width: u32, height: u32, data: TileData) -> DisplayMessage {
    DisplayMessage::Tile(Tile { rect: Rect { x, y, width, height }, data })
}

/// Runs messages through one stream; returns the stats of every finished frame.
fn run(
    displays: &mut Displays,
    stream: &mut DisplayStream,
    messages: &[DisplayMessage],
) -> Result<Vec<FrameStats>, DisplayError> {
    let mut frames = Vec::new();
    for message in messages {
        if let Some(stats) = stream.on_message(displays, message, 10, 5_000, || 6_000)? {
            frames.push(stats);
        }
    }
    Ok(frames)
}

/// A test pattern: smooth gradients plus a sharp square, BGRX.
fn pattern(width: u32, height: u32) -> Vec<u8> {
    let mut pixels = Vec::with_capacity((width * height * 4) as usize);
    for y in 0..height {
        for x in 0..width {
            let square = (20..60).contains(&x) && (20..60).contains(&y);
            let (b, g, r) = if square {
                (240, 240, 240)
            } else {
                ((x * 255 / width) as u8, (y * 255 / height) as u8, 96)
            };
            pixels.extend_from_slice(&[b, g, r, 0]);
        }
    }
    pixels
}

fn psnr(a: &[u8], b: &[u8]) -> f64 {
    let (mut sum, mut n) = (0f64, 0f64);
    for (pa, pb) in a.chunks_exact(4).zip(b.chunks_exact(4)) {
        for c in 0..3 {
            let d = f64::from(pa[c]) - f64::from(pb[c]);
            sum += d * d;
            n += 1.0;
        }
    }
    let mse = sum / n;
    if mse == 0.0 { f64::INFINITY } else { 10.0 * (255.0 * 255.0 / mse).log10() }
}

fn region(fb: &Framebuffer, rect: Rect) -> Vec<u8> {
    let mut out = Vec::new();
    for row in 0..rect.height {
        let start = (((rect.y + row) * fb.width + rect.x) * 4) as usize;
        out.extend_from_slice(&fb.pixels[start..start + (rect.width * 4) as usize]);
    }
    out
}

#[test]
fn raw_solid_and_zstd_tiles_land_where_they_belong() {
    let mut displays = Displays::new();
    let mut stream = DisplayStream::new();
    let raw = pattern(16, 8);
    let zstd_pixels = pattern(32, 16);
    let compressed = zstd::bulk::compress(&zstd_pixels, 3).unwrap();
    let frames = run(
        &mut displays,
        &mut stream,
        &[
            begin(1, 64, 32),
            tile(0, 0, 64, 32, TileData::Solid(0x0011_2233)),
            tile(4, 2, 16, 8, TileData::Raw(raw.clone())),
            tile(32, 16, 32, 16, TileData::Zstd(compressed)),
            end(1),
        ],
    )
    .unwrap();
    assert_eq!(frames.len(), 1);
    let stats = &frames[0];
    assert_eq!((stats.frame_id, stats.scanout, stats.tiles, stats.videos), (1, 0, 3, 0));
    assert_eq!(stats.codec, Codec::Tiles);
    assert_eq!(stats.bytes, 50, "five messages of 10 bytes each (as the test says)");
    assert_eq!((stats.received_us, stats.decoded_us, stats.update_latency_us), (5_000, 6_000, 5_000));

    let fb = displays.snapshot(0).unwrap();
    assert_eq!((fb.width, fb.height), (64, 32));
    assert_eq!(fb.pixel(0, 0), Some([0x33, 0x22, 0x11, 0x00]));
    assert_eq!(fb.pixel(63, 0), Some([0x33, 0x22, 0x11, 0x00]));
    assert_eq!(region(&fb, Rect { x: 4, y: 2, width: 16, height: 8 }), raw);
    assert_eq!(region(&fb, Rect { x: 32, y: 16, width: 32, height: 16 }), zstd_pixels);
}

#[test]
fn snapshots_show_whole_frames_only() {
    let mut displays = Displays::new();
    let mut stream = DisplayStream::new();
    run(&mut displays, &mut stream, &[begin(1, 8, 8), tile(0, 0, 8, 8, TileData::Solid(0xff)), end(1)])
        .unwrap();
    run(&mut displays, &mut stream, &[begin(2, 8, 8), tile(0, 0, 4, 4, TileData::Solid(0xff00))]).unwrap();
    assert_eq!(displays.snapshot(0).unwrap().pixel(0, 0), Some([0xff, 0, 0, 0]), "frame 2 is still open");
    run(&mut displays, &mut stream, &[end(2)]).unwrap();
    let fb = displays.snapshot(0).unwrap();
    assert_eq!(fb.pixel(0, 0), Some([0, 0xff, 0, 0]));
    assert_eq!(fb.pixel(7, 7), Some([0xff, 0, 0, 0]), "undamaged pixels keep the previous frame");
}

#[test]
fn a_new_size_starts_a_new_black_surface() {
    let mut displays = Displays::new();
    let mut stream = DisplayStream::new();
    run(&mut displays, &mut stream, &[begin(1, 8, 8), tile(0, 0, 8, 8, TileData::Solid(0xffffff)), end(1)])
        .unwrap();
    let frames = run(&mut displays, &mut stream, &[begin(2, 16, 4), end(2)]).unwrap();
    assert_eq!(frames[0].codec, Codec::Empty);
    let fb = displays.snapshot(0).unwrap();
    assert_eq!((fb.width, fb.height), (16, 4));
    assert!(fb.pixels.iter().all(|&b| b == 0));
}

#[test]
fn bad_zstd_tiles_are_errors() {
    let wrong_size = zstd::bulk::compress(&[7u8; 8 * 8 * 4 - 4], 3).unwrap();
    let too_big = zstd::bulk::compress(&[7u8; 8 * 8 * 4 + 4], 3).unwrap();
    for data in [wrong_size, too_big, vec![1, 2, 3, 4]] {
        let mut displays = Displays::new();
        let mut stream = DisplayStream::new();
        let error =
            run(&mut displays, &mut stream, &[begin(1, 8, 8), tile(0, 0, 8, 8, TileData::Zstd(data))])
                .unwrap_err();
        assert!(matches!(error, DisplayError::Zstd { .. }), "{error}");
        assert_eq!(error.error_code(), error_code::MALFORMED_MESSAGE);
    }
}

#[test]
fn palette_tiles_land_as_their_pixels_and_bad_ones_are_errors() {
    // A 16x4 two-colour picture: as 1-bit indices, plain and zstd-compressed.
    let (bg, ink) = ([24u8, 24, 24, 0], [220u8, 220, 220, 0]);
    let pixels: Vec<u8> = (0..16 * 4).flat_map(|i| if (i * 7) % 5 < 2 { ink } else { bg }).collect();
    let (colours, packed) = palette::pack(&pixels, 16, 4).unwrap();
    let compressed = zstd::bulk::compress(&packed, 3).unwrap();
    let mut displays = Displays::new();
    let mut stream = DisplayStream::new();
    let palette = |zstd, indices| TileData::Palette { colours: colours.clone(), zstd, indices };
    run(
        &mut displays,
        &mut stream,
        &[
            begin(1, 32, 8),
            tile(0, 0, 16, 4, palette(false, packed.clone())),
            tile(16, 4, 16, 4, palette(true, compressed)),
            end(1),
        ],
    )
    .unwrap();
    let fb = displays.snapshot(0).unwrap();
    assert_eq!(region(&fb, Rect { x: 0, y: 0, width: 16, height: 4 }), pixels);
    assert_eq!(region(&fb, Rect { x: 16, y: 4, width: 16, height: 4 }), pixels);
    // Indices beyond a three-colour palette; zstd indices that are more than the tile holds.
    let beyond = TileData::Palette { colours: vec![1, 2, 3], zstd: false, indices: vec![0xff; 4 * 4] };
    let bomb = palette(true, zstd::bulk::compress(&[0u8; 4096], 3).unwrap());
    for data in [beyond, bomb] {
        let mut displays = Displays::new();
        let mut stream = DisplayStream::new();
        let error = run(&mut displays, &mut stream, &[begin(1, 32, 8), tile(0, 0, 16, 4, data)]).unwrap_err();
        assert!(matches!(error, DisplayError::Palette { .. }), "{error}");
        assert_eq!(error.error_code(), error_code::MALFORMED_MESSAGE);
    }
}

#[test]
fn sequence_violations_never_touch_a_surface() {
    let mut displays = Displays::new();
    let mut stream = DisplayStream::new();
    let error =
        run(&mut displays, &mut stream, &[begin(1, 8, 8), tile(4, 4, 8, 8, TileData::Solid(1))]).unwrap_err();
    assert!(matches!(error, DisplayError::Sequence(SequenceError::OutsideScanout { .. })), "{error}");
    assert_eq!(error.error_code(), error_code::PROTOCOL_VIOLATION);

    let mut stream = DisplayStream::new();
    let error = run(&mut displays, &mut stream, &[tile(0, 0, 1, 1, TileData::Solid(1))]).unwrap_err();
    assert!(matches!(error, DisplayError::Sequence(SequenceError::UpdateOutsideFrame)));

    let mut stream = DisplayStream::new();
    let error = run(&mut displays, &mut stream, &[begin(5, 8, 8), end(5), begin(5, 8, 8)]).unwrap_err();
    assert!(matches!(error, DisplayError::Sequence(SequenceError::FrameIdNotIncreasing { .. })));
}

#[test]
fn oversized_surfaces_and_too_many_scanouts_are_refused() {
    let mut displays = Displays::new();
    let mut stream = DisplayStream::new();
    let error = run(&mut displays, &mut stream, &[begin(1, 16384, 16384)]).unwrap_err();
    assert!(matches!(error, DisplayError::TooLarge { .. }));
    let mut displays = Displays::new();
    let big = |scanout| {
        DisplayMessage::FrameBegin(FrameBegin {
            frame_id: 1,
            scanout,
            width: 8192,
            height: 8192,
            capture_us: 0,
        })
    };
    DisplayStream::new().on_message(&mut displays, &big(0), 0, 0, || 0).unwrap();
    DisplayStream::new().on_message(&mut displays, &big(1), 0, 0, || 0).unwrap();
    let error = DisplayStream::new().on_message(&mut displays, &big(2), 0, 0, || 0).unwrap_err();
    assert!(matches!(error, DisplayError::TooLargeInAll { scanout: 2, .. }), "{error}");
    let mut displays = Displays::new();
    for scanout in 0..16u32 {
        let mut stream = DisplayStream::new();
        let message = DisplayMessage::FrameBegin(FrameBegin {
            frame_id: 1,
            scanout,
            width: 1,
            height: 1,
            capture_us: 0,
        });
        stream.on_message(&mut displays, &message, 0, 0, || 0).unwrap();
    }
    let mut stream = DisplayStream::new();
    let message = DisplayMessage::FrameBegin(FrameBegin {
        frame_id: 1,
        scanout: 99,
        width: 1,
        height: 1,
        capture_us: 0,
    });
    let error = stream.on_message(&mut displays, &message, 0, 0, || 0).unwrap_err();
    assert!(matches!(error, DisplayError::TooManyScanouts { scanout: 99 }));
}

/// H.264 from OpenH264's encoder, decoded through the client into a region of a larger surface.
#[test]
fn h264_regions_decode_close_to_the_source() {
    let (width, height) = (160u32, 96u32);
    let source = pattern(width, height);
    let config = EncoderConfig::new().bitrate(openh264::encoder::BitRate::from_bps(4_000_000));
    let mut encoder = Encoder::with_api_config(openh264::OpenH264API::from_source(), config).unwrap();
    let yuv = YUVBuffer::from_bgra8_source(BgraSliceU8::new(&source, (width as usize, height as usize)));
    let access_unit = encoder.encode(&yuv).unwrap().to_vec();
    assert!(!access_unit.is_empty());

    let mut displays = Displays::new();
    let mut stream = DisplayStream::new();
    let rect = Rect { x: 32, y: 16, width, height };
    let video = DisplayMessage::Video(Video { rect, keyframe: true, data: access_unit });
    let frames = run(
        &mut displays,
        &mut stream,
        &[begin(1, 256, 128), tile(0, 0, 256, 128, TileData::Solid(0x00ff_00ff)), video, end(1)],
    )
    .unwrap();
    assert_eq!(frames[0].codec, Codec::Mixed);
    assert_eq!((frames[0].videos, frames[0].decode_errors), (1, 0));
    let fb = displays.snapshot(0).unwrap();
    let decoded = region(&fb, rect);
    let quality = psnr(&source, &decoded);
    assert!(quality > 30.0, "PSNR {quality:.1} dB");
    assert_eq!(fb.pixel(0, 0), Some([0xff, 0, 0xff, 0]), "outside the region the tile stays");
    assert_eq!(fb.pixel(32 + width, 16), Some([0xff, 0, 0xff, 0]));

    // Garbage is counted, not fatal.
    let garbage =
        DisplayMessage::Video(Video { rect, keyframe: false, data: vec![0, 0, 0, 1, 0x65, 1, 2, 3] });
    let frames = run(&mut displays, &mut stream, &[begin(2, 256, 128), garbage, end(2)]).unwrap();
    assert_eq!((frames[0].codec, frames[0].decode_errors), (Codec::H264, 1));
    assert_eq!(displays.decode_errors, 1);
}

/// A region encoded at half its size (`SCALED_VIDEO`) fills the whole region, scaled up, on
/// both paths: converted on the CPU, and handed to a GPU consumer as a full-size picture.
#[test]
fn a_half_size_picture_fills_its_region_scaled_up() {
    let (width, height) = (160u32, 96u32);
    let source = pattern(width, height);
    let half = scale::bilinear(&source, (width, height), width as usize * 4, 4, (80, 48)).unwrap();
    let config = EncoderConfig::new().bitrate(openh264::encoder::BitRate::from_bps(4_000_000));
    let mut encoder = Encoder::with_api_config(openh264::OpenH264API::from_source(), config).unwrap();
    let yuv = YUVBuffer::from_bgra8_source(BgraSliceU8::new(&half, (80, 48)));
    let access_unit = encoder.encode(&yuv).unwrap().to_vec();
    let rect = Rect { x: 32, y: 16, width, height };
    let video = || DisplayMessage::Video(Video { rect, keyframe: true, data: access_unit.clone() });
    let background = || tile(0, 0, 256, 128, TileData::Solid(0x00ff_00ff));

    let mut displays = Displays::new();
    let mut stream = DisplayStream::new();
    let frames =
        run(&mut displays, &mut stream, &[begin(1, 256, 128), background(), video(), end(1)]).unwrap();
    assert_eq!((frames[0].videos, frames[0].decode_errors), (1, 0));
    let fb = displays.snapshot(0).unwrap();
    // Half the detail, but the whole region: the gradients come back close, the square's edges
    // soft (a full-size picture gets over 30 dB here).
    let quality = psnr(&source, &region(&fb, rect));
    assert!(quality > 24.0, "PSNR {quality:.1} dB");
    assert_ne!(
        fb.pixel(32 + width - 1, 16 + height - 1),
        Some([0xff, 0, 0xff, 0]),
        "the last pixel is the picture's"
    );
    assert_eq!(fb.pixel(32 + width, 16), Some([0xff, 0, 0xff, 0]), "nothing outside the region");
    assert_eq!(fb.pixel(31, 16 + height - 1), Some([0xff, 0, 0xff, 0]));

    // The GPU path gets the same picture at full size, and converts it to the same pixels.
    let mut gpu = Displays::new();
    gpu.set_gpu_video(true);
    let mut stream = DisplayStream::new();
    run(&mut gpu, &mut stream, &[begin(1, 256, 128), background(), video(), end(1)]).unwrap();
    let mut pictures = Vec::new();
    assert!(gpu.drain_for_gpu(0, |update| pictures = update.videos));
    assert_eq!(pictures.len(), 1);
    assert_eq!(pictures[0].rect, rect);
    assert_eq!((pictures[0].y.len(), pictures[0].u.len()), (160 * 96, 80 * 48));
    let mut converted = Framebuffer::new(256, 128);
    pictures[0].convert_into(&mut converted);
    assert_eq!(region(&converted, rect), region(&fb, rect));
}

#[test]
fn png_round_trips_the_pixels() {
    let fb = Framebuffer { width: 3, height: 2, pixels: pattern(3, 2) };
    let mut bytes = Vec::new();
    fb.encode_png(&mut bytes).unwrap();
    let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
    let mut reader = decoder.read_info().unwrap();
    let mut rgb = vec![0; reader.output_buffer_size().unwrap()];
    reader.next_frame(&mut rgb).unwrap();
    for (i, p) in fb.pixels.chunks_exact(4).enumerate() {
        assert_eq!(&rgb[i * 3..i * 3 + 3], &[p[2], p[1], p[0]]);
    }
}
