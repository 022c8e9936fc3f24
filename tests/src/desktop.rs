//! The graphical desktop image's checks: whether a screen shows Xfce's desktop (its panel and
//! wallpaper) rather than a console or a black screen, and screenshots through a VM's control
//! socket.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use pleiades_control::Request;
use pleiades_control::screenshot::decode_png;
use pleiades_virtio::gpu::Framebuffer;

use crate::image::DesktopImage;
use crate::wait_for;

/// A frame's pixel as RGB (frames are BGRX).
pub fn pixel(p: &[u8], width: u32, x: u32, y: u32) -> [u8; 3] {
    let i = ((y * width + x) * 4) as usize;
    [p[i + 2], p[i + 1], p[i]]
}

/// The commonest colour of these pixels, and its share of them.
fn commonest(pixels: impl Iterator<Item = [u8; 3]>) -> ([u8; 3], f64) {
    let mut counts = std::collections::HashMap::new();
    let mut total = 0usize;
    for p in pixels {
        *counts.entry(p).or_insert(0usize) += 1;
        total += 1;
    }
    let (colour, count) = counts.into_iter().max_by_key(|(_, n)| *n).unwrap_or(([0; 3], 0));
    (colour, count as f64 / total.max(1) as f64)
}

/// What makes a screen Xfce's desktop rather than a console or a black screen: a panel along
/// the top (its rows nearly all one light colour) above a wallpaper (the middle of the screen
/// mostly one colour, not black, not the panel's). Returns why not, or `None`.
pub fn not_a_desktop(frame: &Framebuffer) -> Option<String> {
    let (width, height, p) = (frame.width, frame.height, frame.pixels.as_slice());
    let panel = commonest(
        (4..20).flat_map(|y| (0..width).step_by(3).map(move |x| (x, y))).map(|(x, y)| pixel(p, width, x, y)),
    );
    if panel.1 < 0.6 || panel.0.iter().map(|&c| u32::from(c)).sum::<u32>() < 300 {
        return Some(format!(
            "no panel along the top (its commonest colour {:?} covers {:.0} %)",
            panel.0,
            panel.1 * 100.0
        ));
    }
    let middle = (height / 3..height * 2 / 3)
        .step_by(4)
        .flat_map(|y| (width / 3..width * 2 / 3).step_by(4).map(move |x| (x, y)));
    let wallpaper = commonest(middle.map(|(x, y)| pixel(p, width, x, y)));
    if wallpaper.1 < 0.6 || wallpaper.0.iter().all(|&c| c < 16) || wallpaper.0 == panel.0 {
        return Some(format!(
            "no wallpaper in the middle (its commonest colour {:?} covers {:.0} %)",
            wallpaper.0,
            wallpaper.1 * 100.0
        ));
    }
    None
}

/// A screenshot of the desktop's first monitor through its control socket.
pub fn screenshot(control: &Path) -> Option<Framebuffer> {
    let request = Request::Screenshot { scanout: 0 };
    let response = pleiades_control::request(control, &request, Duration::from_secs(30)).ok()?;
    decode_png(&pleiades_control::png_of_answer(&response).ok()?).ok()
}

/// Waits until the VM's first monitor shows the desktop; how long that took. On a timeout the
/// last screen is kept as an artifact (`desktop/never-usable.png`) and the error says why it
/// was not the desktop.
pub fn wait_usable(control: &Path, timeout: Duration) -> Result<Duration, String> {
    let started = Instant::now();
    let mut last: Option<(String, Framebuffer)> = None;
    let shown = wait_for("Xfce's panel and wallpaper on the screen", timeout, || {
        let frame = screenshot(control)?;
        match not_a_desktop(&frame) {
            None => Some(()),
            Some(why) => {
                last = Some((why, frame));
                None
            }
        }
    });
    match shown {
        Ok(()) => Ok(started.elapsed()),
        Err(e) => {
            let why = match &last {
                Some((why, frame)) => {
                    crate::save_artifact("desktop", "never-usable", frame);
                    why.clone()
                }
                None => "no screenshot".into(),
            };
            Err(format!("{e}: {why}"))
        }
    }
}

/// `pleiades-host run --vmm qemu` for the desktop image alone (2 vCPUs, 2 GiB), on a fresh
/// qcow2 overlay of its disk in `dir`, its serial console, log and control socket there too;
/// the caller adds `--device`s (and a session) and spawns it. Returns the command and the
/// control socket's path.
pub fn run_desktop_image(image: &DesktopImage, dir: &Path) -> (Command, PathBuf) {
    let overlay = dir.join("direct.qcow2");
    let status = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(&image.disk)
        .arg(&overlay)
        .status()
        .expect("qemu-img runs");
    assert!(status.success(), "qemu-img create failed");
    let control = dir.join("direct.sock");
    let mut command = Command::new(crate::workspace_binary("pleiades-host").unwrap());
    command
        .args(["run", "--vmm", "qemu", "--cpus", "2", "--memory", "2G", "--cmdline", &image.cmdline])
        .arg("--kernel")
        .arg(&image.kernel)
        .arg("--initrd")
        .arg(&image.initrd)
        .arg(format!("--disk={}", overlay.display()))
        .arg(format!("--serial={}", dir.join("direct-serial.log").display()))
        .arg("--control")
        .arg(&control)
        .stdout(std::fs::File::create(dir.join("direct.log")).unwrap())
        .stderr(std::fs::File::create(dir.join("direct.err")).unwrap());
    (command, control)
}
