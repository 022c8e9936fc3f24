//! Scroll detection: whether the new picture of a damaged area is what the client already holds,
//! moved up or down (or sideways). A terminal or an editor scrolling a page of text changes every tile of it;
//! sent as tiles that is the whole area again (and the motion detector would call it video);
//! sent as "copy these rows `dy` up" plus the newly exposed strip it is a few hundred bytes, and
//! the text stays lossless (SPICE's COPY_BITS, RDP's ScrBlt, VNC's CopyRect).
//!
//! The search, per damaged area at least [`MIN_ROWS`] tall: each row of the area (its columns
//! only) is hashed in the picture the client holds and in the new one; rows of the new picture
//! vote for the shifts that would bring a row with the same hash there (rows of one colour, a
//! text's blank lines, vote for nothing: they match everywhere). The shift with most votes is
//! checked byte for byte, and the longest run of rows that it explains becomes the copy. Cost:
//! two hashes of the area's bytes and one comparison of the run, no search over shifts.
//!
//! A horizontal move (a wide spreadsheet or a log scrolled sideways) is found the same way with
//! the area's columns in place of its rows, when no vertical move explains the area.

use std::collections::HashMap;

use pleiades_virtio::gpu::Framebuffer;
use pleiades_virtio::gpu::protocol::Rect;

/// The shortest area, and the shortest run of moved rows (columns), worth a copy.
pub const MIN_ROWS: u32 = 32;
/// The narrowest area worth a copy (the other way).
const MIN_WIDTH: u32 = 64;
/// Rows of the held picture remembered per hash (repeated rows vote no further).
const SAME_ROWS: usize = 4;

/// A move: the client copies `src` to (`dst_x`, `dst_y`); one of the two is `src`'s own (a
/// vertical or a horizontal move).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Move {
    pub src: Rect,
    pub dst_x: u32,
    pub dst_y: u32,
}

impl Move {
    pub fn dst(&self) -> Rect {
        Rect { x: self.dst_x, y: self.dst_y, ..self.src }
    }

    /// The strip the move uncovers: next to the destination, on the side the content left
    /// (below it for a scroll up, right of it for a scroll left). `None` when the source lies
    /// inside the destination.
    pub fn exposed(&self) -> Option<Rect> {
        let (src, dst) = (self.src, self.dst());
        if src.y > dst.y {
            Some(Rect { y: dst.y + dst.height, height: src.y - dst.y, ..dst })
        } else if src.y < dst.y {
            Some(Rect { y: src.y, height: dst.y - src.y, ..dst })
        } else if src.x > dst.x {
            Some(Rect { x: dst.x + dst.width, width: src.x - dst.x, ..dst })
        } else if src.x < dst.x {
            Some(Rect { x: src.x, width: dst.x - src.x, ..dst })
        } else {
            None
        }
    }

    /// The move, if it lies within `area` (it always does when found there).
    pub fn within(self, area: &Rect) -> Option<Move> {
        (self.src.intersect(area) == self.src && self.dst().intersect(area) == self.dst()).then_some(self)
    }

    /// The same move with x and y swapped (a horizontal move found on transposed pictures).
    fn transposed(self) -> Move {
        let src = Rect { x: self.src.y, y: self.src.x, width: self.src.height, height: self.src.width };
        Move { src, dst_x: self.dst_y, dst_y: self.dst_x }
    }
}

/// One row of `frame`'s `area` columns, as bytes.
fn row<'a>(frame: &'a Framebuffer, area: &Rect, y: u32) -> &'a [u8] {
    let stride = frame.stride();
    let start = y as usize * stride + area.x as usize * 4;
    &frame.pixels[start..start + area.width as usize * 4]
}

