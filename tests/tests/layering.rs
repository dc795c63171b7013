#![allow(clippy::unwrap_used)]
//! The layering of huskd and the guest agent (docs/architecture.md), checked on
//! the source: every `use` and every `crate::` / `super::` / `self::` path is
//! resolved to the file it names, and
//! - in host-shim, no module imports a layer above its own;
//! - in the guest agent, no files import each other in a loop.
//!
//! A plain text scan (no compiler): comments are skipped, `mod x;` declarations
//! are not imports, a path names the deepest module file its segments reach.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn src(krate: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(krate)
        .join("src")
}

/// Module path (`["sandbox", "vm", "qemu"]`) of every `.rs` file under `root`.
fn modules(root: &Path) -> BTreeMap<Vec<String>, PathBuf> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            if p.extension().is_none_or(|x| x != "rs") {
                continue;
            }
            let rel = p.strip_prefix(root).unwrap();
            let mut segs: Vec<String> = rel
                .iter()
                .map(|s| s.to_string_lossy().trim_end_matches(".rs").to_string())
                .collect();
            if matches!(
                segs.last().map(String::as_str),
                Some("mod" | "lib" | "main")
            ) {
                segs.pop();
            }
            if segs.first().is_some_and(|s| s == "bin") {
                continue;
            }
            out.insert(segs, p);
        }
    }
    out
}

/// The text of `file` without comments and string literals' contents.
fn code(file: &Path) -> String {
    strip(&std::fs::read_to_string(file).unwrap())
}

fn strip(text: &str) -> String {
    let mut out = String::new();
    for line in text.lines() {
        let l = line.trim_start();
        if l.starts_with("//") {
            continue;
        }
        // Inline comments and strings: cut at `//` outside a string, blank strings.
        let mut in_str = false;
        let mut prev = ' ';
        let mut kept = String::new();
        for ch in line.chars() {
            if ch == '"' && prev != '\\' {
                in_str = !in_str;
                kept.push('"');
            } else if in_str {
                kept.push(' ');
            } else if ch == '/' && prev == '/' {
                kept.pop();
                break;
            } else {
                kept.push(ch);
            }
            prev = ch;
        }
        out.push_str(&kept);
        out.push('\n');
    }
    out
}

/// Expands a use tree (`super::{a::B, c}`) into its paths.
fn expand(tree: &str) -> Vec<String> {
    // Drop renames (`x as y`), then whitespace.
    let mut t = String::new();
    let mut toks = tree.split_whitespace();
    while let Some(tok) = toks.next() {
        if tok == "as" {
            if let Some(alias) = toks.next() {
                t.extend(
                    alias
                        .chars()
                        .filter(|c| !(c.is_alphanumeric() || *c == '_')),
                );
            }
        } else {
            t.push_str(tok);
        }
    }
    fn go(prefix: &str, t: &str, out: &mut Vec<String>) {
        match t.find('{') {
            None => out.push(format!("{prefix}{t}")),
            Some(open) => {
                let head = &t[..open];
                let inner = &t[open + 1..t.rfind('}').unwrap_or(t.len())];
                let mut depth = 0;
                let mut start = 0;
                for (i, ch) in inner.char_indices() {
                    match ch {
                        '{' => depth += 1,
                        '}' => depth -= 1,
                        ',' if depth == 0 => {
                            go(&format!("{prefix}{head}"), &inner[start..i], out);
                            start = i + 1;
                        }
                        _ => {}
                    }
                }
                if start < inner.len() {
                    go(&format!("{prefix}{head}"), &inner[start..], out);
                }
            }
        }
    }
    let mut out = vec![];
    go("", &t, &mut out);
    out
}

/// Every path a file names that starts at `crate`, `super` or `self`.
fn paths(code: &str) -> Vec<String> {
    let mut out = vec![];
    // use statements (possibly over several lines, with braces).
    let mut rest = code;
    while let Some(i) = rest.find("use ") {
        let before = rest[..i].chars().last();
        let after = &rest[i + 4..];
        rest = after;
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        let Some(end) = after.find(';') else { break };
        let tree = &after[..end];
        if tree.starts_with("crate::") || tree.starts_with("super::") || tree.starts_with("self::")
        {
            out.extend(expand(tree));
        }
    }
    // Inline paths.
    let bytes = code.as_bytes();
    for start in ["crate::", "super::", "self::"] {
        let mut from = 0;
        while let Some(i) = code[from..].find(start) {
            let at = from + i;
            from = at + start.len();
            if at > 0
                && (bytes[at - 1].is_ascii_alphanumeric()
                    || bytes[at - 1] == b'_'
                    || bytes[at - 1] == b':')
            {
                continue;
            }
            let end = code[at..]
                .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
                .map_or(code.len(), |e| at + e);
            out.push(code[at..end].trim_end_matches(':').to_string());
        }
    }
    out
}

