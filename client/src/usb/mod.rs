//! USB devices the client redirects into the desktop. Each device answers the URBs the guest's
//! `vhci-hcd` submits ([`pleiades_protocol::usbip`]): a real one through libusb, or the
//! emulated disk ([`emulated::EmulatedDisk`], `--usb-emulated-disk FILE`) for machines without
//! USB hardware and for demos. Both sit behind [`UsbDevice`]; [`redirect`] announces them on
//! the session's USB channel and runs each on a thread of its own.

pub mod emulated;
pub mod redirect;

use pleiades_protocol::usbip::{CmdSubmit, Direction, RetSubmit};
use pleiades_protocol::wire::{MAX_USB_INTERFACES, MAX_USB_NAME, UsbDeviceInfo, UsbSpeed};

/// `-EPIPE`: the endpoint stalled (a request the device does not support).
pub const STALL: i32 = -32;
/// `-ESHUTDOWN`: the device is gone.
pub const GONE: i32 = -108;

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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    /// 0, or a negative errno ([`STALL`], …).
    pub status: i32,
    /// IN: the bytes read (at most the URB's length); OUT: empty.
    pub data: Vec<u8>,
    /// OUT: the bytes the device took; IN: `data.len()`.
    pub actual_length: u32,
}

impl Completion {
    pub fn ok_in(data: Vec<u8>) -> Self {
        Self { status: 0, actual_length: data.len() as u32, data }
    }

    pub fn ok_out(taken: u32) -> Self {
        Self { status: 0, data: Vec::new(), actual_length: taken }
    }

    pub fn stall() -> Self {
        Self { status: STALL, data: Vec::new(), actual_length: 0 }
    }

    /// The `RET_SUBMIT` for `urb`.
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
        RetSubmit::new(urb.seqnum, self.status, actual_length, data)
    }
}

/// A device that answers URBs.
pub trait UsbDevice: Send + std::fmt::Debug {
    fn info(&self) -> DeviceInfo;
    /// Runs one URB (control on endpoint 0, bulk or interrupt on the others) to completion.
    fn submit(&mut self, urb: &CmdSubmit) -> Completion;
}
