//! The server's layers, checked: which layer may use which, read from the source itself, so a
//! shortcut that would tie two layers in a knot fails `cargo test` instead of waiting for a
//! reviewer (docs/architecture.md, "Layers").
//!
//! Every `crate::<layer>` path outside a file's test module is an edge from the file's layer
//! (its first folder under `src/`) to that layer. The layers must form no cycle, the modules of
//! one layer none among themselves, and `domain` uses no other layer and no I/O at all.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The top-level modules of the library; the crate root (`server_actor`) is no layer.
const LAYERS: [&str; 7] = ["domain", "store", "session", "transport", "ingest", "operator", "demo"];

/// What the domain layer may not name: storage, sockets, the async runtime, files, the clock.
const IO: [&str; 9] = [
    "rusqlite",
    "tokio",
    "quinn",
    "std::fs",
    "std::net",
    "std::io",
    "SystemTime::now",
    "Instant::now",
    "crate::",
];

/// A source file as a module path (`operator/ops.rs` is `["operator", "ops"]`) and its code
/// without its comments and its test module (by this crate's style, the last thing in a file).
fn sources() -> Vec<(Vec<String>, String)> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("src/ is readable") {
            let path = entry.expect("a directory entry").path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    walk(&src, &mut files);
    files
        .into_iter()
        .filter(|p| !p.starts_with(src.join("bin")))
        .map(|path| {
            let rel = path.strip_prefix(&src).expect("under src/").with_extension("");
            let mut module: Vec<String> = rel.iter().map(|c| c.to_string_lossy().into_owned()).collect();
            if module.last().is_some_and(|m| m == "mod") {
                module.pop();
            }
            let text = std::fs::read_to_string(&path).expect("a readable source file");
            let code = match text.find("#[cfg(test)]").into_iter().chain(text.find("#[cfg(all(test")).min() {
                Some(at) => &text[..at],
                None => &text,
            };
            // Comments may point anywhere (a doc link to the layer that uses this one).
            let code: String = code
                .lines()
                .filter(|l| !l.trim_start().starts_with("//"))
                .map(|l| format!("{l}\n"))
                .collect();
            (module, code)
        })
        .collect()
}

/// The paths a file names after `crate::`, as their module components.
fn crate_paths(code: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    for (at, _) in code.match_indices("crate::") {
        // Not `$crate::` (a macro's), nor a name ending in `crate`.
        if code[..at].ends_with(|c: char| c == '$' || c == '_' || c.is_ascii_alphanumeric()) {
            continue;
        }
        let rest = &code[at + "crate::".len()..];
        let end =
            rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':')).unwrap_or(rest.len());
        // Modules are lower case; the path's item (a type, a constant) is not a module.
        let path: Vec<String> = rest[..end]
            .split("::")
            .take_while(|part| part.chars().next().is_some_and(|c| c.is_ascii_lowercase()))
            .map(str::to_string)
            .collect();
        out.push(path);
    }
    out
}

/// Which modules each module uses.
type Graph = BTreeMap<String, BTreeSet<String>>;

/// Whether the directed graph has a cycle; the first one found, if so.
fn cycle(edges: &Graph) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        edges: &Graph,
        stack: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = stack.iter().position(|n| n == node) {
            let mut found = stack[at..].to_vec();
            found.push(node.to_string());
            return Some(found);
        }
        if done.contains(node) {
            return None;
        }
        stack.push(node.to_string());
        for next in edges.get(node).into_iter().flatten() {
            if let Some(found) = visit(next, edges, stack, done) {
                return Some(found);
            }
        }
        stack.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = BTreeSet::new();
    edges.keys().find_map(|node| visit(node, edges, &mut Vec::new(), &mut done))
}

/// Edges between layers, and between the modules directly under each layer, with the file
/// that makes each (for the failure message).
fn edges() -> (Graph, BTreeMap<String, Graph>) {
    let mut layers = Graph::new();
    let mut within: BTreeMap<String, Graph> = BTreeMap::new();
    for (module, code) in sources() {
        let Some(layer) = module.first().filter(|m| LAYERS.contains(&m.as_str())) else { continue };
        for path in crate_paths(&code) {
            let Some(target) = path.first() else { continue };
            if !LAYERS.contains(&target.as_str()) {
                continue;
            }
            if target != layer {
                layers.entry(layer.clone()).or_default().insert(target.clone());
            } else if let (Some(from), Some(to)) = (module.get(1), path.get(1)) {
                // Within a layer: between its direct submodules (a layer's mod.rs is its parent).
                if from != to {
                    within
                        .entry(layer.clone())
                        .or_default()
                        .entry(from.clone())
                        .or_default()
                        .insert(to.clone());
                }
            }
        }
    }
    (layers, within)
}

#[test]
fn the_layers_form_no_cycle_and_no_layer_s_modules_do() {
    let (layers, within) = edges();
    assert!(layers.contains_key("session"), "the check reads the source: {layers:?}");
    if let Some(found) = cycle(&layers) {
        panic!("the layers form a cycle: {} (all edges: {layers:?})", found.join(" -> "));
    }
    for (layer, edges) in &within {
        if let Some(found) = cycle(edges) {
            panic!("modules of `{layer}` form a cycle: {}", found.join(" -> "));
        }
    }
}

#[test]
fn the_domain_uses_no_other_layer_and_no_io() {
    let mut found = Vec::new();
    for (module, code) in sources() {
        if module.first().is_none_or(|m| m != "domain") {
            continue;
        }
        // `crate::domain::…` is the domain itself.
        let code = code.replace("crate::domain::", "");
        for name in IO {
            if code.contains(name) {
                found.push(format!("{} names `{name}`", module.join("::")));
            }
        }
    }
    assert!(found.is_empty(), "the domain layer must stay plain Rust with no I/O: {found:?}");
}

#[test]
fn the_checks_find_a_cycle_and_a_path_when_there_is_one() {
    let mut edges = Graph::new();
    edges.entry("a".into()).or_default().insert("b".into());
    edges.entry("b".into()).or_default().insert("c".into());
    assert_eq!(cycle(&edges), None);
    edges.entry("c".into()).or_default().insert("a".into());
    assert_eq!(cycle(&edges), Some(vec!["a".into(), "b".into(), "c".into(), "a".into()]));
    let paths = crate_paths("use crate::store::{X, Y};\nlet m = crate::operator::metrics::M.get(); a::b");
    assert_eq!(paths, vec![vec!["store".to_string()], vec!["operator".into(), "metrics".into()]]);
}
