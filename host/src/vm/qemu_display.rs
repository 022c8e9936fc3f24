//! Host-initiated display changes under `--vmm qemu`, through QEMU's D-Bus display.
//!
//! With `vhost-user-gpu-pci`, QEMU owns the GPU's configuration space, so only QEMU can raise
//! the display-change event that makes the guest's driver re-read the display info; it refuses
//! a backend's config-change message. QEMU raises the event when one of its UIs changes a
//! console's size (`dpy_set_ui_info`). The UI has to accept a console that may show DMABUFs
//! (QEMU marks vhost-user-gpu consoles so): VNC does not, the D-Bus display does, without GL.
//! So `run` starts QEMU with `-display dbus,p2p=yes,gl=off`, hands it one end of a socket pair
//! over QMP (`getfd` + `add_client`), and speaks D-Bus peer to peer on the other end:
//! `org.qemu.Display1.Console.SetUIInfo` on each head's console.
//!
//! The layout itself is Pleiades': the GPU answers the guest's `GET_DISPLAY_INFO` from the
//! layout the host asked for (set on the device before QEMU is poked), so one event is enough
//! even when the guest reads the display info before QEMU has seen every head's new size.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;

use serde_json::json;
use zbus::blocking::Connection;

use super::qmp::Qmp;

/// QEMU's display option for VMs with a Pleiades GPU.
pub const QEMU_DISPLAY: &str = "dbus,p2p=yes,gl=off";
const VM_PATH: &str = "/org/qemu/Display1/VM";
const VM_INTERFACE: &str = "org.qemu.Display1.VM";
const CONSOLE_INTERFACE: &str = "org.qemu.Display1.Console";
/// The pixel density assumed for a monitor's physical size (as the GPU's EDID does).
const DPI: f64 = 96.0;

/// What can go wrong talking to QEMU's display.
#[derive(Debug, thiserror::Error)]
pub enum DisplayError {
    #[error("cannot hand QEMU a display connection: {0}")]
    Qmp(String),
    #[error("QEMU's D-Bus display did not answer: {0}")]
    Dbus(#[from] zbus::Error),
    #[error("QEMU has no console for monitor {0}; was the GPU started with heads={1}?")]
    NoHead(usize, usize),
}

/// Reads a D-Bus property.
fn property<T>(conn: &Connection, path: &str, interface: &str, name: &str) -> Result<T, DisplayError>
where
    T: TryFrom<zbus::zvariant::OwnedValue>,
    T::Error: Into<zbus::zvariant::Error>,
{
    let reply = conn.call_method(
        None::<&str>,
        path,
        Some("org.freedesktop.DBus.Properties"),
        "Get",
        &(interface, name),
    )?;
    let value: zbus::zvariant::OwnedValue = reply.body().deserialize()?;
    T::try_from(value).map_err(|e| DisplayError::Dbus(zbus::Error::Variant(e.into())))
}

/// A peer-to-peer D-Bus connection to QEMU's display.
#[derive(Debug)]
pub struct QemuDisplay {
    conn: Connection,
    /// Console object paths by head.
    heads: Vec<String>,
}

impl QemuDisplay {
    /// Connects through QMP and finds the consoles of the GPU's heads.
    pub fn connect(qmp: &mut Qmp) -> Result<Self, DisplayError> {
        let (ours, theirs) = UnixStream::pair().map_err(|e| DisplayError::Qmp(e.to_string()))?;
        qmp.execute_with_fd("getfd", json!({ "fdname": "pleiades-display" }), theirs.as_raw_fd())
            .map_err(|e| DisplayError::Qmp(e.to_string()))?;
        drop(theirs);
        qmp.execute("add_client", json!({ "protocol": "@dbus-display", "fdname": "pleiades-display" }))
            .map_err(|e| DisplayError::Qmp(e.to_string()))?;
        let conn = zbus::blocking::connection::Builder::async_io_unix_stream(ours).p2p().build()?;
        let ids: Vec<u32> = property(&conn, VM_PATH, VM_INTERFACE, "ConsoleIDs")?;
        let mut heads: Vec<(u32, String)> = Vec::new();
        for id in ids {
            let path = format!("/org/qemu/Display1/Console_{id}");
            let head: u32 = property(&conn, &path, CONSOLE_INTERFACE, "Head")?;
            heads.push((head, path));
        }
        heads.sort();
        Ok(Self { conn, heads: heads.into_iter().map(|(_, p)| p).collect() })
    }

    /// The number of heads QEMU has consoles for.
    pub fn heads(&self) -> usize {
        self.heads.len()
    }

    /// Gives every head its size (`sizes[i]`, left to right), or switches it off (a head
    /// beyond the list): QEMU raises the display-change event in the guest.
    pub fn set_layout(&self, sizes: &[(u32, u32)]) -> Result<(), DisplayError> {
        if sizes.len() > self.heads.len() {
            return Err(DisplayError::NoHead(sizes.len() - 1, self.heads.len()));
        }
        let mut x = 0i32;
        for (head, path) in self.heads.iter().enumerate() {
            let (w, h) = sizes.get(head).copied().unwrap_or((0, 0));
            let mm = |px: u32| (f64::from(px) * 25.4 / DPI).round() as u16;
            self.conn.call_method(
                None::<&str>,
                path.as_str(),
                Some(CONSOLE_INTERFACE),
                "SetUIInfo",
                &(mm(w), mm(h), x, 0i32, w, h),
            )?;
            x = x.saturating_add(i32::try_from(w).unwrap_or(i32::MAX));
        }
        Ok(())
    }
}
