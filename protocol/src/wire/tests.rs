//! Round trips of every message, the decoder's error policy, and property tests: arbitrary
//! messages survive encode → decode under any chunking; arbitrary bytes never panic and never
//! buffer more than the channel's limit.

use proptest::prelude::*;

use super::*;
use crate::handshake::Capabilities;

fn decode_one<M: ChannelMessage>(bytes: &[u8]) -> Result<Vec<M>, DecodeError> {
    let mut decoder = StreamDecoder::<M>::new();
    let mut out = Vec::new();
    decoder.decode_all(bytes, &mut out)?;
    decoder.finish()?;
    Ok(out)
}

fn round_trip<M: ChannelMessage + PartialEq + Clone>(message: M) {
    let bytes = encode_to_vec(&message).unwrap();
    let len = u32::from_le_bytes(bytes[2..6].try_into().unwrap()) as usize;
    assert_eq!(len + FRAME_HEADER_LEN, bytes.len());
    assert_eq!(decode_one::<M>(&bytes).unwrap(), vec![message.clone()]);
    // Byte by byte, through the buffering path.
    let mut decoder = StreamDecoder::<M>::new();
    let mut got = Vec::new();
    for b in &bytes {
        decoder.decode_all(std::slice::from_ref(b), &mut got).unwrap();
    }
    decoder.finish().unwrap();
    assert_eq!(got, vec![message]);
}

fn hello() -> Hello {
    Hello {
        version_min: 1,
        version_max: 1,
        capabilities: Capabilities::ZSTD_TILES | Capabilities::CURSOR_CHANNEL,
        ticket: "pt1.abc".into(),
        client_name: "client".into(),
    }
}

#[test]
fn control_round_trips() {
    round_trip(ControlMessage::Hello(hello()));
    round_trip(ControlMessage::Welcome(Welcome {
        version: 1,
        capabilities: Capabilities::H264,
        session_id: 0xdead_beef,
        server_name: "host-a".into(),
    }));
    round_trip(ControlMessage::Refused(Refused { code: RefuseCode::ReusedTicket, message: "used".into() }));
    round_trip(ControlMessage::Refused(Refused { code: RefuseCode::Other(999), message: String::new() }));
    round_trip(ControlMessage::Ping(Ping { nonce: 7, sent_us: 1_000 }));
    round_trip(ControlMessage::Pong(Pong { nonce: 7, sent_us: 1_000 }));
    round_trip(ControlMessage::DisplayLayout(vec![
        Monitor { id: 0, x: 0, y: 0, width: 1920, height: 1080 },
        Monitor { id: 1, x: -1280, y: 0, width: 1280, height: 1024 },
    ]));
    round_trip(ControlMessage::RequestLayout(vec![MonitorSize { width: 2560, height: 1440 }]));
    round_trip(ControlMessage::ClientStats(ClientStats {
        interval_us: 1_000_000,
        frames_presented: 59,
        frames_dropped: 1,
        bytes_received: 12_345_678,
        decode_us_mean: 2_100,
        rtt_us: 800,
    }));
    round_trip(ControlMessage::Goodbye(Goodbye { reason: GoodbyeReason::Idle, message: "bye".into() }));
    round_trip(ControlMessage::FrameAck(FrameAck { frame_id: 9, scanout: 0, received_us: 5, decoded_us: 8 }));
    round_trip(ControlMessage::ResumeToken(ResumeToken { token: "pr1.abc".into(), lifetime_s: 120 }));
    assert!(
        ControlMessage::ResumeToken(ResumeToken { token: String::new(), lifetime_s: 1 }).validate().is_err()
    );
}

#[test]
fn display_cursor_input_round_trips() {
    let rect = Rect { x: 64, y: 32, width: 2, height: 3 };
    round_trip(DisplayMessage::FrameBegin(FrameBegin {
        frame_id: 1,
        scanout: 0,
        width: 1920,
        height: 1080,
        capture_us: 42,
    }));
    round_trip(DisplayMessage::Tile(Tile { rect, data: TileData::Raw((0..24).collect()) }));
    round_trip(DisplayMessage::Tile(Tile { rect, data: TileData::Zstd(vec![0x28, 0xb5, 0x2f, 0xfd]) }));
    round_trip(DisplayMessage::Tile(Tile { rect, data: TileData::Solid(0x00ff_8000) }));
    // `rect` is 2x3: one byte of 1-bit indices a row.
    let palette =
        |zstd, indices| TileData::Palette { colours: vec![0x0018_1818, 0x00dc_dcdc], zstd, indices };
    round_trip(DisplayMessage::Tile(Tile { rect, data: palette(false, vec![0x40, 0x80, 0]) }));
    round_trip(DisplayMessage::Tile(Tile { rect, data: palette(true, vec![0x28, 0xb5, 0x2f, 0xfd]) }));
    for (data, why) in [
        (palette(false, vec![0x40, 0x80]), "indices short of the tile's size"),
        (palette(true, vec![]), "empty zstd indices"),
        (TileData::Palette { colours: vec![1], zstd: false, indices: vec![0; 3] }, "one colour"),
        (TileData::Palette { colours: (0..17).collect(), zstd: true, indices: vec![1] }, "17 colours"),
    ] {
        let mut out = Vec::new();
        assert!(encode(&DisplayMessage::Tile(Tile { rect, data }), &mut out).is_err(), "{why}");
    }
    round_trip(DisplayMessage::Video(Video { rect, keyframe: true, data: vec![0, 0, 0, 1, 0x65] }));
    round_trip(DisplayMessage::FrameEnd(FrameEnd { frame_id: 1 }));
    round_trip(DisplayMessage::Copy(CopyRect { src: rect, dst_x: 64, dst_y: 0 }));
    round_trip(CursorMessage::Shape(CursorShape {
        serial: 3,
        width: 2,
        height: 2,
        hot_x: 1,
        hot_y: 0,
        bgra: vec![0xff; 16],
    }));
    round_trip(CursorMessage::Position(CursorPosition { seq: 1, scanout: 0, x: -3, y: 7, visible: true }));
    round_trip(InputMessage::Key(Key { code: 30, down: true }));
    round_trip(InputMessage::PointerAbs(PointerAbs { scanout: 1, x: 100, y: 200 }));
    round_trip(InputMessage::Buttons(buttons::LEFT | buttons::MIDDLE));
    round_trip(InputMessage::Wheel(Wheel { dx: 0, dy: -120 }));
    round_trip(InputMessage::ReleaseAll);
}

