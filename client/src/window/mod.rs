//! The windowed client: `pleiades connect FILE|URI` without `--headless`.
//!
//! ```text
//! main thread: winit event loop ── App (app.rs): windows, wgpu (render.rs), input (keys.rs)
//!                    ▲ LinkEvent (EventLoopProxy)          │ Request (unbounded channel)
//!                    │                                     ▼
//! tokio runtime:  supervise (link.rs): connect, resume ── forward_requests ──▶ SessionHandle
//!                    └── Session tasks (session.rs): decode into Displays (display.rs)
//! ```
//!
//! The session decodes into the shared [`crate::display::Displays`] as in headless mode, but
//! with H.264 pictures kept in YUV ([`crate::display::Displays::set_gpu_video`]); a presented
//! frame wakes its window, which uploads the damage ([`crate::display::Displays::drain_for_gpu`])
//! and draws. Keys: Ctrl+Alt+Enter toggles fullscreen, Ctrl+Alt+S the statistics overlay,
//! Ctrl+Alt+U the USB menu ([`usb_menu`]: which devices are in the desktop, a number moves one).
//! Files dropped on a window (and `--send`) go into the desktop's Downloads ([`crate::files`]),
//! with their progress in the title; a transfer cut by a lost connection goes on after the
//! resume.

pub mod app;
pub mod keys;
pub mod link;
pub mod render;
pub mod text;
pub mod usb_menu;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use pleiades_protocol::connfile::Connection;
use tokio::sync::mpsc;
use winit::event_loop::EventLoop;

use crate::audio::AudioOptions;
use crate::session::SessionOptions;

/// Opens the desktop in windows until the person closes one; sound as `audio` says. Errors: no
/// display, no GPU.
pub fn run(
    connection: Connection,
    options: SessionOptions,
    audio: AudioOptions,
    files: crate::files::FileQueue,
    usb: crate::usb::redirect::UsbDevices,
) -> anyhow::Result<()> {
    let event_loop = EventLoop::<link::LinkEvent>::with_user_event()
        .build()
        .context("cannot open a window: no display (is DISPLAY or WAYLAND_DISPLAY set?)")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let current: link::Current = Arc::default();
    let (requests, requests_rx) = mpsc::unbounded_channel();
    runtime.spawn(link::forward_requests(current.clone(), requests_rx));
    let proxy = event_loop.create_proxy();
    let (gpu_video, gpu_video_rx) = tokio::sync::watch::channel(None);
    let desktop = connection.desktop.clone();
    tracing::info!(host = %connection.host, port = connection.port, desktop = %desktop, "connecting");
    let usb_menu = usb_menu::UsbMenu::new(&usb);
    let link = link::Link { connection, options, audio, current: current.clone(), files: files.clone(), usb };
    runtime.spawn(link.supervise(gpu_video_rx, move |event| {
        let _ = proxy.send_event(event);
    }));
    let mut app = app::App::new(
        desktop,
        event_loop.owned_display_handle(),
        current.clone(),
        requests,
        gpu_video,
        files,
        usb_menu,
    );
    event_loop.run_app(&mut app).context("the window system failed")?;
    // Closed: say goodbye (bounded), then stop.
    let handle = link::lock(&current).take();
    if let Some(handle) = handle {
        runtime.block_on(async {
            let _ = tokio::time::timeout(Duration::from_secs(3), handle.disconnect("the window was closed"))
                .await;
        });
    }
    runtime.shutdown_timeout(Duration::from_secs(1));
    match app.gpu_error() {
        Some(error) => anyhow::bail!("{error}"),
        None => Ok(()),
    }
}