/// The module a path written in module `here` names (deepest known module prefix).
fn resolve(
    here: &[String],
    path: &str,
    known: &BTreeMap<Vec<String>, PathBuf>,
) -> Option<Vec<String>> {
    let mut segs: Vec<&str> = path.split("::").filter(|s| !s.is_empty()).collect();
    let mut base: Vec<String> = match segs.first()? {
        &"crate" => vec![],
        &"self" | &"super" => here.to_vec(),
        _ => return None,
    };
    if segs[0] == "crate" || segs[0] == "self" {
        segs.remove(0);
    }
    while segs.first() == Some(&"super") {
        base.pop()?;
        segs.remove(0);
    }
    let mut best = base.clone();
    let mut cur = base;
    for s in segs {
        cur.push(s.to_string());
        if known.contains_key(&cur) {
            best = cur.clone();
        } else {
            break;
        }
    }
    Some(best)
}

/// Module → the modules it imports (itself and `tests` modules left out; a child's
/// `super::Item` is an import of its parent's file).
fn graph(krate: &str) -> BTreeMap<Vec<String>, BTreeSet<Vec<String>>> {
    let root = src(krate);
    let known = modules(&root);
    let mut g = BTreeMap::new();
    for (m, file) in &known {
        if m.last()
            .is_some_and(|s| s == "tests" || s.ends_with("_tests"))
        {
            continue;
        }
        let text = code(file);
        // Unit tests at the bottom import freely.
        let text = text.split("#[cfg(test)]").next().unwrap_or(&text);
        let deps: BTreeSet<Vec<String>> = paths(text)
            .iter()
            .filter_map(|p| resolve(m, p, &known))
            .filter(|d| d != m)
            .collect();
        g.insert(m.clone(), deps);
    }
    g
}

fn name(m: &[String]) -> String {
    if m.is_empty() {
        "crate".into()
    } else {
        m.join("::")
    }
}

/// huskd's layers, lowest first: a module may import its own layer or lower ones.
/// A module's layer is that of the longest prefix listed.
const HOST_LAYERS: &[(&str, u8)] = &[
    // Leaves.
    ("config", 0),
    ("store", 0),
    ("metrics", 0),
    ("client", 0),
    ("memory", 0),
    ("logfmt", 0),
    ("image", 1),
    ("network", 1),
    // Sandbox kinds and what they share with the pod machinery.
    ("sandbox::error", 2),
    ("sandbox::agent", 2),
    ("sandbox::state", 2),
    ("sandbox::helper_log", 2),
    ("sandbox::beneath", 2),
    ("sandbox::share", 2),
    ("sandbox::propagation", 2),
    ("sandbox::kind", 2),
    ("sandbox::orphans", 2),
    ("sandbox::vm", 2),
    // The pod machinery.
    ("sandbox", 3),
    // Front ends: gRPC and streaming.
    ("cri", 4),
    ("streaming", 4),
    // The CLI: a CRI client.
    ("cli", 5),
    // Test harness, exempt.
    ("fuzzing", 9),
];

fn host_layer(m: &[String]) -> (String, u8) {
    let n = name(m);
    HOST_LAYERS
        .iter()
        .filter(|(p, _)| n == *p || n.starts_with(&format!("{p}::")))
        .max_by_key(|(p, _)| p.len())
        .map(|(p, l)| (p.to_string(), *l))
        .unwrap_or_else(|| panic!("module {n} has no layer in HOST_LAYERS"))
}

