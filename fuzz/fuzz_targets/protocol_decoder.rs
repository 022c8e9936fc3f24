//! Fuzzes the session protocol's stream decoder and datagram decoder with what a peer
//! controls: the bytes and how they are split into chunks. The decoder must never panic, never
//! buffer more than the channel's body limit, and every message it accepts must encode back to
//! bytes that decode to the same message (so the peer's view and ours cannot differ). Display
//! streams then go through `FrameSequence`: an update it lets through lies within its frame,
//! and a palette tile's indices unpack to pixels or an error.
//! The agent channel (what a guest sends its VM process over vsock) goes through the decoder
//! and through the VM process's `HostLink`: one `Connected` at most, and only first. Clipboard
//! messages (what a client or a guest sends) go through the decoder and through the VM
//! process's `ClipboardRelay` under every policy: what a policy forbids never reaches the
//! other end, and whatever the relay sends encodes. File messages go through the decoder and
//! the VM process's `FileRelay`: with files forbidden nothing reaches the guest, and what does
//! comes in order, within the window the guest's answers opened. USB/IP streams (a redirected
//! device's, both ways) go through `UsbipLink`: what it accepts re-encodes to the bytes it
//! came from, and it never holds more URBs than its limit. USB channel messages go through the
//! decoder and through the VM process's `UsbRelay`: a device the policy denies is never
//! attached in the guest, nothing reaches a device's guest stream before that stream presented
//! its attach's token, and whatever the relay sends encodes.
//!
//! The first byte picks what is fuzzed (its low four bits) and, for the relays, the policy (its
//! high bits).

#![no_main]

use libfuzzer_sys::fuzz_target;
use pleiades_protocol::agent::{HostEvent, HostLink};
use pleiades_protocol::clipboard::{ClipboardPolicy, ClipboardRelay, End};
use pleiades_protocol::files::FileRelay;
use pleiades_protocol::usb::{UsbOut, UsbPolicy, UsbRelay};
use pleiades_protocol::wire::{
    AgentMessage, ChannelMessage, ClipboardMessage, ControlMessage, CursorMessage, DisplayMessage,
    FILE_WINDOW, FileMessage, FrameBegin, FrameSequence, InputMessage, Rect, StreamDecoder, Tile, TileData,
    UsbMessage, decode_datagram, encode_datagram, encode_to_vec, palette,
};

