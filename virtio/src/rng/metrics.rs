//! Counters of the rng device.

use std::sync::atomic::{AtomicU64, Ordering};

/// What the rng device did, for `ctl status` and benchmarks.
#[derive(Debug, Default)]
pub struct RngMetrics {
    pub requests: AtomicU64,
    pub bytes: AtomicU64,
    pub bad_requests: AtomicU64,
}

impl RngMetrics {
    pub(super) fn served(&self, bytes: u32) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(u64::from(bytes), Ordering::Relaxed);
    }

    pub(super) fn refused(&self) -> u64 {
        self.bad_requests.fetch_add(1, Ordering::Relaxed)
    }

    /// A snapshot as JSON.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "requests": self.requests.load(Ordering::Relaxed),
            "bytes": self.bytes.load(Ordering::Relaxed),
            "bad_requests": self.bad_requests.load(Ordering::Relaxed),
        })
    }
}
