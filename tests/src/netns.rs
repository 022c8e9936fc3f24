//! Network namespaces for tests (root only): a stand-in for the internet behind the host, and
//! tiny HTTP servers in any namespace that count who reached them.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip").args(args).output().map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("`ip {}`: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// `ip ARGS` inside `netns`, entering only its network namespace (`ip -n` also makes `/` a
/// mount slave, which fails where `/` is not a mount point, as in a chroot).
pub fn ip_in(netns: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{netns}"))
        .arg("ip")
        .args(args)
        .output()
        .map_err(|e| format!("nsenter: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!("`ip {}` in {netns}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// A namespace reached from the host over a veth pair, `10.99.K.1/24` on the host's side and
/// `10.99.K.2/24` inside: a server "on the internet" for desktops' outbound NAT. Removed when
/// dropped.
#[derive(Debug)]
pub struct World {
    pub netns: String,
    /// The host's address on the link (what the world sees a NATed desktop come from).
    pub host_addr: Ipv4Addr,
    /// The address inside.
    pub addr: Ipv4Addr,
}

impl World {
    pub fn create() -> Result<Self, String> {
        let k = std::process::id() % 200 + 20;
        let netns = format!("pleiades-test-world-{}", std::process::id());
        let link = format!("ptw{}", std::process::id() % 100_000);
        let _ = ip(&["netns", "del", &netns]);
        ip(&["netns", "add", &netns])?;
        let world = Self {
            netns,
            host_addr: Ipv4Addr::new(10, 99, k as u8, 1),
            addr: Ipv4Addr::new(10, 99, k as u8, 2),
        };
        ip(&["link", "add", &link, "type", "veth", "peer", "name", "eth0", "netns", &world.netns])?;
        ip(&["addr", "add", &format!("{}/24", world.host_addr), "dev", &link])?;
        ip(&["link", "set", &link, "up"])?;
        ip_in(&world.netns, &["addr", "add", &format!("{}/24", world.addr), "dev", "eth0"])?;
        ip_in(&world.netns, &["link", "set", "eth0", "up"])?;
        ip_in(&world.netns, &["link", "set", "lo", "up"])?;
        Ok(world)
    }
}

impl Drop for World {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.netns]);
    }
}

/// An HTTP server that answers every request with one body and remembers its peers. Runs on a
/// thread of its own (inside a namespace when asked) until dropped.
#[derive(Debug)]
pub struct HttpServer {
    pub addr: SocketAddr,
    peers: Arc<Mutex<Vec<IpAddr>>>,
    stop: Arc<AtomicBool>,
}

impl HttpServer {
    /// Listens on `addr` (port 0: any) in the namespace `netns` (`None`: this process's).
    pub fn start(netns: Option<&str>, addr: SocketAddr, body: &str) -> Result<Self, String> {
        let (tx, rx) = std::sync::mpsc::channel();
        let peers = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (netns, body) = (netns.map(str::to_owned), body.to_owned());
        let (thread_peers, thread_stop) = (peers.clone(), stop.clone());
        std::thread::spawn(move || {
            let listener = (|| {
                if let Some(netns) = &netns {
                    // Only this thread enters the namespace; sockets it makes live there.
                    let file = std::fs::File::open(format!("/run/netns/{netns}"))
                        .map_err(|e| format!("namespace {netns}: {e}"))?;
                    nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET)
                        .map_err(|e| format!("setns {netns}: {e}"))?;
                }
                let listener = TcpListener::bind(addr).map_err(|e| format!("bind {addr}: {e}"))?;
                listener.set_nonblocking(true).map_err(|e| e.to_string())?;
                Ok::<_, String>(listener)
            })();
            let listener = match listener {
                Ok(l) => {
                    let _ = tx.send(l.local_addr().map_err(|e| e.to_string()));
                    l
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            while !thread_stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut stream, peer)) => {
                        thread_peers.lock().unwrap().push(peer.ip());
                        let _ = stream.set_nonblocking(false);
                        let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
                        let mut request = Vec::new();
                        let mut buf = [0u8; 1024];
                        while request.len() < 16 * 1024 && !request.windows(4).any(|w| w == b"\r\n\r\n") {
                            match stream.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => request.extend_from_slice(&buf[..n]),
                            }
                        }
                        let answer = format!(
                            "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
                            body.len()
                        );
                        let _ = stream.write_all(answer.as_bytes());
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        let addr = rx.recv_timeout(Duration::from_secs(10)).map_err(|e| e.to_string())??;
        Ok(Self { addr, peers, stop })
    }

    /// The addresses that connected, in order.
    pub fn peers(&self) -> Vec<IpAddr> {
        self.peers.lock().unwrap().clone()
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