#[test]
fn key_layout_is_as_documented() {
    let bytes = encode_to_vec(&InputMessage::Key(Key { code: 30, down: true })).unwrap();
    assert_eq!(bytes, [0x01, 0x01, 3, 0, 0, 0, 30, 0, 1]);
}

#[test]
fn hello_layout_is_as_documented() {
    // The worked example in docs/protocol.md.
    let bytes = encode_to_vec(&ControlMessage::Hello(Hello {
        version_min: 1,
        version_max: 1,
        capabilities: Capabilities::ZSTD_TILES
            | Capabilities::CURSOR_CHANNEL
            | Capabilities::CURSOR_DATAGRAMS,
        ticket: "pt1.AAAA".into(),
        client_name: "laptop".into(),
    }))
    .unwrap();
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(
        hex,
        "0100\
         1e000000\
         0100\
         0100\
         0d00000000000000\
         0800\
         7074312e41414141\
         0600\
         6c6170746f70"
    );
}

#[test]
fn unknown_types_are_skipped_and_counted() {
    let mut bytes = vec![0xff, 0x7f, 3, 0, 0, 0, 1, 2, 3]; // type 0x7fff, 3-byte body
    bytes.extend(encode_to_vec(&InputMessage::ReleaseAll).unwrap());
    bytes.extend([0x09, 0x01, 0, 0, 0, 0]); // 0x0109: an input type this version lacks
    let mut decoder = StreamDecoder::<InputMessage>::new();
    let mut got = Vec::new();
    for chunk in bytes.chunks(2) {
        decoder.decode_all(chunk, &mut got).unwrap();
    }
    decoder.finish().unwrap();
    assert_eq!(got, [InputMessage::ReleaseAll]);
    assert_eq!(decoder.skipped(), 2);
    assert_eq!(decoder.decoded(), 1);
}

#[test]
fn oversize_is_refused_on_the_header() {
    let mut header = types::TILE.to_le_bytes().to_vec();
    header.extend((Channel::Display.max_body() + 1).to_le_bytes());
    let mut decoder = StreamDecoder::<DisplayMessage>::new();
    let err = decoder.decode(&mut header.as_slice()).unwrap_err();
    assert!(matches!(err, DecodeError::TooLarge { len, .. } if len == Channel::Display.max_body() + 1));
    assert_eq!(decoder.buffer_capacity(), 0);
    // The decoder stays failed.
    assert_eq!(decoder.decode(&mut &[0u8; 4][..]).unwrap_err(), err);
    assert_eq!(decoder.finish().unwrap_err(), err);
    // Unknown types are bounded by the same limit.
    let mut header = 0x02ffu16.to_le_bytes().to_vec();
    header.extend((Channel::Input.max_body() + 1).to_le_bytes());
    assert!(matches!(
        StreamDecoder::<InputMessage>::new().decode(&mut header.as_slice()),
        Err(DecodeError::TooLarge { .. })
    ));
}

#[test]
fn wrong_channel_and_malformed_end_the_channel() {
    let key = encode_to_vec(&InputMessage::Key(Key { code: 1, down: false })).unwrap();
    assert_eq!(
        decode_one::<ControlMessage>(&key),
        Err(DecodeError::WrongChannel {
            channel: Channel::Control,
            ty: types::KEY,
            belongs_to: Channel::Input
        })
    );
    let mut bad_bool = key.clone();
    bad_bool[8] = 2;
    assert!(matches!(decode_one::<InputMessage>(&bad_bool), Err(DecodeError::Malformed { .. })));
    let mut trailing = key.clone();
    trailing[2] = 4;
    trailing.push(0);
    assert!(matches!(decode_one::<InputMessage>(&trailing), Err(DecodeError::Malformed { .. })));
    let mut short = key;
    short[2] = 2;
    short.pop();
    assert!(matches!(decode_one::<InputMessage>(&short), Err(DecodeError::Malformed { .. })));
}

#[test]
fn truncated_stream_is_reported() {
    let bytes = encode_to_vec(&InputMessage::Wheel(Wheel { dx: 1, dy: 2 })).unwrap();
    for cut in 1..bytes.len() {
        let mut decoder = StreamDecoder::<InputMessage>::new();
        let mut got = Vec::new();
        decoder.decode_all(&bytes[..cut], &mut got).unwrap();
        assert!(got.is_empty());
        assert_eq!(
            decoder.finish(),
            Err(DecodeError::Truncated {
                channel: Channel::Input,
                have: cut,
                need: if cut < FRAME_HEADER_LEN { FRAME_HEADER_LEN } else { bytes.len() }
            })
        );
    }
}

