//! Keeps the layering of `docs/architecture.md` true: a module may use
//! modules of its own layer or of lower ones, never of a higher one. Read
//! from the source text (`crate::<module>` paths), so it needs no build
//! tooling and fails with the file and line that broke the rule.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Top-level modules by layer, lowest first.
const LAYERS: &[(&str, &[&str])] = &[
    ("ground", &["model"]),
    ("base", &["config", "resident", "resilience", "telemetry"]),
    ("I/O", &["sources", "auth"]),
    ("domain", &["playback", "sessions", "progress", "licenses"]),
    ("edge", &["app", "http", "startup"]),
];

/// Within the edge: state does not know the HTTP surface or the wiring, and
/// the HTTP surface does not know the wiring.
const EDGE_DENIED: &[(&str, &str)] = &[("app", "http"), ("app", "startup"), ("http", "startup")];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|(_, modules)| modules.contains(&module))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a file belongs to (`src/http/routes/x.rs` → `http`).
fn owner(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).expect("under src");
    let first = rel.components().next().expect("a component");
    first
        .as_os_str()
        .to_string_lossy()
        .trim_end_matches(".rs")
        .to_owned()
}

/// Every `crate::<name>` in the file, with its line number.
fn crate_paths(text: &str) -> Vec<(usize, String)> {
    let mut found = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(at) = rest.find("crate::") {
            let after = &rest[at + "crate::".len()..];
            let name: String = after
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                found.push((n + 1, name));
            }
            rest = after;
        }
    }
    found
}

#[test]
fn no_module_uses_a_higher_layer() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut broken = Vec::new();
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for file in &files {
        let from = owner(&src, file);
        if from == "main" || from == "lib" {
            continue;
        }
        let from_layer =
            layer_of(&from).unwrap_or_else(|| panic!("module `{from}` is in no layer: add it to LAYERS"));
        *seen.entry(from.clone()).or_default() += 1;
        let text = std::fs::read_to_string(file).expect("read file");
        for (line, to) in crate_paths(&text) {
            if to == from {
                continue;
            }
            let Some(to_layer) = layer_of(&to) else {
                broken.push(format!("{}:{line}: `crate::{to}` is in no layer", file.display()));
                continue;
            };
            if to_layer > from_layer || EDGE_DENIED.contains(&(from.as_str(), to.as_str())) {
                broken.push(format!(
                    "{}:{line}: `{from}` ({}) uses `{to}` ({})",
                    file.display(),
                    LAYERS[from_layer].0,
                    LAYERS[to_layer].0
                ));
            }
        }
    }
    assert!(seen.len() >= 12, "expected every top-level module, read {seen:?}");
    assert!(broken.is_empty(), "layering broken:\n{}", broken.join("\n"));
}

#[test]
fn no_raw_redis_outside_sources() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut broken = Vec::new();
    for file in &files {
        let from = owner(&src, file);
        // Start-up wiring may name the client's error type.
        if from == "sources" || from == "startup" {
            continue;
        }
        let text = std::fs::read_to_string(file).expect("read file");
        for (n, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            if code.contains("redis::") && !code.contains("sources::redis::") {
                broken.push(format!("{}:{}: {}", file.display(), n + 1, line.trim()));
            }
        }
    }
    assert!(
        broken.is_empty(),
        "raw Redis outside sources/:\n{}",
        broken.join("\n")
    );
}

#[test]
fn the_checker_sees_paths() {
    let found = crate_paths(
        "use crate::model::UserId; // crate::http\nlet x = crate::sources::redis::keys::content(&id);",
    );
    assert_eq!(found, vec![(1, "model".to_owned()), (2, "sources".to_owned())]);
}
