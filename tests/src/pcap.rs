//! Packet captures on loopback for the display benchmark (`benches/guest_display.rs`): the bytes
//! a server sent, counted the same way whatever its transport (issue #20).
//!
//! - [`Capture`]: `tcpdump -i lo --immediate-mode -U -s 96 -w FILE` on one TCP or UDP port, started and waited for
//!   ("listening on"), stopped (SIGINT) by [`Capture::stop`] or killed on drop.
//! - [`count`]: reads a classic pcap file (either byte order, µs or ns timestamps; link types
//!   Ethernet (1), raw IP (101), Linux cooked SLL (113) and SLL2 (276)) and sums, per direction
//!   of one port, the IP packets' total length: IP header + UDP/TCP header + payload, no link
//!   header. A QUIC ACK packet and a pure TCP ACK (no payload) both count.
//!
//! On loopback each packet appears once. Needs `tcpdump` (package group `spice`) and the right
//! to capture (root or CAP_NET_RAW).

use std::io::{self, BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The transport of the port a [`Capture`] watches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Tcp,
    Udp,
}

impl Transport {
    fn name(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Udp => "udp",
        }
    }

    fn number(self) -> u8 {
        match self {
            Transport::Tcp => 6,
            Transport::Udp => 17,
        }
    }
}

/// One port's traffic in a capture, each direction: IP bytes (IP total length, headers
/// included, no link header) and packets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    /// Packets whose source port is the port (the server's, towards its client).
    pub from_port_bytes: u64,
    pub from_port_packets: u64,
    /// Packets whose destination port is the port.
    pub to_port_bytes: u64,
    pub to_port_packets: u64,
    /// Packets tcpdump said the kernel dropped (`N packets dropped by kernel`), if it said.
    pub dropped: Option<u64>,
}

/// One IP packet of a capture: when, its transport, ports and IP total length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Packet {
    /// Since the Unix epoch (the capture's CLOCK_REALTIME).
    pub time: Duration,
    pub protocol: u8,
    pub src_port: u16,
    pub dst_port: u16,
    /// IPv4: the header's total length; IPv6: 40 + the payload length.
    pub ip_len: u64,
}

const LINKTYPE_ETHERNET: u32 = 1;
const LINKTYPE_RAW: u32 = 101;
const LINKTYPE_LINUX_SLL: u32 = 113;
const LINKTYPE_LINUX_SLL2: u32 = 276;

fn bad(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("not a pcap file I can read: {what}"))
}

/// The IP packets (IPv4, IPv6) of a classic pcap file; other frames are skipped. A record cut
/// off at the end (a capture stopped while writing) ends the list.
pub fn packets(file: &[u8]) -> io::Result<Vec<Packet>> {
    if file.len() < 24 {
        return Err(bad("shorter than its 24-byte header"));
    }
    let magic = [file[0], file[1], file[2], file[3]];
    let (big, nanos) = match magic {
        [0xd4, 0xc3, 0xb2, 0xa1] => (false, false),
        [0xa1, 0xb2, 0xc3, 0xd4] => (true, false),
        [0x4d, 0x3c, 0xb2, 0xa1] => (false, true),
        [0xa1, 0xb2, 0x3c, 0x4d] => (true, true),
        _ => return Err(bad("unknown magic number (pcapng?)")),
    };
    let u32_at = |b: &[u8], at: usize| {
        let word = [b[at], b[at + 1], b[at + 2], b[at + 3]];
        if big { u32::from_be_bytes(word) } else { u32::from_le_bytes(word) }
    };
    let linktype = u32_at(file, 20) & 0x0fff_ffff;
    let mut out = Vec::new();
    let mut at = 24;
    while at + 16 <= file.len() {
        let (sec, frac, incl) = (u32_at(file, at), u32_at(file, at + 4), u32_at(file, at + 8) as usize);
        let start = at + 16;
        let Some(data) = file.get(start..start + incl) else { break };
        at = start + incl;
        let time = Duration::new(u64::from(sec), if nanos { frac } else { frac.saturating_mul(1000) });
        if let Some(ip) = ip_of(linktype, data).and_then(|ip| packet(ip, time)) {
            out.push(ip);
        }
    }
    Ok(out)
}

