//! The library's modules form layers, read from the ground up as the data flows: no module may
//! import one above it (or, on the ground floor, any other of ember's). A new module gets its place
//! here; an import that runs up the layers fails this test.

use std::path::Path;

/// Top-level modules of `src/`, lowest first; modules on one floor may not import each other.
const FLOORS: &[&[&str]] = &[
    &["memory", "sys", "seccomp", "svg", "request_body"],
    &["config"],
    &["snapshot", "image"],
    &["channel"],
    &["devices"],
    &["vmm"],
    &["template"],
    &["scale", "isolation"],
    &["serve", "firecracker"],
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

/// The sibling modules of `dir` (files and folders) and, for each, the siblings it names as
/// `super::NAME` outside its unit tests.
fn sibling_imports(dir: &Path) -> std::collections::BTreeMap<String, std::collections::BTreeSet<String>> {
    let mut names = std::collections::BTreeSet::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().trim_end_matches(".rs").to_string();
        if name != "mod" && (e.path().is_dir() || e.path().extension().is_some_and(|x| x == "rs")) {
            names.insert(name);
        }
    }
    let mut graph = std::collections::BTreeMap::new();
    for name in &names {
        let file = if dir.join(format!("{name}.rs")).exists() {
            dir.join(format!("{name}.rs"))
        } else {
            dir.join(name).join("mod.rs")
        };
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        let text = text.split("#[cfg(test)]\nmod tests").next().unwrap_or("");
        // Code only: a doc link to a sibling is no import.
        let text: String = text.lines().filter(|l| !l.trim_start().starts_with("//")).collect::<Vec<_>>().join("\n");
        let used = text
            .match_indices("super::")
            .filter(|(i, _)| !text[..*i].ends_with("super::"))
            .map(|(i, m)| {
                text[i + m.len()..].chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect::<String>()
            })
            .filter(|m| m != name && names.contains(m))
            .collect();
        graph.insert(name.clone(), used);
    }
    graph
}

/// A cycle in `graph`, if it has one.
fn cycle(graph: &std::collections::BTreeMap<String, std::collections::BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        n: &str,
        graph: &std::collections::BTreeMap<String, std::collections::BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut std::collections::BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|p| p == n) {
            let mut c = path[at..].to_vec();
            c.push(n.to_string());
            return Some(c);
        }
        if done.contains(n) {
            return None;
        }
        path.push(n.to_string());
        for m in graph.get(n).into_iter().flatten() {
            if let Some(c) = visit(m, graph, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(n.to_string());
        None
    }
    let mut done = std::collections::BTreeSet::new();
    graph.keys().find_map(|n| visit(n, graph, &mut Vec::new(), &mut done))
}

#[test]
fn no_two_sibling_modules_import_each_other() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut dirs = vec![root.join("src"), root.join("guest/agent/src")];
    let mut circles = Vec::new();
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            if e.path().is_dir() {
                dirs.push(e.path());
            }
        }
        if let Some(c) = cycle(&sibling_imports(&d)) {
            circles.push(format!("{}: {}", d.strip_prefix(root).unwrap().display(), c.join(" -> ")));
        }
    }
    circles.sort();
    assert!(circles.is_empty(), "modules that import each other:\n{}", circles.join("\n"));
}

#[test]
fn the_daemons_core_knows_none_of_its_doors() {
    // The doors parse, call the command core and map; nothing below them names one.
    const DOORS: &[&str] = &["api", "lean", "connections", "client", "command"];
    let serve = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/serve");
    let mut wrong = Vec::new();
    for (module, used) in sibling_imports(&serve) {
        if !DOORS.contains(&module.as_str()) && module != "stub" {
            wrong.extend(used.iter().filter(|u| DOORS.contains(&u.as_str())).map(|u| format!("serve/{module} -> {u}")));
        }
    }
    assert!(wrong.is_empty(), "the core imports a door:\n{}", wrong.join("\n"));
}

#[test]
fn the_cycle_finder_finds_cycles() {
    let g = |edges: &[(&str, &str)]| {
        let mut g: std::collections::BTreeMap<String, std::collections::BTreeSet<String>> = Default::default();
        for (a, b) in edges {
            g.entry(a.to_string()).or_default().insert(b.to_string());
            g.entry(b.to_string()).or_default();
        }
        g
    };
    assert_eq!(cycle(&g(&[("a", "b"), ("b", "c")])), None);
    assert_eq!(cycle(&g(&[("a", "b"), ("b", "c"), ("c", "a")])).map(|c| c.len()), Some(4));
}
