//! libusb's asynchronous transfers: the one piece of the client that needs `unsafe`. rusb wraps
//! only libusb's synchronous calls, which cannot be cancelled and block a thread per pending
//! URB (an interrupt IN URB of a keyboard pends until a key is pressed); a redirected device
//! needs what a host controller gives the guest's drivers: many URBs in flight on different
//! endpoints, completing in any order, each cancellable. So this module submits
//! `libusb_transfer`s and completes them from libusb's event handling
//! ([`rusb::UsbContext::handle_events`], on the device's event thread).
//!
//! Ownership: each submitted transfer owns a leaked `Box<Submitted>` (its buffer, the device
//! handle, where its outcome goes) as `user_data`; the completion callback takes it back and
//! frees the transfer, exactly once. While in flight the transfer's pointer is in
//! [`InFlight`]'s map; the callback removes it under the map's lock *before* freeing, and
//! [`InFlight::cancel`] calls `libusb_cancel_transfer` only under that lock, so a pointer it
//! cancels is never freed under it. libusb does not hold a transfer's own lock while it runs the
//! callback, so the two locks never wait for each other.

#![allow(unsafe_code)]

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rusb::{Context, DeviceHandle, ffi};

/// The kind of a transfer, as libusb submits it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `buffer` starts with the 8-byte setup packet.
    Control,
    Bulk,
    Interrupt,
    Isochronous,
}

/// What to submit.
#[derive(Debug)]
pub struct Request {
    pub seqnum: u32,
    pub kind: Kind,
    /// The endpoint's address (bit 7: IN); 0 for control.
    pub endpoint: u8,
    /// `LIBUSB_TRANSFER_SHORT_NOT_OK`, `LIBUSB_TRANSFER_ADD_ZERO_PACKET`.
    pub flags: u8,
    /// OUT: the data (control: setup packet, then data); IN: as long as the transfer may be.
    pub buffer: Vec<u8>,
    /// Isochronous: each packet's length (they lie back to back in `buffer`).
    pub iso_lengths: Vec<u32>,
}

/// How a transfer ended.
#[derive(Debug)]
pub struct Finished {
    /// `LIBUSB_TRANSFER_COMPLETED`, `…_STALL`, `…_CANCELLED`, `…_NO_DEVICE`, …
    pub status: i32,
    /// Bytes moved (control: not counting the setup packet; isochronous: not meaningful).
    pub actual_length: usize,
    /// The request's buffer, with what an IN transfer read.
    pub buffer: Vec<u8>,
    /// Isochronous: each packet's actual length and status.
    pub iso: Vec<(u32, i32)>,
}

/// Where a finished transfer goes (called on the event thread; must not block).
pub type OnDone = Box<dyn FnOnce(Finished) + Send>;

/// A transfer's pointer in the in-flight map.
struct Raw(*mut ffi::libusb_transfer);

// SAFETY: the pointer is only handed to libusb (`libusb_cancel_transfer`), under the map's lock,
// which the completion callback takes before it frees the transfer; libusb's transfers may be
// cancelled from any thread.
unsafe impl Send for Raw {}

/// A device's transfers in flight.
#[derive(Default)]
pub struct InFlight {
    map: Mutex<HashMap<u32, Raw>>,
    emptied: Condvar,
}

impl std::fmt::Debug for InFlight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "InFlight({})", self.lock().len())
    }
}

/// What a submitted transfer owns until its callback.
struct Submitted {
    seqnum: u32,
    buffer: Vec<u8>,
    on_done: OnDone,
    in_flight: Arc<InFlight>,
    /// Keeps the device open while the transfer is in flight.
    _handle: Arc<DeviceHandle<Context>>,
}

impl InFlight {
    fn lock(&self) -> MutexGuard<'_, HashMap<u32, Raw>> {
        self.map.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Transfers in flight.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Submits `request` on `handle`; `on_done` gets its outcome from the event thread. An
    /// error (a libusb error code) means it was not submitted and `on_done` will not be called.
    pub fn submit(
        self: &Arc<Self>,
        handle: &Arc<DeviceHandle<Context>>,
        request: Request,
        on_done: OnDone,
    ) -> Result<(), rusb::Error> {
        let Request { seqnum, kind, endpoint, flags, mut buffer, iso_lengths } = request;
        let length = i32::try_from(buffer.len()).map_err(|_| rusb::Error::InvalidParam)?;
        let packets = i32::try_from(iso_lengths.len()).map_err(|_| rusb::Error::InvalidParam)?;
        if kind == Kind::Control && buffer.len() < 8 {
            return Err(rusb::Error::InvalidParam);
        }
        let buffer_ptr = buffer.as_mut_ptr();
        let submitted = Box::into_raw(Box::new(Submitted {
            seqnum,
            buffer,
            on_done,
            in_flight: self.clone(),
            _handle: handle.clone(),
        }));
        // SAFETY: allocates a transfer with room for `packets` isochronous descriptors (0 for
        // the other kinds); null on failure, checked below.
        let transfer =
            unsafe { ffi::libusb_alloc_transfer(if kind == Kind::Isochronous { packets } else { 0 }) };
        if transfer.is_null() {
            // SAFETY: `submitted` came from `Box::into_raw` above and was handed to no one.
            drop(unsafe { Box::from_raw(submitted) });
            return Err(rusb::Error::NoMem);
        }
        let user_data = submitted.cast::<std::ffi::c_void>();
        // SAFETY: `transfer` is a fresh transfer with `packets` descriptors; `buffer_ptr` points
        // to `length` bytes owned by `submitted`, which lives until the callback; the handle
        // stays open as long (`_handle`). Timeout 0: the guest's drivers cancel what they give
        // up on (CMD_UNLINK), as they would on a real host controller.
        unsafe {
            let raw_handle = handle.as_raw();
            match kind {
                Kind::Control => {
                    ffi::libusb_fill_control_transfer(
                        transfer, raw_handle, buffer_ptr, finished, user_data, 0,
                    );
                    // The setup packet's wLength decides libusb's length; the buffer holds it.
                    (*transfer).length = length;
                }
                Kind::Bulk => ffi::libusb_fill_bulk_transfer(
                    transfer, raw_handle, endpoint, buffer_ptr, length, finished, user_data, 0,
                ),
                Kind::Interrupt => ffi::libusb_fill_interrupt_transfer(
                    transfer, raw_handle, endpoint, buffer_ptr, length, finished, user_data, 0,
                ),
                Kind::Isochronous => {
                    ffi::libusb_fill_iso_transfer(
                        transfer, raw_handle, endpoint, buffer_ptr, length, packets, finished, user_data, 0,
                    );
                    let descriptors = (*transfer).iso_packet_desc.as_mut_ptr();
                    for (i, &packet) in iso_lengths.iter().enumerate() {
                        (*descriptors.add(i)).length = packet;
                    }
                }
            }
            (*transfer).flags = flags;
        }
        // In the map before libusb may complete it.
        let mut map = self.lock();
        map.insert(seqnum, Raw(transfer));
        // SAFETY: `transfer` is filled; on success libusb owns it until the callback.
        let rc = unsafe { ffi::libusb_submit_transfer(transfer) };
        if rc != 0 {
            map.remove(&seqnum);
            drop(map);
            // SAFETY: not submitted: the callback will never run, so this side frees both.
            unsafe {
                ffi::libusb_free_transfer(transfer);
                drop(Box::from_raw(submitted));
            }
            return Err(error_from(rc));
        }
        Ok(())
    }

