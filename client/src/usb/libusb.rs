//! This machine's real USB devices, through libusb (`rusb`; libusb is built in, so a thin
//! client needs no libusb package).
//!
//! - [`list`]: the devices present (hubs left out: they are never redirected), with what the
//!   host's policy looks at.
//! - [`open_matching`]: opens the devices that a rule set selects (`--usb VID:PID,class=08`,
//!   the connection file's `usb_auto`).
//! - [`LibusbDevice`]: one opened device behind [`UsbDevice`]. Opening claims every interface
//!   of its configuration, detaching this machine's own kernel drivers (a stick's
//!   `usb-storage`: its `/dev/sdX` goes away here while the desktop has it); closing gives them
//!   back. URBs become libusb asynchronous transfers ([`super::transfer`]): control, bulk,
//!   interrupt and isochronous, many in flight, each cancellable by the guest's `CMD_UNLINK`.
//!   The standard requests that change the device's state for every user of it
//!   (`SET_CONFIGURATION`, `SET_INTERFACE`, `CLEAR_FEATURE(ENDPOINT_HALT)`) go through libusb's
//!   own calls, as Linux's USB/IP server does, so that libusb and this machine's kernel know.
//! - [`Watcher`]: hot-plug: devices plugged in while a session runs that match the rules.
//!
//! Each opened device has its own libusb context and an event thread that completes its
//! transfers; a device pulled out ends its redirection (libusb's hot-plug "left" event, or a
//! transfer that finds no device).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, channel};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pleiades_protocol::usb::UsbPolicy;
use pleiades_protocol::usbip::{CmdSubmit, Direction, IsoPacket};
use pleiades_protocol::wire::UsbSpeed;
use rusb::{Context, Device, DeviceHandle, TransferType, UsbContext, ffi};

use super::transfer::{Finished, InFlight, Kind, Request};
use super::{
    Completion, Completions, DeviceInfo, GONE, OVERFLOW, PROTOCOL_ERROR, STALL, TIMED_OUT, UNLINKED,
    UsbDevice,
};

/// USB/IP's `transfer_flags` this side honours (Linux's URB flags).
const URB_SHORT_NOT_OK: u32 = 0x0001;
const URB_ZERO_PACKET: u32 = 0x0040;
/// `-EINVAL`: an URB this side cannot run as asked.
const INVALID: i32 = -22;
/// The hub class: hubs are never offered.
const HUB_CLASS: u8 = 0x09;
/// How long [`UsbDevice::stop`] waits for cancelled transfers.
const CANCEL_BOUND: Duration = Duration::from_secs(2);
/// How often the event threads look at their stop flag.
const EVENT_SLICE: Duration = Duration::from_millis(100);

/// Why a device cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum LibusbError {
    #[error("libusb: {0}")]
    Libusb(#[from] rusb::Error),
    #[error("USB device {bus:03}/{address:03} is not there any more")]
    NotFound { bus: u8, address: u8 },
    #[error(
        "cannot claim interface {interface} of USB device {usb_id}: {error} (is another program using it? \
         Opening a device needs write access to /dev/bus/usb: run as root or add a udev rule)"
    )]
    Claim { usb_id: String, interface: u8, error: rusb::Error },
}

/// A device present on this machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Present {
    pub bus: u8,
    pub address: u8,
    pub info: DeviceInfo,
}

fn speed(speed: rusb::Speed) -> UsbSpeed {
    match speed {
        rusb::Speed::Low => UsbSpeed::Low,
        rusb::Speed::Full => UsbSpeed::Full,
        rusb::Speed::Super => UsbSpeed::Super,
        rusb::Speed::SuperPlus => UsbSpeed::SuperPlus,
        _ => UsbSpeed::High,
    }
}

/// What the policy looks at, from the descriptors (no need to open the device). The product
/// name is `vvvv:pppp` until the device is opened and names itself.
fn describe(device: &Device<Context>) -> Result<DeviceInfo, rusb::Error> {
    let descriptor = device.device_descriptor()?;
    let interfaces = match device.active_config_descriptor().or_else(|_| device.config_descriptor(0)) {
        Ok(config) => {
            config.interfaces().filter_map(|i| i.descriptors().next().map(|alt| alt.class_code())).collect()
        }
        Err(_) => Vec::new(),
    };
    Ok(DeviceInfo {
        vendor_id: descriptor.vendor_id(),
        product_id: descriptor.product_id(),
        class: descriptor.class_code(),
        interfaces,
        speed: speed(device.speed()),
        product: format!("{:04x}:{:04x}", descriptor.vendor_id(), descriptor.product_id()),
    })
}

