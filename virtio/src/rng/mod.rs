//! virtio-rng (entropy device, virtio 1.2, 5.4): one request queue; each request is a chain of
//! device-writable buffers that the device fills from the host's entropy source.
//!
//! The smallest Pleiades device, and the template for the others: `device.rs` holds the state
//! and the [`VirtioDevice`](super::VirtioDevice) implementation, `request.rs` parses a
//! descriptor chain into a typed request, `metrics.rs` counts what happened.

mod device;
mod metrics;
mod request;

pub use device::Rng;
pub use metrics::RngMetrics;
pub use request::{MAX_REQUEST_BYTES, RequestError, RngRequest};
