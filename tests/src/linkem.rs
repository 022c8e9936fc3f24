//! A link emulator for UDP (QUIC) tests and benchmarks: delay, loss, a rate limit with a
//! bounded queue, and link down/up, between a client and a server on loopback.
//!
//! The build machines' kernel has no `netem` qdisc (`CONFIG_NET_SCH_NETEM` is not set; `tc qdisc
//! add … netem` answers "Specified qdisc kind is unknown"), so the impairment happens here, on
//! real datagrams between real sockets: the client talks to [`Link::client_addr`], the link
//! forwards to the server from a socket of its own. Each direction is a FIFO with the same
//! model as netem + tbf: a packet may be lost (independently, with the given probability),
//! waits for the link to be free at the given rate (a queue of at most `queue` worth of
//! transmission time; beyond it, tail drop), then arrives `delay` later. Times are real: use it
//! for behaviour and figures, never for assertions on timing.

use std::collections::VecDeque;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// What the link does to every packet, per direction.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkConfig {
    /// One-way delay (the round trip adds twice this).
    pub delay: Duration,
    /// Probability that a packet is lost, 0.0 to 1.0.
    pub loss: f64,
    /// Bits per second; `None`: unlimited.
    pub rate_bps: Option<u64>,
    /// The longest a packet may wait for the rate limit before it is dropped (the buffer).
    pub queue: Duration,
}

impl LinkConfig {
    /// No impairment.
    pub const CLEAN: Self =
        Self { delay: Duration::ZERO, loss: 0.0, rate_bps: None, queue: Duration::from_millis(200) };

    /// `rtt` round trip, `loss` probability, `mbit` Mbit/s.
    pub fn wan(rtt: Duration, loss: f64, mbit: u64) -> Self {
        Self { delay: rtt / 2, loss, rate_bps: Some(mbit * 1_000_000), queue: Duration::from_millis(200) }
    }
}

/// Packets and bytes that crossed or were dropped.
#[derive(Debug, Default)]
pub struct LinkStats {
    pub forwarded: AtomicU64,
    /// UDP payload bytes delivered, both directions together.
    pub bytes: AtomicU64,
    /// UDP payload bytes the server sent into the link (towards the client), counted as they
    /// arrive, before loss, queue drops or the link being down: what the server put on the wire.
    pub bytes_from_server: AtomicU64,
    /// The same, client to server.
    pub bytes_from_client: AtomicU64,
    pub lost: AtomicU64,
    pub queue_drops: AtomicU64,
    pub down_drops: AtomicU64,
}

struct Shared {
    config: Mutex<LinkConfig>,
    down: AtomicBool,
    stop: AtomicBool,
    stats: LinkStats,
}

/// A running link. Dropping it stops it.
pub struct Link {
    client_addr: SocketAddr,
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link").field("client_addr", &self.client_addr).finish_non_exhaustive()
    }
}

impl Link {
    /// A link to `server` (a UDP address on loopback).
    pub fn start(server: SocketAddr, config: LinkConfig) -> io::Result<Self> {
        let front = UdpSocket::bind("127.0.0.1:0")?;
        let back = UdpSocket::bind("127.0.0.1:0")?;
        back.connect(server)?;
        for s in [&front, &back] {
            s.set_read_timeout(Some(Duration::from_millis(50)))?;
        }
        let client_addr = front.local_addr()?;
        let shared = Arc::new(Shared {
            config: Mutex::new(config),
            down: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            stats: LinkStats::default(),
        });
        let client: Arc<Mutex<Option<SocketAddr>>> = Arc::default();
        let mut threads = Vec::new();
        // Client → server.
        let (to_server, from_client) = pipe();
        threads.push(receive(front.try_clone()?, shared.clone(), to_server, Some(client.clone()), 1)?);
        threads.push(deliver(from_client, shared.clone(), {
            let back = back.try_clone()?;
            move |p: &[u8]| {
                let _ = back.send(p);
            }
        })?);
        // Server → client.
        let (to_client, from_server) = pipe();
        threads.push(receive(back, shared.clone(), to_client, None, 2)?);
        threads.push(deliver(from_server, shared.clone(), move |p: &[u8]| {
            if let Some(c) = *client.lock().unwrap_or_else(|e| e.into_inner()) {
                let _ = front.send_to(p, c);
            }
        })?);
        Ok(Self { client_addr, shared, threads })
    }

    /// Where the client sends (instead of the server's address).
    pub fn client_addr(&self) -> SocketAddr {
        self.client_addr
    }

    /// Takes the link down (every packet dropped) or up again.
    pub fn set_down(&self, down: bool) {
        self.shared.down.store(down, Ordering::Relaxed);
    }

    /// Changes the impairment from now on.
    pub fn set_config(&self, config: LinkConfig) {
        *self.shared.config.lock().unwrap_or_else(|e| e.into_inner()) = config;
    }

