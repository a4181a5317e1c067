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

/// What the domain layer may not name: storage, sockets, the async runtime, files, the
/// environment, threads, the clock (`std::{…}` groups are refused so none hides in one).
const IO: [&str; 23] = [
    "rusqlite",
    "tokio",
    "quinn",
    "axum",
    "std::fs",
    "std::net",
    "std::io",
    "std::env",
    "std::thread",
    "std::process",
    "SystemTime",
    "Instant",
    "now_ms()",
    "care_node::now_ms",
    "now_utc",
    "rand::",
    "uuid",
    "tempfile",
    "libc",
    "care_node::clock",
    "care_node::store",
    "care_node::client",
    "std::{",
];

/// A source file as a module path (`operator/ops.rs` is `["operator", "ops"]`) and its code
/// without comments and without the items under `#[cfg(test)]` (test modules set up fixtures
/// from any layer).
fn sources() -> Vec<(Vec<String>, String)> {
    sources_of(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"))
}

/// [`sources`] of any crate's `src/` (care-node's, next door, is checked too).
fn sources_of(src: &Path) -> Vec<(Vec<String>, String)> {
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
    let mut files = Vec::new();
    walk(src, &mut files);
    files
        .into_iter()
        .filter(|p| !p.starts_with(src.join("bin")))
        .map(|path| {
            let rel = path.strip_prefix(src).expect("under src/").with_extension("");
            let mut module: Vec<String> = rel.iter().map(|c| c.to_string_lossy().into_owned()).collect();
            if module.last().is_some_and(|m| m == "mod") {
                module.pop();
            }
            let text = std::fs::read_to_string(&path).expect("a readable source file");
            (module, without_tests(&without_comments(&text)))
        })
        .collect()
}

/// The code without `//` comments (a doc link may point to the layer that uses this one) and
/// without string literals' contents.
fn without_comments(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        let mut in_string = false;
        let mut prev = ' ';
        let mut kept = String::new();
        for (at, c) in line.char_indices() {
            if !in_string && line[at..].starts_with("//") {
                break;
            }
            if c == '"' && prev != '\\' && prev != '\'' {
                in_string = !in_string;
                kept.push(c);
            } else if !in_string {
                kept.push(c);
            }
            prev = if prev == '\\' && c == '\\' { ' ' } else { c };
        }
        out.push_str(&kept);
        out.push('\n');
    }
    out
}

/// The code without each item marked `#[cfg(test)]` or `#[cfg(all(test, …))]`: from the
/// attribute to the end of the item (a `;`, or the `{ … }` block that closes it).
fn without_tests(code: &str) -> String {
    let mut out = String::new();
    let mut rest = code;
    while let Some(at) = ["#[cfg(test)]", "#[cfg(all(test"].iter().filter_map(|a| rest.find(a)).min() {
        out.push_str(&rest[..at]);
        let item = &rest[at..];
        let after_attr = item.find(']').map_or(item.len(), |e| e + 1);
        let body = &item[after_attr..];
        let (brace, semi) = (body.find('{'), body.find(';'));
        let end = match (brace, semi) {
            (Some(b), Some(s)) if s < b => after_attr + s + 1,
            (None, Some(s)) => after_attr + s + 1,
            (Some(b), _) => {
                let mut depth = 0usize;
                let mut end = item.len();
                for (i, c) in body[b..].char_indices() {
                    match c {
                        '{' => depth += 1,
                        '}' => {
                            depth -= 1;
                            if depth == 0 {
                                end = after_attr + b + i + 1;
                                break;
                            }
                        }
                        _ => {}
                    }
                }
                end
            }
            (None, None) => item.len(),
        };
        rest = &item[end..];
    }
    out.push_str(rest);
    out
}

/// The modules a file names, absolute from the crate root: `crate::a::b::Item`,
/// `crate::{a::X, b::{c::Y}}`, and `super::…` resolved against the file's module.
fn crate_paths(module: &[String], code: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    for start in ["crate::", "super::"] {
        for (at, _) in code.match_indices(start) {
            // Not `$crate::` (a macro's), a name that ends in `crate` or `super`, or the second
            // `super::` of `super::super::`.
            if code[..at].ends_with(|c: char| c == '$' || c == '_' || c == ':' || c.is_ascii_alphanumeric()) {
                continue;
            }
            let mut tail = &code[at + start.len()..];
            let mut base = Vec::new();
            if start == "super::" {
                // `super::super::x` from `a::b::c` is `a::x`.
                base = module[..module.len().saturating_sub(1)].to_vec();
                while let Some(more) = tail.strip_prefix("super::") {
                    base.pop();
                    tail = more;
                }
            }
            expand(base, tail, &mut out);
        }
    }
    // `crate::store::{X, Y}` names `store` once.
    out.dedup();
    out
}

