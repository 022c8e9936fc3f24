//! Desktops' networks end to end, through the broker and `pleiades-host serve` (`--vmm qemu`,
//! root: the host makes a network namespace, a veth pair and nftables rules per desktop).
//!
//! A pool with a NAT network that allows one host service: Alice's desktop gets an address by
//! DHCP, fetches a page from the allowed service on the host's loopback (at 10.213.0.1) and
//! one from a server "on the internet" (a namespace behind the host, which sees the host's
//! address: NAT), and reaches nothing else: not another loopback service, not the broker's
//! API, not a service on the host's other addresses, not the spare desktop's namespace. The
//! servers count their peers, so "unreachable" is checked on both ends.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use pleiades_tests::image::GuestImage;
use pleiades_tests::netns::{HttpServer, World, ip_in};
use pleiades_tests::prerequisite::{Missing, is_root, missing};
use pleiades_tests::qemu::boot_timeout;
use pleiades_tests::stack::{Stack, StackOptions};
use pleiades_tests::wait_for;

/// What the guest's `wget` of `url` says: the body, or `FAILED:` and wget's error.
fn fetch(stack: &Stack, desktop: &str, label: &str, url: &str) -> String {
    // (busybox 1.35's `wget -T` crashes: `timeout` bounds it instead.)
    let expr = format!("timeout 6 wget -q -O - {url} 2>/tmp/e || echo FAILED: $(cat /tmp/e)");
    stack.ask_guest(desktop, label, &expr)
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

#[test]
fn desktops_reach_the_internet_and_allowed_host_services_only() {
    if !is_root() {
        match missing("desktop_network", "desktops' networks need root (network namespaces, nftables)") {
            Missing::Skip => return,
            Missing::Fail(why) => panic!("{why}"),
        }
    }
    let dir = tempfile::Builder::new().prefix("pleiades-net-").tempdir().unwrap();
    let token = std::process::id();
    let allowed = HttpServer::start(None, loopback(0), &format!("HOST-SERVICE-{token}")).unwrap();
    let forbidden = HttpServer::start(None, loopback(0), &format!("FORBIDDEN-{token}")).unwrap();
    let world = World::create().unwrap();
    let internet = HttpServer::start(
        Some(&world.netns),
        SocketAddr::new(world.addr.into(), 8080),
        &format!("WORLD-{token}"),
    )
    .unwrap();
    // A service on every host address (the world link's host side is one of them).
    let everywhere = HttpServer::start(None, SocketAddr::from(([0, 0, 0, 0], 0)), "EVERYWHERE").unwrap();

    let options = StackOptions {
        spares: 1,
        max: 2,
        network: "nat",
        host_ports: vec![allowed.addr.port()],
        ..StackOptions::local(dir.path()).unwrap()
    };
    let broker_port = options.broker_port;
    let mut stack = Stack::start(options, &GuestImage::locate().expect("test guest image")).unwrap();
    let bearer = stack.login("alice", "alice-password-1").unwrap();
    let desktop = stack.request_desktop(&bearer).unwrap();
    stack.wait_in_use(&bearer, &desktop, boot_timeout()).unwrap();
    stack.wait_booted(&desktop, 1);

    // The NIC is bound and has its lease from the user-mode network.
    let serial = stack.serial(&desktop);
    let ready = serial.lines().find(|l| l.contains("PLEIADES-READY")).unwrap();
    assert!(ready.contains("\"net\""), "no virtio-net in {ready}");
    assert!(serial.contains("pleiades-init: eth0 10.0.2.15/24 via 10.0.2.2"), "no DHCP lease:\n{serial}");

    // The allowed host service, on the host's loopback, at the services address.
    let page = fetch(&stack, &desktop, "allowed", &format!("http://10.213.0.1:{}/", allowed.addr.port()));
    assert_eq!(page, format!("HOST-SERVICE-{token}"));
    // The internet, through the host's NAT: the server sees the host, not the desktop.
    let page = fetch(&stack, &desktop, "world", &format!("http://{}:8080/", world.addr));
    assert_eq!(page, format!("WORLD-{token}"));
    assert_eq!(internet.peers(), [IpAddr::from(world.host_addr)], "the desktop's traffic is NATed");

    // Nothing else of the host: a loopback service the pool does not allow, the broker's API,
    // a service on the host's other addresses, the host's loopback through libslirp's alias.
    let refused = [
        ("forbidden", format!("http://10.213.0.1:{}/", forbidden.addr.port())),
        ("broker", format!("http://10.213.0.1:{broker_port}/healthz")),
        ("host-address", format!("http://{}:{}/", world.host_addr, everywhere.addr.port())),
        ("slirp-host", format!("http://10.0.2.2:{}/", allowed.addr.port())),
    ];
    for (label, url) in &refused {
        let answer = fetch(&stack, &desktop, label, url);
        assert!(answer.starts_with("FAILED:"), "{label}: {url} answered {answer:?}");
    }
    assert!(forbidden.peers().is_empty(), "the forbidden service was reached: {:?}", forbidden.peers());
    assert!(everywhere.peers().is_empty(), "a host address was reached: {:?}", everywhere.peers());
    assert_eq!(allowed.peers().len(), 1, "only the allowed fetch reached the allowed service");

    // The spare desktop's namespace: a server there is reachable from the host, not from
    // Alice's desktop.
    let spare_ns =
        wait_for("the spare desktop's namespace", boot_timeout(), || spare_netns(&stack, &desktop)).unwrap();
    let spare_addr = netns_addr(&spare_ns);
    let neighbour =
        HttpServer::start(Some(&spare_ns), SocketAddr::new(spare_addr, 8081), "NEIGHBOUR").unwrap();
    let from_host = std::net::TcpStream::connect_timeout(&neighbour.addr, Duration::from_secs(5));
    assert!(from_host.is_ok(), "the test cannot reach the spare's namespace itself: {from_host:?}");
    drop(from_host);
    wait_for("the host's probe", Duration::from_secs(5), || (neighbour.peers().len() == 1).then_some(()))
        .unwrap();
    let answer = fetch(&stack, &desktop, "neighbour", &format!("http://{spare_addr}:8081/"));
    assert!(answer.starts_with("FAILED:"), "another desktop answered {answer:?}");
    assert_eq!(neighbour.peers().len(), 1, "Alice's desktop reached the spare: {:?}", neighbour.peers());

    // The namespace goes with the desktop's VM.
    let netns = format!("pleiades-{desktop}");
    assert!(Path::new("/run/netns").join(&netns).exists());
    stack.host.terminate(Duration::from_secs(60)).unwrap();
    assert!(!Path::new("/run/netns").join(&netns).exists(), "{netns} left behind by the host daemon");
    assert!(!Path::new("/run/netns").join(&spare_ns).exists(), "{spare_ns} left behind by the host daemon");
}

/// The namespace of a desktop of this host other than `mine`, once it has its address.
fn spare_netns(stack: &Stack, mine: &str) -> Option<String> {
    std::fs::read_dir(stack.host_state.join("desktops"))
        .ok()?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|id| id != mine)
        .map(|id| format!("pleiades-{id}"))
        .find(|n| netns_addr_opt(n).is_some())
}

fn netns_addr(netns: &str) -> IpAddr {
    netns_addr_opt(netns).unwrap_or_else(|| panic!("{netns} has no IPv4 address"))
}

/// The IPv4 address of `eth0` in `netns`.
fn netns_addr_opt(netns: &str) -> Option<IpAddr> {
    let text = ip_in(netns, &["-4", "-o", "addr", "show", "eth0"]).ok()?;
    let cidr = text.split_whitespace().skip_while(|w| *w != "inet").nth(1)?;
    cidr.split('/').next()?.parse().ok()
}
