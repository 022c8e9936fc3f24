//! A whole session between a simulated client and server, on byte buffers and synthetic time:
//! the handshake over the control stream, a display stream with two frames paced by acks (one
//! ack lost), input, and cursor datagrams. It drives the crate the way the QUIC shells do.

use pleiades_protocol::handshake::{Capabilities, ClientHandshake, Refusal, ServerHandshake, ServerOutcome};
use pleiades_protocol::pacing::{FramePacer, PacerConfig};
use pleiades_protocol::ticket::{TicketClaims, TicketSigner, TicketVerifier};
use pleiades_protocol::transport::stream_prelude;
use pleiades_protocol::wire::{
    Channel, ChannelMessage, ControlMessage, CursorPosition, Datagram, DisplayMessage, FrameAck, FrameBegin,
    FrameEnd, FrameSequence, InputMessage, Key, Rect, Side, StreamDecoder, Tile, TileData, decode_datagram,
    encode, encode_datagram,
};

/// Delivers `bytes` to a decoder in small chunks, as a network would.
fn deliver<M: ChannelMessage>(decoder: &mut StreamDecoder<M>, bytes: &[u8]) -> Vec<M> {
    let mut out = Vec::new();
    for chunk in bytes.chunks(7) {
        decoder.decode_all(chunk, &mut out).unwrap();
    }
    out
}

/// The client's display side: check the sequence, draw raw tiles into an 8×4 surface, ack
/// each frame 2 ms after it arrived.
fn draw(
    sequence: &mut FrameSequence,
    surface: &mut [u8],
    messages: Vec<DisplayMessage>,
    acks: &mut Vec<FrameAck>,
    client_now: u64,
) {
    for m in messages {
        sequence.check(&m).unwrap();
        match m {
            DisplayMessage::Tile(Tile { rect, data: TileData::Raw(px) }) => {
                for row in 0..rect.height as usize {
                    let y = rect.y as usize + row;
                    let dst = (y * 8 + rect.x as usize) * 4;
                    let len = rect.width as usize * 4;
                    surface[dst..dst + len].copy_from_slice(&px[row * len..(row + 1) * len]);
                }
            }
            DisplayMessage::FrameEnd(end) => acks.push(FrameAck {
                frame_id: end.frame_id,
                scanout: 0,
                received_us: client_now,
                decoded_us: client_now + 2_000,
            }),
            _ => {}
        }
    }
}

