//! Physical keys → Linux evdev key codes.
//!
//! The window sends the key's *position* (winit's [`PhysicalKey`], the USB HID usage), never the
//! character it types on the client's layout: the guest applies its own layout, so a French
//! client typing into a French guest gets French characters, whatever the client's keymap is.
//! On Linux, winit reports keys it has no [`KeyCode`] for as XKB key codes, which are evdev
//! codes + 8, so those pass through too.

use winit::keyboard::{KeyCode, NativeKeyCode, PhysicalKey};

/// The evdev code of a physical key, if it has one.
pub fn evdev_code(key: PhysicalKey) -> Option<u16> {
    match key {
        PhysicalKey::Code(code) => key_code(code),
        // XKB key codes are evdev codes offset by 8 (X11's minimum key code).
        PhysicalKey::Unidentified(NativeKeyCode::Xkb(xkb)) => {
            u16::try_from(xkb).ok().and_then(|c| c.checked_sub(8)).filter(|&c| c > 0)
        }
        PhysicalKey::Unidentified(_) => None,
    }
}

/// The digit a key types (the row above the letters or the keypad), for menus.
pub fn digit(code: KeyCode) -> Option<u8> {
    use KeyCode::*;
    [
        (Digit0, Numpad0),
        (Digit1, Numpad1),
        (Digit2, Numpad2),
        (Digit3, Numpad3),
        (Digit4, Numpad4),
        (Digit5, Numpad5),
        (Digit6, Numpad6),
        (Digit7, Numpad7),
        (Digit8, Numpad8),
        (Digit9, Numpad9),
    ]
    .iter()
    .position(|&(row, pad)| code == row || code == pad)
    .map(|d| d as u8)
}

