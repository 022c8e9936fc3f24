//! Clean shutdown on the ACPI power button.
//!
//! The host asks a guest to power off by pressing the virtual ACPI power button (QEMU's
//! `system_powerdown`, `pleiades-host ctl shutdown`). The kernel's `button` driver turns the
//! press into a `KEY_POWER` input event on the "Power Button" input device; nothing acts on
//! it unless userspace does, so the agent watches for it and runs `poweroff`.

use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};

/// `EV_KEY` from linux/input-event-codes.h.
const EV_KEY: u16 = 0x01;
/// `KEY_POWER` from linux/input-event-codes.h.
const KEY_POWER: u16 = 116;
/// `struct input_event` on 64-bit Linux: a 16-byte timeval, u16 type, u16 code, i32 value.
const EVENT_SIZE: usize = 24;

/// The event devices (`/dev/input/eventN`) whose name says they are a power button.
pub fn power_button_devices(root: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(root.join("sys/class/input")) else { return Vec::new() };
    let mut found: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("event"))
        .filter(|name| {
            fs::read_to_string(root.join("sys/class/input").join(name).join("device/name"))
                .is_ok_and(|n| n.trim() == "Power Button")
        })
        .map(|name| root.join("dev/input").join(name))
        .collect();
    found.sort();
    found
}

/// Whether one raw input event is a power-button press.
pub fn is_power_press(event: &[u8; EVENT_SIZE]) -> bool {
    let kind = u16::from_ne_bytes([event[16], event[17]]);
    let code = u16::from_ne_bytes([event[18], event[19]]);
    let value = i32::from_ne_bytes([event[20], event[21], event[22], event[23]]);
    kind == EV_KEY && code == KEY_POWER && value == 1
}

/// Blocks until the power button on `device` is pressed.
pub fn wait_for_press(device: &Path) -> io::Result<()> {
    let mut file = File::open(device)?;
    let mut event = [0u8; EVENT_SIZE];
    loop {
        file.read_exact(&mut event)?;
        if is_power_press(&event) {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: u16, code: u16, value: i32) -> [u8; EVENT_SIZE] {
        let mut e = [0u8; EVENT_SIZE];
        e[16..18].copy_from_slice(&kind.to_ne_bytes());
        e[18..20].copy_from_slice(&code.to_ne_bytes());
        e[20..24].copy_from_slice(&value.to_ne_bytes());
        e
    }

    #[test]
    fn recognises_only_a_power_press() {
        assert!(is_power_press(&event(EV_KEY, KEY_POWER, 1)));
        assert!(!is_power_press(&event(EV_KEY, KEY_POWER, 0)), "release");
        assert!(!is_power_press(&event(EV_KEY, 30, 1)), "KEY_A");
        assert!(!is_power_press(&event(0, 0, 0)), "SYN");
    }

    #[test]
    fn finds_the_power_button_and_reads_its_press() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for (n, name) in [(0, "AT Translated Set 2 keyboard"), (3, "Power Button")] {
            let d = root.join(format!("sys/class/input/event{n}/device"));
            fs::create_dir_all(&d).unwrap();
            fs::write(d.join("name"), format!("{name}\n")).unwrap();
        }
        let devices = power_button_devices(root);
        assert_eq!(devices, [root.join("dev/input/event3")]);
        // A stream of events: a key release, then the press.
        fs::create_dir_all(root.join("dev/input")).unwrap();
        let mut stream = event(EV_KEY, KEY_POWER, 0).to_vec();
        stream.extend(event(EV_KEY, KEY_POWER, 1));
        fs::write(&devices[0], stream).unwrap();
        wait_for_press(&devices[0]).unwrap();
        // A stream without a press ends in an error (end of file), not a hang.
        fs::write(&devices[0], event(EV_KEY, 30, 1)).unwrap();
        assert!(wait_for_press(&devices[0]).is_err());
    }
}
