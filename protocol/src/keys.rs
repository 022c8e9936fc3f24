//! Linux evdev key codes for a US keyboard layout: which key types a character, and the codes
//! of key names in combinations (`ctrl+alt+f2`).
//!
//! The input channel carries evdev codes (docs/protocol.md), so the client's input scripts and
//! the host's `ctl type`/`ctl key` both come through this one table.

pub const KEY_ESC: u16 = 1;
pub const KEY_ENTER: u16 = 28;
pub const KEY_LEFTCTRL: u16 = 29;
pub const KEY_LEFTSHIFT: u16 = 42;
pub const KEY_LEFTALT: u16 = 56;
pub const KEY_RIGHTALT: u16 = 100;
pub const KEY_LEFTMETA: u16 = 125;

/// The key that types `c` on a US layout, and whether shift is held for it.
pub fn char_key(c: char) -> Option<(u16, bool)> {
    const LETTERS: &[u16; 26] = &[
        30, 48, 46, 32, 18, 33, 34, 35, 23, 36, 37, 38, 50, 49, 24, 25, 16, 19, 31, 20, 22, 47, 17, 45, 21,
        44,
    ];
    Some(match c {
        'a'..='z' => (LETTERS[(c as u8 - b'a') as usize], false),
        'A'..='Z' => (LETTERS[(c as u8 - b'A') as usize], true),
        '1'..='9' => (u16::from(c as u8 - b'1') + 2, false),
        '0' => (11, false),
        '!' => (2, true),
        '@' => (3, true),
        '#' => (4, true),
        '$' => (5, true),
        '%' => (6, true),
        '^' => (7, true),
        '&' => (8, true),
        '*' => (9, true),
        '(' => (10, true),
        ')' => (11, true),
        '-' => (12, false),
        '_' => (12, true),
        '=' => (13, false),
        '+' => (13, true),
        '\t' => (15, false),
        '[' => (26, false),
        '{' => (26, true),
        ']' => (27, false),
        '}' => (27, true),
        '\n' => (KEY_ENTER, false),
        ';' => (39, false),
        ':' => (39, true),
        '\'' => (40, false),
        '"' => (40, true),
        '`' => (41, false),
        '~' => (41, true),
        '\\' => (43, false),
        '|' => (43, true),
        ',' => (51, false),
        '<' => (51, true),
        '.' => (52, false),
        '>' => (52, true),
        '/' => (53, false),
        '?' => (53, true),
        ' ' => (57, false),
        _ => return None,
    })
}

/// The key code of a key name (case-insensitive): modifiers, named keys, f1-f12, or a single
/// character's key (`a`, `1`, `/`).
pub fn key_code(name: &str) -> Option<u16> {
    let lower = name.to_ascii_lowercase();
    let code = match lower.as_str() {
        "ctrl" | "control" | "lctrl" => KEY_LEFTCTRL,
        "rctrl" => 97,
        "shift" | "lshift" => KEY_LEFTSHIFT,
        "rshift" => 54,
        "alt" | "lalt" => KEY_LEFTALT,
        "altgr" | "ralt" => KEY_RIGHTALT,
        "meta" | "super" | "win" | "lmeta" => KEY_LEFTMETA,
        "rmeta" => 126,
        "esc" | "escape" => KEY_ESC,
        "backspace" => 14,
        "tab" => 15,
        "enter" | "return" => KEY_ENTER,
        "space" => 57,
        "capslock" => 58,
        "numlock" => 69,
        "scrolllock" => 70,
        "sysrq" | "print" => 99,
        "home" => 102,
        "up" => 103,
        "pageup" => 104,
        "left" => 105,
        "right" => 106,
        "end" => 107,
        "down" => 108,
        "pagedown" => 109,
        "insert" => 110,
        "delete" | "del" => 111,
        "pause" => 119,
        "menu" | "compose" => 127,
        "plus" => 13,
        "minus" => 12,
        "f11" => 87,
        "f12" => 88,
        f if f.len() >= 2 && f.starts_with('f') => match f[1..].parse::<u16>() {
            Ok(n @ 1..=10) => 58 + n,
            _ => return None,
        },
        _ => {
            let mut chars = lower.chars();
            let (Some(c), None) = (chars.next(), chars.next()) else { return None };
            return char_key(c).map(|(code, _)| code);
        }
    };
    Some(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn characters_and_names_map_to_us_layout_keys() {
        assert_eq!(char_key('a'), Some((30, false)));
        assert_eq!(char_key('A'), Some((30, true)));
        assert_eq!(char_key('\n'), Some((KEY_ENTER, false)));
        assert_eq!(char_key('é'), None);
        assert_eq!(key_code("Ctrl"), Some(KEY_LEFTCTRL));
        assert_eq!(key_code("f2"), Some(60));
        assert_eq!(key_code("f12"), Some(88));
        assert_eq!(key_code("f13"), None);
        assert_eq!(key_code("/"), Some(53));
        assert_eq!(key_code("nope"), None);
    }
}