/// The evdev code of a winit key code (linux/input-event-codes.h).
pub fn key_code(code: KeyCode) -> Option<u16> {
    use KeyCode::*;
    Some(match code {
        Escape => 1,
        Digit1 => 2,
        Digit2 => 3,
        Digit3 => 4,
        Digit4 => 5,
        Digit5 => 6,
        Digit6 => 7,
        Digit7 => 8,
        Digit8 => 9,
        Digit9 => 10,
        Digit0 => 11,
        Minus => 12,
        Equal => 13,
        Backspace => 14,
        Tab => 15,
        KeyQ => 16,
        KeyW => 17,
        KeyE => 18,
        KeyR => 19,
        KeyT => 20,
        KeyY => 21,
        KeyU => 22,
        KeyI => 23,
        KeyO => 24,
        KeyP => 25,
        BracketLeft => 26,
        BracketRight => 27,
        Enter => 28,
        ControlLeft => 29,
        KeyA => 30,
        KeyS => 31,
        KeyD => 32,
        KeyF => 33,
        KeyG => 34,
        KeyH => 35,
        KeyJ => 36,
        KeyK => 37,
        KeyL => 38,
        Semicolon => 39,
        Quote => 40,
        Backquote => 41,
        ShiftLeft => 42,
        Backslash => 43,
        KeyZ => 44,
        KeyX => 45,
        KeyC => 46,
        KeyV => 47,
        KeyB => 48,
        KeyN => 49,
        KeyM => 50,
        Comma => 51,
        Period => 52,
        Slash => 53,
        ShiftRight => 54,
        NumpadMultiply | NumpadStar => 55,
        AltLeft => 56,
        Space => 57,
        CapsLock => 58,
        F1 => 59,
        F2 => 60,
        F3 => 61,
        F4 => 62,
        F5 => 63,
        F6 => 64,
        F7 => 65,
        F8 => 66,
        F9 => 67,
        F10 => 68,
        NumLock => 69,
        ScrollLock => 70,
        Numpad7 => 71,
        Numpad8 => 72,
        Numpad9 => 73,
        NumpadSubtract => 74,
        Numpad4 => 75,
        Numpad5 => 76,
        Numpad6 => 77,
        NumpadAdd => 78,
        Numpad1 => 79,
        Numpad2 => 80,
        Numpad3 => 81,
        Numpad0 => 82,
        NumpadDecimal => 83,
        Lang5 => 85,
        IntlBackslash => 86,
        F11 => 87,
        F12 => 88,
        IntlRo => 89,
        Katakana => 90,
        Hiragana => 91,
        Convert => 92,
        KanaMode => 93,
        NonConvert => 94,
        NumpadEnter => 96,
        ControlRight => 97,
        NumpadDivide => 98,
        PrintScreen => 99,
        AltRight => 100,
        Home => 102,
        ArrowUp => 103,
        PageUp => 104,
        ArrowLeft => 105,
        ArrowRight => 106,
        End => 107,
        ArrowDown => 108,
        PageDown => 109,
        Insert => 110,
        Delete => 111,
        AudioVolumeMute => 113,
        AudioVolumeDown => 114,
        AudioVolumeUp => 115,
        Power => 116,
        NumpadEqual => 117,
        Pause => 119,
        NumpadComma => 121,
        Lang1 => 122,
        Lang2 => 123,
        IntlYen => 124,
        SuperLeft => 125,
        SuperRight => 126,
        ContextMenu => 127,
        Abort => 128,
        Again => 129,
        Props => 130,
        Undo => 131,
        Copy => 133,
        Open => 134,
        Paste => 135,
        Find => 136,
        Cut => 137,
        Help => 138,
        Sleep => 142,
        WakeUp => 143,
        LaunchMail => 155,
        BrowserFavorites => 156,
        BrowserBack => 158,
        BrowserForward => 159,
        Eject => 161,
        MediaTrackNext => 163,
        MediaPlayPause => 164,
        MediaTrackPrevious => 165,
        MediaStop => 166,
        BrowserHome => 172,
        BrowserRefresh => 173,
        NumpadParenLeft => 179,
        NumpadParenRight => 180,
        F13 => 183,
        F14 => 184,
        F15 => 185,
        F16 => 186,
        F17 => 187,
        F18 => 188,
        F19 => 189,
        F20 => 190,
        F21 => 191,
        F22 => 192,
        F23 => 193,
        F24 => 194,
        Suspend => 205,
        BrowserSearch => 217,
        MediaSelect => 226,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_map_by_position_and_xkb_codes_pass_through() {
        assert_eq!(key_code(KeyCode::KeyA), Some(30));
        assert_eq!(key_code(KeyCode::KeyQ), Some(16), "the key right of Tab, whatever it types");
        assert_eq!(key_code(KeyCode::Enter), Some(pleiades_protocol::keys::KEY_ENTER));
        assert_eq!(key_code(KeyCode::ControlLeft), Some(pleiades_protocol::keys::KEY_LEFTCTRL));
        assert_eq!(key_code(KeyCode::F12), Some(88));
        assert_eq!(key_code(KeyCode::AltRight), Some(pleiades_protocol::keys::KEY_RIGHTALT));
        assert_eq!(evdev_code(PhysicalKey::Unidentified(NativeKeyCode::Xkb(38))), Some(30));
        assert_eq!(evdev_code(PhysicalKey::Unidentified(NativeKeyCode::Xkb(8))), None);
        // Every code the US table types is reachable from a physical key.
        for c in ('a'..='z').chain('0'..='9').chain("-=[];'`\\,./ \t\n".chars()) {
            let (code, _) = pleiades_protocol::keys::char_key(c).unwrap();
            assert!(
                ALL.iter().any(|k| key_code(*k) == Some(code)),
                "no physical key for {c:?} (evdev {code})"
            );
        }
    }

    const ALL: &[KeyCode] = &[
        KeyCode::Backquote,
        KeyCode::Backslash,
        KeyCode::BracketLeft,
        KeyCode::BracketRight,
        KeyCode::Comma,
        KeyCode::Digit0,
        KeyCode::Digit1,
        KeyCode::Digit2,
        KeyCode::Digit3,
        KeyCode::Digit4,
        KeyCode::Digit5,
        KeyCode::Digit6,
        KeyCode::Digit7,
        KeyCode::Digit8,
        KeyCode::Digit9,
        KeyCode::Equal,
        KeyCode::KeyA,
        KeyCode::KeyB,
        KeyCode::KeyC,
        KeyCode::KeyD,
        KeyCode::KeyE,
        KeyCode::KeyF,
        KeyCode::KeyG,
        KeyCode::KeyH,
        KeyCode::KeyI,
        KeyCode::KeyJ,
        KeyCode::KeyK,
        KeyCode::KeyL,
        KeyCode::KeyM,
        KeyCode::KeyN,
        KeyCode::KeyO,
        KeyCode::KeyP,
        KeyCode::KeyQ,
        KeyCode::KeyR,
        KeyCode::KeyS,
        KeyCode::KeyT,
        KeyCode::KeyU,
        KeyCode::KeyV,
        KeyCode::KeyW,
        KeyCode::KeyX,
        KeyCode::KeyY,
        KeyCode::KeyZ,
        KeyCode::Minus,
        KeyCode::Period,
        KeyCode::Quote,
        KeyCode::Semicolon,
        KeyCode::Slash,
        KeyCode::Space,
        KeyCode::Tab,
        KeyCode::Enter,
    ];
}
