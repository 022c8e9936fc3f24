//! The audio receiver's adaptive jitter buffer (sans-IO: time is a parameter).
//!
//! Packets ([`AudioPacket`], one 20 ms Opus frame each) go in as they arrive
//! ([`JitterBuffer::push`]); the player asks for the next frame whenever it needs one
//! ([`JitterBuffer::next`]) and gets what to decode: the packet, the next packet's in-band FEC
//! (the frame was lost but its successor carries a redundant copy), a concealment (Opus PLC),
//! an expansion (concealment while a late frame may still come, NetEQ's "expand"), or silence
//! (nothing to play for longer: an underrun or a pause).
//!
//! The first frame plays [`JitterBuffer::delay_us`] after its packet arrived, each next one
//! 20 ms later. The delay adapts: it follows the measured interarrival jitter (RFC 3550's
//! estimator, three times it plus one frame), grows by a frame at every underrun, and creeps
//! back down after a quiet while, within [`MIN_DELAY_US`]..[`MAX_DELAY_US`]. A buffer that
//! holds more than the delay needs drops a frame to catch up, so latency does not stay high
//! after a burst. After [`IDLE_AFTER_US`] without packets the stream is paused: the buffer
//! goes quiet and starts over with the next packet.

use std::collections::BTreeMap;

use crate::wire::AudioPacket;

/// One frame: 20 ms.
pub const FRAME_US: u64 = 20_000;
pub const MIN_DELAY_US: u64 = 40_000;
pub const MAX_DELAY_US: u64 = 300_000;
/// Without packets this long the stream counts as paused.
pub const IDLE_AFTER_US: u64 = 1_000_000;
/// Most packets held (packets further ahead are dropped).
pub const MAX_PACKETS: usize = 64;
/// A quiet while after which the delay shrinks by a millisecond per frame played.
const SHRINK_AFTER_US: u64 = 5_000_000;

/// What the player does for the next 20 ms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Playout {
    /// Decode this packet.
    Packet(AudioPacket),
    /// The frame was lost; decode the FEC data of this, the next, packet.
    Fec(AudioPacket),
    /// The frame was lost and so was the next: conceal (Opus PLC).
    Conceal,
    /// The frame is late (nothing newer arrived): conceal for 20 ms while waiting for it. The
    /// frame is not given up: it plays next if it comes (the delay grew by a frame).
    Expand,
    /// Nothing to play: silence.
    Silence,
}

/// Underrun frames concealed ([`Playout::Expand`]) before the buffer plays silence.
pub const MAX_EXPAND_FRAMES: u32 = 3;

/// Counters of a buffer's life.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct JitterStats {
    pub received: u64,
    pub played: u64,
    pub recovered_fec: u64,
    pub concealed: u64,
    /// Underruns (runs of silence) that were not the end of the stream.
    pub underruns: u64,
    /// Packets that came after their time (or twice) and were dropped.
    pub late: u64,
    /// Frames dropped to bring the latency back down.
    pub skipped: u64,
}

#[derive(Debug, Clone)]
pub struct JitterBuffer {
    packets: BTreeMap<u64, AudioPacket>,
    /// The next frame to play (sequence numbers unwrapped to u64) and when it plays.
    next: Option<(u64, u64)>,
    /// The newest unwrapped sequence number seen.
    newest: Option<u64>,
    /// The last frame played (a packet at or before it is late, even after a pause).
    last_played: Option<u64>,
    last_arrival_us: u64,
    /// RFC 3550 interarrival jitter, µs.
    jitter_us: f64,
    prev_transit: Option<i64>,
    /// The extra delay underruns asked for.
    underrun_floor_us: u64,
    last_underrun_us: u64,
    /// Whether the last frame was an underrun's.
    in_underrun: bool,
    underrun_frames: u32,
    stats: JitterStats,
}

impl Default for JitterBuffer {
    fn default() -> Self {
        Self::new()
    }
}

