//! The module layers (issue 27): every `crate::` / `super::` / `self::` reference in `src/**/*.rs` (use lines,
//! paths in code and types, and paths inside macro bodies such as `html!` or `sqlx::query!`) is checked against the
//! module order written in ARCHITECTURE.md ("Module order", lowest first):
//! * every top-level module of the library is in the list once, and the list names no module that does not exist;
//! * no module refers to one later in the list (an import never climbs a floor), so there is no circle between
//!   top-level modules;
//! * within a module, its child modules (files) form no circle (`source::nats` -> `source::route` -> `source::nats`).
//!
//! Test modules count too: a test that needs a higher module lives in that module (or in `tests/`).
//! A reference to a parent module (`super::Thing`, `use super::*`) or to a child is not an edge: a parent re-exporting
//! a sibling's item hides that reference from the check (keep re-exports for old paths only).
//!
//! Needs no service: `cargo test --test it layers::`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use proc_macro2::{TokenStream, TokenTree};
use syn::visit::Visit;

/// One reference from a file to a module path.
#[derive(Debug, Clone)]
struct Ref {
    /// The file's module path (`["source", "nats"]`).
    from: Vec<String>,
    /// The module the reference resolves to (the longest prefix of its path that is a file module).
    to: Vec<String>,
    file: PathBuf,
    line: usize,
    /// The path as written, for messages.
    text: String,
}

/// The module path of a file under `src/` (`source/nats.rs` -> `source::nats`, `sink/mod.rs` -> `sink`); `None` for
/// the crate roots (`lib.rs`, `main.rs`: the binary refers to `recap::`, not `crate::`).
fn module_of(src: &Path, file: &Path) -> Option<Vec<String>> {
    let rel = file.strip_prefix(src).ok()?.with_extension("");
    let mut parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    match parts.as_slice() {
        [] => None,
        [one] if one == "lib" || one == "main" => None,
        _ => Some(parts),
    }
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}

/// Collects the raw references of one file: (module path the reference is written in, path segments, line).
struct Collector {
    /// The module the visitor is in: the file's, plus any inline `mod x { .. }` around.
    module: Vec<String>,
    found: Vec<(Vec<String>, Vec<String>, usize)>,
}

impl Collector {
    fn push(&mut self, segments: Vec<String>, line: usize) {
        if matches!(
            segments.first().map(String::as_str),
            Some("crate" | "super" | "self")
        ) {
            self.found.push((self.module.clone(), segments, line));
        }
    }

    fn use_tree(&mut self, prefix: &mut Vec<String>, tree: &syn::UseTree) {
        match tree {
            syn::UseTree::Path(p) => {
                prefix.push(p.ident.to_string());
                self.use_tree(prefix, &p.tree);
                prefix.pop();
            }
            syn::UseTree::Name(n) => {
                let mut path = prefix.clone();
                if n.ident != "self" {
                    path.push(n.ident.to_string());
                }
                self.push(path, n.ident.span().start().line);
            }
            syn::UseTree::Rename(r) => {
                let mut path = prefix.clone();
                if r.ident != "self" {
                    path.push(r.ident.to_string());
                }
                self.push(path, r.ident.span().start().line);
            }
            syn::UseTree::Glob(g) => self.push(prefix.clone(), g.star_token.spans[0].start().line),
            syn::UseTree::Group(g) => {
                for t in &g.items {
                    self.use_tree(prefix, t);
                }
            }
        }
    }

