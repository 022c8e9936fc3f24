//! The host end of a guest's vsock connections, sans I/O: which connections exist, what each
//! side may still send, and what goes to the guest next.
//!
//! The device feeds it every packet the guest puts on its tx queue ([`Muxer::from_guest`]) and
//! asks it for the next packet for the guest's rx queue ([`Muxer::to_guest`]) while the guest
//! has rx buffers. The VM process's own code (the agent channel) is the other side: it listens
//! on host ports, connects to guest ports, reads and writes bytes, and closes
//! ([`Muxer::listen`], [`Muxer::connect`], [`Muxer::recv`], [`Muxer::send`], [`Muxer::close`]),
//! and learns what happened from [`Muxer::poll_event`]. Nothing here is reachable from outside
//! the VM process: each VM has its own muxer, so no guest can reach another VM's ports.
//!
//! The guest is untrusted. Packets from a wrong address are dropped; packets for no connection
//! are answered with a reset (never a reset to a reset); a guest that sends more than the credit
//! it was given, data after it said it would send no more, or an unknown operation gets its
//! connection reset, and only that connection is touched. Buffers are bounded on both sides:
//! the guest's data by the credit the muxer advertises (`buf_alloc`), the host's by the same
//! amount per connection, the connections by a count.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use super::packet::{HOST_CID, Header, Op, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM};

/// A connection: its host port and its guest port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConnKey {
    pub host_port: u32,
    pub guest_port: u32,
}

/// What the host side learns from the muxer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// The guest connected to a port the host listens on.
    Accepted(ConnKey),
    /// The guest accepted a connection the host asked for.
    Connected(ConnKey),
    /// The guest refused (or never answered) a connection the host asked for.
    Refused(ConnKey),
    /// Bytes (or the end of the guest's data) wait in [`Muxer::recv`].
    Readable(ConnKey),
    /// The guest now has room for more of the host's bytes.
    Writable(ConnKey),
    /// The connection is gone (reset, closed by both sides, the device reset).
    Closed(ConnKey),
}

/// Why the host side's request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MuxError {
    #[error("no such vsock connection {0:?}")]
    NoConnection(ConnKey),
    #[error("the vsock connection {0:?} is not established")]
    NotEstablished(ConnKey),
    #[error("the guest receives no more on {0:?}")]
    PeerShutdown(ConnKey),
    #[error("this VM has {0} vsock connections, the most it may have")]
    TooMany(usize),
    #[error("no free host port for a vsock connection")]
    NoPort,
}

/// Bounds of one VM's vsock.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections at once.
    pub max_connections: usize,
    /// Bytes the guest may send ahead on one connection (the advertised `buf_alloc`), and bytes
    /// the host may queue on one.
    pub buffer: u32,
    /// Payload of one packet to the guest.
    pub max_payload: u32,
    /// How long (ms) a connection may stay half-open: a connect the guest does not answer, a
    /// close it does not acknowledge.
    pub close_timeout_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self { max_connections: 64, buffer: 256 * 1024, max_payload: 64 * 1024, close_timeout_ms: 2_000 }
    }
}

/// The first host port the muxer gives to connections the host opens.
pub const EPHEMERAL_PORTS: u32 = 49_152;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// The host sent REQUEST at this time and waits for the guest's RESPONSE.
    Connecting {
        since: u64,
    },
    Established,
    /// The host sent SHUTDOWN (both directions) at this time and waits for the guest's RST.
    Closing {
        since: u64,
    },
}

