//! Redirecting devices over a session: each device is announced on the USB channel
//! ([`UsbMessage::Attach`], ids from 1 in the order given) and runs on a thread of its own,
//! which answers the URBs the guest's `vhci-hcd` submits. The guest's USB/IP stream is checked
//! here too ([`UsbipLink`]): a VM process that relays something other than what a guest kernel
//! may send ends that device, never the client.
//!
//! ```text
//! session task ── Data{id, CMD_SUBMIT…} ──▶ device thread ── submit() ──▶ UsbDevice
//!              ◀─ Data{id, RET_SUBMIT…} ──       ▲
//!                                                └── Completions (any thread) ◀─ the device
//! ```
//!
//! URBs complete in any order (an interrupt IN URB may wait while bulk ones go on); an unlink
//! cancels one in flight (`RET_UNLINK` with `-ECONNRESET`, and no `RET_SUBMIT` for it) or, when
//! it had already completed, is answered with status 0 after its `RET_SUBMIT`. Devices may be
//! added while the session runs ([`Redirect::add`]: hot-plug), and a device that goes away on
//! this side ends its redirection (the guest sees it unplugged).
//!
//! The server's answer decides each device's fate: `Attached` (URBs follow), `Refused` (the
//! pool's policy, no agent, …) or later `Detached` (the guest let it go, or the client did:
//! [`unplug`]). A device's thread ends with its device's redirection.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use pleiades_protocol::usbip::{CmdSubmit, Pdu, UsbipError, UsbipLink};
use pleiades_protocol::wire::{MAX_USB_CHUNK, UsbDetachReason, UsbMessage};
use serde::Serialize;

use super::libusb::Watcher;
use super::{Completion, Completions, DeviceEvent, UNLINKED, UsbDevice};
use crate::session::SessionHandle;

/// What became of one redirected device (`usb.json` in a headless recording).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct DeviceReport {
    pub id: u32,
    pub name: String,
    /// `vvvv:pppp`.
    pub usb_id: String,
    /// `announced`, `attached`, `refused`, `detached`, `gone` (it left this side) or
    /// `returned` (the person took it back, [`RedirectControls::give_back`]).
    pub state: &'static str,
    /// A real device's place on this machine, `bus/address`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
    /// Why it was refused or detached.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// URBs the device answered, and the bytes that went each way in them.
    pub urbs: u64,
    pub bytes_to_guest: u64,
    pub bytes_from_guest: u64,
}

type Reports = Arc<Mutex<Vec<DeviceReport>>>;
/// Devices the person took back from the desktop, which they may redirect again.
pub type Parked = Arc<Mutex<Vec<Box<dyn UsbDevice>>>>;
type Inboxes = Arc<Mutex<HashMap<u32, Sender<Input>>>>;
/// A device's thread: the device back at its end, unless it is gone.
type DeviceJoin = std::thread::JoinHandle<Option<Box<dyn UsbDevice>>>;

/// What a device's thread waits for.
#[derive(Debug)]
enum Input {
    /// USB/IP bytes from the guest.
    Guest(Vec<u8>),
    /// The device's news.
    Device(DeviceEvent),
    /// The server refused or detached the device.
    End,
}

/// How often a device's thread looks at the session and [`Redirect::finish`] while idle.
const IDLE_CHECK: Duration = Duration::from_millis(250);
/// The most answer bytes gathered before they are sent.
const BATCH: usize = 1 << 20;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// What a client redirects, session after session: the devices at hand, and a watcher for
/// those plugged in later that match the user's rules.
#[derive(Debug, Default)]
pub struct UsbDevices {
    pub present: Vec<Box<dyn UsbDevice>>,
    pub watcher: Option<Arc<Watcher>>,
    /// Taken back by the person; not redirected until they choose so again.
    pub parked: Parked,
    /// The live session's redirection, for a menu.
    pub live: Arc<Mutex<Option<RedirectControls>>>,
}

