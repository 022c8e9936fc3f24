//! Who may hold a connection before showing a ticket (docs/protocol.md, "Before the ticket").
//!
//! Anyone can finish a QUIC handshake with a session server (the client is not authenticated
//! by TLS): until its `Hello` carries a valid ticket, a connection is a stranger's. Strangers
//! get a bounded share: at most [`MAX_STRANGERS`] connections at once, at most
//! [`MAX_PER_SOURCE`] from one source (an IPv4 address, an IPv6 /64), and above
//! [`RETRY_ABOVE`] a new one must first prove its address (QUIC retry), so that spoofed
//! sources hold nothing. Everything beyond is refused before any connection state exists. A
//! connection leaves the count when its ticket is accepted or when it ends.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// Connections without an accepted ticket, all sources together.
pub const MAX_STRANGERS: usize = 64;
/// Connections without an accepted ticket from one source.
pub const MAX_PER_SOURCE: usize = 8;
/// Above this many strangers, a new one must first prove its address.
pub const RETRY_ABOVE: usize = 16;

/// The answer to an incoming connection.
#[derive(Debug)]
pub enum Admit {
    /// Go on; the ticket releases the place (or the end of the connection).
    Yes(Place),
    /// Prove the address first (QUIC retry).
    Retry,
    /// Refused: too many strangers (here, or from this source).
    No,
}

/// The strangers' count.
#[derive(Debug, Default, Clone)]
pub struct Admission {
    inner: Arc<Mutex<Counts>>,
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    by_source: HashMap<IpAddr, usize>,
}

/// The bucket a source counts in: IPv4 (also IPv4-mapped IPv6) by address, IPv6 by /64.
fn bucket(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let mut octets = v6.octets();
                octets[8..].fill(0);
                IpAddr::V6(octets.into())
            }
        },
    }
}

impl Admission {
    /// Whether a connection from `source` may start (`validated`: its address is proven).
    pub fn admit(&self, source: IpAddr, validated: bool) -> Admit {
        let mut counts = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let key = bucket(source);
        let from_source = counts.by_source.get(&key).copied().unwrap_or(0);
        if counts.total >= MAX_STRANGERS || from_source >= MAX_PER_SOURCE {
            return Admit::No;
        }
        if counts.total >= RETRY_ABOVE && !validated {
            return Admit::Retry;
        }
        counts.total += 1;
        *counts.by_source.entry(key).or_default() += 1;
        Admit::Yes(Place { admission: self.clone(), source: key })
    }

    /// Strangers now.
    pub fn strangers(&self) -> usize {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).total
    }
}

/// A stranger's place, given back when dropped.
#[derive(Debug)]
pub struct Place {
    admission: Admission,
    source: IpAddr,
}

impl Drop for Place {
    fn drop(&mut self) {
        let mut counts = self.admission.inner.lock().unwrap_or_else(|p| p.into_inner());
        counts.total = counts.total.saturating_sub(1);
        if let Some(n) = counts.by_source.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                counts.by_source.remove(&self.source);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(last: u8) -> IpAddr {
        IpAddr::from([192, 0, 2, last])
    }

    #[test]
    fn one_source_gets_its_share_and_no_more_and_places_come_back() {
        let admission = Admission::default();
        let places: Vec<Place> = (0..MAX_PER_SOURCE)
            .map(|_| match admission.admit(v4(1), true) {
                Admit::Yes(place) => place,
                other => panic!("{other:?}"),
            })
            .collect();
        assert!(matches!(admission.admit(v4(1), true), Admit::No));
        // The same host over IPv4-mapped IPv6 counts as the same source.
        assert!(matches!(admission.admit("::ffff:192.0.2.1".parse().unwrap(), true), Admit::No));
        assert!(matches!(admission.admit(v4(2), true), Admit::Yes(_)));
        drop(places);
        assert_eq!(admission.strangers(), 0);
        assert!(matches!(admission.admit(v4(1), true), Admit::Yes(_)));
    }

    #[test]
    fn an_ipv6_source_is_its_64() {
        let admission = Admission::default();
        let _places: Vec<Admit> = (0..MAX_PER_SOURCE)
            .map(|i| admission.admit(format!("2001:db8::{i:x}").parse().unwrap(), true))
            .collect();
        assert!(matches!(admission.admit("2001:db8::ffff:1".parse().unwrap(), true), Admit::No));
        assert!(matches!(admission.admit("2001:db8:0:1::1".parse().unwrap(), true), Admit::Yes(_)));
    }

    #[test]
    fn many_strangers_must_prove_their_address_and_then_are_refused() {
        let admission = Admission::default();
        let mut places = Vec::new();
        let mut source = 0u32;
        let mut next = || {
            source += 1;
            IpAddr::from(source.to_be_bytes())
        };
        for _ in 0..RETRY_ABOVE {
            match admission.admit(next(), false) {
                Admit::Yes(place) => places.push(place),
                other => panic!("{other:?}"),
            }
        }
        assert!(matches!(admission.admit(next(), false), Admit::Retry));
        while places.len() < MAX_STRANGERS {
            match admission.admit(next(), true) {
                Admit::Yes(place) => places.push(place),
                other => panic!("{other:?}"),
            }
        }
        assert!(matches!(admission.admit(next(), true), Admit::No));
        assert_eq!(admission.strangers(), MAX_STRANGERS);
    }
}
