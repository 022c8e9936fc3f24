//! The Pleiades wire protocol, sans-IO.
//!
//! - [`ticket`]: one-time connection tickets, signed by the broker (Ed25519) and verified by
//!   hosts with a replay cache.
//! - [`connfile`]: connection files (TOML) and `pleiades://` URIs that carry a ticket to the
//!   client.
//!
//! Nothing here opens a socket, starts a thread or reads a clock: time is a parameter, so every
//! piece is unit- and property-testable on plain values.

pub mod connfile;
pub mod ticket;
