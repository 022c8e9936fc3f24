//! Raw ALSA PCM through the kernel's ioctls (`include/uapi/sound/asound.h`), so that the static
//! agent can play and record without alsa-lib. This module is the agent's only `unsafe`: each
//! block is one ioctl on a PCM device file this module opened, with a `#[repr(C)]` argument
//! laid out as the kernel's structure (sizes checked at compile time).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

const SNDRV_PCM_ACCESS_RW_INTERLEAVED: u32 = 3;
const SNDRV_PCM_FORMAT_S16_LE: u32 = 2;
const SNDRV_PCM_SUBFORMAT_STD: u32 = 0;
// Parameter indices: masks from 0, intervals from 8.
const PARAM_ACCESS: usize = 0;
const PARAM_FORMAT: usize = 1;
const PARAM_SUBFORMAT: usize = 2;
const FIRST_INTERVAL: usize = 8;
const PARAM_CHANNELS: usize = 10;
const PARAM_RATE: usize = 11;
const PARAM_PERIOD_SIZE: usize = 13;
const PARAM_BUFFER_SIZE: usize = 17;

#[repr(C)]
#[derive(Clone, Copy)]
struct Mask {
    bits: [u32; 8],
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Interval {
    min: u32,
    max: u32,
    /// openmin:1, openmax:1, integer:1, empty:1.
    flags: u32,
}

/// `struct snd_pcm_hw_params` (x86-64: 608 bytes).
#[repr(C)]
#[derive(Clone, Copy)]
struct HwParams {
    flags: u32,
    masks: [Mask; 3],
    mres: [Mask; 5],
    intervals: [Interval; 12],
    ires: [Interval; 9],
    rmask: u32,
    cmask: u32,
    info: u32,
    msbits: u32,
    rate_num: u32,
    rate_den: u32,
    fifo_size: u64,
    reserved: [u8; 64],
}

/// `struct snd_xferi`.
#[repr(C)]
struct Xferi {
    result: i64,
    buf: *mut libc::c_void,
    frames: u64,
}

const _: () = assert!(std::mem::size_of::<HwParams>() == 608);
const _: () = assert!(std::mem::size_of::<Xferi>() == 24);

const fn ioc(dir: u64, nr: u64, size: u64) -> u64 {
    (dir << 30) | (size << 16) | ((b'A' as u64) << 8) | nr
}
const HW_PARAMS: u64 = ioc(3, 0x11, 608);
const PREPARE: u64 = ioc(0, 0x40, 0);
const DRAIN: u64 = ioc(0, 0x44, 0);
const DROP: u64 = ioc(0, 0x43, 0);
const WRITEI_FRAMES: u64 = ioc(1, 0x50, 24);
const READI_FRAMES: u64 = ioc(2, 0x51, 24);

impl HwParams {
    /// Everything allowed (alsa-lib's `snd_pcm_hw_params_any`).
    fn any() -> Self {
        Self {
            flags: 0,
            masks: [Mask { bits: [!0; 8] }; 3],
            mres: [Mask { bits: [0; 8] }; 5],
            intervals: [Interval { min: 0, max: u32::MAX, flags: 0 }; 12],
            ires: [Interval { min: 0, max: 0, flags: 0 }; 9],
            rmask: !0,
            cmask: 0,
            info: !0,
            msbits: 0,
            rate_num: 0,
            rate_den: 0,
            fifo_size: 0,
            reserved: [0; 64],
        }
    }

    fn only(&mut self, mask: usize, bit: u32) {
        self.masks[mask].bits = [0; 8];
        self.masks[mask].bits[(bit / 32) as usize] = 1 << (bit % 32);
    }