/// The devices present, hubs left out.
pub fn list() -> Result<Vec<Present>, LibusbError> {
    let context = Context::new()?;
    let mut present = Vec::new();
    for device in context.devices()?.iter() {
        let Ok(info) = describe(&device) else { continue };
        if info.class == HUB_CLASS {
            continue;
        }
        present.push(Present { bus: device.bus_number(), address: device.address(), info });
    }
    Ok(present)
}

/// Whether `rules` select `info` (the same grammar as the pools' policy).
pub fn selects(rules: &UsbPolicy, info: &DeviceInfo) -> bool {
    info.class != HUB_CLASS && rules.allows(&info.announce(0))
}

/// Opens every present device that `rules` select; each one that cannot be opened is
/// skipped with a warning that says why.
pub fn open_matching(rules: &UsbPolicy) -> Result<Vec<LibusbDevice>, LibusbError> {
    let mut opened = Vec::new();
    for present in list()? {
        if !selects(rules, &present.info) {
            continue;
        }
        match LibusbDevice::open(present.bus, present.address) {
            Ok(device) => opened.push(device),
            Err(e) => {
                tracing::warn!(bus = present.bus, address = present.address, "USB device not redirected: {e}")
            }
        }
    }
    Ok(opened)
}

/// A libusb context's event handling on a thread of its own, until dropped.
#[derive(Debug)]
struct EventThread {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl EventThread {
    fn start(context: &Context, name: String) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let (context, flag) = (context.clone(), stop.clone());
        let thread = std::thread::Builder::new().name(name).spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                if let Err(e) = context.handle_events(Some(EVENT_SLICE))
                    && e != rusb::Error::Interrupted
                {
                    tracing::warn!("libusb event handling: {e}");
                    std::thread::sleep(EVENT_SLICE);
                }
            }
        })?;
        Ok(Self { stop, thread: Some(thread) })
    }
}

impl Drop for EventThread {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Tells the redirection when the device is pulled out.
struct Unplugged {
    bus: u8,
    address: u8,
    sink: Arc<Mutex<Option<Completions>>>,
}

impl rusb::Hotplug<Context> for Unplugged {
    fn device_arrived(&mut self, _device: Device<Context>) {}

    fn device_left(&mut self, device: Device<Context>) {
        if (device.bus_number(), device.address()) == (self.bus, self.address)
            && let Some(sink) = self.sink.lock().unwrap_or_else(|p| p.into_inner()).as_ref()
        {
            sink.gone("unplugged from this machine");
        }
    }
}

/// One real device, opened and claimed.
pub struct LibusbDevice {
    // Dropped in this order: the hot-plug registration, the event thread (after `stop`
    // cancelled every transfer), then the handle (releasing the interfaces gives this
    // machine's drivers the device back).
    _unplugged: Option<rusb::Registration<Context>>,
    _events: EventThread,
    handle: Arc<DeviceHandle<Context>>,
    in_flight: Arc<InFlight>,
    info: DeviceInfo,
    bus: u8,
    address: u8,
    /// The interfaces claimed (those of the active configuration).
    claimed: Vec<u8>,
    /// Each interface's alternate setting.
    alternates: HashMap<u8, u8>,
    /// Endpoint address → its transfer type, for the current configuration and settings.
    endpoints: HashMap<u8, TransferType>,
    sink: Arc<Mutex<Option<Completions>>>,
}

impl std::fmt::Debug for LibusbDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LibusbDevice")
            .field("bus", &self.bus)
            .field("address", &self.address)
            .field("info", &self.info)
            .field("in_flight", &self.in_flight)
            .finish()
    }
}