impl UsbDevices {
    /// Starts redirecting over `handle`'s session: the present devices, then hot-plugged
    /// ones. `None` when the server takes no USB devices (the devices stay here).
    pub fn redirect(&mut self, handle: &SessionHandle) -> Option<Redirect> {
        match Redirect::start_with(handle, std::mem::take(&mut self.present), self.parked.clone()) {
            Ok(mut redirect) => {
                if let Some(watcher) = self.watcher.clone() {
                    redirect.watch(move || {
                        watcher.take().into_iter().map(|d| Box::new(d) as Box<dyn UsbDevice>).collect()
                    });
                }
                *lock(&self.live) = Some(redirect.controls());
                Some(redirect)
            }
            Err(devices) => {
                self.present = devices;
                None
            }
        }
    }

    /// The session ended: the devices still present come back for the next one.
    pub fn finished(&mut self, redirect: Redirect) -> Vec<DeviceReport> {
        *lock(&self.live) = None;
        let (reports, devices) = redirect.finish();
        self.present = devices;
        reports
    }
}

/// The devices redirected over one session.
#[derive(Debug)]
pub struct Redirect {
    shared: Arc<Shared>,
    /// The hot-plug thread ([`Redirect::watch`]).
    watcher: Option<std::thread::JoinHandle<()>>,
}

/// A redirection's controls, for a menu: add a device, give one back.
#[derive(Debug, Clone)]
pub struct RedirectControls {
    shared: Arc<Shared>,
}

impl RedirectControls {
    /// Redirects one more device; its id.
    pub fn add(&self, device: Box<dyn UsbDevice>) -> Option<u32> {
        self.shared.add(device)
    }

    /// Takes device `id` back from the desktop (the guest sees it unplugged): a real device
    /// returns to this machine's drivers, an emulated one waits among the parked ones.
    pub fn give_back(&self, id: u32) -> bool {
        lock(&self.shared.given_back).insert(id);
        unplug(&self.shared.handle, id)
    }

    pub fn reports(&self) -> Vec<DeviceReport> {
        lock(&self.shared.reports).clone()
    }
}

#[derive(Debug)]
struct Shared {
    handle: SessionHandle,
    /// Devices the person took back ([`RedirectControls::give_back`]), and where they go.
    given_back: Arc<Mutex<std::collections::HashSet<u32>>>,
    parked: Parked,
    reports: Reports,
    inboxes: Inboxes,
    threads: Mutex<Vec<DeviceJoin>>,
    /// Set by [`Redirect::finish`]: the threads stop answering.
    stop: Arc<AtomicBool>,
    next_id: AtomicU32,
}

impl Redirect {
    /// Announces `devices` on `handle`'s session and serves them until it ends
    /// ([`Redirect::finish`] gives them back, for the next session). The devices come back at
    /// once when the session has no USB channel (the server did not offer it).
    pub fn start(
        handle: &SessionHandle,
        devices: Vec<Box<dyn UsbDevice>>,
    ) -> Result<Redirect, Vec<Box<dyn UsbDevice>>> {
        Self::start_with(handle, devices, Parked::default())
    }

    /// [`Redirect::start`], devices given back going to `parked`.
    pub fn start_with(
        handle: &SessionHandle,
        devices: Vec<Box<dyn UsbDevice>>,
        parked: Parked,
    ) -> Result<Redirect, Vec<Box<dyn UsbDevice>>> {
        if !handle.info().capabilities.contains(pleiades_protocol::handshake::Capabilities::USB) {
            if !devices.is_empty() {
                tracing::warn!("the server does not take USB devices: none is redirected");
            }
            return Err(devices);
        }
        let shared = Arc::new(Shared {
            handle: handle.clone(),
            given_back: Arc::default(),
            parked,
            reports: Arc::default(),
            inboxes: Arc::default(),
            threads: Mutex::default(),
            stop: Arc::new(AtomicBool::new(false)),
            next_id: AtomicU32::new(1),
        });
        let (inboxes, reports) = (shared.inboxes.clone(), shared.reports.clone());
        handle.on_usb(move |message| on_server(message, &inboxes, &reports));
        for device in devices {
            shared.add(device);
        }
        Ok(Redirect { shared, watcher: None })
    }

