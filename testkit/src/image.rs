//! Locating the test guest image.

use std::path::{Path, PathBuf};

use crate::workspace_root;

/// Environment variable that overrides where the image is.
pub const GUEST_DIR_ENV: &str = "PLEIADES_GUEST_DIR";

/// The image built by `cargo xtask guest-image`.
#[derive(Debug, Clone)]
pub struct GuestImage {
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
}

/// `target/guest` below the workspace root.
pub fn default_dir(workspace_root: &Path) -> PathBuf {
    workspace_root.join("target").join("guest")
}

/// Why the image cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("the test guest image is missing: {missing} does not exist. Build it with `cargo xtask guest-image`")]
pub struct MissingImage {
    pub missing: PathBuf,
}

/// The KVM host's initramfs (`cargo xtask guest-image` writes it beside `initramfs.cpio`): the
/// test image with the modules of `guest/kvm-host-modules.txt` appended as a second archive.
pub const KVM_HOST_INITRAMFS: &str = "initramfs-kvm-host.cpio";

/// `$PLEIADES_GUEST_DIR`, or `target/guest` of this workspace.
fn guest_dir() -> PathBuf {
    std::env::var_os(GUEST_DIR_ENV).map(PathBuf::from).unwrap_or_else(|| default_dir(&workspace_root()))
}

/// The no_std test guest (`testguest.elf`, built by `cargo xtask guest-image`) in
/// `$PLEIADES_GUEST_DIR` or `target/guest`.
pub fn testguest_elf() -> Result<PathBuf, MissingImage> {
    let elf = guest_dir().join("testguest.elf");
    if elf.is_file() { Ok(elf) } else { Err(MissingImage { missing: elf }) }
}

/// The KVM host's initramfs ([`KVM_HOST_INITRAMFS`]) in `$PLEIADES_GUEST_DIR` or `target/guest`.
pub fn kvm_host_initramfs() -> Result<PathBuf, MissingImage> {
    let path = guest_dir().join(KVM_HOST_INITRAMFS);
    if path.is_file() { Ok(path) } else { Err(MissingImage { missing: path }) }
}

impl GuestImage {
    /// The image in `$PLEIADES_GUEST_DIR`, or `target/guest` of this workspace.
    pub fn locate() -> Result<Self, MissingImage> {
        Self::in_dir(&guest_dir())
    }

    /// The image in `dir`.
    pub fn in_dir(dir: &Path) -> Result<Self, MissingImage> {
        let image = Self { kernel: dir.join("vmlinuz"), initramfs: dir.join("initramfs.cpio") };
        for path in [&image.kernel, &image.initramfs] {
            if !path.is_file() {
                return Err(MissingImage { missing: path.clone() });
            }
        }
        Ok(image)
    }
}
