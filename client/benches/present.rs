//! What a 1920×1080 frame costs the windowed client, from the bytes off the wire to a drawn
//! frame, on whatever GPU wgpu finds (lavapipe or llvmpipe on the build machines:
//! `WGPU_BACKEND=vulkan|gl`): `cargo bench -p pleiades-client --bench present`.
//!
//! Each path is timed per frame as a ratio against a reference measured in the same run (these
//! machines are shared and noisy): a plain `memcpy` of one 1080p BGRX frame.
//!
//! - tiles: zstd tile decode → damage upload (`write_texture`) → draw → GPU idle;
//! - h264 gpu: OpenH264 decode → I420 planes uploaded → WGSL YUV→BGRX into the scanout texture
//!   → draw → GPU idle (what the window does);
//! - h264 cpu: OpenH264 decode → CPU YUV→BGRX → BGRX upload → draw → GPU idle (the headless
//!   path's conversion, for comparison).
//!
//! The target is an offscreen texture: presenting to a window adds the swap chain's copy, and
//! under Xvfb the X server's; FIFO pacing would measure the display rate, not the client.

use std::time::{Duration, Instant};

use openh264::encoder::{BitRate, Encoder, EncoderConfig, UsageType};
use openh264::formats::{BgraSliceU8, YUVBuffer};
use pleiades_client::display::{DisplayStream, Displays};
use pleiades_client::window::render::{self, Frame, Gpu, ScanoutTexture};
use pleiades_protocol::wire::{DisplayMessage, FrameBegin, FrameEnd, Rect, Tile, TileData, Video};

const W: u32 = 1920;
const H: u32 = 1080;
const FRAMES: usize = 60;

/// Screen-like content that moves a little every frame.
fn frame(t: u32) -> Vec<u8> {
    let mut pixels = vec![0u8; (W * H * 4) as usize];
    for (i, p) in pixels.chunks_exact_mut(4).enumerate() {
        let (x, y) = (i as u32 % W, i as u32 / W);
        let text = u8::from((x / 8 + y / 16 + t).is_multiple_of(7)) * 200;
        p.copy_from_slice(&[(x + t * 4) as u8, (y + t * 2) as u8, text, 0]);
    }
    pixels
}

struct Path<'a> {
    gpu: &'a mut Gpu,
    target: wgpu::TextureView,
    frame: Frame,
    scanout: ScanoutTexture,
}

impl Path<'_> {
    /// Applies one frame's update, uploads it, draws it and waits for the GPU.
    fn run(&mut self, displays: &mut Displays, stream: &mut DisplayStream, id: u64, update: DisplayMessage) {
        let begin = DisplayMessage::FrameBegin(FrameBegin {
            frame_id: id,
            scanout: 0,
            width: W,
            height: H,
            capture_us: 0,
        });
        for message in [begin, update, DisplayMessage::FrameEnd(FrameEnd { frame_id: id })] {
            stream.on_message(displays, &message, 0, 0, || 0).expect("a valid frame");
        }
        let (gpu, scanout) = (&*self.gpu, &mut self.scanout);
        displays.drain_for_gpu(0, |update| scanout.apply(gpu, &update));
        let placement = render::fit((W, H), (W, H));
        self.frame.draw(
            self.gpu,
            &self.target,
            render::CONTENT_FORMAT,
            (W, H),
            Some((&self.scanout, placement)),
            &[],
        );
        render::wait_idle(self.gpu);
    }
}

fn per_frame(total: Duration, frames: usize) -> f64 {
    total.as_secs_f64() * 1000.0 / frames as f64
}