    /// Announces one more device (plugged in while the session runs) and serves it; its id
    /// (ids go up from 1 and are never reused within a session), or `None` when its thread
    /// could not start.
    pub fn add(&self, device: Box<dyn UsbDevice>) -> Option<u32> {
        self.shared.add(device)
    }

    /// Hot-plug: every quarter of a second until the session ends, `arrivals` gives the
    /// devices plugged in since (opened, matching the user's rules), and each is added.
    pub fn watch(&mut self, mut arrivals: impl FnMut() -> Vec<Box<dyn UsbDevice>> + Send + 'static) {
        let shared = self.shared.clone();
        let spawned = std::thread::Builder::new().name("usb-hotplug".into()).spawn(move || {
            while !shared.handle.is_closed() && !shared.stop.load(Ordering::Relaxed) {
                for device in arrivals() {
                    shared.add(device);
                }
                std::thread::sleep(IDLE_CHECK);
            }
        });
        match spawned {
            Ok(thread) => self.watcher = Some(thread),
            Err(e) => tracing::warn!("cannot watch for USB devices plugged in: {e}"),
        }
    }

    /// What became of each device so far.
    pub fn reports(&self) -> Vec<DeviceReport> {
        lock(&self.shared.reports).clone()
    }

    /// Controls for a menu, valid while the redirection runs.
    pub fn controls(&self) -> RedirectControls {
        RedirectControls { shared: self.shared.clone() }
    }

    /// Stops serving the devices (within a quarter of a second; the session's end unplugs them
    /// in the guest) and says what became of each; the devices still present come back for
    /// another session.
    pub fn finish(self) -> (Vec<DeviceReport>, Vec<Box<dyn UsbDevice>>) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(watcher) = self.watcher {
            let _ = watcher.join();
        }
        let threads = std::mem::take(&mut *lock(&self.shared.threads));
        let devices = threads.into_iter().filter_map(|thread| thread.join().ok().flatten()).collect();
        (lock(&self.shared.reports).clone(), devices)
    }
}

impl Shared {
    fn add(&self, device: Box<dyn UsbDevice>) -> Option<u32> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let info = device.info();
        let usb_id = format!("{:04x}:{:04x}", info.vendor_id, info.product_id);
        tracing::info!(id, usb_id, name = info.product, "redirecting a USB device");
        lock(&self.reports).push(DeviceReport {
            id,
            name: info.product.clone(),
            usb_id,
            location: device.location().map(|(bus, address)| format!("{bus:03}/{address:03}")),
            state: "announced",
            reason: None,
            urbs: 0,
            bytes_to_guest: 0,
            bytes_from_guest: 0,
        });
        let (tx, rx) = channel();
        let done = {
            let tx = tx.clone();
            Completions::new(move |event| {
                // The thread has ended when this fails: nothing waits for the answer.
                let _ = tx.send(Input::Device(event));
            })
        };
        lock(&self.inboxes).insert(id, tx);
        let device_thread = DeviceThread {
            id,
            handle: self.handle.clone(),
            reports: self.reports.clone(),
            stop: self.stop.clone(),
            given_back: self.given_back.clone(),
            parked: self.parked.clone(),
        };
        let spawned = std::thread::Builder::new()
            .name(format!("usb-{id}"))
            .spawn(move || device_thread.serve(device, &rx, &done));
        match spawned {
            Ok(thread) => {
                lock(&self.threads).push(thread);
                self.handle.send_usb(UsbMessage::Attach(info.announce(id)));
                Some(id)
            }
            Err(e) => {
                tracing::warn!("cannot start USB device {id}'s thread: {e}");
                lock(&self.inboxes).remove(&id);
                set_state(&self.reports, id, "gone", Some(format!("no thread: {e}")));
                None
            }
        }
    }
}

