//! Kernel modules: which files a set of modules needs, and in which order to load them.
//!
//! Debian's kernel package ships its modules xz-compressed and without `modules.dep`. Instead of
//! running `depmod`, the dependency chain is read from each module's own `.modinfo` ELF section
//! (`depends=` is what depmod itself uses), and the modules are decompressed on the host so that
//! busybox's `insmod` loads them as they are.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use object::{Object, ObjectSection};

/// A module to put into the image.
#[derive(Debug, Clone)]
pub struct Module {
    /// Canonical name (dashes folded to underscores), e.g. `virtio_gpu`.
    pub name: String,
    /// The decompressed `.ko`.
    pub data: Vec<u8>,
}

/// All module files of an unpacked kernel, by canonical name.
#[derive(Debug)]
pub struct ModuleTree {
    files: HashMap<String, PathBuf>,
}

/// Folds a module name the way the kernel does: `virtio-gpu` and `virtio_gpu` are one module.
pub fn canonical(name: &str) -> String {
    name.replace('-', "_")
}

impl ModuleTree {
    /// Indexes every `*.ko`, `*.ko.xz` below `dir` (e.g. `.../lib/modules/6.12.x-amd64/kernel`).
    pub fn scan(dir: &Path) -> Result<Self> {
        let mut files = HashMap::new();
        let mut stack = vec![dir.to_owned()];
        while let Some(d) = stack.pop() {
            for entry in fs::read_dir(&d).with_context(|| format!("cannot read {}", d.display()))? {
                let path = entry?.path();
                if path.is_dir() {
                    stack.push(path);
                } else if let Some(name) = module_name_of(&path) {
                    files.insert(canonical(&name), path);
                }
            }
        }
        if files.is_empty() {
            bail!("no kernel modules below {}", dir.display());
        }
        Ok(Self { files })
    }

    /// Resolves `wanted` and everything it depends on, in load order (dependencies first).
    pub fn resolve(&self, wanted: &[String], mut progress: impl FnMut(&str)) -> Result<Vec<Module>> {
        let mut loaded: BTreeMap<String, usize> = BTreeMap::new();
        let mut order: Vec<Module> = Vec::new();
        for name in wanted {
            self.visit(&canonical(name), &mut Vec::new(), &mut loaded, &mut order, &mut progress)?;
        }
        Ok(order)
    }

    fn visit(
        &self,
        name: &str,
        chain: &mut Vec<String>,
        loaded: &mut BTreeMap<String, usize>,
        order: &mut Vec<Module>,
        progress: &mut impl FnMut(&str),
    ) -> Result<()> {
        if loaded.contains_key(name) {
            return Ok(());
        }
        if chain.iter().any(|c| c == name) {
            bail!("kernel modules depend on each other in a cycle: {} -> {name}", chain.join(" -> "));
        }
        let path = self.files.get(name).with_context(|| {
            let needed_by = chain.last().map(|c| format!(" (needed by {c})")).unwrap_or_default();
            format!("kernel module {name}{needed_by} is not in the kernel package; it may be built in")
        })?;
        progress(name);
        let data = read_module(path)?;
        let depends = modinfo(&data, "depends").with_context(|| format!("reading {}", path.display()))?;
        chain.push(name.to_owned());
        for dep in depends.iter().flat_map(|d| d.split(',')).filter(|d| !d.is_empty()) {
            self.visit(&canonical(dep), chain, loaded, order, progress)?;
        }
        chain.pop();
        loaded.insert(name.to_owned(), order.len());
        order.push(Module { name: name.to_owned(), data });
        Ok(())
    }
}

fn module_name_of(path: &Path) -> Option<String> {
    let file = path.file_name()?.to_str()?;
    let stem = file.strip_suffix(".ko.xz").or_else(|| file.strip_suffix(".ko"))?;
    Some(stem.to_owned())
}

/// Reads a module file, decompressing `.ko.xz`.
pub fn read_module(path: &Path) -> Result<Vec<u8>> {
    let raw = fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    if path.extension().is_some_and(|e| e == "xz") {
        let mut out = Vec::with_capacity(raw.len() * 3);
        lzma_rs::xz_decompress(&mut raw.as_slice(), &mut out)
            .map_err(|e| anyhow::anyhow!("{} is not valid xz: {e:?}", path.display()))?;
        Ok(out)
    } else {
        let mut out = Vec::new();
        fs::File::open(path)?.read_to_end(&mut out)?;
        Ok(out)
    }
}

/// The values of `key` in a module's `.modinfo` section (NUL-separated `key=value` strings).
pub fn modinfo(elf: &[u8], key: &str) -> Result<Vec<String>> {
    let file = object::File::parse(elf).context("not an ELF kernel module")?;
    let section = file.section_by_name(".modinfo").context("the module has no .modinfo section")?;
    let data = section.data().context("unreadable .modinfo section")?;
    let prefix = format!("{key}=");
    Ok(data
        .split(|b| *b == 0)
        .filter_map(|entry| std::str::from_utf8(entry).ok())
        .filter_map(|entry| entry.strip_prefix(prefix.as_str()))
        .map(str::to_owned)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fold_dashes() {
        assert_eq!(canonical("virtio-gpu"), "virtio_gpu");
        assert_eq!(module_name_of(Path::new("/x/virtio-rng.ko.xz")).as_deref(), Some("virtio-rng"));
        assert_eq!(module_name_of(Path::new("/x/evdev.ko")).as_deref(), Some("evdev"));
        assert_eq!(module_name_of(Path::new("/x/modules.order")), None);
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(modinfo(b"not an elf", "depends").is_err());
        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join("bad.ko.xz");
        fs::write(&bad, b"\xfd7zXZ\0 truncated").unwrap();
        assert!(read_module(&bad).is_err());
        assert!(ModuleTree::scan(dir.path()).unwrap().resolve(&["nope".into()], |_| {}).is_err());
    }
}
