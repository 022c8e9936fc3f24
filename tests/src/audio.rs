//! Audio analysis for the end-to-end tests and the benchmark: the dominant frequency of a
//! recording (Goertzel scan), levels, and the gaps in a tone.

/// The power of `freq` Hz in `samples` (Goertzel).
pub fn goertzel(samples: &[f64], freq: f64, rate: f64) -> f64 {
    let w = 2.0 * std::f64::consts::PI * freq / rate;
    let coeff = 2.0 * w.cos();
    let (mut s1, mut s2) = (0.0, 0.0);
    for x in samples {
        let s0 = x + coeff * s1 - s2;
        s2 = s1;
        s1 = s0;
    }
    s1 * s1 + s2 * s2 - coeff * s1 * s2
}

/// The strongest frequency between `lo` and `hi` Hz: a coarse scan (5 Hz steps over the first
/// 0.1 s) then a fine one (0.1 Hz steps around the peak over all of `samples`).
pub fn dominant_frequency(samples: &[i16], rate: f64, lo: f64, hi: f64) -> f64 {
    let x: Vec<f64> = samples.iter().map(|s| f64::from(*s)).collect();
    let short = &x[..x.len().min(rate as usize / 10)];
    let argmax = |data: &[f64], from: f64, to: f64, step: f64| {
        let mut best = (from, f64::MIN);
        let mut f = from;
        while f <= to {
            let p = goertzel(data, f, rate);
            if p > best.1 {
                best = (f, p);
            }
            f += step;
        }
        best.0
    };
    let coarse = argmax(short, lo, hi, 5.0);
    argmax(&x, (coarse - 10.0).max(lo), (coarse + 10.0).min(hi), 0.1)
}

pub fn rms(samples: &[i16]) -> f64 {
    if samples.is_empty() {
        return 0.0;
    }
    (samples.iter().map(|s| f64::from(*s).powi(2)).sum::<f64>() / samples.len() as f64).sqrt()
}

/// One channel of interleaved stereo.
pub fn left(stereo: &[i16]) -> Vec<i16> {
    stereo.iter().step_by(2).copied().collect()
}

/// Where a tone is, in 5 ms windows: the first and last window louder than `threshold`
/// (RMS), as sample ranges.
pub fn tone_span(samples: &[i16], rate: usize, threshold: f64) -> Option<(usize, usize)> {
    let win = rate / 200;
    let loud: Vec<usize> =
        samples.chunks(win).enumerate().filter(|(_, w)| rms(w) > threshold).map(|(i, _)| i).collect();
    Some((*loud.first()? * win, (*loud.last()? + 1) * win))
}

/// The longest run of quiet 5 ms windows (RMS under `threshold`) inside `samples`, in ms.
pub fn longest_gap_ms(samples: &[i16], rate: usize, threshold: f64) -> f64 {
    let win = rate / 200;
    let (mut longest, mut run) = (0usize, 0usize);
    for w in samples.chunks(win) {
        if rms(w) < threshold {
            run += 1;
            longest = longest.max(run);
        } else {
            run = 0;
        }
    }
    longest as f64 * 5.0
}

/// A mono or stereo 16-bit WAV: (rate, channels, samples).
pub fn read_wav(bytes: &[u8]) -> Result<(u32, u16, Vec<i16>), String> {
    let reader = hound::WavReader::new(std::io::Cursor::new(bytes)).map_err(|e| e.to_string())?;
    let spec = reader.spec();
    let samples = reader.into_samples::<i16>().collect::<Result<Vec<_>, _>>().map_err(|e| e.to_string())?;
    Ok((spec.sample_rate, spec.channels, samples))
}

/// Writes a stereo 48 kHz sine WAV (for `pleiades connect --mic`).
pub fn write_sine_wav(path: &std::path::Path, freq: f64, amplitude: f64, seconds: f64) -> Result<(), String> {
    let spec = hound::WavSpec {
        channels: 2,
        sample_rate: 48_000,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut w = hound::WavWriter::create(path, spec).map_err(|e| e.to_string())?;
    for i in 0..(seconds * 48_000.0) as u64 {
        let v =
            (amplitude * 32767.0 * (2.0 * std::f64::consts::PI * freq * i as f64 / 48_000.0).sin()) as i16;
        w.write_sample(v).and_then(|()| w.write_sample(v)).map_err(|e| e.to_string())?;
    }
    w.finalize().map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_tone_its_level_and_its_gaps() {
        let mut s: Vec<i16> = (0..48_000)
            .map(|i| (10_000.0 * (2.0 * std::f64::consts::PI * 440.0 * f64::from(i) / 48_000.0).sin()) as i16)
            .collect();
        assert!((dominant_frequency(&s, 48_000.0, 50.0, 5000.0) - 440.0).abs() < 0.5);
        assert!((rms(&s) - 10_000.0 / 2f64.sqrt()).abs() < 10.0);
        assert_eq!(longest_gap_ms(&s, 48_000, 3000.0), 0.0);
        s[24_000..24_000 + 48 * 30].fill(0);
        assert_eq!(longest_gap_ms(&s, 48_000, 3000.0), 30.0);
        assert_eq!(tone_span(&s, 48_000, 3000.0), Some((0, 48_000)));
    }
}
