//! Fuzzes the parsers that take what a client, a link or a file hands over before any session
//! exists: the broker's tickets (`pt1.` + base64url, decoded and verified with the real Ed25519
//! key and replay cache), connection files (TOML) and `pleiades://` URIs, and resume tokens.
//!
//! The first input byte picks the parser; the rest is the text (lossy UTF-8), or, for tickets,
//! also a valid ticket with the input's bytes written over part of it. Nothing may panic; a
//! ticket is accepted only if it is the one signed here, once; a parsed connection survives a
//! round trip through its file and URI forms; a resume token is redeemed only if issued.

#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use pleiades_protocol::connfile::Connection;
use pleiades_protocol::resume::{ResumeTokens, is_resume_token};
use pleiades_protocol::ticket::{PublicKey, TicketClaims, TicketSigner, TicketVerifier, decode_unverified};

const HOST: &str = "host-1";
const NOW: u64 = 1_000_000;

/// One signing key and one valid ticket for the whole run (key generation is slow).
fn fixture() -> &'static (PublicKey, String) {
    static FIXTURE: OnceLock<(PublicKey, String)> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let signer = TicketSigner::from_pkcs8(&TicketSigner::generate_pkcs8().expect("key"))
            .expect("generated keys load");
        let claims = TicketClaims::new("alice", "desk-1", HOST, NOW - 10, 600).expect("randomness");
        (signer.public_key(), signer.issue(&claims).expect("signs"))
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else { return };
    let text = String::from_utf8_lossy(rest);
    match which % 4 {
        0 => {
            // Any text as a ticket: refused unless it is the valid one, which is accepted once.
            let (key, valid) = fixture();
            let _ = decode_unverified(&text);
            let mut verifier = TicketVerifier::new(*key, HOST);
            let first = verifier.verify(&text, NOW);
            assert_eq!(first.is_ok(), text == *valid, "accepted a ticket that was not signed here");
            assert!(verifier.verify(&text, NOW).is_err(), "a ticket was accepted twice");
        }
        1 => {
            // The valid ticket with some of its bytes replaced: any change is refused.
            let (key, valid) = fixture();
            let mut bytes = valid.clone().into_bytes();
            let at = usize::from(rest.first().copied().unwrap_or(0)) % bytes.len();
            for (i, b) in rest.iter().skip(1).take(8).enumerate() {
                if let Some(slot) = bytes.get_mut(at + i) {
                    *slot = *b;
                }
            }
            let Ok(mutated) = String::from_utf8(bytes) else { return };
            let result = TicketVerifier::new(*key, HOST).verify(&mutated, NOW);
            if mutated != *valid {
                assert!(result.is_err(), "a changed ticket was accepted: {mutated}");
            }
        }
        2 => {
            // A connection file or URI: what parses survives both round trips unchanged.
            for parsed in [Connection::from_toml(&text), Connection::from_uri(&text)].into_iter().flatten() {
                let from_file = Connection::from_toml(&parsed.to_toml()).expect("its own file parses");
                assert_eq!(from_file, parsed);
                let from_uri = Connection::from_uri(&parsed.to_uri()).expect("its own URI parses");
                assert_eq!(from_uri, parsed);
            }
        }
        _ => {
            // Resume tokens: any text is refused unless it is the token issued, redeemed once.
            let mut tokens = ResumeTokens::new();
            let Some(issued) = tokens.issue(7, "desk-1", "alice", NOW) else { return };
            let _ = is_resume_token(&text);
            let redeemed = tokens.redeem(&text, "desk-1", NOW);
            assert_eq!(redeemed.is_ok(), text == issued);
            assert!(tokens.redeem(&issued, "desk-1", NOW).is_ok() != redeemed.is_ok());
        }
    }
});
