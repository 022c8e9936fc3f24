//! What a VM is asked to be, validated before either VMM starts: sizes, kernel format, initrd,
//! CPU count. Shared by `--vmm pleiades` and `--vmm qemu`, so both refuse the same bad input
//! with the same message.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

pub use crate::MAX_CPUS;
pub use crate::memory::{MAX_MEMORY_MIB, MIN_MEMORY_MIB};

/// Why a VM configuration is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("{0:?} is not a size: use a number with an optional unit, e.g. 512M, 2G, 1024 (MiB)")]
    BadSize(String),
    #[error("{what} of {mib} MiB is out of range: use {MIN_MEMORY_MIB} MiB to {MAX_MEMORY_MIB} MiB")]
    MemoryOutOfRange { what: &'static str, mib: u64 },
    #[error("--cpus {0} is out of range: use 1 to {MAX_CPUS}")]
    CpusOutOfRange(u32),
    #[error(
        "cannot read the kernel {path}: {reason}. Build the guest image with `cargo xtask guest-image`, or pass --kernel"
    )]
    KernelUnreadable { path: PathBuf, reason: String },
    #[error(
        "{0} is neither a Linux bzImage nor an ELF executable: pass a kernel image (vmlinuz) or the test guest ELF"
    )]
    KernelFormat(PathBuf),
    #[error("cannot read the initrd {path}: {reason}")]
    InitrdUnreadable { path: PathBuf, reason: String },
    #[error(
        "the initrd {path} ({initrd_mib} MiB) does not fit in {memory_mib} MiB of guest RAM: give the VM more --memory"
    )]
    InitrdTooLarge { path: PathBuf, initrd_mib: u64, memory_mib: u64 },
    #[error("the kernel command line is {0} bytes; the limit is 2047")]
    CmdlineTooLong(usize),
}

/// Parses a size: `512M`, `2G`, `1.5G` is refused (whole numbers only), a bare number is MiB.
/// Returns MiB.
pub fn parse_size_mib(text: &str) -> Result<u64, ConfigError> {
    let bad = || ConfigError::BadSize(text.to_owned());
    let t = text.trim();
    let t = t.strip_suffix("iB").or_else(|| t.strip_suffix('B')).unwrap_or(t);
    let (digits, shift) = match t.chars().last() {
        Some('K' | 'k') => (&t[..t.len() - 1], -10i32),
        Some('M' | 'm') => (&t[..t.len() - 1], 0),
        Some('G' | 'g') => (&t[..t.len() - 1], 10),
        Some('T' | 't') => (&t[..t.len() - 1], 20),
        Some(c) if c.is_ascii_digit() => (t, 0),
        _ => return Err(bad()),
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_ascii_digit()) {
        return Err(bad());
    }
    let n: u64 = digits.parse().map_err(|_| bad())?;
    if shift < 0 {
        Ok(n >> -shift)
    } else {
        n.checked_shl(shift as u32).filter(|v| v >> shift == n).ok_or_else(bad)
    }
}

/// What kind of kernel image a file is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    /// A Linux bzImage (boot protocol header "HdrS").
    BzImage,
    /// An ELF executable (the test guest; PVH-capable kernels).
    Elf,
}

/// Looks at a kernel file's header.
pub fn detect_kernel(path: &Path) -> Result<KernelFormat, ConfigError> {
    let unreadable = |reason: String| ConfigError::KernelUnreadable { path: path.to_owned(), reason };
    let mut file = File::open(path).map_err(|e| unreadable(e.to_string()))?;
    let mut magic = [0u8; 4];
    if file.read_exact(&mut magic).is_err() {
        return Err(ConfigError::KernelFormat(path.to_owned()));
    }
    if magic == *b"\x7fELF" {
        return Ok(KernelFormat::Elf);
    }
    // Linux boot protocol: 0xAA55 at 0x1FE, "HdrS" at 0x202.
    let mut header = [0u8; 8];
    if file.seek(SeekFrom::Start(0x1FE)).is_ok()
        && file.read_exact(&mut header).is_ok()
        && header[0..2] == [0x55, 0xAA]
        && &header[4..8] == b"HdrS"
    {
        return Ok(KernelFormat::BzImage);
    }
    Err(ConfigError::KernelFormat(path.to_owned()))
}

/// A validated boot request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootSpec {
    pub kernel: PathBuf,
    pub kernel_format: KernelFormat,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub memory_mib: u64,
    pub cpus: u8,
}