fn run<M: ChannelMessage + PartialEq + Clone>(chunk_sizes: &[u8], mut data: &[u8]) -> Vec<M> {
    let mut decoder = StreamDecoder::<M>::new();
    let mut sizes = chunk_sizes.iter().cycle();
    let mut messages = Vec::new();
    while !data.is_empty() {
        // A chunk size of 0 means "everything left": the in-place fast path.
        let size = usize::from(*sizes.next().unwrap_or(&0));
        let n = if size == 0 { data.len() } else { size.min(data.len()) };
        let (mut chunk, rest) = data.split_at(n);
        data = rest;
        let result = loop {
            match decoder.decode(&mut chunk) {
                Ok(Some(message)) => messages.push(message),
                Ok(None) => break Ok(()),
                Err(error) => break Err(error),
            }
        };
        assert!(decoder.buffer_capacity() <= M::CHANNEL.max_body() as usize);
        if result.is_err() {
            assert!(decoder.finish().is_err(), "a failed decoder stays failed");
            break;
        }
    }
    let _ = decoder.finish();
    for message in &messages {
        let bytes = encode_to_vec(message).expect("a decoded message encodes");
        let mut again = StreamDecoder::<M>::new();
        let mut slice = bytes.as_slice();
        let decoded = again.decode(&mut slice).expect("re-encoded message decodes");
        assert!(slice.is_empty());
        assert!(decoded.as_ref() == Some(message), "round trip changed {message:?}");
    }
    messages
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else { return };
    let (sizes, body) = rest.split_at(rest.len().min(4));
    match selector & 0x0f {
        0 => drop(run::<ControlMessage>(sizes, body)),
        1 => drop(run::<InputMessage>(sizes, body)),
        2 => {
            // Then the stream-level rules a client applies before drawing.
            let mut sequence = FrameSequence::new();
            for message in run::<DisplayMessage>(sizes, body) {
                if sequence.check(&message).is_err() {
                    break;
                }
                let inside = |rect: &Rect, frame: &FrameBegin| {
                    rect.x + rect.width <= frame.width && rect.y + rect.height <= frame.height
                };
                match (&message, sequence.open_frame()) {
                    (DisplayMessage::Tile(Tile { rect, data }), Some(frame)) => {
                        assert!(inside(rect, frame));
                        // Palette indices as they are: pixels or an error, never a panic.
                        if let TileData::Palette { colours, zstd: false, indices } = data
                            && rect.bgrx_len() <= 1 << 20
                        {
                            let mut out = vec![0; rect.bgrx_len() as usize];
                            let _ = palette::unpack(colours, indices, rect.width, rect.height, &mut out);
                        }
                    }
                    // A copy reads and writes only within the scanout.
                    (DisplayMessage::Copy(copy), Some(frame)) => {
                        assert!(inside(&copy.src, frame) && inside(&copy.dst(), frame));
                    }
                    _ => {}
                }
            }
        }
        3 => drop(run::<CursorMessage>(sizes, body)),
        4 => {
            if let Ok(Some(datagram)) = decode_datagram(body) {
                assert_eq!(decode_datagram(&encode_datagram(&datagram)), Ok(Some(datagram)));
            }
        }
        5 => drop(run::<AgentMessage>(sizes, body)),
        7 => drop(run::<ClipboardMessage>(sizes, body)),
        8 => relay(selector, body),
        9 => drop(run::<FileMessage>(sizes, body)),
        10 => file_relay(selector, body),
        11 => usbip(sizes, body),
        12 => drop(run::<UsbMessage>(sizes, body)),
        13 => usb_relay(selector, body),
        _ => {
            let mut link = HostLink::new();
            let mut events = Vec::new();
            let mut sizes = sizes.iter().cycle();
            let mut data = body;
            while !data.is_empty() {
                let size = usize::from(*sizes.next().unwrap_or(&0));
                let (chunk, rest) = data.split_at(if size == 0 { data.len() } else { size.min(data.len()) });
                data = rest;
                match link.receive(chunk) {
                    Ok(new) => events.extend(new),
                    Err(_) => {
                        assert!(link.receive(b"").is_err(), "a failed link stays failed");
                        break;
                    }
                }
            }
            let connected = events.iter().filter(|e| matches!(e, HostEvent::Connected { .. })).count();
            assert!(connected <= 1);
            if !events.is_empty() {
                assert!(matches!(events[0], HostEvent::Connected { .. }), "hello first");
            }
            // What the host answers is one Welcome at most, in the agent channel's framing.
            let out = link.take_output();
            let mut slice = out.as_slice();
            let mut decoder = StreamDecoder::<AgentMessage>::new();
            let mut answers = 0;
            while let Some(message) = decoder.decode(&mut slice).expect("the host's output decodes") {
                assert!(!message.from_agent());
                answers += 1;
            }
            assert_eq!(answers, connected);
        }
    }
});