    /// Asks libusb to cancel transfer `seqnum` (it then finishes `…_CANCELLED`, or as it was
    /// about to). False when it is not in flight.
    pub fn cancel(&self, seqnum: u32) -> bool {
        let map = self.lock();
        let Some(raw) = map.get(&seqnum) else { return false };
        // SAFETY: in the map, so its callback has not freed it (the callback removes it under
        // this lock first).
        let rc = unsafe { ffi::libusb_cancel_transfer(raw.0) };
        rc == 0
    }

    /// Cancels every transfer in flight and waits up to `bound` for their callbacks (the
    /// event thread must be running). True when none is left.
    pub fn cancel_all(&self, bound: Duration) -> bool {
        let mut map = self.lock();
        for raw in map.values() {
            // SAFETY: as in `cancel`: in the map under its lock, so not freed.
            unsafe { ffi::libusb_cancel_transfer(raw.0) };
        }
        let deadline = Instant::now() + bound;
        while !map.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            map = self.emptied.wait_timeout(map, left).unwrap_or_else(|p| p.into_inner()).0;
        }
        true
    }
}

/// libusb's completion callback, on the event thread.
extern "system" fn finished(transfer: *mut ffi::libusb_transfer) {
    // SAFETY: libusb calls this exactly once per transfer submitted by `InFlight::submit`, whose
    // `user_data` is the `Box<Submitted>` leaked there; its isochronous descriptors number
    // `num_iso_packets` (0 for the other kinds).
    let (submitted, status, actual_length, iso) = unsafe {
        let submitted = Box::from_raw((*transfer).user_data.cast::<Submitted>());
        let t = &*transfer;
        let packets = usize::try_from(t.num_iso_packets).unwrap_or(0);
        let descriptors = t.iso_packet_desc.as_ptr();
        let iso: Vec<(u32, i32)> = (0..packets)
            .map(|i| {
                let d = &*descriptors.add(i);
                (d.actual_length, d.status)
            })
            .collect();
        (submitted, t.status, usize::try_from(t.actual_length).unwrap_or(0), iso)
    };
    let Submitted { seqnum, buffer, on_done, in_flight, _handle } = *submitted;
    {
        let mut map = in_flight.lock();
        map.remove(&seqnum);
        // SAFETY: out of the map under its lock: nothing will cancel it any more, and libusb is
        // done with it (its callback runs once, after the transfer left libusb's lists).
        unsafe { ffi::libusb_free_transfer(transfer) };
        if map.is_empty() {
            in_flight.emptied.notify_all();
        }
    }
    on_done(Finished { status, actual_length, buffer, iso });
}

/// A libusb return code as rusb's error.
fn error_from(rc: i32) -> rusb::Error {
    match rc {
        ffi::constants::LIBUSB_ERROR_IO => rusb::Error::Io,
        ffi::constants::LIBUSB_ERROR_INVALID_PARAM => rusb::Error::InvalidParam,
        ffi::constants::LIBUSB_ERROR_ACCESS => rusb::Error::Access,
        ffi::constants::LIBUSB_ERROR_NO_DEVICE => rusb::Error::NoDevice,
        ffi::constants::LIBUSB_ERROR_NOT_FOUND => rusb::Error::NotFound,
        ffi::constants::LIBUSB_ERROR_BUSY => rusb::Error::Busy,
        ffi::constants::LIBUSB_ERROR_TIMEOUT => rusb::Error::Timeout,
        ffi::constants::LIBUSB_ERROR_OVERFLOW => rusb::Error::Overflow,
        ffi::constants::LIBUSB_ERROR_PIPE => rusb::Error::Pipe,
        ffi::constants::LIBUSB_ERROR_INTERRUPTED => rusb::Error::Interrupted,
        ffi::constants::LIBUSB_ERROR_NO_MEM => rusb::Error::NoMem,
        ffi::constants::LIBUSB_ERROR_NOT_SUPPORTED => rusb::Error::NotSupported,
        _ => rusb::Error::Other,
    }
}