    pub fn stats(&self) -> &LinkStats {
        &self.shared.stats
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// A packet and when it leaves the link.
type Queue = Arc<(Mutex<VecDeque<(Instant, Vec<u8>)>>, Condvar)>;

fn pipe() -> (Queue, Queue) {
    let q: Queue = Arc::default();
    (q.clone(), q)
}

fn receive(
    socket: UdpSocket,
    shared: Arc<Shared>,
    queue: Queue,
    learn_client: Option<Arc<Mutex<Option<SocketAddr>>>>,
    seed: u64,
) -> io::Result<JoinHandle<()>> {
    std::thread::Builder::new().name("linkem-rx".into()).spawn(move || {
        let mut buf = vec![0u8; 65536];
        let mut rng = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut link_free_at = Instant::now();
        while !shared.stop.load(Ordering::Relaxed) {
            let (n, from) = match socket.recv_from(&mut buf) {
                Ok(r) => r,
                Err(_) => continue,
            };
            if let Some(client) = &learn_client {
                *client.lock().unwrap_or_else(|e| e.into_inner()) = Some(from);
            }
            let stats = &shared.stats;
            let sent_by =
                if learn_client.is_some() { &stats.bytes_from_client } else { &stats.bytes_from_server };
            sent_by.fetch_add(n as u64, Ordering::Relaxed);
            if shared.down.load(Ordering::Relaxed) {
                stats.down_drops.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let config = *shared.config.lock().unwrap_or_else(|e| e.into_inner());
            // xorshift64*: independent losses.
            rng ^= rng >> 12;
            rng ^= rng << 25;
            rng ^= rng >> 27;
            let draw = (rng.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64;
            if draw < config.loss {
                stats.lost.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let now = Instant::now();
            let start = link_free_at.max(now);
            if start.duration_since(now) > config.queue {
                stats.queue_drops.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let transmit = config
                .rate_bps
                .map_or(Duration::ZERO, |bps| Duration::from_secs_f64((n * 8) as f64 / bps.max(1) as f64));
            link_free_at = start + transmit;
            let release = link_free_at + config.delay;
            let (lock, ready) = &*queue;
            lock.lock().unwrap_or_else(|e| e.into_inner()).push_back((release, buf[..n].to_vec()));
            ready.notify_one();
        }
    })
}

fn deliver(
    queue: Queue,
    shared: Arc<Shared>,
    send: impl Fn(&[u8]) + Send + 'static,
) -> io::Result<JoinHandle<()>> {
    std::thread::Builder::new().name("linkem-tx".into()).spawn(move || {
        let (lock, ready) = &*queue;
        while !shared.stop.load(Ordering::Relaxed) {
            let mut q = lock.lock().unwrap_or_else(|e| e.into_inner());
            let wait = match q.front() {
                Some((release, _)) => release.saturating_duration_since(Instant::now()),
                None => Duration::from_millis(50),
            };
            if !wait.is_zero() {
                let _ = ready.wait_timeout(q, wait.min(Duration::from_millis(50)));
                continue;
            }
            if let Some((_, packet)) = q.pop_front() {
                drop(q);
                send(&packet);
                shared.stats.forwarded.fetch_add(1, Ordering::Relaxed);
                shared.stats.bytes.fetch_add(packet.len() as u64, Ordering::Relaxed);
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn echo_server() -> (SocketAddr, JoinHandle<()>) {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let addr = s.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while let Ok((n, from)) = s.recv_from(&mut buf) {
                if &buf[..n] == b"quit" {
                    return;
                }
                s.send_to(&buf[..n], from).unwrap();
            }
        });
        (addr, t)
    }

    #[test]
    fn packets_cross_with_loss_and_not_while_down() {
        let (server, t) = echo_server();
        let link = Link::start(server, LinkConfig { loss: 0.5, ..LinkConfig::CLEAN }).unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        client.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
        let mut echoed = 0;
        for i in 0..200u32 {
            client.send_to(&i.to_le_bytes(), link.client_addr()).unwrap();
            let mut buf = [0u8; 16];
            if client.recv_from(&mut buf).is_ok() {
                echoed += 1;
            }
        }
        // Each round trip survives with probability 0.25: far from 0 and from 200.
        assert!((10..150).contains(&echoed), "{echoed} of 200 round trips");
        assert!(link.stats().lost.load(Ordering::Relaxed) > 0);
        // Every datagram is 4 bytes; each direction counts what its sender put in.
        assert_eq!(link.stats().bytes_from_client.load(Ordering::Relaxed), 200 * 4);
        let from_server = link.stats().bytes_from_server.load(Ordering::Relaxed);
        assert!(from_server > 0 && from_server < 200 * 4, "{from_server}");
        link.set_config(LinkConfig::CLEAN);
        link.set_down(true);
        client.send_to(b"x", link.client_addr()).unwrap();
        let mut buf = [0u8; 16];
        assert!(client.recv_from(&mut buf).is_err(), "nothing crosses a link that is down");
        link.set_down(false);
        client.send_to(b"y", link.client_addr()).unwrap();
        assert!(client.recv_from(&mut buf).is_ok(), "up again");
        client.send_to(b"quit", link.client_addr()).unwrap();
        drop(link);
        t.join().unwrap();
    }
}
