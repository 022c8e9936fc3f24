//! wgpu rendering: one texture per scanout that tiles and converted H.264 pictures land in, and
//! a pass per presented frame that draws it, the cursor and the status text onto a target (a
//! window's surface, or an offscreen texture in the benchmark).
//!
//! - Lossless updates: only the damaged rectangles of the presented BGRX frame are written into
//!   the scanout's `Bgra8Unorm` texture (`Queue::write_texture`, no conversion).
//! - H.264: the decoded I420 planes go up as three `R8Unorm` textures; a render pass with the
//!   region as viewport converts them (shaders.wgsl, BT.601 limited range in the same fixed
//!   point as the CPU path, so both give the same bytes) straight into the scanout texture.
//! - Presenting: a textured quad, 1:1 (nearest) when the window holds the whole desktop, scaled
//!   (linear) to fit when it is smaller; then the cursor and the text, premultiplied alpha.

use pleiades_protocol::wire::Rect;

use crate::display::{GpuUpdate, YuvPicture};

/// The scanout textures' format: the framebuffer's BGRX bytes as they are.
pub const CONTENT_FORMAT: wgpu::TextureFormat = wgpu::TextureFormat::Bgra8Unorm;

/// Why the GPU could not be used.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("no GPU adapter (Vulkan or GL) is available: {0}")]
    NoAdapter(String),
    #[error("cannot open the GPU device: {0}")]
    Device(String),
    #[error("cannot create a window surface: {0}")]
    Surface(String),
}

/// Pipelines drawing into one target format.
#[derive(Debug)]
struct TargetPipelines {
    format: wgpu::TextureFormat,
    opaque: wgpu::RenderPipeline,
    blend: wgpu::RenderPipeline,
}

/// The device and everything shared by all windows.
#[derive(Debug)]
pub struct Gpu {
    pub instance: wgpu::Instance,
    pub adapter: wgpu::Adapter,
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    module: wgpu::ShaderModule,
    quad_layout: wgpu::BindGroupLayout,
    quad_pipeline_layout: wgpu::PipelineLayout,
    yuv_layout: wgpu::BindGroupLayout,
    yuv_pipeline: wgpu::RenderPipeline,
    targets: Vec<TargetPipelines>,
    nearest: wgpu::Sampler,
    linear: wgpu::Sampler,
}

fn texture_entry(binding: u32) -> wgpu::BindGroupLayoutEntry {
    wgpu::BindGroupLayoutEntry {
        binding,
        visibility: wgpu::ShaderStages::FRAGMENT,
        ty: wgpu::BindingType::Texture {
            sample_type: wgpu::TextureSampleType::Float { filterable: true },
            view_dimension: wgpu::TextureViewDimension::D2,
            multisampled: false,
        },
        count: None,
    }
}

fn uniform_entry(binding: u32) -> wgpu::BindGroupLayoutEntry {
    wgpu::BindGroupLayoutEntry {
        binding,
        visibility: wgpu::ShaderStages::VERTEX_FRAGMENT,
        ty: wgpu::BindingType::Buffer {
            ty: wgpu::BufferBindingType::Uniform,
            has_dynamic_offset: false,
            min_binding_size: None,
        },
        count: None,
    }
}

