//! The client's clock: `CLOCK_MONOTONIC` in microseconds.
//!
//! The server stamps `FrameBegin.capture_us` with its own `CLOCK_MONOTONIC`. In every test and
//! benchmark the client and the server share one kernel (also across network namespaces), so
//! reading the same clock here makes `now − capture_us` a true capture-to-present latency.
//! `std::time::Instant` wraps the same clock but exposes no absolute value, hence rustix's
//! safe `clock_gettime`. Across machines the difference is meaningless and only the acks'
//! `decoded_us − received_us` (one clock) is.

use rustix::time::{ClockId, clock_gettime};

/// `CLOCK_MONOTONIC` now, in microseconds.
pub fn monotonic_us() -> u64 {
    let now = clock_gettime(ClockId::Monotonic);
    let secs = u64::try_from(now.tv_sec).unwrap_or(0);
    let micros = u64::try_from(now.tv_nsec).unwrap_or(0) / 1_000;
    secs.saturating_mul(1_000_000).saturating_add(micros)
}

#[cfg(test)]
mod tests {
    #[test]
    fn monotonic_does_not_go_back() {
        let a = super::monotonic_us();
        let b = super::monotonic_us();
        assert!(a > 0 && b >= a);
    }
}
