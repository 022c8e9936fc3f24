//! Frame pacing and path estimates, sans-IO.
//!
//! A remote desktop feels fast when the newest frame arrives soon, not when many frames are
//! queued: a queue of frames in the network or in the client is pure latency. But one frame in
//! flight caps the frame rate at one per round trip (7–8 fps on a 100 ms WAN), so the server
//! keeps as many frames in flight as the path carries — its **bandwidth-delay product** — and no
//! more ([`FramePacer`]), the way BBR sizes a congestion window:
//!
//! - the window is the delivery rate × the path's bare RTT × a gain
//!   ([`PacerConfig::window_gain_percent`], 150 %: the headroom that lets the rate estimate grow
//!   when the source sends more, at most half a round trip of queue when the path is full);
//! - a new frame may go out while the bytes in flight are below the window; one frame may always
//!   be in flight, and before the first ack only one is (nothing is known of the path yet);
//! - at most [`PacerConfig::max_in_flight`] frames are in flight whatever the window says (the
//!   client's decode queue stays short).
//!
//! The server captures and encodes the next frame only when the pacer allows it, so damage
//! accumulates in the capture (latest wins) instead of queueing as frames, and frame rate adapts
//! by itself to the path and the client. A frame whose ack ([`crate::wire::FrameAck`]) does not
//! come within the loss timeout (4 × the frame round trip, at least 200 ms) is written off, so a
//! lost ack or a stalled client never stops the display for good.
//!
//! Estimates, for the window and the encoder:
//! - the path RTT from `Ping`/`Pong` ([`RttEstimator`], RFC 6298 smoothing), and the *frame* round
//!   trip (send → ack, minus the client's decode time) with the same smoothing;
//! - the delivery rate, a windowed maximum of two samples per ack: the bytes acked between the
//!   frame's sending and its ack over that time (the delivery-rate estimation of
//!   draft-cheng-iccrg-delivery-rate-estimation, right when frames are pipelined), and the frame's
//!   own bytes over its transmission time (the frame round trip less the bare RTT, at least an
//!   eighth of the frame round trip, so one small frame raises the estimate at most eightfold
//!   over the rate it achieved: the probe upward when
//!   the source is what limits the rate) — [`FramePacer::target_bitrate`];
//! - the frame rate the window allows ([`FramePacer::target_fps`]).
//!
//! Time is a parameter everywhere (`u64` microseconds on the caller's monotonic clock); times
//! that go backwards are treated as no time passing, so no input can make the pacer panic.

use std::collections::VecDeque;

use crate::wire::FrameAck;

/// RFC 6298 RTT smoothing (α = 1/8, β = 1/4), in microseconds.
#[derive(Debug, Clone, Default)]
pub struct RttEstimator {
    smoothed: Option<u64>,
    variance: u64,
    min: Option<u64>,
    latest: Option<u64>,
    samples: u64,
}

/// RTO before any sample (RFC 6298: 1 s).
const INITIAL_RTO_US: u64 = 1_000_000;
/// Clock granularity term of the RTO.
const GRANULARITY_US: u64 = 1_000;

impl RttEstimator {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one round-trip sample.
    pub fn on_sample(&mut self, rtt_us: u64) {
        self.latest = Some(rtt_us);
        self.samples += 1;
        self.min = Some(self.min.map_or(rtt_us, |min| min.min(rtt_us)));
        match self.smoothed {
            None => {
                self.smoothed = Some(rtt_us);
                self.variance = rtt_us / 2;
            }
            Some(srtt) => {
                self.variance = (3 * (self.variance / 4)).saturating_add(srtt.abs_diff(rtt_us) / 4);
                self.smoothed = Some((7 * (srtt / 8)).saturating_add(rtt_us / 8));
            }
        }
    }

    /// The smoothed RTT, once there is a sample.
    pub fn smoothed(&self) -> Option<u64> {
        self.smoothed
    }

    /// The RTT variation (RFC 6298 `RTTVAR`).
    pub fn variance(&self) -> u64 {
        self.variance
    }

