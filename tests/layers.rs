//! The module graph has a direction: `src/lib.rs` states the layers in one line, and every
//! `crate::` path in `src/` must point at the module's own layer's left (or at itself).
//! A module missing from the line, or declared in `lib.rs` and not in it, fails too.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// The layers as `lib.rs` states them: the backticked line under `# Layers`.
fn layers() -> Vec<Vec<String>> {
    let lib = std::fs::read_to_string(src().join("lib.rs")).unwrap();
    let doc: String = lib
        .lines()
        .filter_map(|line| line.strip_prefix("//!"))
        .map(str::trim)
        .collect::<Vec<_>>()
        .join(" ");
    let section = doc
        .split("# Layers")
        .nth(1)
        .expect("lib.rs has a `# Layers` section");
    let line = section
        .split('`')
        .nth(1)
        .expect("the layers are written between backticks");
    line.split("->")
        .map(|layer| layer.split(',').map(|m| m.trim().to_owned()).collect())
        .collect()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level modules a file names through `crate::`, with the line of each.
fn references(text: &str) -> Vec<(usize, String)> {
    let mut found = Vec::new();
    for (number, line) in text.lines().enumerate() {
        if line.trim_start().starts_with("//") {
            continue;
        }
        for (at, _) in line.match_indices("crate::") {
            // `memory_sidecar::` in a doc example is not a `crate::` path.
            if line[..at].ends_with(|c: char| c.is_alphanumeric() || c == '_') {
                continue;
            }
            let rest = &line[at + "crate::".len()..];
            if let Some(group) = rest.strip_prefix('{') {
                let inner = group.split('}').next().unwrap_or("");
                for item in inner.split(',') {
                    let name = item.trim().split("::").next().unwrap_or("").trim();
                    if !name.is_empty() {
                        found.push((number + 1, name.to_owned()));
                    }
                }
                continue;
            }
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            found.push((number + 1, name));
        }
    }
    found
}

#[test]
fn every_module_imports_only_from_the_layers_to_its_left() {
    let layers = layers();
    let mut layer_of: BTreeMap<String, usize> = BTreeMap::new();
    for (index, layer) in layers.iter().enumerate() {
        for module in layer {
            assert!(
                layer_of.insert(module.clone(), index).is_none(),
                "{module} is in two layers"
            );
        }
    }
    let lib = std::fs::read_to_string(src().join("lib.rs")).unwrap();
    let declared: Vec<&str> = lib
        .lines()
        .filter_map(|line| line.strip_prefix("pub mod "))
        .map(|rest| rest.trim_end_matches(';'))
        .collect();
    for module in &declared {
        assert!(
            layer_of.contains_key(*module),
            "lib.rs declares `{module}`, which the layer line does not place"
        );
    }
    assert_eq!(
        declared.len(),
        layer_of.len(),
        "the layer line names a module lib.rs lacks"
    );

    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    let mut wrong = Vec::new();
    for file in files {
        let relative = file.strip_prefix(src()).unwrap();
        let first = relative.components().next().unwrap();
        let module = first
            .as_os_str()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_owned();
        if module == "lib" || module == "main" {
            continue;
        }
        let own = *layer_of
            .get(&module)
            .unwrap_or_else(|| panic!("{} is in no layer", relative.display()));
        let text = std::fs::read_to_string(&file).unwrap();
        for (line, target) in references(&text) {
            if target == module {
                continue;
            }
            match layer_of.get(&target) {
                Some(layer) if *layer < own => {}
                Some(_) => wrong.push(format!(
                    "{}:{line}: `{module}` uses `crate::{target}`, which is not to its left",
                    relative.display()
                )),
                None => wrong.push(format!(
                    "{}:{line}: `crate::{target}` is no module of the layer line",
                    relative.display()
                )),
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn the_scanner_sees_plain_grouped_and_nested_paths() {
    let text = "use crate::store::Backend;\nuse crate::{ids::VaultId, error};\n// crate::http in a comment\nlet x = crate::index::terms(t);\nuse memory_sidecar::crate_like;";
    let names: Vec<String> = references(text).into_iter().map(|(_, n)| n).collect();
    assert_eq!(names, ["store", "ids", "error", "index"]);
}
