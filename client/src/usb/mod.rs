//! USB devices the client redirects into the desktop. Each device answers the URBs the guest's
//! `vhci-hcd` submits ([`pleiades_protocol::usbip`]): a real one through libusb
//! ([`libusb::LibusbDevice`], `--usb VID:PID`), or the emulated disk
//! ([`emulated::EmulatedDisk`], `--usb-emulated-disk FILE`) for machines without USB hardware
//! and for demos. Both sit behind [`UsbDevice`]; [`redirect`] announces them on the session's
//! USB channel and runs each on a thread of its own.
//!
//! URBs are asynchronous, as on a real host controller: [`UsbDevice::submit`] starts one and
//! its [`Completion`] comes through [`Completions`] when the device answers — at once for the
//! emulated disk, whenever the device has data for a real one (an interrupt IN URB of a
//! keyboard may wait for minutes, while the other endpoints go on). [`UsbDevice::unlink`]
//! cancels one in flight.

pub mod emulated;
pub mod libusb;
pub mod redirect;
mod transfer;

use std::sync::Arc;

use pleiades_protocol::usbip::{CmdSubmit, Direction, IsoPacket, RetSubmit};
use pleiades_protocol::wire::{MAX_USB_INTERFACES, MAX_USB_NAME, UsbDeviceInfo, UsbSpeed};

/// `-EPIPE`: the endpoint stalled (a request the device does not support).
pub const STALL: i32 = -32;
/// `-ESHUTDOWN`: the device is gone.
pub const GONE: i32 = -108;
/// `-ECONNRESET`: the URB was unlinked (cancelled) before it completed.
pub const UNLINKED: i32 = -104;
/// `-EPROTO`: a transfer error on the bus (CRC, bit stuffing, no answer).
pub const PROTOCOL_ERROR: i32 = -71;
/// `-EOVERFLOW`: the device sent more than the URB asked for.
pub const OVERFLOW: i32 = -75;
/// `-ETIMEDOUT`.
pub const TIMED_OUT: i32 = -110;

/// What the host's policy and the guest's attach need to know of a device before any URB.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    pub vendor_id: u16,
    pub product_id: u16,
    /// `bDeviceClass` (0: the interfaces say).
    pub class: u8,
    /// Each interface's `bInterfaceClass`.
    pub interfaces: Vec<u8>,
    pub speed: UsbSpeed,
    pub product: String,
}

impl DeviceInfo {
    /// The announcement of this device as `id` on the USB channel.
    pub fn announce(&self, id: u32) -> UsbDeviceInfo {
        let mut name: String = self.product.chars().filter(|c| !c.is_control()).collect();
        while name.len() > MAX_USB_NAME {
            name.pop();
        }
        UsbDeviceInfo {
            id,
            vendor_id: self.vendor_id,
            product_id: self.product_id,
            class: self.class,
            interfaces: self.interfaces.iter().copied().take(MAX_USB_INTERFACES).collect(),
            speed: self.speed,
            name,
        }
    }
}

/// One URB's outcome.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Completion {
    /// 0, or a negative errno ([`STALL`], [`UNLINKED`], …).
    pub status: i32,
    /// IN: the bytes read (at most the URB's length; an isochronous URB's packets back to back,
    /// each its `actual_length`); OUT: empty.
    pub data: Vec<u8>,
    /// OUT: the bytes the device took; IN: `data.len()`.
    pub actual_length: u32,
    /// An isochronous URB's packets: offsets and lengths as submitted, with what each moved.
    pub iso: Vec<IsoPacket>,
    /// An isochronous URB's frame and the packets that failed.
    pub start_frame: i32,
    pub error_count: i32,
}

impl Completion {
    pub fn ok_in(data: Vec<u8>) -> Self {
        Self { actual_length: data.len() as u32, data, ..Self::default() }
    }

    pub fn ok_out(taken: u32) -> Self {
        Self { actual_length: taken, ..Self::default() }
    }

