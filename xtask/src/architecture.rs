//! The architecture's invariants (ARCHITECTURE.md, "Invariants"), checked on the sources so that
//! they stay true: which crate may depend on which, no import cycle between the modules of a
//! crate, `unsafe` only in the files allowed to hold it, and a code map that names every crate
//! and every top-level module.
//!
//! Text checks, no compiler: a `Cargo.toml`'s `pleiades-*` dependencies, and the `crate::`,
//! `super::` and `self::` paths of each module (comments and `#[cfg(test)]` parts left out).
//! `cargo test` runs them (the tests below).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

/// The workspace's crates by layer: a crate may depend only on crates of a lower layer.
pub const LAYERS: &[(&str, u8)] = &[
    ("pleiades-testkit", 0),
    ("pleiades-protocol", 1),
    ("pleiades-clipboard", 2),
    ("pleiades-virtio", 2),
    ("pleiades-agent", 3),
    ("pleiades-vmm", 3),
    ("pleiades-control", 3),
    ("pleiades-session", 4),
    ("pleiades-host", 5),
    ("pleiades-client", 5),
    ("pleiades-broker", 5),
    ("pleiades-tests", 6),
    ("xtask", 6),
];

/// The only files that may hold `unsafe` code (each block with a `// SAFETY:` line).
pub const UNSAFE_ALLOWED: &[&str] =
    &["vmm/src/sys.rs", "host/src/jail/sys.rs", "guest-agent/src/sound/mod.rs", "client/src/usb/transfer.rs"];

/// A broken invariant, said so that the reader knows where to look.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation(pub String);

/// Every violation in the workspace at `root`.
pub fn check(root: &Path) -> Vec<Violation> {
    let mut violations = check_layers(root);
    for (name, _) in LAYERS {
        if let Some(dir) = crate_dir(root, name) {
            violations.extend(module_cycles(&dir.join("src")).into_iter().map(|cycle| {
                Violation(format!("{name}: modules import each other: {}", cycle.join(" -> ")))
            }));
        }
    }
    violations.extend(check_unsafe(root));
    let map = fs::read_to_string(root.join("ARCHITECTURE.md")).unwrap_or_default();
    violations.extend(check_code_map(root, &map));
    violations
}

/// The code map's section of the crate in folder `dir` (from its `### `DIR/`` heading to the
/// next heading).
fn map_section<'a>(map: &'a str, dir: &str) -> Option<&'a str> {
    let heading = format!("### `{dir}/`");
    let start = map.find(&heading)? + heading.len();
    let rest = &map[start..];
    Some(&rest[..rest.find("\n#").unwrap_or(rest.len())])
}

/// Every crate has a section in ARCHITECTURE.md's code map, which names each entry of its
/// `src/` (a file as `` `name.rs ``, a folder as `` `name/ ``; `lib.rs` and `main.rs` aside).
fn check_code_map(root: &Path, map: &str) -> Vec<Violation> {
    let mut violations = Vec::new();
    for (name, _) in LAYERS {
        let Some(dir) = crate_dir(root, name) else { continue };
        let folder = dir.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
        let Some(section) = map_section(map, &folder) else {
            violations
                .push(Violation(format!("ARCHITECTURE.md's code map has no section for {folder}/ ({name})")));
            continue;
        };
        let mut entries: Vec<String> = fs::read_dir(dir.join("src"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let file = e.file_name().to_string_lossy().into_owned();
                if e.path().is_dir() {
                    Some(format!("{file}/"))
                } else {
                    file.ends_with(".rs").then_some(file)
                }
            })
            .filter(|entry| entry != "lib.rs" && entry != "main.rs")
            .collect();
        entries.sort();
        for entry in entries {
            if !section.contains(&format!("`{entry}")) {
                violations.push(Violation(format!(
                    "ARCHITECTURE.md's code map does not name {folder}/src/{entry}: add it to the {folder}/ section"
                )));
            }
        }
    }
    violations
}

fn layer(name: &str) -> Option<u8> {
    LAYERS.iter().find(|(n, _)| *n == name).map(|(_, l)| *l)
}

/// The folder of a workspace crate, by its package name.
fn crate_dir(root: &Path, name: &str) -> Option<PathBuf> {
    fs::read_dir(root).ok()?.flatten().map(|e| e.path()).find(|dir| {
        fs::read_to_string(dir.join("Cargo.toml"))
            .is_ok_and(|toml| toml.lines().any(|l| l.trim() == format!("name = \"{name}\"")))
    })
}