/// Stops redirecting device `id`: the guest sees it unplugged.
pub fn unplug(handle: &SessionHandle, id: u32) -> bool {
    handle.send_usb(UsbMessage::Detach { id })
}

fn set_state(reports: &Reports, id: u32, state: &'static str, reason: Option<String>) {
    if let Some(report) = lock(reports).iter_mut().find(|r| r.id == id) {
        report.state = state;
        report.reason = reason;
    }
}

/// What the server said, from the session's stream task (must not block).
fn on_server(message: UsbMessage, inboxes: &Mutex<HashMap<u32, Sender<Input>>>, reports: &Reports) {
    let id = message.id();
    let mut reports = lock(reports);
    let Some(report) = reports.iter_mut().find(|r| r.id == id) else {
        return tracing::debug!(id, "a USB message for a device this client did not announce");
    };
    let end = |inboxes: &Mutex<HashMap<u32, Sender<Input>>>| {
        if let Some(inbox) = lock(inboxes).remove(&id) {
            let _ = inbox.send(Input::End);
        }
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
            end(inboxes);
        }
        UsbMessage::Detached { reason, .. } => {
            let why = match reason {
                UsbDetachReason::Client => "unplugged on this side",
                UsbDetachReason::Guest => "the desktop let it go",
                UsbDetachReason::Protocol => "a side broke USB/IP",
            };
            tracing::info!(id, name = report.name, "the USB device left the desktop: {why}");
            if report.state != "gone" {
                report.state = "detached";
                report.reason = Some(why.to_owned());
            }
            end(inboxes);
        }
        UsbMessage::Data { bytes, .. } => {
            // Data before `Attached` is fine: the device's lane may overtake lane 0.
            if report.state == "announced" {
                report.state = "attached";
            }
            if let Some(inbox) = lock(inboxes).get(&id) {
                let _ = inbox.send(Input::Guest(bytes));
            }
        }
        // The client's own messages never come back.
        UsbMessage::Attach(_) | UsbMessage::Detach { .. } => {}
    }
}

/// One device's thread.
struct DeviceThread {
    id: u32,
    handle: SessionHandle,
    reports: Reports,
    stop: Arc<AtomicBool>,
    given_back: Arc<Mutex<std::collections::HashSet<u32>>>,
    parked: Parked,
}

/// Whether a device's redirection goes on.
enum Flow {
    Continue,
    /// It ended; the device stays usable (`true`) or is gone.
    End {
        usable: bool,
    },
}

/// What the guest asks of a device.
#[derive(Debug, PartialEq, Eq)]
enum Command {
    Submit(CmdSubmit),
    /// Cancel URB `seqnum`.
    Unlink(u32),
}

/// One device's USB/IP bookkeeping, sans I/O: the URBs in flight and the unlinks waiting for
/// them, and the answers for the guest, each checked as the VM process will check it.
///
/// An unlink of an URB in flight is passed to the device; when the URB then completes
/// cancelled ([`UNLINKED`]) only the unlink is answered (`-ECONNRESET`: the guest gets no
/// `RET_SUBMIT` for it); when it completed anyway, its `RET_SUBMIT` goes first and the unlink
/// is answered 0. An unlink of an URB already answered is answered 0 at once. This is what
/// Linux's own USB/IP server does, and what `vhci-hcd` expects.
#[derive(Debug, Default)]
struct Book {
    link: UsbipLink,
    /// URBs in flight, without their data: what their answers must match.
    asked: HashMap<u32, CmdSubmit>,
    /// Unlinks waiting for their URB's completion: URB seqnum → unlink seqnum.
    unlinks: HashMap<u32, u32>,
    /// Encoded answers not sent yet.
    answer: Vec<u8>,
}