/// The IP packet inside a frame of `linktype`, or `None` (not IP, or a link type not read).
fn ip_of(linktype: u32, frame: &[u8]) -> Option<&[u8]> {
    let (ethertype, header) = match linktype {
        LINKTYPE_ETHERNET => (u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]), 14),
        LINKTYPE_LINUX_SLL => (u16::from_be_bytes([*frame.get(14)?, *frame.get(15)?]), 16),
        LINKTYPE_LINUX_SLL2 => (u16::from_be_bytes([*frame.first()?, *frame.get(1)?]), 20),
        LINKTYPE_RAW => return Some(frame),
        _ => return None,
    };
    matches!(ethertype, 0x0800 | 0x86dd).then(|| frame.get(header..)).flatten()
}

/// Ports and length of one IP packet (only the headers need be captured).
fn packet(ip: &[u8], time: Duration) -> Option<Packet> {
    let (protocol, ip_len, transport) = match ip.first()? >> 4 {
        4 => {
            let ihl = usize::from(ip[0] & 0x0f) * 4;
            (*ip.get(9)?, u64::from(u16::from_be_bytes([*ip.get(2)?, *ip.get(3)?])), ihl)
        }
        6 => (*ip.get(6)?, 40 + u64::from(u16::from_be_bytes([*ip.get(4)?, *ip.get(5)?])), 40),
        _ => return None,
    };
    let ports = ip.get(transport..transport + 4)?;
    Some(Packet {
        time,
        protocol,
        src_port: u16::from_be_bytes([ports[0], ports[1]]),
        dst_port: u16::from_be_bytes([ports[2], ports[3]]),
        ip_len,
    })
}

/// `port`'s traffic (over `transport`) in a pcap file, packets captured within `window` (since
/// the Unix epoch, both ends included) or all of them.
pub fn count(
    file: &[u8],
    transport: Transport,
    port: u16,
    window: Option<(Duration, Duration)>,
) -> io::Result<Traffic> {
    let mut traffic = Traffic::default();
    for p in packets(file)? {
        if p.protocol != transport.number() || window.is_some_and(|(a, b)| p.time < a || p.time > b) {
            continue;
        }
        if p.src_port == port {
            traffic.from_port_bytes += p.ip_len;
            traffic.from_port_packets += 1;
        } else if p.dst_port == port {
            traffic.to_port_bytes += p.ip_len;
            traffic.to_port_packets += 1;
        }
    }
    Ok(traffic)
}

/// Now, since the Unix epoch: the clock of a capture's timestamps, for [`Capture::stop`]'s window.
pub fn now() -> Duration {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default()
}

/// `tcpdump` capturing one port's packets on loopback into a file; killed on drop.
pub struct Capture {
    child: Child,
    transport: Transport,
    port: u16,
    file: PathBuf,
    _dir: tempfile::TempDir,
    /// What tcpdump printed on stderr, whole once it has exited.
    stderr: Option<JoinHandle<String>>,
}

impl std::fmt::Debug for Capture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Capture").field("port", &self.port).field("file", &self.file).finish_non_exhaustive()
    }
}

/// How long tcpdump may take to say it is listening.
const LISTENING: Duration = Duration::from_secs(10);