#[test]
fn a_session_from_hello_to_paced_frames() {
    // The broker's ticket; the host's verifier.
    let signer = TicketSigner::from_pkcs8(&TicketSigner::generate_pkcs8().unwrap()).unwrap();
    let now_s = 1_700_000_000;
    let ticket = signer.issue(&TicketClaims::new("alice", "desk-1", "host-a", now_s, 60).unwrap()).unwrap();
    let mut verifier = TicketVerifier::new(signer.public_key(), "host-a");

    // Handshake on the control stream.
    let client_caps = Capabilities::CURSOR_CHANNEL | Capabilities::CURSOR_DATAGRAMS | Capabilities::H264;
    let mut client = ClientHandshake::new(&ticket, "laptop", client_caps);
    let mut to_server = Vec::new();
    encode(&client.hello(), &mut to_server).unwrap();
    let mut server_control = StreamDecoder::<ControlMessage>::new();
    let first = deliver(&mut server_control, &to_server);
    assert_eq!(first.len(), 1);
    assert!(first[0].may_be_sent_by(Side::Client));
    let server = ServerHandshake::new("host-a", Capabilities::SUPPORTED.difference(Capabilities::H264));
    let mut check = |t: &str| {
        let claims = verifier.verify(t, now_s + 1).map_err(Refusal::from)?;
        Ok(claims)
    };
    let ServerOutcome::Accept { reply, session: server_session, claims } =
        server.on_first_message(&first[0], 0x5e55_1011, &mut check)
    else {
        panic!("refused");
    };
    assert_eq!(claims.desktop, "desk-1");
    let mut to_client = Vec::new();
    encode(&reply, &mut to_client).unwrap();
    let mut client_control = StreamDecoder::<ControlMessage>::new();
    let answer = deliver(&mut client_control, &to_client);
    let client_session = client.on_message(&answer[0]).unwrap();
    assert_eq!(client_session.capabilities, Capabilities::CURSOR_CHANNEL | Capabilities::CURSOR_DATAGRAMS);
    assert_eq!(client_session.capabilities, server_session.capabilities);
    assert_eq!(client_session.session_id, 0x5e55_1011);

    // The server's display stream: prelude, then frames while the pacer allows.
    // One frame in flight, so that a lost ack shows (the pipelined window: `pacing`'s tests).
    let mut pacer = FramePacer::new(PacerConfig { max_in_flight: 1, ..PacerConfig::default() });
    let mut display = stream_prelude(Channel::Display).to_vec();
    let mut now = 0u64;
    let send_frame = |display: &mut Vec<u8>, pacer: &mut FramePacer, frame_id: u64, now: u64| {
        let start = display.len();
        let messages = [
            DisplayMessage::FrameBegin(FrameBegin {
                frame_id,
                scanout: 0,
                width: 8,
                height: 4,
                capture_us: now,
            }),
            DisplayMessage::Tile(Tile {
                rect: Rect { x: 0, y: 0, width: 8, height: 2 },
                data: TileData::Raw(vec![frame_id as u8; 64]),
            }),
            DisplayMessage::Tile(Tile {
                rect: Rect { x: 0, y: 2, width: 8, height: 2 },
                data: TileData::Solid(7),
            }),
            DisplayMessage::FrameEnd(FrameEnd { frame_id }),
        ];
        for m in &messages {
            encode(m, display).unwrap();
        }
        pacer.on_sent(frame_id, (display.len() - start) as u64, now);
    };
    assert!(pacer.may_send(now));
    send_frame(&mut display, &mut pacer, 1, now);
    assert!(!pacer.may_send(now + 1_000), "one frame in flight");

    // The client: prelude, decoder, sequence check, draw, ack.
    assert_eq!(Channel::from_uni_prelude(display[0]), Ok(Channel::Display));
    let mut display_decoder = StreamDecoder::<DisplayMessage>::new();
    let mut sequence = FrameSequence::new();
    let mut surface = vec![0u8; 8 * 4 * 4];
    let mut acks = Vec::new();
    draw(&mut sequence, &mut surface, deliver(&mut display_decoder, &display[1..]), &mut acks, 500);
    assert_eq!(surface[..64], [1; 64]);
    assert_eq!(acks.len(), 1);

    // The ack travels back on control; the server learns a 30 ms frame round trip.
    let mut ack_bytes = Vec::new();
    encode(&ControlMessage::FrameAck(acks[0]), &mut ack_bytes).unwrap();
    let ControlMessage::FrameAck(ack) = deliver(&mut server_control, &ack_bytes).remove(0) else { panic!() };
    now += 32_000;
    assert_eq!(pacer.on_ack(&ack, now).unwrap().frame_rtt_us, 30_000);
    assert!(pacer.may_send(now));

    // Frame 2's ack is lost: the pacer writes it off after 200 ms and frame 3 goes out.
    display.truncate(1);
    send_frame(&mut display, &mut pacer, 2, now);
    draw(&mut sequence, &mut surface, deliver(&mut display_decoder, &display[1..]), &mut acks, 40_000);
    assert!(!pacer.may_send(now + 199_999));
    assert!(pacer.may_send(now + 200_000));
    assert_eq!(pacer.lost_frames(), 1);
    assert_eq!(display_decoder.finish(), Ok(()));

    // Input, client → server, on its own stream.
    let mut input = stream_prelude(Channel::Input).to_vec();
    for down in [true, false] {
        encode(&InputMessage::Key(Key { code: 30, down }), &mut input).unwrap();
    }
    assert_eq!(Channel::from_uni_prelude(input[0]), Ok(Channel::Input));
    let keys = deliver(&mut StreamDecoder::<InputMessage>::new(), &input[1..]);
    assert_eq!(
        keys,
        [InputMessage::Key(Key { code: 30, down: true }), InputMessage::Key(Key { code: 30, down: false })]
    );

    // Cursor positions as datagrams, reordered: the client keeps the newest.
    let datagrams: Vec<Vec<u8>> = [2u64, 1, 3]
        .iter()
        .map(|&seq| {
            encode_datagram(&Datagram::CursorPosition(CursorPosition {
                seq,
                scanout: 0,
                x: seq as i32,
                y: 0,
                visible: true,
            }))
        })
        .collect();
    let mut latest: Option<CursorPosition> = None;
    for d in &datagrams {
        if let Ok(Some(Datagram::CursorPosition(p))) = decode_datagram(d)
            && latest.is_none_or(|l| p.seq > l.seq)
        {
            latest = Some(p);
        }
    }
    assert_eq!(latest.map(|p| p.x), Some(3));
}
