//! Clipboard messages: the same four, both ways, on the session's clipboard channel (client ↔
//! VM process) and, wrapped in [`super::AgentMessage`], on the agent link (VM process ↔ guest
//! agent). The VM process relays between the two ([`crate::clipboard::ClipboardRelay`]) and
//! enforces the pool's policy there.
//!
//! The transfer is lazy, as in X11 and SPICE: a side whose user copied something announces
//! only the formats it has ([`ClipboardGrab`]); the data moves when the other side's user
//! pastes ([`ClipboardRequest`] → [`ClipboardData`] chunks, or [`ClipboardRefused`]).
//!
//! ```text
//! copy on A:   A ── Grab{serial 7, [Text, Html]} ──▶ B     (B now offers those to its apps)
//! paste on B:  A ◀── Request{7, Text} ─────────────── B
//!              A ── Data{7, Text, offset 0, total N, bytes} ─▶ B   (… until offset + len = N)
//! ```
//!
//! Serials number one side's grabs; a request names the grab it wants, so that an answer for
//! content that was replaced meanwhile is recognised and dropped.

use super::codec::{Put, Reader};
use super::{Channel, ChannelMessage, types};

/// Largest clipboard content either side accepts, in bytes (a 4K screenshot as PNG fits).
pub const MAX_CLIPBOARD_BYTES: u32 = 32 * 1024 * 1024;
/// Most bytes in one [`ClipboardData`] chunk: fits the agent channel's 64 KiB body limit.
pub const MAX_CLIPBOARD_CHUNK: usize = 48 * 1024;
/// Most formats one grab offers.
pub const MAX_CLIPBOARD_FORMATS: usize = 8;

/// What clipboard content is, in the form both ends convert to and from their own clipboard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum ClipboardFormat {
    /// UTF-8 text (`UTF8_STRING`, `text/plain;charset=utf-8`).
    Text = 1,
    /// Rich text as an HTML fragment (`text/html`), UTF-8.
    Html = 2,
    /// A PNG image (`image/png`).
    Png = 3,
}

impl ClipboardFormat {
    pub const ALL: [ClipboardFormat; 3] =
        [ClipboardFormat::Text, ClipboardFormat::Html, ClipboardFormat::Png];

    pub fn from_u8(v: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|f| *f as u8 == v)
    }

    /// The MIME type that names this format on desktops.
    pub fn mime(self) -> &'static str {
        match self {
            ClipboardFormat::Text => "text/plain;charset=utf-8",
            ClipboardFormat::Html => "text/html",
            ClipboardFormat::Png => "image/png",
        }
    }

    /// Whether `bytes` can be this format's content: text and HTML must be UTF-8 (checked by
    /// the receiver once the whole content arrived), a PNG must start with PNG's signature.
    pub fn accepts(self, bytes: &[u8]) -> bool {
        match self {
            ClipboardFormat::Text | ClipboardFormat::Html => std::str::from_utf8(bytes).is_ok(),
            ClipboardFormat::Png => bytes.starts_with(b"\x89PNG\r\n\x1a\n"),
        }
    }
}

/// "My user copied something; I can give it in these formats." An empty list: the clipboard
/// was cleared (the other side stops offering what it had from this one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClipboardGrab {
    pub serial: u32,
    /// No duplicates, at most [`MAX_CLIPBOARD_FORMATS`].
    pub formats: Vec<ClipboardFormat>,
}

/// "My user pastes: send the content of your grab `serial` as `format`."
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClipboardRequest {
    pub serial: u32,
    pub format: ClipboardFormat,
}

/// One chunk of the answer to a [`ClipboardRequest`]: chunks come in order, from offset 0,
/// each of 1..=[`MAX_CLIPBOARD_CHUNK`] bytes (one empty chunk for empty content), until
/// `offset + bytes.len() == total`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClipboardData {
    pub serial: u32,
    pub format: ClipboardFormat,
    pub offset: u32,
    /// The whole content's length, the same in every chunk, at most [`MAX_CLIPBOARD_BYTES`].
    pub total: u32,
    pub bytes: Vec<u8>,
}