#[derive(Debug)]
struct Conn {
    state: State,
    /// Guest → host bytes the host has not read yet (at most `Limits::buffer`).
    rx: VecDeque<u8>,
    /// Bytes the host read so far (wrapping): what `fwd_cnt` tells the guest.
    fwd_cnt: u32,
    /// `fwd_cnt` as last told to the guest.
    fwd_cnt_sent: u32,
    /// The guest sends no more (the host reads the end after `rx`).
    guest_done_sending: bool,
    /// The guest receives no more (host bytes are dropped).
    guest_done_receiving: bool,
    /// Host → guest bytes waiting for credit (at most `Limits::buffer`).
    tx: VecDeque<u8>,
    /// Bytes sent to the guest so far (wrapping).
    tx_cnt: u32,
    /// The guest's receive buffer and what it has taken out of it (wrapping).
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// The host will send no more: SHUTDOWN(SEND) goes once `tx` is empty.
    host_done_sending: bool,
    shutdown_send_sent: bool,
    /// The host is done with the connection: SHUTDOWN(both) once `tx` is empty, then Closing.
    host_closed: bool,
    /// A [`Muxer::send`] found `tx` full: [`Event::Writable`] is owed once some of it went.
    host_blocked: bool,
}

impl Conn {
    fn new(state: State, peer: &Header) -> Self {
        Self {
            state,
            rx: VecDeque::new(),
            fwd_cnt: 0,
            fwd_cnt_sent: 0,
            guest_done_sending: false,
            guest_done_receiving: false,
            tx: VecDeque::new(),
            tx_cnt: 0,
            peer_buf_alloc: peer.buf_alloc,
            peer_fwd_cnt: peer.fwd_cnt,
            host_done_sending: false,
            shutdown_send_sent: false,
            host_closed: false,
            host_blocked: false,
        }
    }

    /// Bytes the guest has room for now.
    fn credit(&self) -> u32 {
        let in_flight = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }
}

/// A packet the muxer owes the guest that carries no data.
#[derive(Debug, Clone, Copy)]
struct Control {
    key: ConnKey,
    op: Op,
    flags: u32,
}

/// One VM's vsock connections.
#[derive(Debug)]
pub struct Muxer {
    guest_cid: u64,
    limits: Limits,
    listeners: BTreeSet<u32>,
    conns: BTreeMap<ConnKey, Conn>,
    control: VecDeque<Control>,
    events: VecDeque<Event>,
    /// Where the round-robin over connections with data resumes.
    next_data: Option<ConnKey>,
    next_port: u32,
    now_ms: u64,
    /// Packets dropped or answered with a reset, for the device's metrics and logs.
    pub refused_packets: u64,
}

impl Muxer {
    pub fn new(guest_cid: u64, limits: Limits) -> Self {
        Self {
            guest_cid,
            limits,
            listeners: BTreeSet::new(),
            conns: BTreeMap::new(),
            control: VecDeque::new(),
            events: VecDeque::new(),
            next_data: None,
            next_port: EPHEMERAL_PORTS,
            now_ms: 0,
            refused_packets: 0,
        }
    }

    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Guests may connect to host port `port`.
    pub fn listen(&mut self, port: u32) {
        self.listeners.insert(port);
    }

    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// Events not yet taken by [`Self::poll_event`].
    pub fn pending_events(&self) -> usize {
        self.events.len()
    }

    /// The next thing that happened, for the host side.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Whether a packet waits for the guest (the device then fills rx buffers).
    pub fn has_packets_for_guest(&self) -> bool {
        !self.control.is_empty() || self.conns.values().any(|c| self.data_ready(c) || Self::shutdown_ready(c))
    }

    fn data_ready(&self, c: &Conn) -> bool {
        c.state == State::Established && !c.tx.is_empty() && !c.guest_done_receiving && c.credit() > 0
    }

    fn shutdown_ready(c: &Conn) -> bool {
        c.state == State::Established
            && c.tx.is_empty()
            && ((c.host_done_sending && !c.shutdown_send_sent) || c.host_closed)
    }

    fn reset_connection(&mut self, key: ConnKey) {
        if self.conns.remove(&key).is_some() {
            self.events.push_back(Event::Closed(key));
        }
        self.control.push_back(Control { key, op: Op::Rst, flags: 0 });
    }

