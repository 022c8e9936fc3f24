//! Desktops' networks: one network namespace per desktop, a veth pair into the host, and the
//! host's `inet pleiades` nftables table that NATs the desktops out and keeps them apart.
//!
//! ```text
//!  guest ──virtio-net── QEMU (libslirp: DHCP, DNS, NAT)     netns pleiades-<desktop>
//!                         │ ordinary sockets
//!                       eth0 10.214.x.y+2/30 ── veth ── plhN 10.214.x.y+1/30   host
//!                                                         │ table inet pleiades
//!                                                         ├─ out to the world: masquerade
//!                                                         ├─ 10.213.0.1:P → 127.0.0.1:P if the pool allows P
//!                                                         └─ anything else for the host, another
//!                                                            desktop or a Pleiades address: dropped
//! ```
//!
//! The guest's own network is libslirp's (see [`crate::vm::net`]): it gets 10.0.2.15 by DHCP,
//! DNS at 10.0.2.3, and whatever its QEMU can reach, which is what the namespace can reach: the
//! world through the host's NAT, the host's loopback services a pool allows at
//! [`SERVICES_ADDR`] (TCP ports, DNATed to 127.0.0.1), and nothing else of the host: not its
//! other addresses, not its loopback, not another desktop's namespace. When the host's resolver
//! is on its loopback (systemd-resolved's 127.0.0.53), DNS to [`SERVICES_ADDR`] reaches it and
//! the namespace's `resolv.conf` (`/etc/netns/NAME/`, which `ip netns exec` mounts for QEMU)
//! says so.
//!
//! The table's chains hold only rules that are the same for every desktop and every daemon, so
//! each daemon (re)writes them at start without disturbing another's desktops; what is per
//! desktop lives in the namespace, its veth, and elements of the `host_services` set, all
//! removed when the desktop's VM ends ([`DesktopNet`]'s drop). Interface names are claimed by
//! creating them (`ip link add` fails for a taken name), so daemons sharing a machine never
//! collide. The host forwards IPv4 (`net.ipv4.ip_forward=1`, set at start).

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Command, Stdio};

/// Where a desktop reaches the host services its pool allows (TCP, forwarded to the host's
/// 127.0.0.1 on the same port), and the host's loopback resolver when it has one.
pub const SERVICES_ADDR: Ipv4Addr = Ipv4Addr::new(10, 213, 0, 1);
/// The desktops' links, a /30 each: `10.214.0.0 + 4·N` for `plhN`.
const LINKS: Ipv4Addr = Ipv4Addr::new(10, 214, 0, 0);
const MAX_LINKS: u32 = 1 << 14;
/// Host-side veth names: `plh0` … `plh16383` (at most 15 bytes, as Linux allows).
const LINK_PREFIX: &str = "plh";

/// The host's side of desktop networking, set up once by the daemon.
#[derive(Debug, Clone)]
pub struct HostNetwork {
    /// The host's resolver when it is on its loopback (desktops reach it at [`SERVICES_ADDR`]).
    loopback_resolver: Option<Ipv4Addr>,
}

/// What a desktop's pool allows it on the host.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetPolicy {
    /// TCP ports of services on the host's loopback the desktop reaches at [`SERVICES_ADDR`].
    pub host_tcp_ports: Vec<u16>,
}

