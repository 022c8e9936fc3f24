//! The test guest image: `target/guest/vmlinuz` + `target/guest/initramfs.cpio`.
//!
//! Inputs, all from Debian packages plus this repository:
//! - trixie's `linux-image-6.12.*-amd64` (downloaded, never installed on the host);
//! - bookworm's `busybox-static` as init, shell and tools;
//! - the kernel modules listed in `guest/modules.txt` with their dependency chains;
//! - `guest/rootfs/` (inittab, rcS, profile);
//! - `pleiades-agent`, built as a static binary.
//!
//! Beside it, `initramfs-kvm-host.cpio` is the same image with a second cpio archive appended
//! (the kernel unpacks concatenated archives in order): the modules of
//! `guest/kvm-host-modules.txt` (KVM, 9p) that the base image does not have yet, and
//! `/etc/pleiades/kvm-host-modules`, their load order. Only the KVM host test fixture
//! (`pleiades_tests::kvm_host`) boots it and loads them; the normal image is unchanged.
//!
//! A stamp over all inputs makes a second run with nothing changed a no-op.
//!
//! The no_std test guest (`testguest/`, see `crate::testguest`) is built and installed first,
//! as `testguest.elf`, with its own stamp: it needs no Debian package.

use std::collections::hash_map::DefaultHasher;
use std::fs;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};
use object::Object;
use pleiades_testkit::image::KVM_HOST_INITRAMFS;
use serde::{Deserialize, Serialize};

use crate::apt::Apt;
use crate::cpio::CpioWriter;
use crate::kmod::{Module, ModuleTree};

/// The target triple the agent is built for (statically linked glibc: no dynamic loader in the
/// image, and no musl toolchain needed).
const AGENT_TARGET: &str = "x86_64-unknown-linux-gnu";

/// What `image.json` records about a built image.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Manifest {
    pub stamp: String,
    pub kernel_package: String,
    pub kernel_release: String,
    pub busybox_package: String,
    pub modules: Vec<String>,
    pub initramfs_bytes: u64,
    /// The KVM host's extra modules in load order (in `initramfs-kvm-host.cpio` only).
    pub kvm_host_modules: Vec<String>,
}

/// Builds the image. `root` is the workspace root.
#[derive(Debug)]
pub struct GuestImageBuild {
    pub root: PathBuf,
    pub force: bool,
}

impl GuestImageBuild {
    fn out_dir(&self) -> PathBuf {
        pleiades_testkit::image::default_dir(&self.root)
    }