fn main() {
    let mut gpu = match Gpu::headless() {
        Ok(gpu) => gpu,
        Err(error) => {
            eprintln!("present: {error}");
            std::process::exit(1);
        }
    };
    let info = gpu.adapter.get_info();
    println!("adapter: {} ({:?})", info.name, info.backend);

    let config = EncoderConfig::new()
        .bitrate(BitRate::from_bps(8_000_000))
        .usage_type(UsageType::ScreenContentRealTime);
    let mut encoder =
        Encoder::with_api_config(openh264::OpenH264API::from_source(), config).expect("encoder");
    let rect = Rect { x: 0, y: 0, width: W, height: H };
    let (mut raw, mut tiles, mut videos) = (Vec::new(), Vec::new(), Vec::new());
    for t in 0..FRAMES as u32 {
        let pixels = frame(t);
        let yuv = YUVBuffer::from_bgra8_source(BgraSliceU8::new(&pixels, (W as usize, H as usize)));
        videos.push(encoder.encode(&yuv).expect("encode").to_vec());
        tiles.push(zstd::bulk::compress(&pixels, 3).expect("zstd"));
        raw.push(pixels);
    }

    // Reference: copying one frame's bytes.
    let mut copy = vec![0u8; raw[0].len()];
    let start = Instant::now();
    for round in 0..4 {
        for pixels in &raw {
            copy.copy_from_slice(pixels);
            std::hint::black_box(&mut copy);
        }
        std::hint::black_box(round);
    }
    let memcpy_ms = per_frame(start.elapsed(), raw.len() * 4);

    let target_texture = render::offscreen_target(&gpu, W, H);
    let target = target_texture.create_view(&Default::default());
    let scanout = ScanoutTexture::new(&gpu, W, H);
    let frame = Frame::new(&gpu);
    let mut path = Path { gpu: &mut gpu, target, frame, scanout };

    println!("    memcpy: {memcpy_ms:7.2} ms per 1080p frame (reference)");
    // The parts: OpenH264 alone, and a draw of an unchanged texture.
    let mut decoder = openh264::decoder::Decoder::new().expect("decoder");
    let start = Instant::now();
    for data in &videos {
        let _ = decoder.decode(data).expect("decode");
    }
    let decode_ms = per_frame(start.elapsed(), videos.len());
    println!(
        "  h264 dec: {decode_ms:7.2} ms per 1080p frame = {:6.1} x memcpy (OpenH264 alone)",
        decode_ms / memcpy_ms
    );
    let start = Instant::now();
    for _ in 0..FRAMES {
        let placement = render::fit((W, H), (W, H));
        path.frame.draw(
            path.gpu,
            &path.target,
            render::CONTENT_FORMAT,
            (W, H),
            Some((&path.scanout, placement)),
            &[],
        );
        render::wait_idle(path.gpu);
    }
    let draw_ms = per_frame(start.elapsed(), FRAMES);
    println!(
        "      draw: {draw_ms:7.2} ms per 1080p frame = {:6.1} x memcpy (unchanged texture)",
        draw_ms / memcpy_ms
    );
    let mut time = |name: &str, gpu_video: bool, updates: &dyn Fn(usize) -> DisplayMessage| -> f64 {
        let mut displays = Displays::new();
        displays.set_gpu_video(gpu_video);
        let mut stream = DisplayStream::new();
        // One warm-up frame (pipelines, first texture upload, decoder start).
        path.run(&mut displays, &mut stream, 1, updates(0));
        let start = Instant::now();
        for i in 1..FRAMES {
            path.run(&mut displays, &mut stream, i as u64 + 1, updates(i));
        }
        let ms = per_frame(start.elapsed(), FRAMES - 1);
        println!("{name:>10}: {ms:7.2} ms per 1080p frame = {:6.1} x memcpy", ms / memcpy_ms);
        if displays.decode_errors > 0 {
            println!("{name:>10}: {} decode errors", displays.decode_errors);
        }
        ms
    };

    time("tiles", false, &|i| DisplayMessage::Tile(Tile { rect, data: TileData::Zstd(tiles[i].clone()) }));
    // Each H.264 run decodes the stream from its keyframe.
    time("h264 gpu", true, &|i| {
        DisplayMessage::Video(Video { rect, keyframe: i == 0, data: videos[i].clone() })
    });
    time("h264 cpu", false, &|i| {
        DisplayMessage::Video(Video { rect, keyframe: i == 0, data: videos[i].clone() })
    });
}