impl Gpu {
    /// Opens an adapter that can present to `surface` (or any, for offscreen use).
    pub fn new(instance: wgpu::Instance, surface: Option<&wgpu::Surface<'_>>) -> Result<Self, RenderError> {
        let adapter = pollster::block_on(instance.request_adapter(&wgpu::RequestAdapterOptions {
            compatible_surface: surface,
            ..Default::default()
        }))
        .map_err(|e| RenderError::NoAdapter(e.to_string()))?;
        let info = adapter.get_info();
        tracing::info!(adapter = %info.name, backend = ?info.backend, "GPU");
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("pleiades"),
            required_limits: wgpu::Limits::downlevel_defaults().using_resolution(adapter.limits()),
            ..Default::default()
        }))
        .map_err(|e| RenderError::Device(e.to_string()))?;
        let module = device.create_shader_module(wgpu::include_wgsl!("shaders.wgsl"));
        let quad_layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some("quad"),
            entries: &[
                uniform_entry(0),
                texture_entry(1),
                wgpu::BindGroupLayoutEntry {
                    binding: 2,
                    visibility: wgpu::ShaderStages::FRAGMENT,
                    ty: wgpu::BindingType::Sampler(wgpu::SamplerBindingType::Filtering),
                    count: None,
                },
            ],
        });
        let quad_pipeline_layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
            label: Some("quad"),
            bind_group_layouts: &[Some(&quad_layout)],
            immediate_size: 0,
        });
        let yuv_layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some("yuv"),
            entries: &[uniform_entry(0), texture_entry(1), texture_entry(2), texture_entry(3)],
        });
        let yuv_pipeline_layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
            label: Some("yuv"),
            bind_group_layouts: &[Some(&yuv_layout)],
            immediate_size: 0,
        });
        let yuv_pipeline = pipeline(
            &device,
            &module,
            &yuv_pipeline_layout,
            ("yuv_vs", "yuv_fs"),
            CONTENT_FORMAT,
            None,
            wgpu::PrimitiveTopology::TriangleList,
        );
        let sampler = |filter| {
            device.create_sampler(&wgpu::SamplerDescriptor {
                mag_filter: filter,
                min_filter: filter,
                ..Default::default()
            })
        };
        let (nearest, linear) = (sampler(wgpu::FilterMode::Nearest), sampler(wgpu::FilterMode::Linear));
        Ok(Self {
            instance,
            adapter,
            device,
            queue,
            module,
            quad_layout,
            quad_pipeline_layout,
            yuv_layout,
            yuv_pipeline,
            targets: Vec::new(),
            nearest,
            linear,
        })
    }

    /// An adapter without a window (benchmarks, tests), honouring `WGPU_BACKEND`.
    pub fn headless() -> Result<Self, RenderError> {
        let instance = wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
        Self::new(instance, None)
    }

    fn prepare_target(&mut self, format: wgpu::TextureFormat) {
        if self.targets.iter().any(|t| t.format == format) {
            return;
        }
        let make = |fs, blend| {
            pipeline(
                &self.device,
                &self.module,
                &self.quad_pipeline_layout,
                ("quad_vs", fs),
                format,
                blend,
                wgpu::PrimitiveTopology::TriangleStrip,
            )
        };
        let opaque = make("opaque_fs", None);
        let blend = make("blend_fs", Some(wgpu::BlendState::PREMULTIPLIED_ALPHA_BLENDING));
        self.targets.push(TargetPipelines { format, opaque, blend });
    }

    fn target(&self, format: wgpu::TextureFormat) -> Option<&TargetPipelines> {
        self.targets.iter().find(|t| t.format == format)
    }

    /// A texture holding premultiplied BGRA pixels (cursor, text).
    pub fn layer(&self, width: u32, height: u32, bgra: &[u8]) -> Layer {
        let texture = content_texture(&self.device, width.max(1), height.max(1), "layer");
        if bgra.len() as u64 == u64::from(width) * u64::from(height) * 4 && width > 0 && height > 0 {
            write_rect(&self.queue, &texture, bgra, width, &Rect { x: 0, y: 0, width, height });
        }
        Layer { view: texture.create_view(&Default::default()), width, height }
    }
}

