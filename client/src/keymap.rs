//! Text and key combinations to Linux evdev key codes, US layout.
//!
//! The input script's `type` and `key` commands come through here. The table follows the
//! host's keymap (host/src/devices/virtio/input/keymap.rs) but is its own copy: the client
//! must not depend on the host crate, and the wire carries evdev codes, so both sides only have
//! to agree on the Linux numbers, which never change.

pub const KEY_ESC: u16 = 1;
pub const KEY_ENTER: u16 = 28;
pub const KEY_LEFTCTRL: u16 = 29;
pub const KEY_LEFTSHIFT: u16 = 42;
pub const KEY_LEFTALT: u16 = 56;
pub const KEY_RIGHTALT: u16 = 100;
pub const KEY_LEFTMETA: u16 = 125;

/// The most keys one combination may hold down at once.
pub const MAX_COMBO_KEYS: usize = 8;

/// The key that types `c` on a US layout, and whether shift is held for it. Printable ASCII,
/// newline (Enter) and tab.
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

/// One key transition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyStroke {
    pub code: u16,
    pub down: bool,
}

/// The transitions that type `text`: each character pressed and released, with shift held
/// around it where the US layout needs it. `None` names the first character that cannot be
/// typed.
pub fn text_strokes(text: &str) -> Result<Vec<KeyStroke>, char> {
    let mut strokes = Vec::with_capacity(text.len() * 2);
    for c in text.chars() {
        let (code, shift) = char_key(c).ok_or(c)?;
        if shift {
            strokes.push(KeyStroke { code: KEY_LEFTSHIFT, down: true });
        }
        strokes.push(KeyStroke { code, down: true });
        strokes.push(KeyStroke { code, down: false });
        if shift {
            strokes.push(KeyStroke { code: KEY_LEFTSHIFT, down: false });
        }
    }
    Ok(strokes)
}

/// The key codes of a combination like `ctrl+alt+f2`, in press order (released in reverse).
pub fn combo_codes(combo: &str) -> Result<Vec<u16>, String> {
    let names: Vec<&str> = combo.split('+').map(str::trim).collect();
    if names.is_empty() || names.len() > MAX_COMBO_KEYS || names.iter().any(|n| n.is_empty()) {
        return Err(format!(
            "a key combination needs 1 to {MAX_COMBO_KEYS} keys joined by `+`, e.g. ctrl+alt+f2"
        ));
    }
    names
        .iter()
        .map(|name| {
            key_code(name).ok_or_else(|| {
                format!("unknown key {name:?}; use e.g. ctrl, shift, alt, meta, a-z, 0-9, f1-f12, enter, esc, tab, space, backspace, delete, up, down, left, right, home, end, pageup, pagedown")
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_uses_shift_where_the_layout_needs_it() {
        let strokes = text_strokes("aA\n").unwrap();
        let codes: Vec<(u16, bool)> = strokes.iter().map(|s| (s.code, s.down)).collect();
        assert_eq!(
            codes,
            [
                (30, true),
                (30, false),
                (42, true),
                (30, true),
                (30, false),
                (42, false),
                (28, true),
                (28, false)
            ]
        );
        assert_eq!(text_strokes("é"), Err('é'));
    }

    #[test]
    fn combos_resolve_names() {
        assert_eq!(combo_codes("ctrl+alt+f2").unwrap(), [29, 56, 60]);
        assert_eq!(combo_codes("F12").unwrap(), [88]);
        assert!(combo_codes("ctrl+").is_err());
        assert!(combo_codes("hyper").is_err());
        assert!(combo_codes("a+b+c+d+e+f+g+h+i").is_err());
    }
}