    fn exactly(&mut self, param: usize, value: u32) {
        self.intervals[param - FIRST_INTERVAL] = Interval { min: value, max: value, flags: 1 << 2 };
    }
}

/// An open PCM in interleaved S16LE, stereo, 48 kHz.
#[derive(Debug)]
pub struct Pcm {
    file: File,
    /// Frames per period and in the buffer, as the kernel chose them.
    pub period_frames: u32,
    pub buffer_frames: u32,
    pub xruns: u32,
}

fn check(ret: libc::c_int) -> io::Result<()> {
    if ret < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

impl Pcm {
    /// Opens `path` (`/dev/snd/pcmC0D0p` or `…c`) with `period_frames` periods in a buffer of
    /// `buffer_frames`, or what the driver allows if it refuses those.
    pub fn open(path: &Path, period_frames: u32, buffer_frames: u32) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        let mut params = HwParams::any();
        params.only(PARAM_ACCESS, SNDRV_PCM_ACCESS_RW_INTERLEAVED);
        params.only(PARAM_FORMAT, SNDRV_PCM_FORMAT_S16_LE);
        params.only(PARAM_SUBFORMAT, SNDRV_PCM_SUBFORMAT_STD);
        params.exactly(PARAM_CHANNELS, 2);
        params.exactly(PARAM_RATE, 48_000);
        let mut exact = params;
        exact.exactly(PARAM_PERIOD_SIZE, period_frames);
        exact.exactly(PARAM_BUFFER_SIZE, buffer_frames);
        // SAFETY: HW_PARAMS reads and writes one `snd_pcm_hw_params`; `exact` is one, laid out
        // as the kernel's (size asserted above), and lives across the call.
        let chosen =
            if check(unsafe { libc::ioctl(file.as_raw_fd(), HW_PARAMS as _, &mut exact as *mut HwParams) })
                .is_ok()
            {
                exact
            } else {
                // SAFETY: as above, with `params`.
                check(unsafe {
                    libc::ioctl(file.as_raw_fd(), HW_PARAMS as _, &mut params as *mut HwParams)
                })?;
                params
            };
        let period_frames = chosen.intervals[PARAM_PERIOD_SIZE - FIRST_INTERVAL].min;
        let buffer_frames = chosen.intervals[PARAM_BUFFER_SIZE - FIRST_INTERVAL].min;
        let pcm = Self { file, period_frames, buffer_frames, xruns: 0 };
        pcm.simple(PREPARE)?;
        Ok(pcm)
    }

    fn simple(&self, request: u64) -> io::Result<()> {
        // SAFETY: PREPARE, DRAIN and DROP take no argument.
        check(unsafe { libc::ioctl(self.file.as_raw_fd(), request as _) })
    }

    /// Writes interleaved stereo frames, blocking while the buffer is full; recovers from
    /// underruns (counted in `xruns`).
    pub fn write(&mut self, samples: &[i16]) -> io::Result<()> {
        let mut at = 0;
        while at < samples.len() {
            let rest = &samples[at..];
            let mut x =
                Xferi { result: 0, buf: rest.as_ptr() as *mut libc::c_void, frames: (rest.len() / 2) as u64 };
            // SAFETY: WRITEI_FRAMES reads `x.frames` stereo S16 frames from `x.buf`, which
            // points into `samples` with at least that many frames left; `x` lives across it.
            let ret = unsafe { libc::ioctl(self.file.as_raw_fd(), WRITEI_FRAMES as _, &mut x as *mut Xferi) };
            if ret < 0 {
                self.recover()?;
                continue;
            }
            at += x.result.max(0) as usize * 2;
        }
        Ok(())
    }

    /// After a failed transfer (call it first, while `errno` is the transfer's): an xrun
    /// (EPIPE) is counted and the stream prepared again, an interrupted call is simply retried;
    /// `Ok` means "try again", anything else is the error.
    fn recover(&mut self) -> io::Result<()> {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EPIPE) {
            self.xruns += 1;
            return self.simple(PREPARE);
        }
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(());
        }
        Err(e)
    }

    /// Reads exactly `out.len() / 2` stereo frames.
    pub fn read(&mut self, out: &mut [i16]) -> io::Result<()> {
        let mut at = 0;
        while at < out.len() {
            let rest = &mut out[at..];
            let mut x = Xferi {
                result: 0,
                buf: rest.as_mut_ptr() as *mut libc::c_void,
                frames: (rest.len() / 2) as u64,
            };
            // SAFETY: READI_FRAMES writes at most `x.frames` stereo S16 frames to `x.buf`, which
            // points into `out` with room for that many; `x` lives across the call.
            let ret = unsafe { libc::ioctl(self.file.as_raw_fd(), READI_FRAMES as _, &mut x as *mut Xferi) };
            if ret < 0 {
                self.recover()?;
                continue;
            }
            at += x.result.max(0) as usize * 2;
        }
        Ok(())
    }

    /// Plays what is buffered, then stops.
    pub fn drain(&self) -> io::Result<()> {
        self.simple(DRAIN)
    }

    /// Stops at once.
    pub fn stop(&self) -> io::Result<()> {
        self.simple(DROP)
    }
}
