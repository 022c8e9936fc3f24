//! Redirecting devices over a session: each device is announced on the USB channel
//! ([`UsbMessage::Attach`], ids from 1 in the order given) and runs on a thread of its own,
//! which answers the URBs the guest's `vhci-hcd` submits. The guest's USB/IP stream is checked
//! here too ([`UsbipLink`]): a VM process that relays something other than what a guest kernel
//! may send ends that device, never the client.
//!
//! ```text
//! session task ── Data{id, CMD_SUBMIT…} ──▶ device thread ── submit() ──▶ UsbDevice
//!              ◀─ Data{id, RET_SUBMIT…} ──                 ◀─ Completion ─
//! ```
//!
//! The server's answer decides each device's fate: `Attached` (URBs follow), `Refused` (the
//! pool's policy, no agent, …) or later `Detached` (the guest let it go, or the client did:
//! [`unplug`]). A device's thread ends with its device's redirection.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::sync::{Arc, Mutex, MutexGuard};

use pleiades_protocol::usbip::{Pdu, UsbipLink};
use pleiades_protocol::wire::{MAX_USB_CHUNK, UsbDetachReason, UsbMessage};
use serde::Serialize;

use super::UsbDevice;
use crate::session::SessionHandle;

/// What became of one redirected device (`usb.json` in a headless recording).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct DeviceReport {
    pub id: u32,
    pub name: String,
    /// `vvvv:pppp`.
    pub usb_id: String,
    /// `announced`, `attached`, `refused` or `detached`.
    pub state: &'static str,
    /// Why it was refused or detached.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// URBs the device answered, and the bytes that went each way in them.
    pub urbs: u64,
    pub bytes_to_guest: u64,
    pub bytes_from_guest: u64,
}

type Reports = Arc<Mutex<Vec<DeviceReport>>>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The devices redirected over one session.
#[derive(Debug)]
pub struct Redirect {
    reports: Reports,
    threads: Vec<std::thread::JoinHandle<Box<dyn UsbDevice>>>,
    /// Set by [`Redirect::finish`]: the threads stop answering.
    stop: Arc<AtomicBool>,
}

impl Redirect {
    /// Announces `devices` on `handle`'s session and serves them until it ends
    /// ([`Redirect::finish`] gives them back, for the next session). The devices come back at
    /// once when the session has no USB channel (the server did not offer it) or there are none.
    pub fn start(
        handle: &SessionHandle,
        devices: Vec<Box<dyn UsbDevice>>,
    ) -> Result<Redirect, Vec<Box<dyn UsbDevice>>> {
        if devices.is_empty() {
            return Err(devices);
        }
        if !handle.info().capabilities.contains(pleiades_protocol::handshake::Capabilities::USB) {
            tracing::warn!("the server does not take USB devices: none is redirected");
            return Err(devices);
        }
        let reports: Reports = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let inboxes: Arc<Mutex<HashMap<u32, Sender<Vec<u8>>>>> = Arc::default();
        let mut threads = Vec::new();
        let mut announcements = Vec::new();
        for (index, device) in devices.into_iter().enumerate() {
            let id = index as u32 + 1;
            let info = device.info();
            let usb_id = format!("{:04x}:{:04x}", info.vendor_id, info.product_id);
            tracing::info!(id, usb_id, name = info.product, "redirecting a USB device");
            lock(&reports).push(DeviceReport {
                id,
                name: info.product.clone(),
                usb_id,
                state: "announced",
                reason: None,
                urbs: 0,
                bytes_to_guest: 0,
                bytes_from_guest: 0,
            });
            let (tx, rx) = channel();
            lock(&inboxes).insert(id, tx);
            let (handle, reports, stop) = (handle.clone(), reports.clone(), stop.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("usb-{id}"))
                .spawn(move || serve(id, device, &rx, &handle, &reports, &stop));
            match spawned {
                Ok(thread) => {
                    threads.push(thread);
                    announcements.push(UsbMessage::Attach(info.announce(id)));
                }
                Err(e) => tracing::warn!("cannot start USB device {id}'s thread: {e}"),
            }
        }
        let (sink_inboxes, sink_reports) = (inboxes, reports.clone());
        handle.on_usb(move |message| on_server(message, &sink_inboxes, &sink_reports));
        for announcement in announcements {
            handle.send_usb(announcement);
        }
        Ok(Redirect { reports, threads, stop })
    }

    /// What became of each device so far.
    pub fn reports(&self) -> Vec<DeviceReport> {
        lock(&self.reports).clone()
    }

    /// Stops serving the devices (within a quarter of a second; the session's end unplugs them
    /// in the guest) and says what became of each; the devices come back for another session.
    pub fn finish(self) -> (Vec<DeviceReport>, Vec<Box<dyn UsbDevice>>) {
        self.stop.store(true, Ordering::Relaxed);
        let devices = self.threads.into_iter().filter_map(|thread| thread.join().ok()).collect();
        (lock(&self.reports).clone(), devices)
    }
}

