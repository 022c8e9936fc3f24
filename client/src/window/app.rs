//! The winit application: one window per guest monitor, input capture, redraw on damage.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pleiades_protocol::handshake::Capabilities;
use pleiades_protocol::wire::{Monitor, buttons};
use tokio::sync::mpsc;
use winit::application::ApplicationHandler;
use winit::dpi::{PhysicalPosition, PhysicalSize};
use winit::event::{DeviceEvent, DeviceId, ElementState, MouseButton, MouseScrollDelta, WindowEvent};
use winit::event_loop::{ActiveEventLoop, ControlFlow};
use winit::keyboard::{KeyCode, ModifiersState, PhysicalKey};
use winit::window::{CursorGrabMode, Fullscreen, Window, WindowId};

use super::keys;
use super::link::{self, Current, LinkEvent, LinkState, Request};
use super::render::{self, Frame, Gpu, Layer, Placement, ScanoutTexture};
use super::text;
use crate::display::Codec;

/// Window size changes are sent to the guest once they have settled this long.
pub const RESIZE_DEBOUNCE: Duration = Duration::from_millis(250);
/// The size of the first window, before the guest's layout is known.
const FIRST_SIZE: PhysicalSize<u32> = PhysicalSize::new(1024, 768);

/// One window: a guest monitor.
struct DesktopWindow {
    window: Arc<Window>,
    surface: wgpu::Surface<'static>,
    config: wgpu::SurfaceConfiguration,
    /// The format drawn in: the surface's, without sRGB encoding (the guest's bytes are shown
    /// as they are).
    view_format: wgpu::TextureFormat,
    content: Option<ScanoutTexture>,
    frame: Frame,
    /// The pointer inside this window (physical pixels), if it is.
    pointer: Option<PhysicalPosition<f64>>,
    /// The status or overlay text shown, and its layer.
    text: Option<(Vec<String>, Layer)>,
    /// Until the person resizes it, the window takes the guest monitor's size.
    follow_guest: bool,
}

/// Everything the event loop owns.
pub struct App {
    desktop: String,
    display: winit::event_loop::OwnedDisplayHandle,
    gpu: Option<Gpu>,
    gpu_error: Option<String>,
    windows: BTreeMap<u32, DesktopWindow>,
    ids: HashMap<WindowId, u32>,
    layout: Vec<Monitor>,
    state: LinkState,
    current: Current,
    requests: mpsc::UnboundedSender<Request>,
    modifiers: ModifiersState,
    pressed: BTreeSet<u16>,
    buttons: u32,
    overlay: bool,
    stats: Option<(f64, f64)>,
    codec: Option<Codec>,
    cursor: Option<(u32, Layer, u16, u16)>,
    resize_due: Option<Instant>,
    /// Relative mode: the window that holds the pointer grab, and motion below a whole unit.
    grabbed: Option<u32>,
    motion_rest: (f64, f64),
    /// Tells the link whether H.264 pictures are converted on the GPU.
    gpu_video: tokio::sync::watch::Sender<Option<bool>>,
    /// Files dropped on a window go here; the link sends them.
    files: crate::files::FileQueue,
    /// The USB menu, and its lines while it is open (Ctrl+Alt+U).
    usb_menu: super::usb_menu::UsbMenu,
    usb_lines: Option<Vec<String>>,
    /// What the last choice in it did.
    usb_note: Option<String>,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App").field("state", &self.state).finish_non_exhaustive()
    }
}

impl App {
    pub fn new(
        desktop: String,
        display: winit::event_loop::OwnedDisplayHandle,
        current: Current,
        requests: mpsc::UnboundedSender<Request>,
        gpu_video: tokio::sync::watch::Sender<Option<bool>>,
        files: crate::files::FileQueue,
        usb_menu: super::usb_menu::UsbMenu,
    ) -> Self {
        Self {
            desktop,
            display,
            gpu: None,
            gpu_error: None,
            windows: BTreeMap::new(),
            ids: HashMap::new(),
            layout: Vec::new(),
            state: LinkState::Connecting,
            current,
            requests,
            modifiers: ModifiersState::empty(),
            pressed: BTreeSet::new(),
            buttons: 0,
            overlay: false,
            stats: None,
            codec: None,
            cursor: None,
            resize_due: None,
            grabbed: None,
            motion_rest: (0.0, 0.0),
            gpu_video,
            files,
            usb_menu,
            usb_lines: None,
            usb_note: None,
        }
    }

