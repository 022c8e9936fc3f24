//! Scaled video: a `Video` picture smaller than its region (capability `SCALED_VIDEO`). A
//! server on a CPU budget encodes a busy region at [`scaled_size`] of its size (an H.264 frame
//! costs about its pixel count) and the client scales the decoded picture up to fill the region.
//!
//! Both directions use the same [`bilinear`] resampling of 8-bit planes with pixel centres
//! aligned (`src = (dst + ½) × src_size / dst_size − ½`, clamped at the edges): at ½ it is the
//! mean of each 2×2 block, so a downscale then an upscale of a flat area gives it back exactly.
//! Fixed point (8 fractional bits), no floating point per sample; an exact halving takes a
//! faster path with the same result (the rounded mean of each block).

/// The scales a server steps through, percent of each side. One step, to ½ (a quarter of the
/// pixels): measured on the session benchmark's 1920x1080 motion screen, ¾ cost more CPU than
/// full size (resampling 1.2 M pixels outweighed the encoder's saving), ½ a third of it.
pub const SCALE_STEPS: [u32; 2] = [100, 50];

/// The encoded size of a `width` x `height` region at `percent`: each side scaled and rounded
/// down to even (H.264's 4:2:0 chroma), at least 16 (one macroblock) and at most the region.
pub fn scaled_size(width: u32, height: u32, percent: u32) -> (u32, u32) {
    let side = |v: u32| {
        let scaled = u64::from(v) * u64::from(percent.min(100)) / 100;
        let even = u32::try_from(scaled).unwrap_or(v) & !1;
        even.max(16).min(v)
    };
    (side(width), side(height))
}

/// For each destination index along one axis: the first source index and the weight (0–256) of
/// the next one.
fn taps(src: u32, dst: u32) -> Vec<(usize, u32)> {
    let last = src.saturating_sub(1);
    (0..dst)
        .map(|d| {
            // Source position of the destination pixel's centre, in 1/256 of a pixel.
            let pos = ((2 * i64::from(d) + 1) * i64::from(src) * 256 / (2 * i64::from(dst)) - 128).max(0);
            let index = u32::try_from(pos >> 8).unwrap_or(last).min(last);
            let weight = if index >= last { 0 } else { (pos & 0xff) as u32 };
            (index as usize, weight)
        })
        .collect()
}

/// Resamples a `src_w` x `src_h` image of `channels` interleaved 8-bit samples per pixel (rows
/// `stride` bytes apart) to `dst_w` x `dst_h`, rows packed. `None` when a size is zero or the
/// source is shorter than its size and stride say.
pub fn bilinear(
    src: &[u8],
    (src_w, src_h): (u32, u32),
    stride: usize,
    channels: usize,
    (dst_w, dst_h): (u32, u32),
) -> Option<Vec<u8>> {
    if src_w == 0 || src_h == 0 || dst_w == 0 || dst_h == 0 || channels == 0 {
        return None;
    }
    let row_len = src_w as usize * channels;
    if stride < row_len || src.len() < stride * (src_h as usize - 1) + row_len {
        return None;
    }
    if (dst_w * 2, dst_h * 2) == (src_w, src_h) {
        return Some(match channels {
            1 => half::<1>(src, stride, (dst_w, dst_h)),
            3 => half::<3>(src, stride, (dst_w, dst_h)),
            4 => half::<4>(src, stride, (dst_w, dst_h)),
            _ => general(src, (src_w, src_h), stride, channels, (dst_w, dst_h)),
        });
    }
    Some(general(src, (src_w, src_h), stride, channels, (dst_w, dst_h)))
}

/// An exact halving: the rounded mean of each 2×2 block (what [`general`] computes at ½, since
/// every weight is then one half), `C` samples per pixel. The caller checked the sizes.
fn half<const C: usize>(src: &[u8], stride: usize, (dst_w, dst_h): (u32, u32)) -> Vec<u8> {
    let out_row = dst_w as usize * C;
    let mut out = vec![0u8; out_row * dst_h as usize];
    for (y, dst) in out.chunks_exact_mut(out_row).enumerate() {
        let top = &src[2 * y * stride..2 * y * stride + 2 * out_row];
        let bottom = &src[(2 * y + 1) * stride..(2 * y + 1) * stride + 2 * out_row];
        for ((d, t), b) in
            dst.chunks_exact_mut(C).zip(top.chunks_exact(2 * C)).zip(bottom.chunks_exact(2 * C))
        {
            for c in 0..C {
                let sum = u16::from(t[c]) + u16::from(t[C + c]) + u16::from(b[c]) + u16::from(b[C + c]);
                d[c] = ((sum + 2) >> 2) as u8;
            }
        }
    }
    out
}