    /// The smallest sample seen: the path's RTT without queueing.
    pub fn min(&self) -> Option<u64> {
        self.min
    }

    pub fn latest(&self) -> Option<u64> {
        self.latest
    }

    pub fn samples(&self) -> u64 {
        self.samples
    }

    /// RFC 6298 retransmission timeout: `SRTT + max(G, 4·RTTVAR)`, 1 s before any sample.
    pub fn rto_us(&self) -> u64 {
        match self.smoothed {
            None => INITIAL_RTO_US,
            Some(srtt) => srtt.saturating_add(GRANULARITY_US.max(self.variance.saturating_mul(4))),
        }
    }
}

/// The pacer's knobs.
#[derive(Debug, Clone)]
pub struct PacerConfig {
    /// Most frames in flight at once, whatever the window allows (1: one frame per round trip).
    pub max_in_flight: usize,
    /// The window over the bandwidth-delay product, in percent (at least 100).
    pub window_gain_percent: u64,
    /// An unacked frame is written off after `loss_timeout_rtts` frame round trips…
    pub loss_timeout_rtts: u64,
    /// …but never sooner than this (µs).
    pub min_loss_timeout_us: u64,
    /// Bounds of [`FramePacer::target_fps`].
    pub min_fps: u32,
    pub max_fps: u32,
    /// How far back the delivery-rate maximum looks (µs).
    pub rate_window_us: u64,
    /// Share of the measured delivery rate the encoder should aim for, in percent.
    pub bitrate_headroom_percent: u64,
}