    pub fn run(&self) -> Result<Manifest> {
        let started = Instant::now();
        let out = self.out_dir();
        let cache = out.join("cache");
        fs::create_dir_all(&cache).with_context(|| format!("cannot create {}", cache.display()))?;

        crate::testguest::install(&self.root, &out, self.force)?;

        let apt = Apt::system();
        let kernel_package = apt.metapackage_target("linux-image-amd64", "trixie")?;
        let kernel_deb = apt.download(&kernel_package, Some("trixie"), &cache)?;
        let busybox_deb = apt.download("busybox-static", None, &cache)?;

        let agent = self.build_agent()?;
        let module_list = self.root.join("guest/modules.txt");
        let kvm_host_list = self.root.join("guest/kvm-host-modules.txt");
        let wanted = read_module_list(&module_list)?;
        let kvm_host_wanted = read_module_list(&kvm_host_list)?;
        let rootfs = self.root.join("guest/rootfs");
        let stamp = stamp_of(&[&kernel_deb, &busybox_deb, &agent, &module_list, &kvm_host_list], &rootfs)?;

        let manifest_path = out.join("image.json");
        if !self.force
            && let Ok(text) = fs::read_to_string(&manifest_path)
            && let Ok(manifest) = serde_json::from_str::<Manifest>(&text)
            && manifest.stamp == stamp
            && out.join("vmlinuz").exists()
            && out.join("initramfs.cpio").exists()
            && out.join(KVM_HOST_INITRAMFS).exists()
        {
            println!("guest image: up to date ({})", out.display());
            return Ok(manifest);
        }

        let kernel_dir = extract(&kernel_deb, &cache)?;
        let busybox_dir = extract(&busybox_deb, &cache)?;
        let modules_root = kernel_dir.join("usr/lib/modules");
        let release = single_subdir(&modules_root)?;
        let tree = ModuleTree::scan(&modules_root.join(&release).join("kernel"))?;

        let bar = ProgressBar::new_spinner().with_style(ProgressStyle::with_template("{spinner} {msg}")?);
        let modules = tree.resolve(&wanted, |name| bar.set_message(format!("kernel module {name}")))?;
        bar.finish_with_message(format!("{} kernel modules resolved", modules.len()));
        // The KVM host's modules: the chains of both lists, less what the base image loads.
        let both: Vec<String> = wanted.iter().chain(&kvm_host_wanted).cloned().collect();
        let kvm_host_modules: Vec<Module> = tree
            .resolve(&both, |_| {})?
            .into_iter()
            .filter(|m| !modules.iter().any(|base| base.name == m.name))
            .collect();

        let busybox = busybox_dir.join("bin/busybox");
        let initramfs = out.join("initramfs.cpio");
        write_initramfs(&initramfs, &busybox, &agent, &rootfs, &modules)?;
        write_kvm_host_initramfs(&out.join(KVM_HOST_INITRAMFS), &initramfs, &kvm_host_modules)?;
        let vmlinuz = kernel_dir.join(format!("boot/vmlinuz-{release}"));
        fs::copy(&vmlinuz, out.join("vmlinuz"))
            .with_context(|| format!("cannot copy {}", vmlinuz.display()))?;

        let manifest = Manifest {
            stamp,
            kernel_package,
            kernel_release: release,
            busybox_package: file_name(&busybox_deb),
            modules: modules.iter().map(|m| m.name.clone()).collect(),
            initramfs_bytes: fs::metadata(&initramfs)?.len(),
            kvm_host_modules: kvm_host_modules.iter().map(|m| m.name.clone()).collect(),
        };
        fs::write(&manifest_path, serde_json::to_string_pretty(&manifest)?)?;
        println!(
            "guest image: built {} ({} MiB initramfs, kernel {}) in {:.1} s",
            out.display(),
            manifest.initramfs_bytes >> 20,
            manifest.kernel_release,
            started.elapsed().as_secs_f64()
        );
        Ok(manifest)
    }

    /// Builds `pleiades-agent` statically linked and returns its path.
    fn build_agent(&self) -> Result<PathBuf> {
        build_agent(&self.root)
    }
}

/// Builds `pleiades-agent` statically linked (no dynamic loader needed in a guest) and returns
/// its path.
pub fn build_agent(root: &Path) -> Result<PathBuf> {
    println!("guest image: building pleiades-agent (static)");
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args([
            "build",
            "--quiet",
            "--package",
            "pleiades-agent",
            "--profile",
            "agent",
            "--target",
            AGENT_TARGET,
        ])
        .env("CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS", "-C target-feature=+crt-static")
        .current_dir(root)
        .status()
        .context("cannot run cargo")?;
    if !status.success() {
        bail!("building pleiades-agent failed ({status})");
    }
    let target_dir = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
    let agent = target_dir.join(AGENT_TARGET).join("agent/pleiades-agent");
    let bytes = fs::read(&agent).with_context(|| format!("cannot read {}", agent.display()))?;
    let elf = object::File::parse(bytes.as_slice()).context("the agent is not an ELF file")?;
    if elf.section_by_name(".interp").is_some() {
        bail!("{} is dynamically linked; the guest has no dynamic loader", agent.display());
    }
    Ok(agent)
}

fn read_module_list(path: &Path) -> Result<Vec<String>> {
    let text = fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(text
        .lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect())
}

