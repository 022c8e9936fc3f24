// Pleiades client shaders: textured quads (the desktop, the cursor, the status text) and the
// H.264 YUV → BGRX conversion.

// ---- textured quad ---------------------------------------------------------------------------

struct Quad {
    // Destination corners in clip space: left, top, right, bottom.
    dst: vec4<f32>,
};

@group(0) @binding(0) var<uniform> quad: Quad;
@group(0) @binding(1) var quad_texture: texture_2d<f32>;
@group(0) @binding(2) var quad_sampler: sampler;

struct QuadOut {
    @builtin(position) position: vec4<f32>,
    @location(0) uv: vec2<f32>,
};

// Four vertices as a triangle strip: (0,0) (1,0) (0,1) (1,1).
@vertex
fn quad_vs(@builtin(vertex_index) index: u32) -> QuadOut {
    let corner = vec2<f32>(f32(index & 1u), f32(index >> 1u));
    var out: QuadOut;
    out.position = vec4<f32>(mix(quad.dst.x, quad.dst.z, corner.x), mix(quad.dst.y, quad.dst.w, corner.y), 0.0, 1.0);
    out.uv = corner;
    return out;
}

// The desktop: BGRX, the X byte is not alpha.
@fragment
fn opaque_fs(input: QuadOut) -> @location(0) vec4<f32> {
    return vec4<f32>(textureSample(quad_texture, quad_sampler, input.uv).rgb, 1.0);
}

// Cursor and text: premultiplied alpha.
@fragment
fn blend_fs(input: QuadOut) -> @location(0) vec4<f32> {
    return textureSample(quad_texture, quad_sampler, input.uv);
}

// ---- YUV → BGRX --------------------------------------------------------------------------------

struct Region {
    // The region's top-left corner on the target, in pixels.
    origin: vec2<f32>,
    pad: vec2<f32>,
};

@group(0) @binding(0) var<uniform> region: Region;
@group(0) @binding(1) var plane_y: texture_2d<f32>;
@group(0) @binding(2) var plane_u: texture_2d<f32>;
@group(0) @binding(3) var plane_v: texture_2d<f32>;

// One triangle that covers the viewport (the region).
@vertex
fn yuv_vs(@builtin(vertex_index) index: u32) -> @builtin(position) vec4<f32> {
    let x = f32(i32(index & 1u) * 4 - 1);
    let y = f32(i32(index >> 1u) * 4 - 1);
    return vec4<f32>(x, y, 0.0, 1.0);
}

fn sample8(plane: texture_2d<f32>, at: vec2<i32>) -> i32 {
    return i32(round(textureLoad(plane, at, 0).r * 255.0));
}

// BT.601 limited range, the matrix of OpenH264's RGB → YUV on the host, in the same fixed point
// (10 fractional bits) as the CPU path in display.rs: both give the same bytes.
@fragment
fn yuv_fs(@builtin(position) position: vec4<f32>) -> @location(0) vec4<f32> {
    let at = vec2<i32>(floor(position.xy - region.origin));
    let luma = sample8(plane_y, at);
    let u = sample8(plane_u, at / 2) - 128;
    let v = sample8(plane_v, at / 2) - 128;
    let c = 1192 * (luma - 16) + 512;
    let r = clamp((c + 1634 * v) >> 10u, 0, 255);
    let g = clamp((c - 401 * u - 833 * v) >> 10u, 0, 255);
    let b = clamp((c + 2066 * u) >> 10u, 0, 255);
    return vec4<f32>(f32(r), f32(g), f32(b), 255.0) / 255.0;
}
