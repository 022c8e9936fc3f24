//! Text and key combinations to keyboard events (evdev key codes, US layout).
//!
//! `type TEXT` and `key COMBO` of the control socket come through here: one table of which key
//! (and whether shift) makes each character, and one of key names for combinations.

use super::event::*;

/// The most characters one `type` request may have (each becomes up to 8 events).
pub const MAX_TYPED_CHARS: usize = 1024;
/// The most keys one combination may hold down at once.
pub const MAX_COMBO_KEYS: usize = 8;

/// Why text or a combination cannot be typed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeymapError {
    #[error("{0:?} cannot be typed on a US keyboard (printable ASCII, newline and tab only)")]
    Untypable(char),
    #[error("the text is longer than {MAX_TYPED_CHARS} characters")]
    TooLong,
    #[error(
        "unknown key {0:?}; use e.g. ctrl, shift, alt, altgr, meta, a-z, 0-9, f1-f12, enter, esc, tab, space, backspace, delete, up, down, left, right, home, end, pageup, pagedown"
    )]
    UnknownKey(String),
    #[error("a key combination needs 1 to {MAX_COMBO_KEYS} keys joined by `+`, e.g. ctrl+alt+f2")]
    BadCombo,
}

pub use pleiades_protocol::keys::{char_key, key_code};

fn press(events: &mut Vec<InputEvent>, code: u16, down: bool) {
    events.push(InputEvent::key(code, down));
    events.push(InputEvent::syn());
}

/// The events that type `text`: each character pressed and released (with shift around it
/// where the US layout needs it), each step its own report.
pub fn text_events(text: &str) -> Result<Vec<InputEvent>, KeymapError> {
    if text.chars().count() > MAX_TYPED_CHARS {
        return Err(KeymapError::TooLong);
    }
    let mut events = Vec::new();
    for c in text.chars() {
        let (code, shift) = char_key(c).ok_or(KeymapError::Untypable(c))?;
        if shift {
            press(&mut events, KEY_LEFTSHIFT, true);
        }
        press(&mut events, code, true);
        press(&mut events, code, false);
        if shift {
            press(&mut events, KEY_LEFTSHIFT, false);
        }
    }
    Ok(events)
}

/// The events of a key combination such as `ctrl+alt+f2`: keys pressed in order, released in
/// reverse order.
pub fn combo_events(combo: &str) -> Result<Vec<InputEvent>, KeymapError> {
    let names: Vec<&str> = combo.split('+').map(str::trim).collect();
    if names.is_empty() || names.len() > MAX_COMBO_KEYS || names.iter().any(|n| n.is_empty()) {
        return Err(KeymapError::BadCombo);
    }
    let codes = names
        .iter()
        .map(|n| key_code(n).ok_or_else(|| KeymapError::UnknownKey((*n).to_owned())))
        .collect::<Result<Vec<_>, _>>()?;
    let mut events = Vec::new();
    for code in &codes {
        press(&mut events, *code, true);
    }
    for code in codes.iter().rev() {
        press(&mut events, *code, false);
    }
    Ok(events)
}

/// Turns the escapes a shell user types (`\n`, `\t`, `\\`) into the characters; any other
/// backslash stays as it is.
pub fn unescape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.peek() {
            Some('n') => out.push('\n'),
            Some('t') => out.push('\t'),
            Some('\\') => out.push('\\'),
            _ => {
                out.push('\\');
                continue;
            }
        }
        chars.next();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn keys(events: &[InputEvent]) -> Vec<(u16, u32)> {
        events.iter().filter(|e| e.kind == EV_KEY).map(|e| (e.code, e.value)).collect()
    }

    #[test]
    fn typing_uses_shift_for_capitals_and_symbols() {
        assert_eq!(keys(&text_events("a").unwrap()), [(30, 1), (30, 0)]);
        assert_eq!(keys(&text_events("A").unwrap()), [(42, 1), (30, 1), (30, 0), (42, 0)]);
        assert_eq!(keys(&text_events(">").unwrap()), [(42, 1), (52, 1), (52, 0), (42, 0)]);
        assert_eq!(keys(&text_events("\n").unwrap()), [(28, 1), (28, 0)]);
        let events = text_events("echo HI > /dev/ttyS0\n").unwrap();
        // Every key event is its own report.
        assert!(events.chunks(2).all(|pair| pair[0].kind == EV_KEY && pair[1].is_syn_report()));
        assert_eq!(text_events("é"), Err(KeymapError::Untypable('é')));
        assert_eq!(text_events(&"x".repeat(MAX_TYPED_CHARS + 1)), Err(KeymapError::TooLong));
    }

    #[test]
    fn the_table_matches_input_event_codes_h() {
        // Spot checks against linux/input-event-codes.h.
        for (c, code) in
            [('q', 16), ('p', 25), ('a', 30), ('l', 38), ('z', 44), ('m', 50), ('1', 2), ('0', 11)]
        {
            assert_eq!(char_key(c), Some((code, false)), "{c}");
        }
        for (name, code) in [("esc", 1), ("f1", 59), ("f10", 68), ("f11", 87), ("f12", 88), ("delete", 111)] {
            assert_eq!(key_code(name), Some(code), "{name}");
        }
        // Every printable ASCII character can be typed, with distinct (key, shift) pairs.
        let mut seen = std::collections::HashSet::new();
        for c in ' '..='~' {
            let key = char_key(c).unwrap_or_else(|| panic!("{c:?}"));
            assert!(key.0 >= 1 && key.0 <= KEY_MAX_KEYBOARD);
            assert!(seen.insert(key), "{c:?} shares {key:?}");
        }
    }

    #[test]
    fn combos_press_in_order_and_release_in_reverse() {
        assert_eq!(
            keys(&combo_events("ctrl+alt+f2").unwrap()),
            [(29, 1), (56, 1), (60, 1), (60, 0), (56, 0), (29, 0)]
        );
        assert_eq!(keys(&combo_events("Ctrl + C").unwrap()), [(29, 1), (46, 1), (46, 0), (29, 0)]);
        assert_eq!(combo_events("ctrl+"), Err(KeymapError::BadCombo));
        assert_eq!(combo_events(""), Err(KeymapError::BadCombo));
        assert_eq!(combo_events("ctrl+hyper"), Err(KeymapError::UnknownKey("hyper".into())));
        assert_eq!(combo_events("f13"), Err(KeymapError::UnknownKey("f13".into())));
        assert_eq!(combo_events(&["a"; MAX_COMBO_KEYS + 1].join("+")), Err(KeymapError::BadCombo));
    }

    #[test]
    fn escapes() {
        assert_eq!(unescape(r"echo x\n"), "echo x\n");
        assert_eq!(unescape(r"a\tb\\n\q\"), "a\tb\\n\\q\\");
    }

    proptest! {
        /// Typed text presses and releases every key it touches, leaving nothing held.
        #[test]
        fn typing_leaves_no_key_down(text in "[ -~\n\t]{0,64}") {
            let events = text_events(&text).unwrap();
            let mut down = std::collections::HashSet::new();
            for e in events.iter().filter(|e| e.kind == EV_KEY) {
                if e.value == 1 { prop_assert!(down.insert(e.code)); } else { prop_assert!(down.remove(&e.code)); }
            }
            prop_assert!(down.is_empty());
            prop_assert_eq!(events.last().is_none_or(|e| e.is_syn_report()), true);
        }
    }
}