impl LibusbDevice {
    /// Opens the device at `bus`/`address` and claims its interfaces (detaching this machine's
    /// drivers from them).
    pub fn open(bus: u8, address: u8) -> Result<Self, LibusbError> {
        let context = Context::new()?;
        let device = context
            .devices()?
            .iter()
            .find(|d| (d.bus_number(), d.address()) == (bus, address))
            .ok_or(LibusbError::NotFound { bus, address })?;
        let mut info = describe(&device)?;
        let handle = device.open()?;
        let descriptor = device.device_descriptor()?;
        if let Ok(name) = handle.read_product_string_ascii(&descriptor)
            && !name.trim().is_empty()
        {
            info.product = name.trim().to_owned();
        }
        // Not every platform can; where it cannot, claiming fails below and says so.
        let _ = handle.set_auto_detach_kernel_driver(true);
        let sink: Arc<Mutex<Option<Completions>>> = Arc::default();
        let unplugged = if rusb::has_hotplug() {
            rusb::HotplugBuilder::new()
                .vendor_id(info.vendor_id)
                .product_id(info.product_id)
                .enumerate(false)
                .register(&context, Box::new(Unplugged { bus, address, sink: sink.clone() }))
                .map_err(|e| tracing::warn!("no hot-plug events for USB device {bus:03}/{address:03}: {e}"))
                .ok()
        } else {
            None
        };
        let events = EventThread::start(&context, format!("usb-events-{bus}-{address}"))
            .map_err(|_| rusb::Error::NoMem)?;
        let mut device = LibusbDevice {
            _unplugged: unplugged,
            _events: events,
            handle: Arc::new(handle),
            in_flight: Arc::default(),
            info,
            bus,
            address,
            claimed: Vec::new(),
            alternates: HashMap::new(),
            endpoints: HashMap::new(),
            sink,
        };
        device.claim_all()?;
        tracing::info!(
            bus,
            address,
            usb_id = format!("{:04x}:{:04x}", device.info.vendor_id, device.info.product_id),
            name = device.info.product,
            interfaces = ?device.claimed,
            "opened a USB device"
        );
        Ok(device)
    }

    fn usb_id(&self) -> String {
        format!("{:04x}:{:04x}", self.info.vendor_id, self.info.product_id)
    }

    /// Claims every interface of the active configuration.
    fn claim_all(&mut self) -> Result<(), LibusbError> {
        let config = self.handle.device().active_config_descriptor()?;
        for interface in config.interfaces() {
            let number = interface.number();
            if let Err(error) = self.handle.claim_interface(number) {
                return Err(LibusbError::Claim { usb_id: self.usb_id(), interface: number, error });
            }
            self.claimed.push(number);
        }
        self.alternates.clear();
        self.map_endpoints();
        Ok(())
    }

    fn release_all(&mut self) {
        for number in std::mem::take(&mut self.claimed) {
            let _ = self.handle.release_interface(number);
        }
    }

    /// Rebuilds the endpoint table from the active configuration and alternate settings.
    fn map_endpoints(&mut self) {
        self.endpoints.clear();
        let Ok(config) = self.handle.device().active_config_descriptor() else { return };
        for interface in config.interfaces() {
            let alternate = self.alternates.get(&interface.number()).copied().unwrap_or(0);
            if let Some(setting) = interface.descriptors().find(|d| d.setting_number() == alternate) {
                for endpoint in setting.endpoint_descriptors() {
                    self.endpoints.insert(endpoint.address(), endpoint.transfer_type());
                }
            }
        }
    }

    /// The standard requests that change the device for every user of it: run through libusb
    /// (synchronously: they are quick and rare). `None`: not one of them.
    fn standard_request(&mut self, setup: [u8; 8]) -> Option<Completion> {
        let (request_type, request) = (setup[0], setup[1]);
        let value = u16::from_le_bytes([setup[2], setup[3]]);
        let index = u16::from_le_bytes([setup[4], setup[5]]);
        let result = match (request_type, request) {
            // SET_CONFIGURATION: the device is already configured when it is announced; only
            // a different configuration changes anything.
            (0x00, 9) => {
                let wanted = value as u8;
                if self.handle.active_configuration().ok() == Some(wanted) {
                    Ok(())
                } else {
                    self.release_all();
                    let set = self.handle.set_active_configuration(wanted);
                    let claimed = self.claim_all().map_err(|e| {
                        tracing::warn!("after SET_CONFIGURATION {wanted}: {e}");
                        rusb::Error::Busy
                    });
                    set.and(claimed)
                }
            }
            // SET_INTERFACE.
            (0x01, 11) => {
                let (interface, alternate) = (index as u8, value as u8);
                let set = self.handle.set_alternate_setting(interface, alternate);
                if set.is_ok() {
                    self.alternates.insert(interface, alternate);
                    self.map_endpoints();
                }
                set
            }
            // CLEAR_FEATURE(ENDPOINT_HALT).
            (0x02, 1) if value == 0 => self.handle.clear_halt(index as u8),
            _ => return None,
        };
        Some(match result {
            Ok(()) => Completion::ok_out(0),
            Err(rusb::Error::NoDevice) => Completion::failed(GONE),
            Err(e) => {
                tracing::debug!(?setup, "a standard request failed: {e}");
                Completion::stall()
            }
        })
    }
}

