//! virtio-gpu 2D (virtio 1.2, 5.7): the desktop's display.
//!
//! Queue 0 (controlq) carries the driver's commands: display info and EDID, 2D resources with
//! scatter-gather backing in guest memory, transfers into the host copy, scanouts (up to 16
//! monitors) and flushes. Queue 1 (cursorq) carries the hardware cursor (shape and moves).
//! The configuration space has `events_read`/`events_clear` (the display-change event the host
//! raises to make the guest re-read the display info: resize-guest-to-window) and
//! `num_scanouts`.
//!
//! What the guest shows leaves the device through the [`DisplaySink`]: a flush copies the
//! flushed rectangles of each scanout into the sink and goes on; consumers (the remote-desktop
//! server, a screenshot) take the accumulated damage when they are ready.
//!
//! Served over vhost-user to QEMU (`vhost-user-gpu-pci`), the device also speaks QEMU's
//! vhost-user GPU protocol on the socket QEMU hands over (`VHOST_USER_GPU_SET_SOCKET`): the
//! display layout is then QEMU's (asked with `GET_DISPLAY_INFO`), and scanouts, updates and
//! the cursor are mirrored to QEMU's console.
//!
//! Every guest request is parsed ([`protocol`]) and checked (ids, rectangles, guest addresses,
//! sizes) and answered with the virtio-gpu error response when bad; the host memory a guest can
//! make the device allocate is capped ([`GpuLimits`]).
//!
//! Files: `protocol.rs` (wire format, parser), `resources.rs` (2D resources, backing, limits),
//! `sink.rs` (the display sink), `device.rs` (state, [`VirtioDevice`](super::VirtioDevice)).

mod device;
pub mod edid;
pub mod protocol;
pub mod resources;
pub mod sink;

pub use device::{Gpu, GpuConfig, GpuHandle, GpuMetrics, LayoutError, MAX_DISPLAY, MIN_DISPLAY};
pub use resources::GpuLimits;
pub use sink::{Cursor, Damage, DisplaySink, Framebuffer, monotonic_us};