impl Capture {
    /// Starts `tcpdump -i lo` on `transport` `port` (either direction) and returns once it
    /// listens (bounded); a missing tcpdump, or one that cannot capture, is said.
    pub fn start(transport: Transport, port: u16) -> Result<Self, String> {
        crate::prerequisite::command("tcpdump")
            .map_err(|_| "`tcpdump` is not installed: install `tcpdump` (`./dev deps spice`)".to_owned())?;
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let file = dir.path().join("lo.pcap");
        let mut command = Command::new("tcpdump");
        // `--immediate-mode`: each packet reaches tcpdump (and, `-U`, the file) when it is
        // captured, not when a buffer block fills or times out, so none of the window's last
        // packets is still in the kernel's ring when the capture is stopped.
        command.args(["-i", "lo", "-n", "--immediate-mode", "-U", "-s", "96", "-w"]).arg(&file);
        if crate::prerequisite::is_root() {
            // Debian's tcpdump drops to the user `tcpdump` after opening the interface, who
            // could not write into this private directory.
            command.args(["-Z", "root"]);
        }
        let mut child = command
            .arg(format!("{} port {port}", transport.name()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot run tcpdump: {e}"))?;
        let stderr = child.stderr.take().ok_or("tcpdump has no stderr")?;
        let (tx, rx) = mpsc::channel();
        let reader = std::thread::Builder::new()
            .name("tcpdump-stderr".into())
            .spawn(move || {
                let mut said = String::new();
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    if line.contains("listening on") {
                        let _ = tx.send(());
                    }
                    said.push_str(&line);
                    said.push('\n');
                }
                said
            })
            .map_err(|e| e.to_string())?;
        let mut capture = Self { child, transport, port, file, _dir: dir, stderr: Some(reader) };
        if rx.recv_timeout(LISTENING).is_err() {
            capture.end();
            let said = capture.stderr.take().and_then(|t| t.join().ok()).unwrap_or_default();
            return Err(format!(
                "tcpdump did not start listening on lo in {LISTENING:?} (capturing needs root or \
                 CAP_NET_RAW): {}",
                said.trim()
            ));
        }
        Ok(capture)
    }

    /// SIGINT (tcpdump writes what it has and exits), then SIGKILL after a few seconds.
    fn end(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // The packets sent a moment ago: let tcpdump write them.
            std::thread::sleep(Duration::from_millis(200));
            let _ = Command::new("kill").args(["-INT", &self.child.id().to_string()]).status();
            let exited = crate::wait_for("tcpdump to exit", Duration::from_secs(5), || {
                self.child.try_wait().ok().flatten()
            });
            if exited.is_err() {
                let _ = self.child.kill();
            }
        }
        let _ = self.child.wait();
    }