/// The libusb transfer for `urb` on a device with `endpoints` (address → type), or the status
/// it fails with at once.
fn request(urb: &CmdSubmit, endpoints: &HashMap<u8, TransferType>) -> Result<Request, i32> {
    let mut flags = 0;
    if urb.transfer_flags & URB_SHORT_NOT_OK != 0 && urb.direction == Direction::In {
        flags |= ffi::constants::LIBUSB_TRANSFER_SHORT_NOT_OK;
    }
    if urb.transfer_flags & URB_ZERO_PACKET != 0 {
        flags |= ffi::constants::LIBUSB_TRANSFER_ADD_ZERO_PACKET;
    }
    let length = urb.transfer_buffer_length as usize;
    if urb.ep == 0 {
        // The setup packet says how much the data stage moves.
        let w_length = usize::from(u16::from_le_bytes([urb.setup[6], urb.setup[7]]));
        let mut buffer = Vec::with_capacity(8 + w_length);
        buffer.extend_from_slice(&urb.setup);
        if urb.direction == Direction::Out {
            buffer.extend_from_slice(&urb.data[..urb.data.len().min(w_length)]);
        }
        buffer.resize(8 + w_length, 0);
        return Ok(Request {
            seqnum: urb.seqnum,
            kind: Kind::Control,
            endpoint: 0,
            flags,
            buffer,
            iso_lengths: Vec::new(),
        });
    }
    let endpoint = urb.ep as u8 | if urb.direction == Direction::In { 0x80 } else { 0 };
    let declared = endpoints.get(&endpoint).copied();
    if urb.iso_count().is_some() || declared == Some(TransferType::Isochronous) {
        if urb.iso.is_empty() || declared != Some(TransferType::Isochronous) {
            return Err(INVALID);
        }
        // libusb lays the packets back to back; USB/IP gives each an offset.
        let lengths: Vec<u32> = urb.iso.iter().map(|p| p.length).collect();
        let total: usize = lengths.iter().map(|&l| l as usize).sum();
        if total > length {
            return Err(INVALID);
        }
        let buffer = if urb.direction == Direction::Out {
            let mut buffer = Vec::with_capacity(total);
            for packet in &urb.iso {
                let (start, end) = (packet.offset as usize, packet.offset as usize + packet.length as usize);
                buffer.extend_from_slice(urb.data.get(start..end).ok_or(INVALID)?);
            }
            buffer
        } else {
            vec![0; total]
        };
        return Ok(Request {
            seqnum: urb.seqnum,
            kind: Kind::Isochronous,
            endpoint,
            flags,
            buffer,
            iso_lengths: lengths,
        });
    }
    let kind = match declared {
        Some(TransferType::Interrupt) => Kind::Interrupt,
        Some(TransferType::Bulk) => Kind::Bulk,
        // Not an endpoint of the current settings: the device would not answer.
        _ => return Err(STALL),
    };
    let buffer = if urb.direction == Direction::Out { urb.data.clone() } else { vec![0; length] };
    Ok(Request { seqnum: urb.seqnum, kind, endpoint, flags, buffer, iso_lengths: Vec::new() })
}

/// libusb's transfer status as the errno Linux gives an URB.
fn errno(status: i32) -> i32 {
    match status {
        ffi::constants::LIBUSB_TRANSFER_COMPLETED => 0,
        ffi::constants::LIBUSB_TRANSFER_STALL => STALL,
        ffi::constants::LIBUSB_TRANSFER_CANCELLED => UNLINKED,
        ffi::constants::LIBUSB_TRANSFER_NO_DEVICE => GONE,
        ffi::constants::LIBUSB_TRANSFER_OVERFLOW => OVERFLOW,
        ffi::constants::LIBUSB_TRANSFER_TIMED_OUT => TIMED_OUT,
        _ => PROTOCOL_ERROR,
    }
}

