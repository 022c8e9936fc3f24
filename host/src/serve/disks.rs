//! Desktops' disks on a host: linked clones, as oVirt's thin-provisioned VMs and Horizon's
//! linked clones are.
//!
//! - A **template** is an image's disk, named by its content (SHA-256). The host keeps its own
//!   read-only copy, `STATE_DIR/templates/<sha256>.<format>`, made once from the path the
//!   broker gives (a shared path): the bytes are hashed while they are copied and the copy is
//!   kept only if the hash is the image's, so what desktops boot from is what the admin
//!   published, whatever happens to the shared file later.
//! - Each desktop has its own **overlay**, `STATE_DIR/disks/<desktop id>.qcow2`, a qcow2 file
//!   whose backing file is the template: it holds only the blocks the desktop wrote. Overlays
//!   live outside the desktop's run directory, so a failed start never takes a disk with it.
//!
//! `start` and `restart` keep the overlay (a persistent desktop's files survive restarts of
//! the desktop and of this daemon); `recycle` replaces it with a fresh one on the image the
//! command names, which is how a floating desktop reverts at logout and how a pool's new
//! template version ("recompose") reaches it.

use std::io::BufReader;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use pleiades_protocol::hostapi::{VmImage, template_sha256};

use crate::vm::disk::DiskFormat;

/// The template store and the overlays under a host's state directory.
#[derive(Debug, Clone)]
pub struct DiskStore {
    templates: PathBuf,
    overlays: PathBuf,
    /// Held while a template is copied: desktops of one pool start at once, and the second
    /// must find the first's copy, not race it.
    copying: std::sync::Arc<std::sync::Mutex<()>>,
}

impl DiskStore {
    pub fn new(state_dir: &Path) -> Self {
        Self {
            templates: state_dir.join("templates"),
            overlays: state_dir.join("disks"),
            copying: Default::default(),
        }
    }