#[test]
fn semantic_checks() {
    let bad = [
        DisplayMessage::Tile(Tile {
            rect: Rect { x: 0, y: 0, width: 0, height: 1 },
            data: TileData::Solid(0),
        }),
        DisplayMessage::Tile(Tile {
            rect: Rect { x: 0, y: 0, width: 2, height: 2 },
            data: TileData::Raw(vec![0; 15]),
        }),
        DisplayMessage::Tile(Tile {
            rect: Rect { x: MAX_DIMENSION, y: 0, width: 1, height: 1 },
            data: TileData::Solid(0),
        }),
        DisplayMessage::Video(Video {
            rect: Rect { x: 0, y: 0, width: 16, height: 16 },
            keyframe: false,
            data: vec![],
        }),
        DisplayMessage::FrameBegin(FrameBegin {
            frame_id: 0,
            scanout: 0,
            width: 0,
            height: 1,
            capture_us: 0,
        }),
    ];
    for message in bad {
        assert!(matches!(encode_to_vec(&message), Err(EncodeError::Invalid { .. })), "{message:?}");
    }
    let too_many = ControlMessage::RequestLayout(vec![MonitorSize { width: 1, height: 1 }; MAX_MONITORS + 1]);
    assert!(encode_to_vec(&too_many).is_err());
    let same_id = ControlMessage::DisplayLayout(vec![Monitor { id: 0, x: 0, y: 0, width: 1, height: 1 }; 2]);
    assert!(encode_to_vec(&same_id).is_err());
    let hot = CursorMessage::Shape(CursorShape {
        serial: 0,
        width: 1,
        height: 1,
        hot_x: 1,
        hot_y: 0,
        bgra: vec![0; 4],
    });
    assert!(encode_to_vec(&hot).is_err());
    let long_ticket = ControlMessage::Hello(Hello { ticket: "x".repeat(MAX_TICKET_LEN + 1), ..hello() });
    assert!(encode_to_vec(&long_ticket).is_err());
    let named = ControlMessage::Refused(Refused { code: RefuseCode::Other(1), message: String::new() });
    assert!(encode_to_vec(&named).is_err(), "one encoding per value");
    let versions = ControlMessage::Hello(Hello { version_min: 2, version_max: 1, ..hello() });
    assert!(encode_to_vec(&versions).is_err());
    // A raw tile over the display limit is refused by the encoder, and `out` is untouched.
    let huge = DisplayMessage::Tile(Tile {
        rect: Rect { x: 0, y: 0, width: 4096, height: 2049 },
        data: TileData::Raw(vec![0; 4096 * 2049 * 4]),
    });
    let mut out = vec![1, 2, 3];
    assert!(matches!(encode(&huge, &mut out), Err(EncodeError::TooLarge { .. })));
    assert_eq!(out, [1, 2, 3]);
}

#[test]
fn datagrams() {
    let position = CursorPosition { seq: 5, scanout: 0, x: 10, y: -1, visible: false };
    let bytes = encode_datagram(&Datagram::CursorPosition(position));
    assert_eq!(bytes[..3], [3, 0x02, 0x03]);
    assert_eq!(decode_datagram(&bytes), Ok(Some(Datagram::CursorPosition(position))));
    assert_eq!(decode_datagram(&[3, 0xff, 0x03, 1]), Ok(None));
    assert_eq!(decode_datagram(&[3]), Err(DatagramError::TooShort(1)));
    assert_eq!(decode_datagram(&[9, 0, 0]), Err(DatagramError::Channel(ChannelError::Unknown(9))));
    assert_eq!(
        decode_datagram(&[5, 0x04, 0x05, 0, 0, 0, 0, 1]),
        Err(DatagramError::NotADatagram { channel: Channel::Usb, ty: types::USB_DATA })
    );
    assert_eq!(
        decode_datagram(&[3, 0x01, 0x03]),
        Err(DatagramError::NotADatagram { channel: Channel::Cursor, ty: types::CURSOR_SHAPE })
    );
    assert!(matches!(decode_datagram(&bytes[..bytes.len() - 1]), Err(DatagramError::Malformed { .. })));
}

#[test]
fn channels_and_preludes() {
    for channel in Channel::ALL {
        assert_eq!(Channel::from_id(channel.id()), Ok(channel));
    }
    assert_eq!(Channel::from_uni_prelude(0), Err(ChannelError::ControlOnUniStream));
    assert_eq!(Channel::from_uni_prelude(2), Ok(Channel::Display));
    assert_eq!(Channel::from_uni_prelude(6), Ok(Channel::Clipboard));
    assert_eq!(Channel::from_uni_prelude(5), Ok(Channel::Usb));
    assert_eq!(Channel::from_uni_prelude(4), Err(ChannelError::DatagramsOnly(Channel::Audio)));
    assert_eq!(Channel::from_uni_prelude(200), Err(ChannelError::Unknown(200)));
    // The agent channel is framed like the others but never part of a session.
    assert_eq!(Channel::from_uni_prelude(7), Err(ChannelError::NotOnSession(Channel::Agent)));
    assert_eq!(crate::transport::stream_prelude(Channel::Cursor), [3]);
}

#[test]
fn encode_head_leaves_the_payload_out() {
    let tile = DisplayMessage::Tile(Tile {
        rect: Rect { x: 0, y: 0, width: 1, height: 2 },
        data: TileData::Raw(vec![9; 8]),
    });
    let mut head = Vec::new();
    let payload = encode_head(&tile, &mut head).unwrap();
    assert_eq!(payload, [9; 8]);
    assert_eq!(head.len(), FRAME_HEADER_LEN + 16 + 1);
    assert_eq!(u32::from_le_bytes(head[2..6].try_into().unwrap()), 16 + 1 + 8);
}

