//! The window's GPU path against the CPU path, on whatever adapter wgpu finds (Mesa's lavapipe
//! or llvmpipe without a GPU): H.264 pictures converted by the WGSL shader must give the same
//! bytes as display.rs's fixed-point conversion, and tiles must land where they belong.
//!
//! The prerequisite is a Vulkan or GL driver (Mesa's `mesa-vulkan-drivers`/`libgl1-mesa-dri`,
//! installed by `./dev deps`): without one the tests skip outside CI and fail under CI. With one,
//! a client that cannot open an adapter fails: that is the code under test failing.

use openh264::encoder::{BitRate, Encoder, EncoderConfig, UsageType};
use openh264::formats::{BgraSliceU8, YUVBuffer};
use pleiades_client::display::{DisplayStream, Displays, Framebuffer};
use pleiades_client::window::render::{self, Frame, Gpu, ScanoutTexture};
use pleiades_protocol::wire::{DisplayMessage, FrameBegin, FrameEnd, Rect, Tile, TileData, Video};

const W: u32 = 320;
const H: u32 = 240;

/// Mesa's software drivers, where Debian installs them.
const SOFTWARE_DRIVERS: [&str; 2] =
    ["/usr/share/vulkan/icd.d/lvp_icd.x86_64.json", "/usr/lib/x86_64-linux-gnu/dri/swrast_dri.so"];

fn gpu(test: &str) -> Option<Gpu> {
    let driver = SOFTWARE_DRIVERS.iter().find(|p| std::path::Path::new(p).exists()).ok_or_else(|| {
        format!("no Vulkan or GL driver ({}); `./dev deps` installs Mesa's", SOFTWARE_DRIVERS.join(", "))
    });
    pleiades_testkit::prerequisite::require(test, driver)?;
    Some(Gpu::headless().unwrap_or_else(|e| panic!("a driver is installed, yet the client has no GPU: {e}")))
}

fn apply(displays: &mut Displays, stream: &mut DisplayStream, id: u64, updates: Vec<DisplayMessage>) {
    let begin = DisplayMessage::FrameBegin(FrameBegin {
        frame_id: id,
        scanout: 0,
        width: W,
        height: H,
        capture_us: 0,
    });
    let mut messages = vec![begin];
    messages.extend(updates);
    messages.push(DisplayMessage::FrameEnd(FrameEnd { frame_id: id }));
    for message in messages {
        stream.on_message(displays, &message, 0, 0, || 0).unwrap();
    }
}

fn gradient() -> Vec<u8> {
    let mut pixels = vec![0u8; (W * H * 4) as usize];
    for (i, p) in pixels.chunks_exact_mut(4).enumerate() {
        let (x, y) = (i as u32 % W, i as u32 / W);
        p.copy_from_slice(&[(x * 3) as u8, (y * 2) as u8, ((x + y) / 2) as u8, 0]);
    }
    pixels
}

/// The GPU's picture of the scanout, as BGRX with the X byte cleared.
fn gpu_picture(gpu: &Gpu, texture: &wgpu::Texture) -> Vec<u8> {
    let mut bytes = render::read_back(gpu, texture);
    for p in bytes.chunks_exact_mut(4) {
        p[3] = 0;
    }
    bytes
}

#[test]
fn gpu_yuv_conversion_and_tiles_give_the_cpu_paths_bytes() {
    let Some(mut gpu) = gpu("gpu_yuv_conversion_and_tiles_give_the_cpu_paths_bytes") else { return };
    let config = EncoderConfig::new()
        .bitrate(BitRate::from_bps(2_000_000))
        .usage_type(UsageType::ScreenContentRealTime);
    let mut encoder = Encoder::with_api_config(openh264::OpenH264API::from_source(), config).unwrap();
    let pixels = gradient();
    let yuv = YUVBuffer::from_bgra8_source(BgraSliceU8::new(&pixels, (W as usize, H as usize)));
    let video = encoder.encode(&yuv).unwrap().to_vec();
    // A video region, and a tile over part of it in a later frame (the "lossless refresh").
    let region = Rect { x: 0, y: 0, width: W, height: H };
    let tile_rect = Rect { x: 16, y: 8, width: 32, height: 24 };
    let tile = vec![0x40u8; (tile_rect.width * tile_rect.height * 4) as usize];
    let frames = [
        vec![DisplayMessage::Video(Video { rect: region, keyframe: true, data: video })],
        vec![DisplayMessage::Tile(Tile { rect: tile_rect, data: TileData::Raw(tile) })],
    ];

    let (mut cpu, mut cpu_stream) = (Displays::new(), DisplayStream::new());
    let (mut gpu_side, mut gpu_stream) = (Displays::new(), DisplayStream::new());
    gpu_side.set_gpu_video(true);
    let mut scanout = ScanoutTexture::new(&gpu, W, H);
    for (i, updates) in frames.into_iter().enumerate() {
        apply(&mut cpu, &mut cpu_stream, i as u64 + 1, updates.clone());
        apply(&mut gpu_side, &mut gpu_stream, i as u64 + 1, updates);
        assert!(gpu_side.drain_for_gpu(0, |update| scanout.apply(&gpu, &update)), "frame {i} had changes");
        let expected: Framebuffer = cpu.snapshot(0).unwrap();
        assert_eq!(gpu_side.snapshot(0).unwrap(), expected, "frame {i}: the YUV-keeping displays' snapshot");
        let got = gpu_picture(&gpu, scanout.texture());
        // BGR only: the X byte is padding (a raw tile may carry anything there).
        let differing = got
            .chunks_exact(4)
            .zip(expected.pixels.chunks_exact(4))
            .filter(|(a, b)| a[..3] != b[..3])
            .count();
        assert_eq!(differing, 0, "frame {i}: pixels where the GPU differs from the CPU");
    }
    assert!(!gpu_side.drain_for_gpu(0, |_| {}), "nothing left to upload");

    // Drawing 1:1 onto a target of the same size reproduces the scanout exactly.
    let target = render::offscreen_target(&gpu, W, H);
    let view = target.create_view(&Default::default());
    let frame = Frame::new(&gpu);
    let placement = render::fit((W, H), (W, H));
    frame.draw(&mut gpu, &view, render::CONTENT_FORMAT, (W, H), Some((&scanout, placement)), &[]);
    let drawn = gpu_picture(&gpu, &target);
    assert_eq!(drawn, gpu_picture(&gpu, scanout.texture()), "the presented picture is the scanout's");
}

#[test]
fn the_desktop_fits_the_window() {
    assert_eq!(
        render::fit((1280, 800), (1920, 1080)),
        render::Placement { x: 0.0, y: 0.0, width: 1280.0, height: 800.0 }
    );
    assert_eq!(
        render::fit((1920, 1080), (960, 1080)),
        render::Placement { x: 0.0, y: 0.0, width: 960.0, height: 540.0 }
    );
}