    /// A packet from the guest's tx queue: its header and its payload (`header.len` bytes, as
    /// the device read them).
    pub fn from_guest(&mut self, header: &Header, payload: &[u8]) {
        if header.src_cid != self.guest_cid || header.dst_cid != HOST_CID {
            // Not from this guest, or not for the host: dropped (there is nobody else here).
            self.refused_packets += 1;
            return;
        }
        let key = ConnKey { host_port: header.dst_port, guest_port: header.src_port };
        let op = header.op();
        if op == Some(Op::Rst) {
            if let Some(conn) = self.conns.remove(&key) {
                let event = match conn.state {
                    State::Connecting { .. } => Event::Refused(key),
                    _ => Event::Closed(key),
                };
                self.events.push_back(event);
            }
            return;
        }
        let Some(op) = op.filter(|_| header.socket_type == TYPE_STREAM) else {
            self.refused_packets += 1;
            self.reset_connection(key);
            return;
        };
        if op == Op::Request {
            self.guest_request(key, header);
            return;
        }
        let Some(conn) = self.conns.get_mut(&key) else {
            self.refused_packets += 1;
            self.control.push_back(Control { key, op: Op::Rst, flags: 0 });
            return;
        };
        conn.peer_buf_alloc = header.buf_alloc;
        conn.peer_fwd_cnt = header.fwd_cnt;
        match (op, conn.state) {
            (Op::Response, State::Connecting { .. }) => {
                conn.state = State::Established;
                self.events.push_back(Event::Connected(key));
            }
            (Op::Rw, State::Established | State::Closing { .. }) => {
                let room = (self.limits.buffer as usize).saturating_sub(conn.rx.len());
                if conn.guest_done_sending || payload.len() > room {
                    // Data after its own shutdown, or beyond the credit it was given.
                    self.refused_packets += 1;
                    self.reset_connection(key);
                } else if !payload.is_empty() && !conn.host_closed {
                    conn.rx.extend(payload);
                    self.events.push_back(Event::Readable(key));
                }
            }
            (Op::Shutdown, State::Established | State::Closing { .. }) => {
                let was_sending = !conn.guest_done_sending;
                conn.guest_done_sending |= header.flags & SHUTDOWN_SEND != 0;
                conn.guest_done_receiving |= header.flags & SHUTDOWN_RCV != 0;
                if conn.guest_done_receiving {
                    conn.tx.clear();
                }
                let closing = matches!(conn.state, State::Closing { .. });
                if (conn.guest_done_sending && conn.guest_done_receiving) || closing {
                    // Both directions are done: the reset ends the connection for both sides.
                    self.reset_connection(key);
                } else if was_sending && conn.guest_done_sending {
                    self.events.push_back(Event::Readable(key));
                }
            }
            (Op::CreditUpdate, _) => {}
            (Op::CreditRequest, _) => self.control.push_back(Control { key, op: Op::CreditUpdate, flags: 0 }),
            // A RESPONSE to nothing, data before the connection is up, and the like.
            _ => {
                self.refused_packets += 1;
                self.reset_connection(key);
            }
        }
    }

    fn guest_request(&mut self, key: ConnKey, header: &Header) {
        if self.conns.contains_key(&key) {
            // A second REQUEST on a live connection: the guest lost track; start over.
            self.refused_packets += 1;
            self.reset_connection(key);
            return;
        }
        if !self.listeners.contains(&key.host_port) || self.conns.len() >= self.limits.max_connections {
            self.refused_packets += 1;
            self.control.push_back(Control { key, op: Op::Rst, flags: 0 });
            return;
        }
        self.conns.insert(key, Conn::new(State::Established, header));
        self.control.push_back(Control { key, op: Op::Response, flags: 0 });
        self.events.push_back(Event::Accepted(key));
    }

