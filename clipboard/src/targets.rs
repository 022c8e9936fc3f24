//! The atoms this crate speaks, and how a [`Format`] maps to selection targets and back.

use x11rb::protocol::xproto::Atom;
#[cfg(test)]
use x11rb::protocol::xproto::AtomEnum;

use crate::Format;

x11rb::atom_manager! {
    /// Every atom the clipboard thread uses, interned once at connect.
    pub(crate) Atoms: AtomsCookie {
        CLIPBOARD,
        TARGETS,
        TIMESTAMP,
        MULTIPLE,
        INCR,
        UTF8_STRING,
        TEXT,
        TEXT_PLAIN_UTF8: b"text/plain;charset=utf-8",
        TEXT_PLAIN: b"text/plain",
        TEXT_HTML: b"text/html",
        IMAGE_PNG: b"image/png",
        // Our own window's properties: the timestamp trick and the conversions' landing places.
        TIME_PROBE: b"_PLEIADES_CLIPBOARD_TIME",
        LANDING0: b"_PLEIADES_CLIPBOARD_0",
        LANDING1: b"_PLEIADES_CLIPBOARD_1",
        LANDING2: b"_PLEIADES_CLIPBOARD_2",
        LANDING3: b"_PLEIADES_CLIPBOARD_3",
    }
}

// The core protocol's predefined atoms (`AtomEnum`'s conversion is not `const`).
pub(crate) const ATOM: Atom = 4;
pub(crate) const INTEGER: Atom = 19;
pub(crate) const STRING: Atom = 31;

impl Atoms {
    /// The properties on our window that conversions land in, used in turn (see `fetch`).
    pub(crate) fn landings(&self) -> [Atom; 4] {
        [self.LANDING0, self.LANDING1, self.LANDING2, self.LANDING3]
    }

    /// The targets we serve `format` under, most specific first (this order is also what
    /// TARGETS lists).
    pub(crate) fn served_targets(&self, format: Format) -> Vec<Atom> {
        match format {
            Format::Text => vec![self.UTF8_STRING, self.TEXT_PLAIN_UTF8, self.TEXT_PLAIN, STRING, self.TEXT],
            Format::Html => vec![self.TEXT_HTML],
            Format::Png => vec![self.IMAGE_PNG],
        }
    }

    /// The format a requestor asks for with `target`, if we serve it.
    pub(crate) fn served_format(&self, target: Atom) -> Option<Format> {
        Format::ALL.into_iter().find(|f| self.served_targets(*f).contains(&target))
    }

    /// The targets we ask a local owner for when we fetch `format`, in order of preference.
    pub(crate) fn fetch_targets(&self, format: Format) -> Vec<Atom> {
        match format {
            Format::Text => vec![self.UTF8_STRING, self.TEXT_PLAIN_UTF8, STRING],
            Format::Html => vec![self.TEXT_HTML],
            Format::Png => vec![self.IMAGE_PNG],
        }
    }

    /// The format a local owner's TARGETS entry stands for. `text/plain` without a charset is
    /// not taken as text: its encoding is the owner's locale, which we cannot know.
    pub(crate) fn offered_format(&self, target: Atom) -> Option<Format> {
        if [self.UTF8_STRING, self.TEXT_PLAIN_UTF8, STRING, self.TEXT].contains(&target) {
            Some(Format::Text)
        } else if target == self.TEXT_HTML {
            Some(Format::Html)
        } else if target == self.IMAGE_PNG {
            Some(Format::Png)
        } else {
            None
        }
    }
}

/// UTF-8 text as ISO 8859-1, what ICCCM's `STRING` is: characters outside Latin-1 become `?`.
pub(crate) fn to_latin1(utf8: &[u8]) -> Vec<u8> {
    String::from_utf8_lossy(utf8).chars().map(|c| u8::try_from(u32::from(c)).unwrap_or(b'?')).collect()
}

/// A `STRING` property as UTF-8. ICCCM says Latin-1, but many owners put UTF-8 there: bytes
/// that already are valid UTF-8 are taken as UTF-8 (Latin-1 text that happens to be valid
/// UTF-8 needs sequences like "Ã©", which real text does not have).
pub(crate) fn from_string_property(bytes: Vec<u8>) -> Vec<u8> {
    match String::from_utf8(bytes) {
        Ok(s) => s.into_bytes(),
        Err(e) => e.into_bytes().iter().map(|b| char::from(*b)).collect::<String>().into_bytes(),
    }
}

/// HTML as UTF-8: some browsers offer `text/html` as UTF-16 with a byte order mark.
pub(crate) fn html_to_utf8(bytes: Vec<u8>) -> Vec<u8> {
    let utf16 = |le: bool| {
        let units = bytes[2..].chunks_exact(2).map(|p| {
            let pair = [p[0], p[1]];
            if le { u16::from_le_bytes(pair) } else { u16::from_be_bytes(pair) }
        });
        char::decode_utf16(units).map(|c| c.unwrap_or(char::REPLACEMENT_CHARACTER)).collect::<String>()
    };
    match bytes.get(..2) {
        Some([0xff, 0xfe]) => utf16(true).into_bytes(),
        Some([0xfe, 0xff]) => utf16(false).into_bytes(),
        _ => String::from_utf8_lossy(&bytes).into_owned().into_bytes(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn predefined_atoms_are_the_protocols() {
        assert_eq!(ATOM, u32::from(AtomEnum::ATOM));
        assert_eq!(INTEGER, u32::from(AtomEnum::INTEGER));
        assert_eq!(STRING, u32::from(AtomEnum::STRING));
    }

    #[test]
    fn latin1_both_ways() {
        assert_eq!(to_latin1("héllo ✓".as_bytes()), b"h\xe9llo ?");
        assert_eq!(from_string_property(b"h\xe9llo".to_vec()), "héllo".as_bytes());
        assert_eq!(from_string_property("héllo".as_bytes().to_vec()), "héllo".as_bytes());
    }

    #[test]
    fn html_in_utf16_becomes_utf8() {
        let le: Vec<u8> =
            [0xff, 0xfe].into_iter().chain("<b>é</b>".encode_utf16().flat_map(u16::to_le_bytes)).collect();
        assert_eq!(html_to_utf8(le), "<b>é</b>".as_bytes());
        let be: Vec<u8> =
            [0xfe, 0xff].into_iter().chain("<i>".encode_utf16().flat_map(u16::to_be_bytes)).collect();
        assert_eq!(html_to_utf8(be), b"<i>");
        assert_eq!(html_to_utf8(b"<p>x</p>".to_vec()), b"<p>x</p>");
    }
}
