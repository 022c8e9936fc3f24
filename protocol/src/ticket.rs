//! One-time connection tickets.
//!
//! The broker issues a ticket when a user connects to a desktop; the client presents it to the
//! host, which verifies it offline against the broker's public key. A ticket is:
//!
//! ```text
//! pt1.<base64url, no padding, of: body || signature>
//! body      = version:u8 (1 or 2) | id:[u8;16] | issued_at:u64be | expires_at:u64be
//!             | generation:u64be (version 2 only)
//!             | user:str | desktop:str | host:str          (str = len:u8 | UTF-8 bytes)
//! signature = Ed25519 over (DOMAIN || body), 64 bytes
//! ```
//!
//! The broker's tickets are version 2: they name the **generation** of the desktop, which the
//! broker bumps at every start, restart and recycle and hands to the host with that command;
//! the host starts the desktop's VM process for that generation, and the process accepts only
//! tickets of its own generation. The replay cache lives in the VM process, so without this a
//! ticket issued before a recycle (one user's) would open the desktop's next process (the next
//! user's session) while it is still valid. Version 1 (no generation) is what a host mints for
//! itself (`run --connection-file`); a verifier bound to a generation refuses it.
//!
//! Invariants:
//! - A ticket that verifies was signed by the broker's key, names the verifying host, is inside
//!   `[issued_at - CLOCK_SKEW, expires_at)`, lives at most [`MAX_LIFETIME_SECS`], names the
//!   verifier's generation when the verifier has one, and is accepted at most once per
//!   [`ReplayCache`] (the cache keeps each id until its expiry).
//! - Decoding never panics on any input; every malformed input is a [`TicketError`].
//! - Sans-IO: time comes in as a parameter (Unix seconds); nothing here reads a clock.

use std::collections::HashMap;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};

/// Text prefix of every ticket (format version 1).
pub const PREFIX: &str = "pt1.";
/// Signed together with the body so that a signature can never be replayed in another context.
const DOMAIN: &[u8] = b"pleiades-ticket-v1\0";
/// Body version without a generation.
const VERSION_1: u8 = 1;
/// Body version with the desktop's generation.
const VERSION_2: u8 = 2;
const SIG_LEN: usize = 64;
/// Fixed part of the body: version, id, two timestamps.
const FIXED_LEN: usize = 1 + 16 + 8 + 8;
/// Longest user, desktop or host name a ticket carries.
pub const MAX_FIELD_LEN: usize = 255;
/// Longest ticket text accepted, so that decoding work is bounded.
pub const MAX_TICKET_LEN: usize = 2048;
/// Verifiers refuse tickets that live longer than this, which bounds the replay cache.
pub const MAX_LIFETIME_SECS: u64 = 600;
/// Tolerated clock difference between broker and host.
pub const CLOCK_SKEW_SECS: u64 = 30;

/// What a ticket says: who may connect to which desktop on which host, and until when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TicketClaims {
    /// Unique id; the replay cache key.
    pub id: [u8; 16],
    pub user: String,
    pub desktop: String,
    pub host: String,
    /// Unix seconds.
    pub issued_at: u64,
    /// Unix seconds, exclusive.
    pub expires_at: u64,
    /// The start of the desktop's VM process the ticket is for (the broker's generation of the
    /// desktop); `None` in a version 1 ticket.
    pub generation: Option<u64>,
}

/// Why a ticket was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TicketError {
    #[error("ticket is malformed: {0}")]
    Malformed(&'static str),
    #[error("ticket signature does not verify")]
    BadSignature,
    #[error("ticket has expired")]
    Expired,
    #[error("ticket is not valid yet")]
    NotYetValid,
    #[error("ticket lives longer than {MAX_LIFETIME_SECS} s")]
    LifetimeTooLong,
    #[error("ticket is for another host")]
    WrongHost,
    #[error("ticket was already used")]
    Replayed,
    #[error("ticket is for another start of this desktop (it was restarted or recycled since)")]
    WrongGeneration,
    #[error("a ticket field is longer than {MAX_FIELD_LEN} bytes")]
    FieldTooLong,
    #[error("invalid signing key")]
    BadKey,
    #[error("no randomness available")]
    Rng,
}