/// Unpacks a .deb once into `cache/<deb file stem>/`.
fn extract(deb: &Path, cache: &Path) -> Result<PathBuf> {
    let stem = deb.file_stem().context("bad .deb name")?.to_string_lossy().into_owned();
    let dir = cache.join(&stem);
    let done = dir.join(".extracted");
    if done.exists() {
        return Ok(dir);
    }
    let _ = fs::remove_dir_all(&dir);
    let bar =
        ProgressBar::new_spinner().with_style(ProgressStyle::with_template("{spinner} {msg} {elapsed}")?);
    bar.set_message(format!("unpacking {stem}"));
    bar.enable_steady_tick(std::time::Duration::from_millis(200));
    let status =
        Command::new("dpkg-deb").arg("-x").arg(deb).arg(&dir).status().context("cannot run dpkg-deb")?;
    bar.finish_and_clear();
    if !status.success() {
        bail!("dpkg-deb could not unpack {} ({status}); delete it and run again", deb.display());
    }
    fs::write(&done, b"")?;
    Ok(dir)
}

fn single_subdir(dir: &Path) -> Result<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .with_context(|| format!("cannot read {}", dir.display()))?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    match names.as_slice() {
        [one] => Ok(one.clone()),
        _ => bail!("expected one kernel release in {}, found {names:?}", dir.display()),
    }
}

fn file_name(path: &Path) -> String {
    path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

/// A hash over the named files' contents and every file below `dir` (names and contents).
fn stamp_of(files: &[&Path], dir: &Path) -> Result<String> {
    let mut hasher = DefaultHasher::new();
    env!("CARGO_PKG_VERSION").hash(&mut hasher);
    // The layout code itself is an input too.
    include_str!("guest_image.rs").hash(&mut hasher);
    for file in files {
        file_name(file).hash(&mut hasher);
        fs::read(file).with_context(|| format!("cannot read {}", file.display()))?.hash(&mut hasher);
    }
    for (rel, path) in walk(dir)? {
        rel.hash(&mut hasher);
        if path.is_file() {
            fs::read(&path)?.hash(&mut hasher);
        }
    }
    Ok(format!("{:016x}", hasher.finish()))
}

/// Every entry below `dir` as (relative path, path), parents before children, sorted.
fn walk(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in fs::read_dir(&d).with_context(|| format!("cannot read {}", d.display()))? {
            let path = entry?.path();
            let rel = path.strip_prefix(dir)?.to_string_lossy().into_owned();
            if path.is_dir() {
                stack.push(path.clone());
            }
            out.push((rel, path));
        }
    }
    out.sort();
    Ok(out)
}

fn write_initramfs(
    path: &Path,
    busybox: &Path,
    agent: &Path,
    rootfs: &Path,
    modules: &[Module],
) -> Result<()> {
    let applets = busybox_applets(busybox)?;
    let file = fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut w = CpioWriter::new(std::io::BufWriter::new(file));
    for dir in
        ["bin", "dev", "etc", "etc/init.d", "etc/pleiades", "lib", "lib/modules", "proc", "root", "run"]
    {
        w.dir(dir, 0o755)?;
    }
    for dir in ["sys", "tmp", "usr", "usr/bin", "sbin", "mnt", "var"] {
        w.dir(dir, if dir == "tmp" { 0o1777 } else { 0o755 })?;
    }
    // The kernel opens /dev/console for init before anything mounts devtmpfs.
    w.char_device("dev/console", 0o600, 5, 1)?;
    w.char_device("dev/null", 0o666, 1, 3)?;
    w.file("bin/busybox", 0o755, &fs::read(busybox)?)?;
    for applet in &applets {
        if applet != "busybox" {
            w.symlink(&format!("bin/{applet}"), "busybox")?;
        }
    }
    w.symlink("init", "bin/busybox")?;
    w.file("usr/bin/pleiades-agent", 0o755, &fs::read(agent)?)?;

    let bar = ProgressBar::new(modules.len() as u64)
        .with_style(ProgressStyle::with_template("{bar:30} {pos}/{len} {msg}")?);
    let mut order = String::new();
    for module in modules {
        bar.set_message(module.name.clone());
        let name = format!("{}.ko", module.name);
        w.file(&format!("lib/modules/{name}"), 0o644, &module.data)?;
        order.push_str(&name);
        order.push('\n');
        bar.inc(1);
    }
    bar.finish_and_clear();
    w.file("etc/pleiades/modules", 0o644, order.as_bytes())?;

    for (rel, src) in walk(rootfs)? {
        if src.is_dir() {
            if !matches!(rel.as_str(), "etc" | "etc/init.d") {
                w.dir(&rel, 0o755)?;
            }
        } else {
            let executable = {
                use std::os::unix::fs::PermissionsExt;
                fs::metadata(&src)?.permissions().mode() & 0o111 != 0
            };
            w.file(&rel, if executable { 0o755 } else { 0o644 }, &fs::read(&src)?)?;
        }
    }
    w.finish()?;
    Ok(())
}

