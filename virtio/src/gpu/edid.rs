//! The EDID a Pleiades virtual monitor reports to the guest.
//!
//! virtio-gpu hands the guest one EDID per scanout (`VIRTIO_GPU_CMD_GET_EDID`, with
//! `VIRTIO_GPU_F_EDID`). Guests take their mode list and preferred mode from it (Linux puts the
//! EDID's preferred mode first and fills the connector's physical size from it; Windows and
//! Xorg pick the preferred detailed timing), so "resize the guest to the window" means: offer an
//! EDID whose preferred mode is the window's size. This module builds that EDID: a 128-byte EDID
//! 1.4 base block, no extensions, for a monitor of a given preferred size.
//!
//! - Vendor `PLE`, a product code and serial, week/year of manufacture, digital input (8 bits
//!   per colour, interface not specified), physical size from 96 dpi (what desktops assume for
//!   a virtual screen, so the guest picks a 100 % scale), gamma 2.2, sRGB primaries.
//! - Detailed timing 1 is the preferred mode: the requested size with VESA CVT reduced-blanking
//!   (v1) timings at 60 Hz, the blanking a digital display with no electron beam needs. The
//!   active width is the requested one, not rounded down to CVT's 8-pixel cell, so odd window
//!   sizes (1366, 1001) come back exactly.
//! - The established timings 640x480, 800x600 and 1024x768 at 60 Hz are listed when they fit,
//!   so the guest has safe fallbacks; the standard timings are unused.
//! - A range limits descriptor that covers every listed timing, the name `Pleiades`, and a dummy
//!   descriptor.
//!
//! The size is limited to 3840x2400 (and at least 640x480): larger modes need more than the
//! base block's timing fields comfortably hold at 60 Hz and more than QEMU's host surfaces are
//! tested with; the pixel clock of the largest is 592.5 MHz, inside the DTD's 655.35 MHz.

/// The largest preferred width.
pub const MAX_WIDTH: u32 = 3840;
/// The largest preferred height.
pub const MAX_HEIGHT: u32 = 2400;
/// The smallest preferred width (CVT reduced blanking is not meant for smaller modes).
pub const MIN_WIDTH: u32 = 640;
/// The smallest preferred height (below 640x480 the pixel clock falls under the 10 MHz and the
/// 96 dpi size under the 10 cm that EDID checkers take for garbage).
pub const MIN_HEIGHT: u32 = 480;
/// The size of an EDID base block.
pub const EDID_SIZE: usize = 128;

/// The dpi the physical size is derived from.
const DPI: u32 = 96;
/// The refresh rate of the preferred mode.
const REFRESH_HZ: u32 = 60;

/// Why no EDID could be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EdidError {
    #[error(
        "a {width}x{height} monitor cannot be described: the size must be from \
         {MIN_WIDTH}x{MIN_HEIGHT} to {MAX_WIDTH}x{MAX_HEIGHT}; ask for a size in that range"
    )]
    Size { width: u32, height: u32 },
    #[error(
        "the pixel clock of {width}x{height} at 60 Hz ({khz} kHz) does not fit an EDID detailed \
         timing (at most 655350 kHz); ask for a smaller size"
    )]
    PixelClock { width: u32, height: u32, khz: u32 },
    #[error("year of manufacture {year} cannot be encoded in an EDID (1990 to 2245)")]
    Year { year: u16 },
    #[error("week of manufacture {week} cannot be encoded in an EDID (0 for unknown, or 1 to 54)")]
    Week { week: u8 },
}

/// Display timings of one mode, in pixels and lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// Pixel clock in kHz (a multiple of 10: the EDID stores 10 kHz units).
    pub pixel_clock_khz: u32,
    pub h_active: u32,
    pub h_front_porch: u32,
    pub h_sync: u32,
    pub h_back_porch: u32,
    pub v_active: u32,
    pub v_front_porch: u32,
    pub v_sync: u32,
    pub v_back_porch: u32,
    /// Sync polarities (CVT reduced blanking: +hsync, -vsync).
    pub h_sync_positive: bool,
    pub v_sync_positive: bool,
}

impl Timing {
    pub fn h_blank(&self) -> u32 {
        self.h_front_porch + self.h_sync + self.h_back_porch
    }