/// The clipboard relay with both ends sending what the fuzzer decodes (each message's end from
/// its position), ends coming and going, under the policy the selector's high bits pick.
fn relay(selector: u8, body: &[u8]) {
    let policy = ClipboardPolicy { to_guest: selector & 0x40 != 0, from_guest: selector & 0x80 != 0 };
    let mut relay = ClipboardRelay::new(policy);
    relay.connected(End::Client);
    relay.connected(End::Guest);
    let messages = run::<ClipboardMessage>(&[0], body);
    for (i, message) in messages.into_iter().enumerate() {
        let from = if i % 2 == 0 { End::Client } else { End::Guest };
        match i % 11 {
            9 => relay.disconnected(from),
            10 => relay.connected(from),
            _ => {}
        }
        relay.from_end(from, message);
        while let Some((to, sent)) = relay.poll_transmit() {
            encode_to_vec(&sent).expect("what the relay sends encodes");
            let allowed = match to {
                End::Guest => policy.to_guest,
                End::Client => policy.from_guest,
            };
            let content = match &sent {
                ClipboardMessage::Grab(g) => !g.formats.is_empty(),
                ClipboardMessage::Data(_) => true,
                _ => false,
            };
            assert!(allowed || !content, "the policy {policy:?} let {sent:?} through to {to:?}");
        }
        while relay.poll_event().is_some() {}
    }
}

/// The file relay with both ends sending what the fuzzer decodes (each message's end from its
/// position), ends coming and going, with files allowed or not (the selector's high bit).
fn file_relay(selector: u8, body: &[u8]) {
    use std::collections::HashMap;
    let allowed = selector & 0x80 != 0;
    let mut relay = FileRelay::new(allowed);
    relay.connected(End::Client);
    relay.connected(End::Guest);
    // Per transfer, as the client was told: where the guest's window ends, and the next offset
    // the guest gets.
    let mut window: HashMap<u32, (u64, u64)> = HashMap::new();
    for (i, message) in run::<FileMessage>(&[0], body).into_iter().enumerate() {
        let from = if i % 3 == 1 { End::Guest } else { End::Client };
        match i % 13 {
            11 => relay.disconnected(from),
            12 => relay.connected(from),
            _ => {}
        }
        relay.from_end(from, message);
        while let Some((to, sent)) = relay.poll_transmit() {
            encode_to_vec(&sent).expect("what the relay sends encodes");
            assert_eq!(to == End::Guest, sent.from_sender(), "{sent:?} went the wrong way");
            match &sent {
                FileMessage::Offer(_) | FileMessage::Data(_) => {
                    assert!(allowed, "files went in against the policy")
                }
                _ => {}
            }
            match sent {
                FileMessage::Accept { id, offset } => {
                    window.insert(id, (offset + FILE_WINDOW, offset));
                }
                FileMessage::Progress { id, received } => {
                    let w = window.get_mut(&id).expect("progress only after an accept");
                    w.0 = w.0.max(received + FILE_WINDOW);
                }
                FileMessage::Data(d) => {
                    let w = window.get_mut(&d.id).expect("data only after an accept");
                    assert_eq!(d.offset, w.1, "data in order");
                    w.1 += d.bytes.len() as u64;
                    assert!(w.1 <= w.0, "data beyond the window");
                }
                FileMessage::Done { id, .. }
                | FileMessage::Refused { id, .. }
                | FileMessage::Cancel { id, .. } => {
                    window.remove(&id);
                }
                FileMessage::Offer(o) => {
                    window.remove(&o.id);
                }
            }
        }
        while relay.poll_event().is_some() {}
        assert!(relay.transfers() <= pleiades_protocol::wire::MAX_FILE_TRANSFERS);
    }
}

/// A USB/IP link fed from both sides: each chunk goes to the side its size's low bit names.
fn usbip(sizes: &[u8], mut data: &[u8]) {
    use pleiades_protocol::usbip::{MAX_IN_FLIGHT, UsbipLink};
    let mut link = UsbipLink::new();
    let mut sizes = sizes.iter().cycle();
    let (mut from_guest, mut from_device) = (Vec::new(), Vec::new());
    while !data.is_empty() {
        let size = *sizes.next().unwrap_or(&0);
        let n = if size >> 1 == 0 { data.len() } else { usize::from(size >> 1).min(data.len()) };
        let (chunk, rest) = data.split_at(n);
        data = rest;
        let (decoded, seen) = if size & 1 == 0 {
            (link.from_guest(chunk), &mut from_guest)
        } else {
            (link.from_device(chunk), &mut from_device)
        };
        let Ok(pdus) = decoded else { break };
        seen.extend(chunk);
        for pdu in pdus {
            // Every PDU is exactly the bytes it came from (one encoding per value).
            let bytes = pdu.encode();
            assert!(seen.starts_with(&bytes), "{pdu:?} does not re-encode to its bytes");
            seen.drain(..bytes.len());
        }
        assert!(link.in_flight() <= MAX_IN_FLIGHT);
    }
}