    /// The image's disk as this host keeps it: its path and SHA-256, checked for form.
    pub fn check(image: &VmImage) -> Result<Option<(&Path, &str)>, String> {
        let Some(disk) = image.disk.as_deref() else { return Ok(None) };
        let sha = image.disk_sha256.as_deref().unwrap_or_default();
        if sha.len() != 64 || !sha.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
            return Err(format!(
                "image {}: its disk has no valid SHA-256 (add the image again with `pleiades-broker image add --disk`)",
                image.name
            ));
        }
        if !Path::new(disk).is_absolute() {
            return Err(format!("image {}: the disk {disk:?} is not an absolute path", image.name));
        }
        Ok(Some((Path::new(disk), sha)))
    }

    /// The host's verified copy of a template, made on first use. Blocking (hashes and copies
    /// the whole file the first time).
    pub fn template(&self, source: &Path, sha256: &str) -> Result<PathBuf, String> {
        let _one_at_a_time = self.copying.lock().unwrap_or_else(|p| p.into_inner());
        std::fs::create_dir_all(&self.templates)
            .map_err(|e| format!("cannot create {}: {e}", self.templates.display()))?;
        for format in [DiskFormat::Qcow2, DiskFormat::Raw] {
            let kept = self.templates.join(format!("{sha256}.{}", format.name()));
            if kept.is_file() {
                return Ok(kept);
            }
        }
        let format = DiskFormat::detect(source)
            .map_err(|e| format!("cannot read the template {}: {e}", source.display()))?;
        if format == DiskFormat::Qcow2 && backing_file(source)?.is_some() {
            return Err(format!(
                "the template {} is itself an overlay: flatten it first (qemu-img convert -O qcow2 …)",
                source.display()
            ));
        }
        let kept = self.templates.join(format!("{sha256}.{}", format.name()));
        let partial = self.templates.join(format!(".{sha256}.partial"));
        let copied = (|| -> std::io::Result<String> {
            let mut from = BufReader::with_capacity(1 << 20, std::fs::File::open(source)?);
            let mut to = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(&partial)?);
            let sha = template_sha256(&mut from, &mut to)?;
            to.into_inner().map_err(std::io::IntoInnerError::into_error)?.sync_all()?;
            Ok(sha)
        })();
        let result = match copied {
            Ok(actual) if actual == sha256 => {
                std::fs::set_permissions(&partial, std::fs::Permissions::from_mode(0o444))
                    .and_then(|()| std::fs::rename(&partial, &kept))
                    .map_err(|e| format!("cannot keep the template in {}: {e}", kept.display()))
            }
            Ok(actual) => Err(format!(
                "the template {} has SHA-256 {actual}, not the image's {sha256}: it changed since it was published",
                source.display()
            )),
            Err(e) => Err(format!("cannot copy the template {}: {e}", source.display())),
        };
        if result.is_err() {
            let _ = std::fs::remove_file(&partial);
        }
        result?;
        tracing::info!(template = %kept.display(), from = %source.display(), "template verified and kept");
        Ok(kept)
    }

    /// The desktop's overlay file.
    pub fn overlay_path(&self, desktop_id: &str) -> PathBuf {
        self.overlays.join(format!("{desktop_id}.qcow2"))
    }

    /// The desktop's overlay on `template`: kept if it exists, unless `fresh`, which makes a
    /// new, empty one (the old one is replaced only once the new one exists).
    pub fn overlay(&self, desktop_id: &str, template: &Path, fresh: bool) -> Result<PathBuf, String> {
        let path = self.overlay_path(desktop_id);
        if path.is_file() && !fresh {
            return Ok(path);
        }
        std::fs::create_dir_all(&self.overlays)
            .map_err(|e| format!("cannot create {}: {e}", self.overlays.display()))?;
        let format = DiskFormat::detect(template)
            .map_err(|e| format!("cannot read the template {}: {e}", template.display()))?;
        let partial = self.overlays.join(format!(".{desktop_id}.partial"));
        let _ = std::fs::remove_file(&partial);
        let output = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", format.name(), "-b"])
            .arg(template)
            .arg(&partial)
            .output()
            .map_err(|e| format!("cannot run qemu-img (apt install qemu-utils): {e}"))?;
        if !output.status.success() {
            let _ = std::fs::remove_file(&partial);
            return Err(format!(
                "qemu-img could not create an overlay on {}: {}",
                template.display(),
                String::from_utf8_lossy(&output.stderr).trim()
            ));
        }
        std::fs::set_permissions(&partial, std::fs::Permissions::from_mode(0o600))
            .and_then(|()| std::fs::rename(&partial, &path))
            .map_err(|e| format!("cannot put the overlay at {}: {e}", path.display()))?;
        tracing::info!(desktop = desktop_id, template = %template.display(), "fresh overlay");
        Ok(path)
    }

    /// Bytes the desktop's overlay takes on the host's disk (allocated, not apparent).
    pub fn usage(&self, desktop_id: &str) -> Option<u64> {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(self.overlay_path(desktop_id)).ok().map(|m| m.blocks() * 512)
    }
}