    /// Why the window could not be shown, if it could not.
    pub fn gpu_error(&self) -> Option<&str> {
        self.gpu_error.as_deref()
    }

    fn title(&self, scanout: u32) -> String {
        let monitor = if self.windows.len() > 1 { format!(" #{scanout}") } else { String::new() };
        let grab = if self.grabbed.is_some() { " - pointer grabbed, Ctrl+Alt releases" } else { "" };
        let files = self.files.status_line().map(|line| format!(" - {line}")).unwrap_or_default();
        format!("Pleiades: {}{monitor} [{}]{grab}{files}", self.desktop, self.state.label())
    }

    /// Relative mode on: the pointer is grabbed by `scanout`'s window and its motion goes to the
    /// VM's mouse. Needs the server's `RELATIVE_POINTER` (a VM with `--device mouse`).
    fn grab(&mut self, scanout: u32) {
        let offered = link::lock(&self.current)
            .as_ref()
            .is_some_and(|h| h.info().capabilities.contains(Capabilities::RELATIVE_POINTER));
        if !offered {
            tracing::warn!("relative mode needs a server with a mouse (RELATIVE_POINTER): staying absolute");
            return;
        }
        let Some(window) = self.windows.get_mut(&scanout) else { return };
        let grabbed = window
            .window
            .set_cursor_grab(CursorGrabMode::Locked)
            .or_else(|_| window.window.set_cursor_grab(CursorGrabMode::Confined));
        if let Err(error) = grabbed {
            tracing::warn!(%error, "cannot grab the pointer: staying absolute");
            return;
        }
        window.window.set_cursor_visible(false);
        window.pointer = None;
        self.grabbed = Some(scanout);
        self.motion_rest = (0.0, 0.0);
        tracing::info!("relative mode: pointer grabbed (Ctrl+Alt releases)");
        self.refresh_titles();
    }

    fn ungrab(&mut self) {
        let Some(scanout) = self.grabbed.take() else { return };
        if let Some(window) = self.windows.get(&scanout) {
            let _ = window.window.set_cursor_grab(CursorGrabMode::None);
            window.window.set_cursor_visible(self.cursor.is_none());
        }
        tracing::info!("relative mode off: pointer released");
        self.refresh_titles();
    }

    fn send(&self, request: Request) {
        let _ = self.requests.send(request);
    }

    fn open_window(&mut self, event_loop: &ActiveEventLoop, scanout: u32, size: PhysicalSize<u32>) {
        if self.windows.contains_key(&scanout) || self.gpu_error.is_some() {
            return;
        }
        let attributes = Window::default_attributes().with_title(self.title(scanout)).with_inner_size(size);
        // The X11 class, so that the .desktop file's StartupWMClass matches.
        let attributes =
            winit::platform::x11::WindowAttributesExtX11::with_name(attributes, "pleiades", "pleiades");
        let window = match event_loop.create_window(attributes) {
            Ok(window) => Arc::new(window),
            Err(error) => {
                self.fail(event_loop, format!("cannot open a window: {error}"));
                return;
            }
        };
        if self.gpu.is_none() {
            let instance = wgpu::Instance::new(wgpu::InstanceDescriptor::new_with_display_handle_from_env(
                Box::new(self.display.clone()),
            ));
            let surface = match instance.create_surface(window.clone()) {
                Ok(surface) => surface,
                Err(error) => return self.fail(event_loop, format!("cannot draw into the window: {error}")),
            };
            match Gpu::new(instance, Some(&surface)) {
                Ok(gpu) => {
                    let _ = self.gpu_video.send(Some(gpu_converts_video(&gpu.adapter.get_info())));
                    self.gpu = Some(gpu);
                }
                Err(error) => return self.fail(event_loop, error.to_string()),
            }
            self.add_window(event_loop, scanout, window, surface);
            return;
        }
        let Some(gpu) = &self.gpu else { return };
        match gpu.instance.create_surface(window.clone()) {
            Ok(surface) => self.add_window(event_loop, scanout, window, surface),
            Err(error) => self.fail(event_loop, format!("cannot draw into the window: {error}")),
        }
    }

