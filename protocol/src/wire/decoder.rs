//! The incremental, sans-IO stream decoder.
//!
//! QUIC hands a receiver a stream as chunks of any size; a message may span many chunks and a
//! chunk may hold many messages. [`StreamDecoder::decode`] takes whatever arrived, consumes
//! bytes up to the end of the next message and returns it, so the caller loops until the chunk
//! is empty. A message that lies wholly inside the chunk is parsed in place; only a message
//! split across chunks is buffered, and that buffer grows with the bytes actually received,
//! never beyond the body length the header announced, which was checked against the channel's
//! limit first. Memory per stream is therefore at most one body of at most
//! [`Channel::max_body`](super::Channel::max_body) bytes, whatever the peer sends.

use std::marker::PhantomData;

use super::{ChannelMessage, DecodeError, FRAME_HEADER_LEN, channel_of_type, decode_body};

/// Buffers larger than this are released after their message instead of being kept for reuse.
const KEEP_BUFFER: usize = 64 * 1024;

/// Decodes one stream of channel `M` (e.g. `StreamDecoder::<DisplayMessage>::new()`).
///
/// ```
/// use pleiades_protocol::wire::{encode_to_vec, InputMessage, Key, StreamDecoder};
///
/// let bytes = encode_to_vec(&InputMessage::Key(Key { code: 30, down: true })).unwrap();
/// let mut decoder = StreamDecoder::<InputMessage>::new();
/// let mut got = Vec::new();
/// for chunk in bytes.chunks(4) {
///     let mut chunk = chunk;
///     while let Some(message) = decoder.decode(&mut chunk).unwrap() {
///         got.push(message);
///     }
/// }
/// decoder.finish().unwrap(); // the stream ended between messages
/// assert_eq!(got, [InputMessage::Key(Key { code: 30, down: true })]);
/// ```
#[derive(Debug)]
pub struct StreamDecoder<M> {
    state: State,
    header: [u8; FRAME_HEADER_LEN],
    header_len: usize,
    body: Vec<u8>,
    decoded: u64,
    skipped: u64,
    failed: Option<DecodeError>,
    _messages: PhantomData<fn() -> M>,
}

#[derive(Debug, Clone, Copy)]
enum State {
    /// Reading the 6-byte frame header (`header_len` bytes of it so far).
    Header,
    /// Buffering the body of a known type.
    Body { ty: u16, len: usize },
    /// Discarding the body of an unknown type.
    Skip { remaining: usize, len: usize },
}

impl<M: ChannelMessage> Default for StreamDecoder<M> {
    fn default() -> Self {
        Self::new()
    }
}

impl<M: ChannelMessage> StreamDecoder<M> {
    pub fn new() -> Self {
        Self {
            state: State::Header,
            header: [0; FRAME_HEADER_LEN],
            header_len: 0,
            body: Vec::new(),
            decoded: 0,
            skipped: 0,
            failed: None,
            _messages: PhantomData,
        }
    }

    /// Consumes bytes from the front of `input` up to the end of the next message and returns
    /// it; `Ok(None)` once `input` is empty with no message complete (feed the next chunk).
    /// Unknown message types are skipped and counted ([`Self::skipped`]).
    ///
    /// After an error the channel is over: this and every later call return the same error.
    pub fn decode(&mut self, input: &mut &[u8]) -> Result<Option<M>, DecodeError> {
        if let Some(error) = &self.failed {
            return Err(error.clone());
        }
        match self.step(input) {
            Ok(message) => Ok(message),
            Err(error) => {
                self.failed = Some(error.clone());
                self.body = Vec::new();
                Err(error)
            }
        }
    }

    /// Decodes every whole message in `chunk` into `out`; a partial message at the end stays
    /// buffered for the next call.
    pub fn decode_all(&mut self, mut chunk: &[u8], out: &mut Vec<M>) -> Result<(), DecodeError> {
        while let Some(message) = self.decode(&mut chunk)? {
            out.push(message);
        }
        Ok(())
    }