/// Any sizes: two taps each way. The caller checked the sizes.
fn general(
    src: &[u8],
    (src_w, src_h): (u32, u32),
    stride: usize,
    channels: usize,
    (dst_w, dst_h): (u32, u32),
) -> Vec<u8> {
    let row_len = src_w as usize * channels;
    let (xs, ys) = (taps(src_w, dst_w), taps(src_h, dst_h));
    let out_row = dst_w as usize * channels;
    let mut out = vec![0u8; out_row * dst_h as usize];
    // One source row resampled horizontally (16-bit: 8 fractional bits), two at a time.
    let horizontal = |row: usize, into: &mut Vec<u32>| {
        into.clear();
        let line = &src[row * stride..row * stride + row_len];
        for &(x, w) in &xs {
            let next = if w == 0 { x } else { x + 1 };
            for c in 0..channels {
                let (a, b) = (u32::from(line[x * channels + c]), u32::from(line[next * channels + c]));
                into.push(a * (256 - w) + b * w);
            }
        }
    };
    let (mut top, mut bottom) = (Vec::with_capacity(out_row), Vec::with_capacity(out_row));
    let mut cached = (usize::MAX, usize::MAX);
    for (dst_y, &(y, w)) in ys.iter().enumerate() {
        let next = if w == 0 { y } else { y + 1 };
        if cached != (y, next) {
            if cached.1 == y {
                std::mem::swap(&mut top, &mut bottom);
            } else {
                horizontal(y, &mut top);
            }
            horizontal(next, &mut bottom);
            cached = (y, next);
        }
        let dst = &mut out[dst_y * out_row..(dst_y + 1) * out_row];
        for ((d, &a), &b) in dst.iter_mut().zip(&top).zip(&bottom) {
            // 16 fractional bits in all; round to nearest.
            *d = ((a * (256 - w) + b * w + (1 << 15)) >> 16) as u8;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn sizes_are_even_at_least_a_macroblock_and_never_larger() {
        assert_eq!(scaled_size(1280, 720, 50), (640, 360));
        assert_eq!(scaled_size(1366, 768, 50), (682, 384));
        assert_eq!(scaled_size(1280, 720, 75), (960, 540));
        assert_eq!(scaled_size(642, 362, 75), (480, 270));
        assert_eq!(scaled_size(40, 20, 50), (20, 16));
        assert_eq!(scaled_size(10, 12, 50), (10, 12), "a region under a macroblock stays whole");
        assert_eq!(scaled_size(1280, 720, 100), (1280, 720));
        assert_eq!(scaled_size(1280, 720, 250), (1280, 720));
    }

    #[test]
    fn half_is_the_mean_of_each_block_and_double_gives_a_flat_area_back() {
        // 4x2, one channel: blocks [10 20 / 30 40] and [0 0 / 0 255].
        let src = [10, 20, 0, 0, 30, 40, 0, 255];
        assert_eq!(bilinear(&src, (4, 2), 4, 1, (2, 1)).unwrap(), vec![25, 64]);
        let flat = vec![77u8; 8 * 6 * 4];
        let small = bilinear(&flat, (8, 6), 32, 4, (4, 3)).unwrap();
        assert!(small.iter().all(|&v| v == 77));
        let big = bilinear(&small, (4, 3), 16, 4, (8, 6)).unwrap();
        assert_eq!(big, flat);
    }

    #[test]
    fn an_upscale_interpolates_between_neighbours() {
        // 0 and 255 side by side, doubled: the outer pixels keep their values (clamped at the
        // edges), the inner two are a quarter and three quarters of the way.
        let up = bilinear(&[0, 255], (2, 1), 2, 1, (4, 1)).unwrap();
        assert_eq!(up, vec![0, 64, 191, 255]);
    }

    #[test]
    fn short_sources_and_zero_sizes_are_refused() {
        // Two rows of 2, rows 4 apart: 4 + 2 bytes at least.
        assert!(bilinear(&[0; 6], (2, 2), 4, 1, (1, 1)).is_some());
        assert_eq!(bilinear(&[0; 5], (2, 2), 4, 1, (1, 1)), None);
        assert_eq!(bilinear(&[0; 6], (2, 2), 1, 1, (1, 1)), None, "a stride shorter than a row");
        assert_eq!(bilinear(&[0; 6], (0, 2), 4, 1, (1, 1)), None);
        assert_eq!(bilinear(&[0; 6], (2, 2), 4, 1, (0, 1)), None);
    }

    proptest! {
        #[test]
        fn an_exact_halving_is_the_general_resampling(
            dst_w in 1u32..24, dst_h in 1u32..24, channels in 1usize..6, pad in 0usize..8, seed: u64,
        ) {
            let (src_w, src_h) = (2 * dst_w, 2 * dst_h);
            let stride = src_w as usize * channels + pad;
            let src: Vec<u8> = (0..stride * src_h as usize).map(|i| (seed.wrapping_mul(i as u64 + 7) >> 17) as u8).collect();
            let fast = bilinear(&src, (src_w, src_h), stride, channels, (dst_w, dst_h)).unwrap();
            prop_assert_eq!(fast, general(&src, (src_w, src_h), stride, channels, (dst_w, dst_h)));
        }

        #[test]
        fn any_sizes_give_the_destination_size_and_stay_within_the_source_range(
            src_w in 1u32..40, src_h in 1u32..40, dst_w in 1u32..80, dst_h in 1u32..80,
            channels in 1usize..5, pad in 0usize..8, seed: u64,
        ) {
            let stride = src_w as usize * channels + pad;
            let len = stride * src_h as usize;
            let src: Vec<u8> = (0..len).map(|i| (seed.wrapping_mul(i as u64 + 1) >> 13) as u8).collect();
            let out = bilinear(&src, (src_w, src_h), stride, channels, (dst_w, dst_h)).unwrap();
            prop_assert_eq!(out.len(), dst_w as usize * dst_h as usize * channels);
            for c in 0..channels {
                let values = (0..src_h as usize).flat_map(|y| {
                    let row = &src[y * stride..];
                    (0..src_w as usize).map(move |x| row[x * channels + c])
                });
                let (lo, hi) = values.fold((255u8, 0u8), |(lo, hi), v| (lo.min(v), hi.max(v)));
                prop_assert!(out.iter().skip(c).step_by(channels).all(|&v| (lo..=hi).contains(&v)));
            }
            prop_assert_eq!(bilinear(&src[..len - 1], (src_w, src_h), stride, channels, (dst_w, dst_h)).is_some(), pad > 0);
        }
    }
}