/// The KVM host's initramfs: `base` with a second archive appended that adds `modules` to
/// `/lib/modules/` and their load order as `/etc/pleiades/kvm-host-modules`.
fn write_kvm_host_initramfs(path: &Path, base: &Path, modules: &[Module]) -> Result<()> {
    let mut bytes = fs::read(base).with_context(|| format!("cannot read {}", base.display()))?;
    // Each archive starts on a 4-byte boundary (ours end on one).
    bytes.resize(bytes.len().next_multiple_of(4), 0);
    let mut w = CpioWriter::new(bytes);
    let mut order = String::new();
    for module in modules {
        let name = format!("{}.ko", module.name);
        w.file(&format!("lib/modules/{name}"), 0o644, &module.data)?;
        order.push_str(&name);
        order.push('\n');
    }
    w.file("etc/pleiades/kvm-host-modules", 0o644, order.as_bytes())?;
    let bytes = w.finish()?;
    fs::write(path, bytes).with_context(|| format!("cannot write {}", path.display()))
}

/// The applets a busybox binary provides (it runs on the host: same architecture, static).
fn busybox_applets(busybox: &Path) -> Result<Vec<String>> {
    let output = Command::new(busybox)
        .arg("--list")
        .output()
        .with_context(|| format!("cannot run {}", busybox.display()))?;
    if !output.status.success() {
        bail!("{} --list failed", busybox.display());
    }
    let applets: Vec<String> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::trim)
        .filter(|a| !a.is_empty() && a.chars().all(|c| c.is_ascii_alphanumeric() || "-_.[".contains(c)))
        .map(str::to_owned)
        .collect();
    for needed in ["sh", "init", "mount", "insmod", "poweroff"] {
        if !applets.iter().any(|a| a == needed) {
            bail!("busybox lacks the {needed} applet");
        }
    }
    Ok(applets)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_list_skips_comments() {
        let dir = tempfile::tempdir().unwrap();
        let list = dir.path().join("m.txt");
        fs::write(&list, "# header\nvirtio-gpu\n\n  evdev # input events\n").unwrap();
        assert_eq!(read_module_list(&list).unwrap(), ["virtio-gpu", "evdev"]);
    }

    #[test]
    fn kvm_host_image_is_the_base_image_plus_a_second_archive() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.cpio");
        let mut w = CpioWriter::new(Vec::new());
        w.file("etc/hello", 0o644, b"hi").unwrap();
        fs::write(&base, w.finish().unwrap()).unwrap();
        let out = dir.path().join("kvm-host.cpio");
        let module = Module { name: "kvm".into(), data: b"\x7fELF".to_vec() };
        write_kvm_host_initramfs(&out, &base, &[module]).unwrap();
        let (base, out) = (fs::read(&base).unwrap(), fs::read(&out).unwrap());
        assert!(out.starts_with(&base));
        let second = String::from_utf8_lossy(&out[base.len()..]);
        assert!(second.starts_with("070701"), "{second}");
        assert!(second.contains("lib/modules/kvm.ko") && second.contains("kvm.ko\n"), "{second}");
        assert!(second.contains("etc/pleiades/kvm-host-modules") && second.contains("TRAILER!!!"));
    }

    #[test]
    fn stamp_follows_content() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("input");
        fs::write(&file, "a").unwrap();
        let tree = dir.path().join("tree");
        fs::create_dir(&tree).unwrap();
        fs::write(tree.join("x"), "1").unwrap();
        let first = stamp_of(&[&file], &tree).unwrap();
        assert_eq!(first, stamp_of(&[&file], &tree).unwrap());
        fs::write(tree.join("x"), "2").unwrap();
        assert_ne!(first, stamp_of(&[&file], &tree).unwrap());
    }
}