/// The VM backends (`sandbox::vm::qemu`, `sandbox::vm::husk_vmm`) never import each
/// other: what both use lives in `sandbox::vm` (`host.rs`, `process.rs`, `jail.rs`, ...),
/// and what differs is chosen in `sandbox::vm::backend`.
#[test]
fn vm_backends_do_not_import_each_other() {
    let g = graph("host-shim");
    let backends = ["qemu", "husk_vmm"];
    let under = |m: &[String], b: &str| m.len() >= 3 && m[..3] == ["sandbox", "vm", b];
    let mut seen = 0;
    let mut bad = vec![];
    for (m, deps) in &g {
        for (i, b) in backends.iter().enumerate() {
            if !under(m, b) {
                continue;
            }
            seen += 1;
            let other = backends[1 - i];
            for d in deps.iter().filter(|d| under(d, other)) {
                bad.push(format!("{} imports {}", name(m), name(d)));
            }
        }
    }
    assert!(
        seen >= 4,
        "the backend modules are where this test looks ({seen} found)"
    );
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

#[test]
fn host_modules_import_only_their_layer_or_lower() {
    let g = graph("host-shim");
    let mut bad = vec![];
    for (m, deps) in &g {
        if m.is_empty() {
            continue;
        }
        let (_, lm) = host_layer(m);
        for d in deps {
            if d.is_empty() {
                continue;
            }
            let (pd, ld) = host_layer(d);
            if ld > lm {
                bad.push(format!(
                    "{} (layer {lm}) imports {} ({pd}, layer {ld})",
                    name(m),
                    name(d)
                ));
            }
        }
    }
    // The CLI talks to huskd through the CRI client and shared leaf types only.
    for (m, deps) in g
        .iter()
        .filter(|(m, _)| m.first().is_some_and(|s| s == "cli"))
    {
        for d in deps {
            let n = name(d);
            let ok = d.first().is_some_and(|s| s == "cli")
                || [
                    "client",
                    "config",
                    "metrics",
                    "memory",
                    "logfmt",
                    "streaming::client",
                ]
                .iter()
                .any(|p| n == *p || n.starts_with(&format!("{p}::")));
            if !ok {
                bad.push(format!("{} (the CLI) imports {n}", name(m)));
            }
        }
    }
    check_known(bad, HOST_KNOWN);
}

/// Violations not fixed yet (docs/architecture.md, "Layering debts"). An entry
/// that no longer occurs fails too: the list only shrinks.
const HOST_KNOWN: &[&str] = &[];

const AGENT_KNOWN: &[&str] = &[];

fn check_known(found: Vec<String>, known: &[&str]) {
    let new: Vec<_> = found
        .iter()
        .filter(|v| !known.contains(&v.as_str()))
        .collect();
    let gone: Vec<_> = known
        .iter()
        .filter(|k| !found.iter().any(|v| v == *k))
        .collect();
    assert!(
        new.is_empty() && gone.is_empty(),
        "new layering violations:\n{}\n\nfixed (remove them from the known list):\n{}",
        new.iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join("\n"),
        gone.iter().map(|s| **s).collect::<Vec<_>>().join("\n"),
    );
}

/// The cycles of `g`, each as a list of modules.
fn cycles(g: &BTreeMap<Vec<String>, BTreeSet<Vec<String>>>) -> Vec<Vec<String>> {
    // Tarjan's strongly connected components.
    struct St<'a> {
        g: &'a BTreeMap<Vec<String>, BTreeSet<Vec<String>>>,
        index: BTreeMap<&'a [String], usize>,
        low: BTreeMap<&'a [String], usize>,
        stack: Vec<&'a [String]>,
        on: BTreeSet<&'a [String]>,
        out: Vec<Vec<String>>,
    }
    fn visit<'a>(s: &mut St<'a>, v: &'a [String]) {
        let i = s.index.len();
        s.index.insert(v, i);
        s.low.insert(v, i);
        s.stack.push(v);
        s.on.insert(v);
        for w in s.g.get(v).into_iter().flatten() {
            let w: &[String] = s.g.get_key_value(w).map(|(k, _)| k.as_slice()).unwrap_or(w);
            if !s.g.contains_key(w) {
                continue;
            }
            if !s.index.contains_key(w) {
                visit(s, w);
                let lw = s.low[w];
                let lv = s.low[v];
                s.low.insert(v, lv.min(lw));
            } else if s.on.contains(w) {
                let iw = s.index[w];
                let lv = s.low[v];
                s.low.insert(v, lv.min(iw));
            }
        }
        if s.low[v] == s.index[v] {
            let mut comp = vec![];
            while let Some(w) = s.stack.pop() {
                s.on.remove(w);
                comp.push(name(w));
                if w == v {
                    break;
                }
            }
            if comp.len() > 1 {
                comp.sort();
                s.out.push(comp);
            }
        }
    }
    let mut s = St {
        g,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: vec![],
        on: BTreeSet::new(),
        out: vec![],
    };
    for v in g.keys() {
        if !s.index.contains_key(v.as_slice()) {
            visit(&mut s, v);
        }
    }
    s.out
}

#[test]
fn agent_files_do_not_import_each_other_in_a_loop() {
    let g = graph("guest-agent");
    let c = cycles(&g).iter().map(|c| c.join(" <-> ")).collect();
    check_known(c, AGENT_KNOWN);
}

#[test]
fn the_scanner_sees_grouped_and_inline_paths() {
    assert_eq!(
        expand("super::{a::B, c::{d, e as f}}"),
        ["super::a::B", "super::c::d", "super::c::e"]
    );
    let p = paths(&strip(
        "use crate::x::{Y, z::W};\nfn f() { crate::q::r(); let s = \"crate::no\"; } // crate::no\n",
    ));
    assert!(p.contains(&"crate::x::Y".to_string()), "{p:?}");
    assert!(p.contains(&"crate::q::r".to_string()), "{p:?}");
    assert!(!p.iter().any(|p| p.contains("no")), "{p:?}");
}
