//! Fuzzes both sides of the session handshake with decoded control messages from the input.
//! The server must answer anything without panicking and never accept without a valid ticket
//! check or with a version or capability the client did not offer; the client must accept only
//! a `Welcome` within what it offered.

#![no_main]

use libfuzzer_sys::fuzz_target;
use pleiades_protocol::handshake::{Capabilities, ClientHandshake, Refusal, ServerHandshake, ServerOutcome};
use pleiades_protocol::ticket::TicketClaims;
use pleiades_protocol::wire::{ControlMessage, RefuseCode, StreamDecoder, encode_to_vec};

fn claims() -> TicketClaims {
    TicketClaims {
        id: [1; 16],
        user: "u".into(),
        desktop: "d".into(),
        host: "h".into(),
        issued_at: 0,
        expires_at: 1,
        generation: None,
    }
}

/// Accepts tickets that start with "ok", refuses the rest.
fn check(ticket: &str) -> Result<TicketClaims, Refusal> {
    if ticket.starts_with("ok") {
        Ok(claims())
    } else {
        Err(Refusal::new(RefuseCode::BadTicket, ticket.chars().rev().collect::<String>()))
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 9 {
        return;
    }
    let (header, stream) = data.split_at(9);
    let mut caps = [0u8; 8];
    caps.copy_from_slice(&header[..8]);
    let server_caps = Capabilities::from_bits(u64::from_le_bytes(caps));
    let client_caps = Capabilities::from_bits(u64::from_le_bytes(caps).rotate_left(u32::from(header[8])));

    let mut decoder = StreamDecoder::<ControlMessage>::new();
    let mut messages = Vec::new();
    let _ = decoder.decode_all(stream, &mut messages);

    let server = ServerHandshake::new("server", server_caps);
    for message in &messages {
        // The server's side: any first message.
        match server.on_first_message(message, 7, check) {
            ServerOutcome::Accept { reply, session, .. } => {
                let ControlMessage::Hello(hello) = message else { panic!("accepted a non-Hello") };
                assert!(hello.ticket.starts_with("ok"));
                assert!(hello.version_min <= session.version && session.version <= hello.version_max);
                assert!(hello.capabilities.contains(session.capabilities));
                assert!(server_caps.contains(session.capabilities));
                encode_to_vec(&reply).expect("the Welcome encodes");
                // The matching client accepts it and agrees.
                let mut client = ClientHandshake::new(&hello.ticket, "c", hello.capabilities);
                let agreed = client.on_message(&reply).expect("client accepts the server's Welcome");
                assert_eq!(agreed.capabilities, session.capabilities);
            }
            ServerOutcome::Refuse { reply, .. } => {
                encode_to_vec(&reply).expect("the Refused encodes");
            }
        }
        // The client's side: any answer.
        let mut client = ClientHandshake::new("ok", "client", client_caps);
        if let Ok(session) = client.on_message(message) {
            assert_eq!(session.version, 1);
            assert!(client_caps.contains(session.capabilities));
        }
        assert!(client.on_message(message).is_err(), "a handshake ends once");
    }
});
