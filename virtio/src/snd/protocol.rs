//! The virtio-snd wire format (virtio 1.2, 5.14.6) and its parser.
//!
//! Control requests are parsed from the bytes of their readable descriptors into a typed
//! [`ControlRequest`] before the device acts on them; the parser checks the shape (length,
//! known codes), the device checks the meaning (stream ids, states, parameters). Both end in a
//! virtio-snd status. Nothing the guest sends can make the parser panic.
//! `fuzz/fuzz_targets/virtio_snd.rs` drives this parser and the device.

/// The size of `virtio_snd_config` (jacks, streams, chmaps, controls).
pub const CONFIG_SIZE: usize = 16;
/// The most bytes a control request may have (the largest is `PCM_SET_PARAMS`, 24 bytes).
pub const MAX_CONTROL_BYTES: usize = 64;

/// Request and event codes.
pub mod code {
    pub const JACK_INFO: u32 = 1;
    pub const JACK_REMAP: u32 = 2;
    pub const PCM_INFO: u32 = 0x0100;
    pub const PCM_SET_PARAMS: u32 = 0x0101;
    pub const PCM_PREPARE: u32 = 0x0102;
    pub const PCM_RELEASE: u32 = 0x0103;
    pub const PCM_START: u32 = 0x0104;
    pub const PCM_STOP: u32 = 0x0105;
    pub const CHMAP_INFO: u32 = 0x0200;
}

/// Response statuses (`virtio_snd_hdr.code` of a response, `virtio_snd_pcm_status.status`).
pub mod status {
    pub const OK: u32 = 0x8000;
    pub const BAD_MSG: u32 = 0x8001;
    pub const NOT_SUPP: u32 = 0x8002;
    pub const IO_ERR: u32 = 0x8003;
}

/// `VIRTIO_SND_D_OUTPUT` / `VIRTIO_SND_D_INPUT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Direction {
    Output = 0,
    Input = 1,
}

/// `VIRTIO_SND_PCM_FMT_S16`.
pub const FORMAT_S16: u8 = 5;
/// `VIRTIO_SND_PCM_RATE_48000`.
pub const RATE_48000: u8 = 7;
/// Channel positions (`VIRTIO_SND_CHMAP_FL`, `_FR`).
pub const CHMAP_FL: u8 = 3;
pub const CHMAP_FR: u8 = 4;
/// `VIRTIO_SND_CHMAP_MAX_SIZE`.
pub const CHMAP_MAX_SIZE: usize = 18;

/// Sizes of the info structures the device writes.
pub const JACK_INFO_SIZE: usize = 24;
pub const PCM_INFO_SIZE: usize = 32;
pub const CHMAP_INFO_SIZE: usize = 24;
/// `virtio_snd_pcm_xfer`: the header of every tx/rx message.
pub const XFER_HEADER_SIZE: usize = 4;
/// `virtio_snd_pcm_status`: the tail of every tx/rx message.
pub const PCM_STATUS_SIZE: usize = 8;

/// A `*_INFO` query: which items, and how large the driver thinks each is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Query {
    pub start_id: u32,
    pub count: u32,
    pub size: u32,
}

/// `PCM_SET_PARAMS`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SetParams {
    pub stream_id: u32,
    pub buffer_bytes: u32,
    pub period_bytes: u32,
    pub features: u32,
    pub channels: u8,
    pub format: u8,
    pub rate: u8,
}

/// A parsed control request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlRequest {
    JackInfo(Query),
    JackRemap,
    PcmInfo(Query),
    ChmapInfo(Query),
    SetParams(SetParams),
    Prepare(u32),
    Release(u32),
    Start(u32),
    Stop(u32),
}

/// Why a control request was refused; each maps to a status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SndError {
    #[error("request of {0} bytes is too short")]
    Short(usize),
    #[error("unknown request code {0:#x}")]
    UnknownCode(u32),
    #[error("{0}")]
    BadMessage(String),
    #[error("{0}")]
    NotSupported(String),
}

impl SndError {
    /// The virtio-snd status for this error.
    pub fn status(&self) -> u32 {
        match self {
            Self::Short(_) | Self::BadMessage(_) => status::BAD_MSG,
            Self::UnknownCode(_) | Self::NotSupported(_) => status::NOT_SUPP,
        }
    }
}