/// A fast hash of a row (FNV-1a over 8-byte words; collisions are caught by the byte check).
fn hash(bytes: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    let mut words = bytes.chunks_exact(8);
    for word in &mut words {
        h = (h ^ u64::from_le_bytes(word.try_into().expect("8 bytes"))).wrapping_mul(0x0100_0000_01b3);
    }
    for &b in words.remainder() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Whether every pixel of a row is the same.
fn uniform(bytes: &[u8]) -> bool {
    bytes.chunks_exact(4).all(|p| p == &bytes[..4])
}

/// `area` of `frame`, transposed: its columns become rows (a picture of `area.height` x
/// `area.width`).
fn transpose(frame: &Framebuffer, area: &Rect) -> Framebuffer {
    let mut out = Framebuffer::new(area.height, area.width);
    let (stride, out_stride) = (frame.stride(), out.stride());
    for y in 0..area.height as usize {
        let start = (area.y as usize + y) * stride + area.x as usize * 4;
        let row = &frame.pixels[start..start + area.width as usize * 4];
        for (x, pixel) in row.chunks_exact(4).enumerate() {
            out.pixels[x * out_stride + y * 4..x * out_stride + y * 4 + 4].copy_from_slice(pixel);
        }
    }
    out
}

/// The move that turns `held` into `frame` over most of `area`, if there is one: a vertical
/// one, else a horizontal one.
pub fn detect(held: &Framebuffer, frame: &Framebuffer, area: Rect) -> Option<Move> {
    if (held.width, held.height) != (frame.width, frame.height)
        || u64::from(area.x) + u64::from(area.width) > u64::from(frame.width)
        || u64::from(area.y) + u64::from(area.height) > u64::from(frame.height)
    {
        return None;
    }
    if let Some(m) = detect_vertical(held, frame, area) {
        return Some(m);
    }
    if area.width < MIN_ROWS || area.height < MIN_WIDTH {
        return None;
    }
    // Columns as rows: a horizontal move is a vertical one of the transposed area.
    let (held_t, frame_t) = (transpose(held, &area), transpose(frame, &area));
    let whole = Rect::new(0, 0, area.height, area.width);
    let m = detect_vertical(&held_t, &frame_t, whole)?.transposed();
    let shift = |r: Rect| Rect { x: r.x + area.x, y: r.y + area.y, ..r };
    Some(Move { src: shift(m.src), dst_x: m.dst_x + area.x, dst_y: m.dst_y + area.y })
}

fn detect_vertical(held: &Framebuffer, frame: &Framebuffer, area: Rect) -> Option<Move> {
    if area.height < MIN_ROWS || area.width < MIN_WIDTH {
        return None;
    }
    let rows = area.y..area.y + area.height;
    let mut held_rows: HashMap<u64, Vec<u32>> = HashMap::new();
    for y in rows.clone() {
        let bytes = row(held, &area, y);
        if uniform(bytes) {
            continue;
        }
        let ys = held_rows.entry(hash(bytes)).or_default();
        if ys.len() < SAME_ROWS {
            ys.push(y);
        }
    }
    // Each changed, non-uniform row of the new picture votes for where it came from.
    let mut votes: HashMap<i64, u32> = HashMap::new();
    for y in rows.clone() {
        let bytes = row(frame, &area, y);
        if uniform(bytes) || bytes == row(held, &area, y) {
            continue;
        }
        for &from in held_rows.get(&hash(bytes)).into_iter().flatten() {
            *votes.entry(i64::from(from) - i64::from(y)).or_default() += 1;
        }
    }
    let (shift, count) = votes
        .into_iter()
        .filter(|&(shift, _)| shift != 0)
        .max_by_key(|&(shift, count)| (count, -shift.abs()))?;
    if count < MIN_ROWS / 4 {
        return None;
    }
    // The longest run of rows that the shift explains exactly.
    let explained = |y: u32| {
        let from = i64::from(y) + shift;
        (i64::from(area.y)..i64::from(area.y + area.height)).contains(&from)
            && row(frame, &area, y) == row(held, &area, from as u32)
    };
    let (mut best, mut run_start) = ((0u32, 0u32), None);
    for y in rows.clone().chain(std::iter::once(rows.end)) {
        match (y < rows.end && explained(y), run_start) {
            (true, None) => run_start = Some(y),
            (false, Some(start)) => {
                if y - start > best.1 {
                    best = (start, y - start);
                }
                run_start = None;
            }
            _ => {}
        }
    }
    let (dst_y, height) = best;
    if height < MIN_ROWS {
        return None;
    }
    let src_y = (i64::from(dst_y) + shift) as u32;
    Some(Move { src: Rect { x: area.x, y: src_y, width: area.width, height }, dst_x: area.x, dst_y })
}

/// Applies a move to a picture (what the client does with the copy): rows in the order that
/// reads each before it is overwritten; within a row, `copy_within` is a memmove.
pub fn apply(frame: &mut Framebuffer, m: &Move) {
    let stride = frame.stride();
    let (src, dst) = (m.src, m.dst());
    let rows: Box<dyn Iterator<Item = u32>> =
        if dst.y > src.y { Box::new((0..src.height).rev()) } else { Box::new(0..src.height) };
    let width = src.width as usize * 4;
    for r in rows {
        let from = (src.y + r) as usize * stride + src.x as usize * 4;
        let to = (dst.y + r) as usize * stride + dst.x as usize * 4;
        frame.pixels.copy_within(from..from + width, to);
    }
}

/// A page of "text" for tests: lines of 16 rows, each different, blank rows between, from line
/// `first_line`.
#[cfg(test)]
pub(crate) fn text_page(width: u32, height: u32, first_line: u32) -> Framebuffer {
    let mut frame = Framebuffer::new(width, height);
    let stride = frame.stride();
    for y in 0..height {
        let line = first_line + y / 16;
        if y % 16 >= 12 {
            continue;
        }
        for x in 8..width.saturating_sub(8) {
            if (x.wrapping_mul(7) ^ line.wrapping_mul(13) ^ (y % 16)).is_multiple_of(5) {
                let at = y as usize * stride + x as usize * 4;
                frame.pixels[at..at + 4].copy_from_slice(&[0xd0, 0xd0, 0xd0, 0]);
            }
        }
    }
    frame
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(width: u32, height: u32, first_line: u32) -> Framebuffer {
        text_page(width, height, first_line)
    }

    /// `page` scrolled up by `rows` pixel rows (new lines come in at the bottom).
    fn scrolled(width: u32, height: u32, rows: u32) -> Framebuffer {
        let tall = page(width, height + rows, 0);
        let mut frame = Framebuffer::new(width, height);
        let stride = frame.stride();
        frame.pixels.copy_from_slice(&tall.pixels[rows as usize * stride..(rows + height) as usize * stride]);
        frame
    }

    #[test]
    fn a_scroll_up_is_found_and_the_copy_plus_the_exposed_strip_rebuild_the_picture() {
        let (w, h) = (320, 240);
        let held = page(w, h, 0);
        for rows in [1, 16, 48, 100] {
            let frame = scrolled(w, h, rows);
            let m = detect(&held, &frame, Rect::new(0, 0, w, h)).unwrap_or_else(|| panic!("{rows} rows"));
            assert_eq!((m.src.y, m.dst_y, m.src.height), (rows, 0, h - rows), "{rows} rows: {m:?}");
            let mut client = held.clone();
            apply(&mut client, &m);
            // Only the exposed strip at the bottom still differs.
            let stride = client.stride();
            assert_eq!(
                client.pixels[..(h - rows) as usize * stride],
                frame.pixels[..(h - rows) as usize * stride]
            );
        }
    }

    #[test]
    fn a_scroll_down_too_and_within_a_part_of_the_screen() {
        let (w, h) = (320, 240);
        let held = scrolled(w, h, 40);
        let frame = page(w, h, 0);
        // Content moved down 40 rows: rows 40.. of the new picture are rows 0.. of the held one.
        let m = detect(&held, &frame, Rect::new(0, 0, w, h)).unwrap();
        assert_eq!((m.src.y, m.dst_y, m.src.height), (0, 40, h - 40));
        // Only a band of columns scrolled (a pane, 20 rows down here): found within the
        // damaged band.
        let mut frame = held.clone();
        let band = Rect::new(64, 0, 128, h);
        let inner = scrolled(w, h, 20);
        let stride = frame.stride();
        for y in 0..h as usize {
            let at = y * stride + 64 * 4;
            frame.pixels[at..at + 128 * 4].copy_from_slice(&inner.pixels[at..at + 128 * 4]);
        }
        let m = detect(&held, &frame, band).unwrap();
        assert_eq!((m.src.x, m.src.width, m.src.y, m.dst_y, m.src.height), (64, 128, 0, 20, h - 20));
    }

    /// A wide page's view `width` wide from column `columns` (scrolled left by `columns`: new
    /// columns come in at the right).
    fn scrolled_left(width: u32, height: u32, columns: u32) -> Framebuffer {
        let wide = page(width + 64, height, 0);
        let mut frame = Framebuffer::new(width, height);
        let (stride, wide_stride) = (frame.stride(), wide.stride());
        for y in 0..height as usize {
            let from = y * wide_stride + columns as usize * 4;
            frame.pixels[y * stride..(y + 1) * stride].copy_from_slice(&wide.pixels[from..from + stride]);
        }
        frame
    }

    #[test]
    fn a_horizontal_scroll_both_ways_and_within_a_band() {
        let (w, h) = (320, 240);
        let held = scrolled_left(w, h, 0);
        for columns in [1, 8, 40] {
            let frame = scrolled_left(w, h, columns);
            let m =
                detect(&held, &frame, Rect::new(0, 0, w, h)).unwrap_or_else(|| panic!("{columns} columns"));
            assert_eq!(
                (m.src.x, m.dst_x, m.src.width, m.src.y, m.dst_y, m.src.height),
                (columns, 0, w - columns, 0, 0, h)
            );
            assert_eq!(m.exposed(), Some(Rect::new(w - columns, 0, columns, h)));
            let mut client = held.clone();
            apply(&mut client, &m);
            let exposed = m.exposed().unwrap();
            for y in 0..h {
                let keep = (w - columns) as usize * 4;
                let at = y as usize * client.stride();
                assert_eq!(client.pixels[at..at + keep], frame.pixels[at..at + keep], "row {y}");
            }
            // What the exposed strip sends completes the picture.
            for y in 0..h as usize {
                let at = y * client.stride() + exposed.x as usize * 4;
                let n = exposed.width as usize * 4;
                client.pixels[at..at + n].copy_from_slice(&frame.pixels[at..at + n]);
            }
            assert_eq!(client, frame);
        }
        // Scrolled right: the content moved 24 columns to the right.
        let m = detect(&scrolled_left(w, h, 24), &held, Rect::new(0, 0, w, h)).unwrap();
        assert_eq!((m.src.x, m.dst_x, m.src.width), (0, 24, w - 24));
        // Within a band of rows (a pane) away from the origin.
        let mut frame = held.clone();
        let band = Rect::new(0, 64, w, 96);
        let inner = scrolled_left(w, h, 16);
        let stride = frame.stride();
        frame.pixels[64 * stride..160 * stride].copy_from_slice(&inner.pixels[64 * stride..160 * stride]);
        let m = detect(&held, &frame, band).unwrap();
        assert_eq!((m.src, m.dst_x, m.dst_y), (Rect::new(16, 64, w - 16, 96), 0, 64));
    }

    proptest::proptest! {
        /// Any two pictures related by any shift (or not at all), any area: a move found lies
        /// within the area and makes its destination exactly what the new picture shows there.
        #[test]
        fn a_move_found_is_always_exact(
            seed in proptest::prelude::any::<u32>(),
            (dx, dy) in (-40i32..40, -40i32..40),
            area in (0u32..64, 0u32..64, 1u32..200, 1u32..200),
            related in proptest::prelude::any::<bool>(),
            whole in proptest::prelude::any::<bool>(),
        ) {
            let (w, h) = (192, 160);
            let held = page(w, h, seed % 1000);
            let mut frame = if related { Framebuffer::new(w, h) } else { page(w, h, seed % 1000 + 7) };
            if related {
                // The held picture shifted by (dx, dy), what comes in from outside left black.
                let stride = held.stride();
                for y in 0..h as i32 {
                    for x in 0..w as i32 {
                        let (sx, sy) = (x - dx, y - dy);
                        if (0..w as i32).contains(&sx) && (0..h as i32).contains(&sy) {
                            let (to, from) = (y as usize * stride + x as usize * 4, sy as usize * stride + sx as usize * 4);
                            let pixel: [u8; 4] = held.pixels[from..from + 4].try_into().unwrap();
                            frame.pixels[to..to + 4].copy_from_slice(&pixel);
                        }
                    }
                }
            }
            let area = if whole {
                Rect::new(0, 0, w, h)
            } else {
                Rect::new(area.0, area.1, area.2.min(w - area.0), area.3.min(h - area.1))
            };
            let found = detect(&held, &frame, area);
            // A plain scroll of the whole picture (one axis) is always found.
            if related && whole && (dx == 0) != (dy == 0) {
                proptest::prop_assert!(found.is_some(), "no move found for ({}, {})", dx, dy);
            }
            if let Some(m) = found {
                proptest::prop_assert!(m.within(&area).is_some(), "{m:?} outside {area:?}");
                proptest::prop_assert!(m.src.x == m.dst_x || m.src.y == m.dst_y, "{m:?} moves both ways");
                let mut client = held.clone();
                apply(&mut client, &m);
                let dst = m.dst();
                let stride = client.stride();
                for y in dst.y..dst.y + dst.height {
                    let at = y as usize * stride + dst.x as usize * 4;
                    let n = dst.width as usize * 4;
                    proptest::prop_assert_eq!(&client.pixels[at..at + n], &frame.pixels[at..at + n], "row {}", y);
                }
            }
        }
    }

    #[test]
    fn no_move_is_claimed_for_new_content_blank_screens_or_small_areas() {
        let (w, h) = (320, 240);
        let held = page(w, h, 0);
        // Different text altogether.
        assert_eq!(detect(&held, &page(w, h, 1000), Rect::new(0, 0, w, h)), None);
        // Blank to blank (every row uniform): nothing to vote.
        let blank = Framebuffer::new(w, h);
        assert_eq!(detect(&blank, &blank, Rect::new(0, 0, w, h)), None);
        // Unchanged: no move.
        assert_eq!(detect(&held, &held, Rect::new(0, 0, w, h)), None);
        // Too small, or outside the picture.
        assert_eq!(detect(&held, &scrolled(w, h, 4), Rect::new(0, 0, w, MIN_ROWS - 1)), None);
        assert_eq!(detect(&held, &scrolled(w, h, 4), Rect::new(0, 0, w + 1, h)), None);
    }
}