fn pipeline(
    device: &wgpu::Device,
    module: &wgpu::ShaderModule,
    layout: &wgpu::PipelineLayout,
    (vs, fs): (&str, &str),
    format: wgpu::TextureFormat,
    blend: Option<wgpu::BlendState>,
    topology: wgpu::PrimitiveTopology,
) -> wgpu::RenderPipeline {
    device.create_render_pipeline(&wgpu::RenderPipelineDescriptor {
        label: Some(fs),
        layout: Some(layout),
        vertex: wgpu::VertexState {
            module,
            entry_point: Some(vs),
            compilation_options: Default::default(),
            buffers: &[],
        },
        primitive: wgpu::PrimitiveState { topology, ..Default::default() },
        depth_stencil: None,
        multisample: Default::default(),
        fragment: Some(wgpu::FragmentState {
            module,
            entry_point: Some(fs),
            compilation_options: Default::default(),
            targets: &[Some(wgpu::ColorTargetState { format, blend, write_mask: wgpu::ColorWrites::ALL })],
        }),
        multiview_mask: None,
        cache: None,
    })
}

fn content_texture(device: &wgpu::Device, width: u32, height: u32, label: &str) -> wgpu::Texture {
    device.create_texture(&wgpu::TextureDescriptor {
        label: Some(label),
        size: wgpu::Extent3d { width, height, depth_or_array_layers: 1 },
        mip_level_count: 1,
        sample_count: 1,
        dimension: wgpu::TextureDimension::D2,
        format: CONTENT_FORMAT,
        usage: wgpu::TextureUsages::TEXTURE_BINDING
            | wgpu::TextureUsages::COPY_DST
            | wgpu::TextureUsages::RENDER_ATTACHMENT
            | wgpu::TextureUsages::COPY_SRC,
        view_formats: &[],
    })
}

fn plane_texture(device: &wgpu::Device, width: u32, height: u32) -> wgpu::Texture {
    device.create_texture(&wgpu::TextureDescriptor {
        label: Some("plane"),
        size: wgpu::Extent3d { width, height, depth_or_array_layers: 1 },
        mip_level_count: 1,
        sample_count: 1,
        dimension: wgpu::TextureDimension::D2,
        format: wgpu::TextureFormat::R8Unorm,
        usage: wgpu::TextureUsages::TEXTURE_BINDING | wgpu::TextureUsages::COPY_DST,
        view_formats: &[],
    })
}

/// Writes `rect` of an image `stride_px` pixels wide (4 bytes each) into `texture`.
fn write_rect(queue: &wgpu::Queue, texture: &wgpu::Texture, pixels: &[u8], stride_px: u32, rect: &Rect) {
    let offset = (u64::from(rect.y) * u64::from(stride_px) + u64::from(rect.x)) * 4;
    queue.write_texture(
        wgpu::TexelCopyTextureInfo {
            texture,
            mip_level: 0,
            origin: wgpu::Origin3d { x: rect.x, y: rect.y, z: 0 },
            aspect: wgpu::TextureAspect::All,
        },
        pixels,
        wgpu::TexelCopyBufferLayout { offset, bytes_per_row: Some(stride_px * 4), rows_per_image: None },
        wgpu::Extent3d { width: rect.width, height: rect.height, depth_or_array_layers: 1 },
    );
}

fn write_plane(queue: &wgpu::Queue, texture: &wgpu::Texture, data: &[u8], width: u32, height: u32) {
    queue.write_texture(
        texture.as_image_copy(),
        data,
        wgpu::TexelCopyBufferLayout { offset: 0, bytes_per_row: Some(width), rows_per_image: None },
        wgpu::Extent3d { width, height, depth_or_array_layers: 1 },
    );
}

/// A texture drawn with premultiplied alpha (cursor, text).
#[derive(Debug)]
pub struct Layer {
    view: wgpu::TextureView,
    pub width: u32,
    pub height: u32,
}

/// The three plane textures of one region size, reused while the size stays.
#[derive(Debug)]
struct YuvTextures {
    size: (u32, u32),
    y: wgpu::Texture,
    u: wgpu::Texture,
    v: wgpu::Texture,
    region: wgpu::Buffer,
    bind_group: wgpu::BindGroup,
}

/// One scanout's picture on the GPU.
#[derive(Debug)]
pub struct ScanoutTexture {
    texture: wgpu::Texture,
    view: wgpu::TextureView,
    pub width: u32,
    pub height: u32,
    yuv: Option<YuvTextures>,
}

