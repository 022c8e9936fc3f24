//! Loading the guest: kernel, initrd, command line and the boot structures the guest reads.
//!
//! Two entry protocols, chosen by the kernel file's magic:
//! - **bzImage** (Linux): the zero page (`boot_params`) with the E820 map, the command line and
//!   the initrd; the vCPU enters the kernel's 64-bit entry (`code32_start + 0x200`) with `rsi`
//!   pointing at the zero page.
//! - **ELF** (small test guests): segments loaded at their physical addresses, entry at
//!   `e_entry` in 64-bit mode with `rsi` pointing at a PVH `hvm_start_info`.
//!
//! Both get the same CPU state (long mode, identity-mapped low 1 GiB, flat GDT; see
//! [`crate::cpu::regs`]) and the MP table in the BIOS area.

pub mod layout;
pub mod linux;
pub mod mptable;
pub mod pvh;

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::{KernelLoader, bzimage::BzImage, elf::Elf};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use super::memory::{GuestMemory, HIGH_MEMORY_START};

/// Errors while loading the guest.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot open the kernel {path}: {source}; check the path")]
    OpenKernel { path: PathBuf, source: std::io::Error },
    #[error("cannot open the initrd {path}: {source}; check the path")]
    OpenInitrd { path: PathBuf, source: std::io::Error },
    #[error(
        "{path} is neither an ELF nor a bzImage kernel ({reason}); give a bzImage (vmlinuz) or an ELF test guest"
    )]
    BadKernel { path: PathBuf, reason: String },
    #[error("the kernel {path} does not fit in guest memory ({reason}); give the VM more memory")]
    KernelTooLarge { path: PathBuf, reason: String },
    #[error(
        "the initrd ({size} bytes) does not fit in guest memory below {limit:#x} after the kernel; give the VM more memory or a smaller initrd"
    )]
    InitrdTooLarge { size: u64, limit: u64 },
    #[error("cannot read the initrd into guest memory: {0}")]
    InitrdRead(String),
    #[error("bad kernel command line ({reason}): use printable ASCII, at most {max} bytes")]
    Cmdline { reason: String, max: usize },
    #[error("cannot write the boot structures into guest memory: {0}")]
    GuestMemory(String),
}

/// How the boot vCPU enters the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryPoint {
    /// Where the vCPU starts (64-bit mode).
    pub rip: GuestAddress,
    /// What `rsi` points to: the zero page (Linux) or the PVH start info (ELF).
    pub rsi: GuestAddress,
}

/// What the VMM needs to boot: kernel, optional initrd, command line.
#[derive(Debug, Clone, Copy)]
pub struct BootSource<'a> {
    pub kernel: &'a Path,
    pub initrd: Option<&'a Path>,
    pub cmdline: &'a str,
}

const ELF_MAGIC: [u8; 4] = *b"\x7fELF";

/// Loads the kernel (and initrd), writes the boot structures, the MP table and the ACPI tables
/// for `cpus`.
pub fn load(mem: &GuestMemory, source: BootSource<'_>, cpus: u8) -> Result<EntryPoint, BootError> {
    let mut kernel = File::open(source.kernel)
        .map_err(|e| BootError::OpenKernel { path: source.kernel.into(), source: e })?;
    let mut magic = [0u8; 4];
    let is_elf = kernel.read_exact(&mut magic).is_ok() && magic == ELF_MAGIC;
    let bad = |reason: String| BootError::BadKernel { path: source.kernel.into(), reason };
    kernel.seek(SeekFrom::Start(0)).map_err(|e| bad(e.to_string()))?;

    mptable::write(mem, cpus)?;
    let rsdp = crate::acpi::write(mem, cpus).map_err(|e| BootError::GuestMemory(e.to_string()))?;
    layout::write_page_tables_and_gdt(mem)?;

    if is_elf {
        let cmdline = build_cmdline(source.cmdline, layout::CMDLINE_MAX)?;
        let loaded = Elf::load(mem, None, &mut kernel, Some(GuestAddress(HIGH_MEMORY_START)))
            .map_err(|e| classify(source.kernel, e))?;
        linux_loader::loader::load_cmdline(mem, layout::CMDLINE_ADDR, &cmdline)
            .map_err(|e| BootError::GuestMemory(e.to_string()))?;
        let start_info = pvh::write_start_info(mem, layout::CMDLINE_ADDR, rsdp, mem_size(mem))?;
        if source.initrd.is_some() {
            tracing::warn!("vmm: an ELF guest gets no initrd; ignoring it");
        }
        Ok(EntryPoint { rip: loaded.kernel_load, rsi: start_info })
    } else {
        let loaded = BzImage::load(mem, None, &mut kernel, Some(GuestAddress(HIGH_MEMORY_START)))
            .map_err(|e| classify(source.kernel, e))?;
        let header = loaded.setup_header.ok_or_else(|| bad("no setup header".into()))?;
        let max = (header.cmdline_size as usize).clamp(1, layout::CMDLINE_MAX);
        let cmdline = build_cmdline(source.cmdline, max)?;
        linux_loader::loader::load_cmdline(mem, layout::CMDLINE_ADDR, &cmdline)
            .map_err(|e| BootError::GuestMemory(e.to_string()))?;
        let initrd = match source.initrd {
            Some(path) => Some(load_initrd(mem, path, loaded.kernel_end, header.initrd_addr_max)?),
            None => None,
        };
        let cmdline_len = cmdline.as_cstring().map(|c| c.as_bytes().len()).unwrap_or(0);
        linux::write_zero_page(mem, header, cmdline_len, initrd, rsdp, mem_size(mem))?;
        Ok(EntryPoint {
            rip: loaded.kernel_load.unchecked_add(linux::STARTUP_64_OFFSET),
            rsi: layout::ZERO_PAGE_ADDR,
        })
    }
}

