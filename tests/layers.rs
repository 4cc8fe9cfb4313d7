//! The library's modules form layers, read from the ground up as the data flows: no module may
//! import one above it (or, on the ground floor, any other of ember's). A new module gets its place
//! here; an import that runs up the layers fails this test.

use std::path::Path;

/// Top-level modules of `src/`, lowest first; modules on one floor may not import each other.
const FLOORS: &[&[&str]] = &[
    &["memory", "sys", "seccomp", "svg"],
    &["config"],
    &["snapshot", "image"],
    &["channel"],
    &["devices"],
    &["vmm"],
    &["template"],
    &["scale", "isolation"],
    &["serve"],
    &["bench"],
];

/// Macros exported at the crate root, by the module that defines them.
const MACROS: &[(&str, &str)] = &[("log_limited", "sys")];

fn floor(module: &str) -> Option<usize> {
    let module = MACROS.iter().find(|m| m.0 == module).map_or(module, |m| m.1);
    FLOORS.iter().position(|f| f.contains(&module))
}

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// Every `crate::NAME` in `text`.
fn crate_paths(text: &str) -> Vec<String> {
    text.match_indices("crate::")
        .filter(|(i, _)| !text[..*i].ends_with(|c: char| c.is_alphanumeric() || c == '_' || c == ':'))
        .map(|(i, m)| text[i + m.len()..].chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect())
        .collect()
}

#[test]
fn no_module_imports_one_above_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut upward = Vec::new();
    for f in files {
        let rel = f.strip_prefix(&src).unwrap().to_string_lossy().into_owned();
        let top = rel.split('/').next().unwrap().trim_end_matches(".rs").to_string();
        // The crate root and the binary's CLI sit above everything.
        if matches!(top.as_str(), "lib" | "main" | "cli") {
            continue;
        }
        let Some(own) = floor(&top) else { panic!("src/{rel}: module {top} has no floor in tests/layers.rs") };
        let text = std::fs::read_to_string(&f).unwrap();
        for m in crate_paths(&text) {
            if m == top {
                continue;
            }
            match floor(&m) {
                Some(other) if other < own => {}
                _ => upward.push(format!("src/{rel} imports crate::{m}")),
            }
        }
    }
    upward.sort();
    upward.dedup();
    assert!(upward.is_empty(), "imports that run up the layers:\n{}", upward.join("\n"));
}

#[test]
fn the_checker_sees_upward_imports() {
    assert_eq!(crate_paths("use crate::vmm::Vm; x::crate::no; (crate::sys::lock)"), vec!["vmm", "sys"]);
    assert!(floor("vmm") > floor("devices"));
}