impl ScanoutTexture {
    pub fn new(gpu: &Gpu, width: u32, height: u32) -> Self {
        let texture = content_texture(&gpu.device, width.max(1), height.max(1), "scanout");
        let view = texture.create_view(&Default::default());
        Self { texture, view, width, height, yuv: None }
    }

    /// Uploads what changed (the caller holds the displays' lock for as long as this takes:
    /// `write_texture` copies into staging memory at once).
    pub fn apply(&mut self, gpu: &Gpu, update: &GpuUpdate<'_>) {
        let frame = update.frame;
        if (frame.width, frame.height) != (self.width, self.height) {
            *self = Self::new(gpu, frame.width, frame.height);
        }
        let whole = [Rect { x: 0, y: 0, width: frame.width, height: frame.height }];
        let rects = update.rects.as_deref().unwrap_or(&whole);
        for rect in rects {
            let inside = rect.width > 0
                && rect.height > 0
                && u64::from(rect.x) + u64::from(rect.width) <= u64::from(frame.width)
                && u64::from(rect.y) + u64::from(rect.height) <= u64::from(frame.height);
            if inside {
                write_rect(&gpu.queue, &self.texture, &frame.pixels, frame.width, rect);
            }
        }
        for picture in &update.videos {
            self.convert(gpu, picture);
        }
    }

    /// Uploads the planes and converts them into the picture's region.
    pub fn convert(&mut self, gpu: &Gpu, picture: &YuvPicture) {
        let rect = picture.rect;
        let fits = rect.width > 0
            && rect.height > 0
            && u64::from(rect.x) + u64::from(rect.width) <= u64::from(self.width)
            && u64::from(rect.y) + u64::from(rect.height) <= u64::from(self.height);
        if !fits {
            return;
        }
        let size = (rect.width, rect.height);
        if self.yuv.as_ref().is_none_or(|y| y.size != size) {
            self.yuv = Some(yuv_textures(gpu, size));
        }
        let Some(yuv) = &self.yuv else { return };
        let (cw, ch) = picture.chroma_size();
        write_plane(&gpu.queue, &yuv.y, &picture.y, rect.width, rect.height);
        write_plane(&gpu.queue, &yuv.u, &picture.u, cw, ch);
        write_plane(&gpu.queue, &yuv.v, &picture.v, cw, ch);
        let mut region = [0u8; 16];
        region[..4].copy_from_slice(&(rect.x as f32).to_le_bytes());
        region[4..8].copy_from_slice(&(rect.y as f32).to_le_bytes());
        gpu.queue.write_buffer(&yuv.region, 0, &region);
        let mut encoder = gpu.device.create_command_encoder(&Default::default());
        {
            let mut pass = encoder.begin_render_pass(&wgpu::RenderPassDescriptor {
                label: Some("yuv"),
                color_attachments: &[Some(wgpu::RenderPassColorAttachment {
                    view: &self.view,
                    depth_slice: None,
                    resolve_target: None,
                    ops: wgpu::Operations { load: wgpu::LoadOp::Load, store: wgpu::StoreOp::Store },
                })],
                ..Default::default()
            });
            pass.set_pipeline(&gpu.yuv_pipeline);
            pass.set_bind_group(0, &yuv.bind_group, &[]);
            pass.set_viewport(rect.x as f32, rect.y as f32, rect.width as f32, rect.height as f32, 0.0, 1.0);
            pass.draw(0..3, 0..1);
        }
        // One submit per picture: the region uniform of the next one is written after it.
        gpu.queue.submit([encoder.finish()]);
    }

    /// The texture (tests read it back).
    pub fn texture(&self) -> &wgpu::Texture {
        &self.texture
    }
}