    fn add_window(
        &mut self,
        event_loop: &ActiveEventLoop,
        scanout: u32,
        window: Arc<Window>,
        surface: wgpu::Surface<'static>,
    ) {
        let Some(gpu) = &self.gpu else { return };
        let size = window.inner_size();
        let Some(mut config) =
            surface.get_default_config(&gpu.adapter, size.width.max(1), size.height.max(1))
        else {
            return self.fail(event_loop, "the GPU cannot present to this window".into());
        };
        let caps = surface.get_capabilities(&gpu.adapter);
        // Plain (not sRGB) 8-bit: the guest's bytes go to the screen unchanged.
        if let Some(format) = caps
            .formats
            .iter()
            .find(|f| matches!(f, wgpu::TextureFormat::Bgra8Unorm | wgpu::TextureFormat::Rgba8Unorm))
        {
            config.format = *format;
        }
        // Only sRGB formats (some compositors): draw through a plain view of the same texture.
        let view_format = config.format.remove_srgb_suffix();
        if view_format != config.format {
            config.view_formats = vec![view_format];
        }
        // Paced by the display: at most one frame queued, never torn.
        config.present_mode = wgpu::PresentMode::Fifo;
        config.desired_maximum_frame_latency = 1;
        if caps.alpha_modes.contains(&wgpu::CompositeAlphaMode::Opaque) {
            config.alpha_mode = wgpu::CompositeAlphaMode::Opaque;
        }
        surface.configure(&gpu.device, &config);
        let frame = Frame::new(gpu);
        self.ids.insert(window.id(), scanout);
        window.request_redraw();
        self.windows.insert(
            scanout,
            DesktopWindow {
                window,
                surface,
                config,
                view_format,
                content: None,
                frame,
                pointer: None,
                text: None,
                follow_guest: true,
            },
        );
    }

    fn fail(&mut self, event_loop: &ActiveEventLoop, error: String) {
        tracing::error!(%error, "the window cannot be shown");
        self.gpu_error = Some(error);
        event_loop.exit();
    }

    /// Windows follow the guest's monitors: one each, created and closed with them.
    fn apply_layout(&mut self, event_loop: &ActiveEventLoop, monitors: Vec<Monitor>) {
        self.layout = monitors;
        let wanted: BTreeSet<u32> = self.layout.iter().map(|m| m.id).collect();
        // A window opened before the layout was known becomes the first monitor's.
        if let (Some(first), Some((&shown, _))) = (self.layout.first(), self.windows.iter().next())
            && !wanted.contains(&shown)
            && !self.windows.contains_key(&first.id)
            && let Some(window) = self.windows.remove(&shown)
        {
            self.ids.insert(window.window.id(), first.id);
            self.windows.insert(first.id, window);
        }
        let gone: Vec<u32> = self.windows.keys().copied().filter(|id| !wanted.contains(id)).collect();
        for id in gone {
            if let Some(window) = self.windows.remove(&id) {
                self.ids.remove(&window.window.id());
            }
        }
        for monitor in self.layout.clone() {
            let size = PhysicalSize::new(monitor.width, monitor.height);
            match self.windows.get(&monitor.id) {
                None => self.open_window(event_loop, monitor.id, size),
                Some(window) if window.follow_guest && window.window.inner_size() != size => {
                    let _ = window.window.request_inner_size(size);
                }
                Some(_) => {}
            }
        }
        self.refresh_titles();
    }

    fn refresh_titles(&self) {
        for (&scanout, window) in &self.windows {
            window.window.set_title(&self.title(scanout));
            window.window.request_redraw();
        }
    }

    fn monitor_size(&self, scanout: u32) -> Option<PhysicalSize<u32>> {
        self.layout.iter().find(|m| m.id == scanout).map(|m| PhysicalSize::new(m.width, m.height))
    }

    /// The guest pixel under a window position, if the desktop is shown there.
    fn guest_position(&self, scanout: u32, position: PhysicalPosition<f64>) -> Option<(u32, u32)> {
        let window = self.windows.get(&scanout)?;
        let content = window.content.as_ref()?;
        let size = (window.config.width, window.config.height);
        let placement = render::fit((content.width, content.height), size);
        let fx = (position.x - f64::from(placement.x)) / f64::from(placement.width.max(1.0));
        let fy = (position.y - f64::from(placement.y)) / f64::from(placement.height.max(1.0));
        if !(0.0..1.0).contains(&fx) || !(0.0..1.0).contains(&fy) {
            return None;
        }
        Some(((fx * f64::from(content.width)) as u32, (fy * f64::from(content.height)) as u32))
    }