    /// `crate :: a :: b` sequences in a macro body (not parsed by syn).
    fn tokens(&mut self, tokens: TokenStream) {
        let trees: Vec<TokenTree> = tokens.into_iter().collect();
        let mut i = 0;
        while i < trees.len() {
            match &trees[i] {
                TokenTree::Group(g) => {
                    self.tokens(g.stream());
                    i += 1;
                }
                TokenTree::Ident(id) if id == "crate" || id == "super" || id == "self" => {
                    let line = id.span().start().line;
                    let mut segments = vec![id.to_string()];
                    let mut j = i + 1;
                    // `:: ident` pairs (`::` is two joint puncts).
                    while j + 2 < trees.len() && is_colon(&trees[j]) && is_colon(&trees[j + 1]) {
                        match &trees[j + 2] {
                            TokenTree::Ident(next) => {
                                segments.push(next.to_string());
                                j += 3;
                            }
                            _ => break,
                        }
                    }
                    if segments.len() > 1 {
                        self.push(segments, line);
                    }
                    i = j.max(i + 1);
                }
                _ => i += 1,
            }
        }
    }
}

fn is_colon(t: &TokenTree) -> bool {
    matches!(t, TokenTree::Punct(p) if p.as_char() == ':')
}

impl<'ast> Visit<'ast> for Collector {
    fn visit_item_mod(&mut self, m: &'ast syn::ItemMod) {
        if m.content.is_some() {
            self.module.push(m.ident.to_string());
            syn::visit::visit_item_mod(self, m);
            self.module.pop();
        }
    }

    fn visit_item_use(&mut self, u: &'ast syn::ItemUse) {
        self.use_tree(&mut Vec::new(), &u.tree);
    }

    fn visit_path(&mut self, p: &'ast syn::Path) {
        let segments: Vec<String> = p.segments.iter().map(|s| s.ident.to_string()).collect();
        if let Some(first) = p.segments.first() {
            self.push(segments, first.ident.span().start().line);
        }
        syn::visit::visit_path(self, p);
    }

    fn visit_macro(&mut self, m: &'ast syn::Macro) {
        self.visit_path(&m.path);
        self.tokens(m.tokens.clone());
    }

    // `pub(in crate::x)` is a visibility, not a dependency.
    fn visit_visibility(&mut self, _: &'ast syn::Visibility) {}
}

/// Resolves `segments` written in `module` to an absolute path (without `crate`).
fn absolute(module: &[String], segments: &[String]) -> Option<Vec<String>> {
    let mut rest = segments;
    let mut base: Vec<String> = match rest.first().map(String::as_str) {
        Some("crate") => {
            rest = &rest[1..];
            Vec::new()
        }
        Some("self") => {
            rest = &rest[1..];
            module.to_vec()
        }
        Some("super") => {
            let mut m = module.to_vec();
            while rest.first().is_some_and(|s| s == "super") {
                m.pop()?;
                rest = &rest[1..];
            }
            m
        }
        _ => return None,
    };
    base.extend(rest.iter().cloned());
    Some(base)
}

/// The longest prefix of `path` that is a file module (`sink::user_key` -> `sink`), or its first segment.
fn module_prefix(modules: &BTreeSet<Vec<String>>, path: &[String]) -> Vec<String> {
    (1..=path.len())
        .rev()
        .map(|n| path[..n].to_vec())
        .find(|p| modules.contains(p))
        .unwrap_or_else(|| path.iter().take(1).cloned().collect())
}

/// The module order from ARCHITECTURE.md: the numbered list under "## Module order", each item starting
/// with the module in backticks (`1. \`model\`: ...`).
fn documented_order(architecture: &str) -> Vec<String> {
    let section = architecture
        .split("\n## ")
        .find(|s| s.starts_with("Module order"))
        .expect("ARCHITECTURE.md has a \"## Module order\" section");
    section
        .lines()
        .filter_map(|l| {
            let l = l.trim_start();
            let (num, rest) = l.split_once(". `")?;
            if num.is_empty() || !num.chars().all(|c| c.is_ascii_digit()) {
                return None;
            }
            Some(rest.split('`').next()?.to_owned())
        })
        .collect()
}

/// Strongly connected components of more than one node (Tarjan).
fn circles(edges: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    struct T<'a> {
        edges: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on: BTreeSet<&'a str>,
        out: Vec<Vec<String>>,
    }
    impl<'a> T<'a> {
        fn go(&mut self, v: &'a str) {
            let i = self.index.len();
            self.index.insert(v, i);
            self.low.insert(v, i);
            self.stack.push(v);
            self.on.insert(v);
            for w in self.edges.get(v).into_iter().flatten() {
                let w = w.as_str();
                if !self.index.contains_key(w) {
                    self.go(w);
                    let lw = self.low[w];
                    let lv = self.low.get_mut(v).expect("low");
                    *lv = (*lv).min(lw);
                } else if self.on.contains(w) {
                    let iw = self.index[w];
                    let lv = self.low.get_mut(v).expect("low");
                    *lv = (*lv).min(iw);
                }
            }
            if self.low[v] == self.index[v] {
                let mut comp = Vec::new();
                while let Some(w) = self.stack.pop() {
                    self.on.remove(w);
                    comp.push(w.to_owned());
                    if w == v {
                        break;
                    }
                }
                if comp.len() > 1 {
                    comp.sort();
                    self.out.push(comp);
                }
            }
        }
    }
    let mut t = T {
        edges,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on: BTreeSet::new(),
        out: Vec::new(),
    };
    let nodes: BTreeSet<&str> = edges
        .iter()
        .flat_map(|(k, vs)| std::iter::once(k.as_str()).chain(vs.iter().map(String::as_str)))
        .collect();
    for n in nodes {
        if !t.index.contains_key(n) {
            t.go(n);
        }
    }
    t.out
}

