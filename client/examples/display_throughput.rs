//! How fast the client's display path applies 1080p updates (release build):
//! `cargo run --release -p pleiades-client --example display_throughput`.
//!
//! Encodes moving screen-like content with OpenH264 and zstd first, then times only the
//! client's side: `DisplayStream::on_message` (decode, convert, present).

use std::time::Instant;

use openh264::encoder::{BitRate, Encoder, EncoderConfig, UsageType};
use openh264::formats::{BgraSliceU8, YUVBuffer};
use pleiades_client::display::{DisplayStream, Displays};
use pleiades_protocol::wire::{DisplayMessage, FrameBegin, FrameEnd, Rect, Tile, TileData, Video};

const W: u32 = 1920;
const H: u32 = 1080;
const FRAMES: u64 = 120;

fn frame(t: u32) -> Vec<u8> {
    let mut pixels = vec![0u8; (W * H * 4) as usize];
    for (i, p) in pixels.chunks_exact_mut(4).enumerate() {
        let (x, y) = (i as u32 % W, i as u32 / W);
        let text = u8::from((x / 8 + y / 16 + t).is_multiple_of(7)) * 200;
        p.copy_from_slice(&[(x + t * 4) as u8, (y + t * 2) as u8, text, 0]);
    }
    pixels
}

fn main() {
    let config = EncoderConfig::new()
        .bitrate(BitRate::from_bps(8_000_000))
        .usage_type(UsageType::ScreenContentRealTime);
    let mut encoder = Encoder::with_api_config(openh264::OpenH264API::from_source(), config).unwrap();
    let rect = Rect { x: 0, y: 0, width: W, height: H };
    let mut videos = Vec::new();
    let mut tiles = Vec::new();
    for t in 0..FRAMES as u32 {
        let pixels = frame(t);
        let yuv = YUVBuffer::from_bgra8_source(BgraSliceU8::new(&pixels, (W as usize, H as usize)));
        videos.push(encoder.encode(&yuv).unwrap().to_vec());
        if t < 20 {
            tiles.push(zstd::bulk::compress(&pixels, 3).unwrap());
        }
    }
    let run = |updates: Vec<DisplayMessage>, name: &str| {
        let mut displays = Displays::new();
        let mut stream = DisplayStream::new();
        let count = updates.len() as u64;
        let start = Instant::now();
        for (i, update) in updates.into_iter().enumerate() {
            let id = i as u64 + 1;
            let begin = DisplayMessage::FrameBegin(FrameBegin {
                frame_id: id,
                scanout: 0,
                width: W,
                height: H,
                capture_us: 0,
            });
            for message in [begin, update, DisplayMessage::FrameEnd(FrameEnd { frame_id: id })] {
                stream.on_message(&mut displays, &message, 0, 0, || 0).unwrap();
            }
        }
        let per_frame = start.elapsed() / count as u32;
        println!(
            "{name}: {per_frame:?} per 1080p frame ({:.0} fps), decode errors {}",
            1.0 / per_frame.as_secs_f64(),
            displays.decode_errors
        );
    };
    let mut decoder = openh264::decoder::Decoder::new().unwrap();
    let start = Instant::now();
    for data in &videos {
        decoder.decode(data).unwrap();
    }
    println!("OpenH264 decode alone: {:?} per frame", start.elapsed() / videos.len() as u32);
    let bytes: usize = videos.iter().map(Vec::len).sum();
    println!("H.264: {} frames, {} KiB/frame", videos.len(), bytes / videos.len() / 1024);
    run(
        videos
            .into_iter()
            .enumerate()
            .map(|(i, data)| DisplayMessage::Video(Video { rect, keyframe: i == 0, data }))
            .collect(),
        "h264",
    );
    run(
        tiles
            .into_iter()
            .map(|data| DisplayMessage::Tile(Tile { rect, data: TileData::Zstd(data) }))
            .collect(),
        "zstd full-screen tile",
    );
}