impl TicketClaims {
    /// Claims with a fresh random id.
    pub fn new(
        user: &str,
        desktop: &str,
        host: &str,
        now: u64,
        lifetime_secs: u64,
    ) -> Result<Self, TicketError> {
        let mut id = [0u8; 16];
        SystemRandom::new().fill(&mut id).map_err(|_| TicketError::Rng)?;
        Ok(Self {
            id,
            user: user.to_owned(),
            desktop: desktop.to_owned(),
            host: host.to_owned(),
            issued_at: now,
            expires_at: now.saturating_add(lifetime_secs),
            generation: None,
        })
    }

    /// The same claims for one generation of the desktop (a version 2 ticket).
    pub fn for_generation(self, generation: u64) -> Self {
        Self { generation: Some(generation), ..self }
    }

    /// The id as lowercase hex, for logs and audit (the id alone grants nothing).
    pub fn id_hex(&self) -> String {
        self.id.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn encode_body(&self) -> Result<Vec<u8>, TicketError> {
        let mut out =
            Vec::with_capacity(FIXED_LEN + 11 + self.user.len() + self.desktop.len() + self.host.len());
        out.push(if self.generation.is_some() { VERSION_2 } else { VERSION_1 });
        out.extend_from_slice(&self.id);
        out.extend_from_slice(&self.issued_at.to_be_bytes());
        out.extend_from_slice(&self.expires_at.to_be_bytes());
        if let Some(generation) = self.generation {
            out.extend_from_slice(&generation.to_be_bytes());
        }
        for field in [&self.user, &self.desktop, &self.host] {
            let len = u8::try_from(field.len()).map_err(|_| TicketError::FieldTooLong)?;
            out.push(len);
            out.extend_from_slice(field.as_bytes());
        }
        Ok(out)
    }

    fn decode_body(body: &[u8]) -> Result<Self, TicketError> {
        let fixed = body.get(..FIXED_LEN).ok_or(TicketError::Malformed("body too short"))?;
        if fixed[0] != VERSION_1 && fixed[0] != VERSION_2 {
            return Err(TicketError::Malformed("unknown version"));
        }
        let mut id = [0u8; 16];
        id.copy_from_slice(&fixed[1..17]);
        let issued_at = u64::from_be_bytes(fixed[17..25].try_into().expect("8 bytes"));
        let expires_at = u64::from_be_bytes(fixed[25..33].try_into().expect("8 bytes"));
        let mut rest = &body[FIXED_LEN..];
        let mut generation = None;
        if fixed[0] == VERSION_2 {
            let bytes = rest.get(..8).ok_or(TicketError::Malformed("generation truncated"))?;
            generation = Some(u64::from_be_bytes(bytes.try_into().expect("8 bytes")));
            rest = &rest[8..];
        }
        let mut fields = Vec::with_capacity(3);
        for _ in 0..3 {
            let (&len, tail) = rest.split_first().ok_or(TicketError::Malformed("missing field"))?;
            let bytes = tail.get(..usize::from(len)).ok_or(TicketError::Malformed("field truncated"))?;
            let text =
                std::str::from_utf8(bytes).map_err(|_| TicketError::Malformed("field is not UTF-8"))?;
            fields.push(text.to_owned());
            rest = &tail[usize::from(len)..];
        }
        if !rest.is_empty() {
            return Err(TicketError::Malformed("trailing bytes"));
        }
        let host = fields.pop().expect("3 fields");
        let desktop = fields.pop().expect("3 fields");
        let user = fields.pop().expect("3 fields");
        Ok(Self { id, user, desktop, host, issued_at, expires_at, generation })
    }
}

/// Splits a ticket into its claims and signature without checking the signature.
/// For inspection only: never trust the claims of an unverified ticket.
pub fn decode_unverified(ticket: &str) -> Result<(TicketClaims, Vec<u8>), TicketError> {
    if ticket.len() > MAX_TICKET_LEN {
        return Err(TicketError::Malformed("ticket too long"));
    }
    let b64 = ticket.strip_prefix(PREFIX).ok_or(TicketError::Malformed("missing pt1. prefix"))?;
    let raw = URL_SAFE_NO_PAD.decode(b64).map_err(|_| TicketError::Malformed("not base64url"))?;
    if raw.len() < FIXED_LEN + SIG_LEN {
        return Err(TicketError::Malformed("too short"));
    }
    let (body, sig) = raw.split_at(raw.len() - SIG_LEN);
    Ok((TicketClaims::decode_body(body)?, sig.to_vec()))
}

/// The broker's half: holds the Ed25519 private key and signs claims.
pub struct TicketSigner {
    key: Ed25519KeyPair,
}

impl std::fmt::Debug for TicketSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the private key.
        f.debug_struct("TicketSigner").field("public_key", &self.public_key()).finish()
    }
}