fn yuv_textures(gpu: &Gpu, (width, height): (u32, u32)) -> YuvTextures {
    let (y, u, v) = (
        plane_texture(&gpu.device, width, height),
        plane_texture(&gpu.device, width.div_ceil(2), height.div_ceil(2)),
        plane_texture(&gpu.device, width.div_ceil(2), height.div_ceil(2)),
    );
    let region = gpu.device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("region"),
        size: 16,
        usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let views = [&y, &u, &v].map(|t| t.create_view(&Default::default()));
    let bind_group = gpu.device.create_bind_group(&wgpu::BindGroupDescriptor {
        label: Some("yuv"),
        layout: &gpu.yuv_layout,
        entries: &[
            wgpu::BindGroupEntry { binding: 0, resource: region.as_entire_binding() },
            wgpu::BindGroupEntry { binding: 1, resource: wgpu::BindingResource::TextureView(&views[0]) },
            wgpu::BindGroupEntry { binding: 2, resource: wgpu::BindingResource::TextureView(&views[1]) },
            wgpu::BindGroupEntry { binding: 3, resource: wgpu::BindingResource::TextureView(&views[2]) },
        ],
    });
    YuvTextures { size: (width, height), y, u, v, region, bind_group }
}

/// A rectangle on the target, in target pixels (may reach outside it).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Placement {
    pub x: f32,
    pub y: f32,
    pub width: f32,
    pub height: f32,
}

impl Placement {
    fn clip_space(&self, target: (u32, u32)) -> [u8; 16] {
        let (tw, th) = (target.0.max(1) as f32, target.1.max(1) as f32);
        let corners = [
            self.x / tw * 2.0 - 1.0,
            1.0 - self.y / th * 2.0,
            (self.x + self.width) / tw * 2.0 - 1.0,
            1.0 - (self.y + self.height) / th * 2.0,
        ];
        let mut bytes = [0u8; 16];
        for (chunk, value) in bytes.chunks_exact_mut(4).zip(corners) {
            chunk.copy_from_slice(&value.to_le_bytes());
        }
        bytes
    }
}

/// Where the desktop of `content` pixels goes in a `target`-pixel window: 1:1 at the top left
/// when it fits, else scaled down to fit with its aspect ratio kept.
pub fn fit(content: (u32, u32), target: (u32, u32)) -> Placement {
    let (cw, ch) = (content.0.max(1) as f32, content.1.max(1) as f32);
    let (tw, th) = (target.0 as f32, target.1 as f32);
    let scale = (tw / cw).min(th / ch).min(1.0);
    Placement { x: 0.0, y: 0.0, width: (cw * scale).floor(), height: (ch * scale).floor() }
}

/// Uniform buffers of one target's quads (the desktop, then up to `MAX_LAYERS` layers).
#[derive(Debug)]
pub struct Frame {
    buffers: Vec<wgpu::Buffer>,
}

const MAX_LAYERS: usize = 4;