impl BootSpec {
    /// Validates everything that can be checked before a VMM starts.
    pub fn new(
        kernel: &Path,
        initrd: Option<&Path>,
        cmdline: &str,
        memory: &str,
        cpus: u32,
    ) -> Result<Self, ConfigError> {
        let memory_mib = parse_size_mib(memory)?;
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&memory_mib) {
            return Err(ConfigError::MemoryOutOfRange { what: "--memory", mib: memory_mib });
        }
        let cpus = u8::try_from(cpus)
            .ok()
            .filter(|c| (1..=MAX_CPUS).contains(c))
            .ok_or(ConfigError::CpusOutOfRange(cpus))?;
        let kernel_format = detect_kernel(kernel)?;
        if cmdline.len() > 2047 {
            return Err(ConfigError::CmdlineTooLong(cmdline.len()));
        }
        if let Some(initrd) = initrd {
            let size = std::fs::metadata(initrd)
                .map_err(|e| ConfigError::InitrdUnreadable {
                    path: initrd.to_owned(),
                    reason: e.to_string(),
                })?
                .len();
            // The kernel unpacks the initrd next to itself: it must leave room for both.
            if size.div_ceil(1 << 20) * 2 >= memory_mib {
                return Err(ConfigError::InitrdTooLarge {
                    path: initrd.to_owned(),
                    initrd_mib: size.div_ceil(1 << 20),
                    memory_mib,
                });
            }
        }
        Ok(Self {
            kernel: kernel.to_owned(),
            kernel_format,
            initrd: initrd.map(Path::to_owned),
            cmdline: cmdline.to_owned(),
            memory_mib,
            cpus,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::{any, proptest};

    #[test]
    fn sizes() {
        assert_eq!(parse_size_mib("512M"), Ok(512));
        assert_eq!(parse_size_mib("2G"), Ok(2048));
        assert_eq!(parse_size_mib("2GiB"), Ok(2048));
        assert_eq!(parse_size_mib("1024"), Ok(1024));
        assert_eq!(parse_size_mib("4096K"), Ok(4));
        for bad in ["", "M", "1.5G", "-1M", "12X", "99999999999999999999T", "18446744073709551615T"] {
            assert!(matches!(parse_size_mib(bad), Err(ConfigError::BadSize(_))), "{bad}");
        }
    }

    proptest! {
        #[test]
        fn size_parsing_never_panics(s in any::<String>()) {
            let _ = parse_size_mib(&s);
        }
    }

    #[test]
    fn kernels_and_initrds() {
        let dir = tempfile::tempdir().unwrap();
        let elf = dir.path().join("guest.elf");
        std::fs::write(&elf, b"\x7fELF\x02\x01\x01").unwrap();
        assert_eq!(detect_kernel(&elf), Ok(KernelFormat::Elf));
        let mut bz = vec![0u8; 0x300];
        bz[0x1FE..0x200].copy_from_slice(&[0x55, 0xAA]);
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        let bzimage = dir.path().join("vmlinuz");
        std::fs::write(&bzimage, &bz).unwrap();
        assert_eq!(detect_kernel(&bzimage), Ok(KernelFormat::BzImage));
        let junk = dir.path().join("junk");
        std::fs::write(&junk, vec![7u8; 4096]).unwrap();
        assert_eq!(detect_kernel(&junk), Err(ConfigError::KernelFormat(junk.clone())));
        let missing = dir.path().join("missing");
        let err = detect_kernel(&missing).unwrap_err();
        assert!(err.to_string().contains("cargo xtask guest-image"), "{err}");

        let initrd = dir.path().join("initrd");
        std::fs::write(&initrd, vec![0u8; 9 << 20]).unwrap();
        let err = BootSpec::new(&bzimage, Some(&initrd), "", "16M", 1).unwrap_err();
        assert!(matches!(err, ConfigError::InitrdTooLarge { .. }), "{err}");
        assert!(BootSpec::new(&bzimage, Some(&initrd), "", "64M", 1).is_ok());
        assert_eq!(BootSpec::new(&bzimage, None, "", "64M", 0), Err(ConfigError::CpusOutOfRange(0)));
        assert_eq!(BootSpec::new(&bzimage, None, "", "64M", 300), Err(ConfigError::CpusOutOfRange(300)));
        assert!(matches!(
            BootSpec::new(&bzimage, None, "", "8M", 1),
            Err(ConfigError::MemoryOutOfRange { .. })
        ));
        assert!(matches!(
            BootSpec::new(&bzimage, None, &"x".repeat(3000), "64M", 1),
            Err(ConfigError::CmdlineTooLong(_))
        ));
    }
}
