//! Redirected USB devices: the host asks the agent to attach one ([`AgentEvent::UsbAttach`]);
//! the agent opens a vsock stream to the VM process's USB port, presents the attach's token,
//! and hands the connected socket to the kernel's `vhci-hcd` (the USB/IP client that Linux
//! ships, what `usbip attach` uses): the kernel speaks USB/IP on it from then on, the device
//! appears on a virtual root-hub port and the guest's own drivers (usb-storage, usbhid, …)
//! bind to it. The socket only has to be a connected stream: `vhci-hcd` checks
//! `SOCK_STREAM` and nothing of the address family, so vsock serves as TCP would.
//!
//! An unplug needs nothing from the agent: the VM process closes the stream, `vhci-hcd` sees it
//! end and disconnects the port.
//!
//! [`AgentEvent::UsbAttach`]: pleiades_protocol::agent::AgentEvent::UsbAttach

use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use nix::sys::socket::{AddressFamily, SockFlag, SockType, VsockAddr, connect, socket};
use pleiades_protocol::agent::USB_PORT;
use pleiades_protocol::wire::UsbSpeed;

/// Where `vhci-hcd` (module `vhci-hcd`) shows its ports and takes attaches.
pub const VHCI: &str = "/sys/devices/platform/vhci_hcd.0";
/// The host's vsock context id.
const HOST_CID: u32 = 2;
/// `enum usbip_device_status`'s `VDEV_ST_NULL`: the port is free.
const PORT_FREE: u32 = 4;

/// Attaches device `id` (its stream presents `token`) at `speed`; the virtual port it is on.
pub fn attach(vhci: &Path, id: u32, token: u64, speed: UsbSpeed) -> Result<u32, String> {
    let status = read_status(vhci)?;
    let port = free_port(&status, speed).ok_or_else(|| {
        format!("no free {} port on vhci-hcd", if super_speed(speed) { "SuperSpeed" } else { "high-speed" })
    })?;
    let fd = socket(AddressFamily::Vsock, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)
        .map_err(|e| format!("cannot open a vsock socket: {e}"))?;
    connect(fd.as_raw_fd(), &VsockAddr::new(HOST_CID, USB_PORT))
        .map_err(|e| format!("cannot connect to the host's USB port: {e}"))?;
    let mut stream = std::fs::File::from(fd);
    stream.write_all(&token.to_le_bytes()).map_err(|e| format!("cannot present the token: {e}"))?;
    // "port sockfd devid speed": the kernel takes its own reference to the socket; ours is
    // closed when `stream` goes.
    let line = format!("{port} {} {id} {}", stream.as_raw_fd(), speed as u8);
    std::fs::write(vhci.join("attach"), &line)
        .map_err(|e| format!("vhci-hcd refused the attach ({line}): {e}"))?;
    Ok(port)
}

/// Whether `vhci-hcd` is there (its module loaded).
pub fn available(vhci: &Path) -> bool {
    vhci.join("attach").exists()
}

/// The default place, unless `PLEIADES_VHCI` names another (tests).
pub fn vhci_dir() -> PathBuf {
    std::env::var_os("PLEIADES_VHCI").map_or_else(|| PathBuf::from(VHCI), PathBuf::from)
}

fn read_status(vhci: &Path) -> Result<String, String> {
    std::fs::read_to_string(vhci.join("status")).map_err(|e| {
        format!("cannot read {}: {e} (is the vhci-hcd module loaded?)", vhci.join("status").display())
    })
}

fn super_speed(speed: UsbSpeed) -> bool {
    matches!(speed, UsbSpeed::Super | UsbSpeed::SuperPlus)
}

/// The first free port of the right hub in `vhci-hcd`'s status text:
///
/// ```text
/// hub port sta spd dev      sockfd local_busid
/// hs  0000 004 000 00000000 000000 0-0
/// ss  0008 004 000 00000000 000000 0-0
/// ```
fn free_port(status: &str, speed: UsbSpeed) -> Option<u32> {
    let hub = if super_speed(speed) { "ss" } else { "hs" };
    status.lines().skip(1).find_map(|line| {
        let mut fields = line.split_whitespace();
        let (h, port, state) = (fields.next()?, fields.next()?, fields.next()?);
        let free = h == hub && u32::from_str_radix(state, 16).ok()? == PORT_FREE;
        free.then(|| port.parse().ok()).flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATUS: &str = "\
hub port sta spd dev      sockfd local_busid
hs  0000 006 003 00010002 000003 1-1
hs  0001 004 000 00000000 000000 0-0
ss  0008 004 000 00000000 000000 0-0
";

    #[test]
    fn the_first_free_port_of_the_devices_hub() {
        assert_eq!(free_port(STATUS, UsbSpeed::High), Some(1));
        assert_eq!(free_port(STATUS, UsbSpeed::Full), Some(1));
        assert_eq!(free_port(STATUS, UsbSpeed::Super), Some(8));
        assert_eq!(free_port(&STATUS.replace("hs  0001 004", "hs  0001 006"), UsbSpeed::Low), None);
        assert_eq!(free_port("", UsbSpeed::High), None);
        assert_eq!(free_port("hub port\nhs zz", UsbSpeed::High), None);
    }

    #[test]
    fn without_vhci_the_attach_says_what_is_missing() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!available(dir.path()));
        let e = attach(dir.path(), 1, 2, UsbSpeed::High).unwrap_err();
        assert!(e.contains("vhci-hcd module"), "{e}");
    }
}