/// A finished transfer as the URB's completion.
fn completion(kind: Kind, direction: Direction, lengths: &[u32], finished: Finished) -> Completion {
    let status = errno(finished.status);
    let Finished { actual_length, mut buffer, iso, .. } = finished;
    match kind {
        Kind::Isochronous => {
            // Each packet's bytes sit at its place in libusb's buffer; USB/IP wants the IN
            // packets' actual bytes back to back.
            let mut data = Vec::new();
            let mut packets = Vec::with_capacity(iso.len());
            let mut at = 0usize;
            for (&(actual, packet_status), &length) in iso.iter().zip(lengths) {
                let actual = actual.min(length);
                if direction == Direction::In
                    && let Some(bytes) = buffer.get(at..at + actual as usize)
                {
                    data.extend_from_slice(bytes);
                }
                packets.push(IsoPacket {
                    offset: 0,
                    length,
                    actual_length: actual,
                    status: errno(packet_status) as u32,
                });
                at += length as usize;
            }
            let error_count = packets.iter().filter(|p| p.status != 0).count() as i32;
            let actual = packets.iter().map(|p| p.actual_length).sum();
            Completion { status, data, actual_length: actual, iso: packets, start_frame: 0, error_count }
        }
        Kind::Control => {
            let data = if direction == Direction::In {
                buffer.drain(..8.min(buffer.len()));
                buffer.truncate(actual_length);
                buffer
            } else {
                Vec::new()
            };
            Completion { status, actual_length: actual_length as u32, data, ..Completion::default() }
        }
        Kind::Bulk | Kind::Interrupt => {
            let data = if direction == Direction::In {
                buffer.truncate(actual_length);
                buffer
            } else {
                Vec::new()
            };
            Completion { status, actual_length: actual_length as u32, data, ..Completion::default() }
        }
    }
}

impl UsbDevice for LibusbDevice {
    fn info(&self) -> DeviceInfo {
        self.info.clone()
    }

    fn location(&self) -> Option<(u8, u8)> {
        Some((self.bus, self.address))
    }

    /// Closed: this machine's drivers get it back; `LibusbDevice::open` takes it again.
    fn park(self: Box<Self>) -> Option<Box<dyn UsbDevice>> {
        None
    }

    fn attach(&mut self, done: &Completions) {
        *self.sink.lock().unwrap_or_else(|p| p.into_inner()) = Some(done.clone());
    }

    fn submit(&mut self, urb: CmdSubmit, done: &Completions) {
        let seqnum = urb.seqnum;
        if urb.ep == 0
            && let Some(completion) = self.standard_request(urb.setup)
        {
            return done.complete(seqnum, completion);
        }
        let request = match request(&urb, &self.endpoints) {
            Ok(request) => request,
            Err(status) => return done.complete(seqnum, Completion::failed(status)),
        };
        let kind = request.kind;
        let lengths = request.iso_lengths.clone();
        let direction = urb.direction;
        let sink = done.clone();
        let on_done = Box::new(move |finished: Finished| {
            let gone = finished.status == ffi::constants::LIBUSB_TRANSFER_NO_DEVICE;
            sink.complete(seqnum, completion(kind, direction, &lengths, finished));
            if gone {
                sink.gone("the device is not there any more");
            }
        });
        match self.in_flight.submit(&self.handle, request, on_done) {
            Ok(()) => {}
            Err(rusb::Error::NoDevice) => {
                done.complete(seqnum, Completion::failed(GONE));
                done.gone("the device is not there any more");
            }
            Err(e) => {
                tracing::debug!(seqnum, "libusb refused a transfer: {e}");
                done.complete(
                    seqnum,
                    Completion::failed(if e == rusb::Error::Pipe { STALL } else { INVALID }),
                );
            }
        }
    }

    fn unlink(&mut self, seqnum: u32) {
        self.in_flight.cancel(seqnum);
    }

    fn stop(&mut self) {
        if !self.in_flight.cancel_all(CANCEL_BOUND) {
            tracing::warn!(
                left = self.in_flight.len(),
                "USB transfers still in flight after cancelling them"
            );
        }
        *self.sink.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

impl Drop for LibusbDevice {
    fn drop(&mut self) {
        self.stop();
        // The event thread stops after this (field order); transfers that did not finish keep
        // the handle open (they hold it), so nothing is freed under libusb.
        self.release_all();
    }
}

/// Hot-plug: devices plugged in on this machine that match a rule set, opened.
pub struct Watcher {
    rules: UsbPolicy,
    arrived: Mutex<Receiver<(u8, u8)>>,
    /// In a mutex only to make the watcher `Sync` (libusb's registration is not).
    _registration: Mutex<rusb::Registration<Context>>,
    _events: EventThread,
}

impl std::fmt::Debug for Watcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Watcher({})", self.rules)
    }
}