    fn on_key(&mut self, event_loop: &ActiveEventLoop, scanout: u32, key: PhysicalKey, state: ElementState) {
        let down = state == ElementState::Pressed;
        let hotkeys = self.modifiers.control_key() && self.modifiers.alt_key();
        if hotkeys && down {
            match key {
                // Ctrl+Alt+Enter: fullscreen on and off.
                PhysicalKey::Code(KeyCode::Enter) => {
                    if let Some(window) = self.windows.get(&scanout) {
                        let fullscreen = window.window.fullscreen().is_none();
                        window.window.set_fullscreen(fullscreen.then_some(Fullscreen::Borderless(None)));
                    }
                    return;
                }
                // Ctrl+Alt+G: relative mode (pointer grab); Ctrl+Alt alone releases it.
                PhysicalKey::Code(KeyCode::KeyG) => {
                    if self.grabbed.is_none() {
                        self.grab(scanout);
                    }
                    return;
                }
                // Ctrl+Alt+S: the statistics overlay.
                PhysicalKey::Code(KeyCode::KeyS) => {
                    self.overlay = !self.overlay;
                    self.refresh_titles();
                    return;
                }
                // Ctrl+Alt+U: the USB menu.
                PhysicalKey::Code(KeyCode::KeyU) => {
                    self.usb_lines = match self.usb_lines {
                        Some(_) => None,
                        None => Some(self.usb_menu.refresh()),
                    };
                    self.usb_note = None;
                    self.refresh_titles();
                    return;
                }
                _ => {}
            }
        }
        // The USB menu takes the keys while it is open: digits choose, Escape closes.
        if self.usb_lines.is_some() {
            if down {
                self.on_usb_menu_key(key);
            }
            return;
        }
        let _ = event_loop;
        let Some(code) = keys::evdev_code(key) else {
            tracing::debug!(?key, "a key without an evdev code");
            return;
        };
        if down {
            self.pressed.insert(code);
        } else if !self.pressed.remove(&code) {
            return;
        }
        self.send(Request::Key(code, down));
    }

    fn on_usb_menu_key(&mut self, key: PhysicalKey) {
        let digit = match key {
            PhysicalKey::Code(KeyCode::Escape) => {
                self.usb_lines = None;
                self.refresh_titles();
                return;
            }
            PhysicalKey::Code(code) => keys::digit(code),
            PhysicalKey::Unidentified(_) => None,
        };
        let Some(number) = digit.filter(|&d| d > 0) else { return };
        let note = self.usb_menu.choose(usize::from(number));
        tracing::info!(number, "USB menu: {note}");
        self.usb_note = Some(note);
        self.usb_lines = Some(self.usb_menu.refresh());
        self.refresh_titles();
    }

    fn release_everything(&mut self) {
        self.ungrab();
        if !self.pressed.is_empty() || self.buttons != 0 {
            tracing::debug!(keys = self.pressed.len(), "focus lost: releasing everything");
        }
        self.pressed.clear();
        self.buttons = 0;
        self.send(Request::ReleaseAll);
    }

    fn status_lines(&self) -> Vec<String> {
        if let Some(lines) = &self.usb_lines {
            let mut lines = lines.clone();
            lines.extend(self.usb_note.iter().map(|note| format!("-> {note}")));
            return lines;
        }
        match &self.state {
            LinkState::Connected if self.overlay => {
                let (rtt, kbit) = self.stats.unwrap_or((0.0, 0.0));
                let codec = match self.codec {
                    Some(Codec::Tiles) => "tiles",
                    Some(Codec::H264) => "h264",
                    Some(Codec::Mixed) => "tiles+h264",
                    Some(Codec::Empty) | None => "-",
                };
                vec![format!("rtt {rtt:.1} ms  {kbit:.0} kbit/s  {codec}"), "Ctrl+Alt+S hides this".into()]
            }
            LinkState::Connected => Vec::new(),
            LinkState::Connecting => vec![format!("Connecting to {}...", self.desktop)],
            LinkState::Reconnecting { why, .. } => {
                vec![format!("{}...", capitalized(&self.state.label())), why.clone()]
            }
            LinkState::Disconnected(why) => {
                vec!["Disconnected".into(), why.clone(), "Close the window to quit.".into()]
            }
        }
    }