/// A qcow2 file's backing file, as `qemu-img info` reports it.
pub fn backing_file(image: &Path) -> Result<Option<PathBuf>, String> {
    let output = Command::new("qemu-img")
        .args(["info", "--output=json", "-U"])
        .arg(image)
        .output()
        .map_err(|e| format!("cannot run qemu-img (apt install qemu-utils): {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "qemu-img cannot read {}: {}",
            image.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    let info: serde_json::Value =
        serde_json::from_slice(&output.stdout).map_err(|e| format!("qemu-img info: {e}"))?;
    Ok(info["full-backing-filename"].as_str().or(info["backing-filename"].as_str()).map(PathBuf::from))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn image(disk: Option<&str>, sha: Option<&str>) -> VmImage {
        VmImage {
            id: "i-1".into(),
            name: "desk".into(),
            kernel: "/k".into(),
            initrd: "/i".into(),
            cmdline: String::new(),
            disk: disk.map(Into::into),
            disk_sha256: sha.map(Into::into),
            vcpus: 1,
            memory_mib: 256,
        }
    }

    fn sha_of(path: &Path) -> String {
        template_sha256(&mut std::fs::File::open(path).unwrap(), &mut std::io::sink()).unwrap()
    }

    #[test]
    fn images_without_a_valid_hash_or_with_a_relative_disk_are_refused() {
        assert_eq!(DiskStore::check(&image(None, None)), Ok(None));
        let good = "a".repeat(64);
        assert!(DiskStore::check(&image(Some("/t.qcow2"), None)).unwrap_err().contains("SHA-256"));
        assert!(DiskStore::check(&image(Some("/t.qcow2"), Some("abc"))).is_err());
        assert!(DiskStore::check(&image(Some("/t.qcow2"), Some(&"A".repeat(64)))).is_err());
        assert!(DiskStore::check(&image(Some("t.qcow2"), Some(&good))).unwrap_err().contains("absolute"));
        assert_eq!(
            DiskStore::check(&image(Some("/t.qcow2"), Some(&good))),
            Ok(Some((Path::new("/t.qcow2"), good.as_str())))
        );
    }

    #[test]
    fn a_template_is_kept_only_with_the_published_hash_and_overlays_stack_on_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = DiskStore::new(&dir.path().join("state"));
        let source = dir.path().join("template.raw");
        std::fs::write(&source, vec![7u8; 1 << 20]).unwrap();
        let sha = sha_of(&source);

        let wrong = "0".repeat(64);
        let err = store.template(&source, &wrong).unwrap_err();
        assert!(err.contains("changed since it was published"), "{err}");
        assert_eq!(std::fs::read_dir(dir.path().join("state/templates")).unwrap().count(), 0, "nothing kept");

        let kept = store.template(&source, &sha).unwrap();
        assert_eq!(kept, dir.path().join(format!("state/templates/{sha}.raw")));
        assert_eq!(sha_of(&kept), sha);
        assert_eq!(std::fs::metadata(&kept).unwrap().permissions().mode() & 0o777, 0o444);
        // The shared file changes: the host's copy does not.
        std::fs::write(&source, b"changed").unwrap();
        assert_eq!(store.template(&source, &sha).unwrap(), kept);
        assert_eq!(sha_of(&kept), sha);

        let overlay = store.overlay("d-1", &kept, false).unwrap();
        assert_eq!(backing_file(&overlay).unwrap(), Some(kept.clone()));
        let small = store.usage("d-1").unwrap();
        assert!(small < 1 << 20, "an overlay holds only what the desktop writes: {small} bytes");
        // Kept unless fresh.
        std::fs::OpenOptions::new().append(true).open(&overlay).unwrap().write_all(&[1; 4096]).unwrap();
        let before = std::fs::metadata(&overlay).unwrap().len();
        store.overlay("d-1", &kept, false).unwrap();
        assert_eq!(std::fs::metadata(&overlay).unwrap().len(), before);
        store.overlay("d-1", &kept, true).unwrap();
        assert!(std::fs::metadata(&overlay).unwrap().len() < before, "a fresh overlay is empty again");

        // Desktops starting at once: one copy, the others wait for it and use it.
        let other = tempfile::tempdir().unwrap();
        let store = DiskStore::new(other.path());
        let source2 = dir.path().join("template2.raw");
        std::fs::write(&source2, vec![3u8; 4 << 20]).unwrap();
        let sha2 = sha_of(&source2);
        let kept: Vec<PathBuf> = std::thread::scope(|s| {
            let runs: Vec<_> = (0..4).map(|_| s.spawn(|| store.template(&source2, &sha2).unwrap())).collect();
            runs.into_iter().map(|r| r.join().unwrap()).collect()
        });
        assert!(kept.iter().all(|k| *k == kept[0]));
        assert_eq!(sha_of(&kept[0]), sha2);
        assert_eq!(std::fs::read_dir(other.path().join("templates")).unwrap().count(), 1);

        // An overlay is not a template.
        let err = store.template(&overlay, &sha_of(&overlay)).unwrap_err();
        assert!(err.contains("itself an overlay"), "{err}");
    }
}