impl HostNetwork {
    /// Turns on IPv4 forwarding and (re)writes the `inet pleiades` table. Needs root, `nft`
    /// (nftables) and `ip` (iproute2).
    pub fn setup() -> Result<Self, String> {
        let resolv = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
        let loopback_resolver = resolv
            .lines()
            .filter_map(|l| l.trim().strip_prefix("nameserver"))
            .filter_map(|a| a.trim().parse::<Ipv4Addr>().ok())
            .find(Ipv4Addr::is_loopback);
        let this = Self { loopback_resolver };
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").map_err(|e| {
            format!("cannot turn on IPv4 forwarding for desktops' networks (run as root): {e}")
        })?;
        nft(&this.ruleset())?;
        // Elements of links that are gone (a daemon that crashed).
        remove_elements_where(|link| !PathBuf::from("/sys/class/net").join(link).exists())?;
        tracing::info!(services = %SERVICES_ADDR, "desktop networks: nftables table `inet pleiades` ready");
        Ok(this)
    }

    /// The table, its set and chains, and the rules every desktop shares.
    fn ruleset(&self) -> String {
        let mut dns = String::new();
        if let Some(resolver) = self.loopback_resolver {
            for proto in ["udp", "tcp"] {
                dns += &format!(
                    "add rule inet pleiades prerouting iifname \"{LINK_PREFIX}*\" ip daddr {SERVICES_ADDR} {proto} dport 53 dnat ip to {resolver}\n"
                );
            }
        }
        format!(
            "table inet pleiades {{
  set host_services {{ type ifname . inet_service; }}
  chain prerouting {{ type nat hook prerouting priority dstnat; policy accept; }}
  chain postrouting {{ type nat hook postrouting priority srcnat; policy accept; }}
  chain input {{ type filter hook input priority filter; policy accept; }}
  chain forward {{ type filter hook forward priority filter; policy accept; }}
}}
flush chain inet pleiades prerouting
flush chain inet pleiades postrouting
flush chain inet pleiades input
flush chain inet pleiades forward
add rule inet pleiades prerouting iifname \"{p}*\" ip daddr {SERVICES_ADDR} iifname . tcp dport @host_services dnat ip to 127.0.0.1
{dns}add rule inet pleiades postrouting ip saddr {LINKS}/16 oifname != \"{p}*\" masquerade
add rule inet pleiades input iifname \"{p}*\" ct state established,related accept
add rule inet pleiades input iifname \"{p}*\" ct status dnat accept
add rule inet pleiades input iifname \"{p}*\" drop
add rule inet pleiades forward iifname \"{p}*\" oifname \"{p}*\" drop
add rule inet pleiades forward iifname \"{p}*\" ip daddr {{ {services_net}/16, {LINKS}/16 }} drop
add rule inet pleiades forward iifname \"{p}*\" meta nfproto ipv6 drop
add rule inet pleiades forward oifname \"{p}*\" ct state established,related accept
add rule inet pleiades forward oifname \"{p}*\" drop
",
            p = LINK_PREFIX,
            services_net = Ipv4Addr::new(10, 213, 0, 0),
        )
    }

    /// The desktop's namespace and link, with what its pool allows. A namespace left by a VM
    /// that ended without its daemon (a crash) is replaced.
    pub fn create(&self, desktop_id: &str, policy: &NetPolicy) -> Result<DesktopNet, String> {
        let netns = netns_name(desktop_id);
        if PathBuf::from("/run/netns").join(&netns).exists() {
            let _ = run("ip", &["netns", "del", &netns]);
        }
        run("ip", &["netns", "add", &netns])?;
        let mut net = DesktopNet { netns, link: None, resolv_dir: None };
        let index = net.claim_link()?;
        let link = net.link.clone().unwrap_or_default();
        let base = u32::from(LINKS) + 4 * index;
        let (host, guest) = (Ipv4Addr::from(base + 1), Ipv4Addr::from(base + 2));
        let ns = net.netns.clone();
        run("ip", &["addr", "add", &format!("{host}/30"), "dev", &link])?;
        // DNAT to 127.0.0.1 needs the link to accept loopback destinations.
        std::fs::write(format!("/proc/sys/net/ipv4/conf/{link}/route_localnet"), "1")
            .map_err(|e| format!("cannot set route_localnet on {link}: {e}"))?;
        run("ip", &["link", "set", &link, "up"])?;
        // Inside the namespace through nsenter, which enters only the network namespace
        // (`ip -n` also makes `/` a mount slave, which fails where `/` is not a mount point).
        let inside = |args: &[&str]| {
            let net = format!("--net=/run/netns/{ns}");
            run("nsenter", &[[net.as_str(), "ip"].as_slice(), args].concat())
        };
        inside(&["addr", "add", &format!("{guest}/30"), "dev", "eth0"])?;
        inside(&["link", "set", "eth0", "up"])?;
        inside(&["link", "set", "lo", "up"])?;
        inside(&["route", "add", "default", "via", &host.to_string()])?;
        if self.loopback_resolver.is_some() {
            let dir = PathBuf::from("/etc/netns").join(&ns);
            std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
            net.resolv_dir = Some(dir.clone());
            std::fs::write(dir.join("resolv.conf"), format!("nameserver {SERVICES_ADDR}\n"))
                .map_err(|e| format!("cannot write {}/resolv.conf: {e}", dir.display()))?;
        }
        if !policy.host_tcp_ports.is_empty() {
            let elements: Vec<String> =
                policy.host_tcp_ports.iter().map(|p| format!("\"{link}\" . {p}")).collect();
            nft(&format!("add element inet pleiades host_services {{ {} }}\n", elements.join(", ")))?;
        }
        tracing::info!(desktop = desktop_id, netns = %ns, %link, %guest, ports = ?policy.host_tcp_ports, "desktop network ready");
        Ok(net)
    }
}

/// The namespace a desktop gets ([`HostNetwork::create`]).
pub fn netns_name(desktop_id: &str) -> String {
    format!("pleiades-{desktop_id}")
}

/// Removes the namespaces of these desktops, left by a daemon that did not stop cleanly (their
/// veths go with them). Called at start for the desktops in the daemon's state directory.
pub fn remove_stale<'a>(desktop_ids: impl IntoIterator<Item = &'a str>) {
    for id in desktop_ids {
        let netns = netns_name(id);
        if PathBuf::from("/run/netns").join(&netns).exists() {
            match run("ip", &["netns", "del", &netns]) {
                Ok(()) => {
                    tracing::info!(%netns, "removed the network namespace of a desktop that no longer runs")
                }
                Err(e) => tracing::warn!(%netns, "{e}"),
            }
        }
    }
}

/// A desktop's namespace and link; removed (with its `host_services` elements) when dropped.
#[derive(Debug)]
pub struct DesktopNet {
    netns: String,
    link: Option<String>,
    resolv_dir: Option<PathBuf>,
}