    fn redraw(&mut self, scanout: u32) {
        let handle = link::lock(&self.current).clone();
        let lines = self.status_lines();
        let connected = self.state == LinkState::Connected;
        // A menu is read and acted on: larger than the statistics' small print.
        let menu = self.usb_lines.is_some();
        let Some(gpu) = self.gpu.as_mut() else { return };
        // The guest's cursor, drawn by the client where the pointer is.
        let cursor_state = handle.as_ref().map(|h| h.cursor());
        if let Some(shape) = cursor_state.as_ref().and_then(|c| c.shape.as_ref())
            && self.cursor.as_ref().is_none_or(|(serial, ..)| *serial != shape.serial)
        {
            let layer = gpu.layer(u32::from(shape.width), u32::from(shape.height), &shape.bgra);
            self.cursor = Some((shape.serial, layer, shape.hot_x, shape.hot_y));
            // The guest's cursor is drawn instead of the local one, in every window.
            for other in self.windows.values() {
                other.window.set_cursor_visible(false);
            }
        }
        let Some(window) = self.windows.get_mut(&scanout) else { return };
        if let Some(handle) = &handle {
            handle.with_displays(|displays| {
                displays.drain_for_gpu(scanout, |update| match &mut window.content {
                    Some(content) => content.apply(gpu, &update),
                    None => {
                        let mut content = ScanoutTexture::new(gpu, update.frame.width, update.frame.height);
                        content.apply(gpu, &update);
                        window.content = Some(content);
                    }
                })
            });
        }
        if window.text.as_ref().is_none_or(|(shown, _)| *shown != lines) {
            window.text = (!lines.is_empty()).then(|| {
                let scale = if menu || (lines.len() <= 2 && !connected) { 2 } else { 1 };
                let (w, h, pixels) = text::render(&lines, scale);
                (lines.clone(), gpu.layer(w, h, &pixels))
            });
        }
        let size = (window.config.width, window.config.height);
        let content = window.content.as_ref().map(|c| (c, render::fit((c.width, c.height), size)));
        let mut layers: Vec<(&Layer, Placement)> = Vec::new();
        if let (Some((_, layer, hot_x, hot_y)), Some(state)) = (&self.cursor, &cursor_state)
            && let Some((_, placement)) = &content
            && let Some(content_size) = window.content.as_ref().map(|c| (c.width, c.height))
        {
            let scale = placement.width / content_size.0.max(1) as f32;
            let at = match (window.pointer, state.position) {
                (Some(pointer), _) => Some((pointer.x as f32, pointer.y as f32)),
                (None, Some(p)) if p.scanout == scanout && p.visible => {
                    Some((placement.x + p.x as f32 * scale, placement.y + p.y as f32 * scale))
                }
                _ => None,
            };
            if let Some((x, y)) = at {
                let placed = Placement {
                    x: x - f32::from(*hot_x) * scale,
                    y: y - f32::from(*hot_y) * scale,
                    width: layer.width as f32 * scale,
                    height: layer.height as f32 * scale,
                };
                layers.push((layer, placed));
            }
        }
        if let Some((_, layer)) = &window.text {
            let (w, h) = (layer.width as f32, layer.height as f32);
            let placement = if connected {
                Placement { x: 8.0, y: 8.0, width: w, height: h }
            } else {
                let (tw, th) = (size.0 as f32, size.1 as f32);
                Placement { x: ((tw - w) / 2.0).floor(), y: ((th - h) / 2.0).floor(), width: w, height: h }
            };
            layers.push((layer, placement));
        }
        let texture = match window.surface.get_current_texture() {
            wgpu::CurrentSurfaceTexture::Success(texture)
            | wgpu::CurrentSurfaceTexture::Suboptimal(texture) => texture,
            wgpu::CurrentSurfaceTexture::Outdated | wgpu::CurrentSurfaceTexture::Lost => {
                window.surface.configure(&gpu.device, &window.config);
                window.window.request_redraw();
                return;
            }
            other => {
                tracing::debug!(?other, "no surface texture this time");
                return;
            }
        };
        let view = texture.texture.create_view(&wgpu::TextureViewDescriptor {
            format: Some(window.view_format),
            ..Default::default()
        });
        window.frame.draw(gpu, &view, window.view_format, size, content, &layers);
        window.window.pre_present_notify();
        gpu.queue.present(texture);
    }
}