    /// Ended with `status` (a negative errno) and nothing moved.
    pub fn failed(status: i32) -> Self {
        Self { status, ..Self::default() }
    }

    pub fn stall() -> Self {
        Self::failed(STALL)
    }

    /// The `RET_SUBMIT` for `urb`: never more than it asked for, its isochronous packets
    /// exactly as many as it had.
    pub fn ret(self, urb: &CmdSubmit) -> RetSubmit {
        let mut data = self.data;
        if urb.direction == Direction::In {
            data.truncate(urb.transfer_buffer_length as usize);
        } else {
            data.clear();
        }
        let actual_length = if urb.direction == Direction::In {
            data.len() as u32
        } else {
            self.actual_length.min(urb.transfer_buffer_length)
        };
        let mut ret = RetSubmit::new(urb.seqnum, self.status, actual_length, data);
        if let Some(packets) = urb.iso_count() {
            let mut iso = self.iso;
            iso.resize(packets as usize, IsoPacket::default());
            for (packet, asked) in iso.iter_mut().zip(&urb.iso) {
                packet.offset = asked.offset;
                packet.length = asked.length;
                packet.actual_length = packet.actual_length.min(asked.length);
            }
            ret.number_of_packets = packets;
            ret.start_frame = self.start_frame;
            ret.error_count = self.error_count;
            ret.iso = iso;
        }
        ret
    }
}

/// What a device tells its redirection, from any thread.
#[derive(Debug)]
pub enum DeviceEvent {
    /// URB `seqnum` ended.
    Done { seqnum: u32, completion: Completion },
    /// The device went away (unplugged on this side, or it broke): its redirection ends.
    Gone { reason: String },
}

/// Where a device hands in its URBs' outcomes. Cheap to clone; any thread may use it (libusb's
/// event thread does).
#[derive(Clone)]
pub struct Completions(Arc<dyn Fn(DeviceEvent) + Send + Sync>);

impl Completions {
    pub fn new(sink: impl Fn(DeviceEvent) + Send + Sync + 'static) -> Self {
        Self(Arc::new(sink))
    }

    /// URB `seqnum` ended with `completion`.
    pub fn complete(&self, seqnum: u32, completion: Completion) {
        (self.0)(DeviceEvent::Done { seqnum, completion });
    }

    /// The device is gone.
    pub fn gone(&self, reason: impl Into<String>) {
        (self.0)(DeviceEvent::Gone { reason: reason.into() });
    }
}

impl std::fmt::Debug for Completions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Completions")
    }
}

/// A device that answers URBs.
pub trait UsbDevice: Send + std::fmt::Debug {
    fn info(&self) -> DeviceInfo;
    /// Where it is on this machine (USB bus and address), for a real device.
    fn location(&self) -> Option<(u8, u8)> {
        None
    }
    /// Its redirection starts: from now on the device may tell `done` that it is gone.
    fn attach(&mut self, _done: &Completions) {}
    /// Starts one URB (control on endpoint 0; bulk, interrupt or isochronous on the others).
    /// Its outcome goes to `done` exactly once, now or later.
    fn submit(&mut self, urb: CmdSubmit, done: &Completions);
    /// Cancels URB `seqnum` if it is still in flight: it then completes with [`UNLINKED`].
    /// One that already completed is left alone (the default: every URB completes at once).
    fn unlink(&mut self, _seqnum: u32) {}
    /// The redirection ends (the session is over, or the device was unplugged): cancel every
    /// URB in flight, and return once none is left, so that the device can serve another
    /// session.
    fn stop(&mut self) {}
    /// The person took it back from the desktop: what stays on the list of devices they may
    /// redirect again (the device itself; a real one is closed instead, which gives it back to
    /// this machine's own drivers, and reopened when chosen again).
    fn park(self: Box<Self>) -> Option<Box<dyn UsbDevice>>;
}