#[test]
fn frame_sequence() {
    let begin = |frame_id| {
        DisplayMessage::FrameBegin(FrameBegin { frame_id, scanout: 0, width: 100, height: 50, capture_us: 0 })
    };
    let tile = |x, y, width, height| {
        DisplayMessage::Tile(Tile { rect: Rect { x, y, width, height }, data: TileData::Solid(0) })
    };
    let end = |frame_id| DisplayMessage::FrameEnd(FrameEnd { frame_id });
    let mut seq = FrameSequence::new();
    assert_eq!(seq.check(&tile(0, 0, 1, 1)), Err(SequenceError::UpdateOutsideFrame));
    seq.check(&begin(5)).unwrap();
    seq.check(&tile(0, 0, 100, 50)).unwrap();
    seq.check(&tile(99, 49, 1, 1)).unwrap();
    assert!(matches!(seq.check(&tile(99, 0, 2, 1)), Err(SequenceError::OutsideScanout { .. })));
    assert!(matches!(seq.check(&tile(0, 50, 1, 1)), Err(SequenceError::OutsideScanout { .. })));
    // A copy's source and destination both lie within the scanout.
    let copy = |y, dst_y| {
        DisplayMessage::Copy(CopyRect { src: Rect { x: 0, y, width: 100, height: 40 }, dst_x: 0, dst_y })
    };
    seq.check(&copy(10, 0)).unwrap();
    assert!(
        matches!(seq.check(&copy(20, 0)), Err(SequenceError::OutsideScanout { .. })),
        "source past the bottom"
    );
    assert!(
        matches!(seq.check(&copy(0, 11)), Err(SequenceError::OutsideScanout { .. })),
        "destination past it"
    );
    assert_eq!(seq.check(&begin(6)), Err(SequenceError::NestedFrame { open: 5, frame_id: 6 }));
    assert_eq!(seq.check(&end(4)), Err(SequenceError::FrameEndMismatch { open: Some(5), frame_id: 4 }));
    seq.check(&end(5)).unwrap();
    assert_eq!(seq.open_frame(), None);
    assert_eq!(seq.check(&end(5)), Err(SequenceError::FrameEndMismatch { open: None, frame_id: 5 }));
    assert_eq!(seq.check(&begin(5)), Err(SequenceError::FrameIdNotIncreasing { previous: 5, frame_id: 5 }));
    seq.check(&begin(9)).unwrap();
}

#[test]
fn control_message_directions() {
    let hello = ControlMessage::Hello(hello());
    assert!(hello.may_be_sent_by(Side::Client) && !hello.may_be_sent_by(Side::Server));
    assert!(hello.is_handshake());
    let layout = ControlMessage::DisplayLayout(vec![Monitor { id: 0, x: 0, y: 0, width: 1, height: 1 }]);
    assert!(layout.may_be_sent_by(Side::Server) && !layout.may_be_sent_by(Side::Client));
    let ping = ControlMessage::Ping(Ping { nonce: 0, sent_us: 0 });
    assert!(ping.may_be_sent_by(Side::Client) && ping.may_be_sent_by(Side::Server) && !ping.is_handshake());
}

// ---- property tests ----

fn text(max: usize) -> impl Strategy<Value = String> {
    proptest::collection::vec(any::<char>(), 0..=max / 4).prop_map(|chars| chars.into_iter().collect())
}

fn rect() -> impl Strategy<Value = Rect> {
    (1u32..=64, 1u32..=64, 0u32..=MAX_DIMENSION - 64, 0u32..=MAX_DIMENSION - 64)
        .prop_map(|(width, height, x, y)| Rect { x, y, width, height })
}

fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<u8>(), 1..=max)
}

fn control() -> impl Strategy<Value = ControlMessage> {
    let monitor = (any::<i32>(), any::<i32>(), 1u32..=MAX_DIMENSION, 1u32..=MAX_DIMENSION)
        .prop_map(|(x, y, width, height)| Monitor { id: 0, x, y, width, height });
    prop_oneof![
        (any::<u16>(), any::<u16>(), any::<u64>(), text(MAX_TICKET_LEN), text(MAX_NAME_LEN)).prop_map(
            |(a, b, caps, ticket, client_name)| ControlMessage::Hello(Hello {
                version_min: a.min(b),
                version_max: a.max(b),
                capabilities: Capabilities::from_bits(caps),
                ticket,
                client_name,
            })
        ),
        (any::<u16>(), any::<u64>(), any::<u64>(), text(MAX_NAME_LEN)).prop_map(
            |(version, caps, session_id, name)| {
                ControlMessage::Welcome(Welcome {
                    version,
                    capabilities: Capabilities::from_bits(caps),
                    session_id,
                    server_name: name,
                })
            }
        ),
        (any::<u16>(), text(MAX_TEXT_LEN)).prop_map(|(code, message)| ControlMessage::Refused(Refused {
            code: RefuseCode::from_u16(code),
            message
        })),
        (any::<u64>(), any::<u64>())
            .prop_map(|(nonce, sent_us)| ControlMessage::Ping(Ping { nonce, sent_us })),
        (any::<u64>(), any::<u64>())
            .prop_map(|(nonce, sent_us)| ControlMessage::Pong(Pong { nonce, sent_us })),
        proptest::collection::vec(monitor, 1..=MAX_MONITORS).prop_map(|mut monitors| {
            for (i, m) in monitors.iter_mut().enumerate() {
                m.id = i as u32 * 3;
            }
            ControlMessage::DisplayLayout(monitors)
        }),
        proptest::collection::vec(
            (1u32..=MAX_DIMENSION, 1u32..=MAX_DIMENSION)
                .prop_map(|(width, height)| MonitorSize { width, height }),
            1..=MAX_MONITORS
        )
        .prop_map(ControlMessage::RequestLayout),
        (any::<[u32; 5]>(), any::<u64>()).prop_map(|(v, bytes_received)| ControlMessage::ClientStats(
            ClientStats {
                interval_us: v[0],
                frames_presented: v[1],
                frames_dropped: v[2],
                bytes_received,
                decode_us_mean: v[3],
                rtt_us: v[4],
            }
        )),
        (any::<u16>(), text(MAX_TEXT_LEN)).prop_map(|(reason, message)| ControlMessage::Goodbye(Goodbye {
            reason: GoodbyeReason::from_u16(reason),
            message
        })),
        (any::<u64>(), any::<u32>(), any::<u64>(), any::<u32>()).prop_map(
            |(frame_id, scanout, received_us, d)| {
                ControlMessage::FrameAck(FrameAck {
                    frame_id,
                    scanout,
                    received_us,
                    decoded_us: received_us.saturating_add(u64::from(d)),
                })
            }
        ),
    ]
}