impl TicketSigner {
    /// A new random key, as PKCS#8 v2 DER (store this to keep the key across restarts).
    pub fn generate_pkcs8() -> Result<Vec<u8>, TicketError> {
        let doc = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).map_err(|_| TicketError::Rng)?;
        Ok(doc.as_ref().to_vec())
    }

    pub fn from_pkcs8(pkcs8: &[u8]) -> Result<Self, TicketError> {
        let key = Ed25519KeyPair::from_pkcs8_maybe_unchecked(pkcs8).map_err(|_| TicketError::BadKey)?;
        Ok(Self { key })
    }

    pub fn public_key(&self) -> PublicKey {
        let mut bytes = [0u8; 32];
        bytes.copy_from_slice(self.key.public_key().as_ref());
        PublicKey(bytes)
    }

    /// Signs the claims into ticket text.
    pub fn issue(&self, claims: &TicketClaims) -> Result<String, TicketError> {
        let body = claims.encode_body()?;
        let mut signed = Vec::with_capacity(DOMAIN.len() + body.len());
        signed.extend_from_slice(DOMAIN);
        signed.extend_from_slice(&body);
        let sig = self.key.sign(&signed);
        let mut raw = body;
        raw.extend_from_slice(sig.as_ref());
        Ok(format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(raw)))
    }
}

/// An Ed25519 public key (32 bytes), published by the broker to hosts as base64url.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublicKey(pub [u8; 32]);

impl PublicKey {
    pub fn to_base64(&self) -> String {
        URL_SAFE_NO_PAD.encode(self.0)
    }

    pub fn from_base64(text: &str) -> Result<Self, TicketError> {
        let raw = URL_SAFE_NO_PAD.decode(text.trim()).map_err(|_| TicketError::BadKey)?;
        let bytes: [u8; 32] = raw.try_into().map_err(|_| TicketError::BadKey)?;
        Ok(Self(bytes))
    }

    /// Checks the signature, the lifetime window and the host, without touching a replay cache.
    pub fn verify_stateless(&self, ticket: &str, host: &str, now: u64) -> Result<TicketClaims, TicketError> {
        let (claims, sig) = decode_unverified(ticket)?;
        let b64 = &ticket[PREFIX.len()..];
        let raw = URL_SAFE_NO_PAD.decode(b64).map_err(|_| TicketError::Malformed("not base64url"))?;
        let body = &raw[..raw.len() - SIG_LEN];
        let mut signed = Vec::with_capacity(DOMAIN.len() + body.len());
        signed.extend_from_slice(DOMAIN);
        signed.extend_from_slice(body);
        UnparsedPublicKey::new(&ED25519, &self.0)
            .verify(&signed, &sig)
            .map_err(|_| TicketError::BadSignature)?;
        if claims.expires_at.saturating_sub(claims.issued_at) > MAX_LIFETIME_SECS {
            return Err(TicketError::LifetimeTooLong);
        }
        if now.saturating_add(CLOCK_SKEW_SECS) < claims.issued_at {
            return Err(TicketError::NotYetValid);
        }
        if now >= claims.expires_at {
            return Err(TicketError::Expired);
        }
        if claims.host != host {
            return Err(TicketError::WrongHost);
        }
        Ok(claims)
    }
}

/// Remembers accepted ticket ids until they expire, so that each ticket is accepted once.
#[derive(Debug, Default)]
pub struct ReplayCache {
    seen: HashMap<[u8; 16], u64>,
}