struct Arrivals(std::sync::mpsc::Sender<(u8, u8)>);

impl rusb::Hotplug<Context> for Arrivals {
    fn device_arrived(&mut self, device: Device<Context>) {
        let _ = self.0.send((device.bus_number(), device.address()));
    }

    fn device_left(&mut self, _device: Device<Context>) {}
}

impl Watcher {
    /// Starts watching; `None` with a warning where libusb has no hot-plug events here.
    pub fn start(rules: UsbPolicy) -> Option<Watcher> {
        if !rusb::has_hotplug() {
            tracing::warn!("libusb has no hot-plug events here: devices plugged in later are not redirected");
            return None;
        }
        let start = || -> Result<Watcher, rusb::Error> {
            let context = Context::new()?;
            let (tx, rx) = channel();
            let registration =
                rusb::HotplugBuilder::new().enumerate(false).register(&context, Box::new(Arrivals(tx)))?;
            let events =
                EventThread::start(&context, "usb-hotplug".into()).map_err(|_| rusb::Error::NoMem)?;
            Ok(Watcher {
                rules,
                arrived: Mutex::new(rx),
                _registration: Mutex::new(registration),
                _events: events,
            })
        };
        start().map_err(|e| tracing::warn!("cannot watch for USB devices plugged in: {e}")).ok()
    }