impl ClipboardData {
    /// Whether this chunk ends the content.
    pub fn is_last(&self) -> bool {
        u64::from(self.offset) + self.bytes.len() as u64 == u64::from(self.total)
    }

    /// `content` as the chunks that carry it.
    pub fn chunks(serial: u32, format: ClipboardFormat, content: &[u8]) -> Vec<ClipboardData> {
        let total = content.len() as u32;
        if content.is_empty() {
            return vec![ClipboardData { serial, format, offset: 0, total: 0, bytes: Vec::new() }];
        }
        content
            .chunks(MAX_CLIPBOARD_CHUNK)
            .enumerate()
            .map(|(i, bytes)| ClipboardData {
                serial,
                format,
                offset: (i * MAX_CLIPBOARD_CHUNK) as u32,
                total,
                bytes: bytes.to_vec(),
            })
            .collect()
    }
}

/// Why a request gets no data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum RefuseReason {
    /// The grab was replaced or its owner is gone.
    Gone = 0,
    /// The content is not available in that format after all.
    NoFormat = 1,
    /// Over [`MAX_CLIPBOARD_BYTES`] or the receiver's own limit.
    TooLarge = 2,
    /// The desktop's pool does not allow the clipboard in this direction (the answer to a
    /// request).
    Policy = 3,
    /// The owner did not answer in time or its clipboard failed.
    Failed = 4,
    /// The answer to a grab, not to a request: the desktop's pool keeps what this side copied
    /// on this side (`serial` is the grab's, `format` its first).
    NotShared = 5,
}

/// "No data for your request" (or, from the VM process to the side that grabbed: "your grab
/// goes nowhere", reason [`RefuseReason::NotShared`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClipboardRefused {
    pub serial: u32,
    pub format: ClipboardFormat,
    pub reason: RefuseReason,
}

/// Everything the clipboard channel carries, in either direction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClipboardMessage {
    Grab(ClipboardGrab),
    Request(ClipboardRequest),
    Data(ClipboardData),
    Refused(ClipboardRefused),
}

/// Most bytes of clipboard messages a sender keeps queued for one peer (what
/// [`ClipboardMessage::queued_size`] counts): one whole content and some room. A queue past it
/// means the peer does not read or the other side floods; the sender ends the clipboard there.
pub const MAX_CLIPBOARD_QUEUE: usize = MAX_CLIPBOARD_BYTES as usize + (1 << 20);

/// The index of each message within its channel's four consecutive type numbers.
impl ClipboardMessage {
    /// The memory this message takes while it waits in a queue.
    pub fn queued_size(&self) -> usize {
        std::mem::size_of::<Self>()
            + match self {
                ClipboardMessage::Grab(g) => g.formats.len(),
                ClipboardMessage::Data(d) => d.bytes.len(),
                ClipboardMessage::Request(_) | ClipboardMessage::Refused(_) => 0,
            }
    }

    fn index(&self) -> u16 {
        match self {
            ClipboardMessage::Grab(_) => 0,
            ClipboardMessage::Request(_) => 1,
            ClipboardMessage::Data(_) => 2,
            ClipboardMessage::Refused(_) => 3,
        }
    }