    pub fn v_blank(&self) -> u32 {
        self.v_front_porch + self.v_sync + self.v_back_porch
    }

    pub fn h_total(&self) -> u32 {
        self.h_active + self.h_blank()
    }

    pub fn v_total(&self) -> u32 {
        self.v_active + self.v_blank()
    }

    /// Line rate in Hz.
    pub fn h_freq_hz(&self) -> f64 {
        f64::from(self.pixel_clock_khz) * 1000.0 / f64::from(self.h_total())
    }

    /// Refresh rate in Hz.
    pub fn refresh_hz(&self) -> f64 {
        self.h_freq_hz() / f64::from(self.v_total())
    }
}

/// VESA CVT 1.2 reduced blanking (v1) timings for `width` x `height` at 60 Hz, progressive, no
/// margins. The active width is kept as given (CVT would round it down to a multiple of 8).
pub fn cvt_reduced_blanking(width: u32, height: u32) -> Result<Timing, EdidError> {
    check_size(width, height)?;
    // CVT 1.2, section 3.4.2 (reduced blanking, version 1) constants.
    const RB_H_BLANK: u32 = 160;
    const RB_H_SYNC: u32 = 32;
    const RB_H_FRONT_PORCH: u32 = 48;
    const RB_MIN_V_BLANK_US: f64 = 460.0;
    const RB_V_FRONT_PORCH: u32 = 3;
    // 7 as in CVT 1.2, edid-decode and v4l2 (Xorg's `cvt` and `drm_cvt_mode` use 6, which differs
    // only below ~670 lines).
    const MIN_V_BACK_PORCH: u32 = 7;
    const CLOCK_STEP_KHZ: u32 = 250;

    let v_sync = cvt_v_sync(width, height);
    // Estimated line period (us): the frame time less the minimum blanking, over the lines.
    let h_period_est = (1_000_000.0 / f64::from(REFRESH_HZ) - RB_MIN_V_BLANK_US) / f64::from(height);
    // Lines of vertical blanking: enough for the minimum blanking time, at least the porches
    // and sync. Bounded: h_period_est is at least ~6.7 us for heights up to MAX_HEIGHT.
    let vbi_lines = (RB_MIN_V_BLANK_US / h_period_est).floor() as u32 + 1;
    let v_blank = vbi_lines.max(RB_V_FRONT_PORCH + v_sync + MIN_V_BACK_PORCH);
    let v_total = height + v_blank;
    let h_total = width + RB_H_BLANK;
    // The pixel clock, rounded down to the 0.25 MHz step (integer arithmetic: exact).
    let ideal_hz = u64::from(REFRESH_HZ) * u64::from(v_total) * u64::from(h_total);
    let step_hz = u64::from(CLOCK_STEP_KHZ) * 1000;
    let pixel_clock_khz = ((ideal_hz / step_hz) * u64::from(CLOCK_STEP_KHZ)) as u32;
    Ok(Timing {
        pixel_clock_khz,
        h_active: width,
        h_front_porch: RB_H_FRONT_PORCH,
        h_sync: RB_H_SYNC,
        h_back_porch: RB_H_BLANK - RB_H_FRONT_PORCH - RB_H_SYNC,
        v_active: height,
        v_front_porch: RB_V_FRONT_PORCH,
        v_sync,
        v_back_porch: v_blank - RB_V_FRONT_PORCH - v_sync,
        h_sync_positive: true,
        v_sync_positive: false,
    })
}

/// CVT's vertical sync width, which encodes the aspect ratio (4:3, 16:9, 16:10, 5:4, 15:9,
/// other); the same test as Linux's `drm_cvt_mode`.
fn cvt_v_sync(width: u32, height: u32) -> u32 {
    let is = |num: u32, den: u32| height.is_multiple_of(den) && height * num / den == width;
    if is(4, 3) {
        4
    } else if is(16, 9) {
        5
    } else if is(16, 10) {
        6
    } else if is(5, 4) || is(15, 9) {
        7
    } else {
        10
    }
}