fn collect(root: &Path) -> (BTreeSet<Vec<String>>, Vec<Ref>) {
    let src = root.join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let modules: BTreeSet<Vec<String>> = files.iter().filter_map(|f| module_of(&src, f)).collect();
    let mut refs = Vec::new();
    for file in &files {
        let Some(module) = module_of(&src, file) else {
            continue;
        };
        let text = std::fs::read_to_string(file).expect("read source");
        let ast =
            syn::parse_file(&text).unwrap_or_else(|e| panic!("parse {}: {e}", file.display()));
        let mut c = Collector {
            module: module.clone(),
            found: Vec::new(),
        };
        c.visit_file(&ast);
        for (written_in, segments, line) in c.found {
            let Some(abs) = absolute(&written_in, &segments) else {
                continue;
            };
            refs.push(Ref {
                from: module.clone(),
                to: module_prefix(&modules, &abs),
                file: file.strip_prefix(root).unwrap_or(file).to_path_buf(),
                line,
                text: segments.join("::"),
            });
        }
    }
    (modules, refs)
}

/// Every breach of the layers; empty when the tree keeps them.
fn breaches(root: &Path) -> Vec<String> {
    let architecture =
        std::fs::read_to_string(root.join("ARCHITECTURE.md")).expect("read ARCHITECTURE.md");
    let order = documented_order(&architecture);
    let (modules, refs) = collect(root);
    let mut out = Vec::new();

    let tops: BTreeSet<String> = modules.iter().map(|m| m[0].clone()).collect();
    let listed: BTreeSet<String> = order.iter().cloned().collect();
    for t in tops.difference(&listed) {
        out.push(format!(
            "module `{t}` is not in ARCHITECTURE.md's module order"
        ));
    }
    for t in listed.difference(&tops) {
        out.push(format!(
            "ARCHITECTURE.md's module order names `{t}`, which is no module in src/"
        ));
    }
    for (i, t) in order.iter().enumerate() {
        if order[..i].contains(t) {
            out.push(format!("ARCHITECTURE.md's module order names `{t}` twice"));
        }
    }
    let pos = |m: &str| order.iter().position(|o| o == m);

    // Top-level: no reference to a later module.
    let mut top_edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    // Within a module: no circle between its children, keyed by parent.
    let mut child_edges: BTreeMap<Vec<String>, BTreeMap<String, BTreeSet<String>>> =
        BTreeMap::new();
    for r in &refs {
        let (from, to) = (&r.from[0], &r.to[0]);
        if from != to {
            top_edges
                .entry(from.clone())
                .or_default()
                .insert(to.clone());
            if let (Some(f), Some(t)) = (pos(from), pos(to))
                && t > f
            {
                out.push(format!(
                    "{}:{}: `{from}` refers to `{to}` ({}), which comes after it in ARCHITECTURE.md's module order",
                    r.file.display(),
                    r.line,
                    r.text
                ));
            }
            continue;
        }
        let common = r.from.iter().zip(&r.to).take_while(|(a, b)| a == b).count();
        if common < r.from.len() && common < r.to.len() {
            child_edges
                .entry(r.from[..common].to_vec())
                .or_default()
                .entry(r.from[common].clone())
                .or_default()
                .insert(r.to[common].clone());
        }
    }
    for c in circles(&top_edges) {
        out.push(format!(
            "circle between top-level modules: {}",
            c.join(", ")
        ));
    }
    for (parent, edges) in &child_edges {
        for c in circles(edges) {
            let mut msg = format!("circle within `{}`: {}", parent.join("::"), c.join(", "));
            for r in refs.iter().filter(|r| {
                r.from.len() > parent.len()
                    && r.to.len() > parent.len()
                    && r.from[..parent.len()] == parent[..]
                    && r.to[..parent.len()] == parent[..]
                    && c.contains(&r.from[parent.len()])
                    && c.contains(&r.to[parent.len()])
                    && r.from[parent.len()] != r.to[parent.len()]
            }) {
                let _ = write!(msg, "\n    {}:{}: {}", r.file.display(), r.line, r.text);
            }
            out.push(msg);
        }
    }
    out
}