impl Book {
    /// The guest's bytes: the URBs to start and the unlinks to pass on.
    fn guest_sent(&mut self, bytes: &[u8]) -> Result<Vec<Command>, UsbipError> {
        let mut commands = Vec::new();
        for pdu in self.link.from_guest(bytes)? {
            match pdu {
                Pdu::Submit(mut urb) => {
                    let data = std::mem::take(&mut urb.data);
                    self.asked.insert(urb.seqnum, urb.clone());
                    commands.push(Command::Submit(CmdSubmit { data, ..urb }));
                }
                Pdu::Unlink { seqnum, unlink_seqnum, .. } => {
                    if self.asked.contains_key(&unlink_seqnum) {
                        self.unlinks.insert(unlink_seqnum, seqnum);
                        commands.push(Command::Unlink(unlink_seqnum));
                    } else {
                        // Already answered: nothing to cancel.
                        self.reply(Pdu::RetUnlink { seqnum, status: 0 })?;
                    }
                }
                Pdu::Ret(_) | Pdu::RetUnlink { .. } => unreachable!("from_guest() takes commands only"),
            }
        }
        Ok(commands)
    }

    /// URB `seqnum` completed: its answer is queued. The bytes it returns to the guest, or
    /// `None` when it was not in flight (a device's late or doubled completion: ignored).
    fn completed(&mut self, seqnum: u32, completion: Completion) -> Result<Option<u64>, UsbipError> {
        let Some(urb) = self.asked.remove(&seqnum) else { return Ok(None) };
        match self.unlinks.remove(&seqnum) {
            // The cancel won: the unlink's answer says so, and the URB gets none.
            Some(unlink) if completion.status == UNLINKED => {
                self.reply(Pdu::RetUnlink { seqnum: unlink, status: UNLINKED })?;
                Ok(Some(0))
            }
            unlink => {
                let ret = completion.ret(&urb);
                let bytes = ret.data.len() as u64;
                self.reply(Pdu::Ret(ret))?;
                if let Some(unlink) = unlink {
                    self.reply(Pdu::RetUnlink { seqnum: unlink, status: 0 })?;
                }
                Ok(Some(bytes))
            }
        }
    }

    fn reply(&mut self, pdu: Pdu) -> Result<(), UsbipError> {
        let encoded = pdu.encode();
        self.link.from_device(&encoded)?;
        self.answer.extend(encoded);
        Ok(())
    }
}

impl DeviceThread {
    /// Answers the device's URBs until its redirection ends; the device back if it is still
    /// there.
    fn serve(
        self,
        mut device: Box<dyn UsbDevice>,
        inbox: &Receiver<Input>,
        done: &Completions,
    ) -> Option<Box<dyn UsbDevice>> {
        device.attach(done);
        let mut book = Book::default();
        let usable = loop {
            let input = match inbox.recv_timeout(IDLE_CHECK) {
                Ok(input) => input,
                Err(RecvTimeoutError::Timeout)
                    if !self.handle.is_closed() && !self.stop.load(Ordering::Relaxed) =>
                {
                    continue;
                }
                // The session is over.
                Err(_) => break true,
            };
            let mut flow = self.take(input, device.as_mut(), done, &mut book);
            // Whatever else is waiting goes in the same answer.
            while matches!(flow, Flow::Continue) && book.answer.len() < BATCH {
                match inbox.try_recv() {
                    Ok(input) => flow = self.take(input, device.as_mut(), done, &mut book),
                    Err(_) => break,
                }
            }
            if !self.send(&mut book.answer) {
                break true;
            }
            if let Flow::End { usable } = flow {
                break usable;
            }
        };
        device.stop();
        if usable && lock(&self.given_back).remove(&self.id) {
            set_state(&self.reports, self.id, "returned", Some("taken back on this side".into()));
            if let Some(device) = device.park() {
                lock(&self.parked).push(device);
            }
            return None;
        }
        usable.then_some(device)
    }