fn check_size(width: u32, height: u32) -> Result<(), EdidError> {
    if (MIN_WIDTH..=MAX_WIDTH).contains(&width) && (MIN_HEIGHT..=MAX_HEIGHT).contains(&height) {
        Ok(())
    } else {
        Err(EdidError::Size { width, height })
    }
}

/// A virtual monitor to describe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Monitor {
    /// Preferred (native) size in pixels.
    pub width: u32,
    pub height: u32,
    /// Product code (e.g. the scanout index, so that the guest tells monitors apart).
    pub product_code: u16,
    /// Serial number (0: none).
    pub serial: u32,
    /// Week of manufacture, 1 to 54 (0: not given).
    pub week: u8,
    /// Year of manufacture, 1990 to 2245.
    pub year: u16,
}

impl Monitor {
    /// A monitor of `width` x `height`, product code 1, no serial, made in week 1 of 2025.
    pub fn new(width: u32, height: u32) -> Self {
        Self { width, height, product_code: 1, serial: 0, week: 1, year: 2025 }
    }

    /// The physical size in millimetres at 96 dpi.
    pub fn size_mm(&self) -> (u32, u32) {
        let mm = |px: u32| (px * 254 + DPI * 5) / (DPI * 10);
        (mm(self.width), mm(self.height))
    }

    /// The EDID 1.4 base block.
    pub fn edid(&self) -> Result<[u8; EDID_SIZE], EdidError> {
        let preferred = cvt_reduced_blanking(self.width, self.height)?;
        let clock = u16::try_from(preferred.pixel_clock_khz / 10).map_err(|_| EdidError::PixelClock {
            width: self.width,
            height: self.height,
            khz: preferred.pixel_clock_khz,
        })?;
        if !(1990..=2245).contains(&self.year) {
            return Err(EdidError::Year { year: self.year });
        }
        if self.week > 54 {
            return Err(EdidError::Week { week: self.week });
        }
        let mut e = [0u8; EDID_SIZE];
        e[0..8].copy_from_slice(&[0x00, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x00]);
        // Manufacturer "PLE": three 5-bit letters (A = 1), big-endian.
        let letter = |c: u8| u16::from(c - b'A' + 1);
        let vendor = (letter(b'P') << 10) | (letter(b'L') << 5) | letter(b'E');
        e[8..10].copy_from_slice(&vendor.to_be_bytes());
        e[10..12].copy_from_slice(&self.product_code.to_le_bytes());
        e[12..16].copy_from_slice(&self.serial.to_le_bytes());
        e[16] = self.week;
        e[17] = (self.year - 1990) as u8;
        e[18] = 1; // EDID 1.4
        e[19] = 4;
        // Digital input, 8 bits per primary colour, interface not specified.
        e[20] = 0x80 | (0b010 << 4);
        // Screen size in cm (at least 1: 0 would mean "projector").
        let (w_mm, h_mm) = self.size_mm();
        e[21] = ((w_mm + 5) / 10).clamp(1, 255) as u8;
        e[22] = ((h_mm + 5) / 10).clamp(1, 255) as u8;
        e[23] = 120; // gamma 2.2: (2.2 * 100) - 100
        // Features: no DPM states, RGB 4:4:4, sRGB is the default colour space, the preferred
        // timing mode (DTD 1) is the native format and rate, not continuous frequency.
        e[24] = 0b0000_0110;
        e[25..35].copy_from_slice(&srgb_chromaticity());
        // Established timings at 60 Hz that fit the preferred size.
        let established = established_timings(self.width, self.height);
        for &(_, byte, bit) in &established {
            e[byte] |= 1 << bit;
        }
        // Standard timings: none (0x0101 marks an unused slot).
        e[38..54].fill(0x01);
        e[54..72].copy_from_slice(&detailed_timing(&preferred, clock, w_mm, h_mm));
        let mut listed: Vec<Timing> = established.iter().map(|&(t, _, _)| t).collect();
        listed.push(preferred);
        e[72..90].copy_from_slice(&range_limits(&listed));
        e[90..108].copy_from_slice(&text_descriptor(0xfc, "Pleiades"));
        // Dummy descriptor.
        e[108..126].copy_from_slice(&[0, 0, 0, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        e[126] = 0; // no extension blocks
        e[127] = checksum(&e[..127]);
        Ok(e)
    }
}

/// The byte that makes the block sum to 0 modulo 256.
fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |sum, b| sum.wrapping_add(*b)).wrapping_neg()
}