#[test]
fn no_import_climbs_a_floor_and_no_circle() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let found = breaches(root);
    assert!(
        found.is_empty(),
        "{} breach(es) of the module layers (ARCHITECTURE.md, \"Module order\"):\n{}",
        found.len(),
        found.join("\n")
    );
}

/// The check itself finds a climbing import, a circle between siblings and an unlisted module (a tree in target/tmp).
#[test]
fn the_check_sees_a_climb_a_circle_and_an_unlisted_module() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target/tmp/layers-fixture")
        .join(std::process::id().to_string());
    let _ = std::fs::remove_dir_all(&root);
    let write = |rel: &str, text: &str| {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(p, text).expect("write");
    };
    write(
        "ARCHITECTURE.md",
        "# A\n\n## Module order\n\n1. `low`: bottom\n2. `high`: top\n\n## Next\n\n3. `ignored`: not here\n",
    );
    write(
        "src/lib.rs",
        "pub mod low;\npub mod high;\npub mod extra;\n",
    );
    write(
        "src/low/mod.rs",
        "pub mod a;\npub mod b;\npub fn f() { let _ = html! { (crate::high::g()) }; }\n",
    );
    write("src/low/a.rs", "use super::b::B;\npub struct A;\n");
    write(
        "src/low/b.rs",
        "pub struct B;\n#[cfg(test)]\nmod tests { use super::*; fn t() { let _ = crate::low::a::A; } }\n",
    );
    write("src/high.rs", "use crate::low::{a::A, b};\npub fn g() {}\n");
    write("src/extra.rs", "\n");
    let found = breaches(&root);
    let _ = std::fs::remove_dir_all(&root);
    let all = found.join("\n");
    assert!(
        found
            .iter()
            .any(|f| f.starts_with("src/low/mod.rs:3: `low` refers to `high` (crate::high::g)")),
        "the climb inside html! is found: {all}"
    );
    assert!(
        found
            .iter()
            .any(|f| f.starts_with("circle within `low`: a, b")),
        "the circle a <-> b (one edge in a test module) is found: {all}"
    );
    assert!(
        found
            .iter()
            .any(|f| f == "module `extra` is not in ARCHITECTURE.md's module order"),
        "the unlisted module is found: {all}"
    );
    assert!(
        found
            .iter()
            .any(|f| f == "circle between top-level modules: high, low"),
        "the top-level circle is named: {all}"
    );
    assert_eq!(found.len(), 4, "nothing else (high -> low is down): {all}");
}