fn u32_at(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
}

impl ControlRequest {
    /// Parses the readable bytes of a control request.
    pub fn parse(bytes: &[u8]) -> Result<Self, SndError> {
        let short = || SndError::Short(bytes.len());
        let code = u32_at(bytes, 0).ok_or_else(short)?;
        let query = || -> Result<Query, SndError> {
            Ok(Query {
                start_id: u32_at(bytes, 4).ok_or_else(short)?,
                count: u32_at(bytes, 8).ok_or_else(short)?,
                size: u32_at(bytes, 12).ok_or_else(short)?,
            })
        };
        let stream = || u32_at(bytes, 4).ok_or_else(short);
        Ok(match code {
            code::JACK_INFO => Self::JackInfo(query()?),
            code::JACK_REMAP => Self::JackRemap,
            code::PCM_INFO => Self::PcmInfo(query()?),
            code::CHMAP_INFO => Self::ChmapInfo(query()?),
            code::PCM_SET_PARAMS => {
                let b = bytes.get(..24).ok_or_else(short)?;
                Self::SetParams(SetParams {
                    stream_id: u32_at(b, 4).ok_or_else(short)?,
                    buffer_bytes: u32_at(b, 8).ok_or_else(short)?,
                    period_bytes: u32_at(b, 12).ok_or_else(short)?,
                    features: u32_at(b, 16).ok_or_else(short)?,
                    channels: b[20],
                    format: b[21],
                    rate: b[22],
                })
            }
            code::PCM_PREPARE => Self::Prepare(stream()?),
            code::PCM_RELEASE => Self::Release(stream()?),
            code::PCM_START => Self::Start(stream()?),
            code::PCM_STOP => Self::Stop(stream()?),
            other => return Err(SndError::UnknownCode(other)),
        })
    }
}

/// Encoders of requests, for tests, the fuzz target and the benchmark.
pub mod encode {
    use super::code;

    pub fn header(code: u32) -> Vec<u8> {
        code.to_le_bytes().to_vec()
    }

    pub fn query(code: u32, start_id: u32, count: u32, size: u32) -> Vec<u8> {
        [code, start_id, count, size].iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    pub fn stream(code: u32, stream_id: u32) -> Vec<u8> {
        [code, stream_id].iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    pub fn set_params(
        stream_id: u32,
        buffer_bytes: u32,
        period_bytes: u32,
        channels: u8,
        format: u8,
        rate: u8,
    ) -> Vec<u8> {
        let mut out: Vec<u8> = [code::PCM_SET_PARAMS, stream_id, buffer_bytes, period_bytes, 0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        out.extend_from_slice(&[channels, format, rate, 0]);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::{any, proptest};

    #[test]
    fn requests_parse_into_typed_values() {
        assert_eq!(
            ControlRequest::parse(&encode::query(code::PCM_INFO, 0, 2, 32)),
            Ok(ControlRequest::PcmInfo(Query { start_id: 0, count: 2, size: 32 }))
        );
        assert_eq!(
            ControlRequest::parse(&encode::set_params(1, 19200, 3840, 2, FORMAT_S16, RATE_48000)),
            Ok(ControlRequest::SetParams(SetParams {
                stream_id: 1,
                buffer_bytes: 19200,
                period_bytes: 3840,
                features: 0,
                channels: 2,
                format: FORMAT_S16,
                rate: RATE_48000
            }))
        );
        assert_eq!(ControlRequest::parse(&encode::stream(code::PCM_START, 0)), Ok(ControlRequest::Start(0)));
        assert_eq!(ControlRequest::parse(&[1, 0]), Err(SndError::Short(2)));
        assert_eq!(ControlRequest::parse(&encode::header(code::PCM_STOP)), Err(SndError::Short(4)));
        assert_eq!(ControlRequest::parse(&encode::header(0x0300)), Err(SndError::UnknownCode(0x300)));
        assert_eq!(SndError::UnknownCode(1).status(), status::NOT_SUPP);
        assert_eq!(SndError::Short(1).status(), status::BAD_MSG);
    }

    proptest! {
        #[test]
        fn parsing_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = ControlRequest::parse(&bytes);
        }
    }
}