/// sRGB primaries and D65 white point, 10-bit binary fractions, in EDID order.
fn srgb_chromaticity() -> [u8; 10] {
    // (x, y) for red, green, blue, white.
    let points = [(0.640, 0.330), (0.300, 0.600), (0.150, 0.060), (0.3127, 0.3290)];
    let v: Vec<u16> =
        points.iter().flat_map(|&(x, y)| [x, y]).map(|c: f64| (c * 1024.0).round() as u16).collect();
    let low = |i: usize| (v[i] & 0b11) as u8;
    let mut out = [0u8; 10];
    out[0] = (low(0) << 6) | (low(1) << 4) | (low(2) << 2) | low(3);
    out[1] = (low(4) << 6) | (low(5) << 4) | (low(6) << 2) | low(7);
    for (i, value) in v.iter().enumerate() {
        out[2 + i] = (value >> 2) as u8;
    }
    out
}

/// The VESA DMT timings behind the established timings this EDID may list, with their byte
/// and bit in the block.
fn established_timings(width: u32, height: u32) -> Vec<(Timing, usize, u8)> {
    let dmt = |clock, (ha, hfp, hs, hbp), (va, vfp, vs, vbp), hp, vp| Timing {
        pixel_clock_khz: clock,
        h_active: ha,
        h_front_porch: hfp,
        h_sync: hs,
        h_back_porch: hbp,
        v_active: va,
        v_front_porch: vfp,
        v_sync: vs,
        v_back_porch: vbp,
        h_sync_positive: hp,
        v_sync_positive: vp,
    };
    [
        // 640x480@60 (DMT 0x04), byte 35 bit 5.
        (dmt(25_175, (640, 16, 96, 48), (480, 10, 2, 33), false, false), 35, 5),
        // 800x600@60 (DMT 0x09), byte 35 bit 0.
        (dmt(40_000, (800, 40, 128, 88), (600, 1, 4, 23), true, true), 35, 0),
        // 1024x768@60 (DMT 0x10), byte 36 bit 3.
        (dmt(65_000, (1024, 24, 136, 160), (768, 3, 6, 29), false, false), 36, 3),
    ]
    .into_iter()
    .filter(|(t, _, _)| t.h_active <= width && t.v_active <= height)
    .collect()
}

/// An 18-byte detailed timing descriptor; `clock` is the pixel clock in 10 kHz units.
fn detailed_timing(t: &Timing, clock: u16, w_mm: u32, h_mm: u32) -> [u8; 18] {
    let lo = |v: u32| (v & 0xff) as u8;
    let hi4 = |v: u32| ((v >> 8) & 0x0f) as u8;
    let (h_blank, v_blank) = (t.h_blank(), t.v_blank());
    let mut d = [0u8; 18];
    d[0..2].copy_from_slice(&clock.to_le_bytes());
    d[2] = lo(t.h_active);
    d[3] = lo(h_blank);
    d[4] = (hi4(t.h_active) << 4) | hi4(h_blank);
    d[5] = lo(t.v_active);
    d[6] = lo(v_blank);
    d[7] = (hi4(t.v_active) << 4) | hi4(v_blank);
    d[8] = lo(t.h_front_porch);
    d[9] = lo(t.h_sync);
    d[10] = (((t.v_front_porch & 0x0f) as u8) << 4) | (t.v_sync & 0x0f) as u8;
    d[11] = ((((t.h_front_porch >> 8) & 0b11) as u8) << 6)
        | ((((t.h_sync >> 8) & 0b11) as u8) << 4)
        | ((((t.v_front_porch >> 4) & 0b11) as u8) << 2)
        | ((t.v_sync >> 4) & 0b11) as u8;
    d[12] = lo(w_mm);
    d[13] = lo(h_mm);
    d[14] = (hi4(w_mm) << 4) | hi4(h_mm);
    // d[15], d[16]: no borders. d[17]: progressive, no stereo, digital separate sync.
    d[17] = 0b0001_1000 | (u8::from(t.v_sync_positive) << 2) | (u8::from(t.h_sync_positive) << 1);
    d
}

