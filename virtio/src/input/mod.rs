//! virtio-input (virtio 1.2, 5.8): a keyboard and a tablet (absolute pointer, buttons, wheel).
//!
//! Queue 0 (eventq) carries 8-byte [`InputEvent`]s from the device to the driver in buffers the
//! driver posts; queue 1 (statusq) carries the driver's events to the device (keyboard LEDs),
//! which are consumed and completed. The configuration space ([`config`]) answers the driver's
//! `select`/`subsel` questions: name, serial, ids, and which event types and codes exist.
//!
//! The host feeds events through an [`InputSender`]: they are queued (bounded; the oldest report
//! is dropped and counted when the guest does not read) and delivered as the guest posts
//! buffers. Only whole reports, each ended by `SYN_REPORT`, are delivered.
//!
//! Files as in every device: `device.rs` (state, [`VirtioDevice`](super::VirtioDevice)),
//! `request.rs` (parsing a chain), `metrics.rs`; plus `event.rs` (the event and evdev codes),
//! `config.rs` (the config space), `keymap.rs` (text and key combos to key events) and
//! `events_socket.rs` (the host-side socket a vhost-user backend process receives events on).

pub mod config;
mod device;
pub mod event;
pub mod events_socket;
pub mod keymap;
mod metrics;
mod request;

pub use config::InputIdentity;
pub use device::{Input, InputSender, MAX_PENDING_EVENTS};
pub use event::InputEvent;
pub use metrics::InputMetrics;
pub use request::{EventBuffer, RequestError};