/// The `pleiades-*` (and `xtask`) crates a manifest names in any dependency table.
fn workspace_dependencies(manifest: &str) -> BTreeSet<String> {
    let mut deps = BTreeSet::new();
    let mut in_deps = false;
    for line in manifest.lines().map(str::trim) {
        if line.starts_with('[') {
            in_deps = line.ends_with("dependencies]");
            continue;
        }
        if in_deps
            && let Some((name, _)) = line.split_once('=')
            && layer(name.trim()).is_some()
        {
            deps.insert(name.trim().to_owned());
        }
    }
    deps
}

fn check_layers(root: &Path) -> Vec<Violation> {
    let mut violations = Vec::new();
    for (name, level) in LAYERS {
        let Some(dir) = crate_dir(root, name) else {
            violations.push(Violation(format!("{name} is listed in LAYERS but no crate has that name")));
            continue;
        };
        let manifest = fs::read_to_string(dir.join("Cargo.toml")).unwrap_or_default();
        for dep in workspace_dependencies(&manifest) {
            let dep_level = layer(&dep).unwrap_or(u8::MAX);
            if dep_level >= *level {
                violations.push(Violation(format!(
                    "{name} (layer {level}) depends on {dep} (layer {dep_level}): a crate depends only on lower layers"
                )));
            }
        }
    }
    violations
}

/// The modules of a crate: `a::b` → its file.
fn modules(src: &Path) -> BTreeMap<String, PathBuf> {
    let mut found = BTreeMap::new();
    let mut stack = vec![src.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                if path.file_name().is_some_and(|n| n != "bin") {
                    stack.push(path);
                }
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let relative = path.strip_prefix(src).unwrap_or(&path).with_extension("");
            let mut parts: Vec<String> =
                relative.components().map(|c| c.as_os_str().to_string_lossy().into_owned()).collect();
            if parts.last().is_some_and(|p| p == "mod" || p == "lib" || p == "main") {
                parts.pop();
            }
            found.insert(parts.join("::"), path);
        }
    }
    found
}

/// A module's code without comments and without its `#[cfg(test)]` part (tests may reach
/// anywhere in their crate).
fn production_code(text: &str) -> String {
    let code = text.find("#[cfg(test)]").map_or(text, |at| &text[..at]);
    code.lines().map(|l| l.find("//").map_or(l, |at| &l[..at])).collect::<Vec<_>>().join("\n")
}

/// The modules that `module` names through `crate::`, `super::` or `self::` paths (in `use`
/// lists too: `use super::{a::A, b}`).
fn imports(module: &str, code: &str, all: &BTreeMap<String, PathBuf>) -> BTreeSet<String> {
    let here: Vec<String> =
        if module.is_empty() { Vec::new() } else { module.split("::").map(String::from).collect() };
    let is_path = |c: char| c.is_alphanumeric() || c == '_' || c == ':';
    let mut paths = Vec::new();
    for keyword in ["crate::", "super::", "self::"] {
        for (at, _) in code.match_indices(keyword) {
            if code[..at].chars().last().is_some_and(is_path) {
                continue; // `foo::self::`, or part of a longer name
            }
            let tail: String = code[at..].chars().take_while(|c| is_path(*c)).collect();
            let after = code[at + tail.len()..].trim_start();
            let mut base: Vec<String> = Vec::new();
            let mut segments = tail.split("::").filter(|s| !s.is_empty()).peekable();
            match segments.next() {
                Some("crate") => {}
                Some("self") => base = here.clone(),
                _ => {
                    base = here.clone();
                    base.pop();
                }
            }
            for segment in segments {
                match segment {
                    "super" => drop(base.pop()),
                    "self" => {}
                    name => base.push(name.to_owned()),
                }
            }
            if let Some(list) = after.strip_prefix('{') {
                // One level of `{a::X, b}`: each item is a path below `base`.
                let list = list.split('}').next().unwrap_or_default();
                for item in list.split(',') {
                    let item: String = item.trim().chars().take_while(|c| is_path(*c)).collect();
                    let mut path = base.clone();
                    path.extend(item.split("::").filter(|s| !s.is_empty() && *s != "self").map(String::from));
                    paths.push(path);
                }
            } else {
                paths.push(base);
            }
        }
    }
    let mut found = BTreeSet::new();
    for path in paths {
        let target = (0..=path.len())
            .rev()
            .map(|k| path[..k].join("::"))
            .find(|candidate| all.contains_key(candidate))
            .unwrap_or_default();
        let nested = |a: &str, b: &str| !b.is_empty() && a.starts_with(&format!("{b}::"));
        if target != module
            && !nested(&target, module)
            && !nested(module, &target)
            && all.contains_key(&target)
        {
            found.insert(target);
        }
    }
    found
}