    /// The next packet for the guest, with at most `max_payload` bytes of data (what its rx
    /// buffer holds after the header): control packets first, then data, one connection after
    /// the other.
    pub fn to_guest(&mut self, max_payload: usize) -> Option<(Header, Vec<u8>)> {
        while let Some(control) = self.control.pop_front() {
            // A credit update for a connection gone since is not owed any more.
            if control.op != Op::Rst && !self.conns.contains_key(&control.key) {
                continue;
            }
            return Some((self.header(control.key, control.op, control.flags, 0), Vec::new()));
        }
        let keys: Vec<ConnKey> = match self.next_data {
            Some(start) => {
                self.conns.range(start..).chain(self.conns.range(..start)).map(|(k, _)| *k).collect()
            }
            None => self.conns.keys().copied().collect(),
        };
        let cap = max_payload.min(self.limits.max_payload as usize);
        for key in keys {
            let conn = self.conns.get_mut(&key).expect("listed above");
            if conn.state == State::Established
                && !conn.tx.is_empty()
                && !conn.guest_done_receiving
                && conn.credit() > 0
                && cap > 0
            {
                let n = conn.tx.len().min(conn.credit() as usize).min(cap);
                let data: Vec<u8> = conn.tx.drain(..n).collect();
                conn.tx_cnt = conn.tx_cnt.wrapping_add(n as u32);
                if std::mem::take(&mut conn.host_blocked) {
                    self.events.push_back(Event::Writable(key));
                }
                self.next_data = self
                    .conns
                    .range((std::ops::Bound::Excluded(key), std::ops::Bound::Unbounded))
                    .next()
                    .map(|(k, _)| *k);
                return Some((self.header(key, Op::Rw, 0, n as u32), data));
            }
            if Self::shutdown_ready(conn) {
                if conn.host_closed {
                    conn.state = State::Closing { since: self.now_ms };
                    return Some((
                        self.header(key, Op::Shutdown, SHUTDOWN_RCV | SHUTDOWN_SEND, 0),
                        Vec::new(),
                    ));
                }
                conn.shutdown_send_sent = true;
                return Some((self.header(key, Op::Shutdown, SHUTDOWN_SEND, 0), Vec::new()));
            }
        }
        None
    }