impl JitterBuffer {
    pub fn new() -> Self {
        Self {
            packets: BTreeMap::new(),
            next: None,
            newest: None,
            last_played: None,
            last_arrival_us: 0,
            jitter_us: 0.0,
            prev_transit: None,
            underrun_floor_us: MIN_DELAY_US,
            last_underrun_us: 0,
            in_underrun: false,
            underrun_frames: 0,
            stats: JitterStats::default(),
        }
    }

    pub fn stats(&self) -> JitterStats {
        self.stats
    }

    /// The delay the buffer aims for now.
    pub fn delay_us(&self) -> u64 {
        let from_jitter = (3.0 * self.jitter_us) as u64 + FRAME_US;
        from_jitter.max(self.underrun_floor_us).clamp(MIN_DELAY_US, MAX_DELAY_US)
    }

    /// Unwraps a 32-bit sequence number near the newest one seen.
    fn unwrap_seq(&self, seq: u32) -> u64 {
        let Some(newest) = self.newest else { return u64::from(seq) + (1 << 32) };
        let base = newest & !0xffff_ffff;
        let candidates = [base.wrapping_sub(1 << 32), base, base + (1 << 32)];
        candidates
            .iter()
            .map(|b| b.wrapping_add(u64::from(seq)))
            .min_by_key(|c| c.abs_diff(newest))
            .unwrap_or(base + u64::from(seq))
    }

    /// A packet arrived at `now_us`.
    pub fn push(&mut self, packet: AudioPacket, now_us: u64) {
        self.stats.received += 1;
        let seq = self.unwrap_seq(packet.seq);
        // Jitter: how much the transit time (arrival - send) varies between packets.
        let transit = now_us as i64 - packet.timestamp_us as i64;
        if let Some(prev) = self.prev_transit {
            let d = (transit - prev).unsigned_abs() as f64;
            self.jitter_us += (d - self.jitter_us) / 16.0;
        }
        self.prev_transit = Some(transit);
        self.last_arrival_us = now_us;
        self.newest = Some(self.newest.map_or(seq, |n| n.max(seq)));
        if self.next.is_some_and(|(next, _)| seq < next)
            || self.last_played.is_some_and(|last| seq <= last)
            || self.packets.contains_key(&seq)
        {
            self.stats.late += 1;
            return;
        }
        if self.next.is_none() {
            self.next = Some((seq, now_us + self.delay_us()));
        }
        if self.packets.len() >= MAX_PACKETS {
            self.stats.late += 1;
            return;
        }
        self.packets.insert(seq, packet);
    }

    /// The next frame to play if its time has come by `now_us`: `(its sequence number, what to
    /// do)`. Call until it returns `None`.
    pub fn next(&mut self, now_us: u64) -> Option<(u64, Playout)> {
        let played = self.next_frame(now_us)?;
        if !matches!(played.1, Playout::Silence | Playout::Expand) {
            self.last_played = Some(played.0);
        }
        Some(played)
    }

