//! Reading a guest's input events back: the shell snippets that find a virtio-input device's
//! evdev node, and the events in `od -An -v -tx1` output of its 24-byte `input_event`s.

/// A guest shell snippet that prints the evdev node name (`event3`) of the input device called
/// `name` ("Pleiades Tablet", "Pleiades Mouse", "Pleiades Keyboard").
pub fn node_of(name: &str) -> String {
    format!(
        "$(for d in /sys/class/input/event*; do grep -q '{name}' $d/device/name && echo ${{d##*/}}; done)"
    )
}

/// The events (type, code, value) of `od -An -v -tx1` output of 64-bit `input_event`s.
pub fn events_from_od(od: &[String]) -> Vec<(u16, u16, i32)> {
    let bytes: Vec<u8> =
        od.iter().flat_map(|l| l.split_whitespace()).filter_map(|b| u8::from_str_radix(b, 16).ok()).collect();
    bytes
        .chunks_exact(24)
        .map(|e| {
            (
                u16::from_le_bytes([e[16], e[17]]),
                u16::from_le_bytes([e[18], e[19]]),
                i32::from_le_bytes([e[20], e[21], e[22], e[23]]),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn events_come_from_the_last_eight_bytes_of_each_record() {
        // One EV_KEY BTN_LEFT press: timestamps (16 bytes), type 1, code 0x110, value 1.
        let record = "00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 01 00 10 01 01 00 00 00";
        assert_eq!(super::events_from_od(&[record.to_owned()]), [(1, 0x110, 1)]);
        assert!(super::node_of("Pleiades Tablet").contains("'Pleiades Tablet'"));
    }
}