fn display() -> impl Strategy<Value = DisplayMessage> {
    prop_oneof![
        (any::<u64>(), any::<u32>(), 1u32..=MAX_DIMENSION, 1u32..=MAX_DIMENSION, any::<u64>()).prop_map(
            |(frame_id, scanout, width, height, capture_us)| DisplayMessage::FrameBegin(FrameBegin {
                frame_id,
                scanout,
                width,
                height,
                capture_us
            })
        ),
        (rect(), any::<u8>()).prop_map(|(rect, fill)| {
            let len = rect.bgrx_len() as usize;
            DisplayMessage::Tile(Tile { rect, data: TileData::Raw(vec![fill; len]) })
        }),
        (rect(), bytes(512))
            .prop_map(|(rect, data)| DisplayMessage::Tile(Tile { rect, data: TileData::Zstd(data) })),
        (rect(), any::<u32>())
            .prop_map(|(rect, bgrx)| DisplayMessage::Tile(Tile { rect, data: TileData::Solid(bgrx) })),
        (rect(), proptest::collection::vec(any::<u32>(), 2..=16), bytes(512)).prop_map(
            |(rect, colours, indices)| {
                DisplayMessage::Tile(Tile { rect, data: TileData::Palette { colours, zstd: true, indices } })
            }
        ),
        (rect(), any::<bool>(), bytes(512)).prop_map(|(rect, keyframe, data)| DisplayMessage::Video(Video {
            rect,
            keyframe,
            data
        })),
        any::<u64>().prop_map(|frame_id| DisplayMessage::FrameEnd(FrameEnd { frame_id })),
    ]
}

fn position() -> impl Strategy<Value = CursorPosition> {
    (any::<u64>(), any::<u32>(), any::<i32>(), any::<i32>(), any::<bool>())
        .prop_map(|(seq, scanout, x, y, visible)| CursorPosition { seq, scanout, x, y, visible })
}

fn cursor() -> impl Strategy<Value = CursorMessage> {
    prop_oneof![
        (any::<u32>(), 1u16..=64, 1u16..=64, any::<u16>(), any::<u16>(), any::<u8>()).prop_map(
            |(serial, width, height, hx, hy, fill)| CursorMessage::Shape(CursorShape {
                serial,
                width,
                height,
                hot_x: hx % width,
                hot_y: hy % height,
                bgra: vec![fill; usize::from(width) * usize::from(height) * 4],
            })
        ),
        position().prop_map(CursorMessage::Position),
    ]
}

fn input() -> impl Strategy<Value = InputMessage> {
    prop_oneof![
        (any::<u16>(), any::<bool>()).prop_map(|(code, down)| InputMessage::Key(Key { code, down })),
        (any::<u32>(), any::<u32>(), any::<u32>())
            .prop_map(|(scanout, x, y)| InputMessage::PointerAbs(PointerAbs { scanout, x, y })),
        any::<u32>().prop_map(InputMessage::Buttons),
        (any::<i32>(), any::<i32>()).prop_map(|(dx, dy)| InputMessage::Wheel(Wheel { dx, dy })),
        Just(InputMessage::ReleaseAll),
    ]
}

/// Encodes `messages` into one stream, decodes it in chunks of the given sizes.
fn stream_round_trip<M: ChannelMessage + PartialEq + Clone>(
    messages: &[M],
    chunk_sizes: &[usize],
) -> Result<(), TestCaseError> {
    let mut stream = Vec::new();
    for m in messages {
        let start = stream.len();
        encode(m, &mut stream).map_err(|e| TestCaseError::fail(e.to_string()))?;
        // Head + payload is the same bytes.
        let mut head = Vec::new();
        let payload = encode_head(m, &mut head).map_err(|e| TestCaseError::fail(e.to_string()))?;
        head.extend_from_slice(payload);
        prop_assert_eq!(&head[..], &stream[start..]);
    }
    let mut decoder = StreamDecoder::<M>::new();
    let mut got = Vec::new();
    let mut rest = stream.as_slice();
    let mut sizes = chunk_sizes.iter().cycle();
    while !rest.is_empty() {
        let n = (*sizes.next().unwrap_or(&1)).clamp(1, rest.len());
        let (chunk, tail) = rest.split_at(n);
        rest = tail;
        decoder.decode_all(chunk, &mut got).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert!(decoder.buffer_capacity() <= M::CHANNEL.max_body() as usize);
    }
    decoder.finish().map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert_eq!(got, messages.to_vec());
    Ok(())
}

/// Feeds arbitrary bytes in arbitrary chunks; must not panic or over-allocate.
fn garbage<M: ChannelMessage>(data: &[u8], chunk_sizes: &[usize]) -> Result<(), TestCaseError> {
    let mut decoder = StreamDecoder::<M>::new();
    let mut rest = data;
    let mut sizes = chunk_sizes.iter().cycle();
    let mut out = Vec::new();
    while !rest.is_empty() {
        let n = (*sizes.next().unwrap_or(&1)).clamp(1, rest.len());
        let (chunk, tail) = rest.split_at(n);
        rest = tail;
        let result = decoder.decode_all(chunk, &mut out);
        prop_assert!(decoder.buffer_capacity() <= M::CHANNEL.max_body() as usize);
        if result.is_err() {
            break;
        }
    }
    let _ = decoder.finish();
    Ok(())
}