    /// Stops the capture and counts the port's traffic, the packets within `window` (since the
    /// Unix epoch, see [`now`]) or all of them.
    pub fn stop(mut self, window: Option<(Duration, Duration)>) -> Result<Traffic, String> {
        self.end();
        let said = self.stderr.take().and_then(|t| t.join().ok()).unwrap_or_default();
        let file = std::fs::read(&self.file)
            .map_err(|e| format!("tcpdump wrote no capture ({e}): {}", said.trim()))?;
        let mut traffic = count(&file, self.transport, self.port, window)
            .map_err(|e| format!("{e}: tcpdump said: {}", said.trim()))?;
        traffic.dropped = said
            .lines()
            .find(|l| l.contains("dropped by kernel"))
            .and_then(|l| l.split_whitespace().next()?.parse().ok());
        Ok(traffic)
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.end();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A little-endian µs pcap header with `linktype`.
    fn header(linktype: u32) -> Vec<u8> {
        let mut h = vec![0xd4, 0xc3, 0xb2, 0xa1, 2, 0, 4, 0];
        h.extend_from_slice(&[0; 8]);
        h.extend_from_slice(&96u32.to_le_bytes());
        h.extend_from_slice(&linktype.to_le_bytes());
        h
    }

    /// An Ethernet frame with an IPv4 packet of `payload` bytes over `protocol`, cut at 96
    /// bytes as `-s 96` does, as a pcap record at `sec`.
    fn record(sec: u32, protocol: u8, src: u16, dst: u16, payload: usize) -> Vec<u8> {
        let l4 = if protocol == 6 { 20 } else { 8 };
        let total = 20 + l4 + payload;
        let mut frame = vec![0u8; 12];
        frame.extend_from_slice(&[0x08, 0x00]);
        let mut ip = vec![0x45, 0];
        ip.extend_from_slice(&(total as u16).to_be_bytes());
        ip.extend_from_slice(&[0, 0, 0x40, 0, 64, protocol, 0, 0, 127, 0, 0, 1, 127, 0, 0, 1]);
        ip.extend_from_slice(&src.to_be_bytes());
        ip.extend_from_slice(&dst.to_be_bytes());
        ip.resize(total, 0xab);
        frame.extend_from_slice(&ip);
        let orig = frame.len();
        frame.truncate(96);
        let mut r = Vec::new();
        r.extend_from_slice(&sec.to_le_bytes());
        r.extend_from_slice(&500_000u32.to_le_bytes());
        r.extend_from_slice(&(frame.len() as u32).to_le_bytes());
        r.extend_from_slice(&(orig as u32).to_le_bytes());
        r.extend_from_slice(&frame);
        r
    }

    #[test]
    fn ip_lengths_are_summed_per_direction_of_the_port() {
        let mut file = header(LINKTYPE_ETHERNET);
        file.extend(record(100, 17, 4433, 50000, 1200)); // server → client: 1228 IP bytes
        file.extend(record(101, 17, 4433, 50000, 30)); // a QUIC ACK: 58
        file.extend(record(101, 17, 50000, 4433, 40)); // client → server: 68
        file.extend(record(102, 6, 4433, 50000, 0)); // TCP on the same number: not UDP
        file.extend(record(103, 17, 9999, 50000, 500)); // another port
        file.extend(record(200, 17, 4433, 50000, 100)); // after the window: 128
        let all = count(&file, Transport::Udp, 4433, None).unwrap();
        assert_eq!(
            all,
            Traffic {
                from_port_bytes: 1228 + 58 + 128,
                from_port_packets: 3,
                to_port_bytes: 68,
                to_port_packets: 1,
                dropped: None
            }
        );
        let window = Some((Duration::from_secs(100), Duration::from_secs(150)));
        assert_eq!(count(&file, Transport::Udp, 4433, window).unwrap().from_port_bytes, 1228 + 58);

        // A pure TCP ACK counts its 40 header bytes.
        let tcp = count(&file, Transport::Tcp, 4433, None).unwrap();
        assert_eq!((tcp.from_port_bytes, tcp.from_port_packets), (40, 1));
        assert_eq!(packets(&file).unwrap()[0].time, Duration::new(100, 500_000_000));
    }

    #[test]
    fn a_cut_record_ends_the_file_and_other_formats_are_refused() {
        let mut file = header(LINKTYPE_ETHERNET);
        file.extend(record(1, 17, 1, 2, 10));
        let whole = file.len();
        file.extend(record(2, 17, 1, 2, 10));
        file.truncate(whole + 20);
        assert_eq!(packets(&file).unwrap().len(), 1);
        assert!(packets(&[0x0a, 0x0d, 0x0d, 0x0a, 0, 0, 0, 0].repeat(4)).is_err());
        assert!(packets(&file[..10]).is_err());
    }

    /// tcpdump itself, where it is installed and may capture (root): a few UDP datagrams to a
    /// port on loopback, each direction counted with its 28 header bytes.
    #[test]
    fn a_capture_on_loopback_counts_both_directions() {
        // Under CI (`./dev test` installs tcpdump, and runs as root) a missing one fails.
        let test = "pcap::a_capture_on_loopback_counts_both_directions";
        if crate::prerequisite::require(test, crate::prerequisite::command("tcpdump")).is_none() {
            return;
        }
        let root = if crate::prerequisite::is_root() { Ok(()) } else { Err("capturing needs root") };
        if crate::prerequisite::require(test, root).is_none() {
            return;
        }
        let server = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = server.local_addr().unwrap().port();
        let capture = Capture::start(Transport::Udp, port).unwrap();
        let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut buf = [0u8; 2000];
        for _ in 0..3 {
            client.send_to(&[1; 100], ("127.0.0.1", port)).unwrap();
            let (_, from) = server.recv_from(&mut buf).unwrap();
            server.send_to(&[2; 1000], from).unwrap();
            client.recv_from(&mut buf).unwrap();
        }
        let t = capture.stop(None).unwrap();
        assert_eq!((t.from_port_bytes, t.from_port_packets), (3 * 1028, 3));
        assert_eq!((t.to_port_bytes, t.to_port_packets), (3 * 128, 3));
    }

    #[test]
    fn linux_cooked_captures_are_read() {
        // SLL: a 16-byte header, the protocol at 14; the same IP packet as over Ethernet.
        let eth = record(1, 17, 7, 8, 10);
        let mut file = header(LINKTYPE_LINUX_SLL);
        let frame = &eth[16..];
        let mut sll = vec![0u8; 14];
        sll.extend_from_slice(&[0x08, 0x00]);
        sll.extend_from_slice(&frame[14..]);
        file.extend_from_slice(&eth[..8]);
        file.extend_from_slice(&(sll.len() as u32).to_le_bytes());
        file.extend_from_slice(&(sll.len() as u32).to_le_bytes());
        file.extend(sll);
        let t = count(&file, Transport::Udp, 7, None).unwrap();
        assert_eq!((t.from_port_bytes, t.from_port_packets), (38, 1));
    }
}