    /// The devices plugged in since the last call that the rules select, opened.
    pub fn take(&self) -> Vec<LibusbDevice> {
        let arrived: Vec<(u8, u8)> =
            self.arrived.lock().unwrap_or_else(|p| p.into_inner()).try_iter().collect();
        let mut opened = Vec::new();
        for (bus, address) in arrived {
            let Ok(context) = Context::new() else { continue };
            let Ok(devices) = context.devices() else { continue };
            let Some(info) = devices
                .iter()
                .find(|d| (d.bus_number(), d.address()) == (bus, address))
                .and_then(|d| describe(&d).ok())
            else {
                continue;
            };
            if !selects(&self.rules, &info) {
                continue;
            }
            match LibusbDevice::open(bus, address) {
                Ok(device) => opened.push(device),
                Err(e) => tracing::warn!(bus, address, "a USB device plugged in is not redirected: {e}"),
            }
        }
        opened
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoints() -> HashMap<u8, TransferType> {
        HashMap::from([
            (0x81, TransferType::Bulk),
            (0x02, TransferType::Bulk),
            (0x83, TransferType::Interrupt),
            (0x84, TransferType::Isochronous),
            (0x05, TransferType::Isochronous),
        ])
    }

    fn urb(ep: u32, direction: Direction, length: u32, data: Vec<u8>) -> CmdSubmit {
        CmdSubmit::new(9, 1, ep, direction, length, [0; 8], data)
    }

    #[test]
    fn control_transfers_carry_the_setup_packet_and_the_length_it_names() {
        // GET_DESCRIPTOR(device), 18 bytes.
        let setup = [0x80, 6, 0, 1, 0, 0, 18, 0];
        let mut get = urb(0, Direction::In, 64, Vec::new());
        get.setup = setup;
        let request = request(&get, &endpoints()).unwrap();
        assert_eq!((request.kind, request.endpoint, request.buffer.len()), (Kind::Control, 0, 8 + 18));
        assert_eq!(request.buffer[..8], setup);
        // An OUT control transfer's data follows the setup packet.
        let mut set = urb(0, Direction::Out, 3, vec![1, 2, 3]);
        set.setup = [0x21, 9, 0, 2, 0, 0, 3, 0];
        assert_eq!(request_buffer(&set), [0x21, 9, 0, 2, 0, 0, 3, 0, 1, 2, 3]);
        // The answer leaves the setup packet out.
        let mut buffer = setup.to_vec();
        buffer.extend([0x12, 1, 0, 2]);
        buffer.resize(26, 0);
        let done = Finished { status: 0, actual_length: 4, buffer, iso: Vec::new() };
        let c = completion(Kind::Control, Direction::In, &[], done);
        assert_eq!((c.status, c.data.as_slice(), c.actual_length), (0, &[0x12, 1, 0, 2][..], 4));
    }

    fn request_buffer(urb: &CmdSubmit) -> Vec<u8> {
        request(urb, &endpoints()).unwrap().buffer
    }

    #[test]
    fn bulk_and_interrupt_go_by_the_endpoints_type_and_unknown_endpoints_stall() {
        let r = request(&urb(1, Direction::In, 512, Vec::new()), &endpoints()).unwrap();
        assert_eq!((r.kind, r.endpoint, r.buffer.len()), (Kind::Bulk, 0x81, 512));
        let r = request(&urb(2, Direction::Out, 3, vec![4, 5, 6]), &endpoints()).unwrap();
        assert_eq!((r.kind, r.endpoint, r.buffer), (Kind::Bulk, 0x02, vec![4, 5, 6]));
        let r = request(&urb(3, Direction::In, 8, Vec::new()), &endpoints()).unwrap();
        assert_eq!((r.kind, r.endpoint), (Kind::Interrupt, 0x83));
        assert_eq!(request(&urb(7, Direction::In, 8, Vec::new()), &endpoints()).unwrap_err(), STALL);
        // The URB's flags become libusb's.
        let mut short = urb(1, Direction::In, 512, Vec::new());
        short.transfer_flags = URB_SHORT_NOT_OK | URB_ZERO_PACKET;
        let flags = request(&short, &endpoints()).unwrap().flags;
        assert_eq!(
            flags,
            ffi::constants::LIBUSB_TRANSFER_SHORT_NOT_OK | ffi::constants::LIBUSB_TRANSFER_ADD_ZERO_PACKET
        );
        // Statuses become the errnos Linux gives URBs.
        let finished = |status| Finished { status, actual_length: 0, buffer: vec![0; 8], iso: Vec::new() };
        for (status, errno) in [
            (ffi::constants::LIBUSB_TRANSFER_STALL, STALL),
            (ffi::constants::LIBUSB_TRANSFER_CANCELLED, UNLINKED),
            (ffi::constants::LIBUSB_TRANSFER_NO_DEVICE, GONE),
            (ffi::constants::LIBUSB_TRANSFER_ERROR, PROTOCOL_ERROR),
        ] {
            assert_eq!(completion(Kind::Bulk, Direction::In, &[], finished(status)).status, errno);
        }
    }

    #[test]
    fn isochronous_packets_are_packed_for_libusb_and_unpacked_for_usbip() {
        // OUT: packets at their offsets (with a gap) become libusb's back-to-back buffer.
        let mut out = urb(5, Direction::Out, 12, (0..12).collect());
        out.number_of_packets = 2;
        out.iso = vec![
            IsoPacket { offset: 0, length: 3, ..IsoPacket::default() },
            IsoPacket { offset: 8, length: 4, ..IsoPacket::default() },
        ];
        let r = request(&out, &endpoints()).unwrap();
        assert_eq!((r.kind, r.endpoint), (Kind::Isochronous, 0x05));
        assert_eq!(r.buffer, [0, 1, 2, 8, 9, 10, 11]);
        assert_eq!(r.iso_lengths, [3, 4]);
        // A packet outside the data is refused, not read past.
        out.iso[1].offset = 10;
        assert_eq!(request(&out, &endpoints()).unwrap_err(), INVALID);
        // IN: each packet's actual bytes, back to back, with per-packet statuses.
        let mut buffer = vec![0u8; 8];
        buffer[..3].copy_from_slice(&[1, 2, 3]);
        buffer[4..6].copy_from_slice(&[5, 6]);
        let done = Finished {
            status: 0,
            actual_length: 0,
            buffer,
            iso: vec![(3, 0), (2, 0), (0, ffi::constants::LIBUSB_TRANSFER_ERROR)],
        };
        let c = completion(Kind::Isochronous, Direction::In, &[4, 2, 2], done);
        assert_eq!(c.data, [1, 2, 3, 5, 6]);
        assert_eq!((c.actual_length, c.error_count), (5, 1));
        assert_eq!(c.iso[2].status as i32, PROTOCOL_ERROR);
        // Not an isochronous endpoint: refused.
        let mut wrong = urb(1, Direction::In, 8, Vec::new());
        wrong.number_of_packets = 1;
        wrong.iso = vec![IsoPacket { length: 8, ..IsoPacket::default() }];
        assert_eq!(request(&wrong, &endpoints()).unwrap_err(), INVALID);
    }
}
