//! The vsock side of USB redirection, in the agent thread: the streams the guest's agent opens
//! to [`USB_PORT`], one per redirected device, each presenting its attach's token first and
//! then carrying the device's USB/IP stream, which the guest kernel's `vhci-hcd` speaks.
//! The relay itself (policy, tokens, USB/IP checks) is [`UsbRelay`]; this module only moves
//! its bytes and tells it what the streams do.
//!
//! Memory: what waits for a guest that does not read is bounded by [`MAX_PENDING`] per device;
//! over it the device is unplugged (a guest's kernel reads its devices' answers at once).

use std::collections::{HashMap, VecDeque};

use pleiades_protocol::agent::USB_PORT;
use pleiades_protocol::usb::{UsbOut, UsbRelay};
use pleiades_virtio::vsock::VsockHandle;
use pleiades_virtio::vsock::muxer::{ConnKey, Event};

/// Bytes waiting for one device's stream beyond the guest's credit: a few of the largest URB
/// answers ([`pleiades_protocol::usbip::MAX_TRANSFER`]).
const MAX_PENDING: usize = 16 << 20;

/// One stream on the USB port.
#[derive(Debug, Default)]
struct Stream {
    /// The token's bytes so far, until all 8 came.
    token: Vec<u8>,
    /// The device it carries, once its token matched.
    device: Option<u32>,
    /// Bytes for the guest that its credit did not let through yet.
    pending: VecDeque<u8>,
}

/// The USB port's streams.
#[derive(Debug, Default)]
pub struct UsbStreams {
    streams: HashMap<ConnKey, Stream>,
}

impl UsbStreams {
    /// Starts taking streams on the USB port.
    pub fn listen(vsock: &VsockHandle) {
        vsock.listen(USB_PORT);
    }

    /// Handles a vsock event if it is about a USB stream; `false` when it is not.
    pub fn on_event(&mut self, event: Event, vsock: &VsockHandle, relay: &mut UsbRelay) -> bool {
        match event {
            Event::Accepted(key) if key.host_port == USB_PORT => {
                self.streams.insert(key, Stream::default());
            }
            Event::Readable(key) if self.streams.contains_key(&key) => self.read(key, vsock, relay),
            Event::Writable(key) if self.streams.contains_key(&key) => self.flush(key, vsock, relay),
            Event::Closed(key) => {
                let Some(stream) = self.streams.remove(&key) else { return false };
                if let Some(id) = stream.device {
                    relay.guest_closed(id);
                }
            }
            _ => return false,
        }
        true
    }

    /// Carries out what the relay has for the guest's streams; hands on everything else.
    pub fn apply(&mut self, out: UsbOut, vsock: &VsockHandle, relay: &mut UsbRelay) -> Option<UsbOut> {
        match out {
            UsbOut::ToGuest { id, bytes } => {
                if let Some(key) = self.key_of(id) {
                    if let Some(stream) = self.streams.get_mut(&key) {
                        stream.pending.extend(bytes);
                    }
                    self.flush(key, vsock, relay);
                }
                None
            }
            UsbOut::CloseGuest { id } => {
                if let Some(key) = self.key_of(id) {
                    self.streams.remove(&key);
                    vsock.close(key);
                }
                None
            }
            other => Some(other),
        }
    }

    fn key_of(&self, id: u32) -> Option<ConnKey> {
        self.streams.iter().find(|(_, s)| s.device == Some(id)).map(|(key, _)| *key)
    }

    fn read(&mut self, key: ConnKey, vsock: &VsockHandle, relay: &mut UsbRelay) {
        let mut buf = [0u8; 64 * 1024];
        loop {
            let Some(stream) = self.streams.get_mut(&key) else { return };
            // The token first, and not a byte more: what follows is the device's.
            let want = if stream.device.is_none() { 8 - stream.token.len() } else { buf.len() };
            let n = match vsock.recv(key, &mut buf[..want]) {
                Ok(n) => n,
                Err(e) => {
                    tracing::warn!("usb: reading a device's stream failed: {e}");
                    return self.drop_stream(key, vsock, relay);
                }
            };
            if n == 0 {
                if vsock.at_end(key) {
                    return self.drop_stream(key, vsock, relay);
                }
                return;
            }
            match stream.device {
                Some(id) => relay.from_guest(id, &buf[..n]),
                None => {
                    stream.token.extend_from_slice(&buf[..n]);
                    if stream.token.len() == 8 {
                        let token = u64::from_le_bytes(stream.token[..].try_into().expect("8 bytes"));
                        match relay.guest_connected(token) {
                            Some(id) => stream.device = Some(id),
                            None => {
                                tracing::warn!(
                                    "usb: a stream on the USB port presented no attach's token; closed"
                                );
                                self.streams.remove(&key);
                                vsock.close(key);
                                return;
                            }
                        }
                    }
                }
            }
        }
    }

    fn flush(&mut self, key: ConnKey, vsock: &VsockHandle, relay: &mut UsbRelay) {
        let Some(stream) = self.streams.get_mut(&key) else { return };
        while !stream.pending.is_empty() {
            match vsock.send(key, stream.pending.make_contiguous()) {
                Ok(0) => break,
                Ok(n) => {
                    stream.pending.drain(..n);
                }
                Err(e) => {
                    tracing::warn!("usb: writing to a device's stream failed: {e}");
                    return self.drop_stream(key, vsock, relay);
                }
            }
        }
        if stream.pending.len() > MAX_PENDING {
            tracing::warn!("usb: the guest does not read a device's stream; unplugging it");
            self.drop_stream(key, vsock, relay);
        }
    }

    /// The stream is over: closed here, its device gone from the guest.
    fn drop_stream(&mut self, key: ConnKey, vsock: &VsockHandle, relay: &mut UsbRelay) {
        if let Some(stream) = self.streams.remove(&key) {
            vsock.close(key);
            if let Some(id) = stream.device {
                relay.guest_closed(id);
            }
        }
    }
}