/// The USB relay: the client's messages, the guest's device streams (a `Data` message at an odd
/// position stands for bytes on that device's vsock stream), streams that present a token (a
/// real one or not), streams and ends that go, the clock; under a policy that lets mass storage
/// in or nothing (the selector's high bit).
fn usb_relay(selector: u8, body: &[u8]) {
    use std::collections::{HashMap, HashSet};
    let policy = if selector & 0x80 != 0 { UsbPolicy::parse("class=08").unwrap() } else { UsbPolicy::NONE };
    let mut next = 0u64;
    let mut relay = UsbRelay::new(
        policy.clone(),
        Box::new(move || {
            next += 1;
            next * 0x9e37_79b9
        }),
    );
    relay.client_connected();
    relay.agent_connected(true);
    // What the client announced, the tokens the agent was given, the streams that connected.
    let mut announced: HashMap<u32, pleiades_protocol::wire::UsbDeviceInfo> = HashMap::new();
    let mut tokens: Vec<(u32, u64)> = Vec::new();
    let mut streams: HashSet<u32> = HashSet::new();
    for (i, message) in run::<UsbMessage>(&[0], body).into_iter().enumerate() {
        match (i % 11, &message) {
            (9, _) => relay.tick(),
            (10, UsbMessage::Detach { id }) => relay.guest_closed(*id),
            (8, UsbMessage::Attached { id }) => {
                // A stream presents the token of the attach this id names, or a made-up one.
                let token = tokens.iter().find(|(t, _)| t == id).map_or(u64::from(*id), |(_, token)| *token);
                if let Some(device) = relay.guest_connected(token) {
                    streams.insert(device);
                }
            }
            (7, UsbMessage::Refused { id, .. }) => relay.agent_answered(*id, Err("no port".into())),
            (6, UsbMessage::Detached { .. }) => {
                relay.client_disconnected();
                relay.client_connected();
            }
            _ => {}
        }
        match message {
            UsbMessage::Data { id, bytes } if i % 2 == 1 => relay.from_guest(id, &bytes),
            message => {
                if let UsbMessage::Attach(info) = &message {
                    announced.insert(info.id, info.clone());
                }
                relay.from_client(message);
            }
        }
        while let Some(out) = relay.poll_transmit() {
            match out {
                UsbOut::ToClient(sent) => {
                    encode_to_vec(&sent).expect("what the relay sends encodes");
                    if let UsbMessage::Data { id, .. } = &sent {
                        assert!(streams.contains(id), "data to the client from a device with no stream");
                    }
                    if let UsbMessage::Detached { id, .. } | UsbMessage::Refused { id, .. } = &sent {
                        streams.remove(id);
                    }
                }
                UsbOut::AttachInGuest { id, token, .. } => {
                    let info = announced.get(&id).expect("an attach for a device the client announced");
                    assert!(policy.allows(info), "a denied device was attached");
                    tokens.retain(|(t, _)| *t != id);
                    tokens.push((id, token));
                }
                UsbOut::ToGuest { id, bytes } => {
                    assert!(streams.contains(&id), "bytes for a device whose stream never connected");
                    assert!(!bytes.is_empty());
                }
                UsbOut::CloseGuest { id } => {
                    streams.remove(&id);
                }
            }
        }
        while relay.poll_event().is_some() {}
        assert!(relay.devices().count() <= pleiades_protocol::wire::MAX_USB_DEVICES);
    }
}