    /// A header from the host for connection `key`, with its current credit figures.
    fn header(&mut self, key: ConnKey, op: Op, flags: u32, len: u32) -> Header {
        let (buf_alloc, fwd_cnt) = match self.conns.get_mut(&key) {
            Some(conn) => {
                conn.fwd_cnt_sent = conn.fwd_cnt;
                (self.limits.buffer, conn.fwd_cnt)
            }
            None => (0, 0),
        };
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: key.host_port,
            dst_port: key.guest_port,
            len,
            socket_type: TYPE_STREAM,
            op: op as u16,
            flags,
            buf_alloc,
            fwd_cnt,
        }
    }

    /// Opens a connection to the guest's port `guest_port`; [`Event::Connected`] or
    /// [`Event::Refused`] follows.
    pub fn connect(&mut self, guest_port: u32) -> Result<ConnKey, MuxError> {
        if self.conns.len() >= self.limits.max_connections {
            return Err(MuxError::TooMany(self.conns.len()));
        }
        let mut key = None;
        for _ in 0..(u32::MAX - EPHEMERAL_PORTS) {
            let port = self.next_port;
            self.next_port = if port == u32::MAX { EPHEMERAL_PORTS } else { port + 1 };
            let candidate = ConnKey { host_port: port, guest_port };
            if !self.listeners.contains(&port) && !self.conns.contains_key(&candidate) {
                key = Some(candidate);
                break;
            }
        }
        let key = key.ok_or(MuxError::NoPort)?;
        self.conns.insert(key, Conn::new(State::Connecting { since: self.now_ms }, &Header::default()));
        self.control.push_back(Control { key, op: Op::Request, flags: 0 });
        Ok(key)
    }

    /// Reads the guest's bytes on `key` into `buf`: how many; `Ok(0)` at the end of the guest's
    /// data (it shut down sending), `Ok(0)` with nothing read yet is told apart by
    /// [`Self::at_end`].
    pub fn recv(&mut self, key: ConnKey, buf: &mut [u8]) -> Result<usize, MuxError> {
        let conn = self.conns.get_mut(&key).ok_or(MuxError::NoConnection(key))?;
        let n = conn.rx.len().min(buf.len());
        for (slot, byte) in buf.iter_mut().zip(conn.rx.drain(..n)) {
            *slot = byte;
        }
        conn.fwd_cnt = conn.fwd_cnt.wrapping_add(n as u32);
        // Tell the guest about the room once a quarter of the buffer is free again (it would
        // stall waiting otherwise).
        if conn.fwd_cnt.wrapping_sub(conn.fwd_cnt_sent) >= self.limits.buffer / 4
            && !self.control.iter().any(|c| c.key == key && c.op == Op::CreditUpdate)
        {
            self.control.push_back(Control { key, op: Op::CreditUpdate, flags: 0 });
        }
        Ok(n)
    }

    /// Whether the guest's data on `key` has ended and all of it was read.
    pub fn at_end(&self, key: ConnKey) -> bool {
        self.conns.get(&key).is_none_or(|c| c.guest_done_sending && c.rx.is_empty())
    }

    /// Bytes waiting to be read on `key`.
    pub fn readable(&self, key: ConnKey) -> usize {
        self.conns.get(&key).map_or(0, |c| c.rx.len())
    }

    /// Queues the host's bytes for the guest: how many were taken (fewer when the
    /// connection's buffer is full; [`Event::Writable`] says when to try again).
    pub fn send(&mut self, key: ConnKey, data: &[u8]) -> Result<usize, MuxError> {
        let buffer = self.limits.buffer as usize;
        let conn = self.conns.get_mut(&key).ok_or(MuxError::NoConnection(key))?;
        if conn.state != State::Established || conn.host_done_sending || conn.host_closed {
            return Err(MuxError::NotEstablished(key));
        }
        if conn.guest_done_receiving {
            return Err(MuxError::PeerShutdown(key));
        }
        let n = data.len().min(buffer.saturating_sub(conn.tx.len()));
        conn.tx.extend(&data[..n]);
        conn.host_blocked |= n < data.len();
        Ok(n)
    }

    /// The host sends no more on `key` (the guest reads the end once the queued bytes are in).
    pub fn shutdown_send(&mut self, key: ConnKey) -> Result<(), MuxError> {
        let conn = self.conns.get_mut(&key).ok_or(MuxError::NoConnection(key))?;
        conn.host_done_sending = true;
        Ok(())
    }

    /// The host is done with `key`: queued bytes still go, then both directions shut down and
    /// the guest's reset (or the close timeout) ends it. Unread guest bytes are dropped.
    pub fn close(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.get_mut(&key) else { return };
        match conn.state {
            State::Connecting { .. } => self.reset_connection(key),
            State::Closing { .. } => {}
            State::Established => {
                conn.host_closed = true;
                conn.rx.clear();
            }
        }
    }

    /// Time passes (ms, monotonic): connects the guest does not answer and closes it does not
    /// acknowledge end after [`Limits::close_timeout_ms`] with a reset.
    pub fn tick(&mut self, now_ms: u64) {
        self.now_ms = now_ms;
        let timeout = self.limits.close_timeout_ms;
        let expired: Vec<(ConnKey, bool)> = self
            .conns
            .iter()
            .filter_map(|(key, c)| match c.state {
                State::Connecting { since } if now_ms.saturating_sub(since) >= timeout => Some((*key, true)),
                State::Closing { since } if now_ms.saturating_sub(since) >= timeout => Some((*key, false)),
                _ => None,
            })
            .collect();
        for (key, connecting) in expired {
            self.conns.remove(&key);
            self.events.push_back(if connecting { Event::Refused(key) } else { Event::Closed(key) });
            self.control.push_back(Control { key, op: Op::Rst, flags: 0 });
        }
    }

    /// The driver reset the device: every connection is gone on the guest's side.
    pub fn reset(&mut self) {
        let keys: Vec<ConnKey> = self.conns.keys().copied().collect();
        for key in keys {
            self.conns.remove(&key);
            self.events.push_back(Event::Closed(key));
        }
        self.control.clear();
        self.next_data = None;
    }
}

#[cfg(test)]
mod tests;