fn clipboard_format() -> impl Strategy<Value = ClipboardFormat> {
    prop_oneof![Just(ClipboardFormat::Text), Just(ClipboardFormat::Html), Just(ClipboardFormat::Png)]
}

fn clipboard() -> impl Strategy<Value = ClipboardMessage> {
    let reason = prop_oneof![
        Just(RefuseReason::Gone),
        Just(RefuseReason::NoFormat),
        Just(RefuseReason::TooLarge),
        Just(RefuseReason::Policy),
        Just(RefuseReason::Failed),
        Just(RefuseReason::NotShared),
    ];
    prop_oneof![
        (any::<u32>(), proptest::sample::subsequence(ClipboardFormat::ALL.to_vec(), 0..=3))
            .prop_map(|(serial, formats)| ClipboardMessage::Grab(ClipboardGrab { serial, formats })),
        (any::<u32>(), clipboard_format())
            .prop_map(|(serial, format)| ClipboardMessage::Request(ClipboardRequest { serial, format })),
        (any::<u32>(), clipboard_format(), proptest::collection::vec(any::<u8>(), 1..2000), 0u32..100_000)
            .prop_map(|(serial, format, bytes, offset)| {
                let total = offset + bytes.len() as u32;
                ClipboardMessage::Data(ClipboardData { serial, format, offset, total, bytes })
            }),
        (any::<u32>(), clipboard_format(), reason).prop_map(|(serial, format, reason)| {
            ClipboardMessage::Refused(ClipboardRefused { serial, format, reason })
        }),
    ]
}

#[test]
fn clipboard_layouts_and_limits() {
    let grab = ClipboardMessage::Grab(ClipboardGrab {
        serial: 9,
        formats: vec![ClipboardFormat::Text, ClipboardFormat::Png],
    });
    assert_eq!(encode_to_vec(&grab).unwrap(), [0x01, 0x06, 7, 0, 0, 0, 9, 0, 0, 0, 2, 1, 3]);
    let data = ClipboardMessage::Data(ClipboardData {
        serial: 9,
        format: ClipboardFormat::Text,
        offset: 0,
        total: 2,
        bytes: b"hi".to_vec(),
    });
    assert_eq!(
        encode_to_vec(&data).unwrap(),
        [0x03, 0x06, 15, 0, 0, 0, 9, 0, 0, 0, 1, 0, 0, 0, 0, 2, 0, 0, 0, b'h', b'i']
    );
    // The same message on the agent link: its own type numbers, the same body.
    let on_agent = encode_to_vec(&AgentMessage::Clipboard(data.clone())).unwrap();
    assert_eq!(on_agent[..2], types::AGENT_CLIPBOARD_DATA.to_le_bytes());
    assert_eq!(on_agent[2..], encode_to_vec(&data).unwrap()[2..]);
    let invalid = |m: ClipboardMessage| matches!(encode_to_vec(&m), Err(EncodeError::Invalid { .. }));
    assert!(invalid(ClipboardMessage::Grab(ClipboardGrab {
        serial: 1,
        formats: vec![ClipboardFormat::Text, ClipboardFormat::Text]
    })));
    let chunk = |offset, total, len| {
        ClipboardMessage::Data(ClipboardData {
            serial: 1,
            format: ClipboardFormat::Png,
            offset,
            total,
            bytes: vec![0; len],
        })
    };
    assert!(invalid(chunk(10, 15, 6)), "beyond the end");
    assert!(invalid(chunk(0, MAX_CLIPBOARD_BYTES + 1, 10)), "over the content limit");
    assert!(invalid(chunk(0, 100_000, MAX_CLIPBOARD_CHUNK + 1)), "over the chunk limit");
    assert!(invalid(chunk(0, 5, 0)), "an empty chunk of something");
    assert!(!invalid(chunk(0, 0, 0)), "empty content is one empty chunk");
    // Chunking covers the content exactly.
    let content: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
    let chunks = ClipboardData::chunks(4, ClipboardFormat::Html, &content);
    assert!(chunks.last().unwrap().is_last() && !chunks[0].is_last());
    assert_eq!(chunks.iter().flat_map(|c| c.bytes.clone()).collect::<Vec<_>>(), content);
    // A clipboard type on another channel is an error, not a future message.
    let mut d = StreamDecoder::<ControlMessage>::new();
    assert!(matches!(
        d.decode(&mut encode_to_vec(&grab).unwrap().as_slice()),
        Err(DecodeError::WrongChannel { .. })
    ));
    assert!(
        ClipboardFormat::Png.accepts(b"\x89PNG\r\n\x1a\n...") && !ClipboardFormat::Png.accepts(b"GIF89a")
    );
    assert!(!ClipboardFormat::Text.accepts(&[0xff, 0xfe]));
}

fn file_message() -> impl Strategy<Value = FileMessage> {
    let reason = (0u8..10).prop_map(|r| FileRefuseReason::from_u8(r).unwrap());
    let name = "[a-zA-Z0-9 ._()é-]{1,40}".prop_filter("a plain name", |n| file_name_ok(n));
    prop_oneof![
        (any::<u32>(), 0..=MAX_FILE_BYTES, any::<[u8; 32]>(), name.clone())
            .prop_map(|(id, size, sha256, name)| FileMessage::Offer(FileOffer { id, size, sha256, name })),
        (any::<u32>(), 0..=MAX_FILE_BYTES).prop_map(|(id, offset)| FileMessage::Accept { id, offset }),
        (any::<u32>(), 0u64..MAX_FILE_BYTES - 2000, proptest::collection::vec(any::<u8>(), 1..2000))
            .prop_map(|(id, offset, bytes)| FileMessage::Data(FileData { id, offset, bytes })),
        (any::<u32>(), 0..=MAX_FILE_BYTES).prop_map(|(id, received)| FileMessage::Progress { id, received }),
        (any::<u32>(), name).prop_map(|(id, name)| FileMessage::Done { id, name }),
        (any::<u32>(), reason).prop_map(|(id, reason)| FileMessage::Refused { id, reason }),
        (any::<u32>(), any::<bool>()).prop_map(|(id, user)| FileMessage::Cancel {
            id,
            reason: if user { CancelReason::User } else { CancelReason::Interrupted }
        }),
    ]
}