    pub(crate) fn check(&self) -> Result<(), &'static str> {
        match self {
            ClipboardMessage::Grab(g) => {
                if g.formats.len() > MAX_CLIPBOARD_FORMATS {
                    return Err("too many clipboard formats");
                }
                let mut seen = g.formats.clone();
                seen.sort();
                seen.dedup();
                if seen.len() != g.formats.len() {
                    return Err("a clipboard format offered twice");
                }
            }
            ClipboardMessage::Data(d) => {
                if d.total > MAX_CLIPBOARD_BYTES {
                    return Err("clipboard content over the limit");
                }
                if d.bytes.len() > MAX_CLIPBOARD_CHUNK {
                    return Err("clipboard chunk over the limit");
                }
                if d.bytes.is_empty() && d.total != 0 {
                    return Err("an empty chunk of non-empty content");
                }
                if u64::from(d.offset) + d.bytes.len() as u64 > u64::from(d.total) {
                    return Err("clipboard chunk beyond the content's end");
                }
            }
            ClipboardMessage::Request(_) | ClipboardMessage::Refused(_) => {}
        }
        Ok(())
    }

    /// Every field but the data chunk's bytes (the payload).
    pub(crate) fn put_fields(&self, out: &mut Vec<u8>) {
        match self {
            ClipboardMessage::Grab(g) => {
                out.put_u32(g.serial);
                // Validated: at most MAX_CLIPBOARD_FORMATS.
                out.put_u8(g.formats.len() as u8);
                for f in &g.formats {
                    out.put_u8(*f as u8);
                }
            }
            ClipboardMessage::Request(r) => {
                out.put_u32(r.serial);
                out.put_u8(r.format as u8);
            }
            ClipboardMessage::Data(d) => {
                out.put_u32(d.serial);
                out.put_u8(d.format as u8);
                out.put_u32(d.offset);
                out.put_u32(d.total);
            }
            ClipboardMessage::Refused(r) => {
                out.put_u32(r.serial);
                out.put_u8(r.format as u8);
                out.put_u8(r.reason as u8);
            }
        }
    }

    pub(crate) fn payload_bytes(&self) -> &[u8] {
        match self {
            ClipboardMessage::Data(d) => &d.bytes,
            _ => &[],
        }
    }

    /// Reads the message at `index` (0 grab, 1 request, 2 data, 3 refused).
    pub(crate) fn read(index: u16, r: &mut Reader<'_>) -> Result<Option<Self>, &'static str> {
        fn format(r: &mut Reader<'_>) -> Result<ClipboardFormat, &'static str> {
            ClipboardFormat::from_u8(r.u8()?).ok_or("unknown clipboard format")
        }
        Ok(Some(match index {
            0 => {
                let serial = r.u32()?;
                let count = usize::from(r.u8()?);
                if count > MAX_CLIPBOARD_FORMATS {
                    return Err("too many clipboard formats");
                }
                let formats = (0..count).map(|_| format(r)).collect::<Result<_, _>>()?;
                ClipboardMessage::Grab(ClipboardGrab { serial, formats })
            }
            1 => ClipboardMessage::Request(ClipboardRequest { serial: r.u32()?, format: format(r)? }),
            2 => {
                let (serial, format, offset, total) = (r.u32()?, format(r)?, r.u32()?, r.u32()?);
                ClipboardMessage::Data(ClipboardData { serial, format, offset, total, bytes: r.rest() })
            }
            3 => {
                let (serial, format) = (r.u32()?, format(r)?);
                let reason = match r.u8()? {
                    0 => RefuseReason::Gone,
                    1 => RefuseReason::NoFormat,
                    2 => RefuseReason::TooLarge,
                    3 => RefuseReason::Policy,
                    4 => RefuseReason::Failed,
                    5 => RefuseReason::NotShared,
                    _ => return Err("unknown refusal reason"),
                };
                ClipboardMessage::Refused(ClipboardRefused { serial, format, reason })
            }
            _ => return Ok(None),
        }))
    }
}

impl ChannelMessage for ClipboardMessage {
    const CHANNEL: Channel = Channel::Clipboard;

    fn message_type(&self) -> u16 {
        types::CLIPBOARD_GRAB + self.index()
    }

    fn validate(&self) -> Result<(), &'static str> {
        self.check()
    }

    fn encode_fields(&self, out: &mut Vec<u8>) {
        self.put_fields(out);
    }

    fn payload(&self) -> &[u8] {
        self.payload_bytes()
    }

    fn decode_body(ty: u16, r: &mut Reader<'_>) -> Result<Option<Self>, &'static str> {
        match ty.checked_sub(types::CLIPBOARD_GRAB) {
            Some(index) if index < 4 => Self::read(index, r),
            _ => Ok(None),
        }
    }
}
