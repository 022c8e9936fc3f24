//! Disk templates for tests: an ext4 filesystem made from files with `mkfs.ext4 -d`
//! (e2fsprogs), converted to qcow2 by `qemu-img`. The test image's init mounts a desktop's
//! disk (`/dev/vda`) on `/home`.

use std::path::Path;
use std::process::Command;

/// Writes a qcow2 template at `path`: an ext4 filesystem of `size_mib` holding `files`
/// (name in the filesystem's root, content).
pub fn ext4_template(path: &Path, size_mib: u32, files: &[(&str, &str)]) -> Result<(), String> {
    let work = tempfile::tempdir().map_err(|e| e.to_string())?;
    let root = work.path().join("root");
    std::fs::create_dir(&root).map_err(|e| e.to_string())?;
    for (name, content) in files {
        std::fs::write(root.join(name), content).map_err(|e| e.to_string())?;
    }
    let raw = work.path().join("fs.raw");
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "home", "-E", "root_owner=0:0", "-d"])
        .arg(&root)
        .arg(&raw)
        .arg(format!("{size_mib}M")))?;
    run(Command::new("qemu-img").args(["convert", "-q", "-O", "qcow2"]).arg(&raw).arg(path))
}

/// Writes a raw ext4 filesystem image of `size_mib` at `path` holding `files` (name in its
/// root, content): what a USB stick holds.
pub fn ext4_raw(path: &Path, size_mib: u32, files: &[(&str, &[u8])]) -> Result<(), String> {
    let work = tempfile::tempdir().map_err(|e| e.to_string())?;
    let root = work.path().join("root");
    std::fs::create_dir(&root).map_err(|e| e.to_string())?;
    for (name, content) in files {
        std::fs::write(root.join(name), content).map_err(|e| e.to_string())?;
    }
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "stick", "-E", "root_owner=0:0", "-d"])
        .arg(&root)
        .arg(path)
        .arg(format!("{size_mib}M")))
}

/// A file of a raw ext4 image, read without mounting it (`debugfs`, e2fsprogs).
pub fn ext4_read(image: &Path, name: &str) -> Result<Vec<u8>, String> {
    let out = Command::new("debugfs")
        .args(["-R", &format!("cat /{name}")])
        .arg(image)
        .output()
        .map_err(|e| format!("cannot run debugfs: {e} (./dev deps installs e2fsprogs)"))?;
    if !out.status.success() {
        return Err(format!("debugfs failed: {}", String::from_utf8_lossy(&out.stderr).trim()));
    }
    Ok(out.stdout)
}

/// Lowercase hex SHA-256 of `bytes` (as `sha256sum` prints it).
pub fn sha256_hex(bytes: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, bytes).as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// `e2fsck -n -f` of a raw ext4 image: its output when the file system is not whole.
pub fn ext4_check(image: &Path) -> Result<(), String> {
    let out = Command::new("e2fsck").args(["-n", "-f"]).arg(image).output().map_err(|e| e.to_string())?;
    if out.status.success() { Ok(()) } else { Err(String::from_utf8_lossy(&out.stdout).into_owned()) }
}

/// The guest shell command that mounts ext4 `dev`, prints `sha256sum` of `read`, writes `text`
/// and a newline into `written`, and unmounts it (synced): what a person does with a stick.
pub fn mount_read_write(dev: &str, read: &str, written: &str, text: &str) -> String {
    format!(
        "mkdir -p /mnt/stick && mount -t ext4 {dev} /mnt/stick && sha256sum /mnt/stick/{read} && \
         echo '{text}' > /mnt/stick/{written} && sync && umount /mnt/stick"
    )
}

fn run(command: &mut Command) -> Result<(), String> {
    let output =
        command.output().map_err(|e| format!("cannot run {command:?}: {e} (./dev deps installs it)"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!("{command:?} failed: {}", String::from_utf8_lossy(&output.stderr).trim()))
    }
}
