//! Resume tokens: how a client gets its session back after losing the connection.
//!
//! The connection file's ticket is one-time, so it cannot authorize a reconnect. Instead the
//! server hands every session that negotiated `RESUME` a **resume token** (`ResumeToken` on the
//! control stream, right after `Welcome`). The client keeps it in memory only and, after a
//! network loss, sends it in `Hello.ticket` on a new connection.
//!
//! Invariants ([`ResumeTokens`] keeps them, sans-IO: time comes in as Unix seconds):
//! - A token is 32 random bytes (`pr1.` + base64url): unguessable; the store keeps only its
//!   SHA-256, so a memory dump of the server does not reveal live tokens.
//! - One-time: redeeming removes it. The resumed session gets a fresh token.
//! - Bound to the desktop it was issued for, and to its session: each session has at most one
//!   live token, a newer one replaces it.
//! - Short-lived: valid while its session's connection lives and [`RESUME_LIFETIME_S`] after it
//!   ended; never longer than [`MAX_TOKEN_AGE_S`] after it was issued unless renewed.
//! - Bounded: at most [`MAX_TOKENS`] live tokens; the oldest go first.

use std::collections::HashMap;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::rand::{SecureRandom, SystemRandom};

use crate::handshake::Refusal;
use crate::wire::RefuseCode;

/// Text prefix of every resume token; a `Hello.ticket` with it is a resume, not a ticket.
pub const PREFIX: &str = "pr1.";
/// How long a token stays valid after its session's connection was lost.
pub const RESUME_LIFETIME_S: u64 = 120;
/// The longest a token lives, even while its session does (the server renews it before).
pub const MAX_TOKEN_AGE_S: u64 = 24 * 3600;
/// Live tokens a server keeps at most.
pub const MAX_TOKENS: usize = 64;
const TOKEN_BYTES: usize = 32;

/// Whether a `Hello.ticket` is a resume token.
pub fn is_resume_token(ticket: &str) -> bool {
    ticket.starts_with(PREFIX)
}

#[derive(Debug, Clone)]
struct Entry {
    session_id: u64,
    desktop: String,
    user: String,
    issued_at: u64,
    /// When the session's connection ended; `None` while it lives.
    ended_at: Option<u64>,
}

/// Who a redeemed token lets in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resumed {
    /// The session the token was issued to.
    pub session_id: u64,
    pub user: String,
}

/// A server's live resume tokens.
#[derive(Debug, Default)]
pub struct ResumeTokens {
    entries: HashMap<[u8; 32], Entry>,
}

fn digest(token: &str) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, token.as_bytes()).as_ref());
    out
}

impl ResumeTokens {
    pub fn new() -> Self {
        Self::default()
    }

    /// A fresh token for `session_id` (replacing its previous one). `None` without randomness.
    pub fn issue(&mut self, session_id: u64, desktop: &str, user: &str, now: u64) -> Option<String> {
        let mut raw = [0u8; TOKEN_BYTES];
        SystemRandom::new().fill(&mut raw).ok()?;
        let token = format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(raw));
        self.expire(now);
        self.entries.retain(|_, e| e.session_id != session_id);
        while self.entries.len() >= MAX_TOKENS {
            let oldest = self.entries.iter().min_by_key(|(_, e)| e.issued_at).map(|(k, _)| *k)?;
            self.entries.remove(&oldest);
        }
        let entry = Entry {
            session_id,
            desktop: desktop.to_owned(),
            user: user.to_owned(),
            issued_at: now,
            ended_at: None,
        };
        self.entries.insert(digest(&token), entry);
        Some(token)
    }

    /// The session's connection ended: its token now lives [`RESUME_LIFETIME_S`] more.
    pub fn session_ended(&mut self, session_id: u64, now: u64) {
        for entry in self.entries.values_mut().filter(|e| e.session_id == session_id) {
            entry.ended_at.get_or_insert(now);
        }
    }

    /// Forgets every token (the broker ended the session: no client may come back with one).
    pub fn revoke_all(&mut self) {
        self.entries.clear();
    }

    /// Redeems `token` for `desktop`: valid tokens are consumed (one-time).
    pub fn redeem(&mut self, token: &str, desktop: &str, now: u64) -> Result<Resumed, Refusal> {
        self.expire(now);
        let Some(entry) = self.entries.remove(&digest(token)) else {
            return Err(Refusal::new(
                RefuseCode::ExpiredTicket,
                "the resume token is unknown, used or expired: open a new connection file",
            ));
        };
        if entry.desktop != desktop {
            return Err(Refusal::new(RefuseCode::WrongDesktop, "the resume token is for another desktop"));
        }
        Ok(Resumed { session_id: entry.session_id, user: entry.user })
    }

    /// Live tokens (for tests and status).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn expire(&mut self, now: u64) {
        self.entries.retain(|_, e| {
            let lost_too_long = e.ended_at.is_some_and(|end| now >= end.saturating_add(RESUME_LIFETIME_S));
            let too_old = now >= e.issued_at.saturating_add(MAX_TOKEN_AGE_S);
            !lost_too_long && !too_old
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_resumes_once_on_its_desktop_within_its_lifetime() {
        let mut tokens = ResumeTokens::new();
        let t = tokens.issue(7, "desk", "ann", 1000).unwrap();
        assert!(is_resume_token(&t) && t.len() > 40);
        assert_eq!(tokens.redeem(&t, "desk", 1001), Ok(Resumed { session_id: 7, user: "ann".into() }));
        let again = tokens.redeem(&t, "desk", 1001).unwrap_err();
        assert_eq!(again.code, RefuseCode::ExpiredTicket, "one-time");

        let t = tokens.issue(8, "desk", "ann", 1000).unwrap();
        assert_eq!(tokens.redeem(&t, "other", 1001).unwrap_err().code, RefuseCode::WrongDesktop);
        assert!(tokens.is_empty(), "a token tried on the wrong desktop is spent too");

        // Valid while the session lives (long after issue), then RESUME_LIFETIME_S more.
        let t = tokens.issue(9, "desk", "ann", 1000).unwrap();
        tokens.session_ended(9, 5000);
        assert!(tokens.redeem(&t, "desk", 5000 + RESUME_LIFETIME_S).is_err(), "expired");
        let t = tokens.issue(10, "desk", "ann", 1000).unwrap();
        tokens.session_ended(10, 5000);
        assert!(tokens.redeem(&t, "desk", 5000 + RESUME_LIFETIME_S - 1).is_ok());
    }

    #[test]
    fn a_new_token_replaces_the_sessions_old_one_and_the_store_is_bounded() {
        let mut tokens = ResumeTokens::new();
        let old = tokens.issue(1, "desk", "ann", 10).unwrap();
        let new = tokens.issue(1, "desk", "ann", 11).unwrap();
        assert!(tokens.redeem(&old, "desk", 12).is_err());
        assert!(tokens.redeem(&new, "desk", 12).is_ok());
        for session in 0..(MAX_TOKENS as u64 + 10) {
            tokens.issue(session + 100, "desk", "ann", 20 + session).unwrap();
        }
        assert_eq!(tokens.len(), MAX_TOKENS);
        assert!(tokens.redeem("pr1.forged", "desk", 30).is_err());
    }
}