/// Stops redirecting device `id`: the guest sees it unplugged.
pub fn unplug(handle: &SessionHandle, id: u32) -> bool {
    handle.send_usb(UsbMessage::Detach { id })
}

/// What the server said, from the session's stream task (must not block).
fn on_server(message: UsbMessage, inboxes: &Mutex<HashMap<u32, Sender<Vec<u8>>>>, reports: &Reports) {
    let id = message.id();
    let mut reports = lock(reports);
    let Some(report) = reports.iter_mut().find(|r| r.id == id) else {
        return tracing::debug!(id, "a USB message for a device this client did not announce");
    };
    match message {
        UsbMessage::Attached { .. } => {
            tracing::info!(id, name = report.name, "the USB device is attached in the desktop");
            report.state = "attached";
        }
        UsbMessage::Refused { reason, .. } => {
            tracing::warn!(
                id,
                name = report.name,
                "the desktop refused the USB device: {}",
                reason.describe()
            );
            report.state = "refused";
            report.reason = Some(reason.describe().to_owned());
            lock(inboxes).remove(&id);
        }
        UsbMessage::Detached { reason, .. } => {
            let why = match reason {
                UsbDetachReason::Client => "unplugged on this side",
                UsbDetachReason::Guest => "the desktop let it go",
                UsbDetachReason::Protocol => "a side broke USB/IP",
            };
            tracing::info!(id, name = report.name, "the USB device left the desktop: {why}");
            report.state = "detached";
            report.reason = Some(why.to_owned());
            lock(inboxes).remove(&id);
        }
        UsbMessage::Data { bytes, .. } => {
            // Data before `Attached` is fine: the device's lane may overtake lane 0.
            if report.state == "announced" {
                report.state = "attached";
            }
            if let Some(inbox) = lock(inboxes).get(&id) {
                let _ = inbox.send(bytes);
            }
        }
        // The client's own messages never come back.
        UsbMessage::Attach(_) | UsbMessage::Detach { .. } => {}
    }
}

/// One device's thread: answers its URBs until its redirection ends.
fn serve(
    id: u32,
    mut device: Box<dyn UsbDevice>,
    inbox: &Receiver<Vec<u8>>,
    handle: &SessionHandle,
    reports: &Reports,
    stop: &AtomicBool,
) -> Box<dyn UsbDevice> {
    answer_urbs(id, device.as_mut(), inbox, handle, reports, stop);
    device
}

fn answer_urbs(
    id: u32,
    device: &mut dyn UsbDevice,
    inbox: &Receiver<Vec<u8>>,
    handle: &SessionHandle,
    reports: &Reports,
    stop: &AtomicBool,
) {
    let mut link = UsbipLink::new();
    let count = |urbs: u64, to_guest: u64, from_guest: u64| {
        if let Some(r) = lock(reports).iter_mut().find(|r| r.id == id) {
            r.urbs += urbs;
            r.bytes_to_guest += to_guest;
            r.bytes_from_guest += from_guest;
        }
    };
    loop {
        let bytes = match inbox.recv_timeout(std::time::Duration::from_millis(250)) {
            Ok(bytes) => bytes,
            Err(RecvTimeoutError::Timeout) if !handle.is_closed() && !stop.load(Ordering::Relaxed) => {
                continue;
            }
            // Refused, detached, or the session is over.
            Err(_) => return,
        };
        let pdus = match link.from_guest(&bytes) {
            Ok(pdus) => pdus,
            Err(e) => {
                tracing::warn!(id, "the desktop's USB/IP stream broke the protocol: {e}; unplugging");
                unplug(handle, id);
                return;
            }
        };
        let mut answer = Vec::new();
        for pdu in pdus {
            let reply = match pdu {
                Pdu::Submit(urb) => {
                    let completion = device.submit(&urb);
                    let ret = completion.ret(&urb);
                    count(1, ret.data.len() as u64, urb.data.len() as u64);
                    Pdu::Ret(ret)
                }
                // Every URB is answered before the next is read: an unlink always comes after
                // its URB completed (status 0, its answer went first).
                Pdu::Unlink { seqnum, .. } => Pdu::RetUnlink { seqnum, status: 0 },
                Pdu::Ret(_) | Pdu::RetUnlink { .. } => unreachable!("from_guest() takes commands only"),
            };
            let encoded = reply.encode();
            if let Err(e) = link.from_device(&encoded) {
                tracing::warn!(id, "the USB device's answer breaks USB/IP: {e}; unplugging");
                unplug(handle, id);
                return;
            }
            answer.extend(encoded);
        }
        for chunk in answer.chunks(MAX_USB_CHUNK) {
            if !handle.send_usb(UsbMessage::Data { id, bytes: chunk.to_vec() }) {
                return;
            }
        }
    }
}