/// Whether the GPU converts H.264 pictures: yes on a real GPU; on a software rasterizer
/// (lavapipe, llvmpipe) the CPU's conversion is cheaper than the shader's, so the CPU does it
/// unless `PLEIADES_GPU_YUV=1` insists (`=0` turns it off anywhere).
fn gpu_converts_video(adapter: &wgpu::AdapterInfo) -> bool {
    let on = match std::env::var("PLEIADES_GPU_YUV").as_deref() {
        Ok("1") => true,
        Ok("0") => false,
        _ => adapter.device_type != wgpu::DeviceType::Cpu,
    };
    tracing::info!(adapter = %adapter.name, gpu_yuv = on, "where H.264 pictures are converted");
    on
}

fn capitalized(text: &str) -> String {
    let mut chars = text.chars();
    chars.next().map(|c| c.to_uppercase().chain(chars).collect()).unwrap_or_default()
}

impl ApplicationHandler<LinkEvent> for App {
    fn resumed(&mut self, event_loop: &ActiveEventLoop) {
        if self.windows.is_empty() {
            let size = self.layout.first().map_or(FIRST_SIZE, |m| PhysicalSize::new(m.width, m.height));
            let id = self.layout.first().map_or(0, |m| m.id);
            self.open_window(event_loop, id, size);
        }
    }

    fn user_event(&mut self, event_loop: &ActiveEventLoop, event: LinkEvent) {
        match event {
            LinkEvent::State(state) => {
                tracing::info!(state = %state.label(), "link state");
                if state == LinkState::Connected {
                    // Nothing is pressed on a fresh session. The windows keep showing the last
                    // picture until the new session's first (whole) frame replaces it.
                    self.pressed.clear();
                    self.buttons = 0;
                }
                self.state = state;
                self.refresh_titles();
            }
            LinkEvent::Frame { scanout, codec } => {
                if codec != Codec::Empty {
                    self.codec = Some(codec);
                }
                if !self.windows.contains_key(&scanout) && self.layout.is_empty() {
                    self.open_window(event_loop, scanout, FIRST_SIZE);
                }
                if let Some(window) = self.windows.get(&scanout) {
                    window.window.request_redraw();
                }
            }
            LinkEvent::Layout(monitors) => self.apply_layout(event_loop, monitors),
            LinkEvent::CursorShape => {
                for window in self.windows.values() {
                    window.window.request_redraw();
                }
            }
            LinkEvent::Stats { rtt_ms, kbit_s } => {
                self.stats = Some((rtt_ms, kbit_s));
                // Once a second: the overlay's figures, a file's progress, the USB menu.
                if self.usb_lines.is_some() {
                    self.usb_lines = Some(self.usb_menu.refresh());
                }
                if self.overlay || self.usb_lines.is_some() || self.files.status_line().is_some() {
                    self.refresh_titles();
                }
            }
        }
    }