/// The module paths of one use-tree (`a::b::Item`, or `{…}` groups), after `prefix`. Modules
/// are lower case; a path's item (a type, a constant, a function's call) ends it.
fn expand(prefix: Vec<String>, tree: &str, out: &mut Vec<Vec<String>>) {
    let mut path = prefix;
    let mut rest = tree.trim_start();
    loop {
        if let Some(group) = rest.strip_prefix('{') {
            // Split the group at its top-level commas.
            let (mut depth, mut from) = (0usize, 0usize);
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => {
                        expand(path.clone(), &group[from..i], out);
                        return;
                    }
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        expand(path.clone(), &group[from..i], out);
                        from = i + 1;
                    }
                    _ => {}
                }
            }
            return;
        }
        let end = rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(rest.len());
        let name = &rest[..end];
        let is_module = name.chars().next().is_some_and(|c| c.is_ascii_lowercase() || c == '_')
            && rest[end..].starts_with("::");
        if !is_module || name == "self" {
            break;
        }
        path.push(name.to_string());
        rest = rest[end + 2..].trim_start();
    }
    out.push(path);
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
        for path in crate_paths(&module, &code) {
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
fn care_node_s_modules_form_no_cycle() {
    // The device library is flat (lib.rs lists its modules): no two of them may need each other.
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../node/src");
    let mut edges = Graph::new();
    for (module, code) in sources_of(&src) {
        let Some(from) = module.first().filter(|m| *m != "lib") else { continue };
        for path in crate_paths(&module, &code) {
            if let Some(to) = path.first().filter(|to| *to != from) {
                edges.entry(from.clone()).or_default().insert(to.clone());
            }
        }
    }
    assert!(edges.contains_key("sync") && edges.contains_key("store"), "the check reads node/src: {edges:?}");
    if let Some(found) = cycle(&edges) {
        panic!("care-node's modules form a cycle: {}", found.join(" -> "));
    }
}

#[test]
fn the_domain_uses_no_other_layer_and_no_io() {
    let mut found = Vec::new();
    let mut files = 0;
    for (module, code) in sources() {
        if module.first().is_none_or(|m| m != "domain") {
            continue;
        }
        files += 1;
        for path in crate_paths(&module, &code) {
            if path.first().is_some_and(|p| p != "domain") {
                found.push(format!("{} uses `{}`", module.join("::"), path.join("::")));
            }
        }
        for name in IO {
            if code.contains(name) {
                found.push(format!("{} names `{name}`", module.join("::")));
            }
        }
    }
    assert!(files >= 7, "the check reads domain/: {files} files");
    assert!(found.is_empty(), "the domain layer must stay plain Rust with no I/O: {found:?}");
}

#[test]
fn the_checks_find_a_cycle_and_every_kind_of_path() {
    let mut edges = Graph::new();
    edges.entry("a".into()).or_default().insert("b".into());
    edges.entry("b".into()).or_default().insert("c".into());
    assert_eq!(cycle(&edges), None);
    edges.entry("c".into()).or_default().insert("a".into());
    assert_eq!(cycle(&edges), Some(vec!["a".into(), "b".into(), "c".into(), "a".into()]));

    let module = ["session".to_string(), "scope".to_string()];
    let code = "use crate::store::{X, Y};\nlet m = crate::operator::metrics::M.get(); a::b\n\
                use crate::{domain::scope::Tier, ingest::{fhir::F, hl7}};\nuse super::governance::g;\n\
                use super::super::transport::T;";
    let paths: Vec<String> = crate_paths(&module, code).iter().map(|p| p.join("::")).collect();
    assert_eq!(
        paths,
        [
            "store",
            "operator::metrics",
            "domain::scope",
            "ingest::fhir",
            "ingest",
            "session::governance",
            "transport"
        ]
    );

    let code = "fn a() {}\n#[cfg(test)]\nmod tests { fn f() { let s = \"{\"; } }\nfn b() { crate::x::y(); } // crate::z::w\n\
                #[cfg(test)]\nuse crate::demo::D;\nfn c() {}";
    let kept = without_tests(&without_comments(code));
    assert!(kept.contains("fn a()") && kept.contains("fn b()") && kept.contains("fn c()"), "{kept}");
    assert!(!kept.contains("tests") && !kept.contains("demo") && !kept.contains("crate::z"), "{kept}");
}