#[test]
fn file_layouts_and_limits() {
    let offer = FileMessage::Offer(FileOffer { id: 2, size: 5, sha256: [0xab; 32], name: "a.txt".into() });
    let mut expected = vec![0x01, 0x08, 51, 0, 0, 0, 2, 0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0];
    expected.extend([0xab; 32]);
    expected.extend([5, 0, b'a', b'.', b't', b'x', b't']);
    assert_eq!(encode_to_vec(&offer).unwrap(), expected);
    let data = FileMessage::Data(FileData { id: 2, offset: 3, bytes: b"hi".to_vec() });
    assert_eq!(
        encode_to_vec(&data).unwrap(),
        [0x03, 0x08, 14, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0, b'h', b'i']
    );
    // The same message on the agent link: its own type numbers, the same body.
    let on_agent = encode_to_vec(&AgentMessage::Files(data.clone())).unwrap();
    assert_eq!(on_agent[..2], types::AGENT_FILE_DATA.to_le_bytes());
    assert_eq!(on_agent[2..], encode_to_vec(&data).unwrap()[2..]);
    let invalid = |m: FileMessage| matches!(encode_to_vec(&m), Err(EncodeError::Invalid { .. }));
    for name in ["", ".", "..", "a/b", "/etc/passwd", "tab\there", "nul\0", &"x".repeat(256)] {
        let name = name.to_owned();
        assert!(
            invalid(FileMessage::Offer(FileOffer { id: 1, size: 1, sha256: [0; 32], name: name.clone() })),
            "{name:?}"
        );
        assert!(invalid(FileMessage::Done { id: 1, name }));
    }
    assert!(!invalid(FileMessage::Offer(FileOffer {
        id: 1,
        size: 1,
        sha256: [0; 32],
        name: ".hidden (2).tar.gz".into()
    })));
    assert!(invalid(FileMessage::Offer(FileOffer {
        id: 1,
        size: MAX_FILE_BYTES + 1,
        sha256: [0; 32],
        name: "big".into()
    })));
    assert!(invalid(FileMessage::Data(FileData { id: 1, offset: 0, bytes: vec![] })), "an empty chunk");
    assert!(invalid(FileMessage::Data(FileData { id: 1, offset: 0, bytes: vec![0; MAX_FILE_CHUNK + 1] })));
    assert!(invalid(FileMessage::Data(FileData { id: 1, offset: u64::MAX, bytes: vec![0; 2] })), "wraps");
    assert!(invalid(FileMessage::Progress { id: 1, received: MAX_FILE_BYTES + 1 }));
    // Which side sends what, on the agent link.
    assert!(AgentMessage::Files(data.clone()).from_host() && !AgentMessage::Files(data).from_agent());
    let done = AgentMessage::Files(FileMessage::Done { id: 1, name: "a".into() });
    assert!(done.from_agent() && !done.from_host());
    // A file type on another channel is an error, not a future message.
    let mut d = StreamDecoder::<ClipboardMessage>::new();
    assert!(matches!(
        d.decode(&mut encode_to_vec(&offer).unwrap().as_slice()),
        Err(DecodeError::WrongChannel { .. })
    ));
    assert_eq!(Channel::from_uni_prelude(8), Ok(Channel::Files));
}

fn chunks() -> impl Strategy<Value = Vec<usize>> {
    proptest::collection::vec(1usize..300, 1..8)
}