    fn window_event(&mut self, event_loop: &ActiveEventLoop, id: WindowId, event: WindowEvent) {
        let Some(&scanout) = self.ids.get(&id) else { return };
        match event {
            WindowEvent::CloseRequested => event_loop.exit(),
            WindowEvent::DroppedFile(path) => {
                // Its SHA-256 is read off the event loop; then it waits for its turn.
                let files = self.files.clone();
                let spawned = std::thread::Builder::new().name("file-drop".into()).spawn(move || {
                    match crate::files::OutgoingFile::prepare(&path) {
                        Ok(file) => {
                            tracing::info!(
                                name = file.name,
                                size = file.size,
                                "dropped: sending it to the desktop"
                            );
                            files.push(file);
                        }
                        Err(error) => tracing::warn!("not sending a dropped file: {error}"),
                    }
                });
                if let Err(error) = spawned {
                    tracing::warn!(%error, "cannot read the dropped file");
                }
            }
            WindowEvent::RedrawRequested => self.redraw(scanout),
            WindowEvent::Resized(size) => {
                let Some(gpu) = &self.gpu else { return };
                let guest = self.monitor_size(scanout);
                let Some(window) = self.windows.get_mut(&scanout) else { return };
                if size.width == 0 || size.height == 0 {
                    return;
                }
                window.config.width = size.width;
                window.config.height = size.height;
                window.surface.configure(&gpu.device, &window.config);
                window.window.request_redraw();
                // A size the person chose (not the guest's): the guest follows, once it settles.
                if guest.is_some_and(|guest| guest != size) {
                    window.follow_guest = false;
                    self.resize_due = Some(Instant::now() + RESIZE_DEBOUNCE);
                }
            }
            WindowEvent::ScaleFactorChanged { .. } => {
                // The inner size in physical pixels may change with it; `Resized` follows.
            }
            WindowEvent::Focused(false) => self.release_everything(),
            WindowEvent::ModifiersChanged(modifiers) => {
                let before = self.modifiers;
                self.modifiers = modifiers.state();
                // Ctrl+Alt, pressed while grabbed, releases the pointer.
                let both = |m: ModifiersState| m.control_key() && m.alt_key();
                if self.grabbed.is_some() && both(self.modifiers) && !both(before) {
                    self.ungrab();
                }
            }
            WindowEvent::KeyboardInput { event, is_synthetic, .. } => {
                // Synthetic presses are keys held while the window gained focus: not typed here.
                if (is_synthetic && event.state == ElementState::Pressed) || event.repeat {
                    return;
                }
                self.on_key(event_loop, scanout, event.physical_key, event.state);
            }
            WindowEvent::CursorMoved { position, .. } => {
                if self.grabbed.is_some() {
                    return;
                }
                if let Some(window) = self.windows.get_mut(&scanout) {
                    window.pointer = Some(position);
                    if self.cursor.is_some() {
                        window.window.request_redraw();
                    }
                }
                if let Some((x, y)) = self.guest_position(scanout, position) {
                    self.send(Request::Pointer { scanout, x, y });
                }
            }
            WindowEvent::CursorLeft { .. } => {
                if let Some(window) = self.windows.get_mut(&scanout) {
                    window.pointer = None;
                    window.window.request_redraw();
                }
            }
            WindowEvent::MouseInput { state, button, .. } => {
                let bit = match button {
                    MouseButton::Left => buttons::LEFT,
                    MouseButton::Right => buttons::RIGHT,
                    MouseButton::Middle => buttons::MIDDLE,
                    MouseButton::Back => buttons::SIDE,
                    MouseButton::Forward => buttons::EXTRA,
                    MouseButton::Other(_) => return,
                };
                let mask =
                    if state == ElementState::Pressed { self.buttons | bit } else { self.buttons & !bit };
                if mask != self.buttons {
                    self.buttons = mask;
                    self.send(Request::Buttons(mask));
                }
            }
            WindowEvent::MouseWheel { delta, .. } => {
                // winit: positive y scrolls up, positive x scrolls left; the protocol: dy > 0 up,
                // dx > 0 right, in 1/120 of a detent (a pixel delta of 40 counts as a detent).
                let (dx, dy) = match delta {
                    MouseScrollDelta::LineDelta(x, y) => (-(x * 120.0), y * 120.0),
                    MouseScrollDelta::PixelDelta(p) => (-(p.x as f32 * 3.0), p.y as f32 * 3.0),
                };
                let (dx, dy) = (dx.round() as i32, dy.round() as i32);
                if dx != 0 || dy != 0 {
                    self.send(Request::Wheel(dx, dy));
                }
            }
            _ => {}
        }
    }

    fn device_event(&mut self, _: &ActiveEventLoop, _: DeviceId, event: DeviceEvent) {
        // Raw motion, only while grabbed: the mouse's own counts, no host acceleration.
        if let (Some(_), DeviceEvent::MouseMotion { delta }) = (self.grabbed, event) {
            let (x, y) = (self.motion_rest.0 + delta.0, self.motion_rest.1 + delta.1);
            let (dx, dy) = (x.trunc(), y.trunc());
            self.motion_rest = (x - dx, y - dy);
            if dx != 0.0 || dy != 0.0 {
                self.send(Request::PointerRel(dx as i32, dy as i32));
            }
        }
    }

    fn about_to_wait(&mut self, event_loop: &ActiveEventLoop) {
        match self.resize_due {
            Some(due) if Instant::now() >= due => {
                self.resize_due = None;
                // Every monitor, in scanout order: the windows the person sized, the others as
                // the guest has them.
                let sizes: Vec<(u32, u32)> = self
                    .layout
                    .iter()
                    .map(|m| match self.windows.get(&m.id) {
                        Some(w) => (w.config.width, w.config.height),
                        None => (m.width, m.height),
                    })
                    .collect();
                if !sizes.is_empty() {
                    tracing::info!(?sizes, "asking the guest for the windows' sizes");
                    self.send(Request::Layout(sizes));
                }
                event_loop.set_control_flow(ControlFlow::Wait);
            }
            Some(due) => event_loop.set_control_flow(ControlFlow::WaitUntil(due)),
            None => event_loop.set_control_flow(ControlFlow::Wait),
        }
    }
}