    fn take(&self, input: Input, device: &mut dyn UsbDevice, done: &Completions, book: &mut Book) -> Flow {
        let broken = |what: &str, e: UsbipError| {
            tracing::warn!(id = self.id, "{what} broke USB/IP: {e}; unplugging");
            unplug(&self.handle, self.id);
            Flow::End { usable: true }
        };
        match input {
            Input::End => Flow::End { usable: true },
            Input::Guest(bytes) => match book.guest_sent(&bytes) {
                Ok(commands) => {
                    for command in commands {
                        match command {
                            Command::Submit(urb) => {
                                self.count(0, 0, urb.data.len() as u64);
                                device.submit(urb, done);
                            }
                            Command::Unlink(seqnum) => device.unlink(seqnum),
                        }
                    }
                    Flow::Continue
                }
                Err(e) => broken("the desktop's stream", e),
            },
            Input::Device(DeviceEvent::Gone { reason }) => {
                tracing::info!(id = self.id, "the USB device is gone on this side: {reason}");
                set_state(&self.reports, self.id, "gone", Some(reason));
                unplug(&self.handle, self.id);
                Flow::End { usable: false }
            }
            Input::Device(DeviceEvent::Done { seqnum, completion }) => {
                match book.completed(seqnum, completion) {
                    Ok(Some(bytes)) => {
                        self.count(1, bytes, 0);
                        Flow::Continue
                    }
                    Ok(None) => {
                        tracing::debug!(id = self.id, seqnum, "a completion for an URB not in flight");
                        Flow::Continue
                    }
                    Err(e) => broken("the device's answer", e),
                }
            }
        }
    }

    /// Sends the answers gathered; false when the session is over.
    fn send(&self, answer: &mut Vec<u8>) -> bool {
        let ok = answer
            .chunks(MAX_USB_CHUNK)
            .all(|chunk| self.handle.send_usb(UsbMessage::Data { id: self.id, bytes: chunk.to_vec() }));
        answer.clear();
        ok
    }