proptest! {
    #[test]
    fn control_stream_round_trip(messages in proptest::collection::vec(control(), 0..8), sizes in chunks()) {
        stream_round_trip(&messages, &sizes)?;
    }

    #[test]
    fn display_stream_round_trip(messages in proptest::collection::vec(display(), 0..8), sizes in chunks()) {
        stream_round_trip(&messages, &sizes)?;
    }

    #[test]
    fn cursor_stream_round_trip(messages in proptest::collection::vec(cursor(), 0..8), sizes in chunks()) {
        stream_round_trip(&messages, &sizes)?;
    }

    #[test]
    fn input_stream_round_trip(messages in proptest::collection::vec(input(), 0..16), sizes in chunks()) {
        stream_round_trip(&messages, &sizes)?;
    }

    #[test]
    fn clipboard_stream_round_trip(messages in proptest::collection::vec(clipboard(), 0..8), sizes in chunks()) {
        stream_round_trip(&messages, &sizes)?;
        let on_agent: Vec<_> = messages.into_iter().map(AgentMessage::Clipboard).collect();
        stream_round_trip(&on_agent, &sizes)?;
    }

    #[test]
    fn files_stream_round_trip(messages in proptest::collection::vec(file_message(), 0..8), sizes in chunks()) {
        stream_round_trip(&messages, &sizes)?;
        let on_agent: Vec<_> = messages.into_iter().map(AgentMessage::Files).collect();
        stream_round_trip(&on_agent, &sizes)?;
    }

    #[test]
    fn datagram_round_trip(p in position()) {
        let datagram = Datagram::CursorPosition(p);
        prop_assert_eq!(decode_datagram(&encode_datagram(&datagram)), Ok(Some(datagram)));
    }

    #[test]
    fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..2048), sizes in chunks()) {
        garbage::<ControlMessage>(&data, &sizes)?;
        garbage::<InputMessage>(&data, &sizes)?;
        garbage::<DisplayMessage>(&data, &sizes)?;
        garbage::<CursorMessage>(&data, &sizes)?;
        garbage::<ClipboardMessage>(&data, &sizes)?;
        garbage::<FileMessage>(&data, &sizes)?;
        garbage::<AgentMessage>(&data, &sizes)?;
        let _ = decode_datagram(&data);
    }

    /// Valid headers with arbitrary bodies reach every body parser.
    #[test]
    fn arbitrary_bodies_never_panic(ty_index in 0usize..45, body in proptest::collection::vec(any::<u8>(), 0..600)) {
        const ALL: [u16; 45] = [
            types::HELLO, types::WELCOME, types::REFUSED, types::PING, types::PONG, types::DISPLAY_LAYOUT,
            types::REQUEST_LAYOUT, types::CLIENT_STATS, types::GOODBYE, types::FRAME_ACK, types::KEY,
            types::POINTER_ABS, types::BUTTONS, types::WHEEL, types::RELEASE_ALL, types::FRAME_BEGIN,
            types::TILE, types::VIDEO, types::FRAME_END, types::CURSOR_SHAPE, types::CURSOR_POSITION,
            types::RESUME_TOKEN, types::POINTER_REL, types::CLIPBOARD_GRAB, types::CLIPBOARD_REQUEST,
            types::CLIPBOARD_DATA, types::CLIPBOARD_REFUSED, types::AGENT_CLIPBOARD_GRAB,
            types::AGENT_CLIPBOARD_REQUEST, types::AGENT_CLIPBOARD_DATA, types::AGENT_CLIPBOARD_REFUSED,
            types::FILE_OFFER, types::FILE_ACCEPT, types::FILE_DATA, types::FILE_PROGRESS, types::FILE_DONE,
            types::FILE_REFUSED, types::FILE_CANCEL, types::AGENT_FILE_OFFER, types::AGENT_FILE_ACCEPT,
            types::AGENT_FILE_DATA, types::AGENT_FILE_PROGRESS, types::AGENT_FILE_DONE, types::AGENT_FILE_REFUSED,
            types::AGENT_FILE_CANCEL,
        ];
        let mut frame = ALL[ty_index].to_le_bytes().to_vec();
        frame.extend((body.len() as u32).to_le_bytes());
        frame.extend(&body);
        garbage::<ControlMessage>(&frame, &[frame.len()])?;
        garbage::<InputMessage>(&frame, &[frame.len()])?;
        garbage::<DisplayMessage>(&frame, &[frame.len()])?;
        garbage::<CursorMessage>(&frame, &[frame.len()])?;
        garbage::<ClipboardMessage>(&frame, &[frame.len()])?;
        garbage::<FileMessage>(&frame, &[frame.len()])?;
        garbage::<AgentMessage>(&frame, &[frame.len()])?;
    }
}

#[test]
fn audio_datagrams() {
    let packet = AudioPacket { seq: 7, timestamp_us: 123_456, opus: vec![0xfc, 1, 2] };
    let bytes = encode_datagram(&Datagram::AudioPlayback(packet.clone()));
    assert_eq!(bytes[..3], [4, 0x01, 0x04]);
    assert_eq!(bytes[3..7], 7u32.to_le_bytes());
    assert_eq!(bytes[15..17], 960u16.to_le_bytes());
    assert_eq!(decode_datagram(&bytes), Ok(Some(Datagram::AudioPlayback(packet.clone()))));
    let record = encode_datagram(&Datagram::AudioRecord(packet.clone()));
    assert_eq!(decode_datagram(&record), Ok(Some(Datagram::AudioRecord(packet))));
    let feedback = AudioFeedback { loss_permille: 20, delay_ms: 60 };
    let fb = encode_datagram(&Datagram::AudioFeedback(feedback));
    assert_eq!(fb, [4, 0x03, 0x04, 20, 0, 60, 0]);
    assert_eq!(decode_datagram(&fb), Ok(Some(Datagram::AudioFeedback(feedback))));
    assert!(Datagram::AudioFeedback(feedback).may_be_sent_by(Side::Client));
    assert!(
        !Datagram::AudioRecord(AudioPacket { seq: 0, timestamp_us: 0, opus: vec![1] })
            .may_be_sent_by(Side::Server)
    );
    // Malformed: no Opus bytes, another frame size, loss over 1000 ‰, a stream-only type.
    let malformed = |d: &[u8]| matches!(decode_datagram(d), Err(DatagramError::Malformed { .. }));
    assert!(malformed(&bytes[..17]));
    let mut other_size = bytes.clone();
    other_size[15] = 0x40;
    assert!(malformed(&other_size));
    assert!(malformed(&[4, 0x03, 0x04, 0xe9, 0x03, 0, 0]));
    assert!(malformed(&fb[..5]));
    let mut huge = bytes[..17].to_vec();
    huge.extend(vec![0u8; MAX_OPUS_BYTES + 1]);
    assert!(malformed(&huge));
    assert_eq!(decode_datagram(&[4, 0x7f, 0x04, 1]), Ok(None), "a future audio type is skipped");
}

proptest! {
    #[test]
    fn audio_datagrams_round_trip(seq in any::<u32>(), ts in any::<u64>(), opus in proptest::collection::vec(any::<u8>(), 1..=MAX_OPUS_BYTES)) {
        let d = Datagram::AudioPlayback(AudioPacket { seq, timestamp_us: ts, opus });
        let bytes = encode_datagram(&d);
        prop_assert!(bytes.len() <= MAX_DATAGRAM_SIZE);
        prop_assert_eq!(decode_datagram(&bytes), Ok(Some(d)));
    }

    #[test]
    fn arbitrary_audio_datagrams_never_panic(body in proptest::collection::vec(any::<u8>(), 0..1200)) {
        let mut d = vec![4u8, 0x01, 0x04];
        d.extend(body);
        let _ = decode_datagram(&d);
    }
}
