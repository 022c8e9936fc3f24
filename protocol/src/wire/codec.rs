//! Little-endian field readers and writers shared by every message.
//!
//! Reading goes through [`Reader`], which never indexes out of bounds: every read checks the
//! remaining length and fails with a short static reason, so a truncated or hostile body becomes
//! a [`super::DecodeError::Malformed`] instead of a panic.

/// A cursor over a message body. Every read is bounds-checked. (Public only because the
/// sealed-in-practice [`super::ChannelMessage`] names it; the module is private.)
#[derive(Debug)]
pub struct Reader<'a> {
    buf: &'a [u8],
}

/// Why a body did not parse; becomes [`super::DecodeError::Malformed`].
pub(crate) type Reason = &'static str;

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], Reason> {
        if self.buf.len() < n {
            return Err("body too short");
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], Reason> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, Reason> {
        Ok(self.array::<1>()?[0])
    }

    pub(crate) fn u16(&mut self) -> Result<u16, Reason> {
        Ok(u16::from_le_bytes(self.array()?))
    }

    pub(crate) fn u32(&mut self) -> Result<u32, Reason> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    pub(crate) fn i32(&mut self) -> Result<i32, Reason> {
        Ok(i32::from_le_bytes(self.array()?))
    }

    pub(crate) fn u64(&mut self) -> Result<u64, Reason> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    /// A boolean is one byte, 0 or 1; anything else is malformed (so that every value has
    /// exactly one encoding).
    pub(crate) fn bool(&mut self) -> Result<bool, Reason> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err("boolean is neither 0 nor 1"),
        }
    }

    /// `len:u16 | UTF-8 bytes`, at most `max` bytes.
    pub(crate) fn string(&mut self, max: usize) -> Result<String, Reason> {
        let len = usize::from(self.u16()?);
        if len > max {
            return Err("string longer than its limit");
        }
        let bytes = self.take(len)?;
        let text = std::str::from_utf8(bytes).map_err(|_| "string is not UTF-8")?;
        Ok(text.to_owned())
    }

    /// Everything left in the body (the last field of messages that carry a payload).
    pub(crate) fn rest(&mut self) -> Vec<u8> {
        let rest = self.buf.to_vec();
        self.buf = &[];
        rest
    }
}

/// Appends little-endian fields to an output buffer.
pub(crate) trait Put {
    fn put_u8(&mut self, v: u8);
    fn put_u16(&mut self, v: u16);
    fn put_u32(&mut self, v: u32);
    fn put_i32(&mut self, v: i32);
    fn put_u64(&mut self, v: u64);
    fn put_bool(&mut self, v: bool);
    /// `len:u16 | UTF-8 bytes`. Callers validate the length first (every string field has a
    /// limit far below `u16::MAX`); a longer string is cut at `u16::MAX` bytes as a last resort,
    /// which keeps the frame self-consistent.
    fn put_str(&mut self, s: &str);
}

impl Put for Vec<u8> {
    fn put_u8(&mut self, v: u8) {
        self.push(v);
    }
    fn put_u16(&mut self, v: u16) {
        self.extend_from_slice(&v.to_le_bytes());
    }
    fn put_u32(&mut self, v: u32) {
        self.extend_from_slice(&v.to_le_bytes());
    }
    fn put_i32(&mut self, v: i32) {
        self.extend_from_slice(&v.to_le_bytes());
    }
    fn put_u64(&mut self, v: u64) {
        self.extend_from_slice(&v.to_le_bytes());
    }
    fn put_bool(&mut self, v: bool) {
        self.push(u8::from(v));
    }
    fn put_str(&mut self, s: &str) {
        let len = u16::try_from(s.len()).unwrap_or(u16::MAX);
        self.put_u16(len);
        self.extend_from_slice(&s.as_bytes()[..usize::from(len)]);
    }
}
