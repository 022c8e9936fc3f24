//! Counters of an input device.

use std::sync::atomic::{AtomicU64, Ordering};

/// What an input device did, for `ctl status` and tests.
#[derive(Debug, Default)]
pub struct InputMetrics {
    /// Events written into the guest's eventq buffers.
    pub events_delivered: Counter,
    /// Whole reports (events up to a `SYN_REPORT`) accepted from the host.
    pub reports_queued: Counter,
    /// Events dropped because the guest did not read them in time (the oldest go first).
    pub events_dropped: Counter,
    /// Host events the device cannot send (a type or code not in its `EV_BITS`).
    pub events_refused: Counter,
    /// Events the driver sent on the statusq (keyboard LEDs).
    pub status_events: Counter,
    /// Buffers refused (read-only, too short, outside RAM, broken chain).
    pub bad_buffers: Counter,
}

/// A relaxed atomic counter.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds `n` and returns the value before.
    pub fn add(&self, n: u64) -> u64 {
        self.0.fetch_add(n, Ordering::Relaxed)
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

impl InputMetrics {
    /// A snapshot as JSON.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "events_delivered": self.events_delivered.get(),
            "reports_queued": self.reports_queued.get(),
            "events_dropped": self.events_dropped.get(),
            "events_refused": self.events_refused.get(),
            "status_events": self.status_events.get(),
            "bad_buffers": self.bad_buffers.get(),
        })
    }
}
