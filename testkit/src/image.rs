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

/// Environment variable that overrides where the desktop image is.
pub const DESKTOP_DIR_ENV: &str = "PLEIADES_DESKTOP_DIR";

/// The graphical desktop image built by `cargo xtask desktop-image` (`target/desktop/`).
#[derive(Debug, Clone)]
pub struct DesktopImage {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// The disk template (qcow2): the root filesystem.
    pub disk: PathBuf,
    /// The kernel command line it boots with (from `desktop.json`).
    pub cmdline: String,
    /// The desktop user, logged in automatically.
    pub user: String,
}

/// Why the desktop image cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("the desktop image is missing or incomplete ({why}). Build it with `cargo xtask desktop-image`")]
pub struct MissingDesktopImage {
    pub why: String,
}

impl DesktopImage {
    /// The image in `$PLEIADES_DESKTOP_DIR`, or `target/desktop` of this workspace.
    pub fn locate() -> Result<Self, MissingDesktopImage> {
        let dir = std::env::var_os(DESKTOP_DIR_ENV)
            .map(PathBuf::from)
            .unwrap_or_else(|| workspace_root().join("target").join("desktop"));
        let manifest = dir.join("desktop.json");
        let missing = |why: String| MissingDesktopImage { why };
        let text = std::fs::read_to_string(&manifest)
            .map_err(|e| missing(format!("{}: {e}", manifest.display())))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| missing(format!("{}: {e}", manifest.display())))?;
        let field = |name: &str| {
            json[name]
                .as_str()
                .map(str::to_owned)
                .ok_or_else(|| missing(format!("no {name} in {}", manifest.display())))
        };
        let image = Self {
            kernel: dir.join("vmlinuz"),
            initrd: dir.join("initrd.img"),
            disk: dir.join("desktop.qcow2"),
            cmdline: field("cmdline")?,
            user: field("user")?,
        };
        for path in [&image.kernel, &image.initrd, &image.disk] {
            if !path.is_file() {
                return Err(missing(format!("{} does not exist", path.display())));
            }
        }
        Ok(image)
    }
}
