//! The display path's quality: the host's encoder (`pleiades_host::display`) and the client's
//! decoder (`pleiades_client::display`) on the `video` workload's pictures. Motion goes out as
//! H.264 at the session's default LAN bitrate and arrives with at least 35 dB PSNR in the
//! moving region; when the motion stops, the client converges to the source pixel for pixel.

use pleiades_agent::workload::{self, Canvas, Workload};
use pleiades_client::display::{DisplayStream, Displays};
use pleiades_session::display::{DisplayEncoder, EncoderSettings, wire_messages};
use pleiades_virtio::gpu::Framebuffer;
use pleiades_virtio::gpu::protocol::Rect;

const W: u32 = 1280;
const H: u32 = 720;

/// A canvas that is a framebuffer and records the damage.
struct Screen {
    frame: Framebuffer,
    damage: Vec<Rect>,
}

impl Canvas for Screen {
    fn size(&self) -> (u32, u32) {
        (self.frame.width, self.frame.height)
    }
    fn put(&mut self, x: u32, y: u32, w: u32, h: u32, pixels: &[u8]) -> std::io::Result<()> {
        let stride = self.frame.stride();
        for (i, row) in pixels.chunks_exact(w as usize * 4).enumerate() {
            let at = (y as usize + i) * stride + x as usize * 4;
            self.frame.pixels[at..at + row.len()].copy_from_slice(row);
        }
        self.damage.push(Rect::new(x, y, w, h));
        Ok(())
    }
}

/// PSNR (dB) of the luma-weighted RGB error over `rect`.
fn psnr(a: &[u8], b: &[u8], width: u32, rect: Rect) -> f64 {
    let mut sum = 0.0f64;
    for y in rect.y..rect.y + rect.height {
        for x in rect.x..rect.x + rect.width {
            let at = ((y * width + x) * 4) as usize;
            for c in 0..3 {
                let d = f64::from(a[at + c]) - f64::from(b[at + c]);
                sum += d * d;
            }
        }
    }
    let mse = sum / (rect.area() as f64 * 3.0);
    if mse == 0.0 { f64::INFINITY } else { 10.0 * (255.0f64 * 255.0 / mse).log10() }
}

#[test]
fn video_arrives_above_35_db_and_a_still_screen_converges_exactly() {
    let mut screen = Screen { frame: Framebuffer::new(W, H), damage: Vec::new() };
    let mut encoder = DisplayEncoder::new(W, H);
    let settings = EncoderSettings::default();
    let mut displays = Displays::new();
    let mut stream = DisplayStream::new();
    let region = Rect::new((W - 640) / 2, (H - 360) / 2, 640, 360);
    let mut frame_id = 0;
    let mut video_psnr = Vec::new();
    let mut send = |screen: &mut Screen, displays: &mut Displays| -> bool {
        let damage = std::mem::take(&mut screen.damage);
        frame_id += 1;
        let now = frame_id * 33_333;
        let Some(encoded) = encoder.encode(&screen.frame, &damage, &settings, now).unwrap() else {
            return false;
        };
        let video = encoded.video.is_some();
        for m in wire_messages(frame_id, 0, 0, encoded) {
            stream.on_message(displays, &m, 0, 0, || 0).expect("the client accepts the host's frames");
        }
        video
    };
    // The desktop, then 40 frames of video.
    let desktop: Vec<u8> = (0..H).flat_map(|y| (0..W).flat_map(move |x| workload::desktop(x, y))).collect();
    screen.put(0, 0, W, H, &desktop).unwrap();
    send(&mut screen, &mut displays);
    for n in 1..=40 {
        workload::step(Workload::Video, &mut screen, n).unwrap();
        if send(&mut screen, &mut displays) {
            let client = displays.snapshot(0).expect("a presented frame");
            video_psnr.push(psnr(&client.pixels, &screen.frame.pixels, W, region));
        }
    }
    assert!(video_psnr.len() >= 20, "the moving region went out as H.264 ({} frames)", video_psnr.len());
    let mean = video_psnr.iter().sum::<f64>() / video_psnr.len() as f64;
    let worst = video_psnr.iter().copied().fold(f64::INFINITY, f64::min);
    eprintln!("H.264 region PSNR over {} frames: mean {mean:.1} dB, worst {worst:.1} dB", video_psnr.len());
    assert!(mean >= 35.0 && worst >= 32.0, "mean {mean:.1} dB, worst {worst:.1} dB");

    // Motion stops: a few quiet frames later the client holds the source exactly.
    for _ in 0..60 {
        send(&mut screen, &mut displays);
    }
    let client = displays.snapshot(0).unwrap();
    assert_eq!(
        psnr(&client.pixels, &screen.frame.pixels, W, Rect::new(0, 0, W, H)),
        f64::INFINITY,
        "pixel-exact after the lossless refresh"
    );
}
