//! The desktop's network card: a virtio-net NIC on QEMU's user-mode network stack (libslirp).
//!
//! libslirp gives the guest DHCP (10.0.2.15/24, gateway 10.0.2.2), a DNS forwarder
//! (10.0.2.3) and outbound NAT through ordinary sockets of the QEMU process, so a guest reaches
//! exactly what its QEMU process can reach. Isolation therefore comes from *where* QEMU runs:
//! `pleiades-host serve` starts it inside the desktop's own network namespace (`netns=NAME`),
//! whose only way out is a veth pair into the host, filtered and NATed by the host's
//! `inet pleiades` nftables table (see `serve::network`). Without `netns`, the NIC has the
//! host's whole network, host loopback included (10.0.2.2): fine for a developer's VM, never
//! for strangers' desktops.
//!
//! The guest's IPv6 is off (`ipv6=off`): the host's filter is written for IPv4.
//!
//! Pleiades' own VMM has no virtio-net device yet; `--net` needs `--vmm qemu`.

use std::str::FromStr;

/// A `--net user[,netns=NAME][,mac=MAC]` argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetRequest {
    /// The network namespace QEMU runs in (`/run/netns/NAME`, made by `ip netns add`).
    pub netns: Option<String>,
    /// The NIC's MAC address; `None`: QEMU's default (52:54:00:12:34:56).
    pub mac: Option<[u8; 6]>,
}

impl NetRequest {
    /// QEMU's options for the NIC (the second of `-netdev …` `-device …`).
    pub fn qemu_args(&self) -> [String; 4] {
        let mac = self.mac.map(|m| format!(",mac={}", format_mac(m))).unwrap_or_default();
        [
            "-netdev".into(),
            "user,id=net0,ipv6=off".into(),
            "-device".into(),
            format!("virtio-net-pci,netdev=net0{mac}"),
        ]
    }
}

impl FromStr for NetRequest {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut parts = s.split(',');
        if parts.next() != Some("user") {
            return Err(format!(
                "--net {s:?}: the one network backend is `user` (QEMU's user-mode stack), e.g. `user,netns=NAME`"
            ));
        }
        let mut request = Self { netns: None, mac: None };
        for option in parts {
            match option.split_once('=') {
                Some(("netns", name)) if valid_netns(name) => request.netns = Some(name.to_owned()),
                Some(("netns", name)) => {
                    return Err(format!("netns={name:?}: 1-128 letters, digits, '-', '_' or '.'"));
                }
                Some(("mac", mac)) => request.mac = Some(parse_mac(mac)?),
                _ => return Err(format!("unknown --net option {option:?}; use netns=NAME or mac=MAC")),
            }
        }
        Ok(request)
    }
}

/// A network namespace's name as `ip netns` keeps it (a file under /run/netns).
pub fn valid_netns(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let bad = || format!("mac={s:?}: six hex bytes, e.g. 52:54:00:12:34:56");
    let bytes: Vec<u8> =
        s.split(':').map(|b| u8::from_str_radix(b, 16).map_err(|_| bad())).collect::<Result<_, _>>()?;
    let mac: [u8; 6] = bytes.try_into().map_err(|_| bad())?;
    if mac[0] & 1 != 0 {
        return Err(format!("mac={s:?} is a multicast address: its first byte must be even"));
    }
    Ok(mac)
}

pub fn format_mac(m: [u8; 6]) -> String {
    format!("{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", m[0], m[1], m[2], m[3], m[4], m[5])
}

/// A stable, locally administered unicast MAC for a desktop: 52:54:00 (QEMU's prefix) and
/// three bytes of a hash of its id, so a desktop keeps its address across restarts.
pub fn desktop_mac(desktop_id: &str) -> [u8; 6] {
    let digest = ring::digest::digest(&ring::digest::SHA256, desktop_id.as_bytes());
    let h = digest.as_ref();
    [0x52, 0x54, 0x00, h[0], h[1], h[2]]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn net_arguments() {
        assert_eq!("user".parse::<NetRequest>(), Ok(NetRequest { netns: None, mac: None }));
        let r: NetRequest = "user,netns=pleiades-d1,mac=52:54:00:ab:cd:ef".parse().unwrap();
        assert_eq!(r.netns.as_deref(), Some("pleiades-d1"));
        assert_eq!(r.qemu_args()[3], "virtio-net-pci,netdev=net0,mac=52:54:00:ab:cd:ef");
        assert!("tap".parse::<NetRequest>().unwrap_err().contains("user"));
        assert!("user,netns=../etc".parse::<NetRequest>().is_err());
        assert!("user,netns=".parse::<NetRequest>().is_err());
        assert!("user,mac=01:00:00:00:00:01".parse::<NetRequest>().unwrap_err().contains("multicast"));
        assert!("user,mac=52:54:00".parse::<NetRequest>().is_err());
        assert!("user,fast".parse::<NetRequest>().is_err());
    }

    #[test]
    fn a_desktop_keeps_its_mac() {
        let mac = desktop_mac("d-1");
        assert_eq!(mac, desktop_mac("d-1"));
        assert_ne!(mac, desktop_mac("d-2"));
        assert_eq!(mac[..3], [0x52, 0x54, 0x00]);
        assert_eq!(format_mac(mac).parse::<String>().unwrap().len(), 17);
    }
}