/// The display range limits descriptor covering `timings` ("range limits only").
fn range_limits(timings: &[Timing]) -> [u8; 18] {
    let fold = |f: fn(&Timing) -> f64| {
        timings.iter().map(f).fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(v), hi.max(v)))
    };
    let (v_min, v_max) = fold(Timing::refresh_hz);
    let (h_min, h_max) = fold(|t| t.h_freq_hz() / 1000.0);
    let clock_max = timings.iter().map(|t| t.pixel_clock_khz).max().unwrap_or(0);
    let byte = |v: f64| v.clamp(1.0, 255.0) as u8;
    let mut d = [0u8; 18];
    d[3] = 0xfd;
    d[5] = byte(v_min.floor());
    d[6] = byte(v_max.ceil());
    d[7] = byte(h_min.floor());
    d[8] = byte(h_max.ceil());
    // Maximum pixel clock in 10 MHz units, rounded up.
    d[9] = clock_max.div_ceil(10_000).clamp(1, 255) as u8;
    d[10] = 0x01; // range limits only, no secondary timing formula
    d[11] = 0x0a;
    d[12..18].fill(0x20);
    d
}

/// A display descriptor holding text (`tag` 0xfc: product name): up to 13 characters, ended
/// by 0x0a and padded with spaces.
fn text_descriptor(tag: u8, text: &str) -> [u8; 18] {
    let mut d = [0u8; 18];
    d[3] = tag;
    d[5..18].fill(0x20);
    let bytes: Vec<u8> = text.bytes().filter(u8::is_ascii_graphic).take(13).collect();
    d[5..5 + bytes.len()].copy_from_slice(&bytes);
    if bytes.len() < 13 {
        d[5 + bytes.len()] = 0x0a;
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes a detailed timing descriptor (the inverse of [`detailed_timing`]).
    fn decode_dtd(d: &[u8]) -> (Timing, u32, u32) {
        let b = |i: usize| u32::from(d[i]);
        let h_blank = b(3) | ((b(4) & 0x0f) << 8);
        let v_blank = b(6) | ((b(7) & 0x0f) << 8);
        let h_front_porch = b(8) | ((b(11) >> 6) << 8);
        let h_sync = b(9) | (((b(11) >> 4) & 3) << 8);
        let v_front_porch = (b(10) >> 4) | (((b(11) >> 2) & 3) << 4);
        let v_sync = (b(10) & 0x0f) | ((b(11) & 3) << 4);
        let timing = Timing {
            pixel_clock_khz: u32::from(u16::from_le_bytes([d[0], d[1]])) * 10,
            h_active: b(2) | ((b(4) >> 4) << 8),
            h_front_porch,
            h_sync,
            h_back_porch: h_blank - h_front_porch - h_sync,
            v_active: b(5) | ((b(7) >> 4) << 8),
            v_front_porch,
            v_sync,
            v_back_porch: v_blank - v_front_porch - v_sync,
            h_sync_positive: d[17] & 0b10 != 0,
            v_sync_positive: d[17] & 0b100 != 0,
        };
        (timing, b(12) | ((b(14) >> 4) << 8), b(13) | ((b(14) & 0x0f) << 8))
    }

    const SIZES: [(u32, u32); 9] = [
        (640, 480),
        (700, 480),
        (1024, 768),
        (1280, 720),
        (1366, 768),
        (1920, 1080),
        (2560, 1600),
        (1001, 777),
        (3840, 2400),
    ];

    #[test]
    fn header_checksum_and_fixed_fields() {
        for (w, h) in SIZES {
            let e = Monitor::new(w, h).edid().unwrap();
            assert_eq!(e[..8], [0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0]);
            assert_eq!(e.iter().fold(0u8, |s, b| s.wrapping_add(*b)), 0, "{w}x{h}: checksum");
            assert_eq!(e[8..10], [0x41, 0x85], "PLE");
            assert_eq!((e[18], e[19]), (1, 4), "EDID 1.4");
            assert_eq!(e[126], 0, "no extensions");
            assert_eq!(e[25..35], [0xee, 0x91, 0xa3, 0x54, 0x4c, 0x99, 0x26, 0x0f, 0x50, 0x54], "sRGB");
            assert_eq!(e[90..108], *b"\0\0\0\xfc\0Pleiades\n    ");
        }
    }

    #[test]
    fn dtd_1_decodes_to_the_requested_size() {
        for (w, h) in SIZES {
            let m = Monitor::new(w, h);
            let e = m.edid().unwrap();
            let (timing, w_mm, h_mm) = decode_dtd(&e[54..72]);
            assert_eq!((timing.h_active, timing.v_active), (w, h));
            assert_eq!(timing, cvt_reduced_blanking(w, h).unwrap());
            assert_eq!((w_mm, h_mm), m.size_mm());
            // CVT rounds the pixel clock down to 0.25 MHz: small modes land below 60 Hz.
            assert!((timing.refresh_hz() - 60.0).abs() < 1.0, "{w}x{h}: {}", timing.refresh_hz());
        }
    }

    #[test]
    fn cvt_rb_matches_the_vesa_tables() {
        // From the VESA DMT/CVT tables: 1920x1080 RB is 138.5 MHz, 2080x1111; 1280x720 is not
        // in DMT as RB, 2560x1600 RB is 268.5 MHz, 2720x1646.
        let t = cvt_reduced_blanking(1920, 1080).unwrap();
        assert_eq!((t.pixel_clock_khz, t.h_total(), t.v_total()), (138_500, 2080, 1111));
        assert_eq!((t.h_front_porch, t.h_sync, t.v_front_porch, t.v_sync), (48, 32, 3, 5));
        let t = cvt_reduced_blanking(2560, 1600).unwrap();
        assert_eq!((t.pixel_clock_khz, t.h_total(), t.v_total()), (268_500, 2720, 1646));
        let t = cvt_reduced_blanking(3840, 2400).unwrap();
        assert!(t.pixel_clock_khz / 10 <= u32::from(u16::MAX));
    }

    #[test]
    fn physical_size_is_96_dpi() {
        let m = Monitor::new(1920, 1080);
        assert_eq!(m.size_mm(), (508, 286));
        let e = m.edid().unwrap();
        assert_eq!((e[21], e[22]), (51, 29));
    }

    #[test]
    fn established_timings_only_when_they_fit() {
        assert_eq!(Monitor::new(1920, 1080).edid().unwrap()[35..38], [0b0010_0001, 0b0000_1000, 0]);
        assert_eq!(Monitor::new(800, 600).edid().unwrap()[35..38], [0b0010_0001, 0, 0]);
        assert_eq!(Monitor::new(1000, 700).edid().unwrap()[35..38], [0b0010_0001, 0, 0]);
        assert_eq!(Monitor::new(640, 480).edid().unwrap()[35..38], [0b0010_0000, 0, 0]);
    }

    #[test]
    fn bad_input_is_an_error() {
        for (w, h) in
            [(3841, 2400), (3840, 2401), (2400, 3840), (0, 0), (639, 480), (640, 479), (u32::MAX, u32::MAX)]
        {
            let err = Monitor::new(w, h).edid().unwrap_err();
            assert_eq!(err, EdidError::Size { width: w, height: h });
            assert!(err.to_string().contains("3840x2400"), "{err}");
        }
        assert!(matches!(
            Monitor { year: 1989, ..Monitor::new(800, 600) }.edid(),
            Err(EdidError::Year { year: 1989 })
        ));
        assert!(matches!(
            Monitor { week: 55, ..Monitor::new(800, 600) }.edid(),
            Err(EdidError::Week { week: 55 })
        ));
    }

    proptest::proptest! {
        #[test]
        fn any_allowed_size_gives_a_valid_block(w in MIN_WIDTH..=MAX_WIDTH, h in MIN_HEIGHT..=MAX_HEIGHT) {
            let e = Monitor::new(w, h).edid().unwrap();
            proptest::prop_assert_eq!(e.iter().fold(0u8, |s, b| s.wrapping_add(*b)), 0);
            let (t, _, _) = decode_dtd(&e[54..72]);
            proptest::prop_assert_eq!((t.h_active, t.v_active), (w, h));
            proptest::prop_assert_eq!(t, cvt_reduced_blanking(w, h).unwrap());
            // The range limits cover the preferred mode.
            let r = t.refresh_hz();
            proptest::prop_assert!(f64::from(e[77]) <= r && r <= f64::from(e[78]), "{} {:?}", r, &e[72..90]);
            let khz = t.h_freq_hz() / 1000.0;
            proptest::prop_assert!(f64::from(e[79]) <= khz && khz <= f64::from(e[80]));
            proptest::prop_assert!(u32::from(e[81]) * 10_000 >= t.pixel_clock_khz);
        }
    }

    /// `edid-decode` (Debian package `edid-decode`, installed by `./dev deps`), the outside
    /// reference these checks compare against: `None` skips the test outside CI, and a
    /// missing tool fails it under CI ([`pleiades_testkit::prerequisite`]).
    fn edid_decode_tool(test: &str) -> Option<std::path::PathBuf> {
        pleiades_testkit::prerequisite::require(test, pleiades_testkit::prerequisite::command("edid-decode"))
    }

    /// Runs `edid-decode --check` on the EDID.
    fn edid_decode(tool: &std::path::Path, edid: &[u8]) -> String {
        use std::io::Write;
        use std::process::{Command, Stdio};
        let mut child = Command::new(tool)
            .args(["--check", "--preferred-timings", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("edid-decode runs");
        child.stdin.take().unwrap().write_all(edid).unwrap();
        let out = child.wait_with_output().unwrap();
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    }

    #[test]
    fn edid_decode_finds_no_errors_and_the_preferred_mode() {
        let Some(tool) = edid_decode_tool("edid_decode_finds_no_errors_and_the_preferred_mode") else {
            return;
        };
        let mut checked = 0;
        for (w, h) in SIZES {
            let report = edid_decode(&tool, &Monitor::new(w, h).edid().unwrap());
            let context = format!("{w}x{h}:\n{report}");
            assert!(report.contains("EDID conformity: PASS"), "{context}");
            assert!(!report.contains("Failures:") && !report.contains("Warnings:"), "{context}");
            assert!(report.contains("Manufacturer: PLE"), "{context}");
            assert!(report.contains("Display Product Name: 'Pleiades'"), "{context}");
            // "Preferred Video Timing if only Block 0 is parsed:\n  DTD   1:   640x480  59.46 Hz …"
            let preferred = report.split("Preferred Video Timing").nth(1).and_then(|s| s.lines().nth(1));
            let size = format!("{w}x{h}");
            assert!(
                preferred.is_some_and(
                    |l| l.trim_start().starts_with("DTD") && l.split_whitespace().any(|t| t == size)
                ),
                "{context}"
            );
            checked += 1;
        }
        assert_eq!(checked, SIZES.len(), "every size is checked");
    }

    #[test]
    fn cvt_rb_agrees_with_edid_decode() {
        use std::process::Command;
        let Some(tool) = edid_decode_tool("cvt_rb_agrees_with_edid_decode") else { return };
        let sizes: Vec<_> = SIZES.into_iter().filter(|(w, _)| w % 8 == 0).collect();
        assert!(sizes.len() >= 3, "enough sizes to compare: {sizes:?}");
        for (w, h) in sizes {
            let out =
                Command::new(&tool).arg("--cvt").arg(format!("w={w},h={h},fps=60,rb=1")).output().unwrap();
            assert!(out.status.success(), "edid-decode --cvt {w}x{h}: {out:?}");
            let out = String::from_utf8_lossy(&out.stdout).into_owned();
            let t = cvt_reduced_blanking(w, h).unwrap();
            let clock = format!("{}.{:03}000 MHz", t.pixel_clock_khz / 1000, t.pixel_clock_khz % 1000);
            assert!(out.contains(&clock), "{w}x{h}: {clock}\n{out}");
            let hfp = format!("Hfront {:4} Hsync {:3} Hback {:4}", t.h_front_porch, t.h_sync, t.h_back_porch);
            let vfp = format!("Vfront {:4} Vsync {:3} Vback {:4}", t.v_front_porch, t.v_sync, t.v_back_porch);
            assert!(out.contains(&hfp) && out.contains(&vfp), "{w}x{h}: {hfp} / {vfp}\n{out}");
        }
    }
}