impl Default for PacerConfig {
    fn default() -> Self {
        Self {
            max_in_flight: 16,
            window_gain_percent: 150,
            loss_timeout_rtts: 4,
            min_loss_timeout_us: 200_000,
            min_fps: 1,
            max_fps: 60,
            rate_window_us: 2_000_000,
            bitrate_headroom_percent: 80,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct InFlight {
    frame_id: u64,
    bytes: u64,
    sent_us: u64,
    /// [`FramePacer::delivered`] and [`FramePacer::delivered_us`] when it was sent.
    delivered: u64,
    delivered_us: u64,
}

/// What one ack taught the pacer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AckSample {
    /// Send → ack, minus the client's decode time (µs).
    pub frame_rtt_us: u64,
    /// This frame's delivery-rate sample (bytes per second).
    pub delivery_rate_bps: u64,
}

/// Keeps a bandwidth-delay product of frames in flight; see the module docs.
///
/// The server's loop: when a frame is ready and [`Self::may_send`] says yes, send it and call
/// [`Self::on_sent`]; on each `FrameAck` call [`Self::on_ack`]; on each `Pong` to its own ping
/// call [`Self::on_pong`]. If `may_send` says no, wake up at [`Self::next_deadline`] at the
/// latest (a written-off frame frees its slot then).
#[derive(Debug, Clone)]
pub struct FramePacer {
    config: PacerConfig,
    in_flight: VecDeque<InFlight>,
    bytes_in_flight: u64,
    /// Bytes of acked frames so far, and when the latest ack came (or the first frame of a
    /// flight went out).
    delivered: u64,
    delivered_us: u64,
    path_rtt: RttEstimator,
    frame_rtt: RttEstimator,
    /// Delivery-rate samples `(time, bytes/s)`, decreasing in rate: the front is the max.
    rates: VecDeque<(u64, u64)>,
    acked: u64,
    lost: u64,
}

/// A frame's transmission time counts as at least this share (1/N) of its round trip.
const MIN_TRANSMISSION_SHARE: u64 = 8;

/// Most delivery-rate samples kept (the window usually holds far fewer).
const MAX_RATE_SAMPLES: usize = 64;

impl Default for FramePacer {
    fn default() -> Self {
        Self::new(PacerConfig::default())
    }
}

impl FramePacer {
    pub fn new(config: PacerConfig) -> Self {
        Self {
            config,
            in_flight: VecDeque::new(),
            bytes_in_flight: 0,
            delivered: 0,
            delivered_us: 0,
            path_rtt: RttEstimator::new(),
            frame_rtt: RttEstimator::new(),
            rates: VecDeque::new(),
            acked: 0,
            lost: 0,
        }
    }

    /// Whether a new frame may be sent now. Writes off frames past the loss timeout first.
    pub fn may_send(&mut self, now_us: u64) -> bool {
        self.expire(now_us);
        if self.in_flight.is_empty() {
            return true;
        }
        if self.in_flight.len() >= self.config.max_in_flight.max(1) {
            return false;
        }
        self.window_bytes().is_some_and(|window| self.bytes_in_flight < window)
    }

    /// The window (bytes): delivery rate × bare RTT × gain, once both are measured.
    pub fn window_bytes(&self) -> Option<u64> {
        let rate = self.delivery_rate_bps()?;
        let rtt = match (self.path_rtt.min(), self.frame_rtt.min()) {
            (Some(path), Some(frame)) => path.min(frame),
            (path, frame) => path.or(frame)?,
        };
        let bdp = u128::from(rate) * u128::from(rtt) / 1_000_000;
        let gain = u128::from(self.config.window_gain_percent.max(100));
        Some(u64::try_from(bdp * gain / 100).unwrap_or(u64::MAX))
    }

    /// Bytes of the frames in flight.
    pub fn bytes_in_flight(&self) -> u64 {
        self.bytes_in_flight
    }

    /// Records a frame just sent (all of its messages, `bytes` in total on the wire).
    pub fn on_sent(&mut self, frame_id: u64, bytes: u64, now_us: u64) {
        if self.in_flight.is_empty() {
            // A new flight: its delivery interval starts now, not at the last ack long ago.
            self.delivered_us = now_us;
        }
        self.in_flight.push_back(InFlight {
            frame_id,
            bytes,
            sent_us: now_us,
            delivered: self.delivered,
            delivered_us: self.delivered_us,
        });
        self.bytes_in_flight = self.bytes_in_flight.saturating_add(bytes);
        // A caller that ignores `may_send` must not grow this without bound.
        while self.in_flight.len() > self.config.max_in_flight.max(1) * 16 {
            if let Some(frame) = self.in_flight.pop_front() {
                self.bytes_in_flight = self.bytes_in_flight.saturating_sub(frame.bytes);
            }
            self.lost += 1;
        }
    }

    /// Records the client's ack of a frame, received at `now_us`. Acks of frames not in flight
    /// (written off already, or never sent) are ignored and return `None`.
    pub fn on_ack(&mut self, ack: &FrameAck, now_us: u64) -> Option<AckSample> {
        let index = self.in_flight.iter().position(|f| f.frame_id == ack.frame_id)?;
        let frame = self.in_flight.remove(index)?;
        self.bytes_in_flight = self.bytes_in_flight.saturating_sub(frame.bytes);
        self.acked += 1;
        self.delivered = self.delivered.saturating_add(frame.bytes);
        self.delivered_us = self.delivered_us.max(now_us);
        let client_delay = ack.decoded_us.saturating_sub(ack.received_us);
        let elapsed = now_us.saturating_sub(frame.sent_us);
        let frame_rtt_us = elapsed.saturating_sub(client_delay).max(1);
        self.frame_rtt.on_sample(frame_rtt_us);
        // The transmission part of the delivery time: without the path's bare RTT, which is
        // exact when nothing queued (and an underestimate of the rate when something did), but
        // at least an eighth of the round trip, so a small frame or jitter on an idle path at
        // most multiplies the rate the frame achieved by eight.
        let bare_rtt = self.path_rtt.min().unwrap_or(0);
        let interval =
            frame_rtt_us.saturating_sub(bare_rtt).max(frame_rtt_us / MIN_TRANSMISSION_SHARE).max(1);
        let frame_rate = u128::from(frame.bytes) * 1_000_000 / u128::from(interval);
        // Everything acked while this frame was out, over that time: the pipelined rate.
        let flight_interval = now_us.saturating_sub(frame.delivered_us).saturating_sub(client_delay).max(1);
        let flight_rate = u128::from(self.delivered.saturating_sub(frame.delivered)) * 1_000_000
            / u128::from(flight_interval.max(frame_rtt_us));
        let delivery_rate_bps = u64::try_from(frame_rate.max(flight_rate)).unwrap_or(u64::MAX);
        self.add_rate(now_us, delivery_rate_bps);
        Some(AckSample { frame_rtt_us, delivery_rate_bps })
    }

    /// Records the answer to one of our pings (`pong.sent_us` is our own clock, echoed).
    pub fn on_pong(&mut self, sent_us: u64, now_us: u64) {
        if now_us >= sent_us {
            self.path_rtt.on_sample((now_us - sent_us).max(1));
        }
    }

    /// How long an unacked frame stays in flight (µs): `loss_timeout_rtts` × the larger of the
    /// smoothed frame and path RTTs, at least `min_loss_timeout_us`; 1 s before any sample.
    pub fn loss_timeout_us(&self) -> u64 {
        let rtt = match (self.frame_rtt.smoothed(), self.path_rtt.smoothed()) {
            (None, None) => return INITIAL_RTO_US.max(self.config.min_loss_timeout_us),
            (a, b) => a.unwrap_or(0).max(b.unwrap_or(0)),
        };
        rtt.saturating_mul(self.config.loss_timeout_rtts).max(self.config.min_loss_timeout_us)
    }

    /// When the oldest frame in flight will be written off, if any is in flight: the latest
    /// time to call [`Self::may_send`] again.
    pub fn next_deadline(&self) -> Option<u64> {
        self.in_flight.front().map(|f| f.sent_us.saturating_add(self.loss_timeout_us()))
    }

    /// Frames sent and neither acked nor written off yet.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Frames acked so far.
    pub fn acked_frames(&self) -> u64 {
        self.acked
    }

    /// Frames written off so far (no ack within the loss timeout).
    pub fn lost_frames(&self) -> u64 {
        self.lost
    }

    /// The path RTT from pings.
    pub fn path_rtt(&self) -> &RttEstimator {
        &self.path_rtt
    }

    /// The frame round trip from acks (send → ack minus client decode time).
    pub fn frame_rtt(&self) -> &RttEstimator {
        &self.frame_rtt
    }

    /// The highest delivery rate in the window (bytes per second), once a frame was acked.
    pub fn delivery_rate_bps(&self) -> Option<u64> {
        self.rates.front().map(|&(_, rate)| rate)
    }

    /// The bitrate the encoder should aim for (bits per second): the headroom share of the
    /// delivery rate. `None` until a frame was acked (the encoder uses its own default).
    pub fn target_bitrate(&self) -> Option<u64> {
        self.delivery_rate_bps()
            .map(|rate| rate.saturating_mul(8) / 100 * self.config.bitrate_headroom_percent.min(100))
    }

    /// The frame rate the window sustains: the frames of the average size acked so far that
    /// fit the window (at least one, at most `max_in_flight`), per frame round trip, within
    /// `min_fps..=max_fps`; `max_fps` before any ack.
    pub fn target_fps(&self) -> u32 {
        let (min, max) = (self.config.min_fps.max(1), self.config.max_fps.max(1));
        let Some(frame_rtt) = self.frame_rtt.smoothed() else { return max };
        let mean_frame = self.delivered / self.acked.max(1);
        let frames = self
            .window_bytes()
            .map_or(1, |window| window / mean_frame.max(1))
            .clamp(1, self.config.max_in_flight.max(1) as u64);
        let fps = frames.saturating_mul(1_000_000) / frame_rtt.max(1);
        u32::try_from(fps).unwrap_or(u32::MAX).clamp(min.min(max), max)
    }

    fn expire(&mut self, now_us: u64) {
        let timeout = self.loss_timeout_us();
        let before = self.in_flight.len();
        self.in_flight.retain(|f| now_us.saturating_sub(f.sent_us) < timeout);
        self.bytes_in_flight = self.in_flight.iter().fold(0, |sum, f| sum.saturating_add(f.bytes));
        let lost = before - self.in_flight.len();
        if lost > 0 {
            self.lost += lost as u64;
            // A written-off frame means the path could not deliver what we thought: halve the
            // rate estimate so the encoder backs off instead of repeating the loss.
            if let Some(rate) = self.delivery_rate_bps() {
                self.rates.clear();
                self.rates.push_back((now_us, rate / 2));
            }
        }
    }

    fn add_rate(&mut self, now_us: u64, rate: u64) {
        let horizon = now_us.saturating_sub(self.config.rate_window_us);
        while self.rates.front().is_some_and(|&(t, _)| t < horizon) {
            self.rates.pop_front();
        }
        while self.rates.back().is_some_and(|&(_, r)| r <= rate) {
            self.rates.pop_back();
        }
        self.rates.push_back((now_us, rate));
        while self.rates.len() > MAX_RATE_SAMPLES {
            self.rates.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ack(frame_id: u64) -> FrameAck {
        FrameAck { frame_id, scanout: 0, received_us: 0, decoded_us: 0 }
    }

    #[test]
    fn rtt_follows_rfc6298() {
        let mut rtt = RttEstimator::new();
        assert_eq!(rtt.rto_us(), 1_000_000);
        rtt.on_sample(100_000);
        assert_eq!(rtt.smoothed(), Some(100_000));
        assert_eq!(rtt.variance(), 50_000);
        assert_eq!(rtt.rto_us(), 300_000);
        rtt.on_sample(200_000);
        // RTTVAR = 3/4·50 000 + 1/4·100 000; SRTT = 7/8·100 000 + 1/8·200 000.
        assert_eq!(rtt.variance(), 62_500);
        assert_eq!(rtt.smoothed(), Some(112_500));
        assert_eq!(rtt.min(), Some(100_000));
    }

    #[test]
    fn one_frame_in_flight() {
        let mut pacer = FramePacer::default();
        assert!(pacer.may_send(0));
        pacer.on_sent(1, 10_000, 0);
        assert!(!pacer.may_send(1_000));
        let sample =
            pacer.on_ack(&FrameAck { frame_id: 1, scanout: 0, received_us: 50, decoded_us: 2_050 }, 22_000);
        // 22 ms send → ack, 2 ms of it decoding on the client.
        assert_eq!(sample.unwrap().frame_rtt_us, 20_000);
        assert!(pacer.may_send(22_000));
        assert_eq!(pacer.on_ack(&ack(1), 23_000), None, "a second ack is ignored");
        assert_eq!(pacer.acked_frames(), 1);
    }

    #[test]
    fn a_lost_ack_does_not_stall() {
        let mut pacer = FramePacer::default();
        pacer.on_sent(1, 1_000, 0);
        assert_eq!(pacer.next_deadline(), Some(1_000_000), "1 s before any RTT sample");
        assert!(!pacer.may_send(999_999));
        assert!(pacer.may_send(1_000_000));
        assert_eq!(pacer.lost_frames(), 1);
        // With a 10 ms RTT the timeout is the 200 ms floor.
        pacer.on_pong(2_000_000, 2_010_000);
        pacer.on_sent(2, 1_000, 3_000_000);
        assert_eq!(pacer.loss_timeout_us(), 200_000);
        assert!(!pacer.may_send(3_199_999));
        assert!(pacer.may_send(3_200_000));
        // A late ack of a written-off frame teaches nothing.
        assert_eq!(pacer.on_ack(&ack(2), 3_300_000), None);
    }

    #[test]
    fn estimates_for_the_encoder() {
        let mut pacer = FramePacer::default();
        assert_eq!(pacer.target_bitrate(), None);
        assert_eq!(pacer.target_fps(), 60);
        pacer.on_pong(0, 20_000); // bare RTT 20 ms
        // 100 kB frames acked 70 ms after sending: 50 ms of transmission → 2 MB/s.
        let mut now = 100_000;
        for id in 0..10 {
            assert!(pacer.may_send(now));
            pacer.on_sent(id, 100_000, now);
            now += 70_000;
            pacer.on_ack(&ack(id), now);
        }
        assert_eq!(pacer.delivery_rate_bps(), Some(2_000_000));
        assert_eq!(pacer.target_bitrate(), Some(12_800_000)); // 80 % of 16 Mbit/s
        assert_eq!(pacer.target_fps(), 14); // one frame per 70 ms
        // A write-off halves the rate estimate.
        pacer.on_sent(99, 100_000, now);
        assert!(pacer.may_send(now + 10_000_000));
        assert_eq!(pacer.delivery_rate_bps(), Some(1_000_000));
    }

    /// A source of `frame_bytes` frames at `fps` (damage accumulates while the pacer says no:
    /// at most one frame waits) over a FIFO link of `rate_bps` bits/s and `rtt_us`, for
    /// `seconds`. Returns, over the second half: (frames sent per second, bits/s sent, the
    /// largest frame round trip).
    fn simulate(
        config: PacerConfig,
        fps: u64,
        frame_bytes: u64,
        rate_bps: u64,
        rtt_us: u64,
        seconds: u64,
    ) -> (f64, f64, u64) {
        let mut pacer = FramePacer::new(config);
        pacer.on_pong(0, rtt_us);
        let (mut link_free, mut next_frame, mut pending, mut id) = (0u64, 0u64, false, 0u64);
        let mut acks: VecDeque<(u64, u64)> = VecDeque::new();
        let half = seconds * 500_000;
        let (mut frames, mut bytes, mut worst) = (0u64, 0u64, 0u64);
        for now in (rtt_us..seconds * 1_000_000).step_by(500) {
            while acks.front().is_some_and(|&(at, _)| at <= now) {
                let (_, frame) = acks.pop_front().unwrap();
                if let Some(sample) = pacer.on_ack(&ack(frame), now)
                    && now > half
                {
                    worst = worst.max(sample.frame_rtt_us);
                }
            }
            if now >= next_frame {
                pending = true;
                next_frame += 1_000_000 / fps;
            }
            if pending && pacer.may_send(now) {
                pending = false;
                id += 1;
                pacer.on_sent(id, frame_bytes, now);
                link_free = link_free.max(now) + frame_bytes * 8 * 1_000_000 / rate_bps;
                acks.push_back((link_free + rtt_us, id));
                if now > half {
                    frames += 1;
                    bytes += frame_bytes;
                }
            }
        }
        let span = (seconds * 1_000_000 - half) as f64 / 1e6;
        (frames as f64 / span, bytes as f64 * 8.0 / span, worst)
    }

    #[test]
    fn a_long_path_keeps_the_source_frame_rate() {
        // 30 fps of 15 kB (3.6 Mbit/s) over 100 ms and 10 Mbit/s.
        let (fps, _, worst) = simulate(PacerConfig::default(), 30, 15_000, 10_000_000, 100_000, 20);
        assert!(fps > 29.0, "{fps} fps");
        assert!(worst < 120_000, "no queue: {worst} µs");
        // One frame in flight: one per round trip (the figure before pipelining).
        let one = PacerConfig { max_in_flight: 1, ..PacerConfig::default() };
        let (fps, _, _) = simulate(one, 30, 15_000, 10_000_000, 100_000, 20);
        assert!((8.0..9.0).contains(&fps), "{fps} fps");
    }

    #[test]
    fn a_full_path_carries_its_rate_without_a_growing_queue() {
        // 60 fps of 60 kB (28.8 Mbit/s) into 10 Mbit/s at 100 ms.
        let (fps, bps, worst) = simulate(PacerConfig::default(), 60, 60_000, 10_000_000, 100_000, 20);
        assert!(bps > 8_000_000.0 && bps <= 10_100_000.0, "{bps} bit/s, {fps} fps");
        // The queue stays within the window's headroom: half a bandwidth-delay product (50 ms)
        // and the frame being sent (48 ms).
        assert!(worst <= 100_000 + 50_000 + 48_000 + 2_000, "{worst} µs");
    }

    #[derive(Debug, Clone)]
    enum Op {
        Wait(u64),
        Send(u64),
        Ack { id: u64, delay: u64 },
        Pong(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u64..2_000_000).prop_map(Op::Wait),
            (1u64..5_000_000).prop_map(Op::Send),
            (0u64..40, 0u64..100_000).prop_map(|(id, delay)| Op::Ack { id, delay }),
            (0u64..500_000).prop_map(Op::Pong),
        ]
    }

    proptest! {
        /// A caller that sends only when allowed never has more than `max_in_flight` frames
        /// out, never more bytes than the window past the first frame, and is never blocked
        /// longer than the frames in flight take to be written off.
        #[test]
        fn never_stalls_never_overfills(ops in proptest::collection::vec(op(), 1..200), max_in_flight in 1usize..6) {
            let mut pacer = FramePacer::new(PacerConfig { max_in_flight, ..PacerConfig::default() });
            let mut now = 0u64;
            let mut next_id = 0u64;
            for op in ops {
                match op {
                    Op::Wait(us) => now += us,
                    Op::Send(bytes) => {
                        if pacer.may_send(now) {
                            if pacer.in_flight() > 0 {
                                prop_assert!(pacer.bytes_in_flight() < pacer.window_bytes().unwrap_or(0));
                            }
                            pacer.on_sent(next_id, bytes, now);
                            next_id += 1;
                        }
                    }
                    Op::Ack { id, delay } => {
                        let ack = FrameAck { frame_id: id, scanout: 0, received_us: 0, decoded_us: delay };
                        if let Some(sample) = pacer.on_ack(&ack, now) {
                            prop_assert!(sample.frame_rtt_us >= 1);
                        }
                    }
                    Op::Pong(rtt) => pacer.on_pong(now.saturating_sub(rtt), now),
                }
                prop_assert!(pacer.in_flight() <= max_in_flight);
                if let Some(deadline) = pacer.next_deadline() {
                    // Each deadline writes off a frame: by the last one's, a frame may go out.
                    let mut later = pacer.clone();
                    let mut at = deadline.max(now);
                    for _ in 0..=max_in_flight {
                        if later.may_send(at) {
                            break;
                        }
                        at = later.next_deadline().unwrap_or(at).max(at);
                    }
                    prop_assert!(later.may_send(at), "stalled past the deadlines");
                }
                let fps = pacer.target_fps();
                prop_assert!((1..=60).contains(&fps));
            }
        }

        #[test]
        fn smoothed_rtt_stays_within_the_samples(samples in proptest::collection::vec(1u64..10_000_000, 1..50)) {
            let mut rtt = RttEstimator::new();
            for &s in &samples {
                rtt.on_sample(s);
            }
            let lo = *samples.iter().min().unwrap_or(&0);
            let hi = *samples.iter().max().unwrap_or(&0);
            let srtt = rtt.smoothed().unwrap_or(0);
            // Integer division may round down by a few µs per sample.
            prop_assert!(srtt + samples.len() as u64 >= lo && srtt <= hi, "{lo} ≤ {srtt} ≤ {hi}");
            prop_assert!(rtt.rto_us() > srtt);
            prop_assert_eq!(rtt.min(), Some(lo));
        }

        /// Any calls, any times (also backwards): no panic.
        #[test]
        fn arbitrary_calls_never_panic(calls in proptest::collection::vec((0u8..4, any::<u64>(), any::<u64>(), any::<u64>()), 0..100)) {
            let mut pacer = FramePacer::default();
            for (kind, a, b, now) in calls {
                match kind {
                    0 => { pacer.may_send(now); }
                    1 => pacer.on_sent(a, b, now),
                    2 => { pacer.on_ack(&FrameAck { frame_id: a % 4, scanout: 0, received_us: b, decoded_us: a }, now); }
                    _ => pacer.on_pong(a, now),
                }
                let _ = (pacer.target_bitrate(), pacer.target_fps(), pacer.next_deadline());
            }
        }
    }
}