impl ReplayCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records `claims.id`; fails if it was already recorded and has not expired.
    pub fn check_and_insert(&mut self, claims: &TicketClaims, now: u64) -> Result<(), TicketError> {
        self.seen.retain(|_, &mut expires| expires > now);
        if self.seen.contains_key(&claims.id) {
            return Err(TicketError::Replayed);
        }
        self.seen.insert(claims.id, claims.expires_at);
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

/// The host's half: the broker's public key, this host's id, the generation of the desktop's
/// VM process (when the broker gave one) and a replay cache.
#[derive(Debug)]
pub struct TicketVerifier {
    key: PublicKey,
    host: String,
    generation: Option<u64>,
    replay: ReplayCache,
}

impl TicketVerifier {
    pub fn new(key: PublicKey, host: &str) -> Self {
        Self { key, host: host.to_owned(), generation: None, replay: ReplayCache::new() }
    }

    /// Accepts only tickets for this generation of the desktop (`Some`): what a VM process
    /// started by the broker's command does. `None` accepts tickets of any generation or none.
    pub fn with_generation(self, generation: Option<u64>) -> Self {
        Self { generation, ..self }
    }

    /// Verifies a ticket and consumes it: a second call with the same ticket fails.
    pub fn verify(&mut self, ticket: &str, now: u64) -> Result<TicketClaims, TicketError> {
        let claims = self.key.verify_stateless(ticket, &self.host, now)?;
        if let Some(expected) = self.generation
            && claims.generation != Some(expected)
        {
            return Err(TicketError::WrongGeneration);
        }
        self.replay.check_and_insert(&claims, now)?;
        Ok(claims)
    }

    pub fn replay_cache_len(&self) -> usize {
        self.replay.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn signer() -> TicketSigner {
        TicketSigner::from_pkcs8(&TicketSigner::generate_pkcs8().unwrap()).unwrap()
    }

    #[test]
    fn issue_verify_once() {
        let s = signer();
        let claims = TicketClaims::new("alice", "d-1", "host-a", 1_000, 60).unwrap();
        let t = s.issue(&claims).unwrap();
        let mut v = TicketVerifier::new(s.public_key(), "host-a");
        assert_eq!(v.verify(&t, 1_010).unwrap(), claims);
        assert_eq!(v.verify(&t, 1_011), Err(TicketError::Replayed));
    }

    #[test]
    fn refusals() {
        let s = signer();
        let claims = TicketClaims::new("alice", "d-1", "host-a", 1_000, 60).unwrap();
        let t = s.issue(&claims).unwrap();
        let key = s.public_key();
        assert_eq!(key.verify_stateless(&t, "host-a", 1_060), Err(TicketError::Expired));
        assert_eq!(key.verify_stateless(&t, "host-a", 900), Err(TicketError::NotYetValid));
        assert_eq!(key.verify_stateless(&t, "host-b", 1_010), Err(TicketError::WrongHost));
        assert_eq!(
            signer().public_key().verify_stateless(&t, "host-a", 1_010),
            Err(TicketError::BadSignature)
        );
        let long = TicketClaims::new("a", "d", "host-a", 1_000, MAX_LIFETIME_SECS + 1).unwrap();
        assert_eq!(
            key.verify_stateless(&s.issue(&long).unwrap(), "host-a", 1_001),
            Err(TicketError::LifetimeTooLong)
        );
        let big = TicketClaims::new(&"x".repeat(256), "d", "h", 0, 1).unwrap();
        assert_eq!(s.issue(&big), Err(TicketError::FieldTooLong));
    }

    #[test]
    fn a_verifier_bound_to_a_generation_takes_only_that_generation() {
        let s = signer();
        let claims = TicketClaims::new("alice", "d-1", "host-a", 1_000, 60).unwrap();
        let old = s.issue(&claims.clone().for_generation(6)).unwrap();
        let current = s.issue(&claims.clone().for_generation(7)).unwrap();
        let unbound = s.issue(&claims).unwrap();
        // The VM process of generation 7 (the desktop was recycled after generation 6).
        let mut v = TicketVerifier::new(s.public_key(), "host-a").with_generation(Some(7));
        assert_eq!(v.verify(&old, 1_010), Err(TicketError::WrongGeneration));
        assert_eq!(v.verify(&unbound, 1_010), Err(TicketError::WrongGeneration));
        assert_eq!(v.verify(&current, 1_010).unwrap().generation, Some(7));
        assert_eq!(v.verify(&current, 1_010), Err(TicketError::Replayed));
        // Refused tickets were not consumed: the generation-6 process still takes its own.
        let mut previous = TicketVerifier::new(s.public_key(), "host-a").with_generation(Some(6));
        assert_eq!(previous.verify(&old, 1_010).unwrap().generation, Some(6));
        // A verifier without a generation (a host that mints its own tickets) takes both formats.
        let mut any = TicketVerifier::new(s.public_key(), "host-a");
        let fresh = || TicketClaims::new("alice", "d-1", "host-a", 1_000, 60).unwrap();
        assert_eq!(any.verify(&s.issue(&fresh()).unwrap(), 1_010).unwrap().generation, None);
        assert_eq!(
            any.verify(&s.issue(&fresh().for_generation(6)).unwrap(), 1_010).unwrap().generation,
            Some(6)
        );
    }

    #[test]
    fn the_generation_is_signed() {
        let s = signer();
        let t = s.issue(&TicketClaims::new("a", "d", "h", 100, 60).unwrap().for_generation(1)).unwrap();
        let mut raw = URL_SAFE_NO_PAD.decode(&t[PREFIX.len()..]).unwrap();
        // The generation's last byte: 1 → 2.
        raw[FIXED_LEN + 7] ^= 0b11;
        let forged = format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(&raw));
        assert_eq!(decode_unverified(&forged).unwrap().0.generation, Some(2));
        assert_eq!(s.public_key().verify_stateless(&forged, "h", 110), Err(TicketError::BadSignature));
    }

    #[test]
    fn replay_cache_forgets_expired_ids() {
        let mut cache = ReplayCache::new();
        let a = TicketClaims::new("a", "d", "h", 0, 10).unwrap();
        cache.check_and_insert(&a, 1).unwrap();
        let b = TicketClaims::new("b", "d", "h", 20, 10).unwrap();
        cache.check_and_insert(&b, 20).unwrap();
        assert_eq!(cache.len(), 1);
    }

    #[test]
    fn public_key_text_round_trip() {
        let k = signer().public_key();
        assert_eq!(PublicKey::from_base64(&k.to_base64()).unwrap(), k);
        assert!(PublicKey::from_base64("AAAA").is_err());
    }

    proptest! {
        #[test]
        fn decode_never_panics(s in "\\PC{0,300}") {
            let _ = decode_unverified(&s);
            let _ = decode_unverified(&format!("{PREFIX}{s}"));
        }

        #[test]
        fn decode_random_bytes_never_panics(raw in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = decode_unverified(&format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(&raw)));
        }

        #[test]
        fn round_trip(user in "[a-z0-9@.]{0,40}", desktop in "\\PC{0,40}", host in "[a-z0-9-]{1,30}",
                      now in 0u64..(u64::MAX / 2), life in 1u64..=MAX_LIFETIME_SECS,
                      generation in proptest::option::of(any::<u64>())) {
            let s = signer();
            let mut claims = TicketClaims::new(&user, &desktop, &host, now, life).unwrap();
            claims.generation = generation;
            let t = s.issue(&claims).unwrap();
            prop_assert_eq!(&decode_unverified(&t).unwrap().0, &claims);
            prop_assert_eq!(s.public_key().verify_stateless(&t, &host, now).unwrap(), claims);
        }

        #[test]
        fn any_bit_flip_is_refused(flip in 0usize..2000) {
            let s = signer();
            let claims = TicketClaims::new("alice", "desk", "host", 100, 60).unwrap();
            let t = s.issue(&claims).unwrap();
            let mut raw = URL_SAFE_NO_PAD.decode(&t[PREFIX.len()..]).unwrap();
            let bit = flip % (raw.len() * 8);
            raw[bit / 8] ^= 1 << (bit % 8);
            let tampered = format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(&raw));
            prop_assert!(s.public_key().verify_stateless(&tampered, "host", 110).is_err());
        }
    }
}
