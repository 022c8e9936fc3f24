//! Text and key combinations to Linux evdev key codes, US layout.
//!
//! The input script's `type` and `key` commands come through here; the table itself is
//! `pleiades_protocol::keys`, shared with the host's `ctl type`/`ctl key`.

pub use pleiades_protocol::keys::{
    KEY_ENTER, KEY_ESC, KEY_LEFTALT, KEY_LEFTCTRL, KEY_LEFTMETA, KEY_LEFTSHIFT, KEY_RIGHTALT, char_key,
    key_code,
};

/// The most keys one combination may hold down at once.
pub const MAX_COMBO_KEYS: usize = 8;

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
