//! The window's USB menu (Ctrl+Alt+U): this machine's USB devices and the emulated ones, where
//! each is (here or in the desktop), and a number to move it. A device taken back returns to
//! this machine's own drivers; one chosen is opened and redirected into the live session.
//!
//! ```text
//! USB devices: press a number to move one, Esc to close
//! 1  in the desktop   QEMU USB HARDDRIVE (46f4:0001)
//! 2  here             Logitech USB Receiver (046d:c52b)
//! 3  refused          Smart card reader (0b97:7762): the desktop's pool does not allow it
//! ```
//!
//! The menu is a list rebuilt on demand (opening it, a choice, once a second while open), kept
//! apart from winit so that it can be tested without a window.

use std::sync::{Arc, Mutex};

use crate::usb::UsbDevice;
use crate::usb::libusb::{self, LibusbDevice};
use crate::usb::redirect::{Parked, RedirectControls, UsbDevices};

/// What choosing a row does.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Action {
    /// Take redirected device `id` back.
    GiveBack(u32),
    /// Open this machine's device at `bus`/`address` and redirect it.
    Open { bus: u8, address: u8 },
    /// Redirect the parked device at this index.
    Unpark(usize),
    /// Nothing to do (a refused device, shown for information).
    None,
}

#[derive(Debug, Clone)]
struct Row {
    line: String,
    action: Action,
}

/// The menu's view of the devices.
#[derive(Debug, Clone)]
pub struct UsbMenu {
    parked: Parked,
    live: Arc<Mutex<Option<RedirectControls>>>,
    rows: Arc<Mutex<Vec<Row>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl UsbMenu {
    pub fn new(devices: &UsbDevices) -> Self {
        Self { parked: devices.parked.clone(), live: devices.live.clone(), rows: Arc::default() }
    }

    /// Rebuilds the list; the lines to show.
    pub fn refresh(&self) -> Vec<String> {
        let live = lock(&self.live).clone();
        let reports = live.as_ref().map(RedirectControls::reports).unwrap_or_default();
        let mut rows = Vec::new();
        let mut busy_locations = Vec::new();
        for report in &reports {
            let label = format!("{} ({})", report.name, report.usb_id);
            let (state, action) = match report.state {
                "announced" => ("going in", Action::GiveBack(report.id)),
                "attached" => ("in the desktop", Action::GiveBack(report.id)),
                "refused" => ("refused", Action::None),
                _ => continue,
            };
            if let Some(location) = &report.location {
                busy_locations.push(location.clone());
            }
            let why = match (report.state, &report.reason) {
                ("refused", Some(reason)) => format!(": {reason}"),
                _ => String::new(),
            };
            rows.push(Row { line: format!("{state:<15} {label}{why}"), action });
        }
        for (index, device) in lock(&self.parked).iter().enumerate() {
            let info = device.info();
            rows.push(Row {
                line: format!(
                    "{:<15} {} ({:04x}:{:04x})",
                    "here", info.product, info.vendor_id, info.product_id
                ),
                action: Action::Unpark(index),
            });
        }
        // This machine's devices that are not in the desktop.
        for present in libusb::list().unwrap_or_default() {
            if busy_locations.contains(&format!("{:03}/{:03}", present.bus, present.address)) {
                continue;
            }
            rows.push(Row {
                line: format!("{:<15} {}", "here", present.info.product),
                action: Action::Open { bus: present.bus, address: present.address },
            });
        }
        let mut lines = vec!["USB devices: press a number to move one, Esc to close".to_owned()];
        if rows.is_empty() {
            lines.push("(none: plug one in, or start with --usb-emulated-disk FILE)".into());
        }
        if live.is_none() {
            lines.push("(not connected: devices move once the desktop is back)".into());
        }
        lines.extend(rows.iter().take(9).enumerate().map(|(i, row)| format!("{}  {}", i + 1, row.line)));
        *lock(&self.rows) = rows;
        lines
    }

    /// Row `number` (1–9) chosen: what happened, in words. When the list changed since it
    /// was shown (a device came, went or moved), nothing is done: the person looks again.
    pub fn choose(&self, number: usize) -> String {
        let Some(row) = number.checked_sub(1).and_then(|i| lock(&self.rows).get(i).cloned()) else {
            return format!("no device {number}");
        };
        self.refresh();
        let now = lock(&self.rows).get(number - 1).cloned();
        if now.as_ref().is_none_or(|now| now.line != row.line || now.action != row.action) {
            return "the list changed: look again".into();
        }
        let Some(live) = lock(&self.live).clone() else {
            return "not connected: try again once the desktop is back".into();
        };
        match row.action {
            Action::GiveBack(id) => {
                live.give_back(id);
                "taking it back from the desktop".into()
            }
            Action::Unpark(index) => {
                let device = {
                    let mut parked = lock(&self.parked);
                    (index < parked.len()).then(|| parked.remove(index))
                };
                match device {
                    Some(device) => {
                        live.add(device);
                        "redirecting it into the desktop".into()
                    }
                    None => "it is not there any more".into(),
                }
            }
            Action::Open { bus, address } => match LibusbDevice::open(bus, address) {
                Ok(device) => {
                    live.add(Box::new(device) as Box<dyn UsbDevice>);
                    "redirecting it into the desktop".into()
                }
                Err(e) => format!("cannot redirect it: {e}"),
            },
            Action::None => "the desktop's pool does not take this device".into(),
        }
    }
}
