//! The no_std test guest (`testguest/`): built for the host target with its own link script,
//! checked (a static ELF64 executable at 1 MiB with a PVH note), and installed as
//! `target/guest/testguest.elf`.
//!
//! A stamp over its sources (and this file) in `target/guest/testguest.json` makes a second
//! run with nothing changed a no-op that does not even start cargo.

use std::collections::hash_map::DefaultHasher;
use std::fs;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};
use object::{Object, ObjectKind, ObjectSection, ObjectSegment};
use serde::{Deserialize, Serialize};

/// The guest is built for the host triple (the only one installed) with its own flags.
const TARGET: &str = "x86_64-unknown-linux-gnu";
/// `XEN_ELFNOTE_PHYS32_ENTRY`.
const PVH_NOTE_TYPE: u32 = 18;
/// Where the guest is linked (its link script).
const LOAD_ADDRESS: u64 = 0x10_0000;

/// What `testguest.json` records.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct TestGuestManifest {
    pub stamp: String,
    pub bytes: u64,
    pub entry64: u64,
    pub pvh_entry32: u64,
}

/// Builds and installs the test guest into `out` unless its stamp is unchanged.
pub fn install(root: &Path, out: &Path, force: bool) -> Result<TestGuestManifest> {
    let crate_dir = root.join("testguest");
    let stamp = sources_stamp(&crate_dir)?;
    let elf_path = out.join("testguest.elf");
    let manifest_path = out.join("testguest.json");
    if !force
        && let Ok(text) = fs::read_to_string(&manifest_path)
        && let Ok(manifest) = serde_json::from_str::<TestGuestManifest>(&text)
        && manifest.stamp == stamp
        && elf_path.is_file()
    {
        println!("test guest: up to date ({})", elf_path.display());
        return Ok(manifest);
    }

    println!("test guest: building pleiades-testguest (no_std, release)");
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| root.join("target"), PathBuf::from)
        .join("testguest");
    // The guest's flags come from testguest/.cargo/config.toml (found because cargo runs in
    // that directory); flags from the environment would replace them.
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["build", "--quiet", "--release", "--target", TARGET, "--target-dir"])
        .arg(&target_dir)
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_BUILD_RUSTFLAGS")
        .env_remove("CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS")
        .current_dir(&crate_dir)
        .status()
        .context("cannot run cargo")?;
    if !status.success() {
        bail!("building the test guest failed ({status})");
    }
    let built = target_dir.join(TARGET).join("release/testguest");
    let bytes = fs::read(&built).with_context(|| format!("cannot read {}", built.display()))?;
    let (entry64, pvh_entry32) =
        check_elf(&bytes).with_context(|| format!("{} is not bootable", built.display()))?;

    fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    fs::write(&elf_path, &bytes).with_context(|| format!("cannot write {}", elf_path.display()))?;
    let manifest = TestGuestManifest { stamp, bytes: bytes.len() as u64, entry64, pvh_entry32 };
    fs::write(&manifest_path, serde_json::to_string_pretty(&manifest)?)?;
    println!(
        "test guest: installed {} ({} KiB, entry {entry64:#x}, PVH entry {pvh_entry32:#x})",
        elf_path.display(),
        bytes.len() >> 10
    );
    Ok(manifest)
}

/// Checks the boot contract's shape: a static ELF64 executable loaded at 1 MiB or above, with
/// a PVH entry note. Returns (64-bit entry, PVH 32-bit entry).
pub fn check_elf(bytes: &[u8]) -> Result<(u64, u64)> {
    let elf = object::File::parse(bytes).context("not an ELF file")?;
    ensure!(elf.is_64(), "not a 64-bit ELF");
    ensure!(elf.kind() == ObjectKind::Executable, "not a fixed-address executable ({:?})", elf.kind());
    ensure!(elf.section_by_name(".interp").is_none(), "dynamically linked");
    let lowest = elf.segments().map(|s| s.address()).min().context("no loadable segments")?;
    ensure!(lowest >= LOAD_ADDRESS, "a segment is loaded at {lowest:#x}, below 1 MiB");
    let note = elf.section_by_name(".note.pvh").context("no .note.pvh section")?;
    let pvh = pvh_entry(note.data()?).context("no XEN_ELFNOTE_PHYS32_ENTRY note")?;
    ensure!(
        (LOAD_ADDRESS..1 << 32).contains(&pvh),
        "PVH entry {pvh:#x} is not a 32-bit address in the image"
    );
    Ok((elf.entry(), pvh))
}

/// The PVH entry from a note section (4-byte aligned notes).
fn pvh_entry(mut data: &[u8]) -> Option<u64> {
    let word = |d: &[u8], at: usize| -> Option<u32> {
        Some(u32::from_le_bytes(d.get(at..at + 4)?.try_into().ok()?))
    };
    while data.len() >= 12 {
        let (namesz, descsz, kind) = (word(data, 0)? as usize, word(data, 4)? as usize, word(data, 8)?);
        let name_end = 12 + namesz.next_multiple_of(4);
        let desc = data.get(name_end..name_end + descsz)?;
        if kind == PVH_NOTE_TYPE && data.get(12..12 + namesz)? == b"Xen\0" {
            return match desc.len() {
                4 => Some(u64::from(word(desc, 0)?)),
                8 => Some(u64::from_le_bytes(desc.try_into().ok()?)),
                _ => None,
            };
        }
        data = data.get(name_end + descsz.next_multiple_of(4)..)?;
    }
    None
}

/// A hash over the guest's sources, manifest, link script and build flags, and this builder.
fn sources_stamp(crate_dir: &Path) -> Result<String> {
    let mut hasher = DefaultHasher::new();
    include_str!("testguest.rs").hash(&mut hasher);
    let mut files = vec![
        crate_dir.join("Cargo.toml"),
        crate_dir.join("Cargo.lock"),
        crate_dir.join("build.rs"),
        crate_dir.join("link.ld"),
        crate_dir.join(".cargo/config.toml"),
    ];
    let src = crate_dir.join("src");
    let mut sources: Vec<PathBuf> = fs::read_dir(&src)
        .with_context(|| format!("cannot read {}", src.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    sources.sort();
    files.extend(sources);
    for file in files {
        if let Ok(bytes) = fs::read(&file) {
            file.strip_prefix(crate_dir).unwrap_or(&file).to_string_lossy().hash(&mut hasher);
            bytes.hash(&mut hasher);
        }
    }
    Ok(format!("{:016x}", hasher.finish()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_pvh_note_among_others() {
        let mut notes = Vec::new();
        // A GNU note first, then Xen's entry note with an 8-byte descriptor.
        notes.extend_from_slice(&[4, 0, 0, 0, 4, 0, 0, 0, 1, 0, 0, 0]);
        notes.extend_from_slice(b"GNU\0");
        notes.extend_from_slice(&[0xAA; 4]);
        notes.extend_from_slice(&[4, 0, 0, 0, 8, 0, 0, 0, 18, 0, 0, 0]);
        notes.extend_from_slice(b"Xen\0");
        notes.extend_from_slice(&0x10_0000u64.to_le_bytes());
        assert_eq!(pvh_entry(&notes), Some(0x10_0000));
        assert_eq!(pvh_entry(&notes[..20]), None);
        assert_eq!(pvh_entry(b"junk"), None);
    }

    #[test]
    fn rejects_an_ordinary_executable() {
        let me = fs::read(std::env::current_exe().unwrap()).unwrap();
        assert!(check_elf(&me).is_err());
    }
}
