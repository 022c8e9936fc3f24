//! The result line: `PLEIADES-TESTGUEST {json}` on COM1, written straight to the port with
//! JSON escaping; error texts kept in fixed buffers (no allocator).

use core::fmt::{self, Write};
use core::sync::atomic::{AtomicBool, Ordering};

use crate::serial::Serial;

pub const MARKER: &str = "PLEIADES-TESTGUEST";

/// A string in a fixed buffer; writes past the end are cut at a character boundary.
#[derive(Debug, Clone, Copy)]
pub struct FixedStr<const N: usize> {
    buf: [u8; N],
    len: usize,
}

impl<const N: usize> FixedStr<N> {
    pub const fn new() -> Self {
        Self { buf: [0; N], len: 0 }
    }

    pub fn as_str(&self) -> &str {
        // Only whole characters are ever copied in.
        core::str::from_utf8(&self.buf[..self.len]).unwrap_or("")
    }
}

impl<const N: usize> Default for FixedStr<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> Write for FixedStr<N> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for c in s.chars() {
            let mut utf8 = [0; 4];
            let bytes = c.encode_utf8(&mut utf8).as_bytes();
            if self.len + bytes.len() > N {
                return Ok(());
            }
            self.buf[self.len..self.len + bytes.len()].copy_from_slice(bytes);
            self.len += bytes.len();
        }
        Ok(())
    }
}

/// Writes through `W`, escaping for the inside of a JSON string.
struct Escape<W>(W);

impl<W: Write> Write for Escape<W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for c in s.chars() {
            match c {
                '"' => self.0.write_str("\\\"")?,
                '\\' => self.0.write_str("\\\\")?,
                '\n' => self.0.write_str("\\n")?,
                c if (c as u32) < 0x20 || c as u32 == 0x7F => write!(self.0, "\\u{:04x}", c as u32)?,
                c => self.0.write_char(c)?,
            }
        }
        Ok(())
    }
}

/// `value` as a quoted JSON string.
#[derive(Debug, Clone, Copy)]
pub struct JsonStr<'a>(pub &'a str);

impl fmt::Display for JsonStr<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_char('"')?;
        Escape(&mut *f).write_str(self.0)?;
        f.write_char('"')
    }
}

/// Formatted text as a quoted JSON string.
#[derive(Debug, Clone, Copy)]
pub struct JsonArgs<'a>(pub fmt::Arguments<'a>);

impl fmt::Display for JsonArgs<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_char('"')?;
        Escape(&mut *f).write_fmt(self.0)?;
        f.write_char('"')
    }
}

const MAX_ERRORS: usize = 24;
pub type ErrorText = FixedStr<160>;

/// The failures found, in order. Past [`MAX_ERRORS`] they are counted, not kept.
#[derive(Debug)]
pub struct Errors {
    items: [ErrorText; MAX_ERRORS],
    len: usize,
    dropped: u32,
}

impl Errors {
    pub const fn new() -> Self {
        Self { items: [FixedStr::new(); MAX_ERRORS], len: 0, dropped: 0 }
    }

    pub fn push(&mut self, args: fmt::Arguments<'_>) {
        crate::serial::log!("error: {args}");
        if self.len == MAX_ERRORS {
            self.dropped += 1;
            return;
        }
        let mut text = ErrorText::new();
        let _ = text.write_fmt(args);
        self.items[self.len] = text;
        self.len += 1;
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0 && self.dropped == 0
    }

    /// The JSON array.
    pub fn write_json(&self, out: &mut impl Write) -> fmt::Result {
        out.write_char('[')?;
        for (i, e) in self.items[..self.len].iter().enumerate() {
            if i > 0 {
                out.write_char(',')?;
            }
            write!(out, "{}", JsonStr(e.as_str()))?;
        }
        if self.dropped > 0 {
            if self.len > 0 {
                out.write_char(',')?;
            }
            write!(out, "\"{} more errors\"", self.dropped)?;
        }
        out.write_char(']')
    }
}

impl Default for Errors {
    fn default() -> Self {
        Self::new()
    }
}

static FATAL: AtomicBool = AtomicBool::new(false);

/// Reports an unrecoverable failure (panic, CPU exception) and powers off.
pub fn fatal(args: fmt::Arguments<'_>) -> ! {
    if !FATAL.swap(true, Ordering::SeqCst) {
        let mut out = Serial;
        let _ = write!(out, "\n{MARKER} {{\"result\":\"fail\",\"panic\":{}}}\n", JsonArgs(args));
    }
    crate::power::off()
}