/// Each import cycle between modules of the crate whose sources are in `src`, once.
pub fn module_cycles(src: &Path) -> Vec<Vec<String>> {
    let all = modules(src);
    let graph: BTreeMap<String, BTreeSet<String>> = all
        .iter()
        .map(|(module, path)| {
            let code = production_code(&fs::read_to_string(path).unwrap_or_default());
            (module.clone(), imports(module, &code, &all))
        })
        .collect();
    let name = |m: &str| if m.is_empty() { "(crate root)".to_owned() } else { m.to_owned() };
    let mut cycles = Vec::new();
    let mut seen = BTreeSet::new();
    for start in graph.keys() {
        let mut stack = vec![(start.clone(), vec![start.clone()])];
        while let Some((node, path)) = stack.pop() {
            for next in graph.get(&node).into_iter().flatten() {
                if next == start {
                    let members: BTreeSet<String> = path.iter().cloned().collect();
                    if seen.insert(members) {
                        let mut cycle: Vec<String> = path.iter().map(|m| name(m)).collect();
                        cycle.push(name(start));
                        cycles.push(cycle);
                    }
                } else if !path.contains(next) && path.len() < 8 {
                    let mut longer = path.clone();
                    longer.push(next.clone());
                    stack.push((next.clone(), longer));
                }
            }
        }
    }
    cycles
}

fn check_unsafe(root: &Path) -> Vec<Violation> {
    let mut violations = Vec::new();
    for (name, _) in LAYERS {
        let Some(dir) = crate_dir(root, name) else { continue };
        for path in modules(&dir.join("src")).into_values() {
            let text = fs::read_to_string(&path).unwrap_or_default();
            // Spelled in two pieces so that this file does not match itself.
            let allows = [concat!("#![allow(", "unsafe_code)]"), concat!("#[allow(", "unsafe_code)]")];
            if !allows.iter().any(|a| text.contains(a)) {
                continue;
            }
            let relative = path.strip_prefix(root).unwrap_or(&path).to_string_lossy().into_owned();
            if !UNSAFE_ALLOWED.contains(&relative.as_str()) {
                violations.push(Violation(format!(
                    "{relative} allows unsafe code; only {} may (ARCHITECTURE.md)",
                    UNSAFE_ALLOWED.join(", ")
                )));
            }
            let blocks = text.matches("unsafe {").count() + text.matches("unsafe impl").count();
            let reasons = text.matches("// SAFETY:").count();
            if reasons < blocks {
                violations.push(Violation(format!(
                    "{relative}: {blocks} unsafe blocks but {reasons} `// SAFETY:` comments"
                )));
            }
        }
    }
    violations
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_workspace_keeps_its_invariants() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let violations = check(root);
        assert!(violations.is_empty(), "{violations:#?}");
    }

    #[test]
    fn a_cycle_between_two_modules_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path();
        fs::write(src.join("lib.rs"), "pub mod a;\npub mod b;\n").unwrap();
        fs::write(src.join("a.rs"), "use crate::b::B;\npub struct A;\n").unwrap();
        fs::write(
            src.join("b.rs"),
            "// crate::a::A in a comment does not count\nuse super::a::A;\npub struct B;\n",
        )
        .unwrap();
        assert_eq!(module_cycles(src).len(), 1, "{:?}", module_cycles(src));
        fs::write(src.join("b.rs"), "pub struct B;\n#[cfg(test)]\nmod t { use crate::a::A; }\n").unwrap();
        assert!(module_cycles(src).is_empty(), "tests may reach anywhere");
    }

    #[test]
    fn a_module_missing_from_the_code_map_is_found() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let map = fs::read_to_string(root.join("ARCHITECTURE.md")).unwrap();
        assert!(check_code_map(root, &map).is_empty());
        let without_acpi = map.replace("`acpi.rs`", "ACPI");
        let found = check_code_map(root, &without_acpi);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].0.contains("vmm/src/acpi.rs"), "{found:?}");
        let without_section = map.replace("### `control/`", "### control");
        assert!(
            check_code_map(root, &without_section).iter().any(|v| v.0.contains("no section for control/"))
        );
    }

    #[test]
    fn a_dependency_on_a_higher_layer_is_found() {
        let deps = workspace_dependencies(
            "[package]\nname = \"x\"\n[dependencies]\npleiades-host = { path = \"../host\" }\nserde = \"1\"\n\
             [dev-dependencies]\npleiades-tests = { path = \"../tests\" }\n",
        );
        assert_eq!(deps, ["pleiades-host", "pleiades-tests"].map(String::from).into());
    }
}