    fn next_frame(&mut self, now_us: u64) -> Option<(u64, Playout)> {
        let (seq, at) = self.next?;
        if now_us < at {
            return None;
        }
        if now_us.saturating_sub(self.last_arrival_us) > IDLE_AFTER_US && self.packets.is_empty() {
            // Paused: start over with the next packet.
            if self.in_underrun {
                self.in_underrun = false;
                self.stats.underruns -= 1;
                self.underrun_floor_us = self.underrun_floor_us.saturating_sub(FRAME_US).max(MIN_DELAY_US);
            }
            self.next = None;
            return None;
        }
        // Too much buffered (a burst after a stall): skip a frame to get the latency back.
        let buffered_us = self.packets.range(seq..).count() as u64 * FRAME_US;
        if buffered_us > self.delay_us() + 3 * FRAME_US
            && let Some((&oldest, _)) = self.packets.range(seq..).next()
            && oldest == seq
        {
            self.packets.remove(&seq);
            self.stats.skipped += 1;
            self.next = Some((seq + 1, at + FRAME_US));
            return self.next_frame(now_us);
        }
        if let Some(packet) = self.packets.remove(&seq) {
            self.in_underrun = false;
            self.stats.played += 1;
            self.next = Some((seq + 1, at + FRAME_US));
            if now_us.saturating_sub(self.last_underrun_us) > SHRINK_AFTER_US {
                self.underrun_floor_us = self.underrun_floor_us.saturating_sub(1_000).max(MIN_DELAY_US);
            }
            return Some((seq, Playout::Packet(packet)));
        }
        if self.packets.range(seq + 1..).next().is_some() {
            // Lost: later packets are here.
            self.next = Some((seq + 1, at + FRAME_US));
            if let Some(next) = self.packets.get(&(seq + 1)) {
                self.stats.recovered_fec += 1;
                return Some((seq, Playout::Fec(next.clone())));
            }
            self.stats.concealed += 1;
            return Some((seq, Playout::Conceal));
        }
        // Nothing to play: an underrun. Wait a frame; the first of a run makes the delay a
        // frame longer (a pause, which ends in `IDLE_AFTER_US`, gives that frame back).
        if !self.in_underrun {
            self.in_underrun = true;
            self.underrun_frames = 0;
            self.stats.underruns += 1;
            self.underrun_floor_us = (self.underrun_floor_us + FRAME_US).min(MAX_DELAY_US);
        }
        self.underrun_frames += 1;
        self.last_underrun_us = now_us;
        self.next = Some((seq, at + FRAME_US));
        let expand = self.underrun_frames <= MAX_EXPAND_FRAMES && self.last_played.is_some();
        Some((seq, if expand { Playout::Expand } else { Playout::Silence }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn packet(seq: u32) -> AudioPacket {
        AudioPacket { seq, timestamp_us: u64::from(seq) * FRAME_US, opus: vec![seq as u8] }
    }

    /// Plays from `from` to `to` µs in 5 ms steps; returns what was played.
    fn play(jb: &mut JitterBuffer, from: u64, to: u64) -> Vec<(u64, Playout)> {
        let mut out = Vec::new();
        let mut t = from;
        while t <= to {
            while let Some(p) = jb.next(t) {
                out.push(p);
            }
            t += 5_000;
        }
        out
    }

    #[test]
    fn plays_in_order_after_the_delay_and_recovers_a_loss_with_fec() {
        let mut jb = JitterBuffer::new();
        for seq in [10, 12, 11, 13] {
            jb.push(packet(seq), 1_000);
        }
        assert_eq!(jb.next(1_000), None, "not before the delay");
        let first = 1_000 + jb.delay_us();
        let mut played = play(&mut jb, 1_000, first);
        for seq in [15, 16] {
            jb.push(packet(seq), 40_000);
        }
        played.extend(play(&mut jb, first + 5_000, first + 6 * FRAME_US));
        let kinds: Vec<_> = played
            .iter()
            .map(|(seq, p)| match p {
                Playout::Packet(pk) => format!("{seq}:p{}", pk.seq),
                Playout::Fec(pk) => format!("{seq}:f{}", pk.seq),
                Playout::Conceal => format!("{seq}:c"),
                Playout::Expand => format!("{seq}:e"),
                Playout::Silence => format!("{seq}:s"),
            })
            .collect();
        let base = 1u64 << 32;
        let at = |n: u64| base + n;
        assert_eq!(
            kinds[..6],
            [
                format!("{}:p10", at(10)),
                format!("{}:p11", at(11)),
                format!("{}:p12", at(12)),
                format!("{}:p13", at(13)),
                format!("{}:f15", at(14)),
                format!("{}:p15", at(15)),
            ]
        );
        assert_eq!(jb.stats().recovered_fec, 1);
    }

    #[test]
    fn a_burst_is_played_down_to_the_delay() {
        let mut jb = JitterBuffer::new();
        for seq in 0..20 {
            jb.push(packet(seq), 0);
        }
        let played = play(&mut jb, 0, 2_000_000);
        assert!(jb.stats().skipped > 0);
        let sounding =
            played.iter().filter(|(_, p)| !matches!(p, Playout::Silence | Playout::Expand)).count() as u64;
        assert_eq!(sounding + jb.stats().skipped, 20);
        assert_eq!(jb.stats().underruns, 0, "the end of the stream is no underrun");
    }

    #[test]
    fn an_underrun_plays_silence_and_grows_the_delay_then_a_pause_goes_quiet() {
        let mut jb = JitterBuffer::new();
        jb.push(packet(0), 0);
        let before = jb.delay_us();
        let played = play(&mut jb, 0, before + 3 * FRAME_US);
        assert!(matches!(played[0].1, Playout::Packet(_)));
        assert_eq!(played[1].1, Playout::Expand, "the first underrun frames are concealed");
        assert!(played[1 + MAX_EXPAND_FRAMES as usize..].iter().all(|(_, p)| *p == Playout::Silence));
        assert!(jb.delay_us() > before);
        // A late packet is dropped; after a long pause nothing more is played.
        jb.push(packet(0), before + 4 * FRAME_US);
        assert_eq!(jb.stats().late, 1);
        let quiet = play(&mut jb, 2 * IDLE_AFTER_US, 3 * IDLE_AFTER_US);
        assert!(quiet.is_empty(), "{quiet:?}");
        jb.push(packet(500), 3 * IDLE_AFTER_US);
        assert!(matches!(play(&mut jb, 3 * IDLE_AFTER_US, 4 * IDLE_AFTER_US)[0].1, Playout::Packet(_)));
    }

    #[test]
    fn a_late_frame_is_waited_for_not_given_up() {
        let mut jb = JitterBuffer::new();
        jb.push(packet(0), 0);
        let delay = jb.delay_us();
        let first = play(&mut jb, 0, delay + FRAME_US);
        assert_eq!(first.iter().map(|p| p.1.clone()).collect::<Vec<_>>()[1], Playout::Expand);
        jb.push(packet(1), delay + FRAME_US + 5_000);
        let next = play(&mut jb, delay + FRAME_US + 5_000, delay + 3 * FRAME_US);
        assert!(matches!(&next[0].1, Playout::Packet(p) if p.seq == 1), "{next:?}");
        assert_eq!(jb.stats().late, 0);
    }

    #[test]
    fn sequence_numbers_wrap() {
        let mut jb = JitterBuffer::new();
        jb.push(packet(u32::MAX), 0);
        jb.push(packet(0), 0);
        let played = play(&mut jb, 0, 200_000);
        let seqs: Vec<_> = played
            .iter()
            .filter_map(|(_, p)| if let Playout::Packet(p) = p { Some(p.seq) } else { None })
            .collect();
        assert_eq!(seqs, vec![u32::MAX, 0]);
    }

    proptest! {
        /// Any arrival order and timing: every frame is played at most once, in order, and
        /// the buffer stays bounded.
        #[test]
        fn plays_each_frame_once_in_order(arrivals in proptest::collection::vec((0u32..200, 0u64..2_000_000), 1..300)) {
            let mut jb = JitterBuffer::new();
            let mut sorted = arrivals.clone();
            sorted.sort_by_key(|a| a.1);
            let mut last = None;
            let mut t = 0;
            for (seq, at) in sorted {
                while t < at {
                    while let Some((s, p)) = jb.next(t) {
                        if !matches!(p, Playout::Silence | Playout::Expand) {
                            prop_assert!(last.is_none_or(|l| s > l));
                            last = Some(s);
                        }
                    }
                    t += 5_000;
                }
                jb.push(packet(seq), at);
                prop_assert!(jb.packets.len() <= MAX_PACKETS);
            }
        }
    }
}