impl DesktopNet {
    /// The namespace QEMU runs in.
    pub fn netns(&self) -> &str {
        &self.netns
    }

    /// Creates the veth pair under the first free `plhN` name, its peer in the namespace as
    /// `eth0`. Stale set elements of that name (a daemon that crashed) are removed first.
    fn claim_link(&mut self) -> Result<u32, String> {
        for index in 0..MAX_LINKS {
            let link = format!("{LINK_PREFIX}{index}");
            if PathBuf::from("/sys/class/net").join(&link).exists() {
                continue;
            }
            match run(
                "ip",
                &["link", "add", &link, "type", "veth", "peer", "name", "eth0", "netns", &self.netns],
            ) {
                Ok(()) => {
                    self.link = Some(link.clone());
                    remove_elements(&link)?;
                    return Ok(index);
                }
                // Taken meanwhile by another daemon: try the next.
                Err(e) if e.contains("File exists") => continue,
                Err(e) => return Err(e),
            }
        }
        Err(format!("all {MAX_LINKS} desktop links are in use"))
    }
}

impl Drop for DesktopNet {
    fn drop(&mut self) {
        if let Some(link) = &self.link
            && let Err(e) = remove_elements(link)
        {
            tracing::warn!(netns = %self.netns, "{e}");
        }
        // The namespace takes its end of the veth pair with it, and the pair goes too.
        if let Err(e) = run("ip", &["netns", "del", &self.netns]) {
            tracing::warn!(netns = %self.netns, "{e}");
        }
        if let Some(dir) = &self.resolv_dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Removes the `host_services` elements of one link.
fn remove_elements(link: &str) -> Result<(), String> {
    remove_elements_where(|l| l == link)
}

/// Removes the `host_services` elements whose link matches.
fn remove_elements_where(matches: impl Fn(&str) -> bool) -> Result<(), String> {
    let listing = command_output("nft", &["-j", "list", "set", "inet", "pleiades", "host_services"])?;
    let json: serde_json::Value =
        serde_json::from_str(&listing).map_err(|e| format!("nft's listing of host_services: {e}"))?;
    let elements: Vec<String> = set_elements(&json)
        .into_iter()
        .filter(|(link, _)| matches(link))
        .map(|(link, port)| format!("\"{link}\" . {port}"))
        .collect();
    if elements.is_empty() {
        return Ok(());
    }
    nft(&format!("delete element inet pleiades host_services {{ {} }}\n", elements.join(", ")))
}

/// The (link, port) elements in `nft -j list set`'s answer.
fn set_elements(json: &serde_json::Value) -> Vec<(String, u64)> {
    let sets = json["nftables"].as_array().into_iter().flatten().filter_map(|o| o.get("set"));
    sets.flat_map(|set| set["elem"].as_array().cloned().unwrap_or_default())
        .filter_map(|elem| {
            let concat = elem["concat"].as_array()?;
            Some((concat.first()?.as_str()?.to_owned(), concat.get(1)?.as_u64()?))
        })
        .collect()
}

/// Applies an nftables script atomically.
fn nft(script: &str) -> Result<(), String> {
    use std::io::Write;
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run nft (install nftables: `./dev deps`): {e}"))?;
    child
        .stdin
        .take()
        .map(|mut stdin| stdin.write_all(script.as_bytes()))
        .transpose()
        .map_err(|e| e.to_string())?;
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("nft refused the desktop network rules: {}", String::from_utf8_lossy(&out.stderr).trim()))
    }
}

fn run(program: &str, args: &[&str]) -> Result<(), String> {
    command_output(program, args).map(drop)
}

fn command_output(program: &str, args: &[&str]) -> Result<String, String> {
    let out =
        Command::new(program).args(args).stdin(Stdio::null()).output().map_err(|e| {
            format!("cannot run {program} (install iproute2 and nftables: `./dev deps`): {e}")
        })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!("`{program} {}` failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ruleset_keeps_desktops_in() {
        let rules = HostNetwork { loopback_resolver: None }.ruleset();
        assert!(rules.contains("iifname \"plh*\" drop"), "{rules}");
        assert!(rules.contains("iifname \"plh*\" oifname \"plh*\" drop"));
        assert!(!rules.contains("dport 53"), "no resolver on loopback: no DNS rule");
        let rules = HostNetwork { loopback_resolver: Some(Ipv4Addr::new(127, 0, 0, 53)) }.ruleset();
        assert!(rules.contains("udp dport 53 dnat ip to 127.0.0.53"), "{rules}");
    }

    #[test]
    fn set_elements_from_nft_json() {
        let json = serde_json::json!({"nftables": [
            {"metainfo": {}},
            {"set": {"name": "host_services", "elem": [
                {"concat": ["plh1", 8080]}, {"concat": ["plh10", 22]}, {"concat": ["plh1", 53]}
            ]}}
        ]});
        let elements = set_elements(&json);
        assert_eq!(elements, [("plh1".into(), 8080), ("plh10".into(), 22), ("plh1".into(), 53)]);
        assert!(set_elements(&serde_json::json!({})).is_empty());
    }
}