fn classify(path: &Path, e: linux_loader::loader::Error) -> BootError {
    use linux_loader::loader::{Error, bzimage, elf};
    let reason = e.to_string();
    match e {
        Error::Elf(elf::Error::ReadKernelImage)
        | Error::Bzimage(bzimage::Error::ReadBzImageCompressedKernel)
        | Error::MemoryOverflow => BootError::KernelTooLarge { path: path.into(), reason },
        _ => BootError::BadKernel { path: path.into(), reason },
    }
}

/// The total RAM size (all regions).
pub fn mem_size(mem: &GuestMemory) -> u64 {
    use vm_memory::GuestMemoryRegion;
    mem.iter().map(|r| r.len()).sum()
}

fn build_cmdline(text: &str, max: usize) -> Result<Cmdline, BootError> {
    let err = |reason: String| BootError::Cmdline { reason, max: max - 1 };
    if text.len() >= max {
        return Err(err(format!("it is {} bytes long", text.len())));
    }
    let mut cmdline = Cmdline::new(max).map_err(|e| err(e.to_string()))?;
    if !text.trim().is_empty() {
        cmdline.insert_str(text.trim()).map_err(|e| err(e.to_string()))?;
    }
    Ok(cmdline)
}

/// A loaded initrd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Initrd {
    pub addr: GuestAddress,
    pub size: u64,
}

/// Places the initrd as high as possible below `addr_max` and low RAM's end, above the kernel.
fn load_initrd(mem: &GuestMemory, path: &Path, kernel_end: u64, addr_max: u32) -> Result<Initrd, BootError> {
    let mut file = File::open(path).map_err(|source| BootError::OpenInitrd { path: path.into(), source })?;
    let size = file.metadata().map_err(|source| BootError::OpenInitrd { path: path.into(), source })?.len();
    let limit = initrd_limit(mem_size(mem), addr_max);
    let addr = initrd_address(size, kernel_end, limit).ok_or(BootError::InitrdTooLarge { size, limit })?;
    mem.read_exact_volatile_from(addr, &mut file, size as usize)
        .map_err(|e| BootError::InitrdRead(e.to_string()))?;
    Ok(Initrd { addr, size })
}

/// The first byte the initrd must stay below.
pub fn initrd_limit(mem_size: u64, addr_max: u32) -> u64 {
    let addr_max = if addr_max == 0 { 0x37ff_ffff } else { u64::from(addr_max) };
    super::memory::low_ram_end(mem_size).min(addr_max + 1)
}

/// The page-aligned address of an initrd of `size` bytes ending at or below `limit`, above
/// `kernel_end`; `None` when it does not fit.
pub fn initrd_address(size: u64, kernel_end: u64, limit: u64) -> Option<GuestAddress> {
    let start = limit.checked_sub(size)? & !0xfff;
    (start >= kernel_end && size > 0).then_some(GuestAddress(start))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn initrds_go_high_and_must_fit() {
        assert_eq!(initrd_limit(256 << 20, 0x37ff_ffff), 256 << 20);
        assert_eq!(initrd_limit(2 << 30, 0x37ff_ffff), 0x3800_0000);
        assert_eq!(initrd_address(0x1800, 0x20_0000, 0x100_0000), Some(GuestAddress(0xff_e000)));
        assert_eq!(initrd_address(0x100_0000, 0x20_0000, 0x100_0000), None);
        assert_eq!(initrd_address(u64::MAX, 0, 0x100_0000), None);
    }

    #[test]
    fn command_lines_are_validated() {
        assert!(build_cmdline("console=ttyS0 panic=-1", 2048).is_ok());
        assert!(matches!(build_cmdline(&"x".repeat(3000), 2048), Err(BootError::Cmdline { .. })));
        assert!(matches!(build_cmdline("a\u{1}b", 2048), Err(BootError::Cmdline { .. })));
        assert!(build_cmdline("", 2048).is_ok());
    }
}