impl Frame {
    pub fn new(gpu: &Gpu) -> Self {
        let buffers = (0..=MAX_LAYERS)
            .map(|_| {
                gpu.device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("quad"),
                    size: 16,
                    usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
                    mapped_at_creation: false,
                })
            })
            .collect();
        Self { buffers }
    }

    /// Draws the desktop and the layers onto `target` (cleared to black) and submits.
    pub fn draw(
        &self,
        gpu: &mut Gpu,
        target: &wgpu::TextureView,
        format: wgpu::TextureFormat,
        size: (u32, u32),
        content: Option<(&ScanoutTexture, Placement)>,
        layers: &[(&Layer, Placement)],
    ) {
        gpu.prepare_target(format);
        let gpu = &*gpu;
        let Some(pipelines) = gpu.target(format) else { return };
        let quad = |index: usize,
                    view: &wgpu::TextureView,
                    placement: &Placement,
                    sampler: &wgpu::Sampler| {
            let buffer = &self.buffers[index];
            gpu.queue.write_buffer(buffer, 0, &placement.clip_space(size));
            gpu.device.create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some("quad"),
                layout: &gpu.quad_layout,
                entries: &[
                    wgpu::BindGroupEntry { binding: 0, resource: buffer.as_entire_binding() },
                    wgpu::BindGroupEntry { binding: 1, resource: wgpu::BindingResource::TextureView(view) },
                    wgpu::BindGroupEntry { binding: 2, resource: wgpu::BindingResource::Sampler(sampler) },
                ],
            })
        };
        let content_group = content.map(|(texture, placement)| {
            let exact = placement.width as u32 == texture.width && placement.height as u32 == texture.height;
            quad(0, &texture.view, &placement, if exact { &gpu.nearest } else { &gpu.linear })
        });
        let layer_groups: Vec<wgpu::BindGroup> = layers
            .iter()
            .take(MAX_LAYERS)
            .enumerate()
            .map(|(i, (layer, placement))| quad(i + 1, &layer.view, placement, &gpu.nearest))
            .collect();
        let mut encoder = gpu.device.create_command_encoder(&Default::default());
        {
            let mut pass = encoder.begin_render_pass(&wgpu::RenderPassDescriptor {
                label: Some("present"),
                color_attachments: &[Some(wgpu::RenderPassColorAttachment {
                    view: target,
                    depth_slice: None,
                    resolve_target: None,
                    ops: wgpu::Operations {
                        load: wgpu::LoadOp::Clear(wgpu::Color::BLACK),
                        store: wgpu::StoreOp::Store,
                    },
                })],
                ..Default::default()
            });
            if let Some(group) = &content_group {
                pass.set_pipeline(&pipelines.opaque);
                pass.set_bind_group(0, group, &[]);
                pass.draw(0..4, 0..1);
            }
            pass.set_pipeline(&pipelines.blend);
            for group in &layer_groups {
                pass.set_bind_group(0, group, &[]);
                pass.draw(0..4, 0..1);
            }
        }
        gpu.queue.submit([encoder.finish()]);
    }
}

/// Reads a `Bgra8Unorm` texture back (tests, benchmarks): rows packed, 4 bytes a pixel.
pub fn read_back(gpu: &Gpu, texture: &wgpu::Texture) -> Vec<u8> {
    let (width, height) = (texture.width(), texture.height());
    let padded =
        (width * 4).div_ceil(wgpu::COPY_BYTES_PER_ROW_ALIGNMENT) * wgpu::COPY_BYTES_PER_ROW_ALIGNMENT;
    let buffer = gpu.device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("read back"),
        size: u64::from(padded) * u64::from(height),
        usage: wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::MAP_READ,
        mapped_at_creation: false,
    });
    let mut encoder = gpu.device.create_command_encoder(&Default::default());
    encoder.copy_texture_to_buffer(
        texture.as_image_copy(),
        wgpu::TexelCopyBufferInfo {
            buffer: &buffer,
            layout: wgpu::TexelCopyBufferLayout {
                offset: 0,
                bytes_per_row: Some(padded),
                rows_per_image: None,
            },
        },
        wgpu::Extent3d { width, height, depth_or_array_layers: 1 },
    );
    gpu.queue.submit([encoder.finish()]);
    let slice = buffer.slice(..);
    slice.map_async(wgpu::MapMode::Read, |_| {});
    let _ = gpu.device.poll(wgpu::PollType::Wait { submission_index: None, timeout: None });
    let mut out = Vec::with_capacity((width * height * 4) as usize);
    if let Ok(mapped) = slice.get_mapped_range() {
        for row in mapped.chunks_exact(padded as usize) {
            out.extend_from_slice(&row[..(width * 4) as usize]);
        }
    }
    out
}

/// Blocks until the GPU finished everything submitted (benchmarks).
pub fn wait_idle(gpu: &Gpu) {
    let _ = gpu.device.poll(wgpu::PollType::Wait { submission_index: None, timeout: None });
}

/// An offscreen target for tests and benchmarks.
pub fn offscreen_target(gpu: &Gpu, width: u32, height: u32) -> wgpu::Texture {
    content_texture(&gpu.device, width, height, "offscreen")
}