    /// Call when the stream ends: fails with [`DecodeError::Truncated`] if it ended inside a
    /// message (or with the earlier error, if the decoder had failed).
    pub fn finish(&self) -> Result<(), DecodeError> {
        if let Some(error) = &self.failed {
            return Err(error.clone());
        }
        let channel = M::CHANNEL;
        let (have, need) = match self.state {
            State::Header if self.header_len == 0 => return Ok(()),
            State::Header => (self.header_len, FRAME_HEADER_LEN),
            State::Body { len, .. } => (FRAME_HEADER_LEN + self.body.len(), FRAME_HEADER_LEN + len),
            State::Skip { remaining, len } => (FRAME_HEADER_LEN + len - remaining, FRAME_HEADER_LEN + len),
        };
        Err(DecodeError::Truncated { channel, have, need })
    }

    /// Messages decoded so far.
    pub fn decoded(&self) -> u64 {
        self.decoded
    }

    /// Messages of unknown type skipped so far (a newer peer; worth a debug log, not an error).
    pub fn skipped(&self) -> u64 {
        self.skipped
    }

    /// Bytes currently reserved for a partial message; never more than the channel's body limit.
    pub fn buffer_capacity(&self) -> usize {
        self.body.capacity()
    }

    fn step(&mut self, input: &mut &[u8]) -> Result<Option<M>, DecodeError> {
        loop {
            match self.state {
                State::Header => {
                    if input.is_empty() {
                        return Ok(None);
                    }
                    let take = (FRAME_HEADER_LEN - self.header_len).min(input.len());
                    self.header[self.header_len..self.header_len + take].copy_from_slice(&input[..take]);
                    self.header_len += take;
                    *input = &input[take..];
                    if self.header_len < FRAME_HEADER_LEN {
                        return Ok(None);
                    }
                    self.header_len = 0;
                    self.start_frame()?;
                }
                State::Skip { remaining, len } => {
                    let take = remaining.min(input.len());
                    *input = &input[take..];
                    if take < remaining {
                        self.state = State::Skip { remaining: remaining - take, len };
                        return Ok(None);
                    }
                    self.skipped += 1;
                    self.state = State::Header;
                }
                State::Body { ty, len } => {
                    // Fast path: the whole body is in this chunk; parse it in place.
                    if self.body.is_empty() && input.len() >= len {
                        let (body, rest) = input.split_at(len);
                        *input = rest;
                        self.state = State::Header;
                        if let Some(message) = decode_body::<M>(ty, body)? {
                            self.decoded += 1;
                            return Ok(Some(message));
                        }
                        continue;
                    }
                    if input.is_empty() {
                        return Ok(None);
                    }
                    let take = (len - self.body.len()).min(input.len());
                    let needed = self.body.len() + take;
                    if needed > self.body.capacity() {
                        // Grow geometrically for few copies, but never past the announced length.
                        let target = needed.max(self.body.capacity().saturating_mul(2)).min(len);
                        self.body.reserve_exact(target - self.body.len());
                    }
                    self.body.extend_from_slice(&input[..take]);
                    *input = &input[take..];
                    if self.body.len() < len {
                        return Ok(None);
                    }
                    self.state = State::Header;
                    let result = decode_body::<M>(ty, &self.body);
                    if self.body.capacity() > KEEP_BUFFER {
                        self.body = Vec::new();
                    } else {
                        self.body.clear();
                    }
                    if let Some(message) = result? {
                        self.decoded += 1;
                        return Ok(Some(message));
                    }
                }
            }
        }
    }

    /// Checks a complete header and picks the next state.
    fn start_frame(&mut self) -> Result<(), DecodeError> {
        let channel = M::CHANNEL;
        let ty = u16::from_le_bytes([self.header[0], self.header[1]]);
        let len32 = u32::from_le_bytes([self.header[2], self.header[3], self.header[4], self.header[5]]);
        let max = channel.max_body();
        if len32 > max {
            return Err(DecodeError::TooLarge { channel, ty, len: len32, max });
        }
        // Bounded by `max` (at most 32 MiB), so this fits in usize.
        let len = len32 as usize;
        self.state = match channel_of_type(ty) {
            None => State::Skip { remaining: len, len },
            Some(belongs_to) if belongs_to != channel => {
                return Err(DecodeError::WrongChannel { channel, ty, belongs_to });
            }
            Some(_) => State::Body { ty, len },
        };
        Ok(())
    }
}