    fn count(&self, urbs: u64, to_guest: u64, from_guest: u64) {
        if let Some(r) = lock(&self.reports).iter_mut().find(|r| r.id == self.id) {
            r.urbs += urbs;
            r.bytes_to_guest += to_guest;
            r.bytes_from_guest += from_guest;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pleiades_protocol::usbip::{Direction, IsoPacket};

    /// The guest's side: what it sends, and the answers decoded as `vhci-hcd` reads them.
    struct Guest {
        link: UsbipLink,
    }

    impl Guest {
        fn send(&mut self, book: &mut Book, pdus: &[Pdu]) -> Vec<Command> {
            let bytes: Vec<u8> = pdus.iter().flat_map(Pdu::encode).collect();
            assert_eq!(self.link.from_guest(&bytes).unwrap().len(), pdus.len());
            book.guest_sent(&bytes).unwrap()
        }

        fn answers(&mut self, book: &mut Book) -> Vec<Pdu> {
            self.link.from_device(&std::mem::take(&mut book.answer)).unwrap()
        }
    }

    fn setup() -> (Guest, Book) {
        (Guest { link: UsbipLink::new() }, Book::default())
    }

    fn bulk_in(seqnum: u32, length: u32) -> Pdu {
        Pdu::Submit(CmdSubmit::new(seqnum, 1, 1, Direction::In, length, [0; 8], Vec::new()))
    }

    fn unlink(seqnum: u32, victim: u32) -> Pdu {
        Pdu::Unlink { seqnum, devid: 1, unlink_seqnum: victim }
    }

    #[test]
    fn urbs_complete_in_any_order_each_answered_once() {
        let (mut guest, mut book) = setup();
        let commands = guest.send(&mut book, &[bulk_in(1, 8), bulk_in(2, 4)]);
        assert_eq!(commands.len(), 2);
        assert_eq!(book.completed(2, Completion::ok_in(vec![2; 4])).unwrap(), Some(4));
        assert_eq!(book.completed(1, Completion::ok_in(vec![1; 20])).unwrap(), Some(8), "clipped to the URB");
        // A doubled completion is ignored, not answered twice.
        assert_eq!(book.completed(1, Completion::ok_in(vec![1])).unwrap(), None);
        let answers = guest.answers(&mut book);
        let seqnums: Vec<u32> = answers
            .iter()
            .map(|p| match p {
                Pdu::Ret(r) => r.seqnum,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(seqnums, [2, 1]);
    }

    #[test]
    fn an_unlink_that_wins_answers_econnreset_and_the_urb_gets_no_ret_submit() {
        let (mut guest, mut book) = setup();
        guest.send(&mut book, &[bulk_in(1, 8)]);
        assert_eq!(guest.send(&mut book, &[unlink(2, 1)]), [Command::Unlink(1)]);
        book.completed(1, Completion::failed(UNLINKED)).unwrap();
        assert_eq!(guest.answers(&mut book), [Pdu::RetUnlink { seqnum: 2, status: UNLINKED }]);
        assert_eq!(guest.link.in_flight(), 0);
    }

    #[test]
    fn an_unlink_that_loses_the_race_follows_the_urbs_answer_with_status_0() {
        let (mut guest, mut book) = setup();
        guest.send(&mut book, &[bulk_in(1, 8)]);
        guest.send(&mut book, &[unlink(2, 1)]);
        book.completed(1, Completion::ok_in(vec![7; 8])).unwrap();
        let answers = guest.answers(&mut book);
        assert!(matches!(&answers[0], Pdu::Ret(r) if r.seqnum == 1 && r.data == [7; 8]), "{answers:?}");
        assert_eq!(answers[1], Pdu::RetUnlink { seqnum: 2, status: 0 });
    }

    #[test]
    fn an_unlink_of_an_urb_already_answered_is_answered_at_once() {
        let (mut guest, mut book) = setup();
        guest.send(&mut book, &[bulk_in(1, 8)]);
        book.completed(1, Completion::ok_in(vec![1; 8])).unwrap();
        guest.answers(&mut book);
        assert!(guest.send(&mut book, &[unlink(2, 1)]).is_empty(), "nothing for the device");
        assert_eq!(guest.answers(&mut book), [Pdu::RetUnlink { seqnum: 2, status: 0 }]);
    }

    #[test]
    fn an_isochronous_answer_keeps_the_requests_packets() {
        let (mut guest, mut book) = setup();
        let mut urb = CmdSubmit::new(1, 1, 3, Direction::In, 3 * 192, [0; 8], Vec::new());
        urb.number_of_packets = 3;
        urb.iso =
            (0..3).map(|i| IsoPacket { offset: i * 192, length: 192, ..IsoPacket::default() }).collect();
        guest.send(&mut book, &[Pdu::Submit(urb)]);
        // The device filled two packets (100 and 50 bytes) and lost the third.
        let packets = [(100, 0), (50, 0), (0, PROTOCOL_ERROR_U32)].map(|(actual, status)| IsoPacket {
            actual_length: actual,
            status,
            ..IsoPacket::default()
        });
        let completion = Completion {
            data: vec![9; 150],
            actual_length: 150,
            iso: packets.to_vec(),
            error_count: 1,
            ..Completion::default()
        };
        book.completed(1, completion).unwrap();
        let answers = guest.answers(&mut book);
        let Pdu::Ret(ret) = &answers[0] else { panic!("{answers:?}") };
        assert_eq!(
            (ret.actual_length, ret.data.len(), ret.number_of_packets, ret.error_count),
            (150, 150, 3, 1)
        );
        let offsets: Vec<u32> = ret.iso.iter().map(|p| p.offset).collect();
        assert_eq!(offsets, [0, 192, 384], "offsets as submitted");
        assert!(ret.iso.iter().all(|p| p.length == 192));
    }

    const PROTOCOL_ERROR_U32: u32 = super::super::PROTOCOL_ERROR as u32;

    #[test]
    fn a_device_answering_more_than_asked_is_clipped_and_garbage_from_the_guest_is_an_error() {
        let (mut guest, mut book) = setup();
        guest.send(&mut book, &[bulk_in(1, 4)]);
        book.completed(1, Completion::ok_in(vec![0; 4096])).unwrap();
        let answers = guest.answers(&mut book);
        assert!(matches!(&answers[0], Pdu::Ret(r) if r.data.len() == 4));
        assert!(book.guest_sent(&[0xff; 48]).is_err());
    }
}
